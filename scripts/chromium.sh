#!/usr/bin/env bash
# Installs Chromium and chromedriver from Debian's packages unless both are already on PATH,
# for the web console's browser tests (chiffon-server/tests/ui_browser.rs). Idempotent: a
# second run only prints the paths. Installing needs root (or sudo) and apt-get.
#
#   scripts/chromium.sh
set -euo pipefail

have() { command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; }

if ! have; then
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "error: chromium and chromedriver are missing and apt-get is not available; install them" >&2
        exit 1
    fi
    sudo=""
    if [ "$(id -u)" -ne 0 ]; then
        if command -v sudo >/dev/null 2>&1; then sudo="sudo"; else
            echo "error: chromium and chromedriver are missing; run this as root to install them" >&2
            exit 1
        fi
    fi
    echo "installing chromium and chromium-driver from Debian's packages" >&2
    $sudo apt-get update -q >&2
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q chromium chromium-driver >&2
fi

have || { echo "error: chromium or chromedriver still missing after install" >&2; exit 1; }
command -v chromium
command -v chromedriver
