"""Tensor parallelism on this machine's CPU: tp=2 against tp=1, and what its parts cost.

    python benchmarks/tensor_parallel.py [--rounds 3] [--quick] [--model bench-models/llama-56m]

Three measurements, each side in a process of its own:

1. End to end: `pipeline(model, engine_config={"tp": ..., "device": "cpu"})`, greedy, fixed
   lengths (batch 1: one 64-token prompt, 128 new tokens; batch 32: 32 such prompts), for
   - tp1:    tp=1 in this process, as without tensor parallelism;
   - tp1-mp: tp=1 through the "mp" executor: one rank in a worker process, so the difference
             from tp1 is the executor's own cost (the step's broadcast and the logits' return);
   - tp2:    tp=2, two ranks (one core each here) joined by gloo.
   The sides alternate for `--rounds` rounds, each keeps its best; every side's tokens are
   checked against tp1's. The engine's time inside `runner.execute` is timed per step too.
2. The executor's transport, the work taken out: a typical decode step's `ScheduledBatch`
   (1 and 32 sequences at position 127) pickled and sent over a socket pair to 1 or 2 echo
   processes, which unpickle it and answer as the ranks do (rank 0 with [rows, 32000] float32
   logits, the others with None): the driver's round trip, median of many. The logits come
   back three ways: pickled as a tensor (what the executor does today), pickled as a numpy
   array, and through a tensor in shared memory (`REPLIES`: what a fix would gain).
3. The collectives through gloo between 2 processes (one core each, as the ranks): the
   all-reduce of a decode step's hidden states ([1, 512] and [32, 512] float32) and the
   all-gather of the logits' vocabulary halves ([rows, 16000]), median of many. A step of the
   56M Llama makes 17 all-reduces (the embedding, then o_proj and down_proj in each of its 8
   layers) and one all-gather.

Prints the CPU, the load average at the start and the end, Markdown tables for
benchmarks/RESULTS.md, and the raw JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import platform
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from multiprocessing.connection import Connection
from pathlib import Path

import torch

SIDES = {
    "tp1": {"tp": 1},
    "tp1-mp": {"tp": 1, "distributed_executor_backend": "mp"},
    "tp2": {"tp": 2},
}
# name: (prompts, prompt tokens, new tokens); --quick shrinks them.
CASES = {"batch 1": (1, 64, 128), "batch 32": (32, 64, 128)}
QUICK_CASES = {"batch 1": (1, 16, 16), "batch 32": (32, 16, 16)}
VOCAB, HIDDEN, LAYERS = 32000, 512, 8  # the 56M Llama's shape
ALL_REDUCES_PER_STEP = 1 + 2 * LAYERS


# --- the machine ----------------------------------------------------------------------------


def cpu_model() -> str:
    """lscpu's model name, with the vector units torch's CPU kernels care about."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or platform.machine()
    info = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    name = info.get("Model name", "?").strip()
    flags = info.get("Flags", "").split()
    units = [f for f in ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile") if f in flags]
    sockets = info.get("Socket(s)", "?").strip()
    return f"{name} ({os.cpu_count()} CPUs, {sockets} socket(s); {', '.join(units)})"


def loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


# --- 1. end to end --------------------------------------------------------------------------


def prompts(case: tuple[int, int, int]) -> list[dict]:
    n, length, _ = case
    rng = random.Random(0)
    return [{"token_ids": [rng.randrange(3, VOCAB) for _ in range(length)]} for _ in range(n)]


def side(model: str, name: str, cases: dict, runs: int) -> dict:
    """One side, in this process: each case's best run (after a short warm-up), the steps it
    took, the engine's time inside `runner.execute`, and the tokens."""
    from enginehouse import GenerationConfig, pipeline

    batch = max(n for n, _, _ in cases.values())
    longest = max(p + t for _, p, t in cases.values())
    engine = {
        **SIDES[name],
        "device": "cpu",
        "max_batch_size": batch,
        "session_len": longest,  # a small KV cache: the budget would otherwise be most of RAM
        "enable_prefix_caching": False,  # the runs repeat the same prompts
    }
    start = time.perf_counter()
    pipe = pipeline(model, engine_config=engine, progress=False)
    load_s = time.perf_counter() - start
    # The time inside the model: the runner's own where it runs here (tp1), else all of a
    # step but the executor's transport (its counters), which is what the ranks spent.
    spent = [0.0]
    if pipe.runner is not None:
        execute = pipe.runner.execute

        def timed_execute(b):
            t = time.perf_counter()
            try:
                return execute(b)
            finally:
                spent[0] += time.perf_counter() - t

        pipe.runner.execute = timed_execute  # the engine calls it through this instance
    results = {}
    for label, case in cases.items():
        todo, new = prompts(case), case[2]
        pipe(todo, GenerationConfig(max_new_tokens=min(16, new), ignore_eos=True))  # warm-up
        gen = GenerationConfig(max_new_tokens=new, min_new_tokens=new, ignore_eos=True)
        best = None
        for _ in range(runs):
            before, spent[0] = pipe.stats(), 0.0
            t = time.perf_counter()
            out = pipe(todo, gen)
            seconds = time.perf_counter() - t
            after = pipe.stats()
            tokens = [r.token_ids for r in out]
            assert all(len(ids) == new for ids in tokens), "a request ended early"
            transport = after.get("transport_seconds", 0.0) - before.get("transport_seconds", 0.0)
            run = {
                "seconds": seconds,
                "tokens_per_s": sum(map(len, tokens)) / seconds,
                "steps": after["steps"] - before["steps"],
                "execute_s": spent[0] if pipe.runner is not None else seconds - transport,
                "tokens": tokens,
            }
            if best is None or run["seconds"] < best["seconds"]:
                best = run
        results[label] = best
    pipe.close()
    return {"load_s": load_s, "threads": torch.get_num_threads(), "cases": results}


def end_to_end(args: argparse.Namespace, cases: dict) -> dict:
    """Every side `--rounds` times, alternating; each side's best per case."""
    best: dict[str, dict] = {}
    for _ in range(args.rounds):
        for name in SIDES:
            cmd = [sys.executable, __file__, "--side", name, "--model", args.model]
            cmd += ["--runs", str(args.runs)] + (["--quick"] if args.quick else [])
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode:
                sys.exit(f"side {name} failed:\n{done.stderr[-4000:]}")
            result = json.loads(done.stdout.strip().splitlines()[-1])
            kept = best.setdefault(name, result)
            for label, run in result["cases"].items():
                if run["seconds"] < kept["cases"][label]["seconds"]:
                    kept["cases"][label] = run
            kept["load_s"] = min(kept["load_s"], result["load_s"])
            speeds = [f"{k} {r['tokens_per_s']:.1f} tok/s" for k, r in result["cases"].items()]
            print(f"  {name}: {', '.join(speeds)}", flush=True)
    return best


# --- 2. the executor's transport -------------------------------------------------------------


def decode_batch(rows: int, pos: int = 127, block_size: int = 16):
    """A decode step as the engine schedules it: one token per sequence at `pos`."""
    from enginehouse.runner import ScheduledBatch, SeqChunk

    blocks = pos // block_size + 1
    rng = random.Random(0)
    chunks = tuple(
        SeqChunk(
            seq_id=i,
            token_ids=(rng.randrange(VOCAB),),
            start_pos=pos,
            block_table=tuple(range(i * blocks, (i + 1) * blocks)),
            logits_at=(0,),
        )
        for i in range(rows)
    )
    return ScheduledBatch(chunks, block_size)


# How rank 0's logits come back: a pickled tensor (what the executor does today: torch.save
# inside pickle), a pickled numpy array (one copy of its bytes; torch.from_numpy on arrival),
# or written into a tensor in shared memory that the driver maps too (only a short reply).
REPLIES = ("tensor", "numpy", "shm")


def shared_logits(path: str, rows: int) -> torch.Tensor:
    return torch.from_file(path, shared=True, size=rows * VOCAB).view(rows, VOCAB)


def echo(fd: int, rank: int, world: int, rows: int, reply_as: str, shm: str) -> None:
    """A stand-in rank: unpickle each call and answer as `RankWorker` does, without the work."""
    torch.set_num_threads(1)  # see `transport`
    if world > 1:  # on its own core, as the "mp" executor places the ranks
        os.sched_setaffinity(0, [sorted(os.sched_getaffinity(0))[rank % os.cpu_count()]])
    conn = Connection(fd)
    logits = torch.randn(rows, VOCAB)
    out = shared_logits(shm, rows) if reply_as == "shm" else None
    while True:
        method, args = pickle.loads(conn.recv_bytes())
        if method == "close":
            break
        reply = None
        if rank == 0:
            if out is not None:
                out.copy_(logits)
            reply = {"tensor": logits, "numpy": logits.numpy(), "shm": "shm"}[reply_as]
        conn.send_bytes(pickle.dumps(("ok", reply)))


def timings(seconds: list[float]) -> dict:
    ms = sorted(s * 1e3 for s in seconds)
    p90 = ms[int(0.9 * (len(ms) - 1))]
    return {"min_ms": ms[0], "median_ms": statistics.median(ms), "p90_ms": p90}


def transport(world: int, rows: int, iters: int, reply_as: str) -> dict:
    """The driver's round trip of one step, as `MultiprocExecutor._call_all` makes it.

    Copies of 4 MB gain nothing from a second thread, and on a loaded 2-core machine an
    OpenMP team's barrier can wait milliseconds for a descheduled thread: one thread here."""
    torch.set_num_threads(1)
    with tempfile.NamedTemporaryFile(dir="/dev/shm" if os.path.isdir("/dev/shm") else None) as f:
        os.truncate(f.name, rows * VOCAB * 4)
        shm = shared_logits(f.name, rows)
        conns, procs = [], []
        for rank in range(world):
            mine, theirs = socket.socketpair()
            cmd = [sys.executable, __file__, "--echo", str(theirs.fileno()), str(rank)]
            cmd += [str(world), str(rows), reply_as, f.name]
            procs.append(subprocess.Popen(cmd, pass_fds=(theirs.fileno(),)))
            theirs.close()
            conns.append(Connection(mine.detach()))
        batch = decode_batch(rows)
        seconds = []
        for i in range(iters + 20):
            start = time.perf_counter()
            payload = pickle.dumps(("execute", (batch,)))
            for conn in conns:
                conn.send_bytes(payload)
            replies = [pickle.loads(conn.recv_bytes()) for conn in conns]
            logits = replies[0][1]
            if reply_as == "numpy":
                logits = torch.from_numpy(logits)
            elif reply_as == "shm":  # a copy: the next step overwrites the shared tensor
                logits = shm.clone()
            if i >= 20:  # the first calls wait for the echo processes' imports
                seconds.append(time.perf_counter() - start)
        for conn, proc in zip(conns, procs):
            conn.send_bytes(pickle.dumps(("close", ())))
            proc.wait()
            conn.close()
    reply = pickle.dumps(replies[0])
    return {
        "world": world,
        "rows": rows,
        "reply_as": reply_as,
        "request_bytes": len(payload),
        "reply_bytes": len(reply),
        "pickle_reply_ms": _median_ms(lambda: pickle.dumps(replies[0])),
        "unpickle_reply_ms": _median_ms(lambda: pickle.loads(reply)),
        **timings(seconds),
    }


def _median_ms(fn, n: int = 50) -> float:
    seconds = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds) * 1e3


# --- 3. the collectives ----------------------------------------------------------------------

COLLECTIVES = [  # (op, rows, columns)
    ("all_reduce", 1, HIDDEN),
    ("all_reduce", 32, HIDDEN),
    ("all_gather", 1, VOCAB // 2),
    ("all_gather", 32, VOCAB // 2),
]


def collective_rank(rank: int, port: int, iters: int) -> None:
    """One of 2 gloo ranks, on its own core as the "mp" executor places them; rank 0 prints."""
    from datetime import timedelta

    from enginehouse.executor.worker import _share_cores

    _share_cores(rank, 2)
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    dist = torch.distributed
    url = f"tcp://127.0.0.1:{port}"
    timeout = timedelta(seconds=60)
    dist.init_process_group("gloo", init_method=url, rank=rank, world_size=2, timeout=timeout)
    results = []
    for op, rows, cols in COLLECTIVES:
        x = torch.randn(rows, cols)
        parts = [torch.empty_like(x) for _ in range(2)]
        seconds = []
        dist.barrier()
        for i in range(iters + 50):
            start = time.perf_counter()
            if op == "all_reduce":
                dist.all_reduce(x)
            else:
                dist.all_gather(parts, x)
            if i >= 50:
                seconds.append(time.perf_counter() - start)
        results.append({"op": op, "shape": [rows, cols], **timings(seconds)})
    dist.destroy_process_group()
    if rank == 0:
        print(json.dumps(results))


def collectives(iters: int) -> list[dict]:
    from enginehouse.executor.multiproc import free_port

    port = str(free_port())
    cmds = [[sys.executable, __file__, "--collective", str(r), port, str(iters)] for r in (0, 1)]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) for cmd in cmds]
    outs = [p.communicate()[0] for p in procs]
    if any(p.returncode for p in procs):
        raise RuntimeError(f"a gloo rank failed: exit codes {[p.returncode for p in procs]}")
    return json.loads(outs[0].strip().splitlines()[-1])


# --- the report ------------------------------------------------------------------------------


def same_tokens(a: list[list[int]], b: list[list[int]]) -> str:
    if a == b:
        return "identical"
    differ = [i for i, (s, t) in enumerate(zip(a, b)) if s != t]
    first = differ[0]
    token = next(j for j, (x, y) in enumerate(zip(a[first], b[first])) if x != y)
    return f"{len(differ)}/{len(a)} sequences differ (first: sequence {first}, token {token})"


def step_collectives(colls: list[dict], rows: int, stat: str) -> float:
    """The collectives of one decode step of `rows` sequences, from their `stat` times."""
    by = {(c["op"], c["shape"][0]): c[stat] for c in colls}
    return ALL_REDUCES_PER_STEP * by[("all_reduce", rows)] + by[("all_gather", rows)]


def report(e2e: dict, trips: list[dict], colls: list[dict], cases: dict) -> str:
    lines = [
        "| case | tp1 tok/s | tp1-mp tok/s | tp2 tok/s | tp2 / tp1 | tp1-mp / tp1 | "
        "tokens vs tp1 (tp1-mp; tp2) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for label, (n, p, t) in cases.items():
        r = {name: e2e[name]["cases"][label] for name in SIDES}
        tps = {name: r[name]["tokens_per_s"] for name in SIDES}
        lines.append(
            f"| {label}: {n} x {p} tokens, {t} new | {tps['tp1']:.1f} | {tps['tp1-mp']:.1f} | "
            f"{tps['tp2']:.1f} | {tps['tp2'] / tps['tp1']:.2f}x | "
            f"{tps['tp1-mp'] / tps['tp1']:.2f}x | "
            f"{same_tokens(r['tp1-mp']['tokens'], r['tp1']['tokens'])}; "
            f"{same_tokens(r['tp2']['tokens'], r['tp1']['tokens'])} |"
        )
    lines += [
        "",
        "Per engine step (ms; the engine's wall time per step, and its part inside "
        "`runner.execute`: the model, plus the executor's round trip for tp1-mp and tp2):",
        "",
        "| case | side | steps | ms/step | execute ms/step | the rest ms/step |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for label in cases:
        for name in SIDES:
            r = e2e[name]["cases"][label]
            step, ex = r["seconds"] / r["steps"] * 1e3, r["execute_s"] / r["steps"] * 1e3
            lines.append(
                f"| {label} | {name} | {r['steps']} | {step:.2f} | {ex:.2f} | {step - ex:.2f} |"
            )
    lines += [
        "",
        "The executor's transport per step, the work taken out (pickle, send to every rank, "
        "unpickle; rank 0 answers with the logits, the others with None):",
        "",
        "| ranks | sequences | logits pickled as | request bytes | reply bytes | "
        "round trip min ms | median ms | p90 ms | pickle reply ms | unpickle reply ms |",
        "| ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for t in trips:
        lines.append(
            f"| {t['world']} | {t['rows']} | {t['reply_as']} | {t['request_bytes']:,} | "
            f"{t['reply_bytes']:,} | "
            f"{t['min_ms']:.3f} | {t['median_ms']:.3f} | {t['p90_ms']:.3f} | "
            f"{t['pickle_reply_ms']:.3f} | "
            f"{t['unpickle_reply_ms']:.3f} |"
        )
    lines += [
        "",
        "gloo collectives between 2 processes, one core each (ms):",
        "",
        "| op | shape (per rank) | min | median | p90 |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    for c in colls:
        shape = " x ".join(map(str, c["shape"]))
        ms = f"{c['min_ms']:.3f} | {c['median_ms']:.3f} | {c['p90_ms']:.3f}"
        lines.append(f"| {c['op']} | {shape} float32 | {ms} |")
    for rows in (1, 32):
        low, mid = (step_collectives(colls, rows, stat) for stat in ("min_ms", "median_ms"))
        lines.append(
            f"\nA decode step of {rows} sequence(s) at tp=2: {ALL_REDUCES_PER_STEP} all-reduces "
            f"+ 1 all-gather = {low:.2f} ms of collectives at their minimum, {mid:.2f} ms at "
            "their median."
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="bench-models/llama-56m")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of the sides")
    parser.add_argument("--runs", type=int, default=2, help="timed runs per process and case")
    parser.add_argument("--iters", type=int, default=500, help="calls per transport/collective")
    parser.add_argument("--quick", action="store_true", help="a smoke run: short, 1 round")
    parser.add_argument("--side", choices=list(SIDES), help=argparse.SUPPRESS)
    parser.add_argument("--echo", nargs=6, help=argparse.SUPPRESS)
    parser.add_argument("--collective", nargs=3, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    cases = QUICK_CASES if args.quick else CASES
    if args.echo:
        fd, rank, world, rows, reply_as, shm = args.echo
        return echo(int(fd), int(rank), int(world), int(rows), reply_as, shm)
    if args.collective:
        return collective_rank(*args.collective)
    if args.side:
        result = side(args.model, args.side, cases, args.runs)
        return print(json.dumps(result))
    if args.quick:
        args.rounds, args.runs, args.iters = 1, 1, 100
    if not (Path(args.model) / "config.json").is_file():
        sys.exit(f"{args.model} has no config.json; build it with benchmarks/native_backend.py")
    start_load = loadavg()
    print(
        f"{cpu_model()}; torch {torch.__version__}, Python {platform.python_version()}; "
        f"load average at start {start_load}",
        flush=True,
    )
    print(f"end to end, {args.rounds} round(s) of {', '.join(SIDES)}:", flush=True)
    e2e = end_to_end(args, cases)
    print("transport and collectives...", flush=True)
    trips = [
        transport(world, rows, args.iters, reply_as)
        for world in (1, 2)
        for rows in (1, 32)
        for reply_as in REPLIES
    ]
    colls = collectives(args.iters)
    end_load = loadavg()
    threads = {name: e2e[name]["threads"] for name in SIDES}
    print(
        f"\nload average at start {start_load}, at end {end_load}; the driver's torch threads "
        f"{threads}; best of {args.rounds} round(s) x {args.runs} run(s) per side\n"
    )
    print(report(e2e, trips, colls, cases))
    for name in SIDES:
        for run in e2e[name]["cases"].values():
            run.pop("tokens")
    raw = {"e2e": e2e, "transport": trips, "collectives": colls}
    print("\n" + json.dumps({"load": [start_load, end_load], **raw}))


if __name__ == "__main__":
    main()
