"""The ONNX export against transformers: the exported graph, run by a real onnxruntime session,
gives the transformers model's logits (float32, tight tolerance) for a left-padded batch of
prompts and several decode steps fed back through its KV outputs, as any ONNX tool would run it.

Every natively implemented family is exported once (module scope): they differ in what the graph
must get right (GQA, biases, qk-norm, sliding windows, soft-capping, LongRoPE, experts).
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM, GPT2Config

from enginehouse import cli as cli_module
from enginehouse.testing import build_model, native_model_configs
from enginehouse_tensorrt.export import UnsupportedExport, export_onnx

CONFIGS = native_model_configs(512)
FAMILIES = list(CONFIGS)
TOL = dict(rtol=1e-4, atol=1e-4)
DECODE_STEPS = 3


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """family -> (model folder, model.onnx), built and exported once per family."""
    root = tmp_path_factory.mktemp("onnx-export")
    out = {}
    for family, config in CONFIGS.items():
        folder = build_model(root / family, config)
        out[family] = folder, export_onnx(folder, root / f"{family}-onnx")
    return out


def session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def left_padded(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ids, attention_mask, position_ids of a left-padded batch, as generate() builds them."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


@torch.no_grad()
def reference_logits(model, ids, mask, positions) -> torch.Tensor:
    return model(input_ids=ids, attention_mask=mask, position_ids=positions).logits


def empty_past(sess: ort.InferenceSession, batch: int) -> dict[str, np.ndarray]:
    past = {}
    for i in sess.get_inputs():
        if i.name.startswith("past_key_values."):
            _, kv_heads, _, head_dim = i.shape
            past[i.name] = np.zeros((batch, kv_heads, 0, head_dim), dtype=np.float32)
    return past


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_equal_transformers_prefill_then_decode_batched(family, exported):
    folder, path = exported[family]
    ref = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    sess = session(path)
    rng = random.Random(family)
    # Different lengths, so rows are padded; 37 crosses Mistral's 32-token window.
    prompts = [rng.choices(range(5, 512), k=n) for n in (5, 37, 12)]
    ids, mask, positions = left_padded(prompts)
    feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": positions}
    out = sess.run(None, {**{k: v.numpy() for k, v in feeds.items()}, **empty_past(sess, 3)})
    want = reference_logits(ref, ids, mask, positions)
    real = mask.bool()
    torch.testing.assert_close(torch.from_numpy(out[0])[real], want[real], **TOL)

    names = [o.name for o in sess.get_outputs()]
    for step in range(DECODE_STEPS):
        nxt = torch.from_numpy(out[0][:, -1]).argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
        mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
        positions = positions[:, -1:] + 1
        past = {n.replace("present", "past_key_values"): v for n, v in zip(names[1:], out[1:])}
        decode = {"input_ids": nxt, "attention_mask": mask, "position_ids": positions}
        out = sess.run(None, {**{k: v.numpy() for k, v in decode.items()}, **past})
        full = reference_logits(ref, ids, mask, (mask.cumsum(-1) - 1).clamp(min=0))
        torch.testing.assert_close(
            torch.from_numpy(out[0][:, 0]), full[:, -1], **TOL, msg=f"decode step {step}"
        )
        assert out[1].shape[2] == ids.shape[1]  # present = past + the new token


def test_graph_has_the_standard_decoder_interface(exported):
    _, path = exported["llama"]
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    layers = CONFIGS["llama"].num_hidden_layers
    kv = [f"{i}.{x}" for i in range(layers) for x in ("key", "value")]
    inputs = [i.name for i in model.graph.input]
    outputs = [o.name for o in model.graph.output]
    assert inputs == ["input_ids", "attention_mask", "position_ids"] + [
        f"past_key_values.{n}" for n in kv
    ]
    assert outputs == ["logits"] + [f"present.{n}" for n in kv]

    def dims(value):
        return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]

    by_name = {v.name: v for v in [*model.graph.input, *model.graph.output]}
    assert dims(by_name["input_ids"]) == ["batch", "new_tokens"]
    assert dims(by_name["attention_mask"]) == ["batch", "total_tokens"]
    assert dims(by_name["past_key_values.0.key"]) == ["batch", 2, "past_tokens", 16]
    assert dims(by_name["present.0.key"]) == ["batch", 2, "total_tokens", 16]
    assert dims(by_name["logits"]) == ["batch", "new_tokens", 512]


def test_export_in_half_precision_declares_it(exported, tmp_path):
    # The graph runs in the precision it was exported in (TensorRT networks are strongly typed).
    folder, _ = exported["qwen2"]
    path = export_onnx(folder, tmp_path / "fp16", dtype="float16")
    model = onnx.load(str(path))
    types = {
        v.name: v.type.tensor_type.elem_type for v in [*model.graph.input, *model.graph.output]
    }
    assert types["past_key_values.0.key"] == onnx.TensorProto.FLOAT16
    assert types["logits"] == onnx.TensorProto.FLOAT16
    assert types["input_ids"] == onnx.TensorProto.INT64
    with pytest.raises(
        ValueError, match="cannot export in 'bfloat16'; use one of float32, float16"
    ):
        export_onnx(folder, tmp_path / "bf16", dtype="bfloat16")


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory) -> Path:
    config = GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=512, n_positions=64)
    return build_model(tmp_path_factory.mktemp("gpt2") / "gpt2", config)


def test_export_of_an_unsupported_family_names_it_and_what_is_supported(gpt2_dir, tmp_path):
    with pytest.raises(UnsupportedExport) as info:
        export_onnx(gpt2_dir, tmp_path / "out")
    message = str(info.value)
    assert "GPT2LMHeadModel" in message and "'gpt2'" in message
    assert "Exportable:" in message and "LlamaForCausalLM" in message
    assert not (tmp_path / "out" / "model.onnx").exists()


def invoke(args: list[str]):
    cli_module._load_plugin_commands()  # as `enginehouse` does at start-up, from entry points
    return CliRunner().invoke(cli_module.cli, args)


def test_cli_export_writes_a_graph_onnxruntime_runs(exported, tmp_path):
    folder, _ = exported["llama"]
    result = invoke(["tensorrt", "export", str(folder), "-o", str(tmp_path / "cli")])
    assert result.exit_code == 0, result.output
    assert "model.onnx" in result.output
    sess = session(tmp_path / "cli" / "model.onnx")
    ids = np.array([[7, 8, 9]])
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": ids - 7}
    logits = sess.run(["logits"], {**feeds, **empty_past(sess, 1)})[0]
    assert logits.shape == (1, 3, 512) and np.isfinite(logits).all()


def test_cli_export_of_an_unsupported_family_is_one_clear_line(gpt2_dir, tmp_path):
    result = invoke(["tensorrt", "export", str(gpt2_dir), "-o", str(tmp_path / "x")])
    assert result.exit_code == 1
    assert "cannot export GPT2LMHeadModel" in result.output
    assert "Traceback" not in result.output
