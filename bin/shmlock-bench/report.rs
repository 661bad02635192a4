//! Results: one [`Row`] per scenario x system (x n), printed as a table per scenario or as one
//! JSON object per row.

use serde::Serialize;

/// One timed run.
#[derive(Debug, Clone)]
pub(crate) struct Run {
    /// Operations timed (what one op is depends on the scenario).
    pub(crate) ops: u64,
    pub(crate) seconds: f64,
    pub(crate) extra: Extra,
}

impl Run {
    pub(crate) fn ns_per_op(&self) -> f64 {
        if self.ops == 0 {
            return f64::NAN;
        }
        self.seconds * 1e9 / self.ops as f64
    }

    pub(crate) fn ops_per_sec(&self) -> f64 {
        self.ops as f64 / self.seconds
    }
}

/// Scenario-specific results.
#[derive(Debug, Clone)]
pub(crate) enum Extra {
    None,
    ManyHeld {
        lock_ns_per_op: f64,
        unlock_ns_per_op: f64,
        /// The same n names locked and unlocked again, now that the table knows them.
        warm_ns_per_op: f64,
    },
    Contention {
        p50_wait_us: f64,
        p99_wait_us: f64,
        share_spread: f64,
        /// max |grants - mean| / mean over the processes.
        share_max_dev: f64,
        exclusion_ok: bool,
        grants: Vec<u64>,
    },
    /// `connections`: ops/s are pairs with all sessions open.
    Connections {
        sessions: u64,
        open_seconds: f64,
        /// The daemon's VmRSS before opening and with all open (None: pid unknown).
        rss_before_kib: Option<u64>,
        rss_after_kib: Option<u64>,
        /// VmRSS growth / sessions.
        rss_bytes_per_session: Option<f64>,
        /// RssAnon growth / sessions (private memory, without the segment's shared pages).
        anon_bytes_per_session: Option<f64>,
        /// One session beyond the limit was refused (None: limit unknown).
        over_limit_refused: Option<bool>,
    },
}

/// The median of `repeat` runs of one scenario on one system.
#[derive(Debug, Clone)]
pub(crate) struct Row {
    pub(crate) scenario: &'static str,
    pub(crate) system: &'static str,
    pub(crate) n: Option<u64>,
    pub(crate) procs: Option<usize>,
    pub(crate) median: Run,
    pub(crate) min_ns_per_op: f64,
    pub(crate) max_ns_per_op: f64,
    pub(crate) repeat: usize,
}

impl Row {
    /// Summarizes runs (at least one) by the run with the median ns/op.
    pub(crate) fn from_runs(
        scenario: &'static str,
        system: &'static str,
        n: Option<u64>,
        procs: Option<usize>,
        mut runs: Vec<Run>,
    ) -> Row {
        runs.sort_by(|a, b| a.ns_per_op().total_cmp(&b.ns_per_op()));
        let repeat = runs.len();
        Row {
            scenario,
            system,
            n,
            procs,
            min_ns_per_op: runs[0].ns_per_op(),
            max_ns_per_op: runs[repeat - 1].ns_per_op(),
            median: runs.swap_remove((repeat - 1) / 2),
            repeat,
        }
    }

    pub(crate) fn json(&self) -> String {
        let r = &self.median;
        let mut j = JsonRow {
            scenario: self.scenario,
            system: self.system,
            n: self.n,
            procs: self.procs,
            ops: r.ops,
            seconds: r.seconds,
            ops_per_sec: r.ops_per_sec(),
            ns_per_op: r.ns_per_op(),
            min_ns_per_op: self.min_ns_per_op,
            max_ns_per_op: self.max_ns_per_op,
            repeat: self.repeat,
            ..Default::default()
        };
        match &r.extra {
            Extra::None => {}
            Extra::ManyHeld {
                lock_ns_per_op,
                unlock_ns_per_op,
                warm_ns_per_op,
            } => {
                j.lock_ns_per_op = Some(*lock_ns_per_op);
                j.unlock_ns_per_op = Some(*unlock_ns_per_op);
                j.warm_ns_per_op = Some(*warm_ns_per_op);
            }
            Extra::Contention {
                p50_wait_us,
                p99_wait_us,
                share_spread,
                share_max_dev,
                exclusion_ok,
                grants,
            } => {
                j.handoffs_per_sec = Some(r.ops_per_sec());
                j.p50_wait_us = Some(*p50_wait_us);
                j.p99_wait_us = Some(*p99_wait_us);
                j.share_spread = Some(*share_spread);
                j.share_max_dev = Some(*share_max_dev);
                j.exclusion_ok = Some(*exclusion_ok);
                j.grants_per_proc = Some(grants.clone());
            }
            Extra::Connections {
                sessions,
                open_seconds,
                rss_before_kib,
                rss_after_kib,
                rss_bytes_per_session,
                anon_bytes_per_session,
                over_limit_refused,
            } => {
                j.sessions = Some(*sessions);
                j.open_seconds = Some(*open_seconds);
                j.rss_before_kib = *rss_before_kib;
                j.rss_after_kib = *rss_after_kib;
                j.rss_bytes_per_session = *rss_bytes_per_session;
                j.anon_bytes_per_session = *anon_bytes_per_session;
                j.over_limit_refused = *over_limit_refused;
            }
        }
        serde_json::to_string(&j).expect("a struct of numbers and strings serializes")
    }
}

#[derive(Serialize, Default)]
struct JsonRow {
    scenario: &'static str,
    system: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    n: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    procs: Option<usize>,
    ops: u64,
    seconds: f64,
    ops_per_sec: f64,
    ns_per_op: f64,
    min_ns_per_op: f64,
    max_ns_per_op: f64,
    repeat: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    lock_ns_per_op: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    unlock_ns_per_op: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    warm_ns_per_op: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    handoffs_per_sec: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    p50_wait_us: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    p99_wait_us: Option<f64>,
    /// max/min grants per process; null when some process got none.
    #[serde(skip_serializing_if = "Option::is_none")]
    share_spread: Option<f64>,
    /// The largest |grants - mean| / mean of one process (0.25 = 25% off an equal share).
    #[serde(skip_serializing_if = "Option::is_none")]
    share_max_dev: Option<f64>,
    /// The shared counter incremented inside the critical section equals the grants.
    #[serde(skip_serializing_if = "Option::is_none")]
    exclusion_ok: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    grants_per_proc: Option<Vec<u64>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    sessions: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    open_seconds: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    rss_before_kib: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    rss_after_kib: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    rss_bytes_per_session: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    anon_bytes_per_session: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    over_limit_refused: Option<bool>,
}

/// `1234567` as `1,234,567`.
pub(crate) fn thousands(v: f64) -> String {
    if !v.is_finite() {
        return "-".into();
    }
    let s = format!("{:.0}", v.max(0.0));
    let mut out = String::with_capacity(s.len() + s.len() / 3);
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn ratio(ns: f64, best: f64) -> String {
    format!("{:.2}x", ns / best)
}

/// A table: the "system" column left-aligned, the others right-aligned.
pub(crate) fn print_table(headers: &[&str], rows: &[Vec<String>]) {
    let widths: Vec<usize> = (0..headers.len())
        .map(|c| {
            rows.iter()
                .map(|r| r[c].chars().count())
                .chain([headers[c].len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |cells: &[String]| {
        let mut s = String::new();
        for (c, cell) in cells.iter().enumerate() {
            let w = widths[c];
            if headers[c] == "system" {
                s.push_str(&format!("{cell:<w$}  "));
            } else {
                s.push_str(&format!("{cell:>w$}  "));
            }
        }
        println!("{}", s.trim_end());
    };
    line(&headers.iter().map(|h| h.to_string()).collect::<Vec<_>>());
    for r in rows {
        line(r);
    }
}

/// Prints one scenario's rows as a table, with the ratio of each row's ns/op to the fastest in
/// its group (rows with the same `n`).
pub(crate) fn print_scenario(title: &str, rows: &[Row], notes: &[String]) {
    println!("== {title}");
    if rows.is_empty() {
        println!("(no results)");
    }
    let repeat = rows.iter().map(|r| r.repeat).max().unwrap_or(1);
    let best = |n: Option<u64>| {
        rows.iter()
            .filter(|r| r.n == n)
            .map(|r| r.median.ns_per_op())
            .fold(f64::INFINITY, f64::min)
    };
    let mut headers: Vec<&str> = Vec::new();
    let mut table = Vec::new();
    for r in rows {
        let m = &r.median;
        let mut h: Vec<&str> = Vec::new();
        let mut c: Vec<String> = Vec::new();
        if let Some(n) = r.n {
            h.push("n");
            c.push(thousands(n as f64));
        }
        h.push("system");
        c.push(r.system.to_string());
        if let Some(p) = r.procs {
            h.push("procs");
            c.push(p.to_string());
        }
        h.extend(["ops", "seconds", "ns/op"]);
        c.extend([
            thousands(m.ops as f64),
            format!("{:.3}", m.seconds),
            format!("{:.1}", m.ns_per_op()),
        ]);
        if repeat > 1 {
            h.extend(["min ns/op", "max ns/op"]);
            c.extend([format!("{:.1}", r.min_ns_per_op), format!("{:.1}", r.max_ns_per_op)]);
        }
        h.push("ops/s");
        c.push(thousands(m.ops_per_sec()));
        match &m.extra {
            Extra::None => {}
            Extra::ManyHeld {
                lock_ns_per_op,
                unlock_ns_per_op,
                warm_ns_per_op,
            } => {
                h.extend(["lock ns", "unlock ns", "warm ns/op"]);
                c.extend([
                    format!("{lock_ns_per_op:.1}"),
                    format!("{unlock_ns_per_op:.1}"),
                    format!("{warm_ns_per_op:.1}"),
                ]);
            }
            Extra::Contention {
                p50_wait_us,
                p99_wait_us,
                share_spread,
                share_max_dev,
                exclusion_ok,
                ..
            } => {
                h.extend(["p50 wait us", "p99 wait us", "spread", "max dev", "excl"]);
                c.extend([
                    format!("{p50_wait_us:.2}"),
                    format!("{p99_wait_us:.2}"),
                    if share_spread.is_finite() {
                        format!("{share_spread:.2}")
                    } else {
                        "inf".into()
                    },
                    format!("{:.0}%", share_max_dev * 100.0),
                    if *exclusion_ok { "ok".into() } else { "BROKEN".into() },
                ]);
            }
            Extra::Connections {
                sessions: _,
                open_seconds,
                rss_before_kib,
                rss_after_kib,
                rss_bytes_per_session,
                anon_bytes_per_session,
                over_limit_refused,
            } => {
                let opt = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.0}"));
                h.extend([
                    "open s",
                    "rss before KiB",
                    "rss after KiB",
                    "rss B/session",
                    "anon B/session",
                    "n+1th",
                ]);
                c.extend([
                    format!("{open_seconds:.3}"),
                    opt(rss_before_kib.map(|v| v as f64)),
                    opt(rss_after_kib.map(|v| v as f64)),
                    opt(*rss_bytes_per_session),
                    opt(*anon_bytes_per_session),
                    match over_limit_refused {
                        Some(true) => "refused".into(),
                        Some(false) => "ACCEPTED".into(),
                        None => "-".into(),
                    },
                ]);
            }
        }
        h.push("x fastest");
        c.push(ratio(m.ns_per_op(), best(r.n)));
        headers = h;
        table.push(c);
    }
    if !table.is_empty() {
        print_table(&headers, &table);
    }
    for n in notes {
        println!("  note: {n}");
    }
    println!();
}
