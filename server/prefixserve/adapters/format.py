"""PEFT's prompt-learning adapter formats: read a `save_pretrained` directory's files and validate them against the base model.

A PEFT `save_pretrained` directory holds `adapter_config.json` and `adapter_model.safetensors` with one
tensor, `prompt_embeddings`, whose meaning depends on `peft_type`:
- prefix kinds (PREFIX_TUNING, CARTRIDGE): [T, L*2*H*D]. Row t viewed as [2L, H, D] holds, for layer l, the
  key (slice 2l) and value (slice 2l+1) of virtual token t. Prefix keys carry no rotary embedding.
- prompt kinds (PROMPT_TUNING, P_TUNING): [T, hidden], the input embeddings of T virtual tokens that PEFT
  puts before the prompt's embeddings. For P-tuning PEFT saves its prompt encoder's *output* (the MLP or
  LSTM is a training device), so both kinds serve the same way: the base model's keys/values for these
  embeddings at positions 0..T-1 become the prefix (engine/virtual_tokens.py computes them).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors

from prefixserve.adapters.errors import AdapterMismatchError, InvalidAdapterError
from prefixserve.adapters.kv_prefix import KVShape

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAMES = ("adapter_model.bin", "adapter_model.pt", "pytorch_model.bin")
TENSOR_NAME = "prompt_embeddings"
PREFIX_PEFT_TYPES = ("PREFIX_TUNING", "CARTRIDGE")  # keys/values per layer
PROMPT_PEFT_TYPES = ("PROMPT_TUNING", "P_TUNING")  # input embeddings of virtual tokens
SUPPORTED_PEFT_TYPES = PREFIX_PEFT_TYPES + PROMPT_PEFT_TYPES
# How the API and metrics name each kind; `prefixserve train --method` takes the trainable ones.
METHODS = {
    "PREFIX_TUNING": "prefix-tuning",
    "CARTRIDGE": "cartridge",
    "PROMPT_TUNING": "prompt-tuning",
    "P_TUNING": "p-tuning",
}
P_TUNING_ENCODERS = ("MLP", "LSTM")
PROMPT_TUNING_INITS = ("RANDOM", "TEXT", "SAMPLE_VOCAB")
WEIGHT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


@dataclass(frozen=True)
class PeftAdapter:
    """A parsed adapter: its PEFT config and its `prompt_embeddings` (on the CPU; see the module's docstring)."""

    config: dict[str, Any]
    embeddings: torch.Tensor

    @property
    def num_virtual_tokens(self) -> int:
        return int(self.embeddings.shape[0])

    @property
    def peft_type(self) -> str:
        return str(self.config.get("peft_type"))

    @property
    def method(self) -> str:
        return method_of(self.peft_type)

    @property
    def is_prompt(self) -> bool:
        """Virtual-token embeddings (prompt tuning, P-tuning), not keys/values."""
        return self.peft_type in PROMPT_PEFT_TYPES


def method_of(peft_type: str) -> str:
    return METHODS.get(peft_type, peft_type.lower())


def read_adapter_files(files: Mapping[str, bytes]) -> PeftAdapter:
    """Parse the two PEFT files, given by name (basename) → content."""
    names = set(files)
    pickled = sorted(names & set(PICKLE_NAMES))
    if WEIGHTS_NAME not in names and pickled:
        raise InvalidAdapterError(
            f"{pickled[0]} is a pickle file, which this server never loads (unpickling runs arbitrary code): "
            "re-save the adapter with safetensors, e.g. model.save_pretrained(dir, safe_serialization=True)"
        )
    if CONFIG_NAME not in names:
        got = f" (got {', '.join(sorted(names))})" if names else ""
        raise InvalidAdapterError(
            f"missing {CONFIG_NAME}{got}: send both files that PEFT's save_pretrained writes, "
            f"{CONFIG_NAME} and {WEIGHTS_NAME}, or one .zip/.tar.gz holding them"
        )
    if WEIGHTS_NAME not in names:
        raise InvalidAdapterError(f"missing {WEIGHTS_NAME}: send it together with {CONFIG_NAME}")
    config = parse_config(files[CONFIG_NAME])
    embeddings = parse_weights(files[WEIGHTS_NAME])
    return PeftAdapter(config=config, embeddings=embeddings)


def parse_config(raw: bytes) -> dict[str, Any]:
    try:
        config = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidAdapterError(f"{CONFIG_NAME} is not valid JSON: {exc}") from None
    except RecursionError:
        raise InvalidAdapterError(
            f"{CONFIG_NAME} is nested too deeply to read; a PEFT config is a flat JSON object"
        ) from None
    if not isinstance(config, dict):
        raise InvalidAdapterError(f"{CONFIG_NAME} must hold a JSON object")
    peft_type = config.get("peft_type")
    if peft_type not in SUPPORTED_PEFT_TYPES:
        made_with = "PrefixTuningConfig, CartridgeConfig, PromptTuningConfig or PromptEncoderConfig"
        raise InvalidAdapterError(
            f"{CONFIG_NAME}: peft_type is {peft_type!r}; this server serves PEFT's prompt-learning adapters "
            f"with peft_type {', '.join(SUPPORTED_PEFT_TYPES)} (made with PEFT's {made_with})"
        )
    task_type = config.get("task_type")
    if task_type not in ("CAUSAL_LM", None) or (task_type is None and peft_type != "CARTRIDGE"):
        raise InvalidAdapterError(
            f"{CONFIG_NAME}: task_type is {task_type!r}; only CAUSAL_LM adapters can be served "
            "(set task_type=TaskType.CAUSAL_LM when creating the PEFT config)"
        )
    # Prefix kinds describe their K/V layout; prompt kinds need only their width (PEFT fills in the others).
    required = ("num_virtual_tokens", "token_dim")
    if peft_type in PREFIX_PEFT_TYPES:
        required += ("num_layers", "num_attention_heads")
    for key in ("num_virtual_tokens", "num_layers", "num_attention_heads", "token_dim"):
        value = config.get(key)
        if value is None and key not in required:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise InvalidAdapterError(f"{CONFIG_NAME}: {key} must be a positive integer, got {value!r}")
    submodules = config.get("num_transformer_submodules", 1)
    if submodules not in (1, None):
        raise InvalidAdapterError(
            f"{CONFIG_NAME}: num_transformer_submodules is {submodules}; encoder-decoder adapters cannot be served"
        )
    if peft_type == "P_TUNING":
        _check_prompt_encoder(config)
    if peft_type == "PROMPT_TUNING" and config.get("prompt_tuning_init", "RANDOM") not in PROMPT_TUNING_INITS:
        raise InvalidAdapterError(
            f"{CONFIG_NAME}: prompt_tuning_init is {config.get('prompt_tuning_init')!r}; PEFT writes one of "
            f"{', '.join(PROMPT_TUNING_INITS)}"
        )
    return config


def _check_prompt_encoder(config: dict[str, Any]) -> None:
    """P-tuning's encoder settings. PEFT saves the encoder's output, so they do not change what is served,
    but a config that PEFT could not have written means the files were edited or do not belong together."""
    encoder = config.get("encoder_reparameterization_type", "MLP")
    if encoder not in P_TUNING_ENCODERS:
        raise InvalidAdapterError(
            f"{CONFIG_NAME}: encoder_reparameterization_type is {encoder!r}; P-tuning's prompt encoder is "
            f"{' or '.join(P_TUNING_ENCODERS)}"
        )
    for key in ("encoder_hidden_size", "encoder_num_layers"):
        value = config.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise InvalidAdapterError(f"{CONFIG_NAME}: {key} must be a positive integer, got {value!r}")


def parse_weights(raw: bytes) -> torch.Tensor:
    try:
        tensors = load_safetensors(raw)
    except (SafetensorError, ValueError, OSError) as exc:
        raise InvalidAdapterError(f"{WEIGHTS_NAME} is not a readable safetensors file: {exc}") from None
    if TENSOR_NAME not in tensors:
        raise InvalidAdapterError(
            f"{WEIGHTS_NAME} has no '{TENSOR_NAME}' tensor (found {sorted(tensors)}); "
            "save the adapter with PEFT's save_pretrained"
        )
    embeddings = tensors[TENSOR_NAME]
    if embeddings.ndim != 2:
        raise InvalidAdapterError(
            f"{WEIGHTS_NAME}: '{TENSOR_NAME}' must be 2-D [num_virtual_tokens, width], got {tuple(embeddings.shape)}"
        )
    if embeddings.dtype not in WEIGHT_DTYPES:  # float8 and integers: not what PEFT saves, and unservable
        names = ", ".join(str(d).removeprefix("torch.") for d in WEIGHT_DTYPES)
        raise InvalidAdapterError(
            f"{WEIGHTS_NAME}: '{TENSOR_NAME}' has dtype {str(embeddings.dtype).removeprefix('torch.')}; "
            f"save it as one of {names}"
        )
    return embeddings


def validate_adapter(
    adapter: PeftAdapter,
    shape: KVShape,
    max_virtual_tokens: int,
    dtype: torch.dtype | None = None,
    context_tokens: int | None = None,
) -> None:
    """Check that `adapter` can be served exactly on a base model of this `shape` (and `dtype`, if given),
    leaving room for a prompt in a row of `context_tokens` (if given)."""
    cfg = adapter.config
    t_config, t_tensor = cfg["num_virtual_tokens"], adapter.num_virtual_tokens
    if t_tensor != t_config:
        raise InvalidAdapterError(
            f"'{TENSOR_NAME}' has {t_tensor} rows but num_virtual_tokens is {t_config}; the files do not belong together"
        )
    if t_config > max_virtual_tokens:
        raise InvalidAdapterError(
            f"num_virtual_tokens is {t_config}, above this server's limit of {max_virtual_tokens} "
            "(train a shorter prefix, or raise --max-virtual-tokens)"
        )
    if context_tokens is not None and t_config >= context_tokens:
        raise InvalidAdapterError(
            f"num_virtual_tokens is {t_config}, but a row of the served base model holds {context_tokens} tokens "
            "in all (its context, or --max-total-tokens): no room would be left for a prompt; train a shorter "
            "prefix"
        )
    if adapter.is_prompt:
        _check_prompt_shape(adapter, shape)
    else:
        _check_prefix_shape(adapter, shape)
    if adapter.embeddings.numel() == 0:
        return
    # The extremes decide both checks: NaN propagates through min and max, and a conversion overflows for some
    # value only if it does for the largest or the smallest. Two reductions in place of isfinite's mask: 0.05
    # instead of 0.8 ms for a 1.5 MB adapter, on every load from the store.
    extremes = torch.stack([adapter.embeddings.amin(), adapter.embeddings.amax()])
    if not bool(torch.isfinite(extremes).all()):
        raise InvalidAdapterError(f"'{TENSOR_NAME}' holds NaN or infinite values; the adapter is corrupt")
    if dtype is not None and not bool(torch.isfinite(extremes.to(dtype)).all()):
        largest = float(extremes.abs().max())
        raise InvalidAdapterError(
            f"'{TENSOR_NAME}' holds values up to {largest:.3g}, which overflow {str(dtype).removeprefix('torch.')}, "
            f"the dtype this server computes in (largest finite: {torch.finfo(dtype).max:.3g}); "
            "the adapter cannot be served"
        )


def _made_for_another_model(cfg: dict[str, Any]) -> str:
    return f"this adapter was made for another base model (base_model_name_or_path: {cfg.get('base_model_name_or_path')!r})"


def _check_prefix_shape(adapter: PeftAdapter, shape: KVShape) -> None:
    cfg = adapter.config
    expected = {
        "num_layers": shape.num_layers,
        "num_attention_heads": shape.num_kv_heads,
        "token_dim": shape.num_kv_heads * shape.head_dim,
    }
    for key, want in expected.items():
        if cfg[key] != want:
            raise AdapterMismatchError(
                f"{CONFIG_NAME}: {key} is {cfg[key]} but the served base model needs {want} "
                f"({shape.num_layers} layers, {shape.num_kv_heads} key/value heads of size {shape.head_dim}); "
                + _made_for_another_model(cfg)
            )
    width = int(adapter.embeddings.shape[1])
    if width != shape.token_width:
        raise AdapterMismatchError(
            f"'{TENSOR_NAME}' rows have width {width} but the served base model needs "
            f"{shape.token_width} (= layers {shape.num_layers} x 2 x kv heads {shape.num_kv_heads} x head dim "
            f"{shape.head_dim})"
        )


def _check_prompt_shape(adapter: PeftAdapter, shape: KVShape) -> None:
    cfg = adapter.config
    if cfg["token_dim"] != shape.hidden_size:
        raise AdapterMismatchError(
            f"{CONFIG_NAME}: token_dim is {cfg['token_dim']} but the served base model's hidden size is "
            f"{shape.hidden_size}; " + _made_for_another_model(cfg)
        )
    if cfg.get("num_layers") not in (None, shape.num_layers):
        raise AdapterMismatchError(
            f"{CONFIG_NAME}: num_layers is {cfg['num_layers']} but the served base model has {shape.num_layers}; "
            + _made_for_another_model(cfg)
        )
    width = int(adapter.embeddings.shape[1])
    if width != shape.hidden_size:
        raise AdapterMismatchError(
            f"'{TENSOR_NAME}' rows have width {width} but a {adapter.method} adapter's rows are input embeddings "
            f"of the served base model's hidden size, {shape.hidden_size}"
        )


def read_adapter_dir(path: Path) -> PeftAdapter:
    if not path.is_dir():
        raise InvalidAdapterError(f"{path} is not a directory")
    files = {p.name: p.read_bytes() for p in path.iterdir() if p.name in (CONFIG_NAME, WEIGHTS_NAME)}
    for name in PICKLE_NAMES:
        if (path / name).exists() and WEIGHTS_NAME not in files:
            files[name] = b""
    return read_adapter_files(files)
