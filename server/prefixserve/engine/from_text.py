"""Adapters from text: the base model's keys/values for a text become a prefix (PEFT's
`initialize_kv_prefix_from_text`). Serving it equals running the base model on the text followed by the prompt,
without processing the text for every request."""

from __future__ import annotations

import torch

from prefixserve.adapters.format import PeftAdapter
from prefixserve.adapters.kv_prefix import kv_to_embeddings
from prefixserve.engine.errors import RequestValidationError
from prefixserve.engine.hf_cache import base_model_kv
from prefixserve.engine.model_loader import LoadedModel


def text_token_ids(loaded: LoadedModel, text: str, chat_template: bool) -> list[int]:
    """Tokenize as PEFT does: the text as a system message through the chat template, or the plain text."""
    tokenizer = loaded.tokenizer
    if chat_template:
        if not tokenizer.chat_template:
            raise RequestValidationError("chat_template: the base model's tokenizer has no chat template")
        ids = tokenizer.apply_chat_template(
            [{"role": "system", "content": text}],
            tokenize=True,
            add_generation_prompt=False,
            return_dict=False,
        )
        return list(ids)
    return tokenizer(text)["input_ids"]


@torch.inference_mode()
def adapter_from_text(
    loaded: LoadedModel, text: str, chat_template: bool, max_virtual_tokens: int, model_name: str
) -> PeftAdapter:
    if not text:
        raise RequestValidationError("from_text must not be empty")
    ids = text_token_ids(loaded, text, chat_template)
    if len(ids) > max_virtual_tokens:
        raise RequestValidationError(
            f"from_text is {len(ids)} tokens, above this server's limit of {max_virtual_tokens} virtual tokens "
            "(--max-virtual-tokens); shorten the text"
        )
    kv = base_model_kv(loaded.model, input_ids=torch.tensor([ids], device=loaded.device))
    shape = loaded.kv_shape
    config = {
        "peft_type": "PREFIX_TUNING",
        "task_type": "CAUSAL_LM",
        "num_virtual_tokens": len(ids),
        "num_layers": shape.num_layers,
        "num_attention_heads": shape.num_kv_heads,
        "token_dim": shape.num_kv_heads * shape.head_dim,
        "encoder_hidden_size": shape.num_kv_heads * shape.head_dim,
        "prefix_projection": False,
        "num_transformer_submodules": 1,
        "inference_mode": True,
        "base_model_name_or_path": model_name,
    }
    return PeftAdapter(config=config, embeddings=kv_to_embeddings(kv.float().cpu()))
