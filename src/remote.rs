//! The remote client: lock names through a `shmlockd` gateway over TCP, with the local API.
//!
//! ```no_run
//! use shmlock::remote::RemoteClient;
//! use shmlock::{Guard, Locker};
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
//! waits for its own response, matched by tag. So several threads may share one client (they are
//! one owner, as with a local `Client`), and [`RemoteClient::start_lock`] sends a request without
//! waiting for it.
//!
//! Responses are read by the callers themselves (leader/follower): a caller waiting for its
//! answer reads the socket if nobody else does, and hands every line it reads to the request it
//! answers; other callers park until their answer is handed to them or the reading role is
//! handed to them. So a lone caller's round trip is a write and a blocking read in its own
//! thread, with no second thread to wake. A background thread reads only answers nobody waits
//! for (unlocks sent by dropped guards, pings) when no caller reads, after a short delay, and
//! sends the keep-alive `PING` whenever nothing was sent for a third of the gateway's idle
//! timeout.
//!
//! Lock order: `reader` (held by whoever has the reading role, `State::reading`) before
//! `state`; `writer` is taken alone. The reading role is taken and given up under `state`.

use std::borrow::Cow;
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream, ToSocketAddrs};
use std::ops::Deref;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::{self, Thread};
use std::time::{Duration, Instant};

use crate::client::{FencingToken, Grant};
use crate::error::{Error, Result};
use crate::lock::{Guard, Locker, Wait};
use crate::proto::admin::{CheckReport, LocksPage, StatusReport};
use crate::proto::framer::Framer;
use crate::proto::{self, ErrorCode, Hello, Response};
use crate::table::{Cursor, LockInfo, Mode};

/// How long answers nobody waits for may stay unread while no caller reads, before the
/// background thread reads them (a caller that comes meanwhile reads them on its way).
const DRAIN_DELAY: Duration = Duration::from_millis(2);

/// What [`RemoteClient::status`] tells.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteStatus {
    /// The segment, capacities, pools, counters and supervisor.
    pub report: StatusReport,
    /// The invariant check's outcome ([`CheckReport::Skipped`] unless it was asked for).
    pub check: CheckReport,
}

/// Options for [`RemoteClient::connect_with`].
#[derive(Debug, Clone, Default)]
pub struct ConnectOptions {
    /// The shared secret, sent with `AUTH` right after connecting.
    pub auth_token: Option<String>,
    /// How long connecting may take; None: the system's default.
    pub connect_timeout: Option<Duration>,
    /// How long the gateway may stay silent while an answer is due (the greeting included)
    /// before the connection is given up (every request unanswered then fails with
    /// [`Error::Connection`]); None: as long as it takes. Meant for short sessions of queries
    /// (`locks`, `status`): a `LOCK` that waits longer than this for its grant fails too.
    pub read_timeout: Option<Duration>,
}

/// What a request's response said, short of an error.
#[derive(Debug)]
enum Answer {
    Granted(Grant),
    Done,
    /// The lines of a multi-line answer (`LOCKS`), the last one ending it.
    Lines(Vec<Vec<u8>>),
}

type Reply = Result<Answer>;

/// Who waits for a tag's response.
#[derive(Debug)]
enum Slot {
    /// A caller: its answer once read, and its thread while it is parked in `wait`.
    Caller {
        reply: Option<Reply>,
        parked: Option<Thread>,
        /// For a multi-line answer: the lines so far (the answer is complete at its `END` or
        /// `ERR` line).
        lines: Option<Vec<Vec<u8>>>,
    },
    /// Nobody (fire-and-forget requests).
    Nobody,
    /// Nobody; a lock request given up: if it is granted, unlock it.
    UnlockOnGrant(Box<[u8]>),
}

impl Slot {
    fn caller() -> Slot {
        Slot::Caller {
            reply: None,
            parked: None,
            lines: None,
        }
    }

    fn multi_line_caller() -> Slot {
        Slot::Caller {
            reply: None,
            parked: None,
            lines: Some(Vec::new()),
        }
    }

    /// True if nobody waits for the answer.
    fn orphan(&self) -> bool {
        !matches!(self, Slot::Caller { .. })
    }
}

#[derive(Debug, Default)]
struct State {
    slots: HashMap<u64, Slot>,
    /// Why the connection ended, once it has.
    closed: Option<String>,
    /// Someone (a caller or the background thread) has the reading role and may lock `reader`.
    reading: bool,
    /// Callers inside `wait`.
    waiting: usize,
    /// Slots whose answer nobody waits for.
    orphans: usize,
    /// The background thread sleeps with no drain planned: wake it when answers nobody waits
    /// for may be left unread.
    bg_idle: bool,
    /// The client is being dropped.
    stop: bool,
}

/// The write side, with a line buffer reused by every request.
#[derive(Debug)]
struct Writer {
    stream: TcpStream,
    line: Vec<u8>,
}

/// The read side: the socket and the protocol's line framer.
#[derive(Debug)]
struct Reader {
    stream: TcpStream,
    framer: Framer,
}

/// The longest response line taken from a gateway (its own are far shorter): a gateway that
/// sends a longer one is not trusted with more memory.
const MAX_RESPONSE_LINE: usize = 1 << 20;

impl Reader {
    fn new(stream: TcpStream) -> Reader {
        Reader {
            stream,
            framer: Framer::new(MAX_RESPONSE_LINE, false),
        }
    }

    /// The next whole line already read (without its LF), if any; why the connection cannot
    /// go on, if the bytes do not frame.
    fn next_line(&mut self) -> std::result::Result<Option<&[u8]>, String> {
        self.framer
            .next_line()
            .map_err(|e| format!("the gateway sent a bad line: {e}"))
    }

    /// Reads what the socket has (blocking until something comes); why not, if it ended.
    fn fill(&mut self) -> std::result::Result<(), String> {
        loop {
            match self.stream.read(self.framer.spare()) {
                Ok(0) => return Err("connection closed by the gateway".into()),
                Ok(n) => {
                    self.framer.filled(n);
                    return Ok(());
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                    return Err("no answer within the read timeout".into())
                }
                Err(e) => return Err(format!("receive failed: {e}")),
            }
        }
    }
}

#[derive(Debug)]
struct Inner {
    addr: String,
    writer: Mutex<Writer>,
    state: Mutex<State>,
    /// The background thread waits here.
    bg: Condvar,
    reader: Mutex<Reader>,
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
    background: Option<thread::JoinHandle<()>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Appends `n` in decimal.
fn push_u64(out: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

/// What to do, outside the state lock, after a line was handed out.
enum After {
    Nothing,
    Wake(Thread),
    Unlock(Box<[u8]>),
}

impl Inner {
    fn conn_err(&self, why: impl Into<String>) -> Error {
        Error::Connection {
            addr: self.addr.clone(),
            why: why.into(),
        }
    }

    fn closed_err(&self, st: &State) -> Error {
        self.conn_err(st.closed.clone().unwrap_or_else(|| "connection closed".into()))
    }

    /// Counts an answer nobody waits for; wakes the background thread if it may have to read it.
    fn add_orphan(&self, st: &mut State) {
        st.orphans += 1;
        if st.bg_idle && !st.reading {
            st.bg_idle = false;
            self.bg.notify_one();
        }
    }

    /// Registers `slot` under a new tag and sends `tag`, a space, what `request` appends, LF.
    fn send(&self, slot: Slot, request: impl FnOnce(&mut Vec<u8>)) -> Result<u64> {
        let tag = self.next_tag.fetch_add(1, Ordering::Relaxed);
        {
            let mut st = lock(&self.state);
            if st.closed.is_some() {
                return Err(self.closed_err(&st));
            }
            if slot.orphan() {
                self.add_orphan(&mut st);
            }
            st.slots.insert(tag, slot);
        }
        let r = {
            let mut w = lock(&self.writer);
            let w = &mut *w;
            w.line.clear();
            push_u64(&mut w.line, tag);
            w.line.push(b' ');
            request(&mut w.line);
            w.line.push(b'\n');
            w.stream.write_all(&w.line)
        };
        if let Err(e) = r {
            let mut st = lock(&self.state);
            if st.slots.remove(&tag).is_some_and(|s| s.orphan()) {
                st.orphans -= 1;
            }
            return Err(self.conn_err(format!("send failed: {e}")));
        }
        let ms = self.epoch.elapsed().as_millis() as u64;
        self.last_send.store(ms, Ordering::Relaxed);
        Ok(tag)
    }

    /// Sends a request and waits for its response.
    fn call(&self, request: impl FnOnce(&mut Vec<u8>)) -> Reply {
        let tag = self.send(Slot::caller(), request)?;
        self.wait(tag)
    }

    /// Waits for the answer to `tag` (a `Slot::Caller`): reads the socket itself while nobody
    /// else does, else parks until a reader hands it its answer or the reading role.
    fn wait(&self, tag: u64) -> Reply {
        let mut st = lock(&self.state);
        st.waiting += 1;
        let reply = loop {
            let reading = st.reading;
            match st.slots.get_mut(&tag) {
                Some(Slot::Caller { reply, parked, .. }) => {
                    if let Some(r) = reply.take() {
                        st.slots.remove(&tag);
                        break r;
                    }
                    if !reading {
                        *parked = None;
                        st.reading = true;
                        drop(st);
                        self.lead(tag);
                        st = lock(&self.state);
                        st.reading = false;
                        continue;
                    }
                    if parked.is_none() {
                        *parked = Some(thread::current());
                    }
                    drop(st);
                    thread::park();
                    st = lock(&self.state);
                }
                // The connection ended (its slots were dropped), or the slot was given up,
                // which only a `PendingLock` never waited for does.
                _ => break Err(self.closed_err(&st)),
            }
        };
        st.waiting -= 1;
        self.hand_off(st);
        reply
    }

    /// With the reading role free: gives it to a caller still waiting, if any, else lets the
    /// background thread read answers nobody waits for.
    fn hand_off(&self, st: MutexGuard<'_, State>) {
        if st.reading {
            return;
        }
        if st.waiting > 0 {
            let next = st.slots.values().find_map(|s| match s {
                Slot::Caller {
                    reply: None,
                    parked: Some(t),
                    ..
                } => Some(t.clone()),
                _ => None,
            });
            drop(st);
            if let Some(t) = next {
                t.unpark();
            }
        } else if st.orphans > 0 && st.bg_idle {
            let mut st = st;
            st.bg_idle = false;
            self.bg.notify_one();
        }
    }

    /// The leader: reads until the answer to `tag` has come (or the connection ended), handing
    /// out every line read. Called with the reading role.
    fn lead(&self, tag: u64) {
        let mut rd = lock(&self.reader);
        loop {
            let mut mine = false;
            loop {
                let line = match rd.next_line() {
                    Ok(Some(line)) => line,
                    Ok(None) => break,
                    Err(why) => return self.close(why),
                };
                match self.dispatch(line, tag) {
                    Ok(m) => mine |= m,
                    Err(why) => return self.close(why),
                }
            }
            if mine {
                return;
            }
            if let Err(why) = rd.fill() {
                return self.close(why);
            }
        }
    }

    /// The background thread's reading: while answers nobody waits for are due and no caller
    /// waits. Called with the reading role.
    fn drain(&self) {
        let mut rd = lock(&self.reader);
        loop {
            loop {
                let line = match rd.next_line() {
                    Ok(Some(line)) => line,
                    Ok(None) => break,
                    Err(why) => return self.close(why),
                };
                if let Err(why) = self.dispatch(line, 0) {
                    return self.close(why);
                }
            }
            {
                let st = lock(&self.state);
                if st.orphans == 0 || st.waiting > 0 || st.closed.is_some() {
                    return;
                }
            }
            if let Err(why) = rd.fill() {
                return self.close(why);
            }
        }
    }

    /// The connection ended: fails every request still unanswered and wakes their callers.
    /// Answers already read stay with their callers.
    fn close(&self, why: String) {
        let mut woken = Vec::new();
        {
            let mut st = lock(&self.state);
            if st.closed.is_none() {
                st.closed = Some(why);
            }
            st.slots.retain(|_, s| match s {
                Slot::Caller { reply: Some(_), .. } => true,
                Slot::Caller { parked, .. } => {
                    woken.extend(parked.take());
                    false
                }
                _ => false,
            });
            st.orphans = 0;
            self.bg.notify_one();
        }
        for t in woken {
            t.unpark();
        }
    }

    /// Hands one response line to its slot; true if it answers `own`. Err: the connection must
    /// end, for this reason.
    fn dispatch(&self, line: &[u8], own: u64) -> std::result::Result<bool, String> {
        // A line of a multi-line answer goes to its caller as it is.
        let first = line.split(|&b| b == b' ').next().unwrap_or_default();
        if let Some(tag) = std::str::from_utf8(first).ok().and_then(|t| t.parse::<u64>().ok()) {
            let mut st = lock(&self.state);
            if let Some(Slot::Caller {
                reply: reply @ None,
                parked,
                lines: Some(lines),
            }) = st.slots.get_mut(&tag)
            {
                lines.push(line.to_vec());
                if crate::proto::admin::ends_response(line) {
                    *reply = Some(Ok(Answer::Lines(std::mem::take(lines))));
                    if let Some(t) = parked.take() {
                        drop(st);
                        t.unpark();
                    }
                }
                return Ok(tag == own);
            }
        }
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
                    return Ok(false); // BAD_TAG: we never send bad tags
                }
                (tag, Err(remote_error(code, code_word, message)))
            }
            Response::Hello(_) => return Ok(false),
        };
        let Ok(tag) = tag.parse::<u64>() else {
            return Err(format!("response with a tag we never sent: {tag}"));
        };
        let after = {
            let mut st = lock(&self.state);
            match st.slots.get_mut(&tag) {
                Some(Slot::Caller {
                    reply: r @ None,
                    parked,
                    ..
                }) => {
                    *r = Some(reply);
                    parked.take().map_or(After::Nothing, After::Wake)
                }
                Some(Slot::Caller { .. }) => After::Nothing, // answered twice: keep the first
                Some(_) => {
                    st.orphans -= 1;
                    match st.slots.remove(&tag) {
                        Some(Slot::UnlockOnGrant(name)) if matches!(reply, Ok(Answer::Granted(_))) => {
                            After::Unlock(name)
                        }
                        _ => After::Nothing,
                    }
                }
                None => After::Nothing,
            }
        };
        match after {
            After::Nothing => {}
            After::Wake(t) => t.unpark(),
            After::Unlock(name) => {
                let _ = self.send(Slot::Nobody, |l| {
                    l.extend_from_slice(b"UNLOCK ");
                    l.extend_from_slice(&name);
                });
            }
        }
        Ok(tag == own)
    }

    /// The background thread: keep-alive pings, and reading answers nobody waits for while no
    /// caller reads. Ends when the client is dropped or the connection ends.
    fn background(&self, keepalive: Option<Duration>) {
        let mut st = lock(&self.state);
        let mut drain_at: Option<Instant> = None;
        loop {
            if st.stop || st.closed.is_some() {
                return;
            }
            let now = Instant::now();
            let mut wake = None;
            if let Some(every) = keepalive {
                let since = Duration::from_millis(self.last_send.load(Ordering::Relaxed));
                let due = self.epoch + since + every;
                if now >= due {
                    drop(st);
                    let _ = self.send(Slot::Nobody, |l| l.extend_from_slice(b"PING"));
                    st = lock(&self.state);
                    continue;
                }
                wake = Some(due);
            }
            if st.orphans > 0 && !st.reading {
                match drain_at {
                    Some(t) if now >= t => {
                        drain_at = None;
                        st.reading = true;
                        drop(st);
                        self.drain();
                        st = lock(&self.state);
                        st.reading = false;
                        if st.waiting > 0 {
                            self.hand_off(st);
                            st = lock(&self.state);
                        }
                        continue;
                    }
                    Some(_) => {}
                    None => drain_at = Some(now + DRAIN_DELAY),
                }
            } else {
                drain_at = None;
            }
            if let Some(t) = drain_at {
                wake = Some(wake.map_or(t, |w: Instant| w.min(t)));
            }
            st.bg_idle = drain_at.is_none();
            st = match wake {
                None => self.bg.wait(st).unwrap_or_else(|p| p.into_inner()),
                Some(t) => {
                    let d = t.saturating_duration_since(now);
                    self.bg.wait_timeout(st, d).unwrap_or_else(|p| p.into_inner()).0
                }
            };
            st.bg_idle = false;
        }
    }
}

/// The library error for a gateway error response.
/// (One mapping for both sides: [`proto::error_of`]; a code this version does not know is
/// `INTERNAL`, its word kept in the message.)
fn remote_error(code: Option<ErrorCode>, code_word: &str, message: &str) -> Error {
    match code {
        Some(code) => proto::error_of(code, message, Duration::ZERO),
        None => Error::Remote {
            code: ErrorCode::Internal,
            message: format!("{code_word} {message}"),
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
        // The socket's option: the reader's clone shares it.
        stream.set_read_timeout(options.read_timeout).map_err(io)?;
        let mut rd = Reader::new(stream.try_clone().map_err(io)?);
        let line = loop {
            match rd.next_line() {
                Ok(Some(line)) => break line.to_vec(),
                Ok(None) => {}
                Err(e) => return Err(err(&shown, e)),
            }
            if let Err(e) = rd.fill() {
                return Err(err(&shown, format!("closed before greeting ({e})")));
            }
        };
        let hello = match proto::parse_response(&line) {
            Ok(Response::Hello(h)) => h,
            Ok(Response::Error {
                code,
                code_word,
                message,
                ..
            }) => return Err(remote_error(code, code_word, message)),
            Ok(_) => return Err(err(&shown, "no greeting".into())),
            Err(e) => return Err(err(&shown, e)),
        };
        if hello.version != proto::VERSION {
            return Err(Error::ProtocolVersion {
                addr: shown,
                found: hello.version,
                expected: proto::VERSION,
            });
        }
        let inner = Arc::new(Inner {
            addr: shown,
            writer: Mutex::new(Writer {
                stream,
                line: Vec::with_capacity(128),
            }),
            state: Mutex::default(),
            bg: Condvar::new(),
            reader: Mutex::new(rd),
            next_tag: AtomicU64::new(1),
            last_send: AtomicU64::new(0),
            epoch: Instant::now(),
        });
        let keepalive = hello.idle_timeout.map(|t| (t / 3).max(Duration::from_millis(10)));
        let background = {
            let inner2 = inner.clone();
            thread::Builder::new()
                .name("shmlock-remote".into())
                .spawn(move || inner2.background(keepalive))
                .map_err(|e| inner.conn_err(format!("cannot start a thread: {e}")))?
        };
        let client = RemoteClient {
            inner,
            hello,
            background: Some(background),
        };
        if let Some(token) = &options.auth_token {
            client.inner.call(|l| {
                l.extend_from_slice(b"AUTH ");
                l.extend_from_slice(token.as_bytes());
            })?;
        }
        Ok(client)
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
        let tag = self.inner.send(Slot::caller(), |l| {
            l.extend_from_slice(if timeout == Some(Duration::ZERO) {
                b"TRY "
            } else {
                b"LOCK "
            });
            l.extend_from_slice(name);
            l.extend_from_slice(match mode {
                Mode::Exclusive => b" EXCLUSIVE",
                Mode::Shared => b" SHARED",
            });
            if let Some(t) = timeout.filter(|t| !t.is_zero()) {
                let ms = t.as_millis().clamp(1, u128::from(proto::MAX_TIMEOUT_MS));
                l.extend_from_slice(b" TIMEOUT ");
                push_u64(l, ms as u64);
            }
        })?;
        Ok(PendingLock {
            client: self,
            name: name.into(),
            tag,
            waited: false,
            timeout,
            started: Instant::now(),
        })
    }

    /// Unlocks `name` held by this session (for a guard that was forgotten).
    pub fn unlock(&self, name: impl AsRef<[u8]>) -> Result<()> {
        let name = name.as_ref();
        check_name(name)?;
        self.inner
            .call(|l| {
                l.extend_from_slice(b"UNLOCK ");
                l.extend_from_slice(name);
            })
            .map(|_| ())
    }

    /// Sends `UNLOCK` without waiting for the answer (guards' drop).
    fn unlock_async(&self, name: &[u8]) {
        let _ = self.inner.send(Slot::Nobody, |l| {
            l.extend_from_slice(b"UNLOCK ");
            l.extend_from_slice(name);
        });
    }

    /// One page of `LOCKS` (see docs/PROTOCOL.md): at most `limit` (1..=10000) locks held or
    /// waited on whose name starts with `prefix`, in table order, from the slot after `after`;
    /// [`LocksPage::next`] is where the next page starts. Authenticate first where the gateway
    /// wants it.
    pub fn locks_page(&self, prefix: Option<&[u8]>, after: Option<Cursor>, limit: u32) -> Result<LocksPage> {
        // Any prefix goes: it is sent escaped.
        let tag = self.inner.send(Slot::multi_line_caller(), |l| {
            l.extend_from_slice(b"LOCKS");
            if let Some(p) = prefix {
                l.extend_from_slice(b" PREFIX ");
                proto::encode_word(l, p);
            }
            if let Some(c) = after {
                l.extend_from_slice(format!(" AFTER {c}").as_bytes());
            }
            l.extend_from_slice(b" LIMIT ");
            push_u64(l, u64::from(limit));
        })?;
        let lines = self.admin_lines(tag, "LOCKS")?;
        crate::proto::admin::parse_locks(lines.iter().map(Vec::as_slice))
            .map_err(|e| self.inner.conn_err(format!("a bad LOCKS answer: {e}")))
    }

    /// `STATUS`: the segment, its capacities, pool counts, counters and supervisor, as
    /// `shmlock status` shows them; with `check`, the table's invariant check too (a walk of
    /// every shard at the gateway, in time proportional to the table).
    pub fn status(&self, check: bool) -> Result<RemoteStatus> {
        let tag = self.inner.send(Slot::multi_line_caller(), |l| {
            l.extend_from_slice(if check { b"STATUS CHECK" } else { b"STATUS" });
        })?;
        let lines = self.admin_lines(tag, "STATUS")?;
        let (report, check) = crate::proto::admin::parse_status(lines.iter().map(Vec::as_slice))
            .map_err(|e| self.inner.conn_err(format!("a bad STATUS answer: {e}")))?;
        Ok(RemoteStatus { report, check })
    }

    /// The lines of an admin query's answer; its `ERR` line as the error.
    fn admin_lines(&self, tag: u64, what: &str) -> Result<Vec<Vec<u8>>> {
        let lines = match self.inner.wait(tag)? {
            Answer::Lines(lines) => lines,
            _ => return Err(self.inner.conn_err(format!("a {what} answer of one line"))),
        };
        if let Some(last) = lines.last() {
            if let Ok(Response::Error {
                code,
                code_word,
                message,
                ..
            }) = proto::parse_response(last)
            {
                return Err(remote_error(code, code_word, message));
            }
        }
        Ok(lines)
    }

    /// Every lock held or waited on whose name starts with `prefix`, page by page (in table
    /// order; every lock held during the whole walk comes exactly once).
    pub fn locks(&self, prefix: Option<&[u8]>) -> Result<Vec<LockInfo>> {
        let (mut all, mut after) = (Vec::new(), None);
        loop {
            let page = self.locks_page(prefix, after, proto::MAX_LOCKS_LIMIT)?;
            all.extend(page.locks);
            match page.next {
                Some(n) if after.is_some_and(|a| n <= a) => {
                    return Err(self
                        .inner
                        .conn_err(format!("a LOCKS cursor that does not move on ({n})")))
                }
                Some(n) => after = Some(n),
                None => return Ok(all),
            }
        }
    }

    /// A round trip to the gateway; returns how long it took.
    pub fn ping(&self) -> Result<Duration> {
        let t = Instant::now();
        self.inner.call(|l| l.extend_from_slice(b"PING"))?;
        Ok(t.elapsed())
    }
}

/// Names go on the wire as one word: no spaces or control bytes.
fn check_name(name: &[u8]) -> Result<()> {
    if name.is_empty() || name.iter().any(|&b| b <= b' ' || b == 0x7f) {
        return Err(Error::Remote {
            code: ErrorCode::BadName,
            message: "names sent to a gateway are 1 or more bytes without spaces or control bytes".into(),
        });
    }
    Ok(())
}

impl Drop for RemoteClient {
    fn drop(&mut self) {
        {
            let mut st = lock(&self.inner.state);
            st.stop = true;
            self.inner.bg.notify_one();
        }
        {
            let w = &mut *lock(&self.inner.writer);
            // `QUIT` ends the session as giving back what it holds (a lock request given up and
            // granted since is unlocked so, not abandoned as owner-died). Best effort: a gateway
            // that does not read gets no more than a moment.
            let _ = w.stream.set_write_timeout(Some(Duration::from_millis(100)));
            let _ = w.stream.write_all(b"quit QUIT\n");
            // Ends a blocking read of the background thread too.
            let _ = w.stream.shutdown(Shutdown::Both);
        }
        if let Some(t) = self.background.take() {
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
    /// `wait` was called: the answer is no longer ours to give up.
    waited: bool,
    timeout: Option<Duration>,
    started: Instant,
}

impl<'a> PendingLock<'a> {
    /// Waits for the answer.
    pub fn wait(self) -> Result<RemoteGuard<'a>> {
        let client = self.client;
        let (name, grant) = self.wait_grant()?;
        Ok(RemoteLockGuard {
            client,
            name,
            grant,
            released: false,
        })
    }

    /// Waits for the answer: the name and the grant, now held by the session.
    fn wait_grant(mut self) -> Result<(Box<[u8]>, Grant)> {
        self.waited = true;
        let reply = self.client.inner.wait(self.tag);
        match reply {
            Ok(Answer::Granted(grant)) => Ok((std::mem::take(&mut self.name), grant)),
            Ok(Answer::Done | Answer::Lines(_)) => Err(self.client.inner.conn_err("unexpected answer to LOCK")),
            // The wait as this client saw it; the holder as the gateway named it.
            Err(Error::TimedOut { holder, .. }) => Err(Error::TimedOut {
                waited: self.started.elapsed().max(self.timeout.unwrap_or_default()),
                holder,
            }),
            Err(e) => Err(e),
        }
    }
}

impl Drop for PendingLock<'_> {
    fn drop(&mut self) {
        if self.waited {
            return;
        }
        // Given up: if the answer has not come yet, unlock when it does.
        let inner = &self.client.inner;
        let mut st = lock(&inner.state);
        let granted = match st.slots.get_mut(&self.tag) {
            Some(slot @ Slot::Caller { reply: None, .. }) => {
                *slot = Slot::UnlockOnGrant(std::mem::take(&mut self.name));
                inner.add_orphan(&mut st);
                false
            }
            Some(Slot::Caller { .. }) => {
                let slot = st.slots.remove(&self.tag);
                matches!(
                    slot,
                    Some(Slot::Caller {
                        reply: Some(Ok(Answer::Granted(_))),
                        ..
                    })
                )
            }
            _ => false,
        };
        drop(st);
        if granted {
            self.client.unlock_async(&self.name);
        }
    }
}

impl Locker for RemoteClient {
    type Guard<H: Deref<Target = RemoteClient>> = RemoteLockGuard<H>;

    /// A timeout is sent in whole milliseconds, rounded up (at least 1 ms: a deadline already
    /// past makes one attempt that waits up to 1 ms).
    fn acquire_with<H: Deref<Target = RemoteClient>>(
        this: H,
        name: &[u8],
        mode: Mode,
        wait: Wait,
    ) -> Result<RemoteLockGuard<H>> {
        let timeout = match wait {
            Wait::No => Some(Duration::ZERO),
            Wait::Forever => None,
            Wait::Until(deadline) => Some(
                deadline
                    .saturating_duration_since(Instant::now())
                    .max(Duration::from_millis(1)),
            ),
        };
        let (name, grant) = this.start_lock(name, mode, timeout)?.wait_grant()?;
        Ok(RemoteLockGuard {
            client: this,
            name,
            grant,
            released: false,
        })
    }
}

/// A lock held through a gateway, through the handle `H` to its [`RemoteClient`]; unlocks when
/// dropped (without waiting for the answer). [`RemoteGuard`] borrows its client,
/// [`ArcRemoteGuard`] owns a reference to it.
#[must_use = "the lock is released as soon as the guard is dropped"]
#[derive(Debug)]
pub struct RemoteLockGuard<H: Deref<Target = RemoteClient>> {
    client: H,
    name: Box<[u8]>,
    grant: Grant,
    released: bool,
}

crate::lock::forward_contract!(RemoteClient, RemoteLockGuard);

/// A lock held through a gateway, borrowing its client.
pub type RemoteGuard<'a> = RemoteLockGuard<&'a RemoteClient>;

/// A lock held through a gateway, owning a reference to its client: it can live in a struct or
/// move to another thread.
pub type ArcRemoteGuard = RemoteLockGuard<Arc<RemoteClient>>;

impl<H: Deref<Target = RemoteClient>> Guard for RemoteLockGuard<H> {
    fn grant(&self) -> Grant {
        self.grant
    }

    fn name(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.name)
    }

    /// Unlocks now and waits for the gateway's answer.
    fn unlock(mut self) -> Result<()> {
        self.released = true;
        self.client.unlock(&self.name)
    }
}

impl<H: Deref<Target = RemoteClient>> Drop for RemoteLockGuard<H> {
    fn drop(&mut self) {
        if !self.released {
            self.client.unlock_async(&self.name);
        }
    }
}
