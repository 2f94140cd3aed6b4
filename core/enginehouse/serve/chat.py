"""`POST /v1/chat/completions`: messages through the chat template, one answer per choice."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import Request

from ..multimodal import PreparedPrompt
from ..reasoning import Reasoning
from ..response import Response
from ..tool_calls import ToolCall, ToolCallStream, ToolUse
from .generation import Generation
from .protocol import ChatCompletionRequest, parse
from .state import SSE_DONE, ServerState, failure, finite, read_json, respond, sse, usage


async def create_chat_completion(state: ServerState, request: Request) -> Any:
    req: ChatCompletionRequest = parse(ChatCompletionRequest, await read_json(request))
    run = await start_chat(state, request, req, "chatcmpl")
    chat = _Chat(state, req, run.id, run.prompt_ids, run.tools, run.reasoning)
    return await respond(request, run.generation, chat, req.num_choices)


@dataclass
class ChatRun:
    """A chat request started on the engine: what formatting its answer needs."""

    id: str
    generation: Generation
    prompt_ids: list[int]
    tools: ToolUse | None
    reasoning: Reasoning | None


async def prepare_chat(
    state: ServerState, req: ChatCompletionRequest
) -> tuple[PreparedPrompt, ToolUse | None, dict[str, Any]]:
    """A chat request's prompt through the template (rendered, and its images fetched and
    read, off the event loop), its tools checked, and its template variables; a 400 for
    anything wrong."""
    state.check_model(req.model)
    state.check_stop(req)
    tools = state.tool_use(req)
    kwargs = state.template_kwargs(req)
    messages = [m.for_template() for m in req.messages]
    has_images = state.check_images(messages) > 0
    if has_images:
        await state.fetch_images(messages)
    prompt = await state.run(_prepare, state, messages, tools, kwargs, has_images)
    return prompt, tools, kwargs


async def start_chat(
    state: ServerState, request: Request, req: ChatCompletionRequest, prefix: str
) -> ChatRun:
    """Check a chat request, render its prompt and start its choices; every 400 comes before
    anything reaches the engine. The Anthropic and Responses endpoints start theirs here too,
    translated into a chat request."""
    state.check_model(req.model)
    state.check_sequences(1, req.num_choices)
    prompt, tools, _ = await prepare_chat(state, req)
    reasoning = state.reasoning(prompt)
    configs = state.constrain(req, state.configs(req, len(prompt.token_ids)), tools, reasoning)
    state.check_response_size(req, [len(prompt.token_ids)], configs)
    await state.check_grammar(request, req, configs[0])
    response_id, generation = state.start(prefix, [(prompt, c) for c in configs])
    return ChatRun(response_id, generation, prompt.token_ids, tools, reasoning)


def _prepare(
    state: ServerState,
    messages: list[dict[str, Any]],
    tools: ToolUse | None,
    kwargs: dict[str, Any],
    has_images: bool,
) -> PreparedPrompt:
    """The prompt (blocking: call it off the event loop)."""
    if has_images:
        state.read_local_images(messages)
    return state.prepare(messages, "messages", True, tools=tools, template_kwargs=kwargs)


class _Chat:
    """Formats one chat completion, whole or as stream chunks."""

    def __init__(
        self,
        state: ServerState,
        req: ChatCompletionRequest,
        response_id: str,
        prompt_ids: list[int],
        tools: ToolUse | None = None,
        reasoning: Reasoning | None = None,
    ) -> None:
        self.state = state
        self.req = req
        self.id = response_id
        self.created = int(time.time())
        self.prompt_ids = prompt_ids
        self.prompt_len = len(prompt_ids)
        self.tools = tools
        self.reasoning = reasoning

    def _logprobs(self, token_ids: list[int], logprobs: list[dict[int, float]] | None) -> Any:
        if logprobs is None:
            return None
        top_n = self.req.num_logprobs or 0

        def entry(token_id: int, logprob: float) -> dict[str, Any]:
            text = self.state.token_text(token_id)
            return {"token": text, "logprob": finite(logprob), "bytes": list(text.encode())}

        content = []
        for token_id, candidates in zip(token_ids, logprobs):
            top = sorted(candidates.items(), key=lambda kv: -kv[1])[:top_n]
            content.append(
                {
                    **entry(token_id, candidates[token_id]),
                    "top_logprobs": [entry(t, lp) for t, lp in top],
                }
            )
        return {"content": content}

    def _message(self, r: Response) -> dict[str, Any]:
        """The assistant's message: its reasoning apart (vLLM's two names for it), and with
        tools its calls split from its content."""
        message: dict[str, Any] = {"role": "assistant"}
        if self.reasoning is not None:
            r.reasoning, r.text = self.reasoning.split(r.text)
            if self.req.include_reasoning:
                message["reasoning"] = message["reasoning_content"] = r.reasoning
        if self.tools is None:
            return {**message, "content": r.text}
        r.take_tool_calls(self.tools)
        if not r.tool_calls:  # a forced call cut short has no content at all
            return {**message, "content": r.text or None}
        calls = [c.to_openai() for c in r.tool_calls]
        return {**message, "content": r.text or None, "tool_calls": calls}

    def response(self, results: list[Response]) -> dict[str, Any]:
        choices = [
            {
                "index": r.index,
                "message": self._message(r),
                "logprobs": self._logprobs(r.token_ids, r.logprobs),
                "finish_reason": r.finish_reason,
            }
            for r in results
        ]
        body = {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.state.model_name,
            "choices": choices,
            "usage": usage([self.prompt_len], results, self.req.num_choices),
        }
        if self.req.prompt_logprobs is not None:  # vLLM's extension, once for the prompt
            top_n = self.req.prompt_logprobs
            body["prompt_logprobs"] = self.state.prompt_logprobs(results[0], self.prompt_ids, top_n)
        return body

    def _chunk(self, choices: list[dict[str, Any]], **extra: Any) -> str:
        chunk = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.state.model_name,
            "choices": choices,
        }
        if self.req.include_usage:
            chunk["usage"] = None  # as OpenAI: only the last chunk carries usage
        return sse({**chunk, **extra})

    def _tool_chunks(
        self, i: int, stream: ToolCallStream, text: str, final: bool, logprobs: Any
    ) -> list[str]:
        """With tools: the content that is surely not part of a call, then each call that
        completed, as OpenAI streams one: its id and name, then its arguments."""
        done = len(stream.calls)
        content, calls = stream.feed(text, final)
        chunks = []
        if content or logprobs is not None:
            chunks.append(self._chunk([self._choice(i, {"content": content}, logprobs)]))
        for k, call in enumerate(calls, start=done):
            chunks.append(self._chunk([self._choice(i, {"tool_calls": [_call_head(k, call)]})]))
            args = {"index": k, "function": {"arguments": call.arguments}}
            chunks.append(self._chunk([self._choice(i, {"tool_calls": [args]})]))
        return chunks

    def _choice(self, index: int, delta: dict, logprobs: Any = None, finish: Any = None) -> dict:
        return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}

    async def events(self, generation: Generation) -> AsyncIterator[str]:
        """OpenAI's chunk sequence: the role, content deltas, an empty delta with the finish
        reason per choice; then a usage chunk when asked; then `[DONE]`."""
        n = self.req.num_choices
        results = [Response(index=i) for i in range(n)]
        streams = [self.tools.stream() if self.tools else None for _ in range(n)]
        thoughts = [self.reasoning.stream() if self.reasoning else None for _ in range(n)]
        try:
            for i in range(n):
                yield self._chunk([self._choice(i, {"role": "assistant", "content": ""})])
            async for i, out in generation.outputs():
                delta = Response.from_output(i, out)
                results[i].extend(delta)
                if (error := failure(delta)) is not None:
                    yield error.sse()
                    break
                logprobs = self._logprobs(delta.token_ids, delta.logprobs)
                text, thought, sent = delta.text, thoughts[i], False
                if thought is not None:
                    reasoning, text = thought.feed(text, out.finished)
                    if reasoning and self.req.include_reasoning:
                        both = {"reasoning": reasoning, "reasoning_content": reasoning}
                        yield self._chunk([self._choice(i, both, logprobs)])
                        logprobs, sent = None, True  # the step's logprobs went with it
                stream = streams[i]
                if stream is not None:
                    for chunk in self._tool_chunks(i, stream, text, out.finished, logprobs):
                        yield chunk
                # A chunk per step that made tokens, as vLLM does, even when their text is
                # held back (a possible stop string, half a UTF-8 character): clients see
                # progress, and each token's logprobs arrive with it.
                elif text or (delta.token_ids and not sent):
                    yield self._chunk([self._choice(i, {"content": text}, logprobs)])
                if out.finished:
                    finish = out.finish_reason
                    if stream is not None and stream.calls and finish == "stop":
                        finish = "tool_calls"
                    yield self._chunk([self._choice(i, {}, finish=finish)])
            else:
                if self.req.include_usage:
                    yield self._chunk([], usage=usage([self.prompt_len], results, n))
            yield SSE_DONE
        finally:
            generation.abort()


def _call_head(index: int, call: ToolCall) -> dict[str, Any]:
    function = {"name": call.name, "arguments": ""}
    return {"index": index, "id": call.id, "type": "function", "function": function}
