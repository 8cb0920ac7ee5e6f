"""Unit tests: the pure parts, each on its own, in this process: the scheduler and the KV block bookkeeping,
token choice, reading and validating adapter files, the adapter stores and the registry, logs, API keys and
metrics collectors. No model forward pass (at most the demo tokenizer, or the tiny models' PEFT files as
input), no server. Quick: a new test here should take well under a second.

Fixtures: none of this layer's own; tiny_model_dirs, s3_server and s3_bucket come from tests/conftest.py.
The store tests' `s3` parameter (test_store_registry.py) needs SeaweedFS: it is marked `external` and `slow`
(it runs in the full suite, not in the quick run).
"""
