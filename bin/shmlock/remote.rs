//! `--remote HOST:PORT`: `locks` and `status` through shmlockd's gateway.
//!
//! A small line client of its own (one request at a time on a blocking socket, with deadlines):
//! read the greeting, `AUTH` if the gateway asks for it, send `LOCKS` pages or `STATUS CHECK`,
//! read lines up to the response's `END`, and hand them to `shmlock::gateway::admin`, which
//! decodes them into the same snapshots the local commands render. `run --remote` uses
//! `shmlock::remote::RemoteClient` instead (see `exec`).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use shmlock::gateway::admin::{self, CheckReport};
use shmlock::gateway::proto::{self, ErrorCode, Hello, Response};
use shmlock::table::{Cursor, LockInfo};

use crate::render::{CheckOutcome, Status};

/// How long connecting to the gateway may take.
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one response may take to arrive (`STATUS CHECK` walks the whole table).
const READ_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest response line accepted (the gateway's are far shorter).
const MAX_LINE: u64 = 1 << 20;
/// Locks asked for per `LOCKS` page.
const PAGE: u32 = 1000;
/// The environment variable holding the gateway's secret (when no --auth-token-file is given).
pub(crate) const TOKEN_ENV: &str = "SHMLOCK_AUTH_TOKEN";

/// Where the gateway is and how to authenticate: the `--remote` options of a subcommand.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct RemoteArgs {
    /// Ask shmlockd's gateway at HOST:PORT (e.g. 10.0.0.5:7411) instead of opening the segment.
    #[arg(long, value_name = "HOST:PORT")]
    pub(crate) remote: Option<String>,
    /// With --remote: a file whose first line is the gateway's secret [default: $SHMLOCK_AUTH_TOKEN].
    #[arg(long, value_name = "FILE", requires = "remote")]
    pub(crate) auth_token_file: Option<PathBuf>,
}

impl RemoteArgs {
    /// The secret: the first line of --auth-token-file, else `$SHMLOCK_AUTH_TOKEN` if set and
    /// not empty, else none.
    pub(crate) fn token(&self) -> Result<Option<String>> {
        if let Some(path) = &self.auth_token_file {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read the token file {}", path.display()))?;
            let token = text.lines().next().unwrap_or("").trim().to_string();
            if token.is_empty() {
                bail!(
                    "the token file {} is empty (its first line is the secret)",
                    path.display()
                );
            }
            return Ok(Some(token));
        }
        Ok(std::env::var(TOKEN_ENV).ok().filter(|t| !t.is_empty()))
    }
}

/// What to say when the gateway wants a token and none was given.
pub(crate) fn token_needed(addr: &str) -> anyhow::Error {
    anyhow!(
        "the gateway at {addr} requires authentication: give its secret with --auth-token-file FILE \
         or ${TOKEN_ENV}"
    )
}

/// One connection to a gateway, authenticated if it asked.
#[derive(Debug)]
pub(crate) struct Gateway {
    addr: String,
    rd: BufReader<TcpStream>,
    wr: TcpStream,
    hello: Hello,
    next_tag: u64,
}

impl Gateway {
    /// Connects to `addr`, reads the greeting, and sends `AUTH token` if the gateway requires it.
    pub(crate) fn connect(addr: &str, token: Option<&str>) -> Result<Gateway> {
        let addrs: Vec<_> = addr
            .to_socket_addrs()
            .with_context(|| format!("cannot resolve the gateway address {addr} (want HOST:PORT)"))?
            .collect();
        let mut last = None;
        let mut stream = None;
        for a in &addrs {
            match TcpStream::connect_timeout(a, CONNECT_TIMEOUT) {
                Ok(s) => {
                    stream = Some(s);
                    break;
                }
                Err(e) => last = Some(e),
            }
        }
        let Some(stream) = stream else {
            let why = last.map_or("no address".to_string(), |e| e.to_string());
            bail!("cannot connect to the gateway at {addr}: {why} (is shmlockd running there, with its gateway on?)");
        };
        let io = |e: std::io::Error| anyhow!("gateway {addr}: {e}");
        stream.set_read_timeout(Some(READ_TIMEOUT)).map_err(io)?;
        stream.set_write_timeout(Some(READ_TIMEOUT)).map_err(io)?;
        let _ = stream.set_nodelay(true);
        let rd = BufReader::new(stream.try_clone().map_err(io)?);
        let mut gw = Gateway {
            addr: addr.to_string(),
            rd,
            wr: stream,
            hello: Hello::default(),
            next_tag: 1,
        };
        let line = gw.read_line()?;
        gw.hello = match proto::parse_response(&line) {
            Ok(Response::Hello(h)) => h,
            Ok(Response::Error { code_word, message, .. }) => {
                bail!("the gateway at {addr} refused the connection: {code_word} {message}")
            }
            _ => bail!(
                "{addr} does not speak the shmlock protocol (its first line: {:?})",
                String::from_utf8_lossy(proto::trim_eol(&line))
            ),
        };
        if gw.hello.version != proto::VERSION {
            bail!(
                "the gateway at {addr} speaks protocol version {}; this shmlock speaks version {}",
                gw.hello.version,
                proto::VERSION
            );
        }
        if gw.hello.auth_required {
            let token = token.ok_or_else(|| token_needed(addr))?;
            let lines = gw.request(&format!("AUTH {token}"), |_| true)?;
            match lines.last().map(|l| proto::parse_response(l)) {
                Some(Ok(Response::Ok { .. })) => {}
                _ => bail!("the gateway at {addr} gave an unexpected answer to AUTH"),
            }
        }
        Ok(gw)
    }

    /// Reads one line (with its LF); a closed connection or a timeout is an error.
    fn read_line(&mut self) -> Result<Vec<u8>> {
        let mut line = Vec::with_capacity(256);
        let n = (&mut self.rd)
            .take(MAX_LINE)
            .read_until(b'\n', &mut line)
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => anyhow!(
                    "the gateway at {} sent no answer within {}s",
                    self.addr,
                    READ_TIMEOUT.as_secs()
                ),
                _ => anyhow!("gateway {}: {e}", self.addr),
            })?;
        if n == 0 {
            bail!("the gateway at {} closed the connection", self.addr);
        }
        if !line.ends_with(b"\n") {
            bail!("the gateway at {} sent a line longer than {MAX_LINE} bytes", self.addr);
        }
        Ok(line)
    }

    /// Sends `rest` under a new tag and returns that tag's lines up to the one `last` accepts,
    /// or up to an `ERR` line, which becomes the error.
    fn request(&mut self, rest: &str, last: impl Fn(&[u8]) -> bool) -> Result<Vec<Vec<u8>>> {
        let tag = format!("c{}", self.next_tag);
        self.next_tag += 1;
        let line = format!("{tag} {rest}\n");
        if self.hello.max_line > 0 && line.len() - 1 > self.hello.max_line {
            bail!(
                "the request is longer than the gateway at {} accepts ({} bytes)",
                self.addr,
                self.hello.max_line
            );
        }
        self.wr
            .write_all(line.as_bytes())
            .map_err(|e| anyhow!("gateway {}: send failed: {e}", self.addr))?;
        let mut lines = Vec::new();
        loop {
            let line = self.read_line()?;
            let first = line.split(|&b| b == b' ').next().unwrap_or(b"");
            if first == proto::SERVER_TAG.as_bytes() || first == tag.as_bytes() {
                if let Ok(Response::Error {
                    code,
                    code_word,
                    message,
                    ..
                }) = proto::parse_response(&line)
                {
                    return Err(self.refused(rest, code, code_word, message));
                }
            }
            if first != tag.as_bytes() {
                continue;
            }
            let done = last(&line);
            lines.push(line);
            if done {
                return Ok(lines);
            }
        }
    }

    /// The error for an `ERR` answer to `rest`.
    fn refused(&self, rest: &str, code: Option<ErrorCode>, code_word: &str, message: &str) -> anyhow::Error {
        let addr = &self.addr;
        let verb = rest.split(' ').next().unwrap_or(rest);
        match code {
            Some(ErrorCode::AuthFailed) => anyhow!("the gateway at {addr} refused the token: {message}"),
            Some(ErrorCode::AuthRequired) => token_needed(addr),
            Some(ErrorCode::UnknownCommand) => {
                anyhow!("the gateway at {addr} does not serve {verb} (a shmlockd older than this shmlock?)")
            }
            _ => anyhow!("the gateway at {addr} answered {verb} with {code_word}: {message}"),
        }
    }

    /// Every lock held or waited on whose name starts with `prefix`, page by page (each page
    /// starts after the cursor the previous one ended with, so every lock held throughout comes
    /// once; the walk ends, since each cursor lies beyond the last).
    pub(crate) fn locks(&mut self, prefix: Option<&[u8]>) -> Result<Vec<LockInfo>> {
        let mut all = Vec::new();
        let mut after: Option<Cursor> = None;
        loop {
            let mut req = Vec::from(&b"LOCKS"[..]);
            if let Some(p) = prefix {
                req.extend_from_slice(b" PREFIX ");
                proto::encode_word(&mut req, p);
            }
            if let Some(a) = &after {
                req.extend_from_slice(format!(" AFTER {a}").as_bytes());
            }
            req.extend_from_slice(format!(" LIMIT {PAGE}").as_bytes());
            // Escaped words are ASCII.
            let req = String::from_utf8_lossy(&req).into_owned();
            let lines = self.request(&req, admin::ends_response)?;
            let page = admin::parse_locks(lines.iter().map(Vec::as_slice))
                .map_err(|e| anyhow!("the gateway at {} sent a bad LOCKS answer: {e}", self.addr))?;
            all.extend(page.locks);
            match page.next {
                Some(next) if after.is_some_and(|a| next <= a) => {
                    bail!(
                        "the gateway at {} sent a LOCKS cursor that does not move on ({next})",
                        self.addr
                    )
                }
                Some(next) => after = Some(next),
                None => return Ok(all),
            }
        }
    }

    /// `STATUS CHECK`, as the local `status` shows it.
    pub(crate) fn status(&mut self) -> Result<Status> {
        let lines = self.request("STATUS CHECK", admin::ends_response)?;
        let (report, check) = admin::parse_status(lines.iter().map(Vec::as_slice))
            .map_err(|e| anyhow!("the gateway at {} sent a bad STATUS answer: {e}", self.addr))?;
        let check = match check {
            CheckReport::Skipped => CheckOutcome::NotRun("the gateway did not run it"),
            CheckReport::Consistent => CheckOutcome::Consistent,
            CheckReport::Violations { total, mut shown } => {
                let more = total.saturating_sub(shown.len() as u64);
                if more > 0 {
                    shown.push(format!(
                        "... and {more} more (the gateway sends the first {})",
                        admin::MAX_VIOLATIONS
                    ));
                }
                CheckOutcome::Violations(shown)
            }
        };
        Ok(Status::new(report, check))
    }
}
