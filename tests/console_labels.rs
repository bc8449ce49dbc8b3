//! Labelled notifies (the web console's opt-in): a jssocket connection upgraded with
//! `?labels=1` receives `notify_*` payloads as `{"type":"notify_client"|"notify_group"|
//! "notify_all","data":<payload>}`; every other connection (no query, `labels=0`, SignalR)
//! still gets exactly what it got before. Exact frames, on one node and across two.

mod common;

#[path = "common/cluster.rs"]
mod nodes;

use common::{Conn, Server, acknowledge, api_post, invocation, register, signalr_client};
use nodes::{Kind, cluster_on};
use serde_json::json;

/// A client upgraded at `url` + `query`, registered through `backend` and acknowledged into
/// group `user`.
async fn acked(url: &str, query: &str, name: &str, backend: &mut Conn, user: &str) -> Conn {
    let mut client = Conn::connect(&format!("{url}{query}"), None, name).await;
    let id = register(&mut client, backend).await;
    acknowledge(backend, &mut client, &id, Some(user)).await;
    client
}

#[tokio::test]
async fn labelled_connections_are_told_the_kind_others_get_the_bare_payload() {
    let server = Server::start().await;
    let url = server.url();
    let mut backend = server.backend("backend").await;
    let mut labelled = acked(&url, "?labels=1", "labelled", &mut backend, "alice").await;
    let mut plain = acked(&url, "", "plain", &mut backend, "alice").await;
    let mut zero = acked(&url, "?labels=0", "labels=0", &mut backend, "alice").await;
    // A malformed query asks for nothing either.
    let mut malformed = acked(&url, "?labels=%zz", "malformed", &mut backend, "alice").await;
    let mut signalr = signalr_client(server.addr, None, "signalr").await;

    // notify_client, to each of two connections: only the labelled one is told the kind.
    let payload = r#"{"type":"error","data":{"spoof":true}}"#;
    for (target, expected) in [
        (
            labelled.id().to_string(),
            format!(r#"{{"type":"notify_client","data":{payload}}}"#),
        ),
        (plain.id().to_string(), payload.to_string()),
    ] {
        let body = format!(r#"{{"target":"{target}","data":{payload}}}"#);
        let answer = api_post(server.addr, "notify_client", &body).await;
        assert_eq!(answer.status, 200, "{}", answer.text());
        let conn = if target == labelled.id() {
            &mut labelled
        } else {
            &mut plain
        };
        conn.expect_text(&expected).await;
    }

    // notify_group to alice's group, from an admin's WebSocket (another delivery path).
    let mut admin = server.admin("admin").await;
    admin
        .send_event(
            "notify_group",
            json!({"target": "alice", "data": [1, "two"]}),
        )
        .await;
    labelled
        .expect_text(r#"{"type":"notify_group","data":[1,"two"]}"#)
        .await;
    for conn in [&mut plain, &mut zero, &mut malformed] {
        conn.expect_text(r#"[1,"two"]"#).await;
    }

    // notify_all, with a falsy payload (sent as {}): SignalR reads its invocation as before.
    let answer = api_post(server.addr, "notify_all", "0").await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    labelled
        .expect_text(r#"{"type":"notify_all","data":{}}"#)
        .await;
    for conn in [&mut plain, &mut zero, &mut malformed] {
        conn.expect_text("{}").await;
    }
    signalr.expect_text(&invocation("notify", "{}")).await;

    // A publish is an envelope already: the same frame for labelled and plain subscribers.
    for conn in [&mut labelled, &mut plain] {
        conn.send_event("subscribe", json!({"name": "foo.bar"}))
            .await;
        conn.expect_text(r#"{"type":"subscribed","data":{"name":"foo.bar"}}"#)
            .await;
    }
    let answer = api_post(
        server.addr,
        "publish",
        r#"{"name":"foo.bar","data":{"n":1}}"#,
    )
    .await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    let frame = r#"{"type":"publish","data":{"name":"foo.bar","data":{"n":1}}}"#;
    labelled.expect_text(frame).await;
    plain.expect_text(frame).await;

    for conn in [&mut labelled, &mut plain, &mut zero, &mut malformed] {
        conn.expect_silence().await;
    }
}

/// A notify from another node is labelled where the connection is: the backplane carries the
/// bare delivery, and the node that holds the connection writes its form.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_notify_from_another_node_is_labelled_where_the_connection_is() {
    let (_backing, nodes) = cluster_on(Kind::Loopback, 2).await;
    let mut backend = nodes[1].backend("backend").await;
    let url = nodes[1].url();
    let mut labelled = acked(&url, "?labels=1", "labelled", &mut backend, "bob").await;
    let mut plain = acked(&url, "", "plain", &mut backend, "bob").await;

    let mut admin = nodes[0].admin("admin").await;
    admin
        .send_event("notify_group", json!({"target": "bob", "data": {"x": 1}}))
        .await;
    labelled
        .expect_text(r#"{"type":"notify_group","data":{"x":1}}"#)
        .await;
    plain.expect_text(r#"{"x":1}"#).await;
    let target = labelled.id().to_string();
    admin
        .send_event("notify_client", json!({"target": target, "data": "hi"}))
        .await;
    labelled
        .expect_text(r#"{"type":"notify_client","data":"hi"}"#)
        .await;
    admin.send_event("notify_all", json!({"all": true})).await;
    labelled
        .expect_text(r#"{"type":"notify_all","data":{"all":true}}"#)
        .await;
    plain.expect_text(r#"{"all":true}"#).await;
}
