"""The `tensorrt` backend: an engine built from the ONNX export, cached on disk, run on a GPU.

Written against TensorRT 11's Python API (10.x has the same calls): `Builder`, `OnnxParser`,
two optimisation profiles, `build_serialized_network`; at run time one execution context per
profile, `set_input_shape` / `set_tensor_address` / `execute_async_v3` on torch's current
stream, with torch tensors as the buffers.

Profiles follow the runner's two kinds of call (see `runner.py`): "decode" is a batch of up
to `max_batch_size` rows of one new token over up to a full context; "prefill" is one row of
up to `max_num_batched_tokens` new tokens. A single profile covering both would size the
engine's activations for max batch x max tokens, which the runner never asks for.

Engines are cached as `cache.engine_dir(...)/<gpu tag>-<hash>.engine`, the hash covering the
ONNX bytes, the profiles, the TensorRT version, the GPU's name and compute capability. A cached
file that fails to deserialize (truncated, corrupt, from another build) is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch

from enginehouse import EngineConfig, ModelSpec
from enginehouse.plugin_api import RunnerContext

from .cache import engine_dir, ensure_onnx, file_sha256, gpu_tag
from .export import GraphInfo
from .probe import Gpu, visible_gpu
from .runner import GraphRunner

log = logging.getLogger(__name__)
T = TypeVar("T")
Shapes = dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]


# --- the on-disk cache: plain Python, tested on any machine ----------------------------------


def load_or_build(
    path: Path, build: Callable[[], bytes], deserialize: Callable[[bytes], T | None]
) -> T:
    """The engine in `path` if it deserializes, else `build()` it, save it there and load it.

    `deserialize` returns None (or raises) for bytes it cannot load; such a file is replaced,
    with a warning, instead of failing the start-up. The file is written to a temporary name
    and renamed, so a crash mid-write never leaves a truncated engine under the real name."""
    if path.exists():
        try:
            engine = deserialize(path.read_bytes())
        except Exception as e:  # TensorRT raises for some corrupt inputs, returns None for others
            log.warning("cached engine %s failed to load (%s)", path, e)
            engine = None
        if engine is not None:
            return engine
        log.warning("rebuilding the TensorRT engine: the cached %s does not deserialize", path)
        path.unlink()
    data = build()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".build-")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
    engine = deserialize(data)
    if engine is None:
        raise RuntimeError(f"TensorRT built an engine ({path}) that it cannot load back")
    return engine


def profile_shapes(info: GraphInfo, config: EngineConfig, context: int) -> list[Shapes]:
    """[decode, prefill]: (min, opt, max) of every input, from the engine's limits."""
    batch = config.max_batch_size
    tokens = min(config.max_num_batched_tokens, context)
    kvh, d = info.num_kv_heads, info.head_dim

    def profile(rows: int, new: int) -> Shapes:
        half_rows, half_ctx = max(1, rows // 2), max(1, context // 2)
        opt_new = 1 if new == 1 else max(1, new // 2)
        shapes: Shapes = {
            "input_ids": ((1, 1), (half_rows, opt_new), (rows, new)),
            "position_ids": ((1, 1), (half_rows, opt_new), (rows, new)),
            "attention_mask": ((1, 1), (half_rows, half_ctx), (rows, context)),
        }
        past = ((1, kvh, 0, d), (half_rows, kvh, half_ctx - 1, d), (rows, kvh, context - 1, d))
        for i in range(info.num_layers):
            shapes[f"past_key_values.{i}.key"] = past
            shapes[f"past_key_values.{i}.value"] = past
        return shapes

    return [profile(batch, 1), profile(1, tokens)]


def engine_key(onnx_sha: str, shapes: list[Shapes], trt_version: str, gpu: Gpu) -> str:
    what = {
        "onnx": onnx_sha,
        "profiles": shapes,
        "tensorrt": trt_version,
        "gpu": gpu.name,
        "capability": list(gpu.capability),
    }
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


def engine_path(folder: Path, key: str, trt_version: str, gpu: Gpu) -> Path:
    return folder / f"{gpu_tag(gpu.name, gpu.capability, trt_version)}-{key}.engine"


def runner_dtype(spec: ModelSpec, config: EngineConfig) -> torch.dtype:
    """float16 unless float32 is asked for: the export has no bfloat16 (see export.DTYPES)."""
    if config.dtype == "bfloat16":
        raise ValueError(
            "the tensorrt backend runs float16 or float32 graphs, not bfloat16; "
            "pass dtype='float16' (or 'float32')"
        )
    return torch.float32 if config.dtype == "float32" else torch.float16


def has_cached_engine(spec: ModelSpec, config: EngineConfig, gpu: Gpu, trt_version: str) -> bool:
    """Whether any engine of this model (in the dtype it would run in) exists for this GPU."""
    if config.dtype == "bfloat16":
        return False  # refused by the probe, see runner_dtype
    dtype = str(runner_dtype(spec, config)).removeprefix("torch.")
    prefix = gpu_tag(gpu.name, gpu.capability, trt_version)
    return any(engine_dir(spec, dtype).glob(f"{prefix}-*.engine"))


# --- TensorRT itself: runs only where tensorrt imports and a GPU exists -----------------------


def build_engine(onnx_path: Path, shapes: list[Shapes], dtype: torch.dtype) -> bytes:
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    # TensorRT 11 networks are always strongly typed (the flag is kept, ignored); 10.x needs it.
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT's ONNX parser rejected {onnx_path}: {errors}")
    config = builder.create_builder_config()
    if dtype == torch.float32 and hasattr(trt.BuilderFlag, "TF32"):
        # float32 was asked for: keep matmuls in full float32, not TF32's 10-bit mantissa.
        config.clear_flag(trt.BuilderFlag.TF32)
    for profile_shapes_ in shapes:
        profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in profile_shapes_.items():
            profile.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(profile)
    log.warning("building a TensorRT engine for %s (minutes, once per GPU)", onnx_path.parent)
    data = builder.build_serialized_network(network, config)
    if data is None:
        raise RuntimeError(f"TensorRT could not build an engine from {onnx_path}; see its log")
    return bytes(data)


@dataclass
class LoadedEngine:
    runtime: Any  # kept: a TensorRT runtime must outlive the engines it deserialized
    engine: Any


def deserialize_engine(data: bytes) -> LoadedEngine | None:
    import tensorrt as trt

    runtime = trt.Runtime(trt.Logger(trt.Logger.ERROR))
    engine = runtime.deserialize_cuda_engine(data)
    return None if engine is None else LoadedEngine(runtime, engine)


def torch_dtype(trt_dtype: Any) -> torch.dtype:
    import tensorrt as trt

    table = {
        trt.DataType.FLOAT: torch.float32,
        trt.DataType.HALF: torch.float16,
        trt.DataType.BF16: torch.bfloat16,
        trt.DataType.INT64: torch.int64,
        trt.DataType.INT32: torch.int32,
        trt.DataType.BOOL: torch.bool,
    }
    return table[trt_dtype]


class TrtSession:
    """An engine with one execution context per optimisation profile (0 decode, 1 prefill)."""

    def __init__(self, loaded: LoadedEngine, device: torch.device) -> None:
        import tensorrt as trt

        self.loaded = loaded
        engine = loaded.engine
        self.device = device
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]
        self.out_dtypes = {n: torch_dtype(engine.get_tensor_dtype(n)) for n in self.outputs}
        stream = torch.cuda.current_stream(device).cuda_stream
        self.contexts = []
        for profile in range(engine.num_optimization_profiles):
            context = engine.create_execution_context()
            context.set_optimization_profile_async(profile, stream)
            self.contexts.append(context)
        # Empty tensors (no past yet) still need a valid address.
        self.scratch = torch.empty(256, dtype=torch.uint8, device=device)

    def _address(self, t: torch.Tensor) -> int:
        return t.data_ptr() if t.numel() else self.scratch.data_ptr()

    def run(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        context = self.contexts[0 if feeds["input_ids"].shape[1] == 1 else 1]
        keep = {}
        for name in self.inputs:
            t = keep[name] = feeds[name].contiguous()
            if not context.set_input_shape(name, tuple(t.shape)):
                raise RuntimeError(f"TensorRT refused shape {tuple(t.shape)} for {name}")
            context.set_tensor_address(name, self._address(t))
        out = {}
        for name in self.outputs:
            shape = tuple(context.get_tensor_shape(name))
            t = out[name] = torch.empty(shape, dtype=self.out_dtypes[name], device=self.device)
            context.set_tensor_address(name, self._address(t))
        # On torch's current stream: inputs made before and outputs read after are ordered.
        if not context.execute_async_v3(torch.cuda.current_stream(self.device).cuda_stream):
            raise RuntimeError("TensorRT failed to run the engine; see its log")
        return out


class TrtRunner(GraphRunner):
    backend = "tensorrt"

    def __init__(self, spec: ModelSpec, config: EngineConfig, context: RunnerContext) -> None:
        if not torch.cuda.is_available() or config.device == "cpu":
            raise RuntimeError("the tensorrt backend needs a CUDA device; see enginehouse explain")
        device = torch.device("cuda" if config.device == "auto" else config.device)
        super().__init__(spec, config, context, device, runner_dtype(spec, config))

    def open_session(self, progress: bool) -> TrtSession:
        import tensorrt as trt

        folder = ensure_onnx(self.spec, self.dtype_name, progress)
        self.info = GraphInfo.read(folder)
        onnx_path = folder / "model.onnx"
        extra = sorted(p for p in folder.iterdir() if p.suffix not in (".onnx", ".json"))
        shapes = profile_shapes(self.info, self.config, self.context)
        gpu = visible_gpu(self.config)
        key = engine_key(file_sha256(onnx_path, *extra), shapes, trt.__version__, gpu)
        path = engine_path(engine_dir(self.spec, self.dtype_name), key, trt.__version__, gpu)
        with torch.cuda.device(self.device):
            engine = load_or_build(
                path, lambda: build_engine(onnx_path, shapes, self.dtype), deserialize_engine
            )
            return TrtSession(engine, self.device)
