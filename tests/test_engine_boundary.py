"""One engine, four places to run it: in process, through the "mp" executor at tp=1 and tp=2,
and as two data-parallel replicas. Sampling runs where the logits are in every one of them, so
the same requests give the same tokens, logprobs, prompt logprobs, structured outputs and stop
strings, with `n` > 1 choices, under preemption and with prefix-cache hits.

Then what only replicas have: a replica that dies fails its own requests alone, naming itself;
the router sends requests that share a prefix to one replica; `serve --dp 2` answers the
official client and `/metrics` sums the replicas.
"""

from __future__ import annotations

import os
import signal
import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from test_native import build_native
from test_serve_cli import Server
from test_tensor_parallel import alive, worker_pids

from enginehouse import GenerationConfig, pipeline
from enginehouse.engine.data_parallel import Router
from enginehouse.errors import GenerationError
from enginehouse.testing import tight_kv_config

SHARED = "a system prompt that every request here shares, long enough for blocks: "
PROMPTS = [SHARED + p for p in ("hello world the", "a b c d e f g h i j", "one", "quick fox")]
MODES = {
    "in-process": {},
    "mp tp=1": {"distributed_executor_backend": "mp"},
    "mp tp=2": {"tp": 2},
    "dp=2": {"dp": 2},
}
# A KV cache too small for the whole batch at once (preemption), with a small block size so
# that the shared prefix fills whole blocks (prefix hits).
TIGHT = dict(session_len=96, block_size=4, num_blocks=40)


@pytest.fixture(scope="module")
def model(models_dir):
    return build_native(models_dir / "boundary" / "llama", "llama")


@pytest.fixture(scope="module")
def tight(model):
    with pipeline(str(model), engine_config={"device": "cpu"}, progress=False) as pipe:
        return tight_kv_config(pipe, **TIGHT)


def workload(pipe) -> dict:
    """Every kind of request at once, twice (the second time with prefix-cache hits)."""
    greedy = GenerationConfig(max_new_tokens=8, min_new_tokens=8, logprobs=3, prompt_logprobs=2)
    seeded = [
        GenerationConfig(max_new_tokens=8, do_sample=True, top_k=20, random_seed=s) for s in (7, 8)
    ]
    regex = GenerationConfig(max_new_tokens=12, regex="[a-z]{3}-[0-9]{2}")
    stop = GenerationConfig(max_new_tokens=16, ignore_eos=True, stop_words=["e"])
    prompts = PROMPTS + [PROMPTS[0]] * 2 + [PROMPTS[1], PROMPTS[2]]  # n=2 choices of prompt 0
    configs = [greedy] * len(PROMPTS) + seeded + [regex, stop]
    runs = []
    for _ in range(2):
        results = pipe(prompts, configs)
        runs.append([_summary(r) for r in results])
    stats = pipe.stats()
    assert stats["kv_blocks_used"] == 0
    return {"runs": runs, "preemptions": stats["preemptions"]}


def _summary(r) -> dict:
    assert r.error is None, r.error
    lp = [{t: round(v, 3) for t, v in d.items()} for d in (r.logprobs or [])]
    plp = [
        None if d is None else {t: round(v, 3) for t, v in d.items()}
        for d in r.prompt_logprobs or []
    ]
    return {"tokens": r.token_ids, "text": r.text, "finish": r.finish_reason, "lp": lp, "plp": plp}


def same_logprobs(a: list, b: list, tol: float) -> bool:
    """The same tokens in every entry, their logprobs within `tol`."""
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if x is None or y is None:
            if x is not y:
                return False
        elif x.keys() != y.keys() or any(abs(x[t] - y[t]) > tol for t in x):
            return False
    return True


@pytest.fixture(scope="module")
def results(model, tight):
    out = {}
    for name, mode in MODES.items():
        config = {"device": "cpu", "max_batch_size": 8, **tight, **mode}
        with pipeline(str(model), engine_config=config, progress=False) as pipe:
            out[name] = workload(pipe)
    return out


@pytest.mark.parametrize("mode", [m for m in MODES if m != "in-process"])
def test_every_place_gives_the_in_process_results(results, mode):
    want, got = results["in-process"], results[mode]
    assert want["preemptions"] > 0  # the tight cache did preempt
    for run_want, run_got in zip(want["runs"], got["runs"]):
        for i, (a, b) in enumerate(zip(run_want, run_got)):
            assert a["tokens"] == b["tokens"], f"request {i}"
            assert a["text"] == b["text"] and a["finish"] == b["finish"], f"request {i}"
            # Sharded, the sums of a layer's partial products are added in another order.
            tol = 2e-3 if mode == "mp tp=2" else 0.0
            assert same_logprobs(a["lp"], b["lp"], tol), f"request {i}"
            assert same_logprobs(a["plp"], b["plp"], tol), f"request {i}"
    regex = want["runs"][0][-2]["text"]
    assert regex and all(c.isalnum() or c == "-" for c in regex)
    assert "e" not in want["runs"][0][-1]["text"] and want["runs"][0][-1]["finish"] == "stop"
    first, second = want["runs"][0][4:6]
    assert first["tokens"] != second["tokens"]  # the two choices draw differently


def test_a_replica_that_dies_fails_its_own_requests_and_the_other_serves(model):
    config = {"device": "cpu", "dp": 2, "distributed_timeout": 5}
    pipe = pipeline(str(model), engine_config=config, progress=False)
    try:
        victim = pipe.engine.replicas[1]
        pids = [r.transport.proc.pid for r in pipe.engine.replicas]
        long = GenerationConfig(max_new_tokens=200, min_new_tokens=200)
        streams = [pipe.stream(p, long) for p in ("one two three", "four five six")]
        for s in streams:
            next(s)
        assert all(r.in_flight == 1 for r in pipe.engine.replicas)  # least loaded: one each
        os.kill(victim.transport.proc.pid, signal.SIGKILL)
        start = time.monotonic()
        errors = []
        for s in streams:
            try:
                for _ in s:
                    pass
            except GenerationError as e:
                errors.append(str(e))
        assert time.monotonic() - start < 5
        assert (
            len(errors) == 1 and "replica 1 (pid" in errors[0] and "killed by signal 9" in errors[0]
        )
        # The other replica takes every new request; the summed stats say one is down.
        assert pipe(["seven", "eight"], GenerationConfig(max_new_tokens=4))[1].finish_reason
        assert pipe.stats()["replicas_alive"] == 1
    finally:
        pipe.close()
    assert not any(alive(p) for p in pids)


def test_the_router_keeps_a_prefix_on_one_replica_and_balances_the_rest():
    router = Router(replicas=2, block_size=4, max_batch_size=8)
    shared = list(range(100, 140))
    first = router.pick(shared + [1, 2], [0, 1])
    router.load[first] += 1
    # Most of the prompt is a prefix the first replica has: there, though it is busier.
    assert router.pick(shared + [3, 4, 5], [0, 1]) == first
    # A prompt with nothing in common goes to the least loaded replica; ties go round.
    assert router.pick(list(range(500, 540)), [0, 1]) == 1 - first
    router.load[first] -= 1
    assert [router.pick([i], [0, 1]) for i in range(4)] == [first, 1 - first] * 2
    # A dead replica's prefixes go elsewhere.
    assert router.pick(shared + [6], [1 - first]) == 1 - first
    # The hash is stable: another router (another process, another run) keys alike.
    assert list(Router(2, 4, 8)._keys(shared)) == list(router._keys(shared))


def test_serve_dp2_answers_the_openai_client_and_metrics_sum_the_replicas(model):
    server = Server(
        str(model),
        "--served-model-name",
        "tiny",
        "--data-parallel-size",
        "2",
        "--device",
        "cpu",
        env={},
    )
    try:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)
        for prompt in ("hello", "world", "again"):
            answer = client.completions.create(
                model="tiny", prompt=prompt, max_tokens=5, temperature=0
            )
            assert answer.usage.completion_tokens == 5
        text = httpx.get(f"{server.url}/metrics").text
        samples = {
            (s.name, s.labels.get("replica")): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }
        total = samples[("enginehouse:engine_steps_total", None)]
        each = [samples[("enginehouse:replica_engine_steps_total", r)] for r in "01"]
        assert total == sum(each) and all(n > 0 for n in each)  # both replicas took requests
        assert samples[("enginehouse:replica_up", "1")] == 1.0
    finally:
        assert server.stop(signal.SIGTERM) == 0


def test_a_step_that_fails_on_the_ranks_fails_that_batch_and_the_ranks_go_on(toy_dir):
    """A bad input reaching a kernel fails on every rank alike: that batch fails (StepError)
    and the executor stays up; only a dead or hung rank brings it down."""
    from enginehouse import EngineConfig
    from enginehouse.engine.plan import ChunkPlan, Logits, StepPlan
    from enginehouse.engine.sampler import batch_of
    from enginehouse.executor import make_executor
    from enginehouse.executor.base import StepError
    from enginehouse.pipeline import decide_backend, read_spec

    spec = read_spec(toy_dir)
    decision = decide_backend(spec, EngineConfig(), "toy")
    config = EngineConfig(tp=2, device="cpu", distributed_timeout=20)
    executor = make_executor(decision, spec, config)
    executor.load(progress=False)
    pids = worker_pids(os.getpid())
    try:
        executor.allocate_kv(executor.plan_kv_blocks(config, 64))

        def step(seq_id: int, tokens: tuple[int, ...], blocks: tuple[int, ...]):
            chunk = ChunkPlan(seq_id, tokens, 0, blocks, Logits.LAST)
            sampling = batch_of([(seq_id, 0, GenerationConfig(), True, list(tokens))])
            executor.execute(StepPlan([chunk], sampling=sampling, block_size=4))
            return executor.sample(None)

        assert len(step(0, (1, 2, 3), (0,)).token_ids) == 1
        with pytest.raises(StepError, match="rank 0.*block table"):
            step(1, (5,) * 8, ())  # no blocks for 8 tokens: the toy runner refuses, on both ranks
        assert len(step(2, (4, 5, 6), (1,)).token_ids) == 1  # the ranks go on
        assert executor.down is None
    finally:
        executor.close()
    assert pids and not any(alive(p) for p in pids)


def test_explain_and_the_command_line_take_the_data_parallel_size(model):
    from click.testing import CliRunner

    from enginehouse.cli import cli

    for flag in ("--data-parallel-size", "--dp"):
        out = CliRunner().invoke(cli, ["explain", str(model), flag, "2", "--device", "cpu"])
        assert out.exit_code == 0, out.output
        assert "replicas:     2 engine replicas (processes here, 1 rank each" in out.output


def test_ray_replicas_start_a_local_ray_instance_and_give_the_same_tokens(model, monkeypatch):
    ray = pytest.importorskip("ray")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    prompts = ["hello world the", "a b c d"]
    gen = GenerationConfig(max_new_tokens=6, min_new_tokens=6)
    with pipeline(str(model), engine_config={"device": "cpu"}, progress=False) as pipe:
        want = [r.token_ids for r in pipe(prompts, gen)]
    config = {"device": "cpu", "dp": 2, "distributed_executor_backend": "ray"}
    try:
        with pipeline(str(model), engine_config=config, progress=False) as pipe:
            assert ray.is_initialized()  # no cluster ran: one was started here
            assert [r.token_ids for r in pipe(prompts, gen)] == want
            assert pipe.stats()["replicas_alive"] == 2
    finally:
        ray.shutdown()
