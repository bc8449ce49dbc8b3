//! Who is connected: the client table, the groups, the channels' subscribers, the server pool
//! and the client connects waiting for a server. Every event and the HTTP API act through these methods.
//!
//! The tables are concurrent maps (`DashMap`), so connections on different cores don't wait on
//! one global lock; the server pool is one small `Mutex` because round robin needs a single
//! cursor and it is touched only by `client_connect` and by servers coming and going.
//!
//! Lock order, to stay deadlock-free: a peer's `state` mutex may be held while a `groups` or
//! `channels` shard is locked, never the other way round; nothing is awaited while any lock is held.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use tokio::sync::Notify;
use tokio_tungstenite::tungstenite::Utf8Bytes;
use uuid::Uuid;

use crate::backplane::{CHANNEL_BUCKETS, Interest, Topic, channel_bucket};
use crate::memory::Memory;
use crate::outbox::{Outbox, Push, SharedFrame};
use crate::protocol::ProtocolError;

/// Why the server closes a connection, as sent in the close frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Close {
    pub code: u16,
    pub reason: &'static str,
}

impl Close {
    pub const NORMAL: Close = Close {
        code: 1000,
        reason: "",
    };
    pub const SHUTDOWN: Close = Close {
        code: 1001,
        reason: "server shutting down",
    };
    pub const PING_TIMEOUT: Close = Close {
        code: 1001,
        reason: "ping timeout",
    };
    /// In a text message or in a close frame's reason: tungstenite reports both alike, so
    /// the reason names neither.
    pub const INVALID_UTF8: Close = Close {
        code: 1007,
        reason: "invalid UTF-8",
    };
    /// A frame RFC 6455 forbids (reserved bits or opcodes, a bad control or close frame, a
    /// stray continuation); the connection refines the reason to name which.
    pub const PROTOCOL: Close = Close {
        code: 1002,
        reason: "protocol error",
    };
    pub const NOT_ADMIN: Close = Close {
        code: 1008,
        reason: "not an admin",
    };
    /// Too many admin password verifications waiting; the password was not judged.
    pub const AUTH_BUSY: Close = Close {
        code: 1008,
        reason: "authentication busy, retry",
    };
    pub const SLOW_CONSUMER: Close = Close {
        code: 1008,
        reason: "slow consumer",
    };
    pub const BAD_INPUT: Close = Close {
        code: 1008,
        reason: "too much bad input",
    };
    pub const TOO_BIG: Close = Close {
        code: 1009,
        reason: "message too big",
    };
    /// An unauthenticated peer keeps provoking error replies it does not read.
    pub const NOT_READING: Close = Close {
        code: 1008,
        reason: "not reading replies",
    };
    /// Partial inbound messages took the server over `--max-memory`; this one was the biggest.
    pub const MEMORY_INBOUND: Close = Close {
        code: 1009,
        reason: "unfinished message too big for the server's memory",
    };
    /// What its big messages left in its read buffer took the server over `--max-memory`;
    /// this connection held the most.
    pub const MEMORY_RETAINED: Close = Close {
        code: 1008,
        reason: "messages too big for the server's memory",
    };
}

/// One entry of a connection's outbound queue.
#[derive(Debug)]
pub enum Outgoing {
    /// A frame for this connection.
    Text(Utf8Bytes),
    /// A `client_connect` forwarded to this server on behalf of `client`; if this server
    /// closes before writing it, it is forwarded again instead of being lost.
    Forward {
        frame: Utf8Bytes,
        client: Weak<Peer>,
    },
    /// One frame for many connections (a broadcast), charged to the memory budget once.
    Relay(Arc<SharedFrame>),
    /// An error reply the peer provoked: counted apart, so a peer that does not read its
    /// errors is told from one that is merely busy (`events::UNREAD_REPLIES`).
    Error(Utf8Bytes),
}

impl Outgoing {
    pub fn frame(&self) -> &Utf8Bytes {
        match self {
            Outgoing::Text(frame) | Outgoing::Forward { frame, .. } | Outgoing::Error(frame) => {
                frame
            }
            Outgoing::Relay(shared) => shared.frame(),
        }
    }
}

/// What the hub knows of a connection; set by its own task and by admins' events.
#[derive(Debug, Default)]
pub struct PeerState {
    /// Sent `client_connect`: receives `notify_all` and id-targeted `notify_client`.
    pub registered: bool,
    /// Acknowledged by an admin's `client_connected`: may notify.
    pub acknowledged: bool,
    /// The group it is a member of (its `user` at acknowledgement).
    pub group: Option<Arc<str>>,
    /// The `user` given at acknowledgement (`None` when it was missing), for `users` filters.
    pub user: Option<Arc<str>>,
    /// Roles and groups given at acknowledgement, for publish filters.
    pub roles: Vec<String>,
    pub groups: Vec<String>,
    /// Channels it subscribed to, so closing removes it from each at once.
    pub subscriptions: Vec<Arc<str>>,
    /// Removed from the hub; late events must not add it back.
    pub closed: bool,
}

/// The shared handle of one connection: its id, its outbound queue and its hub state. The
/// connection's own task drains the queue into the socket.
#[derive(Debug)]
pub struct Peer {
    pub id: Uuid,
    /// The id as text: the connection's `target`.
    pub target: Box<str>,
    /// Frames waiting to be written, bounded in bytes so a slow reader costs bounded memory
    /// and never makes a sender wait.
    pub outbox: Outbox,
    /// Bytes read from its socket since its last complete message: a message it has begun
    /// and not finished, held in the reader's buffer. Charged to the memory budget.
    pub inbound: AtomicUsize,
    /// Bytes its reader's buffer keeps for good because of a big message it sent: the
    /// biggest so far, over `memory::RETAINED_FROM`. Charged to the memory budget.
    pub retained: AtomicUsize,
    /// Set once when something decides to close this connection; `kill` wakes its task.
    closing: OnceLock<Close>,
    kill: Notify,
    state: Mutex<PeerState>,
    /// Bytes this connection has waiting to be published to other nodes (cluster): capped
    /// per connection so one client cannot take the whole backlog. Raised when the cluster
    /// queues a message for it, lowered when the publisher takes it.
    pub cluster_bytes: AtomicUsize,
    /// Presented the admin password: never closed, nor refused a frame, for the memory
    /// budget (a backend's queue of forwarded client connects is often the biggest, and
    /// closing it would let any crowd of clients cut the backend off).
    admin: AtomicBool,
}

impl Peer {
    /// A connection of node `node`: its id is random but for its first four bytes, which
    /// name the node (see [`crate::backplane::node_of`]), so a message for it is routed to
    /// that node alone. The id stays a version 4 UUID (the version and variant bits are in
    /// bytes 6 and 8), with 90 random bits: no more guessable for it.
    pub fn new(node: u32, max_queue: usize, memory: &Arc<Memory>) -> Arc<Peer> {
        let mut bytes = *Uuid::new_v4().as_bytes();
        bytes[..4].copy_from_slice(&node.to_be_bytes());
        let id = Uuid::from_bytes(bytes);
        let peer = Peer {
            id,
            target: id.hyphenated().to_string().into_boxed_str(),
            outbox: Outbox::new(max_queue, Arc::clone(memory)),
            inbound: AtomicUsize::new(0),
            retained: AtomicUsize::new(0),
            closing: OnceLock::new(),
            kill: Notify::new(),
            state: Mutex::new(PeerState::default()),
            cluster_bytes: AtomicUsize::new(0),
            admin: AtomicBool::new(false),
        };
        Arc::new(peer)
    }

    /// Queues a frame without waiting. A queue over its byte limit closes the connection
    /// (slow consumer) and the frame is dropped. Returns whether it was queued.
    pub fn send(&self, frame: Utf8Bytes) -> bool {
        self.enqueue(Outgoing::Text(frame))
    }

    /// Queues an error reply this peer provoked (see [`Outgoing::Error`]).
    pub fn send_error(&self, frame: Utf8Bytes) -> bool {
        self.enqueue(Outgoing::Error(frame))
    }

    /// Marks this connection as an admin's (its password verified).
    pub fn set_admin(&self) {
        self.admin.store(true, Ordering::Relaxed);
    }

    pub fn is_admin(&self) -> bool {
        self.admin.load(Ordering::Relaxed)
    }

    fn enqueue(&self, item: Outgoing) -> bool {
        match self.outbox.push(item, self.is_admin()) {
            Push::Queued => true,
            Push::Full => {
                self.close(Close::SLOW_CONSUMER);
                false
            }
            Push::Closed => false,
        }
    }

    /// Queues if there is room, without closing the connection when there is not: for
    /// client connects, which can wait in the pending queue instead.
    fn offer(&self, item: Outgoing) -> bool {
        self.outbox.push(item, self.is_admin()) == Push::Queued
    }

    /// Asks this connection's task to close it; the first reason wins.
    pub fn close(&self, close: Close) {
        if self.closing.set(close).is_ok() {
            self.kill.notify_one();
        }
    }

    /// Whether [`Peer::close`] was called.
    pub fn is_closing(&self) -> bool {
        self.closing.get().is_some()
    }

    /// Resolves when [`Peer::close`] was called, with its reason.
    pub async fn closed(&self) -> Close {
        loop {
            if let Some(close) = self.closing.get() {
                return *close;
            }
            self.kill.notified().await;
        }
    }

    /// The hub state, tolerating a poisoned lock (a panic elsewhere must not spread).
    pub fn state(&self) -> MutexGuard<'_, PeerState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn is_acknowledged(&self) -> bool {
        self.state().acknowledged
    }

    pub fn group(&self) -> Option<Arc<str>> {
        self.state().group.clone()
    }
}

/// One frame delivered to many connections: every queue holds the same [`SharedFrame`], so
/// its bytes are charged to the memory budget once, not once per recipient (a 20 KiB
/// `notify_all` to 15,000 clients is 20 KiB, not 300 MiB, and must not look like a flood).
struct Broadcast<'a> {
    frame: &'a Utf8Bytes,
    /// Made for the first recipient, so a broadcast that reaches nobody charges nothing.
    shared: Option<Arc<SharedFrame>>,
}

impl<'a> Broadcast<'a> {
    fn new(frame: &'a Utf8Bytes) -> Broadcast<'a> {
        Broadcast {
            frame,
            shared: None,
        }
    }

    /// Queues the frame for `peer`, as [`Peer::send`] does.
    fn send(&mut self, peer: &Peer) -> bool {
        let frame = self.frame;
        let shared = self
            .shared
            .get_or_insert_with(|| SharedFrame::new(frame.clone(), peer.outbox.memory()));
        peer.enqueue(Outgoing::Relay(Arc::clone(shared)))
    }
}

/// What an admin's `client_connected` sets on a client.
#[derive(Debug)]
pub struct Acknowledgement {
    pub group: Arc<str>,
    /// The `user` as given; `None` when missing or empty (the group is then `public`).
    pub user: Option<Arc<str>>,
    pub roles: Vec<String>,
    pub groups: Vec<String>,
}

/// Who of a channel's subscribers a `publish` reaches.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Filter {
    /// Every subscriber.
    All,
    /// Subscribers with one of these roles.
    Roles(Vec<String>),
    /// Subscribers in one of these groups.
    Groups(Vec<String>),
    /// Subscribers whose `user` is one of these.
    Users(Vec<String>),
}

impl Filter {
    fn admits(&self, state: &PeerState) -> bool {
        let any_of = |wanted: &[String], have: &[String]| wanted.iter().any(|w| have.contains(w));
        match self {
            Filter::All => true,
            Filter::Roles(roles) => any_of(roles, &state.roles),
            Filter::Groups(groups) => any_of(groups, &state.groups),
            Filter::Users(users) => state
                .user
                .as_deref()
                .is_some_and(|user| users.iter().any(|u| u == user)),
        }
    }
}

/// Most bytes of client connects waiting for a server, whatever their count.
const MAX_PENDING_BYTES: usize = 64 * 1024 * 1024;

/// The refusal when the queue of waiting client connects is full.
/// A load refusal: it says nothing about what this client did.
const PENDING_FULL: ProtocolError = ProtocolError::QueueFull(
    "no server can take it now and the queue of waiting client connects is full",
);

/// Most waiting client connects handed to servers per hold of the pool lock: a long queue is
/// flushed in batches, so other connections' events get the lock in between.
const FLUSH_BATCH: usize = 64;

/// Most channels one connection may subscribe to.
pub const MAX_SUBSCRIPTIONS: usize = 256;

/// What became of a `client_connect`.
#[derive(Debug, PartialEq, Eq)]
pub enum Forwarded {
    /// Written to a server's queue.
    Sent,
    /// No server: queued until one joins or it expires.
    Queued,
}

/// Client connects waiting for a server: oldest first, at most one per client.
///
/// Every operation is O(1) (amortised) whatever the queue holds, because it runs under the
/// pool lock on every `client_connect`: a flood of them must not turn into a scan of the whole
/// queue per message. The request itself lives in a per-client slot; the order queue holds
/// only (client, generation) tickets. A client that asks again gets a new generation in its
/// slot and a new ticket at the back; its old ticket is stale and skipped when it reaches the
/// front. The byte total and the count cover the slots only, kept as they change.
#[derive(Default)]
struct PendingQueue {
    order: VecDeque<Ticket>,
    slots: HashMap<Uuid, Slot>,
    /// Bytes of the frames in `slots`.
    bytes: usize,
    next_generation: u64,
}

struct Ticket {
    client: Uuid,
    generation: u64,
}

struct Slot {
    client: Weak<Peer>,
    frame: Utf8Bytes,
    since: Instant,
    generation: u64,
}

impl PendingQueue {
    fn len(&self) -> usize {
        self.slots.len()
    }

    fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Queues `frame` for `client` at the back, replacing its waiting request if any.
    fn push(&mut self, client: &Arc<Peer>, frame: Utf8Bytes) {
        self.remove(client.id);
        let generation = self.next_generation;
        self.next_generation += 1;
        self.bytes += frame.len();
        self.slots.insert(
            client.id,
            Slot {
                client: Arc::downgrade(client),
                frame,
                since: Instant::now(),
                generation,
            },
        );
        self.order.push_back(Ticket {
            client: client.id,
            generation,
        });
        // Stale tickets are dropped at the front; a client that keeps asking while an old
        // request blocks the front leaves them behind it. Compacting once they outnumber the
        // live ones keeps the tickets within twice the slots, at O(1) amortised per push.
        if self.order.len() > 2 * self.slots.len() + 64 {
            let slots = &self.slots;
            self.order.retain(|t| is_current(slots, t));
        }
    }

    /// Forgets `client`'s waiting request (its ticket goes stale).
    fn remove(&mut self, client: Uuid) -> Option<Slot> {
        let slot = self.slots.remove(&client)?;
        self.bytes -= slot.frame.len();
        Some(slot)
    }

    /// The oldest live request (its client still connected), dropping stale tickets and
    /// requests of clients that are gone on the way.
    fn front(&mut self) -> Option<(&Slot, Arc<Peer>)> {
        loop {
            let ticket = self.order.front()?;
            let id = ticket.client;
            if !is_current(&self.slots, ticket) {
                self.order.pop_front();
                continue;
            }
            match self.slots.get(&id).and_then(|s| s.client.upgrade()) {
                Some(client) => return self.slots.get(&id).map(|slot| (slot, client)),
                None => {
                    self.order.pop_front();
                    self.remove(id);
                }
            }
        }
    }

    /// Takes the oldest live request.
    fn pop_front(&mut self) -> Option<(Arc<Peer>, Utf8Bytes)> {
        let (_, client) = self.front()?;
        self.order.pop_front();
        let slot = self.remove(client.id)?;
        Some((client, slot.frame))
    }
}

fn is_current(slots: &HashMap<Uuid, Slot>, ticket: &Ticket) -> bool {
    slots
        .get(&ticket.client)
        .is_some_and(|s| s.generation == ticket.generation)
}

#[derive(Default)]
struct ServerPool {
    servers: Vec<Arc<Peer>>,
    /// Index of the server that gets the next `client_connect`.
    next: usize,
    pending: PendingQueue,
}

impl ServerPool {
    fn pick(&mut self) -> Option<&Arc<Peer>> {
        if self.servers.is_empty() {
            return None;
        }
        let i = self.next % self.servers.len();
        self.next = i + 1;
        self.servers.get(i)
    }
}

pub struct Hub {
    /// Registered clients by id.
    clients: DashMap<Uuid, Arc<Peer>>,
    /// Group name → its members.
    groups: Members,
    /// Channel name → its subscribers.
    channels: Members,
    /// Clients acknowledged and still open, for metrics.
    acknowledged: AtomicUsize,
    pool: Mutex<ServerPool>,
    pending_limit: usize,
    pending_timeout: Duration,
    /// This node's tag, written in its connections' ids.
    node: u32,
    /// The groups and channels with local members, followed by the backplane (cluster only).
    interest: Option<Arc<Interest>>,
    /// Channels with local members, per bucket (see [`Topic`]); cluster only.
    channel_buckets: Box<[AtomicU32]>,
}

impl Hub {
    pub fn new(
        pending_limit: usize,
        pending_timeout: Duration,
        node: u32,
        interest: Option<Arc<Interest>>,
    ) -> Hub {
        Hub {
            node,
            channel_buckets: if interest.is_some() {
                (0..CHANNEL_BUCKETS).map(|_| AtomicU32::new(0)).collect()
            } else {
                Box::default()
            },
            interest,
            clients: DashMap::new(),
            groups: DashMap::new(),
            channels: DashMap::new(),
            acknowledged: AtomicUsize::new(0),
            pool: Mutex::new(ServerPool::default()),
            pending_limit,
            pending_timeout,
        }
    }

    /// A new connection's handle, its id naming this node.
    pub fn new_peer(&self, max_queue: usize, memory: &Arc<Memory>) -> Arc<Peer> {
        Peer::new(self.node, max_queue, memory)
    }

    /// The topics the backplane follows; `None` on a single node.
    pub fn interest(&self) -> Option<&Arc<Interest>> {
        self.interest.as_ref()
    }

    /// Whether `topic` has local members now.
    pub fn has_members(&self, topic: &Topic) -> bool {
        match topic {
            Topic::Group(name) => self.groups.contains_key(name),
            Topic::Channels(bucket) => self
                .channel_buckets
                .get(usize::from(*bucket))
                .is_some_and(|n| n.load(Ordering::Relaxed) > 0),
        }
    }

    /// Every group and channel with local members (to subscribe to them all again after
    /// the backplane reconnects).
    pub fn topics(&self) -> Vec<Topic> {
        let groups = self
            .groups
            .iter()
            .map(|e| Topic::Group(Arc::clone(e.key())));
        let channels = (0..CHANNEL_BUCKETS)
            .map(|b| Topic::Channels(b as u16))
            .filter(|topic| self.has_members(topic));
        groups.chain(channels).collect()
    }

    /// Tells the backplane a name got its first local member or lost its last.
    fn touched(&self, changed: bool, topic: impl FnOnce() -> Topic) {
        if changed && let Some(interest) = &self.interest {
            interest.touch(topic());
        }
    }

    /// A channel got its first local member (`by` 1) or lost its last (-1): counts it in
    /// its bucket, and tells the backplane when the bucket's first channel came or its last
    /// went. (Cluster only: on a single node nothing follows the buckets.)
    fn bucket_changed(&self, changed: bool, channel: &str, by: i32) {
        if !changed || self.interest.is_none() {
            return;
        }
        let bucket = channel_bucket(channel);
        let Some(count) = self.channel_buckets.get(usize::from(bucket)) else {
            return;
        };
        let was = if by > 0 {
            count.fetch_add(1, Ordering::Relaxed)
        } else {
            count.fetch_sub(1, Ordering::Relaxed)
        };
        let edge = if by > 0 { was == 0 } else { was == 1 };
        self.touched(edge, || Topic::Channels(bucket));
    }

    fn pool(&self) -> MutexGuard<'_, ServerPool> {
        self.pool.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A registered client by its target text (the exact lowercase hyphenated id).
    pub fn client(&self, target: &str) -> Option<Arc<Peer>> {
        let id = parse_target(target)?;
        self.clients.get(&id).map(|entry| Arc::clone(entry.value()))
    }

    pub fn register_client(&self, peer: &Arc<Peer>) {
        let mut state = peer.state();
        if state.closed {
            return;
        }
        state.registered = true;
        self.clients.insert(peer.id, Arc::clone(peer));
    }

    /// Acknowledges the client named by `target`: moves it to `ack.group` (leaving its
    /// previous group) and remembers its roles and groups. Returns the client.
    pub fn acknowledge(&self, target: &str, ack: Acknowledgement) -> Option<Arc<Peer>> {
        let client = self.client(target)?;
        let mut state = client.state();
        if state.closed || !state.registered {
            return None;
        }
        if let Some(old) = state.group.take()
            && old != ack.group
        {
            self.leave_group(&old, client.id);
        }
        let first = join(&self.groups, &ack.group, &client);
        self.touched(first, || Topic::Group(Arc::clone(&ack.group)));
        state.group = Some(ack.group);
        state.user = ack.user;
        state.roles = ack.roles;
        state.groups = ack.groups;
        if !state.acknowledged {
            state.acknowledged = true;
            self.acknowledged.fetch_add(1, Ordering::Relaxed);
        }
        drop(state);
        Some(client)
    }

    fn leave_group(&self, group: &str, id: Uuid) {
        let last = leave(&self.groups, group, id);
        self.touched(last, || Topic::Group(Arc::from(group)));
    }

    /// The group a `notify_group` target means: the group of the client with that id, else
    /// the group of that name.
    pub fn resolve_group(&self, target: &str) -> Arc<str> {
        self.client(target)
            .and_then(|client| client.group())
            .unwrap_or_else(|| Arc::from(target))
    }

    /// Delivers `frame` to the client `target`; returns how many got it (0 or 1).
    pub fn notify_client(&self, target: &str, frame: Utf8Bytes) -> usize {
        match self.client(target) {
            Some(client) => usize::from(client.send(frame)),
            None => 0,
        }
    }

    /// Delivers `frame` to every member of `group`.
    pub fn notify_group(&self, group: &str, frame: &Utf8Bytes) -> usize {
        let mut broadcast = Broadcast::new(frame);
        match self.groups.get(group) {
            Some(members) => members.values().filter(|peer| broadcast.send(peer)).count(),
            None => 0,
        }
    }

    /// The members of `group` now (a copy: sent to outside the map's lock).
    pub fn group_members(&self, group: &str) -> Vec<Arc<Peer>> {
        self.groups
            .get(group)
            .map(|members| members.values().cloned().collect())
            .unwrap_or_default()
    }

    /// Delivers `frame` to every registered client.
    pub fn notify_all(&self, frame: &Utf8Bytes) -> usize {
        let mut broadcast = Broadcast::new(frame);
        self.clients
            .iter()
            .filter(|entry| broadcast.send(entry.value()))
            .count()
    }

    /// Adds a server to the pool (once) and hands it the client connects that were waiting.
    /// Returns false if it was already in the pool.
    pub fn join_pool(&self, server: &Arc<Peer>) -> bool {
        if server.state().closed {
            return false;
        }
        let mut pool = self.pool();
        if pool.servers.iter().any(|s| s.id == server.id) {
            return false;
        }
        pool.servers.push(Arc::clone(server));
        drop(pool);
        self.flush_pending(|_, _| false);
        true
    }

    /// Forwards a client's `client_connect` to one local server, round robin; else to a
    /// server elsewhere (`remote`, in a cluster); else queues it until a server joins.
    /// O(1) amortised, whatever the queue holds (see [`PendingQueue`]).
    ///
    /// `remote` runs under the pool lock: that keeps the queue's order (oldest first, a new
    /// request straight out only when none waits) without a second queue, so it must be
    /// cheap whatever the frame's size (the cluster's checks its lane's room first and copies
    /// and encodes nothing).
    pub fn forward_connect(
        &self,
        client: &Arc<Peer>,
        frame: Utf8Bytes,
        mut remote: impl FnMut(&Arc<Peer>, Utf8Bytes) -> bool,
    ) -> Result<Forwarded, ProtocolError> {
        let mut pool = self.pool();
        // A client that asks again replaces its waiting request (else both would be sent).
        pool.pending.remove(client.id);
        // Older requests first: a new one only goes straight out when none is waiting.
        flush_batch(&mut pool, &mut remote);
        if pool.pending.is_empty()
            && (forward(&mut pool, client, frame.clone()) || remote(client, frame.clone()))
        {
            return Ok(Forwarded::Sent);
        }
        if !self.pending_has_room(&pool.pending, frame.len()) {
            return Err(PENDING_FULL);
        }
        pool.pending.push(client, frame);
        Ok(Forwarded::Queued)
    }

    /// Room in the waiting queue for one more request of `len` bytes (`--pending-connects`
    /// requests, [`MAX_PENDING_BYTES`]).
    fn pending_has_room(&self, pending: &PendingQueue, len: usize) -> bool {
        pending.len() < self.pending_limit && pending.bytes + len <= MAX_PENDING_BYTES
    }

    /// Hands the waiting client connects to servers, oldest first: this node's, else
    /// `remote` ones (a server joined elsewhere in the cluster). Stops at the first that no
    /// server can take. The lock is taken per batch, never for the whole queue.
    pub fn flush_pending(&self, mut remote: impl FnMut(&Arc<Peer>, Utf8Bytes) -> bool) {
        loop {
            let more = flush_batch(&mut self.pool(), &mut remote);
            if !more {
                return;
            }
        }
    }

    /// The ids of this node's servers, for the cluster's heartbeat.
    pub fn local_servers(&self) -> Vec<String> {
        self.pool()
            .servers
            .iter()
            .map(|s| s.target.to_string())
            .collect()
    }

    /// Queues a `client_connect` from another node for one of this node's servers, if it has
    /// room (a full server is not closed for it). False: gone or full.
    pub fn offer_to_server(&self, target: &str, frame: Utf8Bytes) -> bool {
        self.local_server(target)
            .is_some_and(|server| server.offer(Outgoing::Text(frame)))
    }

    /// Whether `client` has a request waiting in the queue.
    pub fn is_pending(&self, client: Uuid) -> bool {
        self.pool().pending.slots.contains_key(&client)
    }

    /// One of this node's servers by id.
    pub fn local_server(&self, target: &str) -> Option<Arc<Peer>> {
        self.pool()
            .servers
            .iter()
            .find(|s| &*s.target == target)
            .cloned()
    }

    /// Answers the client connects that waited longer than the pending timeout with an
    /// error. Called periodically.
    pub fn expire_pending(&self) {
        // Servers whose queues were full a moment ago may have room again.
        self.flush_pending(|_, _| false);
        loop {
            // Taken in batches and answered outside the lock.
            let mut expired = Vec::new();
            {
                let mut pool = self.pool();
                while expired.len() < FLUSH_BATCH {
                    match pool.pending.front() {
                        Some((slot, _)) if slot.since.elapsed() >= self.pending_timeout => {}
                        _ => break,
                    }
                    if let Some((client, _)) = pool.pending.pop_front() {
                        expired.push(client);
                    }
                }
            }
            let done = expired.len() < FLUSH_BATCH;
            for client in expired {
                let error =
                    ProtocolError::NoServer("no server could take this client_connect in time");
                client.send(error.to_frame(Some("client_connect")));
            }
            if done {
                return;
            }
        }
    }

    /// Removes a closed connection from everything at once: client table, group, server
    /// pool, waiting client connects.
    pub fn remove(&self, peer: &Arc<Peer>) {
        self.clients.remove(&peer.id);
        {
            let mut state = peer.state();
            state.closed = true;
            state.registered = false;
            if state.acknowledged {
                state.acknowledged = false;
                self.acknowledged.fetch_sub(1, Ordering::Relaxed);
            }
            if let Some(group) = state.group.take() {
                self.leave_group(&group, peer.id);
            }
            for channel in std::mem::take(&mut state.subscriptions) {
                self.leave_channel(&channel, peer.id);
            }
        }
        let mut pool = self.pool();
        if let Some(i) = pool.servers.iter().position(|s| s.id == peer.id) {
            pool.servers.remove(i);
            if i < pool.next {
                pool.next -= 1;
            }
        }
        pool.pending.remove(peer.id);
    }

    /// Sends the `client_connect` forwards a closed server never wrote to another server (or
    /// back to the waiting queue), so a server closing never loses a client's request.
    /// The waiting queue's limits hold here too: a request it has no room for is answered
    /// with an error (outside the lock), like a new one would be.
    pub fn reforward(&self, unsent: Vec<Outgoing>) {
        let mut refused = Vec::new();
        {
            let mut pool = self.pool();
            for item in unsent {
                if let Outgoing::Forward { frame, client } = item
                    && let Some(client) = client.upgrade()
                    && !forward(&mut pool, &client, frame.clone())
                    // A newer request of the same client, already waiting, wins.
                    && !pool.pending.slots.contains_key(&client.id)
                {
                    if self.pending_has_room(&pool.pending, frame.len()) {
                        pool.pending.push(&client, frame);
                    } else {
                        refused.push(client);
                    }
                }
            }
        }
        for client in refused {
            client.send(PENDING_FULL.to_frame(Some("client_connect")));
        }
    }

    /// Subscribes a registered client to a channel (once).
    pub fn subscribe(&self, peer: &Arc<Peer>, channel: &str) -> Result<(), ProtocolError> {
        let mut state = peer.state();
        if state.closed || !state.registered {
            return Err(ProtocolError::Forbidden(
                "subscribe needs a registered client: send client_connect first",
            ));
        }
        if state.subscriptions.iter().any(|c| &**c == channel) {
            return Ok(());
        }
        if state.subscriptions.len() >= MAX_SUBSCRIPTIONS {
            return Err(ProtocolError::TooManySubscriptions(MAX_SUBSCRIPTIONS));
        }
        let channel: Arc<str> = Arc::from(channel);
        let first = join(&self.channels, &channel, peer);
        self.bucket_changed(first, &channel, 1);
        state.subscriptions.push(channel);
        Ok(())
    }

    /// Unsubscribes; unsubscribing from a channel one is not in is not an error.
    pub fn unsubscribe(&self, peer: &Arc<Peer>, channel: &str) {
        let mut state = peer.state();
        if let Some(i) = state.subscriptions.iter().position(|c| &**c == channel) {
            state.subscriptions.swap_remove(i);
            self.leave_channel(channel, peer.id);
        }
    }

    fn leave_channel(&self, channel: &str, id: Uuid) {
        let last = leave(&self.channels, channel, id);
        self.bucket_changed(last, channel, -1);
    }

    /// Delivers `frame` to the subscribers of `channel` that `filter` admits.
    pub fn publish(&self, channel: &str, filter: &Filter, frame: &Utf8Bytes) -> usize {
        // Snapshot the subscribers first: a filter reads each one's state, and a peer's state
        // lock must never be taken while a channel shard is held (see the lock order above).
        let subscribers: Vec<Arc<Peer>> = match self.channels.get(channel) {
            Some(members) => members.values().cloned().collect(),
            None => return 0,
        };
        let mut broadcast = Broadcast::new(frame);
        subscribers
            .iter()
            .filter(|peer| filter.admits(&peer.state()))
            .filter(|peer| broadcast.send(peer))
            .count()
    }

    /// Counts for logs, metrics and tests.
    pub fn stats(&self) -> HubStats {
        let pool = self.pool();
        HubStats {
            clients: self.clients.len(),
            acknowledged: self.acknowledged.load(Ordering::Relaxed),
            groups: self.groups.len(),
            channels: self.channels.len(),
            servers: pool.servers.len(),
            pending: pool.pending.len(),
            pending_bytes: pool.pending.bytes,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HubStats {
    pub clients: usize,
    pub acknowledged: usize,
    pub groups: usize,
    pub channels: usize,
    pub servers: usize,
    pub pending: usize,
    /// Bytes of the client connects waiting for a server.
    pub pending_bytes: usize,
}

/// A group or a channel: a name and its members.
type Members = DashMap<Arc<str>, HashMap<Uuid, Arc<Peer>>>;

/// Adds a member; true when it is the name's first.
fn join(map: &Members, name: &Arc<str>, peer: &Arc<Peer>) -> bool {
    let mut members = map.entry(Arc::clone(name)).or_default();
    members.insert(peer.id, Arc::clone(peer)).is_none() && members.len() == 1
}

/// Removes a member, and the name with its last member; true when the name went.
fn leave(map: &Members, name: &str, id: Uuid) -> bool {
    map.remove_if_mut(name, |_, members| {
        members.remove(&id);
        members.is_empty()
    })
    .is_some()
}

/// Sends a forward to the next live server; false if the pool is empty.
/// Each server is tried once, round robin; one whose queue is full is skipped rather than
/// overflowed, so a burst of client connects (or a flood of large ones) waits in the pending
/// queue instead of getting a backend closed as a slow consumer.
fn forward(pool: &mut ServerPool, client: &Arc<Peer>, frame: Utf8Bytes) -> bool {
    for _ in 0..pool.servers.len() {
        let Some(server) = pool.pick() else { break };
        let item = Outgoing::Forward {
            frame: frame.clone(),
            client: Arc::downgrade(client),
        };
        if server.offer(item) {
            return true;
        }
    }
    false
}

/// Hands up to [`FLUSH_BATCH`] waiting client connects to servers (local, else `remote`),
/// oldest first, as long as one has room. True when a whole batch went out: there may be more.
fn flush_batch(
    pool: &mut ServerPool,
    remote: &mut impl FnMut(&Arc<Peer>, Utf8Bytes) -> bool,
) -> bool {
    for _ in 0..FLUSH_BATCH {
        let Some((slot, client)) = pool.pending.front() else {
            return false;
        };
        let frame = slot.frame.clone();
        if forward(pool, &client, frame.clone()) || remote(&client, frame.clone()) {
            pool.pending.pop_front();
            continue;
        }
        let len = frame.len();
        if !pool.servers.is_empty() && pool.servers.iter().all(|s| !s.outbox.could_ever_fit(len)) {
            // Larger than any server's whole queue: it would block everything behind it.
            pool.pending.pop_front();
            let error = ProtocolError::NoServer(
                "this client_connect is larger than a server's outbound queue (--max-queue-bytes)",
            );
            client.send(error.to_frame(Some("client_connect")));
            continue;
        }
        return false;
    }
    true
}

/// Whether `target` has the form of a connection id (it may still name no connection).
pub fn looks_like_id(target: &str) -> bool {
    parse_target(target).is_some()
}

/// Ids are matched as the original relay did, as exact strings: only the lowercase
/// hyphenated form names a connection.
pub(crate) fn parse_target(target: &str) -> Option<Uuid> {
    if target.len() != 36 || target.bytes().any(|b| b.is_ascii_uppercase()) {
        return None;
    }
    Uuid::try_parse(target).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(len: usize) -> Utf8Bytes {
        Utf8Bytes::from("x".repeat(len))
    }

    /// A peer with a 1 MiB queue under a budget that never binds.
    fn peer() -> Arc<Peer> {
        let memory = Arc::new(crate::memory::Memory::new(
            usize::MAX / 4,
            &crate::metrics::Metrics::new(),
        ));
        Peer::new(7, 1 << 20, &memory)
    }

    /// The running byte total and count always equal what the live requests hold, through
    /// replacing, removing, clients going away, expiry and hand-over.
    #[test]
    fn the_pending_queue_keeps_its_byte_total_across_replace_remove_and_expire() {
        let hub = Hub::new(100, Duration::ZERO, 7, None);
        let no_remote = |_: &Arc<Peer>, _: Utf8Bytes| false;
        let [a, b, c, d] = [(); 4].map(|_| peer());
        let check = |hub: &Hub, count: usize, bytes: usize| {
            let stats = hub.stats();
            assert_eq!((stats.pending, stats.pending_bytes), (count, bytes));
            let pool = hub.pool();
            let sum: usize = pool.pending.slots.values().map(|s| s.frame.len()).sum();
            assert_eq!(sum, bytes, "running total drifted from the slots");
        };
        for (peer, len) in [(&a, 10), (&b, 20), (&c, 30)] {
            assert_eq!(
                hub.forward_connect(peer, frame(len), no_remote),
                Ok(Forwarded::Queued)
            );
        }
        check(&hub, 3, 60);
        // A repeat replaces the waiting request: same count, the new size.
        hub.forward_connect(&a, frame(15), no_remote).unwrap();
        check(&hub, 3, 65);
        // Many repeats leave stale tickets behind, compacted, never counted.
        for i in 0..500 {
            hub.forward_connect(&b, frame(i % 7 + 1), no_remote)
                .unwrap();
        }
        check(&hub, 3, 15 + 30 + 499 % 7 + 1);
        assert!(hub.pool().pending.order.len() <= 2 * 3 + 64 + 1);
        // A closed client is removed at once.
        hub.remove(&c);
        check(&hub, 2, 15 + 499 % 7 + 1);
        // A client dropped without `remove` is skipped (and uncounted) when reached.
        hub.forward_connect(&d, frame(40), no_remote).unwrap();
        drop(d);
        hub.expire_pending();
        check(&hub, 0, 0);
        // Expired clients got no_server, once each; a's queued frame is the last it sent.
        for peer in [&a, &b] {
            let Some(Outgoing::Text(error)) = peer.outbox.pop() else {
                panic!("no error for an expired client connect");
            };
            assert!(error.as_str().contains("no_server"), "{error}");
            assert!(peer.outbox.pop().is_none());
        }
        // Hand-over: a server takes them oldest first, each client's latest request once.
        let hub = Hub::new(100, Duration::from_secs(60), 7, None);
        let [a, b] = [(); 2].map(|_| peer());
        hub.forward_connect(&a, frame(1), no_remote).unwrap();
        hub.forward_connect(&b, frame(2), no_remote).unwrap();
        hub.forward_connect(&a, frame(3), no_remote).unwrap();
        let server = peer();
        assert!(hub.join_pool(&server));
        check(&hub, 0, 0);
        let mut got = Vec::new();
        while let Some(item) = server.outbox.pop() {
            got.push(item.frame().len());
        }
        assert_eq!(got, [2, 3]);
        // The limit counts live requests: a repeat is let in when full, a newcomer is not.
        let hub = Hub::new(2, Duration::from_secs(60), 7, None);
        let [a, b, c] = [(); 3].map(|_| peer());
        hub.forward_connect(&a, frame(1), no_remote).unwrap();
        hub.forward_connect(&b, frame(1), no_remote).unwrap();
        assert!(hub.forward_connect(&c, frame(1), no_remote).is_err());
        assert_eq!(
            hub.forward_connect(&b, frame(5), no_remote),
            Ok(Forwarded::Queued)
        );
        check(&hub, 2, 6);
    }
}
