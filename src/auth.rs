//! Admin authentication: the `SOCKET_AUTH` bcrypt hash, and verification of the password a
//! connection presents.
//!
//! bcrypt costs ~0.1–0.3 s of CPU by design, so verification never runs on the async runtime
//! (`spawn_blocking`), at most a few run at once (a semaphore), and an address that keeps
//! failing is refused without running bcrypt at all. A password that verified once is
//! remembered as an HMAC under a key made at start, never in plain text, so the frequent
//! reconnects of a backend such as Jaseci don't pay bcrypt again.

use std::collections::HashSet;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use tokio::sync::Semaphore;

/// The original relay's default `SOCKET_AUTH`: hex of a bcrypt hash of `12345678`.
pub const DEFAULT_AUTH_HEX: &str = "24326224313224682e6b576f5762714d43745633516c554e5573645265764142693753473043784b574b355a733033757159323834796c3757425a71";

/// bcrypt verifications allowed to run at once: half the cores (at least one), so a flood of
/// wrong passwords leaves the other half to the relay itself.
fn max_concurrent_verifications() -> usize {
    std::thread::available_parallelism().map_or(1, |n| (n.get() / 2).max(1))
}
/// Failed verifications one address may cause per [`FAILURE_WINDOW`] before it is refused
/// without bcrypt until the window ends.
const MAX_FAILURES_PER_WINDOW: u32 = 10;
const FAILURE_WINDOW: Duration = Duration::from_secs(60);
/// Distinct passwords remembered as verified; one is usual, a few cover a password change.
const MAX_REMEMBERED: usize = 16;

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

/// Verifies admin passwords for every connection; one per server, shared.
pub struct Authenticator {
    hash: Arc<PasswordHash>,
    /// Bounds concurrent bcrypt runs.
    permits: Semaphore,
    /// HMAC key made at start; the remembered digests are useless outside this process.
    key: [u8; 32],
    /// Digests of passwords that verified.
    remembered: Mutex<HashSet<[u8; 32]>>,
    /// Failed verifications per address in the current window: (count, window start).
    failures: DashMap<IpAddr, (u32, Instant)>,
}

/// What a verification concluded, for logs and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Admin,
    WrongPassword,
    /// Too many failures from this address recently; bcrypt was not run.
    RateLimited,
}

impl Authenticator {
    pub fn new(hash: PasswordHash) -> Authenticator {
        let mut key = [0u8; 32];
        if getrandom::fill(&mut key).is_err() {
            // Without OS randomness the digests would be predictable; remembering is then
            // skipped (see `digest`), which only costs speed.
            key = [0u8; 32];
        }
        Authenticator {
            hash: Arc::new(hash),
            permits: Semaphore::new(max_concurrent_verifications()),
            key,
            remembered: Mutex::new(HashSet::new()),
            failures: DashMap::new(),
        }
    }

    fn digest(&self, password: &str) -> Option<[u8; 32]> {
        if self.key == [0u8; 32] {
            return None;
        }
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.key).ok()?;
        mac.update(password.as_bytes());
        Some(mac.finalize().into_bytes().into())
    }

    fn is_remembered(&self, digest: &[u8; 32]) -> bool {
        self.remembered
            .lock()
            .map(|set| set.contains(digest))
            .unwrap_or(false)
    }

    fn remember(&self, digest: [u8; 32]) {
        if let Ok(mut set) = self.remembered.lock() {
            if set.len() >= MAX_REMEMBERED {
                set.clear();
            }
            set.insert(digest);
        }
    }

    fn rate_limited(&self, ip: IpAddr) -> bool {
        match self.failures.get(&ip) {
            Some(entry) => {
                let (count, since) = *entry;
                since.elapsed() < FAILURE_WINDOW && count >= MAX_FAILURES_PER_WINDOW
            }
            None => false,
        }
    }

    fn record_failure(&self, ip: IpAddr) {
        let mut entry = self.failures.entry(ip).or_insert((0, Instant::now()));
        if entry.1.elapsed() >= FAILURE_WINDOW {
            *entry = (0, Instant::now());
        }
        entry.0 += 1;
        // The entry holds a shard lock and `len` takes every shard's: release it first.
        drop(entry);
        // Keep the table from growing without bound under a spread-out flood.
        if self.failures.len() > 100_000 {
            self.failures
                .retain(|_, (_, since)| since.elapsed() < FAILURE_WINDOW);
        }
    }

    /// Checks `password` from a peer at `ip`. Never blocks the runtime.
    pub async fn verify(&self, password: &str, ip: IpAddr) -> Verdict {
        let digest = self.digest(password);
        if digest.as_ref().is_some_and(|d| self.is_remembered(d)) {
            return Verdict::Admin;
        }
        if self.rate_limited(ip) {
            return Verdict::RateLimited;
        }
        // Held until the outcome is recorded, so the next waiter sees this failure.
        let Ok(_permit) = self.permits.acquire().await else {
            return Verdict::WrongPassword;
        };
        // Again after the wait: attempts from this address queued at the same time may have
        // reached the limit meanwhile (else a concurrent flood would all pay bcrypt).
        if self.rate_limited(ip) {
            return Verdict::RateLimited;
        }
        let hash = Arc::clone(&self.hash);
        let password = password.to_string();
        let ok = tokio::task::spawn_blocking(move || hash.verify_blocking(&password))
            .await
            .unwrap_or(false);
        if ok {
            if let Some(d) = digest {
                self.remember(d);
            }
            Verdict::Admin
        } else {
            self.record_failure(ip);
            Verdict::WrongPassword
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
