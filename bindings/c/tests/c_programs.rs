//! The C library from C, with real processes: installs the library built for this test run into
//! a temporary PREFIX with install.sh, compiles tests/c/*.c and examples/quickstart.c with the
//! system `cc` against the installed header and library (`pkg-config --cflags --libs shmlock`),
//! and runs them. Each test has a segment of its own (created here, removed at the end).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Output, Stdio};
use std::sync::mpsc;
use std::sync::OnceLock;
use std::time::Duration;

use shmlock_core::{Capacities, LockTable, Segment};

/// Longest a C program may run before the test calls it hung.
const DEADLINE: Duration = Duration::from_secs(60);

/// The build of this test run: target/<profile>, where the test binary's deps/ folder is.
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    exe.parent()
        .and_then(Path::parent)
        .expect("the test runs from target/<profile>/deps")
        .to_path_buf()
}

/// `cargo build ARGS` into this run's target dir and profile (cargo test does not rebuild a
/// cdylib-only library for its integration tests, nor another package's binary).
fn cargo_build(args: &[&str]) {
    let profile = profile_dir();
    let target = profile.parent().expect("target dir").to_path_buf();
    let mut cmd = Command::new(env!("CARGO"));
    cmd.arg("build")
        .args(args)
        .env("CARGO_TARGET_DIR", &target)
        .current_dir(manifest_dir());
    if profile.file_name().is_some_and(|n| n == "release") {
        cmd.arg("--release");
    }
    check(&format!("cargo build {}", args.join(" ")), run(cmd));
}

/// shmlockd of the top crate, built for this run.
fn shmlockd() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        cargo_build(&["-p", "shmlock", "--bin", "shmlockd"]);
        profile_dir().join("shmlockd")
    })
    .clone()
}

fn manifest_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// What the tests share: the install PREFIX and the compiled programs.
struct Built {
    dir: PathBuf,
    prefix: PathBuf,
}

impl Built {
    fn program(&self, name: &str) -> PathBuf {
        self.dir.join("bin").join(name)
    }
}

fn check(what: &str, out: Output) -> Output {
    assert!(
        out.status.success(),
        "{what} failed ({}):\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Removes the folders of earlier runs whose process is gone.
fn sweep(root: &Path) {
    let Ok(entries) = std::fs::read_dir(root) else { return };
    for e in entries.flatten() {
        let pid = e.file_name().to_string_lossy().parse::<u32>().ok();
        if pid.is_some_and(|p| p != std::process::id() && !Path::new(&format!("/proc/{p}")).exists()) {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// `pkg-config ARGS shmlock` against the PREFIX, split into words.
fn pkg_config(prefix: &Path, args: &[&str]) -> Vec<String> {
    let out = check(
        "pkg-config",
        Command::new("pkg-config")
            .args(args)
            .arg("shmlock")
            .env("PKG_CONFIG_PATH", prefix.join("lib/pkgconfig"))
            .output()
            .expect("run pkg-config (is it installed?)"),
    );
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

fn built() -> &'static Built {
    static BUILT: OnceLock<Built> = OnceLock::new();
    BUILT.get_or_init(|| {
        let profile = profile_dir();
        let root = profile.join("c-tests");
        sweep(&root);
        let dir = root.join(std::process::id().to_string());
        let _ = std::fs::remove_dir_all(&dir);
        let prefix = dir.join("prefix");
        std::fs::create_dir_all(dir.join("bin")).expect("mkdir");
        cargo_build(&["-p", "shmlock-c", "--lib"]);
        check(
            "install.sh",
            Command::new("bash")
                .arg(manifest_dir().join("install.sh"))
                .arg(&prefix)
                .env("SHMLOCK_LIB_DIR", &profile)
                .output()
                .expect("run install.sh"),
        );
        let flags = pkg_config(&prefix, &["--cflags", "--libs"]);
        let rpath = format!("-Wl,-rpath,{}", prefix.join("lib").display());
        let sources = [
            ("counter", manifest_dir().join("tests/c/counter.c")),
            ("cases", manifest_dir().join("tests/c/cases.c")),
            ("quickstart", manifest_dir().join("examples/quickstart.c")),
            ("bench", manifest_dir().join("examples/bench.c")),
        ];
        for (name, src) in sources {
            check(
                &format!("cc {}", src.display()),
                Command::new("cc")
                    .args(["-std=c11", "-D_GNU_SOURCE", "-O2", "-Wall", "-Wextra", "-Werror"])
                    .arg(&src)
                    .arg("-o")
                    .arg(dir.join("bin").join(name))
                    .args(&flags)
                    .arg(&rpath)
                    .output()
                    .expect("run cc (is a C compiler installed?)"),
            );
        }
        // The static library too: the quick start linked with libshmlock.a and what it needs.
        let mut libs = pkg_config(&prefix, &["--static", "--libs-only-l"]);
        libs.retain(|l| l != "-lshmlock");
        check(
            "cc quickstart.c (static)",
            Command::new("cc")
                .args(["-std=c11", "-O2", "-Wall", "-Werror"])
                .args(pkg_config(&prefix, &["--cflags"]))
                .arg(manifest_dir().join("examples/quickstart.c"))
                .arg(prefix.join("lib/libshmlock.a"))
                .args(&libs)
                .arg("-o")
                .arg(dir.join("bin/quickstart-static"))
                .output()
                .expect("run cc"),
        );
        Built { dir, prefix }
    })
}

/// A segment of this test's own, removed when dropped.
struct TestSegment {
    name: String,
}

impl TestSegment {
    fn new(test: &str) -> TestSegment {
        let name = format!("/shmlock-ctest-{}-{test}", std::process::id());
        let _ = Segment::unlink(&name);
        let caps = Capacities {
            max_locks: 256,
            max_holds: 256,
            max_owners: 64,
            ..Default::default()
        };
        LockTable::create(&name, &caps).expect("create the test segment");
        TestSegment { name }
    }
}

impl Drop for TestSegment {
    fn drop(&mut self) {
        let _ = Segment::unlink(&self.name);
    }
}

/// Runs `cmd` to its end (killed after [`DEADLINE`]).
fn run(mut cmd: Command) -> Output {
    let shown = format!("{cmd:?}");
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {shown}: {e}"));
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(DEADLINE) {
        Ok(out) => out.expect("wait"),
        Err(_) => {
            let _ = kill(pid, libc::SIGKILL);
            panic!("{shown} did not finish within {DEADLINE:?}");
        }
    }
}

fn kill(pid: u32, sig: i32) -> std::io::Result<()> {
    let pid = i32::try_from(pid).map_err(std::io::Error::other)?;
    // SAFETY: kill(2) takes no pointers; `pid` is a child of this process.
    if unsafe { libc::kill(pid, sig) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn cases(args: &[&str]) -> Command {
    let mut cmd = Command::new(built().program("cases"));
    cmd.args(args);
    cmd
}

/// `cases ARGS` succeeds.
fn run_case(args: &[&str]) -> Output {
    check(&format!("cases {}", args.join(" ")), run(cases(args)))
}

/// A `cases hold` process: it holds the lock once [`Holder::start`] returns, and unlocks at EOF
/// on its stdin ([`Holder::release`]).
struct Holder {
    child: Child,
    stdin: Option<ChildStdin>,
}

impl Holder {
    fn start(seg: &TestSegment, name: &str, mode: &str) -> Holder {
        let mut child = cases(&["hold", &seg.name, name, mode])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn the holder");
        let stdin = child.stdin.take();
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("read the holder's line");
        assert!(line.starts_with("held token="), "the holder said {line:?}");
        Holder { child, stdin }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Lets it unlock and exit; it must exit 0.
    fn release(mut self) {
        drop(self.stdin.take());
        let st = self.child.wait().expect("wait for the holder");
        assert!(st.success(), "the holder failed: {st}");
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn exclusion_across_processes_with_a_witness_outside_the_lock() {
    let seg = TestSegment::new("excl");
    let b = built();
    let witness = b.dir.join("witness-excl");
    std::fs::write(&witness, "0\n").unwrap();
    let (procs, iters) = (4, 1500);
    let children: Vec<_> = (0..procs)
        .map(|_| {
            let mut cmd = Command::new(b.program("counter"));
            cmd.args([&seg.name, "counter", &iters.to_string()]).arg(&witness);
            std::thread::spawn(move || run(cmd))
        })
        .collect();
    for c in children {
        check("counter", c.join().expect("join"));
    }
    let n: u64 = std::fs::read_to_string(&witness).unwrap().trim().parse().unwrap();
    assert_eq!(n, procs * iters, "increments were lost: exclusion failed");
}

#[test]
fn try_lock_is_busy_and_a_timeout_names_the_holder() {
    let seg = TestSegment::new("busy");
    let holder = Holder::start(&seg, "busy", "exclusive");
    run_case(&["busy", &seg.name, "busy", &holder.pid().to_string()]);
    holder.release();
}

#[test]
fn shared_mode_admits_readers_and_keeps_a_writer_out() {
    let seg = TestSegment::new("shared");
    let holder = Holder::start(&seg, "cfg", "shared");
    run_case(&["shared", &seg.name, "cfg"]);
    holder.release();
    // And an exclusive holder keeps shared requests out (`busy` tries both modes).
    let holder = Holder::start(&seg, "cfg", "exclusive");
    run_case(&["busy", &seg.name, "cfg", &holder.pid().to_string()]);
    holder.release();
}

#[test]
fn the_next_locker_sees_owner_died_after_a_holder_is_sigkilled() {
    let seg = TestSegment::new("died");
    let mut holder = Holder::start(&seg, "jobs/7", "exclusive");
    kill(holder.pid(), libc::SIGKILL).expect("SIGKILL the holder");
    let st = holder.child.wait().expect("reap the holder");
    assert!(!st.success());
    run_case(&["died", &seg.name, "jobs/7"]);
}

#[test]
fn a_forked_child_using_its_parents_client_gets_forked_and_the_lock_stays_held() {
    let seg = TestSegment::new("fork");
    run_case(&["fork", &seg.name, "f"]);
}

#[test]
fn null_pointers_bad_names_and_modes_get_their_statuses() {
    let seg = TestSegment::new("args");
    run_case(&["args", &seg.name]);
}

#[test]
fn threads_share_a_client_as_one_owner_and_exclude_each_other_with_their_own() {
    let seg = TestSegment::new("threads");
    run_case(&["threads", &seg.name]);
}

#[test]
fn the_quick_start_runs_linked_both_ways() {
    let seg = TestSegment::new("quick");
    let b = built();
    for prog in ["quickstart", "quickstart-static"] {
        let mut cmd = Command::new(b.program(prog));
        cmd.env("SHMLOCK_SEGMENT", &seg.name);
        let out = check(prog, run(cmd));
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("token"), "{prog} printed {text:?}");
    }
}

#[test]
fn the_bench_runs() {
    let seg = TestSegment::new("bench");
    for extra in [None, Some("--scoped")] {
        let mut cmd = Command::new(built().program("bench"));
        cmd.args(["--ops", "20000", "--segment", &seg.name, "--json"])
            .args(extra);
        let out = check("bench", run(cmd));
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("\"ns_per_op\""), "bench printed {text:?}");
    }
}

/// shmlockd on `seg` with its gateway on a free port; killed when dropped.
struct Gateway {
    child: Child,
    addr: String,
}

impl Gateway {
    fn start(seg: &TestSegment, dir: &Path) -> Gateway {
        let log = dir.join(format!("shmlockd-{}.log", seg.name.trim_start_matches('/')));
        let mut child = Command::new(shmlockd())
            .args(["--segment", &seg.name, "--listen", "127.0.0.1:0", "--log-level", "info"])
            .env_remove("SHMLOCK_SEGMENT")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log"))
            .spawn()
            .expect("spawn shmlockd");
        let t0 = std::time::Instant::now();
        loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if let Some(i) = text.find("gateway ready listen=") {
                let rest = &text[i + "gateway ready listen=".len()..];
                let addr = rest.split_whitespace().next().unwrap_or("").to_string();
                if !addr.is_empty() {
                    return Gateway { child, addr };
                }
            }
            assert!(child.try_wait().expect("waitpid").is_none(), "shmlockd exited:\n{text}");
            assert!(t0.elapsed() < DEADLINE, "shmlockd did not start its gateway:\n{text}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `shmlock` (the CLI) of the top crate, built for this run.
fn shmlock_cli() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        cargo_build(&["-p", "shmlock", "--bin", "shmlock"]);
        profile_dir().join("shmlock")
    })
    .clone()
}

#[test]
fn c_rust_and_shmlock_run_exclude_each_other_on_one_segment() {
    let seg = TestSegment::new("interop");
    let shmlock = shmlock_cli();
    // A C holder: this Rust process and `shmlock run` find the lock busy.
    let holder = Holder::start(&seg, "interop", "exclusive");
    let rust = shmlock_core::Client::open(&seg.name).expect("open from Rust");
    assert!(matches!(rust.try_lock("interop"), Err(shmlock_core::Error::WouldBlock)));
    let mut cmd = Command::new(&shmlock);
    cmd.args(["run", "--segment", &seg.name, "--nonblock", "interop", "--", "true"]);
    let out = run(cmd);
    assert_eq!(
        out.status.code(),
        Some(75),
        "shmlock run must give up (EX_TEMPFAIL): {out:?}"
    );
    holder.release();
    // A Rust holder: C finds it busy and its timeout names this process.
    let guard = rust.lock("interop").expect("lock from Rust");
    assert!(!guard.owner_died());
    run_case(&["busy", &seg.name, "interop", &std::process::id().to_string()]);
    drop(guard);
    // `shmlock run` holding it while its command, a C program, finds it busy.
    let mut cmd = Command::new(&shmlock);
    cmd.args(["run", "--segment", &seg.name, "interop", "--"])
        .arg(built().program("cases"))
        .args(["busy", &seg.name, "interop", "keeper"]);
    check("shmlock run -- cases busy", run(cmd));
}

#[test]
fn a_remote_client_locks_through_the_gateway_on_the_same_table() {
    let seg = TestSegment::new("remote");
    let gw = Gateway::start(&seg, &built().dir);
    run_case(&["remote", &gw.addr, &seg.name]);
}

#[test]
fn guard_handles_are_held_at_once_unlocked_in_any_order_and_from_any_thread() {
    let seg = TestSegment::new("cells");
    run_case(&["cells", &seg.name]);
}

#[test]
fn a_remote_guard_is_lost_once_its_gateway_is_gone_and_a_local_one_never() {
    let seg = TestSegment::new("lost");
    let gw = Gateway::start(&seg, &built().dir);
    let mut child = cases(&["lost", &gw.addr, &seg.name])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn cases lost");
    let stdin = child.stdin.take();
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("read its line");
    assert_eq!(line, "held\n");
    // SIGKILL shmlockd and reap it: its end closes the session's connection.
    drop(gw);
    drop(stdin);
    let st = child.wait().expect("wait for cases lost");
    assert!(st.success(), "cases lost failed: {st}");
}

#[test]
fn the_installed_files_are_where_pkg_config_says() {
    let b = built();
    for f in [
        "lib/libshmlock.so",
        "lib/libshmlock.so.1",
        "lib/libshmlock.a",
        "include/shmlock.h",
        "lib/pkgconfig/shmlock.pc",
    ] {
        assert!(b.prefix.join(f).exists(), "{f} was not installed");
    }
    let cflags = pkg_config(&b.prefix, &["--cflags"]);
    assert_eq!(cflags, vec![format!("-I{}", b.prefix.join("include").display())]);
}
