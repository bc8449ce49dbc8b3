//! The HTTP publish API, for backends that would rather not hold a socket:
//! `POST /api/notify_client`, `/api/notify_group`, `/api/notify_all`, `/api/publish` (and
//! `/api/invoke_result`, a backend answering a client's call), with the
//! event's `data` as the JSON body. Authorised by the admin password in `Authorization: Bearer`
//! or `auth:`; answers `{"delivered": N}`. The events' own parse and deliver code does the
//! work, so a notification sent here is exactly one sent over a WebSocket.
//!
//! The answered admin events of SPEC §12 ([`Event::is_answered`]: `info`, `users`, …) are
//! here too: `GET /api/<name>` (no data) or `POST /api/<name>` with the event's `data` as the
//! body; the answer's body is the result itself, by the same code as over a WebSocket.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::{Body, to_bytes};
use axum::extract::{ConnectInfo, Path, Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::value::RawValue;

use crate::auth::Verdict;
use crate::delivery::Sender;
use crate::events::{InvokeResult, NotifyAll, NotifyClient, NotifyGroup, Publish};
use crate::kinds::Event;
use crate::protocol::{Data, ProtocolError};
use crate::relay::Relay;
use crate::warn_throttled;

pub async fn handle(
    State(shared): State<Arc<Relay>>,
    ConnectInfo(addr): ConnectInfo<SocketAddr>,
    Path(event): Path<String>,
    request: Request,
) -> Response {
    let event = match Event::from_name(&event) {
        Some(
            event @ (Event::NotifyClient
            | Event::NotifyGroup
            | Event::NotifyAll
            | Event::Publish
            | Event::InvokeResult),
        ) => event,
        Some(event) if event.is_answered() => event,
        _ => {
            return (
                StatusCode::NOT_FOUND,
                "404: the API has notify_client, notify_group, notify_all, publish, \
                 invoke_result, info, users, connections, channels, membership, disconnect and history\n",
            )
                .into_response();
        }
    };
    let get = request.method() == Method::GET;
    if get && !event.is_answered() {
        return (
            StatusCode::METHOD_NOT_ALLOWED,
            [(header::ALLOW, "POST")],
            format!("405: {} is sent with POST\n", event.name()),
        )
            .into_response();
    }
    if let Err(refusal) = authorize(&shared, request.headers(), addr, event.name()).await {
        return refusal;
    }
    // Bounded in size and in time: a body that never arrives must not hold the connection
    // (and its place in the TCP budget) open; `--handshake-timeout` bounds it as it bounds
    // the request head.
    let limit = shared.config.max_message_size;
    let within = shared.config.handshake_timeout;
    let body =
        match tokio::time::timeout(within, to_bytes(Body::new(request.into_body()), limit)).await {
            Ok(Ok(body)) => body,
            Ok(Err(_)) => {
                return (
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("413: the body is over --max-message-size ({limit} bytes)\n"),
                )
                    .into_response();
            }
            Err(_) => {
                return (
                    StatusCode::REQUEST_TIMEOUT,
                    [(header::CONNECTION, "close")],
                    format!(
                        "408: the body did not arrive within --handshake-timeout ({} s)\n",
                        within.as_secs()
                    ),
                )
                    .into_response();
            }
        };
    shared.metrics.received(Some(event), body.len());
    if event.is_answered() {
        return answered(&shared, event, &body).await;
    }
    let started = std::time::Instant::now();
    let delivered = deliver(&shared, event, &body);
    shared
        .metrics
        .fanout_seconds
        .observe(started.elapsed().as_secs_f64());
    match delivered {
        Ok(delivered) => (
            StatusCode::OK,
            // Counted on this node: the other nodes deliver on their own and report nothing
            // back (a count across the cluster would make every call wait for all of them).
            // The body is SPEC §8's; the header says what the count covers.
            [
                (header::CONTENT_TYPE, "application/json"),
                (HeaderName::from_static("x-delivered-scope"), "node"),
            ],
            format!("{{\"delivered\":{delivered}}}"),
        )
            .into_response(),
        Err(e) => {
            shared.metrics.error(e.code());
            error(StatusCode::BAD_REQUEST, &e, event.name())
        }
    }
}

/// An answered event (SPEC §12): the result is the body. An empty body (and a `GET`) is no
/// data.
async fn answered(shared: &Arc<Relay>, event: Event, body: &[u8]) -> Response {
    let result = match json_body(body) {
        Ok(raw) => crate::events::answer(shared, event, Data(raw))
            .await
            .unwrap_or(Err(ProtocolError::InvalidType)),
        Err(e) => Err(e),
    };
    match result {
        Ok(text) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/json")],
            text,
        )
            .into_response(),
        Err(e) => {
            shared.metrics.error(e.code());
            if matches!(e, ProtocolError::RateLimited(_)) {
                let mut response = error(StatusCode::TOO_MANY_REQUESTS, &e, event.name());
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
                return response;
            }
            error(StatusCode::BAD_REQUEST, &e, event.name())
        }
    }
}

/// The body as one JSON value; `None` when empty.
fn json_body(body: &[u8]) -> Result<Option<&RawValue>, ProtocolError> {
    let text = std::str::from_utf8(body)
        .map_err(|_| ProtocolError::InvalidJson("body is not UTF-8".into()))?;
    if text.trim().is_empty() {
        return Ok(None);
    }
    serde_json::from_str(text)
        .map(Some)
        .map_err(|e| ProtocolError::InvalidJson(e.to_string()))
}

fn deliver(shared: &Relay, event: Event, body: &[u8]) -> Result<usize, ProtocolError> {
    let text = std::str::from_utf8(body)
        .map_err(|_| ProtocolError::InvalidJson("body is not UTF-8".into()))?;
    let raw: &RawValue =
        serde_json::from_str(text).map_err(|e| ProtocolError::InvalidJson(e.to_string()))?;
    let data = Data(Some(raw));
    let delivery = match event {
        Event::NotifyClient => {
            let event = NotifyClient::parse(data)?;
            if !event.has_target() {
                return Err(ProtocolError::MissingField("target"));
            }
            event.delivery("")
        }
        Event::NotifyGroup => NotifyGroup::parse(data)?.delivery(),
        Event::NotifyAll => NotifyAll::parse(data)?.delivery(),
        // A backend that got the call over its socket may answer from anywhere.
        Event::InvokeResult => InvokeResult::parse(data)?.delivery(),
        _ => Publish::parse(data)?.delivery(),
    };
    shared.deliver(delivery, Sender::Admin)
}

/// Checks the admin password of an HTTP request (the API, and `/metrics` with
/// `--metrics-auth on`): `Err` is the answer to send instead, 401 for a missing or wrong
/// password, 503 with `Retry-After` when verification is busy (the password was not judged).
/// `event` names what was asked for in the JSON error.
pub(crate) async fn authorize(
    shared: &Relay,
    headers: &HeaderMap,
    addr: SocketAddr,
    event: &str,
) -> Result<(), Response> {
    let Some(password) = password(headers) else {
        return Err(error(
            StatusCode::UNAUTHORIZED,
            &ProtocolError::Unauthorized,
            event,
        ));
    };
    match shared.auth.verify(&password, addr.ip()).await {
        Verdict::Admin => Ok(()),
        Verdict::Busy => {
            warn_throttled!(%addr, "HTTP: admin authentication busy: too many verifications waiting");
            let mut response = error(
                StatusCode::SERVICE_UNAVAILABLE,
                &ProtocolError::RateLimited(
                    "authentication busy: too many password verifications waiting, retry",
                ),
                event,
            );
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            Err(response)
        }
        Verdict::WrongPassword => {
            shared.metrics.auth_failures.inc();
            // Throttled: wrong passwords cost nothing once the right one is known.
            warn_throttled!(%addr, "HTTP: wrong admin password");
            Err(error(
                StatusCode::UNAUTHORIZED,
                &ProtocolError::Unauthorized,
                event,
            ))
        }
    }
}

/// The password from `Authorization: Bearer <password>` or `auth: <password>`.
fn password(headers: &HeaderMap) -> Option<String> {
    if let Some(value) = headers.get(header::AUTHORIZATION) {
        let value = String::from_utf8_lossy(value.as_bytes());
        let (scheme, token) = value.split_once(' ')?;
        return scheme
            .eq_ignore_ascii_case("bearer")
            .then(|| token.trim().to_string());
    }
    headers
        .get("auth")
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
}

/// `{"error":{"code":…,"message":…,"event":…}}` with the given status.
fn error(status: StatusCode, error: &ProtocolError, event: &str) -> Response {
    let frame = error.to_frame(Some(event));
    // The WebSocket error event is {"type":"error","data":{…}}; the API answers {"error":{…}}.
    let body = frame
        .as_str()
        .strip_prefix("{\"type\":\"error\",\"data\":")
        .and_then(|rest| rest.strip_suffix('}'))
        .map(|data| format!("{{\"error\":{data}}}"))
        .unwrap_or_else(|| "{\"error\":{}}".to_string());
    (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}
