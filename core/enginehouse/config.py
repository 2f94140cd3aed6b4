"""User-facing settings: how to generate (`GenerationConfig`) and how to run (`EngineConfig`)."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .speculative_config import SpeculativeConfig

if TYPE_CHECKING:
    from .engine.grammar import Constraint

RESPONSE_FORMATS = ("text", "json_object", "json_schema", "structural_tag")
CONSTRAINT_FIELDS = ("response_format", "regex", "choice", "grammar", "structural_tag")

# Fields of generation_config.json that become defaults when the user leaves them unset,
# the way transformers' generate() and vLLM treat a model's own generation settings.
MODEL_DEFAULT_FIELDS = ("do_sample", "temperature", "top_p", "top_k", "min_p", "repetition_penalty")
DEFAULT_IMAGES_PER_PROMPT = 999  # vLLM's default for --limit-mm-per-prompt
DEFAULT_IMAGE_PIXELS = 178_956_970  # vLLM's VLLM_MAX_IMAGE_PIXELS (Pillow's bomb threshold)


class GenerationConfig(BaseModel):
    """How to generate for one request. Unknown or out-of-range fields raise at construction."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    max_new_tokens: int = Field(512, ge=1)
    min_new_tokens: int = Field(0, ge=0)
    do_sample: bool = False
    temperature: float = Field(1.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, description="0 keeps every token")
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(1.0, gt=0.0)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    stop_words: list[str] = Field(default_factory=list)
    stop_token_ids: list[int] = Field(default_factory=list)
    ignore_eos: bool = False
    random_seed: int | None = Field(
        None, ge=0, lt=2**63, description="0 <= seed < 2**63; None draws a fresh seed"
    )
    logprobs: int | None = Field(None, ge=0, le=20, description="top-N logprobs per token")
    prompt_logprobs: int | None = Field(
        None, ge=0, le=20, description="top-N logprobs per prompt token (each prompt token too)"
    )
    skip_special_tokens: bool = True
    # The LoRA adapter to run with (a name given to `pipeline(adapters=...)` or
    # `load_adapter`); None is the base model. `pipe(..., adapter=...)` sets it.
    adapter: str | None = None
    # Which tokens may come at all: OpenAI's logit_bias (token id -> a bias from -100 to 100
    # added to its logit), vLLM's allowed_token_ids (only these) and bad_words (never these
    # words, each with and without a leading space), and transformers' bad_words_ids (never
    # these token sequences; the pipeline turns bad_words into them for the sampler).
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    bad_words_ids: list[list[int]] | None = None
    # Structured output, at most one of these (docs/structured-output.md). response_format is
    # OpenAI's: {"type": "json_object"}, {"type": "json_schema", "json_schema": {"schema": ...}}
    # (or a pydantic model class); grammar is EBNF as xgrammar reads it (GBNF-like).
    response_format: dict[str, Any] | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    structural_tag: dict[str, Any] | None = Field(None, description="xgrammar's `format` object")
    # Plugins' logits processors by name (register_logits_processors), applied where sampling
    # runs to this request's rows; extra_args (vLLM's SamplingParams.extra_args, the server's
    # vllm_xargs) are what the processors read of the request.
    logits_processors: list[str] | None = None
    extra_args: dict[str, Any] | None = None

    @field_validator("response_format", mode="before")
    @classmethod
    def _model_class_as_schema(cls, v: Any) -> Any:
        if isinstance(v, type) and issubclass(v, BaseModel):
            schema = {"name": v.__name__, "schema": v.model_json_schema()}
            return {"type": "json_schema", "json_schema": schema}
        return v

    @field_validator("response_format")
    @classmethod
    def _known_format(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        if v is None:
            return v
        kind = v.get("type")
        if kind not in RESPONSE_FORMATS:
            raise ValueError(
                f"response_format type {kind!r} is unknown; "
                f"use one of {', '.join(RESPONSE_FORMATS)}"
            )
        if kind == "json_schema":
            inner = v.get("json_schema")
            if not isinstance(inner, Mapping) or not isinstance(inner.get("schema"), (dict, bool)):
                raise ValueError(
                    "a json_schema response_format needs the schema as "
                    "{'type': 'json_schema', 'json_schema': {'name': ..., 'schema': {...}}}"
                )
        if kind == "structural_tag" and not isinstance(v.get("format"), Mapping):
            raise ValueError("a structural_tag response_format needs its 'format' object")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _biases(cls, v: dict[int, float] | None) -> dict[int, float] | None:
        for token, bias in (v or {}).items():
            if token < 0:
                raise ValueError(f"logit_bias: {token} is not a token id (ids are 0 or more)")
            if not -100.0 <= bias <= 100.0:
                raise ValueError(
                    f"logit_bias: the bias of token {token} is {bias}, not in -100..100"
                )
        return v

    @field_validator("allowed_token_ids")
    @classmethod
    def _allowed(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and not v:
            raise ValueError("allowed_token_ids must not be empty (no token could be generated)")
        bad = [t for t in v or [] if t < 0]
        if bad:
            raise ValueError(f"allowed_token_ids: {bad[0]} is not a token id (ids are 0 or more)")
        return v

    @field_validator("bad_words")
    @classmethod
    def _bad_words(cls, v: list[str] | None) -> list[str] | None:
        if any(not w.strip() for w in v or []):
            raise ValueError("bad_words must not contain an empty word")
        return v

    @field_validator("bad_words_ids")
    @classmethod
    def _bad_words_ids(cls, v: list[list[int]] | None) -> list[list[int]] | None:
        for word in v or []:
            if not word or any(t < 0 for t in word):
                raise ValueError("bad_words_ids must be non-empty lists of token ids (0 or more)")
        return v

    def token_ids_used(self) -> list[tuple[str, int]]:
        """(field, token id) of every id this config names, to check against a vocabulary."""
        found = [("stop_token_ids", t) for t in self.stop_token_ids]
        found += [("logit_bias", t) for t in self.logit_bias or {}]
        found += [("allowed_token_ids", t) for t in self.allowed_token_ids or []]
        found += [("bad_words_ids", t) for word in self.bad_words_ids or [] for t in word]
        return found

    @field_validator("choice")
    @classmethod
    def _choices(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and (not v or any(not c for c in v)):
            raise ValueError("choice must be a non-empty list of non-empty strings")
        return v

    @field_validator("stop_words", mode="before")
    @classmethod
    def _one_stop_word(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    @field_validator("stop_words")
    @classmethod
    def _no_empty_stop_word(cls, v: list[str]) -> list[str]:
        if any(not w for w in v):
            raise ValueError("stop_words must not contain an empty string")
        return v

    @model_validator(mode="after")
    def _min_within_max(self) -> GenerationConfig:
        if self.min_new_tokens > self.max_new_tokens:
            raise ValueError(
                f"min_new_tokens ({self.min_new_tokens}) is larger than max_new_tokens "
                f"({self.max_new_tokens}); lower it or raise max_new_tokens"
            )
        return self

    @model_validator(mode="after")
    def _one_constraint(self) -> GenerationConfig:
        given = [f for f in CONSTRAINT_FIELDS if getattr(self, f) is not None]
        if self.response_format is not None and self.response_format["type"] == "text":
            given.remove("response_format")
        if len(given) > 1:
            raise ValueError(f"give at most one output constraint; got {' and '.join(given)}")
        return self

    @property
    def constraint(self) -> Constraint | None:
        """What the output must match (engine/grammar.py), or None for free text."""
        from .engine.grammar import Constraint

        fmt = self.response_format
        if fmt is not None and fmt["type"] == "json_object":
            return Constraint.json_schema({"type": "object"})
        if fmt is not None and fmt["type"] == "json_schema":
            return Constraint.json_schema(fmt["json_schema"]["schema"])
        if fmt is not None and fmt["type"] == "structural_tag":
            return Constraint.structural_tag(fmt["format"])
        if self.regex is not None:
            return Constraint("regex", self.regex)
        if self.choice is not None:
            return Constraint.choice(self.choice)
        if self.grammar is not None:
            return Constraint("grammar", self.grammar)
        if self.structural_tag is not None:
            tag = self.structural_tag  # the format object, or the whole tag around it
            return Constraint.structural_tag(tag.get("format", tag))
        return None

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0.0 or self.top_k == 1

    def with_model_defaults(self, model_defaults: Mapping[str, Any]) -> GenerationConfig:
        """Fill fields the user did not set from the model's generation_config.json."""
        updates = {
            k: model_defaults[k]
            for k in MODEL_DEFAULT_FIELDS
            if k not in self.model_fields_set and model_defaults.get(k) is not None
        }
        if not updates:
            return self
        return GenerationConfig.model_validate({**self.model_dump(exclude_unset=True), **updates})


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_UNITS.update({"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40})


def parse_size(value: str) -> int:
    """'2GiB' -> 2147483648. Decimal (GB) and binary (GiB) units, case-insensitive."""
    match = _SIZE.match(value)
    if not match:
        raise ValueError(f"cannot read {value!r} as a size; write e.g. '2GiB' or '512MB'")
    number, unit = match.groups()
    return int(float(number) * _UNITS[(unit or "B").lower()])


def format_size(n: int | float) -> str:
    """1536 -> '1.5 KiB': a byte count as people read it."""
    size, unit = float(n), "B"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            break
        size /= 1024
    return f"{size:.1f} {unit}"


class EngineConfig(BaseModel):
    """How to run the model: batching, context, KV cache, dtype and device."""

    model_config = ConfigDict(extra="forbid")

    max_batch_size: int = Field(64, ge=1, description="most sequences decoded in one step")
    max_num_batched_tokens: int = Field(
        2048, ge=16, description="token budget of one step; longer prompts prefill in chunks"
    )
    session_len: int | None = Field(None, ge=1, description="context length; default: model's")
    block_size: int | None = Field(None, ge=1, description="KV block size; default: backend's")
    kv_cache_memory: float | int | str = Field(
        0.8, description="fraction (0, 1] of the memory free after loading, or a size like '2GiB'"
    )
    enable_prefix_caching: bool = True
    kv_cache_dtype: Literal["auto", "int8", "fp8"] = Field(
        "auto",
        description="what the KV cache stores: 'auto' (the model's dtype), 'int8' (a scale per "
        "token and head; LMDeploy's quant_policy=8) or 'fp8' (e4m3, a per-tensor scale)",
    )
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    device: str = Field(
        "auto", description="'auto', 'cpu', 'cuda' or 'cuda:N', or a plugin platform's name"
    )
    trust_remote_code: bool = Field(False, description="allow code from the model's repo")
    eager: bool = Field(False, description="GPU: run decode steps eagerly, no CUDA graphs")
    tp: int = Field(1, ge=1, description="tensor parallelism: shard the model over N ranks")
    dp: int = Field(
        1,
        ge=1,
        description="data parallelism: N engine replicas, each in its own process with its "
        "own tp ranks (dp x tp GPUs; CPU replicas split the cores), one front for them all",
    )
    distributed_executor_backend: Literal["mp", "ray"] | None = Field(
        None,
        description="how ranks run: 'mp' (worker processes on this machine, the default at "
        "tp > 1) or 'ray' (one actor per rank on a running Ray cluster)",
    )
    distributed_timeout: float = Field(
        120.0, gt=0, description="seconds a rank may take over one call before it counts as hung"
    )
    quantization: Literal["int8", "int4"] | None = Field(
        None,
        description="quantize a float checkpoint's weights at load: int8 (per output channel) "
        "or int4 (per group); quantized checkpoints are detected without it",
    )
    quantization_group_size: int | None = Field(
        None, description="int4: inputs per scale, 32, 64 or 128 (default 32)"
    )
    allowed_media_domains: list[str] = Field(
        default_factory=list,
        description="domains images may be fetched from over http(s) (default: none)",
    )
    # Structured output's grammar compiles (vLLM: VLLM_XGRAMMAR_CACHE_MB for the cache).
    grammar_compile_timeout: float = Field(
        30.0, gt=0, description="seconds one JSON schema, regex or grammar may take to compile"
    )
    grammar_compile_workers: int = Field(
        2, ge=1, description="grammars compiled at once, each in a process (about 0.3 GB each)"
    )
    grammar_step_timeout: float = Field(
        0.1,
        gt=0,
        description="seconds one request's grammar may take to give its next allowed tokens "
        "(or to take a token); a request whose grammar takes longer ends with an error",
    )
    xgrammar_cache_mb: int = Field(
        512, ge=1, description="MiB of compiled grammars kept, least recently used dropped first"
    )
    allow_private_media_addresses: bool = Field(
        False,
        description="fetch images from hosts that resolve to loopback, private or link-local "
        "addresses too (default: public addresses only)",
    )
    image_fetch_timeout: float = Field(
        5.0, gt=0, description="seconds one image's whole download may take"
    )
    image_fetch_total_timeout: float = Field(
        20.0, gt=0, description="seconds all of one prompt's image downloads may take together"
    )
    max_concurrent_image_decodes: int = Field(
        2, ge=1, description="images decoded at once (each up to 4 bytes per pixel)"
    )
    # Limits on a prompt's images, checked before any image is decoded (vLLM's names and
    # defaults: --limit-mm-per-prompt, and VLLM_MAX_IMAGE_PIXELS, which is per image there).
    limit_mm_per_prompt: dict[str, int] = Field(
        default_factory=lambda: {"image": DEFAULT_IMAGES_PER_PROMPT},
        description="most images one prompt may hold, as JSON: '{\"image\": 16}' (default 999)",
    )
    max_image_pixels_per_prompt: int = Field(
        DEFAULT_IMAGE_PIXELS,
        ge=1,
        description="most pixels (width x height) of a prompt's images together",
    )

    speculative_config: SpeculativeConfig | None = Field(
        None,
        description='speculative decoding, as JSON: \'{"method": "ngram", '
        '"num_speculative_tokens": 3}\' or \'{"method": "draft_model", "model": '
        '"PATH", "num_speculative_tokens": 3}\'',
    )

    @field_validator("speculative_config", mode="before")
    @classmethod
    def _speculative_json(cls, v: Any) -> Any:
        return SpeculativeConfig.parse(v)

    # LoRA adapters (vLLM's names): loaded at start (`pipeline(adapters=...)`,
    # --lora-modules), or later with `load_adapter`.
    lora_modules: dict[str, str] = Field(
        default_factory=dict, description="LoRA adapters to load at start: name -> path or hub id"
    )
    max_loras: int = Field(4, ge=1, description="LoRA adapters resident at once")
    max_lora_rank: int = Field(16, ge=1, description="the highest LoRA rank an adapter may have")

    @field_validator("lora_modules", mode="before")
    @classmethod
    def _lora_pairs(cls, v: Any) -> Any:
        # The command line gives vLLM's name=path pairs (space- or comma-separated, the flag
        # repeated), or vLLM's JSON form '{"name": "sql", "path": "/a"}'.
        if isinstance(v, str):
            v = [v]
        if isinstance(v, (list, tuple)):
            pairs: dict[str, str] = {}
            for item in v:
                text = str(item).strip()
                if text.startswith("{"):
                    entry = json.loads(text)
                    pairs[entry["name"]] = entry["path"]
                    continue
                for pair in re.split(r"[\s,]+", text):
                    name, eq, path = pair.partition("=")
                    if pair and not (eq and name and path):
                        raise ValueError(f"{pair!r} is not name=path")
                    if pair:
                        pairs[name] = path
            return pairs
        return v

    @field_validator("kv_cache_memory")
    @classmethod
    def _check_kv_memory(cls, v: float | int | str) -> float | int:
        if isinstance(v, str):
            return parse_size(v)
        if isinstance(v, float) and not 0.0 < v <= 1.0:
            raise ValueError("a fraction must be in (0, 1]; give a size like '2GiB' otherwise")
        if isinstance(v, bool):
            raise ValueError("give a fraction like 0.8 or a size like '2GiB', not a bool")
        if isinstance(v, int) and v < 2**20:
            hint = "a fraction like 1.0" if v == 1 else "a fraction like 0.8"
            raise ValueError(f"{v} is read as {v} bytes; give {hint} or a size like '2GiB'")
        return v

    @field_validator("quantization_group_size")
    @classmethod
    def _check_group(cls, v: int | None) -> int | None:
        if v is not None and v not in (32, 64, 128):
            raise ValueError(f"{v} is not a group size int4 takes; use 32, 64 or 128")
        return v

    @field_validator("device")
    @classmethod
    def _check_device(cls, v: str) -> str:
        if re.fullmatch(r"auto|cpu|cuda(:\d+)?", v):
            return v  # the built-in platforms: no plugins need loading
        from .platforms import platform_of  # another name: a plugin's platform, or an error

        platform_of(v)
        return v

    @model_validator(mode="after")
    def _budget_fits_batch(self) -> EngineConfig:
        if self.max_num_batched_tokens < self.max_batch_size:
            raise ValueError(
                "max_num_batched_tokens must be at least max_batch_size "
                "(every running sequence needs one token per decode step)"
            )
        return self

    @field_validator("allowed_media_domains", mode="before")
    @classmethod
    def _domain_list(cls, v: Any) -> Any:
        # The command line gives one string: "a.com,b.org".
        if isinstance(v, str):
            return [d.strip().lower() for d in v.split(",") if d.strip()]
        return v

    @field_validator("limit_mm_per_prompt", mode="before")
    @classmethod
    def _mm_limits(cls, v: Any) -> Any:
        # The command line gives JSON ('{"image": 4}') or vLLM's older 'image=4'.
        if isinstance(v, str):
            text = v.strip()
            if text.startswith("{"):
                v = json.loads(text)
            else:
                pairs = [p.partition("=") for p in text.split(",") if p.strip()]
                v = {k.strip(): n.strip() for k, _, n in pairs}
        if isinstance(v, Mapping):
            unknown = sorted(set(v) - {"image"})
            if unknown:
                raise ValueError(f"only 'image' can be limited; got {unknown[0]!r}")
            return {"image": DEFAULT_IMAGES_PER_PROMPT, **v}
        return v

    @field_validator("limit_mm_per_prompt")
    @classmethod
    def _mm_limits_not_negative(cls, v: dict[str, int]) -> dict[str, int]:
        if any(n < 0 for n in v.values()):
            raise ValueError("a limit must be 0 or more")
        return v

    @property
    def max_images_per_prompt(self) -> int:
        return self.limit_mm_per_prompt["image"]

    @property
    def executor(self) -> str | None:
        """Where the ranks run: None in this process (tp=1, the default), else 'mp' or 'ray'.
        `distributed_executor_backend` set at tp=1 runs one rank through that executor."""
        if self.distributed_executor_backend is not None:
            return self.distributed_executor_backend
        return "mp" if self.tp > 1 else None

    @classmethod
    def coerce(cls, value: EngineConfig | Mapping[str, Any] | None) -> EngineConfig:
        if value is None:
            return cls()
        if isinstance(value, EngineConfig):
            return value
        return cls.model_validate(dict(value))


def coerce_generation_config(value: GenerationConfig | Mapping[str, Any] | None):
    if value is None:
        return GenerationConfig()
    if isinstance(value, GenerationConfig):
        return value
    return GenerationConfig.model_validate(dict(value))
