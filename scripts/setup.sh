#!/usr/bin/env bash
# Set up a development environment in .venv: CPU torch, the core, every plugin, test tools.
# Safe to run again; it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)

# Torch first, as a CPU build: a bare `torch` requirement pulls a multi-GB CUDA build on Linux.
# TORCH_SPEC picks another (e.g. TORCH_SPEC="torch==2.11.0"); the CPU index is the fallback.
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  "${PIP[@]}" "${TORCH_SPEC:-torch==2.13.0}" \
    || "${PIP[@]}" torch --index-url https://download.pytorch.org/whl/cpu
fi

# The core with its extras, resolved against the workspace's own plugin packages (the tests
# install their example third-party plugin, tests/third_party_plugin, for themselves). The tensorrt
# plugin brings onnx and onnxruntime (its `onnxruntime` backend runs anywhere); TensorRT itself
# is only in the `tensorrt` extra, not in `all`: its wheels download from NVIDIA's own host,
# which CI and most machines cannot reach. On a GPU machine that can: pip install -e '.[tensorrt]'
"${PIP[@]}" -e ".[all,test,bench]" \
  -e plugins/pytorch_backend -e plugins/tensorrt_backend -e plugins/vision

# The native backend's C++ CPU kernels (decode attention, quantized matmul; on an AVX-512 CPU
# also the quantized kernel's AVX2 path, which the tests check), built now for this CPU rather
# than on first use (about a minute each on 2 cores). Without a compiler: the torch-ops path.
.venv/bin/enginehouse pytorch build-kernels \
  || echo "note: the CPU kernels could not be built; the native backend uses torch ops" >&2
