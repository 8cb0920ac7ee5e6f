"""Prompt tuning and P-tuning served as prefixes.

PEFT puts the adapter's T virtual-token embeddings before the prompt's and runs the model over both, with
the prompt's first token at position T. Attention is causal and the virtual tokens come first, so their keys
and values depend on the adapter alone: computed once per adapter version (one forward pass over T tokens),
they are a prefix like a prefix-tuning adapter's, held in the same pool blocks and shared by every row on the
adapter. A prompt-tuning row then costs what a prefix row costs, and equals PEFT's forward: the same
positions, and architectures that scale or add to input embeddings (GPT-2's position embeddings, Gemma's
scaling) do it inside the model's forward for both.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from prefixserve.engine.hf_cache import base_model_kv

Materializer = Callable[[torch.Tensor], torch.Tensor]


def virtual_token_materializer(model: torch.nn.Module) -> Materializer:
    """For the registry: [T, hidden] virtual-token embeddings → [layers, 2, kv_heads, T, head_dim]."""
    device = next(model.parameters()).device
    dtype = model.get_input_embeddings().weight.dtype

    def materialize(embeddings: torch.Tensor) -> torch.Tensor:
        # As PEFT does: the prompt embeddings in the model's dtype, then the model's own forward.
        return base_model_kv(model, inputs_embeds=embeddings.to(device=device, dtype=dtype)[None])

    return materialize
