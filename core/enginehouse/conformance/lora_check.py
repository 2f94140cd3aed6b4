"""The LoRA check, for a runner that declares `RunnerCapabilities(lora=True)`: an adapter
(random A and B on q, v and down projections, made here, no PEFT needed) loaded into slot 1,
and one batch mixing a chunk with it and a chunk of the base model. The adapter's rows must
equal transformers' model with the adapter merged into its weights (W + scale * B A), the base
rows the model as it is; after `unload_adapter`, slot 1's rows are the base model's again."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import Any

import torch

from ..adapters import BaseShape, LoraAdapter, LoraModule
from ..runner import capabilities_of
from .compare import compare_rows
from .model_checks import _prompt_ids
from .result import NotApplicable
from .target import Target

TARGETS = {"q_proj": "self_attn", "v_proj": "self_attn", "down_proj": "mlp"}
RANK, ALPHA = 4, 8.0


def make_adapter(config: dict[str, Any], seed: int = 0) -> LoraAdapter:
    shape = BaseShape.from_config(config)
    g = torch.Generator().manual_seed(seed)
    modules = []
    for layer in range(shape.num_layers):
        for name in TARGETS:
            n_in, n_out = shape.sizes(name)
            a = torch.randn(RANK, n_in, generator=g) * 0.3
            b = torch.randn(n_out, RANK, generator=g) * 0.3
            modules.append(LoraModule(layer, name, a, b))
    return LoraAdapter("kit", "(made by the conformance kit)", RANK, ALPHA / RANK, modules)


@contextlib.contextmanager
def merged(reference: Any, adapter: LoraAdapter) -> Iterator[None]:
    """transformers' model with the adapter merged into its weights, for the block."""
    layers = reference.model.layers
    saved = []
    with torch.no_grad():
        for m in adapter.modules:
            linear = getattr(getattr(layers[m.layer], TARGETS[m.name]), m.name)
            saved.append((linear, linear.weight.detach().clone()))
            linear.weight += adapter.scale * (m.b @ m.a).to(linear.weight.dtype)
    try:
        yield
    finally:
        with torch.no_grad():
            for linear, weight in saved:
                linear.weight.copy_(weight)


def hf_lora(t: Target, reference: Any) -> str:
    runner = t.runner
    if not capabilities_of(runner).lora:
        raise NotApplicable("the runner takes no LoRA adapters (RunnerCapabilities.lora)")
    adapter = make_adapter(t.spec.config)
    runner.load_adapter(1, adapter)  # type: ignore[attr-defined]
    try:
        ids = _prompt_ids(t)[:2]
        d = t.driver()
        with torch.inference_mode():
            base_want = reference(torch.tensor([ids[1]])).logits[0].float()
            with merged(reference, adapter):
                lora_want = reference(torch.tensor([ids[0]])).logits[0].float()
        a, b = d.new(ids[0], "adapter"), d.new(ids[1], "base")
        with_adapter = dataclasses.replace(d.chunk(a, logits_at=range(len(ids[0]))), adapter=1)
        rows = d.step([(a, with_adapter), (b, d.chunk(b, logits_at=range(len(ids[1]))))])
        compare_rows(rows[0], lora_want, t.tolerance, "adapter in slot 1, position = row")
        compare_rows(rows[1], base_want, t.tolerance, "base model beside it, position = row")
        d.release(a)
        d.release(b)
    finally:
        runner.unload_adapter(1)  # type: ignore[attr-defined]
    d = t.driver()
    c = d.new(ids[1], "slot 1 after unload")
    chunk = dataclasses.replace(d.chunk(c, logits_at=range(len(ids[1]))), adapter=1)
    (rows,) = d.step([(c, chunk)])
    d.release(c)
    compare_rows(rows, base_want, t.tolerance, "slot 1 after unload_adapter, position = row")
    return (
        f"rank {RANK} on {', '.join(TARGETS)}: = transformers with it merged, beside a base "
        f"chunk in one batch; unloaded = base ({t.tolerance})"
    )
