"""A request as the engine tracks it: its tokens, KV blocks, sampling state and output so far."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from ..config import GenerationConfig


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class RequestOutput:
    """What one engine step produced for one request: a delta, and the totals when finished."""

    request_id: str
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, float]] | None = None
    finished: bool = False
    finish_reason: str | None = None
    input_token_len: int = 0
    generate_token_len: int = 0
    cached_tokens: int = 0
    error: str | None = None
    prompt_logprob_sum: float | None = None  # score-only requests (perplexity)


@dataclass(eq=False)
class Sequence:
    seq_id: int
    request_id: str
    prompt_ids: list[int]
    params: GenerationConfig
    stop_ids: frozenset[int]
    max_len: int  # context length: no position beyond it
    score_only: bool = False  # compute prompt log-likelihood, generate nothing
    token_ids: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    num_computed: int = 0  # tokens whose KV is in the blocks
    cached_tokens: int = 0  # prompt tokens found in the prefix cache on first admission
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)  # one per full, hashed block
    generator: torch.Generator | None = None
    detokenizer: object | None = None
    text: str = ""
    emitted_text: int = 0  # characters of `text` already sent
    emitted_tokens: int = 0
    logprobs: list[dict[int, float]] = field(default_factory=list)
    prompt_logprob_sum: float = 0.0
    finish_reason: str | None = None
    admitted: bool = False

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.prompt_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_prompt(self) -> int:
        return len(self.prompt_ids)

    @property
    def num_generated(self) -> int:
        return len(self.token_ids) - len(self.prompt_ids)

    @property
    def generated_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_ids) :]

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED
