"""DeepSeek-V3 (and Kimi-K2, its architecture) and DeepSeek-V2(-Lite) on the native backend.

Tiny random-weight models from transformers' own config classes, with what sets the family
apart switched on: latent attention with a LoRA query (V3) and a plain one (V2-Lite), dense
first layers then mixtures with shared experts, V3's sigmoid routing with its score bias over
expert groups, V2's group-limited greedy. Every constant tensor (norms, V3's score bias) is
made random so that loading it matters. Float32 logits must equal transformers' at 1e-5 and
greedy tokens its `generate`, alone, in a batch, with chunked prefill, a prefix-cache hit and
preemption; at tp=2 the tokens of tp=1.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch
from test_native import open_pipe, randomize_constant_tensors, rewrite_weights
from transformers import AutoModelForCausalLM, DeepseekV2Config, DeepseekV3Config

from enginehouse import GenerationConfig, ScheduledBatch, SeqChunk, explain
from enginehouse.testing import build_model, tight_kv_config

COMMON = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    moe_intermediate_size=32,
    num_hidden_layers=3,  # one dense layer, then two mixtures
    num_attention_heads=4,
    kv_lora_rank=16,
    qk_rope_head_dim=8,
    qk_nope_head_dim=16,
    v_head_dim=16,
    n_routed_experts=8,
    num_experts_per_tok=2,
    first_k_dense_replace=1,
    max_position_embeddings=256,
    initializer_range=0.2,  # peaked logits: greedy ties are practically impossible
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
CONFIGS = {
    # V3 / Kimi-K2: LoRA query, sigmoid scores, 4 groups of 2 experts, the best 2 groups.
    "deepseek_v3": DeepseekV3Config(
        **COMMON,
        q_lora_rank=32,
        n_group=4,
        topk_group=2,
        n_shared_experts=1,
        routed_scaling_factor=2.5,
        norm_topk_prob=True,
    ),
    # V2-Lite's shape: plain q_proj, two shared experts; grouped softmax routing (both experts
    # from the best group: with topk_group >= top_k the limit could not change a choice).
    "deepseek_v2": DeepseekV2Config(
        **COMMON,
        q_lora_rank=None,
        n_group=4,
        topk_group=1,
        topk_method="group_limited_greedy",
        n_shared_experts=2,
        routed_scaling_factor=1.5,
    ),
}
# Variants checked on logits only: V3 with rope over halves; V2 with plain greedy routing, a
# LoRA query and every bias (attention's and the MLPs', shared experts included).
VARIANTS = {
    "deepseek_v3_halves": DeepseekV3Config(
        **COMMON, q_lora_rank=32, n_group=2, topk_group=1, rope_interleave=False
    ),
    "deepseek_v2_greedy": DeepseekV2Config(
        **COMMON, q_lora_rank=24, topk_method="greedy", attention_bias=True, mlp_bias=True
    ),
}
FAMILIES = list(CONFIGS)
TOL = dict(rtol=1e-5, atol=1e-5)
GREEDY = [(7, 16), (40, 8), (19, 20), (33, 12)]  # (prompt length, new tokens)


def tokens(n: int, seed: int) -> list[int]:
    return random.Random(seed).choices(range(5, 512), k=n)


def fixed(n: int) -> GenerationConfig:
    return GenerationConfig(max_new_tokens=n, min_new_tokens=n)


def greedy_prompts() -> list[list[int]]:
    return [tokens(n, seed=200 + i) for i, (n, _) in enumerate(GREEDY)]


@pytest.fixture(scope="module")
def models(models_dir):
    made: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in made:
            folder = models_dir / "deepseek" / name
            build_model(folder, {**CONFIGS, **VARIANTS}[name])
            rewrite_weights(folder, randomize_constant_tensors)
            made[name] = folder
        return made[name]

    return get


class Reference:
    def __init__(self, path: Path) -> None:
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        self.answers: dict[tuple[int, ...], list[int]] = {}

    @torch.no_grad()
    def logits(self, ids: list[int]) -> torch.Tensor:
        return self.model(torch.tensor([ids])).logits[0]

    def greedy(self, ids: list[int], n: int) -> list[int]:
        done = self.answers.get(tuple(ids), [])
        if len(done) < n:
            x = torch.tensor([ids])
            out = self.model.generate(
                x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n
            )
            done = self.answers[tuple(ids)] = out[0, len(ids) :].tolist()
        assert len(set(done)) >= 3, f"a degenerate reference answer: {done}"
        return done[:n]


@pytest.fixture(scope="module")
def hf(models):
    made: dict[str, Reference] = {}

    def get(name: str) -> Reference:
        if name not in made:
            made[name] = Reference(models(name))
        return made[name]

    return get


# --- logits -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [*CONFIGS, *VARIANTS])
def test_logits_equal_transformers_prefill_chunks_and_decode(name, models, hf):
    """One step prefills two prompts whole and the first chunk of a third; the next carries
    the third's second chunk (reading its earlier latents back from the cache) beside the two
    first prompts' decodes (the latent-space decode); two more decode steps follow."""
    ref = hf(name)
    with open_pipe(models(name), max_batch_size=8, enable_prefix_caching=False) as pipe:
        runner = pipe.runner
        bs = runner.kv_spec.block_size
        prompts = [tokens(5, seed=1), tokens(37, seed=2)]
        fed = [tokens(3, seed=10 + i) for i in range(2)]
        split = tokens(45, seed=3)
        k = 20  # splits inside a block
        seqs = [p + f for p, f in zip(prompts, fed)] + [split]
        want = [ref.logits(s) for s in seqs]
        blocks = random.Random(0).sample(range(pipe.stats()["kv_blocks_total"]), 12)
        tables = [tuple(blocks[0:2]), tuple(blocks[2:6]), tuple(blocks[6:9])]

        def run(chunks) -> torch.Tensor:
            return runner.execute(ScheduledBatch(tuple(chunks), bs))

        first = [
            SeqChunk(i, tuple(p), 0, tables[i], tuple(range(len(p)))) for i, p in enumerate(prompts)
        ]
        first.append(SeqChunk(2, tuple(split[:k]), 0, tables[2], tuple(range(k))))
        got = run(first).split([len(c.token_ids) for c in first])
        for i, p in enumerate(prompts):
            torch.testing.assert_close(got[i], want[i][: len(p)], **TOL)
        torch.testing.assert_close(got[2], want[2][:k], **TOL)
        for step in range(3):
            batch = []
            if step == 0:
                rest = tuple(range(len(split) - k))
                batch.append(SeqChunk(2, tuple(split[k:]), k, tables[2], rest))
            batch += [
                SeqChunk(i, (fed[i][step],), len(p) + step, tables[i], (0,))
                for i, p in enumerate(prompts)
            ]
            got = run(batch)
            if step == 0:
                torch.testing.assert_close(got[: len(split) - k], want[2][k:], **TOL)
                got = got[len(split) - k :]
            for i, p in enumerate(prompts):
                torch.testing.assert_close(got[i], want[i][len(p) + step], **TOL)


# --- tokens -----------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_equals_transformers_alone_batched_and_chunked(family, models, hf):
    ref = hf(family)
    prompts = greedy_prompts()
    expected = [ref.greedy(p, n) for p, (_, n) in zip(prompts, GREEDY)]
    with open_pipe(models(family), max_batch_size=8) as pipe:
        alone = pipe({"token_ids": prompts[1]}, fixed(GREEDY[1][1]))
        assert alone.token_ids == expected[1]
        batched = pipe([{"token_ids": p} for p in prompts], [fixed(n) for _, n in GREEDY])
        assert [r.token_ids for r in batched] == expected
    # A budget of 16 tokens a step: prompts prefill in chunks beside other sequences' decodes.
    config = dict(max_num_batched_tokens=16, max_batch_size=4, enable_prefix_caching=False)
    with open_pipe(models(family), **config) as pipe:
        out = pipe([{"token_ids": p} for p in prompts], [fixed(n) for _, n in GREEDY])
        assert pipe.stats()["kv_blocks_used"] == 0
    assert [r.token_ids for r in out] == expected


@pytest.mark.parametrize("family", FAMILIES)
def test_prefix_cache_hit_and_preemption_keep_tokens(family, models, hf):
    ref = hf(family)
    shared = tokens(40, seed=300)
    first, second = shared + tokens(5, seed=301), shared + tokens(9, seed=302)
    with open_pipe(models(family), enable_prefix_caching=True) as pipe:
        bs = pipe.runner.kv_spec.block_size
        a = pipe({"token_ids": first}, fixed(6))
        b = pipe({"token_ids": second}, fixed(6))
        assert b.cached_tokens == bs * (len(shared) // bs) > 0  # latents read from the cache
        assert [a.token_ids, b.token_ids] == [ref.greedy(first, 6), ref.greedy(second, 6)]
        # Blocks of 4 tokens, room for one 64-token context and a block: the first decode
        # step preempts, and the preempted sequences recompute the same tokens.
        config = tight_kv_config(pipe, 64, 4, 64 // 4 + 1)
    prompts = greedy_prompts()
    with open_pipe(models(family), **config) as pipe:
        out = pipe([{"token_ids": p} for p in prompts], [fixed(n) for _, n in GREEDY])
        stats = pipe.stats()
    assert stats["preemptions"] > 0
    assert [r.token_ids for r in out] == [ref.greedy(p, n) for p, (_, n) in zip(prompts, GREEDY)]


@pytest.mark.parametrize("family", FAMILIES)
def test_tp2_gives_tp1s_tokens(family, models):
    prompts = [{"token_ids": p} for p in greedy_prompts()]
    gen = [fixed(n) for _, n in GREEDY]
    with open_pipe(models(family), device="cpu") as pipe:
        want = [r.token_ids for r in pipe(prompts, gen)]
    with open_pipe(models(family), tp=2, device="cpu", max_batch_size=8) as pipe:
        assert pipe.summary()["ranks"] == 2
        assert [r.token_ids for r in pipe(prompts, gen)] == want
    report = explain(str(models(family)), engine_config={"tp": 2, "device": "cpu"})
    verdict = next(v for v in report["verdicts"] if v["backend"] == "pytorch")
    assert "2 heads and the whole latent cache per rank" in verdict["reason"]


# --- the cache and explain ----------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_explain_chooses_native_with_a_latent_cache(family, models):
    report = explain(str(models(family)))
    assert report["chosen"] == "pytorch"
    verdict = next(v for v in report["verdicts"] if v["backend"] == "pytorch")
    assert f"native {family} implementation, 8 experts" in verdict["reason"]
    # 16 latent + 8 rope values per token and layer, against 4 heads of keys (16 + 8) and
    # values (16): 24 against 160.
    assert "kind mla: 24 values per token and layer, against 160" in verdict["reason"]
    # The plan of its one KV group: 3 layers x 24 values x float32 per token, against the
    # heads' keys and values in every layer.
    assert "KV cache 288 B/token (float32)" in verdict["reason"]
    assert (
        "KV cache groups: latent attention (mla) (3 layers, 288 B/token in float32): "
        in (verdict["reason"])
    )
    assert "(with full attention in every layer: " in verdict["reason"]
    report = explain(str(models(family)), engine_config={"kv_cache_dtype": "int8"})
    verdict = next(v for v in report["verdicts"] if v["backend"] == "pytorch")
    assert "latent cache is kept in the model's dtype" in verdict["reason"]


def test_latent_cache_bytes_per_token_against_multi_head(models):
    from enginehouse_pytorch.native import mla

    with open_pipe(models("deepseek_v3")) as pipe:
        runner = pipe.runner
        per_token = runner.kv_spec.bytes_per_block // runner.kv_spec.block_size
        assert per_token == 3 * (16 + 8) * 4  # layers * (latent + rope key) * float32
        assert mla.mha_bytes_per_token(runner.arch, torch.float32) == 3 * 4 * (24 + 16) * 4
        assert runner.kv[0].shape[1] == 16 + 8  # one row per slot, no separate values
        (group,) = runner.kv_spec.groups  # one KV group of kind "mla", every layer
        assert (group.kind, group.layers, group.bytes_per_token) == ("mla", (0, 1, 2), per_token)
        stats = pipe.stats()
        assert stats["kv_group_blocks_total"] == [stats["kv_blocks_total"]]


def test_moe_layer_freq_other_than_one_falls_back(models, tmp_path):
    folder = tmp_path / "freq"
    shutil.copytree(models("deepseek_v3"), folder)
    config = json.loads((folder / "config.json").read_text())
    config["moe_layer_freq"] = 2
    (folder / "config.json").write_text(json.dumps(config))
    report = explain(str(folder))
    verdict = next(v for v in report["verdicts"] if v["backend"] == "pytorch")
    assert not verdict["supported"] and "moe_layer_freq=2" in verdict["reason"]
    assert report["chosen"] == "transformers"


def test_the_onnx_export_refuses_latent_attention(models):
    from enginehouse.spec import read_model_spec
    from enginehouse_tensorrt.export import UnsupportedExport, check_exportable

    with pytest.raises(UnsupportedExport, match="latent attention"):
        check_exportable(read_model_spec(models("deepseek_v3")))
    report = explain(str(models("deepseek_v3")))
    onnx = next(v for v in report["verdicts"] if v["backend"] == "onnxruntime")
    assert not onnx["supported"]


# --- the router alone ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["deepseek_v3", "deepseek_v2"])
def test_router_chooses_transformers_experts_and_weights(name):
    """Over many random tokens, the native router's experts and weights equal transformers'
    router's, and the group limit changed the choice of some tokens (so it is exercised)."""
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    from enginehouse_pytorch.native.arch import deepseek_v2, deepseek_v3
    from enginehouse_pytorch.native.deepseek_moe import GroupedRouter

    config = CONFIGS[name]
    reader, reference_class = {
        "deepseek_v3": (deepseek_v3, DeepseekV3TopkRouter),
        "deepseek_v2": (deepseek_v2, DeepseekV2TopkRouter),
    }[name]
    torch.manual_seed(0)
    reference = reference_class(config)
    torch.nn.init.normal_(reference.weight, std=0.2)
    ours = GroupedRouter(config.hidden_size, reader(config.to_dict()).moe)
    ours.weight.data.copy_(reference.weight)
    if name == "deepseek_v3":
        reference.e_score_correction_bias.normal_(std=0.1)
        ours.e_score_correction_bias.data.copy_(reference.e_score_correction_bias)
    x = torch.randn(2000, config.hidden_size)
    _, want_weights, want_experts = reference(x)
    weights, experts = ours(x)
    order, want_order = experts.sort(dim=-1), want_experts.sort(dim=-1)
    assert torch.equal(order.values, want_order.values)
    torch.testing.assert_close(
        weights.gather(1, order.indices), want_weights.gather(1, want_order.indices), **TOL
    )
    ungrouped = GroupedRouter(
        config.hidden_size, reader({**config.to_dict(), "n_group": 1, "topk_group": 1}).moe
    )
    ungrouped.load_state_dict(ours.state_dict())
    changed = (ungrouped(x)[1].sort(dim=-1).values != order.values).any(dim=-1)
    assert 0 < changed.sum() < len(x)


def test_softmax_scale_takes_yarns_mscale_as_transformers_does():
    """DeepSeek's yarn configs rescale the whole q.k by mscale(mscale_all_dim) squared; the
    factor is read now so that the yarn rope (rope.py) plugs in without touching MLA."""
    from transformers.modeling_rope_utils import yarn_apply_mscale

    from enginehouse_pytorch.native.arch import MLA, Rope, mla_softmax_scale

    mla = MLA(
        q_lora_rank=1536,
        kv_lora_rank=512,
        qk_nope_head_dim=128,
        qk_rope_head_dim=64,
        v_head_dim=128,
    )
    yarn = {"rope_type": "yarn", "factor": 40.0, "mscale": 1.0, "mscale_all_dim": 1.0}
    for params in (yarn, {**yarn, "mscale_all_dim": 0.707}, {"rope_type": "default"}):
        rope = Rope(kind=params["rope_type"], params=params)
        want = yarn_apply_mscale(params, 192**-0.5)
        assert mla_softmax_scale(mla, rope) == pytest.approx(want, rel=1e-12)
    assert mla_softmax_scale(mla, Rope(kind="yarn", params=yarn)) > 192**-0.5
