#!/usr/bin/env bash
# Runs every test of the project: provisioning (ONNX Runtime, HAPT data), formatting, lints,
# and the whole workspace's unit and integration tests against real brokers.
# Needs Debian's mosquitto on PATH (apt-get install -y mosquitto) for the external-broker tests.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

if ! command -v mosquitto >/dev/null 2>&1 && [ ! -x /usr/sbin/mosquitto ]; then
  echo "mosquitto is missing: install it with 'apt-get install -y mosquitto' (the tests start their own instances)" >&2
  exit 1
fi

scripts/fetch-onnxruntime.sh
scripts/fetch-hapt.sh
ORT_DYLIB_PATH="$root/third_party/onnxruntime/linux-$(uname -m)/libonnxruntime.so.1.31.1"
export ORT_DYLIB_PATH
# Tests that need the data, the library or the shipped model fail instead of skipping.
export DIREDI_REQUIRE_DATA=1

cargo fmt --all -- --check
# The systemd units: systemd-analyze verify and the sandbox exposure threshold.
if command -v systemd-analyze >/dev/null 2>&1; then
  systemd/check-units.sh
else
  echo "systemd-analyze is missing: skipping systemd/check-units.sh" >&2
fi
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo test --workspace --locked
