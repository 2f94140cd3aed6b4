"""The engine core: scheduler, KV block manager, sampler, detokenizer and the async driver."""

from .async_engine import AsyncEngine
from .llm_engine import LLMEngine
from .sequence import RequestOutput

__all__ = ["AsyncEngine", "LLMEngine", "RequestOutput"]
