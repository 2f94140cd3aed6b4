"""FP8 checkpoints of mixture-of-experts models (DeepSeek-V3 / Kimi-K2, Qwen3-MoE FP8, and the
Qwen3-Next hybrid) natively, and FP8 sharded over tp=2.

The checkpoints are written here as DeepSeek's and Qwen's FP8 releases are: every projection
(attention, dense MLPs, shared and routed experts, one tensor per expert, linear attention's)
in e4m3 with a float32 `weight_scale_inv` per block (16x16 here: the tiny shapes are smaller
than 128, and some sizes leave partial blocks), the router, norms, embedding and head in
float. The native run must equal transformers on a float checkpoint of the same dequantized
values: logits at every prompt position and greedy tokens alone and batched; tp=2 the tokens
of tp=1 (FP8 shards of whole blocks, or dequantized where a shard would split one). A
malformed checkpoint is refused naming the tensor.
"""

from __future__ import annotations

import functools
import json
import random
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_deepseek import CONFIGS as DEEPSEEK
from test_native import randomize_constant_tensors, rewrite_weights
from test_qwen3_next import CONFIGS as HYBRID
from transformers import AutoModelForCausalLM

from enginehouse import GenerationConfig, ScheduledBatch, SeqChunk, explain, pipeline
from enginehouse.errors import BackendError, InvalidModelError
from enginehouse.testing import build_model, native_model_configs
from enginehouse_pytorch.native.quant.checkpoints import fp8

BLOCK = (16, 16)
CONFIGS = {
    "deepseek_v3": DEEPSEEK["deepseek_v3"],
    "deepseek_v2": DEEPSEEK["deepseek_v2"],  # V2-Lite's shape: a plain q_proj, 2 shared experts
    "qwen3_moe": native_model_configs(512)["qwen3_moe"],
    "qwen2": native_model_configs(512)["qwen2"],  # dense, with q/k/v biases: sharded FP8 too
    # A hybrid: every projection dequantized at load (its linear-attention layers read float).
    "qwen3_next": HYBRID["qwen3_next"](),
}
TOL = dict(rtol=1e-5, atol=1e-5)
# Qwen3-Next at 1e-4: transformers' own chunked and recurrent delta rule differ by that much
# (test_qwen3_next.py's TOL).
HYBRID_TOL = dict(rtol=1e-4, atol=1e-4)
PROMPT = random.Random(0).choices(range(5, 512), k=40)
GREEDY = [
    (random.Random(i).choices(range(5, 512), k=n), m)
    for i, (n, m) in enumerate([(7, 12), (33, 8), (18, 10)])
]

PROJECTION = re.compile(
    r"\.(q_proj|k_proj|v_proj|o_proj|q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj"
    r"|gate_proj|up_proj|down_proj|in_proj_qkvz|in_proj_ba|out_proj)\.weight$"
)
STACKED = re.compile(r"^(.*\.mlp\.experts)\.(gate_up_proj|down_proj)$")  # transformers 5's


def quantize_checkpoint(src: Path, dst: Path, block=BLOCK) -> tuple[Path, Path]:
    """`dst`: the FP8 checkpoint (experts one tensor each, as the releases store them);
    `dst`-float: the same model with the dequantized values, in transformers' own layout."""
    ref = Path(f"{dst}-float")
    for folder in (dst, ref):
        shutil.copytree(src, folder, ignore=shutil.ignore_patterns("*.safetensors"))
    quantized, floats = {}, {}

    def put(name: str, w: torch.Tensor) -> torch.Tensor:
        parts, deq = fp8(w.float(), block)
        prefix = name.removesuffix(".weight")
        quantized.update({f"{prefix}.{suffix}": v for suffix, v in parts.items()})
        return deq

    for name, t in load_file(src / "model.safetensors").items():
        if m := STACKED.match(name):
            experts = []
            for e, w in enumerate(t):
                names = ("gate_proj", "up_proj") if m.group(2) == "gate_up_proj" else ("down_proj",)
                halves = w.chunk(len(names))
                deq = [put(f"{m.group(1)}.{e}.{n}.weight", h) for n, h in zip(names, halves)]
                experts.append(torch.cat(deq))
            floats[name] = torch.stack(experts).contiguous()
        elif PROJECTION.search(name):
            floats[name] = put(name, t).contiguous()
        else:
            quantized[name] = floats[name] = t
    save_file(quantized, dst / "model.safetensors", metadata={"format": "pt"})
    save_file(floats, ref / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((dst / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": list(block) if block else None,
    }
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    return dst, ref


@pytest.fixture(scope="module")
def checkpoints(models_dir):
    """family -> (FP8 checkpoint, its dequantized float copy), written on first use."""

    @functools.cache
    def floats(family: str) -> Path:
        folder = models_dir / "fp8-moe" / family
        build_model(folder, CONFIGS[family])
        rewrite_weights(folder, randomize_constant_tensors)
        return folder

    @functools.cache
    def write(family: str, block: tuple[int, int] | None) -> tuple[Path, Path]:
        grain = f"{block[0]}x{block[1]}" if block else "tensor"
        return quantize_checkpoint(
            floats(family), models_dir / "fp8-moe" / f"{family}-{grain}", block
        )

    return lambda family, block=BLOCK: write(family, tuple(block) if block else None)


def fixed(n: int) -> GenerationConfig:
    return GenerationConfig(max_new_tokens=n, min_new_tokens=n)


def open_pipe(path, **config):
    config.setdefault("enable_prefix_caching", False)
    config.setdefault("device", "cpu")
    pipe = pipeline(str(path), backend="pytorch", engine_config=config, progress=False)
    assert pipe.backend == "pytorch"
    return pipe


def prefill_logits(pipe, ids: list[int]) -> torch.Tensor:
    runner = pipe.runner
    bs = runner.kv_spec.block_size
    table = tuple(range(-(-len(ids) // bs)))
    chunk = SeqChunk(0, tuple(ids), 0, table, tuple(range(len(ids))))
    logits = runner.execute(ScheduledBatch((chunk,), bs))
    if hasattr(runner, "release_sequence"):  # the hybrid runner's state slot
        runner.release_sequence(0, table)
    return logits


def expected_tokens(ref) -> list[list[int]]:
    answers = []
    for ids, n in GREEDY:
        x = torch.tensor([ids])
        out = ref.generate(
            x,
            attention_mask=torch.ones_like(x),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
        )
        answers.append(out[0, len(ids) :].tolist())
    assert all(len(set(a)) >= 3 for a in answers), "degenerate reference answers"
    return answers


# None: one scale per tensor (weight_block_size null), the experts' too.
@pytest.mark.parametrize("family, block", [*((f, BLOCK) for f in CONFIGS), ("qwen3_moe", None)])
def test_fp8_moe_equals_transformers_on_the_dequantized_values(family, block, checkpoints):
    quantized, floats = checkpoints(family, block)
    ref = AutoModelForCausalLM.from_pretrained(floats, dtype=torch.float32).eval()
    with torch.no_grad():
        want = ref(torch.tensor([PROMPT])).logits[0]
    expected = expected_tokens(ref)
    with open_pipe(quantized, max_batch_size=8) as pipe:
        tol = HYBRID_TOL if family == "qwen3_next" else TOL
        torch.testing.assert_close(prefill_logits(pipe, PROMPT), want, **tol)
        assert [pipe({"token_ids": ids}, fixed(n)).token_ids for ids, n in GREEDY] == expected
        batched = pipe([{"token_ids": ids} for ids, _ in GREEDY], [fixed(n) for _, n in GREEDY])
        assert [r.token_ids for r in batched] == expected
        # Attention and dense MLPs stay FP8 (a hybrid's are float); the routed experts are
        # float stacked tensors.
        layers = dict(pipe.runner.model.named_modules())
        kinds = {type(m).__name__ for n, m in layers.items() if n.endswith(("o_proj", "down_proj"))}
        assert kinds == {"Linear" if family == "qwen3_next" else "QuantLinear"}
        if family == "deepseek_v3":
            assert type(layers["model.layers.1.self_attn.kv_b_proj"]).__name__ == "Linear"


# 16x16: each rank's part of every projection is whole blocks, so the ranks read their part
# of the e4m3 weights and scales and the projections stay FP8. 32x16 (Qwen3-MoE): a rank's
# K/V rows (16) would split a block, so every projection is dequantized at load and cut.
@pytest.mark.parametrize(
    "family, block",
    [
        ("deepseek_v3", BLOCK),
        ("qwen3_moe", BLOCK),
        ("qwen3_moe", (32, 16)),
        ("qwen3_moe", None),  # per-tensor scales: every rank's part has the one scale
        ("qwen2", BLOCK),
        ("qwen3_next", BLOCK),
    ],
)
def test_fp8_moe_tp2_gives_tp1s_tokens(family, block, checkpoints):
    quantized, _ = checkpoints(family, block)
    prompts = [{"token_ids": ids} for ids, _ in GREEDY]
    gen = [fixed(n) for _, n in GREEDY]
    with open_pipe(quantized) as pipe:
        want = [r.token_ids for r in pipe(prompts, gen)]
    with open_pipe(quantized, tp=2, max_batch_size=8) as pipe:
        assert pipe.summary()["ranks"] == 2
        assert [r.token_ids for r in pipe(prompts, gen)] == want
    reason = verdict(quantized, tp=2)["reason"]
    assert ("to be sharded" in reason) == (block == (32, 16))


def verdict(path: Path, **config) -> dict:
    report = explain(str(path), engine_config={"device": "cpu", **config})
    return next(v for v in report["verdicts"] if v["backend"] == "pytorch")


def test_explain_states_the_experts_memory(checkpoints):
    quantized, _ = checkpoints("deepseek_v3")
    native = verdict(quantized)
    assert native["supported"], native["reason"]
    assert "FP8 e4m3, 16x16 blocks" in native["reason"]
    assert "FP8 experts dequantized at load" in native["reason"]
    sharded = verdict(quantized, tp=2)
    assert sharded["supported"] and "tensor parallel over 2 ranks" in sharded["reason"]


def test_other_quantization_of_a_mixture_is_still_refused(checkpoints):
    quantized, floats = checkpoints("qwen3_moe")
    native = verdict(floats, quantization="int8")
    assert not native["supported"]
    assert "mixture-of-experts" in native["reason"] and "FP8 checkpoints are" in native["reason"]


def broken_copy(src: Path, dst: Path, change) -> Path:
    shutil.copytree(src, dst)
    rewrite_weights(dst, change)
    return dst


EXPERT = "model.layers.0.mlp.experts.3.down_proj"  # layer 1 is dense (mlp_only_layers)


def test_a_missing_expert_scale_is_named(checkpoints, tmp_path):
    quantized, _ = checkpoints("qwen3_moe")
    bad = broken_copy(quantized, tmp_path / "bad", lambda t: t.pop(f"{EXPERT}.weight_scale_inv"))
    with pytest.raises(
        (InvalidModelError, BackendError), match=re.escape(f"{EXPERT}.weight_scale_inv")
    ):
        open_pipe(bad)


def test_a_block_scale_of_the_wrong_shape_is_named(checkpoints, tmp_path):
    quantized, _ = checkpoints("qwen3_moe")
    name = f"{EXPERT}.weight_scale_inv"

    def change(t):
        t[name] = t[name][:, :1].contiguous()

    bad = broken_copy(quantized, tmp_path / "bad", change)
    with pytest.raises((InvalidModelError, BackendError), match=re.escape(name)) as info:
        open_pipe(bad)
    assert "weight_block_size" in str(info.value)
