//! The `run-overhead` scenario: the wall time of `shmlock run NAME -- true` next to
//! `flock FILE true` (util-linux flock(1)), each started, waited for and timed by this process.
//!
//! The two commands alternate, one of each per round (which goes first alternates too), so that
//! whatever else the machine does at a moment weighs on both alike; the ratio of their medians is
//! the figure to read (issue 14: at most 1.2). `true` alone is timed in the same rounds: the cost
//! of starting any process, the floor under both. The segment is the bench's own, created small
//! for the run and removed after; the lock is free at every round (nothing else holds it).
//!
//! The page cache matters: a binary's start-up is mostly page faults, and a file the linker has
//! just written (through a mapping, in small pages) faults several times slower than one read
//! from disk (in large folios), which is how installed binaries, flock(1) among them, are cached.
//! So by default the three programs are first written back, dropped from the page cache and read
//! again (`--no-reread` measures them as they are).

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use shmlock::LockTable;

use crate::cleanup;

/// Arguments of `run-overhead`.
#[derive(Debug, clap::Args)]
pub(crate) struct RunOverheadArgs {
    /// Rounds (each times one flock, one shmlock run and one bare `true`).
    #[arg(long, default_value_t = 300)]
    rounds: usize,
    /// Untimed rounds first (page cache, branch predictors, the CPU's frequency).
    #[arg(long, default_value_t = 20)]
    warmup: usize,
    /// The shmlock binary [default: `shmlock` next to this bench].
    #[arg(long, value_name = "PATH")]
    shmlock: Option<PathBuf>,
    /// The flock(1) binary.
    #[arg(long, value_name = "PATH", default_value = "flock")]
    flock: PathBuf,
    /// Measure the binaries as they are in the page cache (see the module docs).
    #[arg(long)]
    no_reread: bool,
    /// Use this existing segment (e.g. a running shmlockd's) instead of creating one.
    #[arg(long, value_name = "NAME")]
    existing_segment: Option<String>,
    /// The command both run [default: `true` from PATH].
    #[arg(long, value_name = "PATH", default_value = "true")]
    command: PathBuf,
}

/// One timed command: its samples in nanoseconds.
struct Series {
    what: &'static str,
    ns: Vec<u64>,
}

impl Series {
    fn new(what: &'static str, n: usize) -> Series {
        Series {
            what,
            ns: Vec::with_capacity(n),
        }
    }

    /// Starts `cmd`, waits for it, records the wall time; fails unless it exited 0.
    fn time(&mut self, cmd: &mut Command, record: bool) -> Result<()> {
        let t = Instant::now();
        let status = cmd.status().with_context(|| format!("start {}", self.what))?;
        let ns = t.elapsed().as_nanos() as u64;
        ensure!(status.success(), "{} failed: {status}", self.what);
        if record {
            self.ns.push(ns);
        }
        Ok(())
    }

    /// (min, p10, median, p90, max, mean), in microseconds.
    fn summary(&self) -> [f64; 6] {
        let mut v = self.ns.clone();
        v.sort_unstable();
        let q = |p: f64| v[((v.len() - 1) as f64 * p).round() as usize] as f64 / 1e3;
        let mean = v.iter().sum::<u64>() as f64 / v.len() as f64 / 1e3;
        [q(0.0), q(0.1), q(0.5), q(0.9), q(1.0), mean]
    }
}

/// `p` itself if it has a `/`, else the first executable `p` on PATH.
fn on_path(p: &std::path::Path) -> Option<PathBuf> {
    if p.as_os_str().as_encoded_bytes().contains(&b'/') {
        return Some(p.to_path_buf());
    }
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(p))
        .find(|c| nix::unistd::access(c, nix::unistd::AccessFlags::X_OK).is_ok() && c.is_file())
}

/// Writes `path` back, drops it from the page cache and reads it again.
fn reread(path: &std::path::Path) -> Result<()> {
    use std::os::fd::AsRawFd;
    let mut f = std::fs::File::open(path)?;
    f.sync_all()?;
    nix::fcntl::posix_fadvise(f.as_raw_fd(), 0, 0, nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED)?;
    std::io::copy(&mut f, &mut std::io::sink())?;
    Ok(())
}

/// Runs the scenario on segment `segment`; prints a table, or one JSON line.
pub(crate) fn run(segment: &str, a: &RunOverheadArgs, json: bool) -> Result<()> {
    ensure!(a.rounds >= 1, "--rounds must be at least 1");
    let shmlock = match &a.shmlock {
        Some(p) => p.clone(),
        None => std::env::current_exe()?.with_file_name("shmlock"),
    };
    ensure!(
        shmlock.exists(),
        "{} not found: build it (cargo build --release --bin shmlock) or name it with --shmlock",
        shmlock.display()
    );
    let caps = shmlock::Capacities {
        max_locks: 64,
        max_holds: 64,
        max_owners: 16,
        ..Default::default()
    };
    let _created = match &a.existing_segment {
        Some(_) => None,
        None => Some(cleanup::segment(segment, || Ok(LockTable::create(segment, &caps)?))?),
    };
    let segment = a.existing_segment.as_deref().unwrap_or(segment);
    let dir = std::env::temp_dir().join(format!("shmlock-bench-run-{}", std::process::id()));
    let _dir = cleanup::dir(dir.clone())?;
    let file = dir.join("lock");
    if !a.no_reread {
        for p in [&shmlock, &a.flock, &a.command] {
            let path = on_path(p).with_context(|| format!("{} not found", p.display()))?;
            reread(&path).with_context(|| format!("re-read {}", path.display()))?;
        }
    }
    let mut flock_cmd = Command::new(&a.flock);
    flock_cmd.arg(&file).arg(&a.command);
    let mut run_cmd = Command::new(&shmlock);
    run_cmd
        .args(["--segment", segment, "run", "run-overhead", "--"])
        .arg(&a.command);
    let mut true_cmd = Command::new(&a.command);
    for c in [&mut flock_cmd, &mut run_cmd, &mut true_cmd] {
        c.stdin(Stdio::null()).stdout(Stdio::null()).env_remove("SHMLOCK_HELD");
    }
    let mut flock = Series::new("flock", a.rounds);
    let mut run = Series::new("shmlock run", a.rounds);
    let mut bare = Series::new("true", a.rounds);
    for round in 0..a.warmup + a.rounds {
        let record = round >= a.warmup;
        if round % 2 == 0 {
            flock.time(&mut flock_cmd, record)?;
            run.time(&mut run_cmd, record)?;
        } else {
            run.time(&mut run_cmd, record)?;
            flock.time(&mut flock_cmd, record)?;
        }
        bare.time(&mut true_cmd, record)?;
    }
    let (f, r, t) = (flock.summary(), run.summary(), bare.summary());
    if f[2] <= 0.0 {
        bail!("flock's median is zero");
    }
    let ratio_median = r[2] / f[2];
    let ratio_mean = r[5] / f[5];
    if json {
        let one = |s: &[f64; 6]| {
            serde_json::json!({
                "min_us": s[0], "p10_us": s[1], "median_us": s[2], "p90_us": s[3], "max_us": s[4],
                "mean_us": s[5],
            })
        };
        println!(
            "{}",
            serde_json::json!({
                "scenario": "run-overhead", "rounds": a.rounds, "flock": one(&f), "run": one(&r),
                "true": one(&t), "ratio_median": ratio_median, "ratio_mean": ratio_mean,
            })
        );
    } else {
        println!(
            "run-overhead, {} rounds (alternating), wall time of each process in us:",
            a.rounds
        );
        println!(
            "  {:<22} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8}",
            "", "min", "p10", "median", "p90", "max", "mean"
        );
        for (s, v) in [(&flock, &f), (&run, &r), (&bare, &t)] {
            println!(
                "  {:<22} {:>8.0} {:>8.0} {:>8.0} {:>8.0} {:>8.0} {:>8.0}",
                s.what, v[0], v[1], v[2], v[3], v[4], v[5]
            );
        }
        println!("  shmlock run / flock: {ratio_median:.3}x (medians), {ratio_mean:.3}x (means)");
    }
    Ok(())
}
