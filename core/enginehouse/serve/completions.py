"""`POST /v1/completions`: raw prompts (text or token ids), continued as they are.

Several prompts may come in one request; with `n` choices each, choice `p * n + j` is the j-th
choice of prompt p, as in OpenAI's API. With `echo`, each choice's text (and logprobs) starts
with its prompt's; `echo` with `max_tokens=0` scores the prompt and generates nothing, which is
how loglikelihood evaluations (lm-evaluation-harness) use this endpoint.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request

from ..multimodal import PreparedPrompt
from ..response import Response
from .generation import Generation
from .protocol import CompletionRequest, parse
from .state import SSE_DONE, ServerState, failure, finite, read_json, respond, sse, usage


async def create_completion(state: ServerState, request: Request) -> Any:
    req: CompletionRequest = parse(CompletionRequest, await read_json(request))
    state.check_model(req.model)
    state.check_sequences(len(req.prompts), req.num_choices)
    state.check_stop(req)
    prompts = await state.run(_prepare, state, req)
    choices = [
        (prompt, config)
        for prompt in prompts
        for config in state.configs(req, len(prompt.token_ids))
    ]
    state.check_response_size(req, [len(p.token_ids) for p in prompts], [c for _, c in choices])
    await state.check_grammar(request, req, choices[0][1])
    response_id, generation = state.start("cmpl", choices, req.scores_only)
    completion = _Completion(state, req, response_id, [p.token_ids for p in prompts])
    return await respond(request, generation, completion, len(choices))


def _prepare(state: ServerState, req: CompletionRequest) -> list[PreparedPrompt]:
    return [
        state.prepare(
            p if isinstance(p, str) else {"token_ids": p}, "prompt", False, req.scores_only
        )
        for p in req.prompts
    ]


class _Completion:
    """Formats one text completion, whole or as stream chunks."""

    def __init__(
        self,
        state: ServerState,
        req: CompletionRequest,
        response_id: str,
        prompt_ids: list[list[int]],
    ) -> None:
        self.state = state
        self.req = req
        self.id = response_id
        self.created = int(time.time())
        self.prompt_ids = prompt_ids
        self.prompt_lens = [len(ids) for ids in prompt_ids]
        self._offsets: dict[int, int] = {}  # per choice: characters sent so far (text_offset)
        self._echoed: set[int] = set()  # choices whose prompt has been sent (echo)

    def _logprobs(self, index: int, token_ids: list[int], logprobs: Any) -> Any:
        """OpenAI's legacy shape: parallel lists, and per token a {text: logprob} dict holding
        the top `logprobs` tokens and always the chosen one (None for an echoed prompt's first
        token, which nothing predicts)."""
        if logprobs is None:
            return None
        texts = [self.state.token_text(t) for t in token_ids]
        offsets = []
        for text in texts:
            offsets.append(self._offsets.get(index, 0))
            self._offsets[index] = offsets[-1] + len(text)
        return {
            "tokens": texts,
            "token_logprobs": [
                None if lp is None else finite(lp[t]) for t, lp in zip(token_ids, logprobs)
            ],
            "top_logprobs": [
                None if lp is None else {self.state.token_text(t): finite(v) for t, v in lp.items()}
                for lp in logprobs
            ],
            "text_offset": offsets,
        }

    def _choice(self, r: Response) -> dict[str, Any]:
        """One choice (or a streamed delta of it); an echoing choice's first one starts with
        its prompt's text and tokens."""
        text, token_ids, logprobs = r.text, r.token_ids, r.logprobs
        if self.req.echo and r.index not in self._echoed:
            self._echoed.add(r.index)
            prompt = self.req.prompts[r.index // self.req.num_choices]
            ids = self.prompt_ids[r.index // self.req.num_choices]
            text = (prompt if isinstance(prompt, str) else self.state.decode(ids)) + text
            if self.req.logprobs is not None:
                token_ids = ids + token_ids
                logprobs = (r.prompt_logprobs or [None] * len(ids)) + (logprobs or [])
        choice = {
            "index": r.index,
            "text": text,
            "logprobs": self._logprobs(r.index, token_ids, logprobs),
            "finish_reason": "length"
            if r.finish_reason and self.req.scores_only
            else r.finish_reason,
        }
        if self.req.prompt_logprobs is not None and r.prompt_logprobs is not None:
            ids = self.prompt_ids[r.index // self.req.num_choices]
            choice["prompt_logprobs"] = self.state.prompt_logprobs(r, ids, self.req.prompt_logprobs)
        return choice

    def _body(self, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "text_completion",
            "created": self.created,
            "model": self.state.model_name,
            "choices": choices,
            **extra,
        }

    def response(self, results: list[Response]) -> dict[str, Any]:
        return self._body(
            [self._choice(r) for r in results],
            usage=usage(self.prompt_lens, results, self.req.num_choices),
        )

    async def events(self, generation: Generation) -> AsyncIterator[str]:
        """A chunk per delta (the last one with its finish reason), a usage chunk when asked,
        then `[DONE]`."""
        results = [Response(index=i) for i in range(len(self.prompt_lens) * self.req.num_choices)]
        extra = {"usage": None} if self.req.include_usage else {}
        try:
            async for i, out in generation.outputs():
                delta = Response.from_output(i, out)
                results[i].extend(delta)
                if (error := failure(delta)) is not None:
                    yield error.sse()
                    break
                if delta.text or delta.token_ids or out.finished:  # a chunk per step, as vLLM
                    yield sse(self._body([self._choice(delta)], **extra))
            else:
                if self.req.include_usage:
                    summary = usage(self.prompt_lens, results, self.req.num_choices)
                    yield sse(self._body([], usage=summary))
            yield SSE_DONE
        finally:
            generation.abort()
