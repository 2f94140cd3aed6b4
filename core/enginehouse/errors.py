"""Errors users see. Each message names the problem and the fix."""

from __future__ import annotations

from typing import Any


class EnginehouseError(Exception):
    """Base class for every error enginehouse raises on purpose."""


class ModelNotFoundError(EnginehouseError, FileNotFoundError):
    """The model identifier names neither a local folder nor a reachable or cached hub repo."""


class InvalidModelError(EnginehouseError, ValueError):
    """The model folder exists but its files cannot describe a runnable model."""


class BackendError(EnginehouseError, ValueError):
    """No backend can run the model, or the requested one is unknown or unsupported."""


class PluginLoadError(EnginehouseError):
    """A plugin failed to load in strict mode, or the plugin settings are invalid."""


class RequestError(EnginehouseError, ValueError):
    """One request is invalid (a prompt longer than the context, a bad parameter)."""


class ParamError(RequestError):
    """A request field is wrong; `param` names it (the server's 400 names it too)."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


class GenerationError(EnginehouseError, RuntimeError):
    """The backend failed while running a request that was sent alone."""


def describe_validation_error(error: Any) -> str:
    """A pydantic ValidationError as one line per field, without pydantic's internals."""
    problems = []
    for item in error.errors():
        field = ".".join(str(p) for p in item["loc"]) or "value"
        message = item["msg"].removeprefix("Value error, ")
        problems.append(f"{field}: {message} (got {item.get('input')!r})")
    return f"invalid {error.title}: " + "; ".join(problems)
