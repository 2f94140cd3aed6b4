"""The conformance kit for a plugin's platforms, model families and logits processors, and
the contract version it declares (`enginehouse conformance-plugin NAME`,
`check_plugin()`).

- `contract-version`: the module declares `ENGINEHOUSE_CONTRACT`, of the core's major version;
- `platform[NAME]`: its device holds tensors and computes, its free memory is a positive
  number of bytes, its preferred dtype is one the core knows;
- `platform-tp2[NAME]`: where it claims two ranks (host-shared ranks, or two devices), two
  processes join a process group with its collective backend and all-reduce on its device;
- `family[ARCH]`: a tiny random model of its `reference` transformers class, written as the
  family's checkpoint (`from_reference`), gives the same greedy tokens on the native backend
  as transformers' `generate` on the reference;
- `logits-processor[NAME]`: applied to some rows of a batch, it leaves the others as they
  were (and, where it claims argmax invariance, keeps each row's argmax).
"""

from __future__ import annotations

import multiprocessing
import os
import socket
import tempfile
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from ..contract import DECLARATION, check_declared
from ..errors import PluginLoadError
from ..families import ModelFamily
from ..hookspecs import hookimpl
from ..logits_processors import BatchUpdate, LogitsProcessor
from ..platforms import Platform
from .result import CheckResult, Mismatch, NotApplicable, Report

PROMPTS = ((5, 6, 7, 8), (9, 10, 11, 12, 13, 14, 15))  # token ids: no tokenizer involved
NEW_TOKENS = 8


def check_plugin(
    plugin: ModuleType | Any,
    name: str | None = None,
    device: str = "cpu",
    on_result: Callable[[CheckResult], None] | None = None,
) -> Report:
    """Run every check that applies to `plugin` (the module its entry point names, or any
    object with its hooks); the families run on `device`. Every check has a result."""
    label = name or getattr(plugin, "__name__", type(plugin).__name__)
    report = Report(backend=f"plugin {label}", model="-")
    for check, run in _checks(plugin, label, device):
        result = _run(check, run)
        report.results.append(result)
        if on_result is not None:
            on_result(result)
    return report


def _hook(plugin: Any, hook: str) -> list:
    fn = getattr(plugin, hook, None)
    return list(fn() or ()) if callable(fn) else []


def _checks(plugin: Any, label: str, device: str) -> Iterator[tuple[str, Callable[[], str]]]:
    yield "contract-version", lambda: contract_version(plugin, label)
    for platform in _hook(plugin, "register_platforms"):
        yield f"platform[{platform.name}]", lambda p=platform: platform_basics(p)
        yield f"platform-tp2[{platform.name}]", lambda p=platform: platform_collectives(p)
    for family in _hook(plugin, "register_model_families"):
        yield f"family[{family.architecture}]", lambda f=family: family_tokens(f, device)
    for cls in _hook(plugin, "register_logits_processors"):
        yield f"logits-processor[{cls.name}]", lambda c=cls: processor_rows(c)


def _run(name: str, check: Callable[[], str]) -> CheckResult:
    try:
        return CheckResult(name, "pass", check())
    except NotApplicable as e:
        return CheckResult(name, "n/a", str(e))
    except Mismatch as e:
        return CheckResult(name, "fail", str(e))
    except Exception as e:  # noqa: BLE001 - a crash is a failure, with its cause
        last = traceback.extract_tb(e.__traceback__)[-1]
        return CheckResult(name, "fail", f"{type(e).__name__}: {e} ({last.name}:{last.lineno})")


def contract_version(plugin: Any, label: str) -> str:
    declared = getattr(plugin, DECLARATION, None)
    if declared is None:
        raise Mismatch(f"declares no {DECLARATION}; set it to the contract it was written for")
    try:
        check_declared(plugin, repr(label))
    except PluginLoadError as e:
        raise Mismatch(str(e)) from None
    return f"written for {declared}"


def platform_basics(platform: Platform) -> str:
    if not platform.is_available():
        raise NotApplicable(f"{platform.name} is not available on this machine")
    from ..device import DTYPES

    count = platform.device_count()
    if count < 1:
        raise Mismatch(f"available, but device_count() is {count}")
    device = platform.torch_device(0)
    x = torch.arange(6, dtype=torch.float32, device=device).reshape(2, 3)
    if (x @ x.T).cpu().tolist() != [[5.0, 14.0], [14.0, 50.0]]:
        raise Mismatch(f"a matmul on {device} gave the wrong result")
    free = platform.free_memory(device)
    if not isinstance(free, int) or free <= 0:
        raise Mismatch(f"free_memory({device}) is {free!r}, not a positive number of bytes")
    dtype = platform.preferred_dtype("bfloat16")
    if dtype not in DTYPES:
        raise Mismatch(f"preferred_dtype gave {dtype!r}, not one of {', '.join(DTYPES)}")
    return f"{count} device(s) on {device}, {free / 2**30:.1f} GiB free, prefers {dtype}"


def platform_collectives(platform: Platform) -> str:
    if not platform.is_available():
        raise NotApplicable(f"{platform.name} is not available on this machine")
    if platform.device_per_rank and platform.device_count() < 2:
        raise NotApplicable(f"one rank per device, and {platform.device_count()} device here")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # Forked, so that the children have this platform object as it is (a variant included).
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(platform, r, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(30)
    errors = [r for r in results if isinstance(r, str)]
    if errors:
        raise Mismatch(f"{platform.collective_backend} at 2 ranks: {errors[0]}")
    if any(r != [3.0, 3.0] for r in results):
        raise Mismatch(f"all_reduce of 1 and 2 gave {results}, expected [3.0, 3.0] on both")
    return f"all_reduce over 2 ranks with {platform.collective_backend}"


def _rank(platform: Platform, rank: int, port: int, queue: Any) -> None:
    try:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        if platform.device_per_rank:
            platform.set_device(rank)
        torch.distributed.init_process_group(
            platform.collective_backend,
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=2,
        )
        device = platform.torch_device(rank if platform.device_per_rank else None)
        x = torch.full((2,), float(rank + 1), device=device)
        torch.distributed.all_reduce(x)
        queue.put(x.cpu().tolist())
        torch.distributed.destroy_process_group()
    except Exception as e:  # noqa: BLE001 - sent to the parent as the check's failure
        queue.put(f"rank {rank}: {type(e).__name__}: {e}")


class _FamilyShim:
    """Puts one family (a variant under test) ahead of the installed ones, for one check."""

    def __init__(self, family: ModelFamily) -> None:
        self.family = family

    @hookimpl(tryfirst=True)
    def register_model_families(self) -> list[ModelFamily]:
        return [self.family]


def family_tokens(family: ModelFamily, device: str) -> str:
    if family.reference is None or family.from_reference is None:
        raise NotApplicable(
            "the family names no transformers reference (reference=, from_reference=)"
        )
    import transformers

    from ..config import GenerationConfig
    from ..pipeline import pipeline
    from ..plugins import get_plugins
    from ..testing import TINY, build_model

    reference = getattr(transformers, family.reference)
    host = get_plugins()
    shim = _FamilyShim(family)
    with tempfile.TemporaryDirectory(prefix="enginehouse-family-") as tmp:
        src, dst = Path(tmp) / "reference", Path(tmp) / "family"
        config = reference.config_class(**TINY, vocab_size=512, bos_token_id=1, eos_token_id=2)
        build_model(src, config, chat_template=None)
        family.from_reference(src, dst)
        expected = _hf_greedy(src)
        host.pm.register(shim, name="conformance-family-under-test")
        try:
            pipe = pipeline(
                str(dst),
                backend=family.backend,
                engine_config={"device": device, "dtype": "float32"},
                progress=False,
            )
            try:
                fixed = GenerationConfig(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)
                got = [pipe({"token_ids": list(p)}, fixed).token_ids for p in PROMPTS]
            finally:
                pipe.close()
        finally:
            host.pm.unregister(shim)
    for prompt, g, e in zip(PROMPTS, got, expected):
        if list(g) != e:
            raise Mismatch(
                f"{family.architecture} on {family.backend}: greedy tokens of {prompt!r} "
                f"{list(g)}, {family.reference} in transformers {e}"
            )
    return f"greedy tokens equal {family.reference}'s in transformers ({len(PROMPTS)} prompts)"


def _hf_greedy(folder: Path) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    out = []
    for prompt in PROMPTS:
        ids = torch.tensor([prompt])
        gen = model.generate(
            ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False
        )
        out.append(gen[0, ids.shape[1] :].tolist())
    return out


def processor_rows(cls: type[LogitsProcessor]) -> str:
    proc = cls()
    args = dict(getattr(cls, "example_args", {}) or {})
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn((4, 64), generator=gen)
    before = logits.clone()
    asking = {10: 0, 12: 2}  # seq_id -> row: rows 0 and 2 ask, 1 and 3 do not
    proc.update_state(
        BatchUpdate(
            added=[(s, args) for s in asking], rows=asking, output_ids={s: [] for s in asking}
        )
    )
    after = proc.apply(logits)
    for row in (1, 3):
        if not torch.equal(after[row], before[row]):
            raise Mismatch(f"{cls.name} changed row {row}, whose request did not ask for it")
    changed = [r for r in asking.values() if not torch.equal(after[r], before[r])]
    if proc.is_argmax_invariant():
        for r in asking.values():
            if after[r].argmax() != before[r].argmax():
                raise Mismatch(f"{cls.name} claims argmax invariance but moved row {r}'s argmax")
    proc.update_state(BatchUpdate(removed=list(asking)))
    what = f"changed rows {changed}" if changed else "changed no row with example_args"
    return f"{what} of the 2 that ask, left the other 2 as they were"
