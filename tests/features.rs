//! What a build of shmlock compiles, as `cargo tree` resolves it: a crate that only locks
//! (`default-features = false`) gets none of the daemon's, the gateway's or the CLI's
//! dependencies, and no build but the crate's own tests has the chaos hook (a process that kills
//! itself when `SHMLOCK_CHAOS_KILL_AFTER` is in its environment).

use std::collections::BTreeSet;
use std::process::Command;

/// `cargo tree -p shmlock` with `args`, one line per entry, offline (Cargo.lock decides).
fn tree(args: &[&str]) -> Vec<String> {
    let out = Command::new(env!("CARGO"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["tree", "--offline", "-p", "shmlock", "--prefix", "none"])
        .args(args)
        .output()
        .expect("run cargo tree");
    assert!(
        out.status.success(),
        "cargo tree {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .expect("utf-8")
        .lines()
        .map(str::to_string)
        .collect()
}

/// The crates a build with `features` compiles (normal and build dependencies, as a dependent
/// crate would get them; no dev-dependencies).
fn crates(features: &[&str]) -> BTreeSet<String> {
    let mut args = vec!["-e", "normal,build", "--format", "{p}"];
    let joined = features.join(",");
    if !features.contains(&"default") {
        args.push("--no-default-features");
    }
    if !joined.is_empty() {
        args.extend(["--features", &joined]);
    }
    tree(&args)
        .into_iter()
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect()
}

#[test]
fn local_locking_compiles_no_daemon_gateway_or_cli_dependencies() {
    let light = crates(&[]);
    for heavy in [
        "tokio",
        "clap",
        "anyhow",
        "toml",
        "tracing-subscriber",
        "serde",
        "serde_json",
        "humantime",
        "prometheus-client",
        "mio",
        "regex",
    ] {
        assert!(!light.contains(heavy), "a local-only build compiles {heavy}: {light:?}");
    }
    for needed in ["shmlock", "libc", "nix", "thiserror"] {
        assert!(light.contains(needed), "{needed} missing from {light:?}");
    }
    let full = crates(&["default"]);
    assert!(
        full.contains("tokio") && full.contains("clap"),
        "the default build has the binaries' deps"
    );
    assert!(
        light.len() * 2 < full.len(),
        "local-only {} crates against {} for the default build",
        light.len(),
        full.len()
    );
}

#[test]
fn no_build_but_the_tests_has_the_chaos_hook() {
    // The features of shmlock itself, as a dependent crate (or `cargo build`) gets them.
    for args in [
        &["-e", "normal,features"][..],
        &["-e", "normal,features", "--no-default-features"],
    ] {
        let mut a = args.to_vec();
        a.extend(["--format", "{p} {f}", "--depth", "0"]);
        let lines = tree(&a);
        let me = lines
            .iter()
            .find(|l| l.starts_with("shmlock "))
            .expect("shmlock's own line");
        assert!(!me.contains("chaos"), "{args:?}: {me}");
    }
    // And the tests do have it (the crash tests rely on it).
    let lines = tree(&["-e", "features", "--format", "{p} {f}", "--depth", "0"]);
    let me = lines
        .iter()
        .find(|l| l.starts_with("shmlock "))
        .expect("shmlock's own line");
    assert!(me.contains("chaos"), "with dev-dependencies: {me}");
}
