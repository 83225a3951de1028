#!/usr/bin/env bash
# The gateway's performance benchmark in one command (see BENCHMARKS.md): builds the workspace,
# provisions ONNX Runtime, the HAPT data and the Python gateway's venv (third_party/pyenv, from
# bench/requirements.txt), then runs `diredi-cloud-worker perf run` and writes
# out/perf/perf.{json,md,svg}. Extra arguments go to `perf run` (for example `--sensors 32`,
# `--format json`, `--targets rust-embedded,python-mosquitto`); `--release` as the first
# argument builds and measures the release profile instead of the dev profile.
# Needs Debian's mosquitto (apt-get install -y mosquitto), Python 3 with venv, and PyPI access
# the first time.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

profile=debug
cargo_profile=()
if [[ "${1:-}" == "--release" ]]; then
  profile=release
  cargo_profile=(--release)
  shift
fi

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
mkdir -p out/perf
"target/$profile/diredi-cloud-worker" perf run \
  --python "$venv/bin/python" \
  --json out/perf/perf.json --report out/perf/perf.md --plot out/perf/perf.svg "$@"
echo "wrote out/perf/perf.json, out/perf/perf.md, out/perf/perf.svg" >&2
