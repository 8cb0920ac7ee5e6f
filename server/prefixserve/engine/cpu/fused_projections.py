"""Fewer passes over a layer's activations: one GEMM for q/k/v, and a SwiGLU MLP without elementwise ops.

Llama-class attention computes `q_proj(x)`, `k_proj(x)`, `v_proj(x)`: their weights are concatenated once at
load and run as one prepacked GEMM, and each projection module is replaced by a view of its output, so every
family's own attention code (RoPE, norms) stays as transformers wrote it. In a decode step the weights are
read in one product instead of three, and k/v's narrow ones (GQA: 128 output features on a Qwen2.5-0.5B) stop
being calls of their own.

A SwiGLU MLP, `down(silu(gate(x)) * up(x))`, runs SiLU in the gate GEMM's epilogue and the product in the up
GEMM's: no [tokens, intermediate] tensor is written and read back by an elementwise op. Fusing gate and up
into one GEMM instead, as q/k/v, measured worse: SiLU and the product on its two strided halves took as long
as the GEMM itself in a 2,048-token bf16 prefill (Qwen2.5-0.5B shape: 55 + 30 + 28 ms a layer).
"""

from __future__ import annotations

import threading

import torch
from torch import nn
from transformers.activations import SiLUActivation
from transformers.models.llama.modeling_llama import LlamaMLP

from prefixserve.engine.cpu.packed_linear import PackedLinear

# Sibling projections that read the same input, in the order the families' forward code calls them.
FUSABLE_GROUPS = (("q_proj", "k_proj", "v_proj"),)


class FusedProjections:
    """The fused GEMM of one group, and its latest output: a projection asked for its part of the same input
    tensor gets a view of that output; any other input (or a part already taken) runs the GEMM again, so a
    caller that uses the projections some other way still gets the right values. The latest output is kept
    per thread: the engine's steps and a helper thread's forward pass (an adapter made from text) may share
    the model."""

    def __init__(self, linears: list[nn.Linear]) -> None:
        weight = torch.cat([linear.weight for linear in linears])
        biases = [linear.bias for linear in linears]
        bias = None
        if any(b is not None for b in biases):
            bias = torch.cat(
                [
                    b if b is not None else weight.new_zeros(lin.out_features)
                    for b, lin in zip(biases, linears, strict=True)
                ]
            )
        self.gemm = PackedLinear(weight, bias)
        self.sizes = [linear.out_features for linear in linears]
        self._latest = threading.local()  # .input, .parts

    def part(self, index: int, x: torch.Tensor) -> torch.Tensor:
        latest = self._latest
        parts: list[torch.Tensor | None] | None = getattr(latest, "parts", None)
        if parts is None or x is not latest.input or parts[index] is None:
            latest.input = x
            latest.parts = parts = list(self.gemm(x).split(self.sizes, dim=-1))
        part = parts[index]
        parts[index] = None
        if all(p is None for p in parts):  # every part handed out: hold nothing between layers
            latest.input = latest.parts = None
        assert part is not None
        return part


class ProjectionView(nn.Module):
    """Stands where one of the group's `nn.Linear`s was; returns its slice of the fused product."""

    def __init__(self, fused: FusedProjections, index: int, in_features: int, out_features: int) -> None:
        super().__init__()
        self.fused = fused
        self.index = index
        self.in_features = in_features
        self.out_features = out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fused.part(self.index, x)

    def extra_repr(self) -> str:
        return f"part {self.index} of a fused GEMM, in={self.in_features}, out={self.out_features}"


class SiluGatedMLP(nn.Module):
    """down(silu(gate(x)) * up(x)), each GEMM prepacked, SiLU and the product in the epilogues."""

    def __init__(self, gate: nn.Linear, up: nn.Linear, down: nn.Linear) -> None:
        super().__init__()
        self.gate = PackedLinear(gate.weight, gate.bias, "swish")
        self.up = PackedLinear(up.weight, up.bias)
        self.down = PackedLinear(down.weight, down.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.up.times(x, self.gate(x)))


def _is_silu_gated_mlp(module: nn.Module) -> bool:
    """An MLP whose forward is Llama's (transformers copies it into Qwen2, Mistral and others: same bytecode)
    with SiLU as its activation."""
    forward = getattr(type(module), "forward", None)
    code, llama = getattr(forward, "__code__", None), LlamaMLP.forward.__code__
    return (
        code is not None
        and (code.co_code, code.co_names) == (llama.co_code, llama.co_names)
        and type(getattr(module, "act_fn", None)) in (SiLUActivation, nn.SiLU)
        and all(
            type(getattr(module, name, None)) is nn.Linear for name in ("gate_proj", "up_proj", "down_proj")
        )
    )


def fuse_projections(model: nn.Module) -> int:
    """Replace each group of sibling `nn.Linear`s that `FUSABLE_GROUPS` names (same input size) by views of one
    fused, prepacked GEMM, and each SiLU-gated MLP by `SiluGatedMLP`; return how many `nn.Linear`s it replaced."""
    fused = 0
    with torch.no_grad():
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if _is_silu_gated_mlp(child):
                    setattr(parent, name, SiluGatedMLP(child.gate_proj, child.up_proj, child.down_proj))
                    fused += 3
            for names in FUSABLE_GROUPS:
                linears = [getattr(parent, name, None) for name in names]
                if not all(type(linear) is nn.Linear for linear in linears):
                    continue
                if len({linear.in_features for linear in linears}) != 1:
                    continue
                group = FusedProjections(linears)
                for index, (name, linear) in enumerate(zip(names, linears, strict=True)):
                    view = ProjectionView(group, index, linear.in_features, linear.out_features)
                    setattr(parent, name, view)
                fused += len(names)
    return fused
