"""enginehouse-vision: vision-language models. A skeleton: it recognises VLMs, runs none yet."""

__version__ = "0.1.0"
