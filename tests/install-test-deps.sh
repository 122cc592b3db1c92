#!/usr/bin/env bash
# System tools the test suite uses besides Python packages: the official BIDS validator (npm,
# 1.x runs on Node 20) and headless Chromium for the HTML-report tests. Idempotent.
set -euo pipefail
if ! command -v bids-validator >/dev/null 2>&1; then
    npm install -g --silent bids-validator@1
fi
if ! command -v chromium >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
fi
