#!/usr/bin/env bash
# Create .venv and install shims with its test and framework extras. Idempotent: when nothing changed since the
# last run (same pyproject.toml and this file), it only checks a stamp and returns in a second.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
STAMP=.venv/.shims-setup-stamp
WANT="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
if [ "$(cat "$STAMP" 2>/dev/null || true)" != "$WANT" ]; then
  echo "[setup] installing into .venv (first run: a few minutes)" >&2
  .venv/bin/python -m pip install -q --upgrade pip
  # torch first, the pair this machine keeps on local disk (a CUDA build that runs on the CPU)
  .venv/bin/python -m pip install -q torch==2.14.1 torchvision==0.29.1
  # an environment set up before the distribution was named torch-shims still has its editable `shims`: drop it
  .venv/bin/python -m pip uninstall -q -y shims >/dev/null 2>&1 || true
  .venv/bin/python -m pip install -q -e ".[test,frameworks]"
  echo "$WANT" > "$STAMP"
fi
# headless Chromium renders the doctor's HTML report in tests/detect/test_doctor_report.py (skipped, saying why,
# where it cannot be installed): Debian's package, installed when missing and apt-get may run
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  echo "[setup] installing chromium (the HTML report test)" >&2
  (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium) >/dev/null 2>&1 \
    || echo "[setup] chromium could not be installed: the HTML report test will skip" >&2
fi
