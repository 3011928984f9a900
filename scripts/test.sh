#!/usr/bin/env bash
# The test command: set up .venv if needed, then run the whole suite (arguments go to pytest).
set -euo pipefail
cd "$(dirname "$0")/.."
# doctr imports albumentations, which otherwise asks the network for a newer version at import
export NO_ALBUMENTATIONS_UPDATE=1
bash scripts/setup.sh
exec .venv/bin/python -m pytest "$@"
