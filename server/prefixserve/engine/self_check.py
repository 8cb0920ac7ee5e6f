"""A start-up check that the served model really reads prefixes through our cache as PEFT's path does.

One prefill of a random prefix + short prompt through the engine's runner is compared with the same input
through transformers' own `DynamicCache` with PEFT's mask and positions. A model whose attention does not
follow transformers' cache interface fails here and is refused before it serves anything wrong.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from prefixserve.adapters.registry import LoadedPrefix
from prefixserve.engine.errors import UnsupportedModelError
from prefixserve.engine.model_loader import LoadedModel
from prefixserve.engine.model_runner import ModelRunner
from prefixserve.engine.sequence import SamplingParams, Sequence

_PREFIX_TOKENS = 3
_PROMPT = (5, 6, 7, 8)


@torch.inference_mode()
def check_prefix_serving(loaded: LoadedModel) -> float:
    """Return the max |Δlogit| between the two paths; raise UnsupportedModelError when they disagree."""
    shape = loaded.kv_shape
    generator = torch.Generator().manual_seed(0)
    kv = torch.randn(
        shape.num_layers, 2, shape.num_kv_heads, _PREFIX_TOKENS, shape.head_dim, generator=generator
    )
    kv = kv.to(dtype=loaded.dtype, device=loaded.device)
    vocab = loaded.model.get_input_embeddings().num_embeddings
    prompt = [t % vocab for t in _PROMPT]
    try:
        runner = ModelRunner(
            loaded.model, shape, 1, _PREFIX_TOKENS + len(prompt) + 1, loaded.dtype, loaded.device
        )
        seq = Sequence(prompt, SamplingParams(), LoadedPrefix("check", ("check",), ("",), kv), lambda e: None)
        seq.slot = 0
        ours = runner.prefill([seq])[0]
        reference = _reference_logits(loaded, kv, prompt)
    except Exception as exc:
        raise UnsupportedModelError(
            f"{loaded.name}: this model's attention cannot take a KV prefix through transformers' cache interface "
            f"({type(exc).__name__}: {exc}); it cannot be served"
        ) from exc
    delta = float((ours - reference).abs().max())
    scale = float(reference.abs().max()) or 1.0
    tolerance = 1e-3 * max(1.0, scale) if loaded.dtype == torch.float32 else 3e-2 * max(1.0, scale)
    if not delta <= tolerance:
        raise UnsupportedModelError(
            f"{loaded.name}: logits with an adapter prefix differ from transformers' reference by {delta:.3g} "
            f"(tolerance {tolerance:.3g}); this model cannot be served exactly"
        )
    return delta


def _reference_logits(loaded: LoadedModel, kv: torch.Tensor, prompt: list[int]) -> torch.Tensor:
    cache = DynamicCache(config=loaded.model.config)
    for layer in range(kv.shape[0]):
        cache.update(kv[layer, 0][None], kv[layer, 1][None], layer)
    ids = torch.tensor([prompt], device=loaded.device)
    t = kv.shape[3]
    out = loaded.model(
        input_ids=ids,
        attention_mask=torch.ones(1, t + len(prompt), dtype=torch.long, device=loaded.device),
        position_ids=torch.arange(t, t + len(prompt), device=loaded.device)[None],
        past_key_values=cache,
        use_cache=True,
    )
    return out.logits[0, -1].float()
