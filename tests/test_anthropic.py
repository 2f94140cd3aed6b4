"""Anthropic's Messages API (`POST /v1/messages`, `/v1/messages/count_tokens`) on a real server
on 127.0.0.1, talked to by the official `anthropic` client: text, streaming in Anthropic's
event order, thinking blocks from the reasoning parser, tool use with the result sent back,
stop sequences, images for a vision-language model, the key as `x-api-key`, and bad input as
Anthropic's own 4xx, the engine serving on. The model is a random-weight Qwen2 with Qwen3's
chat template (tests/family_templates.py)."""

from __future__ import annotations

import base64
import io
import json

import anthropic
import httpx
import jsonschema
import numpy as np
import openai
import pytest
from family_templates import build_family_model
from PIL import Image

from enginehouse import pipeline
from enginehouse.serve import ServerThread, create_app
from enginehouse.testing import build_vlm

MODEL = "qwen3"
KEY = "test-key"
HI = [{"role": "user", "content": "hello"}]
WEATHER = {
    "name": "get_weather",
    "description": "the weather in a city",
    "input_schema": {
        "type": "object",
        "properties": {
            "city": {"type": "string", "enum": ["Paris", "Tokyo"]},
            "days": {"type": "integer", "minimum": 1, "maximum": 7},
        },
        "required": ["city", "days"],
        "additionalProperties": False,
    },
}


@pytest.fixture(scope="module")
def pipe(models_dir):
    folder = build_family_model(models_dir / "qwen3-anthropic", "qwen3")
    with pipeline(str(folder), engine_config={"max_batch_size": 8}, progress=False) as pipe:
        yield pipe


@pytest.fixture(scope="module")
def server(pipe):
    with ServerThread(create_app(pipe, MODEL, KEY)) as running:
        yield running.url


@pytest.fixture(scope="module")
def client(server) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server, api_key=KEY, max_retries=0)


@pytest.fixture(scope="module")
def openai_client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0)


@pytest.fixture(scope="module")
def think(pipe) -> dict:
    """Sampling with the think markers made likelier (random weights then close their
    reasoning after a few tokens, as a real model would), and a seed."""
    ids = pipe.tokenizer.convert_tokens_to_ids(["<think>", "</think>"])
    return {"logit_bias": {str(t): 10 for t in ids}}


def greedy(extra: dict | None = None, **kw) -> dict:
    """Arguments of `messages.create`: this SDK has no `temperature` argument any more (newer
    Claude models fix it), so it goes in the body as an extension, as other clients send it."""
    return {
        "model": MODEL,
        "max_tokens": 16,
        "extra_body": {"temperature": 0, **(extra or {})},
        **kw,
    }


def body(**kw) -> dict:
    """The same as a raw JSON body."""
    args = greedy(**kw)
    extra = args.pop("extra_body")
    return {**args, **extra}


def test_text_answer_equals_the_chat_completion(client, openai_client, pipe):
    m = client.messages.create(**greedy(system="Be brief.", messages=HI))
    chat = openai_client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "system", "content": "Be brief."}, *HI],
        max_tokens=16,
        temperature=0,
    )
    assert m.type == "message" and m.role == "assistant" and m.model == MODEL
    assert m.id.startswith("msg_")
    assert [b.type for b in m.content] == ["text"]
    assert m.content[0].text == chat.choices[0].message.content
    assert (
        m.stop_reason == {"length": "max_tokens", "stop": "end_turn"}[chat.choices[0].finish_reason]
    )
    assert m.usage.input_tokens == chat.usage.prompt_tokens
    assert m.usage.output_tokens == chat.usage.completion_tokens
    counted = client.messages.count_tokens(model=MODEL, system="Be brief.", messages=HI)
    assert counted.input_tokens == m.usage.input_tokens


def test_stream_follows_anthropics_event_order_and_equals_the_whole(client):
    whole = client.messages.create(**greedy(messages=HI))
    with client.messages.stream(**greedy(messages=HI)) as stream:
        events = [e.type for e in stream]
        final = stream.get_final_message()
    assert final.content[0].text == whole.content[0].text
    assert (final.stop_reason, final.usage.output_tokens) == (
        whole.stop_reason,
        whole.usage.output_tokens,
    )
    raw = [e.type for e in client.messages.create(**greedy(messages=HI), stream=True)]
    assert raw[0] == "message_start" and raw[-2:] == ["message_delta", "message_stop"]
    blocks = raw[1:-2]
    assert blocks[0] == "content_block_start" and blocks[-1] == "content_block_stop"
    assert set(blocks[1:-1]) == {"content_block_delta"}
    assert "text" in events  # the SDK's own text events, built from the deltas
    # ping comes right after message_start on the wire (the SDK skips it).
    with httpx.stream(
        "POST",
        f"{client.base_url}/v1/messages",
        headers={"x-api-key": KEY},
        json=body(messages=HI, stream=True),
        timeout=30,
    ) as r:
        names = [line[7:] for line in r.iter_lines() if line.startswith("event: ")]
    assert names[:2] == ["message_start", "ping"]


def test_thinking_blocks_come_from_the_reasoning_parser(client, think):
    # A JSON answer (output_config.format) after free thinking: the grammar lets the model
    # open its reasoning or answer at once, and the nudged markers make it think briefly.
    schema = WEATHER["input_schema"]
    kw = greedy({**think, "temperature": 1}, messages=HI, max_tokens=120)
    kw.update(
        thinking={"type": "enabled", "budget_tokens": 1024},
        output_config={"format": {"type": "json_schema", "schema": schema}},
    )
    found = []
    for seed in range(3):
        kw["extra_body"]["seed"] = seed
        m = client.messages.create(**kw)
        with client.messages.stream(**kw) as stream:
            streamed = stream.get_final_message()
        assert streamed.model_dump()["content"] == m.model_dump()["content"]
        assert m.stop_reason == "end_turn"
        jsonschema.validate(json.loads(m.content[-1].text), schema)
        found.append([b.type for b in m.content])
        if m.content[0].type == "thinking":
            assert m.content[0].signature == ""
    assert ["thinking", "text"] in found
    off = client.messages.create(**greedy(messages=HI), thinking={"type": "disabled"})
    assert [b.type for b in off.content] == ["text"]  # the template closed the reasoning


def test_tool_use_then_the_result_sent_back(client):
    off = {"type": "disabled"}  # random weights would think until max_tokens
    m = client.messages.create(
        **greedy(messages=HI, max_tokens=200),
        tools=[WEATHER],
        tool_choice={"type": "any", "disable_parallel_tool_use": True},
        thinking=off,
    )
    assert m.stop_reason == "tool_use"
    (use,) = [b for b in m.content if b.type == "tool_use"]
    assert use.name == "get_weather" and use.id.startswith("toolu_")
    jsonschema.validate(use.input, WEATHER["input_schema"])
    with client.messages.stream(
        **greedy(messages=HI, max_tokens=200),
        tools=[WEATHER],
        tool_choice={"type": "tool", "name": "get_weather"},
        thinking=off,
    ) as stream:
        streamed = stream.get_final_message()
    assert streamed.stop_reason == "tool_use"
    assert [b.input for b in streamed.content if b.type == "tool_use"] == [use.input]
    result = {
        "role": "user",
        "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "sunny"}],
    }
    history = [*HI, {"role": "assistant", "content": m.content}, result]
    answer = client.messages.create(**greedy(messages=history), tools=[WEATHER], thinking=off)
    assert answer.content and answer.stop_reason in ("end_turn", "max_tokens", "tool_use")


def test_stop_sequences_end_the_answer_and_are_named(client):
    text = client.messages.create(**greedy(messages=HI, max_tokens=30)).content[0].text
    stop = next(w for w in text.split() if w.strip())[-2:] if text.split() else text[2:4]
    m = client.messages.create(**greedy(messages=HI, max_tokens=30), stop_sequences=[stop])
    assert m.stop_reason == "stop_sequence" and m.stop_sequence == stop
    assert stop not in m.content[0].text and text.startswith(m.content[0].text)
    raw = list(
        client.messages.create(
            **greedy(messages=HI, max_tokens=30), stop_sequences=[stop], stream=True
        )
    )
    assert raw[-2].delta.stop_reason == "stop_sequence" and raw[-2].delta.stop_sequence == stop


def test_the_key_goes_as_x_api_key_or_bearer(server):
    for headers in ({"x-api-key": KEY}, {"Authorization": f"Bearer {KEY}"}):
        r = httpx.post(f"{server}/v1/messages", headers=headers, json=body(messages=HI), timeout=30)
        assert r.status_code == 200
    wrong = anthropic.Anthropic(base_url=server, api_key="nope", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError) as e:
        wrong.messages.create(**greedy(messages=HI))
    assert e.value.body["type"] == "error"
    assert e.value.body["error"]["type"] == "authentication_error"


USE = {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}}


@pytest.mark.parametrize(
    "fields, words",
    [
        ({"max_tokens": None}, "'max_tokens' is required"),
        ({"temperature": 1.5}, "temperature"),
        ({"messages": []}, "at least 1"),
        ({"tool_choice": {"type": "sometimes"}}, "tool_choice must be"),
        ({"thinking": {"type": "maybe"}}, "thinking must be"),
        ({"foo": 1}, "unrecognized request argument 'foo'"),
        ({"max_tokens": 10**6}, "max_tokens is 1000000"),
        (
            {
                "messages": [
                    *HI,
                    {
                        "role": "user",
                        "content": [{"type": "tool_result", "tool_use_id": "toolu_x"}],
                    },
                ]
            },
            "'toolu_x' answers no tool_use block",
        ),
        (
            {
                "messages": [
                    *HI,
                    {"role": "assistant", "content": [USE]},
                    {"role": "user", "content": [{"type": "document"}]},
                ]
            },
            "type 'document' is not supported",
        ),
        ({"tools": [{"type": "web_search_20250305", "name": "web"}]}, "server tools"),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {
                                "type": "image",
                                "source": {
                                    "type": "base64",
                                    "media_type": "image/png",
                                    "data": "AAAA",
                                },
                            }
                        ],
                    }
                ]
            },
            "takes text only",
        ),
        ({"stop_sequences": [""]}, "stop_sequences: stop strings must not be empty"),
        ({"logit_bias": {"x": 1}}, "not a token id"),
    ],
)
def test_bad_requests_are_400s_in_anthropics_shape(client, server, fields, words):
    request = {**body(messages=HI), **fields}
    request = {k: v for k, v in request.items() if v is not None}
    r = httpx.post(f"{server}/v1/messages", headers={"x-api-key": KEY}, json=request, timeout=30)
    assert r.status_code == 400, r.text
    error = r.json()
    assert error["type"] == "error" and error["error"]["type"] == "invalid_request_error"
    assert words in error["error"]["message"], error
    assert client.messages.create(**greedy(messages=HI, max_tokens=2)).stop_reason  # serving on


def test_unknown_model_is_anthropics_not_found(client):
    with pytest.raises(anthropic.NotFoundError) as e:
        client.messages.create(model="claude-sonnet-4-5", max_tokens=4, messages=HI)
    assert e.value.body["error"]["type"] == "not_found_error"
    assert MODEL in e.value.body["error"]["message"]


def test_images_reach_a_vision_language_model(tmp_path_factory):
    folder = build_vlm(tmp_path_factory.mktemp("llava-anthropic"), "llava")
    pixels = np.random.RandomState(0).randint(0, 256, (60, 90, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    image = {
        "type": "image",
        "source": {
            "type": "base64",
            "media_type": "image/png",
            "data": base64.b64encode(buf.getvalue()).decode(),
        },
    }
    ask = [{"role": "user", "content": [image, {"type": "text", "text": "What is it?"}]}]
    with pipeline(str(folder), progress=False) as vlm:
        with ServerThread(create_app(vlm, "llava")) as running:
            client = anthropic.Anthropic(base_url=running.url, api_key="-", max_retries=0)
            m = client.messages.create(model="llava", max_tokens=6, messages=ask)
            text_only = client.messages.count_tokens(
                model="llava", messages=[{"role": "user", "content": "What is it?"}]
            )
            with_image = client.messages.count_tokens(model="llava", messages=ask)
    assert m.content[0].type == "text" and m.usage.input_tokens == with_image.input_tokens
    assert with_image.input_tokens > text_only.input_tokens + 4  # the image's tokens
    assert json.dumps(m.model_dump())  # a plain JSON message
