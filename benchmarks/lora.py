"""Batched LoRA on the CPU: a batch of 32 spread over 1, 4 and 16 adapters against the base model.

    python benchmarks/lora.py [--rounds 2] [--new-tokens 64] [--rank 16]

On the random-weight 56M Llama shape of benchmarks/native_backend.py (built once in
./bench-models), with 16 random rank-16 adapters on every projection (q/k/v/o, gate/up/down,
written in PEFT's format here): 32 prompts of 64 tokens, `--new-tokens` greedy tokens each, in
one `pipe(...)` call per case. Cases: the base model in a pipeline that never loaded an
adapter (plain projections), the base model in one with the adapters loaded (wrapped, no
adapted row),
and every request on an adapter, spread round-robin over 1, 4 and 16 of them. The cases
alternate round after round, each keeping its best round. Also the memory of one adapter: its
checked tensors, and one resident slot (max_lora_rank-padded, fused layout). Prints the CPU
model and load average with a Markdown table and the raw JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from enginehouse import pipeline

sys.path.insert(0, str(Path(__file__).parent))
from native_backend import build  # noqa: E402 - the same models, built the same way

TARGETS = {
    "q_proj": "self_attn",
    "k_proj": "self_attn",
    "v_proj": "self_attn",
    "o_proj": "self_attn",
    "gate_proj": "mlp",
    "up_proj": "mlp",
    "down_proj": "mlp",
}


def write_adapter(folder: Path, config: dict, rank: int, seed: int) -> Path:
    """A random PEFT LoRA adapter of `rank` on every projection (what PEFT saves)."""
    folder.mkdir(parents=True, exist_ok=True)
    h, i = config["hidden_size"], config["intermediate_size"]
    d = h // config["num_attention_heads"]
    kv = config["num_key_value_heads"] * d
    sizes = {
        "q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
        "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h),
    }  # fmt: skip
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(config["num_hidden_layers"]):
        for name, part in TARGETS.items():
            n_in, n_out = sizes[name]
            key = f"base_model.model.model.layers.{layer}.{part}.{name}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, n_in, generator=g) * 0.02
            tensors[f"{key}.lora_B.weight"] = torch.randn(n_out, rank, generator=g) * 0.02
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    cfg = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(TARGETS)}
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    return folder


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    except OSError:
        return platform.processor()
    return next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if "Model name" in ln), "")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rank", type=int, default=16)
    args = parser.parse_args()

    folder = build("llama-56m")
    config = json.loads((folder / "config.json").read_text())
    adapters = {
        f"a{n}": write_adapter(Path("bench-models") / "lora" / f"a{n}", config, args.rank, n)
        for n in range(16)
    }
    g = torch.Generator().manual_seed(0)
    prompts = [
        {"token_ids": torch.randint(10, 32000, (64,), generator=g).tolist()} for _ in range(32)
    ]
    gen = {"max_new_tokens": args.new_tokens, "min_new_tokens": args.new_tokens}
    engine = {"max_batch_size": 32, "enable_prefix_caching": False, "max_loras": 16}
    engine["max_lora_rank"] = args.rank
    # Two pipelines of the same model: one never sees an adapter (its projections stay plain),
    # the other serves the 16; the cases alternate between them round after round.
    plain = pipeline(str(folder), backend="pytorch", engine_config=engine, progress=False)
    pipe = pipeline(str(folder), backend="pytorch", engine_config=engine, progress=False)
    for name, path in adapters.items():
        pipe.load_adapter(name, path)
    cases = {
        "base, no adapter loaded": (plain, [None] * 32),
        "base, adapters loaded": (pipe, [None] * 32),
        "1 adapter": (pipe, ["a0"] * 32),
        "4 adapters": (pipe, [f"a{i % 4}" for i in range(32)]),
        "16 adapters": (pipe, [f"a{i % 16}" for i in range(32)]),
    }

    def run(p, names: list[str | None]) -> float:
        start = time.perf_counter()
        p(prompts, gen, adapter=names)
        return time.perf_counter() - start

    run(*cases["base, no adapter loaded"])  # warm-up
    run(*cases["16 adapters"])
    best: dict[str, float] = {}
    for _ in range(args.rounds):
        for case, (p, names) in cases.items():
            best[case] = min(best.get(case, 1e9), run(p, names))
    adapter_bytes = pipe.adapters()[0]["bytes"]
    slot_bytes = pipe.runner.lora.bytes_per_slot
    pipe.close()
    plain.close()

    tokens = 32 * args.new_tokens
    base = best["base, no adapter loaded"]
    load = os.getloadavg()
    print(f"CPU: {cpu_model()}; {torch.get_num_threads()} threads; load average {load}")
    print(
        f"llama-56m, batch 32, 64-token prompts, {args.new_tokens} new tokens each, rank "
        f"{args.rank} on q/k/v/o/gate/up/down, best of {args.rounds}"
    )
    print("| case | tok/s | seconds | vs base |\n| --- | ---: | ---: | ---: |")
    for case, seconds in best.items():
        print(f"| {case} | {tokens / seconds:.1f} | {seconds:.2f} | {base / seconds:.2f}x |")
    print(
        f"memory per adapter: {adapter_bytes / 2**20:.2f} MiB of tensors as loaded; one resident "
        f"slot {slot_bytes / 2**20:.2f} MiB (padded to max_lora_rank, q/k/v and gate/up blocks)"
    )
    print(json.dumps({"seconds": best, "adapter_bytes": adapter_bytes, "slot_bytes": slot_bytes}))


if __name__ == "__main__":
    main()
