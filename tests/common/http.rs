//! Ordinary HTTP requests to the server (the API, `/healthz`, `/console`, `/metrics`) through
//! hyper's client. A test that sends malformed or partial HTTP on purpose (an attack) writes
//! its bytes on a raw TCP stream itself: that is not what a client does.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper::header::{CONNECTION, CONTENT_LENGTH, HeaderMap};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;
use tokio::time::timeout;

use super::{PASSWORD, RECV_TIMEOUT};

/// One whole HTTP response: status, headers and body.
#[derive(Debug)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl HttpResponse {
    /// The first header named `name` (case-insensitive), when it is visible ASCII.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    pub fn text(&self) -> String {
        String::from_utf8(self.body.to_vec()).expect("HTTP body is UTF-8")
    }

    /// The body parsed as JSON; panics (showing it) when it is not.
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("HTTP body is not JSON ({e}): {:?}", self.text()))
    }
}

/// Sends one HTTP/1.1 request on a connection of its own and reads the whole response, all
/// within [`RECV_TIMEOUT`].
pub async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> HttpResponse {
    http_exchange(addr, None, method, path, headers, body, RECV_TIMEOUT).await
}

/// [`http`] from the local address `source` (see [`super::Conn::connect_from`]).
pub async fn http_from(
    addr: SocketAddr,
    source: IpAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> HttpResponse {
    http_exchange(
        addr,
        Some(source),
        method,
        path,
        headers,
        body,
        RECV_TIMEOUT,
    )
    .await
}

/// [`http_from`] with a longer bound, for a request that waits its turn behind others on
/// purpose (a password queued behind a flood's bcrypt checks: seconds on a loaded machine).
#[allow(dead_code)]
pub async fn http_from_within(
    limit: Duration,
    addr: SocketAddr,
    source: IpAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> HttpResponse {
    http_exchange(addr, Some(source), method, path, headers, body, limit).await
}

async fn http_exchange(
    addr: SocketAddr,
    source: Option<IpAddr>,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
    limit: Duration,
) -> HttpResponse {
    let mut connector = HttpConnector::new();
    connector.set_local_address(source);
    connector.set_nodelay(true);
    // No pooled connection, and `Connection: close`: each request is one connection that
    // ends with its answer, so no idle keep-alive connection of the test's own counts against
    // the server's per-address and total connection limits that the tests measure.
    let client = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(0)
        .build::<_, Full<Bytes>>(connector);
    let mut request = Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"))
        .header(CONNECTION, "close");
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    if body.is_empty() && method == "POST" {
        // What a client says of an empty POST body (hyper sends no length for it).
        request = request.header(CONTENT_LENGTH, "0");
    }
    let request = request
        .body(Full::new(Bytes::copy_from_slice(body)))
        .unwrap_or_else(|e| panic!("HTTP {method} {path}: invalid request: {e}"));
    let exchange = async {
        let response = client
            .request(request)
            .await
            .map_err(|e| format!("{e:?}"))?;
        let (head, body) = response.into_parts();
        let body = body.collect().await.map_err(|e| format!("{e:?}"))?;
        Ok::<_, String>(HttpResponse {
            status: head.status.as_u16(),
            headers: head.headers,
            body: body.to_bytes(),
        })
    };
    timeout(limit, exchange)
        .await
        .unwrap_or_else(|_| panic!("HTTP {method} {path}: no complete answer within {limit:?}"))
        .unwrap_or_else(|e| panic!("HTTP {method} {path}: no answer: {e}"))
}

/// `POST /api/<event>` with `body`, authorised by `Authorization: Bearer <PASSWORD>`.
pub async fn api_post(addr: SocketAddr, event: &str, body: &str) -> HttpResponse {
    let auth = format!("Bearer {PASSWORD}");
    http(
        addr,
        "POST",
        &format!("/api/{event}"),
        &[
            ("Authorization", auth.as_str()),
            ("Content-Type", "application/json"),
        ],
        body.as_bytes(),
    )
    .await
}
