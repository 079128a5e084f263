#!/usr/bin/env bash
# Installs the system packages the test suite needs, only when missing:
# redis-server (Redis backplane tests), Node.js/npm (interop and JavaScript
# client tests), openssl (certificates for the TLS tests) and Debian's
# Chromium with its ChromeDriver (browser tests; no browser download needed).
# Silent when everything is there; fails when the node found is older than 20.
set -euo pipefail
MIN_NODE=20
need=()
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
command -v node >/dev/null 2>&1 || need+=(nodejs)
command -v npm >/dev/null 2>&1 || need+=(npm)
command -v openssl >/dev/null 2>&1 || need+=(openssl)
command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v chromedriver >/dev/null 2>&1 || need+=(chromium-driver)
if [ ${#need[@]} -gt 0 ]; then
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -q
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q -o DPkg::Lock::Timeout=300 "${need[@]}"
fi
# The JavaScript client needs Node.js >= 20 (global WebSocket, node --test); the distribution's
# nodejs may be older (Debian 12's is 18), and apt cannot fix that.
version=$(node -p 'process.versions.node' 2>/dev/null || true)
if ! [[ "${version%%.*}" =~ ^[0-9]+$ ]] || [ "${version%%.*}" -lt "$MIN_NODE" ]; then
    cat >&2 <<MSG
error: the tests need Node.js >= $MIN_NODE; found ${version:-no working node} ($(command -v node || echo 'not on PATH')).
  Debian 12's nodejs package is 18, which lacks the global WebSocket the JavaScript client uses.
  Install Node.js $MIN_NODE or newer (e.g. NodeSource's nodejs package, or nvm), put it first
  on PATH, and run make test again.
MSG
    exit 1
fi
