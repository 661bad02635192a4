//! A bare gateway connection that writes protocol lines and reads answers in the calling thread,
//! for what `shmlock::remote::RemoteClient` is not built for: batches of requests sent in one
//! write (`--pipeline`, as redis-benchmark -P does), and thousands of sessions from one process
//! (`connections`), where a client's reader thread each would measure the bench, not the gateway.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;

use anyhow::{bail, Context, Result};
use shmlock::gateway::proto::{self, Response};

/// One session, driven synchronously.
pub(crate) struct RawConn {
    /// The socket, read through the buffer and written directly (one descriptor a session).
    rd: BufReader<TcpStream>,
    out: Vec<u8>,
    line: Vec<u8>,
    next_tag: u64,
}

/// What an answer must be.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Expect {
    Granted,
    Ok,
}

impl RawConn {
    /// Connects and reads the greeting.
    pub(crate) fn connect(addr: &str) -> Result<RawConn> {
        Self::connect_with(addr, 4096)
    }

    /// Connects with a read buffer of `buf` bytes and reads the greeting.
    pub(crate) fn connect_with(addr: &str, buf: usize) -> Result<RawConn> {
        let s = TcpStream::connect(addr).with_context(|| format!("connect to gateway {addr}"))?;
        s.set_nodelay(true)?;
        let mut c = RawConn {
            rd: BufReader::with_capacity(buf, s),
            out: Vec::new(),
            line: Vec::with_capacity(128),
            next_tag: 1,
        };
        c.read_line()?;
        match proto::parse_response(&c.line) {
            Ok(Response::Hello(_)) => Ok(c),
            _ => bail!(
                "gateway {addr} refused the session: {}",
                String::from_utf8_lossy(&c.line).trim_end()
            ),
        }
    }

    fn read_line(&mut self) -> Result<()> {
        self.line.clear();
        if self.rd.read_until(b'\n', &mut self.line)? == 0 {
            bail!("the gateway closed the connection");
        }
        Ok(())
    }

    /// Queues `LOCK name EXCLUSIVE` (not sent until [`RawConn::flush`]).
    pub(crate) fn queue_lock(&mut self, name: &str) {
        let _ = writeln!(self.out, "{} LOCK {name} EXCLUSIVE", self.next_tag);
        self.next_tag += 1;
    }

    /// Queues `UNLOCK name`.
    pub(crate) fn queue_unlock(&mut self, name: &str) {
        let _ = writeln!(self.out, "{} UNLOCK {name}", self.next_tag);
        self.next_tag += 1;
    }

    /// Sends everything queued in one write.
    pub(crate) fn flush(&mut self) -> Result<()> {
        let mut s: &TcpStream = self.rd.get_ref();
        s.write_all(&self.out).context("send to the gateway")?;
        self.out.clear();
        Ok(())
    }

    fn expect(&mut self, want: Expect) -> Result<()> {
        self.read_line()?;
        let ok = matches!(
            (proto::parse_response(&self.line), want),
            (Ok(Response::Granted { .. }), Expect::Granted) | (Ok(Response::Ok { .. }), Expect::Ok)
        );
        if !ok {
            bail!(
                "expected {want:?} from the gateway, got {}",
                String::from_utf8_lossy(&self.line).trim_end()
            );
        }
        Ok(())
    }

    /// Reads one answer, which must grant a lock.
    pub(crate) fn expect_granted(&mut self) -> Result<()> {
        self.expect(Expect::Granted)
    }

    /// Reads one answer, which must be `OK`.
    pub(crate) fn expect_ok(&mut self) -> Result<()> {
        self.expect(Expect::Ok)
    }

    /// `LOCK name` then `UNLOCK name`, each waiting for its answer (two round trips).
    pub(crate) fn pair(&mut self, name: &str) -> Result<()> {
        self.queue_lock(name);
        self.flush()?;
        self.expect_granted()?;
        self.queue_unlock(name);
        self.flush()?;
        self.expect_ok()
    }

    /// Sends `QUIT` and waits for the gateway to close the connection (its locks are free then).
    pub(crate) fn quit(mut self) -> Result<()> {
        let _ = writeln!(self.out, "{} QUIT", self.next_tag);
        self.flush()?;
        loop {
            self.line.clear();
            if self.rd.read_until(b'\n', &mut self.line)? == 0 {
                return Ok(());
            }
        }
    }

    /// `depth` x { LOCK name; UNLOCK name } in one write, then the 2 x depth answers in order
    /// (the gateway answers requests it decides at once in the order they came).
    pub(crate) fn pipelined_pairs(&mut self, name: &str, depth: usize) -> Result<()> {
        for _ in 0..depth {
            self.queue_lock(name);
            self.queue_unlock(name);
        }
        self.flush()?;
        for _ in 0..depth {
            self.expect_granted()?;
            self.expect_ok()?;
        }
        Ok(())
    }
}
