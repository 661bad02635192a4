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
//! The idle timer is not re-armed per read: a read stamps the time, and the timer, when it
//! fires, re-arms itself from that stamp.
//!
//! # Ending
//! Whatever ends the session (EOF, `QUIT`, idle timeout, a closing error, shutdown), `cleanup`
//! runs: `release_all` over the shards it holds or waits in releases its holds and cancels its waits (blocked threads
//! return `Error::Cancelled`); once every waiter has reported, the owner is deregistered. Only
//! then is the final line written and the socket closed, so a client that sees the close knows
//! its locks are free.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncWriteExt, Interest};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit};
use tracing::debug;

use super::proto::{self, Command, ErrorCode, Hello};
use super::Shared;
use crate::clock;
use crate::error::Error;
use crate::owner::OwnerKind;
use crate::table::{Mode, OwnerRef, RawGrant, Wait};

/// How long the final write of a closing session may take.
const FINAL_WRITE: Duration = Duration::from_secs(1);
/// While waiters of an ending session are still running, `release_all` is repeated this often
/// (a waiter thread that had not yet queued its request when the first one ran queues it later).
const CLEANUP_RETRY: Duration = Duration::from_millis(20);

/// Sends a closing line instead of the greeting, and closes.
pub(super) async fn refuse(mut stream: TcpStream, why: String) {
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
    Close(Close),
}

/// What a readable socket gave.
enum Read {
    /// Nothing after all (a spurious wake-up).
    Nothing,
    /// Data, handled.
    Lines,
    Close(Close),
}

struct Session {
    shared: Arc<Shared>,
    me: OwnerRef,
    peer: SocketAddr,
    authed: bool,
    held: HashMap<Box<[u8]>, Held>,
    /// Names waited for, with the waiting request's tag.
    waiting: HashMap<Box<[u8]>, Box<str>>,
    /// Where waiters report; made by the first `LOCK` that waits, so sessions that never wait
    /// keep no channel (a tokio channel allocates a block of 32 slots up front).
    done: Option<mpsc::UnboundedSender<Box<Done>>>,
    /// The receiver of a channel just made, until `serve` or `cleanup` takes it.
    new_rx: Option<mpsc::UnboundedReceiver<Box<Done>>>,
    /// Set when the session ends: waiter threads that have not started give up at once.
    closing: Arc<AtomicBool>,
}

/// Serves one accepted connection until it ends, then cleans up.
pub(super) async fn run(
    mut stream: TcpStream,
    peer: SocketAddr,
    shared: Arc<Shared>,
    _permit: OwnedSemaphorePermit,
    mut stop: watch::Receiver<bool>,
) {
    let me = match shared.table.register(OwnerKind::Remote, peer.to_string().as_bytes()) {
        Ok(me) => me,
        Err(e) => return refuse(stream, format!("no room for another session: {e}")).await,
    };
    debug!(%peer, owner = me.idx, "session opened");
    let mut rx = None;
    let mut s = Session {
        authed: shared.config.auth_token.is_none(),
        shared,
        me,
        peer,
        held: HashMap::new(),
        waiting: HashMap::new(),
        done: None,
        new_rx: None,
        closing: Arc::new(AtomicBool::new(false)),
    };
    let mut out = Vec::with_capacity(128);
    proto::encode_hello(&mut out, &s.hello());
    let close = s.serve(&mut stream, &mut rx, &mut stop, &mut out).await;
    s.cleanup(&mut rx).await;
    if let Some((code, msg)) = close {
        proto::encode_error(&mut out, proto::SERVER_TAG, code, &msg);
    }
    let _ = tokio::time::timeout(FINAL_WRITE, async {
        let _ = stream.write_all(&out).await;
        let _ = stream.shutdown().await;
    })
    .await;
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

    async fn serve(
        &mut self,
        stream: &mut TcpStream,
        rx: &mut Option<mpsc::UnboundedReceiver<Box<Done>>>,
        stop: &mut watch::Receiver<bool>,
        out: &mut Vec<u8>,
    ) -> Close {
        let stopping = || Some((ErrorCode::ShuttingDown, "the server is stopping".into()));
        let idle = self.shared.config.idle_timeout;
        // Far enough to never fire when there is no idle timeout (the branch is disabled too).
        let idle_for = idle.unwrap_or(Duration::from_secs(86_400));
        // When the last bytes came; the timer re-arms itself from it when it fires.
        let mut heard = tokio::time::Instant::now();
        let sleep = tokio::time::sleep_until(heard + idle_for);
        tokio::pin!(sleep);
        if *stop.borrow() {
            return stopping();
        }
        // One future for the whole session (made per iteration, it would register with the
        // channel and deregister again every time).
        let stopped = stop.changed();
        tokio::pin!(stopped);
        // Only a partial line waits here: an idle session keeps no read buffer.
        let mut partial: Vec<u8> = Vec::new();
        loop {
            if !out.is_empty() {
                if stream.write_all(out).await.is_err() {
                    return None;
                }
                out.clear();
                if out.capacity() > 8192 {
                    *out = Vec::new();
                }
            }
            self.take_rx(rx);
            tokio::select! {
                _ = &mut stopped => return stopping(),
                Some(d) = async {
                    match rx.as_mut() {
                        Some(r) => r.recv().await,
                        None => std::future::pending().await,
                    }
                } => self.complete(*d, out),
                r = stream.readable() => {
                    if r.is_err() {
                        return None;
                    }
                    match self.on_readable(stream, &mut partial, out) {
                        Read::Nothing => continue,
                        Read::Lines => {}
                        Read::Close(c) => return c,
                    }
                    if idle.is_some() {
                        heard = tokio::time::Instant::now();
                    }
                }
                _ = &mut sleep, if idle.is_some() => {
                    let due = heard + idle_for;
                    if due > tokio::time::Instant::now() {
                        sleep.as_mut().reset(due);
                        continue;
                    }
                    return Some((
                        ErrorCode::IdleTimeout,
                        format!("nothing received for {}ms", idle_for.as_millis()),
                    ));
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

    /// Reads what the socket has into a stack buffer and handles every whole line; a partial
    /// line is kept in `partial` until its LF comes.
    fn on_readable(&mut self, stream: &TcpStream, partial: &mut Vec<u8>, out: &mut Vec<u8>) -> Read {
        let max_line = self.shared.config.max_line;
        let mut chunk = [0u8; 4096];
        let got = match read_some(stream, &mut chunk) {
            Ok(0) => return Read::Close(None),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Read::Nothing,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return Read::Nothing,
            Err(_) => return Read::Close(None),
        };
        let buffered = !partial.is_empty();
        if buffered {
            partial.extend_from_slice(&chunk[..got]);
        }
        let data: &[u8] = if buffered { partial } else { &chunk[..got] };
        let mut start = 0;
        while let Some(n) = data[start..].iter().position(|&b| b == b'\n') {
            let line = proto::trim_eol(&data[start..start + n]);
            start += n + 1;
            if line.len() > max_line {
                return Read::Close(Some(too_long(max_line)));
            }
            if line.contains(&0) {
                return Read::Close(Some(binary()));
            }
            if let Flow::Close(c) = self.handle(line, out) {
                return Read::Close(c);
            }
        }
        let rest = &data[start..];
        // A partial line may still end with CR LF.
        if rest.len() > max_line + 1 {
            return Read::Close(Some(too_long(max_line)));
        }
        if rest.contains(&0) {
            return Read::Close(Some(binary()));
        }
        if buffered {
            partial.drain(..start);
        } else {
            partial.extend_from_slice(&chunk[start..got]);
        }
        if partial.is_empty() && partial.capacity() > 0 {
            *partial = Vec::new();
        }
        Read::Lines
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
                self.authed = true;
                proto::encode_simple(out, tag, "OK");
            }
            _ if !self.authed => {
                proto::encode_error(out, tag, ErrorCode::AuthRequired, "authenticate first: AUTH <secret>");
            }
            Command::Quit => {
                proto::encode_simple(out, tag, "BYE");
                return Flow::Close(None);
            }
            Command::Lock { name, mode, timeout } => self.lock(tag, name, mode, timeout, out),
            Command::Try { name, mode } => self.lock(tag, name, mode, Some(Duration::ZERO), out),
            Command::Unlock { name } => self.unlock(tag, name, out),
            Command::Locks(q) => super::admin::serve_locks(&self.shared.table, tag, &q, out),
            Command::Status { check } => super::admin::serve_status(&self.shared.table, tag, check, out),
        }
        Flow::Go
    }

    fn check_name(&self, tag: &str, name: &[u8], out: &mut Vec<u8>) -> bool {
        if name.len() > self.shared.max_name {
            let msg = format!(
                "name is {} bytes; names must be 1..={} bytes",
                name.len(),
                self.shared.max_name
            );
            proto::encode_error(out, tag, ErrorCode::BadName, &msg);
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
        if self.waiting.values().any(|t| &**t == tag) {
            let msg = format!("a request tagged {tag} is still waiting");
            return err(out, ErrorCode::TagInUse, msg);
        }
        let max_locks = self.shared.config.max_locks_per_session;
        if self.held.len() + self.waiting.len() >= max_locks {
            let msg = format!("a session may hold or wait for at most {max_locks} names");
            return err(out, ErrorCode::TooManyLocks, msg);
        }
        let started = Instant::now();
        match self.shared.table.acquire(self.me, name, mode, Wait::No) {
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
        let (table, me, closing) = (self.shared.table.clone(), self.me, self.closing.clone());
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
        match self.shared.table.release(self.me, &h.grant) {
            Ok(()) => proto::encode_simple(out, tag, "OK"),
            Err(e) => error_response(out, tag, &e),
        }
    }

    /// Releases everything, cancels every wait, waits for the waiter threads, deregisters.
    async fn cleanup(&mut self, rx: &mut Option<mpsc::UnboundedReceiver<Box<Done>>>) {
        self.closing.store(true, Ordering::Release);
        self.take_rx(rx);
        let (table, me) = (self.shared.table.clone(), self.me);
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
        let release_all = || {
            let (table, shards) = (table.clone(), shards.clone());
            tokio::task::spawn_blocking(move || table.release_all(me, shards.into_iter()))
        };
        if let Ok(Err(e)) = release_all().await {
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
fn read_some(stream: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
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

fn too_long(max: usize) -> (ErrorCode, String) {
    (ErrorCode::LineTooLong, format!("line longer than {max} bytes"))
}

fn binary() -> (ErrorCode, String) {
    (ErrorCode::Binary, "NUL byte: not a shmlock client".into())
}

/// The protocol's code for a library error.
fn code_of(e: &Error) -> ErrorCode {
    match e {
        Error::WouldBlock => ErrorCode::Busy,
        Error::TimedOut { .. } => ErrorCode::Timeout,
        Error::AlreadyHeld => ErrorCode::AlreadyHeld,
        Error::NotHeld => ErrorCode::NotHeld,
        Error::NameInvalid { .. } => ErrorCode::BadName,
        Error::PoolFull { .. } => ErrorCode::TableFull,
        Error::Cancelled => ErrorCode::Cancelled,
        _ => ErrorCode::Internal,
    }
}

fn error_response(out: &mut Vec<u8>, tag: &str, e: &Error) {
    proto::encode_error(out, tag, code_of(e), &e.to_string());
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
