//! `shmlock watch`: a live view, refreshed every interval, like top(1).
//!
//! On a terminal (stdin and stdout both ttys) it draws on the alternate screen with stdin in
//! non-canonical, no-echo, no-signal mode (termios), so `q` and Ctrl-C arrive as bytes and quit
//! cleanly; the terminal is restored on the way out, also on errors. Otherwise (a pipe, a file,
//! `--count`) it prints one frame after another, and `q` on stdin still quits.

use std::io::{IsTerminal, Read, Write};
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use anyhow::Result;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::termios::{tcgetattr, tcsetattr, LocalFlags, SetArg, SpecialCharacterIndices, Termios};
use shmlock::table::{LockInfo, TableStats};
use shmlock::LockTable;

use crate::render::{escape_name, human};

/// How many locks each list shows.
const ROWS: usize = 10;

/// The terminal in watch mode; restores it when dropped.
struct Screen {
    saved: Termios,
}

impl Screen {
    /// Enters non-canonical mode and the alternate screen, if stdin and stdout are terminals.
    fn enter() -> Option<Screen> {
        let stdin = std::io::stdin();
        if !stdin.is_terminal() || !std::io::stdout().is_terminal() {
            return None;
        }
        let saved = tcgetattr(stdin.as_fd()).ok()?;
        let mut raw = saved.clone();
        raw.local_flags &= !(LocalFlags::ICANON | LocalFlags::ECHO | LocalFlags::ISIG);
        raw.control_chars[SpecialCharacterIndices::VMIN as usize] = 1;
        raw.control_chars[SpecialCharacterIndices::VTIME as usize] = 0;
        tcsetattr(stdin.as_fd(), SetArg::TCSANOW, &raw).ok()?;
        // Alternate screen, cursor hidden.
        print!("\x1b[?1049h\x1b[?25l");
        Some(Screen { saved })
    }
}

impl Drop for Screen {
    fn drop(&mut self) {
        print!("\x1b[?25h\x1b[?1049l");
        let _ = std::io::stdout().flush();
        let _ = tcsetattr(std::io::stdin().as_fd(), SetArg::TCSANOW, &self.saved);
    }
}

/// Waits up to `d` for input on stdin; true if it asked to quit (`q`, `Q`, Ctrl-C, Ctrl-D on a
/// terminal). `stdin_open` turns false at end of input, after which this only sleeps.
fn quit_requested(d: Duration, stdin_open: &mut bool, tty: bool) -> bool {
    let deadline = Instant::now() + d;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        if !*stdin_open {
            std::thread::sleep(left);
            return false;
        }
        let stdin = std::io::stdin();
        let ms = u16::try_from(left.as_millis().max(1)).unwrap_or(u16::MAX);
        let mut fds = [PollFd::new(stdin.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::from(ms)) {
            Ok(0) => continue,
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => {
                *stdin_open = false;
                continue;
            }
        }
        let mut buf = [0u8; 64];
        match stdin.lock().read(&mut buf) {
            Ok(0) | Err(_) => *stdin_open = false,
            Ok(n) => {
                if buf[..n]
                    .iter()
                    .any(|&b| b == b'q' || b == b'Q' || b == 3 || (tty && b == 4))
                {
                    return true;
                }
            }
        }
    }
}

/// Runs the live view until `q`, Ctrl-C, or `count` frames.
pub(crate) fn watch(table: &LockTable, interval: Duration, count: Option<u64>) -> Result<u8> {
    let screen = Screen::enter();
    let tty = screen.is_some();
    let mut stdin_open = true;
    let mut prev: Option<(TableStats, Instant)> = None;
    let mut frame = 0u64;
    loop {
        let stats = table.stats();
        let taken = Instant::now();
        let mut locks = table.locks();
        let text = render_frame(table, &stats, prev.as_ref(), &mut locks, interval);
        prev = Some((stats, taken));
        frame += 1;
        let mut out = std::io::stdout().lock();
        if tty {
            // Home, clear, draw.
            write!(out, "\x1b[H\x1b[2J{}", text.replace('\n', "\r\n"))?;
        } else {
            if frame > 1 {
                writeln!(out)?;
            }
            out.write_all(text.as_bytes())?;
        }
        out.flush()?;
        drop(out);
        if count.is_some_and(|c| frame >= c) {
            break;
        }
        if quit_requested(interval, &mut stdin_open, tty) {
            break;
        }
    }
    drop(screen);
    Ok(0)
}

/// Per-second rate of a counter between two snapshots.
fn rate(now: u64, before: u64, secs: f64) -> String {
    format!("{:.1}", now.saturating_sub(before) as f64 / secs)
}

/// One frame: totals and rates, the most contended locks, the longest held.
fn render_frame(
    table: &LockTable,
    s: &TableStats,
    prev: Option<&(TableStats, Instant)>,
    locks: &mut [LockInfo],
    interval: Duration,
) -> String {
    let (grants, waits, timeouts) = match prev {
        Some((p, at)) => {
            let secs = at.elapsed().as_secs_f64().max(1e-3);
            (
                rate(s.grants, p.grants, secs),
                rate(s.waits, p.waits, secs),
                rate(s.timeouts, p.timeouts, secs),
            )
        }
        None => ("-".into(), "-".into(), "-".into()),
    };
    let sup = table.supervisor();
    let mut o = format!(
        "shmlock watch {}  every {}  (q or Ctrl-C quits)\n\
         locks {} held/waited, {} waiting requests, {} owners, supervisor {}\n\
         grants/s {grants}  waits/s {waits}  timeouts/s {timeouts}  highest token {}\n",
        table.segment().name(),
        human(interval),
        s.held,
        s.waiting,
        s.owners,
        match sup {
            Some(p) if p.is_alive() => format!("pid {}", p.pid),
            Some(p) => format!("pid {} (not running)", p.pid),
            None => "none".into(),
        },
        s.max_token,
    );
    locks.sort_by(|a, b| {
        b.waiters
            .len()
            .cmp(&a.waiters.len())
            .then_with(|| b.oldest_wait().cmp(&a.oldest_wait()))
    });
    o.push_str("\nMOST CONTENDED\n");
    let contended: Vec<&LockInfo> = locks.iter().filter(|l| !l.waiters.is_empty()).take(ROWS).collect();
    section(&mut o, &contended);
    crate::render::sort_locks(locks);
    o.push_str("\nLONGEST HELD\n");
    let held: Vec<&LockInfo> = locks.iter().filter(|l| !l.holders.is_empty()).take(ROWS).collect();
    section(&mut o, &held);
    o
}

fn section(o: &mut String, locks: &[&LockInfo]) {
    use std::fmt::Write as _;
    if locks.is_empty() {
        o.push_str("  (none)\n");
        return;
    }
    let _ = writeln!(
        o,
        "  {:<32} {:>7} {:>11} {:>9}  HOLDERS",
        "NAME", "WAITERS", "OLDEST WAIT", "HELD"
    );
    for l in locks {
        let holders: Vec<String> = l.holders.iter().map(|p| p.pid.to_string()).collect();
        let _ = writeln!(
            o,
            "  {:<32} {:>7} {:>11} {:>9}  {}",
            escape_name(&l.name),
            l.waiters.len(),
            l.oldest_wait().map_or("-".into(), human),
            if l.holders.is_empty() {
                "-".into()
            } else {
                human(l.held_for())
            },
            if holders.is_empty() {
                "-".into()
            } else {
                holders.join(",")
            },
        );
    }
}
