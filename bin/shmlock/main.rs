//! `shmlock`: the admin CLI. Works on the segment directly; no daemon needed.
//!
//! Subcommands: `status`, `locks`, `owners`, `show`, `release --force`, `check`, `watch`, `run`,
//! and `completions` and `manpages` (generated from these definitions, in `docs`). Parsing and
//! dispatch live here, text and JSON in `render`, the live view in `watch`, and `run` (flock(1)
//! for named locks) in `exec`. Lock names given to `show`, `release` and `locks --name-prefix`
//! are read in the form `locks` prints them (`render::unescape_name`), or byte for byte with
//! `--raw`. `status`, `locks` and `run` also work through
//! shmlockd's gateway with `--remote HOST:PORT` (`remote`, and `exec` for `run`); the other
//! subcommands need the segment (they do not offer `--remote`). `locks` and `run` also work on
//! an etcd cluster with `--etcd URL[,URL...]` (`etcd`; a build without the `etcd` feature says
//! how to get one).
//!
//! Exit status: 0 ok; 1 when `check` finds problems, `release` finds the lock not held, or `show`
//! finds no such lock; 2 on errors (one line on stderr, `shmlock: ...`); `run` exits with its
//! command's status, or 75 (EX_TEMPFAIL) when the lock was not had in time. A closed stdout
//! (`| head`) exits 0.
#![cfg_attr(not(test), no_main)]

// The unwinder linked in statically (libgcc_eh, as a `crt-static` build links it), so that the
// binary needs no libgcc_s.so.1: each process start then maps and relocates one library fewer and
// skips its constructor's CPUID probing (which traps in some VMs): `run`'s overhead (issue 14,
// `shmlock-bench run-overhead`). Ahead of std's `-lgcc_s` on the link line, it defines every
// `_Unwind_*` symbol, and `--as-needed` drops libgcc_s. It ships with gcc next to libgcc_s.so
// (the same package), so a toolchain that links this binary has it. This binary only: the
// library, and the C and Python bindings, keep the system's shared unwinder.
#[cfg(all(target_os = "linux", target_env = "gnu", not(target_feature = "crt-static")))]
#[link(name = "gcc_eh", kind = "static", modifiers = "-bundle")]
extern "C" {}

mod docs;
mod etcd;
mod exec;
mod keeper;
mod remote;
mod render;
mod watch;

use std::collections::HashSet;
use std::ffi::OsString;
use std::io::{ErrorKind, Write};
use std::os::unix::ffi::OsStrExt;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Result};
use clap::{Args, Parser, Subcommand};
use shmlock::shm::{default_segment_name, SegmentOwner};
use shmlock::{Error, LockTable};

use remote::RemoteArgs;
use render::{escape_name, CheckOutcome, Status};

/// How long `status` and `check` wait for the check (which takes every shard's latch in turn).
/// A latch is held for a few dozen instructions; one that stays taken this long belongs to a
/// dead process.
const CHECK_TIMEOUT: Duration = Duration::from_secs(10);

/// Exit status when `check` finds problems, or the lock to release or show is not there.
const EXIT_FOUND: u8 = 1;
/// Exit status on errors.
const EXIT_ERROR: u8 = 2;

/// Inspect and administer a shmlock segment.
#[derive(Debug, Parser)]
#[command(
    version,
    after_help = "Examples:\n  shmlock status\n  shmlock locks --held-longer-than 5s\n  \
                  shmlock run --timeout 2s nightly-backup -- ./backup.sh\n  \
                  SHMLOCK_SEGMENT=/test shmlock owners --json"
)]
struct Cli {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    command: Command,
}

/// The options every subcommand takes.
#[derive(Debug, Args)]
struct Global {
    /// Segment name, e.g. /shmlock [default: $SHMLOCK_SEGMENT, then /shmlock].
    #[arg(long, global = true, value_name = "NAME")]
    segment: Option<String>,
    /// User name or uid that must own the segment's file [default: $SHMLOCK_SEGMENT_OWNER, then
    /// your own user or root].
    #[arg(long, global = true, value_name = "USER")]
    segment_owner: Option<String>,
}

/// Parses the command line. `run`'s start-up is on the path of the command it runs (issue 14),
/// and clap's parse costs about 0.15 ms of it (building the arguments, mostly: clap builds every
/// subcommand's before it parses), so `run`'s common forms are read by [`parse_run`], and its
/// others with a command that has `run` alone ([`run_only_command`]); tests hold both to what the
/// full parser says.
fn parse() -> Cli {
    let args: Vec<OsString> = std::env::args_os().collect();
    if !is_run(&args) {
        return Cli::parse_from(args);
    }
    if let Some(cli) = parse_run(&args) {
        return cli;
    }
    let matches = run_only_command().get_matches_from(args);
    <Cli as clap::FromArgMatches>::from_arg_matches(&matches).unwrap_or_else(|e| e.exit())
}

/// Is the subcommand `run`: only global options (`--segment X`, `--segment-owner=X`) before it?
fn is_run(args: &[OsString]) -> bool {
    let mut rest = args.iter().skip(1).map(|a| a.as_bytes());
    while let Some(a) = rest.next() {
        match a {
            b"run" => return true,
            b"--segment" | b"--segment-owner" => {
                if rest.next().is_none() {
                    return false;
                }
            }
            _ if a.starts_with(b"--segment=") || a.starts_with(b"--segment-owner=") => {}
            _ => return false,
        }
    }
    false
}

/// `run`'s common forms, read without clap: `shmlock [--segment S] [--segment-owner U] run
/// [OPTIONS] NAME [--] CMD...`, where OPTIONS are -s, -x (-e), -n, -o (or their long forms), -w
/// SECONDS and -E N, each at most once and as separate words, and CMD does not start with `-`
/// unless after `--`. None for anything else (help, errors, other options, other spellings),
/// which clap then parses, and explains. What it returns is what clap would (a test compares
/// them).
fn parse_run(args: &[OsString]) -> Option<Cli> {
    // An option's value: clap takes no word that starts with `-` as one, nor (for these) bytes
    // that are not UTF-8.
    fn value(v: Option<&OsString>) -> Option<&str> {
        v.and_then(|v| v.to_str()).filter(|v| !v.starts_with('-'))
    }
    let mut words = args.iter().skip(1);
    let (mut segment, mut segment_owner) = (None, None);
    loop {
        match words.next()?.as_bytes() {
            b"run" => break,
            b"--segment" if segment.is_none() => segment = Some(value(words.next())?.to_string()),
            b"--segment-owner" if segment_owner.is_none() => segment_owner = Some(value(words.next())?.to_string()),
            _ => return None,
        }
    }
    let (mut shared, mut exclusive, mut nonblock, mut close) = (false, false, false, false);
    let (mut timeout, mut conflict_exit_code) = (None, None);
    let name = loop {
        let word = words.next()?;
        let flag = match word.as_bytes() {
            b"-s" | b"--shared" => &mut shared,
            b"-x" | b"-e" | b"--exclusive" => &mut exclusive,
            b"-n" | b"--nonblock" | b"--nb" => &mut nonblock,
            b"-o" | b"--close" => &mut close,
            b"-w" | b"--timeout" | b"--wait" if timeout.is_none() => {
                timeout = Some(parse_seconds(value(words.next())?).ok()?);
                continue;
            }
            b"-E" | b"--conflict-exit-code" if conflict_exit_code.is_none() => {
                let n = value(words.next())?;
                conflict_exit_code = Some(n.parse::<u8>().ok().filter(|_| n.bytes().all(|b| b.is_ascii_digit()))?);
                continue;
            }
            b"" => return None,
            w if w[0] == b'-' => return None,
            _ => break word.clone(),
        };
        if std::mem::replace(flag, true) {
            return None;
        }
    };
    let mut command: Vec<OsString> = words.cloned().collect();
    match command.first()?.as_bytes() {
        b"--" => drop(command.remove(0)),
        w if w.first() == Some(&b'-') => return None,
        _ => {}
    }
    if command.is_empty() || (shared && exclusive) {
        return None;
    }
    Some(Cli {
        global: Global { segment, segment_owner },
        command: Command::Run(RunArgs {
            shared,
            exclusive,
            timeout,
            nonblock,
            conflict_exit_code: conflict_exit_code.unwrap_or(exec::EX_TEMPFAIL),
            command_string: None,
            close,
            lost_exit_code: None,
            remote: RemoteArgs::default(),
            etcd: etcd::EtcdArgs::default(),
            kill_on_loss: false,
            name,
            command,
        }),
    })
}

/// [`Cli`]'s command with the `run` subcommand alone.
fn run_only_command() -> clap::Command {
    let run = <RunArgs as Args>::augment_args(clap::Command::new("run"))
        .about(exec::RUN_ABOUT)
        .after_help(exec::RUN_HELP);
    <Global as Args>::augment_args(clap::Command::new(env!("CARGO_PKG_NAME")))
        .subcommand(run)
        .subcommand_required(true)
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Capacities, counts per pool state, supervisor, fencing counter, totals, and a check.
    #[command(after_help = "Examples:\n  shmlock status --json | jq .pools\n  \
                            SHMLOCK_AUTH_TOKEN=s3cret shmlock status --remote 10.0.0.5:7411")]
    Status {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        remote: RemoteArgs,
    },
    /// Every lock held or waited on: holders, how long, waiters, token; longest held first.
    #[command(
        after_help = "With --etcd: one line per key of each lock, its holders and then its waiters in \
                            queue order (locks whose oldest key is oldest first): STATE, MODE, LEASE (the \
                            session's lease id, hex), AGE (since the key was put, by its host's clock), \
                            PID, HOST and LABEL as shmlock put them (`-` for the keys of `etcdctl lock` \
                            and other clients, which say nothing), REVISION (the key's create revision: a \
                            holder's fencing token). --held-longer-than compares the holders' AGE.\n\n\
                            Examples:\n  shmlock locks\n  shmlock locks --name-prefix orders/ \
                            --held-longer-than 30s\n  shmlock locks --json | jq '.[0].holders'\n  \
                            shmlock locks --died\n  \
                            shmlock locks --remote 10.0.0.5:7411 --auth-token-file /etc/shmlock/token\n  \
                            shmlock locks --etcd http://10.0.0.1:2379,http://10.0.0.2:2379 --json"
    )]
    Locks(LocksArgs),
    /// Every registered owner (client handle): pid, kind, label, alive or dead, locks held.
    #[command(after_help = "Example:\n  shmlock owners --json | jq '.[] | select(.alive | not)'")]
    Owners {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Everything about one lock: holders, and the waiters queue in order.
    #[command(after_help = concat!(
        "NAME is written as `locks` prints it: ",
        names_help!(),
        "\n\nExamples:\n  shmlock show orders/42\n  shmlock show 'raw\\x00\\xff'\n  \
         shmlock show --raw \"$(printf 'a\\\\b')\""
    ))]
    Show {
        /// The lock name, as `locks` prints it (see below), or byte for byte with --raw.
        name: OsString,
        #[command(flatten)]
        raw: RawName,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Take a lock away from its holder(s); the next waiter gets it and is told the owner died.
    #[command(after_help = concat!(
        "The holder is not told until it next uses the lock (its unlock then reports that it no \
         longer holds it), so use this only on a holder that is stuck or gone.\n\n\
         NAME is written as `locks` prints it: ",
        names_help!(),
        "\n\nExamples:\n  shmlock release orders/42 --force\n  \
         shmlock release --force 'job\\x00\\xff'"
    ))]
    Release {
        /// The lock name, as `locks` prints it (see below), or byte for byte with --raw.
        name: OsString,
        #[command(flatten)]
        raw: RawName,
        /// Really take the lock away (required).
        #[arg(long)]
        force: bool,
    },
    /// Check every invariant of the table: exit 0 when consistent, 1 with one line per finding.
    #[command(after_help = "Example:\n  shmlock check || echo \"segment needs attention\"")]
    Check,
    /// A live view (every second): busiest and longest-held locks, grants/s, waits/s; q quits.
    #[command(after_help = "Example:\n  shmlock watch\n  shmlock watch --count 3 > snapshot.txt")]
    Watch {
        /// Seconds between refreshes, e.g. 1s or 500ms.
        #[arg(long, default_value = "1s", value_parser = parse_duration, value_name = "DURATION")]
        interval: Duration,
        /// Stop after this many refreshes [default: until q or Ctrl-C].
        #[arg(long, value_name = "N")]
        count: Option<u64>,
    },
    #[command(about = exec::RUN_ABOUT, after_help = exec::RUN_HELP)]
    Run(RunArgs),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell) on stdout.
    #[command(after_help = "Examples:\n  \
        shmlock completions bash > /etc/bash_completion.d/shmlock\n  \
        shmlock completions zsh > \"${fpath[1]}/_shmlock\"\n  \
        shmlock completions fish > ~/.config/fish/completions/shmlock.fish")]
    Completions {
        /// The shell.
        #[arg(value_name = "SHELL")]
        shell: clap_complete::Shell,
    },
    /// Write the man pages into DIR: shmlock.1, one per subcommand, and shmlockd.8.
    ///
    /// shmlock.1 and shmlock-SUBCOMMAND.1 come from this shmlock; shmlockd.8 from the shmlockd
    /// beside it (its hidden `--manpage` flag prints that page), else it says how to write it.
    #[command(after_help = "Examples:\n  shmlock manpages /usr/local/share/man/man1 && \
        mv /usr/local/share/man/man1/shmlockd.8 /usr/local/share/man/man8/\n  \
        shmlock manpages target/man && man -l target/man/shmlock-run.1")]
    Manpages {
        /// The directory (made if missing).
        #[arg(value_name = "DIR")]
        dir: std::path::PathBuf,
    },
}

/// How the CLI reads a lock name back (`show`, `release`, `locks --name-prefix`): the form that
/// `locks` prints, for the `after_help` of those subcommands.
macro_rules! names_help {
    () => {
        "printable text stands for itself, `\\\\` for a backslash, `\\xNN` for the byte NN \
         (two hex digits: control characters and bytes that are not UTF-8), `\\u{X}` for the \
         character U+X (other control characters); any other backslash is an error. Quote it for \
         the shell ('a\\x00b'). With --raw, NAME is taken byte for byte instead."
    };
}
use names_help;

/// `--raw`: take a lock name (or prefix) byte for byte instead of in the form `locks` prints.
#[derive(Debug, Clone, Copy, Args)]
struct RawName {
    /// Take NAME byte for byte, backslashes included, instead of in the escaped form that `locks`
    /// prints.
    #[arg(long)]
    raw: bool,
}

impl RawName {
    /// The bytes the lock name `arg` stands for: unescaped as `locks` prints names, or as they
    /// are with `--raw`.
    fn bytes(self, arg: &std::ffi::OsStr) -> Result<Vec<u8>> {
        self.read(arg, "lock name")
    }

    /// [`bytes`](Self::bytes) of `arg`, which is a `what` (for the error).
    fn read(self, arg: &std::ffi::OsStr, what: &str) -> Result<Vec<u8>> {
        if self.raw {
            return Ok(arg.as_bytes().to_vec());
        }
        render::unescape_name(arg.as_bytes()).map_err(|e| anyhow!("bad {what} \"{}\": {e}", arg.to_string_lossy()))
    }
}

#[derive(Debug, Args)]
struct LocksArgs {
    /// Only locks whose name starts with PREFIX, written as `locks` prints names (`\\`, `\xNN`,
    /// `\u{X}`), or byte for byte with --raw.
    #[arg(long, value_name = "PREFIX")]
    name_prefix: Option<OsString>,
    /// Take PREFIX byte for byte, backslashes included, instead of in the escaped form that
    /// `locks` prints.
    #[arg(long, requires = "name_prefix")]
    raw: bool,
    /// Only locks whose holder died: those still held by a dead process that nobody has reaped
    /// yet (FLAGS holder-dead), and those it left free with nobody waiting, whose next holder is
    /// told the owner died (FLAGS owner-died, MODE none; plain `locks` does not list these).
    #[arg(long)]
    died: bool,
    /// Only locks held longer than this, e.g. 250ms, 5s, 2m.
    #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
    held_longer_than: Option<Duration>,
    /// Print a JSON array instead of a table.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    remote: RemoteArgs,
    #[command(flatten)]
    etcd: etcd::EtcdArgs,
}

#[derive(Debug, Args)]
#[command(group = clap::ArgGroup::new("network").args(["remote", "etcd"]).multiple(true))]
pub(crate) struct RunArgs {
    /// Take the lock in shared mode, flock(1)'s read lock [default: exclusive].
    #[arg(long, short = 's', conflicts_with = "exclusive")]
    shared: bool,
    /// Take the lock in exclusive mode (the default), flock(1)'s write lock.
    #[arg(long, short = 'x', short_alias = 'e')]
    exclusive: bool,
    /// Give up after this long: seconds (fractions allowed, e.g. 0.5) or a duration such as
    /// 250ms, 5s, 2m; 0 is --nonblock [default: wait as long as it takes].
    #[arg(long, short = 'w', visible_alias = "wait", value_parser = parse_seconds, value_name = "SECONDS")]
    timeout: Option<Duration>,
    /// Give up at once if the lock is busy (wins over --timeout).
    #[arg(long, short = 'n', visible_alias = "nb")]
    nonblock: bool,
    /// Exit status when the lock is not had in time (busy with -n, timed out with -w, or held by
    /// an enclosing `shmlock run`) [default: 75, EX_TEMPFAIL; flock(1)'s is 1].
    #[arg(long, short = 'E', value_name = "N", default_value_t = exec::EX_TEMPFAIL, hide_default_value = true)]
    conflict_exit_code: u8,
    /// Run STRING through `sh -c` instead of CMD.
    #[arg(long = "command", short = 'c', value_name = "STRING", conflicts_with = "command")]
    command_string: Option<OsString>,
    /// Do not give CMD the lock's descriptor: the lock is held by shmlock alone, so processes CMD
    /// leaves running in the background do not keep it, but neither does CMD if shmlock is killed.
    #[arg(long, short = 'o')]
    close: bool,
    /// Exit N instead of CMD's status when the lock was lost while CMD ran (taken away with
    /// `shmlock release --force`, the gateway session lost, or the etcd session's lease) [default:
    /// CMD's status, with a warning on stderr].
    #[arg(long, value_name = "N")]
    lost_exit_code: Option<u8>,
    #[command(flatten)]
    remote: RemoteArgs,
    #[command(flatten)]
    etcd: etcd::EtcdArgs,
    /// With --remote or --etcd: send CMD SIGTERM if the gateway session or the etcd session (and
    /// so the lock) is lost while it runs [default: warn and let it run].
    #[arg(long, requires = "network")]
    kill_on_loss: bool,
    /// The lock name.
    name: OsString,
    /// The command and its arguments (`--` before them is optional).
    #[arg(
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "CMD",
        required_unless_present = "command_string"
    )]
    command: Vec<OsString>,
}

/// `-w`'s argument: a bare decimal number is seconds, as flock(1) reads it (`5`, `0.5`, `.007`);
/// anything else is a duration of the library's grammar (`250ms`, `2m`).
fn parse_seconds(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let decimal = !t.is_empty()
        && t.bytes().all(|b| b.is_ascii_digit() || b == b'.')
        && t.bytes().filter(|&b| b == b'.').count() <= 1
        && t != ".";
    if !decimal {
        return parse_duration(s);
    }
    let secs: f64 = t.parse().map_err(|_| format!("bad number of seconds {s:?}"))?;
    Duration::try_from_secs_f64(secs).map_err(|_| format!("{s} seconds is out of range"))
}

/// `250ms`, `1.5s`, `2m`, `1h 30m`: the library's one duration grammar (a bare number is refused
/// with the form it should have).
fn parse_duration(s: &str) -> Result<Duration, String> {
    shmlock::config::parse_duration(s).map_err(|e| e.to_string())
}

/// Says what went wrong opening `segment`, and what to do about it, in one line (naming the
/// segment once: the library's messages that name it already are passed on as they are).
fn open_error(segment: &str, e: Error) -> anyhow::Error {
    match e {
        Error::SegmentMissing { .. } => anyhow!(
            "segment {segment} does not exist: start the supervisor with `shmlockd --segment \
             {segment}` (from a source tree: `cargo run --release --bin shmlockd -- --segment \
             {segment}`), or name another with --segment or $SHMLOCK_SEGMENT"
        ),
        Error::WrongVersion { found, expected } => anyhow!(
            "segment {segment} has layout version {found} but this shmlock understands version \
             {expected}: use the shmlock built with the running shmlockd"
        ),
        Error::WrongMagic { .. } | Error::SegmentTooSmall { .. } => {
            anyhow!("{segment} (/dev/shm{segment}) is not a shmlock segment: {e}")
        }
        Error::Io { ref source, .. } if source.kind() == ErrorKind::PermissionDenied => anyhow!(
            "permission denied opening segment {segment} (/dev/shm{segment}): run as a user the \
             segment's mode allows (shmlockd's `mode` setting)"
        ),
        Error::SegmentNameInvalid { name, why } => anyhow!("bad segment name {name:?}: {why}"),
        Error::Io { op, source, .. } => anyhow!("cannot open segment {segment}: {op} failed: {source}"),
        e @ (Error::SegmentWrongOwner { .. }
        | Error::SegmentSymlink { .. }
        | Error::SegmentNotRegular { .. }
        | Error::SegmentLinked { .. }
        | Error::SegmentRemoved { .. }) => anyhow!(e),
        e => anyhow!(e).context(format!("cannot open segment {segment}")),
    }
}

/// Opens `segment` if its file is owned as `owner` (`--segment-owner`) or else
/// `$SHMLOCK_SEGMENT_OWNER` says, explaining failures.
fn open(segment: &str, owner: Option<&str>) -> Result<Arc<LockTable>> {
    // A flag's or variable's error, not the configuration file's (the CLI reads none).
    let flag_error = |e| match e {
        Error::Config { key, why } if key.starts_with('-') => anyhow!("bad {key}: {why}"),
        Error::Config { key, why } => anyhow!("bad ${key}: {why}"),
        e => anyhow!(e),
    };
    let owner = match owner {
        Some(o) => SegmentOwner::parse(o, "--segment-owner").map_err(flag_error)?,
        None => SegmentOwner::from_env().map_err(flag_error)?,
    };
    LockTable::open_as(segment, owner)
        .map(Arc::new)
        .map_err(|e| open_error(segment, e))
}

/// Says what is wrong with a lock name.
fn name_error(name: &[u8], e: Error) -> anyhow::Error {
    match e {
        Error::NameInvalid { len, max } => anyhow!(
            "bad lock name \"{}\": {len} bytes, where names must be 1..={max} bytes",
            escape_name(name)
        ),
        e => anyhow!(e),
    }
}

/// Runs `table.check()` on a helper thread, giving up after `timeout`.
fn check_with_timeout(table: &Arc<LockTable>, timeout: Duration) -> CheckOutcome {
    let (tx, rx) = mpsc::channel();
    let t = Arc::clone(table);
    let spawned = std::thread::Builder::new().name("check".into()).spawn(move || {
        let _ = tx.send(t.check());
    });
    if spawned.is_err() {
        return CheckOutcome::NotRun("could not start a thread");
    }
    match rx.recv_timeout(timeout) {
        Ok(v) if v.is_empty() => CheckOutcome::Consistent,
        Ok(v) => CheckOutcome::Violations(v),
        Err(_) => CheckOutcome::TimedOut(timeout),
    }
}

fn write_json(out: &mut impl Write, v: &serde_json::Value) -> Result<()> {
    serde_json::to_writer_pretty(&mut *out, v)?;
    writeln!(out)?;
    Ok(())
}

fn status(table: &Arc<LockTable>, json: bool, out: &mut impl Write) -> Result<u8> {
    let check = check_with_timeout(table, CHECK_TIMEOUT);
    print_status(&Status::gather(table, check), json, out)
}

fn print_status(status: &Status, json: bool, out: &mut impl Write) -> Result<u8> {
    if json {
        write_json(out, &status.to_json())?;
    } else {
        out.write_all(status.to_text().as_bytes())?;
    }
    Ok(0)
}

/// `--name-prefix`, as bytes.
fn name_prefix(a: &LocksArgs) -> Result<Option<Vec<u8>>> {
    let raw = RawName { raw: a.raw };
    a.name_prefix
        .as_deref()
        .map(|p| raw.read(p, "--name-prefix"))
        .transpose()
}

/// The owner records whose process is gone (not reaped yet: their locks are still theirs).
fn dead_owners(table: &LockTable) -> HashSet<u32> {
    table
        .owners_info(&[])
        .into_iter()
        .filter(|o| !o.alive)
        .map(|o| o.idx)
        .collect()
}

fn locks(table: &LockTable, a: &LocksArgs, out: &mut impl Write) -> Result<u8> {
    let prefix = name_prefix(a)?;
    let mut locks = table.locks();
    let dead = dead_owners(table);
    if a.died {
        locks.retain(|l| l.holders.iter().any(|p| dead.contains(&p.owner)));
        locks.extend(table.died_locks());
    }
    if let Some(p) = &prefix {
        locks.retain(|l| l.name.starts_with(p));
    }
    print_locks(locks, a, Some(&dead), out)
}

/// Filters (`--held-longer-than`), sorts and prints `locks`, from the segment or a gateway;
/// `dead` (owners whose process is gone) where known.
fn print_locks(
    mut locks: Vec<shmlock::table::LockInfo>,
    a: &LocksArgs,
    dead: Option<&HashSet<u32>>,
    out: &mut impl Write,
) -> Result<u8> {
    if let Some(d) = a.held_longer_than {
        locks.retain(|l| !l.holders.is_empty() && l.held_for() > d);
    }
    render::sort_locks(&mut locks);
    if a.json {
        // `holder_dead` only where asked for: plain `locks --json` is the same locally and
        // through a gateway (which does not know).
        let dead = dead.filter(|_| a.died);
        write_json(out, &locks.iter().map(|l| render::lock_json(l, dead)).collect())?;
    } else if a.died && locks.is_empty() {
        out.write_all(b"no lock has a dead holder or an owner-died notice\n")?;
    } else {
        out.write_all(render::locks_text(&locks, dead).as_bytes())?;
    }
    Ok(0)
}

fn owners(table: &LockTable, json: bool, out: &mut impl Write) -> Result<u8> {
    let mut owners = table.owners_info(&table.locks());
    owners.sort_by_key(|o| std::cmp::Reverse(o.registered_for));
    if json {
        write_json(out, &owners.iter().map(render::owner_json).collect())?;
    } else {
        out.write_all(render::owners_text(&owners).as_bytes())?;
    }
    Ok(0)
}

fn show(table: &LockTable, name: &[u8], json: bool, out: &mut impl Write) -> Result<u8> {
    let info = table.lock_info(name).map_err(|e| name_error(name, e))?;
    let dead = dead_owners(table);
    match info {
        Some(l) if json => write_json(out, &render::lock_json(&l, Some(&dead)))?,
        Some(l) => out.write_all(render::show_text(&l, &dead).as_bytes())?,
        None => {
            eprintln!(
                "shmlock: no lock named \"{}\" (never locked, or evicted since)",
                escape_name(name)
            );
            return Ok(EXIT_FOUND);
        }
    }
    Ok(0)
}

fn release(table: &LockTable, name: &[u8], force: bool, out: &mut impl Write) -> Result<u8> {
    let shown = escape_name(name);
    if !force {
        let holders = match table.lock_info(name).map_err(|e| name_error(name, e))? {
            Some(l) if !l.holders.is_empty() => {
                let pids: Vec<String> = l.holders.iter().map(|p| p.pid.to_string()).collect();
                format!(" (held by pid {})", pids.join(", "))
            }
            _ => String::new(),
        };
        bail!(
            "refusing to release \"{shown}\"{holders} without --force: its holder keeps running and \
             is told only when it next uses the lock"
        );
    }
    match table.force_release(name) {
        Ok(f) => {
            let who: Vec<String> = f
                .holders
                .iter()
                .map(|p| match p.label.as_str() {
                    "" => format!("pid {}", p.pid),
                    l => format!("pid {} ({l})", p.pid),
                })
                .collect();
            let mode = match f.mode {
                shmlock::Mode::Exclusive => "exclusive",
                shmlock::Mode::Shared => "shared",
            };
            let next = match f.waiters {
                0 => "nobody waits; the next to lock it is told the owner died".to_string(),
                n => format!("{n} waiting; the oldest gets it and is told the owner died"),
            };
            writeln!(out, "released \"{shown}\" ({mode}) from {}: {next}", who.join(", "))?;
            Ok(0)
        }
        Err(Error::NotHeld) => {
            eprintln!("shmlock: \"{shown}\" is not held");
            Ok(EXIT_FOUND)
        }
        Err(e) => Err(name_error(name, e)),
    }
}

fn check(table: &Arc<LockTable>, out: &mut impl Write) -> Result<u8> {
    match check_with_timeout(table, CHECK_TIMEOUT) {
        CheckOutcome::Consistent => {
            writeln!(out, "ok: {} is consistent", table.segment().name())?;
            Ok(0)
        }
        CheckOutcome::Violations(v) => {
            for line in v {
                writeln!(out, "{line}")?;
            }
            Ok(EXIT_FOUND)
        }
        CheckOutcome::TimedOut(t) => bail!(
            "check did not finish within {}: a shard latch stays taken (a process may have died \
             inside a critical section)",
            render::human(t)
        ),
        CheckOutcome::NotRun(why) => bail!("check not run: {why}"),
    }
}

/// `--remote` given to `status`, `locks` or `run`: through the gateway at `addr`.
fn run_remote(cli: Cli, addr: &str) -> Result<u8> {
    if cli.global.segment.is_some() || cli.global.segment_owner.is_some() {
        bail!(
            "--segment and --remote exclude each other (--segment-owner and --remote too): through a \
             gateway, the segment is shmlockd's"
        );
    }
    let mut out = std::io::stdout().lock();
    let code = match &cli.command {
        Command::Status { json, remote } => {
            let status = remote::Gateway::connect(addr, remote)?.status()?;
            print_status(&status, *json, &mut out)
        }
        Command::Locks(a) if a.died => bail!(
            "--died needs the segment (the gateway's LOCKS query lists locks held or waited on): \
             run it on the gateway's host"
        ),
        Command::Locks(a) => {
            let prefix = name_prefix(a)?;
            let mut gw = remote::Gateway::connect(addr, &a.remote)?;
            let locks = gw.locks(prefix.as_deref())?;
            print_locks(locks, a, None, &mut out)
        }
        Command::Run(a) => {
            drop(out);
            let place = exec::Place::Remote {
                addr: addr.to_string(),
                token: a.remote.token()?,
                tls: a.remote.tls(addr),
            };
            return exec::run(place, a);
        }
        _ => bail!("--remote is not supported by this subcommand"),
    }?;
    out.flush()?;
    Ok(code)
}

fn run(cli: Cli) -> Result<u8> {
    // Neither a segment nor a gateway.
    match &cli.command {
        Command::Completions { shell } => {
            let mut out = std::io::stdout().lock();
            docs::completions(*shell, &mut out)?;
            out.flush()?;
            return Ok(0);
        }
        Command::Manpages { dir } => {
            let mut out = std::io::stdout().lock();
            docs::manpages(dir, &mut out)?;
            out.flush()?;
            return Ok(0);
        }
        _ => {}
    }
    if etcd::asked(&cli.command) {
        return etcd::run(cli);
    }
    let remote = match &cli.command {
        Command::Status { remote, .. } => remote.remote.clone(),
        Command::Locks(a) => a.remote.remote.clone(),
        Command::Run(a) => a.remote.remote.clone(),
        _ => None,
    };
    if let Some(addr) = remote {
        return run_remote(cli, &addr);
    }
    // Bad names are told before the segment is opened.
    match &cli.command {
        Command::Show { name, raw, .. } | Command::Release { name, raw, .. } => drop(raw.bytes(name)?),
        Command::Locks(a) => drop(name_prefix(a)?),
        _ => {}
    }
    let segment = cli.global.segment.unwrap_or_else(default_segment_name);
    let table = open(&segment, cli.global.segment_owner.as_deref())?;
    if let Command::Run(a) = cli.command {
        return exec::run(exec::Place::Local { table, segment }, &a);
    }
    let mut out = std::io::stdout().lock();
    let code = match cli.command {
        Command::Status { json, .. } => status(&table, json, &mut out),
        Command::Locks(a) => locks(&table, &a, &mut out),
        Command::Owners { json } => owners(&table, json, &mut out),
        Command::Show { name, raw, json } => show(&table, &raw.bytes(&name)?, json, &mut out),
        Command::Release { name, raw, force } => release(&table, &raw.bytes(&name)?, force, &mut out),
        Command::Check => check(&table, &mut out),
        Command::Watch { interval, count } => {
            drop(out);
            return watch::watch(&table, interval, count);
        }
        Command::Run(_) => unreachable!("run is dispatched above"),
        Command::Completions { .. } | Command::Manpages { .. } => unreachable!("answered above"),
    }?;
    out.flush()?;
    Ok(code)
}

/// True if `e` is a broken pipe on stdout, which ends output quietly (ripgrep's rule).
fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == ErrorKind::BrokenPipe)
            || c.downcast_ref::<serde_json::Error>().and_then(|j| j.io_error_kind()) == Some(ErrorKind::BrokenPipe)
    })
}

/// The C `main` (the binary is `no_main`): the standard library's start-up, which a Rust `main`
/// runs first, costs about 0.1 ms in some VMs (it reads /proc/self/maps for the main thread's
/// stack guard, and maps and installs a signal stack and SIGSEGV/SIGBUS handlers to report stack
/// overflows), and every `shmlock run` pays it before its command starts (issue 14). What of it
/// the CLI relies on is done here instead: standard descriptors that are closed are opened on
/// /dev/null (so that no pipe or segment lands on 0, 1 or 2), SIGPIPE is ignored (a closed stdout
/// is an error, `is_broken_pipe`; commands that `run` starts get SIGPIPE's default back from the
/// standard library, as before), and a panic exits 101. What is lost: a stack overflow is a bare
/// SIGSEGV rather than a message, and a panic names the thread `<unnamed>` rather than `main`.
#[cfg(not(test))]
#[allow(unsafe_code)]
// SAFETY: `main` is the one symbol the C runtime calls; nothing else in the binary defines it
// (`no_main`), and it has the signature the C runtime calls it with.
#[no_mangle]
extern "C" fn main(_argc: std::ffi::c_int, _argv: *const *const std::ffi::c_char) -> std::ffi::c_int {
    open_standard_fds();
    ignore_sigpipe();
    let code = std::panic::catch_unwind(real_main).unwrap_or(101);
    // Flushes stdout, as returning from a Rust `main` does.
    std::process::exit(i32::from(code))
}

/// Opens /dev/null on each of descriptors 0, 1 and 2 that is closed, in order (`open` takes the
/// lowest free descriptor), as the standard library's start-up does.
#[cfg(not(test))]
fn open_standard_fds() {
    use nix::fcntl::{fcntl, open, FcntlArg, OFlag};
    for fd in 0..=2 {
        if fcntl(fd, FcntlArg::F_GETFD) == Err(nix::errno::Errno::EBADF)
            && open("/dev/null", OFlag::O_RDWR, nix::sys::stat::Mode::empty()).is_err()
        {
            std::process::abort();
        }
    }
}

#[cfg(not(test))]
#[allow(unsafe_code)]
fn ignore_sigpipe() {
    use nix::sys::signal::{signal, SigHandler, Signal};
    // SAFETY: SIG_IGN installs no handler, so nothing runs in signal context.
    let _ = unsafe { signal(Signal::SIGPIPE, SigHandler::SigIgn) };
}

#[cfg_attr(test, allow(dead_code))]
fn real_main() -> u8 {
    // A CLI process touches a few pages of the segment: populating all of its page tables up
    // front would cost more than `run`'s whole lock-and-release.
    shmlock::shm::populate_on_map(false);
    let cli = parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) if is_broken_pipe(&e) => 0,
        Err(e) => {
            eprintln!("shmlock: {e:#}");
            EXIT_ERROR
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_run_only_command_parses_helps_and_fails_as_the_full_one() {
        run_only_command().debug_assert();
        let help = |mut c: clap::Command| {
            c.build();
            let run = c.find_subcommand_mut("run").expect("run");
            (run.render_help().to_string(), run.render_long_help().to_string())
        };
        assert_eq!(help(run_only_command()), help(Cli::command()));
        let argvs: &[&[&str]] = &[
            &["shmlock", "run", "x", "--", "true"],
            &["shmlock", "run", "x", "true", "-n"],
            &[
                "shmlock",
                "--segment",
                "/s",
                "run",
                "-s",
                "-w",
                "0.5",
                "-E",
                "3",
                "x",
                "sh",
                "-c",
                "exit 1",
            ],
            &[
                "shmlock",
                "--segment=/s",
                "--segment-owner",
                "app",
                "run",
                "-o",
                "-n",
                "x",
                "true",
            ],
            &["shmlock", "--segment", "run", "run", "x", "true"],
            &["shmlock", "run", "--segment", "/s", "-c", "echo hi", "x"],
            &[
                "shmlock",
                "run",
                "--remote",
                "h:1",
                "--kill-on-loss",
                "--lost-exit-code",
                "9",
                "x",
                "true",
            ],
            &[
                "shmlock",
                "run",
                "--etcd",
                "http://a:1,http://b:2",
                "--etcd-ttl",
                "5",
                "x",
                "true",
            ],
            &["shmlock", "run", "-w", "250ms", "--nb", "x", "true"],
            // Errors, and what clap says about them.
            &["shmlock", "run"],
            &["shmlock", "run", "x"],
            &["shmlock", "run", "-w", "soon", "x", "true"],
            &["shmlock", "run", "-s", "-x", "x", "true"],
            &["shmlock", "run", "--kill-on-loss", "x", "true"],
            &["shmlock", "run", "--bogus", "x", "true"],
            &["shmlock", "run", "--help"],
            &["shmlock", "run", "-h"],
            &["shmlock", "run", "--version"],
        ];
        for argv in argvs {
            let args: Vec<OsString> = argv.iter().map(OsString::from).collect();
            assert!(is_run(&args), "{argv:?}");
            let full = Cli::try_parse_from(&args);
            let reduced = run_only_command()
                .try_get_matches_from(&args)
                .and_then(|m| <Cli as clap::FromArgMatches>::from_arg_matches(&m));
            let show = |r: Result<Cli, clap::Error>| match r {
                Ok(c) => format!("{c:?}"),
                Err(e) => format!("{:?}: {}", e.kind(), e.render()),
            };
            assert_eq!(show(reduced), show(full), "{argv:?}");
        }
        for argv in [
            &["shmlock", "status"][..],
            &["shmlock", "--segment"],
            &["shmlock", "--help", "run"],
            &["shmlock", "-V"],
            &["shmlock", "locks", "run"],
            &["shmlock"],
        ] {
            let args: Vec<OsString> = argv.iter().map(OsString::from).collect();
            assert!(!is_run(&args), "{argv:?}");
        }
    }

    #[test]
    fn parse_run_reads_what_clap_reads_or_leaves_it_to_clap() {
        let globals: &[&[&str]] = &[
            &[],
            &["--segment", "/s"],
            &["--segment-owner", "app", "--segment", "run"],
            &["--segment", "/a", "--segment", "/b"],
            &["--segment", "-x"],
            &["--segment=/s"],
        ];
        let mut options: Vec<&[&str]> = [
            "-s",
            "--shared",
            "-x",
            "-e",
            "--exclusive",
            "-n",
            "--nonblock",
            "--nb",
            "-o",
            "--close",
        ]
        .iter()
        .map(std::slice::from_ref)
        .collect();
        options.extend_from_slice(&[
            &[],
            &["-s", "-o"],
            &["--shared", "--nb", "--close"],
            &["-x", "-e"],
            &["-s", "-x"],
            &["--exclusive", "--nonblock"],
            &["-n", "-n"],
            &["-w", "0.5"],
            &["--timeout", "250ms", "-E", "0"],
            &["--wait", ".05", "-s"],
            &["-w", "soon"],
            &["-w", "-1"],
            &["-w", "1", "-w", "2"],
            &["-E", "9", "-n"],
            &["-E", "075"],
            &["-E", "300"],
            &["-E", "+3"],
            &["-E"],
            &["-ns"],
            &["-w5"],
            &["--timeout=5"],
            &["-c", "true"],
            &["--remote", "h:1"],
            &["-h"],
            &["--segment", "/t"],
        ]);
        let names: &[&str] = &["job", "run", "-y", "", "a b", "--"];
        let commands: &[&[&str]] = &[
            &[],
            &["true"],
            &["--", "true"],
            &["--"],
            &["-n"],
            &["--", "-n"],
            &["sh", "-c", "exit 3"],
            &["true", "--", "x"],
            &["--", "--", "x"],
            &["true", "-n", "--segment", "/x"],
        ];
        let (mut read, mut left) = (0, 0);
        for g in globals {
            for o in &options {
                for n in names {
                    for c in commands {
                        let mut argv = vec!["shmlock"];
                        argv.extend_from_slice(g);
                        argv.push("run");
                        argv.extend_from_slice(o);
                        argv.push(n);
                        argv.extend_from_slice(c);
                        let args: Vec<OsString> = argv.iter().map(OsString::from).collect();
                        let Some(fast) = parse_run(&args) else {
                            left += 1;
                            continue;
                        };
                        read += 1;
                        let full = Cli::try_parse_from(&args).unwrap_or_else(|e| panic!("{argv:?}: clap: {e}"));
                        assert_eq!(format!("{fast:?}"), format!("{full:?}"), "{argv:?}");
                    }
                }
            }
        }
        // Both kinds are there: the common forms read, the rest left to clap.
        assert!(read > 500 && left > 2000, "read {read}, left {left}");
        let bytes = |b: &[u8]| std::ffi::OsStr::from_bytes(b).to_os_string();
        let args = vec![
            bytes(b"shmlock"),
            bytes(b"run"),
            bytes(b"\xff"),
            bytes(b"true"),
            bytes(b"\xfe"),
        ];
        let fast = parse_run(&args).expect("a name and a command need not be UTF-8");
        assert_eq!(
            format!("{fast:?}"),
            format!("{:?}", Cli::try_parse_from(&args).expect("clap"))
        );
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(3000))]
        /// Random command lines from `run`'s vocabulary: whatever `parse_run` reads, clap reads
        /// the same way.
        #[test]
        fn parse_run_agrees_with_clap_on_random_command_lines(
            run_first in proptest::bool::weighted(0.8),
            words in proptest::collection::vec(proptest::sample::select(&[
                "run", "run", "run", "--segment", "/s", "--segment-owner", "u", "-s", "-x", "-e", "-n",
                "-o", "--shared", "--exclusive", "--nonblock", "--nb", "--close", "-w", "0.5", "250ms",
                "-E", "3", "300", "--timeout", "--wait", "--conflict-exit-code", "--", "--", "true",
                "job", "job", "-c", "-h", "soon", "-1", "", "--remote",
            ][..]), 1..9)
        ) {
            let first: &[&str] = if run_first { &["shmlock", "run"] } else { &["shmlock"] };
            let args: Vec<OsString> = first.iter().chain(&words).map(OsString::from).collect();
            if let Some(fast) = parse_run(&args) {
                let full = Cli::try_parse_from(&args);
                proptest::prop_assert!(full.is_ok(), "{:?}: clap: {:?}", words, full.err());
                proptest::prop_assert_eq!(format!("{fast:?}"), format!("{:?}", full.unwrap()), "{:?}", words);
            }
        }
    }

    #[test]
    fn cli_definition_is_valid_and_every_subcommand_has_an_example() {
        Cli::command().debug_assert();
        for sub in Cli::command().get_subcommands() {
            let help = sub.get_after_help().map(|h| h.to_string()).unwrap_or_default();
            assert!(help.contains("shmlock "), "{} has no example", sub.get_name());
        }
    }

    #[test]
    fn durations_parse_in_the_documented_forms() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert!(parse_duration("soon").unwrap_err().contains("250ms"));
        assert!(parse_duration("5").unwrap_err().contains("e.g. \"5s\""));
    }

    #[test]
    fn run_wait_takes_seconds_as_flock_does_and_durations() {
        assert_eq!(parse_seconds("5"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_seconds("0.5"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_seconds(".007"), Ok(Duration::from_millis(7)));
        assert_eq!(parse_seconds("3."), Ok(Duration::from_secs(3)));
        assert_eq!(parse_seconds("0"), Ok(Duration::ZERO));
        assert_eq!(parse_seconds("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_seconds("2m"), Ok(Duration::from_secs(120)));
        for bad in ["", ".", "1.2.3", "-1", "soon", "1e3"] {
            assert!(parse_seconds(bad).is_err(), "{bad:?}");
        }
        assert!(parse_seconds("99999999999999999999999")
            .unwrap_err()
            .contains("out of range"));
    }

    #[test]
    fn permission_denied_says_so_and_names_the_file() {
        // Tests run as root here, where no file is unreadable; the message is checked directly.
        let e = Error::Io {
            op: "open",
            segment: "/s".into(),
            source: std::io::Error::from(ErrorKind::PermissionDenied),
        };
        let msg = format!("{:#}", open_error("/s", e));
        assert!(
            msg.starts_with("permission denied opening segment /s (/dev/shm/s)"),
            "{msg}"
        );
    }
}
