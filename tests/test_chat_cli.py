"""`enginehouse chat`: the real console script driven through a pseudo-terminal (pexpect), and
the read-answer loop's edge cases driven directly."""

from __future__ import annotations

import io
import os
import sys
from pathlib import Path

import pexpect

from enginehouse import ChatSession, GenerationConfig
from enginehouse.chat_cli import PROMPT, ChatREPL, printable

SCRIPT = Path(sys.executable).with_name("enginehouse")


def spawn(model: Path, max_new_tokens: int) -> pexpect.spawn:
    child = pexpect.spawn(
        str(SCRIPT),
        ["chat", str(model), "--max-new-tokens", str(max_new_tokens)],
        encoding="utf-8",
        timeout=120,
        env={**os.environ, "TERM": "dumb"},  # plain readline: no escape sequences
        dimensions=(24, 400),
    )
    child.expect_exact(PROMPT)
    return child


def on_screen(text: str) -> str:
    """How an answer shows on the terminal: escaped controls, the tty's CR LF line ends."""
    return (printable(text) + "\n").replace("\n", "\r\n")


def ask(child: pexpect.spawn, line: str) -> str:
    """Type a line; return what was printed before the next prompt."""
    child.sendline(line)
    child.expect_exact(line + "\r\n")  # the terminal echoes what was typed
    child.expect_exact(PROMPT)
    return child.before


def test_two_turns_reset_system_and_exit(llama_dir, llama_pipe):
    gen = GenerationConfig(max_new_tokens=16)
    child = spawn(llama_dir, 16)
    try:
        # Two turns: the second answer is conditioned on the whole history.
        session = llama_pipe.chat("hello", gen_config=gen)
        assert ask(child, "hello") == on_screen(session.response.text)
        session = llama_pipe.chat("and again", session, gen)
        assert ask(child, "and again") == on_screen(session.response.text)
        # /reset forgets the history: the same question gets the first answer again.
        assert ask(child, "/reset") == "(history cleared)\r\n"
        first = llama_pipe.chat("hello", gen_config=gen).response.text
        assert ask(child, "hello") == on_screen(first)
        # /system starts the conversation with a system message.
        assert ask(child, "/reset") == "(history cleared)\r\n"
        assert ask(child, "/system be brief") == "(system message set)\r\n"
        briefed = llama_pipe.chat("hello", ChatSession(system="be brief"), gen).response.text
        assert ask(child, "hello") == on_screen(briefed)
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0


def test_ctrl_c_stops_the_answer_and_the_chat_goes_on(llama_dir):
    child = spawn(llama_dir, 240)  # an answer long enough to be cut off
    try:
        child.sendline("hello")
        child.expect_exact("hello\r\n")
        child.expect(".")  # the answer has started streaming
        child.sendintr()
        child.expect_exact(" [stopped]\r\n")
        child.expect_exact(PROMPT)
        assert ask(child, "/help").startswith("/reset clears the history")
        assert ask(child, "/reset") == "(history cleared)\r\n"
        assert ask(child, "hi").strip()  # answers again
        child.sendintr()  # at the prompt: a hint, not an exit
        child.expect_exact("(/exit or Ctrl-D to leave)")
        child.sendeof()
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0


def test_a_failed_turn_is_reported_and_forgotten(llama_pipe):
    lines = iter(["word " * 400, "/bogus", "hi"])

    def read(prompt: str) -> str:
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    out = io.StringIO()
    repl = ChatREPL(llama_pipe, GenerationConfig(max_new_tokens=4), read=read, out=out)
    repl.run()
    shown = out.getvalue()
    assert "error: the prompt has" in shown and "/reset starts a new conversation" in shown
    assert "unknown command /bogus" in shown
    # The over-long turn left no trace; the last one is a normal exchange.
    assert [m["role"] for m in repl.history] == ["user", "assistant"]
    assert repl.history[0]["content"] == "hi"


def test_model_output_cannot_drive_the_terminal():
    assert printable("a\x1b[2Jb\tc\nd\x07\x9b") == "a\\x1b[2Jb\tc\nd\\x07\\x9b"
