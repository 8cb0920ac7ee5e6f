#!/usr/bin/env bash
# Refreshes the locks in requirements/ from pyproject.toml's ranges, or checks that they still match them:
#   requirements/lock.txt       the application: the server and `prefixserve train` (the train extra)
#   requirements/lock-dev.txt   everything CI installs (all extras: dev, train, bench), at the same versions
#   requirements/clients.txt    TGI's and LoRAX's clients, for a virtual environment of their own (clients.in)
#
#   scripts/lock.sh                 keep every locked version that still fits; add or drop what pyproject changed
#   scripts/lock.sh --upgrade       the newest versions the ranges allow (then the whole suite: a deliberate change)
#   scripts/lock.sh --upgrade-package transformers     one package (and what it needs) only
#   scripts/lock.sh --check         exit 1 when a lock no longer matches pyproject.toml (CI runs this)
#
# uv's resolver (`uv pip compile`, pinned in lock-dev.txt) writes pip-readable files with sha256 hashes, so a
# plain `pip install -r` installs them: users need neither uv nor a new workflow. One universal resolution
# serves Linux, macOS and Windows, x86_64 and arm64. torch stays out of the locks (requirements/torch.txt pins
# it), and with it the CUDA libraries that PyPI's Linux torch wheel pulls in and pins itself.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)

check=0
args=()
for a in "$@"; do
  if [ "$a" = --check ]; then check=1; else args+=("$a"); fi
done
command -v uv >/dev/null || {
  echo "scripts/lock.sh needs uv: pip install --no-deps -r requirements/lock-dev.txt (it pins uv)" >&2; exit 2; }

# Writes the three locks in the current directory's requirements/, from its pyproject.toml.
lock_all() {
  local python_version
  python_version=$(python3 -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["requires-python"].lstrip(">=~ "))')
  local common=(--universal --python-version "$python_version" --quiet -c requirements/torch.txt)
  local locked=("${common[@]}" --generate-hashes --custom-compile-command "scripts/lock.sh" --no-emit-package torch)
  # PyPI's Linux torch wheel depends on the CUDA runtime: not part of a CPU install, pinned by torch itself.
  local cuda
  cuda=$(uv pip compile pyproject.toml --all-extras "${common[@]}" "${args[@]}" \
           | grep -oE '^(nvidia-[a-z0-9-]+|cuda-[a-z0-9-]+|triton)==' | tr -d '=' || true)
  for p in $cuda; do locked+=(--no-emit-package "$p"); done
  uv pip compile pyproject.toml --all-extras "${locked[@]}" "${args[@]}" -o requirements/lock-dev.txt
  uv pip compile pyproject.toml --extra train -c requirements/lock-dev.txt "${locked[@]}" -o requirements/lock.txt
  uv pip compile requirements/clients.in "${locked[@]}" "${args[@]}" -o requirements/clients.txt
}

if [ "$check" = 0 ]; then
  cd "$repo"
  lock_all
  count() { grep -cE '^[a-z0-9]' "requirements/$1"; }
  echo "wrote requirements/lock.txt ($(count lock.txt) packages), lock-dev.txt ($(count lock-dev.txt)), clients.txt ($(count clients.txt))"
  exit 0
fi

# --check: lock a copy (keeping its versions where they still fit) and compare the pins: name, version, markers.
# Hashes and annotations alone may differ (a project can upload another wheel for a released version).
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
cp "$repo/pyproject.toml" "$tmp/"; cp -r "$repo/requirements" "$tmp/"
(cd "$tmp" && lock_all)
pins() { grep -oE '^[a-z0-9._-]+==[^ ]+( ;[^\\]*)?' "$1" || true; }
stale=0
for f in lock.txt lock-dev.txt clients.txt; do
  changed=$(diff <(pins "$repo/requirements/$f") <(pins "$tmp/requirements/$f") | grep -E '^[<>]' | sed 's/^</-/; s/^>/+/' || true)
  if [ -n "$changed" ]; then
    echo "requirements/$f does not match pyproject.toml (or requirements/torch.txt, clients.in): run scripts/lock.sh and commit the result. The pins that differ (- locked, + what pyproject asks for):" >&2
    echo "$changed" >&2
    stale=1
  elif ! diff -q "$repo/requirements/$f" "$tmp/requirements/$f" >/dev/null; then
    echo "requirements/$f: the same pins; hashes or annotations differ (scripts/lock.sh refreshes them)"
  fi
done
[ "$stale" = 0 ] && echo "requirements/lock.txt, lock-dev.txt and clients.txt match pyproject.toml"
exit "$stale"
