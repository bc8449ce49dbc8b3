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
//! gets `no_server`. So a client whose forward went to a node that died is re-forwarded
//! within about 2.25 s (4 s if the node took it before dying), and answered within about 7 s.

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

use crate::hub::{Acknowledgement, Peer};
use crate::protocol::ProtocolError;
use crate::server::Shared;
use crate::warn_throttled;
pub use wire::Op;
use wire::{SharedFrame, Wire};

/// The Pub/Sub channel every node uses.
pub const CHANNEL: &str = "jssocket:relay";
/// How often a node announces itself and its servers.
const HEARTBEAT: Duration = Duration::from_secs(1);
/// A node not heard from for this long is gone, and its servers with it.
pub const NODE_EXPIRY: Duration = Duration::from_millis(3500);
/// Admin and control messages waiting to be published while Redis is away; beyond this the
/// newest are dropped (and counted), so an outage costs bounded memory.
const BACKLOG: usize = 100_000;
/// Bytes of admin and control messages waiting to be published (a flood, or a Redis outage);
/// beyond this the newest are dropped and counted.
const BACKLOG_BYTES: usize = 64 * 1024 * 1024;
/// Bytes of client-originated messages waiting to be published; beyond this clients are told
/// the cluster is busy. Smaller than the admin lane's: clients are many and unauthenticated.
const CLIENT_BACKLOG_BYTES: usize = 16 * 1024 * 1024;
/// Bytes one connection may have waiting in the client lane. One message is always let in
/// (when the lane has room), however large; more only within this cap, so every sender gets
/// its turn whatever the others send.
const PER_CLIENT_BYTES: usize = 64 * 1024;
/// What a queued message costs beyond its text (queue slot, allocation): counted, so a flood
/// of tiny messages is bounded too.
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
/// After reconnecting, how long to wait for the other nodes to re-subscribe before
/// publishing what waited, so it is not lost on them.
const RESUBSCRIBE_WAIT: Duration = Duration::from_secs(3);

/// This node's view of the cluster.
pub struct Cluster {
    /// This node's id, random per start.
    pub node: String,
    client: redis::Client,
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
    /// Subscribed to Redis right now.
    pub connected: AtomicBool,
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
    /// Sorted, for a stable round robin.
    servers: Vec<String>,
    seen: Instant,
    /// A forward to it got no receipt in time: not chosen until its next heartbeat.
    suspect: bool,
    /// It answers forwards with receipts (its heartbeat says so).
    receipts: bool,
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
        op: Op,
        sender: Option<&Arc<Peer>>,
        forward: Option<(Uuid, u64)>,
    ) -> Result<(), Refused> {
        let cost = op.size() + MESSAGE_OVERHEAD;
        {
            let mut lanes = self.lanes();
            lanes.room(lane, cost, sender)?;
            let queued = Queued {
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
                op: queued.op,
                forward: None,
            });
        }
        let Queued {
            op,
            cost,
            sender,
            forward,
        } = lanes.clients.pop_front()?;
        lanes.client_bytes -= cost;
        if let Some(sender) = sender {
            sender.cluster_bytes.fetch_sub(cost, Ordering::Relaxed);
        }
        Some(Taken { op, forward })
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

impl Cluster {
    /// Checks the URL; connects only when [`start`] runs.
    pub fn new(url: &str) -> redis::RedisResult<Cluster> {
        let client = redis::Client::open(url)?;
        Ok(Cluster {
            node: uuid::Uuid::new_v4().hyphenated().to_string(),
            client,
            backlog: Backlog::new(),
            in_flight: Mutex::new(InFlightTable::default()),
            next_forward: AtomicU64::new(1),
            nodes: Mutex::new(BTreeMap::new()),
            next_server: AtomicUsize::new(0),
            connected: AtomicBool::new(false),
            next_seq: AtomicU64::new(0),
            last_seq: Mutex::new(HashMap::new()),
            known_before_outage: AtomicUsize::new(0),
        })
    }

    fn nodes(&self) -> MutexGuard<'_, BTreeMap<String, RemoteNode>> {
        self.nodes.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn in_flight(&self) -> MutexGuard<'_, InFlightTable> {
        self.in_flight.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues an admin's or the cluster's own `op` for the other nodes; never waits. Dropped
    /// (and counted) only when the control lane itself is full: clients cannot fill it.
    pub fn publish(&self, shared: &Shared, op: Op) {
        if self.enqueue(shared, Lane::Control, op, None, None).is_err() {
            shared.metrics.cluster_dropped.inc();
            warn_throttled!("cluster backlog full: a message for other nodes was dropped");
        }
    }

    /// Queues `op`, caused by client `sender`, in the client lane; never waits. Refused when
    /// that lane or the sender's share of it is full: the client is told to send it later.
    pub fn publish_from_client(
        &self,
        shared: &Shared,
        op: Op,
        sender: &Arc<Peer>,
    ) -> Result<(), ProtocolError> {
        self.enqueue(shared, Lane::Clients, op, Some(sender), None)
            .map_err(|refused| {
                shared.metrics.cluster_dropped.inc();
                match refused {
                    // Many other clients filled the lane: not held against this one.
                    Refused::Full => ProtocolError::ClusterBusy(
                        "cluster busy: too much is waiting for the other nodes; send it again later",
                    ),
                    Refused::SenderBusy => ProtocolError::RateLimited(
                        "too much of yours is waiting for the other nodes; send it again later",
                    ),
                }
            })
    }

    fn enqueue(
        &self,
        shared: &Shared,
        lane: Lane,
        op: Op,
        sender: Option<&Arc<Peer>>,
        forward: Option<(Uuid, u64)>,
    ) -> Result<(), Refused> {
        self.backlog.push(lane, op, sender, forward)?;
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

    /// The next server on another node that may be chosen (alive, not suspect), round
    /// robin in a stable order, as (node, server id, whether that node sends receipts).
    /// O(nodes), nothing sorted or copied but the pick: it runs under the hub's pool lock.
    fn pick_server(&self) -> Option<(String, String, bool)> {
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
                Some(server) => return Some((node.clone(), server.clone(), n.receipts)),
                None => i -= n.servers.len(),
            }
        }
        None
    }

    /// Sends a client's `client_connect` to a server on another node, round robin, and keeps
    /// it in flight until settled. False when no other node has a server that may be chosen,
    /// or when there is no room (in flight, or in the client lane): it then waits in the
    /// local queue.
    pub fn forward_remote(&self, shared: &Shared, client: &Arc<Peer>, frame: Utf8Bytes) -> bool {
        self.send_forward(shared, client, frame, 1)
    }

    /// Runs under the hub's pool lock (the pending queue's order depends on it), so it does
    /// only O(1) work in the frame's size: the client lane's room is checked first, the frame
    /// is shared (not copied) and it is encoded later by the publisher.
    fn send_forward(
        &self,
        shared: &Shared,
        client: &Arc<Peer>,
        frame: Utf8Bytes,
        attempt: u32,
    ) -> bool {
        // Cheapest first: a full lane (a flood) refuses before anything else is done.
        let least = frame.len() + MESSAGE_OVERHEAD;
        if self.backlog.client_room(least, client).is_err() {
            return false;
        }
        let Some((node, server, receipts)) = self.pick_server() else {
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
                // A node that sends no receipts is not judged by one: the forward is held
                // as if receipted, and sent again only if that node dies.
                receipted: !receipts,
                attempt,
            };
            in_flight.insert(client.id, entry);
        }
        let op = Op::Forward {
            node,
            server,
            client: client.target.to_string(),
            frame: SharedFrame(frame),
            id,
        };
        let forward = Some((client.id, id));
        let queued = self
            .enqueue(shared, Lane::Clients, op, Some(client), forward)
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

    /// A client sent `client_connect` again: its earlier forward is settled by the new one.
    pub fn supersede(&self, client: &Peer) {
        self.in_flight().remove(client.id);
    }

    /// Receipt or failure from the node a forward went to.
    fn settle(&self, shared: &Shared, client: &str, id: u64, queued: bool) {
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
    fn forward_again(&self, shared: &Shared, entry: InFlight) {
        let Some(client) = entry.client.upgrade() else {
            return;
        };
        // A newer request of the client's, waiting here, wins.
        if shared.hub.is_pending(client.id) {
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
    fn sweep(&self, shared: &Shared) {
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

    /// Tells the other nodes which servers this node has (heartbeat; also right after a
    /// change, so a new server is usable cluster-wide at once).
    pub fn announce(&self, shared: &Shared) {
        let servers = shared.hub.local_servers();
        let receipts = true;
        self.publish(shared, Op::Servers { servers, receipts });
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
            Op::NotifyGroupOf {
                target,
                frame,
                from_client,
            } => {
                let local_group = hub.client(&target).and_then(|c| c.group());
                let group = local_group
                    .clone()
                    .unwrap_or_else(|| Arc::from(target.as_str()));
                let frame_bytes = Utf8Bytes::from(frame.clone());
                let n = hub.notify_group(&group, &frame_bytes);
                shared.metrics.sent("notify_group", n, frame_bytes.len());
                // This node has that connection: now everyone knows the group's name.
                if let Some(group) = local_group {
                    let op = Op::NotifyGroup {
                        group: group.to_string(),
                        frame,
                    };
                    if !from_client {
                        self.publish(shared, op);
                    } else if self.enqueue(shared, Lane::Clients, op, None, None).is_err() {
                        // A client's message, and the client lane is full: dropped, counted.
                        shared.metrics.cluster_dropped.inc();
                    }
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
                    // Its forward, if one was in flight, is settled.
                    self.supersede(&client);
                    shared.metrics.sent("client_connected", 1, frame.len());
                    client.send(Utf8Bytes::from(frame));
                }
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
                let queued = hub.offer_to_server(&server, frame.0);
                if queued {
                    shared.metrics.sent("client_connect", 1, len);
                } else {
                    // The server left (or is full) after the sender chose it: the sender
                    // forwards it elsewhere; a backend is never closed over a client's request.
                    debug!(%server, "forward for a server that has left or is full");
                }
                if id == 0 {
                    // From a node of an earlier version: it reads no receipts.
                    return;
                }
                let node = wire.from;
                let op = if queued {
                    Op::Forwarded { node, client, id }
                } else {
                    Op::ForwardFailed { node, client, id }
                };
                self.publish(shared, op);
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
            Op::Servers {
                mut servers,
                receipts,
            } => {
                let has_servers = !servers.is_empty();
                servers.sort();
                self.nodes().insert(
                    wire.from,
                    RemoteNode {
                        servers,
                        seen: Instant::now(),
                        suspect: false,
                        receipts,
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
    // Tracked, so shutdown waits for its farewell to the other nodes.
    let task = publisher(Arc::clone(&shared), Arc::clone(&cluster));
    shared.tracker.spawn(task);
    tokio::spawn(subscriber(Arc::clone(&shared), Arc::clone(&cluster)));
    tokio::spawn(sweeper(Arc::clone(&shared), Arc::clone(&cluster)));
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
            None => warn_throttled!("cluster: ignored a message that is not jssocket's"),
        }
    }
}

/// Publishes queued messages in order; on failure keeps the message and retries once Redis
/// is back and the other nodes have re-subscribed.
async fn publisher(shared: Arc<Shared>, cluster: Arc<Cluster>) {
    let mut backoff = Backoff::default();
    let mut connection: Option<redis::aio::MultiplexedConnection> = None;
    let mut pending: Option<String> = None;
    loop {
        let message = match pending.take() {
            Some(message) => message,
            None => tokio::select! {
                taken = cluster.backlog.pop() => {
                    let bytes = cluster.backlog.bytes();
                    shared.metrics.cluster_backlog_bytes.set(i64::try_from(bytes).unwrap_or(i64::MAX));
                    if let Some((client, id)) = taken.forward {
                        cluster.going_out(client, id);
                    }
                    cluster.encode(taken.op)
                }
                _ = shared.shutdown.cancelled() => {
                    return farewell(&cluster, connection).await;
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
async fn farewell(cluster: &Cluster, connection: Option<redis::aio::MultiplexedConnection>) {
    let Some(mut conn) = connection else {
        return;
    };
    let last = async {
        let queued = std::iter::from_fn(|| cluster.backlog.try_pop().map(|taken| taken.op))
            .collect::<Vec<_>>();
        for op in queued.into_iter().chain([Op::Leaving]) {
            let message = cluster.encode(op);
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

/// Checks the forwards in flight every [`SWEEP`].
async fn sweeper(shared: Arc<Shared>, cluster: Arc<Cluster>) {
    let mut tick = tokio::time::interval(SWEEP);
    loop {
        tokio::select! {
            _ = tick.tick() => cluster.sweep(&shared),
            _ = shared.shutdown.cancelled() => return,
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
