"""The native runner for hybrid models (Qwen3-Next): paged KV for the full-attention layers, a
per-sequence state slot (`native.state_pool`) for the linear-attention ones.

What differs from `NativeRunner`:
- the KV blocks hold the full-attention layers only, and the state pool (one slot per
  sequence of `max_batch_size`) is taken from the KV budget first (`plan_kv_blocks`);
- the runner is told when a sequence's blocks are freed (`release_sequence`), to free its slot;
- no prefix caching (`native.hybrid.NO_PREFIX_CACHING` says why);
- the torch path: the C++ CPU kernels, the one-call decode step and CUDA graphs do not know
  the linear-attention layers.
"""

from __future__ import annotations

import math

from enginehouse import EngineConfig, KVSpec, ModelSpec, SeqChunk
from enginehouse.plugin_api import (
    EnginehouseError,
    RunnerCapabilities,
    RunnerContext,
    available_memory,
    format_size,
    kv_bytes_per_token,
)

from .native import kv_cache
from .native.arch import arch_from_config, language_model
from .native.attention import StepMeta, TorchAttention
from .native.state_pool import StatePool
from .native_runner import NativeRunner


class HybridRunner(NativeRunner):
    capabilities = RunnerCapabilities(profiles=True, plans_kv=True, releases_sequences=True)
    # No LoRA: its targets (q/k/v/o, gate/up/down) miss the linear-attention layers, so the
    # inherited adapter methods are withdrawn rather than left undeclared.
    load_adapter = None
    unload_adapter = None

    def __init__(self, spec: ModelSpec, config: EngineConfig, context: RunnerContext) -> None:
        super().__init__(spec, config, context)
        a = self.arch
        assert a.linear is not None
        self.full_layers = a.linear.layers.count(False)
        per_token = kv_bytes_per_token(self.full_layers, self.tp.kv_heads, a.head_dim, self.dtype)
        self.kv_spec = KVSpec(
            block_size=self.block_size,
            bytes_per_block=per_token * self.block_size,
            dtype=self.dtype,
            device=self.device,
            prefix_caching=False,  # see native.hybrid.NO_PREFIX_CACHING
        )
        self.max_seqs = config.max_batch_size
        # CPU ranks of one machine share its memory: each plans with its part of a fraction.
        self.memory_share = context.local_world_size if self.device.type == "cpu" else 1
        self.linear = self.tp.linear  # this rank's linear-attention heads
        self.state_bytes = StatePool.bytes_for(self.linear, self.max_seqs, self.dtype)
        self.states: StatePool | None = None
        self.kernel, self.paged = TorchAttention, False

    def _fused(self) -> bool:
        return False

    def plan_kv_blocks(self, config: EngineConfig, session_len: int) -> int:
        """The core's plan (`EngineConfig.kv_cache_memory`, blocks for at most max_batch_size
        full contexts) after the state pool's bytes are taken from the budget."""
        self.profile_run(config.max_num_batched_tokens)
        budget = config.kv_cache_memory
        if isinstance(budget, float):
            budget = int(available_memory(self.device) * budget / self.memory_share)
        left = budget - self.state_bytes
        per_seq = math.ceil(session_len / self.block_size)
        blocks = min(max(left, 0) // self.kv_spec.bytes_per_block, per_seq * self.max_seqs)
        if blocks < per_seq:
            raise EnginehouseError(
                f"the KV cache budget ({format_size(budget)}) less the linear-attention "
                f"states of {self.max_seqs} sequences ({format_size(self.state_bytes)}) "
                f"holds {blocks * self.block_size} tokens, less than one full context of "
                f"{session_len}; raise EngineConfig(kv_cache_memory=...), or lower "
                "session_len or max_batch_size"
            )
        return blocks

    def _allocate(self, num_blocks: int, counts: list[int] | None = None) -> None:
        """`NativeRunner._allocate` for the full-attention layers only; each linear layer's
        entry in `self.kv` is its part of the state pool instead."""
        a, linear = self.arch, self.linear
        full_layers = tuple(i for i, lin in enumerate(linear.layers) if not lin)
        (group,) = kv_cache.allocate(
            [(None, full_layers)],
            [num_blocks],
            self.block_size,
            self.tp.kv_heads,
            a.head_dim,
            self.dtype,
            self.device,
        )
        self.caches = [group]
        self.null_slot, self.scratch_slot, self.layout = (
            group.null_slot,
            group.scratch_slot,
            group.layout,
        )
        if self.states is None:
            self.states = StatePool(linear, self.max_seqs, self.dtype, self.device)
        full = iter(range(len(full_layers)))
        linear_index = iter(range(sum(linear.layers)))
        self.kv = [
            self.states.layer(next(linear_index)) if is_linear else group.layer(next(full))
            for is_linear in linear.layers
        ]

    def _metadata(self, order: list[SeqChunk]) -> StepMeta:
        meta = super()._metadata(order)
        assert self.states is not None, "allocate_kv comes before execute"
        meta.linear = self.states.metadata(order, meta.num_decode)
        return meta

    def profile_run(self, num_tokens: int) -> None:
        super().profile_run(num_tokens)
        if self.states is not None:
            self.states.release_all()  # the profiling sequence

    def release_sequence(self, seq_id: int, block_table: tuple[int, ...]) -> None:
        if self.states is not None:
            self.states.release(seq_id)

    def close(self) -> None:
        super().close()
        self.states = None


def native_runner(spec: ModelSpec, config: EngineConfig, context: RunnerContext) -> NativeRunner:
    """The `pytorch` backend's runner: `HybridRunner` for a model with linear-attention
    layers, `NativeRunner` otherwise."""
    arch = arch_from_config(*language_model(spec.architecture, spec.config, spec.facts))
    cls = HybridRunner if arch.linear is not None else NativeRunner
    return cls(spec, config, context)
