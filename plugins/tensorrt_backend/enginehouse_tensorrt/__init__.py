"""enginehouse-tensorrt: compiled backends (TensorRT, and ONNX Runtime on the same graph).

A skeleton for now: its probes say honestly that neither backend is implemented yet.
"""

__version__ = "0.1.0"
