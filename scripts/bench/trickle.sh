#!/usr/bin/env bash
# How long a streamed reply's chunks stay in parley when the upstream trickles them, measured in
# the server: parley in development mode (peers/parley/start.sh, cache off) in front of the
# harness's mock on its slow route (headers after 50 ms, then 16 chunks 5 ms apart, as the
# harness's TTFT scenario), oha sending 5 streamed requests a second over one connection (a
# reply takes some 130 ms, so replies never overlap and every write to the client follows the
# read of its own reply), and `perf trace` on the server for 6 s of it. Prints, per binary, from each read of the upstream
# answer to the write to the client that follows: the first chunk's (it leaves with the head)
# and the later chunks', p50 and p90; and from the client's request read to the upstream
# request's write. perf trace slows each system call, so the figures are for comparing builds
# measured together, not absolute.
#   scripts/bench/trickle.sh BIN [BIN...]   ROUNDS=1
# Needs oha and perf; builds the harness's mock into bench-out/ on first use.
set -euo pipefail
cd "$(dirname "$0")/../.."
. scripts/bench/common.sh
bench=$PWD/../shared/bench
rounds=${ROUNDS:-1}
mock=$(mock_bin)
out=$(mktemp -d)
trap 'stop_started; rm -rf "$out"' EXIT
body='{"model":"gpt-4o-mini-slow","messages":[{"role":"user","content":"Say hello."}],"max_tokens":32,"stream":true}'
export MOCK_API_BASE="http://127.0.0.1:18080/v1"
export MOCK_API_BASE_SLOW="http://127.0.0.1:18080/delay_ms=50,chunk_delay_ms=5,chunks=16/v1"
export GW_PORT=4000
for _ in $(seq "$rounds"); do
  for bin in "$@"; do
    "$mock" --port 18080 >/dev/null 2>&1 &
    started+=($!)
    PARLEY_BIN=$bin "$bench/peers/parley/start.sh" >/dev/null 2>&1 &
    server=$!
    started+=("$server")
    wait_up 127.0.0.1:4000/healthz
    oha -z 12s -q 5 -c 1 --no-tui -m POST -H 'content-type: application/json' -d "$body" \
      http://127.0.0.1:4000/v1/chat/completions >/dev/null 2>&1 &
    load=$!
    sleep 3
    timeout 6 perf trace -p "$server" -e recvfrom,sendto,writev -o "$out/trace.txt" 2>/dev/null || true
    wait "$load" || true
    stop_started
    python3 - "$bin" "$out/trace.txt" <<'PY'
import re, sys

calls = []
for line in open(sys.argv[2]):
    m = re.match(r'\s*([\d.]+) \(\s*[\d.]+ ms\): \S+ (\w+)\(fd: (\d+).*?= (-?\d+)', line)
    if m:
        calls.append((float(m[1]), m[2], int(m[3]), int(m[4])))
# The upstream connections are those the server writes requests to (writev).
upstream = {fd for _, call, fd, _ in calls if call == 'writev'}
first, later, request = [], [], []
asked = {}
client_read = None
for i, (t, call, fd, ret) in enumerate(calls):
    if call == 'writev':
        asked[fd] = t
        if client_read is not None:
            request.append(t - client_read)
            client_read = None
    elif call == 'recvfrom' and ret > 0 and fd in upstream:
        sent = next((t2 for t2, c2, _, r2 in calls[i + 1:] if c2 == 'sendto' and r2 > 0), None)
        if sent is None:
            continue
        # The first read after the 50 ms wait carries the head and the first chunk.
        if fd in asked and t - asked.pop(fd) > 40:
            first.append(sent - t)
        else:
            later.append(sent - t)
    elif call == 'recvfrom' and ret > 0:
        client_read = t

def q(v, p):
    v = sorted(v)
    return v[min(len(v) - 1, int(len(v) * p))] if v else float('nan')

print(f"{sys.argv[1]}: upstream read -> client write: first chunk p50 {q(first, .5):.3f} ms "
      f"p90 {q(first, .9):.3f} (n={len(first)}), later chunks p50 {q(later, .5):.3f} ms "
      f"p90 {q(later, .9):.3f} (n={len(later)}); client request read -> upstream write "
      f"p50 {q(request, .5):.3f} ms (n={len(request)})")
PY
  done
done
