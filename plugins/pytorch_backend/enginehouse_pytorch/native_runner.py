"""The native `pytorch` backend: our own decoder implementations over a paged KV cache.

Per step the runner orders the batch decodes first, builds the step's metadata once (rope
rows, KV slots, gather indices and masks, see `native.attention`), runs the model over all
tokens packed together, and returns logits only for the rows the engine asked for.
"""

from __future__ import annotations

import math

import torch

from enginehouse import EngineConfig, KVSpec, ModelSpec, ScheduledBatch, SeqChunk
from enginehouse.plugin_api import (
    InvalidModelError,
    LoraAdapter,
    RunnerCapabilities,
    RunnerContext,
    kv_bytes_per_token,
    resolve_device,
    resolve_dtype,
    use_all_cores,
)

from .native import cpu_decode, cpu_kernels, cpu_step, quant
from .native.arch import Arch, UnsupportedModel, arch_from_config, language_model
from .native.attention import StepMeta, TorchAttention, decode_metadata, prefill_metadata
from .native.layers import can_pack
from .native.lora import LoraModel
from .native.model import DecoderLM, Embeds
from .native.parallel import TensorParallel
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
    # profiles: a forward pass on a GPU (profile_run); lora: adapters in slots (native/lora.py)
    capabilities = RunnerCapabilities(profiles=True, lora=True)

    def __init__(self, spec: ModelSpec, config: EngineConfig, context: RunnerContext) -> None:
        self.spec = spec
        self.config = config
        self.arch: Arch = arch_from_config(
            *language_model(spec.architecture, spec.config, spec.facts)
        )
        # A VLM's checkpoint also holds the vision tower: load only the language model's part.
        self.prefixes = spec.facts.get("text_weight_prefixes") if spec.is_vlm else None
        self.device = resolve_device(config)
        if context.sharded and self.device.type == "cuda":
            self.device = torch.device("cuda", context.local_rank)  # one GPU per rank
        self.dtype = resolve_dtype(config, spec, self.device)
        self.quant = quant_scheme(spec, config, self.arch)
        # This rank's share of the heads, the MLP and the vocabulary (all of it at tp=1).
        shm = None
        if self.device.type == "cpu" and usable(context.world_size, context.local_world_size):
            shm = ShmCollectives.join(context.rank, context.world_size, config.distributed_timeout)
        self.tp = TensorParallel(self.arch, context.rank, context.world_size, shm)
        self.context = context.session_len
        self.block_size = config.block_size or DEFAULT_BLOCK_SIZE
        a, kv_heads = self.arch, self.tp.kv_heads
        per_token = kv_bytes_per_token(a.num_layers, kv_heads, a.head_dim, self.dtype)
        self.kv_spec = KVSpec(
            block_size=self.block_size,
            bytes_per_block=per_token * self.block_size,
            dtype=self.dtype,
            device=self.device,
        )
        self.windows = set(a.windows) if a.windows else {None}
        self.model: DecoderLM | None = None
        self.kv: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.kernel = self._attention_kernel()
        self.paged = self.kernel is not TorchAttention  # a kernel that reads block tables
        self.graphs = None  # CUDA graphs of decode steps, captured after the KV is allocated
        self.decode: cpu_step.DecodeRunner | None = None  # CPU: small decode steps in one call
        self.lora: LoraModel | None = None  # the adapters' slots, made at the first load

    def _attention_kernel(self) -> type[TorchAttention]:
        """Triton's paged kernels on a GPU where triton imports; torch ops otherwise."""
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
        return cpu and cpu_decode.load()

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
        load_safetensors(model, files, progress, self.prefixes, self.tp)
        if self.quant is not None:
            quant.finish(model, self.quant, self.device)
        model.finish_loading(pack=can_pack(self.device, self.dtype), fused=self._fused())
        self.model = model.eval()
        cos, sin = rope_table(self.arch, max(self.context, 1))
        self.cos = cos.to(self.device, self.dtype)
        self.sin = sin.to(self.device, self.dtype)

    def profile_run(self, num_tokens: int) -> None:
        """On a GPU, one forward at the largest step, so that the KV budget is taken from the
        memory its activations leave free. The CPU skips it: activations there are small next
        to system memory, and the pass would cost seconds of start-up."""
        if self.device.type != "cuda":
            return
        n = min(num_tokens, self.context)
        self._allocate(math.ceil(n / self.block_size))
        table = tuple(range(math.ceil(n / self.block_size)))
        chunk = SeqChunk(0, (0,) * n, 0, table, (n - 1,))
        self.execute(ScheduledBatch((chunk,), self.block_size))
        self.kv = []
        torch.cuda.synchronize(self.device)

    def _allocate(self, num_blocks: int) -> None:
        a = self.arch
        # One slot past the blocks is the null slot that padding reads: zeros, always. The rest
        # stays uninitialised, since attention only ever reads slots written before.
        # The slot after it is scratch: the padding rows of a CUDA graph write their K/V there.
        self.null_slot = num_blocks * self.block_size
        self.scratch_slot = self.null_slot + 1
        shape = (a.num_layers, 2, self.tp.kv_heads, self.null_slot + 2, a.head_dim)
        cache = torch.empty(shape, dtype=self.dtype, device=self.device)
        cache[:, :, :, self.null_slot].zero_()
        self.kv = [(cache[i, 0], cache[i, 1]) for i in range(a.num_layers)]
        self.layout = {"kv_heads": self.tp.kv_heads, "num_slots": shape[3]}

    def allocate_kv(self, num_blocks: int) -> None:
        self._allocate(num_blocks)
        self.decode = cpu_step.decode_runner(self)
        if self.device.type == "cuda" and self.paged and not self.config.eager:
            from .native.cuda_graphs import DecodeGraphs

            self.graphs = DecodeGraphs(self)
            self.graphs.capture()

    def _rope_rows(self, order: list, positions: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The rope table's rows for the step's tokens (the tables already live on the device);
        with multimodal positions (M-RoPE) in any chunk, each frequency picks its own."""
        if all(c.rope_positions is None for c in order):
            pos = torch.tensor(positions)
            return self.cos[pos], self.sin[pos]
        three = torch.cat(
            [
                c.rope_positions
                if c.rope_positions is not None
                else torch.arange(c.start_pos, c.end_pos).expand(3, -1)
                for c in order
            ],
            dim=1,
        )
        return mrope_rows(self.cos, self.sin, three, self.arch.rope.mrope_section)

    def _metadata(self, order: list) -> StepMeta:
        positions = [p for c in order for p in range(c.start_pos, c.end_pos)]
        bs = self.block_size
        slots = [s for c in order for s in c.slots(bs)]
        cos, sin = self._rope_rows(order, positions)
        meta = StepMeta(
            num_decode=sum(1 for c in order if c.is_decode),
            slots=torch.tensor(slots).to(self.device),
            cos=cos[:, None],
            sin=sin[:, None],
        )
        decodes = order[: meta.num_decode]
        if decodes:
            lens = [c.end_pos for c in decodes]
            tables = [c.block_table for c in decodes]
            decode_metadata(
                meta,
                tables,
                lens,
                bs,
                self.windows,
                self.device,
                self.null_slot,
                self.paged,
                **self.layout,
            )
        offset = meta.num_decode
        for c in order[meta.num_decode :]:
            n = len(c.token_ids)
            meta.prefills.append(
                prefill_metadata(
                    (offset, offset + n),
                    c.start_pos,
                    c.block_table,
                    bs,
                    self.windows,
                    self.device,
                    **self.layout,
                )
            )
            offset += n
        return meta

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> torch.Tensor:
        chunks = batch.chunks
        adapted = any(c.adapter for c in chunks)  # the one-call paths below know no LoRA
        if self.graphs is not None and not adapted:
            logits = self.graphs.run(batch)  # None unless a captured decode step fits
            if logits is not None:
                return logits
        if self.decode is not None and not adapted:
            if (logits := self.decode.run(batch)) is not None:
                return logits
        # Single-token chunks (decodes) first: they attend together as one batch. Then by
        # LoRA adapter, so that each adapter's rows are one slice (native/lora.py).
        order = sorted(chunks, key=lambda c: (not c.is_decode, c.adapter))
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
        self.model = None
        self.decode = None  # the one-call decode step holds the weights' tensors too
        self.lora = None  # the adapters' slots
        self.graphs = None  # their memory pool goes too
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
