"""Hostile input, second round (issue 28): grammars, stop strings, tools, images and big
responses. Each case runs against a real uvicorn server on 127.0.0.1 in front of a small
random-weight Llama and asserts the refusal or the bound; then the engine still serves and its
KV blocks are back to 0."""

from __future__ import annotations

import base64
import http.server
import io
import json
import re
import socket
import threading
import time
from dataclasses import replace

import httpx
import numpy as np
import openai
import pytest
from click.testing import CliRunner
from PIL import Image

from enginehouse import GenerationConfig, image_fetch, pipeline
from enginehouse.cli import cli
from enginehouse.serve import ServerLimits, ServerThread, create_app
from enginehouse.testing import HERMES_TOOLS_TEMPLATE, build_model, build_vlm, model_configs

MODEL = "tiny-llama"
COMPILE_TIMEOUT = 1.0  # s; the fixture's --grammar-compile-timeout
CACHE_MB = 1  # the fixture's --xgrammar-cache-mb


@pytest.fixture(scope="module")
def served(models_dir):
    # A small Llama whose template renders tools (Hermes' format), with room for them.
    config = model_configs(512)["llama"]
    config.max_position_embeddings = 1024
    folder = build_model(models_dir / "llama-tools", config, HERMES_TOOLS_TEMPLATE)
    grammar = dict(
        grammar_compile_timeout=COMPILE_TIMEOUT, grammar_compile_workers=2, xgrammar_cache_mb=1
    )
    pipe = pipeline(str(folder), engine_config={"max_batch_size": 16, **grammar}, progress=False)
    app = create_app(pipe, MODEL, limits=ServerLimits())
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
    assert not state.pipe.engine.engine.grammars.is_cached(
        constraint_of(enum_schema(20_000))
    )  # may pass later
    wait_until(lambda: state.pipe.engine.engine.grammars.running == 0)
    assert_still_serves(url, pipe)


def test_compiles_run_in_parallel_and_stop_when_their_client_leaves(served):
    """One compile thread, no cancel: a tiny regex waited 37 s behind a big enum, and a
    client that left did not stop its compile. Now a second process takes the regex, and the
    big compile's process is killed once its client is gone."""
    url, pipe, state = served
    grammars = state.pipe.engine.engine.grammars
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
    grammars = state.pipe.engine.engine.grammars
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


# --- tools and templates ------------------------------------------------------------------------


def tool(description: str = "adds", name: str = "add") -> dict:
    params = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    return {
        "type": "function",
        "function": {"name": name, "description": description, "parameters": params},
    }


def test_tools_and_tool_calls_count_in_the_length_check_before_rendering(served, peak_memory):
    """A 20 MB tool description (or 20 MB of tool-call arguments) was rendered and tokenized
    on the event loop: 40 s with every endpoint blocked, +2.9 GB. Refused before rendering."""
    url, pipe, _ = served
    huge = "x" * 20_000_000
    ask = [{"role": "user", "content": "add 1"}]
    called = [
        *ask,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "add", "arguments": huge}}
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "2"},
    ]
    for body in (
        {"messages": ask, "tools": [tool(huge)], "max_tokens": 1},
        {"messages": called, "tools": [tool()], "max_tokens": 1},
        {"messages": called, "max_tokens": 1},
    ):
        content = json.dumps(body).encode()
        started = time.monotonic()
        with peak_memory() as memory:
            message = refusal(post(url, "/v1/chat/completions", content=content))
        assert "characters long" in message and "shorten the prompt" in message
        assert time.monotonic() - started < 5 and memory.growth < 400 * 2**20, memory.growth
    assert_still_serves(url, pipe)


def test_templates_are_rendered_off_the_event_loop(served, monkeypatch):
    """While one request's prompt takes seconds to render and tokenize, /health, /metrics and
    other requests are answered."""
    url, pipe, state = served
    prepare, entered, release = pipe.prepare, threading.Event(), threading.Event()

    def slow_prepare(prompt, *args, **kwargs):
        if prompt == [{"role": "user", "content": "slow"}]:
            entered.set()
            release.wait(30)
        return prepare(prompt, *args, **kwargs)

    monkeypatch.setattr(pipe, "prepare", slow_prepare)
    body = {"messages": [{"role": "user", "content": "slow"}], "max_tokens": 2}
    slow = threading.Thread(target=post, args=(url, "/v1/chat/completions"), kwargs={"json": body})
    slow.start()
    try:
        assert entered.wait(30)
        assert httpx.get(f"{url}/health", timeout=5).status_code == 200
        assert httpx.get(f"{url}/metrics", timeout=5).status_code == 200
        quick = {"messages": [{"role": "user", "content": "quick"}], "max_tokens": 2}
        assert httpx.post(f"{url}/v1/chat/completions", json=quick, timeout=10).status_code == 200
    finally:
        release.set()
        slow.join()
    monkeypatch.undo()
    assert_still_serves(url, pipe)


# --- images -------------------------------------------------------------------------------------

FETCH_TIMEOUT = 1.0  # s per image (--image-fetch-timeout)
FETCH_TOTAL_TIMEOUT = 2.5  # s for a prompt's images (--image-fetch-total-timeout)


def png(seed: int = 0, size: tuple[int, int] = (60, 40)) -> bytes:
    pixels = np.random.RandomState(seed).randint(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


class ImageHost:
    """A real HTTP server on 127.0.0.1 with a picture, one that drips its body or its headers
    one byte at a time, a 404, a text file and a redirect; it counts what it was asked."""

    def __init__(self) -> None:
        self.asked: list[str] = []
        host = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                host.asked.append(self.path)
                try:
                    self.answer()
                except OSError:  # the fetcher hung up: that is the point
                    pass

            def answer(self):
                if self.path == "/pic.png":
                    return self.send(200, png(), "image/png")
                if self.path == "/text":
                    return self.send(200, b"hello", "text/plain")
                if self.path == "/redirect":
                    self.send_response(302)
                    self.send_header(
                        "Location", host.url("/pic.png").replace("127.0.0.1", "127.0.0.2")
                    )
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if self.path == "/drip-body":
                    self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n")
                elif self.path == "/drip-headers":
                    self.wfile.write(b"HTTP/1.1 200 OK\r\n")
                else:
                    return self.send(404, b"no", "text/plain")
                for _ in range(200):  # a byte every 0.1 s: every read gets something
                    self.wfile.write(b"x")
                    self.wfile.flush()
                    time.sleep(0.1)

            def send(self, status, body, kind):
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.server.server_address[1]}{path}"


@pytest.fixture(scope="module")
def image_host():
    host = ImageHost()
    yield host
    host.server.shutdown()


@pytest.fixture(scope="module")
def vlm_served(tmp_path_factory):
    folder = build_vlm(tmp_path_factory.mktemp("llava"), "llava")
    config = {
        "max_batch_size": 16,
        "allowed_media_domains": ["127.0.0.1", "127.0.0.2", "localhost"],
        "image_fetch_timeout": FETCH_TIMEOUT,
        "image_fetch_total_timeout": FETCH_TOTAL_TIMEOUT,
        "max_concurrent_image_decodes": 1,
    }
    pipe = pipeline(str(folder), engine_config=config, progress=False)
    app = create_app(pipe, MODEL, limits=ServerLimits(media_loading_thread_count=4))
    with ServerThread(app) as server:
        yield server.url, pipe, app.state.server
    pipe.close()


def image_chat(*urls: str, **kw) -> dict:
    parts = [{"type": "image_url", "image_url": {"url": u}} for u in urls]
    content = [*parts, {"type": "text", "text": "what is it?"}]
    return {"messages": [{"role": "user", "content": content}], "max_tokens": 2, **kw}


def data_url(data: bytes, kind: str = "image/png") -> str:
    return f"data:{kind};base64," + base64.b64encode(data).decode()


@pytest.fixture
def private_allowed(vlm_served, monkeypatch):
    """The test's image host is on 127.0.0.1: allowed here as --allow-private-media-addresses
    would allow it."""
    state = vlm_served[2]
    monkeypatch.setattr(state, "fetch_policy", replace(state.fetch_policy, allow_private=True))


def test_slow_downloads_end_at_their_deadline_and_block_nothing_else(
    vlm_served, image_host, private_allowed
):
    """Six URLs that dripped a byte every 5 s blocked /metrics and every image request, data:
    URLs too: the 10 s timeout was per read. Now each download has a deadline, a prompt's
    downloads one together, and they run on threads of their own."""
    url, pipe, _ = vlm_served
    results: dict[int, tuple[float, httpx.Response]] = {}

    def slow(i: int, *paths: str) -> None:
        started = time.monotonic()
        body = image_chat(*(image_host.url(p) for p in paths))
        r = post(url, "/v1/chat/completions", json=body)
        results[i] = (time.monotonic() - started, r)

    paths = [("/drip-body",), ("/drip-headers",)] * 3 + [("/drip-body",) * 6]
    threads = [threading.Thread(target=slow, args=(i, *p)) for i, p in enumerate(paths)]
    for t in threads:
        t.start()
    wait_until(lambda: len(image_host.asked) >= 4)
    started = time.monotonic()
    assert httpx.get(f"{url}/metrics", timeout=5).status_code == 200
    assert httpx.get(f"{url}/health", timeout=5).status_code == 200
    inline = post(url, "/v1/chat/completions", json=image_chat(data_url(png(1))))
    assert inline.status_code == 200, inline.text
    assert time.monotonic() - started < FETCH_TIMEOUT * 2  # not behind the slow ones
    for t in threads:
        t.join()
    messages = set()
    for seconds, r in results.values():
        messages.add(refusal(r).split("'")[2])  # the message, less the URL
        assert seconds < FETCH_TOTAL_TIMEOUT + 2.0
    assert len(messages) == 1 and "could not fetch the image" in refusal(r)
    assert_still_serves(url, pipe)


def test_hosts_resolving_to_private_addresses_are_refused_after_redirects_too(
    vlm_served, image_host, monkeypatch
):
    """An allowed name that resolved to a loopback, private or link-local address was
    fetched, and the errors told a closed port, a 404 and a non-image apart. Now every
    address is checked (after each redirect too) and every failed fetch reads the same."""
    url, pipe, state = vlm_served
    asked = len(image_host.asked)
    loopback = image_host.url("/pic.png", "localhost")  # localhost: allowed, but loopback
    message = refusal(post(url, "/v1/chat/completions", json=image_chat(loopback)))
    assert "could not fetch the image" in message
    assert len(image_host.asked) == asked  # refused before anything was sent

    # 127.0.0.1 taken for public here, 127.0.0.2 not: the redirect to it is refused.
    monkeypatch.setattr(image_fetch, "is_public", lambda address: address == "127.0.0.1")
    fetched = post(url, "/v1/chat/completions", json=image_chat(image_host.url("/pic.png")))
    assert fetched.status_code == 200, fetched.text
    failures = {
        path: refusal(post(url, "/v1/chat/completions", json=image_chat(image_host.url(path))))
        for path in ("/redirect", "/missing", "/text")
    }
    closed = image_host.url("/pic.png").rsplit(":", 1)[0] + ":9/pic.png"  # nothing listens
    failures["closed"] = refusal(post(url, "/v1/chat/completions", json=image_chat(closed)))
    assert image_host.asked[-3:] == ["/redirect", "/missing", "/text"]  # not /pic.png on .2
    assert len({m.split("'")[2] for m in [message, *failures.values()]}) == 1
    assert_still_serves(url, pipe)


def test_a_huge_image_under_the_pixel_budget_decodes_in_bounded_memory(vlm_served, peak_memory):
    """A 13000x13000 single-colour GIF of 121 KB cost 1.5-2.2 GB (RGB, the hash and the
    processor's arrays at full size), and six at once took the server past 8 GB. Now an image
    is reduced to 4096x4096 as soon as it is decoded, and one is decoded at a time here."""
    url, pipe, _ = vlm_served
    buf = io.BytesIO()
    Image.new("P", (13000, 13000), 3).save(buf, format="GIF")
    gif = data_url(buf.getvalue(), "image/gif")
    del buf
    with peak_memory() as one:
        r = post(url, "/v1/chat/completions", json=image_chat(gif))
    assert r.status_code == 200, r.text
    assert one.growth < 500 * 2**20, one.growth  # the GIF's 169 MB of pixels, then 48 MB

    answers: list[httpx.Response] = []
    threads = [
        threading.Thread(
            target=lambda: answers.append(post(url, "/v1/chat/completions", json=image_chat(gif)))
        )
        for _ in range(3)
    ]
    with peak_memory() as three:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert [a.status_code for a in answers] == [200] * 3
    assert three.growth < 900 * 2**20, three.growth  # decodes one at a time
    assert_still_serves(url, pipe)


# --- big responses ------------------------------------------------------------------------------


def test_a_response_that_would_pass_the_limit_is_refused_before_generating(served, monkeypatch):
    """Within every other limit, 1024 prompts x 2000 ids with prompt_logprobs: 20 would build
    a ~4.4 GB body (6-10 KB of peak memory per prompt position). Now a 400 up front, from an
    estimate of the response's size, with --max-response-body-size (128 MiB)."""
    url, pipe, state = served
    ids = [[5 + i % 300] * 200 for i in range(1024)]
    steps = pipe.stats()["steps"]
    short = [p[:20] for p in ids]
    for prompts, extra in (
        (ids, {"prompt_logprobs": 20}),
        (ids, {"echo": True, "logprobs": 20, "max_tokens": 0}),
        (short, {"logprobs": 20, "max_tokens": 120}),  # 1024 x 120 tokens x 21 entries
    ):
        started = time.monotonic()
        message = refusal(post(url, "/v1/completions", json={"prompt": prompts, **extra}))
        assert "--max-response-body-size" in message and "MiB" in message
        assert time.monotonic() - started < 5
    # Chat: 128 choices x 200 tokens x 21 entries make 35 MB (measured: 31 MB), over 16 MiB.
    monkeypatch.setattr(state, "limits", replace(state.limits, max_response_body_size=2**24))
    chat = {"messages": [{"role": "user", "content": "hi"}], "n": 128, "logprobs": True}
    chat |= {"top_logprobs": 20, "max_tokens": 200}
    assert "about 33 MiB" in refusal(post(url, "/v1/chat/completions", json=chat))
    monkeypatch.undo()
    assert pipe.stats()["steps"] == steps  # nothing reached the engine
    # An evaluation's usual request is far from it.
    usual = {"prompt": ids[:8], "echo": True, "logprobs": 1, "max_tokens": 0}
    r = post(url, "/v1/completions", json=usual)
    assert r.status_code == 200, r.text
    assert len(r.json()["choices"][0]["logprobs"]["tokens"]) == 200
    assert_still_serves(url, pipe)


# --- 500s that are 400s -------------------------------------------------------------------------


def nested_schema(depth: int) -> dict:
    schema: dict = {"type": "string"}
    for _ in range(depth):
        schema = {"type": "object", "properties": {"a": schema}, "required": ["a"]}
    return schema


def test_malformed_constraints_and_image_parts_are_400s_not_500s(served):
    url, pipe, _ = served
    deep = nested_schema(300)
    tools = [tool()]
    tools[0]["function"]["parameters"] = deep
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    cases = [
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": deep},
                }
            },
            "nested more than 128 levels",
        ),
        ({"structured_outputs": {"json": json.dumps(deep)}}, "nested more than 128 levels"),
        ({"guided_json": "[" * 5000 + "]" * 5000}, "nested too deeply"),
        ({"tools": tools, "tool_choice": "required"}, "nested more than 128 levels"),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "image_url", "image_url": "http://a/b.png"}],
                    }
                ]
            },
            "got image_url as a str",
        ),
    ]
    for structures in ([1], 5, [None], [{"begin": 1, "schema": {}, "end": "x"}]):
        legacy = {"structures": structures, "triggers": ["<f"]}
        cases.append(
            (
                {"structured_outputs": {"structural_tag": legacy}},
                "structures must be a list of objects",
            )
        )
        cases.append(
            (
                {"response_format": {"type": "structural_tag", **legacy}},
                "structures must be a list of objects",
            )
        )
    cases.append(
        (
            {"structured_outputs": {"structural_tag": {"structures": [], "triggers": 5}}},
            "triggers must be a list of strings",
        )
    )
    for extra, words in cases:
        message = refusal(post(url, "/v1/chat/completions", json=chat | extra))
        assert words in message, (extra, message)
    assert_still_serves(url, pipe)


def test_a_nul_in_an_image_hosts_name_is_a_400(vlm_served):
    url, pipe, _ = vlm_served
    for host in ("127.0.0.1%00.localhost", "127.0.0.1\u0000.localhost", "exa%00mple.com"):
        body = image_chat(f"http://{host}/pic.png")
        message = refusal(post(url, "/v1/chat/completions", json=body))
        assert "could not fetch the image" in message or "is not allowed" in message
    assert_still_serves(url, pipe)


# --- start-up -----------------------------------------------------------------------------------


def test_an_api_key_with_a_trailing_newline_is_an_error_at_start(llama_dir):
    """A key read from a Kubernetes secret ends with a newline: it was accepted, and no client
    could ever authenticate (HTTP strips header whitespace). Refused at start, with the fix."""
    for key in ("secret\n", " secret", "secret\t", "sec\x1bret"):
        result = CliRunner().invoke(
            cli, ["serve", "no-such-model"], env={"ENGINEHOUSE_API_KEY": key}
        )
        assert result.exit_code == 2, result.output
        assert "newline" in result.output and "remove them" in result.output
        assert "no-such-model" not in result.output  # refused before the model is looked up
        with pytest.raises(ValueError, match="no client could ever send this key"):
            create_app(None, api_key=key)  # type: ignore[arg-type]


# --- connections --------------------------------------------------------------------------------

HEADER_TIMEOUT = 1.0  # s (--header-read-timeout)
BODY_TIMEOUT = 1.5  # s (--body-read-timeout)
MAX_CONNECTIONS = 24


@pytest.fixture(scope="module")
def tight(served):
    """A second server in front of the same pipeline, with tight limits on connections."""
    _, pipe, _ = served
    tight_limits = replace(
        served[2].limits,  # the same grammar limits: both apps configure the one compiler
        header_read_timeout=HEADER_TIMEOUT,
        body_read_timeout=BODY_TIMEOUT,
        max_connections=MAX_CONNECTIONS,
    )
    with ServerThread(create_app(pipe, MODEL, limits=tight_limits)) as server:
        yield server.url, pipe


def connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=10)


def closed_within(sock: socket.socket, seconds: float) -> bytes | None:
    """What the server sent before it closed the connection, or None if it kept it open."""
    sock.settimeout(seconds)
    data = b""
    try:
        while chunk := sock.recv(4096):
            data += chunk
    except TimeoutError:
        return None
    return data


def test_half_sent_requests_are_closed_and_connections_capped(tight):
    """1100 half-sent requests under a 1024-descriptor limit made the server unreachable: no
    deadline on headers or bodies, no cap on connections."""
    url, pipe = tight
    half_headers = [connect(url) for _ in range(MAX_CONNECTIONS)]
    for s in half_headers:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Le")
    time.sleep(0.3)
    extra = connect(url)  # one too many: told so, and closed at once
    answer = closed_within(extra, 5)
    assert answer is not None and answer.startswith(b"HTTP/1.1 503")
    assert b"--max-connections" in answer
    started = time.monotonic()
    for s in half_headers:  # each closed at its header deadline, without an answer
        assert closed_within(s, HEADER_TIMEOUT + 5) == b""
        s.close()
    assert time.monotonic() - started < HEADER_TIMEOUT + 5
    assert httpx.get(f"{url}/health").status_code == 200  # room again

    slow_body = connect(url)
    slow_body.sendall(
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b'Content-Length: 1000\r\n\r\n{"prompt": "'
    )
    answer = closed_within(slow_body, BODY_TIMEOUT + 5)
    assert answer is not None and answer.startswith(b"HTTP/1.1 408")
    assert b"--body-read-timeout" in answer
    slow_body.close()

    # A connection kept alive between requests is closed once idle past the header deadline.
    with httpx.Client() as client:
        assert client.get(f"{url}/health").status_code == 200
        time.sleep(HEADER_TIMEOUT + 0.5)
        assert client.get(f"{url}/health").status_code == 200  # a new connection
    assert_still_serves(url, pipe)


# --- forced tool calls cut short ----------------------------------------------------------------


def test_a_forced_tool_call_cut_short_is_length_with_no_half_call_as_content(served):
    """A forced call cut off by max_tokens or the context came back as raw `<tool_call>...`
    text in `content` (with max_tokens: 1, the content was "<")."""
    url, pipe, _ = served
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
    add = tool()
    named = {"type": "function", "function": {"name": "add"}}
    ask = [{"role": "user", "content": "add 1"}]
    # A prompt that leaves the call 6 tokens of context.
    words = 1
    while len(pipe.encode([{"role": "user", "content": "add " * words}], tools=[add])) < 1018:
        words += 1
    near_the_end = [{"role": "user", "content": "add " * words}]
    for messages, max_tokens in ((ask, 1), (ask, 12), (near_the_end, None)):
        for choice in ("required", named):
            kw = dict(model=MODEL, messages=messages, tools=[add], tool_choice=choice)
            if max_tokens is not None:
                kw["max_tokens"] = max_tokens
            r = client.chat.completions.create(**kw)
            c = r.choices[0]
            assert c.finish_reason == "length" and r.usage.completion_tokens >= 1
            assert c.message.content is None and not c.message.tool_calls, c.message
            chunks = list(client.chat.completions.create(**kw, stream=True))
            assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == ""
            assert not any(ch.choices[0].delta.tool_calls for ch in chunks if ch.choices)
            assert chunks[-1].choices[0].finish_reason == "length"
    # Given room, it calls the tool (arguments bounded: random weights write long numbers).
    add["function"]["parameters"]["properties"]["a"] = {"enum": [1, 2]}
    r = client.chat.completions.create(
        model=MODEL, messages=ask, tools=[add], tool_choice="required", max_tokens=200,
        parallel_tool_calls=False, temperature=0,
    )  # fmt: skip
    assert r.choices[0].finish_reason == "tool_calls" and r.choices[0].message.tool_calls
    assert_still_serves(url, pipe)


# --- metrics ------------------------------------------------------------------------------------


def scrape(url: str) -> tuple[dict[str, float], dict[str, str]]:
    text = httpx.get(f"{url}/metrics").text
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples, dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.MULTILINE))


def test_vllms_request_parameter_latency_and_cache_config_metrics(served):
    url, pipe, _ = served
    before, _ = scrape(url)
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
    r = client.completions.create(
        model=MODEL, prompt=["hello", "world"], n=2, max_tokens=5, temperature=0,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    after, types = scrape(url)

    def grew(name: str) -> float:
        key = f'enginehouse:{name}{{model_name="{MODEL}"}}'
        return after.get(key, 0) - before.get(key, 0)

    assert grew("request_params_n_count") == 2 and grew("request_params_n_sum") == 4
    assert grew("request_params_max_tokens_count") == 2
    assert grew("request_params_max_tokens_sum") == 10
    assert grew("inter_token_latency_seconds_count") == r.usage.completion_tokens - 4
    assert {
        "enginehouse:request_params_n": "histogram",
        "enginehouse:request_params_max_tokens": "histogram",
        "enginehouse:inter_token_latency_seconds": "histogram",
        "enginehouse:cache_config_info": "gauge",
    }.items() <= types.items()
    info = [k for k in after if k.startswith("enginehouse:cache_config_info{")]
    summary = pipe.summary()
    assert len(info) == 1 and after[info[0]] == 1
    assert f'num_gpu_blocks="{summary["kv_blocks"]}"' in info[0]
    assert 'enable_prefix_caching="True"' in info[0] and "block_size=" in info[0]
    bucket = 'enginehouse:request_params_max_tokens_bucket{le="1000.0",model_name="tiny-llama"}'
    assert bucket in after  # vLLM's 1-2-5 buckets up to the context (1024)


def test_the_engines_own_request_timing_and_step_metrics(served):
    """vLLM's metrics that need the engine's timestamps: each finished choice's queue,
    prefill, decode and inference time and its preemptions, the tokens of each step, and the
    waiting requests by reason."""
    url, pipe, _ = served
    before, _ = scrape(url)
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
    client.completions.create(
        model=MODEL, prompt=["hello", "world"], max_tokens=5, temperature=0,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    after, types = scrape(url)

    def grew(name: str) -> float:
        key = f'enginehouse:{name}{{model_name="{MODEL}"}}'
        return after.get(key, 0) - before.get(key, 0)

    for part in ("queue", "prefill", "decode", "inference"):
        assert grew(f"request_{part}_time_seconds_count") == 2
        assert types[f"enginehouse:request_{part}_time_seconds"] == "histogram"
    assert grew("request_decode_time_seconds_sum") > 0
    assert grew("request_num_preemptions_count") == 2 and grew("request_num_preemptions_sum") == 0
    steps = grew("engine_steps_total")
    assert steps > 0 and grew("iteration_tokens_total_count") == steps
    assert grew("iteration_tokens_total_sum") >= 2 * 5  # the prompts, then a token each
    for reason in ("capacity", "deferred"):
        key = (
            f'enginehouse:num_requests_waiting_by_reason{{model_name="{MODEL}",reason="{reason}"}}'
        )
        assert after[key] == 0


def test_a_grammar_too_slow_for_one_token_ends_its_request_alone(models_dir):
    """An ambiguous grammar gets slower with every token (240 ms at token 570), and every
    client waited for it each step. A grammar that takes longer than --grammar-step-timeout
    for one token ends its request with an error naming the flag; the others go on."""
    folder = build_model(models_dir / "llama-slow-grammar", model_configs(512)["llama"])
    config = {"max_batch_size": 8, "grammar_step_timeout": 0.002}
    pipe = pipeline(str(folder), engine_config=config, progress=False)
    app = create_app(pipe, MODEL, limits=ServerLimits())
    try:
        with ServerThread(app) as server:
            ambiguous = 'root ::= a root\na ::= "x" | a a'
            body = {
                "model": MODEL, "prompt": "hi", "max_tokens": 250, "n": 2,
                "structured_outputs": {"grammar": ambiguous},
            }  # fmt: skip
            started = time.monotonic()
            answer = post(server.url, "/v1/completions", json=body)
            assert time.monotonic() - started < 60
            # A choice that failed is the request's error (the server's rule for any choice).
            assert answer.status_code == 500 and "Traceback" not in answer.text
            assert "grammar_step_timeout" in answer.json()["error"]["message"]
            assert_still_serves(server.url, pipe)
    finally:
        pipe.close()
