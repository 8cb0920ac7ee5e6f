"""Llama-class layers on the native layer ops (csrc/layer_ops.cpp), where the engine runs the native backend.

- RMSNorm (Llama's forward, which transformers copies into Qwen2, Mistral and others: same bytecode): one op
  instead of eight (cast, pow, mean, add, rsqrt, mul, cast, mul).
- Attention of Llama, Qwen2 and Mistral, once its q/k/v run as one fused GEMM (fused_projections.py): the
  rotary embedding of q and k and the store of k and v into the KV pool are one op over the GEMM's output,
  instead of transformers' chain (views, transposes, rotate_half's slices, cat and negation, four products,
  two sums, then two pool writes); the step's attention backend then attends as before.

A forward pass without a step batch (an adapter made from text, the self-check's reference) runs the
original attention module; the norm is the same formula either way. The portable backend
(--attention-backend portable) swaps nothing: it is plain PyTorch throughout.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRMSNorm
from transformers.models.mistral.modeling_mistral import MistralAttention
from transformers.models.qwen2.modeling_qwen2 import Qwen2Attention

from prefixserve.engine.attention import BATCH_KWARG, AttentionBatch
from prefixserve.engine.cpu.fused_projections import FusedProjections, ProjectionView
from prefixserve.engine.cpu.kernels import Kernels

# Their forward: q/k/v projections, rotate_half RoPE from position_embeddings, the attention interface, o_proj.
ROTARY_ATTENTIONS = (LlamaAttention, Qwen2Attention, MistralAttention)


class NativeRMSNorm(nn.Module):
    def __init__(self, norm: nn.Module, kernels: Kernels) -> None:
        super().__init__()
        self.inner = norm
        self.eps = float(norm.variance_epsilon)
        self._op: Any = kernels.rms_norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.inner.weight
        if x.dtype != weight.dtype or not x.is_contiguous() or torch.is_grad_enabled():
            return self.inner(x)  # not the engine's own activations: transformers' ops
        return self._op(x, weight, self.eps)


class RopeStoreAttention(nn.Module):
    """Wraps a rotary attention module whose q/k/v are views of one fused GEMM."""

    def __init__(self, attention: nn.Module, fused: FusedProjections, kernels: Kernels) -> None:
        super().__init__()
        self.inner = attention
        self.fused = fused
        self.q_heads = attention.config.num_attention_heads
        self._op: Any = kernels.rope_store

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        *args: Any,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, None]:
        batch = kwargs.get(BATCH_KWARG)
        if not isinstance(batch, AttentionBatch) or hidden_states.shape[0] != 1:
            return self.inner(hidden_states, position_embeddings, attention_mask, *args, **kwargs)
        pool_dtype = batch.pool.dtype
        cos, sin = position_embeddings
        partial_rotary = cos.shape[-1] != batch.pool.shape.head_dim  # not rotate_half over the whole head
        if (
            pool_dtype != hidden_states.dtype
            or cos.dtype != pool_dtype
            or partial_rotary
            or torch.is_grad_enabled()
        ):
            return self.inner(hidden_states, position_embeddings, attention_mask, *args, **kwargs)
        return self.step(hidden_states[0], cos[0], sin[0], batch)[None], None

    def step(
        self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, batch: AttentionBatch
    ) -> torch.Tensor:
        """[tokens, hidden] -> o_proj's output [tokens, hidden]: the fused q/k/v GEMM, RoPE of q and k with k and
        v stored in the layer's pools (cos, sin: [tokens, head_dim]), the step's attention backend, o_proj."""
        layer = self.inner.layer_idx
        k_pool, v_pool = batch.pool.keys[layer], batch.pool.values[layer]
        qkv = self.fused.gemm(hidden)  # [tokens, (q_heads + 2 kv_heads) * head_dim]
        q = self._op(qkv, cos, sin, k_pool, v_pool, batch.slot_mapping, self.q_heads)
        out = torch.empty_like(q)  # [tokens, q_heads, head_dim]: o_proj reads it without a copy
        batch.backend.forward(
            q.transpose(0, 1), k_pool, v_pool, batch.metadata, self.inner.scaling, out.transpose(0, 1)
        )
        return self.inner.o_proj(out.view(hidden.shape[0], -1))


def _is_llama_rms_norm(module: nn.Module) -> bool:
    forward = getattr(type(module), "forward", None)
    code, llama = getattr(forward, "__code__", None), LlamaRMSNorm.forward.__code__
    return (
        code is not None
        and (code.co_code, code.co_names) == (llama.co_code, llama.co_names)
        and isinstance(getattr(module, "weight", None), torch.Tensor)
        and module.weight.dim() == 1
    )


def _fused_qkv(attention: nn.Module) -> FusedProjections | None:
    views = [getattr(attention, name, None) for name in ("q_proj", "k_proj", "v_proj")]
    if not all(isinstance(v, ProjectionView) for v in views):
        return None
    fused = views[0].fused
    if any(v.fused is not fused or v.index != i for i, v in enumerate(views)):
        return None
    return fused


def install_native_layers(model: nn.Module, kernels: Kernels) -> int:
    """Swap the model's Llama-class norms and rotary attention modules for the native ones; how many."""
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            replacement: nn.Module | None = None
            if _is_llama_rms_norm(child):
                replacement = NativeRMSNorm(child, kernels)
            elif type(child) in ROTARY_ATTENTIONS and (fused := _fused_qkv(child)) is not None:
                replacement = RopeStoreAttention(child, fused, kernels)
            if replacement is not None:
                setattr(parent, name, replacement)
                swapped += 1
    return swapped
