//! SignalR clients (SPEC §10): ASP.NET Core's JSON hub protocol over WebSockets, next to
//! jssocket's own protocol on the same hub, so Magic-style frontends connect unchanged.
//!
//! - this file: the negotiation (`POST <path>/negotiate`) and its table of connection tokens
//!   waiting for their WebSocket, the authentication seam, and how deliveries read for a
//!   SignalR connection ([`Form`], [`encode`]).
//! - [`protocol`]: the handshake and the record-separated messages a client sends.
//! - [`connection`]: one SignalR WebSocket: handshake, reader, writer, keep-alive, close.
//!
//! The protocol is specified by dotnet/aspnetcore `src/SignalR/docs/specs/HubProtocol.md` and
//! `TransportProtocols.md`. Only the WebSockets transport and the Text transfer format are
//! offered; only the `json` hub protocol, version 1.

pub mod connection;
pub mod protocol;

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::value::RawValue;
use tokio_tungstenite::tungstenite::Utf8Bytes;
use uuid::Uuid;

use crate::protocol::push_json_string;
use crate::relay::Relay;

/// The record separator that ends every SignalR message (handshake included).
pub const RS: char = '\u{1e}';

/// The handshake's answer when it is accepted.
pub const HANDSHAKE_OK: &str = "{}\u{1e}";

/// The server's keep-alive message.
pub const PING: &str = "{\"type\":6}\u{1e}";

/// How long a negotiated connection token opens its WebSocket: the client opens it right
/// after negotiating.
pub const NEGOTIATION_TTL: Duration = Duration::from_secs(30);

/// How a frame made for jssocket connections reads for a SignalR connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Form {
    /// A `notify_*` frame (the bare payload): an invocation of `--signalr-notify-method`.
    /// Which notify it is matters only to connections that asked for labels
    /// ([`crate::peer::Wire::Labelled`]).
    Notify(Notice),
    /// A `publish` frame (`{"type":"publish","data":{"name":N,"data":P}}`): an invocation
    /// of `N`.
    Publish,
}

/// Which event delivered a bare payload: what a labelled connection is told
/// (`{"type":"notify_client"|"notify_group"|"notify_all","data":<payload>}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Notice {
    Client,
    Group,
    All,
}

impl Notice {
    pub fn name(self) -> &'static str {
        match self {
            Notice::Client => "notify_client",
            Notice::Group => "notify_group",
            Notice::All => "notify_all",
        }
    }
}

/// A delivery's frame as a connection that asked for labels reads it (`?labels=1` at the
/// upgrade, see [`crate::peer::Wire::Labelled`]): a bare `notify_*` payload wrapped in an
/// envelope naming the event; a publish frame is already one, and is shared unchanged.
pub fn labelled(form: Form, frame: &Utf8Bytes) -> Utf8Bytes {
    match form {
        Form::Notify(notice) => crate::protocol::event_frame(notice.name(), frame),
        Form::Publish => frame.clone(),
    }
}

/// A delivery's frame as a SignalR invocation `{"type":1,"target":T,"arguments":[S]}` + RS,
/// where `S` is the payload serialised as a JSON string (Magic's convention). `None` when
/// the frame is not of the form it claims (a publish frame always is: the relay made it).
pub fn encode(form: Form, frame: &str, notify_method: &str) -> Option<Utf8Bytes> {
    match form {
        Form::Notify(_) => Some(invocation(notify_method, frame)),
        Form::Publish => {
            #[derive(Deserialize)]
            struct Frame<'a> {
                #[serde(borrow)]
                data: Data<'a>,
            }
            #[derive(Deserialize)]
            struct Data<'a> {
                name: std::borrow::Cow<'a, str>,
                #[serde(borrow)]
                data: &'a RawValue,
            }
            let frame: Frame<'_> = serde_json::from_str(frame).ok()?;
            Some(invocation(&frame.data.name, frame.data.data.get()))
        }
    }
}

/// `{"type":1,"target":<target>,"arguments":[<payload as a JSON string>]}` + RS.
pub fn invocation(target: &str, payload: &str) -> Utf8Bytes {
    let mut out = String::with_capacity(payload.len() + target.len() + 48);
    out.push_str("{\"type\":1,\"target\":");
    push_json_string(&mut out, target);
    out.push_str(",\"arguments\":[");
    push_json_string(&mut out, payload);
    out.push_str("]}");
    out.push(RS);
    Utf8Bytes::from(out)
}

/// Why a client is refused before its WebSocket opens (401 at negotiate).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal(pub &'static str);

/// Judges the token of a negotiate request (SPEC §11), read as at the upgrade
/// ([`crate::server::upgrade_token`]): no keys configured or no token, let in (anonymous); a
/// token that does not verify, refused. (The upgrade itself judges its token in
/// `server::upgrade`, for SignalR and jssocket clients alike.)
pub fn authenticate(relay: &Relay, uri: &Uri, headers: &HeaderMap) -> Result<(), Refusal> {
    let Some(verifier) = &relay.config.jwt else {
        return Ok(());
    };
    match crate::server::upgrade_token(uri, headers) {
        None => Ok(()),
        Some(token) => verifier
            .verify(&token)
            .map(|_| ())
            .map_err(|_| Refusal("invalid token")),
    }
}

/// Connection tokens handed out by negotiate. They hold what they stand for: the connection
/// id and when it was negotiated, signed with a key made at start. Nothing is stored per
/// negotiation, so anyone may negotiate as often as they like without filling a table and
/// locking others out; a token is good for [`NEGOTIATION_TTL`] on this node, and opens no
/// connection while one with its id is open (see `server::signalr_connection`).
pub struct Negotiations {
    key: [u8; 32],
    started: Instant,
}

impl Default for Negotiations {
    fn default() -> Negotiations {
        Negotiations::new()
    }
}

type Mac = hmac::Hmac<sha2::Sha256>;

/// Bytes of a token's signature (truncated HMAC-SHA256: 128 bits).
const TOKEN_MAC: usize = 16;

impl Negotiations {
    pub fn new() -> Negotiations {
        let mut key = [0u8; 32];
        if getrandom::fill(&mut key).is_err() {
            // No randomness from the system: tokens made now would be guessable, so none
            // made now verifies (a fresh random-looking key from the clock is not a secret).
            tracing::warn!("no system randomness: SignalR negotiation tokens will not verify");
        }
        Negotiations {
            key,
            started: Instant::now(),
        }
    }

    fn mac(&self, body: &[u8]) -> [u8; TOKEN_MAC] {
        use hmac::{KeyInit, Mac as _};
        let Ok(mut mac) = Mac::new_from_slice(&self.key) else {
            unreachable!("HMAC takes keys of any length");
        };
        mac.update(body);
        let mut out = [0u8; TOKEN_MAC];
        out.copy_from_slice(&mac.finalize().into_bytes()[..TOKEN_MAC]);
        out
    }

    /// A token for connection `id`: hex of id (16 bytes), milliseconds since start (8), MAC.
    pub fn issue(&self, id: Uuid) -> String {
        let mut body = [0u8; 24];
        body[..16].copy_from_slice(id.as_bytes());
        let at = self.started.elapsed().as_millis() as u64;
        body[16..].copy_from_slice(&at.to_be_bytes());
        let mut token = hex::encode(body);
        token.push_str(&hex::encode(self.mac(&body)));
        token
    }

    /// The connection id `token` was issued for, if it is this node's and not too old.
    pub fn open(&self, token: &str) -> Option<Uuid> {
        use hmac::{KeyInit, Mac as _};
        let mut raw = [0u8; 24 + TOKEN_MAC];
        hex::decode_to_slice(token, &mut raw).ok()?;
        let (body, signature) = raw.split_at(24);
        let Ok(mut mac) = Mac::new_from_slice(&self.key) else {
            unreachable!("HMAC takes keys of any length");
        };
        mac.update(body);
        // Compared in constant time.
        mac.verify_truncated_left(signature).ok()?;
        let at = u64::from_be_bytes(body[16..24].try_into().ok()?);
        let age = (self.started.elapsed().as_millis() as u64).checked_sub(at)?;
        if age >= NEGOTIATION_TTL.as_millis() as u64 {
            return None;
        }
        Uuid::from_slice(&body[..16]).ok()
    }
}

#[derive(Deserialize)]
pub struct NegotiateQuery {
    #[serde(rename = "negotiateVersion", default)]
    negotiate_version: Option<String>,
}

/// The request headers the SignalR JS client sends on negotiate (its `fetch` with
/// `withCredentials`, an access token, its user agent), allowed in a preflight.
const CORS_HEADERS: &str = "authorization, x-requested-with, x-signalr-user-agent, content-type";

/// How long a browser may reuse a preflight's answer (seconds).
const CORS_MAX_AGE: &str = "600";

/// A page on another origin negotiating from a browser: the origin policy is the upgrade's
/// (`--allowed-origins`, see `server::origin_allowed`), so a page allowed to open the
/// WebSocket may negotiate it, and one that is not gets 403 here as it would there. A
/// request without `Origin` (not from a browser page) needs no CORS headers. Allowed, the
/// origin is echoed (never `*`: the client sends credentials) with
/// `Access-Control-Allow-Credentials`.
fn cors(relay: &Relay, headers: &HeaderMap) -> Result<Option<HeaderValue>, OriginRefused> {
    let Some(origin) = headers.get(header::ORIGIN) else {
        return Ok(None);
    };
    if !crate::server::origin_allowed(&relay.config.allowed_origins, headers) {
        return Err(OriginRefused);
    }
    Ok(Some(origin.clone()))
}

/// A negotiation from an origin `--allowed-origins` does not list: 403, as its upgrade.
struct OriginRefused;

impl IntoResponse for OriginRefused {
    fn into_response(self) -> Response {
        (StatusCode::FORBIDDEN, "403 Forbidden: Origin not allowed\n").into_response()
    }
}

/// Adds the CORS answer for `origin` (see [`cors`]) to `response`.
fn allow_origin(mut response: Response, origin: Option<HeaderValue>) -> Response {
    if let Some(origin) = origin {
        let headers = response.headers_mut();
        headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
        headers.insert(
            header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
            HeaderValue::from_static("true"),
        );
        headers.append(header::VARY, HeaderValue::from_static("Origin"));
    }
    response
}

/// `OPTIONS <path>/negotiate`: the CORS preflight a browser sends before negotiating from
/// another origin (the client's `POST` carries `authorization` and `x-signalr-user-agent`).
pub async fn preflight(State(relay): State<Arc<Relay>>, headers: HeaderMap) -> Response {
    let origin = match cors(&relay, &headers) {
        Ok(origin) => origin,
        Err(refused) => return refused.into_response(),
    };
    let mut response = StatusCode::NO_CONTENT.into_response();
    let answer = response.headers_mut();
    answer.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static("POST"),
    );
    answer.insert(
        header::ACCESS_CONTROL_ALLOW_HEADERS,
        HeaderValue::from_static(CORS_HEADERS),
    );
    answer.insert(
        header::ACCESS_CONTROL_MAX_AGE,
        HeaderValue::from_static(CORS_MAX_AGE),
    );
    allow_origin(response, origin)
}

/// `POST <path>/negotiate[?negotiateVersion=1]`: a connection id (the connection's `target`,
/// made now with this node's tag), a token to open the WebSocket with, and WebSockets/Text as
/// the only transport. The answer is version 1 whatever is asked: a version 0 client (whose
/// WebSocket would carry the id itself, ASP.NET Core 2.x) is not served. Every answer
/// carries the CORS headers a browser on an allowed origin needs to read it.
pub async fn negotiate(
    State(relay): State<Arc<Relay>>,
    Query(query): Query<NegotiateQuery>,
    headers: HeaderMap,
    uri: axum::http::Uri,
) -> Response {
    let origin = match cors(&relay, &headers) {
        Ok(origin) => origin,
        Err(refused) => return refused.into_response(),
    };
    allow_origin(answer(&relay, query, &headers, &uri), origin)
}

fn answer(relay: &Relay, query: NegotiateQuery, headers: &HeaderMap, uri: &Uri) -> Response {
    if relay.shutdown.is_cancelled() {
        return (StatusCode::SERVICE_UNAVAILABLE, "503: shutting down\n").into_response();
    }
    if let Err(Refusal(reason)) = authenticate(relay, uri, headers) {
        relay.metrics.error(crate::kinds::Code::InvalidToken);
        return (
            StatusCode::UNAUTHORIZED,
            format!("401 Unauthorized: {reason}\n"),
        )
            .into_response();
    }
    if query
        .negotiate_version
        .is_some_and(|v| v.parse::<u32>().is_err())
    {
        return (
            StatusCode::BAD_REQUEST,
            "400 Bad Request: negotiateVersion must be a number\n",
        )
            .into_response();
    }
    let id = relay.hub.new_id();
    let token = relay.signalr.issue(id);
    let body = format!(
        r#"{{"negotiateVersion":1,"connectionId":"{}","connectionToken":"{token}","availableTransports":[{{"transport":"WebSockets","transferFormats":["Text"]}}]}}"#,
        id.hyphenated()
    );
    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// What a request to the SignalR path that is not a WebSocket upgrade gets: only the
/// WebSockets transport is offered (no long polling, no server-sent events).
pub fn other_transport() -> Response {
    (
        StatusCode::BAD_REQUEST,
        "400 Bad Request: this SignalR endpoint offers the WebSockets transport only \
         (negotiate with POST <path>/negotiate, then open a WebSocket)\n",
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publish_reads_as_an_invocation_of_its_channel() {
        let frame = r#"{"type":"publish","data":{"name":"foo.bar","data":{"a":[1,"x"]}}}"#;
        let encoded = encode(Form::Publish, frame, "notify").map(|f| f.to_string());
        assert_eq!(
            encoded.as_deref(),
            Some(
                "{\"type\":1,\"target\":\"foo.bar\",\"arguments\":[\"{\\\"a\\\":[1,\\\"x\\\"]}\"]}\u{1e}"
            )
        );
    }

    #[test]
    fn a_labelled_notify_names_its_event_and_a_publish_is_unchanged() {
        for (notice, name) in [
            (Notice::Client, "notify_client"),
            (Notice::Group, "notify_group"),
            (Notice::All, "notify_all"),
        ] {
            let frame = Utf8Bytes::from_static(r#"{"type":"error","data":1}"#);
            assert_eq!(
                labelled(Form::Notify(notice), &frame).as_str(),
                format!(r#"{{"type":"{name}","data":{{"type":"error","data":1}}}}"#)
            );
        }
        let publish = Utf8Bytes::from_static(r#"{"type":"publish","data":{"name":"a","data":2}}"#);
        assert_eq!(labelled(Form::Publish, &publish), publish);
    }

    #[test]
    fn notify_reads_as_an_invocation_of_the_notify_method() {
        let encoded =
            encode(Form::Notify(Notice::Client), "\"hi\"", "notify").map(|f| f.to_string());
        assert_eq!(
            encoded.as_deref(),
            Some("{\"type\":1,\"target\":\"notify\",\"arguments\":[\"\\\"hi\\\"\"]}\u{1e}")
        );
    }

    #[test]
    fn a_token_opens_its_own_id_and_nothing_else() {
        let negotiations = Negotiations::new();
        let id = Uuid::new_v4();
        let token = negotiations.issue(id);
        assert_eq!(negotiations.open(&token), Some(id));
        // Another node's (another key's) token, a changed one, garbage: nothing.
        assert_eq!(Negotiations::new().open(&token), None);
        let mut forged = token.clone().into_bytes();
        forged[0] = if forged[0] == b'0' { b'1' } else { b'0' };
        assert_eq!(negotiations.open(&String::from_utf8_lossy(&forged)), None);
        for bad in ["", "t", &token[..token.len() - 2], &format!("{token}00")] {
            assert_eq!(negotiations.open(bad), None, "{bad:?}");
        }
    }
}
