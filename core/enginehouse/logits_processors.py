"""Logits processors: named changes to the logits that a request asks for, from plugins.

The interface follows vLLM v1's `LogitsProcessor`: one instance per processor where sampling
runs, holding its per-request state across steps; each step it is told what changed
(`update_state`: the requests that started using it, with their `extra_args`, the ones that
finished, and the row of the logits each of its requests samples from this step), then
changes those rows (`apply`). `is_argmax_invariant` says whether it can change which token is
the largest: one that cannot is skipped in a step where all its rows are greedy.

Requests name processors (`GenerationConfig(logits_processors=["name"])`); the sampler gets
names, never objects (its batch is plain picklable data sent to the rank that samples), and
builds the processors there from the `register_logits_processors` hook.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    import torch

    from .plugins import PluginHost

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchUpdate:
    """What changed for one processor since its last step, and where its requests are now."""

    # Requests that start using the processor: (seq_id, their GenerationConfig.extra_args).
    added: Sequence[tuple[int, Mapping[str, Any]]] = ()
    removed: Sequence[int] = ()  # requests that finished: forget their state
    # This step: seq_id -> the logits row it samples from, for every request using it.
    rows: Mapping[int, int] = field(default_factory=dict)
    # seq_id -> the tokens the request has generated so far (for its rows this step).
    output_ids: Mapping[int, Sequence[int]] = field(default_factory=dict)


class LogitsProcessor:
    """A named processor: subclass it, set `name`, and register the class with the
    `register_logits_processors` hook. Built once where sampling runs, with no arguments."""

    name: ClassVar[str] = ""
    # The extra_args a request would give it: what the conformance kit applies it with.
    example_args: ClassVar[Mapping[str, Any]] = {}

    def is_argmax_invariant(self) -> bool:
        """True when it never changes which token has the largest logit (greedy rows are then
        left alone); False by default."""
        return False

    def update_state(self, batch: BatchUpdate) -> None:
        """Take the step's changes (called every step in which any request uses it)."""

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """Change the rows of `logits` ([rows, vocab], float32) that `update_state` named
        this step, in place or in a copy it returns; never the other rows."""
        raise NotImplementedError


def registered(host: PluginHost | None = None) -> dict[str, tuple[str, type[LogitsProcessor]]]:
    """name -> (plugin, class) of every processor the plugins register; a name two plugins
    register is kept by the first, with a warning."""
    from .plugins import first_by_name, get_plugins

    if host is None:
        host = get_plugins()
    answers = host.call_each("register_logits_processors")
    return first_by_name(answers, "logits processor", lambda cls: cls.name)


def check_names(names: Sequence[str], host: PluginHost | None = None) -> None:
    """Raise ParamError naming each unknown processor and the ones there are."""
    from .errors import ParamError

    known = registered(host)
    unknown = [n for n in names if n not in known]
    if unknown:
        have = ", ".join(sorted(known)) or "none installed"
        raise ParamError(
            f"unknown logits processor {', '.join(map(repr, unknown))} (registered: {have}); "
            "a processor comes from a plugin's register_logits_processors hook "
            "(`enginehouse plugins` lists them)",
            "logits_processors",
        )
