//! Admin authentication: the `SOCKET_AUTH` bcrypt hash, and verification of the password a
//! connection presents.
//!
//! bcrypt costs ~0.1–0.3 s of CPU by design, so it never runs on the async runtime, and who
//! gets it decides whether a flood of wrong passwords can lock the real backend out. The
//! rules, cheapest first:
//!
//! 1. A password that verified once is remembered as an HMAC under a key made at start (never
//!    in plain text): Jaseci's frequent reconnects don't pay bcrypt again.
//! 2. One bcrypt hash admits exactly one password of at most 72 bytes without NUL (bcrypt
//!    keys on the password and its NUL terminator, cut at 72 bytes). So once the right
//!    password is known, any other such password is refused at once, without bcrypt: after
//!    the backend's first login a flood costs nothing and cannot delay it. Longer passwords,
//!    or ones with NUL, still go to bcrypt (bcrypt truncates them, so they may be equivalent).
//! 3. Everything else waits in a fair queue served by a few blocking workers (half
//!    the cores): the address with the fewest recent failures goes first, equals take turns.
//!    A failing address only loses priority; nothing is refused for its failures, so a right
//!    password is never refused because others behind the same address failed. A waiting
//!    request whose requester left (its connection closed, its HTTP request dropped) is
//!    skipped, never run. The queue is bounded per address and in total; past the bound the
//!    request is refused as [`Verdict::Busy`] ("busy, retry"), never as a wrong password.
//!
//! The bounds also bound what waiting verifications hold elsewhere: an upgrade whose `auth`
//! header waits here holds a `--max-connections` slot, so at most [`MAX_QUEUED`] slots (and
//! [`MAX_QUEUED_PER_ADDRESS`] per address) can be pinned this way, plus one per worker.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use tokio::sync::oneshot;

use crate::metrics::AuthMetrics;

/// The original relay's default `SOCKET_AUTH`: hex of a bcrypt hash of `12345678`.
pub const DEFAULT_AUTH_HEX: &str = "24326224313224682e6b576f5762714d43745633516c554e5573645265764142693753473043784b574b355a733033757159323834796c3757425a71";

/// Verifications one address may have waiting (not counting the ones running). A backend
/// sends one at a time; more from one address is a flood or a reconnect storm.
pub const MAX_QUEUED_PER_ADDRESS: usize = 8;
/// Verifications waiting in total.
pub const MAX_QUEUED: usize = 1024;
/// Failures are counted per address over windows of this length; a new window starts at 0.
const FAILURE_WINDOW: Duration = Duration::from_secs(60);
/// Addresses whose failures are tracked at once; beyond it new addresses count as fresh
/// until old windows expire (the table must not grow with an attacker's address space).
const MAX_TRACKED: usize = 100_000;
/// Distinct passwords remembered as verified: one, or a few variants of one longer than 72
/// bytes (bcrypt ignores what follows).
const MAX_REMEMBERED: usize = 16;

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
    fn verify_blocking(&self, password: &str) -> bool {
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

/// True when bcrypt sees all of `password` and nothing else: then the hash admits it and no
/// other password, and a different one can be refused without running bcrypt.
fn bcrypt_sees_exactly(password: &str) -> bool {
    password.len() <= 72 && !password.as_bytes().contains(&0)
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

/// What the async side and the blocking workers share.
struct Inner {
    hash: PasswordHash,
    /// HMAC key made at start; the remembered digests are useless outside this process.
    key: [u8; 32],
    /// Digests of passwords that verified.
    remembered: Mutex<HashSet<[u8; 32]>>,
    /// Set once a password that bcrypt sees exactly ([`bcrypt_sees_exactly`]) verified:
    /// every other such password is then wrong without asking bcrypt.
    known: OnceLock<()>,
    /// Waiting verifications and per-address failures. Held only for O(log n) steps, never
    /// across bcrypt.
    queue: Mutex<Queue>,
    workers: usize,
    metrics: AuthMetrics,
}

/// One verification waiting for a worker.
struct Job {
    password: String,
    digest: Option<[u8; 32]>,
    /// Dropped by the requester when it leaves: the job is then skipped.
    reply: oneshot::Sender<Verdict>,
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
    len: usize,
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

    /// Adds `job` for `ip`, or gives it back when the queue is full for it. When the total
    /// is reached, the newest job of the worst-ranked address makes room for an address that
    /// failed less; that job is answered [`Verdict::Busy`].
    fn push(&mut self, ip: IpAddr, job: Job) -> Result<(), Job> {
        let failures = self.failures_of(ip);
        if let Some(waiting) = self.waiting.get_mut(&ip)
            && waiting.jobs.len() >= MAX_QUEUED_PER_ADDRESS
        {
            // At most MAX_QUEUED_PER_ADDRESS to look at: requesters that left free their place.
            let before = waiting.jobs.len();
            waiting.jobs.retain(|job| !job.reply.is_closed());
            self.len -= before - waiting.jobs.len();
            if waiting.jobs.len() >= MAX_QUEUED_PER_ADDRESS {
                return Err(job);
            }
        }
        if self.len >= MAX_QUEUED {
            let worst = self.order.last().copied();
            match worst {
                Some((worst_failures, _, worst_ip)) if worst_failures > failures => {
                    if let Some(evicted) = self.pop_back(worst_ip) {
                        let _ = evicted.reply.send(Verdict::Busy);
                    }
                }
                _ => return Err(job),
            }
        }
        if !self.waiting.contains_key(&ip) {
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
        self.len += 1;
        Ok(())
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
                self.len -= 1;
                return Some((ip, job));
            }
        }
    }

    /// Takes the newest job of `ip` (to make room for a better-ranked address).
    fn pop_back(&mut self, ip: IpAddr) -> Option<Job> {
        let waiting = self.waiting.get_mut(&ip)?;
        let job = waiting.jobs.pop_back()?;
        self.len -= 1;
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

impl Authenticator {
    /// `metrics` receives the queue length, the bcrypt runs and the busy refusals.
    pub fn new(hash: PasswordHash, metrics: AuthMetrics) -> Authenticator {
        let mut key = [0u8; 32];
        if getrandom::fill(&mut key).is_err() {
            // Without OS randomness the digests would be predictable; remembering is then
            // skipped (see `digest`), which only costs speed.
            key = [0u8; 32];
        }
        Authenticator {
            inner: Arc::new(Inner {
                hash,
                key,
                remembered: Mutex::new(HashSet::new()),
                known: OnceLock::new(),
                queue: Mutex::new(Queue::default()),
                workers: workers(),
                metrics,
            }),
        }
    }

    /// Checks `password` from a peer at `ip`. Never blocks the runtime. Dropping the future
    /// withdraws the request: if it was still waiting, bcrypt never runs for it.
    pub async fn verify(&self, password: &str, ip: IpAddr) -> Verdict {
        let inner = &self.inner;
        let ip = bucket(ip);
        let digest = inner.digest(password);
        if let Some(verdict) = inner.without_bcrypt(password, digest.as_ref()) {
            if verdict == Verdict::WrongPassword {
                inner.lock().record_failure(ip);
            }
            return verdict;
        }
        let (reply, answer) = oneshot::channel();
        let job = Job {
            password: password.to_string(),
            digest,
            reply,
        };
        let start_worker = {
            let mut queue = inner.lock();
            if queue.push(ip, job).is_err() {
                drop(queue);
                inner.metrics.busy.inc();
                return Verdict::Busy;
            }
            inner.metrics.waiting.set(queue.len as i64);
            let start = queue.running < inner.workers;
            if start {
                queue.running += 1;
            }
            start
        };
        if start_worker {
            let worker = Arc::clone(inner);
            tokio::task::spawn_blocking(move || worker.work());
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

    fn digest(&self, password: &str) -> Option<[u8; 32]> {
        if self.key == [0u8; 32] {
            return None;
        }
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.key).ok()?;
        mac.update(password.as_bytes());
        Some(mac.finalize().into_bytes().into())
    }

    /// The verdict when it needs no bcrypt: a remembered password, or (once the right one is
    /// known) any other password bcrypt would see exactly.
    fn without_bcrypt(&self, password: &str, digest: Option<&[u8; 32]>) -> Option<Verdict> {
        let remembered = digest.is_some_and(|d| {
            self.remembered
                .lock()
                .map(|set| set.contains(d))
                .unwrap_or(false)
        });
        if remembered {
            return Some(Verdict::Admin);
        }
        // `known` is only set when remembering works, so "not remembered" above is reliable.
        if self.known.get().is_some() && bcrypt_sees_exactly(password) {
            return Some(Verdict::WrongPassword);
        }
        None
    }

    fn remember(&self, password: &str, digest: Option<[u8; 32]>) {
        let Some(digest) = digest else { return };
        if let Ok(mut set) = self.remembered.lock() {
            if set.len() >= MAX_REMEMBERED {
                set.clear();
            }
            set.insert(digest);
        }
        if bcrypt_sees_exactly(password) {
            let _ = self.known.set(());
        }
    }

    /// A worker: runs waiting jobs, best-ranked first, until none is left. Runs on a
    /// blocking thread; takes the queue lock only between jobs.
    fn work(&self) {
        loop {
            let next = {
                let mut queue = self.lock();
                let next = queue.pop_next();
                self.metrics.waiting.set(queue.len as i64);
                if next.is_none() {
                    // Under the lock, so a job pushed meanwhile sees this and starts a worker.
                    queue.running -= 1;
                }
                next
            };
            let Some((ip, job)) = next else { return };
            if job.reply.is_closed() {
                // The requester left while waiting: no work for it.
                continue;
            }
            let verdict = match self.without_bcrypt(&job.password, job.digest.as_ref()) {
                Some(verdict) => verdict,
                None => {
                    self.metrics.verifications.inc();
                    let hash = &self.hash;
                    let password = &job.password;
                    let ok = std::panic::catch_unwind(|| hash.verify_blocking(password))
                        .unwrap_or(false);
                    if ok {
                        self.remember(&job.password, job.digest);
                        Verdict::Admin
                    } else {
                        Verdict::WrongPassword
                    }
                }
            };
            if verdict == Verdict::WrongPassword {
                self.lock().record_failure(ip);
            }
            let _ = job.reply.send(verdict);
        }
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

    /// The fast reject relies on this: bcrypt ignores what follows byte 72, so such
    /// passwords are not refused without bcrypt.
    #[test]
    fn bcrypt_truncates_at_72_bytes() {
        let long = "x".repeat(72);
        let hash = PasswordHash(bcrypt::hash(&long, 4).unwrap());
        assert!(hash.verify_blocking(&format!("{long}anything")));
        assert!(bcrypt_sees_exactly(&long));
        assert!(!bcrypt_sees_exactly(&format!("{long}y")));
        assert!(!bcrypt_sees_exactly("a\0b"));
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

    fn job() -> (Job, oneshot::Receiver<Verdict>) {
        let (reply, answer) = oneshot::channel();
        let job = Job {
            password: String::new(),
            digest: None,
            reply,
        };
        (job, answer)
    }

    fn ip(last: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(192, 0, 2, last))
    }

    /// Fewer failures first, round robin among equals, and a failure moves an address back.
    #[test]
    fn queue_serves_fewest_failures_first_then_in_turns() {
        let mut queue = Queue::default();
        let mut answers = Vec::new();
        for _ in 0..3 {
            queue.record_failure(ip(1));
        }
        for address in [ip(1), ip(1), ip(2), ip(2), ip(3)] {
            let (job, answer) = job();
            assert!(queue.push(address, job).is_ok());
            answers.push(answer);
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
        assert_eq!(queue.len, 0);
        assert!(queue.order.is_empty() && queue.waiting.is_empty());
    }

    /// Full per address: the newcomer is refused, unless a waiting requester left. Full in
    /// total: an address that failed less takes the place of the worst one's newest job.
    #[test]
    fn queue_bounds_per_address_and_in_total() {
        let mut queue = Queue::default();
        let mut answers = Vec::new();
        for _ in 0..MAX_QUEUED_PER_ADDRESS {
            let (job, answer) = job();
            assert!(queue.push(ip(1), job).is_ok());
            answers.push(answer);
        }
        assert!(queue.push(ip(1), job().0).is_err());
        answers.pop();
        assert!(
            queue.push(ip(1), job().0).is_ok(),
            "a left requester frees its place"
        );

        let mut queue = Queue::default();
        let mut answers = Vec::new();
        let mut n = 0u32;
        while queue.len < MAX_QUEUED {
            let address = IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + n / 8));
            queue.record_failure(address);
            let (job, answer) = job();
            assert!(queue.push(address, job).is_ok());
            answers.push(answer);
            n += 1;
        }
        let (fresh, _answer) = job();
        assert!(
            queue.push(ip(9), fresh).is_ok(),
            "fewer failures get a place"
        );
        assert_eq!(queue.len, MAX_QUEUED);
        let evicted = answers.pop().unwrap();
        assert_eq!(evicted.blocking_recv(), Ok(Verdict::Busy));
        // An equally failing newcomer is refused: nobody to evict.
        let failing = ip(10);
        for _ in 0..MAX_QUEUED_PER_ADDRESS {
            queue.record_failure(failing);
        }
        assert!(queue.push(failing, job().0).is_err());
        assert_eq!(queue.pop_next().map(|(a, _)| a), Some(ip(9)));
    }
}
