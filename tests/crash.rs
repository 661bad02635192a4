//! Crash safety with real processes: holders killed with SIGKILL, with and without `shmlockd`;
//! recycled pids; a supervisor killed and restarted; and the chaos test, where workers are killed
//! at random moments and inside the table's critical sections while a witness outside the table
//! checks mutual exclusion.

mod common;

use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use shmlock::owner::pid_alive;
use shmlock::{Client, Error, LockTable, Mode};

// ---- child processes -------------------------------------------------------------------------

common::child_roles! {
    "holder" => role_holder,
    "waiter" => role_waiter,
    "worker" => role_worker,
    "registrar" => role_registrar,
    "reaper" => role_reaper,
    "cycler" => role_cycler,
}

/// Locks `name` in `mode`, writes file `ready`, then sleeps until killed.
fn role_holder(ctx: &ChildCtx) {
    let name: String = ctx.param("name");
    let client = ctx.client("holder");
    let g = match ctx.param::<String>("mode").as_str() {
        "exclusive" => client.lock(&name),
        _ => client.lock_shared(&name),
    }
    .expect("lock");
    signal(&ctx.path(&ctx.param::<String>("ready")), &g.token().to_string());
    std::thread::sleep(DEADLINE * 2);
}

/// Writes `waiting` and locks `name` exclusively, or shared with parameter `mode=shared`
/// (waiting as long as it takes); writes "{token} {owner_died}" to file `got`; unlocks.
fn role_waiter(ctx: &ChildCtx) {
    let name: String = ctx.param("name");
    let client = ctx.client("waiter");
    signal(&ctx.path("waiting"), "");
    let g = match ctx.opt_param("mode").as_deref() {
        Some("shared") => client.lock_shared(&name),
        _ => client.lock(&name),
    }
    .expect("lock");
    signal(&ctx.path("got"), &format!("{} {}", g.token(), g.owner_died()));
}

/// Waits for file `go`, registers an owner (panics if it cannot), writes file `registered-{k}`,
/// and waits for file `done`.
fn role_registrar(ctx: &ChildCtx) {
    await_file(&ctx.path("go"));
    let client = ctx.client("registrar");
    signal(&ctx.path(&format!("registered-{}", ctx.param::<u32>("k"))), "");
    await_file(&ctx.path("done"));
    drop(client);
}

/// Arms the chaos point `chaos`, then asks for `name` twice with a 300 ms timeout (reaping the
/// dead holder it finds, as any caller without shmlockd does); exits normally if it lives.
fn role_reaper(ctx: &ChildCtx) {
    let name: String = ctx.param("name");
    let client = ctx.client("reaper");
    shmlock::chaos::kill_after(ctx.param("chaos"));
    for _ in 0..2 {
        match client.try_lock_for(&name, Duration::from_millis(300)) {
            Ok(g) => drop(g),
            Err(Error::TimedOut { .. }) => {}
            Err(e) => panic!("reaper: {e}"),
        }
    }
}

/// Arms the chaos point `chaos`, then locks `name` shared and exclusively, twice each (the
/// shared grants and releases latched, the exclusive ones mostly by the fast CAS), appending
/// each grant's token to file `tokens` before it unlocks; exits normally if it lives.
fn role_cycler(ctx: &ChildCtx) {
    use std::io::Write;
    let name: String = ctx.param("name");
    let client = ctx.client("cycler");
    let mut log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(ctx.path("tokens"))
        .expect("token log");
    shmlock::chaos::kill_after(ctx.param("chaos"));
    for _ in 0..2 {
        for shared in [true, false] {
            let g = if shared {
                client.lock_shared(&name)
            } else {
                client.lock(&name)
            }
            .expect("lock");
            writeln!(log, "{}", g.token()).expect("log the token");
            g.unlock().expect("unlock");
        }
    }
}

/// Names the chaos workers lock.
const NAMES: usize = 6;
/// Worker slots.
const SLOTS: usize = 4;
/// Witness words: `EXCL + n` holds the pid holding name n exclusively; `SHARED + n * SLOTS + k`
/// the pid of slot k's worker while it holds name n shared.
const EXCL: usize = 0;
const SHARED: usize = NAMES;

/// Random operations on a few names until file `stop` exists, checking the witness around each
/// critical section. With `chaos` > 0 the process kills itself at that chaos point.
fn role_worker(ctx: &ChildCtx) {
    let slot: usize = ctx.param("slot");
    let mut rng: u64 = ctx.param::<u64>("seed") | 1;
    let chaos: u64 = ctx.param("chaos");
    let me = u64::from(std::process::id());
    let words = Words::open(&ctx.path("witness"));
    let log = Log::open(&ctx.path("violations"));
    for n in 0..NAMES {
        words.set(SHARED + n * SLOTS + slot, 0);
    }
    let client = ctx.client(&format!("worker-{slot}"));
    shmlock::chaos::kill_after(chaos);
    let stop = ctx.path("stop");
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let alive = |pid: u64| pid != 0 && pid != me && pid_alive(pid as u32);
    while !stop.exists() {
        let n = (next() % NAMES as u64) as usize;
        let name = format!("chaos-{n}");
        let shared = next() % 3 == 0;
        let how = next() % 3;
        let r = match (shared, how) {
            (false, 0) => client.lock(&name),
            (false, 1) => client.try_lock(&name),
            (false, _) => client.try_lock_for(&name, Duration::from_millis(next() % 20)),
            (true, 0) => client.lock_shared(&name),
            (true, 1) => client.try_lock_shared(&name),
            (true, _) => client.try_lock_shared_for(&name, Duration::from_millis(next() % 20)),
        };
        let g = match r {
            Ok(g) => g,
            Err(Error::WouldBlock | Error::TimedOut { .. }) => continue,
            Err(e) => {
                log.append(&format!("pid {me}: {name}: unexpected error: {e}"));
                continue;
            }
        };
        let excl = words.get(EXCL + n);
        if alive(excl) {
            log.append(&format!(
                "pid {me}: {name} granted while live pid {excl} holds it exclusively"
            ));
        }
        if shared {
            if excl != 0 && g.owner_died() {
                // The notice is ours: the dead writer's mark is acknowledged.
                words.set(EXCL + n, 0);
            }
            words.set(SHARED + n * SLOTS + slot, me);
        } else {
            if excl != 0 && !g.owner_died() {
                log.append(&format!(
                    "pid {me}: {name} taken from dead pid {excl} without the owner-died notice"
                ));
            }
            for k in 0..SLOTS {
                let r = words.get(SHARED + n * SLOTS + k);
                if alive(r) {
                    log.append(&format!("pid {me}: {name} granted exclusively while pid {r} reads"));
                }
            }
            words.set(EXCL + n, me);
        }
        for _ in 0..next() % 50 {
            std::hint::spin_loop();
        }
        if next() % 4 == 0 {
            std::thread::yield_now();
        }
        if shared {
            if alive(words.get(EXCL + n)) {
                log.append(&format!("pid {me}: a writer entered {name} while we read"));
            }
            words.set(SHARED + n * SLOTS + slot, 0);
        } else {
            if words.get(EXCL + n) != me {
                log.append(&format!("pid {me}: someone entered {name} while we held it"));
            }
            words.set(EXCL + n, 0);
        }
        if next() % 2 == 0 {
            drop(g);
        } else if let Err(e) = g.unlock() {
            log.append(&format!("pid {me}: unlock {name}: {e}"));
        }
    }
}

// ---- helpers ---------------------------------------------------------------------------------

/// Starts a holder of `name` and waits until it holds it.
fn hold(env: &TestEnv, name: &str, mode: &str, ready: &str) -> ChildId {
    let id = env.spawn("holder", &[("name", &name), ("mode", &mode), ("ready", &ready)]);
    await_file(&env.path(ready));
    id
}

/// Locks `name` on a thread of this process, bounded by the test deadline.
fn lock_in_background(env: &TestEnv, name: &'static str) -> std::thread::JoinHandle<(u64, bool)> {
    let table = Arc::clone(&env.table);
    std::thread::spawn(move || {
        let c = Client::with_table(table, "parent-waiter").unwrap();
        let g = c.lock(name).expect("lock");
        (g.token().0, g.owner_died())
    })
}

fn join_within<T>(what: &str, h: std::thread::JoinHandle<T>) -> T {
    let deadline = Instant::now() + DEADLINE;
    while !h.is_finished() {
        assert!(Instant::now() < deadline, "{what}: not done within {DEADLINE:?}");
        std::thread::sleep(Duration::from_millis(2));
    }
    h.join().expect(what)
}

// ---- tests -----------------------------------------------------------------------------------

#[test]
fn a_killed_holders_lock_goes_to_its_waiter_without_shmlockd() {
    for mode in ["exclusive", "shared"] {
        let env = TestEnv::new(&format!("kill-holder-{mode}"));
        let holder = hold(&env, "x", mode, "ready");
        let waiter = lock_in_background(&env, "x");
        env.wait_for("the waiter to queue", |t| t.stats().waiting == 1);
        env.kill(holder);
        let (token, died) = join_within("the waiter's grant", waiter);
        assert!(died, "{mode}: the grant must say the previous owner died");
        assert!(token > 1);
        let st = env.table.stats();
        assert_eq!((st.reaps, st.owners), (1, 0), "{st:?}");
        env.assert_quiet();
    }
}

#[test]
fn shmlockd_reaps_a_killed_holder_nobody_waits_for() {
    let env = TestEnv::new("daemon-reaps");
    let _d = Daemon::start(&env);
    let holder = hold(&env, "x", "exclusive", "ready");
    env.wait_for("shmlockd to see the holder", |t| t.stats().owners == 1);
    env.kill(holder);
    env.wait_for("shmlockd to reap the holder", |t| t.stats().reaps == 1);
    let c = env.client("after");
    let g = c.try_lock("x").expect("free after the reap");
    assert!(g.owner_died(), "the next grant must carry the notice");
    drop(g);
    let g = c.try_lock("x").unwrap();
    assert!(!g.owner_died(), "the notice is given once");
    drop(g);
    drop(c);
    env.assert_quiet();
}

#[test]
fn shmlockd_hands_a_killed_holders_lock_to_a_waiting_process() {
    let env = TestEnv::new("daemon-waiter");
    let _d = Daemon::start(&env);
    let holder = hold(&env, "x", "exclusive", "ready");
    let waiter = env.spawn("waiter", &[("name", &"x")]);
    await_file(&env.path("waiting"));
    env.wait_for("the waiter to queue", |t| t.stats().waiting == 1);
    env.kill(holder);
    let got = await_file(&env.path("got"));
    assert!(got.ends_with(" true"), "waiter got {got:?}");
    env.wait_success(waiter);
    env.assert_quiet();
}

#[test]
fn an_owner_whose_pid_was_recycled_is_reaped() {
    let env = TestEnv::new("pid-reuse");
    let holder = hold(&env, "x", "exclusive", "ready");
    let pid = env.pid(holder);
    // The holder still runs, but its record now describes another process with the same pid
    // (as if it had died and the pid been reused): the record's process is dead.
    let idx = (0..env.table.geometry().owners)
        .find(|&i| {
            env.table
                .owner_record(i)
                .is_some_and(|o| o.pid.load(std::sync::atomic::Ordering::Relaxed) == pid)
        })
        .expect("the holder's owner record");
    let rec = env.table.owner_record(idx).unwrap();
    rec.start_time.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let (_, died) = join_within("the waiter's grant", lock_in_background(&env, "x"));
    assert!(died);
    assert_eq!(env.table.stats().reaps, 1);
    env.kill(holder);
    env.assert_quiet();
}

#[test]
fn a_second_shmlockd_refuses_and_names_the_running_one() {
    let env = TestEnv::new("second-daemon");
    let d = Daemon::start(&env);
    let out = Command::new(env!("CARGO_BIN_EXE_shmlockd"))
        .args(["--segment", &env.segment, "--no-gateway"])
        .output()
        .expect("run shmlockd");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("pid {}", d.0.id())), "{err}");
}

#[test]
fn local_locking_survives_a_killed_shmlockd_and_a_new_one_reaps_what_died() {
    let env = TestEnv::new("daemon-restart");
    let mut d = Daemon::start(&env);
    let a = hold(&env, "a", "exclusive", "ready-a");
    let b = hold(&env, "b", "shared", "ready-b");
    let waiter = env.spawn("waiter", &[("name", &"a")]);
    await_file(&env.path("waiting"));
    env.wait_for("the waiter to queue", |t| t.stats().waiting == 1);
    d.kill();
    // No supervisor: local locking goes on, and a waiter still reaps its dead holder itself.
    let c = env.client("local");
    drop(c.lock("other").unwrap());
    env.kill(a);
    assert!(await_file(&env.path("got")).ends_with(" true"));
    env.wait_success(waiter);
    // b dies with nobody waiting: only a supervisor notices. A new one adopts and reaps it.
    env.kill(b);
    assert_eq!(env.table.stats().shared_holds, 1);
    let _d2 = Daemon::start(&env);
    env.wait_for("the new shmlockd to reap the dead reader", |t| {
        t.stats().shared_holds == 0
    });
    let g = c.try_lock("b").expect("free");
    assert!(g.owner_died());
    drop(g);
    drop(c);
    env.assert_quiet();
}

/// The chaos test: workers lock and unlock random names in both modes, with timeouts and
/// try-locks; the driver SIGKILLs random workers at random moments and starts new ones; some
/// workers kill themselves inside a critical section (the chaos hook), so every run leaves a
/// latch held by a dead process and a half-done update for a survivor to repair.
#[test]
fn chaos_never_breaks_exclusion_and_leaves_a_clean_table() {
    let secs: u64 = std::env::var("SHMLOCK_CHAOS_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    let env = TestEnv::new("chaos");
    Words::create(&env.path("witness"), NAMES + NAMES * SLOTS);
    std::fs::write(env.path("violations"), "").unwrap();
    let mut seed = u64::from(std::process::id()).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut rand = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let mut spawned = 0u64;
    let mut spawn = |env: &TestEnv, slot: usize, rand: &mut dyn FnMut() -> u64| {
        spawned += 1;
        // The first worker always dies inside a critical section early on; later ones often do.
        let chaos = match (spawned, rand() % 3) {
            (1, _) => 40,
            (_, 0) => 1 + rand() % 3000,
            _ => 0,
        };
        env.spawn("worker", &[("slot", &slot), ("seed", &rand()), ("chaos", &chaos)])
    };
    let mut workers: Vec<ChildId> = (0..SLOTS).map(|k| spawn(&env, k, &mut rand)).collect();
    let (mut killed, mut self_killed) = (0, 0);
    // First half without shmlockd (waiters reap, register reaps), then a shmlockd adopts the
    // segment mid-chaos and reaps from then on.
    let half = Instant::now() + Duration::from_secs(secs / 2);
    let end = Instant::now() + Duration::from_secs(secs);
    let mut daemon = None;
    while Instant::now() < end {
        if daemon.is_none() && Instant::now() >= half {
            daemon = Some(Daemon::start(&env));
        }
        std::thread::sleep(Duration::from_millis(20 + rand() % 200));
        let victim = (rand() % SLOTS as u64) as usize;
        for (k, w) in workers.iter_mut().enumerate() {
            let status = if k == victim {
                killed += 1;
                Some(env.kill(*w))
            } else {
                env.try_status(*w)
            };
            if let Some(s) = status {
                use std::os::unix::process::ExitStatusExt;
                assert_eq!(s.signal(), Some(9), "worker in slot {k} exited by itself: {s:?}");
                if k != victim {
                    self_killed += 1;
                }
                *w = spawn(&env, k, &mut rand);
            }
        }
    }
    std::fs::write(env.path("stop"), "").unwrap();
    for w in workers {
        use std::os::unix::process::ExitStatusExt;
        let s = env.wait(w);
        assert!(s.success() || s.signal() == Some(9), "worker: {s:?}");
    }
    let violations = read_lines(&env.path("violations"));
    assert!(
        violations.is_empty(),
        "{} violations:\n{}",
        violations.len(),
        violations.join("\n")
    );
    // Every worker has exited; shmlockd reaps those that were killed.
    let quiet = || {
        let st = env.table.stats();
        (st.owners, st.reaping, st.held, st.shared_holds, st.waiting) == (0, 0, 0, 0, 0)
    };
    let deadline = Instant::now() + CHILD_DEADLINE;
    while !quiet() {
        assert!(
            Instant::now() < deadline,
            "shmlockd did not reap every killed worker: {:?}\ncheck: {:?}",
            env.table.stats(),
            env.table.check()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    drop(daemon);
    let st = env.table.stats();
    eprintln!("chaos: {killed} killed by the driver, {self_killed} inside critical sections; {st:?}");
    assert!(self_killed >= 1 && st.repairs >= 1, "the repair path must run: {st:?}");
    assert_eq!((st.owners, st.reaping), (0, 0), "{st:?}");
    env.assert_quiet();
    // The table still works.
    let c = env.client("after");
    for n in 0..NAMES {
        drop(c.try_lock(format!("chaos-{n}")).expect("free after chaos"));
    }
    assert!(matches!(
        c.try_lock_shared("chaos-0").map(|g| g.mode()),
        Ok(Mode::Shared)
    ));
    let _ = LockTable::open(&env.segment).expect("reopen");
}

/// Without shmlockd, owners of dead processes stay registered until a registration finds the
/// owner pool full and reaps them. Processes starting together all find it full; while the first
/// reaps, the others must wait for it, not report a full pool.
#[test]
fn processes_registering_at_once_into_a_pool_of_dead_owners_all_get_in() {
    // Many shards make each reap take a while (it visits every shard), so the registrars meet
    // one in progress.
    let caps = shmlock::Capacities {
        max_owners: 8,
        max_locks: 65536,
        shards: 4096,
        ..common::small_caps()
    };
    let env = TestEnv::with_caps("register-race", &caps);
    let dead: Vec<ChildId> = (0..8)
        .map(|k| hold(&env, &format!("held-{k}"), "exclusive", &format!("ready-{k}")))
        .collect();
    for d in dead {
        env.kill(d);
    }
    let registrars: Vec<ChildId> = (0..6).map(|k| env.spawn("registrar", &[("k", &k)])).collect();
    signal(&env.path("go"), "");
    for k in 0..6 {
        await_file(&env.path(&format!("registered-{k}")));
    }
    signal(&env.path("done"), "");
    for r in registrars {
        env.wait_success(r);
    }
    assert_eq!(env.table.stats().held, 0, "the dead holders' locks were released");
    env.assert_quiet();
}

/// The owner-died notice survives a reaper killed at any point of the handoff it makes: H holds
/// `x` and is killed; W queues for `x` and is stopped (so it cannot reap H itself); R, armed to
/// kill itself at its N-th chaos point, finds H dead, reaps it and hands `x` to W. W, resumed,
/// must be told that its predecessor died, for every N, until N passes every chaos point R
/// reaches (then R lives).
/// H holds `x` exclusively and is killed; W (stopped, so it cannot reap H itself) waits for `x`
/// in `mode`; R reaps H and hands `x` to W, killed at its N-th chaos point, for every N until R
/// lives through them all; with `force`, `x` is then force-released before W runs (taking the
/// lock from whoever has it, W's grant not yet collected included). W must get its grant each
/// time (a forced release is no cancellation), be told that H died, with a token above H's.
fn walk_a_reaper_killed_in_its_handoff(mode: &str, force: bool) {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    use std::os::unix::process::ExitStatusExt;
    let mut killed = 0;
    for n in 1u32.. {
        assert!(n < 500, "the reaper never lived through its chaos points");
        let env = TestEnv::new("notice-chaos");
        let h = hold(&env, "x", "exclusive", "h-ready");
        let h_token: u64 = await_file(&env.path("h-ready")).parse().expect("H's token");
        let w = env.spawn("waiter", &[("name", &"x"), ("mode", &mode)]);
        env.wait_for("W to queue for x", |t| {
            t.lock_info(b"x").ok().flatten().is_some_and(|l| l.waiters.len() == 1)
        });
        let wpid = Pid::from_raw(env.pid(w) as i32);
        kill(wpid, Signal::SIGSTOP).expect("SIGSTOP");
        env.kill(h);
        let r = env.spawn("reaper", &[("name", &"x"), ("chaos", &n)]);
        let status = env.wait(r);
        if force {
            // NotHeld when nobody holds it at this point (R died before the handoff and W's
            // grant comes from the repair): nothing to force.
            let _ = env.table.force_release(b"x");
        }
        kill(wpid, Signal::SIGCONT).expect("SIGCONT");
        let got = await_file(&env.path("got"));
        assert_eq!(
            got.split(' ').nth(1),
            Some("true"),
            "N={n} (reaper {status:?}): W ({mode}) got {got:?}, not told that H died"
        );
        let w_token: u64 = got.split(' ').next().and_then(|t| t.parse().ok()).expect("W's token");
        assert!(
            w_token > h_token,
            "N={n} (reaper {status:?}): W ({mode}) got token {w_token}, not above H's {h_token}"
        );
        env.wait_success(w);
        assert!(env.table.check().is_empty(), "N={n}: {:?}", env.table.check());
        if status.signal() != Some(libc::SIGKILL) {
            assert!(status.success(), "N={n}: the reaper failed: {status:?}");
            break;
        }
        killed += 1;
    }
    eprintln!("the reaper was killed at each of its first {killed} chaos points");
    assert!(killed >= 5, "the walk reached only {killed} chaos points");
}

#[test]
fn the_owner_died_notice_survives_a_reaper_killed_at_every_chaos_point() {
    walk_a_reaper_killed_in_its_handoff("exclusive", false);
}

#[test]
fn a_shared_grant_is_whole_whichever_chaos_point_kills_its_granter() {
    walk_a_reaper_killed_in_its_handoff("shared", false);
}

#[test]
fn a_grant_forced_out_before_its_waiter_runs_is_returned_whichever_chaos_point_killed_its_granter() {
    walk_a_reaper_killed_in_its_handoff("exclusive", true);
    walk_a_reaper_killed_in_its_handoff("shared", true);
}

/// A process locking `x` shared and exclusively in turn is killed at its N-th chaos point, for
/// every N until it lives through them all; then this process locks `x` (after an inspection,
/// which repairs the shard and reopens the lock to the fast CAS) three times. Every token must be
/// above every token the dead process was granted: a kill between the steps of a lock-word
/// update must never make the next grant repeat a token.
#[test]
fn tokens_never_repeat_whichever_chaos_point_kills_a_process() {
    use std::os::unix::process::ExitStatusExt;
    let mut killed = 0;
    for n in 1u32.. {
        assert!(n < 1000, "the cycler never lived through its chaos points");
        let env = TestEnv::new("token-chaos");
        let c = env.spawn("cycler", &[("name", &"x"), ("chaos", &n)]);
        let status = env.wait(c);
        let logged: Vec<u64> = std::fs::read_to_string(env.path("tokens"))
            .unwrap_or_default()
            .lines()
            .map(|l| l.parse().expect("a token"))
            .collect();
        let mut last = logged.iter().copied().max().unwrap_or(0);
        let client = env.client("after");
        for k in 0..3 {
            // An inspection takes the latch (taking it over from the dead process and repairing
            // the shard) and reopens the word: the lock that follows is a fast grant.
            let _ = env.table.lock_info(b"x").expect("lock_info");
            let g = client
                .try_lock_for("x", Duration::from_secs(5))
                .unwrap_or_else(|e| panic!("N={n}: lock {k}: {e}"));
            assert!(
                g.token().0 > last,
                "N={n} (cycler {status:?}, logged {logged:?}): grant {k} got token {}, not above {last}",
                g.token()
            );
            last = g.token().0;
            g.unlock().expect("unlock");
        }
        assert!(env.table.check().is_empty(), "N={n}: {:?}", env.table.check());
        if status.signal() != Some(libc::SIGKILL) {
            assert!(status.success(), "N={n}: the cycler failed: {status:?}");
            break;
        }
        killed += 1;
    }
    eprintln!("the cycler was killed at each of its first {killed} chaos points");
    assert!(killed >= 10, "the walk reached only {killed} chaos points");
}
