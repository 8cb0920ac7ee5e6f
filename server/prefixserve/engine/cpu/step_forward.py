"""A step's forward pass in a few ops per layer, for the families whose layers the engine knows: Llama, Qwen2 and
Mistral (one decoder layer, the same bytecode in transformers), and GPT-2.

transformers' forward is general: keyword plumbing, masks, output capture, hooks, views and transposes, some 60-80
torch calls a layer. For these families a step needs about ten: the norms (a native RMSNorm fused with the
residual add before it), the fused q/k/v GEMM, RoPE with the K/V store, the attention backend, o_proj, the MLP
(its GEMMs with their epilogues). The same modules compute, on the same weights, in the same order: the step's
logits are what the model's own forward gives (tests/engine/test_step_forward.py), and the exactness tests run
through here. Measured in one process, alternating (bf16, 16 rows decoding): a 24-layer model of tiny widths,
whose step is nearly all such overhead, 8.4 -> 7.6 ms; the Qwen2.5-0.5B shape 52.2 -> 51.1 ms; GPT-2 22.7 -> 21.4.
What is left of the overhead is mostly inside the ops (oneDNN spends ~20 us a GEMM call on more than the GEMM).

Only the engine's steps come here (ModelRunner, with the native kernels); every other forward pass (an adapter
made from text, the self-check's reference) runs the model's own code.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers.models.gpt2.modeling_gpt2 import GPT2Block, GPT2LMHeadModel
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaForCausalLM
from transformers.models.mistral.modeling_mistral import MistralForCausalLM
from transformers.models.qwen2.modeling_qwen2 import Qwen2ForCausalLM

from prefixserve.engine.attention import AttentionBatch
from prefixserve.engine.cpu.kernels import Kernels
from prefixserve.engine.cpu.native_layers import NativeRMSNorm, RopeStoreAttention

# (token ids [N], positions [N], the step's attention, flat tokens whose logits are read) -> logits [K, vocab]
StepForward = Callable[[torch.Tensor, torch.Tensor, AttentionBatch, torch.Tensor], torch.Tensor]
LLAMA_LIKE = (LlamaForCausalLM, Qwen2ForCausalLM, MistralForCausalLM)


class LlamaStep:
    """embed -> per layer: norm, q/k/v GEMM, RoPE + K/V store, attention, o_proj, add + norm, MLP, add + norm."""

    def __init__(self, model: nn.Module, kernels: Kernels) -> None:
        inner = model.model
        self.embed, self.rotary, self.lm_head = inner.embed_tokens, inner.rotary_emb, model.lm_head
        self.final_norm: NativeRMSNorm = inner.norm
        self.layers: list[tuple[NativeRMSNorm, RopeStoreAttention, NativeRMSNorm, nn.Module]] = [
            (layer.input_layernorm, layer.self_attn, layer.post_attention_layernorm, layer.mlp)
            for layer in inner.layers
        ]
        self._rms_norm: Any = kernels.rms_norm
        self._add_rms_norm: Any = kernels.add_rms_norm

    def __call__(
        self, input_ids: torch.Tensor, positions: torch.Tensor, batch: AttentionBatch, logits_at: torch.Tensor
    ) -> torch.Tensor:
        residual = self.embed(input_ids)  # [N, hidden]
        cos, sin = (t[0] for t in self.rotary(residual[None], positions[None]))  # [N, head_dim]
        first_norm = self.layers[0][0]
        hidden = self._rms_norm(residual, first_norm.inner.weight, first_norm.eps)
        for i, (_, attention, post_norm, mlp) in enumerate(self.layers):
            attended = attention.step(hidden, cos, sin, batch)
            hidden = self._add_rms_norm(attended, residual, post_norm.inner.weight, post_norm.eps)
            mlp_out = mlp(hidden)
            if i + 1 < len(self.layers):
                next_norm = self.layers[i + 1][0]
                hidden = self._add_rms_norm(mlp_out, residual, next_norm.inner.weight, next_norm.eps)
            else:
                residual += mlp_out
        last = residual.index_select(0, logits_at)  # the final norm only where logits are read
        return self.lm_head(self._rms_norm(last, self.final_norm.inner.weight, self.final_norm.eps))


class GPT2Step:
    """wte + wpe -> per block: ln_1, c_attn, K/V store, attention, c_proj, add, ln_2, MLP, add -> ln_f."""

    def __init__(self, model: nn.Module) -> None:
        inner = model.transformer
        self.wte, self.wpe, self.ln_f, self.lm_head = inner.wte, inner.wpe, inner.ln_f, model.lm_head
        self.blocks: list[GPT2Block] = list(inner.h)

    def __call__(
        self, input_ids: torch.Tensor, positions: torch.Tensor, batch: AttentionBatch, logits_at: torch.Tensor
    ) -> torch.Tensor:
        hidden = self.wte(input_ids) + self.wpe(positions)  # [N, hidden]
        pool, backend, metadata = batch.pool, batch.backend, batch.metadata
        tokens, width = hidden.shape
        for i, block in enumerate(self.blocks):
            attention = block.attn
            heads = attention.num_heads
            k_pool, v_pool = pool.keys[i], pool.values[i]
            q, k, v = (
                t.view(tokens, heads, -1) for t in attention.c_attn(block.ln_1(hidden)).split(width, dim=-1)
            )
            backend.store(k.transpose(0, 1), v.transpose(0, 1), k_pool, v_pool, batch.slot_mapping)
            out = torch.empty_like(q)
            backend.forward(
                q.transpose(0, 1), k_pool, v_pool, metadata, attention.scaling, out.transpose(0, 1)
            )
            hidden = attention.c_proj(out.view(tokens, width)) + hidden
            hidden = block.mlp(block.ln_2(hidden)) + hidden
        return self.lm_head(self.ln_f(hidden.index_select(0, logits_at)))


def step_forward_for(model: nn.Module, kernels: Kernels, pool_dtype: torch.dtype) -> StepForward | None:
    """The short forward for `model` (after install_native_layers), or None: its own forward serves."""
    if model.dtype != pool_dtype:  # the native ops read and write one dtype
        return None
    if type(model) in LLAMA_LIKE and _is_llama_like(model):
        return LlamaStep(model, kernels)
    if type(model) is GPT2LMHeadModel and _is_plain_gpt2(model):
        return GPT2Step(model)
    return None


def _is_llama_like(model: nn.Module) -> bool:
    """Every layer is Llama's decoder layer over the native norms and attention (which RoPE over whole heads)."""
    llama = LlamaDecoderLayer.forward.__code__
    for layer in model.model.layers:
        code = type(layer).forward.__code__
        if (code.co_code, code.co_names) != (llama.co_code, llama.co_names):
            return False
        norms = (layer.input_layernorm, layer.post_attention_layernorm)
        if (
            not all(type(n) is NativeRMSNorm for n in norms)
            or type(layer.self_attn) is not RopeStoreAttention
        ):
            return False
    head_dim = model.model.layers[0].self_attn.inner.head_dim
    probe = torch.zeros(1, 1, model.config.hidden_size, dtype=model.dtype, device=model.device)
    cos, _ = model.model.rotary_emb(probe, torch.zeros(1, 1, dtype=torch.long, device=model.device))
    return type(model.model.norm) is NativeRMSNorm and cos.shape[-1] == head_dim and cos.dtype == model.dtype


def _is_plain_gpt2(model: nn.Module) -> bool:
    """GPT-2 blocks without cross-attention, over the packed linears."""
    return not model.config.add_cross_attention and all(
        type(block) is GPT2Block for block in model.transformer.h
    )
