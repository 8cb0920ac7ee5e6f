"""An adapter's K/V prefix: the base model's key/value geometry (`KVShape`), the conversion between PEFT's
`prompt_embeddings` rows and per-layer keys/values, and `LoadedPrefix`, a prefix ready on the device, which
the registry makes and the engine serves.

Layout of a prefix: [layers, 2, kv_heads, virtual tokens, head_dim] (key/value, as in PEFT's
`past_key_values` split per layer); prefix keys carry no rotary embedding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from prefixserve.adapters.ids import COMPOSE_SEPARATOR


@dataclass(frozen=True)
class KVShape:
    """The base model's geometry that an adapter must match: its key/value layout, and (for prompt kinds,
    whose virtual tokens are input embeddings) its hidden size."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int

    @property
    def token_width(self) -> int:
        """Width of one row of `prompt_embeddings`."""
        return self.num_layers * 2 * self.num_kv_heads * self.head_dim


@dataclass(frozen=True)
class LoadedPrefix:
    """An adapter (or a composition of adapters) ready for the engine."""

    namespace: str
    adapter_ids: tuple[str, ...]
    sha256: tuple[str, ...]
    kv: torch.Tensor  # [layers, 2, kv_heads, num_virtual_tokens, head_dim], model dtype, on device
    method: str = "prefix-tuning"  # format.METHODS; a composition's is its parts' (they are all alike)
    # Prompt kinds: the virtual tokens' input embeddings, which a composition runs the model over again.
    embeddings: torch.Tensor | None = None

    @property
    def name(self) -> str:
        return COMPOSE_SEPARATOR.join(self.adapter_ids)

    @property
    def num_virtual_tokens(self) -> int:
        return int(self.kv.shape[3])

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()


def embeddings_to_kv(embeddings: torch.Tensor, shape: KVShape) -> torch.Tensor:
    """[T, L*2*H*D] → [L, 2, H, T, D] (layer, key/value, head, virtual token, channel), a view of `embeddings`:
    the pool's copy reads it in place (a contiguous copy first cost 1-2 ms of a 1.5 MB adapter's load, on
    memory fresh from the allocator)."""
    t = embeddings.shape[0]
    kv = embeddings.view(t, shape.num_layers, 2, shape.num_kv_heads, shape.head_dim)
    return kv.permute(1, 2, 3, 0, 4)


def kv_to_embeddings(kv: torch.Tensor) -> torch.Tensor:
    """Inverse of `embeddings_to_kv`: [L, 2, H, T, D] → [T, L*2*H*D]."""
    t = kv.shape[3]
    return kv.permute(3, 0, 1, 2, 4).reshape(t, -1).contiguous()
