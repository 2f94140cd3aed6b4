"""A tiny DeepSeek-V3 on the native `pytorch` backend against the `transformers` fallback.

    python benchmarks/deepseek.py [--quick] [--repeat N] [--cases equal,single]

Builds (once, in ./bench-models/deepseek-v3-tiny) a random-weight DeepSeek-V3: hidden 256,
4 layers (the first dense), 8 heads, latent attention (q LoRA 128, kv LoRA 64, rope 16,
nope 32, v 32), 16 routed experts of 128 in 4 groups (top 2 groups, top 2 experts) plus one
shared expert, vocabulary 8000. Runs `enginehouse.bench.measure` on it ("single": batch 1;
"equal": 32 prompts at once), every side in its own process, and prints the table, then the
KV cache per token (the latent cache against the multi-head keys and values it stands for)
and how many full-context sequences fit a budget either way.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path

import torch
import transformers

from enginehouse.bench import format_table, measure, report
from enginehouse.testing import build_model

SHAPE = dict(
    vocab_size=8000,
    hidden_size=256,
    intermediate_size=512,
    moe_intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=8,
    q_lora_rank=128,
    kv_lora_rank=64,
    qk_rope_head_dim=16,
    qk_nope_head_dim=32,
    v_head_dim=32,
    n_routed_experts=16,
    num_experts_per_tok=2,
    n_group=4,
    topk_group=2,
    n_shared_experts=1,
    first_k_dense_replace=1,
    max_position_embeddings=2048,
    bos_token_id=1,
    eos_token_id=2,
)


def build() -> Path:
    folder = Path("bench-models") / "deepseek-v3-tiny"
    if not (folder / "config.json").is_file():
        build_model(folder, transformers.DeepseekV3Config(**SHAPE))
    return folder


def cache_sizes(context: int = 4096, budget: int = 1 << 30) -> str:
    """Bytes per token (float32) of the latent cache and of multi-head K/V, and how many
    sequences of `context` tokens fit `budget` bytes with each."""
    layers, heads = SHAPE["num_hidden_layers"], SHAPE["num_attention_heads"]
    latent = layers * (SHAPE["kv_lora_rank"] + SHAPE["qk_rope_head_dim"]) * 4
    qk = SHAPE["qk_nope_head_dim"] + SHAPE["qk_rope_head_dim"]
    mha = layers * heads * (qk + SHAPE["v_head_dim"]) * 4
    return (
        f"KV per token (float32): latent cache {latent} B, multi-head K/V {mha} B "
        f"({mha / latent:.1f}x); {context}-token sequences in {budget >> 20} MiB: "
        f"{budget // (latent * context)} against {budget // (mha * context)}"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="4x smaller sets, one run each")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--cases", default="single,equal")
    args = parser.parse_args()
    print(
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"load average {os.getloadavg()}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}"
    )
    result = measure(
        build(),
        ["pytorch", "transformers"],
        args.cases.split(","),
        quick=args.quick,
        repeat=args.repeat,
    )
    print(format_table(report(result)))
    print(cache_sizes())
    print(f"load average after: {os.getloadavg()}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
