"""The `transformers` backend: any `AutoModelForCausalLM`, driven by the core's scheduler.

Each sequence keeps a contiguous cache, so the runner states a block size equal to the context
length: the block manager then gives every sequence exactly one block, and that block's id names
the sequence's cache slot. A chunk that starts at position 0 begins the slot anew, which is also
how a preempted sequence's recompute resets it.

Models whose attention layers take a custom attention function (most decoder families in
transformers) run a whole step as one batched forward over preallocated slots
(`slot_attention`). Any other model runs one sequence at a time with transformers' own cache.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import torch

from enginehouse import EngineConfig, KVSpec, ModelSpec, ScheduledBatch
from enginehouse.device import resolve_device, resolve_dtype, use_all_cores
from enginehouse.runner import RunnerContext, kv_bytes_per_token

from . import slot_attention


def _kv_dims(config: Mapping[str, Any]) -> tuple[int, int, int]:
    """(layers, kv_heads, head_dim) from a config.json, or its text_config for a VLM."""
    text = config.get("text_config") or config
    heads = text.get("num_attention_heads") or 1
    kv_heads = text.get("num_key_value_heads") or heads
    head_dim = text.get("head_dim") or (text.get("hidden_size", 0) // heads)
    return text.get("num_hidden_layers") or 1, kv_heads, head_dim


class TransformersRunner:
    def __init__(self, spec: ModelSpec, config: EngineConfig, context: RunnerContext) -> None:
        self.spec = spec
        self.config = config
        self.device = resolve_device(config)
        self.dtype = resolve_dtype(config, spec, self.device)
        self.context = context = context.session_len
        self.kv_dims = layers, kv_heads, head_dim = _kv_dims(spec.config)
        per_token = max(1, kv_bytes_per_token(layers, kv_heads, head_dim, self.dtype))
        self.kv_spec = KVSpec(
            block_size=context,
            bytes_per_block=per_token * context,
            dtype=self.dtype,
            device=self.device,
            prefix_caching=False,  # a contiguous cache cannot be shared block by block
        )
        self.model: Any = None
        self.caches: dict[int, Any] = {}  # slot -> transformers cache, when running unbatched
        self.slots: slot_attention.SlotKV | None = None
        self.unbatched_reason: str | None = None  # why the batched path does not apply
        self._cache_arg = "past_key_values"

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
        self.unbatched_reason = slot_attention.supported(self.model)

    def allocate_kv(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        if self.unbatched_reason is None:
            layers, kv_heads, head_dim = self.kv_dims
            self.slots = slot_attention.SlotKV(
                layers, num_blocks, kv_heads, self.context, head_dim, self.dtype, self.device
            )
            slot_attention.attach(self.model, self.slots)
        # Otherwise caches grow as sequences do; the block count bounds how many exist at once.

    def _cache_for(self, slot: int, start: int) -> Any:
        from transformers import DynamicCache

        cache = self.caches.get(slot)
        if start == 0 or cache is None:
            cache = self.caches[slot] = DynamicCache(config=self.model.config)
        if cache.get_seq_length() != start:
            raise RuntimeError(
                f"cache of block {slot} holds {cache.get_seq_length()} tokens, expected {start}"
            )
        return cache

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
            cache = self._cache_for(chunk.block_table[0], chunk.start_pos)
            positions = torch.arange(chunk.start_pos, chunk.end_pos, device=self.device)
            wanted = list(chunk.logits_at)
            # Only the last position's logits, unless the engine wants more (perplexity).
            keep = 1 if wanted in ([], [len(chunk.token_ids) - 1]) else 0
            out = self.model(
                input_ids=torch.tensor([chunk.token_ids], device=self.device),
                position_ids=positions.unsqueeze(0),
                use_cache=True,
                logits_to_keep=keep,
                **{self._cache_arg: cache},
            )
            logits = out.logits[0]
            rows.append(logits[-1:] if keep == 1 and wanted else logits[wanted])
        return torch.cat(rows).float()

    def close(self) -> None:
        self.caches.clear()
        self.slots = None
        self.model = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
