"""The contract a plugin is held to: it imports only the public API, and its runner declares
what it offers (`RunnerCapabilities`) instead of the core guessing from its attributes."""

from __future__ import annotations

import ast
import logging
from pathlib import Path

import pytest

import enginehouse
from enginehouse import EngineConfig, plugin_api
from enginehouse.errors import BackendError
from enginehouse.pipeline import create_runner
from enginehouse.plugins import PluginHost
from enginehouse.runner import RunnerCapabilities, SeqChunk

ROOT = Path(__file__).resolve().parent.parent
PUBLIC = {"enginehouse", "enginehouse.plugin_api"}


def core_imports(path: Path) -> list[str]:
    """The `enginehouse...` modules a source file imports (not the plugins' own packages)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        found += [n for n in names if n == "enginehouse" or n.startswith("enginehouse.")]
    return found


def test_plugins_import_only_the_public_api():
    sources = [
        *(ROOT / "plugins").rglob("*.py"),
        *(ROOT / "tests/third_party_plugin").rglob("*.py"),
    ]
    assert len(sources) > 20
    wrong = [
        f"{p.relative_to(ROOT)}: {m}" for p in sources for m in core_imports(p) if m not in PUBLIC
    ]
    assert not wrong, (
        "plugins must import from enginehouse or enginehouse.plugin_api:\n" + "\n".join(wrong)
    )


def test_the_public_api_lists_what_it_exports():
    assert sorted(plugin_api.__all__) == plugin_api.__all__
    for name in plugin_api.__all__:
        assert getattr(plugin_api, name) is not None
    documented = (ROOT / "docs/plugins.md").read_text()
    missing = [n for n in plugin_api.__all__ if f"`{n}`" not in documented]
    assert not missing, f"docs/plugins.md does not document {missing}"
    assert set(enginehouse.__all__) <= set(dir(enginehouse))


def test_one_definition_of_a_decode_chunk():
    one = SeqChunk(0, (5,), 0, (0,))  # a one-token prompt attends as a decode does
    assert one.is_decode and not one.is_prefill
    assert SeqChunk(0, (5, 6), 3, (0,)).is_prefill


class Plugin:
    """A backend plugin whose runner class the tests swap."""

    runner_class: type = object

    @enginehouse.hookimpl
    def create_runner(self, backend, spec, config, context):
        return self.runner_class()


class Minimal:
    kv_spec = None

    def load(self, progress=True): ...
    def allocate_kv(self, num_blocks): ...
    def execute(self, batch): ...
    def close(self): ...


class ClaimsRelease(Minimal):
    capabilities = RunnerCapabilities(releases_sequences=True)  # but has no release_sequence


class Undeclared(Minimal):
    def release_sequence(self, seq_id, block_table): ...


@pytest.fixture
def host():
    host, plugin = PluginHost(), Plugin()
    host.register(plugin, name="caps")
    return host, plugin


def test_a_capability_without_its_method_is_refused(host, tiny_models):
    from enginehouse.pipeline import read_spec

    plugins, plugin = host
    plugin.runner_class = ClaimsRelease
    spec = read_spec(tiny_models["llama"])
    with pytest.raises(
        BackendError, match="declares releases_sequences but has no release_sequence"
    ):
        create_runner("caps", "x", spec, EngineConfig(), None, plugins)


def test_an_undeclared_method_is_named_and_never_called(host, tiny_models, caplog):
    from enginehouse.executor.local import LocalExecutor
    from enginehouse.pipeline import read_spec

    plugins, plugin = host
    plugin.runner_class = Undeclared
    spec = read_spec(tiny_models["llama"])
    with caplog.at_level(logging.WARNING):
        runner = create_runner("caps", "x", spec, EngineConfig(), None, plugins)
    assert "release_sequence() (declare RunnerCapabilities(releases_sequences=True))" in caplog.text
    assert not LocalExecutor(runner).assembler.releases
