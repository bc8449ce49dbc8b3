//! `membership` and `disconnect` (SPEC §12): runtime roles and groups seen by the next
//! `publish` on every node, future connections of a user, admin disconnects with the given
//! code and reason across nodes, refusals and bounds. Cluster scenarios run on the in-process
//! loopback, on a real `redis-server` and on a 3-master Redis Cluster (sharded Pub/Sub: no
//! order across topics) with the `on!` pattern of tests/cluster.rs; the
//! admin who changes membership and the admin who publishes next are on different nodes, so
//! the answer's promise (every node applied it) is what is tested.

mod common;

#[macro_use]
#[path = "common/cluster.rs"]
mod nodes;

use common::{Conn, Server, acknowledge, api_post, expect_silence_all, register};
use nodes::{Kind, Node, cluster_on};
use serde_json::{Value, json};

on!([Loopback, Redis, RedisCluster]
    membership_by_user_is_seen_by_the_next_publish_on_every_node,
    membership_by_target_changes_one_connection_on_its_node,
    disconnect_closes_by_user_and_by_target_across_nodes,
    a_crashed_node_is_named_in_the_answer_after_the_timeout,
);

// ---------------------------------------------------------------- helpers

/// Sends an admin event and returns its answer's `data` (the frame must be the answer).
async fn ask(admin: &mut Conn, kind: &str, data: Value) -> Value {
    admin.send_event(kind, data).await;
    let got = admin.recv().await;
    assert_eq!(
        got["type"], kind,
        "{}: not the {kind} answer: {got}",
        admin.name
    );
    got["data"].clone()
}

/// A client on `node`, registered through `backend`, acknowledged as `user` with `roles` and
/// `groups`, and subscribed to `news`.
async fn subscriber(node: &Node, name: &str, backend: &mut Conn, user: &str) -> Conn {
    let mut client = node.client(name).await;
    let id = register(&mut client, backend).await;
    acknowledge(backend, &mut client, &id, Some(user)).await;
    client
        .send_event("subscribe", json!({"name": "news"}))
        .await;
    client
        .expect_text(&json!({"type": "subscribed", "data": {"name": "news"}}).to_string())
        .await;
    client
}

fn published(tag: &str) -> String {
    json!({"type": "publish", "data": {"name": "news", "data": {"msg": tag}}}).to_string()
}

/// `admin` publishes `tag` to `news` with `filter`; exactly the `who` of `conns` get it.
async fn publish_reaches(
    admin: &mut Conn,
    filter: Value,
    tag: &str,
    conns: &mut [&mut Conn],
    who: &[usize],
) {
    let mut data = json!({"name": "news", "data": {"msg": tag}});
    if let (Some(data), Some(filter)) = (data.as_object_mut(), filter.as_object()) {
        data.extend(filter.clone());
    }
    admin.send_event("publish", data).await;
    for &i in who {
        conns[i].expect_text(&published(tag)).await;
    }
    expect_silence_all(conns).await;
}

// ---------------------------------------------------------------- cluster scenarios

async fn membership_by_user_is_seen_by_the_next_publish_on_every_node(kind: Kind) {
    let (_backing, nodes) = cluster_on(kind, 3).await;
    let mut backend = nodes[0].backend("backend").await;
    let mut a = subscriber(&nodes[0], "a", &mut backend, "ann").await;
    let mut b = subscriber(&nodes[1], "b", &mut backend, "ann").await;
    let mut c = subscriber(&nodes[2], "c", &mut backend, "ann").await;
    let mut d = subscriber(&nodes[1], "d", &mut backend, "bob").await;
    // One admin changes, others publish right after the answer, through other nodes.
    let mut changer = nodes[2].admin("changer").await;
    let mut p0 = nodes[0].admin("p0").await;
    let mut p1 = nodes[1].admin("p1").await;

    let answer = ask(
        &mut changer,
        "membership",
        json!({"action": "add", "kind": "role", "name": "vip", "user": "ann"}),
    )
    .await;
    assert_eq!(answer, json!({"connections": 3, "nodes": 3}));
    let mut conns = [&mut a, &mut b, &mut c, &mut d];
    publish_reaches(
        &mut p1,
        json!({"roles": ["vip"]}),
        "r1",
        &mut conns,
        &[0, 1, 2],
    )
    .await;

    let answer = ask(
        &mut changer,
        "membership",
        json!({"action": "add", "kind": "group", "name": "beta", "user": "bob"}),
    )
    .await;
    assert_eq!(answer, json!({"connections": 1, "nodes": 3}));
    publish_reaches(&mut p0, json!({"groups": ["beta"]}), "g1", &mut conns, &[3]).await;

    ask(
        &mut changer,
        "membership",
        json!({"action": "remove", "kind": "role", "name": "vip", "user": "ann"}),
    )
    .await;
    publish_reaches(&mut p0, json!({"roles": ["vip"]}), "r2", &mut conns, &[]).await;

    // Future connections of the user, on any node, get the user's runtime additions.
    ask(
        &mut changer,
        "membership",
        json!({"action": "add", "kind": "role", "name": "vip", "user": "ann"}),
    )
    .await;
    let mut e = subscriber(&nodes[1], "e", &mut backend, "ann").await;
    let mut f = subscriber(&nodes[0], "f", &mut backend, "ann").await;
    let mut conns = [&mut a, &mut b, &mut c, &mut d, &mut e, &mut f];
    publish_reaches(
        &mut p1,
        json!({"roles": ["vip"]}),
        "r3",
        &mut conns,
        &[0, 1, 2, 4, 5],
    )
    .await;
}

async fn membership_by_target_changes_one_connection_on_its_node(kind: Kind) {
    let (_backing, nodes) = cluster_on(kind, 3).await;
    let mut backend = nodes[0].backend("backend").await;
    let mut a = subscriber(&nodes[1], "a", &mut backend, "ann").await;
    let mut b = subscriber(&nodes[1], "b", &mut backend, "ann").await;
    let mut c = subscriber(&nodes[2], "c", &mut backend, "ann").await;
    let mut changer = nodes[0].admin("changer").await;
    let mut publisher = nodes[2].admin("publisher").await;
    let target = a.id().to_string();
    let c_id = c.id().to_string();
    let answer = ask(
        &mut changer,
        "membership",
        json!({"action": "add", "kind": "group", "name": "solo", "target": target}),
    )
    .await;
    // Applied by a's node alone.
    assert_eq!(answer, json!({"connections": 1, "nodes": 1}));
    let mut conns = [&mut a, &mut b, &mut c];
    publish_reaches(
        &mut publisher,
        json!({"groups": ["solo"]}),
        "t1",
        &mut conns,
        &[0],
    )
    .await;
    ask(
        &mut changer,
        "membership",
        json!({"action": "remove", "kind": "group", "name": "solo", "target": target}),
    )
    .await;
    publish_reaches(
        &mut publisher,
        json!({"groups": ["solo"]}),
        "t2",
        &mut conns,
        &[],
    )
    .await;
    // A target on this node: answered from here.
    let mut local = nodes[0].admin("local").await;
    let mut on_c = nodes[2].admin("on-c").await;
    let answer = ask(
        &mut on_c,
        "membership",
        json!({"action": "add", "kind": "role", "name": "r", "target": c_id}),
    )
    .await;
    assert_eq!(answer, json!({"connections": 1, "nodes": 1}));
    publish_reaches(&mut local, json!({"roles": ["r"]}), "t3", &mut conns, &[2]).await;
}

async fn disconnect_closes_by_user_and_by_target_across_nodes(kind: Kind) {
    let (_backing, nodes) = cluster_on(kind, 3).await;
    let mut backend = nodes[0].backend("backend").await;
    let mut a = subscriber(&nodes[0], "a", &mut backend, "ann").await;
    let mut b = subscriber(&nodes[1], "b", &mut backend, "ann").await;
    let mut c = subscriber(&nodes[2], "c", &mut backend, "ann").await;
    let mut d = subscriber(&nodes[2], "d", &mut backend, "bob").await;
    let mut admin = nodes[1].admin("admin").await;
    let answer = ask(
        &mut admin,
        "disconnect",
        json!({"user": "ann", "code": 4321, "reason": "maintenance ✓"}),
    )
    .await;
    assert_eq!(answer, json!({"closed": 3, "nodes": 3}));
    for conn in [&mut a, &mut b, &mut c] {
        assert_eq!(conn.expect_close_code(4321).await, "maintenance ✓");
    }
    d.expect_silence().await;
    let target = d.id().to_string();
    let answer = ask(&mut admin, "disconnect", json!({"target": target})).await;
    assert_eq!(answer, json!({"closed": 1, "nodes": 1}));
    assert_eq!(d.expect_close_code(4000).await, "");
}

/// A node that crashed (no farewell: the others still count it as live for 3.5 s) cannot
/// confirm: the answer comes after the 1 s bound and names it; the live nodes applied it.
async fn a_crashed_node_is_named_in_the_answer_after_the_timeout(kind: Kind) {
    let (_backing, mut nodes) = cluster_on(kind, 3).await;
    let mut backend = nodes[0].backend("backend").await;
    let mut a = subscriber(&nodes[0], "a", &mut backend, "ann").await;
    let mut b = subscriber(&nodes[1], "b", &mut backend, "ann").await;
    let mut admin = nodes[0].admin("admin").await;
    let mut publisher = nodes[1].admin("publisher").await;
    nodes[2].kill();
    let started = std::time::Instant::now();
    let answer = ask(
        &mut admin,
        "membership",
        json!({"action": "add", "kind": "role", "name": "vip", "user": "ann"}),
    )
    .await;
    let took = started.elapsed();
    assert_eq!(answer["connections"], 2, "{answer}");
    assert_eq!(answer["nodes"], 2, "{answer}");
    assert_eq!(
        answer["timeout"].as_array().map(Vec::len),
        Some(1),
        "{answer}"
    );
    assert!(
        took >= std::time::Duration::from_millis(900) && took < std::time::Duration::from_secs(3),
        "answered after {took:?}, not after the 1 s bound"
    );
    let mut conns = [&mut a, &mut b];
    publish_reaches(
        &mut publisher,
        json!({"roles": ["vip"]}),
        "k",
        &mut conns,
        &[0, 1],
    )
    .await;
}

// ---------------------------------------------------------------- one node

/// A server with a backend, an admin, and a client acknowledged as `ann` subscribed to news.
async fn one_node() -> (Server, Conn, Conn, Conn) {
    let server = Server::start().await;
    let mut backend = server.backend("backend").await;
    let mut client = server.client("client").await;
    let id = register(&mut client, &mut backend).await;
    acknowledge(&mut backend, &mut client, &id, Some("ann")).await;
    client
        .send_event("subscribe", json!({"name": "news"}))
        .await;
    client
        .expect_text(&json!({"type": "subscribed", "data": {"name": "news"}}).to_string())
        .await;
    let admin = server.admin("admin").await;
    (server, backend, admin, client)
}

#[tokio::test]
async fn non_admins_are_refused() {
    let (_server, _backend, _admin, mut client) = one_node().await;
    let id = client.id().to_string();
    client
        .send_event(
            "membership",
            json!({"action": "add", "kind": "role", "name": "admin", "target": id}),
        )
        .await;
    client.expect_error("forbidden", Some("membership")).await;
    client
        .send_event("disconnect", json!({"user": "ann"}))
        .await;
    client.expect_error("forbidden", Some("disconnect")).await;
    client.expect_silence().await;
}

#[tokio::test]
async fn bad_fields_get_specific_errors() {
    let (_server, _backend, mut admin, client) = one_node().await;
    let id = client.id().to_string();
    let unknown = "00000000-0000-4000-8000-000000000000";
    let long_name = "n".repeat(201);
    let cases: &[(&str, Value, &str)] = &[
        (
            "membership",
            json!({"action": "toggle", "kind": "role", "name": "x", "user": "u"}),
            "invalid_field",
        ),
        (
            "membership",
            json!({"kind": "role", "name": "x", "user": "u"}),
            "missing_field",
        ),
        (
            "membership",
            json!({"action": "add", "kind": "team", "name": "x", "user": "u"}),
            "invalid_field",
        ),
        (
            "membership",
            json!({"action": "add", "kind": "role", "user": "u"}),
            "missing_field",
        ),
        (
            "membership",
            json!({"action": "add", "kind": "role", "name": long_name, "user": "u"}),
            "invalid_field",
        ),
        (
            "membership",
            json!({"action": "add", "kind": "role", "name": "x"}),
            "missing_field",
        ),
        (
            "membership",
            json!({"action": "add", "kind": "role", "name": "x", "user": "u", "target": id}),
            "invalid_field",
        ),
        (
            "membership",
            json!({"action": "add", "kind": "role", "name": "x", "target": unknown}),
            "unknown_target",
        ),
        (
            "membership",
            json!({"action": "add", "kind": "role", "name": "x", "target": "not-an-id"}),
            "unknown_target",
        ),
        ("membership", json!([1, 2]), "invalid_data"),
        (
            "disconnect",
            json!({"user": "ann", "code": 3999}),
            "invalid_field",
        ),
        (
            "disconnect",
            json!({"user": "ann", "code": 5000}),
            "invalid_field",
        ),
        (
            "disconnect",
            json!({"user": "ann", "code": "4000"}),
            "invalid_field",
        ),
        (
            "disconnect",
            json!({"user": "ann", "code": 4000.5}),
            "invalid_field",
        ),
        (
            "disconnect",
            json!({"user": "ann", "reason": "é".repeat(62)}),
            "invalid_field",
        ),
        (
            "disconnect",
            json!({"user": "ann", "reason": 7}),
            "invalid_field",
        ),
        ("disconnect", json!({}), "missing_field"),
        ("disconnect", json!({"target": unknown}), "unknown_target"),
    ];
    for (kind, data, code) in cases {
        admin.send_event(kind, data.clone()).await;
        let got = admin.expect_error(code, Some(kind)).await;
        assert!(got["message"].is_string(), "{kind} {data}: {got}");
    }
    // Nothing was closed, nothing changed: the client is still there.
    let mut client = client;
    client.expect_silence().await;
    // 123 bytes of UTF-8 is the most a close frame carries: accepted.
    let reason = "é".repeat(61) + "x";
    assert_eq!(reason.len(), 123);
    let answer = ask(
        &mut admin,
        "disconnect",
        json!({"user": "ann", "reason": reason}),
    )
    .await;
    assert_eq!(answer, json!({"closed": 1, "nodes": 1}));
    assert_eq!(client.expect_close_code(4000).await, reason);
}

#[tokio::test]
async fn the_user_table_is_bounded() {
    let (_server, _backend, mut admin, mut client) = one_node().await;
    for i in 0..64u32 {
        let answer = ask(
            &mut admin,
            "membership",
            json!({"action": "add", "kind": if i.is_multiple_of(2) { "role" } else { "group" }, "name": format!("n{i}"), "user": "ann"}),
        )
        .await;
        assert_eq!(answer, json!({"connections": 1, "nodes": 1}));
    }
    // Adding one already there is not a new entry.
    ask(
        &mut admin,
        "membership",
        json!({"action": "add", "kind": "role", "name": "n0", "user": "ann"}),
    )
    .await;
    admin
        .send_event(
            "membership",
            json!({"action": "add", "kind": "role", "name": "one-more", "user": "ann"}),
        )
        .await;
    admin
        .expect_error("membership_full", Some("membership"))
        .await;
    // A removal makes room again.
    ask(
        &mut admin,
        "membership",
        json!({"action": "remove", "kind": "role", "name": "n0", "user": "ann"}),
    )
    .await;
    ask(
        &mut admin,
        "membership",
        json!({"action": "add", "kind": "role", "name": "one-more", "user": "ann"}),
    )
    .await;
    // And the refused name never reached the connection.
    let mut conns = [&mut client];
    publish_reaches(&mut admin, json!({"roles": ["n0"]}), "x", &mut conns, &[]).await;
    publish_reaches(
        &mut admin,
        json!({"roles": ["one-more"]}),
        "y",
        &mut conns,
        &[0],
    )
    .await;
}

#[tokio::test]
async fn remove_takes_off_a_name_the_acknowledgement_gave_until_the_next_acknowledgement() {
    let server = Server::start().await;
    let mut backend = server.backend("backend").await;
    let mut client = server.client("client").await;
    let id = register(&mut client, &mut backend).await;
    backend
        .send_event(
            "client_connected",
            json!({"target": id, "user": "ann", "roles": ["staff"]}),
        )
        .await;
    client.recv().await;
    client
        .send_event("subscribe", json!({"name": "news"}))
        .await;
    client.recv().await;
    let mut admin = server.admin("admin").await;
    ask(
        &mut admin,
        "membership",
        json!({"action": "remove", "kind": "role", "name": "staff", "user": "ann"}),
    )
    .await;
    let mut conns = [&mut client];
    publish_reaches(
        &mut admin,
        json!({"roles": ["staff"]}),
        "a",
        &mut conns,
        &[],
    )
    .await;
    // A later acknowledgement that gives it gives it again, and keeps runtime additions.
    ask(
        &mut admin,
        "membership",
        json!({"action": "add", "kind": "group", "name": "beta", "user": "ann"}),
    )
    .await;
    backend
        .send_event(
            "client_connected",
            json!({"target": id, "user": "ann", "roles": ["staff"]}),
        )
        .await;
    conns[0].recv().await;
    publish_reaches(
        &mut admin,
        json!({"roles": ["staff"]}),
        "b",
        &mut conns,
        &[0],
    )
    .await;
    publish_reaches(
        &mut admin,
        json!({"groups": ["beta"]}),
        "c",
        &mut conns,
        &[0],
    )
    .await;
}

#[tokio::test]
async fn the_http_api_answers_the_same() {
    let (server, _backend, mut admin, mut client) = one_node().await;
    let response = api_post(
        server.addr,
        "membership",
        r#"{"action":"add","kind":"role","name":"vip","user":"ann"}"#,
    )
    .await;
    assert_eq!(response.status, 200);
    assert_eq!(&response.body[..], br#"{"connections":1,"nodes":1}"#);
    let mut conns = [&mut client];
    publish_reaches(&mut admin, json!({"roles": ["vip"]}), "h", &mut conns, &[0]).await;
    let response = api_post(server.addr, "disconnect", r#"{"user":"ann","code":1000}"#).await;
    assert_eq!(response.status, 400);
    let body: Value = serde_json::from_slice(&response.body).expect("a JSON error");
    assert_eq!(body["error"]["code"], "invalid_field", "{body}");
    let response = api_post(server.addr, "disconnect", r#"{"user":"ann","code":4999}"#).await;
    assert_eq!(response.status, 200);
    assert_eq!(&response.body[..], br#"{"closed":1,"nodes":1}"#);
    assert_eq!(client.expect_close_code(4999).await, "");
}
