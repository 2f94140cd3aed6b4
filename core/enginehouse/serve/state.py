"""What every endpoint shares: the pipeline, the served name, metrics, and request checks."""

from __future__ import annotations

import asyncio
import json
import math
import os
import time
import urllib.parse
import uuid
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from ..chat_template import TemplateKwargsError, check_template_kwargs
from ..config import EngineConfig, GenerationConfig
from ..errors import ParamError, RequestError
from ..image_fetch import FetchPolicy, fetch_failed
from ..multimodal import PreparedPrompt, check_image_count
from ..pipeline import Pipeline
from ..reasoning import Reasoning
from ..response import Response
from ..spec import ModelSpec
from ..tool_calls import ToolError, ToolUse
from .errors import APIError, bad_request
from .generation import Generation, unless_disconnected
from .media import check_file_url, looks_like_an_image, read_file_url
from .metrics import ServerMetrics
from .protocol import ChatCompletionRequest, CompletionRequest
from .store import ResponseStore

GenerationRequest = ChatCompletionRequest | CompletionRequest
T = TypeVar("T")


@dataclass(frozen=True)
class ServerLimits:
    """What one request may ask of the server; the defaults are vLLM's (docs/serving.md)."""

    max_request_body_size: int = 32 * 2**20  # bytes; vLLM's HTTP frontend refuses above 32 MiB
    max_seqs_per_request: int = 1024  # prompts x n; vLLM's VLLM_MAX_COMPLETION_PROMPTS
    engine_iteration_timeout: float = 60.0  # s; vLLM's VLLM_ENGINE_ITERATION_TIMEOUT_S
    max_stop_strings: int = 64  # stop strings per request (vLLM has no limit; OpenAI takes 4)
    max_stop_string_length: int = 256  # characters of one stop string
    media_loading_thread_count: int = 8  # image downloads at once; vLLM's name and default
    max_response_body_size: int = 128 * 2**20  # bytes a response may be, estimated up front
    header_read_timeout: float = 10.0  # s from a connection (or its last answer) to its headers
    body_read_timeout: float = 60.0  # s to read a request's whole body once its headers are in
    max_connections: int = 2048  # open at once; more get a 503 and are closed

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
        self.metrics = ServerMetrics(model_name, pipe.session_len)
        kv = pipe.summary()
        self.metrics.cache_config(
            block_size=kv["kv_tokens"] // max(1, kv["kv_blocks"]),
            cache_dtype=kv["dtype"] if kv["kv_cache_dtype"] == "auto" else kv["kv_cache_dtype"],
            enable_prefix_caching=self.engine_config.enable_prefix_caching,
            gpu_memory_utilization=self.engine_config.kv_cache_memory,
            num_gpu_blocks=kv["kv_blocks"],
        )
        self.created = int(time.time())
        self.session_len: int = pipe.session_len
        self._token_text: dict[int, str] = {}
        self._longest_token = _longest_token(pipe.tokenizer)
        # Image downloads on threads of their own, so that slow ones cannot hold up the
        # threads that render prompts and decode images (data: URLs included) or /metrics.
        self.fetch_pool = ThreadPoolExecutor(
            self.limits.media_loading_thread_count, "enginehouse-fetch"
        )
        self.prepare_pool = ThreadPoolExecutor(
            min(32, (os.cpu_count() or 1) + 4), "enginehouse-prepare"
        )
        self.fetch_policy = FetchPolicy.of(self.engine_config)

    @property
    def engine_config(self) -> EngineConfig:
        return self.pipe.engine.config

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` on a prepare thread: rendering, tokenizing and decoding images take a
        while, and must not hold up the loop that serves every other request and /health."""
        return await asyncio.get_running_loop().run_in_executor(self.prepare_pool, fn, *args)

    @property
    def adapters(self) -> set[str]:
        """The LoRA adapters loaded: each is served as a model of its own name."""
        return self.pipe.engine.adapter_names

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
        """404 for a model name this server does not serve (an omitted name means ours; a
        LoRA adapter's name is a model too)."""
        if model is not None and model != self.model_name and model not in self.adapters:
            served = ", ".join(repr(m) for m in [self.model_name, *sorted(self.adapters)])
            raise APIError(
                404,
                f"the model {model!r} does not exist on this server; it serves "
                f"{served} (see GET /v1/models)",
                "model",
                "model_not_found",
            )

    def check_images(self, messages: list[dict[str, Any]]) -> int:
        """The number of images in `messages`, each image URL checked. Clients send images
        inline or by http(s) URL; a local file only under the folder the server was started
        with (--allowed-local-media-path)."""
        urls = [part["image_url"]["url"] for part in _image_parts(messages)]
        try:
            check_image_count(len(urls), self.engine_config)
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
        if urls and self.pipe.vision is None:  # before anything is fetched for nothing
            raise bad_request(
                f"{self.pipe.spec.architecture} takes text only, but the messages have images; "
                "this server's model reads no image_url parts",
                "messages",
            )
        return len(urls)

    async def fetch_images(self, messages: list[dict[str, Any]]) -> None:
        """Replace each http(s) image in `messages` by its bytes, all fetched at once on the
        fetch threads, each within --image-fetch-timeout and all within
        --image-fetch-total-timeout; a 400 with one message for every failed fetch."""
        policy = self.fetch_policy
        parts = [
            part
            for part in _image_parts(messages)
            if urllib.parse.urlparse(part["image_url"]["url"]).scheme.lower() in ("http", "https")
        ]
        if not parts:
            return
        urls = [part["image_url"]["url"] for part in parts]
        deadline = time.monotonic() + policy.total_timeout
        loop = asyncio.get_running_loop()
        fetches = [loop.run_in_executor(self.fetch_pool, policy.fetch, u, deadline) for u in urls]
        try:
            # The threads stop at the deadline too; this wait ends in time whatever they do.
            images = await asyncio.wait_for(asyncio.gather(*fetches), policy.total_timeout + 1)
        except RequestError as e:
            raise bad_request(str(e), "messages") from e
        except asyncio.TimeoutError:
            raise bad_request(str(fetch_failed(urls[0], policy.timeout)), "messages") from None
        for url, part, data in zip(urls, parts, images):
            if not looks_like_an_image(data):  # said as any failed fetch: no port scanning
                raise bad_request(str(fetch_failed(url, policy.timeout)), "messages")
            part.clear()
            part.update({"type": "image", "image": data})

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

    def check_stop(self, req: GenerationRequest) -> None:
        """Refuse more stop strings, or longer ones, than this server takes."""
        most, longest = self.limits.max_stop_strings, self.limits.max_stop_string_length
        if len(req.stop) > most:
            raise bad_request(
                f"stop has {len(req.stop)} strings; this server takes at most {most} "
                "(--max-stop-strings)",
                "stop",
            )
        for i, word in enumerate(req.stop):
            if len(word) > longest:
                raise bad_request(
                    f"stop[{i}] is {len(word)} characters long; this server takes stop strings "
                    f"of at most {longest} characters (--max-stop-string-length)",
                    "stop",
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
        self._check_length_before_tokenizing(prompt, param, score_only, tools)
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

    def _check_length_before_tokenizing(
        self, prompt: Any, param: str, score_only: bool, tools: ToolUse | None = None
    ) -> None:
        """Refuse a prompt that surely cannot fit before paying for its tokens (28 MB of text
        took 48 s and 4 GB to tokenize; a 20 MB tool description blocked the server for 40 s):
        token ids beyond the context, or more characters than the context's tokens could hold
        were each as long as the vocabulary's longest, counting the tools and tool calls."""
        if isinstance(prompt, dict) and "token_ids" in prompt:
            try:
                self.pipe.engine.check_length(len(prompt["token_ids"]), score_only)
            except RequestError as e:
                raise bad_request(str(e), param) from e
            return
        chars = _text_length(prompt) + (_strings_length(tools.tools) if tools else 0)
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
        model = getattr(req, "model", None)
        if model in self.adapters:  # the request's model is a LoRA adapter
            configs = [c.model_copy(update={"adapter": model}) for c in configs]
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

    def check_response_size(
        self, req: GenerationRequest, prompt_lens: list[int], configs: list[GenerationConfig]
    ) -> None:
        """Refuse, before generating, a request whose response would be larger than
        --max-response-body-size (1024 prompts x 2000 ids with prompt_logprobs: 20 would make
        a 4.4 GB body, and 6-10 KB of peak memory per prompt position to build it)."""
        size = response_size(req, prompt_lens, configs)
        limit = self.limits.max_response_body_size
        if size > limit:
            raise bad_request(
                f"the response to this request could take about {size / 2**20:.0f} MiB, more "
                f"than this server's limit of {limit / 2**20:.0f} MiB "
                "(--max-response-body-size): ask for fewer prompts, choices (n) or tokens "
                "(max_tokens), or fewer logprobs, prompt_logprobs or no echo",
                "prompt_logprobs" if req.prompt_logprobs else None,
            )

    def tool_use(self, req: ChatCompletionRequest) -> ToolUse | None:
        """The request's tools, checked against the model's chat template."""
        try:
            return self.pipe.tool_use(req.tools, req.tool_choice, req.parallel_tool_calls)
        except ToolError as e:
            raise bad_request(str(e), e.param) from e

    async def check_grammar(
        self, request: Request, req: GenerationRequest, config: GenerationConfig
    ) -> None:
        """Compile the output's grammar (in a compile process, cached) so that a schema, regex
        or grammar that does not compile, or not within --grammar-compile-timeout, is a 400
        before anything starts. A client that leaves meanwhile stops waiting, and its compile
        stops unless another request waits for the same grammar."""
        param = req.output_constraint()[1] or "tool_choice"
        try:
            constraint = config.constraint
            if constraint is None:
                return
            compiled = asyncio.wrap_future(self.pipe.engine.compile_grammar(constraint))
            await unless_disconnected(request, compiled)
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
        n = len(choices) // len({id(prompt) for prompt, _ in choices})
        for _, config in choices[::n]:  # once per prompt, as vLLM counts its requests
            self.metrics.request_params(n, 0 if score_only else config.max_new_tokens)
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


# Bytes of JSON, a little more than usual: a token's text with its punctuation, and one
# logprob entry ({"text": -1.2345} in completions, {"token", "logprob", "bytes"} in chat,
# {"id": {"logprob", "rank", "decoded_token"}} in prompt_logprobs).
TOKEN_BYTES = 16
LOGPROB_BYTES = 64
CHOICE_BYTES = 300


def response_size(
    req: GenerationRequest, prompt_lens: list[int], configs: list[GenerationConfig]
) -> int:
    """An estimate of the largest body this request's answer may take, built whole: its
    every choice generating all the tokens it may, with their logprobs, and the prompts it
    echoes or scores. A stream is sent a chunk at a time: its largest chunk counts."""
    n = req.num_choices
    top = req.num_logprobs
    per_token = TOKEN_BYTES + (0 if top is None else (top + 1) * LOGPROB_BYTES)
    echo = isinstance(req, CompletionRequest) and bool(req.echo)
    scored = req.prompt_logprobs
    per_prompt_token = (TOKEN_BYTES + (0 if top is None else (top + 1) * LOGPROB_BYTES)) * echo
    if scored is not None:
        per_prompt_token += (scored + 1) * LOGPROB_BYTES
    chat_once = isinstance(req, ChatCompletionRequest)  # chat scores its prompt once
    sizes = []
    for i, config in enumerate(configs):
        prompt_len = prompt_lens[i // n]
        generated = 0 if getattr(req, "scores_only", False) else config.max_new_tokens
        prompt_part = prompt_len * per_prompt_token
        if chat_once and i > 0:
            prompt_part = 0
        sizes.append((CHOICE_BYTES + prompt_part, generated * per_token))
    if req.stream:  # one chunk at a time: an echoed prompt is the largest
        return max(head for head, _ in sizes)
    return sum(head + tail for head, tail in sizes)


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
    """Characters of a prompt's text: a string, or the text of messages: their text parts and
    every other string they hold (tool calls' arguments, names...), which the template writes
    (it only adds to them), but not images (a data: URL is not text)."""
    if isinstance(prompt, str):
        return len(prompt)
    total = 0
    for message in prompt if isinstance(prompt, list) else []:
        if not isinstance(message, dict):
            continue
        for key, value in message.items():
            if key == "content" and isinstance(value, list):
                total += sum(len(p["text"]) for p in value if isinstance(p.get("text"), str))
            elif key != "role":  # a role may be written otherwise (a special token)
                total += _strings_length(value)
    return total


def _strings_length(value: Any) -> int:
    """Characters of every string in a JSON value, keys left out (a template writes the
    values of tools and tool calls, in some form; not always their keys)."""
    total, stack = 0, [value]
    while stack:  # not recursive: a body may nest deeply
        item = stack.pop()
        if isinstance(item, str):
            total += len(item)
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
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
