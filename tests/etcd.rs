//! The etcd backend against one real etcd member (started per test on free loopback ports):
//! exclusion across processes, FIFO order, shared mode, timeouts and try-lock that leave nothing
//! behind, owner-died after `kill -9` of a holder, tokens, interop with `etcdctl lock`, and a
//! lost session.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::etcd::{connect, etcdctl, opts, queue_len, EtcdCluster};
use common::{await_file, signal, wait_until, ChildCtx, Log, TestEnv, Words, COUNT};
use shmlock::etcd::EtcdClient;
use shmlock::{Error, Guard, Locker, Mode, Wait};

common::child_roles! {
    "witness" => witness,
    "hold" => hold,
    "queue" => queue,
}

/// Child: `iters` witnessed critical sections under lock `name`, logging each token.
fn witness(ctx: &ChildCtx) {
    let client = connect(&ctx.param::<String>("endpoints"), 10, "witness");
    let words = Words::open(&ctx.path("words"));
    let log = Log::open(&ctx.path("tokens"));
    let id: u64 = ctx.param("id");
    for i in 0..ctx.param::<u64>("iters") {
        let g = client.lock("witnessed").expect("lock");
        common::witnessed_section(&words, id, i);
        log.append(&g.token().0.to_string());
        g.unlock().expect("unlock");
    }
}

/// Child: locks `name`, says so in file `held`, and holds until killed.
fn hold(ctx: &ChildCtx) {
    let client = connect(&ctx.param::<String>("endpoints"), ctx.param("ttl"), "holder");
    let g = client.lock(ctx.param::<String>("name")).expect("lock");
    signal(&ctx.path("held"), &g.token().0.to_string());
    std::thread::sleep(Duration::from_secs(3600));
}

/// Child: queues for `name` and logs its id, token and owner-died notice when granted.
fn queue(ctx: &ChildCtx) {
    let client = connect(&ctx.param::<String>("endpoints"), 10, "queue");
    let g = client.lock(ctx.param::<String>("name")).expect("lock");
    let log = Log::open(&ctx.path("grants"));
    log.append(&format!(
        "{} {} {}",
        ctx.param::<String>("id"),
        g.token().0,
        g.owner_died()
    ));
    std::thread::sleep(Duration::from_millis(ctx.param("hold_ms")));
    g.unlock().expect("unlock");
}

#[test]
fn exclusion_across_processes_with_increasing_tokens() {
    let env = TestEnv::new("etcd-excl");
    let etcd = EtcdCluster::start(&env.dir, 1);
    let _ = Words::create(&env.path("words"), 2);
    let (children, iters) = (3u64, 40u64);
    for id in 1..=children {
        env.spawn(
            "witness",
            &[("endpoints", &etcd.endpoints()), ("id", &id), ("iters", &iters)],
        );
    }
    env.wait_all_checked();
    assert_eq!(Words::open(&env.path("words")).get(COUNT), children * iters);
    // Tokens in grant order (the log's order) strictly increase.
    let tokens: Vec<u64> = common::read_lines(&env.path("tokens"))
        .iter()
        .map(|l| l.parse().expect("token"))
        .collect();
    assert_eq!(tokens.len() as u64, children * iters);
    assert!(
        tokens.windows(2).all(|w| w[0] < w[1]),
        "tokens not increasing: {tokens:?}"
    );
}

#[test]
fn waiters_are_granted_in_fifo_order_and_a_clean_unlock_is_no_owner_death() {
    let env = TestEnv::new("etcd-fifo");
    let etcd = EtcdCluster::start(&env.dir, 1);
    let client = connect(&etcd.endpoints(), 10, "parent");
    let g = client.lock("fifo").expect("lock");
    for id in 0..4 {
        env.spawn(
            "queue",
            &[
                ("endpoints", &etcd.endpoints()),
                ("name", &"fifo"),
                ("id", &id),
                ("hold_ms", &20),
            ],
        );
        wait_until("the waiter to queue", || queue_len(&client, "fifo") == (1, id + 1));
    }
    let first = g.token().0;
    g.unlock().expect("unlock");
    env.wait_all_checked();
    let grants: Vec<Vec<String>> = common::read_lines(&env.path("grants"))
        .iter()
        .map(|l| l.split(' ').map(String::from).collect())
        .collect();
    let ids: Vec<&str> = grants.iter().map(|g| g[0].as_str()).collect();
    assert_eq!(ids, ["0", "1", "2", "3"], "grants out of queue order");
    let tokens: Vec<u64> = grants.iter().map(|g| g[1].parse().unwrap()).collect();
    assert!(
        first < tokens[0] && tokens.windows(2).all(|w| w[0] < w[1]),
        "{first} {tokens:?}"
    );
    assert!(
        grants.iter().all(|g| g[2] == "false"),
        "owner died after clean unlocks: {grants:?}"
    );
    assert_eq!(queue_len(&client, "fifo"), (0, 0), "keys left behind");
}

#[test]
fn shared_mode_try_lock_and_timeouts_leave_nothing_behind() {
    let env = TestEnv::new("etcd-shared");
    let etcd = EtcdCluster::start(&env.dir, 1);
    let (a, b, c) = (
        connect(&etcd.endpoints(), 10, "a"),
        connect(&etcd.endpoints(), 10, "b"),
        connect(&etcd.endpoints(), 10, "c"),
    );
    let ga = a.lock_shared("rw").expect("shared a");
    let gb = b.try_lock_shared("rw").expect("shared b beside a");
    assert_eq!((ga.mode(), gb.mode()), (Mode::Shared, Mode::Shared));
    assert!(matches!(c.try_lock("rw"), Err(Error::WouldBlock)));
    let t0 = Instant::now();
    match c.try_lock_for("rw", Duration::from_millis(300)) {
        Err(Error::TimedOut { waited, holder }) => {
            assert!(waited >= Duration::from_millis(300), "{waited:?}");
            let holder = holder.expect("the timeout names the holder");
            assert_eq!(holder.pid, std::process::id());
            assert_eq!(holder.holders, 2, "two shared holders");
            assert!(holder.label.starts_with("a, lease "), "{}", holder.label);
        }
        other => panic!("expected TimedOut, got {other:?}"),
    }
    assert!(t0.elapsed() >= Duration::from_millis(300));
    assert_eq!(queue_len(&a, "rw"), (2, 0), "a withdrawn waiter left its key");
    // Re-locking what this client holds is an error, not a deadlock.
    assert!(matches!(a.try_lock_shared("rw"), Err(Error::AlreadyHeld)));
    assert!(matches!(a.lock("rw"), Err(Error::AlreadyHeld)));
    // A writer queued behind readers keeps later readers out (no barging).
    let writer = std::thread::scope(|s| {
        let w = s.spawn(|| c.lock("rw").map(|g| (g.token(), g.owner_died())));
        wait_until("the writer to queue", || queue_len(&a, "rw") == (2, 1));
        let d = connect(&etcd.endpoints(), 10, "d");
        assert!(
            matches!(d.try_lock_shared("rw"), Err(Error::WouldBlock)),
            "a reader barged past a writer"
        );
        drop(ga);
        gb.unlock().expect("unlock b");
        w.join().expect("writer thread")
    });
    let (token, died) = writer.expect("writer granted");
    assert!(!died);
    assert!(token.0 > 0);
    assert_eq!(
        queue_len(&a, "rw"),
        (0, 0),
        "the writer's guard was dropped in the thread"
    );
    // Names are bytes: empty is refused; NUL and non-UTF-8 bytes work.
    assert!(matches!(a.try_lock(""), Err(Error::NameInvalid { len: 0, .. })));
    let odd = a.try_lock(b"odd\0\xff name").expect("odd name");
    assert_eq!(&*odd.name(), b"odd\0\xff name");
}

#[test]
fn owner_died_after_kill_9_of_a_holder_is_granted_after_the_ttl() {
    let env = TestEnv::new("etcd-died");
    let etcd = EtcdCluster::start(&env.dir, 1);
    let ttl = 2u64;
    let holder = env.spawn(
        "hold",
        &[("endpoints", &etcd.endpoints()), ("name", &"died"), ("ttl", &ttl)],
    );
    let held: u64 = await_file(&env.path("held")).parse().expect("token");
    let client = connect(&etcd.endpoints(), 10, "heir");
    assert!(matches!(client.try_lock("died"), Err(Error::WouldBlock)));
    let killed_at = std::thread::scope(|s| {
        let w = s.spawn(|| {
            client
                .lock("died")
                .map(|g| (g.token().0, g.owner_died(), Instant::now()))
        });
        wait_until("the heir to queue", || queue_len(&client, "died") == (1, 1));
        env.kill(holder);
        let killed = Instant::now();
        let (token, died, at) = w.join().expect("heir").expect("granted");
        assert!(died, "the grant after a holder's lease expired must say owner died");
        assert!(token > held, "token {token} not above the dead holder's {held}");
        at.duration_since(killed)
    });
    // Granted by the lease's expiry, not earlier (no second holder while the dead one's lease
    // lived), and not much later.
    assert!(
        killed_at >= Duration::from_millis(ttl * 1000 - 500),
        "granted {killed_at:?} after the kill"
    );
    assert!(
        killed_at < Duration::from_secs(ttl + 10),
        "granted {killed_at:?} after the kill"
    );
}

#[test]
fn etcdctl_lock_and_ours_exclude_and_queue_in_order() {
    let env = TestEnv::new("etcd-interop");
    let etcd = EtcdCluster::start(&env.dir, 1);
    let client = connect(&etcd.endpoints(), 10, "ours");
    // etcdctl holds: ours waits.
    let flag = env.path("etcdctl-held");
    let release = env.path("etcdctl-release");
    let mut ctl = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={}", etcd.endpoints()))
        .args(["lock", "shared/name", "--", "sh", "-c"])
        .arg(format!(
            "touch {}; while [ ! -e {} ]; do sleep 0.02; done",
            flag.display(),
            release.display()
        ))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .expect("etcdctl lock");
    wait_until("etcdctl to hold the lock", || flag.exists());
    assert!(matches!(client.try_lock("shared/name"), Err(Error::WouldBlock)));
    let after_ctl = std::thread::scope(|s| {
        let w = s.spawn(|| client.lock("shared/name").map(|g| g.token().0));
        wait_until("ours to queue behind etcdctl", || {
            queue_len(&client, "shared/name") == (1, 1)
        });
        std::fs::write(&release, "").expect("release etcdctl");
        w.join().expect("ours")
    });
    assert!(after_ctl.expect("granted after etcdctl") > 0);
    assert!(ctl.wait().expect("etcdctl exit").success());

    // Ours holds: etcdctl waits, and a second client of ours queued after etcdctl is granted
    // after it.
    let g = client.lock("shared/name").expect("lock");
    let got = env.path("etcdctl-got");
    let mut ctl = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={}", etcd.endpoints()))
        .args(["lock", "shared/name", "--", "sh", "-c"])
        .arg(format!("echo $(date +%s%N) > {}; sleep 0.3", got.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .expect("etcdctl lock");
    wait_until("etcdctl to queue", || queue_len(&client, "shared/name") == (1, 1));
    let second = connect(&etcd.endpoints(), 10, "second");
    std::thread::scope(|s| {
        let w = s.spawn(|| second.lock("shared/name").map(|_| ()));
        wait_until("our second to queue", || queue_len(&client, "shared/name") == (1, 2));
        std::thread::sleep(Duration::from_millis(200));
        assert!(!got.exists(), "etcdctl got the lock while ours held it");
        g.unlock().expect("unlock");
        w.join().expect("second").expect("second granted");
        assert!(
            got.exists(),
            "our second was granted before etcdctl, which queued first"
        );
    });
    assert!(ctl.wait().expect("etcdctl exit").success());
    assert!(etcdctl(&etcd.endpoints(), &["get", "--prefix", "shared/name/"]).is_some_and(|o| o.trim().is_empty()));
}

#[test]
fn losing_the_cluster_loses_the_lock_and_a_restart_resumes() {
    let env = TestEnv::new("etcd-lost");
    let mut etcd = EtcdCluster::start(&env.dir, 1);
    let ttl = 2u64;
    let client = connect(&etcd.endpoints(), ttl, "lost");
    let g = client.lock("lost").expect("lock");
    assert!(!g.lost());
    etcd.kill(0);
    let down = Instant::now();
    assert!(
        g.wait_lost(Some(Duration::from_secs(ttl + 5))),
        "not told within TTL + 5 s"
    );
    let notice = down.elapsed();
    assert!(g.lost() && Guard::lost(&g));
    // The design: at most the TTL after the last answered keep-alive; 3 s of slack for timers
    // and scheduling on a loaded machine (as tests/etcd_cluster.rs allows).
    assert!(notice <= Duration::from_secs(ttl + 3), "told {notice:?} after the loss");
    assert!(g.lost_reason().is_some());
    assert!(matches!(g.unlock(), Err(Error::Lost { .. })));
    // Without a cluster nothing is granted.
    assert!(client.acquire("other", Mode::Exclusive, Wait::No).is_err());
    etcd.restart(0);
    etcd.wait_healthy();
    // A new session: the name is free (the old lease was revoked or expired).
    let g = client
        .try_lock_for("lost", Duration::from_secs(ttl + 5))
        .expect("lock after restart");
    assert!(!g.lost());
}

#[test]
fn an_interrupted_wait_keeps_its_place_until_it_withdraws() {
    let env = TestEnv::new("etcd-intr");
    let etcd = EtcdCluster::start(&env.dir, 1);
    let a = connect(&etcd.endpoints(), 10, "a");
    let b = connect(&etcd.endpoints(), 10, "b");
    let _g = a.lock("intr").expect("lock");
    let mut asked = 0;
    let r = b.acquire_interruptible("intr", Mode::Exclusive, Wait::Forever, &mut || {
        asked += 1;
        assert_eq!(
            queue_len(&a, "intr"),
            (1, 1),
            "the waiter left the queue while it waited"
        );
        asked == 3
    });
    assert!(matches!(r, Err(Error::Interrupted)), "{r:?}");
    assert_eq!(asked, 3);
    assert_eq!(queue_len(&a, "intr"), (1, 0), "the interrupted waiter left its key");
}

#[test]
#[allow(unsafe_code)]
fn a_forked_child_cannot_use_its_parents_client_and_leaves_its_locks_alone() {
    let env = TestEnv::new("etcd-fork");
    let etcd = EtcdCluster::start(&env.dir, 1);
    let endpoints = etcd.endpoints();
    let client = connect(&endpoints, 10, "parent");
    let g = client.lock("a").expect("lock");
    // SAFETY: the child runs only this block's code and leaves with _exit, running no
    // destructors of the parent's state (the inherited client's drop is the code under test:
    // it must neither end the parent's session nor wait for the parent's runtime thread).
    match unsafe { nix::unistd::fork() }.expect("fork") {
        nix::unistd::ForkResult::Child => {
            let code = 'child: {
                match client.try_lock("b") {
                    Err(Error::ForkedClient { opened_by, pid }) if opened_by != pid => {}
                    _ => break 'child 1,
                }
                if !matches!(client.locks(b""), Err(Error::ForkedClient { .. })) {
                    break 'child 2;
                }
                drop(g);
                drop(client);
                let own = match EtcdClient::connect(endpoints.split(','), opts(10, "child")) {
                    Ok(c) => c,
                    Err(_) => break 'child 3,
                };
                if !matches!(own.try_lock("a"), Err(Error::WouldBlock)) {
                    break 'child 4;
                }
                match own.lock("c").map(|g| g.unlock()) {
                    Ok(Ok(())) => 0,
                    _ => 5,
                }
            };
            // SAFETY: _exit ends the child at once (no atexit handlers, no destructors).
            unsafe { libc::_exit(code) }
        }
        nix::unistd::ForkResult::Parent { child } => {
            let status = common::within("the forked child", move || nix::sys::wait::waitpid(child, None));
            assert_eq!(
                status.expect("waitpid"),
                nix::sys::wait::WaitStatus::Exited(child, 0),
                "the child's checks"
            );
            assert!(!g.lost());
            assert_eq!(queue_len(&client, "a"), (1, 0), "the parent still holds");
            g.unlock().expect("the parent's guard still unlocks");
        }
    }
}

#[test]
fn a_revoked_lease_loses_its_locks_and_the_next_request_opens_a_new_session() {
    let env = TestEnv::new("etcd-revoke");
    let etcd = EtcdCluster::start(&env.dir, 1);
    let client = connect(&etcd.endpoints(), 10, "revoked");
    let other = connect(&etcd.endpoints(), 10, "other");
    let g = client.lock("held").expect("lock");
    let blocker = other.lock("waited").expect("lock");
    let old = client.lease_id();
    std::thread::scope(|s| {
        // A waiter of the revoked session: it held nothing, so it goes on in a new session.
        let w = s.spawn(|| client.lock("waited").map(|g| g.lease_id()));
        wait_until("the waiter to queue", || queue_len(&other, "waited") == (1, 1));
        assert!(etcdctl(&etcd.endpoints(), &["lease", "revoke", &format!("{old:x}")]).is_some());
        assert!(g.wait_lost(Some(Duration::from_secs(10))), "the holder was not told");
        assert!(
            g.lost_reason().is_some_and(|r| r.contains("expired or was revoked")),
            "{:?}",
            g.lost_reason()
        );
        wait_until("the waiter to queue again, in its new session", || {
            queue_len(&other, "waited") == (1, 1) && client.lease_id() != old
        });
        blocker.unlock().expect("unlock");
        let lease = w
            .join()
            .expect("waiter")
            .expect("the waiter is granted in its new session");
        assert_ne!(lease, old);
    });
    assert!(matches!(g.unlock(), Err(Error::Lost { .. })));
    // The held lock went with the lease: another client takes it at once.
    other.try_lock("held").expect("the revoked session's lock is free");
}
