"""Speculative decoding on the CPU: tokens/s without it, with n-gram and with a draft model.

    python benchmarks/speculative.py [--rounds 3] [--tokens 64] [--k 3]

The target is the 56M Llama of `native_backend.py` (random weights, vocabulary 32000, built
under ./bench-models): at batch 1 its decode step is bound by reading its 224 MB of float32
weights. Random weights make acceptance a property of the weights, not of the method, and the
drafts show what that gives, honestly:

- `ngram` on a prompt that repeats a 24-token passage four times (prompt lookup, K = 3). This
  random target falls into repeating one token after a few steps, which prompt lookup then
  predicts every time: its acceptance is the best case (all kept), not a measure of lookup on
  real text;
- `draft-copy`: a truncated copy of the target (its embedding, its first layer, its final norm
  and head; 0.65x the target's size, since the embedding and head dominate a model this small).
  Its greedy tokens turned out to share nothing with the target's (the other 7 random layers
  decide), so it is the worst case: all the draft's cost, nothing kept;
- `draft-tenth`: an unrelated random model of a tenth of the target's size (hidden 64, 2
  layers, the same tokenizer), the size the issue asks for; a random target keeps none of its
  proposals either, so it shows what a cheap but useless draft costs.

A draft with meaningful acceptance needs trained (or distilled) weights, which this offline
machine does not have.

`--method eagle3` runs plain against an EAGLE-3 head (random weights in the on-disk format of
`LlamaForCausalLMEagle3`, built under ./bench-models) on the same target; `--method mtp` plain
against `{"method": "mtp"}` on a DeepSeek-V3 of hidden 256, 4 layers and 8 experts whose MTP
layer (`model.layers.4`) is random. Random heads share (nearly) no greedy token with the
target: their acceptance is ~0, and these sides measure what running a head costs.

`--method hybrid` runs plain against n-gram on a hybrid Qwen3.5 text model (hidden 512, 8
layers: three Gated DeltaNet layers to one full-attention layer, vocabulary 32000, random weights
with the layers' outputs scaled by 0.5 so that it falls into repeats; built under ./bench-models):
its linear-attention layers keep a state per verified position.

Every side runs in its own process (a fresh engine, the same weights, greedy, EOS masked),
the sides alternate within each round, and each side's best round counts. Batch 1 is one
request; batch 8 is eight at once. Tokens are checked identical to the plain side's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def draft_copy(target: Path) -> Path:
    """The target's embedding, first layer, norm and head as a 1-layer model."""
    from safetensors.torch import load_file, save_file

    folder = target.parent / f"{target.name}-draft-copy"
    if (folder / "config.json").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    config = json.loads((target / "config.json").read_text())
    config["num_hidden_layers"] = 1
    (folder / "config.json").write_text(json.dumps(config))
    tensors = load_file(target / "model.safetensors")
    kept = {k: v for k, v in tensors.items() if ".layers." not in k or ".layers.0." in k}
    save_file(kept, folder / "model.safetensors", metadata={"format": "pt"})
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        (folder / name).write_bytes((target / name).read_bytes())
    return folder


def draft_tenth(target: Path) -> Path:
    import torch
    import transformers
    from transformers import AutoTokenizer

    folder = target.parent / f"{target.name}-draft-tenth"
    if (folder / "config.json").is_file():
        return folder
    config = json.loads((target / "config.json").read_text())
    shape = {k: config[k] for k in ("vocab_size", "bos_token_id", "eos_token_id")}
    small = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=172,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=2048,
        **shape,
    )
    torch.manual_seed(1)
    transformers.AutoModelForCausalLM.from_config(small).save_pretrained(folder)
    AutoTokenizer.from_pretrained(target).save_pretrained(folder)
    return folder


def eagle3_head(target: Path) -> Path:
    """A random EAGLE-3 head for `target` (its hidden size, heads, vocabulary), in the format
    of EAGLE-3's checkpoints; its draft vocabulary is the whole target's (d2t all zeros)."""
    import torch
    from safetensors.torch import save_file

    folder = target.parent / f"{target.name}-eagle3"
    if (folder / "config.json").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    config = json.loads((target / "config.json").read_text())
    h, inter, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    heads, kvh = config["num_attention_heads"], config["num_key_value_heads"]
    d = h // heads
    head = {**config, "architectures": ["LlamaForCausalLMEagle3"], "num_hidden_layers": 1}
    head["draft_vocab_size"] = vocab
    (folder / "config.json").write_text(json.dumps(head))
    gen = torch.Generator().manual_seed(5)

    def w(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * 0.02

    tensors = {
        "fc.weight": w(h, 3 * h),
        "midlayer.self_attn.q_proj.weight": w(heads * d, 2 * h),
        "midlayer.self_attn.k_proj.weight": w(kvh * d, 2 * h),
        "midlayer.self_attn.v_proj.weight": w(kvh * d, 2 * h),
        "midlayer.self_attn.o_proj.weight": w(h, heads * d),
        "midlayer.mlp.gate_proj.weight": w(inter, h),
        "midlayer.mlp.up_proj.weight": w(inter, h),
        "midlayer.mlp.down_proj.weight": w(h, inter),
        "midlayer.input_layernorm.weight": torch.ones(h),
        "midlayer.hidden_norm.weight": torch.ones(h),
        "midlayer.post_attention_layernorm.weight": torch.ones(h),
        "norm.weight": torch.ones(h),
        "lm_head.weight": w(vocab, h),
        "d2t": torch.zeros(vocab, dtype=torch.long),
    }
    save_file(tensors, folder / "model.safetensors")
    return folder


def deepseek_mtp(root: Path) -> Path:
    """A DeepSeek-V3 (hidden 256, 4 layers, 8 experts, vocabulary 32000) with a random MTP
    layer at `model.layers.4` (layer 3's shape, plus enorm/hnorm/eh_proj/shared_head)."""
    import torch
    import transformers
    from safetensors.torch import load_file, save_file

    from enginehouse.testing import build_model

    folder = root / "deepseek-v3-mtp"
    if (folder / "config.json").is_file():
        return folder
    config = transformers.DeepseekV3Config(
        vocab_size=32000,
        hidden_size=256,
        intermediate_size=688,
        moe_intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        kv_lora_rank=64,
        q_lora_rank=96,
        qk_rope_head_dim=16,
        qk_nope_head_dim=32,
        v_head_dim=32,
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_group=4,
        topk_group=2,
        n_shared_experts=1,
        first_k_dense_replace=1,
        max_position_embeddings=2048,
        bos_token_id=1,
        eos_token_id=2,
    )
    build_model(folder, config)
    tensors = load_file(folder / "model.safetensors")
    for name in list(tensors):
        if name.startswith("model.layers.3."):
            tensors[name.replace("layers.3.", "layers.4.")] = tensors[name].clone()
    gen = torch.Generator().manual_seed(6)
    h = 256
    tensors.update(
        {
            "model.layers.4.enorm.weight": torch.ones(h),
            "model.layers.4.hnorm.weight": torch.ones(h),
            "model.layers.4.eh_proj.weight": torch.randn(h, 2 * h, generator=gen) * 0.02,
            "model.layers.4.shared_head.norm.weight": torch.ones(h),
            "model.layers.4.shared_head.head.weight": torch.randn(32000, h, generator=gen) * 0.02,
        }
    )
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((folder / "config.json").read_text())
    cfg["num_nextn_predict_layers"] = 1
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def hybrid_target(models: Path) -> Path:
    """A random Qwen3.5 text model (hybrid: linear and full attention), its layers' outputs
    scaled down so that greedy decoding repeats (prompt lookup's best case, as the Llama's)."""
    import transformers
    from safetensors.torch import load_file, save_file

    from enginehouse.testing import build_model

    folder = models / "qwen3.5-hybrid-bench"
    if (folder / "config.json").is_file():
        return folder
    config = transformers.Qwen3_5TextConfig(
        vocab_size=32000,
        hidden_size=512,
        intermediate_size=1408,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=64,
        layer_types=(["linear_attention"] * 3 + ["full_attention"]) * 2,
        linear_num_key_heads=4,
        linear_num_value_heads=8,
        linear_key_head_dim=64,
        linear_value_head_dim=64,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
    )
    build_model(folder, config)
    tensors = load_file(folder / "model.safetensors")
    for name in tensors:
        if any(k in name for k in ("o_proj", "down_proj", "out_proj")):
            tensors[name] = tensors[name] * 0.5
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def prompts(batch: int, vocab: int, repeat: bool) -> list[list[int]]:
    import random

    out = []
    for i in range(batch):
        rng = random.Random(100 + i)
        if repeat:
            passage = rng.choices(range(5, vocab), k=24)
            out.append(passage * 4)
        else:
            out.append(rng.choices(range(5, vocab), k=96))
    return out


def side(model: str, spec: str, batch: int, tokens: int, repeat: bool) -> dict:
    """One side in this process: seconds for the batch (after a warm-up), tokens, stats."""
    import time

    from enginehouse import GenerationConfig, pipeline

    config: dict = {"enable_prefix_caching": False}
    if spec != "none":
        config["speculative_config"] = json.loads(spec)
    pipe = pipeline(model, backend="pytorch", engine_config=config, progress=False)
    params = GenerationConfig(max_new_tokens=tokens, min_new_tokens=tokens)
    ps = prompts(batch, 32000, repeat)
    pipe([{"token_ids": p[:8]} for p in ps[:1]], [GenerationConfig(max_new_tokens=4)])
    before = pipe.stats()
    start = time.perf_counter()
    out = pipe([{"token_ids": p} for p in ps], [params] * batch)
    seconds = time.perf_counter() - start
    after = pipe.stats()
    pipe.close()
    result = {"seconds": seconds, "tokens": [r.token_ids for r in out]}
    if "spec_decode_num_draft_tokens" in after:
        for key in ("num_drafts", "num_draft_tokens", "num_accepted_tokens"):
            name = f"spec_decode_{key}"
            result[key] = after[name] - before[name]
    return result


def run_side(*args: str) -> dict:
    done = subprocess.run(
        [sys.executable, __file__, "--side", *args], capture_output=True, text=True
    )
    if done.returncode != 0:
        raise SystemExit(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--k", type=int, default=3)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument(
        "--method",
        choices=["ngram-draft", "eagle3", "mtp", "hybrid"],
        default="ngram-draft",
        help="the sides: n-gram and draft models (default), an EAGLE-3 head, MTP, or n-gram "
        "on a hybrid model",
    )
    parser.add_argument(
        "--sides", default="plain,ngram,draft-copy,draft-tenth", help="with ngram-draft"
    )
    parser.add_argument("--prompts", default="repeat,random")
    parser.add_argument("--side", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        model, spec, batch, tokens, repeat = args.side
        print(json.dumps(side(model, spec, int(batch), int(tokens), repeat == "repeat")))
        return

    from native_backend import build

    if args.method == "hybrid":
        target = Path("bench-models") / "llama-56m"  # not built: only its folder is used
    else:
        target = build("llama-56m").resolve()
    k = args.k
    ngram = {"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_max": 4}
    ngram["prompt_lookup_min"] = 2
    wanted = args.sides.split(",")
    sides = {"plain": "none", "ngram": json.dumps(ngram)}
    if "draft-copy" in wanted and args.method == "ngram-draft":
        sides["draft-copy"] = json.dumps(
            {"model": str(draft_copy(target)), "num_speculative_tokens": k}
        )
    if "draft-tenth" in wanted and args.method == "ngram-draft":
        draft = str(draft_tenth(target))
        sides["draft-tenth"] = json.dumps({"model": draft, "num_speculative_tokens": k})
    sides = {name: spec for name, spec in sides.items() if name in wanted or name == "plain"}
    if args.method == "eagle3":
        head = {"method": "eagle3", "model": str(eagle3_head(target)), "num_speculative_tokens": k}
        sides = {"plain": "none", "eagle3-random": json.dumps(head)}
    elif args.method == "hybrid":
        target = hybrid_target(target.parent.resolve()).resolve()
        sides = {"plain": "none", "ngram": json.dumps(ngram)}
    elif args.method == "mtp":
        target = deepseek_mtp(target.parent).resolve()
        mtp = {"method": "mtp", "num_speculative_tokens": k}
        sides = {"plain": "none", "mtp-random": json.dumps(mtp)}
    print(f"target: {target}")
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model_name = next(
        (ln.split(":", 1)[1].strip() for ln in cpu.splitlines() if "Model name" in ln), "?"
    )
    print(f"CPU: {model_name}; load average before: {os.getloadavg()}")
    rows = []
    for batch in [int(b) for b in args.batches.split(",")]:
        for repeat in args.prompts.split(","):
            best: dict[str, dict] = {}
            for _ in range(args.rounds):
                for name, spec in sides.items():
                    if name == "ngram" and repeat == "random":
                        continue
                    got = run_side(str(target), spec, str(batch), str(args.tokens), repeat)
                    if name not in best or got["seconds"] < best[name]["seconds"]:
                        best[name] = got
            plain = best["plain"]
            for name, got in best.items():
                same = got["tokens"] == plain["tokens"]
                row = {
                    "batch": batch,
                    "prompt": repeat,
                    "side": name,
                    "tok_per_s": round(batch * args.tokens / got["seconds"], 1),
                    "speedup": round(plain["seconds"] / got["seconds"], 2),
                    "identical": same,
                }
                if "num_draft_tokens" in got and got["num_draft_tokens"]:
                    row["acceptance"] = round(
                        got["num_accepted_tokens"] / got["num_draft_tokens"], 3
                    )
                    row["mean_accepted_length"] = round(
                        1 + got["num_accepted_tokens"] / max(1, got["num_drafts"]), 2
                    )
                rows.append(row)
                print(json.dumps(row), flush=True)
    print(f"load average after: {os.getloadavg()}")
    print("| batch | prompt | side | tok/s | vs plain | acceptance | mean accepted | identical |")
    print("| ---: | --- | --- | ---: | ---: | ---: | ---: | --- |")
    for r in rows:
        print(
            f"| {r['batch']} | {r['prompt']} | {r['side']} | {r['tok_per_s']} | "
            f"{r['speedup']}x | {r.get('acceptance', '-')} | "
            f"{r.get('mean_accepted_length', '-')} | {r['identical']} |"
        )


if __name__ == "__main__":
    main()
