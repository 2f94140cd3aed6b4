"""enginehouse-tensorrt: compiled backends over one ONNX export of the native model.

- `export.py` / `graph.py`: the native model's weights under an ONNX-exportable forward, in the
  standard decoder interface (KV cache as inputs and outputs); `enginehouse tensorrt export`.
- `runner.py`: one runner for both backends (contiguous per-sequence KV, decodes batched,
  prefills one at a time); `ort_runner.py` (`onnxruntime`) and `trt_runner.py` (`tensorrt`,
  engine built with optimisation profiles and cached on disk) open the graph.
- `probe.py`: what each backend needs, and what is missing where it is not supported.

See docs/tensorrt.md.
"""

__version__ = "0.1.0"
