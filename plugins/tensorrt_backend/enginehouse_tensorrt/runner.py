"""One runner for both compiled backends: the exported graph behind the core's runner contract.

KV layout: a contiguous cache per sequence, as the transformers runner keeps. The runner states
a block size equal to the context length, so the block manager gives each sequence one block
whose id is the sequence's slot in `[slots, kv_heads, context, head_dim]` tensors per layer.
Prefix caching is off (a contiguous cache cannot share blocks); a chunk starting at position 0
simply overwrites its slot, which is also how a preempted sequence's recompute resets it.

A step is split so that padding stays small:
- single-token chunks (decodes) run together as one batch; their pasts are padded to the longest
  and the attention mask hides the padding (the graph masks by positions, see `graph.py`);
- each longer chunk (a prompt, or a piece of one) runs alone, batch 1, with no padding at all.
Mixing a 500-token prefill with 16 decodes in one padded batch would compute 16 x 500 rows.

The graph is the only thing that differs between backends: `session` runs it on a dict of
named tensors and returns the outputs by name (`OrtSession`, `TrtSession`).
"""

from __future__ import annotations

from typing import Protocol

import torch

from enginehouse import EngineConfig, KVSpec, ModelSpec, ScheduledBatch, SeqChunk
from enginehouse.plugin_api import RunnerContext, kv_bytes_per_token

from .export import GraphInfo
from .graph import kv_names


class GraphSession(Protocol):
    def run(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Run the graph once: inputs by name in, every output by name out."""


class GraphRunner:
    """The runner contract over a `GraphSession`; subclasses say how to open the session."""

    backend = "graph"

    def __init__(
        self,
        spec: ModelSpec,
        config: EngineConfig,
        context: RunnerContext,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        from enginehouse_pytorch.native.arch import arch_from_config

        self.spec = spec
        self.config = config
        self.device = device
        self.dtype = dtype
        self.context = context = context.session_len
        arch = arch_from_config(spec.architecture, spec.config)
        if context > arch.max_positions:
            # The graph's rope table ends at the model's context: positions past it do not exist.
            raise ValueError(
                f"session_len {context} is longer than the model's context "
                f"({arch.max_positions}); the exported graph covers only that. Lower session_len"
            )
        self.layers, self.kv_heads, self.head_dim = (
            arch.num_layers,
            arch.num_kv_heads,
            arch.head_dim,
        )
        per_token = kv_bytes_per_token(self.layers, self.kv_heads, self.head_dim, dtype)
        self.kv_spec = KVSpec(
            block_size=context,
            bytes_per_block=per_token * context,
            dtype=dtype,
            device=device,
            prefix_caching=False,
        )
        self.past_names = kv_names(self.layers, "past_key_values")
        self.present_names = kv_names(self.layers, "present")
        self.session: GraphSession | None = None
        self.info: GraphInfo | None = None
        self.kv: list[torch.Tensor] = []  # per layer key, value, ... : [slots, kvh, ctx, d]

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    def open_session(self, progress: bool) -> GraphSession:
        raise NotImplementedError

    def load(self, progress: bool = True) -> None:
        self.session = self.open_session(progress)

    def allocate_kv(self, num_blocks: int) -> None:
        shape = (num_blocks, self.kv_heads, self.context, self.head_dim)
        # Zeros, not empty: a decode batch pads each row's past with whatever its slot holds
        # beyond its length. The mask zeroes those keys' weights, but 0 * NaN is NaN, so the
        # padding must be finite; what a sequence wrote there before always is. (On the CPU,
        # zeros of this size come from calloc and cost no time until touched.)
        self.kv = [
            torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.past_names
        ]

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> torch.Tensor:
        rows: dict[int, torch.Tensor] = {}
        decodes = [c for c in batch.chunks if c.is_decode]
        if decodes:
            logits = self._run(decodes)  # [B, 1, vocab]
            for b, c in enumerate(decodes):
                rows[c.seq_id] = logits[b, list(c.logits_at)]
        for c in batch.chunks:
            if not c.is_decode:
                rows[c.seq_id] = self._run([c])[0, list(c.logits_at)]
        return torch.cat([rows[c.seq_id] for c in batch.chunks]).float()

    def _run(self, chunks: list[SeqChunk]) -> torch.Tensor:
        """One graph call over `chunks` (equal lengths, or one chunk); stores their new KV."""
        past = max(c.start_pos for c in chunks)
        new = max(len(c.token_ids) for c in chunks)
        b = len(chunks)
        ids = torch.zeros(b, new, dtype=torch.long)
        positions = torch.zeros(b, new, dtype=torch.long)
        mask = torch.zeros(b, past + new, dtype=torch.long)
        for i, c in enumerate(chunks):
            n = len(c.token_ids)
            ids[i, :n] = torch.tensor(c.token_ids)
            positions[i, :n] = torch.arange(c.start_pos, c.end_pos)
            mask[i, : c.start_pos] = 1
            mask[i, past : past + n] = 1
        slots = torch.tensor([c.block_table[0] for c in chunks], device=self.device)
        feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": positions}
        feeds = {k: v.to(self.device) for k, v in feeds.items()}
        for name, cache in zip(self.past_names, self.kv):
            feeds[name] = cache[:, :, :past].index_select(0, slots)
        out = self.session.run(feeds)
        starts = torch.tensor([c.start_pos for c in chunks], device=self.device)
        for name, cache in zip(self.present_names, self.kv):
            present = out[name]
            if new == 1:  # decodes: every row's one new K/V in one indexed copy
                cache[slots, :, starts] = present[:, :, past]
                continue
            (c,) = chunks
            cache[c.block_table[0], :, c.start_pos : c.end_pos] = present[0, :, past:]
        return out["logits"]

    def close(self) -> None:
        self.kv = []
        self.session = None
