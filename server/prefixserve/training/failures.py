"""What can go wrong during or after the run, turned into messages that say what to change."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from transformers import PretrainedConfig

from prefixserve.training.errors import TrainingError
from prefixserve.training.options import TrainOptions

log = logging.getLogger(__name__)


def explain_error(exc: BaseException, opts: TrainOptions, dtype: torch.dtype) -> BaseException:
    """A TrainingError for out-of-memory and dtype errors; anything else is returned unchanged."""
    text = str(exc)
    low = text.lower()
    first_line = (text.splitlines() or [""])[0][:200]
    if (
        isinstance(exc, (MemoryError, torch.OutOfMemoryError))
        or "out of memory" in low
        or "can't allocate" in low
    ):
        smaller = max(1, opts.batch_size // 2)
        accumulation = opts.gradient_accumulation_steps * opts.batch_size // smaller
        keep = (
            f" with --gradient-accumulation-steps {accumulation} to keep the effective batch"
            if smaller < opts.batch_size
            else ""
        )
        mlp = ", a smaller --encoder-hidden-size (e.g. 512)" if opts.projection else ""
        return TrainingError(
            f"out of memory: use a smaller --batch-size (e.g. {smaller}{keep}), a smaller --max-length "
            f"(now {opts.max_length}){mlp}, or --dtype bfloat16 on a GPU. ({type(exc).__name__}: {first_line})"
        )
    if any(s in low for s in ("dtype", "scalar type", "half", "bfloat16", "float16")):
        return TrainingError(
            f"dtype mismatch while training with the base model in {str(dtype).removeprefix('torch.')}: run with "
            f"--dtype float32 (on a GPU, --dtype bfloat16 also works). ({type(exc).__name__}: {first_line})"
        )
    return exc


def flat_loss_hint(before: float, after: float, opts: TrainOptions, steps: int) -> str:
    head = f"the training loss barely moved ({before:.4f} -> {after:.4f}, less than 1% in {steps} steps): "
    lr = opts.lr
    if opts.method == "prefix" and not opts.projection and lr < 1e-3:
        return head + (
            f"without --prefix-projection the prefix itself is trained and moves slowly at --learning-rate {lr:g}; "
            "use --prefix-projection, or a learning rate around 1e-2"
        )
    if lr < 1e-4:
        return head + f"--learning-rate {lr:g} is very low; try 1e-3 to 1e-2 (the default is {opts.method}'s)"
    return head + "raise --learning-rate, train longer (--epochs / --max-steps), or check the data"


def check_encoder_size(encoder_hidden_size: int, base: torch.nn.Module) -> None:
    """A projection MLP larger than the base model is a mistaken --encoder-hidden-size, and would not fit."""
    from prefixserve.engine.model_loader import kv_shape_of

    shape = kv_shape_of(base.config.get_text_config())
    width = shape.num_kv_heads * shape.head_dim  # PEFT's token_dim
    mlp = (width + 1) * encoder_hidden_size + (encoder_hidden_size + 1) * shape.token_width
    base_params = sum(p.numel() for p in base.parameters())
    if mlp > base_params:
        raise TrainingError(
            f"--encoder-hidden-size {encoder_hidden_size} makes a projection MLP of {mlp / 1e6:,.1f}M parameters, "
            f"more than the whole base model ({base_params / 1e6:,.1f}M); use the default (the model's hidden size, "
            f"{base.config.get_text_config().hidden_size}) or a smaller value such as 512"
        )


def check_servable(output: Path, config: PretrainedConfig) -> None:
    """The saved directory must be one prefixserve serves on this base model, not only one PEFT loads."""
    from prefixserve.adapters.errors import AdapterError
    from prefixserve.adapters.format import read_adapter_dir, validate_adapter
    from prefixserve.config import Settings
    from prefixserve.engine.model_loader import kv_shape_of

    try:
        adapter = read_adapter_dir(output)
        validate_adapter(adapter, kv_shape_of(config), max_virtual_tokens=adapter.num_virtual_tokens)
    except AdapterError as exc:
        raise TrainingError(f"the saved adapter in {output} cannot be served by prefixserve: {exc}") from None
    server_limit = Settings.model_fields["max_virtual_tokens"].default
    if adapter.num_virtual_tokens > server_limit:
        log.warning(
            "the adapter has %d virtual tokens, above a default server's limit of %d: serve it with "
            "--max-virtual-tokens %d or more",
            adapter.num_virtual_tokens,
            server_limit,
            adapter.num_virtual_tokens,
        )
