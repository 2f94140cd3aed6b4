"""vLLM's `POST /tokenize` and `POST /detokenize` on a real server: the same token ids the
completions and chat endpoints use, token strings, and bad input as 400s naming the field."""

from __future__ import annotations

import httpx
import openai
import pytest

from enginehouse.serve import ServerThread, create_app

HELLO = [{"role": "user", "content": "hello there"}]


@pytest.fixture(scope="module")
def server(llama_pipe):
    with ServerThread(create_app(llama_pipe, "m")) as running:
        yield running.url


def post(server: str, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{server}{path}", json=body, timeout=30)


def test_tokenize_a_prompt_as_completions_do(server, llama_pipe):
    r = post(server, "/tokenize", {"prompt": "the quick brown fox", "return_token_strs": True})
    body = r.json()
    want = llama_pipe.encode("the quick brown fox", apply_chat_template=False)
    assert body["tokens"] == want and body["count"] == len(want)
    assert body["max_model_len"] == llama_pipe.session_len
    assert body["token_strs"] == llama_pipe.tokenizer.convert_ids_to_tokens(want)
    bare = post(server, "/tokenize", {"prompt": "fox", "add_special_tokens": False}).json()
    assert bare["token_strs"] is None
    assert post(server, "/detokenize", {"tokens": bare["tokens"]}).json() == {"prompt": "fox"}


def test_tokenize_messages_as_the_chat_endpoint_does(server, llama_pipe):
    body = post(server, "/tokenize", {"model": "m", "messages": HELLO}).json()
    assert body["tokens"] == llama_pipe.encode(HELLO)
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="-", max_retries=0)
    usage = client.chat.completions.create(model="m", messages=HELLO, max_tokens=1).usage
    assert body["count"] == usage.prompt_tokens
    bare = post(server, "/tokenize", {"messages": HELLO, "add_generation_prompt": False}).json()
    text = llama_pipe.tokenizer.decode(bare["tokens"])
    assert bare["count"] < body["count"] and not text.endswith("assistant\n")


@pytest.mark.parametrize(
    "path, body, param, words",
    [
        ("/detokenize", {"tokens": [1, 10**6]}, "tokens", "token id 1000000 is outside"),
        ("/detokenize", {"tokens": "abc"}, "tokens", "valid list"),
        ("/tokenize", {"prompt": "a", "messages": HELLO}, "prompt", "either prompt"),
        ("/tokenize", {}, "prompt", "either prompt"),
        ("/tokenize", {"prompt": "a", "truncate": 3}, "truncate", "unrecognized"),
        (
            "/tokenize",
            {"messages": HELLO, "chat_template_kwargs": {"tools": []}},
            "chat_template_kwargs",
            "cannot set 'tools'",
        ),
        ("/tokenize", {"model": "other", "prompt": "a"}, "model", "does not exist"),
    ],
)
def test_bad_requests_name_the_field(server, path, body, param, words):
    r = post(server, path, body)
    assert r.status_code == (404 if param == "model" else 400), r.text
    error = r.json()["error"]
    assert error["param"] == param and words in error["message"], error
    assert post(server, "/tokenize", {"prompt": "ok"}).status_code == 200
