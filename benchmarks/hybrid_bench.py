"""A hybrid model (Qwen3-Next, Qwen3.5) on one backend: 64-token prompts, N new tokens each, at
batch 1 and 32 (issue 24's comparison of the native backend with the transformers fallback,
which runs such a model one sequence at a time). Usage:

    python benchmarks/hybrid_bench.py MODEL_DIR pytorch|transformers [NEW_TOKENS] [BATCHES]
"""

from __future__ import annotations

import os
import random
import sys
import time

from enginehouse import GenerationConfig, pipeline


def main() -> None:
    model, backend = sys.argv[1], sys.argv[2]
    new = int(sys.argv[3]) if len(sys.argv) > 3 else 32
    batches = [int(b) for b in sys.argv[4].split(",")] if len(sys.argv) > 4 else [1, 32]
    rng = random.Random(0)
    prompts = [[rng.randrange(5, 512) for _ in range(64)] for _ in range(max(batches))]
    gen = GenerationConfig(max_new_tokens=new, min_new_tokens=new)
    engine = {"max_batch_size": max(batches), "enable_prefix_caching": False}
    with pipeline(model, backend=backend, engine_config=engine, progress=False) as pipe:
        pipe({"token_ids": prompts[0][:8]}, GenerationConfig(max_new_tokens=2))  # warm up
        for batch in batches:
            start = time.perf_counter()
            out = pipe([{"token_ids": p} for p in prompts[:batch]], [gen] * batch)
            took = time.perf_counter() - start
            n = sum(len(r.token_ids) for r in out)
            load = os.getloadavg()[0]
            print(f"{backend} batch {batch}: {n} tokens in {took:.2f}s = {n / took:.1f} tok/s "
                  f"(load {load:.1f})")  # fmt: skip


if __name__ == "__main__":
    main()
