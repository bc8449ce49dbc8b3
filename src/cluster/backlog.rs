//! What waits to be published to the other nodes, in two lanes with budgets of their own
//! (see [`Backlog`]): an outage or a flood of clients costs bounded memory and never an
//! admin's message.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Notify;
use uuid::Uuid;

use super::wire::Op;
use crate::peer::Peer;

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

/// Bytes of the client lane that clients of other nodes may take: messages this node passes
/// on for them (a group it resolved from one of its connection ids). They have no connection
/// here to charge a share to, so they get a quarter of the lane between them: clients
/// elsewhere cannot crowd this node's own clients out.
const RELAYED_BYTES: usize = CLIENT_BACKLOG_BYTES / 4;

/// What a queued message costs beyond its text (queue slot, allocation, topic): counted, so
/// a flood of tiny messages is bounded too.
pub(super) const MESSAGE_OVERHEAD: usize = 64;

/// Which lane a message waits in (see [`Backlog`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Lane {
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
pub(super) struct Backlog {
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
    /// Of `client_bytes`, what clients of other nodes take (see [`RELAYED_BYTES`]).
    relayed_bytes: usize,
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
pub(super) struct Taken {
    pub(super) topic: String,
    pub(super) op: Op,
    pub(super) forward: Option<(Uuid, u64)>,
}

/// Why a message was not queued.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Refused {
    /// The lane is full: load on everyone, not the sender's doing.
    Full,
    /// The sending connection has its share waiting already.
    SenderBusy,
}

impl Backlog {
    pub(super) fn new() -> Backlog {
        Backlog {
            lanes: Mutex::new(Lanes::default()),
            ready: Notify::new(),
        }
    }

    fn lanes(&self) -> MutexGuard<'_, Lanes> {
        self.lanes.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn push(
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
                    match sender {
                        Some(sender) => {
                            sender.cluster_bytes.fetch_add(cost, Ordering::Relaxed);
                        }
                        None => lanes.relayed_bytes += cost,
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
    pub(super) fn client_room(&self, cost: usize, sender: &Arc<Peer>) -> Result<(), Refused> {
        self.lanes().room(Lane::Clients, cost, Some(sender))
    }

    /// The next message to publish: control first.
    pub(super) fn try_pop(&self) -> Option<Taken> {
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
        match sender {
            Some(sender) => {
                sender.cluster_bytes.fetch_sub(cost, Ordering::Relaxed);
            }
            None => lanes.relayed_bytes -= cost,
        }
        Some(Taken { topic, op, forward })
    }

    pub(super) async fn pop(&self) -> Taken {
        loop {
            if let Some(taken) = self.try_pop() {
                return taken;
            }
            self.ready.notified().await;
        }
    }

    pub(super) fn bytes(&self) -> usize {
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
                match sender {
                    Some(sender) => {
                        let waiting = sender.cluster_bytes.load(Ordering::Relaxed);
                        if waiting > 0 && waiting + cost > PER_CLIENT_BYTES {
                            return Err(Refused::SenderBusy);
                        }
                    }
                    None if self.relayed_bytes + cost > RELAYED_BYTES => {
                        return Err(Refused::Full);
                    }
                    None => {}
                }
                if self.client_bytes + cost > CLIENT_BACKLOG_BYTES {
                    return Err(Refused::Full);
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(len: usize) -> Op {
        Op::Servers {
            servers: vec!["x".repeat(len)],
        }
    }

    /// Messages passed on for clients of other nodes take at most a quarter of the client
    /// lane: this node's own clients still get theirs in.
    #[test]
    fn relayed_messages_take_at_most_a_quarter_of_the_client_lane() {
        let backlog = Backlog::new();
        let chunk = 64 * 1024;
        let mut relayed = 0;
        while backlog
            .push(Lane::Clients, "t".into(), op(chunk), None, None)
            .is_ok()
        {
            relayed += 1;
            assert!(relayed <= CLIENT_BACKLOG_BYTES / chunk, "never refused");
        }
        let taken = relayed * (chunk + 1 + MESSAGE_OVERHEAD);
        assert!(taken <= RELAYED_BYTES, "{taken} > {RELAYED_BYTES}");
        assert!(
            taken + chunk + 1 + MESSAGE_OVERHEAD > RELAYED_BYTES,
            "refused too early"
        );
        // A client of this node still has the rest of the lane.
        let memory = Arc::new(crate::memory::Memory::new(
            usize::MAX / 4,
            &crate::metrics::Metrics::new(),
        ));
        let client = Peer::new(1, 1 << 20, &memory);
        assert_eq!(
            backlog.push(Lane::Clients, "t".into(), op(chunk), Some(&client), None),
            Ok(())
        );
        // Taking them out gives the room back.
        while backlog.try_pop().is_some() {}
        assert_eq!(backlog.bytes(), 0);
        assert!(
            backlog
                .push(Lane::Clients, "t".into(), op(chunk), None, None)
                .is_ok()
        );
    }
}
