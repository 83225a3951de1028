#!/usr/bin/env bash
# Runs every cargo-fuzz target of fuzz/ for N seconds each (default 600), one after another
# at the lowest CPU priority, and prints libFuzzer's figures per target.
#
#   scripts/fuzz.sh            # 10 minutes per target
#   scripts/fuzz.sh 60         # a quick pass
#   FUZZ_TARGETS="label command" scripts/fuzz.sh 120
#
# Needs the nightly toolchain and cargo-fuzz (`cargo install cargo-fuzz`). New inputs go into
# fuzz/corpus/<target>/; minimise before committing (`cd fuzz && cargo +nightly fuzz cmin
# <target> -- -set_cover_merge=1`). A crash or hang stops that target, is saved under
# fuzz/artifacts/<target>/ and makes the script exit 1 after the other targets have run.
# See RELIABILITY.md, "Fuzzing".
set -euo pipefail

secs="${1:-600}"
case "$secs" in
    '' | *[!0-9]*) echo "usage: $0 [seconds-per-target]" >&2; exit 2 ;;
esac

cd "$(dirname "$0")/../fuzz"

# JSON targets get the JSON dictionary.
json_targets=" sensor_json sensor_senml label command dispatch_msg manifest "

nice -n 19 cargo +nightly fuzz build
targets="${FUZZ_TARGETS:-$(cargo +nightly fuzz list)}"

mkdir -p artifacts
summary="artifacts/summary.txt"
printf '%-16s %8s %14s %10s %8s %s\n' target seconds executions exec/s rss_mb result >"$summary"
failed=0
for t in $targets; do
    mkdir -p "corpus/$t"
    log="artifacts/$t.log"
    args=(-max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1)
    if [[ "$json_targets" == *" $t "* ]]; then
        args+=(-dict=dicts/json.dict)
    fi
    echo "== $t: ${secs}s" >&2
    result=ok
    if ! nice -n 19 cargo +nightly fuzz run "$t" -- "${args[@]}" >"$log" 2>&1; then
        result="FAILED (see fuzz/$log and fuzz/artifacts/$t/)"
        failed=1
    fi
    stat() { sed -n "s/^stat::$1: *//p" "$log" | tail -n 1; }
    runs="$(stat number_of_executed_units)"
    rate="$(stat average_exec_per_sec)"
    rss="$(stat peak_rss_mb)"
    elapsed="$(sed -n 's/^Done [0-9]* runs in \([0-9]*\) second.*/\1/p' "$log" | tail -n 1)"
    printf '%-16s %8s %14s %10s %8s %s\n' "$t" "${elapsed:-?}" "${runs:-?}" "${rate:-?}" \
        "${rss:-?}" "$result" | tee -a "$summary" >&2
done
cat "$summary"
exit "$failed"
