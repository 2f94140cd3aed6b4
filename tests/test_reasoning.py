"""Reasoning models: the thinking switch (`chat_template_kwargs`), reasoning told apart from the
answer whole and streamed, output constraints applied to the answer after the reasoning, in
Python and on the server (read by the official `openai` client), on random-weight models with
the real chat templates of Qwen3 and DeepSeek-R1 (tests/family_templates.py)."""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest
from family_templates import DEEPSEEK_R1, PYTHONIC, QWEN3, QWEN3_CODER, build_family_model

from enginehouse import GenerationConfig, pipeline
from enginehouse.chat_template import TemplateKwargsError
from enginehouse.parsers import reasoning_parser_for, reasoning_parser_named
from enginehouse.reasoning import PARSERS, ReasoningStream, Start
from enginehouse.serve import ServerThread, create_app

HELLO = [{"role": "user", "content": "hello"}]
SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 8},
        "days": {"type": "integer", "minimum": 1, "maximum": 30},
    },
    "required": ["city", "days"],
    "additionalProperties": False,
}
JSON_SCHEMA = {"type": "json_schema", "json_schema": {"name": "trip", "schema": SCHEMA}}


@pytest.fixture(scope="module")
def qwen3(models_dir):
    folder = build_family_model(models_dir / "qwen3-think", "qwen3")
    with pipeline(str(folder), engine_config={"max_batch_size": 8}, progress=False) as pipe:
        yield pipe


@pytest.fixture(scope="module")
def r1(models_dir):
    folder = build_family_model(models_dir / "deepseek-r1", "deepseek_r1")
    with pipeline(str(folder), engine_config={"max_batch_size": 8}, progress=False) as pipe:
        yield pipe


def nudged(pipe, **kw) -> GenerationConfig:
    """Sampling with the think markers made likelier, so that random weights close their
    reasoning after a few tokens, as a real model would."""
    ids = pipe.tokenizer.convert_tokens_to_ids(["<think>", "</think>"])
    return GenerationConfig(
        max_new_tokens=120, do_sample=True, logit_bias={t: 4.0 for t in ids}, **kw
    )


# --- parsers --------------------------------------------------------------------------------


def test_parsers_are_chosen_from_the_template_with_vllms_names():
    assert reasoning_parser_for(QWEN3).name == "qwen3"
    assert reasoning_parser_for(DEEPSEEK_R1).name == "deepseek_r1"
    assert reasoning_parser_for(QWEN3_CODER) is None  # no <think>: not a reasoning model
    assert reasoning_parser_for(PYTHONIC) is None
    assert reasoning_parser_for("{{ '<|channel|>analysis' }}").name == "gpt_oss"
    # A plugin's parser (the toy plugin's, through register_reasoning_parsers).
    assert reasoning_parser_for("<toy_think>{{ messages }}").name == "toy"
    assert reasoning_parser_named("toy").start == "<toy_think>"
    assert {"deepseek_r1", "qwen3", "gpt_oss", "glm45", "mistral"} <= set(PARSERS)
    with pytest.raises(ValueError, match="unknown reasoning parser 'nope'; use one of"):
        reasoning_parser_named("nope")


CASES = [
    # parser, where the output starts, output, reasoning, answer
    ("qwen3", Start.MAY_OPEN, "<think>\nI ponder.\n</think>\n\nHello!", "\nI ponder.\n", "Hello!"),
    ("qwen3", Start.MAY_OPEN, "Hello at once", None, "Hello at once"),
    ("qwen3", Start.MAY_OPEN, "<think>cut short", "cut short", ""),
    ("qwen3", Start.CLOSED, "<think>x</think>y", None, "<think>x</think>y"),
    ("deepseek_r1", Start.INSIDE, "I ponder.\n</think>\n\nHello!", "I ponder.\n", "Hello!"),
    ("deepseek_r1", Start.INSIDE, "all thought", "all thought", ""),
    ("deepseek_r1", Start.INSIDE, "<think>again</think>ok", "again", "ok"),
    ("mistral", Start.MAY_OPEN, "[THINK]hm[/THINK]yes", "hm", "yes"),
    (
        "gpt_oss",
        Start.MAY_OPEN,
        "<|channel|>analysis<|message|>think<|end|><|start|>assistant<|channel|>final"
        "<|message|>Hi there",
        "think",
        "Hi there",
    ),
    (
        "gpt_oss",
        Start.MAY_OPEN,
        "<|channel|>analysis<|message|>t<|end|><|start|>assistant<|channel|>commentary "
        'to=functions.f <|constrain|>json<|message|>{"a": 1}',
        "t",  # a tool call stays whole in the answer, for the tool parser
        "<|start|>assistant<|channel|>commentary to=functions.f <|constrain|>json"
        '<|message|>{"a": 1}',
    ),
]


@pytest.mark.parametrize("name, start, text, reasoning, answer", CASES)
def test_reasoning_splits_alike_whole_and_streamed_in_any_pieces(
    name, start, text, reasoning, answer
):
    parser = PARSERS[name]()
    whole = ReasoningStream(parser, start).feed(text, final=True)
    assert (whole[0] or None, whole[1]) == (reasoning, answer)
    for size in (1, 2, 5):
        stream = ReasoningStream(parser, start)
        pieces = [stream.feed(text[i : i + size]) for i in range(0, len(text), size)]
        pieces.append(stream.feed("", final=True))
        assert "".join(p[0] for p in pieces) == (reasoning or "")
        assert "".join(p[1] for p in pieces) == answer


def test_prompt_says_where_the_output_starts(qwen3, r1):
    on, off = (
        qwen3.encode(HELLO),
        qwen3.encode(HELLO, chat_template_kwargs={"enable_thinking": False}),
    )
    assert qwen3.reasoning_for(on).start is Start.MAY_OPEN
    assert qwen3.reasoning_for(off).start is Start.CLOSED
    assert r1.reasoning_for(r1.encode(HELLO)).start is Start.INSIDE


# --- the thinking switch --------------------------------------------------------------------


def test_chat_template_kwargs_reach_the_template(qwen3):
    decode = qwen3.tokenizer.decode
    on = decode(qwen3.encode(HELLO))
    off = decode(qwen3.encode(HELLO, chat_template_kwargs={"enable_thinking": False}))
    assert on.endswith("<|im_start|>assistant\n")
    assert off.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    # A variable the template does not read is passed and ignored, as Jinja does.
    assert decode(qwen3.encode(HELLO, chat_template_kwargs={"unread": 1})) == on
    with pytest.raises(TemplateKwargsError, match="cannot set 'tokenize'"):
        qwen3.encode(HELLO, chat_template_kwargs={"tokenize": True})
    with pytest.raises(TemplateKwargsError, match="cannot set 'add_generation_prompt'"):
        qwen3(HELLO, chat_template_kwargs={"add_generation_prompt": False})


# --- reasoning apart from the answer; constraints after the reasoning ----------------------


def test_r1_reasoning_comes_apart_and_the_schema_binds_the_answer_only(r1):
    config = nudged(r1, response_format=JSON_SCHEMA)
    results = r1([HELLO] * 4, [config.model_copy(update={"random_seed": s}) for s in range(4)])
    for r in results:
        assert r.finish_reason == "stop", r
        assert isinstance(r.reasoning, str) and "</think>" not in r.reasoning
        jsonschema.validate(json.loads(r.text), SCHEMA)
    assert any(r.reasoning.strip() for r in results)  # the grammar let reasoning through


@pytest.mark.parametrize("thinking", [True, False])
def test_qwen3_stream_equals_whole_with_thinking_on_and_off(qwen3, thinking):
    kwargs = {"enable_thinking": thinking}
    thought = []
    for seed in range(4):
        config = nudged(qwen3, random_seed=seed, response_format=JSON_SCHEMA)
        whole = qwen3(HELLO, config, chat_template_kwargs=kwargs)
        deltas = list(qwen3.stream(HELLO, config, chat_template_kwargs=kwargs))
        assert "".join(d.reasoning or "" for d in deltas) == (whole.reasoning or "")
        assert "".join(d.text for d in deltas) == whole.text
        assert whole.finish_reason == "stop"
        jsonschema.validate(json.loads(whole.text), SCHEMA)
        thought.append(whole.reasoning is not None)
    # On, the model may think first (the grammar lets it, or answer at once); off, the
    # template closed the reasoning and the output is all answer.
    assert any(thought) if thinking else not any(thought)


def test_forced_tool_call_comes_after_the_reasoning_and_is_parsed(qwen3):
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": SCHEMA}}]
    config = nudged(qwen3, random_seed=1)
    r = qwen3(HELLO, config, tools=tools, tool_choice="required", parallel_tool_calls=False)
    assert r.finish_reason == "tool_calls" and r.reasoning is not None
    assert [c.name for c in r.tool_calls] == ["get_weather"]
    jsonschema.validate(json.loads(r.tool_calls[0].arguments), SCHEMA)
    session = qwen3.chat(HELLO[0]["content"], None, config, tools=tools, tool_choice="required")
    assert session.history[-1]["reasoning_content"] == session.response.reasoning


def test_a_bad_schema_is_refused_before_the_reasoning_wrapper_hides_it(r1):
    bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "foo"}}}
    with pytest.raises(Exception, match="JSON schema cannot be compiled"):
        r1(HELLO, GenerationConfig(response_format=bad))
    with pytest.raises(Exception, match="regex cannot be compiled"):
        r1(HELLO, GenerationConfig(regex="(unclosed"))
    assert r1(HELLO, GenerationConfig(max_new_tokens=4)).finish_reason == "length"


# --- the server -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(qwen3):
    app = create_app(qwen3, "qwen3", default_chat_template_kwargs={"enable_thinking": True})
    with ServerThread(app) as running:
        yield running.url


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key="-", max_retries=0)


@pytest.fixture(scope="module")
def ask(client, qwen3):
    """A chat request with the think markers nudged, as `nudged` does in Python."""
    ids = qwen3.tokenizer.convert_tokens_to_ids(["<think>", "</think>"])

    def ask(**kw):
        body = {"logit_bias": {str(t): 4 for t in ids}, **kw.pop("extra_body", {})}
        kw = {"max_tokens": 120, **kw}
        return client.chat.completions.create(
            model="qwen3", messages=HELLO, seed=3, extra_body=body, **kw
        )

    return ask


def test_server_returns_reasoning_apart_whole_and_streamed(ask):
    r = ask(response_format=JSON_SCHEMA)
    message = r.choices[0].message
    assert message.reasoning == message.reasoning_content and message.reasoning is not None
    assert isinstance(json.loads(message.content), dict)
    chunks = list(ask(response_format=JSON_SCHEMA, stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join(getattr(d, "reasoning", None) or "" for d in deltas) == message.reasoning
    assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == message.reasoning
    assert "".join(d.content or "" for d in deltas) == message.content


def test_server_thinking_switch_and_include_reasoning(ask):
    off = ask(extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert off.choices[0].message.reasoning is None  # the template closed the reasoning
    assert off.usage.prompt_tokens > ask().usage.prompt_tokens  # "<think></think>" added
    hidden = ask(extra_body={"include_reasoning": False})
    assert "reasoning" not in hidden.choices[0].message.model_extra
    chunks = list(ask(extra_body={"include_reasoning": False}, stream=True))
    assert not any(
        "reasoning" in (c.choices[0].delta.model_extra or {}) for c in chunks if c.choices
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == (
        hidden.choices[0].message.content
    )


@pytest.mark.parametrize(
    "body, param, words",
    [
        ({"chat_template_kwargs": {"tokenize": True}}, "chat_template_kwargs", "cannot set"),
        ({"chat_template_kwargs": {"messages": []}}, "chat_template_kwargs", "cannot set"),
        ({"chat_template_kwargs": [1]}, "chat_template_kwargs", "valid dictionary"),
        ({"reasoning_effort": "extreme"}, "reasoning_effort", "'low'"),
        ({"include_reasoning": "maybe"}, "include_reasoning", "boolean"),
    ],
)
def test_server_refuses_bad_reasoning_fields_naming_them(server, ask, body, param, words):
    r = httpx.post(
        f"{server}/v1/chat/completions",
        json={"messages": HELLO, "max_tokens": 2, **body},
        timeout=30,
    )
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and words in error["message"], error
    assert ask(max_tokens=2).choices[0].finish_reason == "length"  # serving on


def test_reasoning_effort_reaches_a_template_that_reads_it(models_dir):
    # As gpt-oss's template does: the effort is written into the system turn.
    template = (
        "{% for m in messages %}{{ m.content }}{% endfor %}"
        "Reasoning: {{ reasoning_effort | default('medium') }}"
    )
    folder = build_family_model(models_dir / "effort", "qwen3")
    with pipeline(str(folder), chat_template=template, progress=False) as pipe:
        want = {
            effort: len(pipe.encode(HELLO, chat_template_kwargs={"reasoning_effort": effort}))
            for effort in ("low", "medium", "high")
        }
        for effort in want:
            text = pipe.tokenizer.decode(
                pipe.encode(HELLO, chat_template_kwargs={"reasoning_effort": effort})
            )
            assert text.endswith(f"Reasoning: {effort}")
        assert want["low"] != want["medium"]  # so the server's counts tell them apart
        with ServerThread(create_app(pipe, "m")) as running:
            client = openai.OpenAI(base_url=f"{running.url}/v1", api_key="-", max_retries=0)
            for effort, length in want.items():
                r = client.chat.completions.create(
                    model="m", messages=HELLO, max_tokens=1, reasoning_effort=effort
                )
                assert r.usage.prompt_tokens == length
