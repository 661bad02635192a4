//! `shmlock completions SHELL` and `shmlock manpages DIR`: shell completions and man pages
//! generated from the clap definitions, so they never disagree with `--help`.
//!
//! `manpages` writes `shmlock.1` and one `shmlock-SUBCOMMAND.1` per subcommand, and
//! `shmlockd.8` by asking the `shmlockd` beside this binary (`shmlockd --manpage`, a hidden flag:
//! shmlockd's clap definition lives in its own binary); without one there it says so and how to
//! write that page.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command as Process;

use anyhow::{bail, Context, Result};
use clap::CommandFactory;
use clap_complete::Shell;

use crate::Cli;

/// Writes `shell`'s completion script for `shmlock` to `out`.
pub(crate) fn completions(shell: Shell, out: &mut impl Write) -> Result<()> {
    let mut cmd = Cli::command();
    // Into memory first: clap_complete panics if its writer fails (a closed pipe).
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut cmd, "shmlock", &mut script);
    out.write_all(&script)?;
    Ok(())
}

/// Writes the man pages into `dir` (made if missing) and lists each file written on `out`.
pub(crate) fn manpages(dir: &Path, out: &mut impl Write) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot make directory {}", dir.display()))?;
    let mut cmd = Cli::command().disable_help_subcommand(true);
    cmd.build();
    let mut written = Vec::new();
    pages(cmd, dir, &mut written).with_context(|| format!("cannot write man pages in {}", dir.display()))?;
    for p in &written {
        writeln!(out, "{}", p.display())?;
    }
    let daemon = std::env::current_exe()
        .context("cannot find this executable")?
        .with_file_name("shmlockd");
    let page = dir.join("shmlockd.8");
    if !daemon.is_file() {
        eprintln!(
            "shmlock: shmlockd.8 not written: no shmlockd beside this shmlock ({}); write it with \
             `shmlockd --manpage > {}`",
            daemon.display(),
            page.display()
        );
        return Ok(());
    }
    let o = Process::new(&daemon)
        .arg("--manpage")
        .output()
        .with_context(|| format!("cannot run {} --manpage", daemon.display()))?;
    if !o.status.success() || !o.stdout.starts_with(b".") {
        bail!(
            "{} --manpage failed ({}): {}",
            daemon.display(),
            o.status,
            String::from_utf8_lossy(&o.stderr).trim()
        );
    }
    std::fs::write(&page, &o.stdout).with_context(|| format!("cannot write {}", page.display()))?;
    writeln!(out, "{}", page.display())?;
    Ok(())
}

/// The page of `cmd` and of each of its subcommands (not hidden), depth first.
fn pages(cmd: clap::Command, dir: &Path, written: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()).cloned() {
        pages(sub, dir, written)?;
    }
    written.push(clap_mangen::Man::new(cmd).generate_to(dir)?);
    Ok(())
}
