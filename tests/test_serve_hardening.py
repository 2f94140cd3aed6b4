"""Hostile input, second round (issue 28): grammars, stop strings, tools, images and big
responses. Each case runs against a real uvicorn server on 127.0.0.1 in front of a small
random-weight Llama and asserts the refusal or the bound; then the engine still serves and its
KV blocks are back to 0."""

from __future__ import annotations

import threading
import time

import httpx
import openai
import pytest

from enginehouse import GenerationConfig, pipeline
from enginehouse.serve import ServerLimits, ServerThread, create_app

MODEL = "tiny-llama"
COMPILE_TIMEOUT = 1.0  # s; the fixture's --grammar-compile-timeout
CACHE_MB = 1  # the fixture's --xgrammar-cache-mb


@pytest.fixture(scope="module")
def served(llama_dir):
    pipe = pipeline(str(llama_dir), engine_config={"max_batch_size": 16}, progress=False)
    limits = ServerLimits(
        grammar_compile_timeout=COMPILE_TIMEOUT, grammar_compile_workers=2, xgrammar_cache_mb=1
    )
    app = create_app(pipe, MODEL, limits=limits)
    with ServerThread(app) as server:
        yield server.url, pipe, app.state.server
    pipe.close()


def post(url: str, path: str, **kw) -> httpx.Response:
    return httpx.post(f"{url}{path}", timeout=60, **kw)


def idle(pipe, timeout: float = 10.0) -> dict[str, int]:
    deadline = time.monotonic() + timeout
    while True:
        stats = pipe.stats()
        if stats["running"] == stats["waiting"] == 0 or time.monotonic() > deadline:
            return stats
        time.sleep(0.02)


def assert_still_serves(url: str, pipe) -> None:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
    r = client.completions.create(model=MODEL, prompt="hello", max_tokens=3, temperature=0)
    assert r.choices[0].text == pipe("hello", {"max_new_tokens": 3}, apply_chat_template=False).text
    assert idle(pipe)["kv_blocks_used"] == 0
    assert httpx.get(f"{url}/health").json() == {"status": "ok"}


def refusal(response: httpx.Response, status: int = 400) -> str:
    assert response.status_code == status, response.text
    assert "Traceback" not in response.text
    return response.json()["error"]["message"]


def wait_until(condition, timeout: float = 10.0) -> float:
    """Seconds until `condition()` held (fails after `timeout`)."""
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < timeout, "timed out"
        time.sleep(0.02)
    return time.monotonic() - start


# --- grammar compiles ---------------------------------------------------------------------------


def enum_schema(n: int, tag: str = "") -> dict:
    """A string enum of `n` values: 10,000 took 40 s to compile with a 150k vocabulary (1.7 s
    with the test models' 512), 20,000 take 5 s here."""
    return {"type": "string", "enum": [f"{tag}value-{i:05d}-abcdefghij" for i in range(n)]}


def constrained(schema: dict, **kw) -> dict:
    return {"prompt": "hi", "max_tokens": 2, "structured_outputs": {"json": schema}, **kw}


def constraint_of(schema: dict):
    fmt = {"type": "json_schema", "json_schema": {"name": "schema", "schema": schema}}
    return GenerationConfig(response_format=fmt).constraint


def test_a_grammar_that_compiles_too_long_is_a_400_naming_the_timeout(served):
    url, pipe, state = served
    started = time.monotonic()
    message = refusal(post(url, "/v1/completions", json=constrained(enum_schema(20_000))))
    assert "--grammar-compile-timeout" in message and f"{COMPILE_TIMEOUT:g} s" in message
    # The clock starts once a compile process holds it (starting one takes a few seconds).
    assert time.monotonic() - started < COMPILE_TIMEOUT + 15
    assert not state.grammars.is_cached(constraint_of(enum_schema(20_000)))  # may pass later
    wait_until(lambda: state.grammars.running == 0)
    assert_still_serves(url, pipe)


def test_compiles_run_in_parallel_and_stop_when_their_client_leaves(served):
    """One compile thread, no cancel: a tiny regex waited 37 s behind a big enum, and a
    client that left did not stop its compile. Now a second process takes the regex, and the
    big compile's process is killed once its client is gone."""
    url, pipe, state = served
    grammars = state.grammars
    grammars.configure(timeout=60.0)  # only the client's leaving may stop it here
    try:
        # Both compile processes started (a few seconds each, once).
        warm = [constrained({"type": "string", "enum": [f"w{i}"]}) for i in range(2)]
        threads = [
            threading.Thread(target=post, args=(url, "/v1/completions"), kwargs={"json": b})
            for b in warm
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

        def leaves_after_half_a_second():
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(
                    f"{url}/v1/completions", json=constrained(enum_schema(20_000, "x")), timeout=0.5
                )

        hostile = threading.Thread(target=leaves_after_half_a_second)
        hostile.start()
        wait_until(lambda: grammars.running == 1)
        started = time.monotonic()
        r = post(
            url,
            "/v1/completions",
            json={**constrained({}), "structured_outputs": {"regex": "[0-9]{3}"}},
        )
        assert r.status_code == 200, r.text
        assert time.monotonic() - started < 3.0  # not behind the 5 s compile
        hostile.join()
        # Killed soon after its client left, well before its 5 s compile would end.
        assert wait_until(lambda: grammars.running == 0, timeout=3.0) < 2.0
        assert not grammars.is_cached(constraint_of(enum_schema(20_000, "x")))
    finally:
        grammars.configure(timeout=COMPILE_TIMEOUT)
    assert_still_serves(url, pipe)


def test_the_grammar_cache_is_capped_in_bytes_least_recently_used_first(served):
    """256 compiled grammars were kept whatever their size (a 5000-property schema is 54 MB
    with a real vocabulary): now at most --xgrammar-cache-mb."""
    url, pipe, state = served
    grammars = state.grammars
    schemas = [enum_schema(3000, f"s{i}") for i in range(4)]  # ~0.45 MB each, compiled
    for schema in schemas:
        r = post(url, "/v1/completions", json=constrained(schema))
        assert r.status_code == 200, r.text
        assert grammars.cached_bytes <= CACHE_MB * 2**20
    assert grammars.is_cached(constraint_of(schemas[-1]))
    assert not grammars.is_cached(constraint_of(schemas[0]))  # the least recently used
    assert_still_serves(url, pipe)


# --- stop strings -------------------------------------------------------------------------------


def test_stop_strings_are_limited_in_number_and_length(served):
    """400,000 stop strings with n=64 were scanned at every step for every choice."""
    url, pipe, _ = served
    many = {"prompt": "hi", "n": 64, "stop": [f"s{i}" for i in range(400_000)]}
    message = refusal(post(url, "/v1/completions", json=many))
    assert "400000 strings" in message and "--max-stop-strings" in message
    long = {"messages": [{"role": "user", "content": "hi"}], "stop": ["ok", "x" * 257]}
    message = refusal(post(url, "/v1/chat/completions", json=long))
    assert "stop[1] is 257 characters" in message and "--max-stop-string-length" in message
    assert_still_serves(url, pipe)


def test_the_most_stop_strings_allowed_still_cut_where_the_first_begins(served):
    url, pipe, _ = served
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
    free = pipe("hello", {"max_new_tokens": 24, "ignore_eos": True}, apply_chat_template=False)
    stop = free.text[8:11]  # three characters the model will write
    decoys = [f"{i:03d}" + "q" * 250 for i in range(63)]  # 64 strings, up to 253 characters
    want = free.text[: free.text.index(stop)]
    ask = dict(model=MODEL, prompt="hello", max_tokens=24, temperature=0, n=4)
    ask |= dict(stop=[*decoys, stop], extra_body={"ignore_eos": True})
    r = client.completions.create(**ask)
    assert [c.text for c in r.choices] == [want] * 4
    assert {c.finish_reason for c in r.choices} == {"stop"}
    streamed = [""] * 4
    for chunk in client.completions.create(**ask, stream=True):
        for c in chunk.choices:
            streamed[c.index] += c.text
    assert streamed == [want] * 4  # nothing of the stop string was sent before the cut
    assert_still_serves(url, pipe)
