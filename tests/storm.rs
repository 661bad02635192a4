//! The kill storm: worker processes lock a few hot names (exclusive and shared; `lock`,
//! `try_lock`, `try_lock_for` with 1-30 ms timeouts) while the driver SIGKILLs one every few
//! milliseconds, most of them inside their critical section, and starts another; some workers are
//! armed to kill themselves at a chaos point inside the library, some end their main thread and
//! work on in another (alive, although `/proc/PID/stat` shows their leader as a zombie). Four
//! phases, each on a segment of its own: (a) with `shmlockd`, (b) without, (c) without and with
//! `force_release` of the hot names in a loop, (d) without, and with only `try_lock` and
//! `try_lock_for` (1-30 ms): the callers that must reap a dead holder themselves, whatever
//! their timeout.
//!
//! # What is checked
//! - A witness outside the lock table (a segment of its own: per name the exclusive holder, the
//!   readers, their tokens, the largest exclusive token), checked on entry to and exit from every
//!   critical section: a grant that finds a live holder in a conflicting mode is a `VIOLATION`
//!   (`OVERLAP` in phase c, where forced-out holders are expected inside); an exclusive grant that
//!   finds a dead holder's mark must carry the owner-died notice (`MISSED_NOTICE`); a token not
//!   larger than every earlier holder's is a `TOKEN_ORDER`. Liveness is the witness's own: the
//!   driver marks a worker dead before it kills or reaps it, and a worker it has not reaped is
//!   alive while any of its threads is (`/proc/PID/task`), never the library's opinion.
//! - Every grant is logged (an `O_APPEND` line per grant, before the section, so it survives the
//!   SIGKILL) and analysed afterwards: no two grants of a name share a token; a grant that
//!   returned before another was asked for has the smaller token; every grant asked for after a
//!   forced release ended has a larger token than the forced-out holder's own; the token the
//!   forced release reported is the holder's.
//! - Errors: a live worker gets only `WouldBlock` and `TimedOut` (`Cancelled` or anything else is
//!   `UNEXPECTED_ERR`); its unlock succeeds (or says `NotHeld` in phase c). A worker that exits
//!   by itself other than by its chaos SIGKILL is a crash; one that does not stop at the end is a
//!   hang.
//! - A watcher thread scans the table for names held only by dead owners, and measures how long
//!   each such state lasts while a live worker asks for the name (the maximum is printed; only a
//!   hang bound of [`STUCK_HANG`] is asserted); it also runs the table's `check` now and then.
//! - At the end: the workers drain, `shmlockd` (phase a) reaps every killed owner, `check` is
//!   clean, every name can be locked again in both modes.
//!
//! Each phase runs [`DEFAULT_SECS`] (`SHMLOCK_STORM_SECS=N`: N seconds each) and prints a report.
//!
//! `harness = false`: some workers must end their main thread, and the test harness never runs a
//! test on it. The children are started by [`TestEnv::spawn`] as usual; `main` runs their role.
#![allow(unsafe_code)] // one raw syscall in a worker, to end only its main thread

mod common;

use std::collections::HashMap;
use std::fmt::Write as _;
use std::os::unix::process::ExitStatusExt;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::*};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use nix::sys::wait::{waitid, Id, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use shmlock::shm::{Region, RegionSpec, Segment, SegmentOwner, PARAMS};
use shmlock::{Capacities, Error, LockGuard, LockTable, Mode};

/// Worker processes (slots) per phase.
const WORKERS: usize = 8;
/// Hot names `storm-0` .. `storm-{NAMES-1}`.
const NAMES: usize = 4;
/// Seconds per phase unless [`SECS_VAR`] says otherwise.
const DEFAULT_SECS: u64 = 15;
const SECS_VAR: &str = "SHMLOCK_STORM_SECS";
/// A name held only by dead owners while a live worker asks for it longer than this is a hang.
const STUCK_HANG: Duration = Duration::from_secs(2);
/// The target (reported, not asserted: no timing asserts in tests).
const STUCK_TARGET: Duration = Duration::from_millis(100);
/// Percent of requests that are shared.
const SHARED_PCT: u64 = 30;
/// Percent of spawns armed to die at a chaos point, and the largest point number.
const CHAOS_PCT: u64 = 30;
const CHAOS_MAX: u64 = 300;
/// One spawn in this many ends its main thread and works on in another.
const LEADER_EXIT_EVERY: u64 = 6;
/// Percent of kills aimed at a worker inside its critical section (when one is).
const AIM_PCT: u64 = 70;

// ---- the witness -----------------------------------------------------------------------------
//
// A segment of its own (one region of u64 words), independent of the lock table:
//   STOP                       set by the driver at the end
//   ALIVE + slot               the ident of the slot's worker while the driver has not marked it
//                              dead (0 before it kills or reaps it)
//   STATE + slot               what the slot's worker does: kind << 32 | name (kind: IDLE, ASKING,
//                              EXCL, SHARED)
//   NAME + n * PER_NAME + ...  per name: EXCL (ident of the exclusive holder inside), EXCL_TOK
//                              (its token), MAX_TOK (largest exclusive token seen inside),
//                              READER + slot (ident while reading), READ_TOK + slot (its token)
// An ident is pid << 32 | spawn number << 8 | slot: never 0, unique per spawn.

const STOP: usize = 0;
const ALIVE: usize = 8;
const STATE: usize = ALIVE + WORKERS;
const NAME: usize = STATE + WORKERS;
const EXCL: usize = 0;
const EXCL_TOK: usize = 1;
const MAX_TOK: usize = 2;
const READER: usize = 3;
const READ_TOK: usize = READER + WORKERS;
const PER_NAME: usize = READ_TOK + WORKERS;
const WORDS: usize = NAME + NAMES * PER_NAME;

const IDLE: u64 = 0;
const ASKING: u64 = 1;
const IN_EXCL: u64 = 2;
const IN_SHARED: u64 = 3;

fn name_of(n: usize) -> String {
    format!("storm-{n}")
}

fn ident_pid(id: u64) -> u32 {
    (id >> 32) as u32
}

fn ident_slot(id: u64) -> usize {
    (id & 0xff) as usize
}

struct Witness {
    seg: Segment,
    words: Region<AtomicU64>,
}

impl Witness {
    fn segment_name(table_segment: &str) -> String {
        format!("{table_segment}-witness")
    }

    fn create(table_segment: &str) -> Witness {
        let name = Self::segment_name(table_segment);
        let _ = Segment::unlink(&name);
        let seg = Segment::create(
            &name,
            &[RegionSpec::of::<AtomicU64>(WORDS as u64)],
            &[0; PARAMS],
            0o600,
            SegmentOwner::default(),
            |_| Ok(()),
        )
        .unwrap_or_else(|e| panic!("create witness {name}: {e}"));
        Self::of(seg)
    }

    fn open(table_segment: &str) -> Witness {
        let name = Self::segment_name(table_segment);
        Self::of(Segment::open(&name).unwrap_or_else(|e| panic!("open witness {name}: {e}")))
    }

    fn of(seg: Segment) -> Witness {
        let words = seg.region::<AtomicU64>(0).expect("witness region");
        assert_eq!(words.len(), WORDS);
        Witness { seg, words }
    }

    fn w(&self, i: usize) -> &AtomicU64 {
        &self.seg.slice(self.words)[i]
    }

    fn name(&self, n: usize, field: usize) -> &AtomicU64 {
        self.w(NAME + n * PER_NAME + field)
    }

    fn stopped(&self) -> bool {
        self.w(STOP).load(Acquire) != 0
    }

    fn set_state(&self, slot: usize, kind: u64, n: usize) {
        self.w(STATE + slot).store(kind << 32 | n as u64, Release);
    }

    /// Is the worker `id` alive? The driver has not marked it dead, and one of its threads runs.
    /// Read again after `/proc`: the driver marks a worker dead before it reaps it, so a pid
    /// seen while the mark still stands after the look is the worker's own.
    fn alive(&self, id: u64) -> bool {
        let slot = ident_slot(id);
        let marked = |w: &Witness| slot < WORKERS && w.w(ALIVE + slot).load(Acquire) == id;
        id != 0 && marked(self) && process_alive(ident_pid(id)) && marked(self)
    }

    /// Is `pid` a live worker's?
    fn pid_alive(&self, pid: u32) -> bool {
        (0..WORKERS).any(|k| {
            let id = self.w(ALIVE + k).load(Acquire);
            id != 0 && ident_pid(id) == pid && self.alive(id)
        })
    }
}

/// Does any thread of process `pid` run (one that is neither a zombie nor dead)?
fn process_alive(pid: u32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    tasks.flatten().any(|t| {
        std::fs::read_to_string(t.path().join("stat"))
            .ok()
            .and_then(|s| Some(s[s.rfind(')')? + 1..].split_ascii_whitespace().next()?.to_string()))
            .is_some_and(|st| st != "Z" && st != "X")
    })
}

fn now_ns() -> u64 {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).expect("clock_gettime");
    t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

// ---- the worker ------------------------------------------------------------------------------

fn main() -> ExitCode {
    if let Some(ctx) = ChildCtx::from_env() {
        match ctx.role.as_str() {
            "worker" => role_worker(ctx),
            other => panic!("unknown role {other:?}"),
        }
        return ExitCode::SUCCESS;
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--list") {
        println!("kill_storm: test");
        return ExitCode::SUCCESS;
    }
    // A name filter (`cargo test NAME`) that does not match this test's name skips it.
    if args
        .iter()
        .any(|a| !a.starts_with('-') && !"kill_storm".contains(a.as_str()))
    {
        println!("kill_storm: filtered out");
        return ExitCode::SUCCESS;
    }
    kill_storm();
    println!("test kill_storm ... ok\n\ntest result: ok. 1 passed; 0 failed");
    ExitCode::SUCCESS
}

/// A worker: locks random hot names until the witness says stop, checking the witness around
/// every critical section and logging every grant and unlock. With `leader_exit`, the work runs
/// on a second thread and the main thread ends at once.
fn role_worker(ctx: ChildCtx) {
    if ctx.param::<u32>("leader_exit") == 0 {
        worker(&ctx);
        return;
    }
    std::thread::spawn(move || {
        worker(&ctx);
        std::process::exit(0);
    });
    #[allow(clippy::disallowed_methods)]
    // SAFETY: SYS_exit ends only the calling thread (exit_group would end the process), without
    // unwinding; this thread owns nothing the worker thread uses (it moved the context there),
    // and the process lives on in the worker thread, which ends it with exit(2).
    unsafe {
        libc::syscall(libc::SYS_exit, 0);
    }
    unreachable!("SYS_exit returned");
}

fn worker(ctx: &ChildCtx) {
    let pid = std::process::id();
    let me = u64::from(pid) << 32 | ctx.param::<u64>("ident_low");
    let slot = ident_slot(me);
    let force = ctx.param::<u32>("force") == 1;
    let short_only = ctx.param::<u32>("short_only") == 1;
    let chaos: u64 = ctx.param("chaos");
    let mut rng = Rng(ctx.param::<u64>("seed") | 1);
    let segment: String = ctx.param("segment");
    let w = Witness::open(&segment);
    wait_until("the driver to mark this worker alive", || {
        w.w(ALIVE + slot).load(Acquire) == me
    });
    let tokens = Log::open(&ctx.path(&format!("tokens-{slot}.log")));
    let problems = Log::open(&ctx.path("problems.log"));
    // Half of the armed workers count their chaos points from before they register.
    if chaos > 0 && chaos % 2 == 0 {
        shmlock::chaos::kill_after(chaos);
    }
    let client = ctx.client(&format!("storm-{slot}"));
    if chaos > 0 {
        shmlock::chaos::kill_after(chaos);
    }
    let tag = if force { "OVERLAP" } else { "VIOLATION" };
    let mut note = |what: String| problems.append(&format!("{what} (pid {pid}, slot {slot})"));
    while !w.stopped() {
        let n = rng.below(NAMES as u64) as usize;
        let name = name_of(n);
        let shared = rng.below(100) < SHARED_PCT;
        let timeout = Duration::from_millis(1 + rng.below(30));
        w.set_state(slot, ASKING, n);
        let t_call = now_ns();
        let how = if short_only { 1 + rng.below(2) } else { rng.below(3) };
        let r = match (shared, how) {
            (false, 0) => client.lock(&name),
            (false, 1) => client.try_lock(&name),
            (false, _) => client.try_lock_for(&name, timeout),
            (true, 0) => client.lock_shared(&name),
            (true, 1) => client.try_lock_shared(&name),
            (true, _) => client.try_lock_shared_for(&name, timeout),
        };
        let t_ret = now_ns();
        let g = match r {
            Ok(g) => g,
            Err(Error::WouldBlock | Error::TimedOut { .. }) => {
                w.set_state(slot, IDLE, 0);
                continue;
            }
            Err(e) => {
                note(format!("UNEXPECTED_ERR {name} shared={shared}: {e:?}"));
                w.set_state(slot, IDLE, 0);
                continue;
            }
        };
        let (token, died) = (g.token().0, g.owner_died());
        tokens.append(&format!(
            "G {n} {} {token} {} {t_call} {t_ret} {pid} {me}",
            if shared { 's' } else { 'x' },
            u8::from(died)
        ));
        w.set_state(slot, if shared { IN_SHARED } else { IN_EXCL }, n);
        section(&w, n, slot, me, &g, force, tag, &mut rng, &mut note);
        w.set_state(slot, IDLE, 0);
        let (how, r) = if rng.below(2) == 0 {
            ("unlock", g.unlock())
        } else {
            drop(g);
            ("drop", Ok(()))
        };
        let result = match r {
            Ok(()) => how.to_string(),
            Err(Error::NotHeld) if force => "notheld".to_string(),
            Err(e) => {
                note(format!("UNLOCK_ERR {name} token {token}: {e:?}"));
                "error".to_string()
            }
        };
        tokens.append(&format!("U {n} {token} {} {result}", now_ns()));
    }
    drop(client);
}

/// One critical section on name `n`, checking the witness on entry and exit.
#[allow(clippy::too_many_arguments)]
fn section(
    w: &Witness,
    n: usize,
    slot: usize,
    me: u64,
    g: &LockGuard<'_>,
    force: bool,
    tag: &str,
    rng: &mut Rng,
    note: &mut dyn FnMut(String),
) {
    let name = name_of(n);
    let (token, died) = (g.token().0, g.owner_died());
    let ex = w.name(n, EXCL).load(Acquire);
    let other = ex != 0 && ex != me;
    let ex_alive = other && w.alive(ex);
    if g.mode() == Mode::Exclusive {
        if ex_alive {
            note(format!(
                "{tag} {name} granted exclusively (token {token}) while live pid {} holds it (token {})",
                ident_pid(ex),
                w.name(n, EXCL_TOK).load(Acquire)
            ));
        } else if other && !died && !force {
            note(format!(
                "MISSED_NOTICE {name} token {token}: dead pid {} left its mark, owner_died false",
                ident_pid(ex)
            ));
        }
        let mut before = w.name(n, MAX_TOK).load(Acquire);
        for k in 0..WORKERS {
            let r = w.name(n, READER + k).load(Acquire);
            if r != 0 && r != me && w.alive(r) {
                note(format!(
                    "{tag} {name} granted exclusively (token {token}) while live pid {} reads",
                    ident_pid(r)
                ));
            }
            before = before.max(w.name(n, READ_TOK + k).load(Acquire));
        }
        if token <= before && !force {
            note(format!(
                "TOKEN_ORDER {name}: exclusive token {token} after token {before} was seen inside"
            ));
        }
        w.name(n, EXCL_TOK).store(token, Release);
        w.name(n, EXCL).store(me, Release);
        w.name(n, MAX_TOK).fetch_max(token, AcqRel);
    } else {
        if ex_alive {
            note(format!(
                "{tag} {name} granted shared (token {token}) while live pid {} holds it exclusively",
                ident_pid(ex)
            ));
        } else if other && died {
            // The notice is ours: the dead writer's mark is acknowledged.
            let _ = w.name(n, EXCL).compare_exchange(ex, 0, AcqRel, Relaxed);
        }
        let before = w.name(n, MAX_TOK).load(Acquire);
        if token <= before && !force {
            note(format!(
                "TOKEN_ORDER {name}: shared token {token} after exclusive token {before} was seen inside"
            ));
        }
        w.name(n, READ_TOK + slot).store(token, Release);
        w.name(n, READER + slot).store(me, Release);
    }
    // The section: a short spin, often a sleep (so that kills land inside), sometimes a yield.
    for _ in 0..rng.below(2000) {
        std::hint::spin_loop();
    }
    if rng.below(100) < 30 {
        std::thread::sleep(Duration::from_micros(rng.below(2000)));
    } else if rng.below(4) == 0 {
        std::thread::yield_now();
    }
    let ex = w.name(n, EXCL).load(Acquire);
    if g.mode() == Mode::Exclusive {
        if ex != me {
            note(format!(
                "{tag} {name}: pid {} (alive {}) entered while we held it (token {token})",
                ident_pid(ex),
                w.alive(ex)
            ));
        }
        let _ = w.name(n, EXCL).compare_exchange(me, 0, AcqRel, Relaxed);
    } else {
        if ex != 0 && ex != me && w.alive(ex) {
            note(format!(
                "{tag} {name}: live writer pid {} entered while we read (token {token})",
                ident_pid(ex)
            ));
        }
        w.name(n, READER + slot).store(0, Release);
    }
}

// ---- the driver ------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy)]
struct Phase {
    name: &'static str,
    daemon: bool,
    force: bool,
    /// Only `try_lock` and `try_lock_for` with short timeouts (no caller that waits long).
    short_only: bool,
    max_owners: u32,
}

const PHASES: [Phase; 4] = [
    Phase {
        name: "a: with shmlockd",
        daemon: true,
        force: false,
        short_only: false,
        max_owners: 64,
    },
    Phase {
        name: "b: without shmlockd",
        daemon: false,
        force: false,
        short_only: false,
        max_owners: 64,
    },
    Phase {
        name: "c: without shmlockd, forced releases",
        daemon: false,
        force: true,
        short_only: false,
        max_owners: 64,
    },
    // Nobody waits long enough for a poll period, and for many seconds no registration finds the
    // owner pool full (and reaps the dead): only the short-timeout callers themselves can free a
    // name that a dead owner holds.
    Phase {
        name: "d: without shmlockd, short timeouts only",
        daemon: false,
        force: false,
        short_only: true,
        max_owners: 4096,
    },
];

/// Removes the witness segment.
struct WitnessGuard(String);

impl Drop for WitnessGuard {
    fn drop(&mut self) {
        let _ = Segment::unlink(&Witness::segment_name(&self.0));
    }
}

/// One forced release: when it ran, and one holder it forced out.
#[derive(Debug, Clone, Copy)]
struct Forced {
    name: usize,
    t0: u64,
    t1: u64,
    pid: u32,
    token: u64,
}

/// What the watcher saw.
#[derive(Debug, Default)]
struct Watch {
    /// Episodes of a name held only by dead owners (any asker or none), their total and longest.
    dead_episodes: u64,
    dead_total_ns: u64,
    dead_max_ns: u64,
    /// The longest a name stayed held only by dead owners after a live worker asked for it.
    asked_max_ns: u64,
    /// Episodes with a live asker longer than [`STUCK_TARGET`] and [`STUCK_HANG`].
    over_target: u64,
    hangs: Vec<String>,
    checks: u64,
    check_problems: Vec<String>,
}

#[derive(Debug)]
struct Episode {
    holders: Vec<u32>,
    since: u64,
    last: u64,
    asked: Option<u64>,
    over_target: bool,
    hang: bool,
}

/// Scans the table every few ms until `stop`: names held only by dead owners, and `check`.
fn watch(table: &LockTable, w: &Witness, stop: &AtomicBool) -> Watch {
    let mut out = Watch::default();
    let mut open: HashMap<Vec<u8>, Episode> = HashMap::new();
    let mut last_check = Instant::now();
    let close = |e: Episode, out: &mut Watch| {
        out.dead_episodes += 1;
        out.dead_total_ns += e.last - e.since;
        out.dead_max_ns = out.dead_max_ns.max(e.last - e.since);
    };
    while !stop.load(Relaxed) {
        std::thread::sleep(Duration::from_millis(3));
        let locks = table.locks();
        let now = now_ns();
        let mut seen = Vec::new();
        for l in &locks {
            if l.holders.is_empty() || l.holders.iter().any(|p| w.pid_alive(p.pid)) {
                continue;
            }
            let n = (0..NAMES).find(|&n| name_of(n).as_bytes() == l.name.as_slice());
            let asker = l.waiters.iter().any(|p| w.pid_alive(p.pid))
                || n.is_some_and(|n| {
                    (0..WORKERS).any(|k| {
                        let st = w.w(STATE + k).load(Acquire);
                        st >> 32 == ASKING && (st & 0xffff_ffff) as usize == n && w.w(ALIVE + k).load(Acquire) != 0
                    })
                });
            let mut holders: Vec<u32> = l.holders.iter().map(|p| p.pid).collect();
            holders.sort_unstable();
            let e = match open.remove(&l.name) {
                Some(e) if e.holders == holders => e,
                other => {
                    if let Some(e) = other {
                        close(e, &mut out);
                    }
                    Episode {
                        holders,
                        since: now,
                        last: now,
                        asked: None,
                        over_target: false,
                        hang: false,
                    }
                }
            };
            let mut e = Episode { last: now, ..e };
            if asker && e.asked.is_none() {
                e.asked = Some(now);
            }
            if let Some(a) = e.asked {
                let d = now - a;
                out.asked_max_ns = out.asked_max_ns.max(d);
                if d > STUCK_TARGET.as_nanos() as u64 && !e.over_target {
                    e.over_target = true;
                    out.over_target += 1;
                }
                if d > STUCK_HANG.as_nanos() as u64 && !e.hang {
                    e.hang = true;
                    out.hangs.push(format!(
                        "{} held by dead {:?} for {} ms while a live worker asks: {l:?}",
                        String::from_utf8_lossy(&l.name),
                        e.holders,
                        d / 1_000_000
                    ));
                }
            }
            seen.push(l.name.clone());
            open.insert(l.name.clone(), e);
        }
        let gone: Vec<Vec<u8>> = open.keys().filter(|k| !seen.contains(k)).cloned().collect();
        for k in gone {
            if let Some(e) = open.remove(&k) {
                close(e, &mut out);
            }
        }
        if last_check.elapsed() >= Duration::from_millis(500) {
            last_check = Instant::now();
            out.checks += 1;
            out.check_problems.extend(table.check());
        }
    }
    for (_, e) in open.drain() {
        close(e, &mut out);
    }
    out
}

/// Forces the hot names out of their holders' hands in a loop until `stop`.
fn force_loop(table: &LockTable, stop: &AtomicBool, seed: u64) -> (u64, Vec<Forced>) {
    let mut rng = Rng(seed | 1);
    let (mut calls, mut out) = (0, Vec::new());
    while !stop.load(Relaxed) {
        let n = rng.below(NAMES as u64) as usize;
        let t0 = now_ns();
        if let Ok(f) = table.force_release(name_of(n).as_bytes()) {
            let t1 = now_ns();
            calls += 1;
            out.extend(f.holders.iter().map(|p| Forced {
                name: n,
                t0,
                t1,
                pid: p.pid,
                token: p.token,
            }));
        }
        std::thread::sleep(Duration::from_micros(rng.below(1500)));
    }
    (calls, out)
}

/// A phase's figures; `failures` lists what must not happen.
#[derive(Debug, Default)]
struct Report {
    secs: f64,
    spawns: u64,
    chaos_spawns: u64,
    leader_exit_spawns: u64,
    kills: u64,
    kills_inside: u64,
    chaos_deaths: u64,
    crashes: Vec<String>,
    hangs: Vec<String>,
    grants: u64,
    shared_grants: u64,
    died_notices: u64,
    forced_calls: u64,
    forced_holders: u64,
    tags: HashMap<&'static str, u64>,
    samples: Vec<String>,
    tok: Tokens,
    /// Log lines torn by a worker killed inside its write (see [`untorn`]): not failures.
    tok_torn: u64,
    watch: Watch,
    end_problems: Vec<String>,
    stats: String,
}

const TAGS: [&str; 6] = [
    "VIOLATION",
    "MISSED_NOTICE",
    "TOKEN_ORDER",
    "UNEXPECTED_ERR",
    "UNLOCK_ERR",
    "OVERLAP",
];

impl Report {
    fn failures(&self, phase: &Phase) -> Vec<String> {
        let mut f = Vec::new();
        for t in TAGS {
            let c = self.tags.get(t).copied().unwrap_or(0);
            if c > 0 && t != "OVERLAP" {
                f.push(format!("{c} {t}"));
            }
        }
        let t = &self.tok;
        for (c, what) in [
            (t.duplicates, "duplicate tokens"),
            (t.order, "token order violations"),
            (
                t.fence,
                "grants after a forced release with a token not above the forced-out holder's",
            ),
            (
                t.sure_mismatches,
                "forced releases that reported another token than the holder's",
            ),
            (t.zero, "zero tokens"),
            (t.malformed, "malformed log lines"),
        ] {
            if c > 0 {
                f.push(format!("{c} {what}"));
            }
        }
        f.extend(self.crashes.iter().cloned());
        f.extend(self.hangs.iter().cloned());
        f.extend(self.watch.hangs.iter().cloned());
        f.extend(
            self.watch
                .check_problems
                .iter()
                .map(|p| format!("check during the storm: {p}")),
        );
        f.extend(self.end_problems.iter().cloned());
        if self.kills == 0 || self.grants == 0 {
            f.push(format!(
                "a storm without kills or grants: {} kills, {} grants",
                self.kills, self.grants
            ));
        }
        if phase.force && self.forced_holders == 0 {
            f.push("no holder was forced out".into());
        }
        f
    }

    fn print(&self, phase: &Phase) -> String {
        let ms = |ns: u64| ns as f64 / 1e6;
        let tag = |t: &str| self.tags.get(t).copied().unwrap_or(0);
        let t = &self.tok;
        let wt = &self.watch;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "== storm phase {} ({:.1} s, {WORKERS} workers, {NAMES} names)",
            phase.name, self.secs
        );
        let _ = writeln!(
            s,
            "   kills {} (inside a critical section {}), chaos self-kills {} (armed spawns {}), leader-exited spawns {}, spawns {}",
            self.kills, self.kills_inside, self.chaos_deaths, self.chaos_spawns, self.leader_exit_spawns, self.spawns
        );
        let _ = writeln!(
            s,
            "   grants {} ({:.0}/s; shared {}), owner-died notices {}, forced releases {} (holders forced out {})",
            self.grants,
            self.grants as f64 / self.secs.max(0.001),
            self.shared_grants,
            self.died_notices,
            self.forced_calls,
            self.forced_holders
        );
        let _ = writeln!(
            s,
            "   VIOLATION {} | MISSED_NOTICE {} | TOKEN_ORDER {} | UNEXPECTED_ERR {} | UNLOCK_ERR {} | OVERLAP(forced, expected) {}",
            tag("VIOLATION"),
            tag("MISSED_NOTICE"),
            tag("TOKEN_ORDER"),
            tag("UNEXPECTED_ERR"),
            tag("UNLOCK_ERR"),
            tag("OVERLAP")
        );
        let _ = writeln!(
            s,
            "   tokens: duplicates {}, order {}, fence after force {}, forced-holder token mismatches {} (certain {}), forced holders not logged {}, zero {}, malformed lines {}, writes torn by a kill {}",
            t.duplicates, t.order, t.fence, t.mismatches, t.sure_mismatches, t.unlogged, t.zero, t.malformed, self.tok_torn
        );
        let _ = writeln!(
            s,
            "   held only by dead owners: {} episodes, {:.0} ms in all, longest {:.1} ms; while a live worker asked: longest {:.1} ms, {} over {} ms, {} over {} s",
            wt.dead_episodes,
            ms(wt.dead_total_ns),
            ms(wt.dead_max_ns),
            ms(wt.asked_max_ns),
            wt.over_target,
            STUCK_TARGET.as_millis(),
            wt.hangs.len(),
            STUCK_HANG.as_secs()
        );
        let _ = writeln!(
            s,
            "   crashes {}, hangs {}, checks during the storm {} (problems {}), end problems {}",
            self.crashes.len(),
            self.hangs.len(),
            wt.checks,
            wt.check_problems.len(),
            self.end_problems.len()
        );
        let _ = writeln!(s, "   table at the end: {}", self.stats);
        for l in self.samples.iter().take(10) {
            let _ = writeln!(s, "   | {l}");
        }
        s
    }
}

fn secs_per_phase() -> u64 {
    std::env::var(SECS_VAR)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(DEFAULT_SECS)
}

fn kill_storm() {
    let secs = secs_per_phase();
    let mut all = String::new();
    let mut failures = Vec::new();
    for (k, phase) in PHASES.iter().enumerate() {
        let r = run_phase(phase, k, Duration::from_secs(secs));
        let text = r.print(phase);
        eprint!("{text}");
        all.push_str(&text);
        failures.extend(
            r.failures(phase)
                .into_iter()
                .map(|f| format!("phase {}: {f}", phase.name)),
        );
    }
    eprintln!("== kill storm: {} failures", failures.len());
    assert!(
        failures.is_empty(),
        "the kill storm failed:\n{}\n\n{all}",
        failures.iter().take(40).cloned().collect::<Vec<_>>().join("\n")
    );
}

fn run_phase(phase: &Phase, k: usize, secs: Duration) -> Report {
    let caps = Capacities {
        max_locks: 1024,
        max_holds: 1024,
        max_owners: phase.max_owners,
        ..Default::default()
    };
    let env = TestEnv::with_caps(&format!("storm{k}"), &caps);
    let w = Arc::new(Witness::create(&env.segment));
    let _wg = WitnessGuard(env.segment.clone());
    let daemon = phase.daemon.then(|| Daemon::start(&env));
    let mut rep = Report::default();
    let mut rng = Rng(u64::from(std::process::id()).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ now_ns() | 1);
    let seed = rng.next();
    eprintln!(
        "storm phase {}: seed {seed:#x}, {} s, in {}",
        phase.name,
        secs.as_secs(),
        env.dir.display()
    );
    let mut rng = Rng(seed);

    let stop = Arc::new(AtomicBool::new(false));
    let watcher = {
        let (t, w, stop) = (Arc::clone(&env.table), Arc::clone(&w), Arc::clone(&stop));
        std::thread::spawn(move || watch(&t, &w, &stop))
    };
    let stop_force = Arc::new(AtomicBool::new(false));
    let forcer = phase.force.then(|| {
        let (t, stop, s) = (Arc::clone(&env.table), Arc::clone(&stop_force), rng.next());
        std::thread::spawn(move || force_loop(&t, &stop, s))
    });

    let mut spawn_no = 0usize;
    let mut spawn = |slot: usize, rng: &mut Rng, rep: &mut Report| -> Slot {
        spawn_no += 1;
        // The first spawn always dies at a chaos point early on; then a share of them.
        let chaos = if spawn_no == 1 {
            20
        } else if rng.below(100) < CHAOS_PCT {
            1 + rng.below(CHAOS_MAX)
        } else {
            0
        };
        let leader_exit = u32::from(spawn_no as u64 % LEADER_EXIT_EVERY == 3);
        rep.spawns += 1;
        rep.chaos_spawns += u64::from(chaos > 0);
        rep.leader_exit_spawns += u64::from(leader_exit);
        // The ident's pid half is the child's own; it waits until the driver has marked it
        // alive under that ident before it locks anything.
        let low = (spawn_no as u64 & 0xff_ffff) << 8 | slot as u64;
        let id = env.spawn(
            "worker",
            &[
                ("ident_low", &low),
                ("segment", &env.segment),
                ("seed", &rng.next()),
                ("chaos", &chaos),
                ("force", &u32::from(phase.force)),
                ("short_only", &u32::from(phase.short_only)),
                ("leader_exit", &leader_exit),
            ],
        );
        let ident = u64::from(env.pid(id)) << 32 | low;
        w.w(ALIVE + slot).store(ident, Release);
        Slot {
            id,
            chaos,
            log: env.path(&format!("child-{}-worker.log", spawn_no - 1)),
        }
    };
    // A worker that ended by itself: a chaos death, or a crash.
    let ended = |s: usize, slot: &Slot, rep: &mut Report, stopping: bool| {
        w.w(ALIVE + s).store(0, Release);
        let st = env.try_status(slot.id).expect("an exited worker has a status");
        if st.signal() == Some(libc::SIGKILL) && slot.chaos > 0 {
            rep.chaos_deaths += 1;
        } else if !(stopping && st.success()) {
            let log = std::fs::read_to_string(&slot.log).unwrap_or_default();
            let tail: String = log
                .chars()
                .rev()
                .take(3000)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect();
            rep.crashes.push(format!(
                "worker slot {s} pid {} exited by itself with {st:?} (chaos {}); its output ends:\n{tail}",
                env.pid(slot.id),
                slot.chaos
            ));
        }
    };

    let mut slots: Vec<Slot> = (0..WORKERS).map(|s| spawn(s, &mut rng, &mut rep)).collect();
    let t_start = Instant::now();
    while t_start.elapsed() < secs {
        std::thread::sleep(Duration::from_micros(1000 + rng.below(11_000)));
        for (s, slot) in slots.iter_mut().enumerate() {
            if exited(&env, slot.id) {
                ended(s, slot, &mut rep, false);
                *slot = spawn(s, &mut rng, &mut rep);
            }
        }
        let inside: Vec<usize> = (0..WORKERS)
            .filter(|&s| matches!(w.w(STATE + s).load(Acquire) >> 32, IN_EXCL | IN_SHARED))
            .collect();
        let victim = if !inside.is_empty() && rng.below(100) < AIM_PCT {
            inside[rng.below(inside.len() as u64) as usize]
        } else {
            rng.below(WORKERS as u64) as usize
        };
        let slot = &mut slots[victim];
        if exited(&env, slot.id) {
            continue; // seen on the next round
        }
        // Marked dead before it dies: nobody may take it for alive once its pid is free.
        w.w(ALIVE + victim).store(0, Release);
        let st = env.kill(slot.id);
        if st.signal() == Some(libc::SIGKILL) {
            rep.kills += 1;
            rep.kills_inside += u64::from(inside.contains(&victim));
        } else {
            rep.crashes.push(format!(
                "worker slot {victim} had exited by itself with {st:?} before the kill"
            ));
        }
        *slot = spawn(victim, &mut rng, &mut rep);
    }
    rep.secs = t_start.elapsed().as_secs_f64();

    // ---- drain ----
    stop_force.store(true, Relaxed);
    let (calls, forced) = forcer.map(|f| f.join().expect("the force thread")).unwrap_or_default();
    rep.forced_calls = calls;
    rep.forced_holders = forced.len() as u64;
    w.w(STOP).store(1, Release);
    let deadline = Instant::now() + DEADLINE;
    let mut left: Vec<usize> = (0..WORKERS).collect();
    while !left.is_empty() && Instant::now() < deadline {
        left.retain(|&s| {
            let done = exited(&env, slots[s].id);
            if done {
                ended(s, &slots[s], &mut rep, true);
            }
            !done
        });
        std::thread::sleep(Duration::from_millis(5));
    }
    for s in left {
        let st = w.w(STATE + s).load(Acquire);
        let info = env
            .table
            .lock_info(name_of((st & 0xff) as usize).as_bytes())
            .ok()
            .flatten();
        rep.hangs.push(format!(
            "worker slot {s} pid {} did not stop within {DEADLINE:?} (state {st:#x}): {info:?}",
            env.pid(slots[s].id)
        ));
        w.w(ALIVE + s).store(0, Release);
        env.kill(slots[s].id);
    }
    stop.store(true, Relaxed);
    rep.watch = watcher.join().expect("the watcher thread");

    // ---- the table afterwards ----
    if daemon.is_some() {
        let quiet = || {
            let st = env.table.stats();
            (st.owners, st.reaping, st.held, st.shared_holds, st.waiting) == (0, 0, 0, 0, 0)
        };
        let t0 = Instant::now();
        while !quiet() && t0.elapsed() < DEADLINE {
            std::thread::sleep(Duration::from_millis(5));
        }
        if !quiet() {
            rep.end_problems.push(format!(
                "shmlockd did not reap every killed worker within {DEADLINE:?}: {:?}",
                env.table.stats()
            ));
        }
    }
    let check = |when: &str, rep: &mut Report| {
        let p = env.table.check();
        rep.end_problems
            .extend(p.into_iter().map(|p| format!("check {when}: {p}")));
    };
    check("after the drain", &mut rep);
    {
        let c = env.client("storm-end");
        for n in 0..NAMES {
            let name = name_of(n);
            let x = c.try_lock_for(&name, CHILD_DEADLINE).map(drop);
            let s = c.try_lock_shared_for(&name, CHILD_DEADLINE).map(drop);
            for (mode, r) in [("exclusively", x), ("shared", s)] {
                if let Err(e) = r {
                    rep.end_problems
                        .push(format!("{name} could not be locked {mode} after the storm: {e}"));
                }
            }
        }
        let st = env.table.stats();
        if st.reaping != 0 {
            rep.end_problems.push(format!("owner records left in REAPING: {st:?}"));
        }
    }
    check("after relocking every name", &mut rep);
    rep.stats = format!("{:?}", env.table.stats());
    drop(daemon);

    // ---- the logs ----
    for l in read_lines(&env.path("problems.log")) {
        let t = TAGS
            .iter()
            .find(|t| l.starts_with(*t))
            .copied()
            .unwrap_or("UNEXPECTED_ERR");
        *rep.tags.entry(t).or_default() += 1;
        if t != "OVERLAP" || rep.samples.len() < 3 {
            rep.samples.push(l);
        }
    }
    let (grants, torn) = read_grants(&env);
    rep.tok_torn = torn;
    rep.grants = grants.iter().filter(|g| !g.malformed).count() as u64;
    rep.shared_grants = grants.iter().filter(|g| g.shared).count() as u64;
    rep.died_notices = grants.iter().filter(|g| g.died).count() as u64;
    rep.tok = analyse(&grants, &forced);
    rep.samples.extend(rep.tok.samples.iter().cloned());
    rep.samples.sort_by_key(|l| l.starts_with("OVERLAP"));
    if !rep.failures(phase).is_empty() {
        // Keep the directory for inspection: TestEnv keeps it only while panicking.
        let keep = env.dir.with_extension("failed");
        let _ = std::fs::remove_dir_all(&keep);
        let _ = std::fs::rename(&env.dir, &keep);
        let _ = std::fs::create_dir_all(&env.dir);
        rep.samples.push(format!("files kept in {}", keep.display()));
    }
    rep
}

struct Slot {
    id: ChildId,
    chaos: u64,
    log: std::path::PathBuf,
}

/// Has the child exited? Looks without reaping it (so its pid stays its own).
fn exited(env: &TestEnv, id: ChildId) -> bool {
    let pid = Pid::from_raw(env.pid(id) as i32);
    !matches!(
        waitid(
            Id::Pid(pid),
            WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT
        ),
        Ok(WaitStatus::StillAlive)
    )
}

// ---- the token analysis ----------------------------------------------------------------------

#[derive(Debug, Clone, Copy, Default)]
struct Grant {
    name: usize,
    shared: bool,
    token: u64,
    died: bool,
    t_call: u64,
    t_ret: u64,
    pid: u32,
    t_unlock: Option<u64>,
    malformed: bool,
}

/// Whether `l` has the shape of a grant (`G`, 9 fields) or unlock (`U`, 5 fields) record.
fn record_shaped(l: &str) -> bool {
    let f: Vec<&str> = l.split(' ').collect();
    matches!((f.first().copied(), f.len()), (Some("G"), 9) | (Some("U"), 5)) && f[1..].iter().all(|w| !w.is_empty())
}

/// The record in log line `l`, and whether a torn write preceded it. A worker SIGKILLed inside
/// its `write` can leave part of its line: the kernel stops a write to a file between pages
/// once a fatal signal is pending, so a line that crosses a page boundary is cut there, and the
/// next process's line is glued to its remains (seen: `U 2 102185 4685392034662 droG 2 x ...`).
fn untorn(l: &str) -> (&str, bool) {
    if record_shaped(l) {
        return (l, false);
    }
    let glued = (1..l.len()).find(|&i| {
        l.is_char_boundary(i) && (l[i..].starts_with("G ") || l[i..].starts_with("U ")) && record_shaped(&l[i..])
    });
    match glued {
        Some(i) => (&l[i..], true),
        None => (l, false),
    }
}

/// Every grant in the workers' logs, with its unlock time where the log has one, and how many
/// torn writes of killed workers the logs hold (those records are lost, as if the worker had
/// been killed before it wrote them).
fn read_grants(env: &TestEnv) -> (Vec<Grant>, u64) {
    let mut out: Vec<Grant> = Vec::new();
    let mut torn = 0;
    for s in 0..WORKERS {
        let mut last: Option<usize> = None;
        for line in read_lines(&env.path(&format!("tokens-{s}.log"))) {
            let (l, cut) = untorn(&line);
            if cut {
                torn += 1;
                // The torn record may have been this grant's unlock: its time is unknown.
                last = None;
            }
            let f: Vec<&str> = l.split(' ').collect();
            let num = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok());
            match (f.first().copied(), f.len()) {
                (Some("G"), 9) => {
                    let g = (|| {
                        Some(Grant {
                            name: usize::try_from(num(1)?).ok().filter(|&n| n < NAMES)?,
                            shared: f[2] == "s",
                            token: num(3)?,
                            died: num(4)? == 1,
                            t_call: num(5)?,
                            t_ret: num(6)?,
                            pid: u32::try_from(num(7)?).ok()?,
                            t_unlock: None,
                            malformed: false,
                        })
                    })();
                    out.push(g.unwrap_or(Grant {
                        malformed: true,
                        ..Default::default()
                    }));
                    last = Some(out.len() - 1);
                }
                (Some("U"), 5) => {
                    let g = last.and_then(|i| out.get_mut(i));
                    match (g, num(1), num(2), num(3)) {
                        (Some(g), Some(n), Some(t), Some(u)) if g.name as u64 == n && g.token == t => {
                            g.t_unlock = Some(u)
                        }
                        _ => out.push(Grant {
                            malformed: true,
                            ..Default::default()
                        }),
                    }
                }
                _ => out.push(Grant {
                    malformed: true,
                    ..Default::default()
                }),
            }
        }
    }
    (out, torn)
}

#[derive(Debug, Default)]
struct Tokens {
    duplicates: u64,
    order: u64,
    fence: u64,
    mismatches: u64,
    sure_mismatches: u64,
    unlogged: u64,
    zero: u64,
    malformed: u64,
    samples: Vec<String>,
}

/// Per name: no duplicate tokens; a grant that returned before another was asked for has the
/// smaller token; a grant asked for after a forced release ended has a larger token than the
/// forced-out holder's own grant (the holder's latest grant asked for before the force began);
/// the token the force reported is that grant's.
fn analyse(grants: &[Grant], forced: &[Forced]) -> Tokens {
    let mut t = Tokens {
        malformed: grants.iter().filter(|g| g.malformed).count() as u64,
        ..Default::default()
    };
    let sample = |t: &mut Tokens, s: String| {
        if t.samples.len() < 10 {
            t.samples.push(s);
        }
    };
    for n in 0..NAMES {
        let mut v: Vec<Grant> = grants.iter().filter(|g| !g.malformed && g.name == n).copied().collect();
        t.zero += v.iter().filter(|g| g.token == 0).count() as u64;
        let mut by_token = v.clone();
        by_token.sort_by_key(|g| g.token);
        for p in by_token.windows(2) {
            if p[0].token == p[1].token {
                t.duplicates += 1;
                sample(
                    &mut t,
                    format!(
                        "DUPLICATE {}: token {} granted to {:?} and {:?}",
                        name_of(n),
                        p[0].token,
                        p[0],
                        p[1]
                    ),
                );
            }
        }
        // Order: sweep the grants by request time, with the largest token of those that had
        // returned before.
        let mut by_ret = v.clone();
        by_ret.sort_by_key(|g| g.t_ret);
        v.sort_by_key(|g| g.t_call);
        let (mut j, mut best): (usize, Option<Grant>) = (0, None);
        for b in &v {
            while j < by_ret.len() && by_ret[j].t_ret < b.t_call {
                if best.is_none_or(|x| by_ret[j].token > x.token) {
                    best = Some(by_ret[j]);
                }
                j += 1;
            }
            if let Some(a) = best.filter(|a| a.token >= b.token) {
                t.order += 1;
                sample(
                    &mut t,
                    format!("ORDER {}: {a:?} returned before {b:?} was asked for", name_of(n)),
                );
            }
        }
        // Forced releases: find each forced-out holder's own grant.
        let mut by_pid: HashMap<u32, Vec<Grant>> = HashMap::new();
        for g in &v {
            by_pid.entry(g.pid).or_default().push(*g);
        }
        let mut victims: Vec<(u64, Grant, Forced)> = Vec::new();
        for f in forced.iter().filter(|f| f.name == n) {
            let Some(c) = by_pid
                .get(&f.pid)
                .and_then(|l| l[..l.partition_point(|g| g.t_call < f.t0)].last())
                .filter(|c| c.t_unlock.is_none_or(|u| u >= f.t0))
            else {
                // Killed after its grant, before it logged it.
                t.unlogged += 1;
                continue;
            };
            if c.token != f.token {
                t.mismatches += 1;
                // Returned before the force began, unlocked after it ended: surely the holder.
                if c.t_ret < f.t0 && c.t_unlock.is_some_and(|u| u > f.t1) {
                    t.sure_mismatches += 1;
                    sample(
                        &mut t,
                        format!(
                            "FORCE_MISMATCH {}: {f:?} reported token {}, the holder's grant {c:?}",
                            name_of(n),
                            f.token
                        ),
                    );
                }
            }
            victims.push((f.t1, *c, *f));
        }
        victims.sort_by_key(|x| x.0);
        let (mut j, mut best): (usize, Option<(Grant, Forced)>) = (0, None);
        for b in &v {
            while j < victims.len() && victims[j].0 < b.t_call {
                if best.is_none_or(|(x, _)| victims[j].1.token > x.token) {
                    best = Some((victims[j].1, victims[j].2));
                }
                j += 1;
            }
            if let Some((a, f)) = best.filter(|(a, _)| a.token >= b.token) {
                t.fence += 1;
                sample(
                    &mut t,
                    format!(
                        "FENCE {}: {a:?} was forced out by {f:?}; {b:?} asked later, not a larger token",
                        name_of(n)
                    ),
                );
            }
        }
    }
    t
}
