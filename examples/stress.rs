//! Lock traffic for soak tests: `procs` processes lock and unlock random names in segment
//! `segment` for `secs` seconds, each opening a fresh handle (a new owner) every 10,000 ops so
//! the supervisor keeps registering and retiring owners. Prints total operations.
//!
//! ```sh
//! cargo run --release --bin shmlockd -- --segment /soak &
//! cargo run --release --example stress -- /soak 60 4
//! ```

use std::process::Command;
use std::time::{Duration, Instant};

use shmlock::Client;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let usage = "usage: stress SEGMENT SECS PROCS";
    let segment = args.get(1).ok_or(usage)?;
    let secs: u64 = args.get(2).ok_or(usage)?.parse()?;
    let procs: usize = args.get(3).ok_or(usage)?.parse()?;
    if std::env::var_os("STRESS_WORKER").is_some() {
        let n = worker(segment, Duration::from_secs(secs))?;
        println!("{n}");
        return Ok(());
    }
    let exe = std::env::current_exe()?;
    let children: Vec<_> = (0..procs)
        .map(|_| {
            Command::new(&exe)
                .args(&args[1..])
                .env("STRESS_WORKER", "1")
                .stdout(std::process::Stdio::piped())
                .spawn()
        })
        .collect::<Result<_, _>>()?;
    let mut total = 0u64;
    for c in children {
        let out = c.wait_with_output()?;
        if !out.status.success() {
            return Err(format!("worker failed: {}", out.status).into());
        }
        total += String::from_utf8_lossy(&out.stdout).trim().parse::<u64>()?;
    }
    println!("{total} lock+unlock pairs in {secs} s by {procs} processes");
    Ok(())
}

fn worker(segment: &str, run: Duration) -> Result<u64, shmlock::Error> {
    let end = Instant::now() + run;
    let mut rng = u64::from(std::process::id()) | 1;
    let mut ops = 0u64;
    while Instant::now() < end {
        let client = Client::open(segment)?;
        for _ in 0..10_000 {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let name = format!("soak/{}", rng % 1000);
            if rng % 5 == 0 {
                drop(client.lock_shared(&name)?);
            } else {
                drop(client.lock(&name)?);
            }
            ops += 1;
        }
    }
    Ok(ops)
}
