#!/usr/bin/env bash
# Fetches the ONNX Runtime shared library that diredi-infer loads at run time (ort `load-dynamic`)
# from the onnxruntime wheel on PyPI, checks its pinned sha256 and installs it as
#   third_party/onnxruntime/linux-<arch>/libonnxruntime.so.1.31.1
# with libonnxruntime.so.1 (its SONAME) and libonnxruntime.so symlinks beside it.
#
# usage: scripts/fetch-onnxruntime.sh [--arch x86_64|aarch64|all]    (default: this machine's arch)
# Does nothing but report when the library is already in place with the right hash.
# The wheels are manylinux_2_28: the library needs glibc 2.28 or newer on the target.
set -euo pipefail

ORT_VERSION=1.31.1
LIB="libonnxruntime.so.$ORT_VERSION"
MEMBER="onnxruntime/capi/$LIB"

# sha256 of $MEMBER in onnxruntime-1.31.1-cp311-cp311-manylinux_2_28_<arch>.whl
pinned_sha256() {
    case "$1" in
        x86_64) echo fc44112fbe06d7d689c57e11d3862031f64711007e4ee020f8eed5185fd2c1d3 ;;
        aarch64) echo 8aa3b76b28c778a2b1dd660d34161adb1d508c9ccd04ff9dc80e26eca5df8467 ;;
        *) return 1 ;;
    esac
}

usage() { echo "usage: $0 [--arch x86_64|aarch64|all]" >&2; exit 2; }

arch=""
while (($#)); do
    case "$1" in
        --arch) (($# >= 2)) || usage; arch="$2"; shift ;;
        --arch=*) arch="${1#--arch=}" ;;
        -h|--help) usage ;;
        *) echo "fetch-onnxruntime: unknown argument '$1'" >&2; usage ;;
    esac
    shift
done
host="$(uname -m)"
[[ "$host" == arm64 ]] && host=aarch64
arch="${arch:-$host}"
case "$arch" in
    all) arches=(x86_64 aarch64) ;;
    x86_64|aarch64) arches=("$arch") ;;
    *) echo "fetch-onnxruntime: no ONNX Runtime build pinned for arch '$arch' (expected x86_64, aarch64 or all)" >&2; exit 2 ;;
esac

# shellcheck source=python-env.sh
source "$(dirname "${BASH_SOURCE[0]}")/python-env.sh"
PY="$DIREDI_PYTHON"

sha256_of() {
    "$PY" -c 'import hashlib, sys; print(hashlib.sha256(open(sys.argv[1], "rb").read()).hexdigest())' "$1"
}

tmp=""
cleanup() { [[ -z "$tmp" ]] || rm -rf "$tmp"; }
trap cleanup EXIT

fetch_one() {
    local a="$1" want dest lib found wheel
    want="$(pinned_sha256 "$a")"
    dest="$DIREDI_REPO_ROOT/third_party/onnxruntime/linux-$a"
    lib="$dest/$LIB"

    if [[ -f "$lib" ]]; then
        found="$(sha256_of "$lib")"
        if [[ "$found" == "$want" ]]; then
            echo "fetch-onnxruntime: $a: $LIB already installed, sha256 matches"
            ln -sfn "$LIB" "$dest/libonnxruntime.so.1"
            ln -sfn "$LIB" "$dest/libonnxruntime.so"
            return 0
        fi
        echo "fetch-onnxruntime: $a: $lib has sha256 $found, expected $want; removing it and fetching again"
        rm -f "$lib"
    fi

    [[ -n "$tmp" ]] || tmp="$(mktemp -d)"
    local dl="$tmp/$a"
    mkdir -p "$dl"
    echo "fetch-onnxruntime: $a: downloading onnxruntime==$ORT_VERSION (manylinux_2_28_$a wheel) from PyPI"
    if ! "$PY" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
            "onnxruntime==$ORT_VERSION" --platform "manylinux_2_28_$a" --python-version 3.11 -d "$dl"; then
        echo "fetch-onnxruntime: $a: 'pip download onnxruntime==$ORT_VERSION --platform manylinux_2_28_$a' failed (is PyPI reachable?)" >&2
        return 1
    fi
    wheel="$(find "$dl" -maxdepth 1 -name "onnxruntime-$ORT_VERSION-*.whl" -print -quit)"
    if [[ -z "$wheel" ]]; then
        echo "fetch-onnxruntime: $a: pip produced no onnxruntime-$ORT_VERSION wheel in $dl" >&2
        return 1
    fi

    mkdir -p "$dest"
    # Extract to a temporary name beside the target, check the hash, then rename into place.
    local part="$dest/.$LIB.part"
    if ! "$PY" - "$wheel" "$MEMBER" "$part" <<'PYEOF'
import shutil, sys, zipfile
wheel, member, out = sys.argv[1:4]
try:
    with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(out, "wb") as dst:
        shutil.copyfileobj(src, dst)
except KeyError:
    sys.exit(f"fetch-onnxruntime: {wheel} has no member {member}")
except (OSError, zipfile.BadZipFile) as e:
    sys.exit(f"fetch-onnxruntime: cannot extract {member} from {wheel}: {e}")
PYEOF
    then
        rm -f "$part"
        return 1
    fi
    found="$(sha256_of "$part")"
    if [[ "$found" != "$want" ]]; then
        rm -f "$part"
        echo "fetch-onnxruntime: $a: $MEMBER from $(basename "$wheel"): expected sha256 $want, found $found; not installed" >&2
        return 1
    fi
    chmod 0644 "$part"
    mv -f "$part" "$lib"
    ln -sfn "$LIB" "$dest/libonnxruntime.so.1"
    ln -sfn "$LIB" "$dest/libonnxruntime.so"
    echo "fetch-onnxruntime: $a: installed $LIB (sha256 $want)"
}

for a in "${arches[@]}"; do
    fetch_one "$a"
done

for a in "${arches[@]}"; do
    lib="$DIREDI_REPO_ROOT/third_party/onnxruntime/linux-$a/$LIB"
    echo "$a: $lib"
    if [[ "$a" == "$host" ]]; then
        printf 'export ORT_DYLIB_PATH=%q\n' "$lib"
    else
        echo "  (for $a gateways: copy it there and set ORT_DYLIB_PATH to its path)"
    fi
done
