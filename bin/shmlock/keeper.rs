//! `shmlock run`'s keeper: the process that takes, holds and releases the lock while the command
//! runs (see `exec` for the design). It leaves the terminal's session, ignores the signals a job
//! gets, and follows two descriptors: the socket to the wrapper, and the read end of the pipe
//! whose write end the wrapper and the command hold.

use std::io::Read;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use anyhow::anyhow;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{kill, signal, SigHandler, Signal};
use nix::unistd::Pid;
use shmlock::gateway::proto::ErrorCode;
use shmlock::prelude::*;
use shmlock::remote::{ConnectOptions, RemoteClient, TlsOptions};
use shmlock::table::LockInfo;
use shmlock::{Client, Error, LockTable, Mode};

use crate::exec::{msg, send, Held, Job, Place};
use crate::name_error;
use crate::remote::{token_needed, CONNECT_TIMEOUT};
use crate::render::{escape_name, human};

/// How long the keeper waits for the gateway to answer the final `UNLOCK`.
const UNLOCK_DEADLINE: Duration = Duration::from_secs(10);
/// How often the keeper pings the gateway while it holds the lock (at most).
const PING_EVERY: Duration = Duration::from_secs(1);
/// Exit status on errors (as `main`'s).
const EXIT_ERROR: u8 = 2;

/// What the keeper does differently locally, through a gateway and on etcd (`crate::etcd`); the
/// rest is written once, over the [`Locker`] contract, in [`hold`].
pub(crate) trait Backend {
    /// The client that takes the lock.
    type Client: Locker;
    fn client(&self) -> &Self::Client;
    /// The lock as `locks` would show it, if that can be told.
    fn info(&self, name: &[u8]) -> Option<LockInfo>;
    /// `, held by ...` for messages, or nothing if that cannot be told.
    fn held_by(&self, name: &[u8]) -> String {
        self.info(name).map_or(String::new(), |l| describe_holders(&l))
    }
    /// Says why a lock request failed (other than busy or timed out).
    fn lock_error(&self, name: &[u8], e: Error) -> anyhow::Error;
    /// Waits for the lock once a first try found it busy. `gone` turns true when the wrapper is
    /// gone (after [`give_up`](Self::give_up) was called).
    fn wait_for<'c>(
        &'c self,
        name: &[u8],
        mode: Mode,
        wait: Wait,
        gone: &AtomicBool,
    ) -> shmlock::Result<<Self::Client as Locker>::Guard<&'c Self::Client>> {
        let _ = gone;
        self.client().acquire(name, mode, wait)
    }
    /// Called once the lock is held: starts watching for its loss (a gateway session that
    /// ended, an etcd session's lease), reporting it into `lost`, on threads of its own or of
    /// `scope` (which ends when the command does). Returns what stops the watch when dropped.
    fn watch<'s, 'e, 'c: 'e>(
        &'e self,
        scope: &'s std::thread::Scope<'s, 'e>,
        guard: &'e <Self::Client as Locker>::Guard<&'c Self::Client>,
        job: &Job<'_>,
        pid: &Arc<AtomicI32>,
        lost: &Lost,
    ) -> Option<mpsc::Sender<()>>;
    /// Where the lock lives, for messages: `` or ` through the gateway at ADDR`.
    fn place(&self) -> String;
    /// Longest wait for the final unlock's answer (None: no limit, the unlock cannot hang).
    fn unlock_deadline(&self) -> Option<Duration>;
    /// What gives up a request that is waiting, from another thread, once the wrapper is gone:
    /// the request then returns (`Cancelled`), or the process ends.
    fn give_up(&self) -> Box<dyn Fn() + Send>;
    /// Gives the lock up as a dead holder would: the next holder is told the owner died. Calls
    /// `done` once that is done (or, through a gateway, once it is under way).
    fn abandon<G: Guard>(&self, guard: G, done: &dyn Fn());
}

/// Why the lock was lost while the command ran, once it was.
#[derive(Clone, Default)]
pub(crate) struct Lost {
    pub(crate) why: Arc<Mutex<Option<String>>>,
    /// Set when the command has ended: nothing is reported after that.
    pub(crate) finished: Arc<AtomicBool>,
}

impl Lost {
    fn get(&self) -> Option<String> {
        self.why.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// The keeper's life: never returns.
pub(crate) fn keep(place: &Place, job: &Job<'_>, ctl: UnixStream, hold: OwnedFd) -> ! {
    detach();
    let r = match place {
        Place::Local { table, .. } => Local::new(table, job).map(|b| self::hold(&b, job, &ctl, &hold)),
        Place::Remote { addr, token, tls } => {
            Remote::connect(addr, token.clone(), tls.clone()).map(|b| self::hold(&b, job, &ctl, &hold))
        }
        #[cfg(feature = "etcd")]
        Place::Etcd(target) => crate::etcd::Etcd::connect(target, job).map(|b| self::hold(&b, job, &ctl, &hold)),
    };
    if let Err(e) = r {
        eprintln!("shmlock: {e:#}");
        send(&ctl, &format!("{} {EXIT_ERROR}", msg::FAILED));
    }
    // The lock is let go of and the owner deregistered (`hold` and the backend's drop): nothing
    // is left for exit handlers to do.
    crate::exec::exit_now(0)
}

/// Names itself, leaves the terminal's session (so that Ctrl-C, a signal to the job's process
/// group or a hang-up do not reach the keeper), ignores the signals a job is sent, and lets go of stdin and
/// stdout (a pipe the keeper holds would not see its end while it lingers).
fn detach() {
    let _ = nix::unistd::setsid();
    // `ps -o comm`, `top` and `pgrep shmlock-keeper` tell it from the wrapper (whose command
    // line it shares).
    let _ = nix::sys::prctl::set_name(c"shmlock-keeper");
    // A keeper that outlives the wrapper (background processes hold the lock) must not keep a
    // file system busy.
    let _ = std::env::set_current_dir("/");
    for s in [
        Signal::SIGINT,
        Signal::SIGQUIT,
        Signal::SIGTERM,
        Signal::SIGHUP,
        Signal::SIGPIPE,
    ] {
        set_ignored(s);
    }
    if let Ok(null) = std::fs::OpenOptions::new().read(true).write(true).open("/dev/null") {
        let _ = nix::unistd::dup2(null.as_raw_fd(), 0);
        let _ = nix::unistd::dup2(null.as_raw_fd(), 1);
    }
}

#[allow(unsafe_code)]
fn set_ignored(s: Signal) {
    // SAFETY: SIG_IGN installs no handler, so nothing runs in signal context.
    let _ = unsafe { signal(s, SigHandler::SigIgn) };
}

/// Points stderr at /dev/null: once the wrapper has exited, nobody is left to read it, and a
/// pipe (`$(shmlock run ... 2>&1)`) must not wait for the keeper.
fn quiet_stderr() {
    if let Ok(null) = std::fs::OpenOptions::new().write(true).open("/dev/null") {
        let _ = nix::unistd::dup2(null.as_raw_fd(), 2);
    }
}

/// The socket to the wrapper, read line by line.
struct Ctl<'a> {
    s: &'a UnixStream,
    buf: Vec<u8>,
    eof: bool,
}

impl Ctl<'_> {
    /// Reads what is there (blocking until something is): false at end of file.
    fn fill(&mut self) {
        let mut b = [0u8; 256];
        loop {
            match (&*self.s).read(&mut b) {
                Ok(0) => self.eof = true,
                Ok(n) if self.buf.len() < 4096 => self.buf.extend_from_slice(&b[..n]),
                Ok(_) => self.eof = true, // a wrapper does not send this much: not ours
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => self.eof = true,
            }
            return;
        }
    }

    fn line(&mut self) -> Option<String> {
        let i = self.buf.iter().position(|&b| b == b'\n')?;
        let l: Vec<u8> = self.buf.drain(..=i).collect();
        Some(String::from_utf8_lossy(&l[..i]).into_owned())
    }
}

/// Takes the lock, tells the wrapper, holds it while the pipe has writers, releases it.
fn hold<B: Backend>(b: &B, job: &Job<'_>, ctl: &UnixStream, hold: &OwnedFd) {
    let fail = |code: u8| {
        send(ctl, &format!("{} {code}", msg::FAILED));
    };
    if let Some(why) = enclosing(b, job) {
        eprintln!("shmlock: {why}; not running {}", job.program);
        return fail(job.a.conflict_exit_code);
    }
    let granted = Arc::new(AtomicBool::new(false));
    let gone = Arc::new(AtomicBool::new(false));
    let wait = match (job.nonblock, job.a.timeout) {
        (true, _) => Wait::No,
        (false, Some(t)) => Wait::for_duration(t),
        (false, None) => Wait::Forever,
    };
    // A free lock is taken at once, with no thread to start; only a wait needs the watch.
    let asked = match b.client().acquire(job.name, job.mode, Wait::No) {
        Err(Error::WouldBlock) if !matches!(wait, Wait::No) => {
            follow_wrapper_while_waiting(ctl, &granted, &gone, b.give_up());
            b.wait_for(job.name, job.mode, wait, &gone)
        }
        r => r,
    };
    let guard = match asked {
        Ok(g) => g,
        // The wrapper went (Ctrl-C) and the request was given up: nobody to tell.
        Err(_) if gone.load(Ordering::SeqCst) => return,
        Err(Error::WouldBlock) => {
            eprintln!(
                "shmlock: lock \"{}\" is busy{}; not running {}",
                job.shown,
                holders(b, job.name),
                job.program
            );
            return fail(job.a.conflict_exit_code);
        }
        Err(e @ Error::TimedOut { .. }) => {
            // A timeout names the holder where the backend knows it; else ask.
            let more = match &e {
                Error::TimedOut { holder: None, .. } => holders(b, job.name),
                _ => String::new(),
            };
            eprintln!(
                "shmlock: lock \"{}\" not acquired: {e}{more}; not running {}",
                job.shown, job.program
            );
            return fail(job.a.conflict_exit_code);
        }
        Err(e) => {
            eprintln!("shmlock: {:#}", b.lock_error(job.name, e));
            return fail(EXIT_ERROR);
        }
    };
    granted.store(true, Ordering::SeqCst);
    let g = guard.grant();
    let mode = if g.mode == Mode::Shared { 's' } else { 'e' };
    send(
        ctl,
        &format!("{} {} {} {mode}", msg::GRANTED, g.token.0, u8::from(g.owner_died)),
    );
    let pid = Arc::new(AtomicI32::new(0));
    let lost = Lost::default();
    let mut ctl = Ctl {
        s: ctl,
        buf: Vec::new(),
        eof: false,
    };
    let end = std::thread::scope(|s| {
        let watch = b.watch(s, &guard, job, &pid, &lost);
        let end = follow(&mut ctl, hold, &pid);
        lost.finished.store(true, Ordering::Release);
        drop(watch);
        end
    });
    let to_wrapper: &UnixStream = ctl.s;
    let reply = |m: &str| {
        if end.is_some() {
            send(to_wrapper, m);
        }
    };
    match end {
        Some(()) => match lost.get() {
            Some(why) => {
                eprintln!(
                    "shmlock: warning: {} ran partly without lock \"{}\": the lock was lost{} ({why})",
                    job.program,
                    job.shown,
                    b.place()
                );
                drop(guard);
                reply(msg::LOST);
            }
            None => {
                let kept = release(guard, b, &job.shown, to_wrapper);
                reply(if kept { msg::RELEASED } else { msg::LOST });
            }
        },
        None => b.abandon(guard, &|| {}),
    }
}

/// While the lock is awaited the wrapper sends nothing: the socket turns readable only when the
/// wrapper is gone (Ctrl-C, a kill), and then the request is given up (`give_up`: cancelled
/// locally, so that no dead request waits in the queue for a reaper; the session ended through a
/// gateway). A grant that raced with it is given up as a dead holder's would be, with the
/// owner-died notice. Once granted, this thread leaves the socket to [`follow`].
fn follow_wrapper_while_waiting(
    ctl: &UnixStream,
    granted: &Arc<AtomicBool>,
    gone: &Arc<AtomicBool>,
    give_up: Box<dyn Fn() + Send>,
) {
    let Ok(s) = ctl.try_clone() else {
        return;
    };
    let (granted, gone) = (Arc::clone(granted), Arc::clone(gone));
    let _ = std::thread::Builder::new().name("wrapper-watch".into()).spawn(move || {
        let mut fds = [PollFd::new(s.as_fd(), PollFlags::POLLIN)];
        while let Err(nix::errno::Errno::EINTR) = poll(&mut fds, PollTimeout::NONE) {}
        if !granted.load(Ordering::SeqCst) {
            gone.store(true, Ordering::SeqCst);
            give_up();
        }
    });
}

/// Follows the wrapper and the pipe until the lock is no longer wanted: until every write end of
/// the pipe is closed and the wrapper has said how the command ended, or is gone. Tells a wrapper
/// that waits when processes the command left behind still hold the pipe. Returns whether the
/// wrapper said that the command ended (None: it went without saying).
fn follow(ctl: &mut Ctl<'_>, hold: &OwnedFd, pid: &AtomicI32) -> Option<()> {
    let mut end = None;
    let mut hup = false;
    let said = |ctl: &mut Ctl<'_>, end: &mut Option<()>| {
        while let Some(l) = ctl.line() {
            let mut f = l.split_ascii_whitespace();
            match (f.next(), f.next()) {
                (Some(k), Some(p)) if k == msg::STARTED.to_string() => {
                    pid.store(p.parse().unwrap_or(0), Ordering::Release);
                }
                (Some(k), None) if k == msg::ENDED => *end = Some(()),
                _ => {}
            }
        }
    };
    // While the command runs: both.
    while end.is_none() && !ctl.eof && !hup {
        let (h, c) = {
            let mut fds = [
                PollFd::new(hold.as_fd(), PollFlags::POLLIN),
                PollFd::new(ctl.s.as_fd(), PollFlags::POLLIN),
            ];
            match poll(&mut fds, PollTimeout::NONE) {
                Ok(_) => (ready(&fds[0]), ready(&fds[1])),
                Err(nix::errno::Errno::EINTR) => continue,
                Err(_) => (true, true),
            }
        };
        if h {
            hup = drained(hold);
        }
        if c {
            ctl.fill();
            said(ctl, &mut end);
        }
    }
    // The wrapper closes its write end just before it says how the command ended.
    if hup {
        while end.is_none() && !ctl.eof {
            ctl.fill();
            said(ctl, &mut end);
        }
    }
    if !hup && !closed_now(hold) {
        if end.is_some() {
            send(ctl.s, msg::STILL_HELD);
            quiet_stderr();
        }
        while !drained(hold) {}
    }
    end
}

fn ready(fd: &PollFd<'_>) -> bool {
    fd.revents().is_some_and(|r| !r.is_empty())
}

/// Reads what a process wrote into the pipe (nobody should); true at end of file, when no write
/// end is left.
fn drained(hold: &OwnedFd) -> bool {
    let mut b = [0u8; 512];
    loop {
        match nix::unistd::read(hold.as_raw_fd(), &mut b) {
            Ok(0) => return true,
            Ok(_) => return false,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => return true,
        }
    }
}

/// Is every write end of the pipe closed already?
fn closed_now(hold: &OwnedFd) -> bool {
    let mut fds = [PollFd::new(hold.as_fd(), PollFlags::POLLIN)];
    match poll(&mut fds, PollTimeout::ZERO) {
        Ok(0) => false,
        Ok(_) => drained(hold),
        Err(_) => false,
    }
}

/// If an enclosing `shmlock run` of this process (as `$SHMLOCK_HELD` says) holds this lock in a
/// way that the request would wait for, forever: says so.
fn enclosing<B: Backend>(b: &B, job: &Job<'_>) -> Option<String> {
    let outer: Vec<Held> = Held::from_env()
        .into_iter()
        .filter(|h| h.place == job.place && h.shown == job.shown)
        .filter(|h| !(h.mode == Mode::Shared && job.mode == Mode::Shared))
        .collect();
    if outer.is_empty() {
        return None;
    }
    let info = b.info(job.name)?;
    let h = outer.iter().find(|h| info.holders.iter().any(|p| p.token == h.token))?;
    Some(format!(
        "lock \"{}\" is held by an enclosing `shmlock run` of this process (token {}); waiting for \
         it here would wait forever",
        job.shown, h.token
    ))
}

/// `, held by pid 1234 (label) for 2.0s`, or nothing if that cannot be told.
fn holders<B: Backend>(b: &B, name: &[u8]) -> String {
    b.held_by(name)
}

/// Unlocks, warning if the lock was taken away (`release --force`) while the command ran. With
/// a deadline (a gateway), gives up after it: exiting closes the connection, which releases the
/// lock as well. Returns whether the lock was still held.
fn release<B: Backend>(guard: impl Guard, b: &B, shown: &str, ctl: &UnixStream) -> bool {
    let (done, waiting) = mpsc::channel::<()>();
    if let (Some(deadline), Ok(ctl)) = (b.unlock_deadline(), ctl.try_clone()) {
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
                    send(&ctl, msg::LOST);
                    std::process::exit(0);
                }
            });
    }
    let kept = match guard.unlock() {
        Ok(()) => true,
        Err(Error::NotHeld) => {
            eprintln!(
                "shmlock: warning: lock \"{shown}\" was taken away (shmlock release --force) while \
                 the command ran"
            );
            false
        }
        Err(e) => {
            eprintln!("shmlock: warning: unlocking \"{shown}\"{}: {e}", b.place());
            false
        }
    };
    drop(done);
    kept
}

/// The lock in this machine's segment.
struct Local {
    table: Arc<LockTable>,
    client: Client,
}

impl Local {
    fn new(table: &Arc<LockTable>, job: &Job<'_>) -> anyhow::Result<Local> {
        let client = Client::with_table(Arc::clone(table), &format!("run {}", job.program))?;
        Ok(Local {
            table: Arc::clone(table),
            client,
        })
    }
}

impl Backend for Local {
    type Client = Client;
    fn client(&self) -> &Client {
        &self.client
    }
    fn info(&self, name: &[u8]) -> Option<LockInfo> {
        self.table.lock_info(name).ok().flatten()
    }
    fn lock_error(&self, name: &[u8], e: Error) -> anyhow::Error {
        name_error(name, e)
    }
    fn watch<'s, 'e, 'c: 'e>(
        &'e self,
        _: &'s std::thread::Scope<'s, 'e>,
        _: &'e <Client as Locker>::Guard<&'c Client>,
        _: &Job<'_>,
        _: &Arc<AtomicI32>,
        _: &Lost,
    ) -> Option<mpsc::Sender<()>> {
        None // a local lock is lost only to `release --force`, which the unlock reports
    }
    fn place(&self) -> String {
        String::new()
    }
    fn unlock_deadline(&self) -> Option<Duration> {
        None
    }
    fn give_up(&self) -> Box<dyn Fn() + Send> {
        let table = Arc::clone(&self.table);
        Box::new(move || {
            let _ = table.abandon_own_locks();
        })
    }
    fn abandon<G: Guard>(&self, guard: G, done: &dyn Fn()) {
        if let Err(e) = self.table.abandon_own_locks() {
            eprintln!("shmlock: warning: giving up the lock: {e}");
        }
        drop(guard); // its unlock finds the lock gone, quietly
        done();
    }
}

/// `, held by pid 1234 (label) for 2.0s`, or nothing if nobody holds `l`.
pub(crate) fn describe_holders(l: &LockInfo) -> String {
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

/// The lock through a gateway session.
struct Remote {
    client: Arc<RemoteClient>,
    addr: String,
}

impl Remote {
    fn connect(addr: &str, token: Option<String>, tls: Option<TlsOptions>) -> anyhow::Result<Remote> {
        // `ConnectOptions` may gain fields; the others keep their defaults.
        let options = ConnectOptions {
            auth_token: token.clone(),
            connect_timeout: Some(CONNECT_TIMEOUT),
            tls,
            ..ConnectOptions::default()
        };
        let client = RemoteClient::connect_with(addr, &options).map_err(|e| connect_error(addr, e))?;
        if client.hello().auth_required && token.is_none() {
            return Err(token_needed(addr));
        }
        Ok(Remote {
            client: Arc::new(client),
            addr: addr.to_string(),
        })
    }
}

impl Backend for Remote {
    type Client = RemoteClient;
    fn client(&self) -> &RemoteClient {
        &self.client
    }
    /// As the gateway's `LOCKS` tells it (best effort).
    fn info(&self, name: &[u8]) -> Option<LockInfo> {
        self.client.locks(Some(name)).ok()?.into_iter().find(|l| l.name == name)
    }
    fn lock_error(&self, name: &[u8], e: Error) -> anyhow::Error {
        lock_error(&self.addr, &escape_name(name), e)
    }
    fn watch<'s, 'e, 'c: 'e>(
        &'e self,
        _: &'s std::thread::Scope<'s, 'e>,
        _: &'e <RemoteClient as Locker>::Guard<&'c RemoteClient>,
        job: &Job<'_>,
        pid: &Arc<AtomicI32>,
        lost: &Lost,
    ) -> Option<mpsc::Sender<()>> {
        let (stop, stopped) = mpsc::channel::<()>();
        let m = Monitor {
            client: Arc::clone(&self.client),
            addr: self.addr.clone(),
            shown: job.shown.clone(),
            program: job.program.clone(),
            pid: job.a.kill_on_loss.then(|| Arc::clone(pid)),
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
    /// Ends the session: the gateway drops its requests.
    fn give_up(&self) -> Box<dyn Fn() + Send> {
        Box::new(|| std::process::exit(0))
    }
    /// Ends the session without unlocking: the gateway releases what a session that ends holds
    /// with the owner-died notice.
    fn abandon<G: Guard>(&self, guard: G, done: &dyn Fn()) {
        std::mem::forget(guard);
        done();
        std::process::exit(0);
    }
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

/// Watches the gateway session while the lock is held (see `exec`'s module docs).
struct Monitor {
    client: Arc<RemoteClient>,
    addr: String,
    shown: String,
    program: String,
    /// The command's pid once started (0 before), to stop on loss (`--kill-on-loss`).
    pid: Option<Arc<AtomicI32>>,
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
        let pid = self.pid.as_ref().map(|p| p.load(Ordering::Acquire)).filter(|&p| p > 0);
        let what = match self.pid {
            Some(_) => format!("stopping {} (SIGTERM), as --kill-on-loss asks", self.program),
            None => format!("{} keeps running (--kill-on-loss would stop it)", self.program),
        };
        eprintln!(
            "shmlock: lost the gateway connection to {} ({why}): lock \"{}\" is no longer held; {what}",
            self.addr, self.shown
        );
        *self.lost.why.lock().unwrap_or_else(|e| e.into_inner()) = Some(why);
        if let Some(pid) = pid {
            let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
        }
    }
}
