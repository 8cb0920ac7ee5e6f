#!/usr/bin/env bash
# Installs prefixserve with the versions CI last passed on (requirements/), into the active virtual environment,
# or into .venv (made if missing) when none is active.
#
#   scripts/install.sh            torch's CPU build, then requirements/lock.txt, then prefixserve itself
#   scripts/install.sh --cuda     torch's CUDA build (PyPI's Linux x86_64 wheel), for an NVIDIA GPU
#   scripts/install.sh --dev      requirements/lock-dev.txt instead: the test, lint and benchmark tools too
#   TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 scripts/install.sh     any other torch build
#
# Only the torch line differs by machine: which wheel is right depends on the hardware, so torch is pinned
# by version (requirements/torch.txt) and everything else by version and sha256 hash.
set -euo pipefail
cd "$(dirname "$0")/.."

lock=requirements/lock.txt
cuda=0
for a in "$@"; do
  case "$a" in
    --dev) lock=requirements/lock-dev.txt ;;
    --cuda) cuda=1 ;;
    *) echo "scripts/install.sh: unknown option $a (options: --cuda, --dev)" >&2; exit 2 ;;
  esac
done

if [ -n "${VIRTUAL_ENV:-}" ]; then
  python="$VIRTUAL_ENV/bin/python"
else
  base_python="${PYTHON:-python3}"
  "$base_python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || {
    echo "prefixserve needs Python 3.11 or newer; $base_python is $("$base_python" -V 2>&1). Set PYTHON=python3.12 (say)." >&2
    exit 2
  }
  [ -x .venv/bin/python ] || "$base_python" -m venv .venv
  python=.venv/bin/python
fi
pip=("$python" -m pip install --quiet)

# torch first: the locks leave it out, and with it in place nothing pulls in a second build.
CPU_INDEX=https://download.pytorch.org/whl/cpu
if [ -n "${TORCH_INDEX_URL:-}" ]; then
  "${pip[@]}" -r requirements/torch.txt --index-url "$TORCH_INDEX_URL"
elif [ "$cuda" = 1 ]; then
  "${pip[@]}" -r requirements/torch.txt
elif "$python" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1] + "/torch/", timeout=15)' "$CPU_INDEX" 2>/dev/null; then
  "${pip[@]}" -r requirements/torch.txt --index-url "$CPU_INDEX"
else
  # A machine that sees only PyPI or a mirror: pip's configured index may carry the CPU wheel (a wheel
  # directory, a mirror); on a stock PyPI, Linux x86_64 gets the CUDA build (it runs on a CPU as well).
  echo "$CPU_INDEX is unreachable: installing torch from pip's configured index" >&2
  "${pip[@]}" -r requirements/torch.txt
fi
# --no-deps: the lock holds every dependency, pinned and hashed; resolving again would turn a requirement
# with an extra (dataproperty needs typepy[datetime]) into one that pip, in hash mode, refuses as unpinned.
"${pip[@]}" --no-deps -r "$lock"    # every version and sha256 hash as locked
"${pip[@]}" --no-deps -e .           # prefixserve itself; its dependencies are all in place
"$python" -m pip check >/dev/null || { "$python" -m pip check >&2; exit 1; }
"$python" -c 'import prefixserve, torch
print("prefixserve", prefixserve.__version__, "with torch", torch.__version__, "(CUDA build)" if torch.version.cuda else "(CPU build)")'
# The native attention kernel, built now for this CPU (about 25 s) rather than at the first `prefixserve serve`.
# Without a C++ compiler the server serves the portable path (logged), so this never fails the install.
"$python" -c 'from prefixserve.engine.cpu.kernels import load_kernels; print("native attention kernel:", load_kernels()[1])' || true
