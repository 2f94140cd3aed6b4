"""Speculative decoding: n-gram (prompt lookup) and draft-model proposals verified by the target.

Greedy tokens must be exactly those of decoding without speculation, alone and batched, with
prefix-cache hits, preemption, stop strings, n > 1 and logprobs; sampled tokens must follow the
target's distribution (a chi-squared test of the sampler's rejection step over many seeds) and
stay reproducible by seed; grammars hold; a backend that cannot verify several tokens and a
draft of another vocabulary are refused. Models are the tiny random ones of
`enginehouse.testing`; the prompts repeat themselves, so that prompt lookup proposes often.
"""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file, save_file

from enginehouse import EngineConfig, GenerationConfig, ScheduledBatch, SeqChunk, pipeline
from enginehouse.engine.ngram import lookup
from enginehouse.engine.sampler import Sampler, SamplingBatch, batch_of
from enginehouse.errors import EnginehouseError, InvalidModelError
from enginehouse.testing import build_model, model_configs, tight_kv_config

FAMILIES = ["llama", "qwen2"]
NGRAM = {
    "method": "ngram",
    "num_speculative_tokens": 3,
    "prompt_lookup_min": 1,
    "prompt_lookup_max": 3,
}


def repeating(n: int, seed: int) -> list[int]:
    """A prompt that repeats a random phrase, so that its tail has occurred before."""
    rng = random.Random(seed)
    phrase = rng.choices(range(5, 512), k=rng.randint(4, 7))
    return (phrase * (n // len(phrase) + 1))[:n]


PROMPTS = [repeating(n, seed) for seed, n in enumerate((9, 30, 17, 45))]


def fixed(n: int, **kw) -> GenerationConfig:
    return GenerationConfig(max_new_tokens=n, min_new_tokens=n, **kw)


def open_pipe(path, **config):
    return pipeline(str(path), backend="pytorch", engine_config=config, progress=False)


def run(pipe, prompts, params):
    return pipe([{"token_ids": p} for p in prompts], params)


@pytest.fixture(scope="module")
def loopy(models_dir):
    """Llama and Qwen2 with tied embeddings and their layers' outputs scaled down: random
    weights like these fall into runs of a repeated token, so prompt lookup's proposals are
    often kept (and rejected where a run ends). The plain random models' attention is checked
    by the kit's verify-tokens check and by a draft that is the target itself."""
    configs = model_configs(512)
    configs["llama"].tie_word_embeddings = True
    out = {}
    for family in FAMILIES:
        folder = out[family] = build_model(models_dir / f"loopy-{family}", configs[family])
        tensors = load_file(folder / "model.safetensors")
        for name in tensors:
            if "o_proj" in name or "down_proj" in name:
                tensors[name] = tensors[name] * 0.3
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return out


@pytest.fixture(scope="module")
def plain(loopy):
    """One pipeline per family without speculation: the reference answers."""
    opened = {f: open_pipe(loopy[f], max_batch_size=8) for f in FAMILIES}
    yield opened
    for pipe in opened.values():
        pipe.close()


# --- the configuration ------------------------------------------------------------------------


def test_config_takes_vllm_keys_and_json():
    c = EngineConfig(speculative_config=json.dumps(NGRAM)).speculative_config
    assert (c.method, c.k, c.prompt_lookup_min, c.prompt_lookup_max) == ("ngram", 3, 1, 3)
    c = EngineConfig(speculative_config={**NGRAM, "prompt_lookup_min": None}).speculative_config
    assert (c.prompt_lookup_min, c.prompt_lookup_max) == (3, 3)  # one end given: both
    c = EngineConfig(speculative_config={"method": "ngram", "num_speculative_tokens": 2})
    assert (c.speculative_config.prompt_lookup_min, c.speculative_config.prompt_lookup_max) == (
        5,
        5,
    )
    d = EngineConfig(speculative_config={"model": "x", "num_speculative_tokens": 4})
    assert d.speculative_config.method == "draft_model"


@pytest.mark.parametrize(
    "bad, words",
    [
        ({"method": "ngram"}, "num_speculative_tokens"),
        ({"num_speculative_tokens": 3}, "say which proposer"),
        ({"method": "draft_model", "num_speculative_tokens": 3}, "needs 'model'"),
        ({"method": "eagle3", "num_speculative_tokens": 3}, "needs 'model'"),
        ({"method": "mtp", "model": "x", "num_speculative_tokens": 1}, "takes no 'model'"),
        ({**NGRAM, "prompt_lookup_min": 4}, "larger than prompt_lookup_max"),
        ({**NGRAM, "lookahead": 2}, "lookahead"),
        ({"method": "ngram", "num_speculative_tokens": 0}, "greater than or equal to 1"),
        ("{not json", "must be JSON"),
    ],
)
def test_bad_config_is_refused_with_the_reason(bad, words):
    with pytest.raises(ValidationError, match=words):
        EngineConfig(speculative_config=bad)


def test_cli_flag_parses_json():
    from click.testing import CliRunner

    from enginehouse.cli import cli

    result = CliRunner().invoke(
        cli, ["explain", "nowhere-model", "--speculative-config", '{"method": "ngram"}']
    )
    assert result.exit_code != 0
    assert "num_speculative_tokens" in result.output


def test_ngram_lookup_takes_the_longest_latest_match():
    assert lookup([1, 2, 3, 9, 1, 2, 3, 7, 1, 2, 3], 2, 1, 3) == [7, 1]
    assert lookup([1, 2, 3, 9, 1, 2, 3, 7, 1, 2, 3], 5, 1, 3) == [7, 1, 2, 3, 7]
    assert lookup([5, 6, 5, 6], 3, 1, 3) == [5, 6, 5]  # the match runs into the tail
    assert lookup([8, 4, 4, 4, 4], 3, 1, 3) == [4, 4, 4]
    assert lookup([1, 2, 3, 4], 3, 1, 3) == []  # nothing repeats
    assert lookup([4, 8, 4], 3, 2, 3) == []  # only a 1-token match, below the minimum


# --- exact greedy output ----------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_ngram_greedy_equals_plain_alone_and_batched(family, loopy, plain):
    lengths = [14, 9, 20, 6]
    params = [fixed(n) for n in lengths]
    expected = run(plain[family], PROMPTS, params)
    with open_pipe(loopy[family], max_batch_size=8, speculative_config=NGRAM) as pipe:
        alone = [run(pipe, [p], [g])[0] for p, g in zip(PROMPTS, params)]
        batched = run(pipe, PROMPTS, params)
        stats = pipe.stats()
    for got in (alone, batched):
        assert [r.token_ids for r in got] == [r.token_ids for r in expected]
        assert [r.text for r in got] == [r.text for r in expected]
    assert stats["spec_decode_num_drafts"] > 0
    assert 0 < stats["spec_decode_num_accepted_tokens"] < stats["spec_decode_num_draft_tokens"]
    assert stats["kv_blocks_used"] == 0 and stats["running"] == 0


@pytest.mark.parametrize("kv", ["int8", "fp8"])
def test_ngram_greedy_equals_plain_over_a_quantized_cache(kv, loopy):
    """Verify rows over an int8 or fp8 KV cache (on the CPU the C++ paged kernel reads a
    sequence's rows together from the quantized cache) give plain decoding's tokens over the
    same cache, alone and batched. (fp8's per-tensor scales are set by a pipeline's first
    store, so both pipelines run the same requests in the same order.)"""
    from enginehouse_pytorch.native import cpu_kernels

    lengths = [14, 9, 20, 6]
    params = [fixed(n) for n in lengths]
    config = dict(max_batch_size=8, kv_cache_dtype=kv)
    answers = []
    for spec in ({}, {"speculative_config": NGRAM}):
        with open_pipe(loopy["llama"], **config, **spec) as pipe:
            if cpu_kernels.load():
                attn = pipe.runner.model.model.layers[0].self_attn.attn
                assert type(attn) is cpu_kernels.quantized_attention(kv)
            alone = [run(pipe, [p], [g])[0].token_ids for p, g in zip(PROMPTS, params)]
            batched = [r.token_ids for r in run(pipe, PROMPTS, params)]
            answers.append((alone, batched))
            stats = pipe.stats()
    assert answers[1] == answers[0]
    assert stats["spec_decode_num_accepted_tokens"] > 0


def test_logprobs_stop_strings_and_n_as_without_speculation(loopy, plain):
    family = "llama"
    greedy_lp = fixed(12, logprobs=2)
    expected = run(plain[family], PROMPTS[:2], [greedy_lp] * 2)
    probe = run(plain[family], PROMPTS[2:3], [fixed(12)])[0]
    stop = probe.text[len(probe.text) // 2 :][:3]
    stop_params = GenerationConfig(max_new_tokens=12, stop_words=[stop])
    expected_stop = run(plain[family], PROMPTS[2:3], [stop_params])[0]
    # n > 1 is the same prompt several times in one batch (as the server runs `n`).
    n_params = [fixed(10), fixed(10), GenerationConfig(max_new_tokens=10, min_new_tokens=4)]
    expected_n = run(plain[family], PROMPTS[3:] * 3, n_params)
    with open_pipe(loopy[family], speculative_config=NGRAM) as pipe:
        got = run(pipe, PROMPTS[:2], [greedy_lp] * 2)
        got_stop = run(pipe, PROMPTS[2:3], [stop_params])[0]
        got_n = run(pipe, PROMPTS[3:] * 3, n_params)
        assert pipe.stats()["spec_decode_num_accepted_tokens"] > 0
    for a, b in zip(got, expected):
        assert a.token_ids == b.token_ids
        assert len(a.logprobs) == len(b.logprobs) == 12
        for la, lb in zip(a.logprobs, b.logprobs):
            assert la.keys() == lb.keys()
            assert all(math.isclose(la[t], lb[t], abs_tol=1e-4) for t in la)
    assert (got_stop.text, got_stop.finish_reason) == (expected_stop.text, "stop")
    assert [c.token_ids for c in got_n] == [c.token_ids for c in expected_n]


def test_prefix_hits_and_preemption_keep_the_tokens(loopy, plain):
    family = "llama"
    params = [fixed(n) for n in (20, 16, 24, 12)]
    expected = run(plain[family], PROMPTS, params)
    # Blocks of 4 tokens, room for one 80-token context and two blocks: preemption follows.
    config = tight_kv_config(plain[family], 80, 4, 22)
    with open_pipe(loopy[family], **config, speculative_config=NGRAM) as pipe:
        first = run(pipe, PROMPTS, params)
        stats = pipe.stats()
    assert stats["preemptions"] > 0
    assert [r.token_ids for r in first] == [r.token_ids for r in expected]
    assert stats["spec_decode_num_accepted_tokens"] > 0
    assert stats["kv_blocks_used"] == 0
    with open_pipe(loopy[family], block_size=4, speculative_config=NGRAM) as pipe:
        run(pipe, PROMPTS, params)
        again = run(pipe, PROMPTS, params)  # the prompts' blocks (and outputs') are cached
    assert [r.token_ids for r in again] == [r.token_ids for r in expected]
    assert all(r.cached_tokens for r in again)


def test_seeded_sampling_is_reproducible(loopy):
    params = [GenerationConfig(max_new_tokens=16, do_sample=True, temperature=0.8, random_seed=7)]
    with open_pipe(loopy["llama"], speculative_config=NGRAM) as pipe:
        a = run(pipe, PROMPTS[:1] * 2, params * 2)
        b = run(pipe, PROMPTS[:1], params)
    assert a[0].token_ids == a[1].token_ids == b[0].token_ids


# --- sampled tokens follow the target's distribution ------------------------------------------


def chi_squared(counts: list[int], probs: list[float]) -> tuple[float, int]:
    """Pearson's statistic over the categories expected at least 5 times, others pooled."""
    total = sum(counts)
    big = [i for i, p in enumerate(probs) if p * total >= 5]
    rest = [i for i in range(len(probs)) if i not in big]
    obs = [counts[i] for i in big] + [sum(counts[i] for i in rest)]
    exp = [probs[i] * total for i in big] + [sum(probs[i] for i in rest) * total]
    stat = sum((o - e) ** 2 / e for o, e in zip(obs, exp) if e > 0)
    return stat, len(obs) - 1


def chi2_limit(dof: int) -> float:
    """The 0.999 quantile of chi-squared (scipy's where installed, else Wilson-Hilferty)."""
    try:
        from scipy.stats import chi2

        return float(chi2.ppf(0.999, dof))
    except ImportError:
        z = 3.090
        return dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3


@pytest.mark.parametrize("draft", [0, 3])  # the target's likeliest token, and a poor guess
def test_verified_tokens_follow_the_target_distribution(draft):
    """The sampler's rejection step over many seeds: the first token of a verifying sequence
    (its proposal kept, or a replacement drawn) and the next one (after a kept proposal)
    each follow the target's own probabilities after temperature and top-k."""
    vocab, runs = 8, 4000
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(2, vocab, generator=gen) * 1.5
    logits[0, 0] = logits[0].max() + 0.5  # the likeliest
    logits[0, 3] = logits[0].median()  # a middling one, inside the top 6
    params = GenerationConfig(do_sample=True, temperature=0.9, top_k=6, random_seed=0)
    first, second = [0] * vocab, [0] * vocab
    for seed in range(runs):
        p = params.model_copy(update={"random_seed": seed})
        batch = batch_of([(0, 0, p, True, [1]), (0, 1, p, False, [1])])
        batch.drafts = [draft, -1]
        out = Sampler().sample(logits.clone(), batch)
        tokens = [draft] * out.num_accepted[0] + [out.token_ids[0]]
        first[tokens[0]] += 1
        if out.num_accepted[0]:
            second[tokens[1]] += 1
    assert sum(second) > 200  # the proposal was kept often enough to test what follows
    for row, counts in ((0, first), (1, second)):
        scaled = logits[row] / 0.9
        kth = scaled.topk(6).values[-1]
        probs = scaled.masked_fill(scaled < kth, float("-inf")).softmax(0).tolist()
        stat, dof = chi_squared(counts, probs)
        assert stat < chi2_limit(dof), (row, counts, probs)


def test_greedy_rows_keep_proposals_while_they_are_the_argmax():
    logits = torch.tensor([[0.0, 5.0, 1.0], [3.0, 0.0, 1.0], [0.0, 0.0, 9.0]])
    p = GenerationConfig()
    batch = batch_of([(0, 0, p, True, []), (0, 1, p, False, []), (0, 2, p, False, [])])
    batch.drafts = [1, 2, -1]
    out = Sampler().sample(logits, batch)
    assert (out.num_accepted, out.token_ids) == ([1], [0])  # kept 1, then 0 replaces 2
    batch.drafts = [1, 0, -1]
    out = Sampler().sample(logits, batch)
    assert (out.num_accepted, out.token_ids) == ([2], [2])  # both kept, then the bonus


def test_select_keeps_each_rows_settings():
    p1, p2 = GenerationConfig(min_new_tokens=3), GenerationConfig(temperature=0.5, do_sample=True)
    batch = batch_of([(0, 0, p1, True, []), (1, 1, p2, True, [])])
    batch.banned = ([0, 0], [2, 3])
    batch.constrained = [1]
    sub = batch.select([1, 0])
    assert sub.seq_ids == [1, 0] and sub.rows == [1, 0] and sub.greedy == [False, True]
    assert sub.banned == ([1, 1], [2, 3]) and sub.constrained == [0]
    assert isinstance(sub, SamplingBatch)


# --- structured output ------------------------------------------------------------------------


def test_structured_output_stays_valid(loopy, plain):
    pytest.importorskip("xgrammar")
    schema = {
        "type": "object",
        "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99}},
        "required": ["a"],
        "additionalProperties": False,
    }
    fmt = {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}
    params = [
        GenerationConfig(max_new_tokens=40, response_format=fmt, do_sample=s, random_seed=i)
        for i, s in enumerate([False, True, True])
    ]
    # Prompts holding JSON: its tokens come up again in the output, so lookup proposes them
    # and the grammar must check (and roll back) every proposal.
    tok = plain["llama"].tokenizer
    prompts = [tok.encode(f'{{"a": {n}}}\n' * 3) for n in (7, 42, 3)]
    with open_pipe(loopy["llama"], speculative_config=NGRAM) as pipe:
        out = run(pipe, prompts, params)
        stats = pipe.stats()
        plain_params = [GenerationConfig(max_new_tokens=12)]
        run(pipe, PROMPTS[3:], plain_params)
    assert stats["spec_decode_num_drafts"] > 0
    greedy = run(plain["llama"], prompts[:1], params[:1])[0]
    assert out[0].token_ids == greedy.token_ids  # as without speculation
    for r in out:
        assert r.finish_reason == "stop", r
        assert isinstance(json.loads(r.text)["a"], int)


# --- the runner contract ----------------------------------------------------------------------


def test_backend_without_verification_is_refused(tiny_models):
    """A backend whose probe does not say `verifies_tokens` is no choice with speculation
    (explain says why), and one whose runner does not declare it is refused by the core."""
    from enginehouse import explain
    from enginehouse.engine.speculative import make_proposer
    from enginehouse.runner import RunnerCapabilities

    config = {"speculative_config": NGRAM}
    report = explain(str(tiny_models["llama"]), engine_config=config)
    verdicts = {v["backend"]: v for v in report["verdicts"]}
    assert report["chosen"] == "pytorch" and verdicts["pytorch"]["verifies_tokens"]
    assert not verdicts["transformers"]["supported"]
    assert "no speculative decoding" in verdicts["transformers"]["reason"]
    with pytest.raises(EnginehouseError, match="no speculative decoding"):
        pipeline(str(tiny_models["llama"]), backend="transformers", engine_config=config)
    with pytest.raises(EnginehouseError, match="verifies_tokens=True"):
        make_proposer(EngineConfig(**config), RunnerCapabilities(), None)


@pytest.mark.parametrize("family", [*FAMILIES, "mistral"])  # Mistral: a sliding window
def test_verify_chunk_gives_the_logits_of_one_by_one(family, tiny_models):
    """The conformance kit's check: K + 1 tokens of a decoding sequence at once, as a `verify`
    chunk, give the logits of feeding them one at a time."""
    from enginehouse.conformance import run_conformance

    report = run_conformance("pytorch", tiny_models[family], families=[], checks=["verify-tokens"])
    result = report.result("verify-tokens")
    assert result.status == "pass", result.line()


def test_kit_says_not_applicable_without_the_capability(toy_dir):
    from enginehouse.conformance import run_conformance

    report = run_conformance("toy", toy_dir, families=[], checks=["verify-tokens"])
    assert report.result("verify-tokens").status == "n/a"


# --- draft models -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_draft(tiny_models, models_dir):
    """A one-layer random model with the target's tokenizer: a poor guesser."""
    from transformers import AutoTokenizer, LlamaConfig

    tok = AutoTokenizer.from_pretrained(tiny_models["llama"])
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=256,
        vocab_size=512,
        bos_token_id=1,
        eos_token_id=2,
        initializer_range=0.2,
    )
    return build_model(models_dir / "draft-small", config, tokenizer=tok)


@pytest.mark.parametrize("which", ["itself", "small"])
def test_draft_model_greedy_equals_plain(which, tiny_models, small_draft):
    """With the target as its own draft every proposal is kept; with a small random draft
    most are refused: either way, the tokens are the plain ones."""
    family = "llama"
    draft = tiny_models[family] if which == "itself" else small_draft
    spec = {"method": "draft_model", "model": str(draft), "num_speculative_tokens": 3}
    lengths = [14, 9, 20, 6]
    params = [fixed(n) for n in lengths]
    prompts = [random.Random(s).choices(range(5, 512), k=11 + s) for s in range(4)]
    with open_pipe(tiny_models[family], max_batch_size=8) as pipe:
        expected = run(pipe, prompts, params)
    with open_pipe(tiny_models[family], max_batch_size=8, speculative_config=spec) as pipe:
        batched = run(pipe, prompts, params)
        alone = run(pipe, prompts[:1], params[:1])
        stats = pipe.stats()
        proposer = pipe.engine.engine.core.proposer
        assert proposer.blocks.num_used == 0 and not proposer.seqs  # the draft's KV is back
    assert [r.token_ids for r in batched] == [r.token_ids for r in expected]
    assert alone[0].token_ids == expected[0].token_ids
    assert stats["spec_decode_num_drafts"] > 0
    if which == "itself":
        assert stats["spec_decode_acceptance_rate"] == 1.0
        assert stats["spec_decode_mean_accepted_length"] > 3


@pytest.mark.parametrize("how", ["larger vocabulary", "other tokenizer"])
def test_draft_with_another_vocabulary_is_refused(how, tiny_models, models_dir):
    from enginehouse.testing import build_tokenizer

    config = model_configs(600 if how == "larger vocabulary" else 512)["llama"]
    folder = models_dir / f"draft-{how.replace(' ', '-')}"
    tokenizer = build_tokenizer(folder, 300) if how == "other tokenizer" else None
    other = build_model(folder, config, tokenizer=tokenizer)
    spec = {"method": "draft_model", "model": str(other), "num_speculative_tokens": 2}
    words = "vocabulary of 600 tokens" if how == "larger vocabulary" else "different tokenizer"
    with pytest.raises(InvalidModelError, match=f"{words}.*must share the target's tokenizer"):
        open_pipe(tiny_models["llama"], speculative_config=spec)


def test_runner_batch_types_are_public():
    chunk = SeqChunk(0, (1, 2), 3, (0,), (0, 1), verify=True)
    assert ScheduledBatch((chunk,), 16).num_tokens == 2 and chunk.verify


# --- metrics ----------------------------------------------------------------------------------


def test_metrics_use_vllm_names(loopy):
    from enginehouse.serve.metrics import ServerMetrics

    with open_pipe(loopy["qwen2"], speculative_config=NGRAM) as pipe:
        run(pipe, PROMPTS, [fixed(16)] * 4)
        stats = pipe.stats()
    text = ServerMetrics("m").render(stats).decode()
    accepted = stats["spec_decode_num_accepted_tokens"]
    assert accepted > 0 and len(stats["spec_decode_num_accepted_tokens_per_pos"]) == 3
    assert (
        f'enginehouse:spec_decode_num_accepted_tokens_total{{model_name="m"}} {accepted}.0' in text
    )
    for name in ("spec_decode_num_drafts", "spec_decode_num_draft_tokens"):
        assert f'enginehouse:{name}_total{{model_name="m"}} {stats[name]}.0' in text
    per_pos = stats["spec_decode_num_accepted_tokens_per_pos"]
    for position, count in enumerate(per_pos):
        line = (
            f'spec_decode_num_accepted_tokens_per_pos_total{{model_name="m",position="{position}"}}'
        )
        assert f"enginehouse:{line} {count}.0" in text
    assert sum(per_pos) == accepted
    rate = accepted / stats["spec_decode_num_draft_tokens"]
    assert stats["spec_decode_acceptance_rate"] == pytest.approx(rate)
    mean = 1 + accepted / stats["spec_decode_num_drafts"]
    assert stats["spec_decode_mean_accepted_length"] == pytest.approx(mean)


def test_plain_engine_reports_no_speculation(plain):
    from enginehouse.serve.metrics import ServerMetrics

    stats = plain["llama"].stats()
    assert "spec_decode_num_drafts" not in stats
    assert "spec_decode" not in ServerMetrics("m").render(stats).decode()


def test_bench_reports_the_acceptance(loopy):
    import subprocess
    import sys

    spec = json.dumps(NGRAM)
    args = [sys.executable, "-m", "enginehouse", "bench", str(loopy["qwen2"]), "--quick"]
    args += ["--cases", "single", "--no-baseline", "--json", "--speculative-config", spec]
    done = subprocess.run(args, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    row = json.loads(done.stdout)["rows"][0]
    assert row["side"] == "pytorch" and 0 <= row["acceptance"] <= 1
    args.remove("--json")
    table = subprocess.run(args, capture_output=True, text=True).stdout
    assert "accepted" in table.splitlines()[0]


def test_tp2_verifies_as_tp1(loopy, plain):
    """At tp=2 the ranks verify the proposals (rank 0 samples them): tp=1's tokens."""
    params = [fixed(n) for n in (14, 9, 20, 6)]
    expected = run(plain["llama"], PROMPTS, params)
    config = dict(tp=2, device="cpu", max_batch_size=8, speculative_config=NGRAM)
    with open_pipe(loopy["llama"], **config) as pipe:
        got = run(pipe, PROMPTS, params)
        stats = pipe.stats()
    assert [r.token_ids for r in got] == [r.token_ids for r in expected]
    assert stats["spec_decode_num_accepted_tokens"] > 0


def test_stops_inside_accepted_proposals(tiny_models):
    """With the target as its own draft nearly every token arrives as an accepted proposal:
    a stop token, a stop string and max_new_tokens then end the output among them, as they
    would without speculation (the proposals after the end are dropped)."""
    path = tiny_models["llama"]
    spec = {"method": "draft_model", "model": str(path), "num_speculative_tokens": 4}
    prompt = random.Random(5).choices(range(5, 512), k=12)
    with open_pipe(path) as pipe:
        free = run(pipe, [prompt], [fixed(24)])[0]
        stop_id = free.token_ids[9]
        stop_text = pipe.tokenizer.decode(free.token_ids[13:15])
        params = [
            GenerationConfig(max_new_tokens=24, stop_token_ids=[stop_id], logprobs=1),
            GenerationConfig(max_new_tokens=24, stop_words=[stop_text]),
            GenerationConfig(max_new_tokens=7, logprobs=0),
        ]
        expected = [run(pipe, [prompt], [p])[0] for p in params]
    with open_pipe(path, speculative_config=spec) as pipe:
        got = [run(pipe, [prompt], [p])[0] for p in params]
        assert pipe.stats()["spec_decode_acceptance_rate"] == 1.0
    for a, b in zip(got, expected):
        assert (a.token_ids, a.text, a.finish_reason) == (b.token_ids, b.text, b.finish_reason)
        assert (a.logprobs is None) == (b.logprobs is None)
        if a.logprobs is not None:
            assert len(a.logprobs) == len(a.token_ids)
    assert expected[0].finish_reason == "stop" and len(expected[0].token_ids) <= 10
    assert expected[2].finish_reason == "length" and len(expected[2].token_ids) == 7


def test_explain_text_says_which_backend_verifies(tiny_models):
    from click.testing import CliRunner

    from enginehouse.cli import cli

    args = ["explain", str(tiny_models["llama"]), "--speculative-config", json.dumps(NGRAM)]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    native = next(line for line in result.output.splitlines() if " pytorch " in line)
    assert native.startswith("  yes") and "verifies several tokens per step" in native
    assert "no speculative decoding: 'transformers'" in result.output
