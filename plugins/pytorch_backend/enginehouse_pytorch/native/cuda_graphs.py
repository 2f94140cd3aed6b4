"""CUDA graphs of decode and verify steps: the whole forward of such a step, replayed in one call.

A decode step of a small model is mostly kernel launches and Python; a graph replays the
recorded launches without either (the head runs after the replay, on the rows whose logits
were asked for). Graphs are captured per shape: a padded number of sequences
(1, 2, 4, 8, 16, 24, ..., max_batch_size) times a number of query rows per sequence, 1 for
decode steps and, with speculative decoding, K + 1 for verify steps (a sequence's last token
and its K proposals; sequences proposing fewer, or none, fill the rest of their rows with
padding). All are captured largest first into one shared memory pool, each shape reading
static int64 buffers (`StaticInputs`):

    rows [sequences * queries, 2 + groups]:  token id | position | KV slot in each group
    seqs [sequences, 3 + groups * width]:    context length | first row | query count |
                                             block table of each group

which `run` fills (two host-to-device copies) before the replay. Inside the graph the rope rows
are gathered from the runner's tables (one per group: Gemma 3's local and global layers differ)
by position, and the paged Triton kernel reads block tables, context lengths and, for verify
steps, each sequence's queries (`Queries`) straight from the buffers; each KV group (sliding
and full layers of Gemma 2/3, Qwen2 with sliding layers) reads its own table and stores into
its own slots. Padding rows write their K/V to each group's scratch slot, never to a null slot
(which must stay zero); padding sequences have context length 0 and no queries (their rows come
out zeros).

Steps with prefill chunks, images, multimodal positions or LoRA adapters, or larger than the
largest graph, return None from `run` and the runner executes them eagerly. Mixture-of-experts
models are not captured (their routing reads expert counts back to the host: gpt-oss, Mixtral,
DeepSeek). Where capture fails, graphs are switched off with a warning and everything runs
eagerly.

Off a GPU (in the tests) `capture` records nothing and `run` calls the same forward eagerly on
the same buffers, so the packing, padding and row order are checked without CUDA.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from enginehouse import ScheduledBatch, SeqChunk
from enginehouse.plugin_api import kv_slot

from .attention import Queries, StepMeta

log = logging.getLogger(__name__)

TOKEN, POSITION, SLOT = 0, 1, 2  # columns of `rows` (SLOT + g: group g's slot)
LENGTH, START, COUNT, TABLE = 0, 1, 2, 3  # columns of `seqs` (TABLE + g * width: group g's)


def graph_batch_sizes(max_batch_size: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 8 up to max_batch_size, and max_batch_size itself."""
    sizes = [s for s in (1, 2, 4, 8) if s <= max_batch_size]
    sizes += list(range(16, max_batch_size + 1, 8))
    if sizes[-1] != max_batch_size:
        sizes.append(max_batch_size)
    return sizes


def query_rows(config: Any) -> list[int]:
    """Query rows per sequence of the captured shapes: 1 (decode), and K + 1 (verify) where
    the engine speculates K tokens."""
    spec = getattr(config, "speculative_config", None)
    k = spec.k if spec is not None else 0
    return [1, k + 1] if k else [1]


def step_queries(chunks: tuple[SeqChunk, ...]) -> int | None:
    """The most query rows any chunk of a step needs (1: a decode step), or None where the
    step has chunks no graph takes (prompts, images, multimodal positions, adapters)."""
    most = 1
    for c in chunks:
        if not (c.is_decode or c.verify) or c.embeds is not None:
            return None
        if c.rope_positions is not None or c.adapter:
            return None
        most = max(most, len(c.token_ids))
    return most


@dataclass
class StaticInputs:
    """The static buffers one number of query rows per sequence (`queries`) reads."""

    queries: int
    width: int  # block table columns per group
    groups: int
    rows: torch.Tensor  # [max sequences * queries, 2 + groups] int64
    seqs: torch.Tensor  # [max sequences, 3 + groups * width] int64

    @classmethod
    def make(cls, seqs: int, queries: int, groups: int, width: int, device) -> StaticInputs:
        rows = torch.zeros(seqs * queries, SLOT + groups, dtype=torch.long, device=device)
        table = torch.zeros(seqs, TABLE + groups * width, dtype=torch.long, device=device)
        return cls(queries, width, groups, rows, table)

    def host_rows(self, chunks: tuple[SeqChunk, ...], n: int, block_size: int, scratch: list[int]):
        """The first n sequences' buffers on the host: the chunks' rows, then padding (NumPy
        slices, not a tensor op per chunk: this runs before every replay)."""
        q, groups, width = self.queries, self.groups, self.width
        rows = np.zeros((n * q, SLOT + groups), dtype=np.int64)
        rows[:, SLOT:] = scratch  # padding rows' K/V go to each group's scratch slot
        seqs = np.zeros((n, TABLE + groups * width), dtype=np.int64)
        seqs[:, START] = np.arange(n) * q
        for i, c in enumerate(chunks):
            count, at, start = len(c.token_ids), i * q, c.start_pos
            rows[at : at + count, TOKEN] = c.token_ids
            rows[at : at + count, POSITION] = range(start, start + count)
            seqs[i, LENGTH], seqs[i, COUNT] = start + count, count
            for g in range(groups):
                table = c.table(g)
                slots = [kv_slot(table, p, block_size) for p in range(start, start + count)]
                rows[at : at + count, SLOT + g] = slots
                seqs[i, TABLE + g * width : TABLE + g * width + len(table)] = table
        return torch.from_numpy(rows), torch.from_numpy(seqs)

    def fill(self, chunks: tuple[SeqChunk, ...], n: int, block_size: int, scratch: list[int]):
        rows, seqs = self.host_rows(chunks, n, block_size, scratch)
        self.rows[: len(rows)].copy_(rows)
        self.seqs[:n].copy_(seqs)

    def wanted_rows(self, chunks: tuple[SeqChunk, ...]) -> list[int]:
        """The rows whose logits the engine asked for, in chunk order."""
        return [i * self.queries + j for i, c in enumerate(chunks) for j in c.logits_at]


class DecodeGraphs:
    def __init__(self, runner: Any, sizes: list[int] | None = None) -> None:
        self.runner = runner
        self.sizes = sorted(sizes or graph_batch_sizes(runner.config.max_batch_size))
        self.max_size = self.sizes[-1]
        self.width = math.ceil(max(runner.context, 1) / runner.block_size)  # block table columns
        groups = len(runner.caches)
        self.scratch = [c.scratch_slot for c in runner.caches]
        self.inputs = {
            q: StaticInputs.make(self.max_size, q, groups, self.width, runner.device)
            for q in query_rows(runner.config)
        }
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph | None] = {}
        self.outputs: dict[tuple[int, int], torch.Tensor] = {}
        self.enabled = False
        self.replays = 0  # steps served by `run`, for checks and benchmarks
        self.verify_replays = 0  # of which verify steps (more than one query row a sequence)

    def _meta(self, n: int, inputs: StaticInputs) -> StepMeta:
        """The step's metadata over the first n sequences of `inputs`, one per KV group."""
        r, q, width = self.runner, inputs.queries, inputs.width
        rows, seqs = inputs.rows[: n * q], inputs.seqs[:n]
        pos = rows[:, POSITION]
        queries = None if q == 1 else Queries(seqs[:, START], seqs[:, COUNT], q)
        metas = []
        for g in range(inputs.groups):
            same = g > 0 and r.ropes[g] is r.ropes[0]
            cos, sin = r.ropes[0 if same else g]
            metas.append(
                StepMeta(
                    num_decode=n * q,
                    slots=rows[:, SLOT + g],
                    cos=cos[pos][:, None],
                    sin=sin[pos][:, None],
                    block_tables=seqs[:, TABLE + g * width : TABLE + (g + 1) * width],
                    context_lens=seqs[:, LENGTH],
                    block_size=r.block_size,
                    queries=queries,
                )
            )
        if len(metas) > 1:
            metas[0].by_group = metas
        return metas[0]

    def _forward(self, n: int, q: int) -> torch.Tensor:
        """The model on the first n sequences of the buffers for q query rows each, up to the
        final norm: what a graph records and replays. The head runs after the replay, on the
        rows whose logits were asked for only: a graph's output stays alive between replays,
        and hidden states are a small fraction of logits (4096 against 128k values a row)."""
        r, inputs = self.runner, self.inputs[q]
        meta = self._meta(n, inputs)
        return r.model(inputs.rows[: n * q, TOKEN], meta, r.kv)

    def shapes(self) -> list[tuple[int, int]]:
        """(sequences, query rows) of every graph, largest first (smaller ones reuse its pool)."""
        return sorted(((n, q) for q in self.inputs for n in self.sizes), key=lambda s: -s[0] * s[1])

    @torch.inference_mode()
    def capture(self) -> None:
        r = self.runner
        if r.arch.moe is not None:
            log.info("no CUDA graphs for a mixture of experts (its routing syncs with the host)")
            return
        for inputs in self.inputs.values():  # padding everywhere until a step fills them
            inputs.rows[:, SLOT:] = torch.tensor(self.scratch, device=inputs.rows.device)
            inputs.seqs[:, START] = torch.arange(self.max_size) * inputs.queries
        if r.device.type != "cuda":
            self.graphs = dict.fromkeys(self.shapes())  # eager stand-ins, see the docstring
            self.enabled = True
            return
        try:
            pool = None
            for n, q in self.shapes():
                self._forward(n, q)  # warm-up: compiles the Triton kernels, sets up cuBLAS
                torch.cuda.synchronize(r.device)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self.outputs[n, q] = self._forward(n, q)
                pool = graph.pool() if pool is None else pool
                self.graphs[n, q] = graph
            torch.cuda.synchronize(r.device)
        except Exception as e:  # noqa: BLE001 - any failure: run eagerly, never break the engine
            log.warning("CUDA graph capture failed, decoding eagerly: %s: %s", type(e).__name__, e)
            self.graphs, self.outputs = {}, {}
            return
        self.enabled = True

    def shape_for(self, batch: ScheduledBatch) -> tuple[int, int] | None:
        """The graph (padded sequences, query rows) that runs this step, or None."""
        chunks = batch.chunks
        k = len(chunks)
        if not self.enabled or not 0 < k <= self.max_size:
            return None
        most = step_queries(chunks)
        if most is None:
            return None
        q = min((q for q in self.inputs if q >= most), default=None)
        if q is None:
            return None
        groups = len(self.scratch)
        if any(len(c.table(g)) > self.width for c in chunks for g in range(groups)):
            return None
        return next(s for s in self.sizes if s >= k), q

    def run(self, batch: ScheduledBatch) -> torch.Tensor | None:
        """Float32 logits of a decode or verify step, one row per position in each chunk's
        logits_at (in chunk order); None when the step is not one the graphs cover."""
        shape = self.shape_for(batch)
        if shape is None:
            return None
        n, q = shape
        inputs = self.inputs[q]
        inputs.fill(batch.chunks, n, self.runner.block_size, self.scratch)
        graph = self.graphs[n, q]
        if graph is None:
            hidden = self._forward(n, q)
        else:
            graph.replay()
            hidden = self.outputs[n, q]  # reused by the next replay: the head reads it now
        self.replays += 1
        self.verify_replays += q > 1
        wanted = inputs.wanted_rows(batch.chunks)
        if wanted == list(range(len(wanted))):
            rows = hidden[: len(wanted)]
        else:
            rows = hidden.index_select(0, torch.tensor(wanted, device=hidden.device))
        return self.runner.model.logits(rows).float()
