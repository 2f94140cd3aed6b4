"""The OpenAI-compatible server: a real uvicorn server on 127.0.0.1 in front of a small
random-weight Llama, talked to by the official `openai` client (sync and async) and, for
bodies no client would send, by httpx. One server for the whole module."""

from __future__ import annotations

import asyncio
import math
import re

import httpx
import openai
import pytest

from enginehouse import GenerationConfig, pipeline
from enginehouse.serve import ServerThread, create_app

MODEL = "tiny-llama"
KEY = "test-key"
HELLO = [{"role": "user", "content": "hello"}]
METRIC = 'enginehouse:%s{model_name="tiny-llama"}'  # one engine metric, by its name


class Server:
    def __init__(self, url: str, pipe) -> None:
        self.url = url
        self.pipe = pipe

    def client(self, **kw) -> openai.OpenAI:
        kw = {"api_key": KEY, "max_retries": 0, **kw}
        return openai.OpenAI(base_url=f"{self.url}/v1", **kw)

    def async_client(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=f"{self.url}/v1", api_key=KEY, max_retries=0)

    def post(self, path: str, **kw) -> httpx.Response:
        headers = {"Authorization": f"Bearer {KEY}", **kw.pop("headers", {})}
        return httpx.post(f"{self.url}{path}", headers=headers, timeout=60, **kw)

    def metrics(self) -> dict[str, float]:
        """The /metrics samples, keyed by name with labels as written."""
        text = httpx.get(f"{self.url}/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
        samples = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                samples[name] = float(value)
        return samples

    def expected(self, prompt, **gen) -> str:
        """What the Python API answers, greedily, for the same prompt."""
        return self.pipe(prompt, GenerationConfig(**gen)).text


@pytest.fixture(scope="module")
def server(llama_dir):
    pipe = pipeline(str(llama_dir), engine_config={"max_batch_size": 32}, progress=False)
    with ServerThread(create_app(pipe, MODEL, KEY)) as running:
        yield Server(running.url, pipe)
    pipe.close()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return server.client()


def test_lists_the_served_model_and_refuses_others(server, client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert models.data[0].max_model_len == server.pipe.session_len
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4", messages=HELLO, max_tokens=2)
    assert e.value.body["code"] == "model_not_found" and MODEL in e.value.body["message"]


def test_chat_completion_answers_as_the_python_api_with_usage(server, client):
    r = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=8, temperature=0)
    choice = r.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == server.expected(HELLO, max_new_tokens=8)
    assert r.object == "chat.completion" and r.model == MODEL and r.id.startswith("chatcmpl-")
    prompt_len = len(server.pipe.encode(HELLO))
    generated = server.pipe(HELLO, GenerationConfig(max_new_tokens=8)).generate_token_len
    assert r.usage.prompt_tokens == prompt_len
    assert r.usage.completion_tokens == generated
    assert r.usage.total_tokens == prompt_len + generated
    assert choice.finish_reason == ("length" if generated == 8 else "stop")


def test_chat_stream_sends_role_deltas_finish_and_usage(server, client):
    want = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=12, temperature=0)
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=HELLO,
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == want.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == want.choices[0].finish_reason and not any(finishes[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage == want.usage
    assert all(c.usage is None for c in chunks[:-1])


def test_stream_without_include_usage_sends_no_usage(client):
    chunks = list(client.completions.create(model=MODEL, prompt="hello", max_tokens=4, stream=True))
    assert all(c.usage is None for c in chunks) and chunks[-1].choices[0].finish_reason


def test_completion_prompt_forms_and_n(server, client):
    ids = server.pipe.encode("the quick brown fox", apply_chat_template=False)
    want = server.expected({"token_ids": ids}, max_new_tokens=6)
    for prompt in ("the quick brown fox", ids):
        r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0)
        assert r.choices[0].text == want and r.object == "text_completion"
        assert r.usage.prompt_tokens == len(ids)
    # Several prompts with n choices each: choice p * n + j is prompt p's j-th choice.
    hello = server.pipe.encode("hello", apply_chat_template=False)
    r = client.completions.create(
        model=MODEL,
        prompt=[hello, [5, 6, 7]],
        n=2,
        max_tokens=5,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    texts = [c.text for c in r.choices]
    first = server.expected({"token_ids": hello}, max_new_tokens=5, ignore_eos=True)
    second = server.expected({"token_ids": [5, 6, 7]}, max_new_tokens=5, ignore_eos=True)
    assert texts == [first, first, second, second]
    assert r.usage.prompt_tokens == len(hello) + 3  # each prompt once, as OpenAI counts
    assert r.usage.completion_tokens == 4 * 5


def _stop_inside(text: str) -> str:
    """A stop string that first occurs well inside `text`."""
    start = len(text) // 2
    stop = text[start : start + 2]
    assert stop and text.index(stop) > 0, f"pick another prompt: {text!r}"
    return stop


@pytest.mark.parametrize("stream", [False, True])
def test_stop_strings_cut_the_text_before_them(server, client, stream):
    full = server.expected(HELLO, max_new_tokens=24, ignore_eos=True)
    stop = _stop_inside(full)
    kw = dict(model=MODEL, messages=HELLO, max_tokens=24, temperature=0, stop=[stop])
    kw["extra_body"] = {"ignore_eos": True}
    if stream:
        chunks = list(client.chat.completions.create(stream=True, **kw))
        text = "".join(c.choices[0].delta.content or "" for c in chunks)
        finish = chunks[-1].choices[0].finish_reason
    else:
        choice = client.chat.completions.create(**kw).choices[0]
        text, finish = choice.message.content, choice.finish_reason
    assert text == full[: full.index(stop)] and finish == "stop"
    completion = client.completions.create(
        model=MODEL, prompt="hello", max_tokens=24, temperature=0, stop=stop[0]
    )
    assert stop[0] not in completion.choices[0].text


def test_a_seed_makes_sampling_reproducible(client):
    def sample(seed: int, n: int = 1) -> list[str]:
        r = client.chat.completions.create(
            model=MODEL, messages=HELLO, max_tokens=12, temperature=1.0, seed=seed, n=n
        )
        return [c.message.content for c in r.choices]

    assert sample(7) == sample(7)
    assert sample(7) != sample(8)
    pair = sample(7, n=2)
    assert pair == sample(7, n=2) and pair[0] != pair[1]  # choice i draws with seed + i


def test_penalties_are_applied(server, client):
    prompt = "the the the the"
    ids = {"token_ids": server.pipe.encode(prompt, apply_chat_template=False)}
    plain = server.expected(ids, max_new_tokens=24, ignore_eos=True)
    for field in ("presence_penalty", "frequency_penalty"):
        r = client.completions.create(
            model=MODEL,
            prompt=prompt,
            max_tokens=24,
            temperature=0,
            extra_body={"ignore_eos": True},
            **{field: 2.0},
        )
        want = server.expected(ids, max_new_tokens=24, ignore_eos=True, **{field: 2.0})
        assert r.choices[0].text == want != plain


def test_logprobs_in_openai_shapes(client):
    r = client.chat.completions.create(
        model=MODEL, messages=HELLO, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3
    )
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for entry in content:
        assert len(entry.top_logprobs) == 3 and entry.logprob <= 0
        assert entry.top_logprobs[0].token == entry.token  # greedy: the chosen one is the top
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)
        assert bytes(entry.bytes).decode() == entry.token
    streamed = client.chat.completions.create(
        model=MODEL, messages=HELLO, max_tokens=6, temperature=0, logprobs=True, stream=True
    )
    tokens = [
        e.token
        for c in streamed
        if c.choices and c.choices[0].logprobs
        for e in c.choices[0].logprobs.content
    ]
    assert tokens == [e.token for e in content]

    r = client.completions.create(
        model=MODEL, prompt="hello", max_tokens=5, temperature=0, logprobs=2
    )
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    assert all(1 <= len(top) <= 3 for top in lp.top_logprobs)  # the top 2 and the chosen one
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0


def test_async_client_streams_chat_and_completions(server):
    async def main():
        client = server.async_client()
        chat = await client.chat.completions.create(
            model=MODEL, messages=HELLO, max_tokens=8, temperature=0, stream=True
        )
        chat_text = "".join([c.choices[0].delta.content or "" async for c in chat])
        completion = await client.completions.create(
            model=MODEL, prompt="hello", max_tokens=8, temperature=0
        )
        await client.close()
        return chat_text, completion.choices[0].text

    chat_text, completion_text = asyncio.run(main())
    assert chat_text == server.expected(HELLO, max_new_tokens=8)
    ids = {"token_ids": server.pipe.encode("hello", apply_chat_template=False)}
    assert completion_text == server.expected(ids, max_new_tokens=8)


LONG = [{"role": "user", "content": "hello " * 400}]


@pytest.mark.parametrize(
    "kw, param, words",
    [
        ({"temperature": 3}, "temperature", "less than or equal to 2"),
        ({"top_p": 0}, "top_p", "greater than 0"),
        ({"n": 0}, "n", "greater than or equal to 1"),
        ({"max_tokens": 0}, "max_tokens", "greater than or equal to 1"),
        ({"max_tokens": 100_000}, "max_tokens", "context holds"),
        ({"max_completion_tokens": 100_000}, "max_completion_tokens", "context holds"),
        ({"presence_penalty": 5}, "presence_penalty", "less than or equal to 2"),
        ({"stop": [""]}, "stop", "must not be empty"),
        ({"top_logprobs": 2}, "top_logprobs", "logprobs=true"),
        ({"logprobs": True, "top_logprobs": 50}, "top_logprobs", "less than or equal to 20"),
        ({"messages": LONG}, "messages", "leaving no room"),
        ({"messages": []}, "messages", "at least 1"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, "messages.0.role", "'user'"),
        ({"stream_options": {"include_usage": True}}, "stream_options", "stream=true"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools", "render tools"),
        ({"extra_body": {"foo": 1}}, "foo", "unrecognized request argument"),
        ({"extra_body": {"stop_token_ids": [10**6]}}, "stop_token_ids", "outside the vocabulary"),
        ({"extra_body": {"min_tokens": 9}, "max_tokens": 3}, "min_tokens", "lower min_tokens"),
    ],
)
def test_invalid_chat_requests_are_400_naming_the_field(client, kw, param, words):
    request = {"model": MODEL, "messages": HELLO, "max_tokens": 4, **kw}
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(**request)
    body = e.value.body
    assert set(body) == {"message", "type", "param", "code"}
    assert body["param"] == param and words in body["message"]
    assert body["type"] == "invalid_request_error"
    assert "pydantic" not in body["message"] and "loc" not in body["message"]


@pytest.mark.parametrize(
    "kw, param",
    [
        ({"prompt": []}, "prompt"),
        ({"prompt": [[1, 2], "x"]}, "prompt"),
        ({"prompt": [10**6]}, None),
        ({"prompt": "hi", "extra_body": {"max_tokens": 0}}, "max_tokens"),
        ({"prompt": "hi", "stream": True, "extra_body": {"prompt_logprobs": 1}}, "prompt_logprobs"),
        ({"prompt": "hi", "logprobs": 21}, "logprobs"),
    ],
)
def test_invalid_completion_requests_are_400(client, kw, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, max_tokens=4, **kw)
    assert e.value.body["param"] == param


@pytest.mark.parametrize(
    "body, words",
    [
        (b"{not json", "not valid JSON"),
        (b"", "body is empty"),
        (b"[1, 2]", "must be a JSON object"),
        (b'{"model": "tiny-llama"}', "'messages' is required"),
        (b'{"messages": "hello"}', "messages"),
        (b'{"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}', "image_url part"),
        (
            b'{"messages": [{"role": "user", "content": [{"type": "image_url", '
            b'"image_url": {"url": "data:image/png;base64,AAAA"}}]}]}',
            "takes text only",
        ),
        (
            b'{"messages": [{"role": "user", "content": [{"type": "image_url", '
            b'"image_url": {"url": "file:///etc/passwd"}}]}]}',
            "--allowed-local-media-path",
        ),
        ('{"messages": [{"role": "user", "content": "hi"}], "max_tokens": "x"}', "max_tokens"),
        ('{"messages": [{"role": "user", "content": "\\ud800"}]}', "unpaired surrogate"),
    ],
)
def test_malformed_bodies_are_400_and_never_reach_the_engine(server, body, words):
    before = server.metrics()
    response = server.post("/v1/chat/completions", content=body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert words in error["message"] and error["type"] == "invalid_request_error"
    assert not re.search(r"pydantic|\bloc\b|errors\.pydantic\.dev|Traceback", response.text)
    after = server.metrics()
    for name in ("generation_tokens_total", "time_to_first_token_seconds_count"):
        assert after.get(METRIC % name, 0) == before.get(METRIC % name, 0)


def test_a_json_body_is_read_whatever_its_content_type(server):
    # curl -d sends application/x-www-form-urlencoded; the body is JSON all the same.
    body = b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}'
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    response = server.post("/v1/chat/completions", content=body, headers=headers)
    assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] >= 1


def test_the_api_key_guards_everything_but_health(server):
    with pytest.raises(openai.AuthenticationError) as e:
        server.client(api_key="wrong").chat.completions.create(
            model=MODEL, messages=HELLO, max_tokens=2
        )
    assert e.value.body["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        server.client(api_key="wrong").models.list()
    for path in ("/v1/models", "/metrics"):
        response = httpx.get(f"{server.url}{path}")
        assert response.status_code == 401 and "Authorization: Bearer" in response.text
    # A bad key is refused before the body is even read.
    response = httpx.post(f"{server.url}/v1/completions", content=b"{bad")
    assert response.status_code == 401
    # The scheme is case-insensitive, as HTTP says.
    lower = httpx.get(f"{server.url}/v1/models", headers={"Authorization": f"bearer {KEY}"})
    assert lower.status_code == 200
    health = httpx.get(f"{server.url}/health")
    assert health.status_code == 200 and health.json() == {"status": "ok"}


def test_unknown_paths_and_methods_answer_in_openai_shape(server):
    missing = server.post("/v1/embeddings", json={})
    assert missing.status_code == 404 and "/v1/embeddings" in missing.json()["error"]["message"]
    wrong_method = httpx.get(
        f"{server.url}/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"}
    )
    assert wrong_method.status_code == 405 and set(wrong_method.json()["error"]) == {
        "message",
        "type",
        "param",
        "code",
    }


def test_metrics_count_requests_tokens_and_latencies(server, client):
    before = server.metrics()
    r = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=5, temperature=0)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=HELLO, temperature=9)
    after = server.metrics()

    def grew(name: str) -> float:
        return after.get(name, 0) - before.get(name, 0)

    chat = 'enginehouse:http_requests_total{endpoint="/v1/chat/completions",status="%s"}'
    assert grew(chat % 200) == 1 and grew(chat % 400) == 1
    assert grew(METRIC % "prompt_tokens_total") == r.usage.prompt_tokens
    assert grew(METRIC % "generation_tokens_total") == r.usage.completion_tokens
    assert grew(METRIC % "prefix_cache_queries_total") == r.usage.prompt_tokens
    assert grew(METRIC % "time_to_first_token_seconds_count") == 1
    assert grew(METRIC % "time_per_output_token_seconds_count") == r.usage.completion_tokens - 1
    assert grew(METRIC % "e2e_request_latency_seconds_count") == 1
    assert grew(METRIC % "request_generation_tokens_sum") == r.usage.completion_tokens
    reason = r.choices[0].finish_reason
    success = (
        f'enginehouse:request_success_total{{finished_reason="{reason}",model_name="{MODEL}"}}'
    )
    assert grew(success) == 1
    for gauge in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc"):
        assert after[METRIC % gauge] == 0
    assert after[METRIC % "num_preemptions_total"] == 0
    # One prefill and a decode per further token, each a step of at least that one sequence.
    steps = grew(METRIC % "engine_steps_total")
    assert steps >= r.usage.completion_tokens
    assert grew(METRIC % "engine_step_sequences_total") >= steps
    bucket = f'enginehouse:time_to_first_token_seconds_bucket{{le="+Inf",model_name="{MODEL}"}}'
    assert after[bucket] == after[METRIC % "time_to_first_token_seconds_count"]


def test_metric_names_are_vllms_with_another_prefix(server):
    # vLLM's names (its Grafana dashboard's queries), with enginehouse: for vllm:.
    text = httpx.get(f"{server.url}/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    types = dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.MULTILINE))
    assert {
        "enginehouse:num_requests_running": "gauge",
        "enginehouse:num_requests_waiting": "gauge",
        "enginehouse:kv_cache_usage_perc": "gauge",
        "enginehouse:num_preemptions_total": "counter",
        "enginehouse:prompt_tokens_total": "counter",
        "enginehouse:generation_tokens_total": "counter",
        "enginehouse:request_success_total": "counter",
        "enginehouse:prefix_cache_queries_total": "counter",
        "enginehouse:prefix_cache_hits_total": "counter",
        "enginehouse:time_to_first_token_seconds": "histogram",
        "enginehouse:time_per_output_token_seconds": "histogram",
        "enginehouse:e2e_request_latency_seconds": "histogram",
        "enginehouse:request_prompt_tokens": "histogram",
        "enginehouse:request_generation_tokens": "histogram",
    }.items() <= types.items()


def test_version_answers_without_a_key(server):
    from enginehouse import __version__

    response = httpx.get(f"{server.url}/version")
    assert response.status_code == 200 and response.json() == {"version": __version__}


def test_a_model_without_a_chat_template_is_served_too(base_llama_dir):
    # Chat falls back to a built-in template (with a warning); completions need none.
    with pipeline(str(base_llama_dir), progress=False) as pipe:
        with ServerThread(create_app(pipe)) as running:
            c = openai.OpenAI(base_url=f"{running.url}/v1", api_key="none", max_retries=0)
            # Served under the folder's name: no client sees where the model lies on disk.
            name = c.models.list().data[0].id
            assert name == base_llama_dir.name == "llama-base"
            assert str(base_llama_dir.parent) not in httpx.get(f"{running.url}/v1/models").text
            chat = c.chat.completions.create(
                model=name, messages=HELLO, max_tokens=4, temperature=0
            )
            assert (
                chat.choices[0].message.content
                == pipe(HELLO, GenerationConfig(max_new_tokens=4)).text
            )
            text = c.completions.create(model=name, prompt="hello", max_tokens=4, temperature=0)
            assert text.usage.completion_tokens >= 1


# --- echo and prompt logprobs: loglikelihood evaluations ------------------------------------------

PASSAGE = "the quick brown fox jumps over the lazy dog"


def test_echo_with_max_tokens_0_scores_the_prompt_as_lm_eval_asks(server, client):
    # lm-evaluation-harness's local-completions model: echo, logprobs, max_tokens=0.
    r = client.completions.create(
        model=MODEL, prompt=PASSAGE, echo=True, logprobs=1, max_tokens=0, temperature=0
    )
    choice = r.choices[0]
    ids = server.pipe.tokenizer.encode(PASSAGE)
    assert choice.text == PASSAGE and choice.finish_reason == "length"
    assert r.usage.completion_tokens == 0 and r.usage.prompt_tokens == len(ids)
    lp = choice.logprobs
    assert lp.tokens == [server.pipe.tokenizer.decode([t]) for t in ids]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    # The same log-likelihood get_ppl computes.
    ppl = server.pipe.get_ppl({"token_ids": ids})
    total = sum(lp.token_logprobs[1:])
    assert math.exp(-total / (len(ids) - 1)) == pytest.approx(ppl, rel=1e-4)
    assert server.pipe.stats()["kv_blocks_used"] == 0


def test_echo_prepends_the_prompt_to_the_answer_streamed_or_not(server, client):
    plain = client.completions.create(model=MODEL, prompt=PASSAGE, max_tokens=4, temperature=0)
    echoed = client.completions.create(
        model=MODEL, prompt=PASSAGE, max_tokens=4, temperature=0, echo=True, logprobs=0
    )
    assert echoed.choices[0].text == PASSAGE + plain.choices[0].text
    prompt_len = len(server.pipe.tokenizer.encode(PASSAGE))
    assert len(echoed.choices[0].logprobs.tokens) == prompt_len + 4
    stream = client.completions.create(
        model=MODEL, prompt=PASSAGE, max_tokens=4, temperature=0, echo=True, stream=True
    )
    assert "".join(c.choices[0].text for c in stream) == echoed.choices[0].text


def test_prompt_logprobs_on_both_endpoints_as_vllm_gives_them(server):
    ids = server.pipe.tokenizer.encode(PASSAGE)
    body = {"model": MODEL, "prompt": PASSAGE, "max_tokens": 1, "prompt_logprobs": 2}
    choice = server.post("/v1/completions", json=body).json()["choices"][0]
    prompt_logprobs = choice["prompt_logprobs"]
    assert len(prompt_logprobs) == len(ids) and prompt_logprobs[0] is None
    for token, entry in zip(ids[1:], prompt_logprobs[1:]):
        assert str(token) in entry and 2 <= len(entry) <= 3  # the token and the top 2
        assert set(entry[str(token)]) == {"logprob", "rank", "decoded_token"}
        assert sorted(e["rank"] for t, e in entry.items() if t != str(token))[0] == 1
    echoed = server.post(
        "/v1/completions", json={**body, "echo": True, "logprobs": 0, "max_tokens": 0}
    ).json()["choices"][0]["logprobs"]["token_logprobs"]
    assert [e[str(t)]["logprob"] for t, e in zip(ids[1:], prompt_logprobs[1:])] == pytest.approx(
        echoed[1:], abs=1e-5
    )
    chat = server.post(
        "/v1/chat/completions", json={"messages": HELLO, "max_tokens": 1, "prompt_logprobs": 0}
    ).json()
    prompt = server.pipe.encode(HELLO)
    assert len(chat["prompt_logprobs"]) == len(prompt) and chat["prompt_logprobs"][0] is None
