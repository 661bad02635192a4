//! shmlockd under systemd's notify protocol, with a socket of the test's own standing in for
//! the service manager: READY=1 arrives once the segment exists and is supervised, STOPPING=1
//! after SIGTERM, on a path socket and on an abstract one (`@NAME`), and WATCHDOG=1 keeps
//! arriving when `$WATCHDOG_USEC` asks for it.

use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use shmlock::shm::{SEGMENT_ENV, SEGMENT_OWNER_ENV};
use shmlock::LockTable;

/// How long anything here may take before the test fails (never a speed assertion).
const DEADLINE: Duration = Duration::from_secs(30);

/// A segment name and a scratch directory of this test, removed on drop, and the shmlockd
/// started on them (SIGKILLed on drop if still running).
struct Run {
    segment: String,
    dir: PathBuf,
    child: Option<Child>,
}

impl Run {
    fn new(what: &str) -> Run {
        let segment = format!("/shmlock-t-systemd-{what}-{}", std::process::id());
        let dir = std::env::temp_dir().join(&segment[1..]);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let _ = std::fs::remove_file(Path::new("/dev/shm").join(&segment[1..]));
        Run {
            segment,
            dir,
            child: None,
        }
    }

    fn shm(&self) -> PathBuf {
        Path::new("/dev/shm").join(&self.segment[1..])
    }

    /// Starts shmlockd with `NOTIFY_SOCKET=notify` and the extra environment `env`.
    fn start(&mut self, notify: &str, env: &[(&str, &str)]) -> u32 {
        let log = std::fs::File::create(self.dir.join("shmlockd.log")).unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_shmlockd"));
        cmd.args([
            "--segment",
            &self.segment,
            "--listen",
            "127.0.0.1:0",
            "--metrics",
            "127.0.0.1:0",
            "--remove-on-exit",
        ])
        .env_remove(SEGMENT_ENV)
        .env_remove(SEGMENT_OWNER_ENV)
        .env_remove("RUST_LOG")
        .env_remove("WATCHDOG_USEC")
        .env_remove("WATCHDOG_PID")
        .env("NOTIFY_SOCKET", notify)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log);
        let child = cmd.spawn().expect("spawn shmlockd");
        let pid = child.id();
        self.child = Some(child);
        pid
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("shmlockd.log")).unwrap_or_default()
    }

    fn sigterm(&self) {
        let pid = self.child.as_ref().unwrap().id() as i32;
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::SIGTERM).unwrap();
    }

    /// Waits for shmlockd to exit; its exit code.
    fn exit_code(&mut self) -> Option<i32> {
        let child = self.child.as_mut().unwrap();
        let t0 = Instant::now();
        loop {
            if let Some(s) = child.try_wait().unwrap() {
                return s.code();
            }
            assert!(t0.elapsed() < DEADLINE, "shmlockd did not exit:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        if let Some(c) = self.child.as_mut() {
            if let Ok(None) = c.try_wait() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        let _ = std::fs::remove_file(self.shm());
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Receives datagrams until one has the line `want`; returns every line received up to it.
fn until(sock: &UnixDatagram, want: &str, run: &Run) -> Vec<String> {
    sock.set_read_timeout(Some(DEADLINE)).unwrap();
    let mut lines = Vec::new();
    let mut buf = vec![0u8; 4096];
    loop {
        let n = sock
            .recv(&mut buf)
            .unwrap_or_else(|e| panic!("no {want} (got {lines:?}): {e}\n{}", run.log()));
        let text = std::str::from_utf8(&buf[..n]).expect("UTF-8 notification");
        lines.extend(text.lines().map(str::to_string));
        if text.lines().any(|l| l == want) {
            return lines;
        }
    }
}

/// READY=1 once the segment exists and is supervised, STOPPING=1 after SIGTERM, then exit 0.
fn ready_then_stopping(run: &mut Run, sock: &UnixDatagram, notify: &str) {
    let pid = run.start(notify, &[]);
    let got = until(sock, "READY=1", run);
    assert!(!got.iter().any(|l| l == "STOPPING=1"), "{got:?}");
    assert!(run.shm().exists(), "READY=1 before the segment exists");
    let table = LockTable::open(&run.segment).expect("open the segment");
    assert_eq!(table.supervisor().map(|p| p.pid), Some(pid), "READY=1 before the claim");
    let log = run.log();
    assert!(log.contains("gateway ready") && log.contains("metrics ready"), "{log}");
    assert!(
        got.iter().any(|l| l.starts_with("STATUS=") && l.contains(&run.segment)),
        "{got:?}"
    );
    drop(table);
    run.sigterm();
    until(sock, "STOPPING=1", run);
    assert_eq!(run.exit_code(), Some(0), "{}", run.log());
}

#[test]
fn ready_and_stopping_reach_a_path_socket() {
    let mut run = Run::new("path");
    let path = run.dir.join("notify.sock");
    let sock = UnixDatagram::bind(&path).unwrap();
    ready_then_stopping(&mut run, &sock, path.to_str().unwrap());
}

#[test]
fn ready_and_stopping_reach_an_abstract_socket() {
    let mut run = Run::new("abstract");
    let name = format!("shmlock-t-systemd-{}", std::process::id());
    let sock = UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes()).unwrap()).unwrap();
    ready_then_stopping(&mut run, &sock, &format!("@{name}"));
}

#[test]
fn the_watchdog_is_fed_while_shmlockd_runs() {
    let mut run = Run::new("watchdog");
    let path = run.dir.join("notify.sock");
    let sock = UnixDatagram::bind(&path).unwrap();
    run.start(path.to_str().unwrap(), &[("WATCHDOG_USEC", "100000")]);
    until(&sock, "READY=1", &run);
    // Fed again and again after READY=1 (every 50 ms): three more in a row.
    for _ in 0..3 {
        until(&sock, "WATCHDOG=1", &run);
    }
    run.sigterm();
    until(&sock, "STOPPING=1", &run);
    assert_eq!(run.exit_code(), Some(0), "{}", run.log());
}

#[test]
fn a_missing_notify_socket_is_logged_and_shmlockd_runs_on() {
    let mut run = Run::new("missing");
    let path = run.dir.join("nobody-listens.sock");
    run.start(path.to_str().unwrap(), &[]);
    let t0 = Instant::now();
    while !run.log().contains("cannot notify the service manager") {
        assert!(t0.elapsed() < DEADLINE, "{}", run.log());
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(
        run.child.as_mut().unwrap().try_wait().unwrap().is_none(),
        "{}",
        run.log()
    );
    run.sigterm();
    assert_eq!(run.exit_code(), Some(0), "{}", run.log());
}
