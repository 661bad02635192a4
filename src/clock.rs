//! Timestamps from CLOCK_MONOTONIC, which is system-wide, so every process agrees on them.
//!
//! Two readings: [`now`] (precise, about 24 ns here) for waits, deadlines and fairness, and
//! [`coarse`] (CLOCK_MONOTONIC_COARSE, the last timer tick, about 5 ns) for the "since when" stamps
//! taken on the uncontended lock path. Both read the same clock: a coarse value is never later
//! than a precise one taken after it.

use std::time::Duration;

use crate::shm::sys::clock_ns;

/// Nanoseconds of CLOCK_MONOTONIC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Nanos(pub u64);

impl Nanos {
    /// The zero instant (before any real timestamp).
    pub const ZERO: Nanos = Nanos(0);

    /// Time elapsed from `earlier` to `self`, zero if `earlier` is later.
    pub fn since(self, earlier: Nanos) -> Duration {
        Duration::from_nanos(self.0.saturating_sub(earlier.0))
    }

    /// Milliseconds, truncated to 32 bits (for stamps compared with wrapping arithmetic).
    pub fn millis32(self) -> u32 {
        (self.0 / 1_000_000) as u32
    }

    /// `self + d`, saturating.
    pub fn plus(self, d: Duration) -> Nanos {
        Nanos(self.0.saturating_add(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)))
    }
}

/// Precise CLOCK_MONOTONIC.
#[inline]
pub fn now() -> Nanos {
    Nanos(clock_ns(libc::CLOCK_MONOTONIC))
}

/// CLOCK_MONOTONIC_COARSE: same clock, timer-tick resolution (a few ms), much cheaper.
#[inline]
pub fn coarse() -> Nanos {
    Nanos(clock_ns(libc::CLOCK_MONOTONIC_COARSE))
}

/// A duration as people read it, rounded as `shmlock locks` rounds ages: `78ms`, `5.6s`,
/// `3m 4s`, `2h 5m`, `3d 4h`. Error messages use it too, so the same time reads the same.
pub fn human(d: std::time::Duration) -> String {
    let s = d.as_secs();
    match s {
        0 => format!("{}ms", d.as_millis()),
        1..=59 => format!("{:.1}s", d.as_secs_f64()),
        60..=3599 => format!("{}m {}s", s / 60, s % 60),
        3600..=86_399 => format!("{}h {}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d {}h", s / 86_400, s % 86_400 / 3600),
    }
}
