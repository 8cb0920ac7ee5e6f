"""Training tests: `prefixserve train` (prefixserve.training) on the demo model: losses fall, the adapters it
writes are PEFT's format and are served like PEFT serves them, every init mode and method, and each known
failure's message; the upload to a running server.

Fixtures: none of this layer's own (test_training.py's `trained` adapter, 300 steps, is its module's).
Every test that runs more than a few training steps is marked `slow`.
"""
