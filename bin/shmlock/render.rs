//! Text and JSON renderings of what the CLI reads from a segment.

use std::fmt::Write as _;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use serde_json::{json, Value};
use shmlock::config::Geometry;
use shmlock::table::TableStats;
use shmlock::LockTable;

/// What `check` said.
#[derive(Debug)]
pub(crate) enum CheckOutcome {
    /// No violations.
    Consistent,
    /// One line per violation.
    Violations(Vec<String>),
    /// Did not finish in time (a shard latch stayed taken).
    TimedOut(Duration),
    /// Could not be started.
    NotRun,
}

/// A snapshot for `shmlock status`.
#[derive(Debug)]
pub(crate) struct Status {
    segment: String,
    size: usize,
    layout_version: u32,
    /// Time since creation, if the segment was made during this boot.
    age: Option<Duration>,
    max_locks: u64,
    max_holds: u64,
    geometry: Geometry,
    stats: TableStats,
    check: CheckOutcome,
}

impl Status {
    pub(crate) fn gather(table: &LockTable, check: CheckOutcome) -> Status {
        let seg = table.segment();
        let h = seg.header();
        let same_boot = [h.boot_id[0].load(Relaxed), h.boot_id[1].load(Relaxed)] == shmlock::shm::boot_id();
        let created = shmlock::clock::Nanos(h.created_ns.load(Relaxed));
        let (max_locks, max_holds) = table.requested();
        Status {
            segment: seg.name().to_string(),
            size: seg.size(),
            layout_version: h.version.load(Relaxed),
            age: same_boot.then(|| shmlock::clock::now().since(created)),
            max_locks,
            max_holds,
            geometry: table.geometry(),
            stats: table.stats(),
            check,
        }
    }

    pub(crate) fn to_text(&self) -> String {
        let (g, s) = (&self.geometry, &self.stats);
        let mut o = String::new();
        let mut line = |label: &str, value: String| {
            let _ = writeln!(o, "{label:<10} {value}");
        };
        line("segment", format!("{} (/dev/shm{})", self.segment, self.segment));
        let age = self
            .age
            .map(|a| format!(", created {} ago", human(a)))
            .unwrap_or_default();
        line(
            "size",
            format!(
                "{:.1} MiB ({} bytes), layout version {}{age}",
                self.size as f64 / (1024.0 * 1024.0),
                self.size,
                self.layout_version
            ),
        );
        line(
            "capacity",
            format!(
                "{} locks, {} holds, {} owners, names up to {} bytes",
                self.max_locks, self.max_holds, g.owners, g.max_name_len
            ),
        );
        line(
            "geometry",
            format!(
                "{} x ({} entries, {} holds, {} buckets)",
                plural(g.shards, "shard"),
                g.entries_per_shard,
                g.holds_per_shard,
                g.buckets_per_shard
            ),
        );
        line(
            "entries",
            format!(
                "{} held, {} idle, {} free of {}",
                s.held, s.idle, s.free, s.entry_capacity
            ),
        );
        line(
            "holds",
            format!(
                "{} shared, {} waiting, of {}",
                s.shared_holds, s.waiting, s.hold_capacity
            ),
        );
        line("owners", format!("{} live of {}", s.owners, s.owner_capacity));
        line(
            "counters",
            format!(
                "{} grants, {} waits, {} timeouts, {} handoffs; highest token {}",
                s.grants, s.waits, s.timeouts, s.handoffs, s.max_token
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
            CheckOutcome::NotRun => line("check", "not run (could not start a thread)".into()),
        }
        o
    }

    pub(crate) fn to_json(&self) -> Value {
        let g = &self.geometry;
        let (completed, violations) = match &self.check {
            CheckOutcome::Consistent => (true, Vec::new()),
            CheckOutcome::Violations(v) => (true, v.clone()),
            CheckOutcome::TimedOut(_) | CheckOutcome::NotRun => (false, Vec::new()),
        };
        json!({
            "segment": self.segment,
            "size_bytes": self.size,
            "layout_version": self.layout_version,
            "age_ms": self.age.map(|a| a.as_millis() as u64),
            "capacities": {
                "max_locks": self.max_locks,
                "max_holds": self.max_holds,
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
            "stats": self.stats,
            "check": { "completed": completed, "violations": violations },
        })
    }
}

/// `1 shard`, `2 shards`.
fn plural(n: u32, noun: &str) -> String {
    format!("{n} {noun}{}", if n == 1 { "" } else { "s" })
}

/// `1h 2m`, `3m 4s`, `5.6s`, `78ms`.
fn human(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0 => format!("{}ms", d.as_millis()),
        1..=59 => format!("{:.1}s", d.as_secs_f64()),
        60..=3599 => format!("{}m {}s", s / 60, s % 60),
        3600..=86_399 => format!("{}h {}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d {}h", s / 86_400, s % 86_400 / 3600),
    }
}

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
}
