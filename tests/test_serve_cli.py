"""`enginehouse serve`: the real console script on a free port, its key from the environment,
and a clean shutdown on Ctrl-C (SIGINT) and SIGTERM."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import openai
import pytest

SCRIPT = Path(sys.executable).with_name("enginehouse")


class Server:
    """The console script on a free port; `url` is read from uvicorn's log."""

    def __init__(self, *args: str, env: dict[str, str]) -> None:
        self.process = subprocess.Popen(
            [str(SCRIPT), "serve", *args, "--port", "0"],
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            text=True,
            env={**os.environ, **env},
        )
        self.log: list[str] = []
        started = threading.Event()
        self.url = ""

        def read() -> None:
            for line in self.process.stderr:
                self.log.append(line)
                if found := re.search(r"running on (http://127\.0\.0\.1:\d+)", line):
                    self.url = found.group(1)
                    started.set()

        self.reader = threading.Thread(target=read, daemon=True)
        self.reader.start()
        if not started.wait(timeout=120):
            self.process.kill()
            pytest.fail("the server did not start:\n" + "".join(self.log))

    def stop(self, signum: int) -> int:
        self.process.send_signal(signum)
        code = self.process.wait(timeout=60)
        self.reader.join(timeout=10)
        return code


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM])
def test_console_script_serves_with_a_key_from_the_environment(llama_dir, stop):
    args = (str(llama_dir), "--served-model-name", "tiny", "--max-batch-size", "4")
    server = Server(*args, env={"ENGINEHOUSE_API_KEY": "from-env"})
    try:
        assert httpx.get(f"{server.url}/health").status_code == 200
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="from-env", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["tiny"]
        r = client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=3
        )
        assert r.usage.completion_tokens >= 1
        wrong = openai.OpenAI(base_url=f"{server.url}/v1", api_key="nope", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            wrong.models.list()
    finally:
        code = server.stop(stop)
    log = "".join(server.log)
    assert code == 0, log
    assert "Traceback" not in log and "Shutting down" in log


def test_console_script_names_its_parsers_and_default_template_kwargs(llama_dir):
    args = (str(llama_dir), "--reasoning-parser", "qwen3", "--max-batch-size", "4")
    kwargs = ("--default-chat-template-kwargs", '{"enable_thinking": false}')
    server = Server(*args, *kwargs, env={})
    try:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="-", max_retries=0)
        r = client.chat.completions.create(
            model=llama_dir.name, messages=[{"role": "user", "content": "hi"}], max_tokens=3
        )
        assert r.choices[0].message.model_extra["reasoning"] is None  # qwen3's, as asked
    finally:
        assert server.stop(signal.SIGINT) == 0
    log = "".join(server.log)
    assert "reasoning parser qwen3 (as asked)" in log
    assert "tool-call parser none (from the chat template)" in log


@pytest.mark.parametrize(
    "flag, value, words",
    [
        ("--reasoning-parser", "nope", "unknown reasoning parser 'nope'; use one of"),
        ("--tool-call-parser", "nope", "unknown tool-call parser 'nope'; use one of"),
        ("--default-chat-template-kwargs", "{oops", "not JSON"),
        ("--default-chat-template-kwargs", "[1]", "give a JSON object"),
    ],
)
def test_bad_parser_and_template_flags_fail_before_loading(tmp_path, flag, value, words):
    from click.testing import CliRunner

    from enginehouse.cli import cli

    # The folder holds no model: the flags are checked before anything is read.
    result = CliRunner().invoke(cli, ["serve", str(tmp_path), "--port", "0", flag, value])
    assert result.exit_code == 2, result.output
    assert words in result.output and flag in result.output
