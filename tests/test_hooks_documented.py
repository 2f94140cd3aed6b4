"""Every hook is documented in docs/hooks.md with its real signature, and really implemented by
a plugin the tests load (a bundled plugin, the third-party example, or one a test installs)."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

from enginehouse import hookspecs

ROOT = Path(__file__).resolve().parent.parent
HOOKS = sorted(
    name for name, fn in vars(hookspecs).items() if callable(fn) and hasattr(fn, "enginehouse_spec")
)
PAGE = (ROOT / "docs" / "hooks.md").read_text(encoding="utf-8")
# Plugins the tests load: the bundled ones, the third-party example, and those tests install.
SOURCES = [
    p
    for folder in ("tests", "plugins")
    for p in (ROOT / folder).rglob("*.py")
    if p.name != Path(__file__).name
]


def spec_args(hook: str) -> list[str]:
    return list(inspect.signature(getattr(hookspecs, hook)).parameters)


def args_of(text: str) -> list[str]:
    """Argument names of a `name(a: T, b, c=1)` signature text."""
    names = []
    for part in re.split(r",(?![^\[]*\])", text):  # commas inside [] belong to a type
        name = part.split(":")[0].split("=")[0].strip()
        if name:
            names.append(name)
    return names


def implementations(hook: str) -> list[list[str]]:
    """The argument lists of every `@hookimpl def <hook>(...)` in the tests' plugins."""
    pattern = re.compile(rf"@hookimpl(?:\([^)]*\))?\s*\ndef {hook}\(([^)]*)\)", re.MULTILINE)
    return [args_of(m) for p in SOURCES for m in pattern.findall(p.read_text("utf-8"))]


def test_there_are_hooks():
    assert HOOKS == [
        "create_runner",
        "create_vision_encoder",
        "detect_architecture",
        "probe_backend",
        "register_commands",
        "register_logits_processors",
        "register_model_families",
        "register_platforms",
        "register_reasoning_parsers",
        "register_tool_parsers",
    ]


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_has_docstring_and_reference_section(hook):
    assert (getattr(hookspecs, hook).__doc__ or "").strip()
    assert re.search(rf"^##+ `?{hook}`?", PAGE, re.MULTILINE), f"docs/hooks.md lacks {hook}"


@pytest.mark.parametrize("hook", HOOKS)
def test_documented_signatures_match_the_hookspec(hook):
    # The reference section's code block and the summary table name the same arguments.
    block = re.search(rf"^@hookspec[^\n]*\ndef {hook}\((.*?)\)\s*->", PAGE, re.M | re.S)
    assert block, f"docs/hooks.md has no signature block for {hook}"
    assert args_of(block.group(1)) == spec_args(hook), f"{hook}: signature block"
    row = re.search(rf"^\| `{hook}\(([^)]*)\)`", PAGE, re.MULTILINE)
    assert row, f"the table in docs/hooks.md has no row for {hook}"
    assert args_of(row.group(1)) == spec_args(hook), f"{hook}: table row"


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_has_a_real_implementation_under_test(hook):
    # A decorated implementation (not a call of a core function of the same name), whose
    # arguments pluggy accepts: a subset of the hookspec's.
    found = implementations(hook)
    assert found, f"no plugin the tests load implements {hook} with @hookimpl"
    for args in found:
        assert set(args) <= set(spec_args(hook)), f"{hook}({', '.join(args)})"
