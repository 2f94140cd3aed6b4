"""Contract checks for any runner, driven by hand through `enginehouse.runner`'s types.

Each check takes a loaded `Target` and returns a one-line summary, or raises `Mismatch`
(what differed: which sequence, which position, expected and got) or `NotApplicable`.
"""

from __future__ import annotations

import dataclasses
import inspect

import torch

from ..config import format_size
from ..kv_groups import KVGroup
from ..runner import (
    CAPABILITY_METHODS,
    CAPABILITY_MORE_METHODS,
    KVSpec,
    capabilities_of,
    capability_problems,
    undeclared_extras,
)
from .compare import compare_rows, compare_streams, row_difference
from .driver import Seq
from .result import Mismatch, NotApplicable
from .target import NEW_TOKENS, Target

# Each method, with arguments it must accept as the core passes them (RunnerExtras' too).
CALLS = {
    "load": ((), {"progress": False}),
    "allocate_kv": ((1,), {}),
    "execute": ((None,), {}),
    "close": ((), {}),
    "plan_kv_blocks": ((None, 16), {}),
    "profile_run": ((16,), {}),
    "release_sequence": ((0, (0,)), {}),
    "finish_sequence": ((0,), {}),
    "load_adapter": ((1, None), {}),
    "unload_adapter": ((1,), {}),
}


def runner_protocol(t: Target) -> str:
    """The required members and the declared capabilities' methods, callable as the core
    calls them; a capability declared without its method, or a method the runner has without
    declaring it (the core would never call it), fails."""
    runner = t.runner
    problems = capability_problems(runner) + [
        f"it has {m} without declaring it" for m in undeclared_extras(runner)
    ]
    if problems:
        raise Mismatch("; ".join(problems))
    caps = capabilities_of(runner)
    declared = [flag for flag in CAPABILITY_METHODS if getattr(caps, flag)]
    extras = [
        m
        for flag in declared
        for m in (CAPABILITY_METHODS[flag], *CAPABILITY_MORE_METHODS.get(flag, ()))
    ]
    for name in ["load", "allocate_kv", "execute", "close", *extras]:
        method = getattr(runner, name)
        if not callable(method):
            raise Mismatch(f"{name} is a {type(method).__name__}, not a method")
        args, kwargs = CALLS[name]
        try:
            inspect.signature(method).bind(*args, **kwargs)
        except TypeError as e:
            raise Mismatch(f"{name}() cannot be called as the core calls it: {e}") from None
        except ValueError:  # no signature to read (a builtin): nothing to hold against it
            pass
    return f"{type(runner).__name__}; capabilities: {', '.join(declared) or 'none'}"


def kv_spec(t: Target) -> str:
    kv = t.runner.kv_spec
    if not isinstance(kv, KVSpec):
        raise Mismatch(f"kv_spec is a {type(kv).__name__}, not an enginehouse.runner.KVSpec")
    wrong = [
        f"{name}={value!r}"
        for name, value, ok in (
            ("block_size", kv.block_size, isinstance(kv.block_size, int) and kv.block_size > 0),
            ("bytes_per_block", kv.bytes_per_block, _positive_int(kv.bytes_per_block)),
            ("dtype", kv.dtype, isinstance(kv.dtype, torch.dtype)),
            ("device", kv.device, isinstance(kv.device, torch.device)),
            ("prefix_caching", kv.prefix_caching, isinstance(kv.prefix_caching, bool)),
        )
        if not ok
    ]
    if wrong:
        raise Mismatch(f"kv_spec has {', '.join(wrong)}")
    if not all(isinstance(g, KVGroup) for g in kv.groups):
        raise Mismatch("kv_spec.groups holds something other than enginehouse KVGroup")
    assert t.engine is not None
    promised = t.engine.num_blocks * kv.bytes_per_block
    if kv.groups:  # each group's share of the blocks, in its own block size
        chunk = t.engine.config.max_num_batched_tokens
        batch = t.engine.config.max_batch_size
        plans = kv.group_blocks(t.engine.num_blocks, t.engine.session_len, chunk, batch)
        promised = sum(p.bytes for p in plans)
    what = f"allocate_kv({t.engine.num_blocks}) added {format_size(t.kv_bytes)}"
    if t.kv_bytes == 0:
        raise NotApplicable(
            f"{what} of torch or numpy memory reachable from the runner; the kit cannot compare "
            "it with kv_spec.bytes_per_block"
        )
    # The engine turns a memory budget into blocks with bytes_per_block: a runner that takes
    # more overruns the budget, one that takes far less wastes it.
    # A few spare slots (a null slot for padding, say) are fine: up to two blocks and 10%.
    spare = 2 * kv.bytes_per_block * max(1, len(kv.groups))  # a null slot or so per group
    if not promised * 0.5 <= t.kv_bytes <= promised * 1.1 + spare:
        raise Mismatch(
            f"{what}, but kv_spec.bytes_per_block ({kv.bytes_per_block}) promises "
            f"{format_size(promised)} for that many blocks"
        )
    return f"block_size {kv.block_size}, {what} ({format_size(promised)} promised)"


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and value > 0


def logits_rows(t: Target) -> str:
    """Rows of several positions per chunk, a chunk asking none, in two batch orders: each
    row must be the one its chunk's own run gives, in chunk order."""
    d, alone = t.driver(), t.driver(shuffled=False)
    prompt = t.prompts(seed=1)[2]
    shapes = {"A": (prompt[:9], (0, 4, 8)), "B": (prompt[9:14], ()), "C": (prompt[14:20], (5,))}
    refs = {}
    for name, (tokens, at) in shapes.items():
        s = alone.new(tokens, f"chunk {name}")
        refs[name] = alone.step([(s, alone.chunk(s, logits_at=at))])[0]
        alone.release(s)
    for order in ("ABC", "CBA"):
        seqs = {name: d.new(shapes[name][0], f"chunk {name}") for name in order}
        pairs = [(seqs[n], d.chunk(seqs[n], logits_at=shapes[n][1])) for n in order]
        for name, rows in zip(order, d.step(pairs)):
            try:
                compare_rows(rows, refs[name], t.tolerance, f"chunk {name} in batch {order}")
            except Mismatch as e:
                raise Mismatch(f"{e}{_whose_row(rows, refs, t)}") from None
        for s in seqs.values():
            d.release(s)
    return "[rows, vocab] float logits, one row per logits_at entry, in chunk order"


def _whose_row(rows: torch.Tensor, refs: dict[str, torch.Tensor], t: Target) -> str:
    """A hint when a row is another chunk's: the rows came back out of order."""
    for i, row in enumerate(rows):
        for name, ref in refs.items():
            for j, other in enumerate(ref):
                if row_difference(row, other, t.tolerance) is None:
                    return f" (row {i} is chunk {name}'s row {j}: rows out of order?)"
    return ""


def batch_invariance(t: Target) -> str:
    d = t.driver()
    prompts, labels = t.prompts(), [t.label(i) for i in range(len(t.prompts()))]
    alone = {t.label(i): t.alone(i) for i in range(len(prompts))}
    runs = {
        "in one batch": d.together(prompts, NEW_TOKENS, labels),
        "admitted one per step beside decodes": d.staggered(
            prompts[::-1], NEW_TOKENS, labels[::-1]
        ),
    }
    for how, seqs in runs.items():
        for seq in seqs:
            compare_streams(seq, alone[seq.label], t.tolerance, how)
    return f"{len(prompts)} sequences alone = in one batch = admitted one per step"


def chunked_prefill(t: Target) -> str:
    d, ref = t.driver(), t.alone(2)
    prompt = t.prompts()[2]
    splits = {"in chunks of 5, 11, 9, 4": (5, 11, 9, 4), "one token per step": (1,) * len(prompt)}
    for how, sizes in splits.items():
        seq = d.new(prompt, ref.label)
        for n in sizes:
            d.step([(seq, d.chunk(seq, n))])
        _finish(d, seq)
        compare_streams(seq, ref, t.tolerance, f"prefilled {how}")
    return f"a {len(prompt)}-token prompt whole = in 4 chunks = one token per step"


def _finish(d, seq: Seq) -> None:
    while len(seq.generated) < NEW_TOKENS:
        d.step([(seq, d.chunk(seq))])
    d.release(seq)


def prefix_cache(t: Target) -> str:
    kv, session = t.runner.kv_spec, t.engine.session_len  # type: ignore[union-attr]
    if not kv.prefix_caching:
        raise NotApplicable("kv_spec.prefix_caching is False: the engine never shares its blocks")
    if any(g.kind == "state" for g in kv.groups):
        # The driver keeps one table for every group; a hit on a state group resumes from a
        # saved state the engine's block manager places in the group's own table.
        raise NotApplicable(
            "a 'state' KV group resumes a prefix hit from a saved state, which only the "
            "engine's block manager places (check it through the engine)"
        )
    bs = kv.block_size
    full = next((k for k in (2, 1) if k * bs + 8 + NEW_TOKENS <= session), 0)
    if not full:
        raise NotApplicable(f"block_size {bs} leaves no full block in a {session}-token session")
    d, prompts = t.driver(), t.prompts(seed=2)
    prefix = (prompts[2] * bs)[: full * bs]
    owner = d.new(prefix + prompts[0], "the owner")
    d.step([(owner, d.chunk(owner))])
    d.step([(owner, d.chunk(owner))])  # it is decoding when the others find its blocks
    other = prefix + prompts[1][:7]
    # The miss runs on blocks of its own: it fills them from block 0 while the owner holds
    # its shuffled ones, which no longer matter.
    miss = t.driver(shuffled=False).alone(other, NEW_TOKENS, f"a prompt sharing {full} block(s)")
    hit = _on_cached(d, other, owner.blocks[:full], full * bs, miss.label)
    compare_streams(hit, miss, t.tolerance, "with the prefix cached while its owner runs")
    kept = d.release(owner, keep=full)
    hit = _on_cached(d, other, kept, full * bs, miss.label)
    compare_streams(hit, miss, t.tolerance, "with the prefix cached after its owner finished")
    d.give(kept)
    return f"{full} shared block(s) of {bs} tokens: hit = miss, owner running or finished"


def _on_cached(d, prompt: list[int], blocks: list[int], cached: int, label: str) -> Seq:
    """A new sequence starting at `cached` on another sequence's blocks, as a cache hit."""
    seq = d.new(prompt, label)
    seq.blocks, seq.computed = list(blocks), cached
    while len(seq.generated) < NEW_TOKENS:
        d.step([(seq, d.chunk(seq))])
    d.release(seq, keep=len(blocks))  # the shared blocks are not this sequence's to free
    return seq


def preemption_recompute(t: Target) -> str:
    d, ref = t.driver(), t.alone(1)
    prompts = t.prompts()
    victim = d.new(prompts[1], ref.label)
    while len(victim.generated) < 3:
        d.step([(victim, d.chunk(victim))])
    d.release(victim, finished=False)  # preempted: its blocks go back, reused at once...
    other = d.new(prompts[2], "another sequence")
    d.step([(other, d.chunk(other))])  # ...by a prompt that overwrites them
    # It returns with the same seq_id, recomputing prompt + generated tokens from position 0.
    d.step([(victim, d.chunk(victim)), (other, d.chunk(other))])
    _finish(d, victim)
    d.release(other)
    compare_streams(victim, ref, t.tolerance, "recomputed after preemption")
    return "preempted after 3 tokens, blocks overwritten, recomputed: same logits and tokens"


VERIFY_TOKENS = 4  # a verify chunk's tokens: the last one and 3 proposals


def verify_tokens(t: Target) -> str:
    """(`verifies_tokens`) A decoding sequence's next K + 1 tokens in one `verify` chunk,
    beside another sequence's decode, must give the logits of feeding them one by one."""
    if not capabilities_of(t.runner).verifies_tokens:
        raise NotApplicable(
            "the runner does not declare verifies_tokens: the engine refuses speculative "
            "decoding on it"
        )
    prompt, other = t.prompts(seed=4)[2], t.prompts(seed=4)[1]
    ref = t.driver(shuffled=False).alone(prompt, VERIFY_TOKENS + 1, "one by one")
    d = t.driver()
    seq, mate = d.new(prompt, ref.label), d.new(other, "a decoding neighbour")
    d.step([(seq, d.chunk(seq)), (mate, d.chunk(mate))])
    seq.tokens = list(ref.tokens[: len(prompt) + VERIFY_TOKENS])
    chunk = dataclasses.replace(
        d.chunk(seq, logits_at=range(VERIFY_TOKENS)), verify=True
    )  # fmt: skip
    rows = d.step([(seq, chunk), (mate, d.chunk(mate))])[0]
    compare_rows(rows, torch.stack(ref.rows[1 : 1 + VERIFY_TOKENS]), t.tolerance, "verified")
    d.release(seq)
    d.release(mate)
    return f"{VERIFY_TOKENS} tokens verified at once = decoded one by one, beside a decode"
