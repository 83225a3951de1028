#!/usr/bin/env bash
# Builds the Debian package of the gateway (target/debian/diredi-gateway_<version>-1_<arch>.deb)
# with cargo-deb, from the [package.metadata.deb] section of gateway/Cargo.toml:
#   /usr/bin/diredi-gateway, /etc/diredi/{gateway,rumqttd}.toml (conffiles),
#   /usr/share/diredi/models/hapt-student-v1.{onnx,json,probe}, /usr/lib/diredi/libonnxruntime.so.1.31.1,
#   /usr/lib/systemd/system/diredi-gateway.service, /usr/lib/sysusers.d/diredi-gateway.conf.
#
# usage: scripts/build-deb.sh [--arch x86_64|aarch64] [--no-build] [-- CARGO-DEB-ARGS...]
#   --arch      architecture of the gateway (default: this machine's). Building for another
#               architecture cross-compiles with --target, which needs that Rust target and a
#               cross linker (see cargo-deb's README, "Cross-compilation").
#   --no-build  package an already built release binary (cargo deb --no-build)
# Environment: DEB_MAINTAINER="Name <email>" overrides the maintainer field.
#
# Needs: cargo-deb (cargo install cargo-deb), the model files in onnx-models/ (made by the
# cloud worker's distil + export), and network access for scripts/fetch-onnxruntime.sh unless
# the library is already in third_party/.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}" >&2; exit 2; }

host="$(uname -m)"
[[ "$host" == arm64 ]] && host=aarch64
arch="$host"
extra=()
no_build=0
while (($#)); do
    case "$1" in
        --arch) (($# >= 2)) || usage; arch="$2"; shift ;;
        --arch=*) arch="${1#--arch=}" ;;
        --no-build) no_build=1 ;;
        -h|--help) usage ;;
        --) shift; extra=("$@"); break ;;
        *) echo "build-deb: unknown argument '$1'" >&2; usage ;;
    esac
    shift
done

# Debian architecture, Rust target and cargo-deb variant for each supported gateway arch.
case "$arch" in
    x86_64) deb_arch=amd64; rust_target=x86_64-unknown-linux-gnu; variant="" ;;
    aarch64) deb_arch=arm64; rust_target=aarch64-unknown-linux-gnu; variant=arm64 ;;
    *) echo "build-deb: no package layout for arch '$arch' (expected x86_64 or aarch64)" >&2; exit 2 ;;
esac

# The model is not built here: it comes out of the cloud worker and must be signed.
missing=()
for f in onnx-models/hapt-student-v1.onnx onnx-models/hapt-student-v1.json onnx-models/hapt-student-v1.probe; do
    [[ -f "$f" ]] || missing+=("$f")
done
if ((${#missing[@]})); then
    echo "build-deb: missing model file(s): ${missing[*]}" >&2
    echo "build-deb: produce and sign them with diredi-cloud-worker (distil, then export) before packaging" >&2
    exit 1
fi

if ! cargo deb --version >/dev/null 2>&1; then
    echo "build-deb: cargo-deb is not installed; install it with: cargo install cargo-deb" >&2
    exit 1
fi

scripts/fetch-onnxruntime.sh --arch "$arch"
lib="third_party/onnxruntime/linux-$arch/libonnxruntime.so.1.31.1"
if [[ ! -f "$lib" ]]; then
    echo "build-deb: $lib is missing after fetch-onnxruntime.sh" >&2
    exit 1
fi

args=(-p diredi-gateway)
[[ -n "$variant" ]] && args+=(--variant "$variant")
[[ "$arch" != "$host" ]] && args+=(--target "$rust_target")
((no_build)) && args+=(--no-build)
[[ -n "${DEB_MAINTAINER:-}" ]] && args+=(--maintainer "$DEB_MAINTAINER")

echo "build-deb: cargo deb ${args[*]} ${extra[*]}"
out="$(cargo deb "${args[@]}" "${extra[@]}" | tail -n 1)"
if [[ ! -f "$out" ]]; then
    echo "build-deb: cargo deb did not report a package file (last line: '$out')" >&2
    exit 1
fi

# The package must be for the requested architecture and hold the files the unit expects.
found_arch="$(dpkg-deb -f "$out" Architecture)"
if [[ "$found_arch" != "$deb_arch" ]]; then
    echo "build-deb: $out is for '$found_arch', expected '$deb_arch'" >&2
    exit 1
fi
listing="$(dpkg-deb -c "$out")"
status=0
for path in ./usr/bin/diredi-gateway ./etc/diredi/gateway.toml ./etc/diredi/rumqttd.toml \
        ./usr/share/diredi/models/hapt-student-v1.onnx ./usr/share/diredi/models/hapt-student-v1.json \
        ./usr/share/diredi/models/hapt-student-v1.probe \
        ./usr/lib/diredi/libonnxruntime.so.1.31.1 ./usr/lib/systemd/system/diredi-gateway.service \
        ./usr/lib/sysusers.d/diredi-gateway.conf; do
    if ! grep -q " $path\$" <<<"$listing"; then
        echo "build-deb: $out lacks $path" >&2
        status=1
    fi
done
# The packaged library must be the one of the package's architecture (ELF e_machine, bytes
# 18-19: 0x3e x86-64, 0xb7 AArch64).
unpacked="$(mktemp -d)"
trap 'rm -rf "$unpacked"' EXIT
dpkg-deb -x "$out" "$unpacked"
machine="$(od -An -tx1 -j18 -N2 "$unpacked/usr/lib/diredi/libonnxruntime.so.1.31.1" | tr -d ' \n')"
case "$deb_arch:$machine" in
    amd64:3e00|arm64:b700) ;;
    *) echo "build-deb: packaged libonnxruntime has ELF machine 0x$machine, wrong for $deb_arch" >&2; status=1 ;;
esac
((status == 0)) || exit 1
echo "build-deb: built $out"
