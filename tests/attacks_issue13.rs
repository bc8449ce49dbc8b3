//! Attacks on issue 13's features (SPEC §12: presence, membership, disconnect, client calls),
//! each written as the attacker would run it, against a real server over real sockets. Each
//! test failed before the fix it names.

mod common;

use std::time::Duration;

use common::{RS, Server, expect_invoke, register, scrape, signalr_client};
use serde_json::json;

/// A crowd of SignalR callers that each open a connection, start their 16 calls and leave
/// must not keep those calls in the node's table until their deadline: they would count
/// toward the node's bound on calls in flight (`cluster_busy` for everyone once it is
/// reached, per-connection limits being reset by reconnecting) and time out for nobody. A
/// jssocket caller's calls are forgotten when it closes; a SignalR caller's were not.
///
/// Seen through `invoke_timeouts`: with a backend that never answers, only the call of the
/// caller that stayed may time out.
#[tokio::test]
async fn a_closed_signalr_callers_calls_are_forgotten() {
    let server = Server::with_args(&["--invoke-timeout", "1"]).await;
    let mut backend = server.backend("backend").await;
    let mut hub = signalr_client(server.addr, None, "signalr").await;
    for i in 0..16 {
        hub.send_text(&format!(
            r#"{{"type":1,"invocationId":"{i}","target":"m","arguments":[]}}{RS}"#
        ))
        .await;
    }
    for _ in 0..16 {
        expect_invoke(&mut backend).await;
    }
    hub.close().await;
    // The same from a jssocket caller (already right; its test in tests/invoke.rs counts the
    // late answer dropped, which a call kept for a closed caller would be too).
    let mut leaver = server.client("leaver").await;
    register(&mut leaver, &mut backend).await;
    for i in 0..16 {
        leaver
            .send_event("invoke", json!({"id": i, "method": "m", "data": null}))
            .await;
    }
    for _ in 0..16 {
        expect_invoke(&mut backend).await;
    }
    leaver.close().await;

    // A caller that stays: its call is made after the SignalR ones, so by the time it has
    // timed out, theirs have reached their deadline too.
    let mut client = server.client("client").await;
    register(&mut client, &mut backend).await;
    client
        .send_event("invoke", json!({"id": 1, "method": "m", "data": null}))
        .await;
    expect_invoke(&mut backend).await;
    let result = client.recv().await;
    assert_eq!(
        result["data"]["error"]["code"], "timeout",
        "the staying caller's call: {result}"
    );
    // The sweeper answers every expired call in one pass; give it one more period anyway.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let timeouts = scrape(server.addr)
        .await
        .value("jssocket_invoke_timeouts_total", &[]);
    assert_eq!(
        timeouts, 1.0,
        "calls of a closed caller stayed in flight until their deadline"
    );
}

/// `GET /api/info` with the admin password.
async fn get_info(addr: std::net::SocketAddr) -> common::HttpResponse {
    let auth = format!("Bearer {}", common::PASSWORD);
    common::http(addr, "GET", "/api/info", &[("Authorization", &auth)], b"").await
}

/// Presence queries asked at once on a node are bounded ([`MAX_IN_FLIGHT`] of SPEC §12's
/// `info`, `users`, …), and the bound must hold when their askers hang up: the page the node
/// builds for a query runs on a blocking thread, and an HTTP client that sends `GET
/// /api/info` and closes at once drops the wait, not that work. If the slot went with the
/// wait, wave after wave of such requests would pile up work without bound; with it held by
/// the work, the next query is refused (`429`) while the first 16 are still being built.
///
/// Each page is made slow on purpose: 20 connections with 30,000 publish-filter groups each
/// (what a backend's acknowledgement may give), which `info` counts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queries_whose_askers_hang_up_still_hold_their_slots() {
    use tokio::io::AsyncWriteExt;
    const IN_FLIGHT: usize = 16;
    let server = Server::start().await;
    let mut backend = server.backend("backend").await;
    let groups: Vec<String> = (0..30_000).map(|i| format!("g{i:05}")).collect();
    let mut clients = Vec::new();
    for i in 0..20 {
        let mut client = server.client(&format!("c{i}")).await;
        let id = register(&mut client, &mut backend).await;
        backend
            .send_event("client_connected", json!({"target": id, "groups": groups}))
            .await;
        client.recv().await;
        clients.push(client);
    }
    let started = std::time::Instant::now();
    let one = get_info(server.addr).await;
    let took = started.elapsed();
    assert_eq!(one.status, 200, "{}", one.text());
    assert!(
        took >= Duration::from_millis(30),
        "an info page took {took:?}: too fast for this test to tell anything (more groups?)"
    );

    // 16 askers that hang up once their query is under way.
    let request = format!(
        "GET /api/info HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\r\n",
        common::PASSWORD
    );
    let mut askers = Vec::new();
    for _ in 0..IN_FLIGHT {
        let mut socket = tokio::net::TcpStream::connect(server.addr)
            .await
            .expect("connect");
        socket.write_all(request.as_bytes()).await.expect("send");
        askers.push(socket);
    }
    // Long enough for each to be past authentication and building its page (a page takes
    // far longer, see above; 16 of them share the machine's cores).
    tokio::time::sleep(Duration::from_millis(100)).await;
    drop(askers);
    tokio::time::sleep(Duration::from_millis(20)).await;

    let probe = get_info(server.addr).await;
    assert_eq!(
        probe.status,
        429,
        "16 queries are still being built for askers that left, yet another was let in: {}",
        probe.text()
    );
}
