//! shmlockd's lifecycle: the real binary's failed starts (a busy port, a bad config, a failure
//! after the segment was created) exit 2 and leave no segment behind, and its config file takes
//! the one duration grammar; `daemon::run` in-process serves, and stops in order.

mod common;

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use shmlock::daemon::{self, Outcome, Ready, Shutdown};
use shmlock::gateway::GatewaySection;
use shmlock::remote::RemoteClient;
use shmlock::shm::{SEGMENT_ENV, SEGMENT_OWNER_ENV};
use shmlock::{Client, Error, LockTable};

use common::DEADLINE;

const SHMLOCKD: &str = env!("CARGO_BIN_EXE_shmlockd");

/// A segment name of this test process (nothing creates it here) and a scratch directory; both
/// are removed on drop.
struct Scratch {
    segment: String,
    dir: PathBuf,
}

impl Scratch {
    fn new(what: &str) -> Scratch {
        static N: AtomicU32 = AtomicU32::new(0);
        let segment = format!(
            "/shmlock-t-daemon-{what}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let dir = std::env::temp_dir().join(&segment[1..]);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch { segment, dir }
    }

    fn shm(&self) -> PathBuf {
        Path::new("/dev/shm").join(&self.segment[1..])
    }

    fn config(&self, text: &str) -> String {
        let path = self.dir.join("shmlock.toml");
        std::fs::write(&path, text).unwrap();
        path.to_str().unwrap().to_string()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(self.shm());
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn shmlockd() -> Command {
    let mut cmd = Command::new(SHMLOCKD);
    cmd.env_remove(SEGMENT_ENV)
        .env_remove(SEGMENT_OWNER_ENV)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null());
    cmd
}

/// Runs shmlockd to its end (it must fail to start: it is killed after [`DEADLINE`]).
fn failed_start(mut cmd: Command) -> Output {
    let child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(DEADLINE) {
        Ok(o) => o.unwrap(),
        Err(_) => {
            let _ = Command::new("kill").args(["-KILL", &pid.to_string()]).status();
            panic!("shmlockd started (or hung) where it should have failed")
        }
    }
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A shmlockd started in the background, logging to a file; SIGKILLed on drop if still running.
struct Running {
    child: Child,
    log: PathBuf,
}

impl Running {
    fn spawn(mut cmd: Command, log: &Path) -> Running {
        let child = cmd
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .unwrap();
        Running {
            child,
            log: log.to_path_buf(),
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits for the "gateway ready" line (Ok: the address) or for the process to exit (Err:
    /// its exit status).
    fn ready(&mut self) -> Result<SocketAddr, Option<i32>> {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let log = self.log();
            if let Some(i) = log.find("gateway ready listen=") {
                let rest = &log[i + "gateway ready listen=".len()..];
                if let Some(addr) = rest.split_whitespace().next() {
                    if let Ok(addr) = addr.parse() {
                        return Ok(addr);
                    }
                }
            }
            if let Some(status) = self.child.try_wait().unwrap() {
                return Err(status.code());
            }
            assert!(
                Instant::now() < deadline,
                "shmlockd neither ready nor gone:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// SIGTERMs it and returns its exit status.
    fn stop(mut self) -> Option<i32> {
        let pid = self.child.id().to_string();
        assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            assert!(Instant::now() < deadline, "shmlockd did not stop:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

// ---- failed starts leave no segment -------------------------------------------------------------

#[test]
fn a_busy_port_is_an_error_and_leaves_no_segment() {
    let s = Scratch::new("busy");
    let busy = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = busy.local_addr().unwrap().to_string();
    let mut cmd = shmlockd();
    cmd.args(["--segment", &s.segment, "--listen", &addr]);
    let o = failed_start(cmd);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(
        stderr(&o).contains(&format!("shmlockd: cannot start the gateway on {addr}")),
        "{}",
        stderr(&o)
    );
    assert!(!s.shm().exists(), "a failed start left segment {}", s.segment);
}

#[test]
fn an_integer_where_a_duration_belongs_is_an_error_that_shows_the_form_and_leaves_no_segment() {
    let s = Scratch::new("int");
    for (key, value, form) in [
        ("idle_timeout", "30", "\"30s\""),
        ("line_timeout", "1.5", "\"1.5s\""),
        ("auth_timeout", "0", "\"0s\""),
    ] {
        let config = s.config(&format!("[gateway]\nlisten = \"127.0.0.1:0\"\n{key} = {value}\n"));
        let mut cmd = shmlockd();
        cmd.args(["--segment", &s.segment, "--config", &config]);
        let o = failed_start(cmd);
        let e = stderr(&o);
        assert_eq!(o.status.code(), Some(2), "{e}");
        assert!(e.contains(key), "the error does not name {key}: {e}");
        assert!(
            e.contains(&format!("{value} is not a duration: write it with a unit, e.g. {form}")),
            "{e}"
        );
        assert!(!s.shm().exists(), "a bad config left segment {}", s.segment);
    }
}

#[test]
fn a_bad_duration_string_names_its_key_and_leaves_no_segment() {
    let s = Scratch::new("bad");
    let config = s.config("[gateway]\nlisten = \"127.0.0.1:0\"\nidle_timeout = \"soon\"\n");
    let mut cmd = shmlockd();
    cmd.args(["--segment", &s.segment, "--config", &config]);
    let o = failed_start(cmd);
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{e}");
    assert!(
        e.contains("idle_timeout") && e.contains("\"soon\" is not a duration"),
        "{e}"
    );
    assert!(
        e.contains("250ms") && e.contains("1h"),
        "the error shows no example: {e}"
    );
    assert!(!s.shm().exists(), "a bad config left segment {}", s.segment);
}

/// Whatever fails after the segment was created (here: file descriptors run out, at each point of
/// the start in turn), the segment this start created is removed.
#[test]
fn a_start_that_fails_after_creating_the_segment_removes_it() {
    let s = Scratch::new("fds");
    let mut failed_after_creating = 0;
    let mut started = false;
    for limit in 4..64 {
        let mut cmd = Command::new("sh");
        cmd.args([
            "-c",
            "ulimit -n \"$1\" && shift && exec \"$@\"",
            "sh",
            &limit.to_string(),
            SHMLOCKD,
        ])
        .args(["--segment", &s.segment, "--listen", "127.0.0.1:0", "--max-owners", "8"])
        .env_remove(SEGMENT_ENV)
        .env_remove(SEGMENT_OWNER_ENV)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null());
        let mut d = Running::spawn(cmd, &s.dir.join(format!("fds-{limit}.log")));
        match d.ready() {
            Ok(_) => {
                assert_eq!(d.stop(), Some(0));
                started = true;
                break;
            }
            Err(code) => {
                let log = d.log();
                assert_eq!(code, Some(2), "with {limit} descriptors:\n{log}");
                assert!(
                    !s.shm().exists(),
                    "with {limit} descriptors, a failed start left segment {}:\n{log}",
                    s.segment
                );
                if log.contains("created segment") || log.contains("removed the segment this start created") {
                    failed_after_creating += 1;
                }
            }
        }
    }
    assert!(started, "shmlockd did not start with 63 descriptors");
    assert!(failed_after_creating > 0, "no start failed after creating the segment");
}

// ---- the duration grammar of the config file ----------------------------------------------------

#[test]
fn the_config_file_takes_hours_and_fractions() {
    let s = Scratch::new("units");
    let config = s.config("[gateway]\nlisten = \"127.0.0.1:0\"\nidle_timeout = \"1h\"\nline_timeout = \"1.5s\"\n");
    let mut cmd = shmlockd();
    cmd.args(["--segment", &s.segment, "--config", &config]);
    let mut d = Running::spawn(cmd, &s.dir.join("units.log"));
    let addr = d.ready().unwrap_or_else(|code| panic!("exit {code:?}:\n{}", d.log()));
    let remote = RemoteClient::connect(addr).unwrap();
    assert_eq!(remote.hello().idle_timeout, Some(Duration::from_secs(3600)));
    drop(remote);
    assert_eq!(d.stop(), Some(0));
}

// ---- daemon::run in-process ---------------------------------------------------------------------

fn settings(s: &Scratch, remove_on_exit: bool) -> daemon::Settings {
    let gateway = GatewaySection {
        listen: "127.0.0.1:0".into(),
        ..Default::default()
    };
    daemon::Settings {
        segment: s.segment.clone(),
        caps: common::small_caps(),
        gateway: Some(gateway.resolve(None).unwrap()),
        remove_on_exit,
        metrics: None,
        watchdog: None,
    }
}

/// Starts `daemon::run` on a thread; returns what its ready callback got and the thread.
fn start(settings: daemon::Settings, shutdown: &Shutdown) -> (Ready, JoinHandle<anyhow::Result<Outcome>>) {
    let (tx, rx) = mpsc::channel();
    let shutdown = shutdown.clone();
    let t = std::thread::spawn(move || {
        daemon::run(&settings, &shutdown, |r| {
            let _ = tx.send(r.clone());
        })
    });
    match rx.recv_timeout(DEADLINE) {
        Ok(ready) => (ready, t),
        Err(_) => panic!("daemon::run did not get ready: {:?}", t.join().unwrap()),
    }
}

#[test]
fn run_serves_local_and_remote_clients_and_stops_in_order() {
    let s = Scratch::new("inproc");
    let shutdown = Shutdown::new();
    let (ready, t) = start(settings(&s, true), &shutdown);
    assert!(ready.created && ready.segment == s.segment, "{ready:?}");
    let addr = ready.gateway.expect("a gateway");
    assert_ne!(addr.port(), 0, "the bound port is reported");
    assert!(s.shm().exists());

    let local = Client::open(&s.segment).unwrap();
    let held = local.lock("a").unwrap();
    let remote = Arc::new(RemoteClient::connect(addr).unwrap());
    let b = remote.lock("b").unwrap();
    assert!(
        matches!(local.try_lock("b"), Err(Error::WouldBlock)),
        "the remote holds b"
    );
    drop(b);
    let waiter = {
        let remote = Arc::clone(&remote);
        std::thread::spawn(move || remote.lock("a").map(|g| g.token()))
    };
    let table = LockTable::open(&s.segment).unwrap();
    common::wait_until("the remote wait", || table.stats().waiting == 1);

    shutdown.trigger();
    let outcome = common::within("run to return", move || t.join().unwrap());
    // The gateway went first: the waiting remote LOCK was answered SHUTTING_DOWN.
    let r = waiter.join().unwrap();
    assert!(
        matches!(&r, Err(Error::Connection { why, .. }) if why.contains("SHUTTING_DOWN")),
        "{r:?}"
    );
    assert!(matches!(outcome, Ok(Outcome::Removed)), "{outcome:?}");
    assert!(!s.shm().exists(), "remove_on_exit: the segment is gone");
    drop(held);
}

#[test]
fn run_adopts_an_existing_segment_and_leaves_it() {
    let s = Scratch::new("adopt");
    let existing = LockTable::create(&s.segment, &common::small_caps()).unwrap();
    let shutdown = Shutdown::new();
    let (ready, t) = start(settings(&s, false), &shutdown);
    assert!(!ready.created, "{ready:?}");
    assert_eq!(existing.supervisor().map(|p| p.pid), Some(std::process::id()));
    shutdown.trigger();
    let outcome = common::within("run to return", move || t.join().unwrap());
    assert!(matches!(outcome, Ok(Outcome::Left)), "{outcome:?}");
    assert!(s.shm().exists(), "the segment stays for local users");
    assert!(existing.supervisor().is_none(), "the claim is given up");
}

#[test]
fn run_on_a_busy_port_fails_before_creating_the_segment() {
    let s = Scratch::new("inproc-busy");
    let busy = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut settings = settings(&s, false);
    settings.gateway.as_mut().unwrap().listen = busy.local_addr().unwrap();
    let mut called = false;
    let r = daemon::run(&settings, &Shutdown::new(), |_| called = true);
    let e = format!("{:#}", r.unwrap_err());
    assert!(e.contains("cannot start the gateway on"), "{e}");
    assert!(!called, "not ready");
    assert!(!s.shm().exists(), "a failed start left segment {}", s.segment);
}
