"""Loading plugins from real entry points.

The installed plugins are read from installed metadata. Faulty plugins are real distributions
too: a ``*.dist-info`` folder with METADATA and entry_points.txt next to the plugin module, on a
temporary sys.path entry, so that `importlib.metadata` finds them like any installed package.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import textwrap
from importlib.metadata import entry_points, version

import pluggy
import pytest

from enginehouse.backends import choose_backend, probe_backends
from enginehouse.config import EngineConfig
from enginehouse.detect import detect_architecture
from enginehouse.errors import BackendError, PluginLoadError
from enginehouse.pipeline import explain, pipeline
from enginehouse.plugins import DEFAULT_PLUGIN, ENTRY_POINT_GROUP, load_plugins, reset_plugins
from enginehouse.spec import read_model_spec

INSTALLED = {
    # entry point name: (distribution, hooks)
    "pytorch": (
        "enginehouse-pytorch",
        ["create_runner", "probe_backend", "register_commands", "register_model_families"],
    ),
    "tensorrt": ("enginehouse-tensorrt", ["create_runner", "probe_backend", "register_commands"]),
    "vision": ("enginehouse-vision", ["create_vision_encoder", "detect_architecture"]),
}

BROKEN = """
import brokenplug_missing_dependency  # noqa: F401  (not installed: the import fails)
"""

MISSPELLED = """
from enginehouse import BackendProbe, hookimpl


@hookimpl
def detect_architecture(spec):
    return {"family": "HIJACKED"}


@hookimpl
def probe_backends(spec, config):  # the hook is probe_backend
    return BackendProbe("misspelled", True, 10_000, "should never be seen")
"""

RAISING_PROBE = """
from enginehouse import hookimpl


@hookimpl
def probe_backend(spec, config):
    raise RuntimeError("GPU driver too old for this backend")
"""

GOOD = """
from enginehouse import BackendProbe, hookimpl


@hookimpl
def probe_backend(spec, config):
    return BackendProbe("goodplug", False, 1, "only a test plugin")
"""


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    monkeypatch.delenv("ENGINEHOUSE_PLUGINS", raising=False)
    monkeypatch.delenv("ENGINEHOUSE_STRICT_PLUGINS", raising=False)


@pytest.fixture
def plugin_site(tmp_path, monkeypatch):
    """A fresh sys.path entry; `plugin_site(dist, ep, source)` installs a plugin module there."""
    root = tmp_path / "plugin_site"
    root.mkdir()
    modules: list[str] = []

    def install(dist: str, ep_name: str, source: str, dist_version: str = "0.1") -> str:
        module = f"{dist}_mod"
        (root / f"{module}.py").write_text(textwrap.dedent(source))
        info = root / f"{dist}-{dist_version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(
            f"Metadata-Version: 2.1\nName: {dist}\nVersion: {dist_version}\n"
        )
        (info / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\n{ep_name} = {module}\n")
        modules.append(module)
        return module

    monkeypatch.syspath_prepend(str(root))
    yield install
    for module in modules:
        sys.modules.pop(module, None)


@pytest.fixture(scope="module")
def llama_spec(llama_dir):
    return read_model_spec(llama_dir)


# --- the installed plugins ----------------------------------------------------------------------


def test_installed_plugins_load_with_distribution_version_and_hooks():
    host = load_plugins()
    assert host.errors() == {}
    for name, (dist, hooks) in INSTALLED.items():
        info = host.infos[name]
        assert info.distribution == dist
        assert info.version == version(dist)
        assert info.hooks == hooks
        assert info.error is None
        assert host.pm.get_plugin(name) is not None
    default = host.infos[DEFAULT_PLUGIN]
    assert default.distribution == "enginehouse"
    assert default.hooks == ["detect_architecture", "register_platforms"]
    assert default.contract == "1.0.0"  # the core's own plugin is written for its contract


def test_every_entry_point_is_loaded():
    # Whatever else is installed (the third-party `toy` plugin, say) is loaded as well.
    host = load_plugins()
    names = {ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)}
    assert set(INSTALLED) <= names
    assert set(host.infos) == names | {DEFAULT_PLUGIN}
    for name in names:
        assert host.infos[name].version, name
        assert host.infos[name].hooks, name


def test_third_party_toy_plugin_is_installed_for_the_tests():
    toy = [ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == "toy"]
    assert toy, "conftest.py installs tests/third_party_plugin for the test session"
    info = load_plugins().infos["toy"]
    assert info.error is None
    assert info.distribution == toy[0].dist.name
    assert "probe_backend" in info.hooks and "create_runner" in info.hooks


def test_as_dict_lists_name_version_hooks():
    row = load_plugins().infos["pytorch"].as_dict()
    assert row == {
        "name": "pytorch",
        "distribution": "enginehouse-pytorch",
        "version": version("enginehouse-pytorch"),
        "hooks": ["create_runner", "probe_backend", "register_commands", "register_model_families"],
        "error": None,
        "contract": "1.0",
    }


def test_each_call_makes_a_fresh_host():
    a, b = load_plugins(), load_plugins()
    assert a is not b and a.pm is not b.pm


# --- restricting what loads ---------------------------------------------------------------------


def test_env_restricts_to_one_plugin(monkeypatch):
    monkeypatch.setenv("ENGINEHOUSE_PLUGINS", "pytorch")
    host = load_plugins()
    assert set(host.infos) == {DEFAULT_PLUGIN, "pytorch"}
    assert host.pm.get_plugin("vision") is None


def test_env_with_spaces_and_several_names(monkeypatch):
    monkeypatch.setenv("ENGINEHOUSE_PLUGINS", " pytorch , vision ,")
    assert set(load_plugins().infos) == {DEFAULT_PLUGIN, "pytorch", "vision"}


def test_empty_env_loads_none_but_the_default(monkeypatch, llama_spec):
    monkeypatch.setenv("ENGINEHOUSE_PLUGINS", "")
    host = load_plugins()
    assert set(host.infos) == {DEFAULT_PLUGIN}
    assert detect_architecture(llama_spec, host).facts["family"] == "llama"
    assert probe_backends(llama_spec, EngineConfig(), host) == []


def test_only_argument_overrides_the_env(monkeypatch):
    monkeypatch.setenv("ENGINEHOUSE_PLUGINS", "pytorch")
    assert set(load_plugins(only="tensorrt").infos) == {DEFAULT_PLUGIN, "tensorrt"}


def test_unknown_name_in_env_loads_nothing_else_and_is_named(monkeypatch, caplog):
    monkeypatch.setenv("ENGINEHOUSE_PLUGINS", "no-such-plugin")
    host = load_plugins()
    assert set(host.infos) == {DEFAULT_PLUGIN}
    assert host.unmatched == ["no-such-plugin"]
    assert "ENGINEHOUSE_PLUGINS names 'no-such-plugin', which no installed plugin" in caplog.text


def test_misspelt_plugin_name_is_named_where_the_backend_is_missing(monkeypatch, llama_spec):
    monkeypatch.setenv("ENGINEHOUSE_PLUGINS", "Pytorch")
    host = load_plugins()
    verdicts = probe_backends(llama_spec, EngineConfig(), host)
    with pytest.raises(BackendError) as info:
        choose_backend(verdicts, problems=host.problems())
    message = str(info.value)
    assert "no backend plugin is installed" in message
    assert "ENGINEHOUSE_PLUGINS names 'Pytorch'" in message
    assert "installed: pytorch, tensorrt" in message


@pytest.mark.parametrize("value", ["maybe", "2", "enabled"])
def test_strict_mode_garbage_is_an_error(monkeypatch, value):
    monkeypatch.setenv("ENGINEHOUSE_STRICT_PLUGINS", value)
    with pytest.raises(PluginLoadError, match=f"ENGINEHOUSE_STRICT_PLUGINS='{value}' is not"):
        load_plugins()


# --- faulty plugins -----------------------------------------------------------------------------


def test_broken_plugin_is_named_and_skipped(plugin_site, llama_spec):
    plugin_site("brokenplug", "broken", BROKEN)
    host = load_plugins()
    info = host.infos["broken"]
    assert info.distribution == "brokenplug"
    assert info.version == "0.1"
    assert info.error.startswith("ModuleNotFoundError:")
    assert "brokenplug_missing_dependency" in info.error
    assert info.hooks == []
    assert set(host.errors()) == {"broken"}
    # The host still works, with every other plugin.
    assert set(INSTALLED) <= set(host.infos)
    assert host.pm.get_plugin("broken") is None
    verdicts = probe_backends(llama_spec, EngineConfig(), host)
    assert choose_backend(verdicts).chosen == "pytorch"
    assert {"transformers", "pytorch", "tensorrt", "onnxruntime"} <= {v.name for v in verdicts}


def test_strict_mode_names_the_plugin_and_keeps_the_import_error(plugin_site, monkeypatch):
    plugin_site("brokenplug", "broken", BROKEN)
    monkeypatch.setenv("ENGINEHOUSE_STRICT_PLUGINS", "1")
    with pytest.raises(PluginLoadError) as info:
        load_plugins()
    assert str(info.value).startswith("error loading plugin 'broken' (brokenplug): ")
    assert "ModuleNotFoundError" in str(info.value)
    assert isinstance(info.value.__cause__, ModuleNotFoundError)


def test_broken_plugin_is_a_warning_at_load(plugin_site, caplog):
    plugin_site("brokenplug", "broken", BROKEN)
    load_plugins()
    assert "plugin 'broken' (brokenplug) failed to load and is skipped" in caplog.text


def test_unknown_backend_of_a_plugin_that_failed_to_load_says_so(plugin_site, llama_spec):
    plugin_site("brokenplug", "broken", BROKEN)
    host = load_plugins()
    verdicts = probe_backends(llama_spec, EngineConfig(), host)
    with pytest.raises(BackendError) as info:
        choose_backend(verdicts, "broken", host.problems())
    message = str(info.value)
    assert "unknown backend 'broken'" in message
    assert "plugin 'broken' (brokenplug) failed to load: ModuleNotFoundError" in message


@pytest.mark.parametrize("value", ["0", "false", ""])
def test_strict_mode_off_values(plugin_site, monkeypatch, value):
    plugin_site("brokenplug", "broken", BROKEN)
    monkeypatch.setenv("ENGINEHOUSE_STRICT_PLUGINS", value)
    assert "broken" in load_plugins().errors()


def test_strict_argument(plugin_site):
    plugin_site("brokenplug", "broken", BROKEN)
    with pytest.raises(PluginLoadError, match="plugin 'broken'"):
        load_plugins(strict=True)


def test_broken_plugin_not_selected_is_not_imported(plugin_site, monkeypatch):
    plugin_site("brokenplug", "broken", BROKEN)
    monkeypatch.setenv("ENGINEHOUSE_STRICT_PLUGINS", "1")
    monkeypatch.setenv("ENGINEHOUSE_PLUGINS", "pytorch")
    assert "broken" not in load_plugins().infos


def test_misspelled_hook_is_named_and_skipped(plugin_site, llama_spec):
    plugin_site("typoplug", "misspelled", MISSPELLED, dist_version="2.3")
    host = load_plugins()
    info = host.infos["misspelled"]
    assert info.distribution == "typoplug"
    assert info.version == "2.3"
    assert info.error.startswith("PluginValidationError:")
    assert "probe_backends" in info.error
    assert set(host.errors()) == {"misspelled"}
    # Nothing of it stays: neither the misspelled hook nor its correctly spelled one.
    assert host.pm.get_plugin("misspelled") is None
    assert detect_architecture(llama_spec, host).facts["family"] == "llama"
    verdicts = probe_backends(llama_spec, EngineConfig(), host)
    assert "misspelled" not in {v.name for v in verdicts}
    # Its priority-10000 "supported" verdict would have won; the native backend does instead.
    assert choose_backend(verdicts).chosen == "pytorch"


def test_misspelled_hook_in_strict_mode(plugin_site, monkeypatch):
    plugin_site("typoplug", "misspelled", MISSPELLED)
    monkeypatch.setenv("ENGINEHOUSE_STRICT_PLUGINS", "1")
    with pytest.raises(PluginLoadError, match="plugin 'misspelled'.*probe_backends") as info:
        load_plugins()
    assert isinstance(info.value.__cause__, pluggy.PluginValidationError)


def test_a_good_plugin_beside_a_broken_one(plugin_site, llama_spec):
    plugin_site("brokenplug", "broken", BROKEN)
    plugin_site("goodplug", "good", GOOD)
    host = load_plugins()
    assert host.infos["good"].hooks == ["probe_backend"]
    assert host.infos["good"].error is None
    assert set(host.errors()) == {"broken"}
    verdict = {v.name: v for v in probe_backends(llama_spec, EngineConfig(), host)}["goodplug"]
    assert verdict.plugin == "good"
    assert verdict.reason == "only a test plugin"


def _raiser_verdicts(plugin_site, spec):
    plugin_site("raiseplug", "raiser", RAISING_PROBE)
    host = load_plugins()
    assert host.errors() == {}  # it loads fine; it fails when called
    verdicts = probe_backends(spec, EngineConfig(), host)
    return verdicts, [v for v in verdicts if "raiser" in v.name]


def test_probe_that_raises_is_an_unsupported_verdict(plugin_site, llama_spec):
    verdicts, failed = _raiser_verdicts(plugin_site, llama_spec)
    assert len(failed) == 1
    assert failed[0].supported is False
    assert "'raiser'" in failed[0].reason
    assert "RuntimeError: GPU driver too old for this backend" in failed[0].reason
    # The other backends are all still there, and one is chosen.
    names = {v.name for v in verdicts}
    assert {"transformers", "pytorch", "tensorrt", "onnxruntime"} <= names
    decision = choose_backend(verdicts)
    assert decision.chosen == "pytorch"
    assert decision.verdict(failed[0].name) == failed[0]


def test_verdict_of_a_probe_that_raises_names_its_plugin(plugin_site, llama_spec):
    _, failed = _raiser_verdicts(plugin_site, llama_spec)
    assert failed[0].plugin == "raiser"


# --- two plugins, one backend name ---------------------------------------------------------------

HIJACKER = """
from enginehouse import BackendProbe, hookimpl


@hookimpl
def probe_backend(spec, config):
    return BackendProbe("pytorch", True, 1_000, "another plugin's 'pytorch'")


@hookimpl
def create_runner(backend, spec, config):
    raise RuntimeError("the hijacker's create_runner was called")
"""

NOT_A_RUNNER = """
from enginehouse import BackendProbe, hookimpl


@hookimpl
def probe_backend(spec, config):
    return BackendProbe("halfway", True, 1, "builds something that is not a runner")


@hookimpl
def create_runner(backend, spec, config):
    class Halfway:
        def load(self, progress=True):
            pass

    return Halfway()
"""


@pytest.fixture
def global_plugins():
    """`pipeline()` and the CLI read the process-wide host: fresh before and after the test."""
    reset_plugins()
    yield
    reset_plugins()


def test_a_backend_name_offered_twice_is_a_conflict_not_a_takeover(
    plugin_site, llama_dir, global_plugins, caplog
):
    plugin_site("hijackplug", "hijack", HIJACKER)
    report = explain(str(llama_dir))
    assert report["conflicts"] == {"pytorch": ["hijack", "pytorch"]}
    # The automatic choice passes over the ambiguous name, with a warning that names both.
    assert report["chosen"] == "transformers"
    assert "backend 'pytorch' is offered by plugins 'hijack' and 'pytorch'" in caplog.text
    with pytest.raises(BackendError) as info:
        pipeline(str(llama_dir), backend="pytorch", progress=False)
    message = str(info.value)
    assert "backend 'pytorch' is offered by plugins 'hijack' and 'pytorch'" in message
    assert "backend='hijack:pytorch'" in message and "ENGINEHOUSE_PLUGINS" in message
    # Qualified, the name is the native one, built by its own plugin only: the hijacker's
    # create_runner (which raises) is never asked.
    with pipeline(str(llama_dir), backend="pytorch:pytorch", progress=False) as pipe:
        assert (pipe.backend, pipe.backend_decision.chosen_plugin) == ("pytorch", "pytorch")
        assert type(pipe.runner).__name__ == "NativeRunner"
        assert pipe("hi", {"max_new_tokens": 2}).generate_token_len == 2


def test_explain_and_plugins_commands_name_the_conflict(plugin_site, llama_dir, tmp_path):
    plugin_site("hijackplug", "hijack", HIJACKER)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    run = functools.partial(subprocess.run, capture_output=True, text=True, env=env, timeout=120)
    explained = run([sys.executable, "-m", "enginehouse", "explain", str(llama_dir)])
    assert "conflict: backend 'pytorch' is offered by plugins 'hijack' and 'pytorch'" in (
        explained.stdout
    )
    assert "--backend hijack:pytorch" in explained.stdout
    listed = run([sys.executable, "-m", "enginehouse", "plugins"])
    assert "conflict: backend 'pytorch' is offered by plugins 'hijack' and 'pytorch'" in (
        listed.stdout
    )


def test_what_create_runner_returns_is_checked_against_the_contract(
    plugin_site, llama_dir, global_plugins
):
    plugin_site("halfplug", "half", NOT_A_RUNNER)
    with pytest.raises(BackendError) as info:
        pipeline(str(llama_dir), backend="halfway", progress=False)
    assert str(info.value) == (
        "plugin 'half' built a Halfway for backend 'halfway', which is not a runner: it lacks "
        "kv_spec, allocate_kv, execute, close (see enginehouse.runner.ModelRunner); report "
        "this to the plugin's authors"
    )


GREEDY = """
from enginehouse import hookimpl


@hookimpl(tryfirst=True)
def create_runner(backend, spec, config):
    return "a runner for any backend, whoever offered it"
"""


def test_only_the_plugin_that_offered_the_backend_builds_its_runner(
    plugin_site, llama_dir, global_plugins
):
    plugin_site("greedyplug", "greedy", GREEDY)
    with pipeline(str(llama_dir), progress=False) as pipe:
        assert pipe.backend_decision.chosen_plugin == "pytorch"
        assert type(pipe.runner).__name__ == "NativeRunner"
