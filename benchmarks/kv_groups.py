"""KV layer groups and the quantized KV cache: memory planned, and decode time on the CPU.

    python benchmarks/kv_groups.py plan [--budget-gib 16] [--session 32768]
    python benchmarks/kv_groups.py decode [--rounds 3] [--prompt 512] [--new 32]

`plan` needs no weights: for released model shapes (their config.json values, written out
below), the KV bytes per token of every layer group and the sequences at full context that fit
in the budget, against the same model with full attention in every layer (what the native
backend kept before sliding windows freed their blocks), in bfloat16, int8 and fp8. The native
backend's own planner computes it (`kv_cache.kv_groups`, `kv_groups.total_blocks` /
`split_blocks`), with `max_num_batched_tokens` 2048 and `max_batch_size` 64.

`decode` times a batch of 32 sequences on the random-weight 56M Llama of
benchmarks/native_backend.py (float32, 8 layers, 4 KV heads of 64): 32 prompts of `--prompt`
tokens, then the decode steps of `--new` tokens, for the float cache on the default path (the
C++ kernels), the float cache on the torch path, the int8 and fp8 caches (the C++ paged
kernel reads both in place), and fp8 on the torch path (which dequantizes what it gathers; the
only fp8 reader before the kernel). Decode speed is the rows over the seconds of the
decode-only steps' `execute` (best round of `--rounds`, sides alternating), and the fastest
step of all 32 rows. Prints Markdown tables.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch

from enginehouse import GenerationConfig, pipeline
from enginehouse.kv_groups import split_blocks, total_blocks

# Released shapes: (family reader, config.json values that matter for the KV cache).
SHAPES = {
    "Gemma 3 4B": (
        "Gemma3ForCausalLM",
        dict(
            num_hidden_layers=34,
            num_attention_heads=8,
            num_key_value_heads=4,
            head_dim=256,
            hidden_size=2560,
            sliding_window=1024,
            sliding_window_pattern=6,
            vocab_size=262208,
            intermediate_size=10240,
            max_position_embeddings=131072,
        ),
    ),
    "Gemma 2 9B": (
        "Gemma2ForCausalLM",
        dict(
            num_hidden_layers=42,
            num_attention_heads=16,
            num_key_value_heads=8,
            head_dim=256,
            hidden_size=3584,
            sliding_window=4096,
            layer_types=["sliding_attention", "full_attention"] * 21,
            vocab_size=256000,
            intermediate_size=14336,
        ),
    ),
    "gpt-oss-20b": (
        "GptOssForCausalLM",
        dict(
            num_hidden_layers=24,
            num_attention_heads=64,
            num_key_value_heads=8,
            head_dim=64,
            hidden_size=2880,
            sliding_window=128,
            layer_types=["sliding_attention", "full_attention"] * 12,
            vocab_size=201088,
            intermediate_size=2880,
            num_local_experts=32,
            num_experts_per_tok=4,
            max_position_embeddings=131072,
        ),
    ),
    "DeepSeek-V3": (
        "DeepseekV3ForCausalLM",
        dict(
            num_hidden_layers=61,
            hidden_size=7168,
            num_attention_heads=128,
            num_key_value_heads=128,
            kv_lora_rank=512,
            q_lora_rank=1536,
            qk_rope_head_dim=64,
            qk_nope_head_dim=128,
            v_head_dim=128,
            n_routed_experts=256,
            num_experts_per_tok=8,
            moe_intermediate_size=2048,
            intermediate_size=18432,
            first_k_dense_replace=3,
            n_group=8,
            topk_group=4,
            n_shared_experts=1,
            vocab_size=129280,
            max_position_embeddings=163840,
        ),
    ),
    "Qwen3-Next 80B-A3B": (
        "Qwen3NextForCausalLM",
        dict(
            num_hidden_layers=48,
            hidden_size=2048,
            num_attention_heads=16,
            num_key_value_heads=2,
            head_dim=256,
            layer_types=["linear_attention"] * 3 + ["full_attention"],
            linear_num_key_heads=16,
            linear_num_value_heads=32,
            linear_key_head_dim=128,
            linear_value_head_dim=128,
            linear_conv_kernel_dim=4,
            num_experts=512,
            num_experts_per_tok=10,
            moe_intermediate_size=512,
            shared_expert_intermediate_size=512,
            intermediate_size=5120,
            vocab_size=151936,
            max_position_embeddings=262144,
        ),
    ),
    "Mistral 7B v0.1": (
        "MistralForCausalLM",
        dict(
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            hidden_size=4096,
            sliding_window=4096,
            vocab_size=32000,
            intermediate_size=14336,
        ),
    ),
    "Llama 3 8B": (
        "LlamaForCausalLM",
        dict(
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            hidden_size=4096,
            vocab_size=128256,
            intermediate_size=14336,
        ),
    ),
}


def plan(budget: int, session: int) -> str:
    from enginehouse import EngineConfig
    from enginehouse_pytorch.native import kv_cache, kv_quant
    from enginehouse_pytorch.native.arch import arch_from_config
    from enginehouse_pytorch.plugin import special_groups

    # max_batch_size 64: a hybrid model's state slots (73 MiB a sequence for Qwen3-Next) are
    # taken for max_batch_size sequences first, 256 of them would not fit 16 GiB.
    block, chunk, batch = 16, 2048, 64
    lines = [
        f"| model | KV dtype | groups (B/token) | B/token, all layers | sequences of {session} "
        f"tokens in {budget / 2**30:.0f} GiB | with full attention in every layer |",
        "| --- | --- | --- | ---: | ---: | ---: |",
    ]
    for name, (architecture, config) in SHAPES.items():
        if architecture == "Qwen3NextForCausalLM":
            config = dict(config, layer_types=config["layer_types"] * 12)
        arch = arch_from_config(architecture, config)
        engine = EngineConfig(max_batch_size=batch, enable_prefix_caching=False)
        # The latent cache is refused quantized; every other cache takes the three kinds.
        for kind in ("auto",) if arch.mla else ("auto", "int8", "fp8"):
            head = kv_quant.head_bytes(kind, arch.head_dim, torch.bfloat16)
            every = 2 * arch.num_layers * arch.num_kv_heads * head
            if arch.mla is not None:  # every head's keys and values, as multi-head attention
                every = (
                    arch.num_layers
                    * arch.num_heads
                    * 2
                    * (arch.mla.qk_head_dim + arch.mla.v_head_dim)
                )
            plain = min(budget // (every * session), batch)
            groups = special_groups(arch, engine, arch.num_kv_heads, head, 2)[0]
            groups = groups or kv_cache.kv_groups(arch, arch.num_kv_heads, head)
            if groups:
                total = total_blocks(groups, budget, block, session, batch, chunk)
                plans = split_blocks(groups, total, block, session, chunk, batch)
                fits = min(p.blocks // p.blocks_per_seq for p in plans)
                described = "; ".join(
                    f"{g.describe()} x{len(g.layers)}: "
                    + (f"{g.bytes_per_token}" if g.paged else f"{g.bytes_per_seq >> 20} MiB/seq")
                    for g in groups
                )
            else:
                fits, described = plain, f"full attention x{arch.num_layers}: {every}"
            dtype = "bfloat16" if kind == "auto" else kind
            lines.append(f"| {name} | {dtype} | {described} | {every} | {fits} | {plain} |")
    return "\n".join(lines)


def open_side(path: Path, side: str, session: int):
    config = dict(
        enable_prefix_caching=False,
        max_batch_size=32,
        session_len=session,
        kv_cache_memory="4GiB",
        dtype="float32",
    )
    if side in ("int8", "fp8", "fp8-torch"):
        config["kv_cache_dtype"] = side.removesuffix("-torch")
    if side == "fp8-torch":  # fp8 on the torch path, as before the C++ kernel read it
        from enginehouse_pytorch import native_runner
        from enginehouse_pytorch.native import kv_quant

        original = native_runner.NativeRunner._attention_kernel
        native_runner.NativeRunner._attention_kernel = lambda self: kv_quant.Fp8Attention
        try:
            return pipeline(str(path), backend="pytorch", engine_config=config, progress=False)
        finally:
            native_runner.NativeRunner._attention_kernel = original
    if side == "float-torch":
        from enginehouse_pytorch import native_runner
        from enginehouse_pytorch.native.attention import TorchAttention

        original = (native_runner.NativeRunner._attention_kernel, native_runner.NativeRunner._fused)
        native_runner.NativeRunner._attention_kernel = lambda self: TorchAttention
        native_runner.NativeRunner._fused = lambda self: False
        try:
            return pipeline(str(path), backend="pytorch", engine_config=config, progress=False)
        finally:
            native_runner.NativeRunner._attention_kernel, native_runner.NativeRunner._fused = (
                original
            )
    return pipeline(str(path), backend="pytorch", engine_config=config, progress=False)


def timed_decodes(pipe) -> list[tuple[int, float]]:
    """Make the runner record the rows and seconds of every decode-only step (the prefills are
    staggered: the first and last steps of decode hold fewer than 32 rows)."""
    runner, seconds = pipe.runner, []
    execute = runner.execute

    def timed(batch):
        start = time.perf_counter()
        out = execute(batch)
        if all(c.is_decode for c in batch.chunks):
            seconds.append((len(batch.chunks), time.perf_counter() - start))
        return out

    runner.execute = timed
    return seconds


def decode(rounds: int, prompt: int, new: int) -> str:
    import random

    sys.path.insert(0, str(Path(__file__).parent))
    from native_backend import build

    path = build("llama-56m")
    rng = random.Random(0)
    prompts = [[rng.randrange(10, 32000) for _ in range(prompt)] for _ in range(32)]
    sides = ["float-kernels", "float-torch", "int8", "fp8", "fp8-torch"]
    pipes = {s: open_side(path, s, prompt + new + 16) for s in sides}
    steps = {s: timed_decodes(p) for s, p in pipes.items()}
    best = {s: 0.0 for s in sides}  # decode tokens per second
    full = {s: float("inf") for s in sides}  # seconds of one 32-row step
    answers = {}
    many = GenerationConfig(max_new_tokens=new, min_new_tokens=new)
    for _ in range(rounds):
        for s in sides:
            steps[s].clear()
            out = pipes[s]([{"token_ids": p} for p in prompts], many)
            rows, seconds = sum(r for r, _ in steps[s]), sum(t for _, t in steps[s])
            best[s] = max(best[s], rows / seconds)
            full[s] = min([full[s]] + [t for r, t in steps[s] if r == 32])
            answers[s] = [r.token_ids for r in out]
    lines = [
        "| side | attention | KV B/token | decode tok/s | ms per 32-row step | "
        "tokens equal to float's |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for s in sides:
        kv = pipes[s].runner.kv_spec
        per_token = kv.bytes_per_block // kv.block_size
        kernel = type(pipes[s].runner.model.model.layers[0].self_attn.attn).__name__
        same = sum(
            a == b for x, y in zip(answers[s], answers["float-kernels"]) for a, b in zip(x, y)
        )
        lines.append(
            f"| {s} | {kernel} | {per_token} | {best[s]:.1f} | "
            f"{1000 * full[s]:.1f} | {same} / {32 * new} |"
        )
    for p in pipes.values():
        p.close()
    return "\n".join(lines)


def machine() -> str:
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in open("/proc/cpuinfo")
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    return f"{model}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["plan", "decode"])
    parser.add_argument("--budget-gib", type=float, default=16)
    parser.add_argument("--session", type=int, default=32768)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--new", type=int, default=32)
    args = parser.parse_args()
    if args.what == "plan":
        print(plan(int(args.budget_gib * 2**30), args.session))
        return
    print(f"machine: {machine()} (start)")
    print(decode(args.rounds, args.prompt, args.new))
    print(f"machine: {machine()} (end)")


if __name__ == "__main__":
    main()
