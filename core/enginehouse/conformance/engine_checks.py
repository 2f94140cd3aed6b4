"""Checks through the core's engine: what a runner must get right while real requests come
and go (finish, abort before and during their run), and seeded sampling."""

from __future__ import annotations

from typing import Any

from ..config import GenerationConfig, format_size
from ..engine import LLMEngine
from .compare import first_difference
from .memory import reachable_bytes
from .result import Mismatch
from .target import NEW_TOKENS, Target

MAX_STEPS = 2000


def run_requests(
    engine: LLMEngine, requests: dict[str, tuple[list[int], GenerationConfig]], abort: dict
) -> dict[str, Any]:
    """Add the requests, abort some (`{request_id: after this many steps}`, 0 = before the
    first), and step until every one has finished. Returns {id: final output with tokens}."""
    tokens: dict[str, list[int]] = {rid: [] for rid in requests}
    final: dict[str, Any] = {}
    for rid, (prompt, params) in requests.items():
        engine.add_request(rid, prompt, params)
    steps = 0
    while engine.has_work() and steps < MAX_STEPS:
        for rid, after in abort.items():
            if after == steps:
                engine.abort(rid)
        for out in engine.step():
            tokens[out.request_id] += out.token_ids
            if out.finished:
                final[out.request_id] = out
        steps += 1
    for rid in requests:
        if rid not in final:
            raise Mismatch(f"request {rid} did not finish within {MAX_STEPS} engine steps")
        if final[rid].finish_reason == "error":
            raise Mismatch(f"request {rid} ended with an error: {final[rid].error}")
        final[rid].token_ids = tokens[rid]
    return final


def _round(t: Target, seed: int) -> None:
    engine = t.engine
    assert engine is not None
    prompts = t.prompts(seed)
    params = GenerationConfig(max_new_tokens=NEW_TOKENS, ignore_eos=True)
    names = ("finished", "finished too", "aborted while waiting", "aborted while running")
    requests = {f"{name} #{seed}": (p, params) for name, p in zip(names, prompts)}
    ids = list(requests)
    out = run_requests(engine, requests, abort={ids[2]: 0, ids[3]: 2})
    reasons = {rid: out[rid].finish_reason for rid in ids}
    if reasons[ids[0]] != "length" or reasons[ids[3]] != "abort":
        raise Mismatch(f"requests finished as {reasons}")
    stats = engine.stats()
    if stats["kv_blocks_used"] or stats["running"] or stats["waiting"]:
        raise Mismatch(f"after every request ended the engine has {stats}")


def blocks_returned(t: Target) -> str:
    """Every block comes back, and the runner keeps nothing per request: its memory must
    stop growing once warm (a first round may build lazy caches)."""
    held = []
    for seed in (10, 11, 12):
        _round(t, seed)
        held.append(reachable_bytes(t.runner))
    if held[2] > held[1] > held[0]:
        raise Mismatch(
            f"the runner's tensor memory grew by {format_size(held[1] - held[0])} and then "
            f"{format_size(held[2] - held[1])} over two rounds of 4 requests, all of them "
            "finished or aborted: it keeps something per sequence (drop it in release_sequence)"
        )
    return "3 rounds of 4 requests (finished, aborted waiting and running): all blocks back"


def seeded_sampling(t: Target) -> str:
    assert t.engine is not None
    prompts = t.prompts(seed=3)

    def sampled(seed: int) -> GenerationConfig:
        return GenerationConfig(
            max_new_tokens=NEW_TOKENS,
            do_sample=True,
            temperature=1.0,
            random_seed=seed,
            ignore_eos=True,
        )

    alone = {"seeded": (prompts[1], sampled(7))}
    crowd = {**alone, "other 1": (prompts[2], sampled(8)), "other 2": (prompts[0], sampled(9))}
    runs = {
        "alone": run_requests(t.engine, alone, {}),
        "inside a batch of 3": run_requests(t.engine, crowd, {}),
        "alone again": run_requests(t.engine, alone, {}),
    }
    want = runs["alone"]["seeded"].token_ids
    for how, out in runs.items():
        got = out["seeded"].token_ids
        if got != want:
            i = first_difference(got, want)
            raise Mismatch(
                f"seed 7 {how}: generated token {i} is {got[i : i + 1]}, alone it was "
                f"{want[i : i + 1]} (tokens {got}, alone {want})"
            )
    return f"seed 7 gave the same {NEW_TOKENS} tokens alone, in a batch and again"
