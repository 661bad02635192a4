//! Gateway abuse, against real `shmlockd` processes: a client that never reads its answers, a
//! SIGTERM while one is connected, a flood of connections that never authenticate, a slowloris
//! client, a busy listen port, and `LOCKS` paging while the table changes. Each daemon serves
//! the test's own segment on a free loopback port (read back from its log), with small timeouts
//! so the suite stays fast; a well-behaved client checks that service goes on.

mod common;

use std::io::{BufRead, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{wait_until, GatewayDaemon, Raw, TestEnv, DEADLINE};
use shmlock::remote::{ConnectOptions, RemoteClient};
use shmlock::table::Cursor;
use shmlock::Segment;

/// Whether `name` is held in the segment (read through the test's own mapping).
fn held(env: &TestEnv, name: &str) -> bool {
    env.table
        .lock_info(name.as_bytes())
        .expect("name")
        .is_some_and(|l| !l.holders.is_empty())
}

/// A client that locks `name`, then pipelines PINGs without ever reading an answer, until
/// `stop`; `stuck` counts its writes that timed out (the gateway stopped reading it).
fn never_reader(addr: &str, name: &str, stop: Arc<AtomicBool>, stuck: Arc<AtomicU64>) -> std::thread::JoinHandle<()> {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_write_timeout(Some(Duration::from_millis(200))).unwrap();
    s.write_all(format!("l LOCK {name}\n").as_bytes()).expect("send LOCK");
    let pings = "p PING\n".repeat(4096);
    std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            match s.write(pings.as_bytes()) {
                Ok(_) => {}
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                    stuck.fetch_add(1, Ordering::Relaxed);
                }
                // Closed by the gateway.
                Err(_) => return,
            }
        }
    })
}

/// A well-behaved remote client: locks and unlocks `name`, `n` times.
fn served(addr: &str, name: &str, n: usize) {
    let c = RemoteClient::connect(addr).expect("connect");
    for _ in 0..n {
        c.lock(name).expect("lock").unlock().expect("unlock");
    }
}

#[test]
fn a_client_that_never_reads_loses_its_lock_at_the_idle_timeout_and_others_are_served() {
    let env = TestEnv::new("abuse-noread");
    let d = GatewayDaemon::start(&env, Some("[gateway]\nidle_timeout = \"1s\"\n"));
    let (stop, stuck) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicU64::new(0)));
    let attacker = never_reader(&d.addr, "victim", stop.clone(), stuck.clone());
    wait_until("the never-reading client's lock", || held(&env, "victim"));
    served(&d.addr, "other", 50);
    // Its answers fill the socket buffers, the gateway stops reading it, and the idle timeout
    // (counted from the last byte read) ends it although it keeps sending.
    wait_until("the gateway to stop reading the client", || {
        stuck.load(Ordering::Relaxed) > 0
    });
    let t0 = Instant::now();
    wait_until("the never-reading client's lock to be released", || {
        !held(&env, "victim")
    });
    eprintln!("victim released {:?} after the client was first stuck", t0.elapsed());
    served(&d.addr, "victim", 20);
    stop.store(true, Ordering::Relaxed);
    attacker.join().unwrap();
}

#[test]
fn sigterm_stops_shmlockd_while_a_client_never_reads() {
    let env = TestEnv::new("abuse-stop");
    // A long idle timeout: only the shutdown may end the session.
    let mut d = GatewayDaemon::start(&env, Some("[gateway]\nidle_timeout = \"60s\"\n"));
    let (stop, stuck) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicU64::new(0)));
    let attacker = never_reader(&d.addr, "victim", stop.clone(), stuck.clone());
    wait_until("the never-reading client's lock", || held(&env, "victim"));
    wait_until("the gateway to stop reading the client", || {
        stuck.load(Ordering::Relaxed) > 2
    });
    let (took, status) = d.terminate();
    eprintln!(
        "shmlockd exited {took:?} after SIGTERM (bound: {:?})",
        shmlock::gateway::STOP_BOUND
    );
    assert!(status.success(), "{status}\n{}", d.log());
    assert!(!held(&env, "victim"), "the session's lock survived the shutdown");
    stop.store(true, Ordering::Relaxed);
    attacker.join().unwrap();
}

#[test]
fn unauthenticated_connections_take_no_slot_no_owner_and_not_for_long() {
    let env = TestEnv::new("abuse-auth");
    let d = GatewayDaemon::start(
        &env,
        Some(
            "[gateway]\nauth_token = \"s3cret\"\nmax_connections = 4\nmax_unauthenticated = 8\nauth_timeout = \"1s\"\n",
        ),
    );
    // A flood far beyond both limits: every one is greeted (the oldest are closed to make room).
    let mut flood: Vec<Raw> = (0..40).map(|_| Raw::connect_bare(&d.addr)).collect();
    for r in &mut flood {
        assert!(r.line().starts_with("* HELLO shmlock 1 auth=required"));
    }
    assert_eq!(
        env.table.stats().owners,
        0,
        "connections that did not authenticate took owner records"
    );
    // The client with the secret still gets in, and is served.
    let opts = ConnectOptions {
        auth_token: Some("s3cret".into()),
        ..Default::default()
    };
    let good = RemoteClient::connect_with(d.addr.as_str(), &opts).expect("a client with the secret");
    let x = good.lock("x").expect("lock");
    let listed = good.locks(None).expect("LOCKS pages through RemoteClient");
    assert_eq!(
        listed.iter().map(|l| l.name.as_slice()).collect::<Vec<_>>(),
        [&b"x"[..]]
    );
    x.unlock().expect("unlock");
    assert_eq!(env.table.stats().owners, 1);
    // Admin queries too wait for AUTH.
    let unauth = RemoteClient::connect(d.addr.as_str()).expect("connect");
    match unauth.locks_page(None, None, 10) {
        Err(shmlock::Error::Remote { code, .. }) => assert_eq!(code, shmlock::proto::ErrorCode::AuthRequired),
        other => panic!("{other:?}"),
    }
    drop(unauth);
    // PING before AUTH is served but does not keep a connection: it goes at auth_timeout.
    let mut pinger = Raw::connect_bare(&d.addr);
    assert!(pinger.line().starts_with("* HELLO"));
    let t0 = Instant::now();
    let closed = loop {
        assert!(t0.elapsed() < DEADLINE, "a connection PINGing without AUTH stayed open");
        let _ = pinger.w.write_all(b"p PING\n");
        let l = pinger.line();
        if l != "p PONG" {
            break l;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(closed.starts_with("* ERR AUTH_TIMEOUT"), "{closed}");
    // The flood is gone too (closed as the oldest, or by the deadline).
    for r in &mut flood {
        loop {
            let l = r.line();
            if l.is_empty() {
                break;
            }
            assert!(l.contains("AUTH_TIMEOUT"), "{l}");
        }
    }
    good.ping().expect("the authenticated client is still served");
}

#[test]
fn a_slowloris_line_is_closed_by_the_line_deadline() {
    let env = TestEnv::new("abuse-slow");
    let d = GatewayDaemon::start(&env, Some("[gateway]\nidle_timeout = \"2s\"\nline_timeout = \"1s\"\n"));
    let mut slow = Raw::connect_bare(&d.addr);
    assert!(slow.line().starts_with("* HELLO"));
    slow.w.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
    // A byte every 300 ms: the idle timer never fires, the line never ends.
    let t0 = Instant::now();
    let mut got = String::new();
    for b in b"1 PING ".iter().cycle() {
        assert!(t0.elapsed() < DEADLINE, "a slowloris connection stayed open");
        if slow.w.write_all(&[*b]).is_err() {
            break;
        }
        match slow.r.read_line(&mut got) {
            Ok(_) if !got.is_empty() => break,
            Ok(_) => break, // EOF
            Err(_) => {}    // the read timed out: nothing yet
        }
    }
    assert!(got.starts_with("* ERR LINE_TIMEOUT"), "{got:?}");
    served(&d.addr, "x", 5);
}

#[test]
fn a_busy_listen_port_fails_before_the_segment_is_made() {
    let env = TestEnv::new("abuse-port");
    let busy = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = busy.local_addr().unwrap().to_string();
    let seg = format!("{}-new", env.segment);
    let _ = Segment::unlink(&seg);
    let out = Command::new(env!("CARGO_BIN_EXE_shmlockd"))
        .args(["--segment", &seg, "--listen", &addr, "--log-level", "warn"])
        .env_remove("SHMLOCK_SEGMENT")
        .stdin(Stdio::null())
        .output()
        .expect("run shmlockd");
    let made = std::path::Path::new("/dev/shm").join(&seg[1..]).exists();
    let _ = Segment::unlink(&seg);
    assert!(!out.status.success(), "shmlockd started on a busy port");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(&addr),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!made, "shmlockd created {seg} before it found its port busy");
    drop(busy);
}

#[test]
fn locks_pages_list_every_lock_held_throughout_exactly_once_while_others_churn() {
    let env = TestEnv::with_caps(
        "abuse-pages",
        &shmlock::Capacities {
            max_locks: 4096,
            max_holds: 1024,
            max_owners: 32,
            ..Default::default()
        },
    );
    let d = GatewayDaemon::start(&env, Some("[gateway]\n"));
    let keeper = env.client("keeper");
    let keep: Vec<_> = (0..500)
        .map(|i| keeper.lock(format!("keep/{i}")).expect("lock"))
        .collect();
    let stop = Arc::new(AtomicBool::new(false));
    let churn = {
        let (stop, client) = (stop.clone(), env.client("churn"));
        std::thread::spawn(move || {
            let mut held = std::collections::VecDeque::new();
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                held.push_back(client.lock(format!("churn/{i}")).expect("churn lock"));
                i += 1;
                if held.len() > 200 {
                    held.pop_front();
                }
            }
        })
    };
    let mut raw = Raw::connect_bare(&d.addr);
    assert!(raw.line().starts_with("* HELLO"));
    let mut seen = std::collections::HashMap::<String, u32>::new();
    let mut after: Option<Cursor> = None;
    let mut pages = 0;
    loop {
        pages += 1;
        assert!(pages < 100_000, "the walk did not end");
        let req = match after {
            Some(c) => format!("q LOCKS LIMIT 7 AFTER {c}\n"),
            None => "q LOCKS LIMIT 7\n".to_string(),
        };
        raw.send(&req);
        let mut n = 0;
        let next = loop {
            let l = raw.line();
            let w: Vec<&str> = l.split(' ').collect();
            assert_eq!(w[0], "q", "{l}");
            match w[1] {
                "LOCK" => {
                    n += 1;
                    *seen.entry(w[2].to_string()).or_default() += 1;
                }
                "HOLDER" | "WAITER" => {}
                "END" => {
                    assert_eq!(w[2].parse::<usize>().unwrap(), n, "{l}");
                    break match w[3] {
                        "DONE" => None,
                        "MORE" => Some(Cursor::parse(w[4].as_bytes()).unwrap_or_else(|| panic!("bad cursor: {l}"))),
                        _ => panic!("{l}"),
                    };
                }
                _ => panic!("{l}"),
            }
        };
        assert!(n <= 7);
        match next {
            None => break,
            Some(c) => {
                assert!(after.is_none_or(|a| c > a), "the cursor went back: {c} after {after:?}");
                after = Some(c);
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    churn.join().unwrap();
    for i in 0..500 {
        assert_eq!(seen.get(&format!("keep/{i}")), Some(&1), "keep/{i}");
    }
    assert!(seen.values().all(|&n| n == 1), "a lock came twice");
    // RemoteClient pages the same way: small pages, then the whole walk, with a prefix.
    let remote = RemoteClient::connect(d.addr.as_str()).expect("connect");
    let p = remote.locks_page(Some(b"keep/"), None, 3).expect("a page");
    assert!(p.locks.len() <= 3 && p.next.is_some(), "{p:?}");
    let mut names: Vec<Vec<u8>> = remote
        .locks(Some(b"keep/"))
        .expect("walk")
        .into_iter()
        .map(|l| l.name)
        .collect();
    names.sort();
    let mut want: Vec<Vec<u8>> = (0..500).map(|i| format!("keep/{i}").into_bytes()).collect();
    want.sort();
    assert_eq!(names, want);
    drop(remote);
    // LIMIT 1: one lock, and the cursor of the next page is that lock's own slot.
    let l = raw.ask("o LOCKS LIMIT 1");
    assert!(l.starts_with("o LOCK keep/"), "{l}");
    let shard: u32 = l.split(' ').nth(6).unwrap().parse().unwrap();
    let end = loop {
        let l = raw.line();
        if l.starts_with("o END") {
            break l;
        }
    };
    let c = Cursor::parse(end.rsplit(' ').next().unwrap().as_bytes()).expect(&end);
    assert!(end.starts_with("o END 1 MORE "), "{end}");
    assert_eq!(c.shard, shard, "{end}");
    drop(keep);
}
