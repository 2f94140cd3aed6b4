"""`POST /v1/responses` and `GET /v1/responses/{id}`: OpenAI's Responses API.

The request runs as the chat request it translates into (openai_responses.py); its answer is
written as a Responses object whose `output` holds a `reasoning` item (from the reasoning
parser), a `message` with its `output_text`, and a `function_call` per tool call; or, streamed,
as OpenAI's events (`response.created`, `response.in_progress`, `response.output_item.added`,
`response.content_part.added`, `response.output_text.delta`, `response.reasoning_text.delta`,
`response.function_call_arguments.delta`, their `.done` events, `response.completed` or
`response.incomplete`), each with its `sequence_number`. Stored responses (`store`, the
default) are kept in memory for `previous_response_id` and `GET /v1/responses/{id}`.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request

from ..response import Response
from ..tool_calls import ToolCall
from .chat import ChatRun, start_chat
from .errors import APIError, bad_request
from .generation import Generation
from .openai_responses import ResponsesRequest, as_chat_request, parse_responses, renamed
from .state import ServerState, failure, read_json, respond
from .store import Stored


async def create_response(state: ServerState, request: Request) -> Any:
    req = parse_responses(await read_json(request))
    earlier: list[dict[str, Any]] = []
    if req.previous_response_id is not None:
        previous = state.responses.get(req.previous_response_id)
        if previous is None:
            raise bad_request(
                f"previous_response_id: there is no stored response {req.previous_response_id!r}"
                f" (this server keeps the last {state.responses.capacity} responses stored with "
                "store=true, in memory, until it restarts)",
                "previous_response_id",
            )
        earlier = previous.messages
    chat = as_chat_request(req, earlier)
    try:
        run = await start_chat(state, request, chat, "resp")
    except APIError as e:
        raise renamed(e) from e
    conversation = [m for m in chat.model_dump(exclude_none=True)["messages"]]
    if req.instructions:
        conversation = conversation[1:]  # instructions do not carry over
    formatter = _Responses(state, req, run, conversation)
    return await respond(request, run.generation, formatter, 1)


async def get_response(state: ServerState, response_id: str) -> Any:
    stored = state.responses.get(response_id)
    if stored is None:
        raise APIError(
            404,
            f"there is no stored response {response_id!r} (responses are kept in memory, the "
            f"last {state.responses.capacity}, when created with store=true)",
            "response_id",
        )
    return stored.body


def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


class _Responses:
    """Formats one Responses answer, whole or as OpenAI's stream of events."""

    def __init__(
        self,
        state: ServerState,
        req: ResponsesRequest,
        run: ChatRun,
        conversation: list[dict[str, Any]],
    ) -> None:
        self.state = state
        self.req = req  # `respond` reads req.stream
        self.run = run
        self.id = run.id.replace("resp-", "resp_", 1)
        self.created = int(time.time())
        self.conversation = conversation
        self.sequence = 0
        self.reasoning_id = _new_id("rs")
        self.message_id = _new_id("msg")

    # --- the response object -----------------------------------------------------------------

    def _body(self, status: str, output: list[dict[str, Any]], r: Response | None) -> dict:
        req = self.req
        incomplete = {"reason": "max_output_tokens"} if status == "incomplete" else None
        body = {
            "id": self.id,
            "object": "response",
            "created_at": self.created,
            "status": status,
            "completed_at": int(time.time()) if status in ("completed", "incomplete") else None,
            "error": None,
            "incomplete_details": incomplete,
            "instructions": req.instructions,
            "max_output_tokens": req.max_output_tokens,
            "model": self.state.model_name,
            "output": output,
            "parallel_tool_calls": req.parallel_tool_calls is not False,
            "previous_response_id": req.previous_response_id,
            "reasoning": {"effort": (req.reasoning or {}).get("effort"), "summary": None},
            "store": req.store,
            "temperature": req.temperature,
            "text": req.text or {"format": {"type": "text"}},
            "tool_choice": req.tool_choice or "auto",
            "tools": req.tools or [],
            "top_p": req.top_p,
            "truncation": req.truncation or "disabled",
            "usage": self._usage(r) if r is not None else None,
            "user": req.user,
            "metadata": req.metadata or {},
        }
        return body

    def _usage(self, r: Response) -> dict[str, Any]:
        # The reasoning's tokens, counted again from its text (the engine counts all of them).
        tokenizer = self.state.pipe.tokenizer
        thought = len(tokenizer.encode(r.reasoning, add_special_tokens=False)) if r.reasoning else 0
        prompt = len(self.run.prompt_ids)
        return {
            "input_tokens": prompt,
            "input_tokens_details": {"cached_tokens": r.cached_tokens},
            "output_tokens": r.generate_token_len,
            "output_tokens_details": {"reasoning_tokens": min(thought, r.generate_token_len)},
            "total_tokens": prompt + r.generate_token_len,
        }

    def _reasoning_item(self, text: str, status: str = "completed") -> dict[str, Any]:
        content = [{"type": "reasoning_text", "text": text}] if status == "completed" else []
        return {
            "type": "reasoning",
            "id": self.reasoning_id,
            "summary": [],
            "content": content,
            "status": status,
        }

    def _message_item(self, text: str | None, status: str = "completed") -> dict[str, Any]:
        content = [] if text is None else [_text_part(text)]
        return {
            "type": "message",
            "id": self.message_id,
            "status": status,
            "role": "assistant",
            "content": content,
        }

    @staticmethod
    def _call_item(call: ToolCall, status: str = "completed") -> dict[str, Any]:
        return {
            "type": "function_call",
            "id": "fc_" + call.id.removeprefix("call_"),
            "call_id": call.id,  # call_<hex>, as OpenAI's
            "name": call.name,
            "arguments": call.arguments if status == "completed" else "",
            "status": status,
        }

    def _split(self, r: Response) -> None:
        """The answer's reasoning and tool calls apart from its text, in place."""
        if self.run.reasoning is not None:
            r.reasoning, r.text = self.run.reasoning.split(r.text)
        if self.run.tools is not None:
            r.take_tool_calls(self.run.tools)

    def _output(self, r: Response) -> list[dict[str, Any]]:
        output = []
        if r.reasoning:
            output.append(self._reasoning_item(r.reasoning))
        if r.text or not (r.tool_calls or r.reasoning):
            output.append(self._message_item(r.text, self._item_status(r)))
        output.extend(self._call_item(c) for c in r.tool_calls or [])
        return output

    @staticmethod
    def _item_status(r: Response) -> str:
        return "incomplete" if r.finish_reason == "length" else "completed"

    def _finish(self, r: Response) -> dict[str, Any]:
        """The finished response's body, stored when the request asked for it."""
        status = "incomplete" if r.finish_reason == "length" else "completed"
        body = self._body(status, self._output(r), r)
        if self.req.store:
            answer: dict[str, Any] = {"role": "assistant", "content": r.text}
            if r.reasoning:
                answer["reasoning_content"] = r.reasoning
            if r.tool_calls:
                answer["tool_calls"] = [c.to_openai() for c in r.tool_calls]
            self.state.responses.put(self.id, Stored(body, [*self.conversation, answer]))
        return body

    def response(self, results: list[Response]) -> dict[str, Any]:
        r = results[0]
        self._split(r)
        return self._finish(r)

    # --- the stream ----------------------------------------------------------------------

    def _event(self, kind: str, **data: Any) -> str:
        payload = {"type": kind, "sequence_number": self.sequence, **data}
        self.sequence += 1
        return f"event: {kind}\ndata: {json.dumps(payload, ensure_ascii=False)}\n\n"

    async def events(self, generation: Generation) -> AsyncIterator[str]:
        thought = self.run.reasoning.stream() if self.run.reasoning else None
        calls = self.run.tools.stream() if self.run.tools else None
        result = Response()
        items = _Items(self)
        try:
            yield self._event("response.created", response=self._body("in_progress", [], None))
            yield self._event("response.in_progress", response=self._body("in_progress", [], None))
            async for _, out in generation.outputs():
                delta = Response.from_output(0, out)
                result.extend(delta)
                if (error := failure(delta)) is not None:
                    yield error.sse()
                    return
                text = delta.text
                if thought is not None:
                    reasoning, text = thought.feed(text, out.finished)
                    for event in items.reasoning(reasoning):
                        yield event
                new_calls: list[ToolCall] = []
                if calls is not None:
                    text, new_calls = calls.feed(text, out.finished)
                for event in items.text(text):
                    yield event
                for call in new_calls:
                    for event in items.call(call):
                        yield event
            self._split(result)
            if items.index < 0:  # nothing was written: the answer is one empty message
                for event in items.empty():
                    yield event
            for event in items.close(self._item_status(result)):
                yield event
            body = self._finish(result)
            kind = "response.incomplete" if body["status"] == "incomplete" else "response.completed"
            yield self._event(kind, response=body)
        finally:
            generation.abort()


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


class _Items:
    """The output items of a streamed response, opened and closed in order."""

    def __init__(self, owner: _Responses) -> None:
        self.owner = owner
        self.index = -1
        self.open: str | None = None  # "reasoning" or "message" while one streams
        self.written = ""  # the open item's text so far

    def _start(self, kind: str, item: dict[str, Any]) -> list[str]:
        events = self.close("completed")
        self.index += 1
        self.open, self.written = kind, ""
        events.append(
            self.owner._event("response.output_item.added", output_index=self.index, item=item)
        )
        return events

    def reasoning(self, delta: str) -> list[str]:
        if not delta:
            return []
        events = []
        if self.open != "reasoning":
            item = self.owner._reasoning_item("", "in_progress")
            events += self._start("reasoning", item)
        self.written += delta
        events.append(self._delta("response.reasoning_text.delta", self.owner.reasoning_id, delta))
        return events

    def text(self, delta: str) -> list[str]:
        if not delta:
            return []
        events = []
        if self.open != "message":
            events += self._start("message", self.owner._message_item(None, "in_progress"))
            events.append(
                self.owner._event(
                    "response.content_part.added",
                    item_id=self.owner.message_id,
                    output_index=self.index,
                    content_index=0,
                    part=_text_part(""),
                )
            )
        self.written += delta
        events.append(self._delta("response.output_text.delta", self.owner.message_id, delta))
        return events

    def empty(self) -> list[str]:
        events = self._start("message", self.owner._message_item(None, "in_progress"))
        part = {"item_id": self.owner.message_id, "output_index": self.index, "content_index": 0}
        events.append(self.owner._event("response.content_part.added", part=_text_part(""), **part))
        return events

    def call(self, call: ToolCall) -> list[str]:
        owner = self.owner
        events = self._start("function_call", owner._call_item(call, "in_progress"))
        item_id = "fc_" + call.id.removeprefix("call_")
        events.append(
            self._delta("response.function_call_arguments.delta", item_id, call.arguments)
        )
        events.append(
            owner._event(
                "response.function_call_arguments.done",
                item_id=item_id,
                output_index=self.index,
                name=call.name,
                arguments=call.arguments,
            )
        )
        events.append(
            owner._event(
                "response.output_item.done", output_index=self.index, item=owner._call_item(call)
            )
        )
        self.open = None
        return events

    def _delta(self, kind: str, item_id: str, delta: str) -> str:
        extra = {"content_index": 0} if "call" not in kind else {}
        if kind == "response.output_text.delta":
            extra["logprobs"] = []
        return self.owner._event(
            kind, item_id=item_id, output_index=self.index, delta=delta, **extra
        )

    def close(self, status: str) -> list[str]:
        """Finish the item that is streaming, if any."""
        owner, events = self.owner, []
        if self.open == "reasoning":
            events.append(
                owner._event(
                    "response.reasoning_text.done",
                    item_id=owner.reasoning_id,
                    output_index=self.index,
                    content_index=0,
                    text=self.written,
                )
            )
            item = owner._reasoning_item(self.written)
            events.append(
                owner._event("response.output_item.done", output_index=self.index, item=item)
            )
        elif self.open == "message":
            part = _text_part(self.written)
            common = {"item_id": owner.message_id, "output_index": self.index, "content_index": 0}
            events.append(
                owner._event("response.output_text.done", text=self.written, logprobs=[], **common)
            )
            events.append(owner._event("response.content_part.done", part=part, **common))
            item = owner._message_item(self.written, status)
            events.append(
                owner._event("response.output_item.done", output_index=self.index, item=item)
            )
        self.open = None
        return events
