//! The cluster (SPEC §8): several in-process jssocket nodes joined by a backing each test
//! starts for itself, so tests run in parallel without hearing each other. Every scenario
//! runs on the in-process loopback (no Redis), on a real `redis-server`, and (all but the
//! outage) on a real 3-master Redis Cluster with sharded Pub/Sub: single-node code and
//! cluster code cannot drift apart on one backing unnoticed. Clients, servers and admins
//! are spread over the nodes; every delivery is checked to happen exactly once (the payload
//! arrives, then nothing more for [`common::SILENCE`]); routing is checked by counting what
//! each node receives.
//!
//! Every wait is bounded: nodes are ready when their `/metrics` say `jssocket_cluster_connected
//! 1` and `jssocket_cluster_nodes N`, Redis when it answers `INFO`; nothing sleeps for long.

mod common;

#[macro_use]
#[path = "common/cluster.rs"]
mod nodes;

use std::time::{Duration, Instant};

use common::{
    Conn, Event, RECV_TIMEOUT, api_post, expect_silence_all, invocation, recv_any, register,
    signalr_client,
};
use nodes::{
    CLUSTER_TIMEOUT, Kind, Node, POLL, Proxy, Redis, cluster_on, metric, wait_all, wait_cluster,
};
use serde_json::{Value, json};

on!([Loopback, Redis, RedisCluster]
    jaseci_flow_across_nodes,
    every_notify_and_publish_crosses_nodes_exactly_once,
    client_connect_is_served_round_robin_by_servers_on_other_nodes,
    a_crashed_node_takes_only_its_own_connections,
    a_stopped_node_is_forgotten_at_once,
    signalr_connections_are_reached_from_every_node,
);
on!([Loopback, Redis] an_outage_is_survived_and_the_backlog_is_delivered_once);

// ---------------------------------------------------------------- frames

/// The bare frame a notify delivers for payload `{"msg": tag}`.
fn bare(tag: &str) -> String {
    json!({ "msg": tag }).to_string()
}

/// The frame a subscriber of `channel` receives for a publish of `{"msg": tag}`.
fn published(channel: &str, tag: &str) -> String {
    json!({"type": "publish", "data": {"name": channel, "data": {"msg": tag}}}).to_string()
}

fn callback(tag: &str) -> String {
    json!({"type": "callback", "data": {"cb": tag}}).to_string()
}

/// Asserts that `conns[i]` receives exactly the frames listed for `i` (in that order, by
/// text), then that nothing more arrives anywhere: exactly once, no strays.
async fn expect_frames(conns: &mut [&mut Conn], expected: &[(usize, String)]) {
    for (i, text) in expected {
        conns[*i].expect_text(text).await;
    }
    expect_silence_all(conns).await;
}

/// Every index in `who` gets `text` once; nobody else gets anything.
async fn expect_once(conns: &mut [&mut Conn], who: &[usize], text: &str) {
    let expected: Vec<(usize, String)> = who.iter().map(|&i| (i, text.to_string())).collect();
    expect_frames(conns, &expected).await;
}

/// Subscribes `conn` to `channel`.
async fn subscribe(conn: &mut Conn, channel: &str) {
    conn.send_event("subscribe", json!({ "name": channel }))
        .await;
    conn.expect_text(&json!({"type": "subscribed", "data": {"name": channel}}).to_string())
        .await;
}

/// `backend` acknowledges `client` with `user`, `roles` and `groups`; the client receives the
/// same data less `user`, in order.
async fn acknowledge_as(
    backend: &mut Conn,
    client: &mut Conn,
    user: &str,
    roles: &[&str],
    groups: &[&str],
) {
    let id = client.id().to_string();
    backend
        .send_event(
            "client_connected",
            json!({"target": id, "user": user, "roles": roles, "groups": groups}),
        )
        .await;
    let expected = json!({
        "type": "client_connected",
        "data": {"target": id, "roles": roles, "groups": groups},
    });
    client.expect_text(&expected.to_string()).await;
}

/// A client on `node` registered through `backend` (wherever it is: it must be the cluster's
/// only server) and acknowledged into group `user`.
async fn acked_client(node: &Node, name: &str, backend: &mut Conn, user: &str) -> Conn {
    let mut client = node.client(name).await;
    register(&mut client, backend).await;
    acknowledge_as(backend, &mut client, user, &[], &[]).await;
    client
}

/// A client on `node` whose connect reached one of `servers` (whichever the round robin
/// chose), acknowledged by that server into group `user`.
async fn acked_via(node: &Node, name: &str, servers: &mut [&mut Conn], user: &str) -> Conn {
    let mut client = node.client(name).await;
    let i = connect_via(&mut client, servers).await;
    acknowledge_as(servers[i], &mut client, user, &[], &[]).await;
    client
}

/// The client sends `client_connect`; returns which of `servers` received the forward (and
/// checks it names this client).
async fn connect_via(client: &mut Conn, servers: &mut [&mut Conn]) -> usize {
    client.send_event("client_connect", json!({})).await;
    let (i, text) = recv_any(servers).await;
    let forward: Value = serde_json::from_str(&text).expect("forward is JSON");
    assert_eq!(
        forward["type"], "client_connect",
        "expected a forward: {text}"
    );
    let id = forward["data"]["target"].as_str().expect("forward target");
    client.id = Some(id.to_string());
    i
}

// ---------------------------------------------------------------- 1. the Jaseci flow

/// The flow Jaseci runs, with the backend on node B and the browsers on node A (and one on
/// B): the token goes A → B, the acknowledgement B → A, and every notify reaches its target
/// on the other node exactly once.
async fn jaseci_flow_across_nodes(kind: Kind) {
    let (_backing, nodes) = cluster_on(kind, 2).await;
    let (a, b) = (&nodes[0], &nodes[1]);
    let mut backend = b.backend("backend").await;

    // Alice's browser on A, logging in with a token.
    let mut alice = a.client("alice").await;
    alice
        .send_text(r#"{"type":"client_connect","data":{"token":"tok-alice","lang":"en"}}"#)
        .await;
    let forward = backend.recv_text().await;
    let parsed: Value = serde_json::from_str(&forward).expect("forward is JSON");
    let alice_id = parsed["data"]["target"]
        .as_str()
        .expect("forward has a target")
        .to_string();
    assert_eq!(
        forward,
        format!(
            r#"{{"type":"client_connect","data":{{"token":"tok-alice","lang":"en","target":"{alice_id}"}}}}"#
        ),
        "the forward keeps every key in order and appends target"
    );
    alice.id = Some(alice_id.clone());
    // What Jaseci answers: the token removed, `authenticated` and `user` added.
    backend
        .send_text(&format!(
            r#"{{"type":"client_connected","data":{{"lang":"en","target":"{alice_id}","authenticated":true,"user":"user-alice"}}}}"#
        ))
        .await;
    alice
        .expect_text(&format!(
            r#"{{"type":"client_connected","data":{{"lang":"en","target":"{alice_id}","authenticated":true}}}}"#
        ))
        .await;
    // No error for the backend: in a cluster the target is somewhere else.
    backend.expect_silence().await;

    // Alice's second tab on B (local to the backend) and an anonymous browser on A.
    let mut alice_b = b.client("alice-tab2").await;
    register(&mut alice_b, &mut backend).await;
    acknowledge_as(&mut backend, &mut alice_b, "user-alice", &[], &[]).await;
    let mut anon = acked_client(a, "anon", &mut backend, "public").await;
    let alice_b_id = alice_b.id().to_string();

    let mut all = [&mut alice, &mut alice_b, &mut anon, &mut backend];
    const ALICE: usize = 0;
    const ALICE_B: usize = 1;
    const BACKEND: usize = 3;

    // notify_client B → A, with a callback back to the backend.
    all[BACKEND]
        .send_event(
            "notify_client",
            json!({"target": alice_id, "data": {"msg": "nc"}, "callback": {"cb": "nc"}}),
        )
        .await;
    expect_frames(&mut all, &[(ALICE, bare("nc")), (BACKEND, callback("nc"))]).await;

    // notify_group to a connection id on the other node: its group, both tabs, once each.
    all[BACKEND]
        .send_event(
            "notify_group",
            json!({"target": alice_id, "data": {"msg": "ng-id"}, "callback": {"cb": "ng-id"}}),
        )
        .await;
    expect_frames(
        &mut all,
        &[
            (ALICE, bare("ng-id")),
            (ALICE_B, bare("ng-id")),
            (BACKEND, callback("ng-id")),
        ],
    )
    .await;

    // notify_group to a connection id on this node: resolved here, delivered on A too.
    all[BACKEND]
        .send_event(
            "notify_group",
            json!({"target": alice_b_id, "data": {"msg": "ng-local-id"}}),
        )
        .await;
    expect_once(&mut all, &[ALICE, ALICE_B], &bare("ng-local-id")).await;

    // notify_group to the user's group by name.
    all[BACKEND]
        .send_event(
            "notify_group",
            json!({"target": "user-alice", "data": {"msg": "ng-name"}}),
        )
        .await;
    expect_once(&mut all, &[ALICE, ALICE_B], &bare("ng-name")).await;

    // Alice notifies herself from A (acknowledged client, default target).
    all[ALICE]
        .send_event("notify_client", json!({"data": {"msg": "self"}}))
        .await;
    expect_once(&mut all, &[ALICE], &bare("self")).await;
}

// ---------------------------------------------------------------- 2. every notify, publish

/// Who a test client is: node, group (`user`), roles, groups, subscribed to `news` or not.
struct Profile {
    name: &'static str,
    node: usize,
    /// `None`: registered but never acknowledged.
    user: Option<&'static str>,
    roles: &'static [&'static str],
    groups: &'static [&'static str],
    subscribed: bool,
}

const PROFILES: &[Profile] = &[
    Profile {
        name: "a",
        node: 0,
        user: Some("g1"),
        roles: &["editor"],
        groups: &["red"],
        subscribed: true,
    },
    Profile {
        name: "b",
        node: 0,
        user: Some("g1"),
        roles: &["viewer"],
        groups: &["blue"],
        subscribed: true,
    },
    Profile {
        name: "c",
        node: 0,
        user: Some("g2"),
        roles: &[],
        groups: &[],
        subscribed: true,
    },
    Profile {
        name: "a",
        node: 1,
        user: Some("g1"),
        roles: &["viewer"],
        groups: &["red"],
        subscribed: true,
    },
    Profile {
        name: "b",
        node: 1,
        user: Some("g1"),
        roles: &["editor"],
        groups: &["blue"],
        subscribed: false,
    },
    Profile {
        name: "c",
        node: 1,
        user: Some("g2"),
        roles: &["editor"],
        groups: &[],
        subscribed: true,
    },
    Profile {
        name: "a",
        node: 2,
        user: Some("g1"),
        roles: &[],
        groups: &["blue"],
        subscribed: true,
    },
    Profile {
        name: "b",
        node: 2,
        user: Some("g1"),
        roles: &["viewer", "editor"],
        groups: &["red"],
        subscribed: true,
    },
    Profile {
        name: "c",
        node: 2,
        user: Some("g2"),
        roles: &["viewer"],
        groups: &["red"],
        subscribed: true,
    },
    Profile {
        name: "anon",
        node: 2,
        user: None,
        roles: &[],
        groups: &[],
        subscribed: true,
    },
];

/// Indices of the profiles matching `pred`.
fn who(pred: impl Fn(&Profile) -> bool) -> Vec<usize> {
    (0..PROFILES.len())
        .filter(|&i| pred(&PROFILES[i]))
        .collect()
}

/// Three nodes, clients on each, admins on two of them: every kind of notify and every kind
/// of publish filter reaches exactly the right clients, each exactly once.
async fn every_notify_and_publish_crosses_nodes_exactly_once(kind: Kind) {
    let (_backing, nodes) = cluster_on(kind, 3).await;
    let mut backend = nodes[0].backend("backend").await;
    let mut conns = Vec::new();
    for p in PROFILES {
        let node = &nodes[p.node];
        let mut client = node.client(p.name).await;
        register(&mut client, &mut backend).await;
        if let Some(user) = p.user {
            acknowledge_as(&mut backend, &mut client, user, p.roles, p.groups).await;
        }
        if p.subscribed {
            subscribe(&mut client, "news").await;
        }
        conns.push(client);
    }
    let ids: Vec<String> = conns.iter().map(|c| c.id().to_string()).collect();
    let mut adm1 = nodes[1].admin("adm1").await;
    let mut adm2 = nodes[2].admin("adm2").await;
    let n = PROFILES.len();
    let (adm1_i, adm2_i) = (n + 1, n + 2);
    let mut all: Vec<&mut Conn> = conns.iter_mut().collect();
    all.extend([&mut backend, &mut adm1, &mut adm2]);

    let everyone = who(|_| true);
    let g1 = who(|p| p.user == Some("g1"));
    let g2 = who(|p| p.user == Some("g2"));
    assert_eq!((g1.len(), g2.len()), (6, 3));

    // notify_all from n1: every registered client on every node, acknowledged or not.
    all[adm1_i]
        .send_event("notify_all", json!({"msg": "all"}))
        .await;
    expect_once(&mut all, &everyone, &bare("all")).await;

    // notify_all through the HTTP API of n2.
    let response = api_post(nodes[2].addr, "notify_all", r#"{"msg":"api-all"}"#).await;
    assert_eq!(response.status, 200, "{}", response.text());
    expect_once(&mut all, &everyone, &bare("api-all")).await;

    // notify_group by name from n2.
    all[adm2_i]
        .send_event(
            "notify_group",
            json!({"target": "g1", "data": {"msg": "g1"}, "callback": {"cb": "g1"}}),
        )
        .await;
    let mut expected: Vec<(usize, String)> = g1.iter().map(|&i| (i, bare("g1"))).collect();
    expected.push((adm2_i, callback("g1")));
    expect_frames(&mut all, &expected).await;

    // notify_group by the id of a client on another node (n2.c, in g2), from n1.
    all[adm1_i]
        .send_event(
            "notify_group",
            json!({"target": ids[8], "data": {"msg": "g2-by-id"}, "callback": {"cb": "g2"}}),
        )
        .await;
    let mut expected: Vec<(usize, String)> = g2.iter().map(|&i| (i, bare("g2-by-id"))).collect();
    expected.push((adm1_i, callback("g2")));
    expect_frames(&mut all, &expected).await;

    // notify_group by the id of a client on n0 (in g1), from n2.
    all[adm2_i]
        .send_event(
            "notify_group",
            json!({"target": ids[1], "data": {"msg": "g1-by-id"}}),
        )
        .await;
    expect_once(&mut all, &g1, &bare("g1-by-id")).await;

    // notify_client from n2 to a client on n0, with the callback to the sender.
    all[adm2_i]
        .send_event(
            "notify_client",
            json!({"target": ids[0], "data": {"msg": "one"}, "callback": {"cb": "one"}}),
        )
        .await;
    expect_frames(&mut all, &[(0, bare("one")), (adm2_i, callback("one"))]).await;

    // notify_client to an id no node has: nothing delivered, the callback still comes.
    let nobody = "00000000-0000-4000-8000-000000000000";
    all[adm1_i]
        .send_event(
            "notify_client",
            json!({"target": nobody, "data": {"msg": "lost"}, "callback": {"cb": "lost"}}),
        )
        .await;
    expect_frames(&mut all, &[(adm1_i, callback("lost"))]).await;

    // publish without a filter: every subscriber on every node (not n1.b, not subscribed).
    all[adm1_i]
        .send_event("publish", json!({"name": "news", "data": {"msg": "p-all"}}))
        .await;
    expect_once(
        &mut all,
        &who(|p| p.subscribed),
        &published("news", "p-all"),
    )
    .await;

    // publish to roles, groups, users: only the matching subscribers, wherever they are.
    let cases: [(&str, Value, Vec<usize>); 3] = [
        (
            "p-roles",
            json!({"roles": ["editor"]}),
            who(|p| p.subscribed && p.roles.contains(&"editor")),
        ),
        (
            "p-groups",
            json!({"groups": ["red", "green"]}),
            who(|p| p.subscribed && p.groups.contains(&"red")),
        ),
        (
            "p-users",
            json!({"users": ["g2"]}),
            who(|p| p.subscribed && p.user == Some("g2")),
        ),
    ];
    for (tag, filter, matching) in cases {
        assert!(
            matching.len() >= 2,
            "{tag}: the filter must match on several nodes"
        );
        let mut data = json!({"name": "news", "data": {"msg": tag}});
        for (key, value) in filter.as_object().expect("filter object") {
            data[key] = value.clone();
        }
        all[adm2_i].send_event("publish", data).await;
        expect_once(&mut all, &matching, &published("news", tag)).await;
    }

    // An acknowledged client on n0 notifies a client on n2, with a callback.
    all[0]
        .send_event(
            "notify_client",
            json!({"target": ids[8], "data": {"msg": "c2c"}, "callback": {"cb": "c2c"}}),
        )
        .await;
    expect_frames(&mut all, &[(8, bare("c2c")), (0, callback("c2c"))]).await;

    // An acknowledged client on n1 notifies the group of a client on n0 (g2).
    all[3]
        .send_event(
            "notify_group",
            json!({"target": ids[2], "data": {"msg": "c2g"}, "callback": {"cb": "c2g"}}),
        )
        .await;
    let mut expected: Vec<(usize, String)> = g2.iter().map(|&i| (i, bare("c2g"))).collect();
    expected.push((3, callback("c2g")));
    expect_frames(&mut all, &expected).await;
}

// ---------------------------------------------------------------- 3. servers elsewhere

/// A node without a server hands its client connects to servers on other nodes, round robin
/// over the cluster, and stops choosing a server as soon as it closes.
async fn client_connect_is_served_round_robin_by_servers_on_other_nodes(kind: Kind) {
    let (_backing, nodes) = cluster_on(kind, 3).await;
    let (a, b, c) = (&nodes[0], &nodes[1], &nodes[2]);

    // Only A has a server: a client on C is served by it, and acknowledged from A.
    let mut s1 = a.backend("s1").await;
    let mut watcher = c.client("watcher").await;
    register(&mut watcher, &mut s1).await;
    acknowledge_as(&mut s1, &mut watcher, "w", &[], &[]).await;

    // A second server on B. Once the watcher on C hears from B, C knows that server too.
    let mut s2 = b.backend("s2").await;
    wait_all(
        &[c],
        "jssocket_cluster_remote_servers",
        2.0,
        CLUSTER_TIMEOUT,
    )
    .await;

    // Clients on C: forwards alternate between the two servers.
    let mut order = Vec::new();
    let mut clients = Vec::new();
    for i in 0..6 {
        let mut client = c.client(&format!("rr{i}")).await;
        order.push(connect_via(&mut client, &mut [&mut s1, &mut s2]).await);
        clients.push(client);
    }
    assert!(
        order.windows(2).all(|w| w[0] != w[1]),
        "forwards must alternate between the servers on A and B: {order:?}"
    );
    // Each forward went to one server only.
    expect_silence_all(&mut [&mut s1, &mut s2, &mut watcher]).await;
    // A forward from C is answered from wherever it landed: s2 acknowledges a client on C.
    let i = order.iter().position(|&s| s == 1).expect("one went to s2");
    acknowledge_as(&mut s2, &mut clients[i], "rr", &[], &[]).await;

    // s2 closes: B announces it at once; from then on C forwards only to s1.
    s2.close().await;
    wait_all(
        &[c],
        "jssocket_cluster_remote_servers",
        1.0,
        CLUSTER_TIMEOUT,
    )
    .await;
    for i in 0..4 {
        let mut client = c.client(&format!("after{i}")).await;
        assert_eq!(
            connect_via(&mut client, &mut [&mut s1]).await,
            0,
            "after s2 closed"
        );
    }
    expect_silence_all(&mut [&mut s1, &mut watcher]).await;

    // A client on B (no server there now) is served by A too.
    let mut on_b = b.client("on-b").await;
    register(&mut on_b, &mut s1).await;
}

// ---------------------------------------------------------------- 4. a node crashes

/// A node that dies without a word takes only its own connections: the rest of the cluster
/// goes on exactly once, and its servers stop being chosen once it is forgotten (3.5 s
/// without a heartbeat).
async fn a_crashed_node_takes_only_its_own_connections(kind: Kind) {
    let (_backing, mut nodes) = cluster_on(kind, 3).await;
    let mut s0 = nodes[0].backend("s0").await;
    let mut s2 = nodes[2].backend("s2").await;
    // A client per node (and a probe on n1), each acknowledged by whichever server its connect
    // reached, all in group g. Once the probe hears from n0 and n2, n1 knows both servers.
    let mut probe = acked_via(&nodes[1], "probe", &mut [&mut s0, &mut s2], "g").await;
    wait_all(
        &[&nodes[1]],
        "jssocket_cluster_remote_servers",
        2.0,
        CLUSTER_TIMEOUT,
    )
    .await;
    let mut c0 = acked_via(&nodes[0], "c0", &mut [&mut s0, &mut s2], "g").await;
    let mut c1 = acked_via(&nodes[1], "c1", &mut [&mut s0, &mut s2], "g").await;
    let mut c2 = acked_via(&nodes[2], "c2", &mut [&mut s0, &mut s2], "g").await;
    let mut admin1 = nodes[1].admin("admin1").await;

    // Before: n1's client connects alternate between s0 (on n0) and s2 (on n2).
    let mut order = Vec::new();
    for i in 0..4 {
        let mut client = nodes[1].client(&format!("before{i}")).await;
        order.push(connect_via(&mut client, &mut [&mut s0, &mut s2]).await);
    }
    assert!(
        order.windows(2).all(|w| w[0] != w[1]),
        "forwards from n1 must alternate between s0 and s2: {order:?}"
    );
    admin1
        .send_event("notify_all", json!({"msg": "before"}))
        .await;
    expect_once(
        &mut [&mut c0, &mut c1, &mut c2, &mut probe, &mut s0, &mut s2],
        &[0, 1, 2, 3],
        &bare("before"),
    )
    .await;

    // n2 crashes: its connections drop without a close frame.
    let crashed_at = Instant::now();
    nodes[2].kill();
    for conn in [&mut c2, &mut s2] {
        match conn.next_event(RECV_TIMEOUT).await {
            Some(Event::Gone(_)) => {}
            other => panic!(
                "{}: expected the connection to drop, got {other:?}",
                conn.name
            ),
        }
    }

    // The others go on at once, exactly once, across n0 and n1.
    let mut rest = [&mut c0, &mut c1, &mut probe, &mut s0, &mut admin1];
    rest[4]
        .send_event("notify_all", json!({"msg": "after"}))
        .await;
    expect_once(&mut rest, &[0, 1, 2], &bare("after")).await;
    rest[4]
        .send_event(
            "notify_group",
            json!({"target": "g", "data": {"msg": "g-after"}}),
        )
        .await;
    expect_once(&mut rest, &[0, 1, 2], &bare("g-after")).await;
    let c1_id = rest[1].id().to_string();
    rest[3]
        .send_event(
            "notify_client",
            json!({"target": c1_id, "data": {"msg": "n0-to-n1"}}),
        )
        .await;
    expect_once(&mut rest, &[1], &bare("n0-to-n1")).await;

    // n2 is forgotten within NODE_EXPIRY (3.5 s) after its last heartbeat, and the gauge
    // says so at the next heartbeat: at most ~4.5 s after the crash.
    let live = [&nodes[0], &nodes[1]];
    wait_all(&live, "jssocket_cluster_nodes", 2.0, CLUSTER_TIMEOUT).await;
    let forgotten = crashed_at.elapsed();
    assert!(
        forgotten <= Duration::from_millis(4800),
        "the crashed node was forgotten only after {forgotten:?}"
    );
    // Its server is no longer chosen: every connect from n1 goes to s0.
    for i in 0..4 {
        let mut client = nodes[1].client(&format!("after{i}")).await;
        assert_eq!(connect_via(&mut client, &mut [&mut s0]).await, 0);
    }
    expect_silence_all(&mut [&mut s0, &mut c0, &mut c1, &mut probe]).await;
}

/// A node stopped gracefully (SIGTERM) closes its connections with 1001 and says so: the
/// others forget it, and its servers, at once instead of after NODE_EXPIRY.
async fn a_stopped_node_is_forgotten_at_once(kind: Kind) {
    let (_backing, mut nodes) = cluster_on(kind, 3).await;
    let mut s0 = nodes[0].backend("s0").await;
    let mut s2 = nodes[2].backend("s2").await;
    let mut probe = acked_via(&nodes[1], "probe", &mut [&mut s0, &mut s2], "g").await;
    wait_all(
        &[&nodes[1]],
        "jssocket_cluster_remote_servers",
        2.0,
        CLUSTER_TIMEOUT,
    )
    .await;
    let mut c2 = acked_via(&nodes[2], "c2", &mut [&mut s0, &mut s2], "g").await;

    let stopped_at = Instant::now();
    nodes[2].signal_stop();
    c2.expect_close_code(1001).await;
    s2.expect_close_code(1001).await;
    nodes[2].wait_ended();

    // Forgotten at the next heartbeat (1 s), not after NODE_EXPIRY (3.5 s after the last
    // heartbeat it sent, so never before 2.5 s).
    let live = [&nodes[0], &nodes[1]];
    wait_all(&live, "jssocket_cluster_nodes", 2.0, CLUSTER_TIMEOUT).await;
    let forgotten = stopped_at.elapsed();
    assert!(
        forgotten < Duration::from_millis(2000),
        "a node that stopped gracefully was forgotten only after {forgotten:?}: its `leaving` \
         did not reach the others, they waited for NODE_EXPIRY"
    );
    for i in 0..4 {
        let mut client = nodes[1].client(&format!("after{i}")).await;
        assert_eq!(connect_via(&mut client, &mut [&mut s0]).await, 0);
    }
    expect_silence_all(&mut [&mut s0, &mut probe]).await;
}

// ---------------------------------------------------------------- 5. Redis restarts

/// Redis killed and restarted on the same port: each node keeps delivering locally, the nodes
/// reconnect by themselves, and what had to cross nodes during the outage (notifies,
/// publishes, a client connect for a server elsewhere) is delivered after it, exactly once.
async fn an_outage_is_survived_and_the_backlog_is_delivered_once(kind: Kind) {
    let (mut backing, nodes) = cluster_on(kind, 3).await;
    let node_refs: Vec<&Node> = nodes.iter().collect();
    let mut backend = nodes[0].backend("backend").await;
    let mut c0 = acked_client(&nodes[0], "c0", &mut backend, "g").await;
    let mut c1 = acked_client(&nodes[1], "c1", &mut backend, "g").await;
    let mut c2 = acked_client(&nodes[2], "c2", &mut backend, "g").await;
    for client in [&mut c0, &mut c1, &mut c2] {
        subscribe(client, "news").await;
    }
    let mut admin0 = nodes[0].admin("admin0").await;
    let mut admin1 = nodes[1].admin("admin1").await;
    {
        let mut all = [
            &mut c0,
            &mut c1,
            &mut c2,
            &mut backend,
            &mut admin0,
            &mut admin1,
        ];
        all[4]
            .send_event("notify_all", json!({"msg": "before"}))
            .await;
        expect_once(&mut all, &[0, 1, 2], &bare("before")).await;
    }

    // Redis goes away; every node notices.
    backing.outage();
    let outage = Instant::now();
    wait_all(&node_refs, "jssocket_cluster_connected", 0.0, RECV_TIMEOUT).await;

    // While it is down, each node still delivers to its own connections, at once.
    let c0_id = c0.id().to_string();
    let mut late = nodes[2].client("late").await;
    {
        let mut all = [
            &mut c0,
            &mut c1,
            &mut c2,
            &mut backend,
            &mut admin0,
            &mut admin1,
        ];
        all[4]
            .send_event(
                "notify_client",
                json!({"target": c0_id, "data": {"msg": "local"}, "callback": {"cb": "local"}}),
            )
            .await;
        expect_frames(&mut all, &[(0, bare("local")), (4, callback("local"))]).await;
        // These must cross nodes: n1's own client gets them now, the others after the outage.
        all[5]
            .send_event(
                "notify_group",
                json!({"target": "g", "data": {"msg": "outage-group"}}),
            )
            .await;
        all[5]
            .send_event(
                "publish",
                json!({"name": "news", "data": {"msg": "outage-publish"}}),
            )
            .await;
        all[1].expect_text(&bare("outage-group")).await;
        all[1]
            .expect_text(&published("news", "outage-publish"))
            .await;
    }
    // A client on n2 (no server there) connects while Redis is down: n2 still knows the
    // server on n0, so the forward waits in the backlog.
    late.send_event("client_connect", json!({"token": "t"}))
        .await;
    expect_silence_all(&mut [&mut c0, &mut c2, &mut backend, &mut late]).await;

    // Back on the same port, well within NODE_EXPIRY: the nodes reconnect by themselves.
    backing.restore();
    let down_for = outage.elapsed();
    wait_all(
        &node_refs,
        "jssocket_cluster_connected",
        1.0,
        CLUSTER_TIMEOUT,
    )
    .await;
    let reconnected = outage.elapsed();

    // What waited is delivered now, once, in order; the connect reaches the backend on n0.
    c0.expect_text(&bare("outage-group")).await;
    c0.expect_text(&published("news", "outage-publish")).await;
    c2.expect_text(&bare("outage-group")).await;
    c2.expect_text(&published("news", "outage-publish")).await;
    let forward = backend.recv().await;
    assert_eq!(forward["type"], "client_connect", "{forward}");
    assert_eq!(forward["data"]["token"], "t", "{forward}");
    let late_id = forward["data"]["target"]
        .as_str()
        .expect("target")
        .to_string();
    late.id = Some(late_id);
    acknowledge_as(&mut backend, &mut late, "g", &[], &[]).await;
    let mut all = [
        &mut c0,
        &mut c1,
        &mut c2,
        &mut late,
        &mut backend,
        &mut admin0,
        &mut admin1,
    ];
    expect_silence_all(&mut all).await;

    // And everything crosses nodes again, exactly once.
    wait_cluster(&node_refs).await;
    all[5]
        .send_event("notify_all", json!({"msg": "again"}))
        .await;
    expect_once(&mut all, &[0, 1, 2, 3], &bare("again")).await;
    all[6]
        .send_event("publish", json!({"name": "news", "data": {"msg": "again"}}))
        .await;
    expect_once(&mut all, &[0, 1, 2], &published("news", "again")).await;
    all[6]
        .send_event(
            "notify_group",
            json!({"target": "g", "data": {"msg": "g-again"}}),
        )
        .await;
    expect_once(&mut all, &[0, 1, 2, 3], &bare("g-again")).await;
    eprintln!("redis down for {down_for:?}; all nodes resubscribed after {reconnected:?}");
}

/// An outage longer than NODE_EXPIRY (the nodes have forgotten each other when Redis comes
/// back) after which one node (n0) is cut off from Redis a moment longer than the others:
/// what n2 had to tell the cluster during the outage must wait for n0 to re-subscribe too,
/// not only for the nodes that happen to be back first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backlog_after_a_long_outage_waits_for_every_node() {
    let mut redis = Redis::start();
    let proxy = Proxy::start(&redis).await;
    let nodes = [
        Node::start("n0", &proxy.url()),
        Node::start("n1", &redis.url()),
        Node::start("n2", &redis.url()),
    ];
    let node_refs: Vec<&Node> = nodes.iter().collect();
    wait_cluster(&node_refs).await;
    let mut backend = nodes[1].backend("backend").await;
    let mut c0 = acked_client(&nodes[0], "c0", &mut backend, "g").await;
    let mut c1 = acked_client(&nodes[1], "c1", &mut backend, "g").await;
    let mut c2 = acked_client(&nodes[2], "c2", &mut backend, "g").await;
    let mut admin2 = nodes[2].admin("admin2").await;

    // Redis goes away for longer than NODE_EXPIRY: every node forgets the others.
    redis.kill();
    wait_all(&node_refs, "jssocket_cluster_nodes", 1.0, CLUSTER_TIMEOUT).await;
    admin2
        .send_event(
            "notify_group",
            json!({"target": "g", "data": {"msg": "long"}}),
        )
        .await;
    c2.expect_text(&bare("long")).await;
    let published = metric(&nodes[2], "jssocket_cluster_published_total")
        .await
        .expect("published counter");

    // Redis is back, but n0 reaches it only a moment after n1 and n2 are subscribed again,
    // or as soon as n2 has published what waited (then n0 has missed it: the bug).
    proxy.set_open(false);
    redis.restart();
    let others = [&nodes[1], &nodes[2]];
    wait_all(&others, "jssocket_cluster_connected", 1.0, CLUSTER_TIMEOUT).await;
    let late = Instant::now() + Duration::from_millis(500);
    while Instant::now() < late
        && metric(&nodes[2], "jssocket_cluster_published_total").await == Some(published)
    {
        tokio::time::sleep(POLL).await;
    }
    proxy.set_open(true);
    wait_all(
        &node_refs,
        "jssocket_cluster_connected",
        1.0,
        CLUSTER_TIMEOUT,
    )
    .await;

    // Delivered once on n0 and n1; n2 had it at once and gets nothing more.
    let mut all = [&mut c0, &mut c1, &mut c2, &mut backend, &mut admin2];
    expect_once(&mut all, &[0, 1], &bare("long")).await;
    wait_cluster(&node_refs).await;
    all[4]
        .send_event("notify_all", json!({"msg": "again"}))
        .await;
    expect_once(&mut all, &[0, 1, 2], &bare("again")).await;
}

// ---------------------------------------------------------------- 6. routing, counted

/// Deliveries each node has received from the backplane so far.
async fn deliveries(nodes: &[Node]) -> Vec<f64> {
    let mut counts = Vec::new();
    for node in nodes {
        let count = metric(node, "jssocket_cluster_deliveries_received_total").await;
        counts.push(count.expect("the deliveries counter"));
    }
    counts
}

/// What each node received from the backplane since `before`.
async fn received_since(nodes: &[Node], before: &[f64]) -> Vec<f64> {
    let now = deliveries(nodes).await;
    now.iter().zip(before).map(|(now, was)| now - was).collect()
}

/// SPEC §8: a node receives only what concerns its own connections. Four nodes, a client on
/// each of n1, n2, n3, the admin on n0; each delivery is counted where it is received:
/// a `notify_client` reaches the target's node alone; a group with members on two nodes
/// costs those two; a channel with subscribers on one node costs that one; only
/// `notify_all` goes to every node.
async fn routing_reaches_only_the_nodes_concerned(kind: Kind) {
    let (_backing, nodes) = cluster_on(kind, 4).await;
    let mut backend = nodes[0].backend("backend").await;
    let mut c1 = acked_client(&nodes[1], "c1", &mut backend, "two").await;
    let mut c2 = acked_client(&nodes[2], "c2", &mut backend, "two").await;
    let mut c3 = acked_client(&nodes[3], "c3", &mut backend, "other").await;
    subscribe(&mut c3, "news").await;
    let mut admin = nodes[0].admin("admin").await;
    let mut admin3 = nodes[3].admin("admin3").await;
    let c2_id = c2.id().to_string();
    let c1_id = c1.id().to_string();
    // For JOIN_GRACE after an acknowledgement sent to another node, the acknowledging node
    // also sends that group's messages to the client's node (twins, against the race with
    // its subscription): counted from when those are over.
    tokio::time::sleep(jssocket::cluster::JOIN_GRACE + Duration::from_millis(200)).await;

    // notify_client to a connection on n2: n2 alone receives it.
    let before = deliveries(&nodes).await;
    admin
        .send_event(
            "notify_client",
            json!({"target": c2_id, "data": {"msg": "p2p"}}),
        )
        .await;
    expect_once(&mut [&mut c1, &mut c2, &mut c3], &[1], &bare("p2p")).await;
    assert_eq!(received_since(&nodes, &before).await, [0.0, 0.0, 1.0, 0.0]);

    // notify_group to a group with members on n1 and n2: those two.
    let before = deliveries(&nodes).await;
    admin
        .send_event(
            "notify_group",
            json!({"target": "two", "data": {"msg": "group"}}),
        )
        .await;
    expect_once(&mut [&mut c1, &mut c2, &mut c3], &[0, 1], &bare("group")).await;
    assert_eq!(received_since(&nodes, &before).await, [0.0, 1.0, 1.0, 0.0]);

    // notify_group to c1's id, from n3: n1 resolves the group, delivers, and passes it to
    // the group's topic (n2, and n1's own echo); n0 and n3 hear nothing.
    let before = deliveries(&nodes).await;
    admin3
        .send_event(
            "notify_group",
            json!({"target": c1_id, "data": {"msg": "group-of"}}),
        )
        .await;
    expect_once(&mut [&mut c1, &mut c2, &mut c3], &[0, 1], &bare("group-of")).await;
    assert_eq!(received_since(&nodes, &before).await, [0.0, 2.0, 1.0, 0.0]);

    // publish to a channel whose only subscriber is on n3.
    let before = deliveries(&nodes).await;
    admin
        .send_event("publish", json!({"name": "news", "data": {"msg": "news"}}))
        .await;
    expect_once(
        &mut [&mut c1, &mut c2, &mut c3],
        &[2],
        &published("news", "news"),
    )
    .await;
    assert_eq!(received_since(&nodes, &before).await, [0.0, 0.0, 0.0, 1.0]);

    // notify_all: every node (n0 its own echo).
    let before = deliveries(&nodes).await;
    admin.send_event("notify_all", json!({"msg": "all"})).await;
    expect_once(&mut [&mut c1, &mut c2, &mut c3], &[0, 1, 2], &bare("all")).await;
    assert_eq!(received_since(&nodes, &before).await, [1.0, 1.0, 1.0, 1.0]);

    // The last member of a group leaving a node unsubscribes it: n2 hears no more of "two".
    c2.close().await;
    let before = deliveries(&nodes).await;
    let deadline = Instant::now() + CLUSTER_TIMEOUT;
    loop {
        let before = deliveries(&nodes).await;
        admin
            .send_event(
                "notify_group",
                json!({"target": "two", "data": {"msg": "after"}}),
            )
            .await;
        c1.expect_text(&bare("after")).await;
        let got = received_since(&nodes, &before).await;
        if got == [0.0, 1.0, 0.0, 0.0] {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "n2 still receives group two after its last member left: {got:?}"
        );
        tokio::time::sleep(POLL).await;
    }
    let _ = before;
    expect_silence_all(&mut [&mut c1, &mut c3]).await;
}

on!([Loopback, Redis, RedisCluster] routing_reaches_only_the_nodes_concerned);

// ---------------------------------------------------------------- 7. Redis Cluster changes

/// Sends `notify_group` to `group` from `admin`, a new tag each time, until `member` gets
/// one (the topic's shard is changing hands): bounded by [`CLUSTER_TIMEOUT`] twice. Then
/// lets what is still on its way arrive (each tag at most once) and returns.
async fn until_delivered(admin: &mut Conn, member: &mut Conn, group: &str, what: &str) {
    let deadline = Instant::now() + 2 * CLUSTER_TIMEOUT;
    let mut sent = Vec::new();
    let mut seen = Vec::new();
    while seen.is_empty() {
        assert!(
            Instant::now() < deadline,
            "{what}: no notify_group reached the member on another node: the node did not \
             subscribe again"
        );
        let tag = format!("{what}-{}", sent.len());
        admin
            .send_event(
                "notify_group",
                json!({"target": group, "data": {"msg": tag}}),
            )
            .await;
        sent.push(bare(&tag));
        while let Some(Event::Text(text)) = member.next_event(Duration::from_millis(300)).await {
            seen.push(text);
        }
    }
    while let Some(Event::Text(text)) = member.next_event(common::SILENCE).await {
        seen.push(text);
    }
    for text in &seen {
        assert!(sent.contains(text), "{what}: unexpected {text}");
        let times = seen.iter().filter(|t| *t == text).count();
        assert_eq!(times, 1, "{what}: {text} delivered {times} times");
    }
}

/// A Redis Cluster changing under the relay (SPEC §8): the slot of a group's topic moves to
/// another master, then that master dies and its replica takes over; each time the nodes
/// follow (sharded subscriptions made again where the slot now is) and deliveries go on
/// exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_cluster_slot_move_and_failover_are_followed() {
    let redis = nodes::RedisCluster::start_with_replicas(1);
    let url = redis.url();
    let nodes = [Node::start("n0", &url), Node::start("n1", &url)];
    let node_refs: Vec<&Node> = nodes.iter().collect();
    wait_cluster(&node_refs).await;
    let mut backend = nodes[0].backend("backend").await;
    let mut member = acked_client(&nodes[1], "member", &mut backend, "g").await;
    let mut admin = nodes[0].admin("admin").await;
    admin
        .send_event(
            "notify_group",
            json!({"target": "g", "data": {"msg": "before"}}),
        )
        .await;
    expect_once(&mut [&mut member, &mut backend], &[0], &bare("before")).await;

    // The group's slot moves to another master.
    let topic = "jssocket:group:g";
    let (owner, slot) = redis.owner_of(topic);
    let masters: Vec<u16> = redis.members[..3].iter().map(|m| m.port).collect();
    let other = *masters
        .iter()
        .find(|&&p| p != owner)
        .expect("another master");
    redis.move_slot(slot, owner, other);
    assert_eq!(redis.owner_of(topic).0, other, "the slot did not move");
    until_delivered(&mut admin, &mut member, "g", "moved").await;

    // That master dies; its replica takes over the slot.
    let mut redis = redis;
    let dead = other;
    redis.kill(dead);
    let deadline = Instant::now() + 3 * CLUSTER_TIMEOUT;
    while redis.owner_of(topic).0 == dead {
        assert!(
            Instant::now() < deadline,
            "no replica took over slot {slot}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    until_delivered(&mut admin, &mut member, "g", "failover").await;

    // And from now on exactly once.
    admin
        .send_event(
            "notify_group",
            json!({"target": "g", "data": {"msg": "after"}}),
        )
        .await;
    expect_once(&mut [&mut member, &mut backend], &[0], &bare("after")).await;
}

// ---------------------------------------------------------------- 8. acknowledge, then notify

/// A backend acknowledges clients on another node into groups of their own and notifies
/// each group at once, without waiting (as Jaseci does on a reconnect storm): the client's
/// node subscribes to the group only once the acknowledgement reached it, yet every
/// notification arrives, once, after the acknowledgement.
async fn acknowledged_then_notified_at_once(kind: Kind) {
    const CLIENTS: usize = 30;
    let (_backing, nodes) = cluster_on(kind, 2).await;
    let mut backend = nodes[0].backend("backend").await;
    let mut clients = Vec::new();
    for i in 0..CLIENTS {
        let mut client = nodes[1].client(&format!("c{i}")).await;
        register(&mut client, &mut backend).await;
        clients.push(client);
    }
    for (i, client) in clients.iter().enumerate() {
        let id = client.id().to_string();
        backend
            .send_event(
                "client_connected",
                json!({"target": id, "user": format!("u{i}")}),
            )
            .await;
        backend
            .send_event(
                "notify_group",
                json!({"target": format!("u{i}"), "data": {"msg": format!("n{i}")}}),
            )
            .await;
    }
    for (i, client) in clients.iter_mut().enumerate() {
        let id = client.id().to_string();
        client
            .expect_text(&json!({"type": "client_connected", "data": {"target": id}}).to_string())
            .await;
        client.expect_text(&bare(&format!("n{i}"))).await;
    }
    let mut all: Vec<&mut Conn> = clients.iter_mut().collect();
    all.push(&mut backend);
    expect_silence_all(&mut all).await;
}

on!([Loopback, Redis, RedisCluster] acknowledged_then_notified_at_once);

// ---------------------------------------------------------------- 9. subscribe churn

/// A client subscribes and at once unsubscribes, over and over, to channels nobody else on
/// its node has (each reply would wait for the channel's subscription): every request is
/// answered, in order, and nothing stays held afterwards (a client cannot pile up replies
/// that wait for ever).
async fn subscribe_churn_is_answered_in_order_and_holds_nothing(kind: Kind) {
    const ROUNDS: usize = 40;
    let (_backing, nodes) = cluster_on(kind, 2).await;
    let mut client = nodes[1].client("churn").await;
    client.send_event("client_connect", json!({})).await;
    for i in 0..ROUNDS {
        let name = format!("churn.{i}");
        client.send_event("subscribe", json!({"name": name})).await;
        client
            .send_event("unsubscribe", json!({"name": name}))
            .await;
    }
    for i in 0..ROUNDS {
        let name = format!("churn.{i}");
        for reply in ["subscribed", "unsubscribed"] {
            client
                .expect_text(&json!({"type": reply, "data": {"name": name}}).to_string())
                .await;
        }
    }
    client.expect_silence().await;
    wait_all(
        &[&nodes[1]],
        "jssocket_cluster_held_replies",
        0.0,
        CLUSTER_TIMEOUT,
    )
    .await;
}

on!([Loopback, Redis, RedisCluster] subscribe_churn_is_answered_in_order_and_holds_nothing);

// ---------------------------------------------------------------- SignalR

const JWT_SECRET: &str = "a cluster test secret long enough for HS256";

/// An HS256 token for `user` with `roles`, valid for an hour.
fn token(user: &str, roles: &[&str]) -> String {
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs()
        + 3600;
    let claims = json!({"sub": user, "roles": roles, "exp": exp});
    let key = jsonwebtoken::EncodingKey::from_secret(JWT_SECRET.as_bytes()).expect("HMAC key");
    jsonwebtoken::encode(&jsonwebtoken::Header::default(), &claims, &key)
        .expect("sign a test token")
}

/// SPEC §10 in a cluster: a SignalR connection subscribes to nothing, yet a publish on any
/// node reaches it (filtered by its token's roles, by its id), once, beside a jssocket
/// subscriber of the same channel on its node; notify_group by its user and notify_client
/// by its id cross nodes too.
async fn signalr_connections_are_reached_from_every_node(kind: Kind) {
    let backing = nodes::Backing::start(kind);
    let nodes: Vec<Node> = (0..3)
        .map(|i| backing.node(&format!("n{i}"), &["--jwt-secret", JWT_SECRET]))
        .collect();
    wait_cluster(&nodes.iter().collect::<Vec<_>>()).await;
    let mut backend = nodes[0].backend("backend").await;
    let mut sub = nodes[0].client("jssocket-sub").await;
    register(&mut sub, &mut backend).await;
    subscribe(&mut sub, "news").await;
    let mut local = signalr_client(nodes[0].addr, None, "signalr-n0").await;
    let mut anon = signalr_client(nodes[1].addr, None, "signalr-n1").await;
    let editor_token = token("alice", &["editor"]);
    let mut alice = signalr_client(nodes[2].addr, Some(&editor_token), "alice-n2").await;
    let mut admin = nodes[1].admin("admin").await;
    let mut all = [&mut sub, &mut local, &mut anon, &mut alice];

    // Unfiltered, from n1's admin socket: everyone, once.
    admin
        .send_event("publish", json!({"name": "news", "data": {"msg": "p1"}}))
        .await;
    all[0].expect_text(&published("news", "p1")).await;
    for conn in &mut all[1..] {
        conn.expect_text(&invocation("news", r#"{"msg":"p1"}"#))
            .await;
    }
    expect_silence_all(&mut all).await;

    // A channel nobody subscribed to still reaches SignalR on every node.
    let response = api_post(
        nodes[2].addr,
        "publish",
        r#"{"name":"orders","data":{"msg":"p2"}}"#,
    )
    .await;
    assert_eq!(response.status, 200, "{}", response.text());
    for conn in &mut all[1..] {
        conn.expect_text(&invocation("orders", r#"{"msg":"p2"}"#))
            .await;
    }
    expect_silence_all(&mut all).await;

    // Roles from alice's token, and a clients filter, from n0 to the other nodes.
    admin
        .send_event(
            "publish",
            json!({"name": "news", "data": {"msg": "p3"}, "roles": ["editor"]}),
        )
        .await;
    all[3]
        .expect_text(&invocation("news", r#"{"msg":"p3"}"#))
        .await;
    let anon_id = all[2].id().to_string();
    let body = json!({"name": "news", "data": {"msg": "p4"}, "clients": [anon_id]});
    let response = api_post(nodes[0].addr, "publish", &body.to_string()).await;
    assert_eq!(response.status, 200, "{}", response.text());
    all[2]
        .expect_text(&invocation("news", r#"{"msg":"p4"}"#))
        .await;
    expect_silence_all(&mut all).await;

    // notify_group by alice's user and notify_client by anon's id, from n1.
    admin
        .send_event(
            "notify_group",
            json!({"target": "alice", "data": {"msg": "g"}}),
        )
        .await;
    all[3]
        .expect_text(&invocation("notify", r#"{"msg":"g"}"#))
        .await;
    admin
        .send_event(
            "notify_client",
            json!({"target": anon_id, "data": {"msg": "c"}}),
        )
        .await;
    all[2]
        .expect_text(&invocation("notify", r#"{"msg":"c"}"#))
        .await;
    expect_silence_all(&mut all).await;
}
