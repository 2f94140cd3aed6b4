"""Anthropic's Messages API, translated into a chat request of this server.

A Messages request (`system`, messages of content blocks, `tools`, `tool_choice`, `thinking`,
`stop_sequences`, ...) becomes the equivalent OpenAI chat request, so that it is checked,
rendered through the chat template and run exactly as `/v1/chat/completions` runs it. Content
blocks map to what chat templates read: `tool_use` blocks to an assistant message's
`tool_calls`, `tool_result` blocks to `tool` messages, `thinking` blocks to the assistant's
`reasoning_content`, images to `image_url` parts.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import APIError, bad_request, from_validation_error
from .protocol import ChatCompletionRequest, parse

# Fields of a chat request that a Messages request names otherwise, for error messages.
CHAT_TO_MESSAGES = {
    "stop": "stop_sequences",
    "response_format": "output_config.format",
    "reasoning_effort": "output_config.effort",
    "chat_template_kwargs": "thinking",
}
EFFORTS = {"low": "low", "medium": "medium", "high": "high", "xhigh": "high", "max": "high"}


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AnthropicMessage(_Body):
    role: Literal["user", "assistant"]
    content: str | list[dict[str, Any]]


class MessagesRequest(_Body):
    """`POST /v1/messages`. Fields that change nothing here are accepted and ignored."""

    model: str
    max_tokens: int = Field(ge=1)
    messages: list[AnthropicMessage] = Field(min_length=1)
    system: str | list[dict[str, Any]] | None = None
    stop_sequences: list[str] | None = None
    stream: bool = False
    temperature: float | None = Field(None, ge=0.0, le=1.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0)
    tools: list[dict[str, Any]] | None = None
    tool_choice: dict[str, Any] | None = None
    thinking: dict[str, Any] | None = None
    output_config: dict[str, Any] | None = None
    # Extensions, as on the OpenAI endpoints.
    seed: int | None = None
    logit_bias: dict[str, float] | None = None
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    # Accepted, no effect here.
    metadata: dict[str, Any] | None = None
    cache_control: Any = None
    container: Any = None
    context_management: Any = None
    diagnostics: Any = None
    inference_geo: Any = None
    service_tier: Any = None
    speed: Any = None


class CountTokensRequest(_Body):
    """`POST /v1/messages/count_tokens`: the prompt's part of a Messages request."""

    model: str
    messages: list[AnthropicMessage] = Field(min_length=1)
    system: str | list[dict[str, Any]] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: dict[str, Any] | None = None
    thinking: dict[str, Any] | None = None
    output_config: dict[str, Any] | None = None
    cache_control: Any = None
    context_management: Any = None


def parse_messages(model: type[_Body], body: Any) -> Any:
    """Validate a decoded body; a 400 naming the field otherwise."""
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    try:
        return model.model_validate(body)
    except ValidationError as e:
        raise from_validation_error(e) from e


def as_chat_request(req: MessagesRequest | CountTokensRequest, stream: bool = False) -> Any:
    """The chat request a Messages request means; 400s name the Messages request's fields."""
    body: dict[str, Any] = {"model": req.model, "messages": chat_messages(req)}
    body.update(_tools(req))
    body.update(_thinking(req.thinking))
    output = req.output_config or {}
    if not isinstance(output, dict) or set(output) - {"effort", "format"}:
        raise bad_request("output_config takes 'effort' and 'format'", "output_config")
    if output.get("effort") is not None:
        if output["effort"] not in EFFORTS:
            raise bad_request(
                f"output_config.effort must be one of {', '.join(EFFORTS)}", "output_config.effort"
            )
        body["reasoning_effort"] = EFFORTS[output["effort"]]
    if output.get("format") is not None:
        body["response_format"] = _format(output["format"])
    if isinstance(req, MessagesRequest):
        body["max_tokens"] = req.max_tokens
        body["stream"] = stream
        for name in ("temperature", "top_p", "top_k", "seed", "logit_bias", "allowed_token_ids"):
            if getattr(req, name) is not None:
                body[name] = getattr(req, name)
        if req.bad_words is not None:
            body["bad_words"] = req.bad_words
        if req.stop_sequences:
            body["stop"] = req.stop_sequences
    else:
        body["max_tokens"] = 1  # counting only: nothing is generated
    try:
        return parse(ChatCompletionRequest, body)
    except APIError as e:
        raise renamed(e) from e


def renamed(error: APIError) -> APIError:
    """A chat request's error with the Messages request's name for the field."""
    param = error.param
    if param is None:
        return error
    head = param.split(".")[0]
    if head == "messages":  # the chat messages do not line up with the Messages ones
        param = "messages"
    param = CHAT_TO_MESSAGES.get(head, param)
    message = error.message
    for chat, ours in CHAT_TO_MESSAGES.items():
        message = message.replace(f"{chat}:", f"{ours}:")
    return APIError(error.status, message, param, error.code)


def _text_of(blocks: Any, param: str) -> str:
    """The text of a `system` or `tool_result` content: a string, or text blocks."""
    if isinstance(blocks, str):
        return blocks
    texts = []
    for j, block in enumerate(blocks or []):
        if not isinstance(block, dict) or block.get("type") != "text":
            kind = block.get("type") if isinstance(block, dict) else type(block).__name__
            raise bad_request(f"{param}.{j}: only text blocks can go here, not {kind!r}", param)
        texts.append(_string(block, "text", f"{param}.{j}"))
    return "\n".join(texts)


def _string(block: dict[str, Any], key: str, param: str) -> str:
    value = block.get(key)
    if not isinstance(value, str):
        raise bad_request(f"{param}.{key} must be a string", param)
    return value


def _image(block: dict[str, Any], param: str) -> dict[str, Any]:
    """An Anthropic image block as an OpenAI image_url part."""
    source = block.get("source")
    if isinstance(source, dict) and source.get("type") == "base64":
        media = _string(source, "media_type", f"{param}.source")
        data = _string(source, "data", f"{param}.source")
        return {"type": "image_url", "image_url": {"url": f"data:{media};base64,{data}"}}
    if isinstance(source, dict) and source.get("type") == "url":
        url = _string(source, "url", f"{param}.source")
        return {"type": "image_url", "image_url": {"url": url}}
    raise bad_request(f"{param}.source must be a base64 or url image source", param)


def chat_messages(req: MessagesRequest | CountTokensRequest) -> list[dict[str, Any]]:
    """The conversation as chat messages: system first, tool results as `tool` messages."""
    out: list[dict[str, Any]] = []
    if req.system:
        out.append({"role": "system", "content": _text_of(req.system, "system")})
    calls: set[str] = set()  # tool_use ids so far: a tool_result must answer one of them
    for i, message in enumerate(req.messages):
        blocks = message.content
        if isinstance(blocks, str):
            out.append({"role": message.role, "content": blocks})
            continue
        if message.role == "assistant":
            out.append(_assistant(blocks, f"messages.{i}.content", calls))
        else:
            out.extend(_user(blocks, f"messages.{i}.content", calls))
    return out


def _assistant(blocks: list[dict[str, Any]], param: str, calls: set[str]) -> dict[str, Any]:
    text, reasoning, tool_calls = [], [], []
    for j, block in enumerate(blocks):
        kind, where = block.get("type"), f"{param}.{j}"
        if kind == "text":
            text.append(_string(block, "text", where))
        elif kind == "thinking":
            reasoning.append(_string(block, "thinking", where))
        elif kind == "redacted_thinking":
            continue  # nothing a template can show
        elif kind == "tool_use":
            call_id, name = _string(block, "id", where), _string(block, "name", where)
            arguments = block.get("input", {})
            if not isinstance(arguments, dict):
                raise bad_request(f"{where}.input must be an object", where)
            calls.add(call_id)
            function = {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)}
            tool_calls.append({"id": call_id, "type": "function", "function": function})
        else:
            raise bad_request(
                f"{where}: an assistant content block of type {kind!r} is not "
                "supported here (text, thinking, tool_use)",
                where,
            )
    message: dict[str, Any] = {"role": "assistant", "content": "".join(text)}
    if reasoning:
        message["reasoning_content"] = "".join(reasoning)
    if tool_calls:
        message["tool_calls"] = tool_calls
    return message


def _user(blocks: list[dict[str, Any]], param: str, calls: set[str]) -> list[dict[str, Any]]:
    results, parts = [], []
    for j, block in enumerate(blocks):
        kind, where = block.get("type"), f"{param}.{j}"
        if kind == "text":
            parts.append({"type": "text", "text": _string(block, "text", where)})
        elif kind == "image":
            parts.append(_image(block, where))
        elif kind == "tool_result":
            call_id = _string(block, "tool_use_id", where)
            if call_id not in calls:
                raise bad_request(
                    f"{where}.tool_use_id: {call_id!r} answers no tool_use block of an earlier "
                    "assistant message; send the assistant's tool_use blocks before their results",
                    f"{where}.tool_use_id",
                )
            content = _text_of(block.get("content", ""), f"{where}.content")
            results.append({"role": "tool", "tool_call_id": call_id, "content": content})
        else:
            raise bad_request(
                f"{where}: a user content block of type {kind!r} is not supported "
                "here (text, image, tool_result)",
                where,
            )
    # Tool results answer the previous turn's calls, so they come first, as tool messages.
    return results + ([{"role": "user", "content": parts}] if parts else [])


def _tools(req: MessagesRequest | CountTokensRequest) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    if req.tools:
        tools = []
        for i, tool in enumerate(req.tools):
            if tool.get("type", "custom") != "custom":
                raise bad_request(
                    f"tools.{i}: Anthropic's server tools ({tool.get('type')!r}) do not run "
                    "here; give client tools: {'name', 'description', 'input_schema'}",
                    f"tools.{i}.type",
                )
            function = {"name": tool.get("name"), "parameters": tool.get("input_schema")}
            if tool.get("description"):
                function["description"] = tool["description"]
            tools.append({"type": "function", "function": function})
        fields["tools"] = tools
    choice = req.tool_choice
    if choice is not None:
        kind = choice.get("type")
        mapped = {"auto": "auto", "any": "required", "none": "none"}.get(kind)
        if kind == "tool":
            mapped = {"type": "function", "function": {"name": choice.get("name")}}
        if mapped is None:
            raise bad_request(
                "tool_choice must be {'type': 'auto'}, {'type': 'any'}, {'type': 'none'} or "
                "{'type': 'tool', 'name': ...}",
                "tool_choice",
            )
        fields["tool_choice"] = mapped
        if choice.get("disable_parallel_tool_use"):
            fields["parallel_tool_calls"] = False
    return fields


def _thinking(thinking: dict[str, Any] | None) -> dict[str, Any]:
    """`thinking` as the template variables that switch it (Qwen3's and GLM's
    `enable_thinking`, DeepSeek-V3.1's `thinking`); "adaptive" leaves the template's default."""
    if thinking is None:
        return {}
    kind = thinking.get("type") if isinstance(thinking, dict) else None
    if kind not in ("enabled", "disabled", "adaptive"):
        raise bad_request(
            "thinking must be {'type': 'enabled', 'budget_tokens': N}, {'type': 'disabled'} or "
            "{'type': 'adaptive'}",
            "thinking",
        )
    if kind == "adaptive":
        return {}
    on = kind == "enabled"
    return {"chat_template_kwargs": {"enable_thinking": on, "thinking": on}}


def _format(fmt: Any) -> dict[str, Any]:
    if not isinstance(fmt, dict) or fmt.get("type") != "json_schema" or "schema" not in fmt:
        raise bad_request(
            "output_config.format must be {'type': 'json_schema', 'schema': {...}}",
            "output_config.format",
        )
    return {"type": "json_schema", "json_schema": {"name": "output", "schema": fmt["schema"]}}
