"""What `Pipeline` exposes to callers, and how failures of a request sent alone surface."""

from __future__ import annotations

import pytest

from enginehouse import GenerationConfig, GenerationError, RequestError
from enginehouse.runner import ModelRunner


def test_pipeline_exposes_runner_session_length_and_summary(llama_pipe):
    assert isinstance(llama_pipe.runner, ModelRunner)
    assert llama_pipe.session_len == llama_pipe.spec.context_length == 256
    summary = llama_pipe.summary()
    kv = llama_pipe.runner.kv_spec
    assert summary["backend"] == "pytorch"
    assert (summary["device"], summary["dtype"]) == ("cpu", "float32")
    assert summary["kv_tokens"] == summary["kv_blocks"] * kv.block_size
    assert summary["kv_bytes"] == summary["kv_blocks"] * kv.bytes_per_block


def test_backend_failure_on_a_request_sent_alone_raises(llama_pipe, monkeypatch):
    def fail(batch):
        raise RuntimeError("device lost")

    monkeypatch.setattr(llama_pipe.runner, "execute", fail)
    with pytest.raises(GenerationError, match="the backend failed: RuntimeError: device lost"):
        llama_pipe("hello", GenerationConfig(max_new_tokens=4))
    with pytest.raises(GenerationError, match="device lost"):
        list(llama_pipe.stream("hello", GenerationConfig(max_new_tokens=4)))
    # Inside a list, each prompt comes back with its error and nothing is raised.
    results = llama_pipe(["a", "b"], GenerationConfig(max_new_tokens=4))
    assert [r.finish_reason for r in results] == ["error", "error"]
    assert all("device lost" in r.error for r in results)
    monkeypatch.undo()
    assert llama_pipe("hello", GenerationConfig(max_new_tokens=2)).generate_token_len == 2
    assert llama_pipe.stats()["kv_blocks_used"] == 0


def test_get_ppl_scores_every_prompt_in_one_batch(llama_pipe, monkeypatch):
    prompts = ["the quick brown fox", "jumps over the lazy dog", "hello world again"]
    alone = [llama_pipe.get_ppl(p) for p in prompts]
    batches = []
    execute = llama_pipe.runner.execute

    def spy(batch):
        batches.append({c.seq_id for c in batch.chunks})
        return execute(batch)

    monkeypatch.setattr(llama_pipe.runner, "execute", spy)
    together = llama_pipe.get_ppl(prompts)
    assert together == pytest.approx(alone, rel=1e-5)
    assert len(batches[0]) == len(prompts)  # all of them from the first step on
    with pytest.raises(RequestError, match="at least two tokens"):
        llama_pipe.get_ppl(["a fine prompt", "x"])
