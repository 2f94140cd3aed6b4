"""Constrained decoding: outputs that must match a JSON schema, a regex, a choice or a grammar.

xgrammar (the optional `structured` extra; the grammar engine vLLM, SGLang and LMDeploy use)
compiles each constraint once, in a compile process that can be killed (a timeout, a caller
that left), and the result is cached by the constraint's text, up to a byte budget. Each
constrained request walks its own matcher: before every step the matcher writes which tokens
keep the output valid into one row of a bitmask, and the sampler sets every other token's
logit to -inf, on constrained rows only. A request whose grammar is still compiling
waits outside the scheduler; the others run on.

xgrammar's byte automaton lets a few byte sequences through that are not valid UTF-8
(overlong forms such as E0 82 B2, encoded surrogates), which random weights do pick; a
`Utf8Guard` masks those tokens too, so every output is valid UTF-8 as well as valid text.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, InvalidStateError, ThreadPoolExecutor
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from ..errors import RequestError

log = logging.getLogger(__name__)
INSTALL_HINT = "pip install 'enginehouse[structured]'"
DEFAULT_COMPILE_TIMEOUT = 30.0  # s a compile may take (--grammar-compile-timeout)
DEFAULT_COMPILE_WORKERS = 2  # compiles at once, each in a process (--grammar-compile-workers)
DEFAULT_CACHE_BYTES = 512 * 2**20  # vLLM's VLLM_XGRAMMAR_CACHE_MB (512): --xgrammar-cache-mb
ENTRY_OVERHEAD = 1024  # bytes counted per cache entry besides its text and compiled grammar
WORKER_START_TIMEOUT = 120.0  # s for a compile process to import xgrammar and say it is ready
POLL_S = 0.05  # how often a waiting compile looks whether it was cancelled


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
        check_depth(schema, "JSON schema")
        return cls("json_schema", json.dumps(json_safe_lengths(schema)))

    @classmethod
    def choice(cls, choices: list[str]) -> Constraint:
        # One of the strings, exactly: an "or" of constant strings, so nothing needs escaping.
        options = [{"type": "const_string", "value": c} for c in choices]
        return cls.structural_tag({"type": "or", "elements": options})

    @classmethod
    def structural_tag(cls, fmt: dict[str, Any]) -> Constraint:
        """xgrammar's structural tag: its `format` object (tags, sequences, JSON content...)."""
        check_depth(fmt, "structural tag")
        return cls("structural_tag", json.dumps({"type": "structural_tag", "format": fmt}))

    @property
    def what(self) -> str:
        return {"json_schema": "JSON schema", "regex": "regex", "grammar": "grammar"}.get(
            self.kind, "structural tag"
        )


MAX_DEPTH = 128  # objects and lists nested in one schema or structural tag


def check_depth(value: Any, what: str) -> None:
    """Refuse a schema or tag nested more than `MAX_DEPTH` deep, before anything walks it
    recursively (300 deep overflowed Python's stack: a 500)."""
    stack, deepest = [(value, 1)], 0
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children = list(item.values())
        elif isinstance(item, list):
            children = item
        else:
            continue
        deepest = max(deepest, depth)
        if deepest > MAX_DEPTH:
            raise RequestError(
                f"the {what} is nested more than {MAX_DEPTH} levels deep (objects and lists "
                f"within each other); flatten it, or use $defs and $ref for recursive shapes"
            )
        stack.extend((child, depth + 1) for child in children)


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
    check_depth(schema, "JSON schema")
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


class _Cancelled(Exception):
    """Nobody waits for the compile any more."""


class _CompileWorker:
    """One compile process (grammar_worker.py) and the pipes to it.

    It is started as a script with this process's import path, so that it imports xgrammar
    (and torch, which xgrammar imports) but nothing of the caller's program: starting one
    takes a few seconds and about 0.3 GB. `compile` waits for its answer and raises
    `TimeoutError` or `_Cancelled` when it should stop waiting; the caller then kills the
    process, the only way to stop an xgrammar compile that has started.
    """

    def __init__(self, tokenizer_info: str) -> None:
        to_child, to_child_w = os.pipe()
        from_child_r, from_child = os.pipe()
        script = str(Path(__file__).with_name("grammar_worker.py"))
        boot = "import runpy, sys; sys.path[:] = sys.argv[2:]; runpy.run_path(sys.argv[1], run_name='__main__')"  # noqa: E501
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-c", boot, script, *sys.path],
                stdin=to_child,
                stdout=from_child,
                close_fds=True,
                start_new_session=True,  # a Ctrl-C meant for the server is not its to handle
            )
        finally:
            os.close(to_child)
            os.close(from_child)
        self.outbox = Connection(to_child_w, readable=False)
        self.inbox = Connection(from_child_r, writable=False)
        try:
            self.outbox.send_bytes(tokenizer_info.encode())
            self._answer(WORKER_START_TIMEOUT, None)
        except BaseException:
            self.kill()
            raise

    def _answer(self, timeout: float, cancelled: threading.Event | None) -> bytes:
        deadline = time.monotonic() + timeout
        while not self.inbox.poll(POLL_S):
            if cancelled is not None and cancelled.is_set():
                raise _Cancelled()
            if time.monotonic() > deadline:
                raise TimeoutError()
        return self.inbox.recv_bytes()  # EOFError when the process died

    def compile(self, c: Constraint, timeout: float, cancelled: threading.Event) -> str:
        """`c` compiled and serialized; `RequestError` when xgrammar refuses it."""
        self.outbox.send_bytes(json.dumps([c.kind, c.text]).encode())
        status, payload = json.loads(self._answer(timeout, cancelled))
        if status != "ok":
            raise RequestError(
                f"the {c.what} cannot be compiled into a grammar: {_reason(payload)}; "
                f"fix the {c.what}"
            )
        return payload

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()
        self.outbox.close()
        self.inbox.close()


@dataclass(eq=False)
class _Job:
    """One constraint's compile, shared by everyone who asks for it while it runs, then
    cached (`size` bytes) with its result: the compiled grammar, or the `RequestError`."""

    constraint: Constraint
    waiters: list[Future] = field(default_factory=list)
    cancelled: threading.Event = field(default_factory=threading.Event)
    done: bool = False
    result: Any = None
    error: BaseException | None = None
    size: int = 0


class GrammarCompiler:
    """Compiles constraints in worker processes, in parallel; one `Future` per caller.

    Each compile runs in a process of its own (`max_workers` at most at once; more wait in
    line) that is killed when it passes `timeout` seconds, which fails it with a
    `RequestError` naming the limit, or when every caller waiting for it has cancelled its
    future (a client that left): an xgrammar compile cannot be interrupted inside a thread.
    Results, failures included, are cached by the constraint's text, least recently used
    dropped first once the cache holds more than `cache_bytes` (the texts and the compiled
    grammars' own sizes). Change the limits with `configure` before the first compile.
    """

    def __init__(
        self,
        tokenizer: Any,
        vocab_size: int,
        timeout: float = DEFAULT_COMPILE_TIMEOUT,
        max_workers: int = DEFAULT_COMPILE_WORKERS,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
    ) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.timeout = timeout
        self.max_workers = max_workers
        self.cache_bytes = cache_bytes
        self.utf8: Utf8Guard | None = None  # set before the first compile ends
        self._info: Any = None  # xgrammar's TokenizerInfo (slow to make for 150k tokens)
        self._info_json = ""
        self._cache: OrderedDict[Constraint, _Job] = OrderedDict()
        self._cached_bytes = 0
        self._lock = threading.Lock()
        self._setup_lock = threading.Lock()
        self._idle: list[_CompileWorker] = []
        self._busy: set[_CompileWorker] = set()
        self._executor: ThreadPoolExecutor | None = None
        self._closed = False

    def configure(
        self,
        timeout: float | None = None,
        max_workers: int | None = None,
        cache_bytes: int | None = None,
    ) -> None:
        """Set the limits (the server's --grammar-compile-timeout, --grammar-compile-workers,
        --xgrammar-cache-mb); `max_workers` only before the first compile."""
        with self._lock:
            if timeout is not None:
                self.timeout = timeout
            if max_workers is not None:
                self.max_workers = max_workers
            if cache_bytes is not None:
                self.cache_bytes = cache_bytes
                self._evict()

    @property
    def cached_bytes(self) -> int:
        """Bytes the cache holds: constraint texts and compiled grammars."""
        return self._cached_bytes

    @property
    def running(self) -> int:
        """Compiles running now (each in a process)."""
        return len(self._busy)

    def is_cached(self, constraint: Constraint) -> bool:
        """`constraint` is compiled (or known not to compile) and kept."""
        job = self._cache.get(constraint)
        return job is not None and job.done

    def compile(self, constraint: Constraint) -> Future:
        """The compiled grammar of `constraint`, as a future of the caller's own: cancel it to
        stop waiting (the compile stops once nobody waits). Errors come as `RequestError`."""
        xgrammar()  # fail here, at once, when the extra is missing
        waiter: Future = Future()
        with self._lock:
            if self._closed:
                raise RuntimeError("the grammar compiler is closed")
            job = self._cache.get(constraint)
            if job is not None:
                self._cache.move_to_end(constraint)
            else:
                job = self._start(constraint)
            if not job.done:
                job.waiters.append(waiter)
        if job.done:
            _settle(waiter, job)
        else:
            waiter.add_done_callback(lambda f: self._left(job, f))
        return waiter

    def _start(self, constraint: Constraint) -> _Job:
        """A new job, cached and queued (under the lock)."""
        job = _Job(constraint, size=len(constraint.text) + ENTRY_OVERHEAD)
        self._cache[constraint] = job
        self._cached_bytes += job.size
        if self._executor is None:
            self._executor = ThreadPoolExecutor(self.max_workers, "enginehouse-grammar")
        self._executor.submit(self._run, job)
        self._evict()
        return job

    def _left(self, job: _Job, waiter: Future) -> None:
        """A caller's future is done: when it was cancelled and it was the last one waiting,
        the compile stops (dropped from the queue, or its process killed)."""
        if not waiter.cancelled():
            return
        with self._lock:
            if waiter in job.waiters:
                job.waiters.remove(waiter)
            if job.waiters or job.done:
                return
            job.cancelled.set()
            self._forget(job)

    def _forget(self, job: _Job) -> None:
        """Drop `job` from the cache (under the lock), if it is still there."""
        if self._cache.get(job.constraint) is job:
            del self._cache[job.constraint]
            self._cached_bytes -= job.size

    def _evict(self) -> None:
        """Drop the least recently used finished entries until the cache fits its budget
        (under the lock); compiles still running stay."""
        for job in list(self._cache.values()):
            if self._cached_bytes <= self.cache_bytes:
                return
            if job.done:
                self._forget(job)

    def _run(self, job: _Job) -> None:
        """On a compile thread: compile `job` in a worker process and settle its waiters."""
        if job.cancelled.is_set():
            return
        result: Any = None
        error: BaseException | None = None
        try:
            worker = self._take_worker()
        except Exception as e:
            error = RequestError(f"the grammar compiler could not start: {type(e).__name__}: {e}")
        else:
            keep = False
            try:
                if job.cancelled.is_set():  # while its process started
                    keep = True
                    return
                serialized = worker.compile(job.constraint, self.timeout, job.cancelled)
                keep = True
                result = xgrammar().CompiledGrammar.deserialize_json(serialized, self._info)
            except _Cancelled:
                return
            except RequestError as e:  # the constraint does not compile: cached as such
                keep, error = True, e
            except TimeoutError:
                what = job.constraint.what
                error = _Uncached(
                    f"the {what} took longer than {self.timeout:g} s to compile (the grammar "
                    f"compile timeout, --grammar-compile-timeout); simplify the {what} "
                    "(fewer enum values, choices, properties or alternatives)"
                )
            except (EOFError, OSError, ValueError) as e:
                error = _Uncached(
                    f"the grammar compiler failed on this {job.constraint.what} "
                    f"({type(e).__name__}); simplify it"
                )
            finally:
                self._give_back(worker, keep)
        self._finish(job, result, error)

    def _finish(self, job: _Job, result: Any, error: BaseException | None) -> None:
        with self._lock:
            job.done, job.result, job.error = True, result, error
            waiters, job.waiters = job.waiters, []
            if isinstance(error, _Uncached):
                self._forget(job)
            elif self._cache.get(job.constraint) is job and result is not None:
                grown = int(result.memory_size_bytes)
                job.size += grown
                self._cached_bytes += grown
                self._evict()
        for waiter in waiters:
            _settle(waiter, job)

    def _take_worker(self) -> _CompileWorker:
        self._setup()
        with self._lock:
            worker = self._idle.pop() if self._idle else None
        if worker is None:
            worker = _CompileWorker(self._info_json)
        with self._lock:
            if self._closed:
                worker.kill()
                raise RuntimeError("the grammar compiler is closed")
            self._busy.add(worker)
        return worker

    def _give_back(self, worker: _CompileWorker, keep: bool) -> None:
        """Back to the idle ones, or killed (a compile cut short) and replaced at once, so
        that the next compile does not wait for a process to start."""
        with self._lock:
            self._busy.discard(worker)
            if keep and not self._closed:
                self._idle.append(worker)
                return
        worker.kill()
        if self._closed:
            return
        try:
            fresh = _CompileWorker(self._info_json)
        except Exception:  # the next compile tries again, and reports it
            log.exception("could not start a grammar compile process")
            return
        self._give_back(fresh, True)

    def _setup(self) -> None:
        """The tokenizer's vocabulary as xgrammar reads it, once (and the UTF-8 guard)."""
        with self._setup_lock:
            if self._info is not None:
                return
            xgr = xgrammar()
            info = xgr.TokenizerInfo.from_huggingface(self.tokenizer, vocab_size=self.vocab_size)
            self.utf8 = Utf8Guard(info.decoded_vocab, self.vocab_size)
            self._info_json = info.serialize_json()
            self._info = info

    def close(self) -> None:
        """Stop every compile and its process; waiting callers get a `RuntimeError`."""
        with self._lock:
            self._closed = True
            workers = self._idle + list(self._busy)
            self._idle, self._busy = [], set()
            jobs = [j for j in self._cache.values() if not j.done]
            for job in jobs:
                job.cancelled.set()
        for worker in workers:
            worker.kill()
        for job in jobs:
            job.error = RuntimeError("the grammar compiler was closed")
            for waiter in job.waiters:
                _settle(waiter, job)
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)


class _Uncached(RequestError):
    """A compile that failed for this time only (a timeout, a crash): not cached."""


def _settle(waiter: Future, job: _Job) -> None:
    try:
        if job.error is not None:
            waiter.set_exception(job.error)
        else:
            waiter.set_result(job.result)
    except InvalidStateError:  # the caller cancelled it meanwhile
        pass


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


def fill_bitmask(
    grammars: list[GrammarState], rows: list[int], num_rows: int
) -> tuple[np.ndarray, list[float]]:
    """The step's grammar bitmask ([num_rows, ceil(vocab / 32)] int32, xgrammar's layout: bit
    i % 32 of word i // 32 allows token i): each grammar fills its row, ANDed with the UTF-8
    guard's row for its output's state; the other rows are left all-allowed. The sampler
    applies it where the logits are (`sampler._mask`). Also the seconds each grammar took: an
    ambiguous grammar gets slower with every token (0.6 ms at token 100, 240 ms at token 570),
    and the engine ends a request whose grammar passes its limit."""
    xgr = xgrammar()
    vocab = grammars[0].utf8.vocab_size
    bitmask = xgr.allocate_token_bitmask(num_rows, vocab)
    took = []
    for grammar, i in zip(grammars, rows):
        start = time.perf_counter()
        grammar.fill(bitmask, i)
        bitmask[i] &= grammar.utf8.bits[grammar.utf8_state]
        took.append(time.perf_counter() - start)
    return bitmask.numpy(), took
