"""The engine step: schedule, run the backend, sample, detokenize, stop.

`LLMEngine` is synchronous and single-threaded: `step()` is its only worker. Other threads hand
it requests and aborts through `add_request` / `abort`, which only queue them; the next step
picks them up. `AsyncEngine` (async_engine.py) drives it from its own thread.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
from collections import deque
from collections.abc import Callable
from typing import Any

import torch

from ..config import EngineConfig, GenerationConfig, format_size
from ..device import available_memory
from ..errors import EnginehouseError, RequestError
from ..multimodal import MultiModalData, VisionEncoder
from ..runner import ModelRunner, RunnerContext, ScheduledBatch, session_length
from ..spec import ModelSpec
from .block_manager import BlockManager
from .detokenizer import IncrementalDetokenizer, text_decoder
from .grammar import GrammarCompiler, GrammarState, xgrammar
from .sampler import sample
from .scheduler import Scheduler
from .sequence import RequestOutput, Sequence
from .stop_strings import StopStrings

log = logging.getLogger(__name__)


def eos_token_ids(spec: ModelSpec, tokenizer: Any) -> frozenset[int]:
    ids = spec.generation_config.get("eos_token_id", spec.config.get("eos_token_id"))
    ids = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(tokenizer.eos_token_id)
    return frozenset(int(i) for i in ids)


def plan_kv_blocks(
    runner: ModelRunner,
    config: EngineConfig,
    session_len: int,
    context: RunnerContext | None = None,
) -> int:
    """Turn the KV budget into a number of blocks, after a profiling pass where supported.

    A rank of a sharded model (`context`) plans from its own device; CPU ranks on one machine
    share its memory, so each takes its part of the fraction."""
    kv = runner.kv_spec
    profile = getattr(runner, "profile_run", None)
    if profile is not None:
        profile(config.max_num_batched_tokens)  # so that activations are already counted
    budget = config.kv_cache_memory
    if isinstance(budget, float):
        share = context.local_world_size if context and kv.device.type == "cpu" else 1
        budget = int(available_memory(kv.device) * budget / share)
    per_seq = math.ceil(session_len / kv.block_size)
    # Blocks beyond what max_batch_size full-length sequences can use would sit idle.
    blocks = min(budget // kv.bytes_per_block, per_seq * config.max_batch_size)
    if blocks < per_seq:
        raise EnginehouseError(
            f"the KV cache budget ({format_size(budget)}) holds {blocks * kv.block_size} "
            f"tokens, less than one full context of {session_len}; raise "
            "EngineConfig(kv_cache_memory=...) or lower session_len"
        )
    return blocks


class LLMEngine:
    def __init__(
        self,
        runner: ModelRunner,
        tokenizer: Any,
        spec: ModelSpec,
        config: EngineConfig,
        vision: VisionEncoder | None = None,
    ) -> None:
        self.runner = runner
        self.vision = vision  # turns a prompt's images into embeddings (VLMs only)
        self.tokenizer = tokenizer
        self.config = config
        self.session_len = session_length(spec, config)
        self.vocab_size = int(spec.config.get("vocab_size") or len(tokenizer))
        self.eos_ids = eos_token_ids(spec, tokenizer)
        self.decode = text_decoder(tokenizer)
        kv = runner.kv_spec
        self.block_size = kv.block_size
        # An executor (tp > 1) asks every rank and takes the smallest plan.
        planner = getattr(runner, "plan_kv_blocks", None)
        if planner is not None:
            self.num_blocks = planner(config, self.session_len)
        else:
            self.num_blocks = plan_kv_blocks(runner, config, self.session_len)
        runner.allocate_kv(self.num_blocks)
        caching = config.enable_prefix_caching and kv.prefix_caching
        self.block_manager = BlockManager(self.num_blocks, kv.block_size, caching)
        self.scheduler = Scheduler(
            self.block_manager,
            config.max_batch_size,
            config.max_num_batched_tokens,
            self._release if hasattr(runner, "release_sequence") else None,
        )
        self._ids = itertools.count()
        self._inbox: deque[tuple[str, Any]] = deque()
        self._queued: set[str] = set()  # ids of the adds in the inbox: a check in O(1)
        self._seqs: dict[str, Sequence] = {}
        self.grammars = GrammarCompiler(tokenizer, self.vocab_size)
        self._compiling: list[Sequence] = []  # constrained requests waiting for their grammar
        # Called (from the compile thread) when a grammar is ready, to wake whoever steps.
        self.on_grammar_ready: Callable[[], None] = lambda: None
        self._warned_non_finite = False
        # Steps run and the sequences in them: their ratio is the average batch per step.
        self.num_steps = self.num_step_sequences = 0

    def _release(self, seq: Sequence) -> None:
        """Tell the runner a sequence's blocks are going (it may keep state of its own)."""
        try:
            self.runner.release_sequence(seq.seq_id, tuple(seq.block_table))  # type: ignore[attr-defined]
        except Exception:  # the blocks are freed anyway; the runner's leftovers are its own
            log.exception("the runner failed to release sequence %s", seq.request_id)

    # --- called from any thread -------------------------------------------------------------

    def validate(
        self,
        prompt_ids: list[int],
        params: GenerationConfig,
        score_only: bool = False,
        mm: MultiModalData | None = None,
    ) -> None:
        """Raise `RequestError` for a request the engine cannot serve; changes nothing."""
        if not prompt_ids:
            raise RequestError("the prompt is empty; give at least one token")
        if mm is not None:
            self._validate_images(prompt_ids, mm)
        elif self.vision is not None and self.vision.image_token_id in prompt_ids:
            raise RequestError(
                "the prompt has image tokens but no images; pass the images with the prompt, "
                "e.g. (text, image), and let the pipeline place their tokens"
            )
        for what, ids in (("token id", prompt_ids), ("stop_token_ids", params.stop_token_ids)):
            bad = [t for t in ids if not 0 <= t < self.vocab_size]
            if bad:
                raise RequestError(
                    f"{what} {bad[0]} is outside the vocabulary (0..{self.vocab_size - 1})"
                )
        if params.constraint is not None:
            xgrammar()  # a clear error naming the extra when xgrammar is missing
        self.check_length(len(prompt_ids), score_only)

    def check_length(self, prompt_len: int, score_only: bool = False) -> None:
        """A prompt must leave room for one generated token (or, scored only, just fit)."""
        if prompt_len > (self.session_len if score_only else self.session_len - 1):
            room = "" if score_only else ", leaving no room to generate"
            raise RequestError(
                f"the prompt has {prompt_len} tokens but the context holds "
                f"{self.session_len}{room}; shorten the prompt or raise the session length "
                "(EngineConfig(session_len=...), --session-len) up to the model's context length"
            )

    def _validate_images(self, prompt_ids: list[int], mm: MultiModalData) -> None:
        if self.vision is None:
            raise RequestError(
                "this model takes text only, but the prompt has images; use a vision-language "
                "model (see `enginehouse explain MODEL`)"
            )
        found = prompt_ids.count(self.vision.image_token_id)
        if found != mm.num_image_tokens:
            raise RequestError(
                f"the prompt has {found} image token positions but its images make "
                f"{mm.num_image_tokens}; let the pipeline expand the image placeholders"
            )

    def add_request(
        self,
        request_id: str,
        prompt_ids: list[int],
        params: GenerationConfig,
        score_only: bool = False,
        mm: MultiModalData | None = None,
    ) -> None:
        self.validate(prompt_ids, params, score_only, mm)
        if request_id in self._seqs or request_id in self._queued:
            raise RequestError(f"request id {request_id!r} is already in use; give a unique one")
        self._queued.add(request_id)
        self._inbox.append(("add", (request_id, list(prompt_ids), params, score_only, mm)))

    def abort(self, request_id: str) -> None:
        self._inbox.append(("abort", request_id))

    def has_work(self) -> bool:
        """Some request is unfinished (possibly only waiting for its grammar)."""
        return self.can_step() or bool(self._compiling)

    def can_step(self) -> bool:
        """A step now would do something: requests queued, scheduled or with a grammar ready."""
        return (
            bool(self._inbox)
            or self.scheduler.has_work()
            or any(s.compiled_grammar.done() for s in self._compiling)  # type: ignore[union-attr]
        )

    def stats(self) -> dict[str, int]:
        return {
            "running": len(self.scheduler.running),
            "waiting": len(self.scheduler.waiting),
            "kv_blocks_used": self.block_manager.num_used,
            "kv_blocks_total": self.num_blocks,
            "preemptions": self.scheduler.num_preemptions,
            # Their ratio is the average batch per step (`enginehouse bench`, `/metrics`).
            "steps": self.num_steps,
            "step_sequences": self.num_step_sequences,
        }

    # --- the engine thread ------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """One round: take queued requests, run one batch, return every request's news."""
        outputs = self._drain_inbox()
        if self._compiling:
            outputs.extend(self._admit_compiled())
        scheduled = self.scheduler.schedule()
        if not scheduled:
            return outputs
        batch = ScheduledBatch(tuple(chunk for _, chunk in scheduled), self.block_size)
        self.num_steps += 1
        self.num_step_sequences += len(scheduled)
        try:
            logits = self.runner.execute(batch)
        except Exception as e:
            log.exception("the backend failed on a batch of %d sequences", len(scheduled))
            error = f"the backend failed: {type(e).__name__}: {e}"
            return outputs + [self._finish(seq, "error", error) for seq, _ in scheduled]
        row, to_sample, rows = 0, [], []
        for seq, chunk in scheduled:
            first, row = row, row + len(chunk.logits_at)
            seq.num_computed = chunk.end_pos
            self.block_manager.commit(seq)
            if seq.params.prompt_logprobs is not None and len(seq.prompt_logprobs) < seq.num_prompt:
                self._prompt_logprobs(seq, chunk.start_pos, logits[first:row])
            if seq.score_only:
                outputs.extend(self._score(seq, chunk.start_pos, logits[first:row]))
            elif row > first and chunk.end_pos == seq.num_tokens:
                to_sample.append(seq)
                rows.append(row - 1)
        if to_sample:
            # A decode-only batch samples every row: the logits as they are, not a copy.
            picked = logits if rows == list(range(len(logits))) else logits[rows]
            tokens, logprobs, finite = sample(picked, to_sample)
            if not finite:
                self._warn_non_finite(to_sample)
            for seq, token, lp in zip(to_sample, tokens, logprobs):
                outputs.append(self._append(seq, token, lp))
        return outputs

    def _warn_non_finite(self, seqs: list[Sequence]) -> None:
        """Say once that the model computes NaN or inf: its answers are garbage (often empty)."""
        if self._warned_non_finite:
            return
        self._warned_non_finite = True
        log.warning(
            "the model produced NaN or infinite logits (first in request %s): "
            "its weights may hold NaN or inf (a corrupt or badly converted checkpoint: download "
            "it again), or its dtype overflows (try dtype='bfloat16' or 'float32'); its output "
            "is garbage",
            seqs[0].request_id,
        )

    def finish_all(self, reason: str, error: str | None = None) -> list[RequestOutput]:
        """Finish every request: with 'error' when a step crashed, 'abort' on shutdown."""
        outputs = self._drain_inbox()
        return outputs + [self._finish(seq, reason, error) for seq in list(self._seqs.values())]

    def _drain_inbox(self) -> list[RequestOutput]:
        outputs, with_images = [], []
        while self._inbox:
            kind, payload = self._inbox.popleft()
            if kind == "add":
                seq = self._try_add(payload)
                if isinstance(seq, RequestOutput):
                    outputs.append(seq)
                elif seq.mm is not None:
                    with_images.append(seq)
            elif payload in self._seqs:
                outputs.append(self._finish(self._seqs[payload], "abort"))
        if with_images:
            outputs.extend(self._encode_images(with_images))
        return outputs

    def _encode_images(self, seqs: list[Sequence]) -> list[RequestOutput]:
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

    def _try_add(self, payload: tuple) -> Sequence | RequestOutput:
        """Admit a queued request; if setting it up fails, only that request ends, with the
        error (a bad request must not take the step, and every other request, down)."""
        request_id = payload[0]
        try:
            return self._add(*payload)
        except Exception as e:
            log.exception("could not set up request %s", request_id)
            self._seqs.pop(request_id, None)
            error = f"could not set up the request: {type(e).__name__}: {e}"
            return RequestOutput(request_id, finished=True, finish_reason="error", error=error)
        finally:
            self._queued.discard(request_id)

    def _add(
        self,
        request_id: str,
        prompt_ids: list[int],
        params: GenerationConfig,
        score: bool,
        mm: MultiModalData | None = None,
    ) -> Sequence:
        stop_ids = frozenset(params.stop_token_ids) | (
            frozenset() if params.ignore_eos else self.eos_ids
        )
        generator = torch.Generator()
        if params.random_seed is None:
            generator.seed()
        else:
            generator.manual_seed(params.random_seed)
        seq = Sequence(
            seq_id=next(self._ids),
            request_id=request_id,
            prompt_ids=prompt_ids,
            params=params,
            stop_ids=stop_ids,
            max_len=self.session_len,
            score_only=score,
            generator=generator,
            detokenizer=IncrementalDetokenizer(self.decode, prompt_ids, params.skip_special_tokens),
        )
        if mm is not None and self.vision is not None:
            image_id = self.vision.image_token_id
            seq.mm = mm
            seq.mm_positions = [i for i, t in enumerate(prompt_ids) if t == image_id]
        self._seqs[request_id] = seq
        constraint = params.constraint
        if constraint is None:
            self.scheduler.add(seq)
        else:
            # Scheduled once its grammar is compiled (at once when cached); others run on.
            seq.compiled_grammar = self.grammars.compile(constraint)
            self._compiling.append(seq)
            seq.compiled_grammar.add_done_callback(lambda _: self.on_grammar_ready())
        return seq

    def _admit_compiled(self) -> list[RequestOutput]:
        """Schedule the requests whose grammar is ready; fail those whose grammar failed."""
        outputs = []
        for seq in [s for s in self._compiling if s.compiled_grammar.done()]:  # type: ignore
            self._compiling.remove(seq)
            try:
                compiled = seq.compiled_grammar.result()
                guard = self.grammars.utf8
                seq.grammar = GrammarState(compiled, self._grammar_stops(seq), guard)
            except Exception as e:
                error = str(e) if isinstance(e, RequestError) else f"{type(e).__name__}: {e}"
                outputs.append(self._finish(seq, "error", error))
                continue
            self.scheduler.add(seq)
        return outputs

    def _grammar_stops(self, seq: Sequence) -> frozenset[int]:
        # With ignore_eos a grammar still needs a token that ends it: the model's EOS.
        return seq.stop_ids or self.eos_ids

    def _score(self, seq: Sequence, start: int, logits: torch.Tensor) -> list[RequestOutput]:
        # Position p predicts token p+1; the prompt's last position predicts nothing we know.
        targets = seq.token_ids[start + 1 : start + 1 + len(logits)]
        if targets:
            lp = logits[: len(targets)].float().log_softmax(dim=-1)
            index = torch.tensor(targets, device=lp.device).unsqueeze(1)
            seq.prompt_logprob_sum += lp.gather(1, index).sum().item()
        if seq.num_computed < seq.num_tokens:
            return []
        return [self._finish(seq, "stop")]

    def _prompt_logprobs(self, seq: Sequence, start: int, logits: torch.Tensor) -> None:
        """Add the prompt positions this chunk scores that are still missing (a recompute
        after preemption finds the first ones already there): the logprob and rank of each
        prompt token, and the top-N of its row."""
        first = len(seq.prompt_logprobs)  # the next prompt token to score
        rows = slice(first - 1 - start, seq.num_prompt - 1 - start)  # row p predicts p + 1
        lp = logits[max(rows.start, 0) : rows.stop].float().log_softmax(dim=-1)
        if lp.shape[0] == 0:
            return
        targets = torch.tensor(seq.prompt_ids[first : first + lp.shape[0]], device=lp.device)
        chosen = lp.gather(1, targets.unsqueeze(1))
        ranks = (lp > chosen).sum(dim=1) + 1
        top_n = seq.params.prompt_logprobs or 0
        top = lp.topk(top_n) if top_n else None
        for i, (token, value) in enumerate(zip(targets.tolist(), chosen.squeeze(1).tolist())):
            entry = {token: value}
            if top is not None:
                entry.update(zip(top.indices[i].tolist(), top.values[i].tolist()))
            seq.prompt_logprobs.append(entry)
        seq.prompt_ranks.extend(ranks.tolist())

    def _append(self, seq: Sequence, token: int, logprobs: dict | None) -> RequestOutput:
        seq.token_ids.append(token)
        if logprobs is not None:
            seq.logprobs.append(logprobs)
        p = seq.params
        if seq.grammar is not None and not seq.grammar.accept(token):
            # Only possible when every token was masked (a vocabulary the grammar does not
            # cover): better an error than an output that breaks its constraint.
            text = self.tokenizer.decode([token])
            return self._finish(seq, "error", f"token {token} ({text!r}) breaks the grammar")
        if token in seq.stop_ids or (seq.grammar is not None and seq.grammar.terminated):
            return self._finish(seq, "stop")
        old_len = len(seq.text)
        seq.text += seq.detokenizer.add(token)
        if p.stop_words and self._cut_at_stop_word(seq, old_len):
            return self._finish(seq, "stop", flush=False)
        if seq.num_generated >= p.max_new_tokens or seq.num_tokens >= seq.max_len:
            return self._finish(seq, "length")
        return self._output(seq)

    def _cut_at_stop_word(self, seq: Sequence, old_len: int) -> bool:
        # From the first character not yet sent: what `_output` held back, then the new text.
        cut, _ = StopStrings.of(seq.params.stop_words).scan(seq.text, seq.emitted_text)
        if cut is None:
            return False
        seq.text = seq.text[:cut]  # the stop word itself is not part of the output
        return True

    def _finish(
        self, seq: Sequence, reason: str, error: str | None = None, flush: bool = True
    ) -> RequestOutput:
        if flush and seq.detokenizer is not None and not seq.finished:
            seq.text += seq.detokenizer.flush()
        seq.finish_reason = reason
        self.scheduler.finish(seq)
        self._seqs.pop(seq.request_id, None)
        if seq in self._compiling:
            self._compiling.remove(seq)
        seq.grammar = seq.compiled_grammar = None
        out = self._output(seq)
        out.error = error
        return out

    def _output(self, seq: Sequence) -> RequestOutput:
        """The news since the last output: new text (held back while it may start a stop
        word), new tokens, their logprobs; the totals when the request is finished."""
        end = len(seq.text)
        if not seq.finished and seq.params.stop_words:
            # Only what may still become a stop string (the end that begins one) is held.
            _, hold = StopStrings.of(seq.params.stop_words).scan(seq.text, seq.emitted_text)
            end = max(seq.emitted_text, end - hold)
        new_ids = seq.generated_ids[seq.emitted_tokens :]
        out = RequestOutput(
            request_id=seq.request_id,
            text=seq.text[seq.emitted_text : end],
            token_ids=new_ids,
            logprobs=seq.logprobs[seq.emitted_tokens :]
            if seq.params.logprobs is not None
            else None,
            finished=seq.finished,
            finish_reason=seq.finish_reason,
            input_token_len=seq.num_prompt,
            generate_token_len=seq.num_generated,
            cached_tokens=seq.cached_tokens,
            prompt_logprob_sum=seq.prompt_logprob_sum if seq.score_only else None,
        )
        if seq.params.prompt_logprobs is not None and not seq.prompt_logprobs_sent:
            if len(seq.prompt_logprobs) == seq.num_prompt:  # complete: send them once
                out.prompt_logprobs, out.prompt_ranks = seq.prompt_logprobs, seq.prompt_ranks
                seq.prompt_logprobs_sent = True
        seq.emitted_text, seq.emitted_tokens = end, seq.num_generated
        return out
