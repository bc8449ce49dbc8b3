//! Channel history and recovery (SPEC §13), on one node: the last publications of the
//! channels `--history` names, each stamped with an `offset` (per channel, from 1) and the
//! channel's `epoch`, so a subscriber that comes back with `since:{offset,epoch}` gets what it
//! missed, in order, then the live ones.
//!
//! Costs: a channel no rule names is looked up against the rules (a few prefix compares, no
//! allocation) and is otherwise untouched; its frames stay byte for byte what they were.
//!
//! Bounds, whoever publishes or subscribes:
//! - per channel: at most its rule's count (≤ [`MAX_COUNT`]) and age (≤ [`MAX_AGE`]);
//! - per node: at most `--history-memory` bytes of kept frames in all ([`History::budget`]): a
//!   publication that does not fit pushes out its own channel's oldest ones (and, alone too
//!   big, is not kept), so the bound is strict; ages free idle channels' memory lazily (each
//!   publication also expires one other channel, round robin);
//! - at most [`MAX_CHANNELS`] channels with history: the one after evicts another (an empty
//!   one when it finds one nearby), whose subscribers then learn `recovered:false` (a channel
//!   recreated gets a new epoch).
//!
//! Ordering: a channel's lock ([`Stream`]) is held while a publication is stamped, kept and
//! queued to this node's subscribers, and while a subscriber joins, reads what it missed and
//! has it queued. So a publication is either in what a recovering subscriber reads or among
//! its live frames, never both nor neither, and every subscriber sees offsets in order. The
//! work under it is one publication's fan-out (queueing, never awaiting) or one replay, bounded
//! by the rule's count and the subscriber's queue.
//!
//! Lock order: the channel table ([`History`]'s map) is never held while a stream's lock is
//! taken or waited for; a stream's lock before any peer's `state` and any hub shard (see
//! [`crate::hub`]).

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use indexmap::IndexMap;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use tokio_tungstenite::tungstenite::Utf8Bytes;

use crate::hub::Filter;
use crate::peer::Peer;

/// Most publications one channel keeps.
pub const MAX_COUNT: usize = 10_000;
/// Longest a publication is kept.
pub const MAX_AGE: Duration = Duration::from_secs(24 * 3600);
/// Most channels with history on one node.
pub const MAX_CHANNELS: usize = 10_000;
/// Most rules in `--history`.
pub const MAX_RULES: usize = 64;
/// Default `--history-memory`.
pub const DEFAULT_BUDGET: usize = 64 * 1024 * 1024;
/// Longest `since.epoch` a client may send (ours are 8 + up to 16 hex digits).
pub const MAX_EPOCH_LEN: usize = 64;
/// Cluster: most publications of one channel held while an earlier one is missing.
pub const MAX_PENDING: usize = 1024;
/// How many channels, from the round-robin cursor, an eviction looks at for an empty one.
const EVICTION_LOOKAHEAD: usize = 16;

/// How long and how many publications a channel keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    pub count: usize,
    pub age: Duration,
}

/// One `<pattern>=<count>/<age>` of `--history`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// The name, or its prefix when the pattern ends with `*` (`*` alone: every channel).
    pattern: Box<str>,
    prefix: bool,
    pub keep: Retention,
}

impl Rule {
    fn matches(&self, channel: &str) -> bool {
        if self.prefix {
            channel.starts_with(&*self.pattern)
        } else {
            channel == &*self.pattern
        }
    }
}

/// Parses `--history`: `"orders.*=100/10m,chat:lobby=50/1h"`; ages in `s`, `m` or `h`. The
/// first rule that matches a channel applies.
pub fn parse_rules(text: &str) -> Result<Vec<Rule>, String> {
    let mut rules = Vec::new();
    for item in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        if rules.len() == MAX_RULES {
            return Err(format!("at most {MAX_RULES} rules"));
        }
        let (pattern, keep) = item
            .split_once('=')
            .ok_or_else(|| format!("{item:?}: expected <channel or prefix*>=<count>/<age>"))?;
        let (count, age) = keep
            .split_once('/')
            .ok_or_else(|| format!("{item:?}: expected <count>/<age>, e.g. 100/10m"))?;
        let (pattern, prefix) = match pattern.trim().strip_suffix('*') {
            Some(stem) => (stem, true),
            None => (pattern.trim(), false),
        };
        if (!prefix || !pattern.is_empty()) && crate::protocol::validate_channel(pattern).is_err() {
            return Err(format!(
                "{item:?}: the channel or prefix must be characters of A-Z a-z 0-9 . _ - : /"
            ));
        }
        let count: usize = count
            .trim()
            .parse()
            .ok()
            .filter(|n| (1..=MAX_COUNT).contains(n))
            .ok_or_else(|| format!("{item:?}: the count must be 1 to {MAX_COUNT}"))?;
        let age = parse_age(age.trim())
            .filter(|a| !a.is_zero() && *a <= MAX_AGE)
            .ok_or_else(|| format!("{item:?}: the age must be 1s to 24h, e.g. 90s, 10m, 2h"))?;
        rules.push(Rule {
            pattern: pattern.into(),
            prefix,
            keep: Retention { count, age },
        });
    }
    if rules.is_empty() {
        return Err("no rule: expected e.g. \"orders.*=100/10m\"".into());
    }
    Ok(rules)
}

fn parse_age(text: &str) -> Option<Duration> {
    let unit = match text.as_bytes().last()? {
        b's' => 1,
        b'm' => 60,
        b'h' => 3600,
        _ => return None,
    };
    let n: u64 = text[..text.len() - 1].parse().ok()?;
    n.checked_mul(unit).map(Duration::from_secs)
}

/// Where a subscriber says it stopped: the last offset it got, in which epoch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Since {
    pub offset: u64,
    pub epoch: String,
}

/// The history of this node's channels.
pub struct History {
    rules: Vec<Rule>,
    /// Random per start: part of every epoch, so history lost with a restart shows.
    node_epoch: String,
    table: Mutex<Table>,
    /// Bytes of frames kept, over every channel.
    bytes: AtomicUsize,
    /// `--history-memory`.
    budget: usize,
    metrics: HistoryMetrics,
    /// With `--redis-url`: Redis gives offsets and epochs (see [`Clustered`]).
    clustered: Option<Clustered>,
}

/// The gauges and counters `crate::metrics` exposes for history.
#[derive(Clone, Default)]
pub struct HistoryMetrics {
    pub bytes: Gauge,
    pub channels: Gauge,
    pub publications: Counter,
    pub evicted_channels: Counter,
    /// Cluster: publications Redis could not stamp (not delivered).
    pub lost: Counter,
}

struct Table {
    streams: IndexMap<Arc<str>, Arc<Stream>>,
    /// Channels created on this node since it started: with the node's epoch, the epoch of
    /// the next one (a channel evicted and created again has a new one).
    created: u64,
    /// Round robin over `streams` for lazy expiry and eviction.
    cursor: usize,
}

/// One channel's history; its lock orders the channel's publications and recoveries.
pub struct Stream {
    channel: Arc<str>,
    keep: Retention,
    kept: Mutex<Kept>,
}

pub struct Kept {
    /// The channel's epoch; in a cluster, Redis's (it changes when Redis lost the history).
    epoch: Arc<str>,
    /// The latest offset given (0: none yet).
    last: u64,
    /// Cluster: `last` is known (the first publication seen, or a read of Redis, set it).
    known: bool,
    /// Cluster: publications that arrived ahead of `last + 1` (from another node, before an
    /// earlier one), applied once the gap is filled; at most [`MAX_PENDING`].
    pending: BTreeMap<u64, Entry>,
    /// Cluster: a read of Redis to fill a gap is asked for or under way.
    filling: bool,
    entries: VecDeque<Entry>,
    /// Bytes of `entries`' frames.
    bytes: usize,
    /// Nothing before this offset can be recovered (entries dropped for room).
    floor: u64,
}

pub struct Entry {
    pub offset: u64,
    pub at: Instant,
    /// The stamped `publish` frame.
    pub frame: Utf8Bytes,
    pub filter: Filter,
}

/// What a `subscribe` on a history channel answers.
pub struct Joined {
    pub epoch: Arc<str>,
    /// The channel's latest offset.
    pub offset: u64,
    /// `None` without `since`.
    pub recovered: Option<bool>,
    /// What the subscriber missed, in order (only with `recovered: Some(true)`).
    pub missed: Vec<Utf8Bytes>,
}

impl History {
    pub fn new(rules: Vec<Rule>, budget: usize, metrics: HistoryMetrics) -> History {
        let mut seed = [0u8; 4];
        // A clock-derived epoch if the OS has no randomness for us: it still changes
        // between starts.
        let node_epoch = match getrandom::fill(&mut seed) {
            Ok(()) => hex::encode(seed),
            Err(_) => format!(
                "{:08x}",
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.subsec_nanos() ^ d.as_secs() as u32)
            ),
        };
        History {
            rules,
            node_epoch,
            table: Mutex::new(Table {
                streams: IndexMap::new(),
                created: 0,
                cursor: 0,
            }),
            bytes: AtomicUsize::new(0),
            budget,
            metrics,
            clustered: None,
        }
    }

    /// The retention for `channel`, if a rule names it (no allocation).
    pub fn retention(&self, channel: &str) -> Option<Retention> {
        self.rules
            .iter()
            .find(|r| r.matches(channel))
            .map(|r| r.keep)
    }

    /// The channel's history, created on first use; `None` when no rule names it.
    pub fn stream(&self, channel: &str) -> Option<Arc<Stream>> {
        let keep = self.retention(channel)?;
        let (stream, evicted) = {
            let mut table = lock(&self.table);
            if let Some(stream) = table.streams.get(channel) {
                return Some(Arc::clone(stream));
            }
            let evicted = (table.streams.len() >= MAX_CHANNELS)
                .then(|| self.evict_one(&mut table))
                .flatten();
            table.created += 1;
            let stream = Arc::new(Stream {
                channel: Arc::from(channel),
                keep,
                kept: Mutex::new(Kept {
                    epoch: format!("{}{:x}", self.node_epoch, table.created).into(),
                    known: false,
                    pending: BTreeMap::new(),
                    filling: false,
                    last: 0,
                    entries: VecDeque::new(),
                    bytes: 0,
                    floor: 1,
                }),
            });
            table
                .streams
                .insert(Arc::from(channel), Arc::clone(&stream));
            self.metrics.channels.set(table.streams.len() as i64);
            (stream, evicted)
        };
        if let Some(evicted) = evicted {
            // Its bytes leave the budget now (with the table's lock released: lock order);
            // a publication still racing on it is not kept.
            let mut kept = evicted.lock();
            let freed = kept.clear(u64::MAX);
            self.release(freed);
        }
        Some(stream)
    }

    /// Makes room for one more channel: an empty one among the next few from the cursor,
    /// else the one at the cursor. Its frames are freed when its last user lets go of it.
    fn evict_one(&self, table: &mut Table) -> Option<Arc<Stream>> {
        let len = table.streams.len();
        if len == 0 {
            return None;
        }
        let start = table.cursor % len;
        let victim = (0..EVICTION_LOOKAHEAD.min(len))
            .map(|i| (start + i) % len)
            .find(|&i| {
                table
                    .streams
                    .get_index(i)
                    .and_then(|(_, s)| s.kept.try_lock().ok().map(|k| k.entries.is_empty()))
                    .unwrap_or(false)
            })
            .unwrap_or(start);
        self.metrics.evicted_channels.inc();
        table.streams.swap_remove_index(victim).map(|(_, s)| s)
    }

    /// Expires the aged publications of one channel other than the one being published to,
    /// the next in round robin: idle channels give back their memory as publications go on.
    fn expire_next(&self, now: Instant) {
        let stream = {
            let mut table = lock(&self.table);
            let len = table.streams.len();
            if len == 0 {
                return;
            }
            table.cursor = (table.cursor + 1) % len;
            table
                .streams
                .get_index(table.cursor)
                .map(|(_, s)| Arc::clone(s))
        };
        if let Some(stream) = stream
            && let Ok(mut kept) = stream.kept.try_lock()
        {
            let freed = kept.expire(stream.keep, now);
            self.release(freed);
        }
    }

    fn release(&self, bytes: usize) {
        if bytes > 0 {
            self.bytes.fetch_sub(bytes, Ordering::Relaxed);
            self.metrics.bytes.dec_by(bytes as i64);
        }
    }

    fn charge(&self, bytes: usize) {
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
        self.metrics.bytes.inc_by(bytes as i64);
    }

    /// Bytes kept over every channel.
    pub fn bytes(&self) -> usize {
        self.bytes.load(Ordering::Relaxed)
    }

    /// `--history-memory`.
    pub fn budget(&self) -> usize {
        self.budget
    }

    /// Stamps a publication of `stream` (a `publish` frame made by `events::publish`), keeps
    /// it, and hands it to `deliver` (this node's subscribers), all under the channel's lock.
    /// Returns the stamped frame (for the other nodes) and what `deliver` returned.
    pub fn publish(
        &self,
        stream: &Stream,
        frame: &Utf8Bytes,
        filter: &Filter,
        deliver: impl FnOnce(&Utf8Bytes) -> usize,
    ) -> (Utf8Bytes, usize) {
        let now = Instant::now();
        let delivered;
        let stamped;
        {
            let mut kept = stream.lock();
            let offset = kept.last + 1;
            stamped = stamp(frame, offset, &kept.epoch);
            kept.last = offset;
            let size = stamped.len() + filter_size(filter);
            if kept.floor == u64::MAX {
                // Evicted while we waited for it: nothing more is kept on it.
            } else if size > self.budget {
                let freed = kept.clear(offset + 1);
                self.release(freed);
            } else {
                kept.entries.push_back(Entry {
                    offset,
                    at: now,
                    frame: stamped.clone(),
                    filter: filter.clone(),
                });
                kept.bytes += size;
                self.charge(size);
                let freed = kept.expire(stream.keep, now);
                self.release(freed);
                // Over the budget: this channel's oldest go first (the new one too, when
                // the others hold it all), so the bound holds.
                while self.bytes() > self.budget && !kept.entries.is_empty() {
                    let freed = kept.pop();
                    self.release(freed);
                }
            }
            delivered = deliver(&stamped);
        }
        self.metrics.publications.inc();
        self.expire_next(now);
        (stamped, delivered)
    }

    /// Subscribes `peer` (`join`, the hub's subscribe) and reads what it missed since
    /// `since`, under the channel's lock; `queue_room` bounds the replay's bytes (a replay
    /// that would not fit the subscriber's queue is `recovered:false`, not a closed
    /// connection). The caller queues the reply and `missed` before anything else can reach
    /// the subscriber: it does so through [`Stream::lock`]'s guard, returned here.
    pub fn join<'s>(
        &self,
        stream: &'s Stream,
        peer: &Peer,
        since: Option<&Since>,
        queue_room: usize,
        join: impl FnOnce() -> Result<(), crate::protocol::ProtocolError>,
    ) -> Result<(MutexGuard<'s, Kept>, Joined), crate::protocol::ProtocolError> {
        let mut kept = stream.lock();
        join()?;
        let freed = kept.expire(stream.keep, Instant::now());
        self.release(freed);
        let latest = kept.last;
        let mut missed = Vec::new();
        let recovered = since.map(|since| {
            // A subscriber at offset 0 has received nothing: whatever its epoch, it misses
            // nothing if everything from offset 1 is kept (this covers a cluster channel's
            // epoch `""`, before its first publication, and a restart before any).
            let recoverable = (*since.epoch == *kept.epoch || since.offset == 0)
                && since.offset <= latest
                && since.offset.saturating_add(1) >= kept.floor();
            if !recoverable {
                return false;
            }
            let start = kept
                .entries
                .partition_point(|entry| entry.offset <= since.offset);
            let mut bytes = 0usize;
            for entry in kept.entries.range(start..) {
                if !entry.filter.admits_peer(peer) {
                    continue;
                }
                bytes += entry.frame.len();
                if bytes > queue_room {
                    missed.clear();
                    return false;
                }
                missed.push(entry.frame.clone());
            }
            true
        });
        let joined = Joined {
            epoch: Arc::clone(&kept.epoch),
            offset: latest,
            recovered,
            missed,
        };
        Ok((kept, joined))
    }

    /// Cluster: applies publications Redis stamped (this node's own, other nodes' as they
    /// arrive, or a read of Redis) in offset order: each is delivered once to this node's
    /// subscribers (`deliver`, under the channel's lock as [`History::publish`] does) and
    /// kept. A duplicate is dropped; one ahead of a missing offset waits in
    /// [`Kept::pending`]. Another `epoch` than the channel's: Redis lost the history, what is
    /// kept here goes. `read`: these come from a read of Redis, with its latest offset
    /// (authoritative: an offset missing from it is gone, and a channel first seen here takes
    /// its position from it without delivering the past). Returns whether a gap remains
    /// (the caller reads Redis to fill it).
    pub fn advance(
        &self,
        stream: &Stream,
        epoch: &str,
        read: Option<u64>,
        mut entries: Vec<Entry>,
        deliver: impl Fn(&Utf8Bytes, &Filter) -> usize,
    ) -> bool {
        entries.sort_by_key(|e| e.offset);
        let now = Instant::now();
        let mut guard = stream.lock();
        // One borrow of the guarded value, so its fields borrow apart.
        let kept = &mut *guard;
        if *kept.epoch != *epoch {
            let freed = kept.clear(1);
            self.release(freed);
            kept.epoch = Arc::from(epoch);
            kept.pending.clear();
            kept.known = false;
            kept.last = 0;
        }
        if !kept.known {
            let baseline = match read {
                Some(latest) => latest,
                None => entries.first().map_or(0, |e| e.offset.saturating_sub(1)),
            };
            kept.last = baseline;
            kept.floor = baseline + 1;
            kept.known = true;
        }
        // The past (a read of Redis for a subscriber further behind than what is kept
        // here): in front of what is kept, if it joins up with it.
        let mut start = kept.entries.front().map_or(kept.last + 1, |e| e.offset);
        let split = entries.partition_point(|e| e.offset <= kept.last);
        let newer = entries.split_off(split);
        for entry in entries.into_iter().rev() {
            if entry.offset + 1 != start || kept.floor == u64::MAX {
                continue;
            }
            start = entry.offset;
            let size = entry.frame.len() + filter_size(&entry.filter);
            kept.entries.push_front(entry);
            kept.bytes += size;
            self.charge(size);
        }
        if kept.floor != u64::MAX {
            kept.floor = kept.floor.min(start);
        }
        for entry in newer {
            if kept.pending.len() < MAX_PENDING {
                kept.pending.insert(entry.offset, entry);
            }
        }
        if let Some(latest) = read {
            // What Redis no longer has is lost: go on from what it has.
            let first = kept.pending.keys().next().copied().unwrap_or(latest + 1);
            if first > kept.last + 1 {
                let freed = kept.clear(first);
                self.release(freed);
                kept.last = first - 1;
            }
        }
        loop {
            let next = kept.last + 1;
            let Some(entry) = kept.pending.remove(&next) else {
                break;
            };
            kept.last = entry.offset;
            deliver(&entry.frame, &entry.filter);
            let size = entry.frame.len() + filter_size(&entry.filter);
            if kept.floor == u64::MAX || size > self.budget {
                continue;
            }
            kept.entries.push_back(entry);
            kept.bytes += size;
            self.charge(size);
        }
        let last = kept.last;
        kept.pending.retain(|&offset, _| offset > last);
        let freed = kept.expire(stream.keep, now);
        self.release(freed);
        while self.bytes() > self.budget && !kept.entries.is_empty() {
            let freed = kept.pop();
            self.release(freed);
        }
        !kept.pending.is_empty()
    }

    /// Cluster: the offset to read Redis after to fill `stream`'s gap, or `None` when the
    /// gap closed meanwhile (and the fill is over).
    pub fn begin_fill(&self, stream: &Stream) -> Option<u64> {
        let mut kept = stream.lock();
        if kept.pending.is_empty() {
            kept.filling = false;
            return None;
        }
        Some(kept.last)
    }

    pub fn end_fill(&self, stream: &Stream) {
        stream.lock().filling = false;
    }

    /// The last `limit` publications of `channel` (admin read) whose frames fit in `room`
    /// bytes together: `(offset, frame)` pairs in order, the epoch and the latest offset.
    /// `None` when no rule names the channel.
    pub fn read(&self, channel: &str, limit: usize, room: usize) -> Option<Read> {
        let stream = self.stream(channel)?;
        let mut kept = stream.lock();
        let freed = kept.expire(stream.keep, Instant::now());
        self.release(freed);
        let mut bytes = 0usize;
        let mut entries: Vec<(u64, Utf8Bytes)> = kept
            .entries
            .iter()
            .rev()
            .take(limit)
            .take_while(|e| {
                bytes += e.frame.len();
                bytes <= room
            })
            .map(|e| (e.offset, e.frame.clone()))
            .collect();
        entries.reverse();
        Some(Read {
            publications: entries,
            epoch: Arc::clone(&kept.epoch),
            offset: kept.last,
        })
    }
}

/// An admin's read of a channel's history.
pub struct Read {
    pub publications: Vec<(u64, Utf8Bytes)>,
    pub epoch: Arc<str>,
    pub offset: u64,
}

impl Stream {
    /// The channel's name.
    pub fn channel(&self) -> &Arc<str> {
        &self.channel
    }

    /// What is kept here reaches back to `offset + 1` (a subscriber recovering from
    /// `offset` needs no read of Redis), in this epoch.
    pub fn covers(&self, epoch: &str, offset: u64) -> bool {
        let kept = self.lock();
        kept.known && *kept.epoch == *epoch && offset.saturating_add(1) >= kept.floor()
    }

    fn lock(&self) -> MutexGuard<'_, Kept> {
        lock(&self.kept)
    }
}

impl Kept {
    /// The first offset still recoverable.
    fn floor(&self) -> u64 {
        self.entries
            .front()
            .map_or(self.last + 1, |e| e.offset)
            .max(self.floor)
    }

    /// Drops what is over the channel's count or age; returns the bytes freed.
    fn expire(&mut self, keep: Retention, now: Instant) -> usize {
        let mut freed = 0;
        while let Some(entry) = self.entries.front() {
            let old = now.saturating_duration_since(entry.at) > keep.age;
            if !old && self.entries.len() <= keep.count {
                break;
            }
            freed += self.pop();
        }
        freed
    }

    /// Drops the oldest publication kept; returns its bytes.
    fn pop(&mut self) -> usize {
        let Some(entry) = self.entries.pop_front() else {
            return 0;
        };
        let size = entry.frame.len() + filter_size(&entry.filter);
        self.floor = entry.offset + 1;
        self.bytes -= size;
        size
    }

    /// Drops everything; nothing before `floor` can be recovered any more.
    fn clear(&mut self, floor: u64) -> usize {
        let freed = self.bytes;
        self.entries.clear();
        self.bytes = 0;
        self.floor = floor;
        freed
    }
}

/// `{"type":"publish","data":{…}}` with `"offset":N,"epoch":"E"` added at the end of `data`.
pub fn stamp(frame: &str, offset: u64, epoch: &str) -> Utf8Bytes {
    let Some(body) = frame.strip_suffix("}}") else {
        // Not a frame `events::publish` made; unreachable, and sent as it is.
        return Utf8Bytes::from(frame.to_string());
    };
    let mut out = String::with_capacity(frame.len() + epoch.len() + 40);
    out.push_str(body);
    out.push_str(",\"offset\":");
    out.push_str(&offset.to_string());
    out.push_str(",\"epoch\":\"");
    // Our epochs are hex digits: nothing to escape.
    out.push_str(epoch);
    out.push_str("\"}}");
    Utf8Bytes::from(out)
}

fn filter_size(filter: &Filter) -> usize {
    match filter {
        Filter::All => 0,
        Filter::Roles(n) | Filter::Groups(n) | Filter::Users(n) | Filter::Clients(n) => {
            n.iter().map(|s| s.len() + 24).sum()
        }
    }
}

/// A poisoned lock means a panic elsewhere mid-update; the data is still consistent enough
/// for history (counts and bytes), and the relay keeps going.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

// ------------------------------------------------------------------- in a cluster (Redis)

/// A publication waiting for Redis to stamp it: channel, retention, unstamped frame, filter.
type Job = (Arc<str>, Retention, Utf8Bytes, Filter);

/// Most publications waiting for Redis on one node; beyond, `publish` is refused
/// (`rate_limited`) until Redis catches up.
pub const MAX_WAITING: usize = 4096;
/// Most publications stamped in one round trip.
const BATCH: usize = 256;
/// How long a gap waits for the publication that fills it before Redis is read.
const GAP_WAIT: Duration = Duration::from_millis(50);
/// How long a subscriber waits for this node to receive its channel before the catch-up
/// read (see [`join_cluster`]).
const SUBSCRIBED_WAIT: Duration = Duration::from_secs(2);

/// With `--redis-url`: offsets and epochs come from Redis, once, cluster-wide; what each node
/// keeps is a cache of Redis that also puts publications in offset order.
pub struct Clustered {
    store: crate::cluster::history::Store,
    jobs: tokio::sync::mpsc::Sender<Job>,
    fills: tokio::sync::mpsc::UnboundedSender<Arc<Stream>>,
    /// Taken by the worker when the relay starts.
    receivers: Mutex<Option<Receivers>>,
}

type Receivers = (
    tokio::sync::mpsc::Receiver<Job>,
    tokio::sync::mpsc::UnboundedReceiver<Arc<Stream>>,
);

impl Clustered {
    pub fn new(url: &str) -> redis::RedisResult<Clustered> {
        let (jobs, job_rx) = tokio::sync::mpsc::channel(MAX_WAITING);
        let (fills, fill_rx) = tokio::sync::mpsc::unbounded_channel();
        Ok(Clustered {
            store: crate::cluster::history::Store::new(url)?,
            jobs,
            fills,
            receivers: Mutex::new(Some((job_rx, fill_rx))),
        })
    }
}

impl History {
    /// History in Redis (`--redis-url`).
    pub fn with_redis(mut self, clustered: Clustered) -> History {
        self.clustered = Some(clustered);
        self
    }

    /// Whether offsets come from Redis.
    pub fn clustered(&self) -> Option<&Clustered> {
        self.clustered.as_ref()
    }

    /// Queues a publication for Redis to stamp (see [`start`]). Refused when too many wait.
    pub fn submit(
        &self,
        channel: Arc<str>,
        keep: Retention,
        frame: Utf8Bytes,
        filter: Filter,
    ) -> Result<(), crate::protocol::ProtocolError> {
        let Some(clustered) = &self.clustered else {
            return Ok(());
        };
        clustered
            .jobs
            .try_send((channel, keep, frame, filter))
            .map_err(|_| {
                crate::protocol::ProtocolError::ClusterBusy(
                    "too many publications wait for Redis to stamp them; retry",
                )
            })
    }

    /// Asks for a read of Redis to fill `stream`'s gap: one at a time per channel, however
    /// many publications arrive behind the gap.
    fn request_fill(&self, stream: Arc<Stream>) {
        let Some(clustered) = &self.clustered else {
            return;
        };
        {
            let mut kept = stream.lock();
            if kept.filling {
                return;
            }
            kept.filling = true;
        }
        let _ = clustered.fills.send(stream);
    }
}

/// Starts the worker that has Redis stamp this node's publications (a batch per round trip,
/// in the order they were published) and delivers them, and that fills gaps. Nothing on a
/// single node.
pub fn start(relay: &Arc<crate::relay::Relay>) {
    let Some(clustered) = relay.history.as_ref().and_then(History::clustered) else {
        return;
    };
    let Some((mut jobs, mut fills)) = lock(&clustered.receivers).take() else {
        return;
    };
    let relay = Arc::clone(relay);
    tokio::spawn(async move {
        loop {
            tokio::select! {
                job = jobs.recv() => {
                    let Some(job) = job else { break };
                    let mut batch = vec![job];
                    while batch.len() < BATCH {
                        match jobs.try_recv() {
                            Ok(job) => batch.push(job),
                            Err(_) => break,
                        }
                    }
                    stamp_batch(&relay, batch).await;
                }
                Some(stream) = fills.recv() => {
                    let relay = Arc::clone(&relay);
                    tokio::spawn(async move { fill(&relay, stream).await });
                }
            }
        }
    });
}

async fn stamp_batch(relay: &Arc<crate::relay::Relay>, batch: Vec<Job>) {
    let Some(history) = relay.history.as_ref() else {
        return;
    };
    let Some(clustered) = history.clustered() else {
        return;
    };
    let proposed = format!("{}{:x}", history.node_epoch, rand_u32());
    let stamped = match clustered.store.publish(&batch, &proposed).await {
        Ok(stamped) => stamped,
        Err(error) => {
            crate::warn_throttled!(
                %error,
                lost = batch.len(),
                "history: Redis did not stamp publications; they are not delivered"
            );
            history.metrics.lost.inc_by(batch.len() as u64);
            return;
        }
    };
    for ((channel, _, frame, filter), (offset, epoch)) in batch.into_iter().zip(stamped) {
        let frame = stamp(&frame, offset, &epoch);
        history.metrics.publications.inc();
        arrived_stamped(relay, &channel, &filter, &frame, offset, &epoch);
        let delivery = crate::delivery::Delivery::Channel {
            channel: Arc::clone(&channel),
            filter,
            frame: crate::delivery::Text(frame),
        };
        let route = crate::delivery::Route::Channel(channel);
        let _ = relay
            .backplane
            .publish(relay, route, delivery, crate::delivery::Sender::Admin);
    }
}

/// A publication Redis stamped reached this node (from this node's worker or another node):
/// delivered here in offset order. Returns how many connections got something now.
pub fn arrived(
    relay: &crate::relay::Relay,
    channel: &Arc<str>,
    filter: &Filter,
    frame: &Utf8Bytes,
) -> usize {
    match parse_stamp(frame) {
        Some((offset, epoch)) => arrived_stamped(relay, channel, filter, frame, offset, epoch),
        // Not stamped: published before the node that sent it had history.
        None => relay.publish_here(channel, filter, frame),
    }
}

fn arrived_stamped(
    relay: &crate::relay::Relay,
    channel: &Arc<str>,
    filter: &Filter,
    frame: &Utf8Bytes,
    offset: u64,
    epoch: &str,
) -> usize {
    let Some(history) = relay.history.as_ref() else {
        return 0;
    };
    let Some(stream) = history.stream(channel) else {
        return relay.publish_here(channel, filter, frame);
    };
    let entry = Entry {
        offset,
        at: Instant::now(),
        frame: frame.clone(),
        filter: filter.clone(),
    };
    let delivered = AtomicUsize::new(0);
    let gap = history.advance(&stream, epoch, None, vec![entry], |frame, filter| {
        let n = relay.publish_here(channel, filter, frame);
        delivered.fetch_add(n, Ordering::Relaxed);
        n
    });
    if gap {
        history.request_fill(stream);
    }
    delivered.into_inner()
}

/// Fills a gap: waits a little for the missing publication to arrive on its own, then
/// reads what Redis has after the last one delivered here.
async fn fill(relay: &Arc<crate::relay::Relay>, stream: Arc<Stream>) {
    let Some(history) = relay.history.as_ref() else {
        return;
    };
    tokio::time::sleep(GAP_WAIT).await;
    let Some(after) = history.begin_fill(&stream) else {
        return;
    };
    let gap = sync(relay, &stream, after).await.unwrap_or(true);
    history.end_fill(&stream);
    if gap {
        // Still missing (or Redis unreachable): again, after another wait.
        history.request_fill(stream);
    }
}

/// Reads Redis after `after` and applies it here (see [`History::advance`]). Returns whether
/// a gap remains.
pub async fn sync(
    relay: &crate::relay::Relay,
    stream: &Stream,
    after: u64,
) -> Result<bool, crate::protocol::ProtocolError> {
    let Some(history) = relay.history.as_ref() else {
        return Ok(false);
    };
    let Some(clustered) = history.clustered() else {
        return Ok(false);
    };
    let read = clustered
        .store
        .read(stream.channel(), after, stream.keep.count, stream.keep)
        .await
        .map_err(|error| {
            crate::warn_throttled!(%error, "history: cannot read Redis");
            crate::protocol::ProtocolError::ClusterBusy("channel history is unavailable; retry")
        })?;
    let channel = stream.channel();
    Ok(history.advance(
        stream,
        &read.epoch,
        Some(read.latest),
        read.entries,
        |frame, filter| relay.publish_here(channel, filter, frame),
    ))
}

/// Before a subscriber joins a channel with history in a cluster: brings what this node
/// keeps up to Redis (this node may not have been receiving the channel) and back to `since`
/// if it does not reach that far.
pub async fn prepare_join(
    relay: &crate::relay::Relay,
    stream: &Stream,
    since: Option<&Since>,
) -> Result<(), crate::protocol::ProtocolError> {
    let last = {
        let kept = stream.lock();
        kept.known.then_some(kept.last)
    };
    let read_after = match (since, last) {
        // Kept here from `since`: only what came after the last one delivered here.
        (Some(since), Some(last)) if stream.covers(&since.epoch, since.offset) => last,
        // Never read past what was delivered here: what Redis returns after it is what
        // this node's subscribers get next, in order.
        (Some(since), Some(last)) => since.offset.min(last),
        (Some(since), None) => since.offset,
        (None, Some(last)) => last,
        // Only the position.
        (None, None) => u64::MAX,
    };
    sync(relay, stream, read_after).await.map(|_| ())
}

/// After a subscriber joined a channel with history in a cluster: once this node receives
/// the channel's publications, reads what Redis has beyond what was delivered here, so a
/// publication made while this node was not yet listening is not missed.
pub async fn join_cluster(relay: &crate::relay::Relay, stream: &Stream) {
    let topic =
        crate::backplane::Topic::Channels(crate::backplane::channel_bucket(stream.channel()));
    relay.subscribed(&[topic], SUBSCRIBED_WAIT).await;
    let last = stream.lock().last;
    let _ = sync(relay, stream, last).await;
}

/// The offset and epoch [`stamp`] added to a frame.
fn parse_stamp(frame: &str) -> Option<(u64, &str)> {
    let at = frame.rfind(",\"offset\":")?;
    let rest = &frame[at + ",\"offset\":".len()..];
    let (offset, rest) = rest.split_once(",\"epoch\":\"")?;
    let epoch = rest.strip_suffix("\"}}")?;
    Some((offset.parse().ok()?, epoch))
}

fn rand_u32() -> u32 {
    let mut bytes = [0u8; 4];
    let _ = getrandom::fill(&mut bytes);
    u32::from_ne_bytes(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_parse_and_reject() {
        let rules = parse_rules("orders.*=100/10m, chat:lobby=5/30s,*=1/1h").unwrap();
        assert_eq!(rules.len(), 3);
        assert!(rules[0].matches("orders.7"));
        assert!(!rules[0].matches("order"));
        assert!(rules[1].matches("chat:lobby") && !rules[1].matches("chat:lobby2"));
        assert!(rules[2].matches("anything"));
        assert_eq!(
            rules[0].keep,
            Retention {
                count: 100,
                age: Duration::from_secs(600)
            }
        );
        for bad in [
            "",
            "orders.*",
            "orders.*=100",
            "orders.*=0/10m",
            "orders.*=10001/10m",
            "orders.*=10/0s",
            "orders.*=10/25h",
            "orders.*=10/10d",
            "or ders*=10/10m",
            "orders.*=x/10m",
        ] {
            assert!(parse_rules(bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn a_stamp_reads_back() {
        let frame = stamp(
            r#"{"type":"publish","data":{"name":"a","data":"x"}}"#,
            12,
            "e9",
        );
        assert_eq!(parse_stamp(&frame), Some((12, "e9")));
        assert_eq!(
            parse_stamp(r#"{"type":"publish","data":{"name":"a","data":1}}"#),
            None
        );
    }

    #[test]
    fn stamp_adds_offset_and_epoch() {
        let frame = r#"{"type":"publish","data":{"name":"a","data":{"x":1}}}"#;
        assert_eq!(
            stamp(frame, 7, "ab1"),
            r#"{"type":"publish","data":{"name":"a","data":{"x":1},"offset":7,"epoch":"ab1"}}"#
        );
    }
}
