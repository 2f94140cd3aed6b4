"""Constrained decoding: outputs that must match a JSON schema, a regex, a choice or a grammar.

xgrammar (the optional `structured` extra; the grammar engine vLLM, SGLang and LMDeploy use)
compiles each constraint once, on its own thread, and the result is cached by the constraint's
text. Each constrained request walks its own matcher: before every step the matcher writes
which tokens keep the output valid into one row of a bitmask, and the sampler sets every other
token's logit to -inf, on constrained rows only. A request whose grammar is still compiling
waits outside the scheduler; the others run on.
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

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


def json_safe_lengths(schema: Any) -> Any:
    """`schema` with each length-bounded string given the same bounds as a pattern.

    xgrammar (up to 0.2.9 at least, its issue #800) compiles a string with minLength or
    maxLength to a character class that lets raw control characters through, which is not
    valid JSON; a pattern goes through its JSON-aware regex path instead. `.{m,n}` keeps the
    bounds (xgrammar ignores the lengths once a pattern is there).
    """
    if isinstance(schema, list):
        return [json_safe_lengths(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: v if k in _NOT_SCHEMAS else json_safe_lengths(v) for k, v in schema.items()}
    bounded = "minLength" in out or "maxLength" in out
    if out.get("type") == "string" and bounded and "pattern" not in out and "format" not in out:
        low, high = out.get("minLength", 0), out.get("maxLength", "")
        if isinstance(low, int) and isinstance(high, (int, str)):
            out["pattern"] = f"^.{{{low},{high}}}$"
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


class GrammarCompiler:
    """Compiles constraints on a background thread; one `Future` per distinct constraint."""

    def __init__(self, tokenizer: Any, vocab_size: int) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._compiler: Any = None  # made on the compile thread at first use (slow for 150k)
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

    def __init__(self, compiled: Any, stop_ids: frozenset[int]) -> None:
        xgr = xgrammar()
        # The grammar ends on the engine's stop tokens for this request (the model's EOS
        # tokens, and any stop_token_ids), not only on the tokenizer's own EOS.
        self.matcher = xgr.GrammarMatcher(compiled, override_stop_tokens=sorted(stop_ids))

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        self.matcher.fill_next_token_bitmask(bitmask, row)

    def accept(self, token: int) -> bool:
        return self.matcher.accept_token(token)

    @property
    def terminated(self) -> bool:
        """The output is complete: the grammar has taken its stop token."""
        return self.matcher.is_terminated()


def apply_grammars(logits: torch.Tensor, grammars: list[GrammarState | None]) -> None:
    """Set the logits of tokens the grammar forbids to -inf, in place, on constrained rows.

    The bitmask is filled on the CPU (one bit per token) and copied to the logits' device,
    where xgrammar's kernel applies it; unconstrained rows are not touched.
    """
    rows = [i for i, g in enumerate(grammars) if g is not None]
    if not rows:
        return
    xgr = xgrammar()
    bitmask = xgr.allocate_token_bitmask(len(grammars), logits.shape[1])
    for i in rows:
        grammars[i].fill(bitmask, i)  # type: ignore[union-attr]
    bitmask = bitmask.to(logits.device, non_blocking=True)
    xgr.apply_token_bitmask_inplace(logits, bitmask, vocab_size=logits.shape[1], indices=rows)
