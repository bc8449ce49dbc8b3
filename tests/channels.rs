//! SPEC §5 `subscribe`, `unsubscribe` and `publish`: channel names, replies, who receives a
//! publish (filters by `roles`, `groups`, `users` against each subscriber's latest
//! acknowledgement, and `clients` by connection id), limits, and removal of closed subscribers.

mod common;

use common::{Conn, Server, expect_silence_all, register, scrape, wait_metric};
use serde_json::json;

/// `{"type":"subscribed","data":{"name":<name>}}`, the exact reply.
fn subscribed(name: &str) -> String {
    format!(r#"{{"type":"subscribed","data":{{"name":"{name}"}}}}"#)
}

/// The exact frame a subscriber of `name` receives for `payload` (JSON text, compact).
fn delivery(name: &str, payload: &str) -> String {
    format!(r#"{{"type":"publish","data":{{"name":"{name}","data":{payload}}}}}"#)
}

async fn subscribe(conn: &mut Conn, name: &str) {
    conn.send_event("subscribe", json!({ "name": name })).await;
    conn.expect_text(&subscribed(name)).await;
}

async fn unsubscribe(conn: &mut Conn, name: &str) {
    conn.send_event("unsubscribe", json!({ "name": name }))
        .await;
    conn.expect_text(&format!(
        r#"{{"type":"unsubscribed","data":{{"name":"{name}"}}}}"#
    ))
    .await;
}

/// The admin publishes `payload` (JSON text) to `name`; `filter` is `""` or a fragment such
/// as `,"roles":["a"]` appended to the publish data.
async fn publish(admin: &mut Conn, name: &str, payload: &str, filter: &str) {
    admin
        .send_text(&format!(
            r#"{{"type":"publish","data":{{"name":"{name}","data":{payload}{filter}}}}}"#
        ))
        .await;
}

/// A client that sent `client_connect` (forwarded to `backend`) but is not acknowledged.
async fn registered(server: &Server, backend: &mut Conn, name: &str) -> Conn {
    let mut client = server.client(name).await;
    register(&mut client, backend).await;
    client
}

/// `backend` acknowledges `client` with `user` (omitted when `None`) and the extra fields
/// `rest` (a fragment such as `,"roles":["a"]`); the client must receive the data less
/// `user`, byte for byte.
async fn ack(backend: &mut Conn, client: &mut Conn, user: Option<&str>, rest: &str) {
    let id = client.id().to_string();
    let user = user.map_or(String::new(), |u| format!(r#","user":"{u}""#));
    backend
        .send_text(&format!(
            r#"{{"type":"client_connected","data":{{"target":"{id}"{user}{rest}}}}}"#
        ))
        .await;
    client
        .expect_text(&format!(
            r#"{{"type":"client_connected","data":{{"target":"{id}"{rest}}}}}"#
        ))
        .await;
}

/// A registered client acknowledged as [`ack`] does.
async fn acked(
    server: &Server,
    backend: &mut Conn,
    name: &str,
    user: Option<&str>,
    rest: &str,
) -> Conn {
    let mut client = registered(server, backend, name).await;
    ack(backend, &mut client, user, rest).await;
    client
}

/// Publishes `payload` with `filter`, then an unfiltered marker, and checks that exactly the
/// subscribers flagged `true` got the filtered one: each subscriber's next frame is the
/// payload if it was admitted, else the marker (frames to one connection keep their order).
async fn check_filter(
    admin: &mut Conn,
    channel: &str,
    filter: &str,
    subscribers: &mut [(&mut Conn, bool)],
    round: u32,
) {
    let payload = format!(r#"{{"round":{round},"filtered":true}}"#);
    let marker = format!(r#"{{"round":{round},"marker":true}}"#);
    publish(admin, channel, &payload, filter).await;
    publish(admin, channel, &marker, "").await;
    for (conn, admitted) in subscribers.iter_mut() {
        if *admitted {
            conn.expect_text(&delivery(channel, &payload)).await;
        }
        let got = conn.recv_text().await;
        assert_eq!(
            got,
            delivery(channel, &marker),
            "{}: filter {filter:?} should {}have admitted it",
            conn.name,
            if *admitted { "" } else { "not " }
        );
    }
}

// ---------------------------------------------------------------- subscribe / unsubscribe

#[tokio::test]
async fn subscribe_and_unsubscribe_replies_are_exact() {
    let server = Server::start().await;
    let mut backend = server.backend("backend").await;
    let mut client = registered(&server, &mut backend, "client").await;

    client
        .send_text(r#"{"type":"subscribe","data":{"name":"foo.bar"}}"#)
        .await;
    client
        .expect_text(r#"{"type":"subscribed","data":{"name":"foo.bar"}}"#)
        .await;
    client
        .send_text(r#"{"type":"unsubscribe","data":{"name":"foo.bar"}}"#)
        .await;
    client
        .expect_text(r#"{"type":"unsubscribed","data":{"name":"foo.bar"}}"#)
        .await;
    // Leaving a channel one is not in is answered the same way, not an error.
    client
        .send_text(r#"{"type":"unsubscribe","data":{"name":"never.joined"}}"#)
        .await;
    client
        .expect_text(r#"{"type":"unsubscribed","data":{"name":"never.joined"}}"#)
        .await;
    // Every allowed character class, and extra keys in data are ignored.
    client
        .send_text(r#"{"type":"subscribe","data":{"x":1,"name":"A-z_0.9:/x"}}"#)
        .await;
    client.expect_text(&subscribed("A-z_0.9:/x")).await;
    client.expect_silence().await;
}

#[tokio::test]
async fn subscribe_without_client_connect_is_forbidden() {
    let server = Server::start().await;
    let mut backend = server.backend("backend").await;
    let mut admin = server.admin("admin").await;
    let mut plain = server.client("plain").await;

    plain
        .send_event("subscribe", json!({"name": "foo.bar"}))
        .await;
    plain.expect_error("forbidden", Some("subscribe")).await;
    // An admin is not a registered client either.
    admin
        .send_event("subscribe", json!({"name": "foo.bar"}))
        .await;
    admin.expect_error("forbidden", Some("subscribe")).await;

    // Neither was subscribed: a publish reaches no one.
    publish(&mut admin, "foo.bar", r#"{"n":1}"#, "").await;
    admin.ping(1, false).await;
    plain.expect_silence().await;
    wait_metric(server.addr, "jssocket_channels", &[], 0.0).await;

    // The connection stayed open; once registered it may subscribe.
    register(&mut plain, &mut backend).await;
    subscribe(&mut plain, "foo.bar").await;
    publish(&mut admin, "foo.bar", r#"{"n":2}"#, "").await;
    plain.expect_text(&delivery("foo.bar", r#"{"n":2}"#)).await;
}

#[tokio::test]
async fn invalid_channel_names_are_refused() {
    let server = Server::start().await;
    let mut backend = server.backend("backend").await;
    let mut admin = server.admin("admin").await;
    let mut client = registered(&server, &mut backend, "client").await;

    let long_ok = "a".repeat(200);
    let too_long = "a".repeat(201);
    let cases: Vec<(String, &str)> = vec![
        // An empty name counts as missing, like every empty string field.
        (r#"{"name":""}"#.into(), "missing_field"),
        (r#"{"name":null}"#.into(), "missing_field"),
        (r#"{"other":"foo.bar"}"#.into(), "missing_field"),
        ("{}".into(), "missing_field"),
        (r#"{"name":"foo bar"}"#.into(), "invalid_channel"),
        (r#"{"name":" foo"}"#.into(), "invalid_channel"),
        (r#"{"name":"f\u00f6\u00f6"}"#.into(), "invalid_channel"),
        (r#"{"name":"foo*"}"#.into(), "invalid_channel"),
        (format!(r#"{{"name":"{too_long}"}}"#), "invalid_channel"),
        (r#"{"name":5}"#.into(), "invalid_field"),
        (r#"{"name":["foo.bar"]}"#.into(), "invalid_field"),
        (r#"{"name":{"a":1}}"#.into(), "invalid_field"),
        (r#""foo.bar""#.into(), "invalid_data"),
        ("[1]".into(), "invalid_data"),
    ];
    for (data, code) in &cases {
        client
            .send_text(&format!(r#"{{"type":"subscribe","data":{data}}}"#))
            .await;
        let error = client.expect_error(code, Some("subscribe")).await;
        assert!(
            error["message"].as_str().is_some_and(|m| !m.is_empty()),
            "subscribe {data}: {error}"
        );
    }
    client
        .send_text(&format!(
            r#"{{"type":"unsubscribe","data":{{"name":"{too_long}"}}}}"#
        ))
        .await;
    client
        .expect_error("invalid_channel", Some("unsubscribe"))
        .await;
    admin
        .send_text(r#"{"type":"publish","data":{"name":"foo bar","data":1}}"#)
        .await;
    admin.expect_error("invalid_channel", Some("publish")).await;
    admin
        .send_text(r#"{"type":"publish","data":{"data":1}}"#)
        .await;
    admin.expect_error("missing_field", Some("publish")).await;

    // None of that subscribed to anything; the 200-character limit itself is allowed.
    assert_eq!(
        scrape(server.addr).await.value("jssocket_channels", &[]),
        0.0
    );
    subscribe(&mut client, &long_ok).await;
    publish(&mut admin, &long_ok, "7", "").await;
    client.expect_text(&delivery(&long_ok, "7")).await;
    client.expect_silence().await;
}

// ---------------------------------------------------------------- publish, no filter

#[tokio::test]
async fn unfiltered_publish_reaches_every_subscriber_and_no_one_else() {
    let server = Server::start().await;
    let mut backend = server.backend("backend").await;
    let mut admin = server.admin("admin").await;
    let mut s1 = acked(&server, &mut backend, "s1", Some("alice"), "").await;
    let mut s2 = acked(&server, &mut backend, "s2", None, r#","roles":["x"]"#).await;
    let mut s3 = registered(&server, &mut backend, "s3 (unacknowledged)").await;
    let mut other_channel = acked(&server, &mut backend, "other", Some("bob"), "").await;
    let mut prefix = registered(&server, &mut backend, "prefix").await;
    let mut idle = acked(&server, &mut backend, "idle", Some("alice"), "").await;
    for s in [&mut s1, &mut s2, &mut s3] {
        subscribe(s, "foo.bar").await;
    }
    subscribe(&mut other_channel, "foo.baz").await;
    subscribe(&mut prefix, "foo").await;

    // Whitespace is dropped, everything else (key order, numbers, escapes) kept.
    let sent = r#"{"z": 1, "a": [1, 2.50, -0], "m": {"y": null, "b": "s p\"a\u00e9"}, "e": {}}"#;
    let relayed = r#"{"z":1,"a":[1,2.50,-0],"m":{"y":null,"b":"s p\"a\u00e9"},"e":{}}"#;
    publish(&mut admin, "foo.bar", sent, "").await;
    let expected = delivery("foo.bar", relayed);
    for s in [&mut s1, &mut s2, &mut s3] {
        s.expect_text(&expected).await;
    }
    // Nothing to the publisher (success is silent), nor to non-subscribers.
    admin.ping(1, false).await;
    expect_silence_all(&mut [
        &mut s1,
        &mut s2,
        &mut s3,
        &mut other_channel,
        &mut prefix,
        &mut idle,
        &mut backend,
    ])
    .await;

    // A publish to a channel nobody is in reaches no one and is not an error.
    publish(&mut admin, "nobody.here", "1", "").await;
    admin.ping(2, false).await;
}

#[tokio::test]
async fn publish_relays_any_payload_unchanged() {
    let server = Server::start().await;
    let mut backend = server.backend("backend").await;
    let mut admin = server.admin("admin").await;
    let mut sub = registered(&server, &mut backend, "sub").await;
    subscribe(&mut sub, "c").await;
    // Unlike notify_*, publish relays falsy payloads as they are.
    for payload in [
        r#""text""#,
        "0",
        "false",
        "null",
        r#""""#,
        "[]",
        "{}",
        r#"[1,{"b":2,"a":1}]"#,
        "1e3",
    ] {
        publish(&mut admin, "c", payload, "").await;
        sub.expect_text(&delivery("c", payload)).await;
    }
    // No data at all: delivered as null.
    admin
        .send_text(r#"{"type":"publish","data":{"name":"c"}}"#)
        .await;
    sub.expect_text(&delivery("c", "null")).await;
    // Other keys of the publish data are not relayed.
    admin
        .send_text(r#"{"type":"publish","data":{"extra":1,"data":{"k":"v"},"name":"c"}}"#)
        .await;
    sub.expect_text(&delivery("c", r#"{"k":"v"}"#)).await;
    sub.expect_silence().await;
}

// ---------------------------------------------------------------- filters

#[tokio::test]
async fn roles_filter_admits_subscribers_with_one_of_the_roles() {
    let server = Server::start().await;
    let mut backend = server.backend("backend").await;
    let mut admin = server.admin("admin").await;
    let mut editor = acked(
        &server,
        &mut backend,
        "editor",
        Some("u1"),
        r#","roles":["editor","viewer"]"#,
    )
    .await;
    let mut viewer = acked(
        &server,
        &mut backend,
        "viewer",
        Some("u2"),
        r#","roles":["viewer"]"#,
    )
    .await;
    let mut no_roles = acked(&server, &mut backend, "no roles", Some("editor"), "").await;
    let mut group_named_editor = acked(
        &server,
        &mut backend,
        "groups only",
        None,
        r#","groups":["editor"]"#,
    )
    .await;
    let mut unacked = registered(&server, &mut backend, "unacknowledged").await;
    let subs = [
        &mut editor,
        &mut viewer,
        &mut no_roles,
        &mut group_named_editor,
        &mut unacked,
    ];
    for s in subs {
        subscribe(s, "news").await;
    }

    let cases: [(&str, [bool; 5]); 5] = [
        (
            r#","roles":["editor","owner"]"#,
            [true, false, false, false, false],
        ),
        (r#","roles":["viewer"]"#, [true, true, false, false, false]),
        (r#","roles":["owner"]"#, [false; 5]),
        (r#","roles":[]"#, [false; 5]),
        (r#","roles":["Editor"]"#, [false; 5]),
    ];
    for (round, (filter, admitted)) in (0u32..).zip(cases) {
        let mut subs = [
            (&mut editor, admitted[0]),
            (&mut viewer, admitted[1]),
            (&mut no_roles, admitted[2]),
            (&mut group_named_editor, admitted[3]),
            (&mut unacked, admitted[4]),
        ];
        check_filter(&mut admin, "news", filter, &mut subs, round).await;
    }
    admin.ping(1, false).await;
}

#[tokio::test]
async fn groups_filter_admits_subscribers_in_one_of_the_groups() {
    let server = Server::start().await;
    let mut backend = server.backend("backend").await;
    let mut admin = server.admin("admin").await;
    let mut a = acked(
        &server,
        &mut backend,
        "a",
        Some("ua"),
        r#","groups":["g1","g2"]"#,
    )
    .await;
    let mut b = acked(
        &server,
        &mut backend,
        "b",
        Some("ub"),
        r#","groups":["g2"]"#,
    )
    .await;
    // Its `user` (hence its notify group) is g1, but it has no `groups`: a groups filter
    // reads `groups`, not the user.
    let mut user_g1 = acked(
        &server,
        &mut backend,
        "user g1",
        Some("g1"),
        r#","roles":["g1"]"#,
    )
    .await;
    let mut unacked = registered(&server, &mut backend, "unacknowledged").await;
    for s in [&mut a, &mut b, &mut user_g1, &mut unacked] {
        subscribe(s, "team").await;
    }
    let cases: [(&str, [bool; 4]); 4] = [
        (r#","groups":["g1"]"#, [true, false, false, false]),
        (r#","groups":["g3","g2"]"#, [true, true, false, false]),
        (r#","groups":["g3"]"#, [false; 4]),
        (r#","groups":["public"]"#, [false; 4]),
    ];
    for (round, (filter, admitted)) in (0u32..).zip(cases) {
        let mut subs = [
            (&mut a, admitted[0]),
            (&mut b, admitted[1]),
            (&mut user_g1, admitted[2]),
            (&mut unacked, admitted[3]),
        ];
        check_filter(&mut admin, "team", filter, &mut subs, round).await;
    }
    admin.ping(1, false).await;
}

#[tokio::test]
async fn users_filter_admits_subscribers_whose_user_is_listed() {
    let server = Server::start().await;
    let mut backend = server.backend("backend").await;
    let mut admin = server.admin("admin").await;
    let mut alice = acked(&server, &mut backend, "alice", Some("alice"), "").await;
    let mut bob = acked(
        &server,
        &mut backend,
        "bob",
        Some("bob"),
        r#","roles":["alice"]"#,
    )
    .await;
    // Acknowledged without a user: in group `public`, but it has no user to match.
    let mut anonymous = acked(&server, &mut backend, "anonymous", None, "").await;
    let mut unacked = registered(&server, &mut backend, "unacknowledged").await;
    for s in [&mut alice, &mut bob, &mut anonymous, &mut unacked] {
        subscribe(s, "inbox").await;
    }
    let cases: [(&str, [bool; 4]); 5] = [
        (r#","users":["alice"]"#, [true, false, false, false]),
        (
            r#","users":["carol","bob","alice"]"#,
            [true, true, false, false],
        ),
        (r#","users":["carol"]"#, [false; 4]),
        (r#","users":["public"]"#, [false; 4]),
        (r#","users":["ALICE"]"#, [false; 4]),
    ];
    for (round, (filter, admitted)) in (0u32..).zip(cases) {
        let mut subs = [
            (&mut alice, admitted[0]),
            (&mut bob, admitted[1]),
            (&mut anonymous, admitted[2]),
            (&mut unacked, admitted[3]),
        ];
        check_filter(&mut admin, "inbox", filter, &mut subs, round).await;
    }
    admin.ping(1, false).await;
}

/// SPEC §10: `clients` names connections by id; only subscribers of the channel among them
/// receive it, once however often they are listed, acknowledged or not.
#[tokio::test]
async fn clients_filter_admits_subscribers_whose_id_is_listed() {
    let server = Server::start().await;
    let mut backend = server.backend("backend").await;
    let mut admin = server.admin("admin").await;
    let mut alice = acked(&server, &mut backend, "alice", Some("alice"), "").await;
    let mut bob = acked(&server, &mut backend, "bob", Some("bob"), "").await;
    let mut unacked = registered(&server, &mut backend, "unacknowledged").await;
    // Listed, but not a subscriber of the channel: never receives it.
    let mut outsider = acked(&server, &mut backend, "outsider", Some("o"), "").await;
    for s in [&mut alice, &mut bob, &mut unacked] {
        subscribe(s, "inbox").await;
    }
    subscribe(&mut outsider, "elsewhere").await;
    let (a, b, u, o) = (
        alice.id().to_string(),
        bob.id().to_string(),
        unacked.id().to_string(),
        outsider.id().to_string(),
    );
    let cases = [
        (format!(r#","clients":["{a}"]"#), [true, false, false]),
        (
            format!(r#","clients":["{b}","{a}","{b}"]"#),
            [true, true, false],
        ),
        (format!(r#","clients":["{u}","{o}"]"#), [false, false, true]),
        // Only the exact lowercase form names a connection, as for notify_client.
        (
            format!(r#","clients":["{}","alice","",null]"#, a.to_uppercase()),
            [false; 3],
        ),
        (r#","clients":[]"#.to_string(), [false; 3]),
    ];
    for (round, (filter, admitted)) in (0u32..).zip(cases) {
        let mut subs = [
            (&mut alice, admitted[0]),
            (&mut bob, admitted[1]),
            (&mut unacked, admitted[2]),
        ];
        if filter.contains("null") {
            // Not an array of strings: refused, nothing delivered.
            publish(&mut admin, "inbox", "0", &filter).await;
            admin.expect_error("invalid_field", Some("publish")).await;
            continue;
        }
        check_filter(&mut admin, "inbox", &filter, &mut subs, round).await;
    }
    outsider.expect_silence().await;
    admin.ping(1, false).await;
}

#[tokio::test]
async fn unacknowledged_subscriber_gets_only_unfiltered_publishes() {
    let server = Server::start().await;
    let mut backend = server.backend("backend").await;
    let mut admin = server.admin("admin").await;
    let mut unacked = registered(&server, &mut backend, "unacknowledged").await;
    subscribe(&mut unacked, "feed").await;

    for filter in [
        r#","roles":["r"]"#,
        r#","groups":["public"]"#,
        r#","users":["public"]"#,
        r#","users":[""]"#,
        r#","roles":[]"#,
    ] {
        publish(&mut admin, "feed", r#"{"private":true}"#, filter).await;
    }
    publish(&mut admin, "feed", r#"{"public":true}"#, "").await;
    // The first frame it sees is the unfiltered one.
    unacked
        .expect_text(&delivery("feed", r#"{"public":true}"#))
        .await;
    unacked.expect_silence().await;
    admin.ping(1, false).await;

    // Once acknowledged with a matching role, filtered publishes reach it too.
    ack(&mut backend, &mut unacked, Some("u"), r#","roles":["r"]"#).await;
    publish(
        &mut admin,
        "feed",
        r#"{"private":true}"#,
        r#","roles":["r"]"#,
    )
    .await;
    unacked
        .expect_text(&delivery("feed", r#"{"private":true}"#))
        .await;
}

#[tokio::test]
async fn two_filters_are_refused_and_nothing_is_delivered() {
    let server = Server::start().await;
    let mut backend = server.backend("backend").await;
    let mut admin = server.admin("admin").await;
    let mut sub = acked(
        &server,
        &mut backend,
        "sub",
        Some("u"),
        r#","roles":["r"],"groups":["g"]"#,
    )
    .await;
    let mut plain = registered(&server, &mut backend, "plain").await;
    subscribe(&mut sub, "c").await;
    subscribe(&mut plain, "c").await;

    for filters in [
        r#","roles":["r"],"groups":["g"]"#,
        r#","roles":["r"],"users":["u"]"#,
        r#","groups":["g"],"users":["u"]"#,
        r#","roles":["r"],"groups":["g"],"users":["u"]"#,
        r#","roles":["r"],"clients":["c"]"#,
        r#","users":["u"],"clients":[]"#,
        // Empty arrays are still filters.
        r#","roles":[],"users":[]"#,
    ] {
        publish(&mut admin, "c", r#"{"leak":true}"#, filters).await;
        let error = admin
            .expect_error("conflicting_filters", Some("publish"))
            .await;
        assert!(error["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    expect_silence_all(&mut [&mut sub, &mut plain]).await;

    // A null filter is not "no filter" (issue 10): refused, even beside a real one.
    publish(&mut admin, "c", "1", r#","roles":["r"],"groups":null"#).await;
    admin.expect_error("invalid_field", Some("publish")).await;
    admin.ping(1, false).await;
    expect_silence_all(&mut [&mut sub, &mut plain]).await;
}

/// Issue 10 item 9: a backend that sends `"roles": None` means a private message; reading
/// `null` as "no filter" leaked it to every subscriber. It fails closed: an error to the
/// sender, nothing delivered, the admin's connection still served.
#[tokio::test]
async fn null_filters_are_refused_and_nothing_is_delivered() {
    let server = Server::start().await;
    let mut backend = server.backend("backend").await;
    let mut admin = server.admin("admin").await;
    let mut sub = acked(
        &server,
        &mut backend,
        "sub",
        Some("u"),
        r#","roles":["r"],"groups":["g"]"#,
    )
    .await;
    let mut plain = registered(&server, &mut backend, "plain").await;
    subscribe(&mut sub, "c").await;
    subscribe(&mut plain, "c").await;

    for filter in [
        r#","roles":null"#,
        r#","groups":null"#,
        r#","users":null"#,
        r#","clients":null"#,
    ] {
        publish(&mut admin, "c", r#"{"leak":true}"#, filter).await;
        let error = admin.expect_error("invalid_field", Some("publish")).await;
        let field = filter
            .trim_start_matches(",\"")
            .split('"')
            .next()
            .unwrap_or("");
        assert!(
            error["message"].as_str().is_some_and(|m| m.contains(field)),
            "the message names {field}: {error}"
        );
    }
    expect_silence_all(&mut [&mut sub, &mut plain]).await;
    admin.ping(1, false).await;
    // An unfiltered publish still reaches both.
    publish(&mut admin, "c", "2", "").await;
    sub.expect_text(&delivery("c", "2")).await;
    plain.expect_text(&delivery("c", "2")).await;
}

#[tokio::test]
async fn filters_use_the_latest_acknowledgement() {
    let server = Server::start().await;
    let mut backend = server.backend("backend").await;
    let mut admin = server.admin("admin").await;
    let mut sub = acked(
        &server,
        &mut backend,
        "sub",
        Some("u1"),
        r#","roles":["r1"],"groups":["g1"]"#,
    )
    .await;
    let mut witness = registered(&server, &mut backend, "witness").await;
    subscribe(&mut sub, "c").await;
    subscribe(&mut witness, "c").await;

    // (acknowledgement to apply first, if any; filter; does it admit `sub`?)
    type Step = (
        Option<(Option<&'static str>, &'static str)>,
        &'static str,
        bool,
    );
    let steps: [Step; 13] = [
        (None, r#","roles":["r1"]"#, true),
        (None, r#","groups":["g1"]"#, true),
        (None, r#","users":["u1"]"#, true),
        // Re-acknowledged with other values: the old ones no longer count.
        (
            Some((Some("u2"), r#","roles":["r2"],"groups":["g2"]"#)),
            r#","roles":["r1"]"#,
            false,
        ),
        (None, r#","groups":["g1"]"#, false),
        (None, r#","users":["u1"]"#, false),
        (None, r#","roles":["r2"]"#, true),
        (None, r#","groups":["g2"]"#, true),
        (None, r#","users":["u2"]"#, true),
        // Re-acknowledged with neither roles, groups nor user: no filter admits it any
        // more, and the subscription itself survived every acknowledgement.
        (Some((None, "")), r#","roles":["r2"]"#, false),
        (None, r#","groups":["g2"]"#, false),
        (None, r#","users":["u2"]"#, false),
        (None, "", true),
    ];
    for (round, (reack, filter, admitted)) in (0u32..).zip(steps) {
        if let Some((user, rest)) = reack {
            ack(&mut backend, &mut sub, user, rest).await;
        }
        // The unacknowledged witness only gets the unfiltered publish.
        let mut subs = [(&mut sub, admitted), (&mut witness, filter.is_empty())];
        check_filter(&mut admin, "c", filter, &mut subs, round).await;
    }
    admin.ping(1, false).await;
}

// ---------------------------------------------------------------- leaving

#[tokio::test]
async fn unsubscribe_stops_delivery() {
    let server = Server::start().await;
    let mut backend = server.backend("backend").await;
    let mut admin = server.admin("admin").await;
    let mut sub = registered(&server, &mut backend, "sub").await;
    let mut stays = registered(&server, &mut backend, "stays").await;
    subscribe(&mut sub, "a").await;
    subscribe(&mut sub, "b").await;
    subscribe(&mut stays, "a").await;

    unsubscribe(&mut sub, "a").await;
    publish(&mut admin, "a", r#"{"to":"a"}"#, "").await;
    publish(&mut admin, "b", r#"{"to":"b"}"#, "").await;
    // `sub` still gets b, and its first frame is b's: a was not delivered to it.
    sub.expect_text(&delivery("b", r#"{"to":"b"}"#)).await;
    stays.expect_text(&delivery("a", r#"{"to":"a"}"#)).await;
    expect_silence_all(&mut [&mut sub, &mut stays]).await;

    // Subscribing again resumes delivery.
    subscribe(&mut sub, "a").await;
    publish(&mut admin, "a", "2", "").await;
    sub.expect_text(&delivery("a", "2")).await;
    stays.expect_text(&delivery("a", "2")).await;
}

#[tokio::test]
async fn closed_subscriber_is_removed_from_its_channels() {
    let server = Server::start().await;
    let mut backend = server.backend("backend").await;
    let mut admin = server.admin("admin").await;
    let mut leaver = registered(&server, &mut backend, "leaver").await;
    let mut stays = acked(&server, &mut backend, "stays", Some("u"), "").await;
    assert_eq!(
        scrape(server.addr).await.value("jssocket_channels", &[]),
        0.0
    );

    subscribe(&mut leaver, "only.leaver").await;
    subscribe(&mut leaver, "shared").await;
    subscribe(&mut stays, "shared").await;
    wait_metric(server.addr, "jssocket_channels", &[], 2.0).await;

    // Closed from its side: only.leaver disappears, shared keeps its other subscriber.
    leaver.close().await;
    wait_metric(server.addr, "jssocket_channels", &[], 1.0).await;
    publish(&mut admin, "shared", "1", "").await;
    stays.expect_text(&delivery("shared", "1")).await;
    publish(&mut admin, "only.leaver", "2", "").await;
    admin.ping(1, false).await;

    // client_disconnect: closed with 1000 and removed at once.
    stays
        .send_text(r#"{"type":"client_disconnect","data":{}}"#)
        .await;
    stays.expect_close_code(1000).await;
    wait_metric(server.addr, "jssocket_channels", &[], 0.0).await;
    publish(&mut admin, "shared", "3", "").await;
    admin.ping(2, false).await;

    // A dropped TCP connection (no close handshake) is removed too.
    let mut dropped = registered(&server, &mut backend, "dropped").await;
    subscribe(&mut dropped, "gone").await;
    wait_metric(server.addr, "jssocket_channels", &[], 1.0).await;
    drop(dropped);
    wait_metric(server.addr, "jssocket_channels", &[], 0.0).await;
}

// ---------------------------------------------------------------- refusals and limits

#[tokio::test]
async fn publish_from_non_admin_is_forbidden() {
    let server = Server::start().await;
    let mut backend = server.backend("backend").await;
    let mut client = acked(
        &server,
        &mut backend,
        "client",
        Some("u"),
        r#","roles":["admin"]"#,
    )
    .await;
    let mut other = registered(&server, &mut backend, "other").await;
    let mut plain = server.client("plain").await;
    subscribe(&mut client, "c").await;
    subscribe(&mut other, "c").await;

    client
        .send_text(r#"{"type":"publish","data":{"name":"c","data":{"x":1}}}"#)
        .await;
    client.expect_error("forbidden", Some("publish")).await;
    other
        .send_text(r#"{"type":"publish","data":{"name":"c","data":{"x":2}}}"#)
        .await;
    other.expect_error("forbidden", Some("publish")).await;
    plain
        .send_text(r#"{"type":"publish","data":{"name":"c","data":{"x":3}}}"#)
        .await;
    plain.expect_error("forbidden", Some("publish")).await;
    expect_silence_all(&mut [&mut client, &mut other, &mut plain]).await;

    // Still connected and served.
    client.ping(1, true).await;
}

#[tokio::test]
async fn subscribing_twice_delivers_once() {
    let server = Server::start().await;
    let mut backend = server.backend("backend").await;
    let mut admin = server.admin("admin").await;
    let mut sub = registered(&server, &mut backend, "sub").await;
    subscribe(&mut sub, "c").await;
    subscribe(&mut sub, "c").await;

    publish(&mut admin, "c", r#"{"once":true}"#, "").await;
    sub.expect_text(&delivery("c", r#"{"once":true}"#)).await;
    sub.expect_silence().await;

    // One unsubscribe is enough: subscriptions are not counted.
    unsubscribe(&mut sub, "c").await;
    publish(&mut admin, "c", "2", "").await;
    admin.ping(1, false).await;
    sub.expect_silence().await;
    wait_metric(server.addr, "jssocket_channels", &[], 0.0).await;
}

#[tokio::test]
async fn at_most_256_subscriptions_per_connection() {
    let server = Server::start().await;
    let mut backend = server.backend("backend").await;
    let mut admin = server.admin("admin").await;
    let mut sub = registered(&server, &mut backend, "sub").await;
    let mut other = registered(&server, &mut backend, "other").await;

    for i in 0..256 {
        sub.send_event("subscribe", json!({ "name": format!("ch.{i}") }))
            .await;
    }
    for i in 0..256 {
        sub.expect_text(&subscribed(&format!("ch.{i}"))).await;
    }
    sub.send_event("subscribe", json!({"name": "ch.256"})).await;
    let error = sub
        .expect_error("too_many_subscriptions", Some("subscribe"))
        .await;
    assert!(
        error["message"].as_str().is_some_and(|m| m.contains("256")),
        "{error}"
    );
    // A channel it is already in is not a new subscription.
    subscribe(&mut sub, "ch.255").await;
    // The limit is per connection.
    subscribe(&mut other, "ch.256").await;
    wait_metric(server.addr, "jssocket_channels", &[], 257.0).await;

    // ch.256 did not take it; all 256 others did.
    publish(&mut admin, "ch.256", "0", "").await;
    publish(&mut admin, "ch.0", "1", "").await;
    publish(&mut admin, "ch.255", "2", "").await;
    sub.expect_text(&delivery("ch.0", "1")).await;
    sub.expect_text(&delivery("ch.255", "2")).await;
    other.expect_text(&delivery("ch.256", "0")).await;

    // Leaving one makes room for another.
    unsubscribe(&mut sub, "ch.7").await;
    subscribe(&mut sub, "ch.new").await;
    sub.send_event("subscribe", json!({"name": "ch.7"})).await;
    sub.expect_error("too_many_subscriptions", Some("subscribe"))
        .await;
    publish(&mut admin, "ch.new", "3", "").await;
    sub.expect_text(&delivery("ch.new", "3")).await;
    expect_silence_all(&mut [&mut sub, &mut other]).await;

    // Each refusal costs a reply, so it counts toward --bad-input-limit (30 a minute; two
    // were used above): the 31st closes the connection.
    for _ in 0..29 {
        sub.send_event("subscribe", json!({"name": "ch.x"})).await;
    }
    for _ in 0..29 {
        sub.expect_error("too_many_subscriptions", Some("subscribe"))
            .await;
    }
    assert_eq!(sub.expect_close_code(1008).await, "too much bad input");
}
