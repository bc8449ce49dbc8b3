//! Token (JWT) authentication of clients (SPEC §11): a client that presents a token signed by
//! a key the relay was given is acknowledged by the relay itself, with the user, roles and
//! groups the token names, without a backend round trip.
//!
//! This module only judges tokens: [`Verifier::verify`] takes a token and returns the
//! [`Identity`] it proves, or a [`TokenError`] saying why not. Where tokens come from (the
//! upgrade request, `client_connect`, a SignalR connection) and what an identity grants is the
//! callers' business.
//!
//! Signatures are checked by the `jsonwebtoken` crate. The key is chosen by the family of the
//! token's `alg` (HMAC → `--jwt-secret`, RSA/EC/Ed → `--jwt-public-key`), and only the
//! algorithms of that key's own family are accepted: `alg: none` cannot even be named (the
//! crate has no such algorithm), and a token signed with HS256 using the public key as the
//! secret ("algorithm confusion") finds no HMAC key, or the real secret, and fails.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{Map, Value};

/// Longest token judged. A real token (a user, a few roles) is well under 2 KiB; a longer one
/// is refused before a byte of it is decoded, so a peer cannot make the relay base64-decode
/// and parse large claim sets, or hash large inputs, per attempt.
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;

/// Clock skew allowed between the token's issuer and this relay on `exp` and `nbf`: a token
/// issued "now" (with `nbf` = now) by a server whose clock runs slightly ahead is not refused.
pub const LEEWAY_SECS: u64 = 30;

/// The long role claim of .NET (ASP.NET Core's `ClaimTypes.Role`), which Magic's tokens use.
pub const DOTNET_ROLE_CLAIM: &str = "http://schemas.microsoft.com/ws/2008/06/identity/claims/role";

/// Claims whose values (a string or an array of strings) together make the roles.
const ROLE_CLAIMS: [&str; 3] = ["role", "roles", DOTNET_ROLE_CLAIM];

/// Who a valid token says the peer is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The user claim's value: the group the connection joins, and what `users` filters match.
    pub user: Arc<str>,
    /// The union of `role`, `roles` and [`DOTNET_ROLE_CLAIM`], first occurrence kept.
    pub roles: Vec<String>,
    /// `groups`, first occurrence kept.
    pub groups: Vec<String>,
    /// When the token stops being valid (`exp` plus [`LEEWAY_SECS`]); `None` without `exp`.
    pub expires_at: Option<SystemTime>,
}

impl Identity {
    /// How long until the token expires; zero once it has. `None`: it never does.
    pub fn expires_in(&self) -> Option<Duration> {
        self.expires_at.map(|at| {
            at.duration_since(SystemTime::now())
                .unwrap_or(Duration::ZERO)
        })
    }
}

/// Why a token was refused. The text is safe to send to the peer: it never repeats the token
/// or a claim's value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("token is longer than {MAX_TOKEN_BYTES} bytes")]
    TooLong,
    #[error("not a well-formed JWT, or its alg is not supported (\"none\" never is)")]
    Malformed,
    #[error("alg {0:?} is not accepted: no key of its kind is configured")]
    Algorithm(Algorithm),
    #[error("signature does not verify")]
    Signature,
    #[error("token has expired")]
    Expired,
    #[error("token is not valid yet (nbf)")]
    NotYetValid,
    #[error("wrong issuer (iss)")]
    Issuer,
    #[error("wrong audience (aud)")]
    Audience,
    #[error("token has no {0:?} claim")]
    MissingClaim(String),
    #[error("claim {0:?} has the wrong type")]
    InvalidClaim(String),
}

/// A key could not be made from the configuration.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("--jwt-secret must not be empty")]
    EmptySecret,
    #[error(
        "--jwt-public-key: not a PEM public key (RSA as SPKI or PKCS#1, EC or Ed25519 as SPKI)"
    )]
    PublicKey,
    #[error("--jwt-user-claim must not be empty")]
    EmptyUserClaim,
}

/// The keys and rules tokens are judged by; made once from the configuration.
pub struct Verifier {
    /// At most one HMAC key (`--jwt-secret`) and one public key (`--jwt-public-key`).
    keys: Vec<DecodingKey>,
    issuer: Option<String>,
    audience: Option<String>,
    user_claim: String,
}

impl std::fmt::Debug for Verifier {
    /// Never prints the secret.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field(
                "keys",
                &self
                    .keys
                    .iter()
                    .map(DecodingKey::family)
                    .collect::<Vec<_>>(),
            )
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .field("user_claim", &self.user_claim)
            .finish()
    }
}

impl Verifier {
    /// `secret`: the HMAC secret as raw UTF-8 bytes. `public_key_pem`: the contents of a PEM
    /// file holding an RSA (SPKI or PKCS#1), EC (P-256/P-384) or Ed25519 public key.
    pub fn new(
        secret: Option<&str>,
        public_key_pem: Option<&[u8]>,
        issuer: Option<String>,
        audience: Option<String>,
        user_claim: String,
    ) -> Result<Verifier, KeyError> {
        let mut keys = Vec::new();
        if let Some(secret) = secret {
            if secret.is_empty() {
                return Err(KeyError::EmptySecret);
            }
            keys.push(
                DecodingKey::from_secret(secret.as_bytes()).map_err(|_| KeyError::EmptySecret)?,
            );
        }
        if let Some(pem) = public_key_pem {
            // `jsonwebtoken` would take a private key's PEM too, and then no token verifies.
            if !is_public_key_pem(pem) {
                return Err(KeyError::PublicKey);
            }
            let key = DecodingKey::from_rsa_pem(pem)
                .or_else(|_| DecodingKey::from_ec_pem(pem))
                .or_else(|_| DecodingKey::from_ed_pem(pem))
                .map_err(|_| KeyError::PublicKey)?;
            keys.push(key);
        }
        if user_claim.is_empty() {
            return Err(KeyError::EmptyUserClaim);
        }
        Ok(Verifier {
            keys,
            issuer: issuer.filter(|s| !s.is_empty()),
            audience: audience.filter(|s| !s.is_empty()),
            user_claim,
        })
    }

    /// Checks `token` (signature, `exp`, `nbf`, and `iss`/`aud` when configured) and returns
    /// who it says the peer is.
    pub fn verify(&self, token: &str) -> Result<Identity, TokenError> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(TokenError::TooLong);
        }
        let header = jsonwebtoken::decode_header(token).map_err(|_| TokenError::Malformed)?;
        let key = self
            .keys
            .iter()
            .find(|key| key.family().algorithms().contains(&header.alg))
            .ok_or(TokenError::Algorithm(header.alg))?;
        let claims =
            jsonwebtoken::decode::<Map<String, Value>>(token, key, &self.validation(header.alg))
                .map_err(|e| token_error(e.into_kind()))?
                .claims;
        self.identity(&claims)
    }

    /// The rules for a token signed with `alg` (already matched to a key of its family).
    fn validation(&self, alg: Algorithm) -> Validation {
        let mut validation = Validation::new(alg);
        // `exp` and `nbf` are checked when present but required never (SPEC §11); `iss` and
        // `aud` are required when configured.
        validation.required_spec_claims.clear();
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.leeway = LEEWAY_SECS;
        validation.validate_aud = self.audience.is_some();
        if let Some(audience) = &self.audience {
            validation.set_audience(&[audience]);
            validation.required_spec_claims.insert("aud".into());
        }
        if let Some(issuer) = &self.issuer {
            validation.set_issuer(&[issuer]);
            validation.required_spec_claims.insert("iss".into());
        }
        validation
    }

    fn identity(&self, claims: &Map<String, Value>) -> Result<Identity, TokenError> {
        let user = match claims.get(&self.user_claim) {
            Some(Value::String(user)) if !user.is_empty() => Arc::from(user.as_str()),
            Some(Value::String(_)) | None | Some(Value::Null) => {
                return Err(TokenError::MissingClaim(self.user_claim.clone()));
            }
            Some(_) => return Err(TokenError::InvalidClaim(self.user_claim.clone())),
        };
        let mut roles = Vec::new();
        for claim in ROLE_CLAIMS {
            names(claims, claim, &mut roles)?;
        }
        let mut groups = Vec::new();
        names(claims, "groups", &mut groups)?;
        // Checked by `decode` already when present; here only read, as a number of seconds.
        let expires_at = match claims.get("exp") {
            Some(exp) => Some(
                exp.as_u64()
                    .or_else(|| exp.as_f64().filter(|s| *s >= 0.0).map(|s| s as u64))
                    .map(|secs| UNIX_EPOCH + Duration::from_secs(secs.saturating_add(LEEWAY_SECS)))
                    .ok_or_else(|| TokenError::InvalidClaim("exp".into()))?,
            ),
            None => None,
        };
        Ok(Identity {
            user,
            roles,
            groups,
            expires_at,
        })
    }
}

/// Appends the names in `claim` (a string, or an array of strings) to `out`, skipping ones
/// already there.
fn names(
    claims: &Map<String, Value>,
    claim: &str,
    out: &mut Vec<String>,
) -> Result<(), TokenError> {
    let mut add = |name: &str| {
        if !out.iter().any(|n| n == name) {
            out.push(name.to_string());
        }
    };
    match claims.get(claim) {
        None | Some(Value::Null) => {}
        Some(Value::String(name)) => add(name),
        Some(Value::Array(items)) => {
            for item in items {
                match item {
                    Value::String(name) => add(name),
                    _ => return Err(TokenError::InvalidClaim(claim.to_string())),
                }
            }
        }
        Some(_) => return Err(TokenError::InvalidClaim(claim.to_string())),
    }
    Ok(())
}

/// Is the first PEM block a public key (SPKI `PUBLIC KEY`, or PKCS#1 `RSA PUBLIC KEY`)?
fn is_public_key_pem(pem: &[u8]) -> bool {
    let text = String::from_utf8_lossy(pem);
    let label = text
        .lines()
        .map(str::trim)
        .find_map(|line| line.strip_prefix("-----BEGIN "))
        .and_then(|rest| rest.strip_suffix("-----"));
    matches!(label, Some("PUBLIC KEY" | "RSA PUBLIC KEY"))
}

fn token_error(kind: ErrorKind) -> TokenError {
    match kind {
        ErrorKind::InvalidSignature
        | ErrorKind::InvalidEcdsaKey
        | ErrorKind::InvalidEddsaKey
        | ErrorKind::InvalidRsaKey(_)
        | ErrorKind::InvalidKeyFormat => TokenError::Signature,
        ErrorKind::ExpiredSignature => TokenError::Expired,
        ErrorKind::ImmatureSignature => TokenError::NotYetValid,
        ErrorKind::InvalidIssuer => TokenError::Issuer,
        ErrorKind::InvalidAudience => TokenError::Audience,
        ErrorKind::MissingRequiredClaim(claim) => TokenError::MissingClaim(claim),
        ErrorKind::InvalidClaimFormat(claim) => TokenError::InvalidClaim(claim),
        _ => TokenError::Malformed,
    }
}

/// Does `token` have the form of a JWT: three base64url parts separated by dots (the third,
/// the signature, may be empty, as in an unsigned `alg: none` token, which is then refused
/// rather than passed on)? Jaseci's own tokens don't, and go to a backend as before.
pub fn looks_like_jwt(token: &str) -> bool {
    let mut parts = token.split('.');
    let (Some(header), Some(payload), Some(signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return false;
    };
    let base64url = |part: &str| {
        part.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    };
    !header.is_empty()
        && !payload.is_empty()
        && base64url(header)
        && base64url(payload)
        && base64url(signature)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jwt_shape() {
        assert!(looks_like_jwt("eyJh.eyJz.c2ln"));
        assert!(looks_like_jwt("eyJh.eyJz."));
        assert!(!looks_like_jwt("tok-alice-7f3a"));
        assert!(!looks_like_jwt("a.b"));
        assert!(!looks_like_jwt("a.b.c.d"));
        assert!(!looks_like_jwt(".b.c"));
        assert!(!looks_like_jwt("a b.c.d"));
        assert!(!looks_like_jwt("a+b.c.d"));
    }

    #[test]
    fn empty_secret_and_bad_pem_are_refused() {
        let new = |secret, pem| Verifier::new(secret, pem, None, None, "sub".into());
        assert!(matches!(new(Some(""), None), Err(KeyError::EmptySecret)));
        assert!(matches!(
            new(None, Some(b"not a pem".as_slice())),
            Err(KeyError::PublicKey)
        ));
    }
}
