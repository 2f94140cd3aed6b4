"""Run many transformers families on the `transformers` backend and say how each runs.

    .venv/bin/python scripts/transformers_families.py [FAMILY ...] [--models DIR]

For each family (a model type of transformers; all known here by default) it builds a small
random-weight model (2 layers, hidden 64, once, in DIR), then reports whether the backend runs it
batched over slots, unbatched (and why) or refuses it, and whether greedy tokens alone and in a
batch of three equal transformers' `generate`. The families the test suite covers are those of
`enginehouse.testing.transformers_model_configs`; this wider sweep backs docs/architecture.md's
list. Offline; about 1-5 s a family on a laptop CPU (Falcon-H1 and Nemotron-H far more).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from enginehouse import GenerationConfig, pipeline  # noqa: E402
from enginehouse.testing import (  # noqa: E402
    TINY,
    build_model,
    build_tokenizer,
    hf_greedy,
    transformers_model_configs,
)

COMMON = dict(TINY, vocab_size=512, bos_token_id=1, eos_token_id=2, pad_token_id=0)
MLA = dict(q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=16)
MAMBA = dict(mamba_n_heads=4, mamba_d_head=32, mamba_d_state=8, mamba_n_groups=1)
# Families beyond the test suite's, with what their tiny configs need beyond COMMON.
MORE: dict[str, dict[str, Any]] = {
    "olmo": {},
    "olmo2": {},
    "olmoe": dict(num_experts=4, num_experts_per_tok=2),
    "granite": {},
    "granitemoe": dict(num_local_experts=4, num_experts_per_tok=2),
    "cohere": {},
    "cohere2": dict(sliding_window=8),
    "qwen2_moe": dict(
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=32,
    ),
    "phimoe": dict(num_local_experts=4),
    "glm": dict(head_dim=16),
    "glm4": dict(head_dim=16),
    "smollm3": {},
    "exaone4": {},
    "minicpm3": dict(MLA, q_lora_rank=16, v_head_dim=16, num_key_value_heads=4),
    "gemma4_text": dict(
        head_dim=16,
        global_head_dim=16,
        sliding_window=8,
        layer_types=["sliding_attention", "full_attention"],
    ),
    "persimmon": {},
    "internlm3": {},
    "helium": dict(head_dim=16),
    "ernie4_5": {},
    "hunyuan_v1_dense": dict(head_dim=16),
    "seed_oss": {},
    "apertus": {},
    "nemotron": {},
    "bitnet": {},
    "ctrl": {},
    "deepseek_v2": dict(
        MLA,
        v_head_dim=16,
        num_key_value_heads=4,
        n_routed_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        first_k_dense_replace=1,
        n_shared_experts=1,
    ),
    "stablelm": dict(partial_rotary_factor=0.25),
    "gpt_neo": dict(attention_types=[[["global", "local"], 1]], window_size=8),
    "mpt": dict(max_seq_len=256),
    "xglm": {},
    "biogpt": {},
    "falcon:new": dict(new_decoder_architecture=True, num_kv_heads=2),
    "falcon:alibi": dict(alibi=True, multi_query=False, new_decoder_architecture=False),
    "jamba": dict(
        num_experts=2,
        num_experts_per_tok=1,
        attn_layer_period=2,
        attn_layer_offset=1,
        expert_layer_period=2,
        expert_layer_offset=1,
        mamba_d_state=4,
        mamba_dt_rank=8,
        mamba_expand=2,
        use_mamba_kernels=False,
    ),
    "bamba": dict(MAMBA, attn_layer_indices=[1]),
    "granitemoehybrid": dict(
        MAMBA,
        layer_types=["linear_attention", "full_attention"],
        num_local_experts=2,
        num_experts_per_tok=1,
        shared_intermediate_size=64,
    ),
    "falcon_h1": {},
    "nemotron_h": {},
    "qwen3_5_text": dict(
        head_dim=16,
        layer_types=["linear_attention", "full_attention"],
        linear_key_head_dim=16,
        linear_value_head_dim=16,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
    ),
    "minimax": {},
    "recurrent_gemma": dict(
        head_dim=16, block_types=["recurrent", "attention"], lru_width=64, attention_window_size=16
    ),
    "llama4_text": dict(
        head_dim=16,
        num_local_experts=2,
        attention_chunk_size=8,
        interleave_moe_layer_step=1,
        intermediate_size_mlp=128,
        no_rope_layers=[1, 0],
    ),
    "gemma3n_text": dict(
        num_hidden_layers=4,
        head_dim=16,
        num_kv_shared_layers=2,
        sliding_window=8,
        layer_types=["sliding_attention", "full_attention"] * 2,
        laurel_rank=8,
        altup_num_inputs=2,
        hidden_size_per_layer_input=8,
        vocab_size_per_layer_input=512,
        activation_sparsity_pattern=[0.0] * 4,
        intermediate_size=[128] * 4,
    ),
    "openai-gpt": {},
}
PROMPTS = [
    "hello world the quick brown fox",
    "cache",
    "über straße 東京 数据 😀 the engine model token train paper light blue green river city",
]
LENGTHS = [10, 4, 7]


def configs() -> dict[str, Any]:
    """Every family's config: the test suite's, then MORE (a `type:variant` name)."""
    out = dict(transformers_model_configs(512))
    for name, shape in MORE.items():
        out[name] = AutoConfig.for_model(name.split(":")[0], **{**COMMON, **shape})
    return out


def run(folder: Path) -> str:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    want = [hf_greedy(model, tok, prompt, n) for prompt, n in zip(PROMPTS, LENGTHS)]
    fixed = [GenerationConfig(max_new_tokens=n, min_new_tokens=n) for n in LENGTHS]
    try:
        pipe = pipeline(str(folder), backend="transformers", progress=False)
    except Exception as e:  # a refusal: the probe's or load's reason
        return f"refused: {e}"
    with pipe:
        runner = pipe.runner
        how = "batched" if runner.slots is not None else f"unbatched ({runner.unbatched_reason})"
        alone = pipe(PROMPTS[0], fixed[0], apply_chat_template=False).token_ids == want[0]
        batched = pipe(PROMPTS, fixed, apply_chat_template=False)
    same = alone and [r.token_ids for r in batched] == want
    return f"{how}; tokens {'equal generate' if same else 'DIFFER from generate'}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("families", nargs="*", help="model types (default: all known here)")
    parser.add_argument("--models", type=Path, default=Path("family-models"))
    args = parser.parse_args()
    table = configs()
    tokenizer = None
    for name in args.families or table:
        folder = args.models / name.replace(":", "-")
        start = time.perf_counter()
        try:
            if not (folder / "config.json").exists():
                tokenizer = tokenizer or build_tokenizer(args.models / "tokenizer", 512)
                build_model(folder, table[name], tokenizer=tokenizer)
            result = run(folder)
        except Exception as e:
            result = f"FAILED: {type(e).__name__}: {str(e)[:200]}"
        print(f"{name:18s} {time.perf_counter() - start:5.1f}s  {result}", flush=True)


if __name__ == "__main__":
    main()
