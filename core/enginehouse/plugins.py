"""Find, load and call plugins.

Plugins are modules named by entry points in the group ``enginehouse``. Each is loaded on its own:
one that fails to import or register is recorded with its error and skipped, so a broken plugin
never takes the host down. ``ENGINEHOUSE_STRICT_PLUGINS=1`` re-raises instead (for plugin
authors); ``ENGINEHOUSE_PLUGINS=a,b`` loads only those entry points (empty: none).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib.metadata import EntryPoint, PackageNotFoundError, entry_points, version
from typing import Any

import pluggy

from . import default_plugin, hookspecs

ENTRY_POINT_GROUP = "enginehouse"
DEFAULT_PLUGIN = "enginehouse.default"


@dataclass
class PluginInfo:
    """One plugin as `enginehouse plugins` shows it."""

    name: str
    distribution: str | None = None
    version: str | None = None
    hooks: list[str] = field(default_factory=list)
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "distribution": self.distribution,
            "version": self.version,
            "hooks": self.hooks,
            "error": self.error,
        }


class PluginHost:
    """A pluggy manager plus the record of every plugin it tried to load."""

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.infos: dict[str, PluginInfo] = {}

    def register(self, plugin: object, name: str, info: PluginInfo | None = None) -> None:
        """Register one plugin and validate its hooks; on failure nothing of it stays."""
        info = info or PluginInfo(name=name)
        self.infos[name] = info
        try:
            self.pm.register(plugin, name=name)
            # check_pending() catches misspelled hook names (e.g. `probe_backends`).
            self.pm.check_pending()
        except Exception as e:
            if self.pm.is_registered(plugin):
                self.pm.unregister(plugin)
            info.error = f"{type(e).__name__}: {e}"
            raise
        info.hooks = sorted(h.name for h in self.pm.get_hookcallers(plugin) or ())

    def load_entry_point(self, ep: EntryPoint, strict: bool) -> None:
        dist = getattr(ep, "dist", None)
        info = PluginInfo(
            name=ep.name,
            distribution=dist.name if dist else None,
            version=dist.version if dist else None,
        )
        try:
            module = ep.load()
        except Exception as e:
            info.error = f"{type(e).__name__}: {e}"
            self.infos[ep.name] = info
            if strict:
                raise
            return
        try:
            self.register(module, ep.name, info)
        except Exception:
            if strict:
                raise

    def call_each(self, hook_name: str, **kwargs: Any) -> Iterator[tuple[str, Any]]:
        """Call every implementation of a hook on its own, in pluggy's order.

        Yields (plugin name, result or the exception it raised), so the caller can attribute
        each answer to its plugin and one faulty plugin cannot hide the others.
        """
        caller = getattr(self.pm.hook, hook_name)
        for impl in reversed(caller.get_hookimpls()):  # pluggy calls the last registered first
            if impl.hookwrapper or impl.wrapper:
                continue  # wrappers wrap a joint call; each answer here is taken on its own
            args = {k: kwargs[k] for k in impl.argnames}
            try:
                yield impl.plugin_name, impl.function(**args)
            except Exception as e:  # noqa: BLE001 - reported to the user, never swallowed
                yield impl.plugin_name, e

    def call_one(self, plugin: str, hook_name: str, **kwargs: Any) -> Any:
        """Call one plugin's implementation of a hook (None when it has none)."""
        caller = getattr(self.pm.hook, hook_name)
        for impl in caller.get_hookimpls():
            if impl.plugin_name == plugin and not (impl.hookwrapper or impl.wrapper):
                return impl.function(**{k: kwargs[k] for k in impl.argnames})
        return None

    @property
    def hook(self) -> Any:
        return self.pm.hook

    def errors(self) -> dict[str, str]:
        return {n: i.error for n, i in self.infos.items() if i.error}


def _core_dist() -> tuple[str, str | None]:
    try:
        return "enginehouse", version("enginehouse")
    except PackageNotFoundError:  # running from a source tree that is not installed
        return "enginehouse", None


def _selected(names: str | None) -> set[str] | None:
    if names is None:
        return None
    return {n.strip() for n in names.split(",") if n.strip()}


def load_plugins(strict: bool | None = None, only: str | None = None) -> PluginHost:
    """A fresh host with the core's default plugin and the installed entry-point plugins.

    `strict` and `only` default to ENGINEHOUSE_STRICT_PLUGINS and ENGINEHOUSE_PLUGINS.
    """
    if strict is None:
        flag = os.environ.get("ENGINEHOUSE_STRICT_PLUGINS", "").strip().lower()
        strict = flag in ("1", "true", "yes", "on")
    selected = _selected(os.environ.get("ENGINEHOUSE_PLUGINS") if only is None else only)
    host = PluginHost()
    host.register(default_plugin, DEFAULT_PLUGIN, PluginInfo(DEFAULT_PLUGIN, *_core_dist()))
    seen: set[str] = set()
    for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        if ep.name in seen or (selected is not None and ep.name not in selected):
            continue  # the same distribution can be visible twice on odd sys.paths
        seen.add(ep.name)
        host.load_entry_point(ep, strict)
    return host


_host: PluginHost | None = None
_lock = threading.Lock()


def get_plugins() -> PluginHost:
    """The process-wide plugin host, loaded on first use."""
    global _host
    with _lock:
        if _host is None:
            _host = load_plugins()
        return _host


def reset_plugins() -> None:
    """Forget the loaded plugins; the next `get_plugins()` reads the entry points again."""
    global _host
    with _lock:
        _host = None
