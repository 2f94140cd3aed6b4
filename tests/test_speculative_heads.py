"""Speculative decoding with draft heads on the target's hidden states: EAGLE-3, EAGLE, MTP.

No trained heads exist offline, so the heads are built here in their on-disk formats
(config.json + safetensors): random ones (greedy output must equal plain decoding whatever
they propose), and "copy" ones whose weights make them propose the token they are given, which
the loopy targets (runs of one repeated token) keep often, so acceptance is above zero. The
EAGLE-3 head's forward is checked against a hand-written torch reference on transformers'
hidden states of the target (transformers has no EAGLE forward).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file, save_file
from test_speculative import PROMPTS, fixed, open_pipe, run

from enginehouse import EngineConfig, GenerationConfig, ScheduledBatch, SeqChunk, pipeline
from enginehouse.errors import EnginehouseError
from enginehouse.runner import DraftRequest
from enginehouse.testing import build_model, model_configs, tight_kv_config

H, HEADS, INTER, VOCAB, DRAFT_VOCAB = 64, 4, 128, 512, 256


def spec(method: str, head: Path | None = None, k: int = 3) -> dict:
    out = {"method": method, "num_speculative_tokens": k}
    return {**out, "model": str(head)} if head is not None else out


def runner_proposals(runner, prompt: list[int], nxt: int, k: int, seq_id: int) -> list[list[int]]:
    """The runner's head proposals after it prefilled `prompt` (blocks 0-7), `nxt` to follow."""
    table = tuple(range(8))
    chunk = SeqChunk(seq_id, tuple(prompt), 0, table, (len(prompt) - 1,))
    runner.execute(ScheduledBatch((chunk,), runner.block_size))
    return runner.propose_tokens([DraftRequest(seq_id, prompt + [nxt], len(prompt), table, k)])


@pytest.fixture(scope="module")
def target(models_dir):
    """A 4-layer Llama with tied embeddings and its layers' outputs scaled down (x0.1): it
    falls into runs of a repeated token (as test_speculative's loopy models)."""
    config = model_configs(VOCAB)["llama"]
    config.num_hidden_layers = 4
    config.tie_word_embeddings = True
    folder = build_model(models_dir / "heads-llama", config)
    tensors = load_file(folder / "model.safetensors")
    for name in tensors:
        if "o_proj" in name or "down_proj" in name:
            tensors[name] = tensors[name] * 0.1
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


@pytest.fixture(scope="module")
def plain(target):
    with open_pipe(target, max_batch_size=8) as pipe:
        yield pipe


def head_config(**extra) -> dict:
    return {
        "hidden_size": H,
        "intermediate_size": INTER,
        "num_attention_heads": HEADS,
        "num_key_value_heads": 2,
        "num_hidden_layers": 1,
        "vocab_size": VOCAB,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "max_position_embeddings": 256,
        "hidden_act": "silu",
        **extra,
    }


def save_head(folder: Path, config: dict, tensors: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in tensors.items()}, folder / "model.safetensors")
    return folder


def layer_tensors(prefix: str, kv_heads: int, attn_in: int, gen: torch.Generator) -> dict:
    d = H // HEADS

    def w(*shape):
        return torch.randn(*shape, generator=gen) * 0.2

    return {
        f"{prefix}self_attn.q_proj.weight": w(H, attn_in),
        f"{prefix}self_attn.k_proj.weight": w(kv_heads * d, attn_in),
        f"{prefix}self_attn.v_proj.weight": w(kv_heads * d, attn_in),
        f"{prefix}self_attn.o_proj.weight": w(H, H),
        f"{prefix}mlp.gate_proj.weight": w(INTER, H),
        f"{prefix}mlp.up_proj.weight": w(INTER, H),
        f"{prefix}mlp.down_proj.weight": w(H, INTER),
        f"{prefix}post_attention_layernorm.weight": 1 + w(H),
    }


def eagle3_tensors(seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    t = layer_tensors("midlayer.", 2, 2 * H, gen)
    t.update(
        {
            "fc.weight": torch.randn(H, 3 * H, generator=gen) * 0.1,
            "midlayer.input_layernorm.weight": 1 + torch.randn(H, generator=gen) * 0.1,
            "midlayer.hidden_norm.weight": 1 + torch.randn(H, generator=gen) * 0.1,
            "norm.weight": 1 + torch.randn(H, generator=gen) * 0.1,
            "lm_head.weight": torch.randn(DRAFT_VOCAB, H, generator=gen) * 0.2,
            # Draft token i is target token 2 * i + 1: d2t[i] = i + 1.
            "d2t": torch.arange(DRAFT_VOCAB) + 1,
            "t2d": torch.arange(VOCAB) % 2 == 1,
        }
    )
    return t


@pytest.fixture(scope="module")
def eagle3_head(models_dir):
    config = head_config(architectures=["LlamaForCausalLMEagle3"], draft_vocab_size=DRAFT_VOCAB)
    return save_head(models_dir / "eagle3-random", config, eagle3_tensors())


@pytest.fixture(scope="module")
def eagle3_copy(models_dir, target):
    """An EAGLE-3 head that proposes the token it is given: fc = 0 (no hidden), attention of
    four full heads that attends to its own position and passes its normalised embedding on,
    no MLP, and the target's embeddings as its lm_head over the whole vocabulary."""
    config = head_config(architectures=["LlamaForCausalLMEagle3"], num_key_value_heads=HEADS)
    eye = torch.cat([torch.eye(H), torch.zeros(H, H)], dim=1)  # the embedding half
    embed = load_file(target / "model.safetensors")["model.embed_tokens.weight"]
    t = layer_tensors("midlayer.", HEADS, 2 * H, torch.Generator().manual_seed(1))
    t.update(
        {
            "fc.weight": torch.zeros(H, 3 * H),
            "midlayer.self_attn.q_proj.weight": 20 * eye,
            "midlayer.self_attn.k_proj.weight": 20 * eye,
            "midlayer.self_attn.v_proj.weight": eye,
            "midlayer.self_attn.o_proj.weight": torch.eye(H),
            "midlayer.mlp.down_proj.weight": torch.zeros(H, INTER),
            "midlayer.input_layernorm.weight": torch.ones(H),
            "midlayer.hidden_norm.weight": torch.ones(H),
            "norm.weight": torch.ones(H),
            "lm_head.weight": embed,
        }
    )
    return save_head(models_dir / "eagle3-copy", config, t)


@pytest.fixture(scope="module")
def eagle1_heads(models_dir, target):
    """EAGLE(-1) heads: a random one, and one whose fc passes the embedding on and whose
    layer adds nothing (so the target's tied lm_head proposes the token it is given)."""
    config = head_config(architectures=["LlamaForCausalLM"])
    gen = torch.Generator().manual_seed(2)
    rand = layer_tensors("layers.0.", 2, H, gen)
    rand.update(
        {"fc.weight": torch.randn(H, 2 * H, generator=gen) * 0.1, "fc.bias": torch.zeros(H)}
    )
    copy = dict(rand)
    copy.update(
        {
            "fc.weight": torch.cat([torch.eye(H), torch.zeros(H, H)], dim=1),
            "layers.0.self_attn.o_proj.weight": torch.zeros(H, H),
            "layers.0.mlp.down_proj.weight": torch.zeros(H, INTER),
        }
    )
    return {
        "random": save_head(models_dir / "eagle1-random", config, rand),
        "copy": save_head(models_dir / "eagle1-copy", config, copy),
    }


# --- the configuration ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad, words",
    [
        ({"method": "eagle3", "num_speculative_tokens": 3}, "needs 'model'"),
        ({"method": "eagle", "num_speculative_tokens": 3}, "needs 'model'"),
        ({"method": "mtp", "model": "x", "num_speculative_tokens": 1}, "takes no 'model'"),
    ],
)
def test_bad_head_config_is_refused(bad, words):
    with pytest.raises(ValidationError, match=words):
        EngineConfig(speculative_config=bad)


def test_mtp_takes_one_token_by_default():
    assert EngineConfig(speculative_config={"method": "mtp"}).speculative_config.k == 1


def test_missing_head_and_wrong_hidden_size_name_the_fix(target, models_dir):
    with pytest.raises(EnginehouseError, match="has no config.json"):
        open_pipe(target, speculative_config=spec("eagle3", models_dir / "nowhere"))
    config = head_config(architectures=["LlamaForCausalLMEagle3"], hidden_size=32)
    wrong = save_head(models_dir / "eagle3-wrong", config, {"fc.weight": torch.zeros(32, 96)})
    with pytest.raises(EnginehouseError, match="hidden_size 32, the target 64"):
        open_pipe(target, speculative_config=spec("eagle3", wrong))


def test_mtp_on_a_model_without_mtp_layers_names_the_fix(target):
    with pytest.raises(EnginehouseError, match="method 'mtp'.*llama has none"):
        open_pipe(target, speculative_config=spec("mtp", k=1))


def test_explain_refuses_heads_on_the_transformers_backend(target, eagle3_head):
    from enginehouse import explain

    report = explain(str(target), engine_config={"speculative_config": spec("eagle3", eagle3_head)})
    verdicts = {v["backend"]: v for v in report["verdicts"]}
    assert report["chosen"] == "pytorch" and verdicts["pytorch"]["drafts_tokens"]
    assert not verdicts["transformers"]["supported"]
    assert "no speculative decoding" in verdicts["transformers"]["reason"]
    with pytest.raises(EnginehouseError, match="no speculative decoding"):
        pipeline(
            str(target),
            backend="transformers",
            engine_config={"speculative_config": spec("eagle3", eagle3_head)},
        )


# --- the head's forward against a hand-written reference -------------------------------------


def rms(x, w, eps=1e-6):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def rope(x, pos):
    d = x.shape[-1]
    inv = 1.0 / (10000.0 ** (torch.arange(0, d, 2).float() / d))
    ang = pos[:, None].float() * inv[None]
    cos, sin = torch.cat([ang, ang], -1)[:, None], torch.cat([ang, ang], -1).sin()[:, None]
    cos = cos.cos()
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return x * cos + torch.cat([-x2, x1], -1) * sin


class Eagle3Reference:
    """EAGLE-3's layer in plain torch, over a growing list of its own keys and values."""

    def __init__(self, t: dict, embed: torch.Tensor):
        self.t, self.embed = t, embed
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.pos: list[int] = []

    def step(self, tokens: list[int], hidden: torch.Tensor, positions: list[int]):
        t, d, kvh = self.t, H // HEADS, 2
        n = len(tokens)
        p = "midlayer."
        x = torch.cat(
            [rms(self.embed[tokens], t[p + "input_layernorm.weight"]),
             rms(hidden, t[p + "hidden_norm.weight"])], -1,
        )  # fmt: skip
        pos = torch.tensor(positions)
        q = rope((x @ t[p + "self_attn.q_proj.weight"].T).view(n, HEADS, d), pos)
        k = rope((x @ t[p + "self_attn.k_proj.weight"].T).view(n, kvh, d), pos)
        v = (x @ t[p + "self_attn.v_proj.weight"].T).view(n, kvh, d)
        self.keys.append(k)
        self.values.append(v)
        self.pos.extend(positions)
        K, V = torch.cat(self.keys), torch.cat(self.values)
        K, V = K.repeat_interleave(HEADS // kvh, 1), V.repeat_interleave(HEADS // kvh, 1)
        scores = torch.einsum("qhd,khd->hqk", q, K) / d**0.5
        allowed = torch.tensor(self.pos)[None] <= pos[:, None]
        scores = scores.masked_fill(~allowed[None], float("-inf"))
        attn = torch.einsum("hqk,khd->qhd", scores.softmax(-1), V).reshape(n, H)
        x = hidden + attn @ t[p + "self_attn.o_proj.weight"].T
        m = rms(x, t[p + "post_attention_layernorm.weight"])
        gate, up = m @ t[p + "mlp.gate_proj.weight"].T, m @ t[p + "mlp.up_proj.weight"].T
        out = x + (torch.nn.functional.silu(gate) * up) @ t[p + "mlp.down_proj.weight"].T
        logits = rms(out, t["norm.weight"]) @ t["lm_head.weight"].T
        draft = logits.argmax(-1)
        return (draft + t["d2t"][draft]).tolist(), out


def test_eagle3_head_matches_a_torch_reference(target, eagle3_head):
    from transformers import AutoModelForCausalLM

    prompt, nxt, k = PROMPTS[3][:20], 77, 4
    ids = prompt + [nxt]
    hf = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32)
    with torch.no_grad():
        states = hf(torch.tensor([prompt]), output_hidden_states=True).hidden_states
    t = load_file(eagle3_head / "model.safetensors")
    aux = torch.cat([states[i][0] for i in (2, 2, 1)], -1)  # layers 2, 4 // 2, 4 - 3
    ref = Eagle3Reference(t, hf.model.embed_tokens.weight.detach())
    positions = list(range(len(prompt)))
    drafts, out = ref.step(ids[1:], aux @ t["fc.weight"].T, positions)
    expected, hidden = [drafts[-1]], out[-1:]
    for j in range(1, k):
        d, hidden = ref.step([expected[-1]], hidden, [len(prompt) - 1 + j])
        expected.append(d[0])

    with open_pipe(target, speculative_config=spec("eagle3", eagle3_head, k)) as pipe:
        runner = pipe.runner
        got = runner_proposals(runner, prompt, nxt, k, seq_id=9)
        runner.finish_sequence(9)
    assert got == [expected]
    assert all(d % 2 == 1 for d in expected)  # mapped through d2t


# --- exact greedy output ----------------------------------------------------------------------


def heads(eagle3_head, eagle3_copy, eagle1_heads) -> dict[str, dict]:
    return {
        "eagle3-random": spec("eagle3", eagle3_head),
        "eagle3-copy": spec("eagle3", eagle3_copy),
        "eagle-random": spec("eagle", eagle1_heads["random"]),
        "eagle-copy": spec("eagle", eagle1_heads["copy"]),
    }


@pytest.mark.parametrize("which", ["eagle3-random", "eagle3-copy", "eagle-random", "eagle-copy"])
def test_greedy_equals_plain_alone_and_batched(
    which, target, plain, eagle3_head, eagle3_copy, eagle1_heads
):
    lengths = [14, 9, 20, 6]
    params = [fixed(n) for n in lengths]
    expected = run(plain, PROMPTS, params)
    config = heads(eagle3_head, eagle3_copy, eagle1_heads)[which]
    with open_pipe(target, max_batch_size=8, speculative_config=config) as pipe:
        alone = [run(pipe, [p], [g])[0] for p, g in zip(PROMPTS, params)]
        batched = run(pipe, PROMPTS, params)
        stats = pipe.stats()
    for got in (alone, batched):
        assert [r.token_ids for r in got] == [r.token_ids for r in expected]
    assert stats["spec_decode_num_drafts"] > 0
    if which.endswith("copy"):  # the target's runs are what a copying head proposes
        assert stats["spec_decode_num_accepted_tokens"] > 0
        assert stats["spec_decode_acceptance_rate"] > 0.2
    assert stats["kv_blocks_used"] == 0 and stats["running"] == 0


def test_stop_strings_n_and_prefix_hits_as_without_speculation(target, plain, eagle3_copy):
    probe = run(plain, PROMPTS[2:3], [fixed(12)])[0]
    stop = probe.text[len(probe.text) // 2 :][:3]
    stop_params = GenerationConfig(max_new_tokens=12, stop_words=[stop])
    expected_stop = run(plain, PROMPTS[2:3], [stop_params])[0]
    n_params = [fixed(10), fixed(10), GenerationConfig(max_new_tokens=10, min_new_tokens=4)]
    expected_n = run(plain, PROMPTS[3:] * 3, n_params)
    params = [fixed(n) for n in (20, 16, 24, 12)]
    expected = run(plain, PROMPTS, params)
    config = spec("eagle3", eagle3_copy)
    with open_pipe(target, block_size=4, speculative_config=config) as pipe:
        got_stop = run(pipe, PROMPTS[2:3], [stop_params])[0]
        got_n = run(pipe, PROMPTS[3:] * 3, n_params)
        run(pipe, PROMPTS, params)
        again = run(pipe, PROMPTS, params)  # the prompts' blocks (and the head's KV) cached
        assert pipe.stats()["spec_decode_num_accepted_tokens"] > 0
    assert (got_stop.text, got_stop.finish_reason) == (expected_stop.text, "stop")
    assert [c.token_ids for c in got_n] == [c.token_ids for c in expected_n]
    assert [r.token_ids for r in again] == [r.token_ids for r in expected]
    assert all(r.cached_tokens for r in again)


def test_seeded_sampling_is_reproducible(target, eagle3_copy):
    params = [GenerationConfig(max_new_tokens=16, do_sample=True, temperature=0.8, random_seed=7)]
    with open_pipe(target, speculative_config=spec("eagle3", eagle3_copy)) as pipe:
        a = run(pipe, PROMPTS[:1] * 2, params * 2)
        b = run(pipe, PROMPTS[:1], params)
    assert a[0].token_ids == a[1].token_ids == b[0].token_ids


# --- DeepSeek-V3's MTP layer -------------------------------------------------------------------


@pytest.fixture(scope="module")
def deepseek_mtp(models_dir):
    """A 3-layer DeepSeek-V3 (tied, outputs scaled down: loopy) with an MTP layer at
    `model.layers.3`: random ("random"), or one that passes its embedding on ("copy": eh_proj
    keeps the embedding half, attention and mixture add nothing, the head is the embedding)."""
    from test_deepseek import COMMON
    from transformers import DeepseekV3Config

    config = DeepseekV3Config(
        **COMMON, q_lora_rank=32, n_group=4, topk_group=2, n_shared_experts=1,
        routed_scaling_factor=2.5, norm_topk_prob=True, tie_word_embeddings=True,
    )  # fmt: skip
    made = {}
    for kind in ("random", "copy"):
        folder = build_model(models_dir / f"deepseek-mtp-{kind}", config)
        t = load_file(folder / "model.safetensors")
        for name in list(t):
            if "o_proj" in name or "down_proj" in name:
                t[name] = t[name] * 0.1
            if name.startswith("model.layers.2."):  # the MTP layer: layer 2's shape (a mixture)
                t[name.replace("layers.2.", "layers.3.")] = t[name].clone()
        gen = torch.Generator().manual_seed(3)
        embed = t["model.embed_tokens.weight"]
        t.update(
            {
                "model.layers.3.enorm.weight": torch.ones(H),
                "model.layers.3.hnorm.weight": torch.ones(H),
                "model.layers.3.eh_proj.weight": torch.randn(H, 2 * H, generator=gen) * 0.2,
                "model.layers.3.shared_head.norm.weight": torch.ones(H),
                "model.layers.3.shared_head.head.weight": torch.randn(VOCAB, H, generator=gen),
                "model.layers.3.embed_tokens.weight": embed.clone(),
            }
        )
        if kind == "copy":
            t["model.layers.3.eh_proj.weight"] = torch.cat([torch.eye(H), torch.zeros(H, H)], 1)
            t["model.layers.3.shared_head.head.weight"] = embed.clone()
            for name in list(t):
                if name.startswith("model.layers.3.") and ("o_proj" in name or "down_proj" in name):
                    t[name] = torch.zeros_like(t[name])
        t.pop("lm_head.weight", None)
        save_file(t, folder / "model.safetensors", metadata={"format": "pt"})
        cfg = json.loads((folder / "config.json").read_text())
        cfg["num_nextn_predict_layers"] = 1
        (folder / "config.json").write_text(json.dumps(cfg))
        made[kind] = folder
    return made


@pytest.mark.parametrize("kind", ["random", "copy"])
def test_mtp_greedy_equals_plain(kind, deepseek_mtp):
    params = [fixed(n) for n in (14, 9, 20, 6)]
    with open_pipe(deepseek_mtp[kind], max_batch_size=8) as pipe:
        expected = run(pipe, PROMPTS, params)
    with open_pipe(
        deepseek_mtp[kind], max_batch_size=8, speculative_config=spec("mtp", k=2)
    ) as pipe:
        alone = [run(pipe, [p], [g])[0] for p, g in zip(PROMPTS, params)]
        batched = run(pipe, PROMPTS, params)
        stats = pipe.stats()
    for got in (alone, batched):
        assert [r.token_ids for r in got] == [r.token_ids for r in expected]
    assert stats["spec_decode_num_drafts"] > 0
    if kind == "copy":
        assert stats["spec_decode_num_accepted_tokens"] > 0


def test_preemption_keeps_the_tokens(target, plain, eagle3_copy):
    params = [fixed(n) for n in (20, 16, 24, 12)]
    expected = run(plain, PROMPTS, params)
    config = spec("eagle3", eagle3_copy)
    with open_pipe(target, block_size=4, speculative_config=config) as pipe:
        sizing = tight_kv_config(pipe, 80, 4, 22)  # its blocks count the head's cache too
    with open_pipe(target, **sizing, speculative_config=config) as pipe:
        got = run(pipe, PROMPTS, params)
        stats = pipe.stats()
    assert stats["preemptions"] > 0
    assert [r.token_ids for r in got] == [r.token_ids for r in expected]
    assert stats["spec_decode_num_accepted_tokens"] > 0
    assert stats["kv_blocks_used"] == 0


def test_head_cache_is_counted_in_the_kv_budget(target, plain, eagle3_head):
    with open_pipe(target, speculative_config=spec("eagle3", eagle3_head)) as pipe:
        with_head = pipe.engine.kv_spec.bytes_per_block
    per_layer = plain.engine.kv_spec.bytes_per_block // 4  # the target's 4 layers
    assert with_head == plain.engine.kv_spec.bytes_per_block + per_layer


def test_explain_text_says_the_native_backend_drafts(target, eagle3_head):
    from click.testing import CliRunner

    from enginehouse.cli import cli

    config = json.dumps(spec("eagle3", eagle3_head))
    result = CliRunner().invoke(cli, ["explain", str(target), "--speculative-config", config])
    assert result.exit_code == 0, result.output
    native = next(line for line in result.output.splitlines() if " pytorch " in line)
    assert "drafts with a head" in native
    assert "no speculative decoding" in result.output


class Eagle1Reference:
    """EAGLE's layer in plain torch: fc over (embedding, hidden), a Llama layer without its
    input norm, the target's (tied) head."""

    def __init__(self, t: dict, embed: torch.Tensor):
        self.t, self.embed = t, embed
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.pos: list[int] = []

    def step(self, tokens: list[int], hidden: torch.Tensor, positions: list[int]):
        t, d, kvh, p = self.t, H // HEADS, 2, "layers.0."
        n = len(tokens)
        x = torch.cat([self.embed[tokens], hidden], -1) @ t["fc.weight"].T + t["fc.bias"]
        pos = torch.tensor(positions)
        q = rope((x @ t[p + "self_attn.q_proj.weight"].T).view(n, HEADS, d), pos)
        k = rope((x @ t[p + "self_attn.k_proj.weight"].T).view(n, kvh, d), pos)
        v = (x @ t[p + "self_attn.v_proj.weight"].T).view(n, kvh, d)
        self.keys.append(k)
        self.values.append(v)
        self.pos.extend(positions)
        K = torch.cat(self.keys).repeat_interleave(HEADS // kvh, 1)
        V = torch.cat(self.values).repeat_interleave(HEADS // kvh, 1)
        scores = torch.einsum("qhd,khd->hqk", q, K) / d**0.5
        allowed = torch.tensor(self.pos)[None] <= pos[:, None]
        scores = scores.masked_fill(~allowed[None], float("-inf"))
        attn = torch.einsum("hqk,khd->qhd", scores.softmax(-1), V).reshape(n, H)
        x = x + attn @ t[p + "self_attn.o_proj.weight"].T
        m = rms(x, t[p + "post_attention_layernorm.weight"])
        gate, up = m @ t[p + "mlp.gate_proj.weight"].T, m @ t[p + "mlp.up_proj.weight"].T
        out = x + (torch.nn.functional.silu(gate) * up) @ t[p + "mlp.down_proj.weight"].T
        return (out @ self.embed.T).argmax(-1).tolist(), out


def test_eagle1_head_matches_a_torch_reference(target, eagle1_heads):
    from transformers import AutoModelForCausalLM

    head = eagle1_heads["random"]
    prompt, nxt, k = PROMPTS[1][:25], 91, 3
    ids = prompt + [nxt]
    hf = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32)
    with torch.no_grad():
        last = hf.model(torch.tensor([prompt])).last_hidden_state[0]  # after the final norm
    t = load_file(head / "model.safetensors")
    ref = Eagle1Reference(t, hf.model.embed_tokens.weight.detach())
    drafts, out = ref.step(ids[1:], last, list(range(len(prompt))))
    expected, hidden = [drafts[-1]], out[-1:]
    for j in range(1, k):
        d, hidden = ref.step([expected[-1]], hidden, [len(prompt) - 1 + j])
        expected.append(d[0])

    with open_pipe(target, speculative_config=spec("eagle", head, k)) as pipe:
        runner = pipe.runner
        got = runner_proposals(runner, prompt, nxt, k, seq_id=5)
    assert got == [expected]


@pytest.mark.parametrize("which", ["eagle3-copy", "eagle-copy"])
def test_tp2_drafts_on_rank0_with_tp1s_tokens(
    which, target, plain, eagle3_head, eagle3_copy, eagle1_heads
):
    """At tp=2 every rank runs the target, rank 0 runs the head (with whole copies of the
    target's embedding and, for EAGLE, its head): tp=1's tokens, proposals kept."""
    params = [fixed(n) for n in (14, 9, 20, 6)]
    expected = run(plain, PROMPTS, params)
    config = heads(eagle3_head, eagle3_copy, eagle1_heads)[which]
    with open_pipe(target, tp=2, device="cpu", max_batch_size=8, speculative_config=config) as pipe:
        got = run(pipe, PROMPTS, params)
        stats = pipe.stats()
    assert [r.token_ids for r in got] == [r.token_ids for r in expected]
    assert stats["spec_decode_num_accepted_tokens"] > 0


def test_mtp_at_tp2_gives_tp1s_tokens(deepseek_mtp):
    params = [fixed(n) for n in (14, 9)]
    with open_pipe(deepseek_mtp["copy"]) as pipe:
        expected = run(pipe, PROMPTS[:2], params)
    config = dict(tp=2, device="cpu", speculative_config=spec("mtp", k=2))
    with open_pipe(deepseek_mtp["copy"], **config) as pipe:
        got = run(pipe, PROMPTS[:2], params)
        stats = pipe.stats()
    assert [r.token_ids for r in got] == [r.token_ids for r in expected]
    assert stats["spec_decode_num_accepted_tokens"] > 0


def test_mtp_on_a_deepseek_without_its_mtp_layer_names_the_fix(deepseek_mtp, tmp_path):
    import shutil

    folder = tmp_path / "deepseek-no-mtp"
    shutil.copytree(deepseek_mtp["random"], folder)
    t = load_file(folder / "model.safetensors")
    save_file({k: v for k, v in t.items() if not k.startswith("model.layers.3.")},
              folder / "model.safetensors", metadata={"format": "pt"})  # fmt: skip
    with pytest.raises(EnginehouseError, match="has no MTP layer.*num_nextn_predict_layers=1"):
        open_pipe(folder, speculative_config=spec("mtp", k=1))


def test_structured_output_stays_valid_with_a_head(target, plain, eagle3_head):
    """The grammar checks the head's proposals as any (engine/speculative.py)."""
    pytest.importorskip("xgrammar")
    schema = {
        "type": "object",
        "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99}},
        "required": ["a"],
        "additionalProperties": False,
    }
    fmt = {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}
    params = [
        GenerationConfig(max_new_tokens=40, response_format=fmt, do_sample=s, random_seed=i)
        for i, s in enumerate([False, True])
    ]
    prompts = [plain.tokenizer.encode(f'{{"a": {n}}}\n' * 3) for n in (7, 42)]
    with open_pipe(target, speculative_config=spec("eagle3", eagle3_head)) as pipe:
        out = run(pipe, prompts, params)
    greedy = run(plain, prompts[:1], params[:1])[0]
    assert out[0].token_ids == greedy.token_ids
    for r in out:
        assert r.finish_reason == "stop", r
        assert isinstance(json.loads(r.text)["a"], int)


def test_eagle3_head_with_qk_norms_loads_and_keeps_the_tokens(target, plain, models_dir):
    """EAGLE-3 heads trained for Qwen3 (SpecForge's) norm q and k per head: they load as such."""
    config = head_config(architectures=["LlamaForCausalLMEagle3"], draft_vocab_size=DRAFT_VOCAB)
    t = eagle3_tensors(seed=4)
    d = H // HEADS
    t["midlayer.self_attn.q_norm.weight"] = torch.ones(d) * 1.5
    t["midlayer.self_attn.k_norm.weight"] = torch.ones(d) * 0.5
    head = save_head(models_dir / "eagle3-qknorm", config, t)
    params = [fixed(n) for n in (14, 9)]
    expected = run(plain, PROMPTS[:2], params)
    with open_pipe(target, speculative_config=spec("eagle3", head)) as pipe:
        attn = pipe.runner.drafter.head.midlayer.self_attn
        assert attn.qk_norm and float(attn.q_norm.weight[0]) == 1.5
        got = run(pipe, PROMPTS[:2], params)
    assert [r.token_ids for r in got] == [r.token_ids for r in expected]


def test_eagle_on_qwen3_next_is_refused_and_mtp_drafts(tmp_path):
    """Qwen3-Next verifies proposals and drafts with its own MTP layers; EAGLE heads are
    refused on it (explain says why)."""
    from test_qwen3_next import CONFIGS

    from enginehouse import explain

    folder = build_model(tmp_path / "qwen3-next", CONFIGS["qwen3_next"]())
    report = explain(str(folder), engine_config={"speculative_config": spec("mtp", k=1)})
    native = next(v for v in report["verdicts"] if v["backend"] == "pytorch")
    assert native["supported"] and native["drafts_tokens"] and native["verifies_tokens"]
    eagle = spec("eagle3", tmp_path, k=1)
    report = explain(str(folder), engine_config={"speculative_config": eagle})
    native = next(v for v in report["verdicts"] if v["backend"] == "pytorch")
    assert not native["supported"] and not native["drafts_tokens"]
    assert "runs no EAGLE head for qwen3_next" in native["reason"]


def test_mtp_head_matches_a_reference_on_transformers_layers(deepseek_mtp):
    """DeepSeek-V3's MTP by hand (enorm, hnorm, eh_proj, shared_head) around transformers' own
    DeepSeek decoder layer (latent attention and the mixture) loaded with `model.layers.3`; each
    later proposal reruns the layer over the whole sequence (causal: as the cache would)."""
    from transformers import AutoModelForCausalLM
    from transformers.masking_utils import create_causal_mask
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3DecoderLayer

    folder, k = deepseek_mtp["random"], 3
    prompt, nxt = PROMPTS[2][:15], 123
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)  # sdpa: causal
    t = load_file(folder / "model.safetensors")
    pre = "model.layers.3."
    layer = DeepseekV3DecoderLayer(hf.config, layer_idx=3).eval()
    state = {n[len(pre) :]: v for n, v in t.items() if n.startswith(pre)}
    experts = range(hf.config.n_routed_experts)
    state["mlp.experts.gate_up_proj"] = torch.stack(
        [
            torch.cat([state[f"mlp.experts.{e}.{w}_proj.weight"] for w in ("gate", "up")])
            for e in experts
        ]
    )  # the checkpoint's per-expert tensors, in transformers' fused layout
    state["mlp.experts.down_proj"] = torch.stack(
        [state[f"mlp.experts.{e}.down_proj.weight"] for e in experts]
    )
    missing, _ = layer.load_state_dict(state, strict=False)
    assert not missing
    with torch.no_grad():
        hidden = hf.model(torch.tensor([prompt])).last_hidden_state[0]  # after the final norm

        def mtp(tokens: list[int], hid: torch.Tensor) -> torch.Tensor:
            e = rms(hf.model.embed_tokens.weight[tokens], t[pre + "enorm.weight"])
            x = torch.cat([e, rms(hid, t[pre + "hnorm.weight"])], -1) @ t[pre + "eh_proj.weight"].T
            pos = torch.arange(len(tokens))[None]
            mask = create_causal_mask(
                config=hf.config, inputs_embeds=x[None], attention_mask=None, cache=None,
                position_ids=pos,
            )  # fmt: skip
            pe = hf.model.rotary_emb(x[None], pos)
            return layer(x[None], attention_mask=mask, position_ids=pos, position_embeddings=pe)[0]

        tokens, hids, expected = prompt[1:] + [nxt], hidden, []
        for _ in range(k):
            out = mtp(tokens, hids)
            logits = (
                rms(out[-1], t[pre + "shared_head.norm.weight"])
                @ t[pre + "shared_head.head.weight"].T
            )
            expected.append(int(logits.argmax()))
            tokens, hids = tokens + [expected[-1]], torch.cat([hids, out[-1:]])

    with open_pipe(folder, speculative_config=spec("mtp", k=k)) as pipe:
        runner = pipe.runner
        got = runner_proposals(runner, prompt, nxt, k, seq_id=4)
    assert got == [expected]


# --- Qwen3-Next's and Qwen3.5's MTP layer (`mtp.*`) --------------------------------------------


def hybrid_mtp(folder: Path, config, kind: str) -> Path:
    """A loopy hybrid model (outputs scaled down, tied) with an MTP layer under `mtp.*`: its
    layer a copy of the full-attention layer 2, with random `fc` and norms ("random"), or one
    that passes the token's embedding on ("copy": `fc` keeps the embedding half, attention and
    MLP add nothing, so the tied head proposes the token it is given)."""
    from test_native import randomize_constant_tensors, rewrite_weights

    config.tie_word_embeddings = True
    folder = build_model(folder, config)
    rewrite_weights(folder, randomize_constant_tensors)
    t = load_file(folder / "model.safetensors")
    for name in list(t):
        if any(k in name for k in ("o_proj", "down_proj", "out_proj")):
            t[name] = t[name] * 0.45
        if name.startswith("model.layers.2."):
            t[name.replace("model.layers.2.", "mtp.layers.0.")] = t[name].clone()
    gen = torch.Generator().manual_seed(5)
    t.update(
        {
            f"mtp.{n}.weight": torch.randn(H, generator=gen) * 0.3
            for n in ("pre_fc_norm_embedding", "pre_fc_norm_hidden", "norm")
        }
    )
    t["mtp.fc.weight"] = torch.randn(H, 2 * H, generator=gen) * 0.2
    if kind == "copy":
        t["mtp.fc.weight"] = torch.cat([torch.eye(H), torch.zeros(H, H)], 1)
        for name in list(t):
            if name.startswith("mtp.") and any(k in name for k in ("o_proj", "down_proj")):
                t[name] = torch.zeros_like(t[name])
    save_file(t, folder / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((folder / "config.json").read_text())
    cfg["num_nextn_predict_layers"] = 1
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


QWEN_MTP_FAMILIES = ["qwen3_next", "qwen3_5", "qwen3_5_moe"]


@pytest.fixture(scope="module")
def qwen_mtp(models_dir):
    from test_qwen3_next import CONFIGS

    return {
        (family, kind): hybrid_mtp(models_dir / f"{family}-mtp-{kind}", CONFIGS[family](), kind)
        for family in QWEN_MTP_FAMILIES
        for kind in ("random", "copy")
    }


@pytest.mark.parametrize("family", QWEN_MTP_FAMILIES)
def test_qwen_mtp_head_matches_a_reference_on_transformers_layers(family, qwen_mtp):
    """The MTP layer by hand (pre_fc_norm_embedding, pre_fc_norm_hidden, fc, norm: (1 + w)
    norms) around transformers' own decoder layer (gated attention, the mixture with its
    shared expert) loaded with `mtp.layers.0`; the logits are the target's tied head, and each
    later proposal reads the normed output and reruns the layer over the whole sequence."""
    from transformers import AutoModelForCausalLM
    from transformers.masking_utils import create_causal_mask

    folder, k = qwen_mtp[family, "random"], 3
    prompt, nxt = PROMPTS[2][:15], 123
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    t = load_file(folder / "model.safetensors")
    layer = type(hf.model.layers[2])(hf.config, layer_idx=2).eval()  # full attention
    pre = "mtp.layers.0."
    state = {n[len(pre) :]: v for n, v in t.items() if n.startswith(pre)}
    experts = range(getattr(hf.config, "num_experts", 0) or 0)
    if experts:  # the checkpoint's per-expert tensors, in transformers' fused layout
        state["mlp.experts.gate_up_proj"] = torch.stack(
            [
                torch.cat([state[f"mlp.experts.{e}.{w}_proj.weight"] for w in ("gate", "up")])
                for e in experts
            ]
        )
        state["mlp.experts.down_proj"] = torch.stack(
            [state[f"mlp.experts.{e}.down_proj.weight"] for e in experts]
        )
    missing, _ = layer.load_state_dict(state, strict=False)
    assert not missing

    def norm(x, name):
        return rms(x, 1 + t[f"mtp.{name}.weight"], hf.config.rms_norm_eps)

    with torch.no_grad():
        hidden = hf.model(torch.tensor([prompt])).last_hidden_state[0]  # after the final norm

        def mtp(tokens: list[int], hid: torch.Tensor) -> torch.Tensor:
            e = norm(hf.model.embed_tokens.weight[tokens], "pre_fc_norm_embedding")
            x = torch.cat([e, norm(hid, "pre_fc_norm_hidden")], -1) @ t["mtp.fc.weight"].T
            pos = torch.arange(len(tokens))[None]
            mask = create_causal_mask(
                config=hf.config, inputs_embeds=x[None], attention_mask=None, cache=None,
                position_ids=pos,
            )  # fmt: skip
            pe = hf.model.rotary_emb(x[None], pos)
            out = layer(x[None], attention_mask=mask, position_ids=pos, position_embeddings=pe)
            return norm(out[0], "norm")

        tokens, hids, expected = prompt[1:] + [nxt], hidden, []
        for _ in range(k):
            out = mtp(tokens, hids)
            expected.append(int(hf.lm_head(out[-1]).argmax()))
            tokens, hids = tokens + [expected[-1]], torch.cat([hids, out[-1:]])

    with open_pipe(folder, speculative_config=spec("mtp", k=k)) as pipe:
        runner = pipe.runner
        assert type(runner).__name__ == "HybridDraftingRunner"
        got = runner_proposals(runner, prompt, nxt, k, seq_id=4)
    assert got == [expected]


@pytest.mark.parametrize("family", QWEN_MTP_FAMILIES)
@pytest.mark.parametrize("kind", ["random", "copy"])
def test_qwen_mtp_greedy_equals_plain_alone_and_batched(family, kind, qwen_mtp):
    params = [fixed(n) for n in (14, 9, 20, 6)]
    folder = qwen_mtp[family, kind]
    with open_pipe(folder, max_batch_size=8) as pipe:
        expected = run(pipe, PROMPTS, params)
    with open_pipe(folder, max_batch_size=8, speculative_config=spec("mtp", k=2)) as pipe:
        alone = [run(pipe, [p], [g])[0] for p, g in zip(PROMPTS, params)]
        batched = run(pipe, PROMPTS, params)
        stats = pipe.stats()
    for got in (alone, batched):
        assert [r.token_ids for r in got] == [r.token_ids for r in expected]
    assert stats["spec_decode_num_drafts"] > 0
    if kind == "copy":
        assert stats["spec_decode_num_accepted_tokens"] > 0


def test_mtp_on_a_qwen3_next_without_mtp_weights_names_the_fix(tmp_path):
    from test_qwen3_next import CONFIGS

    folder = build_model(tmp_path / "qwen3-next", CONFIGS["qwen3_next"]())
    with pytest.raises(EnginehouseError, match=r"no MTP layer.*no mtp\.\* weights.*'ngram'"):
        open_pipe(folder, speculative_config=spec("mtp", k=1))


def test_qwen_mtp_prefix_hits_and_preemption_keep_the_tokens(qwen_mtp):
    """Prefix hits (the linear layers resume from a saved state; the head's cache follows the
    full-attention group's blocks) and preemption (room for about one long context), with the
    MTP head: plain decoding's tokens."""
    folder = qwen_mtp["qwen3_next", "copy"]
    params = [fixed(n) for n in (20, 16, 24, 12)]
    with open_pipe(folder, block_size=4) as pipe:
        expected = run(pipe, PROMPTS, params)
    mtp = spec("mtp", k=2)
    with open_pipe(folder, block_size=4, speculative_config=mtp) as pipe:
        run(pipe, PROMPTS, params)
        again = run(pipe, PROMPTS, params)
        assert pipe.stats()["spec_decode_num_accepted_tokens"] > 0
        full, state = pipe.engine.kv_spec.groups  # the head's bytes in the full group
    assert [r.token_ids for r in again] == [r.token_ids for r in expected]
    assert all(r.cached_tokens for r in again)
    blocks = 70 // 4 + 1
    budget = blocks * 4 * full.bytes_per_token + 8 * state.bytes_per_seq
    tight = dict(block_size=4, max_batch_size=4, session_len=70, kv_cache_memory=f"{budget}B")
    with open_pipe(folder, **tight, speculative_config=mtp) as pipe:
        got = run(pipe, PROMPTS, params)
        stats = pipe.stats()
    assert stats["preemptions"] > 0
    assert [r.token_ids for r in got] == [r.token_ids for r in expected]
    assert stats["kv_blocks_used"] == 0


def test_qwen_mtp_cache_is_counted_in_the_full_attention_group(qwen_mtp):
    folder = qwen_mtp["qwen3_next", "random"]
    with open_pipe(folder) as pipe:
        plain_groups = pipe.engine.kv_spec.groups
    with open_pipe(folder, speculative_config=spec("mtp", k=1)) as pipe:
        groups = pipe.engine.kv_spec.groups
    full, state = plain_groups
    per_layer = full.bytes_per_token // len(full.layers)  # the head: one more such layer
    assert groups[0].bytes_per_token == full.bytes_per_token + per_layer
    assert groups[1] == state


def test_qwen_mtp_at_tp2_gives_tp1s_tokens(qwen_mtp):
    folder = qwen_mtp["qwen3_next", "copy"]
    params = [fixed(n) for n in (14, 9)]
    with open_pipe(folder) as pipe:
        expected = run(pipe, PROMPTS[:2], params)
    config = dict(tp=2, device="cpu", speculative_config=spec("mtp", k=2))
    with open_pipe(folder, **config) as pipe:
        got = run(pipe, PROMPTS[:2], params)
        stats = pipe.stats()
    assert [r.token_ids for r in got] == [r.token_ids for r in expected]
    assert stats["spec_decode_num_accepted_tokens"] > 0
