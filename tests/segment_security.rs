//! Whose segment is trusted: symbolic links, other owners, extra hard links and wide modes are
//! refused by the library, the `shmlock` CLI and `shmlockd`; `--remove-on-exit` removes a segment
//! only when no live process but shmlockd uses it.
//!
//! The owner tests give a real segment to user `nobody` (uid 65534) with chown, which needs
//! root; run as another user they say so on stderr and check what needs no privilege (a segment
//! of ours refused when another owner is required). shmlockd, shmlock and lock holders are real
//! processes; every wait has a deadline.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::cli::{output_within, role_hold, spawn_holder, stderr};
use common::{signal, TestEnv, DEADLINE};
use shmlock::shm::{SegmentOwner, SEGMENT_OWNER_ENV};
use shmlock::{Client, Error, LockTable};

/// The uid the owner tests give segments to.
const NOBODY: u32 = 65534;

common::child_roles! {
    "hold" => role_hold,
}

fn shm_path(segment: &str) -> PathBuf {
    PathBuf::from(format!("/dev/shm{segment}"))
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// A name in /dev/shm made by a test (a link), removed on drop.
struct Planted(PathBuf);

impl Drop for Planted {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Runs `shmlock ARGS` (with `envs`, and without `$SHMLOCK_SEGMENT_OWNER` unless given).
fn shmlock(args: &[&str], envs: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_shmlock"));
    cmd.args(args).env_remove(SEGMENT_OWNER_ENV).stdin(Stdio::null());
    cmd.envs(envs.iter().copied());
    output_within(
        cmd.stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn shmlock"),
        "shmlock",
    )
}

/// A running `shmlockd`, killed on drop if the test has not stopped it.
struct Daemon {
    child: Child,
    log: PathBuf,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl Daemon {
    /// Starts `shmlockd --no-gateway ARGS` (with `envs`), logging to `log`.
    fn start(log: &Path, args: &[&str], envs: &[(&str, &str)]) -> Daemon {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_shmlockd"));
        cmd.arg("--no-gateway")
            .args(args)
            .env_remove(SEGMENT_OWNER_ENV)
            .envs(envs.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).expect("create log"));
        Daemon {
            child: cmd.spawn().expect("spawn shmlockd"),
            log: log.to_path_buf(),
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until it supervises `table` (fails at once if it exits first).
    fn await_claim(&mut self, table: &LockTable) {
        let pid = self.child.id();
        let deadline = Instant::now() + DEADLINE;
        while table.supervisor().is_none_or(|p| p.pid != pid) {
            if let Some(s) = self.child.try_wait().expect("waitpid") {
                panic!("shmlockd exited with {s} before supervising:\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "shmlockd did not claim the segment:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Waits for it to exit (SIGKILL and failure after [`DEADLINE`]); returns its exit code.
    fn exit_code(&mut self) -> Option<i32> {
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Some(s) = self.child.try_wait().expect("waitpid") {
                return s.code();
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                panic!("shmlockd did not exit within {DEADLINE:?}:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// SIGTERM, then [`exit_code`](Self::exit_code).
    fn stop(&mut self) -> Option<i32> {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::SIGTERM,
        )
        .expect("SIGTERM shmlockd");
        self.exit_code()
    }
}

/// Runs shmlockd on `segment` (plus `args`, `envs`) and asserts that it refuses to start: exit
/// status 2 and a message containing every one of `parts`. Returns the message.
fn assert_shmlockd_refuses(
    env: &TestEnv,
    segment: &str,
    args: &[&str],
    envs: &[(&str, &str)],
    parts: &[&str],
) -> String {
    let mut all = vec!["--segment", segment];
    all.extend_from_slice(args);
    let mut d = Daemon::start(&env.path("refused.log"), &all, envs);
    let code = d.exit_code();
    let log = d.log();
    assert_eq!(code, Some(2), "shmlockd should refuse {segment}; its log:\n{log}");
    for p in parts {
        assert!(log.contains(p), "shmlockd's message lacks {p:?}:\n{log}");
    }
    log
}

/// shmlockd adopts `env`'s segment with `args`/`envs`, then stops cleanly on SIGTERM.
fn assert_shmlockd_adopts(env: &TestEnv, args: &[&str], envs: &[(&str, &str)]) {
    let mut all = vec!["--segment", env.segment.as_str()];
    all.extend_from_slice(args);
    let mut d = Daemon::start(&env.path("adopt.log"), &all, envs);
    d.await_claim(&env.table);
    assert_eq!(d.stop(), Some(0), "{}", d.log());
    assert!(d.log().contains("adopted segment"), "{}", d.log());
}

// ---- symbolic links ---------------------------------------------------------------------------

#[test]
fn a_symlink_to_a_valid_segment_is_refused_everywhere() {
    let env = TestEnv::new("sec-symlink");
    let link = format!("{}-link", env.segment);
    std::os::unix::fs::symlink(shm_path(&env.segment), shm_path(&link)).expect("symlink");
    let _planted = Planted(shm_path(&link));

    match LockTable::open(&link) {
        Err(Error::SegmentSymlink { name, target }) => {
            assert_eq!(name, link);
            assert_eq!(target.as_deref(), Some(shm_path(&env.segment).to_str().unwrap()));
        }
        other => panic!("LockTable::open of a symlink: {other:?}"),
    }
    match Client::open(&link) {
        Err(e @ Error::SegmentSymlink { .. }) => {
            let msg = e.to_string();
            assert!(
                msg.contains("symbolic link") && msg.contains("refusing to follow"),
                "{msg}"
            );
        }
        other => panic!("Client::open of a symlink: {other:?}"),
    }
    // Even with its owner named explicitly.
    assert!(matches!(
        LockTable::open_as(&link, SegmentOwner::Uid(0)),
        Err(Error::SegmentSymlink { .. })
    ));

    let o = shmlock(&["status", "--segment", &link], &[]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("is a symbolic link"), "{}", stderr(&o));

    assert_shmlockd_refuses(&env, &link, &[], &[], &["is a symbolic link", "refusing to follow it"]);
    // Nothing supervises the segment behind the link, and the link is still only a link.
    assert!(
        env.table.supervisor().is_none(),
        "shmlockd claimed the segment through the link"
    );
    assert!(shm_path(&link).symlink_metadata().unwrap().file_type().is_symlink());
    // The segment itself is fine.
    LockTable::open(&env.segment).expect("the segment itself opens");
}

// ---- other owners ----------------------------------------------------------------------------

#[test]
fn a_segment_owned_by_another_user_is_refused_naming_the_owner() {
    let env = TestEnv::new("sec-owner");
    let path = shm_path(&env.segment);
    let me = nix::unistd::geteuid().as_raw();
    if !is_root() {
        eprintln!(
            "segment_security: not root (uid {me}): cannot give a segment to uid {NOBODY}; checking only \
             that our own segment is refused when uid {NOBODY} is required"
        );
        match LockTable::open_as(&env.segment, SegmentOwner::Uid(NOBODY)) {
            Err(Error::SegmentWrongOwner { uid, .. }) => assert_eq!(uid, me),
            other => panic!("{other:?}"),
        }
        let o = shmlock(
            &[
                "status",
                "--segment",
                &env.segment,
                "--segment-owner",
                &NOBODY.to_string(),
            ],
            &[],
        );
        assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
        assert!(stderr(&o).contains(&format!("(uid {me})")), "{}", stderr(&o));
        return;
    }
    std::os::unix::fs::chown(&path, Some(NOBODY), None).expect("chown to nobody");

    match LockTable::open(&env.segment) {
        Err(e @ Error::SegmentWrongOwner { .. }) => {
            let Error::SegmentWrongOwner {
                uid,
                ref owner,
                ref expected,
                ..
            } = e
            else {
                unreachable!()
            };
            assert_eq!(uid, NOBODY);
            assert!(owner.contains("uid 65534"), "{owner}");
            assert_eq!(expected, "root (uid 0)");
            let msg = e.to_string();
            assert!(
                msg.contains("is owned by") && msg.contains("uid 65534") && msg.contains("refusing it"),
                "{msg}"
            );
        }
        other => panic!("LockTable::open of nobody's segment: {other:?}"),
    }
    assert!(matches!(
        Client::open(&env.segment),
        Err(Error::SegmentWrongOwner { uid: NOBODY, .. })
    ));
    // Named explicitly, that owner is accepted (and then only it).
    LockTable::open_as(&env.segment, SegmentOwner::Uid(NOBODY)).expect("accepted when named");

    // The CLI: refused by default, accepted with the flag or the environment variable.
    let o = shmlock(&["status", "--segment", &env.segment], &[]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("is owned by") && stderr(&o).contains("uid 65534"),
        "{}",
        stderr(&o)
    );
    let o = shmlock(&["status", "--segment", &env.segment, "--segment-owner", "65534"], &[]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let o = shmlock(&["status", "--segment", &env.segment], &[(SEGMENT_OWNER_ENV, "65534")]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));

    // shmlockd: refuses to adopt it, saying who owns it; nothing is claimed.
    assert_shmlockd_refuses(
        &env,
        &env.segment,
        &[],
        &[],
        &["cannot adopt segment", "is owned by", "uid 65534"],
    );
    assert!(env.table.supervisor().is_none(), "shmlockd claimed nobody's segment");
    // Accepted with the owner configured: flag, environment, config file.
    assert_shmlockd_adopts(&env, &["--segment-owner", "65534"], &[]);
    assert_shmlockd_adopts(&env, &[], &[(SEGMENT_OWNER_ENV, "65534")]);
    let config = env.path("owner.toml");
    std::fs::write(&config, "[segment]\nowner = 65534\n").unwrap();
    assert_shmlockd_adopts(&env, &["--config", config.to_str().unwrap()], &[]);
    // A configured owner is the only one accepted: root's own segment is refused then.
    std::os::unix::fs::chown(&path, Some(0), None).expect("chown back to root");
    assert_shmlockd_refuses(
        &env,
        &env.segment,
        &["--segment-owner", "65534"],
        &[],
        &["is owned by root (uid 0)"],
    );
}

#[test]
fn shmlockd_gives_a_segment_it_creates_to_the_configured_owner() {
    if !is_root() {
        eprintln!("segment_security: not root: cannot create a segment for uid {NOBODY}; test skipped");
        return;
    }
    let env = TestEnv::new("sec-create-owner");
    let segment = format!("{}-new", env.segment);
    let _cleanup = Planted(shm_path(&segment));
    let mut d = Daemon::start(
        &env.path("create.log"),
        &["--segment", &segment, "--segment-owner", "nobody"],
        &[],
    );
    let deadline = Instant::now() + DEADLINE;
    let table = loop {
        if let Ok(t) = LockTable::open_as(&segment, SegmentOwner::Uid(NOBODY)) {
            if t.supervisor().is_some() {
                break t;
            }
        }
        assert!(d.child.try_wait().unwrap().is_none(), "shmlockd exited:\n{}", d.log());
        assert!(Instant::now() < deadline, "no segment owned by nobody:\n{}", d.log());
        std::thread::sleep(Duration::from_millis(2));
    };
    use std::os::unix::fs::MetadataExt;
    assert_eq!(std::fs::metadata(shm_path(&segment)).unwrap().uid(), NOBODY);
    drop(table);
    assert_eq!(d.stop(), Some(0), "{}", d.log());
}

// ---- hard links and modes ---------------------------------------------------------------------

#[test]
fn a_hard_linked_segment_is_refused() {
    let env = TestEnv::new("sec-hardlink");
    let other = format!("{}-hl", env.segment);
    std::fs::hard_link(shm_path(&env.segment), shm_path(&other)).expect("hard link");
    let planted = Planted(shm_path(&other));
    for name in [&env.segment, &other] {
        match LockTable::open(name) {
            Err(e @ Error::SegmentLinked { links: 2, .. }) => assert!(e.to_string().contains("2 hard links"), "{e}"),
            other => panic!("open {name} with two links: {other:?}"),
        }
    }
    assert!(matches!(Client::open(&other), Err(Error::SegmentLinked { .. })));
    assert_shmlockd_refuses(&env, &env.segment, &[], &[], &["2 hard links"]);
    drop(planted);
    LockTable::open(&env.segment).expect("one link again: accepted");
}

#[test]
fn shmlockd_refuses_to_adopt_a_segment_with_a_wider_mode_than_configured() {
    let env = TestEnv::new("sec-mode");
    let path = shm_path(&env.segment);
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();
    assert_shmlockd_refuses(&env, &env.segment, &[], &[], &["mode 0o666", "configured mode 0o600"]);
    assert!(env.table.supervisor().is_none());
    // Configured so, it is adopted; clients do not judge the mode.
    let config = env.path("mode.toml");
    std::fs::write(&config, "[segment]\nmode = 0o666\n").unwrap();
    assert_shmlockd_adopts(&env, &["--config", config.to_str().unwrap()], &[]);
    LockTable::open(&env.segment).expect("a client opens it");
}

// ---- --remove-on-exit -------------------------------------------------------------------------

#[test]
fn remove_on_exit_leaves_a_segment_that_a_live_process_holds_a_lock_in() {
    let env = TestEnv::new("sec-remove-live");
    let path = shm_path(&env.segment);
    let mut d = Daemon::start(
        &env.path("d1.log"),
        &["--segment", &env.segment, "--remove-on-exit"],
        &[],
    );
    d.await_claim(&env.table);
    let holder = spawn_holder(&env, &[("x", b"job")], "holder");
    let holder_pid = env.pid(holder);

    assert_eq!(d.stop(), Some(3), "exit status 3: left in use\n{}", d.log());
    let log = d.log();
    assert!(
        log.contains(&format!("still used by pid {holder_pid}")) && log.contains("not removing it"),
        "{log}"
    );
    assert!(
        path.exists(),
        "the segment was removed while pid {holder_pid} holds a lock in it"
    );
    // The holder still holds its lock, and a newcomer opening the name sees that.
    let info = env.table.lock_info(b"job").unwrap().expect("job is there");
    assert_eq!(info.holders.iter().map(|h| h.pid).collect::<Vec<_>>(), [holder_pid]);
    let late = Client::open(&env.segment).expect("the segment still opens");
    assert!(matches!(late.try_lock("job"), Err(Error::WouldBlock)));
    drop(late);

    signal(&env.path("go"), "");
    env.wait_success(holder);
    assert_eq!(std::fs::read_to_string(env.path("result")).unwrap(), "ok");
}

#[test]
fn remove_on_exit_removes_a_segment_nobody_alive_uses_and_retires_it() {
    let env = TestEnv::new("sec-remove-unused");
    let path = shm_path(&env.segment);
    let mut d = Daemon::start(
        &env.path("d.log"),
        &["--segment", &env.segment, "--remove-on-exit"],
        &[],
    );
    d.await_claim(&env.table);
    // A holder killed with its lock: dead, so no user.
    let holder = spawn_holder(&env, &[("x", b"job")], "doomed");
    env.kill(holder);
    assert_eq!(d.stop(), Some(0), "{}", d.log());
    assert!(d.log().contains("removed segment"), "{}", d.log());
    assert!(!path.exists(), "the unused segment is removed");
    // A process that mapped the segment before the removal cannot register in it after: it would
    // lock in a table that nobody else can open any more.
    match Client::with_table(env.table.clone(), "late") {
        Err(e @ Error::SegmentRemoved { .. }) => assert!(e.to_string().contains("retired"), "{e}"),
        other => panic!("registration in a removed segment: {other:?}"),
    }
}
