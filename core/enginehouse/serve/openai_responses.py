"""OpenAI's Responses API request, translated into a chat request of this server.

`input` (a string, or items: messages, `function_call`, `function_call_output`, `reasoning`),
`instructions`, function `tools`, `text.format` and `reasoning.effort` become the equivalent
chat request, so that it is checked, rendered and run exactly as `/v1/chat/completions` runs it.
With `previous_response_id`, the stored conversation of that response comes first.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import APIError, bad_request, from_validation_error
from .protocol import ChatCompletionRequest, parse

# Fields of a chat request that a Responses request names otherwise, for error messages.
CHAT_TO_RESPONSES = {
    "max_tokens": "max_output_tokens",
    "response_format": "text.format",
    "reasoning_effort": "reasoning.effort",
    "messages": "input",
}


class ResponsesRequest(BaseModel):
    """`POST /v1/responses`. Fields that change nothing here are accepted and ignored."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    previous_response_id: str | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    text: dict[str, Any] | None = None
    reasoning: dict[str, Any] | None = None
    stream: bool = False
    store: bool = True
    # Extensions, as on the chat endpoint (vLLM's names).
    seed: int | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    # Accepted, no effect here.
    metadata: dict[str, Any] | None = None
    user: str | None = None
    service_tier: str | None = None
    truncation: Literal["auto", "disabled"] | None = None
    include: list[str] | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    prompt_cache_retention: str | None = None
    stream_options: dict[str, Any] | None = None


def parse_responses(body: Any) -> ResponsesRequest:
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    try:
        return ResponsesRequest.model_validate(body)
    except ValidationError as e:
        raise from_validation_error(e) from e


def renamed(error: APIError) -> APIError:
    """A chat request's error with the Responses request's name for the field."""
    if error.param is None:
        return error
    head = error.param.split(".")[0]
    param = CHAT_TO_RESPONSES.get(head, error.param)
    if head == "messages":
        param = "input"  # chat messages do not line up with input items
    message = error.message
    for chat, ours in CHAT_TO_RESPONSES.items():
        message = message.replace(f"{chat} is", f"{ours} is").replace(f"{chat}:", f"{ours}:")
    return APIError(error.status, message, param, error.code)


def input_messages(req: ResponsesRequest, earlier: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The conversation as chat messages, after `earlier` (a previous response's): the input
    items in order; `instructions` are not part of it."""
    if isinstance(req.input, str):
        return [{"role": "user", "content": req.input}]
    out: list[dict[str, Any]] = []
    calls = {c["id"] for m in earlier for c in m.get("tool_calls", [])}
    reasoning: list[str] = []  # a reasoning item belongs to the assistant turn after it
    for i, item in enumerate(req.input):
        where = f"input.{i}"
        kind = item.get("type", "message")
        if kind == "message":
            message = _message(item, where)
            if message["role"] == "assistant" and reasoning:
                message["reasoning_content"] = "".join(reasoning)
                reasoning = []
            out.append(message)
        elif kind == "function_call":
            call_id = _text(item, "call_id", where)
            function = {
                "name": _text(item, "name", where),
                "arguments": _text(item, "arguments", where),
            }
            call = {"id": call_id, "type": "function", "function": function}
            calls.add(call_id)
            last = out[-1] if out else None
            if last is None or last["role"] != "assistant":  # else: the same turn's call
                last = {"role": "assistant", "content": ""}
                out.append(last)
            last.setdefault("tool_calls", []).append(call)
            if reasoning:
                last["reasoning_content"] = "".join(reasoning)
                reasoning = []
        elif kind == "function_call_output":
            call_id = _text(item, "call_id", where)
            if call_id not in calls:
                raise bad_request(
                    f"{where}.call_id: {call_id!r} answers no function_call of this input or "
                    "of the previous response; send the function_call item before its output",
                    f"{where}.call_id",
                )
            output = item.get("output")
            if not isinstance(output, str):
                output = json.dumps(output, ensure_ascii=False)
            out.append({"role": "tool", "tool_call_id": call_id, "content": output})
        elif kind == "reasoning":
            parts = item.get("content") or item.get("summary") or []
            reasoning.extend(p.get("text", "") for p in parts if isinstance(p, dict))
        else:
            raise bad_request(
                f"{where}: input items of type {kind!r} are not supported here (message, "
                "function_call, function_call_output, reasoning)",
                where,
            )
    return out


def _text(item: dict[str, Any], key: str, where: str) -> str:
    value = item.get(key)
    if not isinstance(value, str):
        raise bad_request(f"{where}.{key} must be a string", f"{where}.{key}")
    return value


def _message(item: dict[str, Any], where: str) -> dict[str, Any]:
    role = item.get("role")
    if role not in ("user", "assistant", "system", "developer"):
        raise bad_request(
            f"{where}.role must be user, assistant, system or developer", f"{where}.role"
        )
    content = item.get("content")
    if isinstance(content, str):
        return {"role": role, "content": content}
    if not isinstance(content, list):
        raise bad_request(f"{where}.content must be a string or a list of parts", where)
    parts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("input_text", "output_text", "text", "refusal"):
            key = "refusal" if kind == "refusal" else "text"
            parts.append({"type": "text", "text": _text(part, key, f"{where}.content.{j}")})
        elif kind == "input_image":
            url = _text(part, "image_url", f"{where}.content.{j}")
            parts.append({"type": "image_url", "image_url": {"url": url}})
        else:
            raise bad_request(
                f"{where}.content.{j}: parts of type {kind!r} are not supported here "
                "(input_text, input_image, output_text)",
                f"{where}.content.{j}",
            )
    if role != "user":  # only a user's turn may hold images; others are text
        return {"role": role, "content": "".join(p.get("text", "") for p in parts)}
    return {"role": role, "content": parts}


def _tools(req: ResponsesRequest) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    if req.tools:
        tools = []
        for i, tool in enumerate(req.tools):
            if tool.get("type") != "function":
                raise bad_request(
                    f"tools.{i}: only function tools run here, not {tool.get('type')!r} "
                    "(OpenAI's hosted tools)",
                    f"tools.{i}.type",
                )
            function = {k: tool[k] for k in ("name", "description", "parameters") if k in tool}
            tools.append({"type": "function", "function": function})
        fields["tools"] = tools
    choice = req.tool_choice
    if isinstance(choice, dict):
        if choice.get("type") != "function" or not isinstance(choice.get("name"), str):
            raise bad_request(
                "tool_choice must be 'none', 'auto', 'required' or "
                "{'type': 'function', 'name': ...}",
                "tool_choice",
            )
        choice = {"type": "function", "function": {"name": choice["name"]}}
    if choice is not None:
        fields["tool_choice"] = choice
    if req.parallel_tool_calls is not None:
        fields["parallel_tool_calls"] = req.parallel_tool_calls
    return fields


def _text_format(text: dict[str, Any] | None) -> dict[str, Any] | None:
    """`text.format` as a chat `response_format`."""
    if not text:
        return None
    if not isinstance(text, dict) or set(text) - {"format", "verbosity"}:
        raise bad_request("text takes 'format' (and 'verbosity')", "text")
    fmt = text.get("format")
    if fmt is None or fmt.get("type") == "text":
        return None
    if fmt.get("type") == "json_object":
        return {"type": "json_object"}
    if fmt.get("type") == "json_schema" and "schema" in fmt:
        inner = {"name": fmt.get("name", "output"), "schema": fmt["schema"]}
        if "strict" in fmt:
            inner["strict"] = fmt["strict"]
        return {"type": "json_schema", "json_schema": inner}
    raise bad_request(
        "text.format must be {'type': 'text'}, {'type': 'json_object'} or "
        "{'type': 'json_schema', 'name': ..., 'schema': {...}}",
        "text.format",
    )


def as_chat_request(req: ResponsesRequest, earlier: list[dict[str, Any]]) -> ChatCompletionRequest:
    """The chat request a Responses request means (after the `earlier` conversation)."""
    messages = [*earlier, *input_messages(req, earlier)]
    if req.instructions:
        messages.insert(0, {"role": "system", "content": req.instructions})
    body: dict[str, Any] = {"model": req.model, "messages": messages, "stream": req.stream}
    body.update(_tools(req))
    if req.max_output_tokens is not None:
        body["max_tokens"] = req.max_output_tokens
    fmt = _text_format(req.text)
    if fmt is not None:
        body["response_format"] = fmt
    reasoning = req.reasoning or {}
    if not isinstance(reasoning, dict) or set(reasoning) - {
        "effort",
        "summary",
        "generate_summary",
    }:
        raise bad_request("reasoning takes 'effort' and 'summary'", "reasoning")
    if reasoning.get("effort") is not None:
        body["reasoning_effort"] = reasoning["effort"]
    for name in (
        "temperature",
        "top_p",
        "seed",
        "top_k",
        "min_p",
        "repetition_penalty",
        "logit_bias",
        "allowed_token_ids",
        "bad_words",
        "chat_template_kwargs",
    ):
        if getattr(req, name) is not None:
            body[name] = getattr(req, name)
    try:
        return parse(ChatCompletionRequest, body)
    except APIError as e:
        raise renamed(e) from e
