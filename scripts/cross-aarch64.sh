#!/usr/bin/env bash
# Cross-compiles the gateway for 64-bit ARM (Raspberry Pi 4/5 and similar, aarch64 Linux with
# glibc ≥ 2.28) and smoke-tests the binary under qemu-user: it loads the shipped model into the
# aarch64 ONNX Runtime library of the same PyPI release and runs it on the model's probe windows
# (`diredi-gateway validate --smoke`).
#
# usage: scripts/cross-aarch64.sh [--no-build] [--profile release|dev]
#   --no-build  smoke-test an already built binary
#   --profile   cargo profile (default release: what a board runs)
#
# Needs (Debian): apt-get install -y gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user
# and the Rust target: rustup target add aarch64-unknown-linux-gnu
# Output: target/aarch64-unknown-linux-gnu/<profile>/diredi-gateway, and the smoke report on
# standard output.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

TARGET=aarch64-unknown-linux-gnu
SYSROOT=/usr/aarch64-linux-gnu
build=1
profile=release
while (($#)); do
    case "$1" in
        --no-build) build=0 ;;
        --profile) (($# >= 2)) || { echo "cross-aarch64: --profile needs a value" >&2; exit 2; }
                   profile="$2"; shift ;;
        *) echo "usage: $0 [--no-build] [--profile release|dev]" >&2; exit 2 ;;
    esac
    shift
done

missing=()
command -v aarch64-linux-gnu-gcc >/dev/null 2>&1 || missing+=(gcc-aarch64-linux-gnu libc6-dev-arm64-cross)
command -v qemu-aarch64 >/dev/null 2>&1 || missing+=(qemu-user)
if ((${#missing[@]})); then
    echo "cross-aarch64: missing ${missing[*]}: apt-get install -y ${missing[*]}" >&2
    exit 1
fi
if ! rustup target list --installed 2>/dev/null | grep -qx "$TARGET"; then
    echo "cross-aarch64: the Rust target is missing: rustup target add $TARGET" >&2
    exit 1
fi

scripts/fetch-onnxruntime.sh --arch aarch64

if ((build)); then
    # The linker for the final binary, and the C compiler for crates that build C (ring).
    export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
    export CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc
    export AR_aarch64_unknown_linux_gnu=aarch64-linux-gnu-ar
    cargo build --locked --profile "$profile" --target "$TARGET" -p diredi-gateway
fi

dir="$profile"
[[ "$profile" == dev ]] && dir=debug
bin="target/$TARGET/$dir/diredi-gateway"
[[ -x "$bin" ]] || { echo "cross-aarch64: $bin is missing (run without --no-build)" >&2; exit 1; }
file "$bin" 2>/dev/null || true

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
cat >"$tmp/gateway.toml" <<EOF
[gateway]
id = "aarch64-smoke"
[model]
path = "$root/onnx-models/hapt-student-v1.json"
trusted_keys = ["$(tr -d '\n' <onnx-models/publisher.pub)"]
[runtime]
library = "$root/third_party/onnxruntime/linux-aarch64/libonnxruntime.so.1.31.1"
EOF
# ONNX Runtime reads the CPU's description from /proc/cpuinfo (pytorch's cpuinfo library).
# qemu-user 7.2 passes the host's x86 /proc/cpuinfo through, in which cpuinfo finds no ARM
# core, and ONNX Runtime then dereferences NULL (SIGSEGV while creating the session). So the
# smoke run sees the /proc/cpuinfo of a Cortex-A72 (a Raspberry Pi 4's core) with as many
# CPUs as this machine, bind-mounted in a private mount namespace; qemu emulates a Cortex-A72.
ncpu="$(nproc)"
for ((i = 0; i < ncpu; i++)); do
    printf 'processor\t: %s\nBogoMIPS\t: 108.00\nFeatures\t: fp asimd evtstrm crc32 cpuid\n' "$i"
    printf 'CPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x0\nCPU part\t: 0xd08\n'
    printf 'CPU revision\t: 3\n\n'
done >"$tmp/cpuinfo"
printf 'Hardware\t: BCM2835\nModel\t\t: Raspberry Pi 4 Model B\n' >>"$tmp/cpuinfo"
ns=(unshare --mount)
[[ "$(id -u)" == 0 ]] || ns=(unshare --user --map-root-user --mount)
echo "cross-aarch64: qemu-aarch64 -cpu cortex-a72 $bin validate --smoke"
# shellcheck disable=SC2016 # $1 and $@ belong to the inner shell
env -u ORT_DYLIB_PATH "${ns[@]}" sh -c 'mount --bind "$1" /proc/cpuinfo && shift && exec "$@"' sh \
    "$tmp/cpuinfo" qemu-aarch64 -cpu cortex-a72 -L "$SYSROOT" "$bin" validate --smoke \
    --config "$tmp/gateway.toml"
