"""The native `pytorch` backend: our own decoder implementations over a paged KV cache.

Per step the runner orders the batch decodes first, builds the step's metadata once (rope
rows, KV slots, gather indices and masks, see `native.attention`), runs the model over all
tokens packed together, and returns logits only for the rows the engine asked for.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from enginehouse import EngineConfig, KVSpec, ModelSpec, ScheduledBatch, SeqChunk
from enginehouse.plugin_api import (
    InvalidModelError,
    KVGroup,
    LoraAdapter,
    RunnerCapabilities,
    RunnerContext,
    image_runs,
    resolve_device,
    resolve_dtype,
    use_all_cores,
)

from .native import cpu_decode, cpu_kernels, cpu_step, kv_cache, kv_quant, mla, quant, verify_rows
from .native.arch import Arch, UnsupportedModel, arch_from_config, language_model
from .native.attention import StepMeta, TorchAttention, decode_metadata, prefill_metadata
from .native.families import renamer
from .native.layers import can_pack
from .native.lora import LoraModel
from .native.model import DecoderLM, Embeds
from .native.mxfp4 import is_mxfp4
from .native.parallel import TensorParallel
from .native.quant import fp8_float
from .native.rope import mrope_rows, rope_table
from .native.shm_collectives import ShmCollectives, usable
from .native.weights import load_safetensors

DEFAULT_BLOCK_SIZE = 16


def quant_scheme(spec: ModelSpec, config: EngineConfig, arch: Arch) -> quant.QuantScheme | None:
    """The quantization to run with (checkpoint or `EngineConfig.quantization`), checked
    against the model's shapes; `InvalidModelError` where the native backend cannot run it."""
    from .native.quant.scheme import check_shapes, read_scheme

    try:
        scheme = read_scheme(spec.config, config.quantization, config.quantization_group_size)
        if scheme is not None:
            check_shapes(scheme, arch)
    except UnsupportedModel as e:
        raise InvalidModelError(str(e)) from None
    return scheme


class NativeRunner:
    # profile_run: a forward pass on a GPU. verifies_tokens: a `verify` chunk's positions
    # attend as decode rows, each over its own prefix (`_decode_rows`), or, for the Triton
    # kernel, as one sequence's queries (native/verify_rows.py). lora: adapters in slots
    # (native/lora.py).
    capabilities = RunnerCapabilities(profiles=True, verifies_tokens=True, lora=True)

    def __init__(self, spec: ModelSpec, config: EngineConfig, context: RunnerContext) -> None:
        self.spec = spec
        self.config = config
        self.arch: Arch = arch_from_config(
            *language_model(spec.architecture, spec.config, spec.facts)
        )
        # A VLM's checkpoint also holds the vision tower: load only the language model's part.
        self.prefixes = spec.facts.get("text_weight_prefixes") if spec.is_vlm else None
        # Gemma 3: an image's tokens attend to each other both ways in the prefill.
        self.images_both_ways = spec.is_vlm and spec.facts.get("image_attention") == "bidirectional"
        self.device = resolve_device(config)
        if context.sharded and self.device.type == "cuda":
            self.device = torch.device("cuda", context.local_rank)  # one GPU per rank
        self.dtype = resolve_dtype(config, spec, self.device)
        self.quant = quant_scheme(spec, config, self.arch)
        # This rank's share of the heads, the MLP and the vocabulary (all of it at tp=1).
        shm = None
        if self.device.type == "cpu" and usable(context.world_size, context.local_world_size):
            # Twice the executor's timeout: a silent rank is for the executor to find (it names
            # every silent rank and stops them all); a collective that gave up first would
            # fail only the step and leave the silent rank behind.
            timeout = 2 * config.distributed_timeout
            shm = ShmCollectives.join(context.rank, context.world_size, timeout)
        self.tp = TensorParallel(self.arch, context.rank, context.world_size, shm)
        # An FP8 checkpoint: its experts (and MLA's kv_b_proj) are dequantized at load; every
        # projection is where `dequantizes_all` says why (a hybrid, a block split by tp).
        self.fp8 = self.quant if self.quant is not None and self.quant.method == "fp8" else None
        if self.fp8 and fp8_float.dequantizes_all(self.arch, self.tp.size, self.fp8.block):
            self.quant = None
        self.context = context.session_len
        self.block_size = config.block_size or DEFAULT_BLOCK_SIZE
        a, kv_heads = self.arch, self.tp.kv_heads
        # "int8" / "fp8": a quantized KV cache (native/kv_quant.py).
        self.kv_kind = config.kv_cache_dtype
        head = kv_quant.head_bytes(self.kv_kind, a.head_dim, self.dtype)
        per_token = 2 * a.num_layers * kv_heads * head
        # Layers grouped by sliding window (native/kv_cache.py): a sliding group's blocks that
        # fall out of its window are freed while a sequence runs.
        self.layer_groups = kv_cache.layer_groups(a)
        groups = kv_cache.kv_groups(a, kv_heads, head)
        if a.mla is not None:  # a cache of kind "mla": the latent and rope key per token
            if self.kv_kind != "auto":
                raise InvalidModelError(
                    f"kv_cache_dtype={self.kv_kind!r}: the latent (MLA) cache of "
                    f"{a.family} is kept in the model's dtype; use kv_cache_dtype='auto'"
                )
            per_token = mla.cache_bytes_per_token(a, self.dtype)
            groups = (KVGroup("mla", tuple(range(a.num_layers)), bytes_per_token=per_token),)
        self.kv_spec = KVSpec(
            block_size=self.block_size,
            bytes_per_block=per_token * self.block_size,
            dtype=self.dtype,
            device=self.device,
            groups=groups,
            cache_dtype=self.kv_kind,
        )
        self.windows = set(a.windows) if a.windows else {None}
        self.caches: list[kv_cache.GroupCache] = []
        self.model: DecoderLM | None = None
        self.kv: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.kernel = self._attention_kernel()
        # A kernel that reads block tables, not the torch path's gathers (a quantized cache:
        # the kernels that read it in place only, `reads_tables`).
        quantized = self.kv_kind != "auto"
        self.paged = self.kernel is not TorchAttention and not quantized
        self.paged |= getattr(self.kernel, "reads_tables", False)
        self.graphs = None  # CUDA graphs of decode steps, captured after the KV is allocated
        self.decode: cpu_step.DecodeRunner | None = None  # CPU: small decode steps in one call
        self.lora: LoraModel | None = None  # the adapters' slots, made at the first load
        # A draft head on the target's hidden states (draft_runner.py): its forwards keep them.
        self.drafter = None

    def _attention_kernel(self) -> type[TorchAttention]:
        """Triton's paged kernels on a GPU where triton imports; torch ops otherwise."""
        if self.arch.mla is not None:  # these kernels read K/V heads: MLA attends in torch ops
            return TorchAttention
        # A quantized KV cache's decode: the C++ paged kernel (int8 and fp8, sinks too) on the
        # CPU; Triton's (int8 with its scales, fp8 with its per-tensor scales, sinks too) on a
        # GPU; the torch path otherwise.
        if self.kv_kind != "auto" and self.device.type == "cpu" and cpu_kernels.load():
            return cpu_kernels.quantized_attention(self.kv_kind)
        if self.kv_kind != "auto" and self.device.type == "cuda":
            try:
                from .native.triton_ops import TritonFp8Attention, TritonInt8Attention

                return TritonInt8Attention if self.kv_kind == "int8" else TritonFp8Attention
            except ImportError:
                pass
        if self.kv_kind != "auto":
            return kv_quant.attention_for(self.kv_kind)
        if self.device.type == "cpu":
            if self.dtype in (torch.float32, torch.bfloat16) and cpu_kernels.load():
                return cpu_kernels.CpuPagedAttention
            return TorchAttention
        if self.device.type != "cuda":
            return TorchAttention
        try:
            from .native.triton_ops import TritonAttention
        except ImportError:
            return TorchAttention
        return TritonAttention

    def _fused(self) -> bool:
        """The CPU's small-step kernels (`native.cpu_decode`): float32 or bfloat16, built."""
        cpu = self.device.type == "cpu" and self.dtype in (torch.float32, torch.bfloat16)
        # The fused ops store K/V into a float cache: a quantized one takes the per-op path.
        return cpu and self.kv_kind == "auto" and cpu_decode.load()

    def load(self, progress: bool = True) -> None:
        if self.device.type == "cpu":
            use_all_cores()
        files = [self.spec.path / f for f in self.spec.weight_files if f.endswith(".safetensors")]
        if not files:
            raise InvalidModelError(f"no *.safetensors weights in {self.spec.path}")
        # A quantized checkpoint's model is laid out on the meta device first, so that its
        # projections take no float memory before they become quantized layers.
        prequantized = self.quant is not None and not self.quant.at_load
        default = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)  # parameters are created empty in the final dtype
        try:
            with torch.device("meta" if prequantized else self.device):
                model = DecoderLM(self.arch, self.kernel, self.tp)
        finally:
            torch.set_default_dtype(default)
        if prequantized:
            quant.prepare(
                model, self.quant, quant.quantized_modules(files, self.quant, self.prefixes)
            )
            model.to_empty(device=self.device)
            if self.arch.tie_embeddings and not hasattr(model.lm_head, "take"):
                model.lm_head.weight = model.model.embed_tokens.weight  # to_empty untied them
        architecture = language_model(self.spec.architecture, self.spec.config, self.spec.facts)[0]
        rename = renamer(architecture)
        mxfp4 = is_mxfp4(self.spec.config)
        load_safetensors(
            model, files, progress, self.prefixes, self.tp, rename, mxfp4=mxfp4, fp8=self.fp8
        )
        if self.quant is not None:
            quant.finish(model, self.quant, self.device)
        # Each layer's KV group, before finish_loading: the one-call CPU decode step
        # (cpu_step) reads each layer's group's slots and block tables.
        for g, (_, layers) in enumerate(self.layer_groups):
            for i in layers:
                attention = getattr(model.model.layers[i], "self_attn", None)
                if attention is not None:  # a hybrid's linear-attention layers have none
                    attention.kv_group = g
        model.finish_loading(pack=can_pack(self.device, self.dtype), fused=self._fused())
        self.model = model.eval()
        # One rope table per group (Gemma 3's local and global layers differ in base).
        self.ropes = []
        for g, (_, layers) in enumerate(self.layer_groups):
            rope = self.arch.layer_rope(layers[0])
            if g and rope == self.arch.layer_rope(self.layer_groups[0][1][0]):
                self.ropes.append(self.ropes[0])  # the same table: rows looked up once
                continue
            cos, sin = rope_table(dataclasses.replace(self.arch, rope=rope), max(self.context, 1))
            self.ropes.append((cos.to(self.device, self.dtype), sin.to(self.device, self.dtype)))
        self.cos, self.sin = self.ropes[0]

    def profile_run(self, num_tokens: int) -> None:
        """On a GPU, one forward at the largest step, so that the KV budget is taken from the
        memory its activations leave free. The CPU skips it: activations there are small next
        to system memory, and the pass would cost seconds of start-up."""
        if self.device.type != "cuda":
            return
        n = min(num_tokens, self.context)
        blocks = math.ceil(n / self.block_size)
        self._allocate(blocks, [blocks] * len(self.layer_groups))  # every group: the table
        table = tuple(range(math.ceil(n / self.block_size)))
        chunk = SeqChunk(0, (0,) * n, 0, table, (n - 1,))
        self.execute(ScheduledBatch((chunk,), self.block_size))
        self.kv = []
        self.caches = []
        torch.cuda.synchronize(self.device)

    def _group_counts(self, num_blocks: int) -> list[int]:
        """Each KV group's share of `num_blocks`, as the engine shares them."""
        if not self.kv_spec.groups:
            return [num_blocks]
        cfg = self.config
        plans = self.kv_spec.group_blocks(
            num_blocks, self.context, cfg.max_num_batched_tokens, cfg.max_batch_size
        )
        return [p.blocks for p in plans]

    def _allocate(self, num_blocks: int, counts: list[int] | None = None) -> None:
        """The KV tensors: one per layer group (`native.kv_cache`), `num_blocks` shared out
        between the groups as the engine shares them (`KVSpec.group_blocks`)."""
        if counts is None:
            counts = self._group_counts(num_blocks)
        a = self.arch
        if a.mla is not None:  # one group: a [slots, latent + rope key] tensor per layer
            null = counts[0] * self.block_size
            self.kv = mla.allocate_cache(a, null + 2, null, self.dtype, self.device)
            layers = tuple(range(a.num_layers))
            layout = {"kv_heads": 1, "num_slots": null + 2}
            self.caches = [
                kv_cache.GroupCache(layers, None, self.kv[0], null, null + 1, None, layout)
            ]
            self.null_slot, self.scratch_slot, self.layout = null, null + 1, layout
            return
        self.caches = kv_cache.allocate(
            self.layer_groups,
            counts,
            self.block_size,
            self.tp.kv_heads,
            a.head_dim,
            self.dtype,
            self.device,
            self.kv_kind,
        )
        self.kv = [None] * a.num_layers  # type: ignore[list-item]
        for group in self.caches:
            for j, layer in enumerate(group.layers):
                self.kv[layer] = group.layer(j)
        # Group 0's slots: what the single-group paths (CUDA graphs, cpu_step) use. The null
        # slot (one past the blocks) is zeros that padding reads; the scratch slot after it
        # takes the K/V of a CUDA graph's padding rows.
        first = self.caches[0]
        self.null_slot, self.scratch_slot = first.null_slot, first.scratch_slot
        self.layout = first.layout

    def allocate_kv(self, num_blocks: int) -> None:
        self._allocate(num_blocks)
        self.decode = cpu_step.decode_runner(self)
        # CUDA graphs of decode and verify steps (each KV group's tables and slots in static
        # buffers): a float cache only (fp8's scales are set by the first store, which would be
        # the capture's warm-up on padding rows; the quantized store never ran in a graph).
        floats = self.kv_kind == "auto"
        if self.device.type == "cuda" and self.paged and not self.config.eager and floats:
            from .native.cuda_graphs import DecodeGraphs

            self.graphs = DecodeGraphs(self)
            self.graphs.capture()

    def _rope_rows(
        self, order: list, positions: list[int], group: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The rope table's rows for the step's tokens (the tables already live on the device);
        with multimodal positions (M-RoPE) in any chunk, each frequency picks its own."""
        cos, sin = self.ropes[group]
        if all(c.rope_positions is None for c in order):
            pos = torch.tensor(positions)
            return cos[pos], sin[pos]
        three = torch.cat(
            [
                c.rope_positions
                if c.rope_positions is not None
                else torch.arange(c.start_pos, c.end_pos).expand(3, -1)
                for c in order
            ],
            dim=1,
        )
        rope = self.arch.rope
        return mrope_rows(cos, sin, three, rope.mrope_section, rope.mrope_interleaved)

    def _metadata(self, order: list) -> StepMeta:
        """The step's metadata; with several KV groups, one per group (`StepMeta.by_group`)."""
        positions = [p for c in order for p in range(c.start_pos, c.end_pos)]
        if len(self.caches) == 1:
            return self._group_metadata(order, positions, 0, self.windows)
        metas = [
            self._group_metadata(order, positions, g, {group.window})
            for g, group in enumerate(self.caches)
        ]
        metas[0].by_group = metas
        return metas[0]

    def _group_metadata(
        self, order: list, positions: list[int], g: int, windows: set[int | None]
    ) -> StepMeta:
        bs, group = self.block_size, self.caches[g]
        slots = [s for c in order for s in c.slots(bs, g)]
        same_rope = g > 0 and self.ropes[g] is self.ropes[0]
        cos, sin = self._rope_rows(order, positions, 0 if same_rope else g)
        decodes = [c for c in order if _attends_as_decode(c)]
        tables, lens = _decode_rows(decodes, g)
        meta = StepMeta(
            num_decode=len(lens),
            slots=torch.tensor(slots).to(self.device),
            cos=cos[:, None],
            sin=sin[:, None],
        )
        if decodes:
            if self.paged and (starts := cpu_step.query_starts(decodes)):
                meta.query_starts = torch.tensor(starts)  # verify rows: read together
            decode_metadata(
                meta,
                tables,
                lens,
                bs,
                windows,
                self.device,
                group.null_slot,
                self.paged,
                **group.layout,
            )
            if self.paged and verify_rows.wants_queries(self.kernel, decodes):
                verify_rows.fill(meta, decodes, g, self.device)  # K/V read once per sequence
        offset = meta.num_decode
        for c in order[len(decodes) :]:
            n = len(c.token_ids)
            meta.prefills.append(
                prefill_metadata(
                    (offset, offset + n),
                    c.start_pos,
                    c.table(g),
                    bs,
                    windows,
                    self.device,
                    **group.layout,
                    # A chunk never ends inside such an image (MultiModalData.whole_images);
                    # a prefix hit may begin it inside one, whose cached tokens are keys
                    # before every query anyway.
                    blocks=image_runs(c.embed_rows) if self.images_both_ways else None,
                )
            )
            offset += n
        return meta

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> torch.Tensor:
        chunks = batch.chunks
        # The one-call paths below know no LoRA, and keep no hidden states for a draft head.
        adapted = any(c.adapter for c in chunks) or self.drafter is not None
        if self.graphs is not None and not adapted:
            logits = self.graphs.run(batch)  # None unless a captured decode step fits
            if logits is not None:
                return logits
        if self.decode is not None and not adapted:
            if (logits := self.decode.run(batch)) is not None:
                return logits
        # Single-token chunks (decodes) and verified proposals first: they attend together
        # as one batch of decode rows. Then by
        # LoRA adapter, so that each adapter's rows are one slice (native/lora.py).
        order = sorted(chunks, key=lambda c: (not _attends_as_decode(c), c.adapter))
        if self.lora is not None:
            slots = [c.adapter for c in order for _ in c.token_ids]
            with self.lora.step(slots):
                return self._forward(chunks, order)
        return self._forward(chunks, order)

    def _forward(self, chunks: tuple[SeqChunk, ...], order: list[SeqChunk]) -> torch.Tensor:
        meta = self._metadata(order)
        offsets, at = {}, 0
        for c in order:
            offsets[c.seq_id] = at
            at += len(c.token_ids)
        rows = [offsets[c.seq_id] + i for c in chunks for i in c.logits_at]
        ids = torch.tensor([t for c in order for t in c.token_ids], device=self.device)
        if self.drafter is not None:  # the head's hidden states are kept per sequence
            embeds = self._embeds(order, offsets)
            hidden = self.drafter.target_forward(self.model, ids, meta, self.kv, embeds)
            self.drafter.observe(order)
        else:
            hidden = self.model(ids, meta, self.kv, self._embeds(order, offsets))
        index = torch.tensor(rows, dtype=torch.long, device=self.device)
        return self.model.logits(hidden.index_select(0, index)).float()

    def load_adapter(self, slot: int, adapter: LoraAdapter) -> None:
        """LoRA: the adapter into `slot` (its shard at tp > 1). The first load wraps the
        projections (native/lora.py); until then the model runs exactly as without LoRA."""
        assert self.model is not None, "load_adapter() before load()"
        if self.lora is None:
            cfg = self.config
            self.lora = LoraModel(self.model, cfg.max_loras, cfg.max_lora_rank)
        self.lora.load(slot, adapter)

    def unload_adapter(self, slot: int) -> None:
        if self.lora is not None:
            self.lora.unload(slot)

    def _embeds(self, order: list[SeqChunk], offsets: dict[int, int]) -> Embeds | None:
        """Image embeddings and the packed rows they replace (VLM prompts only)."""
        with_embeds = [c for c in order if c.embeds is not None]
        if not with_embeds:
            return None
        rows = [offsets[c.seq_id] + r for c in with_embeds for r in c.embed_rows]
        values = torch.cat([c.embeds for c in with_embeds])  # type: ignore[misc]
        return torch.tensor(rows, device=self.device), values.to(self.device, self.dtype)

    def close(self) -> None:
        if self.tp.shm is not None:
            self.tp.shm.close()
        self.kv = []
        self.caches = []
        self.model = None
        self.decode = None  # the one-call decode step holds the weights' tensors too
        self.lora = None  # the adapters' slots
        self.graphs = None  # their memory pool goes too
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def _attends_as_decode(chunk: SeqChunk) -> bool:
    """A decode, or a sequence's last token with proposals to verify (speculative decoding)."""
    return chunk.is_decode or chunk.verify


def _decode_rows(chunks: list[SeqChunk], group: int = 0) -> tuple[list[tuple[int, ...]], list[int]]:
    """The decode rows of these chunks: a block table and a context length per token. A
    verify chunk's position start_pos + i is a row of its own over positions 0 .. itself
    (all of the step's K/V are stored before any row attends), so K + 1 proposals go through
    the decode kernels at once and give the logits of decoding them one by one."""
    tables, lens = [], []
    for c in chunks:
        for pos in range(c.start_pos, c.end_pos):
            tables.append(c.table(group))
            lens.append(pos + 1)
    return tables, lens
