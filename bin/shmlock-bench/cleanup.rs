//! Everything a run creates outside the process (segments, `/dev/shm` objects, temp dirs, worker
//! processes) is registered here before it is made, and removed by its guard's `Drop`, or by the
//! signal thread on SIGINT/SIGTERM/SIGHUP, which then exits with 128 + the signal number.

use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard};

use nix::sys::signal::{kill, SigSet, Signal};
use nix::unistd::Pid;

/// One thing to remove.
#[derive(Debug)]
enum Item {
    /// A shmlock segment, removed with `shmlock::Segment::unlink`.
    Segment(String),
    /// A `/dev/shm` object of the bench's own (control block, pthread mutexes).
    ShmObject(String),
    /// A temporary directory and everything in it.
    Dir(PathBuf),
    /// A worker process, killed with SIGKILL.
    Child(u32),
}

impl Item {
    fn remove(&self) {
        match self {
            Item::Segment(name) => {
                let _ = shmlock::Segment::unlink(name);
            }
            Item::ShmObject(name) => {
                let _ = crate::sys::SharedMap::unlink(name);
            }
            Item::Dir(path) => {
                // The main thread may still be creating files in it: retry until it is gone.
                for _ in 0..100 {
                    match std::fs::remove_dir_all(path) {
                        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                            std::thread::sleep(std::time::Duration::from_millis(1))
                        }
                        _ => break,
                    }
                }
            }
            Item::Child(pid) => {
                if let Ok(pid) = i32::try_from(*pid) {
                    let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                }
            }
        }
    }
}

static REGISTRY: Mutex<Vec<(u64, Item)>> = Mutex::new(Vec::new());
static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

fn registry() -> MutexGuard<'static, Vec<(u64, Item)>> {
    REGISTRY.lock().unwrap_or_else(|e| e.into_inner())
}

/// Removes its item when dropped.
#[must_use = "the item is removed when the guard is dropped"]
#[derive(Debug)]
pub(crate) struct Registered(u64);

impl Drop for Registered {
    fn drop(&mut self) {
        let item = {
            let mut r = registry();
            r.iter().position(|(id, _)| *id == self.0).map(|i| r.swap_remove(i).1)
        };
        if let Some(item) = item {
            item.remove();
        }
    }
}

impl Registered {
    /// Forgets the item without removing it (a child that has been reaped).
    pub(crate) fn disarm(self) {
        registry().retain(|(id, _)| *id != self.0);
        std::mem::forget(self);
    }
}

fn register(item: Item) -> Registered {
    let mut r = registry();
    let id = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    r.push((id, item));
    Registered(id)
}

/// Runs `create` holding the registry lock, and registers `item` if it succeeds. The signal
/// thread takes the lock for good before removing anything, so an object is either made and
/// removed, or never made.
fn create_registered<T>(item: Item, create: impl FnOnce() -> anyhow::Result<T>) -> anyhow::Result<(T, Registered)> {
    let mut r = registry();
    let made = create()?;
    let id = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    r.push((id, item));
    Ok((made, Registered(id)))
}

/// Creates shmlock segment `name` with `create`; removed when the guard drops.
pub(crate) fn segment<T>(name: &str, create: impl FnOnce() -> anyhow::Result<T>) -> anyhow::Result<(T, Registered)> {
    create_registered(Item::Segment(name.to_string()), create)
}

/// Creates the bench's own `/dev/shm` object `name` with `create`.
pub(crate) fn shm_object<T>(name: &str, create: impl FnOnce() -> anyhow::Result<T>) -> anyhow::Result<(T, Registered)> {
    create_registered(Item::ShmObject(name.to_string()), create)
}

/// Creates directory `path` (which must not exist); removed with its contents.
pub(crate) fn dir(path: PathBuf) -> anyhow::Result<Registered> {
    let (_, reg) = create_registered(Item::Dir(path.clone()), || {
        std::fs::create_dir(&path).map_err(|e| anyhow::anyhow!("create directory {}: {e}", path.display()))
    })?;
    Ok(reg)
}

/// Registers worker process `pid` (already started: it dies with us through PR_SET_PDEATHSIG
/// if a signal comes first), killed if still registered.
pub(crate) fn child(pid: u32) -> Registered {
    register(Item::Child(pid))
}

/// Blocks SIGINT, SIGTERM and SIGHUP in this thread (call it first in `main`, so every later
/// thread inherits the mask) and starts a thread that waits for them, removes everything
/// registered (children first) and exits. Children start with an empty mask: std's `Command`
/// resets it.
pub(crate) fn install() -> anyhow::Result<()> {
    let mut set = SigSet::empty();
    for s in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        set.add(s);
    }
    set.thread_block()?;
    std::thread::Builder::new().name("signals".into()).spawn(move || {
        let Ok(sig) = set.wait() else { return };
        // Held until exit: nothing can be created (or registered) after this point.
        let mut held = registry();
        let mut items: Vec<Item> = held.drain(..).map(|(_, item)| item).collect();
        items.sort_by_key(|i| !matches!(i, Item::Child(_)));
        for item in &items {
            item.remove();
        }
        eprintln!(
            "shmlock-bench: interrupted by {sig}; removed {} bench objects",
            items.len()
        );
        std::process::exit(128 + sig as i32);
    })?;
    Ok(())
}
