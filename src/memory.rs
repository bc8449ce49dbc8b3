//! The global memory budget (`--max-memory`): what every connection holds in memory because
//! of its peer, summed, so that many peers cannot together pin more than the budget even when
//! each stays within its own limits.
//!
//! Three things a peer controls are counted: its outbound queue (frames waiting for it to
//! read, charged by [`Outbox`](crate::outbox::Outbox)); the bytes of a message it has started
//! but not finished sending (a frame header announcing 1 MiB and half the payload, or
//! fragments without the last one), charged by [`Counted`] as they are read from the socket
//! and released by the reader when the message completes; and what its reader's buffer keeps
//! after a big message ([`Memory::retain`]), until the connection closes.
//!
//! The message path only adds and subtracts atomics. When the sum goes over the budget, one
//! background task ([`sweep`]) looks for the biggest consumers and closes them until usage is
//! back under [`RELIEVED`] of the budget; pushes to a queue while far over the budget
//! ([`HARD_LIMIT`]) are refused, so the bound holds in the moments before the sweeper runs.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use dashmap::DashMap;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tracing::{info, warn};
use uuid::Uuid;

use crate::metrics::Metrics;
use crate::peer::{Close, Peer};
use crate::relay::Relay;
use crate::tls::MaybeTls;

/// The sweeper runs at most this often, however hard it is woken: a scan visits every
/// connection, so it must not run per message.
const SWEEP_PERIOD: Duration = Duration::from_millis(50);

/// How often what admins hold is measured again while it is not zero (see [`sweep`]).
const EXEMPT_REFRESH: Duration = Duration::from_secs(1);

/// The sweeper closes connections until usage is at most this share of the budget (in
/// tenths), leaving headroom so it does not run again at once.
const RELIEVED: usize = 9;

/// Over this share of the budget (in quarters), a push to a queue that already holds
/// something is refused, and the target closed as a slow consumer (never an admin's).
const HARD_LIMIT: usize = 5;

/// A message bigger than this leaves its size behind in the connection's read buffer, for
/// the connection's life: tungstenite reserves a whole frame in its buffer when the frame's
/// header arrives and never shrinks it (and offers no way to), so one valid 1 MiB message
/// from each of many connections would pin gigabytes nobody counts. Below this, what a
/// buffer keeps is small and part of what every connection costs anyway.
pub const RETAINED_FROM: usize = 8 * 1024;

/// Smallest and largest default budget, whatever the machine.
const MIN_DEFAULT: usize = 64 * 1024 * 1024;
const MAX_DEFAULT: usize = 2 * 1024 * 1024 * 1024;
/// The default when the machine's memory cannot be read.
const FALLBACK_DEFAULT: usize = 512 * 1024 * 1024;

/// The budget and what is charged against it; one per server, shared by every connection.
#[derive(Debug)]
pub struct Memory {
    /// Bytes that may be held in total; over it, the sweeper closes the biggest consumers.
    budget: usize,
    /// Bytes in every outbound queue. The metric itself is the counter: one atomic, read by
    /// `/metrics` as it is.
    outbound: Gauge,
    /// Bytes of inbound messages begun and not yet complete, over every connection.
    inbound: Gauge,
    /// Bytes read buffers keep after big messages (see [`RETAINED_FROM`]).
    retained: Gauge,
    /// Connections closed (or pushes refused) because of the budget.
    closes: Counter,
    /// Wakes the sweeper; set when usage goes over the budget.
    over: Notify,
    /// Every WebSocket connection, registered or not (unregistered ones hold queues and
    /// partial messages too), for the sweeper to scan. Touched on connect and disconnect
    /// only, never on the message path.
    peers: DashMap<Uuid, std::sync::Weak<Peer>>,
    /// What admins' queues held at the last sweep: exempt from the budget's pressure (see
    /// [`Memory::far_over`]).
    exempt: AtomicUsize,
}

impl Memory {
    pub fn new(budget: usize, metrics: &Metrics) -> Memory {
        metrics
            .memory_budget_bytes
            .set(i64::try_from(budget).unwrap_or(i64::MAX));
        Memory {
            budget,
            outbound: metrics.memory_outbound_bytes.clone(),
            inbound: metrics.memory_inbound_bytes.clone(),
            retained: metrics.memory_retained_bytes.clone(),
            closes: metrics.memory_pressure_closes.clone(),
            over: Notify::new(),
            peers: DashMap::new(),
            exempt: AtomicUsize::new(0),
        }
    }

    pub fn budget(&self) -> usize {
        self.budget
    }

    /// Bytes charged now: outbound queues, partial inbound messages and what read buffers
    /// keep after big messages.
    pub fn used(&self) -> usize {
        let outbound = usize::try_from(self.outbound.get()).unwrap_or(0);
        let inbound = usize::try_from(self.inbound.get()).unwrap_or(0);
        let retained = usize::try_from(self.retained.get()).unwrap_or(0);
        outbound + inbound + retained
    }

    /// Would `len` more bytes take usage far over the budget? Then a push is refused.
    /// Admins' queues are left out: they are never closed for the budget, so counting them
    /// would make clients pay for a backlog they did not cause.
    pub fn far_over(&self, len: usize) -> bool {
        let used = self
            .used()
            .saturating_sub(self.exempt.load(Ordering::Relaxed));
        used + len > self.budget / 4 * HARD_LIMIT
    }

    /// Counts one connection closed, or push refused, for the budget.
    pub fn refused(&self) {
        self.closes.inc();
    }

    pub fn charge_outbound(&self, len: usize) {
        self.outbound.inc_by(as_i64(len));
        self.wake_if_over();
    }

    pub fn release_outbound(&self, len: usize) {
        self.outbound.dec_by(as_i64(len));
    }

    /// `n` bytes read from `peer`'s socket that belong to a message not yet complete.
    fn charge_inbound(&self, peer: &Peer, n: usize) {
        peer.inbound.fetch_add(n, Ordering::Relaxed);
        self.inbound.inc_by(as_i64(n));
        self.wake_if_over();
    }

    /// `peer`'s reader got a whole data message (or a close frame) out of what was read:
    /// those bytes are no longer a partial message.
    pub fn message_complete(&self, peer: &Peer) {
        let n = peer.inbound.swap(0, Ordering::Relaxed);
        if n > 0 {
            self.inbound.dec_by(as_i64(n));
        }
    }

    /// `peer`'s reader got a whole data message of `len` bytes: its buffer keeps room for
    /// the biggest frame so far, which a single-frame message is (a fragmented one's frames
    /// are smaller, so this may overstate it, never understate it). Charged from
    /// [`RETAINED_FROM`] on, only by what the new biggest adds; given back when the
    /// connection's reader goes ([`Counted`]).
    pub fn retain(&self, peer: &Peer, len: usize) {
        if len <= RETAINED_FROM {
            return;
        }
        let before = peer.retained.fetch_max(len, Ordering::Relaxed);
        if len > before {
            self.retained.inc_by(as_i64(len - before));
            self.wake_if_over();
        }
    }

    /// `peer`'s reader and its buffers are gone: nothing is kept for its big messages.
    fn release_retained(&self, peer: &Peer) {
        let n = peer.retained.swap(0, Ordering::Relaxed);
        if n > 0 {
            self.retained.dec_by(as_i64(n));
        }
    }

    /// `peer`'s reader got a ping or pong with `payload` bytes. RFC 6455 lets one come
    /// between the fragments of a message, so only the control frame's own bytes are given
    /// back, never the unfinished message around it: a client's control frame is exactly a
    /// 2-byte header (its payload is at most 125 bytes), a 4-byte mask and the payload.
    pub fn control_frame(&self, peer: &Peer, payload: usize) {
        let frame = 2 + 4 + payload;
        let released = peer
            .inbound
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                Some(n.saturating_sub(frame))
            })
            .map_or(0, |n| n.min(frame));
        if released > 0 {
            self.inbound.dec_by(as_i64(released));
        }
    }

    /// Over the budget, admins' queues left out (they are never closed for it).
    fn over_budget(&self) -> bool {
        self.used()
            .saturating_sub(self.exempt.load(Ordering::Relaxed))
            > self.budget
    }

    fn wake_if_over(&self) {
        if self.over_budget() {
            self.over.notify_one();
        }
    }

    /// Closes the biggest consumers until usage is back under [`RELIEVED`] of the budget.
    /// Admins are never closed: their queues count, but the pressure is for the peers that
    /// cause it.
    ///
    /// A closed connection's queue is dropped here, so that memory is back at once (nothing
    /// would be written to it anyway); a partial message comes back when the connection's
    /// task drops the socket, so until then the connection is skipped and its bytes are
    /// counted as already on their way out. Usage is read again after each close: a queue's
    /// size overstates what closing it frees when it holds broadcast frames that other queues
    /// share ([`SharedFrame`](crate::outbox::SharedFrame), charged once), so the sweeper
    /// goes on until the budget itself says enough.
    fn relieve(&self, shared: &Relay) {
        let goal = self.budget / 10 * RELIEVED;
        // Bytes of connections already closing, given back when their tasks get to them.
        let mut leaving = 0;
        // Weak handles only, so no map shard stays locked while queues are inspected.
        let peers: Vec<_> = self.peers.iter().map(|e| e.value().clone()).collect();
        let mut consumers = Vec::new();
        // What admins hold: counted in `used`, but never relieved by closing anyone.
        let mut exempt = 0;
        for peer in peers.iter().filter_map(std::sync::Weak::upgrade) {
            let inbound = peer.inbound.load(Ordering::Relaxed);
            // What closing it gives back: a broadcast frame its queue shares with others is
            // charged once, by itself, so it is not counted here in full.
            let outbound = peer.outbox.charged();
            let retained = peer.retained.load(Ordering::Relaxed);
            if peer.is_closing() {
                // Already on its way out, for this reason or another: its memory comes back
                // when its task gets to it.
                leaving += inbound + outbound + retained;
                continue;
            }
            if peer.is_admin() {
                exempt += inbound + outbound + retained;
            } else if inbound + outbound + retained > 0 {
                consumers.push((outbound, inbound, retained, peer));
            }
        }
        self.exempt.store(exempt, Ordering::Relaxed);
        if !self.over_budget() {
            return;
        }
        consumers.sort_unstable_by_key(|(outbound, inbound, retained, _)| {
            std::cmp::Reverse(outbound + inbound + retained)
        });
        for (outbound, inbound, retained, peer) in consumers {
            if self.used().saturating_sub(leaving + exempt) <= goal {
                break;
            }
            // Named for what it holds most of.
            let close = if outbound >= inbound && outbound >= retained {
                Close::SLOW_CONSUMER
            } else if inbound >= retained {
                Close::MEMORY_INBOUND
            } else {
                Close::MEMORY_RETAINED
            };
            peer.close(close);
            shared
                .hub
                .pool
                .reforward(crate::outbox::items(peer.outbox.close()));
            self.closes.inc();
            // Its partial message, its read buffer and a frame its writer holds go when its
            // task ends.
            leaving += inbound + retained + peer.outbox.charged();
            info!(
                conn_id = %peer.target,
                outbound,
                inbound,
                retained,
                reason = close.reason,
                "closed: over the memory budget (--max-memory), biggest consumer"
            );
        }
    }

    fn register(&self, peer: &Arc<Peer>) {
        self.peers.insert(peer.id, Arc::downgrade(peer));
    }

    fn forget(&self, peer: &Peer) {
        self.peers.remove(&peer.id);
    }
}

fn as_i64(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// Closes the biggest consumers whenever usage goes over the budget, at most every
/// [`SWEEP_PERIOD`], until the server shuts down.
pub async fn sweep(shared: Arc<Relay>) {
    let memory = &shared.memory;
    loop {
        // What admins held at the last look is left out of the budget; once their backlog
        // drains that must not go on shielding clients, so it is looked at again now and then
        // for as long as it is not zero.
        let refresh = memory.exempt.load(Ordering::Relaxed) > 0;
        tokio::select! {
            _ = memory.over.notified() => {}
            _ = tokio::time::sleep(EXEMPT_REFRESH), if refresh => {}
            _ = shared.shutdown.cancelled() => return,
        }
        memory.relieve(&shared);
        tokio::time::sleep(SWEEP_PERIOD).await;
        // Closed connections give their partial messages back when their tasks get to it;
        // look again rather than wait for the next charge to wake us.
        if memory.over_budget() {
            memory.over.notify_one();
        }
    }
}

/// The default budget: a quarter of the memory this process may use (the cgroup v2 limit if
/// one is set, else the machine's), clamped to 64 MiB ..= 2 GiB.
pub fn default_budget() -> usize {
    let Some(total) = cgroup_limit().or_else(mem_total) else {
        warn!("cannot read the machine's memory; --max-memory defaults to 512 MiB");
        return FALLBACK_DEFAULT;
    };
    (total / 4).clamp(MIN_DEFAULT, MAX_DEFAULT)
}

/// `memory.max` of this process's cgroup (v2), unless it is `max` (no limit).
fn cgroup_limit() -> Option<usize> {
    let text = std::fs::read_to_string("/sys/fs/cgroup/memory.max").ok()?;
    text.trim().parse().ok()
}

/// `MemTotal` from `/proc/meminfo`, in bytes.
fn mem_total() -> Option<usize> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: usize = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// Parses a byte count: plain bytes, or with a binary suffix `K`, `M`, `G` (also `KiB`,
/// `MB`, ..., case-insensitive), e.g. `512M`, `2G`.
pub fn parse_bytes(text: &str) -> Result<usize, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, suffix) = text.split_at(split);
    let number: usize = digits
        .parse()
        .map_err(|_| format!("{text:?} is not a byte count (e.g. 268435456, 512M, 2G)"))?;
    let unit: usize = match suffix.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        _ => return Err(format!("{text:?}: unknown unit (use K, M or G)")),
    };
    number
        .checked_mul(unit)
        .ok_or_else(|| format!("{text:?} is too large"))
}

/// A connection's stream (TCP, or TLS over it: what is charged is the plaintext) that charges what it reads to the budget until the reader says
/// a message is complete ([`Memory::message_complete`]). While it lives the connection is in
/// the sweeper's registry; dropping it gives back whatever is still charged.
///
/// It dereferences to the `TcpStream` underneath, for socket options (linger) and to see a
/// hang-up (`peek`); reads go through it, never around it (under TLS they would be ciphertext).
#[derive(Debug)]
pub struct Counted {
    io: MaybeTls,
    peer: Arc<Peer>,
    memory: Arc<Memory>,
}

impl Counted {
    pub fn new(io: MaybeTls, peer: Arc<Peer>, memory: Arc<Memory>) -> Counted {
        memory.register(&peer);
        Counted { io, peer, memory }
    }

    pub fn get_ref(&self) -> &TcpStream {
        self.io.tcp()
    }

    pub fn get_mut(&mut self) -> &mut TcpStream {
        self.io.tcp_mut()
    }

    /// The reader's buffers were dropped (the socket only drains now): nothing of a partial
    /// message is held any more.
    pub fn buffers_dropped(&self) {
        self.memory.message_complete(&self.peer);
        self.memory.release_retained(&self.peer);
    }
}

impl std::ops::Deref for Counted {
    type Target = TcpStream;

    fn deref(&self) -> &TcpStream {
        self.io.tcp()
    }
}

impl std::ops::DerefMut for Counted {
    fn deref_mut(&mut self) -> &mut TcpStream {
        self.io.tcp_mut()
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.memory.message_complete(&self.peer);
        self.memory.release_retained(&self.peer);
        self.memory.forget(&self.peer);
        // Frames never written go with the socket (their payloads may be shared).
        self.peer.unwritten.clear();
    }
}

impl AsyncRead for Counted {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let poll = Pin::new(&mut this.io).poll_read(cx, buf);
        let read = buf.filled().len().saturating_sub(before);
        // Once closing, the rest is drained into a scratch buffer, not kept.
        if read > 0 && !this.peer.is_closing() {
            this.memory.charge_inbound(&this.peer, read);
        }
        poll
    }
}

// Writes go after the frames of the raw write path still held ([`crate::raw_write`]): a
// frame of tungstenite's (a pong, a close frame) waits until they are all written.
impl Counted {
    /// Writes the frames built by hand and not yet written (see `raw_write`): whatever goes
    /// to the socket after them (tungstenite's flush, shutdown, own frames) must wait, or it
    /// would land inside one of them.
    fn write_unwritten(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.peer
            .unwritten
            .poll_write_to(Pin::new(&mut self.io), cx)
    }
}

impl AsyncWrite for Counted {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.peer
            .unwritten
            .poll_write_after(Pin::new(&mut this.io), cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        std::task::ready!(this.write_unwritten(cx))?;
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        std::task::ready!(this.write_unwritten(cx))?;
        Pin::new(&mut this.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        std::task::ready!(this.write_unwritten(cx))?;
        Pin::new(&mut this.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::parse_bytes;

    #[test]
    fn byte_counts_with_and_without_units() {
        assert_eq!(parse_bytes("1048576"), Ok(1 << 20));
        assert_eq!(parse_bytes("512M"), Ok(512 << 20));
        assert_eq!(parse_bytes("2g"), Ok(2 << 30));
        assert_eq!(parse_bytes("64KiB"), Ok(64 << 10));
        assert!(parse_bytes("12X").is_err());
        assert!(parse_bytes("M").is_err());
        assert!(parse_bytes("99999999999999999999G").is_err());
    }
}
