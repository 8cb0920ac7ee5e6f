"""The CPU linears: oneDNN-prepacked GEMMs, the fused q/k/v GEMM and the epilogue-fused SwiGLU MLP compute what
the model's own modules compute (fp32, to rounding), and a fused projection asked for out of order still answers
right."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from prefixserve.engine.cpu.fused_projections import ProjectionView, SiluGatedMLP, fuse_projections
from prefixserve.engine.cpu.linears import pack_linears
from prefixserve.engine.cpu.packed_linear import packing_available
from tests.tiny_models import tiny_config

pytestmark = pytest.mark.skipif(
    not packing_available(torch.device("cpu"), torch.float32), reason="this torch has no oneDNN linears"
)


@pytest.mark.parametrize("arch", ["gpt2", "llama", "qwen2", "mistral"])
def test_packed_and_fused_model_gives_the_same_logits(arch):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(arch)).eval()
    ids = torch.randint(0, 900, (2, 7))
    with torch.inference_mode():
        expected = model(input_ids=ids).logits
        pack_linears(model)
        got = model(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    views = [m for m in model.modules() if isinstance(m, ProjectionView)]
    assert len(views) == (0 if arch == "gpt2" else 2 * 3)  # two layers of q/k/v
    mlps = [m for m in model.modules() if isinstance(m, SiluGatedMLP)]
    assert len(mlps) == (0 if arch == "gpt2" else 2)


def test_a_fused_projection_called_out_of_order_or_on_another_input_recomputes():
    torch.manual_seed(0)
    parent = torch.nn.Module()
    parent.q_proj, parent.k_proj, parent.v_proj = (
        torch.nn.Linear(8, n, bias=b) for n, b in ((8, True), (4, False), (4, True))
    )
    reference = {name: getattr(parent, name) for name in ("q_proj", "k_proj", "v_proj")}
    assert fuse_projections(parent) == 3  # linear layers replaced
    x, y = torch.randn(3, 8), torch.randn(3, 8)
    with torch.inference_mode():
        checks = [("v_proj", x), ("q_proj", x), ("q_proj", x), ("k_proj", y), ("v_proj", y), ("k_proj", x)]
        for name, inp in checks:
            torch.testing.assert_close(getattr(parent, name)(inp), reference[name](inp), rtol=1e-6, atol=1e-6)
