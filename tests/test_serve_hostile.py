"""Hostile input to the server and the Python API: each case is refused with a message that
names the problem, and then the engine still serves and its KV blocks are back where they
were. A real uvicorn server on 127.0.0.1 in front of a small random-weight Llama, talked to
by the official `openai` client, httpx and, for what no client sends, a raw socket."""

from __future__ import annotations

import json
import logging
import queue
import shutil
import socket
import threading
import time

import httpx
import openai
import pytest
from click.testing import CliRunner
from pydantic import ValidationError

from enginehouse import GenerationConfig, pipeline
from enginehouse.cli import cli
from enginehouse.errors import InvalidModelError
from enginehouse.serve import ServerLimits, ServerThread, create_app
from enginehouse.serve.state import default_model_name
from enginehouse.spec import read_model_spec

MODEL = "tiny-llama"
STEP_TIMEOUT = 1.0  # seconds a step may run before /health says the engine is stuck


@pytest.fixture(scope="module")
def served(llama_dir):
    pipe = pipeline(str(llama_dir), engine_config={"max_batch_size": 16}, progress=False)
    limits = ServerLimits(engine_iteration_timeout=STEP_TIMEOUT)
    with ServerThread(create_app(pipe, MODEL, limits=limits)) as server:
        yield server.url, pipe
    pipe.close()


def post(url: str, path: str, **kw) -> httpx.Response:
    return httpx.post(f"{url}{path}", timeout=60, **kw)


def idle(pipe, timeout: float = 10.0) -> dict[str, int]:
    """The engine's counters once nothing runs (aborts take effect at the next step)."""
    deadline = time.monotonic() + timeout
    while True:
        stats = pipe.stats()
        if stats["running"] == stats["waiting"] == 0 or time.monotonic() > deadline:
            return stats
        time.sleep(0.02)


def assert_still_serves(url: str, pipe, blocks_before: int = 0) -> None:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
    r = client.completions.create(model=MODEL, prompt="hello", max_tokens=3, temperature=0)
    assert r.choices[0].text == pipe("hello", {"max_new_tokens": 3}, apply_chat_template=False).text
    assert idle(pipe)["kv_blocks_used"] == blocks_before
    assert httpx.get(f"{url}/health").json() == {"status": "ok"}


def refusal(response: httpx.Response, status: int) -> str:
    assert response.status_code == status, response.text
    assert "Traceback" not in response.text
    return response.json()["error"]["message"]


# --- limits on what one request may ask --------------------------------------------------------


def test_a_request_may_not_start_more_sequences_than_the_cap(served):
    """1000 prompts with n=128 (128,000 sequences in a 21 KB body) stalled the engine for
    minutes; above --max-seqs-per-request (1024, vLLM's cap on prompts) it is a 400 at once."""
    url, pipe = served
    cases = [(["hi"] * 1000, 128, "128000 sequences"), (["hi"] * 1025, 1, "1025 sequences")]
    for prompts, n, words in cases:
        body = {"prompt": prompts, "n": n, "max_tokens": 4}
        message = refusal(post(url, "/v1/completions", json=body), 400)
        assert words in message and "--max-seqs-per-request" in message
    assert_still_serves(url, pipe)


def test_a_body_over_the_size_limit_is_413_and_never_held(served, peak_memory):
    """A 50 MB body took 63 s and left the server 7 GB larger: above 32 MiB (vLLM's HTTP
    limit) it is refused, from its Content-Length at once, or once a chunked body passes it."""
    url, pipe = served
    body = json.dumps({"prompt": "the quick brown fox " * 2_500_000, "max_tokens": 1}).encode()
    with peak_memory() as announced:
        message = refusal(post(url, "/v1/completions", content=body), 413)
    assert "--max-request-body-size" in message and str(32 * 2**20) in message

    def chunks():  # no Content-Length: the server counts what arrives
        for i in range(0, len(body), 2**20):
            yield body[i : i + 2**20]

    with peak_memory() as chunked:
        message = refusal(post(url, "/v1/completions", content=chunks()), 413)
    assert "--max-request-body-size" in message
    # The 50 MB body itself is held by this test; the server adds at most its 32 MiB buffer.
    assert announced.growth < 150 * 2**20 and chunked.growth < 250 * 2**20
    assert_still_serves(url, pipe)


def test_a_prompt_that_cannot_fit_is_refused_before_it_is_tokenized(served, peak_memory):
    """Under the body limit, 28 MB of text took 48 s and 4 GB to tokenize before the context
    check refused it. More characters than the context's tokens could hold (each as long as
    the vocabulary's longest) is refused at once; so are token ids beyond the context."""
    url, pipe = served
    text = {"prompt": "the quick brown fox " * 1_000_000, "max_tokens": 1}
    ids = {"prompt": [5] * 3_000_000, "max_tokens": 1}
    chat = {"messages": [{"role": "user", "content": text["prompt"]}], "max_tokens": 1}
    for path, body, words in [
        ("/v1/completions", text, "20000000 characters long"),
        ("/v1/chat/completions", chat, "20000000 characters long"),
        ("/v1/completions", ids, "3000000 tokens"),
    ]:
        content = json.dumps(body).encode()
        with peak_memory() as memory:
            message = refusal(post(url, path, content=content), 400)
        assert words in message and "shorten the prompt" in message
        assert memory.growth < 400 * 2**20, memory.growth  # tokenizing it took 4 GB
    assert_still_serves(url, pipe)


def test_json_nested_too_deeply_is_400(served):
    url, pipe = served
    body = '{"prompt": "hi", "metadata": {"a": ' + "[" * 5000 + "]" * 5000 + "}}"
    message = refusal(post(url, "/v1/completions", content=body), 400)
    assert "nested too deeply" in message
    assert_still_serves(url, pipe)


def test_seeds_outside_the_engine_range(served):
    """OpenAI's seed is any int64: the server maps seed + i into the engine's 0..2**63-1, so
    the last seed with n=2 still answers; the Python API refuses such a seed at once."""
    url, pipe = served
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
    for seed in (2**63 - 1, -(2**63)):
        r = client.completions.create(model=MODEL, prompt="hi", max_tokens=2, n=2, seed=seed)
        assert len(r.choices) == 2
    for seed in (2**64, -1):
        with pytest.raises(ValidationError, match="random_seed"):
            GenerationConfig(random_seed=seed)
    assert_still_serves(url, pipe)


def test_a_request_whose_set_up_fails_ends_alone(served):
    """A seed of 2**64 made torch raise inside the engine step, which failed every request in
    flight and hung the caller. A request that cannot be set up now ends with its error."""
    url, pipe = served
    engine = pipe.engine
    ids = pipe.encode("hello", apply_chat_template=False)
    good = GenerationConfig(max_new_tokens=24, ignore_eos=True)
    want = pipe({"token_ids": ids}, good).token_ids
    survivor = engine.stream(ids, good)
    first = next(survivor)  # running: the bad request arrives mid-generation
    bad = GenerationConfig.model_construct(**{**good.model_dump(), "random_seed": 2**64})
    outputs: queue.Queue = queue.Queue()
    engine.submit(ids, bad, outputs.put)
    out = outputs.get(timeout=30)  # it used to never come: the caller hung
    assert out.finished and out.finish_reason == "error"
    assert "could not set up the request" in out.error and "Overflow" in out.error
    rest = list(survivor)
    assert rest[-1].finish_reason == "length"
    assert first.token_ids + [t for o in rest for t in o.token_ids] == want
    assert_still_serves(url, pipe)


# --- the engine's health -----------------------------------------------------------------------


def test_health_reports_an_engine_stuck_in_a_step(served, monkeypatch):
    url, pipe = served
    runner = pipe.runner
    release, entered = threading.Event(), threading.Event()
    execute = runner.execute

    def stuck(batch):  # a kernel that does not come back, until released
        entered.set()
        release.wait(30)
        return execute(batch)

    monkeypatch.setattr(runner, "execute", stuck)
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
    answer = {}
    asking = threading.Thread(
        target=lambda: answer.update(r=client.completions.create(model=MODEL, prompt="hi"))
    )
    asking.start()
    try:
        assert entered.wait(30)
        deadline = time.monotonic() + 30
        while (health := httpx.get(f"{url}/health")).status_code == 200:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        message = refusal(health, 503)
        assert "stuck" in message and "--engine-iteration-timeout" in message
    finally:
        release.set()
        asking.join(60)
    monkeypatch.undo()
    assert answer["r"].usage.completion_tokens >= 1
    assert_still_serves(url, pipe)


# --- connections -------------------------------------------------------------------------------


def test_a_client_that_leaves_mid_upload_is_a_disconnect_not_a_500(served, caplog):
    url, pipe = served
    host, port = url.removeprefix("http://").split(":")

    def answers(status: int) -> float:
        text = httpx.get(f"{url}/metrics").text
        key = f'enginehouse:http_requests_total{{endpoint="/v1/completions",status="{status}"}}'
        return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(key))

    before = answers(499), answers(500)
    with caplog.at_level(logging.INFO):
        with socket.create_connection((host, int(port))) as s:
            s.sendall(
                b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                b"\r\nContent-Length: 100000\r\n\r\n" + b'{"prompt": "' + b"a" * 1000
            )
        deadline = time.monotonic() + 10
        while answers(499) == before[0] and time.monotonic() < deadline:
            time.sleep(0.05)
    assert (answers(499), answers(500)) == (before[0] + 1, before[1])
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert any("disconnected while sending" in r.getMessage() for r in caplog.records)
    assert_still_serves(url, pipe)


# --- start-up ----------------------------------------------------------------------------------


def test_an_empty_api_key_is_an_error_at_start(llama_pipe):
    """An empty ENGINEHOUSE_API_KEY used to serve without authentication, silently."""
    for args, env in [([], {"ENGINEHOUSE_API_KEY": ""}), (["--api-key", " "], {})]:
        result = CliRunner().invoke(cli, ["serve", "no-such-model", *args], env=env)
        assert result.exit_code == 2 and "API key is empty" in result.output
        assert "no-such-model" not in result.output  # refused before the model is looked up
    with pytest.raises(ValueError, match="API key is empty"):
        create_app(llama_pipe, api_key="")


def test_the_served_name_is_the_folders_or_the_hub_id(llama_dir, tmp_path):
    assert default_model_name(read_model_spec(llama_dir)) == llama_dir.name
    assert default_model_name(read_model_spec(llama_dir, "org/tiny-llama")) == "org/tiny-llama"


# --- broken checkpoints ------------------------------------------------------------------------


def copy_model(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_broken_checkpoints_name_the_file_and_the_fix(llama_dir, tmp_path, caplog):
    truncated = copy_model(llama_dir, tmp_path / "truncated")
    weights = truncated / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    with pytest.raises(InvalidModelError, match=r"model\.safetensors is not a readable "):
        pipeline(str(truncated), progress=False)

    no_tokenizer = copy_model(llama_dir, tmp_path / "no-tokenizer")
    (no_tokenizer / "tokenizer.json").unlink()
    with pytest.raises(InvalidModelError, match="no tokenizer.json, tokenizer.model or vocab"):
        pipeline(str(no_tokenizer), progress=False)

    from safetensors.torch import load_file, save_file

    nan = copy_model(llama_dir, tmp_path / "nan")
    tensors = load_file(nan / "model.safetensors")
    name = next(k for k in tensors if k.endswith("mlp.down_proj.weight"))
    tensors[name][0, 0] = float("nan")
    save_file(tensors, nan / "model.safetensors", metadata={"format": "pt"})
    with caplog.at_level(logging.WARNING), pipeline(str(nan), progress=False) as pipe:
        pipe(["hello", "world"], {"max_new_tokens": 3})  # used to give empty text, silently
        pipe("hello again", {"max_new_tokens": 3})
    warned = [r.getMessage() for r in caplog.records if "NaN or infinite logits" in r.getMessage()]
    assert len(warned) == 1 and "weights may hold NaN" in warned[0]  # said once, not per step
