"""`train_adapter`: train a PEFT prompt-learning adapter (prefix tuning by default; prompt tuning, P-tuning) on
a frozen base model with transformers' Trainer.

The output directory is what PEFT's `save_pretrained` writes (safetensors), so `PeftModel.from_pretrained`
and prefixserve both load it; it is checked against prefixserve's reader before this returns.
Each known failure raises `TrainingError` saying what to change, before the model loads where possible.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase, ProgressCallback

from prefixserve.demo import DEMO_MODEL_DIR, DEMO_MODEL_NAME
from prefixserve.training.data import (
    Example,
    ExampleDataset,
    PadCollator,
    load_rows,
    split_examples,
    tokenize_rows,
)
from prefixserve.training.errors import TrainingError
from prefixserve.training.failures import check_encoder_size, check_servable, explain_error, flat_loss_hint
from prefixserve.training.options import DEFAULT_VIRTUAL_TOKENS, TrainOptions, resolve_device, resolve_dtype

log = logging.getLogger(__name__)

LOSS_SAMPLE = 128  # training rows on which the loss is measured before and after (eval mode: no dropout)


@dataclass
class TrainResult:
    output_dir: Path
    num_train_examples: int
    num_eval_examples: int
    steps: int
    train_loss_before: float  # mean loss on up to LOSS_SAMPLE training rows, before and after training
    train_loss_after: float
    eval_loss_before: float | None = None  # the same on the held-out rows, when there are any
    eval_loss_after: float | None = None
    trainable_parameters: int = 0  # the prefix encoder's; every base-model weight is frozen
    warnings: list[str] = field(default_factory=list)


def train_adapter(
    model: str, data: str | Path, output: str | Path, options: TrainOptions | None = None, **overrides: Any
) -> TrainResult:
    """Train on `data` and save to `output`. Options: a TrainOptions, and/or its fields as keywords."""
    opts = dataclasses.replace(options or TrainOptions(), **overrides)
    opts.check()
    try:
        import peft  # noqa: F401 - the optional dependency; fail here with the install hint
    except ImportError:
        raise TrainingError("training needs PEFT: pip install 'prefixserve[train]'") from None
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed

    dev = resolve_device(opts.device)
    if dev.type == "cuda" and dev.index is not None:
        torch.cuda.set_device(dev)  # the Trainer places the model on the current CUDA device, not on `dev`
    dtype = resolve_dtype(opts.dtype, dev)
    path = str(DEMO_MODEL_DIR) if model == DEMO_MODEL_NAME else model
    output = Path(output)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise TrainingError(f"cannot load a tokenizer for --model {model!r}: {exc}") from None
    train = tokenize_rows(load_rows(data), tokenizer, opts.max_length, opts.add_eos)
    if opts.eval_file is not None:
        held_out = tokenize_rows(load_rows(opts.eval_file), tokenizer, opts.max_length, opts.add_eos)
    else:
        train, held_out = split_examples(train, opts.eval_fraction, opts.seed)

    set_seed(opts.seed)  # before the prefix is created, so that its random init is reproducible
    try:
        base = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(dev)
    except (OSError, ValueError) as exc:
        raise TrainingError(f"cannot load --model {model!r} as a causal LM: {exc}") from None
    except (RuntimeError, MemoryError) as exc:  # out of memory while loading or moving to the device
        raise explain_error(exc, opts, dtype) from exc
    text_config = base.config.get_text_config()
    try:
        with _peft_passes_past_key_values():  # PEFT's from-text init runs its forward too
            peft_model = _peft_model(base, tokenizer, opts, path)
    except (RuntimeError, MemoryError) as exc:
        raise explain_error(exc, opts, dtype) from exc
    num_virtual_tokens = peft_model.peft_config["default"].num_virtual_tokens
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    log.info(
        "training %d %s parameters (T=%d%s) on %d rows (%d held out), %s on %s",
        trainable, opts.method, num_virtual_tokens,
        f", prefix_projection={opts.projection}" if opts.method == "prefix" else "",
        len(train), len(held_out), dtype, dev,
    )  # fmt: skip

    sample = random.Random(opts.seed).sample(train, min(LOSS_SAMPLE, len(train)))
    with tempfile.TemporaryDirectory() as scratch, _peft_passes_past_key_values():
        trainer = _make_trainer(peft_model, tokenizer, train, scratch, opts, dev, dtype)
        try:
            before, eval_before = _losses(trainer, sample, held_out)
            trainer.train()
            after, eval_after = _losses(trainer, sample, held_out)
        except (RuntimeError, MemoryError) as exc:
            raise explain_error(exc, opts, dtype) from exc

    steps = trainer.state.global_step
    result = TrainResult(
        output, len(train), len(held_out), steps, before, after, eval_before, eval_after, trainable
    )
    if not math.isfinite(after):
        raise TrainingError(
            f"the loss became {after}: lower --learning-rate (now {opts.lr:g}), or use --dtype float32"
        )
    if after > before * 0.99:  # less than 1% better: the usual walls are projection off or a tiny lr
        result.warnings.append(flat_loss_hint(before, after, opts, steps))
        log.warning(result.warnings[-1])
    peft_model.save_pretrained(output, safe_serialization=True)
    if model == DEMO_MODEL_NAME:
        _record_base_model(output, DEMO_MODEL_NAME)
    check_servable(output, text_config)
    return result


def _peft_model(base: Any, tokenizer: PreTrainedTokenizerBase, opts: TrainOptions, path: str) -> Any:
    """The PEFT model: virtual tokens of the method asked for, initialized as asked, before the frozen base."""
    from peft import PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig, TaskType, get_peft_model

    hidden = base.config.get_text_config().hidden_size
    num_virtual_tokens = opts.num_virtual_tokens
    if num_virtual_tokens is None and opts.init_mode == "text":
        num_virtual_tokens = len(_text_ids(tokenizer, opts.init_text, opts.init_chat_template))
    common = {
        "task_type": TaskType.CAUSAL_LM,
        "num_virtual_tokens": num_virtual_tokens or DEFAULT_VIRTUAL_TOKENS,
    }
    if opts.method == "prompt-tuning":
        text = {"prompt_tuning_init_text": opts.init_text, "tokenizer_name_or_path": path}
        config: Any = PromptTuningConfig(
            **common, prompt_tuning_init="TEXT" if opts.init_mode == "text" else "RANDOM",
            **(text if opts.init_mode == "text" else {}),
        )  # fmt: skip
    elif opts.method == "p-tuning":
        config = PromptEncoderConfig(
            **common,
            encoder_reparameterization_type=opts.prompt_encoder.upper(),
            encoder_hidden_size=opts.encoder_hidden_size or hidden,
        )
    else:
        if opts.projection:
            check_encoder_size(opts.encoder_hidden_size or hidden, base)
        config = PrefixTuningConfig(
            **common,
            prefix_projection=opts.projection,
            # PEFT's own default is the KV width, smaller than the hidden size on GQA models.
            encoder_hidden_size=(opts.encoder_hidden_size or hidden) if opts.projection else None,
            init_weights="zero" if opts.init_mode == "zero" else None,
        )
    with warnings.catch_warnings():  # PEFT 0.21 reads a property that transformers 5 deprecates
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        peft_model = get_peft_model(base, config)  # freezes every base-model weight
    if opts.init_mode == "text" and opts.method == "prefix":
        _init_from_text(peft_model, tokenizer, opts, config.num_virtual_tokens)
    return peft_model


@contextmanager
def _peft_passes_past_key_values() -> Iterator[None]:
    """PEFT 0.21's forward hands the prefix to the base model as `past_key_values`, which transformers 5.24
    renamed `cache` (the old name still works, with a FutureWarning per step). The call is PEFT's, so a user
    of `prefixserve train` can do nothing about it; scripts/check_upstream.sh shows the day it stops working."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`past_key_values` is deprecated", category=FutureWarning)
        yield


def _record_base_model(output: Path, name: str) -> None:
    # After saving, not before: PEFT looks a base name that is not a local path up on the hub while saving.
    # "tiny" instead of this machine's path to the demo files, so that the config means the same everywhere.
    config_path = output / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = name
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _losses(trainer: Any, sample: list[Example], held_out: list[Example]) -> tuple[float, float | None]:
    train_loss = trainer.evaluate(ExampleDataset(sample), metric_key_prefix="train")["train_loss"]
    eval_loss = trainer.evaluate(ExampleDataset(held_out))["eval_loss"] if held_out else None
    return float(train_loss), None if eval_loss is None else float(eval_loss)


def _text_ids(tokenizer: PreTrainedTokenizerBase, text: str, chat: bool) -> list[int]:
    # The tokens PEFT's initialize_kv_prefix_from_text prefills, to size the prefix to the whole text.
    if chat:
        messages = [{"role": "system", "content": text}]
        try:
            return list(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False))
        except (TypeError, ValueError):  # no chat template: PEFT falls back to the plain text, and so do we
            pass
    return list(tokenizer(text)["input_ids"])


def _init_from_text(peft_model: Any, tokenizer: PreTrainedTokenizerBase, opts: TrainOptions, t: int) -> None:
    try:
        from peft import initialize_kv_prefix_from_text
    except ImportError:  # added to PEFT with cartridges; 0.21 has it
        raise TrainingError("--init text needs a newer PEFT (0.21 or later): pip install -U peft") from None

    n = len(_text_ids(tokenizer, opts.init_text, opts.init_chat_template))
    if n < t:
        raise TrainingError(
            f"the --init text is {n} tokens long but --num-virtual-tokens is {t}; give a longer text, or "
            "leave --num-virtual-tokens out to make the whole text the prefix"
        )
    if n > t:
        log.warning("the --init text is %d tokens long; only its first %d become the prefix", n, t)
    initialize_kv_prefix_from_text(
        peft_model,
        tokenizer,
        text=opts.init_text,
        use_chat_template=opts.init_chat_template,
        num_virtual_tokens=t,
    )


def _make_trainer(
    peft_model: Any,
    tokenizer: PreTrainedTokenizerBase,
    train: list[Example],
    scratch: str,
    opts: TrainOptions,
    dev: torch.device,
    dtype: torch.dtype,
) -> Any:
    from transformers import PrinterCallback, Trainer, TrainingArguments

    total_steps = opts.planned_steps(len(train))
    args = TrainingArguments(
        output_dir=scratch,  # Trainer needs one; nothing is checkpointed (save_strategy="no")
        learning_rate=opts.lr,
        max_steps=total_steps,
        per_device_train_batch_size=opts.batch_size,
        per_device_eval_batch_size=opts.batch_size,
        gradient_accumulation_steps=opts.gradient_accumulation_steps,
        weight_decay=0.0,
        logging_steps=max(1, min(50, total_steps // 20)),  # ~20 loss updates on the bar
        save_strategy="no",
        eval_strategy="no",  # losses are measured before and after, on fixed rows, in `_losses`
        report_to="none",
        seed=opts.seed,
        data_seed=opts.seed,
        use_cpu=dev.type == "cpu",
        bf16=dtype == torch.bfloat16,  # autocast over a half-precision base; the prefix stays float32
        fp16=dtype == torch.float16,
        dataloader_pin_memory=dev.type == "cuda",
        remove_unused_columns=False,
        label_names=["labels"],
        disable_tqdm=not opts.progress,
    )
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    trainer = Trainer(
        model=peft_model, args=args, train_dataset=ExampleDataset(train), data_collator=PadCollator(pad)
    )
    trainer.remove_callback(PrinterCallback)  # it prints every log dict; the bar shows the loss instead
    if opts.progress:
        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(_LossBar())
    return trainer


class _LossBar(ProgressCallback):
    """Trainer's tqdm bar, with the latest training loss on the bar instead of printed dicts."""

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        if self.training_bar is not None and logs and "loss" in logs:
            self.training_bar.set_postfix(loss=f"{logs['loss']:.4f}")

    def on_prediction_step(
        self, args: Any, state: Any, control: Any, eval_dataloader: Any = None, **kwargs: Any
    ) -> None:
        pass  # the before/after loss measurements are quick; a bar for each would only clutter the output
