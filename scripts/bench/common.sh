# Shared by the bench scripts (sourced, from the project root): the harness's mock upstream and
# waiting for a server to answer.

# Prints the path of ../shared/bench's mock upstream, building it into bench-out/ on first use.
mock_bin() {
  local target=$PWD/bench-out/mock-upstream-target
  [ -x "$target/release/mock-upstream" ] || CARGO_TARGET_DIR=$target cargo build --release --quiet \
    --manifest-path "$PWD/../shared/bench/mock-upstream/Cargo.toml" >&2
  echo "$target/release/mock-upstream"
}

# Waits up to 10 s for URL to answer 2xx; fails (and says so) when it does not.
wait_up() {
  for _ in $(seq 100); do curl -sf -o /dev/null "$1" && return 0; sleep 0.1; done
  echo "$1 did not come up in 10 s" >&2
  return 1
}

# Prepares BENCH_DATA (exported; a new temp dir, the caller's to remove) for
# scripts/bench/parley-keyed.sh and sets BENCH_KEY to a key made there through the admin API of
# PARLEY_BIN, with per-key rpm/tpm limits high enough not to bind. Fails (and says so, the
# directory removed) when no key came back.
bench_key() {
  BENCH_DATA=$(mktemp -d)
  export BENCH_DATA
  local port=4099 setup key
  cat > "$BENCH_DATA/setup.toml" <<TOML
listen = "127.0.0.1:$port"
data_dir = "$BENCH_DATA/data"
TOML
  PARLEY_ADMIN_KEY=bench-admin-key "$PARLEY_BIN" serve --config "$BENCH_DATA/setup.toml" \
    >"$BENCH_DATA/setup.log" 2>&1 &
  setup=$!
  if wait_up "127.0.0.1:$port/healthz"; then
    key=$(curl -sf "127.0.0.1:$port/admin/keys" -H 'authorization: Bearer bench-admin-key' \
      -H 'content-type: application/json' \
      -d '{"tenant": "bench", "rpm": 100000000, "tpm": 4000000000}' | jq -r .key)
  fi
  kill -TERM "$setup" 2>/dev/null || true
  wait "$setup" || true
  if [ -z "${key:-}" ] || [ "$key" = null ]; then
    echo "no bench key" >&2
    rm -rf "$BENCH_DATA"
    return 1
  fi
  BENCH_KEY=$key
}

# The background processes a script starts (its mock, its server, a sampler): each is added to
# `started` as it starts; `stop_started` stops them all, waits for them and forgets them. Call it
# from the script's EXIT trap too, so nothing outlives the script.
started=()
stop_started() {
  for p in ${started[@]+"${started[@]}"}; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  started=()
}
