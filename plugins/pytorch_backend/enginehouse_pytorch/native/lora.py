"""Batched LoRA for the native decoder: one forward serves rows of many adapters and the base.

The idea is punica's and S-LoRA's (the code is ours): every adapted projection keeps the
adapters' A and B matrices stacked in a fixed number of resident slots, `[slots, R, in]` and
`[slots, out, R]`, so their shapes never change as adapters come and go (slot 0 stays zero:
the base model). A step gives each packed row a slot; the projection computes its base product
for all rows, then, for each slot present in the step, the rows of that slot times A, times B
(two small products), added to those rows. Rows are grouped by slot once per step (`LoraRows`)
and the grouping is shared by every layer.

Fused projections (qkv_proj, gate_up_proj) hold one block of R ranks per checkpoint
projection: q's adapter fills the first block of A and the q rows of B, k's the second
and the k rows, and so on; an adapter stored fused (Phi-3's qkv_proj) fills the first block
and all rows. Missing projections stay zero, ranks below `max_lora_rank` are zero-padded, and
the scale is folded into B, so the sum is exactly W x + scale * B A x for each checkpoint
projection.

Tensor parallel: column-parallel projections (qkv, gate_up) keep this rank's rows of B;
row-parallel ones (o, down) keep this rank's columns of A, so their LoRA output is a partial
sum that the layer's all-reduce completes, like the base product's.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from enginehouse.plugin_api import AdapterError, LoraAdapter

from .layers import GatedMLP
from .parallel import TensorParallel, rank_tensor, tensor_reader

# A checkpoint projection -> (our fused projection under the layer, its block in it or None
# for a projection stored whole).
PLACES = {
    "q_proj": ("self_attn.qkv_proj", 0),
    "k_proj": ("self_attn.qkv_proj", 1),
    "v_proj": ("self_attn.qkv_proj", 2),
    "qkv_proj": ("self_attn.qkv_proj", None),
    "o_proj": ("self_attn.o_proj", None),
    "gate_proj": ("mlp.gate_up_proj", 0),
    "up_proj": ("mlp.gate_up_proj", 1),
    "gate_up_proj": ("mlp.gate_up_proj", None),
    "down_proj": ("mlp.down_proj", None),
}
ROW_PARALLEL = ("self_attn.o_proj", "mlp.down_proj")


@dataclass
class LoraRows:
    """This step's runs of rows of one adapter: (slot, first row, end). The runner packs the
    rows of one adapter together (decodes first, then prefills, each ordered by adapter), so
    each run is a slice: no gather, no scatter, two products and an in-place add per run."""

    groups: list[tuple[int, int, int]] = field(default_factory=list)

    def set(self, slots: list[int]) -> None:
        """From each packed row's slot (0 = the base model, no LoRA)."""
        self.groups = []
        start = 0
        for i in range(1, len(slots) + 1):
            if i == len(slots) or slots[i] != slots[start]:
                if slots[start]:
                    self.groups.append((slots[start], start, i))
                start = i

    def clear(self) -> None:
        self.groups = []


class LoraLinear(nn.Module):
    """A projection plus the LoRA of the adapters resident in its slots."""

    def __init__(
        self,
        base: nn.Module,
        in_features: int,
        out_features: int,
        blocks: int,
        slots: int,
        max_rank: int,
        rows: LoraRows,
        like: torch.Tensor,
    ) -> None:
        super().__init__()
        self.base = base
        self.rows = rows
        self.max_rank = max_rank
        self.shards = getattr(base, "shards", [0, out_features])  # the fused pieces' rows
        opts = {"dtype": like.dtype, "device": like.device}
        self.lora_a = torch.zeros(slots, blocks * max_rank, in_features, **opts)
        self.lora_b = torch.zeros(slots, out_features, blocks * max_rank, **opts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        groups = self.rows.groups
        if groups and x.is_cuda and (kernels := _triton_kernels()) is not None:
            kernels.lora_add(y, x, self.lora_a, self.lora_b, groups)  # one launch per product
            return y
        for slot, begin, end in groups:
            y[begin:end].addmm_(x[begin:end] @ self.lora_a[slot].T, self.lora_b[slot].T)
        return y

    def fill(self, slot: int, block: int | None, a: torch.Tensor, b: torch.Tensor) -> None:
        """One checkpoint projection's A [r, in] and this rank's B [rows, r] (scaled) into
        `slot`: its block of ranks, and its rows of a fused output (all rows for `None`)."""
        r, first = a.shape[0], (block or 0) * self.max_rank
        begin, end = (0, self.shards[-1]) if block is None else self.shards[block : block + 2]
        self.lora_a[slot, first : first + r] = a.to(self.lora_a.dtype)
        self.lora_b[slot, begin:end, first : first + r] = b.to(self.lora_b.dtype)

    def clear(self, slot: int) -> None:
        self.lora_a[slot].zero_()
        self.lora_b[slot].zero_()


class LoraModel:
    """The LoRA slots of one `DecoderLM`: wraps its projections once, then loads adapters."""

    def __init__(self, model: nn.Module, max_loras: int, max_rank: int) -> None:
        self.model = model
        self.tp: TensorParallel = model.tp
        self.max_loras = max_loras
        self.max_rank = max_rank
        self.rows = LoraRows()
        self.layers: list[dict[str, LoraLinear]] = []
        like = model.model.norm.weight
        arch, tp = model.arch, model.tp
        d = arch.head_dim
        for layer in model.model.layers:
            attn, wrapped = layer.self_attn, {}
            qkv_out = (tp.heads + 2 * tp.kv_heads) * d
            shapes = {
                "self_attn.qkv_proj": (attn, "qkv_proj", arch.hidden_size, qkv_out, 3),
                "self_attn.o_proj": (attn, "o_proj", tp.heads * d, arch.hidden_size, 1),
            }
            if isinstance(layer.mlp, GatedMLP):
                inter = layer.mlp.intermediate
                shapes["mlp.gate_up_proj"] = (
                    layer.mlp,
                    "gate_up_proj",
                    arch.hidden_size,
                    2 * inter,
                    2,
                )
                shapes["mlp.down_proj"] = (layer.mlp, "down_proj", inter, arch.hidden_size, 1)
            for path, (owner, attr, n_in, n_out, blocks) in shapes.items():
                lora = LoraLinear(
                    getattr(owner, attr),
                    n_in,
                    n_out,
                    blocks,
                    max_loras + 1,
                    max_rank,
                    self.rows,
                    like,
                )
                setattr(owner, attr, lora)
                wrapped[path] = lora
            self.layers.append(wrapped)

    @property
    def bytes_per_slot(self) -> int:
        return sum(
            (m.lora_a[0].nbytes + m.lora_b[0].nbytes)
            for layer in self.layers
            for m in layer.values()
        )

    def load(self, slot: int, adapter: LoraAdapter) -> None:
        """Put `adapter` in `slot` (1..max_loras), replacing what was there."""
        if not 1 <= slot <= self.max_loras:
            raise AdapterError(f"adapter slot {slot} is outside 1..max_loras ({self.max_loras})")
        if adapter.rank > self.max_rank:
            raise AdapterError(
                f"adapter {adapter.name!r} has rank {adapter.rank}, above max_lora_rank "
                f"{self.max_rank}"
            )
        self.unload(slot)
        for m in adapter.modules:
            path, block = PLACES[m.name]
            lora = self.layers[m.layer].get(path)
            if lora is None:
                raise AdapterError(
                    f"adapter {adapter.name!r} adapts layer {m.layer} {m.name}, but that "
                    "layer's MLP is a mixture of experts: LoRA on experts is not supported"
                )
            a, b = self._shard(m.layer, path, block, m.a, m.b * adapter.scale)
            lora.fill(slot, block, a, b)

    def _shard(self, layer: int, path: str, block: int | None, a, b):
        """This rank's part of A and B (all of them at tp=1)."""
        if not self.tp.active:
            return a, b
        pname = f"model.layers.{layer}.{path}.weight"
        if path in ROW_PARALLEL:  # this rank's input columns
            return rank_tensor(self.tp, pname, None, None, tensor_reader(a)), b
        return a, rank_tensor(self.tp, pname, block, None, tensor_reader(b))

    def unload(self, slot: int) -> None:
        for layer in self.layers:
            for lora in layer.values():
                lora.clear(slot)

    @contextlib.contextmanager
    def step(self, slots: list[int]) -> Iterator[bool]:
        """For one forward: each packed row's slot. Yields whether any row is adapted; while
        one is, the model's one-call C++ decode step (which knows no LoRA) is bypassed."""
        if not any(slots):
            self.rows.clear()
            yield False
            return
        self.rows.set(slots)
        one_call, self.model.step = self.model.step, None
        try:
            yield True
        finally:
            self.model.step = one_call
            self.rows.clear()


@functools.cache
def _triton_kernels():
    """The Triton kernels (lora_triton.py) where triton imports; None otherwise."""
    try:
        from . import lora_triton
    except ImportError:
        return None
    return lora_triton
