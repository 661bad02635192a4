//! Failover figures of the etcd backend on a real 3-member cluster on loopback (election
//! timeout 500 ms, heartbeat 50 ms; `etcd` and `etcdctl` on PATH):
//!
//! 1. **Leader killed mid-run**: per run, `--clients` threads, each with an `EtcdClient` of its
//!    own (its own runtime and connections, all three endpoints; the lock is in etcd, so threads
//!    contend exactly as processes would), lock one name over and over, each grant checked by a
//!    witness (an atomic count of holders: above 1 is an exclusion violation) and by its token
//!    (strictly above the previous grant's). The leader is SIGKILLed mid-run; the figure is the
//!    longest pause between consecutive grants from 1 s before the kill to the end of the run.
//!    The killed member is restarted between runs (one cluster for all runs).
//! 2. **Lost-lock notice**: per run, a client with TTL T holds a lock; at Q two of the three
//!    members are SIGKILLed (quorum lost); the figure is Q to `EtcdGuard::wait_lost` returning.
//!    The design (src/etcd/session.rs) says between about 2T/3 and T.
//!
//! ```text
//! cargo bench --features etcd --bench etcd_failover -- --runs 20 --clients 4 --lost-runs 20 --ttls 2,10
//! ```
//! (`ETCD_FAILOVER_RUNS`, `ETCD_FAILOVER_CLIENTS`, `ETCD_FAILOVER_LOST_RUNS` and
//! `ETCD_FAILOVER_TTLS` set the same; the arguments win.)

#[path = "../tests/common/etcd.rs"]
#[allow(dead_code)] // the tests' harness: the bench uses part of it
mod etcd;

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use etcd::EtcdCluster;
use shmlock::etcd::{EtcdClient, EtcdOptions};
use shmlock::Error;

struct Config {
    runs: usize,
    clients: usize,
    lost_runs: usize,
    ttls: Vec<u64>,
}

fn config() -> Config {
    let env = |k: &str| std::env::var(k).ok();
    let mut c = Config {
        runs: env("ETCD_FAILOVER_RUNS").and_then(|v| v.parse().ok()).unwrap_or(20),
        clients: env("ETCD_FAILOVER_CLIENTS").and_then(|v| v.parse().ok()).unwrap_or(4),
        lost_runs: env("ETCD_FAILOVER_LOST_RUNS")
            .and_then(|v| v.parse().ok())
            .unwrap_or(20),
        ttls: parse_ttls(&env("ETCD_FAILOVER_TTLS").unwrap_or_else(|| "2,10".into())),
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < args.len() {
        let value = || args.get(i + 1).cloned().unwrap_or_default();
        match args[i].as_str() {
            "--runs" => c.runs = value().parse().expect("--runs N"),
            "--clients" => c.clients = value().parse().expect("--clients N"),
            "--lost-runs" => c.lost_runs = value().parse().expect("--lost-runs N"),
            "--ttls" => c.ttls = parse_ttls(&value()),
            _ => {
                i += 1; // `--bench` from cargo, and anything else: ignored
                continue;
            }
        }
        i += 2;
    }
    c
}

fn parse_ttls(s: &str) -> Vec<u64> {
    s.split(',')
        .filter(|t| !t.trim().is_empty())
        .map(|t| t.trim().parse().expect("--ttls: whole seconds, comma-separated"))
        .collect()
}

fn connect(cluster: &EtcdCluster, ttl: u64, label: &str) -> EtcdClient {
    let opts = EtcdOptions {
        ttl: Duration::from_secs(ttl),
        label: Some(label.into()),
        ..Default::default()
    };
    // Connecting may fail while a member is down (the lease grant is not retried): try again.
    let mut tries = 0;
    loop {
        match EtcdClient::connect(cluster.urls(), opts.clone()) {
            Ok(c) => return c,
            Err(e) if tries < 20 => {
                tries += 1;
                eprintln!("  (connect failed, again: {e})");
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(e) => panic!("connect: {e}"),
        }
    }
}

/// The `q` quantile (0..=1) of sorted `v`.
fn quantile(v: &[Duration], q: f64) -> Duration {
    if v.is_empty() {
        return Duration::ZERO;
    }
    let i = ((v.len() - 1) as f64 * q).round() as usize;
    v[i]
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1e3)
}

/// A small xorshift generator seeded from the clock (phases of the kills, not security).
struct Rng(u64);

impl Rng {
    fn new() -> Rng {
        let seed = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos() as u64;
        Rng(seed | 1)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n.max(1)
    }
}

/// What one leader-kill run saw.
struct RunResult {
    grants: usize,
    violations: u64,
    token_violations: u64,
    /// Grants of the key the previous grant had (same token): its holder's unlock failed.
    repeats: u64,
    errors: Vec<String>,
    /// The longest gap between grants from 1 s before the kill to the end.
    pause: Duration,
    /// The longest gap between grants in the second before the kill (for scale).
    baseline: Duration,
}

fn leader_kill_run(cluster: &mut EtcdCluster, run: usize, clients: usize, rng: &mut Rng) -> RunResult {
    let name = format!("failover/{run}");
    let inside = AtomicU32::new(0);
    let violations = AtomicU64::new(0);
    let token_violations = AtomicU64::new(0);
    let repeats = AtomicU64::new(0);
    let stop = AtomicBool::new(false);
    // (grant time, token), in grant order (appended while the lock is held).
    let grants: Mutex<Vec<(Instant, u64)>> = Mutex::new(Vec::new());
    let errors: Mutex<Vec<String>> = Mutex::new(Vec::new());
    let conns: Vec<EtcdClient> = (0..clients)
        .map(|i| connect(cluster, 10, &format!("failover-{i}")))
        .collect();
    let killed_at = std::thread::scope(|s| {
        for c in &conns {
            let (inside, violations, token_violations, repeats, stop, grants, errors, name) = (
                &inside,
                &violations,
                &token_violations,
                &repeats,
                &stop,
                &grants,
                &errors,
                &name,
            );
            s.spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match c.lock(name) {
                        Ok(g) => {
                            if inside.fetch_add(1, Ordering::SeqCst) != 0 {
                                violations.fetch_add(1, Ordering::SeqCst);
                            }
                            {
                                let mut gr = grants.lock().unwrap();
                                match gr.last() {
                                    Some(&(_, t)) if t > g.token().0 => {
                                        token_violations.fetch_add(1, Ordering::SeqCst);
                                    }
                                    // The same key granted again: its unlock failed and left it.
                                    Some(&(_, t)) if t == g.token().0 => {
                                        repeats.fetch_add(1, Ordering::SeqCst);
                                    }
                                    _ => {}
                                }
                                gr.push((Instant::now(), g.token().0));
                            }
                            std::thread::sleep(Duration::from_millis(2));
                            inside.fetch_sub(1, Ordering::SeqCst);
                            if let Err(e) = g.unlock() {
                                errors.lock().unwrap().push(format!("unlock: {e}"));
                            }
                        }
                        Err(e) => {
                            errors.lock().unwrap().push(format!("lock: {e}"));
                            std::thread::sleep(Duration::from_millis(20));
                        }
                    }
                }
            });
        }
        let count = || grants.lock().unwrap().len();
        let t0 = Instant::now();
        while count() < 20 && t0.elapsed() < Duration::from_secs(30) {
            std::thread::sleep(Duration::from_millis(10));
        }
        // A random moment within the next second: not in step with the keep-alives.
        std::thread::sleep(Duration::from_millis(1000 + rng.below(1000)));
        let leader = cluster.wait_leader();
        let before = count();
        cluster.kill(leader);
        let killed = Instant::now();
        // Run on until 20 grants after the kill and at least 3 s, at most 30 s.
        while (count() < before + 20 || killed.elapsed() < Duration::from_secs(3))
            && killed.elapsed() < Duration::from_secs(30)
        {
            std::thread::sleep(Duration::from_millis(10));
        }
        stop.store(true, Ordering::Relaxed);
        cluster.restart(leader);
        killed
    });
    cluster.wait_healthy();
    drop(conns);
    let grants = grants.into_inner().unwrap();
    let gaps = |from: Instant, to: Option<Instant>| {
        grants
            .windows(2)
            .filter(|w| w[1].0 >= from && to.is_none_or(|t| w[1].0 <= t))
            .map(|w| w[1].0 - w[0].0)
            .max()
            .unwrap_or(Duration::ZERO)
    };
    let from = killed_at - Duration::from_secs(1);
    RunResult {
        grants: grants.len(),
        violations: violations.into_inner(),
        token_violations: token_violations.into_inner(),
        repeats: repeats.into_inner(),
        errors: errors.into_inner().unwrap(),
        pause: gaps(from, None),
        baseline: gaps(from, Some(killed_at)),
    }
}

fn lost_notice_run(cluster: &mut EtcdCluster, ttl: u64, run: usize, rng: &mut Rng) -> Duration {
    let client = connect(cluster, ttl, "lost");
    let g = client.lock(format!("lost/{ttl}/{run}")).expect("lock");
    // A random phase against the keep-alives (one every TTL/3).
    std::thread::sleep(Duration::from_millis(rng.below(ttl * 1000 / 3)));
    let leader = cluster.wait_leader();
    let other = (leader + 1) % 3;
    cluster.kill(leader);
    cluster.kill(other);
    let q = Instant::now();
    let lost = g.wait_lost(Some(Duration::from_secs(ttl + 60)));
    let notice = q.elapsed();
    assert!(lost, "not told within TTL + 60 s");
    assert!(
        matches!(g.unlock(), Err(Error::Lost { .. })),
        "unlock of a lost lock must say so"
    );
    cluster.restart(leader);
    cluster.restart(other);
    cluster.wait_healthy();
    drop(client);
    notice
}

fn main() {
    let c = config();
    let dir = std::env::temp_dir().join(format!("shmlock-etcd-failover-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    let mut cluster = EtcdCluster::start(&dir, 3);
    let mut rng = Rng::new();
    println!(
        "etcd failover on a 3-member loopback cluster (election 500 ms, heartbeat 50 ms), {} client threads",
        c.clients
    );

    if c.runs > 0 {
        println!("\n1. leader SIGKILLed mid-run, {} runs", c.runs);
        let mut pauses = Vec::new();
        let mut baselines = Vec::new();
        let (mut violations, mut token_violations, mut repeats, mut grants, mut errors) = (0, 0, 0, Vec::new(), 0);
        let mut error_kinds = std::collections::BTreeMap::new();
        for run in 0..c.runs {
            let r = leader_kill_run(&mut cluster, run, c.clients, &mut rng);
            println!(
                "  run {run:>2}: {:>4} grants, longest pause {:>7} (before the kill {:>6}), {} violations, {} repeats, {} errors",
                r.grants,
                ms(r.pause),
                ms(r.baseline),
                r.violations + r.token_violations,
                r.repeats,
                r.errors.len()
            );
            for e in &r.errors {
                let kind: String = e.replace(&cluster.endpoints(), "<members>").chars().take(120).collect();
                *error_kinds.entry(kind).or_insert(0) += 1;
            }
            violations += r.violations;
            token_violations += r.token_violations;
            repeats += r.repeats;
            errors += r.errors.len();
            grants.push(r.grants);
            pauses.push(r.pause);
            baselines.push(r.baseline);
        }
        pauses.sort();
        baselines.sort();
        grants.sort();
        println!("  exclusion violations (two holders at once): {violations} over all runs");
        println!(
            "  token order violations (a grant's token below the previous one's): {token_violations}; \
             the previous grant's key granted again after its unlock failed: {repeats}"
        );
        println!(
            "  longest pause around the kill: p50 {}  max {}  (min {}); the second before the kill: p50 {}",
            ms(quantile(&pauses, 0.5)),
            ms(*pauses.last().unwrap()),
            ms(pauses[0]),
            ms(quantile(&baselines, 0.5))
        );
        println!(
            "  grants per run: min {}  p50 {}  max {}",
            grants[0],
            grants[grants.len() / 2],
            grants[grants.len() - 1]
        );
        println!("  lock/unlock calls that failed: {errors} over all runs");
        for (k, n) in &error_kinds {
            println!("    {n:>4} x {k}");
        }
    }

    for &ttl in &c.ttls {
        if c.lost_runs == 0 {
            break;
        }
        println!(
            "\n2. lost-lock notice, TTL {ttl} s, 2 of 3 members SIGKILLed, {} runs",
            c.lost_runs
        );
        let mut notices = Vec::new();
        for run in 0..c.lost_runs {
            let n = lost_notice_run(&mut cluster, ttl, run, &mut rng);
            println!("  run {run:>2}: told {}", ms(n));
            notices.push(n);
        }
        notices.sort();
        let t = Duration::from_secs(ttl);
        let over = notices.iter().filter(|&&n| n > t).count();
        println!(
            "  quorum loss -> wait_lost: min {}  p50 {}  p99 {}  max {}  (TTL {}; design: between 2/3 TTL = {} and TTL); {over} of {} over the TTL",
            ms(notices[0]),
            ms(quantile(&notices, 0.5)),
            ms(quantile(&notices, 0.99)),
            ms(*notices.last().unwrap()),
            ms(t),
            ms(t * 2 / 3),
            notices.len()
        );
    }
    drop(cluster);
    let _ = std::fs::remove_dir_all(&dir);
}
