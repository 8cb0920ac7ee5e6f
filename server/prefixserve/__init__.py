"""prefixserve: a server for prefix-tuned language models."""

__version__ = "0.1.0"
