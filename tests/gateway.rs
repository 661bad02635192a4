//! The TCP gateway and the remote client, with real processes where it matters: remote and local
//! processes contending on one name (a witness proves exclusion), a remote client killed with
//! SIGKILL, the `shmlockd` binary serving remote clients. Other tests run the gateway in this
//! process ([`gateway::serve`] on `127.0.0.1:0`) and talk to it over raw sockets, so each line on
//! the wire is checked.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{
    await_file, signal, wait_until, within, witnessed_section, ChildCtx, Raw, TestEnv, Words, CHILD_DEADLINE, COUNT,
    DEADLINE,
};
use shmlock::gateway::{self, Gateway, GatewayConfig};
use shmlock::prelude::*;
use shmlock::proto::ErrorCode;
use shmlock::remote::{ConnectOptions, RemoteClient, RemoteGuard};
use shmlock::{Capacities, Error, Mode};

// ---- child processes -------------------------------------------------------------------------

common::child_roles! {
    "counter" => role_counter,
    "remote_hold" => role_remote_hold,
}

/// Increments the witness counter `iters` times under lock `counter`, taken locally
/// (`how=local`) or through the gateway at `addr` (`how=remote`); checks the witness flag.
fn role_counter(ctx: &ChildCtx) {
    let id: u64 = ctx.param("id");
    let how: String = ctx.param("how");
    if how == "local" {
        count(ctx, id, &ctx.client(&format!("counter-{id}")));
    } else {
        let addr: String = ctx.param("addr");
        count(ctx, id, &RemoteClient::connect(addr.as_str()).expect("connect"));
    }
}

/// The witnessed loop, written once over the contract.
fn count<L: Locker>(ctx: &ChildCtx, id: u64, client: &L) {
    let iters: u64 = ctx.param("iters");
    let words = Words::open(&ctx.path("words"));
    ctx.barrier();
    for i in 0..iters {
        let g = client.lock("counter").expect("lock");
        witnessed_section(&words, id, i);
        drop(g);
    }
}

/// Through the gateway at `addr`: locks `x` and `y`, queues a request for `z` (held by the
/// parent), signals `held`, and then waits to be killed.
fn role_remote_hold(ctx: &ChildCtx) {
    let addr: String = ctx.param("addr");
    let c = RemoteClient::connect(addr.as_str()).expect("connect");
    let x = c.lock("x").expect("lock x");
    let y = c.lock_shared("y").expect("lock y");
    let z = c.start_lock("z", Mode::Exclusive, None).expect("send lock z");
    c.ping().expect("ping"); // the LOCK z was processed before the PING's answer
    signal(&ctx.path("held"), "");
    std::thread::sleep(CHILD_DEADLINE * 2);
    drop((x, y, z));
    panic!("was not killed");
}

// ---- helpers ---------------------------------------------------------------------------------

/// A gateway on a free loopback port, serving `env`'s table, with `f` applied to the defaults.
fn serve(env: &TestEnv, f: impl FnOnce(&mut GatewayConfig)) -> Gateway {
    let mut c = GatewayConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        ..GatewayConfig::default()
    };
    f(&mut c);
    gateway::serve(c, Arc::clone(&env.table)).expect("start gateway")
}

fn code(line: &str) -> &str {
    let mut w = line.split(' ');
    match (w.next(), w.next(), w.next()) {
        (Some(_), Some("ERR"), Some(code)) => code,
        _ => panic!("not an error line: {line}"),
    }
}

fn quiet_within(env: &TestEnv, owners: u64) {
    env.wait_for("the table to be quiet", |t| {
        let st = t.stats();
        st.held == 0 && st.waiting == 0 && st.shared_holds == 0 && st.owners == owners
    });
    env.assert_quiet();
}

// ---- exclusion between remote and local processes --------------------------------------------

#[test]
fn remote_and_local_processes_exclude_each_other_through_shmlockd() {
    let env = TestEnv::new("gw-excl");
    // The real daemon, adopting the test's segment, on a free port read back from its log.
    let log = env.path("shmlockd.log");
    let mut daemon = Daemon(
        Command::new(env!("CARGO_BIN_EXE_shmlockd"))
            .args([
                "--segment",
                &env.segment,
                "--listen",
                "127.0.0.1:0",
                "--log-level",
                "info",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("spawn shmlockd"),
    );
    let mut addr = String::new();
    wait_until("shmlockd to log its gateway address", || {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if let Some(i) = text.find("gateway ready listen=") {
            let rest = &text[i + "gateway ready listen=".len()..];
            addr = rest.split_whitespace().next().unwrap_or("").to_string();
        }
        !addr.is_empty()
    });
    let words = Words::create(&env.path("words"), 2);
    let (iters, hows) = (300u64, ["local", "remote", "local", "remote"]);
    for (i, how) in hows.iter().enumerate() {
        env.spawn(
            "counter",
            &[("id", &(i + 1)), ("iters", &iters), ("how", how), ("addr", &addr)],
        );
    }
    env.release_barrier(hows.len());
    env.wait_all_checked();
    assert_eq!(words.get(COUNT), hows.len() as u64 * iters, "lost updates");
    quiet_within(&env, 0);
    // The daemon stops cleanly on SIGTERM.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(daemon.0.id() as i32),
        nix::sys::signal::SIGTERM,
    )
    .unwrap();
    let deadline = Instant::now() + DEADLINE;
    let status = loop {
        if let Some(s) = daemon.0.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "shmlockd did not stop");
        std::thread::sleep(Duration::from_millis(5));
    };
    assert!(
        status.success(),
        "shmlockd: {status}\n{}",
        std::fs::read_to_string(&log).unwrap()
    );
    // A remote session shows in the table as a remote owner labelled with its address; the
    // daemon's own gateway sessions were all deregistered (checked by quiet_within above).
}

/// Kills the daemon if the test fails before it stops it.
struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

#[test]
fn remote_grants_carry_increasing_tokens_and_shared_mode_works() {
    let env = TestEnv::new("gw-tokens");
    let gw = serve(&env, |_| {});
    let local = env.client("local");
    let (a, b) = (
        RemoteClient::connect(gw.local_addr()).unwrap(),
        RemoteClient::connect(gw.local_addr()).unwrap(),
    );
    let mut last = 0;
    for i in 0..20 {
        let t = match i % 3 {
            // A guard's drop does not wait for the gateway's answer; unlock() does.
            0 => {
                let g = a.lock("n").unwrap();
                let t = g.token().0;
                g.unlock().unwrap();
                t
            }
            1 => {
                let g = b.try_lock("n").unwrap();
                let t = g.token().0;
                g.unlock().unwrap();
                t
            }
            _ => local.lock("n").unwrap().token().0,
        };
        assert!(t > last, "token {t} after {last}");
        last = t;
    }
    // Shared: two remote readers and a local one together; a remote writer is refused.
    let ra = a.lock_shared("s").unwrap();
    let rb = b.try_lock_shared("s").unwrap();
    let rl = local.try_lock_shared("s").unwrap();
    assert_eq!(
        (ra.mode(), rb.mode(), ra.owner_died()),
        (Mode::Shared, Mode::Shared, false)
    );
    drop(rl);
    let w = RemoteClient::connect(gw.local_addr()).unwrap();
    assert!(matches!(w.try_lock("s"), Err(Error::WouldBlock)));
    assert!(matches!(
        w.try_lock_for("s", Duration::from_millis(30)),
        Err(Error::TimedOut { .. })
    ));
    assert!(matches!(a.try_lock_shared("s"), Err(Error::AlreadyHeld)));
    ra.unlock().unwrap();
    drop(rb);
    let g = w.try_lock_for("s", DEADLINE).unwrap();
    assert!(matches!(w.unlock("nothing"), Err(Error::NotHeld)));
    g.unlock().unwrap();
    drop((a, b, w));
    quiet_within(&env, 1);
}

// ---- sessions end: kill, close, idle ---------------------------------------------------------

#[test]
fn killing_a_remote_client_process_releases_its_locks_and_cancels_its_waits() {
    let env = TestEnv::new("gw-kill");
    let gw = serve(&env, |_| {});
    let local = env.client("local");
    let z = local.lock("z").unwrap();
    let child = env.spawn("remote_hold", &[("addr", &gw.local_addr())]);
    await_file(&env.path("held"));
    assert!(matches!(local.try_lock("x"), Err(Error::WouldBlock)));
    assert!(matches!(local.try_lock("y"), Err(Error::WouldBlock)));
    // The request for z queues on a gateway thread, a moment after the session read it.
    wait_until("the remote wait for z", || env.table.stats().waiting == 1);
    assert_eq!(env.table.stats().owners, 2);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(env.pid(child) as i32),
        nix::sys::signal::SIGKILL,
    )
    .unwrap();
    assert!(!env.wait(child).success());
    // (env.wait_for would stop at the child's failed exit status; this one is intended.)
    wait_until("the killed client's locks to be released", || {
        let st = env.table.stats();
        st.held == 1 && st.waiting == 0 && st.owners == 1
    });
    drop(local.try_lock("x").unwrap());
    drop(local.try_lock("y").unwrap());
    drop(z);
    env.assert_quiet();
}

#[test]
fn a_killed_remote_client_leaves_its_locks_owner_died_for_local_and_remote_next_holders() {
    let env = TestEnv::new("gw-kill-died");
    let gw = serve(&env, |_| {});
    let local = env.client("local");
    let z = local.lock("z").unwrap();
    let child = env.spawn("remote_hold", &[("addr", &gw.local_addr())]);
    await_file(&env.path("held"));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(env.pid(child) as i32),
        nix::sys::signal::SIGKILL,
    )
    .unwrap();
    assert!(!env.wait(child).success());
    wait_until("the killed client's session to end", || env.table.stats().owners == 1);
    // x was held exclusive (the next holder is local), y shared (the next holder is remote).
    let x = local.try_lock("x").unwrap();
    assert!(x.owner_died(), "the next holder of x is told its owner died");
    let remote = RemoteClient::connect(gw.local_addr()).unwrap();
    let y = remote.try_lock("y").unwrap();
    assert!(y.owner_died(), "the next holder of y is told its owner died");
    // z was only waited for: its holder is told nothing.
    drop(z);
    let z = remote.lock("z").unwrap();
    assert!(!z.owner_died());
    drop((x, y, z));
    drop(remote);
    // (env.wait_for would stop at the child's failed exit status; this one is intended.)
    wait_until("the table to be quiet", || {
        let st = env.table.stats();
        st.held == 0 && st.shared_holds == 0 && st.owners == 1
    });
    env.assert_quiet();
}

#[test]
fn a_closed_connection_leaves_its_locks_owner_died_but_unlocked_and_quit_ones_do_not() {
    let env = TestEnv::new("gw-close-died");
    let gw = serve(&env, |_| {});
    let local = env.client("local");
    let mut raw = Raw::connect(gw.local_addr());
    assert!(raw.ask("1 LOCK kept").starts_with("1 GRANTED "));
    assert!(raw.ask("2 LOCK given SHARED").starts_with("2 GRANTED "));
    assert_eq!(raw.ask("3 UNLOCK given"), "3 OK");
    drop(raw);
    env.wait_for("the session to end", |t| t.stats().owners == 1);
    let kept = local.try_lock("kept").unwrap();
    assert!(kept.owner_died(), "a lock abandoned by a closed connection");
    assert!(
        !local.try_lock("given").unwrap().owner_died(),
        "a lock given back with UNLOCK"
    );
    drop(kept);
    // The flag is told once: the next holder after the one told sees a clean lock.
    assert!(!local.try_lock("kept").unwrap().owner_died());
    // QUIT gives back what the session holds, as dropping a local client does.
    let mut raw = Raw::connect(gw.local_addr());
    assert!(raw.ask("1 LOCK q").starts_with("1 GRANTED "));
    assert_eq!(raw.ask("2 QUIT"), "2 BYE");
    raw.expect_closed();
    env.wait_for("the session to end", |t| t.stats().owners == 1);
    assert!(!local.try_lock("q").unwrap().owner_died());
    // So does dropping a RemoteClient with a lock request given up (granted after the drop).
    let remote = RemoteClient::connect(gw.local_addr()).unwrap();
    drop(remote.start_lock("r", Mode::Exclusive, None).unwrap());
    drop(remote);
    env.wait_for("the session to end", |t| t.stats().owners == 1);
    assert!(!local.try_lock("r").unwrap().owner_died());
    quiet_within(&env, 1);
}

#[test]
fn half_closing_the_write_side_answers_what_came_then_ends_the_session() {
    let env = TestEnv::new("gw-half");
    let gw = serve(&env, |_| {});
    let local = env.client("local");
    let x = local.lock("x").unwrap();
    let mut raw = Raw::connect(gw.local_addr());
    raw.send("1 LOCK h\n2 LOCK x\n3 PING\n");
    raw.w.shutdown(std::net::Shutdown::Write).unwrap();
    // The immediate answers come; the waiting LOCK gets none; then the server closes.
    assert!(raw.line().starts_with("1 GRANTED "));
    assert_eq!(raw.line(), "3 PONG");
    assert_eq!(raw.line(), "", "no answer for the cancelled wait, then the end");
    env.wait_for("the session to end", |t| {
        t.stats().owners == 1 && t.stats().waiting == 0
    });
    // What it held is abandoned.
    assert!(local.try_lock("h").unwrap().owner_died());
    drop(x);
    quiet_within(&env, 1);
}

#[test]
fn an_idle_timeout_leaves_the_sessions_locks_owner_died() {
    let env = TestEnv::new("gw-idle-died");
    let gw = serve(&env, |c| c.idle_timeout = Some(Duration::from_millis(200)));
    let local = env.client("local");
    let mut raw = Raw::connect(gw.local_addr());
    assert!(raw.ask("1 LOCK i").starts_with("1 GRANTED "));
    assert_eq!(code(&raw.line()), "IDLE_TIMEOUT");
    raw.expect_closed();
    env.wait_for("the session to end", |t| t.stats().owners == 1);
    assert!(local.try_lock("i").unwrap().owner_died());
    quiet_within(&env, 1);
}

#[test]
fn a_remote_guard_knows_it_is_lost_once_the_gateway_ended_its_session() {
    let env = TestEnv::new("gw-lost");
    let gw = serve(&env, |_| {});
    let remote = RemoteClient::connect(gw.local_addr()).unwrap();
    let g = remote.lock("l").unwrap();
    assert!(!Guard::lost(&g), "a held lock is not lost");
    // The gateway goes: the client learns it at its next exchange (a request, a keep-alive).
    drop(gw);
    assert!(remote.try_lock("other").is_err());
    assert!(Guard::lost(&g), "the session ended: its locks were released");
    assert!(g.unlock().is_err(), "unlocking a lost remote lock reports it");
}

#[test]
fn a_remote_timeout_is_timed_out_naming_the_holder_and_a_bad_name_is_name_invalid() {
    let env = TestEnv::new("gw-typed");
    let gw = serve(&env, |_| {});
    let local = env.client("the-holder");
    let held = local.lock("t").unwrap();
    let remote = RemoteClient::connect(gw.local_addr()).unwrap();
    match remote.try_lock_for("t", Duration::from_millis(50)).err() {
        Some(Error::TimedOut { holder: Some(h), .. }) => {
            assert_eq!(h.pid, std::process::id());
            assert!(h.label.contains("the-holder"), "{h:?}");
            assert_eq!(h.holders, 1);
        }
        other => panic!("{other:?}"),
    }
    let max = env.table.geometry().max_name_len as usize;
    let long = "n".repeat(max + 1);
    match remote.try_lock(long.as_str()).err() {
        Some(Error::NameInvalid { len, max: m }) => assert_eq!((len, m), (max + 1, max)),
        other => panic!("{other:?}"),
    }
    // The same variant as locally.
    assert!(matches!(
        local.try_lock(long.as_str()).err(),
        Some(Error::NameInvalid { .. })
    ));
    assert!(matches!(
        remote.try_lock("").err(),
        Some(Error::NameInvalid { len: 0, .. })
    ));
    assert!(matches!(
        local.try_lock("").err(),
        Some(Error::NameInvalid { len: 0, .. })
    ));
    drop(held);
}

#[test]
fn a_gateway_of_another_protocol_version_is_refused_naming_both_versions() {
    // A fake gateway: a plain listener that greets with version 2 and holds the connection.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let fake = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        s.write_all(b"* HELLO shmlock 2 auth=none idle_timeout_ms=0 max_line=512 max_name=64\n")
            .unwrap();
        // Until the client closes: it must not go on as if it could speak to this gateway.
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
    });
    match RemoteClient::connect(addr).err() {
        Some(
            e @ Error::ProtocolVersion {
                found: 2, expected: 1, ..
            },
        ) => {
            let text = e.to_string();
            assert!(text.contains("version 2") && text.contains("version 1"), "{text}");
        }
        other => panic!("{other:?}"),
    }
    fake.join().unwrap();
}

#[test]
fn a_remote_client_asks_status_and_locks_like_the_local_commands() {
    let env = TestEnv::new("gw-status");
    let gw = serve(&env, |_| {});
    let local = env.client("holder");
    let held = local.lock("status/a b").unwrap();
    let remote = RemoteClient::connect(gw.local_addr()).unwrap();
    let st = remote.status(false).unwrap();
    assert_eq!(st.report.segment, env.segment);
    assert_eq!(st.check, shmlock::proto::admin::CheckReport::Skipped);
    assert!(st.report.stats.held >= 1, "{:?}", st.report.stats);
    let st = remote.status(true).unwrap();
    assert_eq!(st.check, shmlock::proto::admin::CheckReport::Consistent);
    // Any prefix goes (it is sent escaped), spaces too.
    let locks = remote.locks(Some(b"status/a ")).unwrap();
    assert_eq!(locks.len(), 1);
    assert_eq!(locks[0].name, b"status/a b");
    drop(held);
}

#[test]
fn only_one_cr_before_the_lf_is_stripped() {
    let env = TestEnv::new("gw-cr");
    let gw = serve(&env, |_| {});
    let mut raw = Raw::connect(gw.local_addr());
    assert_eq!(raw.ask("1 PING\r"), "1 PONG");
    assert_eq!(code(&raw.ask("2 PING\r\r")), "BAD_REQUEST");
    assert_eq!(code(&raw.ask("3 LOCK a\r\r")), "BAD_REQUEST");
    assert_eq!(
        code(&raw.ask("4 PING a\rb")),
        "BAD_REQUEST",
        "a CR not right before the LF"
    );
    assert_eq!(raw.ask("5 PING"), "5 PONG");
    assert_eq!(env.table.stats().held, 0);
}

#[test]
fn every_request_under_the_tag_of_a_waiting_lock_is_refused_with_tag_in_use() {
    let env = TestEnv::new("gw-tag");
    let gw = serve(&env, |_| {});
    let local = env.client("local");
    let x = local.lock("x").unwrap();
    let mut raw = Raw::connect(gw.local_addr());
    assert!(raw.ask("h LOCK held").starts_with("h GRANTED "));
    raw.send("w LOCK x\n");
    for req in [
        "UNLOCK held",
        "LOCKS",
        "STATUS",
        "PING",
        "TRY y",
        "LOCK y",
        "QUIT",
        "AUTH s",
    ] {
        assert_eq!(code(&raw.ask(&format!("w {req}"))), "TAG_IN_USE", "w {req}");
    }
    // None of them was served: `held` is still held, and the wait goes on.
    assert!(matches!(local.try_lock("held"), Err(Error::WouldBlock)));
    drop(x);
    assert!(raw.line().starts_with("w GRANTED "));
    // Once answered, the tag is free again.
    assert_eq!(raw.ask("w UNLOCK x"), "w OK");
    assert_eq!(raw.ask("w PING"), "w PONG");
}

#[test]
fn closing_a_connection_cancels_its_waits_and_frees_the_session() {
    let env = TestEnv::new("gw-close");
    let gw = serve(&env, |_| {});
    let local = env.client("local");
    let held = (local.lock("a").unwrap(), local.lock("c").unwrap());
    let mut raw = Raw::connect(gw.local_addr());
    assert!(raw.ask("1 LOCK b").starts_with("1 GRANTED "));
    raw.send("2 LOCK a\n3 LOCK c SHARED TIMEOUT 60000\n");
    env.wait_for("the remote waits to queue", |t| t.stats().waiting == 2);
    drop(raw);
    env.wait_for("the session to end", |t| {
        let st = t.stats();
        st.waiting == 0 && st.owners == 1 && st.held == 2
    });
    drop(local.try_lock("b").unwrap());
    drop(held);
}

#[test]
fn idle_sessions_are_ended_but_the_remote_client_keeps_itself_alive() {
    let env = TestEnv::new("gw-idle");
    let gw = serve(&env, |c| c.idle_timeout = Some(Duration::from_millis(300)));
    let local = env.client("local");
    let mut raw = Raw::connect(gw.local_addr());
    assert!(raw.ask("1 LOCK x").starts_with("1 GRANTED "));
    let t = Instant::now();
    let line = raw.line();
    assert_eq!(code(&line), "IDLE_TIMEOUT", "{line}");
    assert!(t.elapsed() >= Duration::from_millis(250));
    raw.expect_closed();
    // The lock was released before the closing line was sent.
    drop(local.try_lock("x").unwrap());

    let client = RemoteClient::connect(gw.local_addr()).unwrap();
    assert_eq!(client.hello().idle_timeout, Some(Duration::from_millis(300)));
    let g = client.lock("y").unwrap();
    std::thread::sleep(Duration::from_millis(1000)); // over three idle timeouts, pings only
    assert!(matches!(local.try_lock("y"), Err(Error::WouldBlock)));
    g.unlock().unwrap();
    drop(client);
    quiet_within(&env, 1);
}

// ---- out of order, pipelining, retries -------------------------------------------------------

#[test]
fn a_waiting_request_blocks_nothing_on_its_connection_or_others() {
    let env = TestEnv::new("gw-order");
    let gw = serve(&env, |_| {});
    let local = env.client("local");
    let a = local.lock("A").unwrap();
    let mut raw = Raw::connect(gw.local_addr());
    assert!(raw.ask("b LOCK B").starts_with("b GRANTED "));
    raw.send("a LOCK A\n");
    // The unlock of B, sent after the lock of A, is answered first; so is a ping.
    assert_eq!(raw.ask("u UNLOCK B"), "u OK");
    assert_eq!(raw.ask("p PING"), "p PONG");
    // Another connection is served meanwhile, and can take B.
    let other = RemoteClient::connect(gw.local_addr()).unwrap();
    drop(other.lock("B").unwrap());
    drop(a);
    let line = raw.line();
    assert!(line.starts_with("a GRANTED "), "{line}");

    // The same through the client: a pending lock does not stop other calls.
    let c = RemoteClient::connect(gw.local_addr()).unwrap();
    let hold = local.lock("Q").unwrap();
    let held_r = c.lock("R").unwrap();
    let pending = c.start_lock("Q", Mode::Exclusive, None).unwrap();
    held_r.unlock().unwrap();
    c.ping().unwrap();
    drop(hold);
    let q = pending.wait().unwrap();
    assert_eq!(&*q.name(), b"Q");
    drop(q);
    // A pending lock given up before its answer is unlocked when granted.
    let hold = local.lock("P").unwrap();
    drop(c.start_lock("P", Mode::Exclusive, None).unwrap());
    drop(hold);
    env.wait_for("the abandoned grant to be unlocked", |t| t.stats().held == 1); // A, raw's
    drop((c, other, raw));
    quiet_within(&env, 1);
}

#[test]
fn pipelined_requests_are_answered_in_order_and_retries_take_nothing_twice() {
    let env = TestEnv::new("gw-pipe");
    let gw = serve(&env, |_| {});
    let mut raw = Raw::connect(gw.local_addr());
    let mut batch = String::new();
    for i in 0..50 {
        batch.push_str(&format!("l{i} LOCK n{i}\nu{i} UNLOCK n{i}\n"));
    }
    raw.send(&batch);
    for i in 0..50 {
        assert!(raw.line().starts_with(&format!("l{i} GRANTED ")));
        assert_eq!(raw.line(), format!("u{i} OK"));
    }
    // A retry with the same tag gets the same grant; another tag is refused.
    let first = raw.ask("t1 LOCK r");
    assert!(first.starts_with("t1 GRANTED "), "{first}");
    assert_eq!(raw.ask("t1 LOCK r"), first);
    assert_eq!(code(&raw.ask("t2 LOCK r")), "ALREADY_HELD");
    assert_eq!(code(&raw.ask("t2 TRY r")), "ALREADY_HELD");
    assert_eq!(env.table.stats().held, 1);
    // Waiting twice for one name, or with a tag in use, is refused.
    let local = env.client("local");
    let w = local.lock("w").unwrap();
    raw.send("w1 LOCK w\n");
    assert_eq!(code(&raw.ask("w2 LOCK w")), "ALREADY_WAITING");
    assert_eq!(code(&raw.ask("w1 LOCK other")), "TAG_IN_USE");
    assert_eq!(code(&raw.ask("w3 UNLOCK w")), "NOT_HELD");
    drop(w);
    assert!(raw.line().starts_with("w1 GRANTED "));
    assert_eq!(raw.ask("q QUIT"), "q BYE");
    raw.expect_closed();
    quiet_within(&env, 1);
}

#[test]
fn lines_split_across_reads_and_batches_beyond_one_read_are_served() {
    let env = TestEnv::new("gw-split");
    let gw = serve(&env, |_| {});
    let mut raw = Raw::connect(gw.local_addr());
    raw.w.set_nodelay(true).unwrap();
    // One request in pieces, with pauses so that the gateway reads each piece on its own.
    for piece in ["a1 LO", "CK sp", "lit EXCLUSIVE\r", "\n"] {
        raw.send(piece);
        std::thread::sleep(Duration::from_millis(30));
    }
    assert!(raw.line().starts_with("a1 GRANTED "));
    // A partial line, then its end together with whole lines.
    raw.send("a2 UNLO");
    std::thread::sleep(Duration::from_millis(30));
    raw.send("CK split\na3 PING\na4 TRY split\na5 UNL");
    std::thread::sleep(Duration::from_millis(30));
    raw.send("OCK split\n");
    assert_eq!(raw.line(), "a2 OK");
    assert_eq!(raw.line(), "a3 PONG");
    assert!(raw.line().starts_with("a4 GRANTED "));
    assert_eq!(raw.line(), "a5 OK");
    // Many kilobytes in one write: more than one read's worth, lines cut anywhere.
    let mut batch = String::new();
    for i in 0..2000 {
        batch.push_str(&format!("b{i} LOCK name-{i}\nc{i} UNLOCK name-{i}\n"));
    }
    raw.send(&batch);
    for i in 0..2000 {
        assert!(raw.line().starts_with(&format!("b{i} GRANTED ")));
        assert_eq!(raw.line(), format!("c{i} OK"));
    }
    assert_eq!(raw.ask("q QUIT"), "q BYE");
    raw.expect_closed();
    quiet_within(&env, 0);
}

// ---- one client, many threads ----------------------------------------------------------------

/// The callers of a shared client read the socket for each other (whoever waits reads, and hands
/// on what it reads): every kind of request from several threads at once, guards dropped on
/// another thread (answers nobody waits for), and a long wait that spans all of it.
#[test]
fn threads_sharing_one_remote_client_each_get_their_own_answers() {
    const THREADS: usize = 4;
    const ITERS: usize = 200;
    let env = TestEnv::new("gw-share");
    let gw = serve(&env, |_| {});
    let (addr, table) = (gw.local_addr(), Arc::clone(&env.table));
    within("threads sharing one client", move || {
        let client = RemoteClient::connect(addr).unwrap();
        let other = RemoteClient::connect(addr).unwrap();
        let gate = other.lock("gate").unwrap();
        std::thread::scope(|s| {
            // Waits until every worker is done: a caller that may read for all the others.
            let waiter = s.spawn(|| client.lock("gate").map(|g| g.token()));
            wait_until("the wait for gate", || table.stats().waiting == 1);
            let (tx, rx) = std::sync::mpsc::channel::<RemoteGuard<'_>>();
            s.spawn(move || rx.into_iter().for_each(drop));
            let workers: Vec<_> = (0..THREADS)
                .map(|t| {
                    let (tx, client) = (tx.clone(), &client);
                    s.spawn(move || {
                        for i in 0..ITERS {
                            let name = format!("t{t}-{i}");
                            match i % 4 {
                                0 => tx.send(client.lock(&name).unwrap()).unwrap(),
                                1 => client.try_lock(&name).unwrap().unlock().unwrap(),
                                2 => {
                                    let p = client.start_lock(&name, Mode::Shared, Some(DEADLINE)).unwrap();
                                    client.ping().unwrap();
                                    let g = p.wait().unwrap();
                                    assert_eq!((&*g.name(), g.mode()), (name.as_bytes(), Mode::Shared));
                                }
                                _ => {
                                    std::mem::forget(client.lock(&name).unwrap());
                                    assert!(matches!(client.try_lock(&name), Err(Error::AlreadyHeld)));
                                    client.unlock(&name).unwrap();
                                }
                            }
                        }
                    })
                })
                .collect();
            drop(tx);
            for w in workers {
                w.join().unwrap();
            }
            assert!(!waiter.is_finished());
            drop(gate);
            assert!(waiter.join().unwrap().is_ok());
        });
        // Every unlock reached the gateway, those sent by dropped guards too.
        wait_until("every unlock", || table.stats().held == 0);
        client.ping().unwrap();
    });
    quiet_within(&env, 0);
}

/// A connection that ends while one caller reads it and others wait for their answers fails
/// every one of them, and every later request at once.
#[test]
fn a_connection_lost_while_callers_wait_fails_each_of_them() {
    const WAITERS: usize = 4;
    // A gateway that goes away without a closing line: a fake one that takes the requests and
    // drops the connection.
    let fake = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = fake.local_addr().unwrap();
    let server = std::thread::spawn(move || {
        let (conn, _) = fake.accept().unwrap();
        let mut w = conn.try_clone().unwrap();
        w.write_all(
            b"* HELLO shmlock 1 auth=none idle_timeout_ms=0 max_line=512 max_name=64 max_locks=9 max_waits=9\n",
        )
        .unwrap();
        let mut r = BufReader::new(conn);
        for _ in 0..WAITERS {
            let mut line = String::new();
            r.read_line(&mut line).unwrap();
            assert!(line.contains(" LOCK w"), "{line}");
        }
    });
    let client = Arc::new(RemoteClient::connect(addr).unwrap());
    let waiters: Vec<_> = (0..WAITERS)
        .map(|i| {
            let c = Arc::clone(&client);
            std::thread::spawn(move || c.lock(format!("w{i}")).map(|g| g.token()))
        })
        .collect();
    server.join().unwrap();
    let results = within("every waiter to fail", move || {
        waiters.into_iter().map(|w| w.join().unwrap()).collect::<Vec<_>>()
    });
    for r in results {
        assert!(
            matches!(&r, Err(Error::Connection { why, .. }) if why.contains("closed")),
            "{r:?}"
        );
    }
    assert!(matches!(client.ping(), Err(Error::Connection { .. })));

    // The same with the real gateway, which says why before it closes.
    let env = TestEnv::new("gw-lost");
    let gw = serve(&env, |_| {});
    let local = env.client("local");
    let held: Vec<_> = (0..WAITERS).map(|i| local.lock(format!("w{i}")).unwrap()).collect();
    let client = Arc::new(RemoteClient::connect(gw.local_addr()).unwrap());
    let waiters: Vec<_> = (0..WAITERS)
        .map(|i| {
            let c = Arc::clone(&client);
            std::thread::spawn(move || c.lock(format!("w{i}")).map(|g| g.token()))
        })
        .collect();
    env.wait_for("the remote waits", |t| t.stats().waiting == WAITERS as u64);
    gw.shutdown();
    let results = within("every waiter to fail", move || {
        waiters.into_iter().map(|w| w.join().unwrap()).collect::<Vec<_>>()
    });
    for r in results {
        assert!(
            matches!(&r, Err(Error::Connection { why, .. }) if why.contains("SHUTTING_DOWN")),
            "{r:?}"
        );
    }
    assert!(matches!(client.lock("x"), Err(Error::Connection { .. })));
    drop(held);
}

// ---- auth ------------------------------------------------------------------------------------

#[test]
fn with_a_token_only_auth_and_ping_are_served_before_auth() {
    let env = TestEnv::new("gw-auth");
    let gw = serve(&env, |c| c.auth_token = Some("s3cret".into()));
    let mut raw = Raw::connect_bare(gw.local_addr());
    assert!(raw.line().contains(" auth=required "));
    assert_eq!(raw.ask("p PING"), "p PONG");
    assert_eq!(code(&raw.ask("1 LOCK x")), "AUTH_REQUIRED");
    assert_eq!(code(&raw.ask("2 UNLOCK x")), "AUTH_REQUIRED");
    assert_eq!(code(&raw.ask("3 QUIT")), "AUTH_REQUIRED");
    assert_eq!(env.table.stats().held, 0);
    assert_eq!(raw.ask("4 AUTH s3cret"), "4 OK");
    assert!(raw.ask("5 LOCK x").starts_with("5 GRANTED "));

    let mut bad = Raw::connect(gw.local_addr());
    assert_eq!(code(&bad.ask("1 AUTH guess")), "AUTH_FAILED");
    bad.expect_closed();

    let opts = |t: &str| ConnectOptions {
        auth_token: Some(t.into()),
        ..Default::default()
    };
    assert!(RemoteClient::connect_with(gw.local_addr(), &opts("nope")).is_err());
    let c = RemoteClient::connect_with(gw.local_addr(), &opts("s3cret")).unwrap();
    drop(c.lock("y").unwrap());
    let unauth = RemoteClient::connect(gw.local_addr()).unwrap();
    assert!(matches!(
        unauth.lock("y"),
        Err(Error::Remote {
            code: ErrorCode::AuthRequired,
            ..
        })
    ));
    drop((raw, c, unauth));
    quiet_within(&env, 0);
}

// ---- limits ----------------------------------------------------------------------------------

#[test]
fn every_limit_answers_with_its_code() {
    let caps = Capacities {
        max_name_len: 8,
        ..common::small_caps()
    };
    let env = TestEnv::with_caps("gw-limits", &caps);
    let gw = serve(&env, |c| {
        c.max_line = 64;
        c.max_locks_per_session = 3;
        c.max_waits_per_session = 2;
        c.max_waits = 3;
        c.max_connections = 4;
    });
    let local = env.client("local");
    let busy: Vec<_> = (0..4).map(|i| local.lock(format!("busy{i}")).unwrap()).collect();

    let mut a = Raw::connect(gw.local_addr());
    assert_eq!(code(&a.ask("1 LOCK 123456789")), "BAD_NAME");
    assert!(a.ask("2 LOCK 12345678").contains("GRANTED"));
    // Waits per session.
    a.send("3 LOCK busy0\n4 LOCK busy1\n");
    assert_eq!(code(&a.ask("5 LOCK busy2")), "TOO_MANY_LOCKS");
    assert_eq!(a.ask("6 UNLOCK 12345678"), "6 OK");
    assert_eq!(code(&a.ask("7 LOCK busy2")), "TOO_MANY_WAITS");
    // The server-wide wait limit: a third wait elsewhere fits, a fourth does not.
    let mut b = Raw::connect(gw.local_addr());
    b.send("1 LOCK busy2\n");
    env.wait_for("three waits", |t| t.stats().waiting == 3);
    assert_eq!(code(&b.ask("2 LOCK busy3")), "SERVER_BUSY");
    // A try does not wait, so it is served.
    assert_eq!(code(&b.ask("3 TRY busy3")), "BUSY");
    // Connections: a, b, c, d fit; e is refused politely and closed.
    let c = Raw::connect(gw.local_addr());
    let d = Raw::connect(gw.local_addr());
    let mut e = Raw::connect_bare(gw.local_addr());
    assert_eq!(code(&e.line()), "TOO_MANY_CONNECTIONS");
    e.expect_closed();
    drop((c, d));
    // Line length: 64 is fine, 65 closes.
    let mut c = {
        let mut tries = 0;
        loop {
            let mut r = Raw::connect_bare(gw.local_addr());
            if r.line().starts_with("* HELLO") {
                break r;
            }
            tries += 1;
            assert!(tries < 1000, "the freed connection slots were not reused");
            std::thread::sleep(Duration::from_millis(5));
        }
    };
    let ping = format!("p PING {}", "x".repeat(64 - 7));
    assert_eq!(ping.len(), 64);
    assert_eq!(c.ask(&ping), "p PONG");
    c.send(&format!("{ping}x\n"));
    assert_eq!(code(&c.line()), "LINE_TOO_LONG");
    c.expect_closed();
    // Also without a newline at all.
    let mut c = Raw::connect(gw.local_addr());
    c.send(&"y".repeat(1000));
    assert_eq!(code(&c.line()), "LINE_TOO_LONG");
    c.expect_closed();
    drop(busy);
    assert!(a.line().contains("GRANTED"));
    assert!(a.line().contains("GRANTED"));
    assert!(b.line().contains("GRANTED"));
    drop((a, b));
    quiet_within(&env, 1);
}

#[test]
fn a_full_owner_pool_refuses_connections_politely() {
    let caps = Capacities {
        max_owners: 2,
        ..common::small_caps()
    };
    let env = TestEnv::with_caps("gw-owners", &caps);
    let gw = serve(&env, |_| {});
    let _local = env.client("local");
    let _a = Raw::connect(gw.local_addr());
    let mut b = Raw::connect_bare(gw.local_addr());
    let line = b.line();
    assert_eq!(code(&line), "TOO_MANY_CONNECTIONS", "{line}");
    b.expect_closed();
    assert!(matches!(
        RemoteClient::connect(gw.local_addr()),
        Err(Error::Remote {
            code: ErrorCode::TooManyConnections,
            ..
        })
    ));
}

// ---- malformed input --------------------------------------------------------------------------

#[test]
fn garbage_and_bad_lines_never_harm_other_sessions() {
    let env = TestEnv::new("gw-garbage");
    let gw = serve(&env, |_| {});
    let good = RemoteClient::connect(gw.local_addr()).unwrap();
    let held = good.lock("keep").unwrap();
    let bad_lines = [
        "",
        "   ",
        "x",
        "!!",
        "1",
        "1 LOCK",
        "1 LOCK a b c",
        "1 LOCK a TIMEOUT",
        "1 LOCK a TIMEOUT -5",
        "1 LOCK a TIMEOUT 99999999999999999999",
        "1 TRY a TIMEOUT 1",
        "1 UNLOCK",
        "1 AUTH",
        "1 FROB",
        "* PING",
        "1 LOCK a\x01b",
        "1 LOCK \x7f",
        "1 try keep",
        "1 UNLOCK keep",
    ];
    let mut raw = Raw::connect(gw.local_addr());
    for l in bad_lines {
        raw.send(&format!("{l}\r\n"));
    }
    raw.send("end PING\n");
    let mut answers = 0;
    loop {
        let line = raw.line();
        assert!(!line.is_empty(), "closed on a malformed line");
        if line == "end PONG" {
            break;
        }
        answers += 1;
    }
    assert_eq!(answers, bad_lines.len() - 2, "every non-blank line gets one answer");
    // Random bytes: each connection gets some error lines or a close, nothing else.
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    for round in 0..20 {
        let mut r = Raw::connect(gw.local_addr());
        let bytes: Vec<u8> = (0..4096)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                // Half the rounds avoid NUL so the lines are parsed, not dropped as binary.
                let b = (seed >> 24) as u8;
                if round % 2 == 0 && b == 0 {
                    b'\n'
                } else {
                    b
                }
            })
            .collect();
        let _ = r.w.write_all(&bytes);
        let _ = r.w.shutdown(std::net::Shutdown::Write);
        r.expect_closed();
    }
    // The good session is untouched: its lock is still held, and it is served.
    assert!(good.ping().is_ok());
    let local = env.client("local");
    assert!(matches!(local.try_lock("keep"), Err(Error::WouldBlock)));
    drop(good.lock("other").unwrap());
    held.unlock().unwrap();
    drop((good, raw));
    quiet_within(&env, 1);
    assert!(env.table.check().is_empty());
}

// ---- shutdown --------------------------------------------------------------------------------

#[test]
fn shutdown_ends_sessions_and_cancels_their_waits() {
    let env = TestEnv::new("gw-stop");
    let gw = serve(&env, |_| {});
    let local = env.client("local");
    let held = local.lock("x").unwrap();
    let mut raw = Raw::connect(gw.local_addr());
    assert!(raw.ask("1 LOCK y").contains("GRANTED"));
    raw.send("2 LOCK x\n");
    env.wait_for("the remote wait", |t| t.stats().waiting == 1);
    let t = std::thread::spawn(move || gw.shutdown());
    assert_eq!(code(&raw.line()), "SHUTTING_DOWN");
    raw.expect_closed();
    t.join().unwrap();
    let st = env.table.stats();
    assert_eq!((st.waiting, st.owners, st.held), (0, 1, 1), "{st:?}");
    drop(held);
}
