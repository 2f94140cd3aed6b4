"""Loading plugins from real entry points.

The installed plugins are read from installed metadata. Faulty plugins are real distributions
too: a ``*.dist-info`` folder with METADATA and entry_points.txt next to the plugin module, on a
temporary sys.path entry, so that `importlib.metadata` finds them like any installed package.
"""

from __future__ import annotations

import sys
import textwrap
from importlib.metadata import entry_points, version

import pluggy
import pytest

from enginehouse.backends import choose_backend, probe_backends
from enginehouse.config import EngineConfig
from enginehouse.detect import detect_architecture
from enginehouse.plugins import DEFAULT_PLUGIN, ENTRY_POINT_GROUP, load_plugins
from enginehouse.spec import read_model_spec

INSTALLED = {
    # entry point name: (distribution, hooks)
    "pytorch": ("enginehouse-pytorch", ["create_runner", "probe_backend", "register_commands"]),
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
    assert default.hooks == ["detect_architecture"]


def test_every_entry_point_is_loaded():
    # Whatever else is installed (the third-party `toy` plugin, say) is loaded as well.
    host = load_plugins()
    names = {ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)}
    assert set(INSTALLED) <= names
    assert set(host.infos) == names | {DEFAULT_PLUGIN}
    for name in names:
        assert host.infos[name].version, name
        assert host.infos[name].hooks, name


def test_third_party_toy_plugin_if_installed():
    toy = [ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == "toy"]
    if not toy:
        pytest.skip("the third-party toy plugin is not installed")
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
        "hooks": ["create_runner", "probe_backend", "register_commands"],
        "error": None,
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


def test_unknown_name_in_env_loads_nothing_else(monkeypatch):
    monkeypatch.setenv("ENGINEHOUSE_PLUGINS", "no-such-plugin")
    assert set(load_plugins().infos) == {DEFAULT_PLUGIN}


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


def test_strict_mode_reraises_the_import_error(plugin_site, monkeypatch):
    plugin_site("brokenplug", "broken", BROKEN)
    monkeypatch.setenv("ENGINEHOUSE_STRICT_PLUGINS", "1")
    with pytest.raises(ModuleNotFoundError, match="brokenplug_missing_dependency"):
        load_plugins()


@pytest.mark.parametrize("value", ["0", "false", ""])
def test_strict_mode_off_values(plugin_site, monkeypatch, value):
    plugin_site("brokenplug", "broken", BROKEN)
    monkeypatch.setenv("ENGINEHOUSE_STRICT_PLUGINS", value)
    assert "broken" in load_plugins().errors()


def test_strict_argument(plugin_site):
    plugin_site("brokenplug", "broken", BROKEN)
    with pytest.raises(ModuleNotFoundError):
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
    with pytest.raises(pluggy.PluginValidationError, match="probe_backends"):
        load_plugins()


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
