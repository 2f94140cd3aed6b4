"""What the plugins add besides backends: platforms, model families, logits processors, as
`enginehouse plugins` and `explain` show them."""

from __future__ import annotations

from typing import Any

from . import logits_processors, platforms
from .plugins import PluginHost


def by_plugin(host: PluginHost) -> dict[str, dict[str, list[str]]]:
    """{plugin: {"platforms": [...], "model_families": [...], "logits_processors": [...]}}"""
    out: dict[str, dict[str, list[str]]] = {}

    def add(plugin: str, kind: str, name: str) -> None:
        out.setdefault(plugin, {}).setdefault(kind, []).append(name)

    for name, (plugin, _) in platforms.registered(host).items():
        add(plugin, "platforms", name)
    for plugin, result in host.call_each("register_model_families"):
        for family in result if isinstance(result, list) else ():
            add(plugin, "model_families", family.architecture)
    for name, (plugin, _) in logits_processors.registered(host).items():
        add(plugin, "logits_processors", name)
    return out


def explain_extensions(host: PluginHost, architecture: str, device: str) -> dict[str, Any]:
    """For `explain`: the platform `device` names, every platform, the plugin family of the
    architecture (None for the backends' own and unknown ones), the logits processors."""
    every = platforms.registered(host)
    try:
        chosen = platforms.platform_of(device, host)[0].name
    except ValueError:
        chosen = None
    family = None
    for plugin, result in host.call_each("register_model_families"):
        for f in result if isinstance(result, list) else ():
            if f.architecture == architecture and f.base is not None and family is None:
                family = {"plugin": plugin, "base": f.base, "backend": f.backend}
    return {
        "platform": chosen,
        "platforms": {n: {"plugin": p, **pf.describe()} for n, (p, pf) in every.items()},
        "model_family": family,
        "logits_processors": {n: p for n, (p, _) in logits_processors.registered(host).items()},
    }
