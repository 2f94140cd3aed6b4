"""Gemma 3's text model on the native backend, against transformers (decodes through the C++
one-call decode step, and the per-op path).

A small random-weight `Gemma3TextConfig` model: six layers, five local (sliding window of 8
tokens) to one global, each kind with its own rope (the global one with linear scaling, as
Gemma 3 4B and larger have), q/k norms, sandwich norms, (1 + w) norms, the embedding scale and
query_pre_attn_scalar. Logits in float32 at 1e-5, greedy tokens alone, in a batch of prompts
of different lengths with a small chunk budget, with prefix-cache hits and under preemption;
prompts and answers run past several windows, so the sliding group frees blocks as they go.
"""

from __future__ import annotations

import copy
import random

import pytest
import torch
from test_native import open_pipe, randomize_constant_tensors, rewrite_weights
from transformers import AutoModelForCausalLM, Gemma3TextConfig

from enginehouse import GenerationConfig, ScheduledBatch, SeqChunk, explain
from enginehouse.testing import build_model

WINDOW = 8
CONFIG = Gemma3TextConfig(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=6,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=256,
    sliding_window=WINDOW,
    query_pre_attn_scalar=16,
    initializer_range=0.2,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
    rope_parameters={
        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1000000.0},
    },
)
# Greedy decoding of a random model with tied, scaled embeddings only repeats the prompt's
# last token (see tests/test_native.py): the token tests untie them.
UNTIED = copy.deepcopy(CONFIG)
UNTIED.tie_word_embeddings = False
LOGITS_TOL = dict(rtol=1e-5, atol=1e-5)
GREEDY = [(7, 16), (40, 8), (19, 20), (33, 12)]


def tokens(n: int, seed: int) -> list[int]:
    return random.Random(seed).choices(range(5, 512), k=n)


def fixed(n: int) -> GenerationConfig:
    return GenerationConfig(max_new_tokens=n, min_new_tokens=n)


@pytest.fixture(scope="module")
def models(models_dir):
    out = {}
    for name, config in (("tied", CONFIG), ("untied", UNTIED)):
        folder = build_model(models_dir / "gemma3" / name, config)
        rewrite_weights(folder, randomize_constant_tensors)
        out[name] = folder
    return out


@pytest.fixture(scope="module")
def refs(models):
    return {
        name: AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        for name, path in models.items()
    }


def greedy(model, ids: list[int], n: int) -> list[int]:
    x = torch.tensor([ids])
    out = model.generate(
        x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n, do_sample=False
    )
    return out[0, len(ids) :].tolist()


def test_arch_reads_layer_types_and_both_ropes(models):
    from enginehouse_pytorch.native.arch import arch_from_config

    config = CONFIG.to_dict()
    arch = arch_from_config("Gemma3ForCausalLM", config)
    assert arch.windows == (WINDOW,) * 5 + (None,)
    assert arch.rope.kind == "linear" and arch.rope.theta == 1e6
    assert arch.rope_local is not None and arch.rope_local.theta == 1e4
    assert arch.layer_rope(0) is arch.rope_local and arch.layer_rope(5) is arch.rope
    assert arch.qk_norm and arch.norm_plus_one and arch.sandwich_norm
    assert arch.attn_scale == 16**-0.5 and arch.attn_softcap is None


@torch.no_grad()
def test_logits_equal_transformers_prefill_decode_and_chunks(models, refs):
    ref = refs["tied"]
    with open_pipe(models["tied"], enable_prefix_caching=False) as pipe:
        runner = pipe.runner
        bs = runner.kv_spec.block_size
        assert [g.kind for g in runner.kv_spec.groups] == ["full", "sliding"]
        space = min(pipe.stats()["kv_group_blocks_total"])
        lengths = [5, 21, 37]
        prompts = [tokens(n, seed=i) for i, n in enumerate(lengths)]
        fed = [tokens(3, seed=100 + i) for i in range(len(prompts))]
        ids = random.Random(0).sample(range(space), 3 * 4)
        tables = [tuple(ids[4 * i : 4 * i + 4]) for i in range(3)]

        def run(chunks):
            return runner.execute(ScheduledBatch(tuple(chunks), bs))

        want = [ref(torch.tensor([p + f])).logits[0] for p, f in zip(prompts, fed)]
        # The longest prompt in two chunks (the second reads the first's KV through the
        # window), the others whole, in one step.
        split = 20
        first = [SeqChunk(0, tuple(prompts[0]), 0, tables[0], tuple(range(5)))]
        first += [SeqChunk(1, tuple(prompts[1]), 0, tables[1], tuple(range(21)))]
        first += [SeqChunk(2, tuple(prompts[2][:split]), 0, tables[2], tuple(range(split)))]
        got = run(first).split([5, 21, split])
        torch.testing.assert_close(got[0], want[0][:5], **LOGITS_TOL)
        torch.testing.assert_close(got[1], want[1][:21], **LOGITS_TOL)
        torch.testing.assert_close(got[2], want[2][:split], **LOGITS_TOL)
        rest = tuple(prompts[2][split:])
        got = run([SeqChunk(2, rest, split, tables[2], tuple(range(len(rest))))])
        torch.testing.assert_close(got, want[2][split:37], **LOGITS_TOL)
        # Decodes through each CPU path: the one-call step from ids to logits (each layer
        # reading its KV group's tables and rope; q/k, sandwich norms, GELU, the embedding
        # scale inside), the layers in one call, and the per-op path.
        fast, one_call = runner.decode, runner.model.step
        assert fast is not None and one_call is not None
        for step in range(3):
            batch = [
                SeqChunk(i, (fed[i][step],), len(p) + step, tables[i], (0,))
                for i, p in enumerate(prompts)
            ]
            assert fast.run(ScheduledBatch(tuple(batch), bs)) is not None
            try:
                for runner.decode, runner.model.step in (
                    (fast, one_call),
                    (None, one_call),
                    (None, None),
                ):
                    got = run(batch)
                    for i, p in enumerate(prompts):
                        torch.testing.assert_close(got[i], want[i][len(p) + step], **LOGITS_TOL)
            finally:
                runner.decode, runner.model.step = fast, one_call


def test_greedy_alone_and_batched_with_small_chunks(models, refs):
    ref = refs["untied"]
    prompts = [tokens(n, seed=200 + i) for i, (n, _) in enumerate(GREEDY)]
    expected = [greedy(ref, p, n) for p, (_, n) in zip(prompts, GREEDY)]
    assert all(len(set(a)) >= 3 for a in expected), expected
    with open_pipe(models["untied"], enable_prefix_caching=False) as pipe:
        for p, (_, n), want in zip(prompts, GREEDY, expected):
            assert pipe({"token_ids": p}, fixed(n)).token_ids == want
    config = dict(max_num_batched_tokens=16, max_batch_size=4, enable_prefix_caching=False)
    with open_pipe(models["untied"], **config) as pipe:
        out = pipe([{"token_ids": p} for p in prompts], [fixed(n) for _, n in GREEDY])
        assert pipe.stats()["kv_blocks_used"] == 0
    assert [r.token_ids for r in out] == expected


def test_prefix_hit_and_preemption_keep_tokens(models, refs):
    ref = refs["untied"]
    shared = tokens(40, seed=300)
    first, second = shared + tokens(5, seed=301), shared + tokens(9, seed=302)
    want = [greedy(ref, first, 6), greedy(ref, second, 6)]
    with open_pipe(models["untied"], enable_prefix_caching=True) as pipe:
        a = pipe({"token_ids": first}, fixed(6))
        b = pipe({"token_ids": second}, fixed(6))
        # The window's blocks before the hit were freed but stay findable until reused.
        assert b.cached_tokens == 32
        assert [a.token_ids, b.token_ids] == want
        assert pipe.stats()["kv_blocks_used"] == 0
    prompts = [tokens(n, seed=200 + i) for i, (n, _) in enumerate(GREEDY)]
    expected = [greedy(ref, p, n) for p, (_, n) in zip(prompts, GREEDY)]
    # Blocks of 4 and a budget of 17 blocks of every layer: the full group gets 17 blocks,
    # and the three first prompts need 18 of them by the end, so something is preempted.
    per_token = 2 * 6 * 2 * 16 * 4
    config = dict(session_len=64, block_size=4, kv_cache_memory=f"{17 * 4 * per_token}B")
    with open_pipe(models["untied"], **config) as pipe:
        out = pipe([{"token_ids": p} for p in prompts], [fixed(n) for _, n in GREEDY])
        stats = pipe.stats()
    assert stats["preemptions"] > 0
    assert [r.token_ids for r in out] == expected
    assert stats["kv_blocks_used"] == 0


def test_explain_names_the_groups(models):
    report = explain(str(models["tied"]))
    assert report["chosen"] == "pytorch"
    verdict = next(v for v in report["verdicts"] if v["backend"] == "pytorch")
    assert "native gemma3 " in verdict["reason"]
    assert "full attention (1 layer," in verdict["reason"]
    assert f"sliding window {WINDOW} (5 layers" in verdict["reason"]
    assert "KV cache 1536 B/token (float32)" in verdict["reason"]
    # int8: 16 bytes and a 4-byte scale per head instead of 64 bytes.
    report = explain(str(models["tied"]), engine_config={"kv_cache_dtype": "int8"})
    verdict = next(v for v in report["verdicts"] if v["backend"] == "pytorch")
    assert "KV cache 480 B/token (int8, a scale per token and head)" in verdict["reason"]
    assert report["chosen"] == "pytorch"


def test_the_conformance_kit_passes_with_kv_groups(models):
    from enginehouse.conformance import run_conformance

    report = run_conformance("pytorch", models["untied"], families=[])
    lines = "\n".join(r.line() for r in report.results)
    assert report.ok, lines
    assert "promised" in report.result("kv-spec").detail, lines
    assert "gave tp=1's tokens" in report.result("tensor-parallel").detail, lines  # tp=2
