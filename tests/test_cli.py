"""The `enginehouse` command line: the real console script, and each command's behaviour."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from enginehouse import GenerationConfig, Response
from enginehouse import cli as cli_module
from enginehouse.chat_cli import printable
from enginehouse.pipeline import Pipeline
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
    assert plugins["pytorch"]["hooks"] == [
        "create_runner",
        "probe_backend",
        "register_commands",
        "register_model_families",
    ]
    assert plugins["pytorch"]["contract"] == "1.0"
    assert "LlamaForCausalLM" in plugins["pytorch"]["model_families"]
    assert plugins["enginehouse.default"]["platforms"] == ["cpu", "cuda"]
    assert {"enginehouse.default", "tensorrt", "vision"} <= set(plugins)
    assert all(p["error"] is None for p in plugins.values())


def test_console_script_explains_and_generates(llama_dir):
    explained = run("explain", str(llama_dir), "--json")
    assert explained.returncode == 0, explained.stderr
    report = json.loads(explained.stdout)
    assert report["chosen"] == "pytorch"
    assert report["architecture"] == "LlamaForCausalLM"
    assert {"model", "facts", "verdicts"} <= set(report)
    keys = {"backend", "plugin", "supported", "priority", "reason", "verifies_tokens"}
    keys |= {"lora_adapters", "drafts_tokens"}
    assert keys == set(report["verdicts"][0])
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
    assert result.stdout == printable(want.text) + "\n"


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
    # One sequence per step in the single case: its average batch is 1.
    assert rows[("single", "pytorch")]["avg_batch"] == 1.0
    assert "avg_batch" not in rows[("single", "hf-generate")]


def test_bench_refuses_an_unknown_case(llama_dir):
    done = run("bench", str(llama_dir), "--cases", "equal,warp")
    assert done.returncode != 0
    assert "unknown case 'warp'" in done.stderr


def test_explain_text_shows_what_the_engine_will_use(llama_dir):
    result = CliRunner().invoke(
        cli_module.cli, ["explain", str(llama_dir), "--session-len", "256", "--device", "cpu"]
    )
    assert result.exit_code == 0, result.output
    assert "context:      256 tokens" in result.output
    assert "device:       cpu, float32" in result.output
    assert "KV cache:     80% of the memory free after the weights load (about " in result.output
    sized = CliRunner().invoke(
        cli_module.cli, ["explain", str(llama_dir), "--kv-cache-memory", "64MiB"]
    )
    assert "KV cache:     64.0 MiB" in sized.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["--backend", "nope"], "Error: unknown backend 'nope'"),
        (["--backend", "tensorrt", "--device", "cpu"], "Error: backend 'tensorrt' cannot run"),
    ],
)
def test_bench_refuses_a_backend_that_cannot_run_before_any_side_runs(args, message, llama_dir):
    done = run("bench", str(llama_dir), "--quick", "--cases", "single", *args)
    assert done.returncode == 1
    assert message in done.stderr
    assert "Traceback" not in done.stderr and done.stdout == ""  # no baseline was timed


def test_generate_checks_images_before_loading_weights(llama_dir, tmp_path):
    missing = CliRunner().invoke(
        cli_module.cli, ["generate", str(llama_dir), "hi", "--image", str(tmp_path / "cat.png")]
    )
    assert missing.exit_code == 2
    assert f"Invalid value for --image: '{tmp_path / 'cat.png'}' is not a file" in missing.output
    (tmp_path / "cat.png").write_bytes(b"not looked at")
    text_model = CliRunner().invoke(
        cli_module.cli, ["generate", str(llama_dir), "hi", "--image", str(tmp_path / "cat.png")]
    )
    assert text_model.exit_code == 2
    assert "LlamaForCausalLM takes text only; --image needs a vision-language model" in (
        text_model.output
    )


def test_generate_escapes_control_characters_in_model_output(llama_dir, monkeypatch):
    def stream(self, *args, **kwargs):
        yield Response(text="clear\x1b[2Jscreen\x07", index=0)

    monkeypatch.setattr(Pipeline, "stream", stream)
    result = CliRunner().invoke(cli_module.cli, ["generate", str(llama_dir), "hi"])
    assert result.exit_code == 0, result.output
    assert result.stdout == "clear\\x1b[2Jscreen\\x07\n"


def test_one_max_new_tokens_default_everywhere():
    default = GenerationConfig().max_new_tokens
    for command in ("generate", "chat"):
        option = next(
            p for p in cli_module.cli.commands[command].params if p.name == "max_new_tokens"
        )
        assert option.default == default, command


def test_serve_on_a_busy_port_fails_before_loading_the_model(llama_dir):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = run("serve", str(llama_dir), "--port", str(port))
    assert done.returncode == 1
    assert f"Error: cannot listen on 127.0.0.1:{port}: Address already in use" in done.stderr
    assert "serving" not in done.stderr  # it stopped before the pipeline was built


def test_the_example_third_party_plugin_is_not_in_the_users_environment():
    # The tests install `toy` for themselves (conftest.py); the environment scripts/setup.sh
    # makes, which the README's main job runs, has only the project's own plugins.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(
        [str(SCRIPT), "plugins", "--json"], capture_output=True, text=True, env=env, timeout=120
    )
    names = {p["name"] for p in json.loads(done.stdout)}
    assert "toy" not in names and {"pytorch", "tensorrt", "vision"} <= names
