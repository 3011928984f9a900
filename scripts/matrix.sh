#!/usr/bin/env bash
# The compatibility matrix (noxfile.py), each combination in its own uv environment with shims installed from its wheel.
#   bash scripts/matrix.sh                 every combination, then the table in docs/compatibility.md
#   bash scripts/matrix.sh oldest          Python 3.9 + torch 2.0.1 only (CI); also: main, newest, or a session name
#   bash scripts/matrix.sh all -k doctr    arguments after the first go to pytest
#   MATRIX_TREE=head bash scripts/matrix.sh    the last commit instead of the working tree (noxfile.py)
# nox and uv live in a tool venv (.nox/_tools); the uv cache (UV_CACHE_DIR, default ~/.cache/uv) keeps reruns cheap.
set -euo pipefail
cd "$(dirname "$0")/.."
WHAT="${1:-all}"
[ $# -gt 0 ] && shift
export UV_CACHE_DIR="${UV_CACHE_DIR:-$HOME/.cache/uv}"
TOOLS=.nox/_tools
if [ ! -x "$TOOLS/bin/nox" ] || [ ! -x "$TOOLS/bin/uv" ]; then
  python3 -m venv "$TOOLS"
  "$TOOLS/bin/python" -m pip install -q "nox>=2024.10" "uv>=0.5"
fi
# python3.X for every version pyenv has (its shims answer only for the selected version, and uv stops at a shim)
PYTHONS=.nox/_pythons
mkdir -p "$PYTHONS"
if command -v pyenv >/dev/null 2>&1; then
  for v in 3.9 3.10 3.11 3.12 3.13; do
    d="$(ls -d "$(pyenv root)/versions/$v".* 2>/dev/null | sort -V | tail -1 || true)"
    if [ -n "$d" ] && [ -x "$d/bin/python$v" ]; then ln -sfn "$d/bin/python$v" "$PYTHONS/python$v"; fi
  done
fi
export PATH="$PWD/$PYTHONS:$PWD/$TOOLS/bin:$PATH"
case "$WHAT" in
  all) SELECT=(-t matrix) ;;
  oldest|main|newest) SELECT=(-t "$WHAT") ;;
  *) SELECT=(-s "$WHAT") ;;
esac
status=0
nox --no-color "${SELECT[@]}" -- "$@" || status=$?
if [ "$WHAT" = all ]; then
  python3 scripts/compat_table.py .nox/results --write docs/compatibility.md
else
  python3 scripts/compat_table.py .nox/results
fi
exit $status
