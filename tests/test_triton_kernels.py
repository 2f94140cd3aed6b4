"""The GPU path's Triton kernels, run by Triton's interpreter on the CPU (no GPU needed).

Triton reads TRITON_INTERPRET when kernels are defined, so the checks run in a subprocess that
sets it before importing triton: this file run as a script (`python tests/test_triton_kernels.py
FOLDER`) prints one JSON list of results; the tests below assert on them. Compared with the torch
reference (`TorchAttention`) on the same inputs:

- `store`: K/V of the new tokens into shuffled slots (float32, bfloat16), from strided views;
- `decode`: grouped-query attention over block tables with shuffled block ids, ragged context
  lengths, a row of length 0 (zeros out, no NaN), sliding windows, soft-capping, float32 /
  float16 / bfloat16, head dims that are not powers of two, one part or the context split in
  parts; slots nobody wrote hold NaN, so a kernel reading past a context would show it;
- `verify`: several queries per sequence (speculative verification) in one tile, causal among
  them, with GQA, windows, sinks, soft-capping, int8, split contexts, bfloat16, against the
  torch path attending each query as a decode row;
- `fp8`: an e4m3 cache with per-tensor scales (every finite code decoded exactly; attention
  against `kv_quant.Fp8Attention`);
- the native runner with `TritonAttention` (the GPU's paged metadata) against the torch path,
  prefill, chunked prefill, mixed, decode and verify steps, on a Gemma 2 model (windows,
  soft-capping, two KV groups each with its own block tables), decode and verify steps through
  `DecodeGraphs` (eagerly: off a GPU it records nothing) so the input packing, per-group tables
  and slots, padding rows and row order are checked, and the null slot stays zero; a verify
  step on the eager path (per-sequence queries); greedy speculative decoding through the
  runner equal to plain; an fp8 cache through `TritonFp8Attention`;
- `pipeline`: the engine with n-gram speculation through the Triton kernels and the graphs'
  stand-in: the greedy tokens of plain decoding.

The real GPU run (compiled kernels, CUDA graphs, timings) is benchmarks/gpu_check.py.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# --- the pytest side: no triton import here -------------------------------------------------


def _has_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


pytestmark = pytest.mark.skipif(
    not _has_triton(),
    reason="triton is not installed (pip install triton; Linux x86_64): the GPU kernels' "
    "interpreter tests need it",
)


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[str, dict]:
    folder = tmp_path_factory.mktemp("triton-interp")
    env = dict(os.environ, TRITON_INTERPRET="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(
        [sys.executable, __file__, str(folder)],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert proc.returncode == 0, f"interpreter checks crashed:\n{proc.stdout}\n{proc.stderr}"
    lines = [line for line in proc.stdout.splitlines() if line.startswith("[")]
    assert lines, f"no results printed:\n{proc.stdout}\n{proc.stderr}"
    return {r["name"]: r for r in json.loads(lines[-1])}


def _check(results: dict[str, dict], prefix: str, expected: int) -> None:
    mine = {k: v for k, v in results.items() if k.startswith(prefix)}
    assert len(mine) >= expected, f"expected {expected} {prefix} checks, got {sorted(mine)}"
    bad = [f"{k}: {v['detail']}" for k, v in mine.items() if not v["ok"]]
    assert not bad, "\n".join(bad)


def test_store_kv_matches_torch(results):
    _check(results, "store", 3)


def test_paged_decode_matches_torch(results):
    _check(results, "decode", 12)


def test_paged_decode_reads_an_int8_cache(results):
    _check(results, "int8", 2)


def test_paged_decode_verifies_several_queries_per_sequence(results):
    _check(results, "verify", 10)


def test_paged_decode_reads_an_fp8_cache(results):
    _check(results, "fp8", 6)


def test_native_runner_with_triton_kernels_matches_torch_path(results):
    _check(results, "runner", 1)


def test_decode_graphs_pack_pad_and_order_rows(results):
    _check(results, "graphs", 2)


def test_speculative_decoding_through_the_triton_runner_is_greedy_identical(results):
    _check(results, "runner-speculative", 1)


def test_engine_speculation_through_triton_kernels_is_greedy_identical(results):
    _check(results, "pipeline", 1)


def test_native_runner_reads_an_fp8_cache_with_the_triton_kernel(results):
    _check(results, "runner-fp8", 1)


# --- the subprocess side --------------------------------------------------------------------


def _patch_interpreter() -> None:
    """Two gaps of Triton 3.6's interpreter, not of the kernels: with NumPy >= 2.4, loop
    bounds loaded from memory are 1-element arrays that `int()` refuses; and `tl.dot` of
    bfloat16 multiplies the raw uint16 bits. Fixed here, for these tests only."""
    import numpy as np
    import triton.language as tl
    import triton.runtime.interpreter as ip

    patch_tensor = getattr(ip, "_patch_lang_tensor", None)  # internals: patch where present
    if patch_tensor is not None:

        def _patch_lang_tensor(tensor, scope):
            patch_tensor(tensor, scope)
            index = lambda self: int(self.handle.data.reshape(-1)[0])  # noqa: E731
            scope.set_attr(tensor, "__index__", index)

        ip._patch_lang_tensor = _patch_lang_tensor
    create_dot = getattr(getattr(ip, "InterpreterBuilder", None), "create_dot", None)
    if create_dot is not None and hasattr(ip, "_convert_float"):

        def _float(h):
            data = ip._convert_float(h.data, tl.bfloat16, tl.float32, None).view(np.float32)
            return ip.TensorHandle(data, tl.float32)

        def _create_dot(self, a, b, d, *args):
            if a.dtype.scalar == tl.bfloat16:
                a, b = _float(a), _float(b)
            return create_dot(self, a, b, d, *args)

        ip.InterpreterBuilder.create_dot = _create_dot


def _decode_check(name, **case):
    from enginehouse_pytorch.native.kernel_checks import decode_case, describe

    result = decode_case(len(name), **case)
    ok = (
        result["err"] <= result["tolerance"]
        and result["zeros"]
        and result["finite"]
        and result["dtype_ok"]
    )
    return {"name": name, "ok": ok, "detail": describe(result)}


def _decode_checks() -> list[dict]:
    cases = [
        ("decode-mha-ragged", dict(kvh=4, g=1, d=16, bs=4, lens=[5, 17, 1, 64])),
        ("decode-gqa2-empty-row", dict(kvh=2, g=2, d=16, bs=4, lens=[5, 0, 17, 1])),
        ("decode-gqa2-parts3", dict(kvh=2, g=2, d=16, bs=4, lens=[5, 0, 17, 150], parts=3)),
        ("decode-gqa8-window", dict(kvh=1, g=8, d=32, bs=16, lens=[100, 3, 0, 64], window=20)),
        (
            "decode-window-parts",
            dict(kvh=2, g=2, d=32, bs=8, lens=[200, 7, 90], window=33, parts=4),
        ),
        (
            "decode-softcap-window-d24",
            dict(kvh=2, g=1, d=24, bs=8, lens=[90, 9, 40], window=8, softcap=5.0, parts=2),
        ),
        ("decode-softcap", dict(kvh=2, g=4, d=16, bs=16, lens=[33, 150, 1], softcap=2.0)),
        ("decode-d96", dict(kvh=2, g=3, d=96, bs=16, lens=[40, 1, 77])),
        ("decode-all-empty", dict(kvh=2, g=2, d=16, bs=4, lens=[0, 0], parts=2)),
        ("decode-float16", dict(kvh=2, g=4, d=16, bs=16, lens=[33, 150], dtype="float16")),
        (
            "decode-bfloat16-parts",
            dict(kvh=2, g=4, d=16, bs=16, lens=[33, 0, 150], dtype="bfloat16", parts=2),
        ),
        (
            "decode-bfloat16-softcap-window",
            dict(kvh=2, g=2, d=32, bs=8, lens=[70, 5], window=16, softcap=50.0, dtype="bfloat16"),
        ),
    ]
    return [_decode_check(name, **kw) for name, kw in cases]


def _verify_checks() -> list[dict]:
    """Several queries per sequence (speculative verification), each K/V tile read once for
    all of them: against the torch path attending each query as a decode row of its own."""
    cases = [
        ("verify-mha-k3", dict(kvh=2, g=1, d=16, bs=4, lens=[9, 17, 4], counts=[4, 1, 4])),
        ("verify-gqa4-ragged", dict(kvh=2, g=4, d=16, bs=4, lens=[5, 40, 1], counts=[2, 4, 1])),
        ("verify-gqa-empty-seq", dict(kvh=1, g=2, d=16, bs=8, lens=[6, 0, 30], counts=[3, 0, 4])),
        ("verify-window", dict(kvh=2, g=2, d=16, bs=4, lens=[40, 12], counts=[4, 3], window=6)),
        (
            "verify-window-parts-softcap",
            dict(
                kvh=1, g=4, d=24, bs=8, lens=[90, 9], counts=[5, 2], window=9, softcap=5.0, parts=3
            ),
        ),
        (
            "verify-sinks-parts",
            dict(kvh=2, g=2, d=16, bs=4, lens=[33, 7], counts=[4, 2], sinks=True, parts=2),
        ),
        (
            "verify-sinks-window",
            dict(kvh=1, g=8, d=16, bs=4, lens=[20, 6], counts=[3, 4], sinks=True, window=8),
        ),
        ("verify-int8", dict(kvh=2, g=2, d=16, bs=4, lens=[21, 5], counts=[4, 2], kv="int8")),
        (
            "verify-bfloat16",
            dict(kvh=2, g=2, d=32, bs=8, lens=[70, 5], counts=[4, 4], dtype="bfloat16"),
        ),
        ("verify-k7", dict(kvh=1, g=1, d=16, bs=4, lens=[30, 8], counts=[8, 8])),
    ]
    return [_decode_check(name, **kw) for name, kw in cases]


def _fp8_checks() -> list[dict]:
    """An fp8 (e4m3) cache with per-tensor scales, dequantized in the kernel, against the
    torch path reading the same cache (kv_quant.Fp8Attention)."""
    cases = [
        ("fp8-gqa", dict(kvh=2, g=2, d=16, bs=4, lens=[5, 0, 37], kv="fp8")),
        (
            "fp8-window-parts",
            dict(kvh=2, g=2, d=16, bs=4, lens=[50, 9], window=12, parts=2, kv="fp8"),
        ),
        ("fp8-sinks", dict(kvh=1, g=4, d=16, bs=8, lens=[30, 3], sinks=True, kv="fp8")),
        ("fp8-bfloat16", dict(kvh=2, g=2, d=32, bs=8, lens=[40, 6], dtype="bfloat16", kv="fp8")),
        ("fp8-verify", dict(kvh=2, g=2, d=16, bs=4, lens=[21, 5], counts=[4, 2], kv="fp8")),
    ]
    out = [_decode_check(name, **kw) for name, kw in cases]
    out.append(_fp8_values_check())
    return out


def _fp8_values_check() -> dict:
    """The kernel's e4m3 decoding (integer ops, `_fp8_e4m3_to_float`), code by code: all 254
    finite codes against torch's own float8_e4m3fn conversion."""
    import torch

    from enginehouse_pytorch.native.triton_ops import fp8_e4m3_values

    codes = torch.tensor([c for c in range(256) if c & 0x7F != 0x7F], dtype=torch.uint8)
    want = codes.view(torch.float8_e4m3fn).float()
    got = fp8_e4m3_values(codes)
    wrong = int((got != want).sum())
    return {"name": "fp8-codes", "ok": wrong == 0, "detail": f"{wrong}/{len(codes)} codes differ"}


def _int8_checks() -> list[dict]:
    """The decode kernel over an int8 cache with its scales (kv_quant.py) against the same
    kernel over the dequantized float cache (itself checked against torch above)."""
    import torch

    from enginehouse_pytorch.native.kv_quant import quantize_int8
    from enginehouse_pytorch.native.triton_ops import paged_decode

    out = []
    for name, window, parts in (("int8-gqa", None, 1), ("int8-window-parts", 12, 2)):
        gen = torch.Generator().manual_seed(len(name))
        kvh, g, d, bs, lens = 2, 2, 16, 4, [5, 0, 37]
        slots = 40 * bs  # 10 blocks a row: room for the longest context, 37
        k, v = (torch.randn(slots, kvh, d, generator=gen) for _ in range(2))
        (kq, ks), (vq, vs) = quantize_int8(k), quantize_int8(v)
        caches = [x.transpose(0, 1).contiguous() for x in (kq, vq, ks, vs)]
        floats = [(c.float() * s[..., None]) for c, s in zip(caches[:2], caches[2:])]
        tables = torch.randperm(40, generator=gen)[:30].view(3, 10).to(torch.int32)
        ctx = torch.tensor(lens, dtype=torch.int32)
        q = torch.randn(3, kvh * g, d, generator=gen)
        args = (tables, ctx, bs, d**-0.5, window, None, parts)
        got = paged_decode(q, caches[0], caches[1], *args, scales=(caches[2], caches[3]))
        want = paged_decode(q, floats[0], floats[1], *args)
        err = (got - want).abs().max().item()
        out.append({"name": name, "ok": err <= 1e-5, "detail": f"max error {err:.2e}"})
    return out


def _store_checks() -> list[dict]:
    import torch

    from enginehouse_pytorch.native.attention import TorchAttention
    from enginehouse_pytorch.native.triton_ops import store_kv

    out = []
    for name, dtype, kvh, d in (
        ("store-float32", torch.float32, 2, 16),
        ("store-bfloat16", torch.bfloat16, 3, 24),
    ):
        gen = torch.Generator().manual_seed(1)
        t, slots_total = 11, 64
        qkv = torch.randn(t, (4 + 2 * kvh) * d, generator=gen).to(dtype)
        _, k, v = qkv.split([4 * d, kvh * d, kvh * d], dim=-1)  # strided views, as in the model
        k, v = k.view(t, kvh, d), v.view(t, kvh, d)
        slots = torch.randperm(slots_total, generator=gen)[:t]
        ref = tuple(torch.zeros(kvh, slots_total, d, dtype=dtype) for _ in range(2))
        TorchAttention(4, kvh, d, 1.0).store(ref, k, v, slots)
        mine = tuple(torch.zeros(kvh, slots_total, d, dtype=dtype) for _ in range(2))
        store_kv(mine[0], mine[1], k, v, slots)
        ok = torch.equal(mine[0], ref[0]) and torch.equal(mine[1], ref[1])
        out.append({"name": name, "ok": ok, "detail": "caches differ" if not ok else ""})
    # A negative slot is skipped; the rest are written.
    k = torch.randn(3, 2, 16)
    cache = (torch.zeros(2, 8, 16), torch.zeros(2, 8, 16))
    store_kv(cache[0], cache[1], k, k + 1, torch.tensor([5, -1, 2]))
    ok = (
        torch.equal(cache[0][:, 5], k[0])
        and torch.equal(cache[1][:, 2], k[2] + 1)
        and int((cache[0] != 0).any(-1).sum()) == 4
    )
    out.append({"name": "store-skips-negative-slot", "ok": ok, "detail": "" if ok else "wrong"})
    return out


def _runner_checks(folder: Path) -> list[dict]:
    """The native runner with TritonAttention (paged metadata) against the torch path, step by
    step, with decode and verify steps going through DecodeGraphs' eager stand-in; then
    speculative decoding's greedy identity through the Triton runner."""
    import random

    import torch
    from transformers import AutoModelForCausalLM

    from enginehouse import EngineConfig, ScheduledBatch
    from enginehouse.pipeline import read_spec
    from enginehouse.runner import RunnerContext, SeqChunk
    from enginehouse.testing import native_model_configs
    from enginehouse_pytorch.native import verify_rows
    from enginehouse_pytorch.native.cuda_graphs import DecodeGraphs
    from enginehouse_pytorch.native.triton_ops import TritonAttention
    from enginehouse_pytorch.native_runner import NativeRunner

    hf_config = native_model_configs(512)["gemma2"]
    hf_config.num_key_value_heads = 1  # fewer kernel programs: the interpreter runs each slowly
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(hf_config).save_pretrained(folder / "gemma2")  # no tokenizer
    spec = read_spec(str(folder / "gemma2"))
    speculative = {"method": "ngram", "num_speculative_tokens": 3}
    config = EngineConfig(
        device="cpu", dtype="float32", block_size=4, max_batch_size=4,
        speculative_config=speculative,
    )  # fmt: skip
    num_blocks = 40
    ref = NativeRunner(spec, config, RunnerContext.for_model(spec, config))
    ref.load(progress=False)
    # Gemma 2 has two KV groups (sliding and full layers) of equal shares: allocate_kv takes
    # their total; each chunk gives each group a table of its own (`SeqChunk.group_tables`),
    # from two differently shuffled pools, so a kernel reading the wrong group's blocks shows.
    groups = len(ref.kv_spec.groups)
    ref.allocate_kv(num_blocks * groups)
    tri = NativeRunner(spec, config, RunnerContext.for_model(spec, config))
    tri.kernel, tri.paged = TritonAttention, True
    tri.load(progress=False)
    tri.allocate_kv(num_blocks * groups)
    tri.graphs = DecodeGraphs(tri, sizes=[1, 2, 4])
    tri.graphs.capture()
    multi_query_steps = []  # verify steps the eager path gave per-sequence queries
    fill = verify_rows.fill

    def counting_fill(meta, decodes, group, device):
        multi_query_steps.append(group)
        fill(meta, decodes, group, device)

    verify_rows.fill = counting_fill

    rng = random.Random(0)
    free = [list(range(num_blocks)) for _ in range(groups)]
    for pool in free:
        rng.shuffle(pool)
    prompts = {0: 13, 1: 5, 2: 20}  # seq id -> prompt length
    tokens = {s: [rng.randrange(5, 500) for _ in range(n)] for s, n in prompts.items()}
    tables: dict[int, list[list[int]]] = {s: [[] for _ in range(groups)] for s in prompts}
    done = dict.fromkeys(prompts, 0)  # tokens whose KV is in the cache

    def chunk(seq: int, n: int, logits: bool = True, verify: bool = False) -> SeqChunk:
        start = done[seq]
        for g, table in enumerate(tables[seq]):
            while len(table) * 4 < start + n:
                table.append(free[g].pop())
        done[seq] += n
        ids = tuple(tokens[seq][start : start + n])
        own = tuple(tuple(t) for t in tables[seq])
        at = tuple(range(n)) if verify else (n - 1,) if logits else ()
        return SeqChunk(seq, ids, start, own[0], at, verify=verify, group_tables=own)

    def verify(seq: int, k: int) -> SeqChunk:
        """The last token and k proposals (speculative decoding): logits at every position."""
        tokens[seq] += [rng.randrange(5, 500) for _ in range(k)]
        return chunk(seq, k + 1, verify=True)

    def eager(step):
        """A step the graphs must not take: the eager path's per-sequence queries."""

        def run():
            tri.graphs.enabled = False
            return step()

        return run

    steps = [
        lambda: [chunk(0, 13), chunk(1, 5)],  # prefill
        lambda: [chunk(0, 1), chunk(2, 12, logits=False), chunk(1, 1)],  # mixed, chunked
        lambda: [chunk(2, 8), chunk(0, 1), chunk(1, 1)],  # the rest of a chunked prefill
        *[lambda: [chunk(1, 1), chunk(0, 1), chunk(2, 1)]] * 2,  # decode: 3 of 4 rows padding
        lambda: [chunk(2, 1), chunk(0, 1, logits=False)],  # a row without logits
        lambda: [chunk(0, 1)],
        lambda: [verify(0, 3), chunk(1, 1), verify(2, 2)],  # a verify graph (4 rows a sequence)
        lambda: [verify(1, 1)],  # one sequence, 2 of its 4 rows padding
        eager(lambda: [verify(1, 3), chunk(0, 1), verify(2, 1)]),  # queries per sequence
    ]
    worst, shapes_ok = 0.0, True
    for step in steps:
        batch = ScheduledBatch(tuple(step()), 4)
        want, got = ref.execute(batch), tri.execute(batch)
        tri.graphs.enabled = True
        shapes_ok &= want.shape == got.shape and got.dtype == torch.float32
        if want.shape == got.shape:
            worst = max(worst, (want - got).abs().max().item())
        rows = iter(want)
        for c in batch.chunks:  # the next token: greedy, or any where no logits were asked
            for _ in c.logits_at[:-1]:
                next(rows)
            token = int(next(rows).argmax()) if c.logits_at else 7
            if done[c.seq_id] == len(tokens[c.seq_id]):
                tokens[c.seq_id].append(token)
    verify_rows.fill = fill
    null_zero = all(bool((c.cache[:, :, :, c.null_slot] == 0).all()) for c in tri.caches)
    replays, verified = tri.graphs.replays, tri.graphs.verify_replays
    speculation = _speculative_identity(tri, num_blocks)
    fp8 = _fp8_runner_check(spec)
    return [
        {
            "name": "runner-gemma2-steps",
            "ok": shapes_ok and worst < 1e-4,
            "detail": f"max logits diff {worst:.2e}, shapes/dtype ok {shapes_ok}",
        },
        {
            "name": "runner-verify-queries-per-sequence",
            "ok": sorted(multi_query_steps) == list(range(groups)),
            "detail": f"eager verify metadata per group: {multi_query_steps} (want one per group)",
        },
        {
            "name": "graphs-decode-steps-replayed",
            "ok": replays == 6 and verified == 2,
            "detail": f"{replays} steps went through DecodeGraphs, {verified} of them verify "
            "steps (want 6 and 2)",
        },
        {
            "name": "graphs-null-slot-stays-zero",
            "ok": null_zero,
            "detail": "" if null_zero else "a padding row wrote into the null slot",
        },
        speculation,
        fp8,
    ]


def _fp8_runner_check(spec) -> dict:
    """An fp8 KV cache through the runner: TritonFp8Attention (the GPU's choice: the torch
    store, the Triton decode with several queries per sequence) against the torch path
    (Fp8Attention, the CPU's choice) on prefill, decode and verify steps of Gemma 2."""

    from enginehouse import EngineConfig, ScheduledBatch
    from enginehouse.runner import RunnerContext, SeqChunk
    from enginehouse_pytorch.native.kv_quant import Fp8Attention
    from enginehouse_pytorch.native.triton_ops import TritonFp8Attention
    from enginehouse_pytorch.native_runner import NativeRunner

    config = EngineConfig(device="cpu", dtype="float32", block_size=4, kv_cache_dtype="fp8")
    runners = []
    for kernel in (Fp8Attention, TritonFp8Attention):
        runner = NativeRunner(spec, config, RunnerContext.for_model(spec, config))
        runner.kernel, runner.paged = kernel, kernel is TritonFp8Attention
        runner.load(progress=False)
        runner.allocate_kv(40 * len(runner.kv_spec.groups))
        runners.append(runner)
    a, b = tuple(range(0, 8)), tuple(range(8, 16))
    ids = [17, 3, 99, 45, 12, 8, 301, 77, 5, 64, 23, 41]
    steps = [
        [SeqChunk(0, tuple(ids[:9]), 0, a, (8,)), SeqChunk(1, tuple(ids[:5]), 0, b, (4,))],
        [SeqChunk(0, (ids[9],), 9, a, (0,)), SeqChunk(1, (ids[5],), 5, b, (0,))],
        [
            SeqChunk(0, tuple(ids[:4]), 10, a, (0, 1, 2, 3), verify=True),
            SeqChunk(1, (ids[6],), 6, b, (0,)),
        ],
    ]
    worst = 0.0
    for chunks in steps:
        batch = ScheduledBatch(tuple(chunks), 4)
        want, got = (r.execute(batch) for r in runners)
        worst = max(worst, (want - got).abs().max().item())
    used = runners[1].model.model.layers[0].self_attn.attn.__class__.__name__
    return {
        "name": "runner-fp8-triton",
        "ok": worst < 1e-4,
        "detail": f"max logits diff {worst:.2e} ({used} against Fp8Attention)",
    }


def _speculative_identity(runner, num_blocks: int) -> dict:
    """Greedy speculative decoding through the Triton runner (verify steps in DecodeGraphs'
    stand-in and eagerly) gives the tokens of plain greedy decoding through it. Proposals are
    the plain continuation with every third one wrong, so steps keep some and reject the rest;
    the rejected tokens' slots are written over by the next step, as in the engine."""
    from enginehouse import ScheduledBatch
    from enginehouse.runner import SeqChunk

    bs, new, k = 4, 12, 3
    prompt = [11, 42, 7, 99, 23, 11, 42, 7]
    groups = len(runner.caches)
    tables = [tuple(range(g * 8, g * 8 + 8)) for g in range(groups)]  # 32 slots a group

    def step(seq: int, ids: list[int], start: int, verify: bool) -> list[int]:
        at = tuple(range(len(ids))) if verify else (len(ids) - 1,)
        c = SeqChunk(seq, tuple(ids), start, tables[0], at, verify=verify, group_tables=tables)
        return runner.execute(ScheduledBatch((c,), bs)).argmax(-1).tolist()

    plain = list(prompt)
    plain.append(step(10, plain, 0, False)[-1])
    while len(plain) < len(prompt) + new:
        plain.append(step(10, plain[-1:], len(plain) - 1, False)[-1])
    spec = list(prompt)
    spec.append(step(11, spec, 0, False)[-1])
    drafted = kept = verify_steps = 0
    graphs = runner.graphs
    while len(spec) < len(prompt) + new:
        truth = plain[len(spec) : len(spec) + k]
        proposals = [t if (len(spec) + i) % 3 else (t + 1) % 500 for i, t in enumerate(truth)]
        graphs.enabled = verify_steps % 2 == 0  # graphs and the eager path in turn
        best = step(11, spec[-1:] + proposals, len(spec) - 1, True)
        verify_steps += 1
        accepted = 0
        while accepted < len(proposals) and proposals[accepted] == best[accepted]:
            accepted += 1
        drafted, kept = drafted + len(proposals), kept + accepted
        spec += proposals[:accepted] + [best[accepted]]
    graphs.enabled = True
    spec = spec[: len(prompt) + new]
    ok = spec == plain and 0 < kept < drafted
    return {
        "name": "runner-speculative-greedy-identity",
        "ok": ok,
        "detail": f"tokens identical {spec == plain}; {kept}/{drafted} proposals kept "
        f"in {verify_steps} verify steps",
    }


def _pipeline_checks(folder: Path) -> list[dict]:
    """The engine end to end through the Triton kernels: n-gram speculation on
    tests/test_speculative.py's "loopy" Llama gives the greedy tokens of plain decoding, with
    the runner's attention forced to `TritonAttention` (the GPU's choice) and DecodeGraphs'
    stand-in serving decode and verify steps (the CPU's one-call step and fused ops off, so
    every attention is Triton's)."""
    import random

    from safetensors.torch import load_file, save_file

    from enginehouse import pipeline
    from enginehouse.testing import build_model, model_configs
    from enginehouse_pytorch import native_runner
    from enginehouse_pytorch.native.cuda_graphs import DecodeGraphs
    from enginehouse_pytorch.native.triton_ops import TritonAttention

    config = model_configs(512)["llama"]
    config.tie_word_embeddings = True
    path = build_model(folder / "loopy-llama", config)
    tensors = load_file(path / "model.safetensors")
    for name in [n for n in tensors if "o_proj" in n or "down_proj" in n]:
        tensors[name] = tensors[name] * 0.3
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})

    runner_class = native_runner.NativeRunner
    runner_class._attention_kernel = lambda self: TritonAttention
    runner_class._fused = lambda self: False
    native_runner.cpu_step.decode_runner = lambda runner: None

    def repeating(n: int, seed: int) -> list[int]:
        rng = random.Random(seed)
        phrase = rng.choices(range(5, 512), k=rng.randint(4, 7))
        return (phrase * (n // len(phrase) + 1))[:n]

    prompts = [{"token_ids": repeating(n, seed)} for seed, n in ((1, 30), (0, 9))]
    gen = {"max_new_tokens": 20, "min_new_tokens": 20}
    ngram = {"method": "ngram", "num_speculative_tokens": 3}
    out, info = {}, {}
    for label, extra in (("plain", {}), ("ngram", {"speculative_config": ngram})):
        engine = {"device": "cpu", "dtype": "float32", "max_batch_size": 2, **extra}
        with pipeline(str(path), backend="pytorch", engine_config=engine, progress=False) as pipe:
            runner = pipe.runner
            runner.graphs = DecodeGraphs(runner, sizes=[1, 2])
            runner.graphs.capture()
            out[label] = [r.token_ids for r in pipe(prompts, gen)]
            stats = pipe.stats()
            info[label] = (runner.kernel.__name__, runner.graphs.verify_replays)
            info["accepted"] = stats.get("spec_decode_num_accepted_tokens", 0)
    same = out["ngram"] == out["plain"]
    kernel, verify_replays = info["ngram"]
    ok = same and kernel == "TritonAttention" and verify_replays > 0 and info["accepted"] > 0
    return [
        {
            "name": "pipeline-ngram-greedy-identity",
            "ok": ok,
            "detail": f"tokens identical {same}; kernel {kernel}, {verify_replays} verify "
            f"steps through the graphs' stand-in, {info['accepted']} proposals kept",
        }
    ]


def _main(folder: Path) -> None:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
    _patch_interpreter()
    results = []
    groups = {
        "store": _store_checks,
        "decode": _decode_checks,
        "int8": _int8_checks,
        "verify": _verify_checks,
        "fp8": _fp8_checks,
        "runner": lambda: _runner_checks(folder),
        "pipeline": lambda: _pipeline_checks(folder),  # last: it patches the runner class
    }
    for name, group in groups.items():
        try:
            results += group()
        except Exception as e:  # report, so that pytest shows which group broke
            import traceback

            traceback.print_exc()
            results.append({"name": f"{name}-crashed", "ok": False, "detail": repr(e)})
            if name == "runner":
                results.append({"name": "graphs-crashed", "ok": False, "detail": repr(e)})
    print(json.dumps(results))


if __name__ == "__main__":
    _main(Path(sys.argv[1]))
