//! Attacks on issue 13's features (SPEC §12: presence, membership, disconnect, client calls),
//! each written as the attacker would run it, against a real server over real sockets. Each
//! test failed before the fix it names.

mod common;

use std::time::Duration;

use common::{Conn, RS, Server, register, scrape, signalr_client};
use serde_json::{Value, json};

/// The next frame of `backend` is an `invoke`; returns its data.
async fn expect_invoke(backend: &mut Conn) -> Value {
    let frame = backend.recv().await;
    assert_eq!(
        frame["type"], "invoke",
        "{}: not an invoke: {frame}",
        backend.name
    );
    frame["data"].clone()
}

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
        "the closed SignalR caller's 16 calls stayed in flight until their deadline"
    );
}
