#!/usr/bin/env bash
# The main job: a doctr-style training script run unpatched, patched and hand-fixed, side by side, with numbers.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python examples/demo.py "$@"
