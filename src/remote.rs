//! The remote client: lock names through a `shmlockd` gateway over TCP, with the local API.
//!
//! ```no_run
//! use shmlock::remote::RemoteClient;
//! let client = RemoteClient::connect("127.0.0.1:7411")?;
//! let guard = client.lock("orders/42")?;            // exclusive, waits as long as it takes
//! println!("fencing token {}", guard.token());
//! assert!(client.try_lock("orders/42").is_err());    // re-locking is an error, never a hang
//! drop(guard);                                       // unlocks
//! # Ok::<(), shmlock::Error>(())
//! ```
//!
//! A [`RemoteClient`] is one connection, hence one session and one owner at the gateway: its
//! locks are released when it is dropped, when its process dies, or when the connection breaks.
//!
//! # Concurrency
//! Requests are pipelined: each gets a numeric tag, is written at once under a short mutex, and
//! waits for its own response, which a reader thread matches by tag. So several threads may share
//! one client (they are one owner, as with a local `Client`), and [`RemoteClient::start_lock`]
//! sends a request without waiting for it. When the gateway announces an idle timeout, a
//! keep-alive thread sends `PING` whenever nothing was sent for a third of it.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{Shutdown, SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::client::{FencingToken, Grant};
use crate::error::{Error, Result};
use crate::gateway::proto::{self, ErrorCode, Hello, Response};
use crate::table::Mode;

/// Options for [`RemoteClient::connect_with`].
#[derive(Debug, Clone, Default)]
pub struct ConnectOptions {
    /// The shared secret, sent with `AUTH` right after connecting.
    pub auth_token: Option<String>,
    /// How long connecting may take; None: the system's default.
    pub connect_timeout: Option<Duration>,
}

/// What a request's response said, short of an error.
#[derive(Debug)]
enum Answer {
    Granted(Grant),
    Done,
}

type Reply = Result<Answer>;

/// Who waits for a tag's response.
#[derive(Debug)]
enum Slot {
    /// A caller, on this channel.
    Caller(mpsc::SyncSender<Reply>),
    /// Nobody (fire-and-forget requests).
    Nobody,
    /// Nobody; a lock request given up: if it is granted, unlock it.
    UnlockOnGrant(Box<[u8]>),
}

#[derive(Debug, Default)]
struct Pending {
    slots: HashMap<u64, Slot>,
    /// Why the connection ended, once it has.
    closed: Option<String>,
}

#[derive(Debug)]
struct Inner {
    addr: String,
    writer: Mutex<TcpStream>,
    pending: Mutex<Pending>,
    next_tag: AtomicU64,
    /// Milliseconds since `epoch` of the last request sent (for the keep-alive).
    last_send: AtomicU64,
    epoch: Instant,
}

/// A connection to a gateway: one session, one owner.
#[derive(Debug)]
pub struct RemoteClient {
    inner: Arc<Inner>,
    hello: Hello,
    /// Dropping it stops the keep-alive thread.
    stop_keepalive: Option<mpsc::Sender<()>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Inner {
    fn conn_err(&self, why: impl Into<String>) -> Error {
        Error::Connection {
            addr: self.addr.clone(),
            why: why.into(),
        }
    }

    /// Registers `slot` under a new tag and sends `tag` + `rest`.
    fn send(&self, rest: &[u8], slot: Slot) -> Result<u64> {
        let tag = self.next_tag.fetch_add(1, Ordering::Relaxed);
        {
            let mut p = lock(&self.pending);
            if let Some(why) = &p.closed {
                return Err(self.conn_err(why.clone()));
            }
            p.slots.insert(tag, slot);
        }
        let mut line = Vec::with_capacity(rest.len() + 24);
        let _ = write!(line, "{tag} ");
        line.extend_from_slice(rest);
        line.push(b'\n');
        let r = lock(&self.writer).write_all(&line);
        if let Err(e) = r {
            lock(&self.pending).slots.remove(&tag);
            return Err(self.conn_err(format!("send failed: {e}")));
        }
        let ms = self.epoch.elapsed().as_millis() as u64;
        self.last_send.store(ms, Ordering::Relaxed);
        Ok(tag)
    }

    /// Sends a request and waits for its response.
    fn call(&self, rest: &[u8]) -> Reply {
        let (tx, rx) = mpsc::sync_channel(1);
        self.send(rest, Slot::Caller(tx))?;
        self.wait(&rx)
    }

    fn wait(&self, rx: &mpsc::Receiver<Reply>) -> Reply {
        rx.recv().unwrap_or_else(|_| {
            let why = lock(&self.pending).closed.clone();
            Err(self.conn_err(why.unwrap_or_else(|| "connection closed".into())))
        })
    }

    /// The reader thread: matches responses to slots until the connection ends.
    fn read_loop(self: &Arc<Self>, mut rd: BufReader<TcpStream>) {
        let mut line = Vec::with_capacity(128);
        let why = loop {
            line.clear();
            match rd.read_until(b'\n', &mut line) {
                Ok(0) => break "connection closed by the gateway".to_string(),
                Ok(_) => {}
                Err(e) => break format!("receive failed: {e}"),
            }
            match self.dispatch(&line) {
                Ok(()) => {}
                Err(why) => break why,
            }
        };
        let slots = {
            let mut p = lock(&self.pending);
            if p.closed.is_none() {
                p.closed = Some(why);
            }
            std::mem::take(&mut p.slots)
        };
        drop(slots); // callers' receivers now fail, and read `closed`
    }

    fn dispatch(&self, line: &[u8]) -> std::result::Result<(), String> {
        let resp = proto::parse_response(line)?;
        let (tag, reply) = match resp {
            Response::Granted {
                tag,
                token,
                owner_died,
                mode,
            } => (
                tag,
                Ok(Answer::Granted(Grant {
                    token: FencingToken(token),
                    owner_died,
                    mode,
                })),
            ),
            Response::Ok { tag } | Response::Pong { tag } | Response::Bye { tag } => (tag, Ok(Answer::Done)),
            Response::Error {
                tag,
                code,
                code_word,
                message,
            } => {
                if tag == proto::SERVER_TAG {
                    let why = format!("gateway error {code_word}: {message}");
                    if code.is_none_or(ErrorCode::closes) {
                        return Err(why);
                    }
                    return Ok(()); // BAD_TAG: we never send bad tags
                }
                (tag, Err(remote_error(code, code_word, message)))
            }
            Response::Hello(_) => return Ok(()),
        };
        let Ok(tag) = tag.parse::<u64>() else {
            return Err(format!("response with a tag we never sent: {tag}"));
        };
        let slot = lock(&self.pending).slots.remove(&tag);
        match slot {
            Some(Slot::Caller(tx)) => {
                let _ = tx.send(reply);
            }
            Some(Slot::UnlockOnGrant(name)) => {
                if let Ok(Answer::Granted(_)) = reply {
                    let mut rest = b"UNLOCK ".to_vec();
                    rest.extend_from_slice(&name);
                    let _ = self.send(&rest, Slot::Nobody);
                }
            }
            Some(Slot::Nobody) | None => {}
        }
        Ok(())
    }
}

/// The library error for a gateway error response.
fn remote_error(code: Option<ErrorCode>, code_word: &str, message: &str) -> Error {
    match code {
        Some(ErrorCode::Busy) => Error::WouldBlock,
        Some(ErrorCode::AlreadyHeld) => Error::AlreadyHeld,
        Some(ErrorCode::NotHeld) => Error::NotHeld,
        Some(ErrorCode::Cancelled) => Error::Cancelled,
        _ => Error::Remote {
            code: code_word.to_string(),
            message: message.to_string(),
        },
    }
}

impl RemoteClient {
    /// Connects to the gateway at `addr` (e.g. `"127.0.0.1:7411"`), without authentication.
    pub fn connect(addr: impl ToSocketAddrs) -> Result<RemoteClient> {
        Self::connect_with(addr, &ConnectOptions::default())
    }

    /// Connects with `options`; authenticates if a token is given.
    pub fn connect_with(addr: impl ToSocketAddrs, options: &ConnectOptions) -> Result<RemoteClient> {
        let err = |addr: &str, why: String| Error::Connection {
            addr: addr.to_string(),
            why,
        };
        let addrs: Vec<SocketAddr> = addr
            .to_socket_addrs()
            .map_err(|e| err("?", format!("cannot resolve: {e}")))?
            .collect();
        let shown = addrs.first().map(|a| a.to_string()).unwrap_or_default();
        let mut last = format!("no address for {shown}");
        let mut stream = None;
        for a in &addrs {
            let r = match options.connect_timeout {
                Some(t) => TcpStream::connect_timeout(a, t),
                None => TcpStream::connect(a),
            };
            match r {
                Ok(s) => {
                    stream = Some(s);
                    break;
                }
                Err(e) => last = format!("cannot connect: {e}"),
            }
        }
        let stream = stream.ok_or_else(|| err(&shown, last))?;
        let io = |e: std::io::Error| err(&shown, e.to_string());
        stream.set_nodelay(true).map_err(io)?;
        let mut rd = BufReader::new(stream.try_clone().map_err(io)?);
        let mut line = Vec::new();
        rd.read_until(b'\n', &mut line).map_err(io)?;
        let hello = match proto::parse_response(&line) {
            Ok(Response::Hello(h)) => h,
            Ok(Response::Error {
                code,
                code_word,
                message,
                ..
            }) => return Err(remote_error(code, code_word, message)),
            Ok(_) => return Err(err(&shown, "no greeting".into())),
            Err(e) if line.is_empty() => return Err(err(&shown, format!("closed before greeting ({e})"))),
            Err(e) => return Err(err(&shown, e)),
        };
        let inner = Arc::new(Inner {
            addr: shown,
            writer: Mutex::new(stream),
            pending: Mutex::default(),
            next_tag: AtomicU64::new(1),
            last_send: AtomicU64::new(0),
            epoch: Instant::now(),
        });
        let reader = {
            let inner2 = inner.clone();
            std::thread::Builder::new()
                .name("shmlock-remote-rd".into())
                .spawn(move || inner2.read_loop(rd))
                .map_err(|e| inner_err(&inner, e))?
        };
        let mut client = RemoteClient {
            inner,
            hello,
            stop_keepalive: None,
            threads: vec![reader],
        };
        if let Some(t) = client.hello.idle_timeout {
            client.start_keepalive(t / 3)?;
        }
        if let Some(token) = &options.auth_token {
            let mut rest = b"AUTH ".to_vec();
            rest.extend_from_slice(token.as_bytes());
            client.inner.call(&rest)?;
        }
        Ok(client)
    }

    fn start_keepalive(&mut self, every: Duration) -> Result<()> {
        let every = every.max(Duration::from_millis(10));
        let (tx, rx) = mpsc::channel::<()>();
        let inner = self.inner.clone();
        let t = std::thread::Builder::new()
            .name("shmlock-remote-ka".into())
            .spawn(move || loop {
                match rx.recv_timeout(every) {
                    Err(mpsc::RecvTimeoutError::Timeout) => {}
                    _ => return,
                }
                let idle = inner.epoch.elapsed().as_millis() as u64 - inner.last_send.load(Ordering::Relaxed);
                if idle >= every.as_millis() as u64 && inner.send(b"PING", Slot::Nobody).is_err() {
                    return;
                }
            })
            .map_err(|e| inner_err(&self.inner, e))?;
        self.stop_keepalive = Some(tx);
        self.threads.push(t);
        Ok(())
    }

    /// The gateway's greeting: protocol version, limits, idle timeout.
    pub fn hello(&self) -> &Hello {
        &self.hello
    }

    /// Sends a lock request without waiting for its answer; [`PendingLock::wait`] gets it.
    /// `timeout` None waits as long as it takes; `Some(ZERO)` is a try-lock.
    pub fn start_lock(&self, name: impl AsRef<[u8]>, mode: Mode, timeout: Option<Duration>) -> Result<PendingLock<'_>> {
        let name = name.as_ref();
        check_name(name)?;
        let mut rest = Vec::with_capacity(name.len() + 32);
        rest.extend_from_slice(if timeout == Some(Duration::ZERO) {
            b"TRY "
        } else {
            b"LOCK "
        });
        rest.extend_from_slice(name);
        rest.extend_from_slice(match mode {
            Mode::Exclusive => b" EXCLUSIVE",
            Mode::Shared => b" SHARED",
        });
        if let Some(t) = timeout.filter(|t| !t.is_zero()) {
            let ms = t.as_millis().clamp(1, u128::from(proto::MAX_TIMEOUT_MS));
            let _ = write!(rest, " TIMEOUT {ms}");
        }
        let (tx, rx) = mpsc::sync_channel(1);
        let tag = self.inner.send(&rest, Slot::Caller(tx))?;
        Ok(PendingLock {
            client: self,
            name: name.into(),
            tag,
            rx: Some(rx),
            timeout,
            started: Instant::now(),
        })
    }

    fn acquire(&self, name: &[u8], mode: Mode, timeout: Option<Duration>) -> Result<RemoteGuard<'_>> {
        self.start_lock(name, mode, timeout)?.wait()
    }

    /// Locks `name` exclusively, waiting as long as it takes.
    pub fn lock(&self, name: impl AsRef<[u8]>) -> Result<RemoteGuard<'_>> {
        self.acquire(name.as_ref(), Mode::Exclusive, None)
    }

    /// Locks `name` exclusively if that is possible at once; else [`Error::WouldBlock`].
    pub fn try_lock(&self, name: impl AsRef<[u8]>) -> Result<RemoteGuard<'_>> {
        self.acquire(name.as_ref(), Mode::Exclusive, Some(Duration::ZERO))
    }

    /// Locks `name` exclusively, waiting at most `timeout` (rounded up to a millisecond); else
    /// [`Error::TimedOut`].
    pub fn try_lock_for(&self, name: impl AsRef<[u8]>, timeout: Duration) -> Result<RemoteGuard<'_>> {
        self.acquire(
            name.as_ref(),
            Mode::Exclusive,
            Some(timeout.max(Duration::from_millis(1))),
        )
    }

    /// Locks `name` in shared mode, waiting as long as it takes.
    pub fn lock_shared(&self, name: impl AsRef<[u8]>) -> Result<RemoteGuard<'_>> {
        self.acquire(name.as_ref(), Mode::Shared, None)
    }

    /// Locks `name` in shared mode if that is possible at once; else [`Error::WouldBlock`].
    pub fn try_lock_shared(&self, name: impl AsRef<[u8]>) -> Result<RemoteGuard<'_>> {
        self.acquire(name.as_ref(), Mode::Shared, Some(Duration::ZERO))
    }

    /// Locks `name` in shared mode, waiting at most `timeout`.
    pub fn try_lock_shared_for(&self, name: impl AsRef<[u8]>, timeout: Duration) -> Result<RemoteGuard<'_>> {
        self.acquire(name.as_ref(), Mode::Shared, Some(timeout.max(Duration::from_millis(1))))
    }

    /// Unlocks `name` held by this session (for a guard that was forgotten).
    pub fn unlock(&self, name: impl AsRef<[u8]>) -> Result<()> {
        let name = name.as_ref();
        check_name(name)?;
        let mut rest = b"UNLOCK ".to_vec();
        rest.extend_from_slice(name);
        self.inner.call(&rest).map(|_| ())
    }

    /// Sends `UNLOCK` without waiting for the answer (guards' drop).
    fn unlock_async(&self, name: &[u8]) {
        let mut rest = Vec::with_capacity(name.len() + 8);
        rest.extend_from_slice(b"UNLOCK ");
        rest.extend_from_slice(name);
        let _ = self.inner.send(&rest, Slot::Nobody);
    }

    /// A round trip to the gateway; returns how long it took.
    pub fn ping(&self) -> Result<Duration> {
        let t = Instant::now();
        self.inner.call(b"PING")?;
        Ok(t.elapsed())
    }
}

fn inner_err(inner: &Inner, e: std::io::Error) -> Error {
    inner.conn_err(format!("cannot start a thread: {e}"))
}

/// Names go on the wire as one word: no spaces or control bytes.
fn check_name(name: &[u8]) -> Result<()> {
    if name.is_empty() || name.iter().any(|&b| b <= b' ' || b == 0x7f) {
        return Err(Error::Remote {
            code: ErrorCode::BadName.to_string(),
            message: "names sent to a gateway are 1 or more bytes without spaces or control bytes".into(),
        });
    }
    Ok(())
}

impl Drop for RemoteClient {
    fn drop(&mut self) {
        self.stop_keepalive = None;
        let _ = lock(&self.inner.writer).shutdown(Shutdown::Both);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// A lock request sent and not yet answered.
#[derive(Debug)]
#[must_use = "a pending lock is given up (and unlocked if granted) when dropped"]
pub struct PendingLock<'a> {
    client: &'a RemoteClient,
    name: Box<[u8]>,
    tag: u64,
    rx: Option<mpsc::Receiver<Reply>>,
    timeout: Option<Duration>,
    started: Instant,
}

impl<'a> PendingLock<'a> {
    /// Waits for the answer.
    pub fn wait(mut self) -> Result<RemoteGuard<'a>> {
        let rx = self.rx.take().expect("answer not yet taken");
        let reply = self.client.inner.wait(&rx);
        match reply {
            Ok(Answer::Granted(grant)) => Ok(RemoteGuard {
                client: self.client,
                name: std::mem::take(&mut self.name),
                grant,
                released: false,
            }),
            Ok(Answer::Done) => Err(self.client.inner.conn_err("unexpected answer to LOCK")),
            Err(Error::Remote { code, .. }) if code == ErrorCode::Timeout.as_str() => Err(Error::TimedOut {
                waited: self.started.elapsed().max(self.timeout.unwrap_or_default()),
                holder: None,
            }),
            Err(e) => Err(e),
        }
    }
}

impl Drop for PendingLock<'_> {
    fn drop(&mut self) {
        if self.rx.is_none() {
            return;
        }
        // Given up: if the answer has not come yet, unlock when it does.
        let mut p = lock(&self.client.inner.pending);
        if let Some(slot) = p.slots.get_mut(&self.tag) {
            *slot = Slot::UnlockOnGrant(std::mem::take(&mut self.name));
            return;
        }
        drop(p);
        if let Some(Ok(Answer::Granted(_))) = self.rx.as_ref().and_then(|rx| rx.try_recv().ok()) {
            self.client.unlock_async(&self.name);
        }
    }
}

/// A lock held through a gateway; unlocks when dropped (without waiting for the answer).
#[must_use = "the lock is released as soon as the guard is dropped"]
#[derive(Debug)]
pub struct RemoteGuard<'a> {
    client: &'a RemoteClient,
    name: Box<[u8]>,
    grant: Grant,
    released: bool,
}

impl RemoteGuard<'_> {
    /// The fencing token of this grant.
    pub fn token(&self) -> FencingToken {
        self.grant.token
    }

    /// True if the previous holder died holding the lock.
    pub fn owner_died(&self) -> bool {
        self.grant.owner_died
    }

    /// The mode held.
    pub fn mode(&self) -> Mode {
        self.grant.mode
    }

    /// Everything the grant said.
    pub fn grant(&self) -> Grant {
        self.grant
    }

    /// The name locked.
    pub fn name(&self) -> &[u8] {
        &self.name
    }

    /// Unlocks now and waits for the gateway's answer.
    pub fn unlock(mut self) -> Result<()> {
        self.released = true;
        self.client.unlock(&self.name)
    }
}

impl Drop for RemoteGuard<'_> {
    fn drop(&mut self) {
        if !self.released {
            self.client.unlock_async(&self.name);
        }
    }
}
