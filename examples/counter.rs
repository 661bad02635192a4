//! Increments the number in a file N times, each time under an exclusive lock: one participant
//! of the cross-language test (`bindings/python/tests/test_interop.py`), where Python, C, this
//! Rust program and `shmlock run` share one lock and one counter, and no increment may be lost.
//!
//! ```sh
//! cargo run --example counter -- /shmlock jobs/counter /tmp/counter 100
//! ```

use std::time::Duration;

use shmlock::Client;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [segment, name, file, n] = args.as_slice() else {
        return Err("usage: counter SEGMENT NAME FILE N".into());
    };
    let n: u64 = n.parse()?;
    let client = Client::open(segment)?;
    for i in 0..n {
        let _g = client.try_lock_for(name, Duration::from_secs(60))?;
        let value: u64 = std::fs::read_to_string(file)?.trim().parse()?;
        if i % 7 == 0 {
            // Widen the window that two holders at once would need to lose an increment.
            std::thread::sleep(Duration::from_micros(500));
        }
        std::fs::write(file, (value + 1).to_string())?;
    }
    Ok(())
}
