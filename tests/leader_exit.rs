//! A process whose main thread has exited while another of its threads holds a lock is alive
//! (`/proc/PID/stat` shows `Z` for its thread-group leader, but the process runs): its lock
//! stays its own, neither reaped by a waiter without `shmlockd` nor by `shmlockd`'s scan, and
//! its own unlock at the end succeeds.
//!
//! `harness = false`: the child must be a process whose main thread ends while another thread
//! runs on, and the test harness runs tests on threads of its own, never on the main thread.
#![allow(unsafe_code)] // one raw syscall in the child, to end only its main thread

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use shmlock::{Capacities, Client, Error, LockTable};

const CHILD_VAR: &str = "SHMLOCK_LEADER_EXIT_CHILD";
/// How long the child's thread holds the lock: longer than every check below.
const HOLD: Duration = Duration::from_millis(3000);
/// Bound on every wait of the test.
const DEADLINE: Duration = Duration::from_secs(30);

fn main() -> ExitCode {
    if let Ok(v) = std::env::var(CHILD_VAR) {
        child(&v);
    }
    let mut failed = 0;
    for daemon in [false, true] {
        let name = format!("a live process whose main thread exited keeps its lock (shmlockd: {daemon})");
        match std::panic::catch_unwind(|| scenario(daemon)) {
            Ok(()) => println!("test {name} ... ok"),
            Err(_) => {
                println!("test {name} ... FAILED");
                failed += 1;
            }
        }
    }
    println!("{} passed, {failed} failed", 2 - failed);
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// The child: a thread locks `L` and holds it for [`HOLD`], then unlocks and writes the result;
/// meanwhile the main thread exits on its own.
fn child(v: &str) -> ! {
    let (segment, dir) = v.split_once(' ').expect("segment and directory");
    let (segment, dir) = (segment.to_string(), PathBuf::from(dir));
    let holding = dir.join("holding");
    let worker = std::thread::spawn(move || {
        let c = Client::open(&segment).expect("open");
        let g = c.lock("L").expect("lock");
        fs::write(dir.join("holding"), g.token().to_string()).expect("write");
        std::thread::sleep(HOLD);
        let r = g.unlock();
        fs::write(dir.join("done"), format!("{r:?}")).expect("write");
        std::process::exit(0);
    });
    let t0 = Instant::now();
    while !holding.exists() && !worker.is_finished() && t0.elapsed() < DEADLINE {
        std::thread::sleep(Duration::from_millis(5));
    }
    #[allow(clippy::disallowed_methods)]
    // SAFETY: SYS_exit ends only the calling thread (exit_group would end the process), without
    // unwinding; nothing of this thread is used after it (the worker owns everything it uses),
    // and the process lives on in the worker thread, which ends it with exit(2).
    unsafe {
        libc::syscall(libc::SYS_exit, 0);
    }
    unreachable!("SYS_exit returned");
}

/// State letter of `pid` in `/proc/PID/stat`.
fn state(pid: u32) -> Option<char> {
    let s = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    s[s.rfind(')')? + 1..].split_ascii_whitespace().next()?.chars().next()
}

fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !cond() {
        assert!(t0.elapsed() < DEADLINE, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Kills and reaps its processes, and removes the segment and the directory.
struct Cleanup {
    segment: String,
    dir: PathBuf,
    procs: Vec<Child>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for p in &mut self.procs {
            let _ = p.kill();
            let _ = p.wait();
        }
        let _ = shmlock::shm::Segment::unlink(&self.segment);
        let _ = fs::remove_dir_all(&self.dir);
    }
}

fn scenario(daemon: bool) {
    let unique = format!("shmlock-t-leader-{}-{daemon}", std::process::id());
    let segment = format!("/{unique}");
    let dir = std::env::temp_dir().join(&unique);
    let _ = shmlock::shm::Segment::unlink(&segment);
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).expect("mkdir");
    let mut env = Cleanup {
        segment: segment.clone(),
        dir: dir.clone(),
        procs: Vec::new(),
    };
    let caps = Capacities {
        max_locks: 64,
        max_holds: 64,
        max_owners: 16,
        ..Default::default()
    };
    let table = LockTable::create(&segment, &caps).expect("create");
    if daemon {
        let d = Command::new(env!("CARGO_BIN_EXE_shmlockd"))
            .args(["--segment", &segment, "--no-gateway", "--log-level", "warn"])
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn shmlockd");
        let pid = d.id();
        env.procs.push(d);
        wait_until("shmlockd to claim the segment", || {
            table.supervisor().is_some_and(|p| p.pid == pid)
        });
    }
    let child = Command::new(std::env::current_exe().expect("current_exe"))
        .env(CHILD_VAR, format!("{segment} {}", dir.display()))
        .stdin(Stdio::null())
        .spawn()
        .expect("spawn child");
    let pid = child.id();
    env.procs.push(child);
    wait_until("the child to hold L", || dir.join("holding").exists());
    wait_until("the child's main thread to exit", || state(pid) == Some('Z'));
    assert!(
        shmlock::owner::pid_alive(pid),
        "a process with a running thread is alive"
    );

    // A waiter (which reaps holders it finds dead) must not get the lock, and neither may a
    // try_lock; with shmlockd, its full scan (every second) must leave the holder alone too.
    let c = Client::open(&segment).expect("open");
    assert!(matches!(c.try_lock("L"), Err(Error::WouldBlock)));
    match c.try_lock_for("L", Duration::from_millis(700)) {
        Err(Error::TimedOut { holder, .. }) => {
            assert_eq!(holder.map(|h| h.pid), Some(pid), "the holder is named")
        }
        other => panic!("the live holder's lock was taken: {other:?}"),
    }
    if daemon {
        std::thread::sleep(Duration::from_millis(1300));
    }
    let holders: Vec<u32> = table
        .locks()
        .iter()
        .filter(|l| l.name == b"L")
        .flat_map(|l| l.holders.iter().map(|h| h.pid))
        .collect();
    assert_eq!(holders, [pid], "the lock is still the child's");
    assert!(
        !Path::new(&dir.join("done")).exists(),
        "the check ran while the child's thread was inside its critical section"
    );

    wait_until("the child to finish", || dir.join("done").exists());
    assert_eq!(
        fs::read_to_string(dir.join("done")).expect("done"),
        "Ok(())",
        "its own unlock"
    );
    let g = c.try_lock_for("L", DEADLINE).expect("free once the child let go");
    assert!(!g.owner_died(), "it ended cleanly");
    drop(g);
    assert!(table.check().is_empty(), "{:?}", table.check());
}
