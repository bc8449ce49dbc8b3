//! One WebSocket connection to the server and bounded waits on what arrives on it.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use futures_util::future::select_all;
use futures_util::{FutureExt, SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::{Bytes, Error as WsError, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream, connect_async};

use super::{RECV_TIMEOUT, SILENCE, assert_error_shape};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// What came instead of a text frame.
#[derive(Debug)]
pub enum Event {
    Text(String),
    Binary(Bytes),
    Close(Option<(u16, String)>),
    /// The stream ended or failed without a close frame.
    Gone(String),
}

/// The upgrade request for `url`, with header `auth: <password>` when given.
pub fn upgrade_request(
    url: &str,
    password: Option<&str>,
) -> tokio_tungstenite::tungstenite::handshake::client::Request {
    let mut request = url.into_client_request().expect("valid ws url");
    if let Some(password) = password {
        request.headers_mut().insert(
            "auth",
            HeaderValue::from_str(password).expect("header value"),
        );
    }
    request
}

/// Sends the upgrade `request`, which must be refused with an HTTP answer: returns its status
/// and body.
pub async fn upgrade_refused(
    request: tokio_tungstenite::tungstenite::handshake::client::Request,
    name: &str,
) -> (u16, String) {
    match timeout(RECV_TIMEOUT, connect_async(request)).await {
        Err(_) => panic!("{name}: WebSocket handshake timed out"),
        Ok(Ok(_)) => panic!("{name}: upgrade accepted, expected a refusal"),
        Ok(Err(WsError::Http(response))) => {
            let body = response.body().as_deref().unwrap_or_default();
            (
                response.status().as_u16(),
                String::from_utf8_lossy(body).into_owned(),
            )
        }
        Ok(Err(e)) => panic!("{name}: upgrade failed without an HTTP answer: {e}"),
    }
}

/// A TCP connection to `server` from the local address `source`.
pub async fn connect_tcp_from(server: SocketAddr, source: IpAddr) -> TcpStream {
    let socket = match source {
        IpAddr::V4(_) => tokio::net::TcpSocket::new_v4(),
        IpAddr::V6(_) => tokio::net::TcpSocket::new_v6(),
    }
    .expect("a TCP socket");
    socket
        .bind(SocketAddr::new(source, 0))
        .unwrap_or_else(|e| panic!("bind {source}: {e}"));
    socket
        .connect(server)
        .await
        .unwrap_or_else(|e| panic!("connect {server} from {source}: {e}"))
}

/// One WebSocket connection to the server, named for failure messages. `id` is its
/// connection id once known (after [`super::register`]).
pub struct Conn {
    pub name: String,
    pub id: Option<String>,
    ws: Ws,
}

impl Conn {
    /// Connects to `url`, with header `auth: <password>` when given.
    pub async fn connect(url: &str, password: Option<&str>, name: &str) -> Conn {
        Conn::connect_request(upgrade_request(url, password), name).await
    }

    /// Connects with a prepared upgrade request (a query string, extra headers).
    pub async fn connect_request(
        request: tokio_tungstenite::tungstenite::handshake::client::Request,
        name: &str,
    ) -> Conn {
        let (ws, response) = timeout(RECV_TIMEOUT, connect_async(request))
            .await
            .unwrap_or_else(|_| panic!("{name}: WebSocket handshake timed out"))
            .unwrap_or_else(|e| panic!("{name}: WebSocket handshake failed: {e}"));
        assert_eq!(response.status(), 101, "{name}: upgrade refused");
        Conn {
            name: name.to_string(),
            id: None,
            ws,
        }
    }

    /// Like [`Conn::connect`] to the server at `server` (path `/ws`), but from the local
    /// address `source`, so the server sees another peer address (all of 127.0.0.0/8 is
    /// loopback on Linux).
    pub async fn connect_from(
        server: SocketAddr,
        source: IpAddr,
        password: Option<&str>,
        name: &str,
    ) -> Conn {
        let request = upgrade_request(&format!("ws://{server}/ws"), password);
        let handshake = async {
            let stream = connect_tcp_from(server, source).await;
            tokio_tungstenite::client_async(request, MaybeTlsStream::Plain(stream)).await
        };
        let (ws, response) = timeout(RECV_TIMEOUT, handshake)
            .await
            .unwrap_or_else(|_| panic!("{name}: WebSocket handshake timed out"))
            .unwrap_or_else(|e| panic!("{name}: WebSocket handshake failed: {e}"));
        assert_eq!(response.status(), 101, "{name}: upgrade refused");
        Conn {
            name: name.to_string(),
            id: None,
            ws,
        }
    }

    /// The connection id; panics when not learned yet.
    pub fn id(&self) -> &str {
        self.id
            .as_deref()
            .unwrap_or_else(|| panic!("{}: connection id not known yet", self.name))
    }

    pub async fn send_text(&mut self, text: &str) {
        self.send_message(Message::text(text)).await;
    }

    pub async fn send_json(&mut self, value: &Value) {
        self.send_text(&value.to_string()).await;
    }

    pub async fn send_binary(&mut self, bytes: impl Into<Bytes>) {
        self.send_message(Message::binary(bytes)).await;
    }

    pub async fn send_message(&mut self, message: Message) {
        let name = &self.name;
        timeout(RECV_TIMEOUT, self.ws.send(message))
            .await
            .unwrap_or_else(|_| panic!("{name}: send timed out"))
            .unwrap_or_else(|e| panic!("{name}: send failed: {e}"));
    }

    /// Sends `text` unless the connection is gone or the send stalls for [`RECV_TIMEOUT`]:
    /// `false` then. For floods that the server is expected to cut off midway.
    pub async fn try_send_text(&mut self, text: &str) -> bool {
        matches!(
            timeout(RECV_TIMEOUT, self.ws.send(Message::text(text))).await,
            Ok(Ok(()))
        )
    }

    /// Sends `{"type": kind, "data": data}`.
    pub async fn send_event(&mut self, kind: &str, data: Value) {
        self.send_json(&json!({"type": kind, "data": data})).await;
    }

    /// The next data or close event, skipping pings and pongs; `None` on timeout.
    pub async fn next_event(&mut self, within: Duration) -> Option<Event> {
        timeout(within, self.next_event_unbounded()).await.ok()
    }

    async fn next_event_unbounded(&mut self) -> Event {
        loop {
            match self.ws.next().await {
                None => return Event::Gone("stream ended".into()),
                Some(Err(e)) => return Event::Gone(describe(&e)),
                Some(Ok(Message::Text(text))) => return Event::Text(text.to_string()),
                Some(Ok(Message::Binary(bytes))) => return Event::Binary(bytes),
                Some(Ok(Message::Close(frame))) => {
                    return Event::Close(frame.map(|f| (u16::from(f.code), f.reason.to_string())));
                }
                Some(Ok(_)) => continue,
            }
        }
    }

    /// The next text frame as raw text; panics on timeout, close, or a binary frame (the
    /// server must send text frames only).
    pub async fn recv_text(&mut self) -> String {
        match self.next_event(RECV_TIMEOUT).await {
            Some(Event::Text(text)) => text,
            None => panic!(
                "{}: no message within {RECV_TIMEOUT:?} (expected a text frame)",
                self.name
            ),
            Some(other) => panic!("{}: expected a text frame, got {other:?}", self.name),
        }
    }

    /// The next text frame parsed as JSON.
    pub async fn recv(&mut self) -> Value {
        let text = self.recv_text().await;
        serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{}: received non-JSON text {text:?}: {e}", self.name))
    }

    /// Asserts the next text frame is exactly `expected` (byte for byte: key order matters).
    pub async fn expect_text(&mut self, expected: &str) {
        let got = self.recv_text().await;
        assert_eq!(got, expected, "{}: unexpected frame", self.name);
    }

    /// Asserts the next frame is an error with `code` about `event`; returns its data.
    pub async fn expect_error(&mut self, code: &str, event: Option<&str>) -> Value {
        let got = self.recv().await;
        assert_error_shape(&got, &self.name);
        assert_eq!(
            got["data"]["code"], code,
            "{}: wrong error code in {got}",
            self.name
        );
        assert_eq!(
            got["data"]["event"],
            event.map_or(Value::Null, Value::from),
            "{}: wrong error event in {got}",
            self.name
        );
        got["data"].clone()
    }

    /// Asserts that nothing arrives (no frame, no close) within [`SILENCE`].
    pub async fn expect_silence(&mut self) {
        if let Some(event) = self.next_event(SILENCE).await {
            panic!(
                "{}: expected nothing within {SILENCE:?}, got {event:?}",
                self.name
            );
        }
    }

    /// Waits for the server's close frame and returns its code and reason; panics if a data
    /// frame comes first or the connection ends without one.
    pub async fn expect_close(&mut self) -> (u16, String) {
        match self.next_event(RECV_TIMEOUT).await {
            Some(Event::Close(Some(close))) => {
                // Send the queued answering close frame now, completing the handshake as a
                // well-behaved peer does, so the server need not wait for it.
                let _ = timeout(SILENCE, self.ws.flush()).await;
                close
            }
            None => panic!("{}: no close frame within {RECV_TIMEOUT:?}", self.name),
            Some(other) => panic!("{}: expected a close frame, got {other:?}", self.name),
        }
    }

    /// Asserts a close with `code`; returns the reason.
    pub async fn expect_close_code(&mut self, code: u16) -> String {
        let (got, reason) = self.expect_close().await;
        assert_eq!(
            got, code,
            "{}: wrong close code (reason {reason:?})",
            self.name
        );
        reason
    }

    /// Sends `server_connect` and expects exactly `{"type":"server_connect","data":true}`.
    pub async fn server_connect(&mut self) {
        self.send_text(r#"{"type":"server_connect","data":{}}"#)
            .await;
        self.expect_text(r#"{"type":"server_connect","data":true}"#)
            .await;
    }

    /// Proves the connection is still served: `notify_client` to itself with a callback.
    /// An acknowledged client gets the payload and then the callback; an admin that is not
    /// a registered client gets only the callback.
    pub async fn ping(&mut self, n: u64, acknowledged_client: bool) {
        self.send_text(&format!(
            r#"{{"type":"notify_client","data":{{"data":{{"ping":{n}}},"callback":{{"pong":{n}}}}}}}"#
        ))
        .await;
        if acknowledged_client {
            self.expect_text(&format!(r#"{{"ping":{n}}}"#)).await;
        }
        self.expect_text(&format!(r#"{{"type":"callback","data":{{"pong":{n}}}}}"#))
            .await;
    }

    /// Closes from our side and waits (bounded) for the server's answering close frame,
    /// after which the server has removed this connection.
    pub async fn close(mut self) {
        let name = self.name.clone();
        timeout(RECV_TIMEOUT, self.ws.close(None))
            .await
            .unwrap_or_else(|_| panic!("{name}: close timed out"))
            .unwrap_or_else(|e| panic!("{name}: close failed: {e}"));
        let answered = timeout(RECV_TIMEOUT, async {
            while let Some(Ok(_)) = self.ws.next().await {}
        })
        .await;
        assert!(answered.is_ok(), "{name}: server did not answer the close");
    }
}

fn describe(e: &WsError) -> String {
    e.to_string()
}

/// Waits for the next text frame on any of `conns`; returns which one got it and the text.
pub async fn recv_any(conns: &mut [&mut Conn]) -> (usize, String) {
    let names: Vec<String> = conns.iter().map(|c| c.name.clone()).collect();
    let futures = conns
        .iter_mut()
        .map(|c| c.next_event_unbounded().boxed())
        .collect::<Vec<_>>();
    match timeout(RECV_TIMEOUT, select_all(futures)).await {
        Ok((Event::Text(text), i, _)) => (i, text),
        Ok((other, i, _)) => panic!("{}: expected a text frame, got {other:?}", names[i]),
        Err(_) => panic!("none of {names:?} received anything within {RECV_TIMEOUT:?}"),
    }
}

/// Asserts that nothing arrives on any of `conns` within [`SILENCE`], watching them all at
/// once.
pub async fn expect_silence_all(conns: &mut [&mut Conn]) {
    futures_util::future::join_all(conns.iter_mut().map(|c| c.expect_silence())).await;
}
