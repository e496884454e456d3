#!/usr/bin/env bash
# The browser tests drive the system's Chromium through Playwright (Playwright's own browser download may be out of
# reach). Install Debian's where apt can; elsewhere the tests skip and say how to get one. Quick when it is there.
set -uo pipefail

if command -v chromium >/dev/null 2>&1 || [ -n "${RANKLOOP_CHROMIUM:-}" ]; then
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "==> no chromium and no apt-get: the browser tests will skip (set RANKLOOP_CHROMIUM to a Chromium binary)"
  exit 0
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then SUDO="sudo -n"; else
    echo "==> chromium missing and not root: \`sudo apt-get install chromium\` runs the browser tests; they skip now"
    exit 0
  fi
fi
echo "==> installing chromium (apt) for the browser tests"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get install -y -q chromium >/dev/null 2>&1 \
  || { $SUDO apt-get update -q >/dev/null 2>&1 && $SUDO apt-get install -y -q chromium >/dev/null 2>&1; } \
  || echo "==> chromium could not be installed: the browser tests will skip"
exit 0
