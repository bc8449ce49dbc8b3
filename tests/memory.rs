//! Issue 10 item 4: peers must not pin memory without authenticating.
//!
//! - Every error reply a non-admin provokes counts toward `--bad-input-limit`, so a crowd
//!   spamming refused events is closed after about that many replies.
//! - A non-admin that does not read its error replies is closed (1008 `not reading replies`)
//!   long before its 4 MiB queue is full.
//! - `--max-memory` bounds the sum of every outbound queue and every unfinished inbound
//!   message; over it the biggest consumers are closed first, and `/metrics` shows it.
//! - What a big message leaves in a connection's read buffer counts too, until it closes.
//!
//! The non-reading peers here set a small receive buffer, so what the server sends them stays
//! in the server's queues instead of vanishing into the kernel's socket buffers.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::{WebSocketStream, client_async};

use common::{PASSWORD, RECV_TIMEOUT, SILENCE, Server, register, scrape};
use jssocket::peer::Close;

const OUTBOUND: &str = "jssocket_memory_outbound_bytes";
const INBOUND: &str = "jssocket_memory_inbound_bytes";
const RETAINED: &str = "jssocket_memory_retained_bytes";
const BUDGET: &str = "jssocket_memory_budget_bytes";
const PRESSURE_CLOSES: &str = "jssocket_memory_pressure_closes_total";

/// A peer that reads only when told to, through a small receive buffer.
struct Lazy {
    name: String,
    ws: WebSocketStream<TcpStream>,
}

impl Lazy {
    async fn connect(addr: SocketAddr, name: &str) -> Lazy {
        Lazy::connect_as(addr, name, None).await
    }

    /// Connects with the `auth` header when `password` is given.
    async fn connect_as(addr: SocketAddr, name: &str, password: Option<&str>) -> Lazy {
        let mut request = format!("ws://{addr}/ws")
            .into_client_request()
            .expect("request");
        if let Some(password) = password {
            request
                .headers_mut()
                .insert("auth", password.parse().expect("header value"));
        }
        let socket = TcpSocket::new_v4().expect("socket");
        socket.set_recv_buffer_size(4096).expect("SO_RCVBUF");
        let stream = timeout(RECV_TIMEOUT, socket.connect(addr))
            .await
            .unwrap_or_else(|_| panic!("{name}: connect timed out"))
            .unwrap_or_else(|e| panic!("{name}: connect failed: {e}"));
        let (ws, response) = timeout(RECV_TIMEOUT, client_async(request, stream))
            .await
            .unwrap_or_else(|_| panic!("{name}: handshake timed out"))
            .unwrap_or_else(|e| panic!("{name}: handshake failed: {e}"));
        assert_eq!(response.status(), 101, "{name}: upgrade refused");
        Lazy {
            name: name.to_string(),
            ws,
        }
    }

    /// Sends `count` copies of `text` without reading; stops early (returning how many went
    /// out) when the server stops taking them.
    async fn spam(&mut self, text: &str, count: usize) -> usize {
        for sent in 0..count {
            let fed = timeout(
                Duration::from_millis(300),
                self.ws.feed(Message::text(text)),
            )
            .await;
            if !matches!(fed, Ok(Ok(()))) {
                return sent;
            }
        }
        let _ = timeout(Duration::from_millis(300), self.ws.flush()).await;
        count
    }

    /// Reads until the close frame; returns the text frames before it and the close.
    async fn read_to_close(&mut self) -> (Vec<String>, (u16, String)) {
        let mut texts = Vec::new();
        let read = timeout(RECV_TIMEOUT * 2, async {
            loop {
                match self.ws.next().await {
                    Some(Ok(Message::Text(text))) => texts.push(text.to_string()),
                    Some(Ok(Message::Close(Some(frame)))) => {
                        return (u16::from(frame.code), frame.reason.to_string());
                    }
                    Some(Ok(Message::Close(None))) => return (1005, String::new()),
                    Some(Ok(_)) => continue,
                    other => panic!("{}: ended without a close frame: {other:?}", self.name),
                }
            }
        })
        .await;
        let close = read.unwrap_or_else(|_| panic!("{}: no close frame in time", self.name));
        (texts, close)
    }

    /// Reads `n` text frames, failing on a close.
    async fn read_texts(&mut self, n: usize) {
        for i in 0..n {
            match timeout(RECV_TIMEOUT, self.ws.next()).await {
                Ok(Some(Ok(Message::Text(_)))) => {}
                other => panic!("{}: frame {i} of {n}: got {other:?}", self.name),
            }
        }
    }

    /// Reads up to `n` text frames; returns how many arrived and the close that ended them
    /// early, if any (`Some(None)`: reset without a close frame).
    async fn read_up_to(&mut self, n: usize) -> (usize, Option<Option<(u16, String)>>) {
        let mut texts = 0;
        while texts < n {
            match timeout(RECV_TIMEOUT, self.ws.next()).await {
                Ok(Some(Ok(Message::Text(_)))) => texts += 1,
                Ok(Some(Ok(Message::Close(frame)))) => {
                    let close = frame.map(|f| (u16::from(f.code), f.reason.to_string()));
                    return (texts, Some(close));
                }
                Ok(Some(Ok(_))) => {}
                Ok(Some(Err(_)) | None) => return (texts, Some(None)),
                Err(_) => panic!("{}: after {texts} of {n} frames: nothing", self.name),
            }
        }
        (texts, None)
    }

    /// Asserts the connection is still open: nothing, not even a close, arrives.
    async fn expect_open(&mut self) {
        if let Ok(event) = timeout(SILENCE, self.ws.next()).await {
            panic!(
                "{}: expected an open, quiet connection, got {event:?}",
                self.name
            );
        }
    }

    /// Registers with `client_connect` (without reading anything) and returns its id, as
    /// the backend sees it.
    async fn register(&mut self, backend: &mut common::Conn) -> String {
        self.ws
            .send(Message::text(r#"{"type":"client_connect","data":{}}"#))
            .await
            .expect("send client_connect");
        let forwarded = backend.recv().await;
        assert_eq!(forwarded["type"], "client_connect", "{forwarded}");
        forwarded["data"]["target"]
            .as_str()
            .expect("target")
            .to_string()
    }

    /// Writes raw bytes: the first part of a frame the server must wait for the rest of.
    async fn write_raw(&mut self, bytes: &[u8]) {
        let name = &self.name;
        timeout(RECV_TIMEOUT, self.ws.get_mut().write_all(bytes))
            .await
            .unwrap_or_else(|_| panic!("{name}: raw write timed out"))
            .unwrap_or_else(|e| panic!("{name}: raw write failed: {e}"));
    }
}

/// Polls `/metrics` until `ok(value of name)` holds; panics with the last value otherwise.
async fn wait_gauge(addr: SocketAddr, name: &str, what: &str, ok: impl Fn(f64) -> bool) -> f64 {
    let deadline = tokio::time::Instant::now() + RECV_TIMEOUT * 2;
    loop {
        let value = scrape(addr).await.value(name, &[]);
        if ok(value) {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{name} = {value}: expected {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The first bytes of a masked (zero key) text frame carrying `json` padded to `len` bytes.
fn frame_of(len: usize) -> (Vec<u8>, Vec<u8>) {
    let head = br#"{"type":"pad","data":""#;
    let tail = br#""}"#;
    let mut payload = head.to_vec();
    payload.resize(len - tail.len(), b'x');
    payload.extend_from_slice(tail);
    let mut header = vec![0x81, 0x80 | 127];
    header.extend_from_slice(&(len as u64).to_be_bytes());
    header.extend_from_slice(&[0, 0, 0, 0]);
    (header, payload)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_events_count_as_bad_input_for_non_readers() {
    const ATTACKERS: usize = 40;
    const LIMIT: usize = 30;
    let server = Server::start().await;
    let mut backend = server.backend("backend").await;
    let mut bystander = server.acked_client("bystander", &mut backend, None).await;

    let mut attackers = Vec::new();
    for i in 0..ATTACKERS {
        attackers.push(Lazy::connect(server.addr, &format!("attacker {i}")).await);
    }
    // Every attacker floods notify_all (admins only: each is answered `forbidden`) at once,
    // reading nothing, while the server's outbound bytes are sampled.
    let floods: Vec<_> = attackers
        .into_iter()
        .map(|mut a| {
            tokio::spawn(async move {
                a.spam(r#"{"type":"notify_all"}"#, 2000).await;
                a
            })
        })
        .collect();
    let addr = server.addr;
    let sampler = tokio::spawn(async move {
        let mut most = 0f64;
        for _ in 0..20 {
            most = most.max(scrape(addr).await.value(OUTBOUND, &[]));
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        most
    });
    let mut attackers = Vec::new();
    for flood in floods {
        attackers.push(flood.await.expect("flood task"));
    }
    let most = sampler.await.expect("sampler");
    // Without the limit each would hold 2000 replies (~400 KiB): 16 MiB in all.
    assert!(
        most < 1024.0 * 1024.0,
        "outbound queues held {most} bytes during the flood"
    );

    for mut attacker in attackers {
        let (texts, close) = attacker.read_to_close().await;
        assert_eq!(
            (close.0, close.1.as_str()),
            (1008, Close::BAD_INPUT.reason),
            "{}",
            attacker.name
        );
        assert!(
            texts.iter().all(|t| t.contains(r#""code":"forbidden""#)),
            "{}: {texts:?}",
            attacker.name
        );
        assert!(
            texts.len() <= LIMIT + 1 && texts.len() >= LIMIT / 2,
            "{}: closed after {} replies, limit {LIMIT}",
            attacker.name,
            texts.len()
        );
    }

    // The bystander was served throughout and still is.
    backend
        .send_json(&json!({"type": "notify_all", "data": {"still": "here"}}))
        .await;
    bystander.expect_text(r#"{"still":"here"}"#).await;
    bystander.ping(1, true).await;
    wait_gauge(server.addr, OUTBOUND, "back to nothing", |v| v < 4096.0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unread_error_replies_close_long_before_the_queue_is_full() {
    // The limit is out of the way: only the unread replies can close it.
    let server = Server::with_args(&["--bad-input-limit", "1000000"]).await;
    let mut lazy = Lazy::connect(server.addr, "lazy").await;
    // Sent in rounds until the server stops reading it (it closed the connection) or
    // 40,000 went out: 4 MiB of replies would be ~20,000.
    let mut sent = 0;
    while sent < 40_000 {
        let n = lazy.spam(r#"{"type":"notify_all"}"#, 1000).await;
        sent += n;
        if n < 1000 {
            break;
        }
    }
    let (texts, close) = lazy.read_to_close().await;
    assert_eq!(
        (close.0, close.1.as_str()),
        (1008, Close::NOT_READING.reason),
        "after {} replies",
        texts.len()
    );
    // The queue's 4 MiB would hold ~20,000 of these replies; 64 KiB (plus what the kernel
    // buffers) is a few thousand.
    assert!(
        texts.len() < 10_000,
        "{} replies were queued before the close",
        texts.len()
    );
    // An admin is never closed for this: its refusals are not abuse.
    let mut admin = server.admin("admin").await;
    admin.ping(1, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_the_budget_the_biggest_queues_are_closed_first() {
    const BUDGET_BYTES: f64 = 2.0 * 1024.0 * 1024.0;
    // Queues may grow far past the budget, so only the budget can stop them.
    let server = Server::with_args(&["--max-memory", "2M", "--max-queue-bytes", "67108864"]).await;
    let mut backend = server.backend("backend").await;
    assert_eq!(scrape(server.addr).await.value(BUDGET, &[]), BUDGET_BYTES);

    let mut lazies = Vec::new();
    let mut ids = Vec::new();
    for name in ["big 1", "big 2", "small 1", "small 2"] {
        let mut lazy = Lazy::connect(server.addr, name).await;
        ids.push(lazy.register(&mut backend).await);
        lazies.push(lazy);
    }
    let mut reader = server.client("reader").await;
    let reader_id = register(&mut reader, &mut backend).await;

    let addr = server.addr;
    let sampler = tokio::spawn(async move {
        let mut most = 0f64;
        for _ in 0..40 {
            most = most.max(scrape(addr).await.value(OUTBOUND, &[]));
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        most
    });
    let notify = |target: &str, kib: usize| json!({"type": "notify_client", "data": {"target": target, "data": {"p": "x".repeat(kib * 1024)}}});
    // 8 MiB for each big one (the kernel's socket buffer takes up to 4 MiB of that), 64 KiB
    // for each small one, 320 KiB for the reader, against a 2 MiB budget.
    for _ in 0..2 {
        backend.send_json(&notify(&ids[2], 32)).await;
        backend.send_json(&notify(&ids[3], 32)).await;
    }
    for _ in 0..64 {
        backend.send_json(&notify(&ids[0], 128)).await;
        backend.send_json(&notify(&ids[1], 128)).await;
    }
    for _ in 0..10 {
        backend.send_json(&notify(&reader_id, 32)).await;
        reader.recv().await;
    }
    let most = sampler.await.expect("sampler");
    assert!(
        most <= BUDGET_BYTES * 1.25 + 256.0 * 1024.0,
        "outbound queues held {most} bytes against a budget of {BUDGET_BYTES}"
    );
    wait_gauge(server.addr, OUTBOUND, "within the budget", |v| {
        v <= BUDGET_BYTES
    })
    .await;
    assert!(scrape(server.addr).await.value(PRESSURE_CLOSES, &[]) >= 1.0);

    let mut smalls = lazies.split_off(2);
    let mut closed = 0;
    for big in &mut lazies {
        // A big one either was closed as a slow consumer or (once the other one was closed)
        // kept all 64 frames.
        let mut texts = 0;
        let close = loop {
            match timeout(SILENCE, big.ws.next()).await {
                Ok(Some(Ok(Message::Text(_)))) => texts += 1,
                Ok(Some(Ok(Message::Close(frame)))) => break Some(frame),
                // A slow consumer may be reset rather than wait for it to read the close
                // frame (issue 10 item 7 is about that).
                Ok(Some(Err(_)) | None) => break Some(None),
                Err(_) if texts == 64 => break None,
                other => panic!("{}: after {texts} frames: {other:?}", big.name),
            }
        };
        if let Some(frame) = close {
            if let Some(frame) = frame {
                assert_eq!(
                    (u16::from(frame.code), frame.reason.as_str()),
                    (1008, "slow consumer"),
                    "{}",
                    big.name
                );
            }
            assert!(texts < 64, "{}", big.name);
            closed += 1;
        }
    }
    assert!(closed >= 1, "no big consumer was closed");
    // The small ones and the reader were spared, and are still served.
    for small in &mut smalls {
        small.read_texts(2).await;
        small.expect_open().await;
    }
    reader.expect_silence().await;
    backend
        .send_json(
            &json!({"type": "notify_client", "data": {"target": reader_id, "data": {"after": 1}}}),
        )
        .await;
    reader.expect_text(r#"{"after":1}"#).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_the_budget_the_biggest_unfinished_messages_are_closed_first() {
    const MESSAGE: usize = 1_000_000;
    let server = Server::with_args(&["--max-memory", "2M"]).await;
    let mut peers = Vec::new();
    for name in ["partial 1", "partial 2", "partial 3"] {
        peers.push(Lazy::connect(server.addr, name).await);
    }
    let (header, payload) = frame_of(MESSAGE);
    // Each sends the header and part of one 1 MB message, then stops: 1 MB, 700 kB, 600 kB.
    let parts = [1_000_000 - 10, 700_000, 600_000];
    let mut expected = 0f64;
    for (peer, &part) in peers.iter_mut().zip(&parts).take(2) {
        peer.write_raw(&header).await;
        peer.write_raw(&payload[..part]).await;
        expected += part as f64;
        wait_gauge(server.addr, INBOUND, "the unfinished messages", |v| {
            v >= expected
        })
        .await;
    }
    // The third takes the sum over 2 MiB: the biggest, the first, is closed.
    peers[2].write_raw(&header).await;
    peers[2].write_raw(&payload[..parts[2]]).await;
    let (texts, close) = peers[0].read_to_close().await;
    assert!(texts.is_empty(), "{texts:?}");
    assert_eq!(
        (close.0, close.1.as_str()),
        (1009, Close::MEMORY_INBOUND.reason)
    );
    let left = (parts[1] + parts[2]) as f64;
    wait_gauge(
        server.addr,
        INBOUND,
        "the two unfinished messages left",
        |v| v >= left && v < left + 64.0 * 1024.0,
    )
    .await;
    assert!(scrape(server.addr).await.value(PRESSURE_CLOSES, &[]) >= 1.0);

    // The others were spared: they finish their messages and are still served.
    for (peer, &part) in peers.iter_mut().zip(&parts).skip(1) {
        peer.write_raw(&payload[part..]).await;
        peer.ws
            .send(Message::text(r#"{"type":"notify_all"}"#))
            .await
            .expect("send");
        match timeout(RECV_TIMEOUT, peer.ws.next()).await {
            Ok(Some(Ok(Message::Text(text)))) => {
                let error: Value = serde_json::from_str(&text).expect("json");
                assert_eq!(error["data"]["code"], "forbidden", "{}", peer.name);
            }
            other => panic!("{}: {other:?}", peer.name),
        }
    }
    wait_gauge(server.addr, INBOUND, "nothing unfinished", |v| {
        v < 64.0 * 1024.0
    })
    .await;
}

/// `n` non-reading clients registered through `backend`, with their ids.
async fn lazy_clients(
    server: &Server,
    backend: &mut common::Conn,
    prefix: &str,
    n: usize,
) -> (Vec<Lazy>, Vec<String>) {
    let mut lazies = Vec::new();
    let mut ids = Vec::new();
    for i in 0..n {
        let mut lazy = Lazy::connect(server.addr, &format!("{prefix} {i}")).await;
        ids.push(lazy.register(backend).await);
        lazies.push(lazy);
    }
    (lazies, ids)
}

/// Review finding 1: a broadcast's frame is one buffer shared by every queue, so it is
/// charged to the budget once. Charged per recipient, 8 admin `notify_all`s of 20 KiB to 200
/// clients count as 32 MiB against a 2 MiB budget, and the server closed legitimate clients
/// that were merely a few frames behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broadcast_to_many_clients_is_charged_once() {
    const CLIENTS: usize = 200;
    const FRAMES: usize = 8;
    let server = Server::with_args(&["--max-memory", "2M"]).await;
    let mut backend = server.backend("backend").await;
    let (mut lazies, _) = lazy_clients(&server, &mut backend, "client", CLIENTS).await;
    let addr = server.addr;
    let sampler = tokio::spawn(async move {
        let mut most = 0f64;
        for _ in 0..40 {
            most = most.max(scrape(addr).await.value(OUTBOUND, &[]));
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        most
    });
    // Sent before any client reads: every queue holds all of them at once.
    for i in 0..FRAMES {
        backend
            .send_json(&json!({"type": "notify_all", "data": {"i": i, "p": "x".repeat(20 * 1024)}}))
            .await;
    }
    // Shared, that is 160 KiB of frames and 100 KiB of queue slots: under a tenth of the
    // budget (charged per recipient it was 32 MiB).
    let most = sampler.await.expect("sampler");
    assert!(most < 512.0 * 1024.0, "{most} bytes charged");
    for lazy in &mut lazies {
        let (texts, close) = lazy.read_up_to(FRAMES).await;
        assert_eq!((texts, close), (FRAMES, None), "{}", lazy.name);
    }
    let metrics = scrape(server.addr).await;
    assert_eq!(metrics.value(PRESSURE_CLOSES, &[]), 0.0);
    assert_eq!(
        metrics.value("jssocket_slow_consumer_closes_total", &[]),
        0.0
    );
    wait_gauge(server.addr, OUTBOUND, "back to nothing", |v| v < 4096.0).await;
}

/// Charged once is not charged zero times: groups of 2 non-reading members each getting
/// frames of their own still hit the budget, and the biggest are closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_frames_still_count_toward_the_budget() {
    const BUDGET_BYTES: f64 = 2.0 * 1024.0 * 1024.0;
    const GROUPS: usize = 4;
    const ROUNDS: usize = 96;
    let server = Server::with_args(&["--max-memory", "2M", "--max-queue-bytes", "67108864"]).await;
    let mut backend = server.backend("backend").await;
    let (mut lazies, ids) = lazy_clients(&server, &mut backend, "member", GROUPS * 2).await;
    for (i, id) in ids.iter().enumerate() {
        let user = format!("group {}", i / 2);
        backend
            .send_json(&json!({"type": "client_connected", "data": {"target": id, "user": user}}))
            .await;
    }
    let addr = server.addr;
    let sampler = tokio::spawn(async move {
        let mut most = 0f64;
        for _ in 0..40 {
            most = most.max(scrape(addr).await.value(OUTBOUND, &[]));
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        most
    });
    // 24 MiB of distinct frames, 6 MiB per group (more than the kernel's socket buffers
    // take, up to 4 MiB), each queued for both members.
    for round in 0..ROUNDS {
        for group in 0..GROUPS {
            let p = format!("{round} {group} {}", "x".repeat(64 * 1024));
            backend
                .send_json(&json!({"type": "notify_group", "data": {"target": format!("group {group}"), "data": {"p": p}}}))
                .await;
        }
    }
    let most = sampler.await.expect("sampler");
    assert!(
        most <= BUDGET_BYTES * 1.25 + 256.0 * 1024.0,
        "outbound queues held {most} bytes against a budget of {BUDGET_BYTES}"
    );
    wait_gauge(server.addr, OUTBOUND, "within the budget", |v| {
        v <= BUDGET_BYTES
    })
    .await;
    assert!(scrape(server.addr).await.value(PRESSURE_CLOSES, &[]) >= 1.0);
    let mut closed = 0;
    for lazy in &mut lazies {
        // client_connected, then the frames (or some of them, and the close).
        if let (_, Some(close)) = lazy.read_up_to(1 + ROUNDS).await {
            if let Some(close) = close {
                assert_eq!(close, (1008, Close::SLOW_CONSUMER.reason.into()));
            }
            closed += 1;
        }
    }
    assert!(closed >= 1, "nobody was closed");
}

/// Review finding 2: an admin is never closed for the budget, nor refused a frame: a
/// backend's queue of forwarded client connects is often the biggest, and a crowd of clients
/// must not be able to cut it off. Here the backend does not read, its queue holds most of
/// the budget, and an unfinished message takes the server over it: the message's sender is
/// closed, not the backend.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_is_never_closed_for_the_memory_budget() {
    const PART: usize = 700_000;
    // 3M: the clients' read buffers keep 1 MiB of their big client connects (charged too).
    let server = Server::with_args(&["--max-memory", "3M", "--max-queue-bytes", "67108864"]).await;
    let mut backend = Lazy::connect_as(server.addr, "backend", Some(PASSWORD)).await;
    backend
        .ws
        .send(Message::text(r#"{"type":"server_connect","data":{}}"#))
        .await
        .expect("server_connect");
    backend.read_texts(1).await;
    // Client connects of 256 KiB, forwarded to the backend, which reads none, until its queue
    // holds 1.5 MiB (past what the kernel's buffers take).
    let mut clients = Vec::new();
    for i in 0..4 {
        clients.push(server.client(&format!("client {i}")).await);
    }
    let connect = json!({"type": "client_connect", "data": {"p": "x".repeat(256 * 1024)}});
    let mut forwarded = 0;
    'fill: for _ in 0..15 {
        for client in &mut clients {
            client.send_json(&connect).await;
            forwarded += 1;
            tokio::time::sleep(Duration::from_millis(30)).await;
            if scrape(server.addr).await.value(OUTBOUND, &[]) >= 1.5 * 1024.0 * 1024.0 {
                break 'fill;
            }
        }
    }
    wait_gauge(
        server.addr,
        OUTBOUND,
        "1.5 MiB queued for the backend",
        |v| v >= 1.5 * 1024.0 * 1024.0,
    )
    .await;
    // The backend's 1.5 MiB alone put nobody over the budget: admins' queues are exempt.
    // Unfinished messages of 900, 700 and 600 kB do: the biggest of them is closed.
    let (header, payload) = frame_of(1_000_000);
    let mut attackers = Vec::new();
    for (i, part) in [PART + 200_000, PART, PART - 100_000]
        .into_iter()
        .enumerate()
    {
        let mut attacker = Lazy::connect(server.addr, &format!("attacker {i}")).await;
        attacker.write_raw(&header).await;
        attacker.write_raw(&payload[..part]).await;
        attackers.push(attacker);
    }
    let (texts, close) = attackers[0].read_to_close().await;
    assert!(texts.is_empty(), "{texts:?}");
    assert_eq!(
        (close.0, close.1.as_str()),
        (1009, Close::MEMORY_INBOUND.reason)
    );
    // The backend gets every client connect, and is still served.
    let (texts, close) = backend.read_up_to(forwarded).await;
    assert_eq!((texts, close), (forwarded, None), "backend");
    backend
        .ws
        .send(Message::text(
            r#"{"type":"notify_client","data":{"callback":"still here"}}"#,
        ))
        .await
        .expect("send");
    match timeout(RECV_TIMEOUT, backend.ws.next()).await {
        Ok(Some(Ok(Message::Text(text)))) => assert!(text.contains("still here"), "{text}"),
        other => panic!("backend: {other:?}"),
    }
}

/// Review finding 3: RFC 6455 allows a ping between the fragments of a message; the ping
/// must not make the unfinished message before it look finished to the budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ping_between_fragments_does_not_hide_the_unfinished_message() {
    const FRAGMENT: usize = 1_000_000;
    let server = Server::start().await;
    let mut peer = Lazy::connect(server.addr, "fragments").await;
    // A text fragment without FIN (opcode 1), masked with a zero key.
    let mut fragment = br#"{"type":"pad","data":""#.to_vec();
    fragment.resize(FRAGMENT, b'x');
    let mut header = vec![0x01, 0x80 | 127];
    header.extend_from_slice(&(FRAGMENT as u64).to_be_bytes());
    header.extend_from_slice(&[0, 0, 0, 0]);
    peer.write_raw(&header).await;
    peer.write_raw(&fragment).await;
    wait_gauge(server.addr, INBOUND, "the first fragment", |v| {
        v >= FRAGMENT as f64
    })
    .await;
    // A ping (FIN, opcode 9, masked, 4 bytes); its pong proves the server read it.
    peer.write_raw(&[0x89, 0x84, 0, 0, 0, 0, b'p', b'i', b'n', b'g'])
        .await;
    match timeout(RECV_TIMEOUT, peer.ws.next()).await {
        Ok(Some(Ok(Message::Pong(payload)))) => assert_eq!(&payload[..], b"ping"),
        other => panic!("expected the pong: {other:?}"),
    }
    let inbound = scrape(server.addr).await.value(INBOUND, &[]);
    assert!(
        inbound >= FRAGMENT as f64,
        "{inbound} bytes charged while the server holds a {FRAGMENT}-byte fragment"
    );
    // The last fragment (FIN, opcode 0) completes the message: nothing is charged any more.
    peer.write_raw(&[0x80, 0x82, 0, 0, 0, 0, b'"', b'}']).await;
    wait_gauge(server.addr, INBOUND, "nothing unfinished", |v| v < 1024.0).await;
    peer.expect_open().await;
}

/// Review finding 9: a frame taken from the queue stays counted until the socket took it,
/// not only until the writer took it from the queue: a stalled socket holds it just as long.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_being_written_stays_counted() {
    const MIB: f64 = 1024.0 * 1024.0;
    let server = Server::with_args(&[
        "--max-message-size",
        "16777216",
        "--max-queue-bytes",
        "67108864",
    ])
    .await;
    let mut backend = server.backend("backend").await;
    let (mut lazies, ids) = lazy_clients(&server, &mut backend, "stalled", 1).await;
    // One 8 MiB frame: more than the kernel's buffers take from a reader that doesn't read,
    // so the writer is stuck on it.
    backend
        .send_json(&json!({"type": "notify_client", "data": {"target": ids[0], "data": {"p": "x".repeat(8 << 20)}}}))
        .await;
    wait_gauge(server.addr, OUTBOUND, "the frame", |v| v >= 4.0 * MIB).await;
    tokio::time::sleep(SILENCE).await;
    let outbound = scrape(server.addr).await.value(OUTBOUND, &[]);
    assert!(
        outbound >= 4.0 * MIB,
        "{outbound} bytes charged while an 8 MiB frame is being written"
    );
    lazies[0].read_texts(1).await;
    wait_gauge(server.addr, OUTBOUND, "back to nothing", |v| v < 4096.0).await;
}

/// Review finding 10: only unread *error replies* close a peer as not reading: a subscriber
/// with plenty of normal traffic queued that makes one mistake gets its error, and stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_client_is_not_closed_for_one_error() {
    let server = Server::with_args(&["--max-queue-bytes", "67108864"]).await;
    let mut backend = server.backend("backend").await;
    let (mut lazies, ids) = lazy_clients(&server, &mut backend, "busy", 1).await;
    let busy = &mut lazies[0];
    // Normal traffic until 256 KiB of it waits in the server's queue (past the kernel's
    // buffers).
    let mut sent = 0;
    for _ in 0..100 {
        backend
            .send_json(&json!({"type": "notify_client", "data": {"target": ids[0], "data": {"p": "x".repeat(128 * 1024)}}}))
            .await;
        sent += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
        if scrape(server.addr).await.value(OUTBOUND, &[]) >= 256.0 * 1024.0 {
            break;
        }
    }
    wait_gauge(server.addr, OUTBOUND, "256 KiB queued", |v| {
        v >= 256.0 * 1024.0
    })
    .await;
    // One refused event.
    busy.ws
        .send(Message::text(r#"{"type":"notify_all","data":{}}"#))
        .await
        .expect("send");
    let (texts, close) = busy.read_up_to(sent + 1).await;
    assert_eq!((texts, close), (sent + 1, None));
    busy.expect_open().await;
}

/// A `notify_all` (refused: `forbidden`) of exactly `len` bytes.
fn padded_notify_all(len: usize) -> String {
    let head = r#"{"type":"notify_all","data":{"p":""#;
    let tail = r#""}}"#;
    format!("{head}{}{tail}", "x".repeat(len - head.len() - tail.len()))
}

/// The reader's buffer keeps room for the biggest frame a connection sent, for good (see
/// `memory::RETAINED_FROM`): connections that each sent one big message are charged for it,
/// and over the budget the one that keeps the most is closed, while those that only sent
/// small messages are neither charged nor touched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_big_messages_leave_in_read_buffers_is_charged() {
    let server = Server::with_args(&["--max-memory", "1M"]).await;
    let mut smalls = Vec::new();
    for i in 0..3 {
        let mut small = server.client(&format!("small {i}")).await;
        small.send_text(&padded_notify_all(4096)).await;
        small.expect_error("forbidden", Some("notify_all")).await;
        smalls.push(small);
    }
    assert_eq!(scrape(server.addr).await.value(RETAINED, &[]), 0.0);

    // 950 kB kept, under the 1 MiB budget: nobody is closed.
    let sizes = [400_000, 300_000, 250_000];
    let mut bigs = Vec::new();
    let mut kept = 0;
    for (i, &size) in sizes.iter().enumerate() {
        let mut big = server.client(&format!("big {i}")).await;
        big.send_text(&padded_notify_all(size)).await;
        big.expect_error("forbidden", Some("notify_all")).await;
        kept += size;
        let charged = wait_gauge(server.addr, RETAINED, "the big messages' buffers", |v| {
            v >= kept as f64
        })
        .await;
        assert_eq!(charged, kept as f64, "only big messages are charged");
        bigs.push(big);
    }
    // A smaller one more takes the sum over: the biggest, the first, is closed.
    let mut last = server.client("big 3").await;
    last.send_text(&padded_notify_all(200_000)).await;
    let reason = bigs[0].expect_close_code(1008).await;
    assert_eq!(reason, Close::MEMORY_RETAINED.reason);
    // Closing it gave its buffer back.
    let left = (sizes[1] + sizes[2] + 200_000) as f64;
    wait_gauge(server.addr, RETAINED, "the others' buffers", |v| v == left).await;
    assert!(scrape(server.addr).await.value(PRESSURE_CLOSES, &[]) >= 1.0);

    // The others, big and small, are still served.
    last.expect_error("forbidden", Some("notify_all")).await;
    for conn in bigs
        .iter_mut()
        .skip(1)
        .chain(smalls.iter_mut())
        .chain([&mut last])
    {
        conn.send_text(r#"{"type":"notify_all"}"#).await;
        conn.expect_error("forbidden", Some("notify_all")).await;
    }
    // Gone with the connections that kept them.
    drop((bigs, last));
    wait_gauge(server.addr, RETAINED, "nothing kept", |v| v == 0.0).await;
}
