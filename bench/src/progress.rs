//! A progress line on stderr every few seconds while a scenario runs, so a long run (a soak's
//! churn, a 150k-connection hold) is not minutes of silence: elapsed time, WebSocket
//! connections opened, messages received by the bench's clients, and errors so far.
//!
//! The counters are process-wide atomics bumped where the scenarios already count (one
//! relaxed add per event: nothing a benchmark would notice); the figures a scenario reports
//! at the end stay its own.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

static CONNECTIONS: AtomicU64 = AtomicU64::new(0);
static MESSAGES: AtomicU64 = AtomicU64::new(0);
static ERRORS: AtomicU64 = AtomicU64::new(0);

/// A WebSocket connection was opened (upgrade done).
pub fn connection() {
    CONNECTIONS.fetch_add(1, Ordering::Relaxed);
}

/// A client received one of the messages the scenario sent.
pub fn message() {
    MESSAGES.fetch_add(1, Ordering::Relaxed);
}

/// A connection failed, or a message was lost, duplicated, misrouted or unparsable.
pub fn error() {
    ERRORS.fetch_add(1, Ordering::Relaxed);
}

/// The line for `elapsed`: `[  12 s] connections 1000, messages 250000, errors 0`.
fn line(elapsed: Duration) -> String {
    format!(
        "[{:>5} s] connections {}, messages {}, errors {}",
        elapsed.as_secs(),
        CONNECTIONS.load(Ordering::Relaxed),
        MESSAGES.load(Ordering::Relaxed),
        ERRORS.load(Ordering::Relaxed)
    )
}

/// Prints [`line`] every `every` until `stop` is cancelled; `every` zero prints nothing.
pub async fn report(every: Duration, stop: CancellationToken) {
    if every.is_zero() {
        return;
    }
    let start = Instant::now();
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => eprintln!("{}", line(start.elapsed())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_line_says_what_was_counted() {
        let before = line(Duration::ZERO);
        connection();
        message();
        message();
        error();
        let after = line(Duration::from_secs(7));
        assert!(before.starts_with("[    0 s] connections "), "{before}");
        assert!(after.starts_with("[    7 s] connections "), "{after}");
        // Other tests in this process may count too: compare, don't expect exact figures.
        let figures = |l: &str| -> Vec<u64> {
            l.split(", ")
                .map(|part| {
                    part.rsplit(' ')
                        .next()
                        .and_then(|n| n.parse().ok())
                        .unwrap_or(0)
                })
                .collect()
        };
        let (b, a) = (figures(&before), figures(&after));
        assert!(
            a[0] > b[0] && a[1] >= b[1] + 2 && a[2] > b[2],
            "{before} → {after}"
        );
    }
}
