//! `shmlock run`: hold a named lock while a command runs, like flock(1).
//!
//! # Who holds the lock
//! flock(1) locks an open file description that the command inherits: the lock lives as long as
//! any process holds that descriptor, whatever happens to flock itself. A shmlock lock is held by
//! an owner record naming one process, and is reaped when that process dies; if that process
//! were `shmlock` itself, `kill -9` of it would free the lock while the command runs on. So
//! `shmlock run` is two processes (three with the command):
//!
//! - the **keeper** (`keeper`), forked first: it takes the lock (its own pid is the owner's, its
//!   label `run CMD`), holds it, and releases it. It leaves the terminal's session and ignores
//!   the usual signals, so Ctrl-C, a `kill` of the job's process group or a closed terminal
//!   never reach it: it lives exactly as long as the lock is wanted, and no longer.
//! - the **wrapper** (the `shmlock run` process the user started): it waits for the grant, runs
//!   the command with the grant in its environment, passes signals on, and exits with the
//!   command's status, as before.
//!
//! The lock's lifetime is an inherited pipe, like flock's descriptor: the keeper holds the read
//! end; the wrapper holds the write end and the command inherits it (unless `-o`), and so does
//! every process the command starts. The keeper releases once **every** copy of the write end is
//! closed (the pipe reads end-of-file): once the wrapper and the command, and whatever the command
//! left running in the background, are all gone. A socket pair carries the rest: the grant to the
//! wrapper; from the wrapper, the command's pid and then "it exited" (or "a signal killed it"),
//! sent after the wrapper has closed its write end; back, whether the lock was released, lost
//! (`release --force`, a lost gateway session), or is still held by background processes.
//!
//! The release is clean (no owner-died notice) when the wrapper saw the command end, whatever
//! its status (a command killed by a signal included: the wrapper, alive, tells). When the
//! wrapper was killed before it saw the command end, or before it started it, the keeper
//! abandons the lock: the next holder is told that its predecessor died
//! (`LockTable::abandon_own_locks` locally, the end of the session through a gateway). If the keeper itself is killed (only `kill -9` of its
//! own pid can), its owner is reaped as any dead owner's: the lock is released with the notice,
//! even if the command still runs.
//!
//! The keeper is forked before any thread starts (the gateway client's threads start in the
//! keeper, the signal thread in the wrapper after the command is spawned), so the fork copies a
//! single-threaded process and the child may do anything.
//!
//! # Signals
//! While the command runs, SIGINT, SIGQUIT, SIGTERM and SIGHUP are blocked in the wrapper and
//! taken with `sigwait` (with SIGCHLD, which ends the wait): SIGTERM and SIGHUP are passed on to
//! the command; SIGINT and SIGQUIT are not, since a terminal sends them to the command itself (it
//! is in the same process group). The command starts with an empty mask all the same. While the
//! lock is awaited they are not blocked: Ctrl-C ends the wrapper, and the keeper, seeing the
//! socket close, gives up its request.
//!
//! # Through a gateway (`--remote HOST:PORT`)
//! The keeper holds the lock through a [`RemoteClient`](shmlock::remote::RemoteClient) session,
//! which it keeps alive (the client answers the gateway's idle timeout by itself, and a monitor
//! pings every second, or every third of a shorter idle timeout) for as long as it holds the
//! lock: `kill -9` of the wrapper leaves the session, and the lock, with the command. If the
//! connection breaks, or no ping is answered within the gateway's idle timeout, the lock is gone:
//! the keeper says so on stderr at once and again when the command ends. The command keeps
//! running, since stopping it half-way may do more harm than running it unprotected; with
//! `--kill-on-loss` it is sent SIGTERM instead.
//!
//! # On etcd (`--etcd URL[,URL...]`)
//! The same with an etcd session (`crate::etcd`) in place of the gateway session: the keeper's
//! lease is kept alive by the client, the loss is its lease not renewed within its TTL (or gone
//! at the cluster), and an abandoned lock goes with the lease (revoked as the keeper exits, or
//! expired), which tells the next holder that the owner died.

use std::ffi::{OsStr, OsString};
use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Result};
use nix::fcntl::{fcntl, FcntlArg, FdFlag, OFlag};
use nix::sys::signal::{kill, SigSet, Signal};
use nix::unistd::{ForkResult, Pid};
use shmlock::{LockTable, Mode};

use crate::render::escape_name;
use crate::RunArgs;

/// sysexits.h EX_TEMPFAIL: the lock was not had in time (the default of `-E`).
pub(crate) const EX_TEMPFAIL: u8 = 75;
/// What shells return when the command cannot be found, or not executed.
const EXIT_NOT_FOUND: u8 = 127;
const EXIT_CANNOT_EXEC: u8 = 126;

/// The command's environment: the grant it runs under.
pub(crate) const ENV_TOKEN: &str = "SHMLOCK_TOKEN";
pub(crate) const ENV_OWNER_DIED: &str = "SHMLOCK_OWNER_DIED";
pub(crate) const ENV_NAME: &str = "SHMLOCK_NAME";
pub(crate) const ENV_MODE: &str = "SHMLOCK_MODE";
/// Every lock the enclosing `shmlock run`s hold, one line each (see [`Held`]): how a nested
/// `run` on one of them finds that it would wait for itself.
pub(crate) const ENV_HELD: &str = "SHMLOCK_HELD";

/// `run`'s one-line description (`shmlock --help`, `shmlock run --help`).
pub(crate) const RUN_ABOUT: &str = "Hold a lock while a command runs, like flock(1); exits with the command's status";

/// `run`'s `--help` epilogue.
pub(crate) const RUN_HELP: &str = "\
The command runs with its grant in its environment: SHMLOCK_NAME, SHMLOCK_MODE (exclusive or
shared), SHMLOCK_TOKEN (the fencing token, larger at each grant of the name) and
SHMLOCK_OWNER_DIED (1 if the previous holder died holding the lock: repair what it protects).

The lock is held until CMD and shmlock have both exited, like flock(1)'s lock on an open file:
CMD inherits a descriptor, and so does every process CMD starts. `kill -9` of shmlock leaves the
lock with CMD; processes CMD leaves running in the background keep it until they exit (shmlock
says so on stderr when it exits before them); with -o (--close) only shmlock holds it. A process
that closes every descriptor it inherited (some daemons do) does not keep the lock. The holder
that `shmlock locks` shows is shmlock's keeper process (label `run CMD`), which holds the lock for
them. The next holder is told the owner died (SHMLOCK_OWNER_DIED=1) when shmlock was killed
before it saw CMD end (whatever CMD's status, an end it sees is a release without the notice).

Exit status: CMD's (128+N if signal N killed it); 75 (EX_TEMPFAIL, or -E's N) when the lock was
not had (-n and busy, -w and timed out, or a nested run on a lock an enclosing `shmlock run` of
this process holds, which would wait for itself forever: refused at once, unless both are shared,
and then it may still wait behind a queued exclusive request that waits for the enclosing run);
127 or 126 when CMD cannot be found or run; 2 on errors. A lock lost while CMD ran (taken away
with `shmlock release --force`, a gateway session lost, or an etcd session's lease) is reported
on stderr, and the status stays CMD's unless --lost-exit-code N is given.

With --remote the lock is held by the keeper's gateway session, which stays up while CMD runs
even if shmlock is killed. If the session is lost (connection broken, or no answer within the
gateway's idle timeout), the lock is gone at once: shmlock says so on stderr, lets CMD run on
(or sends it SIGTERM with --kill-on-loss). If the keeper is killed, the session ends and the
gateway releases the lock with the owner-died notice, even while CMD runs.

With --etcd URL[,URL...] the lock is held in an etcd v3 cluster by the keeper's session: a lease
of --etcd-ttl seconds (10 by default), kept alive while CMD runs, even if shmlock is killed. The
keys are laid out as etcd's own lock lays them out, so `etcdctl lock NAME` and Go's
concurrency.Mutex on NAME are the same lock (with the default empty --etcd-prefix), and
SHMLOCK_TOKEN is the key's create revision (larger at each grant, cluster-wide). If the lease
cannot be renewed within its TTL (the cluster unreachable or without quorum) or the cluster says
it expired, the lock is lost, and reported as with --remote (--kill-on-loss too). If the keeper
is killed, the lock stays held until its lease expires (the TTL), and the next holder is told
the owner died. Needs a shmlock built with `--features etcd`.

Unlike flock(1): names are lock names, not files, and there is no descriptor form (`flock 9`),
-u (--unlock) or -F (--no-fork): the owner-died notice needs a wrapper that sees CMD exit. -E
defaults to 75, not 1. -w also takes durations such as 250ms or 2m. Options go before the name
or between the name and CMD; everything from CMD on is CMD's.

Examples:
  shmlock run nightly-backup ./backup.sh --full
  shmlock run -w 0.25 -s config -- cat /etc/app.conf
  shmlock run -n -E 0 cron-job -c './job.sh >> job.log' || echo failed
  shmlock run -x deploy sh -c 'echo \"token $SHMLOCK_TOKEN\"; ./deploy.sh'
  shmlock run --remote 10.0.0.5:7411 --kill-on-loss deploy -- ./deploy.sh
  shmlock run --etcd http://10.0.0.1:2379,http://10.0.0.2:2379 --etcd-ttl 5 deploy -- ./deploy.sh";

/// Where the lock lives.
pub(crate) enum Place {
    /// This machine's segment.
    Local { table: Arc<LockTable>, segment: String },
    /// Through shmlockd's gateway at `addr`.
    Remote {
        addr: String,
        token: Option<String>,
        tls: Option<shmlock::remote::TlsOptions>,
    },
    /// On an etcd cluster (`--etcd`, see `crate::etcd`).
    #[cfg(feature = "etcd")]
    Etcd(crate::etcd::Target),
}

impl Place {
    /// How [`ENV_HELD`] names this place.
    fn key(&self) -> String {
        match self {
            Place::Local { segment, .. } => format!("segment:{}", escape_name(segment.as_bytes())),
            Place::Remote { addr, .. } => format!("gateway:{}", escape_name(addr.as_bytes())),
            #[cfg(feature = "etcd")]
            Place::Etcd(t) => t.key(),
        }
    }
}

/// What the wrapper and the keeper both know about the run, worked out from the arguments.
pub(crate) struct Job<'a> {
    pub(crate) a: &'a RunArgs,
    pub(crate) name: &'a [u8],
    /// The name as messages show it.
    pub(crate) shown: String,
    /// The program, for messages.
    pub(crate) program: String,
    /// The command line to run.
    argv: Vec<OsString>,
    pub(crate) mode: Mode,
    /// `-n`, or `-w 0`.
    pub(crate) nonblock: bool,
    /// This place's key in [`ENV_HELD`].
    pub(crate) place: String,
}

impl<'a> Job<'a> {
    fn new(a: &'a RunArgs, place: &Place) -> Job<'a> {
        let argv = match &a.command_string {
            Some(s) => vec!["sh".into(), "-c".into(), s.clone()],
            None => a.command.clone(),
        };
        let program = match &a.command_string {
            Some(_) => "sh -c".to_string(),
            None => argv[0].to_string_lossy().into_owned(),
        };
        Job {
            a,
            name: a.name.as_bytes(),
            shown: escape_name(a.name.as_bytes()),
            program,
            argv,
            mode: if a.shared { Mode::Shared } else { Mode::Exclusive },
            nonblock: a.nonblock || a.timeout == Some(Duration::ZERO),
            place: place.key(),
        }
    }
}

/// One line of [`ENV_HELD`]: `PLACE<tab>TOKEN<tab>e|s<tab>NAME` (name and place escaped as
/// `locks` shows them).
pub(crate) struct Held {
    pub(crate) place: String,
    pub(crate) token: u64,
    pub(crate) mode: Mode,
    pub(crate) shown: String,
}

impl Held {
    fn line(&self) -> String {
        let m = if self.mode == Mode::Shared { 's' } else { 'e' };
        format!("{}\t{}\t{m}\t{}", self.place, self.token, self.shown)
    }

    /// The entries of `$SHMLOCK_HELD` (anything malformed is skipped: it is only a hint).
    pub(crate) fn from_env() -> Vec<Held> {
        let Some(v) = std::env::var_os(ENV_HELD) else {
            return Vec::new();
        };
        String::from_utf8_lossy(v.as_bytes())
            .lines()
            .take(256)
            .filter_map(|l| {
                let mut f = l.splitn(4, '\t');
                let place = f.next()?.to_string();
                let token = f.next()?.parse().ok()?;
                let mode = match f.next()? {
                    "s" => Mode::Shared,
                    "e" => Mode::Exclusive,
                    _ => return None,
                };
                Some(Held {
                    place,
                    token,
                    mode,
                    shown: f.next()?.to_string(),
                })
            })
            .collect()
    }
}

/// What the keeper tells the wrapper.
pub(crate) mod msg {
    /// `G TOKEN 0|1 e|s`: granted (token, owner died, mode).
    pub(crate) const GRANTED: char = 'G';
    /// `F CODE`: not granted; the keeper said why on stderr; exit CODE.
    pub(crate) const FAILED: char = 'F';
    /// `R`: released.
    pub(crate) const RELEASED: &str = "R";
    /// `L`: the lock was lost while the command ran (the keeper said how on stderr).
    pub(crate) const LOST: &str = "L";
    /// `H`: still held: processes the command left running hold the descriptor.
    pub(crate) const STILL_HELD: &str = "H";
    /// From the wrapper: `S PID`, the command started.
    pub(crate) const STARTED: char = 'S';
    /// From the wrapper: `E`, the command ended (or could not be started), sent once the wrapper
    /// has closed its end of the pipe.
    pub(crate) const ENDED: &str = "E";
}

/// Runs the command holding lock `a.name` at `place`, and ends the process with its status
/// ([`exit_now`]); returns only the errors that come before the keeper answers.
pub(crate) fn run(place: Place, a: &RunArgs) -> Result<u8> {
    let job = Job::new(a, &place);
    let (hold_r, hold_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(|e| anyhow!("cannot make a pipe: {e}"))?;
    let (ctl, ctl_keeper) = UnixStream::pair().map_err(|e| anyhow!("cannot make a socket pair: {e}"))?;
    match fork()? {
        ForkResult::Child => {
            drop(hold_w);
            drop(ctl);
            crate::keeper::keep(&place, &job, ctl_keeper, hold_r)
        }
        ForkResult::Parent { child } => {
            drop(hold_r);
            drop(ctl_keeper);
            wrapper(&job, child, &ctl, hold_w)
        }
    }
}

/// Forks the keeper.
#[allow(unsafe_code)]
fn fork() -> Result<ForkResult> {
    // SAFETY: `run` forks before this process starts any thread (clap, opening the segment and
    // making the pipes start none; the signal thread starts after the command's spawn, the
    // gateway client's threads in the keeper), so the child is a copy of a single-threaded
    // process: no lock is held by a thread that does not exist in it, and it may allocate and
    // call anything.
    unsafe { nix::unistd::fork() }.map_err(|e| anyhow!("cannot fork the lock keeper: {e}"))
}

/// The wrapper: waits for the grant, runs the command, reports how it ended, exits ([`exit_now`]).
fn wrapper(job: &Job<'_>, keeper: Pid, ctl: &UnixStream, hold: OwnedFd) -> Result<u8> {
    // What needs no grant is done while the keeper takes the lock.
    let mut cmd = command(job);
    let mut from_keeper = BufReader::with_capacity(256, ctl);
    let mut line = String::new();
    let _ = from_keeper.read_line(&mut line);
    let (token, died, mode) = match parse_grant(&line) {
        Some(Ok(g)) => g,
        Some(Err(code)) => {
            let _ = nix::sys::wait::waitpid(keeper, None);
            exit_now(code);
        }
        None => bail!("the lock keeper (pid {keeper}) ended without an answer"),
    };
    test_stall("granted");
    if !job.a.close {
        // The command, and everything it starts, inherit the write end: the lock's lifetime.
        fcntl(hold.as_raw_fd(), FcntlArg::F_SETFD(FdFlag::empty()))
            .map_err(|e| anyhow!("cannot pass the lock's descriptor on: {e}"))?;
    }
    cmd.env(ENV_TOKEN, token.to_string())
        .env(ENV_OWNER_DIED, if died { "1" } else { "0" })
        .env(ENV_MODE, if mode == Mode::Shared { "shared" } else { "exclusive" })
        .env(ENV_HELD, held_env(job, token, mode));
    test_stall_in_child(&mut cmd);
    let code = run_child(&mut cmd, &job.program, |pid| {
        send(ctl, &format!("{} {pid}", msg::STARTED));
    });
    drop(hold);
    send(ctl, msg::ENDED);
    line.clear();
    let _ = from_keeper.read_line(&mut line);
    let mut code = code;
    match line.trim_end() {
        msg::RELEASED => {}
        msg::LOST => code = job.a.lost_exit_code.unwrap_or(code),
        msg::STILL_HELD => {
            eprintln!(
                "shmlock: note: lock \"{}\" stays held by processes that {} left running (they \
                 inherited its descriptor); it is released when the last of them exits (-o: they \
                 do not inherit it)",
                job.shown, job.program
            );
            exit_now(code);
        }
        _ => {
            // Killed: its owner is reaped as a dead one, so the lock may have gone while CMD ran.
            eprintln!(
                "shmlock: warning: the lock keeper (pid {keeper}) ended without releasing lock \"{}\" \
                 (it is released, with the owner-died notice, when the keeper is reaped, or on etcd when \
                 its lease expires)",
                job.shown
            );
            code = job.a.lost_exit_code.unwrap_or(code);
        }
    }
    let _ = nix::sys::wait::waitpid(keeper, None);
    exit_now(code)
}

/// Ends the process with `code` at once, without the exit handlers (stdio's, the dynamic
/// loader's, the standard library's): the wrapper's exit is what the user waits on, and the
/// keeper's what the wrapper waits on (issue 14). Neither process has anything for them to do:
/// they write only to stderr, which is unbuffered, and to their socket; stdout is never written.
#[allow(unsafe_code)]
pub(crate) fn exit_now(code: u8) -> ! {
    // SAFETY: `_exit` has no preconditions; it runs no destructors and no atexit handlers, and
    // nothing in this process needs them (see above: no buffered output is left).
    unsafe { libc::_exit(i32::from(code)) }
}

/// The command, with what it gets whatever the grant. Its program is looked up on PATH here
/// ([`find_on_path`]), before the grant: the standard library would look it up in the command's
/// process, between its fork and its exec, one failed exec per PATH entry before it, all of them
/// after the grant and before the command starts (issue 14).
fn command(job: &Job<'_>) -> Command {
    let program = &job.argv[0];
    let mut cmd = match find_on_path(program) {
        Some(path) => {
            let mut cmd = Command::new(path);
            cmd.arg0(program);
            cmd
        }
        None => Command::new(program),
    };
    cmd.args(&job.argv[1..]).env(ENV_NAME, OsStr::from_bytes(job.name));
    cmd
}

/// Where execvp(3) would find `program`: in the first directory of PATH (an empty entry is the
/// current directory) that holds a regular file by that name which this process may execute.
/// None when `program` has a `/` (it is a path), when PATH is not set (the C library's default
/// then applies), or when no directory has it: the standard library then looks for it itself, as
/// before, and says why it cannot run it.
fn find_on_path(program: &OsStr) -> Option<std::path::PathBuf> {
    if program.is_empty() || program.as_bytes().contains(&b'/') {
        return None;
    }
    let path = std::env::var_os("PATH")?;
    path.as_bytes().split(|&b| b == b':').find_map(|dir| {
        let dir = if dir.is_empty() { b".".as_slice() } else { dir };
        let candidate = std::path::Path::new(OsStr::from_bytes(dir)).join(program);
        let runnable = nix::unistd::access(&candidate, nix::unistd::AccessFlags::X_OK).is_ok()
            && std::fs::metadata(&candidate).is_ok_and(|m| m.is_file());
        runnable.then_some(candidate)
    })
}

/// Sends one line to the other process, in one write (the socket is not buffered).
pub(crate) fn send(s: &UnixStream, line: &str) {
    let mut b = Vec::with_capacity(line.len() + 1);
    b.extend_from_slice(line.as_bytes());
    b.push(b'\n');
    let _ = (&*s).write_all(&b);
}

/// `G TOKEN 0|1 e|s` -> Ok(grant); `F CODE` -> Err(code); anything else None.
fn parse_grant(line: &str) -> Option<std::result::Result<(u64, bool, Mode), u8>> {
    let mut f = line.split_ascii_whitespace();
    let kind = f.next()?;
    if kind == msg::FAILED.to_string() {
        return Some(Err(f.next()?.parse().ok()?));
    }
    if kind != msg::GRANTED.to_string() {
        return None;
    }
    let token = f.next()?.parse().ok()?;
    let died = f.next()? == "1";
    let mode = if f.next()? == "s" {
        Mode::Shared
    } else {
        Mode::Exclusive
    };
    Some(Ok((token, died, mode)))
}

/// `$SHMLOCK_HELD` for the command: the enclosing runs' locks and this one.
fn held_env(job: &Job<'_>, token: u64, mode: Mode) -> OsString {
    let mine = Held {
        place: job.place.clone(),
        token,
        mode,
        shown: job.shown.clone(),
    }
    .line();
    match std::env::var_os(ENV_HELD) {
        Some(v) if !v.is_empty() => {
            let mut b = v.into_vec();
            b.push(b'\n');
            b.extend_from_slice(mine.as_bytes());
            OsString::from_vec(b)
        }
        _ => mine.into(),
    }
}

/// The signals `run` forwards to (or leaves with) the command, taken by a sigwait thread.
pub(crate) fn run_signals() -> SigSet {
    let mut signals = SigSet::empty();
    for s in [Signal::SIGINT, Signal::SIGQUIT, Signal::SIGTERM, Signal::SIGHUP] {
        signals.add(s);
    }
    signals
}

/// Runs the command to completion; returns the exit status to pass on. `started` is called with
/// the command's pid once it runs.
///
/// The signals of [`run_signals`] and SIGCHLD are blocked from before the spawn (the command
/// starts with an empty mask all the same: the standard library resets it in the child) and taken
/// here, on this thread, with `sigwait`, until SIGCHLD says the command has exited: no thread to
/// start, and no signal lost between the spawn and the wait.
fn run_child(cmd: &mut Command, program: &str, started: impl FnOnce(i32)) -> u8 {
    // An ignored SIGCHLD (inherited from a parent that ignores it) would have the kernel reap
    // the command by itself and never raise the signal: no status, and a wait forever.
    default_sigchld();
    let mut signals = run_signals();
    signals.add(Signal::SIGCHLD);
    let blocked = signals.thread_block().is_ok();
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("shmlock: cannot run {program}: {e}");
            return match e.kind() {
                std::io::ErrorKind::NotFound => EXIT_NOT_FOUND,
                _ => EXIT_CANNOT_EXEC,
            };
        }
    };
    let pid = i32::try_from(child.id()).ok().map(Pid::from_raw);
    if let Some(pid) = pid {
        started(pid.as_raw());
    }
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break Ok(s),
            Ok(None) if blocked => {}
            Ok(None) => break child.wait(),
            Err(e) => break Err(e),
        }
        match signals.wait() {
            Ok(s @ (Signal::SIGTERM | Signal::SIGHUP)) => {
                if let Some(pid) = pid {
                    let _ = kill(pid, s);
                }
            }
            Ok(_) => {} // SIGCHLD: look again; SIGINT, SIGQUIT: the terminal sent them to CMD too
            Err(_) => break child.wait(),
        }
    };
    let status = match status {
        Ok(s) => s,
        Err(e) => {
            eprintln!("shmlock: waiting for {program}: {e}");
            return 1;
        }
    };
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(c), _) => (c & 0xff) as u8,
        (None, Some(s)) => (128 + s).clamp(0, 255) as u8,
        (None, None) => 1,
    }
}

#[allow(unsafe_code)]
fn default_sigchld() {
    // SAFETY: SIG_DFL installs no handler, so nothing runs in signal context.
    let _ = unsafe { nix::sys::signal::signal(Signal::SIGCHLD, nix::sys::signal::SigHandler::SigDfl) };
}

/// The tests' hook (debug builds only): with `SHMLOCK_RUN_TEST_STALL=POINT:DIR`, the process
/// passing POINT writes its pid to `DIR/stalled-POINT` and waits for `DIR/go-POINT` to exist.
/// Points: `granted` (the wrapper, holding the grant, before it spawns the command) and `exec`
/// (the command's process, between fork and exec). Release builds ignore the variable.
#[cfg(debug_assertions)]
fn stall_dir(point: &str) -> Option<std::path::PathBuf> {
    let v = std::env::var("SHMLOCK_RUN_TEST_STALL").ok()?;
    let (p, dir) = v.split_once(':')?;
    (p == point).then(|| dir.into())
}

#[cfg(debug_assertions)]
fn stall_at(dir: &std::path::Path, point: &str) {
    let _ = std::fs::write(dir.join(format!("stalled-{point}")), std::process::id().to_string());
    while !dir.join(format!("go-{point}")).exists() {
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn test_stall(point: &str) {
    #[cfg(debug_assertions)]
    if let Some(dir) = stall_dir(point) {
        stall_at(&dir, point);
    }
    #[cfg(not(debug_assertions))]
    let _ = point;
}

#[allow(unsafe_code)]
fn test_stall_in_child(cmd: &mut Command) {
    #[cfg(debug_assertions)]
    if let Some(dir) = stall_dir("exec") {
        // SAFETY: the closure runs in the forked child before exec. This process is
        // single-threaded until the command is spawned (the signal thread starts after), so the
        // child may allocate and use the file system like any single-threaded process. Debug
        // builds only, under the tests' variable.
        unsafe {
            cmd.pre_exec(move || {
                stall_at(&dir, "exec");
                Ok(())
            });
        }
    }
    #[cfg(not(debug_assertions))]
    let _ = cmd;
}
