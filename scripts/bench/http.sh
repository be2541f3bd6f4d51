#!/usr/bin/env bash
# The HTTP figures of the README's performance section, in one run of ../shared/bench on this
# machine: nginx (a plain proxy, the floor), parley in development mode (no key), and parley
# with a real key (auth, per-key limits and usage accounting on). Results land in
# bench-out/results/; the comparison table is printed at the end.
#   PARLEY_BIN   the binary to measure (default: a copy of target/release/parley)
#   RATES, STREAM_RATE, REPEAT, DURATION   passed to run.sh (the issue's settings by default)
# Needs oha (cargo install oha --locked) and nginx (apt-get install nginx).
set -euo pipefail
cd "$(dirname "$0")/../.."
. scripts/bench/common.sh
root=$PWD
bench=$root/../shared/bench
rates=${RATES:-"20 50 500 2000"}
repeat=${REPEAT:-2}
stream_rate=${STREAM_RATE:-10}
export DURATION=${DURATION:-10}
# What this script makes in the temp directory (the binary's copy, the keyed peer's data, which
# holds a run's usage records: some 200 MB) goes when it ends.
made=()
trap 'rm -rf ${made[@]+"${made[@]}"}' EXIT
if [ -z "${PARLEY_BIN:-}" ]; then
  cargo build --release --quiet
  made+=("$(mktemp -d)")
  PARLEY_BIN=${made[0]}/parley
  cp target/release/parley "$PARLEY_BIN"
fi
export PARLEY_BIN
common=(--rates "$rates" --stream-rate "$stream_rate" --repeat "$repeat")

# The keyed peer's data directory, with one key made through the admin API.
bench_key
made+=("$BENCH_DATA")
key=$BENCH_KEY

"$bench/run.sh" --name nginx-w2 --gw-cmd 'NGINX_WORKERS=2 peers/nginx/start.sh' "${common[@]}"
PARLEY_REPO=$root "$bench/run.sh" --name parley-dev --gw-url http://127.0.0.1:4000 \
  --gw-cmd 'peers/parley/start.sh' "${common[@]}"
"$bench/run.sh" --name parley-key --gw-url http://127.0.0.1:4000 \
  --gw-cmd "$root/scripts/bench/parley-keyed.sh" --auth "Bearer $key" "${common[@]}"
latest() { ls -d bench-out/results/*-"$1" | tail -1; }
python3 "$bench/lib/compare.py" "$(latest nginx-w2)" "$(latest parley-dev)" "$(latest parley-key)"
