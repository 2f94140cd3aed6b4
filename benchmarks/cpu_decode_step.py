"""One CPU decode step of the native backend, three ways, interleaved in one process.

    python benchmarks/cpu_decode_step.py [--rows 1] [--rounds 12] [--threads N]
                                         [--model llama-56m | qwen2-sliding-56m | gemma3-56m]
    (pin it for a steadier number: taskset -c 0 python benchmarks/cpu_decode_step.py --threads 1)

On the 56M Llama of `native_backend.py` (built under ./bench-models), or the same shape with
two KV groups: `qwen2-sliding-56m` (a Qwen2 whose layers from the fourth on slide over 64
tokens) or `gemma3-56m` (Gemma 3: five local layers of 64 tokens to one global, q/k and
sandwich norms, GELU, its own rope per kind); before the one-call step took per-group tables
and Gemma's layers, such models ran `per-op` only. A prompt of 128 tokens is
prefilled, then the same decode step (position 128, `--rows` sequences) runs through the
runner's `execute` again and again: `ids-to-logits` (`cpu_step.DecodeRunner`, one C++ call),
`layers-in-one-call` (`DecodeStep`: the step's tensors built in Python, the layers in one call,
the head on its own) and `per-op` (every fused op a call of its own). The variants alternate,
20 steps each per round; each prints its best, 25th percentile and median step time, and the
best CPU time of the process for a step. The engine around the runner (scheduler, sampler,
detokenizer, threads) is not in these numbers.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from native_backend import build as build_model  # noqa: E402


def _qwen2(shape: dict):
    import transformers

    return transformers.Qwen2Config(
        **shape, use_sliding_window=True, sliding_window=64, max_window_layers=4
    )


def _gemma3(shape: dict):
    import transformers

    five_to_one = ["sliding_attention"] * 5 + ["full_attention"]
    return transformers.Gemma3TextConfig(
        **shape,
        head_dim=64,
        sliding_window=64,
        query_pre_attn_scalar=64,
        layer_types=(five_to_one * 2)[: shape["num_hidden_layers"]],
    )


SHAPES = {"qwen2-sliding-56m": _qwen2, "gemma3-56m": _gemma3}


def grouped(name: str) -> Path:
    """The 56M Llama's shape as a model with two KV groups (random weights)."""
    import transformers

    from enginehouse.testing import LLAMA_56M, build_tokenizer

    folder = Path("bench-models") / name
    if not (folder / "config.json").is_file():
        build_tokenizer(folder, LLAMA_56M["vocab_size"])
        torch.manual_seed(0)
        config = SHAPES[name](dict(LLAMA_56M))
        transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    parser.add_argument("--model", default="llama-56m", choices=["llama-56m", *SHAPES])
    args = parser.parse_args()

    from enginehouse import ScheduledBatch, SeqChunk, pipeline

    config = {"enable_prefix_caching": False}
    path = build_model("llama-56m") if args.model == "llama-56m" else grouped(args.model)
    pipe = pipeline(str(path), backend="pytorch", engine_config=config)
    print(f"{args.model}: KV groups {[g.describe() for g in pipe.runner.kv_spec.groups]}")
    if args.threads:
        torch.set_num_threads(args.threads)
    runner = pipe.runner
    fast, step, bs = runner.decode, runner.model.step, runner.kv_spec.block_size
    tables = [tuple(range(10 * i, 10 * i + 10)) for i in range(args.rows)]
    for i, table in enumerate(tables):
        prompt = tuple(range(100 + i, 228 + i))
        runner.execute(ScheduledBatch((SeqChunk(i, prompt, 0, table, (127,)),), bs))
    chunks = tuple(SeqChunk(i, (77,), 128, t, (0,)) for i, t in enumerate(tables))
    batch = ScheduledBatch(chunks, bs)
    variants = {
        "ids-to-logits": (fast, step),
        "layers-in-one-call": (None, step),
        "per-op": (None, None),
    }
    wall: dict[str, list[float]] = {name: [] for name in variants}
    cpu: dict[str, list[float]] = {name: [] for name in variants}
    with torch.inference_mode():
        for _ in range(args.rounds):
            for name, (runner.decode, runner.model.step) in variants.items():
                for _ in range(20):
                    t, c = time.perf_counter(), time.process_time()
                    runner.execute(batch)
                    wall[name].append(time.perf_counter() - t)
                    cpu[name].append(time.process_time() - c)
    runner.decode, runner.model.step = fast, step
    pipe.close()
    load = Path("/proc/loadavg").read_text().split()[:3]
    print(f"{args.rows} rows, {torch.get_num_threads()} threads, loadavg {' '.join(load)}")
    for name in variants:
        w = sorted(wall[name])
        print(
            f"{name:<20} step: best {w[0] * 1e3:.3f} ms, p25 {w[len(w) // 4] * 1e3:.3f}, "
            f"median {w[len(w) // 2] * 1e3:.3f}; best CPU time {min(cpu[name]) * 1e3:.3f} ms"
        )


if __name__ == "__main__":
    main()
