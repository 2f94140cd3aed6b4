"""Where the engine runs, and what that costs: in process, through the "mp" executor at tp=1
and tp=2, and as two data-parallel replicas.

    python benchmarks/engine_placement.py [--rounds 5] [--quick] [--model bench-models/llama-56m]

Each side runs in a process of its own, the sides alternate for `--rounds` rounds, and each
keeps its best run per case (and the median of its runs); every side's tokens are checked
against in-process's. Greedy, fixed lengths: batch 1 (one 64-token prompt, 128 new tokens)
and batch 32 (32 such prompts).

- in-process: the engine core and the runner on a thread of this process (the default);
- tp1-mp:     tp=1 through the "mp" executor: one rank in a worker process, which samples
              where the logits are and sends back token ids;
- tp2:        tp=2, two ranks (one core each on a 2-core machine) joined by gloo;
- dp2:        two engine replicas, each a process of its own on one core.

For the executor sides the transport per step is reported from the executor's own counters:
bytes sent to the ranks (the step's plan, written once to shared memory, and rank 0's sample
call), bytes back (rank 0's token ids and logprobs), and the time the driver spent pickling,
writing and reading them. For dp2, the bytes between the front and its replicas per replica
step: the requests in, each step's outputs (token ids) back. Prints the CPU, the load average
at the start and the end, a Markdown table for benchmarks/RESULTS.md, and the raw JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from tensor_parallel import CASES, QUICK_CASES, cpu_model, loadavg, prompts  # noqa: E402

SIDES = {
    "in-process": {},
    "tp1-mp": {"distributed_executor_backend": "mp"},
    "tp2": {"tp": 2},
    "dp2": {"dp": 2},
}
TRANSPORT = ("transport_sent_bytes", "transport_received_bytes", "transport_seconds")
# dp: what crossed between the front and its replicas (requests in, each step's outputs out).
CLIENT = ("client_sent_bytes", "client_received_bytes")


def side(model: str, name: str, cases: dict, runs: int) -> dict:
    """One side, in this process: every timed run of each case, with its steps and transport."""
    from enginehouse import GenerationConfig, pipeline

    batch = max(n for n, _, _ in cases.values())
    longest = max(p + t for _, p, t in cases.values())
    engine = {
        **SIDES[name],
        "device": "cpu",
        "max_batch_size": batch,
        "session_len": longest,
        "enable_prefix_caching": False,  # the runs repeat the same prompts
    }
    start = time.perf_counter()
    pipe = pipeline(model, engine_config=engine, progress=False)
    load_s = time.perf_counter() - start
    results = {}
    for label, case in cases.items():
        todo, new = prompts(case), case[2]
        pipe(todo, GenerationConfig(max_new_tokens=min(16, new), ignore_eos=True))  # warm-up
        gen = GenerationConfig(max_new_tokens=new, min_new_tokens=new, ignore_eos=True)
        runs_of_case = []
        for _ in range(runs):
            before = pipe.stats()
            t = time.perf_counter()
            out = pipe(todo, gen)
            seconds = time.perf_counter() - t
            after = pipe.stats()
            tokens = [r.token_ids for r in out]
            assert all(len(ids) == new for ids in tokens), "a request ended early"
            run = {"seconds": seconds, "steps": after["steps"] - before["steps"]}
            run["tokens_per_s"] = sum(map(len, tokens)) / seconds
            for key in TRANSPORT + CLIENT:
                run[key] = after.get(key, 0) - before.get(key, 0)
            runs_of_case.append((run, tokens))
        results[label] = {
            "runs": [r for r, _ in runs_of_case],
            "tokens": runs_of_case[0][1],
        }
    pipe.close()
    return {"load_s": load_s, "threads": torch.get_num_threads(), "cases": results}


def run_sides(args: argparse.Namespace, cases: dict) -> dict:
    """Every side `--rounds` times, alternating; all their runs kept."""
    kept: dict[str, dict] = {}
    for _ in range(args.rounds):
        for name in SIDES:
            cmd = [sys.executable, __file__, "--side", name, "--model", args.model]
            cmd += ["--runs", str(args.runs)] + (["--quick"] if args.quick else [])
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode:
                sys.exit(f"side {name} failed:\n{done.stderr[-4000:]}")
            result = json.loads(done.stdout.strip().splitlines()[-1])
            into = kept.setdefault(name, {"load_s": [], "cases": {}})
            into["load_s"].append(result["load_s"])
            for label, case in result["cases"].items():
                slot = into["cases"].setdefault(label, {"runs": [], "tokens": case["tokens"]})
                slot["runs"] += case["runs"]
            speeds = [
                f"{k} {max(r['tokens_per_s'] for r in c['runs']):.1f}"
                for k, c in result["cases"].items()
            ]
            print(f"  {name}: {', '.join(speeds)} tok/s", flush=True)
    return kept


def same(a: list[list[int]], b: list[list[int]]) -> str:
    return "identical" if a == b else f"{sum(x != y for x, y in zip(a, b))}/{len(a)} differ"


def report(kept: dict, cases: dict) -> str:
    base = "in-process"
    lines = [
        "| case | side | best tok/s | median tok/s | best / in-process | median / in-process "
        "| ms/step | sent B/step | back B/step | transport ms/step | tokens |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for label, (n, p, t) in cases.items():
        ref = kept[base]["cases"][label]
        ref_best = max(r["tokens_per_s"] for r in ref["runs"])
        ref_median = statistics.median(r["tokens_per_s"] for r in ref["runs"])
        for name in SIDES:
            case = kept[name]["cases"][label]
            runs = case["runs"]
            best = max(runs, key=lambda r: r["tokens_per_s"])
            median = statistics.median(r["tokens_per_s"] for r in runs)
            steps = max(1, best["steps"])
            sent = best["transport_sent_bytes"] / steps
            back = best["transport_received_bytes"] / steps
            ms = best["transport_seconds"] / steps * 1e3
            transport = f"{sent:,.0f} | {back:,.0f} | {ms:.3f}" if sent else "- | - | -"
            if best.get("client_received_bytes"):  # dp: the front and its replicas
                sent = best["client_sent_bytes"] / steps
                back = best["client_received_bytes"] / steps
                transport = f"{sent:,.0f} | {back:,.0f} | -"
            lines.append(
                f"| {label}: {n} x {p}, {t} new | {name} | {best['tokens_per_s']:.1f} | "
                f"{median:.1f} | {best['tokens_per_s'] / ref_best:.2f}x | "
                f"{median / ref_median:.2f}x | {best['seconds'] / steps * 1e3:.2f} | "
                f"{transport} | {same(case['tokens'], ref['tokens'])} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="bench-models/llama-56m")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds of the sides")
    parser.add_argument("--runs", type=int, default=2, help="timed runs per process and case")
    parser.add_argument("--quick", action="store_true", help="a smoke run: short, 1 round")
    parser.add_argument("--side", choices=list(SIDES), help=argparse.SUPPRESS)
    args = parser.parse_args()
    cases = QUICK_CASES if args.quick else CASES
    if args.side:
        return print(json.dumps(side(args.model, args.side, cases, args.runs)))
    if args.quick:
        args.rounds, args.runs = 1, 1
    if not (Path(args.model) / "config.json").is_file():
        sys.exit(f"{args.model} has no config.json; build it with benchmarks/native_backend.py")
    start_load = loadavg()
    print(
        f"{cpu_model()}; torch {torch.__version__}, Python {platform.python_version()}; "
        f"load average at start {start_load}",
        flush=True,
    )
    kept = run_sides(args, cases)
    end_load = loadavg()
    print(
        f"\nload average at start {start_load}, at end {end_load}; {args.rounds} round(s) x "
        f"{args.runs} run(s) per side, sides alternated\n"
    )
    print(report(kept, cases))
    for name in SIDES:
        for case in kept[name]["cases"].values():
            case.pop("tokens")
    print("\n" + json.dumps({"load": [start_load, end_load], "sides": kept}))


if __name__ == "__main__":
    main()
