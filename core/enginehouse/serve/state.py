"""What every endpoint shares: the pipeline, the served name, metrics, and request checks."""

from __future__ import annotations

import asyncio
import json
import math
import os
import time
import urllib.parse
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from ..chat_template import TemplateKwargsError, check_template_kwargs
from ..config import GenerationConfig
from ..errors import ParamError, RequestError
from ..multimodal import PreparedPrompt, check_image_count
from ..pipeline import Pipeline
from ..reasoning import Reasoning
from ..response import Response
from ..spec import ModelSpec
from ..tool_calls import ToolError, ToolUse
from .errors import APIError, bad_request
from .generation import Generation, unless_disconnected
from .media import check_file_url, read_file_url
from .metrics import ServerMetrics
from .protocol import ChatCompletionRequest, CompletionRequest
from .store import ResponseStore

GenerationRequest = ChatCompletionRequest | CompletionRequest


@dataclass(frozen=True)
class ServerLimits:
    """What one request may ask of the server; the defaults are vLLM's (docs/serving.md)."""

    max_request_body_size: int = 32 * 2**20  # bytes; vLLM's HTTP frontend refuses above 32 MiB
    max_seqs_per_request: int = 1024  # prompts x n; vLLM's VLLM_MAX_COMPLETION_PROMPTS
    engine_iteration_timeout: float = 60.0  # s; vLLM's VLLM_ENGINE_ITERATION_TIMEOUT_S

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if not value > 0:
                raise ValueError(f"ServerLimits.{name} must be positive; got {value!r}")


def default_model_name(spec: ModelSpec) -> str:
    """A local folder is served under its own name, a hub model under its id: clients never
    see where the model lies on the server's disk."""
    local = Path(spec.model_id).expanduser().resolve() == Path(spec.path).resolve()
    return (Path(spec.path).name or spec.model_id) if local else spec.model_id


class ServerState:
    def __init__(
        self,
        pipe: Pipeline,
        model_name: str,
        local_media_path: str | Path | None = None,
        limits: ServerLimits | None = None,
        default_template_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        self.pipe = pipe
        self.model_name = model_name
        self.limits = limits or ServerLimits()
        # --default-chat-template-kwargs: every chat request's template variables, which the
        # request's own chat_template_kwargs override key by key.
        defaults = check_template_kwargs(default_template_kwargs, pipe.tokenizer)
        self.default_template_kwargs = defaults
        self.responses = ResponseStore()  # /v1/responses kept for previous_response_id
        # Clients may name image files on this machine only under this folder.
        self.local_media = Path(os.path.realpath(local_media_path)) if local_media_path else None
        self.metrics = ServerMetrics(model_name)
        self.created = int(time.time())
        self.session_len: int = pipe.session_len
        self._token_text: dict[int, str] = {}
        self._longest_token = _longest_token(pipe.tokenizer)

    def model_card(self) -> dict[str, Any]:
        return {
            "id": self.model_name,
            "object": "model",
            "created": self.created,
            "owned_by": "enginehouse",
            "root": default_model_name(self.pipe.spec),
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

    def check_images(self, messages: list[dict[str, Any]]) -> int:
        """The number of images in `messages`, each image URL checked. Clients send images
        inline or by http(s) URL; a local file only under the folder the server was started
        with (--allowed-local-media-path)."""
        urls = [part["image_url"]["url"] for part in _image_parts(messages)]
        try:
            check_image_count(len(urls), self.pipe.engine.engine.config)
        except RequestError as e:
            raise bad_request(str(e), "messages") from e
        for url in urls:
            scheme = urllib.parse.urlparse(url).scheme.lower()
            if scheme == "file":
                check_file_url(url, self.local_media)
            elif scheme not in ("data", "http", "https"):
                raise bad_request(
                    f"image URL {url[:60]!r} is not allowed: send the image as a data: URL or "
                    "an http(s) URL; file:// URLs are read only under the server's "
                    "--allowed-local-media-path",
                    "messages",
                )
        return len(urls)

    def read_local_images(self, messages: list[dict[str, Any]]) -> None:
        """Replace each file:// image in `messages` by the file's bytes, read here, once, from
        the path that was checked (blocking: call it off the event loop)."""
        for part in _image_parts(messages):
            url = part["image_url"]["url"]
            if self.local_media is not None and url.lower().startswith("file:"):
                part.clear()
                part.update({"type": "image", "image": read_file_url(url, self.local_media)})

    def check_sequences(self, num_prompts: int, n: int) -> None:
        """Refuse a request that would start more sequences than one request may."""
        cap = self.limits.max_seqs_per_request
        if num_prompts * n > cap:
            raise bad_request(
                f"this request would start {num_prompts * n} sequences ({num_prompts} "
                f"prompt(s) x n={n}); this server starts at most {cap} per request "
                "(--max-seqs-per-request): send fewer prompts per request, or a smaller n",
                "prompt" if num_prompts > 1 else "n",
            )

    def prepare(
        self,
        prompt: Any,
        param: str,
        apply_chat_template: bool = False,
        score_only: bool = False,
        tools: ToolUse | None = None,
        template_kwargs: Mapping[str, Any] | None = None,
    ) -> PreparedPrompt:
        self._check_length_before_tokenizing(prompt, param, score_only)
        tool_list = tools.tools if tools is not None else None
        try:
            prepared = self.pipe.prepare(prompt, apply_chat_template, tool_list, template_kwargs)
            self.pipe.engine.check_length(len(prepared.token_ids), score_only)
        except TemplateKwargsError as e:
            raise bad_request(str(e), e.param) from e
        except RequestError as e:
            raise bad_request(str(e), param) from e
        return prepared

    def check_text_length(self, text: str, param: str) -> None:
        """Refuse a text that surely cannot fit the context, before tokenizing it."""
        self._check_length_before_tokenizing(text, param, False)

    def _check_length_before_tokenizing(self, prompt: Any, param: str, score_only: bool) -> None:
        """Refuse a prompt that surely cannot fit before paying for its tokens (28 MB of text
        took 48 s and 4 GB to tokenize): token ids beyond the context, or more characters than
        the context's tokens could hold were each as long as the vocabulary's longest."""
        if isinstance(prompt, dict) and "token_ids" in prompt:
            try:
                self.pipe.engine.check_length(len(prompt["token_ids"]), score_only)
            except RequestError as e:
                raise bad_request(str(e), param) from e
            return
        chars = _text_length(prompt)
        if self._longest_token is not None and chars > self.session_len * self._longest_token:
            raise bad_request(
                f"the prompt is {chars} characters long, more than this model's context of "
                f"{self.session_len} tokens can hold (its longest token has "
                f"{self._longest_token} characters); shorten the prompt (the server's context "
                "is set with --session-len)",
                param,
            )

    def configs(self, req: GenerationRequest, prompt_len: int) -> list[GenerationConfig]:
        """One engine config per choice, with max_tokens checked against the context."""
        room = self.session_len - prompt_len
        max_new = req.max_new_tokens
        if max_new == 0:
            pass  # scored only (echo with max_tokens=0): nothing to fit
        elif max_new is None:
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
        configs = [
            req.generation_config(max_new, req.num_logprobs, defaults, i)
            for i in range(req.num_choices)
        ]
        try:  # bad_words as token sequences; every token id checked against the vocabulary
            return [self.pipe.token_rules(c) for c in configs]
        except ParamError as e:
            raise bad_request(str(e), e.param) from e

    def template_kwargs(self, req: ChatCompletionRequest) -> dict[str, Any]:
        """A chat request's template variables, checked (400 naming chat_template_kwargs)."""
        try:
            return check_template_kwargs(
                req.template_kwargs(self.default_template_kwargs), self.pipe.tokenizer
            )
        except TemplateKwargsError as e:
            raise bad_request(str(e), e.param) from e

    def reasoning(self, prompt: PreparedPrompt, wanted: bool = True) -> Reasoning | None:
        """How a chat prompt's output divides into reasoning and answer (None without a
        reasoning parser)."""
        return self.pipe.reasoning_for(prompt.token_ids) if wanted else None

    def constrain(
        self,
        req: GenerationRequest,
        configs: list[GenerationConfig],
        tools: ToolUse | None,
        reasoning: Reasoning | None,
    ) -> list[GenerationConfig]:
        """The choices' configs with a forced tool call's grammar, and the output constraint
        moved after the reasoning; a 400 naming the field when either cannot be built."""
        try:
            if tools is not None:
                configs = [tools.generation_config(c) for c in configs]
        except ToolError as e:
            raise bad_request(str(e), e.param) from e
        if reasoning is None:
            return configs
        try:
            return [reasoning.generation_config(c) for c in configs]
        except RequestError as e:
            raise bad_request(str(e), req.output_constraint()[1] or "tool_choice") from e

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
        self,
        prefix: str,
        choices: list[tuple[PreparedPrompt, GenerationConfig]],
        score_only: bool = False,
    ) -> tuple[str, Generation]:
        """A response id, and the generation of every choice, started."""
        response_id = f"{prefix}-{uuid.uuid4().hex}"
        generation = Generation(self.pipe, self.metrics, response_id)
        try:
            generation.start(choices, score_only)
        except RequestError as e:
            raise bad_request(str(e)) from e
        except RuntimeError as e:  # the engine was closed: the server is shutting down
            raise APIError(503, f"the server is shutting down: {e}") from e
        return response_id, generation

    def decode(self, token_ids: list[int]) -> str:
        return self.pipe.tokenizer.decode(token_ids)

    def prompt_logprobs(
        self, r: Response, prompt_ids: list[int], top_n: int
    ) -> list[dict[str, Any] | None]:
        """vLLM's `prompt_logprobs`: per prompt token (the first is None), the token itself and
        the `top_n` most likely, keyed by id, each with its logprob, rank and text."""
        out: list[dict[str, Any] | None] = []
        for entry, rank, token in zip(r.prompt_logprobs or [], r.prompt_ranks or [], prompt_ids):
            if entry is None:
                out.append(None)
                continue
            # The entry holds the top N and the prompt token, which sorts last unless among them.
            top = sorted(entry, key=lambda t: -entry[t])[:top_n]
            ranks = {t: i + 1 for i, t in enumerate(top)} | {token: rank}
            out.append(
                {
                    str(t): {
                        "logprob": finite(entry[t]),
                        "rank": ranks[t],
                        "decoded_token": self.token_text(t),
                    }
                    for t in ranks
                }
            )
        return out

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
        # JSON may escape half a surrogate pair ("\ud800"), which no tokenizer can encode.
        json.dumps(data, ensure_ascii=False).encode()
    except RecursionError:
        raise bad_request("the request body is nested too deeply to read") from None
    except UnicodeEncodeError as e:
        raise bad_request(
            "the request body holds an unpaired surrogate escape (such as \\ud800); "
            "send valid Unicode text"
        ) from e
    except (ValueError, UnicodeDecodeError) as e:
        raise bad_request(f"the request body is not valid JSON: {e}") from e
    return data


def _longest_token(tokenizer: Any) -> int | None:
    """Characters of the vocabulary's longest entry, as the vocabulary writes it (never fewer
    than the text it decodes to: a byte-level entry has a character per byte, a byte fallback
    like <0xE2> six for one), or None when the tokenizer does not list its vocabulary."""
    try:
        return max(map(len, tokenizer.get_vocab()), default=0) or None
    except Exception:
        return None


def _text_length(prompt: Any) -> int:
    """Characters of a prompt's text: a string, or the text of messages (the template only
    adds to it)."""
    if isinstance(prompt, str):
        return len(prompt)
    total = 0
    for message in prompt if isinstance(prompt, list) else []:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            total += len(content)
        elif isinstance(content, list):
            total += sum(len(p["text"]) for p in content if isinstance(p.get("text"), str))
    return total


def _image_parts(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The image_url content parts of template-ready messages, in order."""
    return [
        part
        for m in messages
        if isinstance(m.get("content"), list)
        for part in m["content"]
        if part.get("type") == "image_url"
    ]


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
