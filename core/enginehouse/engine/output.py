"""Output processing: the engine core's token ids made into what callers receive.

Apart from the engine core (core.py) on purpose: it runs where the caller is (the pipeline's
process, whatever process the core steps in), so that detokenizing, stop strings and building
outputs never wait between two forward passes of the model. One `RequestState` per request
turns each `CoreOutput` into a `RequestOutput` delta: new text (held back while it may be the
start of a stop string: `StopStrings` scans only the unsent text, once), new tokens and their
logprobs, the totals when finished. A stop string ends the request here; the caller then
aborts it in the core, which may have gone a token or two further meanwhile (those are
dropped).
"""

from __future__ import annotations

from typing import Any

from ..config import GenerationConfig
from .detokenizer import Decode, IncrementalDetokenizer, text_decoder
from .sequence import CoreOutput, RequestOutput
from .stop_strings import StopStrings


class RequestState:
    """One request's output so far, as its caller sees it."""

    def __init__(
        self, request_id: str, decode: Decode, prompt_ids: list[int], params: GenerationConfig
    ) -> None:
        self.request_id = request_id
        self.params = params
        self.detokenizer = IncrementalDetokenizer(decode, prompt_ids, params.skip_special_tokens)
        self.text = ""
        self.emitted_text = 0  # characters of `text` already sent
        self.num_generated = 0
        self.finished = False
        self.stop_words = params.stop_words

    def process(self, core: CoreOutput) -> tuple[RequestOutput | None, bool]:
        """The caller's delta for `core` (None once finished), and whether the request ended
        on a stop string here, so that the core must be told to stop it."""
        if self.finished:
            return None, False
        tokens, logprobs, reason = core.token_ids, core.logprobs, core.finish_reason
        cut = stopped_here = False
        for i, token in enumerate(tokens):
            self.num_generated += 1
            if core.stop_token and i == len(tokens) - 1:
                break  # a stop token's text is not part of the output
            self.text += self.detokenizer.add(token)
            if self.stop_words and self._cut_at_stop_word():
                tokens = tokens[: i + 1]
                logprobs = logprobs[: i + 1] if logprobs is not None else None
                stopped_here = reason is None  # the core goes on unless it ended too
                reason, cut = "stop", True
                break
        self.finished = reason is not None
        if self.finished and not cut:  # text held back for an incomplete character
            self.text += self.detokenizer.flush()
        return self._delta(core, tokens, logprobs, reason), stopped_here

    def _cut_at_stop_word(self) -> bool:
        # From the first character not yet sent: what was held back, then the new text.
        cut, _ = StopStrings.of(self.stop_words).scan(self.text, self.emitted_text)
        if cut is None:
            return False
        self.text = self.text[:cut]  # the stop string itself is not part of the output
        return True

    def _delta(
        self, core: CoreOutput, tokens: list[int], logprobs: list | None, reason: str | None
    ) -> RequestOutput:
        end = len(self.text)
        if not self.finished and self.stop_words:
            # Only the end that may still become a stop string is held back.
            _, hold = StopStrings.of(self.stop_words).scan(self.text, self.emitted_text)
            end = max(self.emitted_text, end - hold)
        out = RequestOutput(
            request_id=self.request_id,
            text=self.text[self.emitted_text : end],
            token_ids=list(tokens),
            logprobs=list(logprobs) if logprobs is not None else None,
            finished=self.finished,
            finish_reason=reason,
            input_token_len=core.num_prompt,
            generate_token_len=self.num_generated,
            cached_tokens=core.cached_tokens,
            error=core.error if reason == core.finish_reason else None,
            prompt_logprob_sum=core.prompt_logprob_sum,
            prompt_logprobs=core.prompt_logprobs,
            prompt_ranks=core.prompt_ranks,
            timing=core.timing,
        )
        self.emitted_text = end
        return out


class OutputProcessor:
    """Every request's `RequestState`, for one engine core's outputs."""

    def __init__(self, tokenizer: Any) -> None:
        self.decode = text_decoder(tokenizer)
        self.requests: dict[str, RequestState] = {}

    def add(self, request_id: str, prompt_ids: list[int], params: GenerationConfig) -> None:
        self.requests[request_id] = RequestState(request_id, self.decode, prompt_ids, params)

    def process(self, core: CoreOutput) -> tuple[RequestOutput | None, bool]:
        """`RequestState.process` for the request `core` belongs to (None for one that
        already finished, or is unknown)."""
        state = self.requests.get(core.request_id)
        if state is None:
            return None, False
        out, stopped = state.process(core)
        if state.finished:
            del self.requests[core.request_id]
        return out, stopped

    def drop(self, request_id: str) -> None:
        self.requests.pop(request_id, None)
