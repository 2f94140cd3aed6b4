"""Draft heads that run on the target's hidden states: EAGLE-3, EAGLE(-1) and MTP (DeepSeek-V3's,
Qwen3-Next's and Qwen3.5's).

Each head is one decoder layer that takes a token's embedding and a hidden state of the target
(or, from its second proposal on, its own previous output) and predicts the token after next.
Their on-disk formats:
- EAGLE-3 (`LlamaForCausalLMEagle3`, its own folder; heads for Qwen3 add `q_norm` / `k_norm`):
  `fc` [hidden, 3 * target hidden] folds the target's three auxiliary hidden states (the
  inputs of layers 2, L // 2 and L - 3, or the config's
  `eagle_config.eagle_aux_hidden_state_layer_ids`); `midlayer` is a Llama layer whose
  attention reads concat(input_layernorm(embedding), hidden_norm(hidden)) (2 * hidden wide) and
  whose residual is the hidden; `norm`; `lm_head` over `draft_vocab_size` tokens, with `d2t`
  (draft id + d2t[id] = target id). `embed_tokens` is the target's where the head has none.
- EAGLE (EAGLE-1, `LlamaForCausalLM` in its own folder): `fc` over concat(embedding, hidden)
  (2 * hidden, with a bias where the checkpoint has one), `layers.0` a Llama layer without its
  input norm, no final norm; the logits are the target's `lm_head` of its output. The hidden
  it reads is the target's last one after the final norm (what vLLM and SGLang hand it).
- MTP (DeepSeek-V3, inside the target's checkpoint as `model.layers.{num_hidden_layers}`):
  `eh_proj` over concat(enorm(embedding), hnorm(hidden)), a full DeepSeek layer (latent
  attention and the mixture), `shared_head.norm` and `shared_head.head`. The hidden is the
  target's last one after the final norm, as for EAGLE.
- MTP (Qwen3-Next, Qwen3.5; inside the target's checkpoint as `mtp.*`, `num_nextn_predict_layers`
  or `mtp_num_hidden_layers` in its config): `fc` over concat(pre_fc_norm_embedding(embedding),
  pre_fc_norm_hidden(hidden)), `layers.0` a full-attention layer of the target's kind (gated
  attention; the mixture with its shared expert where the target has one), `norm`; the logits
  are the target's `lm_head` of the normed output, which is also the hidden its next proposal
  reads. All its norms scale by (1 + weight), as the target's do.
Each head's `forward(embeds, hidden, meta, cache)` gives (the rows its logits come from, the
hidden its next proposal reads); `propose(rows, target_logits)` the target token ids it
proposes (greedy; EAGLE's through the target's head, `target_logits`).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from enginehouse.plugin_api import InvalidModelError

from .arch import Arch, arch_from_config
from .attention import StepMeta, TorchAttention
from .layers import GatedMLP, Linear, RMSNorm
from .model import Attention, DecoderLayer
from .parallel import TensorParallel
from .weights import load_safetensors

HEAD_METHODS = ("eagle", "eagle3", "mtp")


def aux_layers(num_layers: int, config: dict[str, Any]) -> tuple[int, ...]:
    """EAGLE-3's three target layers whose inputs it reads: the config's, else (2, L // 2,
    L - 3) as EAGLE-3 trains them; clamped into 0 .. L (L: the last layer's output)."""
    named = (config.get("eagle_config") or {}).get("eagle_aux_hidden_state_layer_ids")
    ids = named or (2, num_layers // 2, num_layers - 3)
    return tuple(min(max(int(i), 0), num_layers) for i in ids)


class Eagle3Head(nn.Module):
    """EAGLE-3's one layer (see the module docstring)."""

    def __init__(self, arch: Arch, target_hidden: int, draft_vocab: int, aux: tuple[int, ...]):
        super().__init__()
        h = arch.hidden_size
        self.aux = aux  # the target layers whose inputs it reads
        self.fc = Linear(len(aux) * target_hidden, [h])
        self.midlayer = nn.Module()
        m = self.midlayer
        m.self_attn = Attention(arch, 0, TorchAttention, TensorParallel(arch))
        m.self_attn.qkv_proj = Linear(2 * h, m.self_attn.sizes, arch.qkv_bias)  # emb + hidden
        m.mlp = GatedMLP(h, arch.intermediate_size, arch.act, arch.mlp_bias, TensorParallel(arch))
        m.input_layernorm = RMSNorm(h, arch.rms_norm_eps)
        m.hidden_norm = RMSNorm(h, arch.rms_norm_eps)
        m.post_attention_layernorm = RMSNorm(h, arch.rms_norm_eps)
        self.norm = RMSNorm(h, arch.rms_norm_eps)
        self.lm_head = Linear(h, [draft_vocab])
        self.register_buffer("d2t", torch.zeros(draft_vocab, dtype=torch.long))

    def first_hidden(self, captured: torch.Tensor) -> torch.Tensor:
        return self.fc(captured)

    def forward(self, embeds, hidden, meta: StepMeta, cache) -> tuple[torch.Tensor, torch.Tensor]:
        m = self.midlayer
        x = torch.cat([m.input_layernorm(embeds), m.hidden_norm(hidden)], dim=-1)
        x = hidden + m.self_attn(x, meta, cache)
        out = x + m.mlp(m.post_attention_layernorm(x))
        return self.norm(out), out

    def propose(self, rows: torch.Tensor, target_logits: Callable) -> torch.Tensor:
        draft = self.lm_head(rows).argmax(dim=-1)
        return draft + self.d2t[draft]


class Eagle1Head(nn.Module):
    """EAGLE's one layer: fc over (embedding, hidden), a Llama layer without its input norm,
    the target's lm_head."""

    reads_target_head = True  # its logits are the target's lm_head's

    def __init__(self, arch: Arch, bias: bool):
        super().__init__()
        h = arch.hidden_size
        self.aux = None
        self.fc = Linear(2 * h, [h], bias)
        self.layers = nn.ModuleList([DecoderLayer(arch, 0, TorchAttention, TensorParallel(arch))])
        self.layers[0].input_layernorm = nn.Identity()

    def first_hidden(self, captured: torch.Tensor) -> torch.Tensor:
        return captured

    def forward(self, embeds, hidden, meta: StepMeta, cache) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.layers[0](self.fc(torch.cat([embeds, hidden], dim=-1)), meta, cache)
        return out, out

    def propose(self, rows: torch.Tensor, target_logits: Callable) -> torch.Tensor:
        return target_logits(rows).argmax(dim=-1)


class MtpHead(nn.Module):
    """DeepSeek-V3's multi-token prediction layer (the first, `num_nextn_predict_layers` >= 1;
    each later proposal runs the same layer again, as vLLM and SGLang do)."""

    def __init__(self, arch: Arch):
        super().__init__()
        h, layer = arch.hidden_size, arch.num_layers
        self.aux = None
        self.enorm = RMSNorm(h, arch.rms_norm_eps)
        self.hnorm = RMSNorm(h, arch.rms_norm_eps)
        self.eh_proj = Linear(2 * h, [h])
        if arch.moe is not None and arch.moe.layers:  # the MTP layer has the mixture
            arch = dataclasses.replace(arch, moe=dataclasses.replace(arch.moe, layers=()))
        self.layer = DecoderLayer(arch, layer, TorchAttention, TensorParallel(arch))
        self.shared_head = nn.Module()
        self.shared_head.norm = RMSNorm(h, arch.rms_norm_eps)
        self.shared_head.head = Linear(h, [arch.vocab_size])

    def first_hidden(self, captured: torch.Tensor) -> torch.Tensor:
        return captured

    def forward(self, embeds, hidden, meta: StepMeta, cache) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.eh_proj(torch.cat([self.enorm(embeds), self.hnorm(hidden)], dim=-1))
        out = self.layer(x, meta, cache)
        return out, out

    def propose(self, rows: torch.Tensor, target_logits: Callable) -> torch.Tensor:
        return self.shared_head.head(self.shared_head.norm(rows)).argmax(dim=-1)


class QwenMtpHead(nn.Module):
    """Qwen3-Next's (and Qwen3.5's) multi-token prediction layer (see the module docstring);
    each later proposal runs the same layer again, as vLLM does."""

    reads_target_head = True  # its logits are the target's lm_head's

    def __init__(self, arch: Arch):
        super().__init__()
        h, eps, plus_one = arch.hidden_size, arch.rms_norm_eps, arch.norm_plus_one
        self.aux = None
        self.pre_fc_norm_embedding = RMSNorm(h, eps, plus_one)
        self.pre_fc_norm_hidden = RMSNorm(h, eps, plus_one)
        self.fc = Linear(2 * h, [h])
        self.layers = nn.ModuleList([DecoderLayer(arch, 0, TorchAttention, TensorParallel(arch))])
        self.norm = RMSNorm(h, eps, plus_one)

    def first_hidden(self, captured: torch.Tensor) -> torch.Tensor:
        return captured

    def forward(self, embeds, hidden, meta: StepMeta, cache) -> tuple[torch.Tensor, torch.Tensor]:
        e, h = self.pre_fc_norm_embedding(embeds), self.pre_fc_norm_hidden(hidden)
        out = self.norm(self.layers[0](self.fc(torch.cat([e, h], dim=-1)), meta, cache))
        return out, out

    def propose(self, rows: torch.Tensor, target_logits: Callable) -> torch.Tensor:
        return target_logits(rows).argmax(dim=-1)


def qwen_mtp_arch(target: Arch) -> Arch:
    """The Qwen MTP layer's shape: one full-attention layer of the hybrid target, with the
    mixture where the target has experts."""
    moe = None if target.moe is None else dataclasses.replace(target.moe, layers=())
    return dataclasses.replace(target, num_layers=1, linear=None, moe=moe, windows=())


@dataclasses.dataclass
class LoadedHead:
    head: nn.Module
    arch: Arch  # the head's layer: its attention shape (the KV it keeps) and rope
    embed: torch.Tensor | None  # the head's own embeddings, None: the target's


def head_bytes_per_token(method: str, folder: str | None, target: Arch, dtype: torch.dtype) -> int:
    """What one token takes in the head's one-layer cache (read before the weights load)."""
    if method == "mtp" and target.linear is not None:  # Qwen's: one full-attention layer
        return 2 * target.num_kv_heads * target.head_dim * dtype.itemsize
    if method == "mtp":
        return target.mla.cache_width * dtype.itemsize if target.mla is not None else 0
    config = _head_config(method, folder)
    arch = arch_from_config("LlamaForCausalLM", {**config, "num_hidden_layers": 1})
    return 2 * arch.num_kv_heads * arch.head_dim * dtype.itemsize


def _head_config(method: str, folder: str | None) -> dict[str, Any]:
    config_file = Path(folder or "") / "config.json"
    if not config_file.is_file():
        raise InvalidModelError(
            f"speculative_config 'model' {folder!r} has no config.json: give the folder of an "
            f"{'EAGLE-3' if method == 'eagle3' else 'EAGLE'} draft head (its config.json and "
            "*.safetensors)"
        )
    return json.loads(config_file.read_text())


def load_head(
    method: str, folder: str | None, target_arch: Arch, target_spec: Any, make: Callable
) -> LoadedHead:
    """The head `method` names, its weights in; `make` creates modules in the runner's dtype
    and device. Raises `InvalidModelError` saying what to fix."""
    if method == "mtp":
        return _load_mtp(target_arch, target_spec, make)
    path = Path(folder or "")
    config = _head_config(method, folder)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise InvalidModelError(f"no *.safetensors weights in the draft head folder {path}")
    hidden = config.get("hidden_size")
    if hidden != target_arch.hidden_size:
        raise InvalidModelError(
            f"the draft head in {path} has hidden_size {hidden}, the target "
            f"{target_arch.hidden_size}: a head is trained for one target model; use the head "
            "made for this model"
        )
    arch = arch_from_config("LlamaForCausalLM", {**config, "num_hidden_layers": 1})
    names = _tensor_names(files)
    if any(n.endswith("self_attn.q_norm.weight") for n in names):  # Qwen3's heads (SpecForge)
        arch = dataclasses.replace(arch, qk_norm=True)
    if method == "eagle3":
        draft_vocab = int(config.get("draft_vocab_size") or config["vocab_size"])
        target_hidden = int(config.get("target_hidden_size") or hidden)
        aux = aux_layers(target_arch.num_layers, config)
        head = make(lambda: Eagle3Head(arch, target_hidden, draft_vocab, aux))
        skip = {"t2d": None, "d2t": None, "embed_tokens.": None}
        load_safetensors(head, files, False, {**skip, "": ""})
        if "d2t" in names:
            head.d2t.copy_(read_tensor(files, "d2t").long())
    else:
        head = make(lambda: Eagle1Head(arch, "fc.bias" in names))
        load_safetensors(head, files, False, {"embed_tokens.": None, "": ""})
    embed = read_tensor(files, "embed_tokens.weight") if "embed_tokens.weight" in names else None
    return LoadedHead(head.eval(), arch, embed)


def _load_mtp(target_arch: Arch, spec: Any, make: Callable) -> LoadedHead:
    if target_arch.linear is not None:
        return _load_qwen_mtp(target_arch, spec, make)
    layers = int(spec.config.get("num_nextn_predict_layers") or 0)
    if target_arch.mla is None or not target_arch.family.startswith("deepseek"):
        raise InvalidModelError(
            f"method 'mtp' runs DeepSeek-V3's multi-token prediction layers; {target_arch.family} "
            "has none natively; use 'ngram', 'draft_model' or an EAGLE head"
        )
    n = target_arch.num_layers
    files = [spec.path / f for f in spec.weight_files if f.endswith(".safetensors")]
    prefix = f"model.layers.{n}."
    if not layers or not any(name.startswith(prefix) for name in _tensor_names(files)):
        raise InvalidModelError(
            f"method 'mtp': {spec.model_id} has no MTP layer (num_nextn_predict_layers="
            f"{layers}, no {prefix}* weights); use a checkpoint that ships its MTP weights "
            "(DeepSeek-V3's own), or method 'ngram' / 'draft_model'"
        )
    head = make(lambda: MtpHead(target_arch))
    prefixes: dict[str, str | None] = {
        f"{prefix}{part}": f"layer.{part}"
        for part in ("self_attn.", "mlp.", "input_layernorm.", "post_attention_layernorm.")
    }
    prefixes.update({f"{prefix}embed_tokens.": None, prefix: ""})
    load_safetensors(head, files, False, prefixes)
    head.layer.self_attn.absorb()  # the latent-space decode's W_UK and W_UV
    return LoadedHead(head.eval(), target_arch, None)


def _load_qwen_mtp(target_arch: Arch, spec: Any, make: Callable) -> LoadedHead:
    config = spec.config.get("text_config") or spec.config
    layers = config.get("num_nextn_predict_layers") or config.get("mtp_num_hidden_layers") or 0
    files = [spec.path / f for f in spec.weight_files if f.endswith(".safetensors")]
    if "mtp.fc.weight" not in _tensor_names(files):
        raise InvalidModelError(
            f"method 'mtp': {spec.model_id} has no MTP layer (mtp_num_hidden_layers / "
            f"num_nextn_predict_layers={layers}, no mtp.* weights); use a checkpoint that ships "
            f"its MTP weights ({target_arch.family}'s own, as Qwen publishes them), or method "
            "'ngram' / 'draft_model'"
        )
    arch = qwen_mtp_arch(target_arch)
    head = make(lambda: QwenMtpHead(arch))
    # The first MTP layer only (Qwen's checkpoints have one); the target's embedding and head.
    prefixes = {"mtp.layers.0.": "layers.0.", "mtp.layers.": None, "mtp.embed_tokens.": None}
    load_safetensors(head, files, False, {**prefixes, "mtp.": ""})
    for m in head.modules():  # (1 + w) into a plain weight, as the target's norms are
        if isinstance(m, RMSNorm):
            m.fold()
    return LoadedHead(head.eval(), arch, None)


def _tensor_names(files: list[Path]) -> set[str]:
    from safetensors import safe_open

    names: set[str] = set()
    for f in files:
        with safe_open(str(f), "pt") as s:
            names.update(s.keys())
    return names


def read_tensor(files: list[Path], name: str) -> torch.Tensor:
    from safetensors import safe_open

    for f in files:
        with safe_open(str(f), "pt") as s:
            if name in s.keys():
                return s.get_tensor(name)
    raise KeyError(name)
