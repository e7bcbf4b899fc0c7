#!/usr/bin/env bash
# Installs hybridlm with its test extras (CPU torch from the pinned build), the browser the
# calculator's page is tested in (Debian chromium + playwright's driver), and runs the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q "torch==2.13.0" -e ".[test]"
bash scripts/install-browser.sh
python -m pytest "$@"
