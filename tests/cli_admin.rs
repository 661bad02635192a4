//! The admin CLI's operator features (issue 14, items 4 and 8): names that round-trip through
//! the shell, owners' start times, `locks --died`, `status`'s capacities, shell completions and
//! man pages. Real `shmlock` processes against segments that child processes lock in (see
//! tests/cli.rs for the conventions).

mod common;

use std::ffi::OsStr;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::process::{Command, Output, Stdio};

use common::cli::*;
use common::{signal, Daemon, GatewayDaemon, TestEnv};
use serde_json::Value;

common::child_roles! {
    "hold" => role_hold,
}

/// Runs `shmlock --segment SEGMENT ARGS` (arguments of any bytes); killed past the deadline.
fn cli(segment: &str, args: &[&[u8]]) -> Output {
    let child = Command::new(env!("CARGO_BIN_EXE_shmlock"))
        .arg("--segment")
        .arg(segment)
        .args(args.iter().map(|a| OsStr::from_bytes(a)))
        .env_remove("SHMLOCK_SEGMENT")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn shmlock");
    output_within(child, &format!("shmlock {args:?}"))
}

// ---- names -----------------------------------------------------------------------------------

#[test]
fn every_name_locks_prints_is_accepted_back_by_show_and_release() {
    let env = TestEnv::new("names_round_trip");
    let odd: &[u8] = b"job\0\xff\\x41";
    let holder = spawn_holder(&env, &[("x", odd), ("x", b"plain")], "odd-names");
    let pid = env.pid(holder).to_string();

    // What `locks` prints for it, read from its table as a user would.
    let text = stdout(&cli(&env.segment, &[b"locks"]));
    let printed = text
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .find(|n| n.starts_with("job"))
        .unwrap_or_else(|| panic!("no job... lock in:\n{text}"))
        .to_string();
    assert_eq!(printed, r"job\x00\xff\\x41");
    let locks = json(&cli(&env.segment, &[b"locks", b"--json"]));
    find(&locks, &printed);

    // `show` and `locks --name-prefix` take the printed form back.
    let o = cli(&env.segment, &[b"show", printed.as_bytes()]);
    assert_code(&o, 0);
    assert!(stdout(&o).contains(&format!("pid {pid}")), "{}", stdout(&o));
    let l = json(&cli(&env.segment, &[b"show", b"--json", printed.as_bytes()]));
    assert_eq!(l["name"], printed.as_str());
    let only = json(&cli(
        &env.segment,
        &[b"locks", b"--json", b"--name-prefix", br"job\x00\xff"],
    ));
    assert_eq!(only.as_array().expect("array").len(), 1, "{only:#}");
    // Taken byte for byte, the printed text names another lock (none).
    assert_code(&cli(&env.segment, &[b"show", b"--raw", printed.as_bytes()]), 1);

    // A malformed escape is a clear error that says how to write a backslash.
    for bad in [&br"job\q"[..], br"job\x4", br"job\"] {
        let o = cli(&env.segment, &[b"show", bad]);
        assert_error_line(&o, &["bad lock name", r"\\", "--raw"]);
        let o = cli(&env.segment, &[b"release", b"--force", bad]);
        assert_error_line(&o, &["bad lock name", r"\\"]);
    }

    // And `release --force` frees it.
    let o = cli(&env.segment, &[b"release", b"--force", printed.as_bytes()]);
    assert_code(&o, 0);
    assert!(stdout(&o).contains(&printed), "{}", stdout(&o));
    let left = json(&cli(&env.segment, &[b"locks", b"--json"]));
    let names: Vec<&str> = left
        .as_array()
        .expect("array")
        .iter()
        .map(|l| l["name"].as_str().expect("name"))
        .collect();
    assert_eq!(names, ["plain"]);
    signal(&env.path("go"), "");
    env.wait_success(holder);
    assert_eq!(fs::read_to_string(env.path("result")).expect("result"), "not-held\nok");
    env.assert_quiet();
}

#[test]
fn name_prefix_is_read_back_through_a_gateway_too() {
    let env = TestEnv::new("names_remote");
    let d = GatewayDaemon::start(&env, None);
    let holder = spawn_holder(&env, &[("x", b"job\0\xff"), ("x", b"job\x01")], "odd");
    let o = bare(&["locks", "--remote", &d.addr, "--json", "--name-prefix", r"job\x00"]);
    assert_eq!(names(&json(&o)), [r"job\x00\xff"]);
    let o = bare(&["locks", "--remote", &d.addr, "--name-prefix", r"job\q"]);
    assert_error_line(&o, &["bad --name-prefix", r"\\"]);
    signal(&env.path("go"), "");
    env.wait_success(holder);
}

#[test]
fn raw_takes_the_name_byte_for_byte() {
    let env = TestEnv::new("names_raw");
    // Any bytes but NUL can be an argument: a backslash and a byte that is not UTF-8.
    let name: &[u8] = b"back\\slash\xfe";
    let holder = spawn_holder(&env, &[("x", name)], "raw");
    let l = json(&cli(&env.segment, &[b"show", b"--json", b"--raw", name]));
    assert_eq!(l["name"], r"back\\slash\xfe");
    let only = json(&cli(
        &env.segment,
        &[b"locks", b"--json", b"--raw", b"--name-prefix", b"back\\s"],
    ));
    assert_eq!(only.as_array().expect("array").len(), 1, "{only:#}");
    // Without --raw, `\s` is not an escape.
    assert_error_line(&cli(&env.segment, &[b"show", name]), &["bad lock name", r"\\"]);
    assert_code(&cli(&env.segment, &[b"release", b"--force", b"--raw", name]), 0);
    signal(&env.path("go"), "");
    env.wait_success(holder);
    assert_eq!(fs::read_to_string(env.path("result")).expect("result"), "not-held");
}

// ---- owners ----------------------------------------------------------------------------------

/// Field 22 of /proc/PID/stat (start time, clock ticks since boot), and `btime` of /proc/stat.
fn proc_start_and_boot(pid: u32) -> (u64, u64) {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    let rest = &stat[stat.rfind(')').expect(")") + 1..];
    let start = rest
        .split_whitespace()
        .nth(19)
        .expect("field 22")
        .parse()
        .expect("ticks");
    let boot = fs::read_to_string("/proc/stat").expect("/proc/stat");
    let btime = boot
        .lines()
        .find_map(|l| l.strip_prefix("btime "))
        .expect("btime")
        .trim()
        .parse()
        .expect("btime");
    (start, btime)
}

#[test]
fn owners_show_each_process_start_time() {
    let env = TestEnv::new("owners_start");
    let holder = spawn_holder(&env, &[("x", b"started")], "starter");
    let pid = env.pid(holder);
    let (ticks, btime) = proc_start_and_boot(pid);
    let owners = json(&cli(&env.segment, &[b"owners", b"--json"]));
    let o = owners
        .as_array()
        .expect("array")
        .iter()
        .find(|o| o["pid"] == pid)
        .unwrap_or_else(|| panic!("no owner {pid}: {owners:#}"));
    assert_eq!(o["start_time_ticks"], ticks, "{o:#}");
    let unix = o["started_unix"].as_f64().expect("started_unix");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after the epoch")
        .as_secs_f64();
    assert!(
        unix >= btime as f64 && unix <= now + 1.0,
        "{unix} not in [{btime}, {now}]"
    );
    let started = o["started"].as_str().expect("started");
    assert!(started.ends_with('Z') && started.len() == 20, "{started}");
    let text = stdout(&cli(&env.segment, &[b"owners"]));
    assert!(
        text.contains("STARTED (UTC)") && text.contains(&format!("{started} (")),
        "{text}"
    );
    signal(&env.path("go"), "");
    env.wait_success(holder);
}

// ---- locks --died ----------------------------------------------------------------------------

/// The names in a `locks --json` array.
fn names(locks: &Value) -> Vec<&str> {
    let mut v: Vec<&str> = locks
        .as_array()
        .expect("array")
        .iter()
        .map(|l| l["name"].as_str().expect("name"))
        .collect();
    v.sort_unstable();
    v
}

#[test]
fn locks_died_without_shmlockd_lists_a_dead_holder_then_its_notices() {
    let env = TestEnv::new("died_unsupervised");
    let holder = spawn_holder(&env, &[("x", b"first"), ("s", b"second")], "doomed");
    let alive = spawn_holder(&env, &[("x", b"kept")], "alive");
    // (Both write file `held`: wait for the second's lock itself.)
    env.wait_for("the second holder to lock", |t| t.locks().len() == 3);
    assert_eq!(
        json(&cli(&env.segment, &[b"locks", b"--died", b"--json"])),
        Value::Array(vec![])
    );
    let text = stdout(&cli(&env.segment, &[b"locks", b"--died"]));
    assert!(text.contains("no lock has a dead holder"), "{text}");
    env.kill(holder);

    // Nobody has reaped it (no shmlockd, nobody wanted its locks): still held, by the dead.
    let died = json(&cli(&env.segment, &[b"locks", b"--died", b"--json"]));
    assert_eq!(names(&died), ["first", "second"], "{died:#}");
    assert!(
        died.as_array().expect("array").iter().all(|l| l["holder_dead"] == true),
        "{died:#}"
    );
    let text = stdout(&cli(&env.segment, &[b"locks"]));
    let line = text.lines().find(|l| l.starts_with("first")).expect("first listed");
    assert!(line.contains("holder-dead"), "{text}");
    let kept = text.lines().find(|l| l.starts_with("kept")).expect("kept listed");
    assert!(!kept.contains("holder-dead"), "{text}");
    let show = stdout(&cli(&env.segment, &[b"show", b"first"]));
    assert!(show.contains("(process gone, not reaped yet)"), "{show}");
    assert_eq!(
        json(&cli(&env.segment, &[b"show", b"--json", b"first"]))["holder_dead"],
        true
    );
    let show = stdout(&cli(&env.segment, &[b"show", b"kept"]));
    assert!(!show.contains("process gone"), "{show}");

    // Wanting one lock reaps the dead owner: both are freed with the notice; the one nobody
    // took is listed by --died alone (nobody holds or waits on it).
    let c = env.client("next");
    let g = c.try_lock("first").expect("the dead holder is reaped");
    assert!(g.owner_died());
    let died = json(&cli(&env.segment, &[b"locks", b"--died", b"--json"]));
    assert_eq!(names(&died), ["second"], "{died:#}");
    let l = &died[0];
    assert_eq!(
        (&l["mode"], &l["owner_died"], &l["holder_dead"]),
        (&Value::Null, &Value::Bool(true), &Value::Bool(false))
    );
    assert_eq!(l["holders"], Value::Array(vec![]));
    assert_eq!(
        names(&json(&cli(&env.segment, &[b"locks", b"--json"]))),
        ["first", "kept"]
    );
    let text = stdout(&cli(&env.segment, &[b"locks", b"--died"]));
    let line = text
        .lines()
        .find(|l| l.starts_with("second"))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(line.contains("none") && line.contains("owner-died"), "{text}");
    // Its next holder is told, and the notice is gone.
    assert!(c.try_lock("second").expect("free").owner_died());
    assert_eq!(
        json(&cli(&env.segment, &[b"locks", b"--died", b"--json"])),
        Value::Array(vec![])
    );
    drop(g);
    signal(&env.path("go"), "");
    env.wait_success(alive);
}

#[test]
fn locks_died_with_shmlockd_lists_what_its_reaper_freed() {
    let env = TestEnv::new("died_supervised");
    let _daemon = Daemon::start(&env);
    let holder = spawn_holder(&env, &[("x", b"job\xff")], "doomed");
    env.kill(holder);
    env.wait_for("shmlockd to reap the dead holder", |t| t.died_locks().len() == 1);
    let died = json(&cli(&env.segment, &[b"locks", b"--died", b"--json"]));
    assert_eq!(names(&died), [r"job\xff"], "{died:#}");
    assert_eq!(died[0]["owner_died"], true);
    assert_eq!(json(&cli(&env.segment, &[b"locks", b"--json"])), Value::Array(vec![]));
    // The printed name is accepted back by show, which tells of the notice.
    let show = stdout(&cli(&env.segment, &[b"show", br"job\xff"]));
    assert!(show.contains("owner died yes"), "{show}");
}

// ---- status ----------------------------------------------------------------------------------

#[test]
fn status_says_what_was_requested_and_what_each_shard_provides() {
    let env = TestEnv::new("status_caps");
    let s = json(&cli(&env.segment, &[b"status", b"--json"]));
    let (caps, geo) = (&s["capacities"], &s["geometry"]);
    let shards = geo["shards"].as_u64().expect("shards");
    let per_shard = geo["entries_per_shard"].as_u64().expect("entries per shard");
    let entries = caps["provisioned_entries"].as_u64().expect("provisioned");
    assert_eq!(entries, shards * per_shard);
    assert_eq!(s["pools"][0]["capacity"].as_u64(), Some(entries), "{s:#}");
    assert_eq!(
        caps["provisioned_holds"].as_u64(),
        s["pools"][1]["capacity"].as_u64(),
        "{s:#}"
    );
    let requested = caps["max_locks"].as_u64().expect("max_locks");
    assert!(shards > 1 && entries > requested, "{s:#}");

    let text = stdout(&cli(&env.segment, &[b"status"]));
    let line = |label: &str| {
        text.lines()
            .find(|l| l.starts_with(label))
            .unwrap_or_else(|| panic!("no {label} line in:\n{text}"))
            .to_string()
    };
    // The two totals are each named for what they are.
    assert!(line("capacity").contains(&format!("{requested} locks")), "{text}");
    assert!(line("capacity").contains("requested"), "{text}");
    assert!(line("shards").contains(&format!("{entries} entries")), "{text}");
    assert!(line("shards").contains("provisioned"), "{text}");
    let headroom = line("headroom");
    assert!(
        headroom.contains("hash") && headroom.contains(&format!("{per_shard} entries per shard")),
        "{text}"
    );
    assert!(
        headroom.contains(&format!("would put {}", requested.div_ceil(shards))),
        "{text}"
    );
    assert!(line("entries").ends_with(&format!("of {entries}")), "{text}");
}

// ---- completions and man pages ---------------------------------------------------------------

/// `shmlock ARGS` with no segment.
fn bare(args: &[&str]) -> Output {
    let child = Command::new(env!("CARGO_BIN_EXE_shmlock"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn shmlock");
    output_within(child, &format!("shmlock {args:?}"))
}

const SUBCOMMANDS: [&str; 10] = [
    "status",
    "locks",
    "owners",
    "show",
    "release",
    "check",
    "watch",
    "run",
    "completions",
    "manpages",
];

#[test]
fn completions_are_written_for_each_shell_and_name_every_subcommand() {
    for shell in ["bash", "zsh", "fish"] {
        let o = bare(&["completions", shell]);
        assert_code(&o, 0);
        let script = stdout(&o);
        assert!(script.contains("shmlock"), "{shell}:\n{script}");
        for sub in SUBCOMMANDS {
            assert!(script.contains(sub), "{shell} completion lacks {sub}");
        }
        // (fish writes long options without their dashes.)
        for flag in ["name-prefix", "died", "raw", "held-longer-than"] {
            assert!(script.contains(flag), "{shell} completion lacks {flag}");
        }
    }
    // bash can load its script.
    if Command::new("bash").arg("--version").output().is_ok() {
        let script = stdout(&bare(&["completions", "bash"]));
        let o = Command::new("bash")
            .args(["-c", &format!("{script}\ncomplete -p shmlock")])
            .output()
            .expect("bash");
        assert_code(&o, 0);
        assert!(stdout(&o).contains("shmlock"), "{}", stdout(&o));
    }
    let o = bare(&["completions", "tcsh"]);
    assert_code(&o, 2);
    assert!(stderr(&o).contains("bash"), "{}", stderr(&o));
}

#[test]
fn manpages_writes_valid_roff_for_shmlock_each_subcommand_and_shmlockd() {
    /// Removes the directory when dropped, also when the test fails.
    struct TempDir(std::path::PathBuf);
    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }
    let tmp = TempDir(std::env::temp_dir().join(format!("shmlock-t-manpages-{}", std::process::id())));
    let dir = &tmp.0;
    let _ = fs::remove_dir_all(dir);
    let o = bare(&["manpages", dir.to_str().expect("utf-8 path")]);
    assert_code(&o, 0);
    let mut want: Vec<String> = SUBCOMMANDS.iter().map(|s| format!("shmlock-{s}.1")).collect();
    want.push("shmlock.1".into());
    want.push("shmlockd.8".into());
    let printed = stdout(&o);
    let listed: Vec<&str> = printed.lines().collect();
    for page in &want {
        let path = dir.join(page);
        assert!(
            listed.contains(&path.to_str().expect("utf-8")),
            "{page} not listed: {listed:?}"
        );
        let roff = fs::read_to_string(&path).unwrap_or_else(|e| panic!("{page}: {e}"));
        let (name, section) = page.rsplit_once('.').expect("NAME.SECTION");
        // The title macro comes before any text (after clap_mangen's one string definition).
        let first_macro = roff
            .lines()
            .find(|l| !l.starts_with(".ie") && !l.starts_with(".el"))
            .expect("lines");
        assert!(
            first_macro.starts_with(&format!(".TH {name} {section}")),
            "{page}: {first_macro}"
        );
        assert!(roff.contains(".SH NAME") && roff.contains(".SH SYNOPSIS"), "{page}");
    }
    assert!(fs::read_to_string(dir.join("shmlock-show.1"))
        .expect("show")
        .contains("byte for byte"));
    assert!(fs::read_to_string(dir.join("shmlockd.8"))
        .expect("shmlockd")
        .contains("max\\-locks"));
    // man renders each without a warning, where man exists.
    if Command::new("man")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
    {
        for page in &want {
            let o = Command::new("man")
                .args(["--warnings", "-l"])
                .arg(dir.join(page))
                .env("MANWIDTH", "80")
                .env("MANPAGER", "cat")
                .output()
                .expect("man");
            assert_code(&o, 0);
            assert!(stderr(&o).is_empty(), "{page}: {}", stderr(&o));
            assert!(stdout(&o).contains("SYNOPSIS"), "{page}: {}", stdout(&o));
        }
    }
}

// ---- error messages --------------------------------------------------------------------------

/// A phrase of two plain words that comes twice in `msg` ("cannot open segment /x: ... segment
/// /x" is fine, "cannot connect: cannot connect" is not), if any.
fn repeated_phrase(msg: &str) -> Option<String> {
    let words: Vec<Option<String>> = msg
        .split_whitespace()
        .map(|w| {
            let w = w.trim_matches(|c: char| !c.is_alphanumeric());
            (!w.is_empty() && w.chars().all(char::is_alphabetic)).then(|| w.to_lowercase())
        })
        .collect();
    let pairs: Vec<String> = words
        .windows(2)
        .filter_map(|p| match p {
            [Some(a), Some(b)] => Some(format!("{a} {b}")),
            _ => None,
        })
        .collect();
    pairs
        .iter()
        .enumerate()
        .find(|(i, p)| pairs[i + 1..].contains(p))
        .map(|(_, p)| p.clone())
}

#[test]
fn error_messages_name_the_next_step_once() {
    assert_eq!(
        repeated_phrase("cannot connect to x: cannot connect: refused").as_deref(),
        Some("cannot connect")
    );
    let missing = format!("/shmlock-t-none-{}", std::process::id());
    let o = cli(&missing, &[b"locks"]);
    // The suggested command carries the segment name given.
    assert_error_line(
        &o,
        &[
            &format!("`shmlockd --segment {missing}`"),
            &format!("-- --segment {missing}"),
        ],
    );
    let env = TestEnv::new("messages");
    let long = "n".repeat(65);
    let cases: Vec<(Vec<&[u8]>, Vec<&str>)> = vec![
        (
            vec![b"show", long.as_bytes()],
            vec!["bad lock name", "65 bytes", "1..=64 bytes"],
        ),
        (vec![b"show", br"a\q"], vec!["bad lock name", r"\\"]),
        (
            vec![b"locks", b"--name-prefix", br"a\"],
            vec!["bad --name-prefix", "lone backslash"],
        ),
        (
            vec![b"--segment-owner", b"nobody-such-user", b"status"],
            vec!["bad --segment-owner", "nobody-such-user"],
        ),
    ];
    for (args, parts) in cases {
        let o = cli(&env.segment, &args);
        assert_error_line(&o, &parts);
        assert_eq!(repeated_phrase(&stderr(&o)), None, "{}", stderr(&o));
    }
    let o = bare(&["locks", "--died", "--remote", "127.0.0.1:1"]);
    assert_error_line(&o, &["--died needs the segment"]);
    let o = cli(&missing, &[b"status"]);
    assert_eq!(repeated_phrase(&stderr(&o)), None, "{}", stderr(&o));
    let o = cli("no-slash", &[b"status"]);
    assert_error_line(&o, &["bad segment name \"no-slash\""]);
    assert_eq!(repeated_phrase(&stderr(&o)), None, "{}", stderr(&o));
}
