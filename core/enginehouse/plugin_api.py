"""The core's public API for plugins: everything a plugin may import, in one module.

A plugin (a backend, the vision encoder, commands, a third party's) imports from here or from
`enginehouse` itself, and from no other `enginehouse.*` module: those are the core's own and
change without notice (tests/test_plugin_api.py fails on such an import under plugins/).
docs/plugins.md documents each name.
"""

from .adapters import AdapterError, LoraAdapter
from .checkpoint import copy_checked, missing_weights, tensors
from .config import EngineConfig, GenerationConfig, format_size
from .contract import CONTRACT_VERSION
from .device import available_memory, resolve_device, resolve_dtype, use_all_cores
from .errors import BackendError, EnginehouseError, InvalidModelError, RequestError
from .families import ModelFamily
from .families import registered as registered_families
from .hookspecs import hookimpl
from .image_fetch import MAX_DOWNLOAD_BYTES, FetchPolicy, fetch_failed
from .kv_groups import KVGroup, snapshot_at, split_blocks, total_blocks
from .logits_processors import BatchUpdate, LogitsProcessor
from .multimodal import MultiModalData, PreparedPrompt, VisionEncoder, image_runs
from .pipeline import read_spec
from .platforms import Platform, host_free_memory
from .plugins import get_plugins
from .reasoning import ReasoningParser
from .runner import (
    DraftRequest,
    KVSpec,
    ModelRunner,
    RunnerCapabilities,
    RunnerContext,
    ScheduledBatch,
    SeqChunk,
    build_from_table,
    kv_bytes_per_token,
    kv_slot,
)
from .spec import BackendProbe, ModelFacts, ModelSpec, read_model_spec
from .tool_calls import HermesParser, ToolParser

__all__ = [
    "AdapterError",
    "BackendError",
    "BackendProbe",
    "BatchUpdate",
    "CONTRACT_VERSION",
    "DraftRequest",
    "EngineConfig",
    "EnginehouseError",
    "FetchPolicy",
    "GenerationConfig",
    "HermesParser",
    "InvalidModelError",
    "KVGroup",
    "KVSpec",
    "LogitsProcessor",
    "LoraAdapter",
    "MAX_DOWNLOAD_BYTES",
    "ModelFacts",
    "ModelFamily",
    "ModelRunner",
    "ModelSpec",
    "MultiModalData",
    "Platform",
    "PreparedPrompt",
    "ReasoningParser",
    "RequestError",
    "RunnerCapabilities",
    "RunnerContext",
    "ScheduledBatch",
    "SeqChunk",
    "ToolParser",
    "VisionEncoder",
    "available_memory",
    "build_from_table",
    "copy_checked",
    "fetch_failed",
    "format_size",
    "get_plugins",
    "hookimpl",
    "host_free_memory",
    "image_runs",
    "kv_bytes_per_token",
    "kv_slot",
    "missing_weights",
    "read_model_spec",
    "read_spec",
    "registered_families",
    "resolve_device",
    "resolve_dtype",
    "snapshot_at",
    "split_blocks",
    "tensors",
    "total_blocks",
    "use_all_cores",
]
