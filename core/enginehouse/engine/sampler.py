"""Pick the next token of every row: torch code in the core, so every backend samples alike.

Order follows transformers: penalties, then temperature, top-k, top-p and min-p. Each seeded
request draws from its own generator, so its tokens do not depend on what it is batched with.
Rows of constrained requests (grammar.py) get their grammar's token mask after the penalties;
a batch without them does no grammar work at all.
"""

from __future__ import annotations

import numpy as np
import torch

from .grammar import apply_grammars
from .sequence import Sequence


def apply_penalties(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """Penalties and min_new_tokens, in place on `logits`."""
    banned_rows: list[int] = []
    banned_ids: list[int] = []
    for row, seq in enumerate(seqs):
        p = seq.params
        if p.repetition_penalty != 1.0:
            # transformers' rule, over prompt and output: shrink the scores of seen tokens.
            seen = torch.tensor(sorted(set(seq.token_ids)), device=logits.device)
            scores = logits[row, seen]
            scores = torch.where(
                scores < 0, scores * p.repetition_penalty, scores / p.repetition_penalty
            )
            logits[row, seen] = scores
        if p.presence_penalty or p.frequency_penalty:
            # OpenAI's rule, over the output only.
            out = torch.tensor(seq.generated_ids, dtype=torch.long, device=logits.device)
            if out.numel():
                counts = torch.bincount(out, minlength=logits.shape[1]).to(logits.dtype)
                logits[row] -= counts * p.frequency_penalty + (counts > 0) * p.presence_penalty
        # A grammar decides itself when the output may end: banning its stop tokens could
        # leave a complete output with no allowed token at all.
        if seq.num_generated < p.min_new_tokens and seq.stop_ids and seq.grammar is None:
            banned_rows.extend([row] * len(seq.stop_ids))
            banned_ids.extend(seq.stop_ids)
    if banned_rows:  # one indexing op for the whole batch, not one per row
        logits[banned_rows, banned_ids] = float("-inf")
    apply_token_rules(logits, seqs)
    return logits


def apply_token_rules(logits: torch.Tensor, seqs: list[Sequence]) -> None:
    """logit_bias, allowed_token_ids and bad_words_ids, in place, on the rows that set them
    (the pipeline has checked every id against the vocabulary)."""
    for row, seq in enumerate(seqs):
        p = seq.params
        if p.logit_bias:
            ids = torch.tensor(list(p.logit_bias), device=logits.device)
            bias = torch.tensor(list(p.logit_bias.values()), dtype=logits.dtype)
            logits[row, ids] += bias.to(logits.device)
        if p.allowed_token_ids:
            allowed = torch.tensor(p.allowed_token_ids, device=logits.device)
            kept = logits[row, allowed]
            logits[row] = float("-inf")
            logits[row, allowed] = kept
        if p.bad_words_ids:
            # A word's last token is banned where the output already ends with the rest of it
            # (a one-token word: always), as vLLM and transformers do.
            out = seq.generated_ids
            banned = [
                word[-1]
                for word in p.bad_words_ids
                if len(out) >= len(word) - 1 and out[len(out) - len(word) + 1 :] == word[:-1]
            ]
            if banned:
                logits[row, banned] = float("-inf")


def _filter(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """Temperature, then top-k, top-p and min-p, each a no-op where the request turns it off."""
    device = logits.device
    temps = torch.tensor([s.params.temperature for s in seqs], dtype=logits.dtype, device=device)
    logits = logits / temps.clamp_min(1e-6).unsqueeze(1)
    top_k = [s.params.top_k for s in seqs]
    top_p = [s.params.top_p for s in seqs]
    min_p = [s.params.min_p for s in seqs]
    vocab = logits.shape[1]
    if any(0 < k < vocab for k in top_k) or any(p < 1.0 for p in top_p):
        sorted_logits, order = logits.sort(dim=1, descending=True)
        ranks = torch.arange(vocab, device=device).unsqueeze(0)
        ks = torch.tensor([k if 0 < k < vocab else vocab for k in top_k], device=device)
        ks = ks.unsqueeze(1)
        drop = ranks >= ks
        probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=1)
        # Drop a token when the tokens ranked above it already reach top_p.
        before = probs.cumsum(dim=1) - probs
        drop |= before > torch.tensor(top_p, dtype=probs.dtype, device=device).unsqueeze(1)
        drop[:, 0] = False
        logits = logits.scatter(1, order, sorted_logits.masked_fill(drop, float("-inf")))
    if any(m > 0 for m in min_p):
        probs = logits.softmax(dim=1)
        min_ps = torch.tensor(min_p, dtype=probs.dtype, device=device).unsqueeze(1)
        floor = probs.max(dim=1, keepdim=True).values * min_ps
        logits = logits.masked_fill(probs < floor, float("-inf"))
    return logits


def _draw(probs: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    # argmax(p / q) with q ~ Exp(1) is a draw from p; each row uses its request's generator,
    # which lives on the CPU so that a seed gives the same tokens on every device.
    noise = torch.empty(probs.shape, dtype=probs.dtype)
    for row, seq in enumerate(seqs):
        noise[row].exponential_(generator=seq.generator)
    return (probs / noise.to(probs.device)).argmax(dim=1)


def _first_max(logits: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """Each row's first maximum (NaN counts as the maximum): the greedy tokens; and whether
    every row's maximum is finite (not so where a row holds NaN or +inf, or is all -inf)."""
    if logits.device.type == "cpu":
        # numpy's argmax is vectorised: 3 us for a 32000-wide row against torch's 30 (and
        # 66 us against 440 for 32 rows), a tenth of a batch-1 step's time outside the model.
        array = logits.numpy()
        index = array.argmax(axis=1)
        finite = bool(np.isfinite(array[np.arange(len(index)), index]).all())
        return torch.from_numpy(index), finite
    best, index = logits.max(dim=1)
    return index, bool(torch.isfinite(best).all())


@torch.inference_mode()  # the runner's logits are inference tensors, changed in place here
def sample(logits: torch.Tensor, seqs: list[Sequence]) -> tuple[list[int], list[dict | None], bool]:
    """Next token per row, for rows that ask logprobs of the raw logits, and whether every
    row's logits were finite (NaN or inf there mean a broken model: it samples garbage).

    A row's logprobs map the chosen token and the top-N tokens to their log-probabilities.
    """
    logits = logits.float()
    want = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
    raw_logprobs = logits[want].log_softmax(dim=1) if want else None
    logits = apply_penalties(logits, seqs)  # in place: the runner's output is ours to change
    grammars = [s.grammar for s in seqs]
    if any(g is not None for g in grammars):
        apply_grammars(logits, grammars)
    tokens, finite = _first_max(logits)
    sampled = [i for i, s in enumerate(seqs) if not s.params.greedy]
    if sampled:
        rows = [seqs[i] for i in sampled]
        probs = _filter(logits[sampled], rows).softmax(dim=1)
        tokens[sampled] = _draw(probs, rows)
    token_list = tokens.tolist()
    logprobs: list[dict | None] = [None] * len(seqs)
    for j, i in enumerate(want):
        lp, tok, n = raw_logprobs[j], token_list[i], seqs[i].params.logprobs
        entry = {tok: lp[tok].item()}
        if n:
            top = lp.topk(n)
            entry.update(zip(top.indices.tolist(), top.values.tolist()))
        logprobs[i] = entry
    return token_list, logprobs, finite
