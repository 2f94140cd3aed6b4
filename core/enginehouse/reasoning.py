"""Reasoning models: the thinking a model writes before its answer, told apart from the answer.

Qwen3, DeepSeek-R1, GLM-4.5 and their successors write `<think>...</think>` before the answer
(Magistral `[THINK]...[/THINK]`, gpt-oss its `analysis` channel). One `ReasoningParser` per
format, named as in vLLM (`--reasoning-parser`), splits an output into its reasoning and its
answer, whole or while it streams (`ReasoningStream`), and wraps an output constraint so that it
applies to the answer only: the grammar lets the reasoning through freely, then constrains what
follows its end marker (vLLM's behaviour, done here in the grammar, so the engine needs nothing).

Whether the output starts inside the reasoning depends on the prompt: DeepSeek-R1's template
ends the prompt with `<think>\\n` (the output is reasoning until `</think>`), Qwen3's with
`enable_thinking=False` closes an empty block itself (there is no reasoning to come), and
otherwise the model may open a block. `Reasoning.for_prompt` reads that from the prompt's end.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum
from typing import Any

from .config import GenerationConfig
from .engine.grammar import _reason, compact_json_grammar, xgrammar
from .errors import RequestError
from .tool_calls import held_prefix

log = logging.getLogger(__name__)


class Start(Enum):
    """Where an output starts, as the prompt leaves it."""

    INSIDE = "inside"  # the prompt opened the reasoning: the output is reasoning until its end
    CLOSED = "closed"  # the prompt closed it (thinking switched off): the output is the answer
    MAY_OPEN = "may_open"  # the output may open a reasoning block, or answer at once


class ReasoningParser:
    """A reasoning format: the reasoning sits between `start` and `end` at the output's start.

    Subclasses set the markers; a format that is not a leading block (gpt-oss's channels)
    overrides `split` and `constrain`.
    """

    name = ""
    start = "<think>"
    end = "</think>"
    needs_special_tokens = False  # the markers are special tokens, kept in the text

    @classmethod
    def detect(cls, template: str) -> bool:
        """Whether a chat template (its text) is of this format, beyond doubt."""
        return False

    def prompt_start(self, prompt_tail: str) -> Start:
        """Where the output of a prompt ending with `prompt_tail` starts."""
        tail = prompt_tail.rstrip()
        if tail.endswith(self.start):
            return Start.INSIDE
        if tail.endswith(self.end):
            return Start.CLOSED
        return Start.MAY_OPEN

    def split(self, text: str, start: Start, final: bool) -> tuple[str | None, str, int]:
        """(reasoning, answer, held) for the output so far: `held` characters at the end are
        not yet placed (they may begin a marker). The reasoning is None when there is none.
        Monotonic: more text only ever adds to both parts."""
        if start is Start.CLOSED:
            return None, text, 0
        body = text
        if start is Start.MAY_OPEN:
            stripped = text.lstrip()
            if not final and (not stripped or self.start.startswith(stripped)):
                return None, "", len(text)  # not yet known whether a block opens
            if not stripped.startswith(self.start):
                return None, text, 0  # an answer without reasoning
            body = stripped[len(self.start) :]
        else:  # a model may repeat the opening marker the prompt already wrote
            lead = body.lstrip()
            if lead.startswith(self.start):
                body = lead[len(self.start) :]
            elif not final and lead and self.start.startswith(lead):
                return "", "", len(text)
        reasoning, found, answer = body.partition(self.end)
        if not found:
            held = 0 if final else held_prefix(reasoning, self.end)
            return reasoning[: len(reasoning) - held], "", held
        answer = answer.lstrip()  # "</think>\n\n": the answer starts at its first character
        return reasoning, answer, 0

    def constrain(self, answer: dict[str, Any], start: Start) -> dict[str, Any]:
        """An xgrammar structural-tag format: free reasoning (when the prompt leaves room for
        it), then `answer` (a format) after the end marker and up to two newlines."""
        if start is Start.CLOSED:
            return answer
        block = {
            "type": "tag",
            "begin": "" if start is Start.INSIDE else self.start,
            "content": {"type": "any_text"},
            "end": self.end,
        }
        newlines = {"type": "grammar", "grammar": "root ::= [\\n]{0,2}"}
        thought = {"type": "sequence", "elements": [block, newlines, answer]}
        if start is Start.INSIDE:
            return thought
        return {"type": "or", "elements": [thought, answer]}  # thinking stays optional


class DeepSeekR1Parser(ReasoningParser):
    """DeepSeek-R1 (and V3.1 with thinking on): the prompt ends with `<think>\\n`, so the
    output is reasoning up to `</think>`; an output without it is all reasoning."""

    name = "deepseek_r1"

    @classmethod
    def detect(cls, template: str) -> bool:
        return "<think>" in template and "｜Assistant｜" in template


class DeepSeekV3Parser(DeepSeekR1Parser):
    """DeepSeek-V3.1 and later: thinking switched by the `thinking` template argument; the
    prompt says which (`<think>` opened, or `</think>` written), as for R1."""

    name = "deepseek_v3"

    @classmethod
    def detect(cls, template: str) -> bool:
        return False  # DeepSeekR1Parser claims these templates; the name is vLLM's alias


class Qwen3Parser(ReasoningParser):
    """Qwen3: `<think>...</think>` at the start of the output; `enable_thinking=False` makes
    the template close an empty block in the prompt, and the output is all answer."""

    name = "qwen3"

    @classmethod
    def detect(cls, template: str) -> bool:
        return "<think>" in template and "<|im_start|>" in template


class Glm45Parser(ReasoningParser):
    """GLM-4.5 / 4.6: `<think>...</think>`, switched like Qwen3's (`enable_thinking`)."""

    name = "glm45"

    @classmethod
    def detect(cls, template: str) -> bool:
        return "<think>" in template and "[gMASK]" in template


class MistralParser(ReasoningParser):
    """Magistral: `[THINK]...[/THINK]`, control tokens of its tokenizer."""

    name = "mistral"
    start = "[THINK]"
    end = "[/THINK]"
    needs_special_tokens = True

    @classmethod
    def detect(cls, template: str) -> bool:
        return "[THINK]" in template


# A harmony message header: `<|start|>assistant` (with a recipient, maybe) may lead it.
# The channel part may hold `<|constrain|>json` (a tool call's); it never holds another marker.
_HEADER = re.compile(
    r"(?:<\|start\|>assistant[^<]*)?<\|channel\|>"
    r"((?:(?!<\|(?:message|end|start|call|return)\|>).)*)<\|message\|>",
    re.DOTALL,
)
_MESSAGE_END = ("<|end|>", "<|call|>", "<|return|>")


class GptOssParser(ReasoningParser):
    """gpt-oss's harmony format: messages `<|channel|>NAME<|message|>TEXT<|end|>`, each
    after `<|start|>assistant`. The `analysis` channel is the reasoning and the `final` one
    the answer; other messages (tool calls on `commentary`) stay in the answer as written, for
    the tool parser to read."""

    name = "gpt_oss"
    start = "<|channel|>analysis<|message|>"
    end = "<|end|>"
    needs_special_tokens = True

    @classmethod
    def detect(cls, template: str) -> bool:
        return "<|channel|>" in template

    def prompt_start(self, prompt_tail: str) -> Start:
        # The generation prompt ends with <|start|>assistant: the model writes the channel.
        return Start.MAY_OPEN

    def split(self, text: str, start: Start, final: bool) -> tuple[str | None, str, int]:
        reasoning: list[str] = []
        answer: list[str] = []
        pos = 0
        while True:
            header = _HEADER.search(text, pos)
            if header is None:
                rest = text[pos:]
                held = 0 if final else _pending_header(rest)
                answer.append(rest[: len(rest) - held])  # text outside any message
                return _joined(reasoning), "".join(answer), held
            answer.append(text[pos : header.start()])
            channel = header.group(1).strip()
            ends = [(i, m) for m in _MESSAGE_END if (i := text.find(m, header.end())) >= 0]
            close, marker = min(ends) if ends else (len(text), "")
            body = text[header.end() : close]
            held = 0 if final or ends else max(held_prefix(body, m) for m in _MESSAGE_END)
            body = body[: len(body) - held]
            if channel == "analysis":
                reasoning.append(body)
            elif channel.startswith("final"):
                answer.append(body)
            elif ends or final:  # a tool call or a preamble: whole, for the tool parser
                answer.append(header.group(0) + body + marker)
            else:
                held = len(text) - header.start()  # still being written
            if not ends:
                return _joined(reasoning), "".join(answer), held
            pos = close + len(marker)

    def constrain(self, answer: dict[str, Any], start: Start) -> dict[str, Any]:
        # An optional analysis message, then the answer as the final message; a tool call
        # (the tool parser's format) is a message of its own on the commentary channel.
        analysis = {"type": "tag", "begin": self.start, "content": {"type": "any_text"}}
        analysis["end"] = "<|end|>"  # the first <|end|> closes it: any_text never holds one
        turn = {"type": "const_string", "value": "<|start|>assistant"}
        if not _begins_message(answer):
            header = {"type": "const_string", "value": "<|channel|>final<|message|>"}
            answer = {"type": "sequence", "elements": [header, answer]}
        thought = {"type": "sequence", "elements": [analysis, turn, answer]}
        return {"type": "or", "elements": [thought, answer]}


def _begins_message(fmt: dict[str, Any]) -> bool:
    """Whether every output of a format starts with a harmony channel header."""
    kind = fmt.get("type")
    if kind == "tag":
        return isinstance(fmt.get("begin"), str) and fmt["begin"].startswith("<|channel|>")
    if kind == "const_string":
        return fmt.get("value", "").startswith("<|channel|>")
    if kind in ("or", "tags_with_separator"):
        items = fmt.get("elements") or fmt.get("tags") or []
        return bool(items) and all(_begins_message(f) for f in items)
    if kind == "sequence":
        return bool(fmt.get("elements")) and _begins_message(fmt["elements"][0])
    return False


def _pending_header(text: str) -> int:
    """Characters at the end of `text` that are (or may begin) a message header still
    waiting for its `<|message|>`."""
    found = [i for i in (text.find("<|start|>"), text.find("<|channel|>")) if i >= 0]
    if found:
        return len(text) - min(found)
    return max(held_prefix(text, "<|start|>"), held_prefix(text, "<|channel|>"))


def _joined(parts: list[str]) -> str | None:
    return "".join(parts) if parts else None


PARSERS: dict[str, type[ReasoningParser]] = {
    p.name: p
    for p in (
        DeepSeekR1Parser,
        DeepSeekV3Parser,
        Qwen3Parser,
        Glm45Parser,
        MistralParser,
        GptOssParser,
    )
}


def all_parsers(extra: Iterable[type[ReasoningParser]] = ()) -> dict[str, type[ReasoningParser]]:
    """The built-in parsers and those plugins add (a plugin's wins a name it shares)."""
    return {**PARSERS, **{p.name: p for p in extra}}


def parser_for_template(
    template: str, extra: Iterable[type[ReasoningParser]] = ()
) -> ReasoningParser | None:
    """The reasoning format a chat template teaches, when exactly one format claims it.
    Plugins' parsers are asked first."""
    extra = list(extra)
    for group in (extra, list(PARSERS.values())):
        found = [p for p in group if p.detect(template)]
        if len(found) == 1:
            return found[0]()
        if len(found) > 1:
            names = ", ".join(p.name for p in found)
            log.info("the chat template fits several reasoning parsers (%s); none chosen", names)
            return None
    return None


class ReasoningStream:
    """Split an output arriving in pieces into reasoning and answer deltas."""

    def __init__(self, parser: ReasoningParser, start: Start) -> None:
        self.parser = parser
        self.start = start
        self.text = ""
        self.sent_reasoning = 0
        self.sent_answer = 0
        self.reasoning: str | None = None  # all of it so far

    def feed(self, delta: str, final: bool = False) -> tuple[str, str]:
        """Add a piece of output; returns the reasoning and the answer to send now."""
        self.text += delta
        reasoning, answer, _ = self.parser.split(self.text, self.start, final)
        if reasoning is not None:
            self.reasoning = reasoning
        new_reasoning = (reasoning or "")[self.sent_reasoning :]
        new_answer = answer[self.sent_answer :]
        self.sent_reasoning += len(new_reasoning)
        self.sent_answer += len(new_answer)
        return new_reasoning, new_answer


@dataclass
class Reasoning:
    """One request's reasoning: its format, and where its output starts."""

    parser: ReasoningParser
    start: Start

    @classmethod
    def for_prompt(cls, parser: ReasoningParser, prompt_tail: str) -> Reasoning:
        return cls(parser, parser.prompt_start(prompt_tail))

    def generation_config(self, config: GenerationConfig) -> GenerationConfig:
        """`config` with its output constraint moved after the reasoning, and the special
        tokens kept in the text when the markers are special tokens."""
        update: dict[str, Any] = {}
        if self.parser.needs_special_tokens:
            update["skip_special_tokens"] = False
        if config.constraint is not None and self.start is not Start.CLOSED:
            wrapped = self.parser.constrain(answer_format(config), self.start)
            update.update({f: None for f in ("response_format", "regex", "choice", "grammar")})
            update["structural_tag"] = wrapped
        return config.model_copy(update=update) if update else config

    def stream(self) -> ReasoningStream:
        return ReasoningStream(self.parser, self.start)

    def split(self, text: str) -> tuple[str | None, str]:
        """A finished output's reasoning (None when it has none) and answer."""
        reasoning, answer, _ = self.parser.split(text, self.start, final=True)
        return reasoning, answer


def answer_format(config: GenerationConfig) -> dict[str, Any]:
    """The config's output constraint as an xgrammar structural-tag format, checked (a bad
    schema, regex or grammar raises `RequestError` naming it, as it would unwrapped)."""
    fmt = config.response_format
    if fmt is not None and fmt["type"] in ("json_object", "json_schema"):
        schema = {"type": "object"} if fmt["type"] == "json_object" else None
        schema = schema or fmt["json_schema"]["schema"]
        return {"type": "grammar", "grammar": compact_json_grammar(schema)}
    if fmt is not None and fmt["type"] == "structural_tag":
        return fmt["format"]
    if config.regex is not None:
        return {"type": "grammar", "grammar": _checked("regex", config.regex)}
    if config.choice is not None:
        options = [{"type": "const_string", "value": c} for c in config.choice]
        return {"type": "or", "elements": options}
    if config.grammar is not None:
        return {"type": "grammar", "grammar": _checked("grammar", config.grammar)}
    tag = config.structural_tag or {}
    return tag.get("format", tag)


def _checked(kind: str, text: str) -> str:
    """The EBNF of a regex or grammar, or a `RequestError` saying why it does not compile."""
    xgr = xgrammar()
    try:
        grammar = xgr.Grammar.from_regex(text) if kind == "regex" else xgr.Grammar.from_ebnf(text)
    except Exception as e:
        raise RequestError(
            f"the {kind} cannot be compiled into a grammar: {_reason(e)}; fix the {kind}"
        ) from e
    return str(grammar)
