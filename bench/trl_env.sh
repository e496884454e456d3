#!/usr/bin/env bash
# A separate environment with TRL for the reward-model speed comparison (TRL is not a rankloop dependency).
# torch is pinned to the project's version, installed first, as in deploy/bootstrap.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
env=${TRL_VENV:-var/bench-trl-venv}
if [ -x "$env/bin/python" ] && "$env/bin/python" -c "import trl" 2>/dev/null; then
  echo "$env/bin/python"
  exit 0
fi
python3 -m venv "$env" >&2
"$env/bin/python" -m pip install -q --disable-pip-version-check "$(grep -E '^torch==' constraints.txt)" >&2
"$env/bin/python" -m pip install -q --disable-pip-version-check -c constraints.txt "trl==1.16.0" >&2
echo "$env/bin/python"
