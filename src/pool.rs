//! State pools: fixed arrays of records, each in one state, kept in per-state FIFO lists.
//!
//! Modelled on libsxe's sxe-pool. A pool is a view over two slices in the segment: one
//! [`PoolNode`] per record (state, time it entered that state, list links) kept outside the
//! record itself, and one [`ListHead`] per state. Each state's list is doubly linked by index and
//! ordered by the time its records entered the state, so the head is the oldest: "take the oldest
//! FREE" is an O(1) allocator, "oldest WAITING" is FIFO order, "oldest HELD" the longest-held lock.
//!
//! # Invariants
//! - every record is in exactly one list, the one of its `state`;
//! - each list is well formed (`next.prev == self`, head has no prev, tail no next) and its
//!   `count` equals its length; the counts sum to the capacity;
//! - stamps along a list never decrease (a stamp is clamped to its predecessor's).
//!
//! # Concurrency
//! A pool has no lock of its own: every mutating call must be made under the lock that owns the
//! pool (a shard latch). All accesses are Relaxed atomics; the owning lock's Acquire/Release
//! orders them. Readers without the lock (inspection) may see inconsistent but defined values.
//!
//! # Crash safety
//! A process killed inside a transition can leave a record unlinked or a count off by one. The
//! states are the truth; lists and counts are derived and `StatePool::rebuild` restores them.

use std::fmt;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};

use crate::clock::Nanos;
use crate::error::{Error, Result};

/// Index of a record in its pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Idx(pub u32);

impl Idx {
    /// "No record".
    pub const NIL: Idx = Idx(u32::MAX);
    /// True for [`Idx::NIL`].
    pub fn is_nil(self) -> bool {
        self == Idx::NIL
    }
    /// As a usize.
    pub fn get(self) -> usize {
        self.0 as usize
    }
}

/// Per-record pool bookkeeping (24 bytes).
#[repr(C)]
#[derive(Debug, Default)]
pub struct PoolNode {
    /// The record's state. Written under the pool's lock.
    state: AtomicU32,
    /// Previous record in the state's list (NIL at the head).
    prev: AtomicU32,
    /// Next record in the state's list (NIL at the tail).
    next: AtomicU32,
    _pad: AtomicU32,
    /// CLOCK_MONOTONIC ns when the record entered its state (or was last touched).
    stamp: AtomicU64,
}

/// One state's list (16 bytes).
#[repr(C)]
#[derive(Debug, Default)]
pub struct ListHead {
    /// Oldest record, or NIL.
    pub(crate) head: AtomicU32,
    /// Newest record, or NIL.
    pub(crate) tail: AtomicU32,
    /// Number of records in the state.
    pub(crate) count: AtomicU32,
    _pad: AtomicU32,
}

// SAFETY: repr(C), atomics only, valid at zero, no pointers.
crate::shm::impl_shm_safe!(PoolNode);
// SAFETY: repr(C), atomics only, valid at zero, no pointers.
crate::shm::impl_shm_safe!(ListHead);

const _: () = assert!(std::mem::size_of::<PoolNode>() == 24 && std::mem::align_of::<PoolNode>() == 8);
const _: () = assert!(std::mem::size_of::<ListHead>() == 16 && std::mem::align_of::<ListHead>() == 4);

/// A pool's state enum. State 0 is the initial (free) state.
pub trait PoolState: Copy + Eq + fmt::Debug + 'static {
    /// Number of states.
    const COUNT: usize;
    /// Name of the pool, for errors.
    const POOL: &'static str;
    /// The state as a number `< COUNT`.
    fn to_u32(self) -> u32;
    /// The state for a number, if valid.
    fn from_u32(v: u32) -> Option<Self>;
    /// Name of the state, for errors and display.
    fn name(self) -> &'static str;
}

fn state_name<S: PoolState>(v: u32) -> &'static str {
    S::from_u32(v).map_or("(invalid)", S::name)
}

const NIL: u32 = u32::MAX;

/// A pool: a view over its nodes and its per-state list heads.
pub struct StatePool<'a, S> {
    nodes: &'a [PoolNode],
    lists: &'a [ListHead],
    _s: PhantomData<S>,
}

impl<S> fmt::Debug for StatePool<'_, S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StatePool")
            .field("capacity", &self.nodes.len())
            .finish()
    }
}

impl<'a, S: PoolState> StatePool<'a, S> {
    /// A view over `nodes` (one per record) and `lists` (exactly `S::COUNT`).
    pub fn new(nodes: &'a [PoolNode], lists: &'a [ListHead]) -> Self {
        debug_assert_eq!(lists.len(), S::COUNT, "one list head per state");
        debug_assert!(nodes.len() < NIL as usize);
        StatePool {
            nodes,
            lists,
            _s: PhantomData,
        }
    }

    /// Puts every record in state 0, in index order, stamped `now`.
    pub(crate) fn init(&self, now: Nanos) {
        let n = self.nodes.len() as u32;
        for (i, node) in self.nodes.iter().enumerate() {
            let i = i as u32;
            node.state.store(0, Relaxed);
            node.prev.store(if i == 0 { NIL } else { i - 1 }, Relaxed);
            node.next.store(if i + 1 == n { NIL } else { i + 1 }, Relaxed);
            node.stamp.store(now.0, Relaxed);
        }
        for (s, l) in self.lists.iter().enumerate() {
            let first = s == 0 && n > 0;
            l.head.store(if first { 0 } else { NIL }, Relaxed);
            l.tail.store(if first { n - 1 } else { NIL }, Relaxed);
            l.count.store(if s == 0 { n } else { 0 }, Relaxed);
        }
    }

    /// Number of records.
    pub fn capacity(&self) -> u32 {
        self.nodes.len() as u32
    }

    fn node(&self, i: Idx) -> Result<&'a PoolNode> {
        self.nodes.get(i.get()).ok_or_else(|| Error::Corrupt {
            what: format!("{} index {} out of range {}", S::POOL, i.0, self.nodes.len()),
        })
    }

    fn list(&self, s: S) -> &'a ListHead {
        &self.lists[s.to_u32() as usize]
    }

    /// Number of records in state `s`.
    pub fn count(&self, s: S) -> u32 {
        self.list(s).count.load(Relaxed)
    }

    /// State of record `i`.
    pub fn state(&self, i: Idx) -> Result<S> {
        let v = self.node(i)?.state.load(Relaxed);
        S::from_u32(v).ok_or_else(|| Error::Corrupt {
            what: format!("{} record {} has state {v}", S::POOL, i.0),
        })
    }

    /// When record `i` entered its state (or was last touched).
    pub fn time(&self, i: Idx) -> Result<Nanos> {
        Ok(Nanos(self.node(i)?.stamp.load(Relaxed)))
    }

    /// Oldest record in state `s` and its time.
    pub fn oldest(&self, s: S) -> Option<(Idx, Nanos)> {
        let h = self.list(s).head.load(Relaxed);
        let node = self.nodes.get(h as usize)?;
        Some((Idx(h), Nanos(node.stamp.load(Relaxed))))
    }

    fn unlink(&self, node: &PoolNode, list: &ListHead) {
        let (p, n) = (node.prev.load(Relaxed), node.next.load(Relaxed));
        match self.nodes.get(p as usize) {
            Some(pn) => pn.next.store(n, Relaxed),
            None => list.head.store(n, Relaxed),
        }
        match self.nodes.get(n as usize) {
            Some(nn) => nn.prev.store(p, Relaxed),
            None => list.tail.store(p, Relaxed),
        }
        // A torn list (a count of 0, a record linked to itself) is left for `check` to report and
        // `rebuild` to mend: nothing read from the segment may panic, even in debug builds.
        list.count.store(list.count.load(Relaxed).wrapping_sub(1), Relaxed);
    }

    fn push_tail(&self, i: u32, node: &PoolNode, s: S, now: Nanos) {
        let list = self.list(s);
        let t = list.tail.load(Relaxed);
        let mut stamp = now.0;
        match self.nodes.get(t as usize) {
            Some(tn) => {
                stamp = stamp.max(tn.stamp.load(Relaxed));
                tn.next.store(i, Relaxed);
            }
            None => list.head.store(i, Relaxed),
        }
        node.prev.store(t, Relaxed);
        node.next.store(NIL, Relaxed);
        node.stamp.store(stamp, Relaxed);
        node.state.store(s.to_u32(), Relaxed);
        list.tail.store(i, Relaxed);
        list.count.store(list.count.load(Relaxed).wrapping_add(1), Relaxed);
    }

    /// Moves record `i` from state `expected` to `new`, stamped `now`. Fails with
    /// [`Error::WrongState`] if the record is not in `expected`: a state read from the segment
    /// may be anything a dead process or a corruption left, so this is an error in every build,
    /// never an assertion.
    #[inline]
    pub fn transition(&self, i: Idx, expected: S, new: S, now: Nanos) -> Result<()> {
        let node = self.node(i)?;
        let cur = node.state.load(Relaxed);
        if cur != expected.to_u32() {
            return Err(Error::WrongState {
                pool: S::POOL,
                index: i.0,
                expected: expected.name(),
                found: state_name::<S>(cur),
            });
        }
        self.unlink(node, self.list(expected));
        crate::chaos::point();
        self.push_tail(i.0, node, new, now);
        Ok(())
    }

    /// The newest record in state `s`, left where it is: a caller fills a FREE record in and then
    /// publishes it with [`transition`](Self::transition), so a record that is not FREE is always
    /// complete, even if its writer is killed half way.
    #[inline]
    pub fn newest(&self, s: S) -> Option<Idx> {
        let t = self.list(s).tail.load(Relaxed);
        let node = self.nodes.get(t as usize)?;
        (node.state.load(Relaxed) == s.to_u32()).then_some(Idx(t))
    }

    /// The record [`newest`](Self::newest) would most likely return, read from the list head
    /// alone (so without the pool's lock it may be stale), with a prefetch of its node issued:
    /// a caller about to take it under the lock starts the cache misses early.
    #[inline]
    pub(crate) fn newest_hint(&self, s: S) -> Option<Idx> {
        let t = self.list(s).tail.load(Relaxed);
        let node = self.nodes.get(t as usize)?;
        crate::shm::sys::prefetch(node);
        Some(Idx(t))
    }

    /// Moves the oldest record of `from` to `to` (the pool's FIFO allocator); None if `from` is empty.
    #[inline]
    pub fn take_oldest(&self, from: S, to: S, now: Nanos) -> Option<Idx> {
        let h = self.list(from).head.load(Relaxed);
        self.take(h, from, to, now)
    }

    /// Moves the newest record of `from` to `to` (a LIFO allocator: the most recently freed
    /// record is the one most likely still in cache); None if `from` is empty.
    #[inline]
    pub fn take_newest(&self, from: S, to: S, now: Nanos) -> Option<Idx> {
        let t = self.list(from).tail.load(Relaxed);
        self.take(t, from, to, now)
    }

    fn take(&self, i: u32, from: S, to: S, now: Nanos) -> Option<Idx> {
        let node = self.nodes.get(i as usize)?;
        if node.state.load(Relaxed) != from.to_u32() {
            return None; // a torn list; `check` reports it, `rebuild` mends it
        }
        self.unlink(node, self.list(from));
        self.push_tail(i, node, to, now);
        Some(Idx(i))
    }

    /// Moves record `i` to the tail of its own state with a new stamp.
    pub fn touch(&self, i: Idx, now: Nanos) -> Result<()> {
        let s = self.state(i)?;
        self.transition(i, s, s, now)
    }

    /// Records in state `s`, oldest first (bounded by the capacity, so a torn list cannot loop).
    pub fn iter(&self, s: S) -> impl Iterator<Item = (Idx, Nanos)> + 'a {
        let nodes = self.nodes;
        let mut cur = self.list(s).head.load(Relaxed);
        let mut left = nodes.len();
        std::iter::from_fn(move || {
            let node = nodes.get(cur as usize)?;
            if left == 0 {
                return None;
            }
            left -= 1;
            let item = (Idx(cur), Nanos(node.stamp.load(Relaxed)));
            cur = node.next.load(Relaxed);
            Some(item)
        })
    }

    /// Verifies every invariant; returns one line per violation.
    pub fn check(&self) -> Vec<String> {
        let mut out = Vec::new();
        let n = self.nodes.len();
        let mut seen = vec![false; n];
        let mut total: u64 = 0;
        for s in 0..S::COUNT as u32 {
            let sname = state_name::<S>(s);
            let list = &self.lists[s as usize];
            let count = list.count.load(Relaxed);
            total += u64::from(count);
            let (mut prev, mut cur, mut len, mut last_stamp) = (NIL, list.head.load(Relaxed), 0u64, 0u64);
            while cur != NIL {
                let Some(node) = self.nodes.get(cur as usize) else {
                    out.push(format!("{} {sname} list: index {cur} out of range", S::POOL));
                    break;
                };
                if seen[cur as usize] {
                    out.push(format!("{} {sname} list: record {cur} reached twice", S::POOL));
                    break;
                }
                seen[cur as usize] = true;
                len += 1;
                if node.state.load(Relaxed) != s {
                    out.push(format!(
                        "{} record {cur} is on the {sname} list but in state {}",
                        S::POOL,
                        state_name::<S>(node.state.load(Relaxed))
                    ));
                }
                if node.prev.load(Relaxed) != prev {
                    out.push(format!(
                        "{} record {cur}: prev link {} should be {prev}",
                        S::POOL,
                        node.prev.load(Relaxed)
                    ));
                }
                let st = node.stamp.load(Relaxed);
                if st < last_stamp {
                    out.push(format!("{} {sname} list out of time order at record {cur}", S::POOL));
                }
                last_stamp = st;
                prev = cur;
                cur = node.next.load(Relaxed);
            }
            if list.tail.load(Relaxed) != prev {
                out.push(format!(
                    "{} {sname} list: tail {} should be {prev}",
                    S::POOL,
                    list.tail.load(Relaxed)
                ));
            }
            if u64::from(count) != len {
                out.push(format!("{} {sname} list: count {count} but {len} linked", S::POOL));
            }
        }
        if total != n as u64 {
            out.push(format!("{} counts sum to {total}, capacity is {n}", S::POOL));
        }
        for (i, s) in seen.iter().enumerate() {
            if !s {
                out.push(format!("{} record {i} is on no list", S::POOL));
            }
        }
        out
    }

    /// Checks the list heads alone (count, head and tail of each state's list), reading no
    /// record: what a corrupted header shows, found in O(states) without walking anything.
    /// Always checked, because no instant of a healthy pool breaks it: every count is within the
    /// capacity, every head and tail is NIL or in range. With `settled` (the caller holds the
    /// pool's lock, so nobody is half way through a transition) the heads must also agree with
    /// each other: counts summing to the capacity, a list empty (head and tail NIL) exactly when
    /// its count is 0, one record's head and tail the same. (Whether the records agree with the
    /// heads is [`check`](Self::check)'s business.) One line per finding.
    pub(crate) fn check_heads(&self, settled: bool) -> Vec<String> {
        let mut out = Vec::new();
        let n = self.nodes.len();
        let mut total: u64 = 0;
        for (s, list) in self.lists.iter().enumerate() {
            let sname = state_name::<S>(s as u32);
            let (head, tail, count) = (
                list.head.load(Relaxed),
                list.tail.load(Relaxed),
                list.count.load(Relaxed),
            );
            total += u64::from(count);
            if count as usize > n {
                out.push(format!(
                    "{} {sname} list: count {count} exceeds the capacity {n}",
                    S::POOL
                ));
            }
            for (end, i) in [("head", head), ("tail", tail)] {
                if i != NIL && i as usize >= n {
                    out.push(format!("{} {sname} list: {end} {i} out of range {n}", S::POOL));
                }
            }
            if settled
                && ((count == 0) != (head == NIL) || (head == NIL) != (tail == NIL) || (count == 1 && head != tail))
            {
                out.push(format!(
                    "{} {sname} list: count {count} disagrees with head {head} and tail {tail}",
                    S::POOL
                ));
            }
        }
        if settled && total != n as u64 {
            out.push(format!("{} counts sum to {total}, capacity is {n}", S::POOL));
        }
        out
    }

    /// Rebuilds every list and count from the records' states, ordering each list by stamp.
    /// For repair after a process died inside a transition.
    pub(crate) fn rebuild(&self) {
        let mut by_state: Vec<Vec<(u64, u32)>> = vec![Vec::new(); S::COUNT];
        for (i, node) in self.nodes.iter().enumerate() {
            let mut s = node.state.load(Relaxed);
            if s as usize >= S::COUNT {
                s = 0;
                node.state.store(0, Relaxed);
            }
            by_state[s as usize].push((node.stamp.load(Relaxed), i as u32));
        }
        for (s, mut v) in by_state.into_iter().enumerate() {
            v.sort_unstable();
            let list = &self.lists[s];
            let mut prev = NIL;
            for &(_, i) in &v {
                let node = &self.nodes[i as usize];
                node.prev.store(prev, Relaxed);
                node.next.store(NIL, Relaxed);
                match self.nodes.get(prev as usize) {
                    Some(p) => p.next.store(i, Relaxed),
                    None => list.head.store(i, Relaxed),
                }
                prev = i;
            }
            if v.is_empty() {
                list.head.store(NIL, Relaxed);
            }
            list.tail.store(prev, Relaxed);
            list.count.store(v.len() as u32, Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::VecDeque;

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum T {
        Free,
        Used,
        Done,
    }
    impl PoolState for T {
        const COUNT: usize = 3;
        const POOL: &'static str = "test";
        fn to_u32(self) -> u32 {
            self as u32
        }
        fn from_u32(v: u32) -> Option<Self> {
            [T::Free, T::Used, T::Done].get(v as usize).copied()
        }
        fn name(self) -> &'static str {
            ["FREE", "USED", "DONE"][self as usize]
        }
    }

    struct Heap {
        nodes: Vec<PoolNode>,
        lists: Vec<ListHead>,
    }
    impl Heap {
        fn new(n: usize) -> Self {
            let h = Heap {
                nodes: (0..n).map(|_| PoolNode::default()).collect(),
                lists: (0..3).map(|_| ListHead::default()).collect(),
            };
            h.pool().init(Nanos(1));
            h
        }
        fn pool(&self) -> StatePool<'_, T> {
            StatePool::new(&self.nodes, &self.lists)
        }
    }

    #[test]
    fn allocate_oldest_and_newest() {
        let h = Heap::new(4);
        let p = h.pool();
        assert_eq!(p.count(T::Free), 4);
        assert_eq!(p.take_oldest(T::Free, T::Used, Nanos(5)), Some(Idx(0)));
        assert_eq!(p.take_newest(T::Free, T::Used, Nanos(6)), Some(Idx(3)));
        assert_eq!(p.oldest(T::Used), Some((Idx(0), Nanos(5))));
        assert_eq!(p.count(T::Used), 2);
        p.touch(Idx(0), Nanos(9)).unwrap();
        assert_eq!(p.oldest(T::Used), Some((Idx(3), Nanos(6))));
        assert_eq!(p.iter(T::Used).map(|x| x.0).collect::<Vec<_>>(), vec![Idx(3), Idx(0)]);
        assert!(p.check().is_empty(), "{:?}", p.check());
        assert_eq!(p.time(Idx(0)).unwrap(), Nanos(9));
    }

    #[test]
    fn stamps_are_clamped_to_keep_lists_ordered() {
        let h = Heap::new(2);
        let p = h.pool();
        p.transition(Idx(0), T::Free, T::Used, Nanos(100)).unwrap();
        p.transition(Idx(1), T::Free, T::Used, Nanos(50)).unwrap();
        assert_eq!(p.time(Idx(1)).unwrap(), Nanos(100));
        assert!(p.check().is_empty());
    }

    #[test]
    fn empty_state_gives_none() {
        let h = Heap::new(1);
        let p = h.pool();
        assert_eq!(p.take_oldest(T::Used, T::Done, Nanos(2)), None);
        assert_eq!(p.oldest(T::Done), None);
        assert!(matches!(p.state(Idx(5)), Err(Error::Corrupt { .. })));
    }

    #[test]
    fn wrong_expected_state_is_an_error() {
        let h = Heap::new(2);
        let p = h.pool();
        let e = p.transition(Idx(1), T::Used, T::Done, Nanos(2)).unwrap_err();
        assert!(
            matches!(
                e,
                Error::WrongState {
                    index: 1,
                    expected: "USED",
                    found: "FREE",
                    ..
                }
            ),
            "{e}"
        );
        assert!(p.check().is_empty());
    }

    #[test]
    fn rebuild_repairs_torn_lists() {
        let h = Heap::new(8);
        let p = h.pool();
        for i in 0..5 {
            p.transition(Idx(i), T::Free, T::Used, Nanos(10 + u64::from(i)))
                .unwrap();
        }
        // Tear: a process "died" after unlinking record 2 from USED but before linking it.
        h.nodes[1].next.store(3, Relaxed);
        h.nodes[3].prev.store(1, Relaxed);
        assert!(!p.check().is_empty());
        p.rebuild();
        assert!(p.check().is_empty(), "{:?}", p.check());
        assert_eq!(p.iter(T::Used).map(|x| x.0 .0).collect::<Vec<_>>(), vec![0, 1, 2, 3, 4]);
    }

    #[test]
    fn check_heads_reports_garbage_heads_and_torn_ones_only_when_settled() {
        let h = Heap::new(4);
        let p = h.pool();
        p.transition(Idx(1), T::Free, T::Used, Nanos(2)).unwrap();
        assert!(p.check_heads(true).is_empty(), "{:?}", p.check_heads(true));
        // Garbage: always found.
        h.lists[2].count.store(u32::MAX, Relaxed);
        h.lists[2].head.store(7, Relaxed);
        let found = p.check_heads(false);
        assert_eq!(
            found,
            [
                "test DONE list: count 4294967295 exceeds the capacity 4",
                "test DONE list: head 7 out of range 4"
            ]
        );
        // Torn (as a transition half done would leave it): only found when settled.
        h.lists[2].count.store(0, Relaxed);
        h.lists[2].head.store(u32::MAX, Relaxed);
        h.lists[1].count.store(0, Relaxed);
        assert!(p.check_heads(false).is_empty());
        assert_eq!(
            p.check_heads(true),
            [
                "test USED list: count 0 disagrees with head 1 and tail 1",
                "test counts sum to 3, capacity is 4"
            ]
        );
        // Records that disagree with the heads are not its business.
        p.rebuild();
        h.nodes[1].state.store(2, Relaxed);
        assert!(p.check_heads(true).is_empty());
        assert!(!p.check().is_empty());
    }

    #[derive(Debug, Clone)]
    enum Op {
        Transition(u32, u8, u8),
        TakeOldest(u8, u8),
        TakeNewest(u8, u8),
        Touch(u32),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0u32..12, 0u8..3, 0u8..3).prop_map(|(i, a, b)| Op::Transition(i, a, b)),
            (0u8..3, 0u8..3).prop_map(|(a, b)| Op::TakeOldest(a, b)),
            (0u8..3, 0u8..3).prop_map(|(a, b)| Op::TakeNewest(a, b)),
            (0u32..12).prop_map(Op::Touch),
        ]
    }

    proptest! {
        /// The pool against a naive model: a VecDeque per state.
        #[test]
        fn pool_matches_model(ops in proptest::collection::vec(op(), 1..200)) {
            let n = 12;
            let h = Heap::new(n);
            let p = h.pool();
            let mut model: Vec<VecDeque<u32>> = vec![(0..n as u32).collect(), VecDeque::new(), VecDeque::new()];
            let st = |v: u8| T::from_u32(u32::from(v)).unwrap();
            for (t, op) in ops.into_iter().enumerate() {
                let now = Nanos(100 + t as u64);
                match op {
                    Op::Transition(i, a, b) => {
                        if model[a as usize].contains(&i) {
                            p.transition(Idx(i), st(a), st(b), now).unwrap();
                            model[a as usize].retain(|&x| x != i);
                            model[b as usize].push_back(i);
                        }
                    }
                    Op::TakeOldest(a, b) => {
                        let got = p.take_oldest(st(a), st(b), now).map(|x| x.0);
                        let want = model[a as usize].pop_front();
                        prop_assert_eq!(got, want);
                        if let Some(i) = want { model[b as usize].push_back(i); }
                    }
                    Op::TakeNewest(a, b) => {
                        let got = p.take_newest(st(a), st(b), now).map(|x| x.0);
                        let want = model[a as usize].pop_back();
                        prop_assert_eq!(got, want);
                        if let Some(i) = want { model[b as usize].push_back(i); }
                    }
                    Op::Touch(i) => {
                        let s = p.state(Idx(i)).unwrap().to_u32() as usize;
                        p.touch(Idx(i), now).unwrap();
                        model[s].retain(|&x| x != i);
                        model[s].push_back(i);
                    }
                }
                let problems = p.check();
                prop_assert!(problems.is_empty(), "{:?}", problems);
                for s in 0..3u8 {
                    let listed: Vec<u32> = p.iter(st(s)).map(|x| x.0 .0).collect();
                    prop_assert_eq!(&listed, &model[s as usize].iter().copied().collect::<Vec<_>>());
                    prop_assert_eq!(p.count(st(s)) as usize, model[s as usize].len());
                    prop_assert_eq!(p.oldest(st(s)).map(|x| x.0 .0), model[s as usize].front().copied());
                }
            }
        }
    }
}
