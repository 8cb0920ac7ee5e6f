"""Training defaults, in a module without torch so that `prefixserve train --help` can show them quickly."""

# Defaults that learn on a small data set (docs/training.md, "Defaults"): PEFT's prefix-tuning recipes
# train at 1e-2 to 3e-2; and a few dozen rows are only a handful of steps per epoch, so a run without
# --epochs / --max-steps takes 3 epochs but never fewer than DEFAULT_MIN_STEPS steps.
DEFAULT_LEARNING_RATE = 1e-2
# Per --method: prefix tuning's above; prompt tuning moves input embeddings only and is usually trained
# faster (PEFT's examples: 3e-2); P-tuning's encoder is an MLP/LSTM and trains like prefix tuning's projection.
DEFAULT_LEARNING_RATES = {"prefix": DEFAULT_LEARNING_RATE, "prompt-tuning": 3e-2, "p-tuning": 1e-2}
DEFAULT_EPOCHS = 3.0
DEFAULT_MIN_STEPS = 500
