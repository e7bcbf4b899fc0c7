#!/usr/bin/env bash
# Installs what the browser tests (tests/web) need: Debian's chromium and the playwright Python
# package (driver only: never `playwright install`, which would download its own browsers).
# Idempotent; run inside the project's virtual environment. Needs root (or sudo) for apt-get.
set -euo pipefail
if ! command -v chromium >/dev/null 2>&1; then
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
fi
if ! python -c "import playwright" >/dev/null 2>&1; then
    python -m pip install -q playwright
fi
echo "browser tests ready: $(command -v chromium), playwright $(python -c "import importlib.metadata as m; print(m.version('playwright'))")"
