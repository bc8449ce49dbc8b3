//! Overload protection: when more comes in than the runtime's threads can handle, those who
//! only receive (a bystander notified by its backend) and the backends themselves are served
//! first, and the crowd sending waits.
//!
//! Without it, a flood from thousands of connections keeps thousands of connection tasks
//! runnable; tokio schedules fairly, so the path of a bystander's notification (a Redis
//! subscriber task, then the bystander's own task) waits behind a whole round of them each
//! step of the way.
//!
//! A monitor task measures how late a short sleep wakes up: the runtime's scheduling lag.
//! When it stays over `--overload-lag`, every message from a connection that no backend has
//! acknowledged (and that is not an admin) must take a permit from a global limiter before it
//! is read. Acknowledged clients are never held back: a backend vouched for them, and every
//! flood of the attacks this guards against comes from connections nobody vouched for. Permits come in each tick, fewer while
//! the lag persists and more as it clears (AIMD), until it has stayed clear a while. A
//! connection waiting for one is asleep, not runnable; it reads nothing more meanwhile, so
//! its peer's bytes stay in the kernel and TCP pushes back on the peer. Its writer still
//! runs (it is the same task's other half), so what it receives is not held up. Admins and
//! the cluster's own tasks never take permits. Control frames (a pong) need no permit of
//! their own, and a connection waiting for one is not taken for dead by the keepalive. Lag
//! that lasts with the rate at its minimum is not the clients' doing, so the limiter then
//! gives up for a while rather than hold them back for nothing.
//!
//! The message path costs one relaxed load when not overloaded, and a semaphore acquire
//! (FIFO, constant time) when it is; no lock is held across an await.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::Semaphore;
use tracing::debug;

use crate::metrics::Metrics;
use crate::relay::Relay;

/// How often the monitor measures the lag, and hands out permits while overloaded.
const TICK: Duration = Duration::from_millis(10);
/// tokio's timer fires on whole milliseconds, after the deadline: up to this much late on an
/// idle runtime, which is not lag.
const TIMER_GRAIN: Duration = Duration::from_millis(1);
/// Ticks in a row over the limit before the limiter engages: a single late wake-up (another
/// process took the CPU for a moment) is not an overload.
const ENTER_TICKS: u32 = 3;
/// Ticks in a row under half the limit before the limiter lets everyone go again.
const CALM_TICKS: u32 = 20;
/// Messages admitted per tick when the limiter engages (the rate it starts from).
const START_RATE: usize = 32;
/// The rate never drops below this, so every sender keeps making progress (a connection
/// waiting longer than `--ping-timeout` would be taken for dead).
const MIN_RATE: usize = 8;
/// Nor grows above this (it is left when the lag clears anyway).
const MAX_RATE: usize = 8192;
/// What a calm tick adds to the rate (a lagging one halves it).
const RATE_STEP: usize = 8;
/// Permits handed out when the limiter lets go: enough for every waiter to pass at once.
const OPEN: usize = Semaphore::MAX_PERMITS / 2;
/// Lag that persists this long with the rate at its minimum is not the clients' doing (a
/// neighbour on the machine, a huge broadcast): holding them back would not help, so the
/// limiter lets go and stays off for [`COOL_DOWN`].
const GIVE_UP: Duration = Duration::from_secs(5);
const COOL_DOWN: Duration = Duration::from_secs(30);

/// The limiter; one per server.
#[derive(Debug)]
pub struct Overload {
    /// Scheduling lag over which the limiter engages; `None`: never (`--overload-lag 0`).
    lag_limit: Option<Duration>,
    /// The fast path's only check.
    engaged: AtomicBool,
    /// Permits of the current tick; waiters are served first come, first served.
    permits: Semaphore,
    /// `jssocket_overloaded`: 1 while the limiter is engaged.
    gauge: Gauge,
    /// Messages that had to wait for a permit.
    throttled: Counter,
}

impl Overload {
    pub fn new(lag_limit: Option<Duration>, metrics: &Metrics) -> Overload {
        Overload {
            lag_limit,
            engaged: AtomicBool::new(false),
            permits: Semaphore::new(0),
            gauge: metrics.overloaded.clone(),
            throttled: metrics.overload_throttled.clone(),
        }
    }

    /// Whether messages from unacknowledged connections wait for permits now.
    pub fn engaged(&self) -> bool {
        self.engaged.load(Ordering::Relaxed)
    }

    /// Waits, while the server is overloaded, for a permit to handle one message from an
    /// unacknowledged connection. Returns at once otherwise.
    pub async fn admit(&self) {
        if !self.engaged.load(Ordering::Relaxed) {
            return;
        }
        match self.permits.try_acquire() {
            Ok(permit) => permit.forget(),
            Err(_) => {
                self.throttled.inc();
                // Never closed, so this only fails if it were; then nothing is held up.
                if let Ok(permit) = self.permits.acquire().await {
                    permit.forget();
                }
            }
        }
    }

    fn engage(&self, rate: usize) {
        // Whatever the last release left over would let the crowd through.
        self.permits
            .forget_permits(self.permits.available_permits());
        self.engaged.store(true, Ordering::Relaxed);
        self.gauge.set(1);
        self.permits.add_permits(rate);
    }

    /// Tops the permits of this tick up to `rate` (unused ones carry over, up to `rate`).
    fn refill(&self, rate: usize) {
        let available = self.permits.available_permits();
        if available < rate {
            self.permits.add_permits(rate - available);
        }
    }

    fn release(&self) {
        self.engaged.store(false, Ordering::Relaxed);
        self.gauge.set(0);
        let available = self.permits.available_permits();
        self.permits.add_permits(OPEN.saturating_sub(available));
    }
}

/// Measures the runtime's scheduling lag every [`TICK`], engages and releases the limiter,
/// and hands out its permits, until the server shuts down.
pub async fn monitor(shared: Arc<Relay>) {
    let overload = &shared.overload;
    let Some(limit) = overload.lag_limit else {
        return;
    };
    let mut rate = START_RATE;
    let mut late = 0;
    let mut calm = 0;
    // Since when the lag has lasted with the rate at its minimum; and until when the limiter
    // stays off after giving up.
    let mut stuck_since: Option<Instant> = None;
    let mut cool_until: Option<Instant> = None;
    loop {
        let start = Instant::now();
        tokio::select! {
            () = tokio::time::sleep(TICK) => {}
            () = shared.shutdown.cancelled() => return overload.release(),
        }
        let elapsed = start.elapsed();
        let lag = elapsed.saturating_sub(TICK + TIMER_GRAIN);
        let lagging = lag > limit;
        // Rates are per tick of TICK: a late tick hands out for the time it really took, so
        // the minimum is a rate per second, however late the ticks come.
        let ticks = (elapsed.as_micros() / TICK.as_micros()).clamp(1, 100) as usize;
        if !overload.engaged.load(Ordering::Relaxed) {
            if cool_until.is_some_and(|until| Instant::now() < until) {
                continue;
            }
            late = if lagging { late + 1 } else { 0 };
            if late >= ENTER_TICKS {
                late = 0;
                calm = 0;
                stuck_since = None;
                rate = START_RATE;
                overload.engage(rate);
                crate::warn_throttled!(
                    lag_ms = lag.as_millis() as u64,
                    "overloaded: messages from clients are throttled until the lag clears"
                );
            }
            continue;
        }
        if lagging {
            rate = (rate / 2).max(MIN_RATE);
            calm = 0;
        } else {
            rate = (rate + RATE_STEP).min(MAX_RATE);
            calm = if lag <= limit / 2 { calm + 1 } else { 0 };
        }
        stuck_since = match (lagging && rate == MIN_RATE, stuck_since) {
            (false, _) => None,
            (true, None) => Some(Instant::now()),
            (true, since) => since,
        };
        if stuck_since.is_some_and(|since| since.elapsed() >= GIVE_UP) {
            overload.release();
            cool_until = Some(Instant::now() + COOL_DOWN);
            crate::warn_throttled!(
                lag_ms = lag.as_millis() as u64,
                "still lagging with clients held back: the lag is not theirs; throttle off for 30 s"
            );
            continue;
        }
        if calm >= CALM_TICKS {
            overload.release();
            debug!("no longer overloaded: messages from clients flow freely again");
            continue;
        }
        overload.refill((rate * ticks).min(MAX_RATE));
    }
}
