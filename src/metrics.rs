//! shmlockd's Prometheus metrics: a small HTTP listener (off unless `[daemon] metrics` or
//! `--metrics` names an address) that answers `GET /metrics` with the table's state in the
//! Prometheus text format (version 0.0.4), encoded by `prometheus-client`.
//!
//! # Cost on the lock path: none
//! A scrape reads what the table already keeps, without a latch: the statistics counters
//! ([`LockTable::stats`]), the pools' counts ([`LockTable::pool_counts`]) and the records of the
//! locks in use, the queued requests and the owners ([`LockTable::activity`]). Nothing is added
//! to a lock or an unlock, and no scrape makes a locker wait. A scrape of a table with a million
//! locks held reads a few million words, about 10 ms (`examples/metrics_scrape.rs`).
//!
//! # Waits: what is exported instead of a wait-time histogram
//! The table counts the requests that had to wait (`shmlock_waits_total`), timed out and were
//! handed a lock, but keeps no durations of finished waits: recording one would put a clock read
//! and a shared write on every contended lock. What the scrape can see is the requests queued
//! now and when each was queued, so it exports `shmlock_waiters_by_wait_seconds{le="..."}`, the
//! queued requests that have waited at most `le` seconds so far (cumulative buckets, a gauge:
//! requests leave it when granted), and `shmlock_oldest_wait_seconds`.
//!
//! # The listener
//! A hand-written responder on its own one-thread tokio runtime rather than an HTTP crate: it
//! answers one request per connection (`Connection: close`), GET or HEAD of `/metrics` only, so
//! the whole of HTTP it needs is a request head of at most [`MAX_REQUEST`] bytes; hyper or axum
//! would bring a large dependency tree into the daemon for that. It is made so that no client
//! can stall the daemon or the gateway (which runs on a runtime and thread of its own):
//! - at most [`MAX_READING`] connections are read at once: one more closes the one that has
//!   been sending its request head the longest, so connections left silent cannot keep a
//!   scraper out (a real scraper sends its request as soon as it connects);
//! - the request head must arrive within [`REQUEST_TIMEOUT`] and fit in [`MAX_REQUEST`] bytes,
//!   else the connection is closed (after a 408 or 431 that it has [`RESPONSE_TIMEOUT`] to take);
//! - at most [`MAX_ANSWERING`] requests are answered at once; one more gets 503 at once;
//! - the answer must be taken within [`RESPONSE_TIMEOUT`], else the connection is closed;
//! - the table is read on one blocking thread, one scrape at a time, so a flood of scrapes
//!   costs one core at most.

use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeGaugeValue, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{watch, Notify, Semaphore};
use tracing::{debug, warn};

use crate::LockTable;

/// Connections whose request head is being read at once; one more closes the oldest of them.
pub const MAX_READING: usize = 64;
/// Requests answered at once (the table read, then the answer sent); one more gets 503.
pub const MAX_ANSWERING: usize = 16;
/// Longest request head (request line and headers) in bytes.
pub const MAX_REQUEST: usize = 8 * 1024;
/// How long a client has to send its request head, from its connection's acceptance.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a client has to take the answer, once it is ready.
pub const RESPONSE_TIMEOUT: Duration = Duration::from_secs(10);
/// The `Content-Type` of the answer: the Prometheus text format, version 0.0.4.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;
/// The buckets of `shmlock_waiters_by_wait_seconds`, in seconds (`+Inf` is added).
pub const WAIT_BUCKETS: [f64; 8] = [0.001, 0.01, 0.1, 0.5, 1.0, 5.0, 30.0, 300.0];

/// The metrics listener's socket, bound but not listening yet (connections are refused until
/// [`Bound::serve`]): shmlockd binds it before it touches the segment, so a busy or bad address
/// stops it with nothing left behind.
#[derive(Debug)]
pub struct Bound {
    socket: TcpSocket,
    addr: SocketAddr,
}

/// Binds `addr` (a busy or bad address is an error here).
pub fn bind(addr: SocketAddr) -> io::Result<Bound> {
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4(),
        SocketAddr::V6(_) => TcpSocket::new_v6(),
    }?;
    // As std's TcpListener::bind: a port in TIME_WAIT may be reused, a listening one not.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    let addr = socket.local_addr()?;
    Ok(Bound { socket, addr })
}

impl Bound {
    /// The address bound (the port chosen for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serves `table`'s metrics on this socket until the returned [`Metrics`] is dropped.
    pub fn serve(self, table: Arc<LockTable>) -> io::Result<Metrics> {
        let Bound { socket, addr } = self;
        // The table is read on the one blocking thread: scrapes queue, one core at most.
        let rt = tokio::runtime::Builder::new_current_thread()
            .max_blocking_threads(1)
            .thread_name("shmlock-metrics")
            .enable_all()
            .build()?;
        let listener = {
            let _rt = rt.enter();
            socket.listen(64)?
        };
        let registry = Arc::new(registry(table));
        let (stop_tx, stop_rx) = watch::channel(false);
        let thread = std::thread::Builder::new().name("metrics".into()).spawn(move || {
            rt.block_on(accept_loop(listener, registry, stop_rx));
            // A scrape being read finishes within its own bounded time.
            rt.shutdown_timeout(Duration::from_secs(1));
        })?;
        Ok(Metrics {
            addr,
            stop: Some(stop_tx),
            thread: Some(thread),
        })
    }
}

/// A running metrics listener; dropping it stops it.
#[derive(Debug)]
pub struct Metrics {
    addr: SocketAddr,
    stop: Option<watch::Sender<bool>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Metrics {
    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for Metrics {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(true);
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The table's metrics in the Prometheus text format, as `GET /metrics` answers them.
pub fn render(table: Arc<LockTable>) -> String {
    encode(&registry(table))
}

fn registry(table: Arc<LockTable>) -> Registry {
    let mut r = Registry::default();
    r.register_collector(Box::new(TableCollector { table }));
    r
}

fn encode(registry: &Registry) -> String {
    let mut text = String::with_capacity(8 * 1024);
    // Writing into a String cannot fail, and every value is a number the encoder formats.
    if let Err(e) = prometheus_client::encoding::prometheus_text::encode(&mut text, registry) {
        warn!("metrics: encoding failed: {e}");
    }
    text
}

/// The connections being read, oldest first, each with what closes it.
#[derive(Debug, Default)]
struct Reading {
    next: u64,
    queue: VecDeque<(u64, Arc<Notify>)>,
}

/// Registers a new connection being read; when [`MAX_READING`] are, closes the oldest.
fn start_reading(reading: &Mutex<Reading>) -> (u64, Arc<Notify>) {
    let mut r = reading.lock().unwrap_or_else(|p| p.into_inner());
    if r.queue.len() >= MAX_READING {
        if let Some((_, kick)) = r.queue.pop_front() {
            // notify_one keeps the permit if the task is not waiting yet.
            kick.notify_one();
        }
    }
    let id = r.next;
    r.next += 1;
    let kick = Arc::new(Notify::new());
    r.queue.push_back((id, kick.clone()));
    (id, kick)
}

fn done_reading(reading: &Mutex<Reading>, id: u64) {
    let mut r = reading.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(i) = r.queue.iter().position(|(k, _)| *k == id) {
        r.queue.remove(i);
    }
}

async fn accept_loop(listener: TcpListener, registry: Arc<Registry>, mut stop: watch::Receiver<bool>) {
    let answering = Arc::new(Semaphore::new(MAX_ANSWERING));
    let reading = Arc::new(Mutex::new(Reading::default()));
    loop {
        let accepted = tokio::select! {
            _ = stop.changed() => return,
            a = listener.accept() => a,
        };
        let (mut stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of descriptors, or a connection reset before it was accepted: go on,
                // after a pause that keeps a persistent error from spinning.
                debug!("metrics: accept: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        debug!(%peer, "metrics: connection");
        let (id, kick) = start_reading(&reading);
        let (registry, answering, reading) = (registry.clone(), answering.clone(), reading.clone());
        tokio::spawn(async move {
            let head = tokio::select! {
                _ = kick.notified() => None,
                head = tokio::time::timeout(REQUEST_TIMEOUT, read_head(&mut stream)) => Some(head),
            };
            done_reading(&reading, id);
            if let Some(head) = head {
                answer(stream, head, &registry, &answering).await;
            }
        });
    }
}

/// What a request head asks for.
#[derive(Debug, PartialEq, Eq)]
enum Request {
    /// GET (true) or HEAD (false) of /metrics.
    Metrics { body: bool },
    /// Another path.
    NotFound,
    /// Another method.
    NotAllowed,
    /// Not an HTTP/1 request line.
    Bad,
}

/// Parses a request head's first line.
fn parse_request(head: &[u8]) -> Request {
    let line = head.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let Ok(line) = std::str::from_utf8(line) else {
        return Request::Bad;
    };
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) = (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Request::Bad;
    };
    if !version.starts_with("HTTP/1.") || method.is_empty() || !target.starts_with('/') {
        return Request::Bad;
    }
    let body = match method {
        "GET" => true,
        "HEAD" => false,
        _ => return Request::NotAllowed,
    };
    match target.split('?').next() {
        Some("/metrics") => Request::Metrics { body },
        _ => Request::NotFound,
    }
}

/// Reads a request head (up to its blank line) of at most [`MAX_REQUEST`] bytes. None: the
/// peer closed first, or the head is longer.
async fn read_head(stream: &mut TcpStream) -> io::Result<Option<Vec<u8>>> {
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Ok(None);
        }
        // Search from just before the new bytes: the end may straddle two reads.
        let from = head.len().saturating_sub(3);
        head.extend_from_slice(&buf[..n]);
        let tail = &head[from..];
        if tail.windows(4).any(|w| w == b"\r\n\r\n") || tail.windows(2).any(|w| w == b"\n\n") {
            return Ok(Some(head));
        }
        if head.len() > MAX_REQUEST {
            return Ok(None);
        }
    }
}

fn response(status: &str, content_type: &str, body: &str, send_body: bool, extra: &str) -> Vec<u8> {
    let mut r = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n{extra}\r\n",
        body.len()
    )
    .into_bytes();
    if send_body {
        r.extend_from_slice(body.as_bytes());
    }
    r
}

/// What [`read_head`] gave within [`REQUEST_TIMEOUT`].
type Head = Result<io::Result<Option<Vec<u8>>>, tokio::time::error::Elapsed>;

/// Answers the request `head` read from `stream`, then closes it; bounded in time.
async fn answer(mut stream: TcpStream, head: Head, registry: &Arc<Registry>, answering: &Arc<Semaphore>) {
    let text = |s: &str| response(s, "text/plain; charset=utf-8", &format!("{s}\n"), true, "");
    // Held until the answer is sent or abandoned.
    let Ok(_slot) = answering.clone().try_acquire_owned() else {
        let busy = text("503 Service Unavailable");
        let _ = tokio::time::timeout(RESPONSE_TIMEOUT, stream.write_all(&busy)).await;
        return;
    };
    let answer = match head {
        Err(_) => Some(text("408 Request Timeout")),
        Ok(Err(_)) => None,
        Ok(Ok(None)) => Some(text("431 Request Header Fields Too Large")),
        Ok(Ok(Some(head))) => Some(match parse_request(&head) {
            Request::Metrics { body } => {
                let registry = registry.clone();
                match tokio::task::spawn_blocking(move || encode(&registry)).await {
                    Ok(metrics) => response("200 OK", CONTENT_TYPE, &metrics, body, ""),
                    Err(_) => text("500 Internal Server Error"),
                }
            }
            Request::NotFound => text("404 Not Found"),
            Request::NotAllowed => response(
                "405 Method Not Allowed",
                "text/plain; charset=utf-8",
                "405 Method Not Allowed\n",
                true,
                "Allow: GET, HEAD\r\n",
            ),
            Request::Bad => text("400 Bad Request"),
        }),
    };
    if let Some(answer) = answer {
        let _ = tokio::time::timeout(RESPONSE_TIMEOUT, async {
            stream.write_all(&answer).await?;
            stream.shutdown().await
        })
        .await;
    }
}

/// Reads the table at each scrape (see the module docs for what, and at what cost).
#[derive(Debug)]
struct TableCollector {
    table: Arc<LockTable>,
}

fn gauge(
    enc: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    v: impl EncodeGaugeValue,
) -> std::fmt::Result {
    enc.encode_descriptor(name, help, unit, MetricType::Gauge)?
        .encode_gauge(&v)
}

fn counter(enc: &mut DescriptorEncoder<'_>, name: &str, help: &str, v: u64) -> std::fmt::Result {
    enc.encode_descriptor(name, help, None, MetricType::Counter)?
        .encode_counter::<NoLabelSet, _, u64>(&v, None)
}

/// A gauge family with one label.
fn gauges(
    enc: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    label: &str,
    rows: &[(&str, u64)],
) -> std::fmt::Result {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (value, v) in rows {
        m.encode_family(&[(label, *value)])?.encode_gauge(v)?;
    }
    Ok(())
}

/// The short name of a pool in the `pool` label.
fn pool_label(pool: &str) -> &str {
    match pool {
        "lock entry" => "entry",
        "hold/wait" => "hold",
        other => other,
    }
}

impl Collector for TableCollector {
    fn encode(&self, mut enc: DescriptorEncoder<'_>) -> std::fmt::Result {
        let t0 = Instant::now();
        let t = &*self.table;
        let bounds = WAIT_BUCKETS.map(Duration::from_secs_f64);
        let st = t.stats();
        let act = t.activity(&bounds);
        let pools = t.pool_counts();
        let (max_locks, max_holds) = t.requested();
        let geo = t.geometry();
        let read = t0.elapsed();
        let secs = Some(&Unit::Seconds);

        gauge(
            &mut enc,
            "shmlock_locks_held",
            "Locks held, in either mode.",
            None,
            act.held,
        )?;
        gauge(
            &mut enc,
            "shmlock_locks_waited_on",
            "Locks with at least one queued request.",
            None,
            act.waited_on,
        )?;
        gauge(
            &mut enc,
            "shmlock_locks_owner_died",
            "Locks neither held nor waited on that carry an owner-died notice for their next holder.",
            None,
            st.died,
        )?;
        gauge(
            &mut enc,
            "shmlock_waiters",
            "Lock requests queued now.",
            None,
            act.waiters,
        )?;
        gauge(
            &mut enc,
            "shmlock_shared_holds",
            "Shared holds now.",
            None,
            st.shared_holds,
        )?;
        gauge(
            &mut enc,
            "shmlock_oldest_wait",
            "How long the oldest queued request has waited so far.",
            secs,
            act.oldest_wait.as_secs_f64(),
        )?;
        {
            let mut m = enc.encode_descriptor(
                "shmlock_waiters_by_wait",
                "Queued requests that have waited at most le seconds so far (cumulative; the table keeps no durations of finished waits).",
                secs,
                MetricType::Gauge,
            )?;
            for (bound, n) in WAIT_BUCKETS.iter().zip(&act.waiting_at_most) {
                m.encode_family(&[("le", bound.to_string())])?.encode_gauge(n)?;
            }
            m.encode_family(&[("le", "+Inf".to_string())])?
                .encode_gauge(&act.waiters)?;
        }
        gauges(
            &mut enc,
            "shmlock_owners",
            "Registered owners (client handles) by kind: local processes, remote gateway sessions.",
            "kind",
            &[
                ("local", act.local_owners),
                ("remote", act.remote_owners),
                ("unknown", act.other_owners),
            ],
        )?;
        gauge(
            &mut enc,
            "shmlock_owners_reaping",
            "Owners of dead processes being reaped now.",
            None,
            act.reaping_owners,
        )?;
        gauge(
            &mut enc,
            "shmlock_gateway_sessions",
            "Authenticated gateway sessions (each is one remote owner).",
            None,
            act.remote_owners,
        )?;
        counter(&mut enc, "shmlock_grants", "Locks granted.", st.grants)?;
        counter(&mut enc, "shmlock_waits", "Lock requests that had to wait.", st.waits)?;
        counter(
            &mut enc,
            "shmlock_timeouts",
            "Lock requests that timed out.",
            st.timeouts,
        )?;
        counter(
            &mut enc,
            "shmlock_handoffs",
            "Locks handed directly to a waiter on release.",
            st.handoffs,
        )?;
        counter(
            &mut enc,
            "shmlock_reaps",
            "Owners reaped after their process died.",
            st.reaps,
        )?;
        counter(
            &mut enc,
            "shmlock_repairs",
            "Shards repaired after a process died inside their critical section.",
            st.repairs,
        )?;
        {
            let mut m = enc.encode_descriptor(
                "shmlock_pool_records",
                "Records of each pool by state (pool entry: lock names; hold: shared holds and waits; owner: client handles).",
                None,
                MetricType::Gauge,
            )?;
            for p in &pools {
                for (state, n) in &p.states {
                    let state = state.to_ascii_lowercase();
                    m.encode_family(&[("pool", pool_label(p.pool)), ("state", state.as_str())])?
                        .encode_gauge(n)?;
                }
            }
        }
        let caps: Vec<(&str, u64)> = pools.iter().map(|p| (pool_label(p.pool), p.capacity)).collect();
        gauges(
            &mut enc,
            "shmlock_pool_capacity",
            "Records each pool has (provisioned over all shards, with headroom for an uneven hash spread).",
            "pool",
            &caps,
        )?;
        gauge(
            &mut enc,
            "shmlock_max_locks",
            "Distinct lock names the segment was sized for (max_locks).",
            None,
            max_locks,
        )?;
        gauge(
            &mut enc,
            "shmlock_max_holds",
            "Shared holds plus waits the segment was sized for (max_holds).",
            None,
            max_holds,
        )?;
        gauge(
            &mut enc,
            "shmlock_max_owners",
            "Owners the segment has room for (max_owners).",
            None,
            u64::from(geo.owners),
        )?;
        gauge(
            &mut enc,
            "shmlock_shards",
            "Shards of the segment.",
            None,
            u64::from(geo.shards),
        )?;
        gauge(
            &mut enc,
            "shmlock_segment_size",
            "Size of the shared-memory segment.",
            Some(&Unit::Bytes),
            t.segment().size() as u64,
        )?;
        gauge(
            &mut enc,
            "shmlock_scrape_read",
            "How long this scrape took to read the table.",
            secs,
            read.as_secs_f64(),
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_lines() {
        assert_eq!(
            parse_request(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"),
            Request::Metrics { body: true }
        );
        assert_eq!(
            parse_request(b"HEAD /metrics?x=1 HTTP/1.0\n\n"),
            Request::Metrics { body: false }
        );
        assert_eq!(parse_request(b"GET / HTTP/1.1\r\n\r\n"), Request::NotFound);
        assert_eq!(parse_request(b"POST /metrics HTTP/1.1\r\n\r\n"), Request::NotAllowed);
        for bad in [
            &b"GET /metrics\r\n\r\n"[..],
            b"\xff\xfe\r\n\r\n",
            b"GET  /metrics HTTP/1.1\r\n\r\n",
            b"GET metrics HTTP/1.1\r\n\r\n",
            b"\r\n\r\n",
            b"GET /metrics SPDY/3\r\n\r\n",
        ] {
            assert_eq!(parse_request(bad), Request::Bad, "{:?}", String::from_utf8_lossy(bad));
        }
    }
}
