"""LoRA adapters on the server, as vLLM serves them: an adapter is a model of its own name
(the request's `model` picks it), `/v1/models` lists each with its base as `parent`, and
`POST /v1/load_lora_adapter` / `/v1/unload_lora_adapter` (vLLM's bodies: `lora_name`,
`lora_path`) load and unload them while serving, behind `--enable-lora-runtime-loading`.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel, ConfigDict, ValidationError

from ..adapters import AdapterError
from .errors import APIError, bad_request
from .state import ServerState


class LoadLoraAdapter(BaseModel):
    model_config = ConfigDict(extra="ignore")
    lora_name: str
    lora_path: str


class UnloadLoraAdapter(BaseModel):
    model_config = ConfigDict(extra="ignore")
    lora_name: str
    lora_int_id: int | None = None  # vLLM's; names are what identify adapters here


def adapter_cards(state: ServerState) -> list[dict[str, Any]]:
    """One `/v1/models` entry per adapter, its base model as `parent` (vLLM's shape)."""
    cards = []
    for a in state.pipe.engine.adapters():
        cards.append(
            {
                "id": a["name"],
                "object": "model",
                "created": state.created,
                "owned_by": "enginehouse",
                "root": a["source"],
                "parent": state.model_name,
                "max_model_len": state.session_len,
            }
        )
    return cards


async def _body(request: Request, model: type[BaseModel]) -> Any:
    try:
        return model.model_validate(await request.json())
    except (ValueError, ValidationError) as e:
        raise bad_request(f"invalid body: {e}") from e


def add_lora_routes(app: FastAPI, state: ServerState, runtime_loading: bool) -> None:
    engine = state.pipe.engine

    def check_enabled() -> None:
        if not runtime_loading:
            raise APIError(
                404,
                "loading LoRA adapters while serving is off; start the server with "
                "--enable-lora-runtime-loading",
                code="lora_runtime_loading_disabled",
            )

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(request: Request) -> Any:
        check_enabled()
        body = await _body(request, LoadLoraAdapter)
        if body.lora_name == state.model_name:
            raise bad_request(f"{body.lora_name!r} is the base model's name", "lora_name")
        try:
            await asyncio.to_thread(engine.load_adapter, body.lora_name, body.lora_path)
        except AdapterError as e:
            raise bad_request(str(e), "lora_path") from e
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(request: Request) -> Any:
        check_enabled()
        body = await _body(request, UnloadLoraAdapter)
        if body.lora_name not in engine.adapter_names:
            raise APIError(
                404, f"the LoRA adapter {body.lora_name!r} is not loaded", "lora_name",
                "model_not_found",
            )  # fmt: skip
        try:
            await asyncio.to_thread(engine.unload_adapter, body.lora_name)
        except AdapterError as e:
            raise bad_request(str(e), "lora_name") from e
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")
