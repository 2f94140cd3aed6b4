"""Find, load and call plugins.

Plugins are modules named by entry points in the group ``enginehouse``. Each is loaded on its own:
one that fails to import or register is recorded with its error, logged as a warning and
skipped, so a broken plugin never takes the host down. ``ENGINEHOUSE_STRICT_PLUGINS=1`` raises
instead, naming the plugin (for plugin authors); ``ENGINEHOUSE_PLUGINS=a,b`` loads only those
entry points (empty: none), and names in it that no installed plugin has are reported.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from importlib.metadata import EntryPoint, PackageNotFoundError, entry_points, version
from typing import Any

import pluggy

from . import default_plugin, hookspecs
from .contract import check_declared, warn_deprecated_hooks
from .errors import PluginLoadError

log = logging.getLogger(__name__)
ENTRY_POINT_GROUP = "enginehouse"
DEFAULT_PLUGIN = "enginehouse.default"
STRICT_VAR, SELECT_VAR = "ENGINEHOUSE_STRICT_PLUGINS", "ENGINEHOUSE_PLUGINS"
_ON, _OFF = ("1", "true", "yes", "on"), ("", "0", "false", "no", "off")


@dataclass
class PluginInfo:
    """One plugin as `enginehouse plugins` shows it."""

    name: str
    distribution: str | None = None
    version: str | None = None
    hooks: list[str] = field(default_factory=list)
    error: str | None = None
    contract: str | None = None  # the contract version it declares (None: undeclared)

    @property
    def label(self) -> str:
        """'name' or 'name' (distribution), as messages name the plugin."""
        return f"{self.name!r}" + (f" ({self.distribution})" if self.distribution else "")

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "distribution": self.distribution,
            "version": self.version,
            "hooks": self.hooks,
            "error": self.error,
            "contract": self.contract,
        }


class PluginHost:
    """A pluggy manager plus the record of every plugin it tried to load."""

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.infos: dict[str, PluginInfo] = {}
        # Names ENGINEHOUSE_PLUGINS (or `only`) asked for that no installed plugin has.
        self.unmatched: list[str] = []

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
        warn_deprecated_hooks(info.label, info.hooks)

    def load_entry_point(self, ep: EntryPoint, strict: bool) -> None:
        dist = getattr(ep, "dist", None)
        info = PluginInfo(
            name=ep.name,
            distribution=dist.name if dist else None,
            version=dist.version if dist else None,
        )
        try:
            module = ep.load()
            # Refused before it registers: a plugin of another major version of the contract.
            info.contract = check_declared(module, info.label)
            self.register(module, ep.name, info)
        except Exception as e:
            info.error = info.error or f"{type(e).__name__}: {e}"
            self.infos[ep.name] = info
            if strict:
                raise PluginLoadError(f"error loading plugin {info.label}: {info.error}") from e
            log.warning(
                "plugin %s failed to load and is skipped: %s (enginehouse plugins lists load "
                "errors; %s=1 raises them)",
                info.label,
                info.error,
                STRICT_VAR,
            )

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

    def problems(self) -> list[str]:
        """What went wrong while loading, one line each: for errors about missing backends."""
        lines = [
            f"plugin {self.infos[n].label} failed to load: {e}" for n, e in self.errors().items()
        ]
        if self.unmatched:
            lines.append(unmatched_message(self.unmatched))
        return lines


def _core_dist() -> tuple[str, str | None]:
    try:
        return "enginehouse", version("enginehouse")
    except PackageNotFoundError:  # running from a source tree that is not installed
        return "enginehouse", None


def _selected(names: str | None) -> set[str] | None:
    if names is None:
        return None
    return {n.strip() for n in names.split(",") if n.strip()}


def strict_from_env() -> bool:
    """ENGINEHOUSE_STRICT_PLUGINS as a yes/no value; anything else is an error, not 'off'."""
    value = os.environ.get(STRICT_VAR, "")
    flag = value.strip().lower()
    if flag in _ON or flag in _OFF:
        return flag in _ON
    raise PluginLoadError(
        f"{STRICT_VAR}={value!r} is not a yes/no value; set it to 1 (raise plugin load errors) "
        "or 0 (skip broken plugins), or unset it"
    )


def unmatched_message(names: list[str]) -> str:
    installed = sorted({ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)})
    return (
        f"{SELECT_VAR} names {', '.join(map(repr, names))}, which no installed plugin is "
        f"called (installed: {', '.join(installed) or 'none'}); names are the entry-point "
        "names `enginehouse plugins` shows, case included"
    )


def load_plugins(strict: bool | None = None, only: str | None = None) -> PluginHost:
    """A fresh host with the core's default plugin and the installed entry-point plugins.

    `strict` and `only` default to ENGINEHOUSE_STRICT_PLUGINS and ENGINEHOUSE_PLUGINS.
    """
    if strict is None:
        strict = strict_from_env()
    selected = _selected(os.environ.get(SELECT_VAR) if only is None else only)
    host = PluginHost()
    core_info = PluginInfo(
        DEFAULT_PLUGIN, *_core_dist(), contract=default_plugin.ENGINEHOUSE_CONTRACT
    )
    host.register(default_plugin, DEFAULT_PLUGIN, core_info)
    seen: set[str] = set()
    for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        if ep.name in seen or (selected is not None and ep.name not in selected):
            continue  # the same distribution can be visible twice on odd sys.paths
        seen.add(ep.name)
        host.load_entry_point(ep, strict)
    host.unmatched = sorted((selected or set()) - seen)
    if host.unmatched:
        log.warning("%s", unmatched_message(host.unmatched))
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


def first_by_name(
    answers: Iterable[tuple[str, Any]], what: str, name_of: Callable[[Any], str]
) -> dict[str, tuple[str, Any]]:
    """name -> (plugin, item) from a registering hook's answers (`call_each`), in order: a
    plugin whose hook raised is skipped, and a name given twice is kept by the first; each
    with a warning naming the plugins. `what` names the items in those warnings."""
    found: dict[str, tuple[str, Any]] = {}
    for plugin, result in answers:
        if isinstance(result, Exception):
            log.warning("plugin %s failed to register its %ss: %s", plugin, what, result)
            continue
        for item in result or ():
            name = name_of(item)
            if name in found:
                log.warning(
                    "plugin %s registers %s %r, which %s already registers: ignored",
                    plugin,
                    what,
                    name,
                    found[name][0],
                )
                continue
            found[name] = (plugin, item)
    return found
