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
