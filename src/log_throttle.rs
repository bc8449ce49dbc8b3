//! Rate-limited log lines. A warning that a peer can trigger at will (a flood of messages
//! the cluster cannot take, say) is written at most once per [`EVERY`] per call site, with
//! the number suppressed since the last one, so a flood can neither fill the disk nor drown
//! the lines that matter.
//!
//! ```ignore
//! warn_throttled!(node = %id, "cluster backlog full: a message was dropped");
//! ```

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Shortest time between two lines of one call site.
pub const EVERY: Duration = Duration::from_secs(10);

/// The state of one call site: when it may log next, and how many lines it swallowed.
pub struct Throttle {
    /// Milliseconds since [`epoch`] before which nothing is logged.
    next: AtomicU64,
    suppressed: AtomicU64,
}

impl Throttle {
    pub const fn new() -> Throttle {
        Throttle {
            next: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// `Some(lines suppressed since the last one)` when this call may log, else `None`
    /// (and it is counted). Lock-free: one load, and a compare-exchange when it may log.
    pub fn allow(&self, every: Duration) -> Option<u64> {
        let now = epoch().elapsed().as_millis() as u64;
        let next = self.next.load(Ordering::Relaxed);
        let every = every.as_millis() as u64;
        if now < next
            || self
                .next
                .compare_exchange(next, now + every, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        Some(self.suppressed.swap(0, Ordering::Relaxed))
    }
}

impl Default for Throttle {
    fn default() -> Self {
        Throttle::new()
    }
}

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// `tracing::warn!` at most once per [`EVERY`] from this call site, with a `suppressed`
/// field counting the lines left out since the previous one.
#[macro_export]
macro_rules! warn_throttled {
    ($($arg:tt)+) => {{
        static THROTTLE: $crate::log_throttle::Throttle = $crate::log_throttle::Throttle::new();
        if let Some(suppressed) = THROTTLE.allow($crate::log_throttle::EVERY) {
            ::tracing::warn!(suppressed, $($arg)+);
        }
    }};
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_interval_with_the_count_of_those_left_out() {
        let throttle = Throttle::new();
        let every = Duration::from_millis(200);
        assert_eq!(throttle.allow(every), Some(0));
        for _ in 0..1000 {
            assert_eq!(throttle.allow(every), None);
        }
        std::thread::sleep(every + Duration::from_millis(20));
        assert_eq!(throttle.allow(every), Some(1000));
        assert_eq!(throttle.allow(every), None);
    }
}
