//! Presence and introspection (SPEC §12): `info`, `users`, `connections`, `channels`, asked
//! by an admin over a WebSocket or the HTTP API, answered for the whole cluster.
//!
//! One code path whatever the backplane: the asking node answers for itself
//! ([`local`]), asks every other node the same [`Query`] through
//! [`crate::backplane::Backplane::ask`] (nobody on a single node), waits at most
//! [`TIMEOUT`] for their [`Answer`]s, and merges them ([`merge`]). A node that did not answer
//! in time is named: in `info.nodes` with `"timeout":true`, in a page's `"timeout"` list.
//!
//! Bounded work and output, whatever the relay holds:
//! - A page is at most `limit` entries ([`MAX_LIMIT`]) and about [`ANSWER_BYTES`] per node
//!   (a connection's subscriptions can be 256 long names). Each node selects its page with a
//!   bounded heap of the `limit` smallest keys after the cursor over its table (O(n log
//!   limit), no allocation per entry), then reads only those entries' state: no lock is held
//!   while the answer is built, and no answer grows with the table.
//! - Paging is by key (user name, connection id, channel name), so every entry appears once
//!   across pages whatever joins or leaves meanwhile. Every node reports how far it looked
//!   (`more`: the last key it examined, when it may have more after it); the merged page stops
//!   at the smallest such key, so nothing between pages is skipped when nodes' pages differ.
//! - At most [`MAX_IN_FLIGHT`] queries are asked at once on a node (an admin's WebSocket asks
//!   one at a time: its session waits for the answer), and a node answers at most
//!   [`MAX_ANSWERING`] other nodes' queries at once (beyond, the asker sees a timeout).
//!
//! Counts in `info` are sums over nodes: a user with connections on two nodes counts twice in
//! `users` there (an exact distinct count would mean shipping every name); the `users` pages
//! list each user once, with the connections of every node summed.

use std::collections::{BTreeMap, BinaryHeap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use tokio::sync::mpsc;
use uuid::Uuid;

use crate::events::PUBLIC_GROUP;
use crate::hub::parse_target;
use crate::peer::Peer;
use crate::protocol::{Data, ProtocolError, opt_string};
use crate::relay::Relay;

/// Entries per page when the request names no `limit`.
pub const DEFAULT_LIMIT: usize = 100;
/// Most entries per page.
pub const MAX_LIMIT: usize = 1000;
/// A node stops adding entries to its page past this many bytes (at least one goes in).
pub const ANSWER_BYTES: usize = 1024 * 1024;
/// How long the asking node waits for the others.
pub const TIMEOUT: Duration = Duration::from_secs(1);
/// Queries asked at once on one node (over every admin and the API).
pub const MAX_IN_FLIGHT: usize = 16;
/// Other nodes' queries answered at once by one node.
pub const MAX_ANSWERING: usize = 16;
/// Longest `prefix`, `user`, `group`, `role` filter, in bytes.
pub const MAX_FILTER: usize = 1024;
/// Distinct publish-filter groups counted by `info` on one node; beyond, the count stops.
const MAX_DISTINCT_GROUPS: usize = 100_000;
/// Rounds of selection a filtered `users` page may take on one node before it answers a
/// short page (its `next` says where to go on).
const SCAN_ROUNDS: usize = 8;

/// What one node is asked.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Query {
    Info,
    Users {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        prefix: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        group: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        role: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        after: Option<String>,
        limit: usize,
    },
    Connections {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        user: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        after: Option<String>,
        limit: usize,
    },
    Channels {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        prefix: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        after: Option<String>,
        limit: usize,
    },
}

impl Query {
    /// Bytes it holds (what the cluster's backlog charges).
    pub fn size(&self) -> usize {
        let len = |s: &Option<String>| s.as_deref().map_or(0, str::len);
        match self {
            Query::Info => 0,
            Query::Users {
                prefix,
                group,
                role,
                after,
                ..
            } => len(prefix) + len(group) + len(role) + len(after),
            Query::Connections { user, after, .. } => len(user) + len(after),
            Query::Channels { prefix, after, .. } => len(prefix) + len(after),
        }
    }

    fn limit(&self) -> usize {
        match self {
            Query::Info => 0,
            Query::Users { limit, .. }
            | Query::Connections { limit, .. }
            | Query::Channels { limit, .. } => *limit,
        }
    }
}

/// One node's counts for `info`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeInfo {
    pub connections: usize,
    pub users: usize,
    pub channels: usize,
    pub groups: usize,
    pub version: String,
}

/// One connection, as `connections` lists it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ConnectionInfo {
    pub target: String,
    pub user: Option<String>,
    pub group: Option<String>,
    pub roles: Vec<String>,
    pub groups: Vec<String>,
    pub subscriptions: Vec<String>,
    pub node: String,
}

impl ConnectionInfo {
    fn size(&self) -> usize {
        let names = |v: &[String]| v.iter().map(|s| s.len() + 3).sum::<usize>();
        self.target.len()
            + self.user.as_deref().map_or(0, str::len)
            + self.group.as_deref().map_or(0, str::len)
            + names(&self.roles)
            + names(&self.groups)
            + names(&self.subscriptions)
            + self.node.len()
            + 96
    }
}

/// One node's answer. `more`: the last key it examined, when it may have entries after it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Answer {
    Info(NodeInfo),
    Counts {
        entries: Vec<(String, usize)>,
        more: Option<String>,
    },
    Connections {
        entries: Vec<ConnectionInfo>,
        more: Option<String>,
    },
}

impl Answer {
    /// Bytes it holds (what the cluster's backlog charges).
    pub fn size(&self) -> usize {
        match self {
            Answer::Info(_) => 64,
            Answer::Counts { entries, more } => {
                entries.iter().map(|(k, _)| k.len() + 24).sum::<usize>()
                    + more.as_deref().map_or(0, str::len)
            }
            Answer::Connections { entries, more } => {
                entries.iter().map(ConnectionInfo::size).sum::<usize>()
                    + more.as_deref().map_or(0, str::len)
            }
        }
    }
}

/// The other nodes asked a query: who, and where their answers arrive.
pub struct Asked {
    /// The nodes expected to answer (those alive when it was asked).
    pub nodes: Vec<String>,
    pub answers: mpsc::Receiver<(String, Answer)>,
}

/// The node's share of the bounds above.
#[derive(Default)]
pub struct Presence {
    in_flight: AtomicUsize,
    answering: AtomicUsize,
}

/// One of the [`MAX_IN_FLIGHT`] slots to ask a query, given back on drop. Owned, so the
/// page this node builds for the query holds it on the blocking thread: an asker that goes
/// away mid-query (an HTTP client that hangs up, an admin that closes) drops its wait, not
/// that work, and must not free the slot while the work still runs.
pub struct Asking(Arc<Relay>);

impl Asking {
    fn take(relay: &Arc<Relay>) -> Option<Asking> {
        acquire(&relay.presence.in_flight, MAX_IN_FLIGHT).then(|| Asking(Arc::clone(relay)))
    }
}

impl Drop for Asking {
    fn drop(&mut self) {
        self.0.presence.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Counts one more in `counter` unless it is at `max`.
fn acquire(counter: &AtomicUsize, max: usize) -> bool {
    counter
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            (n < max).then_some(n + 1)
        })
        .is_ok()
}

/// One of the [`MAX_ANSWERING`] slots to answer another node's query, held by the task that
/// answers it.
pub struct Answering(Arc<Relay>);

impl Answering {
    pub fn take(relay: Arc<Relay>) -> Option<Answering> {
        acquire(&relay.presence.answering, MAX_ANSWERING).then_some(Answering(relay))
    }

    pub fn relay(&self) -> &Arc<Relay> {
        &self.0
    }
}

impl Drop for Answering {
    fn drop(&mut self) {
        self.0.presence.answering.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The name of a node as `info` and `connections` show it (its tag in hex, as the cluster
/// names it).
pub fn node_name(tag: u32) -> String {
    format!("{tag:08x}")
}

// ------------------------------------------------------------------------ requests

/// Which event a cursor belongs to: a cursor of one is refused by another.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Users,
    Connections,
    Channels,
}

impl Kind {
    fn tag(self) -> char {
        match self {
            Kind::Users => 'u',
            Kind::Connections => 'c',
            Kind::Channels => 'h',
        }
    }
}

/// The opaque `next` for a page that ended at `key`.
fn cursor(kind: Kind, key: &str) -> String {
    format!("{}{}", kind.tag(), hex::encode(key.as_bytes()))
}

/// The key a cursor given back by a client stands for.
fn read_cursor(kind: Kind, text: &str) -> Result<String, ProtocolError> {
    const BAD: ProtocolError =
        ProtocolError::InvalidField("cursor", "the `next` of an earlier page of this event");
    let hex_text = text.strip_prefix(kind.tag()).ok_or(BAD)?;
    let bytes = hex::decode(hex_text).map_err(|_| BAD)?;
    let key = String::from_utf8(bytes).map_err(|_| BAD)?;
    if kind == Kind::Connections && parse_target(&key).is_none() {
        return Err(BAD);
    }
    Ok(key)
}

/// The request fields every listing shares, and its filters.
#[derive(Deserialize, Default)]
struct Fields<'a> {
    #[serde(borrow, default)]
    prefix: Option<&'a RawValue>,
    #[serde(borrow, default)]
    group: Option<&'a RawValue>,
    #[serde(borrow, default)]
    role: Option<&'a RawValue>,
    #[serde(borrow, default)]
    user: Option<&'a RawValue>,
    #[serde(borrow, default)]
    cursor: Option<&'a RawValue>,
    #[serde(borrow, default)]
    limit: Option<&'a RawValue>,
}

fn filter(raw: Option<&RawValue>, field: &'static str) -> Result<Option<String>, ProtocolError> {
    let value = opt_string(raw, field)?;
    if value.as_ref().is_some_and(|v| v.len() > MAX_FILTER) {
        return Err(ProtocolError::InvalidField(
            field,
            "a string of at most 1024 bytes",
        ));
    }
    Ok(value)
}

fn limit(raw: Option<&RawValue>) -> Result<usize, ProtocolError> {
    let Some(raw) = raw else {
        return Ok(DEFAULT_LIMIT);
    };
    if raw.get() == "null" {
        return Ok(DEFAULT_LIMIT);
    }
    match serde_json::from_str::<u64>(raw.get()) {
        Ok(n) if (1..=MAX_LIMIT as u64).contains(&n) => Ok(n as usize),
        _ => Err(ProtocolError::InvalidField(
            "limit",
            "an integer from 1 to 1000",
        )),
    }
}

/// Reads the `data` of a listing event into the query every node answers.
pub fn parse(kind: Kind, data: Data<'_>) -> Result<Query, ProtocolError> {
    let fields: Fields<'_> = data.fields()?;
    let after = opt_string(fields.cursor, "cursor")?
        .map(|text| read_cursor(kind, &text))
        .transpose()?;
    let limit = limit(fields.limit)?;
    Ok(match kind {
        Kind::Users => Query::Users {
            prefix: filter(fields.prefix, "prefix")?,
            group: filter(fields.group, "group")?,
            role: filter(fields.role, "role")?,
            after,
            limit,
        },
        Kind::Connections => Query::Connections {
            user: filter(fields.user, "user")?,
            after,
            limit,
        },
        Kind::Channels => Query::Channels {
            prefix: filter(fields.prefix, "prefix")?,
            after,
            limit,
        },
    })
}

// ------------------------------------------------------------------------ this node

/// The `n` smallest keys greater than `after` among `keys` that `admit` lets through, in
/// order, and whether some admitted key was left out. A bounded max-heap: O(len · log n)
/// time, n entries of memory, whatever the table holds.
fn smallest<K: Ord + Clone>(
    keys: impl Iterator<Item = K>,
    after: Option<&K>,
    n: usize,
) -> (Vec<K>, bool) {
    let mut heap: BinaryHeap<K> = BinaryHeap::with_capacity(n + 1);
    let mut left_out = false;
    for key in keys {
        if after.is_some_and(|after| key <= *after) {
            continue;
        }
        if heap.len() < n {
            heap.push(key);
        } else if heap.peek().is_some_and(|top| key < *top) {
            heap.pop();
            heap.push(key);
            left_out = true;
        } else {
            left_out = true;
        }
    }
    (heap.into_sorted_vec(), left_out)
}

/// This node's answer to `query`.
pub fn local(relay: &Relay, query: &Query) -> Answer {
    // Another node's query is read as it came: its limit is held to the bound here too.
    let query = &clamped(query);
    let hub = &relay.hub;
    let tables = hub.tables();
    match query {
        Query::Info => {
            let stats = hub.stats();
            // Groups are named by user; `public` is the group of those without one.
            let users = stats.groups - usize::from(tables.groups.contains_key(PUBLIC_GROUP));
            Answer::Info(NodeInfo {
                connections: stats.clients,
                users,
                channels: stats.channels,
                groups: filter_groups(tables.clients),
                version: env!("CARGO_PKG_VERSION").to_string(),
            })
        }
        Query::Channels {
            prefix,
            after,
            limit,
        } => {
            let prefix = prefix.as_deref().unwrap_or("");
            let keys = tables
                .channels
                .iter()
                .filter(|e| e.key().starts_with(prefix))
                .map(|e| Arc::clone(e.key()));
            let after: Option<Arc<str>> = after.as_deref().map(Arc::from);
            let (keys, left_out) = smallest(keys, after.as_ref(), *limit);
            let mut bytes = 0;
            let mut capped = false;
            let mut entries = Vec::with_capacity(keys.len());
            for key in &keys {
                if bytes > ANSWER_BYTES {
                    capped = true;
                    break;
                }
                // Gone since: left out (it has no subscribers any more).
                if let Some(members) = tables.channels.get(&**key) {
                    bytes += key.len() + 24;
                    entries.push((key.to_string(), members.len()));
                }
            }
            let more = if capped {
                entries.last().map(|e| e.0.clone())
            } else if left_out {
                keys.last().map(|k| k.to_string())
            } else {
                None
            };
            Answer::Counts { entries, more }
        }
        Query::Users {
            prefix,
            group,
            role,
            after,
            limit,
        } => users(relay, prefix, group, role, after, *limit),
        Query::Connections { user, after, limit } => connections(relay, user, after, *limit),
    }
}

fn clamped(query: &Query) -> Query {
    let mut query = query.clone();
    if let Query::Users { limit, .. }
    | Query::Connections { limit, .. }
    | Query::Channels { limit, .. } = &mut query
    {
        *limit = (*limit).clamp(1, MAX_LIMIT);
    }
    query
}

/// Distinct publish-filter groups of this node's connections (bounded count).
fn filter_groups(clients: &dashmap::DashMap<Uuid, Arc<Peer>>) -> usize {
    // Snapshot the peers, then read each one's state outside the table's locks.
    let peers: Vec<Arc<Peer>> = clients.iter().map(|e| Arc::clone(e.value())).collect();
    let mut seen: HashSet<String> = HashSet::new();
    for peer in peers {
        let state = peer.state();
        for group in &state.groups {
            if seen.len() >= MAX_DISTINCT_GROUPS {
                return seen.len();
            }
            if !seen.contains(group) {
                seen.insert(group.clone());
            }
        }
    }
    seen.len()
}

fn users(
    relay: &Relay,
    prefix: &Option<String>,
    group: &Option<String>,
    role: &Option<String>,
    after: &Option<String>,
    limit: usize,
) -> Answer {
    let tables = relay.hub.tables();
    let prefix = prefix.as_deref().unwrap_or("");
    let mut after: Option<Arc<str>> = after.as_deref().map(Arc::from);
    let mut entries: Vec<(String, usize)> = Vec::new();
    let mut bytes = 0;
    for _ in 0..SCAN_ROUNDS {
        let want = limit - entries.len();
        let keys = tables
            .groups
            .iter()
            .filter(|e| e.key().starts_with(prefix))
            .map(|e| Arc::clone(e.key()));
        let (keys, left_out) = smallest(keys, after.as_ref(), want);
        for key in &keys {
            after = Some(Arc::clone(key));
            // A user's group is named by the user, and holds only its connections: counted
            // without reading them. `public` holds the connections without a user (and a
            // user named `public`, counted by its `user`), and filters read each one.
            if group.is_none() && role.is_none() && &**key != PUBLIC_GROUP {
                if let Some(members) = tables.groups.get(&**key) {
                    bytes += key.len() + 24;
                    entries.push((key.to_string(), members.len()));
                }
                if bytes > ANSWER_BYTES {
                    let more = entries.last().map(|e| e.0.clone());
                    return Answer::Counts { entries, more };
                }
                continue;
            }
            let members = relay.hub.group_members(key);
            let count = members
                .iter()
                .filter(|peer| {
                    let state = peer.state();
                    state.user.as_deref() == Some(&**key)
                        && group.as_ref().is_none_or(|g| state.groups.contains(g))
                        && role.as_ref().is_none_or(|r| state.roles.contains(r))
                })
                .count();
            if count > 0 {
                bytes += key.len() + 24;
                entries.push((key.to_string(), count));
                if bytes > ANSWER_BYTES {
                    let more = entries.last().map(|e| e.0.clone());
                    return Answer::Counts { entries, more };
                }
            }
        }
        if !left_out {
            return Answer::Counts {
                entries,
                more: None,
            };
        }
        if entries.len() >= limit {
            break;
        }
    }
    Answer::Counts {
        entries,
        more: after.map(|k| k.to_string()),
    }
}

fn connections(
    relay: &Relay,
    user: &Option<String>,
    after: &Option<String>,
    limit: usize,
) -> Answer {
    let tables = relay.hub.tables();
    let after: Option<Uuid> = after.as_deref().and_then(parse_target);
    let (ids, left_out) = match user {
        // A user's connections are its group's members (the group is named by the user).
        Some(user) => {
            let members = relay.hub.group_members(user);
            smallest(members.iter().map(|p| p.id), after.as_ref(), limit)
        }
        None => smallest(
            tables.clients.iter().map(|e| *e.key()),
            after.as_ref(),
            limit,
        ),
    };
    let mut entries = Vec::with_capacity(ids.len());
    let mut bytes = 0;
    let mut capped = false;
    for id in &ids {
        if bytes > ANSWER_BYTES {
            capped = true;
            break;
        }
        let Some(peer) = tables.clients.get(id).map(|e| Arc::clone(e.value())) else {
            continue;
        };
        let state = peer.state();
        if user
            .as_deref()
            .is_some_and(|u| state.user.as_deref() != Some(u))
        {
            continue;
        }
        let info = ConnectionInfo {
            target: peer.target.to_string(),
            user: state.user.as_deref().map(str::to_string),
            group: state.group.as_deref().map(str::to_string),
            roles: state.roles.clone(),
            groups: state.groups.clone(),
            subscriptions: state.subscriptions.iter().map(|s| s.to_string()).collect(),
            node: node_name(crate::backplane::node_of(&peer.target).unwrap_or(0)),
        };
        drop(state);
        bytes += info.size();
        entries.push(info);
    }
    let more = if capped {
        entries.last().map(|e| e.target.clone())
    } else if left_out {
        ids.last().map(|id| id.hyphenated().to_string())
    } else {
        None
    };
    Answer::Connections { entries, more }
}

// ------------------------------------------------------------------------ the cluster

/// Answers `query` for the whole cluster: this node, and every other node within
/// [`TIMEOUT`]. Returns the answer's JSON text (the `data` of the reply, the HTTP body).
pub async fn answer(
    relay: &Arc<Relay>,
    kind: Option<Kind>,
    query: Query,
) -> Result<String, ProtocolError> {
    let Some(slot) = Asking::take(relay) else {
        return Err(ProtocolError::RateLimited(
            "too many presence queries in flight on this node; retry",
        ));
    };
    let asked = relay.backplane.ask(relay, &query);
    let (own, _slot) = {
        let relay = Arc::clone(relay);
        let query = query.clone();
        // Off the async workers: a page over a big table is milliseconds of CPU. The slot
        // goes with the work and comes back with its result (see [`Asking`]).
        tokio::task::spawn_blocking(move || (local(&relay, &query), slot))
            .await
            .map_err(|_| ProtocolError::RateLimited("presence query failed; retry"))?
    };
    let me = node_name(relay.backplane.node_tag());
    let mut answers: Vec<(String, Answer)> = vec![(me.clone(), own)];
    let mut missing: Vec<String> = Vec::new();
    if let Some(Asked {
        nodes,
        answers: mut incoming,
    }) = asked
    {
        let mut waiting: HashSet<String> = nodes.into_iter().collect();
        let deadline = tokio::time::Instant::now() + TIMEOUT;
        while !waiting.is_empty() {
            match tokio::time::timeout_at(deadline, incoming.recv()).await {
                Ok(Some((node, answer))) => {
                    waiting.remove(&node);
                    if !answers.iter().any(|(n, _)| *n == node) {
                        answers.push((node, answer));
                    }
                }
                Ok(None) | Err(_) => break,
            }
        }
        missing = waiting.into_iter().collect();
        missing.sort();
    }
    Ok(merge(kind, query.limit(), &me, answers, missing))
}

#[derive(Serialize)]
struct InfoNode<'a> {
    id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    connections: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    version: Option<&'a str>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    timeout: bool,
}

/// Merges the nodes' answers into the event's result (SPEC §12).
pub fn merge(
    kind: Option<Kind>,
    limit: usize,
    me: &str,
    mut answers: Vec<(String, Answer)>,
    missing: Vec<String>,
) -> String {
    // This node first, then the others by id.
    answers.sort_by(|a, b| (a.0 != me, &a.0).cmp(&(b.0 != me, &b.0)));
    let timeout = |value: &mut serde_json::Value| {
        if !missing.is_empty() {
            value["timeout"] = serde_json::json!(missing);
        }
    };
    match kind {
        None => {
            let mut nodes = Vec::new();
            let (mut connections, mut users, mut channels, mut groups) = (0, 0, 0, 0);
            for (id, answer) in &answers {
                if let Answer::Info(info) = answer {
                    connections += info.connections;
                    users += info.users;
                    channels += info.channels;
                    groups += info.groups;
                    nodes.push(InfoNode {
                        id,
                        connections: Some(info.connections),
                        version: Some(&info.version),
                        timeout: false,
                    });
                }
            }
            for id in &missing {
                nodes.push(InfoNode {
                    id,
                    connections: None,
                    version: None,
                    timeout: true,
                });
            }
            serde_json::json!({
                "nodes": nodes,
                "connections": connections,
                "users": users,
                "channels": channels,
                "groups": groups,
            })
            .to_string()
        }
        Some(kind @ (Kind::Users | Kind::Channels)) => {
            let mut cutoff: Option<String> = None;
            let mut sums: BTreeMap<String, usize> = BTreeMap::new();
            for (_, answer) in answers {
                if let Answer::Counts { entries, more } = answer {
                    for (key, n) in entries {
                        *sums.entry(key).or_default() += n;
                    }
                    lower(&mut cutoff, more);
                }
            }
            let (page, next) = page(sums, cutoff, limit);
            let (list, field, name) = match kind {
                Kind::Users => ("users", "connections", "user"),
                _ => ("channels", "subscribers", "name"),
            };
            let entries: Vec<serde_json::Value> = page
                .into_iter()
                .map(|(key, n)| serde_json::json!({ name: key, field: n }))
                .collect();
            let mut value = serde_json::json!({
                list: entries,
                "next": next.map(|key| cursor(kind, &key)),
            });
            timeout(&mut value);
            value.to_string()
        }
        Some(Kind::Connections) => {
            let mut cutoff: Option<String> = None;
            let mut all: BTreeMap<String, ConnectionInfo> = BTreeMap::new();
            for (_, answer) in answers {
                if let Answer::Connections { entries, more } = answer {
                    for info in entries {
                        all.insert(info.target.clone(), info);
                    }
                    lower(&mut cutoff, more);
                }
            }
            let (page, next) = page(all, cutoff, limit);
            let entries: Vec<ConnectionInfo> = page.into_iter().map(|(_, info)| info).collect();
            let mut value = serde_json::json!({
                "connections": entries,
                "next": next.map(|key| cursor(Kind::Connections, &key)),
            });
            timeout(&mut value);
            value.to_string()
        }
    }
}

fn lower(cutoff: &mut Option<String>, more: Option<String>) {
    if let Some(more) = more
        && cutoff.as_ref().is_none_or(|c| more < *c)
    {
        *cutoff = Some(more);
    }
}

/// The first `limit` entries not past `cutoff`, and where the next page starts: after the
/// last entry taken when the limit cut it, else after the cutoff (every node looked that far).
fn page<V>(
    all: BTreeMap<String, V>,
    cutoff: Option<String>,
    limit: usize,
) -> (Vec<(String, V)>, Option<String>) {
    let mut within = all
        .into_iter()
        .filter(|(key, _)| cutoff.as_ref().is_none_or(|c| key <= c));
    let taken: Vec<(String, V)> = within.by_ref().take(limit).collect();
    let next = if within.next().is_some() {
        taken.last().map(|(key, _)| key.clone())
    } else {
        cutoff
    };
    (taken, next)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_heap_keeps_the_smallest_after_the_cursor() {
        let keys = (0..1000u32).rev().map(|n| format!("k{n:04}"));
        let after = "k0100".to_string();
        let (page, more) = smallest(keys, Some(&after), 3);
        assert_eq!(page, ["k0101", "k0102", "k0103"]);
        assert!(more);
        let (page, more) = smallest(["b", "a"].into_iter(), None, 3);
        assert_eq!(page, ["a", "b"]);
        assert!(!more);
    }

    #[test]
    fn a_merge_never_skips_what_a_node_did_not_look_at() {
        let counts = |e: &[(&str, usize)], more: Option<&str>| Answer::Counts {
            entries: e.iter().map(|(k, n)| (k.to_string(), *n)).collect(),
            more: more.map(str::to_string),
        };
        // Node b looked only up to "c" (its page was cut): "d" of node a waits for the
        // next page, which b will answer from "c" on.
        let answers = vec![
            ("a".to_string(), counts(&[("a", 1), ("d", 2)], None)),
            ("b".to_string(), counts(&[("a", 1), ("c", 1)], Some("c"))),
        ];
        let text = merge(Some(Kind::Users), 10, "a", answers, vec![]);
        let value: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(
            value["users"],
            serde_json::json!([{"user":"a","connections":2},{"user":"c","connections":1}])
        );
        assert_eq!(value["next"], serde_json::json!(cursor(Kind::Users, "c")));
    }

    #[test]
    fn cursors_belong_to_their_event() {
        let c = cursor(Kind::Users, "alice");
        assert_eq!(read_cursor(Kind::Users, &c).unwrap(), "alice");
        assert!(read_cursor(Kind::Channels, &c).is_err());
        assert!(read_cursor(Kind::Users, "uzz").is_err());
        assert!(read_cursor(Kind::Connections, &cursor(Kind::Connections, "x")).is_err());
    }
}
