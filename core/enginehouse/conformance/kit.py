"""One conformance run: load the backend's runner on a small model, run every check in order,
report each as it finishes.

Order matters: the hand-driven contract checks and the model checks use the KV cache while the
engine is idle; the engine checks come after them (the engine's prefix cache must not meet
blocks the kit overwrote), and `close` comes last.
"""

from __future__ import annotations

import contextlib
import tempfile
import traceback
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..config import EngineConfig
from ..errors import EnginehouseError
from ..plugins import PluginHost, get_plugins
from . import contract, engine_checks, lifecycle, lora_check, model_checks
from .models import ModelStore
from .result import CheckResult, Mismatch, NotApplicable, Report
from .target import Target, open_target
from .tensor_parallel import tensor_parallel

# Small, so that every runner builds fast, and float32, where the checks' tolerances are tight
# and greedy tokens can be held to transformers'; the user's engine config overrides any.
KIT_DEFAULTS: dict[str, Any] = {
    "max_batch_size": 8,
    "max_num_batched_tokens": 512,
    "dtype": "float32",
}
KIT_SESSION_LEN = 256

CONTRACT_CHECKS: dict[str, Callable[[Target], str]] = {
    "runner-protocol": contract.runner_protocol,
    "kv-spec": contract.kv_spec,
    "logits-rows": contract.logits_rows,
    "batch-invariance": contract.batch_invariance,
    "chunked-prefill": contract.chunked_prefill,
    "prefix-cache": contract.prefix_cache,
    "preemption-recompute": contract.preemption_recompute,
    "verify-tokens": contract.verify_tokens,
}
ENGINE_CHECKS: dict[str, Callable[[Target], str]] = {
    "blocks-returned": engine_checks.blocks_returned,
    "seeded-sampling": engine_checks.seeded_sampling,
    "close": lifecycle.close,
}
MODEL_CHECKS = ("hf-logits", "hf-greedy", "hf-lora")  # one line each per model: hf-logits[llama]
TP_CHECK = "tensor-parallel"
CHECKS = (*CONTRACT_CHECKS, *MODEL_CHECKS, *ENGINE_CHECKS, TP_CHECK)


class KitError(EnginehouseError):
    """The kit could not start (no such backend, no model to check it on)."""


def run_conformance(
    backend: str,
    model: str | Path | None = None,
    engine_config: EngineConfig | Mapping[str, Any] | None = None,
    families: Sequence[str] | str = "all",
    checks: Collection[str] | None = None,
    on_result: Callable[[CheckResult], None] | None = None,
    plugins: PluginHost | None = None,
) -> Report:
    """Check `backend` against the runner contract and against transformers.

    `model` is a folder to check it on; without one the kit builds the first built-in small
    model the backend's probe accepts. `families` ("all", or names such as "llama") are the
    built-in families whose models also get the model checks where the backend claims them.
    `checks` keeps only those checks (names from `CHECKS`); `on_result` is called with each
    result as it comes; `plugins` replaces the installed plugins (tests). Raises `KitError`
    when the run cannot start; otherwise every check has a result in the report.
    """
    unknown = sorted(set(checks or ()) - set(CHECKS))
    if unknown:
        raise KitError(f"unknown check {unknown[0]!r}; the checks are: {', '.join(CHECKS)}")
    given = _given(engine_config)
    with quiet_transformers(), tempfile.TemporaryDirectory(prefix="eh-conformance-") as tmp:
        store = ModelStore(Path(tmp))
        kit = _Kit(backend, given, plugins or get_plugins(), store, checks, on_result)
        return kit.run(model, families)


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """No progress bars or config warnings from transformers while the kit builds and loads
    its models: the report is the output."""
    from transformers.utils import logging as hf_logging

    bars, level = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def parse_families(text: str) -> Sequence[str] | str:
    """The command line's families: "all", "none", or names separated by commas."""
    text = text.strip()
    if text in ("all", "none"):
        return "all" if text == "all" else []
    return [f.strip() for f in text.split(",") if f.strip()]


def _given(engine_config: EngineConfig | Mapping[str, Any] | None) -> dict[str, Any]:
    if isinstance(engine_config, EngineConfig):
        return engine_config.model_dump(exclude_unset=True)
    return dict(engine_config or {})


class _Kit:
    def __init__(
        self,
        backend: str,
        given: dict[str, Any],
        plugins: PluginHost,
        store: ModelStore,
        checks: Collection[str] | None,
        on_result: Callable[[CheckResult], None] | None,
    ) -> None:
        self.backend, self.given, self.plugins, self.store = backend, given, plugins, store
        self.selected = None if checks is None else set(checks)
        self.on_result = on_result
        self.report = Report(backend, "")

    def config(self, context_length: int | None) -> EngineConfig:
        values = {**KIT_DEFAULTS, **self.given}
        values.setdefault("session_len", min(context_length or KIT_SESSION_LEN, KIT_SESSION_LEN))
        return EngineConfig.coerce(values)

    def run(self, model: str | Path | None, families: Sequence[str] | str) -> Report:
        # Without a model, the first built-in one the backend claims is the one to check.
        everything = model is None or families == "all"
        claimed = self._claimed("all" if everything else families)
        if model is None:
            if not claimed:
                raise KitError(
                    f"backend {self.backend!r} runs none of the built-in small models; give it "
                    "a small model it runs (--model DIR)"
                )
            primary = claimed[0]
            model = self.store.build(primary)
        else:
            primary = None
        self.report.model = str(primary or model)
        self._check_model(model, primary, contract=True)
        wanted = claimed if families == "all" else [f for f in claimed if f in families]
        if families != "all":  # only the asked families' refusals are news
            refused = self.report.unclaimed.items()
            self.report.unclaimed = {f: r for f, r in refused if f in families}
            self.report.families_probed = len(families)
        for family in wanted:
            if family != primary:
                self._check_model(self.store.build(family), family, contract=False)
        tp_config = self.config(None)
        self._record(
            TP_CHECK, lambda: tensor_parallel(self.backend, model, tp_config, self.plugins)
        )
        return self.report

    def _claimed(self, families: Sequence[str] | str) -> list[str]:
        names = list(self.store.configs) if families == "all" else list(families)
        unknown = [f for f in names if f not in self.store.configs]
        if unknown:
            known = ", ".join(self.store.configs)
            raise KitError(f"no built-in small model of family {unknown[0]!r}; known: {known}")
        reasons = self.store.claimed(self.backend, self.config(None), self.plugins, names)
        unknown_backend = [r for r in reasons.values() if r and r.startswith("unknown backend")]
        if unknown_backend and len(unknown_backend) == len(reasons):
            raise KitError(unknown_backend[0])
        self.report.unclaimed.update({f: r for f, r in reasons.items() if r is not None})
        self.report.families_probed = len(reasons)
        return [f for f, reason in reasons.items() if reason is None]

    def _check_model(self, model: str | Path, family: str | None, contract: bool) -> None:
        try:
            config = self.config(self._context_length(model))
            target = open_target(self.backend, model, config, self.plugins)
        except Exception as e:  # noqa: BLE001 - the first check says what went wrong
            self._unloadable(e, family, contract)
            return
        label = family or target.spec.model_type
        if contract:
            for name, check in CONTRACT_CHECKS.items():
                self._record(name, lambda check=check: check(target))
        self._model_checks(target, label)
        if contract:
            for name, check in ENGINE_CHECKS.items():
                self._record(name, lambda check=check: check(target))
        if not self.report.results or self.report.results[-1].name != "close":
            target.runner.close()

    def _context_length(self, model: str | Path) -> int | None:
        from ..pipeline import read_spec

        return read_spec(model, plugins=self.plugins).context_length

    def _unloadable(self, error: Exception, family: str | None, contract: bool) -> None:
        """The model did not load: the first check fails with why, the others cannot run."""
        model = [f"{check}[{family or 'model'}]" for check in MODEL_CHECKS]
        names = [*CONTRACT_CHECKS, *model, *ENGINE_CHECKS] if contract else model
        names = [n for n in names if self._wanted(n)]
        if not names:
            return
        self._add(CheckResult(names[0], "fail", f"loading the model failed: {_describe(error)}"))
        for name in names[1:]:
            self._add(CheckResult(name, "n/a", f"no runner ({names[0]} failed)"))

    def _model_checks(self, target: Target, label: str) -> None:
        names = [f"{check}[{label}]" for check in MODEL_CHECKS]
        if not any(self._wanted(n) for n in names):
            return
        try:
            reference = model_checks.load_reference(target)
        except NotApplicable as e:
            for name in names:
                self._add(CheckResult(name, "n/a", str(e)))
            return
        self._record(names[0], lambda: model_checks.hf_logits(target, reference))
        self._record(names[1], lambda: model_checks.hf_greedy_tokens(target, reference))
        self._record(names[2], lambda: lora_check.hf_lora(target, reference))

    def _wanted(self, name: str) -> bool:
        return self.selected is None or name in self.selected or name.split("[")[0] in self.selected

    def _record(self, name: str, check: Callable[[], str]) -> None:
        if not self._wanted(name):
            return
        try:
            result = CheckResult(name, "pass", check())
        except NotApplicable as e:
            result = CheckResult(name, "n/a", str(e))
        except Mismatch as e:
            result = CheckResult(name, "fail", str(e))
        except Exception as e:  # noqa: BLE001 - a runner that raises fails the check
            result = CheckResult(name, "fail", _describe(e))
        self._add(result)

    def _add(self, result: CheckResult) -> None:
        self.report.results.append(result)
        if self.on_result is not None:
            self.on_result(result)


def _describe(error: BaseException) -> str:
    """The error and where it was raised (the runner's own line, usually)."""
    frames = traceback.extract_tb(error.__traceback__)
    where = f" (at {Path(frames[-1].filename).name}:{frames[-1].lineno})" if frames else ""
    return f"{type(error).__name__}: {error}{where}"
