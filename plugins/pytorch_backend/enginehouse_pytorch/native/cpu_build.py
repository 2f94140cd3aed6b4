"""Build the native backend's C++ CPU kernels once per instruction set, and say so first.

Kernels are compiled with `-march=native` by torch's C++ extension machinery, which caches the
built library by name. The name therefore carries the instruction sets the compiler targeted
(`isa_tag`): a cache carried to another CPU (an AVX2-only machine after an AVX-512 one, say)
builds its own library instead of loading one with instructions that CPU lacks. A build takes
tens of seconds on a small machine, so it is announced before the wait;
`enginehouse pytorch build-kernels` builds every kernel ahead (scripts/setup.sh runs it).
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger(__name__)

# Vectorise the dot products and sums (reassociation), without assuming finite math.
# -fopenmp: at::parallel_for is an OpenMP pragma in torch's headers (its CPU builds use the
# OpenMP backend); without it a kernel's loop runs on one thread. The library it links,
# libgomp.so.1, is the one torch already loaded, so both share one thread pool.
FLAGS = [
    "-O3",
    "-march=native",
    "-fopenmp",
    "-fno-math-errno",
    "-fassociative-math",
    "-fno-signed-zeros",
    "-fno-trapping-math",
    "-ffp-contract=off",
]
# /proc/cpuinfo flags that change what -march=native emits (vector and bit-manipulation sets).
ISA_PREFIXES = ("avx", "sse", "ssse", "fma", "f16c", "bmi", "amx", "vnni", "vaes", "gfni")


def cpu_flags() -> list[str]:
    """The instruction-set flags of this CPU, sorted (empty where /proc/cpuinfo is absent)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            flags = line.partition(":")[2].split()
            return sorted({f for f in flags if f.startswith(ISA_PREFIXES)})
    return []


def isa_tag() -> str:
    """A short name for this CPU's instruction sets and this torch: the widest vector set, a
    hash of all of them and of the torch installation. Builds against two torch installations
    (two virtual environments) differ in their include paths, so sharing a name made each
    one's load rebuild what the other had built."""
    import torch

    flags = cpu_flags()
    widest = next((w for w in ("avx512f", "avx2", "avx") if w in flags), "generic")
    digest = hashlib.sha1(" ".join(flags).encode()).hexdigest()[:8]
    install = hashlib.sha1(f"{torch.__file__} {torch.__version__}".encode()).hexdigest()[:6]
    return f"{widest.removesuffix('f')}_{digest}_{install}"


def has_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX): there oneDNN's
    bfloat16 products run ~2x float32's; elsewhere they are emulated and far slower."""
    flags = cpu_flags()
    return "avx512_bf16" in flags or "amx_bf16" in flags


def disabled() -> bool:
    return os.environ.get("ENGINEHOUSE_CPU_KERNELS", "1").lower() in ("0", "false", "no", "off")


def _build_dir(name: str) -> Path:
    # torch's own rule (TORCH_EXTENSIONS_DIR, else ~/.cache/torch_extensions/py311_cpu/...).
    from torch.utils.cpp_extension import _get_build_directory

    return Path(_get_build_directory(name, verbose=False))


def build(name: str, source: str, what: str, extra_flags: Sequence[str] = ()) -> bool:
    """Compile `source` (registering torch ops) as `name` for this CPU, or find it built.

    `what` names the kernel in the message shown before a build. `extra_flags` follow `FLAGS`
    (tests build an AVX2 variant with `-mno-avx512f`; they are part of the name). False where
    it cannot be built (no compiler, no ninja): callers then keep their torch-ops path.
    """
    if disabled():
        return False
    full_name = f"{name}_{isa_tag()}"
    if extra_flags:
        full_name += "_" + hashlib.sha1(" ".join(extra_flags).encode()).hexdigest()[:6]
    if not any(_build_dir(full_name).glob("*.so")):
        log.warning(
            "building the %s for this CPU (%s): once, about a minute on 2 cores; "
            "`enginehouse pytorch build-kernels` builds it ahead",
            what,
            full_name,
        )
    try:
        from torch.utils.cpp_extension import load_inline

        load_inline(
            name=full_name,
            cpp_sources=[source],
            extra_cflags=[*FLAGS, *extra_flags],
            extra_ldflags=["-fopenmp"],
            is_python_module=False,
            verbose=False,
        )
        return True
    except Exception as e:  # no compiler, no ninja, an unusual CPU: the torch path still works
        log.warning("the %s could not be built (%s); using torch ops", what, e)
        return False
