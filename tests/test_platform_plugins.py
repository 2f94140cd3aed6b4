"""Platform plugins: a device, a native model family and a logits processor from a third
party (tests/platform_plugin, `enginehouse-toyplatform`, pip-installed from its own
pyproject.toml for this module only), under the versioned plugin contract."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import types
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest
import torch

import enginehouse
from enginehouse import GenerationConfig, RequestError, explain, pipeline, plugin_api
from enginehouse.contract import ContractDeprecationWarning, check_declared
from enginehouse.errors import PluginLoadError
from enginehouse.plugins import PluginHost, load_plugins, reset_plugins

PLUGIN_SOURCE = Path(__file__).parent / "platform_plugin"
PROMPTS = ([5, 6, 7, 8, 9], list(range(11, 51)))  # the second spans 2 full KV blocks and more
NEW = 8


@pytest.fixture(scope="module")
def toyplatform(tmp_path_factory):
    """enginehouse-toyplatform installed into a folder of its own, on this process's path and
    its children's (the tp ranks) for this module; entry points read from its metadata."""
    target = tmp_path_factory.mktemp("toyplatform")
    pip = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    pip += ["--no-deps", "--no-index", "--no-build-isolation", "--target", str(target)]
    subprocess.run([*pip, str(PLUGIN_SOURCE)], check=True, capture_output=True)
    old_path = os.environ.get("PYTHONPATH")
    sys.path.insert(0, str(target))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(target), old_path]))
    importlib.invalidate_caches()
    reset_plugins()
    yield importlib.import_module("enginehouse_toyplatform.plugin")
    sys.path.remove(str(target))
    if old_path is None:
        os.environ.pop("PYTHONPATH", None)
    else:
        os.environ["PYTHONPATH"] = old_path
    for name in [m for m in sys.modules if m.startswith("enginehouse_toyplatform")]:
        del sys.modules[name]
    importlib.invalidate_caches()
    reset_plugins()


@pytest.fixture(scope="module")
def toyllama_dir(toyplatform, llama_dir, tmp_path_factory) -> Path:
    """The tiny Llama's weights as a ToyLlamaForCausalLM checkpoint (renamed keys, names)."""
    from enginehouse_toyplatform.family import from_llama

    folder = tmp_path_factory.mktemp("toyllama")
    from_llama(llama_dir, folder)
    return folder


@pytest.fixture(scope="module")
def hf_tokens(llama_dir) -> list[list[int]]:
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(llama_dir, dtype=torch.float32).eval()
    out = []
    for prompt in PROMPTS:
        ids = torch.tensor([prompt])
        gen = model.generate(ids, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)
        out.append(gen[0, len(prompt) :].tolist())
    return out


def fixed(**kw) -> GenerationConfig:
    return GenerationConfig(max_new_tokens=NEW, min_new_tokens=NEW, **kw)


# --- the contract version -----------------------------------------------------------------


def test_contract_version_is_exported_and_declared(toyplatform):
    assert enginehouse.CONTRACT_VERSION == plugin_api.CONTRACT_VERSION == "1.0.0"
    host = load_plugins(strict=True)
    for name in ("enginehouse.default", "pytorch", "toyplatform"):
        assert host.infos[name].contract is not None, name
    assert host.infos["toyplatform"].contract == "1.0"


def _plugin_module(tmp_path, monkeypatch, name: str, body: str) -> EntryPoint:
    (tmp_path / f"{name}.py").write_text(body)
    monkeypatch.syspath_prepend(str(tmp_path))
    return EntryPoint(name=name, value=name, group="enginehouse")


def test_a_plugin_of_another_major_version_is_refused(tmp_path, monkeypatch):
    ep = _plugin_module(tmp_path, monkeypatch, "old_major_plugin", 'ENGINEHOUSE_CONTRACT = "0.9"\n')
    host = PluginHost()
    host.load_entry_point(ep, strict=False)  # recorded and skipped
    error = host.infos["old_major_plugin"].error
    assert "'old_major_plugin'" in error and "0.9" in error and "1.0.0" in error
    assert "upgrade the plugin" in error
    assert not host.pm.has_plugin("old_major_plugin")
    with pytest.raises(PluginLoadError, match=r"'old_major_plugin'.*contract 0\.9.*1\.0\.0"):
        PluginHost().load_entry_point(ep, strict=True)


def test_a_plugin_for_a_newer_major_version_is_refused(toyplatform):
    # The reverse: this plugin says 1.0; a core of contract 2.0.0 refuses it.
    with pytest.raises(PluginLoadError, match=r"'toyplatform'.*contract 1\.0.*2\.0\.0"):
        check_declared(toyplatform, "'toyplatform'", core="2.0.0")


def test_an_undeclared_plugin_loads_with_a_deprecation_warning(tmp_path, monkeypatch):
    ep = _plugin_module(tmp_path, monkeypatch, "undeclared_plugin", "X = 1\n")
    host = PluginHost()
    with pytest.warns(ContractDeprecationWarning, match="declares no contract version"):
        host.load_entry_point(ep, strict=True)
    assert host.infos["undeclared_plugin"].error is None
    assert host.infos["undeclared_plugin"].contract is None


def test_the_deprecated_native_impl_fact_still_works_with_a_warning(llama_dir, monkeypatch):
    from enginehouse import contract, hookimpl
    from enginehouse.pipeline import read_spec

    class Facts:
        @hookimpl
        def detect_architecture(self, spec):
            return {"native_impl": "llama"}

    monkeypatch.setattr(contract, "_warned", set())
    host = load_plugins(only="")
    host.register(Facts(), "facts")
    with pytest.warns(ContractDeprecationWarning, match="native_impl.*register_model_families"):
        spec = read_spec(str(llama_dir), plugins=host)
    assert spec.facts["native_impl"] == "llama"


def test_a_deprecated_hook_still_runs_with_a_warning_naming_its_replacement(monkeypatch):
    from enginehouse import contract, hookimpl

    class Parsers:
        @hookimpl
        def register_tool_parsers(self):
            return []

    monkeypatch.setattr(contract, "_warned", set())
    monkeypatch.setitem(
        contract.DEPRECATED_HOOKS, "register_tool_parsers", ("the new_parsers hook", "1.0", "1.1")
    )
    host = load_plugins(only="")
    with pytest.warns(ContractDeprecationWarning, match=r"register_tool_parsers.*new_parsers"):
        host.register(Parsers(), "parsers")
    assert [p for p, _ in host.call_each("register_tool_parsers")] == ["parsers"]


# --- what explain and `enginehouse plugins` show ----------------------------------------


def test_explain_shows_the_platform_the_family_and_the_processor(toyplatform, toyllama_dir):
    from click.testing import CliRunner

    from enginehouse.cli import cli

    report = explain(str(toyllama_dir), engine_config={"device": "toydev"})
    assert report["chosen"] == "pytorch"
    assert report["platform"] == "toydev"
    assert report["platforms"]["toydev"]["plugin"] == "toyplatform"
    assert report["platforms"]["toydev"]["collectives"] == "gloo"
    assert {"cpu", "cuda", "toydev"} <= set(report["platforms"])
    assert report["model_family"] == {
        "plugin": "toyplatform",
        "base": "LlamaForCausalLM",
        "backend": "pytorch",
    }
    native = next(v for v in report["verdicts"] if v["backend"] == "pytorch")
    assert "native toyllama implementation" in native["reason"]
    assert report["logits_processors"]["toy_ban"] == "toyplatform"

    out = CliRunner().invoke(cli, ["explain", str(toyllama_dir), "--device", "toydev"])
    assert out.exit_code == 0, out.output
    assert "platform:     toydev [toyplatform]: gloo collectives" in out.output
    assert "family:       ToyLlamaForCausalLM from plugin toyplatform" in out.output
    assert "toy_ban [toyplatform]" in out.output
    listing = CliRunner().invoke(cli, ["plugins"]).output
    assert "platforms: cpu, cuda" in listing and "platforms: toydev" in listing
    assert "model families: ToyLlamaForCausalLM" in listing
    assert "logits processors: toy_ban" in listing
    assert "contract: 1.0" in listing


def test_an_unknown_device_names_the_platforms(toyplatform):
    with pytest.raises(ValueError, match=r"unknown device 'npu'.*have: auto, cpu, cuda, toydev"):
        enginehouse.EngineConfig(device="npu")


def test_cpu_and_cuda_are_platforms_the_core_asks():
    from enginehouse.device import missing_gpus, resolve_device
    from enginehouse.executor.worker import dist_backend
    from enginehouse.platforms import CPU, CUDA, platform_of, registered

    assert registered(load_plugins(only=""))["cpu"] == ("enginehouse.default", CPU)
    assert platform_of("cuda:1") == (CUDA, 1) and platform_of("cpu") == (CPU, None)
    cpu = enginehouse.EngineConfig(device="cpu", tp=2)
    assert dist_backend(cpu) == "gloo" and missing_gpus(cpu) is None
    assert CPU.free_memory(torch.device("cpu")) > 0
    if not torch.cuda.is_available():
        cuda = enginehouse.EngineConfig(device="cuda", tp=2)
        assert dist_backend(cuda) == "nccl"
        assert missing_gpus(cuda).startswith("tp=2 needs 2 GPUs, one per rank")
        with pytest.raises(RuntimeError, match="no cuda device"):
            resolve_device(cuda)


# --- running on the plugin's platform, the plugin's family ---------------------------------


def test_the_renamed_family_runs_on_toydev_as_transformers_llama(toyllama_dir, hf_tokens):
    with pipeline(str(toyllama_dir), engine_config={"device": "toydev"}, progress=False) as pipe:
        assert pipe.backend_decision.chosen == "pytorch"
        alone = [pipe({"token_ids": p}, fixed()).token_ids for p in PROMPTS]
        batch = pipe([{"token_ids": p} for p in PROMPTS], fixed())
    assert alone == hf_tokens
    assert [r.token_ids for r in batch] == hf_tokens
    assert batch[1].cached_tokens >= 32  # its first blocks came from the prefix cache


def test_a_family_sets_switches_and_unknown_ones_are_refused(llama_dir):
    import json

    from enginehouse.plugin_api import ModelFamily
    from enginehouse_pytorch.native.arch import UnsupportedModel
    from enginehouse_pytorch.native.families import reader_of

    config = json.loads((llama_dir / "config.json").read_text())
    normed = ModelFamily("NormedLlama", base="LlamaForCausalLM", switches={"qk_norm": True})
    arch = reader_of(normed)(config)
    assert arch.qk_norm and arch.family == "llama" and arch.hidden_size == config["hidden_size"]
    with pytest.raises(UnsupportedModel, match="sets qk_nrom, which the native Arch"):
        reader_of(ModelFamily("Typo", base="LlamaForCausalLM", switches={"qk_nrom": True}))
    with pytest.raises(UnsupportedModel, match="builds on 'NoSuchForCausalLM'"):
        reader_of(ModelFamily("Orphan", base="NoSuchForCausalLM"))
    with pytest.raises(ValueError, match="either base= .* or reader="):
        ModelFamily("Neither")


def test_the_kv_budget_is_the_platforms_free_memory(toyllama_dir, monkeypatch):
    from enginehouse_toyplatform.platform import ToyDevPlatform

    monkeypatch.setattr(ToyDevPlatform, "free_memory", lambda self, device: 2**20)
    config = {"device": "toydev", "kv_cache_memory": 0.5}
    with pipeline(str(toyllama_dir), engine_config=config, progress=False) as pipe:
        summary = pipe.summary()
    assert summary["session_len"] == 256  # the plugin's detect_architecture read max_seq_len
    per_block = summary["kv_bytes"] // summary["kv_blocks"]
    assert summary["kv_blocks"] == 2**19 // per_block  # half of what toydev says is free


@pytest.mark.slow
def test_the_renamed_family_at_tp2_on_toydev(toyllama_dir, hf_tokens):
    config = {"device": "toydev", "tp": 2, "distributed_timeout": 120}
    first = hf_tokens[0][0]
    banned = fixed(logits_processors=["toy_ban"], extra_args={"toy_ban": [first]})
    with pipeline(str(toyllama_dir), engine_config=config, progress=False) as pipe:
        prompts = [{"token_ids": p} for p in (*PROMPTS, PROMPTS[0])]
        out = [r.token_ids for r in pipe(prompts, [fixed(), fixed(), banned])]
        summary = pipe.summary()
    got, asked = out[:2], out[2]
    assert first not in asked  # the processor ran on rank 0, on its row only
    assert summary["ranks"] == 2 and summary["collectives"] == "gloo"  # the platform's
    assert got == hf_tokens


# --- logits processors ----------------------------------------------------------------------


def test_a_processor_changes_only_the_rows_that_ask(toyllama_dir, hf_tokens):
    first = hf_tokens[0][0]
    banned = fixed(logits_processors=["toy_ban"], extra_args={"toy_ban": [first]})
    with pipeline(str(toyllama_dir), engine_config={"device": "toydev"}, progress=False) as pipe:
        out = pipe(
            [{"token_ids": PROMPTS[0]}] * 2 + [{"token_ids": PROMPTS[1]}],
            [banned, fixed(), fixed()],
        )
    asked, plain, other = (r.token_ids for r in out)
    assert asked[0] != first and first not in asked
    assert plain == hf_tokens[0]
    assert other == hf_tokens[1]


def test_an_unknown_processor_is_refused_at_submit(toyllama_dir):
    with pipeline(str(toyllama_dir), engine_config={"device": "toydev"}, progress=False) as pipe:
        with pytest.raises(RequestError, match=r"unknown logits processor 'nope'.*toy_ban"):
            pipe({"token_ids": PROMPTS[0]}, fixed(logits_processors=["nope"]))
        # The refused request disturbs nothing: the same pipeline still answers.
        assert len(pipe({"token_ids": PROMPTS[0]}, fixed()).token_ids) > 0


def test_the_server_request_takes_processors_and_vllm_xargs():
    from enginehouse.serve.protocol import CompletionRequest

    body = {
        "model": "m",
        "prompt": "hi",
        "logits_processors": ["a"],
        "vllm_xargs": {"logits_processors": ["b"], "toy_ban": [3]},
    }
    params = CompletionRequest.model_validate(body).generation_config(16, None, {}, 0)
    assert params.logits_processors == ["a", "b"]
    assert params.extra_args == {"toy_ban": [3]}


def test_the_server_applies_processors_and_refuses_unknown_ones(toyllama_dir, hf_tokens):
    import httpx

    from enginehouse.serve import ServerThread, create_app

    first = hf_tokens[0][0]
    body = {"prompt": PROMPTS[0], "max_tokens": NEW, "min_tokens": NEW, "temperature": 0}
    with pipeline(str(toyllama_dir), engine_config={"device": "toydev"}, progress=False) as pipe:
        want = pipe(
            {"token_ids": PROMPTS[0]},
            fixed(logits_processors=["toy_ban"], extra_args={"toy_ban": [first]}),
        ).text
        plain = pipe({"token_ids": PROMPTS[0]}, fixed()).text
        with ServerThread(create_app(pipe)) as running:
            url = f"{running.url}/v1/completions"
            model = httpx.get(f"{running.url}/v1/models").json()["data"][0]["id"]
            body["model"] = model
            asked = {**body, "logits_processors": ["toy_ban"], "vllm_xargs": {"toy_ban": [first]}}
            got = httpx.post(url, json=asked, timeout=60).json()["choices"][0]["text"]
            unknown = httpx.post(url, json={**body, "logits_processors": ["nope"]}, timeout=60)
    assert got == want != plain
    assert unknown.status_code == 400
    assert "unknown logits processor 'nope'" in unknown.text and "toy_ban" in unknown.text


# --- the conformance kit -------------------------------------------------------------------


def test_the_kit_passes_on_the_plugin(toyplatform):
    import json

    from click.testing import CliRunner

    from enginehouse.cli import cli

    args = ["conformance-plugin", "toyplatform", "--device", "toydev", "--json"]
    out = CliRunner().invoke(cli, args)
    report = json.loads(out.stdout)
    status = {r["name"]: r["status"] for r in report["results"]}
    assert status == {
        "contract-version": "pass",
        "platform[toydev]": "pass",
        "platform-tp2[toydev]": "pass",
        "family[ToyLlamaForCausalLM]": "pass",
        "logits-processor[toy_ban]": "pass",
    }, report
    assert out.exit_code == 0 and report["ok"]


def _variant(plugin, **hooks) -> types.SimpleNamespace:
    """The plugin with some of its hooks (or its declaration) replaced."""
    attrs = {
        "ENGINEHOUSE_CONTRACT": plugin.ENGINEHOUSE_CONTRACT,
        "register_platforms": plugin.register_platforms,
        "register_model_families": plugin.register_model_families,
        "register_logits_processors": plugin.register_logits_processors,
    }
    return types.SimpleNamespace(**{**attrs, **hooks})


def test_the_kit_fails_on_broken_variants(toyplatform):
    from dataclasses import replace

    from enginehouse_toyplatform.family import TOY_LLAMA
    from enginehouse_toyplatform.platform import ToyDevPlatform
    from enginehouse_toyplatform.processor import ToyBanProcessor

    from enginehouse.conformance.plugin_checks import check_plugin

    class NoMemory(ToyDevPlatform):
        name = "toydev-nomem"

        def free_memory(self, device):
            return 0

    class BadCollectives(ToyDevPlatform):
        name = "toydev-badcoll"
        collective_backend = "no-such-backend"

    class Everywhere(ToyBanProcessor):
        name = "toy_ban_everywhere"

        def apply(self, logits):
            logits[:, :4] = float("-inf")  # every row, not only those that asked
            return logits

    # The MLP's gate and up swapped: the model loads, and computes something else.
    swapped = (
        (r"\.ffn\.w_gate\.", ".mlp.up_proj."),
        (r"\.ffn\.w_up\.", ".mlp.gate_proj."),
        *TOY_LLAMA.weight_names,
    )
    variant = _variant(
        toyplatform,
        ENGINEHOUSE_CONTRACT="0.1",
        register_platforms=lambda: [NoMemory(), BadCollectives()],
        register_model_families=lambda: [replace(TOY_LLAMA, weight_names=swapped)],
        register_logits_processors=lambda: [Everywhere],
    )
    report = check_plugin(variant, "broken", device="toydev")
    status = {r.name: r for r in report.results}
    assert not report.ok
    assert status["contract-version"].status == "fail"
    assert "contract 0.1" in status["contract-version"].detail
    assert status["platform[toydev-nomem]"].status == "fail"
    assert "free_memory" in status["platform[toydev-nomem]"].detail
    assert status["platform-tp2[toydev-badcoll]"].status == "fail"
    assert status["family[ToyLlamaForCausalLM]"].status == "fail"
    assert "greedy tokens" in status["family[ToyLlamaForCausalLM]"].detail
    assert status["logits-processor[toy_ban_everywhere]"].status == "fail"
    assert "changed row 1" in status["logits-processor[toy_ban_everywhere]"].detail
