//! `connections --n N`: N concurrent gateway sessions, each holding one lock. Reports the time to
//! open them, the daemon's resident memory before and after (from `/proc/PID/status`), the growth
//! per session, and lock/unlock pairs per second with all of them open.
//!
//! The daemon is a `shmlockd` the bench starts (next to the bench's executable, on a fresh
//! segment, with `max_connections = N` and room for N owners), or the one at `--remote ADDR`,
//! whose memory is read if `--daemon-pid PID` says which process it is.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::cleanup::{self, Registered};
use crate::fixture::Namer;
use crate::raw::RawConn;
use crate::report::{Extra, Run};

/// Memory figures of a process, in KiB (from `/proc/PID/status`).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Mem {
    /// VmRSS: all resident pages, the shared segment's touched pages included.
    pub(crate) rss_kib: u64,
    /// RssAnon: private resident pages (heap, stacks).
    pub(crate) anon_kib: u64,
}

pub(crate) fn read_mem(pid: u32) -> Result<Mem> {
    let path = format!("/proc/{pid}/status");
    let text = std::fs::read_to_string(&path).with_context(|| format!("read {path}"))?;
    let field = |key: &str| -> Result<u64> {
        let line = text
            .lines()
            .find(|l| l.starts_with(key))
            .with_context(|| format!("{path} has no {key}"))?;
        let kib = line[key.len()..].trim().trim_end_matches("kB").trim();
        kib.parse().with_context(|| format!("{path}: {line:?}"))
    };
    Ok(Mem {
        rss_kib: field("VmRSS:")?,
        anon_kib: field("RssAnon:")?,
    })
}

/// A `shmlockd` started for one run; stopped (SIGTERM, then waited for) when dropped.
struct Daemon {
    child: Option<(Child, Registered)>,
    addr: String,
    pid: u32,
    /// The config directory and the segment, removed after the daemon.
    _dir: Registered,
    _segment: Registered,
}

impl Daemon {
    /// Starts shmlockd on a fresh segment sized for `n` sessions, listening on a free port.
    fn start(namer: &Namer, n: u64) -> Result<Daemon> {
        let exe = std::env::current_exe().context("find the bench executable")?;
        let shmlockd = exe.with_file_name("shmlockd");
        if !shmlockd.exists() {
            bail!(
                "{} not found: build it too (cargo build --release --bins), or run a shmlockd and pass \
                 --remote ADDR --daemon-pid PID",
                shmlockd.display()
            );
        }
        let segment = namer.shm("seg");
        let dir = namer.dir("connections");
        let dir_reg = cleanup::dir(dir.clone())?;
        let config: PathBuf = dir.join("shmlockd.toml");
        let text = format!(
            "[segment]\nname = \"{segment}\"\nmax_owners = {owners}\nmax_locks = {locks}\n\n\
             [gateway]\nlisten = \"127.0.0.1:0\"\nidle_timeout = \"0s\"\nmax_connections = {n}\n",
            owners = n + 64,
            locks = (2 * n + 64).max(65_536),
        );
        std::fs::write(&config, text).with_context(|| format!("write {}", config.display()))?;
        let (_, seg_reg) = cleanup::segment(&segment, || Ok(()))?;
        let mut child = Command::new(&shmlockd)
            .arg("--config")
            .arg(&config)
            .args(["--remove-on-exit", "--log-level", "info"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("start {}", shmlockd.display()))?;
        let pid = child.id();
        let reg = cleanup::child(pid);
        let stderr = child.stderr.take().expect("piped");
        let (tx, rx) = mpsc::channel();
        // Reads the log for the bound address, then keeps draining it (warnings are shown).
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(|l| l.ok()) {
                if line.contains("gateway ready") {
                    if let Some(a) = line.split_whitespace().find_map(|w| w.strip_prefix("listen=")) {
                        let _ = tx.send(a.to_string());
                    }
                } else if line.contains("WARN") || line.contains("ERROR") {
                    eprintln!("shmlockd: {line}");
                }
            }
        });
        let mut d = Daemon {
            child: Some((child, reg)),
            addr: String::new(),
            pid,
            _dir: dir_reg,
            _segment: seg_reg,
        };
        d.addr = match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(a) => a,
            Err(_) => {
                let status = d.child.as_mut().and_then(|(c, _)| c.try_wait().ok().flatten());
                bail!("shmlockd did not report its gateway address (exit status: {status:?})")
            }
        };
        Ok(d)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some((mut child, reg)) = self.child.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    reg.disarm();
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            drop(reg); // SIGKILL
            let _ = child.wait();
        }
    }
}

/// Where the sessions go, and whose memory to read.
pub(crate) struct Target<'a> {
    pub(crate) namer: &'a Namer,
    /// `--remote ADDR`: an existing gateway.
    pub(crate) remote: Option<&'a str>,
    /// `--daemon-pid PID`: the process serving `remote`.
    pub(crate) daemon_pid: Option<u32>,
}

/// One run with `n` sessions, then `ops` pairs round-robin over them.
pub(crate) fn run(t: &Target<'_>, n: u64, ops: u64) -> Result<Run> {
    let daemon = match t.remote {
        Some(_) => None,
        None => Some(Daemon::start(t.namer, n)?),
    };
    let (addr, pid) = match (&daemon, t.remote) {
        (Some(d), _) => (d.addr.clone(), Some(d.pid)),
        (None, Some(a)) => (a.to_string(), t.daemon_pid),
        (None, None) => unreachable!("a daemon is started without --remote"),
    };
    let mem = |when: &str| -> Result<Option<Mem>> {
        pid.map(|p| read_mem(p).with_context(|| format!("daemon memory {when}")))
            .transpose()
    };
    // Warm-up: the runtime's threads and first allocations are not per-session costs.
    for i in 0..16 {
        let mut c = RawConn::connect_with(&addr, 256)?;
        c.pair(&format!("warm-{i}"))?;
        c.quit()?;
    }
    std::thread::sleep(Duration::from_millis(200));
    let before = mem("before")?;

    let t0 = Instant::now();
    let mut conns = Vec::with_capacity(n as usize);
    for i in 0..n {
        let opened = RawConn::connect_with(&addr, 256).and_then(|mut c| {
            c.queue_lock(&format!("conn-{i}"));
            c.flush()?;
            c.expect_granted()?;
            Ok(c)
        });
        match opened {
            Ok(c) => conns.push(c),
            Err(e) => bail!("session {} of {n} failed ({} open): {e:#}", i + 1, conns.len()),
        }
    }
    let open_seconds = t0.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_millis(200));
    let after = mem("after")?;

    // The limit is n when the bench started the daemon: one more must be refused politely.
    let over_limit_refused = daemon.as_ref().map(|_| RawConn::connect_with(&addr, 256).is_err());

    let names: Vec<String> = (0..n).map(|i| format!("op-{i}")).collect();
    let t1 = Instant::now();
    for k in 0..ops {
        let s = (k % n) as usize;
        conns[s].pair(&names[s])?;
    }
    let seconds = t1.elapsed().as_secs_f64();
    drop(conns);
    drop(daemon);
    let per = |b: Option<Mem>, a: Option<Mem>, f: fn(&Mem) -> u64| match (b, a) {
        (Some(b), Some(a)) => Some((f(&a) as f64 - f(&b) as f64) * 1024.0 / n as f64),
        _ => None,
    };
    Ok(Run {
        ops,
        seconds,
        extra: Extra::Connections {
            sessions: n,
            open_seconds,
            rss_before_kib: before.map(|m| m.rss_kib),
            rss_after_kib: after.map(|m| m.rss_kib),
            rss_bytes_per_session: per(before, after, |m| m.rss_kib),
            anon_bytes_per_session: per(before, after, |m| m.anon_kib),
            over_limit_refused,
        },
    })
}
