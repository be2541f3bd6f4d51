#!/usr/bin/env bash
# parley's CPU time per request at full load, against the harness's mock upstream (from
# ../shared/bench), in development mode with the cache off (peers/parley/start.sh): oha with 64
# connections sends REQUESTS requests after a warm-up; the CPU time of the parley process is read
# from /proc before and after. Prints the request rate, CPU milliseconds per request, and the
# server's RSS (idle at start -> after the load) and its peak (MiB).
#   MODE=stream|json (stream)  CHUNKS=8 (chunks per streamed reply)  REQUESTS=100000
#   PARLEY_BIN (default target/release/parley)
#   KEYED=1: parley with a real key instead (scripts/bench/parley-keyed.sh: auth, per-key limits
#   and usage accounting on, cache off), as the harness's keyed run
#   COUNT=1: also count, with perf stat on the server over the measured load, its system calls
#   (sendto, writev, recvfrom, write, epoll_wait) and context switches, and print them per
#   request; COUNT=2 counts calls into glibc's allocator as well (malloc, realloc,
#   malloc_consolidate: uprobes on libc, added when missing, which needs root), which slows the
#   server: the rate, CPU and system-call figures of such a run are not comparable with others
# Needs oha; builds the harness's mock into bench-out/ on first use.
set -euo pipefail
cd "$(dirname "$0")/../.."
. scripts/bench/common.sh
root=$PWD
bench=$root/../shared/bench
mode=${MODE:-stream}
chunks=${CHUNKS:-8}
requests=${REQUESTS:-100000}
bin=${PARLEY_BIN:-$root/target/release/parley}
mock=$(mock_bin)
"$mock" --port 18080 >/dev/null 2>&1 &
mock_pid=$!
gw_pid=''
keyed_dir=''
cleanup() {
  kill ${gw_pid:+"$gw_pid"} "$mock_pid" 2>/dev/null || true
  # The server writes its last usage records as it stops: remove its directory after.
  wait 2>/dev/null || true
  [ -z "$keyed_dir" ] || rm -rf "$keyed_dir"
}
trap cleanup EXIT
export MOCK_API_BASE="http://127.0.0.1:18080/chunks=$chunks/v1" PARLEY_BIN=$bin GW_PORT=4000
auth=()
if [ "${KEYED:-0}" = 1 ]; then
  bench_key
  keyed_dir=$BENCH_DATA
  auth=(-H "authorization: Bearer $BENCH_KEY")
  scripts/bench/parley-keyed.sh >/dev/null 2>&1 &
else
  "$bench/peers/parley/start.sh" >/dev/null 2>&1 &
fi
gw_pid=$!
wait_up 127.0.0.1:4000/healthz
stream=''
[ "$mode" = stream ] && stream=',"stream":true'
body='{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Say hello."}],"max_tokens":32'$stream'}'
load() {
  oha -n "$1" -c 64 --no-tui -m POST -H 'content-type: application/json' "${auth[@]}" -d "$body" \
    http://127.0.0.1:4000/v1/chat/completions
}
# The gateway's process (start.sh execs it).
pid=$gw_pid
rss() { awk -v f="$1:" '$1 == f {printf "%.1f", $2 / 1024}' "/proc/$pid/status"; }
idle_rss=$(rss VmRSS)
load 20000 >/dev/null
# User and system CPU ticks of the server.
ticks() { awk '{print $14, $15}' "/proc/$pid/stat"; }
hz=$(getconf CLK_TCK)
stat_pid=''
if [ "${COUNT:-0}" != 0 ]; then
  libc=$(ldd "$bin" 2>/dev/null | awk '/libc\.so/ {print $3}' || true)
  events=syscalls:sys_enter_sendto,syscalls:sys_enter_writev,syscalls:sys_enter_recvfrom
  events=$events,syscalls:sys_enter_write,syscalls:sys_enter_epoll_wait,context-switches
  probes=()
  [ "$COUNT" = 2 ] && probes=(malloc realloc malloc_consolidate)
  for f in "${probes[@]}"; do
    perf probe -l 2>/dev/null | grep -q "probe_libc:$f " \
      || perf probe -q -x "$libc" --add "$f" >/dev/null 2>&1 || true
    perf probe -l 2>/dev/null | grep -q "probe_libc:$f " && events=$events,probe_libc:$f
  done
  counts=$(mktemp)
  perf stat -x, -e "$events" -p "$pid" -o "$counts" &
  stat_pid=$!
  sleep 1
fi
read -r u0 s0 <<<"$(ticks)"
rps=$(load "$requests" | awk '/Requests\/sec/ {print $2}')
read -r u1 s1 <<<"$(ticks)"
per() { echo "scale=4; $1 * 1000 / $hz / $requests" | bc; }
echo "keyed=${KEYED:-0} mode=$mode chunks=$chunks requests=$requests rps=$rps cpu_ms_per_request=$(per $((u1 + s1 - u0 - s0))) (user $(per $((u1 - u0))) sys $(per $((s1 - s0)))) rss_mib=$idle_rss->$(rss VmRSS) peak_mib=$(rss VmHWM)"
if [ -n "$stat_pid" ]; then
  kill -INT "$stat_pid"
  wait "$stat_pid" || true
  awk -F, -v n="$requests" '/^[0-9]/ {printf "  %-34s %8.2f per request\n", $3, $1 / n}' "$counts"
  rm -f "$counts"
fi
