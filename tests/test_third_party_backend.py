"""A third-party backend, found through its installed entry point, behind the full `pipeline()`.

The toy backend (tests/third_party_plugin) computes each next token from the whole context read
back through the paged KV cache, so paging, prefix caching and preemption are checked end to end.
"""

from __future__ import annotations

from enginehouse import GenerationConfig, pipeline
from enginehouse_toy.runner import reference_next  # installed for the session by conftest.py

VOCAB = 512  # toy_dir's (conftest.py)


def expected(prompt: list[int], n: int) -> list[int]:
    ctx = list(prompt)
    for _ in range(n):
        ctx.append(reference_next(ctx, VOCAB))
    return ctx[len(prompt) :]


def test_chosen_automatically_with_its_reason(toy_dir):
    with pipeline(str(toy_dir), progress=False) as pipe:
        assert pipe.backend == "toy"
        verdict = pipe.backend_decision.verdict("toy")
        assert verdict.plugin == "toy" and verdict.reason == "model_type is 'toy'"
        assert "no weight files" in pipe.backend_decision.verdict("transformers").reason


def test_prefix_cache_and_preemption_through_the_pipeline(toy_dir):
    prompts = [{"token_ids": [7 + i] * 40 + [100 + i, 101, 102]} for i in range(6)]
    shared = {"token_ids": prompts[0]["token_ids"][:40] + [300, 301]}
    gen = GenerationConfig(max_new_tokens=30, ignore_eos=True)
    # 2 KiB = 64 blocks of four 8-byte tokens; six requests need 114, so some are preempted.
    config = {"kv_cache_memory": "2KiB", "max_batch_size": 6, "max_num_batched_tokens": 64}
    with pipeline(str(toy_dir), engine_config=config, progress=False) as pipe:
        out = pipe(prompts, gen)
        assert pipe.stats()["preemptions"] > 0
        assert pipe.stats()["kv_blocks_used"] == 0
        first = pipe(prompts[0], gen)  # its blocks stay cached after it ends...
        again = pipe(shared, gen)  # ...so a prompt that starts the same way reuses them
    assert [r.token_ids for r in out] == [expected(p["token_ids"], 30) for p in prompts]
    assert first.token_ids == out[0].token_ids
    assert again.cached_tokens == 40  # ten full blocks of the first prompt's prefix
    assert again.token_ids == expected(shared["token_ids"], 30)
