//! Admin authentication: the `SOCKET_AUTH` bcrypt hash, and verification of the password a
//! connection presents.
//!
//! bcrypt costs ~0.1–0.3 s of CPU by design, so it never runs on the async runtime, and who
//! gets it decides whether a flood of wrong passwords can lock the real backend out. The
//! rules, cheapest first:
//!
//! 1. bcrypt keys on the first 72 bytes of a password (and a NUL terminator), so those bytes
//!    ([`bcrypt_key`]) decide the verdict and everything here works on them. A password with
//!    a NUL byte is refused outright, as the original (Python bcrypt) refuses it.
//! 2. One hash admits one such key. Once a password verified, its key is kept as an HMAC
//!    under a key made at start (never in plain text), and every password is judged by
//!    comparing digests, without bcrypt: Jaseci's frequent reconnects pay nothing, and after
//!    the backend's first login a flood of wrong passwords costs nothing and cannot delay it.
//! 3. Before that, requests for the same password share one bcrypt run: a host whose
//!    workers all reconnect at once pays one run, and they all get its verdict.
//! 4. Distinct passwords wait in a fair queue served by a few blocking workers (half the
//!    cores): the address with the fewest recent failures goes first, equals take turns. A
//!    failing address only loses priority; nothing is refused for its failures, so a right
//!    password is never refused because others behind the same address failed. A waiting
//!    verification whose requesters all left (connections closed, HTTP requests dropped) is
//!    skipped, never run. The queue is bounded per address and in total; past the bound the
//!    request is refused as [`Verdict::Busy`] ("busy, retry"), never as a wrong password.
//!    Within an address's full share, a password asked for more often (a backend retrying
//!    after "busy") takes the place of one asked for less (see [`Queue::request`]), so an
//!    attacker behind the backend's own NAT cannot keep it out with a few wrong passwords.
//!
//! The bounds also bound what waiting requesters hold elsewhere: an upgrade whose `auth`
//! header waits here holds a `--max-connections` slot, so at most [`MAX_QUEUED`] slots can
//! be pinned this way (and the server lets one address hold only a few of the places kept
//! for admins above `--max-connections`).

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use tokio::sync::oneshot;

use crate::metrics::AuthMetrics;

/// The original relay's default `SOCKET_AUTH`: hex of a bcrypt hash of `12345678`.
pub const DEFAULT_AUTH_HEX: &str = "24326224313224682e6b576f5762714d43745633516c554e5573645265764142693753473043784b574b355a733033757159323834796c3757425a71";

/// Distinct passwords one address may have waiting for bcrypt (not counting the ones
/// running). A backend sends one password; more from one address is a flood.
pub const MAX_QUEUED_PER_ADDRESS: usize = 8;
/// Requesters one password may have waiting for its verdict: the workers of one backend
/// host reconnecting at once all wait for the same run. Bounded per password, not per
/// address, so cheap joiners of one password cannot fill an address's share and get
/// another password (the backend's, behind the same NAT) refused.
pub const MAX_WAITING_PER_PASSWORD: usize = 64;
/// Requesters waiting for a verdict in total.
pub const MAX_QUEUED: usize = 1024;
/// Failures are counted per address over windows of this length; a new window starts at 0.
const FAILURE_WINDOW: Duration = Duration::from_secs(60);
/// Addresses whose failures are tracked at once; beyond it new addresses count as fresh
/// until old windows expire (the table must not grow with an attacker's address space).
const MAX_TRACKED: usize = 100_000;
/// bcrypt uses this many bytes of a password and ignores the rest.
const BCRYPT_MAX_BYTES: usize = 72;
/// Counters of how often passwords were asked for ([`Queue::asks`]), indexed by digest.
const ASK_COUNTERS: usize = 4096;
/// The ask counters are halved this often, so old asks (an attacker pumping a password
/// ahead of time) fade.
const ASK_DECAY: Duration = Duration::from_secs(30);

/// bcrypt workers: half the cores (at least one), so a flood of wrong passwords leaves the
/// other half to the relay itself.
fn workers() -> usize {
    std::thread::available_parallelism().map_or(1, |n| (n.get() / 2).max(1))
}

/// A validated bcrypt hash in its `$2b$…` text form.
#[derive(Clone, PartialEq, Eq)]
pub struct PasswordHash(String);

impl std::fmt::Debug for PasswordHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PasswordHash(..)")
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("is set but empty; unset it for the default or set a hash made by `jssocket hash`")]
    Empty,
    #[error(
        "is neither a hex-encoded nor a raw bcrypt hash ($2a$/$2b$/$2y$…); make one with `jssocket hash`"
    )]
    NotBcrypt,
    /// Jaseci's own `SOCKET_AUTH` is the plain password it sends; sharing that variable with
    /// the relay is the usual way to get here, so the message says how to make the hash.
    #[error(
        "looks like a plain password, not a hash: the relay holds the bcrypt hash of the \
         password that backends send. Make it with `printf '%s' '<password>' | jssocket hash` \
         and give the relay that output (Jaseci keeps its own SOCKET_AUTH as the plain password)"
    )]
    PlainPassword,
}

impl PasswordHash {
    /// Accepts hex of a bcrypt hash (as the original relay and `jssocket hash` produce) or the
    /// raw `$2a$`/`$2b$`/`$2y$` text.
    pub fn parse(text: &str) -> Result<PasswordHash, AuthError> {
        let text = text.trim();
        if text.is_empty() {
            return Err(AuthError::Empty);
        }
        let raw = if text.starts_with('$') {
            text.to_string()
        } else {
            // Hex of a bcrypt hash starts with hex("$2"); anything else was never a hash.
            if !text.to_ascii_lowercase().starts_with("2432") {
                return Err(AuthError::PlainPassword);
            }
            let bytes = hex::decode(text).map_err(|_| AuthError::NotBcrypt)?;
            String::from_utf8(bytes).map_err(|_| AuthError::NotBcrypt)?
        };
        if !looks_like_bcrypt(&raw) {
            return Err(AuthError::NotBcrypt);
        }
        Ok(PasswordHash(raw))
    }

    pub fn default_hash() -> PasswordHash {
        match PasswordHash::parse(DEFAULT_AUTH_HEX) {
            Ok(hash) => hash,
            Err(e) => unreachable!("built-in default hash is invalid: {e}"),
        }
    }

    /// Runs bcrypt: slow and blocking, call it off the runtime.
    fn verify_blocking(&self, password: impl AsRef<[u8]>) -> bool {
        bcrypt::verify(password, &self.0).unwrap_or(false)
    }
}

/// `$2b$12$` + 53 characters of bcrypt's base64.
fn looks_like_bcrypt(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 60
        && (s.starts_with("$2a$") || s.starts_with("$2b$") || s.starts_with("$2y$"))
        && b[4].is_ascii_digit()
        && b[5].is_ascii_digit()
        && b[6] == b'$'
        && b[7..]
            .iter()
            .all(|c| c.is_ascii_alphanumeric() || *c == b'.' || *c == b'/')
}

/// Makes a new hex-encoded hash for `SOCKET_AUTH` (`jssocket hash`).
pub fn hash_password(password: &str) -> Result<String, bcrypt::BcryptError> {
    Ok(hex::encode(bcrypt::hash(password, bcrypt::DEFAULT_COST)?))
}

/// What bcrypt sees of `password`: its first 72 bytes. Two passwords with the same key are
/// the same to any bcrypt hash, two with different keys are not (the key and its NUL
/// terminator fill bcrypt's key schedule). `None` for a password with a NUL byte, which is
/// refused without bcrypt.
fn bcrypt_key(password: &str) -> Option<&[u8]> {
    let bytes = password.as_bytes();
    if bytes.contains(&0) {
        return None;
    }
    Some(&bytes[..bytes.len().min(BCRYPT_MAX_BYTES)])
}

/// `digest`'s counter in [`Queue::asks`]. The digest is a keyed HMAC: an outsider cannot
/// aim two passwords at one counter.
fn ask_index(digest: &Digest) -> usize {
    usize::from(u16::from_be_bytes([digest[0], digest[1]])) % ASK_COUNTERS
}

/// The unit of fairness: an IPv4 address, or an IPv6 /64 (what one host or one customer of
/// a provider usually gets, so rotating addresses inside it earns no extra turns).
fn bucket(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let prefix = u128::from(v6) & !((1u128 << 64) - 1);
                IpAddr::V6(prefix.into())
            }
        },
    }
}

/// What a verification concluded, for logs, metrics and the answer to the peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Admin,
    WrongPassword,
    /// Too many verifications are waiting (from this address, or in total); nothing was
    /// decided about the password. The peer should retry shortly.
    Busy,
}

/// Verifies admin passwords for every connection; one per server, shared.
pub struct Authenticator {
    inner: Arc<Inner>,
}

/// HMAC-SHA256 of a [`bcrypt_key`] under [`Inner::key`].
type Digest = [u8; 32];

/// What the async side and the blocking workers share.
struct Inner {
    hash: PasswordHash,
    /// HMAC key made at start; the digests are useless outside this process.
    key: [u8; 32],
    /// False when the OS gave no randomness for `key`: the digests would then be a plain
    /// hash of the password, so the verified one is not kept (only speed is lost).
    keyed: bool,
    /// The digest of the password that verified: every other one is then wrong without
    /// asking bcrypt. Exactly one, never evicted.
    known: OnceLock<Digest>,
    /// Waiting verifications and per-address failures. Held only for short steps, never
    /// across bcrypt.
    queue: Mutex<Queue>,
    workers: usize,
    metrics: AuthMetrics,
}

/// One bcrypt run waiting for a worker. Who waits for its verdict is in
/// [`Queue::pending`] under its digest.
struct Job {
    /// The [`bcrypt_key`] (at most 72 bytes).
    password: Vec<u8>,
    digest: Digest,
}

/// The requesters of one password, waiting or running. Requesters that left are dropped
/// lazily: whenever the list has doubled since it was last cleaned.
#[derive(Default)]
struct Pending {
    replies: Vec<oneshot::Sender<Verdict>>,
    cleaned_at: usize,
}

impl Pending {
    fn add(&mut self, reply: oneshot::Sender<Verdict>) {
        if self.replies.len() >= 2 * self.cleaned_at.max(8) {
            self.replies.retain(|r| !r.is_closed());
            self.cleaned_at = self.replies.len();
        }
        self.replies.push(reply);
    }

    fn anyone_waits(&self) -> bool {
        self.replies.iter().any(|r| !r.is_closed())
    }

    /// Whether another requester may join: [`MAX_WAITING_PER_PASSWORD`] still waiting.
    fn has_room(&mut self) -> bool {
        if self.replies.len() >= MAX_WAITING_PER_PASSWORD {
            self.replies.retain(|r| !r.is_closed());
            self.cleaned_at = self.replies.len();
        }
        self.replies.len() < MAX_WAITING_PER_PASSWORD
    }
}

/// The fair queue. Addresses with waiting jobs sit in `order` under the key
/// `(recent failures, turn)`: the first is served next, and an address that still has jobs
/// after its turn goes back with a new, later turn (round robin among equals). Picking,
/// adding and re-ranking are O(log n), whatever the queue holds.
#[derive(Default)]
struct Queue {
    waiting: HashMap<IpAddr, Waiting>,
    order: BTreeSet<(u32, u64, IpAddr)>,
    next_turn: u64,
    /// Jobs in `waiting`, abandoned ones included until they are skipped.
    jobs: usize,
    /// Who waits for each password being verified (waiting or running), by digest: a
    /// request for a password already here joins it instead of running bcrypt again.
    pending: HashMap<Digest, Pending>,
    /// Requesters waiting for a verdict ([`Ticket`]s alive).
    total: usize,
    /// How often each password was asked for lately, by digest (a count-min style table:
    /// passwords sharing a counter add up, which only ever overstates). Decides which of an
    /// address's waiting jobs gives way to a newcomer; see [`Queue::request`].
    asks: Vec<u32>,
    /// When `asks` was last halved.
    asks_decayed: Option<Instant>,
    /// Workers running (each on a blocking thread while there are jobs).
    running: usize,
    /// Failures per address in its current window: (count, window start).
    failures: HashMap<IpAddr, (u32, Instant)>,
    /// Window starts in time order, to forget expired entries in O(1) amortised.
    expiry: VecDeque<(Instant, IpAddr)>,
}

struct Waiting {
    jobs: VecDeque<Job>,
    /// This address's key in `Queue::order`.
    rank: (u32, u64),
}

impl Queue {
    fn failures_of(&self, ip: IpAddr) -> u32 {
        match self.failures.get(&ip) {
            Some((count, since)) if since.elapsed() < FAILURE_WINDOW => *count,
            _ => 0,
        }
    }

    /// Registers a requester at `ip` for the password `password` (its bcrypt key) and
    /// returns where its verdict will arrive, or `None` when the queue is full for it. A
    /// password already pending is joined (up to [`MAX_WAITING_PER_PASSWORD`]); a new one
    /// becomes a job. When the total is reached, the newest job of the worst-ranked address
    /// makes room for an address that failed less; its requesters are answered
    /// [`Verdict::Busy`]. The caller holds a [`Ticket`] for the requester from then on.
    ///
    /// When the address's own share ([`MAX_QUEUED_PER_ADDRESS`]) is full, a newcomer asked
    /// for more often than one of the waiting passwords takes its place (the least asked,
    /// newest first; its requesters are answered busy); otherwise the newcomer is refused
    /// busy. This is for an address shared by the backend and an attacker (a NAT, a proxy):
    /// refusing every newcomer would let the attacker keep the share full with a few wrong
    /// passwords and the backend refused for ever. A backend retries its one password after
    /// "busy", so its count grows with every try, while an attacker's fresh passwords are
    /// asked for once each: after a few tries the backend's job no longer gives way, and it
    /// runs within [`MAX_QUEUED_PER_ADDRESS`] turns of its address.
    ///
    /// Residual risk: nothing tells two requesters behind one address apart but what they
    /// send. An attacker there who asks for each of its wrong passwords more often than the
    /// backend retries (sustaining, per bcrypt run of its address, as many requests as the
    /// backend has made in the last [`ASK_DECAY`] or so) keeps the backend waiting; it pays
    /// for that with a request rate that grows with the backend's patience, and once the
    /// backend is in, every password is judged without bcrypt.
    fn request(
        &mut self,
        ip: IpAddr,
        digest: Digest,
        password: &[u8],
    ) -> Option<oneshot::Receiver<Verdict>> {
        let asks = self.ask(&digest);
        if let Some(pending) = self.pending.get_mut(&digest) {
            if !pending.has_room() {
                return None;
            }
        } else if self.jobs_of(ip) >= MAX_QUEUED_PER_ADDRESS {
            // At most MAX_QUEUED_PER_ADDRESS to look at: jobs nobody waits for free their place.
            self.drop_abandoned(ip);
            if self.jobs_of(ip) >= MAX_QUEUED_PER_ADDRESS && !self.evict_less_asked(ip, asks) {
                return None;
            }
        }
        if self.total >= MAX_QUEUED && !self.evict_for(ip) {
            return None;
        }
        // The evicted job may have been this very password's (another address's).
        let joins = self.pending.contains_key(&digest);
        if !joins && self.jobs_of(ip) >= MAX_QUEUED_PER_ADDRESS {
            return None;
        }
        let (reply, answer) = oneshot::channel();
        self.pending.entry(digest).or_default().add(reply);
        if !joins {
            self.push_job(
                ip,
                Job {
                    password: password.to_vec(),
                    digest,
                },
            );
        }
        self.total += 1;
        Some(answer)
    }

    /// A requester stopped waiting (answered, or gone).
    fn release(&mut self) {
        self.total = self.total.saturating_sub(1);
    }

    /// Counts one more ask for `digest` and returns its count. O(1) amortised: the table
    /// is halved once per [`ASK_DECAY`].
    fn ask(&mut self, digest: &Digest) -> u32 {
        let now = Instant::now();
        if self.asks.is_empty() {
            self.asks = vec![0; ASK_COUNTERS];
            self.asks_decayed = Some(now);
        }
        if self
            .asks_decayed
            .is_none_or(|at| now.duration_since(at) >= ASK_DECAY)
        {
            self.asks.iter_mut().for_each(|count| *count /= 2);
            self.asks_decayed = Some(now);
        }
        let slot = &mut self.asks[ask_index(digest)];
        *slot = slot.saturating_add(1);
        *slot
    }

    fn asked(&self, digest: &Digest) -> u32 {
        self.asks.get(ask_index(digest)).copied().unwrap_or(0)
    }

    /// Refuses (busy) the least asked waiting job of `ip`, the newest among equals, if it
    /// was asked for less than `asks`; false when every waiting job was asked for as often
    /// or more. At most [`MAX_QUEUED_PER_ADDRESS`] jobs to look at.
    fn evict_less_asked(&mut self, ip: IpAddr, asks: u32) -> bool {
        let Some(waiting) = self.waiting.get(&ip) else {
            return false;
        };
        let mut least: Option<(usize, u32)> = None;
        for (i, job) in waiting.jobs.iter().enumerate().rev() {
            let count = self.asked(&job.digest);
            if least.is_none_or(|(_, fewest)| count < fewest) {
                least = Some((i, count));
            }
        }
        let Some((i, _)) = least.filter(|&(_, count)| count < asks) else {
            return false;
        };
        let Some(job) = self.waiting.get_mut(&ip).and_then(|w| w.jobs.remove(i)) else {
            return false;
        };
        self.jobs -= 1;
        // The address keeps MAX_QUEUED_PER_ADDRESS - 1 jobs: its entry in `order` stays.
        self.refuse(&job.digest);
        true
    }

    /// Answers everyone waiting for `digest` "busy" and forgets it.
    fn refuse(&mut self, digest: &Digest) {
        for reply in self
            .pending
            .remove(digest)
            .into_iter()
            .flat_map(|p| p.replies)
        {
            let _ = reply.send(Verdict::Busy);
        }
    }

    fn jobs_of(&self, ip: IpAddr) -> usize {
        self.waiting.get(&ip).map_or(0, |w| w.jobs.len())
    }

    /// Forgets the waiting jobs of `ip` whose requesters all left.
    fn drop_abandoned(&mut self, ip: IpAddr) {
        let Some(waiting) = self.waiting.get_mut(&ip) else {
            return;
        };
        let pending = &mut self.pending;
        let before = waiting.jobs.len();
        waiting.jobs.retain(|job| {
            let wanted = pending.get(&job.digest).is_some_and(Pending::anyone_waits);
            if !wanted {
                pending.remove(&job.digest);
            }
            wanted
        });
        self.jobs -= before - waiting.jobs.len();
        if waiting.jobs.is_empty() {
            let rank = waiting.rank;
            self.waiting.remove(&ip);
            self.order.remove(&(rank.0, rank.1, ip));
        }
    }

    /// Makes room for a requester at `ip` by refusing the newest job of the worst-ranked
    /// address, if that address failed more; false when nobody may be evicted. The evicted
    /// requesters release their places when they read the answer.
    fn evict_for(&mut self, ip: IpAddr) -> bool {
        let failures = self.failures_of(ip);
        let Some(&(worst_failures, _, worst_ip)) = self.order.last() else {
            return false;
        };
        if worst_failures <= failures {
            return false;
        }
        if let Some(job) = self.pop_back(worst_ip) {
            self.refuse(&job.digest);
        }
        true
    }

    fn push_job(&mut self, ip: IpAddr, job: Job) {
        if !self.waiting.contains_key(&ip) {
            let failures = self.failures_of(ip);
            let turn = self.take_turn();
            self.order.insert((failures, turn, ip));
            self.waiting.insert(
                ip,
                Waiting {
                    jobs: VecDeque::new(),
                    rank: (failures, turn),
                },
            );
        }
        if let Some(waiting) = self.waiting.get_mut(&ip) {
            waiting.jobs.push_back(job);
        }
        self.jobs += 1;
    }

    fn take_turn(&mut self) -> u64 {
        self.next_turn += 1;
        self.next_turn
    }

    /// The next job to run: first address in `order`, its oldest job.
    fn pop_next(&mut self) -> Option<(IpAddr, Job)> {
        loop {
            let (_, _, ip) = self.order.pop_first()?;
            let failures = self.failures_of(ip);
            let turn = self.take_turn();
            let Some(waiting) = self.waiting.get_mut(&ip) else {
                continue;
            };
            let job = waiting.jobs.pop_front();
            if waiting.jobs.is_empty() {
                self.waiting.remove(&ip);
            } else {
                waiting.rank = (failures, turn);
                self.order.insert((failures, turn, ip));
            }
            if let Some(job) = job {
                self.jobs -= 1;
                return Some((ip, job));
            }
        }
    }

    /// Takes the newest job of `ip` (to make room for a better-ranked address).
    fn pop_back(&mut self, ip: IpAddr) -> Option<Job> {
        let waiting = self.waiting.get_mut(&ip)?;
        let job = waiting.jobs.pop_back()?;
        self.jobs -= 1;
        if waiting.jobs.is_empty() {
            let rank = waiting.rank;
            self.waiting.remove(&ip);
            self.order.remove(&(rank.0, rank.1, ip));
        }
        Some(job)
    }

    /// Counts a failure of `ip` and moves its waiting jobs back accordingly.
    fn record_failure(&mut self, ip: IpAddr) {
        let now = Instant::now();
        while let Some(&(since, old)) = self.expiry.front() {
            if now.duration_since(since) < FAILURE_WINDOW {
                break;
            }
            self.expiry.pop_front();
            if self.failures.get(&old).is_some_and(|(_, s)| *s == since) {
                self.failures.remove(&old);
            }
        }
        let tracked = self.failures.contains_key(&ip);
        if !tracked && self.failures.len() >= MAX_TRACKED {
            return;
        }
        let count = match self.failures.get_mut(&ip) {
            Some((count, since)) if now.duration_since(*since) < FAILURE_WINDOW => {
                *count = count.saturating_add(1);
                *count
            }
            _ => {
                self.failures.insert(ip, (1, now));
                self.expiry.push_back((now, ip));
                1
            }
        };
        if let Some(waiting) = self.waiting.get_mut(&ip)
            && waiting.rank.0 != count
        {
            self.order.remove(&(waiting.rank.0, waiting.rank.1, ip));
            waiting.rank.0 = count;
            self.order.insert((count, waiting.rank.1, ip));
        }
    }
}

/// A requester's place in the queue's counts, released when it stops waiting: answered, or
/// its future dropped because the peer left.
struct Ticket<'a> {
    inner: &'a Inner,
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        self.inner.lock().release();
    }
}

impl Authenticator {
    /// `metrics` receives the queue length, the bcrypt runs and the busy refusals.
    pub fn new(hash: PasswordHash, metrics: AuthMetrics) -> Authenticator {
        let mut key = [0u8; 32];
        let keyed = getrandom::fill(&mut key).is_ok();
        if !keyed {
            key = [0u8; 32];
        }
        Authenticator {
            inner: Arc::new(Inner {
                hash,
                key,
                keyed,
                known: OnceLock::new(),
                queue: Mutex::new(Queue::default()),
                workers: workers(),
                metrics,
            }),
        }
    }

    /// Checks `password` from a peer at `ip`. Never blocks the runtime. Dropping the future
    /// withdraws the request: if nobody else waits for the same password, bcrypt never runs
    /// for it.
    pub async fn verify(&self, password: &str, ip: IpAddr) -> Verdict {
        let inner = &*self.inner;
        let ip = bucket(ip);
        let Some(password) = bcrypt_key(password) else {
            inner.lock().record_failure(ip);
            return Verdict::WrongPassword;
        };
        let digest = inner.digest(password);
        if let Some(verdict) = inner.without_bcrypt(&digest) {
            if verdict == Verdict::WrongPassword {
                inner.lock().record_failure(ip);
            }
            return verdict;
        }
        let (answer, start_worker) = {
            let mut queue = inner.lock();
            let answer = queue.request(ip, digest, password);
            inner.metrics.waiting.set(queue.jobs as i64);
            let Some(answer) = answer else {
                drop(queue);
                inner.metrics.busy.inc();
                return Verdict::Busy;
            };
            let start = queue.jobs > 0 && queue.running < inner.workers;
            if start {
                queue.running += 1;
            }
            (answer, start)
        };
        let _ticket = Ticket { inner };
        if start_worker {
            let worker = WorkerSlot {
                inner: Arc::clone(&self.inner),
                counted: true,
                current: None,
            };
            // At shutdown the closure may be dropped unrun: `WorkerSlot` then uncounts it.
            drop(tokio::task::spawn_blocking(move || worker.work()));
        }
        // The sender is dropped unanswered only if a worker died: no verdict on the password.
        let verdict = answer.await.unwrap_or(Verdict::Busy);
        if verdict == Verdict::Busy {
            inner.metrics.busy.inc();
        }
        verdict
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        // The queue stays consistent at every await-free step; a panic elsewhere must not
        // lock every admin out.
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn digest(&self, password: &[u8]) -> Digest {
        let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(&self.key) else {
            unreachable!("HMAC takes keys of any length");
        };
        mac.update(password);
        mac.finalize().into_bytes().into()
    }

    /// The verdict when it needs no bcrypt: once a password verified, every password is
    /// judged by its digest.
    fn without_bcrypt(&self, digest: &Digest) -> Option<Verdict> {
        let known = self.known.get()?;
        Some(if known == digest {
            Verdict::Admin
        } else {
            Verdict::WrongPassword
        })
    }

    fn remember(&self, digest: Digest) {
        if self.keyed {
            let _ = self.known.set(digest);
        }
    }

    /// Runs `job` (or judges it without bcrypt, if the password became known meanwhile)
    /// and answers everyone who waits for it.
    fn run(&self, ip: IpAddr, job: Job) {
        let verdict = match self.without_bcrypt(&job.digest) {
            Some(verdict) => verdict,
            None => {
                self.metrics.verifications.inc();
                let hash = &self.hash;
                let password = &job.password;
                let ok =
                    std::panic::catch_unwind(|| hash.verify_blocking(password)).unwrap_or(false);
                if ok {
                    self.remember(job.digest);
                    Verdict::Admin
                } else {
                    Verdict::WrongPassword
                }
            }
        };
        let waiters = {
            let mut queue = self.lock();
            if verdict == Verdict::WrongPassword {
                queue.record_failure(ip);
            }
            queue.pending.remove(&job.digest)
        };
        // Outside the lock: the list is as long as the requesters that shared the run.
        for reply in waiters.into_iter().flat_map(|p| p.replies) {
            let _ = reply.send(verdict);
        }
    }
}

/// A running worker, counted in [`Queue::running`] until it returns, panics, or is dropped
/// unrun (`spawn_blocking` at shutdown): a count left high would stop new workers.
struct WorkerSlot {
    inner: Arc<Inner>,
    counted: bool,
    /// The password being verified. If the run panics, its requesters are let go (answered
    /// busy) and its entry in [`Queue::pending`] removed: left there, everyone who asks for
    /// that password later would join a run that never ends.
    current: Option<Digest>,
}

impl WorkerSlot {
    /// Runs waiting jobs, best-ranked first, until none is left. Runs on a blocking thread;
    /// takes the queue lock only between jobs.
    fn work(mut self) {
        let inner = Arc::clone(&self.inner);
        loop {
            let next = {
                let mut queue = inner.lock();
                let next = queue.pop_next();
                inner.metrics.waiting.set(queue.jobs as i64);
                match next {
                    // The requesters all left while it waited: no work for it.
                    Some((_, job))
                        if !queue
                            .pending
                            .get(&job.digest)
                            .is_some_and(Pending::anyone_waits) =>
                    {
                        queue.pending.remove(&job.digest);
                        continue;
                    }
                    Some(next) => next,
                    None => {
                        // Under the lock, so a job pushed meanwhile sees this and starts a
                        // worker.
                        queue.running -= 1;
                        self.counted = false;
                        return;
                    }
                }
            };
            self.current = Some(next.1.digest);
            inner.run(next.0, next.1);
            self.current = None;
        }
    }
}

impl Drop for WorkerSlot {
    fn drop(&mut self) {
        let mut queue = self.inner.lock();
        if self.counted {
            queue.running -= 1;
        }
        // Dropping the replies unanswered tells each requester "busy".
        let abandoned = self
            .current
            .and_then(|digest| queue.pending.remove(&digest));
        drop(queue);
        drop(abandoned);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    #[test]
    fn default_hash_is_the_originals_and_accepts_12345678() {
        let hash = PasswordHash::default_hash();
        assert!(hash.0.starts_with("$2b$12$"));
        assert!(hash.verify_blocking("12345678"));
        assert!(!hash.verify_blocking("123456789"));
    }

    #[test]
    fn parse_accepts_hex_and_raw_and_refuses_junk() {
        let raw = PasswordHash::default_hash().0;
        assert_eq!(PasswordHash::parse(&raw).map(|h| h.0), Ok(raw.clone()));
        assert_eq!(PasswordHash::parse(""), Err(AuthError::Empty));
        assert_eq!(PasswordHash::parse("  "), Err(AuthError::Empty));
        assert_eq!(PasswordHash::parse("abcd"), Err(AuthError::PlainPassword));
        assert_eq!(
            PasswordHash::parse("12345678"),
            Err(AuthError::PlainPassword)
        );
        assert_eq!(PasswordHash::parse("24326224"), Err(AuthError::NotBcrypt));
        assert_eq!(
            PasswordHash::parse("$2b$12$short"),
            Err(AuthError::NotBcrypt)
        );
        assert_eq!(PasswordHash::parse("zz"), Err(AuthError::PlainPassword));
    }

    #[test]
    fn hash_password_round_trips_through_parse() {
        let hex = hash_password("s3cret").unwrap();
        let hash = PasswordHash::parse(&hex).unwrap();
        assert!(hash.verify_blocking("s3cret"));
    }

    /// The digest fast path relies on this: bcrypt ignores what follows byte 72, so the
    /// first 72 bytes decide, and a NUL byte is refused before bcrypt.
    #[test]
    fn bcrypt_decides_on_the_first_72_bytes() {
        let long = "x".repeat(72);
        let hash = PasswordHash(bcrypt::hash(&long, 4).unwrap());
        assert!(hash.verify_blocking(format!("{long}anything")));
        assert!(!hash.verify_blocking(&long[..71]));
        assert_eq!(bcrypt_key(&format!("{long}y")), Some(long.as_bytes()));
        assert_eq!(bcrypt_key("short"), Some(&b"short"[..]));
        assert_eq!(bcrypt_key("a\0b"), None);
        assert_eq!(bcrypt_key(&format!("{long}\0")), None);
    }

    #[test]
    fn ipv6_addresses_share_their_64() {
        let a: Ipv6Addr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: Ipv6Addr = "2001:db8:1:2:bbbb::2".parse().unwrap();
        let c: Ipv6Addr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(bucket(a.into()), bucket(b.into()));
        assert_ne!(bucket(a.into()), bucket(c.into()));
        let mapped = Ipv4Addr::new(192, 0, 2, 1).to_ipv6_mapped();
        assert_eq!(
            bucket(mapped.into()),
            IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1))
        );
    }

    fn ip(last: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(192, 0, 2, last))
    }

    /// A distinct password per `n`, with its own ask counter (for `n` below 4096).
    fn digest(n: u32) -> Digest {
        let mut d = [0u8; 32];
        d[..2].copy_from_slice(&(n as u16).to_be_bytes());
        d[2..6].copy_from_slice(&n.to_be_bytes());
        d
    }

    /// Fewer failures first, round robin among equals, and a failure moves an address back.
    #[test]
    fn queue_serves_fewest_failures_first_then_in_turns() {
        let mut queue = Queue::default();
        let mut answers = Vec::new();
        for _ in 0..3 {
            queue.record_failure(ip(1));
        }
        for (n, address) in [ip(1), ip(1), ip(2), ip(2), ip(3)].into_iter().enumerate() {
            answers.push(queue.request(address, digest(n as u32), b"").unwrap());
        }
        let mut served = Vec::new();
        while let Some((address, _)) = queue.pop_next() {
            served.push(address);
            if served.len() == 1 {
                // ip(2) fails once: ip(3) (no failure) goes before its second job.
                queue.record_failure(ip(2));
            }
        }
        assert_eq!(served, [ip(2), ip(3), ip(2), ip(1), ip(1)]);
        assert_eq!(queue.jobs, 0);
        assert!(queue.order.is_empty() && queue.waiting.is_empty());
    }

    /// The same password twice is one job; its requesters do not count toward the
    /// per-address job bound, only toward the per-password requester bound, which does not
    /// stop another password from the same address.
    #[test]
    fn same_password_shares_one_job() {
        let mut queue = Queue::default();
        let mut answers = Vec::new();
        for _ in 0..MAX_WAITING_PER_PASSWORD {
            answers.push(queue.request(ip(1), digest(0), b"").unwrap());
        }
        assert_eq!(queue.jobs, 1);
        assert_eq!(queue.total, MAX_WAITING_PER_PASSWORD);
        assert!(
            queue.request(ip(1), digest(0), b"").is_none(),
            "requesters bounded"
        );
        assert!(
            queue.request(ip(2), digest(0), b"").is_none(),
            "from any address"
        );
        answers.pop();
        answers.push(queue.request(ip(2), digest(0), b"").unwrap());
        answers.push(queue.request(ip(1), digest(1), b"").unwrap());
        assert_eq!(queue.jobs, 2, "another password from the same address");
        assert!(queue.pop_next().is_some() && queue.pop_next().is_some());
        assert!(queue.pop_next().is_none());
    }

    /// An address's share full of once-asked passwords: a newcomer asked for once is
    /// refused, a password asked for again (a retry after busy) takes the newest one's
    /// place, and is itself not displaced by fresh passwords afterwards.
    #[test]
    fn a_retried_password_displaces_a_once_asked_one() {
        let mut queue = Queue::default();
        let mut answers = Vec::new();
        for n in 0..MAX_QUEUED_PER_ADDRESS as u32 {
            answers.push(queue.request(ip(1), digest(n), b"").unwrap());
        }
        let right = digest(1000);
        assert!(
            queue.request(ip(1), right, b"").is_none(),
            "first try: busy"
        );
        let mut admitted = queue.request(ip(1), right, b"").expect("second try queued");
        let mut displaced = answers.pop().unwrap();
        assert_eq!(displaced.try_recv(), Ok(Verdict::Busy));
        for n in 100..200 {
            assert!(queue.request(ip(1), digest(n), b"").is_none());
        }
        assert!(admitted.try_recv().is_err(), "still waiting");
        let served: Vec<Digest> =
            std::iter::from_fn(|| queue.pop_next().map(|(_, j)| j.digest)).collect();
        assert_eq!(served.len(), MAX_QUEUED_PER_ADDRESS);
        assert_eq!(served.last(), Some(&right));
    }

    /// Full per address: a new password is refused, unless a waiting one was abandoned.
    /// Full in total: an address that failed less takes the place of the worst one's newest
    /// job, whose requesters are answered busy.
    #[test]
    fn queue_bounds_per_address_and_in_total() {
        let mut queue = Queue::default();
        let mut answers = Vec::new();
        for n in 0..MAX_QUEUED_PER_ADDRESS {
            answers.push(queue.request(ip(1), digest(n as u32), b"").unwrap());
        }
        assert!(queue.request(ip(1), digest(100), b"").is_none());
        answers.pop();
        assert!(
            queue.request(ip(1), digest(100), b"").is_some(),
            "an abandoned job frees its place"
        );
        assert_eq!(queue.jobs, MAX_QUEUED_PER_ADDRESS);

        let mut queue = Queue::default();
        let mut answers = Vec::new();
        let mut n = 0u32;
        while queue.total < MAX_QUEUED {
            let address = IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + n / 8));
            queue.record_failure(address);
            answers.push(queue.request(address, digest(n), b"").unwrap());
            n += 1;
        }
        let _fresh = queue.request(ip(9), digest(n), b"").unwrap();
        assert_eq!(queue.jobs, MAX_QUEUED, "one job evicted, one added");
        let mut evicted = answers.pop().unwrap();
        assert_eq!(evicted.try_recv(), Ok(Verdict::Busy));
        // An equally failing newcomer is refused: nobody to evict.
        let failing = ip(10);
        for _ in 0..MAX_QUEUED_PER_ADDRESS {
            queue.record_failure(failing);
        }
        assert!(queue.request(failing, digest(n + 1), b"").is_none());
        assert_eq!(queue.pop_next().map(|(a, _)| a), Some(ip(9)));
    }
}
