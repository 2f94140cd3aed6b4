"""The FastAPI app: OpenAI-compatible endpoints in front of one `Pipeline`.

`create_app(pipe)` works with whichever backend `pipeline()` chose: the endpoints only use the
pipeline's tokenizer, chat template and engine. Run it with `enginehouse serve MODEL`, with
`run_server`, or under any ASGI server.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .. import __version__
from ..engine.data_parallel import sum_stats
from ..pipeline import Pipeline
from .chat import create_chat_completion
from .completions import create_completion
from .errors import APIError, anthropic_path
from .generation import ClientDisconnected
from .lora import adapter_cards, add_lora_routes
from .messages import count_tokens, create_message
from .metrics import CONTENT_TYPE
from .responses import create_response, get_response
from .state import ServerLimits, ServerState, default_model_name
from .tokenize import detokenize, tokenize

log = logging.getLogger(__name__)

ENDPOINTS = (
    "/health",
    "/version",
    "/metrics",
    "/v1/models",
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/messages",
    "/v1/messages/count_tokens",
    "/v1/responses",
    "/tokenize",
    "/detokenize",
    "/v1/load_lora_adapter",
    "/v1/unload_lora_adapter",
)
# Reachable without the API key: load balancers' probes, and the version (as vLLM has them).
OPEN_ENDPOINTS = ("/health", "/version")


def _endpoint(path: str) -> str:
    """The metrics label for a path; unknown paths share one label to keep the series few."""
    if path in ENDPOINTS:
        return path
    if path.startswith("/v1/responses/"):
        return "/v1/responses/{id}"
    return "/v1/models/{model}" if path.startswith("/v1/models/") else "other"


class BodyTooLarge(Exception):
    """The request body outgrew the server's limit while it was being read."""


class BodyTooSlow(Exception):
    """The request body did not arrive within the server's limit."""


def _too_large(limit: int) -> APIError:
    return APIError(
        413,
        f"the request body is larger than this server's limit of {limit} bytes "
        "(--max-request-body-size); send fewer or smaller prompts or images",
        code="request_too_large",
    )


class _Gate:
    """Pure ASGI middleware: checks the API key first (so a bad key is a 401 whatever the
    body), holds the body to the size limit (a 413, announced or found while reading), and
    counts every answer by endpoint and status code. Pure ASGI rather than `@app.middleware`,
    which would get in the way of streaming and disconnect detection."""

    def __init__(self, app: ASGIApp, state: ServerState, api_key: str | None) -> None:
        self.app = app
        self.state = state
        self.key = api_key.encode() if api_key is not None else None
        self.max_body = state.limits.max_request_body_size
        self.body_timeout = state.limits.body_read_timeout

    def _refusal(self, scope: Scope) -> APIError | None:
        headers = dict(scope["headers"])
        length = headers.get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_body:
            return _too_large(self.max_body)
        if self.key is None or scope["path"] in OPEN_ENDPOINTS:
            return None
        given = headers.get(b"authorization")
        anthropic_key = headers.get(b"x-api-key")  # how Anthropic's clients send it
        if given is None and anthropic_key is None:
            message = (
                "no API key given: send the header 'Authorization: Bearer <key>' "
                "(or 'x-api-key: <key>')"
            )
        else:
            scheme, _, token = (given or b"").partition(b" ")
            # The scheme is case-insensitive (RFC 9110); compare the key in constant time.
            if scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key):
                return None
            if anthropic_key is not None and hmac.compare_digest(anthropic_key.strip(), self.key):
                return None
            message = "incorrect API key provided"
        return APIError(401, message, code="invalid_api_key")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500  # what an exception that escapes every handler turns into
        received = 0
        body_done = False
        deadline: float | None = None  # for the whole body, from the first read of it
        loop = asyncio.get_running_loop()

        async def counting_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        async def limited_receive() -> Message:
            nonlocal received, body_done, deadline
            if body_done:  # from then on, only a disconnect comes: wait for it as long as it takes
                return await receive()
            if deadline is None:
                deadline = loop.time() + self.body_timeout
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                raise BodyTooSlow() from None
            body_done = message["type"] != "http.request" or not message.get("more_body")
            received += len(message.get("body", b""))
            if received > self.max_body:  # a chunked body, or one longer than it announced
                raise BodyTooLarge()
            return message

        try:
            refusal = self._refusal(scope)
            if refusal is not None:
                headers = {"WWW-Authenticate": "Bearer"} if refusal.status == 401 else None
                style = anthropic_path(scope["path"])
                await refusal.response(headers, style)(scope, receive, counting_send)
            else:
                await self.app(scope, limited_receive, counting_send)
        finally:
            self.state.metrics.answered(_endpoint(scope["path"]), status)


def api_key_problem(key: str) -> str | None:
    """Why no client could ever authenticate with `key`, or None when one can."""
    if not key.strip():  # "" must not mean "no authentication"
        return "the API key is empty; give a key, or None to serve without one"
    if key != key.strip() or any(ord(c) < 32 or ord(c) == 127 for c in key):
        return (
            "the API key has whitespace at its start or end, or a control character such as a "
            "newline (a secret file's trailing newline?); HTTP strips those from headers, so "
            "no client could ever send this key: remove them from it"
        )
    return None


def create_app(
    pipe: Pipeline,
    model_name: str | None = None,
    api_key: str | None = None,
    local_media_path: str | None = None,
    limits: ServerLimits | None = None,
    default_chat_template_kwargs: dict[str, Any] | None = None,
    enable_lora_runtime_loading: bool = False,
) -> FastAPI:
    """An app serving `pipe` under `model_name` (default: the model folder's name, or the
    hub id; never a path on the server's disk).

    With `api_key`, every endpoint but `/health` requires `Authorization: Bearer <api_key>`
    (an empty key is an error). Image URLs may name local files (file://) only under
    `local_media_path`. `limits` caps what one request may ask (`ServerLimits`).
    `default_chat_template_kwargs` are every chat request's template variables
    (`{"enable_thinking": False}`), which a request's `chat_template_kwargs` override.
    `enable_lora_runtime_loading` opens `/v1/load_lora_adapter` and `/v1/unload_lora_adapter`.
    The caller keeps ownership of `pipe` and closes it after the server stops.
    """
    if api_key is not None:
        problem = api_key_problem(api_key)
        if problem:
            raise ValueError(problem)
    name = model_name or default_model_name(pipe.spec)
    state = ServerState(pipe, name, local_media_path, limits, default_chat_template_kwargs)
    app = FastAPI(title="enginehouse", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = state
    app.add_middleware(_Gate, state=state, api_key=api_key)

    def styled(request: Request) -> bool:  # Anthropic's error shape on its endpoints
        return anthropic_path(request.url.path)

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> Response:
        return exc.response(anthropic=styled(request))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Response:
        message = f"{request.method} {request.url.path}: {exc.detail}"
        if exc.status_code == 404:
            message = f"there is no endpoint {request.url.path} (see docs/serving.md)"
        return APIError(exc.status_code, message).response(exc.headers, styled(request))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> Response:
        return APIError(400, "the request is invalid").response(anthropic=styled(request))

    @app.exception_handler(ClientDisconnected)
    async def gone(request: Request, exc: ClientDisconnected) -> Response:
        return Response(status_code=499)  # nginx's "client closed request"; nobody reads it

    @app.exception_handler(ClientDisconnect)
    async def gone_while_sending(request: Request, exc: ClientDisconnect) -> Response:
        # Not an error of the server: one line, no traceback.
        log.info("client disconnected while sending %s %s", request.method, request.url.path)
        return Response(status_code=499)

    @app.exception_handler(BodyTooLarge)
    async def too_large(request: Request, exc: BodyTooLarge) -> Response:
        error = _too_large(state.limits.max_request_body_size)
        return error.response(anthropic=styled(request))

    @app.exception_handler(BodyTooSlow)
    async def too_slow(request: Request, exc: BodyTooSlow) -> Response:
        limit = state.limits.body_read_timeout
        return APIError(
            408,
            f"the request body did not arrive within {limit:g} s (--body-read-timeout)",
            code="request_timeout",
        ).response({"Connection": "close"})

    @app.exception_handler(Exception)
    async def crashed(request: Request, exc: Exception) -> Response:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        error = APIError(500, f"internal server error: {type(exc).__name__}: {exc}")
        return error.response(anthropic=styled(request))

    @app.get("/health")
    async def health() -> Any:
        if not pipe.engine.is_running():
            return APIError(503, "the engine has stopped").response()
        stuck, limit = pipe.engine.step_running_for(), state.limits.engine_iteration_timeout
        if stuck > limit:
            return APIError(
                503,
                f"the engine has been in one step for {stuck:.0f} s, more than "
                f"--engine-iteration-timeout ({limit:g} s): it is stuck",
            ).response()
        return {"status": "ok"}

    @app.get("/v1/models")
    async def list_models() -> Any:
        adapters = await asyncio.to_thread(adapter_cards, state)
        return {"object": "list", "data": [state.model_card(), *adapters]}

    @app.get("/v1/models/{model:path}")
    async def get_model(model: str) -> Any:
        state.check_model(model)
        if model in state.adapters:
            cards = await asyncio.to_thread(adapter_cards, state)
            return next(c for c in cards if c["id"] == model)
        return state.model_card()

    add_lora_routes(app, state, enable_lora_runtime_loading)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        return await create_chat_completion(state, request)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        return await create_completion(state, request)

    @app.post("/v1/messages")
    async def messages(request: Request) -> Any:
        return await create_message(state, request)

    @app.post("/v1/messages/count_tokens")
    async def messages_count_tokens(request: Request) -> Any:
        return await count_tokens(state, request)

    @app.post("/v1/responses")
    async def responses(request: Request) -> Any:
        return await create_response(state, request)

    @app.get("/v1/responses/{response_id}")
    async def stored_response(response_id: str) -> Any:
        return await get_response(state, response_id)

    @app.post("/tokenize")
    async def tokenize_text(request: Request) -> Any:
        return await tokenize(state, request)

    @app.post("/detokenize")
    async def detokenize_ids(request: Request) -> Any:
        return await detokenize(state, request)

    @app.get("/metrics")
    async def metrics() -> Any:
        # stats() waits for the engine's loop thread; keep that wait off the server's loop.
        replicas = await asyncio.to_thread(pipe.engine.replica_stats)
        stats = sum_stats(replicas) if len(replicas) > 1 else replicas[0]
        return Response(state.metrics.render(stats, replicas), media_type=CONTENT_TYPE)

    @app.get("/version")
    async def version() -> Any:
        return {"version": __version__}

    return app
