#!/usr/bin/env bash
# Installs what tests/test_app_browser.py needs on a fresh Debian machine: Debian's Chromium at
# /usr/bin/chromium and the playwright Python package. Safe to run again: it skips what is already there.
# It never runs `playwright install`: the test drives the system Chromium, no browser download.
# PYTHON picks the interpreter whose environment gets playwright (default: python3, else python).
set -euo pipefail

PYTHON="${PYTHON:-$(command -v python3 || command -v python)}"
SUDO=""
if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1; then
    SUDO="sudo"
fi

if [ -x /usr/bin/chromium ]; then
    echo "browser-deps: /usr/bin/chromium present ($(/usr/bin/chromium --version 2>/dev/null || echo 'version unknown'))"
else
    echo "browser-deps: installing chromium with apt-get"
    $SUDO apt-get update
    # fonts-liberation: without some font the page (and the screenshot) renders text as boxes
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium fonts-liberation
fi

if "$PYTHON" -c "import playwright.sync_api" >/dev/null 2>&1; then
    echo "browser-deps: playwright present ($("$PYTHON" -m pip show playwright 2>/dev/null | sed -n 's/^Version: //p'))"
else
    echo "browser-deps: installing playwright with pip"
    "$PYTHON" -m pip install playwright
fi

test -x /usr/bin/chromium || { echo "browser-deps: /usr/bin/chromium is still missing" >&2; exit 1; }
"$PYTHON" -c "import playwright.sync_api"
