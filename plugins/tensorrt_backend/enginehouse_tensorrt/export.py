"""Export a native model to ONNX: one graph for prefill and decode, KV cache in and out.

The graph (see `graph.py`) has dynamic batch, new-token and past lengths, so a prompt of any
length (past length 0) and a decode step (one new token) run through the same file. It is
exported in the precision it will run in: TensorRT networks are strongly typed, and ONNX
Runtime runs what the file says.

Exporter: the TorchScript one (`dynamo=False`). It runs offline with only torch and onnx, and
on this project's graph exported the tiny test models in about 1 s each; the dynamo exporter
needs the extra `onnxscript` package and traces through `torch.export`, which we did not need
since the forward is already plain, shape-generic torch. torch 2.9+ warns that the TorchScript
exporter is deprecated; the warning is silenced here, and `dynamo=True` is a one-line change
once it is the better tool.
"""

from __future__ import annotations

import json
import logging
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from enginehouse.plugin_api import InvalidModelError, ModelSpec, read_model_spec

log = logging.getLogger(__name__)

OPSET = 17
# Bumped whenever the graph's interface or numerics change, so cached exports are redone.
GRAPH_VERSION = 1
# No bfloat16: the TorchScript exporter declared the KV outputs of a bfloat16 graph as float32
# (torch 2.13; float16 graphs come out right), a mismatch a strongly typed TensorRT network
# rejects. float16 is the half type both TensorRT and ONNX Runtime run best anyway.
DTYPES = {"float32": torch.float32, "float16": torch.float16}


class UnsupportedExport(InvalidModelError):
    """The model's family has no exportable implementation; says which families do."""


# Native families whose layers the exported graph (graph.py: q/k/v heads, softmax top-k
# experts) does not cover: DeepSeek's latent attention and grouped routing.
NOT_EXPORTABLE = {"DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM"}


def exportable_families() -> list[str]:
    from enginehouse_pytorch.native.arch import FAMILIES

    return sorted(set(FAMILIES) - NOT_EXPORTABLE)


def check_exportable(spec: ModelSpec) -> None:
    """Raise `UnsupportedExport` naming the family and what is supported; cheap (no torch)."""
    from enginehouse_pytorch.native.arch import UnsupportedModel, arch_from_config

    if spec.is_vlm:
        raise UnsupportedExport(
            f"{spec.architecture} is a vision-language model: the exported graph takes token "
            "ids only, not image embeddings; run it on the pytorch backend"
        )
    if spec.config.get("quantization_config"):
        method = spec.config["quantization_config"].get("quant_method", "?")
        raise UnsupportedExport(
            f"a quantized checkpoint ({method}): the ONNX export reads float weights only; "
            "run it on the pytorch backend"
        )
    if spec.architecture in NOT_EXPORTABLE:
        raise UnsupportedExport(
            f"cannot export {spec.architecture} to ONNX: its latent attention (MLA) and grouped "
            f"expert routing are not in the exported graph; run it on the pytorch backend. "
            f"Exportable: {', '.join(exportable_families())}"
        )
    try:
        arch_from_config(spec.architecture, spec.config)
    except UnsupportedModel as e:
        raise UnsupportedExport(
            f"cannot export {spec.architecture} (model_type {spec.model_type!r}) to ONNX: {e}. "
            f"Exportable: {', '.join(exportable_families())}"
        ) from None
    if not any(f.endswith(".safetensors") for f in spec.weight_files):
        raise UnsupportedExport(
            f"{spec.path} has no *.safetensors weights; the exporter loads them through the "
            "native loader. Save the model with safetensors (save_pretrained does by default)"
        )


@dataclass(frozen=True)
class GraphInfo:
    """What a runner needs to know about an exported graph; written beside it as graph.json."""

    architecture: str
    dtype: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_positions: int
    graph_version: int = GRAPH_VERSION

    @classmethod
    def read(cls, folder: Path) -> GraphInfo:
        return cls(**json.loads((folder / "graph.json").read_text()))

    def write(self, folder: Path) -> None:
        (folder / "graph.json").write_text(json.dumps(asdict(self), indent=2) + "\n")


def load_native(spec: ModelSpec, dtype: torch.dtype, progress: bool = False):
    """The native `DecoderLM` on the CPU with its weights, unpacked (plain F.linear weights)."""
    from enginehouse_pytorch.native.arch import arch_from_config
    from enginehouse_pytorch.native.families import renamer
    from enginehouse_pytorch.native.model import DecoderLM
    from enginehouse_pytorch.native.weights import load_safetensors

    arch = arch_from_config(spec.architecture, spec.config)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        model = DecoderLM(arch)
    finally:
        torch.set_default_dtype(default)
    files = [spec.path / f for f in spec.weight_files if f.endswith(".safetensors")]
    # A family from a plugin names its tensors its own way (ModelFamily.weight_names).
    load_safetensors(model, files, progress, rename=renamer(spec.architecture))
    model.finish_loading(pack=False)
    return model.eval()


def export_onnx(
    model: str | Path | ModelSpec,
    out_dir: str | Path,
    dtype: str = "float32",
    progress: bool = False,
) -> Path:
    """Export `model` (a folder or its spec) to `out_dir/model.onnx`; returns that path.

    Raises `UnsupportedExport` for a family the exporter does not cover.
    """
    from .graph import ExportableDecoder, input_names, output_names

    spec = model if isinstance(model, ModelSpec) else read_model_spec(Path(model))
    check_exportable(spec)
    if dtype not in DTYPES:
        raise ValueError(f"cannot export in {dtype!r}; use one of {', '.join(DTYPES)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    native = load_native(spec, DTYPES[dtype], progress)
    arch = native.arch
    decoder = ExportableDecoder(native, arch.max_positions).eval()
    layers = arch.num_layers
    names_in, names_out = input_names(layers), output_names(layers)
    example = _example_inputs(arch, DTYPES[dtype])
    axes = {
        "input_ids": {0: "batch", 1: "new_tokens"},
        "attention_mask": {0: "batch", 1: "total_tokens"},
        "position_ids": {0: "batch", 1: "new_tokens"},
        "logits": {0: "batch", 1: "new_tokens"},
    }
    for name in names_in[3:]:
        axes[name] = {0: "batch", 2: "past_tokens"}
    for name in names_out[1:]:
        axes[name] = {0: "batch", 2: "total_tokens"}
    path = out / "model.onnx"
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation, tracer notes
        torch.onnx.export(
            decoder,
            example,
            str(path),
            input_names=names_in,
            output_names=names_out,
            dynamic_axes=axes,
            opset_version=OPSET,
            dynamo=False,
            do_constant_folding=True,
        )
    GraphInfo(
        architecture=spec.architecture,
        dtype=dtype,
        num_layers=layers,
        num_kv_heads=arch.num_kv_heads,
        head_dim=arch.head_dim,
        vocab_size=arch.vocab_size,
        max_positions=arch.max_positions,
    ).write(out)
    log.info("exported %s to %s", spec.path, path)
    return path


def _example_inputs(arch, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """A batch of 2 with 3 new tokens after 2 past ones: every dynamic axis above 1, so the
    tracer cannot specialise a shape to a constant."""
    b, s, p = 2, 3, 2
    ids = torch.ones(b, s, dtype=torch.long)
    mask = torch.ones(b, p + s, dtype=torch.long)
    pos = torch.arange(p, p + s).repeat(b, 1)
    past = [
        torch.zeros(b, arch.num_kv_heads, p, arch.head_dim, dtype=dtype)
        for _ in range(2 * arch.num_layers)
    ]
    return (ids, mask, pos, *past)
