"""enginehouse's `pipeline` against llama.cpp on the same weights: CPU decode at batch 1 and 32.

    python benchmarks/llama_cpp.py [--rounds 3] [--threads 2] [--batches 1,32]
                                   [--side dtype=bfloat16] [--side quantization=int8 ...]
                                   [--llama-types f32,f16,q8_0] [--no-llama] [--agreement]

What it does (all cached under ./bench-models):
- builds the random-weight 56M Llama of `native_backend.py` (hidden 512, 8 layers, vocab 32000);
- builds llama.cpp's `llama-batched-bench` from the `llama-cpp-python` source package (its
  vendored llama.cpp; `pip download --no-binary`, then cmake, `-DGGML_NATIVE=ON`);
- writes the same weights as GGUF with the `gguf` package, in f32, f16 and q8_0 (q and k rows
  permuted to llama.cpp's rope layout, as its own converter does);
- runs every side in a fresh process, the sides alternating, `--rounds` times, and keeps each
  side's best and median: 64-token random prompts, 128 new tokens each, at every batch size.

Throughput is new tokens over the time from the prompts to the last token (prefill included),
on both sides: llama.cpp's `T_PP + T_TG` for `-npp 64 -ntg 128 -npl B` (a cache per sequence),
enginehouse's `pipeline` call (the `single` and `equal` cases of `enginehouse bench`, greedy,
sampling and detokenizing included). Each `--side KEY=VALUE[,KEY=VALUE]` is one more
enginehouse side with those `EngineConfig` settings (values parsed as JSON where they can be).
Needs: `pip install -e '.[bench]'` (the `gguf` package), cmake, a C++ compiler.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from native_backend import build as build_model  # noqa: E402

CACHE = Path("bench-models")
PROMPT, NEW = 64, 128
LLAMA_TYPES = ("f32", "f16", "q8_0")


def run(cmd: list[str], **kw) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])} ... failed:\n{done.stderr[-3000:]}")
    return done.stdout


def build_llama_cpp() -> Path:
    """llama-batched-bench, built once from llama-cpp-python's source package."""
    root = CACHE / "llama.cpp"
    binary = root / "build" / "bin" / "llama-batched-bench"
    if binary.is_file():
        return binary
    root.mkdir(parents=True, exist_ok=True)
    if not list(root.glob("llama_cpp_python-*.tar.gz")):
        print("downloading the llama-cpp-python source package ...", flush=True)
        pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"]
        run([*pip, "llama-cpp-python", "-d", str(root)])
    sdist = sorted(root.glob("llama_cpp_python-*.tar.gz"))[-1]
    source = root / sdist.name.removesuffix(".tar.gz")
    if not source.is_dir():
        with tarfile.open(sdist) as tar:
            tar.extractall(root, filter="data")
    print(f"building llama.cpp from {sdist.name} (several minutes on 2 cores) ...", flush=True)
    build = root / "build"
    options = ["-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DBUILD_SHARED_LIBS=OFF"]
    options += [f"-D{o}=OFF" for o in ("LLAMA_CURL", "LLAMA_BUILD_TESTS", "LLAMA_BUILD_SERVER")]
    run(["cmake", "-S", str(source / "vendor" / "llama.cpp"), "-B", str(build), *options])
    jobs = str(os.cpu_count() or 2)
    run(["cmake", "--build", str(build), "--target", "llama-batched-bench", "-j", jobs])
    return binary


def _rope_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """transformers keeps each head's rotary halves apart (rotate-half); llama.cpp's llama
    rope rotates adjacent pairs, so each head's rows are interleaved from the two halves."""
    rows = w.shape[0]
    return w.reshape(heads, 2, rows // heads // 2, -1).swapaxes(1, 2).reshape(w.shape)


def write_gguf(model: Path, kind: str) -> Path:
    """The checkpoint as a llama GGUF in `kind` (f32, f16, q8_0), with a placeholder vocab."""
    import gguf
    from safetensors.numpy import load_file

    out = model.parent / f"{model.name}-gguf" / f"model-{kind}.gguf"  # not beside the safetensors
    if out.is_file():
        return out
    out.parent.mkdir(exist_ok=True)
    config = json.loads((model / "config.json").read_text())
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    hidden, vocab = config["hidden_size"], config["vocab_size"]
    writer = gguf.GGUFWriter(str(out), "llama")
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(hidden)
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(hidden // heads)
    writer.add_rope_freq_base(float(config.get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    ftype = {"f32": 0, "f16": 1, "q8_0": 7}[kind]  # LLAMA_FTYPE_ALL_F32, MOSTLY_F16, MOSTLY_Q8_0
    writer.add_file_type(ftype)
    # llama-batched-bench feeds random token ids: the vocab only needs the right size.
    writer.add_tokenizer_model("llama")
    writer.add_token_list(["<unk>", "<s>", "</s>"] + [f"t{i}" for i in range(3, vocab)])
    writer.add_token_scores([0.0] * vocab)
    writer.add_token_types([2, 3, 3] + [1] * (vocab - 3))
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)

    names = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    parts = {
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }
    tensors = load_file(model / "model.safetensors")
    for name, value in sorted(tensors.items()):
        w = value.astype(np.float32)
        if name.startswith("model.layers."):
            layer, rest = name.removeprefix("model.layers.").split(".", 1)
            part = rest.removesuffix(".weight")
            if part == "self_attn.q_proj":
                w = _rope_permute(w, heads)
            elif part == "self_attn.k_proj":
                w = _rope_permute(w, kv_heads)
            target = f"blk.{layer}.{parts[part]}.weight"
        else:
            target = names[name]
        if w.ndim == 1 or kind == "f32":  # norms stay float32, as llama.cpp's converter keeps them
            writer.add_tensor(target, w)
        elif kind == "f16":
            writer.add_tensor(target, w.astype(np.float16))
        else:
            q8 = gguf.GGMLQuantizationType.Q8_0
            writer.add_tensor(target, gguf.quants.quantize(w, q8), raw_dtype=q8)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def llama_side(binary: Path, gguf_file: Path, batches: list[int], threads: int) -> dict:
    """tokens/s per batch size from one llama-batched-bench process."""
    ctx = max(batches) * (PROMPT + NEW)
    args = [str(binary), "-m", str(gguf_file), "-c", str(ctx), "-b", "2048", "-ub", "512"]
    args += ["-npp", str(PROMPT), "-ntg", str(NEW), "-npl", ",".join(map(str, batches))]
    args += ["-t", str(threads), "-tb", str(threads), "--output-format", "jsonl"]
    out = run(args)
    result = {}
    for line in out.splitlines():
        if line.startswith("{"):
            r = json.loads(line)
            result[r["pl"]] = r["pl"] * r["tg"] / (r["t_pp"] + r["t_tg"])
    return result


def enginehouse_side(model: Path, config: dict, batches: list[int], threads: int) -> dict:
    """tokens/s per batch size from one process running `enginehouse.bench`'s cases."""
    cases = {1: "single", 32: "equal"}
    unknown = [b for b in batches if b not in cases]
    if unknown:
        raise SystemExit(f"enginehouse sides run batch 1 and 32 only, not {unknown}")
    names = [cases[b] for b in batches]
    config = {"enable_prefix_caching": False, **config}
    # The engine gives torch every core the process may use: fewer threads means fewer cores.
    pin = ["taskset", "-c", f"0-{threads - 1}"] if threads < (os.cpu_count() or 1) else []
    cmd = [*pin, sys.executable, "-m", "enginehouse.bench", str(model), "pytorch"]
    out = run([*cmd, json.dumps(names), json.dumps(config), "1", "full"])
    seconds = json.loads(out.strip().splitlines()[-1])["seconds"]
    return {b: b * NEW / seconds[cases[b]] for b in batches}


def agreement(model: Path, config: dict) -> str:
    """How many of the equal case's greedy tokens (32 prompts, 128 new) a side shares with
    float32: whole answers equal, and tokens before the first difference."""
    from enginehouse import GenerationConfig, pipeline
    from enginehouse.bench import make_cases

    case = make_cases(32000)["equal"]
    answers = []
    for settings in ({}, config):
        pipe = pipeline(str(model), backend="pytorch", engine_config=settings, progress=False)
        out = pipe([{"token_ids": p} for p in case.prompts], GenerationConfig(max_new_tokens=NEW))
        answers.append([r.token_ids for r in out])
        pipe.close()
    same = sum(a == b for a, b in zip(*answers))
    prefix = 0
    for a, b in zip(*answers):
        prefix += next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    total = sum(len(a) for a in answers[0])
    return (
        f"{same}/{len(case.prompts)} answers equal to float32's, "
        f"{prefix}/{total} tokens before the first difference"
    )


def parse_side(text: str) -> dict:
    """'dtype=bfloat16,max_batch_size=32' -> {'dtype': 'bfloat16', 'max_batch_size': 32}."""
    config = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--side wants KEY=VALUE[,KEY=VALUE], got {text!r}")
        try:
            config[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            config[key.strip()] = value.strip()
    return config


def cpu_line() -> str:
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.partition(":")[2].strip()
                break
        flags = Path("/proc/cpuinfo").read_text()
        isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
        extra = [f for f in ("avx512_bf16", "avx512_vnni", "amx_tile") if f in flags]
        return f"{name}, {isa} ({', '.join(extra) or 'no bf16/VNNI/AMX'}), {os.cpu_count()} CPUs"
    except OSError:
        return name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--side", action="append", default=[], help="extra EngineConfig side")
    parser.add_argument("--llama-types", default=",".join(LLAMA_TYPES))
    parser.add_argument("--no-llama", action="store_true", help="enginehouse sides only")
    parser.add_argument(
        "--agreement", action="store_true", help="greedy tokens of each --side vs float32"
    )
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    model = build_model("llama-56m")

    sides = {"enginehouse float32": lambda: enginehouse_side(model, {}, batches, args.threads)}
    for text in args.side:
        config = parse_side(text)
        sides[f"enginehouse {text}"] = lambda c=config: enginehouse_side(
            model, c, batches, args.threads
        )
    if not args.no_llama:
        binary = build_llama_cpp()
        for kind in args.llama_types.split(","):
            path = write_gguf(model, kind)
            sides[f"llama.cpp {kind}"] = lambda p=path: llama_side(binary, p, batches, args.threads)

    print(f"CPU: {cpu_line()}; {args.threads} threads; {args.rounds} rounds", flush=True)
    runs: dict[str, dict[int, list[float]]] = {name: {b: [] for b in batches} for name in sides}
    for round_ in range(args.rounds):
        for name, side in sides.items():
            load = os.getloadavg()[0]
            result = side()
            for b, tps in result.items():
                runs[name][b].append(tps)
            shown = ", ".join(f"batch {b}: {t:.0f}" for b, t in result.items())
            print(f"round {round_ + 1}  {name:<34} {shown} tok/s  (load {load:.2f})", flush=True)

    # Best of the rounds is each side's speed on a quiet moment; the median says whether that
    # holds up on a shared machine, where rounds of one side moved by 20-40%.
    best = {name: {b: max(v) for b, v in r.items()} for name, r in runs.items()}
    print(f"\nloadavg at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print("\n| tokens/s, best (median) | " + " | ".join(f"batch {b}" for b in batches) + " |")
    print("| --- | " + " | ".join("---:" for _ in batches) + " |")
    for name, result in runs.items():
        cells = [f"{max(v):,.0f} ({statistics.median(v):,.0f})" for v in result.values()]
        print(f"| {name} | " + " | ".join(cells) + " |")
    # Each round runs the sides back to back, so a round's ratio compares them under about the
    # same load: the median of those ratios is the steadiest comparison on a shared machine.
    for name in (n for n in runs if n.startswith("enginehouse")):
        for other in (n for n in runs if n.startswith("llama.cpp")):
            ratios = []
            for b in batches:
                paired = [x / y for x, y in zip(runs[name][b], runs[other][b])]
                ratios.append(f"batch {b}: {statistics.median(paired):.2f}x")
            print(f"{name} / {other}, median of the rounds' ratios: {', '.join(ratios)}")
    if args.agreement:
        for text in args.side:
            print(f"{text}: {agreement(model, parse_side(text))}")
    print("\n" + json.dumps(best))


if __name__ == "__main__":
    main()
