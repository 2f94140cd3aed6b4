"""A tool-call format and a reasoning format of the toy family, added through the parser hooks:
`<toy_call>{"name": ..., "arguments": {...}}</toy_call>` and `<toy_think>...</toy_think>`."""

from __future__ import annotations

from enginehouse.plugin_api import HermesParser, ReasoningParser


class ToyToolParser(HermesParser):
    name = "toy"
    start, close = "<toy_call>", "</toy_call>"
    call_begin = '<toy_call>{{"name": {name}, "arguments": '
    call_end = "}</toy_call>"
    separator = ""

    @classmethod
    def detect(cls, template: str) -> bool:
        return "<toy_call>" in template


class ToyReasoningParser(ReasoningParser):
    name = "toy"
    start, end = "<toy_think>", "</toy_think>"

    @classmethod
    def detect(cls, template: str) -> bool:
        return "<toy_think>" in template
