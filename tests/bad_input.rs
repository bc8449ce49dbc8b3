//! Bad input (SPEC §6): each malformed message gets its specific error while the connection
//! stays open and others keep being served; size and UTF-8 violations close with their
//! codes; a peer that keeps sending bad input is closed with 1008.

mod common;

use common::{Conn, Server, assert_error_shape, expect_silence_all, register};
use jssocket::peer::Close;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data as OpData, OpCode};

/// A server with a backend, a sender and a bystander, both acknowledged clients.
struct Setup {
    server: Server,
    backend: Conn,
    sender: Conn,
    bystander: Conn,
    pings: u64,
}

impl Setup {
    async fn new(args: &[&str]) -> Setup {
        let server = Server::with_args(args).await;
        let mut backend = server.backend("backend").await;
        let sender = server.acked_client("sender", &mut backend, None).await;
        let bystander = server.acked_client("bystander", &mut backend, None).await;
        Setup {
            server,
            backend,
            sender,
            bystander,
            pings: 0,
        }
    }

    /// Proves the sender and the bystander are both still served.
    async fn both_served(&mut self) {
        self.pings += 1;
        self.sender.ping(self.pings, true).await;
        self.bystander.ping(self.pings, true).await;
    }

    /// Proves the server still accepts and serves a new connection.
    async fn new_connection_served(&mut self) {
        let mut fresh = self
            .server
            .acked_client("fresh", &mut self.backend, None)
            .await;
        fresh.ping(1000, true).await;
    }
}

/// A message of exactly `len` bytes that makes an acknowledged client notify itself; the
/// payload it gets back is returned.
fn sized_message(len: usize) -> (String, String) {
    let head = r#"{"type":"notify_client","data":{"data":{"p":""#;
    let tail = r#""}}}"#;
    let pad = "x".repeat(len - head.len() - tail.len());
    (format!("{head}{pad}{tail}"), format!(r#"{{"p":"{pad}"}}"#))
}

#[tokio::test]
async fn envelope_errors_get_specific_codes_and_connection_stays_open() {
    let mut s = Setup::new(&[]).await;
    let cases = [
        ("not json", "invalid_json"),
        (r#"{"type":"notify_all""#, "invalid_json"),
        ("", "invalid_json"),
        (
            r#"{"type":"notify_client","data":{}} trailing"#,
            "invalid_json",
        ),
        ("[1,2]", "not_an_object"),
        (r#"[{"type":"notify_client","data":{}}]"#, "not_an_object"),
        (r#""notify_client""#, "not_an_object"),
        ("42", "not_an_object"),
        (r#"{"data":{"data":{"x":1}}}"#, "missing_type"),
        ("{}", "missing_type"),
        (r#"{"type":5,"data":{}}"#, "invalid_type"),
        (r#"{"type":["notify_client"],"data":{}}"#, "invalid_type"),
        (r#"{"type":{"name":"x"}}"#, "invalid_type"),
        (r#"{"type":true}"#, "invalid_type"),
    ];
    for (message, code) in cases {
        s.sender.send_text(message).await;
        let data = s.sender.expect_error(code, None).await;
        assert!(!data["message"].as_str().unwrap().is_empty());
        s.both_served().await;
    }
    expect_silence_all(&mut [&mut s.bystander, &mut s.backend]).await;
}

#[tokio::test]
async fn data_of_the_wrong_shape_is_invalid_data() {
    let server = Server::start().await;
    let mut backend = server.backend("backend").await;
    let mut bystander = server.acked_client("bystander", &mut backend, None).await;
    let mut ping = 0;
    for event in [
        "notify_client",
        "notify_group",
        "client_connect",
        "client_connected",
        "server_connect",
    ] {
        // A fresh admin per event keeps each under the bad-input limit.
        let mut admin = server.admin(&format!("admin sending {event}")).await;
        for data in [r#""x""#, "[1]", "5", "true", r#"[{"target":"x"}]"#] {
            admin
                .send_text(&format!(r#"{{"type":"{event}","data":{data}}}"#))
                .await;
            admin.expect_error("invalid_data", Some(event)).await;
            ping += 1;
            admin.ping(ping, false).await;
        }
        bystander.expect_silence().await;
        bystander.ping(ping, true).await;
    }
    // A client's own client_connect with bad data is refused too, and does not register it.
    let mut client = server.client("client").await;
    client
        .send_text(r#"{"type":"client_connect","data":"token"}"#)
        .await;
    client
        .expect_error("invalid_data", Some("client_connect"))
        .await;
    backend.expect_silence().await;
    register(&mut client, &mut backend).await;
}

#[tokio::test]
async fn fields_of_the_wrong_type_are_invalid_field() {
    let server = Server::start().await;
    let mut backend = server.backend("backend").await;
    let mut client = server.client("client").await;
    let id = register(&mut client, &mut backend).await;
    let mut admin = server.admin("admin").await;
    let cases = [
        ("notify_client", json!({"target": 5, "data": {"x": 1}})),
        ("notify_client", json!({"target": [id], "data": {"x": 1}})),
        (
            "notify_client",
            json!({"target": {"id": id}, "data": {"x": 1}}),
        ),
        ("notify_group", json!({"target": 5, "data": {"x": 1}})),
        ("notify_group", json!({"target": true, "data": {"x": 1}})),
        ("client_connected", json!({"target": 5})),
        ("client_connected", json!({"target": id, "user": 5})),
        ("client_connected", json!({"target": id, "user": ["u"]})),
        ("client_connected", json!({"target": id, "roles": "x"})),
        ("client_connected", json!({"target": id, "roles": [1]})),
        ("client_connected", json!({"target": id, "groups": "x"})),
        (
            "client_connected",
            json!({"target": id, "groups": {"g": 1}}),
        ),
        ("server_connect", json!({"auth": 5})),
    ];
    for (i, (event, data)) in cases.into_iter().enumerate() {
        admin.send_event(event, data.clone()).await;
        let error = admin.expect_error("invalid_field", Some(event)).await;
        // The message names the field.
        let field = data
            .as_object()
            .unwrap()
            .iter()
            .find(|(_, v)| !v.is_string() || v.as_str() != Some(id.as_str()))
            .map(|(k, _)| k.clone())
            .unwrap();
        assert!(
            error["message"].as_str().unwrap().contains(&field),
            "error for {event} {data} does not name {field}: {error}"
        );
        admin.ping(i as u64, false).await;
    }
    // Nothing reached the client: it was neither notified nor acknowledged.
    client.expect_silence().await;
    client
        .send_text(r#"{"type":"notify_client","data":{"data":{"x":1}}}"#)
        .await;
    client
        .expect_error("forbidden", Some("notify_client"))
        .await;
}

#[tokio::test]
async fn client_connected_without_target_is_missing_field() {
    let server = Server::start().await;
    let mut backend = server.backend("backend").await;
    let mut client = server.acked_client("client", &mut backend, None).await;
    for message in [
        r#"{"type":"client_connected","data":{"user":"u1"}}"#,
        r#"{"type":"client_connected","data":{"target":null,"user":"u1"}}"#,
        r#"{"type":"client_connected","data":{"target":"","user":"u1"}}"#,
        r#"{"type":"client_connected","data":{}}"#,
        r#"{"type":"client_connected"}"#,
    ] {
        backend.send_text(message).await;
        let error = backend
            .expect_error("missing_field", Some("client_connected"))
            .await;
        assert!(
            error["message"].as_str().unwrap().contains("target"),
            "{error}"
        );
        backend.ping(1, false).await;
    }
    client.expect_silence().await;
    // The client is still in public, not in u1.
    backend
        .send_text(r#"{"type":"notify_group","data":{"target":"u1","data":{"g":"u1"}}}"#)
        .await;
    client.expect_silence().await;
    client.ping(2, true).await;
}

#[tokio::test]
async fn error_frame_has_the_specified_shape() {
    let mut s = Setup::new(&[]).await;

    s.sender.send_text("nope").await;
    let text = s.sender.recv_text().await;
    assert!(
        text.starts_with(r#"{"type":"error","data":{"code":"invalid_json","message":""#)
            && text.ends_with(r#"","event":null}}"#),
        "{text}"
    );
    assert_error_shape(&serde_json::from_str(&text).unwrap(), "sender");

    s.sender
        .send_text(r#"{"type":"notify_client","data":{"target":7}}"#)
        .await;
    let text = s.sender.recv_text().await;
    assert!(
        text.starts_with(r#"{"type":"error","data":{"code":"invalid_field","message":""#)
            && text.ends_with(r#"","event":"notify_client"}}"#),
        "{text}"
    );
    assert_error_shape(&serde_json::from_str(&text).unwrap(), "sender");

    // Refusals share the shape.
    s.sender
        .send_text(r#"{"type":"notify_all","data":{"x":1}}"#)
        .await;
    let text = s.sender.recv_text().await;
    assert!(
        text.starts_with(r#"{"type":"error","data":{"code":"forbidden","message":""#)
            && text.ends_with(r#"","event":"notify_all"}}"#),
        "{text}"
    );
    s.both_served().await;
}

#[tokio::test]
async fn binary_frames_carrying_json_are_accepted_like_text() {
    let mut s = Setup::new(&[]).await;
    s.sender
        .send_binary(r#"{"type":"notify_client","data":{"data":{"bin":[1,2]},"callback":"cb"}}"#)
        .await;
    s.sender.expect_text(r#"{"bin":[1,2]}"#).await;
    s.sender
        .expect_text(r#"{"type":"callback","data":"cb"}"#)
        .await;

    // A client registering over binary is forwarded (as text) to the backend.
    let mut binary_client = s.server.client("binary client").await;
    binary_client
        .send_binary(r#"{"type":"client_connect","data":{"token":"b"}}"#)
        .await;
    let forward = s.backend.recv_text().await;
    assert!(
        forward.starts_with(r#"{"type":"client_connect","data":{"token":"b","target":""#),
        "{forward}"
    );

    // An admin's binary notify_all reaches every registered client.
    s.backend
        .send_binary(r#"{"type":"notify_all","data":{"all":"bin"}}"#)
        .await;
    for conn in [&mut s.sender, &mut s.bystander, &mut binary_client] {
        conn.expect_text(r#"{"all":"bin"}"#).await;
    }

    // Binary that is not JSON (or not UTF-8) is bad input, not a close.
    s.sender.send_binary(&b"\x00\x01binary"[..]).await;
    s.sender.expect_error("invalid_json", None).await;
    s.sender.send_binary(&b"{\"type\":\"\xff\xfe\"}"[..]).await;
    s.sender.expect_error("invalid_json", None).await;
    s.sender.send_binary(&b"[1]"[..]).await;
    s.sender.expect_error("not_an_object", None).await;
    s.both_served().await;
}

#[tokio::test]
async fn message_at_the_size_limit_is_accepted_one_byte_more_closes_1009() {
    let mut s = Setup::new(&["--max-message-size", "1000"]).await;

    let (message, payload) = sized_message(1000);
    assert_eq!(message.len(), 1000);
    s.sender.send_text(&message).await;
    s.sender.expect_text(&payload).await;
    // Binary counts the same.
    s.sender.send_binary(message.clone().into_bytes()).await;
    s.sender.expect_text(&payload).await;
    s.both_served().await;

    let (message, _) = sized_message(1001);
    assert_eq!(message.len(), 1001);
    s.sender.send_text(&message).await;
    let reason = s.sender.expect_close_code(1009).await;
    assert_eq!(reason, Close::TOO_BIG.reason);

    // Binary over the limit too.
    let mut other = s
        .server
        .acked_client("binary sender", &mut s.backend, None)
        .await;
    other.send_binary(message.into_bytes()).await;
    other.expect_close_code(1009).await;

    s.bystander.ping(99, true).await;
    s.new_connection_served().await;
}

#[tokio::test]
async fn default_size_limit_is_one_mib() {
    let mut s = Setup::new(&[]).await;
    const MIB: usize = 1024 * 1024;

    let (message, payload) = sized_message(MIB);
    s.sender.send_text(&message).await;
    s.sender.expect_text(&payload).await;
    s.both_served().await;

    let (message, _) = sized_message(MIB + 1);
    s.sender.send_text(&message).await;
    s.sender.expect_close_code(1009).await;

    s.bystander.ping(99, true).await;
    s.new_connection_served().await;
}

#[tokio::test]
async fn invalid_utf8_in_a_text_frame_closes_1007() {
    let mut s = Setup::new(&[]).await;
    let bad: &[u8] = b"{\"type\":\"notify_client\",\"data\":{\"data\":\"\xff\xfe\"}}";
    let frame = Frame::message(bad.to_vec(), OpCode::Data(OpData::Text), true);
    s.sender.send_message(Message::Frame(frame)).await;
    let reason = s.sender.expect_close_code(1007).await;
    assert_eq!(reason, Close::INVALID_UTF8.reason);

    // Also a truncated multi-byte sequence, from an admin.
    let mut admin = s.server.admin("admin").await;
    let frame = Frame::message(
        b"{\"type\":\"x\",\"data\":\"\xc3\"}".to_vec(),
        OpCode::Data(OpData::Text),
        true,
    );
    admin.send_message(Message::Frame(frame)).await;
    admin.expect_close_code(1007).await;

    s.bystander.ping(1, true).await;
    s.backend.ping(2, false).await;
    s.new_connection_served().await;
}

#[tokio::test]
async fn too_much_bad_input_closes_1008() {
    let mut s = Setup::new(&["--bad-input-limit", "3"]).await;
    for (i, message) in ["nope", "[1]", r#"{"data":{}}"#].into_iter().enumerate() {
        s.sender.send_text(message).await;
        let error = s.sender.recv().await;
        assert_eq!(error["type"], "error", "{error}");
        // Three bad messages are tolerated: the connection is still served.
        s.sender.ping(i as u64, true).await;
    }
    s.sender.send_text(r#"{"type":5}"#).await;
    // The fourth may still be answered with its error; then the connection is closed.
    let close = match s.sender.next_event(common::RECV_TIMEOUT).await {
        Some(common::Event::Text(text)) => {
            assert!(text.starts_with(r#"{"type":"error","#), "{text}");
            s.sender.expect_close().await
        }
        Some(common::Event::Close(Some(close))) => close,
        other => panic!("expected an error or a close, got {other:?}"),
    };
    assert_eq!(close.0, 1008, "{close:?}");
    assert_eq!(close.1, Close::BAD_INPUT.reason);

    s.bystander.ping(1, true).await;
    s.new_connection_served().await;
}

/// Every error a non-admin provokes costs a reply, so refusals count toward the limit like
/// malformed input (issue 10: a crowd spamming refused events must not pin memory); unknown
/// types are answered with nothing and do not count.
#[tokio::test]
async fn refusals_count_as_bad_input_unknown_types_do_not() {
    let server = Server::with_args(&["--bad-input-limit", "3"]).await;
    let mut backend = server.backend("backend").await;
    let mut client = server.client("client").await;
    register(&mut client, &mut backend).await;
    for _ in 0..10 {
        client.send_text(r#"{"type":"no_such_event"}"#).await;
    }
    client.expect_silence().await;
    for _ in 0..3 {
        client
            .send_text(r#"{"type":"notify_all","data":{"x":1}}"#)
            .await;
        client.expect_error("forbidden", Some("notify_all")).await;
    }
    // Still open and served after three refusals.
    let id = client.id().to_string();
    common::acknowledge(&mut backend, &mut client, &id, None).await;
    client.ping(1, true).await;
    // The fourth is one too many.
    client
        .send_text(r#"{"type":"notify_all","data":{"x":1}}"#)
        .await;
    client.expect_error("forbidden", Some("notify_all")).await;
    let reason = client.expect_close_code(1008).await;
    assert_eq!(reason, Close::BAD_INPUT.reason);
}

/// An admin's refusals describe the world (a client that just left), not abuse: they do not
/// count toward its limit, so a busy backend is never closed for them.
#[tokio::test]
async fn an_admins_refusals_are_not_bad_input() {
    let server = Server::with_args(&["--bad-input-limit", "3"]).await;
    let mut backend = server.backend("backend").await;
    for _ in 0..6 {
        backend
            .send_text(
                r#"{"type":"client_connected","data":{"target":"00000000-0000-4000-8000-000000000000"}}"#,
            )
            .await;
        backend
            .expect_error("unknown_target", Some("client_connected"))
            .await;
    }
    backend.ping(1, false).await;
}
