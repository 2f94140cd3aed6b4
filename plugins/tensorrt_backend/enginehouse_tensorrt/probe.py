"""The probes of `tensorrt` and `onnxruntime`: cheap, and honest about what is missing.

Each verdict is a pure function of the facts it needs (what imports, which GPU, whether an
engine is cached), so every branch is tested on any machine; `probe_backends` gathers the facts.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from enginehouse import BackendProbe, EngineConfig, ModelSpec

from .export import UnsupportedExport, check_exportable

# Below `pytorch` (100): a compiled backend is chosen when asked for by name, or (tensorrt)
# when an engine for this model and GPU is already built, which makes it start fast too.
TENSORRT_PRIORITY = 50
TENSORRT_CACHED_PRIORITY = 150
ONNXRUNTIME_PRIORITY = 5  # below `transformers` (10): a portable path, not a fast one

INSTALL_TENSORRT = "pip install 'enginehouse[tensorrt]' on Linux x86_64 with an NVIDIA GPU"
INSTALL_ORT = "pip install onnxruntime (or onnxruntime-gpu), or 'enginehouse[tensorrt]'"


@dataclass(frozen=True)
class Gpu:
    name: str
    capability: tuple[int, int]


def exportable(spec: ModelSpec) -> str | None:
    """None when the model exports, else why not (VLMs included)."""
    try:
        check_exportable(spec)
    except UnsupportedExport as e:
        return str(e)
    return None


def onnxruntime_verdict(spec: ModelSpec, ort_version: str | None) -> BackendProbe:
    def verdict(ok: bool, reason: str) -> BackendProbe:
        return BackendProbe("onnxruntime", ok, ONNXRUNTIME_PRIORITY, reason)

    problem = exportable(spec)
    if problem:
        return verdict(False, problem)
    if ort_version is None:
        return verdict(False, f"onnxruntime is not installed: {INSTALL_ORT}")
    return verdict(
        True,
        f"exports {spec.architecture} to ONNX and runs it with ONNX Runtime {ort_version}; "
        "portable, slower than pytorch",
    )


def tensorrt_verdict(
    spec: ModelSpec,
    config: EngineConfig,
    trt_version: str | None,
    gpu: Gpu | None,
    cached_engine: bool = False,
) -> BackendProbe:
    def verdict(ok: bool, reason: str, priority: int = TENSORRT_PRIORITY) -> BackendProbe:
        return BackendProbe("tensorrt", ok, priority, reason)

    problem = exportable(spec)
    if problem:
        return verdict(False, problem)
    missing = []
    if trt_version is None:
        missing.append(f"tensorrt is not installed: {INSTALL_TENSORRT}")
    if config.device == "cpu":
        missing.append("device='cpu' was asked for, and TensorRT runs on NVIDIA GPUs only")
    elif gpu is None:
        missing.append(
            "no CUDA device is visible (torch.cuda.is_available() is False): TensorRT needs an "
            "NVIDIA GPU, its driver and a CUDA build of torch"
        )
    if config.dtype == "bfloat16":
        missing.append("dtype='bfloat16': the ONNX export is float16 or float32; pass one")
    if missing:
        return verdict(False, "; ".join(missing))
    where = f"{gpu.name} (sm{gpu.capability[0]}{gpu.capability[1]}), TensorRT {trt_version}"
    if cached_engine:
        return verdict(
            True, f"a built engine is cached for this model on {where}", TENSORRT_CACHED_PRIORITY
        )
    return verdict(True, f"builds a TensorRT engine from the ONNX export on {where}")


def installed_version(module: str) -> str | None:
    """The module's version when it imports, else None (a broken install counts as absent)."""
    try:
        mod = __import__(module)
    except Exception:  # an ImportError, or a wheel whose native libraries fail to load
        return None
    return str(getattr(mod, "__version__", "unknown"))


def visible_gpu(config: EngineConfig) -> Gpu | None:
    import torch

    if config.device == "cpu" or not torch.cuda.is_available():
        return None
    index = torch.device(config.device).index if config.device.startswith("cuda:") else 0
    index = index or 0
    return Gpu(torch.cuda.get_device_name(index), torch.cuda.get_device_capability(index))


def probe_backends(spec: ModelSpec, config: EngineConfig) -> list[BackendProbe]:
    trt_version = installed_version("tensorrt")
    gpu = visible_gpu(config)
    cached = False
    if trt_version and gpu and exportable(spec) is None:
        from .trt_runner import has_cached_engine

        cached = has_cached_engine(spec, config, gpu, trt_version)
    verdicts = [
        tensorrt_verdict(spec, config, trt_version, gpu, cached),
        onnxruntime_verdict(spec, installed_version("onnxruntime")),
    ]
    if config.quantization:  # weight-only quantization at load is the pytorch backend's
        why = f"quantization={config.quantization!r} is done by the pytorch backend only"
        verdicts = [replace(v, supported=False, reason=why) for v in verdicts]
    return verdicts
