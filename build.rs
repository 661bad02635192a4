//! Build script: one link argument, for the `shmlock` binary only.
//!
//! `shmlock` is linked as a position-dependent executable (`-no-pie`): its code is still compiled
//! position-independent (rustc's default), but the linker then resolves every address itself, so
//! the dynamic loader has none of the ~5,000 relative relocations of a PIE to apply at each start,
//! and no ~20 pages of them to copy on write. `shmlock run` pays every start before its command
//! starts, and in some VMs that is 0.1 ms of a 2 ms run (issue 14, `shmlock-bench run-overhead`).
//! The price: the binary's own code and data are at a fixed address (no ASLR for them; libraries,
//! heap and stack are still randomized), acceptable for a CLI that is neither setuid nor a server.
//!
//! Not for the library, the daemon, the bench or the bindings (they keep the toolchain's default);
//! not when the `cli` feature is off (no binaries are built); and not for a static build
//! (`crt-static`), which links as static-pie or static.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    let os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    let features = std::env::var("CARGO_CFG_TARGET_FEATURE").unwrap_or_default();
    let crt_static = features.split(',').any(|f| f == "crt-static");
    if os == "linux" && !crt_static && std::env::var_os("CARGO_FEATURE_CLI").is_some() {
        println!("cargo:rustc-link-arg-bin=shmlock=-no-pie");
    }
}
