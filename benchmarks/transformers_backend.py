"""enginehouse's `transformers` backend against transformers' own `generate`, in one run.

    python benchmarks/transformers_backend.py [--quick] [--repeat N]

Builds (once, in ./bench-models) a random-weight model of the 56M Llama shape (hidden 512,
intermediate 1376, 8 layers, 8 heads, 4 KV heads, vocab 32000) with a real tokenizer, then
times greedy generation with fixed output lengths, float32, best of `--repeat` runs:

- equal:  32 prompts of 64 tokens, 128 new tokens each (one padded `generate` call is
          transformers' best case);
- mixed:  48 prompts of 8-256 tokens, 16-128 new tokens each. transformers gets one padded
          batch generating the longest request's length; only requested tokens count;
- single: one prompt of 64 tokens, 128 new tokens (decode speed at batch 1);
- start-up: `pipeline()` to the first token, against `from_pretrained` + one token, each in a
            fresh process after `import torch, transformers` (best of `--repeat`).

Each side runs in its own process (see `in_subprocess`).

Numbers are tokens generated per second of wall time and their ratio (enginehouse / HF).
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from enginehouse import GenerationConfig, pipeline
from enginehouse.testing import LLAMA_56M as SHAPE
from enginehouse.testing import build_tokenizer


def build(folder: Path) -> Path:
    if not (folder / "config.json").is_file():
        build_tokenizer(folder, SHAPE["vocab_size"])
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(LlamaConfig(**SHAPE)).save_pretrained(folder)
    return folder


def best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


STARTUP = {
    "HF": "from transformers import AutoModelForCausalLM as M\n"
    "m = M.from_pretrained(PATH); m.generate(torch.tensor([IDS]), max_new_tokens=1)",
    "enginehouse": "from enginehouse import pipeline, GenerationConfig as G\n"
    "p = pipeline(PATH, progress=False); p({'token_ids': IDS}, G(max_new_tokens=1)); p.close()",
}


def startup(kind: str, folder: Path, repeat: int) -> float:
    """Seconds from the call to the first token, in a fresh process."""
    code = (
        "import time, torch, transformers\n"
        f"PATH, IDS = {str(folder)!r}, list(range(10, 74))\n"
        "start = time.perf_counter()\n"
        f"{STARTUP[kind]}\n"
        "print(time.perf_counter() - start)"
    )
    runs = [
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        for _ in range(repeat)
    ]
    return min(float(r.stdout.strip().splitlines()[-1]) for r in runs)


def hf_batch(model, prompts: list[list[int]], new: int) -> None:
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])  # left padding
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    model.generate(
        ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False
    )


def eh_batch(pipe, prompts: list[list[int]], news: list[int]) -> None:
    configs = [GenerationConfig(max_new_tokens=n, min_new_tokens=n) for n in news]
    pipe([{"token_ids": p} for p in prompts], configs)


def cases(quick: bool) -> dict[str, tuple[list[list[int]], list[int]]]:
    """The prompt sets, the same in every process (a fixed seed)."""
    rng, scale = random.Random(0), 4 if quick else 1

    def tokens(n: int) -> list[int]:
        return [rng.randrange(10, SHAPE["vocab_size"]) for _ in range(n)]

    equal = [tokens(64) for _ in range(32 // scale)]
    mixed = [tokens(rng.randint(8, 256)) for _ in range(48 // scale)]
    mixed_new = [rng.randint(16, 128) for _ in mixed]
    return {
        "equal 32x64+128": (equal, [128 // scale] * len(equal)),
        "mixed 48x(8-256)+(16-128)": (mixed, mixed_new),
        "single 1x64+128": ([tokens(64)], [128 // scale]),
    }


def run_side(side: str, folder: Path, quick: bool, repeat: int) -> dict[str, float]:
    """Seconds per case for one side, in this process."""
    if side == "HF":
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        run = lambda p, n: hf_batch(model, p, max(n))  # noqa: E731
    else:
        pipe = pipeline(str(folder), progress=False)
        run = lambda p, n: eh_batch(pipe, p, n)  # noqa: E731
    with torch.inference_mode():
        return {
            name: best(lambda p=p, n=n: run(p, n), repeat) for name, (p, n) in cases(quick).items()
        }


def in_subprocess(side: str, args: argparse.Namespace) -> dict[str, float]:
    # Each side gets a process of its own: torch work on two threads of one process makes
    # two OpenMP thread teams fight over the cores, which would slow whichever runs second.
    command = [sys.executable, __file__, "--side", side, "--repeat", str(args.repeat)]
    command += ["--quick"] if args.quick else []
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="smaller sets, one run each")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--side", choices=["HF", "enginehouse"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    folder = build(Path("bench-models/llama-56m"))
    if args.quick:
        args.repeat = 1
    if args.side:
        print(json.dumps(run_side(args.side, folder, args.quick, args.repeat)))
        return
    hf_start, eh_start = (startup(k, folder, args.repeat) for k in ("HF", "enginehouse"))
    print(f"threads {torch.get_num_threads()}, torch {torch.__version__}")
    print(f"start-up to first token: HF {hf_start:.2f} s, enginehouse {eh_start:.2f} s")
    hf, eh = in_subprocess("HF", args), in_subprocess("enginehouse", args)
    print(f"{'case':<28}{'HF tok/s':>10}{'enginehouse tok/s':>20}{'ratio':>8}")
    for name, (_, news) in cases(args.quick).items():
        useful = sum(news)
        print(
            f"{name:<28}{useful / hf[name]:>10.1f}{useful / eh[name]:>20.1f}"
            f"{hf[name] / eh[name]:>8.2f}"
        )


if __name__ == "__main__":
    main()
