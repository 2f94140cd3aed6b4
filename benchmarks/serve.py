"""The OpenAI-compatible server under N concurrent streaming clients.

    python benchmarks/serve.py [--clients 1 8 32] [--requests-per-client 4]
                               [--prompt-tokens 64] [--max-tokens 128] [--model PATH] [--quick]

Starts `enginehouse serve` in its own process (on a free port of 127.0.0.1) for a model folder,
by default a random-weight model of the 56M Llama shape built once in ./bench-models (the one
benchmarks/native_backend.py uses). Then, for each N in `--clients`, N clients of the
official `openai` package (async) each send `--requests-per-client` streaming completions one
after another: a prompt of `--prompt-tokens` random token ids (distinct per request, so no
prefix is shared), exactly `--max-tokens` generated tokens (`ignore_eos`), greedy.

Reported per N, measured at the client:
- TTFT: from sending the request to the first streamed token, p50 and p99;
- TPOT: per request, (last token's arrival - first token's arrival) / (tokens - 1), p50 and p99;
- output tok/s: all generated tokens (from `usage`) / wall time of the whole level.

Client and server share the machine's cores; on a small machine the client's own work (HTTP,
JSON) is part of what is measured.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import openai

from enginehouse.testing import LLAMA_56M as SHAPE
from enginehouse.testing import build_tokenizer


def build(folder: Path) -> Path:
    """The 56M Llama shape with random weights (as benchmarks/native_backend.py builds it)."""
    if not (folder / "config.json").is_file():
        import torch
        from transformers import AutoModelForCausalLM, LlamaConfig

        build_tokenizer(folder, SHAPE["vocab_size"])
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(LlamaConfig(**SHAPE)).save_pretrained(folder)
    return folder


class Server:
    """`enginehouse serve` in a process of its own; `url` read from uvicorn's log."""

    def __init__(self, model: Path, max_batch_size: int) -> None:
        command = [sys.executable, "-m", "enginehouse", "serve", str(model), "--port", "0"]
        command += ["--max-batch-size", str(max_batch_size), "--served-model-name", "bench"]
        self.process = subprocess.Popen(
            command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True
        )
        self.url = ""
        started = threading.Event()

        def read() -> None:  # keep draining the log so the server never blocks on it
            for line in self.process.stderr:
                if found := re.search(r"running on (http://\S+:\d+)", line):
                    self.url = found.group(1)
                    started.set()
                elif "Error" in line or "error:" in line:
                    print(line, end="", file=sys.stderr)

        threading.Thread(target=read, daemon=True).start()
        if not started.wait(timeout=300):
            self.process.kill()
            raise SystemExit("the server did not start")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=60)


@dataclass
class Sample:
    ttft: float
    tpot: float | None
    tokens: int


async def one_request(client: openai.AsyncOpenAI, prompt: list[int], max_tokens: int) -> Sample:
    sent = time.perf_counter()
    stream = await client.completions.create(
        model="bench",
        prompt=prompt,
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    first = last = None
    tokens = 0
    async for chunk in stream:
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
        if chunk.choices:  # the server sends a chunk per step that made a token
            last = time.perf_counter()
            first = first or last
    assert first is not None and last is not None, "no token came back"
    tpot = (last - first) / (tokens - 1) if tokens > 1 else None
    return Sample(first - sent, tpot, tokens)


async def run_level(
    url: str, clients: int, per_client: int, prompts: list[list[int]], max_tokens: int
) -> tuple[list[Sample], float]:
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=600)
    queue = iter(prompts)

    async def worker() -> list[Sample]:
        return [await one_request(client, next(queue), max_tokens) for _ in range(per_client)]

    start = time.perf_counter()
    results = await asyncio.gather(*(worker() for _ in range(clients)))
    wall = time.perf_counter() - start
    await client.close()
    return [s for r in results for s in r], wall


def percentile(values: list[float], p: int) -> float:
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[p - 1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests-per-client", type=int, default=4)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--model", type=Path, help="a model folder (default: the 56M Llama)")
    parser.add_argument("--quick", action="store_true", help="1 and 4 clients, short answers")
    args = parser.parse_args()
    if args.quick:
        args.clients, args.requests_per_client, args.max_tokens = [1, 4], 2, 32
    model = args.model or build(Path("bench-models/llama-56m"))
    rng = random.Random(0)
    vocab = SHAPE["vocab_size"] if args.model is None else 1000

    def prompt() -> list[int]:
        return [rng.randrange(10, vocab) for _ in range(args.prompt_tokens)]

    server = Server(model, max(args.clients))
    try:
        info = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none").models.list().data[0]
        import torch

        print(
            f"model {model}, backend {info.backend}, torch {torch.__version__}, "
            f"{os.cpu_count()} cores; prompt {args.prompt_tokens} tokens, "
            f"{args.max_tokens} new, {args.requests_per_client} requests per client"
        )
        asyncio.run(run_level(server.url, 1, 1, [prompt()], 8))  # warm-up
        header = f"{'clients':>7} {'requests':>8} {'TTFT p50':>9} {'TTFT p99':>9}"
        header += f" {'TPOT p50':>9} {'TPOT p99':>9} {'out tok/s':>10}"
        print(header)
        for n in args.clients:
            prompts = [prompt() for _ in range(n * args.requests_per_client)]
            samples, wall = asyncio.run(
                run_level(server.url, n, args.requests_per_client, prompts, args.max_tokens)
            )
            ttft = [s.ttft for s in samples]
            tpot = [s.tpot for s in samples if s.tpot is not None]
            tokens = sum(s.tokens for s in samples)
            print(
                f"{n:>7} {len(samples):>8} {percentile(ttft, 50) * 1e3:>7.0f}ms "
                f"{percentile(ttft, 99) * 1e3:>7.0f}ms {percentile(tpot, 50) * 1e3:>7.1f}ms "
                f"{percentile(tpot, 99) * 1e3:>7.1f}ms {tokens / wall:>10.1f}",
                flush=True,
            )
    finally:
        server.stop()


if __name__ == "__main__":
    main()
