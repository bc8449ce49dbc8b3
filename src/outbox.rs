//! A connection's outbound queue: bounded in bytes, never blocking whoever pushes.
//!
//! Why not tokio's `mpsc`: an unbounded channel allocates a 32-slot block and cache-padded
//! state up front, about 1.7 KiB per connection before anything is sent, and cannot drop its
//! contents on demand. An idle connection here costs an empty `VecDeque` (no allocation), a
//! mutex and a `Notify`. The lock is held only to push or pop one item.
//!
//! Every queued byte is also charged to the server's memory budget ([`Memory`]), so that the
//! sum over all connections is bounded, not only each queue. A frame stays charged until it
//! is written to the socket, not merely taken from the queue ([`Taken`]): a stalled socket
//! holds the frame in the writer's buffer just as long. A frame shared by many queues (a
//! broadcast, [`SharedFrame`]) is charged once, by itself; each queue holding it is charged
//! only its [`ITEM_OVERHEAD`], while its own byte limit still counts the whole frame.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Notify;
use tokio_tungstenite::tungstenite::Utf8Bytes;

use crate::memory::Memory;
use crate::peer::Outgoing;

/// In this field order (`repr(C)`): what every push reads (the queue, `in_flight`,
/// `max_bytes`, `memory`) sits together, so a broadcast to thousands of queues, which finds
/// none of them in the cache, touches as few lines of each as it can; `ready` comes last, as
/// only a push into an empty queue touches it.
#[derive(Debug)]
#[repr(C)]
pub struct Outbox {
    queue: Mutex<Queue>,
    /// Bytes of frames taken from the queue and not yet written ([`Taken`]).
    in_flight: AtomicUsize,
    /// Most bytes queued at once; one more and the push is refused.
    max_bytes: usize,
    /// The server's budget, charged with what this queue holds.
    memory: Arc<Memory>,
    /// Wakes the connection's writer after a push.
    ready: Notify,
}

#[derive(Debug, Default)]
struct Queue {
    items: VecDeque<Outgoing>,
    /// What the items count against `max_bytes`: their whole frames and overhead.
    bytes: usize,
    /// What the items charge the budget (a shared frame only its overhead).
    charged: usize,
    /// Bytes of error replies among the items: what the peer provoked and has not read.
    errors: usize,
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

/// Far over the memory budget, a queue holding less than this still takes a frame: a
/// reader that keeps up (a bystander whose writer has not yet taken the last notification,
/// on a busy server) is never closed for others' memory; bigger queues are refused.
const SPARE: usize = 16 * 1024;

/// A queue that grew this large during a burst gives its memory back once drained.
const SHRINK_ABOVE: usize = 64;

/// One frame queued for many connections (`notify_all`, `notify_group`, `publish`): its bytes
/// exist once, so they are charged to the budget once, from when it is made until the last
/// queue or writer holding it lets it go.
#[derive(Debug)]
pub struct SharedFrame {
    frame: Utf8Bytes,
    memory: Arc<Memory>,
}

impl SharedFrame {
    pub fn new(frame: Utf8Bytes, memory: &Arc<Memory>) -> Arc<SharedFrame> {
        memory.charge_outbound(frame.len());
        Arc::new(SharedFrame {
            frame,
            memory: Arc::clone(memory),
        })
    }

    pub fn frame(&self) -> &Utf8Bytes {
        &self.frame
    }
}

impl Drop for SharedFrame {
    fn drop(&mut self) {
        self.memory.release_outbound(self.frame.len());
    }
}

/// The per-queue overhead of one broadcast's items, charged to the budget in advance for
/// [`Prepaid::CHUNK`] queues at a time: the budget's gauge is shared by every connection, so
/// one update of it per recipient was the costly part of queueing a broadcast. The budget is
/// charged at most a chunk more than the queues hold, never less; what is left over goes
/// back when the broadcast is done (dropped).
#[derive(Debug, Default)]
pub struct Prepaid {
    memory: Option<Arc<Memory>>,
    /// Items paid for and not yet queued.
    credit: usize,
}

impl Prepaid {
    const CHUNK: usize = 64;

    /// Queues one shared frame (`Outgoing::Relay`) on `outbox`, as [`Outbox::push`] does.
    pub fn push(&mut self, outbox: &Outbox, item: Outgoing, exempt: bool) -> Push {
        let memory = self
            .memory
            .get_or_insert_with(|| Arc::clone(outbox.memory()));
        if !matches!(item, Outgoing::Relay(_)) || !Arc::ptr_eq(memory, outbox.memory()) {
            return outbox.push(item, exempt);
        }
        if self.credit == 0 {
            memory.charge_outbound(Prepaid::CHUNK * ITEM_OVERHEAD);
            self.credit = Prepaid::CHUNK;
        }
        let pushed = outbox.push_prepaid(item, exempt);
        if pushed == Push::Queued {
            self.credit -= 1;
        }
        pushed
    }
}

impl Drop for Prepaid {
    fn drop(&mut self) {
        if let Some(memory) = &self.memory
            && self.credit > 0
        {
            memory.release_outbound(self.credit * ITEM_OVERHEAD);
        }
    }
}

/// What `item` counts against the queue's byte limit.
fn size(item: &Outgoing) -> usize {
    item.frame().len() + ITEM_OVERHEAD
}

/// What `item` charges the budget while queued: a shared frame is charged by itself.
fn charge(item: &Outgoing) -> usize {
    match item {
        Outgoing::Relay(_) => ITEM_OVERHEAD,
        _ => size(item),
    }
}

/// A frame taken from the queue to be written. It stays counted, in the queue's bytes and in
/// the budget, until dropped: the writer drops it once the socket took it (after the flush).
#[derive(Debug)]
pub struct Taken<'a> {
    item: Option<Outgoing>,
    outbox: &'a Outbox,
    size: usize,
    charge: usize,
}

impl Taken<'_> {
    pub fn frame(&self) -> &Utf8Bytes {
        match &self.item {
            Some(item) => item.frame(),
            None => unreachable!("a Taken holds its item until dropped or unwrapped"),
        }
    }

    /// The item itself, no longer counted (it is going elsewhere, or nowhere).
    pub fn into_item(mut self) -> Outgoing {
        match self.item.take() {
            Some(item) => item,
            None => unreachable!("a Taken holds its item until dropped or unwrapped"),
        }
    }
}

impl Drop for Taken<'_> {
    fn drop(&mut self) {
        self.outbox
            .in_flight
            .fetch_sub(self.size, Ordering::Relaxed);
        self.outbox.memory.release_outbound(self.charge);
    }
}

/// Frames taken together by the writer: counted like a [`Taken`] each until dropped, with one
/// update of the shared counters for the whole batch instead of two per frame (the budget's
/// counters are shared by every connection, so they are the costly part of a delivery).
#[derive(Debug)]
pub struct Batch<'a> {
    items: Vec<Outgoing>,
    outbox: &'a Outbox,
    size: usize,
    charge: usize,
}

impl Batch<'_> {
    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    pub fn frames(&self) -> impl Iterator<Item = &Utf8Bytes> {
        self.items.iter().map(Outgoing::frame)
    }
}

impl Drop for Batch<'_> {
    fn drop(&mut self) {
        self.outbox
            .in_flight
            .fetch_sub(self.size, Ordering::Relaxed);
        self.outbox.memory.release_outbound(self.charge);
    }
}

/// The items of taken frames, uncounted: for a closed connection's frames that go elsewhere.
pub fn items(taken: Vec<Taken<'_>>) -> Vec<Outgoing> {
    taken.into_iter().map(Taken::into_item).collect()
}

impl Outbox {
    pub fn new(max_bytes: usize, memory: Arc<Memory>) -> Outbox {
        Outbox {
            queue: Mutex::new(Queue::default()),
            ready: Notify::new(),
            max_bytes,
            memory,
            in_flight: AtomicUsize::new(0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The budget this queue charges, for frames shared with other queues.
    pub fn memory(&self) -> &Arc<Memory> {
        &self.memory
    }

    /// Queues `item`. `exempt` (an admin's queue) is never refused for the memory budget,
    /// only for its own byte limit: the budget's pressure is for the peers that cause it.
    pub fn push(&self, item: Outgoing, exempt: bool) -> Push {
        let charge = charge(&item);
        self.push_charged(item, exempt, charge)
    }

    /// Queues one item of a broadcast whose per-queue overhead ([`ITEM_OVERHEAD`]) the caller
    /// has already charged to the budget ([`Prepaid`]): one update of the shared gauge per
    /// many recipients instead of one per recipient.
    fn push_prepaid(&self, item: Outgoing, exempt: bool) -> Push {
        self.push_charged(item, exempt, 0)
    }

    /// [`Outbox::push`], charging the budget `charge_now` of what the item counts in this
    /// queue's `charged` (the rest was charged before).
    fn push_charged(&self, item: Outgoing, exempt: bool, charge_now: usize) -> Push {
        let len = size(&item);
        let charge = self::charge(&item);
        let error = match item {
            Outgoing::Error(_) => len,
            _ => 0,
        };
        let wake = {
            let mut queue = self.lock();
            if queue.closed {
                return Push::Closed;
            }
            if queue.bytes + self.in_flight.load(Ordering::Relaxed) + len > self.max_bytes {
                return Push::Full;
            }
            // Far over the budget, only a queue that holds little (its reader keeps up) may
            // take one more frame: the sweeper is about to close the biggest consumers, and
            // until it has, the memory is not allowed to grow with the slow ones.
            if !exempt && queue.bytes >= SPARE && self.memory.far_over(charge_now) {
                self.memory.refused();
                return Push::Full;
            }
            queue.bytes += len;
            queue.charged += charge;
            queue.errors += error;
            // Only a push into an empty queue wakes the writer: it waits only after it saw
            // the queue empty (`is_empty`, under this lock), so items pushed behind others
            // are taken in the same round, and a wake-up for them would be a spurious one.
            let wake = queue.items.is_empty();
            queue.items.push_back(item);
            if charge_now > 0 {
                self.memory.charge_outbound(charge_now);
            }
            wake
        };
        if wake {
            self.ready.notify_one();
        }
        Push::Queued
    }

    /// Whether a frame of `len` bytes fits in an empty queue at all.
    pub fn could_ever_fit(&self, len: usize) -> bool {
        len + ITEM_OVERHEAD <= self.max_bytes
    }

    /// Takes the oldest frame to write it; it stays counted until the [`Taken`] is dropped.
    pub fn take(&self) -> Option<Taken<'_>> {
        let mut queue = self.lock();
        let item = queue.items.pop_front()?;
        let taken = self.taken(&mut queue, item);
        if queue.items.is_empty() && queue.items.capacity() > SHRINK_ABOVE {
            queue.items = VecDeque::new();
        }
        Some(taken)
    }

    /// Takes up to `max` of the oldest frames to write them, counted as [`Outbox::take`]'s are
    /// until the [`Batch`] is dropped.
    pub fn take_batch(&self, max: usize) -> Batch<'_> {
        let (mut size, mut queued) = (0, 0);
        let items = {
            let mut queue = self.lock();
            let mut items = Vec::with_capacity(queue.items.len().min(max));
            while items.len() < max {
                let Some(item) = queue.items.pop_front() else {
                    break;
                };
                let (len, charged) = (self::size(&item), charge(&item));
                queue.bytes -= len;
                queue.charged -= charged;
                if let Outgoing::Error(_) = item {
                    queue.errors -= len;
                }
                size += len;
                queued += charged;
                items.push(item);
            }
            if queue.items.is_empty() && queue.items.capacity() > SHRINK_ABOVE {
                queue.items = VecDeque::new();
            }
            self.in_flight.fetch_add(size, Ordering::Relaxed);
            items
        };
        // Charged in full while being written (see `taken`).
        if size > queued {
            self.memory.charge_outbound(size - queued);
        }
        Batch {
            items,
            outbox: self,
            size,
            charge: size,
        }
    }

    /// Moves `item`'s counts from the queue to a [`Taken`]. A taken frame is charged in full,
    /// shared or not: the writer copies it into the socket's write buffer, a copy of this
    /// connection's own that lives until the peer takes the bytes.
    fn taken(&self, queue: &mut Queue, item: Outgoing) -> Taken<'_> {
        let (size, queued) = (size(&item), charge(&item));
        queue.bytes -= size;
        queue.charged -= queued;
        if let Outgoing::Error(_) = item {
            queue.errors -= size;
        }
        if size > queued {
            self.memory.charge_outbound(size - queued);
        }
        self.in_flight.fetch_add(size, Ordering::Relaxed);
        Taken {
            item: Some(item),
            outbox: self,
            size,
            charge: size,
        }
    }

    /// Takes the oldest item, no longer counted (for whoever does not write it).
    pub fn pop(&self) -> Option<Outgoing> {
        self.take().map(Taken::into_item)
    }

    pub fn is_empty(&self) -> bool {
        self.lock().items.is_empty()
    }

    /// Bytes queued now (frames and their overhead), as counted against the limit, with the
    /// frames taken and not yet written.
    pub fn bytes(&self) -> usize {
        self.lock().bytes + self.in_flight.load(Ordering::Relaxed)
    }

    /// What this queue charges the memory budget now: its own frames in full, a shared
    /// broadcast frame by its overhead only (the frame is charged once, by itself), and the
    /// frames being written in full. What closing this connection gives back, roughly.
    pub fn charged(&self) -> usize {
        // Taken frames are charged their full size (see `taken`), which `in_flight` counts.
        self.lock().charged + self.in_flight.load(Ordering::Relaxed)
    }

    /// Bytes of error replies queued and not yet taken by the writer: replies the peer
    /// provoked and is not reading.
    pub fn unread_errors(&self) -> usize {
        self.lock().errors
    }

    /// Resolves after a push (or at once if one happened since the last wait).
    pub async fn ready(&self) {
        self.ready.notified().await;
    }

    /// Refuses further pushes and returns what was still queued, counted until dropped or
    /// written.
    pub fn close(&self) -> Vec<Taken<'_>> {
        let mut queue = self.lock();
        queue.closed = true;
        let items: Vec<Outgoing> = queue.items.drain(..).collect();
        items
            .into_iter()
            .map(|item| self.taken(&mut queue, item))
            .collect()
    }
}

impl Drop for Outbox {
    /// A queue dropped without being closed (a peer that never had a connection task) gives
    /// its bytes back too.
    fn drop(&mut self) {
        let queue = self.lock();
        self.memory.release_outbound(queue.charged);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn memory() -> Arc<Memory> {
        Arc::new(Memory::new(usize::MAX / 4, &crate::metrics::Metrics::new()))
    }

    /// A broadcast's prepaid overhead: the budget is never charged less than the queues hold
    /// while it runs, and exactly what they hold once it is done and once they are drained.
    #[test]
    fn prepaid_broadcast_charges_the_budget_exactly_once_done() {
        let memory = memory();
        let outboxes: Vec<Outbox> = (0..100)
            .map(|_| Outbox::new(1 << 20, Arc::clone(&memory)))
            .collect();
        let frame = SharedFrame::new(Utf8Bytes::from("x".repeat(100)), &memory);
        {
            let mut prepaid = Prepaid::default();
            for (i, outbox) in outboxes.iter().enumerate() {
                let pushed = prepaid.push(outbox, Outgoing::Relay(Arc::clone(&frame)), false);
                assert_eq!(pushed, Push::Queued);
                assert!(memory.used() >= 100 + (i + 1) * ITEM_OVERHEAD);
            }
        }
        assert_eq!(memory.used(), 100 + 100 * ITEM_OVERHEAD);
        let charged: usize = outboxes.iter().map(Outbox::charged).sum();
        assert_eq!(charged, 100 * ITEM_OVERHEAD);
        // A closed queue refuses, and nothing stays paid for it.
        outboxes[0].close();
        {
            let mut prepaid = Prepaid::default();
            let pushed = prepaid.push(&outboxes[0], Outgoing::Relay(Arc::clone(&frame)), false);
            assert_eq!(pushed, Push::Closed);
        }
        assert_eq!(memory.used(), 100 + 99 * ITEM_OVERHEAD);
        for outbox in &outboxes {
            drop(outbox.take_batch(64));
        }
        drop(frame);
        assert_eq!(memory.used(), 0);
    }

    /// Only a push into an empty queue wakes the writer; the writer takes what was pushed
    /// behind it in the same batch.
    #[tokio::test]
    async fn only_a_push_into_an_empty_queue_wakes_the_writer() {
        let outbox = Outbox::new(1 << 20, memory());
        for _ in 0..3 {
            assert_eq!(outbox.push(Outgoing::Text("a".into()), false), Push::Queued);
        }
        // One wake-up is stored for the first push.
        tokio::time::timeout(std::time::Duration::from_secs(1), outbox.ready())
            .await
            .expect("the first push wakes the writer");
        assert_eq!(outbox.take_batch(64).len(), 3);
        let second = tokio::time::timeout(std::time::Duration::from_millis(50), outbox.ready());
        assert!(
            second.await.is_err(),
            "no wake-up left over for the pushes behind it"
        );
        outbox.push(Outgoing::Text("b".into()), false);
        tokio::time::timeout(std::time::Duration::from_secs(1), outbox.ready())
            .await
            .expect("a push into the emptied queue wakes the writer");
    }
}
