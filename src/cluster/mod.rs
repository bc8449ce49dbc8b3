//! The cluster: several jssocket nodes behind one load balancer act as one relay. This is
//! the node logic, the same whatever carries the messages (a [`Transport`]: Redis, Redis
//! Cluster, or the in-process loopback).
//!
//! Routing, not broadcast (SPEC §8): a node receives only what concerns its connections.
//! - Its own topic (`jssocket:node:<tag>`): a connection's id names its node (its first
//!   four bytes), so `notify_client`, `client_connected`, `notify_group` to a connection id,
//!   and forwards of `client_connect` and their receipts go to that node alone.
//! - One topic per group and per channel it has local members in, subscribed on the first
//!   local member and unsubscribed after the last ([`Interest`]): a group with members on 2
//!   of 10 nodes costs 2 receptions, not 10.
//! - One topic for everyone (`jssocket:all`): `notify_all`, heartbeats, farewells.
//!
//! Every delivery is a [`crate::delivery::Delivery`] produced by an event; the origin
//! delivers it locally and publishes it here, and the nodes that receive it deliver it with
//! the same code ([`Relay::receive`]). A node ignores its own messages, so every connection
//! gets a delivery once. `notify_group` to a connection id on another node goes to that node,
//! which resolves the group, delivers to its own members and publishes to the group's topic.
//!
//! Heartbeats (every second, and at once when a node's server pool changes) carry each node's
//! server list; a node whose heartbeat stops for [`NODE_EXPIRY`] is forgotten, with its
//! servers. The transport going away: local delivery goes on; what must cross nodes waits in
//! a bounded queue and is published when the transport is back and the other nodes have
//! subscribed again; every subscription is made again on reconnecting.
//!
//! What waits to be published is split in two lanes (see [`Backlog`], in `backlog.rs`): admin
//! and control traffic, published first and with its own budget, and client-originated
//! traffic (forwards of `client_connect`, clients' notifies) with a smaller budget and a cap
//! per connection, so a flood of clients is refused to those clients and never costs an
//! admin's message.
//!
//! A forwarded `client_connect` is never left hanging when the chosen node dies (SPEC §9): the
//! receiving node answers each forward with a receipt (or a failure), and the sending node
//! keeps it in flight until then (`nodes.rs`). Bound: a forward with no receipt within
//! [`nodes::RECEIPT_TIMEOUT`] (2 s), or whose node is forgotten ([`NODE_EXPIRY`], 3.5 s after
//! its last heartbeat) before the client is acknowledged, is forwarded again within
//! [`nodes::SWEEP`] (0.25 s) to another live server (or queued for one); after
//! [`nodes::MAX_ATTEMPTS`] the client gets `no_server`.

mod backlog;
mod nodes;
pub mod redis;
mod wire;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use tokio_tungstenite::tungstenite::Utf8Bytes;
use tracing::{debug, info, warn};
use uuid::Uuid;

use crate::backplane::{
    ALL_TOPIC, Backplane, Interest, Publisher, Subscription, Subscriptions, Topic, Transport,
    channel_bucket, node_of, node_topic,
};
use crate::delivery::{Delivery, Route, Sender};
use crate::kinds::Frame;
use crate::peer::Peer;
use crate::protocol::ProtocolError;
use crate::relay::Relay;
use crate::warn_throttled;
use backlog::{Backlog, Lane, Refused};
use nodes::{InFlightTable, RemoteNode, SWEEP};
pub use wire::Op;
use wire::Wire;

/// How often a node announces itself and its servers.
const HEARTBEAT: Duration = Duration::from_secs(1);
/// A node not heard from for this long is gone, and its servers with it.
pub const NODE_EXPIRY: Duration = Duration::from_millis(3500);
/// After reconnecting, how long to wait for the other nodes to subscribe again before
/// publishing what waited, so it is not lost on them.
const RESUBSCRIBE_WAIT: Duration = Duration::from_secs(3);
/// Topics subscribed per command when subscribing to everything again.
const SUBSCRIBE_BATCH: usize = 500;
/// Entries of the duplicate filter (sender, topic) before it is emptied.
const MAX_SEQ_ENTRIES: usize = 100_000;

/// This node's view of the cluster.
pub struct Cluster {
    /// This node's tag, written in its connections' ids; random per start.
    tag: u32,
    /// The tag as the other nodes name this node.
    pub node: String,
    transport: Arc<dyn Transport>,
    /// The groups and channels this node has members in.
    interest: Arc<Interest>,
    /// What waits for the publisher task.
    backlog: Backlog,
    /// Client connects forwarded to other nodes and not yet settled, by client.
    in_flight: Mutex<InFlightTable>,
    /// Number of the next forward this node sends.
    next_forward: AtomicU64,
    /// Other nodes: their servers and when they were last heard from. Ordered by id, so
    /// round robin over their servers needs no sorted copy per forward.
    nodes: Mutex<BTreeMap<String, RemoteNode>>,
    /// Round-robin cursor over the other nodes' servers.
    next_server: AtomicUsize,
    /// Subscribed to the transport right now.
    pub connected: AtomicBool,
    /// Sequence number of the next message this node publishes. A publish whose reply was
    /// lost is sent again with the same number, and receivers drop what they have seen.
    next_seq: AtomicU64,
    /// Highest sequence number applied from each other node, per topic (messages on one
    /// topic from one node arrive in order; across topics, on a Redis Cluster, they may not).
    last_seq: Mutex<HashMap<(String, String), u64>>,
    /// Other nodes alive when the subscription was last lost. An outage longer than
    /// [`NODE_EXPIRY`] makes this node forget them; after it, the backlog must still wait for
    /// them to subscribe again.
    known_before_outage: AtomicUsize,
}

/// The topic of the node named `node` (its tag in hex).
fn topic_of_node(node: &str) -> Option<String> {
    u32::from_str_radix(node, 16).ok().map(node_topic)
}

impl Cluster {
    /// A node on `transport`; it connects when [`Backplane::start`] runs.
    pub fn new(transport: Arc<dyn Transport>) -> Cluster {
        let tag = u32::from_be_bytes(Uuid::new_v4().as_bytes()[..4].try_into().unwrap_or([0; 4]));
        Cluster {
            tag,
            node: format!("{tag:08x}"),
            transport,
            interest: Arc::new(Interest::default()),
            backlog: Backlog::new(),
            in_flight: Mutex::new(InFlightTable::default()),
            next_forward: AtomicU64::new(1),
            nodes: Mutex::new(BTreeMap::new()),
            next_server: AtomicUsize::new(0),
            connected: AtomicBool::new(false),
            next_seq: AtomicU64::new(0),
            last_seq: Mutex::new(HashMap::new()),
            known_before_outage: AtomicUsize::new(0),
        }
    }

    /// Queues an admin's or the cluster's own `op` for `topic`; never waits. Dropped (and
    /// counted) only when the control lane itself is full: clients cannot fill it.
    fn publish_control(&self, shared: &Relay, topic: String, op: Op) {
        if self
            .enqueue(shared, Lane::Control, topic, op, None, None)
            .is_err()
        {
            shared.metrics.cluster_dropped.inc();
            warn_throttled!("cluster backlog full: a message for other nodes was dropped");
        }
    }

    fn enqueue(
        &self,
        shared: &Relay,
        lane: Lane,
        topic: String,
        op: Op,
        sender: Option<&Arc<Peer>>,
        forward: Option<(Uuid, u64)>,
    ) -> Result<(), Refused> {
        self.backlog.push(lane, topic, op, sender, forward)?;
        let bytes = self.backlog.bytes();
        shared
            .metrics
            .cluster_backlog_bytes
            .set(i64::try_from(bytes).unwrap_or(i64::MAX));
        Ok(())
    }

    /// Prefixes a message with this node's next sequence number (publisher only, so the
    /// numbers go out in order).
    fn stamp(&self, message: &str) -> String {
        let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
        format!("{seq} {message}")
    }

    /// Encodes `op` as this node's message and stamps it (publisher only).
    fn encode(&self, op: Op) -> String {
        let wire = Wire {
            from: self.node.clone(),
            op,
        };
        self.stamp(&wire.encode())
    }

    /// True the first time `seq` from node `from` on `topic` is seen (messages on one topic
    /// from one node arrive in order, so anything not above the last is a re-sent
    /// duplicate).
    fn first_time(&self, from: &str, topic: &str, seq: u64) -> bool {
        let mut last = self.last_seq.lock().unwrap_or_else(|e| e.into_inner());
        let key = (from.to_string(), topic.to_string());
        match last.get_mut(&key) {
            Some(highest) if seq <= *highest => false,
            Some(highest) => {
                *highest = seq;
                true
            }
            None => {
                // Nodes come and go with new ids, groups with their members: kept bounded.
                if last.len() >= MAX_SEQ_ENTRIES {
                    last.clear();
                }
                last.insert(key, seq);
                true
            }
        }
    }

    /// Tells the other nodes which servers this node has (heartbeat; also right after a
    /// change, so a new server is usable cluster-wide at once).
    pub fn announce(&self, shared: &Relay) {
        let servers = shared.hub.pool.local_servers();
        self.publish_control(shared, ALL_TOPIC.to_string(), Op::Servers { servers });
    }

    /// Applies one message received on `topic`.
    fn receive(&self, shared: &Relay, topic: &str, payload: &[u8]) {
        shared.metrics.cluster_received.inc();
        let Some((seq, wire)) = Wire::decode_stamped(payload) else {
            return warn_throttled!("cluster: ignored a message that is not jssocket's");
        };
        if matches!(wire.op, Op::Deliver { .. }) {
            shared.metrics.cluster_deliveries_received.inc();
        }
        // Its own messages come back on the topics it shares with others: ignored.
        if wire.from == self.node {
            return;
        }
        if !self.first_time(&wire.from, topic, seq) {
            return debug!("cluster: dropped a message already applied");
        }
        self.apply(shared, wire);
    }

    /// Applies one message from another node to this node's connections.
    fn apply(&self, shared: &Relay, wire: Wire) {
        match wire.op {
            Op::Deliver {
                delivery,
                from_client,
            } => {
                let sender = if from_client {
                    Sender::Relayed
                } else {
                    Sender::Admin
                };
                shared.receive(delivery, sender);
            }
            Op::Forward {
                node,
                server,
                client,
                frame,
                id,
            } => {
                if node != self.node {
                    return;
                }
                let len = frame.0.len();
                let queued = shared.hub.pool.offer_to_server(&server, frame.0);
                if queued {
                    shared.metrics.sent(Frame::ClientConnect, 1, len);
                } else {
                    // The server left (or is full) after the sender chose it: the sender
                    // forwards it elsewhere; a backend is never closed over a client's request.
                    debug!(%server, "forward for a server that has left or is full");
                }
                let Some(topic) = topic_of_node(&wire.from) else {
                    return;
                };
                let node = wire.from;
                let op = if queued {
                    Op::Forwarded { node, client, id }
                } else {
                    Op::ForwardFailed { node, client, id }
                };
                self.publish_control(shared, topic, op);
            }
            Op::Forwarded { node, client, id } => {
                if node == self.node {
                    self.settle(shared, &client, id, true);
                }
            }
            Op::ForwardFailed { node, client, id } => {
                if node == self.node {
                    self.settle(shared, &client, id, false);
                }
            }
            Op::Servers { mut servers } => {
                let has_servers = !servers.is_empty();
                servers.sort();
                self.nodes().insert(
                    wire.from,
                    RemoteNode {
                        servers,
                        seen: Instant::now(),
                        suspect: false,
                    },
                );
                self.count_nodes(shared);
                if has_servers {
                    self.flush_pending(shared);
                }
            }
            Op::Leaving => {
                self.nodes().remove(&wire.from);
                self.count_nodes(shared);
            }
        }
    }

    /// A server appeared elsewhere: hand it the client connects that were waiting here.
    fn flush_pending(&self, shared: &Relay) {
        shared
            .hub
            .pool
            .flush_pending(|client, frame| self.send_forward(shared, client, frame, 1));
    }

    /// Sets the gauges of live nodes and their servers.
    fn count_nodes(&self, shared: &Relay) {
        let (nodes, servers) = {
            let mut nodes = self.nodes();
            nodes.retain(|_, n| n.seen.elapsed() < NODE_EXPIRY);
            let servers: usize = nodes.values().map(|n| n.servers.len()).sum();
            (nodes.len(), servers)
        };
        shared.metrics.cluster_nodes.set(nodes as i64 + 1);
        shared.metrics.cluster_remote_servers.set(servers as i64);
    }

    /// Other nodes currently alive.
    pub fn live_nodes(&self) -> usize {
        let mut nodes = self.nodes();
        nodes.retain(|_, n| n.seen.elapsed() < NODE_EXPIRY);
        nodes.len()
    }
}

impl Backplane for Cluster {
    fn start(self: Arc<Self>, relay: &Arc<Relay>) {
        // Tracked, so shutdown waits for its farewell to the other nodes.
        let task = publisher(Arc::clone(relay), Arc::clone(&self));
        relay.tracker.spawn(task);
        tokio::spawn(subscriber(Arc::clone(relay), Arc::clone(&self)));
        tokio::spawn(sweeper(Arc::clone(relay), Arc::clone(&self)));
        tokio::spawn(heartbeat(Arc::clone(relay), self));
    }

    fn publish(
        &self,
        relay: &Relay,
        route: Route,
        delivery: Delivery,
        sender: Sender<'_>,
    ) -> Result<(), ProtocolError> {
        let topic = match route {
            Route::All => ALL_TOPIC.to_string(),
            Route::Owner(target) => match node_of(&target) {
                Some(tag) => node_topic(tag),
                None => return Ok(()),
            },
            Route::Group(name) => Topic::Group(name).key(),
            Route::Channel(name) => Topic::Channels(channel_bucket(&name)).key(),
        };
        let from_client = !matches!(sender, Sender::Admin);
        let op = Op::Deliver {
            delivery,
            from_client,
        };
        match sender {
            Sender::Admin => {
                self.publish_control(relay, topic, op);
                Ok(())
            }
            Sender::Client(client) => self
                .enqueue(relay, Lane::Clients, topic, op, Some(client), None)
                .map_err(|refused| {
                    relay.metrics.cluster_dropped.inc();
                    match refused {
                        // Many other clients filled the lane: not held against this one.
                        Refused::Full => ProtocolError::ClusterBusy(
                            "cluster busy: too much is waiting for the other nodes; send it again later",
                        ),
                        Refused::SenderBusy => ProtocolError::RateLimited(
                            "too much of yours is waiting for the other nodes; send it again later",
                        ),
                    }
                }),
            Sender::Relayed => {
                // A client's message passed on by this node: in the client lane, never
                // ahead of admin traffic; dropped (counted) when that lane is full.
                if self
                    .enqueue(relay, Lane::Clients, topic, op, None, None)
                    .is_err()
                {
                    relay.metrics.cluster_dropped.inc();
                }
                Ok(())
            }
        }
    }

    fn elsewhere(&self, target: &str) -> bool {
        node_of(target).is_some_and(|tag| tag != self.tag)
    }

    fn servers_changed(&self, relay: &Relay) {
        self.announce(relay);
    }

    fn forward_connect(&self, relay: &Relay, client: &Arc<Peer>, frame: Utf8Bytes) -> bool {
        self.send_forward(relay, client, frame, 1)
    }

    fn settled(&self, client: &Peer) {
        self.in_flight().remove(client.id);
    }

    fn interest(&self) -> Option<Arc<Interest>> {
        Some(Arc::clone(&self.interest))
    }

    fn node_tag(&self) -> u32 {
        self.tag
    }
}

/// Subscribes, applies what arrives, follows the hub's groups and channels, and subscribes
/// again (with backoff) whenever the transport goes.
async fn subscriber(shared: Arc<Relay>, cluster: Arc<Cluster>) {
    let mut backoff = Backoff::default();
    loop {
        tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            _ = subscribe_once(&shared, &cluster, &mut backoff) => {}
        }
        if cluster.connected.swap(false, Ordering::Relaxed) {
            warn!("cluster: lost the subscription; reconnecting");
            let known = cluster.live_nodes();
            cluster.known_before_outage.store(known, Ordering::Relaxed);
        }
        // Nothing is confirmed until subscribed again; held replies go out now.
        cluster.interest.set_live(&shared, false);
        shared.metrics.cluster_connected.set(0);
        tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            _ = tokio::time::sleep(backoff.next()) => {}
        }
    }
}

async fn subscribe_once(shared: &Relay, cluster: &Cluster, backoff: &mut Backoff) {
    let Subscription {
        mut control,
        mut messages,
    } = match cluster.transport.subscriber().await {
        Ok(subscription) => subscription,
        Err(e) => return debug!(error = %e, "cluster: cannot subscribe"),
    };
    let interest = &cluster.interest;
    interest.set_live(shared, true);
    // Everything the hub has now is subscribed below; later changes are followed.
    interest.take_touched();
    let topics = shared.hub.topics();
    for batch in topics.chunks(SUBSCRIBE_BATCH) {
        let keys: Vec<String> = batch.iter().map(Topic::key).collect();
        if let Err(e) = control.subscribe(&keys).await {
            return debug!(error = %e, "cluster: cannot subscribe");
        }
        interest.confirm(shared, batch);
    }
    // Its own topic and the broadcast topic last: a node seen on the broadcast topic
    // (`Publisher::subscribers`) has made every other subscription.
    let own = [node_topic(cluster.tag), ALL_TOPIC.to_string()];
    if let Err(e) = control.subscribe(&own).await {
        return debug!(error = %e, "cluster: cannot subscribe");
    }
    *backoff = Backoff::default();
    cluster.connected.store(true, Ordering::Relaxed);
    shared.metrics.cluster_connected.set(1);
    info!(node = %cluster.node, "cluster: subscribed");
    cluster.announce(shared);
    loop {
        tokio::select! {
            message = messages.next() => match message {
                Some((topic, payload)) => cluster.receive(shared, &topic, &payload),
                None => return,
            },
            _ = interest.touched.notified() => {
                if let Err(e) = follow(shared, cluster, &mut *control).await {
                    return debug!(error = %e, "cluster: cannot change subscriptions");
                }
            }
        }
    }
}

/// Subscribes to the topics that got their first local member and unsubscribes from those
/// that lost their last, as the hub is now (a name that came and went since is left alone).
async fn follow(
    shared: &Relay,
    cluster: &Cluster,
    control: &mut dyn Subscriptions,
) -> Result<(), crate::backplane::TransportError> {
    let interest = &cluster.interest;
    let mut join = Vec::new();
    let mut leave = Vec::new();
    for topic in interest.take_touched() {
        match (
            shared.hub.has_members(&topic),
            interest.is_confirmed(&topic),
        ) {
            (true, false) => join.push(topic),
            (false, true) => leave.push(topic),
            _ => {}
        }
    }
    for batch in leave.chunks(SUBSCRIBE_BATCH) {
        interest.unconfirm(batch);
        let keys: Vec<String> = batch.iter().map(Topic::key).collect();
        control.unsubscribe(&keys).await?;
    }
    for batch in join.chunks(SUBSCRIBE_BATCH) {
        let keys: Vec<String> = batch.iter().map(Topic::key).collect();
        control.subscribe(&keys).await?;
        interest.confirm(shared, batch);
    }
    Ok(())
}

/// Publishes queued messages in order; on failure keeps the message and retries once Redis
/// Publishes queued messages in order; on failure keeps the message and retries once the
/// transport is back and the other nodes have subscribed again.
async fn publisher(shared: Arc<Relay>, cluster: Arc<Cluster>) {
    let mut backoff = Backoff::default();
    let mut connection: Option<Box<dyn Publisher>> = None;
    let mut pending: Option<(String, String)> = None;
    loop {
        let (topic, message) = match pending.take() {
            Some(pending) => pending,
            None => tokio::select! {
                taken = cluster.backlog.pop() => {
                    let bytes = cluster.backlog.bytes();
                    shared.metrics.cluster_backlog_bytes.set(i64::try_from(bytes).unwrap_or(i64::MAX));
                    if let Some((client, id)) = taken.forward {
                        cluster.going_out(client, id);
                    }
                    (taken.topic, cluster.encode(taken.op))
                }
                _ = shared.shutdown.cancelled() => {
                    return farewell(&cluster, connection).await;
                }
            },
        };
        if connection.is_none() {
            match cluster.transport.publisher().await {
                Ok(mut fresh) => {
                    wait_for_subscribers(&cluster, &mut *fresh).await;
                    connection = Some(fresh);
                    backoff = Backoff::default();
                }
                Err(e) => {
                    debug!(error = %e, "cluster: cannot connect to publish");
                    pending = Some((topic, message));
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
        match conn.publish(&topic, &message).await {
            Ok(()) => {
                shared.metrics.cluster_published.inc();
            }
            Err(e) => {
                warn!(error = %e, "cluster: publish failed; will retry when the transport is back");
                connection = None;
                pending = Some((topic, message));
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
/// the transport is not reachable.
async fn farewell(cluster: &Cluster, connection: Option<Box<dyn Publisher>>) {
    let Some(mut conn) = connection else {
        return;
    };
    let last = async {
        let queued = std::iter::from_fn(|| cluster.backlog.try_pop())
            .map(|taken| (taken.topic, taken.op))
            .collect::<Vec<_>>();
        let leaving = (ALL_TOPIC.to_string(), Op::Leaving);
        for (topic, op) in queued.into_iter().chain([leaving]) {
            let message = cluster.encode(op);
            if conn.publish(&topic, &message).await.is_err() {
                return;
            }
        }
    };
    let _ = tokio::time::timeout(FAREWELL, last).await;
}

/// After a reconnect, gives the other live nodes a moment to subscribe again (they
/// subscribe to the broadcast topic last), so what waited during the outage reaches them.
async fn wait_for_subscribers(cluster: &Cluster, conn: &mut dyn Publisher) {
    // The nodes known before the outage count too: it may have outlasted NODE_EXPIRY.
    let before = cluster.known_before_outage.load(Ordering::Relaxed);
    let expected = 1 + cluster.live_nodes().max(before);
    let deadline = Instant::now() + RESUBSCRIBE_WAIT;
    while Instant::now() < deadline {
        match conn.subscribers(ALL_TOPIC).await {
            Some(n) if n >= expected => return,
            Some(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            None => return,
        }
    }
}

/// Checks the forwards in flight every [`SWEEP`].
async fn sweeper(shared: Arc<Relay>, cluster: Arc<Cluster>) {
    let mut tick = tokio::time::interval(SWEEP);
    loop {
        tokio::select! {
            _ = tick.tick() => cluster.sweep(&shared),
            _ = shared.shutdown.cancelled() => return,
        }
    }
}

async fn heartbeat(shared: Arc<Relay>, cluster: Arc<Cluster>) {
    let mut tick = tokio::time::interval(HEARTBEAT);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                cluster.announce(&shared);
                cluster.count_nodes(&shared);
            }
            // The publisher says `Leaving` for this node (see `farewell`).
            _ = shared.shutdown.cancelled() => return,
        }
    }
}

/// True when shutdown came first.
async fn sleep_or_shutdown(shared: &Relay, wait: Duration) -> bool {
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
