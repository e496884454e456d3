#!/usr/bin/env bash
# `apt_install.sh COMMAND PACKAGE PURPOSE`: install Debian's PACKAGE where COMMAND is missing and apt can, for tests
# that use a system program (Chromium for the browser tests, nginx for the replicas test, redis-server for the tests
# against Redis 7). Where it cannot, it says how and exits 0: those tests skip. Quick when the command is there.
set -uo pipefail
COMMAND=$1 PACKAGE=$2 PURPOSE=$3

if command -v "$COMMAND" >/dev/null 2>&1; then
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "==> no $COMMAND and no apt-get: install $PACKAGE for $PURPOSE"
  exit 0
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then SUDO="sudo -n"; else
    echo "==> $COMMAND missing and not root: \`sudo apt-get install $PACKAGE\` for $PURPOSE"
    exit 0
  fi
fi
echo "==> installing $PACKAGE (apt) for $PURPOSE"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get install -y -q "$PACKAGE" >/dev/null 2>&1 \
  || { $SUDO apt-get update -q >/dev/null 2>&1 && $SUDO apt-get install -y -q "$PACKAGE" >/dev/null 2>&1; } \
  || echo "==> $PACKAGE could not be installed: no $PURPOSE"
exit 0
