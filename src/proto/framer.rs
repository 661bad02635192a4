//! The one line framer of the protocol, sans I/O: bytes in, whole lines out.
//!
//! Every reader of protocol lines uses it: the gateway's sessions ([`split_line`] over their
//! own buffers, so a request that came in one read is handled where it lies) and the remote
//! client ([`Framer`], which owns its buffer). The rules are those of `docs/PROTOCOL.md`
//! ("Framing"): a line ends at LF; one CR right before the LF is removed, and only that one; a
//! line longer than `max_line` bytes (without its LF and that CR) is refused, and so is (where
//! asked) a line with a NUL byte, before its LF has even come.

use std::fmt;

/// Why bytes cannot be framed into lines: the connection is to be closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameError {
    /// A line (or the start of one) longer than `max` bytes.
    TooLong {
        /// The limit.
        max: usize,
    },
    /// A NUL byte: the peer is not speaking this protocol.
    Nul,
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FrameError::TooLong { max } => write!(f, "line longer than {max} bytes"),
            FrameError::Nul => f.write_str("NUL byte: not a shmlock peer"),
        }
    }
}

impl std::error::Error for FrameError {}

/// The first whole line of `data`: `Ok(Some((line, consumed)))` with the line's content (without
/// its LF and the one CR right before it) and the bytes it took with its LF; `Ok(None)` if no
/// LF has come yet and what has come may still make a line. With `reject_nul`, a NUL byte in
/// the line (or in the partial line) is [`FrameError::Nul`]; a line over `max_line` bytes is
/// [`FrameError::TooLong`] (checked first).
pub fn split_line(data: &[u8], max_line: usize, reject_nul: bool) -> Result<Option<(&[u8], usize)>, FrameError> {
    match data.iter().position(|&b| b == b'\n') {
        Some(n) => {
            let line = &data[..n];
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            if line.len() > max_line {
                return Err(FrameError::TooLong { max: max_line });
            }
            if reject_nul && line.contains(&0) {
                return Err(FrameError::Nul);
            }
            Ok(Some((line, n + 1)))
        }
        None => {
            // A partial line may still end with CR LF.
            if data.len() > max_line.saturating_add(1) {
                return Err(FrameError::TooLong { max: max_line });
            }
            if reject_nul && data.contains(&0) {
                return Err(FrameError::Nul);
            }
            Ok(None)
        }
    }
}

/// A line framer with a buffer of its own: read into [`spare`](Framer::spare), tell it with
/// [`filled`](Framer::filled), take lines with [`next_line`](Framer::next_line). Its buffer
/// never grows beyond one longest line (plus its CR LF) and one read.
#[derive(Debug)]
pub struct Framer {
    buf: Vec<u8>,
    start: usize,
    end: usize,
    max_line: usize,
    reject_nul: bool,
}

/// Bytes one read may add.
const READ: usize = 4096;

impl Framer {
    /// A framer for lines of at most `max_line` bytes; see [`split_line`] for `reject_nul`.
    pub fn new(max_line: usize, reject_nul: bool) -> Framer {
        Framer {
            buf: vec![0; READ],
            start: 0,
            end: 0,
            max_line,
            reject_nul,
        }
    }

    /// The next whole line (without its LF and CR), if one has come.
    pub fn next_line(&mut self) -> Result<Option<&[u8]>, FrameError> {
        match split_line(&self.buf[self.start..self.end], self.max_line, self.reject_nul)? {
            Some((_, used)) => {
                let at = self.start;
                self.start += used;
                // The same line again, borrowed from the buffer (split_line checked it).
                let line = &self.buf[at..at + used - 1];
                Ok(Some(line.strip_suffix(b"\r").unwrap_or(line)))
            }
            None => Ok(None),
        }
    }

    /// Room to read into (never empty): what it holds is not yet framed. Call
    /// [`next_line`](Framer::next_line) until it gives None before asking for room.
    pub fn spare(&mut self) -> &mut [u8] {
        if self.start == self.end {
            (self.start, self.end) = (0, 0);
        } else if self.start > 0 && self.buf.len() - self.end < READ {
            self.buf.copy_within(self.start..self.end, 0);
            (self.start, self.end) = (0, self.end - self.start);
        }
        if self.buf.len() - self.end < READ {
            // Bounded: the partial line is at most max_line + 1 bytes (split_line checks it).
            self.buf.resize(self.end + READ, 0);
        }
        &mut self.buf[self.end..]
    }

    /// `n` bytes were read into [`spare`](Framer::spare).
    pub fn filled(&mut self, n: usize) {
        self.end = (self.end + n).min(self.buf.len());
    }

    /// Appends `bytes` (for callers that read elsewhere).
    pub fn push(&mut self, bytes: &[u8]) {
        let mut rest = bytes;
        while !rest.is_empty() {
            let room = self.spare();
            let n = room.len().min(rest.len());
            room[..n].copy_from_slice(&rest[..n]);
            self.filled(n);
            rest = &rest[n..];
        }
    }

    /// Bytes received and not yet part of a line given out.
    pub fn pending(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(f: &mut Framer) -> Result<Vec<Vec<u8>>, FrameError> {
        let mut v = Vec::new();
        while let Some(l) = f.next_line()? {
            v.push(l.to_vec());
        }
        Ok(v)
    }

    #[test]
    fn only_one_cr_before_the_lf_is_removed() {
        assert_eq!(split_line(b"a\r\nb", 8, true), Ok(Some((&b"a"[..], 3))));
        assert_eq!(split_line(b"a\r\r\n", 8, true), Ok(Some((&b"a\r"[..], 4))));
        assert_eq!(split_line(b"a\rb\n", 8, true), Ok(Some((&b"a\rb"[..], 4))));
        assert_eq!(split_line(b"\n", 8, true), Ok(Some((&b""[..], 1))));
        assert_eq!(split_line(b"abc", 8, true), Ok(None));
    }

    #[test]
    fn long_lines_and_nul_bytes_are_refused_before_their_lf() {
        // max_line counts neither the LF nor the CR before it.
        assert!(split_line(b"12345678\r\n", 8, true).unwrap().is_some());
        assert_eq!(split_line(b"123456789\n", 8, true), Err(FrameError::TooLong { max: 8 }));
        assert_eq!(split_line(b"12345678\r", 8, true), Ok(None));
        assert_eq!(split_line(b"123456789\r", 8, true), Err(FrameError::TooLong { max: 8 }));
        assert_eq!(split_line(b"a\0b\n", 8, true), Err(FrameError::Nul));
        assert_eq!(split_line(b"a\0", 8, true), Err(FrameError::Nul));
        assert_eq!(split_line(b"a\0b\n", 8, false), Ok(Some((&b"a\0b"[..], 4))));
        // Length first.
        assert_eq!(
            split_line(b"\x00123456789\n", 8, true),
            Err(FrameError::TooLong { max: 8 })
        );
    }

    #[test]
    fn a_framer_gives_lines_split_anyhow_across_reads_and_stays_bounded() {
        let text = b"1 OK\r\n2 GRANTED 5 0 EXCLUSIVE\n\n3 PONG\n";
        for cut in 1..text.len() {
            let mut f = Framer::new(64, true);
            let mut got = Vec::new();
            for chunk in text.chunks(cut) {
                f.push(chunk);
                got.extend(lines(&mut f).unwrap());
            }
            assert_eq!(
                got,
                [&b"1 OK"[..], b"2 GRANTED 5 0 EXCLUSIVE", b"", b"3 PONG"].map(<[u8]>::to_vec),
                "cut {cut}"
            );
            assert!(f.pending().is_empty());
        }
        // A line that never ends is refused once it passes the limit, and the buffer never holds
        // much more than one line and one read.
        let mut f = Framer::new(10_000, false);
        let mut refused = false;
        for _ in 0..100 {
            let room = f.spare();
            room.fill(b'x');
            let n = room.len();
            f.filled(n);
            assert!(f.buf.len() <= 10_002 + 2 * READ);
            if f.next_line().is_err() {
                refused = true;
                break;
            }
        }
        assert!(refused);
    }
}
