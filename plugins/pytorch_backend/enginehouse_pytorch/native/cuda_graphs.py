"""CUDA graphs of decode steps: the whole forward of a decode-only step, replayed in one call.

A decode step of a small model is mostly kernel launches and Python; a graph replays the
recorded launches without either. One graph per padded batch size (1, 2, 4, 8, 16, 24, ...,
max_batch_size), captured largest first into one shared memory pool, all reading one static
int64 buffer `inputs` [max size, 4 + max blocks] with the columns

    token id | KV slot | position | context length | block table ...

which `run` fills (one host-to-device copy) before the replay. Inside the graph the rope rows
are gathered from the runner's tables by position, and the paged Triton kernel reads the block
table and context lengths straight from the buffer. Rows past the real batch are padding:
context length 0 (the kernel writes zeros for them) and their K/V go to the runner's scratch
slot, never to the null slot, which must stay zero.

Steps that are not all single-token chunks, or that are larger than the largest graph, return
None from `run` and the runner executes them eagerly. Mixture-of-experts models are not captured:
their routing reads expert counts back to the host. Where capture fails, graphs are switched off
with a warning and everything runs eagerly.

Off a GPU (in the tests) `capture` records nothing and `run` calls the same forward eagerly on
the same buffers, so the packing, padding and row order are checked without CUDA.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch

from enginehouse import ScheduledBatch
from enginehouse.plugin_api import kv_slot

from .attention import StepMeta

log = logging.getLogger(__name__)

TOKEN, SLOT, POSITION, LENGTH, TABLE = 0, 1, 2, 3, 4  # columns of `inputs`


def graph_batch_sizes(max_batch_size: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 8 up to max_batch_size, and max_batch_size itself."""
    sizes = [s for s in (1, 2, 4, 8) if s <= max_batch_size]
    sizes += list(range(16, max_batch_size + 1, 8))
    if sizes[-1] != max_batch_size:
        sizes.append(max_batch_size)
    return sizes


class DecodeGraphs:
    def __init__(self, runner: Any, sizes: list[int] | None = None) -> None:
        self.runner = runner
        self.sizes = sorted(sizes or graph_batch_sizes(runner.config.max_batch_size))
        self.max_size = self.sizes[-1]
        self.width = math.ceil(max(runner.context, 1) / runner.block_size)  # block table columns
        self.inputs = torch.zeros(
            self.max_size, TABLE + self.width, dtype=torch.long, device=runner.device
        )
        self.graphs: dict[int, torch.cuda.CUDAGraph | None] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.enabled = False
        self.replays = 0  # decode steps served by `run`, for checks and benchmarks

    def _forward(self, n: int) -> torch.Tensor:
        """The model on the first n rows of `inputs`: what a graph records and replays."""
        r = self.runner
        x = self.inputs[:n]
        pos = x[:, POSITION]
        meta = StepMeta(
            num_decode=n,
            slots=x[:, SLOT],
            cos=r.cos[pos][:, None],
            sin=r.sin[pos][:, None],
            block_tables=x[:, TABLE:],
            context_lens=x[:, LENGTH],
            block_size=r.block_size,
        )
        return r.model.logits(r.model(x[:, TOKEN], meta, r.kv))

    @torch.inference_mode()
    def capture(self) -> None:
        r = self.runner
        if r.arch.moe is not None:
            log.info("no CUDA graphs for a mixture of experts (its routing syncs with the host)")
            return
        self.inputs[:, SLOT] = r.scratch_slot
        self.inputs[:, LENGTH] = 0
        if r.device.type != "cuda":
            self.graphs = dict.fromkeys(self.sizes)  # eager stand-ins, see the docstring
            self.enabled = True
            return
        try:
            pool = None
            for n in reversed(self.sizes):  # largest first: smaller ones reuse its memory
                self._forward(n)  # warm-up: compiles the Triton kernels, sets up cuBLAS
                torch.cuda.synchronize(r.device)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self.outputs[n] = self._forward(n)
                pool = graph.pool() if pool is None else pool
                self.graphs[n] = graph
            torch.cuda.synchronize(r.device)
        except Exception as e:  # noqa: BLE001 - any failure: run eagerly, never break the engine
            log.warning("CUDA graph capture failed, decoding eagerly: %s: %s", type(e).__name__, e)
            self.graphs, self.outputs = {}, {}
            return
        self.enabled = True

    def run(self, batch: ScheduledBatch) -> torch.Tensor | None:
        """Float32 logits of a decode-only step, one row per chunk with logits_at (in chunk
        order); None when the step is not one the graphs cover."""
        chunks = batch.chunks
        k = len(chunks)
        if not self.enabled or not 0 < k <= self.max_size:
            return None
        if any(
            not c.is_decode or c.embeds is not None or c.rope_positions is not None for c in chunks
        ):
            return None
        width = max(len(c.block_table) for c in chunks)
        if width > self.width:
            return None
        r = self.runner
        bs = r.block_size
        n = next(s for s in self.sizes if s >= k)
        rows = []
        for c in chunks:
            p = c.start_pos
            table = list(c.block_table)
            slot = kv_slot(table, p, bs)
            rows.append([c.token_ids[0], slot, p, p + 1, *table] + [0] * (width - len(table)))
        pad = [0, r.scratch_slot, 0, 0] + [0] * width
        rows.extend([pad] * (n - k))
        self.inputs[:n, : TABLE + width].copy_(torch.tensor(rows, dtype=torch.long))
        graph = self.graphs[n]
        if graph is None:
            logits = self._forward(n)
        else:
            graph.replay()
            logits = self.outputs[n]  # reused by the next replay: copied out below
        self.replays += 1
        wanted = [i for i, c in enumerate(chunks) if c.logits_at]
        if len(wanted) == k:
            return logits[:k].to(torch.float32, copy=True)
        index = torch.tensor(wanted, dtype=torch.long, device=logits.device)
        return logits.index_select(0, index).float()
