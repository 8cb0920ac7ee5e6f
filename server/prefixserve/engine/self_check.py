"""A start-up check that the served model really reads prefixes through our paged cache as PEFT's path does.

Rows with random prefixes of different lengths (and one without an adapter) go through the engine's runner:
two prompts in one prefill step, then a step where those two decode while the third joins with its prompt.
Each row's logits are compared with transformers' own path (`DynamicCache` holding the prefix, PEFT's
positions). A model whose attention does not follow transformers' interface fails here and is refused
before it serves anything wrong.
"""

from __future__ import annotations

import torch

from prefixserve.adapters.kv_prefix import LoadedPrefix
from prefixserve.engine.block_manager import BlockManager
from prefixserve.engine.errors import UnsupportedModelError
from prefixserve.engine.hf_cache import cache_kwargs, prefilled_cache
from prefixserve.engine.kv_cache import KVPool
from prefixserve.engine.model_loader import LoadedModel
from prefixserve.engine.model_runner import ModelRunner
from prefixserve.engine.scheduler import ScheduledRow, SchedulerOutput
from prefixserve.engine.sequence import SamplingParams, Sequence

# (virtual tokens, prompt); blocks of 4 tokens so that prefixes and rows span partial blocks. Token ids are
# reduced modulo the vocabulary.
_ROWS = ((3, (5, 6, 7, 8)), (5, (9, 10)), (0, (11, 12, 13)))
_BLOCK = 4


@torch.inference_mode()
def check_prefix_serving(loaded: LoadedModel) -> float:
    """Return the max |Δlogit| between the two paths; raise UnsupportedModelError when they disagree."""
    shape = loaded.kv_shape
    generator = torch.Generator().manual_seed(0)
    vocab = loaded.model.get_input_embeddings().num_embeddings
    seqs = []
    for n, (t, prompt) in enumerate(_ROWS):
        kv = torch.randn(shape.num_layers, 2, shape.num_kv_heads, t, shape.head_dim, generator=generator)
        kv = kv.to(dtype=loaded.dtype, device=loaded.device)
        prefix = LoadedPrefix("check", (f"check{n}",), (str(n),), kv) if t else None
        seqs.append(Sequence([p % vocab for p in prompt], SamplingParams(), prefix, lambda e: None))
    try:
        runner = ModelRunner(loaded.model, KVPool(shape, 16, _BLOCK, loaded.dtype, loaded.device))
        blocks = BlockManager(16, _BLOCK)
        deltas = []
        first = run_rows(runner, blocks, [(s, len(s.prompt_ids)) for s in seqs[:2]])
        for seq, logits in zip(seqs, first, strict=False):
            deltas.append(_max_delta(logits, _reference_logits(loaded, seq), loaded.dtype))
            seq.append_output(int(logits.argmax()))
        second = run_rows(runner, blocks, [(seqs[0], 1), (seqs[1], 1), (seqs[2], len(seqs[2].prompt_ids))])
        for seq, logits in zip(seqs, second, strict=True):
            deltas.append(_max_delta(logits, _reference_logits(loaded, seq), loaded.dtype))
    except Exception as exc:
        raise UnsupportedModelError(
            f"{loaded.name}: this model's attention cannot take a KV prefix through transformers' attention "
            f"interface ({type(exc).__name__}: {exc}); it cannot be served"
        ) from exc
    delta, tolerance = max(d for d, _ in deltas), min(t for _, t in deltas)
    if not delta <= tolerance:
        raise UnsupportedModelError(
            f"{loaded.name}: logits with an adapter prefix differ from transformers' reference by {delta:.3g} "
            f"(tolerance {tolerance:.3g}); this model cannot be served exactly"
        )
    return delta


def run_rows(runner: ModelRunner, blocks: BlockManager, rows: list[tuple[Sequence, int]]) -> torch.Tensor:
    """One step over `rows` (sequence, tokens to feed) outside any scheduler: for checks and tests."""
    out = SchedulerOutput()
    for seq, n in rows:
        if seq.prefix is not None and seq.blocks.prefix_key is None:
            fill = blocks.acquire_prefix(seq.blocks, seq.prefix_key, seq.num_virtual_tokens)
            assert fill is not None, "the check's pool is too small"
            if fill:
                out.prefix_fills.append((fill, seq.prefix))
        assert blocks.grow(seq.blocks, seq.num_computed + n), "the check's pool is too small"
        out.rows.append(ScheduledRow(seq, n))
    logits = runner.run(out).sampling.float()
    for seq, n in rows:
        seq.num_computed += n
    return logits


def _max_delta(ours: torch.Tensor, reference: torch.Tensor, dtype: torch.dtype) -> tuple[float, float]:
    """The difference and what it may be: batching changes reduction order, which half precision magnifies."""
    scale = max(1.0, float(reference.abs().max()))
    tolerance = (1e-3 if dtype == torch.float32 else 3e-2) * scale
    return float((ours - reference).abs().max()), tolerance


def _reference_logits(loaded: LoadedModel, seq: Sequence) -> torch.Tensor:
    """transformers' own path, as PEFT drives it: a DynamicCache holding the prefix, positions from T."""
    cache = prefilled_cache(loaded.model.config, None if seq.prefix is None else seq.prefix.kv)
    t = seq.num_virtual_tokens
    ids = torch.tensor([seq.token_ids], device=loaded.device)
    out = loaded.model(
        input_ids=ids,
        attention_mask=torch.ones(1, t + ids.shape[1], dtype=torch.long, device=loaded.device),
        position_ids=torch.arange(t, t + ids.shape[1], device=loaded.device)[None],
        use_cache=True,
        **cache_kwargs(loaded.model, cache),
    )
    return out.logits[0, -1].float()
