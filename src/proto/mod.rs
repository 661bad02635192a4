//! The gateway's wire protocol, sans I/O: parse request and response lines, encode them, and
//! map library errors to error codes and back ([`code_of`], [`error_of`]).
//!
//! `docs/PROTOCOL.md` is the specification; this module is its executable form, shared by the
//! gateway (requests in, responses out) and [`crate::remote`] (the other way round). It does no
//! I/O and needs no async runtime. Parsing borrows from the line and never panics, whatever the
//! bytes.

use std::fmt;
use std::io::Write as _;
use std::time::Duration;

use crate::table::{Cursor, Mode};

pub mod admin;
mod errors;
pub mod framer;
pub use errors::{code_of, encode_error_for, error_of};

/// Protocol version sent in the greeting.
pub const VERSION: u32 = 1;
/// Longest tag in bytes.
pub const MAX_TAG: usize = 32;
/// Longest `TIMEOUT` in milliseconds (one day).
pub const MAX_TIMEOUT_MS: u64 = 86_400_000;
/// The tag of lines that answer no request.
pub const SERVER_TAG: &str = "*";
/// Most locks one `LOCKS` response lists (its `LIMIT`).
pub const MAX_LOCKS_LIMIT: u32 = 10_000;
/// Locks one `LOCKS` response lists when it gives no `LIMIT`.
pub const DEFAULT_LOCKS_LIMIT: u32 = 1_000;

/// The stable error codes of the protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorCode {
    /// The first word is not a valid tag.
    BadTag,
    /// Missing, extra or malformed arguments.
    BadRequest,
    /// Not a known command.
    UnknownCommand,
    /// The name is too long.
    BadName,
    /// Authenticate first.
    AuthRequired,
    /// Wrong secret (closes).
    AuthFailed,
    /// Try-lock: held in a conflicting mode.
    Busy,
    /// A timed lock gave up.
    Timeout,
    /// The session holds the name already.
    AlreadyHeld,
    /// The session waits for the name already.
    AlreadyWaiting,
    /// Unlock of a name not held.
    NotHeld,
    /// A request with this tag is still waiting.
    TagInUse,
    /// Per-session lock limit.
    TooManyLocks,
    /// Per-session wait limit.
    TooManyWaits,
    /// Server-wide wait limit.
    ServerBusy,
    /// The lock table is full.
    TableFull,
    /// The wait was cancelled.
    Cancelled,
    /// Anything else.
    Internal,
    /// Line too long (closes).
    LineTooLong,
    /// Binary garbage (closes).
    Binary,
    /// Connection limit (closes).
    TooManyConnections,
    /// Idle timeout (closes).
    IdleTimeout,
    /// Server stopping (closes).
    ShuttingDown,
    /// No `AUTH` within the gateway's `auth_timeout` (closes).
    AuthTimeout,
    /// A line not completed within the gateway's `line_timeout` (closes).
    LineTimeout,
    /// The peer does not read its answers (closes, usually unseen).
    SlowReader,
}

const CODES: [(ErrorCode, &str); 26] = [
    (ErrorCode::BadTag, "BAD_TAG"),
    (ErrorCode::BadRequest, "BAD_REQUEST"),
    (ErrorCode::UnknownCommand, "UNKNOWN_COMMAND"),
    (ErrorCode::BadName, "BAD_NAME"),
    (ErrorCode::AuthRequired, "AUTH_REQUIRED"),
    (ErrorCode::AuthFailed, "AUTH_FAILED"),
    (ErrorCode::Busy, "BUSY"),
    (ErrorCode::Timeout, "TIMEOUT"),
    (ErrorCode::AlreadyHeld, "ALREADY_HELD"),
    (ErrorCode::AlreadyWaiting, "ALREADY_WAITING"),
    (ErrorCode::NotHeld, "NOT_HELD"),
    (ErrorCode::TagInUse, "TAG_IN_USE"),
    (ErrorCode::TooManyLocks, "TOO_MANY_LOCKS"),
    (ErrorCode::TooManyWaits, "TOO_MANY_WAITS"),
    (ErrorCode::ServerBusy, "SERVER_BUSY"),
    (ErrorCode::TableFull, "TABLE_FULL"),
    (ErrorCode::Cancelled, "CANCELLED"),
    (ErrorCode::Internal, "INTERNAL"),
    (ErrorCode::LineTooLong, "LINE_TOO_LONG"),
    (ErrorCode::Binary, "BINARY"),
    (ErrorCode::TooManyConnections, "TOO_MANY_CONNECTIONS"),
    (ErrorCode::IdleTimeout, "IDLE_TIMEOUT"),
    (ErrorCode::ShuttingDown, "SHUTTING_DOWN"),
    (ErrorCode::AuthTimeout, "AUTH_TIMEOUT"),
    (ErrorCode::LineTimeout, "LINE_TIMEOUT"),
    (ErrorCode::SlowReader, "SLOW_READER"),
];

impl ErrorCode {
    /// The code as sent on the wire.
    pub fn as_str(self) -> &'static str {
        CODES.iter().find(|(c, _)| *c == self).map_or("INTERNAL", |(_, s)| s)
    }

    /// The code named `s`, if it is one.
    pub fn parse(s: &str) -> Option<ErrorCode> {
        CODES.iter().find(|(_, n)| *n == s).map(|(c, _)| *c)
    }

    /// Whether the server closes the connection after sending this code.
    pub fn closes(self) -> bool {
        matches!(
            self,
            ErrorCode::AuthFailed
                | ErrorCode::LineTooLong
                | ErrorCode::Binary
                | ErrorCode::TooManyConnections
                | ErrorCode::IdleTimeout
                | ErrorCode::ShuttingDown
                | ErrorCode::AuthTimeout
                | ErrorCode::LineTimeout
                | ErrorCode::SlowReader
        )
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A request's command and arguments.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command<'a> {
    /// `LOCK NAME [mode] [TIMEOUT ms]`; `timeout` None waits forever.
    Lock {
        /// The name.
        name: &'a [u8],
        /// The mode.
        mode: Mode,
        /// The longest wait.
        timeout: Option<Duration>,
    },
    /// `TRY NAME [mode]`.
    Try {
        /// The name.
        name: &'a [u8],
        /// The mode.
        mode: Mode,
    },
    /// `UNLOCK NAME`.
    Unlock {
        /// The name.
        name: &'a [u8],
    },
    /// `PING ...`.
    Ping,
    /// `AUTH SECRET`.
    Auth {
        /// The secret.
        secret: &'a [u8],
    },
    /// `QUIT`.
    Quit,
    /// `LOCKS [PREFIX P] [AFTER CURSOR] [LIMIT N]`: a page of the locks held or waited on.
    Locks(LocksQuery<'a>),
    /// `STATUS [CHECK]`: capacities, pool counts, counters; with `check`, the invariant check.
    Status {
        /// Run the table's invariant check (a walk of every shard) too.
        check: bool,
    },
}

/// The arguments of `LOCKS`. `prefix` is the word as sent: escaped ([`decode_word`]), already
/// checked to decode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LocksQuery<'a> {
    /// Only names starting with these bytes (escaped).
    pub prefix: Option<&'a [u8]>,
    /// Start after this slot of the table (`<shard>.<entry>`): the `NEXT` of the previous page.
    pub after: Option<Cursor>,
    /// At most this many locks (1..=[`MAX_LOCKS_LIMIT`]); None: [`DEFAULT_LOCKS_LIMIT`].
    pub limit: Option<u32>,
}

/// A parsed request line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request<'a> {
    /// The client's tag.
    pub tag: &'a str,
    /// What it asks.
    pub command: Command<'a>,
}

/// Why a request line was refused; answered with `tag ERR code message`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError<'a> {
    /// The tag to answer with ([`SERVER_TAG`] if it could not be read).
    pub tag: &'a str,
    /// The code.
    pub code: ErrorCode,
    /// The message.
    pub message: String,
}

/// True for bytes allowed in a tag.
fn tag_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-')
}

/// Checks a tag: 1..=[`MAX_TAG`] bytes of `A-Z a-z 0-9 . _ : -`.
pub fn valid_tag(tag: &[u8]) -> bool {
    (1..=MAX_TAG).contains(&tag.len()) && tag.iter().all(|&b| tag_byte(b))
}

/// Strips the line's LF and the one CR right before it, if it ends with LF; a line without its
/// LF (as [`framer`] gives them) is left as it is.
pub fn trim_eol(line: &[u8]) -> &[u8] {
    match line.strip_suffix(b"\n") {
        Some(l) => l.strip_suffix(b"\r").unwrap_or(l),
        None => line,
    }
}

/// True if `line` (without its end of line) holds a control byte.
pub fn has_control(line: &[u8]) -> bool {
    line.iter().any(|&b| b < 0x20 || b == 0x7f)
}

fn words(line: &[u8]) -> impl Iterator<Item = &[u8]> {
    line.split(|&b| b == b' ').filter(|w| !w.is_empty())
}

fn lossy(b: &[u8]) -> String {
    const SHOW: usize = 40;
    let s = String::from_utf8_lossy(&b[..b.len().min(SHOW)]);
    if b.len() > SHOW {
        format!("{s}...")
    } else {
        s.into_owned()
    }
}

/// Parses one request line: as the [`framer`] gives it, or with its LF (and the one CR before
/// it). `Ok(None)` for a blank line.
pub fn parse_request(line: &[u8]) -> Result<Option<Request<'_>>, ParseError<'_>> {
    let line = trim_eol(line);
    let mut it = words(line);
    let Some(tag) = it.next() else { return Ok(None) };
    fn err(tag: &str, code: ErrorCode, message: String) -> ParseError<'_> {
        ParseError { tag, code, message }
    }
    if !valid_tag(tag) {
        return Err(err(
            SERVER_TAG,
            ErrorCode::BadTag,
            "tags are 1..=32 of A-Z a-z 0-9 . _ : -".into(),
        ));
    }
    // Tag bytes are ASCII, checked above.
    let tag = std::str::from_utf8(tag).unwrap_or(SERVER_TAG);
    if has_control(line) {
        return Err(err(tag, ErrorCode::BadRequest, "control byte in request".into()));
    }
    let bad = |m: String| err(tag, ErrorCode::BadRequest, m);
    let Some(verb) = it.next() else {
        return Err(bad("missing command".into()));
    };
    let mut name = || it.next().ok_or_else(|| bad("missing name".into()));
    let command = if verb.eq_ignore_ascii_case(b"LOCK") || verb.eq_ignore_ascii_case(b"TRY") {
        let is_lock = verb.eq_ignore_ascii_case(b"LOCK");
        let name = name()?;
        let (mut mode, mut timeout) = (None, None);
        while let Some(opt) = it.next() {
            if opt.eq_ignore_ascii_case(b"SHARED") || opt.eq_ignore_ascii_case(b"EXCLUSIVE") {
                if mode.is_some() {
                    return Err(bad("mode given twice".into()));
                }
                mode = Some(if opt.eq_ignore_ascii_case(b"SHARED") {
                    Mode::Shared
                } else {
                    Mode::Exclusive
                });
            } else if is_lock && opt.eq_ignore_ascii_case(b"TIMEOUT") {
                if timeout.is_some() {
                    return Err(bad("TIMEOUT given twice".into()));
                }
                let v = it.next().unwrap_or(b"");
                let ms = std::str::from_utf8(v)
                    .ok()
                    .filter(|s| s.bytes().all(|b| b.is_ascii_digit()))
                    .and_then(|s| s.parse::<u64>().ok())
                    .filter(|&ms| ms <= MAX_TIMEOUT_MS)
                    .ok_or_else(|| {
                        bad(format!(
                            "TIMEOUT wants milliseconds 0..={MAX_TIMEOUT_MS}, got {}",
                            lossy(v)
                        ))
                    })?;
                timeout = Some(Duration::from_millis(ms));
            } else {
                return Err(bad(format!("unknown option {}", lossy(opt))));
            }
        }
        let mode = mode.unwrap_or(Mode::Exclusive);
        if is_lock {
            Command::Lock { name, mode, timeout }
        } else {
            Command::Try { name, mode }
        }
    } else if verb.eq_ignore_ascii_case(b"UNLOCK") {
        Command::Unlock { name: name()? }
    } else if verb.eq_ignore_ascii_case(b"AUTH") {
        let secret = it.next().ok_or_else(|| bad("missing secret".into()))?;
        Command::Auth { secret }
    } else if verb.eq_ignore_ascii_case(b"LOCKS") {
        let mut q = LocksQuery::default();
        while let Some(opt) = it.next() {
            let upper = opt.to_ascii_uppercase();
            match upper.as_slice() {
                b"PREFIX" => {
                    if q.prefix.is_some() {
                        return Err(bad("PREFIX given twice".into()));
                    }
                    let v = it.next().ok_or_else(|| bad("PREFIX wants a name".into()))?;
                    if decode_word(v).is_none() {
                        return Err(bad(format!("PREFIX: bad %-escape in {}", lossy(v))));
                    }
                    q.prefix = Some(v);
                }
                b"AFTER" => {
                    if q.after.is_some() {
                        return Err(bad("AFTER given twice".into()));
                    }
                    let v = it.next().unwrap_or(b"");
                    let c = Cursor::parse(v).ok_or_else(|| {
                        bad(format!(
                            "AFTER wants a cursor SHARD.ENTRY (the NEXT of an END line), got {}",
                            lossy(v)
                        ))
                    })?;
                    q.after = Some(c);
                }
                b"LIMIT" => {
                    if q.limit.is_some() {
                        return Err(bad("LIMIT given twice".into()));
                    }
                    let v = it.next().unwrap_or(b"");
                    let n = std::str::from_utf8(v)
                        .ok()
                        .filter(|s| s.bytes().all(|b| b.is_ascii_digit()))
                        .and_then(|s| s.parse::<u32>().ok())
                        .filter(|n| (1..=MAX_LOCKS_LIMIT).contains(n))
                        .ok_or_else(|| bad(format!("LIMIT wants 1..={MAX_LOCKS_LIMIT}, got {}", lossy(v))))?;
                    q.limit = Some(n);
                }
                _ => return Err(bad(format!("unknown option {}", lossy(opt)))),
            }
        }
        Command::Locks(q)
    } else if verb.eq_ignore_ascii_case(b"STATUS") {
        let check = match it.next() {
            None => false,
            Some(w) if w.eq_ignore_ascii_case(b"CHECK") => true,
            Some(w) => return Err(bad(format!("unknown option {}", lossy(w)))),
        };
        Command::Status { check }
    } else if verb.eq_ignore_ascii_case(b"PING") {
        return Ok(Some(Request {
            tag,
            command: Command::Ping,
        }));
    } else if verb.eq_ignore_ascii_case(b"QUIT") {
        Command::Quit
    } else {
        return Err(err(
            tag,
            ErrorCode::UnknownCommand,
            format!("unknown command {}", lossy(verb)),
        ));
    };
    if let Some(extra) = it.next() {
        return Err(bad(format!("unexpected argument {}", lossy(extra))));
    }
    Ok(Some(Request { tag, command }))
}

/// The word for a mode.
pub fn mode_word(mode: Mode) -> &'static str {
    match mode {
        Mode::Exclusive => "EXCLUSIVE",
        Mode::Shared => "SHARED",
    }
}

/// Appends `bytes` as one word of an admin response (`LOCKS`, `STATUS`): every byte outside
/// `!`..=`~` (0x21..=0x7E), and `%` itself, becomes `%XX` (two upper-case hex digits), so the
/// word is printable ASCII and holds no space; the empty string is `-`, and the one-byte string
/// `-` is `%2D`.
pub fn encode_word(out: &mut Vec<u8>, bytes: &[u8]) {
    if bytes.is_empty() {
        out.push(b'-');
        return;
    }
    if bytes == b"-" {
        out.extend_from_slice(b"%2D");
        return;
    }
    for &b in bytes {
        if (0x21..=0x7e).contains(&b) && b != b'%' {
            out.push(b);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
}

/// Decodes a word escaped as [`encode_word`] does: `%XX` (hex, either case) is that byte, `-`
/// alone is the empty string, any other byte is itself (so a name without `%` may be sent as it
/// is). None if a `%` is not followed by two hex digits.
pub fn decode_word(word: &[u8]) -> Option<Vec<u8>> {
    if word == b"-" {
        return Some(Vec::new());
    }
    let mut out = Vec::with_capacity(word.len());
    let mut i = 0;
    while i < word.len() {
        if word[i] == b'%' {
            let hex = word.get(i + 1..i + 3)?;
            let hex = std::str::from_utf8(hex).ok()?;
            if !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                return None;
            }
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(word[i]);
            i += 1;
        }
    }
    Some(out)
}

/// Appends `tag GRANTED token died mode\n`.
pub fn encode_granted(out: &mut Vec<u8>, tag: &str, token: u64, owner_died: bool, mode: Mode) {
    let _ = writeln!(
        out,
        "{tag} GRANTED {token} {} {}",
        u8::from(owner_died),
        mode_word(mode)
    );
}

/// Appends `tag word\n` (`OK`, `PONG`, `BYE`).
pub fn encode_simple(out: &mut Vec<u8>, tag: &str, word: &str) {
    let _ = writeln!(out, "{tag} {word}");
}

/// Appends `tag ERR code message\n`; control bytes in the message become spaces so the line
/// stays one line.
pub fn encode_error(out: &mut Vec<u8>, tag: &str, code: ErrorCode, message: &str) {
    let _ = write!(out, "{tag} ERR {code} ");
    out.extend(message.bytes().map(|b| if b < 0x20 || b == 0x7f { b' ' } else { b }));
    out.push(b'\n');
}

/// What the server's greeting says.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Hello {
    /// Protocol version.
    pub version: u32,
    /// Whether `AUTH` is required.
    pub auth_required: bool,
    /// Idle timeout; None if there is none.
    pub idle_timeout: Option<Duration>,
    /// Longest line.
    pub max_line: usize,
    /// Longest name.
    pub max_name: usize,
    /// Names a session may hold or wait for.
    pub max_locks: usize,
    /// Waits a session may have.
    pub max_waits: usize,
}

/// Appends the greeting line.
pub fn encode_hello(out: &mut Vec<u8>, h: &Hello) {
    let _ = writeln!(
        out,
        "* HELLO shmlock {} auth={} idle_timeout_ms={} max_line={} max_name={} max_locks={} max_waits={}",
        h.version,
        if h.auth_required { "required" } else { "none" },
        h.idle_timeout.map_or(0, |d| d.as_millis()),
        h.max_line,
        h.max_name,
        h.max_locks,
        h.max_waits
    );
}

/// A parsed response line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Response<'a> {
    /// `tag GRANTED token died mode`.
    Granted {
        /// The tag.
        tag: &'a str,
        /// Fencing token.
        token: u64,
        /// Owner-died flag.
        owner_died: bool,
        /// Mode granted.
        mode: Mode,
    },
    /// `tag OK`.
    Ok {
        /// The tag.
        tag: &'a str,
    },
    /// `tag PONG`.
    Pong {
        /// The tag.
        tag: &'a str,
    },
    /// `tag BYE`.
    Bye {
        /// The tag.
        tag: &'a str,
    },
    /// `tag ERR code message`.
    Error {
        /// The tag ([`SERVER_TAG`] for server lines).
        tag: &'a str,
        /// The code; None for a code this version does not know.
        code: Option<ErrorCode>,
        /// The code as sent.
        code_word: &'a str,
        /// The message.
        message: &'a str,
    },
    /// `* HELLO ...`.
    Hello(Hello),
}

/// Parses one response line (with or without its LF). Unknown `key=value` words in the greeting
/// are ignored; anything else unexpected is an error naming the line.
pub fn parse_response(line: &[u8]) -> Result<Response<'_>, String> {
    let line = trim_eol(line);
    let text = std::str::from_utf8(line).map_err(|_| format!("response is not UTF-8: {}", lossy(line)))?;
    let bad = || format!("malformed response: {}", lossy(line));
    let mut it = text.split(' ').filter(|w| !w.is_empty());
    let tag = it.next().ok_or_else(bad)?;
    let status = it.next().ok_or_else(bad)?;
    let resp = match status {
        "GRANTED" => {
            let token = it.next().and_then(|t| t.parse().ok()).ok_or_else(bad)?;
            let owner_died = match it.next() {
                Some("0") => false,
                Some("1") => true,
                _ => return Err(bad()),
            };
            let mode = match it.next() {
                Some("EXCLUSIVE") => Mode::Exclusive,
                Some("SHARED") => Mode::Shared,
                _ => return Err(bad()),
            };
            Response::Granted {
                tag,
                token,
                owner_died,
                mode,
            }
        }
        "OK" => Response::Ok { tag },
        "PONG" => Response::Pong { tag },
        "BYE" => Response::Bye { tag },
        "ERR" => {
            let code_word = it.next().ok_or_else(bad)?;
            // The message is the rest of the line after the code word.
            let start = text.find(" ERR ").map_or(text.len(), |i| i + 5);
            let rest = text[start..].trim_start_matches(' ');
            let message = rest.strip_prefix(code_word).unwrap_or("").trim_start_matches(' ');
            return Ok(Response::Error {
                tag,
                code: ErrorCode::parse(code_word),
                code_word,
                message,
            });
        }
        "HELLO" if tag == SERVER_TAG => {
            if it.next() != Some("shmlock") {
                return Err(bad());
            }
            let mut h = Hello {
                version: it.next().and_then(|v| v.parse().ok()).ok_or_else(bad)?,
                ..Hello::default()
            };
            for kv in it {
                let Some((k, v)) = kv.split_once('=') else { continue };
                let n = v.parse::<u64>().ok();
                match (k, n) {
                    ("auth", _) => h.auth_required = v == "required",
                    ("idle_timeout_ms", Some(ms)) => {
                        h.idle_timeout = (ms > 0).then(|| Duration::from_millis(ms));
                    }
                    ("max_line", Some(n)) => h.max_line = n as usize,
                    ("max_name", Some(n)) => h.max_name = n as usize,
                    ("max_locks", Some(n)) => h.max_locks = n as usize,
                    ("max_waits", Some(n)) => h.max_waits = n as usize,
                    _ => {}
                }
            }
            return Ok(Response::Hello(h));
        }
        _ => return Err(bad()),
    };
    if it.next().is_some() {
        return Err(bad());
    }
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ok(line: &str) -> Command<'_> {
        parse_request(line.as_bytes()).unwrap().unwrap().command
    }

    fn err(line: &str) -> (String, ErrorCode, String) {
        let e = parse_request(line.as_bytes()).unwrap_err();
        (e.tag.to_string(), e.code, e.message)
    }

    #[test]
    fn requests_parse() {
        assert_eq!(
            ok("1 LOCK a\r\n"),
            Command::Lock {
                name: b"a",
                mode: Mode::Exclusive,
                timeout: None
            }
        );
        assert_eq!(
            ok("  t:1  lock  a/b  timeout 250  shared "),
            Command::Lock {
                name: b"a/b",
                mode: Mode::Shared,
                timeout: Some(Duration::from_millis(250))
            }
        );
        assert_eq!(
            ok("x TRY n SHARED"),
            Command::Try {
                name: b"n",
                mode: Mode::Shared
            }
        );
        assert_eq!(ok("x unlock n\n"), Command::Unlock { name: b"n" });
        assert_eq!(ok("x PING whatever you like"), Command::Ping);
        assert_eq!(ok("x AUTH s3cret"), Command::Auth { secret: b"s3cret" });
        assert_eq!(ok("x QUIT"), Command::Quit);
        assert_eq!(ok("x LOCKS"), Command::Locks(LocksQuery::default()));
        assert_eq!(
            ok("x locks limit 5 after 3.17 PREFIX orders/"),
            Command::Locks(LocksQuery {
                prefix: Some(b"orders/"),
                after: Some(Cursor { shard: 3, entry: 17 }),
                limit: Some(5)
            })
        );
        assert_eq!(ok("x STATUS"), Command::Status { check: false });
        assert_eq!(ok("x status check"), Command::Status { check: true });
        assert_eq!(parse_request(b"   \r\n").unwrap(), None);
        assert_eq!(parse_request(b"").unwrap(), None);
        let r = parse_request("é-tag LOCK é".as_bytes());
        assert_eq!(r.unwrap_err().code, ErrorCode::BadTag);
        assert_eq!(
            ok("1 LOCK é"),
            Command::Lock {
                name: "é".as_bytes(),
                mode: Mode::Exclusive,
                timeout: None
            }
        );
    }

    #[test]
    fn bad_requests_name_what_is_wrong() {
        assert_eq!(err("!!! LOCK x").1, ErrorCode::BadTag);
        assert_eq!(err("!!! LOCK x").0, "*");
        assert_eq!(err(&"t".repeat(33)).1, ErrorCode::BadTag);
        assert_eq!(
            err("hello"),
            ("hello".into(), ErrorCode::BadRequest, "missing command".into())
        );
        assert_eq!(err("7 FROB x").1, ErrorCode::UnknownCommand);
        assert_eq!(err("8 LOCK x SIDEWAYS").2, "unknown option SIDEWAYS");
        assert!(err("9 LOCK x TIMEOUT soon").2.contains("got soon"));
        assert!(err("9 LOCK x TIMEOUT").2.contains("TIMEOUT wants"));
        assert!(err("9 LOCK x TIMEOUT 86400001").2.contains("TIMEOUT wants"));
        assert!(err("9 LOCK x TIMEOUT -1").2.contains("TIMEOUT wants"));
        assert!(err("9 LOCK x TIMEOUT +5").2.contains("TIMEOUT wants"));
        assert_eq!(err("9 LOCK x TIMEOUT 1 TIMEOUT 2").2, "TIMEOUT given twice");
        assert_eq!(err("9 LOCK x SHARED EXCLUSIVE").2, "mode given twice");
        assert_eq!(err("9 TRY x TIMEOUT 5").2, "unknown option TIMEOUT");
        assert_eq!(err("9 LOCK").2, "missing name");
        assert_eq!(err("9 UNLOCK a b").2, "unexpected argument b");
        assert_eq!(err("9 QUIT now").2, "unexpected argument now");
        assert_eq!(err("9 AUTH").2, "missing secret");
        assert_eq!(err("9 LOCK a\tb").2, "control byte in request");
        assert_eq!(err("9 LOCK a\x00").1, ErrorCode::BadRequest);
        assert_eq!(err("9 LOCKS LIMIT 0").2, "LIMIT wants 1..=10000, got 0");
        assert!(err("9 LOCKS LIMIT 10001").2.starts_with("LIMIT wants"));
        assert!(err("9 LOCKS LIMIT").2.starts_with("LIMIT wants"));
        assert_eq!(err("9 LOCKS LIMIT 1 LIMIT 2").2, "LIMIT given twice");
        assert_eq!(err("9 LOCKS PREFIX a PREFIX b").2, "PREFIX given twice");
        assert!(err("9 LOCKS AFTER").2.starts_with("AFTER wants a cursor"));
        assert!(err("9 LOCKS AFTER orders/9").2.starts_with("AFTER wants a cursor"));
        assert_eq!(err("9 LOCKS AFTER 1.2 AFTER 1.3").2, "AFTER given twice");
        assert_eq!(err("9 LOCKS PREFIX a%zz").2, "PREFIX: bad %-escape in a%zz");
        assert_eq!(err("9 LOCKS SIDEWAYS").2, "unknown option SIDEWAYS");
        assert_eq!(err("9 STATUS NOW").2, "unknown option NOW");
        assert_eq!(err("9 STATUS CHECK CHECK").2, "unexpected argument CHECK");
    }

    #[test]
    fn words_escape_unambiguously() {
        let enc = |b: &[u8]| {
            let mut v = Vec::new();
            encode_word(&mut v, b);
            String::from_utf8(v).unwrap()
        };
        assert_eq!(enc(b"orders/42"), "orders/42");
        assert_eq!(enc(b"a b%c\n"), "a%20b%25c%0A");
        assert_eq!(enc("é".as_bytes()), "%C3%A9");
        assert_eq!(enc(b""), "-");
        assert_eq!(enc(b"-"), "%2D");
        assert_eq!(enc(b"--"), "--");
        assert_eq!(decode_word(b"a%20b%25c%0a").unwrap(), b"a b%c\n");
        assert_eq!(decode_word("é".as_bytes()).unwrap(), "é".as_bytes());
        assert_eq!(decode_word(b"-").unwrap(), b"");
        for bad in [&b"%"[..], b"%2", b"a%g0", b"%\xff\xff"] {
            assert_eq!(decode_word(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn codes_round_trip_and_are_distinct() {
        for (c, s) in CODES {
            assert_eq!(c.as_str(), s);
            assert_eq!(ErrorCode::parse(s), Some(c));
        }
        let mut names: Vec<_> = CODES.iter().map(|(_, s)| s).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), CODES.len());
        assert_eq!(ErrorCode::parse("NOPE"), None);
    }

    #[test]
    fn responses_round_trip() {
        let mut out = Vec::new();
        encode_granted(&mut out, "a1", 17, true, Mode::Shared);
        encode_simple(&mut out, "b", "OK");
        encode_simple(&mut out, "c", "PONG");
        encode_simple(&mut out, "d", "BYE");
        encode_error(&mut out, "e", ErrorCode::Timeout, "timed out\nafter 5ms");
        let hello = Hello {
            version: 1,
            auth_required: true,
            idle_timeout: Some(Duration::from_millis(1500)),
            max_line: 512,
            max_name: 64,
            max_locks: 10,
            max_waits: 3,
        };
        encode_hello(&mut out, &hello);
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<_> = text.lines().collect();
        assert_eq!(lines.len(), 6);
        assert_eq!(lines[0], "a1 GRANTED 17 1 SHARED");
        assert_eq!(
            parse_response(lines[0].as_bytes()).unwrap(),
            Response::Granted {
                tag: "a1",
                token: 17,
                owner_died: true,
                mode: Mode::Shared
            }
        );
        assert_eq!(parse_response(lines[1].as_bytes()).unwrap(), Response::Ok { tag: "b" });
        assert_eq!(
            parse_response(lines[2].as_bytes()).unwrap(),
            Response::Pong { tag: "c" }
        );
        assert_eq!(parse_response(lines[3].as_bytes()).unwrap(), Response::Bye { tag: "d" });
        assert_eq!(
            parse_response(lines[4].as_bytes()).unwrap(),
            Response::Error {
                tag: "e",
                code: Some(ErrorCode::Timeout),
                code_word: "TIMEOUT",
                message: "timed out after 5ms"
            }
        );
        assert_eq!(parse_response(lines[5].as_bytes()).unwrap(), Response::Hello(hello));
        assert!(parse_response(b"x GRANTED 1 2 SHARED").is_err());
        assert!(parse_response(b"x OK extra").is_err());
        assert!(parse_response(b"x").is_err());
        assert!(parse_response(b"x HELLO shmlock 1").is_err());
        assert!(matches!(
            parse_response(b"* ERR SOMETHING_NEW text"),
            Ok(Response::Error {
                code: None,
                code_word: "SOMETHING_NEW",
                ..
            })
        ));
    }

    fn word() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("LOCK".to_string()),
            Just("try".to_string()),
            Just("UNLOCK".to_string()),
            Just("PING".to_string()),
            Just("AUTH".to_string()),
            Just("QUIT".to_string()),
            Just("LOCKS".to_string()),
            Just("status".to_string()),
            Just("PREFIX".to_string()),
            Just("after".to_string()),
            Just("LIMIT".to_string()),
            Just("CHECK".to_string()),
            Just("a%2Fb".to_string()),
            Just("12.345".to_string()),
            Just("a%zz".to_string()),
            Just("SHARED".to_string()),
            Just("exclusive".to_string()),
            Just("TIMEOUT".to_string()),
            "[0-9]{1,12}",
            "[a-z/]{1,8}",
            "[^\\s\\p{C}]{1,6}",
        ]
    }

    proptest! {
        /// Arbitrary bytes never panic the parser, and whatever it accepts re-encodes to an
        /// equivalent request.
        #[test]
        fn parser_never_panics_on_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = parse_request(&bytes);
            let _ = parse_response(&bytes);
            let _ = decode_word(&bytes);
        }

        /// Any bytes escape to one printable ASCII word that decodes back to them.
        #[test]
        fn words_round_trip(bytes in proptest::collection::vec(any::<u8>(), 0..80)) {
            let mut w = Vec::new();
            encode_word(&mut w, &bytes);
            prop_assert!(!w.is_empty() && w.iter().all(|b| (0x21..=0x7e).contains(b)));
            prop_assert_eq!(decode_word(&w), Some(bytes));
        }

        #[test]
        fn parser_agrees_with_a_model(tag in "[A-Za-z0-9._:-]{1,32}", ws in proptest::collection::vec(word(), 0..6)) {
            let line = format!("{tag} {}", ws.join(" "));
            match parse_request(line.as_bytes()) {
                Ok(Some(req)) => {
                    prop_assert_eq!(req.tag, tag.as_str());
                    let verb = ws[0].to_ascii_uppercase();
                    match req.command {
                        Command::Lock { name, mode, timeout } => {
                            prop_assert_eq!(verb.as_str(), "LOCK");
                            prop_assert_eq!(name, ws[1].as_bytes());
                            let rest: Vec<String> = ws[2..].iter().map(|w| w.to_ascii_uppercase()).collect();
                            prop_assert_eq!(mode == Mode::Shared, rest.contains(&"SHARED".to_string()));
                            prop_assert_eq!(timeout.is_some(), rest.contains(&"TIMEOUT".to_string()));
                        }
                        Command::Try { name, .. } => {
                            prop_assert_eq!(verb.as_str(), "TRY");
                            prop_assert_eq!(name, ws[1].as_bytes());
                            prop_assert!(ws.len() <= 3);
                        }
                        Command::Unlock { name } => {
                            prop_assert_eq!(verb.as_str(), "UNLOCK");
                            prop_assert_eq!(ws.len(), 2);
                            prop_assert_eq!(name, ws[1].as_bytes());
                        }
                        Command::Ping => prop_assert_eq!(verb.as_str(), "PING"),
                        Command::Auth { secret } => {
                            prop_assert_eq!(verb.as_str(), "AUTH");
                            prop_assert_eq!(secret, ws[1].as_bytes());
                        }
                        Command::Quit => prop_assert_eq!(ws.len(), 1),
                        Command::Locks(q) => {
                            prop_assert_eq!(verb.as_str(), "LOCKS");
                            // Options come in pairs, each at most once, values that decode.
                            prop_assert_eq!(ws.len() % 2, 1);
                            let opt = |o: &str| ws[1..].chunks(2).find(|c| c[0].eq_ignore_ascii_case(o)).map(|c| c[1].as_str());
                            prop_assert_eq!(q.prefix, opt("PREFIX").map(str::as_bytes));
                            prop_assert_eq!(q.after, opt("AFTER").map(|c| Cursor::parse(c.as_bytes()).unwrap()));
                            prop_assert_eq!(q.limit, opt("LIMIT").map(|n| n.parse::<u32>().unwrap()));
                            for v in [q.prefix].into_iter().flatten() {
                                prop_assert!(decode_word(v).is_some());
                            }
                        }
                        Command::Status { check } => {
                            prop_assert_eq!(verb.as_str(), "STATUS");
                            prop_assert_eq!(check, ws.len() == 2);
                            prop_assert!(ws.len() == 1 || ws[1].eq_ignore_ascii_case("CHECK"));
                        }
                    }
                }
                Ok(None) => prop_assert!(false, "a tagged line is never blank"),
                Err(e) => {
                    prop_assert_eq!(e.tag, tag.as_str());
                    prop_assert!(!e.message.is_empty());
                    let known = ["LOCK", "TRY", "UNLOCK", "PING", "AUTH", "QUIT", "LOCKS", "STATUS"];
                    let is_known = ws.first().is_some_and(|v| known.contains(&v.to_ascii_uppercase().as_str()));
                    prop_assert_eq!(e.code == ErrorCode::UnknownCommand, !ws.is_empty() && !is_known);
                }
            }
        }
    }
}
