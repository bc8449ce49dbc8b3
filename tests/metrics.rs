//! SPEC §8, `GET /metrics`: Prometheus/OpenMetrics text, names prefixed `jssocket_`, whose
//! values follow connections, traffic, errors and authentication. Every sample is read by
//! parsing the exposition (`name{labels} value`), never by matching substrings.

mod common;

use common::{
    Conn, Expect, PASSWORD, Scrape, Server, api_post, http, register, scrape, wait_metric,
    wait_metrics,
};
use serde_json::json;

const GAUGES: [&str; 8] = [
    "jssocket_connections",
    "jssocket_admins",
    "jssocket_clients",
    "jssocket_acknowledged_clients",
    "jssocket_servers",
    "jssocket_groups",
    "jssocket_channels",
    "jssocket_pending_connects",
];

const COUNTERS: [&str; 4] = [
    "jssocket_bytes_received_total",
    "jssocket_bytes_sent_total",
    "jssocket_slow_consumer_closes_total",
    "jssocket_auth_failures_total",
];

const EVENT_TYPES: [&str; 10] = [
    "server_connect",
    "client_connect",
    "client_connected",
    "client_disconnect",
    "notify_client",
    "notify_group",
    "notify_all",
    "subscribe",
    "unsubscribe",
    "publish",
];

const ERROR_CODES: [&str; 9] = [
    "invalid_json",
    "invalid_data",
    "missing_field",
    "invalid_field",
    "forbidden",
    "invalid_channel",
    "too_many_subscriptions",
    "conflicting_filters",
    "unauthorized",
];

fn received(kind: &str) -> [(&str, &str); 1] {
    [("type", kind)]
}

/// `scrape`'s value of `name{labels}`, for deltas.
fn v(scrape: &Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    scrape.value(name, labels)
}

/// Waits until the client's own task has handled everything it sent before: a registered
/// client's `unsubscribe` is answered in order.
async fn sync_client(conn: &mut Conn) {
    conn.send_event("unsubscribe", json!({"name": "sync"}))
        .await;
    conn.expect_text(r#"{"type":"unsubscribed","data":{"name":"sync"}}"#)
        .await;
}

/// A client that sent `client_connect` (forwarded to `backend`), not acknowledged, whose
/// task has finished counting it.
async fn registered(server: &Server, backend: &mut Conn, name: &str) -> Conn {
    let mut client = server.client(name).await;
    register(&mut client, backend).await;
    sync_client(&mut client).await;
    client
}

#[tokio::test]
async fn metrics_is_prometheus_text_with_every_family() {
    let server = Server::start().await;
    let response = http(server.addr, "GET", "/metrics", &[], b"").await;
    assert_eq!(response.status, 200, "{}", response.text());
    // Classic Prometheus text unless the scraper asks for OpenMetrics (SPEC §8).
    let content_type = response.header("content-type").unwrap_or("");
    assert!(
        content_type.starts_with("text/plain; version=0.0.4"),
        "content type {content_type:?}"
    );
    let text = response.text();
    assert!(!text.contains("# EOF"), "classic text has no # EOF");
    let scrape = Scrape::parse(&text);
    assert!(!scrape.samples.is_empty());
    for sample in &scrape.samples {
        assert!(
            sample.name.starts_with("jssocket_"),
            "unprefixed metric {}",
            sample.name
        );
        assert!(sample.value >= 0.0, "{sample:?}");
    }
    // A fresh server: every gauge and counter present and zero.
    for gauge in GAUGES {
        assert_eq!(scrape.value(gauge, &[]), 0.0, "{gauge}");
        assert_eq!(scrape.type_of(gauge), Some("gauge"), "{gauge}");
    }
    for counter in COUNTERS {
        assert_eq!(scrape.value(counter, &[]), 0.0, "{counter}");
        // Classic text declares a counter under its sample's name, `_total` included.
        assert_eq!(scrape.type_of(counter), Some("counter"), "{counter}");
    }
    for kind in EVENT_TYPES {
        assert_eq!(
            scrape.value("jssocket_messages_received_total", &received(kind)),
            0.0
        );
    }
    for kind in [
        "notify_all",
        "notify_client",
        "notify_group",
        "publish",
        "error",
    ] {
        assert_eq!(
            scrape.value("jssocket_messages_sent_total", &[("type", kind)]),
            0.0
        );
    }
    for code in ERROR_CODES {
        assert_eq!(
            scrape.value("jssocket_errors_total", &[("code", code)]),
            0.0
        );
    }
    for family in [
        "jssocket_messages_received_total",
        "jssocket_messages_sent_total",
        "jssocket_errors_total",
    ] {
        assert_eq!(scrape.type_of(family), Some("counter"), "{family}");
    }
    assert_eq!(scrape.type_of("jssocket_fanout_seconds"), Some("histogram"));
    assert_eq!(scrape.value("jssocket_fanout_seconds_count", &[]), 0.0);
    assert_eq!(scrape.value("jssocket_fanout_seconds_sum", &[]), 0.0);
    let last_bucket = scrape.buckets("jssocket_fanout_seconds", &[]).last();
    assert_eq!(
        last_bucket.map(|b| (b.less_than, b.count)),
        Some((f64::INFINITY, 0.0))
    );

    // Scraping is not traffic: a second scrape, also with a query string, is identical.
    // (Counters only: a gauge such as `jssocket_overloaded` follows the machine, not traffic.)
    let counters = |scrape: &Scrape| -> Vec<common::Sample> {
        scrape
            .samples
            .iter()
            .filter(|s| s.name.ends_with("_total"))
            .cloned()
            .collect()
    };
    let again = http(server.addr, "GET", "/metrics?format=prometheus", &[], b"").await;
    assert_eq!(again.status, 200);
    assert_eq!(counters(&Scrape::parse(&again.text())), counters(&scrape));

    // A scraper that asks for OpenMetrics gets it: same samples, counters typed by family.
    let accept = "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5";
    let open = http(server.addr, "GET", "/metrics", &[("accept", accept)], b"").await;
    assert_eq!(open.status, 200);
    let content_type = open.header("content-type").unwrap_or("");
    assert!(
        content_type.starts_with("application/openmetrics-text"),
        "content type {content_type:?}"
    );
    let open_text = open.text();
    assert!(
        open_text.ends_with("# EOF\n"),
        "OpenMetrics must end with # EOF"
    );
    let open_scrape = Scrape::parse(&open_text);
    assert_eq!(counters(&open_scrape), counters(&scrape));
    let names = |scrape: &Scrape| -> Vec<String> {
        let samples = scrape.samples.iter().map(|s| s.name.clone());
        samples
            .chain(
                scrape
                    .histograms
                    .iter()
                    .map(|h| format!("{}_bucket", h.name)),
            )
            .collect()
    };
    assert_eq!(names(&open_scrape), names(&scrape));
    assert_eq!(
        open_scrape.type_of("jssocket_errors"),
        Some("counter"),
        "OpenMetrics types a counter by its family name"
    );
}

#[tokio::test]
async fn connection_gauges_go_up_and_back_down() {
    let server = Server::start().await;
    let addr = server.addr;
    let zero: Vec<Expect> = GAUGES.iter().map(|g| (*g, &[][..], 0.0)).collect();
    wait_metrics(addr, &zero).await;

    // A client connects and asks to be registered while no server is there: queued.
    let mut c1 = server.client("c1").await;
    wait_metrics(
        addr,
        &[
            ("jssocket_connections", &[], 1.0),
            ("jssocket_clients", &[], 0.0),
        ],
    )
    .await;
    c1.send_text(r#"{"type":"client_connect","data":{}}"#).await;
    wait_metrics(
        addr,
        &[
            ("jssocket_clients", &[], 1.0),
            ("jssocket_pending_connects", &[], 1.0),
            ("jssocket_servers", &[], 0.0),
        ],
    )
    .await;

    // An admin connects, then joins the pool and gets the waiting forward.
    let mut backend = server.admin("backend").await;
    wait_metrics(
        addr,
        &[
            ("jssocket_connections", &[], 2.0),
            ("jssocket_admins", &[], 1.0),
            ("jssocket_servers", &[], 0.0),
        ],
    )
    .await;
    // The waiting forward and the `true` reply may come in either order.
    backend
        .send_text(r#"{"type":"server_connect","data":{}}"#)
        .await;
    let (first, second) = (backend.recv_text().await, backend.recv_text().await);
    let (reply, forward) = if first.starts_with(r#"{"type":"client_connect""#) {
        (second, first)
    } else {
        (first, second)
    };
    assert_eq!(reply, r#"{"type":"server_connect","data":true}"#);
    let forward: serde_json::Value = serde_json::from_str(&forward).unwrap();
    assert_eq!(forward["type"], "client_connect");
    c1.id = Some(forward["data"]["target"].as_str().unwrap().to_string());
    wait_metrics(
        addr,
        &[
            ("jssocket_servers", &[], 1.0),
            ("jssocket_pending_connects", &[], 0.0),
        ],
    )
    .await;

    // Another admin that is not a server, and a connection with a wrong password.
    let admin = server.admin("admin").await;
    let wrong = Conn::connect(&server.url(), Some("wrong"), "wrong password").await;
    wait_metrics(
        addr,
        &[
            ("jssocket_connections", &[], 4.0),
            ("jssocket_admins", &[], 2.0),
            ("jssocket_servers", &[], 1.0),
            ("jssocket_auth_failures_total", &[], 1.0),
        ],
    )
    .await;

    // Acknowledgements: acknowledged clients and groups.
    let id1 = c1.id().to_string();
    common::acknowledge(&mut backend, &mut c1, &id1, Some("g1")).await;
    let c2 = server.acked_client("c2", &mut backend, Some("g1")).await;
    let c3 = server.acked_client("c3", &mut backend, None).await;
    let mut c4 = registered(&server, &mut backend, "c4").await;
    wait_metrics(
        addr,
        &[
            ("jssocket_connections", &[], 7.0),
            ("jssocket_clients", &[], 4.0),
            ("jssocket_acknowledged_clients", &[], 3.0),
            ("jssocket_groups", &[], 2.0),
        ],
    )
    .await;
    // Acknowledging c4 into g2 adds a third group.
    let id4 = c4.id().to_string();
    common::acknowledge(&mut backend, &mut c4, &id4, Some("g2")).await;
    wait_metrics(
        addr,
        &[
            ("jssocket_acknowledged_clients", &[], 4.0),
            ("jssocket_groups", &[], 3.0),
        ],
    )
    .await;

    // And back down as they close.
    c3.close().await;
    wait_metrics(
        addr,
        &[
            ("jssocket_connections", &[], 6.0),
            ("jssocket_clients", &[], 3.0),
            ("jssocket_acknowledged_clients", &[], 3.0),
            ("jssocket_groups", &[], 2.0),
        ],
    )
    .await;
    c1.close().await;
    wait_metrics(
        addr,
        &[
            ("jssocket_clients", &[], 2.0),
            ("jssocket_acknowledged_clients", &[], 2.0),
            ("jssocket_groups", &[], 2.0),
        ],
    )
    .await;
    backend.close().await;
    wait_metrics(
        addr,
        &[
            ("jssocket_connections", &[], 4.0),
            ("jssocket_admins", &[], 1.0),
            ("jssocket_servers", &[], 0.0),
        ],
    )
    .await;
    admin.close().await;
    wrong.close().await;
    c2.close().await;
    // A connection dropped without a close handshake is counted down too.
    drop(c4);
    wait_metrics(addr, &zero).await;
}

#[tokio::test]
async fn message_counters_follow_traffic() {
    let server = Server::start().await;
    let addr = server.addr;
    let mut backend = server.backend("backend").await;
    let mut admin = server.admin("admin").await;
    let mut a = registered(&server, &mut backend, "a").await;
    let mut b = registered(&server, &mut backend, "b").await;
    let mut c = server.acked_client("c", &mut backend, Some("team")).await;
    sync_client(&mut c).await;
    admin.ping(0, false).await;
    let before = scrape(addr).await;
    let get = |name: &str, labels: &[(&str, &str)]| v(&before, name, labels);

    // notify_all over the socket: one received, one sent per recipient.
    let notify_all = r#"{"type":"notify_all","data":{"hello":"all"}}"#;
    let frame = r#"{"hello":"all"}"#;
    admin.send_text(notify_all).await;
    for conn in [&mut a, &mut b, &mut c] {
        conn.expect_text(frame).await;
    }
    let recv_all = get("jssocket_messages_received_total", &received("notify_all"));
    let sent_all = get("jssocket_messages_sent_total", &[("type", "notify_all")]);
    let bytes_in = get("jssocket_bytes_received_total", &[]);
    let bytes_out = get("jssocket_bytes_sent_total", &[]);
    let fanouts = get("jssocket_fanout_seconds_count", &[]);
    let mut bytes_in_now = bytes_in + notify_all.len() as f64;
    let mut bytes_out_now = bytes_out + 3.0 * frame.len() as f64;
    wait_metrics(
        addr,
        &[
            (
                "jssocket_messages_received_total",
                &received("notify_all"),
                recv_all + 1.0,
            ),
            (
                "jssocket_messages_sent_total",
                &[("type", "notify_all")],
                sent_all + 3.0,
            ),
            ("jssocket_bytes_received_total", &[], bytes_in_now),
            ("jssocket_bytes_sent_total", &[], bytes_out_now),
            ("jssocket_fanout_seconds_count", &[], fanouts + 1.0),
        ],
    )
    .await;

    // notify_all over HTTP: counted the same way, the body as the bytes received.
    let body = r#"{"via":"http"}"#;
    let r = api_post(addr, "notify_all", body).await;
    assert_eq!(r.text(), r#"{"delivered":3}"#);
    for conn in [&mut a, &mut b, &mut c] {
        conn.expect_text(body).await;
    }
    bytes_in_now += body.len() as f64;
    bytes_out_now += 3.0 * body.len() as f64;
    wait_metrics(
        addr,
        &[
            (
                "jssocket_messages_received_total",
                &received("notify_all"),
                recv_all + 2.0,
            ),
            (
                "jssocket_messages_sent_total",
                &[("type", "notify_all")],
                sent_all + 6.0,
            ),
            ("jssocket_bytes_received_total", &[], bytes_in_now),
            ("jssocket_bytes_sent_total", &[], bytes_out_now),
            ("jssocket_fanout_seconds_count", &[], fanouts + 2.0),
        ],
    )
    .await;

    // subscribe: one received, one `subscribed` sent; not a fan-out.
    let subscribe = r#"{"type":"subscribe","data":{"name":"ch"}}"#;
    let reply = r#"{"type":"subscribed","data":{"name":"ch"}}"#;
    for conn in [&mut a, &mut c] {
        conn.send_text(subscribe).await;
        conn.expect_text(reply).await;
    }
    bytes_in_now += 2.0 * subscribe.len() as f64;
    bytes_out_now += 2.0 * reply.len() as f64;
    wait_metrics(
        addr,
        &[
            (
                "jssocket_messages_received_total",
                &received("subscribe"),
                get("jssocket_messages_received_total", &received("subscribe")) + 2.0,
            ),
            (
                "jssocket_messages_sent_total",
                &[("type", "subscribed")],
                get("jssocket_messages_sent_total", &[("type", "subscribed")]) + 2.0,
            ),
            ("jssocket_bytes_received_total", &[], bytes_in_now),
            ("jssocket_bytes_sent_total", &[], bytes_out_now),
            ("jssocket_fanout_seconds_count", &[], fanouts + 2.0),
        ],
    )
    .await;

    // publish to the two subscribers, then notify_group to `team` (one member) and
    // notify_client to `a`.
    let publish = r#"{"type":"publish","data":{"name":"ch","data":[1,2]}}"#;
    let published = r#"{"type":"publish","data":{"name":"ch","data":[1,2]}}"#;
    admin.send_text(publish).await;
    a.expect_text(published).await;
    c.expect_text(published).await;
    let group = r#"{"type":"notify_group","data":{"target":"team","data":"g"}}"#;
    admin.send_text(group).await;
    c.expect_text(r#""g""#).await;
    let id_a = a.id().to_string();
    let client = format!(r#"{{"type":"notify_client","data":{{"target":"{id_a}","data":"c"}}}}"#);
    admin.send_text(&client).await;
    a.expect_text(r#""c""#).await;
    bytes_in_now += (publish.len() + group.len() + client.len()) as f64;
    bytes_out_now += (2 * published.len() + 3 + 3) as f64;
    let sent = |kind: &'static str, n: f64| {
        (
            "jssocket_messages_sent_total",
            [("type", kind)],
            get("jssocket_messages_sent_total", &[("type", kind)]) + n,
        )
    };
    let recv = |kind: &'static str, n: f64| {
        (
            "jssocket_messages_received_total",
            [("type", kind)],
            get("jssocket_messages_received_total", &received(kind)) + n,
        )
    };
    let counts = [
        sent("publish", 2.0),
        sent("notify_group", 1.0),
        sent("notify_client", 1.0),
        recv("publish", 1.0),
        recv("notify_group", 1.0),
        recv("notify_client", 1.0),
    ];
    let mut expected: Vec<Expect> = counts
        .iter()
        .map(|(name, labels, value)| (*name, &labels[..], *value))
        .collect();
    expected.extend([
        ("jssocket_bytes_received_total", &[][..], bytes_in_now),
        ("jssocket_bytes_sent_total", &[][..], bytes_out_now),
        ("jssocket_fanout_seconds_count", &[][..], fanouts + 5.0),
    ]);
    let after = wait_metrics(addr, &expected).await;

    // The histogram stays consistent: cumulative buckets, +Inf equal to the count.
    let mut buckets: Vec<(f64, f64)> = after
        .buckets("jssocket_fanout_seconds", &[])
        .iter()
        .map(|b| (b.less_than, b.count))
        .collect();
    buckets.sort_by(|x, y| x.0.total_cmp(&y.0));
    assert!(buckets.len() >= 2, "{buckets:?}");
    assert!(
        buckets.windows(2).all(|w| w[0].1 <= w[1].1),
        "buckets must be cumulative: {buckets:?}"
    );
    assert_eq!(buckets.last().map(|b| b.0), Some(f64::INFINITY));
    assert_eq!(
        buckets.last().map(|b| b.1),
        Some(after.value("jssocket_fanout_seconds_count", &[]))
    );
    assert!(after.value("jssocket_fanout_seconds_sum", &[]) >= 0.0);

    // Nobody else got anything.
    common::expect_silence_all(&mut [&mut a, &mut b, &mut c, &mut backend]).await;
}

#[tokio::test]
async fn errors_are_counted_by_code() {
    let server = Server::start().await;
    let addr = server.addr;
    let mut backend = server.backend("backend").await;
    let mut admin = server.admin("admin").await;
    let mut plain = server.client("plain").await;
    let mut client = registered(&server, &mut backend, "client").await;
    let errors = |code: &'static str| -> [(&'static str, &'static str); 1] { [("code", code)] };
    let base = scrape(addr).await;
    let base_err = |code: &'static str| v(&base, "jssocket_errors_total", &errors(code));

    plain.send_text("not json").await;
    plain.expect_error("invalid_json", None).await;
    plain.send_text("{\"type\":").await;
    plain.expect_error("invalid_json", None).await;
    plain.send_event("subscribe", json!({"name": "c"})).await;
    plain.expect_error("forbidden", Some("subscribe")).await;
    client.send_event("subscribe", json!({"name": "a b"})).await;
    client
        .expect_error("invalid_channel", Some("subscribe"))
        .await;
    client
        .send_text(r#"{"type":"publish","data":{"name":"c","data":1}}"#)
        .await;
    client.expect_error("forbidden", Some("publish")).await;
    admin
        .send_text(r#"{"type":"publish","data":{"name":"c","roles":["r"],"users":["u"]}}"#)
        .await;
    admin
        .expect_error("conflicting_filters", Some("publish"))
        .await;
    // The HTTP API counts its refusals of bad bodies too.
    let r = api_post(addr, "notify_all", "{nope").await;
    assert_eq!(r.status, 400);
    let r = api_post(addr, "notify_client", r#"{"data":1}"#).await;
    assert_eq!(r.status, 400);

    let s = wait_metrics(
        addr,
        &[
            (
                "jssocket_errors_total",
                &errors("invalid_json"),
                base_err("invalid_json") + 3.0,
            ),
            (
                "jssocket_errors_total",
                &errors("forbidden"),
                base_err("forbidden") + 2.0,
            ),
            (
                "jssocket_errors_total",
                &errors("invalid_channel"),
                base_err("invalid_channel") + 1.0,
            ),
            (
                "jssocket_errors_total",
                &errors("conflicting_filters"),
                base_err("conflicting_filters") + 1.0,
            ),
            (
                "jssocket_errors_total",
                &errors("missing_field"),
                base_err("missing_field") + 1.0,
            ),
            // Each error event sent over a socket is a frame of kind `error`.
            (
                "jssocket_messages_sent_total",
                &[("type", "error")],
                v(&base, "jssocket_messages_sent_total", &[("type", "error")]) + 6.0,
            ),
            // Unparseable messages are received as `other`.
            (
                "jssocket_messages_received_total",
                &received("other"),
                v(
                    &base,
                    "jssocket_messages_received_total",
                    &received("other"),
                ) + 2.0,
            ),
        ],
    )
    .await;
    // Codes that did not occur did not move.
    for code in ["invalid_data", "invalid_field", "too_many_subscriptions"] {
        assert_eq!(
            s.value("jssocket_errors_total", &errors(code)),
            base_err(code)
        );
    }
}

#[tokio::test]
async fn auth_failures_are_counted() {
    let server = Server::start().await;
    let addr = server.addr;
    assert_eq!(
        scrape(addr)
            .await
            .value("jssocket_auth_failures_total", &[]),
        0.0
    );

    // A WebSocket with a wrong `auth` header: not an admin, one failure.
    let mut wrong = Conn::connect(&server.url(), Some("nope"), "wrong").await;
    wait_metrics(
        addr,
        &[
            ("jssocket_auth_failures_total", &[], 1.0),
            ("jssocket_admins", &[], 0.0),
            ("jssocket_connections", &[], 1.0),
        ],
    )
    .await;
    // It is not an admin: server_connect is refused.
    wrong
        .send_text(r#"{"type":"server_connect","data":{}}"#)
        .await;
    wrong
        .expect_text(r#"{"type":"server_connect","data":false}"#)
        .await;
    wrong.expect_close_code(1008).await;

    // The old protocol's password in server_connect data, wrong.
    let mut old = server.client("old").await;
    old.send_text(r#"{"type":"server_connect","data":{"auth":"bad"}}"#)
        .await;
    old.expect_text(r#"{"type":"server_connect","data":false}"#)
        .await;
    wait_metric(addr, "jssocket_auth_failures_total", &[], 2.0).await;

    // The HTTP API with a wrong password.
    let r = http(
        addr,
        "POST",
        "/api/notify_all",
        &[("Authorization", "Bearer nope")],
        b"1",
    )
    .await;
    assert_eq!(r.status, 401);
    wait_metric(addr, "jssocket_auth_failures_total", &[], 3.0).await;

    // Right passwords are not failures.
    let admin = server.admin("admin").await;
    let mut by_data = server.client("by data").await;
    by_data
        .send_text(&format!(
            r#"{{"type":"server_connect","data":{{"auth":"{PASSWORD}"}}}}"#
        ))
        .await;
    by_data
        .expect_text(r#"{"type":"server_connect","data":true}"#)
        .await;
    assert_eq!(api_post(addr, "notify_all", "1").await.status, 200);
    wait_metrics(
        addr,
        &[
            ("jssocket_auth_failures_total", &[], 3.0),
            ("jssocket_admins", &[], 2.0),
            ("jssocket_servers", &[], 1.0),
        ],
    )
    .await;
    admin.close().await;
    by_data.close().await;
    wait_metrics(
        addr,
        &[
            ("jssocket_admins", &[], 0.0),
            ("jssocket_servers", &[], 0.0),
            ("jssocket_auth_failures_total", &[], 3.0),
        ],
    )
    .await;
}

#[tokio::test]
async fn groups_and_channels_gauges_follow_membership() {
    let server = Server::start().await;
    let addr = server.addr;
    let mut backend = server.backend("backend").await;
    let mut a = server.acked_client("a", &mut backend, Some("g1")).await;
    let mut b = server.acked_client("b", &mut backend, Some("g1")).await;
    wait_metric(addr, "jssocket_groups", &[], 1.0).await;
    let id_b = b.id().to_string();
    // b moves to g2: two groups; a moves to g2 too: g1 is empty and gone.
    common::acknowledge(&mut backend, &mut b, &id_b, Some("g2")).await;
    wait_metric(addr, "jssocket_groups", &[], 2.0).await;
    let id_a = a.id().to_string();
    common::acknowledge(&mut backend, &mut a, &id_a, Some("g2")).await;
    wait_metric(addr, "jssocket_groups", &[], 1.0).await;

    for (which, name) in [(0, "x"), (0, "y"), (1, "y"), (1, "z")] {
        let conn = if which == 0 { &mut a } else { &mut b };
        conn.send_event("subscribe", json!({ "name": name })).await;
        conn.expect_text(&format!(
            r#"{{"type":"subscribed","data":{{"name":"{name}"}}}}"#
        ))
        .await;
    }
    wait_metric(addr, "jssocket_channels", &[], 3.0).await;
    a.send_event("unsubscribe", json!({"name": "x"})).await;
    a.expect_text(r#"{"type":"unsubscribed","data":{"name":"x"}}"#)
        .await;
    wait_metric(addr, "jssocket_channels", &[], 2.0).await;
    b.close().await;
    wait_metrics(
        addr,
        &[
            ("jssocket_channels", &[], 1.0),
            ("jssocket_groups", &[], 1.0),
        ],
    )
    .await;
    a.close().await;
    wait_metrics(
        addr,
        &[
            ("jssocket_channels", &[], 0.0),
            ("jssocket_groups", &[], 0.0),
        ],
    )
    .await;
}
