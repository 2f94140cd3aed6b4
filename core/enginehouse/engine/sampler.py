"""Pick the next token of every row where the logits are: sampling as data.

The engine describes a step's sampling as a `SamplingBatch`, plain picklable data (per-row
arrays of temperature, top-k/p, min-p, penalties, seeds and logprob counts, the stop ids that
`min_new_tokens` still bans, which prompt positions to score; a request's prompt ids once,
where a penalty needs them). `Sampler.sample` runs it next to the logits: in the engine's own
process at tp=1, on rank 0 under an executor, which then sends back token ids and a few
logprobs instead of `[rows, vocab]` logits. The grammar bitmask comes apart, at `sample` time,
because the engine fills it while the forward runs.

What a sampled sequence needs across steps (its seeded generator, the tokens it drew, for the
penalties) lives in the `Sampler` until the engine says the sequence finished; preemption does
not drop it. Order follows transformers: penalties, then temperature, top-k, top-p and min-p.
A seeded request draws from its own CPU generator, so its tokens do not depend on what it is
batched with, nor on the device; unseeded rows draw their noise on the logits' device.
Plugins' logits processors (logits_processors.py) come by name in the batch and run after the
token rules, before the grammar's mask (`ProcessorSet`).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch

from ..config import GenerationConfig
from ..logits_processors import BatchUpdate, LogitsProcessor


@dataclass(frozen=True)
class PromptScoring:
    """Score prompt positions of one chunk: logits rows `first_row ...` predict `targets`,
    the prompt's tokens from position `first_pos` on. Their sum always; with `top_n` given
    (not None), each target's logprob and rank too, and the row's top-N."""

    seq_id: int
    first_row: int
    first_pos: int
    targets: tuple[int, ...]
    top_n: int | None = None


@dataclass(frozen=True)
class TokenRules:
    """Which tokens one request may draw: OpenAI's logit_bias (added to the logits), vLLM's
    allowed_token_ids (only these) and transformers' bad_words_ids (a word's last token is
    banned where the output already ends with the rest of it; a one-token word, always)."""

    logit_bias: dict[int, float] | None = None
    allowed_token_ids: tuple[int, ...] | None = None
    bad_words_ids: tuple[tuple[int, ...], ...] | None = None

    @classmethod
    def of(cls, p: GenerationConfig) -> TokenRules | None:
        if not (p.logit_bias or p.allowed_token_ids or p.bad_words_ids):
            return None
        allowed = tuple(p.allowed_token_ids) if p.allowed_token_ids else None
        bad = tuple(tuple(w) for w in p.bad_words_ids) if p.bad_words_ids else None
        return cls(dict(p.logit_bias) if p.logit_bias else None, allowed, bad)


@dataclass
class SamplingBatch:
    """One step's sampling, one entry per sampled row (in `rows` order). The per-row columns
    are plain lists: a one-row batch pickles in ~3 us as lists, ~17 us as nine numpy arrays
    (what a step's message costs under an executor); the sampler makes arrays of the ones it
    uses."""

    seq_ids: list[int] = field(default_factory=list)
    rows: list[int] = field(default_factory=list)  # the logits row each samples from
    greedy: list[bool] = field(default_factory=list)
    temperature: list[float] = field(default_factory=list)
    top_k: list[int] = field(default_factory=list)
    top_p: list[float] = field(default_factory=list)
    min_p: list[float] = field(default_factory=list)
    repetition_penalty: list[float] = field(default_factory=list)
    presence_penalty: list[float] = field(default_factory=list)
    frequency_penalty: list[float] = field(default_factory=list)
    seeds: list[int | None] = field(default_factory=list)
    logprobs: list[int | None] = field(default_factory=list)  # top-N per row, None: none
    # (row, token) pairs set to -inf: stop ids while min_new_tokens is not reached.
    banned: tuple[list[int], list[int]] = field(default_factory=lambda: ([], []))
    # Sent once, for sequences seen for the first time that need them: prompt ids (repetition
    # penalty), and token rules (logit_bias, allowed_token_ids, bad_words_ids).
    prompts: dict[int, list[int]] = field(default_factory=dict)
    rules: dict[int, TokenRules] = field(default_factory=dict)
    # Sent once too: the logits processors a sequence asks for, by name, and its extra_args.
    processors: dict[int, tuple[tuple[str, ...], dict]] = field(default_factory=dict)
    scoring: list[PromptScoring] = field(default_factory=list)
    # Rows constrained by a grammar (indices into this batch), and the grammar's vocabulary.
    constrained: list[int] = field(default_factory=list)
    grammar_vocab: int = 0
    finished: list[int] = field(default_factory=list)  # sequences whose state goes
    # Speculative decoding (engine/speculative.py): per row, the proposed token it verifies,
    # -1 on a sequence's last row. A verifying sequence has consecutive rows, one per
    # position; empty when no row of the step verifies anything.
    drafts: list[int] = field(default_factory=list)

    def select(self, rows: list[int]) -> SamplingBatch:
        """The batch of these rows only, in this order (the verifying walk's steps)."""
        where = {r: i for i, r in enumerate(rows)}
        out = SamplingBatch(prompts=self.prompts, rules=self.rules)
        for name in _ROW_COLUMNS:
            values = getattr(self, name)
            setattr(out, name, [values[r] for r in rows])
        pairs = [(where[r], t) for r, t in zip(*self.banned) if r in where]
        out.banned = ([r for r, _ in pairs], [t for _, t in pairs])
        out.constrained = [where[r] for r in self.constrained if r in where]
        out.grammar_vocab = self.grammar_vocab
        return out

    def penalized(self) -> list[bool]:
        """Per row: whether any of its three penalties applies."""
        return [
            r != 1.0 or p != 0 or f != 0
            for r, p, f in zip(
                self.repetition_penalty, self.presence_penalty, self.frequency_penalty
            )
        ]


_ROW_COLUMNS = (
    "seq_ids",
    "rows",
    "greedy",
    "temperature",
    "top_k",
    "top_p",
    "min_p",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "seeds",
    "logprobs",
)


def batch_of(rows: list[tuple[int, int, GenerationConfig, bool, list[int]]]) -> SamplingBatch:
    """A `SamplingBatch` for rows of (seq_id, logits row, params, whether the sampler sees the
    sequence for the first time, its prompt ids)."""
    params = [p for _, _, p, _, _ in rows]
    batch = SamplingBatch(
        seq_ids=[s for s, _, _, _, _ in rows],
        rows=[r for _, r, _, _, _ in rows],
        greedy=[p.greedy for p in params],
        temperature=[p.temperature for p in params],
        top_k=[p.top_k for p in params],
        top_p=[p.top_p for p in params],
        min_p=[p.min_p for p in params],
        repetition_penalty=[p.repetition_penalty for p in params],
        presence_penalty=[p.presence_penalty for p in params],
        frequency_penalty=[p.frequency_penalty for p in params],
        seeds=[p.random_seed for p in params],
        logprobs=[p.logprobs for p in params],
    )
    for seq_id, _, p, new, prompt in rows:
        if new and p.repetition_penalty != 1.0:
            batch.prompts[seq_id] = list(prompt)
        if new and (rules := TokenRules.of(p)) is not None:
            batch.rules[seq_id] = rules
        if new and p.logits_processors:
            batch.processors[seq_id] = (tuple(p.logits_processors), dict(p.extra_args or {}))
    return batch


@dataclass
class PromptScores:
    """What one chunk's scored prompt positions gave (see `PromptScoring`)."""

    first_pos: int = 0  # the prompt position of the first target
    total: float = 0.0  # the sum of the targets' logprobs
    logprobs: list[dict[int, float]] = field(default_factory=list)  # target first, then top-N
    ranks: list[int] = field(default_factory=list)


@dataclass
class SamplerOutput:
    """One step's result: never logits, only what the engine keeps of them."""

    token_ids: list[int] = field(default_factory=list)  # one per sampled row
    logprobs: list[dict[int, float] | None] = field(default_factory=list)
    scores: dict[int, PromptScores] = field(default_factory=dict)  # by seq_id
    finite: bool = True  # every sampled row's maximum was finite
    # A step that verified proposals: per sequence, how many of its proposals were kept and
    # their logprobs; `token_ids` then holds each sequence's token after them.
    num_accepted: list[int] = field(default_factory=list)
    accepted_logprobs: list[list[dict[int, float] | None]] = field(default_factory=list)


@dataclass
class _SeqState:
    generator: torch.Generator | None = None
    seen: set[int] = field(default_factory=set)  # prompt and output, for repetition_penalty
    counts: Counter = field(default_factory=Counter)  # output tokens, presence/frequency
    rules: TokenRules | None = None
    output: list[int] = field(default_factory=list)  # for bad_words_ids and processors only
    processors: tuple[str, ...] = ()  # the logits processors it asked for


class Sampler:
    """Samples `SamplingBatch`es and keeps each sequence's state until it finishes."""

    def __init__(self) -> None:
        self.states: dict[int, _SeqState] = {}
        self.processors = ProcessorSet()

    def finish(self, seq_ids: list[int]) -> None:
        for s in seq_ids:
            state = self.states.pop(s, None)
            if state is not None and state.processors:
                self.processors.finished(s, state.processors)

    def _state(self, seq_id: int, seed: int | None, batch: SamplingBatch) -> _SeqState:
        state = self.states.get(seq_id)
        if state is None:
            state = self.states[seq_id] = _SeqState()
            if seed is not None:
                state.generator = torch.Generator().manual_seed(seed)
            state.seen.update(batch.prompts.get(seq_id, ()))
            state.rules = batch.rules.get(seq_id)
            names, args = batch.processors.get(seq_id, ((), {}))
            state.processors = names
            for name in names:
                self.processors.added(name, seq_id, args)
        return state

    @torch.inference_mode()  # the runner's logits are inference tensors, changed in place here
    def sample(
        self, logits: torch.Tensor | None, batch: SamplingBatch, bitmask: np.ndarray | None = None
    ) -> SamplerOutput:
        """The next token of every row in `batch`, logprobs where asked, prompt scores."""
        self.finish(batch.finished)
        out = SamplerOutput()
        if logits is None:
            return out
        logits = logits.float()
        out.scores = {s.seq_id: _score(logits, s) for s in batch.scoring}
        if not batch.seq_ids:
            return out
        if batch.drafts:
            return self._verify(logits, batch, bitmask, out)
        tokens, out.logprobs, out.finite = self._pick(logits, batch, bitmask)
        out.token_ids = tokens
        return out

    def _pick(
        self,
        logits: torch.Tensor,
        batch: SamplingBatch,
        bitmask: np.ndarray | None,
        drafts: list[int] | None = None,
    ) -> tuple[list[int], list[dict[int, float] | None], bool]:
        """One token per row of `batch`, its logprobs where asked, and whether every row's
        maximum was finite. With `drafts`, a sampled row keeps its proposed token or draws a
        replacement from the rest (`_draw`); the sequences' states take the tokens."""
        penalized = batch.penalized()
        # A seed, a penalty or token rules start a sequence's state (the rules come with its
        # first step); later steps find the state the sampler kept.
        states = [
            self._state(s, seed, batch)
            if p
            or seed is not None
            or s in batch.rules
            or s in batch.processors
            or s in self.states
            else None
            for s, seed, p in zip(batch.seq_ids, batch.seeds, penalized)
        ]
        # A decode-only batch samples every row: the logits as they are, not a copy.
        picked = logits if batch.rows == list(range(len(logits))) else logits[batch.rows]
        want = [i for i, n in enumerate(batch.logprobs) if n is not None]
        raw = picked[want].log_softmax(dim=1) if want else None
        if any(penalized):
            _penalize(picked, batch, states)
        if batch.banned[0]:  # one indexing op for the whole batch, not one per row
            picked[batch.banned] = float("-inf")
        if any(s is not None and s.rules is not None for s in states):
            _apply_rules(picked, states)
        if any(s is not None and s.processors for s in states):
            picked = self.processors.apply(picked, batch, states)
        if bitmask is not None and batch.constrained:
            _mask(picked, bitmask, batch)
        tokens, finite = _first_max(picked)
        sampled = [i for i, greedy in enumerate(batch.greedy) if not greedy]
        if sampled:
            probs = _filter(picked[sampled], batch, sampled).softmax(dim=1)
            proposed = [drafts[i] for i in sampled] if drafts is not None else None
            tokens[sampled] = _draw(probs, [states[i] for i in sampled], proposed)
        token_ids = tokens.tolist()
        logprobs: list[dict[int, float] | None] = [None] * len(batch.seq_ids)
        for j, i in enumerate(want):
            logprobs[i] = _logprobs(raw[j], token_ids[i], batch.logprobs[i])  # type: ignore[index]
        for state, token in zip(states, token_ids):
            if state is not None:
                state.seen.add(token)
                state.counts[token] += 1
                if state.processors or (state.rules is not None and state.rules.bad_words_ids):
                    state.output.append(token)
        return token_ids, logprobs, finite

    def _verify(
        self,
        logits: torch.Tensor,
        batch: SamplingBatch,
        bitmask: np.ndarray | None,
        out: SamplerOutput,
    ) -> SamplerOutput:
        """Walk the verifying sequences' positions in order, all sequences at once: at each
        position, every sequence that kept all its proposals so far takes a token from that
        position's row (its penalties, rules and grammar row as the step before left them);
        it goes on while that token is its proposal (see engine/speculative.py)."""
        ends = [i for i, d in enumerate(batch.drafts) if d < 0]
        firsts = [0] + [e + 1 for e in ends[:-1]]
        n = len(ends)
        out.token_ids, out.logprobs, out.num_accepted = [0] * n, [None] * n, [0] * n
        out.accepted_logprobs = [[] for _ in range(n)]
        alive, step = list(range(n)), 0
        while alive:
            rows = [firsts[g] + step for g in alive]
            drafts = [batch.drafts[r] for r in rows]
            mask = bitmask[rows] if bitmask is not None else None
            tokens, lps, finite = self._pick(logits, batch.select(rows), mask, drafts)
            out.finite &= finite
            kept = []
            for g, d, token, lp in zip(alive, drafts, tokens, lps):
                if d >= 0 and token == d:
                    out.num_accepted[g] += 1
                    out.accepted_logprobs[g].append(lp)
                    kept.append(g)
                else:
                    out.token_ids[g], out.logprobs[g] = token, lp
            alive, step = kept, step + 1
        return out


class ProcessorSet:
    """The logits processors of one sampler: built by name on first use, each told per step
    which of its requests were added, finished, and where their rows are."""

    def __init__(self) -> None:
        self.instances: dict[str, LogitsProcessor] = {}
        self.pending: dict[str, tuple[list, list]] = {}  # name -> (added, removed) since a step

    def get(self, name: str) -> LogitsProcessor:
        if name not in self.instances:
            from ..logits_processors import registered

            known = registered()
            if name not in known:  # checked at submit: a rank without the plugin
                raise RuntimeError(
                    f"logits processor {name!r} is not installed where sampling runs"
                )
            self.instances[name] = known[name][1]()
        return self.instances[name]

    def added(self, name: str, seq_id: int, args: dict) -> None:
        self.pending.setdefault(name, ([], []))[0].append((seq_id, args))

    def finished(self, seq_id: int, names: tuple[str, ...]) -> None:
        for name in names:
            self.pending.setdefault(name, ([], []))[1].append(seq_id)

    def apply(self, logits: torch.Tensor, batch: SamplingBatch, states: list) -> torch.Tensor:
        """Each processor in use on its rows (in the order the batch first names them)."""
        used: dict[str, dict[int, int]] = {}
        for row, (seq_id, state) in enumerate(zip(batch.seq_ids, states)):
            for name in state.processors if state is not None else ():
                used.setdefault(name, {})[seq_id] = row
        for name, rows in used.items():
            added, removed = self.pending.pop(name, ([], []))
            proc = self.get(name)
            outputs = {s: states[r].output for s, r in rows.items()}
            proc.update_state(BatchUpdate(added, removed, rows, outputs))
            if proc.is_argmax_invariant() and all(batch.greedy[r] for r in rows.values()):
                continue  # it cannot change a greedy row's token
            logits = proc.apply(logits)
        for name in [n for n in self.pending if n in self.instances]:  # only removals left
            added, removed = self.pending.pop(name)
            self.instances[name].update_state(BatchUpdate(added, removed))
        return logits


def _apply_rules(logits: torch.Tensor, states: list[_SeqState | None]) -> None:
    """logit_bias, allowed_token_ids and bad_words_ids, in place, on the rows that set them
    (the pipeline has checked every id against the vocabulary)."""
    for row, state in enumerate(states):
        rules = state.rules if state is not None else None
        if rules is None:
            continue
        if rules.logit_bias:
            ids = torch.tensor(list(rules.logit_bias), device=logits.device)
            bias = torch.tensor(list(rules.logit_bias.values()), dtype=logits.dtype)
            logits[row, ids] += bias.to(logits.device)
        if rules.allowed_token_ids:
            allowed = torch.tensor(rules.allowed_token_ids, device=logits.device)
            kept = logits[row, allowed]
            logits[row] = float("-inf")
            logits[row, allowed] = kept
        if rules.bad_words_ids:
            out = state.output  # type: ignore[union-attr]
            banned = [
                word[-1]
                for word in rules.bad_words_ids
                if len(out) >= len(word) - 1 and tuple(out[len(out) - len(word) + 1 :]) == word[:-1]
            ]
            if banned:
                logits[row, banned] = float("-inf")


def _penalize(logits: torch.Tensor, batch: SamplingBatch, states: list) -> None:
    """Penalties in place: repetition over prompt and output (transformers' rule: shrink the
    scores of seen tokens), presence and frequency over the output (OpenAI's rule)."""
    for row, state in enumerate(states):
        if state is None:
            continue
        rep = float(batch.repetition_penalty[row])
        if rep != 1.0 and state.seen:
            seen = torch.tensor(sorted(state.seen), device=logits.device)
            scores = logits[row, seen]
            logits[row, seen] = torch.where(scores < 0, scores * rep, scores / rep)
        presence = float(batch.presence_penalty[row])
        frequency = float(batch.frequency_penalty[row])
        if (presence or frequency) and state.counts:
            ids = torch.tensor(list(state.counts), device=logits.device)
            counts = torch.tensor(list(state.counts.values()), dtype=logits.dtype)
            logits[row, ids] -= counts.to(logits.device) * frequency + presence


def _mask(logits: torch.Tensor, bitmask: np.ndarray, batch: SamplingBatch) -> None:
    """The grammar's forbidden tokens to -inf on the constrained rows (xgrammar's kernel, on
    the logits' device); logits past the vocabulary the grammar knows are never allowed."""
    from .grammar import xgrammar

    xgr, rows, vocab = xgrammar(), batch.constrained, batch.grammar_vocab
    if logits.shape[1] > vocab:
        logits[rows, vocab:] = float("-inf")
    mask = torch.from_numpy(bitmask).to(logits.device, non_blocking=True)
    xgr.apply_token_bitmask_inplace(logits, mask, vocab_size=vocab, indices=rows)


def _filter(logits: torch.Tensor, batch: SamplingBatch, rows: list[int]) -> torch.Tensor:
    """Temperature, then top-k, top-p and min-p, each a no-op where the request turns it off."""
    device, vocab = logits.device, logits.shape[1]

    def column(name: str, dtype: type) -> np.ndarray:
        values = getattr(batch, name)
        return np.array([values[i] for i in rows], dtype=dtype)

    temps = torch.from_numpy(column("temperature", np.float32)).to(device, logits.dtype)
    logits = logits / temps.clamp_min(1e-6).unsqueeze(1)
    top_k = column("top_k", np.int64)
    top_p, min_p = column("top_p", np.float32), column("min_p", np.float32)
    if ((top_k > 0) & (top_k < vocab)).any() or (top_p < 1.0).any():
        sorted_logits, order = logits.sort(dim=1, descending=True)
        ranks = torch.arange(vocab, device=device).unsqueeze(0)
        ks = torch.from_numpy(np.where((top_k > 0) & (top_k < vocab), top_k, vocab)).to(device)
        drop = ranks >= ks.unsqueeze(1)
        probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=1)
        # Drop a token when the tokens ranked above it already reach top_p.
        before = probs.cumsum(dim=1) - probs
        drop |= before > torch.from_numpy(top_p).to(device, probs.dtype).unsqueeze(1)
        drop[:, 0] = False
        logits = logits.scatter(1, order, sorted_logits.masked_fill(drop, float("-inf")))
    if (min_p > 0).any():
        probs = logits.softmax(dim=1)
        floor = probs.max(dim=1, keepdim=True).values * torch.from_numpy(min_p).to(device)[:, None]
        logits = logits.masked_fill(probs < floor, float("-inf"))
    return logits


def _draw(
    probs: torch.Tensor, states: list[_SeqState | None], drafts: list[int] | None = None
) -> torch.Tensor:
    """argmax(p / q) with q ~ Exp(1) is a draw from p. A seeded row draws its noise from its
    own generator, on the CPU, so that a seed gives the same tokens on every device; the other
    rows draw theirs on the logits' device, in one call.

    With `drafts` (speculative decoding), a row with a proposed token d keeps it with
    probability p(d); otherwise it draws from p with d taken out (the residual distribution
    of a deterministic proposal: argmax(p / q) needs no renormalising). Whatever d was, the
    token follows p exactly. Rows whose proposal is -1 just draw."""
    if drafts is not None and any(d >= 0 for d in drafts):
        return _accept_or_draw(probs, states, drafts)
    noise = torch.empty_like(probs).exponential_()
    seeded = [i for i, s in enumerate(states) if s is not None and s.generator is not None]
    if seeded:
        rows = torch.empty((len(seeded), probs.shape[1]), dtype=probs.dtype)
        for j, i in enumerate(seeded):
            rows[j].exponential_(generator=states[i].generator)  # type: ignore[union-attr]
        noise[seeded] = rows.to(probs.device)
    return (probs / noise).argmax(dim=1)


def _accept_or_draw(
    probs: torch.Tensor, states: list[_SeqState | None], drafts: list[int]
) -> torch.Tensor:
    rows = [i for i, d in enumerate(drafts) if d >= 0]
    index = torch.tensor([drafts[i] for i in rows], device=probs.device)
    p_draft = probs[rows, index].cpu()
    u = torch.empty(len(rows), dtype=probs.dtype)
    for j, i in enumerate(rows):  # a seeded row's uniform comes from its own generator
        state = states[i]
        gen = state.generator if state is not None else None
        u[j] = torch.rand((), dtype=probs.dtype, generator=gen)
    keep = (u < p_draft).tolist()
    residual = probs.clone()
    residual[rows, index] = 0.0
    # A row whose p is all on d always keeps it; its residual is all zero and never used.
    tokens = _draw(residual, states)
    for j, i in enumerate(rows):
        if keep[j]:
            tokens[i] = drafts[i]
    return tokens


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


def _logprobs(row: torch.Tensor, token: int, top_n: int) -> dict[int, float]:
    """The chosen token's logprob, then the row's top-N (raw logits, before any penalty)."""
    entry = {token: row[token].item()}
    if top_n:
        top = row.topk(top_n)
        entry.update(zip(top.indices.tolist(), top.values.tolist()))
    return entry


def _score(logits: torch.Tensor, s: PromptScoring) -> PromptScores:
    lp = logits[s.first_row : s.first_row + len(s.targets)].log_softmax(dim=-1)
    targets = torch.tensor(s.targets, device=lp.device)
    chosen = lp.gather(1, targets.unsqueeze(1)).squeeze(1)
    scores = PromptScores(first_pos=s.first_pos, total=chosen.sum().item())
    if s.top_n is None:
        return scores
    scores.ranks = ((lp > chosen.unsqueeze(1)).sum(dim=1) + 1).tolist()
    top = lp.topk(s.top_n) if s.top_n else None
    for i, (token, value) in enumerate(zip(s.targets, chosen.tolist())):
        entry = {token: value}
        if top is not None:
            entry.update(zip(top.indices[i].tolist(), top.values[i].tolist()))
        scores.logprobs.append(entry)
    return scores
