"""Load the frozen base model and refuse, at start-up, any model that cannot be served exactly."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedModel
from transformers import PreTrainedTokenizerBase as Tokenizer
from transformers.utils import logging as hf_logging

from prefixserve.adapters.kv_prefix import KVShape
from prefixserve.demo import DEMO_MODEL_DIR, DEMO_MODEL_NAME
from prefixserve.engine.attention import ATTN_IMPLEMENTATION, register
from prefixserve.engine.cpu.allocator import keep_freed_memory
from prefixserve.engine.cpu.linears import pack_linears
from prefixserve.engine.cpu.packed_linear import packing_available
from prefixserve.engine.errors import ModelLoadError, UnsupportedModelError

log = logging.getLogger(__name__)

_SERVABLE_LAYER_TYPES = {"full_attention", "sliding_attention"}
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: Tokenizer
    name: str
    device: torch.device
    dtype: torch.dtype
    kv_shape: KVShape
    max_length: int  # most positions one row may use (prefix + prompt + generated)
    eos_token_ids: frozenset[int]


def resolve_device(setting: str) -> torch.device:
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if setting == "cuda" and not torch.cuda.is_available():
        raise UnsupportedModelError("--device cuda was asked for, but no CUDA device is available")
    return torch.device(setting)


def cpu_has_native_bf16() -> bool:
    """avx512_bf16 or AMX: bf16 GEMMs run at several times fp32's speed (as vLLM's CPU backend assumes)."""
    amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    bf16 = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    return bool(amx() or bf16())


def resolve_dtype(setting: str, device: torch.device) -> torch.dtype:
    if setting != "auto":
        return _DTYPES[setting]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_native_bf16() else torch.float32


def resolve_model_path(model: str) -> str:
    if model == DEMO_MODEL_NAME:
        log.warning(
            "serving the built-in DEMO model 'tiny' (random weights: its text is gibberish). To serve a real "
            "model, pass --model gpt2 (a Hugging Face hub id) or --model /path/to/a/local/model/directory."
        )
        return str(DEMO_MODEL_DIR)
    return model


def kv_shape_of(config: PretrainedConfig) -> KVShape:
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return KVShape(
        num_layers=config.num_hidden_layers,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        hidden_size=config.hidden_size,
    )


def check_servable(config: PretrainedConfig, max_total_tokens: int) -> int:
    """Raise UnsupportedModelError for what cannot be served exactly; return the usable row length."""
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedModelError(
            f"{config.model_type} is an encoder-decoder model; prefixserve serves decoder-only causal LMs"
        )
    layer_types = set(getattr(config, "layer_types", None) or [])
    unknown = layer_types - _SERVABLE_LAYER_TYPES
    if unknown:
        raise UnsupportedModelError(
            f"{config.model_type} has {sorted(unknown)} layers (a hybrid cache): KV prefixes cannot be served on it exactly"
        )
    max_positions = getattr(config, "max_position_embeddings", None)
    length = min(max_total_tokens, max_positions) if max_positions else max_total_tokens
    if length < max_total_tokens:
        log.info("max_total_tokens capped at %d, the model's max_position_embeddings", length)
    window = getattr(config, "sliding_window", None)
    uses_window = window is not None and (not layer_types or "sliding_attention" in layer_types)
    if uses_window and length > window:
        raise UnsupportedModelError(
            f"{config.model_type} uses sliding-window attention (window {window}), which would cut adapter "
            f"prefixes off in rows longer than the window; cap rows below it with --max-total-tokens {window}"
        )
    return length


def first_line(exc: BaseException) -> str:
    """transformers' loading errors run to several lines; a start-up failure is reported in one."""
    return next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)


def load_model(model: str, device: str, dtype: str, max_total_tokens: int) -> LoadedModel:
    hf_logging.disable_progress_bar()  # a server logs lines, not progress bars
    path = resolve_model_path(model)
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    if dev.type == "cpu" and torch_dtype == torch.bfloat16 and not cpu_has_native_bf16():
        log.warning(
            "--dtype bfloat16 on a CPU without native bf16 (AVX512-BF16 or AMX): its matrix products are "
            "emulated, and a 740-token prefill measured 75x slower than in float32 on such a host. Use "
            "--dtype float32, or --dtype auto, which picks it here"
        )
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load --model {model}: {first_line(exc)}") from exc
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    max_length = check_servable(text_config, max_total_tokens)
    register()
    try:  # loading with SDPA first checks that the architecture supports it: the paged path falls back to it
        hf_model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, attn_implementation="sdpa")
    except OSError as exc:  # no weights, or unreadable ones
        raise ModelLoadError(f"cannot load the weights of --model {model}: {first_line(exc)}") from exc
    except ValueError as exc:
        raise UnsupportedModelError(
            f"{config.model_type} has no SDPA attention in transformers, which prefixserve's paged attention "
            f"builds on: {exc}"
        ) from exc
    hf_model.set_attn_implementation(ATTN_IMPLEMENTATION)
    if hf_model.config._attn_implementation != ATTN_IMPLEMENTATION:
        raise UnsupportedModelError(
            f"{config.model_type} does not route attention through transformers' AttentionInterface, "
            "so its keys/values cannot be kept in prefixserve's paged KV cache"
        )
    hf_model.requires_grad_(False).eval().to(dev)
    if dev.type == "cpu":
        keep_freed_memory()
    if packing_available(dev, torch_dtype):
        log.info("oneDNN prepacked weights for %d linear layers", pack_linears(hf_model))
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load the tokenizer of --model {model}: {first_line(exc)}") from exc
    eos = set()
    for source in (getattr(hf_model, "generation_config", None), tokenizer):
        value = getattr(source, "eos_token_id", None)
        eos.update(value if isinstance(value, list) else [value] if value is not None else [])
    name = (
        DEMO_MODEL_NAME if model == DEMO_MODEL_NAME else Path(model).name if Path(model).is_dir() else model
    )
    log.info("loaded %s on %s as %s", model, dev, torch_dtype)
    return LoadedModel(
        model=hf_model,
        tokenizer=tokenizer,
        name=name,
        device=dev,
        dtype=torch_dtype,
        kv_shape=kv_shape_of(text_config),
        max_length=max_length,
        eos_token_ids=frozenset(eos),
    )
