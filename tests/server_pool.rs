//! The server pool under pressure: backends must never be closed because of what clients
//! send (SPEC §6), and queued client connects are handed over, not dropped (SPEC §5, §9).

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::{Server, recv_any};
use serde_json::{Value, json};

/// 20 clients queue large client connects while no server is connected; then a backend
/// whose queue holds only a few of them joins. It must stay connected and receive every
/// one of them, a few at a time as its queue drains.
#[tokio::test]
async fn a_backend_joining_a_long_queue_is_not_closed_and_gets_every_connect() {
    let server = Server::with_args(&["--max-queue-bytes", "65536"]).await;
    let token = "t".repeat(10_000);
    let mut clients = Vec::new();
    for i in 0..20 {
        let mut client = server.client(&format!("client{i}")).await;
        client
            .send_event("client_connect", json!({ "token": token, "n": i }))
            .await;
        clients.push(client);
    }
    // Let every connect reach the pending queue before the backend joins.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut backend = server.admin("backend").await;
    backend
        .send_text(r#"{"type":"server_connect","data":{}}"#)
        .await;
    let mut seen = HashSet::new();
    let mut answered = false;
    while seen.len() < 20 {
        let frame: Value = serde_json::from_str(&backend.recv_text().await).expect("JSON frame");
        match frame["type"].as_str() {
            Some("server_connect") => {
                assert_eq!(frame["data"], json!(true));
                answered = true;
            }
            Some("client_connect") => {
                assert_eq!(frame["data"]["token"].as_str().map(str::len), Some(10_000));
                let n = frame["data"]["n"].as_u64().expect("n");
                assert!(seen.insert(n), "client {n} forwarded twice");
            }
            other => panic!("unexpected frame type {other:?}: {frame}"),
        }
    }
    assert!(answered, "server_connect was not answered");
    // Still connected and served.
    backend.ping(1, false).await;
}

/// Each client_connect is copied to a backend, so one connection may send at most 20 a
/// minute; the 21st is refused with `rate_limited` and not forwarded.
#[tokio::test]
async fn client_connect_floods_are_rate_limited() {
    let server = Server::start().await;
    let mut backend = server.backend("backend").await;
    let mut client = server.client("client").await;
    for _ in 0..20 {
        client
            .send_text(r#"{"type":"client_connect","data":{}}"#)
            .await;
        let (who, text) = recv_any(&mut [&mut backend]).await;
        assert_eq!(who, 0);
        assert!(text.starts_with(r#"{"type":"client_connect""#), "{text}");
    }
    client
        .send_text(r#"{"type":"client_connect","data":{}}"#)
        .await;
    client
        .expect_error("rate_limited", Some("client_connect"))
        .await;
    backend.expect_silence().await;
    backend.ping(1, false).await;
}
