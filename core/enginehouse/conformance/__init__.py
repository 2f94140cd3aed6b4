"""The backend conformance kit: prove a backend meets the runner contract.

`enginehouse conformance BACKEND` runs it from the command line; `run_conformance()` from
Python; and, as a pytest plugin, `pytest -p enginehouse.conformance --backend NAME` adds one
test per check to a backend's own test suite. pytest is imported only in that case.
"""

from __future__ import annotations

from typing import Any

from .kit import CHECKS, KitError, run_conformance
from .result import CheckResult, Report

__all__ = ["CHECKS", "CheckResult", "KitError", "Report", "run_conformance"]


def pytest_addoption(parser: Any) -> None:
    """pytest hook (this module loaded with -p): the kit's options."""
    from .pytest_plugin import add_options

    add_options(parser)


def pytest_configure(config: Any) -> None:
    """pytest hook: with --backend, register the plugin that adds one test per check."""
    if config.getoption("backend", None):
        from . import pytest_plugin

        config.pluginmanager.register(pytest_plugin, "enginehouse-conformance-checks")
