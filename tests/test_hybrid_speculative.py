"""Speculative decoding on a hybrid model (Qwen3-Next): the linear-attention layers keep their
state after every verified position and resume from the one at the last accepted token.

A tiny Qwen3-Next with tied embeddings whose layers' outputs are scaled down (random weights
like these fall into runs of a repeated token, so prompt lookup's proposals are kept about half
the time, and rejected where a run ends): greedy tokens with n-gram speculation equal plain
decoding's and transformers', alone, in a batch whose prompts are prefilled in small chunks next
to verify steps, with prefix hits (states saved at block boundaries) and under preemption; the
target as its own draft; seeded sampling reproducible; the conformance kit's verify-tokens
check; explain no longer refuses.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_native import open_pipe, randomize_constant_tensors, rewrite_weights
from test_qwen3_next import CONFIGS, fixed, ref_greedy
from test_speculative import PROMPTS
from transformers import AutoModelForCausalLM

from enginehouse import GenerationConfig, explain
from enginehouse.testing import build_model

NGRAM = {
    "method": "ngram",
    "num_speculative_tokens": 3,
    "prompt_lookup_min": 1,
    "prompt_lookup_max": 3,
}
LENGTHS = [14, 9, 20, 12]


@pytest.fixture(scope="module")
def loopy(tmp_path_factory):
    config = CONFIGS["qwen3_next"]()
    config.tie_word_embeddings = True
    folder = build_model(tmp_path_factory.mktemp("loopy") / "model", config)
    rewrite_weights(folder, randomize_constant_tensors)
    tensors = load_file(folder / "model.safetensors")
    for name in tensors:
        if any(k in name for k in ("o_proj", "down_proj", "out_proj")):
            tensors[name] = tensors[name] * 0.45
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


@pytest.fixture(scope="module")
def answers(loopy):
    """transformers' greedy tokens for PROMPTS (LENGTHS new tokens each)."""
    ref = AutoModelForCausalLM.from_pretrained(loopy, dtype=torch.float32).eval()
    return [ref_greedy(ref, p, n) for p, n in zip(PROMPTS, LENGTHS)]


def run(pipe, prompts=PROMPTS, lengths=LENGTHS, **params):
    out = pipe([{"token_ids": p} for p in prompts], [fixed(n, **params) for n in lengths])
    return [r.token_ids for r in out]


def check_acceptance(stats: dict) -> None:
    """Proposals were made, some kept and some rejected."""
    assert stats["spec_decode_num_drafts"] > 0
    assert 0 < stats["spec_decode_num_accepted_tokens"] < stats["spec_decode_num_draft_tokens"]


def test_ngram_greedy_equals_plain_and_transformers(loopy, answers):
    """Alone, batched, and batched with a small chunk budget (prompts prefilled in chunks in
    the steps that verify other sequences' proposals)."""
    with open_pipe(loopy, max_batch_size=8) as pipe:
        plain = run(pipe)
    assert plain == answers
    with open_pipe(loopy, max_batch_size=8, speculative_config=NGRAM) as pipe:
        alone = [run(pipe, [p], [n])[0] for p, n in zip(PROMPTS, LENGTHS)]
        batched = run(pipe)
        stats = pipe.stats()
        assert pipe.runner.verified == {} and pipe.runner.started == set()
    assert alone == batched == answers
    check_acceptance(stats)
    assert stats["kv_group_blocks_used"] == [0, 0]
    with open_pipe(
        loopy, max_batch_size=8, max_num_batched_tokens=16, speculative_config=NGRAM
    ) as pipe:
        seen = []
        execute = pipe.runner.execute
        pipe.runner.execute = lambda batch: seen.append(batch) or execute(batch)
        # The longer prompts arrive while the short ones already verify.
        chunked = run(pipe)
        check_acceptance(pipe.stats())
    assert chunked == answers
    assert any(
        any(c.verify and len(c.token_ids) > 1 for c in b.chunks)
        and any(not c.verify and len(c.token_ids) > 1 for c in b.chunks)
        for b in seen
    ), "no step verified proposals next to a prefill chunk"


def test_prefix_hits_keep_the_tokens(loopy, answers):
    """Blocks of 4: verify chunks cross block boundaries, whose states are saved only where
    the tokens up to them were accepted; the second round resumes from saved states."""
    with open_pipe(loopy, block_size=4, speculative_config=NGRAM) as pipe:
        assert pipe.runner.kv_spec.groups[1].snapshots
        first = run(pipe)
        out = pipe([{"token_ids": p} for p in PROMPTS], [fixed(n) for n in LENGTHS])
        check_acceptance(pipe.stats())
        assert pipe.stats()["kv_group_blocks_used"][0] == 0
    assert first == [r.token_ids for r in out] == answers
    assert all(r.cached_tokens for r in out)
    # Whole outputs cached: prompts that continue them hit past where proposals were kept.
    longer = [p + a for p, a in zip(PROMPTS, answers)]
    with open_pipe(loopy, block_size=4) as pipe:
        want = run(pipe, longer, [6] * 4)
    with open_pipe(loopy, block_size=4, speculative_config=NGRAM) as pipe:
        run(pipe)
        out = pipe([{"token_ids": p} for p in longer], [fixed(6)] * 4)
    assert [r.token_ids for r in out] == want
    assert all(r.cached_tokens > len(p) for r, p in zip(out, PROMPTS))


def test_preemption_keeps_the_tokens(loopy, answers):
    """Room for about one long context: sequences are preempted (their verified states
    dropped) and recomputed, through the prefix cache or from the start."""
    with open_pipe(loopy, max_batch_size=4) as probe:
        full, state = probe.runner.kv_spec.groups
    blocks = 70 // 4 + 1
    for caching in (False, True):
        slots = 8 if caching else 4  # a live slot per sequence, and as many for snapshots
        budget = blocks * 4 * full.bytes_per_token + slots * state.bytes_per_seq
        engine = dict(
            session_len=70,
            block_size=4,
            kv_cache_memory=f"{budget}B",
            max_batch_size=4,
            enable_prefix_caching=caching,
            speculative_config=NGRAM,
        )
        with open_pipe(loopy, **engine) as pipe:
            got = run(pipe)
            stats = pipe.stats()
            assert pipe.runner.verified == {}
        assert stats["preemptions"] > 0
        assert got == answers
        check_acceptance(stats)


def test_the_target_as_its_own_draft(loopy, answers):
    """Every proposal kept (100% acceptance); the tokens are the plain ones."""
    spec = {"method": "draft_model", "model": str(loopy), "num_speculative_tokens": 3}
    with open_pipe(loopy, max_batch_size=8, speculative_config=spec) as pipe:
        got = run(pipe)
        stats = pipe.stats()
    assert got == answers
    assert stats["spec_decode_acceptance_rate"] == 1.0
    assert stats["spec_decode_mean_accepted_length"] > 3


def test_a_rejecting_hybrid_draft_keeps_the_tokens(loopy, answers, tmp_path):
    """A hybrid draft that guesses badly (another random Qwen3-Next): its state cannot be
    rewound past rejected proposals, so it recomputes; the tokens are the plain ones."""
    from transformers import AutoTokenizer

    config = CONFIGS["qwen3_next"]()
    config.num_hidden_layers = 2
    config.layer_types = ["linear_attention", "full_attention"]
    tok = AutoTokenizer.from_pretrained(loopy)
    draft = build_model(tmp_path / "draft", config, tokenizer=tok)
    spec = {"method": "draft_model", "model": str(draft), "num_speculative_tokens": 3}
    with open_pipe(loopy, max_batch_size=8, speculative_config=spec) as pipe:
        got = run(pipe)
        stats = pipe.stats()
    assert got == answers
    assert stats["spec_decode_num_drafts"] > 0
    assert stats["spec_decode_num_accepted_tokens"] < stats["spec_decode_num_draft_tokens"]


def test_seeded_sampling_is_reproducible(loopy):
    params = GenerationConfig(max_new_tokens=16, do_sample=True, temperature=0.3, random_seed=7)
    with open_pipe(loopy, speculative_config=NGRAM) as pipe:
        a = pipe([{"token_ids": PROMPTS[1]}] * 2, [params] * 2)
        b = pipe({"token_ids": PROMPTS[1]}, params)
        assert pipe.stats()["spec_decode_num_drafts"] > 0
    assert a[0].token_ids == a[1].token_ids == b.token_ids


def test_kit_verifies_tokens_and_explain_chooses_native(loopy):
    from enginehouse.conformance import run_conformance

    report = run_conformance("pytorch", loopy, families=[], checks=["verify-tokens"])
    result = report.result("verify-tokens")
    assert result.status == "pass", result.line()
    verdict = explain(str(loopy), engine_config={"speculative_config": NGRAM})
    assert verdict["chosen"] == "pytorch"
    pytorch = next(v for v in verdict["verdicts"] if v["backend"] == "pytorch")
    assert pytorch["verifies_tokens"]


def test_tp2_verifies_as_tp1(loopy, answers):
    """Two CPU ranks: only rank 0 samples, so every rank learns the accepted length from the
    sequence's next chunk alike."""
    with open_pipe(loopy, device="cpu", tp=2, max_batch_size=4, speculative_config=NGRAM) as pipe:
        got = run(pipe)
        check_acceptance(pipe.stats())
    assert got == answers
