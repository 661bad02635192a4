//! An exhaustive interleaving check of the lock word's protocol: the fast CAS, the pin, the
//! publish and the fast release, against latched sections that pin and publish, over every
//! schedule of a few actors (explicit-state search: every reachable state, each once).
//!
//! Review found a two-holders bug here once (504eba6: a second `publish` in one latched section
//! stored over a word the first had opened, wiping a fast hold taken in between). This model
//! runs the protocol step by step as the code does it, with the word built and read by the real
//! encoding (`lock_word`, `lw_gen`, `lw_val`, `SLOW`, `FAST_OWNER`), so a change of encoding
//! changes the model too; and it finds that bug when `publish` uses the old rule.
//!
//! # Correspondence with the code (each numbered step is one atomic step of the model)
//! - Fast lock ([`LockTable::try_fast`](super::LockTable) and `fast_grant`): F1 load `lw`
//!   (Acquire); if `val == 0`: F2 read `token_base`, token = base + gen + 1; F3 CAS `lw` from the
//!   word read to `lock_word(gen + 1, owner + 1)` (AcqRel). A word held fast by another owner is
//!   watched (`spin_fast`), and a CAS that fails looks again (`acquire_slow` runs `try_fast`
//!   before the latch): back to F1, [`SPINS`] times per lock. Anything else goes to the latch.
//! - Fast release (`release`): R1 CAS `lock_word(gen, owner + 1)` -> `lock_word(gen, 0)`
//!   (Release); on failure the latched release.
//! - Latched section: L0 take the shard latch (a step enabled only while it is free); L1 `pin`
//!   (`fetch_or(SLOW)`, and a fast holder found is moved into `owner`: one step, since with
//!   `SLOW` set no CAS can succeed until the word is opened again); then the section's work
//!   (a latched grant: for locker 0 as `grant_now` makes one when nobody waits, a fast hold by
//!   `set_word(gen + 1, owner + 1)` in its three stores; for locker 1 as when others wait, the
//!   word stays pinned, `owner` is set and the base moved so the last token is the grant's; a
//!   latched release clears `owner`); then `publish`: P1 load `lw` and decide (the rule under
//!   test); P2-P4 `set_word(gen + 1, 0)`: store `lock_word(gen + 1, SLOW)`, store the base,
//!   store `lock_word(gen + 1, 0)` (Release); L9 drop the latch.
//! - A supervisor-like section (the reaper, `release_owner`) that pins and publishes twice, as
//!   `release_owner` did for a handoff it dropped.
//!
//! Not modelled: queues and sleeping waiters (a latched locker that finds the lock held drops
//! the latch and starts again, which the search explores as well), shared mode, and the pool
//! state. Memory ordering: the model is sequentially consistent; the orderings in the code are
//! argued in the lock word's table in `entry.rs`.

use std::collections::HashSet;

use super::entry::{lock_word, lw_gen, lw_val, FAST_OWNER, SLOW};

/// Which rule `publish` uses to decide whether it may store over the word.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rule {
    /// Today's: only over a pinned word (`val == SLOW`).
    PinnedOnly,
    /// Before 504eba6: over any word without a fast holder.
    NoFastHolder,
}

const NONE: u8 = u8::MAX;

/// How many times a locker goes back to F1 per lock (`spin_fast`'s polls, cut down).
const SPINS: u8 = 2;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Kind {
    /// Locks and unlocks `rounds` times as owner `me`.
    Locker { me: u8 },
    /// Pins and publishes twice under the latch, `rounds` times.
    Section,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Actor {
    kind: Kind,
    pc: u8,
    rounds: u8,
    /// The word it read (F1, P1).
    w: u64,
    /// The token it computed (F2) or was granted.
    token: u64,
    /// Holds the lock, fast (Some(gen)) or latched (Some(u32::MAX)).
    held: Option<u32>,
    /// Publishes left in this section.
    publishes: u8,
    /// Returns to F1 left in this lock.
    spins: u8,
    /// What to do after publish: 0 unlatch and hold, 1 unlatch and round done, 2 unlatch and
    /// retry the lock.
    then: u8,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct World {
    lw: u64,
    base: u64,
    /// The latched holder (`Entry::owner`), NONE when free.
    owner: u8,
    latch: u8,
    /// The actor that pinned the word and has not opened it again.
    pinned_by: u8,
    /// Highest token granted so far.
    top: u64,
    actors: Vec<Actor>,
}

impl World {
    fn last_token(&self) -> u64 {
        self.base.wrapping_add(u64::from(lw_gen(self.lw)))
    }

    fn holders(&self) -> usize {
        self.actors.iter().filter(|a| a.held.is_some()).count()
    }
}

/// Grants `token` to actor `i`: checks it is above every earlier one.
fn grant(w: &mut World, i: usize, token: u64, how: Option<u32>) -> Result<(), String> {
    if token <= w.top {
        return Err(format!("token {token} granted after {}", w.top));
    }
    w.top = token;
    w.actors[i].held = how;
    w.actors[i].token = token;
    if w.holders() > 1 {
        return Err(format!("two holders: {:?}", w.actors));
    }
    Ok(())
}

/// The next state after actor `i`'s step, or None if the step is not enabled (the latch is
/// taken, or the actor is done).
fn step(w: &World, i: usize, rule: Rule) -> Option<Result<World, String>> {
    let mut n = w.clone();
    let me_id = i as u8;
    let a = &w.actors[i];
    if a.rounds == 0 {
        return None;
    }
    let r = (|| -> Result<(), String> {
        let act = &mut n.actors[i];
        match (a.kind, a.pc) {
            // ---- fast lock ----
            (Kind::Locker { .. }, 0) => {
                act.w = n.lw; // F1
                act.pc = match lw_val(act.w) {
                    0 => 1,
                    // Held fast by the other locker: watch it (load again).
                    v if v & SLOW == 0 && act.spins > 0 => {
                        act.spins -= 1;
                        0
                    }
                    _ => 10,
                };
            }
            (Kind::Locker { .. }, 1) => {
                // F2, as `fast_grant`: a base read at its limit sends the caller to the latch.
                match n.base.wrapping_add(u64::from(lw_gen(act.w))).checked_add(1) {
                    Some(t) => {
                        act.token = t;
                        act.pc = 2;
                    }
                    None => act.pc = 10,
                }
            }
            (Kind::Locker { me }, 2) => {
                // F3
                if n.lw == act.w {
                    if n.pinned_by != NONE {
                        return Err("a fast CAS succeeded on a pinned word".into());
                    }
                    let gen = lw_gen(act.w) + 1;
                    n.lw = lock_word(gen, u32::from(me) + 1);
                    n.actors[i].pc = 20;
                    let t = n.actors[i].token;
                    return grant(&mut n, i, t, Some(gen));
                }
                // Lost the CAS: watch the word, while the polls last.
                if act.spins > 0 {
                    act.spins -= 1;
                    act.pc = 0;
                } else {
                    act.pc = 10;
                }
            }
            // ---- latched lock ----
            (Kind::Locker { .. }, 10) | (Kind::Locker { .. }, 30) | (Kind::Section, 0) => {
                if n.latch != NONE {
                    return Err(String::new()); // not enabled
                }
                n.latch = me_id;
                n.actors[i].pc += 1;
            }
            (Kind::Locker { .. }, 11) | (Kind::Locker { .. }, 31) | (Kind::Section, 1) => pin(&mut n, i),
            (Kind::Locker { me: 0 }, 12) if n.owner == NONE => {
                // Locker 0 is granted as when nobody waits (`grant_now`): a fast hold named by
                // the word alone, `set_word(gen + 1, owner + 1)` in its three stores (G1-G3).
                let (t, w0) = (n.last_token() + 1, n.lw);
                n.lw = lock_word(lw_gen(w0) + 1, SLOW); // G1
                let act = &mut n.actors[i];
                (act.token, act.w, act.pc) = (t, w0, 13);
            }
            (Kind::Locker { .. }, 13) => {
                n.base = a.token.wrapping_sub(u64::from(lw_gen(a.w) + 1)); // G2
                n.actors[i].pc = 14;
            }
            (Kind::Locker { me }, 14) => {
                let gen = lw_gen(a.w) + 1;
                n.lw = lock_word(gen, u32::from(me) + 1); // G3 (Release)
                if n.pinned_by == me_id {
                    n.pinned_by = NONE;
                }
                let act = &mut n.actors[i];
                act.then = 0;
                act.publishes = 1; // publish finds the word not pinned and leaves it
                act.pc = 40;
                let t = act.token;
                return grant(&mut n, i, t, Some(gen));
            }
            (Kind::Locker { .. }, 12) => {
                if n.owner == NONE {
                    // Locker 1 is granted as when others wait: HELD, named by `owner`.
                    // A latched grant: the word is pinned; the base moves so the last token is
                    // this grant's.
                    let t = n.last_token() + 1;
                    n.base = t.wrapping_sub(u64::from(lw_gen(n.lw)));
                    n.owner = me_id;
                    n.actors[i].then = 0;
                    n.actors[i].pc = 40;
                    return grant(&mut n, i, t, Some(u32::MAX));
                }
                act.then = 2; // held: publish, let go, try again
                act.publishes = 1;
                act.pc = 40;
            }
            // ---- holding: release ----
            (Kind::Locker { me }, 20) => match act.held {
                Some(gen) if gen != u32::MAX && n.lw == lock_word(gen, u32::from(me) + 1) => {
                    n.lw = lock_word(gen, 0); // R1
                    release_done(&mut n, i);
                }
                _ => act.pc = 30, // R1 failed (pinned, or latched grant): the latched release
            },
            (Kind::Locker { .. }, 32) => {
                if n.owner == me_id {
                    n.owner = NONE;
                    act.held = None;
                }
                act.then = 1;
                act.publishes = 1;
                act.pc = 40;
            }
            (Kind::Section, 2) => {
                act.then = 1;
                act.publishes = 2;
                act.pc = 40;
            }
            // ---- publish, then what comes after ----
            (_, 40) => {
                if act.publishes == 0 {
                    // L9: drop the latch.
                    n.latch = NONE;
                    if n.pinned_by == me_id {
                        n.pinned_by = NONE;
                    }
                    let act = &mut n.actors[i];
                    match act.then {
                        0 => act.pc = 20,
                        1 => {
                            act.rounds -= 1;
                            act.spins = SPINS;
                            act.pc = 0;
                        }
                        _ => act.pc = 0,
                    }
                    return Ok(());
                }
                act.publishes -= 1;
                act.w = n.lw; // P1
                let v = lw_val(act.w);
                let may_store = match rule {
                    Rule::PinnedOnly => v == SLOW,
                    Rule::NoFastHolder => v & FAST_OWNER == 0,
                };
                let free = n.owner == NONE;
                n.actors[i].pc = if may_store && free { 41 } else { 40 };
            }
            (_, 41) => {
                // P2: set_word's first store, from the last token read now.
                let t = n.last_token();
                let gen = lw_gen(a.w).wrapping_add(1);
                n.actors[i].token = t;
                n.lw = lock_word(gen, SLOW);
                n.actors[i].pc = 42;
            }
            (_, 42) => {
                n.base = act.token.wrapping_sub(u64::from(lw_gen(act.w).wrapping_add(1))); // P3
                act.pc = 43;
            }
            (_, 43) => {
                n.lw = lock_word(lw_gen(act.w).wrapping_add(1), 0); // P4: open
                if n.pinned_by == me_id {
                    n.pinned_by = NONE;
                }
                n.actors[i].pc = 40;
            }
            other => return Err(format!("no step {other:?}")),
        }
        Ok(())
    })();
    match r {
        Ok(()) => Some(Ok(n)),
        Err(e) if e.is_empty() => None,
        Err(e) => Some(Err(e)),
    }
}

/// L1: `pin`, as the code does it under the latch.
fn pin(n: &mut World, i: usize) {
    let old = n.lw;
    n.lw |= u64::from(SLOW);
    let holder = lw_val(old) & FAST_OWNER;
    if holder != 0 {
        n.lw = lock_word(lw_gen(old), SLOW);
        // The fast holder is now the latched one: find which actor it is.
        n.owner = n
            .actors
            .iter()
            .position(|a| matches!(a.kind, Kind::Locker { me } if u32::from(me) + 1 == holder))
            .map_or(NONE, |p| p as u8);
    }
    n.pinned_by = i as u8;
    n.actors[i].pc += 1;
}

fn release_done(n: &mut World, i: usize) {
    let a = &mut n.actors[i];
    a.held = None;
    a.rounds -= 1;
    a.spins = SPINS;
    a.pc = 0;
}

/// Every state reachable from `start`; the first violation found, if any, and the count.
fn explore(start: World, rule: Rule) -> (Option<String>, usize) {
    let mut seen = HashSet::new();
    let mut stack = vec![start];
    while let Some(w) = stack.pop() {
        if !seen.insert(w.clone()) {
            continue;
        }
        for i in 0..w.actors.len() {
            match step(&w, i, rule) {
                None => {}
                Some(Ok(n)) => stack.push(n),
                Some(Err(e)) => return (Some(e), seen.len()),
            }
        }
    }
    (None, seen.len())
}

/// Two fast lockers (`rounds` lock/unlock pairs each, owners 0 and 1) and one section that pins
/// and publishes twice.
fn world(rounds: u8, sections: u8) -> World {
    let actor = |kind, rounds| Actor {
        kind,
        pc: 0,
        rounds,
        w: 0,
        token: 0,
        held: None,
        publishes: 0,
        spins: SPINS,
        then: 0,
    };
    World {
        lw: lock_word(1, 0),
        base: 0,
        owner: NONE,
        latch: NONE,
        pinned_by: NONE,
        top: 0,
        actors: vec![
            actor(Kind::Locker { me: 0 }, rounds),
            actor(Kind::Locker { me: 1 }, rounds),
            actor(Kind::Section, sections),
        ],
    }
}

#[test]
fn the_lock_word_protocol_holds_in_every_interleaving() {
    let (violation, states) = explore(world(2, 2), Rule::PinnedOnly);
    eprintln!("lock word model: {states} states, no violation");
    assert_eq!(violation, None, "after {states} states");
    assert!(states > 1000, "the search explored only {states} states");
}

/// The checker can fail: with `publish`'s rule before 504eba6 it finds the two holders.
#[test]
fn the_model_finds_the_two_holders_of_the_old_publish_rule() {
    let (violation, states) = explore(world(2, 2), Rule::NoFastHolder);
    let v = violation.unwrap_or_else(|| panic!("no violation in {states} states"));
    assert!(v.starts_with("two holders"), "{v}");
}
