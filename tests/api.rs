//! SPEC §8, the HTTP publish API: `POST /api/notify_client|notify_group|notify_all|publish`
//! with the event's `data` as the body, authorised by the admin password. Requests are written
//! by hand over TCP (HTTP/1.1, `Connection: close`).

mod common;

use common::{Conn, HttpResponse, PASSWORD, Server, api_post, expect_silence_all, http, register};
use serde_json::{Value, json};

const ROUTES: [&str; 4] = ["notify_client", "notify_group", "notify_all", "publish"];

/// A body that is valid for `route` (and delivers nothing in these tests' setups).
fn valid_body(route: &str) -> &'static str {
    match route {
        "notify_client" => r#"{"target":"00000000-0000-4000-8000-000000000000","data":{"a":1}}"#,
        "notify_group" => r#"{"target":"nobody","data":{"a":1}}"#,
        "notify_all" => r#"{"a":1}"#,
        _ => r#"{"name":"nobody.here","data":{"a":1}}"#,
    }
}

/// Asserts `200` with exactly `{"delivered":<n>}` as JSON.
fn assert_delivered(response: &HttpResponse, n: usize) {
    assert_eq!(
        response.status,
        200,
        "expected 200, got {}: {}",
        response.status,
        response.text()
    );
    assert_eq!(response.text(), format!(r#"{{"delivered":{n}}}"#));
    assert!(
        response
            .header("content-type")
            .is_some_and(|t| t.starts_with("application/json")),
        "content type {:?}",
        response.header("content-type")
    );
}

/// Asserts `status` with body `{"error":{"code":<code>,"message":<text>,"event":<event>}}`,
/// keys in that order and no others; returns the inner error.
fn assert_api_error(response: &HttpResponse, status: u16, code: &str, event: &str) -> Value {
    assert_eq!(
        response.status,
        status,
        "expected {status}, got {}: {}",
        response.status,
        response.text()
    );
    assert!(
        response
            .header("content-type")
            .is_some_and(|t| t.starts_with("application/json")),
        "content type {:?}",
        response.header("content-type")
    );
    let body = response.json();
    let top: Vec<&str> = body
        .as_object()
        .expect("error body is an object")
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(top, ["error"], "{body}");
    let error = &body["error"];
    let keys: Vec<&str> = error
        .as_object()
        .expect("error is an object")
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(keys, ["code", "message", "event"], "{body}");
    assert_eq!(error["code"], code, "{body}");
    assert_eq!(error["event"], event, "{body}");
    assert!(
        error["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    error.clone()
}

async fn post_with(
    server: &Server,
    route: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> HttpResponse {
    http(
        server.addr,
        "POST",
        &format!("/api/{route}"),
        headers,
        body.as_bytes(),
    )
    .await
}

/// A client that sent `client_connect` (forwarded to `backend`), not acknowledged.
async fn registered(server: &Server, backend: &mut Conn, name: &str) -> Conn {
    let mut client = server.client(name).await;
    register(&mut client, backend).await;
    client
}

// ---------------------------------------------------------------- authorisation

#[tokio::test]
async fn every_route_refuses_a_missing_or_wrong_password_with_401() {
    let server = Server::start().await;
    let mut backend = server.backend("backend").await;
    let mut client = registered(&server, &mut backend, "client").await;
    let id = client.id().to_string();
    let mut sub = registered(&server, &mut backend, "sub").await;
    sub.send_event("subscribe", json!({"name": "c"})).await;
    sub.expect_text(r#"{"type":"subscribed","data":{"name":"c"}}"#)
        .await;

    // Bodies that would deliver to `client` / `sub` if authorised.
    let bodies = [
        ("notify_client", format!(r#"{{"target":"{id}","data":1}}"#)),
        ("notify_group", r#"{"data":1}"#.to_string()),
        ("notify_all", "1".to_string()),
        ("publish", r#"{"name":"c","data":1}"#.to_string()),
    ];
    for (route, body) in &bodies {
        for headers in [
            &[][..],
            &[("Authorization", "Bearer wrong-password")][..],
            &[("auth", "wrong-password")][..],
            &[("Authorization", "Bearer ")][..],
            &[("Authorization", "Basic MTIzNDU2Nzg=")][..],
            // The password alone, without a scheme, is not a bearer token.
            &[("Authorization", PASSWORD)][..],
        ] {
            let response = post_with(&server, route, headers, body).await;
            let error = assert_api_error(&response, 401, "unauthorized", route);
            assert!(
                !error["message"].as_str().unwrap_or("").contains(PASSWORD),
                "{error}"
            );
        }
    }
    expect_silence_all(&mut [&mut client, &mut sub, &mut backend]).await;
}

#[tokio::test]
async fn every_route_accepts_bearer_and_auth_header() {
    let server = Server::start().await;
    let mut backend = server.backend("backend").await;
    let mut client = registered(&server, &mut backend, "client").await;
    let id = client.id().to_string();
    let mut sub = registered(&server, &mut backend, "sub").await;
    sub.send_event("subscribe", json!({"name": "c"})).await;
    sub.expect_text(r#"{"type":"subscribed","data":{"name":"c"}}"#)
        .await;
    let bearer = format!("Bearer {PASSWORD}");
    let lower_bearer = format!("bearer {PASSWORD}");
    for headers in [
        vec![("Authorization", bearer.as_str())],
        vec![("auth", PASSWORD)],
        vec![("AUTH", PASSWORD)],
        vec![("authorization", lower_bearer.as_str())],
    ] {
        let r = post_with(
            &server,
            "notify_client",
            &headers,
            &format!(r#"{{"target":"{id}","data":{{"via":"notify_client"}}}}"#),
        )
        .await;
        assert_delivered(&r, 1);
        client.expect_text(r#"{"via":"notify_client"}"#).await;
        let r = post_with(
            &server,
            "notify_group",
            &headers,
            r#"{"target":"nobody","data":1}"#,
        )
        .await;
        assert_delivered(&r, 0);
        let r = post_with(&server, "notify_all", &headers, r#"{"via":"notify_all"}"#).await;
        assert_delivered(&r, 2);
        client.expect_text(r#"{"via":"notify_all"}"#).await;
        sub.expect_text(r#"{"via":"notify_all"}"#).await;
        let r = post_with(&server, "publish", &headers, r#"{"name":"c","data":"p"}"#).await;
        assert_delivered(&r, 1);
        sub.expect_text(r#"{"type":"publish","data":{"name":"c","data":"p"}}"#)
            .await;
    }
    expect_silence_all(&mut [&mut client, &mut sub, &mut backend]).await;
}

// ---------------------------------------------------------------- each route delivers

#[tokio::test]
async fn notify_all_delivers_to_every_registered_client_like_the_event() {
    let server = Server::start().await;
    let mut backend = server.backend("backend").await;
    let mut admin = server.admin("admin").await;

    // No client yet.
    assert_delivered(&api_post(server.addr, "notify_all", r#"{"n":0}"#).await, 0);

    let mut one = registered(&server, &mut backend, "one").await;
    assert_delivered(&api_post(server.addr, "notify_all", r#"{"n":1}"#).await, 1);
    one.expect_text(r#"{"n":1}"#).await;

    let mut two = server.acked_client("two", &mut backend, Some("g")).await;
    let mut three = registered(&server, &mut backend, "three").await;
    let mut not_registered = server.client("not registered").await;
    let body = r#"{"z": 1, "a": [true, null, 2.50], "s": "x  y", "o": {"b": {}, "a": []}}"#;
    let relayed = r#"{"z":1,"a":[true,null,2.50],"s":"x  y","o":{"b":{},"a":[]}}"#;
    assert_delivered(&api_post(server.addr, "notify_all", body).await, 3);
    for c in [&mut one, &mut two, &mut three] {
        c.expect_text(relayed).await;
    }
    // The same data sent as the WebSocket event arrives identically.
    admin
        .send_text(&format!(r#"{{"type":"notify_all","data":{body}}}"#))
        .await;
    for c in [&mut one, &mut two, &mut three] {
        c.expect_text(relayed).await;
    }
    // Falsy bodies are `{}`, as for the event; any other JSON value is relayed.
    for (body, relayed) in [
        ("null", "{}"),
        ("0", "{}"),
        ("[]", "{}"),
        ("[1,2]", "[1,2]"),
    ] {
        assert_delivered(&api_post(server.addr, "notify_all", body).await, 3);
        for c in [&mut one, &mut two, &mut three] {
            c.expect_text(relayed).await;
        }
    }
    expect_silence_all(&mut [
        &mut one,
        &mut two,
        &mut three,
        &mut not_registered,
        &mut admin,
        &mut backend,
    ])
    .await;
}

#[tokio::test]
async fn notify_client_delivers_to_its_target_like_the_event() {
    let server = Server::start().await;
    let mut backend = server.backend("backend").await;
    let mut admin = server.admin("admin").await;
    let mut target = registered(&server, &mut backend, "target").await;
    let mut other = registered(&server, &mut backend, "other").await;
    let id = target.id().to_string();

    let body = format!(
        r#"{{"target": "{id}", "data": {{"k": "v", "a": [1, {{"y": 2, "x": 1}}]}}, "callback": {{"cb": 1}}}}"#
    );
    let relayed = r#"{"k":"v","a":[1,{"y":2,"x":1}]}"#;
    assert_delivered(&api_post(server.addr, "notify_client", &body).await, 1);
    target.expect_text(relayed).await;
    // The WebSocket event with the same data delivers the same frame (and acks its
    // callback to the sending admin; the API has no socket to ack to).
    admin
        .send_text(&format!(r#"{{"type":"notify_client","data":{body}}}"#))
        .await;
    target.expect_text(relayed).await;
    admin
        .expect_text(r#"{"type":"callback","data":{"cb":1}}"#)
        .await;

    // Falsy data is `{}`.
    let r = api_post(
        server.addr,
        "notify_client",
        &format!(r#"{{"target":"{id}"}}"#),
    )
    .await;
    assert_delivered(&r, 1);
    target.expect_text("{}").await;

    // Unknown, uppercase and non-client targets deliver nothing, with 200.
    let unknown = "00000000-0000-4000-8000-000000000000";
    let upper = id.to_ascii_uppercase();
    let admin_like = "not-a-connection";
    for t in [unknown, upper.as_str(), admin_like] {
        let r = api_post(
            server.addr,
            "notify_client",
            &format!(r#"{{"target":"{t}","data":1}}"#),
        )
        .await;
        assert_delivered(&r, 0);
    }
    expect_silence_all(&mut [&mut target, &mut other, &mut admin, &mut backend]).await;
}

#[tokio::test]
async fn notify_group_delivers_to_the_group_like_the_event() {
    let server = Server::start().await;
    let mut backend = server.backend("backend").await;
    let mut admin = server.admin("admin").await;
    let mut t1 = server.acked_client("t1", &mut backend, Some("team")).await;
    let mut t2 = server.acked_client("t2", &mut backend, Some("team")).await;
    let mut p1 = server.acked_client("p1", &mut backend, None).await;
    let mut unacked = registered(&server, &mut backend, "unacknowledged").await;
    let t1_id = t1.id().to_string();

    let body = r#"{"target":"team","data":{"b":2,"a":1},"callback":{"ok":true}}"#;
    assert_delivered(&api_post(server.addr, "notify_group", body).await, 2);
    t1.expect_text(r#"{"b":2,"a":1}"#).await;
    t2.expect_text(r#"{"b":2,"a":1}"#).await;
    admin
        .send_text(&format!(r#"{{"type":"notify_group","data":{body}}}"#))
        .await;
    t1.expect_text(r#"{"b":2,"a":1}"#).await;
    t2.expect_text(r#"{"b":2,"a":1}"#).await;
    admin
        .expect_text(r#"{"type":"callback","data":{"ok":true}}"#)
        .await;

    // A member's connection id means its group.
    let r = api_post(
        server.addr,
        "notify_group",
        &format!(r#"{{"target":"{t1_id}","data":"by id"}}"#),
    )
    .await;
    assert_delivered(&r, 2);
    t1.expect_text(r#""by id""#).await;
    t2.expect_text(r#""by id""#).await;

    // No target: `public`.
    assert_delivered(
        &api_post(server.addr, "notify_group", r#"{"data":[1]}"#).await,
        1,
    );
    p1.expect_text("[1]").await;
    // Unknown group: nobody.
    assert_delivered(
        &api_post(
            server.addr,
            "notify_group",
            r#"{"target":"nobody","data":1}"#,
        )
        .await,
        0,
    );
    expect_silence_all(&mut [
        &mut t1,
        &mut t2,
        &mut p1,
        &mut unacked,
        &mut admin,
        &mut backend,
    ])
    .await;
}

#[tokio::test]
async fn publish_delivers_to_admitted_subscribers_like_the_event() {
    let server = Server::start().await;
    let mut backend = server.backend("backend").await;
    let mut admin = server.admin("admin").await;
    let mut editor = server.client("editor").await;
    let editor_id = register(&mut editor, &mut backend).await;
    backend
        .send_text(&format!(
            r#"{{"type":"client_connected","data":{{"target":"{editor_id}","user":"ed","roles":["editor"]}}}}"#
        ))
        .await;
    editor
        .expect_text(&format!(
            r#"{{"type":"client_connected","data":{{"target":"{editor_id}","roles":["editor"]}}}}"#
        ))
        .await;
    let mut plain = registered(&server, &mut backend, "plain").await;
    let mut outsider = registered(&server, &mut backend, "outsider").await;
    for c in [&mut editor, &mut plain] {
        c.send_event("subscribe", json!({"name": "foo.bar"})).await;
        c.expect_text(r#"{"type":"subscribed","data":{"name":"foo.bar"}}"#)
            .await;
    }

    let body = r#"{"name": "foo.bar", "data": {"z": [1, 2], "a": "s"}}"#;
    let frame = r#"{"type":"publish","data":{"name":"foo.bar","data":{"z":[1,2],"a":"s"}}}"#;
    assert_delivered(&api_post(server.addr, "publish", body).await, 2);
    editor.expect_text(frame).await;
    plain.expect_text(frame).await;
    admin
        .send_text(&format!(r#"{{"type":"publish","data":{body}}}"#))
        .await;
    editor.expect_text(frame).await;
    plain.expect_text(frame).await;

    let r = api_post(
        server.addr,
        "publish",
        r#"{"name":"foo.bar","data":1,"roles":["editor"]}"#,
    )
    .await;
    assert_delivered(&r, 1);
    editor
        .expect_text(r#"{"type":"publish","data":{"name":"foo.bar","data":1}}"#)
        .await;
    for body in [
        r#"{"name":"foo.bar","data":2,"roles":["nobody"]}"#,
        r#"{"name":"foo.bar","data":2,"users":["plain"]}"#,
        r#"{"name":"nobody.here","data":2}"#,
    ] {
        assert_delivered(&api_post(server.addr, "publish", body).await, 0);
    }
    let r = api_post(
        server.addr,
        "publish",
        r#"{"name":"foo.bar","data":3,"users":["ed"]}"#,
    )
    .await;
    assert_delivered(&r, 1);
    editor
        .expect_text(r#"{"type":"publish","data":{"name":"foo.bar","data":3}}"#)
        .await;
    expect_silence_all(&mut [
        &mut editor,
        &mut plain,
        &mut outsider,
        &mut admin,
        &mut backend,
    ])
    .await;
}

// ---------------------------------------------------------------- bad requests

#[tokio::test]
async fn bad_bodies_get_400_with_a_json_error() {
    let server = Server::start().await;
    let mut backend = server.backend("backend").await;
    let mut client = registered(&server, &mut backend, "client").await;
    let mut sub = registered(&server, &mut backend, "sub").await;
    sub.send_event("subscribe", json!({"name": "c"})).await;
    sub.expect_text(r#"{"type":"subscribed","data":{"name":"c"}}"#)
        .await;

    for route in ROUTES {
        for body in ["not json", "", "{\"a\":", "{\"a\":1} trailing", "'single'"] {
            let r = api_post(server.addr, route, body).await;
            assert_api_error(&r, 400, "invalid_json", route);
        }
        // Invalid UTF-8.
        let r = http(
            server.addr,
            "POST",
            &format!("/api/{route}"),
            &[("auth", PASSWORD)],
            b"\"\xff\xfe\"",
        )
        .await;
        assert_api_error(&r, 400, "invalid_json", route);
    }
    let cases: &[(&str, &str, &str)] = &[
        // notify_client needs an object with a target.
        ("notify_client", "[1]", "invalid_data"),
        ("notify_client", r#""text""#, "invalid_data"),
        ("notify_client", "5", "invalid_data"),
        ("notify_client", "true", "invalid_data"),
        ("notify_client", "{}", "missing_field"),
        ("notify_client", "null", "missing_field"),
        ("notify_client", r#"{"data":{"a":1}}"#, "missing_field"),
        (
            "notify_client",
            r#"{"target":"","data":1}"#,
            "missing_field",
        ),
        (
            "notify_client",
            r#"{"target":null,"data":1}"#,
            "missing_field",
        ),
        ("notify_client", r#"{"target":5,"data":1}"#, "invalid_field"),
        ("notify_group", "[1]", "invalid_data"),
        (
            "notify_group",
            r#"{"target":["g"],"data":1}"#,
            "invalid_field",
        ),
        ("publish", "[1]", "invalid_data"),
        ("publish", r#"{"data":1}"#, "missing_field"),
        ("publish", r#"{"name":"a b","data":1}"#, "invalid_channel"),
        ("publish", r#"{"name":7,"data":1}"#, "invalid_field"),
        ("publish", r#"{"name":"c","roles":"r"}"#, "invalid_field"),
        ("publish", r#"{"name":"c","users":[1]}"#, "invalid_field"),
        (
            "publish",
            r#"{"name":"c","data":1,"roles":["r"],"groups":["g"]}"#,
            "conflicting_filters",
        ),
        (
            "publish",
            r#"{"name":"c","data":1,"groups":[],"users":[]}"#,
            "conflicting_filters",
        ),
        // A null filter fails closed (issue 10): it once meant "every subscriber".
        (
            "publish",
            r#"{"name":"c","data":1,"roles":null}"#,
            "invalid_field",
        ),
        (
            "publish",
            r#"{"name":"c","data":1,"groups":null}"#,
            "invalid_field",
        ),
        (
            "publish",
            r#"{"name":"c","data":1,"users":null}"#,
            "invalid_field",
        ),
    ];
    for (route, body, code) in cases {
        let r = api_post(server.addr, route, body).await;
        assert_api_error(&r, 400, code, route);
    }
    // None of that delivered anything, and the server still serves the API.
    expect_silence_all(&mut [&mut client, &mut sub, &mut backend]).await;
    assert_delivered(&api_post(server.addr, "notify_all", "1").await, 2);
    client.expect_text("1").await;
    sub.expect_text("1").await;
}

#[tokio::test]
async fn body_over_max_message_size_is_413() {
    let server = Server::with_args(&["--max-message-size", "1024"]).await;
    let mut backend = server.backend("backend").await;
    let mut client = registered(&server, &mut backend, "client").await;

    // The limit itself is allowed.
    let at_limit = format!("\"{}\"", "a".repeat(1022));
    assert_eq!(at_limit.len(), 1024);
    assert_delivered(&api_post(server.addr, "notify_all", &at_limit).await, 1);
    client.expect_text(&at_limit).await;

    // One byte more is not, on every route; nothing is delivered.
    let over = format!("\"{}\"", "a".repeat(1023));
    for route in ROUTES {
        let r = api_post(server.addr, route, &over).await;
        assert_eq!(r.status, 413, "{route}: {}", r.text());
        let r = api_post(server.addr, route, &"x".repeat(200_000)).await;
        assert_eq!(r.status, 413, "{route}: {}", r.text());
    }
    let publish_over = format!(r#"{{"name":"c","data":"{}"}}"#, "a".repeat(1024));
    assert_eq!(
        api_post(server.addr, "publish", &publish_over).await.status,
        413
    );
    client.expect_silence().await;

    // Still serving after refusing.
    assert_delivered(&api_post(server.addr, "notify_all", "2").await, 1);
    client.expect_text("2").await;
}

#[tokio::test]
async fn unknown_routes_and_wrong_methods_are_refused() {
    let server = Server::start().await;
    let mut backend = server.backend("backend").await;
    let mut client = registered(&server, &mut backend, "client").await;
    let bearer = format!("Bearer {PASSWORD}");

    for path in [
        "/api/foo",
        "/api/notify",
        "/api/NOTIFY_ALL",
        "/api/notify_all_x",
    ] {
        let r = http(
            server.addr,
            "POST",
            path,
            &[("Authorization", &bearer)],
            b"1",
        )
        .await;
        assert_eq!(r.status, 404, "POST {path}: {}", r.text());
        let r = http(server.addr, "POST", path, &[], b"1").await;
        assert_eq!(r.status, 404, "POST {path} without auth: {}", r.text());
    }
    for route in ROUTES {
        for method in ["GET", "PUT", "DELETE"] {
            let r = http(
                server.addr,
                method,
                &format!("/api/{route}"),
                &[("Authorization", &bearer)],
                b"",
            )
            .await;
            assert!(
                (400..500).contains(&r.status),
                "{method} /api/{route}: {} {}",
                r.status,
                r.text()
            );
        }
    }
    client.expect_silence().await;
    // The valid route still works.
    assert_delivered(&api_post(server.addr, "notify_all", "1").await, 1);
    client.expect_text("1").await;
    for route in ROUTES {
        assert_eq!(
            api_post(server.addr, route, valid_body(route)).await.status,
            200
        );
    }
}

/// Issue 10 item 9: a body that never arrives is answered 408 after `--handshake-timeout`
/// (here 1 s), and the connection is closed, instead of holding it open.
#[tokio::test]
async fn body_that_never_arrives_is_408() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let server = Server::with_args(&["--handshake-timeout", "1"]).await;
    let mut backend = server.backend("backend").await;
    let mut client = server.client("client").await;
    register(&mut client, &mut backend).await;
    for sent in ["", "{\"a\":"] {
        let mut stream = tokio::net::TcpStream::connect(server.addr)
            .await
            .expect("connect");
        let head = format!(
            "POST /api/notify_all HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {PASSWORD}\r\n\
             Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{sent}"
        );
        stream.write_all(head.as_bytes()).await.expect("send");
        let mut raw = Vec::new();
        tokio::time::timeout(
            std::time::Duration::from_secs(10),
            stream.read_to_end(&mut raw),
        )
        .await
        .unwrap_or_else(|_| panic!("body {sent:?}: neither an answer nor a close"))
        .expect("read the answer");
        let answer = String::from_utf8_lossy(&raw);
        assert!(
            answer.starts_with("HTTP/1.1 408"),
            "body {sent:?}: {answer:?}"
        );
    }
    client.expect_silence().await;
}
