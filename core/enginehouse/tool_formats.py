"""More tool-call formats: Qwen3-Coder's XML, DeepSeek-V3's and V3.1's tokens, the pythonic list
of Llama 4 and Gemma 3, gpt-oss's harmony messages and GLM-4.5's argument tags.

Each reads calls as `tool_calls.ToolParser` defines (whole or streaming, through
`ToolCallStream`) and builds the grammar that makes a model write valid calls in its own format
(`constraint`). Where a format writes argument values as plain text (Qwen3-Coder, GLM-4.5), the
values are typed back by the tool's parameter schema, which the parser gets from the request
(`with_tools`). Names follow vLLM's `--tool-call-parser`.
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from .engine.grammar import compact_json_grammar
from .errors import RequestError
from .tool_calls import Tool, ToolCall, ToolError, ToolParser, _call, function_spec, held_prefix


def _json_value(schema: Any, name: str) -> dict[str, Any]:
    """A structural-tag format for one JSON value valid against `schema`."""
    try:
        return {"type": "grammar", "grammar": compact_json_grammar(schema)}
    except RequestError as e:
        raise ToolError(f"tool {name!r}: {e}") from e


def _raw_text_value(schema: Mapping[str, Any], name: str) -> dict[str, Any]:
    """A format for a value written as plain text (an XML-ish format's string parameter): one
    of its enum values, or text without '<' within the schema's length bounds; other types are
    written as JSON."""
    if schema.get("type") != "string":
        return _json_value(schema, name)
    if "enum" in schema:
        return {
            "type": "or",
            "elements": [{"type": "const_string", "value": str(v)} for v in schema["enum"]],
        }
    low, high = schema.get("minLength", 0), schema.get("maxLength", "")
    return {"type": "regex", "pattern": f"[^<]{{{low},{high}}}"}


def _required(params: Mapping[str, Any]) -> list[tuple[str, Mapping[str, Any]]]:
    """The parameters a forced call writes: the required ones, in the schema's order."""
    properties = params.get("properties") or {}
    required = set(params.get("required") or [])
    return [
        (k, v if isinstance(v, Mapping) else {}) for k, v in properties.items() if k in required
    ]


def _typed(value: str, schema: Mapping[str, Any] | None) -> Any:
    """A parameter written as text, typed by its schema (vLLM's rule): strings stay text,
    numbers, booleans, objects and arrays are read as JSON when they parse."""
    text = value.strip("\n")
    kind = (schema or {}).get("type")
    if kind == "string":
        return text
    try:
        return json.loads(text)
    except ValueError:
        if kind in ("integer", "number"):
            try:
                return float(text) if kind == "number" else int(text)
            except ValueError:
                return text
        return text


class _TypedArguments(ToolParser):
    """A format whose argument values are plain text, typed back by the tools' schemas."""

    def __init__(self) -> None:
        self.schemas: dict[str, Mapping[str, Any]] = {}

    def with_tools(self, tools: Sequence[Tool]) -> ToolParser:
        bound = type(self)()
        bound.schemas = {name: params for name, params in map(function_spec, tools)}
        return bound

    def _tagged(
        self,
        tools: Sequence[Tool],
        parallel: bool,
        call: tuple[str, str],
        argument: tuple[str, str],
    ) -> dict[str, Any]:
        """The grammar of calls written as tags: `call` (its begin holds `{name}`) around the
        required arguments, each `argument` (its begin holds `{key}`) around a plain-text
        value of its schema's type."""
        tags = []
        for name, params in map(function_spec, tools):
            elements = [
                {
                    "type": "tag",
                    "begin": argument[0].format(key=key),
                    "content": _raw_text_value(schema, name),
                    "end": argument[1],
                }
                for key, schema in _required(params)
            ]
            content = (
                {"type": "sequence", "elements": elements}
                if elements
                else {"type": "const_string", "value": ""}
            )
            begin = call[0].format(name=name)
            tags.append({"type": "tag", "begin": begin, "content": content, "end": call[1]})
        return _calls(tags, "\n", parallel)

    def _build(self, name: str, pairs: list[tuple[str, str]]) -> ToolCall:
        properties = (self.schemas.get(name) or {}).get("properties") or {}
        arguments = {key: _typed(value, properties.get(key)) for key, value in pairs}
        return ToolCall(name, json.dumps(arguments, ensure_ascii=False))


class Qwen3CoderParser(_TypedArguments):
    """Qwen3-Coder: `<tool_call>\\n<function=NAME>\\n<parameter=KEY>\\nVALUE\\n</parameter>\\n
    </function>\\n</tool_call>`; string values as written, others as JSON."""

    name = "qwen3_coder"
    start = "<tool_call>"

    @classmethod
    def detect(cls, template: str) -> bool:
        return "<function=" in template and "<parameter=" in template

    def read_calls(self, tail: str, final: bool) -> list[ToolCall] | None:
        calls = []
        for body in re.findall(r"<tool_call>(.*?)</tool_call>", tail, re.DOTALL):
            function = re.search(r"<function=([^>\n]+)>(.*?)</function>", body, re.DOTALL)
            if function is None:
                return None if final else calls
            pairs = re.findall(
                r"<parameter=([^>\n]+)>\n?(.*?)\n?</parameter>", function.group(2), re.DOTALL
            )
            calls.append(self._build(function.group(1).strip(), pairs))
        return calls or (None if final else [])

    def constraint(self, tools: Sequence[Tool], parallel: bool) -> dict[str, Any]:
        return self._tagged(
            tools,
            parallel,
            call=("<tool_call>\n<function={name}>\n", "</function>\n</tool_call>"),
            argument=("<parameter={key}>\n", "\n</parameter>\n"),
        )


class Glm45ToolParser(_TypedArguments):
    """GLM-4.5 / 4.6: `<tool_call>NAME\\n<arg_key>KEY</arg_key>\\n<arg_value>VALUE</arg_value>\\n
    </tool_call>`; string values as written, others as JSON."""

    name = "glm45"
    start = "<tool_call>"

    @classmethod
    def detect(cls, template: str) -> bool:
        return "<arg_key>" in template

    def read_calls(self, tail: str, final: bool) -> list[ToolCall] | None:
        calls = []
        for body in re.findall(r"<tool_call>(.*?)</tool_call>", tail, re.DOTALL):
            name = body.split("<arg_key>", 1)[0].strip()
            if not name:
                return None if final else calls
            pairs = re.findall(
                r"<arg_key>(.*?)</arg_key>\s*<arg_value>(.*?)</arg_value>", body, re.DOTALL
            )
            calls.append(self._build(name, [(k.strip(), v) for k, v in pairs]))
        return calls or (None if final else [])

    def constraint(self, tools: Sequence[Tool], parallel: bool) -> dict[str, Any]:
        return self._tagged(
            tools,
            parallel,
            call=("<tool_call>{name}\n", "</tool_call>"),
            argument=("<arg_key>{key}</arg_key>\n<arg_value>", "</arg_value>\n"),
        )


CALLS_BEGIN, CALLS_END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
CALL_BEGIN, CALL_END, SEP = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>"


class DeepSeekV3Parser(ToolParser):
    """DeepSeek-V3 and R1: the calls between DeepSeek's tool-call tokens, each
    `<｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME\\n```json\\n{...}\\n```<｜tool▁call▁end｜>`.
    V3.1's form (`NAME<｜tool▁sep｜>{...}`, no fence) is read too."""

    name = "deepseek_v3"
    start = CALLS_BEGIN
    needs_special_tokens = True  # the markers may be special tokens

    @classmethod
    def detect(cls, template: str) -> bool:
        return CALLS_BEGIN in template and "```json" in template

    def read_calls(self, tail: str, final: bool) -> list[ToolCall] | None:
        calls = []
        for body in re.findall(
            re.escape(CALL_BEGIN) + "(.*?)" + re.escape(CALL_END), tail, re.DOTALL
        ):
            head, found, args = body.partition(SEP)
            if not found:
                return None if final else calls
            if head.strip() == "function":  # V3: the name, then fenced JSON
                name, _, args = args.partition("\n")
                fenced = re.match(r"\s*```(?:json)?\s*(.*?)\s*```\s*$", args, re.DOTALL)
                args = fenced.group(1) if fenced else args
            else:  # V3.1: the name before the separator, the JSON after it
                name = head
            call = _call({"name": name.strip(), "arguments": args.strip()}, ("arguments",))
            if call is None:
                return None if final else calls
            calls.append(call)
        return calls or (None if final else [])

    def _call_begin(self, name: str) -> str:
        return f"{CALL_BEGIN}function{SEP}{name}\n```json\n"

    call_close = "\n```" + CALL_END

    def constraint(self, tools: Sequence[Tool], parallel: bool) -> dict[str, Any]:
        tags = [
            {
                "type": "tag",
                "begin": self._call_begin(name),
                "content": _json_value(params, name),
                "end": self.call_close,
            }
            for name, params in map(function_spec, tools)
        ]
        calls = _calls(tags, "\n", parallel)
        return {"type": "tag", "begin": CALLS_BEGIN, "content": calls, "end": CALLS_END}


class DeepSeekV31Parser(DeepSeekV3Parser):
    """DeepSeek-V3.1: `<｜tool▁call▁begin｜>NAME<｜tool▁sep｜>{...}<｜tool▁call▁end｜>`."""

    name = "deepseek_v31"
    call_close = CALL_END

    @classmethod
    def detect(cls, template: str) -> bool:
        return CALLS_BEGIN in template and "```json" not in template

    def _call_begin(self, name: str) -> str:
        return f"{CALL_BEGIN}{name}{SEP}"


def _literal(node: ast.AST) -> Any:
    """A Python literal, JSON's true/false/null included (models write both)."""
    if isinstance(node, ast.Name) and node.id in ("true", "false", "null"):
        return {"true": True, "false": False, "null": None}[node.id]
    if isinstance(node, ast.List):
        return [_literal(e) for e in node.elts]
    if isinstance(node, ast.Dict):
        return {_literal(k): _literal(v) for k, v in zip(node.keys, node.values)}  # type: ignore[arg-type]
    return ast.literal_eval(node)


class PythonicParser(ToolParser):
    """Llama 4, Llama 3.2 and Gemma 3 (pythonic templates): the output is a Python list of
    calls, `[get_weather(city="Paris", days=3), now()]`, maybe between `<|python_start|>` and
    `<|python_end|>`. The calls are read when the list is complete."""

    name = "pythonic"
    start = "["

    @classmethod
    def detect(cls, template: str) -> bool:
        return "[func_name1(" in template or "<|python_start|>" in template

    @staticmethod
    def _body(text: str) -> str:
        return text.strip().removeprefix("<|python_start|>").removesuffix("<|python_end|>").strip()

    def find_start(self, text: str) -> int | None:
        body = self._body(text)
        if not body:
            return None
        return text.find("[") if body.startswith("[") else -1

    def holdback(self, text: str) -> int:
        # Until the first character that is not whitespace, the output may still be calls.
        stripped = text.strip()
        return len(text) if not stripped or "<|python_start|>".startswith(stripped) else 0

    def read_calls(self, tail: str, final: bool) -> list[ToolCall] | None:
        try:
            tree = ast.parse(self._body(tail), mode="eval").body
        except SyntaxError:
            return None if final else []  # not a whole list yet
        if not isinstance(tree, ast.List) or not tree.elts:
            return None
        calls = []
        for node in tree.elts:
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name) or node.args:
                return None
            try:
                arguments = {kw.arg: _literal(kw.value) for kw in node.keywords}
            except (ValueError, TypeError):
                return None
            calls.append(ToolCall(node.func.id, json.dumps(arguments, ensure_ascii=False)))
        return calls

    def constraint(self, tools: Sequence[Tool], parallel: bool) -> dict[str, Any]:
        tags = []
        for name, params in map(function_spec, tools):
            elements: list[dict[str, Any]] = []
            for i, (key, schema) in enumerate(_required(params)):
                prefix = f"{', ' if i else ''}{key}="
                elements += [{"type": "const_string", "value": prefix}, _python_value(schema, name)]
            content = (
                {"type": "sequence", "elements": elements}
                if elements
                else {"type": "const_string", "value": ""}
            )
            tags.append({"type": "tag", "begin": f"{name}(", "content": content, "end": ")"})
        calls = _calls(tags, ", ", parallel)
        return {"type": "tag", "begin": "[", "content": calls, "end": "]"}


def _python_value(schema: Mapping[str, Any], name: str) -> dict[str, Any]:
    """A Python literal valid against `schema`: JSON's form, but True, False and None."""
    if schema.get("type") == "boolean":
        return {
            "type": "or",
            "elements": [{"type": "const_string", "value": v} for v in ("True", "False")],
        }
    if schema.get("type") == "null":
        return {"type": "const_string", "value": "None"}
    return _json_value(schema, name)  # strings, numbers, lists and dicts read as Python too


_HARMONY_CALL = re.compile(
    r"(?:<\|start\|>assistant)?([^<]*)<\|channel\|>"
    r"((?:(?!<\|(?:message|end|start|call|return)\|>).)*)<\|message\|>"
    r"(.*?)(?=<\|call\|>|<\|end\|>|<\|start\|>|$)",
    re.DOTALL,
)


class HarmonyParser(ToolParser):
    """gpt-oss (harmony): a call is a message on the commentary channel addressed to the
    function, `<|channel|>commentary to=functions.NAME <|constrain|>json<|message|>{...}`,
    ended by `<|call|>` (an end-of-turn token). vLLM names this parser `openai`."""

    name = "openai"
    start = "<|channel|>commentary to=functions."
    needs_special_tokens = True

    @classmethod
    def detect(cls, template: str) -> bool:
        return "<|channel|>" in template and "<|call|>" in template

    def find_start(self, text: str) -> int | None:
        match = re.search(
            r"(?:<\|start\|>assistant)?[^<]*?(?:to=functions\.|<\|channel\|>commentary to=)", text
        )
        if match is None:
            return None
        return match.start()

    def holdback(self, text: str) -> int:
        # A message header may be arriving: hold from its first marker, or a marker's start.
        markers = ("<|start|>", "<|channel|>")
        for marker in markers:
            i = text.rfind(marker)
            if i >= 0 and "<|message|>" not in text[i:]:
                return len(text) - i
        return max(held_prefix(text, m) for m in markers)

    def read_calls(self, tail: str, final: bool) -> list[ToolCall] | None:
        calls = []
        for match in _HARMONY_CALL.finditer(tail):
            # The recipient is in the role part or in the channel part of the header.
            name = re.search(r"to=functions\.([\w.\-]+)", match.group(1))
            name = name or re.search(r"to=functions\.([\w.\-]+)", match.group(2))
            if name is None:
                continue  # another message (a preamble): not a call
            done = final or match.end() < len(tail)
            if not done:
                break
            call = _call(
                {"name": name.group(1), "arguments": match.group(3).strip()}, ("arguments",)
            )
            if call is None:
                return None if final else calls
            calls.append(call)
        return calls or (None if final else [])

    def constraint(self, tools: Sequence[Tool], parallel: bool) -> dict[str, Any]:
        # One call per assistant turn: harmony ends the turn with <|call|> after it.
        tags = [
            {
                "type": "tag",
                "begin": f"<|channel|>commentary to=functions.{name} <|constrain|>json<|message|>",
                "content": _json_value(params, name),
                "end": "",
            }
            for name, params in map(function_spec, tools)
        ]
        return tags[0] if len(tags) == 1 else {"type": "or", "elements": tags}


def _calls(tags: list[dict[str, Any]], separator: str, parallel: bool) -> dict[str, Any]:
    """One call (or several when `parallel`) of the tags, with `separator` between them."""
    return {
        "type": "tags_with_separator",
        "tags": tags,
        "separator": separator,
        "at_least_one": True,
        "stop_after_first": not parallel,
    }
