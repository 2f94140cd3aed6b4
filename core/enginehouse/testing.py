"""Small random-weight models with real tokenizers, built offline.

Used by the tests, the examples and the benchmarks: a BPE tokenizer trained on a generated
corpus, and a model built from a config with transformers and saved with `save_pretrained`.
Nothing here touches the network.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from .chat_template import CHATML

CHATML_TEMPLATE = CHATML  # the built-in one: tests see what a ChatML checkpoint renders
# ChatML with tools in the Hermes / Qwen2.5 format: the tools listed in the system turn, each
# call written as <tool_call>{"name": ..., "arguments": {...}}</tool_call>, results as
# <tool_response> in a user turn.
HERMES_TOOLS_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\nYou may call these functions:\n<tools>\n"
    "{%- for tool in tools %}{{ tool | tojson }}\n{% endfor %}</tools>\n"
    'For each call, write <tool_call>\n{"name": <function-name>, "arguments": '
    "<args-json-object>}\n</tool_call><|im_end|>\n{% endif %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'assistant' and m.tool_calls %}<|im_start|>assistant\n"
    "{% if m.content %}{{ m.content }}\n{% endif %}"
    '{%- for call in m.tool_calls %}<tool_call>\n{"name": "{{ call.function.name }}", '
    '"arguments": {{ call.function.arguments | tojson }}}\n</tool_call>\n{% endfor %}'
    "<|im_end|>\n"
    "{%- elif m.role == 'tool' %}<|im_start|>user\n<tool_response>\n{{ m.content }}\n"
    "</tool_response><|im_end|>\n"
    "{%- else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endif %}"
    "{%- endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
WORDS = (
    "the a engine model token train cache block batch prompt answer question river city "
    "paper light blue green quick brown fox jumps over lazy dog hello world café naïve "
    "über straße 東京 数据 😀 🚂 code python torch plugin kernel graph 12 345 6789 ."
).split()


def _corpus(n: int = 4000, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 15))) for _ in range(n)]


def build_tokenizer(folder: Path, vocab_size: int = 512, chat_template: str | None = None) -> Any:
    """Train a byte-level BPE tokenizer offline and save it as a transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="</s>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    if chat_template:
        fast.chat_template = chat_template
    fast.save_pretrained(folder)
    return fast


TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    initializer_range=0.2,  # peaked logits: greedy ties are practically impossible
)


# The 56M Llama shape the benchmarks use (random weights, 32000-token vocabulary).
LLAMA_56M = dict(
    hidden_size=512,
    intermediate_size=1376,
    num_hidden_layers=8,
    num_attention_heads=8,
    num_key_value_heads=4,
    vocab_size=32000,
    max_position_embeddings=2048,
    bos_token_id=1,
    eos_token_id=2,
)


def hf_greedy(model: Any, tokenizer: Any, prompt: str, n: int) -> list[int]:
    """transformers' own greedy `generate`: exactly `n` new tokens after `prompt`."""
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    # min_new_tokens masks EOS, exactly like GenerationConfig(min_new_tokens=n) does here.
    out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[0, ids.shape[1] :].tolist()


def model_configs(vocab_size: int) -> dict[str, Any]:
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    common = dict(TINY, vocab_size=vocab_size, bos_token_id=1, eos_token_id=2)
    return {
        "llama": LlamaConfig(**common),
        "qwen2": Qwen2Config(**common, tie_word_embeddings=True),
        "mistral": MistralConfig(**common, sliding_window=32),
    }


def transformers_model_configs(vocab_size: int) -> dict[str, Any]:
    """One small config per family that only the `transformers` backend runs, chosen among
    the ones people deploy and for what sets each apart: how its config names the attention
    shape (`n_head`, `multi_query`, derived or given `head_dim`, keys and values of different
    sizes), positions (learned, partial rotary, ALiBi), windows, attention sinks, recurrent and
    hybrid layers. Keyed by model type."""
    from transformers import AutoConfig

    common = dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=vocab_size,
        initializer_range=0.2,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    gqa = dict(num_key_value_heads=2, intermediate_size=128, max_position_embeddings=256)
    experts = dict(num_experts_per_tok=2, moe_intermediate_size=32)
    shapes: dict[str, dict[str, Any]] = {
        "gpt2": dict(n_positions=256),
        "gptj": dict(rotary_dim=8, n_positions=256),
        "codegen": dict(rotary_dim=8, n_positions=256, n_ctx=256),
        "gpt_bigcode": dict(multi_query=True, n_positions=256),  # StarCoder 1
        "gpt_neox": dict(intermediate_size=128, rotary_pct=0.25),  # Pythia
        "opt": dict(ffn_dim=128, word_embed_proj_dim=64),
        "phi": dict(gqa, partial_rotary_factor=0.5),
        "gemma": dict(gqa, head_dim=16),
        "starcoder2": dict(gqa, sliding_window=8),
        "gemma3_text": dict(gqa, head_dim=16, sliding_window=8, query_pre_attn_scalar=16),
        "deepseek_v3": dict(
            **experts,
            intermediate_size=128,
            num_key_value_heads=4,
            q_lora_rank=None,
            kv_lora_rank=16,
            qk_rope_head_dim=8,
            qk_nope_head_dim=16,
            v_head_dim=16,
            n_routed_experts=4,
            first_k_dense_replace=1,
            n_group=1,
            topk_group=1,
        ),
        "falcon": dict(multi_query=True, new_decoder_architecture=False, alibi=False),
        "bloom": dict(),
        "gpt_oss": dict(
            gqa,
            head_dim=16,
            num_local_experts=4,
            num_experts_per_tok=2,
            sliding_window=8,
            layer_types=["sliding_attention", "full_attention"],
        ),
        "mamba": dict(state_size=4, expand=2),
        "qwen3_next": dict(
            **gqa,
            **experts,
            head_dim=16,
            layer_types=["linear_attention", "full_attention"],
            num_experts=4,
            shared_expert_intermediate_size=32,
            linear_key_head_dim=16,
            linear_value_head_dim=16,
            linear_num_key_heads=2,
            linear_num_value_heads=4,
        ),
        "lfm2": dict(**gqa, layer_types=["conv", "full_attention"]),
        "rwkv": dict(attention_hidden_size=64, intermediate_size=128, context_length=256),
    }
    return {name: AutoConfig.for_model(name, **common, **shape) for name, shape in shapes.items()}


# Qwen2.5-0.5B's shape (random weights): the second benchmark model.
QWEN25_05B = dict(
    hidden_size=896,
    intermediate_size=4864,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    vocab_size=151936,
    max_position_embeddings=32768,
    tie_word_embeddings=True,
    bos_token_id=151643,
    eos_token_id=151645,
)


def native_model_configs(vocab_size: int) -> dict[str, Any]:
    """One small config per natively implemented family, with the features that set each apart
    switched on (Llama 3 rope scaling, sliding windows, LongRoPE, soft-capping, experts)."""
    import transformers as tf

    common = dict(TINY, vocab_size=vocab_size, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    llama3_rope = dict(
        rope_type="llama3",
        factor=8.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=64,
    )
    longrope = dict(
        type="longrope",
        factor=4.0,
        short_factor=[1.0 + 0.1 * i for i in range(8)],
        long_factor=[2.0 + 0.3 * i for i in range(8)],
    )
    return {
        **model_configs(vocab_size),
        "llama3": tf.LlamaConfig(**common, rope_scaling=llama3_rope),
        "qwen3": tf.Qwen3Config(**common, head_dim=16),
        "phi3": tf.Phi3Config(
            **{**common, "max_position_embeddings": 512},
            original_max_position_embeddings=128,
            rope_scaling=longrope,
        ),
        "gemma2": tf.Gemma2Config(
            **common, head_dim=16, sliding_window=8, query_pre_attn_scalar=16
        ),
        "mixtral": tf.MixtralConfig(**common, num_local_experts=4, num_experts_per_tok=2),
        "qwen3_moe": tf.Qwen3MoeConfig(
            **common,
            head_dim=16,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=48,
            norm_topk_prob=True,
            mlp_only_layers=[1],
        ),
    }


def tight_kv_config(pipe: Any, session_len: int, block_size: int, num_blocks: int) -> dict:
    """Engine settings for a KV cache of exactly `num_blocks` blocks of `block_size` tokens,
    sized by the bytes per token of `pipe`'s runner: small enough to force preemption."""
    kv = pipe.engine.kv_spec
    per_token = kv.bytes_per_block // kv.block_size
    return dict(
        session_len=session_len,
        block_size=block_size,
        kv_cache_memory=f"{num_blocks * block_size * per_token}B",
    )


def build_model(
    folder: Path,
    config: Any,
    chat_template: str | None = CHATML_TEMPLATE,
    tokenizer: Any = None,
) -> Path:
    """Save a random-weight model of `config` with a tokenizer: `tokenizer` when given (one
    trained tokenizer can serve many models), else one trained here."""
    import torch
    from transformers import AutoModelForCausalLM

    if tokenizer is None:
        tokenizer = build_tokenizer(folder, config.vocab_size, chat_template)
    else:
        tokenizer.save_pretrained(folder)
    assert len(tokenizer) <= config.vocab_size
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.do_sample = False
    model.save_pretrained(folder)
    return folder


# A chat template that reads content parts, as the templates of transformers' VLMs do.
PARTS_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}"
    "{% for p in m['content'] %}{% if p['type'] == 'image' %}<image>\n"
    "{% else %}{{ p['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
VISION_TINY = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    image_size=56,  # 4x4 patches of 14 pixels: 16 image tokens per LLaVA image
    patch_size=14,
    projection_dim=32,
    initializer_range=0.2,
)


def build_vlm(
    folder: Path,
    family: str = "llava",
    chat_template: str = PARTS_TEMPLATE,
    text_shape: dict[str, Any] | None = None,
    vision_shape: dict[str, Any] | None = None,
) -> Path:
    """A small random-weight LLaVA or LLaVA-NeXT with its processor, saved like a hub model.

    `text_shape` and `vision_shape` replace the tiny Llama and CLIP shapes (the benchmarks)."""
    import torch
    import transformers as tf

    tokenizer = build_tokenizer(folder, 512, chat_template)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    tokenizer.save_pretrained(folder)
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    ids = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)
    text = tf.LlamaConfig(**{**(text_shape or dict(TINY, vocab_size=512)), **ids})
    vision = tf.CLIPVisionConfig(**(vision_shape or VISION_TINY))
    size, patch = vision.image_size, vision.patch_size
    common = dict(image_size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    if family == "llava":
        config = tf.LlavaConfig(vision_config=vision, text_config=text, image_token_index=image_id)
        images = tf.CLIPImageProcessor(**common)
        processor = tf.LlavaProcessor(
            image_processor=images,
            tokenizer=tokenizer,
            patch_size=patch,
            vision_feature_select_strategy="default",
            num_additional_image_tokens=1,
        )
    elif family == "llava_next":
        grid = [[size, size], [size, 2 * size], [2 * size, size], [2 * size, 2 * size]]
        config = tf.LlavaNextConfig(
            vision_config=vision,
            text_config=text,
            image_token_index=image_id,
            image_grid_pinpoints=grid,
        )
        images = tf.LlavaNextImageProcessor(**common, image_grid_pinpoints=grid)
        processor = tf.LlavaNextProcessor(
            image_processor=images,
            tokenizer=tokenizer,
            patch_size=patch,
            vision_feature_select_strategy="default",
            num_additional_image_tokens=1,
        )
    else:
        raise ValueError(f"no test VLM for {family!r}")
    processor.chat_template = chat_template
    torch.manual_seed(0)
    cls = getattr(tf, type(config).__name__.replace("Config", "ForConditionalGeneration"))
    model = cls(config)
    model.generation_config.do_sample = False
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


QWEN_VL_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}"
    "{% for p in m['content'] %}{% if p['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% else %}{{ p['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
QWEN_VL_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]


def build_qwen_vl(folder: Path, family: str = "qwen2_vl") -> Path:
    """A small random-weight Qwen2-VL or Qwen2.5-VL with its image processor and a chat
    template that writes the vision tokens. The model's full processor is not saved: its video
    half needs torchvision."""
    import torch
    import transformers as tf

    tokenizer = build_tokenizer(folder, 512, QWEN_VL_TEMPLATE)
    tokenizer.add_special_tokens({"additional_special_tokens": QWEN_VL_TOKENS})
    tokenizer.save_pretrained(folder)
    ids = dict(zip(QWEN_VL_TOKENS, tokenizer.convert_tokens_to_ids(QWEN_VL_TOKENS)))
    text = dict(
        TINY,
        vocab_size=512,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
    )
    vision = dict(depth=2, num_heads=4, patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
    if family == "qwen2_vl":
        vision.update(embed_dim=32, hidden_size=TINY["hidden_size"], mlp_ratio=2)
        cls = tf.Qwen2VLForConditionalGeneration
        config = tf.Qwen2VLConfig
    elif family == "qwen2_5_vl":
        vision.update(
            hidden_size=32,
            out_hidden_size=TINY["hidden_size"],
            intermediate_size=64,
            window_size=56,
            fullatt_block_indexes=[1],
        )
        cls = tf.Qwen2_5_VLForConditionalGeneration
        config = tf.Qwen2_5_VLConfig
    else:
        raise ValueError(f"no test Qwen VLM for {family!r}")
    config = config(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        architectures=[cls.__name__],
    )
    torch.manual_seed(0)
    model = cls(config)
    model.generation_config.do_sample = False
    model.save_pretrained(folder)
    # 4 to 16 merged tokens per image: 28x28-pixel units, 2x2 patches each.
    tf.Qwen2VLImageProcessor(
        min_pixels=4 * 28 * 28, max_pixels=16 * 28 * 28, patch_size=14, merge_size=2
    ).save_pretrained(folder)
    return folder


# Gemma 3's chat template writes <start_of_image> for an image part; the processor expands it.
GEMMA3_TEMPLATE = PARTS_TEMPLATE.replace("<image>\n", "<start_of_image>")
GEMMA3_IMAGE_TOKENS = {
    "boi_token": "<start_of_image>",
    "eoi_token": "<end_of_image>",
    "image_token": "<image_soft_token>",
}


def build_gemma3_vlm(folder: Path, tokens_per_image: int = 16) -> Path:
    """A small random-weight Gemma 3 VLM (`Gemma3ForConditionalGeneration`) with its real
    processor: a SigLIP tower over 8x8 patches of a 56-pixel image, pooled to
    `tokens_per_image` tokens; a six-layer Gemma 3 text model, five sliding (window 8) to one
    global. Embeddings untied (a random tied model's greedy tokens only repeat the prompt), and
    every constant tensor (Gemma's zero norms, the projector's zero weight, biases) random."""
    import torch
    import transformers as tf

    build_tokenizer(folder, 512, GEMMA3_TEMPLATE)
    tokenizer = tf.AutoTokenizer.from_pretrained(folder, extra_special_tokens=GEMMA3_IMAGE_TOKENS)
    ids = {k: tokenizer.convert_tokens_to_ids(v) for k, v in GEMMA3_IMAGE_TOKENS.items()}
    text = tf.Gemma3TextConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        sliding_window=8,
        query_pre_attn_scalar=16,
        initializer_range=0.2,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    vision = tf.SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=56,
        patch_size=7,
    )
    config = tf.Gemma3Config(
        text_config=text,
        vision_config=vision,
        mm_tokens_per_image=tokens_per_image,
        boi_token_index=ids["boi_token"],
        eoi_token_index=ids["eoi_token"],
        image_token_index=ids["image_token"],
        tie_word_embeddings=False,
        architectures=["Gemma3ForConditionalGeneration"],
    )
    torch.manual_seed(0)
    model = tf.Gemma3ForConditionalGeneration(config)
    _randomize_constant_parameters(model)
    model.generation_config.do_sample = False
    model.save_pretrained(folder)
    # The PIL processor: the default one wants torchvision, and says so when it is missing.
    images = getattr(tf, "Gemma3ImageProcessorPil", tf.Gemma3ImageProcessor)
    images = images(size={"height": 56, "width": 56})
    processor = tf.Gemma3Processor(
        image_processor=images, tokenizer=tokenizer, image_seq_length=tokens_per_image
    )
    processor.chat_template = GEMMA3_TEMPLATE
    processor.save_pretrained(folder)
    return folder


def build_qwen3_5_vl(folder: Path, moe: bool = False) -> Path:
    """A small random-weight Qwen3.5 (or Qwen3.5-MoE) VLM: a Qwen3-VL-style tower (16-pixel
    patches merged 2x2) and the hybrid text model (three Gated DeltaNet layers to one gated
    full-attention layer) with interleaved multimodal rope, saved with its image processor and
    the Qwen-VL chat template (its full processor's video half needs torchvision)."""
    import torch
    import transformers as tf

    tokenizer = build_tokenizer(folder, 512, QWEN_VL_TEMPLATE)
    tokenizer.add_special_tokens({"additional_special_tokens": QWEN_VL_TOKENS})
    tokenizer.save_pretrained(folder)
    ids = dict(zip(QWEN_VL_TOKENS, tokenizer.convert_tokens_to_ids(QWEN_VL_TOKENS)))
    rope = {
        "rope_type": "default",
        "rope_theta": 10000.0,
        "partial_rotary_factor": 0.5,
        "mrope_section": [3, 3, 2],
        "mrope_interleaved": True,
    }
    text = dict(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=512,
        layer_types=["linear_attention", "linear_attention", "full_attention", "linear_attention"],
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        linear_key_head_dim=8,
        linear_value_head_dim=8,
        initializer_range=0.1,
        rope_parameters=rope,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    if moe:
        text.update(
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=48,
        )
    vision = dict(
        depth=2,
        hidden_size=32,
        intermediate_size=64,
        num_heads=4,
        patch_size=16,
        spatial_merge_size=2,
        temporal_patch_size=2,
        out_hidden_size=64,
        num_position_embeddings=64,
    )
    cls = tf.Qwen3_5MoeForConditionalGeneration if moe else tf.Qwen3_5ForConditionalGeneration
    config = (tf.Qwen3_5MoeConfig if moe else tf.Qwen3_5Config)(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        architectures=[cls.__name__],
    )
    torch.manual_seed(0)
    model = cls(config)
    _randomize_constant_parameters(model)
    model.generation_config.do_sample = False
    model.save_pretrained(folder)
    # 4 to 16 merged tokens per image: 32x32-pixel units, 2x2 patches of 16 pixels each.
    tf.Qwen2VLImageProcessor(
        min_pixels=4 * 32 * 32, max_pixels=16 * 32 * 32, patch_size=16, merge_size=2
    ).save_pretrained(folder)
    return folder


def _randomize_constant_parameters(model) -> None:
    """transformers initialises norms to 1 (Gemma's to 0), biases and some projections to 0:
    random values instead, so that a loader dropping or swapping one would show."""
    import torch

    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.numel() > 1 and bool((p == p.flatten()[0]).all()):
                p.add_(0.2 * torch.randn(p.shape, generator=gen))
