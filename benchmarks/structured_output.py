"""What structured output costs: a batch with a quarter of its requests schema-constrained
against the same batch unconstrained, in one run.

    python benchmarks/structured_output.py [--requests 32] [--new-tokens 64] [--rounds 3]
                                           [--runs 3]

Builds (once, in ./bench-models/structured-bench) the random-weight 56M Llama shape of the
other benchmarks with a real-sized tokenizer: a 32000-token byte-level BPE trained offline on
synthetic text (the mask's cost grows with the vocabulary, so the test tokenizer's 512 tokens
would flatter it). Each side runs in its own process (`--runs` timed batches after a warm-up),
the sides alternate for `--rounds` rounds, and each keeps its best wall and CPU time:
- free: `--requests` prompts of 32 random token ids, greedy, exactly `--new-tokens` tokens each;
- mixed: the same, but a quarter of the requests must answer with a list of records (nested
  objects, bounded strings and integers, enums) long enough that the grammar is still open at
  `--new-tokens`, so both sides generate the same number of tokens.
The difference in time, divided by the constrained tokens, is the cost per constrained token.
On a busy machine that difference drowns in noise, so each side also times, as it happens, the
sampler per step (every row: the free side's figure is what unconstrained rows cost) and the
grammar work (filling and applying the masks, advancing the matchers) per constrained token.
Prints a Markdown table for benchmarks/RESULTS.md and the raw JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import time
from pathlib import Path

import torch

from enginehouse.testing import LLAMA_56M

SCHEMA = {
    "type": "array",
    "minItems": 30,  # about 10 tokens a record: still open after 64 tokens
    "items": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 12},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "role": {"enum": ["admin", "user", "guest"]},
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
        },
        "required": ["name", "age", "role", "tags"],
        "additionalProperties": False,
    },
}


def build_tokenizer(folder: Path) -> None:
    """A 32000-token byte-level BPE, trained offline on synthetic words and JSON punctuation."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(0)
    pieces = [a + b for a in "bcdfghjklmnprstvwz" for b in "aeiouy"]
    pieces += list("0123456789") + ['{"', '":', ', "', '"}', "[", "]", "\n  "]

    def word() -> str:
        return "".join(rng.choice(pieces) for _ in range(rng.randint(1, 4)))

    corpus = [" ".join(word() for _ in range(rng.randint(5, 30))) for _ in range(60000)]
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=LLAMA_56M["vocab_size"],
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    fast.save_pretrained(folder)


def build() -> Path:
    folder = Path("bench-models") / "structured-bench"
    if not (folder / "config.json").is_file():
        from transformers import AutoModelForCausalLM, LlamaConfig

        folder.mkdir(parents=True, exist_ok=True)
        build_tokenizer(folder)
        torch.manual_seed(0)
        config = LlamaConfig(**LLAMA_56M, initializer_range=0.2)
        AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(folder)
    return folder


def timed(owner: object, attr: str, spent: list[float]) -> None:
    """Wrap `owner.attr` so that `spent` adds up the time spent in it and the calls."""
    fn = getattr(owner, attr)

    def wrapper(*args: object, **kwargs: object) -> object:
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            spent[0] += time.perf_counter() - start
            spent[1] += 1

    setattr(owner, attr, wrapper)


def side(folder: Path, name: str, requests: int, tokens: int, runs: int) -> dict:
    """One side's best wall and CPU time for one batch after a warm-up, in this process."""
    from enginehouse import GenerationConfig, pipeline
    from enginehouse.engine import grammar, llm_engine, sampler

    engine = {"max_batch_size": requests, "enable_prefix_caching": False}
    pipe = pipeline(str(folder), engine_config=engine, progress=False)
    rng = random.Random(0)
    prompts = [{"token_ids": [rng.randrange(3, 30000) for _ in range(32)]} for _ in range(requests)]
    free = GenerationConfig(max_new_tokens=tokens, min_new_tokens=tokens)
    fmt = {"type": "json_schema", "json_schema": {"name": "records", "schema": SCHEMA}}
    bound = GenerationConfig(max_new_tokens=tokens, response_format=fmt)
    constrained = requests // 4 if name == "mixed" else 0
    configs = [bound] * constrained + [free] * (requests - constrained)
    start = time.perf_counter()
    if constrained:  # the first compile: tokenizer tables, the UTF-8 guard, the grammar
        pipe.wait_for_grammar(bound)
    compile_s = time.perf_counter() - start
    out = pipe(prompts, configs)  # warm-up
    # The sampler as a whole (every row), the grammar work in it, the matchers' steps.
    samples, masks, accepts = [0.0, 0], [0.0, 0], [0.0, 0]
    timed(llm_engine, "sample", samples)
    timed(sampler, "apply_grammars", masks)
    timed(grammar.GrammarState, "accept", accepts)
    walls, cpus = [], []
    for _ in range(runs):
        wall, cpu = time.perf_counter(), time.process_time()
        out = pipe(prompts, configs)
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    lengths = [r.generate_token_len for r in out]
    assert all(n == tokens for n in lengths), f"a request ended early: {lengths}"
    pipe.close()
    per_token = 1e3 / runs / max(1, constrained * tokens)
    return {
        "seconds": min(walls),
        "cpu_seconds": min(cpus),
        "constrained_tokens": constrained * tokens,
        "tokens": sum(lengths),
        "compile_s": compile_s,
        "sampler_ms_per_step": samples[0] / max(1, samples[1]) * 1e3,
        "mask_ms_per_token": masks[0] * per_token,
        "accept_ms_per_token": accepts[0] * per_token,
        "sample": out[0].text[:80],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--runs", type=int, default=3, help="timed runs per process")
    parser.add_argument("--side", choices=["free", "mixed"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    folder = build()
    if args.side:
        print(json.dumps(side(folder, args.side, args.requests, args.new_tokens, args.runs)))
        return
    best: dict[str, dict] = {}
    for _ in range(args.rounds):
        for name in ("free", "mixed"):
            cmd = [sys.executable, __file__, "--side", name, "--requests", str(args.requests)]
            cmd += ["--new-tokens", str(args.new_tokens), "--runs", str(args.runs)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            result = json.loads(out.strip().splitlines()[-1])
            kept = best.setdefault(name, result)
            for key in ("seconds", "cpu_seconds", "sampler_ms_per_step"):
                kept[key] = min(kept[key], result[key])
            for key in ("mask_ms_per_token", "accept_ms_per_token"):
                kept[key] = min(kept[key], result[key])
    free, mixed = best["free"], best["mixed"]
    load = os.getloadavg()
    print(
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; "
        f"{args.requests} requests x {args.new_tokens} tokens, best of {args.rounds} "
        f"processes x {args.runs} runs per side"
    )
    print("| batch | tok/s (wall) | wall s | CPU s | sampler ms/step |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, r in (("free", free), ("mixed (1/4 constrained)", mixed)):
        print(
            f"| {name} | {r['tokens'] / r['seconds']:.1f} | {r['seconds']:.3f} | "
            f"{r['cpu_seconds']:.3f} | {r['sampler_ms_per_step']:.3f} |"
        )
    n = mixed["constrained_tokens"]
    wall_ms = (mixed["seconds"] - free["seconds"]) / n * 1e3
    cpu_ms = (mixed["cpu_seconds"] - free["cpu_seconds"]) / n * 1e3
    print(
        f"cost per constrained token: {wall_ms:.3f} ms wall, {cpu_ms:.3f} ms CPU from the "
        f"differences; timed where it happens: masks {mixed['mask_ms_per_token']:.3f} ms + "
        f"matchers {mixed['accept_ms_per_token']:.3f} ms; first compile of the schema "
        f"(with the tokenizer tables): {mixed['compile_s']:.2f} s"
    )
    print(json.dumps({"args": vars(args), "free": free, "mixed": mixed}))


if __name__ == "__main__":
    main()
