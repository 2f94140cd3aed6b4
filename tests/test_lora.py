"""LoRA adapters: PEFT adapters of the tiny random models, served by the native backend.

Every adapter is made here by PEFT from the tiny models, with random non-zero A and B (so it
changes the output), and the reference is transformers + PEFT's `PeftModel`, and the merged
model (`merge_and_unload`): float32 logits and greedy tokens, alone and in one batch that mixes
the base model and two adapters with chunked prefill.
"""

from __future__ import annotations

import json
import random

import pytest
import torch

from enginehouse import pipeline
from enginehouse.adapters import AdapterError, load_adapter
from enginehouse.errors import BackendError, RequestError
from enginehouse.runner import ScheduledBatch, SeqChunk
from enginehouse.testing import build_model, model_configs, native_model_configs

peft = pytest.importorskip("peft")
TOL = dict(rtol=1e-5, atol=1e-5)
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_adapter(base_dir, out_dir, targets, r=8, alpha=16, seed=0, **extra):
    """A PEFT LoRA adapter of the model in `base_dir`, random A and B (not a no-op)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    cfg = LoraConfig(
        r=r, lora_alpha=alpha, target_modules=targets, init_lora_weights=False, **extra
    )
    peft_model = get_peft_model(model, cfg)
    with torch.no_grad():  # larger B: the adapter must change the greedy tokens
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.mul_(4.0)
    peft_model.save_pretrained(out_dir)
    return out_dir


def reference(base_dir, adapter_dir=None, merged=False):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir).eval()
        if merged:
            model = model.merge_and_unload().eval()
    return model


def ref_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


def ref_greedy(model, ids, n):
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False
        )
    return out[0, len(ids) :].tolist()


def tokens(n, seed):
    return [random.Random(seed).randrange(3, 500) for _ in range(n)]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    llama = build_model(root / "llama", model_configs(512)["llama"])
    phi3 = build_model(root / "phi3", native_model_configs(512)["phi3"])
    return {
        "llama": llama,
        "phi3": phi3,
        "sql": make_adapter(llama, root / "sql", ALL, r=8, alpha=16, seed=1),
        # rsLoRA, attention only, another rank
        "chat": make_adapter(
            llama, root / "chat", ["q_proj", "v_proj"], r=4, alpha=8, seed=2, use_rslora=True
        ),
        "mlp": make_adapter(llama, root / "mlp", ["gate_proj", "down_proj"], r=16, seed=3),
        # Phi-3 stores q/k/v and gate/up fused: its adapters target the fused projections.
        "phi3_fused": make_adapter(
            phi3, root / "phi3_fused", ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"], seed=4
        ),
        "root": root,
    }


@pytest.fixture(scope="module")
def pipe(models):
    p = pipeline(
        str(models["llama"]),
        backend="pytorch",
        engine_config={
            "max_batch_size": 8,
            "max_num_batched_tokens": 16,  # prompts prefill in chunks
            "enable_prefix_caching": False,
        },
        adapters={"sql": models["sql"], "chat": models["chat"]},
        progress=False,
    )
    yield p
    p.close()


def slot_of(pipe, name):
    return next(a["slot"] for a in pipe.adapters() if a["name"] == name)


# --- logits ---------------------------------------------------------------------------------


def test_logits_equal_peft_and_merged_in_a_mixed_chunked_batch(pipe, models):
    """One runner step holds a base prompt, a prompt of each adapter and a chunk of a split
    prompt of `sql`; then decodes of all of them, the split prompt's second chunk among them."""
    runner = pipe.runner
    bs = runner.kv_spec.block_size
    names = [None, "sql", "chat", "sql"]
    slots = [0 if n is None else slot_of(pipe, n) for n in names]
    seqs = [tokens(n, seed=i) for i, n in enumerate([9, 21, 17, 30])]
    refs = {None: reference(models["llama"])}
    for n in ("sql", "chat"):
        refs[n] = reference(models["llama"], models[n])
    want = [ref_logits(refs[n], s) for n, s in zip(names, seqs)]
    merged = ref_logits(reference(models["llama"], models["sql"], merged=True), seqs[1])
    torch.testing.assert_close(merged, want[1], rtol=1e-4, atol=1e-4)  # PEFT agrees with itself

    tables = [tuple(range(i * 4, i * 4 + 4)) for i in range(4)]  # 4 blocks of 16 each
    split = 12
    plen = [6, 18, 14]  # the first three: a prompt, then one token at a time

    def chunk(i, start, end, **kw):
        return SeqChunk(
            i,
            tuple(seqs[i][start:end]),
            start,
            tables[i],
            tuple(range(end - start)),
            adapter=slots[i],
            **kw,
        )

    def run(chunks):
        return runner.execute(ScheduledBatch(tuple(chunks), bs))

    first = [chunk(i, 0, plen[i]) for i in range(3)] + [chunk(3, 0, split)]
    got = run(first).split([len(c.token_ids) for c in first])
    for i, c in enumerate(first):
        torch.testing.assert_close(got[i], want[i][: c.end_pos], **TOL)
    # decodes of the three with the rest of the split prompt (listed first)
    got = run([chunk(3, split, 30)] + [chunk(i, plen[i], plen[i] + 1) for i in range(3)])
    rest, *decoded = got.split([30 - split, 1, 1, 1])
    torch.testing.assert_close(rest, want[3][split:], **TOL)
    for i in range(3):
        torch.testing.assert_close(decoded[i][0], want[i][plen[i]], **TOL)
    # one more decode step, decodes only (the runner's one-call C++ step is bypassed)
    got = run([chunk(i, plen[i] + 1, plen[i] + 2) for i in range(3)])
    for i in range(3):
        torch.testing.assert_close(got[i], want[i][plen[i] + 1], **TOL)


def test_fused_checkpoint_adapter_phi3(models):
    """Phi-3's adapters target its fused qkv_proj and gate_up_proj."""
    with pipeline(
        str(models["phi3"]),
        backend="pytorch",
        engine_config={"enable_prefix_caching": False},
        adapters={"fused": models["phi3_fused"]},
        progress=False,
    ) as p:
        ids = tokens(20, seed=7)
        chunk = SeqChunk(0, tuple(ids), 0, (0, 1), tuple(range(20)), adapter=slot_of(p, "fused"))
        got = p.runner.execute(ScheduledBatch((chunk,), p.runner.kv_spec.block_size))
        want = ref_logits(reference(models["phi3"], models["phi3_fused"]), ids)
        torch.testing.assert_close(got, want, **TOL)


# --- greedy tokens through the pipeline ------------------------------------------------------


def test_greedy_equals_peft_alone_and_in_a_mixed_batch(pipe, models):
    prompts = [{"token_ids": tokens(n, seed=10 + n)} for n in (11, 23, 19, 7)]
    names = [None, "sql", "chat", "sql"]
    gen = {"max_new_tokens": 6, "min_new_tokens": 6}
    refs = {
        n: reference(models["llama"], models[n]) if n else reference(models["llama"])
        for n in set(names)
    }
    want = [ref_greedy(refs[n], p["token_ids"], 6) for n, p in zip(names, prompts)]
    assert want[1] != ref_greedy(refs[None], prompts[1]["token_ids"], 6)  # the adapter matters
    batch = pipe(prompts, gen, adapter=names)
    assert [r.token_ids for r in batch] == want
    alone = pipe(prompts[2], gen, adapter="chat")
    assert alone.token_ids == want[2]
    session = pipe.chat("hello", gen_config=gen, adapter="sql")
    assert session.response.text


def test_unknown_adapter_is_refused(pipe):
    with pytest.raises(RequestError, match="unknown adapter 'nope'.*loaded: chat, sql"):
        pipe({"token_ids": [5, 6, 7]}, {"max_new_tokens": 2}, adapter="nope")
    with pytest.raises(RequestError, match="2 adapters for 1 prompts"):
        pipe([{"token_ids": [5, 6]}], {"max_new_tokens": 2}, adapter=["sql", "chat"])


def test_load_and_unload_while_another_adapter_runs(pipe, models):
    ids = tokens(13, seed=3)
    gen = {"max_new_tokens": 24, "min_new_tokens": 24}
    want_sql = ref_greedy(reference(models["llama"], models["sql"]), ids, 24)
    want_mlp = ref_greedy(reference(models["llama"], models["mlp"]), ids, 4)
    stream = pipe.stream({"token_ids": ids}, gen, adapter="sql")
    got = list(next(stream).token_ids)
    pipe.load_adapter("mlp", models["mlp"])
    assert (
        pipe(
            {"token_ids": ids}, {"max_new_tokens": 4, "min_new_tokens": 4}, adapter="mlp"
        ).token_ids
        == want_mlp
    )
    with pytest.raises(AdapterError, match="in use by 1 unfinished request"):
        pipe.unload_adapter("sql")
    pipe.unload_adapter("mlp")
    for delta in stream:
        got += delta.token_ids
    assert got == want_sql
    assert "mlp" not in [a["name"] for a in pipe.adapters()]
    with pytest.raises(RequestError, match="unknown adapter 'mlp'"):
        pipe({"token_ids": ids}, {"max_new_tokens": 2}, adapter="mlp")


def test_slots_run_out_with_a_clear_error(models):
    with pipeline(
        str(models["llama"]),
        backend="pytorch",
        engine_config={"max_loras": 1},
        adapters={"sql": models["sql"]},
        progress=False,
    ) as p:
        with pytest.raises(AdapterError, match="all 1 adapter slots are taken"):
            p.load_adapter("chat", models["chat"])
        with pytest.raises(AdapterError, match="already loaded"):
            p.load_adapter("sql", models["sql"])


# --- prefix caching -------------------------------------------------------------------------


def test_prefix_cache_is_not_shared_between_adapters(models):
    ids = tokens(40, seed=9)  # two full blocks of 16 to share
    gen = {"max_new_tokens": 4, "min_new_tokens": 4}
    with pipeline(
        str(models["llama"]),
        backend="pytorch",
        adapters={"sql": models["sql"]},
        progress=False,
    ) as p:
        base = p({"token_ids": ids}, gen)
        sql = p({"token_ids": ids}, gen, adapter="sql")
        again = p({"token_ids": ids}, gen, adapter="sql")
        assert base.cached_tokens == 0 and sql.cached_tokens == 0
        assert again.cached_tokens == 32  # its own adapter's blocks are shared
        assert sql.token_ids == again.token_ids
        assert sql.token_ids == ref_greedy(reference(models["llama"], models["sql"]), ids, 4)
        # a new load under the same name shares nothing with the old one
        p.unload_adapter("sql")
        p.load_adapter("sql", models["chat"])
        other = p({"token_ids": ids}, gen, adapter="sql")
        assert other.cached_tokens == 0
        assert other.token_ids == ref_greedy(reference(models["llama"], models["chat"]), ids, 4)


# --- bad adapters ---------------------------------------------------------------------------


def llama_config(models):
    return json.loads((models["llama"] / "config.json").read_text())


def test_bad_adapters_are_refused_with_their_reason(models, tmp_path):
    base = llama_config(models)
    root = models["root"]
    cases = [
        (
            make_adapter(models["llama"], root / "r32", ["q_proj"], r=32),
            16,
            r"adapter_config.json: rank 32 is above max_lora_rank 16",
        ),
        (
            make_adapter(models["llama"], root / "dora", ["q_proj"], use_dora=True),
            16,
            r"adapter_config.json: DoRA adapters \(use_dora\) are not supported",
        ),
        (
            make_adapter(models["llama"], root / "emb", ["embed_tokens", "q_proj"]),
            16,
            r"embedding adapters \(target 'embed_tokens'\) are not supported",
        ),
        (
            make_adapter(models["llama"], root / "head", ["lm_head"]),
            16,
            r"target module 'lm_head' is not supported",
        ),
    ]
    for folder, rank, message in cases:
        with pytest.raises(AdapterError, match=message):
            load_adapter("bad", folder, base, rank)
    # made for another base model: other hidden size; more layers
    small = build_model(
        tmp_path / "small",
        model_configs(512)["llama"].__class__(
            **{**model_configs(512)["llama"].to_dict(), "hidden_size": 32}
        ),
    )
    wrong = make_adapter(small, tmp_path / "wrong", ["q_proj"])
    with pytest.raises(
        AdapterError,
        match=r"adapter_model.safetensors: layer 0 q_proj.*"
        r"hidden size 64\): the adapter was made for another base model",
    ):
        load_adapter("bad", wrong, base, 16)
    deeper = build_model(
        tmp_path / "deeper",
        model_configs(512)["llama"].__class__(
            **{**model_configs(512)["llama"].to_dict(), "num_hidden_layers": 3}
        ),
    )
    deep = make_adapter(deeper, tmp_path / "deep", ["q_proj"])
    with pytest.raises(AdapterError, match="is for layer 2, but the base model has 2 layers"):
        load_adapter("bad", deep, base, 16)
    with pytest.raises(AdapterError, match="has no adapter_config.json"):
        load_adapter("bad", tmp_path, base, 16)
    with pytest.raises(AdapterError, match="not found"):
        load_adapter("bad", tmp_path / "nowhere", base, 16)


def test_bad_adapter_fails_the_pipeline_and_load_adapter(pipe, models):
    folder = models["root"] / "r32"
    if not folder.exists():
        make_adapter(models["llama"], folder, ["q_proj"], r=32)
    with pytest.raises(AdapterError, match="rank 32 is above max_lora_rank 16"):
        pipe.load_adapter("big", folder)
    # The refused load loses nothing: the loaded adapters and the base model still answer.
    assert "big" not in [a["name"] for a in pipe.adapters()]
    for adapter in ("sql", None):
        out = pipe(
            {"token_ids": [5, 6, 7]}, {"max_new_tokens": 2, "min_new_tokens": 2}, adapter=adapter
        )
        assert len(out.token_ids) == 2
    with pytest.raises(AdapterError, match="rank 32 is above max_lora_rank 16"):
        pipeline(str(models["llama"]), backend="pytorch", adapters={"big": folder}, progress=False)


def test_backend_without_lora_is_a_clear_error(toy_dir, models):
    with pytest.raises(BackendError, match="does not take LoRA adapters"):
        pipeline(str(toy_dir), backend="toy", adapters={"sql": models["sql"]}, progress=False)


def test_explain_says_which_backends_take_adapters(models):
    from enginehouse import explain

    verdicts = {v["backend"]: v for v in explain(str(models["llama"]))["verdicts"]}
    assert verdicts["pytorch"]["lora_adapters"] is True
    assert verdicts["transformers"]["lora_adapters"] is False
    from click.testing import CliRunner

    from enginehouse.cli import cli

    shown = CliRunner().invoke(cli, ["explain", str(models["llama"])])
    assert "LoRA adapters: yes" in shown.output, shown.output
    shown = CliRunner().invoke(cli, ["explain", str(models["llama"]), "--backend", "transformers"])
    assert "LoRA adapters: no (this backend takes none)" in shown.output, shown.output


# --- tensor parallel ------------------------------------------------------------------------


def test_tp2_equals_tp1_with_adapters(pipe, models):
    prompts = [{"token_ids": tokens(n, seed=30 + n)} for n in (9, 17, 12)]
    names = [None, "sql", "chat"]
    gen = {"max_new_tokens": 5, "min_new_tokens": 5}
    want = [r.token_ids for r in pipe(prompts, gen, adapter=names)]
    with pipeline(
        str(models["llama"]),
        backend="pytorch",
        engine_config={"tp": 2, "max_batch_size": 8, "max_num_batched_tokens": 16},
        adapters={"sql": models["sql"], "chat": models["chat"]},
        progress=False,
    ) as p:
        assert [r.token_ids for r in p(prompts, gen, adapter=names)] == want


# --- the server -----------------------------------------------------------------------------


def _server(pipe, runtime_loading):
    from enginehouse.serve import ServerThread, create_app

    app = create_app(pipe, "tiny-llama", enable_lora_runtime_loading=runtime_loading)
    return ServerThread(app)


def test_server_chooses_adapters_by_model_and_loads_them(pipe, models):
    import httpx
    import openai

    prompt = "SELECT name FROM"

    def python_api(adapter, n):  # shown equal to PEFT above
        gen = {"max_new_tokens": n}
        return pipe(prompt, gen, adapter=adapter, apply_chat_template=False).text

    with _server(pipe, runtime_loading=True) as running:
        client = openai.OpenAI(base_url=f"{running.url}/v1", api_key="x", max_retries=0)
        listed = {m.id: m for m in client.models.list().data}
        assert set(listed) == {"tiny-llama", "sql", "chat"}
        assert listed["sql"].model_extra["parent"] == "tiny-llama"
        base = client.completions.create(
            model="tiny-llama", prompt=prompt, max_tokens=5, temperature=0
        )
        sql = client.completions.create(model="sql", prompt=prompt, max_tokens=5, temperature=0)
        assert sql.choices[0].text == python_api("sql", 5)
        assert sql.choices[0].text != base.choices[0].text
        chat = client.chat.completions.create(
            model="chat", messages=[{"role": "user", "content": "hi"}], max_tokens=3
        )
        assert chat.choices[0].message.content is not None
        with pytest.raises(openai.NotFoundError, match="'tiny-llama', 'chat', 'sql'"):
            client.completions.create(model="nope", prompt=prompt, max_tokens=2)

        metrics = httpx.get(f"{running.url}/metrics").text
        assert 'enginehouse:lora_requests_info{max_lora="4"' in metrics

        url = running.url
        r = httpx.post(
            f"{url}/v1/load_lora_adapter",
            json={"lora_name": "mlp", "lora_path": str(models["mlp"])},
        )
        assert r.status_code == 200, r.text
        assert "mlp" in {m.id for m in client.models.list().data}
        out = client.completions.create(model="mlp", prompt=prompt, max_tokens=3, temperature=0)
        assert out.choices[0].text == python_api("mlp", 3)
        bad = httpx.post(
            f"{url}/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "/nowhere"}
        )
        assert bad.status_code == 400 and "not found" in bad.json()["error"]["message"]
        r = httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "mlp"})
        assert r.status_code == 200, r.text
        r = httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "mlp"})
        assert r.status_code == 404
        assert "mlp" not in {m.id for m in client.models.list().data}


def test_runtime_loading_is_off_by_default(pipe, models):
    import httpx

    with _server(pipe, runtime_loading=False) as running:
        body = {"lora_name": "mlp", "lora_path": str(models["mlp"])}
        r = httpx.post(f"{running.url}/v1/load_lora_adapter", json=body)
        assert r.status_code == 404
        assert "--enable-lora-runtime-loading" in r.json()["error"]["message"]
        r = httpx.post(f"{running.url}/v1/unload_lora_adapter", json={"lora_name": "sql"})
        assert r.status_code == 404


def test_lora_modules_flag_reads_vllm_pairs():
    from enginehouse import EngineConfig

    cfg = EngineConfig(lora_modules=("sql=/a chat=/b", '{"name": "x", "path": "/c"}'))
    assert cfg.lora_modules == {"sql": "/a", "chat": "/b", "x": "/c"}
    with pytest.raises(ValueError, match="'oops' is not name=path"):
        EngineConfig(lora_modules=("oops",))


def test_dp_replicas_take_adapters_at_start_and_while_serving(pipe, models):
    """dp=2: each replica is a core process of its own; adapters reach them by message."""
    prompts = [{"token_ids": tokens(n, seed=40 + n)} for n in (9, 14, 11, 8)]
    names = ["sql", None, "chat", "mlp"]
    gen = {"max_new_tokens": 4, "min_new_tokens": 4}
    pipe.load_adapter("mlp", models["mlp"])
    try:
        want = [r.token_ids for r in pipe(prompts, gen, adapter=names)]
    finally:
        pipe.unload_adapter("mlp")
    with pipeline(
        str(models["llama"]),
        backend="pytorch",
        engine_config={"dp": 2, "max_batch_size": 8},
        adapters={"sql": models["sql"], "chat": models["chat"]},
        progress=False,
    ) as p:
        p.load_adapter("mlp", models["mlp"])
        assert sorted(a["name"] for a in p.adapters()) == ["chat", "mlp", "sql"]
        assert [r.token_ids for r in p(prompts, gen, adapter=names)] == want
        p.unload_adapter("mlp")
        with pytest.raises(RequestError, match="unknown adapter 'mlp'"):
            p(prompts[0], gen, adapter="mlp")
        with pytest.raises(AdapterError, match="rank 32 is above"):
            folder = models["root"] / "r32"
            if not folder.exists():
                make_adapter(models["llama"], folder, ["q_proj"], r=32)
            p.load_adapter("big", folder)


def test_tp2_fused_checkpoint_adapter_equals_tp1(models):
    """Phi-3's fused qkv_proj / gate_up_proj adapter, cut per rank like the fused weights."""
    prompts = [{"token_ids": tokens(n, seed=60 + n)} for n in (10, 13)]
    gen = {"max_new_tokens": 4, "min_new_tokens": 4}
    adapters = {"fused": models["phi3_fused"]}
    runs = []
    for tp in (1, 2):
        with pipeline(
            str(models["phi3"]), backend="pytorch", engine_config={"tp": tp},
            adapters=adapters, progress=False,
        ) as p:  # fmt: skip
            runs.append([r.token_ids for r in p(prompts, gen, adapter=["fused", None])])
    ref = reference(models["phi3"], models["phi3_fused"])
    assert runs[0][0] == ref_greedy(ref, prompts[0]["token_ids"], 4)
    assert runs[1] == runs[0]


TRITON_CHECK = """
import json, torch
from enginehouse_pytorch.native.lora_triton import lora_add
torch.manual_seed(0)
T, IN, OUT, R, S = 37, 40, 70, 24, 4  # sizes that fill no block exactly
x, a, b = torch.randn(T, IN), torch.randn(S, R, IN), torch.randn(S, OUT, R)
groups = [(1, 0, 5), (3, 5, 6), (2, 9, 30), (1, 30, 37)]  # rows 6..8: the base model
y0 = torch.randn(T, OUT)
y = y0.clone()
lora_add(y, x, a, b, groups)
want = y0.clone()
for s, lo, hi in groups:
    want[lo:hi] += (x[lo:hi] @ a[s].T) @ b[s].T
scale = float(want.abs().max())
print(json.dumps({"rel": float((y - want).abs().max()) / scale,
                  "untouched": bool(torch.equal(y[6:9], y0[6:9]))}))
"""


def test_triton_lora_kernel_under_the_interpreter():
    """The GPU's segmented LoRA kernel, run by Triton's interpreter on the CPU: every run of
    rows gets its adapter's x A^T B^T added, rows of the base model are left alone."""
    import os
    import subprocess
    import sys

    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run(
        [sys.executable, "-c", TRITON_CHECK], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["rel"] < 1e-5 and result["untouched"], result


def test_lora_modules_flag_reaches_the_pipeline(toy_dir, models):
    """`--lora-modules` (repeatable, vLLM's name=path) is an EngineConfig flag of every command;
    here it reaches pipeline(), which refuses the toy backend for it."""
    from click.testing import CliRunner

    from enginehouse.cli import cli

    args = ["generate", str(toy_dir), "hi", "--backend", "toy"]
    args += ["--lora-modules", f"sql={models['sql']}", "--lora-modules", f"chat={models['chat']}"]
    done = CliRunner().invoke(cli, args)
    assert done.exit_code != 0
    assert "does not take LoRA adapters" in done.output, done.output


def test_adapter_on_an_int8_quantized_base(models):
    """The adapters' products stay float beside a quantized projection (here int8 at load)."""
    ids = tokens(20, seed=3)
    with pipeline(
        str(models["llama"]), backend="pytorch",
        engine_config={"quantization": "int8", "enable_prefix_caching": False},
        adapters={"sql": models["sql"]}, progress=False,
    ) as p:  # fmt: skip
        got = p({"token_ids": ids}, {"max_new_tokens": 6, "min_new_tokens": 6}, adapter="sql")
    # int8 rounding moves the logits a little: this tiny model's greedy tokens stay PEFT's
    assert got.token_ids == ref_greedy(reference(models["llama"], models["sql"]), ids, 6)
