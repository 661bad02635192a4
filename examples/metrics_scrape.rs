//! What a Prometheus scrape of shmlockd costs on a full table, and what it does to a gateway
//! client: a supervisor (`shmlock::daemon::run`, as shmlockd runs it, in this process) with its
//! gateway and metrics listener on free loopback ports; a child process holds N locks (default
//! 1,000,000; exclusive ones are fast holds, shared ones latched records); then
//! 1. `GET /metrics` over HTTP, R times back to back: each scrape's wall time (connect, request,
//!    whole answer read) and the table-reading part the scrape reports itself
//!    (`shmlock_scrape_read_seconds`);
//! 2. a `RemoteClient`'s lock + unlock round trip through the gateway, K times with nobody
//!    scraping and K times while another thread scrapes back to back (in alternate blocks).
//!
//! ```sh
//! cargo run --release --example metrics_scrape -- [N [R [K [exclusive|shared]]]]
//! ```

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use shmlock::daemon::{self, Shutdown};
use shmlock::gateway::GatewaySection;
use shmlock::remote::RemoteClient;
use shmlock::{Capacities, Client, LockTable, Segment};

type Res<T> = Result<T, Box<dyn std::error::Error>>;

fn main() -> Res<()> {
    let args: Vec<String> = std::env::args().collect();
    if let Ok(segment) = std::env::var("SCRAPE_HOLDER") {
        return holder(
            &segment,
            args.get(1).map_or(Ok(1_000_000), |n| n.parse())?,
            args.get(2).is_some_and(|m| m == "shared"),
        );
    }
    let n: u32 = args.get(1).map_or(Ok(1_000_000), |s| s.parse())?;
    let r: usize = args.get(2).map_or(Ok(50), |s| s.parse())?;
    let k: usize = args.get(3).map_or(Ok(5_000), |s| s.parse())?;
    let shared = args.get(4).is_some_and(|m| m == "shared");
    let segment = format!("/shmlock-scrape-bench-{}", std::process::id());
    let _ = Segment::unlink(&segment);
    let caps = Capacities {
        max_locks: n + 1024,
        max_holds: if shared { n + 1024 } else { 65_536 },
        max_owners: 64,
        max_name_len: 16,
        ..Default::default()
    };
    let settings = daemon::Settings {
        segment: segment.clone(),
        caps,
        gateway: Some(
            GatewaySection {
                listen: "127.0.0.1:0".into(),
                ..Default::default()
            }
            .resolve(None)?,
        ),
        remove_on_exit: true,
        metrics: Some("127.0.0.1:0".parse()?),
        watchdog: None,
    };
    let shutdown = Shutdown::new();
    let (tx, rx) = mpsc::channel();
    let supervisor = {
        let shutdown = shutdown.clone();
        std::thread::spawn(move || {
            daemon::run(&settings, &shutdown, |ready| {
                let _ = tx.send((ready.gateway, ready.metrics));
            })
        })
    };
    let (Some(gateway), Some(metrics)) = rx.recv()? else {
        return Err("the supervisor did not start its gateway and metrics".into());
    };

    // The holder: a process of its own, as a real user of the table is.
    let t0 = Instant::now();
    let mut child = Command::new(std::env::current_exe()?)
        .arg(n.to_string())
        .arg(if shared { "shared" } else { "exclusive" })
        .env("SCRAPE_HOLDER", &segment)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    let mut line = String::new();
    BufReader::new(child.stdout.take().ok_or("no stdout")?).read_line(&mut line)?;
    if line.trim() != "ready" {
        return Err(format!("holder: {line:?}").into());
    }
    let table = LockTable::open(&segment)?;
    println!(
        "holder took {} locks in {:.2?}; the table says {} held",
        n,
        t0.elapsed(),
        table.stats().held
    );

    // 1. Scrapes.
    let mut walls = Vec::with_capacity(r);
    let mut reads = Vec::with_capacity(r);
    let mut size = 0;
    for _ in 0..r {
        let t = Instant::now();
        let body = scrape(metrics)?;
        walls.push(t.elapsed());
        size = body.len();
        reads.push(Duration::from_secs_f64(
            sample(&body, "shmlock_scrape_read_seconds").ok_or("no read time")?,
        ));
        let held = sample(&body, "shmlock_locks_held").ok_or("no locks_held")?;
        if held < f64::from(n) {
            return Err(format!("scrape says {held} locks held, not {n}").into());
        }
    }
    println!("scrape of {n} held locks ({size} bytes), {r} scrapes back to back:");
    println!("  wall (HTTP, whole answer): {}", summary(&mut walls));
    println!(
        "  table read (the scrape's own shmlock_scrape_read_seconds): {}",
        summary(&mut reads)
    );

    // 2. A gateway client, without and with a scraper.
    let client = RemoteClient::connect(gateway)?;
    let round = |k: usize| -> Res<Vec<Duration>> {
        let mut v = Vec::with_capacity(k);
        for _ in 0..k {
            let t = Instant::now();
            let g = client.lock("probe")?;
            g.unlock()?;
            v.push(t.elapsed());
        }
        Ok(v)
    };
    round(k / 10)?; // warm up
                    // Blocks of 500 round trips, alternately quiet and scraped, so that both see the same
                    // background (a shared machine's other load, CPU frequency).
    let scraping = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let scrapes = Arc::new(AtomicU64::new(0));
    let scraper = {
        let (stop, scraping, scrapes) = (stop.clone(), scraping.clone(), scrapes.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                if !scraping.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_micros(200));
                } else if scrape(metrics).is_ok() {
                    scrapes.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    };
    let (mut quiet, mut busy) = (Vec::with_capacity(k), Vec::with_capacity(k));
    let mut busy_for = Duration::ZERO;
    const BLOCK: usize = 500;
    for b in 0..2 * k.div_ceil(BLOCK) {
        let on = b % 2 == 1;
        scraping.store(on, Ordering::Relaxed);
        if on {
            // The scraper is at work before the block starts.
            let seen = scrapes.load(Ordering::Relaxed);
            while scrapes.load(Ordering::Relaxed) == seen {
                std::thread::yield_now();
            }
        }
        let t = Instant::now();
        let v = round(BLOCK)?;
        if on {
            busy_for += t.elapsed();
            busy.extend(v);
        } else {
            quiet.extend(v);
        }
    }
    stop.store(true, Ordering::Relaxed);
    let _ = scraper.join();
    println!(
        "gateway lock+unlock round trip, {} each, in alternate blocks of {BLOCK}:",
        quiet.len()
    );
    println!("  nobody scraping:        {}", summary(&mut quiet));
    println!(
        "  scraping back to back:  {}  ({} scrapes in {:.2?} of scraped blocks)",
        summary(&mut busy),
        scrapes.load(Ordering::Relaxed),
        busy_for
    );

    drop(client);
    drop(child.stdin.take()); // the holder unlocks everything and exits
    child.wait()?;
    drop(table);
    shutdown.trigger();
    supervisor.join().map_err(|_| "supervisor panicked")??;
    Ok(())
}

/// The child: takes `n` locks (`shared` or exclusive), says "ready", holds them until its
/// stdin closes.
fn holder(segment: &str, n: u32, shared: bool) -> Res<()> {
    let client = Client::open(segment)?;
    let guards = (0..n)
        .map(|i| {
            let name = format!("k/{i}");
            if shared {
                client.lock_shared(name)
            } else {
                client.lock(name)
            }
        })
        .collect::<Result<Vec<_>, _>>()?;
    println!("ready");
    std::io::stdout().flush()?;
    let mut rest = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut rest);
    drop(guards);
    Ok(())
}

/// `GET /metrics`; the body.
fn scrape(addr: SocketAddr) -> Res<String> {
    let mut s = TcpStream::connect(addr)?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: bench\r\n\r\n")?;
    let mut answer = String::new();
    s.read_to_string(&mut answer)?;
    let (head, body) = answer.split_once("\r\n\r\n").ok_or("no head")?;
    if !head.starts_with("HTTP/1.1 200 ") {
        return Err(format!("scrape: {head}").into());
    }
    Ok(body.to_string())
}

/// The value of the unlabelled sample `name`.
fn sample(body: &str, name: &str) -> Option<f64> {
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

fn summary(v: &mut [Duration]) -> String {
    v.sort();
    let at = |q: f64| v[((v.len() as f64 * q) as usize).min(v.len() - 1)];
    format!(
        "min {:.2?}  p50 {:.2?}  p99 {:.2?}  max {:.2?}",
        v[0],
        at(0.5),
        at(0.99),
        v[v.len() - 1]
    )
}
