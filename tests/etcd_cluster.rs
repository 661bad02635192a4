//! The etcd backend on a 3-member cluster (started per test on free loopback ports, election
//! timeout 500 ms, heartbeat 50 ms), under failures: the leader SIGKILLed while a lock is held
//! and waiters queue (exclusion, queue order and tokens survive; nothing is left behind); two of
//! three members stopped (killed, or frozen by SIGSTOP) while locks are held (every holder is
//! told in time, nothing is granted without quorum, locking resumes once they are back and the
//! lost sessions' keys go, and a request that failed meanwhile holds nothing); a client whose
//! first endpoint is dead; a clean unlock followed by the holder's exit is no owner death.
//!
//! The bound on the lost-lock notice follows src/etcd/session.rs: a session is declared lost at
//! the latest when the TTL has passed since the last keep-alive that was answered was *sent*,
//! which was before the members stopped; so at most `TTL` after the outage began, plus the
//! timer's and the scheduler's slack, for which [`NOTICE_SLACK`] allows generously.

mod common;

use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::etcd::{connect, etcdctl, opts, queue_len, EtcdCluster};
use common::{wait_until, ChildCtx, Log, TestEnv, Words, FLAG};
use shmlock::etcd::EtcdClient;
use shmlock::{Error, Guard};

common::child_roles! {
    "waiter" => waiter,
    "patient" => patient,
    "unlock_and_exit" => unlock_and_exit,
}

/// Waits (up to a minute) until `path` exists.
fn await_long(path: &std::path::Path) {
    let t0 = Instant::now();
    while !path.exists() {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "no {} after a minute",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// What the lost-lock notice may take beyond the TTL on a loaded machine (the design says at
/// most the TTL; this is slack for timers and scheduling on a busy CI runner, not a target).
const NOTICE_SLACK: Duration = Duration::from_secs(3);

fn unix_ms() -> u128 {
    SystemTime::now().duration_since(UNIX_EPOCH).expect("clock").as_millis()
}

/// Child: queues for `name` (one lock, waiting as long as it takes), and once granted: logs
/// `id token owner_died` to `grants`, stays `hold_ms` inside a witnessed section (the words file
/// `words`: nobody else may enter meanwhile), and unlocks. It keeps its client (and lease) until
/// file `exit` appears, so that the next waiter sees a clean unlock, not a lease's end.
fn waiter(ctx: &ChildCtx) {
    let client = connect(&ctx.param::<String>("endpoints"), 10, "waiter");
    let words = Words::open(&ctx.path("words"));
    let id: u64 = ctx.param("id");
    let g = client.lock(ctx.param::<String>("name")).expect("lock");
    let inside = words.get(FLAG);
    assert_eq!(inside, 0, "waiter {id} granted while {inside} is inside");
    words.set(FLAG, id);
    Log::open(&ctx.path("grants")).append(&format!("{id} {} {}", g.token().0, g.owner_died()));
    std::thread::sleep(Duration::from_millis(ctx.param("hold_ms")));
    let inside = words.get(FLAG);
    assert_eq!(inside, id, "{inside} entered while waiter {id} held");
    words.set(FLAG, 0);
    assert!(!g.lost(), "waiter {id} lost its lock: {:?}", g.lost_reason());
    g.unlock().expect("unlock");
    await_long(&ctx.path("exit"));
}

/// Child: locks `name`, signals `held`, unlocks when `release` appears, and exits at once (its
/// client's drop revokes its lease right after the unlock).
fn unlock_and_exit(ctx: &ChildCtx) {
    let client = connect(&ctx.param::<String>("endpoints"), 10, "unlock-and-exit");
    let g = client.lock(ctx.param::<String>("name")).expect("lock");
    common::signal(&ctx.path("held"), "");
    await_long(&ctx.path("release"));
    g.unlock().expect("unlock");
}

/// Child: queues for `name` with a long TTL (its session outlives the outage) and logs what came
/// of it to `patient`: `granted TOKEN UNIX_MS` or `error UNIX_MS WHY`. Either way it keeps its
/// client open afterwards (as a long-lived program would) until file `exit` appears, then unlocks
/// what it holds.
fn patient(ctx: &ChildCtx) {
    let client = connect(&ctx.param::<String>("endpoints"), 30, "patient");
    let log = Log::open(&ctx.path("patient"));
    let r = client.lock(ctx.param::<String>("name"));
    match &r {
        Ok(g) => log.append(&format!("granted {} {}", g.token().0, unix_ms())),
        Err(e) => log.append(&format!("error {} {}", unix_ms(), e.to_string().replace('\n', " "))),
    }
    common::await_file(&ctx.path("exit"));
    if let Ok(g) = r {
        g.unlock().expect("patient's unlock");
    }
}

/// Every key under `prefix` in the cluster, as etcdctl lists them (keys only).
fn keys_under(endpoints: &str, prefix: &str) -> Vec<String> {
    etcdctl(endpoints, &["get", "--prefix", "--keys-only", prefix])
        .expect("etcdctl get")
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(String::from)
        .collect()
}

/// The lease ids (hex) the cluster has now.
fn leases(endpoints: &str) -> Vec<i64> {
    etcdctl(endpoints, &["lease", "list"])
        .expect("etcdctl lease list")
        .lines()
        // "found N leases", then one id (hex) a line.
        .filter_map(|l| i64::from_str_radix(l.trim(), 16).ok())
        .collect()
}

/// Every member answers a health check, and a write through one member is read back
/// (linearizably) through each of the others.
fn assert_cluster_healthy(etcd: &EtcdCluster, key: &str) {
    for url in etcd.urls() {
        assert!(
            etcdctl(&url, &["endpoint", "health"]).is_some(),
            "{url} unhealthy:\n{}",
            etcd.logs()
        );
    }
    let urls = etcd.urls();
    assert!(etcdctl(&urls[0], &["put", key, "v"]).is_some(), "put via {}", urls[0]);
    for url in &urls {
        wait_until(&format!("{url} to read {key}"), || {
            etcdctl(url, &["get", "--print-value-only", key]).is_some_and(|v| v.trim() == "v")
        });
    }
    assert!(etcdctl(&urls[0], &["del", key]).is_some());
}

#[test]
fn killing_the_leader_keeps_exclusion_queue_order_and_tokens() {
    let env = TestEnv::new("etcdc-leader");
    let mut etcd = EtcdCluster::start(&env.dir, 3);
    let endpoints = etcd.endpoints();
    let words = Words::create(&env.path("words"), 2);
    let (name, n, hold_ms) = ("failover", 6u64, 500u64);
    let client = connect(&endpoints, 10, "first");
    let g = client.lock(name).expect("lock");
    words.set(FLAG, 99);
    for id in 1..=n {
        env.spawn(
            "waiter",
            &[
                ("endpoints", &endpoints),
                ("name", &name),
                ("id", &id),
                ("hold_ms", &hold_ms),
            ],
        );
        wait_until("the waiter to queue", || queue_len(&client, name) == (1, id as usize));
    }

    // The leader dies while the lock is held and six wait.
    let first_leader = etcd.wait_leader();
    etcd.kill(first_leader);
    let second_leader = etcd.wait_leader();
    assert_ne!(first_leader, second_leader);
    // The two that are left keep the queue as it was, and grant nothing while the lock is held.
    wait_until("the queue through the new leader", || {
        client.locks(name.as_bytes()).is_ok_and(|l| {
            l.iter()
                .any(|l| l.name == name.as_bytes() && (l.holders.len(), l.waiters.len()) == (1, n as usize))
        })
    });
    // The killed member comes back while the lock is still held, and catches up.
    etcd.restart(first_leader);
    etcd.wait_healthy();
    assert!(
        common::read_lines(&env.path("grants")).is_empty(),
        "a waiter was granted while the first holder held"
    );
    assert!(
        !g.lost(),
        "a leader's death lost a lock of a 10 s TTL: {:?}",
        g.lost_reason()
    );
    let first = g.token().0;
    assert_eq!(words.get(FLAG), 99);
    words.set(FLAG, 0);
    g.unlock().expect("unlock after the leader's death");

    // While the grants pass from waiter to waiter, the new leader dies too (quorum stays: two
    // of three run at any moment).
    wait_until("the first grant", || {
        !common::read_lines(&env.path("grants")).is_empty()
    });
    let killed_second = etcd.wait_leader();
    let granted_before = common::read_lines(&env.path("grants")).len();
    etcd.kill(killed_second);
    let t0 = Instant::now();
    while common::read_lines(&env.path("grants")).len() < n as usize {
        assert!(t0.elapsed() < Duration::from_secs(90), "not every waiter was granted");
        std::thread::sleep(Duration::from_millis(10));
    }
    common::signal(&env.path("exit"), "");
    env.wait_all();
    let grants: Vec<Vec<String>> = common::read_lines(&env.path("grants"))
        .iter()
        .map(|l| l.split(' ').map(String::from).collect())
        .collect();
    let ids: Vec<u64> = grants.iter().map(|g| g[0].parse().unwrap()).collect();
    assert_eq!(ids, (1..=n).collect::<Vec<_>>(), "grants out of queue order");
    assert!(
        granted_before < n as usize,
        "every grant came before the second kill: the test missed its window ({granted_before})"
    );
    let tokens: Vec<u64> = grants.iter().map(|g| g[1].parse().unwrap()).collect();
    assert!(
        first < tokens[0] && tokens.windows(2).all(|w| w[0] < w[1]),
        "tokens not strictly increasing: {first} {tokens:?}"
    );
    assert!(
        grants.iter().all(|g| g[2] == "false"),
        "an owner-died notice after clean unlocks: {grants:?}"
    );
    // Nothing left behind: no key under the name, no waiter or holder.
    let alive: String = (0..3)
        .filter(|&i| etcd.running(i))
        .map(|i| etcd.members[i].client_url.clone())
        .collect::<Vec<_>>()
        .join(",");
    assert_eq!(queue_len(&client, name), (0, 0));
    assert_eq!(
        keys_under(&alive, "failover/"),
        Vec::<String>::new(),
        "keys left behind"
    );
    // The killed member comes back, catches up and serves.
    etcd.restart(killed_second);
    etcd.wait_healthy();
    assert_cluster_healthy(&etcd, "health/after-leader-kills");
    let url = etcd.members[killed_second].client_url.clone();
    let only_it = connect(&url, 10, "restarted");
    let g = only_it.try_lock(name).expect("lock through the restarted member alone");
    assert!(g.token().0 > *tokens.last().unwrap());
    g.unlock().expect("unlock");
}

/// What came of two holders (TTL 2 s) and a waiter queued before the outage, when `stop` takes
/// two of three members away and `restore` brings them back.
fn quorum_loss(test: &str, stop: fn(&mut EtcdCluster) -> Vec<usize>, restore: fn(&mut EtcdCluster, &[usize])) {
    let env = TestEnv::new(test);
    let mut etcd = EtcdCluster::start(&env.dir, 3);
    let endpoints = etcd.endpoints();
    let ttl = 2u64;
    let a = connect(&endpoints, ttl, "a");
    let b = connect(&endpoints, ttl, "b");
    let d = connect(&endpoints, 10, "d");
    let ga = a.lock("q/a").expect("lock a");
    let gb = b.lock("q/b").expect("lock b");
    let (lease_a, lease_b) = (ga.lease_id(), gb.lease_id());
    let (token_a, token_b) = (ga.token().0, gb.token().0);
    env.spawn("patient", &[("endpoints", &endpoints), ("name", &"q/a")]);
    wait_until("the patient to queue", || queue_len(&d, "q/a") == (1, 1));
    assert!(!ga.lost() && !gb.lost());
    let before = leases(&endpoints);
    assert!(before.contains(&lease_a) && before.contains(&lease_b), "{before:x?}");

    let stopped = stop(&mut etcd);
    let outage = Instant::now();
    // Each holder is told, within the TTL (plus slack) of the outage's start.
    let bound = Duration::from_secs(ttl) + NOTICE_SLACK;
    let told = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for (who, g) in [("a", &ga), ("b", &gb)] {
            let told = &told;
            s.spawn(move || {
                let lost = g.wait_lost(Some(bound + Duration::from_secs(5)));
                told.lock().unwrap().push((who, lost, outage.elapsed()));
            });
        }
        // Meanwhile nothing is granted: a free name cannot be locked.
        let t0 = Instant::now();
        let r = d.try_lock_for("q/free", Duration::from_secs(1));
        assert!(r.is_err(), "granted without quorum: {r:?}");
        eprintln!(
            "try_lock_for(1 s) without quorum: {:?} after {:?}",
            r.err(),
            t0.elapsed()
        );
    });
    for (who, lost, after) in told.into_inner().unwrap() {
        assert!(lost, "holder {who} not told its lock was lost within {after:?}");
        assert!(
            after <= bound,
            "holder {who} told {after:?} after the outage began (bound {bound:?})"
        );
        eprintln!("holder {who} told {after:?} after the outage began");
    }
    for g in [&ga, &gb] {
        assert!(g.lost() && Guard::lost(g));
        assert!(g.lost_reason().is_some());
    }
    // The waiter queued before the outage was not granted during it (it may have given up with
    // an error; it must not hold).
    let during = common::read_lines(&env.path("patient"));
    assert!(
        !during.iter().any(|l| l.starts_with("granted")),
        "the waiter was granted during the outage: {during:?}"
    );
    assert!(matches!(ga.unlock(), Err(Error::Lost { .. })));
    assert!(matches!(gb.unlock(), Err(Error::Lost { .. })));

    restore(&mut etcd, &stopped);
    let restored_ms = unix_ms();
    etcd.wait_healthy();
    // Locking resumes: the same client (a new session, the lost one revoked), and a fresh one.
    let ga2 = a
        .try_lock_for("q/a-again", Duration::from_secs(20))
        .expect("lock on the same client after the outage");
    assert_ne!(ga2.lease_id(), lease_a, "the lost session was reused");
    let fresh = connect(&endpoints, 10, "fresh");
    // q/b's key belongs to b's lost session, which b has not revoked (it made no request since):
    // its lease expires at the cluster within the TTL, and the name is free again.
    let gb2 = fresh
        .try_lock_for("q/b", Duration::from_secs(ttl + 20))
        .expect("q/b free once the lost lease expired");
    assert!(
        gb2.token().0 > token_b,
        "token {} not above the lost holder's {token_b}",
        gb2.token().0
    );
    // The waiter queued before the outage: granted once the lost holder's key went, or told
    // of an error; in neither case may its key stay behind while its client lives.
    wait_until("the patient's outcome", || {
        !common::read_lines(&env.path("patient")).is_empty()
    });
    let outcome = common::read_lines(&env.path("patient"));
    eprintln!("the patient: {outcome:?}");
    let words: Vec<&str> = outcome[0].split(' ').collect();
    if words[0] == "granted" {
        let at: u128 = words[2].parse().unwrap();
        assert!(at >= restored_ms, "the patient was granted before quorum returned");
        let token: u64 = words[1].parse().unwrap();
        assert!(
            token > token_a,
            "the patient's token {token} not above the lost holder's {token_a}"
        );
    }
    // The old sessions' leases go (a's revoked by its next request, b's by expiry), and with
    // them their keys.
    wait_until("the lost sessions' leases to go", || {
        let l = leases(&endpoints);
        !l.contains(&lease_a) && !l.contains(&lease_b)
    });
    let ours: Vec<String> = [ga2.key(), gb2.key()]
        .iter()
        .map(|k| String::from_utf8_lossy(k).into_owned())
        .collect();
    let patient_key = keys_under(&endpoints, "q/a/");
    assert!(
        words[0] == "granted" || patient_key.is_empty(),
        "the patient's lock failed but its key {patient_key:?} stays queued while its client lives"
    );
    let mut left = keys_under(&endpoints, "q/");
    left.retain(|k| !ours.contains(k) && !k.starts_with("q/a/") && !k.starts_with("q/free/"));
    assert_eq!(left, Vec::<String>::new(), "keys of lost sessions left behind");
    // The request that failed during the outage left nothing that holds: the name is free (at
    // the latest once d's session is retired and its lease, TTL 10 s, revoked or expired).
    let free = fresh.try_lock_for("q/free", Duration::from_secs(25));
    assert!(
        free.is_ok(),
        "q/free, which nobody was granted, is not free ({free:?}): the try_lock_for that failed \
         during the outage was applied once quorum returned, and its key {:?} (client d's lease {:x}) \
         stays for as long as client d lives",
        keys_under(&endpoints, "q/free/"),
        d.lease_id()
    );
    drop(free);
    // b itself locks again, with a new session.
    let gb3 = b.try_lock_for("q/c", Duration::from_secs(20)).expect("b locks again");
    assert_ne!(gb3.lease_id(), lease_b);
    common::signal(&env.path("exit"), "");
    env.wait_all();
    drop((ga2, gb2, gb3));
    wait_until("the patient's key to go", || keys_under(&endpoints, "q/").is_empty());
}

#[test]
fn killing_two_of_three_loses_every_lock_in_time_and_grants_nothing_until_they_return() {
    quorum_loss(
        "etcdc-quorum-kill",
        |etcd| {
            // The leader and one follower: a lone follower stays.
            let leader = etcd.wait_leader();
            let other = (leader + 1) % 3;
            etcd.kill(leader);
            etcd.kill(other);
            vec![leader, other]
        },
        |etcd, stopped| {
            for &i in stopped {
                etcd.restart(i);
            }
        },
    );
}

#[test]
fn freezing_two_of_three_loses_every_lock_in_time_and_grants_nothing_until_they_thaw() {
    quorum_loss(
        "etcdc-quorum-freeze",
        |etcd| {
            // The two followers: the leader stays, alone, and must step down.
            let leader = etcd.wait_leader();
            let followers: Vec<usize> = (0..3).filter(|&i| i != leader).collect();
            for &i in &followers {
                etcd.pause(i);
            }
            followers
        },
        |etcd, stopped| {
            for &i in stopped {
                etcd.resume(i);
            }
        },
    );
}

#[test]
fn a_client_whose_first_endpoint_is_dead_still_locks() {
    let env = TestEnv::new("etcdc-dead-first");
    let mut etcd = EtcdCluster::start(&env.dir, 3);
    let urls = etcd.urls();
    etcd.kill(0);
    // The dead member first; and a port where nothing ever listened first.
    let nobody = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    };
    let a = connect(&urls.join(","), 10, "dead-first");
    let b = connect(&format!("{nobody},{},{}", urls[1], urls[2]), 10, "nobody-first");
    for round in 0..5 {
        let g = a.lock("dead-first").expect("lock with a dead first endpoint");
        assert!(
            matches!(b.try_lock("dead-first"), Err(Error::WouldBlock)),
            "round {round}: both hold"
        );
        g.unlock().expect("unlock");
        let g = b
            .lock("dead-first")
            .expect("lock with a never-listening first endpoint");
        assert!(matches!(a.try_lock("dead-first"), Err(Error::WouldBlock)));
        g.unlock().expect("unlock");
    }
    // A hand-off between them while one waits.
    let g = a.lock("dead-first").expect("lock");
    std::thread::scope(|s| {
        let w = s.spawn(|| b.lock("dead-first").map(|g| g.token().0));
        wait_until("b to queue", || queue_len(&a, "dead-first") == (1, 1));
        let held = g.token().0;
        g.unlock().expect("unlock");
        assert!(w.join().unwrap().expect("b granted") > held);
    });
    assert_eq!(queue_len(&a, "dead-first"), (0, 0));
    // All endpoints dead: connect fails with an error that names them, and does not hang.
    etcd.kill(1);
    etcd.kill(2);
    let t0 = Instant::now();
    let r = EtcdClient::connect(urls.iter(), opts(10, "none"));
    assert!(r.is_err(), "connected to a dead cluster");
    assert!(
        t0.elapsed() < Duration::from_secs(30),
        "connect took {:?}",
        t0.elapsed()
    );
}

/// A holder that unlocks and exits at once (its client's drop revokes its lease) unlocked
/// cleanly: the next holder must not be told that the previous owner died.
#[test]
fn a_clean_unlock_then_exit_is_no_owner_death() {
    let env = TestEnv::new("etcdc-unlock-exit");
    let etcd = EtcdCluster::start(&env.dir, 3);
    let endpoints = etcd.endpoints();
    let next = connect(&endpoints, 10, "next");
    let mut died = Vec::new();
    for round in 0..5 {
        let _ = std::fs::remove_file(env.path("held"));
        let _ = std::fs::remove_file(env.path("release"));
        let name = format!("exit/{round}");
        let child = env.spawn("unlock_and_exit", &[("endpoints", &endpoints), ("name", &name)]);
        wait_until("the child to hold", || env.path("held").exists());
        std::thread::scope(|s| {
            let w = s.spawn(|| next.lock(&name).map(|g| g.owner_died()));
            wait_until("next to queue", || queue_len(&next, &name) == (1, 1));
            common::signal(&env.path("release"), "");
            died.push(w.join().unwrap().expect("granted"));
        });
        env.wait_success(child);
    }
    assert!(
        died.iter().all(|d| !d),
        "owner-died after clean unlocks whose client then exited, by round: {died:?}"
    );
}
