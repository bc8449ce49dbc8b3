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
//! What waits to be published is split in two lanes (see [`Backlog`]): admin and control
//! traffic, published first and with its own budget, and client-originated traffic (forwards
//! of `client_connect`, clients' notifies) with a smaller budget and a cap per connection,
//! so a flood of clients is refused to those clients and never costs an admin's message.
//!
//! A forwarded `client_connect` is never left hanging when the chosen node dies (SPEC §9): the
//! receiving node answers each forward with a receipt (or a failure), and the sending node
//! keeps it in flight until then. Bound: a forward with no receipt within
//! [`RECEIPT_TIMEOUT`] (2 s), or whose node is forgotten ([`NODE_EXPIRY`], 3.5 s after its
//! last heartbeat) before the client is acknowledged, is forwarded again within [`SWEEP`]
//! (0.25 s) to another live server (or queued for one); after [`MAX_ATTEMPTS`] the client
//! gets `no_server`.

pub mod redis;
mod wire;

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use tokio::sync::Notify;
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
pub use wire::Op;
use wire::{SharedFrame, Wire};

/// How often a node announces itself and its servers.
const HEARTBEAT: Duration = Duration::from_secs(1);
/// A node not heard from for this long is gone, and its servers with it.
pub const NODE_EXPIRY: Duration = Duration::from_millis(3500);
/// Admin and control messages waiting to be published while the transport is away; beyond
/// this the newest are dropped (and counted), so an outage costs bounded memory.
const BACKLOG: usize = 100_000;
/// Bytes of admin and control messages waiting to be published (a flood, or an outage);
/// beyond this the newest are dropped and counted.
const BACKLOG_BYTES: usize = 64 * 1024 * 1024;
/// Bytes of client-originated messages waiting to be published; beyond this clients are told
/// the cluster is busy. Smaller than the admin lane's: clients are many and unauthenticated.
const CLIENT_BACKLOG_BYTES: usize = 16 * 1024 * 1024;
/// Bytes one connection may have waiting in the client lane. One message is always let in
/// (when the lane has room), however large; more only within this cap, so every sender gets
/// its turn whatever the others send.
const PER_CLIENT_BYTES: usize = 64 * 1024;
/// What a queued message costs beyond its text (queue slot, allocation, topic): counted, so
/// a flood of tiny messages is bounded too.
const MESSAGE_OVERHEAD: usize = 64;
/// No receipt for a forward within this: the node is taken for dead (until its next
/// heartbeat) and the forward goes elsewhere.
pub const RECEIPT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a receipted forward stays in flight (so it is sent again if its node dies before
/// the client is acknowledged): beyond [`NODE_EXPIRY`], so the death is seen first.
const HOLD: Duration = Duration::from_secs(5);
/// How often forwards in flight are checked.
pub const SWEEP: Duration = Duration::from_millis(250);
/// Forwards of one `client_connect` (the first included) before the client gets `no_server`.
pub const MAX_ATTEMPTS: u32 = 3;
/// Bytes and count of forwards in flight; beyond, client connects wait in the local queue.
const IN_FLIGHT_BYTES: usize = 16 * 1024 * 1024;
const IN_FLIGHT_MAX: usize = 20_000;
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

struct RemoteNode {
    /// Sorted, for a stable round robin.
    servers: Vec<String>,
    seen: Instant,
    /// A forward to it got no receipt in time: not chosen until its next heartbeat.
    suspect: bool,
}

/// Which lane a message waits in (see [`Backlog`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lane {
    /// Admins' messages and what keeps the cluster together: first out, never dropped for
    /// clients' sake.
    Control,
    /// What clients caused: forwards, their notifies.
    Clients,
}

/// Messages waiting for the publisher, in two lanes with budgets of their own. The publisher
/// empties the control lane first, so an admin's message waits behind at most one client
/// message. The lock is held to push or pop one message.
///
/// Messages wait unencoded: queuing one costs no JSON encoding and no copy of its frame
/// (a forward shares its frame with the forwards in flight), which matters because a
/// forward is queued under the hub's pool lock. The publisher encodes each as it goes out.
struct Backlog {
    lanes: Mutex<Lanes>,
    /// Wakes the publisher after a push.
    ready: Notify,
}

#[derive(Default)]
struct Lanes {
    control: VecDeque<Queued>,
    clients: VecDeque<Queued>,
    control_bytes: usize,
    client_bytes: usize,
}

/// A message waiting in a lane.
struct Queued {
    topic: String,
    op: Op,
    /// What it is charged: [`Op::size`] plus [`MESSAGE_OVERHEAD`].
    cost: usize,
    /// Whose share of the client lane it takes.
    sender: Option<Arc<Peer>>,
    /// A forward: (client, forward id), so its receipt clock starts when it goes out.
    forward: Option<(Uuid, u64)>,
}

/// A message taken for publishing.
struct Taken {
    topic: String,
    op: Op,
    forward: Option<(Uuid, u64)>,
}

/// Why a message was not queued.
#[derive(Debug, PartialEq, Eq)]
enum Refused {
    /// The lane is full: load on everyone, not the sender's doing.
    Full,
    /// The sending connection has its share waiting already.
    SenderBusy,
}

impl Backlog {
    fn new() -> Backlog {
        Backlog {
            lanes: Mutex::new(Lanes::default()),
            ready: Notify::new(),
        }
    }

    fn lanes(&self) -> MutexGuard<'_, Lanes> {
        self.lanes.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn push(
        &self,
        lane: Lane,
        topic: String,
        op: Op,
        sender: Option<&Arc<Peer>>,
        forward: Option<(Uuid, u64)>,
    ) -> Result<(), Refused> {
        let cost = op.size() + topic.len() + MESSAGE_OVERHEAD;
        {
            let mut lanes = self.lanes();
            lanes.room(lane, cost, sender)?;
            let queued = Queued {
                topic,
                op,
                cost,
                sender: sender.cloned(),
                forward,
            };
            match lane {
                Lane::Control => {
                    lanes.control_bytes += cost;
                    lanes.control.push_back(queued);
                }
                Lane::Clients => {
                    if let Some(sender) = sender {
                        sender.cluster_bytes.fetch_add(cost, Ordering::Relaxed);
                    }
                    lanes.client_bytes += cost;
                    lanes.clients.push_back(queued);
                }
            }
        }
        self.ready.notify_one();
        Ok(())
    }

    /// Whether a message of at least `cost` bytes from `sender` could be queued in the
    /// client lane now: asked before doing any work for a message that would be refused.
    fn client_room(&self, cost: usize, sender: &Arc<Peer>) -> Result<(), Refused> {
        self.lanes().room(Lane::Clients, cost, Some(sender))
    }

    /// The next message to publish: control first.
    fn try_pop(&self) -> Option<Taken> {
        let mut lanes = self.lanes();
        if let Some(queued) = lanes.control.pop_front() {
            lanes.control_bytes -= queued.cost;
            return Some(Taken {
                topic: queued.topic,
                op: queued.op,
                forward: None,
            });
        }
        let Queued {
            topic,
            op,
            cost,
            sender,
            forward,
        } = lanes.clients.pop_front()?;
        lanes.client_bytes -= cost;
        if let Some(sender) = sender {
            sender.cluster_bytes.fetch_sub(cost, Ordering::Relaxed);
        }
        Some(Taken { topic, op, forward })
    }

    async fn pop(&self) -> Taken {
        loop {
            if let Some(taken) = self.try_pop() {
                return taken;
            }
            self.ready.notified().await;
        }
    }

    fn bytes(&self) -> usize {
        let lanes = self.lanes();
        lanes.control_bytes + lanes.client_bytes
    }
}

impl Lanes {
    /// Room in `lane` for `cost` more bytes from `sender` (its share, in the client lane).
    fn room(&self, lane: Lane, cost: usize, sender: Option<&Arc<Peer>>) -> Result<(), Refused> {
        match lane {
            Lane::Control => {
                if self.control.len() >= BACKLOG || self.control_bytes + cost > BACKLOG_BYTES {
                    return Err(Refused::Full);
                }
            }
            Lane::Clients => {
                // The sender's own share first: a sender over it is told so (and it counts
                // against it), even when others have filled the lane meanwhile.
                if let Some(sender) = sender {
                    let waiting = sender.cluster_bytes.load(Ordering::Relaxed);
                    if waiting > 0 && waiting + cost > PER_CLIENT_BYTES {
                        return Err(Refused::SenderBusy);
                    }
                }
                if self.client_bytes + cost > CLIENT_BACKLOG_BYTES {
                    return Err(Refused::Full);
                }
            }
        }
        Ok(())
    }
}

/// A `client_connect` forwarded to a server on another node, kept until it is settled: by a
/// receipt and then the client's acknowledgement (or [`HOLD`]), or by sending it again.
struct InFlight {
    /// This forward's number, named by its receipt.
    id: u64,
    node: String,
    client: Weak<Peer>,
    frame: Utf8Bytes,
    /// When it was sent, or receipted.
    since: Instant,
    receipted: bool,
    /// Forwards of this request so far, this one included.
    attempt: u32,
}

#[derive(Default)]
struct InFlightTable {
    by_client: HashMap<Uuid, InFlight>,
    /// Bytes of the frames held.
    bytes: usize,
}

impl InFlightTable {
    fn remove(&mut self, client: Uuid) -> Option<InFlight> {
        let entry = self.by_client.remove(&client)?;
        self.bytes -= entry.frame.len();
        Some(entry)
    }

    /// Removes forward `id` of `client`, if it is still the one in flight.
    fn remove_forward(&mut self, client: Uuid, id: u64) {
        if self.by_client.get(&client).is_some_and(|e| e.id == id) {
            self.remove(client);
        }
    }

    fn insert(&mut self, client: Uuid, entry: InFlight) {
        self.remove(client);
        self.bytes += entry.frame.len();
        self.by_client.insert(client, entry);
    }

    /// Room for one more forward of `len` bytes for `client` (replacing its own).
    fn has_room(&self, client: Uuid, len: usize) -> bool {
        let own = self.by_client.get(&client).map_or(0, |e| e.frame.len());
        let count = self.by_client.len() - usize::from(own > 0);
        count < IN_FLIGHT_MAX && self.bytes - own + len <= IN_FLIGHT_BYTES
    }
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

    fn nodes(&self) -> MutexGuard<'_, BTreeMap<String, RemoteNode>> {
        self.nodes.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn in_flight(&self) -> MutexGuard<'_, InFlightTable> {
        self.in_flight.lock().unwrap_or_else(|e| e.into_inner())
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

    /// The next server on another node that may be chosen (alive, not suspect), round
    /// robin in a stable order, as (node, server id).
    /// O(nodes), nothing sorted or copied but the pick: it runs under the hub's pool lock.
    fn pick_server(&self) -> Option<(String, String)> {
        let nodes = self.nodes();
        let usable = || {
            nodes
                .iter()
                .filter(|(_, n)| !n.suspect && n.seen.elapsed() < NODE_EXPIRY)
        };
        let total: usize = usable().map(|(_, n)| n.servers.len()).sum();
        if total == 0 {
            return None;
        }
        let mut i = self.next_server.fetch_add(1, Ordering::Relaxed) % total;
        for (node, n) in usable() {
            match n.servers.get(i) {
                Some(server) => return Some((node.clone(), server.clone())),
                None => i -= n.servers.len(),
            }
        }
        None
    }

    /// Runs under the hub's pool lock (the pending queue's order depends on it), so it does
    /// only O(1) work in the frame's size: the client lane's room is checked first, the frame
    /// is shared (not copied) and it is encoded later by the publisher.
    fn send_forward(
        &self,
        shared: &Relay,
        client: &Arc<Peer>,
        frame: Utf8Bytes,
        attempt: u32,
    ) -> bool {
        // Cheapest first: a full lane (a flood) refuses before anything else is done.
        let least = frame.len() + MESSAGE_OVERHEAD;
        if self.backlog.client_room(least, client).is_err() {
            return false;
        }
        let Some((node, server)) = self.pick_server() else {
            return false;
        };
        let Some(topic) = topic_of_node(&node) else {
            return false;
        };
        let id = self.next_forward.fetch_add(1, Ordering::Relaxed);
        // In flight before it is queued: its receipt may come back before this returns.
        {
            let mut in_flight = self.in_flight();
            if !in_flight.has_room(client.id, frame.len()) {
                return false;
            }
            let entry = InFlight {
                id,
                node: node.clone(),
                client: Arc::downgrade(client),
                frame: frame.clone(),
                since: Instant::now(),
                receipted: false,
                attempt,
            };
            in_flight.insert(client.id, entry);
        }
        let op = Op::Forward {
            node,
            server,
            client: client.target.to_string(),
            frame: SharedFrame::from(frame),
            id,
        };
        let forward = Some((client.id, id));
        let queued = self
            .enqueue(shared, Lane::Clients, topic, op, Some(client), forward)
            .is_ok();
        let count = {
            let mut in_flight = self.in_flight();
            if !queued {
                // The lane filled up meanwhile: it waits in the local queue instead.
                in_flight.remove_forward(client.id, id);
            }
            in_flight.by_client.len()
        };
        shared.metrics.cluster_forwards_in_flight.set(count as i64);
        queued
    }

    /// The publisher took forward `id` for `client`: its receipt is due from now, not from
    /// when it was queued (a backlog or an outage is not the other node's fault).
    fn going_out(&self, client: Uuid, id: u64) {
        if let Some(entry) = self.in_flight().by_client.get_mut(&client)
            && entry.id == id
        {
            entry.since = Instant::now();
        }
    }

    /// Receipt or failure from the node a forward went to.
    fn settle(&self, shared: &Relay, client: &str, id: u64, queued: bool) {
        let Ok(client) = Uuid::try_parse(client) else {
            return;
        };
        let failed = {
            let mut in_flight = self.in_flight();
            match in_flight.by_client.get_mut(&client) {
                Some(entry) if entry.id == id && queued => {
                    entry.receipted = true;
                    entry.since = Instant::now();
                    None
                }
                Some(entry) if entry.id == id => in_flight.remove(client),
                // A late answer to an attempt already replaced.
                _ => None,
            }
        };
        if let Some(entry) = failed {
            self.forward_again(shared, entry);
        }
    }

    /// Forwards a request that was not settled to another server (local or remote), else
    /// queues it; after [`MAX_ATTEMPTS`] the client gets `no_server`.
    fn forward_again(&self, shared: &Relay, entry: InFlight) {
        let Some(client) = entry.client.upgrade() else {
            return;
        };
        // A newer request of the client's, waiting here, wins.
        if shared.hub.pool.is_pending(client.id) {
            return;
        }
        if entry.attempt >= MAX_ATTEMPTS {
            let error = ProtocolError::NoServer(
                "the servers chosen for this client_connect did not take it; send it again",
            );
            shared.metrics.error(error.code());
            client.send(error.to_frame(Some("client_connect")));
            return;
        }
        let attempt = entry.attempt + 1;
        let forwarded = shared
            .hub
            .pool
            .forward_connect(&client, entry.frame, |c, frame| {
                let attempt = if c.id == client.id { attempt } else { 1 };
                self.send_forward(shared, c, frame, attempt)
            });
        if let Err(error) = forwarded {
            client.send(error.to_frame(Some("client_connect")));
        }
    }

    /// Sends again the forwards with no receipt in time and those whose node is gone before
    /// their client was acknowledged; forgets those settled long enough. The table is
    /// bounded ([`IN_FLIGHT_MAX`]); the forwarding is done after the lock is released.
    fn sweep(&self, shared: &Relay) {
        if !self.connected.load(Ordering::Relaxed) {
            // Cut off from Redis: receipts cannot come and the other nodes only look gone.
            // Nothing is judged until this node is back; the clocks start again then.
            let mut in_flight = self.in_flight();
            for entry in in_flight.by_client.values_mut() {
                entry.since = Instant::now();
            }
            return;
        }
        let live: HashSet<String> = {
            let mut nodes = self.nodes();
            nodes.retain(|_, n| n.seen.elapsed() < NODE_EXPIRY);
            nodes.keys().cloned().collect()
        };
        let mut again = Vec::new();
        let mut suspects = HashSet::new();
        let count = {
            let mut in_flight = self.in_flight();
            let due: Vec<Uuid> = in_flight
                .by_client
                .iter()
                .filter(|(_, e)| {
                    e.client.strong_count() == 0
                        || !live.contains(&e.node)
                        || e.since.elapsed() >= if e.receipted { HOLD } else { RECEIPT_TIMEOUT }
                })
                .map(|(id, _)| *id)
                .collect();
            for id in due {
                let Some(entry) = in_flight.remove(id) else {
                    continue;
                };
                if entry.client.strong_count() == 0
                    || (entry.receipted && live.contains(&entry.node))
                {
                    continue;
                }
                if !entry.receipted && live.contains(&entry.node) {
                    suspects.insert(entry.node.clone());
                }
                again.push(entry);
            }
            in_flight.by_client.len()
        };
        shared.metrics.cluster_forwards_in_flight.set(count as i64);
        if !suspects.is_empty() {
            let mut nodes = self.nodes();
            for node in &suspects {
                if let Some(node) = nodes.get_mut(node) {
                    node.suspect = true;
                }
            }
            debug!(nodes = ?suspects, "cluster: no receipt in time; nodes passed over until their next heartbeat");
        }
        for entry in again {
            self.forward_again(shared, entry);
        }
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
