//! The supervisor's lifecycle, as `shmlockd` runs it: [`run`] binds the gateway's address,
//! creates the segment (or adopts an existing one of the same layout version, reaping whatever
//! died while no supervisor ran), claims it as its only supervisor, reaps the owners of
//! processes that die, serves the gateway and the metrics listener ([`crate::metrics`], if
//! configured), and on [`Shutdown::trigger`] stops in order: the metrics listener, the
//! gateway (ending every remote session, so a waiting remote `LOCK` gets `SHUTTING_DOWN`),
//! then the reaper, then (with [`Settings::remove_on_exit`]) the segment's removal if no live
//! process but this one uses it.
//!
//! Everything that can be checked is checked before the segment is touched (the geometry, the
//! gateway's and the metrics listener's addresses, bound then), and a start that fails after
//! creating the segment removes it again (an adopted one is left as it was). Tests drive it in-process: the ready callback gets
//! the bound address of a gateway configured on port 0.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use tracing::{error, info, warn};

use crate::gateway::{self, Gateway, GatewayConfig};
use crate::metrics::{self, Metrics};
use crate::supervisor::Reaper;
use crate::systemd;
use crate::table::pid_latch_id;
use crate::{Capacities, Error, LockTable, Segment};

/// What [`run`] supervises, resolved (flags, environment and config file applied).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// The segment's name, e.g. `/shmlock`.
    pub segment: String,
    /// Its capacities if it is created (and the owner and mode it must have if adopted).
    pub caps: Capacities,
    /// The gateway; None: no gateway.
    pub gateway: Option<GatewayConfig>,
    /// Remove the segment at shutdown if no live process but this one uses it.
    pub remove_on_exit: bool,
    /// The Prometheus metrics listener's address ([`crate::metrics`]); None: no metrics.
    pub metrics: Option<SocketAddr>,
    /// systemd's watchdog interval: the reaper thread sends `WATCHDOG=1` every half of it
    /// while it goes round ([`crate::systemd`]); None: no watchdog.
    pub watchdog: Option<Duration>,
}

/// Tells a running [`run`] to stop; cloneable, any clone may [`trigger`](Self::trigger) it
/// (`shmlockd`'s signal thread does on SIGINT/SIGTERM). A trigger before the start completes
/// makes `run` stop as soon as it has started.
#[derive(Debug, Clone, Default)]
pub struct Shutdown {
    state: Arc<(Mutex<bool>, Condvar)>,
}

impl Shutdown {
    /// A shutdown not triggered yet.
    pub fn new() -> Shutdown {
        Shutdown::default()
    }

    /// Asks `run` to stop (idempotent).
    pub fn trigger(&self) {
        let (flag, cv) = &*self.state;
        *flag.lock().unwrap_or_else(|p| p.into_inner()) = true;
        cv.notify_all();
    }

    /// Whether [`trigger`](Self::trigger) was called.
    pub fn is_triggered(&self) -> bool {
        *self.state.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn wait(&self) {
        let (flag, cv) = &*self.state;
        let mut f = flag.lock().unwrap_or_else(|p| p.into_inner());
        while !*f {
            f = cv.wait(f).unwrap_or_else(|p| p.into_inner());
        }
    }
}

/// What the ready callback of [`run`] learns once the daemon serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ready {
    /// The segment's name.
    pub segment: String,
    /// Whether this start created it (else it adopted it).
    pub created: bool,
    /// The gateway's bound address (the port chosen for port 0); None without a gateway.
    pub gateway: Option<SocketAddr>,
    /// The metrics listener's bound address; None without metrics.
    pub metrics: Option<SocketAddr>,
}

/// How a [`run`] that started and was shut down ended.
#[derive(Debug)]
pub enum Outcome {
    /// The segment stays for local users (no `remove_on_exit`).
    Left,
    /// `remove_on_exit`: the segment was removed.
    Removed,
    /// `remove_on_exit`: live processes still use the segment ([`Error::SegmentInUse`] names
    /// them), so it was left in place (`shmlockd` exits 3).
    LeftInUse(Error),
}

/// Runs the supervisor of `settings.segment` until `shutdown` is triggered; `on_ready` is called
/// once it serves. Errors (before `on_ready`) leave no segment this start created.
pub fn run(settings: &Settings, shutdown: &Shutdown, on_ready: impl FnOnce(&Ready)) -> Result<Outcome> {
    let name = settings.segment.as_str();
    let caps = &settings.caps;
    // Everything that can be checked before the segment exists is checked first: the geometry
    // and the gateway's address (bound now, served once the table is there).
    caps.geometry()?;
    let bound = match &settings.gateway {
        None => None,
        Some(config) => {
            let listen = config.listen;
            Some(gateway::bind(config.clone()).with_context(|| format!("cannot start the gateway on {listen}"))?)
        }
    };
    let metrics_bound = match settings.metrics {
        None => None,
        Some(addr) => {
            Some(metrics::bind(addr).with_context(|| format!("cannot start the metrics listener on {addr}"))?)
        }
    };
    let (table, created) = create_or_adopt(name, caps)?;
    let table = Arc::new(table);
    let (stop, reaper, gateway, metrics) =
        match start(name, caps, &table, created, bound, metrics_bound, settings.watchdog) {
            Ok(started) => started,
            Err(e) => {
                forget_failed_start(name, &table, created);
                return Err(e);
            }
        };
    on_ready(&Ready {
        segment: name.to_string(),
        created,
        gateway: gateway.as_ref().map(Gateway::local_addr),
        metrics: metrics.as_ref().map(Metrics::local_addr),
    });

    shutdown.wait();
    drop(metrics);
    // Ends every remote session (releasing its locks) before the table goes.
    drop(gateway);
    stop.store(true, Ordering::Relaxed);
    let _ = reaper.join();
    let removed = settings.remove_on_exit.then(|| table.remove_if_unused());
    table.release_supervisor();
    drop(table);
    match removed {
        None => {
            info!(segment = %name, "left segment in place for local users");
            Ok(Outcome::Left)
        }
        Some(Ok(())) => {
            info!(segment = %name, "removed segment");
            Ok(Outcome::Removed)
        }
        Some(Err(e @ Error::SegmentInUse { .. })) => Ok(Outcome::LeftInUse(e)),
        Some(Err(e)) => Err(anyhow!(e).context(format!("cannot remove segment {name}"))),
    }
}

/// Longest wait of one reaper round: bounds how late a new owner is watched and how late a
/// shutdown is noticed (a watched process's death is seen at once).
const REAPER_ROUND: Duration = Duration::from_millis(20);

fn mib(bytes: usize) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// Opens segment `name` if it exists (same layout version), else creates it with `caps`.
/// Returns the table and whether it was created.
fn create_or_adopt(name: &str, caps: &Capacities) -> Result<(LockTable, bool)> {
    let opened = match LockTable::adopt(name, caps) {
        // Retired by a supervisor killed before it could unlink it: it took no owner since.
        Err(Error::SegmentRemoved { pid, .. }) => {
            warn!(segment = %name, pid, "removing a segment retired by a supervisor that did not finish");
            Segment::unlink(name).with_context(|| format!("cannot remove retired segment {name}"))?;
            Err(Error::SegmentMissing { name: name.into() })
        }
        other => other,
    };
    let opened = match opened {
        Err(Error::SegmentMissing { .. }) => match LockTable::create(name, caps) {
            Ok(t) => return Ok((t, true)),
            // Another process created it between our open and our create.
            Err(Error::SegmentExists { .. }) => LockTable::adopt(name, caps),
            Err(e) => return Err(anyhow!(e).context(format!("cannot create segment {name}"))),
        },
        other => other,
    };
    let table = opened.map_err(|e| {
        let e = match e {
            Error::WrongVersion { .. } => anyhow!(
                "{e} (it was made by another shmlock build; once its users have stopped, remove \
                 /dev/shm{name}, or use another --segment)"
            ),
            Error::SegmentNameInvalid { .. } => return anyhow!(e),
            e => anyhow!(e),
        };
        e.context(format!("cannot adopt segment {name}"))
    })?;
    refuse_corrupt(name, &table)?;
    Ok((table, false))
}

/// Refuses a segment whose table or shard headers are garbage (see `LockTable::check_headers`):
/// supervising it would serve locks and queries from lists and counts nobody can trust.
fn refuse_corrupt(name: &str, table: &LockTable) -> Result<()> {
    let findings = table.check_headers();
    match findings.first() {
        None => Ok(()),
        Some(first) => bail!(
            "cannot adopt segment {name}: its headers are corrupt ({first}{}); `shmlock check \
             --segment {name}` lists what is wrong; once its users have stopped, remove \
             /dev/shm{name}",
            match findings.len() {
                1 => String::new(),
                n => format!(", and {} more", n - 1),
            }
        ),
    }
}
/// Serves the bound gateway (if any) on `table`.
fn start_gateway(bound: Option<gateway::Bound>, table: &Arc<LockTable>) -> Result<Option<Gateway>> {
    let Some(bound) = bound else {
        info!("gateway disabled");
        return Ok(None);
    };
    let listen = bound.local_addr();
    let gw = bound
        .serve(table.clone())
        .with_context(|| format!("cannot start the gateway on {listen}"))?;
    // Tests and scripts that pass port 0 read the bound address from this line.
    info!(listen = %gw.local_addr(), "gateway ready");
    Ok(Some(gw))
}

/// Serves the bound metrics listener (if any) on `table`.
fn start_metrics(bound: Option<metrics::Bound>, table: &Arc<LockTable>) -> Result<Option<Metrics>> {
    let Some(bound) = bound else { return Ok(None) };
    let listen = bound.local_addr();
    let m = bound
        .serve(table.clone())
        .with_context(|| format!("cannot start the metrics listener on {listen}"))?;
    if !listen.ip().is_loopback() {
        warn!(listen = %listen, "the metrics listener serves other hosts (it has no authentication)");
    }
    // Tests and scripts that pass port 0 read the bound address from this line.
    info!(listen = %m.local_addr(), "metrics ready");
    Ok(Some(m))
}

/// What a started supervisor runs: the reaper's stop flag and thread, the gateway and the
/// metrics listener.
type Started = (
    Arc<AtomicBool>,
    std::thread::JoinHandle<()>,
    Option<Gateway>,
    Option<Metrics>,
);

/// Claims `table`, reaps what died while no supervisor ran (if adopted), and starts the reaper
/// and the gateway. On an error, whatever it started is stopped again.
fn start(
    name: &str,
    caps: &Capacities,
    table: &Arc<LockTable>,
    created: bool,
    bound: Option<gateway::Bound>,
    metrics_bound: Option<metrics::Bound>,
    watchdog: Option<Duration>,
) -> Result<Started> {
    table
        .claim_supervisor()
        .with_context(|| format!("cannot supervise segment {name}"))?;
    let geo = table.geometry();
    let (max_locks, max_holds) = table.requested();
    let size = table.segment().size();
    info!(
        segment = %name,
        size_mib = format_args!("{:.1}", mib(size)),
        max_locks,
        max_holds,
        max_owners = geo.owners,
        max_name_len = geo.max_name_len,
        shards = geo.shards,
        entries_per_shard = geo.entries_per_shard,
        holds_per_shard = geo.holds_per_shard,
        "{} segment",
        if created { "created" } else { "adopted" }
    );
    if !created {
        let asked = caps.geometry()?;
        let differs = (max_locks, max_holds) != (u64::from(caps.max_locks), u64::from(caps.max_holds))
            || (geo.owners, geo.max_name_len, geo.shards) != (asked.owners, asked.max_name_len, asked.shards);
        if differs {
            warn!(
                segment = %name,
                "the existing segment was sized differently from the configuration; it keeps its own \
                 capacities (remove it while unused to resize)"
            );
        }
        let st = table.stats();
        info!(segment = %name, owners = st.owners, held = st.held, waiting = st.waiting, "segment state at adoption");
        let reaped = table.reap_dead(pid_latch_id())?;
        info!(segment = %name, reaped, "reaped owners that died while no supervisor ran");
    }
    let stop = Arc::new(AtomicBool::new(false));
    let reaper = {
        let (table, stop) = (table.clone(), stop.clone());
        let mut reaper = Reaper::new(table)?;
        std::thread::Builder::new()
            .name("reaper".into())
            .spawn(move || {
                // systemd's watchdog is fed from this loop, so a reaper that stops going round
                // (stuck or dead) gets shmlockd restarted.
                let mut fed = std::time::Instant::now();
                if watchdog.is_some() {
                    systemd::notify_or_warn("WATCHDOG=1\n");
                }
                while !stop.load(Ordering::Relaxed) {
                    if let Err(e) = reaper.run_once(REAPER_ROUND) {
                        error!("reaper: {e}");
                        std::thread::sleep(REAPER_ROUND);
                    }
                    if watchdog.is_some_and(|w| fed.elapsed() >= w / 2) {
                        systemd::notify_or_warn("WATCHDOG=1\n");
                        fed = std::time::Instant::now();
                    }
                }
            })
            .context("cannot start the reaper thread")?
    };
    let served = start_gateway(bound, table).and_then(|gw| Ok((gw, start_metrics(metrics_bound, table)?)));
    let (gateway, metrics) = match served {
        Ok(both) => both,
        Err(e) => {
            stop.store(true, Ordering::Relaxed);
            let _ = reaper.join();
            return Err(e);
        }
    };
    Ok((stop, reaper, gateway, metrics))
}

/// After a failed start: gives up the claim and removes the segment if this start created it
/// (unless another supervisor has claimed it since, or live processes have owners in it: then
/// it is theirs). An adopted segment is left as it was.
fn forget_failed_start(name: &str, table: &LockTable, created: bool) {
    table.release_supervisor();
    let me = std::process::id();
    let supervised = table.supervisor().is_some_and(|p| p.pid != me && p.is_alive());
    if !created || supervised {
        return;
    }
    match table.remove_if_unused() {
        Ok(()) => info!(segment = %name, "removed the segment this start created"),
        Err(e) => warn!(segment = %name, "cannot remove the segment this start created: {e}"),
    }
}
