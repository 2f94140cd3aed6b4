"""enginehouse-pytorch: the native `pytorch` backend (our decoder over a paged KV cache) and the
`transformers` fallback (any AutoModelForCausalLM), plus `enginehouse pytorch build-kernels`."""

__version__ = "0.1.0"
