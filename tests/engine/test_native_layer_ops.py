"""The native layer ops (engine/cpu/csrc/layer_ops.cpp) compute transformers' RMSNorm and rotary embedding, and
the engine swaps them in with the native backend only (engine/cpu/native_layers.py)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

from prefixserve.engine.cpu.kernels import load_kernels
from prefixserve.engine.cpu.linears import pack_linears
from prefixserve.engine.cpu.native_layers import NativeRMSNorm, RopeStoreAttention, install_native_layers
from tests.tiny_models import tiny_config


@pytest.fixture(scope="module")
def kernels():
    built, how = load_kernels()
    assert built is not None, how  # the suite's machines have a compiler: this path must be tested
    return built


@pytest.mark.parametrize("hidden", [32, 896, 37])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_equals_llamas(kernels, hidden, dtype):
    torch.manual_seed(0)
    norm = LlamaRMSNorm(hidden, eps=1e-6).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(hidden))
    x = (torch.randn(5, 3, hidden) * 3).to(dtype)
    with torch.inference_mode():
        got, expected = kernels.rms_norm(x, norm.weight, 1e-6), norm(x)
    if dtype == torch.float32:
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    else:  # the fp32 statistic's summation order may move a value by one bf16 step
        torch.testing.assert_close(got.float(), expected.float(), rtol=8e-3, atol=8e-3)


@pytest.mark.parametrize("hidden", [32, 896, 37])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_add_rms_norm_is_the_residual_add_then_llamas_norm(kernels, hidden, dtype):
    torch.manual_seed(1)
    norm = LlamaRMSNorm(hidden, eps=1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(hidden))
    x, residual = (torch.randn(2, 9, hidden) * 3).to(dtype).unbind(0)
    with torch.inference_mode():
        expected_residual = residual + x
        expected = norm(expected_residual)
        got = kernels.add_rms_norm(x, residual, norm.weight, 1e-5)
    assert torch.equal(residual, expected_residual)  # the sum, rounded to the dtype, as transformers has it
    if dtype == torch.float32:
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    else:  # the fp32 statistic's summation order may move a value by one bf16 step
        torch.testing.assert_close(got.float(), expected.float(), rtol=8e-3, atol=8e-3)


@pytest.mark.parametrize("head_dim", [8, 64, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_store_rotates_q_and_k_and_stores_k_and_v(kernels, head_dim, dtype):
    torch.manual_seed(0)
    tokens, q_heads, kv_heads, slots = 6, 4, 2, 40
    qkv = torch.randn(tokens, (q_heads + 2 * kv_heads) * head_dim).to(dtype)
    angles = torch.rand(tokens, head_dim // 2) * 10
    emb = torch.cat([angles, angles], dim=-1)
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
    k_pool = torch.zeros(kv_heads, slots, head_dim, dtype=dtype)
    v_pool = torch.zeros_like(k_pool)
    where = torch.tensor([3, 17, 0, 39, 8, 9])
    q = kernels.rope_store(qkv, cos, sin, k_pool, v_pool, where, q_heads)

    q_ref, k_ref, v_ref = qkv.split([q_heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    q_ref = q_ref.view(1, tokens, q_heads, head_dim).transpose(1, 2)
    k_ref = k_ref.view(1, tokens, kv_heads, head_dim).transpose(1, 2)
    q_ref, k_ref = apply_rotary_pos_emb(q_ref, k_ref, cos[None], sin[None])
    tol = {"rtol": 1e-6, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    torch.testing.assert_close(q.float(), q_ref[0].transpose(0, 1).float(), **tol)
    torch.testing.assert_close(k_pool[:, where].float(), k_ref[0].float(), **tol)
    assert torch.equal(v_pool[:, where], v_ref.view(tokens, kv_heads, head_dim).transpose(0, 1))
    untouched = torch.ones(slots, dtype=torch.bool)
    untouched[where] = False
    assert not k_pool[:, untouched].any() and not v_pool[:, untouched].any()


def test_rope_store_refuses_a_slot_outside_the_pool(kernels):
    qkv, cos = torch.randn(1, 3 * 8), torch.ones(1, 8)
    pool = torch.zeros(1, 4, 8)
    with pytest.raises(RuntimeError, match="slot 4 is outside the pool"):
        kernels.rope_store(qkv, cos, cos, pool, pool.clone(), torch.tensor([4]), 1)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_install_swaps_every_norm_and_attention_and_keeps_the_logits(kernels, arch):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(arch)).eval()
    ids = torch.randint(0, 900, (1, 7))
    with torch.inference_mode():
        pack_linears(model)
        expected = model(input_ids=ids).logits
        swapped = install_native_layers(model, kernels)
        assert swapped == 2 * 2 + 1 + 2  # the norms of 2 layers, the final norm, 2 attention modules
        got = model(input_ids=ids).logits  # no step batch: the original attention, the native norm
    assert sum(isinstance(m, NativeRMSNorm) for m in model.modules()) == 5
    assert sum(isinstance(m, RopeStoreAttention) for m in model.modules()) == 2
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_gpt2_has_nothing_to_swap(kernels):
    model = AutoModelForCausalLM.from_config(tiny_config("gpt2")).eval()
    pack_linears(model)
    assert install_native_layers(model, kernels) == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_store_kv_writes_strided_keys_and_values_to_their_slots(kernels, dtype):
    """key/value as attention modules hold them ([kv_heads, tokens, d] seen as [tokens, kv_heads, d]); every
    other slot of the pool left as it was."""
    torch.manual_seed(0)
    key, value = torch.randn(2, 3, 5, 16).to(dtype).unbind(0)  # 3 kv heads, 5 tokens
    k_pool, v_pool = torch.zeros(3, 40, 16, dtype=dtype), torch.zeros(3, 40, 16, dtype=dtype)
    where = torch.tensor([7, 0, 39, 12, 13])
    kernels.store_kv(key.transpose(0, 1), value.transpose(0, 1), k_pool, v_pool, where)
    assert torch.equal(k_pool[:, where], key) and torch.equal(v_pool[:, where], value)
    untouched = torch.ones(40, dtype=torch.bool)
    untouched[where] = False
    assert not k_pool[:, untouched].any() and not v_pool[:, untouched].any()
    with pytest.raises(RuntimeError, match="slot 40 is outside the pool"):
        kernels.store_kv(key.transpose(0, 1), value.transpose(0, 1), k_pool, v_pool, where + 1)
