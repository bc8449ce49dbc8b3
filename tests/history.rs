//! SPEC §13 channel history and recovery on one node: offsets and epochs on publications,
//! `subscribe` with `since` (no gap, no duplicate while publications go on), `recovered:false`
//! (a restart, too far behind, a replay too big for the subscriber's queue), retention by
//! count, age and memory, the admin `history` read, and channels no rule names: exactly the
//! old frames, and nothing kept for them. In a cluster (a real `redis-server`, and a real
//! Redis Cluster): offsets given once across nodes, and recovery on another node than the
//! one the subscriber left, while two nodes publish.

mod common;

#[path = "common/cluster.rs"]
mod nodes;

use std::time::Duration;

use common::{Conn, Server, acknowledge, api_post, register, scrape};
use jssocket::config::Config;
use nodes::{Backing, Kind, Node, wait_cluster};
use serde_json::{Value, json};
use tokio::time::timeout;

/// Publishes `payload` (JSON text) to `name`, with `filter` (`""` or `,"users":[…]`).
async fn publish(admin: &mut Conn, name: &str, payload: &str, filter: &str) {
    admin
        .send_text(&format!(
            r#"{{"type":"publish","data":{{"name":"{name}","data":{payload}{filter}}}}}"#
        ))
        .await;
}

/// Sends `subscribe` (with `since` when given) and returns the `subscribed` reply's data.
async fn subscribe(client: &mut Conn, name: &str, since: Option<(u64, &str)>) -> Value {
    let data = match since {
        Some((offset, epoch)) => json!({"name": name, "since": {"offset": offset, "epoch": epoch}}),
        None => json!({"name": name}),
    };
    // A busy history store is answered `cluster_busy` ("retry"), and a client retries, as
    // the README says and jssocket-client does: a few times here, each logged.
    for attempt in 0..3 {
        client.send_event("subscribe", data.clone()).await;
        let reply = client.recv().await;
        if reply["type"] == "error" && reply["data"]["code"] == "cluster_busy" && attempt < 2 {
            eprintln!("{}: subscribe answered {reply}; retrying", client.name);
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        }
        assert_eq!(reply["type"], "subscribed", "{}: {reply}", client.name);
        return reply["data"].clone();
    }
    unreachable!("the last attempt returns or fails")
}

/// The next frame, which must be a publication of `name`: its offset and data.
async fn next_publication(client: &mut Conn, name: &str) -> (u64, Value, String) {
    let frame = client.recv().await;
    assert_eq!(frame["type"], "publish", "{}: {frame}", client.name);
    assert_eq!(frame["data"]["name"], name, "{}: {frame}", client.name);
    let offset = frame["data"]["offset"]
        .as_u64()
        .unwrap_or_else(|| panic!("{}: a publication without offset: {frame}", client.name));
    let epoch = frame["data"]["epoch"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    (offset, frame["data"]["data"].clone(), epoch)
}

async fn history_server(rules: &str, extra: &[&str]) -> Server {
    let mut args = vec!["--history", rules];
    args.extend_from_slice(extra);
    Server::with_args(&args).await
}

#[tokio::test]
async fn publications_carry_offset_and_epoch_and_subscribed_the_position() {
    let server = history_server("feed.*=100/10m", &[]).await;
    let mut backend = server.backend("backend").await;
    let mut client = server.acked_client("client", &mut backend, None).await;
    let reply = subscribe(&mut client, "feed.a", None).await;
    let epoch = reply["epoch"]
        .as_str()
        .expect("subscribed carries epoch")
        .to_string();
    assert_eq!(reply["offset"], 0, "nothing published yet: {reply}");
    assert!(
        reply.get("recovered").is_none(),
        "no since, no recovered: {reply}"
    );
    let mut admin = server.admin("admin").await;
    for i in 1..=3 {
        publish(&mut admin, "feed.a", &format!(r#"{{"i":{i}}}"#), "").await;
        client
            .expect_text(&format!(
                r#"{{"type":"publish","data":{{"name":"feed.a","data":{{"i":{i}}},"offset":{i},"epoch":"{epoch}"}}}}"#
            ))
            .await;
    }
    // A second channel counts on its own, in its own epoch.
    subscribe(&mut client, "feed.b", None).await;
    publish(&mut admin, "feed.b", "1", "").await;
    let (offset, _, epoch_b) = next_publication(&mut client, "feed.b").await;
    assert_eq!(offset, 1);
    assert_ne!(epoch_b, epoch, "each channel has its own epoch");
    // A later subscriber learns the latest offset.
    let mut late = server.acked_client("late", &mut backend, None).await;
    let reply = subscribe(&mut late, "feed.a", None).await;
    assert_eq!(reply["offset"], 3);
    assert_eq!(reply["epoch"], epoch.as_str());
}

/// The heart of it: a subscriber drops and comes back three times while an admin publishes
/// without pause; across the sessions it gets every publication exactly once, in order.
#[tokio::test]
async fn recovery_has_no_gap_and_no_duplicate_while_publications_go_on() {
    const N: u64 = 400;
    let server = history_server("feed.*=1000/10m", &[]).await;
    let mut backend = server.backend("backend").await;
    let mut publisher = server.admin("publisher").await;
    // The epoch, before anything is published: every session recovers, the first from 0.
    publisher
        .send_event("history", json!({"name": "feed.live"}))
        .await;
    let epoch = publisher.recv().await["data"]["epoch"]
        .as_str()
        .expect("epoch")
        .to_string();
    let stream = tokio::spawn(async move {
        for i in 1..=N {
            publish(&mut publisher, "feed.live", &format!(r#"{{"i":{i}}}"#), "").await;
            if i % 4 == 0 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        publisher
    });
    let mut got: Vec<u64> = Vec::new();
    for session in 0..4 {
        let mut client = server
            .acked_client(&format!("client{session}"), &mut backend, None)
            .await;
        let last = got.last().copied().unwrap_or(0);
        let reply = subscribe(&mut client, "feed.live", Some((last, &epoch))).await;
        assert_eq!(reply["recovered"], true, "session {session}: {reply}");
        assert_eq!(reply["epoch"], epoch.as_str());
        // Read some (the last session, everything), then drop the connection mid-stream.
        let take = if session == 3 { u64::MAX } else { 60 };
        let mut taken = 0;
        while taken < take && got.last() != Some(&N) {
            let (offset, data, e) = next_publication(&mut client, "feed.live").await;
            assert_eq!(e, epoch);
            assert_eq!(data["i"], offset, "offsets follow the publisher's order");
            got.push(offset);
            taken += 1;
        }
        drop(client);
        // Publications go on while it is away.
        tokio::time::sleep(Duration::from_millis(15)).await;
    }
    timeout(Duration::from_secs(10), stream)
        .await
        .expect("the publisher finished")
        .expect("publisher task");
    let expected: Vec<u64> = (1..=N).collect();
    assert_eq!(got.len(), expected.len(), "no gap and no duplicate");
    assert_eq!(got, expected, "every publication once, in order");
}

#[tokio::test]
async fn a_restart_changes_the_epoch_and_recovery_says_so() {
    let first = history_server("feed.*=100/10m", &[]).await;
    let mut backend = first.backend("backend").await;
    let mut client = first.acked_client("client", &mut backend, None).await;
    let reply = subscribe(&mut client, "feed.x", None).await;
    let epoch = reply["epoch"].as_str().expect("epoch").to_string();
    let mut admin = first.admin("admin").await;
    publish(&mut admin, "feed.x", "1", "").await;
    next_publication(&mut client, "feed.x").await;
    first.shutdown().await.expect("clean shutdown");

    // Another start: history lost, so the epoch differs and nothing is claimed recovered.
    let second = history_server("feed.*=100/10m", &[]).await;
    let mut backend = second.backend("backend").await;
    let mut client = second.acked_client("client", &mut backend, None).await;
    let reply = subscribe(&mut client, "feed.x", Some((1, &epoch))).await;
    assert_eq!(reply["recovered"], false, "{reply}");
    assert_ne!(reply["epoch"], epoch.as_str());
    assert_eq!(reply["offset"], 0);
    client.expect_silence().await;
}

#[tokio::test]
async fn too_far_behind_is_not_recovered_and_close_enough_is() {
    let server = history_server("feed.*=5/10m", &[]).await;
    let mut backend = server.backend("backend").await;
    let mut admin = server.admin("admin").await;
    let mut client = server.acked_client("client", &mut backend, None).await;
    let epoch = subscribe(&mut client, "feed.k", None).await["epoch"]
        .as_str()
        .expect("epoch")
        .to_string();
    for i in 1..=10 {
        publish(&mut admin, "feed.k", &i.to_string(), "").await;
    }
    for i in 1..=10 {
        assert_eq!(next_publication(&mut client, "feed.k").await.0, i);
    }
    // Kept: 6..=10. From 4 it would miss 5: not recovered, and nothing replayed.
    let mut behind = server.acked_client("behind", &mut backend, None).await;
    let reply = subscribe(&mut behind, "feed.k", Some((4, &epoch))).await;
    assert_eq!(reply["recovered"], false, "{reply}");
    assert_eq!(reply["offset"], 10);
    behind.expect_silence().await;
    // From 5: 6..=10 replayed.
    let mut near = server.acked_client("near", &mut backend, None).await;
    let reply = subscribe(&mut near, "feed.k", Some((5, &epoch))).await;
    assert_eq!(reply["recovered"], true, "{reply}");
    for i in 6..=10 {
        assert_eq!(next_publication(&mut near, "feed.k").await.0, i);
    }
    near.expect_silence().await;
    // Up to date: recovered, nothing to replay. A future offset or another epoch: no.
    let mut current = server.acked_client("current", &mut backend, None).await;
    let reply = subscribe(&mut current, "feed.k", Some((10, &epoch))).await;
    assert_eq!(reply["recovered"], true, "{reply}");
    current.expect_silence().await;
    let reply = subscribe(&mut current, "feed.k", Some((11, &epoch))).await;
    assert_eq!(reply["recovered"], false, "a position never given: {reply}");
    let reply = subscribe(&mut current, "feed.k", Some((3, "other"))).await;
    assert_eq!(reply["recovered"], false, "{reply}");
}

/// Retention by count (the admin read shows the last ones) and by age (all gone once old).
#[tokio::test]
async fn retention_by_count_and_by_age() {
    let server = history_server("count.*=3/10m,age.*=100/1s", &[]).await;
    let mut admin = server.admin("admin").await;
    for i in 1..=7 {
        publish(&mut admin, "count.c", &format!(r#"{{"n":{i}}}"#), "").await;
        publish(&mut admin, "age.a", &i.to_string(), "").await;
    }
    // The HTTP API answers the same `history` read as a WebSocket.
    let wait_for = async |name: &str, latest: u64| loop {
        let answer = api_post(server.addr, "history", &json!({"name": name}).to_string()).await;
        assert_eq!(answer.status, 200, "{}", answer.text());
        let answer = answer.json();
        if answer["offset"] == latest {
            break answer;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let count = timeout(Duration::from_secs(5), wait_for("count.c", 7))
        .await
        .expect("7 publications kept");
    let publications = count["publications"].as_array().expect("publications");
    let offsets: Vec<u64> = publications
        .iter()
        .map(|p| p["offset"].as_u64().unwrap_or(0))
        .collect();
    assert_eq!(offsets, [5, 6, 7], "the last 3: {count}");
    assert_eq!(publications[2]["data"], json!({"n": 7}));
    // `limit` over a WebSocket: the last 2.
    admin
        .send_event("history", json!({"name": "count.c", "limit": 2}))
        .await;
    let answer = admin.recv().await;
    assert_eq!(answer["type"], "history");
    assert_eq!(answer["data"]["publications"][0]["offset"], 6, "{answer}");
    assert_eq!(answer["data"]["epoch"], count["epoch"]);

    let age = timeout(Duration::from_secs(5), wait_for("age.a", 7))
        .await
        .expect("7 publications");
    assert_eq!(age["publications"].as_array().map(Vec::len), Some(7));
    tokio::time::sleep(Duration::from_millis(1300)).await;
    let age = wait_for("age.a", 7).await;
    assert_eq!(age["publications"], json!([]), "aged out: {age}");
    assert_eq!(age["offset"], 7, "the position stays");
    // A subscriber that had 3 cannot recover what aged out; one that had 7 is current.
    let mut backend = server.backend("backend").await;
    let mut client = server.acked_client("client", &mut backend, None).await;
    let epoch = age["epoch"].as_str().expect("epoch");
    let reply = subscribe(&mut client, "age.a", Some((3, epoch))).await;
    assert_eq!(reply["recovered"], false);
    let reply = subscribe(&mut client, "age.a", Some((7, epoch))).await;
    assert_eq!(reply["recovered"], true);
    let scraped = scrape(server.addr).await;
    let kept = scraped.value("jssocket_history_bytes", &[]);
    assert!(kept > 0.0, "count.c still keeps 3");
    // Errors: a channel without history, a bad limit.
    let none = api_post(server.addr, "history", r#"{"name":"plain"}"#).await;
    assert_eq!(none.status, 400, "{}", none.text());
    let bad = api_post(server.addr, "history", r#"{"name":"count.c","limit":0}"#).await;
    assert_eq!(bad.status, 400, "{}", bad.text());
}

/// `--history-memory` bounds what every channel keeps together: the bytes gauge never goes
/// over it, and a channel's oldest publications go first (its recovery then says so).
#[tokio::test]
async fn the_memory_bound_holds_and_drops_the_oldest() {
    let server = history_server("m.*=10000/10m", &["--history-memory", "20K"]).await;
    let mut admin = server.admin("admin").await;
    let payload = format!("\"{}\"", "x".repeat(1000));
    for _ in 0..100 {
        publish(&mut admin, "m.one", &payload, "").await;
        publish(&mut admin, "m.two", &payload, "").await;
    }
    let read = loop {
        let answer = api_post(server.addr, "history", r#"{"name":"m.two","limit":10000}"#).await;
        let answer = answer.json();
        if answer["offset"] == 100 {
            break answer;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let kept = read["publications"].as_array().map_or(0, Vec::len);
    assert!(
        kept > 0 && kept < 20,
        "about 20K of 1K publications: {kept}"
    );
    assert_eq!(
        read["publications"][kept - 1]["offset"],
        100,
        "the newest kept"
    );
    let bytes = scrape(server.addr)
        .await
        .value("jssocket_history_bytes", &[]);
    assert!(bytes <= 20.0 * 1024.0, "the bound holds: {bytes}");
}

/// A replay that would not fit half the subscriber's queue is `recovered:false`, not a
/// connection closed as a slow consumer.
#[tokio::test]
async fn a_replay_too_big_for_the_queue_is_refused_not_a_close() {
    let server = history_server("big.*=1000/10m", &["--max-queue-bytes", "65536"]).await;
    let mut backend = server.backend("backend").await;
    let mut admin = server.admin("admin").await;
    let mut client = server.acked_client("client", &mut backend, None).await;
    let epoch = subscribe(&mut client, "big.b", None).await["epoch"]
        .as_str()
        .expect("epoch")
        .to_string();
    drop(client);
    let payload = format!("\"{}\"", "y".repeat(8000));
    for _ in 0..10 {
        publish(&mut admin, "big.b", &payload, "").await;
    }
    admin.send_event("history", json!({"name": "big.b"})).await;
    assert_eq!(admin.recv().await["data"]["offset"], 10);
    let mut client = server.acked_client("again", &mut backend, None).await;
    let reply = subscribe(&mut client, "big.b", Some((0, &epoch))).await;
    assert_eq!(reply["recovered"], false, "80 KB do not fit 32 KB: {reply}");
    client.expect_silence().await;
    // From 7: 3 × 8 KB fit.
    let reply = subscribe(&mut client, "big.b", Some((7, &epoch))).await;
    assert_eq!(reply["recovered"], true, "{reply}");
    for i in 8..=10 {
        assert_eq!(next_publication(&mut client, "big.b").await.0, i);
    }
}

/// A replay gives a subscriber only what the publication's filter gave it live.
#[tokio::test]
async fn a_replay_keeps_the_publication_filters() {
    let server = history_server("inbox.*=100/10m", &[]).await;
    let mut backend = server.backend("backend").await;
    let mut admin = server.admin("admin").await;
    let mut bob = server.acked_client("bob", &mut backend, Some("bob")).await;
    let epoch = subscribe(&mut bob, "inbox.all", None).await["epoch"]
        .as_str()
        .expect("epoch")
        .to_string();
    drop(bob);
    publish(
        &mut admin,
        "inbox.all",
        r#""for alice""#,
        r#","users":["alice"]"#,
    )
    .await;
    publish(
        &mut admin,
        "inbox.all",
        r#""for bob""#,
        r#","users":["bob"]"#,
    )
    .await;
    publish(&mut admin, "inbox.all", r#""for all""#, "").await;
    admin
        .send_event("history", json!({"name": "inbox.all"}))
        .await;
    assert_eq!(admin.recv().await["data"]["offset"], 3);
    let mut bob = server
        .acked_client("bob again", &mut backend, Some("bob"))
        .await;
    let reply = subscribe(&mut bob, "inbox.all", Some((0, &epoch))).await;
    assert_eq!(reply["recovered"], true);
    let (offset, data, _) = next_publication(&mut bob, "inbox.all").await;
    assert_eq!((offset, data), (2, json!("for bob")));
    let (offset, data, _) = next_publication(&mut bob, "inbox.all").await;
    assert_eq!((offset, data), (3, json!("for all")));
    bob.expect_silence().await;
}

/// Channels no rule names: the exact frames of before (no `epoch`, no `offset`), `since`
/// ignored, and nothing kept or counted for them.
#[tokio::test]
async fn channels_without_history_are_unchanged_and_cost_nothing() {
    let server = history_server("orders.*=100/10m", &[]).await;
    let mut backend = server.backend("backend").await;
    let mut admin = server.admin("admin").await;
    let mut client = server.acked_client("client", &mut backend, None).await;
    client
        .send_event(
            "subscribe",
            json!({"name": "news", "since": {"offset": 3, "epoch": "e"}}),
        )
        .await;
    client
        .expect_text(r#"{"type":"subscribed","data":{"name":"news"}}"#)
        .await;
    for i in 0..200 {
        publish(&mut admin, "news", &format!(r#"{{"n":{i}}}"#), "").await;
    }
    for i in 0..200 {
        client
            .expect_text(&format!(
                r#"{{"type":"publish","data":{{"name":"news","data":{{"n":{i}}}}}}}"#
            ))
            .await;
    }
    let scraped = scrape(server.addr).await;
    assert_eq!(
        scraped.value("jssocket_history_publications_total", &[]),
        0.0
    );
    assert_eq!(scraped.value("jssocket_history_channels", &[]), 0.0);
    assert_eq!(scraped.value("jssocket_history_bytes", &[]), 0.0);
    // And one that a rule names is counted.
    publish(&mut admin, "orders.1", "1", "").await;
    admin
        .send_event("history", json!({"name": "orders.1"}))
        .await;
    assert_eq!(admin.recv().await["data"]["offset"], 1);
    let scraped = scrape(server.addr).await;
    assert_eq!(
        scraped.value("jssocket_history_publications_total", &[]),
        1.0
    );
    assert_eq!(scraped.value("jssocket_history_channels", &[]), 1.0);
}

/// The attack: clients subscribe to more matching names than a node keeps histories for
/// (10,000), to push real channels' history out. The bound holds, and what goes first are the
/// empty histories the flood made, not a channel with publications.
#[tokio::test]
async fn a_subscribe_flood_over_the_channel_bound_evicts_empty_histories_first() {
    let server = history_server("feed.*=100/10m", &[]).await;
    let mut backend = server.backend("backend").await;
    let mut admin = server.admin("admin").await;
    for i in 1..=3 {
        publish(&mut admin, "feed.real", &i.to_string(), "").await;
    }
    admin
        .send_event("history", json!({"name": "feed.real"}))
        .await;
    let real = admin.recv().await["data"].clone();
    assert_eq!(real["offset"], 3, "{real}");
    let epoch = real["epoch"].as_str().expect("epoch").to_string();
    // 41 clients × 256 subscriptions (the per-connection bound) = 10,496 names.
    let mut flood = Vec::new();
    for c in 0..41 {
        let mut client = server
            .acked_client(&format!("flood{c}"), &mut backend, None)
            .await;
        for j in 0..256 {
            client
                .send_text(&format!(
                    r#"{{"type":"subscribe","data":{{"name":"feed.x{c}_{j}"}}}}"#
                ))
                .await;
        }
        for _ in 0..256 {
            let reply = client.recv().await;
            assert_eq!(reply["type"], "subscribed", "{reply}");
        }
        flood.push(client);
    }
    let scraped = scrape(server.addr).await;
    assert_eq!(scraped.value("jssocket_history_channels", &[]), 10_000.0);
    assert!(scraped.value("jssocket_history_evicted_channels_total", &[]) >= 496.0);
    let mut client = server.acked_client("reader", &mut backend, None).await;
    let reply = subscribe(&mut client, "feed.real", Some((0, &epoch))).await;
    assert_eq!(
        reply["recovered"], true,
        "the real history survived: {reply}"
    );
    for i in 1..=3 {
        assert_eq!(next_publication(&mut client, "feed.real").await.0, i);
    }
}

#[tokio::test]
async fn bad_since_and_bad_rules_are_refused() {
    let server = history_server("feed.*=10/1m", &[]).await;
    let mut backend = server.backend("backend").await;
    let mut client = server.acked_client("client", &mut backend, None).await;
    for since in [
        json!({"offset": -1, "epoch": "e"}),
        json!({"offset": 1}),
        json!("3"),
        json!({"offset": 1, "epoch": "e".repeat(65)}),
    ] {
        client
            .send_event("subscribe", json!({"name": "feed.z", "since": since}))
            .await;
        client
            .expect_error("invalid_field", Some("subscribe"))
            .await;
    }
    for (rules, says) in [
        ("feed.*", "expected"),
        ("feed.*=0/1m", "count"),
        ("feed.*=10/2d", "age"),
        ("bad name*=10/1m", "channel"),
    ] {
        let error = Config::from_args(["jssocket", "--history", rules])
            .err()
            .unwrap_or_else(|| panic!("{rules:?} must be refused"))
            .to_string();
        assert!(
            error.starts_with("--history: ") && error.contains(says),
            "{rules:?}: {error}"
        );
    }
}

// ---------------------------------------------------------------- cluster (Redis)

/// A registered, acknowledged client of `node`, served by `backend` (on any node).
async fn node_client(node: &Node, backend: &mut Conn, name: &str) -> Conn {
    let mut client = node.client(name).await;
    let id = register(&mut client, backend).await;
    acknowledge(backend, &mut client, &id, None).await;
    client
}

/// Two nodes publish to one channel at once (offsets come from Redis: one sequence); a
/// subscriber drops and comes back on the other node four times; across its sessions it
/// gets every publication once, in offset order, with no gap. Then Redis loses everything
/// (`FLUSHALL`, scripts too): the epoch changes and a subscriber from before is told
/// `recovered:false`.
async fn recovery_across_nodes(kind: Kind) {
    const EACH: u64 = 150;
    let backing = Backing::start(kind);
    let args = ["--history", "feed.*=1000/10m"];
    let nodes = [backing.node("n0", &args), backing.node("n1", &args)];
    wait_cluster(&nodes.iter().collect::<Vec<_>>()).await;
    let mut backend = nodes[0].backend("backend").await;
    let mut publishers = Vec::new();
    for (i, node) in nodes.iter().enumerate() {
        let mut admin = node.admin(&format!("publisher{i}")).await;
        publishers.push(tokio::spawn(async move {
            for n in 1..=EACH {
                publish(&mut admin, "feed.c", &format!(r#"{{"p":{i},"n":{n}}}"#), "").await;
                if n % 4 == 0 {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            }
            admin
        }));
    }
    let total = 2 * EACH;
    let mut got: Vec<u64> = Vec::new();
    let mut seen: Vec<(u64, u64)> = Vec::new();
    // Offset 0 recovers whatever the epoch: the first session reads from the first
    // publication.
    let mut epoch = String::from("none yet");
    for session in 0..5 {
        let node = &nodes[session % 2];
        let mut client = node_client(node, &mut backend, &format!("client{session}")).await;
        let last = got.last().copied().unwrap_or(0);
        let reply = subscribe(&mut client, "feed.c", Some((last, &epoch))).await;
        assert_eq!(
            reply["recovered"], true,
            "session {session} on {}: {reply}",
            node.name
        );
        let take = if session == 4 { u64::MAX } else { 40 };
        let mut taken = 0;
        while taken < take && got.len() < total as usize {
            let (offset, data, e) = next_publication(&mut client, "feed.c").await;
            if session > 0 || taken > 0 {
                assert_eq!(e, epoch, "one epoch");
            }
            epoch = e;
            got.push(offset);
            seen.push((
                data["p"].as_u64().unwrap_or(9),
                data["n"].as_u64().unwrap_or(0),
            ));
            taken += 1;
        }
        drop(client);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for publisher in publishers {
        timeout(Duration::from_secs(20), publisher)
            .await
            .expect("the publishers finished")
            .expect("publisher task");
    }
    let expected: Vec<u64> = (1..=total).collect();
    assert_eq!(got, expected, "every offset once, in order, across nodes");
    // And each publisher's publications in the order it sent them.
    for p in 0..2 {
        let mine: Vec<u64> = seen
            .iter()
            .filter(|(q, _)| *q == p)
            .map(|(_, n)| *n)
            .collect();
        assert_eq!(
            mine,
            (1..=EACH).collect::<Vec<_>>(),
            "publisher {p}'s order"
        );
    }

    // Redis loses the history: the next publication starts a new epoch.
    flush(&backing);
    let mut admin = nodes[1].admin("after").await;
    publish(&mut admin, "feed.c", "1", "").await;
    // Stamped (the script loaded again after NOSCRIPT): offset 1 of a new epoch.
    timeout(Duration::from_secs(5), async {
        loop {
            admin.send_event("history", json!({"name": "feed.c"})).await;
            if admin.recv().await["data"]["offset"] == 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the publication after the flush is stamped");
    let mut client = node_client(&nodes[0], &mut backend, "late").await;
    let reply = subscribe(&mut client, "feed.c", Some((total, &epoch))).await;
    assert_eq!(reply["recovered"], false, "{reply}");
    assert_ne!(reply["epoch"], epoch.as_str(), "{reply}");
    assert_eq!(reply["offset"], 1, "{reply}");
}

/// `FLUSHALL` and `SCRIPT FLUSH` on every Redis of the backing.
fn flush(backing: &Backing) {
    let urls: Vec<String> = match backing {
        Backing::Redis(redis) => vec![redis.url()],
        Backing::RedisCluster(cluster) => cluster.members.iter().map(|m| m.url()).collect(),
        Backing::Loopback(_) => Vec::new(),
    };
    for url in urls {
        let client = redis::Client::open(url.as_str()).expect("a Redis URL");
        let mut conn = client.get_connection().expect("a connection to Redis");
        let _: () = redis::cmd("FLUSHALL").query(&mut conn).expect("FLUSHALL");
        // As a restarted Redis: the nodes' loaded script is gone too.
        let _: () = redis::cmd("SCRIPT")
            .arg("FLUSH")
            .query(&mut conn)
            .expect("SCRIPT FLUSH");
    }
}

mod recovery_across_nodes {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn redis() {
        super::recovery_across_nodes(super::Kind::Redis).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn redis_cluster() {
        super::recovery_across_nodes(super::Kind::RedisCluster).await;
    }
}
