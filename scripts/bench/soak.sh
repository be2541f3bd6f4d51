#!/usr/bin/env bash
# Memory under sustained load: parley with a real key (auth, per-key limits, usage accounting
# on; cache off) in front of the harness's mock upstream, loaded for MINUTES minutes (10) in
# one-minute rounds that alternate non-streaming and streaming requests at full speed (oha, 64
# connections). The server's RSS is sampled every 5 s; printed at the end: one line per round
# (requests, RSS at its end, peak so far) and the growth over the second half, with the data
# directory's size. Everything stays on 127.0.0.1 and stops by itself.
#   PARLEY_BIN   the binary (default: a copy of target/release/parley, built first)
#   MINUTES      rounds (default 10); ROUND_SECONDS their length (default 60)
# Needs oha (cargo install oha --locked), curl, jq; builds ../shared/bench's mock on first use.
set -euo pipefail
cd "$(dirname "$0")/../.."
. scripts/bench/common.sh
root=$PWD
minutes=${MINUTES:-10}
round=${ROUND_SECONDS:-60}
out=$root/bench-out/soak-$(date -u +%Y%m%dT%H%M%S)
mkdir -p "$out"
if [ -z "${PARLEY_BIN:-}" ]; then
  cargo build --release --quiet
  PARLEY_BIN=$out/parley
  cp target/release/parley "$PARLEY_BIN"
fi
mock=$(mock_bin)

trap stop_started EXIT

MOCK_PORT=18090 "$mock" >"$out/mock.log" 2>&1 &
started+=($!)
wait_up 127.0.0.1:18090/health

export BENCH_DATA=$out GW_PORT=4090 PARLEY_BIN
export MOCK_API_BASE=http://127.0.0.1:18090/v1
scripts/bench/parley-keyed.sh >"$out/parley.log" 2>&1 &
started+=($!)
wait_up 127.0.0.1:4090/healthz
pid=$(pgrep -f "$PARLEY_BIN serve" | head -1)
key=$(curl -sf 127.0.0.1:4090/admin/keys -H 'authorization: Bearer bench-admin-key' \
  -H 'content-type: application/json' \
  -d '{"tenant": "soak", "rpm": 100000000, "tpm": 4000000000}' | jq -r .key)
[ -n "$key" ] && [ "$key" != null ] || { echo "no key" >&2; exit 1; }

rss() { awk '/VmRSS/ {print $2}' "/proc/$pid/status"; }
(while kill -0 "$pid" 2>/dev/null; do echo "$(date +%s) $(rss)"; sleep 5; done) >"$out/rss.txt" &
started+=($!)
echo "idle RSS $(( $(rss) / 1024 )) MiB"

body='{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hello there"}]'
printf '| round | kind | requests | rps | RSS at end | peak so far |\n|---|---|---|---|---|---|\n'
peak=0
total=0
for r in $(seq "$minutes"); do
  if [ $((r % 2)) = 1 ]; then kind=json; b="$body}"; else kind=stream; b="$body"',"stream":true}'; fi
  oha -z "${round}s" -c 64 --no-tui --output-format json -m POST -H 'content-type: application/json' \
    -H "authorization: Bearer $key" -d "$b" http://127.0.0.1:4090/v1/chat/completions \
    >"$out/oha-$r.json" 2>/dev/null
  read -r n rps ok < <(jq -r '[(.summary.requestsPerSec * .summary.total | floor),
    (.summary.requestsPerSec | floor), .summary.successRate] | @tsv' "$out/oha-$r.json")
  now=$(rss)
  peak=$(sort -k2 -n "$out/rss.txt" | tail -1 | cut -d' ' -f2)
  total=$((total + n))
  [ "$ok" = 1 ] || echo "round $r: success rate $ok" >&2
  printf '| %s | %s | %s | %s | %s MiB | %s MiB |\n' "$r" "$kind" "$n" "$rps" \
    "$(( now / 1024 ))" "$(( peak / 1024 ))"
  echo "$r $now" >>"$out/rounds.txt"
done
half=$(( (minutes + 1) / 2 ))
mid=$(awk -v r="$half" '$1 == r {print $2}' "$out/rounds.txt")
end=$(awk 'END {print $2}' "$out/rounds.txt")
echo "requests $total; RSS after round $half $(( mid / 1024 )) MiB, after round $minutes $(( end / 1024 )) MiB (growth $(( (end - mid) / 1024 )) MiB over the second half); peak $(( peak / 1024 )) MiB"
echo "data directory $(du -sh "$out/data" | cut -f1) (usage files $(du -sh "$out/data/usage" 2>/dev/null | cut -f1))"
echo "samples: $out/rss.txt"
