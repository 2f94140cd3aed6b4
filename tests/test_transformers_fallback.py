"""The `transformers` backend on families only it runs, checked against transformers itself.

Each family in `enginehouse.testing.transformers_model_configs` runs through the pipeline alone,
in a mixed batch with a prompt prefilled in two chunks, and scored (`get_ppl`, which reads the
logits of every position); tokens must equal transformers' greedy `generate` and the perplexity
its loss. Which path each takes (batched over slots, or unbatched with transformers' own cache)
and why is asserted, as is the KV size the runner measured.
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from enginehouse import EngineConfig, GenerationConfig, pipeline
from enginehouse.errors import BackendError
from enginehouse.spec import read_model_spec
from enginehouse.testing import (
    CHATML_TEMPLATE,
    build_model,
    build_tokenizer,
    hf_greedy,
    transformers_model_configs,
)

PROMPTS = [
    "hello world the quick brown fox",
    "cache",
    "über straße 東京 数据 😀 the engine model token train paper light blue green river city jumps",
]
LENGTHS = [10, 4, 7]
NO_INTERFACE = "does not take a custom attention function"
# Family -> why it runs unbatched (None: batched over slots).
HOW = {
    "gpt2": None,
    "gptj": None,
    "codegen": None,
    "gpt_bigcode": None,
    "gpt_neox": None,
    "opt": None,
    "phi": None,
    "gemma": None,
    "starcoder2": None,
    "gemma3_text": None,
    "deepseek_v3": None,
    "falcon": NO_INTERFACE,
    "bloom": NO_INTERFACE,
    "gpt_oss": "its attention takes s_aux, which slot attention does not implement",
    "mamba": NO_INTERFACE,
    "qwen3_next": NO_INTERFACE,
    "lfm2": "layer types ['conv'] need their own caches",
}
# KV bytes per token (float32, 2 layers, keys + values) where config names mislead.
KV_BYTES = {
    "gpt2": 2 * 2 * 4 * 16 * 4,  # n_head=4, head size derived from n_embd
    "gpt_bigcode": 2 * 2 * 1 * 16 * 4,  # multi-query: one KV head
    # Keys of 16 + 8 (rope), values of 16, as attention receives them (transformers' cache
    # keeps the compressed latent instead: 24 per token and layer).
    "deepseek_v3": 2 * 4 * (24 + 16) * 4,
    "falcon": 2 * 2 * 1 * 16 * 4,  # multi_query
    "mamba": 0,  # a fixed recurrent state per sequence instead
}


@pytest.fixture(scope="module")
def family_dir(models_dir):
    """Builds a family's model on first use; all share one trained tokenizer."""
    tokenizer = build_tokenizer(models_dir / "hf-tokenizer", 512, CHATML_TEMPLATE)
    configs = transformers_model_configs(512)
    built = {}

    def build(family: str):
        if family not in built:
            folder = models_dir / f"hf-{family}"
            built[family] = build_model(folder, configs[family], tokenizer=tokenizer)
        return built[family]

    return build


def fixed(n: int) -> GenerationConfig:
    return GenerationConfig(max_new_tokens=n, min_new_tokens=n)


def test_every_family_configured_is_tested():
    assert set(transformers_model_configs(512)) == {*HOW, "rwkv"}


@pytest.mark.parametrize("family", HOW)
def test_family_equals_transformers_alone_batched_and_scored(family, family_dir):
    path = family_dir(family)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(path)
    want = [hf_greedy(model, tok, prompt, n) for prompt, n in zip(PROMPTS, LENGTHS)]
    ids = tok(PROMPTS[2], return_tensors="pt").input_ids
    with torch.no_grad():
        want_ppl = math.exp(model(ids, labels=ids).loss.item())
    assert ids.shape[1] > 16  # so that a 16-token step budget prefills it in two chunks
    config = {"max_num_batched_tokens": 16, "max_batch_size": 4}
    with pipeline(str(path), backend="transformers", engine_config=config, progress=False) as pipe:
        runner = pipe.runner
        if HOW[family] is None:
            assert runner.slots is not None and runner.unbatched_reason is None
        else:
            assert runner.slots is None and HOW[family] in runner.unbatched_reason
        per_token = runner.layout.bytes_per_token
        assert runner.kv_spec.bytes_per_block == max(
            1, per_token * runner.kv_spec.block_size + runner.layout.state_bytes
        )
        if family in KV_BYTES:
            assert per_token == KV_BYTES[family]
        if runner.slots is not None:  # the slots hold what the budget counted
            kv = [*runner.slots.keys.values(), *runner.slots.values.values()]
            assert sum(t[0, :, 0].nbytes for t in kv) == per_token
        alone = pipe(PROMPTS[0], fixed(LENGTHS[0]), apply_chat_template=False)
        batched = pipe(PROMPTS, [fixed(n) for n in LENGTHS], apply_chat_template=False)
        ppl = pipe.get_ppl(PROMPTS[2])
    assert alone.token_ids == want[0]
    assert [r.token_ids for r in batched] == want
    assert ppl == pytest.approx(want_ppl, rel=1e-4)


def test_a_family_without_a_kv_cache_is_refused_by_the_probe(family_dir):
    from enginehouse_pytorch.plugin import probe_transformers

    path = family_dir("rwkv")
    verdict = probe_transformers(read_model_spec(path), EngineConfig())
    assert not verdict.supported
    assert "RWKV keeps its recurrent state in a `state` argument" in verdict.reason
    with pytest.raises(BackendError, match="cannot run this model: RwkvForCausalLM cannot run"):
        pipeline(str(path), backend="transformers", progress=False)


def test_a_model_returning_no_cache_is_refused_at_load(family_dir, monkeypatch):
    # What the probe cannot know from config.json (code from a model's repo, a new family) is
    # found by the load-time forward, with the same kind of message.
    from enginehouse_pytorch import plugin

    monkeypatch.setattr(plugin, "NO_KV_CACHE", {})
    with pytest.raises(BackendError, match="RwkvForCausalLM .* returns no transformers Cache"):
        pipeline(str(family_dir("rwkv")), backend="transformers", progress=False)
