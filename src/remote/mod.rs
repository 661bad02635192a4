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
//! Requests are pipelined: each gets a numeric tag, is written at once, and waits for its own
//! response, matched by tag. So several threads may share one client (they are one owner, as
//! with a local `Client`), and [`RemoteClient::start_lock`] sends a request without waiting for
//! it. The callers read the responses themselves (leader/follower), and a background thread
//! reads those nobody waits for and keeps the session alive: see the `mux` module.

use std::borrow::Cow;
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::ops::Deref;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use crate::client::Grant;
use crate::error::{Error, Result};
use crate::lock::{Guard, Locker, Wait};
use crate::proto::admin::{CheckReport, LocksPage, StatusReport};
use crate::proto::{self, ErrorCode, Hello, Response};
use crate::table::{Cursor, LockInfo, Mode};

mod link;
mod mux;

use mux::{lock, push_u64, remote_error, Answer, Inner, Reader, Slot};
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
    /// Speak TLS, verifying the gateway's certificate (feature `tls`); None: plain TCP.
    #[cfg(feature = "tls")]
    pub tls: Option<TlsOptions>,
}

/// How a [`RemoteClient`] speaks TLS to a gateway that serves it.
#[cfg(feature = "tls")]
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsOptions {
    /// A PEM file of the certificates that may sign the gateway's (only these are trusted,
    /// not the system's store).
    pub ca_file: std::path::PathBuf,
    /// The name the gateway's certificate must carry (a DNS name or an IP address); None: the
    /// host part of the address connected to.
    pub server_name: Option<String>,
}

/// A connection to a gateway: one session, one owner.
#[derive(Debug)]
pub struct RemoteClient {
    inner: Arc<Inner>,
    hello: Hello,
    background: Option<thread::JoinHandle<()>>,
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
                Err(e) => last = e.to_string(),
            }
        }
        let stream = stream.ok_or_else(|| err(&shown, last))?;
        let io = |e: std::io::Error| err(&shown, e.to_string());
        stream.set_nodelay(true).map_err(io)?;
        // The socket's option: the reader's clone shares it.
        stream.set_read_timeout(options.read_timeout).map_err(io)?;
        let link = Self::link(stream, options, &addrs, &shown)?;
        let mut rd = Reader::new(link.try_clone().map_err(io)?);
        let line = loop {
            match rd.next_line() {
                Ok(Some(line)) => break line.to_vec(),
                Ok(None) => {}
                Err(e) => return Err(err(&shown, e)),
            }
            if let Err(e) = rd.fill() {
                let hint = if cfg!(feature = "tls") && !Self::tls_asked(options) {
                    "; if the gateway serves TLS, connect with TLS options"
                } else {
                    ""
                };
                return Err(err(&shown, format!("closed before greeting ({e}){hint}")));
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
        let inner = Inner::new(shown, link, rd);
        let keepalive = hello.idle_timeout.map(|t| (t / 3).max(Duration::from_millis(10)));
        let background = inner
            .start(keepalive)
            .map_err(|e| inner.conn_err(format!("cannot start a thread: {e}")))?;
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

    /// The connection: TLS over `stream` if `options` ask for it (after a verified handshake),
    /// else `stream` itself.
    #[cfg_attr(not(feature = "tls"), allow(unused_variables))]
    fn link(stream: TcpStream, options: &ConnectOptions, addrs: &[SocketAddr], shown: &str) -> Result<link::Link> {
        #[cfg(feature = "tls")]
        if let Some(tls) = &options.tls {
            let err = |why: String| Error::Connection {
                addr: shown.to_string(),
                why,
            };
            let config = link::tls::config(&tls.ca_file).map_err(err)?;
            let name = match &tls.server_name {
                Some(n) => n.clone(),
                None => addrs.first().map(|a| a.ip().to_string()).unwrap_or_default(),
            };
            let t = link::tls::TlsLink::handshake(stream, config, &name, options.read_timeout).map_err(err)?;
            return Ok(link::Link::Tls(Arc::new(t)));
        }
        Ok(link::Link::Tcp(stream))
    }

    #[cfg_attr(not(feature = "tls"), allow(unused_variables))]
    fn tls_asked(options: &ConnectOptions) -> bool {
        #[cfg(feature = "tls")]
        return options.tls.is_some();
        #[cfg(not(feature = "tls"))]
        false
    }

    /// The gateway's greeting: protocol version, limits, idle timeout.
    pub fn hello(&self) -> &Hello {
        &self.hello
    }

    /// Sends a lock request without waiting for its answer; [`PendingLock::wait`] gets it.
    /// `timeout` None waits as long as it takes; `Some(ZERO)` is a try-lock.
    pub fn start_lock(&self, name: impl AsRef<[u8]>, mode: Mode, timeout: Option<Duration>) -> Result<PendingLock<'_>> {
        let name = name.as_ref();
        check_name(name, self.hello.max_name)?;
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
                // Rounded up: a remote timeout never ends before the caller's deadline.
                let ms = t
                    .as_nanos()
                    .div_ceil(1_000_000)
                    .clamp(1, u128::from(proto::MAX_TIMEOUT_MS));
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
        check_name(name, self.hello.max_name)?;
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
/// An empty name is [`Error::NameInvalid`], as locally (a name too long is refused so by the
/// gateway, which knows the limit); one with a space or a control byte, which the protocol
/// cannot carry, is [`Error::Remote`] with [`ErrorCode::BadName`].
fn check_name(name: &[u8], max: usize) -> Result<()> {
    // The gateway would answer an over-long name BAD_NAME, or end the whole session (and so
    // every lock it holds) if the line passed its `max_line`: refuse it here, as a local client
    // does. A greeting without `max_name` (0) leaves the check to the gateway.
    if name.is_empty() || (max > 0 && name.len() > max) {
        return Err(Error::NameInvalid { len: name.len(), max });
    }
    if name.iter().any(|&b| b <= b' ' || b == 0x7f) {
        return Err(Error::Remote {
            code: ErrorCode::BadName,
            message: "names sent to a gateway are 1 or more bytes without spaces or control bytes".into(),
        });
    }
    Ok(())
}

impl Drop for RemoteClient {
    fn drop(&mut self) {
        if self.inner.opened_by.forked() {
            // A forked child's copy: the session, its socket and its thread are the parent's.
            // Closing the child's descriptors (when `inner` goes) leaves the connection open.
            std::mem::forget(self.background.take());
            return;
        }
        self.inner.shut(self.background.take());
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
        if self.waited || self.client.inner.opened_by.forked() {
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

    /// True once the client has seen the connection end (at a request, or a keep-alive
    /// exchange of its background thread): the gateway released the session's locks.
    fn lost(&self) -> bool {
        self.client.inner.is_closed()
    }
}

impl<H: Deref<Target = RemoteClient>> Drop for RemoteLockGuard<H> {
    fn drop(&mut self) {
        if !self.released {
            self.client.unlock_async(&self.name);
        }
    }
}
