//! The admin queries' codec, `LOCKS` and `STATUS`: answers gathered from the table's read-only
//! snapshots (the same ones `shmlock locks` and `shmlock status` show locally), encoded as
//! response lines, and decoded back into those snapshots on the client side. Sans I/O but for
//! the reads of the table; no async runtime.
//!
//! `docs/PROTOCOL.md` ("Admin queries") specifies the lines; this module is their executable
//! form, shared by the gateway (whose admin pool calls [`serve_locks`] and [`serve_status`]) and
//! [`RemoteClient`](crate::remote::RemoteClient) (which calls [`parse_locks`] and
//! [`parse_status`]).
//!
//! # Bounds
//! A `LOCKS` response is one page: at most `LIMIT` locks, and no lock starts once the page holds
//! [`PAGE_BYTES`]; a lock's lines are never split, and a lock has at most two lines per owner
//! (one holding, one waiting), so a page stays below [`PAGE_BYTES`] plus one lock's lines
//! whatever the table holds. A `STATUS` response is a fixed number of lines plus at most
//! [`MAX_VIOLATIONS`] lines of check findings.
//!
//! # Cost
//! A `LOCKS` page is read from a cursor in table order ([`LockTable::locks_page`]): it looks at
//! no more than [`crate::table::PAGE_SCAN`] entry slots, however big the table is. `STATUS`
//! reads counters; `STATUS CHECK` walks every shard under its latch, in time proportional to the
//! table (the gateway runs both off its session threads: see `gateway::admin`).

use std::io::Write as _;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use super::{decode_word, encode_word, LocksQuery};
use crate::clock::{self, Nanos};
use crate::config::Geometry;
use crate::owner::OwnerKind;
use crate::proto;
use crate::table::{Cursor, LockInfo, LockTable, Mode, Page, Party, TableStats};

/// No lock of a `LOCKS` page starts once the page holds this many bytes.
pub const PAGE_BYTES: usize = 64 * 1024;
/// At most this many check findings are sent (the `CHECK` line tells how many there are).
pub const MAX_VIOLATIONS: usize = 100;

// ---- what is reported ------------------------------------------------------------------------

/// What `STATUS` reports (and `shmlock status` shows), short of the check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusReport {
    /// The segment's name, e.g. `/shmlock`.
    pub segment: String,
    /// The segment's size in bytes.
    pub size: u64,
    /// The segment's layout version.
    pub layout_version: u32,
    /// Time since the segment was created, if it was created during this boot.
    pub age: Option<Duration>,
    /// Lock capacity as requested at creation.
    pub max_locks: u64,
    /// Hold capacity as requested at creation.
    pub max_holds: u64,
    /// The sizes the segment was built with.
    pub geometry: Geometry,
    /// Counters over the whole table.
    pub stats: TableStats,
    /// Counts per state of each pool.
    pub pools: Vec<PoolReport>,
    /// The supervisor's pid and whether it runs (same pid and start time); None if none attached.
    pub supervisor: Option<(u32, bool)>,
}

/// How many records of one pool are in each state (an owned [`crate::table::PoolCounts`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolReport {
    /// The pool's name (`lock entry`, `hold/wait`, `owner`).
    pub pool: String,
    /// Capacity over all shards.
    pub capacity: u64,
    /// `(state, count)` in the state's numeric order.
    pub states: Vec<(String, u64)>,
}

/// What the invariant check found, as `STATUS` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckReport {
    /// Not asked for (`STATUS` without `CHECK`).
    Skipped,
    /// Every invariant holds.
    Consistent,
    /// Findings: how many in all, and the first [`MAX_VIOLATIONS`].
    Violations {
        /// How many findings the check made.
        total: u64,
        /// The first of them, one line each.
        shown: Vec<String>,
    },
}

impl CheckReport {
    /// The report of a check that found `v`.
    pub fn from_findings(mut v: Vec<String>) -> CheckReport {
        if v.is_empty() {
            return CheckReport::Consistent;
        }
        let total = v.len() as u64;
        v.truncate(MAX_VIOLATIONS);
        CheckReport::Violations { total, shown: v }
    }
}

impl StatusReport {
    /// Reads the report from `table` (counters without latches, as [`LockTable::stats`] does).
    pub fn gather(table: &LockTable) -> StatusReport {
        let seg = table.segment();
        let h = seg.header();
        let boot = [h.boot_id[0].load(Relaxed), h.boot_id[1].load(Relaxed)];
        let created = Nanos(h.created_ns.load(Relaxed));
        let (max_locks, max_holds) = table.requested();
        StatusReport {
            segment: seg.name().to_string(),
            size: seg.size() as u64,
            layout_version: h.version.load(Relaxed),
            age: (boot == crate::shm::boot_id()).then(|| clock::now().since(created)),
            max_locks,
            max_holds,
            geometry: table.geometry(),
            stats: table.stats(),
            pools: table
                .pool_counts()
                .into_iter()
                .map(|p| PoolReport {
                    pool: p.pool.to_string(),
                    capacity: p.capacity,
                    states: p.states.into_iter().map(|(s, n)| (s.to_string(), n)).collect(),
                })
                .collect(),
            supervisor: table.supervisor().map(|p| (p.pid, p.is_alive())),
        }
    }
}

/// One page of `LOCKS`, as a client decodes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocksPage {
    /// The locks, in table order.
    pub locks: Vec<LockInfo>,
    /// When there are more: the cursor to send as `AFTER` for the next page.
    pub next: Option<Cursor>,
}

// ---- serving ---------------------------------------------------------------------------------

/// Answers `LOCKS` from `table`: a page of the locks held or waited on, appended to `out`.
pub fn serve_locks(table: &LockTable, tag: &str, q: &LocksQuery<'_>, out: &mut Vec<u8>) {
    // The parser has checked that it decodes.
    let prefix = q.prefix.and_then(decode_word).unwrap_or_default();
    let limit = q.limit.unwrap_or(proto::DEFAULT_LOCKS_LIMIT) as usize;
    encode_page(out, tag, &table.locks_page(q.after, &prefix, limit));
}

/// Answers `STATUS` (with the check if `check`) from `table`, appended to `out`.
pub fn serve_status(table: &LockTable, tag: &str, check: bool, out: &mut Vec<u8>) {
    let report = StatusReport::gather(table);
    let check = if check {
        CheckReport::from_findings(table.check())
    } else {
        CheckReport::Skipped
    };
    encode_status(out, tag, &report, &check);
}

// ---- encoding --------------------------------------------------------------------------------

fn mode_word(m: Option<Mode>) -> &'static str {
    m.map_or("NONE", proto::mode_word)
}

fn kind_word(k: Option<OwnerKind>) -> &'static str {
    match k {
        Some(OwnerKind::Local) => "LOCAL",
        Some(OwnerKind::Remote) => "REMOTE",
        None => "UNKNOWN",
    }
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Appends `word` escaped, after a space.
fn put_word(out: &mut Vec<u8>, bytes: &[u8]) {
    out.push(b' ');
    encode_word(out, bytes);
}

fn encode_party(out: &mut Vec<u8>, tag: &str, p: &Party, waiter: bool) {
    let kind = kind_word(p.kind);
    let mode = proto::mode_word(p.mode);
    let (owner, pid, age) = (p.owner, p.pid, ms(p.age));
    let _ = if waiter {
        write!(out, "{tag} WAITER {owner} {pid} {kind} {mode} {age}")
    } else {
        write!(out, "{tag} HOLDER {owner} {pid} {kind} {mode} {} {age}", p.token)
    };
    put_word(out, p.label.as_bytes());
    out.push(b'\n');
}

/// Appends one lock's lines: `LOCK`, then a `HOLDER` line per holder and a `WAITER` line per
/// waiter (queue order).
pub fn encode_lock(out: &mut Vec<u8>, tag: &str, l: &LockInfo) {
    let _ = write!(out, "{tag} LOCK");
    put_word(out, &l.name);
    let _ = writeln!(
        out,
        " {} {} {} {} {} {}",
        mode_word(l.mode),
        l.token,
        u8::from(l.owner_died),
        l.shard,
        l.holders.len(),
        l.waiters.len()
    );
    for p in &l.holders {
        encode_party(out, tag, p, false);
    }
    for p in &l.waiters {
        encode_party(out, tag, p, true);
    }
}

/// Appends a `LOCKS` response for `page`: its locks in order, none started once the response
/// holds [`PAGE_BYTES`] (the first always is), then `END COUNT DONE`, or `END COUNT MORE NEXT`
/// with the cursor after which the next page starts.
pub fn encode_page(out: &mut Vec<u8>, tag: &str, page: &Page) {
    let start = out.len();
    let mut next = page.next;
    let mut sent = 0;
    for (i, (_, l)) in page.locks.iter().enumerate() {
        if i > 0 && out.len() - start >= PAGE_BYTES {
            next = Some(page.locks[i - 1].0);
            break;
        }
        encode_lock(out, tag, l);
        sent += 1;
    }
    let _ = write!(out, "{tag} END {sent}");
    match next {
        Some(c) => {
            let _ = write!(out, " MORE {c}");
        }
        None => out.extend_from_slice(b" DONE"),
    }
    out.push(b'\n');
}

/// The counters of [`TableStats`] by name (the names `status --json` shows under `stats`).
fn stats_fields(s: &TableStats) -> [(&'static str, u64); 18] {
    [
        ("held", s.held),
        ("idle", s.idle),
        ("died", s.died),
        ("free", s.free),
        ("entry_capacity", s.entry_capacity),
        ("shared_holds", s.shared_holds),
        ("waiting", s.waiting),
        ("hold_capacity", s.hold_capacity),
        ("owners", s.owners),
        ("owner_capacity", s.owner_capacity),
        ("grants", s.grants),
        ("waits", s.waits),
        ("timeouts", s.timeouts),
        ("handoffs", s.handoffs),
        ("max_token", s.max_token),
        ("reaping", s.reaping),
        ("reaps", s.reaps),
        ("repairs", s.repairs),
    ]
}

/// Sets counter `k` of `s`; false if there is none of that name.
fn set_stat(s: &mut TableStats, k: &str, v: u64) -> bool {
    let f = match k {
        "held" => &mut s.held,
        "idle" => &mut s.idle,
        "died" => &mut s.died,
        "free" => &mut s.free,
        "entry_capacity" => &mut s.entry_capacity,
        "shared_holds" => &mut s.shared_holds,
        "waiting" => &mut s.waiting,
        "hold_capacity" => &mut s.hold_capacity,
        "owners" => &mut s.owners,
        "owner_capacity" => &mut s.owner_capacity,
        "grants" => &mut s.grants,
        "waits" => &mut s.waits,
        "timeouts" => &mut s.timeouts,
        "handoffs" => &mut s.handoffs,
        "max_token" => &mut s.max_token,
        "reaping" => &mut s.reaping,
        "reaps" => &mut s.reaps,
        "repairs" => &mut s.repairs,
        _ => return false,
    };
    *f = v;
    true
}

fn geometry_fields(g: &Geometry) -> [(&'static str, u32); 7] {
    [
        ("shards", g.shards),
        ("entries_per_shard", g.entries_per_shard),
        ("holds_per_shard", g.holds_per_shard),
        ("buckets_per_shard", g.buckets_per_shard),
        ("owners", g.owners),
        ("max_name_len", g.max_name_len),
        ("name_words", g.name_words),
    ]
}

fn set_geometry(g: &mut Geometry, k: &str, v: u32) -> bool {
    let f = match k {
        "shards" => &mut g.shards,
        "entries_per_shard" => &mut g.entries_per_shard,
        "holds_per_shard" => &mut g.holds_per_shard,
        "buckets_per_shard" => &mut g.buckets_per_shard,
        "owners" => &mut g.owners,
        "max_name_len" => &mut g.max_name_len,
        "name_words" => &mut g.name_words,
        _ => return false,
    };
    *f = v;
    true
}

/// Appends the `STATUS` response: `SEGMENT`, `CAPACITY`, `GEOMETRY`, a `POOL` line per pool,
/// `STATS`, `SUPERVISOR`, `CHECK` (and a `VIOLATION` line per finding shown), then `END`.
pub fn encode_status(out: &mut Vec<u8>, tag: &str, r: &StatusReport, check: &CheckReport) {
    let _ = write!(out, "{tag} SEGMENT");
    put_word(out, r.segment.as_bytes());
    let age = r.age.map_or("-".to_string(), |a| ms(a).to_string());
    let _ = writeln!(out, " {} {} {age}", r.size, r.layout_version);
    let _ = writeln!(out, "{tag} CAPACITY {} {}", r.max_locks, r.max_holds);
    let _ = write!(out, "{tag} GEOMETRY");
    for (k, v) in geometry_fields(&r.geometry) {
        let _ = write!(out, " {k}={v}");
    }
    out.push(b'\n');
    for p in &r.pools {
        let _ = write!(out, "{tag} POOL");
        put_word(out, p.pool.as_bytes());
        let _ = write!(out, " {}", p.capacity);
        for (st, n) in &p.states {
            out.push(b' ');
            encode_word(out, st.as_bytes());
            let _ = write!(out, "={n}");
        }
        out.push(b'\n');
    }
    let _ = write!(out, "{tag} STATS");
    for (k, v) in stats_fields(&r.stats) {
        let _ = write!(out, " {k}={v}");
    }
    out.push(b'\n');
    let _ = match r.supervisor {
        None => writeln!(out, "{tag} SUPERVISOR NONE"),
        Some((pid, true)) => writeln!(out, "{tag} SUPERVISOR {pid} RUNNING"),
        Some((pid, false)) => writeln!(out, "{tag} SUPERVISOR {pid} STOPPED"),
    };
    match check {
        CheckReport::Skipped => {
            let _ = writeln!(out, "{tag} CHECK SKIPPED");
        }
        CheckReport::Consistent => {
            let _ = writeln!(out, "{tag} CHECK OK");
        }
        CheckReport::Violations { total, shown } => {
            let _ = writeln!(out, "{tag} CHECK VIOLATIONS {total}");
            for v in shown {
                let _ = write!(out, "{tag} VIOLATION ");
                out.extend(v.bytes().map(|b| if b < 0x20 || b == 0x7f { b' ' } else { b }));
                out.push(b'\n');
            }
        }
    }
    let _ = writeln!(out, "{tag} END");
}

// ---- decoding --------------------------------------------------------------------------------

/// The words of a response line after its tag (the first is the line's kind).
fn words(line: &[u8]) -> Vec<&[u8]> {
    proto::trim_eol(line)
        .split(|&b| b == b' ')
        .filter(|w| !w.is_empty())
        .skip(1)
        .collect()
}

/// True if `line` is the last line of an admin response: `TAG END ...`, or `TAG ERR ...` (the
/// request failed: [`proto::parse_response`] reads it).
pub fn ends_response(line: &[u8]) -> bool {
    matches!(words(line).first(), Some(&(b"END" | b"ERR")))
}

fn text(w: &[u8]) -> String {
    String::from_utf8_lossy(w).into_owned()
}

fn num<T: std::str::FromStr>(w: Option<&&[u8]>, what: &str) -> Result<T, String> {
    w.and_then(|w| std::str::from_utf8(w).ok()?.parse().ok())
        .ok_or_else(|| format!("bad {what}: {}", w.map_or("(missing)".into(), |w| text(w))))
}

fn word(w: Option<&&[u8]>, what: &str) -> Result<Vec<u8>, String> {
    w.and_then(|w| decode_word(w))
        .ok_or_else(|| format!("bad {what}: {}", w.map_or("(missing)".into(), |w| text(w))))
}

fn parse_mode(w: Option<&&[u8]>) -> Result<Option<Mode>, String> {
    match w.copied() {
        Some(b"EXCLUSIVE") => Ok(Some(Mode::Exclusive)),
        Some(b"SHARED") => Ok(Some(Mode::Shared)),
        Some(b"NONE") => Ok(None),
        w => Err(format!("bad mode: {}", w.map_or("(missing)".into(), text))),
    }
}

fn parse_kind(w: Option<&&[u8]>) -> Option<OwnerKind> {
    match w.copied() {
        Some(b"LOCAL") => Some(OwnerKind::Local),
        Some(b"REMOTE") => Some(OwnerKind::Remote),
        _ => None,
    }
}

/// `OWNER PID KIND MODE [TOKEN] AGE_MS LABEL` of a `HOLDER` (with `TOKEN`) or `WAITER` line.
fn parse_party(w: &[&[u8]], holder: bool) -> Result<Party, String> {
    let at = usize::from(holder);
    Ok(Party {
        owner: num(w.get(1), "owner")?,
        pid: num(w.get(2), "pid")?,
        kind: parse_kind(w.get(3)),
        mode: parse_mode(w.get(4))?.ok_or("a party's mode is NONE")?,
        token: if holder { num(w.get(5), "token")? } else { 0 },
        age: Duration::from_millis(num(w.get(5 + at), "age")?),
        label: text(&word(w.get(6 + at), "label")?),
    })
}

/// Decodes the lines of one `LOCKS` response (each with its tag, the last the `END` line).
/// Lines of kinds this version does not know, and words after the known ones, are skipped.
pub fn parse_locks<'a>(lines: impl IntoIterator<Item = &'a [u8]>) -> Result<LocksPage, String> {
    let mut locks: Vec<LockInfo> = Vec::new();
    // The holders and waiters the last LOCK line announced.
    let mut expect = (0usize, 0usize);
    let complete = |l: Option<&LockInfo>, expect: (usize, usize)| match l {
        Some(l) if (l.holders.len(), l.waiters.len()) != expect => Err(format!(
            "lock {} announced {} holders and {} waiters but came with {} and {}",
            text(&l.name),
            expect.0,
            expect.1,
            l.holders.len(),
            l.waiters.len()
        )),
        _ => Ok(()),
    };
    for line in lines {
        let w = words(line);
        match w.first().copied() {
            Some(b"LOCK") => {
                complete(locks.last(), expect)?;
                expect = (num(w.get(6), "holder count")?, num(w.get(7), "waiter count")?);
                locks.push(LockInfo {
                    name: word(w.get(1), "name")?,
                    mode: parse_mode(w.get(2))?,
                    token: num(w.get(3), "token")?,
                    owner_died: num::<u8>(w.get(4), "died flag")? != 0,
                    shard: num(w.get(5), "shard")?,
                    // The counts came over the network: nothing is reserved from them, the
                    // parties grow with the lines that really come.
                    holders: Vec::new(),
                    waiters: Vec::new(),
                });
            }
            Some(k @ (b"HOLDER" | b"WAITER")) => {
                let holder = k == b"HOLDER";
                let l = locks.last_mut().ok_or("a HOLDER or WAITER line before any LOCK line")?;
                let p = parse_party(&w, holder)?;
                (if holder { &mut l.holders } else { &mut l.waiters }).push(p);
            }
            Some(b"END") => {
                complete(locks.last(), expect)?;
                let n: usize = num(w.get(1), "lock count")?;
                if n != locks.len() {
                    return Err(format!("END says {n} locks but {} came", locks.len()));
                }
                let next =
                    match w.get(2).copied() {
                        Some(b"MORE") => Some(w.get(3).and_then(|c| Cursor::parse(c)).ok_or_else(|| {
                            format!("bad cursor: {}", w.get(3).map_or("(missing)".into(), |c| text(c)))
                        })?),
                        Some(b"DONE") => None,
                        other => return Err(format!("bad END: {}", other.map_or("(missing)".into(), text))),
                    };
                return Ok(LocksPage { locks, next });
            }
            _ => {}
        }
    }
    Err("the response ended without an END line".into())
}

/// Decodes the lines of one `STATUS` response (each with its tag, the last the `END` line).
/// Lines of kinds and `key=value` words this version does not know are skipped.
pub fn parse_status<'a>(lines: impl IntoIterator<Item = &'a [u8]>) -> Result<(StatusReport, CheckReport), String> {
    let mut r = StatusReport {
        segment: String::new(),
        size: 0,
        layout_version: 0,
        age: None,
        max_locks: 0,
        max_holds: 0,
        geometry: Geometry {
            shards: 0,
            entries_per_shard: 0,
            holds_per_shard: 0,
            buckets_per_shard: 0,
            owners: 0,
            max_name_len: 0,
            name_words: 0,
        },
        stats: TableStats::default(),
        pools: Vec::new(),
        supervisor: None,
    };
    let mut check = CheckReport::Skipped;
    let kv = |w: &[u8]| -> Option<(String, u64)> {
        let s = std::str::from_utf8(w).ok()?;
        let (k, v) = s.split_once('=')?;
        Some((text(&decode_word(k.as_bytes())?), v.parse().ok()?))
    };
    let mut seen_segment = false;
    for line in lines {
        let w = words(line);
        match w.first().copied() {
            Some(b"SEGMENT") => {
                seen_segment = true;
                r.segment = text(&word(w.get(1), "segment")?);
                r.size = num(w.get(2), "size")?;
                r.layout_version = num(w.get(3), "layout version")?;
                r.age = match w.get(4).copied() {
                    Some(b"-") => None,
                    a => Some(Duration::from_millis(num(a.as_ref(), "age")?)),
                };
            }
            Some(b"CAPACITY") => {
                r.max_locks = num(w.get(1), "max_locks")?;
                r.max_holds = num(w.get(2), "max_holds")?;
            }
            Some(b"GEOMETRY") => {
                for (k, v) in w[1..].iter().filter_map(|w| kv(w)) {
                    let v = u32::try_from(v).map_err(|_| format!("bad geometry {k}={v}"))?;
                    set_geometry(&mut r.geometry, &k, v);
                }
            }
            Some(b"POOL") => r.pools.push(PoolReport {
                pool: text(&word(w.get(1), "pool")?),
                capacity: num(w.get(2), "pool capacity")?,
                states: w.iter().skip(3).filter_map(|w| kv(w)).collect(),
            }),
            Some(b"STATS") => {
                for (k, v) in w[1..].iter().filter_map(|w| kv(w)) {
                    set_stat(&mut r.stats, &k, v);
                }
            }
            Some(b"SUPERVISOR") => {
                r.supervisor = match (w.get(1).copied(), w.get(2).copied()) {
                    (Some(b"NONE"), _) => None,
                    (pid, Some(state)) => Some((num(pid.as_ref(), "supervisor pid")?, state == b"RUNNING")),
                    _ => return Err("bad SUPERVISOR line".into()),
                };
            }
            Some(b"CHECK") => {
                check = match w.get(1).copied() {
                    Some(b"OK") => CheckReport::Consistent,
                    Some(b"VIOLATIONS") => CheckReport::Violations {
                        total: num(w.get(2), "violation count")?,
                        shown: Vec::new(),
                    },
                    _ => CheckReport::Skipped,
                };
            }
            Some(b"VIOLATION") => {
                if let CheckReport::Violations { shown, .. } = &mut check {
                    // The rest of the line after the kind word.
                    let line = proto::trim_eol(line);
                    let at = line
                        .windows(11)
                        .position(|x| x == b" VIOLATION ")
                        .map_or(line.len(), |i| i + 11);
                    shown.push(text(line[at..].trim_ascii_start()));
                }
            }
            Some(b"END") if seen_segment => return Ok((r, check)),
            Some(b"END") => return Err("a STATUS response without a SEGMENT line".into()),
            _ => {}
        }
    }
    Err("the response ended without an END line".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn party(owner: u32, label: &str, mode: Mode, token: u64, age_ms: u64) -> Party {
        Party {
            owner,
            pid: 1000 + owner,
            kind: Some(if label.contains(':') {
                OwnerKind::Remote
            } else {
                OwnerKind::Local
            }),
            label: label.into(),
            mode,
            token,
            age: Duration::from_millis(age_ms),
        }
    }

    fn lock(name: &[u8], holders: Vec<Party>, waiters: Vec<Party>) -> LockInfo {
        LockInfo {
            name: name.to_vec(),
            shard: 3,
            mode: holders.first().map(|p| p.mode),
            holders,
            waiters,
            token: 9,
            owner_died: name.len() % 2 == 0,
        }
    }

    fn sample() -> Vec<LockInfo> {
        vec![
            lock(
                b"orders/42",
                vec![party(1, "run sleep 5", Mode::Exclusive, 9, 1500)],
                vec![
                    party(2, "10.0.0.1:4000", Mode::Shared, 0, 20),
                    party(3, "", Mode::Exclusive, 0, 10),
                ],
            ),
            lock(
                b"config",
                vec![party(4, "-", Mode::Shared, 7, 5), party(5, "x%y", Mode::Shared, 8, 4)],
                vec![],
            ),
            lock(b"raw \xff\x01", vec![], vec![party(6, "w", Mode::Exclusive, 0, 1)]),
        ]
    }

    fn lines(out: &[u8]) -> Vec<&[u8]> {
        out.split_inclusive(|&b| b == b'\n').collect()
    }

    fn by_name(mut v: Vec<LockInfo>) -> Vec<LockInfo> {
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// A page of `locks` at made-up slots 0.0, 0.1, ..., with `next`.
    fn page_of(locks: Vec<LockInfo>, next: Option<Cursor>) -> Page {
        Page {
            locks: locks
                .into_iter()
                .enumerate()
                .map(|(i, l)| {
                    (
                        Cursor {
                            shard: 0,
                            entry: i as u32,
                        },
                        l,
                    )
                })
                .collect(),
            next,
            scanned: 0,
        }
    }

    #[test]
    fn a_locks_page_round_trips_in_page_order() {
        let mut out = Vec::new();
        encode_page(&mut out, "t1", &page_of(sample(), None));
        let text = String::from_utf8(out.clone()).expect("ASCII");
        assert!(text.starts_with("t1 LOCK orders/42 EXCLUSIVE 9 0 3 1 2\n"), "{text}");
        assert!(text.contains("t1 HOLDER 4 1004 LOCAL SHARED 7 5 %2D\n"), "{text}");
        assert!(text.contains("t1 WAITER 3 1003 LOCAL EXCLUSIVE 10 -\n"), "{text}");
        assert!(text.contains("t1 LOCK raw%20%FF%01 NONE 9 1 3 0 1\n"), "{text}");
        assert!(text.ends_with("t1 END 3 DONE\n"), "{text}");
        assert!(lines(&out)
            .iter()
            .all(|l| l.iter().all(|&b| (0x20..0x7f).contains(&b) || b == b'\n')));
        let page = parse_locks(lines(&out)).expect("parse");
        assert_eq!(page.next, None);
        assert_eq!(page.locks, sample());
        assert!(lines(&out)
            .iter()
            .take(lines(&out).len() - 1)
            .all(|l| !ends_response(l)));
        assert!(ends_response(lines(&out).last().unwrap()));
        let _ = by_name(Vec::new());
    }

    #[test]
    fn pages_end_with_the_cursor_of_the_next_and_stop_at_page_bytes() {
        let mut out = Vec::new();
        let c = Cursor { shard: 4, entry: 11 };
        encode_page(&mut out, "a", &page_of(sample(), Some(c)));
        let p = parse_locks(lines(&out)).expect("page");
        assert_eq!((p.locks.len(), p.next), (3, Some(c)));
        assert!(String::from_utf8_lossy(&out).ends_with("a END 3 MORE 4.11\n"));
        // An empty page that says where to go on.
        let mut out = Vec::new();
        encode_page(&mut out, "a", &page_of(vec![], Some(c)));
        assert_eq!(out, b"a END 0 MORE 4.11\n");
        // Locks whose lines pass PAGE_BYTES: the page stops after the one that crossed it,
        // and its cursor is that lock's slot, so the next page starts with the first left out.
        let big = |i: u32| {
            lock(
                format!("big{i}").as_bytes(),
                (0..400)
                    .map(|o| party(o, &"l".repeat(200), Mode::Shared, 1, 1))
                    .collect(),
                vec![],
            )
        };
        let mut out = Vec::new();
        encode_page(&mut out, "b", &page_of((0..4).map(big).collect(), None));
        let p = parse_locks(lines(&out)).expect("page");
        assert_eq!(p.locks.len(), 1, "one lock is over 64 KiB of lines");
        assert_eq!(p.next, Some(Cursor { shard: 0, entry: 0 }));
        assert!(parse_locks(lines(b"t END 0 MORE x.1\n"))
            .unwrap_err()
            .contains("bad cursor"));
    }

    #[test]
    fn malformed_locks_responses_are_errors() {
        let bad = |s: &str| parse_locks(lines(s.as_bytes())).unwrap_err();
        assert!(bad("t LOCK a EXCLUSIVE 1 0 0 1 0\nt END 1 DONE\n").contains("announced 1 holders"));
        assert!(bad("t END 2 DONE\n").contains("END says 2"));
        assert!(bad("t HOLDER 1 2 LOCAL EXCLUSIVE 1 1 x\n").contains("before any LOCK"));
        assert!(bad("t LOCK a%zz EXCLUSIVE 1 0 0 0 0\n").contains("bad name"));
        assert!(bad("t LOCK a SIDEWAYS 1 0 0 0 0\n").contains("bad mode"));
        assert!(bad("").contains("without an END"));
        // Counts sized for no memory on earth are checked against the lines, never reserved.
        let huge = format!(
            "t LOCK a EXCLUSIVE 1 0 0 {} {}\nt END 1 DONE\n",
            usize::MAX / 2,
            usize::MAX / 2
        );
        assert!(bad(&huge).contains("announced"));
        // Unknown line kinds and extra words are skipped.
        let ok = parse_locks(lines(b"t NOTE hi\nt LOCK a NONE 1 0 0 0 0 extra\nt END 1 DONE soon\n"));
        assert_eq!(ok.expect("parse").locks[0].name, b"a");
    }

    #[cfg(feature = "remote")]
    fn report() -> StatusReport {
        let mut stats = TableStats::default();
        for (i, (k, _)) in stats_fields(&TableStats::default()).iter().enumerate() {
            assert!(set_stat(&mut stats, k, 100 + i as u64), "{k}");
        }
        StatusReport {
            segment: "/shm lock".into(),
            size: 1 << 20,
            layout_version: 4,
            age: Some(Duration::from_millis(2500)),
            max_locks: 64,
            max_holds: 65,
            geometry: Geometry {
                shards: 2,
                entries_per_shard: 48,
                holds_per_shard: 49,
                buckets_per_shard: 128,
                owners: 8,
                max_name_len: 64,
                name_words: 8,
            },
            stats,
            pools: vec![PoolReport {
                pool: "lock entry".into(),
                capacity: 96,
                states: vec![("FREE".into(), 95), ("HELD".into(), 1)],
            }],
            supervisor: Some((77, true)),
        }
    }

    #[test]
    #[cfg(feature = "remote")] // serde_json
    fn status_round_trips_with_every_counter() {
        // Every counter the JSON output names is on the wire, and each decodes to its own field.
        let json = serde_json::to_value(TableStats::default()).expect("json");
        let mut names: Vec<&str> = stats_fields(&TableStats::default()).iter().map(|(k, _)| *k).collect();
        names.sort_unstable();
        let mut json_names: Vec<&str> = json.as_object().expect("object").keys().map(String::as_str).collect();
        json_names.sort_unstable();
        assert_eq!(names, json_names);
        let r = report();
        for check in [
            CheckReport::Skipped,
            CheckReport::Consistent,
            CheckReport::from_findings(vec!["shard 0: bad\tthing".into(); MAX_VIOLATIONS + 5]),
        ] {
            let mut out = Vec::new();
            encode_status(&mut out, "s", &r, &check);
            let (r2, c2) = parse_status(lines(&out)).expect("parse");
            assert_eq!(r2, r);
            match (&check, &c2) {
                (CheckReport::Violations { total, shown }, CheckReport::Violations { total: t2, shown: s2 }) => {
                    assert_eq!((*total, shown.len()), (MAX_VIOLATIONS as u64 + 5, MAX_VIOLATIONS));
                    assert_eq!(*t2, *total);
                    assert_eq!(s2[0], "shard 0: bad thing");
                    assert_eq!(s2.len(), shown.len());
                }
                _ => assert_eq!(c2, check),
            }
        }
        let no_age = StatusReport {
            age: None,
            supervisor: None,
            ..r
        };
        let mut out = Vec::new();
        encode_status(&mut out, "s", &no_age, &CheckReport::Skipped);
        assert_eq!(parse_status(lines(&out)).expect("parse").0, no_age);
        assert!(parse_status(lines(b"s END\n")).is_err());
    }
}
