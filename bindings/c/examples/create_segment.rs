//! `create_segment NAME [MAX_OWNERS]`: creates the segment NAME with the default capacities
//! (MAX_OWNERS owners, 64 unless given), as `shmlock-bench stream` sizes its own, without a
//! daemon; `create_segment --remove NAME` removes it. For bench.sh and trying the C library
//! without shmlockd.

use shmlock_core::{Capacities, LockTable, Segment};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.as_slice() {
        [flag, name] if flag == "--remove" => Segment::unlink(name)?,
        [name, rest @ ..] if rest.len() <= 1 => {
            let max_owners = rest.first().map_or(Ok(64), |n| n.parse())?;
            let caps = Capacities {
                max_owners,
                ..Default::default()
            };
            LockTable::create(name, &caps)?;
        }
        _ => return Err("usage: create_segment NAME [MAX_OWNERS] | create_segment --remove NAME".into()),
    }
    Ok(())
}
