"""The engine core: admission, scheduling, execution and token acceptance, in token ids.

`EngineCore.step()` is its only worker: it takes queued requests, schedules one batch, sends
the step's plan to the executor (the runner in this process, or the ranks of an executor),
fills the grammar bitmask while the forward runs, and accepts the sampled tokens (stop tokens,
grammars, lengths). It reports `CoreOutput`s, token ids only: making text of them, stop
strings and what callers receive are the output processor's (output.py), which may run in
another thread or process. Other threads hand requests in through `add_request` / `abort`,
which only queue them.
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from ..config import EngineConfig
from ..errors import EnginehouseError, RequestError
from ..multimodal import VisionEncoder
from ..spec import ModelSpec
from .block_manager import BlockManager
from .grammar import GrammarCompiler, GrammarState, fill_bitmask
from .lora_slots import AdapterSlots
from .plan import ChunkPlan, StepPlan
from .requests import EngineRequest, RequestChecks, eos_token_ids
from .sampler import PromptScoring, SamplerOutput, batch_of
from .scheduler import Scheduler
from .sequence import CoreOutput, Sequence
from .speculative import (
    SpecStats,
    draft_limit,
    fill_verify_bitmask,
    grammar_prefix,
    make_proposer,
)

log = logging.getLogger(__name__)
# vLLM's buckets for the tokens of one engine step (iteration_tokens_total).
ITERATION_TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)


class EngineCore:
    def __init__(
        self,
        executor: Any,
        tokenizer: Any,
        spec: ModelSpec,
        config: EngineConfig,
        vision: VisionEncoder | None = None,
    ) -> None:
        self.executor = executor  # LocalExecutor, or an executor's driver (executor/)
        self.vision = vision  # turns a prompt's images into embeddings (VLMs only)
        self.tokenizer = tokenizer
        self.config = config
        image_token = vision.image_token_id if vision is not None else None
        self.checks = RequestChecks.for_model(spec, config, tokenizer, image_token)
        self.session_len = self.checks.session_len
        self.vocab_size = self.checks.vocab_size
        self.eos_ids = eos_token_ids(spec, tokenizer)
        kv = executor.kv_spec
        if config.kv_cache_dtype != kv.cache_dtype and config.kv_cache_dtype != "auto":
            raise EnginehouseError(
                f"kv_cache_dtype={config.kv_cache_dtype!r} asks for a quantized KV cache, but "
                "this backend's runner keeps a float one (its KVSpec.cache_dtype is "
                f"{kv.cache_dtype!r}); run it on backend='pytorch' or with kv_cache_dtype='auto'"
            )
        self.block_size = kv.block_size
        self.num_blocks = executor.plan_kv_blocks(config, self.session_len)
        executor.allocate_kv(self.num_blocks)
        caching = config.enable_prefix_caching and kv.prefix_caching
        counts: int | list[int] = self.num_blocks
        if kv.groups:  # one pool per KV group, shared out as the runner shares them
            plans = kv.group_blocks(
                self.num_blocks,
                self.session_len,
                config.max_num_batched_tokens,
                config.max_batch_size,
            )
            counts = [p.blocks for p in plans]
        self.block_manager = BlockManager(counts, kv.block_size, caching, kv.groups)
        self.scheduler = Scheduler(
            self.block_manager, config.max_batch_size, config.max_num_batched_tokens
        )
        self._ids = itertools.count()
        self._inbox: deque[tuple[str, Any]] = deque()
        self._queued: set[str] = set()  # ids of the adds in the inbox: a check in O(1)
        self._seqs: dict[str, Sequence] = {}
        self.grammars = GrammarCompiler(
            tokenizer,
            self.vocab_size,
            timeout=config.grammar_compile_timeout,
            max_workers=config.grammar_compile_workers,
            cache_bytes=config.xgrammar_cache_mb * 2**20,
        )
        self._compiling: list[Sequence] = []  # constrained requests waiting for their grammar
        # Called (from the compile thread) when a grammar is ready, to wake whoever steps.
        self.on_grammar_ready: Callable[[], None] = lambda: None
        # Fills the grammar bitmask while the executor runs the forward pass.
        self._masker: ThreadPoolExecutor | None = None
        self._warned_non_finite = False
        # Steps run and the sequences in them: their ratio is the average batch per step.
        self.num_steps = self.num_step_sequences = 0
        # Tokens per step, counted into vLLM's buckets (iteration_tokens_total).
        self.iteration_tokens = [0] * (len(ITERATION_TOKEN_BUCKETS) + 1)
        self.iteration_tokens_sum = 0
        # Speculative decoding (EngineConfig.speculative_config): None without it.
        self.proposer = make_proposer(config, executor.capabilities, self)
        spec_k = config.speculative_config.k if config.speculative_config else 0
        self.spec_stats = SpecStats(spec_k) if self.proposer is not None else None
        # LoRA adapters in the runner's slots (lora_slots.py); those of the config load now.
        self.adapters = AdapterSlots(executor, spec.config, config.max_loras, config.max_lora_rank)
        for name, source in config.lora_modules.items():
            self.adapters.load(name, source)

    # --- called from any thread -------------------------------------------------------------

    def validate(self, request: EngineRequest) -> None:
        """Raise `RequestError` for a request the engine cannot serve; changes nothing."""
        self.checks.validate(request.prompt_ids, request.params, request.score_only, request.mm)
        if request.params.adapter is not None:
            self.adapters.lookup(request.params.adapter)

    def add_request(self, request: EngineRequest) -> None:
        self.validate(request)
        rid = request.request_id
        if rid in self._seqs or rid in self._queued:
            raise RequestError(f"request id {rid!r} is already in use; give a unique one")
        self._queued.add(rid)
        self._inbox.append(("add", request))

    def abort(self, request_id: str) -> None:
        self._inbox.append(("abort", request_id))

    # --- LoRA adapters: called on the engine thread, between steps -------------------------

    def adapter_call(self, op: str, *args: Any) -> Any:
        """`load` (name, source), `unload` (name) or `list` (): the adapters' one entry point,
        for every client (the in-process one, a core process' messages)."""
        if op == "load":
            self.adapters.load(*args)
            return None
        if op == "unload":
            return self.adapters.unload(*args)
        return self.adapters.describe()

    def has_work(self) -> bool:
        """Some request is unfinished (possibly only waiting for its grammar)."""
        return self.can_step() or bool(self._compiling)

    def can_step(self) -> bool:
        """A step now would do something: requests queued, scheduled or with a grammar ready,
        or freed sequences the runner's side has not been told of yet."""
        s = self.scheduler
        return (
            bool(self._inbox)
            or s.has_work()
            or bool(s.released or s.finished)
            or any(q.compiled_grammar.done() for q in self._compiling)  # type: ignore[union-attr]
        )

    def stats(self) -> dict[str, int]:
        return {
            "running": len(self.scheduler.running),
            "waiting": len(self.scheduler.waiting),
            # vLLM's reasons: "capacity" (no room yet), "deferred" (its grammar compiles).
            "waiting_deferred": len(self._compiling),
            "kv_blocks_used": self.block_manager.num_used,
            "kv_blocks_total": self.num_blocks,
            # Per KV group (`KVSpec.groups`; one entry without groups).
            "kv_group_blocks_used": self.block_manager.used_per_group(),
            "kv_group_blocks_total": [p.num_blocks for p in self.block_manager.pools],
            "preemptions": self.scheduler.num_preemptions,
            # Their ratio is the average batch per step (`enginehouse bench`, `/metrics`).
            "steps": self.num_steps,
            "step_sequences": self.num_step_sequences,
            "iteration_tokens": list(self.iteration_tokens),  # per bucket, the last is +Inf
            "iteration_tokens_sum": self.iteration_tokens_sum,
            **self.executor.counters(),  # what crossed to the ranks, under an executor
            **(self.spec_stats.as_dict() if self.spec_stats is not None else {}),
            **self._lora_stats(),
        }

    def _lora_stats(self) -> dict[str, Any]:
        """Requests running and waiting per LoRA adapter (vLLM's lora_requests_info), once
        adapters are in use; dicts, so that replicas' sums leave them alone."""
        if not self.adapters.used:
            return {}
        s = self.scheduler

        def count(seqs: Any) -> dict[str, int]:
            names = [q.params.adapter for q in seqs if q.params.adapter is not None]
            return {n: names.count(n) for n in sorted(set(names))}

        return {
            "lora_running": count(s.running),
            "lora_waiting": count([*s.waiting, *self._compiling]),
            "max_lora": self.adapters.max_loras,
        }

    # --- the engine thread ------------------------------------------------------------------

    def step(self) -> list[CoreOutput]:
        """One round: take queued requests, run one batch, return every request's news."""
        outputs = self._drain_inbox()
        if self._compiling:
            outputs.extend(self._admit_compiled())
        if self.proposer is not None:
            self._propose()
        scheduled = self.scheduler.schedule()
        if not scheduled:
            self._flush_releases()
            return outputs
        released, finished = self._take_changes()
        plan = StepPlan(released=released, finished=finished, block_size=self.block_size)
        plan.chunks = [chunk for _, chunk in scheduled]
        sampled, owners = self._sampling(plan, scheduled)
        self.num_steps += 1
        self.num_step_sequences += len(scheduled)
        tokens = sum(len(c.token_ids) for c in plan.chunks)
        self.iteration_tokens[bisect.bisect_left(ITERATION_TOKEN_BUCKETS, tokens)] += 1
        self.iteration_tokens_sum += tokens
        try:
            result, grammar_times = self._run(plan, owners)
        except Exception as e:
            log.exception("the backend failed on a batch of %d sequences", len(scheduled))
            error = f"the backend failed: {type(e).__name__}: {e}"
            return outputs + [self._finish(seq, "error", error) for seq, _ in scheduled]
        for seq, chunk in scheduled:
            # Proposals count once accepted (`_accept_tokens`), never before.
            seq.num_computed = chunk.end_pos - len(seq.draft_ids)
            self.block_manager.commit(seq)
            scores = result.scores.get(seq.seq_id)
            if scores is not None or seq.score_only:  # a prompt's last chunk may score nothing
                outputs.extend(self._take_scores(seq, scores))
        if not result.finite:
            self._warn_non_finite(sampled)
        slow = self._too_slow(plan.sampling.constrained, owners, grammar_times)
        for i, (seq, token, lp) in enumerate(zip(sampled, result.token_ids, result.logprobs)):
            if seq.seq_id in slow:
                outputs.append(self._finish(seq, "error", slow[seq.seq_id]))
            elif result.num_accepted:
                outputs.append(self._accept_verified(seq, result, i))
            else:
                outputs.append(self._accept(seq, token, lp))
        return outputs

    def _propose(self) -> None:
        """Ask the proposer for the decoding sequences' next tokens (`Sequence.draft_ids`);
        a grammar keeps only the proposals it accepts."""
        k = self.config.speculative_config.k  # type: ignore[union-attr]
        seqs, limits = [], []
        for seq in self.scheduler.running:
            seq.draft_ids = []
            limit = draft_limit(seq, k)
            decoding = seq.num_tokens - seq.num_computed == 1 and not seq.scores_prompt
            if limit and decoding:
                seqs.append(seq)
                limits.append(limit)
        if not seqs:
            return
        try:
            proposals = self.proposer.propose(seqs, limits)  # type: ignore[union-attr]
        except Exception:  # the target decodes on without proposals; the log says why
            log.exception("the speculative proposer failed; this step proposes nothing")
            return
        for seq, drafts in zip(seqs, proposals):
            if seq.grammar is not None and drafts:
                drafts = grammar_prefix(seq.grammar, list(drafts))
            seq.draft_ids = list(drafts)

    def _accept_verified(self, seq: Sequence, result: SamplerOutput, i: int) -> CoreOutput:
        """Take a verifying step's tokens: the accepted proposals, then the target's token.
        The sequence's computed length (and its prefix-cache keys) grows over the accepted."""
        drafts, accepted = seq.draft_ids, result.num_accepted[i]
        seq.draft_ids = []
        if drafts:
            self.spec_stats.count(len(drafts), accepted)  # type: ignore[union-attr]
        tokens = drafts[:accepted] + [result.token_ids[i]]
        lps = [*result.accepted_logprobs[i], result.logprobs[i]]
        out = self._accept_tokens(seq, tokens, lps)
        if not seq.finished and accepted:
            seq.num_computed += accepted
            self.block_manager.commit(seq)
        return out

    def _too_slow(self, rows: list[int], owners: list[Sequence], times: list[float]) -> dict:
        """The requests whose grammar took longer than `grammar_step_timeout` to give their
        next allowed tokens, and why: they end here, so that they hold up no other step."""
        limit = self.config.grammar_step_timeout
        return {
            owners[i].seq_id: _grammar_too_slow(took, limit)
            for i, took in zip(rows, times)
            if took > limit
        }

    def _take_changes(self) -> tuple[list[int], list[int]]:
        """The scheduler's released and finished sequences; the proposer forgets the latter."""
        released, finished = self.scheduler.take_changes()
        if self.proposer is not None and finished:
            try:  # the proposer's bookkeeping never takes the target's requests down with it
                self.proposer.finish(finished)
            except Exception:
                log.exception("the speculative proposer failed to forget finished sequences")
        return released, finished

    def _flush_releases(self) -> None:
        """Tell the runner's side of the sequences freed since the last step, in a step of its
        own, so that nothing lingers there while no batch runs."""
        released, finished = self._take_changes()
        if not (released or finished):
            return
        plan = StepPlan(released=released, finished=finished, block_size=self.block_size)
        try:
            self._run(plan, [])
        except Exception:  # the blocks are free anyway; the leftovers are the runner's
            log.exception("the runner failed to release %d sequences", len(released))

    def _run(self, plan: StepPlan, owners: list[Sequence]) -> tuple[SamplerOutput, list]:
        """Execute the plan; meanwhile, on a thread of its own, fill the grammar bitmask of the
        constrained rows. The step's tokens, and the seconds each grammar took. `owners`:
        each sampling row's sequence (a verifying sequence has several rows)."""
        constrained = plan.sampling.constrained
        pending: Future | None = None
        if constrained:
            if self._masker is None:
                self._masker = ThreadPoolExecutor(1, thread_name_prefix="enginehouse-mask")
            if plan.sampling.drafts:
                walks = _grammar_walks(owners, constrained)
                pending = self._masker.submit(fill_verify_bitmask, walks, len(owners))
            else:
                grammars = [owners[i].grammar for i in constrained]
                pending = self._masker.submit(fill_bitmask, grammars, constrained, len(owners))
        try:
            self.executor.execute(plan)
        finally:  # the bitmask thread must be done before its grammars change again
            bitmask, times = pending.result() if pending is not None else (None, [])
        return self.executor.sample(bitmask), times

    def _sampling(
        self, plan: StepPlan, scheduled: list[tuple[Sequence, ChunkPlan]]
    ) -> tuple[list[Sequence], list[Sequence]]:
        """The step's `SamplingBatch`; returns the sequences it samples, and each sampling
        row's sequence (a sequence verifying K proposals has K + 1 rows, one per position)."""
        row, rows, sampled, scoring, owners, offsets = 0, [], [], [], [], []
        for seq, chunk in scheduled:
            first, row = row, row + chunk.num_rows
            if seq.scores_prompt:
                scoring.extend(self._scoring(seq, chunk, first))
            reaches_end = chunk.end_pos == seq.num_tokens + len(seq.draft_ids)
            if not seq.score_only and row > first and reaches_end:
                new = not seq.sampler_knows  # the sampler's state starts now
                seq.sampler_knows = True
                for j in range(len(seq.draft_ids) + 1):
                    at = row - 1 - len(seq.draft_ids) + j
                    rows.append((seq.seq_id, at, seq.params, new and j == 0, seq.prompt_ids))
                    owners.append(seq)
                    offsets.append(j)
                sampled.append(seq)
        batch = batch_of(rows)
        batch.scoring, batch.finished = scoring, plan.finished
        if len(owners) > len(sampled):  # some sequence verifies proposals
            batch.drafts = [
                seq.draft_ids[j] if j < len(seq.draft_ids) else -1
                for seq, j in zip(owners, offsets)
            ]
        for i, (seq, j) in enumerate(zip(owners, offsets)):
            p = seq.params
            # A grammar decides itself when the output may end: banning its stop tokens could
            # leave a complete output with no allowed token at all.
            if seq.grammar is not None:
                batch.constrained.append(i)
            elif seq.num_generated + j < p.min_new_tokens and seq.stop_ids:
                batch.banned[0].extend([i] * len(seq.stop_ids))
                batch.banned[1].extend(seq.stop_ids)
        if batch.constrained:
            batch.grammar_vocab = self.grammars.vocab_size
        plan.sampling = batch
        return sampled, owners

    def _scoring(self, seq: Sequence, chunk: ChunkPlan, first_row: int) -> list[PromptScoring]:
        """The prompt positions this chunk scores. Position p predicts token p + 1; the
        prompt's last position predicts nothing known. A score-only request sums them all (and
        keeps each one's logprobs when it asks for prompt logprobs too); otherwise a recompute
        after preemption finds the first prompt logprobs already there and skips them."""
        start, n = chunk.start_pos, len(chunk.token_ids)
        lo = 0 if seq.score_only else max(len(seq.prompt_logprobs) - 1 - start, 0)
        hi = min(seq.num_prompt - 1 - start, n)
        if hi <= lo:
            return []
        targets = tuple(seq.prompt_ids[start + lo + 1 : start + hi + 1])
        top_n = seq.params.prompt_logprobs
        return [PromptScoring(seq.seq_id, first_row + lo, start + lo + 1, targets, top_n)]

    def _take_scores(self, seq: Sequence, scores: Any) -> list[CoreOutput]:
        if scores is not None:
            if seq.score_only:
                seq.prompt_logprob_sum += scores.total
            # Skip the positions a recompute after preemption finds already there.
            have = len(seq.prompt_logprobs) - scores.first_pos
            if scores.logprobs and have >= 0:
                seq.prompt_logprobs.extend(scores.logprobs[have:])
                seq.prompt_ranks.extend(scores.ranks[have:])
        if seq.score_only and seq.num_computed >= seq.num_tokens:
            return [self._finish(seq, "stop")]
        return []

    def _warn_non_finite(self, seqs: list[Sequence]) -> None:
        """Say once that the model computes NaN or inf: its answers are garbage (often empty)."""
        if self._warned_non_finite or not seqs:
            return
        self._warned_non_finite = True
        log.warning(
            "the model produced NaN or infinite logits (first in request %s): "
            "its weights may hold NaN or inf (a corrupt or badly converted checkpoint: download "
            "it again), or its dtype overflows (try dtype='bfloat16' or 'float32'); its output "
            "is garbage",
            seqs[0].request_id,
        )

    def finish_all(self, reason: str, error: str | None = None) -> list[CoreOutput]:
        """Finish every request: with 'error' when a step crashed, 'abort' on shutdown."""
        outputs = self._drain_inbox()
        outputs += [self._finish(seq, reason, error) for seq in list(self._seqs.values())]
        self._flush_releases()
        return outputs

    def _drain_inbox(self) -> list[CoreOutput]:
        outputs, with_images = [], []
        while self._inbox:
            kind, payload = self._inbox.popleft()
            if kind == "add":
                seq = self._try_add(payload)
                if isinstance(seq, CoreOutput):
                    outputs.append(seq)
                elif seq.mm is not None:
                    with_images.append(seq)
            elif payload in self._seqs:
                outputs.append(self._finish(self._seqs[payload], "abort"))
        if with_images:
            outputs.extend(self._encode_images(with_images))
        return outputs

    def _encode_images(self, seqs: list[Sequence]) -> list[CoreOutput]:
        """Embed the new requests' images in one batch; when that fails, one request at a
        time, so that only the request whose images fail ends with the error."""
        assert self.vision is not None
        try:
            embeds = self.vision.encode([s.mm for s in seqs])  # type: ignore[misc]
            results = [(s, e, None) for s, e in zip(seqs, embeds)]
        except Exception:
            results = [self._encode_one(s) for s in seqs]
        outputs = []
        for seq, rows, error in results:
            if error is None and len(rows) != len(seq.mm_positions):
                error = (
                    f"the vision encoder made {len(rows)} embeddings for "
                    f"{len(seq.mm_positions)} image positions"
                )
            if error is None:
                seq.mm_embeds = rows
                # The pixels are not needed again (the data may be shared by several choices).
                seq.mm = dataclasses.replace(seq.mm, inputs={})  # type: ignore[type-var]
            else:
                outputs.append(self._finish(seq, "error", error))
        return outputs

    def _encode_one(self, seq: Sequence) -> tuple[Sequence, Any, str | None]:
        assert self.vision is not None and seq.mm is not None
        try:
            return seq, self.vision.encode([seq.mm])[0], None
        except Exception as e:
            log.exception("the vision encoder failed on request %s", seq.request_id)
            return seq, None, f"the vision encoder failed: {type(e).__name__}: {e}"

    def _try_add(self, request: EngineRequest) -> Sequence | CoreOutput:
        """Admit a queued request; if setting it up fails, only that request ends, with the
        error (a bad request must not take the step, and every other request, down)."""
        rid = request.request_id
        try:
            return self._add(request)
        except Exception as e:
            log.exception("could not set up request %s", rid)
            self._seqs.pop(rid, None)
            error = f"could not set up the request: {type(e).__name__}: {e}"
            return CoreOutput(rid, finish_reason="error", error=error)
        finally:
            self._queued.discard(rid)

    def _add(self, request: EngineRequest) -> Sequence:
        params, prompt_ids = request.params, request.prompt_ids
        if params.random_seed is not None:  # the sampler's generator takes it, or refuses here
            torch.Generator().manual_seed(params.random_seed)
        stop_ids = frozenset(params.stop_token_ids) | (
            frozenset() if params.ignore_eos else self.eos_ids
        )
        seq = Sequence(
            seq_id=next(self._ids),
            request_id=request.request_id,
            prompt_ids=list(prompt_ids),
            params=params,
            stop_ids=stop_ids,
            max_len=self.session_len,
            score_only=request.score_only,
            arrived=time.monotonic(),
        )
        if params.adapter is not None:
            adapter = self.adapters.lookup(params.adapter)
            seq.adapter_slot, seq.adapter_load_id = adapter.slot, adapter.load_id
            adapter.requests += 1
        if request.mm is not None and self.vision is not None:
            image_id = self.vision.image_token_id
            seq.mm = request.mm
            seq.mm_positions = [i for i, t in enumerate(prompt_ids) if t == image_id]
        self._seqs[request.request_id] = seq
        constraint = params.constraint
        if constraint is None:
            self.scheduler.add(seq)
        else:
            # Scheduled once its grammar is compiled (at once when cached); others run on.
            seq.compiled_grammar = self.grammars.compile(constraint)
            self._compiling.append(seq)
            seq.compiled_grammar.add_done_callback(lambda _: self.on_grammar_ready())
        return seq

    def _admit_compiled(self) -> list[CoreOutput]:
        """Schedule the requests whose grammar is ready; fail those whose grammar failed."""
        outputs = []
        for seq in [s for s in self._compiling if s.compiled_grammar.done()]:  # type: ignore
            self._compiling.remove(seq)
            try:
                compiled = seq.compiled_grammar.result()  # type: ignore[union-attr]
                guard = self.grammars.utf8
                seq.grammar = GrammarState(compiled, seq.stop_ids or self.eos_ids, guard)
            except Exception as e:
                error = str(e) if isinstance(e, RequestError) else f"{type(e).__name__}: {e}"
                outputs.append(self._finish(seq, "error", error))
                continue
            self.scheduler.add(seq)
        return outputs

    def _accept(self, seq: Sequence, token: int, logprobs: dict | None) -> CoreOutput:
        """Take a sampled token: the grammar walks it, a stop token or a length ends it."""
        return self._accept_tokens(seq, [token], [logprobs])

    def _accept_tokens(
        self, seq: Sequence, tokens: list[int], logprobs: list[dict | None]
    ) -> CoreOutput:
        """Take a step's tokens in order (one, or a verifying step's several): the grammar
        walks each, and a stop token or a length ends the sequence there."""
        if seq.first_token_at is None:
            seq.first_token_at = time.monotonic()
        for n, token in enumerate(tokens, 1):
            seq.token_ids.append(token)
            taken = tokens[:n]
            lps = logprobs[:n] if logprobs[0] is not None else None
            started = time.perf_counter()
            if seq.grammar is not None and not seq.grammar.accept(token):
                # Only possible when every token was masked (a vocabulary the grammar does
                # not cover): better an error than an output that breaks its constraint.
                text = self.tokenizer.decode([token])
                error = f"token {token} ({text!r}) breaks the grammar"
                return self._finish(seq, "error", error, taken, lps, stop_token=True)
            took = time.perf_counter() - started
            if seq.grammar is not None and took > self.config.grammar_step_timeout:
                error = _grammar_too_slow(took, self.config.grammar_step_timeout)
                return self._finish(seq, "error", error, taken, lps)
            if token in seq.stop_ids or (seq.grammar is not None and seq.grammar.terminated):
                return self._finish(seq, "stop", None, taken, lps, stop_token=True)
            if seq.num_generated >= seq.params.max_new_tokens or seq.num_tokens >= seq.max_len:
                return self._finish(seq, "length", None, taken, lps)
        lps = logprobs if logprobs[0] is not None else None
        return self._output(seq, tokens, lps)

    def _finish(
        self,
        seq: Sequence,
        reason: str,
        error: str | None = None,
        tokens: list[int] | None = None,
        logprobs: list | None = None,
        stop_token: bool = False,
    ) -> CoreOutput:
        seq.finish_reason = reason
        self.scheduler.finish(seq)
        if seq.adapter_slot:
            self.adapters.resident[seq.params.adapter].requests -= 1  # type: ignore[index]
        self._seqs.pop(seq.request_id, None)
        if seq in self._compiling:
            self._compiling.remove(seq)
            seq.compiled_grammar.cancel()  # type: ignore[union-attr]  # its compile may stop
        seq.grammar = seq.compiled_grammar = None
        out = self._output(seq, tokens or [], logprobs)
        out.finish_reason, out.error, out.stop_token = reason, error, stop_token
        if seq.score_only:
            out.prompt_logprob_sum = seq.prompt_logprob_sum
        return out

    def _output(self, seq: Sequence, tokens: list[int], logprobs: list | None) -> CoreOutput:
        out = CoreOutput(
            seq.request_id,
            token_ids=tokens,
            logprobs=logprobs if seq.params.logprobs is not None else None,
            num_prompt=seq.num_prompt,
            cached_tokens=seq.cached_tokens,
        )
        if seq.params.prompt_logprobs is not None and not seq.prompt_logprobs_sent:
            if len(seq.prompt_logprobs) == seq.num_prompt:  # complete: send them once
                out.prompt_logprobs, out.prompt_ranks = seq.prompt_logprobs, seq.prompt_ranks
                seq.prompt_logprobs_sent = True
        # The timing goes with the end, and with every step of a request that may end on a
        # stop string (the output processor ends those, without the core's last word).
        if seq.finish_reason is not None or seq.params.stop_words:
            out.timing = _timing(seq)
        return out

    def close(self) -> None:
        if self.proposer is not None:
            self.proposer.close()
        self.grammars.close()
        if self._masker is not None:
            self._masker.shutdown(wait=True)
        self.executor.close()


def _grammar_walks(
    owners: list[Sequence], constrained: list[int]
) -> list[tuple[GrammarState, list[int], list[int]]]:
    """Per constrained sequence of a verifying step: its grammar, its rows, its proposals."""
    rows: dict[int, list[int]] = {}
    seqs: dict[int, Sequence] = {}
    for i in constrained:
        rows.setdefault(owners[i].seq_id, []).append(i)
        seqs[owners[i].seq_id] = owners[i]
    return [(seqs[s].grammar, r, seqs[s].draft_ids) for s, r in rows.items()]  # type: ignore[misc]


def _timing(seq: Sequence) -> dict[str, float]:
    """Seconds queued (arrival to first scheduled), in prefill (to the first token), in decode
    (since), in the engine (since first scheduled), as of now; and the preemptions."""
    now = time.monotonic()
    scheduled = seq.scheduled_at if seq.scheduled_at is not None else now
    first = seq.first_token_at if seq.first_token_at is not None else now
    return {
        "queue": scheduled - seq.arrived,
        "prefill": first - scheduled,
        "decode": now - first,
        "inference": now - scheduled,
        "preemptions": seq.num_preemptions,
    }


def _grammar_too_slow(took: float, limit: float) -> str:
    return (
        f"the output's grammar took {took * 1e3:.0f} ms to follow one token, more than "
        f"grammar_step_timeout ({limit * 1e3:.0f} ms; --grammar-step-timeout): an ambiguous "
        "grammar gets slower with every token; make it unambiguous"
    )
