"""Turn tokens into text one at a time, in constant work per token.

Decoding a token alone loses context (a leading space, half of a UTF-8 character), so each step
decodes a short window: the text of window+new minus the text of the window is the new text.
Text that ends in an incomplete character waits for the next token.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

CONTEXT_TOKENS = 5  # prompt tokens kept as context for the first generated ones

Decode = Callable[[list[int], bool], str]  # (ids, skip_special_tokens) -> text


def text_decoder(tokenizer: Any) -> Decode:
    """How the detokenizer turns ids into text: the Rust tokenizer's own `decode` where
    transformers' adds nothing to it (a fast tokenizer, without clean-up), else `decode`.
    transformers' checks and conversions cost ~20 us a call, two calls a token: 1.8 ms of a
    32-sequence decode step (benchmarks/RESULTS.md)."""
    from transformers import PreTrainedTokenizerFast

    cls = type(tokenizer)
    rust = getattr(tokenizer, "_tokenizer", None)
    plain = (
        isinstance(tokenizer, PreTrainedTokenizerFast)
        and cls._decode is PreTrainedTokenizerFast._decode
        and cls.decode is PreTrainedTokenizerFast.decode
        and hasattr(rust, "decode")
    )
    if plain:
        return lambda ids, skip: rust.decode(ids, skip_special_tokens=skip)
    return lambda ids, skip: tokenizer.decode(
        ids, skip_special_tokens=skip, clean_up_tokenization_spaces=False
    )


class IncrementalDetokenizer:
    def __init__(self, decode: Decode, prompt_ids: list[int], skip_special_tokens: bool) -> None:
        self.decode = decode
        self.skip = skip_special_tokens
        self.ids: list[int] = list(prompt_ids[-CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)

    def _decode(self, ids: list[int]) -> str:
        return self.decode(ids, self.skip)

    def add(self, token_id: int) -> str:
        """Append a token; return the text it completes (possibly empty)."""
        self.ids.append(token_id)
        return self._advance(final=False)

    def flush(self) -> str:
        """Whatever text is still held back (an incomplete character at the end)."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.ids[self.prefix_offset :])
        if len(full) <= len(prefix) or (full.endswith("\ufffd") and not final):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return full[len(prefix) :]
