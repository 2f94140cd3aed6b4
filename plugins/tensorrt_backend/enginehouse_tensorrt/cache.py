"""Where exported graphs and built engines live on disk, and the keys that name them.

    $ENGINEHOUSE_CACHE (default ~/.cache/enginehouse)/
      onnx/<model key>/model.onnx, graph.json     one export per model and dtype
      tensorrt/<model key>/<gpu>-sm<cc>-trt<version>-<hash>.engine

The model key hashes what identifies a checkpoint cheaply (config.json, the weight files'
names, sizes and modification times), the dtype and the graph version, so a probe can find a
cached engine without reading weights. The engine's own hash covers the ONNX file's bytes and
the optimisation profiles; its name starts with the GPU and TensorRT version, so a probe can
tell whether an engine exists for *this* GPU by listing the folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from enginehouse.plugin_api import ModelSpec

from .export import GRAPH_VERSION, export_onnx


def cache_root() -> Path:
    root = os.environ.get("ENGINEHOUSE_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "enginehouse"


def model_key(spec: ModelSpec, dtype: str) -> str:
    h = hashlib.sha256()
    h.update(json.dumps(dict(spec.config), sort_keys=True, default=str).encode())
    for name in sorted(spec.weight_files):
        stat = (spec.path / name).stat()
        h.update(f"{name}:{stat.st_size}:{stat.st_mtime_ns};".encode())
    h.update(f"{dtype}:{GRAPH_VERSION}".encode())
    return h.hexdigest()[:20]


def onnx_dir(spec: ModelSpec, dtype: str) -> Path:
    return cache_root() / "onnx" / model_key(spec, dtype)


def engine_dir(spec: ModelSpec, dtype: str) -> Path:
    return cache_root() / "tensorrt" / model_key(spec, dtype)


def ensure_onnx(spec: ModelSpec, dtype: str, progress: bool = False) -> Path:
    """The folder of this model's exported graph, exporting it first if it is not cached.

    The export goes to a temporary folder renamed into place, so a crash or a second process
    never leaves a half-written graph where a reader would take it as complete."""
    folder = onnx_dir(spec, dtype)
    if (folder / "graph.json").exists():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".export-"))
    try:
        export_onnx(spec, tmp, dtype, progress)
        try:
            tmp.rename(folder)
        except OSError:  # another process finished the same export first
            if not (folder / "graph.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def file_sha256(*paths: Path) -> str:
    h = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def gpu_tag(gpu_name: str, capability: tuple[int, int], trt_version: str) -> str:
    """'nvidia-h100-80gb-hbm3-sm90-trt11.4.0': the engine file prefix for one GPU and version."""
    slug = re.sub(r"[^a-z0-9]+", "-", gpu_name.lower()).strip("-")
    return f"{slug}-sm{capability[0]}{capability[1]}-trt{trt_version}"
