"""The short step forward (engine/cpu/step_forward.py) gives the logits the model's own forward gives, on the
same step, for every architecture it serves: prefill, decode, mixed steps, prompt scoring, the base model."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import arch_params
from tests.engine_harness import make_engine, run_until_idle, submit_ids


@pytest.mark.parametrize("arch", arch_params())
def test_the_short_forward_gives_the_models_own_logits(
    arch, tiny_model_dirs, adapter_dirs, tmp_path, monkeypatch
):
    engine = make_engine(tiny_model_dirs[arch], tmp_path / "store", adapter_dirs[arch], attention="native")
    runner = engine.runner
    assert runner.step_forward is not None, arch
    compared = []

    def both(step):  # each step run twice, short and full; the pool's writes are the same values twice
        batch = runner.prepare(step)
        short = runner.execute(batch)
        kept, runner.step_forward = runner.step_forward, None
        try:
            full = runner.execute(batch)
        finally:
            runner.step_forward = kept
        torch.testing.assert_close(short.sampling, full.sampling, rtol=0, atol=1e-5)
        for a, b in zip(short.prompt, full.prompt, strict=True):
            torch.testing.assert_close(a.logits, b.logits, rtol=0, atol=1e-5)
        compared.append(batch.input_ids.numel())
        return short

    monkeypatch.setattr(runner, "run", both)
    submit_ids(engine, list(range(3, 40)), "rand8", max_new_tokens=5)
    submit_ids(engine, list(range(50, 60)), None, max_new_tokens=5)
    run_until_idle(engine)  # a prefill step, then decode steps
    submit_ids(engine, list(range(70, 90)), "trained6", max_new_tokens=3, prompt_logprobs=2)
    submit_ids(engine, list(range(5, 9)), "rand3", max_new_tokens=4)
    run_until_idle(engine)
    assert len(compared) >= 8 and max(compared) > 2 and min(compared) <= 2, compared


def test_the_portable_backend_runs_the_models_own_forward(tiny_model_dirs, adapter_dirs, tmp_path):
    engine = make_engine(
        tiny_model_dirs["llama"], tmp_path / "store", adapter_dirs["llama"], attention="portable"
    )
    assert engine.runner.step_forward is None
