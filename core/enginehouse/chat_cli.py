"""`enginehouse chat MODEL`: an interactive terminal chat over a `Pipeline`.

The whole history goes through the model's chat template every turn; the answer is printed as
its tokens arrive. Commands: `/reset`, `/system TEXT`, `/exit` (also Ctrl-D), `/help`. Ctrl-C
stops the current answer (what was printed stays in the history) and leaves the chat running.
"""

from __future__ import annotations

import contextlib
import logging
import re
import sys
from collections.abc import Callable
from typing import TextIO

from .config import GenerationConfig
from .errors import RequestError
from .pipeline import Pipeline

PROMPT = ">>> "
HELP = (
    "/reset clears the history, /system TEXT sets the system message (/system alone removes "
    "it), /exit or Ctrl-D quits; Ctrl-C stops an answer."
)
# Control characters other than newline and tab, shown escaped so that whatever a model
# writes cannot move the cursor, clear the screen or retitle the terminal.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def printable(text: str) -> str:
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


class _Once(logging.Filter):
    """Let each distinct message through once (the built-in template warns every turn)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message in self.seen:
            return False
        self.seen.add(message)
        return True


def warn_once_about_builtin_templates() -> None:
    """A built-in chat template warns each time it renders; a chat or a server needs it once."""
    logger = logging.getLogger("enginehouse.chat_template")
    if not any(isinstance(f, _Once) for f in logger.filters):
        logger.addFilter(_Once())


class ChatREPL:
    """The read-answer loop. `read` returns a line (raising EOFError at the end of input)."""

    def __init__(
        self,
        pipe: Pipeline,
        gen_config: GenerationConfig,
        system: str | None = None,
        read: Callable[[str], str] = input,
        out: TextIO = sys.stdout,
    ) -> None:
        self.pipe = pipe
        self.gen_config = gen_config
        self.system = system or None
        self.history: list[dict[str, str]] = []
        self.read = read
        self.out = out

    def write(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()

    def messages(self) -> list[dict[str, str]]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + self.history

    def run(self) -> None:
        self.write(f"{HELP}\n")
        while True:
            try:
                line = self.read(PROMPT)
            except EOFError:
                self.write("\n")
                return
            except KeyboardInterrupt:
                self.write("\n(/exit or Ctrl-D to leave)\n")
                continue
            if not self.handle(line.strip()):
                return

    def handle(self, line: str) -> bool:
        """Act on one line; False means leave."""
        if not line:
            return True
        if line.startswith("/"):
            command, _, arg = line.partition(" ")
            if command in ("/exit", "/quit", "/bye"):
                return False
            if command == "/reset":
                self.history = []
                self.write("(history cleared)\n")
            elif command == "/system":
                self.system = arg.strip() or None
                self.write("(system message set)\n" if self.system else "(no system message)\n")
            elif command == "/help":
                self.write(f"{HELP}\n")
            else:
                self.write(f"unknown command {command}. {HELP}\n")
            return True
        self.answer(line)
        return True

    def answer(self, text: str) -> None:
        """Stream one answer; keep the turn in the history unless it failed outright."""
        self.history.append({"role": "user", "content": text})
        reply, error = "", None
        try:
            # closing(): an interrupt must abort the request now, not when garbage-collected.
            with contextlib.closing(self.pipe.stream(self.messages(), self.gen_config)) as deltas:
                for delta in deltas:
                    reply += delta.text
                    self.write(printable(delta.text))
                    error = delta.error or error
        except KeyboardInterrupt:
            self.write(" [stopped]")
        except RequestError as e:  # e.g. the conversation outgrew the context
            error = str(e)
        self.write("\n")
        if error is not None:
            self.write(f"error: {error}\n(/reset starts a new conversation)\n")
            if not reply:  # nothing was answered: forget the question too
                self.history.pop()
                return
        self.history.append({"role": "assistant", "content": reply})


def run_chat(
    pipe: Pipeline,
    gen_config: GenerationConfig,
    system: str | None = None,
) -> None:
    """Chat on the terminal until /exit or Ctrl-D."""
    warn_once_about_builtin_templates()
    with contextlib.suppress(ImportError):
        import readline  # noqa: F401 - line editing and history for input()
    ChatREPL(pipe, gen_config, system).run()
