#!/usr/bin/env bash
# Installs Debian's headless-capable Chromium for tests/test_server_browser.py, once (idempotent).
# Needs root (or sudo) and a reachable Debian mirror; the browser test skips loudly when this fails.
set -euo pipefail
if command -v chromium >/dev/null 2>&1; then
    exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo -n"
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
$SUDO apt-get install -y -q --no-install-recommends chromium fonts-liberation
command -v chromium
