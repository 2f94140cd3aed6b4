"""A tiny random gpt-oss on the CPU: the native `pytorch` backend against the `transformers`
fallback (which runs gpt-oss one sequence at a time), at batch 1 and 32.

    python benchmarks/gpt_oss_tiny.py [--rounds 3] [--new-tokens 64]

Builds (once, in ./bench-models/gpt-oss-tiny) hidden 256, 4 layers, 8 heads / 2 KV heads of 32,
8 experts (top 4) of 256, window 128 on alternate layers, vocabulary 4096; 64-token prompts.
Each backend runs in its own process; per case the best of `--rounds` wall times (prefill and
decode together) and the CPU seconds of that run (all threads) are printed, with the load
average before and after (the machine is shared: compare only numbers taken together).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

FOLDER = Path("bench-models") / "gpt-oss-tiny"
SHAPE = dict(
    vocab_size=4096,
    hidden_size=256,
    intermediate_size=256,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=2,
    head_dim=32,
    num_local_experts=8,
    num_experts_per_tok=4,
    sliding_window=128,
    max_position_embeddings=4096,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)


def build() -> None:
    if (FOLDER / "config.json").is_file():
        return
    import transformers

    from enginehouse.testing import build_model

    build_model(FOLDER, transformers.GptOssConfig(**SHAPE))


def measure(backend: str, rounds: int, new: int) -> dict:
    """In this process: the best wall time of each batch size, and that run's CPU time."""
    from enginehouse import GenerationConfig, pipeline

    rng = random.Random(0)
    prompts = [[rng.randrange(5, 4000) for _ in range(64)] for _ in range(32)]
    gen = GenerationConfig(max_new_tokens=new, min_new_tokens=new)
    config = {"device": "cpu", "enable_prefix_caching": False}
    best: dict[int, dict] = {}
    with pipeline(str(FOLDER), backend=backend, engine_config=config, progress=False) as pipe:
        pipe({"token_ids": prompts[0][:8]}, GenerationConfig(max_new_tokens=2))  # warm up
        for _ in range(rounds):
            for batch in (1, 32):
                c0, w0 = time.process_time(), time.perf_counter()
                pipe([{"token_ids": p} for p in prompts[:batch]], [gen] * batch)
                cpu, wall = time.process_time() - c0, time.perf_counter() - w0
                if batch not in best or wall < best[batch]["wall_s"]:
                    best[batch] = {"wall_s": wall, "cpu_s": cpu, "tok_s": batch * new / wall}
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--side", help=argparse.SUPPRESS)  # the child process's backend
    args = parser.parse_args()
    if args.side:
        print(json.dumps(measure(args.side, args.rounds, args.new_tokens)))
        return
    build()
    print(f"load average before: {os.getloadavg()}")
    results = {}
    for backend in ("pytorch", "transformers"):
        cmd = [sys.executable, __file__, "--side", backend, "--rounds", str(args.rounds)]
        cmd += ["--new-tokens", str(args.new_tokens)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        results[backend] = json.loads(out.strip().splitlines()[-1])
    print(f"load average after: {os.getloadavg()}")
    print("| batch | backend | wall s | CPU s | new tokens/s |\n|---|---|---|---|---|")
    for batch in ("1", "32"):
        for backend, r in results.items():
            b = r[batch]
            print(
                f"| {batch} | {backend} | {b['wall_s']:.2f} | {b['cpu_s']:.2f} | {b['tok_s']:.0f} |"
            )


if __name__ == "__main__":
    main()
