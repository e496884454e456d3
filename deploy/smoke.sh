#!/usr/bin/env bash
# Prove `make run` from this checkout: start the stack on the embedded defaults, wait until it is healthy, ask for
# four candidates, check them, stop everything. CI runs it after `make test`, in its fresh clone.
set -euo pipefail
cd "$(dirname "$0")/.."

export RANKLOOP_PORT=${SMOKE_PORT:-8765}
export RANKLOOP_REDIS_PORT=${SMOKE_REDIS_PORT:-6765}
url="http://127.0.0.1:$RANKLOOP_PORT"
log=$(mktemp)

setsid make run >"$log" 2>&1 &
stack=$!
stop() {
  kill -TERM -- "-$stack" 2>/dev/null || true
  wait "$stack" 2>/dev/null || true
}
trap stop EXIT

echo "smoke: waiting for $url/healthz (log: $log)"
for _ in $(seq 1 900); do
  if curl -sf "$url/healthz" >/dev/null; then break; fi
  if ! kill -0 "$stack" 2>/dev/null; then
    tail -50 "$log"
    echo "smoke: make run exited before the server was ready" >&2
    exit 1
  fi
  sleep 1
done

reply=$(curl -sf "$url/v1/chat/completions" -H 'content-type: application/json' \
  -d '{"messages": [{"role": "user", "content": "Name three colours of the rainbow."}], "n": 4, "max_tokens": 32}')
echo "$reply" | .venv/bin/python -c '
import json, sys
reply = json.load(sys.stdin)
answers = [c["message"]["content"] for c in reply["choices"]]
assert len(answers) == 4 and all(a.strip() for a in answers), answers
print("smoke: %s from %s: 4 answers, e.g. %r" % (reply["id"], reply["policy_version"], answers[0]))
'

# Rank the answers; the consumer `make run` started must move the ranking into the dataset.
id=$(echo "$reply" | .venv/bin/python -c 'import json, sys; print(json.load(sys.stdin)["id"])')
accepted=$(curl -sf "$url/v1/feedback" -H 'content-type: application/json' \
  -d "{\"comparison_id\": \"$id\", \"ranking\": [2, [0, 3], 1], \"user\": \"smoke\"}")
echo "smoke: ranking accepted: $accepted"
for _ in $(seq 1 30); do
  rankings=$(.venv/bin/rankloop feedback stats --json | .venv/bin/python -c 'import json, sys; print(json.load(sys.stdin)["dataset"]["ranking"])')
  if [ "$rankings" -ge 1 ]; then break; fi
  sleep 1
done
if [ "$rankings" -lt 1 ]; then
  echo "smoke: the ranking did not reach the dataset" >&2
  exit 1
fi
echo "smoke: the dataset holds $rankings ranking(s)"

# The learner daemon `make run` started reports what it is doing (waiting for enough rankings).
for _ in $(seq 1 120); do
  if status=$(.venv/bin/rankloop learn status 2>&1); then
    echo "smoke: learner: $status"
    exit 0
  fi
  sleep 1
done
echo "smoke: the learner never reported ($status)" >&2
exit 1
