"""A tp=2 decode step on the CPU taken apart: where its time goes.

    python benchmarks/tp_step.py [--model bench-models/llama-56m] [--steps 200] [--rows 1]

Two rank processes, set up as the "mp" executor sets them up (gloo, each pinned to its own
core, one torch thread each), each build the native runner for its rank and run the same
decode steps back to back, with no engine and no driver: the step alone. Each rank times every
step, and inside it the collectives (each all-reduce and the head's gather, timed around the
native backend's `TensorParallel` methods), so that a step splits into compute and
collectives. Then the same steps again with variations, to find what the extra time is:

- gloo:     pinned, 1 thread, collectives through gloo (the executor before this benchmark);
- unpinned: gloo, no affinity, 1 thread (the kernel places the two ranks);
- shm:      pinned, collectives through shared memory (native/shm_collectives.py, the
            executor's default for CPU ranks of one machine);
- no-comm:  pinned, collectives skipped (each rank's compute alone; wrong logits);
- tp1:      one process, both cores, the whole model (the reference).

Prints the CPU, the load average, and a table (ms per step: min, median, p90; collectives'
share). The numbers go to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from tensor_parallel import cpu_model, loadavg  # noqa: E402

from enginehouse.executor.multiproc import free_port  # noqa: E402

VARIANTS = ("gloo", "unpinned", "shm", "no-comm")


def build_runner(model: str, rank: int, world: int, rows: int, pos: int):
    from enginehouse.config import EngineConfig
    from enginehouse.pipeline import create_runner, decide_backend, read_spec
    from enginehouse.plugins import get_plugins
    from enginehouse.runner import RunnerContext

    config = EngineConfig(device="cpu", tp=world, max_batch_size=rows, session_len=pos + 64)
    plugins = get_plugins()
    spec = read_spec(model, plugins=plugins)
    decision = decide_backend(spec, config, "pytorch", plugins)
    context = RunnerContext.for_model(
        spec, config, rank=rank, world_size=world, local_rank=rank, local_world_size=world
    )
    runner = create_runner(decision.chosen_plugin, "pytorch", spec, config, context, plugins)
    runner.load(False)
    blocks_per_seq = (pos + 64) // 16 + 1
    runner.allocate_kv(rows * blocks_per_seq)
    return runner, blocks_per_seq


def batches(rows: int, pos: int, blocks_per_seq: int):
    """A prefill of `pos` tokens per sequence, then the decode step at `pos`."""
    from enginehouse.runner import ScheduledBatch, SeqChunk

    tables = [tuple(range(i * blocks_per_seq, (i + 1) * blocks_per_seq)) for i in range(rows)]
    prefill = ScheduledBatch(
        tuple(SeqChunk(i, (5,) * pos, 0, tables[i], (pos - 1,)) for i in range(rows)), 16
    )
    decode = ScheduledBatch(tuple(SeqChunk(i, (7,), pos, tables[i], (0,)) for i in range(rows)), 16)
    return prefill, decode


def rank_main(model: str, rank: int, world: int, port: int, variant: str, args) -> dict:
    import torch
    import torch.distributed as dist

    if variant != "unpinned" and world > 1:
        cores = sorted(os.sched_getaffinity(0))
        per = len(cores) // world
        os.sched_setaffinity(0, cores[rank * per : (rank + 1) * per])
    if world > 1:
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
        )
    runner, blocks = build_runner(model, rank, world, args.rows, args.pos)
    torch.set_num_threads(
        max(1, len(os.sched_getaffinity(0))) if variant != "unpinned" else 2 // world
    )
    from enginehouse_pytorch.native.parallel import TensorParallel

    comm, calls = [0.0], [0]

    def timed(real):
        def wrapper(tp, x, *a, **k):
            calls[0] += 1
            if variant == "no-comm":
                return x
            t = time.perf_counter()
            try:
                return real(tp, x, *a, **k)
            finally:
                comm[0] += time.perf_counter() - t

        return wrapper

    TensorParallel.all_reduce = timed(TensorParallel.all_reduce)
    TensorParallel.gather_logits = timed(TensorParallel.gather_logits)
    prefill, decode = batches(args.rows, args.pos, blocks)
    with torch.inference_mode():
        runner.execute(prefill)
        steps, comms = [], []
        for _ in range(args.steps):
            if world > 1 and variant != "no-comm":
                dist.barrier()  # the steps start together, as the executor's broadcast makes them
            comm[0] = 0.0
            t = time.perf_counter()
            runner.execute(decode)
            steps.append(time.perf_counter() - t)
            comms.append(comm[0])
    runner.close()
    return {
        "rank": rank,
        "threads": torch.get_num_threads(),
        "collectives_per_step": calls[0] / (args.steps + 1),
        "step_ms": stats_ms(steps),
        "comm_ms": stats_ms(comms),
    }


def stats_ms(xs: list[float]) -> dict:
    xs = sorted(x * 1e3 for x in xs)
    return {
        "min": xs[0],
        "median": statistics.median(xs),
        "p90": xs[int(0.9 * (len(xs) - 1))],
        "mean": statistics.fmean(xs),
    }


def launch(args, variant: str, world: int) -> list[dict]:
    port = free_port()
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--rank",
                str(r),
                "--world",
                str(world),
                "--port",
                str(port),
                "--variant",
                variant,
                "--model",
                args.model,
                "--steps",
                str(args.steps),
                "--rows",
                str(args.rows),
                "--pos",
                str(args.pos),
            ],
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "ENGINEHOUSE_SHM_COLLECTIVES": "1" if variant == "shm" else "0"},
        )
        for r in range(world)
    ]
    out = []
    for p in procs:
        stdout, _ = p.communicate()
        if p.returncode:
            sys.exit(f"a rank failed (exit {p.returncode})")
        out.append(json.loads(stdout.strip().splitlines()[-1]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="bench-models/llama-56m")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--rows", type=int, default=1)
    parser.add_argument("--pos", type=int, default=127)
    parser.add_argument("--rank", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--world", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank is not None:
        result = rank_main(args.model, args.rank, args.world, args.port, args.variant, args)
        return print(json.dumps(result))
    start = loadavg()
    print(f"{cpu_model()}; load average at start {start}", flush=True)
    results = {"tp1": launch(args, "shm", 1)}
    for variant in VARIANTS:
        results[variant] = launch(args, variant, 2)
    end = loadavg()
    print(
        f"load average at end {end}; {args.rows} row(s) at position {args.pos}, "
        f"{args.steps} steps\n"
    )
    print(
        "| variant | rank | threads | step min / median / p90 ms | collectives median ms "
        "| collectives per step |"
    )
    print("| --- | ---: | ---: | --- | ---: | ---: |")
    for variant, ranks in results.items():
        for r in ranks:
            s, c = r["step_ms"], r["comm_ms"]
            print(
                f"| {variant} | {r['rank']} | {r['threads']} | {s['min']:.2f} / {s['median']:.2f}"
                f" / {s['p90']:.2f} | {c['median']:.2f} | {r['collectives_per_step']:.0f} |"
            )
    print("\n" + json.dumps({"load": [start, end], "results": results}))


if __name__ == "__main__":
    main()
