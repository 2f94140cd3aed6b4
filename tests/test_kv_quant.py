"""A quantized KV cache (`kv_cache_dtype="int8" | "fp8"`) on the native backend, against the
float cache of the same model: bytes per token, logits within a stated tolerance, greedy
agreement measured (teacher-forced argmax, and free-running tokens).

Measured on the small random Llama below (float32, head_dim 16, 61-token prompt then 30
decode steps; logits up to about 7): int8 decode logits within 0.19 of the float cache's,
argmax equal at 30 of 31 positions, and 98 of 128 free-running greedy tokens equal over four
prompts; fp8 (e4m3, per-tensor scales) within 0.97, argmax equal at 28 of 31 positions, and
its free-running answers diverge early (19 of 128 tokens). The tolerances below leave room
over those numbers. A prefill reads its own K/V in full precision: its logits are unchanged.
"""

from __future__ import annotations

import random

import pydantic
import pytest
import torch

from enginehouse import EngineConfig, GenerationConfig, ScheduledBatch, SeqChunk, pipeline
from enginehouse.testing import build_model, native_model_configs

LOGIT_TOL = {"int8": 0.3, "fp8": 1.5}  # the largest |logit difference| allowed
ARGMAX_AGREEMENT = {"int8": 0.9, "fp8": 0.8}  # teacher-forced, at least


def tokens(n: int, seed: int) -> list[int]:
    return random.Random(seed).choices(range(5, 512), k=n)


@pytest.fixture(scope="module")
def llama(models_dir):
    return build_model(models_dir / "kv-quant-llama", native_model_configs(512)["llama"])


def open_pipe(path, kind: str, **config):
    config = dict(kv_cache_dtype=kind, enable_prefix_caching=False, **config)
    return pipeline(str(path), backend="pytorch", engine_config=config, progress=False)


def test_an_unknown_kv_cache_dtype_is_refused():
    with pytest.raises(pydantic.ValidationError, match="'auto', 'int8' or 'fp8'"):
        EngineConfig(kv_cache_dtype="int4")


def test_bytes_per_token():
    from enginehouse_pytorch.native.kv_quant import head_bytes

    # head_dim 128: int8 (and its float32 scale) is about half of bfloat16, fp8 half exactly,
    # and a quarter of float32.
    assert head_bytes("int8", 128, torch.bfloat16) == 132
    assert head_bytes("fp8", 128, torch.bfloat16) * 2 == head_bytes("auto", 128, torch.bfloat16)
    assert head_bytes("fp8", 128, torch.float32) * 4 == head_bytes("auto", 128, torch.float32)


@torch.no_grad()
def teacher_forced(pipe, ids: list[int], prompt: int) -> torch.Tensor:
    """Logits of the prompt's last position, then of each later token decoded one at a time."""
    runner = pipe.runner
    bs = runner.kv_spec.block_size
    table = tuple(range(-(-len(ids) // bs)))
    chunk = SeqChunk(0, tuple(ids[:prompt]), 0, table, (prompt - 1,))
    out = [runner.execute(ScheduledBatch((chunk,), bs))]
    for pos in range(prompt, len(ids)):
        chunk = SeqChunk(0, (ids[pos],), pos, table, (0,))
        out.append(runner.execute(ScheduledBatch((chunk,), bs)))
    return torch.cat(out)


@pytest.mark.parametrize("kind", ["int8", "fp8"])
def test_logits_and_greedy_agreement_against_the_float_cache(llama, kind):
    prompts = [tokens(n, seed=10 + i) for i, n in enumerate([7, 23, 40, 61])]
    fixed = GenerationConfig(max_new_tokens=32, min_new_tokens=32)
    with open_pipe(llama, "auto") as pipe:
        want = [r.token_ids for r in pipe([{"token_ids": p} for p in prompts], fixed)]
        ids = prompts[3] + want[3][:30]
        reference = teacher_forced(pipe, ids, len(prompts[3]))
        float_bytes = pipe.runner.kv_spec.bytes_per_block
    with open_pipe(llama, kind) as pipe:
        assert pipe.runner.kv_spec.cache_dtype == kind
        # float32, head_dim 16: fp8 a quarter, int8 (16 + 4 bytes a head) 20/64.
        ratio = {"int8": 20 / 64, "fp8": 1 / 4}[kind]
        assert pipe.runner.kv_spec.bytes_per_block == float_bytes * ratio
        got = teacher_forced(pipe, ids, len(prompts[3]))
        answers = [r.token_ids for r in pipe([{"token_ids": p} for p in prompts], fixed)]
        assert pipe.stats()["kv_blocks_used"] == 0
    torch.testing.assert_close(got[0], reference[0], rtol=1e-4, atol=1e-4)  # the prefill
    assert (got - reference).abs().max() < LOGIT_TOL[kind]
    agreement = (got.argmax(-1) == reference.argmax(-1)).float().mean().item()
    assert agreement >= ARGMAX_AGREEMENT[kind], agreement
    same = sum(a == b for x, y in zip(answers, want) for a, b in zip(x, y))
    assert same >= len(want[0]) // 4  # at least the first tokens of the answers agree


def test_the_command_line_takes_and_checks_kv_cache_dtype(llama):
    from click.testing import CliRunner

    from enginehouse import cli

    ok = CliRunner().invoke(cli.cli, ["explain", str(llama), "--kv-cache-dtype", "int8"])
    assert ok.exit_code == 0, ok.output
    assert "B/token (int8, a scale per token and head)" in ok.output
    bad = CliRunner().invoke(cli.cli, ["explain", str(llama), "--kv-cache-dtype", "int4"])
    assert bad.exit_code != 0
    assert "'int4' is not one of 'auto', 'int8', 'fp8'" in bad.output


def test_a_backend_keeping_a_float_cache_is_refused(llama):
    from enginehouse.errors import BackendError

    with pytest.raises(BackendError, match="quantized KV cache is the native pytorch backend's"):
        pipeline(
            str(llama),
            backend="transformers",
            engine_config={"kv_cache_dtype": "int8"},
            progress=False,
        )


@pytest.mark.parametrize("window", [None, 7])
def test_the_cpu_kernel_reads_int8_as_the_torch_path_does(window):
    from enginehouse_pytorch.native import cpu_kernels
    from enginehouse_pytorch.native.attention import StepMeta, decode_metadata
    from enginehouse_pytorch.native.kv_quant import QuantizedAttention, quantize_int8

    if not cpu_kernels.load():
        pytest.skip("the C++ CPU kernels are not built here")
    gen = torch.Generator().manual_seed(0)
    kvh, g, d, bs, blocks = 2, 3, 32, 4, 12
    slots = blocks * bs + 2
    (kq, ks), (vq, vs) = (quantize_int8(torch.randn(slots, kvh, d, generator=gen)) for _ in "kv")
    cache = tuple(x.transpose(0, 1).contiguous() for x in (kq, vq, ks, vs))
    for t in cache:
        t[:, blocks * bs].zero_()  # the null slot padding reads
    tables = [(3, 7, 1), (0,), (11, 2, 5, 9)]
    lens = [10, 2, 15]
    q = torch.randn(3, kvh * g, d, generator=gen)
    mine = cpu_kernels.CpuInt8Attention(kvh * g, kvh, d, d**-0.5)
    torch_path = QuantizedAttention(kvh * g, kvh, d, d**-0.5)
    results = []
    for attn, paged in ((mine, True), (torch_path, False)):
        meta = StepMeta(3, torch.zeros(3, dtype=torch.long), torch.zeros(1), torch.zeros(1))
        decode_metadata(
            meta, tables, lens, bs, {window}, torch.device("cpu"), blocks * bs, paged, kvh, slots
        )
        results.append(attn.decode(meta, q, cache, window, None))
    torch.testing.assert_close(results[0], results[1], rtol=1e-5, atol=1e-5)
