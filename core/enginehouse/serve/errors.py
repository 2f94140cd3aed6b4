"""Errors in OpenAI's JSON shape: `{"error": {"message", "type", "param", "code"}}`, or, on
Anthropic's endpoints (`/v1/messages`), in Anthropic's: `{"type": "error", "error": {"type",
"message"}}`.

Every failure the server reports goes through `APIError`, so clients (the official `openai`
package included) see the status code and body they expect: 400 for an invalid request, 401
for a missing or wrong key, 404 for an unknown model or path, 413 for a body over the limit, 500
when the backend fails.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi.responses import JSONResponse
from pydantic import ValidationError

# OpenAI's `type` for each status code.
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    408: "invalid_request_error",
    413: "invalid_request_error",
    500: "server_error",
    503: "server_error",
}


# Anthropic's `error.type` for each status code.
ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    503: "overloaded_error",
}
ANTHROPIC_PATHS = "/v1/messages"  # the endpoint and its count_tokens


def anthropic_path(path: str) -> bool:
    """Whether errors on this path are written in Anthropic's shape."""
    return path == ANTHROPIC_PATHS or path.startswith(ANTHROPIC_PATHS + "/")


class APIError(Exception):
    """A failure to report to the client as an OpenAI error body with `status`."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        kind = ERROR_TYPES.get(self.status, "invalid_request_error")
        return {
            "error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}
        }

    def anthropic_body(self) -> dict[str, Any]:
        kind = ANTHROPIC_TYPES.get(self.status, "api_error" if self.status >= 500 else "")
        error = {"type": kind or "invalid_request_error", "message": self.message}
        return {"type": "error", "error": error}

    def response(
        self, headers: dict[str, str] | None = None, anthropic: bool = False
    ) -> JSONResponse:
        body = self.anthropic_body() if anthropic else self.body()
        return JSONResponse(body, status_code=self.status, headers=headers)

    def sse(self, anthropic: bool = False) -> str:
        """The error as a server-sent event, for failures after a stream has started."""
        if anthropic:
            return f"event: error\ndata: {json.dumps(self.anthropic_body())}\n\n"
        return f"data: {json.dumps(self.body())}\n\n"


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param)


def _short(value: Any) -> str | None:
    """A small input value worth echoing back; whole objects and long strings are not."""
    if isinstance(value, (bool, int, float)) or value is None:
        return repr(value)
    if isinstance(value, str) and len(value) <= 40:
        return repr(value)
    return None


def _describe(item: Any) -> tuple[str, str]:
    """(param, message) for one pydantic error, worded for an API user."""
    loc = [str(p) for p in item["loc"]]
    param = ".".join(loc)
    kind = item["type"]
    if kind == "extra_forbidden":
        return param, f"unrecognized request argument {param!r}"
    if kind == "missing":
        return param, f"{param!r} is required"
    message = item["msg"].removeprefix("Value error, ")
    got = _short(item.get("input"))
    return param, f"{param}: {message}" + (f" (got {got})" if got is not None else "")


def from_validation_error(error: ValidationError) -> APIError:
    """A 400 naming each invalid field in plain words, without pydantic's internals."""
    described = [_describe(item) for item in error.errors()]
    message = "; ".join(m for _, m in described) or "the request is invalid"
    return bad_request(message, described[0][0] if described else None)
