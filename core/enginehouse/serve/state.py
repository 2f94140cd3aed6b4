"""What every endpoint shares: the pipeline, the served name, metrics, and request checks."""

from __future__ import annotations

import asyncio
import json
import math
import time
import urllib.parse
import urllib.request
import uuid
from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from ..config import GenerationConfig
from ..errors import RequestError
from ..multimodal import PreparedPrompt
from ..pipeline import Pipeline
from ..response import Response
from ..tool_calls import ToolError, ToolUse
from .errors import APIError, bad_request
from .generation import Generation, unless_disconnected
from .metrics import ServerMetrics
from .protocol import ChatCompletionRequest, CompletionRequest

GenerationRequest = ChatCompletionRequest | CompletionRequest


class ServerState:
    def __init__(
        self, pipe: Pipeline, model_name: str, local_media_path: str | Path | None = None
    ) -> None:
        self.pipe = pipe
        self.model_name = model_name
        # Clients may name image files on this machine only under this folder.
        self.local_media = Path(local_media_path).resolve() if local_media_path else None
        self.metrics = ServerMetrics()
        self.created = int(time.time())
        self.session_len: int = pipe.engine.engine.session_len
        self._token_text: dict[int, str] = {}

    def model_card(self) -> dict[str, Any]:
        return {
            "id": self.model_name,
            "object": "model",
            "created": self.created,
            "owned_by": "enginehouse",
            "root": self.pipe.spec.model_id,
            "max_model_len": self.session_len,
            "backend": self.pipe.backend,
        }

    def check_model(self, model: str | None) -> None:
        """404 for a model name this server does not serve (an omitted name means ours)."""
        if model is not None and model != self.model_name:
            raise APIError(
                404,
                f"the model {model!r} does not exist on this server; it serves "
                f"{self.model_name!r} (see GET /v1/models)",
                "model",
                "model_not_found",
            )

    def check_image_url(self, url: str) -> None:
        """Clients send images inline or by http(s) URL; a local file only under the folder
        the server was started with (--allowed-local-media-path)."""
        scheme = urllib.parse.urlparse(url).scheme.lower()
        if scheme in ("data", "http", "https"):
            return
        if scheme == "file" and self.local_media is not None:
            path = Path(urllib.request.url2pathname(urllib.parse.urlparse(url).path)).resolve()
            if path.is_relative_to(self.local_media):
                return
        raise bad_request(
            f"image URL {url[:60]!r} is not allowed: send the image as a data: URL or an "
            "http(s) URL; file:// URLs are read only under the server's "
            "--allowed-local-media-path",
            "messages",
        )

    def prepare(
        self,
        prompt: Any,
        param: str,
        apply_chat_template: bool = False,
        tools: ToolUse | None = None,
    ) -> PreparedPrompt:
        try:
            prepared = self.pipe.prepare(prompt, apply_chat_template, tools and tools.tools)
        except RequestError as e:
            raise bad_request(str(e), param) from e
        ids = prepared.token_ids
        if len(ids) >= self.session_len:
            raise bad_request(
                f"the prompt has {len(ids)} tokens but this model's context holds "
                f"{self.session_len}, leaving no room to generate; shorten the prompt "
                "(the server's context is set with --session-len)",
                param,
            )
        return prepared

    def configs(self, req: GenerationRequest, prompt_len: int) -> list[GenerationConfig]:
        """One engine config per choice, with max_tokens checked against the context."""
        room = self.session_len - prompt_len
        max_new = req.max_new_tokens
        if max_new is None:
            max_new = room  # OpenAI's chat default: as long as the context allows
        elif max_new > room:
            param = "max_tokens"
            if isinstance(req, ChatCompletionRequest) and req.max_completion_tokens:
                param = "max_completion_tokens"
            raise bad_request(
                f"{param} is {max_new}, but this model's context holds {self.session_len} "
                f"tokens and the prompt takes {prompt_len}, leaving {room}; lower {param} "
                "or shorten the prompt",
                param,
            )
        defaults = self.pipe.spec.generation_config
        return [
            req.generation_config(max_new, req.num_logprobs, defaults, i)
            for i in range(req.num_choices)
        ]

    def tool_use(self, req: ChatCompletionRequest) -> ToolUse | None:
        """The request's tools, checked against the model's chat template."""
        try:
            return self.pipe.tool_use(req.tools, req.tool_choice, req.parallel_tool_calls)
        except ToolError as e:
            raise bad_request(str(e), e.param) from e

    async def check_grammar(self, req: GenerationRequest, config: GenerationConfig) -> None:
        """Compile the output's grammar (off this loop, cached) so that a schema, regex or
        grammar that does not compile is a 400 before anything starts."""
        constraint = config.constraint
        if constraint is None:
            return
        param = req.output_constraint()[1] or "tool_choice"
        try:
            await asyncio.wrap_future(self.pipe.engine.engine.grammars.compile(constraint))
        except RequestError as e:
            raise bad_request(str(e), param) from e

    def start(
        self, prefix: str, choices: list[tuple[PreparedPrompt, GenerationConfig]]
    ) -> tuple[str, Generation]:
        """A response id, and the generation of every choice, started."""
        response_id = f"{prefix}-{uuid.uuid4().hex}"
        generation = Generation(self.pipe, self.metrics, response_id)
        try:
            generation.start(choices)
        except RequestError as e:
            raise bad_request(str(e)) from e
        except RuntimeError as e:  # the engine was closed: the server is shutting down
            raise APIError(503, f"the server is shutting down: {e}") from e
        return response_id, generation

    def token_text(self, token_id: int) -> str:
        """How one token reads on its own (for logprobs), cached: the vocabulary is fixed."""
        text = self._token_text.get(token_id)
        if text is None:
            text = self.pipe.tokenizer.decode([token_id])
            self._token_text[token_id] = text
        return text


def finite(logprob: float) -> float:
    """JSON has no -Infinity; a masked token's logprob is reported as -9999 as vLLM does."""
    return logprob if math.isfinite(logprob) else -9999.0


def usage(prompt_lens: list[int], results: list[Response], n: int) -> dict[str, Any]:
    """OpenAI's usage: each prompt counted once, every choice's generated tokens."""
    prompt_tokens = sum(prompt_lens)
    completion_tokens = sum(r.generate_token_len for r in results)
    cached = sum(results[i * n].cached_tokens for i in range(len(prompt_lens)))
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


def failure(result: Response) -> APIError | None:
    """The error to report for a choice that did not end normally, else None."""
    if result.finish_reason == "error":
        return APIError(500, f"generation failed: {result.error}")
    if result.finish_reason == "abort":
        return APIError(503, "the request was aborted: the server is shutting down")
    return None


def sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


SSE_DONE = "data: [DONE]\n\n"


async def read_json(request: Request) -> Any:
    """The decoded body, whatever Content-Type the client sent (curl -d sends a form type)."""
    body = await request.body()
    if not body.strip():
        raise bad_request("the request body is empty; send a JSON object")
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise bad_request(f"the request body is not valid JSON: {e}") from e
    try:  # JSON may escape half a surrogate pair ("\ud800"), which no tokenizer can encode
        json.dumps(data, ensure_ascii=False).encode()
    except UnicodeEncodeError as e:
        raise bad_request(
            "the request body holds an unpaired surrogate escape (such as \\ud800); "
            "send valid Unicode text"
        ) from e
    return data


async def respond(request: Request, generation: Generation, formatter: Any, choices: int) -> Any:
    """The answer to a chat or text completion: `formatter.events` as an SSE stream, or, once
    every choice is done, `formatter.response` (the first failed choice's error instead)."""
    if formatter.req.stream:
        return StreamingResponse(formatter.events(generation), media_type="text/event-stream")
    results = await unless_disconnected(request, generation.collect(choices))
    for result in results:
        if (error := failure(result)) is not None:
            return error.response()
    return JSONResponse(formatter.response(results))
