//! The `shmlock` admin CLI, run as a real binary against segments that child processes lock in.
//!
//! Each test has its own segment and directory ([`TestEnv`], removed on drop, also on failure);
//! lock holders are child processes re-running this binary (see `common`), so pids, owners and
//! liveness are real. Every `shmlock` run has a deadline ([`cli`]) and is killed past it.

mod common;

use std::fs;
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::Arc;

use common::cli::*;
use common::{await_file, signal, ChildCtx, TestEnv};
use serde_json::Value;

// ---- child processes -------------------------------------------------------------------------

common::child_roles! {
    "hold" => role_hold,
    "wait" => role_wait,
}

/// Locks `name` exclusively, waiting as long as it takes; writes `owner_died=BOOL` to file
/// `got`, then unlocks.
fn role_wait(ctx: &ChildCtx) {
    let name = unhex(&ctx.param::<String>("name"));
    let client = ctx.client("waiter");
    signal(&ctx.path("queued"), "");
    let g = client.lock(&name).expect("lock");
    signal(&ctx.path("got"), &format!("owner_died={}", g.owner_died()));
    g.unlock().expect("unlock");
}

// ---- helpers ---------------------------------------------------------------------------------

/// Runs `shmlock --segment SEGMENT ARGS` with `stdin`; kills it and fails after [`DEADLINE`].
fn cli(segment: &str, args: &[&str]) -> Output {
    cli_with(segment, args, None, &[])
}

fn cli_with(segment: &str, args: &[&str], stdin: Option<&[u8]>, env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_shmlock"));
    cmd.arg("--segment")
        .arg(segment)
        .args(args)
        .env_remove("SHMLOCK_SEGMENT")
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("spawn shmlock");
    if let Some(input) = stdin {
        let mut pipe = child.stdin.take().expect("stdin");
        pipe.write_all(input).expect("write stdin");
    }
    output_within(child, &format!("shmlock {args:?}"))
}

/// A file in /dev/shm made by a test (not through the library); removed on drop.
struct ShmFile {
    name: String,
    path: PathBuf,
}

impl ShmFile {
    fn new(test: &str, content: &[u8]) -> ShmFile {
        let name = format!("/shmlock-t-{test}-{}", std::process::id());
        let path = PathBuf::from(format!("/dev/shm{name}"));
        fs::write(&path, content).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        ShmFile { name, path }
    }
}

impl Drop for ShmFile {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

// ---- run ---------------------------------------------------------------------------------------

/// The critical section of the exclusion test: fails loudly if another one is inside, and
/// increments a counter by a read, a pause and a write (so overlapping runs would lose counts).
const CRITICAL: &str = r#"d="$1"
if [ -e "$d/inside" ]; then echo overlap >> "$d/violations"; fi
: > "$d/inside"
n=$(cat "$d/count")
sleep 0.01
echo $((n + 1)) > "$d/count"
rm "$d/inside"
"#;

#[test]
fn run_gives_mutual_exclusion_across_processes() {
    let env = Arc::new(TestEnv::new("run_excl"));
    fs::write(env.path("count"), "0").expect("write count");
    let (workers, rounds) = (5, 6);
    let threads: Vec<_> = (0..workers)
        .map(|_| {
            let env = Arc::clone(&env);
            std::thread::spawn(move || {
                let dir = env.dir.to_str().expect("utf-8 dir").to_string();
                for _ in 0..rounds {
                    let o = cli(
                        &env.segment,
                        &["run", "witness", "--", "sh", "-c", CRITICAL, "sh", &dir],
                    );
                    assert_code(&o, 0);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("worker thread");
    }
    assert!(
        !env.path("violations").exists(),
        "two `shmlock run`s were inside at once"
    );
    let count: u32 = fs::read_to_string(env.path("count"))
        .expect("count")
        .trim()
        .parse()
        .expect("number");
    assert_eq!(count, workers * rounds, "increments were lost");
    env.assert_quiet();
}

#[test]
fn run_exits_with_the_commands_status() {
    let env = TestEnv::new("run_status");
    assert_code(&cli(&env.segment, &["run", "job", "--", "sh", "-c", "exit 7"]), 7);
    assert_code(&cli(&env.segment, &["run", "--shared", "job", "--", "true"]), 0);
    // Killed by SIGKILL: 128 + 9, as a shell reports it.
    assert_code(&cli(&env.segment, &["run", "job", "--", "sh", "-c", "kill -9 $$"]), 137);
    let o = cli(&env.segment, &["run", "job", "--", "/nonexistent/command"]);
    assert_code(&o, 127);
    assert!(stderr(&o).contains("cannot run /nonexistent/command"), "{}", stderr(&o));
    // The command sees its arguments and the lock is held while it runs.
    let o = cli(
        &env.segment,
        &[
            "run",
            "job",
            "--",
            env!("CARGO_BIN_EXE_shmlock"),
            "--segment",
            &env.segment,
            "locks",
            "--json",
        ],
    );
    let locks = json(&o);
    assert_eq!(find(&locks, "job")["mode"], "exclusive");
    env.assert_quiet();
}

#[test]
fn run_exits_75_when_the_lock_is_not_had_in_time() {
    let env = TestEnv::new("run_busy");
    let holder = spawn_holder_apart(&env, &[("x", b"busy")], "holder", 30);
    let pid = env.pid(holder).to_string();
    let ran = env.path("ran");
    let ran = ran.to_str().expect("utf-8 path");
    let o = cli(&env.segment, &["run", "--timeout", "200ms", "busy", "--", "touch", ran]);
    assert_code(&o, EX_TEMPFAIL);
    assert!(
        stderr(&o).contains("not acquired") && stderr(&o).contains(&pid),
        "{}",
        stderr(&o)
    );
    let o = cli(&env.segment, &["run", "--nonblock", "busy", "--", "touch", ran]);
    assert_code(&o, EX_TEMPFAIL);
    assert!(
        stderr(&o).contains("busy") && stderr(&o).contains(&pid),
        "{}",
        stderr(&o)
    );
    let o = cli(&env.segment, &["run", "--shared", "-n", "busy", "--", "touch", ran]);
    assert_code(&o, EX_TEMPFAIL);
    assert!(!env.path("ran").exists(), "the command ran without the lock");
    signal(&env.path("go"), "");
    env.wait_success(holder);
    assert_code(&cli(&env.segment, &["run", "--nonblock", "busy", "--", "true"]), 0);
    let o = cli(&env.segment, &["run", "--timeout", "soon", "busy", "--", "true"]);
    assert_code(&o, 2);
    assert!(stderr(&o).contains("250ms"), "{}", stderr(&o));
    env.assert_quiet();
}

// ---- locks, owners, show, watch ----------------------------------------------------------------

#[test]
fn locks_and_owners_show_a_child_holding_locks() {
    let env = TestEnv::new("locks_json");
    let holder = spawn_holder_apart(
        &env,
        &[("x", b"orders/42"), ("s", b"config"), ("x", b"raw\xff\x01")],
        "worker-7",
        30,
    );
    let pid = u64::from(env.pid(holder));
    let locks = json(&cli(&env.segment, &["locks", "--json"]));
    assert_eq!(locks.as_array().expect("array").len(), 3, "{locks:#}");
    for (name, mode) in [
        ("orders/42", "exclusive"),
        ("config", "shared"),
        ("raw\\xff\\x01", "exclusive"),
    ] {
        let l = find(&locks, name);
        assert_eq!(l["mode"], mode, "{l:#}");
        assert_eq!(l["holders"].as_array().expect("holders").len(), 1, "{l:#}");
        let h = &l["holders"][0];
        assert_eq!(h["pid"], pid, "{l:#}");
        assert_eq!(h["label"], "worker-7");
        assert_eq!(h["kind"], "local");
        assert_eq!(h["mode"], mode);
        assert!(h["token"].as_u64().expect("token") >= 1);
        assert_eq!(l["token"], h["token"]);
        assert_eq!(l["waiters"], 0);
        assert_eq!(l["oldest_wait_ms"], Value::Null);
        assert_eq!(l["owner_died"], false);
        assert!(l["held_ms"].is_u64());
    }
    // Longest held first: they were locked in this order.
    let names: Vec<&str> = locks
        .as_array()
        .expect("array")
        .iter()
        .map(|l| l["name"].as_str().expect("name"))
        .collect();
    assert_eq!(names, ["orders/42", "config", "raw\\xff\\x01"]);
    let only = json(&cli(&env.segment, &["locks", "--json", "--name-prefix", "ord"]));
    assert_eq!(only.as_array().expect("array").len(), 1);
    assert_eq!(only[0]["name"], "orders/42");
    let none = json(&cli(&env.segment, &["locks", "--json", "--held-longer-than", "1h"]));
    assert_eq!(none, Value::Array(vec![]));
    let text = stdout(&cli(&env.segment, &["locks"]));
    assert!(
        text.contains("orders/42") && text.contains(&format!("{pid} (worker-7)")),
        "{text}"
    );

    let owners = json(&cli(&env.segment, &["owners", "--json"]));
    let mine: Vec<&Value> = owners
        .as_array()
        .expect("array")
        .iter()
        .filter(|o| o["pid"] == pid)
        .collect();
    assert_eq!(mine.len(), 1, "{owners:#}");
    let o = mine[0];
    assert_eq!(o["label"], "worker-7");
    assert_eq!(o["kind"], "local");
    assert_eq!(o["alive"], true);
    assert_eq!(o["holds"], 3);
    assert_eq!(o["waits"], 0);
    let text = stdout(&cli(&env.segment, &["owners"]));
    assert!(text.contains(&pid.to_string()) && text.contains("alive"), "{text}");

    let show = stdout(&cli(&env.segment, &["show", "orders/42"]));
    assert!(
        show.contains(&format!("pid {pid}")) && show.contains("exclusive"),
        "{show}"
    );
    let o = cli(&env.segment, &["show", "never-locked"]);
    assert_code(&o, 1);

    signal(&env.path("go"), "");
    env.wait_success(holder);
    assert_eq!(fs::read_to_string(env.path("result")).expect("result"), "ok\nok\nok");
    assert_eq!(json(&cli(&env.segment, &["locks", "--json"])), Value::Array(vec![]));
    env.assert_quiet();
}

#[test]
fn owners_reports_a_dead_owner_as_dead() {
    let env = TestEnv::new("owners_dead");
    let holder = spawn_holder_apart(&env, &[("x", b"left-behind")], "doomed", 30);
    let pid = u64::from(env.pid(holder));
    let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
    env.wait(holder);
    let owners = json(&cli(&env.segment, &["owners", "--json"]));
    let o = owners
        .as_array()
        .expect("array")
        .iter()
        .find(|o| o["pid"] == pid)
        .unwrap_or_else(|| panic!("no owner with pid {pid}: {owners:#}"));
    assert_eq!(o["alive"], false, "{o:#}");
    assert_eq!(o["holds"], 1, "{o:#}");
}

#[test]
fn show_lists_the_waiters_queue_in_order() {
    let env = TestEnv::new("show_queue");
    let holder = spawn_holder_apart(&env, &[("x", b"q")], "holder", 30);
    let waiter = env.spawn("wait", &[("name", &hex(b"q"))]);
    env.wait_for("the waiter to queue", |t| t.stats().waiting == 1);
    let l = json(&cli(&env.segment, &["show", "q", "--json"]));
    assert_eq!(l["waiters"], 1, "{l:#}");
    assert_eq!(l["queue"][0]["pid"], u64::from(env.pid(waiter)), "{l:#}");
    assert_eq!(l["queue"][0]["label"], "waiter");
    assert!(l["oldest_wait_ms"].is_u64());
    let text = stdout(&cli(&env.segment, &["show", "q"]));
    assert!(text.contains(&format!("1. pid {}", env.pid(waiter))), "{text}");
    let frame = stdout(&cli(&env.segment, &["watch", "--count", "2", "--interval", "50ms"]));
    assert!(
        frame.contains("MOST CONTENDED") && frame.contains("LONGEST HELD"),
        "{frame}"
    );
    assert_eq!(frame.matches("grants/s").count(), 2, "{frame}");
    assert!(frame.contains(&env.pid(holder).to_string()), "{frame}");
    signal(&env.path("go"), "");
    env.wait_all();
    env.assert_quiet();
}

#[test]
fn watch_quits_on_q() {
    let env = TestEnv::new("watch_q");
    let o = cli_with(&env.segment, &["watch"], Some(b"q"), &[]);
    assert_code(&o, 0);
    assert!(stdout(&o).contains("grants/s"), "{}", stdout(&o));
}

// ---- release --force -------------------------------------------------------------------------

#[test]
fn release_force_hands_the_lock_on_and_the_holder_learns_it() {
    let env = TestEnv::new("release");
    let holder = spawn_holder_apart(&env, &[("x", b"victim")], "stuck", 30);
    let waiter = env.spawn("wait", &[("name", &hex(b"victim"))]);
    env.wait_for("the waiter to queue", |t| t.stats().waiting == 1);

    let o = cli(&env.segment, &["release", "victim"]);
    assert_error_line(&o, &["--force", &env.pid(holder).to_string()]);
    assert!(!env.path("got").exists(), "released without --force");

    let o = cli(&env.segment, &["release", "victim", "--force"]);
    assert_code(&o, 0);
    assert!(
        stdout(&o).contains(&format!("pid {} (stuck)", env.pid(holder))),
        "{}",
        stdout(&o)
    );
    assert_eq!(await_file(&env.path("got")), "owner_died=true");
    env.wait_success(waiter);

    signal(&env.path("go"), "");
    env.wait_success(holder);
    assert_eq!(fs::read_to_string(env.path("result")).expect("result"), "not-held");

    let o = cli(&env.segment, &["release", "victim", "--force"]);
    assert_code(&o, 1);
    assert!(stderr(&o).contains("not held"), "{}", stderr(&o));
    assert_code(&cli(&env.segment, &["check"]), 0);
    env.assert_quiet();
}

#[test]
fn release_force_of_an_unwaited_lock_tells_the_next_locker() {
    let env = TestEnv::new("release_idle");
    let holder = spawn_holder_apart(&env, &[("s", b"shared-victim")], "reader", 30);
    assert_code(&cli(&env.segment, &["release", "--force", "shared-victim"]), 0);
    let o = cli(&env.segment, &["locks", "--json"]);
    assert_eq!(json(&o), Value::Array(vec![]));
    let c = env.client("next");
    let g = c.try_lock("shared-victim").expect("free after release --force");
    assert!(g.owner_died(), "the next grantee must be told");
    drop(g);
    signal(&env.path("go"), "");
    env.wait_success(holder);
    assert_eq!(fs::read_to_string(env.path("result")).expect("result"), "not-held");
    drop(c);
    env.assert_quiet();
}

// ---- check, status ---------------------------------------------------------------------------

/// Byte offset of region `r`, from the segment's header (region table at 176, 24 bytes each).
fn region_offset(file: &[u8], r: usize) -> usize {
    let at = 176 + r * 24;
    u64::from_le_bytes(file[at..at + 8].try_into().expect("8 bytes")) as usize
}

#[test]
fn check_exits_0_when_clean_and_1_with_findings_when_corrupt() {
    let env = TestEnv::new("check");
    let o = cli(&env.segment, &["check"]);
    assert_code(&o, 0);
    assert!(stdout(&o).starts_with("ok"), "{}", stdout(&o));

    // Corrupt the segment file: entry pool node 0 (region 3) claims state IDLE while it is on
    // the FREE list.
    let path = format!("/dev/shm{}", env.segment);
    let mut bytes = fs::read(&path).expect("read segment");
    let node = region_offset(&bytes, 3);
    assert_eq!(&bytes[node..node + 4], &[0, 0, 0, 0], "node 0 should be FREE");
    bytes[node..node + 4].copy_from_slice(&1u32.to_le_bytes());
    let f = fs::OpenOptions::new().write(true).open(&path).expect("open segment");
    std::os::unix::fs::FileExt::write_all_at(&f, &bytes[node..node + 4], node as u64).expect("write");

    let o = cli(&env.segment, &["check"]);
    assert_code(&o, 1);
    let findings = stdout(&o);
    assert!(!findings.trim().is_empty(), "no findings");
    assert!(findings.lines().all(|l| l.starts_with("shard 0: ")), "{findings}");
    let status = json(&cli(&env.segment, &["status", "--json"]));
    assert!(!status["check"]["violations"].as_array().expect("violations").is_empty());
}

#[test]
fn status_shows_pools_supervisor_and_fencing_counter() {
    let env = TestEnv::new("status");
    let holder = spawn_holder_apart(&env, &[("x", b"a"), ("x", b"b")], "h", 30);
    let s = json(&cli(&env.segment, &["status", "--json"]));
    let entries = &s["pools"][0];
    assert_eq!(entries["pool"], "lock entry");
    assert_eq!(entries["states"]["HELD"], 2, "{s:#}");
    assert_eq!(s["pools"][2]["states"]["LIVE"], 1, "{s:#}");
    // The highest token granted in any shard (tokens count per shard).
    let locks = json(&cli(&env.segment, &["locks", "--json"]));
    let max = locks
        .as_array()
        .expect("array")
        .iter()
        .map(|l| l["token"].as_u64().expect("token"))
        .max();
    assert_eq!(s["fencing_counter"].as_u64(), max, "{s:#}");
    assert_eq!(s["supervisor"]["pid"], Value::Null, "{s:#}");
    assert_eq!(s["stats"]["grants"], 2);
    let text = stdout(&cli(&env.segment, &["status"]));
    assert!(text.contains("2 HELD") && text.contains("supervisor none"), "{text}");
    signal(&env.path("go"), "");
    env.wait_success(holder);
}

// ---- errors and help ---------------------------------------------------------------------------

#[test]
fn errors_are_one_clear_line() {
    let missing = format!("/shmlock-t-missing-{}", std::process::id());
    let o = cli(&missing, &["locks"]);
    assert_error_line(
        &o,
        &[
            &missing,
            "does not exist",
            "shmlockd",
            "cargo run --release --bin shmlockd",
        ],
    );

    let o = cli("no-slash", &["status"]);
    assert_error_line(&o, &["bad segment name", "no-slash"]);

    // A file with shmlock's magic but another layout version.
    let mut header = vec![0u8; 4096];
    header[..8].copy_from_slice(b"SHMLOCK1");
    header[8..12].copy_from_slice(&99u32.to_le_bytes());
    let wrong = ShmFile::new("wrong_version", &header);
    let o = cli(&wrong.name, &["status"]);
    assert_error_line(&o, &["layout version 99", "understands version"]);

    let garbage = ShmFile::new("garbage", &[0xa5; 8192]);
    let o = cli(&garbage.name, &["locks", "--json"]);
    assert_error_line(&o, &["not a shmlock segment"]);

    let env = TestEnv::new("bad_names");
    let long = "n".repeat(65);
    for args in [
        vec!["show", ""],
        vec!["show", long.as_str()],
        vec!["release", "--force", long.as_str()],
        vec!["run", "", "--", "true"],
    ] {
        let o = cli(&env.segment, &args);
        assert_error_line(&o, &["bad lock name", "1..=64 bytes"]);
    }
}

#[test]
fn segment_comes_from_the_environment_by_default() {
    let env = TestEnv::new("env_segment");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_shmlock"));
    let o = cmd
        .args(["status", "--json"])
        .env("SHMLOCK_SEGMENT", &env.segment)
        .output()
        .expect("run shmlock");
    assert_eq!(json(&o)["segment"], env.segment.as_str());
}

#[test]
fn every_subcommand_has_help_with_an_example() {
    for sub in ["status", "locks", "owners", "show", "release", "check", "watch", "run"] {
        let o = Command::new(env!("CARGO_BIN_EXE_shmlock"))
            .args([sub, "--help"])
            .output()
            .expect("run shmlock");
        assert_code(&o, 0);
        let help = stdout(&o);
        assert!(
            help.contains("Example") && help.contains(&format!("shmlock {sub}")),
            "{sub}:\n{help}"
        );
    }
}
