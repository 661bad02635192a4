#!/usr/bin/env bash
# Installs libshmlock.so, libshmlock.a, shmlock.h and shmlock.pc into PREFIX:
#   bindings/c/install.sh /usr/local          # builds the release library first
#   SHMLOCK_LIB_DIR=target/debug bindings/c/install.sh /tmp/p   # installs an existing build
# Then: cc app.c $(PKG_CONFIG_PATH=PREFIX/lib/pkgconfig pkg-config --cflags --libs shmlock)
# (and LD_LIBRARY_PATH=PREFIX/lib, or -Wl,-rpath,PREFIX/lib, where PREFIX/lib is not searched).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
prefix="${1:?usage: install.sh PREFIX}"
mkdir -p "$prefix"
prefix="$(cd "$prefix" && pwd)"
libdir="${LIBDIR:-$prefix/lib}"
if [[ -z "${SHMLOCK_LIB_DIR:-}" ]]; then
    (cd "$here/../.." && cargo build --release -p shmlock-c)
    target="${CARGO_TARGET_DIR:-$here/../../target}"
    SHMLOCK_LIB_DIR="$target/release"
fi
version="$(sed -n 's/^version = "\(.*\)"/\1/p' "$here/Cargo.toml" | head -n1)"
install -d "$libdir/pkgconfig" "$prefix/include"
# The soname is libshmlock.so.ABI (build.rs); the development name points at it.
soname="$(objdump -p "$SHMLOCK_LIB_DIR/libshmlock.so" 2>/dev/null | sed -n 's/^ *SONAME *//p')"
soname="${soname:-libshmlock.so.1}"
install -m 0755 "$SHMLOCK_LIB_DIR/libshmlock.so" "$libdir/$soname"
ln -sf "$soname" "$libdir/libshmlock.so"
install -m 0644 "$SHMLOCK_LIB_DIR/libshmlock.a" "$libdir/libshmlock.a"
install -m 0644 "$here/include/shmlock.h" "$prefix/include/shmlock.h"
sed -e "s|@PREFIX@|$prefix|" -e "s|@LIBDIR@|$libdir|" -e "s|@VERSION@|$version|" \
    "$here/shmlock.pc.in" >"$libdir/pkgconfig/shmlock.pc"
echo "installed shmlock $version into $prefix (lib: $libdir, pkg-config: $libdir/pkgconfig/shmlock.pc)"
