#!/usr/bin/env bash
# The main job: a doctr-style training script run unpatched, patched and hand-fixed, side by side, with numbers.
set -euo pipefail
cd "$(dirname "$0")/.."
# doctr imports albumentations, which otherwise asks the network for a newer version at import
export NO_ALBUMENTATIONS_UPDATE=1
bash scripts/setup.sh
exec .venv/bin/python examples/demo.py "$@"
