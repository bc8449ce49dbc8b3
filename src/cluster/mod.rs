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
mod health;
pub mod history;
mod nodes;
pub mod redis;
mod wire;

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use tokio_tungstenite::tungstenite::Utf8Bytes;
use tracing::{debug, warn};
use uuid::Uuid;

use crate::backplane::{
    ALL_TOPIC, Backplane, Interest, Publisher, Subscription, Subscriptions, Topic, Transport,
    channel_bucket, node_of, node_topic,
};
use crate::delivery::{Delivery, Route, Sender};
use crate::kinds::Frame;
use crate::membership::{Ack, Confirmed};
use crate::peer::Peer;
use crate::protocol::ProtocolError;
use crate::relay::Relay;
use crate::warn_throttled;
use backlog::{Backlog, Lane, Refused};
use health::Health;
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
/// Longest wait for the transport to open a subscription: an address that drops packets
/// (a firewall, a mistyped host) must show as a failure, not as a node forever connecting.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// A subscription that brings nothing for this long (not even this node's own heartbeat,
/// sent every [`HEARTBEAT`]) is taken for lost and made again. Above the longest quiet a live
/// connection has: the publisher holding its backlog for [`RESUBSCRIBE_WAIT`] after a
/// reconnection.
const SILENT_LIMIT: Duration = Duration::from_secs(10);
/// Topics subscribed per command when subscribing to everything again.
const SUBSCRIBE_BATCH: usize = 500;
/// Entries of the duplicate filter (sender, topic) before it is emptied.
const MAX_SEQ_ENTRIES: usize = 100_000;
/// How long after this node sent an acknowledgement to another node that node may still be
/// subscribing to the client's group (see [`Cluster::recent_joins`]).
pub const JOIN_GRACE: Duration = Duration::from_secs(2);
/// Groups remembered as recently joined elsewhere; beyond, none more is (a twin is an
/// extra, never needed for a delivery to reach a node that was already subscribed).
const MAX_RECENT_JOINS: usize = 10_000;
/// Twins remembered per receiving node, to drop the second copy.
const MAX_TWINS: usize = 100_000;

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
    /// The subscriber's connection as `/readyz`, the metrics and the logs report it.
    health: Health,
    /// Sequence number of the next message this node publishes. A publish whose reply was
    /// lost is sent again with the same number, and receivers drop what they have seen.
    next_seq: AtomicU64,
    /// Highest sequence number applied from each other node, per topic (messages on one
    /// topic from one node arrive in order; across topics, on a Redis Cluster, they may not).
    last_seq: Mutex<SeqTable>,
    /// Groups this node recently acknowledged a client into on another node, with that
    /// node and when. That node subscribes to the group's topic only once the
    /// acknowledgement reached it, so the group's messages sent right after it (a backend
    /// acknowledges, then notifies) would be published before anyone there listens: for
    /// [`JOIN_GRACE`] they also go to that node's own topic, after the acknowledgement, as
    /// twins of the group's message.
    recent_joins: Mutex<Joins>,
    /// Number of the next twin this node sends.
    next_twin: AtomicU64,
    /// Twins applied here (sender, number), the oldest forgotten first.
    twins_seen: Mutex<Twins>,
    /// Other nodes alive when the subscription was last lost. An outage longer than
    /// [`NODE_EXPIRY`] makes this node forget them; after it, the backlog must still wait for
    /// them to subscribe again.
    known_before_outage: AtomicUsize,
    /// Presence queries this node asked and still waits on, by id: where their answers go.
    queries: Mutex<HashMap<u64, tokio::sync::mpsc::Sender<(String, crate::presence::Answer)>>>,
    /// Number of the next query this node asks.
    next_query: AtomicU64,
    /// The relay, to answer other nodes' queries off the subscriber's task.
    relay: std::sync::OnceLock<std::sync::Weak<Relay>>,
    /// Changes (`membership`, `disconnect`) this node waits to hear confirmed: by number,
    /// the nodes that confirmed and the connections each matched. An entry lives while its
    /// admin request waits (one per admin request in progress).
    changes: Mutex<HashMap<u64, HashMap<String, usize>>>,
    /// Number of the next change.
    next_change: AtomicU64,
    /// Woken by every confirmation.
    confirmed: tokio::sync::Notify,
}

/// Group → the nodes joining it, and since when (see [`Cluster::recent_joins`]).
type Joins = HashMap<Arc<str>, Vec<(u32, Instant)>>;

/// Twins applied (sender, number), and the same in order of arrival, to forget the oldest.
type Twins = (HashSet<(String, u64)>, VecDeque<(String, u64)>);

/// Highest sequence number applied, per sending node and topic.
#[derive(Default)]
struct SeqTable {
    by_node: HashMap<String, HashMap<String, u64>>,
    /// Entries over every node.
    entries: usize,
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
            health: Health::default(),
            next_seq: AtomicU64::new(0),
            last_seq: Mutex::new(SeqTable::default()),
            known_before_outage: AtomicUsize::new(0),
            recent_joins: Mutex::new(HashMap::new()),
            next_twin: AtomicU64::new(0),
            twins_seen: Mutex::new((HashSet::new(), VecDeque::new())),
            queries: Mutex::new(HashMap::new()),
            next_query: AtomicU64::new(1),
            relay: std::sync::OnceLock::new(),
            changes: Mutex::new(HashMap::new()),
            next_change: AtomicU64::new(0),
            confirmed: tokio::sync::Notify::new(),
        }
    }

    /// Remembers that `node` is joining `group` (see [`Cluster::recent_joins`]).
    fn joining(&self, group: &Arc<str>, node: u32) {
        let mut joins = self.recent_joins.lock().unwrap_or_else(|e| e.into_inner());
        if joins.len() >= MAX_RECENT_JOINS {
            joins.retain(|_, nodes| {
                nodes.retain(|(_, at)| at.elapsed() < JOIN_GRACE);
                !nodes.is_empty()
            });
            if joins.len() >= MAX_RECENT_JOINS {
                return;
            }
        }
        let nodes = joins.entry(Arc::clone(group)).or_default();
        nodes.retain(|(n, at)| *n != node && at.elapsed() < JOIN_GRACE);
        nodes.push((node, Instant::now()));
    }

    /// The nodes that may still be subscribing to `group`.
    fn joining_nodes(&self, group: &str) -> Vec<u32> {
        let mut joins = self.recent_joins.lock().unwrap_or_else(|e| e.into_inner());
        let Some(nodes) = joins.get_mut(group) else {
            return Vec::new();
        };
        nodes.retain(|(_, at)| at.elapsed() < JOIN_GRACE);
        let nodes: Vec<u32> = nodes.iter().map(|(node, _)| *node).collect();
        if nodes.is_empty() {
            joins.remove(group);
        }
        nodes
    }

    /// True the first time twin `id` of node `from` arrives.
    fn first_twin(&self, from: &str, id: u64) -> bool {
        let mut seen = self.twins_seen.lock().unwrap_or_else(|e| e.into_inner());
        let key = (from.to_string(), id);
        if seen.0.contains(&key) {
            return false;
        }
        if seen.1.len() >= MAX_TWINS
            && let Some(oldest) = seen.1.pop_front()
        {
            seen.0.remove(&oldest);
        }
        seen.0.insert(key.clone());
        seen.1.push_back(key);
        true
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

    /// Encodes `op` as this node's message with its next sequence number (publisher only,
    /// so the numbers go out in order).
    fn encode(&self, op: Op) -> String {
        let wire = Wire {
            from: self.node.clone(),
            op,
        };
        wire.encode_stamped(self.next_seq.fetch_add(1, Ordering::Relaxed))
    }

    /// True the first time `seq` from node `from` on `topic` is seen (messages on one topic
    /// from one node arrive in order, so anything not above the last is a re-sent
    /// duplicate).
    fn first_time(&self, from: &str, topic: &str, seq: u64) -> bool {
        let mut table = self.last_seq.lock().unwrap_or_else(|e| e.into_inner());
        // Looked up by reference: a message seen before allocates nothing.
        if let Some(highest) = table.by_node.get_mut(from).and_then(|t| t.get_mut(topic)) {
            if seq <= *highest {
                return false;
            }
            *highest = seq;
            return true;
        }
        // Nodes come and go with new ids, groups with their members: kept bounded.
        if table.entries >= MAX_SEQ_ENTRIES {
            table.by_node.clear();
            table.entries = 0;
        }
        table
            .by_node
            .entry(from.to_string())
            .or_default()
            .insert(topic.to_string(), seq);
        table.entries += 1;
        true
    }

    /// Queues one message for `topic` in the lane `sender` calls for.
    fn publish_one(
        &self,
        relay: &Relay,
        topic: String,
        op: Op,
        sender: Sender<'_>,
    ) -> Result<(), ProtocolError> {
        match sender {
            Sender::Admin => {
                self.publish_control(relay, topic, op);
                Ok(())
            }
            Sender::Client(client) => self
                .enqueue(relay, Lane::Clients, topic, op, Some(client), None)
                .map_err(|refused| refusal(relay, refused)),
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
                twin,
            } => {
                if let Some(id) = twin
                    && !self.first_twin(&wire.from, id)
                {
                    return;
                }
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
            Op::Invoke {
                node,
                server,
                client,
                id,
                frame,
            } => {
                if node != self.node {
                    return;
                }
                let len = frame.0.len();
                if shared.hub.pool.offer_to_server(&server, frame.0) {
                    shared.metrics.sent(Frame::Invoke, 1, len);
                    return;
                }
                // The server left (or is full) since the caller's node chose it: the caller
                // is told now rather than at its deadline.
                if let Some(id) = id {
                    let error = crate::invoke::relay_error(
                        crate::kinds::Code::NoServer,
                        "the server chosen for this call has left or is full",
                    );
                    let delivery = Delivery::InvokeResult {
                        target: client.into(),
                        id: id.into(),
                        error: true,
                        frame: Utf8Bytes::from(error).into(),
                    };
                    let _ = shared.deliver(delivery, Sender::Admin);
                }
            }
            Op::Applied { node, id, count } => {
                if node != self.node {
                    return;
                }
                let mut changes = self.changes.lock().unwrap_or_else(|e| e.into_inner());
                // A confirmation after its request stopped waiting is dropped.
                if let Some(confirmed) = changes.get_mut(&id) {
                    confirmed.insert(wire.from, count);
                    drop(changes);
                    self.confirmed.notify_waiters();
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
            Op::Query { id, query } => self.answer_query(wire.from, id, query),
            Op::Answer { id, answer } => {
                let mut queries = self.queries.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(waiting) = queries.get(&id)
                    && waiting.try_send((wire.from, answer)).is_err()
                    && waiting.is_closed()
                {
                    queries.remove(&id);
                }
            }
        }
    }

    /// Answers another node's presence query, off the subscriber's task (a page over a big
    /// table is milliseconds of CPU), at most [`crate::presence::MAX_ANSWERING`] at once:
    /// beyond, the asker sees this node time out.
    fn answer_query(self: &Cluster, from: String, id: u64, query: crate::presence::Query) {
        let Some(relay) = self.relay.get().and_then(std::sync::Weak::upgrade) else {
            return;
        };
        let Some(topic) = topic_of_node(&from) else {
            return;
        };
        let Some(slot) = crate::presence::Answering::take(relay) else {
            return warn_throttled!("cluster: too many presence queries to answer; one ignored");
        };
        tokio::task::spawn_blocking(move || {
            let relay = slot.relay();
            let answer = crate::presence::local(relay, &query);
            if let Some(cluster) = relay.backplane.as_cluster() {
                cluster.publish_control(relay, topic, Op::Answer { id, answer });
            }
        });
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

    /// What the live nodes (or node `only`) confirmed of change `id` so far: the
    /// confirmations, and the nodes still to confirm.
    fn confirmations(&self, id: u64, only: Option<u32>) -> Confirmed {
        let live: Vec<String> = {
            let nodes = self.nodes();
            nodes
                .iter()
                .filter(|(_, n)| n.seen.elapsed() < NODE_EXPIRY)
                .map(|(name, _)| name.clone())
                .collect()
        };
        let only = only.map(|tag| format!("{tag:08x}"));
        let changes = self.changes.lock().unwrap_or_else(|e| e.into_inner());
        let confirmed = changes.get(&id);
        let count = |name: &String| confirmed.and_then(|c| c.get(name)).copied();
        Confirmed {
            connections: confirmed.map_or(0, |c| c.values().sum()),
            nodes: confirmed.map_or(0, HashMap::len),
            missing: live
                .into_iter()
                .filter(|name| only.as_ref().is_none_or(|only| only == name))
                .filter(|name| count(name).is_none())
                .collect(),
        }
    }

    /// Other nodes currently alive.
    pub fn live_nodes(&self) -> usize {
        let mut nodes = self.nodes();
        nodes.retain(|_, n| n.seen.elapsed() < NODE_EXPIRY);
        nodes.len()
    }
}

/// What a client is told when the client lane cannot take its message (counted).
fn refusal(relay: &Relay, refused: Refused) -> ProtocolError {
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
}

impl Backplane for Cluster {
    fn start(self: Arc<Self>, relay: &Arc<Relay>) {
        let _ = self.relay.set(Arc::downgrade(relay));
        self.health.start(relay.config.redis_url.as_deref());
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
        let mut twins = Vec::new();
        let topic = match route {
            Route::All => ALL_TOPIC.to_string(),
            Route::Owner(target) => match node_of(&target) {
                Some(tag) => {
                    if let Delivery::Acknowledge { group, .. } = &delivery {
                        self.joining(group, tag);
                    }
                    node_topic(tag)
                }
                None => return Ok(()),
            },
            Route::Group(name) => {
                twins = self
                    .joining_nodes(&name)
                    .into_iter()
                    .map(node_topic)
                    .collect();
                Topic::Group(name).key()
            }
            Route::Channel(name) => {
                if relay.config.signalr_path.is_some() {
                    twins.push(Topic::SignalR.key());
                }
                Topic::Channels(channel_bucket(&name)).key()
            }
        };
        let from_client = !matches!(sender, Sender::Admin);
        let twin = (!twins.is_empty()).then(|| self.next_twin.fetch_add(1, Ordering::Relaxed));
        for twin_topic in twins {
            let op = Op::Deliver {
                delivery: delivery.clone(),
                from_client,
                twin,
            };
            self.publish_one(relay, twin_topic, op, sender)?;
        }
        let op = Op::Deliver {
            delivery,
            from_client,
            twin,
        };
        self.publish_one(relay, topic, op, sender)
    }

    fn elsewhere(&self, target: &str) -> bool {
        node_of(target).is_some_and(|tag| tag != self.tag)
    }

    fn room_for(
        &self,
        relay: &Relay,
        client: &Arc<Peer>,
        bytes: usize,
    ) -> Result<(), ProtocolError> {
        self.backlog
            .client_room(bytes + backlog::MESSAGE_OVERHEAD, client)
            .map_err(|refused| refusal(relay, refused))
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

    fn forward_invoke(
        &self,
        relay: &Relay,
        client: &Arc<Peer>,
        id: Option<&str>,
        frame: Utf8Bytes,
    ) -> bool {
        let Some((node, server)) = self.pick_server() else {
            return false;
        };
        let Some(topic) = topic_of_node(&node) else {
            return false;
        };
        let op = Op::Invoke {
            node,
            server,
            client: client.target.to_string(),
            id: id.map(str::to_string),
            frame: frame.into(),
        };
        // The client lane: a flood of calls is refused to its callers, never costs an admin.
        self.enqueue(relay, Lane::Clients, topic, op, Some(client), None)
            .is_ok()
    }

    fn interest(&self) -> Option<Arc<Interest>> {
        Some(Arc::clone(&self.interest))
    }

    fn change_id(&self) -> Option<Ack> {
        let id = self.next_change.fetch_add(1, Ordering::Relaxed);
        let mut changes = self.changes.lock().unwrap_or_else(|e| e.into_inner());
        changes.insert(id, HashMap::new());
        Some(Ack { node: self.tag, id })
    }

    fn applied(&self, relay: &Relay, ack: Ack, count: usize) {
        let op = Op::Applied {
            node: format!("{:08x}", ack.node),
            id: ack.id,
            count,
        };
        self.publish_control(relay, node_topic(ack.node), op);
    }

    fn wait_applied(
        &self,
        ack: Ack,
        only: Option<u32>,
        limit: Duration,
    ) -> crate::backplane::BoxFuture<'_, Confirmed> {
        /// Forgets the change however the wait ends (an admin gone mid-wait included).
        struct Forget<'a>(&'a Cluster, u64);
        impl Drop for Forget<'_> {
            fn drop(&mut self) {
                let mut changes = self.0.changes.lock().unwrap_or_else(|e| e.into_inner());
                changes.remove(&self.1);
            }
        }
        Box::pin(async move {
            let _forget = Forget(self, ack.id);
            let deadline = tokio::time::Instant::now() + limit;
            loop {
                // Registered before looking, so a confirmation in between is not missed.
                let notified = self.confirmed.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                let now = self.confirmations(ack.id, only);
                if now.missing.is_empty() {
                    return now;
                }
                if tokio::time::timeout_at(deadline, notified).await.is_err() {
                    return self.confirmations(ack.id, only);
                }
            }
        })
    }

    fn node_tag(&self) -> u32 {
        self.tag
    }

    fn ask(&self, relay: &Relay, query: &crate::presence::Query) -> Option<crate::presence::Asked> {
        let nodes: Vec<String> = {
            let nodes = self.nodes();
            nodes
                .iter()
                .filter(|(_, n)| n.seen.elapsed() < NODE_EXPIRY)
                .map(|(id, _)| id.clone())
                .collect()
        };
        // Room for every node's answer, and a few that joined since.
        let (tx, rx) = tokio::sync::mpsc::channel(nodes.len() + 4);
        let id = self.next_query.fetch_add(1, Ordering::Relaxed);
        {
            let mut queries = self.queries.lock().unwrap_or_else(|e| e.into_inner());
            // Queries whose asker stopped waiting: forgotten (bounded by the queries in
            // flight, see `crate::presence::MAX_IN_FLIGHT`).
            queries.retain(|_, waiting| !waiting.is_closed());
            queries.insert(id, tx);
        }
        let op = Op::Query {
            id,
            query: query.clone(),
        };
        self.publish_control(relay, ALL_TOPIC.to_string(), op);
        Some(crate::presence::Asked { nodes, answers: rx })
    }

    fn as_cluster(&self) -> Option<&Cluster> {
        Some(self)
    }

    fn not_ready(&self) -> Option<String> {
        self.health.not_ready()
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
    } = match tokio::time::timeout(CONNECT_TIMEOUT, cluster.transport.subscriber()).await {
        Ok(Ok(subscription)) => subscription,
        Ok(Err(e)) => return cluster.health.failed(&shared.metrics, "connect", &e),
        Err(_) => {
            let e = format!("no answer within {CONNECT_TIMEOUT:?}");
            return cluster.health.failed(&shared.metrics, "connect", &e);
        }
    };
    cluster.health.connected(&shared.metrics);
    // Subscribing runs beside the reading, never instead of it: what arrives meanwhile is
    // applied, not piled up in the transport's buffers.
    let subscriptions = keep_subscribed(shared, cluster, &mut *control, backoff);
    tokio::pin!(subscriptions);
    let silence = tokio::time::sleep(SILENT_LIMIT);
    tokio::pin!(silence);
    loop {
        tokio::select! {
            message = messages.next() => match message {
                Some((topic, payload)) => {
                    silence.as_mut().reset(tokio::time::Instant::now() + SILENT_LIMIT);
                    cluster.receive(shared, &topic, &payload);
                }
                None => return cluster.health.lost(&shared.metrics, "closed"),
            },
            () = &mut silence => {
                // Subscribed, this node hears its own heartbeat every second; nothing at all
                // for this long is a connection that died without a word (a partition).
                if cluster.connected.load(Ordering::Relaxed) {
                    return cluster.health.lost(&shared.metrics, "silent: not even this node's heartbeat came back");
                }
                silence.as_mut().reset(tokio::time::Instant::now() + SILENT_LIMIT);
            }
            failed = &mut subscriptions => {
                let Err(e) = failed;
                return cluster.health.failed(&shared.metrics, "subscribe", &e);
            }
        }
    }
}

/// Subscribes to everything the hub has, then follows its changes; returns only when the
/// transport refuses.
async fn keep_subscribed(
    shared: &Relay,
    cluster: &Cluster,
    control: &mut dyn Subscriptions,
    backoff: &mut Backoff,
) -> Result<std::convert::Infallible, crate::backplane::TransportError> {
    let interest = &cluster.interest;
    interest.set_live(shared, true);
    // Everything the hub has now is subscribed below; later changes are followed.
    interest.take_touched();
    let topics = shared.hub.topics();
    for batch in topics.chunks(SUBSCRIBE_BATCH) {
        let keys: Vec<String> = batch.iter().map(Topic::key).collect();
        control.subscribe(&keys).await?;
        interest.confirm(shared, batch);
    }
    // Its own topic and the broadcast topic last: a node seen on the broadcast topic
    // (`Publisher::subscribers`) has made every other subscription.
    let own = [node_topic(cluster.tag), ALL_TOPIC.to_string()];
    control.subscribe(&own).await?;
    *backoff = Backoff::default();
    cluster.connected.store(true, Ordering::Relaxed);
    shared.metrics.cluster_connected.set(1);
    cluster.health.subscribed(&cluster.node);
    cluster.announce(shared);
    loop {
        interest.touched.notified().await;
        follow(shared, cluster, control).await?;
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
    let mut settled = Vec::new();
    for topic in interest.take_touched() {
        match (
            shared.hub.has_members(&topic),
            interest.is_confirmed(&topic),
        ) {
            (true, false) => join.push(topic),
            (false, true) => leave.push(topic),
            // Came and went, or went and came back: nothing to change, and whatever
            // waited for it goes out now.
            _ => settled.push(topic),
        }
    }
    interest.release(shared, &settled);
    for batch in leave.chunks(SUBSCRIBE_BATCH) {
        interest.unconfirm(batch);
        let keys: Vec<String> = batch.iter().map(Topic::key).collect();
        control.unsubscribe(&keys).await?;
        interest.release(shared, batch);
    }
    for batch in join.chunks(SUBSCRIBE_BATCH) {
        let keys: Vec<String> = batch.iter().map(Topic::key).collect();
        control.subscribe(&keys).await?;
        interest.confirm(shared, batch);
    }
    Ok(())
}

/// Most messages, and bytes, published in one batch.
const BATCH: usize = 256;
const BATCH_BYTES: usize = 1024 * 1024;

/// Publishes queued messages in order, in batches (what queued up while the last batch was
/// out goes in one write, its replies read after: one round trip to Redis per batch, not per
/// message); on failure keeps the batch and retries once the transport is back and the other
/// nodes have subscribed again (receivers drop what they already applied).
async fn publisher(shared: Arc<Relay>, cluster: Arc<Cluster>) {
    let mut backoff = Backoff::default();
    let mut connection: Option<Box<dyn Publisher>> = None;
    let mut batch: Vec<(String, String)> = Vec::new();
    loop {
        if batch.is_empty() {
            tokio::select! {
                taken = cluster.backlog.pop() => {
                    let mut bytes = 0;
                    let mut next = Some(taken);
                    while let Some(taken) = next.take() {
                        if let Some((client, id)) = taken.forward {
                            cluster.going_out(client, id);
                        }
                        let message = cluster.encode(taken.op);
                        bytes += message.len();
                        batch.push((taken.topic, message));
                        if batch.len() < BATCH && bytes < BATCH_BYTES {
                            next = cluster.backlog.try_pop();
                        }
                    }
                    let waiting = cluster.backlog.bytes();
                    shared.metrics.cluster_backlog_bytes.set(i64::try_from(waiting).unwrap_or(i64::MAX));
                }
                _ = shared.shutdown.cancelled() => {
                    return farewell(&cluster, connection, batch).await;
                }
            }
        }
        if connection.is_none() {
            match cluster.transport.publisher().await {
                Ok(mut fresh) => {
                    wait_for_subscribers(&cluster, &mut *fresh).await;
                    connection = Some(fresh);
                    backoff = Backoff::default();
                }
                Err(e) => {
                    // Logged by the subscriber, which fails the same way; counted here.
                    cluster.health.publish_failed(&shared.metrics, &e);
                    debug!(error = %e, "cluster: cannot connect to publish");
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
        match conn.publish_batch(&batch).await {
            Ok(()) => {
                cluster.health.published();
                shared.metrics.cluster_published.inc_by(batch.len() as u64);
                batch.clear();
            }
            Err(e) => {
                cluster.health.publish_failed(&shared.metrics, &e);
                warn!(error = %e, "cluster: publish failed; will retry when the transport is back");
                connection = None;
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
async fn farewell(
    cluster: &Cluster,
    connection: Option<Box<dyn Publisher>>,
    unsent: Vec<(String, String)>,
) {
    let Some(mut conn) = connection else {
        return;
    };
    let last = async {
        let queued = std::iter::from_fn(|| cluster.backlog.try_pop())
            .map(|taken| (taken.topic, cluster.encode(taken.op)))
            .collect::<Vec<_>>();
        let leaving = (ALL_TOPIC.to_string(), cluster.encode(Op::Leaving));
        for (topic, message) in unsent.into_iter().chain(queued).chain([leaving]) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backplane::Loopback;

    #[test]
    fn a_resent_message_is_applied_once_per_topic() {
        let cluster = Cluster::new(Arc::new(Loopback::new()));
        let first = cluster.encode(Op::Leaving);
        let second = cluster.encode(Op::Leaving);
        let (seq1, wire) = Wire::decode_stamped(first.as_bytes()).expect("stamped");
        let (seq2, _) = Wire::decode_stamped(second.as_bytes()).expect("stamped");
        assert_eq!((seq1, seq2), (0, 1));
        assert_eq!(wire.from, cluster.node);
        assert!(cluster.first_time("a", "t", seq1));
        // The same message published again after a lost reply: dropped.
        assert!(!cluster.first_time("a", "t", seq1));
        assert!(cluster.first_time("a", "t", seq2));
        // On another topic (another shard of a Redis Cluster) the numbers may come in
        // another order: judged on their own.
        assert!(cluster.first_time("a", "u", seq1));
        // Another node's numbering is its own.
        assert!(cluster.first_time("b", "t", seq1));
    }

    #[test]
    fn the_node_tag_is_in_every_connection_id_and_routes_to_its_topic() {
        let cluster = Cluster::new(Arc::new(Loopback::new()));
        let memory = Arc::new(crate::memory::Memory::new(
            usize::MAX / 4,
            &crate::metrics::Metrics::new(),
        ));
        let peer = Peer::new(cluster.node_tag(), 1024, &memory);
        assert_eq!(node_of(&peer.target), Some(cluster.node_tag()));
        assert_eq!(topic_of_node(&cluster.node), Some(node_topic(cluster.tag)));
        assert!(!cluster.elsewhere(&peer.target));
        let other = Peer::new(cluster.node_tag().wrapping_add(1), 1024, &memory);
        assert!(cluster.elsewhere(&other.target));
        assert!(!cluster.elsewhere("not-an-id"));
        // Still a version 4 UUID.
        let id = Uuid::parse_str(&peer.target).expect("a UUID");
        assert_eq!(id.get_version_num(), 4);
    }
}
