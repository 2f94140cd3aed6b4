"""Which tokens may come at all: OpenAI's `logit_bias`, vLLM's `allowed_token_ids` and
`bad_words` (and transformers' `bad_words_ids`), in Python and on every server endpoint that
samples, on a small random-weight Llama; each bad value refused naming the field and the id."""

from __future__ import annotations

import httpx
import openai
import pytest
from pydantic import ValidationError

from enginehouse import GenerationConfig
from enginehouse.errors import ParamError
from enginehouse.serve import ServerThread, create_app

HELLO = [{"role": "user", "content": "hello"}]


def greedy(pipe, prompt="hello", **kw):
    return pipe(prompt, GenerationConfig(**{"max_new_tokens": 12, "ignore_eos": True, **kw}))


def a_word(pipe) -> str:
    """A word the model writes greedily after "hello" (so that banning it changes the output)."""
    texts = [pipe.tokenizer.decode([t]).strip() for t in greedy(pipe).token_ids]
    words = [w for w in texts if w.isascii() and w.isalpha() and len(w) > 1]
    assert words, "the test model wrote no plain word to ban"
    return words[0]


def test_logit_bias_moves_the_greedy_choice(llama_pipe):
    plain = greedy(llama_pipe).token_ids
    forced = greedy(llama_pipe, logit_bias={7: 100}).token_ids
    assert forced == [7] * 12
    banned = greedy(llama_pipe, logit_bias={plain[0]: -100}).token_ids
    assert banned[0] != plain[0]
    assert greedy(llama_pipe, logit_bias={plain[0]: 0.0}).token_ids == plain  # no-op bias


def test_allowed_token_ids_bound_every_token_sampled_or_not(llama_pipe):
    allowed = [5, 9, 40, 41]
    for kw in ({}, {"do_sample": True, "random_seed": 0, "temperature": 2.0}):
        out = greedy(llama_pipe, allowed_token_ids=allowed, **kw).token_ids
        assert set(out) <= set(allowed) and len(out) == 12


def test_bad_words_never_appear_whole_or_after_a_space(llama_pipe):
    plain, word = greedy(llama_pipe), a_word(llama_pipe)
    out = greedy(llama_pipe, bad_words=[word])
    assert out.token_ids != plain.token_ids
    banned = [
        llama_pipe.tokenizer.encode(text, add_special_tokens=False) for text in (word, " " + word)
    ]
    ids = out.token_ids
    for seq in banned:
        assert not any(ids[i : i + len(seq)] == seq for i in range(len(ids)))
    # transformers' form: the token sequences themselves.
    two = plain.token_ids[:2]
    out = greedy(llama_pipe, bad_words_ids=[two]).token_ids
    assert out[:2] != two


@pytest.mark.parametrize(
    "kw, words",
    [
        ({"logit_bias": {-1: 1.0}}, "not a token id"),
        ({"logit_bias": {3: 101.0}}, "not in -100..100"),
        ({"allowed_token_ids": []}, "must not be empty"),
        ({"allowed_token_ids": [-2]}, "not a token id"),
        ({"bad_words": [" "]}, "empty word"),
        ({"bad_words_ids": [[]]}, "non-empty"),
    ],
)
def test_generation_config_refuses_bad_values(kw, words):
    with pytest.raises(ValidationError, match=words):
        GenerationConfig(**kw)


@pytest.mark.parametrize(
    "kw, field",
    [
        ({"logit_bias": {10**6: 1.0}}, "logit_bias"),
        ({"allowed_token_ids": [1, 10**6]}, "allowed_token_ids"),
    ],
)
def test_ids_outside_the_vocabulary_are_refused_naming_field_and_id(llama_pipe, kw, field):
    with pytest.raises(ParamError, match=f"{field}: token id 1000000 is outside") as e:
        greedy(llama_pipe, **kw)
    assert e.value.param == field
    assert greedy(llama_pipe).finish_reason == "length"  # nothing else was harmed


# --- the server -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(llama_pipe):
    with ServerThread(create_app(llama_pipe, "m")) as running:
        yield running.url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="-", max_retries=0)


def test_server_takes_the_three_fields_on_chat_and_completions(client, llama_pipe):
    chat = client.chat.completions.create(
        model="m",
        messages=HELLO,
        max_tokens=6,
        temperature=0,
        logit_bias={"7": 100},
        extra_body={"ignore_eos": True},
    )
    assert chat.choices[0].message.content == llama_pipe.tokenizer.decode([7] * 6)
    text = client.completions.create(
        model="m",
        prompt="hello",
        max_tokens=6,
        temperature=0,
        extra_body={"allowed_token_ids": [7, 8], "ignore_eos": True},
    )
    ids = llama_pipe.tokenizer.encode(text.choices[0].text, add_special_tokens=False)
    assert set(ids) <= {7, 8}
    word = a_word(llama_pipe)
    text = client.completions.create(
        model="m", prompt="hello", max_tokens=12, temperature=0, extra_body={"bad_words": [word]}
    )
    config = GenerationConfig(max_new_tokens=12, bad_words=[word])
    assert text.choices[0].text == llama_pipe("hello", config, apply_chat_template=False).text


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
@pytest.mark.parametrize(
    "body, param, words",
    [
        ({"logit_bias": {"abc": 1}}, "logit_bias", "'abc' is not a token id"),
        ({"logit_bias": {"5": 300}}, "logit_bias", "from -100 to 100"),
        ({"logit_bias": {"1000000": 1}}, "logit_bias", "token id 1000000 is outside"),
        ({"allowed_token_ids": []}, "allowed_token_ids", "must not be empty"),
        ({"allowed_token_ids": [3, 1000000]}, "allowed_token_ids", "1000000 is outside"),
        ({"bad_words": [""]}, "bad_words", "empty word"),
        ({"bad_words": "word"}, "bad_words", "valid list"),
    ],
)
def test_server_refuses_bad_values_naming_the_field(server, client, path, body, param, words):
    prompt = {"messages": HELLO} if "chat" in path else {"prompt": "hello"}
    r = httpx.post(f"{server}{path}", json={**prompt, "max_tokens": 2, **body}, timeout=30)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and words in error["message"], error
    again = client.completions.create(model="m", prompt="hello", max_tokens=2)
    assert again.choices[0].finish_reason == "length"  # the engine serves on
