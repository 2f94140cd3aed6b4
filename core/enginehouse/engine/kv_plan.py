"""How many KV blocks a runner gets: the budget, after a profiling pass where declared."""

from __future__ import annotations

import math

from ..config import EngineConfig, format_size
from ..device import platform_memory
from ..errors import EnginehouseError
from ..kv_groups import total_blocks
from ..runner import KVSpec, ModelRunner, RunnerContext, capabilities_of


def plan_kv_blocks(
    runner: ModelRunner,
    config: EngineConfig,
    session_len: int,
    context: RunnerContext | None = None,
) -> int:
    """Turn the KV budget into a number of blocks, after a profiling pass where declared.

    A runner that plans its own (`plans_kv`) is asked instead. A rank of a sharded model
    (`context`) plans from its own device; CPU ranks on one machine share its memory, so each
    takes its part of the fraction."""
    caps = capabilities_of(runner)
    if caps.plans_kv:
        return int(runner.plan_kv_blocks(config, session_len))  # type: ignore[attr-defined]
    kv = runner.kv_spec
    if caps.profiles:
        runner.profile_run(config.max_num_batched_tokens)  # type: ignore[attr-defined]
    budget = config.kv_cache_memory
    if isinstance(budget, float):
        share = context.local_world_size if context and kv.device.type == "cpu" else 1
        budget = int(platform_memory(config, kv.device) * budget / share)
    if kv.groups:
        return _plan_groups(kv, budget, config, session_len)
    per_seq = math.ceil(session_len / kv.block_size)
    # Blocks beyond what max_batch_size full-length sequences can use would sit idle.
    blocks = min(budget // kv.bytes_per_block, per_seq * config.max_batch_size)
    if blocks < per_seq:
        raise EnginehouseError(
            f"the KV cache budget ({format_size(budget)}) holds {blocks * kv.block_size} "
            f"tokens, less than one full context of {session_len}; raise "
            "EngineConfig(kv_cache_memory=...) or lower session_len"
        )
    return blocks


def _plan_groups(kv: KVSpec, budget: int, config: EngineConfig, session_len: int) -> int:
    """The blocks of all KV groups together (`kv_groups.total_blocks`); every group must hold
    at least one sequence at full context."""
    chunk = config.max_num_batched_tokens
    args = (kv.block_size, session_len, config.max_batch_size, chunk)
    blocks = total_blocks(kv.groups, budget, *args)
    plans = kv.group_blocks(blocks, session_len, chunk, config.max_batch_size)
    states = sum(p.bytes for p in plans if not p.group.paged)
    for plan in plans:
        if plan.blocks < plan.blocks_per_seq:
            taken = (
                f" after the state slots of {config.max_batch_size} sequences "
                f"({format_size(states)})"
                if states
                else ""
            )
            raise EnginehouseError(
                f"the KV cache budget ({format_size(budget)}) leaves the "
                f"{plan.group.describe()} layers {plan.blocks} blocks{taken}, less than one "
                f"sequence of {session_len} tokens needs ({plan.blocks_per_seq}); raise "
                "EngineConfig(kv_cache_memory=...) or lower session_len"
                + (" or max_batch_size" if states else "")
            )
    return blocks
