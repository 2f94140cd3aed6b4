"""The kit inside pytest: `pytest -p enginehouse.conformance --backend NAME` adds one test item
per check to the session (passed, failed with what differed, or skipped with the reason).

The kit runs once, when the first item runs, and every item reports its own check's result.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from .kit import CHECKS, parse_families, run_conformance
from .result import CheckResult, Report

GROUP = "enginehouse conformance kit"


def add_options(parser: pytest.Parser) -> None:
    group = parser.getgroup("enginehouse-conformance", GROUP)
    group.addoption("--backend", default=None, help="run the kit's checks on this backend")
    group.addoption(
        "--conformance-model", default=None, metavar="DIR", help="check it on this model folder"
    )
    group.addoption(
        "--conformance-families",
        default="all",
        metavar="LIST",
        help="built-in families for the model checks: all, none, or e.g. llama,qwen2",
    )
    group.addoption(
        "--conformance-engine-config",
        default="{}",
        metavar="JSON",
        help='EngineConfig fields as JSON, e.g. \'{"dtype": "float32"}\'',
    )


class KitRun:
    """The kit's one run for this session, started by the first item that needs it."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.report: Report | None = None

    def result(self, name: str) -> CheckResult | None:
        if self.report is None:
            opt = self.config.getoption
            self.report = run_conformance(
                opt("backend"),
                model=opt("conformance_model"),
                engine_config=json.loads(opt("conformance_engine_config")),
                families=parse_families(opt("conformance_families")),
            )
        return combined(self.report, name)


def combined(report: Report, name: str) -> CheckResult | None:
    """The result of check `name`; for a model check, of every model it ran on together
    (failed if one failed, passed if one passed, else not applicable)."""
    results = [r for r in report.results if r.name.split("[")[0] == name]
    if not results:
        return None
    for status in ("fail", "pass", "n/a"):
        mine = [r for r in results if r.status == status]
        if mine:
            detail = "; ".join(f"{r.name}: {r.detail}" if "[" in r.name else r.detail for r in mine)
            return CheckResult(name, status, detail)
    return None


class CheckItem(pytest.Item):
    def __init__(self, *, kit: KitRun, check: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.kit, self.check = kit, check

    def runtest(self) -> None:
        result = self.kit.result(self.check)
        if result is None:
            pytest.skip(f"{self.check} did not run (an earlier step of the kit failed)")
        if result.status == "n/a":
            pytest.skip(f"not applicable: {result.detail}")
        if result.status == "fail":
            raise CheckFailed(result.detail)

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException], style=None) -> str:
        if isinstance(excinfo.value, CheckFailed):
            return f"{self.check}: {excinfo.value}"
        return super().repr_failure(excinfo)

    def reportinfo(self) -> tuple[str, int | None, str]:
        return "enginehouse-conformance", None, self.name


class CheckFailed(AssertionError):
    pass


def pytest_collection_modifyitems(
    session: pytest.Session, config: pytest.Config, items: list[pytest.Item]
) -> None:
    kit = KitRun(config)
    backend = config.getoption("backend")
    for check in CHECKS:
        name = f"conformance[{backend}]::{check}"
        items.append(CheckItem.from_parent(session, name=name, kit=kit, check=check))
