"""`ToyLlamaForCausalLM`: Llama under other names, run by the native backend.

Its config.json names the sizes differently (`dim`, `n_layers`, ...) and its checkpoint names
the tensors differently (`toy.blocks.0.attn.wq.weight` for Llama's
`model.layers.0.self_attn.q_proj.weight`). The family says how both read as Llama's; the
native decoder does the rest (paged KV, batching, prefix caching, tensor parallelism).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from enginehouse.plugin_api import ModelFamily

# Our config keys -> Llama's.
CONFIG_KEYS = {
    "dim": "hidden_size",
    "n_layers": "num_hidden_layers",
    "n_heads": "num_attention_heads",
    "n_kv_heads": "num_key_value_heads",
    "ffn_dim": "intermediate_size",
    "norm_eps": "rms_norm_eps",
    "max_seq_len": "max_position_embeddings",
}
# (our tensor name pattern, Llama's), applied in order.
WEIGHT_NAMES = (
    (r"^toy\.tok_embeddings\.", "model.embed_tokens."),
    (r"^toy\.final_norm\.", "model.norm."),
    (r"^toy\.output\.", "lm_head."),
    (r"^toy\.blocks\.", "model.layers."),
    (r"\.attn\.w([qkvo])\.", r".self_attn.\1_proj."),
    (r"\.attn_norm\.", ".input_layernorm."),
    (r"\.ffn_norm\.", ".post_attention_layernorm."),
    (r"\.ffn\.w_gate\.", ".mlp.gate_proj."),
    (r"\.ffn\.w_up\.", ".mlp.up_proj."),
    (r"\.ffn\.w_down\.", ".mlp.down_proj."),
)
# Llama's tensor names -> ours: the inverse, to write a toy checkpoint from a Llama one.
TO_TOY = (
    (r"^model\.embed_tokens\.", "toy.tok_embeddings."),
    (r"^model\.norm\.", "toy.final_norm."),
    (r"^lm_head\.", "toy.output."),
    (r"^model\.layers\.", "toy.blocks."),
    (r"\.self_attn\.([qkvo])_proj\.", r".attn.w\1."),
    (r"\.input_layernorm\.", ".attn_norm."),
    (r"\.post_attention_layernorm\.", ".ffn_norm."),
    (r"\.mlp\.gate_proj\.", ".ffn.w_gate."),
    (r"\.mlp\.up_proj\.", ".ffn.w_up."),
    (r"\.mlp\.down_proj\.", ".ffn.w_down."),
)


def llama_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """Our config.json as Llama's keys."""
    return {CONFIG_KEYS.get(k, k): v for k, v in config.items()}


def from_llama(src: Path, dst: Path) -> None:
    """Write a ToyLlama checkpoint in `dst` from the Llama one in `src` (same weights)."""
    import re

    from safetensors.torch import load_file, save_file

    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.suffix == ".safetensors":
            tensors = {}
            for name, t in load_file(f).items():
                for pattern, repl in TO_TOY:
                    name = re.sub(pattern, repl, name)
                tensors[name] = t
            save_file(tensors, dst / f.name, metadata={"format": "pt"})
        elif f.name == "config.json":
            config = json.loads(f.read_text())
            inverse = {v: k for k, v in CONFIG_KEYS.items()}
            config = {inverse.get(k, k): v for k, v in config.items()}
            config.update(architectures=["ToyLlamaForCausalLM"], model_type="toyllama")
            (dst / f.name).write_text(json.dumps(config, indent=2))
        elif f.is_file() and not f.name.endswith(".index.json"):
            shutil.copy(f, dst / f.name)


TOY_LLAMA = ModelFamily(
    architecture="ToyLlamaForCausalLM",
    base="LlamaForCausalLM",
    name="toyllama",
    config=llama_config,
    weight_names=WEIGHT_NAMES,
    reference="LlamaForCausalLM",
    from_reference=from_llama,
)
