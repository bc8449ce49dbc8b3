//! Prometheus metrics, served as text at `GET /metrics`, every name prefixed `jssocket_`.
//!
//! The registry encodes OpenMetrics; most scrapers and `promtool` expect the classic
//! Prometheus text format (`text/plain; version=0.0.4`), where a counter's `# TYPE` line names
//! the `_total` sample itself and there is no `# EOF`. So the classic format is served unless
//! the scraper's `Accept` asks for OpenMetrics ([`Format::from_accept`]), and it is derived
//! from the OpenMetrics text by [`to_classic`].
//!
//! Counters on the message path are cloned handles (an `Arc` around an atomic) looked up once
//! per event type at start, so counting costs an atomic add, not a label-map lookup. Gauges
//! that mirror the hub's tables (clients, groups, channels, servers) are read from the hub
//! when scraped instead of being kept in step on every change.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::hub::HubStats;
use crate::kinds::{Code, Event, Frame, HubKind};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TypeLabel {
    r#type: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CodeLabel {
    code: &'static str,
}

/// The admin password verifier's own numbers; the authenticator holds a clone.
#[derive(Clone, Debug, Default)]
pub struct AuthMetrics {
    /// Verifications waiting for a bcrypt worker.
    pub waiting: Gauge,
    /// bcrypt runs (a remembered or known-wrong password, or a withdrawn request, costs none).
    pub verifications: Counter,
    /// Verifications refused because too many were waiting ("busy, retry").
    pub busy: Counter,
}

pub struct Metrics {
    registry: Registry,
    /// By [`Event::index`]; the last one is `other`.
    received: Vec<Counter>,
    /// By [`Frame::index`].
    sent: Vec<Counter>,
    /// By [`Code::index`].
    errors: Vec<Counter>,
    pub bytes_received: Counter,
    pub bytes_sent: Counter,
    pub slow_consumer_closes: Counter,
    pub auth_failures: Counter,
    pub auth: AuthMetrics,
    /// Open WebSocket connections.
    pub connections: Gauge,
    /// Of them, SignalR connections past their handshake.
    pub signalr_connections: Gauge,
    /// By [`HubKind::index`]: hub messages SignalR clients sent, and those written to them.
    signalr_received: Vec<Counter>,
    signalr_sent: Vec<Counter>,
    /// Open TCP connections of every kind (plain HTTP included), for `--max-tcp-connections`.
    pub tcp_connections: Gauge,
    /// Connections that proved the admin password.
    pub admins: Gauge,
    /// Time from an event's arrival to its payload being queued for every recipient.
    pub fanout_seconds: Histogram,
    /// Cluster: subscribed to Redis (1) or not (0); live nodes including this one; messages
    /// published to / applied from other nodes; messages dropped on a full backlog.
    pub cluster_connected: Gauge,
    /// Readiness as `/readyz` answers it (set when scraped); the backplane's connection to
    /// Redis (1 while open); failed Redis connects, subscribes, publishes and lost connections.
    pub ready: Gauge,
    pub redis_connected: Gauge,
    pub redis_errors: Counter,
    pub cluster_nodes: Gauge,
    /// Servers on the other live nodes, which this node's client connects may be forwarded to.
    pub cluster_remote_servers: Gauge,
    /// Replies (`client_connected`, `subscribed`, …) waiting for their topic's subscription.
    pub cluster_held_replies: Gauge,
    pub cluster_published: Counter,
    pub cluster_received: Counter,
    /// Deliveries (notifies, publishes, acknowledgements) received from the backplane, this
    /// node's own echoes included: what routing keeps to the nodes concerned.
    pub cluster_deliveries_received: Counter,
    pub cluster_dropped: Counter,
    /// `invoke_result`s for no call in flight (late, repeated, or for another connection).
    pub invoke_results_dropped: Counter,
    /// Calls answered `timeout` because no server answered in time.
    pub invoke_timeouts: Counter,
    /// The memory budget (`--max-memory`) and what is charged against it: bytes in outbound
    /// queues and in unfinished inbound messages (kept in step by `memory::Memory`, which
    /// uses these gauges as its counters); connections closed or pushes refused for it.
    pub memory_budget_bytes: Gauge,
    pub memory_outbound_bytes: Gauge,
    pub memory_inbound_bytes: Gauge,
    /// Bytes the WebSocket reader keeps after a big message (see `memory::RETAINED_FROM`).
    pub memory_retained_bytes: Gauge,
    pub memory_pressure_closes: Counter,
    /// 1 while the overload limiter holds clients' messages back (see `overload`).
    pub overloaded: Gauge,
    pub overload_throttled: Counter,
    /// Cluster: bytes waiting to be published (both lanes), and client connects forwarded to
    /// other nodes and not yet settled (see `cluster` on forwards in flight).
    pub cluster_backlog_bytes: Gauge,
    pub cluster_forwards_in_flight: Gauge,
    /// Channel history (see `history`): bytes and channels kept, publications stamped,
    /// channels evicted for room.
    pub history: crate::history::HistoryMetrics,
    /// TLS (`--tls-cert`): failed handshakes, certificate reloads, a reload failing.
    pub tls: crate::tls::TlsMetrics,
    /// Mirrors of the hub's tables, set when scraped.
    clients: Gauge,
    acknowledged: Gauge,
    servers: Gauge,
    groups: Gauge,
    channels: Gauge,
    pending_connects: Gauge,
    pending_connect_bytes: Gauge,
    /// Seconds since this process started, set when scraped (the web console's overview
    /// shows it; a clock on the server, so a browser's wrong clock does not matter).
    uptime_seconds: Gauge,
    started: std::time::Instant,
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
        let event_names = Event::ALL.iter().map(|e| e.name()).chain(["other"]);
        let received = labelled(&received_family, event_names, |t| TypeLabel { r#type: t });
        let frame_names = Frame::ALL.iter().map(|f| f.name());
        let sent = labelled(&sent_family, frame_names, |t| TypeLabel { r#type: t });
        let code_names = Code::ALL.iter().map(|c| c.name());
        let errors = labelled(&errors_family, code_names, |c| CodeLabel { code: c });

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
            "Admin passwords refused as wrong",
            auth_failures.clone(),
        );
        let auth = AuthMetrics::default();
        registry.register(
            "auth_queue",
            "Admin password verifications waiting for a bcrypt worker",
            auth.waiting.clone(),
        );
        registry.register(
            "auth_verifications",
            "bcrypt runs verifying an admin password",
            auth.verifications.clone(),
        );
        registry.register(
            "auth_busy",
            "Admin password verifications refused because too many were waiting",
            auth.busy.clone(),
        );
        let connections = Gauge::default();
        registry.register(
            "connections",
            "Open WebSocket connections",
            connections.clone(),
        );
        let signalr_connections = Gauge::default();
        registry.register(
            "signalr_connections",
            "Open SignalR connections (past their handshake), counted in connections too",
            signalr_connections.clone(),
        );
        let signalr_received_family = Family::<TypeLabel, Counter>::default();
        let signalr_sent_family = Family::<TypeLabel, Counter>::default();
        registry.register(
            "signalr_messages_received",
            "SignalR hub messages received, by type",
            signalr_received_family.clone(),
        );
        registry.register(
            "signalr_messages_sent",
            "SignalR hub messages written to SignalR connections, by type",
            signalr_sent_family.clone(),
        );
        let hub_kinds = || HubKind::ALL.iter().map(|k| k.name());
        let signalr_received = labelled(&signalr_received_family, hub_kinds(), |t| TypeLabel {
            r#type: t,
        });
        let signalr_sent = labelled(&signalr_sent_family, hub_kinds(), |t| TypeLabel {
            r#type: t,
        });
        let tcp_connections = Gauge::default();
        registry.register(
            "tcp_connections",
            "Open TCP connections of every kind, plain HTTP included",
            tcp_connections.clone(),
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
        let uptime_seconds = gauge("uptime_seconds", "Seconds since this process started");
        let cluster_connected = gauge(
            "cluster_connected",
            "1 when subscribed to Redis (cluster mode)",
        );
        let ready = gauge(
            "ready",
            "1 when /readyz answers 200: listening, not draining, and (cluster mode) subscribed",
        );
        let redis_connected = gauge(
            "redis_connected",
            "1 while the connection to Redis is open (cluster mode)",
        );
        let cluster_nodes = gauge("cluster_nodes", "Live cluster nodes, this one included");
        let cluster_remote_servers = gauge(
            "cluster_remote_servers",
            "Servers in the pools of the other live nodes",
        );
        let cluster_held_replies = gauge(
            "cluster_held_replies",
            "Replies waiting until this node receives their group's or channel's messages",
        );
        let pending_connects = gauge(
            "pending_connects",
            "client_connect messages waiting for a server",
        );
        let memory_budget_bytes = gauge(
            "memory_budget_bytes",
            "Memory budget for outbound queues and unfinished inbound messages (--max-memory)",
        );
        let memory_outbound_bytes = gauge(
            "memory_outbound_bytes",
            "Bytes waiting in outbound queues, charged to the memory budget",
        );
        let memory_inbound_bytes = gauge(
            "memory_inbound_bytes",
            "Bytes of inbound messages begun but not yet complete, charged to the memory budget",
        );
        let memory_retained_bytes = gauge(
            "memory_retained_bytes",
            "Bytes connections' read buffers keep after a big message (the biggest frame each received), charged to the memory budget",
        );
        let overloaded = gauge(
            "overloaded",
            "1 while the runtime lags (--overload-lag) and messages from non-admin connections are throttled",
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
        let history = crate::history::HistoryMetrics {
            bytes: gauge(
                "history_bytes",
                "Bytes of publications kept as channel history (--history-memory bounds it)",
            ),
            channels: gauge("history_channels", "Channels with history on this node"),
            ..Default::default()
        };
        registry.register(
            "history_publications",
            "Publications stamped with an offset and kept as channel history",
            history.publications.clone(),
        );
        registry.register(
            "history_lost",
            "Publications to channels with history that Redis could not stamp, so not delivered (cluster)",
            history.lost.clone(),
        );
        registry.register(
            "history_evicted_channels",
            "Channels whose history was dropped to make room for another (over the channel bound)",
            history.evicted_channels.clone(),
        );
        let memory_pressure_closes = Counter::default();
        registry.register(
            "memory_pressure_closes",
            "Connections closed (biggest consumers first), or frames refused, because the memory budget was exceeded",
            memory_pressure_closes.clone(),
        );
        let redis_errors = Counter::default();
        registry.register(
            "redis_errors",
            "Failed connections, subscriptions and publications to Redis, and lost connections",
            redis_errors.clone(),
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
            "Messages received from the backplane, of every kind (heartbeats, own echoes included)",
            cluster_received.clone(),
        );
        let cluster_deliveries_received = Counter::default();
        registry.register(
            "cluster_deliveries_received",
            "Deliveries received from the backplane (routing: only by the nodes concerned)",
            cluster_deliveries_received.clone(),
        );
        let cluster_dropped = Counter::default();
        registry.register(
            "cluster_dropped",
            "Messages for other nodes dropped because the backlog was full during a Redis outage",
            cluster_dropped.clone(),
        );
        let invoke_results_dropped = Counter::default();
        registry.register(
            "invoke_results_dropped",
            "invoke_result answers for no call in flight (late, repeated, or another connection's)",
            invoke_results_dropped.clone(),
        );
        let invoke_timeouts = Counter::default();
        registry.register(
            "invoke_timeouts",
            "Client calls answered with a timeout error because no server answered in time",
            invoke_timeouts.clone(),
        );
        let fanout_seconds = Histogram::new(exponential_buckets(0.000_01, 4.0, 10));
        registry.register(
            "fanout_seconds",
            "Time from an event's arrival to its payload being queued for every recipient",
            fanout_seconds.clone(),
        );
        let overload_throttled = Counter::default();
        registry.register(
            "overload_throttled_messages",
            "Messages from non-admin connections that waited for the overload limiter",
            overload_throttled.clone(),
        );
        let tls = crate::tls::TlsMetrics::default();
        registry.register(
            "tls_handshake_failures",
            "TLS handshakes that failed or timed out (plain HTTP to the TLS port, scanners, silent peers)",
            tls.handshake_failures.clone(),
        );
        registry.register(
            "tls_reloads",
            "Times the certificate files changed and were loaded",
            tls.reloads.clone(),
        );
        registry.register(
            "tls_reload_failing",
            "1 while the certificate files on disk cannot be loaded and the previous certificate is served",
            tls.reload_failing.clone(),
        );
        Metrics {
            registry,
            tls,
            received,
            sent,
            errors,
            bytes_received,
            bytes_sent,
            slow_consumer_closes,
            auth_failures,
            auth,
            connections,
            signalr_connections,
            signalr_received,
            signalr_sent,
            tcp_connections,
            admins,
            fanout_seconds,
            cluster_connected,
            ready,
            redis_connected,
            redis_errors,
            cluster_nodes,
            cluster_remote_servers,
            cluster_held_replies,
            cluster_published,
            cluster_received,
            cluster_deliveries_received,
            cluster_dropped,
            invoke_results_dropped,
            invoke_timeouts,
            memory_budget_bytes,
            memory_outbound_bytes,
            memory_inbound_bytes,
            memory_retained_bytes,
            memory_pressure_closes,
            overloaded,
            overload_throttled,
            cluster_backlog_bytes,
            cluster_forwards_in_flight,
            uptime_seconds,
            started: std::time::Instant::now(),
            history,
            clients,
            acknowledged,
            servers,
            groups,
            channels,
            pending_connects,
            pending_connect_bytes,
        }
    }

    /// Counts a message received: `None` is an unknown or unreadable type (`other`).
    pub fn received(&self, kind: Option<Event>, bytes: usize) {
        let index = kind.map_or(Event::ALL.len(), Event::index);
        if let Some(counter) = self.received.get(index) {
            counter.inc();
        }
        self.bytes_received.inc_by(bytes as u64);
    }

    /// Counts `n` frames of `bytes` each queued as `kind`.
    pub fn sent(&self, kind: Frame, n: usize, bytes: usize) {
        if n == 0 {
            return;
        }
        if let Some(counter) = self.sent.get(kind.index()) {
            counter.inc_by(n as u64);
        }
        self.bytes_sent.inc_by((n * bytes) as u64);
    }

    /// Counts a hub message of `bytes` received from a SignalR client.
    pub fn signalr_received(&self, kind: HubKind, bytes: usize) {
        if let Some(counter) = self.signalr_received.get(kind.index()) {
            counter.inc();
        }
        self.bytes_received.inc_by(bytes as u64);
    }

    /// Counts a hub message written to a SignalR connection.
    pub fn signalr_sent(&self, kind: HubKind) {
        if let Some(counter) = self.signalr_sent.get(kind.index()) {
            counter.inc();
        }
    }

    pub fn error(&self, code: Code) {
        if let Some(counter) = self.errors.get(code.index()) {
            counter.inc();
        }
    }

    /// The text exposition in `format`, with the hub's current table sizes.
    pub fn render(&self, stats: HubStats, format: Format) -> String {
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
        let uptime = self.started.elapsed().as_secs();
        self.uptime_seconds
            .set(i64::try_from(uptime).unwrap_or(i64::MAX));
        let mut out = String::new();
        if encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        match format {
            Format::OpenMetrics => out,
            Format::Classic => to_classic(&out),
        }
    }
}

/// The two text formats `/metrics` speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Prometheus text format 0.0.4: what `promtool check metrics` and classic parsers read.
    Classic,
    /// OpenMetrics 1.0, for scrapers that ask for it.
    OpenMetrics,
}

impl Format {
    /// OpenMetrics when the `Accept` header names it (as Prometheus does when it prefers
    /// it), else the classic format.
    pub fn from_accept(accept: Option<&str>) -> Format {
        let wants_openmetrics = accept.is_some_and(|accept| {
            accept.split(',').any(|range| {
                let mut params = range.split(';');
                let media = params.next().unwrap_or("").trim();
                // `q=0` means "not acceptable".
                let refused = params.any(|p| {
                    p.trim()
                        .strip_prefix("q=")
                        .is_some_and(|q| q.trim().parse::<f32>().is_ok_and(|q| q <= 0.0))
                });
                media.eq_ignore_ascii_case("application/openmetrics-text") && !refused
            })
        });
        if wants_openmetrics {
            Format::OpenMetrics
        } else {
            Format::Classic
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Format::Classic => "text/plain; version=0.0.4; charset=utf-8",
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
        }
    }
}

/// Rewrites OpenMetrics text as classic Prometheus text: a counter family `x` becomes
/// `x_total` in its `# HELP`/`# TYPE` lines (its samples already carry the suffix), `# UNIT`
/// and `# EOF` lines go, and `_created` samples of counters are dropped.
pub fn to_classic(openmetrics: &str) -> String {
    let counters: Vec<&str> = openmetrics
        .lines()
        .filter_map(|line| {
            let rest = line.strip_prefix("# TYPE ")?;
            let (name, kind) = rest.split_once(' ')?;
            (kind.trim() == "counter").then_some(name)
        })
        .collect();
    let is_counter = |name: &str| counters.contains(&name);
    let mut out = String::with_capacity(openmetrics.len() + counters.len() * 16);
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let described = ["# HELP ", "# TYPE "]
            .into_iter()
            .find_map(|prefix| Some((prefix, line.strip_prefix(prefix)?)));
        if let Some((prefix, rest)) = described {
            let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
            out.push_str(prefix);
            out.push_str(name);
            if is_counter(name) {
                out.push_str("_total");
            }
            if !tail.is_empty() {
                out.push(' ');
                out.push_str(tail);
            }
            out.push('\n');
            continue;
        }
        let name = line.split(['{', ' ']).next().unwrap_or("");
        if name.strip_suffix("_created").is_some_and(&is_counter) {
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// One counter per name, in the names' order, each made (so scraped as 0) at start.
fn labelled<L, F>(
    family: &Family<L, Counter>,
    names: impl Iterator<Item = &'static str>,
    label: F,
) -> Vec<Counter>
where
    L: Clone + std::hash::Hash + Eq + EncodeLabelSet + std::fmt::Debug + Send + Sync + 'static,
    F: Fn(&'static str) -> L,
{
    names
        .map(|name| family.get_or_create_owned(&label(name)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_picks_the_format() {
        assert_eq!(Format::from_accept(None), Format::Classic);
        assert_eq!(Format::from_accept(Some("*/*")), Format::Classic);
        assert_eq!(
            Format::from_accept(Some("text/plain;version=0.0.4;q=0.5,*/*;q=0.1")),
            Format::Classic
        );
        // What Prometheus sends when it prefers OpenMetrics.
        assert_eq!(
            Format::from_accept(Some(
                "application/openmetrics-text;version=1.0.0,application/openmetrics-text;\
                 version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
            )),
            Format::OpenMetrics
        );
        assert_eq!(
            Format::from_accept(Some("application/openmetrics-text;q=0, text/plain")),
            Format::Classic
        );
    }

    #[test]
    fn classic_text_names_counters_by_their_samples() {
        let metrics = Metrics::new();
        metrics.received(Some(Event::NotifyAll), 10);
        let stats = HubStats {
            clients: 1,
            acknowledged: 0,
            groups: 0,
            channels: 0,
            servers: 0,
            pending: 0,
            pending_bytes: 0,
        };
        let open = metrics.render(stats, Format::OpenMetrics);
        assert!(open.ends_with("# EOF\n"));
        assert!(open.contains("# TYPE jssocket_bytes_received counter\n"));
        let classic = metrics.render(stats, Format::Classic);
        assert!(!classic.contains("# EOF"));
        assert!(classic.contains("# TYPE jssocket_bytes_received_total counter\n"));
        assert!(classic.contains("# HELP jssocket_bytes_received_total "));
        assert!(classic.contains("jssocket_bytes_received_total 10\n"));
        assert!(classic.contains("# TYPE jssocket_clients gauge\n"));
        assert!(classic.contains("# TYPE jssocket_fanout_seconds histogram\n"));
        // Every TYPE line names samples that exist.
        for line in classic.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let name = rest.split(' ').next().unwrap_or("");
                assert!(
                    classic
                        .lines()
                        .any(|l| !l.starts_with('#') && l.starts_with(name)),
                    "{name} has no samples"
                );
            }
        }
    }
}
