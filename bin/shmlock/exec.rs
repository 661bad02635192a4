//! `shmlock run`: hold a named lock while a command runs, like flock(1).
//!
//! The lock is taken first (waiting, with a timeout, or not at all), then the command runs with
//! this process's stdin, stdout and stderr; when it exits the lock is released and `shmlock`
//! exits with the command's status (128 + N if a signal N killed it, as shells report it).
//!
//! # Signals
//! While the command runs, `shmlock` must outlive it, or the lock would stay held by a dead owner
//! until it is reaped. So once the child is started, SIGINT, SIGQUIT, SIGTERM and SIGHUP are
//! blocked here and taken by a thread with `sigwait`: SIGTERM and SIGHUP are passed on to the
//! command; SIGINT and SIGQUIT are not, since a terminal sends them to the command itself (it is
//! in the same process group). The signals are blocked only after the spawn, so the command
//! starts with the usual mask.
//!
//! # Through a gateway (`--remote HOST:PORT`)
//! The lock is taken by a [`RemoteClient`] session instead, which lives as long as `shmlock`
//! does: the client answers the gateway's idle timeout by itself, and a monitor thread pings
//! the gateway every second (or every third of a shorter idle timeout) while the command runs.
//! If the connection breaks, or no ping is answered within the gateway's idle timeout (after
//! which the gateway ends a session it has not heard from), the lock is gone: `shmlock` says so
//! on stderr at once and again when the command ends. The command keeps running, since stopping
//! it half-way may do more harm than running it unprotected; with `--kill-on-loss` it is sent
//! SIGTERM instead. Either way `shmlock` exits with the command's status. The client's own
//! threads are started with the forwarded signals blocked, so that they stay with the sigwait
//! thread.

use std::process::{Command, ExitCode};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, Result};
use nix::sys::signal::{kill, SigSet, SigmaskHow, Signal};
use nix::unistd::Pid;
use shmlock::gateway::proto::ErrorCode;
use shmlock::prelude::*;
use shmlock::remote::{ConnectOptions, RemoteClient};
use shmlock::table::LockInfo;
use shmlock::{Client, Error, LockTable, Mode};

use crate::remote::{token_needed, CONNECT_TIMEOUT};
use crate::render::{escape_name, human};
use crate::{name_error, RunArgs};

/// How long `run --remote` waits for the gateway to answer the final `UNLOCK`.
const UNLOCK_DEADLINE: Duration = Duration::from_secs(10);
/// How often `run --remote` pings the gateway while the command runs (at most).
const PING_EVERY: Duration = Duration::from_secs(1);

/// sysexits.h EX_TEMPFAIL: the lock was not had in time.
pub(crate) const EX_TEMPFAIL: u8 = 75;
/// What shells return when the command cannot be found, or not executed.
const EXIT_NOT_FOUND: u8 = 127;
const EXIT_CANNOT_EXEC: u8 = 126;

/// What `run` does differently locally and through a gateway; the rest is written once, over
/// the [`Locker`] contract, in [`hold_and_run`].
trait Backend {
    /// The client that takes the lock.
    type Client: Locker;
    fn client(&self) -> &Self::Client;
    /// `, held by pid 1234 (label) for 2.0s`, or nothing if that cannot be told.
    fn holders(&self, name: &[u8]) -> String;
    /// Says why a lock request failed (other than busy or timed out).
    fn lock_error(&self, name: &[u8], e: Error) -> anyhow::Error;
    /// Called once the command runs: starts watching for a lost lock (a gateway session that
    /// ended), reporting the loss into `lost`. Returns what stops the watch when dropped.
    fn watch(&self, a: &RunArgs, program: &str, pid: Option<Pid>, lost: &Lost) -> Option<mpsc::Sender<()>>;
    /// Where the lock lives, for messages: `` or ` through the gateway at ADDR`.
    fn place(&self) -> String;
    /// Longest wait for the final unlock's answer, after which `run` exits anyway (None: no
    /// limit, the unlock cannot hang).
    fn unlock_deadline(&self) -> Option<Duration>;
}

/// Why the lock was lost while the command ran, once it was.
#[derive(Clone, Default)]
struct Lost {
    why: Arc<Mutex<Option<String>>>,
    /// Set when the command has ended: nothing is reported after that.
    finished: Arc<AtomicBool>,
}

impl Lost {
    fn get(&self) -> Option<String> {
        self.why.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// Takes the lock `a.name` through `b`, runs the command holding it, and unlocks.
fn hold_and_run<B: Backend>(b: &B, a: &RunArgs) -> Result<ExitCode> {
    use std::os::unix::ffi::OsStrExt;
    let name = a.name.as_bytes();
    let shown = escape_name(name);
    let program = a.command[0].to_string_lossy().into_owned();
    let mode = if a.shared { Mode::Shared } else { Mode::Exclusive };
    let wait = match (a.nonblock, a.timeout) {
        (true, _) => Wait::No,
        (false, Some(t)) => Wait::for_duration(t),
        (false, None) => Wait::Forever,
    };
    let guard = match b.client().acquire(name, mode, wait) {
        Ok(g) => g,
        Err(Error::WouldBlock) => {
            eprintln!(
                "shmlock: lock \"{shown}\" is busy{}; not running {program}",
                b.holders(name)
            );
            return Ok(ExitCode::from(EX_TEMPFAIL));
        }
        Err(e @ Error::TimedOut { .. }) => {
            // A timeout names the holder where the backend knows it; else ask.
            let more = match &e {
                Error::TimedOut { holder: None, .. } => b.holders(name),
                _ => String::new(),
            };
            eprintln!("shmlock: lock \"{shown}\" not acquired: {e}{more}; not running {program}");
            return Ok(ExitCode::from(EX_TEMPFAIL));
        }
        Err(e) => return Err(b.lock_error(name, e)),
    };
    let lost = Lost::default();
    let mut watch = None;
    let code = run_child(a, &program, |pid| watch = b.watch(a, &program, pid, &lost))?;
    lost.finished.store(true, Ordering::Release);
    drop(watch);
    match lost.get() {
        Some(why) => {
            eprintln!(
                "shmlock: warning: {program} ran partly without lock \"{shown}\": the lock was lost{} \
                 ({why})",
                b.place()
            );
            drop(guard);
        }
        None => release(guard, b, &shown, code),
    }
    Ok(ExitCode::from(code))
}

/// Unlocks, warning if the lock was taken away (`release --force`) while the command ran. With
/// a deadline (a gateway), gives up after it: exiting closes the connection, which releases the
/// lock as well.
fn release<B: Backend>(guard: impl Guard, b: &B, shown: &str, code: u8) {
    let (done, waiting) = mpsc::channel::<()>();
    if let Some(deadline) = b.unlock_deadline() {
        let what = format!(
            "shmlock: warning: no answer to the unlock of \"{shown}\"{} within {}s; exiting, which \
             closes the session and so releases the lock",
            b.place(),
            deadline.as_secs()
        );
        let _ = std::thread::Builder::new()
            .name("unlock-deadline".into())
            .spawn(move || {
                if let Err(mpsc::RecvTimeoutError::Timeout) = waiting.recv_timeout(deadline) {
                    eprintln!("{what}");
                    std::process::exit(i32::from(code));
                }
            });
    }
    match guard.unlock() {
        Ok(()) => {}
        Err(Error::NotHeld) => eprintln!(
            "shmlock: warning: lock \"{shown}\" was taken away (shmlock release --force) while the \
             command ran"
        ),
        Err(e) => eprintln!("shmlock: warning: unlocking \"{shown}\"{}: {e}", b.place()),
    }
    drop(done);
}

/// The lock in this machine's segment.
struct Local {
    table: Arc<LockTable>,
    client: Client,
}

impl Backend for Local {
    type Client = Client;
    fn client(&self) -> &Client {
        &self.client
    }
    fn holders(&self, name: &[u8]) -> String {
        self.table
            .lock_info(name)
            .ok()
            .flatten()
            .map_or(String::new(), |l| describe_holders(&l))
    }
    fn lock_error(&self, name: &[u8], e: Error) -> anyhow::Error {
        name_error(name, e)
    }
    fn watch(&self, _: &RunArgs, _: &str, _: Option<Pid>, _: &Lost) -> Option<mpsc::Sender<()>> {
        None // a local lock is lost only to `release --force`, which the unlock reports
    }
    fn place(&self) -> String {
        String::new()
    }
    fn unlock_deadline(&self) -> Option<Duration> {
        None
    }
}

/// Runs `a.command` holding lock `a.name`.
pub(crate) fn run(table: Arc<LockTable>, a: &RunArgs) -> Result<ExitCode> {
    let program = a.command[0].to_string_lossy();
    let client = Client::with_table(Arc::clone(&table), &format!("run {program}"))?;
    hold_and_run(&Local { table, client }, a)
}

/// `, held by pid 1234 (label) for 2.0s`, or nothing if nobody holds `l`.
fn describe_holders(l: &LockInfo) -> String {
    if l.holders.is_empty() {
        return String::new();
    }
    let who: Vec<String> = l
        .holders
        .iter()
        .map(|p| match p.label.as_str() {
            "" => format!("pid {} for {}", p.pid, human(p.age)),
            label => format!("pid {} ({label}) for {}", p.pid, human(p.age)),
        })
        .collect();
    format!(", held by {}", who.join(", "))
}

/// The signals `run` forwards to (or leaves with) the command, taken by a sigwait thread.
fn run_signals() -> SigSet {
    let mut signals = SigSet::empty();
    for s in [Signal::SIGINT, Signal::SIGQUIT, Signal::SIGTERM, Signal::SIGHUP] {
        signals.add(s);
    }
    signals
}

/// The lock through a gateway session.
struct Remote {
    client: Arc<RemoteClient>,
    addr: String,
}

impl Backend for Remote {
    type Client = RemoteClient;
    fn client(&self) -> &RemoteClient {
        &self.client
    }
    /// As the gateway's `LOCKS` tells it (best effort).
    fn holders(&self, name: &[u8]) -> String {
        match self.client.locks(Some(name)) {
            Ok(locks) => locks
                .iter()
                .find(|l| l.name == name)
                .map_or(String::new(), describe_holders),
            Err(_) => String::new(),
        }
    }
    fn lock_error(&self, name: &[u8], e: Error) -> anyhow::Error {
        lock_error(&self.addr, &escape_name(name), e)
    }
    fn watch(&self, a: &RunArgs, program: &str, pid: Option<Pid>, lost: &Lost) -> Option<mpsc::Sender<()>> {
        let (stop, stopped) = mpsc::channel::<()>();
        let m = Monitor {
            client: Arc::clone(&self.client),
            addr: self.addr.clone(),
            shown: escape_name(a.name.as_encoded_bytes()),
            program: program.to_string(),
            pid: pid.filter(|_| a.kill_on_loss),
            lost: lost.clone(),
        };
        m.start(stopped);
        Some(stop)
    }
    fn place(&self) -> String {
        format!(" through the gateway at {}", self.addr)
    }
    fn unlock_deadline(&self) -> Option<Duration> {
        Some(UNLOCK_DEADLINE)
    }
}

/// Runs `a.command` holding lock `a.name` taken through the gateway at `addr`.
pub(crate) fn run_remote(addr: &str, token: Option<String>, a: &RunArgs) -> Result<ExitCode> {
    // `ConnectOptions` may gain fields; the others keep their defaults.
    #[allow(clippy::needless_update)]
    let options = ConnectOptions {
        auth_token: token.clone(),
        connect_timeout: Some(CONNECT_TIMEOUT),
        tls: a.remote.tls(addr),
        ..ConnectOptions::default()
    };
    // The client's threads start with the forwarded signals blocked (see the module docs); the
    // wait for the lock below runs with them unblocked, so Ctrl-C still ends it.
    let before = run_signals().thread_swap_mask(SigmaskHow::SIG_BLOCK);
    let connected = RemoteClient::connect_with(addr, &options);
    if let Ok(mask) = before {
        let _ = mask.thread_set_mask();
    }
    let client = Arc::new(connected.map_err(|e| connect_error(addr, e))?);
    if client.hello().auth_required && token.is_none() {
        return Err(token_needed(addr));
    }
    let b = Remote {
        client,
        addr: addr.to_string(),
    };
    hold_and_run(&b, a)
}

/// Says what went wrong connecting to (and authenticating with) the gateway.
fn connect_error(addr: &str, e: Error) -> anyhow::Error {
    match e {
        Error::Connection { why, .. } => anyhow!(
            "cannot connect to the gateway at {addr}: {why} (is shmlockd running there, with its \
             gateway on?)"
        ),
        Error::Remote {
            code: ErrorCode::AuthFailed,
            message,
        } => {
            anyhow!("the gateway at {addr} refused the token: {message}")
        }
        Error::Remote { code, message } => anyhow!("the gateway at {addr} refused the session: {code} {message}"),
        e => anyhow!(e).context(format!("cannot connect to the gateway at {addr}")),
    }
}

/// Says why a lock request through the gateway failed (other than busy or timed out).
fn lock_error(addr: &str, shown: &str, e: Error) -> anyhow::Error {
    match e {
        Error::Remote {
            code: ErrorCode::AuthRequired,
            ..
        } => token_needed(addr),
        Error::Connection { why, .. } => anyhow!("lost the gateway at {addr} while locking \"{shown}\": {why}"),
        e => anyhow!("cannot lock \"{shown}\" through the gateway at {addr}: {e}"),
    }
}

/// Watches the gateway session while the command runs (see the module docs).
struct Monitor {
    client: Arc<RemoteClient>,
    addr: String,
    shown: String,
    program: String,
    /// The command, to stop on loss (`--kill-on-loss`).
    pid: Option<Pid>,
    lost: Lost,
}

impl Monitor {
    /// Starts the pinger and the watcher; both end when `stopped`'s sender is dropped (a ping
    /// that never returns leaves its thread behind, which the exit ends).
    fn start(self, stopped: mpsc::Receiver<()>) {
        let idle = self.client.hello().idle_timeout;
        let every = idle.map_or(PING_EVERY, |t| (t / 3).clamp(Duration::from_millis(10), PING_EVERY));
        let (events, heard) = mpsc::channel::<Result<(), String>>();
        let client = Arc::clone(&self.client);
        let pinger = std::thread::Builder::new()
            .name("gateway-ping".into())
            .spawn(move || loop {
                if let Err(mpsc::RecvTimeoutError::Disconnected) = stopped.recv_timeout(every) {
                    return;
                }
                let r = client.ping().map(|_| ()).map_err(|e| match e {
                    Error::Connection { why, .. } => why,
                    e => e.to_string(),
                });
                let failed = r.is_err();
                if events.send(r).is_err() || failed {
                    return;
                }
            });
        if pinger.is_err() {
            eprintln!("shmlock: warning: cannot start a thread to watch the gateway session");
            return;
        }
        let _ = std::thread::Builder::new().name("gateway-watch".into()).spawn(move || {
            // Without an idle timeout the gateway never ends a silent session: only a broken
            // connection loses the lock.
            let silence = idle.unwrap_or(Duration::from_secs(86_400 * 365));
            let why = loop {
                match heard.recv_timeout(silence + every) {
                    Ok(Ok(())) => {}
                    Ok(Err(why)) => break why,
                    Err(mpsc::RecvTimeoutError::Timeout) => {
                        break format!(
                            "no answer for {}, and the gateway ends sessions it does not hear from \
                             within {}",
                            human(silence + every),
                            human(silence)
                        )
                    }
                    Err(mpsc::RecvTimeoutError::Disconnected) => return,
                }
            };
            self.report(why);
        });
    }

    fn report(self, why: String) {
        if self.lost.finished.load(Ordering::Acquire) {
            return;
        }
        let what = match self.pid {
            Some(_) => format!("stopping {} (SIGTERM), as --kill-on-loss asks", self.program),
            None => format!("{} keeps running (--kill-on-loss would stop it)", self.program),
        };
        eprintln!(
            "shmlock: lost the gateway connection to {} ({why}): lock \"{}\" is no longer held; {what}",
            self.addr, self.shown
        );
        *self.lost.why.lock().unwrap_or_else(|e| e.into_inner()) = Some(why);
        if let Some(pid) = self.pid {
            let _ = kill(pid, Signal::SIGTERM);
        }
    }
}

/// Runs the command to completion; returns the exit status to pass on. `started` is called with
/// the command's pid once it runs and the forwarded signals are blocked (threads it starts
/// inherit that).
fn run_child(a: &RunArgs, program: &str, started: impl FnOnce(Option<Pid>)) -> Result<u8> {
    let mut child = match Command::new(&a.command[0]).args(&a.command[1..]).spawn() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("shmlock: cannot run {program}: {e}");
            return Ok(match e.kind() {
                std::io::ErrorKind::NotFound => EXIT_NOT_FOUND,
                _ => EXIT_CANNOT_EXEC,
            });
        }
    };
    let pid = i32::try_from(child.id()).ok().map(Pid::from_raw);
    let signals = run_signals();
    let blocked = signals.thread_block().is_ok();
    if blocked {
        // Threads inherit the mask, so this one is the only taker of these signals.
        let _ = std::thread::Builder::new().name("signals".into()).spawn(move || loop {
            match signals.wait() {
                Ok(s @ (Signal::SIGTERM | Signal::SIGHUP)) => {
                    if let Some(pid) = pid {
                        let _ = kill(pid, s);
                    }
                }
                Ok(_) => {}
                Err(_) => return,
            }
        });
    }
    started(pid);
    let status = child.wait().map_err(|e| anyhow!("waiting for {program}: {e}"))?;
    use std::os::unix::process::ExitStatusExt;
    Ok(match (status.code(), status.signal()) {
        (Some(c), _) => (c & 0xff) as u8,
        (None, Some(s)) => (128 + s).clamp(0, 255) as u8,
        (None, None) => 1,
    })
}
