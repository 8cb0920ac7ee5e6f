"""`train_adapter`: train a PEFT prefix-tuning adapter on a frozen base model with transformers' Trainer.

The output directory is what PEFT's `save_pretrained` writes (safetensors), so `PeftModel.from_pretrained`
and prefixserve both load it; it is checked against prefixserve's reader before this returns.
Each known failure raises `TrainingError` with what to change, before any time is spent where possible.
"""

from __future__ import annotations

import logging
import math
import random
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase, ProgressCallback

from prefixserve.demo import DEMO_MODEL_DIR, DEMO_MODEL_NAME
from prefixserve.training.data import ExampleDataset, PadCollator, load_rows, split_examples, tokenize_rows
from prefixserve.training.errors import TrainingError

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
LOSS_SAMPLE = 128  # training rows on which the loss is measured before and after (eval mode, no dropout)


@dataclass
class TrainResult:
    output_dir: Path
    num_train_examples: int
    num_eval_examples: int
    steps: int
    train_loss_before: float
    train_loss_after: float
    eval_loss_before: float | None = None
    eval_loss_after: float | None = None
    warnings: list[str] = field(default_factory=list)


def parse_init(init: str) -> tuple[str, str | None]:
    """`random` | `zero` | `text:<text>` → (mode, text)."""
    if init in ("random", "zero"):
        return init, None
    if init.startswith("text:"):
        text = init[len("text:") :]
        if not text.strip():
            raise TrainingError('--init text:"..." needs a text after "text:"')
        return "text", text
    raise TrainingError(f'--init must be random, zero or text:"...", got {init!r}')


def train_adapter(
    model: str,
    data: str | Path,
    output: str | Path,
    *,
    eval_file: str | Path | None = None,
    eval_fraction: float = 0.0,
    num_virtual_tokens: int | None = None,  # None: 20, or with text init the text's length in tokens
    prefix_projection: bool
    | None = None,  # None: on, except with text init (PEFT allows that only without it)
    encoder_hidden_size: int | None = None,  # None: the model's hidden size
    init: str = "random",
    init_chat_template: bool = False,
    learning_rate: float = 3e-4,
    epochs: float = 3.0,
    max_steps: int | None = None,
    batch_size: int = 8,
    gradient_accumulation_steps: int = 1,
    max_length: int = 512,
    seed: int = 0,
    dtype: str = "auto",
    device: str = "auto",
    add_eos: bool = True,
    progress: bool = True,
) -> TrainResult:
    try:
        from peft import PrefixTuningConfig, TaskType, get_peft_model
    except ImportError:
        raise TrainingError("training needs PEFT: pip install 'prefixserve[train]'") from None
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed

    mode, init_text = parse_init(init)
    if prefix_projection is None:
        prefix_projection = mode != "text"
    _check_options(
        mode,
        prefix_projection,
        encoder_hidden_size,
        num_virtual_tokens,
        eval_file,
        eval_fraction,
        learning_rate,
        batch_size,
        gradient_accumulation_steps,
        max_length,
    )
    dev = _resolve_device(device)
    torch_dtype = _resolve_dtype(dtype, dev)
    path = str(DEMO_MODEL_DIR) if model == DEMO_MODEL_NAME else model
    output = Path(output)

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise TrainingError(f"cannot load a tokenizer for --model {model!r}: {exc}") from None
    train = tokenize_rows(load_rows(data), tokenizer, max_length, add_eos)
    if eval_file is not None:
        held_out = tokenize_rows(load_rows(eval_file), tokenizer, max_length, add_eos)
    else:
        train, held_out = split_examples(train, eval_fraction, seed)

    set_seed(seed)  # before the prefix is created, so its random init is reproducible
    try:
        base = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
    except (OSError, ValueError) as exc:
        raise TrainingError(f"cannot load --model {model!r} as a causal LM: {exc}") from None
    base.to(dev)
    hidden = base.config.get_text_config().hidden_size
    if mode == "text" and num_virtual_tokens is None:
        num_virtual_tokens = len(_text_ids(tokenizer, init_text or "", init_chat_template))
    config = PrefixTuningConfig(
        task_type=TaskType.CAUSAL_LM,
        num_virtual_tokens=num_virtual_tokens or 20,
        prefix_projection=prefix_projection,
        encoder_hidden_size=(encoder_hidden_size or hidden) if prefix_projection else None,
        init_weights="zero" if mode == "zero" else None,
    )
    peft_model = get_peft_model(base, config)  # freezes every base-model weight
    if mode == "text":
        _init_from_text(peft_model, tokenizer, init_text or "", config.num_virtual_tokens, init_chat_template)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    log.info(
        "training %d prefix parameters (T=%d, prefix_projection=%s) on %d examples (%d held out)",
        trainable,
        config.num_virtual_tokens,
        prefix_projection,
        len(train),
        len(held_out),
    )

    sample = random.Random(seed).sample(train, min(LOSS_SAMPLE, len(train)))
    steps_per_epoch = math.ceil(math.ceil(len(train) / batch_size) / gradient_accumulation_steps)
    total_steps = max_steps or max(1, math.ceil(epochs * steps_per_epoch))
    with tempfile.TemporaryDirectory() as scratch:
        trainer = _make_trainer(
            peft_model,
            tokenizer,
            train,
            scratch,
            dev,
            torch_dtype,
            progress,
            seed,
            learning_rate,
            epochs,
            max_steps,
            batch_size,
            gradient_accumulation_steps,
            total_steps,
        )
        try:
            before = trainer.evaluate(ExampleDataset(sample), metric_key_prefix="train")["train_loss"]
            eval_before = trainer.evaluate(ExampleDataset(held_out))["eval_loss"] if held_out else None
            trainer.train()
            after = trainer.evaluate(ExampleDataset(sample), metric_key_prefix="train")["train_loss"]
            eval_after = trainer.evaluate(ExampleDataset(held_out))["eval_loss"] if held_out else None
        except (RuntimeError, MemoryError) as exc:
            raise _explain(exc, batch_size, max_length, prefix_projection, torch_dtype) from exc

    result = TrainResult(
        output, len(train), len(held_out), trainer.state.global_step, before, after, eval_before, eval_after
    )
    if not math.isfinite(after):
        raise TrainingError(
            f"the loss became {after}: lower --learning-rate (now {learning_rate}) or use --dtype float32"
        )
    if after > before * 0.99:
        result.warnings.append(_flat_loss_hint(before, after, prefix_projection, learning_rate, result.steps))
        log.warning(result.warnings[-1])
    peft_model.save_pretrained(output, safe_serialization=True)
    _check_servable(output, base.config.get_text_config())
    return result


def _check_options(
    mode: str,
    projection: bool,
    encoder_hidden_size: int | None,
    num_virtual_tokens: int | None,
    eval_file: object,
    eval_fraction: float,
    lr: float,
    batch_size: int,
    accumulation: int,
    max_length: int,
) -> None:
    if mode == "text" and projection:
        raise TrainingError(
            "--init text:... cannot be used with --prefix-projection: PEFT's initialize_kv_prefix_from_text sets the "
            "prefix's keys and values directly, which exist as parameters only without the projection MLP. Use "
            "--no-prefix-projection (the default with text init; a learning rate around 1e-2 suits it), or --init zero"
        )
    if encoder_hidden_size is not None and not projection:
        raise TrainingError(
            "--encoder-hidden-size sizes the projection MLP; it has no effect with --no-prefix-projection"
        )
    if encoder_hidden_size is not None and encoder_hidden_size < 1:
        raise TrainingError(f"--encoder-hidden-size must be a positive integer, got {encoder_hidden_size}")
    if num_virtual_tokens is not None and num_virtual_tokens < 1:
        raise TrainingError(f"--num-virtual-tokens must be at least 1, got {num_virtual_tokens}")
    if eval_file is not None and eval_fraction > 0:
        raise TrainingError("give either --eval-file or --eval-fraction, not both")
    if not 0 <= eval_fraction < 1:
        raise TrainingError(f"--eval-fraction must be in [0, 1), got {eval_fraction}")
    if lr <= 0 or batch_size < 1 or accumulation < 1 or max_length < 2:
        raise TrainingError(
            "--learning-rate must be > 0, --batch-size and --gradient-accumulation-steps >= 1, "
            "--max-length >= 2"
        )


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise TrainingError("--device cuda was asked for, but no CUDA device is available; use --device cpu")
    try:
        return torch.device(device)
    except RuntimeError:
        raise TrainingError(f"--device must be auto, cpu or cuda[:N], got {device!r}") from None


def _resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if cuda_bf16 else torch.float32
    if dtype not in _DTYPES:
        raise TrainingError(f"--dtype must be auto, float32, bfloat16 or float16, got {dtype!r}")
    if dtype == "float16" and device.type == "cpu":
        raise TrainingError(
            "--dtype float16 cannot train on the CPU (no fp16 mixed precision there); "
            "use --dtype float32 (or bfloat16), or train on a GPU with --device cuda"
        )
    return _DTYPES[dtype]


def _text_ids(tokenizer: PreTrainedTokenizerBase, text: str, chat: bool) -> list[int]:
    # The same tokens PEFT's initialize_kv_prefix_from_text prefills, to size the prefix to the whole text.
    if chat:
        ids = tokenizer.apply_chat_template(
            [{"role": "system", "content": text}],
            tokenize=True,
            add_generation_prompt=False,
            return_dict=False,
        )
        return list(ids)
    return list(tokenizer(text)["input_ids"])


def _init_from_text(peft_model, tokenizer: PreTrainedTokenizerBase, text: str, t: int, chat: bool) -> None:
    from peft import initialize_kv_prefix_from_text

    n = len(_text_ids(tokenizer, text, chat))
    if n < t:
        raise TrainingError(
            f"--init text has {n} tokens but --num-virtual-tokens is {t}; give a longer text, or "
            "leave --num-virtual-tokens out to use the whole text"
        )
    if n > t:
        log.warning(
            "--init text has %d tokens; only the first %d (--num-virtual-tokens) become the prefix", n, t
        )
    initialize_kv_prefix_from_text(
        peft_model, tokenizer, text=text, use_chat_template=chat, num_virtual_tokens=t
    )


def _make_trainer(
    peft_model,
    tokenizer,
    train,
    scratch: str,
    dev: torch.device,
    dtype: torch.dtype,
    progress: bool,
    seed: int,
    lr: float,
    epochs: float,
    max_steps: int | None,
    batch_size: int,
    accumulation: int,
    total_steps: int,
):
    from transformers import PrinterCallback, Trainer, TrainingArguments

    args = TrainingArguments(
        output_dir=scratch,  # Trainer wants one; nothing is checkpointed (save_strategy="no")
        learning_rate=lr,
        num_train_epochs=epochs,
        max_steps=max_steps or -1,
        per_device_train_batch_size=batch_size,
        per_device_eval_batch_size=batch_size,
        gradient_accumulation_steps=accumulation,
        weight_decay=0.0,
        logging_steps=max(1, min(50, total_steps // 20)),
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        seed=seed,
        data_seed=seed,
        use_cpu=dev.type == "cpu",
        bf16=dtype == torch.bfloat16,  # autocast: the prefix parameters stay float32
        fp16=dtype == torch.float16,
        dataloader_pin_memory=dev.type == "cuda",
        remove_unused_columns=False,
        label_names=["labels"],
        disable_tqdm=not progress,
    )
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    trainer = Trainer(
        model=peft_model, args=args, train_dataset=ExampleDataset(train), data_collator=PadCollator(pad)
    )
    trainer.remove_callback(PrinterCallback)
    if progress:
        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(_LossBar())
    return trainer


class _LossBar(ProgressCallback):
    """Trainer's tqdm bar, with the latest training loss shown on the bar instead of printed dicts."""

    def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001 - Trainer's callback API
        if self.training_bar is not None and logs and "loss" in logs:
            self.training_bar.set_postfix(loss=f"{logs['loss']:.4f}")


def _explain(
    exc: BaseException, batch_size: int, max_length: int, projection: bool, dtype: torch.dtype
) -> Exception:
    text = str(exc)
    low = text.lower()
    if isinstance(exc, (MemoryError, torch.OutOfMemoryError)) or "out of memory" in low or "allocate" in low:
        smaller = max(1, batch_size // 2)
        mlp = " or a smaller --encoder-hidden-size (e.g. 512)" if projection else ""
        return TrainingError(
            f"out of memory: use a smaller --batch-size (e.g. {smaller}, with --gradient-accumulation-steps "
            f"{batch_size // smaller * 2 if smaller < batch_size else 2} to keep the effective batch), a smaller "
            f"--max-length (now {max_length}){mlp}, or --dtype bfloat16 on a GPU. ({text.splitlines()[0][:200]})"
        )
    if any(s in low for s in ("dtype", "scalar type", "half", "bfloat16", "float16")):
        return TrainingError(
            f"dtype mismatch while training in {str(dtype).removeprefix('torch.')}: run with --dtype float32 "
            f"(on a GPU, --dtype bfloat16 also works). ({text.splitlines()[0][:200]})"
        )
    return exc if isinstance(exc, Exception) else TrainingError(text)


def _flat_loss_hint(before: float, after: float, projection: bool, lr: float, steps: int) -> str:
    head = f"the training loss did not decrease ({before:.4f} -> {after:.4f} over {steps} steps): "
    if not projection and lr < 1e-3:
        return head + (
            f"without --prefix-projection the prefix itself is trained and moves slowly at --learning-rate "
            f"{lr:g}; use --prefix-projection, or a learning rate around 1e-2"
        )
    if lr < 1e-4:
        return head + f"--learning-rate {lr:g} is very low; try 3e-4 to 1e-3"
    return head + "train longer (--epochs / --max-steps), or check that the data has something to learn"


def _check_servable(output: Path, config) -> None:  # noqa: ANN001 - a transformers PretrainedConfig
    from prefixserve.adapters.errors import AdapterError
    from prefixserve.adapters.format import read_adapter_dir, validate_adapter
    from prefixserve.engine.model_loader import kv_shape_of

    try:
        adapter = read_adapter_dir(output)
        validate_adapter(adapter, kv_shape_of(config), max_virtual_tokens=adapter.num_virtual_tokens)
    except AdapterError as exc:
        raise TrainingError(f"the saved adapter in {output} cannot be served by prefixserve: {exc}") from None
