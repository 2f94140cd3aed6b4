"""What a speculative verify step costs against a plain decode step, on the CPU.

    python benchmarks/verify_step.py [--batches 1,8] [--contexts 128,1024] [--k 3] [--repeat 30]

The native runner's `execute` on the 56M Llama of `native_backend.py` (float32): each of
`batch` sequences has `context` tokens in its KV cache; a decode step computes one token per
sequence, a verify step K + 1 (the last token and K proposals, logits at each). The ratio of
the two step times is what one step of speculation costs in decode steps: with every proposal
kept a verify step yields K + 1 tokens, so speculation wins by (K + 1) / ratio at best.
"rows apart" is the same verify step with each row attended on its own, as before the kernel
read a sequence's rows together. Best of `repeat` timings per case, the three interleaved;
each row says which path ran (the one-call decode step
takes up to 4 rows: batch 1 with K = 3; larger steps go through the per-op path).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def step_times(model: Path, batch: int, context: int, k: int, repeat: int) -> dict:
    import torch

    from enginehouse import ScheduledBatch, SeqChunk, pipeline

    pipe = pipeline(
        str(model),
        backend="pytorch",
        engine_config={"enable_prefix_caching": False},
        progress=False,
    )
    runner = pipe.runner
    bs = runner.kv_spec.block_size
    blocks = -(-(context + k + 1) // bs)
    gen = torch.Generator().manual_seed(0)
    tables = [tuple(range(i * blocks, (i + 1) * blocks)) for i in range(batch)]
    for i, table in enumerate(tables):  # fill each sequence's context with a prefill
        ids = torch.randint(5, 1000, (context,), generator=gen).tolist()
        runner.execute(ScheduledBatch((SeqChunk(i, tuple(ids), 0, table, (context - 1,)),), bs))

    def decode() -> ScheduledBatch:
        return ScheduledBatch(
            tuple(SeqChunk(i, (7,), context, t, (0,)) for i, t in enumerate(tables)), bs
        )

    def verify() -> ScheduledBatch:
        ids, at = (7,) * (k + 1), tuple(range(k + 1))
        chunks = (SeqChunk(i, ids, context, t, at, verify=True) for i, t in enumerate(tables))
        return ScheduledBatch(tuple(chunks), bs)

    # The three timed alternately, so that a busy machine slows each alike: a decode; a verify
    # whose rows of a sequence are attended together (each K/V read once); the same verify
    # with every row attended on its own (the kernel before `query_starts`, each row
    # re-reading its context), by making `cpu_step.query_starts` say "no groups".
    from enginehouse_pytorch.native import cpu_step

    together = cpu_step.query_starts
    cases = {
        "decode": (decode(), together),
        "verify": (verify(), together),
        "verify_rows_apart": (verify(), lambda chunks: []),
    }
    out = dict.fromkeys(cases, float("inf"))
    for _ in range(repeat + 1):  # the first round warms up
        for name, (step, starts) in cases.items():
            cpu_step.query_starts = starts
            start = time.perf_counter()
            runner.execute(step)
            out[name] = min(out[name], (time.perf_counter() - start) * 1e3)
    cpu_step.query_starts = together
    out["one_call"] = runner.decode is not None and batch * (k + 1) <= 4
    pipe.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--contexts", default="128,1024")
    parser.add_argument("--k", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--case", nargs=2, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    from native_backend import build

    model = build("llama-56m").resolve()
    if args.case:
        print(json.dumps(step_times(model, *args.case, args.k, args.repeat)))
        return
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    name = next(ln.split(":", 1)[1].strip() for ln in cpu.splitlines() if "Model name" in ln)
    print(f"CPU: {name}; load average before: {os.getloadavg()}")
    print(
        f"| batch | context | decode ms | verify (K={args.k}) ms | verify / decode | "
        "rows apart ms | rows apart / decode | path |"
    )
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for batch in [int(b) for b in args.batches.split(",")]:
        for context in [int(c) for c in args.contexts.split(",")]:
            # Each case in a fresh process: one case's cache does not warm another's.
            done = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--case",
                    str(batch),
                    str(context),
                    "--k",
                    str(args.k),
                    "--repeat",
                    str(args.repeat),
                ],
                capture_output=True,
                text=True,
                check=True,
            )
            r = json.loads(done.stdout.strip().splitlines()[-1])
            path = "one-call step (verify)" if r["one_call"] else "per-op"
            print(
                f"| {batch} | {context} | {r['decode']:.2f} | {r['verify']:.2f} | "
                f"{r['verify'] / r['decode']:.2f}x | {r['verify_rows_apart']:.2f} | "
                f"{r['verify_rows_apart'] / r['decode']:.2f}x | {path} |",
                flush=True,
            )
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
