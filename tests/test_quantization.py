"""Quantized models on the native backend: checkpoint layouts, quantization at load, the CPU
kernel, what the probes say, and bad checkpoints.

Each layout's checkpoint is written from one small random-weight Llama by
`enginehouse_pytorch.native.quant.checkpoints` (packing field by field, as the formats' tools
do) together with a float copy holding exactly the dequantized weights. The quantized run must
agree with transformers on that copy: the kernels multiply float32 activations with exactly
decoded weights, so logits differ only by float32 summation order (TOL, as for float models), and
greedy tokens are equal. Quantization at load is checked the same way, against a float copy of
what it made. The Triton kernel is checked under its interpreter in test_quant_triton.py.
"""

from __future__ import annotations

import functools
import json
import random
import re
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from pydantic import ValidationError
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

from enginehouse import GenerationConfig, ScheduledBatch, SeqChunk, explain, pipeline
from enginehouse import cli as cli_module
from enginehouse.errors import BackendError, InvalidModelError
from enginehouse.testing import TINY, build_model
from enginehouse_pytorch.native.quant import checkpoints, cpu_kernel, formats, qweight
from enginehouse_pytorch.native.quant.checks import cpu_case, random_weight
from enginehouse_pytorch.native.quant.scheme import read_scheme

SHAPE = dict(TINY, hidden_size=128, intermediate_size=256, vocab_size=512)  # groups of 32..128
TOL = dict(rtol=1e-4, atol=1e-4)

# name -> (format, options): every layout, with the variants that change how it is read.
CASES = {
    "gptq4-sym": ("gptq", dict(bits=4, group=32)),
    "gptq4-act-order": ("gptq", dict(bits=4, group=32, sym=False, desc_act=True)),
    "gptq8-v2-channel": ("gptq", dict(bits=8, group=-1, sym=False, v1=False)),
    "awq": ("awq", dict(group=64)),
    "ct4-asym-actorder": ("compressed", dict(bits=4, group=32, sym=False, actorder=True)),
    "ct8-channel": ("compressed", dict(bits=8, group=-1)),
    "fp8-blocks": ("fp8", dict(block=(128, 128))),
    "fp8-tensor": ("fp8", dict(block=None)),
}
PROMPT = random.Random(0).choices(range(5, 512), k=40)
GREEDY = [
    (random.Random(i).choices(range(5, 512), k=n), m)
    for i, (n, m) in enumerate([(7, 12), (33, 8), (18, 10)])
]


def fixed(n: int) -> GenerationConfig:
    return GenerationConfig(max_new_tokens=n, min_new_tokens=n)


@pytest.fixture(scope="module")
def float_llama(models_dir) -> Path:
    return build_model(
        models_dir / "quant-llama", LlamaConfig(**SHAPE, bos_token_id=1, eos_token_id=2)
    )


@pytest.fixture(scope="module")
def quantized(float_llama, models_dir):
    """name -> (quantized checkpoint, its dequantized float copy), written on first use."""

    @functools.cache
    def write(name: str) -> tuple[Path, Path]:
        fmt, options = CASES[name]
        return checkpoints.write(float_llama, models_dir / f"quant-{name}", fmt, **options)

    return write


def reference(folder: Path):
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def prefill_logits(pipe, ids: list[int]) -> torch.Tensor:
    runner = pipe.runner
    bs = runner.kv_spec.block_size
    table = tuple(range(-(-len(ids) // bs)))
    chunk = SeqChunk(0, tuple(ids), 0, table, tuple(range(len(ids))))
    return runner.execute(ScheduledBatch((chunk,), bs))


def open_pipe(path, **config):
    config.setdefault("enable_prefix_caching", False)
    return pipeline(str(path), backend="pytorch", engine_config=config, progress=False)


def check_against(pipe, ref) -> None:
    """Logits at every prompt position, then greedy tokens alone and in one batch."""
    with torch.no_grad():
        want = ref(torch.tensor([PROMPT])).logits[0]
    torch.testing.assert_close(prefill_logits(pipe, PROMPT), want, **TOL)
    expected = []
    for ids, n in GREEDY:
        x = torch.tensor([ids])
        out = ref.generate(
            x,
            attention_mask=torch.ones_like(x),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
        )
        expected.append(out[0, len(ids) :].tolist())
    assert all(len(set(e)) >= 3 for e in expected), "degenerate reference answers"
    assert [pipe({"token_ids": ids}, fixed(n)).token_ids for ids, n in GREEDY] == expected
    batched = pipe([{"token_ids": ids} for ids, _ in GREEDY], [fixed(n) for _, n in GREEDY])
    assert [r.token_ids for r in batched] == expected


# --- 1. packing and unpacking ---------------------------------------------------------------


def test_unpack_reads_the_documented_bit_layouts():
    word = torch.tensor([[0x76543210]], dtype=torch.int32)  # fields 0..7, lowest first
    assert formats.unpack(word, 4, 1).tolist() == [list(range(8))]
    assert formats.unpack(torch.tensor([0x04030201], dtype=torch.int32), 8, 0).tolist() == [
        1,
        2,
        3,
        4,
    ]
    # AWQ: field i holds output (0, 2, 4, 6, 1, 3, 5, 7)[i]; outputs 0..7 valued 0..7:
    awq = torch.tensor([[0x75316420]], dtype=torch.int32)
    tensors = {
        "qweight": awq,
        "qzeros": awq.clone(),
        "scales": torch.ones(1, 8, dtype=torch.float16),
    }
    scheme = read_scheme(
        {"quantization_config": {"quant_method": "awq", "bits": 4, "group_size": 1}}
    )
    qw = formats.awq(tensors, scheme, 8, 1, "x")
    assert qw.codes.flatten().tolist() == list(range(8))


@pytest.mark.parametrize("name", list(CASES))
def test_reader_inverts_the_writer(name):
    fmt, options = CASES[name]
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(1)) * 0.05
    tensors, dequantized = checkpoints.WRITERS[fmt](w, **options)
    config = {"quantization_config": checkpoints.quantization_config(fmt, **options)}
    qw = formats.read(tensors, read_scheme(config), 64, 256, "model.layers.0.mlp.up_proj")
    assert torch.equal(qw.dequantize(), dequantized)
    assert (qw.perm is not None) == bool(options.get("desc_act") or options.get("actorder"))


@pytest.mark.parametrize("kind", ["u8", "u4", "f8"])
@pytest.mark.parametrize("layout", ["panels", "columns"])
def test_kernel_layouts_hold_the_same_weights(kind, layout):
    qw = random_weight(kind, 40, 64, 32, asym=kind != "f8", perm=kind == "u4")
    w = qw.dequantize()
    packed = qweight.pack(qw, layout)
    inputs = qw.perm if qw.perm is not None else torch.arange(64)
    torch.testing.assert_close(packed.dequantize(), w[:, inputs], rtol=0, atol=1e-6)


def test_quantization_at_load_is_within_half_a_step():
    w = torch.randn(48, 128, generator=torch.Generator().manual_seed(2))
    q8 = qweight.quantize_int8(w)
    assert (w - q8.dequantize()).abs().max() <= q8.scales.max() / 2 + 1e-6
    q4 = qweight.quantize_int4(w, 32)
    step = q4.scales.abs().repeat_interleave(32, dim=1)
    # Q4_0: the largest magnitude maps to -8 exactly; the other side may clip at +7 by a step.
    assert ((w - q4.dequantize()).abs() <= step * 1.0 + 1e-6).all()
    assert int(q4.codes.max()) <= 15


# --- 2. the CPU kernel ----------------------------------------------------------------------

KERNEL_CASES = [
    ("u8", 40, 64, 64, False, False),
    ("u8", 100, 96, 32, True, False),
    ("u4", 37, 128, 32, True, True),
    ("u4", 64, 64, 64, False, False),
    ("f8", 50, 128, 128, False, False),
    ("u4", 24, 640, 128, True, False),  # chunks of 256 inputs span groups
    ("u8", 20, 1376, 1376, False, True),  # per channel, the 56M shape's down_proj input
]


@pytest.mark.skipif(not cpu_kernel.load(), reason="no C++ toolchain to build the kernel")
@pytest.mark.parametrize("rows", [1, 3, 32])
@pytest.mark.parametrize("kind,n,k,group,asym,perm", KERNEL_CASES)
def test_cpu_kernel_matches_float_matmul(kind, n, k, group, asym, perm, rows):
    qw = random_weight(kind, n, k, group, asym, perm)
    assert cpu_case(qw, rows, bias=rows != 3) <= 1e-5


@pytest.mark.skipif(not cpu_kernel.load_avx2(), reason="no compiler for the AVX2 variant")
def test_cpu_kernel_avx2_path_matches_float_matmul():
    """The path an AVX2-only CPU runs, built with -mno-avx512f (on such a CPU it is the
    native build itself)."""
    assert cpu_kernel.ops(cpu_kernel.AVX2_NAMESPACE).path() == "avx2"
    for kind, n, k, group, asym, perm in KERNEL_CASES:
        qw = random_weight(kind, n, k, group, asym, perm)
        for rows in (1, 3, 32):
            assert cpu_case(qw, rows, True, cpu_kernel.AVX2_NAMESPACE) <= 1e-5, (kind, rows)


def test_failed_build_falls_back_to_the_torch_path(float_llama, tmp_path, monkeypatch):
    from enginehouse_pytorch.native import cpu_build

    monkeypatch.setenv("ENGINEHOUSE_CPU_KERNELS", "0")  # as if no compiler: nothing is built
    assert not cpu_build.build(cpu_kernel.NAMESPACE, cpu_kernel.SOURCE, "test kernel")
    monkeypatch.setattr(cpu_kernel, "load", lambda: False)  # load() caches its first answer
    float_copy = float_copy_of_load_quantization(
        float_llama, tmp_path / "int8", qweight.quantize_int8
    )
    with pipeline(str(float_llama), engine_config={"quantization": "int8"}, progress=False) as pipe:
        assert pipe.runner.model.lm_head.kernel == "torch"
        check_against(pipe, reference(float_copy))


# --- 3. checkpoints end to end --------------------------------------------------------------


@pytest.mark.parametrize("name", list(CASES))
def test_quantized_checkpoint_matches_transformers_on_its_float_copy(name, quantized):
    folder, float_copy = quantized(name)
    with open_pipe(folder) as pipe:
        assert pipe.backend == "pytorch"
        layer = pipe.runner.model.model.layers[0].self_attn.qkv_proj
        assert type(layer).__name__ == "QuantLinear" and layer.kernel in ("cpu", "torch")
        check_against(pipe, reference(float_copy))


def test_qwen2_with_bias_and_tied_embeddings(models_dir):
    config = Qwen2Config(**SHAPE, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    src = build_model(models_dir / "quant-qwen2", config)
    # transformers leaves biases at 0: make them matter.
    tensors = load_file(src / "model.safetensors")
    for name in [n for n in tensors if n.endswith("_proj.bias")]:
        tensors[name] = torch.randn(tensors[name].shape) * 0.2
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    folder, float_copy = checkpoints.write(
        src, models_dir / "quant-qwen2-gptq", "gptq", bits=4, group=64, sym=False
    )
    with open_pipe(folder) as pipe:
        check_against(pipe, reference(float_copy))


def float_copy_of_load_quantization(src: Path, dst: Path, quantize) -> Path:
    """`src` with every projection and the head replaced by what `quantize` makes of it."""
    shutil.copytree(src, dst)
    tensors = load_file(src / "model.safetensors")
    for name, t in tensors.items():
        if name.endswith("_proj.weight") or name == "lm_head.weight":
            tensors[name] = quantize(t).dequantize().contiguous()
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantization_at_load_matches_transformers_on_the_same_weights(mode, float_llama, tmp_path):
    quantize = qweight.quantize_int8 if mode == "int8" else lambda w: qweight.quantize_int4(w, 32)
    float_copy = float_copy_of_load_quantization(float_llama, tmp_path / mode, quantize)
    # A plain dict, as `pipeline(..., engine_config={"quantization": "int8"})` takes it.
    with pipeline(str(float_llama), engine_config={"quantization": mode}, progress=False) as pipe:
        assert pipe.backend == "pytorch"
        assert type(pipe.runner.model.lm_head).__name__ == "QuantLinear"
        check_against(pipe, reference(float_copy))


# --- 4. what explain and the probes say ---------------------------------------------------


def verdicts(report) -> dict:
    return {v["backend"]: v for v in report["verdicts"]}


def test_explain_names_the_quantization_and_the_weights_memory(quantized):
    folder, _ = quantized("gptq4-act-order")
    report = explain(str(folder))
    assert report["chosen"] == "pytorch"
    assert report["facts"]["quantization"] == "gptq 4-bit, group 32"
    native = verdicts(report)["pytorch"]["reason"]
    assert "GPTQ 4-bit, group 32, asymmetric (zero points), act-order (g_idx)" in native
    assert "weights about" in native and "MiB" in native
    result = CliRunner().invoke(cli_module.cli, ["explain", str(folder)])
    assert result.exit_code == 0, result.output
    assert "quantized:    gptq 4-bit, group 32" in result.output
    fp8 = explain(str(quantized("fp8-blocks")[0]))["facts"]["quantization"]
    assert fp8 == "fp8, blocks 128x128"


def test_other_backends_say_whether_they_take_the_format(quantized, float_llama):
    folder, _ = quantized("awq")
    report = verdicts(explain(str(folder)))
    assert not report["onnxruntime"]["supported"]
    assert "quantized checkpoint (awq)" in report["onnxruntime"]["reason"]
    hf = report["transformers"]
    assert hf["supported"] or "not installed" in hf["reason"]
    at_load = verdicts(explain(str(float_llama), engine_config={"quantization": "int8"}))
    assert at_load["pytorch"]["supported"]
    assert "int8 weight-only at load (per output channel" in at_load["pytorch"]["reason"]
    for name in ("transformers", "onnxruntime", "tensorrt"):
        assert not at_load[name]["supported"]
        assert "quantization='int8'" in at_load[name]["reason"]


# --- 5. bad inputs ------------------------------------------------------------------------


def rewrite_config(src: Path, dst: Path, change) -> Path:
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    change(config["quantization_config"])
    (dst / "config.json").write_text(json.dumps(config))
    return dst


@pytest.mark.parametrize(
    "change,message",
    [
        (
            lambda q: q.update(quant_method="bitnet-ish"),
            "quant_method 'bitnet-ish' is not supported natively",
        ),
        (
            lambda q: q.update(bits=3),
            "GPTQ with quantization_config.bits=3 is not supported natively",
        ),
        (
            lambda q: q.update(group_size=48),
            "group size 48 does not divide 128, the input size of qkv_proj",
        ),
    ],
    ids=["unknown-method", "bits", "group-size"],
)
def test_unrunnable_quantization_config_is_refused_with_the_field(
    change, message, quantized, tmp_path
):
    folder = rewrite_config(quantized("gptq4-sym")[0], tmp_path / "bad", change)
    report = verdicts(explain(str(folder)))
    assert not report["pytorch"]["supported"]
    assert message in report["pytorch"]["reason"]
    with pytest.raises(BackendError, match=re.escape(message)):
        pipeline(str(folder), backend="pytorch", progress=False)


def test_unknown_method_is_named_by_every_backend(quantized, tmp_path):
    folder = rewrite_config(
        quantized("gptq4-sym")[0], tmp_path / "bad", lambda q: q.update(quant_method="foo")
    )
    with pytest.raises(BackendError) as err:
        pipeline(str(folder), progress=False)
    assert "quant_method 'foo' is not supported natively" in str(err.value)
    assert "transformers has no quantizer for quant_method 'foo'" in str(err.value)


@pytest.mark.parametrize("missing", ["qzeros", "scales"])
def test_missing_tensor_is_named_and_the_intact_checkpoint_still_serves(
    missing, quantized, tmp_path
):
    source, _ = quantized("gptq4-sym")
    folder = tmp_path / "broken"
    shutil.copytree(source, folder)
    tensors = load_file(folder / "model.safetensors")
    name = f"model.layers.1.self_attn.k_proj.{missing}"
    tensors.pop(name)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(InvalidModelError, match=f"lacks {name.replace('.', '[.]')} "):
        pipeline(str(folder), backend="pytorch", progress=False)
    with open_pipe(source) as pipe:  # nothing left behind: the intact one loads and serves
        assert len(pipe({"token_ids": PROMPT[:5]}, fixed(3)).token_ids) == 3


def test_tensor_of_the_wrong_shape_is_named_with_both_shapes(quantized, tmp_path):
    folder = tmp_path / "shape"
    shutil.copytree(quantized("awq")[0], folder)
    tensors = load_file(folder / "model.safetensors")
    name = "model.layers.0.mlp.down_proj.scales"
    tensors[name] = tensors[name][:, :100].contiguous()
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(InvalidModelError) as err:
        pipeline(str(folder), backend="pytorch", progress=False)
    assert name in str(err.value) and "(4, 100)" in str(err.value) and "(4, 128)" in str(err.value)


def test_bad_engine_settings_are_refused(quantized, tmp_path):
    with pytest.raises(ValidationError, match="48 is not a group size int4 takes"):
        pipeline(str(quantized("awq")[0]), engine_config={"quantization_group_size": 48})
    report = verdicts(explain(str(quantized("awq")[0]), engine_config={"quantization": "int8"}))
    assert "already quantized (awq); drop quantization='int8'" in report["pytorch"]["reason"]


def test_mixture_of_experts_is_refused(models_dir):
    from enginehouse.testing import native_model_configs

    src = build_model(models_dir / "quant-mixtral", native_model_configs(512)["mixtral"])
    native = verdicts(explain(str(src), engine_config={"quantization": "int4"}))["pytorch"]
    assert not native["supported"] and "mixture-of-experts" in native["reason"]
