"""The `onnxruntime` backend against the native `pytorch` one, on this machine's CPU.

    python benchmarks/onnxruntime_backend.py [--quick] [--repeat N] [--models llama-56m]

Uses the random-weight models of benchmarks/native_backend.py (built once in ./bench-models)
and `enginehouse.bench.measure`: every side in its own process, the same prompt sets (equal,
mixed, single stream, time to first token, start-up). Ratios are onnxruntime's speed over
pytorch's measured in the same run (> 1: onnxruntime is faster). The ONNX export is made once
before measuring, into ./bench-models/.cache, so start-up measures a cached graph; the export's
own time is printed separately.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import onnxruntime
import torch
import transformers

from enginehouse.bench import measure, report

CACHE = Path("bench-models/.cache").resolve()
os.environ.setdefault("ENGINEHOUSE_CACHE", str(CACHE))  # inherited by every measured process

from native_backend import MODELS, build  # noqa: E402  (beside this file)


def export_once(folder: Path) -> float:
    from enginehouse.spec import read_model_spec
    from enginehouse_tensorrt.cache import ensure_onnx, onnx_dir

    spec = read_model_spec(folder)
    if (onnx_dir(spec, "float32") / "graph.json").exists():
        return 0.0
    start = time.perf_counter()
    ensure_onnx(spec, "float32")
    return time.perf_counter() - start


def markdown(rows: list[dict], model: str) -> str:
    by_case: dict[str, dict[str, dict]] = {}
    for r in rows:
        by_case.setdefault(r["case"], {})[r["side"]] = r
    lines = [
        f"| {model}: case | pytorch | onnxruntime | onnxruntime / pytorch |",
        "| --- | ---: | ---: | ---: |",
    ]
    for case, sides in by_case.items():
        pt, ort = sides["pytorch"], sides["onnxruntime"]
        if "tokens_per_s" in pt:
            cells = [f"{pt['tokens_per_s']:.1f} tok/s", f"{ort['tokens_per_s']:.1f} tok/s"]
        else:
            cells = [f"{pt['seconds']:.3f} s", f"{ort['seconds']:.3f} s"]
        ratio = pt["seconds"] / ort["seconds"]  # speed ratio: > 1 when onnxruntime is faster
        lines.append(f"| {case} | {cells[0]} | {cells[1]} | {ratio:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="4x smaller sets, one run each")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--models", default="llama-56m")
    args = parser.parse_args()
    load = os.getloadavg()
    print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, load average "
        f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f} at start; torch {torch.__version__}, "
        f"onnxruntime {onnxruntime.__version__}, transformers {transformers.__version__}"
    )
    results = {}
    for name in args.models.split(","):
        if name not in MODELS:
            raise SystemExit(f"unknown model {name!r}; have {', '.join(MODELS)}")
        folder = build(name)
        print(f"{name}: ONNX export took {export_once(folder):.1f} s (0.0: already cached)")
        result = measure(
            folder, ["pytorch", "onnxruntime"], quick=args.quick, repeat=args.repeat, baseline=False
        )
        results[name] = result
        print(f"\n{markdown(report(result), name)}", flush=True)
    load = os.getloadavg()
    print(f"\nload average at the end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
