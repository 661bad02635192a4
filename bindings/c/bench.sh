#!/usr/bin/env bash
# Uncontended lock+unlock pairs, Rust and C side by side in one run:
#   bindings/c/bench.sh [OPS] [REPEAT]        (defaults: 2000000 pairs, 5 runs each)
# Builds (release) shmlock-bench, shmlockd and libshmlock, compiles examples/bench.c against the
# library, starts a shmlockd on a segment of its own for the C bench (shmlock-bench stream makes
# its own segment), runs `shmlock-bench stream --system shmlock` and the C bench alternately,
# and prints both medians and the ratio C / Rust (target: at most 1.2).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
top="$here/../.."
ops="${1:-2000000}"
repeat="${2:-5}"
target="${CARGO_TARGET_DIR:-$top/target}"
(cd "$top" && cargo build --release -q -p shmlock --bin shmlock-bench --bin shmlockd &&
    cargo build --release -q -p shmlock-c)
work="$(mktemp -d)"
seg="/shmlock-cbench-$$"
daemon=""
cleanup() {
    [[ -n "$daemon" ]] && kill "$daemon" 2>/dev/null && wait "$daemon" 2>/dev/null
    rm -f "/dev/shm$seg"
    rm -rf "$work"
}
trap cleanup EXIT
SHMLOCK_LIB_DIR="$target/release" "$here/install.sh" "$work/prefix" >/dev/null
export PKG_CONFIG_PATH="$work/prefix/lib/pkgconfig"
# shellcheck disable=SC2046
cc -std=c11 -O2 -o "$work/bench" "$here/examples/bench.c" $(pkg-config --cflags --libs shmlock) \
    -Wl,-rpath,"$work/prefix/lib"
# The capacities shmlock-bench stream gives its own segment: the defaults, 64 owners.
"$target/release/shmlockd" --segment "$seg" --max-owners 64 --no-gateway --log-level warn &
daemon=$!
for _ in $(seq 200); do [[ -e "/dev/shm$seg" ]] && break; sleep 0.05; done
sleep 0.2
ns() { sed -n 's/.*"ns_per_op":\([0-9.]*\).*/\1/p' | head -n1; }
rust=() c=()
for _ in $(seq "$repeat"); do
    rust+=("$("$target/release/shmlock-bench" stream --system shmlock --ops "$ops" --json | ns)")
    c+=("$("$work/bench" --segment "$seg" --ops "$ops" --json | ns)")
done
median() { printf '%s\n' "$@" | sort -g | sed -n "$(( ($# + 1) / 2 ))p"; }
r="$(median "${rust[@]}")"
k="$(median "${c[@]}")"
echo "stream: $ops x { lock(\"ABCD\"); unlock } in one process; median of $repeat alternating runs"
echo "  rust (shmlock-bench stream): $r ns/pair   runs: ${rust[*]}"
echo "  c    (examples/bench.c):     $k ns/pair   runs: ${c[*]}"
awk -v r="$r" -v k="$k" 'BEGIN { printf "  ratio c/rust: %.3f (target: at most 1.2)\n", k / r }'
