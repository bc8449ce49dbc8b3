//! Shared helpers for the WebSocket integration tests: an in-process server, client and admin
//! connections, and assertions on what arrives (or does not) within bounded time.
//!
//! Every wait is bounded: a frame that does not arrive within [`RECV_TIMEOUT`] fails the test
//! with a message naming the connection, so a broken server never hangs the suite.
#![allow(dead_code)]

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use futures_util::future::select_all;
use futures_util::{FutureExt, SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::{Bytes, Error as WsError, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream, connect_async};

use jssocket::config::Config;

/// The default admin password (the original relay's default hash).
pub const PASSWORD: &str = "12345678";
/// A cheap (cost 4) bcrypt hash of the same [`PASSWORD`]. The default hash costs ~0.5 s per
/// server in a debug build; most tests use this one so the suite stays fast, and the tests
/// that matter use the real default ([`Server::start_default_auth`]).
pub const FAST_HASH: &str = "$2b$04$dODXgGN5PieAre7bihB2aeEbZUa6kaMXEadSzdIWoM/eSGT3GjoJa";
/// Longest wait for a frame that must arrive. Generous: the first admin of a server pays
/// bcrypt (~0.5 s in a debug build) and tests run in parallel.
pub const RECV_TIMEOUT: Duration = Duration::from_secs(5);
/// How long "nothing arrives" is watched for.
pub const SILENCE: Duration = Duration::from_millis(300);
/// Longest wait for a graceful shutdown to finish.
pub const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(10);

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A jssocket server running in this process on an ephemeral port. Dropping it asks it to
/// shut down.
///
/// The server gets its own thread and multi-threaded runtime, as in production: whatever it
/// does (even block a thread) cannot stop the test's own timeouts from firing, so a hung
/// server fails the test with a clear message instead of hanging the suite.
pub struct Server {
    pub addr: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    result: Option<oneshot::Receiver<std::io::Result<()>>>,
}

impl Server {
    /// A server with every option at its default, but the admin password's hash is the
    /// cheap [`FAST_HASH`] (same password).
    pub async fn start() -> Server {
        Server::with_args(&[]).await
    }

    /// A server with every option at its default, the original relay's hash included.
    pub async fn start_default_auth() -> Server {
        let config = Config::default();
        assert!(config.auth_is_default);
        Server::with_config(config).await
    }

    /// A server configured by command-line options, e.g. `&["--client-send", "own"]`;
    /// `--auth` is [`FAST_HASH`] unless given.
    pub async fn with_args(args: &[&str]) -> Server {
        let mut argv = vec!["jssocket", "--host", "127.0.0.1", "--port", "0"];
        if !args.contains(&"--auth") {
            argv.extend_from_slice(&["--auth", FAST_HASH]);
        }
        argv.extend_from_slice(args);
        let config = Config::from_args(argv).expect("test options must be valid");
        Server::with_config(config).await
    }

    pub async fn with_config(config: Config) -> Server {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
        listener
            .set_nonblocking(true)
            .expect("non-blocking listener");
        let addr = listener.local_addr().expect("local address");
        let (shutdown_tx, shutdown_rx) = oneshot::channel::<()>();
        let (result_tx, result_rx) = oneshot::channel();
        std::thread::Builder::new()
            .name(format!("jssocket-{}", addr.port()))
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                    .expect("server runtime");
                let result = runtime.block_on(async move {
                    let listener = tokio::net::TcpListener::from_std(listener)?;
                    jssocket::server::run(listener, config, async move {
                        let _ = shutdown_rx.await;
                    })
                    .await
                });
                let _ = result_tx.send(result);
            })
            .expect("spawn the server thread");
        Server {
            addr,
            shutdown: Some(shutdown_tx),
            result: Some(result_rx),
        }
    }

    pub fn url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }

    /// Asks the server to stop (what SIGTERM does), without waiting.
    pub fn signal_shutdown(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }

    /// Asks the server to stop and waits (bounded) for `run` to return its result.
    pub async fn shutdown(mut self) -> std::io::Result<()> {
        self.signal_shutdown();
        let result = self.result.take().expect("server result");
        match timeout(SHUTDOWN_TIMEOUT, result).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => panic!("the server thread ended without a result (panicked?)"),
            Err(_) => panic!("server did not return within {SHUTDOWN_TIMEOUT:?} of shutdown"),
        }
    }

    /// A connection without `auth` header.
    pub async fn client(&self, name: &str) -> Conn {
        Conn::connect(&self.url(), None, name).await
    }

    /// A connection with the `auth: 12345678` header.
    pub async fn admin(&self, name: &str) -> Conn {
        Conn::connect(&self.url(), Some(PASSWORD), name).await
    }

    /// An admin that joined the server pool (`server_connect` answered `true`).
    pub async fn backend(&self, name: &str) -> Conn {
        let mut conn = self.admin(name).await;
        conn.server_connect().await;
        conn
    }

    /// A client registered through `backend` and acknowledged into group `user` (`None`:
    /// no `user` key, so `public`). Returns it with its id.
    pub async fn acked_client(&self, name: &str, backend: &mut Conn, user: Option<&str>) -> Conn {
        let mut client = self.client(name).await;
        let id = register(&mut client, backend).await;
        acknowledge(backend, &mut client, &id, user).await;
        client
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// What came instead of a text frame.
#[derive(Debug)]
pub enum Event {
    Text(String),
    Binary(Bytes),
    Close(Option<(u16, String)>),
    /// The stream ended or failed without a close frame.
    Gone(String),
}

/// One WebSocket connection to the server, named for failure messages. `id` is its
/// connection id once known (after [`register`]).
fn upgrade_request(
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

pub struct Conn {
    pub name: String,
    pub id: Option<String>,
    ws: Ws,
}

impl Conn {
    /// Connects to `url`, with header `auth: <password>` when given.
    pub async fn connect(url: &str, password: Option<&str>, name: &str) -> Conn {
        let request = upgrade_request(url, password);
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

/// Checks `{"type":"error","data":{"code":<string>,"message":<non-empty string>,
/// "event":<string or null>}}`, keys in that order and no others.
pub fn assert_error_shape(value: &Value, name: &str) {
    let top: Vec<&str> = value
        .as_object()
        .unwrap_or_else(|| panic!("{name}: error frame is not an object: {value}"))
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(top, ["type", "data"], "{name}: error frame keys: {value}");
    assert_eq!(value["type"], "error", "{name}: expected an error: {value}");
    let data = value["data"]
        .as_object()
        .unwrap_or_else(|| panic!("{name}: error data is not an object: {value}"));
    let keys: Vec<&str> = data.keys().map(String::as_str).collect();
    assert_eq!(
        keys,
        ["code", "message", "event"],
        "{name}: error data keys: {value}"
    );
    let code = data["code"].as_str().unwrap_or("");
    assert!(
        !code.is_empty() && code.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'),
        "{name}: error code must be snake_case: {value}"
    );
    assert!(
        data["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{name}: error message must be a non-empty string: {value}"
    );
    assert!(
        data["event"].is_null() || data["event"].is_string(),
        "{name}: error event must be a string or null: {value}"
    );
}

/// The client sends `client_connect` with `data`; the server `backend` receives the forward.
/// Returns the forwarded `data` (with `target` = the client's id) and stores the id.
pub async fn register_with(client: &mut Conn, backend: &mut Conn, data: &str) -> Value {
    client
        .send_text(&format!(r#"{{"type":"client_connect","data":{data}}}"#))
        .await;
    let forward = backend.recv().await;
    assert_eq!(
        forward["type"], "client_connect",
        "{}: expected a forwarded client_connect, got {forward}",
        backend.name
    );
    let id = forward["data"]["target"]
        .as_str()
        .unwrap_or_else(|| panic!("forwarded client_connect without target: {forward}"))
        .to_string();
    if let Some(known) = &client.id {
        assert_eq!(known, &id, "{}: id changed between connects", client.name);
    }
    client.id = Some(id);
    forward["data"].clone()
}

/// The client registers with empty data; returns its id.
pub async fn register(client: &mut Conn, backend: &mut Conn) -> String {
    register_with(client, backend, "{}").await;
    client.id().to_string()
}

/// `backend` acknowledges `client` (id `id`) into group `user` (no `user` key when `None`);
/// the client receives exactly `{"type":"client_connected","data":{"target":<id>}}`.
pub async fn acknowledge(backend: &mut Conn, client: &mut Conn, id: &str, user: Option<&str>) {
    let data = match user {
        Some(user) => json!({"target": id, "user": user}),
        None => json!({"target": id}),
    };
    backend.send_event("client_connected", data).await;
    client
        .expect_text(&format!(
            r#"{{"type":"client_connected","data":{{"target":"{id}"}}}}"#
        ))
        .await;
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

/// Is `id` a lowercase, hyphenated UUID version 4 (RFC 4122 variant)?
pub fn is_uuid_v4(id: &str) -> bool {
    let b = id.as_bytes();
    b.len() == 36
        && b.iter().enumerate().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => *c == b'-',
            _ => c.is_ascii_digit() || (b'a'..=b'f').contains(c),
        })
        && b[14] == b'4'
        && matches!(b[19], b'8' | b'9' | b'a' | b'b')
}

// ---------------------------------------------------------------- HTTP (API and /metrics)

/// One HTTP response read off the wire: status, headers (names lowercased) and body.
#[derive(Debug)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpResponse {
    /// The first header named `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8(self.body.clone()).expect("HTTP body is UTF-8")
    }

    /// The body parsed as JSON; panics (showing it) when it is not.
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("HTTP body is not JSON ({e}): {:?}", self.text()))
    }
}

/// Sends one HTTP/1.1 request by hand (`Connection: close`, `Content-Length` when there is a
/// body) and reads the whole response, all within [`RECV_TIMEOUT`].
pub async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> HttpResponse {
    http_exchange(addr, None, method, path, headers, body).await
}

/// [`http`] from the local address `source` (see [`Conn::connect_from`]).
pub async fn http_from(
    addr: SocketAddr,
    source: IpAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> HttpResponse {
    http_exchange(addr, Some(source), method, path, headers, body).await
}

async fn http_exchange(
    addr: SocketAddr,
    source: Option<IpAddr>,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> HttpResponse {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let exchange = async {
        let mut stream = match source {
            Some(source) => connect_tcp_from(addr, source).await,
            None => TcpStream::connect(addr).await.expect("connect for HTTP"),
        };
        let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
        for (name, value) in headers {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        if !body.is_empty() || method == "POST" {
            head.push_str(&format!("Content-Length: {}\r\n", body.len()));
        }
        head.push_str("\r\n");
        let mut request = head.into_bytes();
        request.extend_from_slice(body);
        // The server may answer (and close) before reading a body it refuses: a failed
        // write or read is not an error here, whatever answer came is parsed.
        let _ = stream.write_all(&request).await;
        let mut raw = Vec::new();
        let _ = stream.read_to_end(&mut raw).await;
        raw
    };
    let raw = timeout(RECV_TIMEOUT, exchange).await.unwrap_or_else(|_| {
        panic!("HTTP {method} {path}: no complete answer within {RECV_TIMEOUT:?}")
    });
    parse_http_response(&raw).unwrap_or_else(|| {
        panic!(
            "HTTP {method} {path}: malformed response {:?}",
            String::from_utf8_lossy(&raw)
        )
    })
}

fn parse_http_response(raw: &[u8]) -> Option<HttpResponse> {
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&raw[..split]).ok()?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next()?;
    let mut parts = status_line.splitn(3, ' ');
    if !parts.next()?.starts_with("HTTP/1.") {
        return None;
    }
    let status: u16 = parts.next()?.parse().ok()?;
    let mut headers = Vec::new();
    for line in lines {
        let (name, value) = line.split_once(':')?;
        headers.push((name.trim().to_ascii_lowercase(), value.trim().to_string()));
    }
    let rest = &raw[split + 4..];
    let chunked = headers
        .iter()
        .any(|(n, v)| n == "transfer-encoding" && v.to_ascii_lowercase().contains("chunked"));
    let body = if chunked {
        dechunk(rest)?
    } else if let Some((_, len)) = headers.iter().find(|(n, _)| n == "content-length") {
        let len: usize = len.parse().ok()?;
        rest.get(..len)?.to_vec()
    } else {
        rest.to_vec()
    };
    Some(HttpResponse {
        status,
        headers,
        body,
    })
}

fn dechunk(mut rest: &[u8]) -> Option<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let line_end = rest.windows(2).position(|w| w == b"\r\n")?;
        let size_text = std::str::from_utf8(&rest[..line_end]).ok()?;
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        rest = &rest[line_end + 2..];
        if size == 0 {
            return Some(body);
        }
        body.extend_from_slice(rest.get(..size)?);
        rest = rest.get(size + 2..)?;
    }
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

// ---------------------------------------------------------------- Prometheus metrics

/// One sample line of the Prometheus / OpenMetrics text format.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

/// A parsed `/metrics` scrape.
#[derive(Debug, Clone)]
pub struct Scrape {
    pub samples: Vec<Sample>,
    /// `# TYPE` lines: metric family → type.
    pub types: Vec<(String, String)>,
}

impl Scrape {
    /// Parses the text exposition; panics on a line that is neither a comment, blank, nor
    /// `name{labels} value [timestamp]`.
    pub fn parse(text: &str) -> Scrape {
        let mut samples = Vec::new();
        let mut types = Vec::new();
        for line in text.lines() {
            let line = line.trim_end();
            if line.is_empty() {
                continue;
            }
            if let Some(comment) = line.strip_prefix('#') {
                let mut words = comment.split_whitespace();
                if words.next() == Some("TYPE")
                    && let (Some(name), Some(kind)) = (words.next(), words.next())
                {
                    types.push((name.to_string(), kind.to_string()));
                }
                continue;
            }
            samples.push(
                parse_sample(line).unwrap_or_else(|| panic!("malformed metrics line {line:?}")),
            );
        }
        Scrape { samples, types }
    }

    /// The value of the sample `name` whose labels are exactly `labels` (in any order).
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.samples
            .iter()
            .find(|s| {
                s.name == name
                    && s.labels.len() == labels.len()
                    && labels
                        .iter()
                        .all(|(k, v)| s.labels.iter().any(|(sk, sv)| sk == k && sv == v))
            })
            .map(|s| s.value)
    }

    /// Like [`Scrape::get`], panicking (with the scrape) when the sample is missing.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(name, labels).unwrap_or_else(|| {
            let names: Vec<String> = self
                .samples
                .iter()
                .map(|s| format!("{}{:?}", s.name, s.labels))
                .collect();
            panic!("no metric {name}{labels:?} in scrape: {names:#?}")
        })
    }

    /// The declared type of family `name` (`counter`, `gauge`, `histogram`, …).
    pub fn type_of(&self, name: &str) -> Option<&str> {
        self.types
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, t)| t.as_str())
    }
}

fn parse_sample(line: &str) -> Option<Sample> {
    let name_end = line.find(['{', ' '])?;
    let name = &line[..name_end];
    if name.is_empty()
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b':')
    {
        return None;
    }
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if let Some(mut inner) = rest.strip_prefix('{') {
        // `key="value"` pairs separated by commas; values escape \\, \" and \n.
        loop {
            inner = inner.trim_start_matches([',', ' ']);
            if let Some(after) = inner.strip_prefix('}') {
                rest = after;
                break;
            }
            let (key, after_eq) = inner.split_once('=')?;
            let mut chars = after_eq.strip_prefix('"')?.char_indices();
            let mut value = String::new();
            let end = loop {
                match chars.next()? {
                    (_, '\\') => match chars.next()?.1 {
                        'n' => value.push('\n'),
                        c => value.push(c),
                    },
                    (i, '"') => break i,
                    (_, c) => value.push(c),
                }
            };
            labels.push((key.trim().to_string(), value));
            inner = &after_eq[1 + end + 1..];
        }
    }
    let mut fields = rest.split_whitespace();
    let value = match fields.next()? {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        "NaN" => f64::NAN,
        v => v.parse().ok()?,
    };
    // At most a timestamp may follow.
    if fields.count() > 1 {
        return None;
    }
    Some(Sample {
        name: name.to_string(),
        labels,
        value,
    })
}

/// `GET /metrics`, checked (200, OpenMetrics/Prometheus text) and parsed.
pub async fn scrape(addr: SocketAddr) -> Scrape {
    let response = http(addr, "GET", "/metrics", &[], b"").await;
    assert_eq!(response.status, 200, "GET /metrics: {}", response.text());
    Scrape::parse(&response.text())
}

/// Scrapes until the sample `name{labels}` equals `expected` (metrics are updated by other
/// tasks a moment after the frames they count), panicking with the last value after
/// [`RECV_TIMEOUT`].
pub async fn wait_metric(addr: SocketAddr, name: &str, labels: &[(&str, &str)], expected: f64) {
    let deadline = tokio::time::Instant::now() + RECV_TIMEOUT;
    loop {
        let got = scrape(addr).await.get(name, labels);
        if got == Some(expected) {
            return;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!(
                "metric {name}{labels:?}: expected {expected}, still {got:?} after {RECV_TIMEOUT:?}"
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One expected sample: name, labels, value.
pub type Expect<'a> = (&'a str, &'a [(&'a str, &'a str)], f64);

/// Scrapes until every sample in `expected` has its value at once (see [`wait_metric`]);
/// returns that scrape, or panics listing the mismatches after [`RECV_TIMEOUT`].
pub async fn wait_metrics(addr: SocketAddr, expected: &[Expect<'_>]) -> Scrape {
    let deadline = tokio::time::Instant::now() + RECV_TIMEOUT;
    loop {
        let scrape = scrape(addr).await;
        let wrong: Vec<String> = expected
            .iter()
            .filter_map(|(name, labels, value)| {
                let got = scrape.get(name, labels);
                (got != Some(*value))
                    .then(|| format!("{name}{labels:?}: expected {value}, got {got:?}"))
            })
            .collect();
        if wrong.is_empty() {
            return scrape;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("metrics after {RECV_TIMEOUT:?}:\n{}", wrong.join("\n"));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---------------------------------------------------------------- server log capture

/// The server's log as written, for tests that read what a peer can get into it. The
/// subscriber is global: a test binary installs it once.
#[derive(Clone, Default)]
pub struct LogCapture(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for LogCapture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .map_err(|_| std::io::Error::other("poisoned"))?
            .extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl LogCapture {
    /// Captures every log line of this process that `filter` (an `EnvFilter`) admits, as
    /// plain text.
    pub fn install(filter: &str) -> LogCapture {
        let capture = LogCapture::default();
        let writer = capture.clone();
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .init();
        capture
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().expect("log lock")).into_owned()
    }

    /// Lines containing `needle`.
    pub fn lines_with(&self, needle: &str) -> usize {
        self.text()
            .lines()
            .filter(|line| line.contains(needle))
            .count()
    }
}
