"""Shared fixtures: small random-weight models with real tokenizers (see enginehouse.testing),
built once per test session. Nothing here touches the network.

The example third-party plugin (tests/third_party_plugin, `enginehouse-toy`) is pip-installed
for the test session only, into a folder of its own that this process and its subprocesses put
on their path: its entry point is read from real installed metadata, and the environment users
run (scripts/setup.sh) never sees a `toy` backend.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"  # tests never reach the hub, even by accident
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _install_toy_plugin() -> None:
    target = Path(tempfile.mkdtemp(prefix="enginehouse-toy-"))
    source = Path(__file__).parent / "third_party_plugin"
    pip = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    pip += ["--no-deps", "--no-index", "--no-build-isolation", "--target", str(target)]
    subprocess.run([*pip, str(source)], check=True, capture_output=True)
    sys.path.insert(0, str(target))
    os.environ["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(target), os.environ.get("PYTHONPATH")])
    )


_install_toy_plugin()  # before any test module imports it or loads plugins

from enginehouse.testing import (  # noqa: E402, F401 - re-exported for the tests
    CHATML_TEMPLATE,
    build_model,
    build_tokenizer,
    model_configs,
)


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def tiny_models(models_dir) -> dict[str, Path]:
    """Small random-weight Llama, Qwen2 and Mistral models, keyed by family."""
    return {name: build_model(models_dir / name, cfg) for name, cfg in model_configs(512).items()}


@pytest.fixture(scope="session")
def llama_dir(tiny_models) -> Path:
    return tiny_models["llama"]


@pytest.fixture(scope="session")
def base_llama_dir(models_dir) -> Path:
    """A Llama whose tokenizer has no chat template (a base model)."""
    return build_model(models_dir / "llama-base", model_configs(512)["llama"], chat_template=None)


@pytest.fixture(scope="session")
def toy_dir(models_dir) -> Path:
    """A model folder the example third-party `toy` backend runs (no weights: its runner
    computes from the context alone), with a real tokenizer."""
    folder = models_dir / "toy"
    build_tokenizer(folder, 512)
    config = {
        "architectures": ["ToyForCausalLM"],
        "model_type": "toy",
        "vocab_size": 512,
        "max_position_embeddings": 128,
        "eos_token_id": 2,
    }
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="session")
def llama_pipe(llama_dir):
    from enginehouse import pipeline

    pipe = pipeline(str(llama_dir), engine_config={"max_batch_size": 16}, progress=False)
    yield pipe
    pipe.close()


class PeakMemory:
    """Peak resident memory of this process while the block runs, above where it started.
    The kernel's high-water mark is reset first (/proc/self/clear_refs), so the figure is exact
    however loaded the machine is."""

    def __enter__(self) -> PeakMemory:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pytest.skip("cannot reset the peak resident memory on this system")
        self.start = self._kib("VmRSS")
        return self

    def __exit__(self, *exc: object) -> None:
        self.growth = (self._kib("VmHWM") - self.start) * 1024  # bytes

    @staticmethod
    def _kib(field: str) -> int:
        with open("/proc/self/status") as f:
            return int(re.search(rf"{field}:\s+(\d+)", f.read()).group(1))


@pytest.fixture
def peak_memory() -> type[PeakMemory]:
    return PeakMemory
