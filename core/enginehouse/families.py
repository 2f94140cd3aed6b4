"""Model families a plugin adds to a native backend (the `register_model_families` hook).

A family is an architecture name (config.json's `architectures`) and how a native backend
builds it from what it already has: the native family whose decoder it is (`base`), a
function that reads its config.json as that family's (`config`), the switches it sets over
the base's (`switches`: fields of the native backend's `Arch`, such as `qk_norm`), and the
renames that turn its checkpoint's tensor names into the base's (`weight_names`). A backend's
own families register the same way, with `reader` (its function from config to `Arch`).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .plugins import PluginHost

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelFamily:
    """One architecture a native backend runs."""

    architecture: str  # config.json "architectures" entry, e.g. "ToyLlamaForCausalLM"
    base: str | None = None  # the native architecture it builds on, e.g. "LlamaForCausalLM"
    name: str | None = None  # its family name in `explain` (default: the base's)
    config: Callable[[Mapping[str, Any]], Mapping[str, Any]] | None = None  # -> base's keys
    switches: Mapping[str, Any] = field(default_factory=dict)  # Arch fields over the base's
    weight_names: Sequence[tuple[str, str]] = ()  # (regex, replacement): checkpoint -> base
    reference: str | None = None  # the transformers class with the same math (conformance)
    # Writes a checkpoint of this family from one of `reference` (src folder, dst folder),
    # so that the conformance kit can compare the two on the same weights.
    from_reference: Callable[[Path, Path], None] | None = None
    backend: str = "pytorch"  # the native backend that runs it
    reader: Callable[[Mapping[str, Any]], Any] | None = None  # the backend's own: config -> Arch

    def __post_init__(self) -> None:
        if (self.base is None) == (self.reader is None):
            raise ValueError(
                f"ModelFamily {self.architecture!r}: give either base= (the native "
                "architecture it builds on) or reader= (a backend's own config -> Arch)"
            )
        for pattern, _ in self.weight_names:
            re.compile(pattern)  # a bad pattern fails at registration, not at load

    def rename(self, name: str) -> str:
        """A checkpoint tensor's name as the base family names it."""
        for pattern, replacement in self.weight_names:
            name = re.sub(pattern, replacement, name)
        return name


def registered(backend: str, host: PluginHost | None = None) -> dict[str, tuple[str, ModelFamily]]:
    """architecture -> (plugin, family) for `backend`, from every plugin's hook.

    The first plugin called that registers an architecture keeps it; another registering a
    different family under the same name is logged and ignored. (The native backend puts its
    own families ahead of all of these: a plugin cannot replace one.)"""
    if host is None:
        from .plugins import get_plugins

        host = get_plugins()
    found: dict[str, tuple[str, ModelFamily]] = {}
    for plugin, result in host.call_each("register_model_families"):
        if isinstance(result, Exception):
            log.warning("plugin %s failed to register its model families: %s", plugin, result)
            continue
        for family in result or ():
            if family.backend != backend:
                continue
            known = found.get(family.architecture)
            if known is not None and known[0] != plugin and known[1] != family:
                log.warning(
                    "plugin %s registers %s, which %s already registers: ignored",
                    plugin,
                    family.architecture,
                    found[family.architecture][0],
                )
                continue
            found.setdefault(family.architecture, (plugin, family))
    return found
