#!/usr/bin/env bash
# Run benchmarks/gpu_check.py on a GPU machine whose Python already has torch (CUDA),
# transformers, tokenizers and triton; no network is needed. From the repository root:
#
#   bash benchmarks/gpu_check.sh                       # everything, about 5 minutes on an H100
#   bash benchmarks/gpu_check.sh --skip-timing         # correctness only
#   bash benchmarks/gpu_check.sh --only kernels,logits --budget 200
#   bash benchmarks/gpu_check.sh --only speculative     # verify/fp8 kernels, graphs, tok/s table
#
# Results go to stdout and, when $OUT is set, to $OUT/gpu_check.json and $OUT/gpu_check.md.
# Exit status: 0 all checks passed, 1 some failed, 2 no CUDA device.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

# The repository itself, leaving the installed torch/transformers/triton alone: no dependencies,
# no index, no build isolation (the machine may be offline).
"$PYTHON" -m pip install --quiet --no-deps --no-build-isolation --no-index \
  -e . -e plugins/pytorch_backend -e plugins/vision \
  || echo "gpu_check.sh: pip install -e failed; gpu_check.py falls back to the source tree" >&2

"$PYTHON" - <<'PY'
import importlib.util

need = ("torch", "transformers", "tokenizers", "triton", "safetensors", "pluggy", "pydantic",
        "click", "jinja2", "tqdm", "huggingface_hub", "PIL", "numpy")
missing = [m for m in need if importlib.util.find_spec(m) is None]
print("gpu_check.sh: missing Python packages:", ", ".join(missing) if missing else "none")
PY

export PYTHONPATH="$PWD/core:$PWD/plugins/pytorch_backend:$PWD/plugins/vision${PYTHONPATH:+:$PYTHONPATH}"
exec "$PYTHON" benchmarks/gpu_check.py "$@"
