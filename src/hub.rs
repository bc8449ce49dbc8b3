//! Who is connected: the client table, the groups, the channels' subscribers, and the server
//! pool ([`crate::pool`]). Every event and the HTTP API act through these methods.
//!
//! The tables are concurrent maps (`DashMap`), so connections on different cores don't wait on
//! one global lock.
//!
//! Lock order, to stay deadlock-free: a peer's `state` mutex may be held while a `groups` or
//! `channels` shard is locked, never the other way round; nothing is awaited while any lock is held.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::time::Duration;

use dashmap::DashMap;
use tokio_tungstenite::tungstenite::Utf8Bytes;
use uuid::Uuid;

use crate::backplane::{CHANNEL_BUCKETS, Interest, Topic, channel_bucket};
use crate::memory::Memory;
use crate::outbox::{Prepaid, SharedFrame};
use crate::peer::{Outgoing, Peer, PeerState, Wire};
use crate::pool::Pool;
use crate::protocol::ProtocolError;
use crate::signalr::{self, Form, Notice};

/// One frame delivered to many connections: every queue holds the same [`SharedFrame`], so
/// its bytes are charged to the memory budget once, not once per recipient (a 20 KiB
/// `notify_all` to 15,000 clients is 20 KiB, not 300 MiB, and must not look like a flood).
/// SignalR connections read another form of it ([`Form`]), encoded once too, for the first
/// of them.
struct Broadcast<'a> {
    frame: &'a Utf8Bytes,
    /// How SignalR connections read it, and the method `notify_*` invoke on them.
    form: Form,
    notify_method: &'a str,
    /// Made for the first recipient, so a broadcast that reaches nobody charges nothing.
    shared: Option<Arc<SharedFrame>>,
    /// The SignalR form, made for the first SignalR recipient (`Some(None)`: it has none,
    /// e.g. a frame that is not a publish).
    signalr: Option<Option<Arc<SharedFrame>>>,
    /// The labelled form ([`Wire::Labelled`]), made for the first connection that asked for it.
    labelled: Option<Arc<SharedFrame>>,
    /// The queues' overhead, charged to the memory budget in chunks, not per recipient.
    prepaid: Prepaid,
}

impl<'a> Broadcast<'a> {
    fn new(frame: &'a Utf8Bytes, form: Form, notify_method: &'a str) -> Broadcast<'a> {
        Broadcast {
            frame,
            form,
            notify_method,
            shared: None,
            signalr: None,
            labelled: None,
            prepaid: Prepaid::default(),
        }
    }

    /// Queues the frame, in the form `peer` reads, as [`Peer::send`] does.
    fn send(&mut self, peer: &Peer) -> bool {
        let frame = self.frame;
        let shared = match peer.wire {
            Wire::Jssocket => self
                .shared
                .get_or_insert_with(|| SharedFrame::new(frame.clone(), peer.outbox.memory())),
            Wire::SignalR => {
                let (form, method) = (self.form, self.notify_method);
                let encoded = self.signalr.get_or_insert_with(|| {
                    signalr::encode(form, frame, method)
                        .map(|f| SharedFrame::new(f, peer.outbox.memory()))
                });
                match encoded {
                    Some(shared) => shared,
                    None => return false,
                }
            }
            // A publish frame reads the same labelled or not: one shared copy for both.
            Wire::Labelled if self.form == Form::Publish => self
                .shared
                .get_or_insert_with(|| SharedFrame::new(frame.clone(), peer.outbox.memory())),
            Wire::Labelled => {
                let form = self.form;
                self.labelled.get_or_insert_with(|| {
                    SharedFrame::new(signalr::labelled(form, frame), peer.outbox.memory())
                })
            }
        };
        peer.enqueue_prepaid(Outgoing::Relay(Arc::clone(shared)), &mut self.prepaid)
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
    /// Subscribers whose connection id (`target`) is one of these.
    Clients(Vec<String>),
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
            // `publish` looks these up by id instead (see [`Hub::publish`]).
            Filter::Clients(_) => false,
        }
    }

    /// Whether a publication with this filter reaches `peer`, a subscriber of its channel:
    /// what [`Hub::publish`] decides, for one peer (a replay of channel history).
    pub fn admits_peer(&self, peer: &Peer) -> bool {
        match self {
            Filter::Clients(targets) => targets.iter().any(|t| parse_target(t) == Some(peer.id)),
            _ => self.admits(&peer.state()),
        }
    }
}

/// Most channels one connection may subscribe to.
pub const MAX_SUBSCRIPTIONS: usize = 256;

pub struct Hub {
    /// Registered clients by id.
    clients: DashMap<Uuid, Arc<Peer>>,
    /// The SignalR connections among them: every `publish` is offered to each (SignalR has
    /// no subscribe step; the filter decides).
    signalr: DashMap<Uuid, Arc<Peer>>,
    /// How many they are, kept beside the table so the first one in and the last one out
    /// are seen exactly once each (the backplane follows them, see [`Topic::SignalR`]).
    signalr_count: AtomicUsize,
    /// The hub method `notify_*` invoke on SignalR connections (`--signalr-notify-method`).
    notify_method: Box<str>,
    /// Group name → its members.
    groups: Members,
    /// Channel name → its subscribers.
    channels: Members,
    /// Clients acknowledged and still open, for metrics.
    acknowledged: AtomicUsize,
    /// The server pool and the client connects waiting for a server.
    pub pool: Pool,
    /// This node's tag, written in its connections' ids.
    node: u32,
    /// The groups and channels with local members, followed by the backplane (cluster only).
    interest: Option<Arc<Interest>>,
    /// Channels with local members, per bucket (see [`Topic`]); cluster only.
    channel_buckets: Box<[AtomicU32]>,
    /// Runtime roles and groups of users (SPEC §12 `membership`), given to their connections
    /// at acknowledgement on top of what it gives.
    pub membership: crate::membership::Table,
}

impl Hub {
    pub fn new(
        pending_limit: usize,
        pending_timeout: Duration,
        node: u32,
        interest: Option<Arc<Interest>>,
        notify_method: &str,
    ) -> Hub {
        Hub {
            node,
            signalr: DashMap::new(),
            signalr_count: AtomicUsize::new(0),
            notify_method: notify_method.into(),
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
            pool: Pool::new(pending_limit, pending_timeout),
            membership: crate::membership::Table::default(),
        }
    }

    /// A new connection's handle, its id naming this node.
    pub fn new_peer(&self, max_queue: usize, memory: &Arc<Memory>) -> Arc<Peer> {
        self.new_peer_speaking(Wire::Jssocket, max_queue, memory)
    }

    /// A new connection's handle speaking `wire` (a jssocket client may ask for labels).
    pub fn new_peer_speaking(
        &self,
        wire: Wire,
        max_queue: usize,
        memory: &Arc<Memory>,
    ) -> Arc<Peer> {
        Peer::with_id(Peer::new_id(self.node), wire, max_queue, memory)
    }

    /// A fresh connection id naming this node, for a SignalR negotiation.
    pub fn new_id(&self) -> Uuid {
        Peer::new_id(self.node)
    }

    /// The hub method `notify_*` invoke on SignalR connections.
    pub fn notify_method(&self) -> &str {
        &self.notify_method
    }

    /// Queues `frame` (a `notify_*` frame, or a reply in `form`) for one connection, in the
    /// form it reads; a frame a SignalR connection has no form for is not sent.
    pub fn send_to(&self, peer: &Peer, frame: &Utf8Bytes, form: Form) -> bool {
        match peer.wire {
            Wire::Jssocket => peer.send(frame.clone()),
            Wire::SignalR => match signalr::encode(form, frame, &self.notify_method) {
                Some(frame) => peer.send(frame),
                None => false,
            },
            Wire::Labelled => peer.send(signalr::labelled(form, frame)),
        }
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
            Topic::SignalR => self.signalr_count.load(Ordering::Relaxed) > 0,
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
        let signalr = Some(Topic::SignalR).filter(|topic| self.has_members(topic));
        groups.chain(channels).chain(signalr).collect()
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

    /// A registered client by its target text (the exact lowercase hyphenated id).
    pub fn client(&self, target: &str) -> Option<Arc<Peer>> {
        let id = parse_target(target)?;
        self.clients.get(&id).map(|entry| Arc::clone(entry.value()))
    }

    /// Whether a connection with this id is registered here.
    pub fn has_client(&self, id: Uuid) -> bool {
        self.clients.contains_key(&id)
    }

    /// Registers `peer`; false when it is closed or its id is taken. An id already
    /// registered stays with its connection (two upgrades racing with one SignalR connection
    /// token): the newcomer is registered nowhere.
    pub fn register_client(&self, peer: &Arc<Peer>) -> bool {
        let mut state = peer.state();
        if state.closed {
            return false;
        }
        match self.clients.entry(peer.id) {
            dashmap::Entry::Occupied(_) => return false,
            dashmap::Entry::Vacant(entry) => {
                entry.insert(Arc::clone(peer));
            }
        }
        state.registered = true;
        if peer.wire == Wire::SignalR && self.signalr.insert(peer.id, Arc::clone(peer)).is_none() {
            let first = self.signalr_count.fetch_add(1, Ordering::Relaxed) == 0;
            self.touched(first, || Topic::SignalR);
        }
        true
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
        // After joining the group named after the user: a `membership` change for the user
        // either is in the table read here or finds this connection among the group's
        // members (see `membership::apply_change`).
        self.membership.extend(&mut state);
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
            Some(client) => {
                usize::from(self.send_to(&client, &frame, Form::Notify(Notice::Client)))
            }
            None => 0,
        }
    }

    /// Delivers `frame` to every member of `group`.
    pub fn notify_group(&self, group: &str, frame: &Utf8Bytes) -> usize {
        let mut broadcast = Broadcast::new(frame, Form::Notify(Notice::Group), &self.notify_method);
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
        let mut broadcast = Broadcast::new(frame, Form::Notify(Notice::All), &self.notify_method);
        self.clients
            .iter()
            .filter(|entry| broadcast.send(entry.value()))
            .count()
    }

    /// Removes a closed connection from everything at once: client table, group, server
    /// pool, waiting client connects.
    pub fn remove(&self, peer: &Arc<Peer>) {
        // Only its own entries: an id is registered by one connection at most.
        let own = |_: &Uuid, registered: &Arc<Peer>| Arc::ptr_eq(registered, peer);
        self.clients.remove_if(&peer.id, own);
        if self.signalr.remove_if(&peer.id, own).is_some() {
            let last = self.signalr_count.fetch_sub(1, Ordering::Relaxed) == 1;
            self.touched(last, || Topic::SignalR);
        }
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
        self.pool.remove(peer.id);
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

    /// Delivers `frame` to the subscribers of `channel` that `filter` admits, and to every
    /// SignalR connection it admits (as an invocation of `channel`).
    pub fn publish(&self, channel: &str, filter: &Filter, frame: &Utf8Bytes) -> usize {
        let recipients = self.recipients(channel, filter);
        let mut broadcast = Broadcast::new(frame, Form::Publish, &self.notify_method);
        recipients
            .iter()
            .filter(|peer| broadcast.send(peer))
            .count()
    }

    /// Who a publish to `channel` with `filter` reaches here (see [`Hub::publish`]).
    pub fn recipients(&self, channel: &str, filter: &Filter) -> Vec<Arc<Peer>> {
        // Snapshot the recipients first: a filter reads each one's state, and a peer's state
        // lock must never be taken while a channel shard is held (see the lock order above).
        match filter {
            Filter::Clients(targets) => self.listed(channel, targets),
            _ => {
                let signalr = self.signalr_count.load(Ordering::Relaxed);
                let mut subscribers: Vec<Arc<Peer>> = match self.channels.get(channel) {
                    Some(members) => {
                        let mut all = Vec::with_capacity(members.len() + signalr);
                        all.extend(members.values().cloned());
                        all
                    }
                    None => Vec::with_capacity(signalr),
                };
                if signalr > 0 {
                    subscribers.extend(self.signalr.iter().map(|e| Arc::clone(e.value())));
                }
                subscribers.retain(|peer| filter.admits(&peer.state()));
                subscribers
            }
        }
    }

    /// The connections named in a `clients` filter that a publish to `channel` reaches: its
    /// subscribers and SignalR connections, each once however often it is listed. Looked up
    /// by id, so the work follows the list, not the channel's size.
    fn listed(&self, channel: &str, targets: &[String]) -> Vec<Arc<Peer>> {
        let mut seen = HashSet::with_capacity(targets.len());
        targets
            .iter()
            .filter_map(|target| parse_target(target))
            .filter(|id| seen.insert(*id))
            .filter_map(|id| self.clients.get(&id).map(|e| Arc::clone(e.value())))
            .filter(|peer| {
                peer.wire == Wire::SignalR
                    || self
                        .channels
                        .get(channel)
                        .is_some_and(|members| members.contains_key(&peer.id))
            })
            .collect()
    }

    /// Read access to the tables for presence queries (`crate::presence`), which select
    /// bounded pages from them.
    pub(crate) fn tables(&self) -> Tables<'_> {
        Tables {
            clients: &self.clients,
            groups: &self.groups,
            channels: &self.channels,
        }
    }

    /// Counts for logs, metrics and tests.
    pub fn stats(&self) -> HubStats {
        let (servers, pending, pending_bytes) = self.pool.counts();
        HubStats {
            clients: self.clients.len(),
            acknowledged: self.acknowledged.load(Ordering::Relaxed),
            groups: self.groups.len(),
            channels: self.channels.len(),
            servers,
            pending,
            pending_bytes,
        }
    }
}

/// The hub's tables, read by presence queries.
pub(crate) struct Tables<'a> {
    pub clients: &'a DashMap<Uuid, Arc<Peer>>,
    pub groups: &'a Members,
    pub channels: &'a Members,
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
pub(crate) type Members = DashMap<Arc<str>, HashMap<Uuid, Arc<Peer>>>;

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
