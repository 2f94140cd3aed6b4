"""Weight-only quantization at load (int8, int4) against float32, native `pytorch` backend.

    python benchmarks/quantization.py [--rounds 3] [--modes float32,int8,int4]
        [--cases single,equal,ttft] [--model llama-56m]

On the random-weight 56M Llama shape of benchmarks/native_backend.py (built once in
./bench-models): `enginehouse bench`'s cases (single: batch-1 decode of 128 tokens after a
64-token prompt; equal: 32 prompts x 64 tokens, 128 new each; ttft: a 512-token prompt), every
mode in a fresh process of its own, the modes alternating round after round, each keeping its
best round. Then the memory the weights take in each mode, as loaded (parameters, oneDNN-packed
float weights and quantized layers; the embedding stays float32 in every mode). Prints a
Markdown table for benchmarks/RESULTS.md and the raw JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
from pathlib import Path

import torch

from enginehouse.bench import make_cases, measure

sys.path.insert(0, str(Path(__file__).parent))
from native_backend import build  # noqa: E402 - the same models, built the same way

MODES = {
    "float32": {},
    "int8": {"quantization": "int8"},
    "int4": {"quantization": "int4"},  # group 32: 128 and 64 do not divide 1376 (down_proj)
    "int4-g128": {"quantization": "int4", "quantization_group_size": 128},  # other shapes
}

MEMORY = """
import json, sys, torch
from enginehouse import pipeline
from enginehouse_pytorch.native.quant import QuantLinear
path, config = sys.argv[1], json.loads(sys.argv[2])
pipe = pipeline(path, backend="pytorch", engine_config=config, progress=False)
model = pipe.engine.engine.runner.model
seen, total = set(), 0
for m in model.modules():
    tensors = list(m.parameters(recurse=False))
    if isinstance(m, QuantLinear):
        tensors += [t for p in m.parts for t in p.tensors()]
    if getattr(m, "packed", None) is not None:  # a float Linear handed to oneDNN
        tensors.append(m.packed)
    for t in tensors:
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
print(json.dumps({"weight_bytes": total}))
pipe.close()
"""


def weight_bytes(path: Path, config: dict) -> int:
    out = subprocess.run(
        [sys.executable, "-c", MEMORY, str(path), json.dumps(config)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])["weight_bytes"]


def markdown(best: dict, memory: dict, path: Path, cases: list[str]) -> str:
    from enginehouse.spec import read_model_spec

    vocab = int(read_model_spec(path).config["vocab_size"])
    useful = {name: case.useful_tokens for name, case in make_cases(vocab).items()}
    base = best["float32"]
    head = "| mode | " + " | ".join(f"{c} | vs float32" for c in cases) + " | weights |"
    lines = [head, "| --- |" + " ---: | ---: |" * len(cases) + " ---: |"]
    for mode, seconds in best.items():
        cells = []
        for c in cases:
            value = f"{seconds[c]:.3f} s" if c == "ttft" else f"{useful[c] / seconds[c]:.1f} tok/s"
            cells += [value, f"{base[c] / seconds[c]:.2f}x"]
        mib = memory[mode] / 2**20
        lines.append(f"| {mode} | " + " | ".join(cells) + f" | {mib:.1f} MiB |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--modes", default="float32,int8,int4")
    parser.add_argument("--cases", default="single,equal,ttft")
    parser.add_argument("--model", default="llama-56m")
    args = parser.parse_args()
    path = build(args.model)
    modes, cases = args.modes.split(","), args.cases.split(",")
    print(
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}, load average {open('/proc/loadavg').read().split()[:3]}"
    )
    best: dict[str, dict[str, float]] = {m: {} for m in modes}
    for r in range(args.rounds):
        for mode in modes:  # alternating, so that a noisy minute hits every mode alike
            got = measure(
                path, ["pytorch"], cases, engine_config=MODES[mode], baseline=False, repeat=1
            )
            for case, sec in got["seconds"]["pytorch"].items():
                best[mode][case] = min(best[mode].get(case, float("inf")), sec)
            print(f"round {r + 1}, {mode}: {json.dumps(got['seconds']['pytorch'])}", flush=True)
    memory = {mode: weight_bytes(path, MODES[mode]) for mode in modes}
    print(f"\nload average at the end: {open('/proc/loadavg').read().split()[:3]}\n")
    print(markdown(best, memory, path, cases))
    print("\n" + json.dumps({"seconds": best, "weight_bytes": memory}))


if __name__ == "__main__":
    main()
