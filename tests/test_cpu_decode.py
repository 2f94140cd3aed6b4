"""The CPU's small-step kernels (`native.cpu_decode`) against the torch ops they replace.

Each kernel runs alone and on a batch, at odd sizes (columns that do not fill a group, row
counts that do not fill a tile), in float32 and bfloat16. The AVX2 build is checked too on a
CPU with AVX-512 (a second build with `-mno-avx512f`, in a fresh process: both register the same
ops); on an AVX2-only CPU the ordinary build is the AVX2 one. With the kernels off, the runner's
torch-ops path still matches transformers (test_native.py runs the kernels' path).
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from enginehouse_pytorch.native import cpu_build, cpu_decode, cpu_kernels
from enginehouse_pytorch.native.layers import RMSNorm
from enginehouse_pytorch.native.rope import apply_rope

pytestmark = pytest.mark.skipif(not cpu_decode.load(), reason="no C++ toolchain to build it")


def check_linear(rows: int, n: int, k: int, wdtype: torch.dtype, bias: bool) -> None:
    g = torch.Generator().manual_seed(rows * 1000 + n + k)
    w = torch.randn(n, k, generator=g).to(wdtype)
    b = torch.randn(n, generator=g) if bias else None
    x = torch.randn(rows, k, generator=g)
    got = cpu_decode.linear(x, cpu_decode.pack(w), b, n)
    torch.testing.assert_close(got, F.linear(x, w.float(), b), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 7, 13, 32])
@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16])
def test_linear_equals_torch(rows, wdtype):
    check_linear(rows, 200, 72, wdtype, bias=rows % 2 == 1)  # 200 columns: a partial group
    check_linear(rows, 1000, 130, wdtype, bias=False)


def test_linear_keeps_bfloat16_activations():
    w, x = torch.randn(40, 24), torch.randn(3, 24).bfloat16()
    got = cpu_decode.linear(x, cpu_decode.pack(w), None, 40)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), F.linear(x.float(), w), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 5])
def test_add_rms_norm_equals_torch(dtype, rows):
    norm = RMSNorm(96, 1e-6)
    norm.weight.data = torch.randn(96).to(dtype)
    x, delta = torch.randn(rows, 96).to(dtype), torch.randn(rows, 96).to(dtype)
    want_x = x + delta
    want = norm(want_x)
    got_x = x.clone()
    got = cpu_decode.add_rms_norm(got_x, delta, norm.weight, norm.eps)
    assert torch.equal(got_x, want_x)  # the residual is updated in place
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(got, want, **tol)
    torch.testing.assert_close(cpu_decode.add_rms_norm(x, None, norm.weight, 1e-6), norm(x), **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows, width", [(3, 50), (70, 1000)])  # a vector tail; several threads
def test_silu_mul_equals_torch(dtype, rows, width):
    gate_up = torch.randn(rows, 2 * width) * 4
    gate_up[0, :6] = torch.tensor([100.0, -100.0, 1e4, -1e4, 88.5, -88.5])  # exp's far ends
    gate_up = gate_up.to(dtype)
    gate, up = gate_up.split(width, dim=-1)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    got = cpu_decode.silu_mul(gate_up)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, F.silu(gate) * up, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 6, 40])  # 40: a prefill, split over the cores
@pytest.mark.parametrize("in_place", [False, True])
def test_rope_store_equals_torch(dtype, tokens, in_place):
    heads, kv_heads, d, slots = 6, 2, 16, 40
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * d).to(dtype)
    angles = torch.randn(tokens, d // 2).repeat(1, 2)
    sign = torch.cat([-torch.ones(d // 2), torch.ones(d // 2)])
    cos, sin = angles.cos()[:, None].to(dtype), (angles.sin() * sign)[:, None].to(dtype)
    where = torch.randperm(slots)[:tokens]
    cache = (
        torch.zeros(kv_heads, slots, d, dtype=dtype),
        torch.zeros(kv_heads, slots, d, dtype=dtype),
    )
    qk = apply_rope(qkv[:, : (heads + kv_heads) * d].view(tokens, -1, d), cos, sin)
    v = qkv[:, (heads + kv_heads) * d :].view(tokens, kv_heads, d).clone()
    got = cpu_decode.rope_store(qkv, cos, sin, cache, where, heads, kv_heads, in_place)
    if in_place:  # q and k rotated inside qkv, v as it was
        assert got is qkv
        torch.testing.assert_close(got[:, : (heads + kv_heads) * d].view(qk.shape), qk)
        assert torch.equal(got[:, (heads + kv_heads) * d :].view(v.shape), v)
        q = got[:, : heads * d].view(tokens, heads, d)
    else:
        q = got
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(q, qk[:, :heads], **tol)
    torch.testing.assert_close(cache[0][:, where], qk[:, heads:].transpose(0, 1), **tol)
    assert torch.equal(cache[1][:, where], v.transpose(0, 1))
    untouched = torch.ones(slots, dtype=torch.bool)
    untouched[where] = False
    assert not cache[0][:, untouched].any() and not cache[1][:, untouched].any()


@pytest.mark.parametrize(
    "dtype",
    [
        "float32",
        pytest.param(
            "bfloat16",
            marks=pytest.mark.skipif(not cpu_build.has_bf16(), reason="no bf16 units: not packed"),
        ),
    ],
)
def test_whole_step_equals_the_per_op_path(llama_dir, dtype):
    """The one-call paths (`cpu_step.DecodeRunner`: ids to logits; `DecodeStep`: the layers)
    give exactly the logits of the separate fused ops, at 1 and 3 rows, and write the same KV."""
    from enginehouse import ScheduledBatch, SeqChunk, pipeline

    pipe = pipeline(
        str(llama_dir), backend="pytorch", engine_config={"dtype": dtype}, progress=False
    )
    try:
        runner = pipe.runner
        fast, step, bs = runner.decode, runner.model.step, runner.kv_spec.block_size
        assert fast is not None and step is not None
        prompts = [[5, 9, 23, 41, 7, 11, 64, 3] * 3, [12, 99, 7], [8] * 17]
        tables = [(3 * i, 3 * i + 1) for i in range(len(prompts))]
        for i, p in enumerate(prompts):
            runner.execute(ScheduledBatch((SeqChunk(i, tuple(p), 0, tables[i], (0,)),), bs))
        for rows in (1, 3):
            chunks = [SeqChunk(i, (17 + i,), len(prompts[i]), tables[i], (0,)) for i in range(rows)]
            batch = ScheduledBatch(tuple(chunks), bs)
            results = []
            # ids to logits in one call; the layers in one call; every op on its own
            for runner.decode, runner.model.step in ((fast, step), (None, step), (None, None)):
                results.append((runner.execute(batch), runner.kv[-1][0].clone()))
            runner.decode, runner.model.step = fast, step
            for logits, kv in results[1:]:
                assert torch.equal(logits, results[0][0])
                # the same K in the same slots (bitwise: unwritten slots may hold NaN)
                assert torch.equal(kv.view(torch.uint8), results[0][1].view(torch.uint8))
    finally:
        pipe.close()


@pytest.fixture(scope="module")
def qwen2_sliding_dir(models_dir):
    """A Qwen2 whose second layer attends through a window of 8: two KV groups."""
    import transformers

    from enginehouse.testing import TINY, build_model

    config = transformers.Qwen2Config(
        **TINY,
        vocab_size=512,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
        use_sliding_window=True,
        sliding_window=8,
        max_window_layers=1,
    )
    return build_model(models_dir / "qwen2-sliding", config)


@pytest.mark.parametrize("family", ["llama", "qwen2-sliding"])
def test_verify_rows_equal_decoding_one_by_one(family, llama_dir, qwen2_sliding_dir):
    """Speculative verify chunks (a sequence's last token and its proposals, rows read
    together by the attention kernel, `query_starts`) through every CPU path: ids to logits
    in one call, the layers in one call, and the per-op path at more rows than the one-call
    step takes. Each gives exactly the others' logits at up to 4 rows, and every verified row
    the logits of decoding its tokens one at a time. The Qwen2 has two KV groups (each layer
    reads its group's slots and tables; the verify rows cross the sliding window)."""
    from enginehouse import ScheduledBatch, SeqChunk, pipeline

    path = llama_dir if family == "llama" else qwen2_sliding_dir
    pipe = pipeline(str(path), backend="pytorch", progress=False)
    try:
        runner = pipe.runner
        fast, step, bs = runner.decode, runner.model.step, runner.kv_spec.block_size
        assert fast is not None and step is not None
        groups = len(runner.caches)
        assert groups == (1 if family == "llama" else 2)
        prompts = [[5, 9, 23, 41, 7, 11, 64, 3] * 2, [12, 99, 7], [8] * 15]
        # The same block ids in each group's own pool.
        tables = [
            tuple(tuple(range(4 * i, 4 * i + 3)) for _ in range(groups))
            for i in range(len(prompts))
        ]

        def seq_chunk(i: int, ids, start: int, at, verify: bool = False) -> SeqChunk:
            t = tables[i]
            return SeqChunk(i, tuple(ids), start, t[0], at, verify=verify, group_tables=t)

        for i, p in enumerate(prompts):
            runner.execute(ScheduledBatch((seq_chunk(i, p, 0, (0,)),), bs))

        def chunk(i: int, ids: tuple[int, ...]) -> SeqChunk:
            at = tuple(range(len(ids)))
            return seq_chunk(i, ids, len(prompts[i]), at, verify=len(ids) > 1)

        def one_by_one(i: int, ids: tuple[int, ...]) -> torch.Tensor:
            rows = []
            for j, t in enumerate(ids):
                c = seq_chunk(i, (t,), len(prompts[i]) + j, (0,))
                rows.append(runner.execute(ScheduledBatch((c,), bs)))
            return torch.cat(rows)

        # 4 rows (one sequence's K = 3; K = 2 beside a decode): every path. 9 rows: per-op.
        steps = [
            ((0, (17, 18, 19, 20)),),
            ((1, (30, 31, 32)), (2, (40,))),
            ((0, (21, 22, 23, 24)), (1, (33, 34, 35)), (2, (41, 42))),
        ]
        for step_chunks in steps:
            batch = ScheduledBatch(tuple(chunk(i, ids) for i, ids in step_chunks), bs)
            rows = batch.num_tokens
            if rows <= cpu_decode.SMALL_ROWS:
                assert fast.run(batch) is not None  # the one-call path takes verify chunks
            results = []
            for runner.decode, runner.model.step in ((fast, step), (None, step), (None, None)):
                results.append(runner.execute(batch))
            runner.decode, runner.model.step = fast, step
            for logits in results[1:]:
                torch.testing.assert_close(logits, results[0], rtol=0, atol=0)
            want = torch.cat([one_by_one(i, ids) for i, ids in step_chunks])
            torch.testing.assert_close(results[0], want, rtol=1e-5, atol=1e-5)
    finally:
        pipe.close()


AVX2_CHECK = """
import torch, torch.nn.functional as F
from enginehouse_pytorch.native import cpu_decode
assert cpu_decode.load(("-mno-avx512f",))
assert cpu_decode.pack(torch.zeros(1, 8)).shape[-1] == 32  # groups of four 8-wide vectors
for rows in (1, 2, 3, 4, 9):
    for wdtype in (torch.float32, torch.bfloat16):
        w, x, b = torch.randn(70, 40).to(wdtype), torch.randn(rows, 40), torch.randn(70)
        got = cpu_decode.linear(x, cpu_decode.pack(w), b, 70)
        torch.testing.assert_close(got, F.linear(x, w.float(), b), rtol=1e-4, atol=1e-4)
# The whole path on this build (registered above, so `load` must not build the other): greedy
# tokens of transformers, alone (one call from ids to logits) and in a batch of 5 (every row).
import sys
from transformers import AutoModelForCausalLM
from enginehouse import GenerationConfig, pipeline
cpu_decode.load = lambda *a: True
pipe = pipeline(sys.argv[1], backend="pytorch", progress=False)
assert pipe.runner.decode is not None
ref = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32).eval()
prompts = [[5, 9, 23, 41, 7], [12, 99, 7], [8] * 17, [3, 4], [60, 61, 62]]
want = []
for p in prompts:
    out = ref.generate(torch.tensor([p]), max_new_tokens=5, min_new_tokens=5, do_sample=False)
    want.append(out[0, len(p):].tolist())
config = GenerationConfig(max_new_tokens=5, min_new_tokens=5)
assert pipe([{"token_ids": prompts[0]}], config)[0].token_ids == want[0]
assert [r.token_ids for r in pipe([{"token_ids": p} for p in prompts], config)] == want
pipe.close()
# Speculative verify rows through this build's one-call step and kernel: the same tokens.
ngram = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3}
pipe = pipeline(sys.argv[1], backend="pytorch", progress=False,
                engine_config={"speculative_config": ngram})
assert [r.token_ids for r in pipe([{"token_ids": p} for p in prompts], config)] == want
assert pipe([{"token_ids": prompts[2]}], config)[0].token_ids == want[2]
pipe.close()
print("ok")
"""


@pytest.mark.slow
@pytest.mark.skipif("avx512f" not in cpu_build.cpu_flags(), reason="the native build is AVX2")
def test_avx2_build_equals_torch(llama_dir):
    """CI's CPUs may have AVX2 only: build that variant here as well and check it, its
    products against torch and the whole decode path against transformers."""
    command = [sys.executable, "-c", AVX2_CHECK, str(llama_dir)]
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-2000:]


def test_torch_ops_path_equals_transformers(llama_dir, monkeypatch):
    """ENGINEHOUSE_CPU_KERNELS=0 (or no compiler): projections through oneDNN, attention and
    the small ops in torch; logits and greedy tokens still those of transformers."""
    from transformers import AutoModelForCausalLM

    from enginehouse import GenerationConfig, pipeline

    monkeypatch.setattr(cpu_decode, "load", lambda *a: False)
    monkeypatch.setattr(cpu_kernels, "load", lambda *a: False)
    pipe = pipeline(str(llama_dir), backend="pytorch", progress=False)
    try:
        runner = pipe.runner
        assert not runner.model.fused and runner.kernel.__name__ == "TorchAttention"
        prompts = [[5, 9, 23, 41, 7, 11, 64, 3], [12, 99, 7]]
        ref = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32).eval()
        want = []
        for p in prompts:
            x = torch.tensor([p])
            out = ref.generate(
                x,
                attention_mask=torch.ones_like(x),
                max_new_tokens=6,
                min_new_tokens=6,
                do_sample=False,
            )
            want.append(out[0, len(p) :].tolist())
        config = GenerationConfig(max_new_tokens=6, min_new_tokens=6)
        got = pipe([{"token_ids": p} for p in prompts], [config, config])
        assert [r.token_ids for r in got] == want
    finally:
        pipe.close()


@pytest.mark.parametrize("flags,says", [([], "no bf16 units"), (["avx512_bf16"], "AVX512-BF16")])
def test_explain_says_which_dtypes_the_cpu_runs(llama_dir, monkeypatch, flags, says):
    from enginehouse import explain

    monkeypatch.setattr(cpu_build, "cpu_flags", lambda: ["avx2", *flags])
    verdict = next(v for v in explain(str(llama_dir))["verdicts"] if v["backend"] == "pytorch")
    assert "on the CPU: float32" in verdict["reason"] and says in verdict["reason"]
