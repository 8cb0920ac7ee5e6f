"""Engine tests: the engine (tests/engine_harness.py drives it step by step, no thread, no HTTP) and the
model loader, in this process, against the oracle, PEFT's forward pass, on tiny local models of every
architecture (tests/tiny_models.py) and the demo model; and what upstream (transformers, PEFT) does that the
engine depends on. A test that needs HTTP goes in api/; one that trains, in training/.

Fixtures: cascaded_groups and causal_chunks (below); tiny_model_dirs and adapter_dirs come from tests/conftest.py.
Mark `slow` what takes more than about 5 s (a server process, for instance): the quick run leaves it out.
A check repeated on every architecture takes them from arch_params() (tests/conftest.py): the quick run
runs the first, the full run all of them.
"""

import pytest

from prefixserve.engine.attention import portable
from prefixserve.engine.attention.causal_chunk import CausalChunk


@pytest.fixture
def cascaded_groups(monkeypatch) -> list:
    """The cascade path (a shared prefix attended once for several rows) for the tiny adapters too (its
    threshold lowered to 1): every cascade group the model runner builds is recorded in the list returned."""
    monkeypatch.setattr(portable, "CASCADE_MIN_PREFIX", 1)
    cascaded: list = []
    original = portable.group_rows

    def spy(layout, rows, pool):
        groups = original(layout, rows, pool)
        cascaded.extend(g for g in groups if isinstance(g, portable.RowGroup) and g.prefix_index is not None)
        return groups

    monkeypatch.setattr(portable, "group_rows", spy)
    return cascaded


@pytest.fixture
def causal_chunks(monkeypatch) -> list:
    """Long prompt chunks' two-part path (attention/causal_chunk.py) for the tiny prompts too (its threshold
    lowered to 2 tokens): every such chunk the model runner builds is recorded in the list returned."""
    monkeypatch.setattr(portable, "LONG_CHUNK", 2)
    chunks: list = []
    original = portable.group_rows

    def spy(layout, rows, pool):
        groups = original(layout, rows, pool)
        chunks.extend(g for g in groups if isinstance(g, CausalChunk))
        return groups

    monkeypatch.setattr(portable, "group_rows", spy)
    return chunks
