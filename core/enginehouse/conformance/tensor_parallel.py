"""The same model at tp=2, for a backend that says it shards: its tokens must be tp=1's.

Both are built the way `pipeline()` builds them (at tp=2 through the executor, which starts
two ranks), and given the same requests through the core's engine: greedy and seeded
sampling, a batch and one request alone.
"""

from __future__ import annotations

from pathlib import Path

from ..backends import matching, probe_backends
from ..config import EngineConfig, GenerationConfig
from ..pipeline import read_spec
from ..plugins import PluginHost
from .compare import first_difference
from .engine_checks import run_requests
from .result import Mismatch, NotApplicable
from .target import NEW_TOKENS, Target, open_target

TP = 2


def tensor_parallel(
    backend: str, model: str | Path, config: EngineConfig, plugins: PluginHost
) -> str:
    sharded = config.model_copy(update={"tp": TP})
    spec = read_spec(model, plugins=plugins)
    verdict = next(iter(matching(probe_backends(spec, sharded, plugins), backend)), None)
    if verdict is None or not verdict.supported:
        why = verdict.reason if verdict is not None else "its probe gave no verdict"
        raise NotApplicable(f"at tp={TP}: {why}")
    one = open_target(backend, model, config, plugins)
    try:
        two = open_target(backend, model, sharded, plugins)
        try:
            return _compare(one, two)
        finally:
            two.runner.close()
    finally:
        one.runner.close()


def _compare(one: Target, two: Target) -> str:
    prompts = one.prompts(seed=21)
    runs = {
        "greedy": GenerationConfig(max_new_tokens=NEW_TOKENS, ignore_eos=True),
        "seeded sampling": GenerationConfig(
            max_new_tokens=NEW_TOKENS, ignore_eos=True, do_sample=True, random_seed=5
        ),
    }
    for how, params in runs.items():
        batch = {f"{how} #{i}": (p, params) for i, p in enumerate(prompts)}
        want = run_requests(one.engine, batch, {})
        got = run_requests(two.engine, batch, {})
        first = next(iter(batch))
        alone = run_requests(two.engine, {first: batch[first]}, {})
        checks = [(f"{r} in a batch", got, r) for r in batch] + [(f"{first} alone", alone, first)]
        for label, results, rid in checks:
            tokens, expected = results[rid].token_ids, want[rid].token_ids
            i = first_difference(tokens, expected)
            if i is not None:
                raise Mismatch(
                    f"{label} at tp={TP}: token {i} is {tokens[i : i + 1]}, at tp=1 "
                    f"{expected[i : i + 1]} (tp={TP}: {tokens}; tp=1: {expected})"
                )
    return (
        f"tp={TP} ({type(two.runner).__name__}) gave tp=1's tokens: {len(prompts)} prompts, "
        "greedy and seeded sampling, in a batch and alone"
    )
