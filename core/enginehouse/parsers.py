"""Which tool-call and reasoning parsers there are: the built-in ones and those plugins add.

A plugin adds a format by implementing `register_tool_parsers` or `register_reasoning_parsers`
(docs/hooks.md), returning `ToolParser` / `ReasoningParser` subclasses. Plugins' parsers are
asked first when a chat template is matched to a format, and win a name they share with a
built-in one. A plugin whose hook raises is skipped with a warning, like any plugin problem.
"""

from __future__ import annotations

import logging
from typing import Any

from . import reasoning, tool_calls
from .plugins import PluginHost, get_plugins
from .reasoning import ReasoningParser
from .tool_calls import ToolParser

log = logging.getLogger(__name__)


def _collected(hook: str, base: type, plugins: PluginHost | None) -> list[Any]:
    found = []
    for plugin, result in (plugins or get_plugins()).call_each(hook):
        if isinstance(result, Exception):
            log.warning("plugin %r failed in %s: %s", plugin, hook, result)
            continue
        for parser in result or []:
            if isinstance(parser, type) and issubclass(parser, base) and parser.name:
                found.append(parser)
            else:
                log.warning(
                    "plugin %r returned %r from %s, which is not a named %s subclass",
                    plugin,
                    parser,
                    hook,
                    base.__name__,
                )
    return found


def plugin_tool_parsers(plugins: PluginHost | None = None) -> list[type[ToolParser]]:
    return _collected("register_tool_parsers", ToolParser, plugins)


def plugin_reasoning_parsers(plugins: PluginHost | None = None) -> list[type[ReasoningParser]]:
    return _collected("register_reasoning_parsers", ReasoningParser, plugins)


def tool_parsers(plugins: PluginHost | None = None) -> dict[str, type[ToolParser]]:
    """Every tool-call format by name."""
    return tool_calls.all_parsers(plugin_tool_parsers(plugins))


def reasoning_parsers(plugins: PluginHost | None = None) -> dict[str, type[ReasoningParser]]:
    """Every reasoning format by name (vLLM's names for the built-in ones)."""
    return reasoning.all_parsers(plugin_reasoning_parsers(plugins))


def _named(kind: str, parsers: dict[str, Any], name: str) -> Any:
    if name not in parsers:
        raise ValueError(f"unknown {kind} parser {name!r}; use one of {', '.join(sorted(parsers))}")
    return parsers[name]()


def tool_parser_named(name: str, plugins: PluginHost | None = None) -> ToolParser:
    """The tool-call parser called `name`; `ValueError` listing the names otherwise."""
    return _named("tool-call", tool_parsers(plugins), name)


def reasoning_parser_named(name: str, plugins: PluginHost | None = None) -> ReasoningParser:
    """The reasoning parser called `name`; `ValueError` listing the names otherwise."""
    return _named("reasoning", reasoning_parsers(plugins), name)


def tool_parser_for(template: str, plugins: PluginHost | None = None) -> ToolParser | None:
    """The tool-call format a chat template teaches (plugins' formats asked first)."""
    return tool_calls.parser_for_template(template, plugin_tool_parsers(plugins))


def reasoning_parser_for(
    template: str, plugins: PluginHost | None = None
) -> ReasoningParser | None:
    """The reasoning format a chat template teaches, where only one format claims it."""
    return reasoning.parser_for_template(template, plugin_reasoning_parsers(plugins))
