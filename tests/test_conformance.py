"""The conformance kit (`enginehouse.conformance`): the project's own backends and the example
third-party one pass it; deliberately broken runners fail it, and the failure names what
differed. The kit runs on the command line, in Python and as a pytest plugin."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner

from enginehouse.cli import cli
from enginehouse.conformance import CHECKS, KitError, run_conformance
from enginehouse.hookspecs import hookimpl
from enginehouse.plugins import load_plugins
from enginehouse.runner import KVSpec, ScheduledBatch
from enginehouse.spec import BackendProbe
from enginehouse_toy.runner import ToyRunner  # installed for the session by conftest.py

# Contiguous caches share no blocks; nor do these runners verify several tokens at once.
NOT_SHARING = {"prefix-cache", "tensor-parallel", "verify-tokens"}


@pytest.fixture(scope="module", autouse=True)
def cache(tmp_path_factory):
    """The onnxruntime backend's export goes to a private cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ENGINEHOUSE_CACHE", str(tmp_path_factory.mktemp("eh-cache")))
        yield


def not_applicable(report) -> set[str]:
    return {r.name for r in report.results if r.status == "n/a"}


@pytest.mark.parametrize(
    "backend, expected_na",
    [
        ("pytorch", set()),
        ("transformers", NOT_SHARING | {"hf-lora[llama]"}),  # no LoRA adapters
        ("onnxruntime", NOT_SHARING | {"hf-lora[llama]"}),
    ],
)
def test_the_project_backends_pass(backend, expected_na):
    report = run_conformance(backend, families=[])
    lines = "\n".join(r.line() for r in report.results)
    assert report.ok and report.exit_status == 0, lines
    assert report.model == "llama"  # the first built-in model every one of them runs
    assert [r.name.split("[")[0] for r in report.results] == list(CHECKS)
    assert not_applicable(report) == expected_na, lines
    if backend == "pytorch":  # the one that shards: tp=2 checked against tp=1
        assert "gave tp=1's tokens" in report.result("tensor-parallel").detail


def test_the_toy_backend_passes_on_its_own_model(toy_dir):
    report = run_conformance("toy", toy_dir, families=[])
    assert report.ok, "\n".join(r.line() for r in report.results)
    assert not_applicable(report) == {
        "hf-logits[toy]",
        "hf-greedy[toy]",
        "hf-lora[toy]",
        "tensor-parallel",
        "verify-tokens",
    }
    assert "transformers cannot load this model" in report.result("hf-logits[toy]").detail
    assert "no tensor parallelism" in report.result("tensor-parallel").detail


def test_a_backend_without_a_builtin_model_is_told_to_bring_one():
    with pytest.raises(KitError, match=r"'toy' runs none of the built-in .*\(--model DIR\)"):
        run_conformance("toy")


# --- broken runners: the toy runner with one mistake each ------------------------------------


class RowsInItsOwnOrder(ToyRunner):
    """Returns a batch's rows prefills-by-length order, not chunk order."""

    def execute(self, batch: ScheduledBatch) -> torch.Tensor:
        logits = super().execute(batch)
        sizes = [len(c.logits_at) for c in batch.chunks]
        rows = list(zip(logits.split(sizes), batch.chunks))
        rows.sort(key=lambda pair: len(pair[1].token_ids))
        return torch.cat([r for r, _ in rows])


class KeepsEverySequence(ToyRunner):
    """Keeps a tensor per sequence and never drops it."""

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.per_sequence: dict[int, torch.Tensor] = {}

    def execute(self, batch: ScheduledBatch) -> torch.Tensor:
        for c in batch.chunks:
            self.per_sequence[c.seq_id] = torch.zeros(1024)
        return super().execute(batch)


class PromisesTooLittle(ToyRunner):
    """Tells the engine one byte a token, allocates eight."""

    def __init__(self, *args) -> None:
        super().__init__(*args)
        bs = self.kv_spec.block_size
        self.kv_spec = KVSpec(block_size=bs, bytes_per_block=bs)


class CannotClose:
    """Everything but `close`."""

    def __init__(self, *args) -> None:
        self.toy = ToyRunner(*args)
        self.kv_spec = self.toy.kv_spec
        self.load, self.allocate_kv, self.execute = (
            self.toy.load,
            self.toy.allocate_kv,
            self.toy.execute,
        )


BROKEN = {
    "rows-own-order": RowsInItsOwnOrder,
    "keeps-sequences": KeepsEverySequence,
    "promises-too-little": PromisesTooLittle,
}


class BrokenPlugin:
    @hookimpl
    def probe_backend(self, spec, config):
        ok = spec.model_type == "toy"
        return [BackendProbe(name, ok, priority=0, reason="test") for name in BROKEN]

    @hookimpl
    def create_runner(self, backend, spec, config, context):
        return BROKEN[backend](spec, config) if backend in BROKEN else None


@pytest.fixture(scope="module")
def broken_plugins():
    host = load_plugins()
    host.register(BrokenPlugin(), "broken")
    return host


@pytest.mark.parametrize(
    "backend, check, words",
    [
        (
            "rows-own-order",
            "batch-invariance",
            ["sequence 0 (5 prompt tokens) in one batch, position 4", "expected token"],
        ),
        ("rows-own-order", "logits-rows", ["chunk A in batch ABC, row 0", "out of order"]),
        ("keeps-sequences", "blocks-returned", ["grew by", "release_sequence"]),
        ("promises-too-little", "kv-spec", ["allocate_kv(", "bytes_per_block (4) promises"]),
    ],
)
def test_the_kit_catches_a_broken_runner(broken_plugins, toy_dir, backend, check, words):
    checks = {check, "chunked-prefill"}  # a check the runner passes, to show it is precise
    report = run_conformance(backend, toy_dir, checks=checks, plugins=broken_plugins)
    failed = report.result(check)
    assert failed.status == "fail" and report.exit_status == 1
    for word in words:
        assert word in failed.detail
    assert report.result("chunked-prefill").status == "pass"


def test_a_runner_missing_a_member_fails_the_protocol_check(broken_plugins, toy_dir):
    BROKEN["cannot-close"] = CannotClose
    try:
        report = run_conformance("cannot-close", toy_dir, families=[], plugins=broken_plugins)
    finally:
        del BROKEN["cannot-close"]
    protocol = report.result("runner-protocol")
    assert protocol.status == "fail"
    assert "a CannotClose for backend 'cannot-close', which is not a runner" in protocol.detail
    assert "it lacks close" in protocol.detail
    assert report.result("batch-invariance").status == "n/a"


# --- the command line and the pytest plugin ---------------------------------------------------


def test_the_command_prints_one_line_per_check(toy_dir):
    result = CliRunner().invoke(cli, ["conformance", "toy", "--model", str(toy_dir)])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split()[:2] == ["pass", "runner-protocol"]
    assert any(line.startswith("n/a   hf-logits[toy]") for line in lines)
    assert lines[-1] == f"toy on {toy_dir}: 10 passed, 0 failed, 5 not applicable"
    as_json = CliRunner().invoke(
        cli, ["conformance", "toy", "--model", str(toy_dir), "--json", "--check", "close"]
    )
    report = json.loads(as_json.output)
    assert report["ok"] and [r["name"] for r in report["results"]] == ["close"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["nosuch"], "unknown backend 'nosuch'; the installed backends are:"),
        (["toy", "--check", "nosuch"], "unknown check 'nosuch'; the checks are: runner-protocol"),
        (["toy", "--families", "nosuch"], "no built-in small model of family 'nosuch'"),
    ],
)
def test_the_command_names_what_it_cannot_run(toy_dir, args, message):
    result = CliRunner().invoke(cli, ["conformance", *args, "--model", str(toy_dir)])
    assert result.exit_code == 1 and message in result.output


def test_the_kit_does_not_need_pytest_unless_it_runs_inside_pytest():
    code = "import sys, enginehouse.conformance; print('pytest' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.stdout.strip() == "False", done.stderr


def test_the_pytest_plugin_adds_one_test_per_check(toy_dir, tmp_path):
    # A fresh pytest in an empty folder: only the plugin, loaded by its module name.
    command = [sys.executable, "-m", "pytest", "-p", "enginehouse.conformance", "-p"]
    command += ["no:cacheprovider", "--backend", "toy", "--conformance-model", str(toy_dir)]
    done = subprocess.run([*command, "-rs", "-v"], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "conformance[toy]::batch-invariance PASSED" in done.stdout
    assert "not applicable: hf-logits[toy]: transformers cannot load" in done.stdout
    assert "10 passed, 5 skipped" in done.stdout
