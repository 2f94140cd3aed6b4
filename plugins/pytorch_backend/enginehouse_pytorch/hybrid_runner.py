"""The native runner for hybrid models (Qwen3-Next, Qwen3.5): paged KV for the full-attention
layers, a per-sequence state slot (`native.state_pool`) for the linear-attention ones.

What differs from `NativeRunner`:
- two KV groups (`KVSpec.groups`): "full" for the full-attention layers and "state" for the
  linear-attention ones (`bytes_per_seq`), so the engine's block manager plans the memory of
  both and hands out the state slots: a sequence's live slot is its one block in the state
  group (entry 0 of `SeqChunk.table(STATE)`);
- prefix caching through state snapshots (`KVGroup.snapshots`, on with
  `enable_prefix_caching`): a chunk that reaches a block boundary saves the state there into
  the block the engine added to its state table, and a prefix hit, cut back by the engine to
  a block whose state was saved, starts from a copy of it (`native.state_pool.StepStates`);
- speculative decoding (`verifies_tokens`): a verify chunk's linear-attention layers run the
  recurrence token by token and keep the state after each position; the sequence's next
  chunk, which starts right after the last accepted token, first takes the state there
  (`native.state_pool.Verified`). The full-attention layers verify as `NativeRunner` does
  (rejected tokens' KV slots are overwritten later);
- the runner is told when a sequence's blocks are freed (`release_sequence`), to start its
  next first chunk afresh;
- the torch path: the C++ CPU kernels, the one-call decode step and CUDA graphs do not know
  the linear-attention layers; a quantized KV cache (`kv_cache_dtype` "int8" or "fp8") holds
  the full-attention layers' keys and values, read by `kv_quant`'s torch path (the states stay
  in the model's dtype and float32).
"""

from __future__ import annotations

from enginehouse import EngineConfig, KVSpec, ModelSpec, SeqChunk
from enginehouse.plugin_api import RunnerCapabilities, RunnerContext

from .native import kv_cache, kv_quant
from .native.arch import arch_from_config, language_model
from .native.attention import StepMeta, TorchAttention
from .native.hybrid import hybrid_groups
from .native.state_pool import StatePool, StepStates, Verified
from .native_runner import NativeRunner, _attends_as_decode

FULL, STATE = 0, 1  # the KV groups, in `kv_spec.groups` order


class HybridRunner(NativeRunner):
    capabilities = RunnerCapabilities(profiles=True, releases_sequences=True, verifies_tokens=True)
    # No LoRA: its targets (q/k/v/o, gate/up/down) miss the linear-attention layers, so the
    # inherited adapter methods are withdrawn rather than left undeclared.
    load_adapter = None
    unload_adapter = None

    def __init__(self, spec: ModelSpec, config: EngineConfig, context: RunnerContext) -> None:
        super().__init__(spec, config, context)
        a = self.arch
        assert a.linear is not None
        self.linear = self.tp.linear  # this rank's linear-attention heads
        caching = config.enable_prefix_caching  # states saved at block boundaries
        # The full-attention layers' KV may be quantized (kv_cache_dtype); states never are.
        head = kv_quant.head_bytes(self.kv_kind, a.head_dim, self.dtype)
        itemsize = self.dtype.itemsize
        self.groups = hybrid_groups(a, self.linear, self.tp.kv_heads, head, itemsize, caching)
        per_token = self.groups[FULL].bytes_per_token
        self.kv_spec = KVSpec(
            block_size=self.block_size,
            bytes_per_block=per_token * self.block_size,  # the paged group's
            dtype=self.dtype,
            device=self.device,
            prefix_caching=caching,
            groups=self.groups,
            cache_dtype=self.kv_kind,
        )
        self.states: StatePool | None = None
        self.started: set[int] = set()  # sequences whose live slot holds their state
        self.step_states: StepStates | None = None
        # Sequences whose last step verified proposals: their states after each position.
        self.verified: dict[int, Verified] = {}
        # The torch path: a quantized cache's reads dequantize what they gather (kv_quant.py).
        quantized = self.kv_kind != "auto"
        self.kernel = kv_quant.attention_for(self.kv_kind) if quantized else TorchAttention
        self.paged = False

    def _fused(self) -> bool:
        return False

    def _allocate(self, num_blocks: int, counts: list[int] | None = None) -> None:
        """`NativeRunner._allocate` for the full-attention layers; each linear layer's entry
        in `self.kv` is its part of the state pool, one slot per block of the state group.
        (The profiling pass's `counts` name the paged group only: one slot is enough.)"""
        if counts is None:
            counts = self._group_counts(num_blocks)
        slots = counts[STATE] if len(counts) > STATE else 1
        a, linear = self.arch, self.linear
        (group,) = kv_cache.allocate(
            [(None, self.groups[FULL].layers)],
            [counts[FULL]],
            self.block_size,
            self.tp.kv_heads,
            a.head_dim,
            self.dtype,
            self.device,
            self.kv_kind,
        )
        self.caches = [group]
        self.null_slot, self.scratch_slot, self.layout = (
            group.null_slot,
            group.scratch_slot,
            group.layout,
        )
        self.states = StatePool(linear, slots, self.dtype, self.device)
        self.started.clear()
        self.verified.clear()
        full = iter(range(len(self.groups[FULL].layers)))
        linear_index = iter(range(sum(linear.layers)))
        self.kv = [
            self.states.layer(next(linear_index)) if is_linear else group.layer(next(full))
            for is_linear in linear.layers
        ]

    def _metadata(self, order: list[SeqChunk]) -> StepMeta:
        meta = super()._metadata(order)
        assert self.states is not None, "allocate_kv comes before execute"
        decodes = sum(1 for c in order if _attends_as_decode(c))  # chunks, not rows
        self.step_states = StepStates.build(
            self.states, order, decodes, STATE, self.block_size, self.started, self.verified
        )
        meta.linear = self.step_states.meta
        return meta

    def _forward(self, chunks: tuple[SeqChunk, ...], order: list[SeqChunk]):
        logits = super()._forward(chunks, order)
        if self.step_states is not None and self.states is not None:
            self.step_states.save_decodes(self.states)  # decodes that reached a boundary
        self.step_states = None
        return logits

    def profile_run(self, num_tokens: int) -> None:
        super().profile_run(num_tokens)
        self.started.clear()  # the profiling sequence
        self.verified.clear()

    def release_sequence(self, seq_id: int, block_table: tuple[int, ...]) -> None:
        self.started.discard(seq_id)
        self.verified.pop(seq_id, None)

    def close(self) -> None:
        super().close()
        self.states = None


def native_runner(spec: ModelSpec, config: EngineConfig, context: RunnerContext) -> NativeRunner:
    """The `pytorch` backend's runner: `HybridRunner` for a model with linear-attention
    layers, `NativeRunner` otherwise."""
    arch = arch_from_config(*language_model(spec.architecture, spec.config, spec.facts))
    cls = HybridRunner if arch.linear is not None else NativeRunner
    return cls(spec, config, context)
