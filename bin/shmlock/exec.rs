//! `shmlock run`: hold a named lock while a command runs, like flock(1).
//!
//! The lock is taken first (waiting, with a timeout, or not at all), then the command runs with
//! this process's stdin, stdout and stderr; when it exits the lock is released and `shmlock`
//! exits with the command's status (128 + N if a signal N killed it, as shells report it).
//!
//! # Signals
//! While the command runs, `shmlock` must outlive it, or the lock would stay held by a dead owner
//! until it is reaped. So once the child is started, SIGINT, SIGQUIT, SIGTERM and SIGHUP are
//! blocked here and taken by a thread with `sigwait`: SIGTERM and SIGHUP are passed on to the
//! command; SIGINT and SIGQUIT are not, since a terminal sends them to the command itself (it is
//! in the same process group). The signals are blocked only after the spawn, so the command
//! starts with the usual mask.

use std::process::{Command, ExitCode};
use std::sync::Arc;

use anyhow::{anyhow, Result};
use nix::sys::signal::{kill, SigSet, Signal};
use nix::unistd::Pid;
use shmlock::{Client, Error, LockGuard, LockTable};

use crate::render::{escape_name, human};
use crate::{name_error, RunArgs};

/// sysexits.h EX_TEMPFAIL: the lock was not had in time.
pub(crate) const EX_TEMPFAIL: u8 = 75;
/// What shells return when the command cannot be found, or not executed.
const EXIT_NOT_FOUND: u8 = 127;
const EXIT_CANNOT_EXEC: u8 = 126;

/// Runs `a.command` holding lock `a.name`.
pub(crate) fn run(table: Arc<LockTable>, a: &RunArgs) -> Result<ExitCode> {
    use std::os::unix::ffi::OsStrExt;
    let name = a.name.as_bytes();
    let shown = escape_name(name);
    let program = a.command[0].to_string_lossy().into_owned();
    let client = Client::with_table(Arc::clone(&table), &format!("run {program}"))?;
    let got = match (a.shared, a.nonblock, a.timeout) {
        (false, true, _) => client.try_lock(name),
        (true, true, _) => client.try_lock_shared(name),
        (false, false, Some(t)) => client.try_lock_for(name, t),
        (true, false, Some(t)) => client.try_lock_shared_for(name, t),
        (false, false, None) => client.lock(name),
        (true, false, None) => client.lock_shared(name),
    };
    let guard = match got {
        Ok(g) => g,
        Err(Error::WouldBlock) => {
            eprintln!(
                "shmlock: lock \"{shown}\" is busy{}; not running {program}",
                holders(&table, name)
            );
            return Ok(ExitCode::from(EX_TEMPFAIL));
        }
        Err(e @ Error::TimedOut { .. }) => {
            eprintln!("shmlock: lock \"{shown}\" not acquired: {e}; not running {program}");
            return Ok(ExitCode::from(EX_TEMPFAIL));
        }
        Err(e) => return Err(name_error(name, e)),
    };
    let code = run_child(a, &program)?;
    release(guard, &shown);
    Ok(ExitCode::from(code))
}

/// `, held by pid 1234 (label) for 2.0s`, or nothing if that cannot be told.
fn holders(table: &LockTable, name: &[u8]) -> String {
    match table.lock_info(name) {
        Ok(Some(l)) if !l.holders.is_empty() => {
            let who: Vec<String> = l
                .holders
                .iter()
                .map(|p| match p.label.as_str() {
                    "" => format!("pid {} for {}", p.pid, human(p.age)),
                    label => format!("pid {} ({label}) for {}", p.pid, human(p.age)),
                })
                .collect();
            format!(", held by {}", who.join(", "))
        }
        _ => String::new(),
    }
}

/// Unlocks, warning if the lock was taken away (`release --force`) while the command ran.
fn release(guard: LockGuard<'_>, shown: &str) {
    match guard.unlock() {
        Ok(()) => {}
        Err(Error::NotHeld) => eprintln!(
            "shmlock: warning: lock \"{shown}\" was taken away (shmlock release --force) while the \
             command ran"
        ),
        Err(e) => eprintln!("shmlock: warning: unlocking \"{shown}\": {e}"),
    }
}

/// Runs the command to completion; returns the exit status to pass on.
fn run_child(a: &RunArgs, program: &str) -> Result<u8> {
    let mut child = match Command::new(&a.command[0]).args(&a.command[1..]).spawn() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("shmlock: cannot run {program}: {e}");
            return Ok(match e.kind() {
                std::io::ErrorKind::NotFound => EXIT_NOT_FOUND,
                _ => EXIT_CANNOT_EXEC,
            });
        }
    };
    let pid = i32::try_from(child.id()).ok().map(Pid::from_raw);
    let mut signals = SigSet::empty();
    for s in [Signal::SIGINT, Signal::SIGQUIT, Signal::SIGTERM, Signal::SIGHUP] {
        signals.add(s);
    }
    let blocked = signals.thread_block().is_ok();
    if blocked {
        // Threads inherit the mask, so this one is the only taker of these signals.
        let _ = std::thread::Builder::new().name("signals".into()).spawn(move || loop {
            match signals.wait() {
                Ok(s @ (Signal::SIGTERM | Signal::SIGHUP)) => {
                    if let Some(pid) = pid {
                        let _ = kill(pid, s);
                    }
                }
                Ok(_) => {}
                Err(_) => return,
            }
        });
    }
    let status = child.wait().map_err(|e| anyhow!("waiting for {program}: {e}"))?;
    use std::os::unix::process::ExitStatusExt;
    Ok(match (status.code(), status.signal()) {
        (Some(c), _) => (c & 0xff) as u8,
        (None, Some(s)) => (128 + s).clamp(0, 255) as u8,
        (None, None) => 1,
    })
}
