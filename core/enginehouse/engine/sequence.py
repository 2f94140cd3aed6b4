"""A request as the engine core tracks it (tokens, KV blocks), and what each step reports.

`CoreOutput` is what the engine core sends per request and step (token ids, not text);
`RequestOutput` is what callers get once the output processor has made text of it.
"""

from __future__ import annotations

import bisect
import enum
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from ..config import GenerationConfig
from ..multimodal import MultiModalData, image_runs
from .grammar import GrammarState


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
    # With `prompt_logprobs`: per prompt position (the first is None), once, in one output.
    prompt_logprobs: list[dict[int, float] | None] | None = None
    prompt_ranks: list[int | None] | None = None  # each prompt token's rank in its row
    # When finished: seconds queued, in prefill, in decode and in the engine, and preemptions.
    timing: dict[str, float] | None = None


@dataclass
class CoreOutput:
    """What the engine core produced for one request in one step: new token ids (and their
    logprobs), and why it ended when it did. Picklable: it crosses processes as it is."""

    request_id: str
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, float]] | None = None
    finish_reason: str | None = None
    # The last token's text is not part of the output: a stop token (EOS, a stop_token_id, the
    # one that ends a grammar), or one that broke the grammar. It is in token_ids.
    stop_token: bool = False
    error: str | None = None
    num_prompt: int = 0
    cached_tokens: int = 0
    prompt_logprob_sum: float | None = None  # score-only requests, when finished
    prompt_logprobs: list[dict[int, float] | None] | None = None  # complete, once
    prompt_ranks: list[int | None] | None = None
    # When finished: seconds queued, in prefill, in decode and in the engine (vLLM's request
    # timing metrics), and the preemptions it went through.
    timing: dict[str, float] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


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
    sent_blocks: int = 0  # entries of block_table the runner's side already has
    # With KV groups (`KVSpec.groups`): the tables of groups 1, 2, ..., how many entries of
    # each group's table (group 0's first) were freed as they fell out of a sliding window,
    # and how many entries of groups 1, 2, ... the runner's side already has.
    group_tables: list[list[int]] = field(default_factory=list)
    dropped: list[int] = field(default_factory=list)
    sent_group_blocks: list[int] = field(default_factory=list)
    # When it reached the core, was first scheduled and gave its first token (monotonic
    # seconds), and how often it was preempted: the request's timing metrics at its end.
    arrived: float = 0.0
    scheduled_at: float | None = None
    first_token_at: float | None = None
    num_preemptions: int = 0
    sampler_knows: bool = False  # the sampler has this sequence's prompt (penalties)
    prompt_logprob_sum: float = 0.0
    # Prompt logprobs (params.prompt_logprobs): one entry per prompt position so far.
    prompt_logprobs: list[dict[int, float] | None] = field(default_factory=lambda: [None])
    prompt_ranks: list[int | None] = field(default_factory=lambda: [None])
    prompt_logprobs_sent: bool = False
    finish_reason: str | None = None
    admitted: bool = False
    # Images: their data until encoded, then one embedding row per image position.
    mm: MultiModalData | None = None
    mm_positions: list[int] = field(default_factory=list)
    mm_embeds: torch.Tensor | None = None
    # Constrained output: the compiled grammar (while it compiles), then this request's walk
    # through it. Preemption keeps the generated tokens, so the walk stays valid as it is.
    compiled_grammar: Future | None = None
    grammar: GrammarState | None = None
    # Speculative decoding: the tokens proposed after the last one, scheduled with it this
    # step for the target to verify (engine/speculative.py); never part of token_ids.
    draft_ids: list[int] = field(default_factory=list)
    # LoRA: the adapter's slot in the runner (0: the base model), and the id of that load of
    # it, which seeds the prefix-cache keys: two adapters (or two loads of one name) never
    # share KV.
    adapter_slot: int = 0
    adapter_load_id: int = 0

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.prompt_ids)

    def embeds_between(self, start: int, end: int) -> tuple[tuple[int, ...], torch.Tensor | None]:
        """The image positions in [start, end), relative to `start`, and their embeddings."""
        if self.mm_embeds is None:
            return (), None
        a = bisect.bisect_left(self.mm_positions, start)
        b = bisect.bisect_left(self.mm_positions, end)
        if a == b:
            return (), None
        rows = tuple(p - start for p in self.mm_positions[a:b])
        return rows, self.mm_embeds[a:b]

    def whole_images_chunk(self, start: int, n: int) -> int:
        """How many of the `n` tokens from `start` to compute in one chunk: all of them, or,
        for a model whose image tokens attend to each other both ways
        (`MultiModalData.whole_images`), those before an image the chunk would cut (0 when
        the chunk would begin inside it)."""
        if self.mm is None or not self.mm.whole_images:
            return n
        end, positions = start + n, self.mm_positions
        i = bisect.bisect_left(positions, end)
        # The chunk cuts an image where positions end - 1 and end are both its tokens.
        if 0 < i < len(positions) and positions[i] == end and positions[i - 1] == end - 1:
            first = next(a for a, b in image_runs(positions) if a < end < b)
            return max(first - start, 0)
        return n

    def rope_positions(self, start: int, end: int) -> torch.Tensor | None:
        """[3, end - start] multimodal rotary positions, for models that have them: the
        prompt's from the processor, then `p + delta` for every later token."""
        if self.mm is None or self.mm.rope_positions is None:
            return None
        table = self.mm.rope_positions
        length = table.shape[1]
        prompt = table[:, start : min(end, length)]
        later = torch.arange(max(start, length), max(end, length)) + self.mm.rope_delta
        return torch.cat([prompt, later.expand(3, -1)], dim=1)

    def block_extra(self, block: int, block_size: int) -> tuple:
        """The prefix-cache key's extra part for one block: the prompt's image hashes when the
        block holds image tokens, so blocks of different images are never shared."""
        if self.mm is None:
            return ()
        start = block * block_size
        i = bisect.bisect_left(self.mm_positions, start)
        if i < len(self.mm_positions) and self.mm_positions[i] < start + block_size:
            return self.mm.image_hashes
        return ()

    @property
    def scores_prompt(self) -> bool:
        """Whether the next chunk must return logits at every position: a score-only request,
        or one asking for prompt logprobs that it does not have in full yet."""
        if self.score_only:
            return True
        wanted = self.params.prompt_logprobs is not None
        return wanted and len(self.prompt_logprobs) < self.num_prompt

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
