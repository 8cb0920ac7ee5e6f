"""The built-in demo model: a small GPT-2-shaped model with random weights, shipped as files."""

from pathlib import Path

DEMO_MODEL_NAME = "tiny"
DEMO_MODEL_DIR = Path(__file__).resolve().parent / "model"
