//! Model-based tests of the table: random operations against a HashMap reference, with `check()`
//! after every step.

use crate::table::never;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use proptest::prelude::*;

use crate::client::{Client, LockGuard};
use crate::config::Capacities;
use crate::error::Error;
use crate::table::{LockTable, Mode, NIL};

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

/// A lock seen from outside: name, mode, exclusive owner, shared owners, token.
type LockView = (Vec<u8>, u32, u32, Vec<u32>, u64);

/// Every indexed lock, sorted by name.
fn snapshot(table: &LockTable) -> Vec<LockView> {
    let sh = table.shard(0);
    let mut out: Vec<_> = sh
        .epool()
        .iter(super::EntryState::Held)
        .chain(sh.epool().iter(super::EntryState::Idle))
        .chain(sh.epool().iter(super::EntryState::Died))
        .map(|(i, _)| {
            let e = &sh.entries()[i.get()];
            let mut readers: Vec<u32> = LockTable::readers(&sh, e).map(|(_, h)| h.owner.load(Relaxed)).collect();
            readers.sort_unstable();
            // A fast hold is named by the lock word, a latched one by mode and owner.
            let fast = crate::table::lw_val(e.lw.load(Relaxed)) & crate::table::FAST_OWNER;
            let (mode, owner) = if fast != 0 {
                (Mode::Exclusive.to_u32(), fast - 1)
            } else {
                (e.mode.load(Relaxed), e.owner.load(Relaxed))
            };
            (sh.name_of(i.0), mode, owner, readers, e.last_token())
        })
        .collect();
    out.sort();
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]
    /// Repair rebuilds every derived structure of a shard from its records, exactly: scramble all
    /// of them (as a process killed half way through an update might leave them), repair, and the
    /// locks, holders and tokens are what they were, and `check` finds nothing.
    #[test]
    fn repair_rebuilds_derived_state_exactly(ops in proptest::collection::vec(op(), 1..80), junk in any::<u32>()) {
        let caps = Capacities { max_locks: 8, max_holds: 8, max_owners: 4, shards: 1, ..Default::default() };
        let table = Arc::new(LockTable::anonymous(&caps).unwrap());
        let clients: Vec<Client> = (0..3).map(|i| Client::with_table(table.clone(), &format!("c{i}")).unwrap()).collect();
        let mut guards: HashMap<(usize, u8), LockGuard<'_>> = HashMap::new();
        for op in ops {
            match op {
                Op::Lock { client, name, shared } => {
                    let key = [b'n', name];
                    let r = if shared { clients[client].try_lock_shared(key) } else { clients[client].try_lock(key) };
                    if let Ok(g) = r {
                        guards.insert((client, name), g);
                    }
                }
                Op::Unlock { client, name } => {
                    guards.remove(&(client, name));
                }
            }
        }
        let before = snapshot(&table);
        let sh = table.shard(0);
        for b in sh.buckets() {
            b.store((junk % 7) as u16, Relaxed);
        }
        for l in sh.hdr.entry_lists.iter().chain(sh.hdr.hold_lists.iter()) {
            l.head.store(junk % 5, Relaxed);
            l.tail.store(NIL, Relaxed);
            l.count.store(junk, Relaxed);
        }
        for e in sh.entries() {
            for w in [&e.next, &e.reader_head, &e.wait_head, &e.wait_tail] {
                w.store(junk % 9, Relaxed);
            }
            e.readers.store(junk % 3, Relaxed);
            e.waiters.store(junk % 4, Relaxed);
        }
        for h in sh.holds() {
            h.next.store(junk % 6, Relaxed);
            h.prev.store(NIL, Relaxed);
        }
        {
            let _g = table.lock_shard(&sh, crate::table::pid_latch_id());
            table.repair(&sh).unwrap();
        }
        let problems = table.check();
        prop_assert!(problems.is_empty(), "{:?}", problems);
        prop_assert_eq!(snapshot(&table), before);
        drop(guards);
        prop_assert_eq!(table.stats().held, 0);
        prop_assert!(table.check().is_empty());
    }
}

/// One shard of 4 entries, 4 holds and 4 owners: capacities are exact, every record in view.
fn tiny_caps() -> Capacities {
    Capacities {
        max_locks: 4,
        max_holds: 4,
        max_owners: 4,
        shards: 1,
        ..Default::default()
    }
}

#[test]
fn an_owner_died_notice_survives_idle_entry_eviction() {
    let caps = tiny_caps();
    let table = Arc::new(LockTable::anonymous(&caps).unwrap());
    let dead = table.register(crate::owner::OwnerKind::Local, b"dead").unwrap();
    let g = table.acquire(dead, b"x", Mode::Exclusive, super::Wait::No).unwrap();
    // What a reaper does for an owner whose process died.
    assert_eq!(
        table
            .release_owner(crate::table::pid_latch_id(), dead.idx, 0..1, true)
            .unwrap(),
        1
    );
    assert_eq!(table.stats().died, 1);
    let c = Client::with_table(table.clone(), "next").unwrap();
    // Churn through many more names than the table has entries: idle entries are evicted, the
    // one carrying the notice is not.
    for i in 0..100 {
        drop(c.lock(format!("other-{i}")).unwrap());
    }
    let again = c.lock("x").unwrap();
    assert!(again.owner_died(), "the notice must survive eviction of idle entries");
    assert!(again.token().0 > g.token);
    drop(again);
    assert!(!c.lock("x").unwrap().owner_died(), "the notice is given once");
    assert!(table.check().is_empty());
}

/// A releaser killed inside a handoff, after the grant was recorded but before the grantee's
/// futex said so: the grantee must still get the lock (from the waiting loop, and after repair),
/// never time out on a lock that is its own.
#[test]
fn a_handoff_cut_short_before_the_wake_is_still_a_grant() {
    use super::{HoldState, Idx, Wait, GRANTED, WAIT};
    let caps = tiny_caps();
    for repair in [false, true] {
        let table = Arc::new(LockTable::anonymous(&caps).unwrap());
        let (a, b) = (
            table.register(crate::owner::OwnerKind::Local, b"a").unwrap(),
            table.register(crate::owner::OwnerKind::Local, b"b").unwrap(),
        );
        let held = table.acquire(a, b"x", Mode::Exclusive, Wait::No).unwrap();
        let sh = table.shard(0);
        let (i, w) = {
            let _l = table.lock_shard(&sh, crate::table::pid_latch_id());
            let i = table.lookup(&sh, crate::name::hash(table.seed, b"x"), b"x").unwrap();
            sh.pin(i).unwrap();
            let w = table.enqueue(&sh, i, Mode::Exclusive, b).unwrap();
            // What `release` of a's grant does, up to the grantee's futex store.
            sh.entry(i).unwrap().mode.store(crate::table::MODE_NONE, Relaxed);
            sh.entry(i).unwrap().owner.store(NIL, Relaxed);
            table.hand_off(&sh, i).unwrap();
            sh.holds()[w.0 as usize].futex.store(WAIT, Relaxed);
            if repair {
                table.repair(&sh).unwrap();
                assert_eq!(sh.holds()[w.0 as usize].futex.load(Relaxed), GRANTED);
            }
            (i, w)
        };
        assert_eq!(sh.hpool().state(Idx(w.0)).unwrap(), HoldState::Granted);
        let deadline = crate::clock::now().plus(std::time::Duration::from_millis(1));
        let g = table
            .wait_for_grant(&sh, i, w, b, Mode::Exclusive, Wait::Until(deadline), &mut never)
            .expect("the handed-off lock is b's");
        assert!(g.token > held.token);
        table.release(b, &g).unwrap();
        assert!(matches!(table.release(a, &held), Err(Error::NotHeld)));
        assert!(table.check().is_empty(), "{:?}", table.check());
    }
}

/// A one-shard table where owner `a` holds "x" and owner `b` waits for it (queued as a blocked
/// `lock` is before it sleeps); `c` is a third owner. With `fresh`, b's request is stamped an
/// hour ahead, so it cannot count as starving however slowly the test runs.
struct Queued {
    table: Arc<LockTable>,
    owners: [super::OwnerRef; 3],
    held: super::RawGrant,
    entry: u32,
    wait: (u32, u32),
}

fn queued_behind_a_hold(fresh: bool) -> Queued {
    use super::{Idx, Wait};
    let caps = tiny_caps();
    let table = Arc::new(LockTable::anonymous(&caps).unwrap());
    let reg = |label: &[u8]| table.register(crate::owner::OwnerKind::Local, label).unwrap();
    let owners = [reg(b"a"), reg(b"b"), reg(b"c")];
    let held = table.acquire(owners[0], b"x", Mode::Exclusive, Wait::No).unwrap();
    let (entry, wait) = {
        let sh = table.shard(0);
        let _l = table.lock_shard(&sh, crate::table::pid_latch_id());
        let i = table.lookup(&sh, crate::name::hash(table.seed, b"x"), b"x").unwrap();
        sh.pin(i).unwrap();
        let w = table.enqueue(&sh, i, Mode::Exclusive, owners[1]).unwrap();
        if fresh {
            let later = crate::clock::now().plus(std::time::Duration::from_secs(3600));
            sh.hpool().touch(Idx(w.0), later).unwrap();
        }
        sh.publish(i);
        (i, w)
    };
    Queued {
        table,
        owners,
        held,
        entry,
        wait,
    }
}

#[test]
fn while_the_head_waiter_is_woken_the_lock_is_open_to_fast_cas() {
    use super::{lw_val, HoldState, Idx, Wait, FAST_OWNER, SLOW, WAIT, WOKEN};
    use std::time::Duration;
    let q = queued_behind_a_hold(true);
    let (table, [a, b, c], held, i, w) = (&q.table, q.owners, q.held, q.entry, q.wait);
    let sh = table.shard(0);
    let e = sh.entry(i).unwrap();
    let hold = &sh.holds()[w.0 as usize];
    assert_ne!(lw_val(e.lw.load(Relaxed)) & SLOW, 0, "closed while its waiter sleeps");

    // a's release wakes b and opens the word: c takes the lock with one CAS meanwhile.
    table.release(a, &held).unwrap();
    assert_eq!(hold.futex.load(Relaxed), WOKEN);
    assert_eq!(
        lw_val(e.lw.load(Relaxed)),
        0,
        "open while the woken waiter is on its way"
    );
    assert!(table.check().is_empty(), "{:?}", table.check());
    let by_c = table.acquire(c, b"x", Mode::Exclusive, Wait::No).unwrap();
    assert_eq!(lw_val(e.lw.load(Relaxed)) & FAST_OWNER, c.idx + 1, "a fast hold");
    assert!(by_c.token > held.token);
    assert!(table.check().is_empty(), "{:?}", table.check());

    // b comes, finds c holding it, and sleeps again: the word closes, so c's release is latched
    // and wakes b, which then takes the lock.
    {
        let _l = table.lock_shard(&sh, crate::table::pid_latch_id());
        sh.pin(i).unwrap();
        assert_eq!(e.mode.load(Relaxed), Mode::Exclusive.to_u32());
        hold.futex.store(WAIT, Relaxed);
        sh.publish(i);
    }
    assert_ne!(lw_val(e.lw.load(Relaxed)) & SLOW, 0);
    assert!(table.check().is_empty(), "{:?}", table.check());
    table.release(c, &by_c).unwrap();
    assert_eq!(hold.futex.load(Relaxed), WOKEN);
    let deadline = crate::clock::now().plus(Duration::from_secs(5));
    let by_b = table
        .wait_for_grant(&sh, i, w, b, Mode::Exclusive, Wait::Until(deadline), &mut never)
        .expect("the woken waiter takes the free lock");
    assert!(by_b.token > by_c.token);
    assert_eq!(sh.hpool().state(Idx(w.0)).unwrap(), HoldState::Free);
    table.release(b, &by_b).unwrap();
    assert!(table.check().is_empty(), "{:?}", table.check());
    assert_eq!(table.stats().held, 0);
}

#[test]
fn a_starving_head_waiter_keeps_the_lock_closed_and_gets_it_handed_over() {
    use super::{lw_val, HoldState, Idx, Wait, GRANTED, SLOW};
    use std::time::Duration;
    let q = queued_behind_a_hold(false);
    let (table, [a, b, _], held, i, w) = (&q.table, q.owners, q.held, q.entry, q.wait);
    let sh = table.shard(0);
    // b has waited past FAIR_AFTER: a's release hands the lock to it, and the word stays shut.
    std::thread::sleep(super::FAIR_AFTER + Duration::from_millis(1));
    table.release(a, &held).unwrap();
    let e = sh.entry(i).unwrap();
    assert_eq!(sh.holds()[w.0 as usize].futex.load(Relaxed), GRANTED);
    assert_eq!(sh.hpool().state(Idx(w.0)).unwrap(), HoldState::Granted);
    assert_ne!(lw_val(e.lw.load(Relaxed)) & SLOW, 0);
    assert!(matches!(
        table.acquire(a, b"x", Mode::Exclusive, Wait::No),
        Err(Error::WouldBlock)
    ));
    let deadline = crate::clock::now().plus(Duration::from_secs(5));
    let g = table
        .wait_for_grant(&sh, i, w, b, Mode::Exclusive, Wait::Until(deadline), &mut never)
        .unwrap();
    table.release(b, &g).unwrap();
    assert!(table.check().is_empty(), "{:?}", table.check());
}

#[test]
fn a_woken_waiter_that_finds_the_lock_taken_waits_on_and_times_out_cleanly() {
    use super::{lw_val, Wait, SLOW, WOKEN};
    use std::time::Duration;
    let q = queued_behind_a_hold(true);
    let (table, [a, b, c], held, i, w) = (&q.table, q.owners, q.held, q.entry, q.wait);
    let sh = table.shard(0);
    table.release(a, &held).unwrap();
    let by_c = table.acquire(c, b"x", Mode::Exclusive, Wait::No).unwrap();
    let hold = &sh.holds()[w.0 as usize];
    assert_eq!(hold.futex.load(Relaxed), WOKEN);
    // b comes while c holds the lock and never lets go: b watches it, looks again, goes back to
    // waiting (closing the word, so that c's release would wake it) and gives up at its deadline.
    let deadline = crate::clock::now().plus(Duration::from_millis(20));
    let r = table.wait_for_grant(&sh, i, w, b, Mode::Exclusive, Wait::Until(deadline), &mut never);
    match r {
        Err(Error::TimedOut { holder, .. }) => assert_eq!(holder.map(|h| h.holders), Some(1)),
        other => panic!("{other:?}"),
    }
    let e = sh.entry(i).unwrap();
    assert_eq!(table.stats().waiting, 0);
    assert!(table.check().is_empty(), "{:?}", table.check());
    table.release(c, &by_c).unwrap();
    assert_eq!(
        lw_val(e.lw.load(Relaxed)) & SLOW,
        0,
        "free and nobody waits: open again"
    );
    assert!(table.check().is_empty(), "{:?}", table.check());
}

/// Ending an owner with a handed-off grant it never collected releases that grant and drops the
/// request, touching the entry twice; the second look must not reopen a word that the first
/// already opened and a fast CAS took meanwhile, or two owners would hold the lock. The fast
/// lockers are threads of this process with owners of their own: what races is two CPUs' atomics
/// on the same word, the same between threads as between processes.
#[test]
fn ending_an_owner_with_an_uncollected_handoff_never_wipes_a_fast_hold() {
    use super::{Idx, Wait};
    use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64};
    use std::time::Duration;
    let table = Arc::new(LockTable::anonymous(&tiny_caps()).unwrap());
    let reg = |label: &[u8]| table.register(crate::owner::OwnerKind::Local, label).unwrap();
    let (b, c, d, e) = (reg(b"b"), reg(b"c"), reg(b"d"), reg(b"e"));
    let g = table.acquire(c, b"x", Mode::Exclusive, Wait::No).unwrap();
    table.release(c, &g).unwrap();
    let stop = AtomicBool::new(false);
    let (inside, overlaps, lost) = (AtomicU32::new(0), AtomicU64::new(0), AtomicU64::new(0));
    std::thread::scope(|s| {
        for me in [c, d] {
            let (t, stop, inside, overlaps, lost) = (&table, &stop, &inside, &overlaps, &lost);
            s.spawn(move || {
                while !stop.load(Relaxed) {
                    if let Ok(g) = t.acquire(me, b"x", Mode::Exclusive, Wait::No) {
                        if inside.fetch_add(1, Relaxed) != 0 {
                            overlaps.fetch_add(1, Relaxed);
                        }
                        for _ in 0..20 {
                            std::hint::spin_loop();
                        }
                        inside.fetch_sub(1, Relaxed);
                        if t.release(me, &g).is_err() {
                            lost.fetch_add(1, Relaxed);
                        }
                    }
                }
            });
        }
        let sh = table.shard(0);
        let h = crate::name::hash(table.seed, b"x");
        let until = crate::clock::now().plus(Duration::from_secs(2));
        let mut rounds = 0;
        while rounds < 50_000 && crate::clock::now() < until && overlaps.load(Relaxed) + lost.load(Relaxed) == 0 {
            {
                let _l = table.lock_shard(&sh, crate::table::pid_latch_id());
                let i = table.lookup(&sh, h, b"x").unwrap();
                sh.pin(i).unwrap();
                if sh.entry(i).unwrap().mode.load(Relaxed) != crate::table::MODE_NONE {
                    sh.publish(i);
                    continue; // a locker holds it: try again
                }
                // b gets x handed over and does not collect it; e waits behind, not starving.
                table.enqueue(&sh, i, Mode::Exclusive, b).unwrap();
                let w = table.enqueue(&sh, i, Mode::Exclusive, e).unwrap();
                let later = crate::clock::now().plus(Duration::from_secs(3600));
                sh.hpool().touch(Idx(w.0), later).unwrap();
                assert!(table.hand_off(&sh, i).unwrap().is_some());
                sh.publish(i);
            }
            rounds += 1;
            table.release_all(b, 0..1).unwrap();
            table.release_all(e, 0..1).unwrap();
        }
        stop.store(true, Relaxed);
    });
    assert_eq!(overlaps.load(Relaxed), 0, "two owners held x at once");
    assert_eq!(lost.load(Relaxed), 0, "a fast hold was wiped");
    assert!(table.check().is_empty(), "{:?}", table.check());
}

/// A fast grant's token is fixed by its CAS: a forced release that pins the word right after
/// the CAS (before the holder has run one more instruction) leaves the forced-out holder a
/// token below its successor's, and a CAS that read the word before any other grant or latched
/// section fails instead of taking a token it did not see.
#[test]
fn a_fast_grant_forced_out_right_after_its_cas_keeps_the_lower_token() {
    use super::{lw_val, Wait};
    use std::sync::atomic::Ordering::Acquire;
    let table = Arc::new(LockTable::anonymous(&tiny_caps()).unwrap());
    let reg = |label: &[u8]| table.register(crate::owner::OwnerKind::Local, label).unwrap();
    let (a, b) = (reg(b"a"), reg(b"b"));
    table
        .release(a, &table.acquire(a, b"x", Mode::Exclusive, Wait::No).unwrap())
        .unwrap();
    let sh = table.shard(0);
    let i = table.lookup(&sh, crate::name::hash(table.seed, b"x"), b"x").unwrap();
    let e = sh.entry(i).unwrap();
    let w = e.lw.load(Acquire);
    assert_eq!(lw_val(w), 0, "free and open to fast CASes");

    // The CAS, as `try_fast` makes it; then, before anything else of a's runs, a forced release.
    let by_a = table.fast_grant(&sh, e, i, w, a).expect("the word is free");
    let forced = table.force_release(b"x").unwrap();
    assert_eq!(forced.holders.len(), 1);
    let by_b = table.acquire(b, b"x", Mode::Exclusive, Wait::No).unwrap();
    assert!(by_b.owner_died, "b is told that a was forced out");
    assert!(
        by_b.token > by_a.token,
        "successor {} after forced-out {}",
        by_b.token,
        by_a.token
    );
    assert!(matches!(table.release(a, &by_a), Err(Error::NotHeld)));
    table.release(b, &by_b).unwrap();

    // A word read before other grants came and went (latched or fast) no longer matches.
    assert!(
        table.fast_grant(&sh, e, i, w, a).is_none(),
        "stale after a latched cycle"
    );
    let w2 = e.lw.load(Acquire);
    table
        .release(b, &table.acquire(b, b"x", Mode::Exclusive, Wait::No).unwrap())
        .unwrap();
    assert!(table.fast_grant(&sh, e, i, w2, a).is_none(), "stale after a fast cycle");
    let last = table.acquire(a, b"x", Mode::Exclusive, Wait::No).unwrap();
    assert!(last.token > by_b.token);
    table.release(a, &last).unwrap();
    assert!(table.check().is_empty(), "{:?}", table.check());
}

/// The pid of a process that has exited and been waited for.
fn dead_pid() -> u32 {
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let pid = child.id();
    child.wait().unwrap();
    pid
}

/// Without shmlockd, a caller that finds a lock held by an owner nobody checked lately checks
/// it at once, whatever its timeout: `try_lock` and a 1 ms `try_lock_for` get a dead holder's
/// lock (with the notice) instead of giving up before the first poll period.
#[test]
fn a_dead_holder_is_reaped_by_callers_that_do_not_wait_a_poll_period() {
    use super::{OwnerState, Wait};
    use std::time::Duration;
    for timeout in [None, Some(Duration::from_millis(1))] {
        let table = Arc::new(LockTable::anonymous(&tiny_caps()).unwrap());
        let dead = table.register(crate::owner::OwnerKind::Local, b"dead").unwrap();
        let held = table.acquire(dead, b"x", Mode::Exclusive, Wait::No).unwrap();
        // Its process exits holding the lock (an exited pid stands in for it).
        table.owners()[dead.idx as usize].pid.store(dead_pid(), Relaxed);
        let c = Client::with_table(table.clone(), "asker").unwrap();
        let g = match timeout {
            None => c.try_lock("x"),
            Some(t) => c.try_lock_for("x", t),
        }
        .expect("the dead holder is reaped");
        assert!(g.owner_died() && g.token().0 > held.token);
        assert_eq!(
            table.owner_pool().state(super::Idx(dead.idx)).unwrap(),
            OwnerState::Free
        );
        drop(g);
        assert!(table.check().is_empty(), "{:?}", table.check());
    }
}

/// The liveness of an owner is checked at most once a check period, whoever asks.
#[test]
fn an_owner_is_checked_at_most_once_a_period() {
    let o = crate::owner::Owner::default();
    let period = super::reap::CHECK_PERIOD.as_millis() as u32;
    let t = 1_000_000u32;
    assert!(o.claim_check(t, period));
    assert!(!o.claim_check(t, period) && !o.claim_check(t + period - 1, period));
    assert!(o.claim_check(t + period, period));
    // The stamp wraps with the clock's low 32 bits of milliseconds.
    o.checked.store(u32::MAX - 1, Relaxed);
    assert!(!o.claim_check(u32::MAX, period));
    assert!(o.claim_check(period, period));
}

/// A grant handed to a waiter and forced out before the waiter came for it: the waiter gets
/// the (forced-out) grant, never `Cancelled`, and the table stays consistent meanwhile.
#[test]
fn a_grant_forced_out_before_its_waiter_collects_it_is_not_a_cancellation() {
    use super::{HoldState, Idx, Wait, GRANTED};
    use std::time::Duration;
    for mode in [Mode::Shared, Mode::Exclusive] {
        let table = Arc::new(LockTable::anonymous(&tiny_caps()).unwrap());
        let reg = |label: &[u8]| table.register(crate::owner::OwnerKind::Local, label).unwrap();
        let (a, b, c) = (reg(b"a"), reg(b"b"), reg(b"c"));
        let held = table.acquire(a, b"x", Mode::Exclusive, Wait::No).unwrap();
        let sh = table.shard(0);
        let (i, w) = {
            let _l = table.lock_shard(&sh, crate::table::pid_latch_id());
            let i = table.lookup(&sh, crate::name::hash(table.seed, b"x"), b"x").unwrap();
            sh.pin(i).unwrap();
            let w = table.enqueue(&sh, i, mode, b).unwrap();
            sh.publish(i);
            (i, w)
        };
        // b has waited past FAIR_AFTER (an exclusive waiter is handed the lock only then).
        std::thread::sleep(super::FAIR_AFTER + Duration::from_millis(1));
        table.release(a, &held).unwrap();
        assert_eq!(sh.holds()[w.0 as usize].futex.load(Relaxed), GRANTED, "{mode:?}");
        table.force_release(b"x").unwrap();
        assert_eq!(sh.hpool().state(Idx(w.0)).unwrap(), HoldState::Granted);
        assert!(table.check().is_empty(), "{mode:?}: {:?}", table.check());
        // A repair meanwhile keeps it b's.
        {
            let _l = table.lock_shard(&sh, crate::table::pid_latch_id());
            table.repair(&sh).unwrap();
        }
        let by_c = table
            .acquire(c, b"x", mode, Wait::No)
            .expect("the lock was forced free");
        let deadline = crate::clock::now().plus(Duration::from_secs(5));
        let by_b = table
            .wait_for_grant(&sh, i, w, b, mode, Wait::Until(deadline), &mut never)
            .expect("b's request was granted, not cancelled");
        assert!(by_b.token < by_c.token, "{mode:?}");
        assert!(matches!(table.release(b, &by_b), Err(Error::NotHeld)), "{mode:?}");
        table.release(c, &by_c).unwrap();
        assert!(table.check().is_empty(), "{mode:?}: {:?}", table.check());
        assert_eq!(table.stats().held, 0);
    }
}

/// A reaper that died after releasing a dead owner's locks leaves the owner REAPING, and
/// nothing it held is asked for: the next registration finishes the reap.
#[test]
fn an_abandoned_reap_is_finished_by_the_next_registration() {
    use super::{Idx, OwnerState};
    let table = Arc::new(LockTable::anonymous(&tiny_caps()).unwrap());
    let dead = table.register(crate::owner::OwnerKind::Local, b"dead").unwrap();
    let o = &table.owners()[dead.idx as usize];
    o.pid.store(dead_pid(), Relaxed);
    {
        let _g = table.lock_owners();
        table
            .owner_pool()
            .transition(
                Idx(dead.idx),
                OwnerState::Live,
                OwnerState::Reaping,
                crate::clock::now(),
            )
            .unwrap();
        o.reaper.store(dead_pid(), Relaxed);
    }
    let _c = Client::with_table(table.clone(), "next").unwrap();
    assert_eq!(table.owner_pool().count(OwnerState::Reaping), 0);
    assert_eq!(table.owner_pool().state(Idx(dead.idx)).unwrap(), OwnerState::Free);
}

// ---- corrupted segments: errors and findings, never a panic, an abort or a spin ---------------

/// Runs `f` on a thread of its own; panics if it has not returned within 10 s (a spin).
fn within_10s<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(std::time::Duration::from_secs(10))
        .expect("did not return within 10 s (spinning?) or panicked")
}

/// Shard headers zeroed (badseg_repro.py shardhdr-zero): the FREE count says 0 and every list
/// head names entry 0, which is FREE. An insert used to evict for ever under the latch; it
/// gives up after one round per entry with a corrupt-segment error.
#[test]
fn an_insert_into_torn_entry_lists_fails_instead_of_spinning_under_the_latch() {
    let table = Arc::new(LockTable::anonymous(&tiny_caps()).unwrap());
    {
        let c = Client::with_table(table.clone(), "c").unwrap();
        c.lock("old").unwrap().unlock().unwrap();
    }
    // (No client of this thread is left to release anything under a latch a spin would keep.)
    for l in &table.shard(0).hdr.entry_lists {
        for w in [&l.head, &l.tail, &l.count] {
            w.store(0, Relaxed);
        }
    }
    let t = table.clone();
    let r = within_10s(move || {
        let c = Client::with_table(t, "d").unwrap();
        c.try_lock("new").map(drop)
    });
    assert!(matches!(r, Err(Error::Corrupt { .. })), "{r:?}");
    assert!(
        table
            .check_headers()
            .iter()
            .any(|l| l.starts_with("shard 0 header: lock entry FREE list")),
        "{:?}",
        table.check_headers()
    );
}

/// A fencing counter read from the segment at `u64::MAX` (shard header or an entry's base)
/// fails the grant with an error; it used to overflow (a panic in debug builds, a repeated
/// token in release ones).
#[test]
fn a_fencing_counter_at_its_limit_fails_the_grant() {
    let table = Arc::new(LockTable::anonymous(&tiny_caps()).unwrap());
    let c = Client::with_table(table.clone(), "c").unwrap();
    // An entry whose last token is u64::MAX, idle and open to the fast path.
    c.lock("y").unwrap().unlock().unwrap();
    let sh = table.shard(0);
    let i = table.lookup(&sh, crate::name::hash(table.seed, b"y"), b"y").unwrap();
    let e = sh.entry(i).unwrap();
    e.token_base.store(
        u64::MAX.wrapping_sub(u64::from(super::lw_gen(e.lw.load(Relaxed)))),
        Relaxed,
    );
    assert_eq!(e.last_token(), u64::MAX);
    assert!(matches!(c.try_lock("y"), Err(Error::Corrupt { .. })));
    // The shard's counter at u64::MAX: a new name (latched path, exclusive and shared).
    sh.hdr.token.store(u64::MAX, Relaxed);
    assert!(matches!(c.try_lock("z"), Err(Error::Corrupt { .. })));
    assert!(matches!(c.try_lock_shared("s"), Err(Error::Corrupt { .. })));
    assert!(table
        .check_headers()
        .iter()
        .any(|l| l.starts_with("shard 0 header: fencing token counter")));
}

/// `check` on shard headers overwritten with 0xff (badseg_repro.py shardhdr-ff) reports them
/// and leaves them alone. It used to take the latch (0xffffffff names a pid no process has:
/// "dead"), repair the shard from its records, and call the table consistent.
#[test]
fn check_reports_garbage_shard_headers_without_repairing_them() {
    let table = Arc::new(LockTable::anonymous(&tiny_caps()).unwrap());
    let c = Client::with_table(table.clone(), "c").unwrap();
    let _g = c.lock_shared("held").unwrap();
    let hdr = table.shard(0).hdr;
    hdr.latch.store(u32::MAX, Relaxed);
    for l in hdr.entry_lists.iter().chain(&hdr.hold_lists) {
        for w in [&l.head, &l.tail, &l.count] {
            w.store(u32::MAX, Relaxed);
        }
    }
    let found = within_10s({
        let t = table.clone();
        move || t.check()
    });
    assert!(
        found
            .iter()
            .any(|l| l == "shard 0 header: lock entry HELD list: count 4294967295 exceeds the capacity 4"),
        "{found:?}"
    );
    assert!(
        found
            .iter()
            .any(|l| l.starts_with("shard 0 header: latch word 0xffffffff")),
        "{found:?}"
    );
    assert!(
        found.iter().any(|l| l.starts_with("shard 0: not checked further")),
        "{found:?}"
    );
    assert!(!found.iter().any(|l| l.starts_with("table header")), "{found:?}");
    // Nothing was repaired: the latch and the counts are as the corruption left them.
    assert_eq!(hdr.latch.load(Relaxed), u32::MAX);
    assert!(hdr.entry_lists.iter().all(|l| l.count.load(Relaxed) == u32::MAX));
    hdr.latch.store(0, Relaxed); // let the guard's release find a plain latch
    std::mem::forget(_g);
}

/// `locks` and `owners_info` reserve by the capacities fixed at open, not by counts read from
/// the segment: a HELD count of 0x7fffffff (badseg_gateway.py) used to abort on an allocation
/// of ~100 GB, and a FREE owner count above the capacity to panic (capacity overflow).
#[test]
fn snapshots_reserve_by_capacity_not_by_garbage_counts() {
    use super::{EntryState, HoldState, OwnerState};
    let table = Arc::new(LockTable::anonymous(&tiny_caps()).unwrap());
    let c = Client::with_table(table.clone(), "c").unwrap();
    let _g = c.lock_shared("held").unwrap();
    let hdr = table.shard(0).hdr;
    hdr.entry_lists[EntryState::Held as usize]
        .count
        .store(0x7fff_ffff, Relaxed);
    hdr.hold_lists[HoldState::Waiting as usize]
        .count
        .store(u32::MAX, Relaxed);
    let owners = &table.table_hdr().owner_lists[OwnerState::Free as usize];
    owners.count.store(table.geo.owners + 3, Relaxed);
    let locks = table.locks();
    assert_eq!(locks.len(), 1, "{locks:?}");
    assert_eq!(locks[0].holders.len(), 1);
    let owners_info = table.owners_info(&locks);
    assert_eq!(owners_info.len(), 1, "{owners_info:?}");
    let stats = table.stats();
    assert_eq!(stats.held, 0x7fff_ffff);
    assert!(!table.check_headers().is_empty());
}

/// Counters and counts read from the segment saturate: statistics summed over shards, the
/// reap counter, an entry's reader and waiter counts. Each used to overflow (a panic in debug
/// builds).
#[test]
fn garbage_counters_saturate_instead_of_overflowing() {
    use super::STAT_GRANTS;
    let caps = Capacities {
        max_locks: 8,
        max_holds: 8,
        max_owners: 4,
        shards: 2,
        ..Default::default()
    };
    let table = Arc::new(LockTable::anonymous(&caps).unwrap());
    for s in 0..2 {
        table.shard(s).hdr.stats[STAT_GRANTS].store(u64::MAX, Relaxed);
    }
    assert_eq!(table.stats().grants, u64::MAX);

    // The reap counter.
    table.table_hdr().reaps.store(u64::MAX, Relaxed);
    let dead = table.register(crate::owner::OwnerKind::Local, b"dead").unwrap();
    table.owners()[dead.idx as usize].pid.store(dead_pid(), Relaxed);
    assert_eq!(table.reap_dead(super::pid_latch_id()).unwrap(), 1);
    assert_eq!(table.reaps(), u64::MAX);

    // An entry's reader and waiter counts.
    let (a, b) = (
        Client::with_table(table.clone(), "a").unwrap(),
        Client::with_table(table.clone(), "b").unwrap(),
    );
    let ga = a.lock_shared("r").unwrap();
    let h = crate::name::hash(table.seed, b"r");
    let sh = table.shard(table.shard_of(h));
    let e = sh.entry(table.lookup(&sh, h, b"r").unwrap()).unwrap();
    e.readers.store(u32::MAX, Relaxed);
    let gb = b.try_lock_shared("r");
    assert_eq!(e.readers.load(Relaxed), u32::MAX);
    drop(gb);
    e.waiters.store(u32::MAX, Relaxed);
    let w = b.try_lock_for("r", std::time::Duration::from_millis(1));
    assert!(w.is_err(), "{w:?}");
    drop(ga);
}

/// `check_headers` never reports a healthy table, even while other threads lock, wait and
/// release all the time: it checks the heads against each other only under a latch it got by
/// a plain try, and without it only what holds at every instant. (shmlockd refuses to adopt a
/// segment on any finding, so a false one would refuse a busy, healthy segment.)
#[test]
fn check_headers_finds_nothing_in_a_busy_healthy_table() {
    let caps = Capacities {
        max_locks: 16,
        max_holds: 16,
        max_owners: 8,
        shards: 2,
        ..Default::default()
    };
    let table = Arc::new(LockTable::anonymous(&caps).unwrap());
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let workers: Vec<_> = (0..3)
        .map(|k| {
            let (t, stop) = (table.clone(), stop.clone());
            std::thread::spawn(move || {
                let c = Client::with_table(t, &format!("w{k}")).unwrap();
                let mut i = 0u32;
                while !stop.load(Relaxed) {
                    let name = format!("n{}", i % 24);
                    let g = if (i + k) % 3 == 0 {
                        c.try_lock_shared_for(&name, std::time::Duration::from_millis(1))
                    } else {
                        c.try_lock_for(&name, std::time::Duration::from_millis(1))
                    };
                    drop(g);
                    i = i.wrapping_add(1);
                }
            })
        })
        .collect();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    let mut rounds = 0;
    while std::time::Instant::now() < deadline || rounds < 100 {
        let found = table.check_headers();
        assert!(found.is_empty(), "round {rounds}: {found:?}");
        rounds += 1;
    }
    stop.store(true, Relaxed);
    for w in workers {
        w.join().unwrap();
    }
    assert!(table.check().is_empty(), "{:?}", table.check());
}

/// A garbage shard latch word naming a FREE owner record, which the next registration takes:
/// the new owner used to wait for ever on a latch that named itself (alive, so never taken
/// over), and every process on the shard with it (corruption fuzz seed 1363). Registration
/// takes such a latch over and repairs the shard first. And a garbage owner latch naming a live
/// owner (only pid ids take that latch) is taken over rather than waited on for ever.
#[test]
fn garbage_latch_words_naming_owner_records_do_not_hang_anyone() {
    use super::OwnerState;
    let table = Arc::new(LockTable::anonymous(&tiny_caps()).unwrap());
    let next = table.owner_pool().newest(OwnerState::Free).unwrap();
    table.shard(0).hdr.latch.store(next.0 + 1, Relaxed);
    let t = table.clone();
    let r = within_10s(move || {
        let c = Client::with_table(t, "next").unwrap();
        c.try_lock("x").map(drop)
    });
    assert!(r.is_ok(), "{r:?}");
    let live = Client::with_table(table.clone(), "live").unwrap();
    let live_idx = table.owner_pool().iter(OwnerState::Live).next().unwrap().0;
    table.table_hdr().owner_latch.store(live_idx.0 + 1, Relaxed);
    let t = table.clone();
    let r = within_10s(move || Client::with_table(t, "another").map(drop));
    assert!(r.is_ok(), "{r:?}");
    assert!(table.check().is_empty(), "{:?}", table.check());
    drop(live);
}

/// `status`'s "highest token granted" counts fast grants too (it once read only the shards'
/// counters, which fast grants do not raise: a name at token 1,000 showed 1).
#[test]
fn stats_max_token_counts_fast_grants() {
    let caps = Capacities {
        max_locks: 64,
        max_holds: 64,
        max_owners: 4,
        ..Default::default()
    };
    let table = Arc::new(LockTable::anonymous(&caps).expect("table"));
    let c = Client::with_table(Arc::clone(&table), "t").expect("client");
    let mut last = 0;
    for _ in 0..1000 {
        let g = c.lock("n").expect("lock");
        last = g.token().0;
    }
    assert!(last >= 1000, "{last}");
    assert!(
        table.stats().max_token >= last,
        "stats {} < last token {last}",
        table.stats().max_token
    );
}

/// A segment whose header claims more owners than the lock word can name is refused at open,
/// naming the count and the bound (it was judged only against its regions, which a crafted
/// segment can size to match).
#[test]
fn open_refuses_an_owner_count_the_lock_word_cannot_encode() {
    let name = format!("/shmlock-ut-owners-{}", std::process::id());
    let caps = Capacities {
        max_locks: 64,
        max_holds: 64,
        max_owners: 4,
        ..Default::default()
    };
    let _ = crate::Segment::unlink(&name);
    let table = LockTable::create(&name, &caps).expect("create");
    table.segment().header().params[super::P_OWNERS].store(u64::from(super::FAST_OWNER) + 1, Relaxed);
    drop(table);
    let e = LockTable::open(&name).map(|_| ()).unwrap_err();
    let _ = crate::Segment::unlink(&name);
    assert!(
        matches!(&e, Error::Corrupt { what } if what.contains("beyond what the lock word can name")),
        "{e}"
    );
}

/// A table where owner `a` holds "x" fast (the grant), and owner `b` who will ask for it.
fn a_fast_hold_and_a_rival() -> (Arc<LockTable>, super::OwnerRef, super::OwnerRef, super::RawGrant) {
    let table = Arc::new(LockTable::anonymous(&tiny_caps()).unwrap());
    let a = table.register(crate::owner::OwnerKind::Local, b"a").unwrap();
    let b = table.register(crate::owner::OwnerKind::Local, b"b").unwrap();
    let held = table.acquire(a, b"x", Mode::Exclusive, super::Wait::No).unwrap();
    (table, a, b, held)
}

/// A one-try request that finds a lock held fast by a live owner answers WouldBlock without the
/// latch: the holder's word is untouched (its hold stays fast, its release one CAS), nothing is
/// queued, and the holder's liveness is checked at most once a period. (It used to pin the entry
/// to say so, which turned the hold latched: a process polling with try_lock, as every Python
/// `acquire` does under the GIL before it waits, pushed the holder and every request behind it
/// onto the latched path.)
#[test]
fn a_busy_try_leaves_the_holders_fast_hold_alone() {
    use super::{lw_val, Wait};
    let (table, a, b, held) = a_fast_hold_and_a_rival();
    let sh = table.shard(held.shard);
    let e = sh.entry(held.entry).unwrap();
    let word = e.lw.load(Relaxed);
    assert_eq!(lw_val(word), a.idx + 1, "a fast hold");
    let waits = table.stats().waits;
    for _ in 0..3 {
        assert!(matches!(
            table.acquire(b, b"x", Mode::Exclusive, Wait::No),
            Err(Error::WouldBlock)
        ));
        assert_eq!(e.lw.load(Relaxed), word, "the holder's word is untouched");
    }
    assert_eq!(table.stats().waits, waits, "nothing queued");
    // The first try checked a (a new record is due at once); the others did not.
    let period = super::reap::CHECK_PERIOD.as_millis() as u32;
    let now = crate::clock::coarse().millis32();
    assert!(
        !table.owners()[a.idx as usize].claim_check(now, period),
        "checked just now"
    );
    assert!(table.check().is_empty(), "{:?}", table.check());
    table.release(a, &held).unwrap();
    assert_eq!(lw_val(e.lw.load(Relaxed)), 0, "released by its CAS, open");
    let by_b = table.acquire(b, b"x", Mode::Exclusive, Wait::No).unwrap();
    assert!(by_b.token > held.token && !by_b.owner_died);
    table.release(b, &by_b).unwrap();
    assert!(table.check().is_empty(), "{:?}", table.check());
}

/// A fast holder that dies after a busy try checked it is found by the first try after the check
/// period, which reaps it and takes the lock with the notice; the tries in between say
/// WouldBlock (one liveness check a period, whoever asks).
#[test]
fn a_busy_try_reaps_a_dead_fast_holder_once_its_check_is_due() {
    use super::{OwnerState, Wait};
    let (table, dead, c, held) = a_fast_hold_and_a_rival();
    assert!(matches!(
        table.acquire(c, b"x", Mode::Exclusive, Wait::No),
        Err(Error::WouldBlock)
    ));
    // Its process exits holding the lock (an exited pid stands in for it), just after the check.
    table.owners()[dead.idx as usize].pid.store(dead_pid(), Relaxed);
    assert!(matches!(
        table.acquire(c, b"x", Mode::Exclusive, Wait::No),
        Err(Error::WouldBlock)
    ));
    std::thread::sleep(super::reap::CHECK_PERIOD * 2);
    let g = table
        .acquire(c, b"x", Mode::Exclusive, Wait::No)
        .expect("the dead holder is reaped");
    assert!(g.owner_died && g.token > held.token);
    assert_eq!(
        table.owner_pool().state(super::Idx(dead.idx)).unwrap(),
        OwnerState::Free
    );
    table.release(c, &g).unwrap();
    assert!(table.check().is_empty(), "{:?}", table.check());
}

/// A request watching a fast hold follows the lock through new generations (a release and
/// another fast grant), but takes a free word of a new generation only if the entry still holds
/// its name: the entry may have been reused for another lock while it watched.
#[test]
fn a_watching_request_takes_a_new_generation_only_under_its_own_name() {
    use super::{lw_gen, lw_val, Wait};
    let (table, a, b, first) = a_fast_hold_and_a_rival();
    let sh = table.shard(first.shard);
    let (i, e) = (first.entry, sh.entry(first.entry).unwrap());
    let seen = e.lw.load(Relaxed);
    // While b "watched" `seen`, a released and took it again, and released it again.
    table.release(a, &first).unwrap();
    let again = table.acquire(a, b"x", Mode::Exclusive, Wait::No).unwrap();
    table.release(a, &again).unwrap();
    let now = e.lw.load(Relaxed);
    assert!(lw_gen(now) != lw_gen(seen) && lw_val(now) == 0);
    let y = crate::name::hash(table.seed, b"y");
    assert!(
        table.spin_fast(&sh, e, i, seen, (y, b"y"), b).is_none(),
        "a free word of a new generation under another name is not taken"
    );
    assert_eq!(e.lw.load(Relaxed), now, "and not touched");
    let x = crate::name::hash(table.seed, b"x");
    let g = table
        .spin_fast(&sh, e, i, seen, (x, b"x"), b)
        .expect("under its own name it is taken");
    assert!(g.token > again.token);
    assert_eq!(lw_val(e.lw.load(Relaxed)), b.idx + 1, "a fast hold of b's");
    table.release(b, &g).unwrap();
    assert!(table.check().is_empty(), "{:?}", table.check());
}
