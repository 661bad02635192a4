//! A session: one lease, kept alive in the background, and the one place that decides it is
//! lost.
//!
//! The lease is the session's life at the cluster: its keys go when it expires. This side never
//! claims a lock longer than the cluster could keep it: the lease lives at least `ttl` past the
//! moment the last keep-alive that was answered was *sent* (the leader restarts the TTL when it
//! processes it, later), so the session is declared lost at `sent + ttl` unless another answer
//! came, and at once when an answer says the lease is gone (TTL 0). From quorum loss to the
//! notice that takes between `ttl - ttl/3` and `ttl` (plus the timer's slack).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use etcd_client::Client;
use tokio::sync::watch;
use tokio::time::{sleep, timeout_at, Instant};

/// One lease and what is known about it.
#[derive(Debug)]
pub(crate) struct Session {
    /// The lease id.
    pub id: i64,
    lost: AtomicBool,
    why: Mutex<Option<String>>,
    /// Flips to true once, when the session is lost; waits select on it.
    tx: watch::Sender<bool>,
    /// When the last keep-alive answer (or the grant) came.
    answered: Mutex<Instant>,
}

impl Session {
    /// Grants a lease of `ttl` and starts keeping it alive on the runtime.
    pub(crate) async fn start(
        client: &Client,
        ttl: Duration,
        request_timeout: Duration,
    ) -> Result<Arc<Session>, String> {
        let secs = ttl.as_secs().max(1) as i64;
        // Each attempt at most a quarter of the request timeout (a member that lost its leader
        // holds a request until its own timeout), all of them at most the request timeout.
        let until = Instant::now() + request_timeout;
        let attempt = (request_timeout / 4).max(Duration::from_millis(500));
        let (sent, grant) = loop {
            let sent = Instant::now();
            match timeout_at((sent + attempt).min(until), client.clone().lease_grant(secs, None)).await {
                Ok(Ok(grant)) => break (sent, grant),
                // A member that went away, an election: another try, until the request timeout.
                Ok(Err(e)) if super::transient(&e) && Instant::now() + Duration::from_millis(50) < until => {
                    sleep(Duration::from_millis(50)).await;
                }
                Ok(Err(e)) => return Err(format!("granting a lease: {e}")),
                Err(_) if Instant::now() < until => {}
                Err(_) => {
                    return Err(format!(
                        "granting a lease: no answer within {} (is a majority of the cluster up?)",
                        crate::clock::human(request_timeout)
                    ))
                }
            }
        };
        let (tx, _) = watch::channel(false);
        let session = Arc::new(Session {
            id: grant.id(),
            lost: AtomicBool::new(false),
            why: Mutex::new(None),
            tx,
            answered: Mutex::new(Instant::now()),
        });
        let granted = Duration::from_secs(grant.ttl().max(1) as u64);
        tokio::spawn(keep_alive(
            Arc::downgrade(&session),
            client.clone(),
            sent + granted,
            granted,
        ));
        Ok(session)
    }

    /// Has the lease been lost (expired, revoked, or not renewed in time)?
    #[inline]
    pub(crate) fn is_lost(&self) -> bool {
        self.lost.load(Ordering::Acquire)
    }

    /// Why it was lost, once it was.
    pub(crate) fn why(&self) -> Option<String> {
        self.why.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Did the cluster answer a keep-alive within the last `d`? (Then it is reachable and has a
    /// leader: a request that keeps failing meanwhile fails for a reason of its own.)
    pub(crate) fn answered_within(&self, d: Duration) -> bool {
        self.answered.lock().unwrap_or_else(|e| e.into_inner()).elapsed() < d
    }

    /// A receiver that sees `true` once the session is lost.
    pub(crate) fn subscribe(&self) -> watch::Receiver<bool> {
        self.tx.subscribe()
    }

    /// Declares the session lost (the first reason wins).
    pub(crate) fn mark_lost(&self, why: String) {
        let mut w = self.why.lock().unwrap_or_else(|e| e.into_inner());
        if w.is_none() {
            tracing::warn!(lease = format_args!("{:x}", self.id), "etcd session lost: {why}");
            *w = Some(why);
        }
        self.lost.store(true, Ordering::Release);
        self.tx.send_replace(true);
    }
}

/// Keeps the lease alive until the session is dropped or lost: a keep-alive every third of the
/// TTL; a broken stream is opened again; no answer by `expires` loses the session.
async fn keep_alive(session: std::sync::Weak<Session>, client: Client, mut expires: Instant, ttl: Duration) {
    let Some(id) = session.upgrade().map(|s| s.id) else {
        return;
    };
    let period = ttl / 3;
    let mut stream = None;
    loop {
        let sent = Instant::now();
        let answer = timeout_at(expires, async {
            loop {
                if stream.is_none() {
                    match client.clone().lease_keep_alive(id).await {
                        Ok(s) => stream = Some(s),
                        Err(_) => {
                            sleep(Duration::from_millis(100)).await;
                            continue;
                        }
                    }
                }
                let (keeper, replies) = stream.as_mut().expect("just opened");
                let sent = Instant::now();
                if keeper.keep_alive().await.is_ok() {
                    if let Ok(Some(reply)) = replies.message().await {
                        return (sent, reply.ttl());
                    }
                }
                // The stream broke (a member went away, a leader change): open another.
                stream = None;
                sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
        let Some(s) = session.upgrade() else { return };
        if s.is_lost() {
            return;
        }
        match answer {
            Err(_) => {
                s.mark_lost(format!(
                    "no keep-alive of lease {id:x} was answered within its TTL of {}: the cluster is \
                     unreachable or without quorum, and the lease may have expired",
                    crate::clock::human(ttl)
                ));
                return;
            }
            Ok((_, left)) if left <= 0 => {
                s.mark_lost(format!("lease {id:x} expired or was revoked at the cluster"));
                return;
            }
            Ok((at, left)) => {
                expires = at + Duration::from_secs(left as u64);
                *s.answered.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
                drop(s);
                let next = (sent + period).min(expires);
                tokio::time::sleep_until(next).await;
            }
        }
    }
}
