"""Each rank's part of the hybrid models' own checkpoint tensors (`parallel.rank_tensor`).

A rank holds whole linear-attention key heads and the value heads each serves (Qwen3-Next
groups its projections by key head, so a rank's rows are one contiguous span; Qwen3.5 lays out
q, k and v whole, so each of them is cut), the matching channels of the convolution, `A_log`
and `dt_bias` of its value heads, and the columns of `out_proj` they feed (which ends in the
all-reduce). The shared expert is sliced like an MLP, by its own intermediate size.
"""

from __future__ import annotations

import torch

from .parallel import TensorParallel, _cut


def hybrid_part(tp: TensorParallel, pname: str, shard: int | None, read) -> torch.Tensor:
    a = tp.arch
    if ".shared_expert." in pname:
        size = a.moe.shared_expert_size  # type: ignore[union-attr]
        span = tp.span(size)
        if pname.endswith(".down_proj.weight"):
            return read((1, *span))
        if shard is not None:  # gate or up into gate_up_proj
            return read((0, *span))
        return read()
    la = a.linear
    assert la is not None
    keys, values = la.num_k_heads * la.head_k_dim, la.num_v_heads * la.head_v_dim
    if pname.endswith((".in_proj_qkvz.weight", ".in_proj_ba.weight")):
        whole = read()  # rows grouped by key head: this rank's key heads are one span
        return whole.narrow(0, *_start_length(tp.span(whole.shape[0])))
    if pname.endswith(".in_proj.weight"):  # Qwen3.5: qkv (0), z (1), b (2), a (3)
        if shard == 0:
            sizes = [keys, keys, values]
            return _cut(read(), 0, sizes, [tp.span(n) for n in sizes])
        return read((0, *tp.span([values, la.num_v_heads, la.num_v_heads][shard - 1])))
    if pname.endswith(".conv1d.weight"):  # channels: q, k, v
        sizes = [keys, keys, values]
        return _cut(read(), 0, sizes, [tp.span(n) for n in sizes])
    if pname.endswith((".A_log", ".dt_bias")):
        return read((0, *tp.span(la.num_v_heads)))
    if pname.endswith(".out_proj.weight"):
        return read((1, *tp.span(values)))
    return read()  # the gated norm's weight: per value-head dim, the same on every rank


def _start_length(span: tuple[int, int]) -> tuple[int, int]:
    return span[0], span[1] - span[0]
