//! `shmlock run` as trustworthy as flock(1): the lock lives as long as the command (and what it
//! leaves running), whatever happens to the `shmlock` process; the command sees its grant; the
//! options mean what flock(1)'s mean.
//!
//! Real processes throughout: `shmlock run` is started as the binary, killed with SIGKILL, and
//! its commands are `sh` scripts that report through files in the test's directory (`$1`).
//! Each test has its own segment ([`TestEnv`]); without `shmlockd` unless it says so.

mod common;

use std::fs;
use std::process::{Child, Command, Output, Stdio};

use common::cli::*;
use common::{await_file, signal, wait_until, Daemon, GatewayDaemon, TestEnv};
use serde_json::Value;

common::child_roles! {
    "hold" => role_hold,
}

/// `shmlock` with `args` on the test's segment (or none, for `--remote`), output piped.
fn cmd(env: &TestEnv, args: &[&str], vars: &[(&str, &str)]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_shmlock"));
    if !args.contains(&"--remote") {
        c.args(["--segment", &env.segment]);
    }
    c.args(args)
        .env_remove("SHMLOCK_SEGMENT")
        .env_remove("SHMLOCK_HELD")
        .env_remove("SHMLOCK_RUN_TEST_STALL")
        .current_dir(&env.dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in vars {
        c.env(k, v);
    }
    c
}

/// Runs `shmlock args` to completion (with a deadline).
fn shmlock(env: &TestEnv, args: &[&str]) -> Output {
    let child = cmd(env, args, &[]).spawn().expect("spawn shmlock");
    output_within(child, &format!("shmlock {args:?}"))
}

/// Starts `shmlock args` in the background, its stdout and stderr in files `{tag}.out` and
/// `{tag}.err` (so that nothing waits for pipes it leaves open).
fn start(env: &TestEnv, tag: &str, args: &[&str], vars: &[(&str, &str)]) -> Child {
    let out = fs::File::create(env.path(&format!("{tag}.out"))).expect("create out");
    let err = fs::File::create(env.path(&format!("{tag}.err"))).expect("create err");
    cmd(env, args, vars)
        .stdout(out)
        .stderr(err)
        .spawn()
        .expect("spawn shmlock run")
}

/// What the background run `tag` wrote to stderr.
fn err_of(env: &TestEnv, tag: &str) -> String {
    fs::read_to_string(env.path(&format!("{tag}.err"))).unwrap_or_default()
}

/// SIGKILLs `child` and reaps it.
fn kill9(child: &mut Child) {
    child.kill().expect("SIGKILL");
    child.wait().expect("reap");
}

/// Waits (with a deadline) for `child` to exit; its exit code.
fn exit_code(child: Child) -> Option<i32> {
    output_within(child, "shmlock run").status.code()
}

/// Whether `shmlock` has the tests' stall hook (`SHMLOCK_RUN_TEST_STALL`): debug builds only,
/// as this test's own build (the binaries are built with the tests' profile).
fn stall_hook() -> bool {
    if !cfg!(debug_assertions) {
        eprintln!("skipped: shmlock's stall hook is in debug builds only");
    }
    cfg!(debug_assertions)
}

/// `run -n NAME true` finds the lock busy.
#[track_caller]
fn assert_busy(env: &TestEnv, name: &str) {
    let o = shmlock(env, &["run", "-n", name, "--", "true"]);
    assert_code(&o, EX_TEMPFAIL);
}

/// A run on `name` that waits for the lock and writes `$SHMLOCK_OWNER_DIED`, and whether file
/// `after` existed when it started, to `{tag}.out`; its output once done.
fn next_holder_sees(env: &TestEnv, name: &str, after: &str) -> String {
    let script = format!(r#"echo "died=$SHMLOCK_OWNER_DIED"; [ -e "$1/{after}" ] && echo after || echo before"#);
    let o = shmlock(env, &["run", "-w", "20", name, "sh", "-c", &script, "sh", &dir(env)]);
    assert_code(&o, 0);
    stdout(&o)
}

// ---- 1. the lock lives as long as the command ----------------------------------------------

/// `kill -9` of `shmlock run` while its command runs: the lock stays held (a second run waits),
/// until the command ends; the next holder is told the owner died.
fn wrapper_killed_while_the_command_runs(env: &TestEnv) {
    let script = format!("{}; {}; {}", mark("started"), await_go("go"), mark("done"));
    let mut w = start(
        env,
        "first",
        &["run", "job", "--", "sh", "-c", &script, "sh", &dir(env)],
        &[],
    );
    await_file(&env.path("started"));
    kill9(&mut w);
    assert_busy(env, "job");
    // A second run queues behind the command, which still runs.
    let second = start(
        env,
        "second",
        &[
            "run",
            "job",
            "sh",
            "-c",
            r#"echo "died=$SHMLOCK_OWNER_DIED"; [ -e "$1/done" ] && echo after || echo before"#,
            "sh",
            &dir(env),
        ],
        &[],
    );
    env.wait_for("the second run to queue", |t| {
        t.lock_info(b"job").ok().flatten().is_some_and(|l| l.waiters.len() == 1)
    });
    assert!(!env.path("done").exists());
    signal(&env.path("go"), "");
    assert_eq!(exit_code(second), Some(0), "{}", err_of(env, "second"));
    let out = fs::read_to_string(env.path("second.out")).expect("second.out");
    assert_eq!(
        out, "died=1\nafter\n",
        "the second run started before the command ended"
    );
    env.wait_for("the lock to be free", |t| t.stats().held == 0);
    env.assert_quiet();
}

#[test]
fn wrapper_killed_while_the_command_runs_keeps_the_lock_without_shmlockd() {
    let env = TestEnv::new("run_kill_wrapper");
    wrapper_killed_while_the_command_runs(&env);
}

#[test]
fn wrapper_killed_while_the_command_runs_keeps_the_lock_with_shmlockd() {
    let env = TestEnv::new("run_kill_wrapper_d");
    let _d = Daemon::start(&env);
    wrapper_killed_while_the_command_runs(&env);
}

#[test]
fn wrapper_and_command_both_killed_release_with_owner_died() {
    let env = TestEnv::new("run_kill_both");
    let script = format!("{}; exec sleep 30", mark("started"));
    let mut w = start(
        &env,
        "first",
        &["run", "job", "sh", "-c", &script, "sh", &dir(&env)],
        &[],
    );
    let started = await_file(&env.path("started"));
    let pid: i32 = started.split_whitespace().next().expect("pid").parse().expect("pid");
    kill9(&mut w);
    assert_busy(&env, "job");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::SIGKILL).expect("kill command");
    assert_eq!(next_holder_sees(&env, "job", "never"), "died=1\nbefore\n");
    env.assert_quiet();
}

#[test]
fn wrapper_killed_before_it_starts_the_command_releases_with_owner_died() {
    if !stall_hook() {
        return;
    }
    let env = TestEnv::new("run_kill_granted");
    let stall = format!("granted:{}", dir(&env));
    let mut w = start(
        &env,
        "first",
        &["run", "job", "sh", "-c", &mark("ran"), "sh", &dir(&env)],
        &[("SHMLOCK_RUN_TEST_STALL", &stall)],
    );
    await_file(&env.path("stalled-granted"));
    assert_busy(&env, "job");
    kill9(&mut w);
    assert_eq!(next_holder_sees(&env, "job", "ran"), "died=1\nbefore\n");
    assert!(!env.path("ran").exists(), "the command ran after its wrapper died");
    env.assert_quiet();
}

#[test]
fn wrapper_killed_between_fork_and_exec_leaves_the_lock_with_the_command() {
    if !stall_hook() {
        return;
    }
    let env = TestEnv::new("run_kill_exec");
    let stall = format!("exec:{}", dir(&env));
    let script = format!("{}; {}", mark("ran"), await_go("go"));
    let mut w = start(
        &env,
        "first",
        &["run", "job", "sh", "-c", &script, "sh", &dir(&env)],
        &[("SHMLOCK_RUN_TEST_STALL", &stall)],
    );
    await_file(&env.path("stalled-exec"));
    kill9(&mut w);
    assert_busy(&env, "job");
    // The command's process goes on to exec the command, which runs holding the lock.
    signal(&env.path("go-exec"), "");
    await_file(&env.path("ran"));
    assert_busy(&env, "job");
    signal(&env.path("go"), "");
    assert_eq!(next_holder_sees(&env, "job", "never"), "died=1\nbefore\n");
    env.assert_quiet();
}

#[test]
fn background_children_keep_the_lock_unless_close() {
    let env = TestEnv::new("run_background");
    // The command starts a child in the background and exits at once.
    let bg = format!(
        r#"sh -c '{}; {}' sh "$1" >/dev/null 2>&1 &"#,
        await_go("go"),
        mark("bgdone")
    );
    let o = shmlock(&env, &["run", "job", "sh", "-c", &bg, "sh", &dir(&env)]);
    assert_code(&o, 0);
    assert!(
        stderr(&o).contains("stays held by processes that sh left running"),
        "{}",
        stderr(&o)
    );
    assert_busy(&env, "job");
    signal(&env.path("go"), "");
    assert_eq!(next_holder_sees(&env, "job", "bgdone"), "died=0\nafter\n");

    // With -o the background child does not hold it.
    fs::remove_file(env.path("go")).expect("rm go");
    let bg = format!(
        r#"sh -c '{}; {}' sh "$1" >/dev/null 2>&1 &"#,
        await_go("go"),
        mark("bgdone2")
    );
    let o = shmlock(&env, &["run", "-o", "job", "sh", "-c", &bg, "sh", &dir(&env)]);
    assert_code(&o, 0);
    assert_eq!(stderr(&o), "");
    assert_eq!(next_holder_sees(&env, "job", "bgdone2"), "died=0\nbefore\n");
    signal(&env.path("go"), "");
    await_file(&env.path("bgdone2"));
    env.assert_quiet();
}

#[test]
fn a_command_that_ends_is_no_owner_died_whatever_its_status() {
    let env = TestEnv::new("run_clean");
    assert_code(&shmlock(&env, &["run", "job", "true"]), 0);
    assert_eq!(next_holder_sees(&env, "job", "x"), "died=0\nbefore\n");
    assert_code(&shmlock(&env, &["run", "job", "sh", "-c", "exit 7"]), 7);
    assert_eq!(next_holder_sees(&env, "job", "x"), "died=0\nbefore\n");
    assert_code(&shmlock(&env, &["run", "job", "sh", "-c", "kill -9 $$"]), 137);
    assert_eq!(next_holder_sees(&env, "job", "x"), "died=0\nbefore\n");
    // The release is done when shmlock exits: the next run does not wait.
    assert_code(&shmlock(&env, &["run", "-n", "job", "true"]), 0);
    env.assert_quiet();
}

// ---- 2. the grant in the command's environment ---------------------------------------------

const SHOW_GRANT: &str = r#"echo "$SHMLOCK_NAME|$SHMLOCK_MODE|$SHMLOCK_TOKEN|$SHMLOCK_OWNER_DIED""#;

/// `NAME|MODE|TOKEN|DIED` as the command saw them.
fn grant_seen(o: &Output) -> (String, String, u64, String) {
    assert_code(o, 0);
    let out = stdout(o);
    let f: Vec<&str> = out.trim_end().split('|').collect();
    assert_eq!(f.len(), 4, "{out}");
    (f[0].into(), f[1].into(), f[2].parse().expect("token"), f[3].into())
}

#[test]
fn the_command_sees_its_grant() {
    let env = TestEnv::new("run_env");
    let (name, mode, t1, died) = grant_seen(&shmlock(&env, &["run", "orders/42", "sh", "-c", SHOW_GRANT]));
    assert_eq!(
        (name.as_str(), mode.as_str(), died.as_str()),
        ("orders/42", "exclusive", "0")
    );
    let (_, mode, t2, _) = grant_seen(&shmlock(&env, &["run", "-s", "orders/42", "-c", SHOW_GRANT]));
    assert_eq!(mode, "shared");
    assert!(t2 > t1, "tokens grow: {t1} then {t2}");
    // The token is the one the table shows for the holder.
    let script = format!(
        r#"echo $SHMLOCK_TOKEN; "{}" --segment "{}" locks --json"#,
        env!("CARGO_BIN_EXE_shmlock"),
        env.segment
    );
    let o = shmlock(&env, &["run", "tok", "sh", "-c", &script]);
    assert_code(&o, 0);
    let out = stdout(&o);
    let (token, json) = out.split_once('\n').expect("two parts");
    let locks: Value = serde_json::from_str(json).expect("json");
    assert_eq!(find(&locks, "tok")["holders"][0]["token"].to_string(), token);
    env.assert_quiet();
}

#[test]
fn the_command_sees_its_grant_through_the_gateway() {
    let env = TestEnv::new("run_env_remote");
    let d = GatewayDaemon::start(&env, None);
    let o = shmlock(&env, &["run", "--remote", &d.addr, "orders/42", "sh", "-c", SHOW_GRANT]);
    let (name, mode, t1, died) = grant_seen(&o);
    assert_eq!(
        (name.as_str(), mode.as_str(), died.as_str()),
        ("orders/42", "exclusive", "0")
    );
    let o = shmlock(&env, &["run", "--remote", &d.addr, "-s", "orders/42", "-c", SHOW_GRANT]);
    let (_, mode, t2, _) = grant_seen(&o);
    assert_eq!(mode, "shared");
    assert!(t2 > t1, "tokens grow: {t1} then {t2}");
    env.wait_for("the gateway sessions to end", |t| t.stats().owners == 0);
    env.assert_quiet();
}

#[test]
fn through_the_gateway_the_lock_outlives_a_killed_wrapper() {
    let env = TestEnv::new("run_kill_remote");
    let d = GatewayDaemon::start(&env, None);
    let script = format!("{}; {}; {}", mark("started"), await_go("go"), mark("done"));
    let mut w = start(
        &env,
        "first",
        &["run", "--remote", &d.addr, "job", "sh", "-c", &script, "sh", &dir(&env)],
        &[],
    );
    await_file(&env.path("started"));
    kill9(&mut w);
    assert_busy(&env, "job");
    env.wait_for("the lock to be held by a gateway session", |t| {
        t.lock_info(b"job")
            .ok()
            .flatten()
            .is_some_and(|l| l.holders.len() == 1 && l.holders[0].kind == Some(shmlock::owner::OwnerKind::Remote))
    });
    signal(&env.path("go"), "");
    let script = r#"echo "died=$SHMLOCK_OWNER_DIED"; [ -e "$1/done" ] && echo after || echo before"#;
    let o = shmlock(
        &env,
        &[
            "run",
            "--remote",
            &d.addr,
            "-w",
            "20",
            "job",
            "sh",
            "-c",
            script,
            "sh",
            &dir(&env),
        ],
    );
    assert_code(&o, 0);
    assert_eq!(stdout(&o), "died=1\nafter\n");
    env.wait_for("the gateway sessions to end", |t| t.stats().owners == 0);
    env.assert_quiet();
}

// ---- 3. flock(1)'s options -------------------------------------------------------------------

#[test]
fn flock_options_mean_what_they_mean_for_flock() {
    let env = TestEnv::new("run_flock_opts");
    let holder = spawn_holder(&env, &[("x", b"busy")], "holder");
    // -n, -w SECONDS (fractions, 0 = -n), unit forms, -E.
    for args in [
        &["run", "-n", "busy", "true"][..],
        &["run", "--nb", "busy", "true"],
        &["run", "-w", "0.1", "busy", "true"],
        &["run", "-w", ".05", "busy", "true"],
        &["run", "-w", "0", "busy", "true"],
        &["run", "--wait", "50ms", "busy", "true"],
        &["run", "--timeout", "1", "-s", "busy", "true"],
    ] {
        assert_code(&shmlock(&env, args), EX_TEMPFAIL);
    }
    assert_code(&shmlock(&env, &["run", "-n", "-E", "9", "busy", "true"]), 9);
    assert_code(&shmlock(&env, &["run", "-E", "0", "-w", "0.01", "busy", "true"]), 0);
    let o = shmlock(&env, &["run", "-w", "soon", "busy", "true"]);
    assert_code(&o, 2);
    assert!(stderr(&o).contains("250ms"), "{}", stderr(&o));
    signal(&env.path("go"), "");
    env.wait_success(holder);
    // -c STRING through sh -c; -x and -e are exclusive; `--` optional, CMD's own options kept.
    assert_code(&shmlock(&env, &["run", "-x", "job", "-c", "exit 4"]), 4);
    assert_code(&shmlock(&env, &["run", "-c", "exit 5", "job"]), 5);
    let o = shmlock(&env, &["run", "-e", "job", "sh", "-c", "echo $SHMLOCK_MODE $0", "-n"]);
    assert_code(&o, 0);
    assert_eq!(stdout(&o), "exclusive -n\n");
    let o = shmlock(&env, &["run", "job", "--", "echo", "-n", "x"]);
    assert_eq!(stdout(&o), "x");
    let o = shmlock(&env, &["run", "-s", "-x", "job", "true"]);
    assert_code(&o, 2);
    let o = shmlock(&env, &["run", "job", "-c", "true", "echo"]);
    assert_code(&o, 2);
    let o = shmlock(&env, &["run", "job"]);
    assert_code(&o, 2);
    env.assert_quiet();
}

#[test]
fn the_command_is_found_on_path_as_execvp_finds_it() {
    // `run` looks CMD up on PATH itself (before the grant): the same file as execvp(3) would run,
    // with the same argv[0].
    use std::os::unix::fs::{symlink, PermissionsExt};
    let env = TestEnv::new("run_path");
    for d in ["dir", "plain", "exe"] {
        fs::create_dir(env.path(d)).expect("mkdir");
    }
    fs::create_dir(env.path("dir/prog")).expect("mkdir"); // a directory: skipped
    fs::write(env.path("plain/prog"), "#!/bin/sh\necho plain\n").expect("write"); // not executable: skipped
    fs::write(env.path("exe/prog"), "#!/bin/sh\necho exe\n").expect("write");
    fs::set_permissions(env.path("exe/prog"), fs::Permissions::from_mode(0o755)).expect("chmod");
    symlink("/bin/sh", env.path("exe/myname")).expect("symlink");
    fs::write(env.path("here"), "#!/bin/sh\necho here\n").expect("write");
    fs::set_permissions(env.path("here"), fs::Permissions::from_mode(0o755)).expect("chmod");
    let run = |path: &str, args: &[&str]| {
        let mut a = vec!["run", "job", "--"];
        a.extend_from_slice(args);
        output_within(
            cmd(&env, &a, &[("PATH", path)]).spawn().expect("spawn shmlock"),
            "shmlock run",
        )
    };
    let o = run("dir:plain:exe:/usr/bin:/bin", &["prog"]);
    assert_code(&o, 0);
    assert_eq!(stdout(&o), "exe\n");
    let o = run("exe:/usr/bin:/bin", &["myname", "-c", "echo $0"]);
    assert_eq!(stdout(&o), "myname\n", "argv[0] is the name as given");
    let o = run(":/usr/bin:/bin", &["here"]);
    assert_eq!(stdout(&o), "here\n", "an empty PATH entry is the current directory");
    let o = run("dir:/usr/bin:/bin", &["prog"]);
    assert_code(&o, 126);
    let o = run("plain:/usr/bin:/bin", &["prog"]);
    assert_code(&o, 126);
    let o = run("/usr/bin:/bin", &["no-such-program-anywhere"]);
    assert_code(&o, 127);
    assert!(
        stderr(&o).contains("cannot run no-such-program-anywhere"),
        "{}",
        stderr(&o)
    );
    env.assert_quiet();
}

#[test]
fn a_nested_run_on_a_lock_its_enclosing_run_holds_says_so_at_once() {
    let env = TestEnv::new("run_nested");
    let me = env!("CARGO_BIN_EXE_shmlock");
    let seg = env.segment.clone();
    let inner = |mode: &str| format!(r#""{me}" --segment "{seg}" run {mode} job true; echo "inner=$?""#);
    let o = shmlock(&env, &["run", "job", "sh", "-c", &inner("")]);
    assert_code(&o, 0);
    assert_eq!(stdout(&o), format!("inner={EX_TEMPFAIL}\n"));
    assert!(stderr(&o).contains("enclosing `shmlock run`"), "{}", stderr(&o));
    let o = shmlock(&env, &["run", "-s", "job", "sh", "-c", &inner("-x")]);
    assert_eq!(stdout(&o), format!("inner={EX_TEMPFAIL}\n"));
    // Shared in shared: granted.
    let o = shmlock(&env, &["run", "-s", "job", "sh", "-c", &inner("-s")]);
    assert_eq!(stdout(&o), "inner=0\n");
    // Another name, or the same name once the enclosing lock is gone: no complaint.
    let o = shmlock(
        &env,
        &["run", "job", "sh", "-c", &inner("").replace(" job ", " other ")],
    );
    assert_eq!(stdout(&o), "inner=0\n");
    let o = shmlock(&env, &["run", "-o", "job", "true"]);
    assert_code(&o, 0);
    env.assert_quiet();
}

#[test]
fn a_lock_lost_while_the_command_runs_is_reported_and_can_be_the_status() {
    let env = TestEnv::new("run_lost");
    let force = format!(
        r#""{}" --segment "{}" release --force job >/dev/null"#,
        env!("CARGO_BIN_EXE_shmlock"),
        env.segment
    );
    let o = shmlock(&env, &["run", "job", "sh", "-c", &force]);
    assert_code(&o, 0);
    assert!(stderr(&o).contains("taken away"), "{}", stderr(&o));
    let o = shmlock(&env, &["run", "--lost-exit-code", "9", "job", "sh", "-c", &force]);
    assert_code(&o, 9);
    assert!(stderr(&o).contains("taken away"), "{}", stderr(&o));
    let o = shmlock(&env, &["run", "--lost-exit-code", "9", "job", "true"]);
    assert_code(&o, 0);
    env.assert_quiet();
}

#[test]
fn the_keeper_is_not_in_the_jobs_process_group() {
    // A kill of the job's process group (what a shell's job control, or a service manager that
    // kills by group, does) reaches the wrapper and the command, not the keeper: the lock is
    // released with the owner-died notice, not left to a reaper.
    let env = TestEnv::new("run_pgrp");
    let script = format!("{}; exec sleep 30", mark("started"));
    let mut c = cmd(&env, &["run", "job", "sh", "-c", &script, "sh", &dir(&env)], &[]);
    std::os::unix::process::CommandExt::process_group(&mut c, 0);
    let mut w = c.stdout(Stdio::null()).stderr(Stdio::null()).spawn().expect("spawn");
    await_file(&env.path("started"));
    let pgid = nix::unistd::Pid::from_raw(w.id() as i32);
    nix::sys::signal::killpg(pgid, nix::sys::signal::SIGKILL).expect("killpg");
    w.wait().expect("reap");
    assert_eq!(next_holder_sees(&env, "job", "never"), "died=1\nbefore\n");
    wait_until("nothing to be held", || env.table.stats().held == 0);
    env.assert_quiet();
}

#[test]
fn a_lost_gateway_session_can_be_the_exit_status() {
    let env = TestEnv::new("run_lost_remote");
    let mut d = GatewayDaemon::start(&env, None);
    let script = format!("{}; {}", mark("started"), await_go("go"));
    let w = start(
        &env,
        "first",
        &[
            "run",
            "--remote",
            &d.addr,
            "--lost-exit-code",
            "9",
            "job",
            "sh",
            "-c",
            &script,
            "sh",
            &dir(&env),
        ],
        &[],
    );
    await_file(&env.path("started"));
    d.kill();
    wait_until("the loss warning", || {
        err_of(&env, "first").contains("\"job\" is no longer held")
    });
    signal(&env.path("go"), "");
    assert_eq!(exit_code(w), Some(9), "{}", err_of(&env, "first"));
    assert!(err_of(&env, "first").contains("ran partly without lock \"job\""));
}

#[test]
fn a_wrapper_killed_while_it_waits_leaves_no_request_behind() {
    // Ctrl-C (here SIGKILL) of a `shmlock run` that waits: its keeper gives the request up, and
    // the next holder is not told that an owner died (nobody held the lock but the holder).
    let env = TestEnv::new("run_kill_waiting");
    let holder = spawn_holder(&env, &[("x", b"job")], "holder");
    let mut w = start(
        &env,
        "waiter",
        &["run", "job", "sh", "-c", &mark("ran"), "sh", &dir(&env)],
        &[],
    );
    env.wait_for("the run to queue", |t| {
        t.lock_info(b"job").ok().flatten().is_some_and(|l| l.waiters.len() == 1)
    });
    kill9(&mut w);
    env.wait_for("the request to go", |t| {
        t.lock_info(b"job").ok().flatten().is_some_and(|l| l.waiters.is_empty())
    });
    signal(&env.path("go"), "");
    env.wait_success(holder);
    assert_eq!(next_holder_sees(&env, "job", "ran"), "died=0\nbefore\n");
    env.assert_quiet();
}

#[test]
#[allow(unsafe_code)]
fn an_ignored_sigchld_inherited_from_the_parent_does_not_hang_the_run() {
    // A parent that ignores SIGCHLD (some daemons do) passes that on through exec: the kernel
    // would reap the command by itself and never say so.
    use std::os::unix::process::CommandExt;
    let env = TestEnv::new("run_sigchld_ign");
    let mut c = cmd(&env, &["run", "job", "sh", "-c", "exit 3"], &[]);
    // SAFETY: between fork and exec only `signal(2)` is called (async-signal-safe), installing
    // SIG_IGN, which runs nothing in signal context.
    unsafe {
        c.pre_exec(|| {
            nix::sys::signal::signal(nix::sys::signal::SIGCHLD, nix::sys::signal::SigHandler::SigIgn)
                .map(|_| ())
                .map_err(std::io::Error::from)
        });
    }
    let o = output_within(c.spawn().expect("spawn"), "shmlock run under an ignored SIGCHLD");
    assert_code(&o, 3);
    env.assert_quiet();
}

#[test]
fn a_killed_keeper_frees_the_lock_and_the_wrapper_says_so() {
    // The one way to lose the lock early, as documented: `kill -9` of the keeper's own pid.
    let env = TestEnv::new("run_kill_keeper");
    let script = format!("{}; {}", mark("started"), await_go("go"));
    let w = start(
        &env,
        "first",
        &[
            "run",
            "--lost-exit-code",
            "9",
            "job",
            "sh",
            "-c",
            &script,
            "sh",
            &dir(&env),
        ],
        &[],
    );
    await_file(&env.path("started"));
    let keeper = lock_holder(&env, b"job");
    assert_ne!(keeper, w.id(), "the keeper holds the lock, not the wrapper");
    let comm = fs::read_to_string(format!("/proc/{keeper}/comm")).expect("comm");
    assert_eq!(comm.trim_end(), "shmlock-keeper");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(keeper as i32), nix::sys::signal::SIGKILL).expect("kill");
    // The lock is reaped as a dead owner's, while the command still runs.
    assert_eq!(next_holder_sees(&env, "job", "never"), "died=1\nbefore\n");
    signal(&env.path("go"), "");
    assert_eq!(exit_code(w), Some(9), "{}", err_of(&env, "first"));
    assert!(
        err_of(&env, "first").contains("ended without releasing"),
        "{}",
        err_of(&env, "first")
    );
    env.assert_quiet();
}

/// The pid of the (one) holder of `name`.
fn lock_holder(env: &TestEnv, name: &[u8]) -> u32 {
    let l = env.table.lock_info(name).expect("lock_info").expect("held");
    assert_eq!(l.holders.len(), 1, "{l:?}");
    l.holders[0].pid
}
