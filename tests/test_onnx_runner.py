"""The `onnxruntime` backend end to end, and the probes of both compiled backends.

`pipeline(model, backend="onnxruntime")` must behave exactly as `backend="pytorch"`: the same
greedy tokens for a batch of prompts of different lengths, with chunked prefill and preemption,
the same seeded samples and the same stops. The probes' verdicts are checked through the real
plugin (entry points from installed metadata) and, for facts this machine lacks (tensorrt, a
GPU), through the verdict function given those facts.
"""

from __future__ import annotations

import copy
import random
from pathlib import Path

import pytest

from enginehouse import EngineConfig, GenerationConfig, pipeline
from enginehouse.backends import choose_backend, probe_backends
from enginehouse.detect import detect_architecture
from enginehouse.errors import BackendError
from enginehouse.plugins import load_plugins
from enginehouse.spec import read_model_spec
from enginehouse.testing import build_model, native_model_configs
from enginehouse_tensorrt import probe
from enginehouse_tensorrt.cache import onnx_dir

CONFIGS = native_model_configs(512)
# Gemma 2 untied: with tied embeddings a random Gemma 2 only repeats the prompt's last token
# (see test_native.py), which could not tell a right graph from a wrong one.
CONFIGS["gemma2"] = copy.deepcopy(CONFIGS["gemma2"])
CONFIGS["gemma2"].tie_word_embeddings = False
# The greedy comparison's models: plain, sliding window, soft-capping + window, experts.
FAMILIES = ["llama", "mistral", "gemma2", "qwen3_moe"]


@pytest.fixture(scope="module", autouse=True)
def cache(tmp_path_factory):
    """Exports go to a private cache, made once for this module."""
    with pytest.MonkeyPatch.context() as mp:
        path = tmp_path_factory.mktemp("eh-cache")
        mp.setenv("ENGINEHOUSE_CACHE", str(path))
        yield path


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("onnx-runner")
    return {f: build_model(root / f, CONFIGS[f]) for f in [*FAMILIES, "qwen2"]}


def tokens(n: int, seed: int) -> dict[str, list[int]]:
    """A prompt of exactly n token ids (past the special ones)."""
    return {"token_ids": random.Random(seed).choices(range(5, 512), k=n)}


PROMPTS = [tokens(n, seed=n) for n in (7, 40, 19, 1)]


def generate(folder: Path, backend: str, params: GenerationConfig, prompts=PROMPTS, **config):
    pipe = pipeline(str(folder), backend=backend, engine_config=config, progress=False)
    try:
        assert pipe.backend == backend
        return [(r.token_ids, r.text, r.finish_reason) for r in pipe(prompts, params)]
    finally:
        pipe.close()


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_tokens_equal_pytorch_backend(family, models):
    # A 16-token step budget prefills the 40- and 19-token prompts in chunks, next to decodes.
    params = GenerationConfig(max_new_tokens=12, min_new_tokens=12)
    config = dict(max_batch_size=4, max_num_batched_tokens=16)
    want = generate(models[family], "pytorch", params, **config)
    assert all(len(set(ids)) >= 3 for ids, _, _ in want)  # answers that tell models apart
    assert generate(models[family], "onnxruntime", params, **config) == want


def test_more_prompts_than_slots_and_a_short_session_match_pytorch(models):
    # Two sequences at a time: the third waits for a slot that a finished one frees, and its
    # prefill then overwrites that slot's old KV.
    params = GenerationConfig(max_new_tokens=20, min_new_tokens=20)
    config = dict(max_batch_size=2, session_len=64)
    prompts = [tokens(n, seed=50 + n) for n in (30, 25, 12)]
    want = generate(models["llama"], "pytorch", params, prompts, **config)
    got = generate(models["llama"], "onnxruntime", params, prompts, **config)
    assert got == want


def test_sampling_and_stops_behave_as_on_pytorch(models):
    params = GenerationConfig(
        max_new_tokens=24, do_sample=True, temperature=0.8, top_k=50, random_seed=3
    )
    texts = ["the quick brown fox", "hello world", "river city"]
    want = generate(models["qwen2"], "pytorch", params, texts)
    assert generate(models["qwen2"], "onnxruntime", params, texts) == want
    # A stop word cut from the first answer ends it early, at the same place on both backends.
    word = want[0][1].strip()[3:8]
    stopped = params.model_copy(update={"stop_words": [word]})
    want = generate(models["qwen2"], "pytorch", stopped, texts)
    assert want[0][2] == "stop"
    assert generate(models["qwen2"], "onnxruntime", stopped, texts) == want


def test_the_graph_is_exported_once_and_cached(models, cache):
    spec = read_model_spec(models["llama"])
    folder = onnx_dir(spec, "float32")
    assert folder.is_relative_to(cache)
    assert (folder / "model.onnx").exists() and (folder / "graph.json").exists()


def test_bfloat16_is_refused_with_the_fix(models):
    with pytest.raises(ValueError, match="dtype='float32'"):
        pipeline(str(models["llama"]), backend="onnxruntime", engine_config={"dtype": "bfloat16"})


# --- probes --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def host():
    return load_plugins()


def verdicts_for(folder: Path, host, config: EngineConfig | None = None):
    spec = detect_architecture(read_model_spec(folder), host)
    return spec, probe_backends(spec, config or EngineConfig(), host)


def test_plugin_comes_from_installed_metadata_with_its_hooks(host):
    info = host.infos["tensorrt"]
    assert info.distribution == "enginehouse-tensorrt"
    assert set(info.hooks) == {"create_runner", "probe_backend", "register_commands"}


def test_onnxruntime_is_supported_but_never_outranks_pytorch(models, host):
    _, verdicts = verdicts_for(models["llama"], host)
    by_name = {v.name: v for v in verdicts}
    ort = by_name["onnxruntime"]
    assert ort.supported and ort.plugin == "tensorrt"
    assert "ONNX Runtime" in ort.reason
    assert ort.priority < by_name["transformers"].priority < by_name["pytorch"].priority
    assert choose_backend(verdicts).chosen == "pytorch"
    assert choose_backend(verdicts, "onnxruntime").chosen == "onnxruntime"


def test_tensorrt_verdict_here_says_what_is_missing_and_how_to_install(models, host):
    _, verdicts = verdicts_for(models["llama"], host)
    trt = next(v for v in verdicts if v.name == "tensorrt")
    if trt.supported:
        pytest.skip("tensorrt and a CUDA device are present here: tests/test_tensorrt.py runs")
    if probe.installed_version("tensorrt") is None:
        assert "tensorrt is not installed" in trt.reason
        assert "pip install 'enginehouse[tensorrt]'" in trt.reason
    import torch

    if not torch.cuda.is_available():
        assert "no CUDA device is visible" in trt.reason
    with pytest.raises(BackendError, match="'tensorrt' cannot run this model"):
        choose_backend(verdicts, "tensorrt")


@pytest.mark.parametrize(
    "trt_version, gpu, expected",
    [
        (None, None, ["tensorrt is not installed", "no CUDA device is visible"]),
        (None, probe.Gpu("NVIDIA H100", (9, 0)), ["tensorrt is not installed"]),
        ("11.4.0", None, ["no CUDA device is visible"]),
    ],
)
def test_tensorrt_verdict_names_each_missing_piece(models, trt_version, gpu, expected):
    spec = read_model_spec(models["llama"])
    verdict = probe.tensorrt_verdict(spec, EngineConfig(), trt_version, gpu)
    assert not verdict.supported
    for text in expected:
        assert text in verdict.reason
    if trt_version:
        assert "not installed" not in verdict.reason
    if gpu:
        assert "CUDA" not in verdict.reason


def test_tensorrt_verdict_with_everything_present_and_with_a_cached_engine(models):
    spec = read_model_spec(models["llama"])
    gpu = probe.Gpu("NVIDIA H100 80GB HBM3", (9, 0))
    fresh = probe.tensorrt_verdict(spec, EngineConfig(), "11.4.0", gpu)
    assert fresh.supported and "NVIDIA H100 80GB HBM3 (sm90), TensorRT 11.4.0" in fresh.reason
    assert fresh.priority < 100  # below pytorch's native backend unless asked for
    cached = probe.tensorrt_verdict(spec, EngineConfig(), "11.4.0", gpu, cached_engine=True)
    assert cached.supported and "cached" in cached.reason
    assert cached.priority > 100  # an engine already built for this GPU outranks pytorch
    on_cpu = probe.tensorrt_verdict(spec, EngineConfig(device="cpu"), "11.4.0", gpu)
    assert not on_cpu.supported and "device='cpu'" in on_cpu.reason
    bf16 = probe.tensorrt_verdict(spec, EngineConfig(dtype="bfloat16"), "11.4.0", gpu)
    assert not bf16.supported and "pass one" in bf16.reason


def test_both_probes_refuse_a_vision_language_model(models):
    spec = read_model_spec(models["llama"]).with_facts({"is_vlm": True})
    gpu = probe.Gpu("NVIDIA H100", (9, 0))
    for verdict in (
        probe.onnxruntime_verdict(spec, "1.32.0"),
        probe.tensorrt_verdict(spec, EngineConfig(), "11.4.0", gpu),
    ):
        assert not verdict.supported
        assert "vision-language model" in verdict.reason


def test_both_probes_name_an_unsupported_family(tmp_path, host):
    from transformers import GPT2Config

    folder = build_model(tmp_path / "gpt2", GPT2Config(n_embd=32, n_layer=1, n_head=2))
    _, verdicts = verdicts_for(folder, host)
    for name in ("onnxruntime", "tensorrt"):
        verdict = next(v for v in verdicts if v.name == name)
        assert not verdict.supported
        assert "GPT2LMHeadModel" in verdict.reason and "LlamaForCausalLM" in verdict.reason


def test_onnxruntime_verdict_without_onnxruntime_says_how_to_install(models):
    verdict = probe.onnxruntime_verdict(read_model_spec(models["llama"]), None)
    assert not verdict.supported
    assert "onnxruntime is not installed" in verdict.reason and "pip install" in verdict.reason
