"""Constrained decoding: outputs that must match a JSON schema, a regex, a choice or a grammar.

xgrammar (the optional `structured` extra; the grammar engine vLLM, SGLang and LMDeploy use)
compiles each constraint once, on its own thread, and the result is cached by the constraint's
text. Each constrained request walks its own matcher: before every step the matcher writes
which tokens keep the output valid into one row of a bitmask, and the sampler sets every other
token's logit to -inf, on constrained rows only. A request whose grammar is still compiling
waits outside the scheduler; the others run on.

xgrammar's byte automaton lets a few byte sequences through that are not valid UTF-8
(overlong forms such as E0 82 B2, encoded surrogates), which random weights do pick; a
`Utf8Guard` masks those tokens too, so every output is valid UTF-8 as well as valid text.
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from ..errors import RequestError

INSTALL_HINT = "pip install 'enginehouse[structured]'"
CACHE_SIZE = 256  # compiled grammars kept, least recently used dropped first


def xgrammar() -> Any:
    """The xgrammar module, or a `RequestError` that names the extra to install."""
    try:
        import xgrammar as xgr
    except ImportError as e:
        raise RequestError(
            f"structured output (response_format, regex, choice, grammar, tool_choice) needs "
            f"xgrammar, which is not installed; install it with: {INSTALL_HINT}"
        ) from e
    return xgr


@dataclass(frozen=True)
class Constraint:
    """What a request's output must match. `text` is canonical, so that it keys the cache."""

    kind: Literal["json_schema", "regex", "grammar", "structural_tag"]
    text: str

    @classmethod
    def json_schema(cls, schema: dict[str, Any] | bool) -> Constraint:
        # Keys keep their order: properties are written in the order the schema gives them.
        return cls("json_schema", json.dumps(json_safe_lengths(schema)))

    @classmethod
    def choice(cls, choices: list[str]) -> Constraint:
        # One of the strings, exactly: an "or" of constant strings, so nothing needs escaping.
        options = [{"type": "const_string", "value": c} for c in choices]
        return cls.structural_tag({"type": "or", "elements": options})

    @classmethod
    def structural_tag(cls, fmt: dict[str, Any]) -> Constraint:
        """xgrammar's structural tag: its `format` object (tags, sequences, JSON content...)."""
        return cls("structural_tag", json.dumps({"type": "structural_tag", "format": fmt}))

    @property
    def what(self) -> str:
        return {"json_schema": "JSON schema", "regex": "regex", "grammar": "grammar"}.get(
            self.kind, "structural tag"
        )


_NOT_SCHEMAS = ("enum", "const", "default", "examples")
_JSON_CHAR = r'[^"\\\x00-\x1f\uD800-\uDFFF]'  # a character a JSON string holds unescaped


def json_safe_lengths(schema: Any) -> Any:
    """`schema` with each length-bounded string turned into a pattern with the same bounds.

    xgrammar (0.2.9 at least; its issue #800) compiles a string with minLength or maxLength
    to a character class that lets raw control characters through (not valid JSON), and it
    lets UTF-8-encoded surrogates into strings (not valid UTF-8, and each decodes to three
    replacement characters, breaking the length). A pattern goes through its JSON-aware regex
    path, where a class can leave both out. Escapes are not allowed in either path.
    """
    if isinstance(schema, list):
        return [json_safe_lengths(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: v if k in _NOT_SCHEMAS else json_safe_lengths(v) for k, v in schema.items()}
    bounded = "minLength" in out or "maxLength" in out
    if out.get("type") == "string" and bounded and "pattern" not in out and "format" not in out:
        low, high = out.pop("minLength", 0), out.pop("maxLength", "")
        out["pattern"] = f"^{_JSON_CHAR}{{{low},{high}}}$"
    return out


def compact_json_grammar(schema: dict[str, Any] | bool) -> str:
    """The EBNF of `schema` as xgrammar writes it, in compact JSON (single spaces after ',' and
    ':', none elsewhere): a structural tag's JSON content would allow unbounded whitespace, which
    a model can fill forever."""
    xgr = xgrammar()
    text = json.dumps(json_safe_lengths(schema))
    try:
        return str(xgr.Grammar.from_json_schema(text, any_whitespace=False))
    except Exception as e:
        raise RequestError(
            f"the JSON schema cannot be compiled into a grammar: {_reason(e)}; fix the schema"
        ) from e


def _reason(error: Exception) -> str:
    # xgrammar's C++ errors start with "[time] path/file.cc:line: "; the rest is the reason.
    text = re.sub(r"^\[[\d:]+\]\s*\S+:\d+:\s*", "", str(error).strip())
    return text.splitlines()[0] if text else type(error).__name__


REJECT = 8  # the UTF-8 automaton's dead state


def _utf8_automaton() -> np.ndarray:
    """UTF-8 as a table [state, byte] -> next state. State 0 is a character boundary; the
    others count the continuation bytes still due, with the narrower ranges that exclude
    overlong forms (after E0, F0), surrogates (after ED) and code points past U+10FFFF (F4)."""
    t = np.full((REJECT + 1, 256), REJECT, dtype=np.int64)
    t[0, 0x00:0x80] = 0
    t[0, 0xC2:0xE0] = 1  # one continuation left
    t[0, 0xE0], t[2, 0xA0:0xC0] = 2, 1
    t[0, 0xE1:0xED] = t[0, 0xEE:0xF0] = 3  # two continuations left
    t[0, 0xED], t[4, 0x80:0xA0] = 4, 1
    t[0, 0xF0], t[5, 0x90:0xC0] = 5, 3
    t[0, 0xF1:0xF4] = 6  # three continuations left
    t[0, 0xF4], t[7, 0x80:0x90] = 7, 3
    t[1, 0x80:0xC0], t[3, 0x80:0xC0], t[6, 0x80:0xC0] = 0, 1, 3
    return t


class Utf8Guard:
    """Per token and UTF-8 state: the state after the token's bytes, or REJECT."""

    def __init__(self, token_bytes: list[bytes], vocab_size: int) -> None:
        table = _utf8_automaton()
        lengths = np.array([len(b) for b in token_bytes], dtype=np.int64)
        order = np.argsort(-lengths, kind="stable")  # longest first: the active ones lead
        flat = np.frombuffer(b"".join(token_bytes[i] for i in order), dtype=np.uint8)
        starts = np.concatenate([[0], np.cumsum(lengths[order])[:-1]]).astype(np.int64)
        sorted_lengths = lengths[order]
        after = np.tile(np.arange(REJECT, dtype=np.int64)[:, None], (1, len(token_bytes)))
        for j in range(int(sorted_lengths.max(initial=0))):
            active = int(np.searchsorted(-sorted_lengths, -j, side="left"))  # lengths > j
            byte = flat[starts[:active] + j]
            after[:, :active] = table[after[:, :active], byte]
        unsorted = np.empty_like(after)
        unsorted[:, order] = after
        # Ids past the tokenizer's (a padded vocabulary) keep the state; the grammar bars them.
        full = np.tile(np.arange(REJECT, dtype=np.int64)[:, None], (1, vocab_size))
        n = min(vocab_size, len(token_bytes))
        full[:, :n] = unsorted[:, :n]
        self.after = full
        self.vocab_size = vocab_size
        # The allowed tokens of each state as bitmask rows in xgrammar's layout (bit i % 32 of
        # word i // 32), so that guarding a row is one AND with the grammar's row.
        words = -(-vocab_size // 32)
        allowed = np.zeros((REJECT, words * 32), dtype=bool)
        allowed[:, :vocab_size] = full != REJECT
        packed = np.packbits(allowed, axis=1, bitorder="little")
        self.bits = torch.from_numpy(packed.view("<i4").copy())  # [state, words] int32


class GrammarCompiler:
    """Compiles constraints on a background thread; one `Future` per distinct constraint."""

    def __init__(self, tokenizer: Any, vocab_size: int) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._compiler: Any = None  # made on the compile thread at first use (slow for 150k)
        self.utf8: Utf8Guard | None = None
        self._cache: OrderedDict[Constraint, Future] = OrderedDict()
        self._lock = threading.Lock()
        self._executor: ThreadPoolExecutor | None = None

    def compile(self, constraint: Constraint) -> Future:
        """The compiled grammar of `constraint`, as a future; errors come as `RequestError`."""
        xgrammar()  # fail here, at once, when the extra is missing
        with self._lock:
            future = self._cache.get(constraint)
            if future is not None:
                self._cache.move_to_end(constraint)
                return future
            if self._executor is None:
                self._executor = ThreadPoolExecutor(1, thread_name_prefix="enginehouse-grammar")
            future = self._executor.submit(self._compile, constraint)
            self._cache[constraint] = future
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        return future

    def _compile(self, c: Constraint) -> Any:
        xgr = xgrammar()
        if self._compiler is None:
            info = xgr.TokenizerInfo.from_huggingface(self.tokenizer, vocab_size=self.vocab_size)
            self.utf8 = Utf8Guard(info.decoded_vocab, self.vocab_size)
            self._compiler = xgr.GrammarCompiler(info, max_threads=1)
        try:
            if c.kind == "json_schema":
                return self._compiler.compile_json_schema(c.text, any_whitespace=False)
            if c.kind == "regex":
                return self._compiler.compile_regex(c.text)
            if c.kind == "grammar":
                return self._compiler.compile_grammar(c.text)
            return self._compiler.compile_structural_tag(c.text)
        except Exception as e:
            raise RequestError(
                f"the {c.what} cannot be compiled into a grammar: {_reason(e)}; fix the {c.what}"
            ) from e

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)


class GrammarState:
    """One request's walk through its grammar: which tokens may come next, and the ones taken."""

    def __init__(self, compiled: Any, stop_ids: frozenset[int], utf8: Utf8Guard) -> None:
        xgr = xgrammar()
        # The grammar ends on the engine's stop tokens for this request (the model's EOS
        # tokens, and any stop_token_ids), not only on the tokenizer's own EOS.
        self.matcher = xgr.GrammarMatcher(compiled, override_stop_tokens=sorted(stop_ids))
        self.utf8 = utf8
        self.utf8_state = 0

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        self.matcher.fill_next_token_bitmask(bitmask, row)

    def accept(self, token: int) -> bool:
        self.utf8_state = int(self.utf8.after[self.utf8_state, token])
        return self.utf8_state != REJECT and self.matcher.accept_token(token)

    @property
    def terminated(self) -> bool:
        """The output is complete: the grammar has taken its stop token."""
        return self.matcher.is_terminated()


def fill_bitmask(grammars: list[GrammarState], rows: list[int], num_rows: int) -> np.ndarray:
    """The step's grammar bitmask ([num_rows, ceil(vocab / 32)] int32, xgrammar's layout: bit
    i % 32 of word i // 32 allows token i): each grammar fills its row, ANDed with the UTF-8
    guard's row for its output's state; the other rows are left all-allowed. The sampler
    applies it where the logits are (`sampler._mask`)."""
    xgr = xgrammar()
    vocab = grammars[0].utf8.vocab_size
    bitmask = xgr.allocate_token_bitmask(num_rows, vocab)
    for grammar, i in zip(grammars, rows):
        grammar.fill(bitmask, i)
        bitmask[i] &= grammar.utf8.bits[grammar.utf8_state]
    return bitmask.numpy()
