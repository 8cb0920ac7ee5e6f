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

# Two rows with different prefix lengths and prompt lengths (so one is padded), then one decode step:
# every path the engine takes. Token ids are reduced modulo the vocabulary.
_ROWS = ((3, (5, 6, 7, 8)), (5, (9, 10)))


@torch.inference_mode()
def check_prefix_serving(loaded: LoadedModel) -> float:
    """Return the max |Δlogit| between the two paths; raise UnsupportedModelError when they disagree."""
    shape = loaded.kv_shape
    generator = torch.Generator().manual_seed(0)
    vocab = loaded.model.get_input_embeddings().num_embeddings
    rows = []
    for t, prompt in _ROWS:
        kv = torch.randn(shape.num_layers, 2, shape.num_kv_heads, t, shape.head_dim, generator=generator)
        rows.append((kv.to(dtype=loaded.dtype, device=loaded.device), [p % vocab for p in prompt]))
    try:
        longest = max(kv.shape[3] + len(prompt) for kv, prompt in rows) + 2
        runner = ModelRunner(loaded.model, shape, len(rows), longest, loaded.dtype, loaded.device)
        seqs = []
        for slot, (kv, prompt) in enumerate(rows):
            seq = Sequence(
                prompt, SamplingParams(), LoadedPrefix("check", ("check",), ("",), kv), lambda e: None
            )
            seq.slot = slot
            seqs.append(seq)
        prefill = runner.prefill(seqs)
        for seq, logits in zip(seqs, prefill, strict=True):
            seq.output_ids.append(int(logits.argmax()) % vocab)
        decode = runner.decode(seqs)
        deltas = []
        for (kv, prompt), seq, first, second in zip(rows, seqs, prefill, decode, strict=True):
            deltas.append(_max_delta(first, _reference_logits(loaded, kv, prompt), loaded.dtype))
            deltas.append(
                _max_delta(second, _reference_logits(loaded, kv, prompt + seq.output_ids), loaded.dtype)
            )
    except Exception as exc:
        raise UnsupportedModelError(
            f"{loaded.name}: this model's attention cannot take a KV prefix through transformers' cache interface "
            f"({type(exc).__name__}: {exc}); it cannot be served"
        ) from exc
    delta, tolerance = max(d for d, _ in deltas), min(t for _, t in deltas)
    if not delta <= tolerance:
        raise UnsupportedModelError(
            f"{loaded.name}: logits with an adapter prefix differ from transformers' reference by {delta:.3g} "
            f"(tolerance {tolerance:.3g}); this model cannot be served exactly"
        )
    return delta


def _max_delta(ours: torch.Tensor, reference: torch.Tensor, dtype: torch.dtype) -> tuple[float, float]:
    """The difference and what it may be: batching changes reduction order, which half precision magnifies."""
    scale = max(1.0, float(reference.abs().max()))
    tolerance = (1e-3 if dtype == torch.float32 else 3e-2) * scale
    return float((ours - reference).abs().max()), tolerance


def _reference_logits(loaded: LoadedModel, kv: torch.Tensor, prompt: list[int]) -> torch.Tensor:
    """transformers' own path, as PEFT drives it: a DynamicCache holding the prefix, positions from T."""
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
