"""What a generation returns to the user."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from .engine.sequence import RequestOutput
    from .tool_calls import ToolCall, ToolUse

FinishReason = Literal["stop", "length", "abort", "error", "tool_calls"]


@dataclass
class Response:
    """One prompt's result (or, from `stream`, one delta of it, tagged with `index`).

    `token_ids` are the generated tokens only; `cached_tokens` counts prompt tokens whose KV came
    from the prefix cache; `error` says what went wrong when `finish_reason == "error"`. With
    `GenerationConfig(prompt_logprobs=N)`, `prompt_logprobs` has one entry per prompt token (the
    first is None: nothing predicts it) mapping the token and the top N to their logprobs, and
    `prompt_ranks` each prompt token's rank among all tokens (1: the most likely).
    With tools, `text` is the answer's content and `tool_calls` the calls the model made
    (then `finish_reason == "tool_calls"`). A reasoning model's thinking is in `reasoning`
    (None when it wrote none, or has no reasoning parser), apart from the answer in `text`.
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
    prompt_logprobs: list[dict[int, float] | None] | None = None
    prompt_ranks: list[int | None] | None = None
    tool_calls: list[ToolCall] | None = None
    reasoning: str | None = None

    @classmethod
    def from_output(cls, index: int, out: RequestOutput) -> Response:
        """The user-facing view of one engine output (a delta while the request runs)."""
        return cls(
            text=out.text,
            token_ids=list(out.token_ids),
            input_token_len=out.input_token_len,
            generate_token_len=out.generate_token_len,
            finish_reason=out.finish_reason if out.finished else None,  # type: ignore[arg-type]
            logprobs=out.logprobs,
            index=index,
            cached_tokens=out.cached_tokens,
            error=out.error,
            prompt_logprobs=out.prompt_logprobs,
            prompt_ranks=out.prompt_ranks,
        )

    def extend(self, delta: Response) -> None:
        """Add a streamed delta to this accumulated response."""
        self.text += delta.text
        if delta.reasoning:
            self.reasoning = (self.reasoning or "") + delta.reasoning
        self.token_ids.extend(delta.token_ids)
        if delta.logprobs is not None:
            self.logprobs = (self.logprobs or []) + delta.logprobs
        self.input_token_len = delta.input_token_len
        self.generate_token_len = delta.generate_token_len
        self.finish_reason = delta.finish_reason
        self.cached_tokens = delta.cached_tokens
        self.error = delta.error
        if delta.prompt_logprobs is not None:
            self.prompt_logprobs, self.prompt_ranks = delta.prompt_logprobs, delta.prompt_ranks

    def take_tool_calls(self, tools: ToolUse) -> None:
        """Split a finished answer into its content and the tool calls it makes."""
        if self.finish_reason not in ("stop", "length"):
            return
        content, calls = tools.split(self.text)
        if calls:
            self.text, self.tool_calls = content.strip(), calls
            if self.finish_reason == "stop":  # cut short ("length"), it stays "length"
                self.finish_reason = "tool_calls"
        elif tools.forced is not None:  # a forced call cut short: no half call as content
            self.text = content
