//! A connection's outbound queue: bounded in bytes, never blocking whoever pushes.
//!
//! Why not tokio's `mpsc`: an unbounded channel allocates a 32-slot block and cache-padded
//! state up front, about 1.7 KiB per connection before anything is sent, and cannot drop its
//! contents on demand. An idle connection here costs an empty `VecDeque` (no allocation), a
//! mutex and a `Notify`. The lock is held only to push or pop one item.
//!
//! Every queued byte is also charged to the server's memory budget ([`Memory`]), so that the
//! sum over all connections is bounded, not only each queue.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Notify;

use crate::hub::Outgoing;
use crate::memory::Memory;

#[derive(Debug)]
pub struct Outbox {
    queue: Mutex<Queue>,
    /// Wakes the connection's writer after a push.
    ready: Notify,
    /// Most bytes queued at once; one more and the push is refused.
    max_bytes: usize,
    /// The server's budget, charged with what this queue holds.
    memory: Arc<Memory>,
}

#[derive(Debug, Default)]
struct Queue {
    items: VecDeque<Outgoing>,
    bytes: usize,
    /// The connection is closing: pushes are refused.
    closed: bool,
}

/// What became of a push.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Push {
    Queued,
    /// Over the byte limit, or the server far over its memory budget while this queue
    /// already holds something: the reader is too slow.
    Full,
    /// The connection is closing.
    Closed,
}

/// What a queued item costs beyond its frame's bytes (queue slot, shared-buffer header):
/// counted against the limit, so a flood of tiny frames is bounded in memory too.
const ITEM_OVERHEAD: usize = 64;

/// A queue that grew this large during a burst gives its memory back once drained.
const SHRINK_ABOVE: usize = 64;

impl Outbox {
    pub fn new(max_bytes: usize, memory: Arc<Memory>) -> Outbox {
        Outbox {
            queue: Mutex::new(Queue::default()),
            ready: Notify::new(),
            max_bytes,
            memory,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn push(&self, item: Outgoing) -> Push {
        let len = item.frame().len() + ITEM_OVERHEAD;
        {
            let mut queue = self.lock();
            if queue.closed {
                return Push::Closed;
            }
            if queue.bytes + len > self.max_bytes {
                return Push::Full;
            }
            // Far over the budget, only a queue that is empty (its reader keeps up) may take
            // one more frame: the sweeper is about to close the biggest consumers, and until
            // it has, the memory is not allowed to grow with the slow ones.
            if !queue.items.is_empty() && self.memory.far_over(len) {
                self.memory.refused();
                return Push::Full;
            }
            queue.bytes += len;
            queue.items.push_back(item);
            self.memory.charge_outbound(len);
        }
        self.ready.notify_one();
        Push::Queued
    }

    /// Whether a frame of `len` bytes fits in an empty queue at all.
    pub fn could_ever_fit(&self, len: usize) -> bool {
        len + ITEM_OVERHEAD <= self.max_bytes
    }

    pub fn pop(&self) -> Option<Outgoing> {
        let mut queue = self.lock();
        let item = queue.items.pop_front()?;
        let len = item.frame().len() + ITEM_OVERHEAD;
        queue.bytes -= len;
        self.memory.release_outbound(len);
        if queue.items.is_empty() && queue.items.capacity() > SHRINK_ABOVE {
            queue.items = VecDeque::new();
        }
        Some(item)
    }

    pub fn is_empty(&self) -> bool {
        self.lock().items.is_empty()
    }

    /// Bytes queued now (frames and their overhead), as counted against the limit.
    pub fn bytes(&self) -> usize {
        self.lock().bytes
    }

    /// Resolves after a push (or at once if one happened since the last wait).
    pub async fn ready(&self) {
        self.ready.notified().await;
    }

    /// Refuses further pushes and returns what was still queued.
    pub fn close(&self) -> Vec<Outgoing> {
        let mut queue = self.lock();
        queue.closed = true;
        self.memory.release_outbound(queue.bytes);
        queue.bytes = 0;
        queue.items.drain(..).collect()
    }
}

impl Drop for Outbox {
    /// A queue dropped without being closed (a peer that never had a connection task) gives
    /// its bytes back too.
    fn drop(&mut self) {
        let queue = self.lock();
        self.memory.release_outbound(queue.bytes);
    }
}
