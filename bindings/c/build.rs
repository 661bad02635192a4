//! The shared library's soname carries the ABI version: libshmlock.so.1 while
//! `SHMLOCK_ABI_VERSION` is 1 (a unit test in src/lib.rs holds the two together).

const SONAME: &str = "libshmlock.so.1";

fn main() {
    println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,{SONAME}");
    println!("cargo:rerun-if-changed=build.rs");
}
