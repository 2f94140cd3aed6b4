"""`POST /v1/messages` and `/v1/messages/count_tokens`: Anthropic's Messages API.

The request runs as the chat request it translates into (anthropic.py); its answer is written
as Anthropic's message: content blocks (`thinking` from the reasoning parser, `text`,
`tool_use`), `stop_reason` (`end_turn`, `max_tokens`, `stop_sequence`, `tool_use`) and usage, or,
streamed, Anthropic's events: `message_start`, `ping`, per block `content_block_start`,
`content_block_delta` and `content_block_stop`, then `message_delta` and `message_stop`.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

from fastapi import Request

from ..reasoning import ReasoningStream
from ..response import Response
from ..tool_calls import ToolCall, ToolCallStream
from .anthropic import (
    CountTokensRequest,
    MessagesRequest,
    as_chat_request,
    parse_messages,
    renamed,
)
from .chat import ChatRun, prepare_chat, start_chat
from .errors import APIError
from .generation import Generation
from .state import ServerState, failure, read_json, respond


async def create_message(state: ServerState, request: Request) -> Any:
    req: MessagesRequest = parse_messages(MessagesRequest, await read_json(request))
    chat = as_chat_request(req, req.stream)
    try:
        run = await start_chat(state, request, chat, "msg")
    except APIError as e:
        raise renamed(e) from e
    return await respond(request, run.generation, _Message(state, req, run), 1)


async def count_tokens(state: ServerState, request: Request) -> Any:
    req: CountTokensRequest = parse_messages(CountTokensRequest, await read_json(request))
    try:
        prompt, _, _ = await prepare_chat(state, as_chat_request(req))
    except APIError as e:
        raise renamed(e) from e
    return {"input_tokens": len(prompt.token_ids)}


def _block_id(call: ToolCall) -> str:
    """Anthropic's `toolu_` id for a call (the same hex as its OpenAI `call_` id)."""
    return "toolu_" + call.id.removeprefix("call_")


def _event(kind: str, **data: Any) -> str:
    return f"event: {kind}\ndata: {json.dumps({'type': kind, **data}, ensure_ascii=False)}\n\n"


class _Message:
    """Formats one Messages answer, whole or as Anthropic's stream of events."""

    def __init__(self, state: ServerState, req: MessagesRequest, run: ChatRun) -> None:
        self.state = state
        self.req = req  # `respond` reads req.stream
        self.run = run
        self.id = run.id.replace("msg-", "msg_", 1)

    def _stop(self, r: Response, raw_text: str, calls: bool) -> tuple[str, str | None]:
        """(stop_reason, stop_sequence) of a finished answer."""
        if calls:
            return "tool_use", None
        if r.finish_reason == "length":
            return "max_tokens", None
        matched = self._stop_sequence(r, raw_text)
        return ("stop_sequence", matched) if matched else ("end_turn", None)

    def _stop_sequence(self, r: Response, raw_text: str) -> str | None:
        """The stop sequence that ended the answer: the engine cuts the text before it, so it
        is what the decoded tokens hold after the text."""
        stops = self.req.stop_sequences or []
        if not stops or not r.token_ids:
            return None
        tail = self.state.decode(r.token_ids)[len(raw_text) :]
        found = [(tail.find(s), s) for s in stops if s in tail]
        return min(found)[1] if found else None

    def _usage(self, r: Response) -> dict[str, Any]:
        return {
            "input_tokens": len(self.run.prompt_ids),
            "output_tokens": r.generate_token_len,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": r.cached_tokens,
        }

    def _head(self, usage: dict[str, Any] | None = None) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": "message",
            "role": "assistant",
            "model": self.state.model_name,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": usage or {"input_tokens": len(self.run.prompt_ids), "output_tokens": 0},
        }

    def response(self, results: list[Response]) -> dict[str, Any]:
        r = results[0]
        raw = r.text
        if self.run.reasoning is not None:
            r.reasoning, r.text = self.run.reasoning.split(r.text)
        if self.run.tools is not None:
            r.take_tool_calls(self.run.tools)
        content: list[dict[str, Any]] = []
        if r.reasoning:
            content.append({"type": "thinking", "thinking": r.reasoning, "signature": ""})
        if r.text or not (r.tool_calls or r.reasoning):
            content.append({"type": "text", "text": r.text})
        for call in r.tool_calls or []:
            content.append(
                {
                    "type": "tool_use",
                    "id": _block_id(call),
                    "name": call.name,
                    "input": json.loads(call.arguments),
                }
            )
        reason, sequence = self._stop(r, raw, bool(r.tool_calls))
        body = self._head(self._usage(r))
        body.update(content=content, stop_reason=reason, stop_sequence=sequence)
        return body

    async def events(self, generation: Generation) -> AsyncIterator[str]:
        blocks = _Blocks()
        thought = self.run.reasoning.stream() if self.run.reasoning else None
        calls = self.run.tools.stream() if self.run.tools else None
        result = Response()
        try:
            yield _event("message_start", message=self._head())
            yield _event("ping")
            async for _, out in generation.outputs():
                delta = Response.from_output(0, out)
                result.extend(delta)
                if (error := failure(delta)) is not None:
                    yield error.sse(anthropic=True)
                    return
                for event in self._deltas(blocks, thought, calls, delta.text, out.finished):
                    yield event
            for event in blocks.close():
                yield event
            reason, sequence = self._stop(result, result.text, bool(calls and calls.calls))
            yield _event(
                "message_delta",
                delta={"stop_reason": reason, "stop_sequence": sequence},
                usage={"output_tokens": result.generate_token_len},
            )
            yield _event("message_stop")
        finally:
            generation.abort()

    def _deltas(
        self,
        blocks: _Blocks,
        thought: ReasoningStream | None,
        calls: ToolCallStream | None,
        text: str,
        final: bool,
    ) -> Iterator[str]:
        """The events for one piece of output: reasoning, then text, then completed calls."""
        if thought is not None:
            reasoning, text = thought.feed(text, final)
            if reasoning:
                yield from blocks.open("thinking", {"thinking": "", "signature": ""})
                yield blocks.delta({"type": "thinking_delta", "thinking": reasoning})
        new_calls: list[ToolCall] = []
        if calls is not None:
            text, new_calls = calls.feed(text, final)
        if text:
            yield from blocks.open("text", {"text": ""})
            yield blocks.delta({"type": "text_delta", "text": text})
        for call in new_calls:
            head = {"id": _block_id(call), "name": call.name, "input": {}}
            yield from blocks.open("tool_use", head, always=True)
            yield blocks.delta({"type": "input_json_delta", "partial_json": call.arguments})


class _Blocks:
    """The content blocks of a streamed message: one open at a time, numbered in order."""

    def __init__(self) -> None:
        self.index = -1
        self.kind: str | None = None

    def open(self, kind: str, fields: dict[str, Any], always: bool = False) -> Iterator[str]:
        """Start a block of `kind` unless one is open already (`always`: a new one anyway)."""
        if self.kind == kind and not always:
            return
        yield from self.close()
        self.index += 1
        self.kind = kind
        yield _event(
            "content_block_start", index=self.index, content_block={"type": kind, **fields}
        )

    def delta(self, delta: dict[str, Any]) -> str:
        return _event("content_block_delta", index=self.index, delta=delta)

    def close(self) -> list[str]:
        if self.kind is None:
            return []
        self.kind = None
        return [_event("content_block_stop", index=self.index)]
