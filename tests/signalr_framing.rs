//! SPEC §10: the SignalR handshake and the record-separated framing over a raw WebSocket, for
//! the edge cases the real client never produces (tests/signalr drives the real client).

mod common;

use common::{Conn, Server};
use serde_json::Value;

const RS: char = '\u{1e}';

async fn signalr(server: &Server, name: &str) -> Conn {
    Conn::connect(&format!("ws://{}/sockets", server.addr), None, name).await
}

/// Connects and completes the JSON handshake.
async fn handshaken(server: &Server, name: &str) -> Conn {
    let mut conn = signalr(server, name).await;
    conn.send_text(&format!("{{\"protocol\":\"json\",\"version\":1}}{RS}"))
        .await;
    conn.expect_text(&format!("{{}}{RS}")).await;
    conn
}

/// The next frame as one SignalR message (it must end with the record separator).
async fn recv_message(conn: &mut Conn) -> Value {
    let text = conn.recv_text().await;
    let record = text
        .strip_suffix(RS)
        .unwrap_or_else(|| panic!("{}: no record separator in {text:?}", conn.name));
    serde_json::from_str(record).unwrap_or_else(|e| panic!("{}: {record:?}: {e}", conn.name))
}

#[tokio::test]
async fn a_handshake_without_its_record_separator_times_out() {
    let server = Server::with_args(&["--signalr-handshake-timeout", "1"]).await;
    let mut conn = signalr(&server, "no-rs").await;
    conn.send_text("{\"protocol\":\"json\",\"version\":1}")
        .await;
    let reason = conn.expect_close_code(1008).await;
    assert!(reason.contains("handshake"), "reason {reason:?}");
}

#[tokio::test]
async fn bad_handshakes_get_an_error_then_close() {
    let server = Server::start().await;
    for (request, needle) in [
        (format!("{{{RS}"), "not valid JSON"),
        (
            format!("{{\"protocol\":\"json\",\"version\":2}}{RS}"),
            "version 2",
        ),
        (
            format!("{{\"protocol\":\"messagepack\",\"version\":1}}{RS}"),
            "messagepack",
        ),
    ] {
        let mut conn = signalr(&server, "bad-handshake").await;
        conn.send_text(&request).await;
        let answer = recv_message(&mut conn).await;
        let error = answer["error"].as_str().unwrap_or_default();
        assert!(error.contains(needle), "{request:?} answered {answer}");
        conn.expect_close_code(1008).await;
    }
}

#[tokio::test]
async fn several_records_per_frame_and_records_across_frames() {
    let server = Server::start().await;
    let mut conn = signalr(&server, "batched").await;
    // The handshake and an invocation in one frame.
    conn.send_text(&format!(
        "{{\"protocol\":\"json\",\"version\":1}}{RS}{{\"type\":1,\"target\":\"a\",\"invocationId\":\"1\",\"arguments\":[]}}{RS}"
    ))
    .await;
    conn.expect_text(&format!("{{}}{RS}")).await;
    let completion = recv_message(&mut conn).await;
    assert_eq!(completion["type"], 3);
    assert_eq!(completion["invocationId"], "1");
    assert!(
        completion["error"]
            .as_str()
            .is_some_and(|e| e.contains("no_server"))
    );
    // A ping, then an invocation split over two frames.
    conn.send_text(&format!("{{\"type\":6}}{RS}{{\"type\":1,\"tar"))
        .await;
    conn.send_text(&format!(
        "get\":\"b\",\"invocationId\":\"2\",\"arguments\":[]}}{RS}"
    ))
    .await;
    let completion = recv_message(&mut conn).await;
    assert_eq!(completion["invocationId"], "2");
    // A fire-and-forget invocation (no id) gets nothing.
    conn.send_text(&format!(
        "{{\"type\":1,\"target\":\"c\",\"arguments\":[]}}{RS}"
    ))
    .await;
    conn.expect_silence().await;
}

#[tokio::test]
async fn a_message_that_is_not_json_closes_with_an_error() {
    let server = Server::start().await;
    let mut conn = handshaken(&server, "bad-json").await;
    conn.send_text(&format!("{{nope{RS}")).await;
    let close = recv_message(&mut conn).await;
    assert_eq!(close["type"], 7);
    assert!(close["error"].is_string(), "{close}");
    assert!(close.get("allowReconnect").is_none(), "{close}");
    conn.expect_close_code(1008).await;
}

#[tokio::test]
async fn an_oversized_record_closes_with_an_error() {
    let server = Server::with_args(&["--max-message-size", "1024"]).await;
    let mut conn = handshaken(&server, "oversized").await;
    // No record separator, over two frames: the unfinished record is what is too big.
    conn.send_text(&"x".repeat(600)).await;
    conn.send_text(&"x".repeat(600)).await;
    let close = recv_message(&mut conn).await;
    assert_eq!(close["type"], 7);
    assert!(
        close["error"].as_str().is_some_and(|e| e.contains("1024")),
        "{close}"
    );
    conn.expect_close_code(1008).await;
}

#[tokio::test]
async fn a_binary_frame_closes_with_an_error() {
    let server = Server::start().await;
    let mut conn = handshaken(&server, "binary").await;
    conn.send_binary(vec![1u8, 2, 3]).await;
    let close = recv_message(&mut conn).await;
    assert_eq!(close["type"], 7);
    assert!(
        close["error"].as_str().is_some_and(|e| e.contains("Text")),
        "{close}"
    );
    conn.expect_close_code(1008).await;
}

/// A connection token from negotiate opens its own connection only: not while that one is
/// open, not when changed, not on another server (another key).
#[tokio::test]
async fn a_connection_token_opens_only_its_own_connection() {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let server = Server::start().await;
    let other = Server::start().await;
    let answer = common::http(
        server.addr,
        "POST",
        "/sockets/negotiate?negotiateVersion=1",
        &[],
        b"",
    )
    .await;
    let token = answer.json()["connectionToken"]
        .as_str()
        .expect("a connection token")
        .to_string();
    let url = |addr: std::net::SocketAddr, token: &str| {
        format!("ws://{addr}/sockets?id={token}")
            .into_client_request()
            .expect("a valid URL")
    };
    let mut first = Conn::connect(
        &format!("ws://{}/sockets?id={token}", server.addr),
        None,
        "first",
    )
    .await;
    first
        .send_text(&format!("{{\"protocol\":\"json\",\"version\":1}}{RS}"))
        .await;
    first.expect_text(&format!("{{}}{RS}")).await;
    let mut forged = token.clone().into_bytes();
    forged[40] = if forged[40] == b'a' { b'b' } else { b'a' };
    let forged = String::from_utf8(forged).expect("hex");
    for (addr, token, name) in [
        (server.addr, token.as_str(), "again while open"),
        (server.addr, forged.as_str(), "forged"),
        (server.addr, "0123", "garbage"),
        (other.addr, token.as_str(), "another server"),
    ] {
        let (status, body) = common::upgrade_refused(url(addr, token), name).await;
        assert_eq!(status, 404, "{name}: {body}");
        assert!(body.contains("negotiate again"), "{name}: {body}");
    }
    // The first connection is untouched.
    first.expect_silence().await;
}
