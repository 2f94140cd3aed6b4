"""Tensor parallelism for the native decoder (Megatron's layout, as vLLM and LMDeploy use it).

Rank r of n holds:
- attention: heads [r*h/n, (r+1)*h/n) of q, and the KV heads those query heads read: a 1/n
  share when there are at least n KV heads, else the one head its query heads share
  (replicated on n/kvh ranks); o_proj takes the matching input columns;
- MLP: a 1/n slice of the intermediate size in gate/up (rows) and down (columns); the experts
  of a mixture likewise, each expert sliced (the router is replicated);
- embedding and LM head: a 1/n slice of the vocabulary (the last one padded with zero rows).
o_proj and down_proj end in one all-reduce each; the embedding lookup too (each rank fills
the rows of its slice); the LM head's slices are gathered into whole rows of logits on rank 0.

Each rank reads only its slice of each checkpoint tensor (safetensors' get_slice), so no rank
ever holds the whole model. A checkpoint that stores fused tensors (Phi-3's qkv_proj and
gate_up_proj, transformers 5's stacked experts) is read one whole tensor at a time and cut.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from .arch import Arch, LinearAttention, UnsupportedModel

Part = tuple[int, int, int]  # (dim, begin, end) of a checkpoint tensor


@dataclass(frozen=True)
class TensorParallel:
    """This rank's place: rank `rank` of `size`, for the model `arch`."""

    arch: Arch
    rank: int = 0
    size: int = 1
    # CPU ranks of one machine: collectives through shared memory (shm_collectives.py), for
    # the tensors that fit; torch.distributed for the rest.
    shm: Any = field(default=None, compare=False, repr=False)

    @property
    def active(self) -> bool:
        return self.size > 1

    # --- the local sizes --------------------------------------------------------------------

    @property
    def heads(self) -> int:
        return self.arch.num_heads // self.size

    @property
    def kv_heads(self) -> int:
        return max(1, self.arch.num_kv_heads // self.size)

    def intermediate(self, full: int) -> int:
        return full // self.size

    @property
    def linear(self) -> LinearAttention | None:
        """This rank's share of the linear-attention heads: whole key heads, each with the
        value heads it serves (the state slots hold only these)."""
        la = self.arch.linear
        if la is None:
            return None
        return replace(
            la, num_k_heads=la.num_k_heads // self.size, num_v_heads=la.num_v_heads // self.size
        )

    @property
    def vocab(self) -> int:
        """Rows of this rank's slice of the vocabulary (padded: the same on every rank)."""
        return math.ceil(self.arch.vocab_size / self.size)

    # --- which part of a checkpoint tensor ----------------------------------------------------

    def head_rows(self) -> tuple[int, int]:
        d, h = self.arch.head_dim, self.heads
        return self.rank * h * d, (self.rank + 1) * h * d

    def kv_rows(self) -> tuple[int, int]:
        a, d = self.arch, self.arch.head_dim
        if a.num_kv_heads >= self.size:
            first = self.rank * self.kv_heads
        else:  # fewer KV heads than ranks: query heads of this rank read this one head
            first = self.rank // (self.size // a.num_kv_heads)
        return first * d, (first + self.kv_heads) * d

    def span(self, full: int) -> tuple[int, int]:
        per = full // self.size
        return self.rank * per, (self.rank + 1) * per

    def vocab_rows(self) -> tuple[int, int]:
        """The real rows of this rank's vocabulary slice (fewer than `vocab` on the last)."""
        begin = self.rank * self.vocab
        return min(begin, self.arch.vocab_size), min(begin + self.vocab, self.arch.vocab_size)

    # --- collectives ------------------------------------------------------------------------

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if not self.active:
            return x
        if self.shm is not None and self.shm.fits(x):
            return self.shm.all_reduce(x)
        torch.distributed.all_reduce(x)
        return x

    def embed(self, weight: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """The embeddings of `ids` from a vocabulary-sliced table: each rank fills its rows."""
        if not self.active:
            return weight[ids]
        local = ids - self.rank * self.vocab
        outside = (local < 0) | (local >= self.vocab)
        x = weight[local.clamp(0, self.vocab - 1)]
        x[outside] = 0
        return self.all_reduce(x)

    def gather_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Whole rows of logits on rank 0, from every rank's vocabulary slice (padding cut
        off); the other ranks keep their own slice. Only rank 0 samples, so only rank 0
        needs whole rows: a gather, not an all-gather, moves 1/tp of the bytes."""
        if not self.active:
            return logits
        logits = logits.contiguous()
        if self.shm is not None and self.shm.fits(logits):
            whole = self.shm.gather_last_dim(logits)
            return logits if whole is None else whole[:, : self.arch.vocab_size]
        parts = [torch.empty_like(logits) for _ in range(self.size)] if self.rank == 0 else None
        torch.distributed.gather(logits, parts, dst=0)
        if parts is None:
            return logits
        return torch.cat(parts, dim=-1)[:, : self.arch.vocab_size]


def check_divisible(arch: Arch, tp: int) -> None:
    """`UnsupportedModel` naming what does not split over `tp` ranks."""
    problems = []
    if arch.num_heads % tp:
        problems.append(f"{arch.num_heads} attention heads")
    kvh = arch.num_kv_heads
    if kvh % tp and tp % kvh:
        problems.append(f"{kvh} KV heads (neither a multiple of tp nor a divisor of it)")
    moe = arch.moe
    dense = moe is None or (moe.layers and not all(moe.layers))
    if dense and arch.intermediate_size % tp:
        problems.append(f"intermediate size {arch.intermediate_size}")
    if moe is not None and moe.intermediate_size % tp:
        problems.append(f"expert intermediate size {moe.intermediate_size}")
    if arch.linear is not None and arch.linear.num_k_heads % tp:
        problems.append(f"{arch.linear.num_k_heads} linear-attention key heads")
    if moe is not None and moe.shared_expert_size % tp:
        problems.append(f"shared expert intermediate size {moe.shared_expert_size}")
    if problems:
        raise UnsupportedModel(f"cannot split over tp={tp} ranks: {', '.join(problems)}")


def tensor_reader(tensor: torch.Tensor):
    """`rank_tensor`'s reader over a tensor already in memory: all of it, or a (dim, begin,
    end) slice (the loader's readers read the same parts from a checkpoint file)."""

    def read(part: tuple[int, int, int] | None = None) -> torch.Tensor:
        if part is None:
            return tensor
        dim, begin, end = part
        return tensor.narrow(dim, begin, end - begin)

    return read


def rank_tensor(
    tp: TensorParallel, pname: str, shard: int | None, expert: int | None, read
) -> torch.Tensor | None:
    """This rank's part of one checkpoint tensor (`read(part)` reads it, or a slice of it);
    None where the rank holds zeros (the bias of a row-parallel projection, added once)."""
    a = tp.arch
    if a.family == "gpt_oss":
        from .gpt_oss import rank_part

        mine, part = rank_part(tp, pname, read)
        if mine:
            return part
    if ".linear_attn." in pname or ".shared_expert." in pname:
        from .hybrid_parallel import hybrid_part  # Qwen3-Next's and Qwen3.5's own layers

        return hybrid_part(tp, pname, shard, read)
    if pname.endswith((".o_proj.bias", ".down_proj.bias")):
        return read() if tp.rank == 0 else None
    if a.mla is not None and (part := deepseek_part(tp, pname, shard, read)) is not None:
        return part
    if ".qkv_proj." in pname:
        parts = [tp.head_rows(), tp.kv_rows(), tp.kv_rows()]
        if a.attn_output_gate:  # each head's query and gate rows side by side: twice the rows
            parts[0] = (2 * parts[0][0], 2 * parts[0][1])
        if shard is not None:
            return read((0, *parts[shard]))
        d = a.head_dim
        return _cut(read(), 0, [a.num_heads * d, a.num_kv_heads * d, a.num_kv_heads * d], parts)
    if ".gate_up_proj." in pname:
        rows = tp.span(a.intermediate_size)
        if shard is not None:
            return read((0, *rows))
        return _cut(read(), 0, [a.intermediate_size] * 2, [rows, rows])
    if pname.endswith(".o_proj.weight"):
        return read((1, *tp.head_rows()))
    if pname.endswith(".down_proj.weight"):
        return read((1, *tp.span(a.intermediate_size)))
    if pname.endswith(".mlp.w13"):
        rows = tp.span(a.moe.intermediate_size)  # type: ignore[union-attr]
        if expert is not None:
            return read((0, *rows))
        return _cut(read(), 1, [a.moe.intermediate_size] * 2, [rows, rows])  # type: ignore
    if pname.endswith(".mlp.w2"):
        cols = tp.span(a.moe.intermediate_size)  # type: ignore[union-attr]
        return read((1 if expert is not None else 2, *cols))
    if pname in ("model.embed_tokens.weight", "lm_head.weight"):
        return read((0, *tp.vocab_rows()))
    return read()


def _cut(
    tensor: torch.Tensor, dim: int, sizes: list[int], parts: list[tuple[int, int]]
) -> torch.Tensor:
    """From a fused checkpoint tensor (pieces of `sizes` along `dim`), each piece's part."""
    pieces = tensor.split(sizes, dim=dim)
    return torch.cat([p.narrow(dim, b, e - b) for p, (b, e) in zip(pieces, parts)], dim=dim)


def deepseek_part(tp: TensorParallel, pname: str, shard: int | None, read) -> torch.Tensor | None:
    """This rank's part of DeepSeek's own tensors (MLA's per-head projections, the shared
    experts), or None for a tensor the general rules cut (or that every rank reads whole: the
    latent projection and norms, the router)."""
    a, mla = tp.arch, tp.arch.mla
    assert mla is not None
    h = tp.heads
    if pname.endswith((".self_attn.q_proj.weight", ".self_attn.q_b_proj.weight")):
        per = mla.qk_head_dim
    elif pname.endswith(".self_attn.kv_b_proj.weight"):
        per = mla.qk_nope_head_dim + mla.v_head_dim
    elif pname.endswith(".self_attn.o_proj.weight"):
        v = mla.v_head_dim
        return read((1, tp.rank * h * v, (tp.rank + 1) * h * v))
    elif ".shared_experts.gate_up_proj." in pname and a.moe is not None:
        full = a.moe.shared_intermediate_size
        rows = tp.span(full)
        if shard is not None:
            return read((0, *rows))
        return _cut(read(), 0, [full] * 2, [rows, rows])
    elif pname.endswith(".shared_experts.down_proj.weight") and a.moe is not None:
        return read((1, *tp.span(a.moe.shared_intermediate_size)))
    else:
        return None
    return read((0, tp.rank * h * per, (tp.rank + 1) * h * per))
