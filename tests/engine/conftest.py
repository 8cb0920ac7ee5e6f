"""Engine tests: the engine (tests/engine_harness.py drives it step by step, no thread, no HTTP) and the
model loader, in this process, against the oracle, PEFT's forward pass, on tiny local models of every
architecture (tests/tiny_models.py) and the demo model; and what upstream (transformers, PEFT) does that the
engine depends on. A test that needs HTTP goes in api/; one that trains, in training/.

Fixtures: none of this layer's own; tiny_model_dirs and adapter_dirs come from tests/conftest.py.
Mark `slow` what takes more than about 5 s (a server process, for instance): the quick run leaves it out.
A check repeated on every architecture takes them from arch_params() (tests/conftest.py): the quick run
runs the first, the full run all of them.
"""
