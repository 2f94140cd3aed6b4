"""A grammar compile worker: one process that compiles constraints with xgrammar, one at a time.

An xgrammar compile cannot be interrupted once it has started (it runs in C++ and may take a
minute for a hostile schema), so `GrammarCompiler` runs it here, in a process of its own that it
can kill when the compile passes its timeout or nobody waits for it any more. The process is
started as a script (`python grammar_worker.py`), so that it imports xgrammar and nothing of
the caller's program.

The protocol, over stdin and stdout with `multiprocessing.connection` framing: the parent sends
the tokenizer's `TokenizerInfo` as JSON, the worker answers "ready"; then each request is a
JSON `[kind, text]`, answered by `["ok", compiled grammar as JSON]` or `["error", message]`.
"""

from __future__ import annotations

import json
import os
import sys
from multiprocessing.connection import Connection
from typing import Any


def compile_one(compiler: Any, kind: str, text: str) -> Any:
    """Compile one constraint (a `Constraint`'s kind and text) with an xgrammar compiler."""
    if kind == "json_schema":
        return compiler.compile_json_schema(text, any_whitespace=False)
    if kind == "regex":
        return compiler.compile_regex(text)
    if kind == "grammar":
        return compiler.compile_grammar(text)
    return compiler.compile_structural_tag(text)


def main() -> None:
    # The protocol owns the real stdout; anything xgrammar prints goes to stderr instead.
    inbox = Connection(os.dup(0))
    outbox = Connection(os.dup(1))
    os.dup2(2, 1)
    import xgrammar as xgr

    info = xgr.TokenizerInfo.deserialize_json(inbox.recv_bytes().decode())
    compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
    outbox.send_bytes(b'"ready"')
    while True:
        try:
            kind, text = json.loads(inbox.recv_bytes())
        except EOFError:  # the parent closed the pipe (or died): nothing more to do
            return
        try:
            answer = ["ok", compile_one(compiler, kind, text).serialize_json()]
        except Exception as e:
            answer = ["error", str(e) or type(e).__name__]
        outbox.send_bytes(json.dumps(answer).encode())


if __name__ == "__main__":
    sys.exit(main())
