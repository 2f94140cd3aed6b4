"""The engine core driven directly (no Pipeline) with the toy plugin's checker model.

`ToyRunner` computes each next token from the whole context read back through the block table,
so every scenario here (batching, chunked prefill, prefix caching, preemption, abort) must give
exactly the tokens of `reference_next` applied alone, and must end with no KV block in use.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import pytest
import torch

from enginehouse.config import EngineConfig, GenerationConfig
from enginehouse.engine import LLMEngine, RequestOutput
from enginehouse.errors import RequestError
from enginehouse.runner import RunnerContext, ScheduledBatch
from enginehouse.spec import ModelSpec, read_model_spec
from enginehouse_toy.runner import ToyRunner, reference_logits, reference_next

VOCAB, EOS, CONTEXT = 97, 96, 64
TOY_CONFIG = {
    "architectures": ["ToyForCausalLM"],
    "model_type": "toy",
    "vocab_size": VOCAB,
    "max_position_embeddings": CONTEXT,
    "eos_token_id": EOS,
}
BLOCK = 4  # the toy's default block size
# Room for exactly one full context (int64 per token): concurrent requests must be preempted.
# A string, since a bare int that small is refused as a likely mistake.
ONE_CONTEXT_BYTES = f"{CONTEXT // BLOCK * BLOCK * 8}B"


class ToyTokenizer:
    """Each id reads as "<id>"; EOS is the one special token."""

    eos_token_id = EOS

    def decode(
        self,
        ids: list[int],
        skip_special_tokens: bool = True,
        clean_up_tokenization_spaces: bool = False,
    ) -> str:
        return "".join(f"<{i}>" for i in ids if not (skip_special_tokens and i == EOS))

    def __len__(self) -> int:
        return VOCAB


def text_of(ids: list[int]) -> str:
    return ToyTokenizer().decode(ids)


@pytest.fixture(scope="module")
def spec(tmp_path_factory: pytest.TempPathFactory) -> ModelSpec:
    folder = tmp_path_factory.mktemp("toy-model")
    (folder / "config.json").write_text(json.dumps(TOY_CONFIG))
    return read_model_spec(folder)


def make_engine(spec: ModelSpec, **config: Any) -> LLMEngine:
    cfg = EngineConfig(**config)
    return LLMEngine(ToyRunner(spec, cfg), ToyTokenizer(), spec, cfg)


def greedy(n: int, **params: Any) -> GenerationConfig:
    return GenerationConfig(max_new_tokens=n, ignore_eos=True, **params)


@dataclass
class Result:
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    final: RequestOutput | None = None


def assert_no_leak(engine: LLMEngine) -> None:
    bm = engine.block_manager
    assert bm.num_used == 0 and bm.num_free == bm.num_blocks
    assert all(r == 0 for r in bm.ref_count)
    assert not engine.scheduler.running and not engine.scheduler.waiting


def collect(results: dict[str, Result], outputs: list[RequestOutput]) -> None:
    for out in outputs:
        r = results[out.request_id]
        assert r.final is None, f"{out.request_id} got output after it finished"
        assert out.error is None, out.error
        r.token_ids += out.token_ids
        r.text += out.text
        if out.finished:
            r.final = out


def drain(engine: LLMEngine, results: dict[str, Result], max_steps: int = 5000) -> None:
    """Step until idle, gathering the deltas; every request must finish exactly once."""
    for _ in range(max_steps):
        if not engine.has_work():
            break
        collect(results, engine.step())
    else:
        pytest.fail(f"the engine did not finish within {max_steps} steps")
    assert all(r.final is not None for r in results.values())
    assert_no_leak(engine)


def run(
    engine: LLMEngine, requests: dict[str, tuple[list[int], GenerationConfig]]
) -> dict[str, Result]:
    results = {rid: Result() for rid in requests}
    for rid, (prompt, params) in requests.items():
        engine.add_request(rid, prompt, params)
    drain(engine, results)
    return results


def reference(
    prompt: list[int], max_new: int, stop_ids: tuple[int, ...] = (), min_new: int = 0
) -> tuple[list[int], str]:
    """Greedy generation by the book: (tokens, finish reason)."""
    ctx, out = list(prompt), []
    while len(out) < max_new and len(ctx) < CONTEXT:
        logits = reference_logits(ctx, VOCAB)
        if len(out) < min_new and stop_ids:
            logits[list(stop_ids)] = float("-inf")
        out.append(int(logits.argmax()))
        ctx.append(out[-1])
        if out[-1] in stop_ids:
            return out, "stop"
    return out, "length"


def prompts(n: int, lengths: range, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(EOS) for _ in range(rng.choice(lengths))] for _ in range(n)]


def check_reference(results: dict[str, Result], requests: dict) -> None:
    for rid, (prompt, params) in requests.items():
        tokens, reason = reference(prompt, params.max_new_tokens)
        r = results[rid]
        assert r.token_ids == tokens, rid
        assert r.text == text_of(tokens), rid
        assert r.final.finish_reason == reason
        assert r.final.input_token_len == len(prompt)
        assert r.final.generate_token_len == len(tokens)


def test_reference_function_is_what_the_runner_computes() -> None:
    ctx = [5, 1, 4]
    assert reference_next(ctx, VOCAB) == ((1 * 5 + 2 * 1 + 3 * 4) * 31 + 3) % VOCAB
    logits = reference_logits(ctx, VOCAB)
    top2 = logits.topk(2)
    assert top2.indices[0] == reference_next(ctx, VOCAB) and top2.values[1] < top2.values[0]


def test_greedy_alone_equals_reference(spec: ModelSpec) -> None:
    requests = {"a": ([3, 1, 4, 1, 5, 9, 2, 6], greedy(20))}
    check_reference(run(make_engine(spec), requests), requests)


@pytest.mark.parametrize(
    "config",
    [
        {},
        {"max_num_batched_tokens": 16, "max_batch_size": 4},
        {"enable_prefix_caching": False},
        {"block_size": 1},
        {"block_size": 7, "max_num_batched_tokens": 17, "max_batch_size": 3},
        {"session_len": 48, "max_batch_size": 5},
    ],
    ids=["default", "chunked", "no-prefix-cache", "block1", "block7", "session48"],
)
def test_many_requests_of_mixed_lengths_equal_reference(spec: ModelSpec, config: dict) -> None:
    engine = make_engine(spec, **config)
    limit = engine.session_len
    rng = random.Random(1)
    shared = prompts(1, range(12, 13), seed=7)[0]  # some prompts share a prefix
    requests = {}
    for i, p in enumerate(prompts(14, range(1, 33), seed=2)):
        p = (shared + p)[: limit - 2] if i % 3 == 0 else p
        requests[f"r{i}"] = (p, greedy(min(rng.randint(1, 20), limit - len(p))))
    check_reference(run(engine, requests), requests)


def test_chunked_prefill_gives_the_same_tokens(spec: ModelSpec) -> None:
    engine = make_engine(spec, max_num_batched_tokens=16, max_batch_size=4)
    batches: list[ScheduledBatch] = []
    execute = engine.runner.execute

    def record(batch: ScheduledBatch) -> torch.Tensor:
        batches.append(batch)
        return execute(batch)

    engine.runner.execute = record
    requests = {f"r{i}": (p, greedy(10)) for i, p in enumerate(prompts(5, range(17, 45)))}
    check_reference(run(engine, requests), requests)
    assert max(b.num_tokens for b in batches) <= 16
    # A prompt was split: some chunk continued a prefill that an earlier step started.
    assert any(c.start_pos > 0 and len(c.token_ids) > 1 for b in batches for c in b.chunks)


def test_prefix_caching_reuses_blocks_and_keeps_tokens(spec: ModelSpec) -> None:
    base = prompts(1, range(30, 31), seed=3)[0]
    first = {"first": (base, greedy(8))}
    second = {"second": (base[:26] + [1, 2, 3, 4], greedy(8))}
    engine = make_engine(spec)
    res1 = run(engine, first)
    assert res1["first"].final.cached_tokens == 0
    res2 = run(engine, second)
    assert res2["second"].final.cached_tokens == 24  # 6 full blocks of the 26 shared tokens
    check_reference(res2, second)
    # Generated tokens are committed too: a follow-up turn finds prompt and answer cached.
    third = {"third": (base + res1["first"].token_ids + [7], greedy(4))}
    res3 = run(engine, third)
    assert res3["third"].final.cached_tokens == 36
    check_reference(res3, third)

    # A prompt of whole blocks, all cached: the last block is recomputed for its logits.
    again = {"again": (base[:28] + [9, 9, 9, 9], greedy(4))}
    run(engine, again)
    res4 = run(engine, again)
    assert res4["again"].final.cached_tokens == 28
    check_reference(res4, again)

    uncached = make_engine(spec, enable_prefix_caching=False)
    run(uncached, first)
    res = run(uncached, second)
    assert res["second"].final.cached_tokens == 0
    assert res["second"].token_ids == res2["second"].token_ids


def test_prefix_cache_hit_while_the_owner_still_runs(spec: ModelSpec) -> None:
    # The second request arrives while the first is mid-prefill in 16-token chunks.
    engine = make_engine(spec, max_num_batched_tokens=16, max_batch_size=4)
    base = prompts(1, range(40, 41), seed=4)[0]
    requests = {"a": (base, greedy(6)), "b": (base[:36] + [5], greedy(6))}
    results = {rid: Result() for rid in requests}
    engine.add_request("a", *requests["a"])
    collect(results, engine.step() + engine.step())
    engine.add_request("b", *requests["b"])
    drain(engine, results)
    check_reference(results, requests)
    assert results["b"].final.cached_tokens == 32


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_preemption_keeps_every_request_exact(spec: ModelSpec, prefix_caching: bool) -> None:
    engine = make_engine(
        spec, kv_cache_memory=ONE_CONTEXT_BYTES, enable_prefix_caching=prefix_caching
    )
    assert engine.num_blocks == CONTEXT // BLOCK
    ps = prompts(5, range(14, 24), seed=5)
    ps[1] = ps[0][:12] + ps[1]  # a shared prefix, so preempted blocks may be found again
    requests = {f"r{i}": (p, greedy(26)) for i, p in enumerate(ps)}
    seeded = GenerationConfig(max_new_tokens=26, ignore_eos=True, do_sample=True, random_seed=9)
    requests["sampled"] = (ps[2], seeded)
    results = run(engine, requests)
    assert engine.scheduler.num_preemptions > 0
    # The runner was told of every release: each preemption, and each request's end.
    released = engine.runner.released
    assert len(released) == engine.scheduler.num_preemptions + len(requests)
    assert not engine.runner._seen  # so it keeps nothing of sequences that are gone
    del requests["sampled"]
    check_reference(results, requests)
    alone = run(make_engine(spec), {"sampled": (ps[2], seeded)})
    assert results["sampled"].token_ids == alone["sampled"].token_ids


def test_abort_frees_blocks(spec: ModelSpec) -> None:
    engine = make_engine(spec, max_batch_size=2)
    ps = prompts(3, range(20, 21), seed=6)
    requests = {"a": (ps[0], greedy(30)), "b": (ps[1], greedy(10)), "c": (ps[2], greedy(10))}
    results = {rid: Result() for rid in requests}
    for rid, (prompt, params) in requests.items():
        engine.add_request(rid, prompt, params)
    for _ in range(4):
        collect(results, engine.step())
    assert {s.request_id for s in engine.scheduler.running} == {"a", "b"}
    assert [s.request_id for s in engine.scheduler.waiting] == ["c"]
    engine.abort("a")
    engine.abort("c")  # still waiting: it never ran
    engine.abort("nobody")  # unknown ids are ignored
    collect(results, engine.step())
    assert results["a"].final.finish_reason == "abort"
    assert results["c"].final.finish_reason == "abort"
    assert len(engine.runner.released) == 1  # "a" had blocks; "c" never ran
    (b,) = engine.scheduler.running
    assert engine.block_manager.num_used == len(b.block_table)  # a's blocks are free again
    drain(engine, results)
    assert results["a"].token_ids == reference(ps[0], 30)[0][: len(results["a"].token_ids)]
    assert 0 < len(results["a"].token_ids) < 30
    assert results["c"].token_ids == [] and results["c"].final.generate_token_len == 0
    assert results["b"].token_ids == reference(ps[1], 10)[0]


def test_a_request_id_in_use_is_refused_and_the_first_keeps_running(spec: ModelSpec) -> None:
    engine = make_engine(spec)
    engine.add_request("x", [1, 2, 3], greedy(5))
    with pytest.raises(RequestError, match="already in use"):
        engine.add_request("x", [4, 5, 6], greedy(5))  # still queued: refused
    engine.step()
    with pytest.raises(RequestError, match="already in use"):
        engine.add_request("x", [4, 5, 6], greedy(5))  # running: refused
    aborted = engine.finish_all("abort")
    assert [(o.request_id, o.finish_reason) for o in aborted] == [("x", "abort")]
    assert not engine.has_work()
    assert_no_leak(engine)


def test_finish_all_also_answers_queued_aborts(spec: ModelSpec) -> None:
    engine = make_engine(spec)
    engine.add_request("a", [1, 2, 3], greedy(5))
    engine.add_request("b", [4, 5, 6], greedy(5))
    engine.step()
    engine.abort("a")
    outputs = engine.finish_all("abort")
    assert sorted(o.request_id for o in outputs) == ["a", "b"]
    assert_no_leak(engine)


def find_prompt(ok: Any, seed: int = 10) -> tuple[list[int], list[int]]:
    """A prompt whose greedy continuation satisfies `ok` (so a test's premise holds)."""
    for p in prompts(200, range(5, 15), seed=seed):
        tokens = reference(p, 12)[0]
        if ok(tokens):
            return p, tokens
    raise AssertionError("no suitable prompt")


def test_stop_token_ids(spec: ModelSpec) -> None:
    prompt, ref = find_prompt(lambda t: t[3] not in t[:3] and EOS not in t)
    params = GenerationConfig(max_new_tokens=12, stop_token_ids=[ref[3]])
    r = run(make_engine(spec), {"a": (prompt, params)})["a"]
    assert r.token_ids == ref[:4]  # the stop token is reported, its text is not
    assert r.text == text_of(ref[:3])
    assert r.final.finish_reason == "stop"


def test_eos_stops_unless_ignored(spec: ModelSpec) -> None:
    prompt, ref = find_prompt(lambda t: EOS in t[1:10], seed=11)
    r = run(make_engine(spec), {"a": (prompt, GenerationConfig(max_new_tokens=12))})["a"]
    assert r.token_ids == ref[: ref.index(EOS) + 1] and r.final.finish_reason == "stop"
    r = run(make_engine(spec), {"a": (prompt, greedy(12))})["a"]
    assert r.token_ids == ref and r.final.finish_reason == "length"


@pytest.mark.parametrize("cut", ["whole-token", "across-tokens"])
def test_stop_words_cut_the_text(spec: ModelSpec, cut: str) -> None:
    prompt, ref = find_prompt(lambda t: len({*t[:5]}) == 5 and EOS not in t)
    word = f"<{ref[3]}>" if cut == "whole-token" else f"{ref[2]}><{ref[3]}"
    params = GenerationConfig(max_new_tokens=12, stop_words=["never-there", word])
    r = run(make_engine(spec), {"a": (prompt, params)})["a"]
    assert r.token_ids == ref[:4]
    full = text_of(ref[:4])
    assert r.text == full[: full.index(word)]  # streamed deltas add up to the cut text
    assert r.final.text == "" or r.text.endswith(r.final.text)
    assert r.final.finish_reason == "stop"


def test_max_new_tokens_finishes_with_length(spec: ModelSpec) -> None:
    r = run(make_engine(spec), {"a": ([1, 2, 3], greedy(5))})["a"]
    assert len(r.token_ids) == 5 and r.final.finish_reason == "length"


def test_min_new_tokens_holds_back_stop_tokens(spec: ModelSpec) -> None:
    prompt, ref = find_prompt(lambda t: EOS not in t)
    stop = (ref[0],)  # the very first greedy token would stop at once
    params = greedy(8, min_new_tokens=3, stop_token_ids=list(stop))
    r = run(make_engine(spec), {"a": (prompt, params)})["a"]
    expected, reason = reference(prompt, 8, stop_ids=stop, min_new=3)
    assert r.token_ids == expected and r.final.finish_reason == reason
    assert len(r.token_ids) >= 3 and stop[0] not in r.token_ids[:3]


def test_context_end_finishes_with_length(spec: ModelSpec) -> None:
    r = run(make_engine(spec), {"a": (list(range(CONTEXT - 1)), greedy(10))})["a"]
    assert len(r.token_ids) == 1 and r.final.finish_reason == "length"


@pytest.mark.parametrize("session_len", [None, 32])
def test_prompt_too_long_is_a_request_error(spec: ModelSpec, session_len: int | None) -> None:
    engine = make_engine(spec, session_len=session_len)
    limit = session_len or CONTEXT
    with pytest.raises(RequestError) as e:
        engine.add_request("a", [1] * (limit + 5), greedy(4))
    assert f"{limit + 5} tokens" in str(e.value) and str(limit) in str(e.value)
    assert not engine.has_work()


def test_bad_prompts_are_request_errors(spec: ModelSpec) -> None:
    engine = make_engine(spec)
    with pytest.raises(RequestError, match="empty"):
        engine.add_request("a", [], greedy(4))
    with pytest.raises(RequestError, match=str(VOCAB)):
        engine.add_request("a", [1, VOCAB], greedy(4))


def sampled(seed: int, n: int = 16) -> GenerationConfig:
    return GenerationConfig(max_new_tokens=n, ignore_eos=True, do_sample=True, random_seed=seed)


def test_seeded_sampling_is_reproducible_even_when_batched(spec: ModelSpec) -> None:
    prompt = [4, 8, 15, 16, 23, 42]
    alone = run(make_engine(spec), {"s": (prompt, sampled(1234))})["s"].token_ids
    assert run(make_engine(spec), {"s": (prompt, sampled(1234))})["s"].token_ids == alone
    assert alone != reference(prompt, 16)[0]  # the runner-up is likely enough to be drawn
    others = {f"o{i}": (p, sampled(i)) for i, p in enumerate(prompts(4, range(3, 20)))}
    others["g"] = ([9, 9, 9], greedy(12))
    batched = run(make_engine(spec, max_batch_size=3), {"s": (prompt, sampled(1234)), **others})
    assert batched["s"].token_ids == alone
    assert batched["g"].token_ids == reference([9, 9, 9], 12)[0]
    other_seed = run(make_engine(spec), {"s": (prompt, sampled(4321))})["s"].token_ids
    assert other_seed != alone


@pytest.mark.skipif(
    not entry_points(group="enginehouse", name="toy"),
    reason="enginehouse-toy is not installed (pip install -e tests/third_party_plugin)",
)
def test_toy_plugin_is_found_through_its_entry_point(spec: ModelSpec, tmp_path: Path) -> None:
    from enginehouse.backends import choose_backend, probe_backends
    from enginehouse.plugins import load_plugins

    host = load_plugins(strict=True, only="toy")
    assert host.infos["toy"].distribution == "enginehouse-toy" and not host.errors()
    assert host.infos["toy"].hooks == [
        "create_runner",
        "probe_backend",
        "register_reasoning_parsers",
        "register_tool_parsers",
    ]
    config = EngineConfig()
    verdicts = probe_backends(spec, config, host)
    assert choose_backend(verdicts).chosen == "toy"
    assert verdicts[0].reason == "model_type is 'toy'" and verdicts[0].plugin == "toy"
    context = RunnerContext.for_model(spec, config)
    runner = host.hook.create_runner(backend="toy", spec=spec, config=config, context=context)
    assert isinstance(runner, ToyRunner)
    assert (
        host.hook.create_runner(backend="other", spec=spec, config=config, context=context) is None
    )

    (tmp_path / "config.json").write_text(json.dumps({**TOY_CONFIG, "model_type": "llama"}))
    (verdict,) = probe_backends(read_model_spec(tmp_path), config, host)
    assert not verdict.supported and verdict.reason == "only runs model_type 'toy', this is 'llama'"


def score(engine: LLMEngine, prompt: list[int], rid: str = "score") -> float:
    engine.add_request(rid, prompt, GenerationConfig(), score_only=True)
    results = {rid: Result()}
    drain(engine, results)
    assert results[rid].token_ids == [] and results[rid].final.finish_reason == "stop"
    return results[rid].final.prompt_logprob_sum


def reference_score(prompt: list[int]) -> float:
    return sum(
        reference_logits(prompt[:i], VOCAB).log_softmax(0)[prompt[i]].item()
        for i in range(1, len(prompt))
    )


def test_score_only_sums_the_prompt_logprobs(spec: ModelSpec) -> None:
    prompt = prompts(1, range(40, 41), seed=12)[0]
    engine = make_engine(
        spec, max_num_batched_tokens=16, max_batch_size=4, enable_prefix_caching=False
    )
    assert score(engine, prompt) == pytest.approx(reference_score(prompt), rel=1e-5)


def test_score_only_is_not_shortened_by_the_prefix_cache(spec: ModelSpec) -> None:
    # Cached blocks would skip positions whose logits the score needs.
    prompt = prompts(1, range(30, 31), seed=13)[0]
    engine = make_engine(spec)
    assert score(engine, prompt, "first") == pytest.approx(reference_score(prompt), rel=1e-5)
    assert score(engine, prompt, "second") == pytest.approx(reference_score(prompt), rel=1e-5)


def test_score_only_survives_preemption(spec: ModelSpec) -> None:
    # The sum of the chunks computed before the preemption must not be counted twice.
    engine = make_engine(
        spec,
        kv_cache_memory=ONE_CONTEXT_BYTES,
        enable_prefix_caching=False,
        max_num_batched_tokens=16,
        max_batch_size=4,
    )
    prompt = list(range(40, 80))
    # "gen" is admitted first; as it grows, the newer "score" is preempted mid-prefill.
    engine.add_request("gen", list(range(1, 31)), greedy(33))
    engine.add_request("score", prompt, GenerationConfig(), score_only=True)
    results = {"gen": Result(), "score": Result()}
    drain(engine, results)
    assert engine.scheduler.num_preemptions > 0
    total = results["score"].final.prompt_logprob_sum
    assert total == pytest.approx(reference_score(prompt), rel=1e-5)


def test_a_stop_id_outside_the_vocabulary_is_a_request_error(spec: ModelSpec) -> None:
    # Refused up front: in the step it would break every request of the batch.
    engine = make_engine(spec)
    bad = GenerationConfig(max_new_tokens=4, min_new_tokens=2, stop_token_ids=[VOCAB + 10])
    with pytest.raises(RequestError, match="stop_token_ids"):
        engine.add_request("bad", [4, 5, 6], bad)
    r = run(engine, {"ok": ([1, 2, 3], greedy(4))})["ok"]
    assert r.token_ids == reference([1, 2, 3], 4)[0]


def test_text_decoder_matches_the_tokenizers_decode(tmp_path: Path) -> None:
    """The detokenizer's shortcut to the Rust tokenizer gives what `decode` gives, special
    tokens and broken UTF-8 included; a tokenizer of another kind goes through `decode`."""
    from transformers import AutoTokenizer

    from enginehouse.engine.detokenizer import text_decoder
    from enginehouse.testing import build_tokenizer

    build_tokenizer(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    fast = text_decoder(tok)
    assert fast.__code__ is not text_decoder(ToyTokenizer()).__code__  # the shortcut is taken
    rng = random.Random(0)
    for _ in range(200):
        ids = [rng.randrange(len(tok)) for _ in range(rng.randint(1, 8))]
        for skip in (False, True):
            want = tok.decode(ids, skip_special_tokens=skip, clean_up_tokenization_spaces=False)
            assert fast(ids, skip) == want


def test_a_together_batch_joins_one_step_while_the_engine_is_busy(spec: ModelSpec) -> None:
    """The step thread runs steps back to back; requests submitted inside `together()` still
    reach it as one batch: their first tokens come out of the same step."""
    import threading
    import time

    from enginehouse.engine import AsyncEngine

    engine = make_engine(spec)
    driver = AsyncEngine(engine)
    try:
        first_step: dict[str, int] = {}
        finished = threading.Semaphore(0)

        def busy_sink(out: RequestOutput) -> None:  # on the step thread: each step >= 1 ms
            time.sleep(0.001)

        def sink(out: RequestOutput) -> None:  # called on the step thread, after the step
            first_step.setdefault(out.request_id, engine.core.num_steps)
            if out.finished:
                finished.release()

        driver.submit([1, 2, 3], greedy(CONTEXT - 4), busy_sink, request_id="busy")
        while engine.core.num_steps < 3:  # the step thread is running steps back to back
            time.sleep(0.001)
        with driver.together():
            for i, prompt in enumerate(prompts(8, range(4, 12))):
                driver.submit(prompt, greedy(2), sink, request_id=f"r{i}")
                time.sleep(0.005)  # several steps run meanwhile
        assert all(finished.acquire(timeout=60) for _ in range(8))
        assert len(set(first_step.values())) == 1, first_step
    finally:
        driver.close()
