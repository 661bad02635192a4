//! The TCP gateway: remote clients lock names in the table through `shmlockd`.
//!
//! [`serve`] binds a listener and runs it on a tokio runtime of its own (one thread for every
//! connection, plus a pool of blocking threads for waits), so the caller needs no async code;
//! the returned [`Gateway`] stops it when dropped. The protocol is specified in
//! `docs/PROTOCOL.md` and implemented, sans I/O, in [`proto`].
//!
//! # Layout
//! - [`proto`]: request/response parsing and encoding, error codes.
//! - [`admin`]: the admin queries `LOCKS` and `STATUS` (read-only table snapshots on the wire).
//! - `session`: one connection = one session = one owner of kind
//!   [`Remote`](crate::owner::OwnerKind::Remote), labelled with the peer address.
//! - this file: configuration, the listener, connection limits, shutdown.
//!
//! # Concurrency
//! Each connection is a tokio task that owns its session state (no locks). The tasks share one
//! thread (a `current_thread` runtime, as Redis serves every client on one thread): a request
//! costs a socket read, a few hundred nanoseconds of table work and a write, and the
//! multi-thread scheduler's per-poll bookkeeping and work stealing cost more than a second core
//! gains here (measured in docs/ARCHITECTURE.md). Requests that can be
//! decided at once (`TRY`, `UNLOCK`, an uncontended `LOCK`) run inline on that task: they take a
//! shard latch for a few dozen instructions and never sleep. A `LOCK` that has to wait runs
//! `LockTable::acquire` on a blocking thread (`spawn_blocking`) that sleeps on the waiter's futex
//! in the segment; its result comes back to the session task over a channel. The number of such
//! threads is bounded per session (`max_waits_per_session`) and in all (`max_waits`); the
//! runtime's blocking pool has room for all of them plus the sessions' cleanups. When a session
//! ends, `LockTable::release_all` releases its holds and cancels its waits, which makes its
//! blocked threads return; the owner is deregistered once they all have.
//!
//! Admin queries (`LOCKS`, `STATUS`) never run on the session thread: a pool of
//! [`admin::ADMIN_THREADS`] threads serves them from a bounded queue (see [`admin`]). Writes never
//! block a session either (see `session`), so `Gateway::shutdown` takes at most [`STOP_BOUND`]
//! whatever the clients do.

pub mod admin;
pub use crate::proto;
mod session;
pub mod tls;

pub use session::{HIGH_WATER, MAX_UNSENT};

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::{watch, Notify, Semaphore};
use tracing::{info, warn};

use crate::error::{Error, Result};
use crate::table::LockTable;

/// Connections waiting to be accepted, at most (the kernel may cap it at `somaxconn`).
const LISTEN_BACKLOG: u32 = 1024;

/// Default listen address.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7411";

/// How the gateway runs (validated; see [`GatewaySection`] for the config-file form).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayConfig {
    /// Address to listen on; port 0 picks a free port ([`Gateway::local_addr`] tells which).
    pub listen: SocketAddr,
    /// A session silent this long is ended; None: never.
    pub idle_timeout: Option<Duration>,
    /// The shared secret; None: no authentication.
    pub auth_token: Option<String>,
    /// Sessions at once.
    pub max_connections: usize,
    /// Longest request line in bytes (without LF).
    pub max_line: usize,
    /// Names a session may hold or wait for at once.
    pub max_locks_per_session: usize,
    /// Waiting `LOCK` requests of one session.
    pub max_waits_per_session: usize,
    /// Waiting `LOCK` requests of all sessions (each takes a thread while it waits).
    pub max_waits: usize,
    /// With a secret: a connection that has not authenticated this long after it was accepted
    /// is closed (`AUTH_TIMEOUT`); None: never.
    pub auth_timeout: Option<Duration>,
    /// A line whose LF has not come this long after its first byte closes the session
    /// (`LINE_TIMEOUT`); None: never.
    pub line_timeout: Option<Duration>,
    /// With a secret: connections not yet authenticated, at most; a new one beyond it closes
    /// the oldest of them. They hold no session slot and no owner record. Also the most TLS
    /// handshakes in progress at once.
    pub max_unauthenticated: usize,
    /// Serve TLS with this certificate and key (PEM files); None: plain TCP.
    pub tls: Option<TlsFiles>,
}

/// The gateway's TLS certificate chain (leaf first) and private key, as PEM files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The certificate chain.
    pub cert: PathBuf,
    /// The private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            listen: DEFAULT_LISTEN.parse().expect("valid default address"),
            idle_timeout: Some(Duration::from_secs(60)),
            auth_token: None,
            max_connections: 1024,
            max_line: 512,
            max_locks_per_session: 1024,
            max_waits_per_session: 64,
            max_waits: 1024,
            auth_timeout: Some(Duration::from_secs(5)),
            line_timeout: Some(Duration::from_secs(10)),
            max_unauthenticated: 64,
            tls: None,
        }
    }
}

/// The `[gateway]` table of the config file; every key optional, defaults as in
/// `config/shmlock.toml`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GatewaySection {
    /// Whether shmlockd runs the gateway.
    pub enabled: bool,
    /// `HOST:PORT` to listen on.
    pub listen: String,
    /// Idle timeout with a unit: `"500ms"`, `"60s"`, `"5m"`; `"0s"` = never.
    #[serde(deserialize_with = "crate::config::duration_text")]
    pub idle_timeout: String,
    /// The shared secret inline ("" = none).
    pub auth_token: String,
    /// A file holding the secret (first line; "" = none). Excludes `auth_token`.
    pub auth_token_file: String,
    /// See [`GatewayConfig::max_connections`].
    pub max_connections: usize,
    /// See [`GatewayConfig::max_line`].
    pub max_line: usize,
    /// See [`GatewayConfig::max_locks_per_session`].
    pub max_locks_per_session: usize,
    /// See [`GatewayConfig::max_waits_per_session`].
    pub max_waits_per_session: usize,
    /// See [`GatewayConfig::max_waits`].
    pub max_waits: usize,
    /// See [`GatewayConfig::auth_timeout`]; a duration as `idle_timeout`, `"0s"` = never.
    #[serde(deserialize_with = "crate::config::duration_text")]
    pub auth_timeout: String,
    /// See [`GatewayConfig::line_timeout`]; a duration as `idle_timeout`, `"0s"` = never.
    #[serde(deserialize_with = "crate::config::duration_text")]
    pub line_timeout: String,
    /// See [`GatewayConfig::max_unauthenticated`].
    pub max_unauthenticated: usize,
    /// A PEM file with the gateway's certificate chain: with `tls_key`, the gateway speaks TLS
    /// only ("" = plain TCP).
    pub tls_cert: String,
    /// A PEM file with the certificate's private key ("" = plain TCP).
    pub tls_key: String,
}

impl Default for GatewaySection {
    fn default() -> Self {
        let d = GatewayConfig::default();
        GatewaySection {
            enabled: true,
            listen: DEFAULT_LISTEN.to_string(),
            idle_timeout: "60s".to_string(),
            auth_token: String::new(),
            auth_token_file: String::new(),
            max_connections: d.max_connections,
            max_line: d.max_line,
            max_locks_per_session: d.max_locks_per_session,
            max_waits_per_session: d.max_waits_per_session,
            max_waits: d.max_waits,
            auth_timeout: "5s".to_string(),
            line_timeout: "10s".to_string(),
            max_unauthenticated: d.max_unauthenticated,
            tls_cert: String::new(),
            tls_key: String::new(),
        }
    }
}

/// Parses a duration: [`crate::config::parse_duration`]'s grammar (`"250ms"`, `"1.5s"`, `"1h"`).
pub fn parse_duration(s: &str) -> Option<Duration> {
    crate::config::parse_duration(s).ok()
}

impl GatewaySection {
    /// Validates the section (reading the token file) into a [`GatewayConfig`]; `listen`
    /// overrides the `listen` key. Errors name the key.
    pub fn resolve(&self, listen: Option<&str>) -> Result<GatewayConfig> {
        let bad = |key, why: String| Error::Config { key, why };
        let addr = listen.unwrap_or(&self.listen);
        let listen = addr
            .parse()
            .map_err(|_| bad("gateway.listen", format!("{addr:?} is not an IP:PORT address")))?;
        let duration = |key, v: &str| crate::config::parse_duration(v).map_err(|e| bad(key, e.to_string()));
        let idle = duration("gateway.idle_timeout", &self.idle_timeout)?;
        let auth_timeout = duration("gateway.auth_timeout", &self.auth_timeout)?;
        let line_timeout = duration("gateway.line_timeout", &self.line_timeout)?;
        let auth_token = match (self.auth_token.is_empty(), self.auth_token_file.is_empty()) {
            (true, true) => None,
            (false, true) => Some(self.auth_token.clone()),
            (true, false) => Some(read_token(&PathBuf::from(&self.auth_token_file))?),
            (false, false) => {
                return Err(bad(
                    "gateway.auth_token",
                    "set auth_token or auth_token_file, not both".into(),
                ))
            }
        };
        if let Some(t) = &auth_token {
            if !valid_secret(t.as_bytes()) {
                return Err(bad(
                    "gateway.auth_token",
                    "the secret must be 1..=256 bytes without spaces or control bytes".into(),
                ));
            }
        }
        let positive = |key, v: usize, max: usize| {
            if (1..=max).contains(&v) {
                Ok(v)
            } else {
                Err(bad(key, format!("{v} is not in 1..={max}")))
            }
        };
        Ok(GatewayConfig {
            listen,
            idle_timeout: (!idle.is_zero()).then_some(idle),
            auth_token,
            max_connections: positive("gateway.max_connections", self.max_connections, 1 << 20)?,
            max_line: positive("gateway.max_line", self.max_line, 1 << 20)?,
            max_locks_per_session: positive("gateway.max_locks_per_session", self.max_locks_per_session, 1 << 26)?,
            max_waits_per_session: positive("gateway.max_waits_per_session", self.max_waits_per_session, 1 << 16)?,
            max_waits: positive("gateway.max_waits", self.max_waits, 1 << 16)?,
            auth_timeout: (!auth_timeout.is_zero()).then_some(auth_timeout),
            line_timeout: (!line_timeout.is_zero()).then_some(line_timeout),
            max_unauthenticated: positive("gateway.max_unauthenticated", self.max_unauthenticated, 1 << 20)?,
            tls: match (self.tls_cert.is_empty(), self.tls_key.is_empty()) {
                (true, true) => None,
                (false, false) => Some(TlsFiles {
                    cert: PathBuf::from(&self.tls_cert),
                    key: PathBuf::from(&self.tls_key),
                }),
                (false, true) => return Err(bad("gateway.tls_key", "tls_cert is set: set tls_key too".into())),
                (true, false) => return Err(bad("gateway.tls_cert", "tls_key is set: set tls_cert too".into())),
            },
        })
    }
}

fn valid_secret(s: &[u8]) -> bool {
    (1..=256).contains(&s.len()) && !s.iter().any(|&b| b <= b' ' || b == 0x7f)
}

fn read_token(path: &PathBuf) -> Result<String> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::Config {
        key: "gateway.auth_token_file",
        why: format!("cannot read {}: {e}", path.display()),
    })?;
    Ok(text.lines().next().unwrap_or("").trim().to_string())
}

/// State shared by the listener and every session.
#[derive(Debug)]
struct Shared {
    table: Arc<LockTable>,
    config: GatewayConfig,
    /// Permits for waiting requests of all sessions.
    waits: Arc<Semaphore>,
    /// Session slots (`max_connections`): taken at accept, or at `AUTH` when a secret is set.
    conns: Arc<Semaphore>,
    /// Connections that have not authenticated yet.
    unauth: Unauthenticated,
    /// Where admin queries run.
    admin: admin::AdminPool,
    max_name: usize,
    /// TLS: every connection's handshake, then its session behind a relay (see [`tls`]).
    tls: Option<tls::Acceptor>,
    /// Handshakes in progress at once (`max_unauthenticated`).
    handshakes: Arc<Semaphore>,
}

/// The connections that have not authenticated yet, oldest first, each with the signal that
/// closes it. Bounded: admitting one more than `max` closes the oldest, so a flood of
/// connections that never authenticate cannot keep a client with the secret out (it gets in
/// unless `max` connections arrive between its connect and its `AUTH`).
#[derive(Debug)]
struct Unauthenticated {
    max: usize,
    next: std::sync::atomic::AtomicU64,
    queue: std::sync::Mutex<std::collections::VecDeque<(u64, Arc<Notify>)>>,
}

/// A connection's place among the unauthenticated ones: `kick` is notified when it must go.
#[derive(Debug)]
struct Ticket {
    id: u64,
    kick: Arc<Notify>,
}

impl Unauthenticated {
    fn admit(&self) -> Ticket {
        let id = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let kick = Arc::new(Notify::new());
        let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        while q.len() >= self.max {
            if let Some((_, oldest)) = q.pop_front() {
                // Stored if that session is not waiting on it right now.
                oldest.notify_one();
            }
        }
        q.push_back((id, kick.clone()));
        Ticket { id, kick }
    }

    fn leave(&self, t: &Ticket) {
        let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = q.iter().position(|(id, _)| *id == t.id) {
            q.remove(i);
        }
    }
}

/// A running gateway; dropping it (or [`Gateway::shutdown`]) stops it, ending every session.
#[derive(Debug)]
pub struct Gateway {
    addr: SocketAddr,
    stop: Option<watch::Sender<bool>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Gateway {
    /// The address the gateway listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting, ends every session (releasing their locks), and waits for that: at
    /// most [`STOP_BOUND`] whatever the clients do (each session's last line gets one second;
    /// the sessions end at once and together).
    pub fn shutdown(mut self) {
        self.stop_now();
    }

    fn stop_now(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(true);
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.stop_now();
    }
}

/// How long [`Gateway::shutdown`] takes at most, whatever the clients do: each session's last
/// write gets one second, and releasing a session's locks is a few latched operations per lock.
pub const STOP_BOUND: Duration = Duration::from_secs(2);

/// A socket bound to the gateway's address but not listening yet (connections are refused, not
/// queued, until [`Bound::serve`]): what [`bind`] checks before anything else is set up
/// (shmlockd binds before it creates the segment, so a bad or busy address leaves nothing
/// behind, and a client that can connect finds the table there).
#[derive(Debug)]
pub struct Bound {
    socket: TcpSocket,
    addr: SocketAddr,
    config: GatewayConfig,
    tls: Option<tls::Acceptor>,
}

impl Bound {
    /// The address bound.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

/// Binds `config.listen` (a busy or bad address is an error here) and loads the TLS
/// certificate and key if any (a bad file is an error here too), for [`Bound::serve`].
pub fn bind(config: GatewayConfig) -> Result<Bound> {
    let tls = config.tls.as_ref().map(tls::acceptor).transpose()?;
    let io = |op, e: std::io::Error| Error::Io {
        op,
        segment: String::new(),
        source: e,
    };
    raise_nofile_limit((config.max_connections + config.max_unauthenticated) as u64 + 64);
    let socket = match config.listen {
        SocketAddr::V4(_) => TcpSocket::new_v4(),
        SocketAddr::V6(_) => TcpSocket::new_v6(),
    }
    .map_err(|e| io("gateway socket", e))?;
    // As std's TcpListener::bind: a port in TIME_WAIT may be reused, a listening one not.
    socket.set_reuseaddr(true).map_err(|e| io("gateway bind", e))?;
    socket.bind(config.listen).map_err(|e| io("gateway bind", e))?;
    let addr = socket.local_addr().map_err(|e| io("gateway bind", e))?;
    Ok(Bound {
        socket,
        addr,
        config,
        tls,
    })
}

/// Starts the gateway on `config.listen`, serving `table`. Binding happens before this returns,
/// so a busy address is an error here.
pub fn serve(config: GatewayConfig, table: Arc<LockTable>) -> Result<Gateway> {
    bind(config)?.serve(table)
}

impl Bound {
    /// Serves `table` on this socket until the returned [`Gateway`] is dropped.
    pub fn serve(self, table: Arc<LockTable>) -> Result<Gateway> {
        let Bound {
            socket,
            addr,
            config,
            tls,
        } = self;
        let segment = table.segment().name().to_string();
        let io = |op, e: std::io::Error| Error::Io {
            op,
            segment: segment.clone(),
            source: e,
        };
        // One thread serves every connection (see the module docs); waits run on blocking threads.
        let rt = tokio::runtime::Builder::new_current_thread()
            // Every waiting request holds a blocking thread; sessions' cleanups need a few more.
            .max_blocking_threads(config.max_waits + 64)
            .thread_stack_size(256 * 1024)
            .thread_name("shmlock-gw")
            .enable_all()
            .build()
            .map_err(|e| io("gateway runtime", e))?;
        let admin = admin::AdminPool::new(table.clone(), admin::ADMIN_THREADS, admin::ADMIN_QUEUE)
            .map_err(|e| io("gateway admin threads", e))?;
        let geo = table.geometry();
        let shared = Arc::new(Shared {
            waits: Arc::new(Semaphore::new(config.max_waits)),
            conns: Arc::new(Semaphore::new(config.max_connections)),
            unauth: Unauthenticated {
                max: config.max_unauthenticated,
                next: std::sync::atomic::AtomicU64::new(0),
                queue: std::sync::Mutex::new(std::collections::VecDeque::new()),
            },
            admin,
            max_name: geo.max_name_len as usize,
            handshakes: Arc::new(Semaphore::new(config.max_unauthenticated)),
            tls,
            table,
            config,
        });
        // Listening before this returns: a client may connect as soon as it has.
        let listener = {
            let _rt = rt.enter();
            socket.listen(LISTEN_BACKLOG).map_err(|e| io("gateway listen", e))?
        };
        let (stop_tx, stop_rx) = watch::channel(false);
        let thread = std::thread::Builder::new()
            .name("shmlock-gw-main".into())
            .spawn(move || {
                rt.block_on(accept_loop(listener, shared, stop_rx));
                // Sessions have finished their cleanup (accept_loop waits for them).
                rt.shutdown_timeout(Duration::from_secs(1));
            })
            .map_err(|e| Error::Io {
                op: "gateway thread",
                segment: String::new(),
                source: e,
            })?;
        info!(%addr, "gateway listening");
        Ok(Gateway {
            addr,
            stop: Some(stop_tx),
            thread: Some(thread),
        })
    }
}

/// Raises the soft open-files limit towards `want` (at most the hard limit), so that a gateway
/// configured for many connections is not stopped by a shell's default of 1024 descriptors;
/// warns when even the hard limit is lower.
fn raise_nofile_limit(want: u64) {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return;
    };
    if soft >= want {
        return;
    }
    let new = want.min(hard);
    if new > soft {
        if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, new, hard) {
            warn!(error = %e, "gateway: cannot raise the open-files limit");
            return;
        }
    }
    if new < want {
        warn!(
            limit = new,
            max_connections = want - 64,
            "gateway: the open-files limit (hard limit {hard}) is below max_connections; \
             connections beyond it wait in the listen queue (raise it: ulimit -Hn, LimitNOFILE=)"
        );
    }
}

/// Gives a connection (TCP, or the plaintext end behind TLS) its session: at once without a
/// secret, if a session slot is free (else a closing line); with one, a place among the
/// connections that have not authenticated (no slot and no owner until `AUTH`).
async fn admit(stream: impl session::Conn, peer: SocketAddr, shared: Arc<Shared>, stop: watch::Receiver<bool>) {
    if shared.config.auth_token.is_some() {
        let ticket = shared.unauth.admit();
        return session::run(stream, peer, shared, None, Some(ticket), stop).await;
    }
    match shared.conns.clone().try_acquire_owned() {
        Ok(permit) => session::run(stream, peer, shared, Some(permit), None, stop).await,
        Err(_) => {
            let why = format!(
                "the gateway serves at most {} connections",
                shared.config.max_connections
            );
            session::refuse(stream, why).await
        }
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let mut tasks = tokio::task::JoinSet::new();
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = stop.changed() => break,
            // Reap finished session tasks so the set does not grow.
            Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
        };
        let (stream, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                // EMFILE and friends: back off briefly instead of spinning.
                warn!(error = %e, "gateway: accept failed");
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        if shared.tls.is_some() {
            tasks.spawn(tls::serve(stream, peer, shared.clone(), stop.clone()));
        } else {
            tasks.spawn(admit(stream, peer, shared.clone(), stop.clone()));
        }
    }
    drop(listener);
    while tasks.join_next().await.is_some() {}
    info!("gateway stopped");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("60s"), Some(Duration::from_secs(60)));
        assert_eq!(parse_duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_duration("2m"), Some(Duration::from_secs(120)));
        assert_eq!(parse_duration("0s"), Some(Duration::ZERO));
        // One grammar with the CLI (issue 15): hours and fractions too.
        assert_eq!(parse_duration("1h"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_duration("1.5s"), Some(Duration::from_millis(1500)));
        for bad in ["", "60", "s", "-1s"] {
            assert_eq!(parse_duration(bad), None, "{bad}");
        }
    }

    #[test]
    fn section_defaults_resolve_to_config_defaults() {
        assert_eq!(
            GatewaySection::default().resolve(None).unwrap(),
            GatewayConfig::default()
        );
        let c = GatewaySection::default().resolve(Some("127.0.0.1:0")).unwrap();
        assert_eq!(c.listen.port(), 0);
    }

    #[test]
    fn section_errors_name_the_key() {
        let e = |s: GatewaySection| s.resolve(None).unwrap_err().to_string();
        let d = GatewaySection::default;
        assert!(e(GatewaySection {
            listen: "localhost".into(),
            ..d()
        })
        .contains("gateway.listen"));
        assert!(e(GatewaySection {
            idle_timeout: "soon".into(),
            ..d()
        })
        .contains("gateway.idle_timeout"));
        assert!(e(GatewaySection { max_line: 0, ..d() }).contains("gateway.max_line"));
        assert!(e(GatewaySection { max_waits: 0, ..d() }).contains("gateway.max_waits"));
        let both = GatewaySection {
            auth_token: "a".into(),
            auth_token_file: "/nonexistent".into(),
            ..d()
        };
        assert!(e(both).contains("not both"));
        let missing = GatewaySection {
            auth_token_file: "/nonexistent/token".into(),
            ..d()
        };
        assert!(e(missing).contains("gateway.auth_token_file"));
        assert!(e(GatewaySection {
            auth_token: "two words".into(),
            ..d()
        })
        .contains("gateway.auth_token"));
    }

    #[test]
    fn token_file_first_line_is_the_secret() {
        let path = std::env::temp_dir().join(format!("shmlock-token-{}", std::process::id()));
        std::fs::write(&path, "s3cret\nignored\n").unwrap();
        let c = GatewaySection {
            auth_token_file: path.display().to_string(),
            idle_timeout: "0s".into(),
            ..GatewaySection::default()
        }
        .resolve(None)
        .unwrap();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(c.auth_token.as_deref(), Some("s3cret"));
        assert_eq!(c.idle_timeout, None);
    }
}
