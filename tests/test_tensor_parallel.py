"""Tensor parallelism on the CPU (gloo, 2 ranks): the native backend sharded by the "mp" and
"ray" executors gives tp=1's greedy tokens for every family, alone and in a batch, with prefix
caching, under preemption and when sampling with a seed; a rank that dies fails the requests
in flight in bounded time and leaves no process; `serve --tp 2` answers the openai client.

Every model has random biases and norm weights (test_native's `build_native`), so a shard
that dropped a row-parallel bias or swapped KV heads would change the tokens.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import openai
import pytest
from test_native import FAMILIES, build_native
from test_serve_cli import Server

from enginehouse import EngineConfig, explain, pipeline
from enginehouse.errors import EnginehouseError, GenerationError
from enginehouse.testing import (
    TINY,
    build_model,
    build_qwen_vl,
    build_vlm,
    hf_greedy,
    tight_kv_config,
)

PROMPTS = ["hello world the", "a b c d e f g h i j", "one", "the quick brown fox jumps over"]
GEN = dict(max_new_tokens=10, min_new_tokens=10)
TP2 = dict(tp=2, device="cpu", max_batch_size=8)


@pytest.fixture(scope="module")
def tp_models(models_dir):
    made: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in made:
            made[name] = build_native(models_dir / "tp" / name, name)
        return made[name]

    return get


def tokens(path: Path, prompts=PROMPTS, gen=GEN, **config) -> list[list[int]]:
    with pipeline(str(path), engine_config={"device": "cpu", **config}, progress=False) as pipe:
        return [r.token_ids for r in pipe(prompts, gen_config=gen)]


def worker_pids(parent: int) -> list[int]:
    """The rank workers whose parent is `parent`, from /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == parent and b"enginehouse.executor.worker" in cmdline:
            found.append(int(entry.name))
    return found


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"


@pytest.mark.parametrize("family", FAMILIES)
def test_tp2_gives_tp1s_greedy_tokens_alone_and_in_a_batch(tp_models, family):
    path = tp_models(family)
    want = tokens(path)  # tp=1's, which test_native holds to transformers'
    with pipeline(str(path), engine_config=TP2, progress=False) as pipe:
        assert pipe.summary()["ranks"] == 2 and pipe.runner is None  # elsewhere
        batch = [r.token_ids for r in pipe(PROMPTS, gen_config=GEN)]
        alone = pipe(PROMPTS[1], gen_config=GEN).token_ids
    assert batch == want
    assert alone == want[1]


def test_tp2_through_gloo_alone_gives_the_same_tokens(tp_models, monkeypatch):
    """CPU ranks of one machine add their partial sums through shared memory
    (native/shm_collectives.py); without it, through gloo, the tokens are the same."""
    path = tp_models("qwen2")
    monkeypatch.setenv("ENGINEHOUSE_SHM_COLLECTIVES", "0")  # the ranks inherit it
    assert tokens(path, **TP2) == tokens(path)


def test_tp2_gives_transformers_greedy_tokens(tp_models):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tp_models("qwen3")
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    want = hf_greedy(model, tokenizer, PROMPTS[3], 10)
    raw = {"token_ids": tokenizer(PROMPTS[3]).input_ids}  # no chat template, as hf_greedy
    assert tokens(path, [raw], **TP2) == [want]


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_vision_language_models_at_tp2(models_dir, family):
    """The vision tower runs in the driver; the language model is sharded."""
    from PIL import Image

    folder = models_dir / "tp" / family
    path = build_vlm(folder, family) if family == "llava" else build_qwen_vl(folder, family)
    image = Image.new("RGB", (90, 60), (200, 30, 30))
    prompts = [("what is in the picture", image), "and a text prompt beside it"]
    assert tokens(path, prompts, **TP2) == tokens(path, prompts)


def test_fewer_kv_heads_than_ranks_are_replicated(models_dir):
    import transformers

    config = transformers.LlamaConfig(
        **{**TINY, "num_key_value_heads": 1}, vocab_size=515, bos_token_id=1, eos_token_id=2
    )
    path = build_model(models_dir / "tp" / "mqa", config)
    assert tokens(path, **TP2) == tokens(path)


def test_prefix_caching_preemption_and_seeded_sampling_at_tp2(tp_models):
    path = tp_models("llama")
    shared = "a system prompt shared here: "
    prompts = [shared + p for p in PROMPTS]
    sampled = dict(GEN, do_sample=True, temperature=0.8, top_k=20, random_seed=7)
    with pipeline(str(path), engine_config=TP2, progress=False) as pipe:
        tight = tight_kv_config(pipe, session_len=64, block_size=4, num_blocks=24)
        first = [r.token_ids for r in pipe(prompts, gen_config=GEN)]
        again = [r.token_ids for r in pipe(prompts, gen_config=GEN)]  # prefix-cache hits
        assert pipe.stats()["kv_blocks_used"] == 0
        seeded = [r.token_ids for r in pipe(prompts, gen_config=sampled)]
    assert first == again == tokens(path, prompts)
    assert seeded == tokens(path, prompts, sampled)
    # A KV cache of 24 blocks of 4 tokens per rank cannot hold the batch: sequences are
    # preempted and recomputed, and the tokens stay the same.
    with pipeline(str(path), engine_config={**TP2, **tight}, progress=False) as pipe:
        assert [r.token_ids for r in pipe(prompts, gen_config=GEN)] == first
        assert pipe.stats()["preemptions"] > 0


def test_ray_executor_gives_the_same_tokens(tp_models):
    ray = pytest.importorskip("ray")
    path = tp_models("qwen2")
    want = tokens(path)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        assert tokens(path, distributed_executor_backend="ray", **TP2) == want
    finally:
        ray.shutdown()


def test_an_unreachable_ray_cluster_is_a_one_line_error(tp_models, monkeypatch):
    pytest.importorskip("ray")
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")
    config = dict(TP2, distributed_executor_backend="ray")
    with pytest.raises(EnginehouseError, match=r"could not reach a Ray cluster at '127\.0") as e:
        pipeline(str(tp_models("llama")), engine_config=config, progress=False)
    assert "\n" not in str(e.value) and "ray start --head" in str(e.value)


@pytest.mark.parametrize(
    "sig, error",
    [
        (signal.SIGKILL, r"rank 1 \(pid \d+\) died during execute \(killed by signal 9\)"),
        # Stopped: alive but silent, and rank 0 waits on it in its all-reduce: both named.
        (signal.SIGSTOP, r"ranks 0 and 1 did not answer execute within 3 s"),
    ],
)
def test_a_rank_that_dies_or_hangs_fails_the_requests_and_leaves_no_process(tp_models, sig, error):
    config = {**TP2, "distributed_timeout": 3}
    pipe = pipeline(str(tp_models("llama")), engine_config=config, progress=False)
    pids = worker_pids(os.getpid())
    stream = pipe.stream(PROMPTS[0], gen_config=dict(max_new_tokens=200, min_new_tokens=200))
    next(stream)  # generation is under way
    os.kill(pids[1], sig)
    start = time.monotonic()
    with pytest.raises(GenerationError, match=error):
        for _ in stream:
            pass
    assert time.monotonic() - start < 20
    assert not any(alive(p) for p in pids)
    # The engine is not half alive: the next request fails at once, saying why.
    with pytest.raises(GenerationError, match="executor is down.*rank"):
        pipe("hello", gen_config=GEN)
    pipe.close()


def test_close_leaves_no_process(tp_models):
    pipe = pipeline(str(tp_models("llama")), engine_config=TP2, progress=False)
    pids = worker_pids(os.getpid())
    assert len(pids) == 2
    pipe.close()
    assert not any(alive(p) for p in pids)


def test_explain_says_who_can_shard_and_why_not(tp_models):
    path = str(tp_models("llama"))
    report = explain(path, engine_config={"tp": 2, "device": "cpu"})
    verdicts = {v["backend"]: v for v in report["verdicts"]}
    assert report["chosen"] == "pytorch"
    assert (
        "tensor parallel over 2 ranks: 2 heads and 1 KV heads per rank"
        in (verdicts["pytorch"]["reason"])
    )
    assert report["runtime"]["ranks"] == "2 (mp executor: worker processes here, gloo)"
    assert not verdicts["transformers"]["supported"]
    assert "no tensor parallelism" in verdicts["transformers"]["reason"]
    three = explain(path, engine_config={"tp": 3, "device": "cpu"})
    reason = {v["backend"]: v for v in three["verdicts"]}["pytorch"]["reason"]
    assert "cannot split over tp=3 ranks: 4 attention heads" in reason
    assert three["chosen"] is None and "no installed backend can run" in three["error"]


def test_tp_settings_are_checked():
    with pytest.raises(ValueError, match="tp"):
        EngineConfig(tp=0)
    with pytest.raises(ValueError, match="distributed_executor_backend"):
        EngineConfig(distributed_executor_backend="mpi")
    assert EngineConfig().executor is None
    assert EngineConfig(tp=2).executor == "mp"
    assert EngineConfig(distributed_executor_backend="mp").executor == "mp"


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT])
def test_serve_tp2_answers_the_openai_client_and_leaves_no_process(tp_models, stop):
    path = str(tp_models("llama"))
    server = Server(path, "--served-model-name", "tiny", "--tp", "2", "--device", "cpu", env={})
    try:
        pids = worker_pids(server.process.pid)
        assert len(pids) == 2
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)
        answer = client.completions.create(
            model="tiny", prompt=PROMPTS[0], max_tokens=10, temperature=0
        )
        want = tokens(tp_models("llama"), [PROMPTS[0]], dict(max_new_tokens=10))
        assert answer.usage.completion_tokens == len(want[0])
    finally:
        code = server.stop(stop)
    assert code == 0
    assert not any(alive(p) for p in pids)
