"""Start-up refuses, with a clear message, what cannot be served exactly; the self-check can fail."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import GPT2Config, LlamaConfig, MistralConfig, T5Config, T5ForConditionalGeneration

from prefixserve.engine.errors import ModelLoadError, UnsupportedModelError
from prefixserve.engine.kv_cache import KVPool
from prefixserve.engine.model_loader import (
    check_servable,
    cpu_has_native_bf16,
    kv_shape_of,
    load_model,
    resolve_device,
)
from prefixserve.engine.self_check import check_prefix_serving


def test_encoder_decoder_is_refused(tmp_path):
    T5ForConditionalGeneration(
        T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2)
    ).save_pretrained(tmp_path / "t5")
    with pytest.raises(UnsupportedModelError, match="encoder-decoder"):
        load_model(str(tmp_path / "t5"), "cpu", "float32", 128)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (
            {"model_type": "nonsense"},
            "cannot load --model {path}: The checkpoint you are trying to load has model type",
        ),
        ({"model_type": "gpt2"}, "cannot load the weights of --model {path}: "),
    ],
)
def test_a_directory_that_does_not_load_is_one_line_saying_what_failed(tmp_path, config, message):
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError) as failure:
        load_model(str(tmp_path), "cpu", "float32", 128)
    text = str(failure.value)
    assert text.startswith(message.format(path=tmp_path)) and "\n" not in text


def test_hybrid_cache_is_refused():
    config = LlamaConfig(num_hidden_layers=2)
    config.layer_types = ["full_attention", "linear_attention"]
    with pytest.raises(UnsupportedModelError, match="hybrid cache"):
        check_servable(config, 1024)


def test_sliding_window_needs_rows_capped_below_it():
    config = MistralConfig(sliding_window=128, max_position_embeddings=4096)
    with pytest.raises(UnsupportedModelError, match="--max-total-tokens 128"):
        check_servable(config, 256)
    assert check_servable(config, 128) == 128


def test_rows_are_capped_at_the_models_positions():
    assert check_servable(GPT2Config(n_positions=256), 2048) == 256


def test_gqa_and_explicit_head_dim_shapes():
    llama = kv_shape_of(
        LlamaConfig(hidden_size=64, num_attention_heads=8, num_key_value_heads=2, num_hidden_layers=3)
    )
    assert (llama.num_layers, llama.num_kv_heads, llama.head_dim) == (3, 2, 8)
    qwen3_like = kv_shape_of(
        LlamaConfig(hidden_size=64, num_attention_heads=8, num_key_value_heads=2, head_dim=32)
    )
    assert qwen3_like.head_dim == 32


def test_cuda_without_a_gpu_is_a_clear_error():
    if torch.cuda.is_available():
        assert resolve_device("cuda").type == "cuda"
    else:
        with pytest.raises(UnsupportedModelError, match="no CUDA device"):
            resolve_device("cuda")


def test_self_check_passes_on_supported_models_and_catches_a_cache_that_drops_the_prefix(
    tiny_model_dirs, monkeypatch
):
    for path in tiny_model_dirs.values():
        assert check_prefix_serving(load_model(str(path), "cpu", "float32", 256)) < 1e-4
        check_prefix_serving(load_model(str(path), "cpu", "bfloat16", 256))  # within bf16's tolerance
    loaded = load_model(str(tiny_model_dirs["llama"]), "cpu", "float32", 256)
    original = KVPool.write_prefix

    def forgetful_write_prefix(self, slots, kv):
        kv = kv.clone()
        kv[:, 1] = 0  # loses the prefix's values, as a cache that mishandles prefixes might
        original(self, slots, kv)

    monkeypatch.setattr(KVPool, "write_prefix", forgetful_write_prefix)
    with pytest.raises(UnsupportedModelError, match="cannot be served exactly"):
        check_prefix_serving(loaded)


def test_bf16_on_a_cpu_without_native_bf16_warns_with_what_to_use(tiny_model_dirs, caplog):
    with caplog.at_level("WARNING", logger="prefixserve.engine.model_loader"):
        load_model(str(tiny_model_dirs["gpt2"]), "cpu", "bfloat16", 256)
        load_model(str(tiny_model_dirs["gpt2"]), "cpu", "float32", 256)
    warned = [r for r in caplog.records if "without native bf16" in r.getMessage()]
    assert len(warned) == (
        0 if cpu_has_native_bf16() else 1
    )  # never for float32; for bf16 where it is emulated
    if warned:
        assert "--dtype float32" in warned[0].getMessage()
