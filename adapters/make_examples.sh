#!/usr/bin/env bash
# Remake the example adapters in this directory from data/*.jsonl with `prefixserve train`.
# About a minute and a half on one CPU thread; the results are deterministic for a given torch build.
#   pip install -e ".[train]" && adapters/make_examples.sh
set -euo pipefail
cd "$(dirname "$0")"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

# The demo model has random weights with tiny logits, so these adapters were trained longer and at a higher
# learning rate (2e-2, 800-1200 steps) than the defaults (1e-2, at least 500 steps), which already learn.
common=(--model tiny --device cpu --dtype float32 --seed 0 --num-virtual-tokens 20 --learning-rate 2e-2)

prefixserve train "${common[@]}" --data data/pirate.jsonl --eval-file data/pirate_eval.jsonl \
  --output pirate --max-steps 1200
prefixserve train "${common[@]}" --data data/support.jsonl --output support --max-steps 1200
prefixserve train "${common[@]}" --data data/counting.jsonl --output counting --max-steps 800

# PEFT's save_pretrained also writes a model-card template; the README here describes the adapters.
rm -f pirate/README.md support/README.md counting/README.md
