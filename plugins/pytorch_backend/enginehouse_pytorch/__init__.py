"""enginehouse-pytorch: PyTorch backends for enginehouse (the transformers runner for now)."""

__version__ = "0.1.0"
