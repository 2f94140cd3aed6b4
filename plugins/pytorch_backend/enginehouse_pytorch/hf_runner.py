"""The `transformers` backend: any `AutoModelForCausalLM`, driven by the core's scheduler.

Each sequence keeps a contiguous cache, so the runner states a block size equal to the context
length: the block manager then gives every sequence exactly one block, and that block's id names
the sequence's cache slot. A chunk that starts at position 0 begins the slot anew, which is also
how a preempted sequence's recompute resets it.

After loading, one short forward (`kv_layout`) measures what the model keeps per token and
whether slot attention computes exactly what its own attention does. If so (most decoder
families), a whole step runs as one batched forward over preallocated slots (`slot_attention`);
otherwise (ALiBi, attention sinks, recurrent or hybrid layers, ...) one sequence at a time with
the cache the model makes for itself, as in `generate`.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from enginehouse import EngineConfig, KVSpec, ModelSpec, ScheduledBatch
from enginehouse.plugin_api import (
    RunnerCapabilities,
    RunnerContext,
    resolve_device,
    resolve_dtype,
    use_all_cores,
)

from . import kv_layout, slot_attention


class TransformersRunner:
    # The unbatched path keeps a transformers cache per sequence: dropped with its blocks.
    capabilities = RunnerCapabilities(releases_sequences=True)

    def __init__(self, spec: ModelSpec, config: EngineConfig, context: RunnerContext) -> None:
        self.spec = spec
        self.config = config
        self.device = resolve_device(config)
        self.dtype = resolve_dtype(config, spec, self.device)
        self.context = context.session_len
        # A placeholder: load() measures what the model keeps per token and sizes it; the engine
        # reads it only after that.
        self.kv_spec = self._kv_spec(bytes_per_block=0)
        self.model: Any = None
        self.layout: kv_layout.KVLayout | None = None
        self.caches: dict[int, tuple[Any, int]] = {}  # slot -> (transformers cache, tokens)
        self.slots: slot_attention.SlotKV | None = None
        self.unbatched_reason: str | None = None  # why the batched path does not apply
        self._cache_arg = "past_key_values"

    def _kv_spec(self, bytes_per_block: int) -> KVSpec:
        return KVSpec(
            block_size=self.context,
            bytes_per_block=bytes_per_block,
            dtype=self.dtype,
            device=self.device,
            prefix_caching=False,  # a contiguous cache cannot be shared block by block
        )

    def load(self, progress: bool = True) -> None:
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging

        if self.device.type == "cpu":
            use_all_cores()
        was_enabled = hf_logging.is_progress_bar_enabled()
        if not progress:
            hf_logging.disable_progress_bar()
        try:
            self.model = AutoModelForCausalLM.from_pretrained(
                self.spec.path, dtype=self.dtype, trust_remote_code=self.config.trust_remote_code
            )
        finally:
            if was_enabled:
                hf_logging.enable_progress_bar()
        self.model.to(self.device).eval()
        # transformers 5.x renames `past_key_values` to `cache`; accept either.
        if "cache" in inspect.signature(self.model.forward).parameters:
            self._cache_arg = "cache"
        self.layout = layout = kv_layout.measure(self.model)
        self.unbatched_reason = layout.unbatched_reason
        per_seq = layout.bytes_per_token * self.context + layout.state_bytes
        self.kv_spec = self._kv_spec(bytes_per_block=max(1, per_seq))

    def allocate_kv(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        if self.unbatched_reason is None:
            layout = self.layout
            self.slots = slot_attention.SlotKV(
                layout.layers, num_blocks, self.context, layout.dtype, self.device
            )
            slot_attention.attach(self.model, self.slots)
        # Otherwise caches grow as sequences do; the block count bounds how many exist at once.

    def _cache_for(self, slot: int, start: int) -> dict[str, Any]:
        """The cache argument for a chunk at `start`: none for a sequence's first chunk (the
        model makes its own kind of cache, as in `generate`), else the one it returned. The
        runner counts the tokens itself: a cache of recurrent layers has no length to ask."""
        if start == 0:
            return {}
        cache, held = self.caches.get(slot, (None, 0))
        if held != start:
            raise RuntimeError(f"cache of block {slot} holds {held} tokens, expected {start}")
        return {self._cache_arg: cache}

    def release_sequence(self, seq_id: int, block_table: tuple[int, ...]) -> None:
        """Drop the finished sequence's transformers cache (unbatched path)."""
        self.caches.pop(block_table[0], None)

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> torch.Tensor:
        if self.slots is None:
            return self._execute_unbatched(batch)
        self.slots.prepare(batch, self.device)
        out = self.model(
            input_ids=batch.input_ids.to(self.device).unsqueeze(0),
            position_ids=batch.positions.to(self.device).unsqueeze(0),
            use_cache=False,
            logits_to_keep=batch.logits_indices.to(self.device),
        )
        return out.logits[0].float()

    def _execute_unbatched(self, batch: ScheduledBatch) -> torch.Tensor:
        rows = []
        for chunk in batch.chunks:
            slot = chunk.block_table[0]
            cache = self._cache_for(slot, chunk.start_pos)
            positions = torch.arange(chunk.start_pos, chunk.end_pos, device=self.device)
            wanted = list(chunk.logits_at)
            # Only the last position's logits, unless the engine wants more (perplexity).
            keep = 1 if wanted in ([], [len(chunk.token_ids) - 1]) else 0
            out = self.model(
                input_ids=torch.tensor([chunk.token_ids], device=self.device),
                position_ids=positions.unsqueeze(0),
                use_cache=True,
                logits_to_keep=keep,
                **cache,
            )
            self.caches[slot] = (kv_layout.returned_cache(out), chunk.end_pos)
            logits = out.logits[0]
            rows.append(logits[-1:] if keep == 1 and wanted else logits[wanted])
        return torch.cat(rows).float()

    def close(self) -> None:
        self.caches.clear()
        self.slots = None
        self.model = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
