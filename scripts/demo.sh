#!/usr/bin/env bash
# The main job, on the embedded default: the gateway (with its embedded rumqttd broker) serves
# the shipped, signed HAPT student over MQTT, and a replay of a real HAPT user's recordings
# arrives as a sensor; results are printed live, then scored against the dataset's labels.
#
#   scripts/demo.sh                 # user 2, session 1, 20x realtime, port 1883
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
gateway_pid=""
cleanup() {
  if [ -n "$gateway_pid" ] && kill -0 "$gateway_pid" 2>/dev/null; then
    kill -TERM "$gateway_pid" 2>/dev/null || true
    wait "$gateway_pid" 2>/dev/null || true
  fi
  rm -rf "$state"
}
trap cleanup EXIT INT TERM

# The gateway: compiled-in defaults (embedded broker), the shipped model and its publisher key.
DIREDI_GATEWAY__ID="$gw" \
DIREDI_MQTT__PORT="$port" \
DIREDI_MODEL__PATH="$root/onnx-models/hapt-student-v1.json" \
DIREDI_MODEL__TRUSTED_KEYS="$(cat onnx-models/publisher.pub)" \
DIREDI_GATEWAY__LOG_FORMAT=terminal \
  target/debug/diredi-gateway run >"$state/gateway.log" 2>&1 &
gateway_pid=$!
echo "gateway started (pid $gateway_pid, embedded broker on 127.0.0.1:$port, log $state/gateway.log)"

if ! target/debug/diredi-cloud-worker demo --gateway "$gw" --port "$port" \
    --subject "$subject" --session "$session" --speed "$speed"; then
  echo "--- gateway log ---" >&2
  tail -n 30 "$state/gateway.log" >&2
  exit 1
fi
