"""Every hook is documented in docs/hooks.md and exercised by some test."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from enginehouse import hookspecs

ROOT = Path(__file__).resolve().parent.parent
HOOKS = sorted(
    name for name, fn in vars(hookspecs).items() if callable(fn) and hasattr(fn, "enginehouse_spec")
)


def test_there_are_hooks():
    assert HOOKS == [
        "create_runner",
        "create_vision_encoder",
        "detect_architecture",
        "probe_backend",
        "register_commands",
    ]


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_has_docstring_and_reference_section(hook):
    assert (getattr(hookspecs, hook).__doc__ or "").strip()
    page = (ROOT / "docs" / "hooks.md").read_text(encoding="utf-8")
    assert re.search(rf"^##+ `?{hook}`?", page, re.MULTILINE), f"docs/hooks.md lacks {hook}"


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_is_implemented_by_a_test_plugin(hook):
    # A test (or the third-party test plugin) implements the hook, so the core really calls it.
    sources = [p for p in (ROOT / "tests").rglob("*.py") if p.name != Path(__file__).name]
    pattern = re.compile(rf"def {hook}\(|{hook}\(")
    assert any(pattern.search(p.read_text(encoding="utf-8")) for p in sources), hook
