"""The HTTP API (FastAPI). Knows nothing of tensors: it speaks to the engine and the adapter registry."""
