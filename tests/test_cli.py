"""The `enginehouse` command line: the real console script, and each command's behaviour."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from enginehouse import cli as cli_module
from enginehouse.plugins import reset_plugins

SCRIPT = Path(sys.executable).with_name("enginehouse")


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(SCRIPT), *args], capture_output=True, text=True, timeout=300, check=False
    )


def test_console_script_lists_plugins_from_installed_metadata():
    result = run("plugins", "--json")
    assert result.returncode == 0, result.stderr
    plugins = {p["name"]: p for p in json.loads(result.stdout)}
    assert plugins["pytorch"]["distribution"] == "enginehouse-pytorch"
    assert plugins["pytorch"]["hooks"] == ["create_runner", "probe_backend", "register_commands"]
    assert {"enginehouse.default", "tensorrt", "vision"} <= set(plugins)
    assert all(p["error"] is None for p in plugins.values())


def test_console_script_explains_and_generates(llama_dir):
    explained = run("explain", str(llama_dir), "--json")
    assert explained.returncode == 0, explained.stderr
    report = json.loads(explained.stdout)
    assert report["chosen"] == "pytorch"
    assert report["architecture"] == "LlamaForCausalLM"
    assert {"model", "facts", "verdicts"} <= set(report)
    assert {"backend", "plugin", "supported", "priority", "reason"} == set(report["verdicts"][0])
    native, fallback = report["verdicts"][:2]
    assert (native["backend"], native["supported"]) == ("pytorch", True)
    assert "native llama implementation" in native["reason"]
    assert (fallback["backend"], fallback["supported"]) == ("transformers", True)
    assert "LlamaForCausalLM" in fallback["reason"]
    generated = run("generate", str(llama_dir), "Hello", "--max-new-tokens", "5", "--no-stream")
    assert generated.returncode == 0, generated.stderr
    assert generated.stdout.strip()


def test_explain_human_output_names_every_backend(llama_dir):
    result = CliRunner().invoke(cli_module.cli, ["explain", str(llama_dir)])
    assert result.exit_code == 0, result.output
    for name in ("transformers", "pytorch", "tensorrt", "onnxruntime"):
        assert name in result.output
    assert "chosen:       pytorch" in result.output
    assert "native llama implementation" in result.output


def test_generate_streams_and_matches_the_python_api(llama_dir, llama_pipe):
    from enginehouse import GenerationConfig

    args = ["generate", str(llama_dir), "hello", "world", "--max-new-tokens", "8", "--raw"]
    result = CliRunner().invoke(cli_module.cli, args)
    assert result.exit_code == 0, result.output
    want = llama_pipe("hello world", GenerationConfig(max_new_tokens=8), apply_chat_template=False)
    assert result.stdout == want.text + "\n"


@pytest.mark.parametrize(
    "args, message",
    [
        (["generate", "./no-such-model", "hi"], "does not exist"),
        (["explain", "some-org/not-cached-model"], "not in the local cache"),
        (["generate", "{llama}", "hi", "--backend", "nope"], "unknown backend 'nope'"),
        (["generate", "{llama}", "hi", "--temperature", "-1"], "temperature"),
        (["generate", "{llama}", "hi", "--kv-cache-memory", "lots"], "kv_cache_memory"),
        (["explain", "{llama}", "--backend", "tensorrt", "--device", "cpu"], "NVIDIA GPUs only"),
    ],
)
def test_bad_input_is_one_clear_line(args, message, llama_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    args = [a.replace("{llama}", str(llama_dir)) for a in args]
    result = CliRunner().invoke(cli_module.cli, args)
    assert result.exit_code == 1
    assert message in result.output
    assert "Traceback" not in result.output


def test_register_commands_hook_adds_a_command(tmp_path, monkeypatch):
    dist = tmp_path / "hello_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: hello-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[enginehouse]\nhello = hello_plugin\n")
    (tmp_path / "hello_plugin.py").write_text(
        "import click\nfrom enginehouse import hookimpl\n\n"
        "@hookimpl\ndef register_commands(cli):\n"
        "    @cli.command()\n    def hello():\n        click.echo('hello from a plugin')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    reset_plugins()
    try:
        with pytest.raises(SystemExit) as exit_info:
            cli_module.main(["hello"])
        assert exit_info.value.code == 0
    finally:
        cli_module.cli.commands.pop("hello", None)
        reset_plugins()
    assert "hello" not in cli_module.cli.commands


def test_bench_times_the_backend_against_generate(llama_dir):
    # The real console script, quick sets, two cases: every side runs in a fresh process.
    done = run("bench", str(llama_dir), "--quick", "--cases", "single,ttft", "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert set(result["seconds"]) == {"hf-generate", "pytorch"}
    rows = {(r["case"], r["side"]): r for r in result["rows"]}
    assert rows[("single", "hf-generate")]["ratio"] == 1.0
    assert rows[("single", "pytorch")]["tokens_per_s"] > 0
    assert rows[("ttft", "pytorch")]["ratio"] > 0


def test_bench_refuses_an_unknown_case(llama_dir):
    done = run("bench", str(llama_dir), "--cases", "equal,warp")
    assert done.returncode != 0
    assert "unknown case 'warp'" in done.stderr
