//! The server pool under pressure: backends must never be closed because of what clients
//! send (SPEC §6), and queued client connects are handed over, not dropped (SPEC §5, §9).

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::{Server, recv_any, wait_metric};
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

/// Thousands of client connects queued while no server is connected, each client asking
/// several times: the queue costs O(1) per `client_connect` whatever it holds, so an admin
/// bystander is answered throughout; when a backend joins, it gets every client's latest
/// request exactly once, oldest first (a repeat goes to the back, in place of the old one).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_queued_connects_stall_nobody_and_are_handed_over_in_order() {
    const BATCHES: usize = 10;
    const PER_BATCH: usize = 300;
    const CLIENTS: usize = BATCHES * PER_BATCH;
    /// Clients of the first batches ask twice more after everyone has asked once.
    const REPEATERS: usize = CLIENTS / 2;
    let server = Server::start().await;

    // The bystander: an admin whose notify round trip must be answered all along (each
    // within the receive timeout), until told to stop.
    let mut bystander = server.admin("bystander").await;
    let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
    let pings = tokio::spawn(async move {
        let mut n = 0;
        while stopped.try_recv().is_err() {
            bystander.ping(n, false).await;
            n += 1;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        n
    });

    let mut clients = Vec::with_capacity(CLIENTS);
    for batch in 0..BATCHES {
        let connects = (0..PER_BATCH).map(|k| {
            let i = batch * PER_BATCH + k;
            let server = &server;
            async move {
                let mut client = server.client(&format!("client{i}")).await;
                client
                    .send_event("client_connect", json!({ "i": i, "n": 0 }))
                    .await;
                client
            }
        });
        clients.extend(futures_util::future::join_all(connects).await);
        // Every connect of this batch is queued before the next batch sends: batch order is
        // queue order.
        let queued = ((batch + 1) * PER_BATCH) as f64;
        wait_metric(server.addr, "jssocket_pending_connects", &[], queued).await;
    }
    let repeats = clients[..REPEATERS].iter_mut().map(|client| async move {
        for n in 1..=2 {
            client.send_event("client_connect", json!({ "n": n })).await;
        }
    });
    futures_util::future::join_all(repeats).await;
    let received = (CLIENTS + 2 * REPEATERS) as f64;
    let connects = [("type", "client_connect")];
    wait_metric(
        server.addr,
        "jssocket_messages_received_total",
        &connects,
        received,
    )
    .await;
    wait_metric(
        server.addr,
        "jssocket_pending_connects",
        &[],
        CLIENTS as f64,
    )
    .await;

    let mut backend = server.admin("backend").await;
    backend
        .send_text(r#"{"type":"server_connect","data":{}}"#)
        .await;
    let mut seen = HashSet::new();
    let mut last_batch = BATCHES / 2;
    let mut answered = false;
    while seen.len() < CLIENTS {
        let frame: Value = serde_json::from_str(&backend.recv_text().await).expect("JSON frame");
        if frame["type"] == "server_connect" {
            assert_eq!(frame["data"], json!(true));
            answered = true;
            continue;
        }
        assert_eq!(frame["type"], "client_connect", "{frame}");
        let data = &frame["data"];
        let target = data["target"].as_str().expect("target").to_string();
        assert!(seen.insert(target), "forwarded twice: {frame}");
        let n = data["n"].as_u64().expect("n");
        if seen.len() <= CLIENTS - REPEATERS {
            // First the clients that asked once, in the order they asked.
            assert_eq!(
                n, 0,
                "a repeater came before those that asked once: {frame}"
            );
            let batch = data["i"].as_u64().expect("i") as usize / PER_BATCH;
            assert!(
                batch >= last_batch,
                "out of order: batch {batch} after {last_batch}"
            );
            last_batch = batch;
        } else {
            // Then the repeaters, each with its latest request only.
            assert_eq!(n, 2, "a replaced request was forwarded: {frame}");
        }
    }
    assert!(answered, "server_connect was not answered");
    backend.expect_silence().await;
    wait_metric(server.addr, "jssocket_pending_connects", &[], 0.0).await;

    let _ = stop.send(());
    let pings = tokio::time::timeout(common::RECV_TIMEOUT, pings)
        .await
        .expect("bystander stopped")
        .expect("bystander answered every round trip");
    assert!(pings > 0);
}

/// Review nit: the forwards a closed backend never wrote go back to the waiting queue within
/// its limits (`--pending-connects`), as a new request would; those it has no room for are
/// answered `no_server` instead of overfilling it.
#[tokio::test]
async fn forwards_a_closed_backend_never_wrote_respect_the_pending_limit() {
    const CLIENTS: usize = 40;
    let server =
        Server::with_args(&["--pending-connects", "2", "--max-queue-bytes", "33554432"]).await;
    // It never reads: what the kernel cannot take stays in its queue.
    let stalled = server.backend("stalled").await;
    // 12 MB of forwards, far more than the socket buffers hold.
    let token = "t".repeat(300_000);
    let mut clients = Vec::new();
    for i in 0..CLIENTS {
        let mut client = server.client(&format!("client{i}")).await;
        client
            .send_event("client_connect", json!({ "token": token }))
            .await;
        clients.push(client);
    }
    let received = [("type", "client_connect")];
    wait_metric(
        server.addr,
        "jssocket_messages_received_total",
        &received,
        CLIENTS as f64,
    )
    .await;
    drop(stalled);

    // Two go back to the queue; each of the other unsent ones gets an error.
    wait_metric(server.addr, "jssocket_pending_connects", &[], 2.0).await;
    let mut refused = 0;
    for client in &mut clients {
        if let Some(common::Event::Text(text)) = client.next_event(Duration::from_millis(200)).await
        {
            let reply: Value = serde_json::from_str(&text).expect("JSON reply");
            assert_eq!(reply["data"]["code"], "no_server", "{reply}");
            refused += 1;
        }
    }
    assert!(refused > 0, "no unsent forward was refused");
    eprintln!("{refused} of {CLIENTS} unsent forwards refused, 2 queued again");
}
