#!/usr/bin/env bash
# Uncontended lock+unlock pairs, Rust and C side by side in one run:
#   bindings/c/bench.sh [OPS] [REPEAT]        (defaults: 2000000 pairs, 5 runs each)
# Builds (release) shmlock-bench and libshmlock, compiles examples/bench.c against the library,
# creates a segment for the C bench as `shmlock-bench stream` creates its own (default
# capacities, 64 owners, no shmlockd: examples/create_segment.rs), runs
# `shmlock-bench stream --system shmlock` and the C bench alternately, and prints both medians
# and the ratio C / Rust (the issue's target: at most 1.2), and the ratio of each one's fastest run.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
top="$here/../.."
ops="${1:-2000000}"
repeat="${2:-5}"
target="${CARGO_TARGET_DIR:-$top/target}"
(cd "$top" && cargo build --release -q -p shmlock --bin shmlock-bench &&
    cargo build --release -q -p shmlock-c --lib --example create_segment)
work="$(mktemp -d)"
seg="/shmlock-cbench-$$"
cleanup() {
    "$target/release/examples/create_segment" --remove "$seg" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT
SHMLOCK_LIB_DIR="$target/release" "$here/install.sh" "$work/prefix" >/dev/null
export PKG_CONFIG_PATH="$work/prefix/lib/pkgconfig"
# shellcheck disable=SC2046
cc -std=c11 -O2 -o "$work/bench" "$here/examples/bench.c" $(pkg-config --cflags --libs shmlock) \
    -Wl,-rpath,"$work/prefix/lib"
"$target/release/examples/create_segment" "$seg" 64
ns() { sed -n 's/.*"ns_per_op":\([0-9.]*\).*/\1/p' | head -n1; }
rust=() c=() cs=()
for _ in $(seq "$repeat"); do
    rust+=("$("$target/release/shmlock-bench" stream --system shmlock --ops "$ops" --json | ns)")
    c+=("$("$work/bench" --segment "$seg" --ops "$ops" --json | ns)")
    cs+=("$("$work/bench" --segment "$seg" --ops "$ops" --scoped --json | ns)")
done
median() { printf '%s\n' "$@" | sort -g | sed -n "$(( ($# + 1) / 2 ))p"; }
least() { printf '%s\n' "$@" | sort -g | head -n1; }
r="$(median "${rust[@]}")"
k="$(median "${c[@]}")"
ks="$(median "${cs[@]}")"
rmin="$(least "${rust[@]}")"
kmin="$(least "${c[@]}")"
ksmin="$(least "${cs[@]}")"
echo "stream: $ops x { lock(\"ABCD\"); unlock } in one process; median of $repeat alternating runs"
echo "  rust (shmlock-bench stream): $r ns/pair   runs: ${rust[*]}"
echo "  c    (shmlock_lock + shmlock_unlock): $k ns/pair   runs: ${c[*]}"
echo "  c    (shmlock_with_lock, scoped):    $ks ns/pair   runs: ${cs[*]}"
awk -v r="$r" -v k="$k" -v s="$ks" 'BEGIN {
    printf "  ratio c/rust: %.3f with a guard handle, %.3f scoped (target: at most 1.2)\n", k / r, s / r }'
# Each one's fastest run: the least disturbed by other work on a shared machine, where a median
# of runs that did not run at the same moment can be off by the load of either.
awk -v r="$rmin" -v k="$kmin" -v s="$ksmin" 'BEGIN {
    printf "  ratio of the fastest runs: %.3f with a guard handle, %.3f scoped\n", k / r, s / r }'
