//! A SignalR JSON-protocol connection over a raw WebSocket (SPEC §10), for the cases the real
//! client (tests/signalr) cannot show: exact frames, several nodes of a cluster, floods.

use std::net::SocketAddr;

use serde_json::Value;

use super::{Conn, http};

/// The SignalR record separator.
pub const RS: char = '\u{1e}';

/// Negotiates at `addr` (with `access_token` when given) and connects with the connection
/// token; the handshake is not sent. The connection's `id` is the negotiated connection id.
pub async fn signalr_negotiated(addr: SocketAddr, token: Option<&str>, name: &str) -> Conn {
    let query = token.map_or(String::new(), |t| format!("&access_token={t}"));
    let answer = http(
        addr,
        "POST",
        &format!("/sockets/negotiate?negotiateVersion=1{query}"),
        &[],
        b"",
    )
    .await;
    assert_eq!(answer.status, 200, "{name}: negotiate: {}", answer.text());
    let body = answer.json();
    let field = |key: &str| {
        body[key]
            .as_str()
            .unwrap_or_else(|| panic!("{name}: negotiate answered no {key}: {body}"))
            .to_string()
    };
    let (id, connection_token) = (field("connectionId"), field("connectionToken"));
    let url = format!("ws://{addr}/sockets?id={connection_token}{query}");
    let mut conn = Conn::connect(&url, None, name).await;
    conn.id = Some(id);
    conn
}

/// [`signalr_negotiated`], then the JSON handshake, answered `{}`.
pub async fn signalr_client(addr: SocketAddr, token: Option<&str>, name: &str) -> Conn {
    let mut conn = signalr_negotiated(addr, token, name).await;
    signalr_handshake(&mut conn).await;
    conn
}

/// Sends the JSON handshake and expects its exact answer.
pub async fn signalr_handshake(conn: &mut Conn) {
    conn.send_text(&format!("{{\"protocol\":\"json\",\"version\":1}}{RS}"))
        .await;
    conn.expect_text(&format!("{{}}{RS}")).await;
}

/// The next frame as one SignalR message (it must end with the record separator).
pub async fn recv_message(conn: &mut Conn) -> Value {
    let text = conn.recv_text().await;
    let record = text
        .strip_suffix(RS)
        .unwrap_or_else(|| panic!("{}: no record separator in {text:?}", conn.name));
    serde_json::from_str(record).unwrap_or_else(|e| panic!("{}: {record:?}: {e}", conn.name))
}

/// The exact frame of an invocation of `target` whose one argument is `payload` (JSON text,
/// compact) as a JSON string: what every publish and notify become for SignalR.
pub fn invocation(target: &str, payload: &str) -> String {
    let argument = Value::String(payload.to_string());
    format!(r#"{{"type":1,"target":"{target}","arguments":[{argument}]}}{RS}"#)
}
