"""One model loaded on the backend under test, exactly as `pipeline()` loads it: the plugin's
`create_runner` through the plugin host, `load`, then the engine, which sizes and allocates the
KV cache. The checks drive `runner` by hand (`driver()`) or through `engine`."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..backends import BackendDecision
from ..config import EngineConfig
from ..engine import LLMEngine
from ..pipeline import build_runner, decide_backend, load_tokenizer, read_spec
from ..plugins import PluginHost
from ..runner import ModelRunner
from ..spec import ModelSpec
from .compare import Tolerance
from .driver import Driver, Seq
from .memory import reachable_bytes

NEW_TOKENS = 6  # generated per sequence: enough to cross a decode or two past every check
PROMPT_LENGTHS = (5, 13, 29, 1)  # short, a block or so, several blocks, a single token


@dataclass
class Target:
    spec: ModelSpec
    decision: BackendDecision
    config: EngineConfig
    runner: ModelRunner
    tokenizer: Any
    engine: LLMEngine | None = None
    kv_bytes: int = 0  # tensor memory allocate_kv added, as seen from the runner
    _alone: dict[int, Seq] = field(default_factory=dict)

    @property
    def vocab_size(self) -> int:
        return int(self.spec.config.get("vocab_size") or len(self.tokenizer))

    @property
    def tolerance(self) -> Tolerance:
        return Tolerance.for_dtype(self.runner.kv_spec.dtype)

    def driver(self, banned: tuple[int, ...] = (), shuffled: bool = True) -> Driver:
        """A driver over the engine's KV blocks (handed out shuffled unless told not to)."""
        assert self.engine is not None
        # With KV groups the driver's one table serves every group (`SeqChunk.table`): only
        # ids every group's pool has.
        blocks = min(p.num_blocks for p in self.engine.block_manager.pools)
        return Driver(self.runner, blocks, self.vocab_size, banned, shuffled)

    def prompts(self, seed: int = 0) -> list[list[int]]:
        """Random token ids (past the usual special ones) of the kit's prompt lengths."""
        rng = random.Random(seed)
        high = self.vocab_size
        return [[rng.randrange(3, high) for _ in range(n)] for n in PROMPT_LENGTHS]

    def label(self, i: int) -> str:
        return f"sequence {i} ({PROMPT_LENGTHS[i]} prompt tokens)"

    def alone(self, i: int) -> Seq:
        """Prompt `i` generated alone: the reference every other arrangement must match."""
        if i not in self._alone:
            prompt = self.prompts()[i]
            reference = self.driver(shuffled=False)
            self._alone[i] = reference.alone(prompt, NEW_TOKENS, self.label(i))
        return self._alone[i]


def open_target(
    backend: str, model: str | Path, config: EngineConfig, plugins: PluginHost
) -> Target:
    """Load `model` on `backend` as `pipeline()` would, and build the engine around it."""
    spec = read_spec(model, plugins=plugins)
    decision = decide_backend(spec, config, backend, plugins)
    tokenizer = load_tokenizer(spec, config.trust_remote_code)
    runner = build_runner(decision, spec, config, plugins, progress=False)
    target = Target(spec, decision, config, runner, tokenizer)
    try:
        before = reachable_bytes(runner)
        target.engine = LLMEngine(runner, tokenizer, spec, config)
        target.kv_bytes = reachable_bytes(runner) - before
    except BaseException:
        runner.close()
        raise
    return target
