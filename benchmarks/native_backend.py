"""The native `pytorch` backend (and the `transformers` one) against transformers' `generate`.

    python benchmarks/native_backend.py [--quick] [--repeat N] [--models llama-56m,qwen2.5-0.5b]

Builds (once, in ./bench-models) random-weight models with real tokenizers:
- llama-56m:    hidden 512, intermediate 1376, 8 layers, 8 heads, 4 KV heads, vocab 32000;
- qwen2.5-0.5b: Qwen2.5-0.5B's shape (hidden 896, 24 layers, 14 heads, 2 KV heads, vocab
                151936, tied embeddings), measured with the 4x smaller `--quick` sets unless
                `--full-qwen` (its `generate` baseline alone takes minutes at full size here);
then runs `enginehouse.bench.measure` (see `enginehouse bench --help` for the cases), every side
in its own process, and prints a Markdown table for benchmarks/RESULTS.md plus the raw JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch
import transformers

from enginehouse.bench import measure, report
from enginehouse.testing import LLAMA_56M, QWEN25_05B, build_tokenizer

MODELS = {
    "llama-56m": (transformers.LlamaConfig, LLAMA_56M),
    "qwen2.5-0.5b": (transformers.Qwen2Config, QWEN25_05B),
}


def build(name: str) -> Path:
    folder = Path("bench-models") / name
    if not (folder / "config.json").is_file():
        config_class, shape = MODELS[name]
        build_tokenizer(folder, shape["vocab_size"])
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(config_class(**shape))
        model.save_pretrained(folder)
    return folder


def markdown(rows: list[dict], model: str) -> str:
    lines = [
        f"| {model}: case | side | tok/s | seconds | vs `generate` |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    for r in rows:
        tps = f"{r['tokens_per_s']:.1f}" if "tokens_per_s" in r else "-"
        ratio = f"{r['ratio']:.2f}x" if "ratio" in r else "-"
        lines.append(f"| {r['case']} | {r['side']} | {tps} | {r['seconds']:.3f} | {ratio} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="4x smaller sets, one run each")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--backends", default="pytorch,transformers")
    parser.add_argument("--full-qwen", action="store_true", help="full-size sets for Qwen too")
    args = parser.parse_args()
    print(
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}, transformers {transformers.__version__}"
    )
    results = {}
    for name in args.models.split(","):
        quick = args.quick or (name.startswith("qwen") and not args.full_qwen)
        result = measure(build(name), args.backends.split(","), quick=quick, repeat=args.repeat)
        results[name] = result
        print(f"\n{'(quick sets) ' if quick else ''}\n{markdown(report(result), name)}", flush=True)
    print("\n" + json.dumps(results))


if __name__ == "__main__":
    main()
