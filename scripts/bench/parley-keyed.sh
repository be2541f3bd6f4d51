#!/usr/bin/env bash
# The harness's parley peer with auth on: an admin key, the data directory prepared by
# scripts/bench/http.sh (it holds the bench key, with per-key rpm/tpm limits high enough not to
# bind), cache off, so every request is authenticated, limited, accounted and sent upstream.
#   PARLEY_BIN, BENCH_DATA (the prepared data directory), GW_PORT, MOCK_API_BASE[_SLOW]
set -euo pipefail
: "${MOCK_API_BASE:?run by ../shared/bench/run.sh}"
: "${PARLEY_BIN:?}" "${BENCH_DATA:?}"
export MOCK_API_BASE_SLOW="${MOCK_API_BASE_SLOW:-$MOCK_API_BASE}"
export BENCH_UPSTREAM_KEY=sk-bench-upstream PARLEY_ADMIN_KEY=bench-admin-key
unset OPENAI_API_KEY ANTHROPIC_API_KEY
cat > "$BENCH_DATA/parley.toml" <<TOML
listen = "127.0.0.1:${GW_PORT:-4000}"
data_dir = "$BENCH_DATA/data"

[cache]
enabled = false

[[providers]]
name = "mock"
kind = "openai"
base_url = "$MOCK_API_BASE"
api_key_env = "BENCH_UPSTREAM_KEY"

[[providers]]
name = "mock-slow"
kind = "openai"
base_url = "$MOCK_API_BASE_SLOW"
api_key_env = "BENCH_UPSTREAM_KEY"

[[routes]]
model = "gpt-4o-mini"
targets = [{ provider = "mock", model = "gpt-4o-mini" }]

[[routes]]
model = "gpt-4o-mini-slow"
targets = [{ provider = "mock-slow", model = "gpt-4o-mini" }]
TOML
export RUST_LOG="${RUST_LOG:-warn}"
exec "$PARLEY_BIN" serve --config "$BENCH_DATA/parley.toml"
