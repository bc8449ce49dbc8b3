//! Presence and introspection (SPEC §12): `info`, `users`, `connections`, `channels` over a
//! WebSocket and the HTTP API, on one node and on three (over the loopback and a real
//! Redis), with paging that lists every user once, refusals for non-admins, specific errors
//! for bad fields, a node stopped mid-request reported as timed out, and the bound on queries
//! in flight.

mod common;

#[macro_use]
#[path = "common/cluster.rs"]
mod nodes;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::{Conn, PASSWORD, Server, http, register};
use nodes::{Kind, cluster_on};
use serde_json::{Value, json};

on!([Loopback, Redis, RedisCluster] three_nodes_answer_as_one);
on!([Loopback, Redis] a_stopped_node_is_reported_as_timed_out);

/// Sends `event` with `data` and returns the answer's `data` (the reply must be of the same
/// type).
async fn ask(admin: &mut Conn, event: &str, data: Value) -> Value {
    admin.send_event(event, data).await;
    let reply = admin.recv().await;
    assert_eq!(
        reply["type"], event,
        "{}: not the answer: {reply}",
        admin.name
    );
    reply["data"].clone()
}

/// `GET /api/<event>` (`body` None) or `POST` with the body, as the admin.
async fn api(addr: SocketAddr, event: &str, body: Option<&Value>) -> (u16, Value) {
    let auth = format!("Bearer {PASSWORD}");
    let headers = [("Authorization", auth.as_str())];
    let response = match body {
        None => http(addr, "GET", &format!("/api/{event}"), &headers, b"").await,
        Some(body) => {
            let text = body.to_string();
            http(
                addr,
                "POST",
                &format!("/api/{event}"),
                &headers,
                text.as_bytes(),
            )
            .await
        }
    };
    (response.status, response.json())
}

/// Every page of `event` with `limit`, following `next`, bounded.
async fn all_pages(admin: &mut Conn, event: &str, mut data: Value, list: &str) -> Vec<Value> {
    let mut entries = Vec::new();
    for _ in 0..200 {
        let page = ask(admin, event, data.clone()).await;
        entries.extend(page[list].as_array().cloned().unwrap_or_default());
        match page["next"].as_str() {
            Some(next) => data["cursor"] = json!(next),
            None => return entries,
        }
    }
    panic!("{event}: more than 200 pages");
}

/// A client on `server`, registered through `backend` and acknowledged with these fields.
async fn acked(
    url: &str,
    name: &str,
    backend: &mut Conn,
    user: Option<&str>,
    roles: &[&str],
    groups: &[&str],
) -> Conn {
    let mut client = Conn::connect(url, None, name).await;
    let id = register(&mut client, backend).await;
    let mut data = json!({"target": id, "roles": roles, "groups": groups});
    if let Some(user) = user {
        data["user"] = json!(user);
    }
    backend.send_event("client_connected", data).await;
    let got = client.recv().await;
    assert_eq!(got["type"], "client_connected", "{name}: {got}");
    client
}

async fn subscribe(conn: &mut Conn, channel: &str) {
    conn.send_event("subscribe", json!({ "name": channel }))
        .await;
    let got = conn.recv().await;
    assert_eq!(got["type"], "subscribed", "{}: {got}", conn.name);
}

#[tokio::test]
async fn zero_one_and_many_connections() {
    let server = Server::start().await;
    let mut admin = server.admin("admin").await;
    let mut backend = server.backend("backend").await;

    // Nobody (admins and servers are not client connections).
    let info = ask(&mut admin, "info", json!({})).await;
    assert_eq!(info["connections"], 0, "{info}");
    assert_eq!(info["users"], 0, "{info}");
    assert_eq!(info["channels"], 0, "{info}");
    assert_eq!(info["groups"], 0, "{info}");
    let nodes = info["nodes"].as_array().expect("nodes");
    assert_eq!(nodes.len(), 1, "{info}");
    assert_eq!(nodes[0]["version"], env!("CARGO_PKG_VERSION"), "{info}");
    assert_eq!(nodes[0]["connections"], 0, "{info}");
    for (event, list) in [
        ("users", "users"),
        ("connections", "connections"),
        ("channels", "channels"),
    ] {
        let page = ask(&mut admin, event, json!(null)).await;
        assert_eq!(page, json!({ list: [], "next": null }), "{event}");
    }

    // One.
    let mut alice = acked(
        &server.url(),
        "alice",
        &mut backend,
        Some("alice"),
        &["r1"],
        &["g1"],
    )
    .await;
    subscribe(&mut alice, "news").await;
    let info = ask(&mut admin, "info", json!({})).await;
    assert_eq!(
        (
            &info["connections"],
            &info["users"],
            &info["channels"],
            &info["groups"]
        ),
        (&json!(1), &json!(1), &json!(1), &json!(1)),
        "{info}"
    );
    let users = ask(&mut admin, "users", json!({})).await;
    assert_eq!(
        users,
        json!({"users": [{"user": "alice", "connections": 1}], "next": null})
    );
    let connections = ask(&mut admin, "connections", json!({})).await;
    let id = alice.id().to_string();
    assert_eq!(
        connections["connections"],
        json!([{
            "target": id, "user": "alice", "group": "alice", "roles": ["r1"], "groups": ["g1"],
            "subscriptions": ["news"], "node": &id[..8],
        }]),
        "{connections}"
    );
    let channels = ask(&mut admin, "channels", json!({})).await;
    assert_eq!(
        channels,
        json!({"channels": [{"name": "news", "subscribers": 1}], "next": null})
    );

    // Many: 12 users, user k with k % 3 + 1 connections, one anonymous connection.
    let mut conns = Vec::new();
    let mut expected: BTreeMap<String, u64> = BTreeMap::new();
    expected.insert("alice".into(), 1);
    for k in 0..12 {
        let user = format!("u{k:02}");
        for c in 0..(k % 3 + 1) {
            let role = if k % 2 == 0 { "even" } else { "odd" };
            let conn = acked(
                &server.url(),
                &format!("{user}-{c}"),
                &mut backend,
                Some(&user),
                &[role],
                &["all"],
            )
            .await;
            conns.push(conn);
            *expected.entry(user.clone()).or_default() += 1;
        }
    }
    conns.push(acked(&server.url(), "anon", &mut backend, None, &[], &[]).await);
    let total: u64 = expected.values().sum::<u64>() + 1;
    let info = ask(&mut admin, "info", json!({})).await;
    assert_eq!(info["connections"], total, "{info}");
    assert_eq!(info["users"], expected.len(), "{info}");
    assert_eq!(info["groups"], 2, "g1 and all: {info}");

    // Pages of 5: every user exactly once, with its count.
    let listed = all_pages(&mut admin, "users", json!({"limit": 5}), "users").await;
    let got: Vec<(String, u64)> = listed
        .iter()
        .map(|u| {
            (
                u["user"].as_str().unwrap().to_string(),
                u["connections"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(got, expected.clone().into_iter().collect::<Vec<_>>());

    // Filters.
    let page = ask(&mut admin, "users", json!({"prefix": "u0"})).await;
    let names: Vec<&str> = page["users"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["user"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "u00", "u01", "u02", "u03", "u04", "u05", "u06", "u07", "u08", "u09"
        ]
    );
    let odd = all_pages(
        &mut admin,
        "users",
        json!({"role": "odd", "limit": 2}),
        "users",
    )
    .await;
    assert_eq!(odd.len(), 6, "{odd:?}");
    assert!(
        odd.iter()
            .all(|u| u["user"].as_str().unwrap()[1..].parse::<u32>().unwrap() % 2 == 1)
    );
    let in_g1 = ask(&mut admin, "users", json!({"group": "g1"})).await;
    assert_eq!(in_g1["users"], json!([{"user": "alice", "connections": 1}]));

    // Connections: all of them once across pages, and one user's.
    let all = all_pages(
        &mut admin,
        "connections",
        json!({"limit": 7}),
        "connections",
    )
    .await;
    assert_eq!(all.len() as u64, total);
    let mut targets: Vec<&str> = all.iter().map(|c| c["target"].as_str().unwrap()).collect();
    let sorted = {
        let mut s = targets.clone();
        s.sort();
        s.dedup();
        s
    };
    assert_eq!(targets, sorted, "in order, each once");
    targets.clear();
    let u02 = ask(&mut admin, "connections", json!({"user": "u02"})).await;
    assert_eq!(u02["connections"].as_array().unwrap().len(), 3, "{u02}");
    assert!(
        u02["connections"]
            .as_array()
            .unwrap()
            .iter()
            .all(|c| c["user"] == "u02")
    );

    // The HTTP API answers the same thing, the result as the body.
    let (status, body) = api(server.addr, "info", None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["connections"], total);
    let (status, body) = api(
        server.addr,
        "users",
        Some(&json!({"prefix": "u1", "limit": 1})),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["users"], json!([{"user": "u10", "connections": 2}]));
    let next = body["next"].as_str().expect("a next page").to_string();
    let (_, body) = api(
        server.addr,
        "users",
        Some(&json!({"prefix": "u1", "cursor": next})),
    )
    .await;
    assert_eq!(
        body,
        json!({"users": [{"user": "u11", "connections": 3}], "next": null})
    );
    drop(conns);
}

#[tokio::test]
async fn non_admins_are_refused() {
    let server = Server::start().await;
    let mut backend = server.backend("backend").await;
    let mut client = acked(&server.url(), "c", &mut backend, Some("c"), &[], &[]).await;
    for event in ["info", "users", "connections", "channels"] {
        client.send_event(event, json!({})).await;
        client.expect_error("forbidden", Some(event)).await;
        // Without a password, and with a wrong one.
        let response = http(server.addr, "GET", &format!("/api/{event}"), &[], b"").await;
        assert_eq!(response.status, 401, "{event}: {}", response.text());
        let response = http(
            server.addr,
            "POST",
            &format!("/api/{event}"),
            &[("Authorization", "Bearer wrong")],
            b"{}",
        )
        .await;
        assert_eq!(response.status, 401, "{event}: {}", response.text());
        assert_eq!(response.json()["error"]["code"], "unauthorized");
    }
    // The four notify events are still POST only.
    let auth = format!("Bearer {PASSWORD}");
    let response = http(
        server.addr,
        "GET",
        "/api/notify_all",
        &[("Authorization", &auth)],
        b"",
    )
    .await;
    assert_eq!(response.status, 405, "{}", response.text());
}

#[tokio::test]
async fn bad_fields_get_specific_errors() {
    let server = Server::start().await;
    let mut admin = server.admin("admin").await;
    let mut backend = server.backend("backend").await;
    let _a = acked(&server.url(), "a", &mut backend, Some("a"), &[], &[]).await;
    let _b = acked(&server.url(), "b", &mut backend, Some("b"), &[], &[]).await;
    let page = ask(&mut admin, "users", json!({"limit": 1})).await;
    let users_cursor = page["next"].as_str().expect("a second page").to_string();
    let long = "x".repeat(1025);
    let cases = [
        ("users", json!({"cursor": "garbage"}), "cursor"),
        ("users", json!({"cursor": 5}), "cursor"),
        ("channels", json!({"cursor": users_cursor}), "cursor"),
        ("connections", json!({"cursor": "u00"}), "cursor"),
        ("users", json!({"limit": 0}), "limit"),
        ("users", json!({"limit": 1001}), "limit"),
        ("channels", json!({"limit": "10"}), "limit"),
        ("connections", json!({"limit": 2.5}), "limit"),
        ("users", json!({"limit": -1}), "limit"),
        ("users", json!({"prefix": 7}), "prefix"),
        ("channels", json!({"prefix": long}), "prefix"),
        ("users", json!({"role": ["r"]}), "role"),
        ("connections", json!({"user": {}}), "user"),
    ];
    for (event, data, field) in cases {
        admin.send_event(event, data.clone()).await;
        let error = admin.expect_error("invalid_field", Some(event)).await;
        let message = error["message"].as_str().unwrap_or("");
        assert!(
            message.starts_with(&format!("data.{field} ")),
            "{event} {data}: {message}"
        );
        // The same over HTTP: 400 with the same error.
        let (status, body) = api(server.addr, event, Some(&data)).await;
        assert_eq!(status, 400, "{event} {data}: {body}");
        assert_eq!(body["error"]["code"], "invalid_field", "{body}");
    }
    admin.send_event("users", json!([1])).await;
    admin.expect_error("invalid_data", Some("users")).await;
    let (status, body) = api(server.addr, "users", Some(&json!("x"))).await;
    assert_eq!(
        (status, &body["error"]["code"]),
        (400, &json!("invalid_data"))
    );
    // The largest limit is accepted.
    let page = ask(&mut admin, "users", json!({"limit": 1000})).await;
    assert_eq!(page["users"].as_array().unwrap().len(), 2);
}

/// Three nodes: clients spread over them, users with connections on several nodes; each
/// user is listed once across pages with its connections summed over nodes.
async fn three_nodes_answer_as_one(kind: Kind) {
    let (_backing, nodes) = cluster_on(kind, 3).await;
    let mut backend = nodes[0].backend("backend").await;
    let mut admin = nodes[1].admin("admin").await;
    let mut conns = Vec::new();
    let mut expected: BTreeMap<String, u64> = BTreeMap::new();
    // User k has a connection on nodes k % 3 .. k % 3 + (k % 3) (1 to 3 nodes).
    for k in 0..9usize {
        let user = format!("user{k}");
        for n in 0..=(k % 3) {
            let node = &nodes[(k + n) % 3];
            let conn = acked(
                &node.url(),
                &format!("{user}@{}", node.name),
                &mut backend,
                Some(&user),
                &["r"],
                &[],
            )
            .await;
            conns.push(conn);
            *expected.entry(user.clone()).or_default() += 1;
        }
    }
    subscribe(&mut conns[0], "room").await;
    subscribe(&mut conns[1], "room").await;
    let total: u64 = expected.values().sum();

    let info = ask(&mut admin, "info", json!({})).await;
    assert_eq!(info["nodes"].as_array().map(Vec::len), Some(3), "{info}");
    assert!(
        info["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .all(|n| n["timeout"].is_null() && n["version"].is_string()),
        "{info}"
    );
    assert_eq!(info["connections"], total, "{info}");

    for limit in [1, 2, 4, 100] {
        let listed = all_pages(&mut admin, "users", json!({"limit": limit}), "users").await;
        let got: Vec<(String, u64)> = listed
            .iter()
            .map(|u| {
                (
                    u["user"].as_str().unwrap().to_string(),
                    u["connections"].as_u64().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            got,
            expected.clone().into_iter().collect::<Vec<_>>(),
            "limit {limit}"
        );
        let all = all_pages(
            &mut admin,
            "connections",
            json!({"limit": limit}),
            "connections",
        )
        .await;
        assert_eq!(all.len() as u64, total, "limit {limit}");
        for c in &all {
            let target = c["target"].as_str().unwrap();
            assert_eq!(c["node"].as_str(), Some(&target[..8]), "{c}");
        }
    }
    let room = ask(&mut admin, "channels", json!({})).await;
    assert_eq!(
        room["channels"],
        json!([{"name": "room", "subscribers": 2}]),
        "{room}"
    );
    // A user on all three nodes: its three connections.
    let user2 = ask(&mut admin, "connections", json!({"user": "user2"})).await;
    let on: std::collections::BTreeSet<&str> = user2["connections"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["node"].as_str().unwrap())
        .collect();
    assert_eq!(on.len(), 3, "{user2}");
    // Over HTTP on another node: the same.
    let (status, body) = api(nodes[2].addr, "info", None).await;
    assert_eq!((status, &body["connections"]), (200, &json!(total)));
}

/// A node stopped while the others still count it alive: `info` lists it with
/// `"timeout":true` after about a second, pages say it did not answer; and the queries in
/// flight at once on a node are bounded (the 17th waiting one is refused).
async fn a_stopped_node_is_reported_as_timed_out(kind: Kind) {
    let (_backing, mut nodes) = cluster_on(kind, 3).await;
    let mut admin = nodes[0].admin("admin").await;
    let mut backend = nodes[0].backend("backend").await;
    let _c = acked(&nodes[1].url(), "c", &mut backend, Some("c"), &[], &[]).await;
    let before = ask(&mut admin, "info", json!({})).await;
    assert_eq!(
        before["nodes"].as_array().map(Vec::len),
        Some(3),
        "{before}"
    );
    // A crash: no farewell, so the others still count it alive for a few seconds.
    let mut dead = nodes.pop().expect("three nodes");
    dead.kill();
    let started = Instant::now();
    admin.send_event("info", json!({})).await;
    // Meanwhile a page over HTTP, and a crowd of HTTP queries, wait for the dead node too.
    let addr = nodes[0].addr;
    let users = tokio::spawn(async move { api(addr, "users", Some(&json!({}))).await });
    tokio::time::sleep(Duration::from_millis(50)).await;
    let crowd: Vec<_> = (0..24)
        .map(|_| tokio::spawn(async move { api(addr, "info", None).await.0 }))
        .collect();
    let reply = admin.recv().await;
    let waited = started.elapsed();
    let info = &reply["data"];
    let listed = info["nodes"].as_array().expect("nodes");
    assert_eq!(listed.len(), 3, "{info}");
    let timed_out: Vec<&Value> = listed.iter().filter(|n| n["timeout"] == true).collect();
    assert_eq!(timed_out.len(), 1, "{info}");
    assert!(timed_out[0]["connections"].is_null(), "{info}");
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(3),
        "answered after {waited:?}"
    );
    assert_eq!(info["connections"], 1, "the live nodes' count: {info}");
    let (status, users) = users.await.expect("HTTP task");
    assert_eq!(status, 200, "{users}");
    assert_eq!(
        users["users"],
        json!([{"user": "c", "connections": 1}]),
        "{users}"
    );
    assert_eq!(
        users["timeout"].as_array().map(Vec::len),
        Some(1),
        "{users}"
    );
    let mut statuses = Vec::new();
    for task in crowd {
        statuses.push(task.await.expect("HTTP task"));
    }
    assert!(
        statuses.iter().all(|s| *s == 200 || *s == 429),
        "{statuses:?}"
    );
    assert!(statuses.contains(&429), "never bounded: {statuses:?}");
    assert!(statuses.contains(&200), "{statuses:?}");
}

/// What a peer controls cannot make an answer big: 22 clients with 256 subscriptions of
/// 200-byte names each (5 632 channels, ~50 KiB of names per connection) get pages of at most
/// `limit` channels, and `connections` pages cut at about 1 MiB (fewer than `limit`), with
/// `next` to go on; walking the pages lists everything exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_are_bounded_in_entries_and_bytes() {
    let server = Server::start().await;
    let mut admin = server.admin("admin").await;
    let mut backend = server.backend("backend").await;
    let clients = 22;
    let mut conns = Vec::new();
    for c in 0..clients {
        let mut conn = acked(
            &server.url(),
            &format!("c{c}"),
            &mut backend,
            Some("same"),
            &[],
            &[],
        )
        .await;
        for s in 0..256 {
            let name = format!("{c:03}.{s:03}.{}", "x".repeat(192));
            conn.send_event("subscribe", json!({ "name": name })).await;
        }
        for _ in 0..256 {
            let got = conn.recv().await;
            assert_eq!(got["type"], "subscribed", "{got}");
        }
        conns.push(conn);
    }
    let first = ask(&mut admin, "channels", json!({})).await;
    assert_eq!(
        first["channels"].as_array().unwrap().len(),
        100,
        "the default limit"
    );
    let big = ask(&mut admin, "channels", json!({"limit": 1000})).await;
    assert_eq!(big["channels"].as_array().unwrap().len(), 1000);
    assert!(big["next"].is_string());
    let all = all_pages(&mut admin, "channels", json!({"limit": 1000}), "channels").await;
    assert_eq!(all.len(), clients * 256);

    let page = ask(&mut admin, "connections", json!({"limit": 1000})).await;
    let n = page["connections"].as_array().unwrap().len();
    assert!(n >= 1 && n < clients, "{n} connections in one page");
    assert!(
        page.to_string().len() < 2 * 1024 * 1024,
        "{} bytes",
        page.to_string().len()
    );
    assert!(page["next"].is_string());
    let all = all_pages(
        &mut admin,
        "connections",
        json!({"limit": 1000}),
        "connections",
    )
    .await;
    assert_eq!(all.len(), clients);
    let users = ask(&mut admin, "users", json!({})).await;
    assert_eq!(
        users["users"],
        json!([{"user": "same", "connections": clients}])
    );
}
