"""OpenAI tool calling: each model family's call format, read from its output or enforced.

A model writes tool calls in the format its chat template taught it: Hermes / Qwen2.5 wrap each
call in `<tool_call>...</tool_call>`, Llama 3.x writes `{"name": ..., "parameters": ...}`,
Mistral writes `[TOOL_CALLS] [...]`. One `ToolParser` per format finds the calls in a finished
output (`parse`) or in one that is still streaming (`ToolCallStream`), and builds the grammar
that makes the model write valid calls (`constraint`, for tool_choice "required" or a named
function), so that the same parser reads constrained and free outputs alike. The parser is
chosen from the chat template's text.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .config import GenerationConfig
from .engine.grammar import check_depth, compact_json_grammar
from .errors import RequestError

Tool = Mapping[str, Any]  # OpenAI's {"type": "function", "function": {"name", "parameters"}}
EMPTY_PARAMETERS = {"type": "object", "properties": {}}  # OpenAI: no parameters at all
_DECODER = json.JSONDecoder()


class ToolError(RequestError):
    """A request's tools or tool_choice cannot be used; `param` names which."""

    def __init__(self, message: str, param: str = "tools") -> None:
        super().__init__(message)
        self.param = param


def _new_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class ToolCall:
    """One call: the function's name and its arguments as JSON text (as OpenAI gives them)."""

    name: str
    arguments: str
    id: str = field(default_factory=_new_id)

    def to_openai(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


def _call(obj: Any, args_keys: tuple[str, ...]) -> ToolCall | None:
    """A ToolCall from one decoded call object, or None when it is not one."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = next((obj[k] for k in args_keys if k in obj), {})
    if isinstance(args, str):  # some models write the arguments as a JSON string
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return ToolCall(obj["name"], json.dumps(args, ensure_ascii=False))


def _loads_call(text: str, args_keys: tuple[str, ...]) -> ToolCall | None:
    try:
        return _call(json.loads(text), args_keys)
    except ValueError:
        return None


def _decode_all(text: str, pos: int, separators: str) -> tuple[list[Any], int]:
    """Decode JSON values one after another from `pos`, skipping whitespace and separator
    characters between them; returns the complete values and where decoding stopped."""
    values = []
    while True:
        while pos < len(text) and (text[pos].isspace() or text[pos] in separators):
            pos += 1
        try:
            value, pos = _DECODER.raw_decode(text, pos)
        except ValueError:
            return values, pos
        values.append(value)


def held_prefix(text: str, marker: str) -> int:
    """How many characters at the end of `text` may begin `marker` (a stream holds them)."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


def function_spec(tool: Tool) -> tuple[str, dict[str, Any]]:
    """(name, parameters schema) of one OpenAI tool; `RequestError` for a malformed one."""
    fn = tool.get("function") if isinstance(tool, Mapping) else None
    if not isinstance(tool, Mapping) or tool.get("type", "function") != "function":
        raise ToolError('each tool must be {"type": "function", "function": {"name": ...}}')
    if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str) or not fn["name"]:
        raise ToolError('each tool needs {"function": {"name": "...", "parameters": {...}}}')
    params = fn.get("parameters") or EMPTY_PARAMETERS
    if not isinstance(params, dict):
        raise ToolError(f"the parameters of tool {fn['name']!r} must be a JSON schema object")
    try:  # before a template or a grammar walks it recursively
        check_depth(params, f"parameters schema of tool {fn['name']!r}")
    except RequestError as e:
        raise ToolError(str(e)) from e
    return fn["name"], params


class ToolParser:
    """A model family's tool-call format. Subclasses set the markers and how calls are read."""

    name = ""
    start = ""  # where the calls begin in an output
    call_begin = ""  # before one call's arguments, with {name} in it
    call_end = ""  # after one call's arguments
    separator = ""  # between two calls
    needs_special_tokens = False  # the start marker is a special token, kept in the text

    @classmethod
    def detect(cls, template: str) -> bool:
        """Whether a chat template (its text) teaches this format."""
        return False

    def with_tools(self, tools: Sequence[Tool]) -> ToolParser:
        """This parser for a request's tools (formats that type argument values by the
        tools' schemas keep them); most formats need nothing and return themselves."""
        return self

    def find_start(self, text: str) -> int | None:
        """Where the tool calls begin in `text`, or None if they have not (yet)."""
        i = text.find(self.start)
        return None if i < 0 else i

    def holdback(self, text: str) -> int:
        """How many characters at the end of `text` may be the beginning of the start marker
        (a stream must not send them as content yet)."""
        return held_prefix(text, self.start)

    def read_calls(self, tail: str, final: bool) -> list[ToolCall] | None:
        """The complete calls in `tail` (the output from the start marker on); at the end of
        the output (`final`), None when it holds no valid call at all."""
        raise NotImplementedError

    def parse(self, text: str, parallel: bool = True) -> tuple[str, list[ToolCall]]:
        """A finished output's content (the text before the calls) and its calls. An output
        whose calls do not parse is all content, as vLLM treats it."""
        return ToolCallStream(self, parallel).feed(text, final=True)

    def constraint(self, tools: Sequence[Tool], parallel: bool) -> dict[str, Any]:
        """xgrammar's structural-tag format for one or more calls (one when not `parallel`)
        of `tools`, each with arguments valid against its parameters schema."""
        tags = []
        for name, params in map(function_spec, tools):
            try:
                grammar = compact_json_grammar(params)
            except RequestError as e:
                raise ToolError(f"tool {name!r}: {e}") from e
            tags.append(
                {
                    "type": "tag",
                    "begin": self.call_begin.format(name=json.dumps(name)),
                    "content": {"type": "grammar", "grammar": grammar},
                    "end": self.call_end,
                }
            )
        return {
            "type": "tags_with_separator",
            "tags": tags,
            "separator": self.separator,
            "at_least_one": True,
            "stop_after_first": not parallel,
        }


class HermesParser(ToolParser):
    """Hermes and Qwen2.5: `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`.
    A format that only changes the two tags subclasses this with other `start` and `close`."""

    name = "hermes"
    start = "<tool_call>"
    close = "</tool_call>"
    call_begin = '<tool_call>\n{{"name": {name}, "arguments": '
    call_end = "}\n</tool_call>"
    separator = "\n"

    @classmethod
    def detect(cls, template: str) -> bool:
        return "<tool_call>" in template

    def read_calls(self, tail: str, final: bool) -> list[ToolCall] | None:
        calls = []
        pattern = re.escape(self.start) + "(.*?)" + re.escape(self.close)
        for body in re.findall(pattern, tail, re.DOTALL):
            call = _loads_call(body, ("arguments", "parameters"))
            if call is None:  # a closed call that is not one: the output is not calls
                return None if final else calls
            calls.append(call)
        last_open = tail.rfind(self.start)
        if final and last_open > tail.rfind(self.close):  # a last call left open
            call = _loads_call(tail[last_open + len(self.start) :], ("arguments",))
            calls += [call] if call is not None else []  # cut short: dropped
        return calls or (None if final else [])


class Llama3JsonParser(ToolParser):
    """Llama 3.1-3.3: the output is `{"name": ..., "parameters": {...}}` (after an optional
    `<|python_tag|>`), several calls separated by `;`."""

    name = "llama3_json"
    start = "{"

    @classmethod
    def detect(cls, template: str) -> bool:
        return "<|python_tag|>" in template or "ipython" in template

    call_begin = '{{"name": {name}, "parameters": '
    call_end = "}"
    separator = "; "

    def find_start(self, text: str) -> int | None:
        stripped = text.lstrip()
        stripped = stripped.removeprefix("<|python_tag|>").lstrip()
        if not stripped:
            return None
        return len(text) - len(stripped) if stripped.startswith("{") else -1

    def holdback(self, text: str) -> int:
        # Until the first character that is not whitespace, the output may still be a call.
        return len(text) if not text.strip() or "<|python_tag|>".startswith(text.strip()) else 0

    def read_calls(self, tail: str, final: bool) -> list[ToolCall] | None:
        values, _ = _decode_all(tail, 0, ";")
        calls = [_call(v, ("parameters", "arguments")) for v in values]
        if any(c is None for c in calls):
            return None
        return calls or (None if final else [])  # type: ignore[return-value]


class MistralParser(ToolParser):
    """Mistral: `[TOOL_CALLS] [{"name": ..., "arguments": {...}}, ...]` (tokenizer v3), or
    `[TOOL_CALLS]name[ARGS]{...}` (later tokenizers)."""

    name = "mistral"
    start = "[TOOL_CALLS]"
    call_begin = '{{"name": {name}, "arguments": '
    call_end = "}"
    separator = ", "
    needs_special_tokens = True  # [TOOL_CALLS] is a control token in Mistral's tokenizers

    @classmethod
    def detect(cls, template: str) -> bool:
        return "[TOOL_CALLS]" in template

    def read_calls(self, tail: str, final: bool) -> list[ToolCall] | None:
        body = tail[len(self.start) :]
        if "[ARGS]" in body:
            return self._read_named(body, final)
        body = body.lstrip()
        if body.startswith("["):
            values, _ = _decode_all(body, 1, ",")
        else:
            values, _ = _decode_all(body, 0, ",")
        calls = [_call(v, ("arguments", "parameters")) for v in values]
        if any(c is None for c in calls):
            return None
        return calls or (None if final else [])  # type: ignore[return-value]

    def _read_named(self, body: str, final: bool) -> list[ToolCall] | None:
        calls = []
        for part in body.split("[TOOL_CALLS]"):
            name, _, args = part.partition("[ARGS]")
            values, _ = _decode_all(args, 0, "")
            call = (
                _call({"name": name.strip(), "arguments": values[0]}, ("arguments",))
                if values
                else None
            )
            if call is None:
                return None if final else calls
            calls.append(call)
        return calls

    def constraint(self, tools: Sequence[Tool], parallel: bool) -> dict[str, Any]:
        # The calls as the content of one tag (a sequence may end with open-ended content
        # only, in xgrammar before 0.2).
        calls = super().constraint(tools, parallel)
        return {"type": "tag", "begin": "[TOOL_CALLS] [", "content": calls, "end": "]"}


from .tool_formats import (  # noqa: E402 - they build on the classes above
    DeepSeekV3Parser,
    DeepSeekV31Parser,
    Glm45ToolParser,
    HarmonyParser,
    PythonicParser,
    Qwen3CoderParser,
)

# In the order templates are matched: a more specific format before one whose markers it
# shares (Qwen3-Coder's and GLM-4.5's calls sit inside <tool_call> too, and pythonic templates
# name the ipython role as Llama 3's do).
PARSERS: dict[str, type[ToolParser]] = {
    p.name: p
    for p in (
        Qwen3CoderParser,
        Glm45ToolParser,
        HermesParser,
        MistralParser,
        DeepSeekV3Parser,
        DeepSeekV31Parser,
        HarmonyParser,
        PythonicParser,
        Llama3JsonParser,
    )
}


def all_parsers(extra: Iterable[type[ToolParser]] = ()) -> dict[str, type[ToolParser]]:
    """The built-in parsers and those plugins add (a plugin's wins a name it shares)."""
    return {**PARSERS, **{p.name: p for p in extra}}


def parser_for_template(template: str, extra: Iterable[type[ToolParser]] = ()) -> ToolParser | None:
    """The call format a chat template teaches, from the markers it writes: the first parser
    that recognises it, plugins' parsers first."""
    for parser in [*extra, *PARSERS.values()]:
        if parser.detect(template):
            return parser()
    return None


def template_supports_tools(template: str) -> bool:
    """Whether the template renders the `tools` it is given at all."""
    return re.search(r"\btools\b", template) is not None


class ToolCallStream:
    """Split an output that arrives in pieces into content and tool calls as they complete.

    Content is sent as it comes, except text that may be the start of the call marker; once
    the marker is there, everything after it is held and each call is sent when it is whole.
    If the held text turns out to hold no call, it is sent as content at the end. A `forced`
    output (tool_choice "required" or a named function) is all calls, by its grammar: none of
    it is ever content, not even a call cut short by max_tokens or the context.
    """

    def __init__(self, parser: ToolParser, parallel: bool = True, forced: bool = False) -> None:
        self.parser = parser
        self.parallel = parallel
        self.forced = forced
        self.text = ""
        self.sent_text = 0  # characters sent as content
        self.calls: list[ToolCall] = []  # calls sent

    def feed(self, delta: str, final: bool = False) -> tuple[str, list[ToolCall]]:
        """Add a piece of output; returns the content to send now and the calls completed."""
        self.text += delta
        start = self.parser.find_start(self.text)
        if start is None or start < 0:
            end = len(self.text)
            if start is None and not final:
                end -= self.parser.holdback(self.text)
            return self._content(end), []
        content = self._content(start)
        calls = self.parser.read_calls(self.text[start:], final)
        if final and not calls and not self.calls:  # a marker, but no call after it
            return content + self._content(len(self.text)), []
        new = (calls or [])[len(self.calls) :]
        if not self.parallel:
            new = new[: max(0, 1 - len(self.calls))]
        self.calls.extend(new)
        return content, new

    def _content(self, end: int) -> str:
        if end <= self.sent_text or self.forced:
            return ""
        piece = self.text[self.sent_text : end]
        self.sent_text = end
        return piece


@dataclass
class ToolUse:
    """A request's tools, checked against the model: how to constrain it and read its calls."""

    parser: ToolParser
    tools: list[Tool]
    forced: list[Tool] | None  # tools one of which must be called ("required", named)
    parallel: bool = True

    def generation_config(self, config: GenerationConfig) -> GenerationConfig:
        """`config` with the grammar that forces a call, when one is forced."""
        update: dict[str, Any] = {}
        if self.forced is not None:
            if config.constraint is not None:
                raise ToolError(
                    "tool_choice 'required' or a named function already constrains the "
                    "output; drop response_format (or regex, choice, grammar) from the request",
                    "tool_choice",
                )
            update["structural_tag"] = self.parser.constraint(self.forced, self.parallel)
        if self.parser.needs_special_tokens:
            update["skip_special_tokens"] = False  # the call marker is a special token
        return config.model_copy(update=update) if update else config

    def split(self, text: str) -> tuple[str, list[ToolCall]]:
        """A finished output's content and calls (a forced output has no content)."""
        return self.stream().feed(text, final=True)

    def stream(self) -> ToolCallStream:
        return ToolCallStream(self.parser, self.parallel, forced=self.forced is not None)


def resolve_tools(
    tools: Sequence[Tool] | None,
    tool_choice: str | Mapping[str, Any] | None,
    parallel: bool | None,
    template: str,
    parser: ToolParser | None,
) -> ToolUse | None:
    """Check a request's tools and tool_choice against the model's template; None when the
    request lets no tool be called. Raises `ToolError` naming what is wrong."""
    choice = "auto" if tool_choice is None else tool_choice
    if not tools:
        if choice not in ("auto", "none"):
            raise ToolError(f"tool_choice {choice!r} needs tools; add them", "tool_choice")
        return None
    names = [function_spec(t)[0] for t in tools]
    if choice == "none":
        return None
    if not template_supports_tools(template):
        raise ToolError(
            "this model's chat template does not render tools, so the model cannot be told "
            "about them; use a model whose template supports tools, or pass a chat template "
            "that does (chat_template= / --chat-template)"
        )
    if parser is None:
        raise ToolError(
            "this model's chat template renders tools, but in a call format enginehouse does "
            f"not read (it reads {', '.join(PARSERS)}); set Pipeline.tool_parser to "
            "one of enginehouse.tool_calls.PARSERS"
        )
    forced: list[Tool] | None
    if choice == "auto":
        forced = None
    elif choice == "required":
        forced = list(tools)
    elif isinstance(choice, Mapping) and isinstance(choice.get("function"), Mapping):
        name = choice["function"].get("name")
        if name not in names:
            raise ToolError(
                f"tool_choice names the function {name!r}, but no tool has that name "
                f"(tools: {', '.join(names)})",
                "tool_choice",
            )
        forced, parallel = [tools[names.index(name)]], False
    else:
        raise ToolError(
            "tool_choice must be 'none', 'auto', 'required' or "
            "{'type': 'function', 'function': {'name': ...}}",
            "tool_choice",
        )
    return ToolUse(parser.with_tools(tools), list(tools), forced, parallel is not False)
