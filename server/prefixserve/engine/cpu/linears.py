"""Which modules of a loaded model become CPU kernels: fused projections first, then every other linear layer
prepacked, and tanh-GELUs as one fused op (or inside the GEMM before them, in GPT-2's MLP)."""

from __future__ import annotations

import torch
from torch import nn
from transformers.activations import FastGELUActivation, GELUTanh, NewGELUActivation
from transformers.models.gpt2.modeling_gpt2 import GPT2MLP
from transformers.pytorch_utils import Conv1D

from prefixserve.engine.cpu.fused_projections import fuse_projections
from prefixserve.engine.cpu.packed_linear import PackedLinear, TanhGELU

_TANH_GELUS = (NewGELUActivation, FastGELUActivation, GELUTanh)


def pack_linears(model: nn.Module) -> int:
    """Swap every `nn.Linear` and `Conv1D` of `model` for a `PackedLinear`, and Python-level tanh-GELUs for
    the fused kernel (inside the preceding GEMM in GPT-2's MLP, c_fc -> act -> c_proj); return how many
    linear layers were packed. Fused projections (fused_projections.py) go first."""
    swapped = fuse_projections(model)  # before the generic swap below, which would take their nn.Linears
    with torch.no_grad():
        for mlp in [m for m in model.modules() if type(m) is GPT2MLP and type(m.act) in _TANH_GELUS]:
            mlp.c_fc = PackedLinear(mlp.c_fc.weight.t(), mlp.c_fc.bias, "gelu", "tanh")
            mlp.act = nn.Identity()
            swapped += 1
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if type(child) is nn.Linear:
                    replacement: nn.Module = PackedLinear(child.weight, child.bias)
                    swapped += 1
                elif type(child) is Conv1D:  # y = x W + b with W [in, out]
                    replacement = PackedLinear(child.weight.t(), child.bias)
                    swapped += 1
                elif type(child) in _TANH_GELUS:
                    replacement = TanhGELU()
                else:
                    continue
                setattr(parent, name, replacement)
    return swapped
