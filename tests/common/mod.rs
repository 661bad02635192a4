//! Support for the integration tests: isolated segments, child processes, witnesses, deadlines.
//!
//! # Child processes
//! A test spawns children with [`TestEnv::spawn`]: the test binary re-runs itself
//! (`current_exe() --exact child_process --nocapture --test-threads=1`) with the role in
//! `SHMLOCK_TEST_ROLE`, the segment and the witness directory in `SHMLOCK_TEST_SEGMENT` and
//! `SHMLOCK_TEST_DIR`, and each parameter in `SHMLOCK_TEST_P_<KEY>`. The test file's
//! `child_process` "test" reads them back with [`ChildCtx::from_env`] and does nothing when the
//! role is absent. A child's stdout and stderr go to a log file in the witness directory, shown
//! when the child fails.
//!
//! # Deadlines
//! Nothing here waits without a deadline: [`TestEnv::wait`] kills a child (SIGKILL) that has not
//! exited in time, [`wait_until`] and [`TestEnv::wait_for`] poll, [`within`] runs a call that
//! might block on a thread of its own. A deadline that passes fails the test; none of them asserts
//! how fast anything is.
//!
//! # Isolation
//! [`TestEnv::new`] creates segment `/shmlock-t-{test}-{pid}-{counter}` and a temporary directory of
//! the same name; its `Drop` kills children still running and removes both (the directory is kept
//! when the test failed, for inspection).

// Each test file uses part of this module; what one file leaves unused is not dead.
#![allow(dead_code)]

pub(crate) mod cli;
#[cfg(feature = "etcd")]
pub(crate) mod etcd;

/// The `child_process` entry point of a test binary whose children play `roles`: each
/// `"role" => function` runs `function(&ctx)` in a child spawned with that role. Not a test: it
/// does nothing unless `SHMLOCK_TEST_ROLE` is set (see the module docs).
#[allow(unused_macros)] // not every test binary has children
macro_rules! child_roles {
    ($($role:literal => $f:path),* $(,)?) => {
        /// Not a test: the entry point of child processes. Does nothing unless
        /// `SHMLOCK_TEST_ROLE` is set.
        #[test]
        fn child_process() {
            let Some(ctx) = common::ChildCtx::from_env() else { return };
            match ctx.role.as_str() {
                $($role => $f(&ctx),)*
                other => panic!("unknown role {other:?}"),
            }
        }
    };
}
#[allow(unused_imports)] // each test binary that has children uses it
pub(crate) use child_roles;

use std::fmt::{Debug, Display};
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::str::FromStr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use shmlock::{Capacities, Client, LockTable, Segment};

/// The name of the `#[test]` function that child processes run.
pub(crate) const CHILD_TEST: &str = "child_process";
const ROLE_VAR: &str = "SHMLOCK_TEST_ROLE";
const SEGMENT_VAR: &str = "SHMLOCK_TEST_SEGMENT";
const DIR_VAR: &str = "SHMLOCK_TEST_DIR";
const PARAM_PREFIX: &str = "SHMLOCK_TEST_P_";

/// How long the parent waits for a child to exit, or for a condition, before failing the test.
pub(crate) const DEADLINE: Duration = Duration::from_secs(30);
/// How long a child waits for a condition (shorter than [`DEADLINE`], so the child reports it).
pub(crate) const CHILD_DEADLINE: Duration = Duration::from_secs(15);
const POLL: Duration = Duration::from_millis(1);

/// Small capacities that tests use unless they need particular ones.
pub(crate) fn small_caps() -> Capacities {
    Capacities {
        max_locks: 1024,
        max_holds: 1024,
        max_owners: 32,
        ..Default::default()
    }
}

/// Polls `cond` until it holds; panics (naming `what`) after [`CHILD_DEADLINE`].
pub(crate) fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + CHILD_DEADLINE;
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "gave up after {CHILD_DEADLINE:?} waiting for {what}"
        );
        std::thread::sleep(POLL);
    }
}

/// Runs `f` on a thread of its own and returns its result; panics if it has not returned after
/// [`DEADLINE`] (the thread is left behind). For calls that must not block, or block only briefly.
pub(crate) fn within<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(DEADLINE) {
        Ok(v) => v,
        Err(mpsc::RecvTimeoutError::Timeout) => panic!("{what} did not return within {DEADLINE:?}"),
        Err(mpsc::RecvTimeoutError::Disconnected) => panic!("{what} panicked"),
    }
}

/// Makes `path` appear, complete, with `content` (written aside, then renamed into place).
pub(crate) fn signal(path: &Path, content: &str) {
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, content).unwrap_or_else(|e| panic!("write {}: {e}", tmp.display()));
    fs::rename(&tmp, path).unwrap_or_else(|e| panic!("rename to {}: {e}", path.display()));
}

/// Waits (up to [`CHILD_DEADLINE`]) until `path` exists; returns its content.
pub(crate) fn await_file(path: &Path) -> String {
    wait_until(&format!("file {}", path.display()), || path.exists());
    fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// A file of u64 words, read and written with plain `pread`/`pwrite`: memory shared by processes
/// that is independent of the lock table, with deliberately non-atomic read-modify-writes.
#[derive(Debug)]
pub(crate) struct Words {
    file: File,
}

impl Words {
    /// Creates `path` with `n` zero words.
    pub(crate) fn create(path: &Path, n: usize) -> Words {
        fs::write(path, vec![0u8; n * 8]).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
        Self::open(path)
    }

    pub(crate) fn open(path: &Path) -> Words {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
        Words { file }
    }

    pub(crate) fn get(&self, i: usize) -> u64 {
        let mut b = [0u8; 8];
        self.file.read_exact_at(&mut b, i as u64 * 8).expect("pread");
        u64::from_le_bytes(b)
    }

    pub(crate) fn set(&self, i: usize, v: u64) {
        self.file.write_all_at(&v.to_le_bytes(), i as u64 * 8).expect("pwrite");
    }
}

/// Word of a counter witness ([`Words`]) naming the child inside the critical section (0: none).
pub(crate) const FLAG: usize = 0;
/// Word of a counter witness counting the critical sections entered.
pub(crate) const COUNT: usize = 1;

/// One witnessed critical section of child `id` (iteration `i`), to run while holding the lock:
/// asserts nobody else is inside, marks itself inside, bumps the count (yielding now and then to
/// widen the window and let others queue), and asserts nobody entered meanwhile.
pub(crate) fn witnessed_section(words: &Words, id: u64, i: u64) {
    let flag = words.get(FLAG);
    assert_eq!(
        flag, 0,
        "child {id}, iteration {i}: child {flag} is in the critical section too"
    );
    words.set(FLAG, id);
    let c = words.get(COUNT);
    if i % 4 == 0 {
        std::thread::yield_now();
    }
    words.set(COUNT, c + 1);
    let flag = words.get(FLAG);
    assert_eq!(
        flag, id,
        "child {id}, iteration {i}: child {flag} entered the critical section"
    );
    words.set(FLAG, 0);
}

/// An append-only event log shared by processes: each line is one `write` to an `O_APPEND` file,
/// so lines never interleave and their order is the order in which the writes happened.
#[derive(Debug)]
pub(crate) struct Log {
    file: File,
    path: PathBuf,
}

impl Log {
    /// Opens (creating) the log at `path`.
    pub(crate) fn open(path: &Path) -> Log {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
        Log {
            file,
            path: path.to_path_buf(),
        }
    }

    /// Appends `line` with one `write`.
    pub(crate) fn append(&self, line: &str) {
        let rec = format!("{line}\n");
        let n = (&self.file).write(rec.as_bytes()).expect("append");
        assert_eq!(n, rec.len(), "short append to {}", self.path.display());
    }

    /// The lines of the log so far.
    pub(crate) fn lines(&self) -> Vec<String> {
        read_lines(&self.path)
    }
}

/// The lines of the file at `path` (none if it does not exist).
pub(crate) fn read_lines(path: &Path) -> Vec<String> {
    match fs::read_to_string(path) {
        Ok(s) => s.lines().map(str::to_string).collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => panic!("read {}: {e}", path.display()),
    }
}

/// A child process spawned by a [`TestEnv`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ChildId(usize);

#[derive(Debug)]
struct Proc {
    what: String,
    child: Child,
    log: PathBuf,
    status: Option<ExitStatus>,
    /// Killed on purpose by the test: its death is no failure.
    killed: bool,
}

impl Proc {
    fn describe(&self) -> String {
        let log = fs::read_to_string(&self.log).unwrap_or_default();
        format!("child {} (pid {}); its output:\n{log}", self.what, self.child.id())
    }
}

/// One test's segment, witness directory and child processes.
#[derive(Debug)]
pub(crate) struct TestEnv {
    /// The segment name.
    pub(crate) segment: String,
    /// The witness directory.
    pub(crate) dir: PathBuf,
    /// The parent's mapping of the table.
    pub(crate) table: Arc<LockTable>,
    children: Mutex<Vec<Proc>>,
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

impl TestEnv {
    /// A fresh environment with [`small_caps`].
    pub(crate) fn new(test: &str) -> TestEnv {
        Self::with_caps(test, &small_caps())
    }

    /// A fresh environment whose segment is created with `caps`.
    pub(crate) fn with_caps(test: &str, caps: &Capacities) -> TestEnv {
        let unique = format!(
            "shmlock-t-{test}-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let segment = format!("/{unique}");
        // A leftover of an earlier run whose pid was the same is stale.
        let _ = Segment::unlink(&segment);
        let table = LockTable::create(&segment, caps).unwrap_or_else(|e| panic!("create {segment}: {e}"));
        let dir = std::env::temp_dir().join(&unique);
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
        TestEnv {
            segment,
            dir,
            table: Arc::new(table),
            children: Mutex::new(Vec::new()),
        }
    }

    fn procs(&self) -> MutexGuard<'_, Vec<Proc>> {
        self.children.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A new client (owner) of the table in this process.
    pub(crate) fn client(&self, label: &str) -> Client {
        Client::with_table(Arc::clone(&self.table), label).expect("register client")
    }

    /// A path in the witness directory.
    pub(crate) fn path(&self, file: &str) -> PathBuf {
        self.dir.join(file)
    }

    /// Starts a child process in `role` with `params` (read back with [`ChildCtx::param`]).
    pub(crate) fn spawn(&self, role: &str, params: &[(&str, &dyn Display)]) -> ChildId {
        let mut children = self.procs();
        let n = children.len();
        let what = format!("#{n} {role} {}", {
            let p: Vec<String> = params.iter().map(|(k, v)| format!("{k}={v}")).collect();
            p.join(" ")
        });
        let log = self.dir.join(format!("child-{n}-{role}.log"));
        let out = File::create(&log).unwrap_or_else(|e| panic!("create {}: {e}", log.display()));
        let exe = std::env::current_exe().expect("current_exe");
        let mut cmd = Command::new(exe);
        cmd.args(["--exact", CHILD_TEST, "--nocapture", "--test-threads=1"])
            .env(ROLE_VAR, role)
            .env(SEGMENT_VAR, &self.segment)
            .env(DIR_VAR, &self.dir)
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("dup log"))
            .stderr(out);
        for (k, v) in params {
            cmd.env(format!("{PARAM_PREFIX}{}", k.to_uppercase()), v.to_string());
        }
        let child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {what}: {e}"));
        children.push(Proc {
            what,
            child,
            log,
            status: None,
            killed: false,
        });
        ChildId(n)
    }

    /// The child's process id.
    pub(crate) fn pid(&self, id: ChildId) -> u32 {
        self.procs()[id.0].child.id()
    }

    /// Kills the child with SIGKILL and waits for it (so it is not left a zombie).
    pub(crate) fn kill(&self, id: ChildId) -> ExitStatus {
        let mut children = self.procs();
        let p = &mut children[id.0];
        if let Some(s) = p.status {
            return s;
        }
        let _ = p.child.kill();
        let s = p.child.wait().expect("waitpid");
        p.status = Some(s);
        p.killed = true;
        s
    }

    /// The child's exit status if it has exited (reaping it), None while it runs.
    pub(crate) fn try_status(&self, id: ChildId) -> Option<ExitStatus> {
        let mut children = self.procs();
        let p = &mut children[id.0];
        if p.status.is_none() {
            p.status = p.child.try_wait().expect("waitpid");
        }
        p.status
    }

    /// Waits for the child to exit; kills it (SIGKILL) and fails the test after [`DEADLINE`].
    pub(crate) fn wait(&self, id: ChildId) -> ExitStatus {
        let deadline = Instant::now() + DEADLINE;
        loop {
            {
                let mut children = self.procs();
                let p = &mut children[id.0];
                if let Some(s) = p.status {
                    return s;
                }
                if let Some(s) = p.child.try_wait().expect("waitpid") {
                    p.status = Some(s);
                    return s;
                }
                if Instant::now() >= deadline {
                    let _ = p.child.kill();
                    p.status = p.child.wait().ok();
                    panic!("did not exit within {DEADLINE:?}, killed: {}", p.describe());
                }
            }
            std::thread::sleep(POLL);
        }
    }

    /// Waits for the child to exit; fails the test unless its child test ran and passed.
    pub(crate) fn wait_success(&self, id: ChildId) {
        let status = self.wait(id);
        let children = self.procs();
        let p = &children[id.0];
        let log = fs::read_to_string(&p.log).unwrap_or_default();
        assert!(
            status.success() && log.contains("1 passed"),
            "exited with {status}: {}",
            p.describe()
        );
    }

    /// [`wait_success`](Self::wait_success) for every child spawned so far.
    pub(crate) fn wait_all(&self) {
        let n = self.procs().len();
        for i in 0..n {
            self.wait_success(ChildId(i));
        }
    }

    /// Like [`wait_all`](Self::wait_all), and meanwhile runs the table's `check()` over and over:
    /// the table must be consistent at every instant, not only when quiet.
    pub(crate) fn wait_all_checked(&self) {
        let mut checks = 0;
        self.wait_for("every child to exit", |t| {
            let problems = t.check();
            assert!(problems.is_empty(), "check {checks} found:\n{}", problems.join("\n"));
            checks += 1;
            self.procs().iter_mut().all(|p| {
                if p.status.is_none() {
                    p.status = p.child.try_wait().expect("waitpid");
                }
                p.status.is_some()
            })
        });
        self.wait_all();
    }

    /// Polls `cond` until it holds; fails the test after [`DEADLINE`], or as soon as a child has
    /// exited with a failure.
    pub(crate) fn wait_for(&self, what: &str, cond: impl FnMut(&LockTable) -> bool) {
        self.wait_for_within(what, DEADLINE, cond);
    }

    /// [`wait_for`](Self::wait_for) with deadline `limit`.
    pub(crate) fn wait_for_within(&self, what: &str, limit: Duration, mut cond: impl FnMut(&LockTable) -> bool) {
        let deadline = Instant::now() + limit;
        while !cond(&self.table) {
            for p in self.procs().iter_mut() {
                if p.status.is_none() {
                    p.status = p.child.try_wait().expect("waitpid");
                }
                if let Some(s) = p.status.filter(|s| !s.success() && !p.killed) {
                    panic!("while waiting for {what}: exited with {s}: {}", p.describe());
                }
            }
            assert!(Instant::now() < deadline, "gave up after {limit:?} waiting for {what}");
            std::thread::sleep(POLL);
        }
    }

    /// Waits until `n` children have called [`ChildCtx::barrier`], then lets them all go on.
    pub(crate) fn release_barrier(&self, n: usize) {
        let ready = |_: &LockTable| {
            fs::read_dir(&self.dir)
                .expect("read_dir")
                .filter(|e| {
                    e.as_ref()
                        .is_ok_and(|e| e.file_name().to_string_lossy().starts_with("ready-"))
                })
                .count()
                >= n
        };
        self.wait_for(&format!("{n} children at the barrier"), ready);
        signal(&self.path("go"), "");
    }

    /// Asserts that the table is consistent and nothing is held or waited on.
    pub(crate) fn assert_quiet(&self) {
        let problems = self.table.check();
        assert!(problems.is_empty(), "table check found:\n{}", problems.join("\n"));
        let st = self.table.stats();
        assert_eq!((st.held, st.shared_holds, st.waiting), (0, 0, 0), "{st:?}");
    }
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        for p in self.children.get_mut().unwrap_or_else(|e| e.into_inner()) {
            if p.status.is_none() {
                if let Ok(None) = p.child.try_wait() {
                    let _ = p.child.kill(); // SIGKILL
                }
                let _ = p.child.wait();
            }
        }
        let _ = Segment::unlink(&self.segment);
        if std::thread::panicking() {
            eprintln!("keeping {} for inspection", self.dir.display());
        } else {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

/// What a child process was started to do.
#[derive(Debug)]
pub(crate) struct ChildCtx {
    /// The role.
    pub(crate) role: String,
    segment: String,
    dir: PathBuf,
}

impl ChildCtx {
    /// The context, if this process is a child (`SHMLOCK_TEST_ROLE` is set).
    pub(crate) fn from_env() -> Option<ChildCtx> {
        let role = std::env::var(ROLE_VAR).ok()?;
        Some(ChildCtx {
            role,
            segment: std::env::var(SEGMENT_VAR).expect(SEGMENT_VAR),
            dir: std::env::var(DIR_VAR).expect(DIR_VAR).into(),
        })
    }

    /// Parameter `key`, parsed.
    pub(crate) fn param<T: FromStr>(&self, key: &str) -> T
    where
        T::Err: Debug,
    {
        let var = format!("{PARAM_PREFIX}{}", key.to_uppercase());
        let v = std::env::var(&var).unwrap_or_else(|_| panic!("parameter {key} ({var}) missing"));
        v.parse().unwrap_or_else(|e| panic!("parameter {key}={v:?}: {e:?}"))
    }

    /// Parameter `key` if it was given.
    pub(crate) fn opt_param(&self, key: &str) -> Option<String> {
        std::env::var(format!("{PARAM_PREFIX}{}", key.to_uppercase())).ok()
    }

    /// A client of the test's segment, labelled `label`.
    pub(crate) fn client(&self, label: &str) -> Client {
        let table = LockTable::open(&self.segment).unwrap_or_else(|e| panic!("open {}: {e}", self.segment));
        Client::with_table(Arc::new(table), label).expect("register client")
    }

    /// A path in the witness directory.
    pub(crate) fn path(&self, file: &str) -> PathBuf {
        self.dir.join(file)
    }

    /// Waits until the parent lets every child go at once ([`TestEnv::release_barrier`]), so that
    /// they really run concurrently.
    pub(crate) fn barrier(&self) {
        signal(&self.path(&format!("ready-{}", std::process::id())), "");
        await_file(&self.path("go"));
    }
}

/// A `shmlockd` without its gateway on the test's segment (its log in the witness directory);
/// SIGKILLed when dropped.
pub(crate) struct Daemon(pub(crate) Child);

impl Daemon {
    /// Starts it and waits until it has claimed the segment.
    pub(crate) fn start(env: &TestEnv) -> Daemon {
        static STARTS: AtomicU32 = AtomicU32::new(0);
        let n = STARTS.fetch_add(1, Ordering::Relaxed);
        let log = File::create(env.path(&format!("shmlockd-{n}.log"))).expect("daemon log");
        let child = Command::new(env!("CARGO_BIN_EXE_shmlockd"))
            .args(["--segment", &env.segment, "--log-level", "debug", "--no-gateway"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup"))
            .stderr(log)
            .spawn()
            .expect("spawn shmlockd");
        let pid = child.id();
        wait_until("shmlockd to claim the segment", || {
            env.table.supervisor().is_some_and(|p| p.pid == pid)
        });
        Daemon(child)
    }

    /// SIGKILLs it and reaps it.
    pub(crate) fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A `shmlockd` with its gateway on the test's segment and a free loopback port; SIGKILLed when
/// dropped if still running.
pub(crate) struct GatewayDaemon {
    pub(crate) child: Child,
    /// The gateway's address, from the daemon's `gateway ready listen=` line.
    pub(crate) addr: String,
    log: PathBuf,
}

impl GatewayDaemon {
    /// Starts it with `config` (TOML) if given, and waits until its gateway listens.
    pub(crate) fn start(env: &TestEnv, config: Option<&str>) -> GatewayDaemon {
        let log = env.path("shmlockd.log");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_shmlockd"));
        cmd.args([
            "--segment",
            &env.segment,
            "--listen",
            "127.0.0.1:0",
            "--log-level",
            "info",
        ]);
        if let Some(text) = config {
            let path = env.path("shmlock.toml");
            fs::write(&path, text).expect("write config");
            cmd.arg("--config").arg(path);
        }
        let child = cmd
            .env_remove("SHMLOCK_SEGMENT")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&log).expect("log"))
            .spawn()
            .expect("spawn shmlockd");
        let mut d = GatewayDaemon {
            child,
            addr: String::new(),
            log,
        };
        wait_until("shmlockd to log its gateway address", || {
            let text = d.log();
            if let Some(i) = text.find("gateway ready listen=") {
                let rest = &text[i + "gateway ready listen=".len()..];
                d.addr = rest.split_whitespace().next().unwrap_or("").to_string();
            }
            assert!(
                d.child.try_wait().expect("waitpid").is_none(),
                "shmlockd exited:\n{text}"
            );
            !d.addr.is_empty()
        });
        d
    }

    /// Its log so far.
    pub(crate) fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends SIGTERM; returns how long shmlockd took to exit, and its status (fails after
    /// [`DEADLINE`]).
    pub(crate) fn terminate(&mut self) -> (Duration, ExitStatus) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::SIGTERM).expect("SIGTERM");
        let t0 = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait().expect("waitpid") {
                return (t0.elapsed(), s);
            }
            assert!(
                t0.elapsed() < DEADLINE,
                "shmlockd did not stop after SIGTERM:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// SIGKILLs it and reaps it.
    pub(crate) fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for GatewayDaemon {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A raw connection to a gateway: send lines, read lines, every read with [`DEADLINE`].
pub(crate) struct Raw {
    pub(crate) w: std::net::TcpStream,
    pub(crate) r: std::io::BufReader<std::net::TcpStream>,
}

impl Raw {
    /// Connects and reads the greeting.
    pub(crate) fn connect(addr: impl std::net::ToSocketAddrs) -> Raw {
        let mut raw = Self::connect_bare(addr);
        let hello = raw.line();
        assert!(hello.starts_with("* HELLO shmlock 1 "), "{hello}");
        raw
    }

    /// Connects, leaving the greeting unread.
    pub(crate) fn connect_bare(addr: impl std::net::ToSocketAddrs) -> Raw {
        let w = std::net::TcpStream::connect(addr).expect("connect");
        w.set_read_timeout(Some(DEADLINE)).unwrap();
        let r = std::io::BufReader::new(w.try_clone().unwrap());
        Raw { w, r }
    }

    pub(crate) fn send(&mut self, text: &str) {
        self.w.write_all(text.as_bytes()).expect("send");
    }

    /// The next line without its LF; "" at EOF (or a reset).
    pub(crate) fn line(&mut self) -> String {
        use std::io::BufRead;
        let mut s = String::new();
        match self.r.read_line(&mut s) {
            Ok(_) => s.trim_end_matches('\n').to_string(),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => String::new(),
            Err(e) => panic!("read (a deadline passed?): {e}"),
        }
    }

    /// Sends `text` and a LF, and reads one line.
    pub(crate) fn ask(&mut self, text: &str) -> String {
        self.send(&format!("{text}\n"));
        self.line()
    }

    /// Reads until EOF (or a reset); fails after the deadline.
    pub(crate) fn expect_closed(&mut self) {
        use std::io::Read;
        let mut rest = Vec::new();
        let _ = self.r.read_to_end(&mut rest);
    }
}
