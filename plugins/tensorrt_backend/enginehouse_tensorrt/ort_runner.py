"""The `onnxruntime` backend: the exported graph in an ONNX Runtime session.

The CPU execution provider everywhere; the CUDA one first where onnxruntime-gpu provides it
and the engine runs on a GPU. Inputs go in as numpy arrays (zero-copy views of CPU tensors), so
the runner keeps its KV cache in CPU memory either way: with the CUDA provider each call copies
the step's tensors to the GPU and back, which is correct but not fast; TensorRT is the GPU path.
"""

from __future__ import annotations

import torch

from enginehouse import EngineConfig, ModelSpec
from enginehouse.plugin_api import RunnerContext, use_all_cores

from .cache import ensure_onnx
from .export import GraphInfo
from .runner import GraphRunner

# ONNX Runtime takes numpy arrays, and numpy has no bfloat16.
DTYPES = {"auto": torch.float32, "float32": torch.float32, "float16": torch.float16}


def providers(device: str) -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    wanted = ["CPUExecutionProvider"]
    if device != "cpu" and "CUDAExecutionProvider" in available:
        wanted.insert(0, "CUDAExecutionProvider")
    return wanted


class OrtSession:
    def __init__(self, path: str, providers: list[str], threads: int) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads
        # ONNX Runtime's threads spin after each run by default. Between runs torch's own
        # threads do the runner's gathers and the sampler; with both teams spinning on the same
        # few cores, each waits for the other.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(path, options, providers=providers)
        self.outputs = [o.name for o in self.session.get_outputs()]

    def run(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        arrays = {k: v.contiguous().numpy() for k, v in feeds.items()}
        results = self.session.run(self.outputs, arrays)
        return {k: torch.from_numpy(v) for k, v in zip(self.outputs, results)}


class OrtRunner(GraphRunner):
    backend = "onnxruntime"

    def __init__(self, spec: ModelSpec, config: EngineConfig, context: RunnerContext) -> None:
        if config.dtype not in DTYPES:
            raise ValueError(
                f"the onnxruntime backend runs float32 or float16, not {config.dtype}; "
                "pass dtype='float32' (or 'float16')"
            )
        super().__init__(spec, config, context, torch.device("cpu"), DTYPES[config.dtype])
        self.providers = providers(config.device)

    def open_session(self, progress: bool) -> OrtSession:
        threads = use_all_cores()
        folder = ensure_onnx(self.spec, self.dtype_name, progress)
        self.info = GraphInfo.read(folder)
        return OrtSession(str(folder / "model.onnx"), self.providers, threads)
