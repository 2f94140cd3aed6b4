"""Issue 24's families in one table: the native `pytorch` backend against the `transformers`
fallback and transformers' own padded `generate`, at batch 1 and 32.

    python benchmarks/families.py [--quick] [--repeat N] [--only gemma3,gpt_oss,...]

Builds (once, in ./bench-models/families/<family>) a random-weight model of each family of about
the same size (hidden 256, 4 layers, vocabulary 4096-8000): Gemma 3 (five sliding-window layers
to one global, here 3:1), gpt-oss (sinks, sliding window on alternate layers, 8 experts),
DeepSeek-V3 (latent attention, grouped routing, shared expert; benchmarks/deepseek.py's shape)
and Qwen3-Next (three Gated DeltaNet layers to one gated full-attention layer, MoE with a shared
expert). Runs `enginehouse.bench.measure` ("single": one 64-token prompt, 128 new tokens;
"equal": 32 such prompts at once), every side in its own process, each side's best of
`--repeat` runs, and prints one table per family with the load average before and after.
Then the KV cache each model's layer groups keep per token and how many sequences fit, as
`explain` plans it.
"""

from __future__ import annotations

import argparse
import os
import platform
from pathlib import Path

import torch
import transformers

from enginehouse.bench import format_table, measure, report
from enginehouse.testing import build_model

COMMON = dict(vocab_size=4096, hidden_size=256, num_hidden_layers=4, bos_token_id=1)
COMMON.update(eos_token_id=2, pad_token_id=0, max_position_embeddings=4096)
HEADS = dict(num_attention_heads=8, num_key_value_heads=2, head_dim=32)

SHAPES = {
    "gemma3": (
        "Gemma3TextConfig",
        dict(
            COMMON, **HEADS, intermediate_size=512, sliding_window=64,
            layer_types=["sliding_attention"] * 3 + ["full_attention"],
            query_pre_attn_scalar=32,
        ),
    ),
    "gpt_oss": (
        "GptOssConfig",
        dict(
            COMMON, **HEADS, intermediate_size=256, num_local_experts=8, num_experts_per_tok=4,
            sliding_window=128,
        ),
    ),
    "deepseek_v3": (
        "DeepseekV3Config",
        dict(
            COMMON, intermediate_size=512, moe_intermediate_size=128, num_attention_heads=8,
            q_lora_rank=128, kv_lora_rank=64, qk_rope_head_dim=16, qk_nope_head_dim=32,
            v_head_dim=32, n_routed_experts=16, num_experts_per_tok=2, n_group=4, topk_group=2,
            n_shared_experts=1, first_k_dense_replace=1,
        ),
    ),
    "qwen3_next": (
        "Qwen3NextConfig",
        dict(
            COMMON, **HEADS, intermediate_size=512, linear_num_key_heads=4,
            linear_num_value_heads=8, linear_key_head_dim=32, linear_value_head_dim=32,
            layer_types=["linear_attention"] * 3 + ["full_attention"], num_experts=8,
            num_experts_per_tok=2, moe_intermediate_size=128,
            shared_expert_intermediate_size=256,
        ),
    ),
}  # fmt: skip


def build(name: str) -> Path:
    folder = Path("bench-models") / "families" / name
    if not (folder / "config.json").is_file():
        config_class, shape = SHAPES[name]
        build_model(folder, getattr(transformers, config_class)(**shape))
    return folder


def kv_plan(folder: Path) -> str:
    """The native backend's plan for the model, as `explain` prints it."""
    from enginehouse import explain

    report = explain(str(folder), engine_config={"device": "cpu", "session_len": 4096})
    native = next(v for v in report["verdicts"] if v["backend"] == "pytorch")
    kv = native["reason"][native["reason"].find("KV cache") :]
    return f"explain (session 4096, the CPU's free memory): {kv}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4x smaller sets, one run each")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--only", default=",".join(SHAPES))
    args = parser.parse_args()
    print(
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}, transformers {transformers.__version__}"
    )
    for name in args.only.split(","):
        folder = build(name)
        print(f"\n## {name} ({folder}); load average before: {os.getloadavg()}")
        result = measure(
            folder,
            ["pytorch", "transformers"],
            ["single", "equal"],
            quick=args.quick,
            repeat=args.repeat,
        )
        print(format_table(report(result)))
        print(f"load average after: {os.getloadavg()}")
        print(kv_plan(folder))


if __name__ == "__main__":
    main()
