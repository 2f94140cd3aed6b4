"""`enginehouse bench`: throughput, latency and start-up against transformers' `generate`.

Every side (each backend, and the transformers baseline) runs in a fresh process of its own:
torch work from two sides in one process would make two OpenMP thread teams fight over the
cores and slow whichever runs second. Prompts are random token ids from a fixed seed, so every
process sees the same work; decoding is greedy with fixed output lengths.

Cases (`--cases`), each reported as the ratio to the baseline (higher is better):
- equal:   32 prompts of 64 tokens, 128 new each (one padded `generate` call: its best case);
- mixed:   48 prompts of 8-256 tokens, 16-128 new each. `generate` gets one left-padded batch
           run to the longest request's length; only the tokens each request asked for count;
- single:  one 64-token prompt, 128 new tokens: decode speed at batch 1;
- ttft:    one 512-token prompt to its first token, model already loaded;
- startup: `pipeline()` to the first token in a fresh process, against `from_pretrained` and
           one token (after `import torch, transformers` on both sides).
An engine side also reports its average batch per step in each case: how full continuous
batching kept the steps (the mixed case's batch shrinks as short requests finish).
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import EnginehouseError

BASELINE = "hf-generate"
CASES = ("equal", "mixed", "single", "ttft", "startup")


@dataclass(frozen=True)
class Case:
    prompts: list[list[int]]
    new_tokens: list[int]

    @property
    def useful_tokens(self) -> int:
        return sum(self.new_tokens)


def make_cases(vocab_size: int, quick: bool = False) -> dict[str, Case]:
    """The prompt sets, identical in every process (fixed seed). `quick` shrinks them 4x."""
    rng, scale = random.Random(0), 4 if quick else 1

    def tokens(n: int) -> list[int]:
        return [rng.randrange(10, vocab_size) for _ in range(n)]

    equal = [tokens(64) for _ in range(32 // scale)]
    mixed = [tokens(rng.randint(8, 256)) for _ in range(48 // scale)]
    return {
        "equal": Case(equal, [128 // scale] * len(equal)),
        "mixed": Case(mixed, [rng.randint(16, 128) // scale for _ in mixed]),
        "single": Case([tokens(64)], [128 // scale]),
        "ttft": Case([tokens(512 // scale)], [1]),
    }


def _best_time(fn: Callable[[], Any], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def _hf_runner(path: str) -> Callable[[Case], float | None]:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

    def run(case: Case) -> None:
        width = max(len(p) for p in case.prompts)
        ids = torch.tensor([[0] * (width - len(p)) + p for p in case.prompts])  # left padding
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in case.prompts])
        n = max(case.new_tokens)
        with torch.inference_mode():
            model.generate(
                ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False
            )

    return run


def _engine_runner(path: str, backend: str, engine_config: dict) -> Callable[[Case], float]:
    from .config import GenerationConfig
    from .pipeline import pipeline

    pipe = pipeline(path, backend=backend, engine_config=engine_config, progress=False)

    def run(case: Case) -> tuple[float, float | None]:
        """Runs the case; returns the average batch per engine step while it ran, and the
        share of speculative proposals accepted (None without speculative decoding)."""
        configs = [GenerationConfig(max_new_tokens=n, min_new_tokens=n) for n in case.new_tokens]
        before = pipe.stats()
        pipe([{"token_ids": p} for p in case.prompts], configs)
        after = pipe.stats()
        steps = after["steps"] - before["steps"]
        batch = (after["step_sequences"] - before["step_sequences"]) / max(1, steps)
        if "spec_decode_num_draft_tokens" not in after:
            return batch, None
        proposed = after["spec_decode_num_draft_tokens"] - before["spec_decode_num_draft_tokens"]
        kept = after["spec_decode_num_accepted_tokens"] - before["spec_decode_num_accepted_tokens"]
        return batch, kept / proposed if proposed else 0.0

    return run


def run_side(
    path: str, side: str, cases: list[str], quick: bool, repeat: int, engine_config: dict
) -> dict[str, dict[str, float]]:
    """Seconds per case for one side, in this process (best of `repeat`); for an engine side
    also the average batch per step (how full continuous batching kept the steps)."""
    from .spec import read_model_spec

    vocab = int(read_model_spec(path).config.get("vocab_size", 32000))
    all_cases = make_cases(vocab, quick)
    run = _hf_runner(path) if side == BASELINE else _engine_runner(path, side, engine_config)
    run(Case([all_cases["single"].prompts[0][:8]], [2]))  # warm up (first-call allocations)
    avg_batch: dict[str, float] = {}
    acceptance: dict[str, float] = {}

    def once(name: str) -> None:
        got = run(all_cases[name])
        if got is not None:  # transformers' side has no engine steps
            avg_batch[name] = got[0]
            if got[1] is not None:
                acceptance[name] = got[1]

    seconds = {name: _best_time(lambda n=name: once(n), repeat) for name in cases}
    return {"seconds": seconds, "avg_batch": avg_batch, "acceptance": acceptance}


STARTUP = {
    BASELINE: "from transformers import AutoModelForCausalLM as M\n"
    "m = M.from_pretrained(PATH); m.generate(torch.tensor([IDS]), max_new_tokens=1)",
    "engine": "from enginehouse import pipeline, GenerationConfig as G\n"
    "p = pipeline(PATH, backend=BACKEND, engine_config=CONFIG, progress=False)\n"
    "p({'token_ids': IDS}, G(max_new_tokens=1)); p.close()",
}


def startup_time(path: str, side: str, repeat: int, engine_config: dict) -> float:
    """Seconds from the call to the first token in a fresh process (best of `repeat`)."""
    code = (
        "import time, torch, transformers\n"
        f"PATH, IDS = {path!r}, list(range(10, 74))\n"
        f"BACKEND, CONFIG = {side!r}, {engine_config!r}\n"
        "start = time.perf_counter()\n"
        f"{STARTUP[BASELINE if side == BASELINE else 'engine']}\n"
        "print(time.perf_counter() - start)"
    )
    runs = [_python(["-c", code], side) for _ in range(repeat)]
    return min(float(out.strip().splitlines()[-1]) for out in runs)


def _python(args: list[str], side: str) -> str:
    done = subprocess.run([sys.executable, *args], capture_output=True, text=True)
    if done.returncode != 0:
        # The traceback's last line says what failed; the rest is the benchmark's own frames.
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        raise EnginehouseError(f"the {side} side failed: {lines[-1] if lines else 'no output'}")
    return done.stdout


def measure(
    path: str | Path,
    backends: list[str],
    cases: tuple[str, ...] | list[str] = CASES,
    quick: bool = False,
    repeat: int = 2,
    engine_config: dict | None = None,
    baseline: bool = True,
) -> dict[str, Any]:
    """Seconds per case for every side, each side in its own process."""
    path, config = str(path), dict(engine_config or {})
    # Repeats send the same prompts again: with prefix caching on, they would skip the prefill.
    config.setdefault("enable_prefix_caching", False)
    repeat = 1 if quick else repeat
    sides = ([BASELINE] if baseline else []) + list(backends)
    timed = [c for c in cases if c != "startup"]
    seconds: dict[str, dict[str, float]] = {}
    avg_batch: dict[str, dict[str, float]] = {}
    acceptance: dict[str, dict[str, float]] = {}
    for side in sides:
        args = ["-m", "enginehouse.bench", path, side, json.dumps(timed), json.dumps(config)]
        args += [str(repeat), "quick" if quick else "full"]
        out = json.loads(_python(args, side).strip().splitlines()[-1]) if timed else {}
        seconds[side] = out.get("seconds", {})
        avg_batch[side] = out.get("avg_batch", {})
        acceptance[side] = out.get("acceptance", {})
        if "startup" in cases:
            seconds[side]["startup"] = startup_time(path, side, repeat, config)
    return {
        "model": path,
        "quick": quick,
        "repeat": repeat,
        "seconds": seconds,
        "avg_batch": avg_batch,
        "acceptance": acceptance,  # speculative decoding's accepted share of proposals
    }


def report(result: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per case and side: tokens/s (or seconds) and the ratio to the baseline."""
    from .spec import read_model_spec

    vocab = int(read_model_spec(result["model"]).config.get("vocab_size", 32000))
    cases = make_cases(vocab, result["quick"])
    base = result["seconds"].get(BASELINE, {})
    rows = []
    for side, times in result["seconds"].items():
        for name, sec in times.items():
            row = {"case": name, "side": side, "seconds": round(sec, 4)}
            if name in ("equal", "mixed", "single"):
                row["tokens_per_s"] = round(cases[name].useful_tokens / sec, 1)
            if name in base:
                row["ratio"] = round(base[name] / sec, 2)  # > 1: faster than the baseline
            batch = result.get("avg_batch", {}).get(side, {}).get(name)
            if batch is not None and name != "startup":
                row["avg_batch"] = round(batch, 1)
            accepted = result.get("acceptance", {}).get(side, {}).get(name)
            if accepted is not None:
                row["acceptance"] = round(accepted, 3)
            rows.append(row)
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    head = f"{'case':<9}{'side':<14}{'tok/s':>10}{'seconds':>10}{'vs generate':>13}"
    speculative = any("acceptance" in r for r in rows)
    lines = [head + f"{'avg batch':>11}" + (f"{'accepted':>10}" if speculative else "")]
    for r in rows:
        tps = f"{r['tokens_per_s']:.1f}" if "tokens_per_s" in r else "-"
        ratio = f"{r['ratio']:.2f}x" if "ratio" in r else "-"
        batch = f"{r['avg_batch']:.1f}" if "avg_batch" in r else "-"
        line = f"{r['case']:<9}{r['side']:<14}{tps:>10}{r['seconds']:>10.3f}{ratio:>13}"
        line += f"{batch:>11}"
        if speculative:  # the share of speculative proposals the target kept
            line += f"{r['acceptance']:>10.0%}" if "acceptance" in r else f"{'-':>10}"
        lines.append(line)
    return "\n".join(lines)


if __name__ == "__main__":  # one side, run by measure() in a fresh process
    model, side, names, config, repeat, mode = sys.argv[1:7]
    times = run_side(
        model, side, json.loads(names), mode == "quick", int(repeat), json.loads(config)
    )
    print(json.dumps(times))
