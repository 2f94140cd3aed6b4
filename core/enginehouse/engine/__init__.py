"""The engine: its core (scheduler, KV blocks, token acceptance), the sampler, the output
processor (detokenizer, stop strings) and the async driver."""

from .async_engine import AsyncEngine
from .core import EngineCore
from .llm_engine import LLMEngine
from .sequence import CoreOutput, RequestOutput

__all__ = ["AsyncEngine", "CoreOutput", "EngineCore", "LLMEngine", "RequestOutput"]
