//! Multi-process scenarios: the parent makes the system's objects and a control block, re-executes
//! itself as `shmlock-bench worker ...` once per process, starts them together, and collects one
//! JSON line from each worker's stdout.

use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering::{AcqRel, Acquire, Relaxed, Release};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::cleanup::{self, Registered};
use crate::fixture::{with_peer, Fixture, Job, Namer, Opened, System};
use crate::hist::Hist;
use crate::peer::Peer;
use crate::report::{Extra, Run};
use crate::stream_loop;
use crate::sys::{self, Control, ControlMap};

/// The multi-process scenarios.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Multi {
    /// Each process streams lock/unlock on its own name.
    Parallel,
    /// All processes lock one name; tiny critical section.
    Contention,
}

impl Multi {
    /// The lock names of a run with `procs` processes.
    pub(crate) fn names(self, procs: usize) -> Vec<String> {
        match self {
            Multi::Parallel => (0..procs).map(|i| format!("parallel-{i}")).collect(),
            Multi::Contention => vec!["contention".to_string()],
        }
    }

    /// The name worker `index` locks.
    fn lock_index(self, index: usize) -> usize {
        match self {
            Multi::Parallel => index,
            Multi::Contention => 0,
        }
    }
}

/// Arguments of the hidden `worker` subcommand.
#[derive(Debug, clap::Args)]
pub(crate) struct WorkerArgs {
    #[arg(long, value_enum)]
    peer: System,
    #[arg(long, value_enum)]
    scenario: Multi,
    /// This worker's number, 0..procs.
    #[arg(long)]
    index: usize,
    #[arg(long)]
    nprocs: usize,
    /// Segment, directory or /dev/shm object of the system's objects.
    #[arg(long)]
    target: String,
    /// The control block's /dev/shm name.
    #[arg(long)]
    ctl: String,
    /// Grants to do; without it, run until the control block's stop flag.
    #[arg(long)]
    grants: Option<u64>,
    /// The parent's pid: exit if it is already gone.
    #[arg(long)]
    parent: u32,
    /// Pin to this CPU.
    #[arg(long)]
    cpu: Option<usize>,
    /// Pairs per pipelined batch (parallel).
    #[arg(long, default_value_t = 1)]
    depth: usize,
}

/// What a worker prints: one JSON line.
#[derive(Debug, Serialize, Deserialize)]
struct WorkerReport {
    index: usize,
    ops: u64,
    /// CLOCK_MONOTONIC (system-wide) at the start and end of the timed loop.
    start_ns: u64,
    end_ns: u64,
    /// Lock-call wait histogram (contention only), as (bucket, count).
    hist: Vec<(u16, u64)>,
}

fn monotonic_ns() -> Result<u64> {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)?;
    Ok(t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
}

const WARMUP: u64 = 1_000;

struct WorkerJob<'a> {
    ctl: &'a Control,
    scenario: Multi,
    index: usize,
    ops: Option<u64>,
    depth: usize,
}

impl Job for WorkerJob<'_> {
    type Out = WorkerReport;

    fn run<P: Peer>(self, p: &mut P) -> Result<WorkerReport> {
        let k = self.scenario.lock_index(self.index);
        match self.scenario {
            Multi::Parallel => {
                stream_loop(p, k, WARMUP, self.depth)?;
            }
            Multi::Contention => {
                stream_loop(p, k, WARMUP, 1)?;
            }
        }
        let mut hist = Hist::new();
        self.ctl.ready.fetch_add(1, AcqRel);
        while self.ctl.go.load(Acquire) == 0 {
            std::thread::sleep(Duration::from_micros(20));
        }
        let start_ns = monotonic_ns()?;
        let ops = match self.scenario {
            Multi::Parallel => {
                let n = self.ops.context("parallel needs --ops")?;
                stream_loop(p, k, n, self.depth)?
            }
            Multi::Contention => contention_loop(p, self.ctl, self.ops, &mut hist)?,
        };
        let end_ns = monotonic_ns()?;
        Ok(WorkerReport {
            index: self.index,
            ops,
            start_ns,
            end_ns,
            hist: hist.sparse(),
        })
    }
}

/// lock; counter += 1 (plain load + store); unlock; until `ops` or the stop flag. Records the
/// time spent in each lock call.
#[inline(never)]
fn contention_loop<P: Peer>(p: &mut P, ctl: &Control, ops: Option<u64>, hist: &mut Hist) -> Result<u64> {
    let max = ops.unwrap_or(u64::MAX);
    let mut n = 0;
    while n < max && (ops.is_some() || ctl.stop.load(Relaxed) == 0) {
        let t0 = Instant::now();
        p.lock(0)?;
        let waited = t0.elapsed();
        // Not an atomic increment: only mutual exclusion keeps the count right.
        ctl.counter.store(ctl.counter.load(Relaxed) + 1, Relaxed);
        p.unlock(0)?;
        hist.record(waited.as_nanos() as u64);
        n += 1;
    }
    Ok(n)
}

/// The `worker` subcommand.
pub(crate) fn worker_main(a: WorkerArgs) -> Result<()> {
    nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL).context("prctl(PR_SET_PDEATHSIG)")?;
    if nix::unistd::getppid().as_raw() as u32 != a.parent {
        bail!("parent {} is gone", a.parent);
    }
    if let Some(cpu) = a.cpu {
        sys::pin_to_cpu(cpu).with_context(|| format!("sched_setaffinity to CPU {cpu}"))?;
    }
    let ctl = ControlMap::open(&a.ctl)?;
    let mut opened = Opened::open(a.peer, &a.target)?;
    let job = WorkerJob {
        ctl: ctl.get(),
        scenario: a.scenario,
        index: a.index,
        ops: a.grants,
        depth: a.depth,
    };
    let label = format!("bench-worker-{}", a.index);
    let report = with_peer(&mut opened, a.scenario.names(a.nprocs), &label, job)?;
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

/// Parameters of one multi-process run.
pub(crate) struct MultiRun<'a> {
    pub(crate) namer: &'a Namer,
    pub(crate) system: System,
    pub(crate) scenario: Multi,
    pub(crate) procs: usize,
    pub(crate) ops: Option<u64>,
    pub(crate) seconds: f64,
    pub(crate) pin: bool,
    /// Pairs per pipelined batch (parallel).
    pub(crate) depth: usize,
}

/// Running workers; killed and reaped if dropped before they are collected.
struct Workers(Vec<Option<(Child, Registered)>>);

impl Drop for Workers {
    fn drop(&mut self) {
        for (mut child, reg) in self.0.iter_mut().filter_map(Option::take) {
            drop(reg); // SIGKILL
            let _ = child.wait();
        }
    }
}

impl MultiRun<'_> {
    /// One run: set up, start all workers together, collect, tear down.
    pub(crate) fn run(&self) -> Result<Run> {
        let names = self.scenario.names(self.procs);
        let caps = shmlock::Capacities {
            max_owners: (self.procs as u32 + 8).max(64),
            ..Default::default()
        };
        let fixture = Fixture::create(self.system, self.namer, &names, &caps)?;
        let ctl_name = self.namer.shm("ctl");
        let (ctl_map, _ctl_reg) = cleanup::shm_object(&ctl_name, || ControlMap::create(&ctl_name))?;
        let ctl = ctl_map.get();

        let exe = std::env::current_exe().context("find the bench executable")?;
        let ncpu = std::thread::available_parallelism().map_or(1, |n| n.get());
        let mut workers = Workers(Vec::with_capacity(self.procs));
        for i in 0..self.procs {
            let mut cmd = Command::new(&exe);
            cmd.arg("worker")
                .args(["--peer", self.system.name()])
                .args(["--scenario", self.scenario_name()])
                .args(["--index", &i.to_string(), "--nprocs", &self.procs.to_string()])
                .args(["--target", &fixture.target, "--ctl", &ctl_name])
                .args(["--parent", &std::process::id().to_string()]);
            if let Some(ops) = self.ops {
                cmd.args(["--grants", &ops.to_string()]);
            }
            if self.depth > 1 {
                cmd.args(["--depth", &self.depth.to_string()]);
            }
            if self.pin {
                cmd.args(["--cpu", &(i % ncpu).to_string()]);
            }
            let child = cmd
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .spawn()
                .with_context(|| format!("start worker {i} ({})", exe.display()))?;
            let reg = cleanup::child(child.id());
            workers.0.push(Some((child, reg)));
        }

        let deadline = Instant::now() + Duration::from_secs(60);
        while (ctl.ready.load(Acquire) as usize) < self.procs {
            for (i, w) in workers.0.iter_mut().enumerate() {
                if let Some((child, _)) = w {
                    if let Some(status) = child.try_wait()? {
                        bail!("worker {i} exited before the start: {status}");
                    }
                }
            }
            if Instant::now() > deadline {
                bail!("workers not ready after 60 s");
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        ctl.go.store(1, Release);
        if self.ops.is_none() {
            std::thread::sleep(Duration::from_secs_f64(self.seconds));
            ctl.stop.store(1, Release);
        }

        let mut reports = Vec::with_capacity(self.procs);
        for (i, w) in workers.0.iter_mut().enumerate() {
            let (child, reg) = w.take().expect("each worker collected once");
            let out = child.wait_with_output()?;
            reg.disarm();
            if !out.status.success() {
                bail!("worker {i} failed: {}", out.status);
            }
            let line = String::from_utf8_lossy(&out.stdout);
            let line = line.lines().last().unwrap_or_default();
            let r: WorkerReport = serde_json::from_str(line).with_context(|| format!("worker {i} report {line:?}"))?;
            reports.push(r);
        }
        let total: u64 = reports.iter().map(|r| r.ops).sum();
        let start = reports.iter().map(|r| r.start_ns).min().unwrap_or(0);
        let end = reports.iter().map(|r| r.end_ns).max().unwrap_or(0);
        let seconds = end.saturating_sub(start) as f64 / 1e9;
        let extra = match self.scenario {
            Multi::Parallel => Extra::None,
            Multi::Contention => {
                let mut hist = Hist::new();
                for r in &reports {
                    hist.merge_sparse(&r.hist);
                }
                let mut grants: Vec<u64> = vec![0; self.procs];
                for r in &reports {
                    grants[r.index] = r.ops;
                }
                let (lo, hi) = (
                    grants.iter().copied().min().unwrap_or(0),
                    grants.iter().copied().max().unwrap_or(0),
                );
                let counter = ctl.counter.load(Acquire);
                Extra::Contention {
                    p50_wait_us: hist.quantile(0.50) / 1e3,
                    p99_wait_us: hist.quantile(0.99) / 1e3,
                    share_spread: if lo == 0 { f64::INFINITY } else { hi as f64 / lo as f64 },
                    share_max_dev: max_dev_from_mean(&grants),
                    exclusion_ok: counter == total,
                    grants,
                }
            }
        };
        Ok(Run {
            ops: total,
            seconds,
            extra,
        })
    }

    fn scenario_name(&self) -> &'static str {
        match self.scenario {
            Multi::Parallel => "parallel",
            Multi::Contention => "contention",
        }
    }
}

/// The largest distance of one process's grants from the mean, as a fraction of the mean (0.25:
/// some process got 25% more or less than an equal share); 0 without grants.
fn max_dev_from_mean(grants: &[u64]) -> f64 {
    let mean = grants.iter().sum::<u64>() as f64 / grants.len().max(1) as f64;
    if mean == 0.0 {
        return 0.0;
    }
    grants
        .iter()
        .map(|&g| (g as f64 - mean).abs() / mean)
        .fold(0.0, f64::max)
}

#[cfg(test)]
mod tests {
    #[test]
    fn max_dev_is_the_worst_share_against_the_mean() {
        assert_eq!(super::max_dev_from_mean(&[100, 100]), 0.0);
        assert!((super::max_dev_from_mean(&[50, 100, 150]) - 0.5).abs() < 1e-9);
        assert_eq!(super::max_dev_from_mean(&[0, 0]), 0.0);
    }
}
