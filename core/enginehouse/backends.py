"""Step 4 of `pipeline()`: ask every backend whether it can run the model, and pick one."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from .config import EngineConfig
from .errors import BackendError
from .plugins import PluginHost
from .spec import BackendProbe, ModelSpec


@dataclass(frozen=True)
class BackendDecision:
    """Every backend's verdict, best first, and the one chosen."""

    chosen: str | None
    requested: str | None
    verdicts: tuple[BackendProbe, ...]

    def verdict(self, name: str) -> BackendProbe | None:
        return next((v for v in self.verdicts if v.name == name), None)

    @property
    def chosen_verdict(self) -> BackendProbe:
        """The chosen backend's verdict (its plugin builds the runner)."""
        verdict = self.verdict(self.chosen or "")
        if verdict is None:
            raise BackendError("no backend was chosen")
        return verdict

    def as_dict(self) -> dict[str, Any]:
        return {
            "chosen": self.chosen,
            "requested": self.requested,
            "verdicts": [
                {
                    "backend": v.name,
                    "plugin": v.plugin,
                    "supported": v.supported,
                    "priority": v.priority,
                    "reason": v.reason,
                }
                for v in self.verdicts
            ],
        }


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
            verdicts.append(replace(probe, plugin=plugin))
    # Supported first, then by priority; the sort is stable, so ties keep plugin order.
    verdicts.sort(key=lambda v: (not v.supported, -v.priority))
    return verdicts


def choose_backend(verdicts: list[BackendProbe], requested: str | None = None) -> BackendDecision:
    """Honour an explicit request, else take the supported backend with the highest priority."""
    decision = BackendDecision(chosen=None, requested=requested, verdicts=tuple(verdicts))
    if requested is not None:
        verdict = decision.verdict(requested)
        if verdict is None:
            known = ", ".join(sorted(v.name for v in verdicts)) or "none (no backend plugin)"
            raise BackendError(
                f"unknown backend {requested!r}; the installed backends are: {known}. "
                "Install its plugin (e.g. pip install 'enginehouse[pytorch]') or pick another"
            )
        if not verdict.supported:
            raise BackendError(f"backend {requested!r} cannot run this model: {verdict.reason}")
        return replace(decision, chosen=requested)
    best = next((v for v in verdicts if v.supported), None)
    if best is None:
        raise BackendError(_no_backend_message(verdicts))
    return replace(decision, chosen=best.name)


def _no_backend_message(verdicts: list[BackendProbe]) -> str:
    if not verdicts:
        return (
            "no backend plugin is installed; install one, e.g. pip install 'enginehouse[pytorch]' "
            "(enginehouse plugins lists what is loaded and any load errors)"
        )
    lines = "\n".join(f"  - {v.name} ({v.plugin}): {v.reason}" for v in verdicts)
    return f"no installed backend can run this model:\n{lines}"
