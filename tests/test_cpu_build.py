"""How the C++ CPU kernels are built: one cached library per instruction set, announced first.

The compiler itself is replaced by a recorder here (building a real extension takes tens of
seconds); tests/test_cpu_kernels.py builds and runs the real kernel.
"""

from __future__ import annotations

import logging

import pytest
import torch.utils.cpp_extension

from enginehouse_pytorch.native import cpu_build


@pytest.fixture
def builds(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.delenv("ENGINEHOUSE_CPU_KERNELS", raising=False)
    calls: list[str] = []

    def load_inline(name, **kwargs):
        calls.append(name)
        (tmp_path / name / f"{name}.so").write_bytes(b"")  # what a finished build leaves

    monkeypatch.setattr(torch.utils.cpp_extension, "load_inline", load_inline)
    return calls


def test_the_library_name_carries_the_instruction_sets(monkeypatch):
    monkeypatch.setattr(cpu_build, "cpu_flags", lambda: ["avx", "avx2", "fma", "sse4_2"])
    avx2 = cpu_build.isa_tag()
    monkeypatch.setattr(cpu_build, "cpu_flags", lambda: ["avx", "avx2", "avx512f", "fma"])
    avx512 = cpu_build.isa_tag()
    assert avx2.startswith("avx2_") and avx512.startswith("avx512_") and avx2 != avx512
    monkeypatch.setattr(cpu_build, "cpu_flags", lambda: ["avx", "avx2", "avx512f", "avx512_bf16"])
    assert cpu_build.isa_tag() != avx512  # a narrower difference still builds its own


def test_a_build_is_announced_once_then_found(builds, caplog):
    caplog.set_level(logging.WARNING)
    assert cpu_build.build("eh_test_kernel", "// source", "test kernel")
    name = f"eh_test_kernel_{cpu_build.isa_tag()}"
    assert builds == [name]
    assert f"building the test kernel for this CPU ({name}): once" in caplog.text
    assert "enginehouse pytorch build-kernels" in caplog.text
    caplog.clear()
    assert cpu_build.build("eh_test_kernel", "// source", "test kernel")
    assert "building" not in caplog.text  # already built for this CPU: no message


def test_kernels_can_be_switched_off(builds, monkeypatch):
    monkeypatch.setenv("ENGINEHOUSE_CPU_KERNELS", "0")
    assert cpu_build.build("eh_test_kernel", "// source", "test kernel") is False
    assert builds == []
