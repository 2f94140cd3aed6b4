"""The native `pytorch` backend against transformers, for every natively implemented family.

Each family of `enginehouse.testing.native_model_configs` (a small random-weight model with the
features that set it apart switched on) is built once per session, its constant tensors (biases,
norm weights) made random so that loading them matters; transformers' own model is loaded once
per family. Logits are compared in float32 at a tight tolerance, greedy tokens with
transformers' `generate`: alone, inside a batch, with chunked prefill, with prefix-cache hits and
after preemption. Then the weight loader (shards, bf16, broken checkpoints) and the probe.

Prompts are token ids drawn from a seeded generator, so their lengths are exact: they are chosen
to end inside a block, on a block boundary and past Mistral's 32-token sliding window (Gemma 2's
window of 8 is crossed by almost every prompt).

The token tests run Gemma 2 with untied embeddings: with the tied ones of its standard config, a
random model's scaled input embedding dominates its output, so greedy decoding only repeats the
prompt's last token and could not tell a right implementation from many wrong ones. The logits
tests keep the tied model, where the head must use the embedding unscaled.
"""

from __future__ import annotations

import copy
import json
import random
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from enginehouse import GenerationConfig, ScheduledBatch, SeqChunk, explain, pipeline
from enginehouse.errors import BackendError, InvalidModelError
from enginehouse.testing import build_model, native_model_configs, tight_kv_config

CONFIGS = native_model_configs(512)
FAMILIES = list(CONFIGS)
UNTIED_GEMMA2 = copy.deepcopy(CONFIGS["gemma2"])
UNTIED_GEMMA2.tie_word_embeddings = False
MODELS = {**CONFIGS, "gemma2-untied": UNTIED_GEMMA2}  # everything the tests build
# The models the token tests compare greedy decoding on: every family.
TOKEN_MODELS = ["gemma2-untied" if f == "gemma2" else f for f in FAMILIES]
# The family name the native probe reports for each config.
ARCH_FAMILY = {name: "llama" if name == "llama3" else name for name in FAMILIES}
TOL = dict(rtol=1e-4, atol=1e-4)

# (prompt length, new tokens): inside the first block, past Mistral's window, across a block
# boundary, two blocks and one token. Each ends below 64 tokens (the preemption test's session)
# and within Phi-3's original 128-token context: past it transformers switches every position to
# LongRoPE's long factors (its generate recomputes the cache), the native backend only the later
# positions, so the two disagree there.
GREEDY = [(7, 16), (40, 8), (19, 20), (33, 12)]


def tokens(n: int, seed: int) -> list[int]:
    """n token ids of the 512-token vocabulary, past the special ones (0..4)."""
    return random.Random(seed).choices(range(5, 512), k=n)


def fixed(n: int) -> GenerationConfig:
    # min_new_tokens masks EOS, as min_new_tokens does for transformers' generate.
    return GenerationConfig(max_new_tokens=n, min_new_tokens=n)


def greedy_prompts() -> list[list[int]]:
    return [tokens(n, seed=200 + i) for i, (n, _) in enumerate(GREEDY)]


def informative(answers: list[list[int]]) -> list[list[int]]:
    """Reference answers that can tell implementations apart: not one token repeated."""
    assert all(len(set(a)) >= 3 for a in answers), f"degenerate reference answers: {answers}"
    return answers


class Lazy(dict):
    """A dict that builds each missing value on first use, so `-k family` builds one family."""

    def __init__(self, make) -> None:
        super().__init__()
        self.make = make

    def __missing__(self, key):
        value = self[key] = self.make(key)
        return value


class Reference:
    """transformers' model for one family, with its greedy answers cached by prompt."""

    def __init__(self, path: Path) -> None:
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        self._greedy: dict[tuple[int, ...], list[int]] = {}

    @torch.no_grad()
    def logits(self, ids: list[int]) -> torch.Tensor:
        return self.model(torch.tensor([ids])).logits[0]

    def greedy(self, ids: list[int], n: int) -> list[int]:
        """transformers' `generate`, n tokens with EOS masked (min_new_tokens=n). The first k
        tokens of n do not depend on n, so a longer answer already computed is cut down."""
        done = self._greedy.get(tuple(ids), [])
        if len(done) < n:
            x = torch.tensor([ids])
            out = self.model.generate(
                x,
                attention_mask=torch.ones_like(x),
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
            )
            done = self._greedy[tuple(ids)] = out[0, len(ids) :].tolist()
        return done[:n]


def rewrite_weights(folder: Path, change) -> None:
    """Load model.safetensors, let `change` edit the dict, and save it back."""
    path = folder / "model.safetensors"
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def randomize_constant_tensors(tensors: dict[str, torch.Tensor]) -> None:
    """transformers initialises biases to 0 and norm weights to 1 (Gemma's to 0), so a loader
    that dropped or swapped them would go unseen. Every constant tensor gets random values."""
    gen = torch.Generator().manual_seed(0)
    for name in sorted(tensors):
        t = tensors[name]
        if t.numel() > 1 and bool((t == t.flatten()[0]).all()):
            tensors[name] = t + 0.2 * torch.randn(t.shape, generator=gen)


def build_native(folder: Path, name: str) -> Path:
    build_model(folder, MODELS[name])
    rewrite_weights(folder, randomize_constant_tensors)
    return folder


@pytest.fixture(scope="session")
def native_models(models_dir) -> dict[str, Path]:
    """Every native family's small model, built once per session (on first use)."""
    return Lazy(lambda name: build_native(models_dir / "native" / name, name))


@pytest.fixture(scope="module")
def hf(native_models) -> dict[str, Reference]:
    return Lazy(lambda name: Reference(native_models[name]))


def open_pipe(path, **config):
    pipe = pipeline(str(path), backend="pytorch", engine_config=config, progress=False)
    assert pipe.backend == "pytorch"
    return pipe


@pytest.fixture(scope="module")
def pipes(native_models):
    """One pipeline per family without prefix caching: every request computes its whole prompt,
    and the logits tests may write KV blocks directly while the engine is idle."""
    opened = Lazy(
        lambda name: open_pipe(native_models[name], max_batch_size=8, enable_prefix_caching=False)
    )
    yield opened
    for pipe in opened.values():
        pipe.close()


def table_space(pipe) -> int:
    """Block ids valid in every KV group (a chunk without group tables uses its one table in
    every group)."""
    return min(pipe.stats()["kv_group_blocks_total"])


def block_tables(lengths: list[int], block_size: int, num_blocks: int) -> list[tuple[int, ...]]:
    """Distinct, scattered block ids for sequences of these lengths."""
    need = [-(-n // block_size) for n in lengths]
    ids = random.Random(0).sample(range(num_blocks), sum(need))
    out, at = [], 0
    for n in need:
        out.append(tuple(ids[at : at + n]))
        at += n
    return out


def native_logits(pipe, ids: list[int]) -> torch.Tensor:
    """The logits at every position of `ids`, prefilled in one step on an idle engine."""
    runner = pipe.runner
    bs = runner.kv_spec.block_size
    (table,) = block_tables([len(ids)], bs, table_space(pipe))
    chunk = SeqChunk(0, tuple(ids), 0, table, tuple(range(len(ids))))
    return runner.execute(ScheduledBatch((chunk,), bs))


# --- 1. logits ------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_equal_transformers_prefill_decode_and_chunks(family, pipes, hf):
    pipe, ref = pipes[family], hf[family]
    runner = pipe.runner
    bs = runner.kv_spec.block_size
    steps = 3
    # The decodes of every dense family run the C++ one-call decode step where it is built
    # (Gemma 2's soft-caps, sandwich norms and two KV groups too); mixtures of experts do not.
    from enginehouse_pytorch.native import cpu_decode

    if cpu_decode.load() and family not in ("mixtral", "qwen3_moe"):
        assert runner.decode is not None, family
    # Prefilled together: within a block, exactly one block, past Mistral's window, three blocks.
    lengths = [5, bs, 37, 50]
    prompts = [tokens(n, seed=i) for i, n in enumerate(lengths)]
    fed = [tokens(steps, seed=100 + i) for i in range(len(prompts))]  # tokens of the decodes
    # Prefilled in two chunks: split inside a block, and on a block boundary.
    splits = [20, 2 * bs]
    chunked = [tokens(45, seed=50 + i) for i in range(len(splits))]
    seqs = [p + f for p, f in zip(prompts, fed)] + chunked
    tables = block_tables([len(s) for s in seqs], bs, table_space(pipe))
    want = [ref.logits(s) for s in seqs]
    n = len(prompts)

    def run(chunks) -> torch.Tensor:
        return runner.execute(ScheduledBatch(tuple(chunks), bs))

    # One step: every prompt whole and the first chunk of each split one, logits everywhere.
    first = [
        SeqChunk(i, tuple(p), 0, tables[i], tuple(range(len(p)))) for i, p in enumerate(prompts)
    ]
    first += [
        SeqChunk(n + j, tuple(s[:k]), 0, tables[n + j], tuple(range(k)))
        for j, (s, k) in enumerate(zip(chunked, splits))
    ]
    got = run(first).split([len(c.token_ids) for c in first])
    for i, p in enumerate(prompts):
        torch.testing.assert_close(got[i], want[i][: len(p)], **TOL)
    for j, k in enumerate(splits):
        torch.testing.assert_close(got[n + j], want[n + j][:k], **TOL)

    # Then three decode steps of the four, one batch each; the first also carries the split
    # prompts' second chunks (listed first: rows come back in batch order, though the runner
    # computes decodes first), with logits at every position of those chunks.
    for step in range(steps):
        batch = []
        if step == 0:
            batch += [
                SeqChunk(n + j, tuple(s[k:]), k, tables[n + j], tuple(range(len(s) - k)))
                for j, (s, k) in enumerate(zip(chunked, splits))
            ]
        batch += [
            SeqChunk(i, (fed[i][step],), len(p) + step, tables[i], (0,))
            for i, p in enumerate(prompts)
        ]
        got = run(batch)
        if step == 0:
            rest = [len(s) - k for s, k in zip(chunked, splits)]
            *parts, decoded = got.split(rest + [n])
            for j, (part, k) in enumerate(zip(parts, splits)):
                torch.testing.assert_close(part, want[n + j][k:], **TOL)
        else:
            decoded = got
        assert decoded.shape == (n, MODELS[family].vocab_size)
        for i, p in enumerate(prompts):
            torch.testing.assert_close(decoded[i], want[i][len(p) + step], **TOL)


# --- 2. greedy tokens -----------------------------------------------------------------------


@pytest.mark.parametrize("family", TOKEN_MODELS)
def test_greedy_equals_transformers_alone_and_batched(family, pipes, hf):
    pipe, ref = pipes[family], hf[family]
    prompts = greedy_prompts()
    expected = informative([ref.greedy(p, n) for p, (_, n) in zip(prompts, GREEDY)])
    for p, (_, n), want in zip(prompts, GREEDY, expected):
        alone = pipe({"token_ids": p}, fixed(n))
        assert alone.token_ids == want
    assert alone.text == pipe.tokenizer.decode(want, skip_special_tokens=True)
    batched = pipe([{"token_ids": p} for p in prompts], [fixed(n) for _, n in GREEDY])
    assert [r.token_ids for r in batched] == expected
    assert [r.finish_reason for r in batched] == ["length"] * len(GREEDY)
    assert pipe.stats()["kv_blocks_used"] == 0


# --- 3. chunked prefill ---------------------------------------------------------------------


def record_batches(pipe) -> list[ScheduledBatch]:
    """Make the runner keep every batch it is handed (the engine calls it from its thread)."""
    runner = pipe.runner
    seen: list[ScheduledBatch] = []
    execute = runner.execute

    def recording(batch: ScheduledBatch) -> torch.Tensor:
        seen.append(batch)
        return execute(batch)

    runner.execute = recording
    return seen


@pytest.mark.parametrize("family", TOKEN_MODELS)
def test_chunked_prefill_among_decodes_keeps_tokens(family, native_models, hf):
    ref = hf[family]
    prompts = greedy_prompts()
    expected = informative([ref.greedy(p, n) for p, (_, n) in zip(prompts, GREEDY)])
    config = dict(max_num_batched_tokens=16, max_batch_size=4, enable_prefix_caching=False)
    with open_pipe(native_models[family], **config) as pipe:
        batches = record_batches(pipe)
        out = pipe([{"token_ids": p} for p in prompts], [fixed(n) for _, n in GREEDY])
        assert pipe.stats()["kv_blocks_used"] == 0
    assert [r.token_ids for r in out] == expected
    assert all(b.num_tokens <= 16 for b in batches)
    # Some step carried a later chunk of a prompt next to another sequence's decode.
    assert any(
        any(c.start_pos > 0 and len(c.token_ids) > 1 for c in b.chunks)
        and any(len(c.token_ids) == 1 for c in b.chunks)
        for b in batches
    )


# --- 4. prefix caching ----------------------------------------------------------------------


@pytest.mark.parametrize("family", TOKEN_MODELS)
def test_prefix_cache_hits_keep_tokens(family, native_models, hf):
    ref = hf[family]
    shared = tokens(40, seed=300)  # two full blocks and a bit
    first, second = shared + tokens(5, seed=301), shared + tokens(9, seed=302)
    turn1 = tokens(20, seed=303)
    expected = informative([ref.greedy(first, 6), ref.greedy(second, 6), ref.greedy(turn1, 16)])
    with open_pipe(native_models[family], enable_prefix_caching=True) as pipe:
        bs = pipe.runner.kv_spec.block_size
        a = pipe({"token_ids": first}, fixed(6))
        b = pipe({"token_ids": second}, fixed(6))
        assert a.cached_tokens == 0
        assert b.cached_tokens == bs * (len(shared) // bs) > 0
        assert [a.token_ids, b.token_ids] == expected[:2]

        # A chat's second turn: the first prompt, its answer and more. The blocks the answer
        # filled are found too, not only the prompt's.
        answer = pipe({"token_ids": turn1}, fixed(16))
        assert answer.token_ids == expected[2]
        turn2 = turn1 + answer.token_ids + tokens(10, seed=304)
        reply = pipe({"token_ids": turn2}, fixed(6))
        computed = len(turn1) + 16 - 1  # the last answer token's KV was never computed
        assert reply.cached_tokens == bs * (computed // bs) > len(turn1)
        assert reply.token_ids == ref.greedy(turn2, 6)
        assert pipe.stats()["kv_blocks_used"] == 0


# --- 5. preemption --------------------------------------------------------------------------


@pytest.mark.parametrize("family", TOKEN_MODELS)
def test_preemption_recomputes_the_same_tokens(family, native_models, pipes, hf):
    ref = hf[family]
    prompts = greedy_prompts()
    expected = informative([ref.greedy(p, n) for p, (_, n) in zip(prompts, GREEDY)])
    # Blocks of 4 tokens and room for one 64-token context and one block more: the first three
    # prompts (7 + 40 + 19 tokens) take every block, so the first decode step preempts.
    session, block = 64, 4
    blocks = session // block + 1
    config = tight_kv_config(pipes[family], session, block, blocks)
    with open_pipe(native_models[family], **config) as pipe:
        assert pipe.runner.kv_spec.block_size == block
        # Every KV group gets the blocks of 17 (Gemma 2's window and full layers alike).
        assert min(pipe.stats()["kv_group_blocks_total"]) == blocks
        out = pipe([{"token_ids": p} for p in prompts], [fixed(n) for _, n in GREEDY])
        stats = pipe.stats()
    assert stats["preemptions"] > 0
    assert [r.token_ids for r in out] == expected
    assert [r.finish_reason for r in out] == ["length"] * len(GREEDY)
    assert (stats["kv_blocks_used"], stats["running"], stats["waiting"]) == (0, 0, 0)


# --- 6. weights -----------------------------------------------------------------------------


def copy_without_weights(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors", "*.index.json"))
    return dst


PROBE = tokens(45, seed=400)


@pytest.mark.parametrize("family", FAMILIES)
def test_sharded_checkpoint_gives_the_same_logits(family, native_models, hf, tmp_path):
    ref = hf[family]
    folder = copy_without_weights(native_models[family], tmp_path / family)
    ref.model.save_pretrained(folder, max_shard_size="100KB")
    assert (folder / "model.safetensors.index.json").exists()
    assert len(list(folder.glob("*.safetensors"))) > 2
    with open_pipe(folder) as pipe:
        got = native_logits(pipe, PROBE)
    torch.testing.assert_close(got, ref.logits(PROBE), **TOL)


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_checkpoint_runs_in_float32_on_cpu(family, native_models, tmp_path):
    folder = copy_without_weights(native_models[family], tmp_path / family)
    source = native_models[family]
    AutoModelForCausalLM.from_pretrained(source, dtype=torch.bfloat16).save_pretrained(folder)
    assert json.loads((folder / "config.json").read_text())["dtype"] == "bfloat16"
    upcast = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        want = upcast(torch.tensor([PROBE])).logits[0]
    with open_pipe(folder) as pipe:
        assert pipe.runner.kv_spec.dtype == torch.float32
        got = native_logits(pipe, PROBE)
    torch.testing.assert_close(got, want, **TOL)


def test_missing_weight_is_named(native_models, tmp_path):
    folder = tmp_path / "llama-missing"
    shutil.copytree(native_models["llama"], folder)
    name = "model.layers.1.post_attention_layernorm.weight"
    rewrite_weights(folder, lambda t: t.pop(name))
    with pytest.raises(InvalidModelError, match=name.replace(".", r"\.")):
        pipeline(str(folder), backend="pytorch", progress=False)


def test_wrong_shape_is_named_with_both_shapes(native_models, tmp_path):
    folder = tmp_path / "llama-shape"
    shutil.copytree(native_models["llama"], folder)
    name = "model.layers.0.self_attn.q_proj.weight"

    def narrow(t):
        t[name] = t[name][:, :60].contiguous()

    rewrite_weights(folder, narrow)
    with pytest.raises(InvalidModelError) as err:
        pipeline(str(folder), backend="pytorch", progress=False)
    message = str(err.value)
    assert name in message and "(64, 60)" in message and "(64, 64)" in message


# --- 7. explain -----------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_explain_chooses_native(family, native_models):
    report = explain(str(native_models[family]))
    assert report["chosen"] == "pytorch"
    verdict = next(v for v in report["verdicts"] if v["backend"] == "pytorch")
    assert verdict["supported"]
    assert f"native {ARCH_FAMILY[family]} " in verdict["reason"]


@pytest.mark.parametrize("key", ["rope_parameters", "rope_scaling"])
def test_unsupported_rope_falls_back_to_transformers(key, native_models, tmp_path):
    folder = tmp_path / "llama-dynamic"
    shutil.copytree(native_models["llama"], folder)
    config = json.loads((folder / "config.json").read_text())
    dynamic = {"rope_type": "dynamic", "factor": 4.0}
    config.pop("rope_parameters", None)
    if key == "rope_parameters":  # transformers 5's layout
        config[key] = {**dynamic, "rope_theta": 10000.0}
    else:  # released checkpoints' older layout
        config[key], config["rope_theta"] = dynamic, 10000.0
    (folder / "config.json").write_text(json.dumps(config))
    report = explain(str(folder))
    verdict = next(v for v in report["verdicts"] if v["backend"] == "pytorch")
    assert not verdict["supported"]
    assert "'dynamic'" in verdict["reason"]
    assert report["chosen"] == "transformers"
    with pytest.raises(BackendError, match="dynamic"):
        pipeline(str(folder), backend="pytorch", progress=False)
