"""`enginehouse pytorch ...`: the native backend's tools."""

from __future__ import annotations

import sys

import click


@click.group()
def pytorch() -> None:
    """The native pytorch backend's tools."""


@pytorch.command("build-kernels")
def build_kernels() -> None:
    """Build the C++ CPU kernels for this CPU now, instead of on the first model load."""
    from .native import cpu_build, cpu_decode, cpu_kernels
    from .native.quant import cpu_kernel as quant_kernel

    if cpu_build.disabled():
        raise click.ClickException("ENGINEHOUSE_CPU_KERNELS is off: nothing to build")
    built = {
        "CPU attention kernel": cpu_kernels.load(),
        "CPU decode kernels": cpu_decode.load(),
        "CPU quantized-matmul kernel": quant_kernel.load(),
    }
    if cpu_build.isa_tag().startswith("avx512"):
        # The AVX2 path, which AVX2-only CPUs run, for the tests to check on this one.
        built["CPU quantized-matmul kernel, AVX2 variant (tests)"] = quant_kernel.load_avx2()
    for what, ok in built.items():
        click.echo(f"{what}: {'ready' if ok else 'FAILED (the torch-ops path is used)'}")
    click.echo(f"instruction sets: {cpu_build.isa_tag()}")
    if not all(built.values()):
        sys.exit(1)
