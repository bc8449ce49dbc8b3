//! Forwards of `client_connect` to servers on other nodes, kept in flight until settled
//! (SPEC §9): the other nodes and their servers as their heartbeats tell them, the round
//! robin over those servers, and the receipts, retries and sweep that make a forward never
//! hang when the node it went to dies. The bounds are in the cluster's module doc.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::{Arc, MutexGuard, Weak};
use std::time::{Duration, Instant};

use tokio_tungstenite::tungstenite::Utf8Bytes;
use tracing::debug;
use uuid::Uuid;

use super::backlog::{Lane, MESSAGE_OVERHEAD};
use super::wire::{Op, SharedFrame};
use super::{Cluster, NODE_EXPIRY, topic_of_node};
use crate::peer::Peer;
use crate::protocol::ProtocolError;
use crate::relay::Relay;

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

pub(super) struct RemoteNode {
    /// Sorted, for a stable round robin.
    pub(super) servers: Vec<String>,
    pub(super) seen: Instant,
    /// A forward to it got no receipt in time: not chosen until its next heartbeat.
    pub(super) suspect: bool,
}

/// A `client_connect` forwarded to a server on another node, kept until it is settled: by a
/// receipt and then the client's acknowledgement (or [`HOLD`]), or by sending it again.
pub(super) struct InFlight {
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
pub(super) struct InFlightTable {
    by_client: HashMap<Uuid, InFlight>,
    /// Bytes of the frames held.
    bytes: usize,
}

impl InFlightTable {
    pub(super) fn remove(&mut self, client: Uuid) -> Option<InFlight> {
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
    pub(super) fn nodes(&self) -> MutexGuard<'_, BTreeMap<String, RemoteNode>> {
        self.nodes.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn in_flight(&self) -> MutexGuard<'_, InFlightTable> {
        self.in_flight.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The next server on another node that may be chosen (alive, not suspect), round
    /// robin in a stable order, as (node, server id).
    /// O(nodes), nothing sorted or copied but the pick: it runs under the hub's pool lock.
    pub(super) fn pick_server(&self) -> Option<(String, String)> {
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
    pub(super) fn send_forward(
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
    pub(super) fn going_out(&self, client: Uuid, id: u64) {
        if let Some(entry) = self.in_flight().by_client.get_mut(&client)
            && entry.id == id
        {
            entry.since = Instant::now();
        }
    }

    /// Receipt or failure from the node a forward went to.
    pub(super) fn settle(&self, shared: &Relay, client: &str, id: u64, queued: bool) {
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
    pub(super) fn sweep(&self, shared: &Relay) {
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
