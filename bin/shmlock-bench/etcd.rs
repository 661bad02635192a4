//! `--system etcd`: shmlock's etcd backend (`shmlock::etcd::EtcdClient`, feature `etcd`) on the
//! cluster at `--etcd-url`, side by side in one run with two references measured the same way:
//!
//! - `etcd`: `client.lock(name)?.unlock()?` through the [`Locker`](shmlock::Locker) contract;
//! - `etcd-floor`: the same number of raw etcd writes per pair with the same clients,
//!   `EtcdClient::put_delete` (one `Put` with the session's lease, one `DeleteRange`): what any
//!   lock on etcd must pay at least;
//! - `remote`: shmlock's TCP gateway ([`RemoteClient`](shmlock::remote::RemoteClient)) on a fresh segment (or `--remote ADDR`).
//!
//! Workloads: `stream` (one client, pairs back to back on one name), `parallel` (C clients, each
//! its own client and its own name), `contention` (C clients on one name: lock; check exclusion;
//! unlock). Clients are threads of this process, each with a client of its own (an
//! `EtcdClient` runs its own runtime thread and gRPC connection), started together after a
//! warm-up. For every run the member's Prometheus counters (`URL/metrics`) are read before and
//! after, outside the timed loop, and the requests per pair are printed by gRPC method: the
//! evidence that nothing polls.

use anyhow::{bail, Result};

use crate::fixture::Namer;

/// Why `--system etcd` cannot run in a build without the etcd client.
pub(crate) const NO_ETCD: &str = "this shmlock-bench was built without the etcd client: rebuild it with \
                                  `--features etcd` (cargo build --release --features etcd --bin shmlock-bench)";

/// What the command line says about an etcd run.
pub(crate) struct Settings<'a> {
    /// The cluster's client URLs.
    pub(crate) urls: &'a [String],
    pub(crate) namer: &'a Namer,
    /// Pairs (or grants) per client; None: run for `seconds`.
    pub(crate) ops: Option<u64>,
    pub(crate) seconds: f64,
    /// Clients of parallel and contention (stream has one).
    pub(crate) clients: usize,
    pub(crate) repeat: usize,
    pub(crate) json: bool,
}

/// The workloads `--system etcd` runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Workload {
    Stream,
    Parallel,
    Contention,
}

impl Workload {
    fn name(self) -> &'static str {
        match self {
            Workload::Stream => "stream",
            Workload::Parallel => "parallel",
            Workload::Contention => "contention",
        }
    }
}

/// Fails at once, before any other system runs, when this build has no etcd client.
pub(crate) fn check_built() -> Result<()> {
    if cfg!(feature = "etcd") {
        Ok(())
    } else {
        bail!(NO_ETCD)
    }
}

/// Runs `workload` on etcd, its floor and the gateway, and prints the table (or JSON lines).
#[cfg(not(feature = "etcd"))]
pub(crate) fn run(s: &Settings, workload: Workload) -> Result<()> {
    let _ = (
        s.urls,
        s.namer,
        s.ops,
        s.seconds,
        s.clients,
        s.repeat,
        s.json,
        workload.name(),
    );
    bail!(NO_ETCD)
}

#[cfg(feature = "etcd")]
pub(crate) use imp::run;

#[cfg(feature = "etcd")]
mod imp {
    use std::collections::BTreeMap;
    use std::io::{Read, Write};
    use std::net::{TcpStream, ToSocketAddrs};
    use std::sync::atomic::Ordering::{AcqRel, Acquire, Relaxed, Release};
    use std::sync::atomic::{AtomicBool, AtomicU64};
    use std::sync::Barrier;
    use std::time::{Duration, Instant};

    use anyhow::{bail, ensure, Context, Result};
    use serde::Serialize;
    use shmlock::etcd::{EtcdClient, EtcdOptions};
    use shmlock::remote::RemoteClient;
    use shmlock::{Capacities, Guard, Locker};

    use super::{Settings, Workload};
    use crate::fixture::{Fixture, System};
    use crate::hist::Hist;
    use crate::report::{print_table, thousands};

    /// Each client's warm-up before a timed run (its pairs are not counted).
    const WARMUP: Duration = Duration::from_millis(200);

    /// The three rows of every workload, in the order they run within a repetition.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Kind {
        Lock,
        Floor,
        Gateway,
        /// Each client alternates one etcd pair and one etcd-floor pair (stream and parallel):
        /// the ratio of the two under the same load, whatever else the machine does meanwhile.
        Interleaved,
    }

    impl Kind {
        const ALL: [Kind; 4] = [Kind::Lock, Kind::Floor, Kind::Gateway, Kind::Interleaved];

        fn name(self) -> &'static str {
            match self {
                Kind::Lock => "etcd",
                Kind::Floor => "etcd-floor",
                Kind::Gateway => "remote",
                Kind::Interleaved => "etcd-interleaved",
            }
        }
    }

    /// One timed run of one row.
    struct Measured {
        /// Pairs (grants, in contention) over all clients.
        ops: u64,
        seconds: f64,
        /// Per pair (stream, parallel) or per lock call (contention), in ns; in an interleaved
        /// run, of the etcd pairs.
        hist: Hist,
        /// An interleaved run's etcd pairs and floor pairs: (count, summed time in ns).
        busy: [(u64, u128); 2],
        /// An interleaved run's floor pairs.
        hist_floor: Hist,
        /// Per client.
        grants: Vec<u64>,
        /// Contention of a lock: no two clients were inside at once, and the plain counter
        /// incremented inside equals the grants.
        exclusion_ok: Option<bool>,
    }

    impl Measured {
        fn ns_per_op(&self) -> f64 {
            if self.ops == 0 {
                f64::NAN
            } else {
                self.seconds * 1e9 / self.ops as f64
            }
        }

        fn ops_per_sec(&self) -> f64 {
            self.ops as f64 / self.seconds
        }

        /// The mean time of a recorded op of slot `k` (0: etcd, 1: floor), in us.
        fn mean_us(&self, k: usize) -> f64 {
            let (n, ns) = self.busy[k];
            ns as f64 / n.max(1) as f64 / 1e3
        }

        /// An interleaved run's etcd pairs/s over its floor pairs/s at the same concurrency: the
        /// floor's mean pair time over etcd's.
        fn interleaved_ratio(&self) -> f64 {
            self.mean_us(1) / self.mean_us(0)
        }
    }

    /// Requests the member(s) counted, by gRPC method.
    #[derive(Debug, Default, Clone)]
    struct Counts {
        /// `grpc_server_started_total`: calls (a stream counts once, when it opens).
        started: BTreeMap<String, f64>,
        /// `grpc_server_msg_received_total` of streaming methods: messages sent on them.
        stream_msgs: BTreeMap<String, f64>,
        /// `etcd_mvcc_{put,delete,range,txn}_total` (read only with a single endpoint: every
        /// member of a cluster applies every write).
        mvcc: BTreeMap<String, f64>,
    }

    impl Counts {
        fn minus(&self, before: &Counts) -> Counts {
            let sub = |a: &BTreeMap<String, f64>, b: &BTreeMap<String, f64>| {
                a.iter()
                    .map(|(k, v)| (k.clone(), v - b.get(k).copied().unwrap_or(0.0)))
                    .filter(|(_, v)| *v != 0.0)
                    .collect()
            };
            Counts {
                started: sub(&self.started, &before.started),
                stream_msgs: sub(&self.stream_msgs, &before.stream_msgs),
                mvcc: sub(&self.mvcc, &before.mvcc),
            }
        }

        fn add(&mut self, other: &Counts) {
            for (mine, theirs) in [
                (&mut self.started, &other.started),
                (&mut self.stream_msgs, &other.stream_msgs),
                (&mut self.mvcc, &other.mvcc),
            ] {
                for (k, v) in theirs {
                    *mine.entry(k.clone()).or_insert(0.0) += v;
                }
            }
        }

        /// Per op, as (label, value): calls by method, then `METHOD msgs`, then `mvcc X`.
        fn per_op(&self, ops: u64) -> Vec<(String, f64)> {
            let d = ops.max(1) as f64;
            let mut out: Vec<(String, f64)> = self.started.iter().map(|(k, v)| (k.clone(), v / d)).collect();
            out.extend(self.stream_msgs.iter().map(|(k, v)| (format!("{k} msgs"), v / d)));
            out.extend(self.mvcc.iter().map(|(k, v)| (format!("mvcc {k}"), v / d)));
            out
        }
    }

    /// GETs `url/metrics` (plain http only) and returns the body.
    fn fetch_metrics(url: &str) -> Result<String> {
        let Some(rest) = url.strip_prefix("http://") else {
            bail!("{url}: only http:// endpoints are scraped");
        };
        let hostport = rest.split('/').next().unwrap_or(rest);
        let addr = hostport
            .to_socket_addrs()
            .with_context(|| format!("resolve {hostport}"))?
            .next()
            .with_context(|| format!("no address for {hostport}"))?;
        let mut s =
            TcpStream::connect_timeout(&addr, Duration::from_secs(2)).with_context(|| format!("connect to {url}"))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        write!(s, "GET /metrics HTTP/1.0\r\nHost: {hostport}\r\n\r\n")?;
        let mut resp = Vec::new();
        s.read_to_end(&mut resp)
            .with_context(|| format!("read {url}/metrics"))?;
        let resp = String::from_utf8_lossy(&resp);
        let (head, body) = resp
            .split_once("\r\n\r\n")
            .with_context(|| format!("{url}/metrics: no HTTP header"))?;
        let status = head.lines().next().unwrap_or_default();
        ensure!(status.contains(" 200"), "{url}/metrics: {status}");
        Ok(body.to_string())
    }

    /// The value of label `label` in a Prometheus sample's `{...}`.
    fn label<'a>(labels: &'a str, label: &str) -> Option<&'a str> {
        let pat = format!("{label}=\"");
        let at = labels.find(&pat)? + pat.len();
        labels[at..].split('"').next()
    }

    /// Adds the counters of one scrape to `c`.
    fn parse_metrics(body: &str, with_mvcc: bool, c: &mut Counts) {
        for line in body.lines().filter(|l| !l.starts_with('#')) {
            let Some((series, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let Ok(value) = value.parse::<f64>() else {
                continue;
            };
            let (metric, labels) = match series.split_once('{') {
                Some((m, l)) => (m, l),
                None => (series, ""),
            };
            let method = || label(labels, "grpc_method").map(str::to_string);
            let streaming = label(labels, "grpc_type").is_some_and(|t| t != "unary");
            let slot = match metric {
                "grpc_server_started_total" => method().map(|m| c.started.entry(m)),
                "grpc_server_msg_received_total" if streaming => method().map(|m| c.stream_msgs.entry(m)),
                m if with_mvcc => match m {
                    "etcd_mvcc_put_total" => Some(c.mvcc.entry("put".into())),
                    "etcd_mvcc_delete_total" => Some(c.mvcc.entry("delete".into())),
                    "etcd_mvcc_range_total" => Some(c.mvcc.entry("range".into())),
                    "etcd_mvcc_txn_total" => Some(c.mvcc.entry("txn".into())),
                    _ => None,
                },
                _ => None,
            };
            if let Some(slot) = slot {
                *slot.or_insert(0.0) += value;
            }
        }
    }

    /// Every endpoint's counters, summed.
    fn scrape(urls: &[String]) -> Result<Counts> {
        let mut c = Counts::default();
        for u in urls {
            parse_metrics(&fetch_metrics(u.trim_end_matches('/'))?, urls.len() == 1, &mut c);
        }
        Ok(c)
    }

    /// One client's timed loop: ops, its start and end, and per slot its histogram and (count,
    /// summed ns).
    type ClientRun = (u64, Instant, Instant, [Hist; 2], [(u64, u128); 2]);

    /// Runs `op` on every client in a thread of its own: a warm-up, then all start together
    /// (`between(true)` runs while every client waits at the start line, `between(false)` after
    /// the last ended), then `ops` each or until `seconds` pass. `op(client, index, n)` (n: the
    /// client's ops so far) returns the slot (0, or 1 for an interleaved run's floor pairs) and
    /// the duration to record.
    fn drive<C: Sync>(
        clients: &[C],
        ops: Option<u64>,
        seconds: f64,
        mut between: impl FnMut(bool),
        op: impl Fn(&C, usize, u64) -> Result<(usize, Duration)> + Sync,
    ) -> Result<Measured> {
        let n = clients.len();
        let ready = Barrier::new(n + 1);
        let go = Barrier::new(n + 1);
        let stop = AtomicBool::new(false);
        let results = std::thread::scope(|scope| {
            let threads: Vec<_> = clients
                .iter()
                .enumerate()
                .map(|(i, c)| {
                    let (ready, go, stop, op) = (&ready, &go, &stop, &op);
                    scope.spawn(move || -> Result<ClientRun> {
                        let warm_until = Instant::now() + WARMUP;
                        let warmed = (|| {
                            for k in 0.. {
                                op(c, i, k)?;
                                if Instant::now() >= warm_until {
                                    break;
                                }
                            }
                            Ok::<(), anyhow::Error>(())
                        })();
                        ready.wait();
                        go.wait();
                        warmed.with_context(|| format!("client {i}: warm-up"))?;
                        let mut hists = [Hist::new(), Hist::new()];
                        let mut busy = [(0u64, 0u128); 2];
                        let max = ops.unwrap_or(u64::MAX);
                        let t0 = Instant::now();
                        let mut done = 0;
                        while done < max && (ops.is_some() || !stop.load(Relaxed)) {
                            let (k, d) = op(c, i, done).with_context(|| format!("client {i}"))?;
                            hists[k].record(d.as_nanos() as u64);
                            busy[k].0 += 1;
                            busy[k].1 += d.as_nanos();
                            done += 1;
                        }
                        Ok((done, t0, Instant::now(), hists, busy))
                    })
                })
                .collect();
            ready.wait();
            between(true);
            go.wait();
            if ops.is_none() {
                std::thread::sleep(Duration::from_secs_f64(seconds));
                stop.store(true, Relaxed);
            }
            threads
                .into_iter()
                .map(|t| {
                    t.join()
                        .unwrap_or_else(|_| Err(anyhow::anyhow!("a client thread panicked")))
                })
                .collect::<Vec<_>>()
        });
        between(false);
        let mut hist = Hist::new();
        let mut hist_floor = Hist::new();
        let mut busy = [(0u64, 0u128); 2];
        let mut grants = Vec::with_capacity(n);
        let (mut start, mut end) = (None::<Instant>, None::<Instant>);
        for r in results {
            let (done, t0, t1, h, b) = r?;
            grants.push(done);
            hist.merge_sparse(&h[0].sparse());
            hist_floor.merge_sparse(&h[1].sparse());
            for k in 0..2 {
                busy[k].0 += b[k].0;
                busy[k].1 += b[k].1;
            }
            start = Some(start.map_or(t0, |s| s.min(t0)));
            end = Some(end.map_or(t1, |e| e.max(t1)));
        }
        let seconds = match (start, end) {
            (Some(s), Some(e)) => (e - s).as_secs_f64(),
            _ => 0.0,
        };
        Ok(Measured {
            ops: grants.iter().sum(),
            seconds,
            hist,
            busy,
            hist_floor,
            grants,
            exclusion_ok: None,
        })
    }

    /// One client's pair (stream, parallel): lock name `i` and unlock it; the pair's duration.
    fn pair<L: Locker>(client: &L, name: &str) -> Result<Duration> {
        let t0 = Instant::now();
        client.lock(name.as_bytes())?.unlock()?;
        Ok(t0.elapsed())
    }

    /// What a contention run checks: nobody else inside, and a plain counter.
    #[derive(Default)]
    struct Exclusion {
        inside: AtomicBool,
        broken: AtomicBool,
        counter: AtomicU64,
    }

    impl Exclusion {
        /// One grant: lock; check and count; unlock. The time the lock call took.
        fn grant<L: Locker>(&self, client: &L, name: &str) -> Result<Duration> {
            let t0 = Instant::now();
            let g = client.lock(name.as_bytes())?;
            let waited = t0.elapsed();
            if self.inside.swap(true, AcqRel) {
                self.broken.store(true, Relaxed);
            }
            // Not an atomic increment: only mutual exclusion keeps the count right.
            self.counter.store(self.counter.load(Relaxed) + 1, Relaxed);
            self.inside.store(false, Release);
            g.unlock()?;
            Ok(waited)
        }

        fn ok(&self, grants: u64) -> bool {
            !self.broken.load(Acquire) && self.counter.load(Acquire) == grants
        }
    }

    /// A row: the median of the repetitions.
    struct Row {
        kind: Kind,
        clients: usize,
        runs: Vec<Measured>,
        /// Requests over all repetitions (None: not counted).
        counts: Option<Counts>,
    }

    impl Row {
        /// Sorts the runs by ns/op (an interleaved row: by its ratio, best last).
        fn sorted(&mut self) {
            if self.kind == Kind::Interleaved {
                self.runs
                    .sort_by(|a, b| a.interleaved_ratio().total_cmp(&b.interleaved_ratio()));
            } else {
                self.runs.sort_by(|a, b| a.ns_per_op().total_cmp(&b.ns_per_op()));
            }
        }
        fn median(&self) -> &Measured {
            &self.runs[(self.runs.len() - 1) / 2]
        }
        fn total_ops(&self) -> u64 {
            self.runs.iter().map(|r| r.ops).sum()
        }
    }

    #[derive(Serialize)]
    struct JsonRow<'a> {
        scenario: &'static str,
        system: &'static str,
        procs: usize,
        ops: u64,
        seconds: f64,
        ops_per_sec: f64,
        ns_per_op: f64,
        min_ns_per_op: f64,
        max_ns_per_op: f64,
        repeat: usize,
        /// Per pair (stream, parallel) or per lock call (contention).
        p50_us: f64,
        p99_us: f64,
        /// This row's ops/s over etcd-floor's (medians).
        ratio_to_floor: f64,
        /// Per repetition, run i over floor run i (in the order they ran).
        ratio_to_floor_runs: &'a [f64],
        #[serde(skip_serializing_if = "Option::is_none")]
        handoffs_per_sec: Option<f64>,
        #[serde(skip_serializing_if = "Option::is_none")]
        p50_wait_us: Option<f64>,
        #[serde(skip_serializing_if = "Option::is_none")]
        p99_wait_us: Option<f64>,
        #[serde(skip_serializing_if = "Option::is_none")]
        exclusion_ok: Option<bool>,
        #[serde(skip_serializing_if = "Option::is_none")]
        grants_per_proc: Option<&'a [u64]>,
        /// Requests per op at the member(s), by gRPC method (`METHOD msgs`: messages on a
        /// stream; `mvcc X`: the member's store operations), over all repetitions.
        #[serde(skip_serializing_if = "Option::is_none")]
        requests_per_op: Option<BTreeMap<String, f64>>,
    }

    /// The interleaved run of stream and parallel, as JSON: the median run by ratio.
    #[derive(Serialize)]
    struct JsonInterleaved<'a> {
        scenario: &'static str,
        system: &'static str,
        procs: usize,
        seconds: f64,
        repeat: usize,
        etcd_pairs: u64,
        floor_pairs: u64,
        etcd_mean_us: f64,
        floor_mean_us: f64,
        etcd_p50_us: f64,
        etcd_p99_us: f64,
        floor_p50_us: f64,
        floor_p99_us: f64,
        /// floor_mean_us / etcd_mean_us: etcd's pairs/s over the floor's at the same concurrency.
        ratio_to_floor: f64,
        /// Per repetition, in the order they ran.
        ratio_to_floor_runs: &'a [f64],
    }

    pub(crate) fn run(s: &Settings, workload: Workload) -> Result<()> {
        ensure!(!s.urls.is_empty(), "--etcd-url: no endpoint");
        let clients = match workload {
            Workload::Stream => 1,
            _ => s.clients,
        };
        let names: Vec<String> = match workload {
            Workload::Stream => vec!["ABCD".into()],
            Workload::Parallel => (0..clients).map(|i| format!("parallel-{i}")).collect(),
            Workload::Contention => vec!["contention".into()],
        };
        let name_of = |i: usize| names[if workload == Workload::Parallel { i } else { 0 }].as_str();
        // This run's keys: `<bench prefix>-etcd-<seq>/...`, so two benches never share a lock.
        let prefix = format!("{}/", &s.namer.shm("etcd")[1..]);
        let floor_keys: Vec<Vec<u8>> = (0..clients)
            .map(|i| format!("{prefix}floor-{}", if workload == Workload::Parallel { i } else { 0 }).into_bytes())
            .collect();
        let opts = EtcdOptions {
            prefix: prefix.clone().into_bytes(),
            label: Some("shmlock-bench".into()),
            ..EtcdOptions::default()
        };
        let etcd: Vec<EtcdClient> = (0..clients)
            .map(|_| EtcdClient::connect(s.urls, opts.clone()).context("connect to etcd (--etcd-url)"))
            .collect::<Result<_>>()?;
        let caps = Capacities {
            max_owners: (clients as u32 + 8).max(64),
            ..Default::default()
        };
        let fixture = Fixture::create(System::Remote, s.namer, &names, &caps)?;
        let remote: Vec<RemoteClient> = (0..clients)
            .map(|_| {
                RemoteClient::connect(fixture.target.as_str())
                    .with_context(|| format!("connect to gateway {}", fixture.target))
            })
            .collect::<Result<_>>()?;

        let mut scrape_error: Option<String> = None;
        let mut rows: Vec<Row> = Kind::ALL
            .iter()
            .filter(|&&k| !(k == Kind::Interleaved && workload == Workload::Contention))
            .map(|&kind| Row {
                kind,
                clients,
                runs: Vec::new(),
                counts: matches!(kind, Kind::Lock | Kind::Floor).then(Counts::default),
            })
            .collect();
        for _ in 0..s.repeat {
            for row in rows.iter_mut() {
                let excl = Exclusion::default();
                let mut before: Option<Counts> = None;
                let mut delta: Option<Counts> = None;
                // At the start line (every client waits): zero the exclusion counter (the
                // warm-up counted too) and read the member's counters; after the end: read them
                // again.
                let between = |start: bool| {
                    if start {
                        excl.counter.store(0, Relaxed);
                    }
                    if matches!(row.kind, Kind::Gateway | Kind::Interleaved) || scrape_error.is_some() {
                        return;
                    }
                    match scrape(s.urls) {
                        Ok(now) if start => before = Some(now),
                        Ok(now) => delta = before.take().map(|b| now.minus(&b)),
                        Err(e) => scrape_error = Some(format!("{e:#}")),
                    }
                };
                let contention = workload == Workload::Contention;
                let floor = |c: &EtcdClient, i: usize| -> Result<Duration> {
                    let t0 = Instant::now();
                    c.put_delete(&floor_keys[i])?;
                    Ok(t0.elapsed())
                };
                let slot0 = |d: Result<Duration>| d.map(|d| (0, d));
                let mut m = match (row.kind, contention) {
                    (Kind::Lock, false) => {
                        drive(&etcd, s.ops, s.seconds, between, |c, i, _| slot0(pair(c, name_of(i))))?
                    }
                    (Kind::Lock, true) => drive(&etcd, s.ops, s.seconds, between, |c, i, _| {
                        slot0(excl.grant(c, name_of(i)))
                    })?,
                    (Kind::Floor, _) => drive(&etcd, s.ops, s.seconds, between, |c, i, _| slot0(floor(c, i)))?,
                    (Kind::Gateway, false) => {
                        drive(&remote, s.ops, s.seconds, between, |c, i, _| slot0(pair(c, name_of(i))))?
                    }
                    (Kind::Gateway, true) => drive(&remote, s.ops, s.seconds, between, |c, i, _| {
                        slot0(excl.grant(c, name_of(i)))
                    })?,
                    (Kind::Interleaved, _) => drive(&etcd, s.ops.map(|o| 2 * o), s.seconds, between, |c, i, n| {
                        if n % 2 == 0 {
                            slot0(pair(c, name_of(i)))
                        } else {
                            floor(c, i).map(|d| (1, d))
                        }
                    })?,
                };
                if contention && row.kind != Kind::Floor {
                    m.exclusion_ok = Some(excl.ok(m.ops));
                }
                match (&mut row.counts, delta) {
                    (Some(total), Some(d)) => total.add(&d),
                    (counts, _) => *counts = None,
                }
                row.runs.push(m);
            }
        }

        // Ratios per repetition, in run order, before sorting.
        let ratio_runs: Vec<Vec<f64>> = rows
            .iter()
            .map(|r| {
                if r.kind == Kind::Interleaved {
                    return r.runs.iter().map(Measured::interleaved_ratio).collect();
                }
                r.runs
                    .iter()
                    .zip(&rows[1].runs)
                    .map(|(a, f)| a.ops_per_sec() / f.ops_per_sec())
                    .collect()
            })
            .collect();
        for r in rows.iter_mut() {
            r.sorted();
        }
        let floor_ops = rows[1].median().ops_per_sec();
        for r in &rows {
            if r.kind != Kind::Floor && r.median().exclusion_ok == Some(false) {
                eprintln!(
                    "shmlock-bench: {} {}: MUTUAL EXCLUSION BROKEN (counter != grants)",
                    workload.name(),
                    r.kind.name()
                );
            }
        }
        if s.json {
            for (r, ratios) in rows.iter().zip(&ratio_runs) {
                let m = r.median();
                if r.kind == Kind::Interleaved {
                    let j = JsonInterleaved {
                        scenario: workload.name(),
                        system: r.kind.name(),
                        procs: r.clients,
                        seconds: m.seconds,
                        repeat: r.runs.len(),
                        etcd_pairs: m.busy[0].0,
                        floor_pairs: m.busy[1].0,
                        etcd_mean_us: m.mean_us(0),
                        floor_mean_us: m.mean_us(1),
                        etcd_p50_us: m.hist.quantile(0.5) / 1e3,
                        etcd_p99_us: m.hist.quantile(0.99) / 1e3,
                        floor_p50_us: m.hist_floor.quantile(0.5) / 1e3,
                        floor_p99_us: m.hist_floor.quantile(0.99) / 1e3,
                        ratio_to_floor: m.interleaved_ratio(),
                        ratio_to_floor_runs: ratios,
                    };
                    println!("{}", serde_json::to_string(&j)?);
                    continue;
                }
                let contention = workload == Workload::Contention;
                let j = JsonRow {
                    scenario: workload.name(),
                    system: r.kind.name(),
                    procs: r.clients,
                    ops: m.ops,
                    seconds: m.seconds,
                    ops_per_sec: m.ops_per_sec(),
                    ns_per_op: m.ns_per_op(),
                    min_ns_per_op: r.runs[0].ns_per_op(),
                    max_ns_per_op: r.runs[r.runs.len() - 1].ns_per_op(),
                    repeat: r.runs.len(),
                    p50_us: m.hist.quantile(0.5) / 1e3,
                    p99_us: m.hist.quantile(0.99) / 1e3,
                    ratio_to_floor: m.ops_per_sec() / floor_ops,
                    ratio_to_floor_runs: ratios,
                    handoffs_per_sec: contention.then(|| m.ops_per_sec()),
                    p50_wait_us: contention.then(|| m.hist.quantile(0.5) / 1e3),
                    p99_wait_us: contention.then(|| m.hist.quantile(0.99) / 1e3),
                    exclusion_ok: m.exclusion_ok,
                    grants_per_proc: contention.then_some(m.grants.as_slice()),
                    requests_per_op: r.counts.as_ref().map(|c| c.per_op(r.total_ops()).into_iter().collect()),
                };
                println!("{}", serde_json::to_string(&j)?);
            }
            if let Some(e) = &scrape_error {
                eprintln!("shmlock-bench: etcd requests not counted: {e}");
            }
            return Ok(());
        }
        print(
            s,
            workload,
            clients,
            &rows,
            &ratio_runs,
            scrape_error.as_deref(),
            &fixture.target,
        );
        Ok(())
    }

    fn print(
        s: &Settings,
        workload: Workload,
        clients: usize,
        rows: &[Row],
        ratio_runs: &[Vec<f64>],
        scrape_error: Option<&str>,
        gateway: &str,
    ) {
        let how_long = match s.ops {
            Some(o) => format!("{o} per client"),
            None => format!("{} s per run", s.seconds),
        };
        let title = match workload {
            Workload::Stream => {
                format!("etcd stream: 1 client, lock+unlock pairs back to back on one name ({how_long})")
            }
            Workload::Parallel => {
                format!("etcd parallel: {clients} clients, each its own client and its own name ({how_long})")
            }
            Workload::Contention => format!("etcd contention: {clients} clients on one name ({how_long})"),
        };
        println!("== {title}");
        let contention = workload == Workload::Contention;
        let repeat = rows[0].runs.len();
        let mut headers = vec![
            "system",
            "clients",
            if contention { "grants" } else { "pairs" },
            "seconds",
        ];
        headers.push(if contention { "grants/s" } else { "pairs/s" });
        headers.extend(if contention {
            ["p50 wait us", "p99 wait us"]
        } else {
            ["p50 us", "p99 us"]
        });
        if repeat > 1 {
            headers.extend(["min ns/op", "max ns/op"]);
        }
        headers.push("x floor");
        if repeat > 1 {
            headers.push("x floor per run");
        }
        if contention {
            headers.push("excl");
        }
        let floor_ops = rows[1].median().ops_per_sec();
        let table: Vec<Vec<String>> = rows
            .iter()
            .zip(ratio_runs)
            .filter(|(r, _)| r.kind != Kind::Interleaved)
            .map(|(r, ratios)| {
                let m = r.median();
                let mut c = vec![
                    r.kind.name().to_string(),
                    r.clients.to_string(),
                    thousands(m.ops as f64),
                    format!("{:.3}", m.seconds),
                    thousands(m.ops_per_sec()),
                    format!("{:.1}", m.hist.quantile(0.5) / 1e3),
                    format!("{:.1}", m.hist.quantile(0.99) / 1e3),
                ];
                if repeat > 1 {
                    c.push(format!("{:.0}", r.runs[0].ns_per_op()));
                    c.push(format!("{:.0}", r.runs[repeat - 1].ns_per_op()));
                }
                c.push(format!("{:.2}x", m.ops_per_sec() / floor_ops));
                if repeat > 1 {
                    c.push(ratios.iter().map(|x| format!("{x:.2}")).collect::<Vec<_>>().join(" "));
                }
                if contention {
                    c.push(match m.exclusion_ok {
                        Some(true) => "ok".into(),
                        Some(false) => "BROKEN".into(),
                        None => "-".into(),
                    });
                }
                c
            })
            .collect();
        print_table(&headers, &table);
        for (r, ratios) in rows.iter().zip(ratio_runs).filter(|(r, _)| r.kind == Kind::Interleaved) {
            let m = r.median();
            println!(
                "  {}: each client alternates one etcd pair and one etcd-floor pair: etcd mean {:.0} us (p50 {:.0}, \
                 p99 {:.0}, {} pairs), floor mean {:.0} us (p50 {:.0}, p99 {:.0}, {} pairs): etcd = {:.2}x floor{}",
                r.kind.name(),
                m.mean_us(0),
                m.hist.quantile(0.5) / 1e3,
                m.hist.quantile(0.99) / 1e3,
                thousands(m.busy[0].0 as f64),
                m.mean_us(1),
                m.hist_floor.quantile(0.5) / 1e3,
                m.hist_floor.quantile(0.99) / 1e3,
                thousands(m.busy[1].0 as f64),
                m.interleaved_ratio(),
                if repeat > 1 {
                    format!(
                        " (median of runs; per run, in order: {})",
                        ratios.iter().map(|x| format!("{x:.2}")).collect::<Vec<_>>().join(" ")
                    )
                } else {
                    String::new()
                }
            );
        }
        match scrape_error {
            Some(e) => println!("  requests per op: not counted ({e})"),
            None => {
                println!(
                    "  requests per {} at the member(s), over all {repeat} run(s), warm-up excluded (grpc_server_started_total; \
                     \"msgs\": grpc_server_msg_received_total of a stream; \"mvcc\": the store's operations):",
                    if contention { "grant" } else { "pair" }
                );
                for r in rows.iter().filter(|r| r.counts.is_some()) {
                    let per = r.counts.as_ref().map(|c| c.per_op(r.total_ops())).unwrap_or_default();
                    let text: Vec<String> = per.iter().map(|(k, v)| format!("{k} {v:.4}")).collect();
                    println!(
                        "    {:<10} ({} ops) {}",
                        r.kind.name(),
                        thousands(r.total_ops() as f64),
                        text.join(", ")
                    );
                }
            }
        }
        let mut notes = vec![
            format!(
                "etcd: EtcdClient::lock(name) -> guard, guard.unlock() (Locker contract) at {}; lease TTL {} s; \
                 one EtcdClient (session, runtime thread, gRPC connection) per client",
                s.urls.join(","),
                EtcdOptions::default().ttl.as_secs()
            ),
            "etcd-floor: EtcdClient::put_delete(key) with the same clients: one Put (with the session's lease) and \
             one DeleteRange per pair, the raw writes of a lock + unlock; x floor = ops/s over etcd-floor's (medians)"
                .into(),
            format!("remote: RemoteClient::lock(name) -> guard, guard.unlock() through the gateway at {gateway}"),
            "clients are threads of the bench process, started together after a 200 ms warm-up each".into(),
        ];
        if contention {
            notes.push(
                "contention: op = one grant (lock; check nobody else is inside; counter += 1; unlock); wait = time \
                 inside each lock call; etcd-floor: the clients put+delete one shared key (no exclusion)"
                    .into(),
            );
        } else {
            notes.push("op = one lock + unlock pair; p50/p99 per pair".into());
        }
        if repeat > 1 {
            notes.push(format!(
                "{repeat} runs of each row, in turn (etcd, floor, remote{}, etcd, ...); the median shown",
                if contention { "" } else { ", interleaved" }
            ));
        }
        for n in notes {
            println!("  note: {n}");
        }
        println!();
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn metrics_are_parsed_by_method() {
            let body = "# HELP x\n\
                grpc_server_started_total{grpc_method=\"Txn\",grpc_service=\"etcdserverpb.KV\",grpc_type=\"unary\"} 3\n\
                grpc_server_started_total{grpc_method=\"Watch\",grpc_service=\"etcdserverpb.Watch\",grpc_type=\"bidi_stream\"} 2\n\
                grpc_server_msg_received_total{grpc_method=\"Txn\",grpc_service=\"etcdserverpb.KV\",grpc_type=\"unary\"} 3\n\
                grpc_server_msg_received_total{grpc_method=\"Watch\",grpc_service=\"etcdserverpb.Watch\",grpc_type=\"bidi_stream\"} 5\n\
                etcd_mvcc_txn_total 7\n\
                etcd_mvcc_db_total_size_in_bytes 20480\n";
            let mut c = Counts::default();
            parse_metrics(body, true, &mut c);
            assert_eq!(c.started.get("Txn"), Some(&3.0));
            assert_eq!(c.started.get("Watch"), Some(&2.0));
            assert_eq!(c.stream_msgs.get("Watch"), Some(&5.0));
            assert_eq!(c.stream_msgs.get("Txn"), None, "unary messages are the calls");
            assert_eq!(c.mvcc.get("txn"), Some(&7.0));
            assert_eq!(c.mvcc.len(), 1);
            let mut later = c.clone();
            *later.started.get_mut("Txn").unwrap() += 4.0;
            let d = later.minus(&c);
            assert_eq!(d.per_op(2), vec![("Txn".to_string(), 2.0)]);
        }
    }
}
