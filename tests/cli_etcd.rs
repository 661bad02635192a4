//! `shmlock run --etcd` and `shmlock locks --etcd` against a real etcd member (one per test, on
//! free loopback ports, see `common::etcd`): the lock held while the command runs, flock(1)'s
//! options and exit codes, the grant in the environment, interop with `etcdctl lock`, `kill -9`
//! of the wrapper, a cluster lost while the command runs, and the `locks` listing.
//!
//! Real processes throughout: `shmlock` is started as the binary and killed with SIGKILL; its
//! commands are `sh` scripts that report through files in the test's directory (`$1`). The
//! queue is read with the library's `EtcdClient::locks`, and deadlines come from `common`.

mod common;

use std::fs;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use common::cli::{
    assert_code, assert_error_line, await_go, dir, json, mark, output_within, stderr, stdout, EX_TEMPFAIL,
};
use common::etcd::{etcdctl, queue_len, EtcdCluster};
use common::{await_file, signal, wait_until, TestEnv};
use serde_json::Value;
use shmlock::etcd::{EtcdClient, EtcdOptions};

/// `shmlock` with `args`, in the test's directory, output piped.
fn cmd(env: &TestEnv, args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_shmlock"));
    c.args(args)
        .env_remove("SHMLOCK_SEGMENT")
        .env_remove("SHMLOCK_HELD")
        .env_remove("SHMLOCK_RUN_TEST_STALL")
        .current_dir(&env.dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c
}

/// Runs `shmlock args` to completion (with a deadline).
fn shmlock(env: &TestEnv, args: &[&str]) -> Output {
    let child = cmd(env, args).spawn().expect("spawn shmlock");
    output_within(child, &format!("shmlock {args:?}"))
}

/// Starts `shmlock args` in the background, its stdout and stderr in files `{tag}.out` and
/// `{tag}.err`.
fn start(env: &TestEnv, tag: &str, args: &[&str]) -> Child {
    let out = fs::File::create(env.path(&format!("{tag}.out"))).expect("create out");
    let err = fs::File::create(env.path(&format!("{tag}.err"))).expect("create err");
    cmd(env, args)
        .stdout(out)
        .stderr(err)
        .spawn()
        .expect("spawn shmlock run")
}

fn out_of(env: &TestEnv, tag: &str) -> String {
    fs::read_to_string(env.path(&format!("{tag}.out"))).unwrap_or_default()
}

fn err_of(env: &TestEnv, tag: &str) -> String {
    fs::read_to_string(env.path(&format!("{tag}.err"))).unwrap_or_default()
}

/// Waits (with a deadline) for `child` to exit; its exit code.
fn exit_code(child: Child) -> Option<i32> {
    output_within(child, "shmlock run").status.code()
}

/// A client of the test's own, to read the queue.
fn reader(etcd: &EtcdCluster) -> EtcdClient {
    let opts = EtcdOptions {
        label: Some("test reader".into()),
        ..Default::default()
    };
    EtcdClient::connect(etcd.urls(), opts).unwrap_or_else(|e| panic!("connect: {e}"))
}

/// `run --etcd U -n NAME true` finds the lock busy.
#[track_caller]
fn assert_busy(env: &TestEnv, etcd: &EtcdCluster, name: &str) {
    let o = shmlock(env, &["run", "--etcd", &etcd.endpoints(), "-n", name, "--", "true"]);
    assert_code(&o, EX_TEMPFAIL);
}

/// `etcdctl lock NAME` holding while a script waits for `$dir/go`; returns once it holds.
fn etcdctl_lock(env: &TestEnv, etcd: &EtcdCluster, name: &str, go: &str) -> Child {
    let script = format!("{}; {}", mark("etcdctl-held"), await_go(go));
    let child = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={}", etcd.endpoints()))
        .args(["lock", name, "--", "sh", "-c", &script, "sh", &dir(env)])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("etcdctl lock (Debian package etcd-client)");
    await_file(&env.path("etcdctl-held"));
    child
}

// ---- run --etcd ------------------------------------------------------------------------------

#[test]
fn run_etcd_holds_the_lock_while_the_command_runs_with_flocks_exit_codes() {
    let env = TestEnv::new("ce_run");
    let etcd = EtcdCluster::start(&env.dir, 1);
    let u = etcd.endpoints();
    let d = dir(&env);
    let script = format!("{}; {}", mark("started"), await_go("go"));
    let first = start(
        &env,
        "first",
        &["run", "--etcd", &u, "job", "--", "sh", "-c", &script, "sh", &d],
    );
    await_file(&env.path("started"));
    let ran = env.path("ran");
    let touch = ["--", "touch", ran.to_str().expect("utf-8")];
    let run = |opts: &[&str]| {
        let mut a = vec!["run", "--etcd", &u];
        a.extend_from_slice(opts);
        a.push("job");
        a.extend_from_slice(&touch);
        shmlock(&env, &a)
    };
    // -n and -w: the conflict code, 75 unless -E says otherwise; nothing runs.
    let o = run(&["-n"]);
    assert_code(&o, EX_TEMPFAIL);
    assert!(
        stderr(&o).contains("\"job\" is busy, held by lease") && stderr(&o).contains("run sh"),
        "{}",
        stderr(&o)
    );
    assert_code(&run(&["-n", "-E", "9"]), 9);
    assert_code(&run(&["--nonblock", "--shared"]), EX_TEMPFAIL);
    let o = run(&["-w", "0.3"]);
    assert_code(&o, EX_TEMPFAIL);
    assert!(stderr(&o).contains("not acquired"), "{}", stderr(&o));
    assert_code(&run(&["-w", "0.3", "-E", "0"]), 0);
    assert!(!ran.exists(), "a command ran without the lock");
    // A timed-out wait left nothing queued.
    let r = reader(&etcd);
    assert_eq!(queue_len(&r, "job"), (1, 0));
    signal(&env.path("go"), "");
    assert_eq!(exit_code(first), Some(0), "{}", err_of(&env, "first"));
    assert_eq!(err_of(&env, "first"), "", "a quiet run says nothing");
    wait_until("the lock to be free", || queue_len(&r, "job") == (0, 0));
    // The command's status is passed on; -c runs a string.
    assert_code(&shmlock(&env, &["run", "--etcd", &u, "job", "-c", "exit 7"]), 7);
    assert_code(
        &shmlock(&env, &["run", "--etcd", &u, "job", "sh", "-c", "kill -9 $$"]),
        137,
    );
    let o = shmlock(&env, &["run", "--etcd", &u, "job", "/nonexistent/command"]);
    assert_code(&o, 127);
    // Shared holders share.
    let shared = start(
        &env,
        "shared",
        &[
            "run",
            "--etcd",
            &u,
            "-s",
            "rw",
            "--",
            "sh",
            "-c",
            &script.replace("go", "go-s"),
            "sh",
            &d,
        ],
    );
    wait_until("the shared run to hold", || queue_len(&r, "rw") == (1, 0));
    let o = shmlock(
        &env,
        &[
            "run",
            "--etcd",
            &u,
            "-n",
            "-s",
            "rw",
            "--",
            "sh",
            "-c",
            "echo $SHMLOCK_MODE",
        ],
    );
    assert_code(&o, 0);
    assert_eq!(stdout(&o), "shared\n");
    assert_busy(&env, &etcd, "rw");
    signal(&env.path("go-s"), "");
    assert_eq!(exit_code(shared), Some(0), "{}", err_of(&env, "shared"));
}

#[test]
fn the_command_sees_its_grant_and_tokens_are_create_revisions_that_grow() {
    let env = TestEnv::new("ce_env");
    let etcd = EtcdCluster::start(&env.dir, 1);
    let u = etcd.endpoints();
    // The command reads the lock's key back with `locks --etcd --json` while it holds it.
    let script = format!(
        r#"echo "$SHMLOCK_NAME $SHMLOCK_MODE $SHMLOCK_TOKEN $SHMLOCK_OWNER_DIED"; "{}" locks --etcd "{u}" --json"#,
        env!("CARGO_BIN_EXE_shmlock")
    );
    let mut tokens = Vec::new();
    for _ in 0..3 {
        let o = shmlock(&env, &["run", "--etcd", &u, "orders/42", "--", "sh", "-c", &script]);
        assert_code(&o, 0);
        let out = stdout(&o);
        let (first, rest) = out.split_once('\n').expect("two parts");
        let f: Vec<&str> = first.split(' ').collect();
        assert_eq!(f[0..2], ["orders/42", "exclusive"], "{out}");
        assert_eq!(f[3], "0", "a clean release is no owner death: {out}");
        let token: i64 = f[2].parse().expect("token");
        let locks: Value = serde_json::from_str(rest).expect("locks --json");
        let l = &locks[0];
        assert_eq!(l["name"], "orders/42");
        assert_eq!(
            l["holders"][0]["create_revision"], token,
            "token = create revision: {locks:#}"
        );
        assert_eq!(l["holders"][0]["label"], "run sh");
        tokens.push(token);
    }
    assert!(tokens.windows(2).all(|w| w[0] < w[1]), "tokens grow: {tokens:?}");
    // A nested run on the lock its enclosing run holds would wait for itself: refused at once.
    let o = shmlock(
        &env,
        &[
            "run",
            "--etcd",
            &u,
            "orders/42",
            "--",
            env!("CARGO_BIN_EXE_shmlock"),
            "run",
            "--etcd",
            &u,
            "orders/42",
            "--",
            "true",
        ],
    );
    assert_code(&o, EX_TEMPFAIL);
    assert!(
        stderr(&o).contains("held by an enclosing `shmlock run`"),
        "{}",
        stderr(&o)
    );
    // etcdctl sees the same key, under the name with no prefix.
    assert!(etcdctl(&u, &["get", "--prefix", "orders/42/"]).is_some_and(|o| o.trim().is_empty()));
}

#[test]
fn etcdctl_lock_and_run_etcd_are_the_same_lock() {
    let env = TestEnv::new("ce_interop");
    let etcd = EtcdCluster::start(&env.dir, 1);
    let u = etcd.endpoints();
    let d = dir(&env);
    let mut ctl = etcdctl_lock(&env, &etcd, "shared/name", "go-ctl");
    let o = shmlock(&env, &["run", "--etcd", &u, "-n", "shared/name", "--", "true"]);
    assert_code(&o, EX_TEMPFAIL);
    assert!(stderr(&o).contains("not shmlock's"), "{}", stderr(&o));
    // A waiting run gets the lock when etcdctl's command ends, not before.
    let script = format!("{}; [ -e \"$1/go-ctl\" ] && echo after || echo before", mark("ours"));
    let waiter = start(
        &env,
        "waiter",
        &["run", "--etcd", &u, "shared/name", "sh", "-c", &script, "sh", &d],
    );
    let r = reader(&etcd);
    wait_until("the run to queue behind etcdctl", || {
        queue_len(&r, "shared/name") == (1, 1)
    });
    std::thread::sleep(Duration::from_millis(200));
    assert!(!env.path("ours").exists(), "ran while etcdctl held the lock");
    signal(&env.path("go-ctl"), "");
    assert_eq!(exit_code(waiter), Some(0), "{}", err_of(&env, "waiter"));
    assert_eq!(out_of(&env, "waiter"), "after\n");
    assert!(ctl.wait().expect("etcdctl").success());
    // Ours holding: etcdctl waits for it.
    let script = format!("{}; {}", mark("held"), await_go("go"));
    let holder = start(
        &env,
        "holder",
        &["run", "--etcd", &u, "shared/name", "sh", "-c", &script, "sh", &d],
    );
    await_file(&env.path("held"));
    let got = env.path("ctl-got");
    let mut ctl = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={u}"))
        .args(["lock", "shared/name", "--", "touch"])
        .arg(&got)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .expect("etcdctl lock");
    wait_until("etcdctl to queue", || queue_len(&r, "shared/name") == (1, 1));
    std::thread::sleep(Duration::from_millis(200));
    assert!(!got.exists(), "etcdctl got the lock while `shmlock run` held it");
    signal(&env.path("go"), "");
    assert_eq!(exit_code(holder), Some(0), "{}", err_of(&env, "holder"));
    assert!(ctl.wait().expect("etcdctl").success());
    assert!(got.exists());
}

#[test]
fn kill_9_of_the_wrapper_leaves_the_lock_with_the_command() {
    // As the local `run`: the keeper holds the lock until the command ends, then gives it up as
    // a dead holder would (the wrapper did not see the command end): the next holder is told the
    // owner died, and gets the lock only after the command ended.
    let env = TestEnv::new("ce_kill_wrapper");
    let etcd = EtcdCluster::start(&env.dir, 1);
    let u = etcd.endpoints();
    let d = dir(&env);
    let script = format!("{}; {}; {}", mark("started"), await_go("go"), mark("done"));
    let mut w = start(
        &env,
        "first",
        &["run", "--etcd", &u, "job", "--", "sh", "-c", &script, "sh", &d],
    );
    await_file(&env.path("started"));
    w.kill().expect("SIGKILL");
    w.wait().expect("reap");
    assert_busy(&env, &etcd, "job");
    let next = r#"echo "died=$SHMLOCK_OWNER_DIED"; [ -e "$1/done" ] && echo after || echo before"#;
    let second = start(
        &env,
        "second",
        &["run", "--etcd", &u, "job", "sh", "-c", next, "sh", &d],
    );
    let r = reader(&etcd);
    wait_until("the second run to queue", || queue_len(&r, "job") == (1, 1));
    std::thread::sleep(Duration::from_millis(200));
    assert!(!env.path("done").exists());
    signal(&env.path("go"), "");
    assert_eq!(exit_code(second), Some(0), "{}", err_of(&env, "second"));
    assert_eq!(
        out_of(&env, "second"),
        "died=1\nafter\n",
        "the second run started before the command ended, or was not told"
    );
    wait_until("the lock to be free", || queue_len(&r, "job") == (0, 0));
}

#[test]
fn a_killed_keeper_loses_the_lock_when_its_lease_expires_and_the_wrapper_says_so() {
    // As locally, `kill -9` of the keeper's own pid is the one way to lose the lock early: on
    // etcd its lease expires after the TTL, and the next holder is told the owner died.
    let env = TestEnv::new("ce_kill_keeper");
    let etcd = EtcdCluster::start(&env.dir, 1);
    let u = etcd.endpoints();
    let d = dir(&env);
    let script = format!("{}; {}", mark("started"), await_go("go"));
    let w = start(
        &env,
        "first",
        &[
            "run",
            "--etcd",
            &u,
            "--etcd-ttl",
            "2",
            "--lost-exit-code",
            "9",
            "job",
            "sh",
            "-c",
            &script,
            "sh",
            &d,
        ],
    );
    await_file(&env.path("started"));
    let r = reader(&etcd);
    let locks = r.locks(b"job").expect("locks");
    let keeper = locks[0].holders[0].info.pid.expect("the keeper's pid in its key");
    assert_ne!(keeper, w.id(), "the keeper holds the lock, not the wrapper");
    let comm = fs::read_to_string(format!("/proc/{keeper}/comm")).expect("comm");
    assert_eq!(comm.trim_end(), "shmlock-keeper");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(keeper as i32), nix::sys::signal::SIGKILL).expect("kill");
    let next = r#"echo "died=$SHMLOCK_OWNER_DIED"; [ -e "$1/go" ] && echo after || echo before"#;
    let o = shmlock(
        &env,
        &["run", "--etcd", &u, "-w", "20", "job", "sh", "-c", next, "sh", &d],
    );
    assert_code(&o, 0);
    assert_eq!(
        stdout(&o),
        "died=1\nbefore\n",
        "granted while the command still ran, told"
    );
    signal(&env.path("go"), "");
    assert_eq!(exit_code(w), Some(9), "{}", err_of(&env, "first"));
    assert!(
        err_of(&env, "first").contains("ended without releasing"),
        "{}",
        err_of(&env, "first")
    );
}

/// A waiter that looks at its predecessor's lease only after the predecessor unlocked cleanly
/// *and* its process ended must not report an owner death (a closed client that holds no keys
/// does not revoke its lease). Through the CLI: the holder's keeper unlocks and exits; a waiting
/// keeper that is slow to look (here: stopped meanwhile) must tell its command nobody died.
#[test]
fn a_clean_release_is_no_owner_death_even_to_a_slow_waiter() {
    let env = TestEnv::new("ce_slow_waiter");
    let etcd = EtcdCluster::start(&env.dir, 1);
    let u = etcd.endpoints();
    let d = dir(&env);
    let script = format!("{}; {}", mark("held"), await_go("go"));
    let holder = start(
        &env,
        "holder",
        &["run", "--etcd", &u, "job", "sh", "-c", &script, "sh", &d],
    );
    await_file(&env.path("held"));
    let next = r#"echo "died=$SHMLOCK_OWNER_DIED""#;
    let waiter = start(&env, "waiter", &["run", "--etcd", &u, "job", "sh", "-c", next]);
    let r = reader(&etcd);
    wait_until("the run to queue", || queue_len(&r, "job") == (1, 1));
    std::thread::sleep(Duration::from_millis(300));
    let locks = r.locks(b"job").expect("locks");
    let keeper = locks[0].waiters[0].info.pid.expect("the waiting keeper's pid");
    let keeper = nix::unistd::Pid::from_raw(keeper as i32);
    nix::sys::signal::kill(keeper, nix::sys::signal::SIGSTOP).expect("stop the waiting keeper");
    signal(&env.path("go"), "");
    // A clean end: the holder's keeper unlocked, then exited (its wrapper waits for it).
    assert_eq!(exit_code(holder), Some(0), "{}", err_of(&env, "holder"));
    nix::sys::signal::kill(keeper, nix::sys::signal::SIGCONT).expect("resume the waiting keeper");
    assert_eq!(exit_code(waiter), Some(0), "{}", err_of(&env, "waiter"));
    assert_eq!(
        out_of(&env, "waiter"),
        "died=0\n",
        "told the owner died after a clean release"
    );
}

#[test]
fn a_wrapper_killed_while_it_waits_leaves_no_request_behind() {
    let env = TestEnv::new("ce_kill_waiting");
    let etcd = EtcdCluster::start(&env.dir, 1);
    let u = etcd.endpoints();
    let d = dir(&env);
    let script = format!("{}; {}", mark("held"), await_go("go"));
    let holder = start(
        &env,
        "holder",
        &["run", "--etcd", &u, "job", "sh", "-c", &script, "sh", &d],
    );
    await_file(&env.path("held"));
    // A lease longer than the deadline of `wait_until`: only a withdrawal passes.
    let mut waiter = start(
        &env,
        "waiter",
        &[
            "run",
            "--etcd",
            &u,
            "--etcd-ttl",
            "60",
            "job",
            "sh",
            "-c",
            &mark("ran"),
            "sh",
            &d,
        ],
    );
    let r = reader(&etcd);
    wait_until("the run to queue", || queue_len(&r, "job") == (1, 1));
    // Its first try (without waiting) puts a key and withdraws it: the key seen now is its wait's.
    std::thread::sleep(Duration::from_millis(300));
    wait_until("the run to wait", || queue_len(&r, "job") == (1, 1));
    waiter.kill().expect("SIGKILL");
    waiter.wait().expect("reap");
    // Withdrawn by the keeper, long before its lease would have expired.
    wait_until("the request to go", || queue_len(&r, "job") == (1, 0));
    signal(&env.path("go"), "");
    assert_eq!(exit_code(holder), Some(0), "{}", err_of(&env, "holder"));
    let o = shmlock(
        &env,
        &[
            "run",
            "--etcd",
            &u,
            "-n",
            "job",
            "sh",
            "-c",
            "echo died=$SHMLOCK_OWNER_DIED",
        ],
    );
    assert_code(&o, 0);
    assert_eq!(stdout(&o), "died=0\n");
    assert!(!env.path("ran").exists(), "the killed waiter's command ran");
}

#[test]
fn losing_the_cluster_while_the_command_runs_is_reported_and_sets_the_exit_status() {
    let env = TestEnv::new("ce_lost");
    let mut etcd = EtcdCluster::start(&env.dir, 1);
    let u = etcd.endpoints();
    let d = dir(&env);
    let with = |name: &str, opts: &[&str], tag: &str| {
        let script = format!(
            "{}; {}",
            mark(&format!("started-{name}")),
            await_go(&format!("go-{name}"))
        );
        let mut a = vec!["run", "--etcd", &u, "--etcd-ttl", "2"];
        a.extend_from_slice(opts);
        a.extend_from_slice(&[name, "--", "sh", "-c", &script, "sh", &d]);
        let c = start(&env, tag, &a);
        await_file(&env.path(&format!("started-{name}")));
        c
    };
    let plain = with("a", &[], "plain");
    let coded = with("b", &["--lost-exit-code", "9"], "coded");
    let killed = with("c", &["--kill-on-loss"], "killed");
    etcd.kill(0);
    // Told within the TTL (2 s) and a generous margin: the deadline of `wait_until`.
    for (tag, name) in [("plain", "a"), ("coded", "b")] {
        wait_until(&format!("{tag}'s loss warning"), || {
            err_of(&env, tag).contains(&format!("lock \"{name}\" is no longer held"))
        });
        let err = err_of(&env, tag);
        assert!(
            err.contains("lost the etcd session at") && err.contains("keeps running (--kill-on-loss would stop it)"),
            "{err}"
        );
        signal(&env.path(&format!("go-{name}")), "");
    }
    // Default: the command's status, with a warning when it ends.
    assert_eq!(exit_code(plain), Some(0), "{}", err_of(&env, "plain"));
    assert!(
        err_of(&env, "plain").contains("ran partly without lock \"a\""),
        "{}",
        err_of(&env, "plain")
    );
    // --lost-exit-code N: N.
    assert_eq!(exit_code(coded), Some(9), "{}", err_of(&env, "coded"));
    assert!(err_of(&env, "coded").contains("ran partly without lock \"b\""));
    // --kill-on-loss: the command gets SIGTERM, its status (128 + 15) is passed on.
    assert_eq!(exit_code(killed), Some(128 + 15), "{}", err_of(&env, "killed"));
    assert!(
        err_of(&env, "killed").contains("stopping sh (SIGTERM)"),
        "{}",
        err_of(&env, "killed")
    );
    // The cluster back: the names are free again (the lost leases expired).
    etcd.restart(0);
    etcd.wait_healthy();
    for name in ["a", "b", "c"] {
        let o = shmlock(&env, &["run", "--etcd", &u, "-w", "10", name, "--", "true"]);
        assert_code(&o, 0);
    }
}

// ---- locks --etcd ----------------------------------------------------------------------------

/// The text rows of lock `name` in `locks --etcd` output, split into cells.
fn rows<'a>(text: &'a str, name: &str) -> Vec<Vec<&'a str>> {
    text.lines()
        .skip(1)
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .filter(|c| c.first() == Some(&name))
        .collect()
}

#[test]
fn locks_etcd_lists_holders_and_waiters_in_order() {
    let env = TestEnv::new("ce_locks");
    let etcd = EtcdCluster::start(&env.dir, 1);
    let u = etcd.endpoints();
    let d = dir(&env);
    let r = reader(&etcd);
    assert_eq!(
        stdout(&shmlock(&env, &["locks", "--etcd", &u])),
        "no locks held or waited on\n"
    );
    // etcdctl holds "q"; a `run` waits exclusive, then one shared.
    let mut ctl = etcdctl_lock(&env, &etcd, "q", "go-ctl");
    let w1 = start(&env, "w1", &["run", "--etcd", &u, "q", "--", "true"]);
    wait_until("w1 to queue", || queue_len(&r, "q") == (1, 1));
    let w2 = start(&env, "w2", &["run", "--etcd", &u, "-s", "q", "--", "sleep", "0"]);
    wait_until("w2 to queue", || queue_len(&r, "q") == (1, 2));
    // And a run of ours holds "p" (with a name that needs escaping beside it).
    let script = format!("{}; {}", mark("held"), await_go("go"));
    let p = start(
        &env,
        "p",
        &["run", "--etcd", &u, "p\\x", "--", "sh", "-c", &script, "sh", &d],
    );
    await_file(&env.path("held"));
    std::thread::sleep(Duration::from_millis(1100)); // an age of a second or more

    let o = shmlock(&env, &["locks", "--etcd", &u]);
    assert_code(&o, 0);
    let text = stdout(&o);
    assert!(text.starts_with("NAME "), "{text}");
    let q = rows(&text, "q");
    assert_eq!(q.len(), 3, "{text}");
    assert_eq!(q[0][1..3], ["holds", "exclusive"], "{text}");
    assert_eq!(q[0][4..8], ["-"; 4], "etcdctl's key says nothing but its lease: {text}");
    assert_eq!(q[1][1..4], ["waits", "#1", "exclusive"], "{text}");
    assert_eq!(q[2][1..4], ["waits", "#2", "shared"], "{text}");
    assert!(q[1].contains(&"run") && q[1].contains(&"true"), "{text}");
    let revs: Vec<i64> = q.iter().map(|c| c.last().expect("rev").parse().expect("rev")).collect();
    assert!(
        revs.windows(2).all(|w| w[0] < w[1]),
        "queue order is create order: {text}"
    );
    let p_rows = rows(&text, "p\\\\x");
    assert_eq!(p_rows.len(), 1, "the name is escaped as `locks` escapes names: {text}");
    assert_eq!(p_rows[0][1], "holds");
    assert!(p_rows[0][4].ends_with('s') && p_rows[0][4] != "-", "age: {text}");

    let j = json(&shmlock(&env, &["locks", "--etcd", &u, "--json"]));
    let find = |name: &str| -> Value {
        j.as_array()
            .expect("array")
            .iter()
            .find(|l| l["name"] == name)
            .unwrap_or_else(|| panic!("no {name} in {j:#}"))
            .clone()
    };
    let q = find("q");
    assert_eq!(q["mode"], "exclusive");
    assert_eq!(q["holders"].as_array().map(Vec::len), Some(1));
    let h = &q["holders"][0];
    assert_eq!(
        (&h["age_ms"], &h["pid"], &h["label"]),
        (&Value::Null, &Value::Null, &Value::Null)
    );
    assert!(
        h["lease"].as_str().is_some_and(|l| i64::from_str_radix(l, 16).is_ok()),
        "{h}"
    );
    assert_eq!(q["token"], h["create_revision"]);
    assert_eq!(q["waiters"], 2);
    assert_eq!(q["queue"][0]["mode"], "exclusive");
    assert_eq!(q["queue"][0]["label"], "run true");
    assert_eq!(q["queue"][1]["mode"], "shared");
    assert!(q["queue"][1]["pid"].as_u64().is_some());
    let p_json = find("p\\\\x");
    let ph = &p_json["holders"][0];
    assert!(ph["age_ms"].as_u64().is_some_and(|a| a >= 1000), "{ph}");
    assert_eq!(ph["host"].as_str().map(str::is_empty), Some(false));
    assert_eq!(p_json["queue"], Value::Array(Vec::new()));
    // --name-prefix (read as `locks` prints names) and --held-longer-than filter.
    let only = json(&shmlock(
        &env,
        &["locks", "--etcd", &u, "--json", "--name-prefix", "p\\\\"],
    ));
    assert_eq!(only.as_array().map(Vec::len), Some(1), "{only:#}");
    assert_eq!(only[0]["name"], "p\\\\x");
    let long = json(&shmlock(
        &env,
        &["locks", "--etcd", &u, "--json", "--held-longer-than", "500ms"],
    ));
    assert_eq!(
        long.as_array().map(Vec::len),
        Some(1),
        "etcdctl's unknown age is not long: {long:#}"
    );

    signal(&env.path("go-ctl"), "");
    signal(&env.path("go"), "");
    assert!(ctl.wait().expect("etcdctl").success());
    for (c, tag) in [(w1, "w1"), (w2, "w2"), (p, "p")] {
        assert_eq!(exit_code(c), Some(0), "{}", err_of(&env, tag));
    }
    wait_until("every lock to be free", || r.locks(b"").expect("locks").is_empty());
}

#[test]
fn etcd_prefix_puts_the_locks_under_it() {
    let env = TestEnv::new("ce_prefix");
    let etcd = EtcdCluster::start(&env.dir, 1);
    let u = etcd.endpoints();
    let d = dir(&env);
    let script = format!("{}; {}", mark("held"), await_go("go"));
    let h = start(
        &env,
        "h",
        &[
            "run",
            "--etcd",
            &u,
            "--etcd-prefix",
            "app/",
            "x",
            "--",
            "sh",
            "-c",
            &script,
            "sh",
            &d,
        ],
    );
    await_file(&env.path("held"));
    // Under the prefix it is "x"; without, its key's name is "app/x", as etcdctl sees it.
    let under = json(&shmlock(
        &env,
        &["locks", "--etcd", &u, "--etcd-prefix", "app/", "--json"],
    ));
    assert_eq!(under[0]["name"], "x", "{under:#}");
    let all = json(&shmlock(&env, &["locks", "--etcd", &u, "--json"]));
    assert_eq!(all[0]["name"], "app/x", "{all:#}");
    let lease = under[0]["holders"][0]["lease"].as_str().expect("lease").to_string();
    let keys = etcdctl(&u, &["get", "--prefix", "--keys-only", "app/x/"]).expect("etcdctl get");
    assert_eq!(keys.trim(), format!("app/x/{lease}"));
    let o = shmlock(&env, &["run", "--etcd", &u, "-n", "x", "--", "true"]);
    assert_code(&o, 0); // another lock: "x" without the prefix
    let o = shmlock(&env, &["run", "--etcd", &u, "-n", "app/x", "--", "true"]);
    assert_code(&o, EX_TEMPFAIL);
    signal(&env.path("go"), "");
    assert_eq!(exit_code(h), Some(0), "{}", err_of(&env, "h"));
}

#[test]
fn bad_uses_and_an_unreachable_cluster_are_clear_errors() {
    let env = TestEnv::new("ce_errors");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let nobody = format!("http://127.0.0.1:{port}");
    let ran = env.path("ran");
    let ran = ran.to_str().expect("utf-8");
    for args in [
        vec!["locks", "--etcd", &nobody],
        vec!["run", "--etcd", &nobody, "job", "--", "touch", ran],
    ] {
        let o = shmlock(&env, &args);
        assert_error_line(&o, &["cannot reach etcd at", &nobody]);
        assert_eq!(stdout(&o), "");
    }
    assert!(!env.path("ran").exists(), "the command ran without the lock");
    let o = shmlock(&env, &["--segment", &env.segment, "locks", "--etcd", &nobody]);
    assert_error_line(&o, &["--segment and --etcd"]);
    let o = shmlock(&env, &["locks", "--etcd", &nobody, "--died"]);
    assert_error_line(&o, &["--died needs the segment"]);
    // Parse errors (clap's, exit 2): --etcd with --remote, a TTL under 1 s, the etcd options
    // without --etcd.
    for args in [
        &["run", "--etcd", &nobody, "--remote", "127.0.0.1:1", "job", "true"][..],
        &["locks", "--etcd", &nobody, "--remote", "127.0.0.1:1"],
        &["run", "--etcd", &nobody, "--etcd-ttl", "0", "job", "true"],
        &["run", "--etcd-ttl", "5", "job", "true"],
        &["locks", "--etcd-prefix", "p/"],
    ] {
        let o = shmlock(&env, args);
        assert_code(&o, 2);
        assert!(stderr(&o).contains("--etcd"), "{args:?}: {}", stderr(&o));
    }
}
