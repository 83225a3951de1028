#!/usr/bin/env bash
# The main job, on the embedded default: the whole DiReDi cycle on one machine.
#
#   1. The gateway (with its embedded rumqttd broker) serves the shipped, signed HAPT student.
#   2. A replay of a real HAPT user's recordings arrives as a sensor; the results are printed
#      live and scored against the dataset's labels (`diredi-cloud-worker demo`).
#   3. The user's side (`diredi-cloud-worker cycle`): the user's test windows are scored, the
#      user's exclusive windows arrive with labels (they stay in the gateway's store),
#      `{"cmd":"adapt"}` makes the gateway adapt locally and send only the knowledge to the
#      cloud worker (`diredi-cloud-worker serve`, on the same broker), which updates its
#      teacher, re-distils, gates, signs and dispatches a new model; the gateway verifies and
#      installs it; the test windows are scored again. It prints the accuracy before and
#      after and the bytes that left the gateway.
#
#   scripts/demo.sh                 # user 2, port 1883
#   DEMO_SUBJECT=9 DEMO_PORT=1884 DEMO_SPEED=50 scripts/demo.sh
#
# Provisioning (ONNX Runtime, the data) happens on the first run; nothing else is needed.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

port="${DEMO_PORT:-1883}"
subject="${DEMO_SUBJECT:-2}"
session="${DEMO_SESSION:-1}"
speed="${DEMO_SPEED:-20}"
gw="demo"

scripts/fetch-onnxruntime.sh
scripts/fetch-hapt.sh
cargo build --locked --workspace --bins
export ORT_DYLIB_PATH="$root/third_party/onnxruntime/linux-$(uname -m)/libonnxruntime.so.1.31.1"

state="$(mktemp -d)"
pids=()
cleanup() {
  for pid in "${pids[@]}"; do
    if kill -0 "$pid" 2>/dev/null; then
      kill -TERM "$pid" 2>/dev/null || true
      wait "$pid" 2>/dev/null || true
    fi
  done
  rm -rf "$state"
}
trap cleanup EXIT INT TERM
show_logs() {
  echo "--- gateway log ---" >&2; tail -n 30 "$state/gateway.log" >&2
  echo "--- cloud worker log ---" >&2; tail -n 30 "$state/worker.log" >&2
}

# The cloud worker signs with a key of its own (generated here); the gateway trusts it and
# the publisher of the shipped model.
target/debug/diredi-cloud-worker keygen --out "$state/worker" >/dev/null

echo "== 1. gateway: embedded broker on 127.0.0.1:$port, shipped model v1"
DIREDI_GATEWAY__ID="$gw" \
DIREDI_MQTT__PORT="$port" \
DIREDI_MODEL__PATH="$root/onnx-models/hapt-student-v1.json" \
DIREDI_MODEL__TRUSTED_KEYS="$(cat onnx-models/publisher.pub),$(cat "$state/worker.pub")" \
DIREDI_LEARNING__STATE_DIR="$state/gateway" \
DIREDI_METRICS__INTERVAL_S=1 \
DIREDI_GATEWAY__LOG_FORMAT=terminal \
  target/debug/diredi-gateway run >"$state/gateway.log" 2>&1 &
pids+=($!)

echo "== 2. a replay of user $subject's session $session, live results"
if ! target/debug/diredi-cloud-worker demo --gateway "$gw" --port "$port" \
    --subject "$subject" --session "$session" --speed "$speed" --show 20; then
  show_logs
  exit 1
fi

echo
echo "== 3. the DiReDi cycle: cloud worker on the same broker, the user's labels, adapt"
target/debug/diredi-cloud-worker serve --port "$port" --key "$state/worker.key" \
  --state-dir "$state/cloud" >"$state/worker.log" 2>&1 &
pids+=($!)
if ! target/debug/diredi-cloud-worker cycle --gateway "$gw" --port "$port" \
    --subject "$subject" --json "$state/cycle.json"; then
  show_logs
  exit 1
fi
