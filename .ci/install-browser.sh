#!/usr/bin/env bash
# Installs what the browser tests (pytest -m browser) need: Debian's chromium at
# /usr/bin/chromium and Playwright for Python, which drives it. Playwright never
# downloads a browser of its own here: the tests launch /usr/bin/chromium.
# Idempotent and quiet: does nothing when both are present. PYTHON picks the interpreter
# (default: python3 on PATH, e.g. the activated virtualenv).
set -euo pipefail

PYTHON="${PYTHON:-python3}"
log="$(mktemp)"
trap 'rm -f "$log"' EXIT

if [ ! -x /usr/bin/chromium ]; then
    sudo_cmd=""
    if [ "$(id -u)" -ne 0 ]; then sudo_cmd="sudo"; fi
    if ! { $sudo_cmd apt-get update -qq && \
           DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq --no-install-recommends \
               chromium fonts-dejavu-core; } >"$log" 2>&1; then
        cat "$log" >&2
        echo "install-browser: apt-get install chromium failed" >&2
        exit 1
    fi
    echo "install-browser: installed $(/usr/bin/chromium --version 2>/dev/null | head -n1)"
fi

if ! "$PYTHON" -c "import playwright.sync_api" >/dev/null 2>&1; then
    if ! "$PYTHON" -m pip install --quiet --disable-pip-version-check "playwright>=1.40" >"$log" 2>&1; then
        cat "$log" >&2
        echo "install-browser: pip install playwright failed" >&2
        exit 1
    fi
    echo "install-browser: installed playwright $("$PYTHON" -c 'import importlib.metadata as m; print(m.version("playwright"))')"
fi
