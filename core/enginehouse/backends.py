"""Step 4 of `pipeline()`: ask every backend whether it can run the model, and pick one.

A backend is named by its probe (`BackendProbe.name`) and owned by the plugin that answered.
Two plugins offering the same name are a conflict, never a silent takeover: asking for that
name is an error until the user qualifies it as `plugin:name` (or loads one of the plugins
only, with ENGINEHOUSE_PLUGINS), and the automatic choice passes over it with a warning.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .config import EngineConfig
from .device import missing_gpus
from .errors import BackendError
from .plugins import SELECT_VAR, PluginHost
from .spec import BackendProbe, ModelSpec
from .speculative_config import HEAD_METHODS

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BackendDecision:
    """Every backend's verdict, best first, and the one chosen (with the plugin offering it)."""

    chosen: str | None
    requested: str | None
    verdicts: tuple[BackendProbe, ...]
    chosen_plugin: str | None = None

    def verdict(self, name: str) -> BackendProbe | None:
        """The verdict for `name` ('backend' or 'plugin:backend')."""
        return next(iter(matching(self.verdicts, name)), None)

    @property
    def chosen_verdict(self) -> BackendProbe:
        """The chosen backend's verdict; its plugin builds the runner."""
        plugin = self.chosen_plugin
        name = f"{plugin}:{self.chosen}" if plugin else self.chosen or ""
        verdict = self.verdict(name)
        if verdict is None:
            raise BackendError("no backend was chosen")
        return verdict

    @property
    def conflicts(self) -> dict[str, list[str]]:
        """Backend names offered by more than one plugin, with those plugins."""
        return conflicts(self.verdicts)

    def as_dict(self) -> dict[str, Any]:
        return {
            "chosen": self.chosen,
            "chosen_plugin": self.chosen_plugin,
            "requested": self.requested,
            "conflicts": self.conflicts,
            "verdicts": [
                {
                    "backend": v.name,
                    "plugin": v.plugin,
                    "supported": v.supported,
                    "priority": v.priority,
                    "reason": v.reason,
                    "verifies_tokens": v.verifies_tokens,  # speculative decoding
                    "drafts_tokens": v.drafts_tokens,  # ... with a draft head
                    "lora_adapters": v.lora,
                }
                for v in self.verdicts
            ],
        }


def matching(verdicts: Sequence[BackendProbe], name: str) -> list[BackendProbe]:
    plugin, _, backend = name.rpartition(":")
    return [v for v in verdicts if v.name == backend and (not plugin or v.plugin == plugin)]


def conflicts(verdicts: Sequence[BackendProbe]) -> dict[str, list[str]]:
    """{backend name: [plugins]} for every name more than one plugin offers."""
    owners: dict[str, list[str]] = {}
    for v in verdicts:
        if not v.name.startswith("<"):  # "<plugin>" marks a probe that raised, not a backend
            owners.setdefault(v.name, []).append(v.plugin)
    return {name: plugins for name, plugins in owners.items() if len(set(plugins)) > 1}


def conflict_message(name: str, plugins: list[str]) -> str:
    both = " and ".join(repr(p) for p in plugins)
    return f"backend {name!r} is offered by plugins {both}"


def offered_backends(plugins: PluginHost) -> dict[str, list[str]]:
    """{plugin: backend names it offers}, from its probe of a plain Llama config (no model is
    at hand when `enginehouse plugins` lists them). A probe that raises offers nothing here."""
    spec = ModelSpec(
        model_id="(listing)",
        path=Path("(listing)"),
        config={"architectures": ["LlamaForCausalLM"], "model_type": "llama"},
        generation_config={},
        architectures=("LlamaForCausalLM",),
        model_type="llama",
        tokenizer_files=(),
        weight_files=(),
        weight_bytes=0,
        dtype="float32",
        context_length=None,
    )
    offered: dict[str, list[str]] = {}
    for v in probe_backends(spec, EngineConfig(), plugins):
        if not v.name.startswith("<") and v.name not in offered.setdefault(v.plugin, []):
            offered[v.plugin].append(v.name)
    return offered


def probe_backends(
    spec: ModelSpec, config: EngineConfig, plugins: PluginHost
) -> list[BackendProbe]:
    """Every backend's answer, tagged with its plugin. A probe that raises counts as a 'no'."""
    verdicts: list[BackendProbe] = []
    for plugin, result in plugins.call_each("probe_backend", spec=spec, config=config):
        if isinstance(result, Exception):
            reason = f"probe of plugin {plugin!r} failed: {type(result).__name__}: {result}"
            verdicts.append(BackendProbe(f"<{plugin}>", False, reason=reason, plugin=plugin))
            continue
        for probe in [result] if isinstance(result, BackendProbe) else result or []:
            probe = _at_tp(replace(probe, plugin=plugin), config)
            verdicts.append(_speculating(probe, config))
    # Supported first, then by priority; the sort is stable, so ties keep plugin order.
    verdicts.sort(key=lambda v: (not v.supported, -v.priority))
    return verdicts


def _at_tp(probe: BackendProbe, config: EngineConfig) -> BackendProbe:
    """At tp > 1 a backend runs the model only if it says it shards (`tensor_parallel`), and
    only where the executor has a GPU for every rank."""
    tp = config.tp
    if not probe.supported:
        return probe
    if tp == 1:  # data-parallel replicas each need their GPU too
        gpus = missing_gpus(config)
        return probe if gpus is None else replace(probe, supported=False, reason=gpus)
    if not probe.tensor_parallel:
        reason = (
            f"no tensor parallelism: {probe.name!r} runs a model on one device only, and "
            f"tp={tp} was asked (without tp it would say: {probe.reason})"
        )
        return replace(probe, supported=False, reason=reason)
    gpus = missing_gpus(config)
    return probe if gpus is None else replace(probe, supported=False, reason=gpus)


def _speculating(probe: BackendProbe, config: EngineConfig) -> BackendProbe:
    """With `speculative_config`, a backend runs the model only if it verifies several
    tokens per sequence in one step (`verifies_tokens`): no silent fallback to plain decoding."""
    spec = config.speculative_config
    if spec is None or not probe.supported:
        return probe
    if not probe.verifies_tokens:
        why = f" ({probe.name!r} {probe.draft_reason})" if probe.draft_reason else ""
        reason = (
            f"no speculative decoding: {probe.name!r} cannot verify several tokens of a sequence "
            f"in one step, and speculative_config asks for it{why} (without it it would say: "
            f"{probe.reason})"
        )
        return replace(probe, supported=False, reason=reason)
    if spec.method in HEAD_METHODS and not probe.drafts_tokens:
        why = probe.draft_reason or "runs no draft head on the target's hidden states"
        reason = (
            f"no speculative decoding with method {spec.method!r}: {probe.name!r} {why} "
            f"(without it it would say: {probe.reason}); use method 'ngram' or 'draft_model'"
        )
        return replace(probe, supported=False, reason=reason)
    return probe


def choose_backend(
    verdicts: list[BackendProbe], requested: str | None = None, problems: Sequence[str] = ()
) -> BackendDecision:
    """Honour an explicit request ('backend' or 'plugin:backend'), else take the supported,
    unambiguous backend with the highest priority. `problems` (plugins that failed to load)
    are added to the errors about a backend that is missing."""
    decision = BackendDecision(chosen=None, requested=requested, verdicts=tuple(verdicts))
    clashes = conflicts(verdicts)
    if requested is not None:
        verdict = _requested(verdicts, requested, clashes, problems)
        if not verdict.supported:
            raise BackendError(f"backend {requested!r} cannot run this model: {verdict.reason}")
        return replace(decision, chosen=verdict.name, chosen_plugin=verdict.plugin)
    for name, plugins in clashes.items():
        log.warning(
            "%s; it is not chosen automatically. Ask for one as 'PLUGIN:%s' (e.g. %s:%s)",
            conflict_message(name, plugins),
            name,
            plugins[0],
            name,
        )
    best = next((v for v in verdicts if v.supported and v.name not in clashes), None)
    if best is None:
        raise BackendError(_no_backend_message(verdicts, clashes, problems))
    return replace(decision, chosen=best.name, chosen_plugin=best.plugin)


def _requested(
    verdicts: list[BackendProbe],
    requested: str,
    clashes: dict[str, list[str]],
    problems: Sequence[str],
) -> BackendProbe:
    matches = matching(verdicts, requested)
    if len(matches) > 1:
        plugins = clashes[requested]
        raise BackendError(
            f"{conflict_message(requested, plugins)}; pick one by its plugin, "
            f"e.g. backend='{plugins[0]}:{requested}', or load only one of them with "
            f"{SELECT_VAR}"
        )
    if not matches:
        known = ", ".join(sorted({v.name for v in verdicts})) or "none (no backend plugin)"
        raise BackendError(
            f"unknown backend {requested!r}; the installed backends are: {known}. "
            "Install its plugin (e.g. pip install 'enginehouse[pytorch]') or pick another"
            + _problems_note(problems)
        )
    return matches[0]


def _problems_note(problems: Sequence[str]) -> str:
    if not problems:
        return ""
    return ".\nAlso, plugins did not load, so their backends are missing:\n" + "\n".join(
        f"  - {p}" for p in problems
    )


def _no_backend_message(
    verdicts: list[BackendProbe], clashes: dict[str, list[str]], problems: Sequence[str]
) -> str:
    if not verdicts:
        return (
            "no backend plugin is installed; install one, e.g. pip install 'enginehouse[pytorch]' "
            "(enginehouse plugins lists what is loaded and any load errors)"
        ) + _problems_note(problems)
    lines = "\n".join(f"  - {v.name} ({v.plugin}): {v.reason}" for v in verdicts)
    message = f"no installed backend can run this model:\n{lines}"
    for name, plugins in clashes.items():
        message += f"\n{conflict_message(name, plugins)}: ask for one as '{plugins[0]}:{name}'"
    return message + _problems_note(problems)
