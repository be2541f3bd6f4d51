#!/usr/bin/env bash
# Latency at a low fixed rate, the harness's way (oha -q RATE --latency-correction -c 64,
# non-streaming, development mode, cache off, against the harness's mock upstream), with the
# thread wake-ups the server makes: eventfd and file writes (`write` calls) and context switches
# per request, counted by `perf stat` (Debian's linux-perf) over the measured load. Prints
# p50/p99 through parley, what parley adds to the same load sent straight to the mock just
# before, and the counts. Several binaries are measured
# interleaved, ROUNDS times each (this machine's speed drifts over minutes).
#   scripts/bench/lowrate.sh BIN [BIN...]   RATE=20 DURATION=10 ROUNDS=3 STREAM=
# Needs oha and perf; builds the harness's mock into bench-out/ on first use.
set -euo pipefail
cd "$(dirname "$0")/../.."
. scripts/bench/common.sh
bench=$PWD/../shared/bench
rate=${RATE:-20}
seconds=${DURATION:-10}
rounds=${ROUNDS:-3}
mock=$(mock_bin)
out=$(mktemp -d)
trap 'stop_started; rm -rf "$out"' EXIT
stream=''
[ -n "${STREAM:-}" ] && stream=',"stream":true'
body='{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Say hello."}],"max_tokens":32'$stream'}'
one() {
  local bin=$1
  "$mock" --port 18080 >/dev/null 2>&1 &
  started+=($!)
  MOCK_API_BASE="http://127.0.0.1:18080/v1" PARLEY_BIN=$bin GW_PORT=4000 \
    "$bench/peers/parley/start.sh" >/dev/null 2>&1 &
  # start.sh execs the server, so this is the server's pid.
  local gw_pid=$!
  started+=("$gw_pid")
  wait_up 127.0.0.1:18080/health
  wait_up 127.0.0.1:4000/healthz
  oha -n 2000 -c 64 --no-tui -m POST -H 'content-type: application/json' -d "$body" \
    http://127.0.0.1:4000/v1/chat/completions >/dev/null
  # The same load straight to the mock first: what parley adds is the difference.
  oha -q "$rate" -z "${seconds}s" --latency-correction -c 64 --no-tui --output-format json \
    -m POST -H 'content-type: application/json' -d "$body" \
    http://127.0.0.1:18080/v1/chat/completions >"$out/direct.json"
  # perf counts over the load's own duration (a background job ignores SIGINT here).
  perf stat -e syscalls:sys_enter_write,context-switches -p "$gw_pid" -o "$out/stat.txt" \
    -- sleep "$seconds" &
  local perf_pid=$!
  oha -q "$rate" -z "${seconds}s" --latency-correction -c 64 --no-tui --output-format json \
    -m POST -H 'content-type: application/json' -d "$body" \
    http://127.0.0.1:4000/v1/chat/completions >"$out/oha.json"
  wait "$perf_pid" || true
  stop_started
  python3 - "$out" "$bin" <<'PY'
import json, re, sys
out, bin = sys.argv[1], sys.argv[2]
d = json.load(open(f"{out}/oha.json"))
p, s = d["latencyPercentiles"], d["summary"]
direct = json.load(open(f"{out}/direct.json"))["latencyPercentiles"]
st = open(f"{out}/stat.txt").read()
def count(name):
    return int(re.search(r"([\d,]+)\s+" + re.escape(name), st).group(1).replace(",", ""))
n = s["requestsPerSec"] * s["total"]  # requests over the load (perf covered the same time)
print(f"{bin}: via parley p50 {p['p50'] * 1000:.3f} ms  p99 {p['p99'] * 1000:.3f} ms; "
      f"added p50 {(p['p50'] - direct['p50']) * 1000:.3f} ms  p99 {(p['p99'] - direct['p99']) * 1000:.3f} ms; "
      f"writes/request {count('syscalls:sys_enter_write') / n:.2f}  "
      f"context switches/request {count('context-switches') / n:.2f}")
PY
}
for _ in $(seq "$rounds"); do
  for bin in "$@"; do one "$bin"; done
done
