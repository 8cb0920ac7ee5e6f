"""Training PEFT prompt-learning adapters (prefix tuning, prompt tuning, P-tuning): `prefixserve train` and its library form `train_adapter`.

Names load lazily, so importing `prefixserve.training.cli` (typer only) does not import torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from prefixserve.training.errors import TrainingError
    from prefixserve.training.options import TrainOptions
    from prefixserve.training.train import TrainResult, train_adapter
    from prefixserve.training.upload import upload_adapter

__all__ = ["TrainOptions", "TrainResult", "TrainingError", "train_adapter", "upload_adapter"]
_HOMES = {
    "TrainingError": "errors",
    "TrainOptions": "options",
    "TrainResult": "train",
    "train_adapter": "train",
    "upload_adapter": "upload",
}


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'prefixserve.training' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"prefixserve.training.{_HOMES[name]}"), name)
