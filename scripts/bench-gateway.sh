#!/usr/bin/env bash
# The gateway's performance benchmark in one command (see BENCHMARKS.md): builds the workspace,
# provisions ONNX Runtime, the HAPT data and the Python gateway's venv (third_party/pyenv, from
# bench/requirements.txt), then runs `diredi-cloud-worker perf run` and writes
# out/perf/perf.{json,md,svg}.
#
# usage: scripts/bench-gateway.sh [--release | --release-gateway] [--sweep] [PERF-ARGS...]
#   --release          build and measure everything in the release profile (default: dev)
#   --release-gateway  only the measured gateway binary in the release profile (what a board
#                      runs); the harness, the load generator and the references stay dev
#   --sweep            the scaling curves (`perf sweep`: sensors, ONNX Runtime threads, workers,
#                      micro-batch, payload format) instead, into out/perf/sweep.{json,md,svg}
# Extra arguments go to `perf run` / `perf sweep` (for example `--sensors 32`, `--format json`,
# `--targets rust-embedded,python-mosquitto`, `--curves sensors`).
# Needs Debian's mosquitto (apt-get install -y mosquitto), Python 3 with venv, and PyPI access
# the first time.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

profile=debug
cargo_profile=()
gateway_release=0
sweep=0
while (($#)); do
  case "$1" in
    --release) profile=release; cargo_profile=(--release) ;;
    --release-gateway) gateway_release=1 ;;
    --sweep) sweep=1 ;;
    *) break ;;
  esac
  shift
done

if ! command -v mosquitto >/dev/null 2>&1 && [ ! -x /usr/sbin/mosquitto ]; then
  echo "mosquitto is missing: install it with 'apt-get install -y mosquitto'" >&2
  exit 1
fi

scripts/fetch-onnxruntime.sh
scripts/fetch-hapt.sh
ORT_DYLIB_PATH="$root/third_party/onnxruntime/linux-$(uname -m)/libonnxruntime.so.1.31.1"
export ORT_DYLIB_PATH

venv="$root/third_party/pyenv"
if ! "$venv/bin/python" -c 'import paho.mqtt, onnxruntime, numpy' >/dev/null 2>&1; then
  echo "bench-gateway: creating $venv from bench/requirements.txt" >&2
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r bench/requirements.txt
fi

cargo build --workspace "${cargo_profile[@]}"
gateway=()
if ((gateway_release)); then
  cargo build --release -p diredi-gateway
  gateway=(--gateway-bin "$root/target/release/diredi-gateway")
fi
mkdir -p out/perf
if ((sweep)); then
  "target/$profile/diredi-cloud-worker" perf sweep "${gateway[@]}" --targets rust-mosquitto \
    --max-seconds 5 --seconds 5 \
    --json out/perf/sweep.json --report out/perf/sweep.md --plot out/perf/sweep.svg "$@"
  echo "wrote out/perf/sweep.json, out/perf/sweep.md, out/perf/sweep.svg" >&2
  exit 0
fi
"target/$profile/diredi-cloud-worker" perf run "${gateway[@]}" --sustain-seconds 5 \
  --python "$venv/bin/python" \
  --json out/perf/perf.json --report out/perf/perf.md --plot out/perf/perf.svg "$@"
echo "wrote out/perf/perf.json, out/perf/perf.md, out/perf/perf.svg" >&2
