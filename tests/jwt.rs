//! SPEC §11: token (JWT) authentication of jssocket clients. Tokens are made here with the
//! `jsonwebtoken` crate and the test keys in `tests/jwt_keys/`; the server is the real one,
//! reached over real sockets. A valid token acknowledges its client at once with the user,
//! roles and groups it names (no backend involved, nothing forwarded); every kind of bad token
//! is refused, with `401` at the upgrade and `invalid_token` in `client_connect`; without a
//! key, a JWT is just a token that a backend judges, as before.

mod common;

#[path = "common/cluster.rs"]
mod nodes;

use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::{Conn, Event, Server, is_uuid_v4, upgrade_refused};
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use jssocket::config::Config;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::client::Request;
use tokio_tungstenite::tungstenite::http::HeaderValue;

const SECRET: &str = "a test secret that is long enough for HS256";
const ISSUER: &str = "https://issuer.test";
const AUDIENCE: &str = "jssocket-tests";

// ---------------------------------------------------------------- tokens

fn key_path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/jwt_keys")
        .join(name)
}

fn key_file(name: &str) -> Vec<u8> {
    let path = key_path(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("test key {}: {e}", path.display()))
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs()
}

/// `claims` with a valid `exp` (in an hour), `iss` and `aud` added unless present.
fn valid(mut claims: Value) -> Value {
    let object = claims.as_object_mut().expect("claims are an object");
    object.entry("exp").or_insert(json!(now() + 3600));
    object.entry("iss").or_insert(json!(ISSUER));
    object.entry("aud").or_insert(json!(AUDIENCE));
    claims
}

fn sign(alg: Algorithm, key: &EncodingKey, claims: &Value) -> String {
    encode(&Header::new(alg), claims, key).expect("sign a test token")
}

fn hs256(claims: Value) -> String {
    let key = EncodingKey::from_secret(SECRET.as_bytes()).expect("HMAC key");
    sign(Algorithm::HS256, &key, &valid(claims))
}

fn rs256_with(private_key: &str, claims: Value) -> String {
    let key = EncodingKey::from_rsa_pem(&key_file(private_key)).expect("RSA private key");
    sign(Algorithm::RS256, &key, &valid(claims))
}

fn rs256(claims: Value) -> String {
    rs256_with("rsa_private.pem", claims)
}

fn es256(claims: Value) -> String {
    let key = EncodingKey::from_ec_pem(&key_file("ec_private.pem")).expect("EC private key");
    sign(Algorithm::ES256, &key, &valid(claims))
}

/// Base64url without padding, as JWTs use it.
fn b64url(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..=chunk.len() {
            out.push(char::from(ALPHABET[(n >> (18 - 6 * i) & 63) as usize]));
        }
    }
    out
}

/// An unsigned token: `alg: none`, empty signature.
fn alg_none(claims: Value) -> String {
    let header = b64url(br#"{"alg":"none","typ":"JWT"}"#);
    let payload = b64url(valid(claims).to_string().as_bytes());
    format!("{header}.{payload}.")
}

/// The algorithm-confusion attack: HS256 with the server's RSA public key as the secret.
fn hs256_with_public_key(claims: Value) -> String {
    let key = EncodingKey::from_secret(&key_file("rsa_public_spki.pem")).expect("HMAC key");
    sign(Algorithm::HS256, &key, &valid(claims))
}

/// Every kind of bad token, with the words its refusal must contain. The server they are
/// shown to has [`full_args`]: the secret, the RSA public key, issuer and audience.
fn bad_tokens() -> Vec<(&'static str, String, &'static str)> {
    let alice = || json!({"sub": "alice"});
    vec![
        (
            "expired",
            hs256(json!({"sub": "alice", "exp": now() - 3600})),
            "expired",
        ),
        (
            "not yet valid",
            hs256(json!({"sub": "alice", "nbf": now() + 3600})),
            "not valid yet",
        ),
        (
            "wrong key",
            rs256_with("other_rsa_private.pem", alice()),
            "signature",
        ),
        ("alg none", alg_none(alice()), "not a well-formed JWT"),
        (
            "HS/RS confusion",
            hs256_with_public_key(alice()),
            "signature",
        ),
        ("ES256 without an EC key", es256(alice()), "not accepted"),
        (
            "wrong issuer",
            hs256(json!({"sub": "alice", "iss": "https://evil.test"})),
            "issuer",
        ),
        (
            "no issuer",
            {
                let key = EncodingKey::from_secret(SECRET.as_bytes()).expect("HMAC key");
                sign(
                    Algorithm::HS256,
                    &key,
                    &json!({"sub": "alice", "aud": AUDIENCE}),
                )
            },
            "\"iss\"",
        ),
        (
            "wrong audience",
            hs256(json!({"sub": "alice", "aud": "someone-else"})),
            "audience",
        ),
        ("no user", hs256(json!({"name": "alice"})), "\"sub\""),
        (
            "roles not strings",
            hs256(json!({"sub": "alice", "roles": [1, 2]})),
            "\"roles\"",
        ),
        (
            "garbage",
            "abc.def.ghi".to_string(),
            "not a well-formed JWT",
        ),
        (
            "oversized",
            hs256(json!({"sub": "alice", "pad": "x".repeat(9 * 1024)})),
            "longer than 8192",
        ),
    ]
}

fn full_args() -> Vec<String> {
    vec![
        "--jwt-secret".into(),
        SECRET.into(),
        "--jwt-public-key".into(),
        key_path("rsa_public_spki.pem").display().to_string(),
        "--jwt-issuer".into(),
        ISSUER.into(),
        "--jwt-audience".into(),
        AUDIENCE.into(),
    ]
}

async fn server_with(args: &[String]) -> Server {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Server::with_args(&args).await
}

// ---------------------------------------------------------------- helpers

/// Sends `client_connect` with `token` and expects the relay's own acknowledgement; returns
/// the connection id it names.
async fn connect_with_token(client: &mut Conn, token: &str) -> String {
    client
        .send_event("client_connect", json!({"token": token}))
        .await;
    expect_authenticated(client).await
}

/// The next frame is `{"type":"client_connected","data":{"target":<id>,"authenticated":true}}`
/// exactly; returns the id.
async fn expect_authenticated(client: &mut Conn) -> String {
    let text = client.recv_text().await;
    let value: Value = serde_json::from_str(&text).expect("JSON");
    let id = value["data"]["target"]
        .as_str()
        .unwrap_or_else(|| panic!("{}: expected client_connected, got {text}", client.name))
        .to_string();
    assert!(
        is_uuid_v4(&id),
        "{}: target {id} is not a UUID v4",
        client.name
    );
    assert_eq!(
        text,
        format!(r#"{{"type":"client_connected","data":{{"target":"{id}","authenticated":true}}}}"#),
        "{}: wrong acknowledgement",
        client.name
    );
    client.id = Some(id.clone());
    id
}

fn request(url: &str, query: Option<&str>, bearer: Option<&str>) -> Request {
    let url = match query {
        Some(query) => format!("{url}?{query}"),
        None => url.to_string(),
    };
    let mut request = url.into_client_request().expect("valid ws url");
    if let Some(token) = bearer {
        request.headers_mut().insert(
            "Authorization",
            HeaderValue::from_str(&format!("Bearer {token}")).expect("header value"),
        );
    }
    request
}

async fn subscribe(conn: &mut Conn, name: &str) {
    conn.send_event("subscribe", json!({ "name": name })).await;
    conn.expect_text(&format!(
        r#"{{"type":"subscribed","data":{{"name":"{name}"}}}}"#
    ))
    .await;
}

fn published(name: &str, payload: &str) -> String {
    format!(r#"{{"type":"publish","data":{{"name":"{name}","data":{payload}}}}}"#)
}

// ---------------------------------------------------------------- acknowledged by the relay

/// No server anywhere: a client with a valid JWT is acknowledged at once, is in its user's
/// group, and may notify (which only acknowledged clients may).
#[tokio::test]
async fn a_valid_jwt_is_acknowledged_without_any_server() {
    let server = Server::with_args(&["--jwt-secret", SECRET]).await;
    let mut client = server.client("alice").await;
    let id = connect_with_token(&mut client, &hs256(json!({"sub": "alice"}))).await;
    // Acknowledged: it may notify itself.
    client
        .send_event("notify_client", json!({"target": id, "data": {"n": 1}}))
        .await;
    client.expect_text(r#"{"n":1}"#).await;
    // In group "alice".
    let mut admin = server.admin("admin").await;
    admin
        .send_event("notify_group", json!({"target": "alice", "data": {"n": 2}}))
        .await;
    client.expect_text(r#"{"n":2}"#).await;
    client.expect_silence().await;
}

/// With servers connected, a valid JWT `client_connect` still never reaches them; a
/// connection whose upgrade carried the token is acknowledged by any `client_connect`, even
/// one with a token of Jaseci's kind, which is then not forwarded either.
#[tokio::test]
async fn nothing_is_forwarded_for_a_valid_token() {
    let server = Server::with_args(&["--jwt-secret", SECRET]).await;
    let mut backend = server.backend("backend").await;
    let mut client = server.client("in client_connect").await;
    connect_with_token(&mut client, &hs256(json!({"sub": "alice"}))).await;
    let token = hs256(json!({"sub": "bob"}));
    let mut by_query = Conn::connect_request(
        request(&server.url(), Some(&format!("access_token={token}")), None),
        "by access_token",
    )
    .await;
    by_query
        .send_event("client_connect", json!({"token": "tok-alice-7f3a"}))
        .await;
    expect_authenticated(&mut by_query).await;
    backend.expect_silence().await;
    // Bob's group, not Alice's.
    let mut admin = server.admin("admin").await;
    admin
        .send_event(
            "notify_group",
            json!({"target": "bob", "data": {"to": "bob"}}),
        )
        .await;
    by_query.expect_text(r#"{"to":"bob"}"#).await;
    client.expect_silence().await;
}

/// `access_token` and `Authorization: Bearer` at the upgrade (any path) both authenticate;
/// `client_connect` with no token is then acknowledged as the token's user.
#[tokio::test]
async fn an_upgrade_token_acknowledges_client_connect_at_once() {
    let server = Server::with_args(&["--jwt-secret", SECRET]).await;
    let url = format!("ws://{}/any/path", server.addr);
    let carol = hs256(json!({"sub": "carol"}));
    let dave = hs256(json!({"sub": "dave"}));
    let mut by_query = Conn::connect_request(
        request(&url, Some(&format!("v=1&access_token={carol}")), None),
        "carol",
    )
    .await;
    let mut by_header = Conn::connect_request(request(&url, None, Some(&dave)), "dave").await;
    for client in [&mut by_query, &mut by_header] {
        client.send_event("client_connect", json!({})).await;
        expect_authenticated(client).await;
    }
    let mut admin = server.admin("admin").await;
    for (user, client) in [("carol", &mut by_query), ("dave", &mut by_header)] {
        admin
            .send_event(
                "notify_group",
                json!({"target": user, "data": {"to": user}}),
            )
            .await;
        client.expect_text(&json!({"to": user}).to_string()).await;
    }
}

/// User, roles (the union of `role`, `roles` and the .NET role claim) and groups (`groups`,
/// a string or an array) from the token, as `publish` filters see them.
#[tokio::test]
async fn publish_filters_see_the_tokens_user_roles_and_groups() {
    let server = Server::with_args(&["--jwt-secret", SECRET]).await;
    let mut bob = server.client("bob").await;
    let token = hs256(json!({
        "sub": "bob",
        "role": "editor",
        "roles": ["admin", "editor"],
        "http://schemas.microsoft.com/ws/2008/06/identity/claims/role": ["root"],
        "groups": "team-a",
    }));
    connect_with_token(&mut bob, &token).await;
    let mut eve = server.client("eve").await;
    connect_with_token(
        &mut eve,
        &hs256(json!({"sub": "eve", "groups": ["team-b"]})),
    )
    .await;
    subscribe(&mut bob, "news").await;
    subscribe(&mut eve, "news").await;
    let mut admin = server.admin("admin").await;
    // (filter, does bob get it, does eve get it)
    let cases = [
        (json!({"roles": ["root"]}), true, false),
        (json!({"roles": ["editor"]}), true, false),
        (json!({"roles": ["admin"]}), true, false),
        (json!({"roles": ["nobody"]}), false, false),
        (json!({"groups": ["team-a"]}), true, false),
        (json!({"groups": ["team-b"]}), false, true),
        (json!({"users": ["bob"]}), true, false),
        (json!({"users": ["eve", "bob"]}), true, true),
        (json!({"users": ["alice"]}), false, false),
    ];
    for (i, (filter, to_bob, to_eve)) in cases.into_iter().enumerate() {
        let mut data = json!({"name": "news", "data": {"i": i}});
        let (key, value) = filter
            .as_object()
            .expect("filter")
            .iter()
            .next()
            .expect("one");
        data[key] = value.clone();
        admin.send_event("publish", data).await;
        let frame = published("news", &format!(r#"{{"i":{i}}}"#));
        for (client, expected) in [(&mut bob, to_bob), (&mut eve, to_eve)] {
            if expected {
                client.expect_text(&frame).await;
            }
        }
    }
    bob.expect_silence().await;
    eve.expect_silence().await;
}

/// `--jwt-user-claim` names the claim that holds the user (Magic's tokens: `unique_name`).
#[tokio::test]
async fn the_user_claim_is_configurable() {
    let server =
        Server::with_args(&["--jwt-secret", SECRET, "--jwt-user-claim", "unique_name"]).await;
    let mut client = server.client("magic").await;
    connect_with_token(
        &mut client,
        &hs256(json!({"sub": "42", "unique_name": "frank"})),
    )
    .await;
    let mut admin = server.admin("admin").await;
    admin
        .send_event(
            "notify_group",
            json!({"target": "frank", "data": {"to": "frank"}}),
        )
        .await;
    client.expect_text(r#"{"to":"frank"}"#).await;
    // A token without that claim is refused, saying which claim is missing.
    let mut other = server.client("no claim").await;
    other
        .send_event(
            "client_connect",
            json!({"token": hs256(json!({"sub": "x"}))}),
        )
        .await;
    let error = other
        .expect_error("invalid_token", Some("client_connect"))
        .await;
    assert!(
        error["message"]
            .as_str()
            .unwrap_or_default()
            .contains("unique_name"),
        "reason should name the claim: {error}"
    );
}

/// Public keys: RSA as SPKI or PKCS#1 (RS256), EC P-256 (ES256); a token of another family
/// than the key's is refused, the algorithm-confusion attack (HS256 keyed with the public
/// key's PEM) included.
#[tokio::test]
async fn public_keys_in_each_form_verify_their_tokens() {
    for (key, good, other) in [
        (
            "rsa_public_spki.pem",
            rs256(json!({"sub": "u"})),
            es256(json!({"sub": "u"})),
        ),
        (
            "rsa_public_spki.pem",
            rs256(json!({"sub": "u"})),
            hs256_with_public_key(json!({"sub": "u"})),
        ),
        (
            "rsa_public_pkcs1.pem",
            rs256(json!({"sub": "u"})),
            hs256(json!({"sub": "u"})),
        ),
        (
            "ec_public.pem",
            es256(json!({"sub": "u"})),
            rs256(json!({"sub": "u"})),
        ),
    ] {
        let path = key_path(key).display().to_string();
        let server = Server::with_args(&["--jwt-public-key", &path]).await;
        let mut client = server.client(key).await;
        connect_with_token(&mut client, &good).await;
        client
            .send_event("client_connect", json!({"token": other}))
            .await;
        client
            .expect_error("invalid_token", Some("client_connect"))
            .await;
    }
}

// ---------------------------------------------------------------- refused

/// Every kind of bad token gets `401` with a one-line reason at the upgrade, whether it
/// comes in `access_token` or `Authorization: Bearer`.
#[tokio::test]
async fn bad_tokens_are_refused_at_the_upgrade() {
    let server = server_with(&full_args()).await;
    // The same server accepts a good token either way (so the refusals are the tokens').
    let good = hs256(json!({"sub": "alice"}));
    Conn::connect_request(
        request(&server.url(), Some(&format!("access_token={good}")), None),
        "good",
    )
    .await;
    Conn::connect_request(
        request(&server.url(), None, Some(&rs256(json!({"sub": "a"})))),
        "good",
    )
    .await;
    for (what, token, reason) in bad_tokens() {
        for (how, request) in [
            (
                "query",
                request(&server.url(), Some(&format!("access_token={token}")), None),
            ),
            ("bearer", request(&server.url(), None, Some(&token))),
        ] {
            let (status, body) = upgrade_refused(request, what).await;
            assert_eq!(status, 401, "{what} ({how}): status, body {body:?}");
            assert!(
                body.starts_with("401 Unauthorized: invalid token: ") && body.contains(reason),
                "{what} ({how}): body {body:?} should give the reason {reason:?}"
            );
            assert_eq!(
                body.lines().count(),
                1,
                "{what} ({how}): one line, got {body:?}"
            );
        }
    }
    // A plain non-JWT token at the upgrade is not a valid one either.
    let (status, _) = upgrade_refused(
        request(&server.url(), Some("access_token=garbage"), None),
        "garbage",
    )
    .await;
    assert_eq!(status, 401);
}

/// Every kind of bad JWT in `client_connect` gets an `invalid_token` error and is not
/// forwarded; the client stays unacknowledged.
#[tokio::test]
async fn bad_tokens_are_refused_in_client_connect() {
    let server = server_with(&full_args()).await;
    let mut backend = server.backend("backend").await;
    let mut client = server.client("client").await;
    for (what, token, reason) in bad_tokens() {
        client
            .send_event("client_connect", json!({"token": token}))
            .await;
        let error = client
            .expect_error("invalid_token", Some("client_connect"))
            .await;
        let message = error["message"].as_str().unwrap_or_default();
        assert!(
            message.starts_with("invalid token: ") && message.contains(reason),
            "{what}: message {message:?} should give the reason {reason:?}"
        );
    }
    backend.expect_silence().await;
    // Still not acknowledged: it may not notify.
    client
        .send_event("notify_group", json!({"target": "alice", "data": {}}))
        .await;
    client.expect_error("forbidden", Some("notify_group")).await;
}

/// Without a JWT key, a JWT is a token like any other: forwarded to a backend unchanged, as
/// in Jaseci's flow. With a key, a token that is not a JWT is forwarded too.
#[tokio::test]
async fn tokens_go_to_a_backend_as_before_when_the_relay_does_not_judge_them() {
    let jwt = hs256(json!({"sub": "alice"}));
    for (args, token) in [
        (vec![], jwt.clone()),
        (vec!["--jwt-secret", SECRET], "tok-alice-7f3a".to_string()),
    ] {
        let server = Server::with_args(&args).await;
        let mut backend = server.backend("backend").await;
        let mut client = server.client("client").await;
        client
            .send_event("client_connect", json!({"token": token, "x": 1}))
            .await;
        let forward = backend.recv().await;
        let id = forward["data"]["target"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        assert!(is_uuid_v4(&id), "forward {forward}");
        assert_eq!(
            forward,
            json!({"type": "client_connect", "data": {"token": token, "x": 1, "target": id}}),
            "args {args:?}"
        );
        client.expect_silence().await;
    }
    // And without a key, a token at the upgrade is ignored, not refused.
    let server = Server::start().await;
    Conn::connect_request(
        request(&server.url(), Some("access_token=abc.def.ghi"), None),
        "x",
    )
    .await;
}

// ---------------------------------------------------------------- expiry

/// A connection lasts as long as its token: it is closed with 1008 "token expired" then,
/// unless a fresher token came in `client_connect` meanwhile.
#[tokio::test]
async fn the_connection_closes_when_its_token_expires() {
    let server = Server::with_args(&["--jwt-secret", SECRET]).await;
    // Valid for about two more seconds: `exp` is 28 s ago, within the 30 s leeway.
    let short = || hs256(json!({"sub": "alice", "exp": now() - 28}));
    let mut client = Conn::connect_request(
        request(
            &server.url(),
            Some(&format!("access_token={}", short())),
            None,
        ),
        "short",
    )
    .await;
    let started = std::time::Instant::now();
    let reason = client.expect_close_code(1008).await;
    assert_eq!(reason, "token expired");
    // Not at once: when the token ran out (1 to 2 s after it was made).
    assert!(
        started.elapsed() > Duration::from_millis(500),
        "closed after {:?}, before the token expired",
        started.elapsed()
    );

    let mut renewed = server.client("renewed").await;
    connect_with_token(&mut renewed, &short()).await;
    connect_with_token(&mut renewed, &hs256(json!({"sub": "alice"}))).await;
    match renewed.next_event(Duration::from_secs(4)).await {
        None => {}
        Some(Event::Close(close)) => panic!("closed despite the fresh token: {close:?}"),
        Some(other) => panic!("unexpected {other:?}"),
    }
}

// ---------------------------------------------------------------- configuration

#[test]
fn bad_jwt_options_stop_the_start() {
    let start = |args: &[&str]| {
        let mut argv = vec!["jssocket"];
        argv.extend_from_slice(args);
        Config::from_args(argv)
            .map(|_| ())
            .map_err(|e| e.to_string())
    };
    assert_eq!(
        start(&["--jwt-issuer", "x"]),
        Err("--jwt-issuer and --jwt-audience need --jwt-secret or --jwt-public-key".into())
    );
    assert_eq!(
        start(&["--jwt-secret", ""]),
        Err("--jwt-secret must not be empty".into())
    );
    let missing = start(&["--jwt-public-key", "/nonexistent/key.pem"]).unwrap_err();
    assert!(
        missing.starts_with("--jwt-public-key /nonexistent/key.pem: "),
        "{missing}"
    );
    let private = key_path("rsa_private.pem").display().to_string();
    let not_public = start(&["--jwt-public-key", &private]).unwrap_err();
    assert!(not_public.contains("not a PEM public key"), "{not_public}");
    assert_eq!(start(&["--jwt-secret", SECRET]), Ok(()));
}

// ---------------------------------------------------------------- cluster

/// In a cluster (in-process loopback), a client acknowledged by its token on one node is
/// reached from another by its user's group and by a filtered publish.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_acknowledged_client_is_reached_from_another_node() {
    let backing = nodes::Backing::start(nodes::Kind::Loopback);
    let nodes: Vec<nodes::Node> = (0..2)
        .map(|i| backing.node(&format!("n{i}"), &["--jwt-secret", SECRET]))
        .collect();
    nodes::wait_cluster(&nodes.iter().collect::<Vec<_>>()).await;
    let mut client = nodes[0].client("alice").await;
    connect_with_token(
        &mut client,
        &hs256(json!({"sub": "alice", "roles": "root"})),
    )
    .await;
    subscribe(&mut client, "orders").await;
    let mut admin = nodes[1].admin("admin").await;
    admin
        .send_event("notify_group", json!({"target": "alice", "data": {"n": 1}}))
        .await;
    client.expect_text(r#"{"n":1}"#).await;
    admin
        .send_event(
            "publish",
            json!({"name": "orders", "data": {"n": 2}, "roles": ["root"]}),
        )
        .await;
    client.expect_text(&published("orders", r#"{"n":2}"#)).await;
    admin
        .send_event(
            "publish",
            json!({"name": "orders", "data": {"n": 3}, "roles": ["x"]}),
        )
        .await;
    client.expect_silence().await;
}
