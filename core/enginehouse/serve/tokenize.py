"""vLLM's `POST /tokenize` and `POST /detokenize`: the model's tokenizer over HTTP.

`/tokenize` takes a `prompt` (tokenized as the completions endpoint does) or chat `messages`
(rendered by the chat template as the chat endpoint does, tools and `chat_template_kwargs`
included), and answers `{"count", "max_model_len", "tokens", "token_strs"}`; `/detokenize` takes
`tokens` and answers `{"prompt"}`.
"""

from __future__ import annotations

from typing import Any

from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..chat_template import TemplateKwargsError
from ..errors import RequestError
from ..tool_calls import ToolError
from .errors import bad_request, from_validation_error
from .protocol import ChatMessage
from .state import ServerState, read_json


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None  # default: True for a prompt, False for messages
    add_generation_prompt: bool = True
    return_token_strs: bool = False
    tools: list[dict[str, Any]] | None = None
    chat_template_kwargs: dict[str, Any] | None = None


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    tokens: list[int] = Field(min_length=0)


def _parse(model: type[BaseModel], body: Any) -> Any:
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    try:
        return model.model_validate(body)
    except ValidationError as e:
        raise from_validation_error(e) from e


async def tokenize(state: ServerState, request: Request) -> Any:
    req: TokenizeRequest = _parse(TokenizeRequest, await read_json(request))
    state.check_model(req.model)
    if (req.prompt is None) == (req.messages is None):
        raise bad_request("give either prompt (a text) or messages (a chat), not both", "prompt")
    if req.prompt is not None:
        ids = _encode(state, req.prompt, req.add_special_tokens is not False, "prompt")
    else:
        ids = _chat_ids(state, req)
    tokenizer = state.pipe.tokenizer
    return {
        "count": len(ids),
        "max_model_len": state.session_len,
        "tokens": ids,
        "token_strs": tokenizer.convert_ids_to_tokens(ids) if req.return_token_strs else None,
    }


def _encode(state: ServerState, text: str, special: bool, param: str) -> list[int]:
    state.check_text_length(text, param)
    return state.pipe.tokenizer.encode(text, add_special_tokens=special)


def _chat_ids(state: ServerState, req: TokenizeRequest) -> list[int]:
    """The token ids of messages through the chat template, as the chat endpoint sees them
    (images expanded), or without the generation prompt when asked."""
    pipe = state.pipe
    messages = [m.for_template() for m in req.messages or []]
    kwargs = {**state.default_template_kwargs, **(req.chat_template_kwargs or {})}
    try:
        tools = pipe.tool_use(req.tools, "auto", True) if req.tools else None
    except ToolError as e:
        raise bad_request(str(e), e.param) from e
    if req.add_generation_prompt and not req.add_special_tokens:
        if state.check_images(messages):
            state.read_local_images(messages)
        return state.prepare(
            messages, "messages", True, tools=tools, template_kwargs=kwargs
        ).token_ids
    if state.check_images(messages):
        raise bad_request(
            "messages with images are tokenized only as the chat endpoint sees them: leave "
            "add_generation_prompt and add_special_tokens at their defaults",
            "messages",
        )
    try:
        text = pipe.chat_template.render(
            pipe.tokenizer,
            messages,
            add_generation_prompt=req.add_generation_prompt,
            tools=req.tools,
            template_kwargs=kwargs,
        )
    except TemplateKwargsError as e:
        raise bad_request(str(e), e.param) from e
    except RequestError as e:
        raise bad_request(str(e), "messages") from e
    except Exception as e:  # a template may reject a conversation (roles, order)
        raise bad_request(f"the chat template rejected the messages: {e}", "messages") from e
    return _encode(state, text, bool(req.add_special_tokens), "messages")


async def detokenize(state: ServerState, request: Request) -> Any:
    req: DetokenizeRequest = _parse(DetokenizeRequest, await read_json(request))
    state.check_model(req.model)
    vocab = state.pipe.vocab_size
    bad = next((t for t in req.tokens if not 0 <= t < vocab), None)
    if bad is not None:
        raise bad_request(
            f"tokens: token id {bad} is outside the vocabulary (0..{vocab - 1})", "tokens"
        )
    return {"prompt": state.pipe.tokenizer.decode(req.tokens)}
