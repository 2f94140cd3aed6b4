"""enginehouse: one call from a model identifier to a ready LLM inference pipeline."""

from .backends import BackendDecision
from .config import EngineConfig, GenerationConfig
from .contract import CONTRACT_VERSION
from .errors import GenerationError, RequestError
from .hookspecs import hookimpl
from .pipeline import ChatSession, Pipeline, explain, pipeline
from .response import Response
from .runner import KVSpec, ModelRunner, RunnerContext, ScheduledBatch, SeqChunk
from .spec import BackendProbe, ModelFacts, ModelSpec

__version__ = "0.1.0"
__all__ = [
    "BackendDecision",
    "BackendProbe",
    "CONTRACT_VERSION",
    "ChatSession",
    "EngineConfig",
    "GenerationConfig",
    "GenerationError",
    "KVSpec",
    "ModelFacts",
    "ModelRunner",
    "ModelSpec",
    "Pipeline",
    "RequestError",
    "Response",
    "RunnerContext",
    "ScheduledBatch",
    "SeqChunk",
    "explain",
    "hookimpl",
    "pipeline",
]
