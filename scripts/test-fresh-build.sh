#!/usr/bin/env bash
# The README's two commands on a fresh machine, in their order, as far as the build goes:
# `cargo run -- demo` builds mediagate before clang is installed, then
# `scripts/test.sh` installs clang, and the next build must compile the kernel fast path
# in instead of keeping the first build's empty object (issue: 14 offload tests failed with
# "built without clang" on a fresh machine).
#
# "Fresh" for mediagate itself, in the shared target/: the two builds compile mediagate
# with a profile override of its own (`debug = "line-tables-only"`), so cargo gives it
# new artifacts and a new build-script run (nothing cached from earlier builds) while the
# dependencies' artifacts are reused as they are; a target/ of its own would rebuild every
# dependency (minutes). Only mediagate is compiled, twice:
#   1. "no clang yet": MEDIAGATE_BPF_CLANG names a path where nothing is; the build must
#      succeed with its warning, `mediagate demo` must run (a failover and a failback on
#      the embedded default) and `--version` must say the fast path is not compiled in;
#   2. "clang appears": that path becomes a link to the real clang, the same `cargo
#      build` runs again, and `--version` must now say the fast path is compiled in.
# Afterwards target/debug/mediagate is the normal build again.
# Needs clang (scripts/install-test-deps.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

CLANG=$(command -v clang) || { echo "clang missing: run scripts/install-test-deps.sh" >&2; exit 1; }
FRESH=$(mktemp -d /tmp/mg-fresh.XXXXXX)
restore() {
    # The normal build's binary back in target/debug (the checks' builds replaced it).
    rm -f target/debug/mediagate
    cargo build --quiet --bin mediagate || true
    rm -rf "$FRESH"
}
trap restore EXIT
FAKE_CLANG=$FRESH/clang-dir/clang
mkdir -p "$FRESH/clang-dir"
build() { # build LOG: mediagate with its own artifacts
    MEDIAGATE_BPF_CLANG=$FAKE_CLANG cargo --config 'profile.dev.package.mediagate.debug="line-tables-only"' \
        build --bin mediagate -v >"$1" 2>&1 || { cat "$1" >&2; echo "fresh build failed" >&2; exit 1; }
    if grep -E '^\s+Compiling ' "$1" | grep -v ' mediagate v' | grep -q .; then
        grep -E '^\s+Compiling ' "$1" >&2
        echo "the check's build compiled a dependency: it should reuse them" >&2
        exit 1
    fi
    cp target/debug/mediagate "$FRESH/mediagate"
}
BIN=$FRESH/mediagate

echo "fresh build 1: clang not there yet"
build "$FRESH/build1.log"
grep -q 'kernel fast path not built' "$FRESH/build1.log" \
    || { cat "$FRESH/build1.log" >&2; echo "no warning about the missing clang" >&2; exit 1; }
"$BIN" --version | tee "$FRESH/version1"
grep -qi 'fast path: not compiled' "$FRESH/version1" \
    || { echo "--version does not say the fast path is missing" >&2; exit 1; }
timeout 120 "$BIN" demo >"$FRESH/demo.out" 2>&1 \
    || { cat "$FRESH/demo.out" >&2; echo "cargo run -- demo failed on the first build" >&2; exit 1; }
grep -qi 'failover' "$FRESH/demo.out" || { cat "$FRESH/demo.out" >&2; echo "the demo showed no failover" >&2; exit 1; }

echo "fresh build 2: clang appeared"
ln -s "$CLANG" "$FAKE_CLANG"
build "$FRESH/build2.log"
grep -q 'Running .*build-script-build' "$FRESH/build2.log" \
    || { cat "$FRESH/build2.log" >&2; echo "the build script did not run again when clang appeared" >&2; exit 1; }
"$BIN" --version | tee "$FRESH/version2"
grep -qi 'fast path: compiled' "$FRESH/version2" \
    || { echo "clang appeared but the fast path is still not compiled in" >&2; exit 1; }
echo "fresh build: the first build without clang did not poison the next"
