"""Structured output and tool calls on random-weight models: every finished answer validates,
whatever the weights, alone or batched with free-text requests, across preemption, the prefix
cache, n > 1, seeds, stop strings and logprobs; tool calls in the Hermes, Llama 3 and Mistral
formats; the server's response_format, vLLM's fields, tools and streamed tool-call deltas read
by the official `openai` client; and each bad input refused with a message and no harm done."""

from __future__ import annotations

import json
import re
import sys

import jsonschema
import openai
import pytest

from enginehouse import GenerationConfig, pipeline
from enginehouse.errors import RequestError
from enginehouse.serve import ServerThread, create_app
from enginehouse.testing import HERMES_TOOLS_TEMPLATE, build_model, model_configs, tight_kv_config
from enginehouse.tool_calls import (
    HermesParser,
    Llama3JsonParser,
    MistralParser,
    ToolCallStream,
    parser_for_template,
)

# Every schema bounds its strings and arrays, so that a grammar must end: random weights would
# otherwise ramble until max_new_tokens.
SCHEMAS = {
    "nested": {
        "type": "object",
        "properties": {
            "user": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "maxLength": 6},
                    "age": {"type": "integer", "minimum": 0, "maximum": 130},
                },
                "required": ["name", "age"],
                "additionalProperties": False,
            },
            "ok": {"type": "boolean"},
        },
        "required": ["user", "ok"],
        "additionalProperties": False,
    },
    "array_of_enums": {
        "type": "array",
        "items": {"enum": ["red", "green", "blue"]},
        "minItems": 1,
        "maxItems": 4,
    },
    "bounded_integers": {
        "type": "object",
        "properties": {
            "x": {"type": "integer", "minimum": -5, "maximum": 5},
            "y": {"type": "integer", "exclusiveMinimum": 10, "maximum": 99},
        },
        "required": ["x", "y"],
        "additionalProperties": False,
    },
    "strings": {
        "type": "object",
        "properties": {
            "code": {"type": "string", "minLength": 2, "maxLength": 5},
            "tags": {
                "type": "array",
                "items": {"type": "string", "maxLength": 3},
                "maxItems": 2,
            },
        },
        "required": ["code", "tags"],
        "additionalProperties": False,
    },
}
PROMPTS = ["hello", "the quick brown fox", "code python torch", "数据 café"]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "the weather",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "enum": ["Paris", "Tokyo"]},
                    "days": {"type": "integer", "minimum": 1, "maximum": 7},
                },
                "required": ["city", "days"],
                "additionalProperties": False,
            },
        },
    },
    {"type": "function", "function": {"name": "now"}},  # no parameters at all
]
PARAMS = {"get_weather": TOOLS[0]["function"]["parameters"], "now": {"maxProperties": 0}}
ASK = [{"role": "user", "content": "weather?"}]


def schema_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}


def check_call(name: str, arguments: str) -> None:
    jsonschema.validate(json.loads(arguments), PARAMS[name])


@pytest.fixture(scope="module")
def tools_pipe(models_dir):
    """A small Qwen2 whose template renders tools in the Hermes format, with room for them."""
    config = model_configs(512)["qwen2"]
    config.max_position_embeddings = 1024
    folder = build_model(models_dir / "qwen2-tools", config, HERMES_TOOLS_TEMPLATE)
    with pipeline(str(folder), engine_config={"max_batch_size": 16}, progress=False) as pipe:
        yield pipe


# --- the Python API -------------------------------------------------------------------------


def test_every_sampled_answer_validates_against_its_schema(llama_pipe):
    cases = [(name, p, seed) for name in SCHEMAS for p in PROMPTS for seed in (None, 1)]
    configs = [
        GenerationConfig(
            max_new_tokens=200,
            response_format=schema_format(SCHEMAS[name]),
            do_sample=seed is not None,
            random_seed=seed,
        )
        for name, _, seed in cases
    ]
    out = llama_pipe([p for _, p, _ in cases], configs)
    finished = [r for r in out if r.finish_reason == "stop"]
    assert len(finished) == len(cases), [r.text for r in out if r.finish_reason != "stop"]
    for (name, _, _), r in zip(cases, out):
        jsonschema.validate(json.loads(r.text), SCHEMAS[name])


def test_regex_choice_grammar_and_json_object(llama_pipe):
    regex = r"[a-z]{2,5}-[0-9]{2}"
    grammar = 'root ::= "yes" | "no" | ("maybe " [0-9])'
    configs = [
        GenerationConfig(regex=regex, max_new_tokens=40),
        GenerationConfig(choice=["Paris", "Tokyo", "東京"], do_sample=True, random_seed=3),
        GenerationConfig(grammar=grammar, max_new_tokens=20),
        GenerationConfig(response_format={"type": "json_object"}, max_new_tokens=200),
    ]
    out = llama_pipe(["hello"] * 4, configs)
    assert re.fullmatch(regex, out[0].text)
    assert out[1].text in ("Paris", "Tokyo", "東京")
    assert re.fullmatch(r"yes|no|maybe [0-9]", out[2].text)
    if out[3].finish_reason == "stop":  # free-form JSON need not end; when it does, it parses
        assert isinstance(json.loads(out[3].text), dict)


def test_a_pydantic_model_class_is_a_schema(llama_pipe):
    from pydantic import BaseModel, Field

    class Point(BaseModel):
        x: int = Field(ge=0, le=9)
        label: str = Field(max_length=4)

    r = llama_pipe("hello", GenerationConfig(response_format=Point, max_new_tokens=60))
    assert Point.model_validate_json(r.text).x in range(10)


def test_free_rows_in_a_mixed_batch_are_untouched(llama_pipe):
    free = GenerationConfig(max_new_tokens=12)
    bound = GenerationConfig(response_format=schema_format(SCHEMAS["nested"]), max_new_tokens=200)
    alone = [r.text for r in llama_pipe(PROMPTS, free)]
    mixed = llama_pipe(PROMPTS + PROMPTS, [free] * 4 + [bound] * 4)
    assert [r.text for r in mixed[:4]] == alone
    bound_alone = llama_pipe(PROMPTS[0], bound)
    assert mixed[4].text == bound_alone.text  # and the mask does not depend on the batch


def test_n_seeds_stop_strings_logprobs_and_the_prefix_cache(llama_pipe):
    fmt = schema_format(SCHEMAS["bounded_integers"])
    seeded = [GenerationConfig(response_format=fmt, do_sample=True, random_seed=s) for s in (7, 7)]
    prompt = "river city light"  # asked for the first time here
    a, b = llama_pipe([prompt, prompt], seeded)
    assert a.text == b.text and a.cached_tokens == 0  # a seed reproduces; n > 1 runs alike
    again = llama_pipe(prompt, seeded[0])
    assert again.text == a.text and again.cached_tokens > 0  # the prefix cache changes nothing
    r = llama_pipe("hello", GenerationConfig(response_format=fmt, logprobs=2, stop_words=[', "y"']))
    assert r.finish_reason == "stop" and r.text.startswith('{"x": ') and '"y"' not in r.text
    assert len(r.logprobs) == r.generate_token_len and all(len(lp) >= 2 for lp in r.logprobs)


def test_preempted_constrained_requests_end_with_the_same_valid_answers(llama_dir, llama_pipe):
    fmt = schema_format(SCHEMAS["strings"])
    prompts = [f"hello {w}" for w in ("the", "fox", "code", "cache", "river", "light")]
    configs = [GenerationConfig(response_format=fmt, max_new_tokens=60, min_new_tokens=3)] * 6
    want = [r.text for r in llama_pipe(prompts, configs)]
    tight = tight_kv_config(llama_pipe, session_len=128, block_size=8, num_blocks=20)
    with pipeline(str(llama_dir), engine_config=tight, progress=False) as pipe:
        out = pipe(prompts, configs)
        assert pipe.stats()["preemptions"] > 0
    assert [r.text for r in out] == want
    for r in out:
        jsonschema.validate(json.loads(r.text), SCHEMAS["strings"])


def test_grammars_are_cached_and_bad_ones_fail_alone(llama_pipe):
    grammars = llama_pipe.engine.engine.grammars
    c = GenerationConfig(regex="[0-9]+").constraint
    assert grammars.compile(c).result() is grammars.compile(c).result()
    assert grammars.is_cached(c)
    with pytest.raises(RequestError, match="JSON schema cannot be compiled.*fix the JSON schema"):
        llama_pipe("hi", GenerationConfig(response_format=schema_format({"type": "foo"})))
    with pytest.raises(RequestError, match="regex cannot be compiled.*parenthesis"):
        llama_pipe("hi", GenerationConfig(regex="a(b"))
    bad, good = llama_pipe(["hi", "hi"], [GenerationConfig(grammar="root ::= "), None])
    assert bad.finish_reason == "error" and "grammar cannot be compiled" in bad.error
    assert good.finish_reason in ("stop", "length") and good.text


def test_generation_config_refuses_two_constraints_and_unknown_formats():
    with pytest.raises(ValueError, match="at most one output constraint; got regex and choice"):
        GenerationConfig(regex="a", choice=["a"])
    with pytest.raises(ValueError, match="response_format type 'xml' is unknown"):
        GenerationConfig(response_format={"type": "xml"})
    with pytest.raises(ValueError, match="needs the schema"):
        GenerationConfig(response_format={"type": "json_schema", "json_schema": {"x": 1}})
    assert GenerationConfig(response_format={"type": "text"}).constraint is None


def test_missing_xgrammar_is_an_error_naming_the_extra(llama_pipe, monkeypatch):
    monkeypatch.setitem(sys.modules, "xgrammar", None)  # makes `import xgrammar` fail
    with pytest.raises(RequestError, match=r"pip install 'enginehouse\[structured\]'"):
        llama_pipe("hi", GenerationConfig(regex="[0-9]+"))
    monkeypatch.undo()
    assert llama_pipe("hi", GenerationConfig(max_new_tokens=2)).generate_token_len >= 1


# --- tool calls -----------------------------------------------------------------------------


@pytest.mark.parametrize("parser", [HermesParser, Llama3JsonParser, MistralParser])
def test_forced_calls_parse_and_validate_in_every_format(tools_pipe, parser):
    """Each format's grammar makes the model write calls its own parser reads back."""
    tools_pipe.tool_parser = parser()
    try:
        named = {"type": "function", "function": {"name": "get_weather"}}
        config = GenerationConfig(max_new_tokens=150)
        out = [
            tools_pipe(ASK, config, tools=TOOLS, tool_choice=c, parallel_tool_calls=False)
            for c in ("required", named)
        ]
    finally:
        tools_pipe.tool_parser = HermesParser()
    for r in out:
        assert r.finish_reason == "tool_calls" and r.tool_calls, r.text
        for call in r.tool_calls:
            check_call(call.name, call.arguments)
    assert [c.name for c in out[1].tool_calls] == ["get_weather"]


def test_chat_keeps_tool_calls_and_results_in_the_history(tools_pipe):
    config = GenerationConfig(max_new_tokens=150)
    session = tools_pipe.chat("weather?", None, config, tools=TOOLS, tool_choice="required")
    call = session.response.tool_calls[0]
    assert session.history[-1]["tool_calls"][0]["function"]["name"] == call.name
    result = {"role": "tool", "tool_call_id": call.id, "content": "sunny"}
    session = tools_pipe.chat(result, session, GenerationConfig(max_new_tokens=4), tools=TOOLS)
    prompt = tools_pipe.chat_template.render(tools_pipe.tokenizer, session.history, tools=TOOLS)
    assert f'"arguments": {call.arguments}' in prompt and "<tool_response>\nsunny" in prompt


def test_tool_errors_name_the_problem(tools_pipe, llama_pipe):
    named = {"type": "function", "function": {"name": "nope"}}
    with pytest.raises(RequestError, match="names the function 'nope'.*get_weather, now"):
        tools_pipe(ASK, tools=TOOLS, tool_choice=named)
    with pytest.raises(RequestError, match="does not render tools"):
        llama_pipe(ASK, tools=TOOLS)
    with pytest.raises(RequestError, match="'required' needs tools"):
        tools_pipe(ASK, tool_choice="required")


@pytest.mark.parametrize(
    "parser, text, content, calls",
    [
        (
            HermesParser(),
            'Sure.\n<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>\n'
            '<tool_call>\n{"name": "g", "arguments": {}}\n</tool_call>',
            "Sure.\n",
            [("f", '{"a": 1}'), ("g", "{}")],
        ),
        (HermesParser(), "<tool_call>not json</tool_call>", None, []),
        (
            Llama3JsonParser(),
            '{"name": "f", "parameters": {"a": 1}}; {"name": "g", "parameters": {}}',
            "",
            [("f", '{"a": 1}'), ("g", "{}")],
        ),
        (Llama3JsonParser(), 'no call {"name": "f"}', None, []),
        (
            MistralParser(),
            '[TOOL_CALLS] [{"name": "f", "arguments": {"a": 1}}, {"name": "g", "arguments": {}}]',
            "",
            [("f", '{"a": 1}'), ("g", "{}")],
        ),
        (MistralParser(), '[TOOL_CALLS]f[ARGS]{"a": 2}', "", [("f", '{"a": 2}')]),
    ],
)
def test_parsers_read_whole_and_streamed_outputs_alike(parser, text, content, calls):
    whole_content, whole_calls = parser.parse(text)
    assert whole_content == (text if content is None else content)
    assert [(c.name, c.arguments) for c in whole_calls] == calls
    stream, streamed, got = ToolCallStream(parser), "", []
    for i in range(0, len(text), 3):
        piece, new = stream.feed(text[i : i + 3])
        streamed, got = streamed + piece, got + new
    piece, new = stream.feed("", final=True)
    assert (streamed + piece, [(c.name, c.arguments) for c in got + new]) == (whole_content, calls)


def test_the_parser_is_chosen_from_the_template():
    assert isinstance(parser_for_template(HERMES_TOOLS_TEMPLATE), HermesParser)
    assert isinstance(parser_for_template("{{ '[TOOL_CALLS]' }}{{ tools }}"), MistralParser)
    assert isinstance(parser_for_template("<|python_tag|>{{ tools }}"), Llama3JsonParser)
    assert parser_for_template("{{ messages }}") is None


# --- the server -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def client(tools_pipe):
    with ServerThread(create_app(tools_pipe, "tiny-tools")) as running:
        yield openai.OpenAI(base_url=f"{running.url}/v1", api_key="none", max_retries=0)


def chat(client, **kw):
    return client.chat.completions.create(
        model="tiny-tools", messages=ASK, max_tokens=150, temperature=0, **kw
    )


def test_server_response_format_and_vllm_fields(client):
    schema = SCHEMAS["nested"]
    r = chat(client, response_format=schema_format(schema), n=2, seed=1)
    for choice in r.choices:
        jsonschema.validate(json.loads(choice.message.content), schema)
    for body in (
        {"guided_choice": ["yes", "no"]},
        {"structured_outputs": {"choice": ["yes", "no"]}},
        {"guided_regex": "yes|no"},
        {"structured_outputs": {"json": {"enum": ["yes", "no"]}}},
    ):
        text = chat(client, extra_body=body).choices[0].message.content
        assert text.strip('"') in ("yes", "no"), (body, text)
    completion = client.completions.create(
        model="tiny-tools", prompt="hi", max_tokens=20, extra_body={"guided_regex": "[0-9]{3}"}
    )
    assert re.fullmatch("[0-9]{3}", completion.choices[0].text)


def test_server_tool_calls_whole_and_streamed(client):
    named = {"type": "function", "function": {"name": "get_weather"}}
    for choice in ("required", named):
        whole = chat(client, tools=TOOLS, tool_choice=choice)
        message = whole.choices[0].message
        assert whole.choices[0].finish_reason == "tool_calls" and message.tool_calls
        for call in message.tool_calls:
            assert call.type == "function" and call.id.startswith("call_")
            check_call(call.function.name, call.function.arguments)
        # The official client's stream helper assembles the deltas into the same calls.
        with client.chat.completions.stream(
            model="tiny-tools", messages=ASK, max_tokens=150, temperature=0, tools=TOOLS,
            tool_choice=choice,
        ) as stream:  # fmt: skip
            final = stream.get_final_completion()
        streamed = final.choices[0].message.tool_calls
        assert final.choices[0].finish_reason == "tool_calls"
        assert [(c.function.name, c.function.arguments) for c in streamed] == [
            (c.function.name, c.function.arguments) for c in message.tool_calls
        ]


@pytest.mark.parametrize(
    "kw, param, words",
    [
        ({"response_format": schema_format({"type": "foo"})}, "response_format", "cannot be"),
        ({"extra_body": {"guided_regex": "a(b"}}, "guided_regex", "regex cannot be compiled"),
        ({"extra_body": {"guided_json": "{nope"}}, "guided_json", "not JSON"),
        (
            {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice",
            "no tool has that name",
        ),
        ({"tool_choice": "required"}, "tool_choice", "needs tools"),
        (
            {
                "tools": [
                    {"type": "function", "function": {"name": "f", "parameters": {"type": 1}}}
                ],
                "tool_choice": "required",
            },
            "tools",
            "tool 'f': the JSON schema cannot be compiled",
        ),
        (
            {"extra_body": {"guided_regex": "a", "guided_choice": ["a"]}},
            "guided_choice",
            "at most one output constraint",
        ),
        ({"response_format": {"type": "xml"}}, "response_format", "unknown"),
    ],
)
def test_server_bad_inputs_are_400_and_the_engine_serves_on(client, kw, param, words):
    with pytest.raises(openai.BadRequestError) as e:
        chat(client, **kw)
    body = e.value.body
    assert body["param"] == param and words in body["message"], body
    assert body["type"] == "invalid_request_error"
    r = chat(client, extra_body={"max_tokens": 3})  # the next request is served as usual
    assert r.choices[0].finish_reason in ("stop", "length")
