//! The server pool and the client connects waiting for a server. A `client_connect` goes to
//! one of this node's servers, round robin; else to a server on another node (the cluster's
//! `remote`); else it waits here, oldest first, until a server joins or it expires.
//!
//! One small `Mutex` holds it all, because round robin needs a single cursor and the queue's
//! order must hold across both; it is touched only by `client_connect` and by servers coming
//! and going, and every operation under it is O(1) amortised or done in batches.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use tokio_tungstenite::tungstenite::Utf8Bytes;
use uuid::Uuid;

use crate::peer::{Outgoing, Peer};
use crate::protocol::ProtocolError;

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

/// The server pool of this node and the client connects waiting for a server; owned by the
/// hub ([`crate::hub::Hub::pool`]).
pub struct Pool {
    inner: Mutex<ServerPool>,
    /// Most requests waiting (`--pending-connects`).
    pending_limit: usize,
    /// How long a request may wait before it is answered `no_server`.
    pending_timeout: Duration,
}

impl Pool {
    pub fn new(pending_limit: usize, pending_timeout: Duration) -> Pool {
        Pool {
            inner: Mutex::new(ServerPool::default()),
            pending_limit,
            pending_timeout,
        }
    }

    fn lock(&self) -> MutexGuard<'_, ServerPool> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds a server to the pool (once) and hands it the client connects that were waiting.
    /// Returns false if it was already in the pool.
    pub fn join(&self, server: &Arc<Peer>) -> bool {
        if server.state().closed {
            return false;
        }
        let mut pool = self.lock();
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
        let mut pool = self.lock();
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
            let more = flush_batch(&mut self.lock(), &mut remote);
            if !more {
                return;
            }
        }
    }

    /// The ids of this node's servers, for the cluster's heartbeat.
    pub fn local_servers(&self) -> Vec<String> {
        self.lock()
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

    /// Queues a client's call (`invoke`) for one of this node's servers, round robin,
    /// skipping one whose queue is full. False: no local server can take it. Calls never
    /// wait here: a caller is answered at once when no server is connected.
    pub fn offer_invoke(&self, frame: Utf8Bytes) -> bool {
        let mut pool = self.lock();
        for _ in 0..pool.servers.len() {
            let Some(server) = pool.pick() else { break };
            if server.offer(Outgoing::Text(frame.clone())) {
                return true;
            }
        }
        false
    }

    /// Whether `client` has a request waiting in the queue.
    pub fn is_pending(&self, client: Uuid) -> bool {
        self.lock().pending.slots.contains_key(&client)
    }

    /// One of this node's servers by id.
    pub fn local_server(&self, target: &str) -> Option<Arc<Peer>> {
        self.lock()
            .servers
            .iter()
            .find(|s| &*s.target == target)
            .cloned()
    }

    /// Answers the client connects that waited longer than the pending timeout with an
    /// error. Called periodically.
    pub fn expire(&self) {
        // Servers whose queues were full a moment ago may have room again.
        self.flush_pending(|_, _| false);
        loop {
            // Taken in batches and answered outside the lock.
            let mut expired = Vec::new();
            {
                let mut pool = self.lock();
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

    /// Drops a client's waiting `client_connect`, if any: it was answered otherwise (the
    /// relay acknowledged the client by its token).
    pub fn withdraw(&self, client: Uuid) {
        self.lock().pending.remove(client);
    }

    /// Takes a closed connection out of the pool and the waiting queue.
    pub fn remove(&self, id: Uuid) {
        let mut pool = self.lock();
        if let Some(i) = pool.servers.iter().position(|s| s.id == id) {
            pool.servers.remove(i);
            if i < pool.next {
                pool.next -= 1;
            }
        }
        pool.pending.remove(id);
    }

    /// Sends the `client_connect` forwards a closed server never wrote to another server (or
    /// back to the waiting queue), so a server closing never loses a client's request.
    /// The waiting queue's limits hold here too: a request it has no room for is answered
    /// with an error (outside the lock), like a new one would be.
    pub fn reforward(&self, unsent: Vec<Outgoing>) {
        let mut refused = Vec::new();
        {
            let mut pool = self.lock();
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

    /// (servers, waiting requests, their bytes), for [`crate::hub::HubStats`].
    pub fn counts(&self) -> (usize, usize, usize) {
        let pool = self.lock();
        (pool.servers.len(), pool.pending.len(), pool.pending.bytes)
    }
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
        let pool = Pool::new(100, Duration::ZERO);
        let no_remote = |_: &Arc<Peer>, _: Utf8Bytes| false;
        let [a, b, c, d] = [(); 4].map(|_| peer());
        let check = |pool: &Pool, count: usize, bytes: usize| {
            let (_, pending, pending_bytes) = pool.counts();
            assert_eq!((pending, pending_bytes), (count, bytes));
            let inner = pool.lock();
            let sum: usize = inner.pending.slots.values().map(|s| s.frame.len()).sum();
            assert_eq!(sum, bytes, "running total drifted from the slots");
        };
        for (peer, len) in [(&a, 10), (&b, 20), (&c, 30)] {
            assert_eq!(
                pool.forward_connect(peer, frame(len), no_remote),
                Ok(Forwarded::Queued)
            );
        }
        check(&pool, 3, 60);
        // A repeat replaces the waiting request: same count, the new size.
        pool.forward_connect(&a, frame(15), no_remote).unwrap();
        check(&pool, 3, 65);
        // Many repeats leave stale tickets behind, compacted, never counted.
        for i in 0..500 {
            pool.forward_connect(&b, frame(i % 7 + 1), no_remote)
                .unwrap();
        }
        check(&pool, 3, 15 + 30 + 499 % 7 + 1);
        assert!(pool.lock().pending.order.len() <= 2 * 3 + 64 + 1);
        // A closed client is removed at once.
        pool.remove(c.id);
        check(&pool, 2, 15 + 499 % 7 + 1);
        // A client dropped without `remove` is skipped (and uncounted) when reached.
        pool.forward_connect(&d, frame(40), no_remote).unwrap();
        drop(d);
        pool.expire();
        check(&pool, 0, 0);
        // Expired clients got no_server, once each; a's queued frame is the last it sent.
        for peer in [&a, &b] {
            let Some(Outgoing::Text(error)) = peer.outbox.pop() else {
                panic!("no error for an expired client connect");
            };
            assert!(error.as_str().contains("no_server"), "{error}");
            assert!(peer.outbox.pop().is_none());
        }
        // Hand-over: a server takes them oldest first, each client's latest request once.
        let pool = Pool::new(100, Duration::from_secs(60));
        let [a, b] = [(); 2].map(|_| peer());
        pool.forward_connect(&a, frame(1), no_remote).unwrap();
        pool.forward_connect(&b, frame(2), no_remote).unwrap();
        pool.forward_connect(&a, frame(3), no_remote).unwrap();
        let server = peer();
        assert!(pool.join(&server));
        check(&pool, 0, 0);
        let mut got = Vec::new();
        while let Some(item) = server.outbox.pop() {
            got.push(item.frame().len());
        }
        assert_eq!(got, [2, 3]);
        // The limit counts live requests: a repeat is let in when full, a newcomer is not.
        let pool = Pool::new(2, Duration::from_secs(60));
        let [a, b, c] = [(); 3].map(|_| peer());
        pool.forward_connect(&a, frame(1), no_remote).unwrap();
        pool.forward_connect(&b, frame(1), no_remote).unwrap();
        assert!(pool.forward_connect(&c, frame(1), no_remote).is_err());
        assert_eq!(
            pool.forward_connect(&b, frame(5), no_remote),
            Ok(Forwarded::Queued)
        );
        check(&pool, 2, 6);
    }
}
