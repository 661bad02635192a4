//! The `reap` scenario: how long a waiter waits for a lock whose holder was SIGKILLed.
//!
//! Each round starts a holder process (the hidden `reap-holder` subcommand) that locks a name
//! and sleeps; the bench queues a waiter for the name on a thread of its own, SIGKILLs the holder
//! and measures from the kill to the waiter's grant (which must carry the owner-died notice).
//! With `--daemon` a `shmlockd` (from the bench's own directory) supervises the segment and
//! reaps through the holder's pidfd; with `--no-daemon` the waiter reaps the holder itself.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use shmlock::{Client, LockTable};

use crate::cleanup;
use crate::hist::Hist;
use crate::report::thousands;

/// Arguments of the hidden holder process.
#[derive(Debug, clap::Args)]
pub(crate) struct HolderArgs {
    /// The segment.
    #[arg(long)]
    segment: String,
    /// The name to hold.
    #[arg(long)]
    name: String,
}

/// The hidden `reap-holder` subcommand: lock, say so on stdout, sleep until killed.
pub(crate) fn holder_main(a: HolderArgs) -> Result<()> {
    nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL).context("prctl(PR_SET_PDEATHSIG)")?;
    let client = Client::open(&a.segment)?;
    let g = client.lock(&a.name)?;
    println!("held {}", g.token());
    std::thread::sleep(Duration::from_secs(600));
    Ok(())
}

/// Runs `rounds` rounds with or without the daemon; prints a table row or a JSON line.
pub(crate) fn run(segment: &str, rounds: usize, daemon: bool, json: bool) -> Result<()> {
    ensure!(rounds >= 1, "--rounds must be at least 1");
    let caps = shmlock::Capacities {
        max_locks: 1024,
        max_holds: 1024,
        max_owners: 64,
        ..Default::default()
    };
    let (table, _seg) = cleanup::segment(segment, || Ok(LockTable::create(segment, &caps)?))?;
    let table = Arc::new(table);
    let exe = std::env::current_exe()?;
    let mut supervisor = None;
    if daemon {
        let path = exe.with_file_name("shmlockd");
        ensure!(
            path.exists(),
            "{} not found: build it (cargo build --release)",
            path.display()
        );
        let child = Command::new(&path)
            .args(["--segment", segment, "--log-level", "error", "--no-gateway"])
            .stdin(Stdio::null())
            .spawn()
            .with_context(|| format!("start {}", path.display()))?;
        let reg = cleanup::child(child.id());
        let deadline = Instant::now() + Duration::from_secs(10);
        while table.supervisor().is_none_or(|p| p.pid != child.id()) {
            ensure!(Instant::now() < deadline, "shmlockd did not claim {segment}");
            std::thread::sleep(Duration::from_millis(2));
        }
        supervisor = Some((child, reg));
    }
    let mut hist = Hist::new();
    let mut max = 0u64;
    for round in 0..rounds {
        let name = format!("reap-{round}");
        let mut holder = Command::new(&exe)
            .args(["reap-holder", "--segment", segment, "--name", &name])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .context("start holder")?;
        let reg = cleanup::child(holder.id());
        let mut line = String::new();
        BufReader::new(holder.stdout.take().context("holder stdout")?).read_line(&mut line)?;
        ensure!(line.starts_with("held"), "holder said {line:?}");
        let waiting = table.stats().waiting;
        let t = Arc::clone(&table);
        let waiter = std::thread::spawn(move || -> Result<(Instant, bool)> {
            let c = Client::with_table(t, "reap-waiter")?;
            let g = c.lock(&name)?;
            Ok((Instant::now(), g.owner_died()))
        });
        let deadline = Instant::now() + Duration::from_secs(10);
        while table.stats().waiting == waiting {
            ensure!(Instant::now() < deadline, "the waiter never queued");
            std::thread::yield_now();
        }
        let killed = Instant::now();
        holder.kill().context("kill holder")?;
        let (granted, died) = waiter.join().map_err(|_| anyhow::anyhow!("waiter panicked"))??;
        let _ = holder.wait();
        reg.disarm();
        if !died {
            bail!("round {round}: the grant did not carry the owner-died notice");
        }
        let ns = granted.saturating_duration_since(killed).as_nanos() as u64;
        hist.record(ns);
        max = max.max(ns);
    }
    if let Some((mut child, reg)) = supervisor {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = child.wait();
        reg.disarm();
    }
    // Histogram quantiles are bucket bounds: never report one above the largest sample.
    let max_us = max as f64 / 1e3;
    let (p50, p99) = (
        (hist.quantile(0.5) / 1e3).min(max_us),
        (hist.quantile(0.99) / 1e3).min(max_us),
    );
    if json {
        println!(
            "{}",
            serde_json::json!({
                "scenario": "reap", "system": "shmlock", "daemon": daemon, "ops": rounds,
                "p50_us": p50, "p99_us": p99, "max_us": max_us,
            })
        );
    } else {
        println!(
            "reap ({}), {rounds} rounds: kill -> waiter's grant  p50 {} us  p99 {} us  max {} us",
            if daemon {
                "shmlockd running"
            } else {
                "no daemon: the waiter reaps"
            },
            thousands(p50),
            thousands(p99),
            thousands(max_us),
        );
    }
    Ok(())
}
