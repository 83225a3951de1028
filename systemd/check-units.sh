#!/usr/bin/env bash
# Checks the systemd units in this directory:
#   1. systemd-analyze verify   (syntax, directives, executables); a warning such as an
#      unknown (misspelt) key fails the check too, unless --allow-warnings
#   2. systemd-analyze security --offline=true   (sandbox exposure, must stay at or below a
#      threshold; 0.0 = fully locked down, 10.0 = unprotected)
#
# usage: systemd/check-units.sh [--threshold EXPOSURE] [--bin-dir DIR] [--allow-warnings] [UNIT...]
#   --threshold  highest accepted exposure, default 2.5
#   --bin-dir    directory holding the diredi-* binaries the units start (e.g. target/release);
#                a missing binary is replaced by a stub, since verify only needs an executable
#   --allow-warnings  report verify warnings without failing
#   UNIT         unit files to check; default: every *.service beside this script
#
# Needs systemd >= 252 (security --offline). Does not need a running systemd. Exit status 0
# when every unit passes, 1 otherwise, 2 on a usage error or a missing tool.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
threshold=2.5
bin_dir=""
allow_warnings=0
units=()

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}" >&2; exit 2; }

while (($#)); do
    case "$1" in
        --threshold) (($# >= 2)) || usage; threshold="$2"; shift ;;
        --threshold=*) threshold="${1#--threshold=}" ;;
        --bin-dir) (($# >= 2)) || usage; bin_dir="$2"; shift ;;
        --bin-dir=*) bin_dir="${1#--bin-dir=}" ;;
        --allow-warnings) allow_warnings=1 ;;
        -h|--help) usage ;;
        -*) echo "check-units: unknown option '$1'" >&2; usage ;;
        *) units+=("$1") ;;
    esac
    shift
done
if ((${#units[@]} == 0)); then
    units=("$here"/*.service)
fi

if ! command -v systemd-analyze >/dev/null 2>&1; then
    echo "check-units: systemd-analyze not found; install systemd (apt-get install systemd)" >&2
    exit 2
fi
version="$(systemd-analyze --version | awk 'NR == 1 { print $2 }')"
if ! [[ "$version" =~ ^[0-9]+$ ]] || ((version < 252)); then
    echo "check-units: systemd $version found; 'security --offline' needs systemd 252 or newer" >&2
    exit 2
fi
# systemd-analyze takes the threshold as exposure x 10 (an integer from 0 to 100).
if ! [[ "$threshold" =~ ^([0-9]|10)(\.[0-9])?$ ]] || [[ "$threshold" == 10.[1-9] ]]; then
    echo "check-units: --threshold must be an exposure from 0.0 to 10.0 with one decimal, found '$threshold'" >&2
    exit 2
fi
threshold_x10=$((10#${threshold%%.*} * 10 + 10#$( [[ "$threshold" == *.* ]] && echo "${threshold#*.}" || echo 0 )))

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
printf '#!/bin/sh\nexit 0\n' > "$work/stub"
chmod 0755 "$work/stub"

# Prefixes every line of stdin with "  NAME: ".
indent() { sed "s#^#  $1: #"; }

failed=0
for unit in "${units[@]}"; do
    name="$(basename "$unit")"
    if [[ ! -f "$unit" ]]; then
        echo "FAIL $name: no such file: $unit" >&2
        failed=1
        continue
    fi
    # Point every /usr/bin/diredi-* at a real binary from --bin-dir, or at the stub.
    copy="$work/$name"
    cp "$unit" "$copy"
    while read -r exe; do
        [[ -n "$exe" ]] || continue
        target="$work/stub"
        if [[ -n "$bin_dir" && -x "$bin_dir/$(basename "$exe")" ]]; then
            target="$(cd "$bin_dir" && pwd)/$(basename "$exe")"
        fi
        sed -i "s#$exe\\b#$target#g" "$copy"
    done < <(grep -o '/usr/bin/diredi-[A-Za-z0-9_-]*' "$unit" | sort -u)

    if out="$(cd "$work" && systemd-analyze verify --man=no "$copy" 2>&1)" \
        && { [[ -z "$out" ]] || ((allow_warnings)); }; then
        if [[ -n "$out" ]]; then
            indent "$name" <<<"$out"
        fi
        echo "ok   $name: systemd-analyze verify"
    else
        indent "$name" <<<"$out" >&2
        echo "FAIL $name: systemd-analyze verify" >&2
        failed=1
    fi

    # A unit with state runs as an unprivileged user and keeps its state directory 0700.
    if grep -q '^StateDirectory=' "$unit"; then
        user="$(sed -n 's/^User=//p' "$unit" | tail -n 1)"
        mode="$(sed -n 's/^StateDirectoryMode=//p' "$unit" | tail -n 1)"
        dynamic=0
        grep -q '^DynamicUser=yes' "$unit" && dynamic=1
        if [[ "$mode" == 0700 ]] && { ((dynamic)) || [[ -n "$user" && "$user" != root && "$user" != 0 ]]; }; then
            echo "ok   $name: runs as ${user:-a dynamic user}, state directory $mode"
        else
            echo "FAIL $name: needs User= (not root) or DynamicUser=yes, and StateDirectoryMode=0700 (found User=${user:-none}, mode ${mode:-default 0755})" >&2
            failed=1
        fi
    fi

    report="$(cd "$work" && systemd-analyze security --offline=true --no-pager \
        --threshold="$threshold_x10" "$copy" 2>&1)" && status=0 || status=$?
    overall="$(grep -o 'Overall exposure level for .*' <<<"$report" || true)"
    exposure="$(grep -oE 'level for [^:]+: [0-9]+\.[0-9]+' <<<"$report" | awk '{ print $NF }' || true)"
    if ((status == 0)) && [[ -n "$exposure" ]]; then
        echo "ok   $name: exposure $exposure (threshold $threshold)"
    else
        # Show what costs exposure, then the verdict.
        grep -E '^✗' <<<"$report" | indent "$name" >&2 || true
        echo "FAIL $name: ${overall:-systemd-analyze security failed: $report} (threshold $threshold)" >&2
        failed=1
    fi
done
exit "$failed"
