//! Model-based tests of the table: random operations against a HashMap reference, with `check()`
//! after every step.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use proptest::prelude::*;

use crate::client::{Client, LockGuard};
use crate::config::Capacities;
use crate::error::Error;
use crate::table::{LockTable, Mode};

#[derive(Debug, Clone)]
enum Op {
    Lock { client: usize, name: u8, shared: bool },
    Unlock { client: usize, name: u8 },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0usize..3, 0u8..6, any::<bool>()).prop_map(|(client, name, shared)| Op::Lock { client, name, shared }),
        (0usize..3, 0u8..6).prop_map(|(client, name)| Op::Unlock { client, name }),
    ]
}

#[derive(Debug, Default, Clone)]
enum Held {
    #[default]
    Free,
    Excl(usize),
    Shared(HashSet<usize>),
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]
    #[test]
    fn table_matches_model(ops in proptest::collection::vec(op(), 1..120)) {
        let (max_locks, max_holds) = (4usize, 3usize);
        let caps = Capacities { max_locks: max_locks as u32, max_holds: max_holds as u32, max_owners: 4, shards: 1, ..Default::default() };
        let table = Arc::new(LockTable::anonymous(&caps).unwrap());
        let clients: Vec<Client> = (0..3).map(|i| Client::with_table(table.clone(), &format!("c{i}")).unwrap()).collect();
        let mut guards: HashMap<(usize, u8), LockGuard<'_>> = HashMap::new();
        let mut model: HashMap<u8, Held> = HashMap::new();
        let mut last_token: HashMap<u8, u64> = HashMap::new();
        for op in ops {
            match op {
                Op::Lock { client, name, shared } => {
                    let held_names = model.values().filter(|h| !matches!(h, Held::Free)).count();
                    let shared_holds: usize = model.values().map(|h| if let Held::Shared(s) = h { s.len() } else { 0 }).sum();
                    let cur = model.get(&name).cloned().unwrap_or_default();
                    let key = [b'n', name];
                    let r = if shared { clients[client].try_lock_shared(key) } else { clients[client].try_lock(key) };
                    let expect: Result<(), &str> = match (&cur, shared) {
                        (Held::Excl(o), _) if *o == client => Err("AlreadyHeld"),
                        (Held::Shared(s), _) if s.contains(&client) => Err("AlreadyHeld"),
                        (Held::Free, _) if held_names == max_locks => Err("PoolFull"),
                        (Held::Free, true) | (Held::Shared(_), true) if shared_holds == max_holds => Err("PoolFull"),
                        (Held::Free, _) => Ok(()),
                        (Held::Shared(_), true) => Ok(()),
                        _ => Err("WouldBlock"),
                    };
                    match (r, expect) {
                        (Ok(g), Ok(())) => {
                            let t = g.token().0;
                            prop_assert!(t > last_token.get(&name).copied().unwrap_or(0), "token must increase");
                            last_token.insert(name, t);
                            prop_assert_eq!(g.mode(), if shared { Mode::Shared } else { Mode::Exclusive });
                            guards.insert((client, name), g);
                            let h = model.entry(name).or_default();
                            match h {
                                Held::Shared(s) => { s.insert(client); }
                                _ => *h = if shared { Held::Shared([client].into()) } else { Held::Excl(client) },
                            }
                        }
                        (Err(e), Err(want)) => {
                            let got = match e { Error::AlreadyHeld => "AlreadyHeld", Error::PoolFull { .. } => "PoolFull", Error::WouldBlock => "WouldBlock", _ => "other" };
                            prop_assert_eq!(got, want, "{}", e);
                        }
                        (r, want) => prop_assert!(false, "got {:?}, model says {:?}", r.map(|g| g.token()), want),
                    }
                }
                Op::Unlock { client, name } => {
                    let r = guards.remove(&(client, name)).map(|g| g.unlock());
                    let h = model.entry(name).or_default();
                    match (r, &mut *h) {
                        (None, _) => prop_assert!(matches!(clients[client].unlock([b'n', name]), Err(Error::NotHeld))),
                        (Some(r), Held::Excl(o)) if *o == client => { prop_assert!(r.is_ok()); *h = Held::Free; }
                        (Some(r), Held::Shared(s)) if s.contains(&client) => {
                            prop_assert!(r.is_ok());
                            s.remove(&client);
                            if s.is_empty() { *h = Held::Free; }
                        }
                        (Some(_), m) => prop_assert!(false, "guard for a lock the model says is {:?}", m),
                    }
                }
            }
            let problems = table.check();
            prop_assert!(problems.is_empty(), "{:?}", problems);
            let st = table.stats();
            prop_assert_eq!(st.held as usize, model.values().filter(|h| !matches!(h, Held::Free)).count());
        }
        drop(guards);
        prop_assert_eq!(table.stats().held, 0);
        prop_assert!(table.check().is_empty());
    }
}

#[test]
fn forgotten_guards_are_released_when_the_client_drops() {
    let caps = Capacities {
        max_locks: 64,
        max_holds: 64,
        max_owners: 4,
        ..Default::default()
    };
    let table = Arc::new(LockTable::anonymous(&caps).unwrap());
    let other = Client::with_table(table.clone(), "other").unwrap();
    {
        let c = Client::with_table(table.clone(), "leaky").unwrap();
        std::mem::forget(c.lock("x").unwrap());
        std::mem::forget(c.lock_shared("y").unwrap());
        assert!(matches!(other.try_lock("x"), Err(Error::WouldBlock)));
    }
    assert!(other.try_lock("x").is_ok());
    assert!(other.try_lock("y").is_ok());
    assert_eq!(table.stats().owners, 1);
    assert!(table.check().is_empty());
}

#[test]
fn releasing_an_owner_cancels_its_blocked_requests() {
    let caps = Capacities {
        max_locks: 64,
        max_holds: 64,
        max_owners: 4,
        ..Default::default()
    };
    let table = Arc::new(LockTable::anonymous(&caps).unwrap());
    let holder = Client::with_table(table.clone(), "holder").unwrap();
    let _g = holder.lock("x").unwrap();
    let waiter = table.register(crate::owner::OwnerKind::Remote, b"session").unwrap();
    let shards = table.geometry().shards;
    std::thread::scope(|s| {
        let blocked: Vec<_> = [Mode::Exclusive, Mode::Shared]
            .into_iter()
            .map(|mode| {
                let t = &table;
                s.spawn(move || t.acquire(waiter, b"x", mode, super::Wait::Forever))
            })
            .collect();
        while table.stats().waiting < 2 {
            std::thread::yield_now();
        }
        assert_eq!(table.release_all(waiter, 0..shards).unwrap(), 2);
        for t in blocked {
            assert!(matches!(t.join().unwrap(), Err(Error::Cancelled)));
        }
    });
    assert_eq!(table.stats().waiting, 0);
    assert!(table.check().is_empty());
    table.deregister(waiter).unwrap();
}
