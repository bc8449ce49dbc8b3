//! Prometheus metrics, served as text at `GET /metrics`, every name prefixed `jssocket_`.
//!
//! Counters on the message path are cloned handles (an `Arc` around an atomic) looked up once
//! per event type at start, so counting costs an atomic add, not a label-map lookup. Gauges
//! that mirror the hub's tables (clients, groups, channels, servers) are read from the hub
//! when scraped instead of being kept in step on every change.

use std::collections::HashMap;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::hub::HubStats;

/// Event types counted under their own label; anything else is counted as `other`.
pub const EVENT_TYPES: &[&str] = &[
    "server_connect",
    "client_connect",
    "client_connected",
    "client_disconnect",
    "notify_client",
    "notify_group",
    "notify_all",
    "subscribe",
    "unsubscribe",
    "publish",
];

/// Kinds of frame sent out, for `messages_sent_total{type}`.
pub const SENT_TYPES: &[&str] = &[
    "server_connect",
    "client_connect",
    "client_connected",
    "notify_client",
    "notify_group",
    "notify_all",
    "publish",
    "subscribed",
    "unsubscribed",
    "callback",
    "error",
];

/// Error codes, for `errors_total{code}`.
pub const ERROR_CODES: &[&str] = &[
    "invalid_json",
    "not_an_object",
    "missing_type",
    "invalid_type",
    "invalid_data",
    "missing_field",
    "invalid_field",
    "forbidden",
    "policy_denied",
    "unknown_target",
    "no_server",
    "invalid_channel",
    "too_many_subscriptions",
    "conflicting_filters",
    "unauthorized",
    "rate_limited",
    "other",
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TypeLabel {
    r#type: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CodeLabel {
    code: &'static str,
}

pub struct Metrics {
    registry: Registry,
    received: HashMap<&'static str, Counter>,
    sent: HashMap<&'static str, Counter>,
    errors: HashMap<&'static str, Counter>,
    pub bytes_received: Counter,
    pub bytes_sent: Counter,
    pub slow_consumer_closes: Counter,
    pub auth_failures: Counter,
    /// Open WebSocket connections.
    pub connections: Gauge,
    /// Connections that proved the admin password.
    pub admins: Gauge,
    /// Time from an event's arrival to its payload being queued for every recipient.
    pub fanout_seconds: Histogram,
    /// Cluster: subscribed to Redis (1) or not (0); live nodes including this one; messages
    /// published to / applied from other nodes; messages dropped on a full backlog.
    pub cluster_connected: Gauge,
    pub cluster_nodes: Gauge,
    pub cluster_published: Counter,
    pub cluster_received: Counter,
    pub cluster_dropped: Counter,
    /// Cluster: bytes waiting to be published (both lanes), and client connects forwarded to
    /// other nodes and not yet settled (see `cluster` on forwards in flight).
    pub cluster_backlog_bytes: Gauge,
    pub cluster_forwards_in_flight: Gauge,
    /// Mirrors of the hub's tables, set when scraped.
    clients: Gauge,
    acknowledged: Gauge,
    servers: Gauge,
    groups: Gauge,
    channels: Gauge,
    pending_connects: Gauge,
    pending_connect_bytes: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("jssocket");
        let received_family = Family::<TypeLabel, Counter>::default();
        let sent_family = Family::<TypeLabel, Counter>::default();
        let errors_family = Family::<CodeLabel, Counter>::default();
        registry.register(
            "messages_received",
            "Messages received, by event type",
            received_family.clone(),
        );
        registry.register(
            "messages_sent",
            "Frames queued to connections, by kind",
            sent_family.clone(),
        );
        registry.register(
            "errors",
            "Error events sent, by code",
            errors_family.clone(),
        );
        let received = labelled(&received_family, EVENT_TYPES, |t| TypeLabel { r#type: t });
        let sent = labelled(&sent_family, SENT_TYPES, |t| TypeLabel { r#type: t });
        let errors = labelled(&errors_family, ERROR_CODES, |c| CodeLabel { code: c });

        let bytes_received = Counter::default();
        registry.register(
            "bytes_received",
            "Bytes of messages received",
            bytes_received.clone(),
        );
        let bytes_sent = Counter::default();
        registry.register(
            "bytes_sent",
            "Bytes of frames queued to connections",
            bytes_sent.clone(),
        );
        let slow_consumer_closes = Counter::default();
        registry.register(
            "slow_consumer_closes",
            "Connections closed because their outbound queue overflowed",
            slow_consumer_closes.clone(),
        );
        let auth_failures = Counter::default();
        registry.register(
            "auth_failures",
            "Admin password verifications that failed or were rate limited",
            auth_failures.clone(),
        );
        let connections = Gauge::default();
        registry.register(
            "connections",
            "Open WebSocket connections",
            connections.clone(),
        );
        let admins = Gauge::default();
        registry.register("admins", "Open admin connections", admins.clone());
        let mut gauge = |name: &str, help: &str| {
            let gauge = Gauge::default();
            registry.register(name, help, gauge.clone());
            gauge
        };
        let clients = gauge("clients", "Registered clients (sent client_connect)");
        let acknowledged = gauge("acknowledged_clients", "Clients acknowledged by a server");
        let servers = gauge("servers", "Admin connections in the server pool");
        let groups = gauge("groups", "Groups with at least one member");
        let channels = gauge("channels", "Channels with at least one subscriber");
        let cluster_connected = gauge(
            "cluster_connected",
            "1 when subscribed to Redis (cluster mode)",
        );
        let cluster_nodes = gauge("cluster_nodes", "Live cluster nodes, this one included");
        let pending_connects = gauge(
            "pending_connects",
            "client_connect messages waiting for a server",
        );
        let pending_connect_bytes = gauge(
            "pending_connect_bytes",
            "Bytes of client_connect messages waiting for a server",
        );
        let cluster_backlog_bytes = gauge(
            "cluster_backlog_bytes",
            "Bytes of messages waiting to be published to the other nodes",
        );
        let cluster_forwards_in_flight = gauge(
            "cluster_forwards_in_flight",
            "client_connect messages forwarded to other nodes and not yet settled",
        );
        let cluster_published = Counter::default();
        registry.register(
            "cluster_published",
            "Messages published to the other nodes",
            cluster_published.clone(),
        );
        let cluster_received = Counter::default();
        registry.register(
            "cluster_received",
            "Messages from other nodes applied here",
            cluster_received.clone(),
        );
        let cluster_dropped = Counter::default();
        registry.register(
            "cluster_dropped",
            "Messages for other nodes dropped because the backlog was full during a Redis outage",
            cluster_dropped.clone(),
        );
        let fanout_seconds = Histogram::new(exponential_buckets(0.000_01, 4.0, 10));
        registry.register(
            "fanout_seconds",
            "Time from an event's arrival to its payload being queued for every recipient",
            fanout_seconds.clone(),
        );
        Metrics {
            registry,
            received,
            sent,
            errors,
            bytes_received,
            bytes_sent,
            slow_consumer_closes,
            auth_failures,
            connections,
            admins,
            fanout_seconds,
            cluster_connected,
            cluster_nodes,
            cluster_published,
            cluster_received,
            cluster_dropped,
            cluster_backlog_bytes,
            cluster_forwards_in_flight,
            clients,
            acknowledged,
            servers,
            groups,
            channels,
            pending_connects,
            pending_connect_bytes,
        }
    }

    pub fn received(&self, kind: &str, bytes: usize) {
        count(&self.received, kind);
        self.bytes_received.inc_by(bytes as u64);
    }

    /// Counts `n` frames of `bytes` each queued as `kind`.
    pub fn sent(&self, kind: &str, n: usize, bytes: usize) {
        if n == 0 {
            return;
        }
        if let Some(counter) = self.sent.get(kind).or_else(|| self.sent.get("error")) {
            counter.inc_by(n as u64);
        }
        self.bytes_sent.inc_by((n * bytes) as u64);
    }

    pub fn error(&self, code: &str) {
        count(&self.errors, code);
    }

    /// The Prometheus text exposition, with the hub's current table sizes.
    pub fn render(&self, stats: HubStats) -> String {
        for (gauge, value) in [
            (&self.clients, stats.clients),
            (&self.acknowledged, stats.acknowledged),
            (&self.servers, stats.servers),
            (&self.groups, stats.groups),
            (&self.channels, stats.channels),
            (&self.pending_connects, stats.pending),
            (&self.pending_connect_bytes, stats.pending_bytes),
        ] {
            gauge.set(i64::try_from(value).unwrap_or(i64::MAX));
        }
        let mut out = String::new();
        if encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

fn labelled<L, F>(
    family: &Family<L, Counter>,
    names: &[&'static str],
    label: F,
) -> HashMap<&'static str, Counter>
where
    L: Clone + std::hash::Hash + Eq + EncodeLabelSet + std::fmt::Debug + Send + Sync + 'static,
    F: Fn(&'static str) -> L,
{
    let mut map: HashMap<&'static str, Counter> = names
        .iter()
        .map(|name| (*name, family.get_or_create_owned(&label(name))))
        .collect();
    map.insert("other", family.get_or_create_owned(&label("other")));
    map
}

fn count(counters: &HashMap<&'static str, Counter>, name: &str) {
    if let Some(counter) = counters.get(name).or_else(|| counters.get("other")) {
        counter.inc();
    }
}
