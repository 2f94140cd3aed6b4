"""A request as the engine core takes it, and the checks it must pass before it is queued.

The checks need only the model's shape (vocabulary, context, image token), so the front of a
pipeline runs them in its own process, whatever process the engine core runs in: a bad request
is refused at once, before it travels anywhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..config import EngineConfig, GenerationConfig
from ..errors import RequestError
from ..multimodal import MultiModalData, image_runs
from ..runner import session_length
from ..spec import ModelSpec


@dataclass
class EngineRequest:
    """One request for the engine core. Picklable: it crosses processes as it is."""

    request_id: str
    prompt_ids: list[int]
    params: GenerationConfig
    score_only: bool = False  # score the prompt (perplexity), generate nothing
    mm: MultiModalData | None = None


def eos_token_ids(spec: ModelSpec, tokenizer: Any) -> frozenset[int]:
    ids = spec.generation_config.get("eos_token_id", spec.config.get("eos_token_id"))
    ids = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(tokenizer.eos_token_id)
    return frozenset(int(i) for i in ids)


@dataclass(frozen=True)
class RequestChecks:
    """What a request must satisfy for this model and these settings."""

    vocab_size: int
    session_len: int
    image_token_id: int | None = None  # a vision-language model's image placeholder token
    max_chunk: int | None = None  # max_num_batched_tokens: an image computed whole must fit

    @classmethod
    def for_model(
        cls, spec: ModelSpec, config: EngineConfig, tokenizer: Any, image_token_id: int | None
    ) -> RequestChecks:
        vocab = int(spec.config.get("vocab_size") or len(tokenizer))
        chunk = config.max_num_batched_tokens
        return cls(vocab, session_length(spec, config), image_token_id, chunk)

    def validate(
        self,
        prompt_ids: list[int],
        params: GenerationConfig,
        score_only: bool = False,
        mm: MultiModalData | None = None,
    ) -> None:
        """Raise `RequestError` for a request the engine cannot serve; changes nothing."""
        if not prompt_ids:
            raise RequestError("the prompt is empty; give at least one token")
        if mm is not None:
            self._validate_images(prompt_ids, mm)
        elif self.image_token_id is not None and self.image_token_id in prompt_ids:
            raise RequestError(
                "the prompt has image tokens but no images; pass the images with the prompt, "
                "e.g. (text, image), and let the pipeline place their tokens"
            )
        for what, ids in (("token id", prompt_ids), ("stop_token_ids", params.stop_token_ids)):
            bad = [t for t in ids if not 0 <= t < self.vocab_size]
            if bad:
                raise RequestError(
                    f"{what} {bad[0]} is outside the vocabulary (0..{self.vocab_size - 1})"
                )
        if params.logits_processors:
            from ..logits_processors import check_names

            check_names(params.logits_processors)
        if params.constraint is not None:
            from .grammar import xgrammar

            xgrammar()  # a clear error naming the extra when xgrammar is missing
        self.check_length(len(prompt_ids), score_only)

    def check_length(self, prompt_len: int, score_only: bool = False) -> None:
        """A prompt must leave room for one generated token (or, scored only, just fit)."""
        if prompt_len > (self.session_len if score_only else self.session_len - 1):
            room = "" if score_only else ", leaving no room to generate"
            raise RequestError(
                f"the prompt has {prompt_len} tokens but the context holds "
                f"{self.session_len}{room}; shorten the prompt or raise the session length "
                "(EngineConfig(session_len=...), --session-len) up to the model's context length"
            )

    def _validate_images(self, prompt_ids: list[int], mm: MultiModalData) -> None:
        if self.image_token_id is None:
            raise RequestError(
                "this model takes text only, but the prompt has images; use a vision-language "
                "model (see `enginehouse explain MODEL`)"
            )
        found = prompt_ids.count(self.image_token_id)
        if found != mm.num_image_tokens:
            raise RequestError(
                f"the prompt has {found} image token positions but its images make "
                f"{mm.num_image_tokens}; let the pipeline expand the image placeholders"
            )
        if mm.whole_images and self.max_chunk is not None:
            positions = [i for i, t in enumerate(prompt_ids) if t == self.image_token_id]
            longest = max((b - a for a, b in image_runs(positions)), default=0)
            if longest > self.max_chunk:
                raise RequestError(
                    f"an image of the prompt takes {longest} tokens, which this model attends "
                    f"to in one step, but a step holds {self.max_chunk} tokens; raise "
                    f"max_num_batched_tokens (--max-num-batched-tokens) to at least {longest}"
                )
