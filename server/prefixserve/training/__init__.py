"""Training PEFT prefix-tuning adapters: `prefixserve train` and its library form `train_adapter`."""

from prefixserve.training.errors import TrainingError
from prefixserve.training.train import TrainResult, train_adapter
from prefixserve.training.upload import upload_adapter

__all__ = ["TrainResult", "TrainingError", "train_adapter", "upload_adapter"]
