"""The `tensorrt` backend: its engine cache everywhere, the engine itself where TensorRT runs.

The cache logic (`load_or_build`, keys, file names, the probe's look-up) is plain Python with
the build and load steps passed in, so it is tested for real here with bytes on disk: a corrupt
or truncated cached engine is rebuilt, never crashed on. The tests that build and run an engine
need tensorrt and a CUDA device; elsewhere they skip and say which is missing.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path

import pytest
import torch

from enginehouse import EngineConfig, GenerationConfig, pipeline
from enginehouse.spec import read_model_spec
from enginehouse.testing import build_model, native_model_configs
from enginehouse_tensorrt.cache import engine_dir, gpu_tag
from enginehouse_tensorrt.export import GraphInfo
from enginehouse_tensorrt.probe import Gpu, installed_version, tensorrt_verdict
from enginehouse_tensorrt.trt_runner import (
    engine_key,
    engine_path,
    has_cached_engine,
    load_or_build,
    profile_shapes,
)

H100 = Gpu("NVIDIA H100 80GB HBM3", (9, 0))
MAGIC = b"ENGINE:"


class Builds:
    """A stand-in TensorRT for the cache: `build` makes engine bytes and counts the builds;
    `load` accepts only bytes it built, as deserialize_cuda_engine accepts only real engines."""

    def __init__(self) -> None:
        self.count = 0

    def build(self) -> bytes:
        self.count += 1
        return MAGIC + f"build {self.count}".encode()

    def load(self, data: bytes) -> str | None:
        return data.decode() if data.startswith(MAGIC) else None


def test_an_engine_is_built_once_then_loaded_from_disk(tmp_path):
    path, builds = tmp_path / "e" / "x.engine", Builds()
    assert load_or_build(path, builds.build, builds.load) == "ENGINE:build 1"
    assert path.read_bytes() == b"ENGINE:build 1"
    assert load_or_build(path, builds.build, builds.load) == "ENGINE:build 1"
    assert builds.count == 1
    assert [p.name for p in path.parent.iterdir()] == ["x.engine"]  # no temporary left over


@pytest.mark.parametrize("corrupt", [b"\x00garbage", b"", b"ENG"])
def test_a_corrupt_cached_engine_is_rebuilt_with_a_warning(tmp_path, caplog, corrupt):
    path, builds = tmp_path / "x.engine", Builds()
    path.write_bytes(corrupt)
    with caplog.at_level(logging.WARNING):
        assert load_or_build(path, builds.build, builds.load) == "ENGINE:build 1"
    assert builds.count == 1
    assert path.read_bytes() == b"ENGINE:build 1"
    assert "rebuilding the TensorRT engine" in caplog.text and str(path) in caplog.text


def test_a_loader_that_raises_on_a_cached_file_also_means_rebuild(tmp_path, caplog):
    path, builds = tmp_path / "x.engine", Builds()
    path.write_bytes(b"from another TensorRT")

    def strict(data: bytes) -> str:
        if not data.startswith(MAGIC):
            raise RuntimeError("serialization version mismatch")
        return data.decode()

    with caplog.at_level(logging.WARNING):
        assert load_or_build(path, builds.build, strict) == "ENGINE:build 1"
    assert "serialization version mismatch" in caplog.text


def test_a_fresh_engine_that_cannot_load_is_an_error_not_a_loop(tmp_path):
    with pytest.raises(RuntimeError, match="cannot load back"):
        load_or_build(tmp_path / "x.engine", lambda: b"bad", lambda data: None)


def test_a_failed_build_leaves_no_file(tmp_path):
    def fail() -> bytes:
        raise RuntimeError("out of memory while building")

    with pytest.raises(RuntimeError, match="out of memory"):
        load_or_build(tmp_path / "x.engine", fail, Builds().load)
    assert list(tmp_path.iterdir()) == []


INFO = GraphInfo("LlamaForCausalLM", "float16", 2, 2, 16, 512, 256)


def test_engine_key_changes_with_every_input():
    shapes = profile_shapes(INFO, EngineConfig(), 256)
    base = engine_key("abc", shapes, "11.4.0", H100)
    others = [
        engine_key("abd", shapes, "11.4.0", H100),
        engine_key(
            "abc", profile_shapes(INFO, EngineConfig(max_batch_size=8), 256), "11.4.0", H100
        ),
        engine_key("abc", shapes, "11.5.0", H100),
        engine_key("abc", shapes, "11.4.0", Gpu("NVIDIA A100-SXM4-80GB", (9, 0))),
        engine_key("abc", shapes, "11.4.0", Gpu(H100.name, (8, 0))),
    ]
    assert len({base, *others}) == 6
    assert base == engine_key("abc", profile_shapes(INFO, EngineConfig(), 256), "11.4.0", H100)
    name = engine_path(Path("/c"), base, "11.4.0", H100).name
    assert name == f"nvidia-h100-80gb-hbm3-sm90-trt11.4.0-{base}.engine"


def test_profiles_are_decode_batches_and_single_prefills_within_the_engine_limits():
    decode, prefill = profile_shapes(
        INFO, EngineConfig(max_batch_size=8, max_num_batched_tokens=64), 256
    )
    assert decode["input_ids"] == ((1, 1), (4, 1), (8, 1))
    assert prefill["input_ids"] == ((1, 1), (1, 32), (1, 64))
    assert decode["attention_mask"][2] == (8, 256)
    assert decode["past_key_values.1.value"] == ((1, 2, 0, 16), (4, 2, 127, 16), (8, 2, 255, 16))
    assert prefill["past_key_values.0.key"][2] == (1, 2, 255, 16)
    assert set(decode) == set(prefill)  # every input has a shape range in both


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("trt")
    return build_model(root / "llama", native_model_configs(512)["llama"])


def test_probe_finds_a_cached_engine_for_this_gpu_only(llama, tmp_path, monkeypatch):
    monkeypatch.setenv("ENGINEHOUSE_CACHE", str(tmp_path))
    spec = read_model_spec(llama)
    config = EngineConfig()
    assert not has_cached_engine(spec, config, H100, "11.4.0")
    folder = engine_dir(spec, "float16")  # what the tensorrt backend runs by default
    folder.mkdir(parents=True)
    (folder / f"{gpu_tag(H100.name, H100.capability, '11.4.0')}-0123.engine").write_bytes(b"x")
    assert has_cached_engine(spec, config, H100, "11.4.0")
    assert not has_cached_engine(spec, config, H100, "11.5.0")
    assert not has_cached_engine(spec, config, Gpu("NVIDIA L4", (8, 9)), "11.4.0")
    assert not has_cached_engine(spec, EngineConfig(dtype="float32"), H100, "11.4.0")
    verdict = tensorrt_verdict(spec, config, "11.4.0", H100, cached_engine=True)
    assert verdict.supported and verdict.priority > 100


# --- where TensorRT and a GPU exist ---------------------------------------------------------

TRT = installed_version("tensorrt")
MISSING = [
    what
    for what, ok in [
        ("tensorrt is not installed", TRT),
        ("no CUDA device", torch.cuda.is_available()),
    ]
    if not ok
]
needs_tensorrt = pytest.mark.skipif(
    bool(MISSING), reason="needs TensorRT on a GPU: " + ", ".join(MISSING)
)


@needs_tensorrt
def test_tensorrt_greedy_tokens_equal_pytorch_and_a_corrupt_engine_is_rebuilt(
    llama, tmp_path, monkeypatch
):
    monkeypatch.setenv("ENGINEHOUSE_CACHE", str(tmp_path))
    rng = random.Random(0)
    prompts = [{"token_ids": rng.choices(range(5, 512), k=n)} for n in (7, 40, 19)]
    params = GenerationConfig(max_new_tokens=12, min_new_tokens=12)
    # float32 on both sides (TF32 off in the engine), so greedy tokens must agree exactly.
    config = dict(dtype="float32", max_batch_size=4, max_num_batched_tokens=16)

    def tokens(backend: str) -> list[list[int]]:
        pipe = pipeline(str(llama), backend=backend, engine_config=config, progress=False)
        try:
            return [r.token_ids for r in pipe(prompts, params)]
        finally:
            pipe.close()

    want = tokens("pytorch")
    assert tokens("tensorrt") == want
    (engine,) = engine_dir(read_model_spec(llama), "float32").glob("*.engine")
    engine.write_bytes(b"corrupt")
    assert tokens("tensorrt") == want
    assert engine.stat().st_size > 1000  # rebuilt in place
