//! One connection as the rest of the server sees it: its id, its bounded outbound queue
//! (what may wait in it: [`Outgoing`]), its hub state, and how it is asked to close
//! ([`Close`]). The connection's own task (`connection.rs`) drains the queue into the socket.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};

use tokio::sync::Notify;
use tokio_tungstenite::tungstenite::Utf8Bytes;
use uuid::Uuid;

use crate::memory::Memory;
use crate::outbox::{Outbox, Prepaid, Push, SharedFrame};
use crate::raw_write::Unwritten;

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
    /// The token that authenticated the connection (SPEC §11) expired; a client reconnects,
    /// or sends a fresh token in `client_connect` before this happens.
    pub const TOKEN_EXPIRED: Close = Close {
        code: 1008,
        reason: "token expired",
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

/// The protocol a connection speaks, so a delivery is written in the form it reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wire {
    /// jssocket's own envelope (SPEC §4).
    Jssocket,
    /// SignalR's JSON hub protocol (SPEC §10): deliveries arrive as invocations.
    SignalR,
    /// jssocket's envelope, with `notify_*` payloads labelled by the event that sent them
    /// (`{"type":"notify_client","data":<payload>}`): asked for with `?labels=1` at the
    /// upgrade, for the web console, which cannot tell a bare payload's sender otherwise.
    /// Everything else reads as for [`Wire::Jssocket`].
    Labelled,
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
    /// errors is told from one that is merely busy (`session::UNREAD_REPLIES`).
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
    /// The protocol it speaks; fixed at the upgrade.
    pub wire: Wire,
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
    /// Frames taken from `outbox` and built for the socket, not yet wholly written (see
    /// [`crate::raw_write`]); empty between batches.
    pub unwritten: Unwritten,
}

impl Peer {
    /// A connection of node `node`: its id is random but for its first four bytes, which
    /// name the node (see [`crate::backplane::node_of`]), so a message for it is routed to
    /// that node alone. The id stays a version 4 UUID (the version and variant bits are in
    /// bytes 6 and 8), with 90 random bits: no more guessable for it.
    pub fn new(node: u32, max_queue: usize, memory: &Arc<Memory>) -> Arc<Peer> {
        Peer::with_id(Peer::new_id(node), Wire::Jssocket, max_queue, memory)
    }

    /// A fresh connection id of node `node` (see [`Peer::new`]): made before the connection
    /// itself when a SignalR client negotiates first.
    pub fn new_id(node: u32) -> Uuid {
        let mut bytes = *Uuid::new_v4().as_bytes();
        bytes[..4].copy_from_slice(&node.to_be_bytes());
        Uuid::from_bytes(bytes)
    }

    /// A connection with a given id (from [`Peer::new_id`]) speaking `wire`.
    pub fn with_id(id: Uuid, wire: Wire, max_queue: usize, memory: &Arc<Memory>) -> Arc<Peer> {
        let peer = Peer {
            id,
            wire,
            target: id.hyphenated().to_string().into_boxed_str(),
            outbox: Outbox::new(max_queue, Arc::clone(memory)),
            inbound: AtomicUsize::new(0),
            retained: AtomicUsize::new(0),
            closing: OnceLock::new(),
            kill: Notify::new(),
            state: Mutex::new(PeerState::default()),
            cluster_bytes: AtomicUsize::new(0),
            admin: AtomicBool::new(false),
            unwritten: Unwritten::default(),
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

    pub(crate) fn enqueue(&self, item: Outgoing) -> bool {
        let pushed = self.outbox.push(item, self.is_admin());
        self.pushed(pushed)
    }

    /// Queues one item of a broadcast, as [`Peer::enqueue`] does, its queue overhead paid
    /// for in advance by `prepaid`.
    pub(crate) fn enqueue_prepaid(&self, item: Outgoing, prepaid: &mut Prepaid) -> bool {
        let pushed = prepaid.push(&self.outbox, item, self.is_admin());
        self.pushed(pushed)
    }

    fn pushed(&self, pushed: Push) -> bool {
        match pushed {
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
    pub(crate) fn offer(&self, item: Outgoing) -> bool {
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
