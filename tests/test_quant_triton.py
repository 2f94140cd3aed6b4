"""The Triton kernel of quantized projections (w4a16 / w8a16 / FP8 weights), run by Triton's
interpreter on the CPU against a float32 reference (`quant.checks.triton_case`).

As in test_triton_kernels.py, TRITON_INTERPRET must be set before triton is imported, so the
cases run in a subprocess (this file as a script prints one JSON list). Cases: 8-bit, 4-bit and
FP8 codes; zero points, act order and bias; one row (decode) and rows past a tile; float32,
float16 and bfloat16 activations. The GPU run is benchmarks/gpu_check.py (section quant).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

CASES = {
    "u8-channel-f32": dict(kind="u8", n=40, k=64, m=3, group=64),
    "u4-asym-perm-bias-f32": dict(
        kind="u4", n=48, k=96, m=5, group=32, asym=True, perm=True, bias=True
    ),
    "f8-blocks-rows-past-a-tile-f32": dict(kind="f8", n=33, k=128, m=17, group=128),
    "u4-decode-f16": dict(kind="u4", n=64, k=64, m=1, group=32, bias=True, dtype="float16"),
    "u8-asym-bf16": dict(kind="u8", n=64, k=64, m=20, group=32, asym=True, dtype="bfloat16"),
}

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None,
    reason="triton is not installed (pip install triton; Linux x86_64)",
)


@pytest.fixture(scope="module")
def results() -> dict[str, dict]:
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run(
        [sys.executable, __file__], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, f"interpreter cases crashed:\n{proc.stdout}\n{proc.stderr}"
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert lines, f"no results printed:\n{proc.stdout}\n{proc.stderr}"
    return json.loads(lines[-1])


@pytest.mark.parametrize("name", list(CASES))
def test_triton_qlinear_matches_float_reference(results, name):
    r = results[name]
    assert "error" not in r, r.get("error")
    assert r["shape_ok"] and r["dtype_ok"]
    assert r["err"] <= r["tolerance"], r


def _main() -> None:
    sys.path.insert(0, os.path.dirname(__file__))
    from test_triton_kernels import _patch_interpreter  # the interpreter's own gaps

    _patch_interpreter()
    from enginehouse_pytorch.native.quant.checks import triton_case

    out = {}
    for name, case in CASES.items():
        try:
            out[name] = triton_case(**case)
        except Exception as e:  # report which case broke
            out[name] = {"error": repr(e)}
    print(json.dumps(out))


if __name__ == "__main__":
    _main()
