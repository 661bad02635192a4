//! `shmlockd`: the shmlock supervisor.
//!
//! It creates the segment (or adopts an existing one of the same layout version, reaping whatever
//! died while no supervisor ran), claims it as its only supervisor (a second `shmlockd` on the
//! same segment refuses to start and names the pid that runs), reaps the owners of processes that
//! die (watching each through a pidfd), and runs the TCP gateway for remote clients (on
//! 127.0.0.1:7411 unless configured otherwise; `--no-gateway` turns it off), until SIGINT or
//! SIGTERM. On exit it leaves the segment for local users unless `--remove-on-exit` is given,
//! and even then while live processes still use it. With `--metrics ADDR` (or `[daemon]
//! metrics`) it serves Prometheus metrics on that address; under systemd (`$NOTIFY_SOCKET`) it
//! notifies READY=1 once it serves, STOPPING=1 on SIGINT/SIGTERM, and WATCHDOG=1 while its
//! reaper goes round when the unit sets `WatchdogSec=` (config/shmlockd.service).
//! It checks what it can before it touches the segment (the config, the geometry, the gateway's
//! and the metrics listener's addresses, which it binds then), so a bad config or a busy port exits 2 and leaves no segment
//! behind. On SIGINT/SIGTERM it exits within `gateway::STOP_BOUND` (2 s) whatever the gateway's
//! clients do.
//!
//! It adopts only a segment whose file is owned as `--segment-owner` / `$SHMLOCK_SEGMENT_OWNER` /
//! `[segment] owner` say (by default its own user or root), is no symbolic link, has one link,
//! and has no permission bit beyond the configured `mode`.
//!
//! Exit status: 0 after a clean shutdown, 2 on any error (printed as `shmlockd: ...`), 3 after a
//! clean shutdown in which `--remove-on-exit` left the segment because live processes use it.

use anyhow::{Context, Result};
use clap::Parser;
use nix::sys::signal::{SigSet, Signal};
use shmlock::config::{parse_metrics_addr, ConfigFile};
use shmlock::daemon::{self, Outcome, Shutdown};
use shmlock::gateway::{GatewayConfig, GatewaySection};
use shmlock::shm::{SegmentOwner, DEFAULT_SEGMENT, SEGMENT_ENV, SEGMENT_OWNER_ENV};
use shmlock::systemd;
use shmlock::Capacities;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use tracing::{error, info};

/// Exit status when `--remove-on-exit` left the segment in place because it is in use.
const EXIT_LEFT_IN_USE: u8 = 3;

/// The shmlock supervisor: creates or adopts the lock segment and keeps it.
#[derive(Debug, Parser)]
#[command(
    name = "shmlockd",
    version,
    after_help = "Examples:
  shmlockd                                     # /shmlock with built-in defaults, gateway on 127.0.0.1:7411
  shmlockd --segment /jobs --max-locks 1000000 # a segment of its own, sized for a million names
  shmlockd --mode 0660 --segment-owner app     # locks for every user in the segment's group
  shmlockd --config /etc/shmlock/shmlock.toml  # every setting from a file (see config/shmlock.toml)
  shmlockd --no-gateway --metrics 127.0.0.1:9464

Capacities are fixed when the segment is created: to change them, stop shmlockd, remove the
segment (rm /dev/shm/NAME, or --remove-on-exit) and start it again. Exit status: 0 after a clean
stop, 2 on an error, 3 when --remove-on-exit left a segment still in use."
)]
struct Args {
    /// TOML config file (see config/shmlock.toml); built-in defaults without it.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Segment name, e.g. /shmlock [default: $SHMLOCK_SEGMENT, then the config file, then /shmlock].
    #[arg(long, value_name = "NAME")]
    segment: Option<String>,
    /// Distinct lock names held or waited on at once (overrides the config).
    #[arg(long, value_name = "N")]
    max_locks: Option<u32>,
    /// Shared holds plus waiting requests at once (overrides the config).
    #[arg(long, value_name = "N")]
    max_holds: Option<u32>,
    /// Client handles attached at once (overrides the config).
    #[arg(long, value_name = "N")]
    max_owners: Option<u32>,
    /// Longest lock name in bytes (overrides the config).
    #[arg(long, value_name = "BYTES")]
    max_name_len: Option<u32>,
    /// Number of shards, a power of two; 0 = automatic (overrides the config).
    #[arg(long, value_name = "N")]
    shards: Option<u32>,
    /// Permission bits of the segment, in octal (e.g. 0660 to let the segment's group lock);
    /// must include 0600 (overrides `[segment] mode`).
    #[arg(long, value_name = "OCTAL", value_parser = parse_mode)]
    mode: Option<u32>,
    /// Remove the segment on exit (by default it stays for local users); refused, with exit
    /// status 3, while live processes other than shmlockd have owners in it.
    #[arg(long)]
    remove_on_exit: bool,
    /// User name or uid that must own the segment's file [default: $SHMLOCK_SEGMENT_OWNER, then
    /// `[segment] owner`, then shmlockd's own user or root]; a segment it creates is given to it.
    #[arg(long, value_name = "USER")]
    segment_owner: Option<String>,
    /// Gateway address HOST:PORT (overrides `[gateway] listen`).
    #[arg(long, value_name = "ADDR", conflicts_with = "no_gateway")]
    listen: Option<String>,
    /// Do not run the TCP gateway (overrides `[gateway] enabled`).
    #[arg(long)]
    no_gateway: bool,
    /// Serve Prometheus metrics (GET /metrics) on this address IP:PORT, e.g. 127.0.0.1:9464
    /// (overrides `[daemon] metrics`; off by default; "" turns it off).
    #[arg(long, value_name = "ADDR")]
    metrics: Option<String>,
    /// Log filter, e.g. `info` or `shmlockd=debug` [default: $RUST_LOG, then info].
    #[arg(long, value_name = "FILTER")]
    log_level: Option<String>,
    /// Print the man page (shmlockd.8, roff) on stdout and exit; `shmlock manpages DIR` uses it.
    #[arg(long, hide = true)]
    manpage: bool,
}

/// `--mode`: octal permission bits, with or without a leading `0` or `0o`.
fn parse_mode(s: &str) -> std::result::Result<u32, String> {
    let digits = s.strip_prefix("0o").unwrap_or(s);
    u32::from_str_radix(digits, 8)
        .ok()
        .filter(|m| *m <= 0o777)
        .ok_or_else(|| format!("{s:?} is not an octal mode such as 0600 or 0660"))
}

/// Resolves the segment name: `--segment`, then `$SHMLOCK_SEGMENT`, then the config, then `/shmlock`.
fn segment_name(flag: Option<String>, config: Option<String>) -> String {
    let env = std::env::var(SEGMENT_ENV).ok().filter(|s| !s.is_empty());
    flag.or(env).or(config).unwrap_or_else(|| DEFAULT_SEGMENT.to_string())
}

/// Applies the command-line overrides to `caps` and validates the result.
fn capacities(args: &Args, mut caps: Capacities) -> Result<Capacities> {
    let overrides = [
        (args.max_locks, &mut caps.max_locks),
        (args.max_holds, &mut caps.max_holds),
        (args.max_owners, &mut caps.max_owners),
        (args.max_name_len, &mut caps.max_name_len),
        (args.shards, &mut caps.shards),
    ];
    for (value, field) in overrides {
        if let Some(v) = value {
            *field = v;
        }
    }
    if let Some(m) = args.mode {
        caps.mode = m;
    }
    match (&args.segment_owner, std::env::var(SEGMENT_OWNER_ENV)) {
        (Some(o), _) => caps.owner = SegmentOwner::parse(o, "--segment-owner")?,
        (None, Ok(o)) if !o.is_empty() => caps.owner = SegmentOwner::parse(&o, SEGMENT_OWNER_ENV)?,
        _ => {}
    }
    caps.validate()?;
    Ok(caps)
}

fn init_logging(filter: Option<&str>) -> Result<()> {
    use tracing_subscriber::EnvFilter;
    let filter = match filter {
        Some(f) => EnvFilter::try_new(f).with_context(|| format!("--log-level {f:?}"))?,
        None => EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    Ok(())
}

/// Validates the gateway's config, unless the gateway is disabled (`--no-gateway` or
/// `[gateway] enabled = false`). The daemon binds its address before it touches the segment.
fn gateway_config(args: &Args, section: &GatewaySection) -> Result<Option<GatewayConfig>> {
    if args.no_gateway || !section.enabled {
        return Ok(None);
    }
    Ok(Some(section.resolve(args.listen.as_deref())?))
}

fn run(args: Args) -> Result<ExitCode> {
    init_logging(args.log_level.as_deref())?;
    let config = match &args.config {
        Some(path) => ConfigFile::load(path)?,
        None => ConfigFile::default(),
    };
    let caps = capacities(&args, config.caps)?;
    // Everything that can be checked before the segment exists is checked first: the geometry
    // and the gateway's config and address (bound now, served once the table is there).
    caps.geometry()?;
    let gateway = gateway_config(&args, &config.gateway)?;
    let metrics = match &args.metrics {
        Some(addr) => parse_metrics_addr(addr, "--metrics")?,
        None => config.metrics,
    };
    let settings = daemon::Settings {
        segment: segment_name(args.segment.clone(), config.name),
        caps,
        gateway,
        remove_on_exit: args.remove_on_exit,
        metrics,
        watchdog: systemd::watchdog_interval(),
    };

    // Block the shutdown signals before the daemon starts a thread or touches the segment: every
    // thread inherits the mask, and the signal thread turns SIGINT/SIGTERM into a shutdown.
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGINT);
    signals.add(Signal::SIGTERM);
    signals.thread_block().context("cannot block SIGINT/SIGTERM")?;
    let shutdown = Shutdown::new();
    {
        let shutdown = shutdown.clone();
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                match signals.wait() {
                    Ok(sig) => info!(signal = %sig, "shutting down"),
                    Err(e) => error!("waiting for SIGINT/SIGTERM: {e}"),
                }
                systemd::notify_or_warn("STOPPING=1\n");
                shutdown.trigger();
            })
            .context("cannot start the signal thread")?;
    }
    let outcome = daemon::run(&settings, &shutdown, |ready| {
        info!(pid = std::process::id(), "running; stop with SIGINT or SIGTERM");
        // The segment, the reaper, the gateway and the metrics listener are up: a systemd unit
        // of Type=notify is started now.
        // A segment name may hold a newline: escaped, it cannot add a line to the message.
        let segment = ready.segment.escape_debug();
        systemd::notify_or_warn(&format!("READY=1\nSTATUS=serving segment {segment}\n"));
    })?;
    match outcome {
        Outcome::Left | Outcome::Removed => Ok(ExitCode::SUCCESS),
        Outcome::LeftInUse(e) => {
            eprintln!("shmlockd: --remove-on-exit: {e}");
            Ok(ExitCode::from(EXIT_LEFT_IN_USE))
        }
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    if args.manpage {
        let cmd = <Args as clap::CommandFactory>::command();
        return match clap_mangen::Man::new(cmd)
            .section("8")
            .render(&mut std::io::stdout().lock())
        {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("shmlockd: cannot write the man page: {e}");
                ExitCode::from(2)
            }
        };
    }
    match run(args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("shmlockd: {e:#}");
            ExitCode::from(2)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gateway_flags() {
        let args = Args::parse_from(["shmlockd", "--listen", "127.0.0.1:0"]);
        let c = GatewaySection::default().resolve(args.listen.as_deref()).unwrap();
        assert_eq!(c.listen.port(), 0);
        assert!(Args::try_parse_from(["shmlockd", "--listen", "x", "--no-gateway"]).is_err());
        let c = ConfigFile::parse("[gateway]\nenabled = false\nmax_line = 100\n").unwrap();
        assert!(!c.gateway.enabled);
        assert_eq!(c.gateway.max_line, 100);
    }

    #[test]
    fn segment_owner_from_the_file_and_the_flag() {
        assert_eq!(ConfigFile::parse("").unwrap().caps.owner, SegmentOwner::MeOrRoot);
        let c = ConfigFile::parse("[segment]\nowner = \"root\"\n").unwrap();
        assert_eq!(c.caps.owner, SegmentOwner::Uid(0));
        let c = ConfigFile::parse("[segment]\nowner = 65534\n").unwrap();
        assert_eq!(c.caps.owner, SegmentOwner::Uid(65534));
        let e = format!(
            "{:#}",
            ConfigFile::parse("[segment]\nowner = \"no-such-user-x\"\n").unwrap_err()
        );
        assert!(e.contains("no user named \"no-such-user-x\""), "{e}");
        let args = Args::parse_from(["shmlockd", "--segment-owner", "1234"]);
        let caps = capacities(&args, c.caps).unwrap();
        assert_eq!(caps.owner, SegmentOwner::Uid(1234), "the flag overrides the file");
    }

    #[test]
    fn flags_override_the_file_and_are_validated() {
        let args = Args::parse_from(["shmlockd", "--max-locks", "10", "--shards", "2"]);
        let caps = capacities(&args, Capacities::default()).unwrap();
        assert_eq!((caps.max_locks, caps.shards, caps.max_holds), (10, 2, 65_536));
        let args = Args::parse_from(["shmlockd", "--shards", "3"]);
        let e = format!("{:#}", capacities(&args, Capacities::default()).unwrap_err());
        assert!(e.contains("shards"), "{e}");
    }
}
