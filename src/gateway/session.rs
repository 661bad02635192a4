//! One connection: a session, which is one owner in the table.
//!
//! # Concurrency
//! The session task owns all of the session's state: what it holds (by name, with the grant and
//! the tag that got it) and what it waits for. Requests decided at once run inline; a waiting
//! `LOCK` runs on a blocking thread and reports back over `done`. Responses are collected in one
//! buffer and written when the task has nothing else to do, so pipelined requests that arrive in
//! one read are answered with one write.
//!
//! # I/O
//! The stream is used whole (not split into halves): one `read` per readable event, and a read
//! that fills less than the buffer took everything the socket had, so readiness is cleared then
//! and there (a second `read` would only return `EAGAIN`). An uncontended request therefore
//! costs one `read`, one `write` and the wait for the next event.
//!
//! Writes never block the session: pending output is written with `try_write` whenever there is
//! some, and the rest waits for the socket to be writable inside the same `select!` as the reads,
//! the idle timer, the other deadlines and the stop signal. A peer that leaves more than
//! [`HIGH_WATER`] bytes of answers unwritten (beyond what the kernel's socket buffers took) gets
//! no more requests read until they drain: a peer that does not read its answers so falls silent
//! and the idle timeout ends it, releasing its locks, however many requests it keeps sending. Past
//! [`MAX_UNSENT`] (answers to waits can still come) the session ends at once (`SLOW_READER`).
//!
//! # Deadlines
//! - Idle: the timer counts from the last byte read, and is not charged while an admin query of
//!   the session is being served (the session reads nothing meanwhile). It is not re-armed per
//!   read: a read stamps the time, and the timer, when it fires, re-arms itself from that stamp.
//! - Line: a line must be complete (its LF read) within `line_timeout` of its first byte read.
//! - Authentication: with a secret, a connection must authenticate within `auth_timeout` of its
//!   acceptance; until it does it holds no session slot and no owner record, and it may be closed
//!   early when more than `max_unauthenticated` connections are waiting to authenticate.
//!
//! # Admin queries
//! `LOCKS` and `STATUS` go to the admin pool; the session reads no further request until the
//! answer has come (lines already read wait in its buffer), so answers keep the order of the
//! requests and a session has at most one query in the pool.
//!
use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncWrite, AsyncWriteExt, Interest};
use tokio::net::{TcpStream, UnixStream};
use tokio::sync::{mpsc, oneshot, watch, OwnedSemaphorePermit};
use tracing::debug;

use super::admin::AdminRequest;
use super::Shared;
use crate::clock;
use crate::error::Error;
use crate::owner::OwnerKind;
use crate::proto::framer::{self, FrameError};
use crate::proto::{self, Command, ErrorCode, Hello};
use crate::table::{Mode, OwnerRef, RawGrant, Wait};

/// How long the final write of a closing session may take.
pub(super) const FINAL_WRITE: Duration = Duration::from_secs(1);
/// While waiters of an ending session are still running, `release_all` is repeated this often
/// (a waiter thread that had not yet queued its request when the first one ran queues it later).
const CLEANUP_RETRY: Duration = Duration::from_millis(20);
/// Answers the peer has left unread, beyond the socket buffers, before the session is ended.
pub const MAX_UNSENT: usize = 1 << 20;
/// While more than this many bytes of answers wait to be written, the session reads no more
/// requests: a peer that does not read its answers then falls silent, and the idle timeout ends
/// it.
pub const HIGH_WATER: usize = 256 * 1024;
/// Far enough to stand for "never" in a timer.
const NEVER: Duration = Duration::from_secs(86_400 * 365);

/// What a session reads and writes: an accepted TCP connection, or, behind TLS, the plaintext
/// end of a socket pair whose other end the TLS task serves (`super::tls`). Both are sockets
/// tokio watches, so the session's I/O (one `read` per readable event, `try_write`) is the same.
pub(super) trait Conn: AsyncWrite + AsRawFd + Unpin + Send + 'static {
    fn try_write(&self, buf: &[u8]) -> io::Result<usize>;
    fn readable(&self) -> impl std::future::Future<Output = io::Result<()>> + Send;
    fn writable(&self) -> impl std::future::Future<Output = io::Result<()>> + Send;
    fn try_io<R>(&self, interest: Interest, f: impl FnOnce() -> io::Result<R>) -> io::Result<R>;
}

macro_rules! conn {
    ($t:ty) => {
        impl Conn for $t {
            fn try_write(&self, buf: &[u8]) -> io::Result<usize> {
                <$t>::try_write(self, buf)
            }
            fn readable(&self) -> impl std::future::Future<Output = io::Result<()>> + Send {
                <$t>::readable(self)
            }
            fn writable(&self) -> impl std::future::Future<Output = io::Result<()>> + Send {
                <$t>::writable(self)
            }
            fn try_io<R>(&self, interest: Interest, f: impl FnOnce() -> io::Result<R>) -> io::Result<R> {
                <$t>::try_io(self, interest, f)
            }
        }
    };
}
conn!(TcpStream);
conn!(UnixStream);

/// Sends a closing line instead of the greeting, and closes.
pub(super) async fn refuse(mut stream: impl Conn, why: String) {
    let mut out = Vec::new();
    proto::encode_error(&mut out, proto::SERVER_TAG, ErrorCode::TooManyConnections, &why);
    let _ = tokio::time::timeout(FINAL_WRITE, stream.write_all(&out)).await;
    let _ = stream.shutdown().await;
}

#[derive(Debug)]
struct Held {
    grant: RawGrant,
    tag: Box<str>,
}

/// A waiter's report.
#[derive(Debug)]
struct Done {
    tag: Box<str>,
    name: Box<[u8]>,
    started: Instant,
    result: Result<RawGrant, Error>,
}

/// Why the read loop stopped: a closing line to send, or none (EOF, `QUIT`, `AUTH_FAILED`).
type Close = Option<(ErrorCode, String)>;

enum Flow {
    Go,
    /// An admin query went to the pool: read nothing more until its answer.
    Pause,
    Close(Close),
}

struct Session {
    shared: Arc<Shared>,
    /// The session's owner: registered at once without a secret, after `AUTH` with one.
    me: Option<OwnerRef>,
    peer: SocketAddr,
    /// The session slot, once it has one.
    permit: Option<OwnedSemaphorePermit>,
    /// Its place among the unauthenticated connections, until it authenticates.
    ticket: Option<super::Ticket>,
    held: HashMap<Box<[u8]>, Held>,
    /// Names waited for, with the waiting request's tag.
    waiting: HashMap<Box<[u8]>, Box<str>>,
    /// Where waiters report; made by the first `LOCK` that waits, so sessions that never wait
    /// keep no channel (a tokio channel allocates a block of 32 slots up front).
    done: Option<mpsc::UnboundedSender<Box<Done>>>,
    /// The receiver of a channel just made, until `serve` or `cleanup` takes it.
    new_rx: Option<mpsc::UnboundedReceiver<Box<Done>>>,
    /// The answer to an admin query just queued, until `serve` takes it.
    new_admin: Option<oneshot::Receiver<Vec<u8>>>,
    /// Set when the session ends: waiter threads that have not started give up at once.
    closing: Arc<AtomicBool>,
    /// The session ended with `QUIT`: what it still holds is given back, not abandoned.
    quit: bool,
}

/// Serves one accepted connection until it ends, then cleans up. `permit` is its session slot
/// (None: it must authenticate first, and `ticket` is its place among those that have not).
pub(super) async fn run(
    mut stream: impl Conn,
    peer: SocketAddr,
    shared: Arc<Shared>,
    permit: Option<OwnedSemaphorePermit>,
    ticket: Option<super::Ticket>,
    mut stop: watch::Receiver<bool>,
) {
    let me = match ticket {
        Some(_) => None,
        None => match shared.table.register(OwnerKind::Remote, peer.to_string().as_bytes()) {
            Ok(me) => Some(me),
            Err(e) => return refuse(stream, format!("no room for another session: {e}")).await,
        },
    };
    debug!(%peer, owner = ?me.map(|m| m.idx), "session opened");
    let mut rx = None;
    let mut s = Session {
        shared,
        me,
        peer,
        permit,
        ticket,
        held: HashMap::new(),
        waiting: HashMap::new(),
        done: None,
        new_rx: None,
        new_admin: None,
        closing: Arc::new(AtomicBool::new(false)),
        quit: false,
    };
    let mut out = Vec::with_capacity(128);
    proto::encode_hello(&mut out, &s.hello());
    let mut sent = 0;
    let close = s.serve(&mut stream, &mut rx, &mut stop, &mut out, &mut sent).await;
    if let Some(t) = s.ticket.take() {
        s.shared.unauth.leave(&t);
    }
    s.cleanup(&mut rx).await;
    if let Some((code, msg)) = close {
        proto::encode_error(&mut out, proto::SERVER_TAG, code, &msg);
    }
    let _ = tokio::time::timeout(FINAL_WRITE, async {
        let _ = stream.write_all(&out[sent.min(out.len())..]).await;
        let _ = stream.shutdown().await;
    })
    .await;
    drop(s.permit.take());
    debug!(%peer, "session closed");
}

impl Session {
    fn hello(&self) -> Hello {
        let c = &self.shared.config;
        Hello {
            version: proto::VERSION,
            auth_required: c.auth_token.is_some(),
            idle_timeout: c.idle_timeout,
            max_line: c.max_line,
            max_name: self.shared.max_name,
            max_locks: c.max_locks_per_session,
            max_waits: c.max_waits_per_session,
        }
    }

    /// The session's loop; `out[*sent..]` is output not yet written when it returns.
    async fn serve(
        &mut self,
        stream: &mut impl Conn,
        rx: &mut Option<mpsc::UnboundedReceiver<Box<Done>>>,
        stop: &mut watch::Receiver<bool>,
        out: &mut Vec<u8>,
        sent: &mut usize,
    ) -> Close {
        let stopping = || Some((ErrorCode::ShuttingDown, "the server is stopping".into()));
        let cfg = &self.shared.config;
        let (idle, line_for) = (cfg.idle_timeout, cfg.line_timeout.unwrap_or(NEVER));
        let idle_for = idle.unwrap_or(NEVER);
        let start = tokio::time::Instant::now();
        let auth_by = match (self.me, cfg.auth_timeout) {
            (None, Some(t)) => Some(start + t),
            _ => None,
        };
        // When the last bytes came; the timer re-arms itself from it when it fires.
        let mut heard = start;
        let idle_sleep = tokio::time::sleep_until(heard + idle_for);
        tokio::pin!(idle_sleep);
        // When the partial line in `inbuf` began, if there is one (and no query is in flight).
        let mut line_since: Option<tokio::time::Instant> = None;
        let line_sleep = tokio::time::sleep_until(start + NEVER);
        tokio::pin!(line_sleep);
        let auth_sleep = tokio::time::sleep_until(auth_by.unwrap_or(start + NEVER));
        tokio::pin!(auth_sleep);
        if *stop.borrow() {
            return stopping();
        }
        // One future for the whole session (made per iteration, it would register with the
        // channel and deregister again every time).
        let stopped = stop.changed();
        tokio::pin!(stopped);
        // Bytes read and not yet handled: a partial line, or lines waiting for an admin answer.
        // An idle session keeps no read buffer.
        let mut inbuf: Vec<u8> = Vec::new();
        let mut admin: Option<oneshot::Receiver<Vec<u8>>> = None;
        loop {
            if *sent < out.len() {
                match stream.try_write(&out[*sent..]) {
                    Ok(n) => *sent += n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => return None,
                }
                if *sent == out.len() {
                    out.clear();
                    *sent = 0;
                    if out.capacity() > 8192 {
                        *out = Vec::new();
                    }
                } else if out.len() - *sent > MAX_UNSENT {
                    let msg = format!("more than {MAX_UNSENT} bytes of answers left unread");
                    return Some((ErrorCode::SlowReader, msg));
                }
            }
            self.take_rx(rx);
            if let Some(a) = self.new_admin.take() {
                admin = Some(a);
            }
            let paused = admin.is_some();
            let unwritten = *sent < out.len();
            let backlog = out.len() - *sent > HIGH_WATER;
            let waiting_auth = self.me.is_none();
            let kick = self.ticket.as_ref().map(|t| t.kick.clone());
            tokio::select! {
                _ = &mut stopped => return stopping(),
                _ = async {
                    match &kick {
                        Some(k) => k.notified().await,
                        None => std::future::pending().await,
                    }
                } => {
                    let max = self.shared.config.max_unauthenticated;
                    let msg = format!("more than {max} connections are waiting to authenticate; this was the oldest");
                    return Some((ErrorCode::AuthTimeout, msg));
                }
                Some(d) = async {
                    match rx.as_mut() {
                        Some(r) => r.recv().await,
                        None => std::future::pending().await,
                    }
                } => self.complete(*d, out),
                answer = async {
                    match admin.as_mut() {
                        Some(a) => a.await,
                        None => std::future::pending().await,
                    }
                } => {
                    admin = None;
                    match answer {
                        Ok(bytes) => out.extend_from_slice(&bytes),
                        Err(_) => proto::encode_error(out, proto::SERVER_TAG, ErrorCode::Internal, "an admin query was lost"),
                    }
                    // The query's time is not charged to the session.
                    heard = tokio::time::Instant::now();
                    // Lines that came with the query's, or after it.
                    let consumed = match self.lines(&inbuf, out) {
                        Ok(n) => n,
                        Err(c) => return c,
                    };
                    inbuf.drain(..consumed);
                    // (`lines` has checked the partial line left, unless a query paused it.)
                    if self.new_admin.is_none() {
                        line_since = (!inbuf.is_empty()).then_some(heard);
                        line_sleep.as_mut().reset(heard + line_for);
                    }
                    if inbuf.is_empty() && inbuf.capacity() > 0 {
                        inbuf = Vec::new();
                    }
                }
                r = stream.writable(), if unwritten => {
                    if r.is_err() {
                        return None;
                    }
                }
                r = stream.readable(), if !paused && !backlog => {
                    if r.is_err() {
                        return None;
                    }
                    let had_partial = !inbuf.is_empty();
                    match self.on_readable(stream, &mut inbuf, out) {
                        Read::Nothing => continue,
                        Read::Lines { completed } => {
                            let now = tokio::time::Instant::now();
                            heard = now;
                            if self.new_admin.is_some() || inbuf.is_empty() {
                                line_since = None;
                            } else if completed || !had_partial {
                                // A new partial line began in this read.
                                line_since = Some(now);
                                line_sleep.as_mut().reset(now + line_for);
                            }
                        }
                        Read::Close(c) => return c,
                    }
                }
                _ = &mut idle_sleep, if idle.is_some() && !paused => {
                    let due = heard + idle_for;
                    if due > tokio::time::Instant::now() {
                        idle_sleep.as_mut().reset(due);
                        continue;
                    }
                    return Some((
                        ErrorCode::IdleTimeout,
                        format!("nothing received for {}ms", idle_for.as_millis()),
                    ));
                }
                _ = &mut line_sleep, if line_since.is_some() && !paused => {
                    return Some((
                        ErrorCode::LineTimeout,
                        format!("a line was not completed within {}ms", line_for.as_millis()),
                    ));
                }
                _ = &mut auth_sleep, if waiting_auth && auth_by.is_some() => {
                    let ms = self.shared.config.auth_timeout.unwrap_or(NEVER).as_millis();
                    return Some((ErrorCode::AuthTimeout, format!("no AUTH within {ms}ms")));
                }
            }
        }
    }

    /// Moves the receiver of a channel made by the first waiting `LOCK` to where `serve` polls it.
    fn take_rx(&mut self, rx: &mut Option<mpsc::UnboundedReceiver<Box<Done>>>) {
        if let Some(r) = self.new_rx.take() {
            *rx = Some(r);
        }
    }

    /// Reads what the socket has into a stack buffer and handles every whole line (until an
    /// admin query pauses the session); what is left is kept in `inbuf`.
    fn on_readable(&mut self, stream: &impl Conn, inbuf: &mut Vec<u8>, out: &mut Vec<u8>) -> Read {
        let mut chunk = [0u8; 4096];
        let got = match read_some(stream, &mut chunk) {
            Ok(0) => return Read::Close(None),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Read::Nothing,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return Read::Nothing,
            Err(_) => return Read::Close(None),
        };
        let completed;
        if inbuf.is_empty() {
            let n = match self.lines(&chunk[..got], out) {
                Ok(n) => n,
                Err(c) => return Read::Close(c),
            };
            completed = n > 0;
            inbuf.extend_from_slice(&chunk[n..got]);
        } else {
            inbuf.extend_from_slice(&chunk[..got]);
            let n = match self.lines(inbuf, out) {
                Ok(n) => n,
                Err(c) => return Read::Close(c),
            };
            completed = n > 0;
            inbuf.drain(..n);
        }
        // (`lines` has checked the partial line left, unless a query paused it.)
        if inbuf.is_empty() && inbuf.capacity() > 0 {
            *inbuf = Vec::new();
        }
        Read::Lines { completed }
    }

    /// Handles the whole lines at the start of `data` until one pauses the session; returns
    /// the bytes consumed, or why the session must close.
    fn lines(&mut self, data: &[u8], out: &mut Vec<u8>) -> Result<usize, Close> {
        let max_line = self.shared.config.max_line;
        let mut start = 0;
        loop {
            // The framer strips the LF and the one CR before it, and nothing more (a second CR
            // is a control byte: BAD_REQUEST); it checks a partial line at the end too.
            match framer::split_line(&data[start..], max_line, true) {
                Ok(Some((line, used))) => {
                    start += used;
                    match self.handle(line, out) {
                        Flow::Go => {}
                        Flow::Pause => return Ok(start),
                        Flow::Close(c) => return Err(c),
                    }
                }
                Ok(None) => return Ok(start),
                Err(e) => return Err(Some(frame_close(e))),
            }
        }
    }

    /// With a secret: the right one was given; takes a session slot and an owner record.
    fn authenticated(&mut self, tag: &str, out: &mut Vec<u8>) -> Flow {
        let refuse = |out: &mut Vec<u8>, msg: String| {
            proto::encode_error(out, tag, ErrorCode::TooManyConnections, &msg);
            Flow::Close(None)
        };
        let Ok(permit) = self.shared.conns.clone().try_acquire_owned() else {
            let max = self.shared.config.max_connections;
            return refuse(out, format!("the gateway serves at most {max} connections"));
        };
        match self
            .shared
            .table
            .register(OwnerKind::Remote, self.peer.to_string().as_bytes())
        {
            Ok(me) => self.me = Some(me),
            Err(e) => return refuse(out, format!("no room for another session: {e}")),
        }
        self.permit = Some(permit);
        if let Some(t) = self.ticket.take() {
            self.shared.unauth.leave(&t);
        }
        proto::encode_simple(out, tag, "OK");
        Flow::Go
    }

    fn handle(&mut self, line: &[u8], out: &mut Vec<u8>) -> Flow {
        let req = match proto::parse_request(line) {
            Ok(Some(r)) => r,
            Ok(None) => return Flow::Go,
            Err(e) => {
                proto::encode_error(out, e.tag, e.code, &e.message);
                return Flow::Go;
            }
        };
        let tag = req.tag;
        if !self.waiting.is_empty() && self.waiting.values().any(|t| &**t == tag) {
            // Whatever the request: its answer would carry the tag a client matches the
            // waiting request's answer by.
            let msg = format!("a request tagged {tag} is still waiting");
            proto::encode_error(out, tag, ErrorCode::TagInUse, &msg);
            return Flow::Go;
        }
        match req.command {
            Command::Ping => proto::encode_simple(out, tag, "PONG"),
            Command::Auth { secret } => {
                let ok = match &self.shared.config.auth_token {
                    None => true,
                    Some(t) => constant_time_eq(t.as_bytes(), secret),
                };
                if !ok {
                    proto::encode_error(out, tag, ErrorCode::AuthFailed, "wrong secret");
                    return Flow::Close(None);
                }
                if self.me.is_none() {
                    return self.authenticated(tag, out);
                }
                proto::encode_simple(out, tag, "OK");
            }
            _ if self.me.is_none() => {
                proto::encode_error(out, tag, ErrorCode::AuthRequired, "authenticate first: AUTH <secret>");
            }
            Command::Quit => {
                self.quit = true;
                proto::encode_simple(out, tag, "BYE");
                return Flow::Close(None);
            }
            Command::Lock { name, mode, timeout } => self.lock(tag, name, mode, timeout, out),
            Command::Try { name, mode } => self.lock(tag, name, mode, Some(Duration::ZERO), out),
            Command::Unlock { name } => self.unlock(tag, name, out),
            Command::Locks(q) => return self.admin(tag, AdminRequest::Locks(q), out),
            Command::Status { check } => return self.admin(tag, AdminRequest::Status { check }, out),
        }
        Flow::Go
    }

    /// Hands an admin query to the pool; the session pauses until its answer.
    fn admin(&mut self, tag: &str, q: AdminRequest<'_>, out: &mut Vec<u8>) -> Flow {
        match self.shared.admin.submit(tag, q) {
            Some(rx) => {
                self.new_admin = Some(rx);
                Flow::Pause
            }
            None => {
                let msg = format!(
                    "{} admin queries are queued already, the limit; retry later",
                    super::admin::ADMIN_QUEUE
                );
                proto::encode_error(out, tag, ErrorCode::ServerBusy, &msg);
                Flow::Go
            }
        }
    }

    fn check_name(&self, tag: &str, name: &[u8], out: &mut Vec<u8>) -> bool {
        if name.len() > self.shared.max_name {
            let e = Error::NameInvalid {
                len: name.len(),
                max: self.shared.max_name,
            };
            error_response(out, tag, &e);
            return false;
        }
        true
    }

    /// `LOCK` (timeout None: forever) and `TRY` (timeout zero).
    fn lock(&mut self, tag: &str, name: &[u8], mode: Mode, timeout: Option<Duration>, out: &mut Vec<u8>) {
        if !self.check_name(tag, name, out) {
            return;
        }
        let err = |out: &mut Vec<u8>, code, msg: String| proto::encode_error(out, tag, code, &msg);
        if let Some(h) = self.held.get(name) {
            if &*h.tag == tag {
                // A retry of the request that got the lock: the same answer, no second lock.
                let g = h.grant;
                proto::encode_granted(out, tag, g.token, g.owner_died, g.mode);
            } else {
                err(
                    out,
                    ErrorCode::AlreadyHeld,
                    format!("this session already holds {}", show(name)),
                );
            }
            return;
        }
        if self.waiting.contains_key(name) {
            let msg = format!("this session is already waiting for {}", show(name));
            return err(out, ErrorCode::AlreadyWaiting, msg);
        }
        let max_locks = self.shared.config.max_locks_per_session;
        if self.held.len() + self.waiting.len() >= max_locks {
            let msg = format!("a session may hold or wait for at most {max_locks} names");
            return err(out, ErrorCode::TooManyLocks, msg);
        }
        // Only authenticated sessions get here (`handle`).
        let Some(me) = self.me else { return };
        let started = Instant::now();
        match self.shared.table.acquire(me, name, mode, Wait::No) {
            Ok(g) => return self.granted(tag, name, g, out),
            Err(Error::WouldBlock) if timeout == Some(Duration::ZERO) => {
                return err(out, ErrorCode::Busy, "lock is busy".into());
            }
            Err(Error::WouldBlock) => {}
            Err(e) => return error_response(out, tag, &e),
        }
        let max_waits = self.shared.config.max_waits_per_session;
        if self.waiting.len() >= max_waits {
            let msg = format!("a session may have at most {max_waits} requests waiting");
            return err(out, ErrorCode::TooManyWaits, msg);
        }
        let Ok(permit) = self.shared.waits.clone().try_acquire_owned() else {
            let msg = format!(
                "the server has {} requests waiting, its limit; retry later",
                self.shared.config.max_waits
            );
            return err(out, ErrorCode::ServerBusy, msg);
        };
        let (tag, name): (Box<str>, Box<[u8]>) = (tag.into(), name.into());
        self.waiting.insert(name.clone(), tag.clone());
        let deadline = timeout.map(|t| clock::now().plus(t));
        let tx = match &self.done {
            Some(tx) => tx.clone(),
            None => {
                let (tx, rx) = mpsc::unbounded_channel();
                self.new_rx = Some(rx);
                self.done.insert(tx).clone()
            }
        };
        let (table, closing) = (self.shared.table.clone(), self.closing.clone());
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            let result = if closing.load(Ordering::Acquire) {
                Err(Error::Cancelled)
            } else {
                table.acquire(me, &name, mode, deadline.map_or(Wait::Forever, Wait::Until))
            };
            let _ = tx.send(Box::new(Done {
                tag,
                name,
                started,
                result,
            }));
        });
    }

    fn granted(&mut self, tag: &str, name: &[u8], g: RawGrant, out: &mut Vec<u8>) {
        proto::encode_granted(out, tag, g.token, g.owner_died, g.mode);
        self.held.insert(
            name.into(),
            Held {
                grant: g,
                tag: tag.into(),
            },
        );
    }

    /// A waiter reported.
    fn complete(&mut self, d: Done, out: &mut Vec<u8>) {
        self.waiting.remove(&d.name);
        match d.result {
            Ok(g) => self.granted(&d.tag, &d.name, g, out),
            Err(Error::TimedOut { holder, .. }) => {
                // Count from the request's arrival, as the local client does.
                let e = Error::TimedOut {
                    waited: d.started.elapsed(),
                    holder,
                };
                error_response(out, &d.tag, &e);
            }
            Err(e) => error_response(out, &d.tag, &e),
        }
    }

    fn unlock(&mut self, tag: &str, name: &[u8], out: &mut Vec<u8>) {
        if !self.check_name(tag, name, out) {
            return;
        }
        let Some(h) = self.held.remove(name) else {
            let why = if self.waiting.contains_key(name) {
                format!("this session is still waiting for {}", show(name))
            } else {
                format!("this session does not hold {}", show(name))
            };
            return proto::encode_error(out, tag, ErrorCode::NotHeld, &why);
        };
        let Some(me) = self.me else { return };
        match self.shared.table.release(me, &h.grant) {
            Ok(()) => proto::encode_simple(out, tag, "OK"),
            Err(e) => error_response(out, tag, &e),
        }
    }

    /// Releases everything, cancels every wait, waits for the waiter threads, deregisters.
    async fn cleanup(&mut self, rx: &mut Option<mpsc::UnboundedReceiver<Box<Done>>>) {
        self.closing.store(true, Ordering::Release);
        self.take_rx(rx);
        // A session that never authenticated has nothing in the table.
        let Some(me) = self.me else { return };
        let table = self.shared.table.clone();
        // Only the shards this session holds or waits in: ending a session must not cost a walk
        // of the whole table.
        let mut shards: Vec<u32> = self
            .held
            .values()
            .map(|h| h.grant.shard)
            .chain(self.waiting.keys().map(|n| table.shard_of_name(n)))
            .collect();
        shards.sort_unstable();
        shards.dedup();
        // A session that ends holding locks (closed, reset, timed out, the server stopping)
        // abandons them, as a process that dies does: their next holders are told the owner
        // died. `QUIT` gives them back, as dropping a local client does.
        let died = !self.quit && !self.held.is_empty();
        let first = {
            let (table, shards) = (table.clone(), shards.clone());
            tokio::task::spawn_blocking(move || {
                if died {
                    table.abandon_all(me, shards.into_iter())
                } else {
                    table.release_all(me, shards.into_iter())
                }
            })
        };
        // Later passes find only requests still waiting (and grants made as the first ran, which
        // the client never saw): nothing of them is abandoned.
        let release_all = || {
            let (table, shards) = (table.clone(), shards.clone());
            tokio::task::spawn_blocking(move || table.release_all(me, shards.into_iter()))
        };
        if let Ok(Err(e)) = first.await {
            tracing::warn!(peer = %self.peer, error = %e, "gateway: releasing a session's locks failed");
        }
        while !self.waiting.is_empty() {
            // A session that waited made the channel (take_rx above moved its receiver here).
            let Some(rx) = rx.as_mut() else { break };
            match tokio::time::timeout(CLEANUP_RETRY, rx.recv()).await {
                Ok(Some(d)) => {
                    self.waiting.remove(&d.name);
                    if let Ok(g) = d.result {
                        // Granted just before the cancellation reached it.
                        let _ = table.release(me, &g);
                    }
                }
                Ok(None) => break,
                Err(_) => {
                    let _ = release_all().await;
                }
            }
        }
        self.held.clear();
        if let Err(e) = table.deregister(me) {
            tracing::warn!(peer = %self.peer, error = %e, "gateway: deregistering a session failed");
        }
    }
}

/// One `read` into `buf`, as `TcpStream::try_read`, except that a read that fills less than
/// `buf` also clears the stream's readiness: it took everything the socket had, so the next
/// read would only return `EAGAIN` (a syscall per request saved). Bytes that came after the
/// read raised a newer readiness event, which clearing this one leaves in place (tokio clears
/// only the event it saw before the closure ran), so no wake-up is lost.
fn read_some(stream: &impl Conn, buf: &mut [u8]) -> io::Result<usize> {
    let fd = stream.as_raw_fd();
    let mut short = 0;
    let r = stream.try_io(Interest::READABLE, || match nix::unistd::read(fd, buf) {
        Ok(n) if n > 0 && n < buf.len() => {
            short = n;
            // The only way to tell tokio the socket is drained.
            Err(io::ErrorKind::WouldBlock.into())
        }
        Ok(n) => Ok(n),
        Err(errno) => Err(io::Error::from(errno)),
    });
    match r {
        Err(e) if e.kind() == io::ErrorKind::WouldBlock && short > 0 => Ok(short),
        r => r,
    }
}

/// What a readable socket gave.
enum Read {
    /// Nothing after all (a spurious wake-up).
    Nothing,
    /// Data, handled; `completed`: at least one line was.
    Lines {
        completed: bool,
    },
    Close(Close),
}

/// The closing line for bytes that cannot be framed.
fn frame_close(e: FrameError) -> (ErrorCode, String) {
    match e {
        FrameError::TooLong { max } => (ErrorCode::LineTooLong, format!("line longer than {max} bytes")),
        FrameError::Nul => (ErrorCode::Binary, "NUL byte: not a shmlock client".into()),
    }
}

fn error_response(out: &mut Vec<u8>, tag: &str, e: &Error) {
    proto::encode_error_for(out, tag, e);
}

fn show(name: &[u8]) -> String {
    String::from_utf8_lossy(name).into_owned()
}

/// Compares secrets without an early exit on the first differing byte.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
