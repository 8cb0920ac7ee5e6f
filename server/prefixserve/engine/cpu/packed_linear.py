"""CPU kernels for the loaded model: oneDNN GEMMs on prepacked weights (post-ops in their epilogue), fused tanh-GELU.

Every linear layer runs oneDNN's GEMM on a weight prepacked once at load time.

Measured on this project's 2-core machine (bench/RESULTS.md): for a [16, 768] x [768, 3072] product, PyTorch's
default fp32 path reaches ~110-135 GFLOP/s and the prepacked oneDNN kernel ~400 (bf16: ~500 vs ~720); for a
decode step, where the batch is a few rows, the GEMMs are most of the time. Results stay fp32-exact (the
kernel computes in the weight's dtype; max error 1.8e-6 against fp64, the same as `F.linear`). This is the
kernel PyTorch's own Inductor uses for frozen CPU models; here it is applied by swapping modules, so it
works for every architecture transformers loads (`nn.Linear`, and GPT-2's `Conv1D`).
"""

from __future__ import annotations

import functools
import logging

import torch
from torch import nn

log = logging.getLogger(__name__)

_PACKING_BATCH_HINT = 16  # oneDNN picks its blocking for this batch size; measured fine from 1 to 512 rows


def packing_available(device: torch.device, dtype: torch.dtype) -> bool:
    return (
        device.type == "cpu"
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
        and _packs(dtype)
    )


@functools.cache
def _packs(dtype: torch.dtype) -> bool:
    """oneDNN packs bf16 weights only on CPUs with AVX-512 (BW/VL/DQ) or AVX-NE-CONVERT; elsewhere it raises
    at the first reorder. One tiny reorder answers it, before any of the model's weights are touched."""
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(torch.zeros(8, 8, dtype=dtype), _PACKING_BATCH_HINT)
        torch.ops.mkldnn._linear_pointwise(torch.zeros(2, 8, dtype=dtype), packed, None, "none", [], "")
    except RuntimeError as exc:
        log.info("oneDNN cannot pack %s weights on this CPU (%s): linear layers run unpacked", dtype, exc)
        return False
    return True


class PackedLinear(nn.Module):
    """y = x W^T + b with W held in oneDNN's blocked layout (inference only). `post_op` runs in the GEMM's
    epilogue: "gelu" with algorithm "tanh" (GELU's tanh approximation: the same values as the separate op, 28%
    faster for GPT-2's [2048, 768] x [768, 3072] in bf16, the output is not written and read back) or
    "swish" (SiLU); `times` multiplies the product by another tensor there."""

    def __init__(
        self, weight: torch.Tensor, bias: torch.Tensor | None, post_op: str = "none", algorithm: str = ""
    ) -> None:
        super().__init__()
        self.in_features = weight.shape[1]
        self.out_features = weight.shape[0]
        self.packed = torch.ops.mkldnn._reorder_linear_weight(
            weight.detach().contiguous(), _PACKING_BATCH_HINT
        )
        self.bias = None if bias is None else bias.detach().clone()
        self._post_op, self._algorithm = post_op, algorithm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(
            x, self.packed, self.bias, self._post_op, [], self._algorithm
        )

    def times(self, x: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        """(x W^T + b) * other, elementwise, in one pass (post_op is not applied)."""
        return torch.ops.mkldnn._linear_pointwise.binary(x, other, self.packed, self.bias, "mul")

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, packed=oneDNN, post_op={self._post_op}"


class TanhGELU(nn.Module):
    """GELU's tanh approximation in one fused kernel. transformers' `gelu_new` (GPT-2) computes the same
    formula as five elementwise ops, which in bf16 on a CPU took 60% of a 2048-token prefill step; the two
    agree to fp32 rounding (transformers' own GELUTanh says as much)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.gelu(x, approximate="tanh")
