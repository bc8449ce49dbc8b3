//! The backplane's connection as operators see it: what `/readyz` answers, the
//! `jssocket_redis_*` metrics, and the log lines when it changes.
//!
//! A split cluster is silent otherwise (every node still serves its own connections), so
//! the first failure and every change (connected, subscribed, lost, back) is logged at
//! warn/info with the URL, its password redacted. Failures while Redis stays down (the
//! subscriber retries every second) are counted and summed up once a minute, not logged
//! each time. Readiness reads the state kept here: no round trip to Redis per probe.

use std::fmt::Display;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use tracing::{info, warn};

use crate::metrics::Metrics;

/// While Redis stays down, the failures are summed up this often.
const STILL_DOWN_EVERY: Duration = Duration::from_secs(60);

/// The subscriber's connection to the backplane, as last seen.
#[derive(Default)]
pub(super) struct Health {
    /// The URL as it may be shown (see [`super::redis::redacted`]), and the secrets its text
    /// must never show; set when the node starts.
    url: OnceLock<Shown>,
    state: Mutex<State>,
    /// The publisher's last failure (scrubbed) and when, cleared by its next success. A
    /// failure after the subscription was made means the node is cut off even though its
    /// subscription looks alive (a silent partition): not ready.
    publish_error: Mutex<Option<(String, Instant)>>,
}

struct Shown {
    url: String,
    secrets: Vec<String>,
}

#[derive(Default)]
enum State {
    /// Nothing tried yet.
    #[default]
    Starting,
    /// Connected; subscribing.
    Connected,
    /// Subscribed to everything this node needs (since then): ready.
    Subscribed(Instant),
    /// The last attempt failed, or the subscription was lost.
    Down {
        error: String,
        since: Instant,
        /// Failed attempts since it went down.
        failures: u64,
        /// When the failures were last logged.
        logged: Instant,
    },
}

impl Health {
    /// `url`: `--redis-url`, or `None` for a backplane that is not Redis (the loopback).
    pub(super) fn start(&self, url: Option<&str>) {
        let shown = match url {
            Some(url) => Shown {
                url: super::redis::redacted(url),
                secrets: super::redis::secrets(url),
            },
            None => Shown {
                url: "loopback".into(),
                secrets: Vec::new(),
            },
        };
        let _ = self.url.set(shown);
    }

    fn url(&self) -> &str {
        self.url.get().map_or("redis", |shown| &shown.url)
    }

    /// `error` as text that may be shown: the URL's secrets scrubbed, in case the Redis
    /// client echoed them.
    fn scrub(&self, error: &dyn Display) -> String {
        let mut text = error.to_string();
        for secret in self.url.get().map_or(&[][..], |shown| &shown.secrets) {
            text = text.replace(secret.as_str(), "***");
        }
        text
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Why this node cannot do its job as a cluster member now; `None` when subscribed.
    pub(super) fn not_ready(&self) -> Option<String> {
        let publish_error = self
            .publish_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        match &*self.state() {
            State::Subscribed(since) => match publish_error {
                Some((error, at)) if at > *since => {
                    Some(format!("redis: cannot publish to {}: {error}", self.url()))
                }
                _ => None,
            },
            State::Starting => Some(format!("redis: connecting to {}", self.url())),
            State::Connected => Some("redis: not subscribed yet".into()),
            State::Down { error, .. } => {
                Some(format!("redis unreachable: {}: {error}", self.url()))
            }
        }
    }

    /// The subscriber's connection is open.
    pub(super) fn connected(&self, metrics: &Metrics) {
        metrics.redis_connected.set(1);
        let mut state = self.state();
        if let State::Down {
            since, failures, ..
        } = &*state
        {
            info!(
                url = self.url(),
                down_seconds = since.elapsed().as_secs(),
                failures,
                "redis reachable; subscribing"
            );
        }
        *state = State::Connected;
    }

    /// Subscribed to everything: ready.
    pub(super) fn subscribed(&self, node: &str) {
        *self.state() = State::Subscribed(Instant::now());
        info!(url = self.url(), node, "redis connected and subscribed");
    }

    /// An attempt to connect or subscribe failed (`what` failed with `error`).
    pub(super) fn failed(&self, metrics: &Metrics, what: &str, error: &dyn Display) {
        metrics.redis_errors.inc();
        metrics.redis_connected.set(0);
        let error = self.scrub(error);
        let mut state = self.state();
        match &mut *state {
            State::Down {
                error: last,
                since,
                failures,
                logged,
            } => {
                *failures += 1;
                *last = error;
                if logged.elapsed() >= STILL_DOWN_EVERY {
                    *logged = Instant::now();
                    warn!(
                        url = self.url(),
                        error = %last,
                        failures,
                        down_seconds = since.elapsed().as_secs(),
                        "redis still unreachable; retrying every second (the cluster is split: \
                         this node serves only its own connections)"
                    );
                }
            }
            _ => {
                warn!(
                    url = self.url(),
                    %error,
                    "redis unreachable: cannot {what}; retrying every second (the cluster is \
                     split: this node serves only its own connections)"
                );
                let now = Instant::now();
                *state = State::Down {
                    error,
                    since: now,
                    failures: 1,
                    logged: now,
                };
            }
        }
    }

    /// The publisher failed to connect or publish.
    pub(super) fn publish_failed(&self, metrics: &Metrics, error: &dyn Display) {
        metrics.redis_errors.inc();
        let error = self.scrub(error);
        *self.publish_error.lock().unwrap_or_else(|e| e.into_inner()) =
            Some((error, Instant::now()));
    }

    /// The publisher published.
    pub(super) fn published(&self) {
        let mut last = self.publish_error.lock().unwrap_or_else(|e| e.into_inner());
        if last.is_some() {
            *last = None;
        }
    }

    /// The connection (and every subscription with it) ended, or went silent (`why`).
    pub(super) fn lost(&self, metrics: &Metrics, why: &str) {
        metrics.redis_errors.inc();
        metrics.redis_connected.set(0);
        let mut state = self.state();
        if matches!(&*state, State::Down { .. }) {
            return;
        }
        warn!(
            url = self.url(),
            "redis connection lost ({why}); reconnecting"
        );
        let now = Instant::now();
        *state = State::Down {
            error: format!("connection lost ({why})"),
            since: now,
            failures: 1,
            logged: now,
        };
    }
}
