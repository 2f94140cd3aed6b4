"""Tool-call formats beyond Hermes, Llama 3 and Mistral: Qwen3-Coder's XML, DeepSeek-V3/R1's
tokens, the pythonic list (Llama 4, Gemma 3), gpt-oss's harmony messages and GLM-4.5's argument
tags; each chosen from its chat template (tests/family_templates.py), read whole and streamed
alike, forced by a grammar in the model's own format on random weights, sent by the server as
OpenAI's tool-call deltas, and rendered back into the template with the tool's result. A
plugin's format (the toy plugin's, through `register_tool_parsers`) works the same way."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest
from family_templates import (
    DEEPSEEK_R1,
    GLM45,
    HARMONY,
    PYTHONIC,
    QWEN3,
    QWEN3_CODER,
    build_family_model,
)

from enginehouse import GenerationConfig, pipeline
from enginehouse.parsers import reasoning_parser_for, tool_parser_for, tool_parser_named
from enginehouse.serve import ServerThread, create_app
from enginehouse.testing import HERMES_TOOLS_TEMPLATE, build_model, build_tokenizer, model_configs
from enginehouse.tool_calls import PARSERS, ToolCallStream

SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "enum": ["Paris", "Tokyo"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
        "note": {"type": "string", "maxLength": 5},
        "hourly": {"type": "boolean"},
    },
    "required": ["city", "days", "note", "hourly"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": SCHEMA}},
    {"type": "function", "function": {"name": "now"}},
]
ASK = [{"role": "user", "content": "weather?"}]
FAMILIES = ["qwen3_coder", "deepseek_r1", "pythonic", "glm45", "gpt_oss"]
PARSER_OF = {
    "qwen3_coder": "qwen3_coder",
    "deepseek_r1": "deepseek_v3",
    "pythonic": "pythonic",
    "glm45": "glm45",
    "gpt_oss": "openai",
}


def test_formats_are_chosen_from_the_template():
    chosen = {
        name: tool_parser_for(template).name
        for name, template in {
            "qwen3_coder": QWEN3_CODER,
            "deepseek_v3": DEEPSEEK_R1,
            "pythonic": PYTHONIC,
            "glm45": GLM45,
            "openai": HARMONY,
            "hermes": QWEN3,
        }.items()
    }
    assert chosen == {name: name for name in chosen}
    assert tool_parser_for(HERMES_TOOLS_TEMPLATE).name == "hermes"
    assert tool_parser_for("{{ tools }}<toy_call>").name == "toy"  # the toy plugin's
    assert reasoning_parser_for(GLM45).name == "glm45"
    assert reasoning_parser_for(HARMONY).name == "gpt_oss"
    assert {"qwen3_coder", "deepseek_v3", "deepseek_v31", "pythonic", "glm45", "openai"} <= set(
        PARSERS
    )
    with pytest.raises(ValueError, match="unknown tool-call parser 'nope'"):
        tool_parser_named("nope")


WEATHER = {"city": "Paris", "days": 3, "note": "1 < 2", "hourly": True}
CASES = {
    "qwen3_coder": (
        "Let me check.\n<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n"
        "</parameter>\n<parameter=days>\n3\n</parameter>\n<parameter=note>\n1 < 2\n</parameter>\n"
        "<parameter=hourly>\ntrue\n</parameter>\n</function>\n</tool_call>\n<tool_call>\n"
        "<function=now>\n</function>\n</tool_call>",
        "Let me check.\n",
    ),
    "deepseek_v3": (
        "Let me check.<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>"
        'get_weather\n```json\n{"city": "Paris", "days": 3, "note": "1 < 2", "hourly": true}\n```'
        "<｜tool▁call▁end｜>\n<｜tool▁call▁begin｜>function<｜tool▁sep｜>now\n```json\n{}\n```"
        "<｜tool▁call▁end｜><｜tool▁calls▁end｜>",
        "Let me check.",
    ),
    "deepseek_v31": (
        "Let me check.<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>"
        '{"city": "Paris", "days": 3, "note": "1 < 2", "hourly": true}<｜tool▁call▁end｜>'
        "<｜tool▁call▁begin｜>now<｜tool▁sep｜>{}<｜tool▁call▁end｜><｜tool▁calls▁end｜>",
        "Let me check.",
    ),
    "pythonic": (
        '[get_weather(city="Paris", days=3, note="1 < 2", hourly=True), now()]',
        "",
    ),
    "glm45": (
        "Let me check.\n<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Paris"
        "</arg_value>\n<arg_key>days</arg_key>\n<arg_value>3</arg_value>\n<arg_key>note"
        "</arg_key>\n<arg_value>1 < 2</arg_value>\n<arg_key>hourly</arg_key>\n<arg_value>true"
        "</arg_value>\n</tool_call>\n<tool_call>now\n</tool_call>",
        "Let me check.\n",
    ),
    "openai": (
        "<|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json"
        '<|message|>{"city": "Paris", "days": 3, "note": "1 < 2", "hourly": true}<|call|>'
        "<|start|>assistant to=functions.now<|channel|>commentary json<|message|>{}",
        "",
    ),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_calls_are_read_alike_whole_and_streamed(name):
    text, content = CASES[name]
    parser = PARSERS[name]().with_tools(TOOLS)
    whole_content, calls = parser.parse(text)
    assert whole_content == content
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", WEATHER),
        ("now", {}),
    ]
    for size in (1, 3, 7):
        stream = ToolCallStream(parser)
        pieces = [stream.feed(text[i : i + size]) for i in range(0, len(text), size)]
        pieces.append(stream.feed("", final=True))
        assert "".join(p[0] for p in pieces) == content
        assert [c.arguments for p in pieces for c in p[1]] == [c.arguments for c in calls]


def test_text_without_calls_stays_content():
    for name in CASES:
        parser = PARSERS[name]().with_tools(TOOLS)
        assert parser.parse("just an answer") == ("just an answer", [])


# --- random weights forced into each format ------------------------------------------------


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, models_dir):
    """(name, pipeline, nudges): the nudges make random weights end their reasoning soon."""
    name = request.param
    folder = build_family_model(models_dir / f"tools-{name}", name)
    with pipeline(str(folder), engine_config={"max_batch_size": 8}, progress=False) as pipe:
        ends = {"deepseek_r1": "</think>", "gpt_oss": "<|end|>"}
        bias = {}
        if name in ends:
            bias = {pipe.tokenizer.convert_tokens_to_ids(ends[name]): 8.0}
        kwargs = {"enable_thinking": False} if name == "glm45" else {}
        yield name, pipe, bias, kwargs


def check(calls, names=("get_weather", "now")):
    assert calls
    for call in calls:
        assert call.name in names
        arguments = json.loads(call.arguments)
        if call.name == "get_weather":
            jsonschema.validate(arguments, SCHEMA)


def test_forced_calls_in_the_models_own_format(family):
    name, pipe, bias, kwargs = family
    assert pipe.tool_parser.name == PARSER_OF[name]
    config = GenerationConfig(max_new_tokens=300, logit_bias=bias or None)
    for parallel, seed in ((False, 0), (False, 1), (True, 0)):
        seeded = config.model_copy(update={"do_sample": True, "random_seed": seed})
        if parallel:  # random weights may go on calling until max_new_tokens cuts them short
            seeded = seeded.model_copy(update={"max_new_tokens": 160})
        r = pipe(
            ASK,
            seeded,
            tools=TOOLS,
            tool_choice="required",
            parallel_tool_calls=parallel,
            chat_template_kwargs=kwargs,
        )
        check(r.tool_calls)
        if not parallel:
            assert r.finish_reason == "tool_calls" and len(r.tool_calls) == 1
    named = {"type": "function", "function": {"name": "get_weather"}}
    r = pipe(ASK, config, tools=TOOLS, tool_choice=named, chat_template_kwargs=kwargs)
    assert [c.name for c in r.tool_calls] == ["get_weather"]
    check(r.tool_calls)
    # The call and its result go back through the template, and the model answers.
    history = [
        *ASK,
        {"role": "assistant", "content": "", "tool_calls": [c.to_openai() for c in r.tool_calls]},
        {"role": "tool", "tool_call_id": r.tool_calls[0].id, "content": "sunny"},
    ]
    text = pipe.tokenizer.decode(pipe.encode(history, tools=TOOLS), skip_special_tokens=False)
    assert "sunny" in text and "get_weather" in text
    answer = pipe(
        history, GenerationConfig(max_new_tokens=4), tools=TOOLS, chat_template_kwargs=kwargs
    )
    assert answer.finish_reason in ("length", "stop", "tool_calls")


def test_server_streams_the_calls_as_openais_deltas(family):
    name, pipe, bias, kwargs = family
    with ServerThread(create_app(pipe, "m")) as running:
        client = openai.OpenAI(base_url=f"{running.url}/v1", api_key="-", max_retries=0)
        kw = dict(
            model="m",
            messages=ASK,
            tools=TOOLS,
            tool_choice="required",
            max_tokens=300,
            temperature=0,
            extra_body={
                "logit_bias": {str(t): b for t, b in bias.items()},
                "chat_template_kwargs": kwargs,
            },
        )
        whole = client.chat.completions.create(**kw)
        with client.chat.completions.stream(**kw) as stream:
            for _ in stream:
                pass
            streamed = stream.get_final_completion()
    want = whole.choices[0]
    got = streamed.choices[0]
    assert want.finish_reason == got.finish_reason == "tool_calls"
    assert [(c.function.name, c.function.arguments) for c in got.message.tool_calls] == [
        (c.function.name, c.function.arguments) for c in want.message.tool_calls
    ]
    assert (got.message.content or None) == (want.message.content or None)


# --- a plugin's format ----------------------------------------------------------------------

TOY_TEMPLATE = (
    "{% if tools %}Tools: {{ tools | tojson }}. Call one as <toy_call>{...}</toy_call>.\n"
    "{% endif %}{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: <toy_think>{% endif %}"
)


def test_a_plugins_tool_and_reasoning_formats_run_end_to_end(models_dir):
    folder = models_dir / "toy-format"
    tokenizer = build_tokenizer(folder, 500, TOY_TEMPLATE)
    tokenizer.add_tokens(["<toy_call>", "</toy_call>", "<toy_think>", "</toy_think>"])
    config = model_configs(512)["qwen2"]
    config.max_position_embeddings = 1024
    build_model(folder, config, TOY_TEMPLATE, tokenizer=tokenizer)
    with pipeline(str(folder), progress=False) as pipe:
        assert (pipe.tool_parser.name, pipe.reasoning_parser.name) == ("toy", "toy")
        end = pipe.tokenizer.convert_tokens_to_ids("</toy_think>")
        config = GenerationConfig(max_new_tokens=200, logit_bias={end: 8.0})
        r = pipe(ASK, config, tools=TOOLS, tool_choice="required", parallel_tool_calls=False)
        raw = pipe.tokenizer.decode(r.token_ids)
    # The prompt opened the toy reasoning; the grammar let it close, then forced a toy call.
    assert "</toy_think>" in raw and raw.index("</toy_think>") < raw.index("<toy_call>")
    assert r.finish_reason == "tool_calls" and "</toy_think>" not in (r.reasoning or "")
    check(r.tool_calls)


def test_explain_names_the_formats_serve_will_use(family):
    from enginehouse import explain

    name, pipe, _, _ = family
    chat = explain(str(pipe.spec.path))["chat"]
    reasoning = {"deepseek_r1": "deepseek_r1", "glm45": "glm45", "gpt_oss": "gpt_oss"}
    assert chat == {
        "template": "tokenizer",
        "tool_parser": PARSER_OF[name],
        "reasoning_parser": reasoning.get(name),
    }
