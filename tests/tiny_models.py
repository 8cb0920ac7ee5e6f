"""Tiny models and PEFT adapters built locally (random weights, the demo tokenizer), as transformers' tests do."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from peft import (
    PeftModel,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptTuningConfig,
    PromptTuningInit,
    TaskType,
    get_peft_model,
)
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    PretrainedConfig,
    Qwen2Config,
)

from prefixserve.demo import DEMO_MODEL_DIR

VOCAB = 909  # the demo tokenizer's
EOS = 0
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def _common() -> dict:
    # A wide initializer keeps logits far apart, so a 1e-7 numeric difference can never flip an argmax.
    return {"vocab_size": VOCAB, "bos_token_id": EOS, "eos_token_id": EOS, "initializer_range": 0.3}


def tiny_config(arch: str) -> PretrainedConfig:
    if arch == "gpt2":
        return GPT2Config(n_positions=256, n_embd=32, n_layer=2, n_head=4, **_common())
    if (
        arch == "gpt2-slow"
    ):  # a few ms per token: long enough generations to disconnect from, drain, queue behind
        return GPT2Config(n_positions=4096, n_embd=512, n_layer=8, n_head=8, **_common())
    llama_like = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,  # grouped-query attention
        "max_position_embeddings": 256,
        **_common(),
    }
    if arch == "llama":
        return LlamaConfig(**llama_like)
    # Head size 64, as most served models have: the native decode kernel's vector path (the others' head size
    # of 8 takes its plain loop).
    if arch == "llama-d64":
        return LlamaConfig(**{**llama_like, "hidden_size": 256, "intermediate_size": 128})
    if arch == "gpt2-d64":
        return GPT2Config(n_positions=256, n_embd=256, n_layer=2, n_head=4, **_common())
    if arch == "mistral":
        return MistralConfig(sliding_window=512, **llama_like)
    if arch == "qwen2":
        return Qwen2Config(**llama_like)
    raise ValueError(arch)


def build_model(arch: str, out: Path, seed: int = 0, initializer_range: float | None = None) -> Path:
    """`initializer_range`: instead of the wide one (logits far apart, for token-exact checks), e.g. a trained
    model's scale (0.02), where half precision's error is as small as in real use."""
    torch.manual_seed(seed)
    config = tiny_config(arch)
    if initializer_range is not None:
        config.initializer_range = initializer_range
    model = AutoModelForCausalLM.from_config(config).eval()
    if arch == "gpt2-slow":
        with torch.no_grad():  # EOS logit 0 while the best other logit is far above: it never stops early
            model.get_input_embeddings().weight[EOS].zero_()
    model.save_pretrained(out)
    for name in TOKENIZER_FILES:
        shutil.copy(DEMO_MODEL_DIR / name, out / name)
    return out


def load_base(path: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa").eval()


def tokenizer(path: Path):
    return AutoTokenizer.from_pretrained(path)


def make_adapter(
    base_path: Path,
    out: Path,
    num_virtual_tokens: int,
    kind: str = "random",
    seed: int = 0,
) -> Path:
    """kind: random | zero | projection | trained."""
    torch.manual_seed(seed)
    config = PrefixTuningConfig(
        task_type=TaskType.CAUSAL_LM,
        num_virtual_tokens=num_virtual_tokens,
        prefix_projection=kind in ("projection", "trained"),
        encoder_hidden_size=24,
        init_weights="zero" if kind == "zero" else None,
    )
    model = get_peft_model(load_base(base_path), config)
    if kind == "random":
        with torch.no_grad():
            for p in model.prompt_encoder.parameters():
                p.normal_(0.0, 1.0)
    if kind == "trained":
        _train_a_few_steps(model, base_path)
    model.save_pretrained(out)
    return out


PROMPT_KINDS = ("prompt-random", "prompt-text", "p-mlp", "p-lstm", "prompt-trained")


def make_prompt_adapter(
    base_path: Path, out: Path, num_virtual_tokens: int, kind: str, seed: int = 0
) -> Path:
    """A PEFT prompt-learning adapter, as save_pretrained writes it. kind: one of PROMPT_KINDS."""
    torch.manual_seed(seed)
    common = {"task_type": TaskType.CAUSAL_LM, "num_virtual_tokens": num_virtual_tokens}
    if kind in ("prompt-random", "prompt-trained"):
        config = PromptTuningConfig(**common)
    elif kind == "prompt-text":
        config = PromptTuningConfig(
            **common,
            prompt_tuning_init=PromptTuningInit.TEXT,
            prompt_tuning_init_text="Answer like a pirate.",
            tokenizer_name_or_path=str(base_path),
        )
    elif kind == "p-mlp":
        config = PromptEncoderConfig(**common, encoder_hidden_size=24)
    elif kind == "p-lstm":
        config = PromptEncoderConfig(
            **common, encoder_hidden_size=16, encoder_reparameterization_type="LSTM", encoder_num_layers=2
        )
    else:
        raise ValueError(kind)
    model = get_peft_model(load_base(base_path), config)
    if kind == "prompt-trained":
        _train_a_few_steps(model, base_path)
    model.save_pretrained(out)
    return out


def _train_a_few_steps(model: PeftModel, base_path: Path, steps: int = 5) -> None:
    tok = tokenizer(base_path)
    batch = tok(["The pirate captain raised the flag."], return_tensors="pt")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(steps):
        loss = model(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def greedy_by_forward(
    model: torch.nn.Module, input_ids: list[int], max_new_tokens: int, eos: int = EOS
) -> list[int]:
    """Greedy decoding by the model's forward over the whole sequence at every step, without a cache.

    The oracle's decoder. Not `generate`: with transformers >= 5.24, `PeftModel.generate` silently drops a
    prefix adapter's prefix (tests/engine/test_upstream.py tracks it), while PEFT's forward still injects it.
    Like `generate`, it stops after the first EOS, which it includes.
    """
    ids, new = list(input_ids), []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            batch = torch.tensor([ids])
            token = int(model(input_ids=batch, attention_mask=torch.ones_like(batch)).logits[0, -1].argmax())
            new.append(token)
            ids.append(token)
            if token == eos:
                break
    return new


def peft_model(
    base_path: Path, adapter_dir: Path | None, dtype: torch.dtype = torch.float32
) -> torch.nn.Module:
    """The base model with PEFT's adapter in front (or alone for None), fp32 unless told otherwise."""
    model = load_base(base_path).to(dtype)
    return model if adapter_dir is None else PeftModel.from_pretrained(model, adapter_dir).eval()


def peft_generate(base_path: Path, adapter_dir: Path | None, prompt: str, max_new_tokens: int) -> list[int]:
    """The oracle: greedy decoding by PEFT's forward (or the plain base model's), one request at a time."""
    prompt_ids = tokenizer(base_path)(prompt)["input_ids"]
    return greedy_by_forward(peft_model(base_path, adapter_dir), prompt_ids, max_new_tokens)


def peft_last_logits(
    base_path: Path, adapter_dir: Path | None, prompt: str, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    model = peft_model(base_path, adapter_dir, dtype)
    enc = tokenizer(base_path)(prompt, return_tensors="pt")
    with torch.no_grad():
        return model(**enc).logits[0, -1].float()


def peft_logprobs(base_path: Path, adapter_dir: Path | None, token_ids: list[int]) -> torch.Tensor:
    """The oracle's log-softmax at every position of `token_ids` (row i predicts token i+1), prefix in place."""
    model = peft_model(base_path, adapter_dir)
    ids = torch.tensor([token_ids])
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0].float()
    return torch.log_softmax(logits, dim=-1)
