#!/usr/bin/env bash
# Soak test of the gateway (RELIABILITY.md, Soak): the Rust gateway on its embedded broker under
# half of its own flat-out throughput for MINUTES (default 30), its resident memory sampled
# every 10 s. Writes out/soak/: perf.json and perf.md (`diredi-cloud-worker perf run`: windows
# in and out, latency), rss.tsv (unix s, RSS KiB) and soak.json (the summary: RSS growth from
# the sample at 2 minutes to the last, windows lost). Not a CI test: it takes the machine for
# the whole run.
#
#   scripts/soak.sh [MINUTES] [extra `perf run` arguments]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
minutes=${1:-30}
shift || true

scripts/fetch-onnxruntime.sh >/dev/null
scripts/fetch-hapt.sh >/dev/null
ORT_DYLIB_PATH="$root/third_party/onnxruntime/linux-$(uname -m)/libonnxruntime.so.1.31.1"
export ORT_DYLIB_PATH
cargo build --workspace --quiet

out=out/soak
mkdir -p "$out"
: >"$out/rss.tsv"
target/debug/diredi-cloud-worker perf run --targets rust-embedded --max-seconds 20 \
  --seconds "$((minutes * 60))" --load-fraction 0.5 --limit-seconds 1 \
  --json "$out/perf.json" --report "$out/perf.md" "$@" &
perf=$!

# The gateway the harness started (its child); sampled until the harness ends.
while kill -0 "$perf" 2>/dev/null; do
  for pid in $(pgrep -P "$perf" -f diredi-gateway || true); do
    rss=$(awk '/^VmRSS:/ { print $2 }' "/proc/$pid/status" 2>/dev/null || true)
    [ -n "$rss" ] && printf '%s\t%s\n' "$(date +%s)" "$rss" >>"$out/rss.tsv"
  done
  sleep 10
done
wait "$perf"

python3 - "$out" <<'EOF'
import json, sys
out = sys.argv[1]
rows = [tuple(map(int, l.split())) for l in open(f"{out}/rss.tsv") if l.strip()]
perf = json.load(open(f"{out}/perf.json"))
t0 = rows[0][0]
after_warmup = [r for r in rows if r[0] - t0 >= 120] or rows
first, last = after_warmup[0][1], rows[-1][1]
targets = perf["result"]["targets"]
keep = ("offered_windows_per_second", "windows_per_second", "windows_in", "windows_out",
        "windows_lost", "seconds", "latency_ms")
load = [{k: t["load"].get(k) for k in keep} | {"rss_peak_mib": t.get("rss_peak_mib"),
        "max_windows_per_second": t["max"].get("windows_per_second")} for t in targets]
summary = {
    "minutes_sampled": round((rows[-1][0] - t0) / 60, 1),
    "samples": len(rows),
    "rss_kib_at_2_min": first,
    "rss_kib_last": last,
    "rss_kib_max": max(r[1] for r in rows),
    "rss_growth": round((last - first) / first, 4),
    "load": load,
}
json.dump(summary, open(f"{out}/soak.json", "w"), indent=2)
print(json.dumps(summary, indent=2))
EOF
