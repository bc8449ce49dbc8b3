//! The Redis backplane: several jssocket nodes behind one load balancer act as one relay.
//!
//! Every node publishes what other nodes must act on to one Redis Pub/Sub channel and applies
//! what the others publish to its own connections. A connection lives on exactly one node,
//! and a node ignores its own messages, so every delivery happens exactly once:
//! - `notify_all`, `notify_group`, `publish`: the origin delivers locally and publishes; every
//!   other node delivers to its own members.
//! - `notify_client`, `client_connected` to a client that is not local: published; the node
//!   that has the client delivers (the others find nothing).
//! - `notify_group` to a connection id that is not local: published as `NotifyGroupOf`; the
//!   node that has that connection resolves its group and publishes a `NotifyGroup`.
//! - `client_connect` on a node with no server: forwarded to a server on another node, round
//!   robin over the servers the other nodes announce in their heartbeats.
//!
//! Heartbeats (every second, and at once when a node's server pool changes) carry each node's
//! server list; a node whose heartbeat stops for [`NODE_EXPIRY`] is forgotten, with its
//! servers. Redis going away: local delivery goes on; what must cross nodes waits in a bounded
//! queue and is published when Redis is back and the other nodes have re-subscribed.

mod wire;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TrySendError;
use tokio_tungstenite::tungstenite::Utf8Bytes;
use tracing::{debug, info, warn};

use crate::hub::{Acknowledgement, Peer};
use crate::protocol::ProtocolError;
use crate::server::Shared;
pub use wire::Op;
use wire::Wire;

/// The Pub/Sub channel every node uses.
pub const CHANNEL: &str = "jssocket:relay";
/// How often a node announces itself and its servers.
const HEARTBEAT: Duration = Duration::from_secs(1);
/// A node not heard from for this long is gone, and its servers with it.
pub const NODE_EXPIRY: Duration = Duration::from_millis(3500);
/// Messages waiting to be published while Redis is away; beyond this the newest are dropped
/// (and counted), so an outage costs bounded memory.
const BACKLOG: usize = 100_000;
/// Bytes of notifications waiting to be published (a flood, or a Redis outage); beyond
/// this the newest are dropped and counted.
const BACKLOG_BYTES: usize = 64 * 1024 * 1024;
/// After reconnecting, how long to wait for the other nodes to re-subscribe before
/// publishing what waited, so it is not lost on them.
const RESUBSCRIBE_WAIT: Duration = Duration::from_secs(3);

/// This node's view of the cluster.
pub struct Cluster {
    /// This node's id, random per start.
    pub node: String,
    client: redis::Client,
    outbox: mpsc::Sender<String>,
    /// Taken by the publisher task when it starts.
    outbox_rx: Mutex<Option<mpsc::Receiver<String>>>,
    /// Other nodes: their servers and when they were last heard from.
    nodes: Mutex<HashMap<String, RemoteNode>>,
    /// Round-robin cursor over the other nodes' servers.
    next_server: AtomicUsize,
    /// Subscribed to Redis right now.
    pub connected: AtomicBool,
    /// Bytes of messages waiting for the publisher.
    backlog_bytes: AtomicUsize,
    /// Sequence number of the next message this node publishes. A publish whose reply was
    /// lost is sent again with the same number, and receivers drop what they have seen.
    next_seq: AtomicU64,
    /// Highest sequence number applied from each other node.
    last_seq: Mutex<HashMap<String, u64>>,
    /// Other nodes alive when the subscription was last lost. An outage longer than
    /// [`NODE_EXPIRY`] makes this node forget them; after it, the backlog must still wait for
    /// them to re-subscribe.
    known_before_outage: AtomicUsize,
}

struct RemoteNode {
    servers: Vec<String>,
    seen: Instant,
}

impl Cluster {
    /// Checks the URL; connects only when [`start`] runs.
    pub fn new(url: &str) -> redis::RedisResult<Cluster> {
        let client = redis::Client::open(url)?;
        let (outbox, rx) = mpsc::channel(BACKLOG);
        Ok(Cluster {
            node: uuid::Uuid::new_v4().hyphenated().to_string(),
            client,
            outbox,
            outbox_rx: Mutex::new(Some(rx)),
            nodes: Mutex::new(HashMap::new()),
            next_server: AtomicUsize::new(0),
            connected: AtomicBool::new(false),
            backlog_bytes: AtomicUsize::new(0),
            next_seq: AtomicU64::new(0),
            last_seq: Mutex::new(HashMap::new()),
            known_before_outage: AtomicUsize::new(0),
        })
    }

    fn nodes(&self) -> MutexGuard<'_, HashMap<String, RemoteNode>> {
        self.nodes.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues `op` for the other nodes; never waits.
    pub fn publish(&self, shared: &Shared, op: Op) {
        // Notifications count against the byte budget; the small control messages that keep
        // the cluster together (heartbeats, forwards, acknowledgements) do not.
        let bulk = matches!(
            op,
            Op::NotifyAll { .. }
                | Op::NotifyClient { .. }
                | Op::NotifyGroup { .. }
                | Op::NotifyGroupOf { .. }
                | Op::Publish { .. }
        );
        let text = Wire {
            from: self.node.clone(),
            op,
        }
        .encode();
        let len = text.len();
        if bulk && self.backlog_bytes.fetch_add(len, Ordering::Relaxed) + len > BACKLOG_BYTES {
            self.backlog_bytes.fetch_sub(len, Ordering::Relaxed);
            shared.metrics.cluster_dropped.inc();
            return warn!("cluster backlog full: a message for other nodes was dropped");
        }
        if !bulk {
            // Counted too, so the publisher can subtract every message it takes.
            self.backlog_bytes.fetch_add(len, Ordering::Relaxed);
        }
        let sent = self.outbox.try_send(text);
        if sent.is_err() {
            self.backlog_bytes.fetch_sub(len, Ordering::Relaxed);
        }
        match sent {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                shared.metrics.cluster_dropped.inc();
                warn!("cluster backlog full: a message for other nodes was dropped");
            }
            // The publisher has said goodbye (shutdown): nothing more goes out.
            Err(TrySendError::Closed(_)) => debug!("cluster: stopped; message not sent"),
        }
    }

    /// Prefixes a message with this node's next sequence number (publisher only, so the
    /// numbers go out in order).
    fn stamp(&self, message: &str) -> String {
        let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
        format!("{seq} {message}")
    }

    /// True the first time `seq` from node `from` is seen (messages from one node arrive in
    /// order, so anything not above the last is a re-sent duplicate).
    fn first_time(&self, from: &str, seq: u64) -> bool {
        let mut last = self.last_seq.lock().unwrap_or_else(|e| e.into_inner());
        match last.get_mut(from) {
            Some(highest) if seq <= *highest => false,
            Some(highest) => {
                *highest = seq;
                true
            }
            None => {
                // Nodes come and go with new ids; keep the table small.
                if last.len() >= 10_000 {
                    last.clear();
                }
                last.insert(from.to_string(), seq);
                true
            }
        }
    }

    /// Other nodes currently alive.
    pub fn live_nodes(&self) -> usize {
        let mut nodes = self.nodes();
        nodes.retain(|_, n| n.seen.elapsed() < NODE_EXPIRY);
        nodes.len()
    }

    /// Servers on other nodes, as (node, server id), in a stable order.
    fn remote_servers(&self) -> Vec<(String, String)> {
        let mut nodes = self.nodes();
        nodes.retain(|_, n| n.seen.elapsed() < NODE_EXPIRY);
        let mut all: Vec<(String, String)> = nodes
            .iter()
            .flat_map(|(node, n)| n.servers.iter().map(|s| (node.clone(), s.clone())))
            .collect();
        all.sort();
        all
    }

    /// Sends a client's `client_connect` to a server on another node, round robin. False
    /// when no other node has a server.
    pub fn forward_remote(&self, shared: &Shared, client: &Arc<Peer>, frame: Utf8Bytes) -> bool {
        let servers = self.remote_servers();
        if servers.is_empty() {
            return false;
        }
        let i = self.next_server.fetch_add(1, Ordering::Relaxed) % servers.len();
        let (node, server) = servers[i].clone();
        self.publish(
            shared,
            Op::Forward {
                node,
                server,
                client: client.target.to_string(),
                frame: frame.as_str().to_string(),
            },
        );
        true
    }

    /// Tells the other nodes which servers this node has (heartbeat; also right after a
    /// change, so a new server is usable cluster-wide at once).
    pub fn announce(&self, shared: &Shared) {
        let servers = shared.hub.local_servers();
        self.publish(shared, Op::Servers { servers });
    }

    /// Applies one message from another node to this node's connections.
    fn apply(&self, shared: &Shared, wire: Wire) {
        if wire.from == self.node {
            return;
        }
        shared.metrics.cluster_received.inc();
        let hub = &shared.hub;
        match wire.op {
            Op::NotifyAll { frame } => {
                let frame = Utf8Bytes::from(frame);
                let n = hub.notify_all(&frame);
                shared.metrics.sent("notify_all", n, frame.len());
            }
            Op::NotifyClient { target, frame } => {
                let len = frame.len();
                let n = hub.notify_client(&target, Utf8Bytes::from(frame));
                shared.metrics.sent("notify_client", n, len);
            }
            Op::NotifyGroup { group, frame } => {
                let frame = Utf8Bytes::from(frame);
                let n = hub.notify_group(&group, &frame);
                shared.metrics.sent("notify_group", n, frame.len());
            }
            Op::NotifyGroupOf { target, frame } => {
                let local_group = hub.client(&target).and_then(|c| c.group());
                let group = local_group
                    .clone()
                    .unwrap_or_else(|| Arc::from(target.as_str()));
                let frame_bytes = Utf8Bytes::from(frame.clone());
                let n = hub.notify_group(&group, &frame_bytes);
                shared.metrics.sent("notify_group", n, frame_bytes.len());
                // This node has that connection: now everyone knows the group's name.
                if let Some(group) = local_group {
                    self.publish(
                        shared,
                        Op::NotifyGroup {
                            group: group.to_string(),
                            frame,
                        },
                    );
                }
            }
            Op::Publish {
                channel,
                filter,
                frame,
            } => {
                let frame = Utf8Bytes::from(frame);
                let n = hub.publish(&channel, &filter, &frame);
                shared.metrics.sent("publish", n, frame.len());
            }
            Op::Acknowledge {
                target,
                group,
                user,
                roles,
                groups,
                frame,
            } => {
                let ack = Acknowledgement {
                    group: Arc::from(group),
                    user: user.map(Arc::from),
                    roles,
                    groups,
                };
                if let Some(client) = hub.acknowledge(&target, ack) {
                    shared.metrics.sent("client_connected", 1, frame.len());
                    client.send(Utf8Bytes::from(frame));
                }
            }
            Op::Forward {
                node,
                server,
                client,
                frame,
            } => {
                if node != self.node {
                    return;
                }
                let len = frame.len();
                if hub.offer_to_server(&server, Utf8Bytes::from(frame)) {
                    shared.metrics.sent("client_connect", 1, len);
                } else {
                    // The server left (or is full) after the sender chose it: tell the client
                    // to send it again rather than leave it waiting, and never close a
                    // backend over a client's request.
                    debug!(%server, "forward for a server that has left or is full");
                    let error = ProtocolError::NoServer(
                        "the server chosen for this client_connect is gone or busy; send it again",
                    );
                    let frame = error.to_frame(Some("client_connect")).as_str().to_string();
                    self.publish(
                        shared,
                        Op::NotifyClient {
                            target: client,
                            frame,
                        },
                    );
                }
            }
            Op::Servers { servers } => {
                let has_servers = !servers.is_empty();
                self.nodes().insert(
                    wire.from,
                    RemoteNode {
                        servers,
                        seen: Instant::now(),
                    },
                );
                if has_servers {
                    self.flush_pending(shared);
                }
            }
            Op::Leaving => {
                self.nodes().remove(&wire.from);
            }
        }
    }

    /// A server appeared elsewhere: hand it the client connects that were waiting here.
    fn flush_pending(&self, shared: &Shared) {
        shared
            .hub
            .flush_pending(|client, frame| self.forward_remote(shared, client, frame));
    }
}

/// Starts the cluster's tasks (subscriber, publisher, heartbeat) for a running server.
pub fn start(shared: Arc<Shared>) {
    let Some(cluster) = shared.cluster.clone() else {
        return;
    };
    let rx = cluster
        .outbox_rx
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take();
    if let Some(rx) = rx {
        // Tracked, so shutdown waits for its farewell to the other nodes.
        let task = publisher(Arc::clone(&shared), Arc::clone(&cluster), rx);
        shared.tracker.spawn(task);
    }
    tokio::spawn(subscriber(Arc::clone(&shared), Arc::clone(&cluster)));
    tokio::spawn(heartbeat(shared, cluster));
}

/// Subscribes, applies what arrives, and re-subscribes (with backoff) whenever Redis goes.
async fn subscriber(shared: Arc<Shared>, cluster: Arc<Cluster>) {
    let mut backoff = Backoff::default();
    loop {
        tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            _ = subscribe_once(&shared, &cluster) => {}
        }
        if cluster.connected.swap(false, Ordering::Relaxed) {
            warn!("cluster: lost the Redis subscription; reconnecting");
            let known = cluster.live_nodes();
            cluster.known_before_outage.store(known, Ordering::Relaxed);
        }
        shared.metrics.cluster_connected.set(0);
        tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            _ = tokio::time::sleep(backoff.next()) => {}
        }
    }
}

async fn subscribe_once(shared: &Shared, cluster: &Cluster) {
    let mut pubsub = match cluster.client.get_async_pubsub().await {
        Ok(pubsub) => pubsub,
        Err(e) => return debug!(error = %e, "cluster: cannot connect to Redis"),
    };
    if let Err(e) = pubsub.subscribe(CHANNEL).await {
        return debug!(error = %e, "cluster: cannot subscribe");
    }
    cluster.connected.store(true, Ordering::Relaxed);
    shared.metrics.cluster_connected.set(1);
    info!(node = %cluster.node, "cluster: subscribed to Redis");
    cluster.announce(shared);
    let mut messages = pubsub.on_message();
    while let Some(message) = messages.next().await {
        match Wire::decode_stamped(message.get_payload_bytes()) {
            Some((seq, wire)) if seq.is_none_or(|seq| cluster.first_time(&wire.from, seq)) => {
                cluster.apply(shared, wire)
            }
            Some(_) => debug!("cluster: dropped a message already applied"),
            None => warn!("cluster: ignored a message that is not jssocket's"),
        }
    }
}

/// Publishes queued messages in order; on failure keeps the message and retries once Redis
/// is back and the other nodes have re-subscribed.
async fn publisher(shared: Arc<Shared>, cluster: Arc<Cluster>, mut rx: mpsc::Receiver<String>) {
    let mut backoff = Backoff::default();
    let mut connection: Option<redis::aio::MultiplexedConnection> = None;
    let mut pending: Option<String> = None;
    loop {
        let message = match pending.take() {
            Some(message) => message,
            None => tokio::select! {
                message = rx.recv() => match message {
                    Some(message) => {
                        cluster.backlog_bytes.fetch_sub(message.len(), Ordering::Relaxed);
                        cluster.stamp(&message)
                    }
                    None => return,
                },
                _ = shared.shutdown.cancelled() => {
                    return farewell(&cluster, connection, &mut rx).await;
                }
            },
        };
        if connection.is_none() {
            match cluster.client.get_multiplexed_async_connection().await {
                Ok(mut fresh) => {
                    wait_for_subscribers(&cluster, &mut fresh).await;
                    connection = Some(fresh);
                    backoff = Backoff::default();
                }
                Err(e) => {
                    debug!(error = %e, "cluster: cannot connect to Redis to publish");
                    pending = Some(message);
                    if sleep_or_shutdown(&shared, backoff.next()).await {
                        return;
                    }
                    continue;
                }
            }
        }
        let Some(conn) = connection.as_mut() else {
            continue;
        };
        let sent: redis::RedisResult<i64> = redis::cmd("PUBLISH")
            .arg(CHANNEL)
            .arg(&message)
            .query_async(conn)
            .await;
        match sent {
            Ok(_) => {
                shared.metrics.cluster_published.inc();
            }
            Err(e) => {
                warn!(error = %e, "cluster: publish failed; will retry when Redis is back");
                connection = None;
                pending = Some(message);
                if sleep_or_shutdown(&shared, backoff.next()).await {
                    return;
                }
            }
        }
    }
}

/// Longest a stopping node spends on its last messages.
const FAREWELL: Duration = Duration::from_secs(1);

/// On shutdown: publishes what is still queued, then `Leaving`, so the other nodes forget
/// this one and its servers at once rather than after [`NODE_EXPIRY`]. Bounded; skipped when
/// Redis is not reachable.
async fn farewell(
    cluster: &Cluster,
    connection: Option<redis::aio::MultiplexedConnection>,
    rx: &mut mpsc::Receiver<String>,
) {
    let Some(mut conn) = connection else {
        return;
    };
    let leaving = Wire {
        from: cluster.node.clone(),
        op: Op::Leaving,
    }
    .encode();
    let last = async {
        let queued = std::iter::from_fn(|| rx.try_recv().ok()).collect::<Vec<_>>();
        for message in queued.into_iter().chain([leaving]) {
            let message = cluster.stamp(&message);
            let sent: redis::RedisResult<i64> = redis::cmd("PUBLISH")
                .arg(CHANNEL)
                .arg(&message)
                .query_async(&mut conn)
                .await;
            if sent.is_err() {
                return;
            }
        }
    };
    let _ = tokio::time::timeout(FAREWELL, last).await;
}

/// After a reconnect, gives the other live nodes a moment to re-subscribe (PUBSUB NUMSUB),
/// so what waited during the outage reaches them.
async fn wait_for_subscribers(cluster: &Cluster, conn: &mut redis::aio::MultiplexedConnection) {
    // The nodes known before the outage count too: it may have outlasted NODE_EXPIRY.
    let before = cluster.known_before_outage.load(Ordering::Relaxed);
    let expected = 1 + cluster.live_nodes().max(before) as i64;
    let deadline = Instant::now() + RESUBSCRIBE_WAIT;
    while Instant::now() < deadline {
        let counts: redis::RedisResult<(String, i64)> = redis::cmd("PUBSUB")
            .arg("NUMSUB")
            .arg(CHANNEL)
            .query_async(conn)
            .await;
        match counts {
            Ok((_, n)) if n >= expected => return,
            Ok(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            Err(_) => return,
        }
    }
}

async fn heartbeat(shared: Arc<Shared>, cluster: Arc<Cluster>) {
    let mut tick = tokio::time::interval(HEARTBEAT);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                cluster.announce(&shared);
                shared.metrics.cluster_nodes.set(cluster.live_nodes() as i64 + 1);
            }
            // The publisher says `Leaving` for this node (see `farewell`).
            _ = shared.shutdown.cancelled() => return,
        }
    }
}

/// True when shutdown came first.
async fn sleep_or_shutdown(shared: &Shared, wait: Duration) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(wait) => false,
        _ = shared.shutdown.cancelled() => true,
    }
}

/// 50 ms doubling to 1 s.
#[derive(Default)]
struct Backoff(u32);

impl Backoff {
    fn next(&mut self) -> Duration {
        let wait = Duration::from_millis(50 << self.0.min(4)).min(Duration::from_secs(1));
        self.0 += 1;
        wait
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_resent_message_is_applied_once() {
        let cluster = Cluster::new("redis://127.0.0.1:1").unwrap();
        let text = Wire {
            from: "node-a".into(),
            op: Op::Leaving,
        }
        .encode();
        let first = cluster.stamp(&text);
        let second = cluster.stamp(&text);
        let (Some(seq1), wire1) = Wire::decode_stamped(first.as_bytes()).unwrap() else {
            panic!("not stamped");
        };
        let (Some(seq2), _) = Wire::decode_stamped(second.as_bytes()).unwrap() else {
            panic!("not stamped");
        };
        assert_eq!((seq1, seq2), (0, 1));
        assert!(cluster.first_time(&wire1.from, seq1));
        // The same message published again after a lost reply: dropped.
        assert!(!cluster.first_time(&wire1.from, seq1));
        assert!(cluster.first_time(&wire1.from, seq2));
        // Another node's numbering is its own.
        assert!(cluster.first_time("node-b", 0));
        // A node of an earlier version sends bare JSON: read, never taken for a duplicate.
        let (seq, _) = Wire::decode_stamped(b"{\"from\":\"x\",\"op\":\"leaving\"}").unwrap();
        assert_eq!(seq, None);
        assert!(Wire::decode_stamped(b"garbage").is_none());
    }
}
