"""The runner contract: what a backend plugin implements, and the batch it is handed each step."""

from __future__ import annotations

import importlib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch

from .kv_groups import GroupPlan, KVGroup, split_blocks

if TYPE_CHECKING:
    from .config import EngineConfig
    from .spec import ModelSpec

log = logging.getLogger(__name__)
DEFAULT_SESSION_LEN = 4096  # for configs that state no context length


def kv_slot(block_table: Sequence[int], pos: int, block_size: int) -> int:
    """The KV slot of position `pos`: its block's first slot plus its offset in the block."""
    return block_table[pos // block_size] * block_size + pos % block_size


def kv_bytes_per_token(layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    """Bytes one token's keys and values take across all layers."""
    return 2 * layers * kv_heads * head_dim * dtype.itemsize


@dataclass(frozen=True)
class RunnerContext:
    """What the core decides for a runner before building it (the `create_runner` hook's
    `context`): values a runner must agree on with the engine, so that no plugin re-derives
    them or imports the engine's internals."""

    session_len: int  # the longest sequence the engine will schedule (prompt + output)
    # Tensor parallelism (`EngineConfig.tp`): this runner is rank `rank` of `world_size`. When
    # world_size > 1 the torch.distributed default process group is already initialised (gloo
    # on the CPU, NCCL on CUDA) before `create_runner` is called: the runner loads only its
    # shard and uses the group's collectives; every rank executes every step, in the same
    # order, and only rank 0's logits are used. `local_rank` numbers the ranks of this machine
    # (rank r takes cuda:local_rank); `local_world_size` ranks share this machine's memory.
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @classmethod
    def for_model(cls, spec: ModelSpec, config: EngineConfig, **ranks: int) -> RunnerContext:
        """The context `pipeline()` gives a runner for this model and these settings (and,
        under an executor, this rank)."""
        return cls(session_len=session_length(spec, config), **ranks)

    @property
    def sharded(self) -> bool:
        return self.world_size > 1


def session_length(spec: ModelSpec, config: EngineConfig) -> int:
    """The engine's context length: `session_len` if set, else the model's, else 4096."""
    if config.session_len is not None:
        if spec.context_length and config.session_len > spec.context_length:
            log.warning(
                "session_len %d is longer than the model's context (%d); quality may suffer",
                config.session_len,
                spec.context_length,
            )
        return config.session_len
    return spec.context_length or DEFAULT_SESSION_LEN


@dataclass(frozen=True)
class KVSpec:
    """How a runner stores KV: the block manager's unit of bookkeeping.

    A runner with contiguous per-sequence caches states `block_size` equal to the context length
    and so gets exactly one block per sequence. `bytes_per_block` turns a memory budget into a
    number of blocks. `prefix_caching` says whether blocks may be shared between sequences.

    A runner whose layers keep different kinds of KV (sliding windows next to full attention,
    latent attention, recurrent states) declares `groups`, one `KVGroup` per kind (see
    `enginehouse.kv_groups`): each group then has its own pool of blocks and each sequence its
    own block table per group (`SeqChunk.table(g)`), and `allocate_kv(num_blocks)` gets the
    total, which `group_blocks` shares out as the engine does. `bytes_per_block` is then one
    block of every paged group together. Without `groups` the runner has one full-attention
    group whose table is `SeqChunk.block_table`, as before groups existed.
    """

    block_size: int
    bytes_per_block: int
    dtype: torch.dtype = torch.float32
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    prefix_caching: bool = True
    groups: tuple[KVGroup, ...] = ()
    # What a KV element is stored as, when not `dtype` (a quantized KV cache: "int8", "fp8").
    cache_dtype: str = "auto"

    def group_blocks(
        self,
        num_blocks: int,
        session_len: int,
        max_chunk: int,
        max_batch_size: int | None = None,
    ) -> list[GroupPlan]:
        """How the engine shares `num_blocks` between `groups` (`session_len`: the context,
        `max_chunk`: `EngineConfig.max_num_batched_tokens`, `max_batch_size`: the
        `EngineConfig`'s, which sizes a "state" group and must be given where there is one)."""
        return split_blocks(
            self.groups, num_blocks, self.block_size, session_len, max_chunk, max_batch_size
        )


@dataclass(frozen=True)
class SeqChunk:
    """One sequence's part of a step: a prefill chunk, or one decode token.

    `token_ids` are the tokens to compute now, at positions `start_pos ...`; the KV of positions
    before `start_pos` is already in the sequence's blocks. `block_table` covers every position
    up to and including the new ones.
    """

    seq_id: int
    token_ids: tuple[int, ...]
    start_pos: int
    block_table: tuple[int, ...]
    # Positions (0-based within this chunk) whose logits the engine needs back.
    logits_at: tuple[int, ...] = ()
    # Image positions (0-based within this chunk) and their embeddings, one row each: the model
    # takes these rows instead of looking the tokens up. Only runners whose probe accepts
    # vision-language models ever get them.
    embed_rows: tuple[int, ...] = ()
    embeds: torch.Tensor | None = field(default=None, compare=False, repr=False)
    # [3, len(token_ids)] multimodal rotary positions (Qwen2-VL's M-RoPE) when the sequence has
    # them; otherwise every token's position is start_pos + i.
    rope_positions: torch.Tensor | None = field(default=None, compare=False, repr=False)
    # Speculative decoding: the chunk is a sequence's last token followed by proposed ones,
    # logits wanted at every position. Only runners declaring `verifies_tokens` get these;
    # they attend each position as a decode row (position start_pos + i sees 0 .. itself).
    verify: bool = False
    # The LoRA adapter slot of this sequence (`load_adapter`'s slot, 1..max_loras); 0 is the
    # base model. Only runners that declare `lora` ever get a non-zero one.
    adapter: int = 0

    @property
    def end_pos(self) -> int:
        return self.start_pos + len(self.token_ids)

    @property
    def is_decode(self) -> bool:
        """One new token: it attends to the KV already in the blocks, as a batch of decodes
        does. The one definition every runner uses (a one-token prompt is a decode too)."""
        return len(self.token_ids) == 1

    @property
    def is_prefill(self) -> bool:
        return not self.is_decode

    # With KV groups (`KVSpec.groups`): every group's block table, in the groups' order (the
    # first is `block_table`). Empty: every group uses `block_table`.
    group_tables: tuple[tuple[int, ...], ...] = field(default=(), compare=False, repr=False)

    def table(self, group: int) -> tuple[int, ...]:
        """The block table of KV group `group`."""
        return self.group_tables[group] if self.group_tables else self.block_table

    def slots(self, block_size: int, group: int = 0) -> list[int]:
        """The KV slot of each new token, in order (in group `group`'s blocks)."""
        table = self.table(group)
        return [kv_slot(table, p, block_size) for p in range(self.start_pos, self.end_pos)]


@dataclass(frozen=True)
class ScheduledBatch:
    """One engine step. Runners read `chunks`, or the packed tensors built from them on demand."""

    chunks: tuple[SeqChunk, ...]
    block_size: int

    @property
    def num_tokens(self) -> int:
        return sum(len(c.token_ids) for c in self.chunks)

    @cached_property
    def input_ids(self) -> torch.Tensor:
        """All new tokens packed without padding, sequence after sequence."""
        return torch.tensor([t for c in self.chunks for t in c.token_ids], dtype=torch.long)

    @cached_property
    def positions(self) -> torch.Tensor:
        return torch.tensor(
            [p for c in self.chunks for p in range(c.start_pos, c.end_pos)], dtype=torch.long
        )

    @cached_property
    def slot_mapping(self) -> torch.Tensor:
        """For each new token, its KV slot: block_id * block_size + offset in the block."""
        return torch.tensor(
            [s for c in self.chunks for s in c.slots(self.block_size)], dtype=torch.long
        )

    @cached_property
    def logits_indices(self) -> torch.Tensor:
        """Rows of the packed tokens whose logits `execute` returns, in this order."""
        out, offset = [], 0
        for c in self.chunks:
            out.extend(offset + i for i in c.logits_at)
            offset += len(c.token_ids)
        return torch.tensor(out, dtype=torch.long)


@dataclass(frozen=True)
class DraftRequest:
    """One decoding sequence the engine wants proposals for (`propose_tokens`): its tokens
    (the last one not computed yet), how many the target computed, its block table (covering
    the computed positions), and how many tokens to propose at most."""

    seq_id: int
    token_ids: Sequence[int]
    num_computed: int
    block_table: tuple[int, ...]
    num_drafts: int


@runtime_checkable
class ModelRunner(Protocol):
    """What a backend implements; the core's engine drives it.

    `execute` returns float logits of shape [len(batch.logits_indices), vocab_size]: one row per
    position named in the chunks' `logits_at`, in batch order.

    A runner may also implement the methods of `RunnerExtras`; the core calls them where they
    exist. `pipeline()` checks what `create_runner` returns against this protocol
    (`missing_members`) and names the plugin and the missing members when it falls short.
    """

    kv_spec: KVSpec

    def load(self, progress: bool = True) -> None:
        """Load the weights (show a progress bar when `progress`)."""

    def allocate_kv(self, num_blocks: int) -> None:
        """Make room for `num_blocks` KV blocks of `kv_spec.block_size` tokens each."""

    def execute(self, batch: ScheduledBatch) -> torch.Tensor:
        """Run one step: write the new tokens' KV into their slots and return the logits."""

    def close(self) -> None:
        """Free the weights and the KV cache."""


@dataclass(frozen=True)
class RunnerCapabilities:
    """What a runner offers beyond the four required members, declared as flags (the way
    simonw/llm's models declare `can_stream`), never guessed from its attributes.

    A runner sets `capabilities = RunnerCapabilities(...)`; without it, it declares none. The
    core calls a method of `RunnerExtras` only where its flag is set, and `pipeline()` refuses a
    runner whose flag promises a method it lacks (`capability_problems`). New capabilities
    come as new fields that default to False, so a runner written before them keeps working.
    """

    plans_kv: bool = False  # plan_kv_blocks(config, session_len): its own number of KV blocks
    profiles: bool = False  # profile_run(num_tokens): a forward pass before the budget is read
    releases_sequences: bool = False  # release_sequence(...): the blocks were freed
    finishes_sequences: bool = False  # finish_sequence(seq_id): the sequence is gone for good
    # execute() takes `verify` chunks (several new tokens of a decoding sequence, logits at
    # each) and gives the logits of computing them one by one: speculative decoding needs it.
    verifies_tokens: bool = False
    lora: bool = False  # load_adapter(slot, adapter) / unload_adapter(slot): LoRA adapters
    # propose_tokens(requests): the runner drafts tokens itself from the target's hidden
    # states (a draft head: EAGLE-3, EAGLE, MTP); speculative_config's head methods need it.
    drafts_tokens: bool = False


# Each capability and the method it promises.
CAPABILITY_METHODS = {
    "plans_kv": "plan_kv_blocks",
    "profiles": "profile_run",
    "releases_sequences": "release_sequence",
    "finishes_sequences": "finish_sequence",
    "lora": "load_adapter",
    "drafts_tokens": "propose_tokens",
}
# Further methods a capability promises besides its first.
CAPABILITY_MORE_METHODS = {"lora": ("unload_adapter",)}


class RunnerExtras(Protocol):
    """Optional runner methods: the core calls each one only where the runner declares it in
    `capabilities` (`RunnerCapabilities`)."""

    def plan_kv_blocks(self, config: EngineConfig, session_len: int) -> int:
        """(`plans_kv`) The number of KV blocks to allocate, in place of the core's plan from
        `EngineConfig.kv_cache_memory` and `kv_spec.bytes_per_block`."""

    def profile_run(self, num_tokens: int) -> None:
        """(`profiles`) One forward pass at the largest step (`num_tokens` tokens), before the
        KV budget is read, so that the memory its activations take is already counted."""

    def release_sequence(self, seq_id: int, block_table: tuple[int, ...]) -> None:
        """(`releases_sequences`) A sequence's blocks were freed: it finished, was aborted or
        was preempted (then it comes back later, with the same id, from position 0 in new
        blocks). Drop whatever the runner keeps for those blocks."""

    def finish_sequence(self, seq_id: int) -> None:
        """(`finishes_sequences`) The sequence is gone for good (finished or aborted; never
        on preemption): drop whatever the runner keeps for it across preemptions."""

    def load_adapter(self, slot: int, adapter: Any) -> None:
        """(`lora`) Put a checked LoRA adapter (`enginehouse.adapters.LoraAdapter`: its rank,
        scale and each adapted projection's A and B, unsharded) in `slot`, 1 to
        `EngineConfig.max_loras`, replacing what was there. From the next step, chunks whose
        `adapter` is `slot` run with it; chunks with 0 run the base model, in the same batch."""

    def unload_adapter(self, slot: int) -> None:
        """(`lora`) Empty `slot`; no chunk names it until it is loaded again."""

    def propose_tokens(self, requests: Sequence[DraftRequest]) -> list[list[int]]:
        """(`drafts_tokens`) For each decoding sequence, up to `num_drafts` tokens to follow
        its last token, drafted from what the runner kept of the target's forward passes (a
        draft head on its hidden states). Called before a step, between `execute` calls."""


def capabilities_of(runner: object) -> RunnerCapabilities:
    """The runner's declared capabilities (none when it declares nothing)."""
    declared = getattr(runner, "capabilities", None)
    return declared if isinstance(declared, RunnerCapabilities) else RunnerCapabilities()


def capability_problems(runner: object) -> list[str]:
    """What is wrong with a runner's declaration: a `capabilities` that is not a
    `RunnerCapabilities`, or a flag whose method is missing."""
    declared = getattr(runner, "capabilities", None)
    if declared is not None and not isinstance(declared, RunnerCapabilities):
        return [f"capabilities is a {type(declared).__name__}, not a RunnerCapabilities"]
    caps = capabilities_of(runner)
    return [
        f"it declares {flag} but has no {method}()"
        for flag, first in CAPABILITY_METHODS.items()
        for method in (first, *CAPABILITY_MORE_METHODS.get(flag, ()))
        if getattr(caps, flag) and not callable(getattr(runner, method, None))
    ]


def undeclared_extras(runner: object) -> list[str]:
    """Methods of `RunnerExtras` the runner has without declaring them: the core never calls
    them (before capabilities were declared, it called whatever a runner had)."""
    caps = capabilities_of(runner)
    return [
        f"{method}() (declare RunnerCapabilities({flag}=True))"
        for flag, method in CAPABILITY_METHODS.items()
        if callable(getattr(runner, method, None)) and not getattr(caps, flag)
    ]


def missing_members(runner: object) -> list[str]:
    """The members of `ModelRunner` that `runner` lacks (empty when it meets the contract)."""
    return [n for n in _members(ModelRunner) if not hasattr(runner, n)]


def _members(protocol: type) -> list[str]:
    """A protocol's attributes and methods, as its class body declares them."""
    methods = [n for n, v in vars(protocol).items() if callable(v) and not n.startswith("_")]
    return [*protocol.__annotations__, *methods]


def build_from_table(table: Mapping[str, str], backend: str, *args: Any) -> Any:
    """`create_runner` for a plugin offering several backends: `table` maps each backend name
    to the runner class as "module:Class", imported only when that backend is built (so that
    probing stays cheap). Returns None for a name the table lacks."""
    target = table.get(backend)
    if target is None:
        return None
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)(*args)
