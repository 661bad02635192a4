//! Micro-benchmarks of the in-process client on an anonymous table (criterion).
//!
//! - `lock_unlock/uncontended`: lock + unlock of one name in an otherwise empty table.
//! - `try_lock/held_would_block`: `try_lock` of a name another client holds (the WouldBlock path).
//! - `lock_unlock/among_100k_held`: lock + unlock of one name while 100,000 other names are held
//!   (name lookup cost at load).
//!
//! Multi-process scenarios and the comparison with flock and pthread live in `shmlock-bench`.

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use shmlock::{Capacities, Client, Error, LockTable};

fn table(max_locks: u32) -> Arc<LockTable> {
    let caps = Capacities {
        max_locks,
        max_holds: 1024,
        max_owners: 16,
        ..Default::default()
    };
    Arc::new(LockTable::anonymous(&caps).expect("anonymous table"))
}

fn uncontended(c: &mut Criterion) {
    let client = Client::with_table(table(65_536), "micro").expect("client");
    c.bench_function("lock_unlock/uncontended", |b| {
        b.iter(|| {
            let g = client.lock(black_box("ABCD")).expect("lock");
            g.unlock().expect("unlock");
        })
    });
}

fn would_block(c: &mut Criterion) {
    let t = table(65_536);
    let holder = Client::with_table(Arc::clone(&t), "holder").expect("client");
    let other = Client::with_table(t, "other").expect("client");
    let _held = holder.lock("busy").expect("lock");
    c.bench_function("try_lock/held_would_block", |b| {
        b.iter(|| match other.try_lock(black_box("busy")) {
            Err(Error::WouldBlock) => {}
            other => panic!("expected WouldBlock, got {other:?}"),
        })
    });
}

fn among_held(c: &mut Criterion) {
    const HELD: u32 = 100_000;
    let t = table(HELD + 1_024);
    let holder = Client::with_table(Arc::clone(&t), "holder").expect("client");
    let client = Client::with_table(t, "micro").expect("client");
    let names: Vec<String> = (0..HELD).map(|i| format!("held-{i}")).collect();
    let guards: Vec<_> = names.iter().map(|n| holder.lock(n).expect("lock")).collect();
    c.bench_function("lock_unlock/among_100k_held", |b| {
        b.iter(|| {
            let g = client.lock(black_box("ABCD")).expect("lock");
            g.unlock().expect("unlock");
        })
    });
    drop(guards);
}

#[allow(missing_docs, reason = "criterion_group! makes an undocumented pub fn")]
mod group {
    use super::*;

    criterion_group! {
        name = micro;
        config = Criterion::default()
            .warm_up_time(Duration::from_millis(500))
            .measurement_time(Duration::from_secs(2));
        targets = uncontended, would_block, among_held
    }
}
criterion_main!(group::micro);
