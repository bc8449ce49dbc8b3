//! Steps of the relay's protocol that many tests take (register, acknowledge) and the shapes
//! every answer must have.

use serde_json::{Value, json};

use super::Conn;

/// Checks `{"type":"error","data":{"code":<string>,"message":<non-empty string>,
/// "event":<string or null>}}`, keys in that order and no others.
pub fn assert_error_shape(value: &Value, name: &str) {
    let top: Vec<&str> = value
        .as_object()
        .unwrap_or_else(|| panic!("{name}: error frame is not an object: {value}"))
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(top, ["type", "data"], "{name}: error frame keys: {value}");
    assert_eq!(value["type"], "error", "{name}: expected an error: {value}");
    let data = value["data"]
        .as_object()
        .unwrap_or_else(|| panic!("{name}: error data is not an object: {value}"));
    let keys: Vec<&str> = data.keys().map(String::as_str).collect();
    assert_eq!(
        keys,
        ["code", "message", "event"],
        "{name}: error data keys: {value}"
    );
    let code = data["code"].as_str().unwrap_or("");
    assert!(
        !code.is_empty() && code.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'),
        "{name}: error code must be snake_case: {value}"
    );
    assert!(
        data["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{name}: error message must be a non-empty string: {value}"
    );
    assert!(
        data["event"].is_null() || data["event"].is_string(),
        "{name}: error event must be a string or null: {value}"
    );
}

/// The client sends `client_connect` with `data`; the server `backend` receives the forward.
/// Returns the forwarded `data` (with `target` = the client's id) and stores the id.
pub async fn register_with(client: &mut Conn, backend: &mut Conn, data: &str) -> Value {
    client
        .send_text(&format!(r#"{{"type":"client_connect","data":{data}}}"#))
        .await;
    let forward = backend.recv().await;
    assert_eq!(
        forward["type"], "client_connect",
        "{}: expected a forwarded client_connect, got {forward}",
        backend.name
    );
    let id = forward["data"]["target"]
        .as_str()
        .unwrap_or_else(|| panic!("forwarded client_connect without target: {forward}"))
        .to_string();
    if let Some(known) = &client.id {
        assert_eq!(known, &id, "{}: id changed between connects", client.name);
    }
    client.id = Some(id);
    forward["data"].clone()
}

/// The client registers with empty data; returns its id.
pub async fn register(client: &mut Conn, backend: &mut Conn) -> String {
    register_with(client, backend, "{}").await;
    client.id().to_string()
}

/// `backend` acknowledges `client` (id `id`) into group `user` (no `user` key when `None`);
/// the client receives exactly `{"type":"client_connected","data":{"target":<id>}}`.
pub async fn acknowledge(backend: &mut Conn, client: &mut Conn, id: &str, user: Option<&str>) {
    let data = match user {
        Some(user) => json!({"target": id, "user": user}),
        None => json!({"target": id}),
    };
    backend.send_event("client_connected", data).await;
    client
        .expect_text(&format!(
            r#"{{"type":"client_connected","data":{{"target":"{id}"}}}}"#
        ))
        .await;
}

/// Is `id` a lowercase, hyphenated UUID version 4 (RFC 4122 variant)?
pub fn is_uuid_v4(id: &str) -> bool {
    let b = id.as_bytes();
    b.len() == 36
        && b.iter().enumerate().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => *c == b'-',
            _ => c.is_ascii_digit() || (b'a'..=b'f').contains(c),
        })
        && b[14] == b'4'
        && matches!(b[19], b'8' | b'9' | b'a' | b'b')
}

/// The next frame of `backend` is an `invoke` (SPEC §12, a client's call forwarded to it);
/// returns its data.
pub async fn expect_invoke(backend: &mut Conn) -> Value {
    let frame = backend.recv().await;
    assert_eq!(
        frame["type"], "invoke",
        "{}: not an invoke: {frame}",
        backend.name
    );
    frame["data"].clone()
}
