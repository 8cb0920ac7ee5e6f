"""The options of a training run, their defaults, and the checks that run before any model is loaded."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from prefixserve.training.defaults import DEFAULT_EPOCHS, DEFAULT_LEARNING_RATES, DEFAULT_MIN_STEPS
from prefixserve.training.errors import TrainingError

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DEFAULT_VIRTUAL_TOKENS = 20


METHODS = ("prefix", "prompt-tuning", "p-tuning")
PROMPT_ENCODERS = ("mlp", "lstm")


@dataclass(frozen=True)
class TrainOptions:
    # prefix: keys/values per layer (PEFT's PrefixTuningConfig); prompt-tuning: input embeddings of virtual
    # tokens (PromptTuningConfig); p-tuning: the same, produced by a trained encoder (PromptEncoderConfig).
    method: str = "prefix"
    prompt_encoder: str = "mlp"  # p-tuning's encoder: mlp | lstm
    eval_file: str | Path | None = None  # held-out data; or hold out `eval_fraction` of the data
    eval_fraction: float = 0.0
    num_virtual_tokens: int | None = None  # None: 20, or with text init the text's length in tokens
    prefix_projection: bool | None = (
        None  # None: on, except with text init (PEFT allows that only without it)
    )
    encoder_hidden_size: int | None = None  # None: the model's hidden size
    init: str = "random"  # random | zero | text:<text>
    init_chat_template: bool = (
        False  # text init: wrap the text as a system message (PEFT's use_chat_template)
    )
    learning_rate: float | None = None  # None: the method's default (DEFAULT_LEARNING_RATES)
    epochs: float | None = None  # None: DEFAULT_EPOCHS, and at least DEFAULT_MIN_STEPS steps
    max_steps: int | None = None  # overrides epochs
    batch_size: int = 8
    gradient_accumulation_steps: int = 1
    max_length: int = 512
    seed: int = 0
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    device: str = "auto"  # auto | cpu | cuda[:N]
    add_eos: bool = True  # end rows with EOS so the adapter learns to stop
    progress: bool = True  # tqdm bar with the loss

    @property
    def init_mode(self) -> str:
        return parse_init(self.init)[0]

    @property
    def init_text(self) -> str:
        return parse_init(self.init)[1] or ""

    @property
    def projection(self) -> bool:
        """Prefix tuning through PEFT's projection MLP."""
        if self.method != "prefix":
            return False
        return self.init_mode != "text" if self.prefix_projection is None else self.prefix_projection

    @property
    def lr(self) -> float:
        return DEFAULT_LEARNING_RATES[self.method] if self.learning_rate is None else self.learning_rate

    def check(self) -> None:
        """Raise TrainingError for option combinations that cannot work."""
        if self.method not in METHODS:
            raise TrainingError(f"--method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.method != "prefix":
            self._check_prompt_method()
        if self.init_mode == "text" and self.projection:
            raise TrainingError(
                "--init text:... cannot be used with --prefix-projection: PEFT's initialize_kv_prefix_from_text "
                "sets the prefix's keys and values directly, and they are parameters only without the projection "
                "MLP. Use --no-prefix-projection (the default with text init; a learning rate around 1e-2 suits "
                "it), or --init zero / random"
            )
        if self.method == "prefix" and self.encoder_hidden_size is not None and not self.projection:
            raise TrainingError(
                "--encoder-hidden-size sizes the projection MLP and has no effect with --no-prefix-projection; "
                "drop it, or use --prefix-projection"
            )
        if self.encoder_hidden_size is not None and self.encoder_hidden_size < 1:
            raise TrainingError(
                f"--encoder-hidden-size must be a positive integer, got {self.encoder_hidden_size}; "
                "leave it out to use the model's hidden size"
            )
        if self.num_virtual_tokens is not None and self.num_virtual_tokens < 1:
            raise TrainingError(f"--num-virtual-tokens must be at least 1, got {self.num_virtual_tokens}")
        if self.eval_file is not None and self.eval_fraction > 0:
            raise TrainingError("give either --eval-file or --eval-fraction, not both")
        if not 0 <= self.eval_fraction < 1:
            raise TrainingError(f"--eval-fraction must be in [0, 1), got {self.eval_fraction}")
        if self.lr <= 0:
            raise TrainingError(f"--learning-rate must be > 0, got {self.learning_rate}")
        if min(self.batch_size, self.gradient_accumulation_steps) < 1 or self.max_length < 2:
            raise TrainingError(
                "--batch-size and --gradient-accumulation-steps must be >= 1, --max-length >= 2"
            )
        if self.max_steps is None and self.epochs is not None and self.epochs <= 0:
            raise TrainingError("--epochs must be > 0 (or give --max-steps)")

    def _check_prompt_method(self) -> None:
        method = f"--method {self.method}"
        if self.prefix_projection is not None:
            raise TrainingError(
                f"--prefix-projection is prefix tuning's; {method} trains input embeddings. Drop it"
                + (" (--prompt-encoder chooses P-tuning's encoder)" if self.method == "p-tuning" else "")
            )
        if self.init_mode == "zero":
            raise TrainingError(
                f"--init zero is prefix tuning's; {method} starts from random embeddings"
                + (' or, with --init text:"...", from a text\'s' if self.method == "prompt-tuning" else "")
            )
        if self.init_mode == "text" and self.method == "p-tuning":
            raise TrainingError(
                '--init text:"..." initializes prompt tuning and prefix tuning; P-tuning\'s encoder starts '
                "random. Use --method prompt-tuning for a text init"
            )
        if self.init_chat_template:
            raise TrainingError(
                f"--init-chat-template is prefix tuning's (PEFT's initialize_kv_prefix_from_text); {method} "
                "takes the text's tokens as they are"
            )
        if self.encoder_hidden_size is not None and self.method != "p-tuning":
            raise TrainingError(
                "--encoder-hidden-size sizes P-tuning's encoder or prefix tuning's projection MLP; "
                "prompt tuning has neither. Drop it"
            )
        if self.prompt_encoder not in PROMPT_ENCODERS:
            raise TrainingError(
                f"--prompt-encoder must be {' or '.join(PROMPT_ENCODERS)}, got {self.prompt_encoder!r}"
            )

    def planned_steps(self, num_examples: int) -> int:
        """Optimizer steps of the run: --max-steps, else --epochs, else the default length."""
        per_epoch = math.ceil(math.ceil(num_examples / self.batch_size) / self.gradient_accumulation_steps)
        if self.max_steps:
            return self.max_steps
        if self.epochs is not None:
            return max(1, math.ceil(self.epochs * per_epoch))
        return max(math.ceil(DEFAULT_EPOCHS * per_epoch), DEFAULT_MIN_STEPS)


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


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise TrainingError("--device cuda was asked for, but no CUDA device is available; use --device cpu")
    try:
        return torch.device(device)
    except RuntimeError:
        raise TrainingError(f"--device must be auto, cpu or cuda[:N], got {device!r}") from None


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """The base model's dtype. The prefix parameters stay float32; half dtypes train under autocast."""
    if dtype == "auto":
        cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if cuda_bf16 else torch.float32
    if dtype not in _DTYPES:
        raise TrainingError(f"--dtype must be auto, float32, bfloat16 or float16, got {dtype!r}")
    if dtype == "float16" and device.type == "cpu":
        raise TrainingError(
            "--dtype float16 cannot train on the CPU (PyTorch has no float16 mixed precision there); "
            "use --dtype float32 (or bfloat16), or train on a GPU with --device cuda"
        )
    return _DTYPES[dtype]
