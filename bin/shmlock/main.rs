//! `shmlock`: the admin CLI. Works on the segment directly; no daemon needed.
//!
//! Implemented: `status`. Planned: `locks`, `owners`, `show`, `release --force`, `check`, `watch`,
//! `run` and `--remote` (see README.md).
//!
//! Exit status: 0 ok, 2 error (printed as `shmlock: ...`). A closed stdout (`| head`) exits 0.

mod render;

use std::io::Write;
use std::process::ExitCode;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Result};
use clap::{Parser, Subcommand};
use shmlock::shm::default_segment_name;
use shmlock::{Error, LockTable};

use render::{CheckOutcome, Status};

/// How long `status` waits for `check` (which takes every shard's latch in turn). A latch is held
/// for a few dozen instructions; one that stays taken this long belongs to a dead process.
const CHECK_TIMEOUT: Duration = Duration::from_secs(10);

/// Inspect and administer a shmlock segment.
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    /// Segment name, e.g. /shmlock [default: $SHMLOCK_SEGMENT, then /shmlock].
    #[arg(long, global = true, value_name = "NAME")]
    segment: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Capacities, geometry, counts per pool state, counters, and a consistency check.
    Status {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

/// Runs `table.check()` on a helper thread, giving up after `timeout`.
fn check_with_timeout(table: &Arc<LockTable>, timeout: Duration) -> CheckOutcome {
    let (tx, rx) = mpsc::channel();
    let t = Arc::clone(table);
    let spawned = std::thread::Builder::new().name("check".into()).spawn(move || {
        let _ = tx.send(t.check());
    });
    if spawned.is_err() {
        return CheckOutcome::NotRun;
    }
    match rx.recv_timeout(timeout) {
        Ok(v) if v.is_empty() => CheckOutcome::Consistent,
        Ok(v) => CheckOutcome::Violations(v),
        Err(_) => CheckOutcome::TimedOut(timeout),
    }
}

/// Opens `segment`; a missing one is reported as the library says it (with how to start one).
fn open(segment: &str) -> Result<LockTable> {
    LockTable::open(segment).map_err(|e| match e {
        Error::SegmentMissing { .. } | Error::SegmentNameInvalid { .. } => anyhow!(e),
        e => anyhow!(e).context(format!("cannot open segment {segment}")),
    })
}

fn status(segment: &str, json: bool, out: &mut impl Write) -> Result<()> {
    let table = Arc::new(open(segment)?);
    let check = check_with_timeout(&table, CHECK_TIMEOUT);
    let status = Status::gather(&table, check);
    if json {
        serde_json::to_writer_pretty(&mut *out, &status.to_json())?;
        writeln!(out)?;
    } else {
        out.write_all(status.to_text().as_bytes())?;
    }
    out.flush()?;
    Ok(())
}

fn run(cli: Cli) -> Result<()> {
    let segment = cli.segment.unwrap_or_else(default_segment_name);
    let mut out = std::io::stdout().lock();
    match cli.command {
        Command::Status { json } => status(&segment, json, &mut out),
    }
}

/// True if `e` is a broken pipe on stdout, which ends output quietly (ripgrep's rule).
fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
            || c.downcast_ref::<serde_json::Error>().and_then(|j| j.io_error_kind())
                == Some(std::io::ErrorKind::BrokenPipe)
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("shmlock: {e:#}");
            ExitCode::from(2)
        }
    }
}
