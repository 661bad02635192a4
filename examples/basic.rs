//! The library in a few lines: lock a name exclusively, read its fencing token, lock another in
//! shared mode, and see a second handle wait with a timeout.
//!
//! ```sh
//! cargo run --release --bin shmlockd &     # or let this example create a scratch segment
//! cargo run --example basic
//! ```

use std::time::Duration;

use shmlock::{Capacities, Client, Error};

fn main() -> Result<(), Error> {
    // The daemon's segment if it runs, else a scratch one this example creates and removes.
    let scratch = format!("/shmlock-example-{}", std::process::id());
    let (a, created) = match Client::open_default() {
        Ok(c) => (c, false),
        Err(Error::SegmentMissing { .. }) => (Client::create_or_open(&scratch, &Capacities::default())?, true),
        Err(e) => return Err(e),
    };
    let b = Client::with_table(a.table().clone(), "example-b")?;

    let guard = a.lock("orders/42")?;
    println!("a holds orders/42, fencing token {}", guard.token());
    match b.try_lock_for("orders/42", Duration::from_millis(100)) {
        Err(e @ Error::TimedOut { .. }) => println!("b: {e}"),
        other => println!("b: unexpected {other:?}"),
    }
    drop(guard);
    let guard = b.lock("orders/42")?;
    println!("b holds orders/42 now, token {} (larger)", guard.token());

    let r1 = a.lock_shared("config")?;
    let r2 = b.lock_shared("config")?;
    println!("a and b both read config ({:?}, {:?})", r1.mode(), r2.mode());
    drop((guard, r1, r2));

    if created {
        drop((a, b));
        shmlock::Segment::unlink(&scratch)?;
    }
    Ok(())
}
