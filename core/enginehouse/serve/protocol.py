"""Request bodies of the OpenAI API, as pydantic models, and their mapping to `GenerationConfig`.

Unknown fields are rejected (as OpenAI does) rather than silently ignored, and so are known
fields this server cannot honour (deprecated functions...): a request is either served as asked or
refused with a 400 that names the field. A few fields that change nothing about the output
(`user`, `metadata`, `store`, `service_tier`) are accepted and ignored. Extensions named as in
vLLM (`top_k`, `min_p`, `repetition_penalty`, `min_tokens`, `ignore_eos`, `stop_token_ids`,
`skip_special_tokens`) map to the matching `GenerationConfig` fields. Structured output comes
as OpenAI's `response_format`, vLLM's `structured_outputs`, or vLLM's older `guided_*` fields
(see `output_constraint`); tools as OpenAI's `tools` / `tool_choice` (chat only).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..config import GenerationConfig
from ..errors import RequestError, describe_validation_error
from ..multimodal import read_part
from .errors import bad_request, from_validation_error

MAX_N = 128  # choices per request, as OpenAI limits it
OPENAI_PARTS = ("text", "image_url")
MAX_LOGPROBS = 20  # the engine's own limit (GenerationConfig.logprobs)


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Body):
    include_usage: bool = False


class StructuredOutputs(_Body):
    """vLLM's `structured_outputs` (vLLM >= 0.11): one constraint, and flags that only tune it."""

    json_: dict[str, Any] | bool | str | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    structural_tag: dict[str, Any] | str | None = None
    # Accepted: xgrammar is always the backend, JSON is always compact and, where a schema
    # leaves additionalProperties unset, strict.
    disable_fallback: bool | None = None
    disable_any_whitespace: bool | None = None
    disable_additional_properties: bool | None = None
    whitespace_pattern: str | None = None


def _json_value(value: Any, param: str) -> Any:
    """A schema or tag sent either as JSON or as a string of JSON (vLLM takes both)."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except RecursionError:
        raise bad_request(f"{param} is nested too deeply to read", param) from None
    except ValueError as e:
        raise bad_request(f"{param} is a string but not JSON: {e}", param) from e


def _schema_format(schema: Any, param: str) -> dict[str, Any]:
    schema = _json_value(schema, param)
    if not isinstance(schema, (dict, bool)):
        raise bad_request(f"{param} must be a JSON schema (an object)", param)
    return {"type": "json_schema", "json_schema": {"name": "schema", "schema": schema}}


def _structural_tag(tag: Any, param: str) -> dict[str, Any]:
    """xgrammar's structural tag, or vLLM's older {"structures": [...], "triggers": [...]}."""
    tag = _json_value(tag, param)
    if not isinstance(tag, dict):
        raise bad_request(f"{param} must be a structural tag object", param)
    if "structures" in tag:
        structures, triggers = tag["structures"], tag.get("triggers", [])
        if not isinstance(structures, list) or not all(
            isinstance(item, dict)
            and isinstance(item.get("begin", ""), str)
            and isinstance(item.get("end", ""), str)
            and isinstance(item.get("schema", {}), (dict, bool))
            for item in structures
        ):
            raise bad_request(
                f'{param}: structures must be a list of objects {{"begin": "<f>", "schema": '
                '{...}, "end": "</f>"}',
                param,
            )
        if not isinstance(triggers, list) or not all(isinstance(t, str) for t in triggers):
            raise bad_request(f'{param}: triggers must be a list of strings, e.g. ["<f"]', param)
        tags = [
            {
                "type": "tag",
                "begin": item.get("begin", ""),
                "content": {"type": "json_schema", "json_schema": item.get("schema", {})},
                "end": item.get("end", ""),
            }
            for item in structures
        ]
        return {"type": "triggered_tags", "triggers": triggers, "tags": tags}
    return tag.get("format", tag)


class ChatMessage(BaseModel):
    """One message. Extra keys (`name`, `tool_calls`, ...) are kept for the chat template."""

    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    # A string, or OpenAI's list of parts: text, and image_url for a vision-language model.
    content: str | list[dict[str, Any]] | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _parts(cls, v: Any) -> Any:
        if isinstance(v, list):
            for part in v:
                try:  # OpenAI's parts only: images come as URLs, which the server checks
                    read_part(part, OPENAI_PARTS)
                except RequestError as e:
                    raise ValueError(str(e)) from e
                image = part.get("image_url") if part.get("type") == "image_url" else {}
                if not isinstance(image, dict):  # OpenAI's shape only: a URL in an object
                    raise ValueError(
                        "an image_url part is {'type': 'image_url', 'image_url': {'url': "
                        f"'...'}}}}; got image_url as a {type(image).__name__}"
                    )
        return v

    def for_template(self) -> dict[str, Any]:
        """The message as chat templates expect it (`developer` is OpenAI's new `system`)."""
        message = self.model_dump(exclude_none=True)
        message.setdefault("content", "")
        if message["role"] == "developer":
            message["role"] = "system"
        return message


class _GenerationRequest(_Body):
    """Fields the chat and completions endpoints share."""

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    n: int | None = Field(None, ge=1, le=MAX_N)
    stop: list[str] = Field(default_factory=list)
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    logit_bias: dict[str, float] | None = None  # OpenAI's: token id (as text) -> -100..100
    # Accepted and ignored: they do not change the output.
    user: str | None = None
    metadata: dict[str, Any] | None = None
    store: bool | None = None
    service_tier: str | None = None
    # Extensions, named as in vLLM.
    top_k: int | None = Field(None, ge=-1, description="-1 or 0 keeps every token")
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(None, gt=0.0)
    min_tokens: int | None = Field(None, ge=0)
    ignore_eos: bool | None = None
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool | None = None
    prompt_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    # Plugins' logits processors by name, and vLLM's extra args that processors read (a
    # "logits_processors" list inside vllm_xargs names processors too).
    logits_processors: list[str] | None = None
    vllm_xargs: dict[str, Any] | None = None
    # Structured output: OpenAI's response_format, vLLM's structured_outputs, and the guided_*
    # fields vLLM had before 0.12 (still sent by many clients).
    response_format: dict[str, Any] | None = None
    structured_outputs: StructuredOutputs | None = None
    guided_json: dict[str, Any] | bool | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    guided_decoding_backend: str | None = None  # accepted: the backend is always xgrammar
    guided_whitespace_pattern: str | None = None

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_list(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else [] if v is None else v

    @field_validator("stop")
    @classmethod
    def _no_empty_stop(cls, v: list[str]) -> list[str]:
        if any(not s for s in v):
            raise ValueError("stop strings must not be empty")
        return v

    @property
    def num_choices(self) -> int:
        return self.n or 1

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def num_prompt_logprobs(self) -> int | None:
        """Top-N logprobs per prompt token, when the request wants prompt logprobs."""
        return self.prompt_logprobs

    def check_supported(self) -> None:
        """Refuse what this server cannot do, naming the field."""
        self._token_bias()
        if self.stream_options is not None and not self.stream:
            raise bad_request("stream_options is only allowed with stream=true", "stream_options")
        if self.prompt_logprobs is not None and self.stream:
            raise bad_request(
                "prompt_logprobs are not available with stream=true; ask without streaming",
                "prompt_logprobs",
            )
        so = self.structured_outputs
        for param, value in (
            ("guided_whitespace_pattern", self.guided_whitespace_pattern),
            ("structured_outputs.whitespace_pattern", so and so.whitespace_pattern),
        ):
            if value:
                raise bad_request(f"{param} is not supported: JSON output is always compact", param)
        fields, param = self.output_constraint()
        try:
            GenerationConfig(**fields)
        except ValidationError as e:
            raise bad_request(describe_validation_error(e), param) from e

    def _token_bias(self) -> dict[int, float] | None:
        """logit_bias with its keys as token ids; a 400 naming a key that is not one."""
        if not self.logit_bias:
            return None
        bias = {}
        for key, value in self.logit_bias.items():
            if not key.strip().isdigit():
                raise bad_request(
                    f"logit_bias: the key {key[:40]!r} is not a token id; the keys are token ids "
                    'as strings, e.g. {"50256": -100}',
                    "logit_bias",
                )
            if not -100.0 <= value <= 100.0:
                raise bad_request(
                    f"logit_bias: the bias of token {key} is {value}; biases run from -100 to 100",
                    "logit_bias",
                )
            bias[int(key)] = value
        return bias

    def output_constraint(self) -> tuple[dict[str, Any], str | None]:
        """The `GenerationConfig` fields that constrain the output, and the request field that
        asked for them; at most one may."""
        given: list[tuple[str, dict[str, Any]]] = []
        fmt = self.response_format
        if fmt is not None and fmt.get("type") != "text":
            if fmt.get("type") == "structural_tag":
                fmt = {"type": "structural_tag", "format": _structural_tag(fmt, "response_format")}
            given.append(("response_format", {"response_format": fmt}))
        so = self.structured_outputs or StructuredOutputs()
        for param, value, field in (
            ("guided_json", self.guided_json, "json"),
            ("guided_regex", self.guided_regex, "regex"),
            ("guided_choice", self.guided_choice, "choice"),
            ("guided_grammar", self.guided_grammar, "grammar"),
            ("structured_outputs.json", so.json_, "json"),
            ("structured_outputs.regex", so.regex, "regex"),
            ("structured_outputs.choice", so.choice, "choice"),
            ("structured_outputs.grammar", so.grammar, "grammar"),
            ("structured_outputs.json_object", so.json_object or None, "json_object"),
            ("structured_outputs.structural_tag", so.structural_tag, "structural_tag"),
        ):
            if value is None:
                continue
            if field == "json":
                given.append((param, {"response_format": _schema_format(value, param)}))
            elif field == "json_object":
                given.append((param, {"response_format": {"type": "json_object"}}))
            elif field == "structural_tag":
                given.append((param, {"structural_tag": _structural_tag(value, param)}))
            else:
                given.append((param, {field: value}))
        if len(given) > 1:
            names = " and ".join(param for param, _ in given)
            raise bad_request(f"give at most one output constraint; got {names}", given[1][0])
        return (given[0][1], given[0][0]) if given else ({}, None)

    def generation_config(
        self,
        max_new_tokens: int,
        logprobs: int | None,
        model_defaults: Mapping[str, Any],
        choice: int = 0,
    ) -> GenerationConfig:
        """The engine's settings for choice number `choice` of this request.

        Like OpenAI's API, the server samples unless the temperature is 0; unset fields take
        the model's generation_config.json values (its `do_sample` is not consulted), then
        OpenAI's defaults. Choice i of a seeded request uses seed + i, so that n > 1 seeded
        choices differ from each other and are each reproducible.
        """
        fields: dict[str, Any] = {
            # max_tokens=0 (echo, scoring a prompt) runs as a score-only request: see `scores`.
            "max_new_tokens": max(max_new_tokens, 1),
            "logprobs": logprobs,
            "prompt_logprobs": self.num_prompt_logprobs,
            "do_sample": self.temperature is None or self.temperature > 0,
            "stop_words": self.stop,
            **self.output_constraint()[0],
        }
        same_names = (
            "temperature",
            "top_p",
            "presence_penalty",
            "frequency_penalty",
            "min_p",
            "repetition_penalty",
            "ignore_eos",
            "stop_token_ids",
            "skip_special_tokens",
            "allowed_token_ids",
            "bad_words",
        )
        fields.update({k: getattr(self, k) for k in same_names if getattr(self, k) is not None})
        if self.top_k is not None:
            fields["top_k"] = max(self.top_k, 0)
        if self.min_tokens:
            if self.min_tokens > max_new_tokens:
                raise bad_request(
                    f"min_tokens ({self.min_tokens}) is larger than the {max_new_tokens} tokens "
                    "this request may generate; lower min_tokens or raise max_tokens",
                    "min_tokens",
                )
            fields["min_new_tokens"] = self.min_tokens
        if self.seed is not None:  # OpenAI's seed is any int64; the engine's is 0 <= s < 2**63
            fields["random_seed"] = (self.seed + choice) % 2**63
        if self.logit_bias:
            fields["logit_bias"] = self._token_bias()
        fields.update(self._processors())
        try:
            return GenerationConfig(**fields).with_model_defaults(model_defaults)
        except ValidationError as e:  # combinations, e.g. min_tokens above max_tokens
            field = str(e.errors()[0]["loc"][0]) if e.errors() and e.errors()[0]["loc"] else None
            raise bad_request(describe_validation_error(e), field) from e

    def _processors(self) -> dict[str, Any]:
        """logits_processors and extra_args from the request's fields and vllm_xargs."""
        xargs = dict(self.vllm_xargs or {})
        names = list(self.logits_processors or [])
        inner = xargs.pop("logits_processors", None)
        if inner is not None:
            if not isinstance(inner, list) or not all(isinstance(n, str) for n in inner):
                raise bad_request(
                    "vllm_xargs.logits_processors must be a list of processor names",
                    "vllm_xargs",
                )
            names += [n for n in inner if n not in names]
        fields: dict[str, Any] = {}
        if names:
            fields["logits_processors"] = names
        if xargs:
            fields["extra_args"] = xargs
        return fields


class ChatCompletionRequest(_GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: list[dict[str, Any]] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    # Reasoning models: the template's variables (vLLM's), OpenAI's effort (templates such as
    # gpt-oss's read it), and whether the answer carries the reasoning (vLLM's).
    chat_template_kwargs: dict[str, Any] | None = None
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high"] | None = None
    include_reasoning: bool = True
    # Known to OpenAI, not supported here: refused unless left at a value that means "off".
    functions: list[Any] | None = None
    function_call: Any = None
    modalities: list[str] | None = None

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def template_kwargs(self, defaults: Mapping[str, Any]) -> dict[str, Any]:
        """The template's variables: the server's defaults, the effort, then the request's."""
        effort = {"reasoning_effort": self.reasoning_effort} if self.reasoning_effort else {}
        return {**defaults, **effort, **(self.chat_template_kwargs or {})}

    def check_supported(self) -> None:
        super().check_supported()
        if self.functions or self.function_call not in (None, "none"):
            field = "functions" if self.functions else "function_call"
            raise bad_request(
                f"{field} (OpenAI's deprecated function calling) is not supported; "
                "send tools and tool_choice instead",
                field,
            )
        if self.modalities and self.modalities != ["text"]:
            raise bad_request("this server only produces text", "modalities")
        if self.top_logprobs is not None and not self.logprobs:
            raise bad_request("top_logprobs needs logprobs=true", "top_logprobs")


class CompletionRequest(_GenerationRequest):
    prompt: Any = Field(description="a string, a list of strings, token ids, or lists of ids")
    # OpenAI's default for this endpoint; 0 only with echo (score the prompt, generate nothing).
    max_tokens: int | None = Field(16, ge=0)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool | None = False
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1)

    @field_validator("prompt")
    @classmethod
    def _prompt_shape(cls, v: Any) -> list[str] | list[list[int]]:
        def ids(x: Any) -> bool:
            return isinstance(x, list) and all(type(t) is int for t in x)

        if isinstance(v, str):
            return [v]
        if isinstance(v, list) and v and all(isinstance(p, str) for p in v):
            return v
        if ids(v) and v:
            return [v]
        if isinstance(v, list) and v and all(ids(p) for p in v):
            return v
        raise ValueError(
            "give a string, a list of strings, a list of token ids or a list of such lists "
            "(none of them empty)"
        )

    @property
    def prompts(self) -> list[str] | list[list[int]]:
        return self.prompt

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_tokens

    @property
    def num_logprobs(self) -> int | None:
        return self.logprobs

    @property
    def num_prompt_logprobs(self) -> int | None:
        # With echo, the prompt's tokens are part of the answer and get logprobs like the rest.
        if self.echo and self.logprobs is not None:
            return max(self.logprobs, self.prompt_logprobs or 0)
        return self.prompt_logprobs

    @property
    def scores_only(self) -> bool:
        """max_tokens=0 with echo: the prompt is scored and nothing is generated."""
        return self.max_tokens == 0

    def check_supported(self) -> None:
        super().check_supported()
        if self.max_tokens == 0 and not self.echo:
            raise bad_request(
                "max_tokens=0 generates nothing; it is only allowed with echo=true (to score "
                "the prompt); ask for at least 1 token",
                "max_tokens",
            )
        if self.suffix:
            raise bad_request("suffix (insertion) is not supported by this server", "suffix")
        if self.best_of is not None and self.best_of != self.num_choices:
            raise bad_request("best_of other than n is not supported by this server", "best_of")


def parse(model: type[_GenerationRequest], body: Any) -> Any:
    """Validate a decoded JSON body; a 400 naming each bad field otherwise."""
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    try:
        request = model.model_validate(body)
    except ValidationError as e:
        raise from_validation_error(e) from e
    request.check_supported()
    return request
