//! What the CLI tests (tests/cli.rs, tests/cli_remote.rs) share: the `hold` child role, running
//! and judging `shmlock` commands.
#![allow(dead_code)]

use std::process::{Child, Command, Output};
use std::time::Duration;

use serde_json::Value;
use shmlock::Error;

use super::{await_file, signal, ChildCtx, ChildId, TestEnv, DEADLINE};

/// `shmlock run`'s exit status when the lock was not had in time (EX_TEMPFAIL).
pub(crate) const EX_TEMPFAIL: i32 = 75;

/// Names are passed as hex so that any bytes can be.
pub(crate) fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

pub(crate) fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
        .collect()
}

/// Holds every lock in `locks` (`x:HEXNAME` exclusive, `s:HEXNAME` shared, comma separated)
/// under one client labelled `label`, `gap_ms` apart if given, writes file `held`, waits for file `go`, then unlocks
/// each with `LockGuard::unlock` and writes the results (`ok` or `not-held`, one line each) to
/// file `result`.
pub(crate) fn role_hold(ctx: &ChildCtx) {
    let locks: String = ctx.param("locks");
    let label: String = ctx.param("label");
    let client = ctx.client(&label);
    let gap = Duration::from_millis(ctx.opt_param("gap_ms").map_or(0, |g| g.parse().expect("gap_ms")));
    let guards: Vec<_> = locks
        .split(',')
        .map(|l| {
            std::thread::sleep(gap);
            let (mode, name) = l.split_once(':').expect("mode:name");
            let name = unhex(name);
            match mode {
                "x" => client.lock(&name),
                _ => client.lock_shared(&name),
            }
            .expect("lock")
        })
        .collect();
    signal(&ctx.path("held"), "");
    await_file(&ctx.path("go"));
    let results: Vec<&str> = guards
        .into_iter()
        .map(|g| match g.unlock() {
            Ok(()) => "ok",
            Err(Error::NotHeld) => "not-held",
            Err(e) => panic!("unlock: {e}"),
        })
        .collect();
    signal(&ctx.path("result"), &results.join("\n"));
}

pub(crate) fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub(crate) fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Asserts the exit code, showing the output otherwise.
#[track_caller]
pub(crate) fn assert_code(o: &Output, code: i32) {
    assert_eq!(
        o.status.code(),
        Some(code),
        "exit status {}\nstdout:\n{}\nstderr:\n{}",
        o.status,
        stdout(o),
        stderr(o)
    );
}

/// Asserts a failure with exactly one line on stderr that contains every one of `parts`.
#[track_caller]
pub(crate) fn assert_error_line(o: &Output, parts: &[&str]) {
    assert_code(o, 2);
    let err = stderr(o);
    assert_eq!(err.lines().count(), 1, "expected one line on stderr, got:\n{err}");
    assert!(err.starts_with("shmlock: "), "{err}");
    for p in parts {
        assert!(err.contains(p), "stderr lacks {p:?}:\n{err}");
    }
}

pub(crate) fn json(o: &Output) -> Value {
    assert_code(o, 0);
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", stdout(o)))
}

/// A child holding `locks` (see [`role_hold`]); returns once it holds them all.
pub(crate) fn spawn_holder(env: &TestEnv, locks: &[(&str, &[u8])], label: &str) -> ChildId {
    spawn_holder_apart(env, locks, label, 0)
}

/// [`spawn_holder`] taking the locks `gap_ms` apart (so that "longest held first" has one
/// right order).
pub(crate) fn spawn_holder_apart(env: &TestEnv, locks: &[(&str, &[u8])], label: &str, gap_ms: u64) -> ChildId {
    let spec: Vec<String> = locks.iter().map(|(m, n)| format!("{m}:{}", hex(n))).collect();
    let id = env.spawn(
        "hold",
        &[("locks", &spec.join(",")), ("label", &label), ("gap_ms", &gap_ms)],
    );
    env.wait_for("the holder to hold its locks", |_| env.path("held").exists());
    id
}

/// The lock named `name` in a `locks --json` array.
pub(crate) fn find<'a>(locks: &'a Value, name: &str) -> &'a Value {
    locks
        .as_array()
        .expect("array")
        .iter()
        .find(|l| l["name"] == name)
        .unwrap_or_else(|| panic!("no lock {name:?} in {locks:#}"))
}

/// Waits for `child`'s output, killing it (and failing) after [`DEADLINE`].
pub(crate) fn output_within(child: Child, what: &str) -> Output {
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(DEADLINE) {
        Ok(out) => out.expect("wait for shmlock"),
        Err(_) => {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            panic!("{what} did not exit within {DEADLINE:?}; killed");
        }
    }
}

/// A script that marks `$1/FILE` (through a rename, so a reader never sees it half written).
pub(crate) fn mark(file: &str) -> String {
    format!(r#"echo "$$ $SHMLOCK_OWNER_DIED" > "$1/{file}.tmp"; mv "$1/{file}.tmp" "$1/{file}""#)
}

/// A script that waits (at most 30 s) for `$1/FILE` to exist.
pub(crate) fn await_go(file: &str) -> String {
    format!(r#"i=0; while [ ! -e "$1/{file}" ] && [ $i -lt 3000 ]; do sleep 0.01; i=$((i+1)); done"#)
}

/// The test's directory, as the scripts' `$1`.
pub(crate) fn dir(env: &TestEnv) -> String {
    env.dir.to_str().expect("utf-8 dir").to_string()
}
