//! Text and JSON renderings of what the CLI reads from a segment, or from a gateway's admin
//! queries (`--remote`): both give the same snapshot types, so the output is the same.

use std::collections::HashSet;
use std::fmt::Write as _;
use std::time::{Duration, SystemTime};

use serde_json::{json, Value};
use shmlock::gateway::admin::StatusReport;
use shmlock::owner::OwnerKind;
use shmlock::table::{LockInfo, OwnerInfo, Party};
use shmlock::{LockTable, Mode};

/// What `check` said.
#[derive(Debug)]
pub(crate) enum CheckOutcome {
    /// No violations.
    Consistent,
    /// One line per violation.
    Violations(Vec<String>),
    /// Did not finish in time (a shard latch stayed taken).
    TimedOut(Duration),
    /// Not run; why.
    NotRun(&'static str),
}

/// A snapshot for `shmlock status`: read from the segment, or sent by a gateway (`--remote`).
#[derive(Debug)]
pub(crate) struct Status {
    report: StatusReport,
    check: CheckOutcome,
}

impl Status {
    pub(crate) fn new(report: StatusReport, check: CheckOutcome) -> Status {
        Status { report, check }
    }

    pub(crate) fn gather(table: &LockTable, check: CheckOutcome) -> Status {
        Status::new(StatusReport::gather(table), check)
    }

    pub(crate) fn to_text(&self) -> String {
        let r = &self.report;
        let (g, s) = (&r.geometry, &r.stats);
        let mut o = String::new();
        let mut line = |label: &str, value: String| {
            let _ = writeln!(o, "{label:<10} {value}");
        };
        line("segment", format!("{} (/dev/shm{})", r.segment, r.segment));
        let age = r.age.map(|a| format!(", created {} ago", human(a))).unwrap_or_default();
        line(
            "size",
            format!(
                "{:.1} MiB ({} bytes), layout version {}{age}",
                r.size as f64 / (1024.0 * 1024.0),
                r.size,
                r.layout_version
            ),
        );
        let (entries, holds) = provisioned(g);
        line(
            "capacity",
            format!(
                "{} locks, {} holds requested (max_locks, max_holds); {} owners; names up to {} bytes",
                r.max_locks, r.max_holds, g.owners, g.max_name_len
            ),
        );
        line(
            "shards",
            format!(
                "{}, each with {} entries, {} holds, {} buckets ({entries} entries, {holds} holds \
                 provisioned in all)",
                g.shards, g.entries_per_shard, g.holds_per_shard, g.buckets_per_shard
            ),
        );
        if g.shards > 1 {
            line(
                "headroom",
                format!(
                    "a name lives in the shard its hash picks: {} entries per shard where an even \
                     spread would put {},",
                    g.entries_per_shard,
                    r.max_locks.div_ceil(u64::from(g.shards))
                ),
            );
            line(
                "",
                "so the locks requested fit an uneven spread; the pools below count what is provisioned".into(),
            );
        }
        for p in &r.pools {
            let states: Vec<String> = p.states.iter().map(|(st, n)| format!("{n} {st}")).collect();
            line(pool_label(&p.pool), format!("{} of {}", states.join(", "), p.capacity));
        }
        line(
            "supervisor",
            match r.supervisor {
                None => "none attached".into(),
                Some((pid, true)) => format!("pid {pid}, running"),
                Some((pid, false)) => format!("pid {pid}, not running"),
            },
        );
        line("fencing", format!("highest token granted {}", s.max_token));
        line(
            "counters",
            format!(
                "{} grants, {} waits, {} timeouts, {} handoffs, {} reaps, {} repairs",
                s.grants, s.waits, s.timeouts, s.handoffs, s.reaps, s.repairs
            ),
        );
        match &self.check {
            CheckOutcome::Consistent => line("check", "ok".into()),
            CheckOutcome::Violations(v) => {
                line("check", format!("{}:", plural(v.len() as u32, "violation")));
                for x in v {
                    line("", format!("  {x}"));
                }
            }
            CheckOutcome::TimedOut(t) => line(
                "check",
                format!(
                    "did not finish within {}: a shard latch stays taken (a process may have died \
                     inside a critical section)",
                    human(*t)
                ),
            ),
            CheckOutcome::NotRun(why) => line("check", format!("not run ({why})")),
        }
        o
    }

    pub(crate) fn to_json(&self) -> Value {
        let r = &self.report;
        let g = &r.geometry;
        let (completed, violations) = match &self.check {
            CheckOutcome::Consistent => (true, Vec::new()),
            CheckOutcome::Violations(v) => (true, v.clone()),
            CheckOutcome::TimedOut(_) | CheckOutcome::NotRun(_) => (false, Vec::new()),
        };
        json!({
            "segment": r.segment,
            "size_bytes": r.size,
            "layout_version": r.layout_version,
            "age_ms": r.age.map(|a| a.as_millis() as u64),
            "capacities": {
                "max_locks": r.max_locks,
                "max_holds": r.max_holds,
                "provisioned_entries": provisioned(g).0,
                "provisioned_holds": provisioned(g).1,
                "max_owners": g.owners,
                "max_name_len": g.max_name_len,
            },
            "geometry": {
                "shards": g.shards,
                "entries_per_shard": g.entries_per_shard,
                "holds_per_shard": g.holds_per_shard,
                "buckets_per_shard": g.buckets_per_shard,
                "owners": g.owners,
                "max_name_len": g.max_name_len,
                "name_words": g.name_words,
            },
            "pools": r.pools.iter().map(|p| json!({
                "pool": p.pool,
                "capacity": p.capacity,
                "states": p.states.iter().map(|(st, n)| (st.clone(), json!(n))).collect::<serde_json::Map<_, _>>(),
            })).collect::<Vec<_>>(),
            "supervisor": {
                "pid": r.supervisor.map(|s| s.0),
                "alive": r.supervisor.is_some_and(|s| s.1),
            },
            "fencing_counter": r.stats.max_token,
            "stats": r.stats,
            "check": { "completed": completed, "violations": violations },
        })
    }
}

// ---- locks, owners, show ---------------------------------------------------------------------

/// A lock name as printable text: valid UTF-8 stays as it is, except that control characters
/// and bytes that are not UTF-8 become `\xNN` and a backslash becomes `\\` (so the form is
/// unambiguous).
pub(crate) fn escape_name(name: &[u8]) -> String {
    let mut out = String::with_capacity(name.len());
    for chunk in name.utf8_chunks() {
        for c in chunk.valid().chars() {
            match c {
                '\\' => out.push_str("\\\\"),
                c if c.is_control() && c.is_ascii() => {
                    let _ = write!(out, "\\x{:02x}", c as u32);
                }
                c if c.is_control() => {
                    let _ = write!(out, "\\u{{{:x}}}", c as u32);
                }
                c => out.push(c),
            }
        }
        for b in chunk.invalid() {
            let _ = write!(out, "\\x{b:02x}");
        }
    }
    out
}

/// The inverse of [`escape_name`]: what `locks` prints for a name, read back into its bytes, so
/// that `show`, `release` and `locks --name-prefix` accept every name `locks` shows.
///
/// `\\` is a backslash, `\xNN` the byte NN (two hex digits), `\u{X}` the UTF-8 of the
/// character U+X (1 to 6 hex digits); every other byte, non-UTF-8 ones included, stands for
/// itself. Any other backslash is an error that says how to write one.
pub(crate) fn unescape_name(text: &[u8]) -> Result<Vec<u8>, String> {
    const HINT: &str = "write a backslash as \\\\, a byte as \\xNN (two hex digits), a character as \\u{X}, \
                        or pass --raw to take it byte for byte";
    let mut out = Vec::with_capacity(text.len());
    let mut i = 0;
    while i < text.len() {
        let b = text[i];
        if b != b'\\' {
            out.push(b);
            i += 1;
            continue;
        }
        let at = i;
        let shown = |to: usize| String::from_utf8_lossy(&text[at..to.min(text.len())]).into_owned();
        match text.get(i + 1) {
            Some(b'\\') => {
                out.push(b'\\');
                i += 2;
            }
            Some(b'x') => {
                let byte = text
                    .get(i + 2..i + 4)
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .filter(|h| h.bytes().all(|c| c.is_ascii_hexdigit()))
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .ok_or_else(|| format!("bad escape \"{}\" at byte {at}: {HINT}", shown(i + 4)))?;
                out.push(byte);
                i += 4;
            }
            Some(b'u') => {
                let close = text[i..].iter().take(11).position(|&c| c == b'}').map(|p| i + p);
                let c = close
                    .filter(|_| text.get(i + 2) == Some(&b'{'))
                    .and_then(|end| std::str::from_utf8(&text[i + 3..end]).ok())
                    .filter(|h| (1..=6).contains(&h.len()) && h.bytes().all(|c| c.is_ascii_hexdigit()))
                    .and_then(|h| u32::from_str_radix(h, 16).ok())
                    .and_then(char::from_u32)
                    .ok_or_else(|| {
                        format!(
                            "bad escape \"{}\" at byte {at}: {HINT}",
                            shown(close.map_or(i + 2, |c| c + 1))
                        )
                    })?;
                let mut buf = [0u8; 4];
                out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
                i = close.map_or(i + 2, |c| c + 1);
            }
            None => return Err(format!("a lone backslash at its end: {HINT}")),
            Some(_) => return Err(format!("bad escape \"{}\" at byte {at}: {HINT}", shown(i + 2))),
        }
    }
    Ok(out)
}

fn mode_str(m: Option<Mode>) -> &'static str {
    match m {
        Some(Mode::Exclusive) => "exclusive",
        Some(Mode::Shared) => "shared",
        None => "none",
    }
}

fn kind_str(k: Option<OwnerKind>) -> &'static str {
    match k {
        Some(OwnerKind::Local) => "local",
        Some(OwnerKind::Remote) => "remote",
        None => "unknown",
    }
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// `1234 (label)`, `1234`, or `1234 remote 10.0.0.1:4000`.
fn who(p: &Party) -> String {
    match (p.kind, p.label.is_empty()) {
        (_, true) => p.pid.to_string(),
        (Some(OwnerKind::Remote), false) => format!("{} remote {}", p.pid, p.label),
        _ => format!("{} ({})", p.pid, p.label),
    }
}

fn party_json(p: &Party, waiter: bool) -> Value {
    let mut v = json!({
        "pid": p.pid,
        "owner": p.owner,
        "kind": kind_str(p.kind),
        "label": p.label,
        "mode": mode_str(Some(p.mode)),
    });
    if waiter {
        v["waited_ms"] = json!(ms(p.age));
    } else {
        v["held_ms"] = json!(ms(p.age));
        v["token"] = json!(p.token);
    }
    v
}

/// Does a process that is gone (an owner in `dead`) hold `l`?
fn holder_dead(l: &LockInfo, dead: &HashSet<u32>) -> bool {
    l.holders.iter().any(|p| dead.contains(&p.owner))
}

/// One lock as JSON (the fields are documented in README.md, "locks --json"); with `dead` (the
/// owners whose process is gone, known from the segment), `holder_dead` too.
pub(crate) fn lock_json(l: &LockInfo, dead: Option<&HashSet<u32>>) -> Value {
    let mut v = json!({
        "name": escape_name(&l.name),
        "mode": l.mode.map(|m| mode_str(Some(m))),
        "holders": l.holders.iter().map(|p| party_json(p, false)).collect::<Vec<_>>(),
        "held_ms": ms(l.held_for()),
        "waiters": l.waiters.len(),
        "oldest_wait_ms": l.oldest_wait().map(ms),
        "queue": l.waiters.iter().map(|p| party_json(p, true)).collect::<Vec<_>>(),
        "token": l.token,
        "owner_died": l.owner_died,
        "shard": l.shard,
    });
    if let Some(dead) = dead {
        v["holder_dead"] = json!(holder_dead(l, dead));
    }
    v
}

/// Sorts locks longest held first, then longest waited for, then by name.
pub(crate) fn sort_locks(locks: &mut [LockInfo]) {
    locks.sort_by(|a, b| {
        b.held_for()
            .cmp(&a.held_for())
            .then_with(|| b.oldest_wait().cmp(&a.oldest_wait()))
            .then_with(|| a.name.cmp(&b.name))
    });
}

/// A text table with left-aligned columns.
pub(crate) fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut w: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.chars().count());
        }
    }
    let mut o = String::new();
    let mut put = |cells: &mut dyn Iterator<Item = &str>| {
        let mut line = String::new();
        for (i, c) in cells.enumerate() {
            let _ = write!(line, "{c:<width$}  ", width = w[i]);
        }
        let _ = writeln!(o, "{}", line.trim_end());
    };
    put(&mut header.iter().copied());
    for r in rows {
        put(&mut r.iter().map(String::as_str));
    }
    o
}

/// The `locks` table (or a line saying there are none); with `dead` (the owners whose process
/// is gone), FLAGS says `holder-dead` where one holds a lock.
pub(crate) fn locks_text(locks: &[LockInfo], dead: Option<&HashSet<u32>>) -> String {
    if locks.is_empty() {
        return "no locks held or waited on\n".into();
    }
    let rows: Vec<Vec<String>> = locks
        .iter()
        .map(|l| {
            let holders: Vec<String> = l.holders.iter().map(who).collect();
            vec![
                escape_name(&l.name),
                mode_str(l.mode).into(),
                if holders.is_empty() {
                    "-".into()
                } else {
                    holders.join(", ")
                },
                if l.holders.is_empty() {
                    "-".into()
                } else {
                    human(l.held_for())
                },
                l.waiters.len().to_string(),
                l.oldest_wait().map_or("-".into(), human),
                l.token.to_string(),
                [
                    (dead.is_some_and(|d| holder_dead(l, d)), "holder-dead"),
                    (l.owner_died, "owner-died"),
                ]
                .iter()
                .filter(|f| f.0)
                .map(|f| f.1)
                .collect::<Vec<_>>()
                .join(","),
            ]
        })
        .collect();
    table(
        &[
            "NAME",
            "MODE",
            "HOLDERS",
            "HELD",
            "WAITERS",
            "OLDEST WAIT",
            "TOKEN",
            "FLAGS",
        ],
        &rows,
    )
}

/// `show NAME`: everything about one lock; a holder whose owner is in `dead` (its process is
/// gone, not reaped yet) is marked so.
pub(crate) fn show_text(l: &LockInfo, dead: &HashSet<u32>) -> String {
    let mut o = String::new();
    let _ = writeln!(o, "name       {}", escape_name(&l.name));
    let _ = writeln!(
        o,
        "mode       {}",
        if l.mode.is_none() { "free" } else { mode_str(l.mode) }
    );
    let _ = writeln!(o, "token      {} (latest grant)", l.token);
    let _ = writeln!(
        o,
        "owner died {}",
        if l.owner_died {
            "yes (the next grantee is told)"
        } else {
            "no"
        }
    );
    let _ = writeln!(o, "shard      {}", l.shard);
    let _ = writeln!(o, "holders    {}", l.holders.len());
    for p in &l.holders {
        let _ = writeln!(
            o,
            "  pid {:<8} owner {:<5} {:<6} {:<9} held {:<8} token {}  {}{}",
            p.pid,
            p.owner,
            kind_str(p.kind),
            mode_str(Some(p.mode)),
            human(p.age),
            p.token,
            p.label,
            if dead.contains(&p.owner) {
                "  (process gone, not reaped yet)"
            } else {
                ""
            }
        );
    }
    let _ = writeln!(o, "waiters    {} (queue order, oldest first)", l.waiters.len());
    for (i, p) in l.waiters.iter().enumerate() {
        let _ = writeln!(
            o,
            "  {:>3}. pid {:<8} owner {:<5} {:<6} {:<9} waiting {:<8} {}",
            i + 1,
            p.pid,
            p.owner,
            kind_str(p.kind),
            mode_str(Some(p.mode)),
            human(p.age),
            p.label
        );
    }
    o
}

/// One owner as JSON (fields documented in README.md, "owners --json").
pub(crate) fn owner_json(o: &OwnerInfo) -> Value {
    json!({
        "idx": o.idx,
        "pid": o.pid,
        "kind": kind_str(o.kind),
        "label": o.label,
        "state": o.state,
        "alive": o.alive,
        "registered_ms": ms(o.registered_for),
        "start_time_ticks": o.start_time,
        "started_unix": o.started_at.map(unix_seconds),
        "started": o.started_at.map(|t| humantime::format_rfc3339_seconds(t).to_string()),
        "holds": o.holds,
        "waits": o.waits,
    })
}

/// Seconds since the epoch, to the millisecond (0 before it).
fn unix_seconds(t: SystemTime) -> f64 {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    (d.as_millis() as f64) / 1000.0
}

/// `2026-12-03T08:20:13Z (5m 2s ago)`, or `-` if unknown.
fn started_text(t: Option<SystemTime>, now: SystemTime) -> String {
    match t {
        None => "-".into(),
        Some(t) => {
            let ago = now.duration_since(t).unwrap_or_default();
            format!("{} ({} ago)", humantime::format_rfc3339_seconds(t), human(ago))
        }
    }
}

/// The `owners` table.
pub(crate) fn owners_text(owners: &[OwnerInfo]) -> String {
    if owners.is_empty() {
        return "no owners registered\n".into();
    }
    let now = SystemTime::now();
    let rows: Vec<Vec<String>> = owners
        .iter()
        .map(|o| {
            vec![
                o.pid.to_string(),
                kind_str(o.kind).into(),
                o.label.clone(),
                if o.alive { "alive".into() } else { "dead".into() },
                started_text(o.started_at, now),
                format!("{} ago", human(o.registered_for)),
                o.holds.to_string(),
                o.waits.to_string(),
                o.idx.to_string(),
                o.state.into(),
            ]
        })
        .collect();
    table(
        &[
            "PID",
            "KIND",
            "LABEL",
            "PROCESS",
            "STARTED (UTC)",
            "REGISTERED",
            "HOLDS",
            "WAITS",
            "OWNER",
            "STATE",
        ],
        &rows,
    )
}

/// Lock entries and holds in all shards: what the segment provides for the locks and holds
/// requested, with each shard's headroom.
fn provisioned(g: &shmlock::config::Geometry) -> (u64, u64) {
    let n = u64::from(g.shards);
    (n * u64::from(g.entries_per_shard), n * u64::from(g.holds_per_shard))
}

/// The label of a pool's line in `status`.
fn pool_label(pool: &str) -> &'static str {
    match pool {
        "lock entry" => "entries",
        "hold/wait" => "holds",
        "owner" => "owners",
        _ => "pool",
    }
}

/// `1 shard`, `2 shards`.
fn plural(n: u32, noun: &str) -> String {
    format!("{n} {noun}{}", if n == 1 { "" } else { "s" })
}

/// `1h 2m`, `3m 4s`, `5.6s`, `78ms`: the library's rounding, which its error messages use too.
pub(crate) use shmlock::clock::human;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_durations() {
        assert_eq!(human(Duration::from_millis(78)), "78ms");
        assert_eq!(human(Duration::from_millis(5_600)), "5.6s");
        assert_eq!(human(Duration::from_secs(184)), "3m 4s");
        assert_eq!(human(Duration::from_secs(3_720)), "1h 2m");
        assert_eq!(human(Duration::from_secs(90_000)), "1d 1h");
    }

    #[test]
    fn escaped_names_read_back() {
        for name in [
            &b"orders/42"[..],
            b"a\\b",
            b"\0\xff\\",
            "caf\u{e9} \u{85}\u{2028}".as_bytes(),
            b"\\x41",
        ] {
            assert_eq!(
                unescape_name(escape_name(name).as_bytes()).as_deref(),
                Ok(name),
                "{name:?}"
            );
        }
        assert_eq!(unescape_name(b"\\x41\\X").ok(), None);
        assert_eq!(unescape_name(br"a\x41\xFF\u{e9}").unwrap(), b"aA\xff\xc3\xa9");
        // Bytes that are not UTF-8 stand for themselves.
        assert_eq!(unescape_name(b"\xfe\\\\").unwrap(), b"\xfe\\");
    }

    #[test]
    fn malformed_escapes_say_how_to_write_a_backslash() {
        for bad in [
            &br"\q"[..],
            br"\x4",
            br"a\",
            br"\x4g",
            br"\u{}",
            br"\u{110000}",
            br"\u{d800}",
            br"\u41",
            br"\u{1234567}",
        ] {
            let e = unescape_name(bad).expect_err(&String::from_utf8_lossy(bad));
            assert!(e.contains(r"\\") && e.contains("--raw"), "{e}");
        }
        assert!(unescape_name(br"ab\q").unwrap_err().contains(r#""\q" at byte 2"#));
        assert!(unescape_name(br"ab\").unwrap_err().contains("lone backslash"));
    }

    proptest::proptest! {
        #[test]
        fn unescape_inverts_escape(name in proptest::collection::vec(proptest::num::u8::ANY, 0..80)) {
            proptest::prop_assert_eq!(unescape_name(escape_name(&name).as_bytes()), Ok(name));
        }

        #[test]
        fn unescape_inverts_escape_of_text(name in "\\PC{0,20}[\\x00-\\x1f\\x7f-\\u{9f}\\\\]{0,4}\\PC{0,20}") {
            let b = name.into_bytes();
            proptest::prop_assert_eq!(unescape_name(escape_name(&b).as_bytes()), Ok(b));
        }
    }

    #[test]
    fn names_are_escaped_unambiguously() {
        assert_eq!(escape_name(b"orders/42"), "orders/42");
        assert_eq!(escape_name("caf\u{e9}".as_bytes()), "caf\u{e9}");
        assert_eq!(escape_name(b"a\xffb"), "a\\xffb");
        assert_eq!(escape_name(b"a\\b\n"), "a\\\\b\\x0a");
    }
}
