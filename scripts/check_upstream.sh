#!/usr/bin/env bash
# The upstream canary: the exactness, training, from-text and upstream tests against the newest releases that
# pyproject.toml's ranges allow (no lock), in a throwaway virtual environment. The locked suite in CI stays the
# gate; this is how a maintainer sees drift (a new transformers or peft) before bumping the lock.
#
#   scripts/check_upstream.sh                 torch as pinned (requirements/torch.txt), everything else newest
#   CANARY_TORCH=newest scripts/check_upstream.sh     the newest torch too (on Linux x86_64 PyPI: the CUDA build)
#   CANARY_PINS="transformers==5.23.0" scripts/check_upstream.sh     hold some packages back (an older bound)
#   scripts/check_upstream.sh -k llama        extra arguments go to pytest
#
# Prints the versions it ran with and the tests' summary; exits with pytest's status.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
venv=$(mktemp -d)/venv
trap 'rm -rf "$(dirname "$venv")"' EXIT

python3 -m venv "$venv"
pip=("$venv/bin/python" -m pip install --quiet)
if [ "${CANARY_TORCH:-pinned}" = newest ]; then
  "${pip[@]}" "torch$(python3 -c 'import re, tomllib
deps = tomllib.load(open("'"$repo"'/pyproject.toml", "rb"))["project"]["dependencies"]
print(next(re.sub(r"^torch", "", d) for d in deps if re.match(r"torch\b", d)))')"
else
  "${pip[@]}" -r "$repo/requirements/torch.txt"
fi
# shellcheck disable=SC2086  # CANARY_PINS is a list of requirement specifiers
"${pip[@]}" -e "$repo[dev]" ${CANARY_PINS:-}   # resolved now, from pyproject's ranges alone
echo "upstream canary with:"
"$venv/bin/python" -m pip list --format=freeze 2>/dev/null | grep -iE '^(torch|transformers|peft|accelerate|tokenizers|huggingface-hub)==' | sed 's/^/  /'
cd "$repo"
"$venv/bin/python" -m pytest -q -p no:cacheprovider \
  tests/engine/test_exactness.py tests/engine/test_upstream.py tests/training/test_training.py \
  tests/api/test_from_text.py tests/engine/test_transformers_warnings.py "$@"
