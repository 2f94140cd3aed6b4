"""OpenAI's Responses API (`POST /v1/responses`, `GET /v1/responses/{id}`) on a real server on
127.0.0.1, talked to by the official `openai` client (`responses.create`, `responses.stream`,
`responses.retrieve`): text, OpenAI's stream events, `text.format`, function tools with their
output sent back through `previous_response_id`, reasoning items from the reasoning parser, the
bounded store, and bad input as 400s naming the field, the engine serving on. The model is a
random-weight Qwen2 with Qwen3's chat template (tests/family_templates.py)."""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest
from family_templates import build_family_model

from enginehouse import pipeline
from enginehouse.serve import ServerThread, create_app
from enginehouse.serve.store import ResponseStore

MODEL = "qwen3"
SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "enum": ["Paris", "Tokyo"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["city", "days"],
    "additionalProperties": False,
}
TOOL = {"type": "function", "name": "get_weather", "description": "weather", "parameters": SCHEMA}
FORMAT = {"format": {"type": "json_schema", "name": "trip", "schema": SCHEMA, "strict": True}}
OFF = {"chat_template_kwargs": {"enable_thinking": False}}  # no open-ended thinking


@pytest.fixture(scope="module")
def pipe(models_dir):
    folder = build_family_model(models_dir / "qwen3-responses", "qwen3")
    with pipeline(str(folder), engine_config={"max_batch_size": 8}, progress=False) as pipe:
        yield pipe


@pytest.fixture(scope="module")
def app(pipe):
    return create_app(pipe, MODEL)


@pytest.fixture(scope="module")
def server(app):
    with ServerThread(app) as running:
        yield running.url


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key="-", max_retries=0)


def greedy(**kw) -> dict:
    return {"model": MODEL, "max_output_tokens": 16, "temperature": 0, **kw}


def test_text_answer_equals_the_chat_completion(client):
    r = client.responses.create(**greedy(input="hello", instructions="Be brief."))
    chat = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"}],
        max_tokens=16,
        temperature=0,
    )
    assert r.object == "response" and r.id.startswith("resp_") and r.model == MODEL
    assert r.output_text == chat.choices[0].message.content
    assert [item.type for item in r.output] == ["message"]
    finish = chat.choices[0].finish_reason
    assert r.status == ("incomplete" if finish == "length" else "completed")
    if finish == "length":
        assert r.incomplete_details.reason == "max_output_tokens"
    assert r.usage.input_tokens == chat.usage.prompt_tokens
    assert r.usage.output_tokens == chat.usage.completion_tokens
    assert r.instructions == "Be brief."


def test_stream_events_in_openais_order_and_equal_to_the_whole(client):
    kw = greedy(input="hello", text=FORMAT, max_output_tokens=60, extra_body=OFF)
    whole = client.responses.create(**kw)
    jsonschema.validate(json.loads(whole.output_text), SCHEMA)
    with client.responses.stream(**kw) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_response()
    assert final.output_text == whole.output_text and final.status == "completed"
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert set(kinds[4:-4]) == {"response.output_text.delta"}
    events = list(client.responses.create(**kw, stream=True))
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == (
        whole.output_text
    )


def test_function_call_then_its_output_through_previous_response_id(client):
    kw = greedy(input="weather?", tools=[TOOL], tool_choice="required", max_output_tokens=200)
    r = client.responses.create(**kw, parallel_tool_calls=False, extra_body=OFF)
    (call,) = r.output
    assert call.type == "function_call" and call.name == "get_weather"
    assert call.call_id.startswith("call_") and call.status == "completed"
    jsonschema.validate(json.loads(call.arguments), SCHEMA)
    with client.responses.stream(
        **{**kw, "tool_choice": {"type": "function", "name": "get_weather"}}, extra_body=OFF
    ) as stream:
        kinds = [e.type for e in stream]
        streamed = stream.get_final_response()
    assert "response.function_call_arguments.delta" in kinds
    assert [(o.type, o.arguments) for o in streamed.output] == [("function_call", call.arguments)]
    output = {"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}
    after = client.responses.create(
        **greedy(input=[output], previous_response_id=r.id, tools=[TOOL]), extra_body=OFF
    )
    assert after.previous_response_id == r.id
    assert after.usage.input_tokens > r.usage.input_tokens  # the whole conversation went in
    # The same turn sent whole, as items, without the stored response.
    items = [
        {"role": "user", "content": "weather?"},
        {
            "type": "function_call",
            "call_id": call.call_id,
            "name": call.name,
            "arguments": call.arguments,
        },
        output,
    ]
    again = client.responses.create(**greedy(input=items, tools=[TOOL]), extra_body=OFF)
    assert again.output_text == after.output_text
    assert again.usage.input_tokens == after.usage.input_tokens


def test_reasoning_items_come_from_the_reasoning_parser(client, pipe):
    ids = pipe.tokenizer.convert_tokens_to_ids(["<think>", "</think>"])
    nudge = {"logit_bias": {str(t): 10 for t in ids}}
    found = []
    for seed in range(3):
        kw = greedy(
            input="hello",
            text=FORMAT,
            max_output_tokens=120,
            temperature=1,
            reasoning={"effort": "low"},
            extra_body={**nudge, "seed": seed},
        )
        whole = client.responses.create(**kw)
        with client.responses.stream(**kw) as stream:
            events = list(stream)
            final = stream.get_final_response()

        def items(output):  # each response has its own item ids; the stream's are parsed
            return [(o.type, json.dumps(o.content[0].text)) for o in output]

        assert items(final.output) == items(whole.output)
        jsonschema.validate(json.loads(whole.output_text), SCHEMA)
        kinds = [o.type for o in whole.output]
        found.append(kinds)
        if kinds[0] == "reasoning":
            text = whole.output[0].content[0].text
            deltas = [e.delta for e in events if e.type == "response.reasoning_text.delta"]
            assert "".join(deltas) == text
            assert whole.usage.output_tokens_details.reasoning_tokens > 0
    assert ["reasoning", "message"] in found


def test_stored_responses_are_retrieved_and_bounded(client, app):
    first = client.responses.create(**greedy(input="hello"))
    assert client.responses.retrieve(first.id).model_dump() == first.model_dump()
    unstored = client.responses.create(**greedy(input="hello", store=False))
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unstored.id)
    store = app.state.server.responses
    app.state.server.responses = ResponseStore(capacity=2)
    try:
        ids = [
            client.responses.create(**greedy(input="hi", max_output_tokens=2)).id for _ in range(3)
        ]
        with pytest.raises(openai.NotFoundError):
            client.responses.retrieve(ids[0])  # the oldest was forgotten
        assert client.responses.retrieve(ids[2]).id == ids[2]
        with pytest.raises(openai.BadRequestError) as e:
            client.responses.create(**greedy(input="again", previous_response_id=ids[0]))
        assert e.value.body["param"] == "previous_response_id"
    finally:
        app.state.server.responses = store


@pytest.mark.parametrize(
    "fields, param, words",
    [
        ({"previous_response_id": "resp_nope"}, "previous_response_id", "no stored response"),
        (
            {"input": [{"type": "function_call_output", "call_id": "call_x", "output": "1"}]},
            "input.0.call_id",
            "answers no function_call",
        ),
        ({"input": [{"type": "file_search_call", "id": "x"}]}, "input.0", "not supported"),
        ({"input": [{"role": "robot", "content": "x"}]}, "input.0.role", "user, assistant"),
        ({"tools": [{"type": "web_search"}]}, "tools.0.type", "only function tools"),
        ({"text": {"format": {"type": "xml"}}}, "text.format", "text.format must be"),
        ({"max_output_tokens": 0}, "max_output_tokens", "greater than or equal to 1"),
        ({"max_output_tokens": 10**6}, "max_output_tokens", "max_output_tokens is 1000000"),
        ({"tool_choice": "required"}, "tool_choice", "needs tools"),
        ({"background": True}, "background", "unrecognized request argument"),
        ({"logit_bias": {"x": 1}}, "logit_bias", "not a token id"),
        ({"reasoning": {"effort": "extreme"}}, "reasoning.effort", "'low'"),
    ],
)
def test_bad_requests_are_400s_naming_the_field(client, server, fields, param, words):
    body = {"model": MODEL, "input": "hello", "max_output_tokens": 4, **fields}
    r = httpx.post(f"{server}/v1/responses", json=body, timeout=30)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and words in error["message"], error
    assert client.responses.create(**greedy(input="hi", max_output_tokens=2)).status  # serving on


def test_input_images_reach_a_vision_language_model(tmp_path_factory):
    import base64
    import io

    import numpy as np
    from PIL import Image

    from enginehouse.testing import build_vlm

    folder = build_vlm(tmp_path_factory.mktemp("llava-responses"), "llava")
    pixels = np.random.RandomState(0).randint(0, 256, (60, 90, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    part = {"type": "input_image", "image_url": url}
    with pipeline(str(folder), progress=False) as vlm:
        with ServerThread(create_app(vlm, "llava")) as running:
            client = openai.OpenAI(base_url=f"{running.url}/v1", api_key="-", max_retries=0)
            text = [{"type": "input_text", "text": "What is it?"}]
            plain = client.responses.create(
                model="llava", max_output_tokens=4, input=[{"role": "user", "content": text}]
            )
            seen = client.responses.create(
                model="llava",
                max_output_tokens=4,
                input=[{"role": "user", "content": [part, *text]}],
            )
    assert seen.usage.input_tokens > plain.usage.input_tokens + 4  # the image's tokens
    assert seen.output[0].type == "message"
