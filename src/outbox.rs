//! A connection's outbound queue: bounded in bytes, never blocking whoever pushes.
//!
//! Why not tokio's `mpsc`: an unbounded channel allocates a 32-slot block and cache-padded
//! state up front, about 1.7 KiB per connection before anything is sent, and cannot drop its
//! contents on demand. An idle connection here costs an empty `VecDeque` (no allocation), a
//! mutex and a `Notify`. The lock is held only to push or pop one item.

use std::collections::VecDeque;
use std::sync::{Mutex, MutexGuard};

use tokio::sync::Notify;

use crate::hub::Outgoing;

#[derive(Debug)]
pub struct Outbox {
    queue: Mutex<Queue>,
    /// Wakes the connection's writer after a push.
    ready: Notify,
    /// Most bytes queued at once; one more and the push is refused.
    max_bytes: usize,
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
    /// Over the byte limit: the reader is too slow.
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
    pub fn new(max_bytes: usize) -> Outbox {
        Outbox {
            queue: Mutex::new(Queue::default()),
            ready: Notify::new(),
            max_bytes,
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
            queue.bytes += len;
            queue.items.push_back(item);
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
        queue.bytes -= item.frame().len() + ITEM_OVERHEAD;
        if queue.items.is_empty() && queue.items.capacity() > SHRINK_ABOVE {
            queue.items = VecDeque::new();
        }
        Some(item)
    }

    pub fn is_empty(&self) -> bool {
        self.lock().items.is_empty()
    }

    /// Resolves after a push (or at once if one happened since the last wait).
    pub async fn ready(&self) {
        self.ready.notified().await;
    }

    /// Refuses further pushes and returns what was still queued.
    pub fn close(&self) -> Vec<Outgoing> {
        let mut queue = self.lock();
        queue.closed = true;
        queue.bytes = 0;
        queue.items.drain(..).collect()
    }
}
