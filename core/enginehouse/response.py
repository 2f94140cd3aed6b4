"""What a generation returns to the user."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

FinishReason = Literal["stop", "length", "abort", "error"]


@dataclass
class Response:
    """One prompt's result (or, from `stream`, one delta of it, tagged with `index`).

    `token_ids` are the generated tokens only; `cached_tokens` counts prompt tokens whose KV came
    from the prefix cache; `error` says what went wrong when `finish_reason == "error"`.
    """

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    input_token_len: int = 0
    generate_token_len: int = 0
    finish_reason: FinishReason | None = None
    logprobs: list[dict[int, float]] | None = None
    index: int = 0
    cached_tokens: int = 0
    error: str | None = None

    def extend(self, delta: Response) -> None:
        """Add a streamed delta to this accumulated response."""
        self.text += delta.text
        self.token_ids.extend(delta.token_ids)
        if delta.logprobs is not None:
            self.logprobs = (self.logprobs or []) + delta.logprobs
        self.input_token_len = delta.input_token_len
        self.generate_token_len = delta.generate_token_len
        self.finish_reason = delta.finish_reason
        self.cached_tokens = delta.cached_tokens
        self.error = delta.error
