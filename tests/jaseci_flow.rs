//! The flow Jaseci runs against its socket service, exactly: a backend authenticates with the
//! `auth` header, joins with `server_connect`, and answers every forwarded `client_connect` by
//! checking the token and sending `client_connected`; a browser connection registers twice
//! (anonymous, then logged in) and notifies itself.

mod common;

use common::{Conn, Event, PASSWORD, RECV_TIMEOUT, Server, expect_silence_all, is_uuid_v4};
use serde_json::{Value, json};
use tokio::task::JoinHandle;

/// Tokens the backend accepts, and the user id each one stands for.
const VALID_TOKENS: &[(&str, &str)] = &[
    ("tok-alice-7f3a", "user-alice-1f2e"),
    ("tok-bob-91c0", "user-bob-55aa"),
];

/// What Jaseci's socket client does with a forwarded `client_connect`: drop the token, say
/// whether it was valid and which user it belongs to (`public` when not), send it back.
fn authenticate(mut data: serde_json::Map<String, Value>) -> Value {
    let token = data.shift_remove("token");
    let user = token.as_ref().and_then(Value::as_str).and_then(|token| {
        VALID_TOKENS
            .iter()
            .find(|(valid, _)| *valid == token)
            .map(|(_, user)| *user)
    });
    data.insert("authenticated".into(), json!(user.is_some()));
    data.insert("user".into(), json!(user.unwrap_or("public")));
    json!({"type": "client_connected", "data": data})
}

/// Runs the backend until its connection closes; returns how many connects it answered.
fn spawn_backend(mut backend: Conn) -> JoinHandle<usize> {
    tokio::spawn(async move {
        let mut answered = 0;
        loop {
            // Idle for as long as the test runs; the server's shutdown ends the loop.
            match backend.next_event(RECV_TIMEOUT * 4).await {
                Some(Event::Text(text)) => {
                    let message: Value = serde_json::from_str(&text).expect("backend: JSON");
                    assert_eq!(message["type"], "client_connect", "backend got {text}");
                    let Value::Object(data) = message["data"].clone() else {
                        panic!("backend: client_connect data is not an object: {text}");
                    };
                    backend.send_json(&authenticate(data)).await;
                    answered += 1;
                }
                Some(Event::Close(_)) | Some(Event::Gone(_)) => return answered,
                Some(other) => panic!("backend: unexpected {other:?}"),
                None => panic!("backend: idle too long"),
            }
        }
    })
}

/// The browser side of one round: send `client_connect` (with a token or not) and read the
/// acknowledgement. Returns the acknowledgement's `target`.
async fn connect_round(client: &mut Conn, token: Option<&str>, authenticated: bool) -> String {
    let data = match token {
        Some(token) => json!({"token": token}),
        None => json!({}),
    };
    client.send_event("client_connect", data).await;
    let text = client.recv_text().await;
    let ack: Value = serde_json::from_str(&text).expect("client_connected is JSON");
    let target = ack["data"]["target"]
        .as_str()
        .unwrap_or_else(|| panic!("client_connected without target: {text}"))
        .to_string();
    assert!(is_uuid_v4(&target), "target is not a UUID v4: {text}");
    // The backend's data, less `user` (clients never learn their group), in its order.
    assert_eq!(
        text,
        format!(
            r#"{{"type":"client_connected","data":{{"target":"{target}","authenticated":{authenticated}}}}}"#
        )
    );
    target
}

/// The browser notifies itself by id, then its own group by id; each returns the payload.
async fn notify_self(client: &mut Conn, target: &str, round: u32) {
    let payload =
        format!(r#"{{"round":{round},"msg":"to myself","nested":{{"b":[1,2],"a":null}}}}"#);
    client
        .send_text(&format!(
            r#"{{"type":"notify_client","data":{{"target":"{target}","data":{payload}}}}}"#
        ))
        .await;
    client.expect_text(&payload).await;

    let payload = format!(r#"{{"round":{round},"msg":"to my group","list":["x",{{"k":"v"}}]}}"#);
    client
        .send_text(&format!(
            r#"{{"type":"notify_group","data":{{"target":"{target}","data":{payload}}}}}"#
        ))
        .await;
    client.expect_text(&payload).await;
    client.expect_silence().await;
}

#[tokio::test]
async fn jaseci_backend_and_client_two_rounds() {
    // The original relay's default SOCKET_AUTH, as a Jaseci deployment without one has.
    let server = Server::start_default_auth().await;

    let mut backend = Conn::connect(&server.url(), Some(PASSWORD), "jaseci backend").await;
    backend
        .send_text(r#"{"type":"server_connect","data":{}}"#)
        .await;
    backend
        .expect_text(r#"{"type":"server_connect","data":true}"#)
        .await;
    let backend = spawn_backend(backend);

    // Another Jaseci worker that pushes notifications.
    let mut notifier = server.admin("jaseci notifier").await;

    let mut browser = server.client("browser").await;

    // Round 1: anonymous.
    let id = connect_round(&mut browser, None, false).await;
    notify_self(&mut browser, &id, 1).await;
    notifier
        .send_text(r#"{"type":"notify_group","data":{"target":"public","data":{"to":"public"}}}"#)
        .await;
    browser.expect_text(r#"{"to":"public"}"#).await;

    // Round 2: logged in, on the same connection.
    let id2 = connect_round(&mut browser, Some("tok-alice-7f3a"), true).await;
    assert_eq!(id2, id, "the connection keeps its id");
    notify_self(&mut browser, &id, 2).await;

    // Another browser whose token is not valid stays public.
    let mut stranger = server.client("stranger").await;
    let stranger_id = connect_round(&mut stranger, Some("tok-forged"), false).await;
    assert_ne!(stranger_id, id);

    // The user's group is its user id; public no longer includes it.
    notifier
        .send_text(
            r#"{"type":"notify_group","data":{"target":"user-alice-1f2e","data":{"to":"alice"}}}"#,
        )
        .await;
    browser.expect_text(r#"{"to":"alice"}"#).await;
    notifier
        .send_text(r#"{"type":"notify_group","data":{"target":"public","data":{"to":"public"}}}"#)
        .await;
    stranger.expect_text(r#"{"to":"public"}"#).await;
    expect_silence_all(&mut [&mut browser, &mut stranger]).await;

    // The backend answered the three connects and stops when the server shuts down.
    server.shutdown().await.expect("server stops cleanly");
    let answered = tokio::time::timeout(RECV_TIMEOUT, backend)
        .await
        .expect("backend loop ends after shutdown")
        .expect("backend loop did not panic");
    assert_eq!(answered, 3);
}
