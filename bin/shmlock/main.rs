//! `shmlock`: inspect a shmlock segment (works without the daemon).

use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use shmlock::LockTable;

/// Inspect and manage a shmlock lock table.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Segment name (default: $SHMLOCK_SEGMENT or /shmlock).
    #[arg(long, global = true)]
    segment: Option<String>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Capacities, pool use, counters and an invariant check.
    ///
    /// Example: `shmlock status --json`
    Status {
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
}

fn run(args: Args) -> anyhow::Result<ExitCode> {
    let name = args.segment.unwrap_or_else(shmlock::shm::default_segment_name);
    let table = LockTable::open(&name).with_context(|| format!("opening segment {name}"))?;
    match args.cmd {
        Cmd::Status { json } => {
            let st = table.stats();
            let g = table.geometry();
            let problems = table.check();
            if json {
                let v = serde_json::json!({
                    "segment": name,
                    "size": table.segment().size(),
                    "layout_version": shmlock::shm::LAYOUT_VERSION,
                    "shards": g.shards,
                    "max_name_len": g.max_name_len,
                    "stats": st,
                    "check": problems,
                });
                println!("{v}");
            } else {
                println!(
                    "segment        {name} ({:.1} MiB, layout v{})",
                    table.segment().size() as f64 / (1 << 20) as f64,
                    shmlock::shm::LAYOUT_VERSION
                );
                println!("shards         {}", g.shards);
                println!(
                    "lock entries   {} held or waited on, {} idle, {} free (of {})",
                    st.held, st.idle, st.free, st.entry_capacity
                );
                println!(
                    "holds/waits    {} shared holds, {} waiting (of {})",
                    st.shared_holds, st.waiting, st.hold_capacity
                );
                println!("owners         {} live (of {})", st.owners, st.owner_capacity);
                println!(
                    "counters       {} grants, {} waits, {} timeouts, {} handoffs",
                    st.grants, st.waits, st.timeouts, st.handoffs
                );
                println!(
                    "check          {}",
                    if problems.is_empty() {
                        "clean".to_string()
                    } else {
                        format!("{} problems", problems.len())
                    }
                );
                for p in &problems {
                    println!("  {p}");
                }
            }
            Ok(if problems.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
    }
}

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("shmlock: {e:#}");
            ExitCode::from(2)
        }
    }
}
