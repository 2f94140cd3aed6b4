"""The pipeline end to end, checked against transformers itself.

The family-equivalence tests run on both backends, the native `pytorch` one and `transformers`.
The request-handling tests (sampling, streams, stops, logprobs, chat, errors, abort, async) run on
the default backend, which for these tiny Llamas is the native one. Each backend's own robustness
checks (unbatched fallback, slot attention, NaN in unwritten KV memory) name their backend.
"""

from __future__ import annotations

import asyncio
import math

import pytest
import torch
from pydantic import ValidationError
from transformers import AutoModelForCausalLM, AutoTokenizer

from enginehouse import GenerationConfig, ScheduledBatch, SeqChunk, pipeline
from enginehouse.errors import RequestError
from enginehouse.testing import hf_greedy

PROMPTS = [
    "hello world the quick brown fox",
    "cache",
    "über straße 東京 数据 😀 the engine model token train paper light blue green river city",
]
LONG = " ".join(PROMPTS * 2)  # 46 tokens: three of the native runner's 16-token blocks
BACKENDS = ["pytorch", "transformers"]


@pytest.fixture(scope="module")
def hf(tiny_models):
    """transformers' own model and tokenizer for each family, loaded once."""
    loaded = {}
    for name, path in tiny_models.items():
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        loaded[name] = (model, AutoTokenizer.from_pretrained(path))
    return loaded


def fixed(n: int, **kw) -> GenerationConfig:
    return GenerationConfig(max_new_tokens=n, min_new_tokens=n, **kw)


@pytest.fixture(scope="module")
def hf_pipe(llama_dir):
    """The tiny Llama on the transformers backend, for the tests of that runner's internals."""
    with pipeline(
        str(llama_dir),
        backend="transformers",
        engine_config={"max_batch_size": 16},
        progress=False,
    ) as pipe:
        yield pipe


def test_default_pipe_is_native_and_hf_pipe_is_transformers(llama_pipe, hf_pipe):
    from enginehouse_pytorch.hf_runner import TransformersRunner
    from enginehouse_pytorch.native_runner import NativeRunner

    assert isinstance(llama_pipe.runner, NativeRunner)
    assert isinstance(hf_pipe.runner, TransformersRunner)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_greedy_equals_transformers_alone_and_batched(family, backend, tiny_models, hf):
    model, tok = hf[family]
    lengths = [24, 7, 40]
    expected = [hf_greedy(model, tok, p, n) for p, n in zip(PROMPTS, lengths)]
    with pipeline(str(tiny_models[family]), backend=backend, progress=False) as pipe:
        alone = pipe(PROMPTS[0], fixed(lengths[0]), apply_chat_template=False)
        assert alone.token_ids == expected[0]
        assert alone.text == tok.decode(expected[0], skip_special_tokens=True)
        batched = pipe(PROMPTS, [fixed(n) for n in lengths], apply_chat_template=False)
    assert [r.token_ids for r in batched] == expected
    assert [r.generate_token_len for r in batched] == lengths
    assert all(r.finish_reason == "length" for r in batched)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_logits_equal_transformers_forward(family, backend, tiny_models, hf):
    model, tok = hf[family]
    with pipeline(str(tiny_models[family]), backend=backend, progress=False) as pipe:
        runner = pipe.runner
        # The context length for transformers (one block per sequence), 16 for pytorch.
        bs = runner.kv_spec.block_size
        seqs = [tok(p).input_ids for p in [*PROMPTS[:2], LONG]]
        free = iter(range(pipe.stats()["kv_blocks_total"]))

        def table(length: int) -> tuple[int, ...]:
            """Distinct, unused block ids enough for `length` positions."""
            return tuple(next(free) for _ in range(math.ceil(length / bs)))

        # The three sequences prefilled in one batch, then the third again in two chunks, each
        # asking for the logits of its last position (a step asking for none is tested below).
        first = [
            SeqChunk(i, tuple(ids), 0, table(len(ids)), (len(ids) - 1,))
            for i, ids in enumerate(seqs)
        ]
        last = seqs[2]
        blocks = table(len(last))
        assert len(blocks) == (3 if backend == "pytorch" else 1)
        # Split inside the second block: the second chunk starts in a half-written block.
        split = [
            SeqChunk(3, tuple(last[:20]), 0, blocks, (19,)),
            SeqChunk(3, tuple(last[20:]), 20, blocks, tuple(range(len(last) - 20))),
        ]
        got = runner.execute(ScheduledBatch(tuple(first), bs))
        head = runner.execute(ScheduledBatch(split[:1], bs))
        chunked = runner.execute(ScheduledBatch(split[1:], bs))
    with torch.no_grad():
        want = [model(torch.tensor([ids])).logits[0] for ids in seqs]
    for row, ref in zip(got, want):
        torch.testing.assert_close(row, ref[-1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(head, want[2][19:20], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(chunked, want[2][20:], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_chunked_prefill_and_queueing_keep_tokens(backend, llama_dir, hf):
    model, tok = hf["llama"]
    expected = [hf_greedy(model, tok, p, 12) for p in PROMPTS]
    # A 16-token step budget splits the long prompt; two sequences at a time make requests queue.
    config = {"max_num_batched_tokens": 16, "max_batch_size": 2, "session_len": 64}
    with pipeline(str(llama_dir), backend=backend, engine_config=config, progress=False) as pipe:
        out = pipe(PROMPTS * 2, fixed(12), apply_chat_template=False)
        assert pipe.stats()["kv_blocks_used"] == 0
    assert [r.token_ids for r in out] == expected * 2


@pytest.mark.parametrize("backend", ["pytorch", "transformers"])
def test_a_lone_prompt_longer_than_the_step_budget(backend, llama_dir, hf):
    # Alone in the engine, the long prompt's first chunks are steps that need no logits at all.
    model, tok = hf["llama"]
    config = {"max_num_batched_tokens": 16, "max_batch_size": 2}
    assert len(tok(LONG).input_ids) > 2 * 16
    with pipeline(str(llama_dir), backend=backend, engine_config=config, progress=False) as pipe:
        out = pipe(LONG, fixed(5), apply_chat_template=False)
    assert out.error is None
    assert out.token_ids == hf_greedy(model, tok, LONG, 5)


def test_seeded_sampling_reproduces_alone_and_batched(llama_pipe):
    cfg = GenerationConfig(
        max_new_tokens=16,
        do_sample=True,
        temperature=0.9,
        top_k=50,
        top_p=0.95,
        random_seed=1234,
        ignore_eos=True,
    )
    a = llama_pipe(PROMPTS[0], cfg, apply_chat_template=False)
    b = llama_pipe(PROMPTS[0], cfg, apply_chat_template=False)
    batch = llama_pipe(PROMPTS, cfg, apply_chat_template=False)
    assert a.token_ids == b.token_ids == batch[0].token_ids
    other = llama_pipe(
        PROMPTS[0], cfg.model_copy(update={"random_seed": 99}), apply_chat_template=False
    )
    assert other.token_ids != a.token_ids


def test_stream_deltas_add_up(llama_pipe):
    full = llama_pipe(PROMPTS, fixed(20), apply_chat_template=False)
    texts, ids, reasons = ["", "", ""], [[], [], []], [None] * 3
    for delta in llama_pipe.stream(PROMPTS, fixed(20), apply_chat_template=False):
        texts[delta.index] += delta.text
        ids[delta.index] += delta.token_ids
        reasons[delta.index] = delta.finish_reason or reasons[delta.index]
    assert texts == [r.text for r in full]
    assert ids == [r.token_ids for r in full]
    assert reasons == ["length"] * 3


def test_stop_words_and_stop_tokens(llama_pipe):
    base = llama_pipe(PROMPTS[0], fixed(30), apply_chat_template=False)
    stop_id = base.token_ids[5]
    by_id = llama_pipe(
        PROMPTS[0],
        GenerationConfig(max_new_tokens=30, stop_token_ids=[stop_id]),
        apply_chat_template=False,
    )
    assert by_id.finish_reason == "stop"
    assert by_id.token_ids == base.token_ids[: base.token_ids.index(stop_id) + 1]
    word = base.text[10:13]
    by_word = llama_pipe(
        PROMPTS[0],
        GenerationConfig(max_new_tokens=30, stop_words=[word]),
        apply_chat_template=False,
    )
    assert by_word.finish_reason == "stop"
    assert by_word.text == base.text[: base.text.index(word)]
    streamed = "".join(
        d.text
        for d in llama_pipe.stream(
            PROMPTS[0],
            GenerationConfig(max_new_tokens=30, stop_words=[word]),
            apply_chat_template=False,
        )
    )
    assert streamed == by_word.text  # a stop word is never half-sent while streaming


def test_logprobs_match_model(llama_dir, llama_pipe, hf):
    model, tok = hf["llama"]
    r = llama_pipe(PROMPTS[1], fixed(3, logprobs=2), apply_chat_template=False)
    assert len(r.logprobs) == 3 and all(len(lp) in (2, 3) for lp in r.logprobs)
    ids = tok(PROMPTS[1]).input_ids
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0, -1].log_softmax(-1)
    assert r.logprobs[0][r.token_ids[0]] == pytest.approx(ref[r.token_ids[0]].item(), abs=1e-5)
    assert max(r.logprobs[0].values()) == pytest.approx(ref.max().item(), abs=1e-5)


def test_get_ppl_equals_transformers_loss(llama_pipe, hf):
    model, tok = hf["llama"]
    prompts = [PROMPTS[0], PROMPTS[2]]
    for prompt, ppl in zip(prompts, llama_pipe.get_ppl(prompts)):
        ids = tok(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            ref = torch.exp(model(ids, labels=ids).loss).item()
        assert ppl == pytest.approx(ref, rel=1e-4)
    with pytest.raises(RequestError, match="at least two tokens"):
        llama_pipe.get_ppl("cache")  # a single token: nothing to predict


def test_chat_template_and_sessions(llama_pipe):
    tok = llama_pipe.tokenizer
    messages = [{"role": "user", "content": "hello"}]
    want = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    r = llama_pipe("hello", fixed(4))
    assert r.input_token_len == len(tok.encode(want, add_special_tokens=False))
    assert llama_pipe(messages, fixed(4)).token_ids == r.token_ids
    session = llama_pipe.chat("hello", gen_config=fixed(4))
    session = llama_pipe.chat("and again", session, gen_config=fixed(4))
    assert [m["role"] for m in session.history] == ["user", "assistant", "user", "assistant"]
    assert session.response.input_token_len > r.input_token_len
    token_prompt = llama_pipe({"token_ids": [5, 6, 7]}, fixed(4))
    assert token_prompt.input_token_len == 3


def test_bad_requests_fail_alone(llama_pipe):
    too_long = "the " * 400
    with pytest.raises(RequestError, match=r"tokens but the context holds 256"):
        llama_pipe(too_long, apply_chat_template=False)
    out = llama_pipe([PROMPTS[0], too_long, PROMPTS[1]], fixed(5), apply_chat_template=False)
    assert [r.finish_reason for r in out] == ["length", "error", "length"]
    assert "session_len" in out[1].error
    with pytest.raises(RequestError, match="outside the vocabulary"):
        llama_pipe({"token_ids": [1, 10**6]})
    with pytest.raises(RequestError, match="must be {'token_ids'"):
        llama_pipe({"no_role": 1})
    with pytest.raises(RequestError, match="a prompt must be"):
        llama_pipe(42)
    with pytest.raises(ValidationError, match="top_p"):
        GenerationConfig(top_p=1.5)
    with pytest.raises(ValidationError, match="not_a_field"):
        GenerationConfig(not_a_field=1)
    assert llama_pipe(PROMPTS[0], fixed(3), apply_chat_template=False).generate_token_len == 3


def test_leaving_a_stream_early_aborts_and_frees_blocks(llama_pipe):
    stream = llama_pipe.stream(PROMPTS[0], fixed(200), apply_chat_template=False)
    next(stream)
    stream.close()
    for _ in range(100):
        if llama_pipe.stats()["kv_blocks_used"] == 0:
            break
        asyncio.run(asyncio.sleep(0.02))
    stats = llama_pipe.stats()
    assert stats["steps"] >= 1 and stats["step_sequences"] >= stats["steps"]
    assert {k: stats[k] for k in ("running", "waiting", "kv_blocks_used", "preemptions")} == {
        "running": 0,
        "waiting": 0,
        "kv_blocks_used": 0,
        "preemptions": 0,
    }


def test_async_api_and_use_inside_a_running_loop(llama_pipe):
    ids = llama_pipe.encode(PROMPTS[0], apply_chat_template=False)
    want = llama_pipe(PROMPTS[0], fixed(6), apply_chat_template=False).token_ids

    async def main():
        # The sync API works inside a running loop (as in Jupyter): the engine has its own.
        sync = llama_pipe(PROMPTS[0], fixed(6), apply_chat_template=False).token_ids
        got = [t async for out in llama_pipe.engine.astream(ids, fixed(6)) for t in out.token_ids]
        return sync, got

    assert asyncio.run(main()) == (want, want)


def test_a_request_id_in_use_is_refused(llama_pipe):
    ids = llama_pipe.encode(PROMPTS[0], apply_chat_template=False)

    async def main():
        first = llama_pipe.engine.astream(ids, fixed(30), request_id="same")
        got = [await first.__anext__()]
        with pytest.raises(RequestError, match="already in use"):
            await llama_pipe.engine.astream(ids, fixed(3), request_id="same").__anext__()
        got += [out async for out in first]
        return got

    outputs = asyncio.run(main())
    assert outputs[-1].finish_reason == "length"
    assert sum(len(o.token_ids) for o in outputs) == 30


def test_models_without_custom_attention_run_unbatched_with_the_same_tokens(
    llama_dir, hf, monkeypatch
):
    from enginehouse_pytorch import kv_layout

    monkeypatch.setattr(kv_layout, "_why_unbatched", lambda *args: "forced by test")
    model, tok = hf["llama"]
    lengths = [9, 5, 13]
    with pipeline(str(llama_dir), backend="transformers", progress=False) as pipe:
        runner = pipe.runner
        assert runner.slots is None and runner.unbatched_reason == "forced by test"
        out = pipe(PROMPTS, [fixed(n) for n in lengths], apply_chat_template=False)
        assert runner.caches == {}  # the engine released every finished sequence
    assert [r.token_ids for r in out] == [
        hf_greedy(model, tok, p, n) for p, n in zip(PROMPTS, lengths)
    ]


def test_batched_slots_are_used_for_native_attention_models(hf_pipe):
    runner = hf_pipe.runner
    assert runner.slots is not None and runner.unbatched_reason is None


def test_batched_decoding_never_reads_unwritten_kv(hf_pipe, hf):
    # Fill the KV storage with NaN, as reused memory may hold: padded positions of short rows
    # are masked out, and must not turn the whole batch into NaN (0 * NaN is NaN).
    slots = hf_pipe.runner.slots
    for tensor in [*slots.keys.values(), *slots.values.values()]:
        tensor.fill_(float("nan"))
    slots.finite_upto = [0] * len(slots.finite_upto)
    model, tok = hf["llama"]
    lengths = [20, 6, 11]
    out = hf_pipe(PROMPTS, [fixed(n) for n in lengths], apply_chat_template=False)
    assert [r.token_ids for r in out] == [
        hf_greedy(model, tok, p, n) for p, n in zip(PROMPTS, lengths)
    ]


def test_native_batched_decoding_never_reads_unwritten_kv(llama_dir, hf):
    # The native cache is allocated uninitialised and blocks are reused: attention must read
    # only slots written for the sequence, and padding only the null slot (zeros, always).
    model, tok = hf["llama"]
    prompts, lengths = [*PROMPTS, LONG], [20, 6, 11, 9]  # 6, 1, 16 and 46 prompt tokens
    with pipeline(
        str(llama_dir), backend="pytorch", engine_config={"max_batch_size": 16}, progress=False
    ) as pipe:
        runner = pipe.runner
        pipe(PROMPTS[0], fixed(4), apply_chat_template=False)
        null = runner.null_slot
        for k, v in runner.kv:
            for tensor in (k, v):
                assert tensor.shape[1] > null  # [kv_heads, slots, head_dim]
                tensor[:, :null].fill_(float("nan"))
                tensor[:, null + 1 :].fill_(float("nan"))
                assert not tensor[:, null].any()
        out = pipe(prompts, [fixed(n) for n in lengths], apply_chat_template=False)
        assert all(not t[:, null].any() for kv in runner.kv for t in kv)  # never written
    assert [r.token_ids for r in out] == [
        hf_greedy(model, tok, p, n) for p, n in zip(prompts, lengths)
    ]
