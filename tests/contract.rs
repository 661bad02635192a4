//! The locking contract ([`Locker`], [`Guard`]) as users rely on it, written once and run on
//! every backend: a local [`Client`], a [`RemoteClient`] through a gateway served in this
//! process, and (feature `etcd`) an `EtcdClient` on a one-member etcd started for the test. A
//! behaviour one backend has and another lacks fails here.

mod common;

use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use common::{TestEnv, DEADLINE};
use shmlock::gateway::{self, Gateway, GatewayConfig};
use shmlock::prelude::*;
use shmlock::remote::RemoteClient;
use shmlock::{Client, Error, Mode};

/// A backend under test: opens clients (owners) on one shared set of locks.
trait Backend {
    type L: Locker + Send + Sync + 'static;
    fn open(&self, label: &str) -> Self::L;
}

struct Local(TestEnv);

impl Backend for Local {
    type L = Client;
    fn open(&self, label: &str) -> Client {
        self.0.client(label)
    }
}

struct Remote {
    // Declared first so the gateway stops before the segment goes.
    gw: Gateway,
    _env: TestEnv,
}

impl Backend for Remote {
    type L = RemoteClient;
    fn open(&self, _: &str) -> RemoteClient {
        RemoteClient::connect(self.gw.local_addr()).expect("connect to the gateway")
    }
}

#[cfg(feature = "etcd")]
struct Etcd {
    // Declared first so the member stops before its directory goes.
    etcd: common::etcd::EtcdCluster,
    _env: TestEnv,
}

#[cfg(feature = "etcd")]
impl Backend for Etcd {
    type L = shmlock::etcd::EtcdClient;
    fn open(&self, label: &str) -> shmlock::etcd::EtcdClient {
        let opts = shmlock::etcd::EtcdOptions {
            label: Some(label.into()),
            ..Default::default()
        };
        shmlock::etcd::EtcdClient::connect(self.etcd.urls(), opts).expect("connect to etcd")
    }
}

#[cfg(feature = "etcd")]
fn etcd(test: &str) -> Etcd {
    let env = TestEnv::new(test);
    let etcd = common::etcd::EtcdCluster::start(&env.dir, 1);
    Etcd { etcd, _env: env }
}

fn local(test: &str) -> Local {
    Local(TestEnv::new(test))
}

fn remote(test: &str) -> Remote {
    let env = TestEnv::new(test);
    let config = GatewayConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        ..GatewayConfig::default()
    };
    let gw = gateway::serve(config, Arc::clone(&env.table)).expect("start gateway");
    Remote { gw, _env: env }
}

/// Locks `name` waiting at most [`DEADLINE`]: for a lock another client is giving back (a
/// remote guard's drop sends its `UNLOCK` without waiting for the answer).
fn soon<'c, L: Locker>(c: &'c L, name: &str) -> L::Guard<&'c L> {
    c.try_lock_for(name, DEADLINE)
        .unwrap_or_else(|e| panic!("lock {name}: {e}"))
}

/// Exclusive locks: busy, re-lock, timeouts by duration and by deadline, the grant's fields,
/// tokens increasing, unlock reporting.
fn exclusive<B: Backend>(b: &B) {
    let (a, c) = (b.open("a"), b.open("c"));
    let g = a.lock("n").expect("lock");
    assert_eq!(g.mode(), Mode::Exclusive);
    assert_eq!(&*g.name(), b"n");
    assert!(!g.owner_died());
    assert_eq!(g.grant().token, g.token());
    let first = g.token();

    assert!(matches!(c.try_lock("n"), Err(Error::WouldBlock)), "busy: WouldBlock");
    assert!(
        matches!(a.try_lock("n"), Err(Error::AlreadyHeld)),
        "re-lock: AlreadyHeld"
    );
    assert!(
        matches!(a.lock_shared("n"), Err(Error::AlreadyHeld)),
        "re-lock shared: AlreadyHeld"
    );
    let t = Duration::from_millis(40);
    match c.try_lock_for("n", t) {
        Err(Error::TimedOut { waited, .. }) => assert!(waited + Duration::from_millis(2) >= t, "{waited:?}"),
        other => panic!("try_lock_for on a held lock: {:?}", other.map(|g| g.token())),
    }
    let start = Instant::now();
    match c.try_lock_until("n", start + t) {
        Err(Error::TimedOut { .. }) => assert!(start.elapsed() >= t),
        other => panic!("try_lock_until on a held lock: {:?}", other.map(|g| g.token())),
    }
    match c.try_lock_shared_until("n", start) {
        Err(Error::TimedOut { .. }) => {}
        other => panic!("a deadline already past, held lock: {:?}", other.map(|g| g.token())),
    }

    g.unlock().expect("unlock");
    let g2 = c
        .try_lock_until("n", Instant::now() + DEADLINE)
        .expect("free after unlock");
    assert!(g2.token() > first, "tokens increase: {} then {}", first, g2.token());
    drop(g2);
    let g3 = soon(&a, "n");
    assert!(!g3.owner_died(), "a lock given back is not owner-died");
    // An acquire with every wait policy on a free name.
    drop(g3);
    for wait in [Wait::No, Wait::Until(Instant::now()), Wait::Forever] {
        let deadline = Instant::now() + DEADLINE;
        let g = loop {
            match a.acquire("free", Mode::Exclusive, wait) {
                Ok(g) => break g,
                // The previous round's unlock may still be on its way (remote).
                Err(Error::WouldBlock | Error::TimedOut { .. }) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(1))
                }
                Err(e) => panic!("acquire free with {wait:?}: {e}"),
            }
        };
        assert_eq!(&*g.name(), b"free");
        g.unlock().expect("unlock");
    }
}

/// Shared locks: many holders, an exclusive request is busy while they hold.
fn shared<B: Backend>(b: &B) {
    let (a, c, w) = (b.open("a"), b.open("c"), b.open("w"));
    let ra = a.lock_shared("s").expect("shared a");
    let rc = c.try_lock_shared("s").expect("shared c with a");
    let rw = w.try_lock_shared_for("s", DEADLINE).expect("shared w");
    assert_eq!(
        (ra.mode(), rc.mode(), rw.mode()),
        (Mode::Shared, Mode::Shared, Mode::Shared)
    );
    drop(rw);
    assert!(matches!(w.try_lock("s"), Err(Error::WouldBlock)));
    assert!(matches!(
        w.try_lock_for("s", Duration::from_millis(20)),
        Err(Error::TimedOut { .. })
    ));
    drop((ra, rc));
    let x = soon(&w, "s");
    assert_eq!(x.mode(), Mode::Exclusive);
}

fn assert_send<T: Send + 'static>(_: &T) {}

/// Owned guards: kept in a struct, moved to another thread, unlocked there.
fn owned<B: Backend>(b: &B)
where
    <B::L as Locker>::Guard<Arc<B::L>>: Send,
{
    struct Job<G> {
        lock: G,
    }
    let a = Arc::new(b.open("a"));
    let c = b.open("c");
    let job = Job {
        lock: a.lock_arc("o").expect("lock_arc"),
    };
    assert_send(&job.lock);
    let token = job.lock.token();
    assert!(matches!(c.try_lock("o"), Err(Error::WouldBlock)));
    let (held, unlock) = (mpsc::channel::<()>(), mpsc::channel::<()>());
    let t = std::thread::spawn(move || {
        let Job { lock } = job;
        held.0.send(()).unwrap();
        unlock.1.recv().unwrap();
        lock.unlock()
    });
    held.1.recv().unwrap();
    assert!(
        matches!(c.try_lock("o"), Err(Error::WouldBlock)),
        "held by the other thread"
    );
    unlock.0.send(()).unwrap();
    t.join().unwrap().expect("unlock on the other thread");
    let g = c.try_lock("o").expect("free once the owned guard unlocked");
    assert!(g.token() > token);
    drop(g);
    // Shared and any-mode owned guards, and an owned guard dropped after its Arc's last clone.
    let r1 = a.lock_shared_arc("r").expect("shared arc");
    let r2 = a.acquire_arc("r2", Mode::Shared, Wait::No).expect("acquire_arc");
    assert_eq!((r1.mode(), r2.mode()), (Mode::Shared, Mode::Shared));
    drop(a);
    assert!(
        matches!(c.try_lock("r"), Err(Error::WouldBlock)),
        "the owned guard keeps its client"
    );
    drop((r1, r2));
    drop(soon(&c, "r"));
}

/// Bad names get the same error on every backend.
fn bad_names<B: Backend>(b: &B) {
    let (a, c) = (b.open("a"), b.open("c"));
    let keep = a.lock("keep").expect("lock keep");
    assert!(matches!(a.try_lock(""), Err(Error::NameInvalid { len: 0, .. })));
    let long = "x".repeat(10_000);
    assert!(matches!(a.lock(&long), Err(Error::NameInvalid { len: 10_000, .. })));
    // Nothing held was lost (a remote session that a long line ended would have lost `keep`).
    assert!(
        matches!(c.try_lock("keep"), Err(Error::WouldBlock)),
        "keep is still held"
    );
    let g = a.lock("ok").expect("lock after bad names");
    g.unlock().expect("unlock");
    keep.unlock().expect("keep was held all along");
}

/// A wait its caller interrupts gives up with `Interrupted`, holding nothing; the lock goes on
/// to the next waiter.
fn interruptible<B: Backend>(b: &B) {
    let (a, c, d) = (b.open("a"), b.open("c"), b.open("d"));
    let g = a.lock("i").expect("lock");
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        let waiting = s.spawn(|| {
            let mut interrupted = || stop.load(std::sync::atomic::Ordering::Relaxed);
            c.acquire_interruptible("i", Mode::Exclusive, Wait::Forever, &mut interrupted)
                .map(|g| g.token())
        });
        std::thread::sleep(Duration::from_millis(120));
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        assert!(matches!(waiting.join().unwrap(), Err(Error::Interrupted)));
    });
    drop(g);
    // Nothing of c's is left queued or held: d gets the lock, and c can ask again.
    soon(&d, "i").unlock().expect("unlock");
    let mut never = || false;
    let g = c
        .acquire_interruptible("i", Mode::Shared, Wait::for_duration(DEADLINE), &mut never)
        .expect("c locks after its interrupted wait");
    assert_eq!(g.mode(), Mode::Shared);
}

/// A forked child that uses its parent's client gets `ForkedClient`, and nothing of the
/// parent's is given back by the child's copies; a client of its own works.
#[allow(unsafe_code)]
fn forked<B: Backend>(b: &B) {
    let a = b.open("a");
    let g = a.lock("f").expect("lock");
    // SAFETY: the child runs only this code and leaves with _exit (see tests/locking.rs's fork
    // test); the gateway's threads stay in the parent, where they keep serving.
    match unsafe { nix::unistd::fork() }.expect("fork") {
        nix::unistd::ForkResult::Child => {
            let code = 'child: {
                if !matches!(a.try_lock("g"), Err(Error::ForkedClient { .. })) {
                    break 'child 1;
                }
                drop(g);
                drop(a);
                let own = b.open("child");
                if !matches!(own.try_lock("f"), Err(Error::WouldBlock)) {
                    break 'child 2;
                }
                0
            };
            // SAFETY: ends the child at once, running nothing of the parent's.
            unsafe { libc::_exit(code) }
        }
        nix::unistd::ForkResult::Parent { child } => {
            let status = nix::sys::wait::waitpid(child, None).expect("waitpid");
            assert_eq!(
                status,
                nix::sys::wait::WaitStatus::Exited(child, 0),
                "the child's checks"
            );
            g.unlock().expect("still the parent's lock");
            soon(&a, "g").unlock().expect("the parent's client still works");
        }
    }
}

#[test]
fn interruptible_local() {
    interruptible(&local("c-intr"));
}

#[test]
fn interruptible_remote() {
    interruptible(&remote("c-intr-r"));
}

#[test]
fn forked_local() {
    forked(&local("c-fork"));
}

#[test]
fn forked_remote() {
    forked(&remote("c-fork-r"));
}

#[test]
fn exclusive_local() {
    exclusive(&local("c-excl"));
}

#[test]
fn exclusive_remote() {
    exclusive(&remote("c-excl-r"));
}

#[test]
fn shared_local() {
    shared(&local("c-shared"));
}

#[test]
fn shared_remote() {
    shared(&remote("c-shared-r"));
}

#[test]
fn owned_guards_local() {
    owned(&local("c-owned"));
}

#[test]
fn owned_guards_remote() {
    owned(&remote("c-owned-r"));
}

#[test]
fn bad_names_local() {
    bad_names(&local("c-names"));
}

#[test]
fn bad_names_remote() {
    bad_names(&remote("c-names-r"));
}

/// The contract on etcd (feature `etcd`; needs `etcd` on PATH).
#[cfg(feature = "etcd")]
mod on_etcd {
    use super::*;

    #[test]
    fn interruptible_etcd() {
        interruptible(&etcd("c-intr-e"));
    }

    #[test]
    fn forked_etcd() {
        forked(&etcd("c-fork-e"));
    }

    #[test]
    fn exclusive_etcd() {
        exclusive(&etcd("c-excl-e"));
    }

    #[test]
    fn shared_etcd() {
        shared(&etcd("c-shared-e"));
    }

    #[test]
    fn owned_guards_etcd() {
        owned(&etcd("c-owned-e"));
    }

    #[test]
    fn bad_names_etcd() {
        bad_names(&etcd("c-names-e"));
    }
}
