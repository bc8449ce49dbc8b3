//! Hardening (SPEC §3, §6): keepalive, handshake timeout, connection limit, header size,
//! allowed origins, slow consumers, auth floods and their bounds, bounded shutdown with a
//! dead peer. Real sockets on 127.0.0.1; every wait is bounded.
//!
//! Covered elsewhere and not repeated here: `--bad-input-limit` (tests/bad_input.rs,
//! `too_much_bad_input_closes_1008`) and `--client-send own|none` (tests/events.rs).

mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::{WebSocketStream, client_async, connect_async};

use common::{
    Conn, Event, FAST_HASH, PASSWORD, RECV_TIMEOUT, Server, acknowledge, register, scrape,
};
use jssocket::auth::{Authenticator, MAX_QUEUED_PER_ADDRESS, PasswordHash, Verdict};
use jssocket::metrics::AuthMetrics;

// ------------------------------------------------------------------------------ raw helpers

/// A WebSocket upgrade request head for `/ws`, with extra header lines (each ending `\r\n`).
fn upgrade_request(addr: SocketAddr, extra: &str) -> String {
    format!(
        "GET /ws HTTP/1.1\r\nHost: {addr}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{extra}\r\n"
    )
}

/// Sends `request` on a new TCP connection and reads the response head. Returns the stream
/// and the status code, or `None` when the server closed without answering.
async fn raw_request(addr: SocketAddr, request: &str) -> (TcpStream, Option<u16>) {
    let mut stream = TcpStream::connect(addr).await.expect("TCP connect");
    stream
        .write_all(request.as_bytes())
        .await
        .expect("write request");
    let status = read_status(&mut stream).await;
    (stream, status)
}

/// Reads an HTTP response head byte by byte (so nothing after it is consumed) and returns
/// its status code; `None` on EOF or a reset before a full head.
async fn read_status(stream: &mut TcpStream) -> Option<u16> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    let read = timeout(RECV_TIMEOUT, async {
        while !head.ends_with(b"\r\n\r\n") {
            match stream.read(&mut byte).await {
                Ok(1) => head.push(byte[0]),
                _ => return false,
            }
        }
        true
    })
    .await
    .expect("no HTTP response head within the timeout");
    if !read {
        return None;
    }
    let text = String::from_utf8_lossy(&head);
    let status = text.split(' ').nth(1).and_then(|s| s.parse().ok());
    assert!(status.is_some(), "not an HTTP response head: {text:?}");
    status
}

/// A WebSocket opened by hand on a raw TCP connection (101 checked).
async fn raw_websocket(addr: SocketAddr) -> TcpStream {
    let (stream, status) = raw_request(addr, &upgrade_request(addr, "")).await;
    assert_eq!(status, Some(101), "raw upgrade refused");
    stream
}

/// How a raw connection ended, and what the server sent before.
#[derive(Debug)]
struct RawEnd {
    /// Since the start of the wait.
    after: Duration,
    /// Opcodes of the server's frames, in order (9 ping, 8 close, 1 text).
    opcodes: Vec<u8>,
    /// The close frame's code, if one came.
    close_code: Option<u16>,
}

/// Reads (and parses) what the server sends on a raw WebSocket until the connection ends (EOF
/// or reset), never answering anything. Panics if it has not ended within `within`.
async fn wait_end(stream: &mut TcpStream, within: Duration) -> RawEnd {
    let start = Instant::now();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    let ended = timeout(within, async {
        loop {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await;
    let after = start.elapsed();
    assert!(
        ended.is_ok(),
        "connection still open after {within:?} (received {} bytes)",
        buf.len()
    );
    let (opcodes, close_code) = parse_server_frames(&buf);
    RawEnd {
        after,
        opcodes,
        close_code,
    }
}

/// Opcodes of the (unmasked) server frames in `buf`, and the close code if any; a frame cut
/// short by a reset is ignored.
fn parse_server_frames(mut buf: &[u8]) -> (Vec<u8>, Option<u16>) {
    let mut opcodes = Vec::new();
    let mut close_code = None;
    while buf.len() >= 2 {
        let opcode = buf[0] & 0x0f;
        let (len, header) = match buf[1] & 0x7f {
            126 if buf.len() >= 4 => (usize::from(u16::from_be_bytes([buf[2], buf[3]])), 4),
            127 if buf.len() >= 10 => {
                let mut n = [0u8; 8];
                n.copy_from_slice(&buf[2..10]);
                (
                    usize::try_from(u64::from_be_bytes(n)).unwrap_or(usize::MAX),
                    10,
                )
            }
            126 | 127 => break,
            n => (usize::from(n), 2),
        };
        if buf.len() < header + len {
            break;
        }
        let payload = &buf[header..header + len];
        if opcode == 8 && payload.len() >= 2 {
            close_code = Some(u16::from_be_bytes([payload[0], payload[1]]));
        }
        opcodes.push(opcode);
        buf = &buf[header + len..];
    }
    (opcodes, close_code)
}

/// `GET /healthz` on a new connection answers 200.
async fn assert_healthy(addr: SocketAddr) {
    let health = common::http(addr, "GET", "/healthz", &[], b"").await;
    assert_eq!(health.status, 200, "server stopped serving /healthz");
}

/// A TCP connection whose receive buffer is tiny, so the server's writes to it stall as soon
/// as it stops reading.
async fn small_window_stream(addr: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("SO_RCVBUF");
    socket.connect(addr).await.expect("TCP connect")
}

type RawWs = WebSocketStream<TcpStream>;

/// A WebSocket client on a small-window TCP connection that sent `client_connect` (so it
/// receives `notify_all`) and whose forward `backend` consumed. The caller then stops polling
/// it: it neither reads nor answers pings.
async fn registered_dead_reader(server: &Server, backend: &mut Conn) -> RawWs {
    let stream = small_window_stream(server.addr).await;
    let (mut ws, response) = timeout(RECV_TIMEOUT, client_async(server.url(), stream))
        .await
        .expect("handshake in time")
        .expect("handshake");
    assert_eq!(response.status(), 101);
    ws.send(Message::text(r#"{"type":"client_connect","data":{}}"#))
        .await
        .expect("send client_connect");
    let forward = backend.recv().await;
    assert_eq!(forward["type"], "client_connect", "{forward}");
    ws
}

/// Polls a WebSocket that was left unread until it ends; returns the text frames it still
/// got and how it ended (`Some(code)` for a close frame, `None` for a reset or EOF).
async fn drain_until_end(ws: &mut RawWs, within: Duration) -> (usize, Option<(u16, String)>) {
    let mut texts = 0;
    let ended = timeout(within, async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Text(_))) => texts += 1,
                Some(Ok(Message::Close(frame))) => {
                    return frame.map(|f| (u16::from(f.code), f.reason.to_string()));
                }
                Some(Ok(_)) => {}
                None | Some(Err(_)) => return None,
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("unread connection still open after {within:?}"));
    (texts, ended)
}

fn notify_all_frame(seq: usize, pad: &str) -> String {
    format!(r#"{{"type":"notify_all","data":{{"seq":{seq},"pad":"{pad}"}}}}"#)
}

// ------------------------------------------------------------------------------- keepalive

/// A client that answers pings stays connected across several intervals and is still served.
#[tokio::test]
async fn keepalive_client_answering_pings_stays_connected() {
    let server = Server::with_args(&["--ping-interval", "1", "--ping-timeout", "1"]).await;
    let mut request = server.url().into_client_request().unwrap();
    request
        .headers_mut()
        .insert("auth", HeaderValue::from_static(PASSWORD));
    let (mut ws, _) = connect_async(request).await.expect("connect");
    // Read (tungstenite answers each ping with a pong as it reads) for 3.5 intervals.
    let mut pings = 0;
    let until = tokio::time::Instant::now() + Duration::from_millis(3500);
    while let Ok(message) = tokio::time::timeout_at(until, ws.next()).await {
        match message {
            Some(Ok(Message::Ping(_))) => pings += 1,
            other => panic!("unexpected while idle: {other:?}"),
        }
    }
    assert!(pings >= 2, "expected a ping per second, got {pings}");
    // Still served: notify_client to itself with a callback.
    ws.send(Message::text(
        r#"{"type":"notify_client","data":{"data":1,"callback":"cb"}}"#,
    ))
    .await
    .unwrap();
    let answer = timeout(RECV_TIMEOUT, async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Text(text))) => return text.to_string(),
                Some(Ok(Message::Ping(_))) => continue,
                other => panic!("connection ended: {other:?}"),
            }
        }
    })
    .await
    .expect("callback in time");
    assert_eq!(answer, r#"{"type":"callback","data":"cb"}"#);
}

/// A peer that completed the upgrade and reads but never answers pings is closed after one
/// interval plus the timeout; one that does not even read (with a backlog stuck in the
/// kernel) is closed within the same bound.
#[tokio::test]
async fn keepalive_peer_not_answering_pings_is_closed() {
    let server = Server::with_args(&["--ping-interval", "1", "--ping-timeout", "1"]).await;
    let mut backend = server.backend("backend").await;
    let bound = Duration::from_secs(1 + 1) + Duration::from_millis(1500);

    let mut silent = raw_websocket(server.addr).await;
    let silent_at = Instant::now();
    let mut dead = registered_dead_reader(&server, &mut backend).await;
    let started = Instant::now();
    // A backlog for the dead reader that fits its queue (no slow-consumer close): only the
    // keepalive can end it.
    let pad = "p".repeat(4000);
    for seq in 0..200 {
        backend.send_text(&notify_all_frame(seq, &pad)).await;
    }

    // The backend keeps reading (answering its own pings) meanwhile.
    let waited_from = silent_at.elapsed();
    let (end, ()) = tokio::join!(
        wait_end(&mut silent, bound + Duration::from_secs(2)),
        stay_idle(&mut backend, bound)
    );
    let closed_after = waited_from + end.after;
    eprintln!("keepalive: silent peer closed {closed_after:?} after its upgrade: {end:?}");
    assert!(
        closed_after >= Duration::from_millis(1800) && closed_after <= bound,
        "silent peer closed {closed_after:?} after its upgrade, expected 2 s (interval + \
         timeout) .. {bound:?}"
    );
    assert_eq!(end.opcodes.first(), Some(&9), "no ping first: {end:?}");
    if end.opcodes.contains(&8) {
        assert_eq!(end.close_code, Some(1001), "{end:?}");
    }

    // By then (the backend was kept reading for `bound`) the dead reader is gone too: reading
    // it now ends at once, after whatever was still buffered.
    assert!(started.elapsed() >= bound);
    let (_, close) = drain_until_end(&mut dead, Duration::from_millis(500)).await;
    eprintln!(
        "keepalive: dead reader gone {:?} after its backlog: {close:?}",
        started.elapsed()
    );
    if let Some((code, _)) = close {
        assert_eq!(code, 1001, "dead reader: {close:?}");
    }
    // The server is fine and the backend still served.
    backend.ping(1, false).await;
    assert_healthy(server.addr).await;
}

/// Keeps reading `conn` (so it answers pings) for `period`; nothing may arrive.
async fn stay_idle(conn: &mut Conn, period: Duration) {
    if let Some(event) = conn.next_event(period).await {
        panic!("{}: unexpected {event:?}", conn.name);
    }
}

// ------------------------------------------------------------------------ handshake timeout

/// A connection that sends nothing, or half a request head, is closed after
/// `--handshake-timeout`; established WebSockets are not affected.
#[tokio::test]
async fn handshake_timeout_closes_idle_and_half_sent_requests() {
    let server = Server::with_args(&["--handshake-timeout", "1"]).await;
    let mut admin = server.admin("admin").await;

    let mut idle = TcpStream::connect(server.addr).await.unwrap();
    let mut half = TcpStream::connect(server.addr).await.unwrap();
    half.write_all(format!("GET /ws HTTP/1.1\r\nHost: {}\r\nUpgr", server.addr).as_bytes())
        .await
        .unwrap();
    let start = Instant::now();
    let ((idle_after, idle_got), (half_after, half_got)) = tokio::join!(
        read_until_closed(&mut idle, start),
        read_until_closed(&mut half, start)
    );
    eprintln!(
        "handshake timeout: idle {idle_after:?} {idle_got:?}, half {half_after:?} {half_got:?}"
    );
    for (what, after, got) in [
        ("idle", idle_after, idle_got),
        ("half head", half_after, half_got),
    ] {
        assert!(
            after >= Duration::from_millis(800) && after <= Duration::from_millis(2500),
            "{what}: closed after {after:?}, expected ~1 s"
        );
        // Closed, possibly with a 408 first; never anything else.
        assert!(
            got.is_empty() || got.starts_with("HTTP/1.1 408"),
            "{what}: unexpected answer {got:?}"
        );
    }
    // The WebSocket opened before is still served (the timeout is for the HTTP head only).
    admin.ping(1, false).await;
    assert_healthy(server.addr).await;
}

/// Reads until the server closes (bounded); returns when, since `start`, and what came.
async fn read_until_closed(stream: &mut TcpStream, start: Instant) -> (Duration, String) {
    let mut buf = Vec::new();
    let _ = timeout(Duration::from_secs(4), stream.read_to_end(&mut buf)).await;
    (start.elapsed(), String::from_utf8_lossy(&buf).into_owned())
}

// -------------------------------------------------------------------------- max connections

/// The HTTP status of a refused upgrade; panics if the upgrade is accepted.
async fn refused_upgrade(url: &str, origin: Option<&str>) -> u16 {
    match timeout(RECV_TIMEOUT, connect_async(ws_request(url, origin)))
        .await
        .expect("upgrade answer in time")
    {
        Ok((_, response)) => panic!(
            "upgrade accepted ({}), expected a refusal",
            response.status()
        ),
        Err(WsError::Http(response)) => response.status().as_u16(),
        Err(e) => panic!("connect failed without an HTTP answer: {e}"),
    }
}

fn ws_request(
    url: &str,
    origin: Option<&str>,
) -> tokio_tungstenite::tungstenite::handshake::client::Request {
    let mut request = url.into_client_request().expect("ws url");
    if let Some(origin) = origin {
        request
            .headers_mut()
            .insert("origin", HeaderValue::from_str(origin).unwrap());
    }
    request
}

/// With `--max-connections 3` the 4th upgrade gets 503; once one closes, a new one is
/// accepted, and the one after is refused again. Plain HTTP is not counted.
#[tokio::test]
async fn max_connections_refuses_the_fourth_with_503_until_one_closes() {
    let server = Server::with_args(&["--max-connections", "3"]).await;
    let mut admin = server.admin("admin").await;
    let c1 = server.client("c1").await;
    let mut c2 = server.client("c2").await;
    assert_eq!(refused_upgrade(&server.url(), None).await, 503);
    assert_eq!(refused_upgrade(&server.url(), None).await, 503);
    // Refusals cost no slot and don't disturb the others; /healthz is still answered.
    assert_healthy(server.addr).await;
    admin.ping(1, false).await;

    c1.close().await;
    // The slot is given back when the connection's task ends, just after the close
    // handshake: retry briefly.
    let deadline = Instant::now() + Duration::from_secs(2);
    let c3 = loop {
        match connect_async(server.url()).await {
            Ok((ws, _)) => break ws,
            Err(WsError::Http(response)) if response.status() == 503 => {
                assert!(
                    Instant::now() < deadline,
                    "no slot 2 s after a connection closed"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("connect failed: {e}"),
        }
    };
    assert_eq!(refused_upgrade(&server.url(), None).await, 503);
    c2.send_text(r#"{"type":"no_such_event"}"#).await;
    c2.expect_silence().await;
    drop(c3);
}

/// `--max-connections` full of clients does not lock the backend out: an upgrade carrying
/// `auth:` may go over the limit, and is closed (1008 "not an admin") if its password fails,
/// so a client cannot keep such a place.
#[tokio::test]
async fn max_connections_full_of_clients_still_lets_an_admin_in() {
    let server = Server::with_args(&["--max-connections", "3"]).await;
    let _c1 = server.client("c1").await;
    let _c2 = server.client("c2").await;
    let _c3 = server.client("c3").await;
    assert_eq!(refused_upgrade(&server.url(), None).await, 503);

    let mut admin = server.admin("admin").await;
    admin.server_connect().await;

    let mut impostor = Conn::connect(&server.url(), Some("not-the-password"), "impostor").await;
    let reason = impostor.expect_close_code(1008).await;
    assert_eq!(reason, "not an admin");

    // Clients are still refused; the admin is still served.
    assert_eq!(refused_upgrade(&server.url(), None).await, 503);
    admin.ping(1, false).await;
}

/// The admins' places above `--max-connections` are shared out per address until verified:
/// one address's upgrades with garbage passwords, waiting for bcrypt, hold 4 of them and no
/// more (the 5th is refused 503), so the backend from elsewhere still gets in; and a verified
/// admin gives its address's place back, so a backend's many workers all get in.
#[tokio::test]
async fn one_address_cannot_hold_every_admin_place() {
    // Cost 12 (~0.25 s a run, one run at a time): the garbage passwords stay queued while
    // the 5th upgrade is tried, even on a slow machine.
    let hash = bcrypt::hash(PASSWORD, 12).expect("hash the test password");
    let server = Server::with_args(&["--max-connections", "1", "--auth", &hash]).await;
    let _client = server.client("client").await;
    let attacker = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
    let mut held = Vec::new();
    for i in 0..4 {
        let mut stream = common::connect_tcp_from(server.addr, attacker).await;
        let request = upgrade_request(server.addr, &format!("auth: garbage {i}\r\n"));
        stream.write_all(request.as_bytes()).await.expect("write");
        assert_eq!(read_status(&mut stream).await, Some(101), "garbage {i}");
        held.push(stream);
    }
    let mut fifth = common::connect_tcp_from(server.addr, attacker).await;
    let request = upgrade_request(server.addr, "auth: garbage 4\r\n");
    fifth.write_all(request.as_bytes()).await.expect("write");
    assert_eq!(
        read_status(&mut fifth).await,
        Some(503),
        "a 5th from one address"
    );

    let backend = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 3));
    let mut workers = Vec::new();
    for i in 0..6 {
        let name = format!("worker {i}");
        let mut worker = Conn::connect_from(server.addr, backend, Some(PASSWORD), &name).await;
        // The first waits behind the attacker's four queued bcrypt runs (cost 12, one at a
        // time): on a loaded machine that is more than the usual wait for a frame.
        worker
            .send_text(r#"{"type":"server_connect","data":{}}"#)
            .await;
        match worker.next_event(Duration::from_secs(30)).await {
            Some(common::Event::Text(text)) => {
                assert_eq!(text, r#"{"type":"server_connect","data":true}"#, "{name}")
            }
            other => panic!("{name}: expected the server_connect answer, got {other:?}"),
        }
        workers.push(worker);
    }
    for worker in &mut workers {
        worker.ping(1, false).await;
    }
    drop(held);
}

// ------------------------------------------------------------------------ max header bytes

/// A request head over `--max-header-bytes` is refused (hyper answers 431 or closes) and the
/// server keeps serving; a head just under it is accepted.
#[tokio::test]
async fn request_head_over_max_header_bytes_is_refused() {
    let server = Server::with_args(&["--max-header-bytes", "8192"]).await;
    let big = format!("X-Pad: {}\r\n", "a".repeat(10_000));
    let (_, status) = raw_request(server.addr, &upgrade_request(server.addr, &big)).await;
    eprintln!("oversized upgrade head: status {status:?}");
    assert!(
        status.is_none() || status == Some(431),
        "oversized head: expected 431 or a close, got {status:?}"
    );
    // Also when the oversized head is a plain GET.
    let (_, status) = raw_request(
        server.addr,
        &format!("GET /healthz HTTP/1.1\r\nHost: x\r\n{big}\r\n"),
    )
    .await;
    assert!(status.is_none() || status == Some(431), "got {status:?}");

    let fits = format!("X-Pad: {}\r\n", "a".repeat(6_000));
    let (_, status) = raw_request(server.addr, &upgrade_request(server.addr, &fits)).await;
    assert_eq!(status, Some(101), "a 6 KB head must be accepted");
    assert_healthy(server.addr).await;
    let mut admin = server.admin("admin").await;
    admin.ping(1, false).await;
}

// ------------------------------------------------------------------------- allowed origins

/// `--allowed-origins https://a.example`: another Origin gets 403; the listed one is accepted
/// (compared case-insensitively, trailing slash ignored). A request without Origin (a
/// backend, not a browser) is let through (server.rs `origin_allowed`). Non-upgrade routes
/// are not checked.
#[tokio::test]
async fn allowed_origins_refuse_other_origins_with_403_and_let_backends_in() {
    let server = Server::with_args(&["--allowed-origins", "https://a.example"]).await;
    let url = server.url();
    assert_eq!(refused_upgrade(&url, Some("https://b.example")).await, 403);
    assert_eq!(
        refused_upgrade(&url, Some("https://a.example.evil")).await,
        403
    );
    assert_eq!(refused_upgrade(&url, Some("http://a.example")).await, 403);
    // Backends send no Origin: they are let through (browsers always send one).
    let (mut backend, response) = connect_async(ws_request(&url, None))
        .await
        .unwrap_or_else(|e| panic!("upgrade without Origin refused: {e}"));
    assert_eq!(response.status(), 101);
    backend.close(None).await.unwrap();
    for origin in ["https://a.example", "https://A.Example/"] {
        let (mut ws, response) = connect_async(ws_request(&url, Some(origin)))
            .await
            .unwrap_or_else(|e| panic!("Origin {origin} refused: {e}"));
        assert_eq!(response.status(), 101);
        ws.close(None).await.unwrap();
    }
    assert_healthy(server.addr).await;
}

// -------------------------------------------------------------------------- slow consumer

/// A registered client that stops reading (tiny receive window) while an admin broadcasts
/// ~4 KB `notify_all`s is closed as a slow consumer once its 64 KiB queue overflows (a
/// reset, or close 1008 "slow consumer"), and counted; a normal client meanwhile receives
/// every broadcast, in order and promptly, and the admin is never held up.
///
/// The admin sends in bursts of 8 (32 KB) and waits for the normal client to have them, so
/// the normal client, which reads, never has more than half its queue outstanding.
#[tokio::test]
async fn slow_consumer_is_closed_and_others_keep_receiving_promptly() {
    const MESSAGES: usize = 1000;
    const BURST: usize = 8;
    let server = Server::with_args(&["--max-queue-bytes", "65536"]).await;
    let mut backend = server.backend("backend").await;
    let mut normal = server.client("normal").await;
    register(&mut normal, &mut backend).await;
    let mut slow = registered_dead_reader(&server, &mut backend).await;

    let pad = "x".repeat(4000);
    let start = Instant::now();
    let mut worst = Duration::ZERO;
    for burst in 0..MESSAGES / BURST {
        let sent = Instant::now();
        for seq in burst * BURST..(burst + 1) * BURST {
            backend.send_text(&notify_all_frame(seq, &pad)).await;
        }
        for seq in burst * BURST..(burst + 1) * BURST {
            let value = normal.recv().await;
            assert_eq!(value["seq"], seq, "normal client: out of order or lost");
        }
        worst = worst.max(sent.elapsed());
    }
    let took = start.elapsed();
    eprintln!("slow consumer: {MESSAGES} broadcasts in {took:?}, slowest burst {worst:?}");
    assert!(
        worst < Duration::from_millis(500),
        "normal client delayed: a burst of {BURST} took {worst:?}"
    );

    let (received, close) = drain_until_end(&mut slow, Duration::from_secs(5)).await;
    assert!(
        received < MESSAGES,
        "slow client got all {MESSAGES}: it was never cut off"
    );
    if let Some((code, reason)) = &close {
        assert_eq!((*code, reason.as_str()), (1008, "slow consumer"));
    }
    let scrape = scrape(server.addr).await;
    assert_eq!(
        scrape.get("jssocket_slow_consumer_closes_total", &[]),
        Some(1.0),
        "slow-consumer close not counted:\n{scrape:?}"
    );
    // Everyone else is fine.
    backend.ping(1, false).await;
    backend.send_text(&notify_all_frame(MESSAGES, "")).await;
    let last = normal.recv().await;
    assert_eq!(last["seq"], MESSAGES);
}

// ------------------------------------------------------------------------------ auth flood

/// One notify round trip of an acknowledged client (to itself, with a callback).
async fn round_trip(client: &mut Conn, n: u64) -> Duration {
    let start = Instant::now();
    client.ping(n, true).await;
    start.elapsed()
}

fn median(samples: &mut [Duration]) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

/// 20 connections with distinct wrong `auth` headers sending `server_connect` to a server
/// with the real default bcrypt hash and no admin yet (so each still costs bcrypt) do not
/// delay an acknowledged client's notify round trip by more than 100 ms on another server
/// of this process while the flood is being verified; the per-address queue bounds how many
/// wait (the rest are refused as busy). On the client's server, where the backend logged in,
/// a wrong password is refused at once without bcrypt, and the right one, remembered, still
/// works.
#[tokio::test]
async fn auth_flood_does_not_delay_others_and_wrong_passwords_are_refused_once_known() {
    const FLOOD: usize = 20;
    let server = Server::start_default_auth().await;
    // Pays bcrypt once; the password is then remembered.
    let mut backend = server.backend("backend").await;
    let mut client = server.client("client").await;
    let id = register(&mut client, &mut backend).await;
    acknowledge(&mut backend, &mut client, &id, None).await;

    let mut baseline = Vec::new();
    for n in 0..20 {
        baseline.push(round_trip(&mut client, n).await);
    }

    let answered = Arc::new(AtomicUsize::new(0));
    let judged = Arc::new(AtomicUsize::new(0));
    // Once a password is known every other one is judged without bcrypt, so the flood goes
    // to a server nobody logged in to; both servers' bcrypt workers share this machine.
    let flooded = Server::start_default_auth().await;
    let url = flooded.url();
    let flood: Vec<_> = (0..FLOOD)
        .map(|i| {
            let (answered, judged, url) = (Arc::clone(&answered), Arc::clone(&judged), url.clone());
            // Distinct: the same password from many requesters shares one bcrypt run.
            let password = format!("wrong password {i}");
            tokio::spawn(async move {
                let mut conn = Conn::connect(&url, Some(&password), &format!("flood{i}")).await;
                conn.send_text(r#"{"type":"server_connect","data":{}}"#)
                    .await;
                // Up to 9 bcrypt runs one after another (~0.5 s each in a debug build).
                let got = conn.next_event(Duration::from_secs(60)).await;
                answered.fetch_add(1, Ordering::SeqCst);
                match got {
                    Some(Event::Text(text)) => {
                        assert_eq!(text, r#"{"type":"server_connect","data":false}"#);
                        judged.fetch_add(1, Ordering::SeqCst);
                        conn.expect_close_code(1008).await;
                    }
                    Some(Event::Close(Some((1008, reason)))) => {
                        assert_eq!(reason, "authentication busy, retry")
                    }
                    other => panic!("flood{i}: expected false or busy, got {other:?}"),
                }
            })
        })
        .collect();

    // Round trips while the flood is being verified (at least one flood connection not
    // answered yet, before and after each).
    let mut during = Vec::new();
    let mut n = 100;
    let flood_started = Instant::now();
    while answered.load(Ordering::SeqCst) < FLOOD
        && flood_started.elapsed() < Duration::from_secs(30)
    {
        let rt = round_trip(&mut client, n).await;
        if answered.load(Ordering::SeqCst) < FLOOD {
            during.push(rt);
        }
        n += 1;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for task in flood {
        timeout(Duration::from_secs(60), task)
            .await
            .expect("every flood connection answered")
            .unwrap();
    }
    let flood_seen = flood_started.elapsed();
    assert!(
        during.len() >= 5,
        "only {} round trips during the flood ({flood_seen:?}): it was not measured",
        during.len()
    );
    let worst_during = *during.iter().max().unwrap();
    let (base, under_flood) = (median(&mut baseline), median(&mut during));
    eprintln!(
        "auth flood: baseline median {base:?}; during the flood ({flood_seen:?}, {} samples) \
         median {under_flood:?}, max {worst_during:?}",
        during.len()
    );
    assert!(
        under_flood <= base + Duration::from_millis(100),
        "round trip under the flood {under_flood:?} vs baseline {base:?}"
    );

    // The right password is known: any other short one is refused without bcrypt.
    let started = Instant::now();
    let mut wrong = server.client("wrong again").await;
    wrong
        .send_text(r#"{"type":"server_connect","data":{"auth":"wrong again"}}"#)
        .await;
    wrong
        .expect_text(r#"{"type":"server_connect","data":false}"#)
        .await;
    let refused_in = started.elapsed();
    assert!(
        refused_in < Duration::from_millis(150),
        "refusal of a wrong password took {refused_in:?}: bcrypt ran?"
    );
    wrong.expect_close_code(1008).await;
    // The right password, verified before, is remembered: accepted at once.
    let started = Instant::now();
    let mut again = server.backend("backend again").await;
    assert!(
        started.elapsed() < Duration::from_millis(150),
        "remembered password took {:?}",
        started.elapsed()
    );
    again.ping(1, false).await;
    let scrape = scrape(server.addr).await;
    assert_eq!(
        scrape.get("jssocket_auth_failures_total", &[]),
        Some(1.0),
        "{scrape:?}"
    );
    assert_eq!(
        scrape.get("jssocket_auth_verifications_total", &[]),
        Some(1.0),
        "{scrape:?}"
    );
    let scrape = common::scrape(flooded.addr).await;
    let judged = judged.load(Ordering::SeqCst);
    assert!(judged >= 1, "no flood connection was verified");
    assert_eq!(
        scrape.get("jssocket_auth_failures_total", &[]),
        Some(judged as f64),
        "{scrape:?}"
    );
    assert_eq!(
        scrape.get("jssocket_auth_busy_total", &[]),
        Some((FLOOD - judged) as f64),
        "{scrape:?}"
    );
}

/// Concurrent attempts from one address are bounded without locking the address out: of 20
/// wrong passwords verified at once, those beyond the per-address queue are refused as busy
/// (bcrypt never runs for them), the others each run bcrypt once. The right password from
/// that address is then accepted, and once it is known a wrong one costs no bcrypt.
#[tokio::test]
async fn auth_flood_from_one_address_is_bounded_but_never_locks_it_out() {
    let metrics = AuthMetrics::default();
    let auth = Authenticator::new(PasswordHash::parse(FAST_HASH).unwrap(), metrics.clone());
    let flooder = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1));
    // Distinct passwords: the same one from many requesters shares one bcrypt run.
    let passwords: Vec<_> = (0..20).map(|i| format!("wrong {i}")).collect();
    let verdicts =
        futures_util::future::join_all(passwords.iter().map(|p| auth.verify(p, flooder))).await;
    let count = |v: Verdict| verdicts.iter().filter(|x| **x == v).count();
    let (wrong, busy) = (count(Verdict::WrongPassword), count(Verdict::Busy));
    assert_eq!(wrong + busy, 20, "{verdicts:?}");
    assert!(busy >= 1 && wrong >= MAX_QUEUED_PER_ADDRESS, "{verdicts:?}");
    assert_eq!(metrics.verifications.get(), wrong as u64);
    assert_eq!(metrics.busy.get(), busy as u64);
    assert_eq!(auth.verify(PASSWORD, flooder).await, Verdict::Admin);
    assert_eq!(auth.verify("wrong", flooder).await, Verdict::WrongPassword);
    assert_eq!(auth.verify(PASSWORD, flooder).await, Verdict::Admin);
    assert_eq!(metrics.verifications.get(), wrong as u64 + 1);
    assert_eq!(metrics.waiting.get(), 0);
}

// ------------------------------------------------------------------------------- shutdown

/// Shutdown is bounded by `--shutdown-timeout` even with a dead peer (upgraded, never reads,
/// a large backlog stuck in its socket); a live client gets its 1001 close meanwhile.
#[tokio::test]
async fn shutdown_is_bounded_with_a_dead_peer() {
    let mut server = Server::with_args(&["--shutdown-timeout", "2"]).await;
    let mut backend = server.backend("backend").await;
    let mut live = server.client("live").await;
    register(&mut live, &mut backend).await;
    let _dead = registered_dead_reader(&server, &mut backend).await;
    // ~1.2 MB for the dead peer: within its 4 MiB queue (not a slow consumer), far beyond
    // what the kernel buffers take.
    let pad = "d".repeat(4000);
    for seq in 0..300 {
        backend.send_text(&notify_all_frame(seq, &pad)).await;
    }
    for seq in 0..300 {
        let value = live.recv().await;
        assert_eq!(value["seq"], seq);
    }

    let started = Instant::now();
    server.signal_shutdown();
    live.expect_close_code(1001).await;
    let result = server.shutdown().await;
    let took = started.elapsed();
    eprintln!("shutdown with a dead peer: {took:?}");
    assert!(result.is_ok(), "run returned {result:?}");
    assert!(
        took <= Duration::from_millis(3500),
        "shutdown took {took:?} with --shutdown-timeout 2"
    );
}

/// Overload protection: when the runtime lags behind a crowd of senders nobody vouched for,
/// their messages wait for a global limiter (`jssocket_overloaded` is 1, and the waits are
/// counted) while an admin's notifications to a bystander go through, and an acknowledged
/// client's own messages are never held back; nobody's message is lost, only delayed. The
/// lag threshold is set very low (2 ms) so this flood, small enough for a shared test
/// machine, engages it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_throttles_unacknowledged_senders_and_admin_notifications_still_arrive() {
    const FLOODERS: usize = 40;
    const ROUNDS: usize = 10;
    const BATCH: usize = 40;
    const NOTIFICATIONS: usize = 10;
    let server = Server::with_args(&["--overload-lag", "2"]).await;
    let mut backend = server.backend("backend").await;
    let mut bystander = server.acked_client("bystander", &mut backend, None).await;
    let bystander_id = bystander.id().to_string();
    // Registered (client_connect, which the backend never answers), not acknowledged.
    let mut flooders = Vec::new();
    for i in 0..FLOODERS {
        let mut flooder = server.client(&format!("flooder {i}")).await;
        flooder
            .send_text(r#"{"type":"client_connect","data":{"token":"never answered"}}"#)
            .await;
        flooders.push(flooder);
    }

    // Each flooder subscribes and unsubscribes over and over and reads every answer: nothing
    // may be lost, however long the limiter holds it.
    let pad = "x".repeat(4096);
    let floods: Vec<_> = flooders
        .into_iter()
        .map(|mut flooder| {
            let pad = pad.clone();
            tokio::spawn(async move {
                for _ in 0..ROUNDS {
                    for n in 0..BATCH {
                        let kind = if n % 2 == 0 {
                            "subscribe"
                        } else {
                            "unsubscribe"
                        };
                        flooder
                            .send_text(&format!(
                                r#"{{"type":"{kind}","data":{{"name":"flood","pad":"{pad}"}}}}"#
                            ))
                            .await;
                    }
                    for n in 0..BATCH {
                        let kind = if n % 2 == 0 {
                            "subscribed"
                        } else {
                            "unsubscribed"
                        };
                        flooder
                            .expect_text(&format!(
                                r#"{{"type":"{kind}","data":{{"name":"flood"}}}}"#
                            ))
                            .await;
                    }
                }
                flooder
            })
        })
        .collect();
    // Meanwhile the backend notifies the bystander, which notifies itself too (an
    // acknowledged client is never held back); every notification arrives, in order.
    let addr = server.addr;
    let mut engaged = false;
    for n in 0..NOTIFICATIONS {
        backend
            .send_json(&serde_json::json!({"type": "notify_client",
                "data": {"target": bystander_id, "data": {"n": n}}}))
            .await;
        bystander.expect_text(&format!(r#"{{"n":{n}}}"#)).await;
        bystander.ping(n as u64, true).await;
        engaged |= scrape(addr).await.get("jssocket_overloaded", &[]) == Some(1.0);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let flooders = timeout(Duration::from_secs(90), async {
        let mut done = Vec::new();
        for flood in floods {
            done.push(flood.await.expect("flooder"));
        }
        done
    })
    .await
    .expect("every flooder's messages were handled in time");
    let after = scrape(addr).await;
    let throttled = after.get("jssocket_overload_throttled_messages_total", &[]);
    assert!(
        engaged || throttled.is_some_and(|n| n > 0.0),
        "the limiter never engaged (throttled: {throttled:?})"
    );
    assert!(throttled.is_some_and(|n| n > 0.0), "{throttled:?}");
    // Everyone is still served.
    for mut flooder in flooders {
        flooder
            .send_text(r#"{"type":"subscribe","data":{"name":"after"}}"#)
            .await;
        flooder
            .expect_text(r#"{"type":"subscribed","data":{"name":"after"}}"#)
            .await;
    }
    bystander.ping(0, true).await;
}
