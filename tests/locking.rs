//! Locking across real processes, and the API's promises to its users.
//!
//! Multi-process tests re-run this binary as children (see `common` and [`child_process`]); they
//! observe the lock only through witnesses outside the table (plain files written with
//! non-atomic read-modify-writes, and `O_APPEND` event logs), and end by checking that the table
//! is consistent and empty.

mod common;

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{
    await_file, read_lines, signal, wait_until, within, witnessed_section, ChildCtx, Log, TestEnv, Words, COUNT,
    DEADLINE, FLAG,
};
use shmlock::{Capacities, Client, Error, LockGuard, LockTable, Mode};

/// Asserts that `$e` is `Err` matching `$p` (a guard returned by `Ok` is released at once).
macro_rules! assert_err {
    ($e:expr, $p:pat $(if $g:expr)?) => {
        match $e {
            Err($p) $(if $g)? => {}
            Err(other) => panic!("{}: expected {}, got {other:?}", stringify!($e), stringify!($p)),
            Ok(_) => panic!("{}: expected {}, got Ok", stringify!($e), stringify!($p)),
        }
    };
}

// ---- child processes -------------------------------------------------------------------------

common::child_roles! {
    "counter" => role_counter,
    "reader" => role_reader,
    "writer" => role_writer,
    "hold" => role_hold,
    "waiter" => role_waiter,
    "forget" => role_forget,
    "token" => role_token,
    "evict" => role_evict,
    "probe" => role_probe,
    "multi" => role_multi,
}

/// Locks `name` the way `how` says (an exclusive or a shared call), retrying where that way can
/// fail.
fn acquire<'c>(client: &'c Client, name: &str, how: &str) -> LockGuard<'c> {
    match how {
        "lock" => client.lock(name).expect("lock"),
        // Short timeouts on purpose: requests are withdrawn from the queue all the time.
        "try_lock_for" => loop {
            match client.try_lock_for(name, short_timeout()) {
                Ok(g) => break g,
                Err(Error::TimedOut { .. }) => {}
                Err(e) => panic!("try_lock_for: {e}"),
            }
        },
        "try_lock" => loop {
            match client.try_lock(name) {
                Ok(g) => break g,
                Err(Error::WouldBlock) => std::thread::yield_now(),
                Err(e) => panic!("try_lock: {e}"),
            }
        },
        "lock_shared" => client.lock_shared(name).expect("lock_shared"),
        "try_lock_shared_for" => loop {
            match client.try_lock_shared_for(name, short_timeout()) {
                Ok(g) => break g,
                Err(Error::TimedOut { .. }) => {}
                Err(e) => panic!("try_lock_shared_for: {e}"),
            }
        },
        other => panic!("unknown way to lock: {other}"),
    }
}

/// 10 µs, 100 µs, 1 ms, 10 µs, ...
fn short_timeout() -> Duration {
    static N: AtomicU64 = AtomicU64::new(0);
    Duration::from_micros([10, 100, 1000][N.fetch_add(1, Ordering::Relaxed) as usize % 3])
}

/// `iters` times: lock "counter", check and set the flag word, increment the counter word by a
/// plain read and write, check the flag is still ours, clear it, unlock.
fn role_counter(ctx: &ChildCtx) {
    let id: u64 = ctx.param("id");
    let iters: u64 = ctx.param("iters");
    let how: String = ctx.param("how");
    let client = ctx.client(&format!("counter-{id}"));
    let words = Words::open(&ctx.path("words"));
    ctx.barrier();
    for i in 0..iters {
        let g = acquire(&client, "counter", &how);
        assert_eq!(g.mode(), Mode::Exclusive);
        witnessed_section(&words, id, i);
        drop(g);
    }
}

/// First all `readers` readers hold "rw" in shared mode at once (each waits, holding, until all
/// have logged `B`); then `iters` times: lock shared, log `R+`, pause, log `R-`, unlock.
fn role_reader(ctx: &ChildCtx) {
    let id: u64 = ctx.param("id");
    let iters: u64 = ctx.param("iters");
    let readers: usize = ctx.param("readers");
    let client = ctx.client(&format!("reader-{id}"));
    let log = Log::open(&ctx.path("events"));
    let g = client.lock_shared("rw").expect("lock_shared");
    assert_eq!(g.mode(), Mode::Shared);
    log.append(&format!("R+ {id}"));
    log.append(&format!("B {id}"));
    wait_until("every reader to hold rw", || {
        log.lines().iter().filter(|l| l.starts_with("B ")).count() >= readers
    });
    log.append(&format!("R- {id}"));
    drop(g);
    for i in 0..iters {
        let how = if i % 2 == 0 {
            "lock_shared"
        } else {
            "try_lock_shared_for"
        };
        let g = acquire(&client, "rw", how);
        assert_eq!(g.mode(), Mode::Shared);
        log.append(&format!("R+ {id}"));
        std::thread::sleep(Duration::from_micros(100));
        log.append(&format!("R- {id}"));
        drop(g);
    }
}

/// `iters` times: lock "rw" exclusively, log `W+`, increment the counter word, log `W-`, unlock.
fn role_writer(ctx: &ChildCtx) {
    let id: u64 = ctx.param("id");
    let iters: u64 = ctx.param("iters");
    let client = ctx.client(&format!("writer-{id}"));
    let log = Log::open(&ctx.path("events"));
    let words = Words::open(&ctx.path("words"));
    for i in 0..iters {
        let how = if i % 2 == 0 { "lock" } else { "try_lock_for" };
        let g = acquire(&client, "rw", how);
        log.append(&format!("W+ {id}"));
        let c = words.get(COUNT);
        words.set(COUNT, c + 1);
        log.append(&format!("W- {id}"));
        drop(g);
    }
}

/// Locks `name` in `mode` with label `label`, writes its token to file `ready`, waits for file
/// `release`, unlocks (with `LockGuard::unlock`).
fn role_hold(ctx: &ChildCtx) {
    let name: String = ctx.param("name");
    let mode: String = ctx.param("mode");
    let label = ctx.opt_param("label").unwrap_or_default();
    let client = ctx.client(&label);
    let g = match mode.as_str() {
        "exclusive" => client.lock(&name),
        _ => client.lock_shared(&name),
    }
    .expect("lock");
    signal(&ctx.path(&ctx.param::<String>("ready")), &g.token().to_string());
    await_file(&ctx.path(&ctx.param::<String>("release")));
    g.unlock().expect("unlock");
}

/// Locks `name` in `mode` (waiting as long as it takes, or `timeout_ms` if given: a timeout logs
/// `{id}T` and ends the child), logs `{id}+` to `log`, waits until the log holds line
/// `hold_until` if given, logs `{id}-`, unlocks.
fn role_waiter(ctx: &ChildCtx) {
    let id: u64 = ctx.param("id");
    let name: String = ctx.param("name");
    let mode: String = ctx.param("mode");
    let client = ctx.client(&format!("waiter-{id}"));
    let log = Log::open(&ctx.path(&ctx.param::<String>("log")));
    let timeout = ctx
        .opt_param("timeout_ms")
        .map(|ms| Duration::from_millis(ms.parse().expect("timeout_ms")));
    let g = match (mode.as_str(), timeout) {
        ("exclusive", None) => client.lock(&name),
        ("exclusive", Some(t)) => client.try_lock_for(&name, t),
        (_, None) => client.lock_shared(&name),
        (_, Some(t)) => client.try_lock_shared_for(&name, t),
    };
    let g = match g {
        Err(Error::TimedOut { .. }) if timeout.is_some() => {
            log.append(&format!("{id}T"));
            return;
        }
        g => g.expect("lock"),
    };
    log.append(&format!("{id}+"));
    if let Some(line) = ctx.opt_param("hold_until") {
        wait_until(&format!("line {line} in the log"), || log.lines().contains(&line));
    }
    log.append(&format!("{id}-"));
    drop(g);
}

/// Locks `n` names (even ones exclusive, odd ones shared), forgets every guard, drops the client,
/// writes file `dropped`, waits for file `exit`.
fn role_forget(ctx: &ChildCtx) {
    let n: usize = ctx.param("n");
    let client = ctx.client("forgetful");
    for i in 0..n {
        let name = format!("f{i}");
        let g = if i % 2 == 0 {
            client.lock(&name)
        } else {
            client.lock_shared(&name)
        };
        std::mem::forget(g.expect("lock"));
    }
    drop(client);
    signal(&ctx.path("dropped"), "");
    await_file(&ctx.path("exit"));
}

/// `iters` times: lock one of `names` names `n{k}` (a pseudo-random one), check and set its flag
/// word `2k`, increment its counter word `2k + 1`, clear the flag, unlock.
fn role_multi(ctx: &ChildCtx) {
    let id: u64 = ctx.param("id");
    let iters: u64 = ctx.param("iters");
    let names: u64 = ctx.param("names");
    let client = ctx.client(&format!("multi-{id}"));
    let words = Words::open(&ctx.path("words"));
    let mut x = id.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    ctx.barrier();
    for i in 0..iters {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let k = (x % names) as usize;
        let how = ["lock", "try_lock_for", "try_lock"][i as usize % 3];
        let g = acquire(&client, &format!("n{k}"), how);
        let flag = words.get(2 * k);
        assert_eq!(flag, 0, "child {id}, iteration {i}: child {flag} holds n{k} too");
        words.set(2 * k, id);
        let c = words.get(2 * k + 1);
        if i % 4 == 0 {
            std::thread::yield_now();
        }
        words.set(2 * k + 1, c + 1);
        assert_eq!(words.get(2 * k), id, "child {id}, iteration {i}: n{k} was entered");
        words.set(2 * k, 0);
        drop(g);
    }
}

/// `iters` times: lock "tok" exclusively, log `{token} {id}`, unlock.
fn role_token(ctx: &ChildCtx) {
    let id: u64 = ctx.param("id");
    let iters: u64 = ctx.param("iters");
    let client = ctx.client(&format!("token-{id}"));
    let log = Log::open(&ctx.path("tokens"));
    ctx.barrier();
    for _ in 0..iters {
        let g = client.lock("tok").expect("lock");
        log.append(&format!("{} {id}", g.token()));
        drop(g);
    }
}

/// `rounds` times: lock and unlock "b", then "c"; writes the last token to file `evict-token`.
fn role_evict(ctx: &ChildCtx) {
    let rounds: u64 = ctx.param("rounds");
    let client = ctx.client("evict");
    let mut last = 0;
    for _ in 0..rounds {
        for name in ["b", "c"] {
            let g = client.try_lock(name).expect("try_lock");
            last = g.token().0;
        }
    }
    signal(&ctx.path("evict-token"), &last.to_string());
}

/// One `try_lock` (or `try_lock_shared`) of `name`; asserts the outcome is `expect`.
fn role_probe(ctx: &ChildCtx) {
    let name: String = ctx.param("name");
    let mode: String = ctx.param("mode");
    let expect: String = ctx.param("expect");
    let client = ctx.client("probe");
    let r = match mode.as_str() {
        "exclusive" => client.try_lock(&name),
        _ => client.try_lock_shared(&name),
    };
    match (expect.as_str(), r) {
        ("ok", Ok(_)) | ("would_block", Err(Error::WouldBlock)) => {}
        (e, r) => panic!(
            "try_lock {name} in {mode} mode: expected {e}, got {:?}",
            r.map(|g| g.token())
        ),
    };
}

/// Runs a probe child and waits for it; fails the test if the outcome was not `expect`.
fn probe(env: &TestEnv, name: &str, mode: &str, expect: &str) {
    let c = env.spawn("probe", &[("name", &name), ("mode", &mode), ("expect", &expect)]);
    env.wait_success(c);
}

// ---- 1. mutual exclusion ---------------------------------------------------------------------

fn exclusion(test: &str, hows: &[&str], iters: u64) {
    let env = TestEnv::new(test);
    let words = Words::create(&env.path("words"), 2);
    for (i, how) in hows.iter().enumerate() {
        env.spawn("counter", &[("id", &(i + 1)), ("iters", &iters), ("how", how)]);
    }
    env.release_barrier(hows.len());
    env.wait_all_checked();
    assert_eq!(words.get(COUNT), hows.len() as u64 * iters, "lost updates");
    assert_eq!(words.get(FLAG), 0);
    env.assert_quiet();
    let st = env.table.stats();
    assert_eq!(st.owners, 0, "children's owners were not deregistered: {st:?}");
    assert!(st.grants >= hows.len() as u64 * iters, "{st:?}");
}

#[test]
fn exclusive_locks_exclude_across_processes() {
    exclusion("excl", &["lock"; 4], 2_000);
}

#[test]
fn exclusive_locks_exclude_with_timeouts_and_try_lock() {
    exclusion(
        "excl-timed",
        &["try_lock_for", "try_lock_for", "try_lock", "lock"],
        2_000,
    );
}

#[test]
fn exclusion_holds_while_idle_entries_are_evicted_and_reused() {
    // Four entries for sixteen names: every new name evicts an idle one, while others are held.
    let caps = Capacities {
        max_locks: 4,
        max_holds: 8,
        max_owners: 8,
        shards: 1,
        ..Default::default()
    };
    let env = TestEnv::with_caps("churn", &caps);
    let (children, iters, names) = (3u64, 1_500u64, 16u64);
    let words = Words::create(&env.path("words"), 2 * names as usize);
    for id in 1..=children {
        env.spawn("multi", &[("id", &id), ("iters", &iters), ("names", &names)]);
    }
    env.release_barrier(children as usize);
    env.wait_all_checked();
    let total: u64 = (0..names as usize).map(|k| words.get(2 * k + 1)).sum();
    assert_eq!(total, children * iters, "lost updates");
    assert!((0..names as usize).all(|k| words.get(2 * k) == 0));
    env.assert_quiet();
}

// ---- 2. shared mode --------------------------------------------------------------------------

#[test]
fn readers_share_and_writers_exclude_across_processes() {
    let env = TestEnv::new("shared");
    let words = Words::create(&env.path("words"), 2);
    let log = Log::open(&env.path("events"));
    let (readers, writers, iters) = (3u64, 2u64, 150u64);
    for id in 1..=readers {
        env.spawn("reader", &[("id", &id), ("iters", &iters), ("readers", &readers)]);
    }
    // Writers start once every reader held the lock at the same time.
    env.wait_for("every reader to hold rw", |_| {
        log.lines().iter().filter(|l| l.starts_with("B ")).count() as u64 >= readers
    });
    for id in 1..=writers {
        env.spawn("writer", &[("id", &(100 + id)), ("iters", &iters)]);
    }
    env.wait_all_checked();

    // Replay the log: who was inside at each moment.
    let (mut inside_r, mut inside_w) = (HashSet::new(), HashSet::new());
    let (mut max_readers, mut writes) = (0, 0);
    for (n, line) in log.lines().iter().enumerate() {
        let (what, id) = line.split_once(' ').expect("event");
        match what {
            "R+" => {
                assert!(
                    inside_w.is_empty(),
                    "line {n}: reader {id} in while writer {inside_w:?} is"
                );
                inside_r.insert(id.to_string());
                max_readers = max_readers.max(inside_r.len());
            }
            "R-" => assert!(inside_r.remove(id), "line {n}: reader {id} out but not in"),
            "W+" => {
                assert!(
                    inside_r.is_empty() && inside_w.is_empty(),
                    "line {n}: writer {id} in while readers {inside_r:?} and writers {inside_w:?} are"
                );
                inside_w.insert(id.to_string());
                writes += 1;
            }
            "W-" => assert!(inside_w.remove(id), "line {n}: writer {id} out but not in"),
            "B" => {}
            _ => panic!("line {n}: {line:?}"),
        }
    }
    assert!(inside_r.is_empty() && inside_w.is_empty());
    assert!(max_readers >= 2, "readers never held the lock together");
    assert_eq!(writes, writers * iters);
    assert_eq!(words.get(COUNT), writers * iters, "lost updates");
    env.assert_quiet();
    assert_eq!(env.table.stats().owners, 0);
}

// ---- 3. timeouts -----------------------------------------------------------------------------

/// Starts a `hold` child on `name` in `mode` and waits until it holds; returns it and the
/// release file.
fn hold(env: &TestEnv, name: &str, mode: &str, label: &str) -> (common::ChildId, std::path::PathBuf) {
    let (ready, release) = (format!("held-{name}"), format!("release-{name}"));
    let c = env.spawn(
        "hold",
        &[
            ("name", &name),
            ("mode", &mode),
            ("label", &label),
            ("ready", &ready),
            ("release", &release),
        ],
    );
    let ready = env.path(&ready);
    env.wait_for("the holder to hold", |_| ready.exists());
    (c, env.path(&release))
}

#[test]
fn timed_out_requests_name_the_holder() {
    let env = TestEnv::new("timeout");
    let (holder, release) = hold(&env, "t", "exclusive", "holder-a");
    let client = env.client("parent");
    let timeout = Duration::from_millis(200);

    let started = Instant::now();
    match client.try_lock_for("t", timeout) {
        Err(Error::TimedOut {
            waited,
            holder: Some(h),
        }) => {
            assert!(waited >= timeout, "reported waiting {waited:?} of {timeout:?}");
            assert!(started.elapsed() >= timeout, "returned after {:?}", started.elapsed());
            assert_eq!(h.pid, env.pid(holder));
            assert_eq!(h.label, "holder-a");
            assert_eq!(h.holders, 1);
        }
        other => panic!("expected TimedOut with a holder, got {:?}", other.map(|g| g.token())),
    }
    assert_err!(client.try_lock("t"), Error::WouldBlock);
    assert_err!(client.try_lock_shared("t"), Error::WouldBlock);
    assert_err!(
        client.try_lock_shared_for("t", Duration::from_millis(50)),
        Error::TimedOut { holder: Some(h), .. } if h.pid == env.pid(holder)
    );
    let until = Instant::now() + Duration::from_millis(50);
    assert_err!(client.try_lock_until("t", until), Error::TimedOut { .. });
    assert!(Instant::now() >= until);
    let st = env.table.stats();
    assert_eq!((st.timeouts, st.waiting), (3, 0), "{st:?}");

    signal(&release, "");
    env.wait_success(holder);
    let g = client
        .try_lock_for("t", DEADLINE)
        .expect("free once the holder is gone");
    drop(g);

    // A shared holder: exclusive requests time out naming it; shared ones join it.
    let (holder, release) = hold(&env, "s", "shared", "reader-a");
    assert_err!(
        client.try_lock_for("s", Duration::from_millis(50)),
        Error::TimedOut { holder: Some(h), .. } if h.pid == env.pid(holder) && h.holders == 1
    );
    let mine = client.try_lock_shared("s").expect("shared joins shared");
    let other = env.client("other");
    assert_err!(
        other.try_lock_for("s", Duration::from_millis(50)),
        Error::TimedOut { holder: Some(h), .. } if h.holders == 2
    );
    drop(mine);
    signal(&release, "");
    env.wait_all();
    drop((client, other));
    env.assert_quiet();
    assert_eq!(env.table.stats().owners, 0);
}

// ---- 4. FIFO among waiters -------------------------------------------------------------------

/// Queues a `waiter` child per `(id, mode, hold_until)` behind a holder of "q", each only after
/// the previous one is queued; releases the holder; returns the log's lines.
fn queue_behind_holder(env: &TestEnv, waiters: &[(u64, &str, &str)]) -> Vec<String> {
    let (holder, release) = hold(env, "q", "exclusive", "holder");
    for (n, (id, mode, hold_until)) in waiters.iter().enumerate() {
        let mut params: Vec<(&str, &dyn std::fmt::Display)> =
            vec![("id", id), ("name", &"q"), ("mode", mode), ("log", &"order")];
        if !hold_until.is_empty() {
            params.push(("hold_until", hold_until));
        }
        env.spawn("waiter", &params);
        env.wait_for(&format!("waiter {id} to queue"), |t| t.stats().waiting == n as u64 + 1);
    }
    signal(&release, "");
    env.wait_success(holder);
    env.wait_all();
    env.assert_quiet();
    read_lines(&env.path("order"))
}

#[test]
fn waiters_are_granted_in_arrival_order() {
    let env = TestEnv::new("fifo");
    let order = queue_behind_holder(
        &env,
        &[(1, "exclusive", ""), (2, "exclusive", ""), (3, "exclusive", "")],
    );
    assert_eq!(order, ["1+", "1-", "2+", "2-", "3+", "3-"]);
}

#[test]
fn a_run_of_shared_waiters_is_granted_together() {
    let env = TestEnv::new("fifo-shared");
    // 1 and 2 each hold until the other got in: they must be granted together. 3 (exclusive) is
    // next, and 4 (shared) queued behind 3 must not join the first run.
    let order = queue_behind_holder(
        &env,
        &[
            (1, "shared", "2+"),
            (2, "shared", "1+"),
            (3, "exclusive", ""),
            (4, "shared", ""),
        ],
    );
    let pos = |l: &str| {
        order
            .iter()
            .position(|x| x == l)
            .unwrap_or_else(|| panic!("{l} missing: {order:?}"))
    };
    assert!(pos("1+") < 2 && pos("2+") < 2, "{order:?}");
    assert!(pos("3+") > pos("1-") && pos("3+") > pos("2-"), "{order:?}");
    assert_eq!(&order[order.len() - 4..], ["3+", "3-", "4+", "4-"], "{order:?}");
}

#[test]
fn a_reader_queued_behind_a_writer_that_gave_up_joins_the_readers() {
    let env = TestEnv::new("gave-up");
    let (r1, release) = hold(&env, "rw", "shared", "r1");
    // A writer queues behind reader 1 for a while; reader 2 queues behind the writer.
    let w = Arc::new(env.client("writer"));
    let writer = {
        let w = Arc::clone(&w);
        std::thread::spawn(move || w.try_lock_for("rw", Duration::from_secs(2)).map(drop))
    };
    env.wait_for("the writer to queue", |t| t.stats().waiting == 1);
    let r2 = env.spawn(
        "waiter",
        &[("id", &2), ("name", &"rw"), ("mode", &"shared"), ("log", &"order")],
    );
    env.wait_for("reader 2 to queue", |t| {
        assert!(!writer.is_finished(), "the writer gave up before reader 2 queued");
        t.stats().waiting == 2
    });
    env.wait_for("the writer to give up", |_| writer.is_finished());
    assert_err!(writer.join().expect("writer thread"), Error::TimedOut { .. });
    // Only readers hold the lock and nobody else waits: reader 2 must not wait for reader 1.
    let order = env.path("order");
    let granted = || read_lines(&order).contains(&"2-".to_string());
    let deadline = Instant::now() + Duration::from_secs(3);
    while !granted() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    let (while_r1_held, stats) = (granted(), env.table.stats());
    signal(&release, "");
    env.wait_success(r1);
    env.wait_success(r2);
    drop(w);
    env.assert_quiet();
    assert!(
        while_r1_held,
        "reader 2 stayed queued for 3 s after the writer ahead of it gave up, although only reader 1 \
         held the lock in shared mode (it was granted only when reader 1 released); {stats:?}"
    );
}

#[test]
fn a_waiter_that_times_out_leaves_the_queue_in_order() {
    let env = TestEnv::new("fifo-timeout");
    let (holder, release) = hold(&env, "q", "exclusive", "holder");
    let waiters: [&[(&str, &dyn std::fmt::Display)]; 3] = [
        &[("id", &1), ("name", &"q"), ("mode", &"exclusive"), ("log", &"order")],
        &[
            ("id", &2),
            ("name", &"q"),
            ("mode", &"exclusive"),
            ("log", &"order"),
            ("timeout_ms", &1000),
        ],
        &[("id", &3), ("name", &"q"), ("mode", &"exclusive"), ("log", &"order")],
    ];
    let order = env.path("order");
    let timed_out = || read_lines(&order).contains(&"2T".to_string());
    for (n, params) in waiters.iter().enumerate() {
        env.spawn("waiter", params);
        env.wait_for(&format!("waiter {} to queue", n + 1), |t| {
            assert!(!timed_out(), "waiter 2 timed out before waiter 3 queued");
            t.stats().waiting == n as u64 + 1
        });
    }
    // The middle one leaves the queue; the others keep their places.
    env.wait_for("waiter 2 to time out", |_| timed_out());
    assert_eq!(env.table.stats().waiting, 2);
    signal(&release, "");
    env.wait_success(holder);
    env.wait_all();
    assert_eq!(read_lines(&env.path("order")), ["2T", "1+", "1-", "3+", "3-"]);
    assert_eq!(env.table.stats().timeouts, 1);
    env.assert_quiet();
}

#[test]
fn a_long_waiter_is_handed_the_lock_and_readers_do_not_pass_a_queued_writer() {
    let env = TestEnv::new("fair");
    let client = env.client("parent");
    let g = client.lock("q").expect("lock");
    // The waiter, once granted, holds the lock until the log says "go".
    env.spawn(
        "waiter",
        &[
            ("id", &1),
            ("name", &"q"),
            ("mode", &"exclusive"),
            ("log", &"order"),
            ("hold_until", &"go"),
        ],
    );
    env.wait_for("the waiter to queue", |t| t.stats().waiting == 1);
    std::thread::sleep(shmlock::table::FAIR_AFTER * 5);
    // The waiter has waited longer than FAIR_AFTER: the release hands it the lock, so the
    // releasing owner cannot take it straight back.
    drop(g);
    assert_err!(client.try_lock("q"), Error::WouldBlock);
    Log::open(&env.path("order")).append("go");
    env.wait_all();
    assert!(env.table.stats().handoffs >= 1);

    // A reader holds; a writer queues; a new reader queues behind the writer.
    let r = client.lock_shared("rw").expect("lock_shared");
    env.spawn(
        "waiter",
        &[("id", &2), ("name", &"rw"), ("mode", &"exclusive"), ("log", &"order")],
    );
    env.wait_for("the writer to queue", |t| t.stats().waiting == 1);
    let other = env.client("other");
    assert_err!(other.try_lock_shared("rw"), Error::WouldBlock);
    drop(r);
    env.wait_all();
    let mut order = read_lines(&env.path("order"));
    order.retain(|l| l != "go");
    assert_eq!(order, ["1+", "1-", "2+", "2-"]);
    drop((client, other));
    env.assert_quiet();
}

// ---- 5. forgotten guards ---------------------------------------------------------------------

#[test]
fn dropping_a_client_releases_its_forgotten_guards() {
    let env = TestEnv::new("forget");
    let n = 24;
    let c = env.spawn("forget", &[("n", &n)]);
    let dropped = env.path("dropped");
    env.wait_for("the child to drop its client", |_| dropped.exists());
    // The child is still running: only dropping the client can have released the locks.
    let st = env.table.stats();
    assert_eq!((st.held, st.shared_holds, st.owners), (0, 0, 0), "{st:?}");
    let client = env.client("parent");
    for i in 0..n {
        let name = format!("f{i}");
        assert!(client.try_lock(&name).is_ok(), "{name} still held");
    }
    signal(&env.path("exit"), "");
    env.wait_success(c);
    env.assert_quiet();
}

// ---- 6. full pools ---------------------------------------------------------------------------

#[test]
fn a_full_entry_pool_refuses_new_names_and_keeps_held_ones() {
    let caps = Capacities {
        max_locks: 4,
        max_holds: 8,
        max_owners: 8,
        shards: 1,
        ..Default::default()
    };
    let env = TestEnv::with_caps("full-entries", &caps);
    let c1 = env.client("c1");
    let c2 = Arc::new(env.client("c2"));
    let names = ["a", "b", "c", "d"];
    let mut guards: Vec<_> = names.iter().map(|n| c1.lock(n).expect("lock")).collect();
    assert_err!(
        c1.try_lock("e"),
        Error::PoolFull {
            pool: "lock entry",
            shard: Some(0),
            capacity: 4
        }
    );
    assert_err!(c1.try_lock_shared("e"), Error::PoolFull { pool: "lock entry", .. });
    // The message names the setting to raise, and that it takes a new segment.
    let why = c1.try_lock("e").map(|_| ()).unwrap_err().to_string();
    assert!(
        why.contains("raise max_locks (--max-locks)") && why.contains("new segment"),
        "{why}"
    );
    let c = Arc::clone(&c2);
    let r = within("lock on a full table", move || c.lock("e").map(|g| g.token()));
    assert_err!(r, Error::PoolFull { pool: "lock entry", .. });
    for n in names {
        assert_err!(c2.try_lock(n), Error::WouldBlock);
        assert_err!(c2.try_lock_shared(n), Error::WouldBlock);
    }
    assert!(env.table.check().is_empty(), "{:?}", env.table.check());
    assert_eq!(env.table.stats().held, 4);

    // "b" goes idle: its entry is reused for a new name.
    drop(guards.remove(1));
    let e = c1.try_lock("e").expect("idle entries are reused");
    assert_err!(c2.try_lock("b"), Error::PoolFull { pool: "lock entry", .. });
    for n in ["a", "c", "d", "e"] {
        assert_err!(c2.try_lock(n), Error::WouldBlock);
    }
    drop(e);
    drop(guards);
    for n in ["a", "b", "c", "d", "e"] {
        let g = c2.try_lock(n);
        assert!(g.is_ok(), "{n}: {:?}", g.map(|g| g.token()));
    }
    env.assert_quiet();
}

#[test]
fn a_full_hold_pool_refuses_shared_holds_and_waits() {
    let caps = Capacities {
        max_locks: 8,
        max_holds: 2,
        max_owners: 8,
        shards: 1,
        ..Default::default()
    };
    let env = TestEnv::with_caps("full-holds", &caps);
    let (r1, r2, r3) = (env.client("r1"), env.client("r2"), env.client("r3"));
    let g1 = r1.try_lock_shared("s").expect("first reader");
    let g2 = r2.try_lock_shared("s").expect("second reader");
    assert_err!(
        r3.try_lock_shared("s"),
        Error::PoolFull {
            pool: "hold/wait",
            shard: Some(0),
            capacity: 2
        }
    );
    assert_err!(r3.try_lock_shared("other"), Error::PoolFull { pool: "hold/wait", .. });
    // Waiting needs a record too; exclusive holds do not.
    assert_err!(
        r3.try_lock_for("s", Duration::from_millis(20)),
        Error::PoolFull { pool: "hold/wait", .. }
    );
    let x = r3.try_lock("x").expect("an exclusive hold needs no record");
    assert!(env.table.check().is_empty(), "{:?}", env.table.check());
    drop(g1);
    let g3 = r3.try_lock_shared("s").expect("a record was freed");
    assert_eq!(env.table.stats().shared_holds, 2);
    drop((g2, g3, x));
    env.assert_quiet();
}

#[test]
fn a_full_owner_pool_refuses_new_clients() {
    let caps = Capacities {
        max_owners: 2,
        ..common::small_caps()
    };
    let env = TestEnv::with_caps("full-owners", &caps);
    let a = env.client("a");
    let b = Client::open(&env.segment).expect("second owner");
    assert_err!(
        Client::with_table(Arc::clone(&env.table), "c"),
        Error::PoolFull {
            pool: "owner",
            shard: None,
            capacity: 2
        }
    );
    assert_err!(Client::open(&env.segment), Error::PoolFull { pool: "owner", .. });
    assert_eq!(env.table.stats().owners, 2);
    drop(a);
    let c = env.client("c");
    let g = c.try_lock("x").expect("a new owner locks");
    assert_err!(b.try_lock("x"), Error::WouldBlock);
    drop(g);
    drop((b, c));
    assert_eq!(env.table.stats().owners, 0);
    env.assert_quiet();
}

// ---- 7. names --------------------------------------------------------------------------------

#[test]
fn names_are_validated_and_any_bytes_are_distinct_names() {
    let caps = Capacities {
        max_name_len: 13,
        ..common::small_caps()
    };
    let env = TestEnv::with_caps("names", &caps);
    let c1 = env.client("c1");
    let c2 = env.client("c2");
    assert_err!(c1.try_lock(""), Error::NameInvalid { len: 0, max: 13 });
    assert_err!(c1.lock_shared(b""), Error::NameInvalid { len: 0, max: 13 });
    assert_err!(c1.try_lock([b'x'; 14]), Error::NameInvalid { len: 14, max: 13 });
    assert_err!(
        c1.try_lock_for([b'x'; 100], DEADLINE),
        Error::NameInvalid { len: 100, max: 13 }
    );
    assert_err!(c1.unlock(""), Error::NameInvalid { len: 0, max: 13 });
    let longest = c1.try_lock([b'x'; 13]).expect("a name of exactly max_name_len bytes");

    // Names that differ only in zero bytes, 0xff bytes, length, or their last byte.
    let mut names: Vec<Vec<u8>> = (1..=13).map(|n| vec![0u8; n]).collect();
    names.extend((1..=13).map(|n| vec![0xffu8; n]));
    names.extend([
        b"a".to_vec(),
        b"a\0".to_vec(),
        b"\0a".to_vec(),
        b"a\0\0\0\0\0\0\0".to_vec(),
    ]);
    names.extend([
        b"12345678abcde".to_vec(),
        b"12345678abcdf".to_vec(),
        b"12345678abcd".to_vec(),
    ]);
    names.extend([vec![0xff, 0], vec![0, 0xff], vec![0x80, 0x7f, 0x00, 0xfe]]);
    let guards: Vec<_> = names
        .iter()
        .map(|n| c1.try_lock(n).unwrap_or_else(|e| panic!("{n:?}: {e}")))
        .collect();
    assert_eq!(env.table.stats().held, names.len() as u64 + 1);
    for n in &names {
        assert_err!(c2.try_lock(n), Error::WouldBlock);
    }
    let other = c2.try_lock(b"a\0\0").expect("a name nobody holds");
    drop((guards, longest, other));
    env.assert_quiet();
}

// ---- 8. re-locking ---------------------------------------------------------------------------

#[test]
fn relocking_a_held_name_is_an_error_not_a_deadlock() {
    let env = TestEnv::new("relock");
    let c1 = Arc::new(env.client("c1"));
    let c2 = env.client("c2");

    let g = c1.lock("r").expect("lock");
    assert_err!(c1.try_lock("r"), Error::AlreadyHeld);
    assert_err!(c1.try_lock_shared("r"), Error::AlreadyHeld);
    assert_err!(c1.try_lock_for("r", DEADLINE), Error::AlreadyHeld);
    let c = Arc::clone(&c1);
    assert_err!(
        within("lock of a held name", move || c.lock("r").map(drop)),
        Error::AlreadyHeld
    );
    let c = Arc::clone(&c1);
    assert_err!(
        within("lock_shared of a held name", move || c.lock_shared("r").map(drop)),
        Error::AlreadyHeld
    );
    // Another client in this process is another owner.
    assert_err!(c2.try_lock("r"), Error::WouldBlock);
    assert_err!(c2.try_lock_shared("r"), Error::WouldBlock);
    drop(g);

    let s = c1.lock_shared("s").expect("lock_shared");
    assert_err!(c1.try_lock_shared("s"), Error::AlreadyHeld);
    assert_err!(c1.try_lock("s"), Error::AlreadyHeld);
    let c = Arc::clone(&c1);
    assert_err!(
        within("lock_shared of a held name", move || c.lock_shared("s").map(drop)),
        Error::AlreadyHeld
    );
    let c = Arc::clone(&c1);
    assert_err!(
        within("lock of a held name", move || c.lock("s").map(drop)),
        Error::AlreadyHeld
    );
    let s2 = c2.try_lock_shared("s").expect("another owner shares");
    assert_err!(c2.try_lock("s"), Error::AlreadyHeld);
    drop((s, s2));
    drop(c2);
    drop(c1);
    env.assert_quiet();
    assert_eq!(env.table.stats().owners, 0);
}

// ---- 9. threads ------------------------------------------------------------------------------

#[test]
fn threads_sharing_a_client_are_one_owner() {
    let env = TestEnv::new("threads-one");
    let client = env.client("shared-by-threads");
    let g = client.lock("t").expect("lock");
    std::thread::scope(|s| {
        s.spawn(|| {
            assert_err!(client.try_lock("t"), Error::AlreadyHeld);
            assert_err!(client.try_lock_for("t", DEADLINE), Error::AlreadyHeld);
            assert_err!(client.try_lock_shared_for("t", DEADLINE), Error::AlreadyHeld);
            // Other names are the thread's to take, for the same owner.
            let u = client.try_lock("u").expect("lock u");
            drop(u);
        });
    });
    drop(g);

    // While one thread's request is queued, another's for the same name queues behind it.
    let a = Arc::new(env.client("a"));
    let b = env.client("b");
    let held = b.lock("n").expect("lock");
    let events = Arc::new(Mutex::new(Vec::new()));
    for id in 1..=2 {
        let (a, events) = (Arc::clone(&a), Arc::clone(&events));
        std::thread::spawn(move || {
            let g = a.lock("n");
            let g = g.unwrap_or_else(|e| panic!("thread {id}: {e}"));
            events.lock().unwrap().push(format!("{id}+"));
            std::thread::sleep(Duration::from_millis(5));
            events.lock().unwrap().push(format!("{id}-"));
            drop(g);
        });
        env.wait_for(&format!("thread {id} to queue"), |t| t.stats().waiting == id);
    }
    drop(held);
    env.wait_for("both threads to lock and unlock", |_| events.lock().unwrap().len() == 4);
    assert_eq!(*events.lock().unwrap(), ["1+", "1-", "2+", "2-"]);
    env.wait_for("the threads to finish", |_| Arc::strong_count(&a) == 1);
    drop((a, b));
    env.assert_quiet();
}

#[test]
fn clients_in_different_threads_exclude_each_other() {
    let env = TestEnv::new("threads-two");
    let (flag, count) = (AtomicU64::new(0), AtomicU64::new(0));
    let iters = 2_000;
    std::thread::scope(|s| {
        for id in 1..=2u64 {
            let (env, flag, count) = (&env, &flag, &count);
            s.spawn(move || {
                let client = env.client(&format!("thread-{id}"));
                for _ in 0..iters {
                    // Bounded: a lost wake-up fails the test instead of hanging it.
                    let g = client.try_lock_for("m", DEADLINE).expect("lock");
                    assert_eq!(flag.load(Ordering::Relaxed), 0, "both threads inside");
                    flag.store(id, Ordering::Relaxed);
                    let c = count.load(Ordering::Relaxed);
                    count.store(c + 1, Ordering::Relaxed);
                    assert_eq!(flag.load(Ordering::Relaxed), id, "both threads inside");
                    flag.store(0, Ordering::Relaxed);
                    drop(g);
                }
            });
        }
    });
    assert_eq!(count.load(Ordering::Relaxed), 2 * iters);
    env.assert_quiet();
}

// ---- 10. fencing tokens ----------------------------------------------------------------------

#[test]
fn fencing_tokens_increase_across_processes() {
    let env = TestEnv::new("tokens");
    let (children, iters) = (3u64, 300u64);
    for id in 1..=children {
        env.spawn("token", &[("id", &id), ("iters", &iters)]);
    }
    env.release_barrier(children as usize);
    env.wait_all_checked();
    let lines = read_lines(&env.path("tokens"));
    assert_eq!(lines.len() as u64, children * iters);
    // The log is written under the lock, so its order is the order of the grants.
    let tokens: Vec<u64> = lines
        .iter()
        .map(|l| l.split_once(' ').expect("token line").0.parse().expect("token"))
        .collect();
    for (n, w) in tokens.windows(2).enumerate() {
        assert!(
            w[0] < w[1],
            "grant {n} got token {} and grant {} got {}",
            w[0],
            n + 1,
            w[1]
        );
    }
    let writers: HashSet<&str> = lines.iter().map(|l| l.split_once(' ').unwrap().1).collect();
    assert_eq!(writers.len() as u64, children);
    env.assert_quiet();
}

#[test]
fn fencing_tokens_survive_eviction_of_the_entry() {
    let caps = Capacities {
        max_locks: 2,
        max_holds: 2,
        max_owners: 8,
        shards: 1,
        ..Default::default()
    };
    let env = TestEnv::with_caps("tokens-evict", &caps);
    let client = env.client("parent");
    let first = client.lock("a").expect("lock a").token();
    let again = client.lock("a").expect("lock a").token();
    assert!(again > first);
    // A child fills the table with "b" and "c": "a" is evicted.
    let c = env.spawn("evict", &[("rounds", &5)]);
    env.wait_success(c);
    let theirs: u64 = await_file(&env.path("evict-token")).parse().expect("token");
    let st = env.table.stats();
    assert_eq!((st.idle, st.held, st.free), (2, 0, 0), "{st:?}");
    // Tokens order the grants of one name; "a"'s entry was reused by "b" and "c" meanwhile.
    let after = client.lock("a").expect("lock a after eviction").token();
    assert!(
        after > again,
        "token {after} after eviction, {again} before ({theirs} given to other names in between)"
    );
    env.assert_quiet();
}

// ---- 11. explicit unlock ---------------------------------------------------------------------

#[test]
fn explicit_unlocks_release_to_other_processes() {
    let env = TestEnv::new("unlock");
    let c1 = env.client("c1");
    let c2 = env.client("c2");

    let g = c1.lock("u").expect("lock");
    probe(&env, "u", "exclusive", "would_block");
    g.unlock().expect("guard.unlock");
    probe(&env, "u", "exclusive", "ok");

    // A forgotten guard stays held until unlocked by name.
    std::mem::forget(c1.lock("u").expect("lock"));
    probe(&env, "u", "shared", "would_block");
    c1.unlock("u").expect("unlock by name");
    probe(&env, "u", "exclusive", "ok");
    assert_err!(c1.unlock("u"), Error::NotHeld);
    assert_err!(c1.unlock("never-locked"), Error::NotHeld);

    std::mem::forget(c1.lock_shared("w").expect("lock_shared"));
    probe(&env, "w", "exclusive", "would_block");
    probe(&env, "w", "shared", "ok");
    c1.unlock("w").expect("unlock shared by name");
    probe(&env, "w", "exclusive", "ok");

    // Someone else's lock cannot be unlocked.
    let v = c2.lock("v").expect("lock");
    assert_err!(c1.unlock("v"), Error::NotHeld);
    probe(&env, "v", "exclusive", "would_block");
    drop(v);
    env.assert_quiet();
}

#[test]
fn a_stale_guard_never_releases_a_later_grant() {
    let env = TestEnv::new("stale");
    let c1 = env.client("c1");
    let c2 = env.client("c2");

    // Unlocked by name under the guard's feet, then taken by another owner.
    let g = c1.lock("x").expect("lock");
    c1.unlock("x").expect("unlock by name");
    let theirs = c2.try_lock("x").expect("free after unlock by name");
    assert_err!(g.unlock(), Error::NotHeld);
    probe(&env, "x", "exclusive", "would_block");
    drop(theirs);

    // Unlocked by name, then taken again by the same owner: the old guard's drop is a no-op.
    let old = c1.lock("y").expect("lock");
    c1.unlock("y").expect("unlock by name");
    let new = c1.try_lock("y").expect("relock");
    assert!(new.token() > old.token());
    drop(old);
    probe(&env, "y", "exclusive", "would_block");
    drop(new);

    // The same for shared grants.
    let old = c1.lock_shared("z").expect("lock_shared");
    c1.unlock("z").expect("unlock by name");
    let new = c1.try_lock_shared("z").expect("relock");
    assert_err!(old.unlock(), Error::NotHeld);
    probe(&env, "z", "exclusive", "would_block");
    drop(new);
    env.assert_quiet();

    // A guard whose name was evicted and whose entry now holds another name of the same owner.
    let caps = Capacities {
        max_locks: 1,
        max_holds: 2,
        max_owners: 8,
        shards: 1,
        ..Default::default()
    };
    let env = TestEnv::with_caps("stale-evicted", &caps);
    let c1 = env.client("c1");
    let old = c1.lock("x").expect("lock");
    c1.unlock("x").expect("unlock by name");
    let other = c1.try_lock("y").expect("the only entry is reused for y");
    assert_err!(old.unlock(), Error::NotHeld);
    probe(&env, "y", "exclusive", "would_block");
    drop(other);
    env.assert_quiet();
}

// ---- segments --------------------------------------------------------------------------------

#[test]
fn clients_open_segments_by_name() {
    let env = TestEnv::new("open");
    let c = Client::open(&env.segment).expect("open the test's segment");
    let g = c.lock("o").expect("lock");
    assert_err!(env.client("other").try_lock("o"), Error::WouldBlock);
    drop(g);
    drop(c);
    let missing = format!("{}-missing", env.segment);
    assert_err!(LockTable::open(&missing), Error::SegmentMissing { .. });
    assert_err!(Client::open(&missing), Error::SegmentMissing { .. });
    assert_err!(
        LockTable::create(&env.segment, &common::small_caps()),
        Error::SegmentExists { .. }
    );
    let t = LockTable::create_or_open(&env.segment, &common::small_caps()).expect("opens the existing one");
    assert!(t.check().is_empty());
    env.assert_quiet();
}

// ---- 9. waits a binding can interrupt, and fork() -------------------------------------------

#[test]
fn an_interrupted_wait_leaves_the_queue_and_the_others_keep_their_places() {
    use shmlock::{Locker, Wait};
    let env = TestEnv::new("interrupt");
    let holder = env.client("holder");
    let g = holder.lock("q").expect("lock");
    let (a, b) = (env.client("a"), env.client("b"));
    let stop = std::sync::atomic::AtomicBool::new(false);
    let asked = AtomicU64::new(0);
    std::thread::scope(|s| {
        let first = s.spawn(|| {
            let mut interrupted = || {
                asked.fetch_add(1, Ordering::Relaxed);
                stop.load(Ordering::Relaxed)
            };
            a.acquire_interruptible("q", Mode::Exclusive, Wait::Forever, &mut interrupted)
                .map(|g| g.token())
        });
        env.wait_for("a to queue", |t| t.stats().waiting == 1);
        let second = s.spawn(|| b.lock("q").map(|g| g.token()));
        env.wait_for("b to queue behind a", |t| t.stats().waiting == 2);
        // a is asked while it waits (every sleep), and keeps waiting while the answer is no.
        wait_until("a to be asked twice", || asked.load(Ordering::Relaxed) >= 2);
        assert_eq!(env.table.stats().waiting, 2);
        stop.store(true, Ordering::Relaxed);
        assert_err!(first.join().unwrap(), Error::Interrupted);
        // Withdrawn, not timed out; b is next.
        let st = env.table.stats();
        assert_eq!((st.waiting, st.timeouts), (1, 0), "{st:?}");
        let held = g.token();
        drop(g);
        let token = second.join().unwrap().expect("b is granted once the holder lets go");
        assert!(token > held);
    });
    // Not waiting: an interruptible request is an ordinary one.
    let mut never = || false;
    let g = a
        .acquire_interruptible("free", Mode::Shared, Wait::No, &mut never)
        .expect("a free lock");
    assert_eq!(g.mode(), Mode::Shared);
    drop(g);
    let _h = holder.lock("busy").expect("lock");
    let deadline = Wait::for_duration(Duration::from_millis(30));
    assert_err!(
        a.acquire_interruptible("busy", Mode::Exclusive, deadline, &mut never),
        Error::TimedOut { .. }
    );
    drop(_h);
    drop((holder, a, b));
    env.assert_quiet();
}

#[test]
#[allow(unsafe_code)]
fn a_forked_child_cannot_use_its_parents_client_and_leaves_its_locks_alone() {
    let env = TestEnv::new("fork");
    let client = env.client("parent");
    let g = client.lock("a").expect("lock");
    let held = client.lock_shared("s").expect("lock_shared");
    // SAFETY: the child runs only this function's code (the library's calls, no other thread's
    // state: the harness's threads do not hold glibc's malloc locks across fork, which glibc's
    // own atfork handlers reset) and leaves with _exit, running no destructors of the parent's.
    match unsafe { nix::unistd::fork() }.expect("fork") {
        nix::unistd::ForkResult::Child => {
            let code = 'child: {
                match client.try_lock("b") {
                    Err(Error::ForkedClient { opened_by, pid }) if opened_by != pid => {}
                    _ => break 'child 1,
                }
                if !matches!(client.unlock("a"), Err(Error::ForkedClient { .. })) {
                    break 'child 2;
                }
                // Dropping the inherited guards and client gives back nothing of the parent's.
                drop(held);
                drop(g);
                drop(client);
                let own = Client::open(&env.segment).expect("the child opens its own client");
                if !matches!(own.try_lock("a"), Err(Error::WouldBlock)) {
                    break 'child 3;
                }
                if !matches!(own.try_lock("s"), Err(Error::WouldBlock)) {
                    break 'child 4;
                }
                match own.lock("c").map(|g| g.unlock()) {
                    Ok(Ok(())) => 0,
                    _ => 5,
                }
            };
            // SAFETY: _exit ends the child at once, as a forked child of a threaded process
            // should (no atexit handlers, no destructors of state copied from the parent).
            unsafe { libc::_exit(code) }
        }
        nix::unistd::ForkResult::Parent { child } => {
            let status = nix::sys::wait::waitpid(child, None).expect("waitpid");
            assert_eq!(
                status,
                nix::sys::wait::WaitStatus::Exited(child, 0),
                "the child's checks"
            );
            // Still the parent's, and still working.
            assert!(held.unlock().is_ok());
            assert!(g.unlock().is_ok());
            let g = client.lock("b").expect("the parent's client still works");
            drop(g);
        }
    }
    drop(client);
    env.assert_quiet();
}
