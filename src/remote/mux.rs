//! The leader/follower multiplexer under [`RemoteClient`](super::RemoteClient): one
//! connection, many callers.
//!
//! Requests are pipelined: each gets a numeric tag and a [`Slot`], is written at once under a
//! short mutex, and waits for its own response, matched by tag. Responses are read by the
//! callers themselves: a caller waiting for its answer takes the reading role if nobody has it,
//! reads, and hands every line it reads to the slot it answers; other callers park until their
//! answer is handed to them or the reading role is handed to them (`hand_off`). So a lone
//! caller's round trip is a write and a blocking read in its own thread, with no second thread
//! to wake. A background thread reads only answers nobody waits for (unlocks sent by dropped
//! guards, pings, a lock request given up) when no caller reads, after a short delay, and sends
//! the keep-alive `PING` whenever nothing was sent for a third of the gateway's idle timeout.
//! When the connection ends, every caller still waiting fails at once (`close`).
//!
//! Lock order: `reader` (held by whoever has the reading role, `State::reading`) before
//! `state`; `writer` is taken alone. The reading role is taken and given up under `state`.

use super::link::Link;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::{self, Thread};
use std::time::{Duration, Instant};

use crate::client::{FencingToken, Grant};
use crate::error::{Error, Result};
use crate::owner::OpenedBy;
use crate::proto::framer::Framer;
use crate::proto::{self, ErrorCode, Response};

/// How long answers nobody waits for may stay unread while no caller reads, before the
/// background thread reads them (a caller that comes meanwhile reads them on its way).
pub(super) const DRAIN_DELAY: Duration = Duration::from_millis(2);

/// What a request's response said, short of an error.
#[derive(Debug)]
pub(super) enum Answer {
    Granted(Grant),
    Done,
    /// The lines of a multi-line answer (`LOCKS`), the last one ending it.
    Lines(Vec<Vec<u8>>),
}

pub(super) type Reply = Result<Answer>;

/// Who waits for a tag's response.
#[derive(Debug)]
pub(super) enum Slot {
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
    pub(super) fn caller() -> Slot {
        Slot::Caller {
            reply: None,
            parked: None,
            lines: None,
        }
    }

    pub(super) fn multi_line_caller() -> Slot {
        Slot::Caller {
            reply: None,
            parked: None,
            lines: Some(Vec::new()),
        }
    }

    /// True if nobody waits for the answer.
    pub(super) fn orphan(&self) -> bool {
        !matches!(self, Slot::Caller { .. })
    }
}

#[derive(Debug, Default)]
pub(super) struct State {
    pub(super) slots: HashMap<u64, Slot>,
    /// Why the connection ended, once it has.
    pub(super) closed: Option<String>,
    /// Someone (a caller or the background thread) has the reading role and may lock `reader`.
    pub(super) reading: bool,
    /// Callers inside `wait`.
    pub(super) waiting: usize,
    /// Slots whose answer nobody waits for.
    pub(super) orphans: usize,
    /// The background thread sleeps with no drain planned: wake it when answers nobody waits
    /// for may be left unread.
    pub(super) bg_idle: bool,
    /// The client is being dropped.
    pub(super) stop: bool,
}

/// The write side, with a line buffer reused by every request.
#[derive(Debug)]
pub(super) struct Writer {
    pub(super) stream: Link,
    pub(super) line: Vec<u8>,
}

/// The read side: the socket and the protocol's line framer.
#[derive(Debug)]
pub(super) struct Reader {
    pub(super) stream: Link,
    pub(super) framer: Framer,
}

/// The longest response line taken from a gateway (its own are far shorter): a gateway that
/// sends a longer one is not trusted with more memory.
pub(super) const MAX_RESPONSE_LINE: usize = 1 << 20;

impl Reader {
    pub(super) fn new(stream: Link) -> Reader {
        Reader {
            stream,
            framer: Framer::new(MAX_RESPONSE_LINE, false),
        }
    }

    /// The next whole line already read (without its LF), if any; why the connection cannot
    /// go on, if the bytes do not frame.
    pub(super) fn next_line(&mut self) -> std::result::Result<Option<&[u8]>, String> {
        self.framer
            .next_line()
            .map_err(|e| format!("the gateway sent a bad line: {e}"))
    }

    /// Reads what the socket has (blocking until something comes); why not, if it ended.
    pub(super) fn fill(&mut self) -> std::result::Result<(), String> {
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
pub(super) struct Inner {
    pub(super) addr: String,
    pub(super) writer: Mutex<Writer>,
    pub(super) state: Mutex<State>,
    /// The background thread waits here.
    pub(super) bg: Condvar,
    pub(super) reader: Mutex<Reader>,
    pub(super) next_tag: AtomicU64,
    /// Milliseconds since `epoch` of the last request sent (for the keep-alive).
    pub(super) last_send: AtomicU64,
    pub(super) epoch: Instant,
    /// The process that connected: a forked child shares the socket but not the session's
    /// threads, and may not use it (it would speak on its parent's session).
    pub(super) opened_by: OpenedBy,
}

pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Appends `n` in decimal.
pub(super) fn push_u64(out: &mut Vec<u8>, mut n: u64) {
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
pub(super) enum After {
    Nothing,
    Wake(Thread),
    Unlock(Box<[u8]>),
}

impl Inner {
    pub(super) fn conn_err(&self, why: impl Into<String>) -> Error {
        Error::Connection {
            addr: self.addr.clone(),
            why: why.into(),
        }
    }

    /// Has the connection ended (so the gateway released the session's locks)?
    pub(super) fn is_closed(&self) -> bool {
        lock(&self.state).closed.is_some()
    }

    pub(super) fn closed_err(&self, st: &State) -> Error {
        self.conn_err(st.closed.clone().unwrap_or_else(|| "connection closed".into()))
    }

    /// Counts an answer nobody waits for; wakes the background thread if it may have to read it.
    pub(super) fn add_orphan(&self, st: &mut State) {
        st.orphans += 1;
        if st.bg_idle && !st.reading {
            st.bg_idle = false;
            self.bg.notify_one();
        }
    }

    /// Registers `slot` under a new tag and sends `tag`, a space, what `request` appends, LF.
    pub(super) fn send(&self, slot: Slot, request: impl FnOnce(&mut Vec<u8>)) -> Result<u64> {
        // Before any lock: in a forked child, a lock may have been held by a thread of the
        // parent's at the fork, and is held for ever.
        self.opened_by.check()?;
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
    pub(super) fn call(&self, request: impl FnOnce(&mut Vec<u8>)) -> Reply {
        let tag = self.send(Slot::caller(), request)?;
        self.wait(tag)
    }

    /// Waits for the answer to `tag` (a `Slot::Caller`): reads the socket itself while nobody
    /// else does, else parks until a reader hands it its answer or the reading role.
    pub(super) fn wait(&self, tag: u64) -> Reply {
        self.opened_by.check()?;
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
    pub(super) fn hand_off(&self, st: MutexGuard<'_, State>) {
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
    pub(super) fn lead(&self, tag: u64) {
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
    pub(super) fn drain(&self) {
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
    pub(super) fn close(&self, why: String) {
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
    pub(super) fn dispatch(&self, line: &[u8], own: u64) -> std::result::Result<bool, String> {
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
    pub(super) fn background(&self, keepalive: Option<Duration>) {
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
pub(super) fn remote_error(code: Option<ErrorCode>, code_word: &str, message: &str) -> Error {
    match code {
        Some(code) => proto::error_of(code, message, Duration::ZERO),
        None => Error::Remote {
            code: ErrorCode::Internal,
            message: format!("{code_word} {message}"),
        },
    }
}

impl Inner {
    /// The multiplexer of `stream` (the gateway at `addr`), whose first bytes `reader` may
    /// already have read (the greeting).
    pub(super) fn new(addr: String, stream: Link, reader: Reader) -> Arc<Inner> {
        Arc::new(Inner {
            addr,
            writer: Mutex::new(Writer {
                stream,
                line: Vec::with_capacity(128),
            }),
            state: Mutex::default(),
            bg: Condvar::new(),
            reader: Mutex::new(reader),
            next_tag: AtomicU64::new(1),
            last_send: AtomicU64::new(0),
            epoch: Instant::now(),
            opened_by: OpenedBy::now(),
        })
    }

    /// Starts the background thread (keep-alive `PING` every `keepalive`, if given).
    pub(super) fn start(self: &Arc<Self>, keepalive: Option<Duration>) -> std::io::Result<thread::JoinHandle<()>> {
        let inner = self.clone();
        thread::Builder::new()
            .name("shmlock-remote".into())
            .spawn(move || inner.background(keepalive))
    }

    /// Ends the connection from this side: stops the background thread (`background`, joined),
    /// sends `QUIT` (best effort) so the session gives back what it holds, and shuts the socket,
    /// which also ends any blocking read.
    pub(super) fn shut(&self, background: Option<thread::JoinHandle<()>>) {
        {
            let mut st = lock(&self.state);
            st.stop = true;
            self.bg.notify_one();
        }
        {
            let w = &mut *lock(&self.writer);
            // `QUIT` ends the session as giving back what it holds (a lock request given up and
            // granted since is unlocked so, not abandoned as owner-died). Best effort: a gateway
            // that does not read gets no more than a moment.
            let _ = w.stream.set_write_timeout(Some(Duration::from_millis(100)));
            let _ = w.stream.write_all(b"quit QUIT\n");
            // Ends a blocking read of the background thread too.
            let _ = w.stream.shutdown();
        }
        if let Some(t) = background {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    //! The multiplexer over a socketpair: the test is the gateway, writing answers by hand.
    use super::*;
    use crate::table::Mode;
    use std::io::{BufRead, BufReader, Write};
    use std::net::TcpStream;
    use std::os::fd::OwnedFd;
    use std::os::unix::net::UnixStream;

    const DEADLINE: Duration = Duration::from_secs(20);

    /// A multiplexer on one end of a socketpair, and the other end for the fake gateway. (The
    /// multiplexer only reads, writes and shuts its socket, which a `TcpStream` does on any
    /// stream socket.)
    fn pair() -> (Arc<Inner>, BufReader<UnixStream>, UnixStream) {
        let (a, b) = UnixStream::pair().unwrap();
        let a = Link::Tcp(TcpStream::from(OwnedFd::from(a)));
        let reader = Reader::new(a.try_clone().unwrap());
        b.set_read_timeout(Some(DEADLINE)).unwrap();
        let server = BufReader::new(b.try_clone().unwrap());
        (Inner::new("fake".into(), a, reader), server, b)
    }

    /// The next request line the fake gateway got, without its LF.
    fn request(r: &mut BufReader<UnixStream>) -> String {
        let mut s = String::new();
        r.read_line(&mut s).expect("a request (the deadline passed?)");
        s.trim_end_matches('\n').to_string()
    }

    fn token(reply: Reply) -> u64 {
        match reply {
            Ok(Answer::Granted(g)) => g.token.0,
            other => panic!("not a grant: {other:?}"),
        }
    }

    #[test]
    fn pipelined_answers_out_of_order_reach_their_own_callers() {
        let (inner, mut rd, mut wr) = pair();
        // Three threads, each waiting for its own lock; the gateway answers in reverse order.
        let callers: Vec<_> = (1..=3u64)
            .map(|i| {
                let inner = inner.clone();
                thread::spawn(move || {
                    let reply = inner.call(|l| l.extend_from_slice(format!("LOCK n{i}").as_bytes()));
                    (i, token(reply))
                })
            })
            .collect();
        let mut reqs: Vec<(String, String)> = (0..3)
            .map(|_| {
                let line = request(&mut rd);
                let (tag, rest) = line.split_once(' ').unwrap();
                (tag.to_string(), rest.to_string())
            })
            .collect();
        reqs.sort();
        for (tag, rest) in reqs.iter().rev() {
            // The token tells which name the grant was for: n2 gets 20.
            let n: u64 = rest.strip_prefix("LOCK n").unwrap().parse().unwrap();
            writeln!(wr, "{tag} GRANTED {} 0 EXCLUSIVE", n * 10).unwrap();
        }
        for c in callers {
            let (i, t) = c.join().unwrap();
            assert_eq!(t, i * 10, "caller {i} got another caller's answer");
        }
        // Answers of every kind, sent before anyone waits, wait in their slots.
        let tags: Vec<u64> = (0..3)
            .map(|_| inner.send(Slot::caller(), |l| l.extend_from_slice(b"PING")).unwrap())
            .collect();
        for _ in 0..3 {
            request(&mut rd);
        }
        write!(
            wr,
            "{} ERR BUSY lock is busy\n{} OK\n{} GRANTED 7 1 SHARED\n",
            tags[0], tags[1], tags[2]
        )
        .unwrap();
        match inner.wait(tags[2]) {
            Ok(Answer::Granted(g)) => assert_eq!((g.token.0, g.owner_died, g.mode), (7, true, Mode::Shared)),
            other => panic!("{other:?}"),
        }
        assert!(matches!(inner.wait(tags[0]), Err(Error::WouldBlock)));
        assert!(matches!(inner.wait(tags[1]), Ok(Answer::Done)));
        inner.shut(None);
    }

    #[test]
    fn a_lock_given_up_is_unlocked_when_its_grant_comes_by_the_background_thread() {
        let (inner, mut rd, mut wr) = pair();
        let bg = inner.start(None).unwrap();
        // What a dropped `PendingLock` leaves: nobody waits, and a grant must be given back.
        let tag = inner
            .send(Slot::UnlockOnGrant(b"given/up"[..].into()), |l| {
                l.extend_from_slice(b"LOCK given/up")
            })
            .unwrap();
        assert_eq!(request(&mut rd), format!("{tag} LOCK given/up"));
        writeln!(wr, "{tag} GRANTED 3 0 EXCLUSIVE").unwrap();
        // No caller reads: the background thread does, and unlocks.
        let unlock = request(&mut rd);
        assert!(unlock.ends_with(" UNLOCK given/up"), "{unlock}");
        // A refused request given up needs nothing.
        let tag = inner
            .send(Slot::UnlockOnGrant(b"busy"[..].into()), |l| {
                l.extend_from_slice(b"LOCK busy")
            })
            .unwrap();
        request(&mut rd);
        writeln!(wr, "{tag} ERR TIMEOUT waited_ms=5 timed out").unwrap();
        // The unlock's own answer, and a ping after, to see that nothing else was sent between.
        let ping = inner.send(Slot::caller(), |l| l.extend_from_slice(b"PING")).unwrap();
        assert_eq!(request(&mut rd), format!("{ping} PING"));
        let utag = unlock.split(' ').next().unwrap();
        write!(wr, "{utag} OK\n{ping} PONG\n").unwrap();
        assert!(matches!(inner.wait(ping), Ok(Answer::Done)));
        assert_eq!(lock(&inner.state).orphans, 0);
        inner.shut(Some(bg));
        // The client's goodbye: QUIT, then the end of the stream.
        assert!(request(&mut rd).ends_with(" QUIT"));
        assert_eq!(request(&mut rd), "");
    }

    #[test]
    fn the_connection_closing_fails_every_parked_caller_and_later_requests() {
        let (inner, mut rd, wr) = pair();
        let callers: Vec<_> = (0..3)
            .map(|i| {
                let inner = inner.clone();
                thread::spawn(move || inner.call(|l| l.extend_from_slice(format!("LOCK c{i}").as_bytes())))
            })
            .collect();
        for _ in 0..3 {
            request(&mut rd);
        }
        drop(rd);
        drop(wr);
        for c in callers {
            match c.join().unwrap() {
                Err(Error::Connection { addr, .. }) => assert_eq!(addr, "fake"),
                other => panic!("{other:?}"),
            }
        }
        assert!(matches!(
            inner.call(|l| l.extend_from_slice(b"PING")),
            Err(Error::Connection { .. })
        ));
    }

    #[test]
    fn a_line_without_end_from_the_server_fails_the_callers_within_bounded_memory() {
        let (inner, mut rd, mut wr) = pair();
        let caller = {
            let inner = inner.clone();
            thread::spawn(move || inner.call(|l| l.extend_from_slice(b"PING")))
        };
        request(&mut rd);
        let junk = vec![b'x'; 64 * 1024];
        // More than the longest response line the client takes; the client stops reading (and
        // the writes fail) once it has refused the line.
        for _ in 0..(MAX_RESPONSE_LINE / junk.len() + 2) {
            if wr.write_all(&junk).is_err() {
                break;
            }
        }
        // (A client that took it all would see the end of the stream instead.)
        drop(wr);
        match caller.join().unwrap() {
            Err(Error::Connection { why, .. }) => assert!(why.contains("longer than"), "{why}"),
            other => panic!("{other:?}"),
        }
        // At most the longest line, its CR, and the one read that passed it.
        assert!(lock(&inner.reader).framer.pending().len() <= MAX_RESPONSE_LINE + 1 + 4096);
    }

    #[test]
    fn a_closing_server_line_fails_the_callers_with_its_code() {
        let (inner, mut rd, mut wr) = pair();
        let caller = {
            let inner = inner.clone();
            thread::spawn(move || inner.call(|l| l.extend_from_slice(b"LOCK x")))
        };
        request(&mut rd);
        writeln!(wr, "* ERR SHUTTING_DOWN the server is stopping").unwrap();
        match caller.join().unwrap() {
            Err(Error::Connection { why, .. }) => assert!(why.contains("SHUTTING_DOWN"), "{why}"),
            other => panic!("{other:?}"),
        }
    }
}
