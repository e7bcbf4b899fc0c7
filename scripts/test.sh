#!/usr/bin/env bash
# Installs hybridlm with its test extras (CPU torch from the pinned build) and runs the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q "torch==2.13.0" -e ".[test]"
python -m pytest -q "$@"
