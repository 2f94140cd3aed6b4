"""Model checks: the runner's logits and greedy tokens against transformers' own, on a small
random-weight model (float32 on both sides, the tolerance of the project's own tests)."""

from __future__ import annotations

from typing import Any

import torch

from ..testing import WORDS, hf_greedy
from .compare import compare_rows
from .result import Mismatch, NotApplicable
from .target import NEW_TOKENS, Target

PROMPTS = (
    " ".join(WORDS[:9]),  # the a engine model ...
    " ".join(WORDS[-12:-3]),  # the multi-byte words
    "hello world",
)


def load_reference(t: Target) -> Any:
    """transformers' model of the same folder, or NotApplicable saying why there is none."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(
            t.spec.path, dtype=torch.float32, trust_remote_code=t.config.trust_remote_code
        )
    except Exception as e:  # noqa: BLE001 - any refusal means there is nothing to compare with
        first = (str(e).strip().splitlines() or [""])[0].split(". ")[0]
        reason = f"transformers cannot load this model ({type(e).__name__}: {first})"
        raise NotApplicable(reason) from None
    return model.eval()


def _prompt_ids(t: Target) -> list[list[int]]:
    return [t.tokenizer(p).input_ids for p in PROMPTS]


def hf_logits(t: Target, reference: Any) -> str:
    d = t.driver()
    for i, ids in enumerate(_prompt_ids(t)):
        seq = d.new(ids, f"prompt {i}")
        (rows,) = d.step([(seq, d.chunk(seq, logits_at=range(len(ids))))])
        d.release(seq)
        with torch.inference_mode():
            want = reference(torch.tensor([ids])).logits[0].float()
        compare_rows(rows, want, t.tolerance, f"prompt {i} ({len(ids)} tokens), position = row")
    return f"{len(PROMPTS)} prompts, logits at every position ({t.tolerance})"


def hf_greedy_tokens(t: Target, reference: Any) -> str:
    if t.runner.kv_spec.dtype != torch.float32:
        raise NotApplicable(
            f"the runner computes in {t.runner.kv_spec.dtype}; greedy tokens are compared with "
            "transformers in float32 only (pass dtype float32)"
        )
    # transformers' generate masks EOS for min_new_tokens; so does the driver here.
    d = t.driver(banned=tuple(t.engine.eos_ids))  # type: ignore[union-attr]
    ids = _prompt_ids(t)
    labels = [f"prompt {i}" for i in range(len(ids))]
    runs = {
        "alone": [d.alone(p, NEW_TOKENS, label) for p, label in zip(ids, labels)],
        "in one batch": d.together(ids, NEW_TOKENS, labels),
    }
    for i, prompt in enumerate(PROMPTS):
        want = hf_greedy(reference, t.tokenizer, prompt, NEW_TOKENS)
        for how, seqs in runs.items():
            got = seqs[i].generated
            if got != want:
                j = next(j for j, (a, b) in enumerate(zip(got, want)) if a != b)
                raise Mismatch(
                    f"prompt {i} {how}, generated token {j} (position {len(ids[i]) + j}): "
                    f"transformers' generate gives {want[j]}, the runner {got[j]} "
                    f"(tokens {got}, transformers {want})"
                )
    return f"{len(PROMPTS)} prompts x {NEW_TOKENS} tokens = generate's, alone and in one batch"
