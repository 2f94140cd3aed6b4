"""Step 4, probing every backend and choosing one, with the installed plugins and real folders."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from enginehouse import BackendProbe, EngineConfig, explain, hookimpl
from enginehouse.backends import BackendDecision, choose_backend, probe_backends
from enginehouse.detect import detect_architecture
from enginehouse.errors import BackendError
from enginehouse.plugins import PluginHost, load_plugins
from enginehouse.spec import read_model_spec
from enginehouse_pytorch.native.arch import FAMILIES

INSTALLED_BACKENDS = {"transformers", "pytorch", "tensorrt", "onnxruntime"}


class Offers:
    """A backend plugin object that answers with fixed probes."""

    def __init__(self, answer):
        self.answer = answer

    @hookimpl
    def probe_backend(self, spec, config):
        return self.answer


def write_model(folder: Path, config: dict) -> Path:
    """A model folder with config.json and a small real safetensors weight file."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    save_file({"w": torch.zeros(4, 4)}, folder / "model.safetensors")
    return folder


def detected(folder: Path, host: PluginHost | None = None):
    return detect_architecture(read_model_spec(folder), host or load_plugins())


@pytest.fixture(scope="module")
def host():
    return load_plugins()


@pytest.fixture(scope="module")
def llama_spec(llama_dir, host):
    return detect_architecture(read_model_spec(llama_dir), host)


@pytest.fixture(scope="module")
def llama_verdicts(llama_spec, host):
    return probe_backends(llama_spec, EngineConfig(), host)


@pytest.fixture(scope="module")
def vlm_dir(tmp_path_factory) -> Path:
    config = {
        "architectures": ["LlavaForConditionalGeneration"],
        "model_type": "llava",
        "vision_config": {"model_type": "clip_vision_model", "hidden_size": 32, "patch_size": 8},
        "text_config": {"model_type": "llama", "max_position_embeddings": 512},
    }
    return write_model(tmp_path_factory.mktemp("vlm") / "llava", config)


# --- ranking and choosing, on probes from real plugin objects -----------------------------------


def test_supported_first_then_by_priority(llama_spec):
    host = PluginHost()
    host.register(Offers([BackendProbe("slow", True, 1, "ok"), BackendProbe("no", False, 99)]), "a")
    host.register(Offers(BackendProbe("fast", True, 50, "ok")), "b")
    host.register(Offers([BackendProbe("mid", True, 10), BackendProbe("nope", False, 5)]), "c")
    host.register(Offers(None), "d")  # offers no backend
    verdicts = probe_backends(llama_spec, EngineConfig(), host)
    assert [v.name for v in verdicts] == ["fast", "mid", "slow", "no", "nope"]
    assert {v.name: v.plugin for v in verdicts} == {
        "fast": "b",
        "mid": "c",
        "slow": "a",
        "no": "a",
        "nope": "c",
    }
    decision = choose_backend(verdicts)
    assert decision.chosen == "fast"
    assert decision.requested is None
    assert decision.verdicts == tuple(verdicts)


def test_equal_priorities_keep_the_plugins_order(llama_spec):
    host = PluginHost()
    host.register(Offers([BackendProbe("one", True, 7), BackendProbe("two", True, 7)]), "p")
    verdicts = probe_backends(llama_spec, EngineConfig(), host)
    assert [v.name for v in verdicts] == ["one", "two"]
    assert choose_backend(verdicts).chosen == "one"


def test_explicit_backend_is_honoured_over_priority():
    verdicts = [BackendProbe("fast", True, 50, "ok"), BackendProbe("slow", True, 1, "ok")]
    decision = choose_backend(verdicts, "slow")
    assert decision.chosen == "slow"
    assert decision.requested == "slow"
    assert decision.verdict("fast").supported is True  # the full list is still kept


def test_unknown_backend_lists_the_installed_ones(llama_verdicts):
    with pytest.raises(BackendError) as info:
        choose_backend(llama_verdicts, "vllm")
    message = str(info.value)
    assert "unknown backend 'vllm'" in message
    for name in INSTALLED_BACKENDS:
        assert name in message


def test_unknown_backend_without_any_backend_plugin():
    with pytest.raises(BackendError, match="none \\(no backend plugin\\)"):
        choose_backend([], "transformers")


def test_requested_but_unsupported_gives_its_reason(llama_verdicts):
    reason = next(v.reason for v in llama_verdicts if v.name == "tensorrt")
    with pytest.raises(BackendError) as info:
        choose_backend(llama_verdicts, "tensorrt")
    message = str(info.value)
    assert "'tensorrt' cannot run this model" in message
    assert reason in message


def test_no_supported_backend_lists_every_verdict():
    verdicts = [
        BackendProbe("a", False, 9, "needs a GPU", plugin="pa"),
        BackendProbe("b", False, 1, "wrong architecture", plugin="pb"),
    ]
    with pytest.raises(BackendError) as info:
        choose_backend(verdicts)
    message = str(info.value)
    assert "no installed backend can run this model" in message
    assert "a (pa): needs a GPU" in message
    assert "b (pb): wrong architecture" in message


def test_no_backend_plugin_at_all_says_what_to_install():
    with pytest.raises(BackendError, match=r"pip install 'enginehouse\[pytorch\]'"):
        choose_backend([])


def test_decision_as_dict_and_lookup():
    verdicts = (BackendProbe("x", True, 3, "fine", plugin="px"),)
    decision = BackendDecision(chosen="x", requested=None, verdicts=verdicts)
    assert decision.verdict("x") is verdicts[0]
    assert decision.verdict("y") is None
    assert decision.as_dict() == {
        "chosen": "x",
        "chosen_plugin": None,
        "requested": None,
        "conflicts": {},
        "verdicts": [
            {
                "backend": "x",
                "plugin": "px",
                "supported": True,
                "priority": 3,
                "reason": "fine",
                "verifies_tokens": False,
                "lora_adapters": False,
                "drafts_tokens": False,
            }
        ],
    }


# --- the installed backends on real models ------------------------------------------------------


def test_tiny_llama_runs_on_native_pytorch(llama_verdicts):
    by_name = {v.name: v for v in llama_verdicts}
    assert INSTALLED_BACKENDS <= set(by_name)
    native = by_name["pytorch"]
    assert native.supported is True
    assert native.plugin == "pytorch"
    assert "native llama implementation" in native.reason
    transformers = by_name["transformers"]
    assert transformers.supported is True
    assert transformers.plugin == "pytorch"
    assert "LlamaForCausalLM" in transformers.reason
    # Both are supported: native first by priority, transformers the fallback second.
    assert [v.name for v in llama_verdicts[:2]] == ["pytorch", "transformers"]
    assert choose_backend(llama_verdicts).chosen == "pytorch"
    assert choose_backend(llama_verdicts, "transformers").chosen == "transformers"


def test_compiled_backends_answer_from_the_tensorrt_plugin(llama_verdicts):
    # Their verdicts in detail: tests/test_onnx_runner.py and tests/test_tensorrt.py.
    by_name = {v.name: v for v in llama_verdicts}
    assert by_name["tensorrt"].plugin == by_name["onnxruntime"].plugin == "tensorrt"
    assert by_name["onnxruntime"].supported is True
    if not by_name["tensorrt"].supported:
        assert "tensorrt is not installed" in by_name["tensorrt"].reason or (
            "no CUDA device" in by_name["tensorrt"].reason
        )


def test_native_pytorch_outranks_transformers_once_it_exists(llama_verdicts):
    priority = {v.name: v.priority for v in llama_verdicts}
    assert priority["pytorch"] > priority["transformers"]
    assert priority["tensorrt"] > priority["transformers"]


def test_every_tiny_model_runs_natively_with_transformers_second(tiny_models, host):
    assert set(tiny_models) == {"llama", "qwen2", "mistral"}
    for family, folder in tiny_models.items():
        spec = detected(folder, host)
        verdicts = probe_backends(spec, EngineConfig(), host)
        assert choose_backend(verdicts).chosen == "pytorch", family
        native, fallback = verdicts[:2]
        assert (native.name, native.supported) == ("pytorch", True)
        assert f"native {family} implementation" in native.reason
        assert (fallback.name, fallback.supported) == ("transformers", True)
        assert spec.architecture in fallback.reason


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory) -> Path:
    """A tiny GPT-2, saved by transformers: a causal LM with no native implementation."""
    from transformers import AutoModelForCausalLM, GPT2Config

    folder = tmp_path_factory.mktemp("gpt2") / "gpt2"
    config = GPT2Config(vocab_size=64, n_positions=64, n_embd=32, n_layer=1, n_head=2)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return folder


def test_architecture_without_a_native_implementation_runs_on_transformers(gpt2_dir, host):
    spec = detected(gpt2_dir, host)
    assert spec.architecture == "GPT2LMHeadModel"
    assert spec.architecture not in FAMILIES
    verdicts = probe_backends(spec, EngineConfig(), host)
    by_name = {v.name: v for v in verdicts}
    native = by_name["pytorch"]
    assert native.supported is False
    assert "no native implementation of GPT2LMHeadModel" in native.reason
    for name in FAMILIES:  # it says which architectures are native
        assert name in native.reason
    assert by_name["transformers"].supported is True
    assert "GPT2LMHeadModel" in by_name["transformers"].reason
    assert choose_backend(verdicts).chosen == "transformers"
    with pytest.raises(BackendError, match="no native implementation"):
        choose_backend(verdicts, "pytorch")
    assert explain(str(gpt2_dir))["chosen"] == "transformers"


def test_bin_only_checkpoint_is_refused_natively_and_runs_on_transformers(
    tmp_path, llama_dir, host
):
    folder = tmp_path / "llama-bin"
    shutil.copytree(llama_dir, folder)
    for f in folder.glob("*.safetensors*"):
        f.unlink()
    weights = load_file(llama_dir / "model.safetensors")
    torch.save(weights, folder / "pytorch_model.bin")
    spec = detected(folder, host)
    assert spec.weight_files == ("pytorch_model.bin",)
    verdicts = probe_backends(spec, EngineConfig(), host)
    by_name = {v.name: v for v in verdicts}
    native = by_name["pytorch"]
    assert native.supported is False
    assert "reads *.safetensors only" in native.reason
    assert by_name["transformers"].supported is True
    assert choose_backend(verdicts).chosen == "transformers"


def test_folder_without_weights_is_refused_with_reason(tmp_path, llama_dir, host):
    folder = tmp_path / "no-weights"
    folder.mkdir()
    (folder / "config.json").write_bytes((llama_dir / "config.json").read_bytes())
    verdicts = probe_backends(detected(folder, host), EngineConfig(), host)
    transformers = next(v for v in verdicts if v.name == "transformers")
    assert transformers.supported is False
    assert "no weight files" in transformers.reason
    with pytest.raises(BackendError, match="no weight files"):
        choose_backend(verdicts)


def test_vlm_is_recognised_and_run_natively_with_its_encoder(vlm_dir, host):
    spec = detected(vlm_dir, host)
    assert spec.facts["is_vlm"] is True
    assert spec.is_vlm is True
    assert spec.facts["vision_family"] == "llava"  # from the vision plugin
    assert spec.facts["vision_config"]["hidden_size"] == 32
    assert spec.facts["text_architecture"] == "LlamaForCausalLM"
    assert spec.context_length == 512  # from text_config
    verdicts = {v.name: v for v in probe_backends(spec, EngineConfig(), host)}
    assert verdicts["transformers"].supported is False
    assert "vision-language" in verdicts["transformers"].reason
    assert verdicts["pytorch"].supported is True
    assert "images through the llava encoder" in verdicts["pytorch"].reason
    assert choose_backend(list(verdicts.values())).chosen == "pytorch"


def test_vlm_without_the_vision_plugin_is_refused_with_the_fix(vlm_dir):
    host = load_plugins(only="pytorch")
    verdicts = probe_backends(detected(vlm_dir, host), EngineConfig(), host)
    with pytest.raises(BackendError) as info:
        choose_backend(verdicts)
    message = str(info.value)
    assert "enginehouse[vision]" in message
    for v in verdicts:
        assert f"{v.name} ({v.plugin}): {v.reason}" in message


def test_known_vlm_without_vision_config_needs_the_vision_plugin(tmp_path):
    folder = write_model(
        tmp_path / "llava-next",
        {"architectures": ["LlavaNextForConditionalGeneration"], "model_type": "llava_next"},
    )
    assert detected(folder, load_plugins(only="")).facts["is_vlm"] is False  # config alone
    facts = detected(folder, load_plugins(only="vision")).facts
    assert facts["is_vlm"] is True
    assert facts["vision_family"] == "llava_next"


def test_remote_code_model_says_to_pass_trust_remote_code(tmp_path, host):
    folder = write_model(
        tmp_path / "custom",
        {
            "architectures": ["MyCustomForCausalLM"],
            "model_type": "my_custom",
            "auto_map": {"AutoModelForCausalLM": "modeling_custom.MyCustomForCausalLM"},
        },
    )
    spec = detected(folder, host)
    assert spec.facts["trust_remote_code_needed"] is True
    refused = next(
        v for v in probe_backends(spec, EngineConfig(), host) if v.name == "transformers"
    )
    assert refused.supported is False
    assert "trust_remote_code=True" in refused.reason
    trusted = probe_backends(spec, EngineConfig(trust_remote_code=True), host)
    accepted = next(v for v in trusted if v.name == "transformers")
    assert accepted.supported is True
    assert "modeling_custom.MyCustomForCausalLM" in accepted.reason
    assert choose_backend(trusted).chosen == "transformers"


def test_unknown_architecture_is_refused_with_reason(tmp_path, host):
    folder = write_model(
        tmp_path / "odd", {"architectures": ["NoSuchModelForCausalLM"], "model_type": "odd"}
    )
    verdicts = probe_backends(detected(folder, host), EngineConfig(), host)
    transformers = next(v for v in verdicts if v.name == "transformers")
    assert transformers.supported is False
    assert "'NoSuchModelForCausalLM'" in transformers.reason


# --- explain ------------------------------------------------------------------------------------


def test_explain_reports_the_whole_decision(llama_dir):
    info = explain(str(llama_dir))
    assert {"model", "architecture", "facts", "chosen", "verdicts"} <= set(info)
    assert info["model"] == str(llama_dir)
    assert info["architecture"] == "LlamaForCausalLM"
    assert info["facts"]["family"] == "llama"
    assert info["chosen"] == "pytorch"
    assert info["error"] is None
    json.dumps(info)  # printable as JSON by `enginehouse explain --json`
    backends = set()
    for verdict in info["verdicts"]:
        keys = {"backend", "plugin", "supported", "priority", "reason"}
        assert set(verdict) == keys | {"verifies_tokens", "lora_adapters", "drafts_tokens"}
        assert verdict["reason"]
        backends.add(verdict["backend"])
    assert INSTALLED_BACKENDS <= backends


def test_explain_with_an_unsupported_request_keeps_the_verdicts(llama_dir):
    info = explain(str(llama_dir), backend="tensorrt")
    assert info["chosen"] is None
    assert "'tensorrt' cannot run this model" in info["error"]
    assert INSTALLED_BACKENDS <= {v["backend"] for v in info["verdicts"]}


def test_explain_a_vlm(vlm_dir):
    info = explain(str(vlm_dir))
    assert info["facts"]["is_vlm"] is True
    assert info["facts"]["vision_encoder"] == "llava"
    assert info["chosen"] == "pytorch" and info["error"] is None
