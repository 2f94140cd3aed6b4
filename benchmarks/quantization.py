"""Weight-only quantization at load (int8, int4) against float32, native `pytorch` backend.

    python benchmarks/quantization.py [--rounds 3] [--modes float32,int8,int4]
        [--cases single,equal,ttft] [--model llama-56m]
    python benchmarks/quantization.py --kernels [--rows 1,32] [--rounds 15]

On the random-weight 56M Llama shape of benchmarks/native_backend.py (built once in
./bench-models): `enginehouse bench`'s cases (single: batch-1 decode of 128 tokens after a
64-token prompt; equal: 32 prompts x 64 tokens, 128 new each; ttft: a 512-token prompt), every
mode in a fresh process of its own, the modes alternating round after round, each keeping its
best round. Then the memory the weights take in each mode, as loaded (parameters, oneDNN-packed
float weights and quantized layers; the embedding stays float32 in every mode). Prints a
Markdown table for benchmarks/RESULTS.md and the raw JSON.

`--kernels` times the projections of that shape alone instead (one process, the sides
alternating call after call, best of `--rounds`): float32 through oneDNN (the float path),
the int8 and int4 kernel, and `torch.ops.aten._weight_int8pack_mm` (int8 per channel, which
needs bfloat16 activations to be fast).
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
model = pipe.runner.model
seen, total = set(), 0
for m in model.modules():
    tensors = list(m.parameters(recurse=False))
    if isinstance(m, QuantLinear):
        tensors += [t for p in m.parts for t in p.tensors()]
    for copy in ("packed", "small"):  # a float Linear's oneDNN and cpu_decode layouts
        if getattr(m, copy, None) is not None:
            tensors.append(getattr(m, copy))
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


SHAPES = {"qkv": (1024, 512), "o": (512, 512), "gate_up": (2752, 512), "down": (512, 1376)}


def kernel_sides(n: int, k: int, rows: int) -> dict:
    from enginehouse_pytorch.native.quant import cpu_kernel
    from enginehouse_pytorch.native.quant.qweight import KINDS, pack, quantize_int4, quantize_int8

    gen = torch.Generator().manual_seed(0)
    w, x = torch.randn(n, k, generator=gen), torch.randn(rows, k, generator=gen)
    dnn = torch.ops.mkldnn._reorder_linear_weight(w)
    q8, q4 = pack(quantize_int8(w), "panels"), pack(quantize_int4(w, 32), "panels")
    i8 = (q8.codes.transpose(1, 2).reshape(-1, k)[:n].to(torch.int16) - 128).to(torch.int8)
    s8, xb = q8.scales[:, 0].reshape(-1)[:n].to(torch.bfloat16), x.to(torch.bfloat16)
    op = cpu_kernel.ops().qlinear

    def ours(p):
        return lambda: op(x, p.codes, p.scales, p.mins, None, KINDS[p.kind], n, p.group, p.center)

    return {
        "float32 oneDNN": lambda: torch.ops.mkldnn._linear_pointwise(x, dnn, None, "none", [], ""),
        "int8": ours(q8),
        "int4 g32": ours(q4),
        "_weight_int8pack_mm bf16": lambda: torch.ops.aten._weight_int8pack_mm(xb, i8, s8),
    }


def time_kernels(rows_list: list[int], rounds: int) -> None:
    import time

    from enginehouse_pytorch.native.quant import cpu_kernel

    assert cpu_kernel.load(), "the C++ kernel could not be built"
    shapes = dict(SHAPES, head=(32000, 512))
    for rows in rows_list:
        sides = {name: kernel_sides(n, k, rows) for name, (n, k) in shapes.items()}
        best: dict = {}
        reps = max(1, 32 // rows)
        for _ in range(rounds):
            for name, fns in sides.items():
                for side, fn in fns.items():
                    start = time.perf_counter()
                    for _ in range(reps):
                        fn()
                    us = (time.perf_counter() - start) / reps * 1e6
                    best[name, side] = min(best.get((name, side), float("inf")), us)
        names = list(next(iter(sides.values())))
        print(f"\n{rows} row(s): microseconds per call (best of {rounds}), ratio to float32")
        print("| projection | " + " | ".join(names) + " |")
        print("| --- |" + " ---: |" * len(names))
        totals = dict.fromkeys(names, 0.0)
        for proj in list(shapes) + ["total"]:
            if proj == "total":
                got = totals
            else:
                got = {side: best[proj, side] for side in names}
                for side in names:
                    totals[side] += got[side]
            base = got[names[0]]
            cells = [f"{got[s]:.0f} ({base / got[s]:.2f}x)" for s in names]
            print(f"| {proj} | " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--modes", default="float32,int8,int4")
    parser.add_argument("--cases", default="single,equal,ttft")
    parser.add_argument("--model", default="llama-56m")
    parser.add_argument("--kernels", action="store_true", help="the projections alone")
    parser.add_argument("--rows", default="1,32", help="--kernels: rows per call")
    args = parser.parse_args()
    if args.kernels:
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
        print(f"load average {open('/proc/loadavg').read().split()[:3]}")
        time_kernels([int(r) for r in args.rows.split(",")], max(args.rounds, 5))
        print(f"load average {open('/proc/loadavg').read().split()[:3]}")
        return
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
