"""Responses kept for `previous_response_id` and `GET /v1/responses/{id}`: in memory, the most
recent `capacity` of them (the oldest is forgotten first), as vLLM keeps them."""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

DEFAULT_CAPACITY = 1000


@dataclass
class Stored:
    """One response: its body as sent, and the conversation it ends (chat messages, without
    the request's `instructions`, which do not carry over to the next response)."""

    body: dict[str, Any]
    messages: list[dict[str, Any]]


class ResponseStore:
    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        if capacity < 1:
            raise ValueError(f"the response store needs room for at least one; got {capacity}")
        self.capacity = capacity
        self._items: OrderedDict[str, Stored] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, response_id: str, stored: Stored) -> None:
        with self._lock:
            self._items[response_id] = stored
            self._items.move_to_end(response_id)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)

    def get(self, response_id: str) -> Stored | None:
        with self._lock:
            return self._items.get(response_id)

    def __len__(self) -> int:
        return len(self._items)
