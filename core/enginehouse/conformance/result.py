"""What a conformance run reports: one result per named check, and the exit status."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

Status = Literal["pass", "fail", "n/a"]


class Mismatch(AssertionError):
    """A check found the runner breaking the contract; the message says what differed."""


class NotApplicable(Exception):
    """A check that does not apply to this runner or model; the message says why."""


@dataclass(frozen=True)
class CheckResult:
    name: str
    status: Status
    detail: str = ""

    def line(self) -> str:
        return f"{self.status:<4}  {self.name:<22}  {self.detail}".rstrip()


@dataclass
class Report:
    backend: str
    model: str
    results: list[CheckResult] = field(default_factory=list)
    # Built-in families the backend's probe refused, with its reason: no model checks there.
    unclaimed: dict[str, str] = field(default_factory=dict)
    families_probed: int = 0

    @property
    def ok(self) -> bool:
        """No check failed (not applicable ones do not count against the backend)."""
        return all(r.status != "fail" for r in self.results)

    @property
    def exit_status(self) -> int:
        return 0 if self.ok else 1

    def result(self, name: str) -> CheckResult:
        return next(r for r in self.results if r.name == name)

    def refused(self) -> str:
        """The refused families, in short."""
        if len(self.unclaimed) == self.families_probed:
            return f"all {self.families_probed} built-in ones"
        return ", ".join(self.unclaimed)

    def summary(self) -> str:
        counts = {s: sum(r.status == s for r in self.results) for s in ("pass", "fail", "n/a")}
        return f"{counts['pass']} passed, {counts['fail']} failed, {counts['n/a']} not applicable"

    def as_dict(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "model": self.model,
            "ok": self.ok,
            "results": [asdict(r) for r in self.results],
            "unclaimed_families": self.unclaimed,
        }
