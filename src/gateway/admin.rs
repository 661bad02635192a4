//! The gateway's admin pool: `LOCKS` and `STATUS` are answered off the session threads.
//!
//! Sessions hand their queries to an [`AdminPool`] of [`ADMIN_THREADS`] threads with a queue of
//! [`ADMIN_QUEUE`] (a full queue answers `SERVER_BUSY`), and a session waits for its own answer
//! without reading further requests (so its answers keep the order of its requests), while
//! every other session is served. The codec (what the answers hold, encoding and decoding) is
//! [`crate::proto::admin`], re-exported here.

use std::sync::mpsc::{self, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

pub use crate::proto::admin::*;
use crate::proto::{self, decode_word, LocksQuery};
use crate::table::{Cursor, LockTable};

/// Threads that serve admin queries.
pub const ADMIN_THREADS: usize = 2;
/// Admin queries waiting for a thread, at most (one per session at a time).
pub const ADMIN_QUEUE: usize = 16;

// ---- the pool --------------------------------------------------------------------------------

/// An admin query, owned, for a pool thread.
#[derive(Debug)]
enum Query {
    Locks {
        prefix: Vec<u8>,
        after: Option<Cursor>,
        limit: usize,
    },
    Status {
        check: bool,
    },
}

#[derive(Debug)]
struct Job {
    tag: Box<str>,
    query: Query,
    reply: oneshot::Sender<Vec<u8>>,
}

/// Threads that answer admin queries off the session thread, with a bounded queue.
///
/// Dropping the pool closes the queue: its threads finish the query in hand and exit (nobody
/// waits for them; each holds the table, so the mapping outlives them).
#[derive(Debug)]
pub struct AdminPool {
    jobs: SyncSender<Job>,
}

impl AdminPool {
    /// Starts `threads` threads serving `table`, with room for `queue` waiting queries.
    pub fn new(table: Arc<LockTable>, threads: usize, queue: usize) -> std::io::Result<AdminPool> {
        let (tx, rx) = mpsc::sync_channel::<Job>(queue);
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..threads.max(1) {
            let (rx, table) = (rx.clone(), table.clone());
            std::thread::Builder::new()
                .name(format!("shmlock-admin-{i}"))
                .spawn(move || loop {
                    let job = match rx.lock().unwrap_or_else(|p| p.into_inner()).recv() {
                        Ok(j) => j,
                        Err(_) => return,
                    };
                    let out = run_query(&table, &job.tag, &job.query);
                    // The session may have ended meanwhile: nobody to answer.
                    let _ = job.reply.send(out);
                })?;
        }
        Ok(AdminPool { jobs: tx })
    }

    /// Queues `LOCKS q` or `STATUS` (see [`proto::Command`]) under `tag`; the receiver gets the
    /// whole response. None when the queue is full.
    pub(super) fn submit(&self, tag: &str, q: AdminRequest<'_>) -> Option<oneshot::Receiver<Vec<u8>>> {
        let query = match q {
            AdminRequest::Locks(q) => Query::Locks {
                // The parser has checked that it decodes.
                prefix: q.prefix.and_then(decode_word).unwrap_or_default(),
                after: q.after,
                limit: q.limit.unwrap_or(proto::DEFAULT_LOCKS_LIMIT) as usize,
            },
            AdminRequest::Status { check } => Query::Status { check },
        };
        let (reply, rx) = oneshot::channel();
        match self.jobs.try_send(Job {
            tag: tag.into(),
            query,
            reply,
        }) {
            Ok(()) => Some(rx),
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => None,
        }
    }
}

/// What a session asks of the pool.
#[derive(Debug, Clone, Copy)]
pub(super) enum AdminRequest<'a> {
    Locks(LocksQuery<'a>),
    Status { check: bool },
}

fn run_query(table: &LockTable, tag: &str, q: &Query) -> Vec<u8> {
    let mut out = Vec::new();
    match q {
        Query::Locks { prefix, after, limit } => {
            let page = table.locks_page(*after, prefix, *limit);
            encode_page(&mut out, tag, &page);
        }
        Query::Status { check } => serve_status(table, tag, *check, &mut out),
    }
    out
}
