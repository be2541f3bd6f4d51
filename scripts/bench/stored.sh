#!/usr/bin/env bash
# Memory against the number of stored conversations: parley in development mode (built-in mock,
# cache off, a fresh data directory) gets ROUNDS rounds of PER_ROUND `POST /v1/conversations`
# (8 keep-alive connections); after each round the server's RSS and the data directory's size
# are printed. Shows whether what sled keeps in memory stays within `[storage] cache_mb` as
# conversations pile up. Everything stays on 127.0.0.1 and stops by itself.
#   PARLEY_BIN   the binary (default: target/release/parley, built first)
#   ROUNDS       rounds (default 5); PER_ROUND conversations each (default 20000)
# Needs python3 and curl.
set -euo pipefail
cd "$(dirname "$0")/../.."
rounds=${ROUNDS:-5}
per_round=${PER_ROUND:-20000}
if [ -z "${PARLEY_BIN:-}" ]; then
  cargo build --release --quiet
  PARLEY_BIN=$PWD/target/release/parley
fi
dir=$(mktemp -d)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
# The embedded default (its built-in `mock` route), with the cache off and room for them all.
cat >"$dir/parley.toml" <<EOF
[auth]
admin_key_env = "PARLEY_STORED_BENCH_NO_ADMIN_KEY"

[server]
max_conversations_per_tenant = $((rounds * per_round + 1))

[cache]
enabled = false
EOF
RUST_LOG=warn "$PARLEY_BIN" serve --config "$dir/parley.toml" --listen "127.0.0.1:$port" \
  --data-dir "$dir/data" >"$dir/server.log" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$dir"' EXIT
for _ in $(seq 100); do curl -sf -o /dev/null "127.0.0.1:$port/health" && break; sleep 0.1; done

rss() { awk '/VmRSS/ {printf "%.1f", $2 / 1024}' "/proc/$pid/status"; }
echo "conversations stored | server RSS (MiB) | data directory (MiB)"
echo "0 | $(rss) | $(du -sm "$dir/data" | cut -f1)"
for round in $(seq "$rounds"); do
  python3 - "$port" "$per_round" <<'EOF'
import http.client, json, sys, threading
port, total, threads = int(sys.argv[1]), int(sys.argv[2]), 8
failed = []
def work(n):
    c = http.client.HTTPConnection("127.0.0.1", port)
    for _ in range(n):
        c.request("POST", "/v1/conversations", body=json.dumps({"model": "mock"}),
                  headers={"content-type": "application/json"})
        r = c.getresponse()
        r.read()
        if r.status != 201:
            failed.append(r.status)
            return
ts = [threading.Thread(target=work, args=(total // threads,)) for _ in range(threads)]
[t.start() for t in ts]
[t.join() for t in ts]
if failed:
    sys.exit(f"create failed with status {failed[0]}")
EOF
  sleep 2
  echo "$((round * per_round)) | $(rss) | $(du -sm "$dir/data" | cut -f1)"
done
