//! `shmlock-bench`: lock/unlock throughput, lookup cost at load, multi-process scaling and
//! contention for shmlock next to flock(2) and a robust process-shared pthread mutex, in the
//! spirit of redis-benchmark.
//!
//! ```text
//! shmlock-bench stream --ops 200000
//! shmlock-bench many-held --n 1000,100000 --system shmlock
//! shmlock-bench parallel --procs 2 --json
//! shmlock-bench contention --procs 4 --seconds 1 --repeat 3
//! shmlock-bench run-overhead --rounds 300
//! ```
//!
//! # Layout
//! - `main.rs`: arguments, scenario driver, notes.
//! - `fixture.rs`: per-run objects of each system; `with_peer` runs a generic job on a peer.
//! - `peer.rs`: `trait Peer` and its three implementations.
//! - `procs.rs`: multi-process runs and the hidden `worker` subcommand.
//! - `etcd.rs`: `--system etcd`: the etcd backend next to a floor of raw etcd writes and the
//!   gateway, with the member's request counts (feature `etcd`).
//! - `report.rs`: results, tables, JSON.
//! - `hist.rs`: the fixed log-linear wait histogram.
//! - `cleanup.rs`: registry of created objects; the SIGINT/SIGTERM thread.
//! - `run_overhead.rs`: `shmlock run NAME -- true` next to `flock FILE true`, process by process.
//! - `sys.rs`: the only unsafe code (mappings, pthread, flock, affinity, rlimit).

mod cleanup;
mod connections;
mod etcd;
mod fixture;
mod hist;
mod peer;
#[cfg(feature = "peers")]
mod peers;
mod procs;
mod raw;
mod reap;
mod report;
mod run_overhead;
mod sys;

use std::process::ExitCode;
use std::time::Instant;

use anyhow::Result;
use clap::{Args, Parser, Subcommand};
use shmlock::Capacities;

use fixture::{with_peer, Fixture, Job, Namer, System};
use peer::Peer;
use procs::{Multi, MultiRun};
use report::{Extra, Row, Run};

#[derive(Debug, Parser)]
#[command(
    name = "shmlock-bench",
    version,
    about = "Benchmark shmlock against flock(2) and robust pthread mutexes"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
    #[command(flatten)]
    common: Common,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// N x { lock("ABCD"); unlock("ABCD") } in one process (op = one lock + unlock).
    Stream,
    /// Lock N distinct names, then unlock them all (op = one lock or one unlock).
    ManyHeld {
        /// Numbers of names, comma separated.
        #[arg(long, value_delimiter = ',', default_value = "1000,10000,100000")]
        n: Vec<u64>,
    },
    /// P processes streaming at once, each on its own name; aggregate throughput.
    Parallel,
    /// P processes on one name: lock; counter += 1; unlock, for --seconds (or --ops each).
    Contention,
    /// N concurrent gateway sessions, each holding one lock: time to open them, the daemon's
    /// memory before and after, and lock/unlock pairs/s round-robin over them (--ops, default
    /// 20000). Starts a shmlockd (built next to the bench) sized for N, unless --remote is given.
    Connections {
        /// Numbers of sessions, comma separated.
        #[arg(long, value_delimiter = ',', default_value = "1000")]
        n: Vec<u64>,
    },
    /// Every scenario with its defaults (many-held at 1000,10000,100000).
    All,
    /// A holder is SIGKILLed while another process waits: time from the kill to the waiter's
    /// grant, with shmlockd running and without it (both unless one is chosen).
    Reap {
        /// Rounds per setting.
        #[arg(long, default_value_t = 100)]
        rounds: usize,
        /// Only with shmlockd running (it reaps through pidfds).
        #[arg(long, conflicts_with = "no_daemon")]
        daemon: bool,
        /// Only without shmlockd (the waiter reaps the dead holder itself).
        #[arg(long)]
        no_daemon: bool,
    },
    /// The wall time of `shmlock run NAME -- true` next to `flock FILE true`, alternating,
    /// timed process by process (and `true` alone, the floor): medians and the ratio.
    RunOverhead(run_overhead::RunOverheadArgs),
    #[command(hide = true)]
    Worker(procs::WorkerArgs),
    #[command(hide = true)]
    ReapHolder(reap::HolderArgs),
}

#[derive(Debug, Args)]
struct Common {
    /// Which system(s) to run, comma separated (e.g. remote,redis,postgres).
    #[arg(long, value_enum, value_delimiter = ',', default_value = "all", global = true)]
    system: Vec<SystemArg>,
    /// Operations per process [stream, parallel: 2000000; contention: run --seconds instead].
    #[arg(long, global = true)]
    ops: Option<u64>,
    /// Processes for parallel and contention, each one client [default: number of CPUs].
    #[arg(long, visible_alias = "clients", global = true)]
    procs: Option<usize>,
    /// stream and parallel with remote or redis: send D lock/unlock pairs in one batch before
    /// reading their answers (as redis-benchmark -P); 1 = one request at a time.
    #[arg(long, value_name = "D", default_value_t = 1, global = true)]
    pipeline: usize,
    /// Duration of a contention run, when --ops is not given.
    #[arg(long, default_value_t = 2.0, global = true)]
    seconds: f64,
    /// Run each measurement R times; report the median run, with min and max ns/op.
    #[arg(long, default_value_t = 1, global = true)]
    repeat: usize,
    /// One JSON object per scenario per system (per n) on stdout, instead of tables.
    #[arg(long, global = true)]
    json: bool,
    /// Prefix of the bench's segment and object names [default: /shmlock-bench-PID].
    #[arg(long, global = true)]
    segment: Option<String>,
    /// Pin worker i to CPU i % ncpu.
    #[arg(long, global = true)]
    pin: bool,
    /// With --system remote: the gateway to use (e.g. a running shmlockd's 127.0.0.1:7411)
    /// [default: a gateway in the bench process on a fresh segment].
    #[arg(long, value_name = "ADDR", global = true)]
    remote: Option<String>,
    /// With --remote: the pid of the shmlockd serving it, whose memory `connections` reads.
    #[arg(long, value_name = "PID", global = true, requires = "remote")]
    daemon_pid: Option<u32>,
    /// With --system redis: the server.
    #[arg(long, value_name = "URL", default_value = "redis://127.0.0.1:6379/", global = true)]
    redis_url: String,
    /// With --system postgres: the server (user with a password, or trust, on loopback).
    #[arg(
        long,
        value_name = "URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres",
        global = true
    )]
    pg_url: String,
    /// With --system etcd: the cluster's client URLs, comma separated.
    #[arg(
        long,
        value_name = "URL",
        value_delimiter = ',',
        default_value = "http://127.0.0.1:2379",
        global = true
    )]
    etcd_url: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum SystemArg {
    Shmlock,
    Flock,
    Pthread,
    /// A bare shared-memory hash table, name lookup + CAS: the cost floor of locking by name,
    /// with none of shmlock's guarantees (not part of `all`).
    Probe,
    /// shmlock through the TCP gateway (not part of `all`).
    Remote,
    /// Redis at --redis-url: SET NX PX + compare-and-delete (build with --features peers).
    Redis,
    /// PostgreSQL advisory locks at --pg-url (build with --features peers).
    Postgres,
    /// shmlock's etcd backend at --etcd-url, next to a floor of raw etcd writes and the gateway:
    /// stream, parallel, contention only (build with --features etcd; not part of `all`).
    Etcd,
    All,
}

impl SystemArg {
    fn systems(self) -> Vec<System> {
        match self {
            SystemArg::Shmlock => vec![System::Shmlock],
            SystemArg::Flock => vec![System::Flock],
            SystemArg::Pthread => vec![System::Pthread],
            SystemArg::Probe => vec![System::Probe],
            SystemArg::Remote => vec![System::Remote],
            SystemArg::Redis => vec![System::Redis],
            SystemArg::Postgres => vec![System::Postgres],
            SystemArg::Etcd => vec![], // run by etcd.rs, not through a Peer
            SystemArg::All => System::ALL.to_vec(),
        }
    }
}

const DEFAULT_OPS: u64 = 2_000_000;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.cmd {
        Cmd::Worker(w) => procs::worker_main(w),
        Cmd::ReapHolder(a) => reap::holder_main(a),
        cmd => cleanup::install().and_then(|()| Bench::new(cli.common)?.run(cmd)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("shmlock-bench: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// The parent process's state.
struct Bench {
    c: Common,
    namer: Namer,
    systems: Vec<System>,
    procs: usize,
    /// Open-files limit (raised to the hard limit), for flock many-held.
    nofile: u64,
    /// `--system etcd` was given.
    etcd: bool,
}

impl Bench {
    fn new(c: Common) -> Result<Bench> {
        let prefix = c
            .segment
            .clone()
            .unwrap_or_else(|| format!("/shmlock-bench-{}", std::process::id()));
        anyhow::ensure!(c.repeat >= 1, "--repeat must be at least 1");
        anyhow::ensure!(c.pipeline >= 1, "--pipeline must be at least 1");
        if let Some(addr) = &c.remote {
            let _ = fixture::REMOTE_ADDR.set(addr.clone());
        }
        let _ = fixture::REDIS_URL.set(c.redis_url.clone());
        let _ = fixture::PG_URL.set(c.pg_url.clone());
        let etcd = c.system.contains(&SystemArg::Etcd);
        if etcd {
            etcd::check_built()?;
            anyhow::ensure!(c.pipeline == 1, "--pipeline: not for --system etcd");
        }
        let mut systems = Vec::new();
        for s in c.system.iter().flat_map(|s| s.systems()) {
            if !systems.contains(&s) {
                systems.push(s);
            }
        }
        anyhow::ensure!(c.seconds > 0.0 && c.seconds.is_finite(), "--seconds must be positive");
        let procs = c
            .procs
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()));
        anyhow::ensure!(procs >= 1, "--procs must be at least 1");
        Ok(Bench {
            namer: Namer::new(prefix)?,
            systems,
            procs,
            nofile: sys::raise_nofile_limit(),
            etcd,
            c,
        })
    }

    fn run(&self, cmd: Cmd) -> Result<()> {
        match cmd {
            Cmd::Stream => self.stream().and_then(|()| self.etcd(etcd::Workload::Stream)),
            Cmd::ManyHeld { .. } if self.etcd => anyhow::bail!("--system etcd: stream, parallel and contention only"),
            Cmd::ManyHeld { n } => self.many_held(&n),
            Cmd::Parallel => self
                .multi(Multi::Parallel)
                .and_then(|()| self.etcd(etcd::Workload::Parallel)),
            Cmd::Contention => self
                .multi(Multi::Contention)
                .and_then(|()| self.etcd(etcd::Workload::Contention)),
            Cmd::Connections { n } => self.connections(&n),
            Cmd::All => {
                self.stream()?;
                self.many_held(&[1_000, 10_000, 100_000])?;
                self.multi(Multi::Parallel)?;
                self.multi(Multi::Contention)?;
                self.etcd(etcd::Workload::Stream)?;
                self.etcd(etcd::Workload::Parallel)?;
                self.etcd(etcd::Workload::Contention)
            }
            Cmd::Reap {
                rounds,
                daemon,
                no_daemon,
            } => {
                let prefix = self
                    .c
                    .segment
                    .clone()
                    .unwrap_or_else(|| format!("/shmlock-bench-{}", std::process::id()));
                for d in [true, false]
                    .into_iter()
                    .filter(|&d| if d { !no_daemon } else { !daemon })
                {
                    reap::run(&format!("{prefix}-reap-{d}"), rounds, d, self.c.json)?;
                }
                Ok(())
            }
            Cmd::RunOverhead(a) => {
                let segment = self
                    .c
                    .segment
                    .clone()
                    .unwrap_or_else(|| format!("/shmlock-bench-{}", std::process::id()));
                run_overhead::run(&format!("{segment}-run"), &a, self.c.json)
            }
            Cmd::Worker(_) | Cmd::ReapHolder(_) => unreachable!("handled in main"),
        }
    }

    /// Runs `once` `repeat` times and summarizes; prints the JSON line at once.
    fn measure(
        &self,
        scenario: &'static str,
        system: System,
        n: Option<u64>,
        procs: Option<usize>,
        mut once: impl FnMut() -> Result<Run>,
    ) -> Result<Row> {
        let runs = (0..self.c.repeat).map(|_| once()).collect::<Result<Vec<_>>>()?;
        let row = Row::from_runs(scenario, system.name(), n, procs, runs);
        if self.c.json {
            println!("{}", row.json());
        }
        Ok(row)
    }

    fn finish(&self, title: &str, rows: &[Row], mut notes: Vec<String>) {
        if self.c.json {
            return;
        }
        for s in &self.systems {
            notes.push(system_note(*s).to_string());
        }
        report::print_scenario(title, rows, &notes);
    }

    /// The etcd comparison of `workload`, if `--system etcd` was given (see etcd.rs).
    fn etcd(&self, workload: etcd::Workload) -> Result<()> {
        if !self.etcd {
            return Ok(());
        }
        etcd::run(
            &etcd::Settings {
                urls: &self.c.etcd_url,
                namer: &self.namer,
                ops: self.c.ops,
                seconds: self.c.seconds,
                clients: self.procs,
                repeat: self.c.repeat,
                json: self.c.json,
            },
            workload,
        )
    }

    fn stream(&self) -> Result<()> {
        if self.systems.is_empty() {
            return Ok(());
        }
        let ops = self.c.ops.unwrap_or(DEFAULT_OPS);
        let names = vec!["ABCD".to_string()];
        let caps = Capacities {
            max_owners: 64,
            ..Default::default()
        };
        let mut rows = Vec::new();
        for &s in &self.systems {
            rows.push(self.measure("stream", s, None, None, || {
                let mut fx = Fixture::create(s, &self.namer, &names, &caps)?;
                let job = StreamJob {
                    ops,
                    depth: self.c.pipeline,
                };
                with_peer(&mut fx.opened, names.clone(), "bench-stream", job)
            })?);
        }
        let mut notes = vec![
            "op = one lock + unlock pair".into(),
            format!("shmlock segment: default capacities ({})", caps_text(&caps)),
        ];
        if self.c.pipeline > 1 {
            notes.push(pipeline_note(self.c.pipeline));
        }
        self.finish(
            &format!("stream: {ops} x {{ lock(\"ABCD\"); unlock(\"ABCD\") }} in one process"),
            &rows,
            notes,
        );
        Ok(())
    }

    fn many_held(&self, ns: &[u64]) -> Result<()> {
        if self.systems.is_empty() {
            return Ok(());
        }
        let mut rows = Vec::new();
        let mut notes = vec![
            "op = one lock or one unlock; fresh segment / files / mutexes for every run; ns/op is \
             the first round (every name new to the table), warm ns/op a second round on the same \
             names"
                .into(),
            "shmlock segment: max_locks = n, max_holds = 1024, max_owners = 64".into(),
        ];
        for &n in ns {
            anyhow::ensure!(n >= 1 && n <= u64::from(u32::MAX), "--n {n}: out of range");
            let names: Vec<String> = (0..n).map(|i| format!("held-{i}")).collect();
            let caps = Capacities {
                max_locks: n as u32,
                max_holds: 1024,
                max_owners: 64,
                ..Default::default()
            };
            for &s in &self.systems {
                if s == System::Flock && n + 64 > self.nofile {
                    let why = format!(
                        "flock skipped at n = {n}: holding n locks needs n open files, \
                         RLIMIT_NOFILE is {}",
                        self.nofile
                    );
                    if self.c.json {
                        eprintln!("shmlock-bench: {why}");
                    }
                    notes.push(why);
                    continue;
                }
                rows.push(self.measure("many-held", s, Some(n), None, || {
                    let mut fx = Fixture::create(s, &self.namer, &names, &caps)?;
                    with_peer(
                        &mut fx.opened,
                        names.clone(),
                        "bench-many-held",
                        ManyHeldJob { n: n as usize },
                    )
                })?);
            }
        }
        self.finish(
            &format!("many-held: lock n distinct names, then unlock them all (n = {ns:?})"),
            &rows,
            notes,
        );
        Ok(())
    }

    fn connections(&self, ns: &[u64]) -> Result<()> {
        let ops = self.c.ops.unwrap_or(20_000);
        let target = connections::Target {
            namer: &self.namer,
            remote: self.c.remote.as_deref(),
            daemon_pid: self.c.daemon_pid,
        };
        let mut rows = Vec::new();
        for &n in ns {
            anyhow::ensure!(n >= 1, "--n must be at least 1");
            anyhow::ensure!(
                n + 64 <= self.nofile,
                "--n {n}: the bench needs a descriptor per session and RLIMIT_NOFILE is {} (raise the \
                 hard limit: ulimit -Hn)",
                self.nofile
            );
            rows.push(self.measure("connections", System::Remote, Some(n), None, || {
                connections::run(&target, n, ops)
            })?);
        }
        if self.c.json {
            return Ok(());
        }
        let daemon = match (&self.c.remote, self.c.daemon_pid) {
            (Some(a), Some(p)) => format!("the shmlockd at {a} (pid {p})"),
            (Some(a), None) => format!("the gateway at {a}; memory not read (no --daemon-pid)"),
            (None, _) => "a shmlockd started by the bench on a fresh segment, max_connections = n, \
                          max_owners = n + 64, idle_timeout off"
                .to_string(),
        };
        report::print_scenario(
            &format!("connections: n sessions at once, each holding one lock (n = {ns:?})"),
            &rows,
            &[
                format!("daemon: {daemon}"),
                "open s = connect + greeting + LOCK granted, one session after another".into(),
                format!(
                    "op = one lock + unlock pair (two round trips) on session k % n, {ops} ops with all \
                     sessions open"
                ),
                "rss = the daemon's VmRSS (includes the segment pages it touched); anon = RssAnon \
                 (private memory); per session = (with all open - before) / n, after a warm-up"
                    .into(),
                "n+1th = a session beyond max_connections, which must be refused".into(),
            ],
        );
        Ok(())
    }

    fn multi(&self, scenario: Multi) -> Result<()> {
        if self.systems.is_empty() {
            return Ok(());
        }
        let (name, ops) = match scenario {
            Multi::Parallel => ("parallel", Some(self.c.ops.unwrap_or(DEFAULT_OPS))),
            Multi::Contention => ("contention", self.c.ops),
        };
        let mut rows = Vec::new();
        for &s in &self.systems {
            let run = MultiRun {
                namer: &self.namer,
                system: s,
                scenario,
                procs: self.procs,
                ops,
                seconds: self.c.seconds,
                pin: self.c.pin,
                depth: self.c.pipeline,
            };
            let row = self.measure(name, s, None, Some(self.procs), || run.run())?;
            if let Extra::Contention {
                exclusion_ok: false, ..
            } = row.median.extra
            {
                eprintln!(
                    "shmlock-bench: {}: MUTUAL EXCLUSION BROKEN (counter != grants)",
                    s.name()
                );
            }
            rows.push(row);
        }
        let p = self.procs;
        let (title, mut notes) = match scenario {
            Multi::Parallel => (
                format!(
                    "parallel: {p} processes, each {} x lock/unlock of its own name",
                    ops.unwrap_or(0)
                ),
                vec!["op = one lock + unlock pair; ops/s is the aggregate over all processes".into()],
            ),
            Multi::Contention => (
                match ops {
                    Some(o) => format!("contention: {p} processes x {o} grants of one name"),
                    None => format!("contention: {p} processes on one name for {} s", self.c.seconds),
                },
                vec![
                    "op = one grant (lock; counter += 1; unlock); ops/s = handoffs/s; wait = time inside each \
                     lock call (its two clock reads are in ns/op too)"
                        .into(),
                    "spread = max/min grants per process; max dev = the largest |grants - mean| / mean of one \
                     process; excl = the shared counter equals the grants"
                        .into(),
                ],
            ),
        };
        if self.c.pipeline > 1 && scenario == Multi::Parallel {
            notes.push(pipeline_note(self.c.pipeline));
        }
        notes.push(format!(
            "workers are separate processes{}; started together by a flag in shared memory",
            if self.c.pin {
                ", pinned to CPU i % ncpu"
            } else {
                ", not pinned"
            }
        ));
        self.finish(&title, &rows, notes);
        Ok(())
    }
}

fn caps_text(c: &Capacities) -> String {
    format!(
        "max_locks {}, max_holds {}, max_owners {}",
        c.max_locks, c.max_holds, c.max_owners
    )
}

fn pipeline_note(depth: usize) -> String {
    format!(
        "pipelined: {depth} lock/unlock pairs sent in one write, then their {} answers read \
         (remote: bare protocol lines on a second connection; redis: one MULTI-less pipeline)",
        2 * depth
    )
}

fn system_note(s: System) -> &'static str {
    match s {
        System::Shmlock => "shmlock: client.lock(name) -> guard, guard.unlock(); named segment in /dev/shm",
        System::Flock => {
            "flock: one file per name in a fresh directory under $TMPDIR (/tmp); lock = open(O_CREAT) + \
             flock(LOCK_EX), unlock = close(2)"
        }
        System::Remote => {
            "remote: RemoteClient::lock(name) -> guard, guard.unlock() over TCP loopback: two round \
             trips per pair (with --pipeline: see the pipelined note)"
        }
        System::Redis => {
            "redis: SET key token NX PX 30000 (retried at once while nil), unlock = compare-and-delete \
             Lua script by EVALSHA; one connection per client"
        }
        System::Postgres => {
            "postgres: SELECT pg_advisory_lock(k) / pg_advisory_unlock(k), prepared, k = FNV-1a 64 of \
             the name; one connection per client"
        }
        System::Probe => {
            "probe: the floor of any by-name lock in shared memory, not a lock manager: an \
             open-addressing hash table (linear probing, 2n+ slots) of 64-byte slots holding name and \
             lock word, the same hash as shmlock; lock = probe + CAS, unlock = one store; no owners, \
             tokens, crash safety or sleeping (waiters spin and yield)"
        }
        System::Pthread => {
            "pthread: robust process-shared mutex per name, 64-byte slots in a /dev/shm mapping; no name \
             lookup: locks are addressed by array index"
        }
    }
}

const WARMUP: u64 = 10_000;

struct StreamJob {
    ops: u64,
    /// Pairs per pipelined batch; 1: no pipelining.
    depth: usize,
}

impl Job for StreamJob {
    type Out = Run;

    fn run<P: Peer>(self, p: &mut P) -> Result<Run> {
        stream_loop(p, 0, WARMUP.min(self.ops), self.depth)?;
        let t = Instant::now();
        let ops = stream_loop(p, 0, self.ops, self.depth)?;
        Ok(Run {
            ops,
            seconds: t.elapsed().as_secs_f64(),
            extra: Extra::None,
        })
    }
}

/// `ops` x { lock(i); unlock(i) }, in batches of `depth` if it is above 1 (then `ops` is rounded
/// up to whole batches). Returns the pairs done.
#[inline(never)]
pub(crate) fn stream_loop<P: Peer>(p: &mut P, i: usize, ops: u64, depth: usize) -> Result<u64> {
    if depth <= 1 {
        for _ in 0..ops {
            p.pair(i)?;
        }
        return Ok(ops);
    }
    let batches = ops.div_ceil(depth as u64);
    for _ in 0..batches {
        p.pipelined(i, depth)?;
    }
    Ok(batches * depth as u64)
}

struct ManyHeldJob {
    n: usize,
}

impl Job for ManyHeldJob {
    type Out = Run;

    fn run<P: Peer>(self, p: &mut P) -> Result<Run> {
        let t0 = Instant::now();
        lock_all(p, self.n)?;
        let t1 = Instant::now();
        unlock_all(p, self.n)?;
        let t2 = Instant::now();
        // Again, now that the table (or the files) know every name.
        lock_all(p, self.n)?;
        unlock_all(p, self.n)?;
        let t3 = Instant::now();
        let (l, u) = ((t1 - t0).as_secs_f64(), (t2 - t1).as_secs_f64());
        let n = self.n as f64;
        Ok(Run {
            ops: 2 * self.n as u64,
            seconds: l + u,
            extra: Extra::ManyHeld {
                lock_ns_per_op: l * 1e9 / n,
                unlock_ns_per_op: u * 1e9 / n,
                warm_ns_per_op: (t3 - t2).as_secs_f64() * 1e9 / (2.0 * n),
            },
        })
    }
}

#[inline(never)]
fn lock_all<P: Peer>(p: &mut P, n: usize) -> Result<()> {
    for i in 0..n {
        p.lock(i)?;
    }
    Ok(())
}

#[inline(never)]
fn unlock_all<P: Peer>(p: &mut P, n: usize) -> Result<()> {
    for i in 0..n {
        p.unlock(i)?;
    }
    Ok(())
}
