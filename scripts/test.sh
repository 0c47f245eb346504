#!/usr/bin/env bash
# The test suite, as the README and CI run it: installs what the tests start for real,
# replays the README's two commands on a fresh build of mediagate (built without clang,
# then clang appears), runs every Rust test (unit and end-to-end against the real binary), every benchmark
# script in smoke mode, then checks the Kubernetes manifests against a live binary.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-test-deps.sh
cargo build --bins
scripts/test-fresh-build.sh
if cargo nextest --version >/dev/null 2>&1; then
    cargo nextest run --no-fail-fast
else
    cargo test --no-fail-fast
fi
scripts/test-bench-smoke.sh
MEDIAGATE_BIN=target/debug/mediagate scripts/test-manifests.sh
