//! `shmlock run|locks|status --remote`: the CLI through a real `shmlockd` gateway.
//!
//! Each test has its own segment ([`TestEnv`]) and its own `shmlockd` on a free loopback port
//! (read back from its log), killed when the test ends; local lock holders are child processes
//! re-running this binary (see `common`). Every `shmlock` run has a deadline and is killed past it.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Instant;

use common::cli::*;
use common::{signal, wait_until, GatewayDaemon, TestEnv, DEADLINE};
use serde_json::Value;

// ---- child processes -------------------------------------------------------------------------

common::child_roles! {
    "hold" => role_hold,
}

// ---- the daemon and the CLI ------------------------------------------------------------------

fn shmlock_cmd(args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_shmlock"));
    cmd.args(args)
        .env_remove("SHMLOCK_SEGMENT")
        .env_remove("SHMLOCK_AUTH_TOKEN")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd
}

/// Runs `shmlock args` with the extra environment `env`, with a deadline.
fn shmlock_env(args: &[&str], env: &[(&str, &str)]) -> Output {
    let child = shmlock_cmd(args, env).spawn().expect("spawn shmlock");
    output_within(child, &format!("shmlock {args:?}"))
}

fn shmlock(args: &[&str]) -> Output {
    shmlock_env(args, &[])
}

/// `v` without the fields that are ages (`*_ms`), which differ between two snapshots.
fn without_ages(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.iter()
                .filter(|(k, _)| !k.ends_with("_ms"))
                .map(|(k, v)| (k.clone(), without_ages(v)))
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.iter().map(without_ages).collect()),
        v => v.clone(),
    }
}

/// The array `v` sorted by each element's `name`.
fn by_name(v: Value) -> Vec<Value> {
    let mut a = v.as_array().expect("array").clone();
    a.sort_by(|x, y| x["name"].as_str().cmp(&y["name"].as_str()));
    a
}

/// A `sh -c` script that touches `$1`, then waits (at most 30 s) for `$2` to exist.
const TOUCH_AND_WAIT: &str =
    r#"touch "$1"; i=0; while [ ! -e "$2" ] && [ $i -lt 3000 ]; do sleep 0.01; i=$((i+1)); done"#;

/// A `shmlock run` in the background (killed on drop), running [`TOUCH_AND_WAIT`] with
/// `started` and `go` in the test's directory; its stderr goes to file `{started}.err`.
struct Background {
    child: Option<Child>,
    err: PathBuf,
}

impl Background {
    fn start(env: &TestEnv, run_args: &[&str], started: &str, go: &str) -> Background {
        let (started_path, go_path) = (env.path(started), env.path(go));
        let (s, g) = (path_str(&started_path), path_str(&go_path));
        let mut args = vec!["run"];
        args.extend_from_slice(run_args);
        args.extend_from_slice(&["--", "sh", "-c", TOUCH_AND_WAIT, "sh", &s, &g]);
        let err = env.path(&format!("{started}.err"));
        let child = shmlock_cmd(&args, &[])
            .stderr(std::fs::File::create(&err).expect("create stderr file"))
            .spawn()
            .expect("spawn shmlock run");
        let mut bg = Background {
            child: Some(child),
            err,
        };
        wait_until(&format!("{started} to appear"), || {
            if let Some(st) = bg.child.as_mut().and_then(|c| c.try_wait().expect("waitpid")) {
                panic!("shmlock run exited early with {st}: {}", bg.stderr());
            }
            started_path.exists()
        });
        bg
    }

    /// The `shmlock` process's id.
    fn pid(&self) -> nix::unistd::Pid {
        nix::unistd::Pid::from_raw(self.child.as_ref().expect("child").id() as i32)
    }

    /// What it wrote to stderr so far.
    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.err).unwrap_or_default()
    }

    /// Waits for it to exit; its exit code and stderr.
    fn finish(mut self) -> (Option<i32>, String) {
        let out = output_within(self.child.take().expect("child"), "shmlock run");
        (out.status.code(), self.stderr())
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn path_str(p: &Path) -> String {
    p.to_str().expect("utf-8 path").to_string()
}

// ---- run --remote ----------------------------------------------------------------------------

#[test]
fn run_remote_and_local_holders_exclude_each_other() {
    let env = TestEnv::new("rr_excl");
    let d = GatewayDaemon::start(&env, None);
    // A local holder keeps `run --remote` out.
    let holder = spawn_holder(&env, &[("x", b"job")], "holder");
    let ran = path_str(&env.path("ran"));
    let o = shmlock(&["run", "--remote", &d.addr, "--nonblock", "job", "--", "touch", &ran]);
    assert_code(&o, EX_TEMPFAIL);
    let pid = env.pid(holder).to_string();
    assert!(
        stderr(&o).contains("busy") && stderr(&o).contains(&pid),
        "{}",
        stderr(&o)
    );
    let o = shmlock(&[
        "run",
        "--remote",
        &d.addr,
        "--timeout",
        "100ms",
        "job",
        "--",
        "touch",
        &ran,
    ]);
    assert_code(&o, EX_TEMPFAIL);
    assert!(stderr(&o).contains("not acquired"), "{}", stderr(&o));
    assert!(!env.path("ran").exists(), "the command ran without the lock");
    signal(&env.path("go"), "");
    env.wait_success(holder);

    // A `run --remote` holding the lock keeps local runs and other remote runs out.
    let bg = Background::start(&env, &["--remote", &d.addr, "job"], "started", "go-remote");
    let o = shmlock(&[
        "--segment",
        &env.segment,
        "run",
        "--nonblock",
        "job",
        "--",
        "touch",
        &ran,
    ]);
    assert_code(&o, EX_TEMPFAIL);
    let err = stderr(&o);
    assert!(
        err.contains("held by pid") && err.contains("(127.0.0.1:"),
        "the holder is a gateway session: {err}"
    );
    let o = shmlock(&["run", "--remote", &d.addr, "-n", "--shared", "job", "--", "touch", &ran]);
    assert_code(&o, EX_TEMPFAIL);
    assert!(!env.path("ran").exists(), "the command ran without the lock");
    signal(&env.path("go-remote"), "");
    assert_eq!(bg.finish(), (Some(0), String::new()), "a quiet run says nothing");
    // Released before `shmlock run --remote` exited: a local run gets it at once.
    let o = shmlock(&["--segment", &env.segment, "run", "--nonblock", "job", "--", "true"]);
    assert_code(&o, 0);
    env.assert_quiet();
}

#[test]
fn run_remote_exits_with_the_commands_status() {
    let env = TestEnv::new("rr_status");
    let d = GatewayDaemon::start(&env, None);
    let run = |args: &[&str]| {
        let mut a = vec!["run", "--remote", &d.addr, "job", "--"];
        a.extend_from_slice(args);
        shmlock(&a)
    };
    assert_code(&run(&["sh", "-c", "exit 7"]), 7);
    assert_code(&run(&["true"]), 0);
    assert_code(&run(&["sh", "-c", "kill -9 $$"]), 137);
    let o = run(&["/nonexistent/command"]);
    assert_code(&o, 127);
    assert!(stderr(&o).contains("cannot run /nonexistent/command"), "{}", stderr(&o));
    // The lock is held, by a remote owner, while the command runs.
    let o = run(&[
        env!("CARGO_BIN_EXE_shmlock"),
        "--segment",
        &env.segment,
        "locks",
        "--json",
    ]);
    let locks = json(&o);
    let job = find(&locks, "job");
    assert_eq!(job["mode"], "exclusive");
    assert_eq!(job["holders"][0]["kind"], "remote");
    let o = shmlock(&["run", "--remote", &d.addr, "--shared", "job", "--", "true"]);
    assert_code(&o, 0);
    // SIGTERM is passed on to the command; `shmlock` outlives it, releases, and passes its status
    // on (the client's threads must not take the signal).
    let bg = Background::start(&env, &["--remote", &d.addr, "job"], "started", "never");
    nix::sys::signal::kill(bg.pid(), nix::sys::signal::SIGTERM).expect("kill");
    let (code, err) = bg.finish();
    assert_eq!(code, Some(128 + 15), "{err}");
    // The `sleep` the shell ran when it was killed holds the lock's descriptor a moment longer
    // (as it would a flock(1) lock), and shmlock may say so; the lock is free once it is gone.
    assert!(err.is_empty() || err.contains("stays held by processes"), "{err}");
    let o = shmlock(&[
        "--segment",
        &env.segment,
        "run",
        "--timeout",
        "10s",
        "job",
        "--",
        "true",
    ]);
    assert_code(&o, 0);
    env.wait_for("the gateway sessions to end", |t| t.stats().owners == 0);
    env.assert_quiet();
}

#[test]
fn losing_the_gateway_while_the_command_runs_is_reported() {
    let env = TestEnv::new("rr_loss");
    let mut d = GatewayDaemon::start(&env, None);
    let kill = Background::start(
        &env,
        &["--remote", &d.addr, "--kill-on-loss", "a"],
        "started-a",
        "never",
    );
    let keep = Background::start(&env, &["--remote", &d.addr, "b"], "started-b", "go-b");
    d.kill();
    // --kill-on-loss: the command gets SIGTERM, and its status (128 + 15) is passed on.
    let (code, err) = kill.finish();
    assert_eq!(code, Some(128 + 15), "{err}");
    assert!(
        err.contains("lost the gateway connection") && err.contains("\"a\" is no longer held"),
        "{err}"
    );
    // Without it: a warning at once, the command runs on, and its status is passed on.
    wait_until("the loss warning", || keep.stderr().contains("\"b\" is no longer held"));
    assert!(keep.stderr().contains("keeps running"), "{}", keep.stderr());
    signal(&env.path("go-b"), "");
    let (code, err) = keep.finish();
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("ran partly without lock \"b\""), "{err}");
}

// ---- locks and status --remote ---------------------------------------------------------------

#[test]
fn locks_and_status_remote_show_what_a_local_process_holds() {
    let env = TestEnv::new("rr_locks");
    let d = GatewayDaemon::start(&env, None);
    let holder = spawn_holder(
        &env,
        &[
            ("x", b"orders/42"),
            ("s", b"config"),
            ("x", b"raw\xff\x01"),
            ("x", b"a b%"),
        ],
        "holder",
    );
    let pid = env.pid(holder);
    let seg = &env.segment;
    // JSON: the same as the local command's, but for the ages (and so the order).
    let remote = json(&shmlock(&["locks", "--remote", &d.addr, "--json"]));
    let local = json(&shmlock(&["--segment", seg, "locks", "--json"]));
    assert_eq!(by_name(without_ages(&remote)), by_name(without_ages(&local)));
    let o = find(&remote, "orders/42");
    assert_eq!(o["holders"][0]["pid"], pid);
    assert_eq!(o["holders"][0]["label"], "holder");
    assert_eq!(find(&remote, "config")["mode"], "shared");
    find(&remote, "raw\\xff\\x01");
    find(&remote, "a b%");
    let only = json(&shmlock(&[
        "locks",
        "--remote",
        &d.addr,
        "--name-prefix",
        "orders/",
        "--json",
    ]));
    assert_eq!(only.as_array().map(Vec::len), Some(1), "{only:#}");
    // Text: the same table.
    let o = shmlock(&["locks", "--remote", &d.addr]);
    assert_code(&o, 0);
    let text = stdout(&o);
    assert!(text.starts_with("NAME "), "{text}");
    assert!(
        text.contains("orders/42") && text.contains(&format!("{pid} (holder)")),
        "{text}"
    );
    assert_eq!(text.lines().count(), 5, "{text}");

    let st = json(&shmlock(&["status", "--remote", &d.addr, "--json"]));
    assert_eq!(st["segment"], seg.as_str());
    assert_eq!(st["check"]["completed"], true, "{st:#}");
    assert_eq!(st["check"]["violations"].as_array().map(Vec::len), Some(0));
    assert!(st["stats"]["held"].as_u64() >= Some(4), "{st:#}");
    assert!(st["supervisor"]["alive"].as_bool().expect("alive"), "{st:#}");
    let local = json(&shmlock(&["--segment", seg, "status", "--json"]));
    for key in ["capacities", "geometry", "layout_version", "size_bytes"] {
        assert_eq!(st[key], local[key], "{key}");
    }
    let o = shmlock(&["status", "--remote", &d.addr]);
    assert_code(&o, 0);
    let text = stdout(&o);
    assert!(text.starts_with(&format!("segment    {seg} ")), "{text}");
    assert!(text.contains("\ncheck      ok\n"), "{text}");

    signal(&env.path("go"), "");
    env.wait_success(holder);
    let o = shmlock(&["locks", "--remote", &d.addr]);
    assert_eq!(stdout(&o), "no locks held or waited on\n");
}

#[test]
fn locks_remote_pages_through_many_locks() {
    let caps = shmlock::Capacities {
        max_locks: 2048,
        max_holds: 2048,
        max_owners: 32,
        ..Default::default()
    };
    let env = TestEnv::with_caps("rr_pages", &caps);
    let d = GatewayDaemon::start(&env, None);
    // More locks than one page (1000) of `LOCKS` holds.
    let names: Vec<String> = (0..1100).map(|i| format!("n{i:04}")).collect();
    let spec: Vec<(&str, &[u8])> = names.iter().map(|n| ("x", n.as_bytes())).collect();
    let holder = spawn_holder(&env, &spec, "many");
    let remote = json(&shmlock(&["locks", "--remote", &d.addr, "--json"]));
    let mut got: Vec<&str> = remote
        .as_array()
        .expect("array")
        .iter()
        .map(|l| l["name"].as_str().expect("name"))
        .collect();
    got.sort_unstable();
    assert_eq!(got, names.iter().map(String::as_str).collect::<Vec<_>>());
    signal(&env.path("go"), "");
    env.wait_success(holder);
}

// ---- authentication and errors ---------------------------------------------------------------

#[test]
fn a_gateway_with_a_token_wants_it_and_takes_it() {
    let env = TestEnv::new("rr_auth");
    let d = GatewayDaemon::start(&env, Some("[gateway]\nauth_token = \"s3cret\"\n"));
    let token_file = env.path("token");
    std::fs::write(&token_file, "s3cret\n").expect("write token");
    let token_file = path_str(&token_file);
    // Without the token: one clear line, exit 2, the command not run.
    let ran = path_str(&env.path("ran"));
    for args in [
        vec!["locks", "--remote", &d.addr],
        vec!["status", "--remote", &d.addr],
        vec!["run", "--remote", &d.addr, "job", "--", "touch", &ran],
    ] {
        let o = shmlock(&args);
        assert_error_line(
            &o,
            &["requires authentication", "--auth-token-file", "SHMLOCK_AUTH_TOKEN"],
        );
    }
    assert!(!env.path("ran").exists(), "the command ran without the lock");
    // A wrong token is refused.
    let o = shmlock_env(&["locks", "--remote", &d.addr], &[("SHMLOCK_AUTH_TOKEN", "wrong")]);
    assert_error_line(&o, &["refused the token"]);
    let o = shmlock_env(
        &["run", "--remote", &d.addr, "j", "--", "true"],
        &[("SHMLOCK_AUTH_TOKEN", "wrong")],
    );
    assert_error_line(&o, &["refused the token"]);
    // With it, from the environment or a file.
    let o = shmlock_env(&["locks", "--remote", &d.addr], &[("SHMLOCK_AUTH_TOKEN", "s3cret")]);
    assert_code(&o, 0);
    let o = shmlock(&[
        "status",
        "--remote",
        &d.addr,
        "--auth-token-file",
        &token_file,
        "--json",
    ]);
    json(&o);
    let o = shmlock(&[
        "run",
        "--remote",
        &d.addr,
        "--auth-token-file",
        &token_file,
        "job",
        "--",
        "sh",
        "-c",
        "exit 3",
    ]);
    assert_code(&o, 3);
    // The gateway itself refuses the admin queries before AUTH (not just the CLI).
    let mut s = TcpStream::connect(&d.addr).expect("connect");
    s.set_read_timeout(Some(DEADLINE)).expect("timeout");
    let mut rd = BufReader::new(s.try_clone().expect("clone"));
    let mut line = String::new();
    rd.read_line(&mut line).expect("greeting");
    assert!(line.contains("auth=required"), "{line}");
    s.write_all(b"1 LOCKS\n2 STATUS CHECK\n3 AUTH s3cret\n4 STATUS\n")
        .expect("send");
    let mut lines = Vec::new();
    let deadline = Instant::now() + DEADLINE;
    while !lines.last().is_some_and(|l: &String| l.starts_with("4 END")) {
        assert!(Instant::now() < deadline, "no END: {lines:?}");
        line.clear();
        assert!(rd.read_line(&mut line).expect("read") > 0, "closed: {lines:?}");
        lines.push(line.trim_end().to_string());
    }
    assert!(lines[0].starts_with("1 ERR AUTH_REQUIRED"), "{lines:?}");
    assert!(lines[1].starts_with("2 ERR AUTH_REQUIRED"), "{lines:?}");
    assert_eq!(lines[2], "3 OK");
    assert!(lines.iter().any(|l| l == "4 CHECK SKIPPED"), "{lines:?}");
}

#[test]
fn unreachable_gateways_and_unsupported_uses_are_clear_errors() {
    let env = TestEnv::new("rr_errors");
    // A port nobody listens on: bound, then closed.
    let port = TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let addr = format!("127.0.0.1:{port}");
    let ran = path_str(&env.path("ran"));
    for args in [
        vec!["locks", "--remote", &addr],
        vec!["status", "--remote", &addr, "--json"],
        vec!["run", "--remote", &addr, "job", "--", "touch", &ran],
    ] {
        let o = shmlock(&args);
        assert_error_line(&o, &["cannot connect to the gateway at", &addr]);
        assert_eq!(stdout(&o), "");
    }
    assert!(!env.path("ran").exists(), "the command ran without the lock");
    let o = shmlock(&["locks", "--remote", "localhost"]);
    assert_error_line(&o, &["HOST:PORT"]);
    let o = shmlock(&["--segment", &env.segment, "locks", "--remote", &addr]);
    assert_error_line(&o, &["--segment and --remote"]);
    // Local-only subcommands do not take --remote.
    for args in [
        vec!["owners", "--remote", &addr],
        vec!["show", "x", "--remote", &addr],
        vec!["release", "x", "--force", "--remote", &addr],
        vec!["check", "--remote", &addr],
        vec!["watch", "--remote", &addr],
    ] {
        let o = shmlock(&args);
        assert_code(&o, 2);
        assert!(stderr(&o).contains("--remote"), "{args:?}: {}", stderr(&o));
    }
    // --auth-token-file and --kill-on-loss mean nothing without --remote.
    let o = shmlock(&["--segment", &env.segment, "locks", "--auth-token-file", "/x"]);
    assert_code(&o, 2);
    let o = shmlock(&["--segment", &env.segment, "run", "--kill-on-loss", "x", "--", "true"]);
    assert_code(&o, 2);
}
