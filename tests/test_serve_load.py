"""The server under load and with clients that leave: 64 concurrent streams, streams cut off
mid-way, and a non-streaming client that times out. A real uvicorn server on 127.0.0.1 and the
official `openai` client; one server for the module."""

from __future__ import annotations

import asyncio
import time

import httpx
import openai
import pytest

from enginehouse import GenerationConfig, pipeline
from enginehouse.serve import ServerThread, create_app

MODEL = "tiny-llama"
KEY = "load-key"


@pytest.fixture(scope="module")
def served(llama_dir):
    pipe = pipeline(str(llama_dir), engine_config={"max_batch_size": 64}, progress=False)
    with ServerThread(create_app(pipe, MODEL, KEY)) as server:
        yield server.url, pipe
    pipe.close()


def client(url: str, **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, **kw)


def counter(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


def wait_idle(pipe, timeout: float = 10.0) -> dict[str, int]:
    """The engine's counters once nothing runs (aborts take effect at the next step)."""
    deadline = time.monotonic() + timeout
    while True:
        stats = pipe.stats()
        idle = stats["running"] == stats["waiting"] == stats["kv_blocks_used"] == 0
        if idle or time.monotonic() > deadline:
            return stats
        time.sleep(0.02)


def test_64_concurrent_streams_deliver_every_token_and_free_the_kv_cache(served):
    url, pipe = served
    conversations = [[{"role": "user", "content": f"request number {i}"}] for i in range(64)]
    new = 16

    async def one(c: openai.AsyncOpenAI, messages) -> tuple[str, int, int]:
        stream = await c.chat.completions.create(
            model=MODEL,
            messages=messages,
            max_tokens=new,
            temperature=0,
            logprobs=True,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
        text, tokens, usage = "", 0, None
        async for chunk in stream:
            if chunk.usage is not None:
                usage = chunk.usage.completion_tokens
            for choice in chunk.choices:
                text += choice.delta.content or ""
                tokens += len(choice.logprobs.content) if choice.logprobs else 0
        return text, tokens, usage

    async def main():
        c = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)
        results = await asyncio.gather(*(one(c, m) for m in conversations))
        await c.close()
        return results

    results = asyncio.run(main())
    want = pipe(conversations, GenerationConfig(max_new_tokens=new, ignore_eos=True))
    for (text, tokens, usage), expected in zip(results, want):
        assert tokens == usage == new  # every token arrived, each with its logprob
        assert text == expected.text
    stats = wait_idle(pipe)
    assert stats["kv_blocks_used"] == 0 and stats["running"] == stats["waiting"] == 0
    assert counter(url, 'enginehouse:kv_cache_usage_perc{model_name="tiny-llama"}') == 0


def test_a_client_cut_off_mid_stream_is_aborted_and_the_others_carry_on(served):
    url, pipe = served
    aborted = 'enginehouse:request_success_total{finished_reason="abort",model_name="tiny-llama"}'
    before = counter(url, aborted)
    c = client(url)
    long = dict(model=MODEL, prompt="hello", temperature=0, stream=True)
    long["extra_body"] = {"ignore_eos": True}
    survivor = c.completions.create(max_tokens=200, **long)
    first = next(iter(survivor))
    victim = c.completions.create(max_tokens=240, **long)
    for _, _chunk in zip(range(3), victim):
        pass
    victim.close()  # the client goes away mid-stream
    rest = list(survivor)
    tokens = [first, *rest]
    assert tokens[-1].choices[0].finish_reason == "length"
    config = GenerationConfig(max_new_tokens=200, ignore_eos=True)
    want = pipe("hello", config, apply_chat_template=False).text
    assert "".join(t.choices[0].text for t in tokens) == want
    stats = wait_idle(pipe)
    assert stats["kv_blocks_used"] == 0 and stats["running"] == 0
    assert counter(url, aborted) == before + 1
    # The server is healthy and serves the next request.
    assert httpx.get(f"{url}/health").json() == {"status": "ok"}
    r = c.completions.create(model=MODEL, prompt="hello", max_tokens=3, temperature=0)
    assert r.usage.completion_tokens >= 1


def test_a_non_streaming_client_that_gives_up_is_aborted(served):
    url, pipe = served
    aborted = 'enginehouse:request_success_total{finished_reason="abort",model_name="tiny-llama"}'
    before = counter(url, aborted)
    impatient = client(url, timeout=0.3)
    with pytest.raises(openai.APITimeoutError):
        impatient.completions.create(
            model=MODEL,
            prompt="hello",
            n=16,
            max_tokens=240,
            extra_body={"ignore_eos": True},
        )
    stats = wait_idle(pipe)
    assert stats["kv_blocks_used"] == 0 and stats["running"] == 0
    assert counter(url, aborted) == before + 16
