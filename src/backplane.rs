//! The backplane: what a node tells the other nodes of a cluster, and how.
//!
//! Two seams, both narrow:
//! - [`Backplane`], what the relay asks of the cluster: pass a delivery on, announce this
//!   node's servers, forward a client connect to a server elsewhere and learn its fate. A
//!   single node has [`Local`], which does nothing; a cluster has
//!   [`crate::cluster::Cluster`], the node logic (routing, heartbeats, forwards, receipts,
//!   backlog), the same whatever carries its messages.
//! - [`Transport`], what carries them: publish a message on a topic, subscribe to topics.
//!   [`Loopback`] (in this process: tests run every cross-node scenario on it without Redis),
//!   [`crate::cluster::redis::Redis`] (one Redis, Pub/Sub) and
//!   [`crate::cluster::redis::RedisCluster`] (a Redis Cluster, sharded Pub/Sub). Another engine
//!   (NATS, Redis Streams) is one more file implementing [`Transport`].
//!
//! Routing, not broadcast: a node subscribes to its own topic (connection ids name their
//! node), to one topic per group and per channel it has local members in ([`Interest`]), and
//! to one topic for what concerns every node (`notify_all`, heartbeats).

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use futures_util::Stream;
use sha2::{Digest, Sha256};
use tokio::sync::{Notify, mpsc};
use tokio_tungstenite::tungstenite::Utf8Bytes;
use uuid::Uuid;

use crate::delivery::{Delivery, Route, Sender};
use crate::kinds::Frame;
use crate::peer::Peer;
use crate::protocol::ProtocolError;
use crate::relay::Relay;

/// What the relay asks of the cluster. Every method is cheap and never waits: what must go
/// out is queued for the backplane's own tasks. The one exception is the future of
/// [`Backplane::wait_applied`], which an admin's `membership` or `disconnect` awaits (bounded)
/// so its answer means every node applied the change.
pub trait Backplane: Send + Sync {
    /// Starts the backplane's tasks for a running relay.
    fn start(self: Arc<Self>, _relay: &Arc<Relay>) {}

    /// Passes `delivery` on to the nodes `route` names. Refused (with the error for the
    /// sender) only for a client's delivery when the cluster cannot take more of it.
    fn publish(
        &self,
        _relay: &Relay,
        _route: Route,
        _delivery: Delivery,
        _sender: Sender<'_>,
    ) -> Result<(), ProtocolError> {
        Ok(())
    }

    /// Whether connection id `target` belongs to another node (so a delivery to it goes
    /// there instead of being answered `unknown_target`).
    fn elsewhere(&self, _target: &str) -> bool {
        false
    }

    /// Whether a delivery of about `bytes` from `client` could be passed on now: asked
    /// before it is delivered here, so a refused client retries a message nobody got yet.
    fn room_for(
        &self,
        _relay: &Relay,
        _client: &Arc<Peer>,
        _bytes: usize,
    ) -> Result<(), ProtocolError> {
        Ok(())
    }

    /// This node's server pool changed: tell the other nodes now.
    fn servers_changed(&self, _relay: &Relay) {}

    /// Offers a client's `client_connect` to a server on another node, round robin. False:
    /// none can take it now (it waits in the local queue).
    fn forward_connect(&self, _relay: &Relay, _client: &Arc<Peer>, _frame: Utf8Bytes) -> bool {
        false
    }

    /// Offers a client's call (`invoke`, with its canonical `id`) to a server on another
    /// node, round robin. False: none can take it now (the caller is answered `no_server`).
    fn forward_invoke(
        &self,
        _relay: &Relay,
        _client: &Arc<Peer>,
        _id: Option<&str>,
        _frame: Utf8Bytes,
    ) -> bool {
        false
    }

    /// The client's earlier `client_connect` is settled (it asked again, or was
    /// acknowledged): it is not forwarded again.
    fn settled(&self, _client: &Peer) {}

    /// Why this node cannot do its job through the backplane now (`/readyz` answers 503 with
    /// it): `None` when it can. Read from state the backplane keeps, never a round trip.
    fn not_ready(&self) -> Option<String> {
        None
    }

    /// The topics this node needs, kept by the hub; `None` on a single node.
    fn interest(&self) -> Option<Arc<Interest>> {
        None
    }

    /// This node's id as it is written in connection ids (see [`node_of`]).
    /// Numbers a change (`membership`, `disconnect`) whose confirmations this node will wait
    /// for; `None` on a single node, which has nobody to wait for.
    fn change_id(&self) -> Option<crate::membership::Ack> {
        None
    }

    /// Confirms to the origin of change `ack` that this node applied it, matching `count`
    /// connections.
    fn applied(&self, _relay: &Relay, _ack: crate::membership::Ack, _count: usize) {}

    /// Waits until the live nodes (or only node `only`) confirmed change `ack`, for at most
    /// `limit`; says who confirmed, and who did not in time.
    fn wait_applied(
        &self,
        _ack: crate::membership::Ack,
        _only: Option<u32>,
        _limit: std::time::Duration,
    ) -> BoxFuture<'_, crate::membership::Confirmed> {
        Box::pin(std::future::ready(crate::membership::Confirmed::default()))
    }

    fn node_tag(&self) -> u32 {
        0
    }

    /// Asks every other node a presence query (SPEC §12); `None` on a single node. Their
    /// answers arrive on [`crate::presence::Asked::answers`] (see [`crate::presence`]).
    fn ask(
        &self,
        _relay: &Relay,
        _query: &crate::presence::Query,
    ) -> Option<crate::presence::Asked> {
        None
    }

    /// The cluster, when this is one (to publish an answer from a task of its own).
    fn as_cluster(&self) -> Option<&crate::cluster::Cluster> {
        None
    }
}

/// A single node: nothing to tell anyone.
pub struct Local {
    /// Random, like a cluster node's, so ids look alike (and keep their random bits)
    /// whether or not there is a cluster.
    tag: u32,
}

impl Local {
    pub fn new() -> Local {
        let id = uuid::Uuid::new_v4();
        let bytes = id.as_bytes();
        Local {
            tag: u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]),
        }
    }
}

impl Default for Local {
    fn default() -> Local {
        Local::new()
    }
}

impl Backplane for Local {
    fn node_tag(&self) -> u32 {
        self.tag
    }
}

// ------------------------------------------------------------------------------- topics

/// What a node subscribes to for its members: a group's own topic, or the bucket of its
/// channels' names.
///
/// Groups are named by admins (a user each) and are as many as acknowledged clients at
/// most. Channels are named by clients, up to 256 each: one topic per name would let a crowd
/// of clients give every node millions of subscriptions. So channels share
/// [`CHANNEL_BUCKETS`] topics by a hash of their name: a node subscribes to at most that many,
/// and a publish reaches the nodes with a subscriber to that channel or, rarely, to another
/// channel of the same bucket (which deliver it to nobody).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Topic {
    Group(Arc<str>),
    Channels(u16),
    /// Every `publish`, for the nodes with SignalR connections: those receive publishes
    /// without subscribing to channels (SPEC §10), so such a node cannot know which
    /// channel buckets to follow. A publish goes to its channel's bucket and, as a twin
    /// (applied once by a node that gets both), here.
    SignalR,
}

/// Topics the channels share (see [`Topic`]).
pub const CHANNEL_BUCKETS: usize = 16_384;

/// The bucket of channel `name`.
pub fn channel_bucket(name: &str) -> u16 {
    let digest = Sha256::digest(name.as_bytes());
    let bucket = u16::from_be_bytes([digest[0], digest[1]]) as usize % CHANNEL_BUCKETS;
    bucket as u16
}

/// Names longer than this are hashed into their topic, so a topic stays short however long a
/// group's name is (a name is only a routing hint: receivers match the name in the message).
const LONGEST_NAME_IN_TOPIC: usize = 100;

impl Topic {
    /// The transport's topic name.
    pub fn key(&self) -> String {
        match self {
            Topic::Group(name) => topic_key("jssocket:group:", name),
            Topic::Channels(bucket) => format!("jssocket:channels:{bucket}"),
            Topic::SignalR => "jssocket:signalr".to_string(),
        }
    }
}

fn topic_key(prefix: &str, name: &str) -> String {
    if name.len() <= LONGEST_NAME_IN_TOPIC {
        return format!("{prefix}{name}");
    }
    format!("{prefix}#{}", hex::encode(Sha256::digest(name.as_bytes())))
}

/// The topic every node subscribes to.
pub const ALL_TOPIC: &str = "jssocket:all";

/// The topic of node `tag`.
pub fn node_topic(tag: u32) -> String {
    format!("jssocket:node:{tag:08x}")
}

/// The node a connection id names: its first four bytes (see [`crate::peer::Peer::new`]).
pub fn node_of(target: &str) -> Option<u32> {
    let id = crate::hub::parse_target(target)?;
    let bytes = id.as_bytes();
    Some(u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
}

/// Most replies held at once waiting for a subscription (see [`Interest::reply`]); beyond,
/// they go out at once.
const MAX_HELD: usize = 100_000;

/// The groups and channels this node has members in, as the hub changes them, for the
/// backplane's subscriber to follow; and the replies that wait for a subscription.
///
/// The hub marks a name *touched* when its first local member joins or its last one leaves
/// (a set, so a peer joining and leaving in a loop costs one entry); the subscriber takes the
/// touched names, compares each with the hub, and subscribes or unsubscribes.
///
/// A client must not be told it is in a group or a channel before messages for it reach
/// this node: its `client_connected` and `subscribed` wait here until the topic's
/// subscription is confirmed (at once when it already is, or when the transport is down).
/// Without this, a backend that acknowledges a client and then notifies its group could
/// miss it: the group's messages would be published before this node subscribed.
///
/// Held replies keep each connection's order: once one of its replies waits, the next ones
/// (for whatever topic) wait behind it, so a client's `subscribed`/`unsubscribed` come in the
/// order it asked, as on a single node.
#[derive(Default)]
pub struct Interest {
    state: Mutex<InterestState>,
    /// Wakes the subscriber.
    pub touched: Notify,
}

#[derive(Default)]
struct InterestState {
    touched: HashSet<Topic>,
    /// Topics subscribed and confirmed by the transport.
    confirmed: HashSet<Topic>,
    /// Replies waiting, per connection, in the order they were sent.
    held: HashMap<Uuid, VecDeque<Held>>,
    /// Replies waiting, per topic.
    held_topics: HashMap<Topic, usize>,
    held_count: usize,
    /// Subscribed to the transport: while not, replies are not held (nothing would confirm
    /// them; the subscriptions are made again on reconnecting).
    live: bool,
}

struct Held {
    topic: Topic,
    peer: Weak<Peer>,
    frame: Utf8Bytes,
    kind: Frame,
}

impl InterestState {
    /// Whether replies for `topic` may go out: subscribed, and its members not changed
    /// since the subscriber last looked.
    fn ready(&self, topic: &Topic) -> bool {
        self.confirmed.contains(topic) && !self.touched.contains(topic)
    }

    /// Takes, for every connection, the replies at the front of its queue whose topic is
    /// ready (or in `also`), in order.
    fn take_ready(&mut self, also: &[Topic]) -> Vec<Held> {
        let mut out = Vec::new();
        let mut emptied = Vec::new();
        let ready =
            |state: &InterestState, topic: &Topic| state.ready(topic) || also.contains(topic);
        let ids: Vec<Uuid> = self.held.keys().copied().collect();
        for id in ids {
            loop {
                let front_ready = self
                    .held
                    .get(&id)
                    .and_then(|queue| queue.front())
                    .is_some_and(|held| ready(self, &held.topic));
                if !front_ready {
                    break;
                }
                let Some(held) = self.held.get_mut(&id).and_then(VecDeque::pop_front) else {
                    break;
                };
                self.forget(&held.topic);
                out.push(held);
            }
            if self.held.get(&id).is_some_and(VecDeque::is_empty) {
                emptied.push(id);
            }
        }
        for id in emptied {
            self.held.remove(&id);
        }
        out
    }

    /// One reply for `topic` is no longer held.
    fn forget(&mut self, topic: &Topic) {
        self.held_count -= 1;
        if let Some(n) = self.held_topics.get_mut(topic) {
            *n -= 1;
            if *n == 0 {
                self.held_topics.remove(topic);
            }
        }
    }
}

impl Interest {
    fn state(&self) -> MutexGuard<'_, InterestState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The hub added the first local member of `topic`, or removed the last.
    pub fn touch(&self, topic: Topic) {
        self.state().touched.insert(topic);
        self.touched.notify_one();
    }

    /// Sends `frame` to `peer` once `topic` is subscribed, and after the replies already
    /// waiting for it: now, if there are none and the topic is ready (or the transport is
    /// down). Returns whether it was sent now.
    pub fn reply(
        &self,
        relay: &Relay,
        topic: Topic,
        peer: &Arc<Peer>,
        frame: Utf8Bytes,
        kind: Frame,
    ) -> bool {
        {
            let mut state = self.state();
            let pending = !state.ready(&topic) || state.held.contains_key(&peer.id);
            if state.live && pending && state.held_count < MAX_HELD {
                state.held_count += 1;
                *state.held_topics.entry(topic.clone()).or_default() += 1;
                state.held.entry(peer.id).or_default().push_back(Held {
                    topic,
                    peer: Arc::downgrade(peer),
                    frame,
                    kind,
                });
                relay
                    .metrics
                    .cluster_held_replies
                    .set(state.held_count as i64);
                return false;
            }
        }
        relay.metrics.sent(kind, 1, frame.len());
        peer.send(frame);
        true
    }

    /// Whether replies wait for `topic` now: what follows them for the same connections
    /// must wait behind them.
    pub fn has_held(&self, topic: &Topic) -> bool {
        self.state().held_topics.contains_key(topic)
    }

    /// The touched topics, taken.
    pub fn take_touched(&self) -> Vec<Topic> {
        self.state().touched.drain().collect()
    }

    /// Whether `topic`'s messages reach this node now (or the transport is down, when
    /// nothing is waited for): what a reply held for it waits for.
    pub fn is_ready(&self, topic: &Topic) -> bool {
        let state = self.state();
        !state.live || state.ready(topic)
    }

    pub fn is_confirmed(&self, topic: &Topic) -> bool {
        self.state().confirmed.contains(topic)
    }

    /// The transport confirmed these subscriptions: the replies waiting for them go out.
    pub fn confirm(&self, relay: &Relay, topics: &[Topic]) {
        let release = {
            let mut state = self.state();
            for topic in topics {
                state.confirmed.insert(topic.clone());
            }
            let release = state.take_ready(&[]);
            relay
                .metrics
                .cluster_held_replies
                .set(state.held_count as i64);
            release
        };
        send_held(relay, release);
    }

    /// Sends the replies held for these topics now (the subscriber has caught up with them
    /// and keeps no subscription: their members left, and their replies say so in order).
    pub fn release(&self, relay: &Relay, topics: &[Topic]) {
        let release = {
            let mut state = self.state();
            let release = state.take_ready(topics);
            relay
                .metrics
                .cluster_held_replies
                .set(state.held_count as i64);
            release
        };
        send_held(relay, release);
    }

    /// These topics are being unsubscribed.
    pub fn unconfirm(&self, topics: &[Topic]) {
        let mut state = self.state();
        for topic in topics {
            state.confirmed.remove(topic);
        }
    }

    /// The transport is up (subscriptions are about to be made) or down (none holds: every
    /// held reply goes out, in order, and nothing is confirmed until subscribed again).
    pub fn set_live(&self, relay: &Relay, live: bool) {
        let release = {
            let mut state = self.state();
            state.live = live;
            if live {
                return;
            }
            state.confirmed.clear();
            state.held_count = 0;
            state.held_topics.clear();
            relay.metrics.cluster_held_replies.set(0);
            std::mem::take(&mut state.held)
        };
        send_held(relay, release.into_values().flatten().collect());
    }
}

fn send_held(relay: &Relay, held: Vec<Held>) {
    for Held {
        peer, frame, kind, ..
    } in held
    {
        if let Some(peer) = peer.upgrade() {
            relay.metrics.sent(kind, 1, frame.len());
            peer.send(frame);
        }
    }
}

// ---------------------------------------------------------------------------- transports

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;
pub type TransportError = Box<dyn std::error::Error + Send + Sync>;

/// What carries the nodes' messages. Messages published on one [`Publisher`] to one topic
/// arrive in the order published.
pub trait Transport: Send + Sync + 'static {
    fn publisher(&self) -> BoxFuture<'_, Result<Box<dyn Publisher>, TransportError>>;
    /// A subscription; its message stream ends when the connection is lost.
    fn subscriber(&self) -> BoxFuture<'_, Result<Subscription, TransportError>>;
}

pub trait Publisher: Send {
    fn publish<'a>(
        &'a mut self,
        topic: &'a str,
        message: &'a str,
    ) -> BoxFuture<'a, Result<(), TransportError>>;

    /// Publishes every (topic, message) of `batch`, in order; one round trip where the
    /// engine can.
    fn publish_batch<'a>(
        &'a mut self,
        batch: &'a [(String, String)],
    ) -> BoxFuture<'a, Result<(), TransportError>> {
        Box::pin(async move {
            for (topic, message) in batch {
                self.publish(topic, message).await?;
            }
            Ok(())
        })
    }

    /// How many subscribers `topic` has; `None` where the engine cannot tell.
    fn subscribers<'a>(&'a mut self, topic: &'a str) -> BoxFuture<'a, Option<usize>>;
}

/// Changes what a [`Subscription`] receives, while its messages are read.
pub trait Subscriptions: Send {
    /// Returns once the transport confirmed every one.
    fn subscribe<'a>(
        &'a mut self,
        topics: &'a [String],
    ) -> BoxFuture<'a, Result<(), TransportError>>;
    fn unsubscribe<'a>(
        &'a mut self,
        topics: &'a [String],
    ) -> BoxFuture<'a, Result<(), TransportError>>;
}

pub struct Subscription {
    pub control: Box<dyn Subscriptions>,
    /// (topic, message) as they arrive.
    pub messages: Pin<Box<dyn Stream<Item = (String, Vec<u8>)> + Send>>,
}

// ------------------------------------------------------------------------------ loopback

/// An in-process transport: every node made with a clone of one `Loopback` is in the same
/// cluster. Messages go through the same encoding as on Redis. [`Loopback::set_up`] takes it
/// down (every subscription ends, publishing fails) and up again, as a Redis outage would.
#[derive(Clone, Default)]
pub struct Loopback {
    bus: Arc<Bus>,
}

#[derive(Default)]
struct Bus {
    state: Mutex<BusState>,
    next_id: AtomicU64,
    down: AtomicBool,
}

#[derive(Default)]
struct BusState {
    /// Topic → subscriber ids.
    topics: HashMap<String, HashSet<u64>>,
    subscribers: HashMap<u64, mpsc::UnboundedSender<(String, Vec<u8>)>>,
}

impl Bus {
    fn state(&self) -> MutexGuard<'_, BusState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn forget(&self, id: u64) {
        let mut state = self.state();
        state.subscribers.remove(&id);
        state.topics.retain(|_, ids| {
            ids.remove(&id);
            !ids.is_empty()
        });
    }
}

impl Loopback {
    pub fn new() -> Loopback {
        Loopback::default()
    }

    /// Down: every subscription ends and nothing can be published until it is up again.
    pub fn set_up(&self, up: bool) {
        self.bus.down.store(!up, Ordering::SeqCst);
        if !up {
            let mut state = self.bus.state();
            state.topics.clear();
            state.subscribers.clear();
        }
    }

    fn check_up(&self) -> Result<(), TransportError> {
        if self.bus.down.load(Ordering::SeqCst) {
            return Err("loopback transport is down".into());
        }
        Ok(())
    }
}

impl Transport for Loopback {
    fn publisher(&self) -> BoxFuture<'_, Result<Box<dyn Publisher>, TransportError>> {
        Box::pin(async move {
            self.check_up()?;
            Ok(Box::new(self.clone()) as Box<dyn Publisher>)
        })
    }

    fn subscriber(&self) -> BoxFuture<'_, Result<Subscription, TransportError>> {
        Box::pin(async move {
            self.check_up()?;
            let id = self.bus.next_id.fetch_add(1, Ordering::Relaxed);
            let (tx, rx) = mpsc::unbounded_channel();
            self.bus.state().subscribers.insert(id, tx);
            let messages = futures_util::stream::unfold(rx, |mut rx| async move {
                rx.recv().await.map(|message| (message, rx))
            });
            Ok(Subscription {
                control: Box::new(LoopbackSubscriptions {
                    bus: Arc::clone(&self.bus),
                    id,
                }),
                messages: Box::pin(messages),
            })
        })
    }
}

impl Publisher for Loopback {
    fn publish<'a>(
        &'a mut self,
        topic: &'a str,
        message: &'a str,
    ) -> BoxFuture<'a, Result<(), TransportError>> {
        Box::pin(async move {
            self.check_up()?;
            let state = self.bus.state();
            for id in state.topics.get(topic).into_iter().flatten() {
                if let Some(tx) = state.subscribers.get(id) {
                    let _ = tx.send((topic.to_string(), message.as_bytes().to_vec()));
                }
            }
            Ok(())
        })
    }

    fn subscribers<'a>(&'a mut self, topic: &'a str) -> BoxFuture<'a, Option<usize>> {
        Box::pin(async move { Some(self.bus.state().topics.get(topic).map_or(0, HashSet::len)) })
    }
}

struct LoopbackSubscriptions {
    bus: Arc<Bus>,
    id: u64,
}

impl Subscriptions for LoopbackSubscriptions {
    fn subscribe<'a>(
        &'a mut self,
        topics: &'a [String],
    ) -> BoxFuture<'a, Result<(), TransportError>> {
        Box::pin(async move {
            let mut state = self.bus.state();
            if !state.subscribers.contains_key(&self.id) {
                return Err("loopback subscription ended".into());
            }
            for topic in topics {
                state
                    .topics
                    .entry(topic.clone())
                    .or_default()
                    .insert(self.id);
            }
            Ok(())
        })
    }

    fn unsubscribe<'a>(
        &'a mut self,
        topics: &'a [String],
    ) -> BoxFuture<'a, Result<(), TransportError>> {
        Box::pin(async move {
            let mut state = self.bus.state();
            for topic in topics {
                if let Some(ids) = state.topics.get_mut(topic) {
                    ids.remove(&self.id);
                    if ids.is_empty() {
                        state.topics.remove(topic);
                    }
                }
            }
            Ok(())
        })
    }
}

impl Drop for LoopbackSubscriptions {
    fn drop(&mut self) {
        self.bus.forget(self.id);
    }
}
