"""Image prompts through `pipeline()` against transformers' own batched `generate`.

    python benchmarks/vision.py [--requests 16] [--new-tokens 32] [--repeat 2]

Builds (once, in ./bench-models/llava-bench) a random-weight LLaVA-1.5-style model: the 56M
Llama text shape of the other benchmarks (vocab 32000) and a CLIP tower of 6 layers, width 384,
224-pixel images in 16-pixel patches (196 image tokens per image). Each side runs in its own
process, float32 on the CPU, greedy with exactly `--new-tokens` tokens per request:
- batch: `--requests` prompts, each its own image and question, at once (transformers: one
  left-padded `generate` call over the batch);
- single: one prompt, `--single-tokens` tokens.
Prints a Markdown table for benchmarks/RESULTS.md and the raw JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from enginehouse.testing import LLAMA_56M, build_vlm

VISION = dict(
    hidden_size=384,
    intermediate_size=1536,
    num_hidden_layers=6,
    num_attention_heads=6,
    image_size=224,
    patch_size=16,
    projection_dim=384,
)
QUESTIONS = ["describe the picture", "what is in this image?", "count the colours", "a title?"]


def build() -> Path:
    folder = Path("bench-models") / "llava-bench"
    if not (folder / "config.json").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        build_vlm(folder, "llava", text_shape=LLAMA_56M, vision_shape=VISION)
    return folder


def images(n: int) -> list:
    from PIL import Image

    rng = np.random.RandomState(0)
    sizes = [(320, 240), (240, 320), (256, 256), (400, 300)]
    return [
        Image.fromarray(rng.randint(0, 256, (h, w, 3), dtype=np.uint8))
        for w, h in (sizes[i % 4] for i in range(n))
    ]


def best(fn, repeat: int) -> float:
    fn()  # warm-up: first calls pay for allocations and kernel builds
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def side_engine(folder: Path, n: int, tokens: int, single: int, repeat: int) -> dict:
    from enginehouse import GenerationConfig, pipeline

    pipe = pipeline(str(folder), progress=False)
    prompts = [(QUESTIONS[i % 4], image) for i, image in enumerate(images(n))]
    gen = GenerationConfig(max_new_tokens=tokens, min_new_tokens=tokens)
    one = GenerationConfig(max_new_tokens=single, min_new_tokens=single)
    return {
        "batch": best(lambda: pipe(prompts, gen), repeat),
        "single": best(lambda: pipe(prompts[0], one), repeat),
    }


def side_hf(folder: Path, n: int, tokens: int, single: int, repeat: int) -> dict:
    import transformers as tf

    model = tf.AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()
    processor = tf.AutoProcessor.from_pretrained(folder)
    processor.tokenizer.padding_side = "left"
    texts = [
        processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}],
            add_generation_prompt=True,
        )
        for q in (QUESTIONS[i % 4] for i in range(n))
    ]
    pictures = images(n)

    def run(count: int, new: int) -> None:
        inputs = processor(
            text=texts[:count],
            images=pictures[:count],
            padding=True,
            add_special_tokens=False,
            return_tensors="pt",
        )
        with torch.inference_mode():
            model.generate(**inputs, max_new_tokens=new, min_new_tokens=new, do_sample=False)

    return {
        "batch": best(lambda: run(n, tokens), repeat),
        "single": best(lambda: run(1, single), repeat),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--single-tokens", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--side", choices=["engine", "hf"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    folder = build()
    sizes = (args.requests, args.new_tokens, args.single_tokens, args.repeat)
    if args.side:  # one side, in this process: print its times
        run = side_engine if args.side == "engine" else side_hf
        print(json.dumps(run(folder, *sizes)))
        return
    times = {}
    for side in ("hf", "engine"):
        cmd = [sys.executable, __file__, "--side", side, "--requests", str(args.requests)]
        cmd += ["--new-tokens", str(args.new_tokens), "--single-tokens", str(args.single_tokens)]
        cmd += ["--repeat", str(args.repeat)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        times[side] = json.loads(out.strip().splitlines()[-1])
    tokens = {"batch": args.requests * args.new_tokens, "single": args.single_tokens}
    print(f"torch {torch.__version__}, {platform.machine()}, float32, CPU")
    print("| case | side | tok/s | seconds | vs `generate` |")
    print("| --- | --- | ---: | ---: | ---: |")
    for case in ("batch", "single"):
        for side, name in (("hf", "transformers generate"), ("engine", "enginehouse pytorch")):
            t = times[side][case]
            ratio = times["hf"][case] / t
            print(f"| {case} | {name} | {tokens[case] / t:.1f} | {t:.3f} | {ratio:.2f}x |")
    print(json.dumps({"args": vars(args), "times": times}))


if __name__ == "__main__":
    main()
