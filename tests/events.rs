//! One test per event of SPEC §5 (subscribe/unsubscribe/publish excepted) and per fix of §9,
//! over real WebSocket connections to an in-process server.

mod common;

use common::{
    Conn, Server, acknowledge, expect_silence_all, is_uuid_v4, recv_any, register, register_with,
};
use jssocket::peer::Close;
use serde_json::json;

// ---------------------------------------------------------------- server_connect

#[tokio::test]
async fn server_connect_admin_gets_true_and_repeat_gets_true() {
    let server = Server::start_default_auth().await;
    let mut backend = server.admin("backend").await;
    backend.server_connect().await;
    backend.server_connect().await;
    // Still a working server: a client connect reaches it.
    let mut client = server.client("client").await;
    let id = register(&mut client, &mut backend).await;
    assert!(is_uuid_v4(&id));
}

#[tokio::test]
async fn repeated_server_connect_does_not_double_round_robin_share() {
    let server = Server::start().await;
    let mut s1 = server.backend("s1").await;
    let mut s2 = server.backend("s2").await;
    // s1 repeats its server_connect after s2 joined: answered true, changes nothing.
    s1.server_connect().await;
    s1.server_connect().await;

    let mut order = Vec::new();
    let mut clients = Vec::new();
    for i in 0..4 {
        let mut client = server.client(&format!("client{i}")).await;
        client
            .send_text(r#"{"type":"client_connect","data":{}}"#)
            .await;
        let (which, text) = recv_any(&mut [&mut s1, &mut s2]).await;
        assert!(text.starts_with(r#"{"type":"client_connect","data":{"target":""#));
        order.push(which);
        clients.push(client);
    }
    assert_eq!(
        order.iter().filter(|&&w| w == 0).count(),
        2,
        "s1 got {order:?} (0 = s1, 1 = s2)"
    );
    for pair in order.windows(2) {
        assert_ne!(pair[0], pair[1], "servers must alternate: {order:?}");
    }
    expect_silence_all(&mut [&mut s1, &mut s2]).await;
}

#[tokio::test]
async fn server_connect_from_non_admin_gets_false_then_close_1008() {
    let server = Server::start().await;
    let mut conn = server.client("plain").await;
    conn.send_text(r#"{"type":"server_connect","data":{}}"#)
        .await;
    conn.expect_text(r#"{"type":"server_connect","data":false}"#)
        .await;
    let reason = conn.expect_close_code(1008).await;
    assert_eq!(reason, Close::NOT_ADMIN.reason);

    // It never joined the pool: with no server, a client_connect is only queued.
    let mut backend = server.admin("backend").await;
    let mut client = server.client("client").await;
    client
        .send_text(r#"{"type":"client_connect","data":{}}"#)
        .await;
    client.expect_silence().await;
    server_connect_expecting_forward(&mut backend).await;
}

#[tokio::test]
async fn wrong_password_is_not_admin_and_others_keep_being_served() {
    let server = Server::start_default_auth().await;
    let mut backend = server.backend("backend").await;
    let mut client = server.acked_client("client", &mut backend, None).await;

    // Wrong password in server_connect's data.
    let mut wrong_data = server.client("wrong password in data").await;
    wrong_data
        .send_text(r#"{"type":"server_connect","data":{"auth":"nope"}}"#)
        .await;
    wrong_data
        .expect_text(r#"{"type":"server_connect","data":false}"#)
        .await;
    wrong_data.expect_close_code(1008).await;

    // Wrong password in the auth header.
    let mut wrong_header =
        Conn::connect(&server.url(), Some("123456789"), "wrong password in header").await;
    wrong_header
        .send_text(r#"{"type":"notify_all","data":{"x":1}}"#)
        .await;
    wrong_header
        .expect_error("forbidden", Some("notify_all"))
        .await;
    wrong_header
        .send_text(r#"{"type":"server_connect","data":{}}"#)
        .await;
    wrong_header
        .expect_text(r#"{"type":"server_connect","data":false}"#)
        .await;
    wrong_header.expect_close_code(1008).await;

    client.expect_silence().await;
    client.ping(1, true).await;
    backend.ping(2, false).await;
}

/// Sends `server_connect` on an admin while a client connect is queued: expects `true` and
/// the queued forward, in either order; returns the forward.
async fn server_connect_expecting_forward(conn: &mut Conn) -> String {
    conn.send_text(r#"{"type":"server_connect","data":{}}"#)
        .await;
    let a = conn.recv_text().await;
    let b = conn.recv_text().await;
    let (ok, forward) = if a.starts_with(r#"{"type":"client_connect""#) {
        (b, a)
    } else {
        (a, b)
    };
    assert_eq!(ok, r#"{"type":"server_connect","data":true}"#);
    assert!(
        forward.starts_with(r#"{"type":"client_connect","data":"#),
        "{forward}"
    );
    forward
}

#[tokio::test]
async fn server_connect_with_auth_in_data_and_no_header_is_admin() {
    let server = Server::start_default_auth().await;
    let mut backend = server.client("old-protocol backend").await;
    backend
        .send_text(r#"{"type":"server_connect","data":{"auth":"12345678"}}"#)
        .await;
    backend
        .expect_text(r#"{"type":"server_connect","data":true}"#)
        .await;
    // It is a server and an admin: it gets client connects and may acknowledge.
    let mut client = server.client("client").await;
    let id = register(&mut client, &mut backend).await;
    acknowledge(&mut backend, &mut client, &id, Some("u1")).await;
}

// ---------------------------------------------------------------- client_connect

#[tokio::test]
async fn client_connect_forward_keeps_key_order_and_replaces_target_in_place() {
    let server = Server::start().await;
    let mut backend = server.backend("backend").await;
    let mut client = server.client("client").await;
    client
        .send_text(r#"{"type":"client_connect","data":{"token":"abc","target":"fake","x":1}}"#)
        .await;
    let forward = backend.recv_text().await;
    let value: serde_json::Value = serde_json::from_str(&forward).unwrap();
    let id = value["data"]["target"].as_str().unwrap().to_string();
    assert_ne!(id, "fake");
    assert!(is_uuid_v4(&id), "{id}");
    assert_eq!(
        forward,
        format!(r#"{{"type":"client_connect","data":{{"token":"abc","target":"{id}","x":1}}}}"#)
    );
    // That id is the client's own: acknowledging it reaches this client.
    acknowledge(&mut backend, &mut client, &id, None).await;
}

#[tokio::test]
async fn client_connect_forward_appends_target_when_absent() {
    let server = Server::start().await;
    let mut backend = server.backend("backend").await;
    let mut client = server.client("client").await;
    client
        .send_text(
            r#"{"type":"client_connect", "data": { "z" : 1 , "token": "t o k", "a": {"n": [1, 2]} }, "extra": 5}"#,
        )
        .await;
    let forward = backend.recv_text().await;
    let value: serde_json::Value = serde_json::from_str(&forward).unwrap();
    let id = value["data"]["target"].as_str().unwrap();
    assert_eq!(
        forward,
        format!(
            r#"{{"type":"client_connect","data":{{"z":1,"token":"t o k","a":{{"n":[1,2]}},"target":"{id}"}}}}"#
        )
    );

    // Empty (falsy) data: just the target.
    let mut other = server.client("other").await;
    other.send_text(r#"{"type":"client_connect"}"#).await;
    let forward = backend.recv_text().await;
    let value: serde_json::Value = serde_json::from_str(&forward).unwrap();
    let id = value["data"]["target"].as_str().unwrap();
    assert_eq!(
        forward,
        format!(r#"{{"type":"client_connect","data":{{"target":"{id}"}}}}"#)
    );
}

#[tokio::test]
async fn client_connect_again_is_forwarded_again() {
    let server = Server::start().await;
    let mut backend = server.backend("backend").await;
    let mut client = server.client("client").await;
    let first = register_with(&mut client, &mut backend, r#"{"token":"a"}"#).await;
    let second = register_with(&mut client, &mut backend, r#"{"token":"b"}"#).await;
    assert_eq!(first["target"], second["target"]);
    assert_eq!(second["token"], "b");
}

#[tokio::test]
async fn connection_ids_are_lowercase_hyphenated_uuid_v4() {
    let server = Server::start().await;
    let mut backend = server.backend("backend").await;
    let mut ids = Vec::new();
    for i in 0..5 {
        let mut client = server.client(&format!("client{i}")).await;
        let id = register(&mut client, &mut backend).await;
        assert!(is_uuid_v4(&id), "not a lowercase hyphenated UUID v4: {id}");
        ids.push(id);
    }
    let mut unique = ids.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), ids.len(), "ids repeat: {ids:?}");
}

#[tokio::test]
async fn client_connect_without_server_is_delivered_when_a_server_joins() {
    let server = Server::start().await;
    let mut client = server.client("client").await;
    client
        .send_text(r#"{"type":"client_connect","data":{"token":"early"}}"#)
        .await;
    client.expect_silence().await;

    let mut backend = server.admin("backend").await;
    let forward = server_connect_expecting_forward(&mut backend).await;
    let value: serde_json::Value = serde_json::from_str(&forward).unwrap();
    let id = value["data"]["target"].as_str().unwrap().to_string();
    assert_eq!(
        forward,
        format!(r#"{{"type":"client_connect","data":{{"token":"early","target":"{id}"}}}}"#)
    );
    acknowledge(&mut backend, &mut client, &id, None).await;
    backend.expect_silence().await;
}

#[tokio::test]
async fn client_connect_without_server_expires_with_no_server_error() {
    let server = Server::with_args(&["--pending-timeout", "1"]).await;
    let mut client = server.client("client").await;
    client
        .send_text(r#"{"type":"client_connect","data":{}}"#)
        .await;
    client
        .expect_error("no_server", Some("client_connect"))
        .await;
    // The expired request is gone: a server joining later does not get it.
    let mut backend = server.backend("backend").await;
    backend.expect_silence().await;
}

#[tokio::test]
async fn two_servers_share_client_connects_alternately() {
    let server = Server::start().await;
    let mut s1 = server.backend("s1").await;
    let mut s2 = server.backend("s2").await;
    let mut order = Vec::new();
    let mut clients = Vec::new();
    for i in 0..6 {
        let mut client = server.client(&format!("client{i}")).await;
        client
            .send_text(r#"{"type":"client_connect","data":{}}"#)
            .await;
        let (which, _) = recv_any(&mut [&mut s1, &mut s2]).await;
        order.push(which);
        clients.push(client);
    }
    assert_eq!(order.iter().filter(|&&w| w == 0).count(), 3, "{order:?}");
    for pair in order.windows(2) {
        assert_ne!(pair[0], pair[1], "servers must alternate: {order:?}");
    }
}

#[tokio::test]
async fn closed_server_is_skipped_at_once() {
    // Whichever server the round-robin cursor points at, closing the middle one of three
    // sends every later connect to the other two, alternately, none lost.
    for warmup in 0..3 {
        let server = Server::start().await;
        let mut s1 = server.backend("s1").await;
        let mut s2 = server.backend("s2").await;
        let mut s3 = server.backend("s3").await;
        let mut clients = Vec::new();
        for i in 0..warmup {
            let mut client = server.client(&format!("warmup{i}")).await;
            client
                .send_text(r#"{"type":"client_connect","data":{}}"#)
                .await;
            let (which, _) = recv_any(&mut [&mut s1, &mut s2, &mut s3]).await;
            assert_eq!(which, i, "round robin in join order");
            clients.push(client);
        }
        // s2 leaves with a closing handshake; once answered, it is out of the pool.
        s2.close().await;

        let mut order = Vec::new();
        for i in 0..4 {
            let mut client = server.client(&format!("client{i}")).await;
            client
                .send_text(r#"{"type":"client_connect","data":{}}"#)
                .await;
            let (which, text) = recv_any(&mut [&mut s1, &mut s3]).await;
            assert!(text.starts_with(r#"{"type":"client_connect","data":{"target":""#));
            order.push(which);
            clients.push(client);
        }
        for pair in order.windows(2) {
            assert_ne!(
                pair[0], pair[1],
                "warmup {warmup}: must alternate: {order:?}"
            );
        }
        expect_silence_all(&mut [&mut s1, &mut s3]).await;
    }
}

#[tokio::test]
async fn server_leaving_by_client_disconnect_leaves_the_pool() {
    let server = Server::start().await;
    let mut s1 = server.backend("s1").await;
    let mut client = server.client("client").await;
    let id = register(&mut client, &mut s1).await;
    acknowledge(&mut s1, &mut client, &id, None).await;

    s1.send_text(r#"{"type":"client_disconnect","data":{}}"#)
        .await;
    s1.expect_close_code(1000).await;
    // No server now: a connect waits (not lost) and goes to the next server to join.
    let mut late = server.client("late").await;
    late.send_text(r#"{"type":"client_connect","data":{"token":"t"}}"#)
        .await;
    late.expect_silence().await;
    let mut s2 = server.admin("s2").await;
    let forward = server_connect_expecting_forward(&mut s2).await;
    assert!(forward.contains(r#""token":"t""#), "{forward}");
}

// ---------------------------------------------------------------- client_connected

#[tokio::test]
async fn client_connected_removes_user_and_keeps_roles_groups_in_order() {
    let server = Server::start().await;
    let mut backend = server.backend("backend").await;
    let mut client = server.client("client").await;
    let id = register(&mut client, &mut backend).await;
    backend
        .send_text(&format!(
            r#"{{"type":"client_connected","data":{{"authenticated":true,"target":"{id}","user":"u-42","roles":["admin","ops"],"groups":["g1"],"extra":{{"b":1,"a":[null]}}}}}}"#
        ))
        .await;
    client
        .expect_text(&format!(
            r#"{{"type":"client_connected","data":{{"authenticated":true,"target":"{id}","roles":["admin","ops"],"groups":["g1"],"extra":{{"b":1,"a":[null]}}}}}}"#
        ))
        .await;
    backend.expect_silence().await;
    // It joined group "u-42".
    backend
        .send_text(r#"{"type":"notify_group","data":{"target":"u-42","data":{"hi":1}}}"#)
        .await;
    client.expect_text(r#"{"hi":1}"#).await;
}

#[tokio::test]
async fn client_connected_unknown_target_errors_to_admin_and_sends_nothing() {
    let server = Server::start().await;
    let mut backend = server.backend("backend").await;
    let mut client = server.client("client").await;
    let _id = register(&mut client, &mut backend).await;
    let mut bystander = server.client("bystander").await;

    for target in ["00000000-0000-4000-8000-000000000000", "not-a-connection"] {
        backend
            .send_event("client_connected", json!({"target": target, "user": "x"}))
            .await;
        backend
            .expect_error("unknown_target", Some("client_connected"))
            .await;
    }
    // An upper-case spelling of a real id does not name it either (ids match exactly).
    let upper = client.id().to_uppercase();
    backend
        .send_event("client_connected", json!({"target": upper}))
        .await;
    backend
        .expect_error("unknown_target", Some("client_connected"))
        .await;
    expect_silence_all(&mut [&mut client, &mut bystander]).await;
    // The client is still unacknowledged: it may not notify.
    client
        .send_text(r#"{"type":"notify_client","data":{"data":{"a":1}}}"#)
        .await;
    client
        .expect_error("forbidden", Some("notify_client"))
        .await;
}

#[tokio::test]
async fn client_connected_from_non_admin_is_forbidden() {
    let server = Server::start().await;
    let mut backend = server.backend("backend").await;
    let mut victim = server.client("victim").await;
    let victim_id = register(&mut victim, &mut backend).await;
    let mut attacker = server.client("attacker").await;
    let attacker_id = register(&mut attacker, &mut backend).await;

    for target in [&victim_id, &attacker_id] {
        attacker
            .send_event(
                "client_connected",
                json!({"target": target, "user": "root"}),
            )
            .await;
        attacker
            .expect_error("forbidden", Some("client_connected"))
            .await;
    }
    expect_silence_all(&mut [&mut victim, &mut backend]).await;
    // Neither was acknowledged.
    attacker
        .send_text(r#"{"type":"notify_group","data":{"target":"root","data":{"a":1}}}"#)
        .await;
    attacker
        .expect_error("forbidden", Some("notify_group"))
        .await;
    // The connection stays open and is still served.
    acknowledge(&mut backend, &mut attacker, &attacker_id, None).await;
    attacker.ping(1, true).await;
}

#[tokio::test]
async fn reacknowledging_into_same_group_keeps_membership() {
    let server = Server::start().await;
    let mut backend = server.backend("backend").await;
    let mut client = server.client("client").await;
    let id = register(&mut client, &mut backend).await;
    acknowledge(&mut backend, &mut client, &id, Some("team")).await;
    acknowledge(&mut backend, &mut client, &id, Some("team")).await;
    // And once more after a re-authentication round.
    register(&mut client, &mut backend).await;
    acknowledge(&mut backend, &mut client, &id, Some("team")).await;

    backend
        .send_text(r#"{"type":"notify_group","data":{"target":"team","data":{"n":1}}}"#)
        .await;
    client.expect_text(r#"{"n":1}"#).await;
    // Exactly once.
    client.expect_silence().await;
}

#[tokio::test]
async fn acknowledging_into_another_group_leaves_the_old_one() {
    let server = Server::start().await;
    let mut backend = server.backend("backend").await;
    let mut client = server.client("client").await;
    let id = register(&mut client, &mut backend).await;
    acknowledge(&mut backend, &mut client, &id, None).await; // public
    acknowledge(&mut backend, &mut client, &id, Some("g1")).await;
    acknowledge(&mut backend, &mut client, &id, Some("g2")).await;

    for old in ["public", "g1"] {
        backend
            .send_event("notify_group", json!({"target": old, "data": {"old": old}}))
            .await;
    }
    client.expect_silence().await;
    backend
        .send_text(r#"{"type":"notify_group","data":{"target":"g2","data":{"new":true}}}"#)
        .await;
    client.expect_text(r#"{"new":true}"#).await;
}

#[tokio::test]
async fn client_connected_with_empty_user_joins_public() {
    let server = Server::start().await;
    let mut backend = server.backend("backend").await;
    let mut clients = Vec::new();
    for (i, user) in [json!(null), json!(""), json!(false)]
        .into_iter()
        .enumerate()
    {
        let mut client = server.client(&format!("client{i}")).await;
        let id = register(&mut client, &mut backend).await;
        backend
            .send_event("client_connected", json!({"target": id, "user": user}))
            .await;
        client
            .expect_text(&format!(
                r#"{{"type":"client_connected","data":{{"target":"{id}"}}}}"#
            ))
            .await;
        clients.push(client);
    }
    backend
        .send_text(r#"{"type":"notify_group","data":{"target":"public","data":{"p":1}}}"#)
        .await;
    for client in &mut clients {
        client.expect_text(r#"{"p":1}"#).await;
    }
}

// ---------------------------------------------------------------- client_disconnect

#[tokio::test]
async fn client_disconnect_closes_1000_and_removes_from_everything() {
    let server = Server::start().await;
    let mut backend = server.backend("backend").await;
    let mut leaver = server.acked_client("leaver", &mut backend, Some("g")).await;
    let leaver_id = leaver.id().to_string();
    let mut stayer = server.acked_client("stayer", &mut backend, Some("g")).await;

    leaver
        .send_text(r#"{"type":"client_disconnect","data":{}}"#)
        .await;
    leaver.expect_close_code(1000).await;

    // Its id names nobody any more: notify_client reaches no one (the callback still comes).
    backend
        .send_event(
            "notify_client",
            json!({"target": leaver_id, "data": {"to": "leaver"}, "callback": "c1"}),
        )
        .await;
    backend
        .expect_text(r#"{"type":"callback","data":"c1"}"#)
        .await;
    // notify_group by its id no longer means group "g".
    backend
        .send_event(
            "notify_group",
            json!({"target": leaver_id, "data": {"via": "id"}, "callback": "c2"}),
        )
        .await;
    backend
        .expect_text(r#"{"type":"callback","data":"c2"}"#)
        .await;
    stayer.expect_silence().await;

    // The group goes on without it.
    backend
        .send_text(r#"{"type":"notify_group","data":{"target":"g","data":{"g":1}}}"#)
        .await;
    stayer.expect_text(r#"{"g":1}"#).await;
    backend
        .send_text(r#"{"type":"notify_all","data":{"all":1}}"#)
        .await;
    stayer.expect_text(r#"{"all":1}"#).await;
    expect_silence_all(&mut [&mut stayer, &mut backend]).await;
}

#[tokio::test]
async fn client_disconnect_from_unregistered_connection_closes_1000() {
    let server = Server::start().await;
    let mut conn = server.client("conn").await;
    conn.send_text(r#"{"type":"client_disconnect"}"#).await;
    conn.expect_close_code(1000).await;
    // The server goes on.
    let mut backend = server.backend("backend").await;
    let mut client = server.acked_client("client", &mut backend, None).await;
    client.ping(1, true).await;
}

// ---------------------------------------------------------------- notify_client

#[tokio::test]
async fn notify_client_delivers_bare_payload_exactly() {
    let server = Server::start().await;
    let mut backend = server.backend("backend").await;
    let mut client = server.acked_client("client", &mut backend, None).await;
    let id = client.id().to_string();
    let payload = r#"{"z":1,"a":{"y":[1,{"q":null,"b":2.50}],"c":"x \"q\" \u00e9"},"m":true,"type":"not-an-envelope"}"#;
    backend
        .send_text(&format!(
            r#"{{"type":"notify_client","data":{{"target":"{id}","data":{payload}}}}}"#
        ))
        .await;
    client.expect_text(payload).await;
    // No callback was asked for.
    expect_silence_all(&mut [&mut backend, &mut client]).await;
}

#[tokio::test]
async fn notify_client_defaults_to_the_sender() {
    let server = Server::start().await;
    let mut backend = server.backend("backend").await;
    let mut client = server.acked_client("client", &mut backend, None).await;
    let mut other = server.acked_client("other", &mut backend, None).await;
    for target in ["", r#","target":null"#, r#","target":"""#] {
        client
            .send_text(&format!(
                r#"{{"type":"notify_client","data":{{"data":{{"self":1}}{target}}}}}"#
            ))
            .await;
        client.expect_text(r#"{"self":1}"#).await;
    }
    expect_silence_all(&mut [&mut other, &mut backend]).await;
}

#[tokio::test]
async fn notify_client_callback_comes_after_the_payload() {
    let server = Server::start().await;
    let mut backend = server.backend("backend").await;
    let mut client = server.acked_client("client", &mut backend, None).await;
    let mut other = server.acked_client("other", &mut backend, None).await;
    let other_id = other.id().to_string();
    // To itself: payload first, then the callback, both to the same connection.
    client
        .send_text(
            r#"{"type":"notify_client","data":{"data":{"p":1},"callback":{"id":7,"k":"v"}}}"#,
        )
        .await;
    client.expect_text(r#"{"p":1}"#).await;
    client
        .expect_text(r#"{"type":"callback","data":{"id":7,"k":"v"}}"#)
        .await;
    // To another client: it gets the payload, the sender the callback.
    client
        .send_text(&format!(
            r#"{{"type":"notify_client","data":{{"target":"{other_id}","data":[1,2],"callback":"done"}}}}"#
        ))
        .await;
    other.expect_text("[1,2]").await;
    client
        .expect_text(r#"{"type":"callback","data":"done"}"#)
        .await;
    // Falsy callbacks are not acked.
    for callback in ["null", "0", "\"\"", "false", "[]", "{}"] {
        client
            .send_text(&format!(
                r#"{{"type":"notify_client","data":{{"data":{{"c":{callback}}},"callback":{callback}}}}}"#
            ))
            .await;
        client.expect_text(&format!(r#"{{"c":{callback}}}"#)).await;
    }
    client.expect_silence().await;
}

#[tokio::test]
async fn notify_client_callback_also_for_unknown_target() {
    let server = Server::start().await;
    let mut backend = server.backend("backend").await;
    let mut client = server.acked_client("client", &mut backend, None).await;
    for target in ["00000000-0000-4000-8000-000000000000", "nobody"] {
        backend
            .send_event(
                "notify_client",
                json!({"target": target, "data": {"x": 1}, "callback": {"t": target}}),
            )
            .await;
        backend
            .expect_text(&format!(
                r#"{{"type":"callback","data":{{"t":"{target}"}}}}"#
            ))
            .await;
        client
            .send_event(
                "notify_client",
                json!({"target": target, "data": {"x": 1}, "callback": 5}),
            )
            .await;
        client.expect_text(r#"{"type":"callback","data":5}"#).await;
    }
    client.expect_silence().await;
}

#[tokio::test]
async fn notify_client_falsy_payload_is_delivered_as_empty_object() {
    let server = Server::start().await;
    let mut backend = server.backend("backend").await;
    let mut client = server.acked_client("client", &mut backend, None).await;
    let id = client.id().to_string();
    for data in [
        r#","data":null"#,
        r#","data":0"#,
        r#","data":0.0"#,
        r#","data":"""#,
        r#","data":[]"#,
        r#","data":{}"#,
        r#","data":false"#,
        "",
    ] {
        backend
            .send_text(&format!(
                r#"{{"type":"notify_client","data":{{"target":"{id}"{data}}}}}"#
            ))
            .await;
        client.expect_text("{}").await;
    }
}

#[tokio::test]
async fn notify_client_non_object_payloads_are_delivered_as_is() {
    let server = Server::start().await;
    let mut backend = server.backend("backend").await;
    let mut client = server.acked_client("client", &mut backend, None).await;
    let id = client.id().to_string();
    for payload in [
        r#""hello""#,
        "42",
        "-1.5e3",
        "[1,\"two\",{\"b\":1,\"a\":2}]",
        "true",
    ] {
        backend
            .send_text(&format!(
                r#"{{"type":"notify_client","data":{{"target":"{id}","data":{payload}}}}}"#
            ))
            .await;
        client.expect_text(payload).await;
    }
}

#[tokio::test]
async fn notify_client_reaches_registered_unacknowledged_client_by_id() {
    let server = Server::start().await;
    let mut backend = server.backend("backend").await;
    let mut client = server.client("client").await;
    let id = register(&mut client, &mut backend).await;
    backend
        .send_event(
            "notify_client",
            json!({"target": id, "data": {"early": true}}),
        )
        .await;
    client.expect_text(r#"{"early":true}"#).await;
}

#[tokio::test]
async fn unacknowledged_client_may_not_notify() {
    let server = Server::start().await;
    let mut backend = server.backend("backend").await;
    let mut target = server.acked_client("target", &mut backend, Some("g")).await;
    let target_id = target.id().to_string();

    let mut registered = server.client("registered").await;
    register(&mut registered, &mut backend).await;
    let mut stranger = server.client("stranger").await;
    for sender in [&mut registered, &mut stranger] {
        sender
            .send_event(
                "notify_client",
                json!({"target": target_id, "data": {"x": 1}, "callback": "cb"}),
            )
            .await;
        sender
            .expect_error("forbidden", Some("notify_client"))
            .await;
        sender
            .send_event(
                "notify_group",
                json!({"target": "g", "data": {"x": 2}, "callback": "cb"}),
            )
            .await;
        sender.expect_error("forbidden", Some("notify_group")).await;
        // Not even to itself.
        sender
            .send_text(r#"{"type":"notify_client","data":{"data":{"x":3}}}"#)
            .await;
        sender
            .expect_error("forbidden", Some("notify_client"))
            .await;
        sender.expect_silence().await;
    }
    expect_silence_all(&mut [&mut target, &mut backend]).await;
}

// ---------------------------------------------------------------- notify_group

#[tokio::test]
async fn notify_group_by_name_reaches_every_member_only() {
    let server = Server::start().await;
    let mut backend = server.backend("backend").await;
    let mut a1 = server.acked_client("a1", &mut backend, Some("alpha")).await;
    let mut a2 = server.acked_client("a2", &mut backend, Some("alpha")).await;
    let mut b1 = server.acked_client("b1", &mut backend, Some("beta")).await;
    let payload = r#"{"k2":"v","k1":[{"y":1,"x":0}]}"#;
    backend
        .send_text(&format!(
            r#"{{"type":"notify_group","data":{{"target":"alpha","data":{payload}}}}}"#
        ))
        .await;
    a1.expect_text(payload).await;
    a2.expect_text(payload).await;
    expect_silence_all(&mut [&mut b1, &mut backend]).await;
    // A client may notify a group (default --client-send any), itself included if a member.
    b1.send_text(r#"{"type":"notify_group","data":{"target":"alpha","data":"s"}}"#)
        .await;
    a1.expect_text(r#""s""#).await;
    a2.expect_text(r#""s""#).await;
    b1.expect_silence().await;
}

#[tokio::test]
async fn notify_group_by_connection_id_means_its_group() {
    let server = Server::start().await;
    let mut backend = server.backend("backend").await;
    let mut a1 = server.acked_client("a1", &mut backend, Some("alpha")).await;
    let mut a2 = server.acked_client("a2", &mut backend, Some("alpha")).await;
    let mut b1 = server.acked_client("b1", &mut backend, Some("beta")).await;
    let a2_id = a2.id().to_string();
    backend
        .send_event(
            "notify_group",
            json!({"target": a2_id, "data": {"via": "id"}}),
        )
        .await;
    a1.expect_text(r#"{"via":"id"}"#).await;
    a2.expect_text(r#"{"via":"id"}"#).await;
    b1.expect_silence().await;
}

#[tokio::test]
async fn notify_group_defaults_to_public() {
    let server = Server::start().await;
    let mut backend = server.backend("backend").await;
    let mut p1 = server.acked_client("p1", &mut backend, None).await;
    let mut p2 = server
        .acked_client("p2", &mut backend, Some("public"))
        .await;
    let mut other = server.acked_client("other", &mut backend, Some("u1")).await;
    for target in ["", r#""target":null,"#, r#""target":"","#] {
        backend
            .send_text(&format!(
                r#"{{"type":"notify_group","data":{{{target}"data":{{"pub":1}}}}}}"#
            ))
            .await;
        p1.expect_text(r#"{"pub":1}"#).await;
        p2.expect_text(r#"{"pub":1}"#).await;
    }
    other.expect_silence().await;
}

#[tokio::test]
async fn notify_group_acks_outer_callback() {
    let server = Server::start().await;
    let mut backend = server.backend("backend").await;
    let mut member = server.acked_client("member", &mut backend, Some("g")).await;
    backend
        .send_text(r#"{"type":"notify_group","data":{"target":"g","data":{"x":1,"callback":"inner"},"callback":"outer"}}"#)
        .await;
    member.expect_text(r#"{"x":1,"callback":"inner"}"#).await;
    backend
        .expect_text(r#"{"type":"callback","data":"outer"}"#)
        .await;
    // Also when the group is empty or unknown.
    backend
        .send_text(r#"{"type":"notify_group","data":{"target":"empty","data":{"x":2},"callback":{"n":[1]}}}"#)
        .await;
    backend
        .expect_text(r#"{"type":"callback","data":{"n":[1]}}"#)
        .await;
    // A member sending to its own group: payload first, then the callback.
    member
        .send_text(r#"{"type":"notify_group","data":{"target":"g","data":{"x":3},"callback":9}}"#)
        .await;
    member.expect_text(r#"{"x":3}"#).await;
    member.expect_text(r#"{"type":"callback","data":9}"#).await;
    expect_silence_all(&mut [&mut member, &mut backend]).await;
}

#[tokio::test]
async fn notify_group_falsy_payload_is_empty_object() {
    let server = Server::start().await;
    let mut backend = server.backend("backend").await;
    let mut member = server.acked_client("member", &mut backend, Some("g")).await;
    for data in [
        r#","data":null"#,
        r#","data":0"#,
        r#","data":"""#,
        r#","data":[]"#,
        r#","data":{}"#,
        r#","data":false"#,
        "",
    ] {
        backend
            .send_text(&format!(
                r#"{{"type":"notify_group","data":{{"target":"g"{data}}}}}"#
            ))
            .await;
        member.expect_text("{}").await;
    }
}

// ---------------------------------------------------------------- notify_all

#[tokio::test]
async fn notify_all_reaches_registered_clients_only() {
    let server = Server::start().await;
    let mut backend = server.backend("backend").await;
    let mut acked = server.acked_client("acked", &mut backend, Some("g")).await;
    let mut registered = server.client("registered").await;
    register(&mut registered, &mut backend).await;
    let mut bystander = server.client("bystander").await;
    let mut other_admin = server.admin("other admin").await;

    let payload = r#"{"b":[3,2,1],"a":{"d":null,"c":"é"}}"#;
    backend
        .send_text(&format!(r#"{{"type":"notify_all","data":{payload}}}"#))
        .await;
    acked.expect_text(payload).await;
    registered.expect_text(payload).await;
    expect_silence_all(&mut [&mut bystander, &mut other_admin, &mut backend]).await;
}

#[tokio::test]
async fn notify_all_falsy_payload_is_empty_object_and_others_as_is() {
    let server = Server::start().await;
    let mut backend = server.backend("backend").await;
    let mut client = server.acked_client("client", &mut backend, None).await;
    for data in [
        r#","data":null"#,
        r#","data":0"#,
        r#","data":"""#,
        r#","data":[]"#,
        r#","data":{}"#,
        r#","data":false"#,
        "",
    ] {
        backend
            .send_text(&format!(r#"{{"type":"notify_all"{data}}}"#))
            .await;
        client.expect_text("{}").await;
    }
    for payload in [r#""text""#, "7", "[0]", "true"] {
        backend
            .send_text(&format!(r#"{{"type":"notify_all","data":{payload}}}"#))
            .await;
        client.expect_text(payload).await;
    }
}

#[tokio::test]
async fn notify_all_from_non_admin_is_forbidden() {
    let server = Server::start().await;
    let mut backend = server.backend("backend").await;
    let mut acked = server.acked_client("acked", &mut backend, None).await;
    let mut other = server.acked_client("other", &mut backend, None).await;
    let mut stranger = server.client("stranger").await;
    for sender in [&mut acked, &mut stranger] {
        sender
            .send_text(r#"{"type":"notify_all","data":{"spam":1}}"#)
            .await;
        sender.expect_error("forbidden", Some("notify_all")).await;
    }
    expect_silence_all(&mut [&mut other, &mut acked]).await;
    acked.ping(1, true).await;
}

// ---------------------------------------------------------------- other

#[tokio::test]
async fn unknown_type_is_ignored_and_connection_stays_open() {
    let server = Server::start().await;
    let mut backend = server.backend("backend").await;
    let mut client = server.acked_client("client", &mut backend, None).await;
    for kind in ["bogus", "", "NOTIFY_ALL", "subscribe_all", "callback"] {
        client
            .send_event(kind, json!({"target": client.id(), "data": {"x": 1}}))
            .await;
    }
    backend.send_text(r#"{"type":"whatever"}"#).await;
    expect_silence_all(&mut [&mut client, &mut backend]).await;
    client.ping(1, true).await;
    backend.ping(2, false).await;
}

#[tokio::test]
async fn key_order_is_preserved_end_to_end() {
    let server = Server::start().await;
    let mut backend = server.backend("backend").await;
    let mut client = server.client("client").await;
    client
        .send_text(r#"{"data": {"zeta": 1, "alpha": {"z": [], "a": {}}, "mid": "m"}, "type": "client_connect"}"#)
        .await;
    let forward = backend.recv_text().await;
    let id = serde_json::from_str::<serde_json::Value>(&forward).unwrap()["data"]["target"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        forward,
        format!(
            r#"{{"type":"client_connect","data":{{"zeta":1,"alpha":{{"z":[],"a":{{}}}},"mid":"m","target":"{id}"}}}}"#
        )
    );
    backend
        .send_text(&format!(
            r#"{{"data":{{"z":0,"target":"{id}","b":{{"y":1,"x":2}},"user":"u","a":null}},"type":"client_connected"}}"#
        ))
        .await;
    client
        .expect_text(&format!(
            r#"{{"type":"client_connected","data":{{"z":0,"target":"{id}","b":{{"y":1,"x":2}},"a":null}}}}"#
        ))
        .await;
    let payload = r#"{"9":9,"1":1,"b":{"3":[{"c":1,"b":2,"a":3}],"2":"two"},"a":-0.0}"#;
    for kind in ["notify_client", "notify_group"] {
        backend
            .send_text(&format!(
                r#"{{"type":"{kind}","data":{{"target":"{id}","data":{payload},"callback":{payload}}}}}"#
            ))
            .await;
        client.expect_text(payload).await;
        backend
            .expect_text(&format!(r#"{{"type":"callback","data":{payload}}}"#))
            .await;
    }
    backend
        .send_text(&format!(r#"{{"type":"notify_all","data":{payload}}}"#))
        .await;
    client.expect_text(payload).await;
}

// ---------------------------------------------------------------- --client-send

#[tokio::test]
async fn client_send_own_allows_only_itself_and_its_group() {
    let server = Server::with_args(&["--client-send", "own"]).await;
    let mut backend = server.backend("backend").await;
    let mut me = server.acked_client("me", &mut backend, Some("mine")).await;
    let mut mate = server
        .acked_client("mate", &mut backend, Some("mine"))
        .await;
    let mut other = server
        .acked_client("other", &mut backend, Some("theirs"))
        .await;
    let me_id = me.id().to_string();
    let mate_id = mate.id().to_string();
    let other_id = other.id().to_string();

    // Refused: another connection, another group (by name, by id), public.
    for (kind, target) in [
        ("notify_client", other_id.as_str()),
        ("notify_client", mate_id.as_str()),
        ("notify_group", "theirs"),
        ("notify_group", other_id.as_str()),
        ("notify_group", "public"),
    ] {
        me.send_event(
            kind,
            json!({"target": target, "data": {"x": 1}, "callback": "cb"}),
        )
        .await;
        me.expect_error("policy_denied", Some(kind)).await;
    }
    me.send_text(r#"{"type":"notify_group","data":{"data":{"x":1}}}"#)
        .await;
    me.expect_error("policy_denied", Some("notify_group")).await;
    expect_silence_all(&mut [&mut other, &mut mate]).await;

    // Allowed: itself (default and explicit target), its own group by name and by a
    // member's id.
    me.send_text(r#"{"type":"notify_client","data":{"data":{"n":1},"callback":"c"}}"#)
        .await;
    me.expect_text(r#"{"n":1}"#).await;
    me.expect_text(r#"{"type":"callback","data":"c"}"#).await;
    me.send_event("notify_client", json!({"target": me_id, "data": {"n": 2}}))
        .await;
    me.expect_text(r#"{"n":2}"#).await;
    for target in ["mine", mate_id.as_str(), me_id.as_str()] {
        me.send_event(
            "notify_group",
            json!({"target": target, "data": {"g": target}}),
        )
        .await;
        let expected = format!(r#"{{"g":"{target}"}}"#);
        me.expect_text(&expected).await;
        mate.expect_text(&expected).await;
    }
    other.expect_silence().await;

    // Admins are not limited.
    backend
        .send_event(
            "notify_client",
            json!({"target": other_id, "data": {"adm": 1}}),
        )
        .await;
    other.expect_text(r#"{"adm":1}"#).await;
}

#[tokio::test]
async fn client_send_none_allows_only_admins() {
    let server = Server::with_args(&["--client-send", "none"]).await;
    let mut backend = server.backend("backend").await;
    let mut me = server.acked_client("me", &mut backend, Some("mine")).await;
    let mut other = server
        .acked_client("other", &mut backend, Some("mine"))
        .await;
    let me_id = me.id().to_string();
    let other_id = other.id().to_string();
    for (kind, target) in [
        ("notify_client", None),
        ("notify_client", Some(me_id.as_str())),
        ("notify_client", Some(other_id.as_str())),
        ("notify_group", None),
        ("notify_group", Some("mine")),
        ("notify_group", Some(me_id.as_str())),
    ] {
        let mut data = json!({"data": {"x": 1}, "callback": "cb"});
        if let Some(target) = target {
            data["target"] = json!(target);
        }
        me.send_event(kind, data).await;
        me.expect_error("policy_denied", Some(kind)).await;
    }
    expect_silence_all(&mut [&mut me, &mut other]).await;

    backend
        .send_event(
            "notify_group",
            json!({"target": "mine", "data": {"adm": 1}, "callback": "ok"}),
        )
        .await;
    me.expect_text(r#"{"adm":1}"#).await;
    other.expect_text(r#"{"adm":1}"#).await;
    backend
        .expect_text(r#"{"type":"callback","data":"ok"}"#)
        .await;
}

// ---------------------------------------------------------------- shutdown

#[tokio::test]
async fn graceful_shutdown_closes_every_connection_with_1001() {
    let mut server = Server::start().await;
    let mut backend = server.backend("backend").await;
    let acked = server.acked_client("acked", &mut backend, Some("g")).await;
    let mut registered = server.client("registered").await;
    register(&mut registered, &mut backend).await;
    let bystander = server.client("bystander").await;
    let admin = server.admin("admin").await;
    let mut conns = vec![backend, acked, registered, bystander, admin];

    let addr = server.addr;
    server.signal_shutdown();
    for conn in &mut conns {
        let reason = conn.expect_close_code(1001).await;
        assert_eq!(reason, Close::SHUTDOWN.reason, "{}", conn.name);
    }
    let result = server.shutdown().await;
    assert!(result.is_ok(), "run returned {result:?}");
    // It stopped accepting.
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "the listener is still open after shutdown"
    );
}
