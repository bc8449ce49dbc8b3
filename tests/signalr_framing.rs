//! SPEC §10: the SignalR handshake and the record-separated framing over a raw WebSocket, for
//! the edge cases the real client never produces (tests/signalr drives the real client).

mod common;

use std::time::{Duration, Instant};

use tokio::time::timeout;

use common::{
    Conn, RS, Server, api_post, http, recv_message, scrape, signalr_handshake, upgrade_refused,
    upgrade_request, wait_metric, wait_metrics,
};
use serde_json::Value;

async fn signalr(server: &Server, name: &str) -> Conn {
    Conn::connect(&format!("ws://{}/sockets", server.addr), None, name).await
}

/// Connects without negotiating and completes the JSON handshake.
async fn handshaken(server: &Server, name: &str) -> Conn {
    let mut conn = signalr(server, name).await;
    signalr_handshake(&mut conn).await;
    conn
}

#[tokio::test]
async fn a_handshake_without_its_record_separator_times_out() {
    let server = Server::with_args(&["--signalr-handshake-timeout", "1"]).await;
    let mut conn = signalr(&server, "no-rs").await;
    conn.send_text("{\"protocol\":\"json\",\"version\":1}")
        .await;
    let reason = conn.expect_close_code(1008).await;
    assert!(reason.contains("handshake"), "reason {reason:?}");
}

#[tokio::test]
async fn bad_handshakes_get_an_error_then_close() {
    let server = Server::start().await;
    for (request, needle) in [
        (format!("{{{RS}"), "not valid JSON"),
        (
            format!("{{\"protocol\":\"json\",\"version\":2}}{RS}"),
            "version 2",
        ),
        (
            format!("{{\"protocol\":\"messagepack\",\"version\":1}}{RS}"),
            "messagepack",
        ),
    ] {
        let mut conn = signalr(&server, "bad-handshake").await;
        conn.send_text(&request).await;
        let answer = recv_message(&mut conn).await;
        let error = answer["error"].as_str().unwrap_or_default();
        assert!(error.contains(needle), "{request:?} answered {answer}");
        conn.expect_close_code(1008).await;
    }
}

#[tokio::test]
async fn several_records_per_frame_and_records_across_frames() {
    let server = Server::start().await;
    let mut conn = signalr(&server, "batched").await;
    // The handshake and an invocation in one frame.
    conn.send_text(&format!(
        "{{\"protocol\":\"json\",\"version\":1}}{RS}{{\"type\":1,\"target\":\"a\",\"invocationId\":\"1\",\"arguments\":[]}}{RS}"
    ))
    .await;
    conn.expect_text(&format!("{{}}{RS}")).await;
    let completion = recv_message(&mut conn).await;
    assert_eq!(completion["type"], 3);
    assert_eq!(completion["invocationId"], "1");
    assert!(
        completion["error"]
            .as_str()
            .is_some_and(|e| e.contains("no_server"))
    );
    // A ping, then an invocation split over two frames.
    conn.send_text(&format!("{{\"type\":6}}{RS}{{\"type\":1,\"tar"))
        .await;
    conn.send_text(&format!(
        "get\":\"b\",\"invocationId\":\"2\",\"arguments\":[]}}{RS}"
    ))
    .await;
    let completion = recv_message(&mut conn).await;
    assert_eq!(completion["invocationId"], "2");
    // A fire-and-forget invocation (no id) gets nothing.
    conn.send_text(&format!(
        "{{\"type\":1,\"target\":\"c\",\"arguments\":[]}}{RS}"
    ))
    .await;
    conn.expect_silence().await;
}

#[tokio::test]
async fn a_message_that_is_not_json_closes_with_an_error() {
    let server = Server::start().await;
    let mut conn = handshaken(&server, "bad-json").await;
    conn.send_text(&format!("{{nope{RS}")).await;
    let close = recv_message(&mut conn).await;
    assert_eq!(close["type"], 7);
    assert!(close["error"].is_string(), "{close}");
    // Said outright: reconnecting would not help.
    assert_eq!(close["allowReconnect"], false, "{close}");
    conn.expect_close_code(1008).await;
}

#[tokio::test]
async fn an_oversized_record_closes_with_an_error() {
    let server = Server::with_args(&["--max-message-size", "1024"]).await;
    let mut conn = handshaken(&server, "oversized").await;
    // No record separator, over two frames: the unfinished record is what is too big.
    conn.send_text(&"x".repeat(600)).await;
    conn.send_text(&"x".repeat(600)).await;
    let close = recv_message(&mut conn).await;
    assert_eq!(close["type"], 7);
    assert!(
        close["error"].as_str().is_some_and(|e| e.contains("1024")),
        "{close}"
    );
    conn.expect_close_code(1008).await;
}

#[tokio::test]
async fn a_binary_frame_closes_with_an_error() {
    let server = Server::start().await;
    let mut conn = handshaken(&server, "binary").await;
    conn.send_binary(vec![1u8, 2, 3]).await;
    let close = recv_message(&mut conn).await;
    assert_eq!(close["type"], 7);
    assert!(
        close["error"].as_str().is_some_and(|e| e.contains("Text")),
        "{close}"
    );
    conn.expect_close_code(1008).await;
}

/// A connection token from negotiate opens its own connection only: not while that one is
/// open, not when changed, not on another server (another key).
#[tokio::test]
async fn a_connection_token_opens_only_its_own_connection() {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let server = Server::start().await;
    let other = Server::start().await;
    let answer = common::http(
        server.addr,
        "POST",
        "/sockets/negotiate?negotiateVersion=1",
        &[],
        b"",
    )
    .await;
    let token = answer.json()["connectionToken"]
        .as_str()
        .expect("a connection token")
        .to_string();
    let url = |addr: std::net::SocketAddr, token: &str| {
        format!("ws://{addr}/sockets?id={token}")
            .into_client_request()
            .expect("a valid URL")
    };
    let mut first = Conn::connect(
        &format!("ws://{}/sockets?id={token}", server.addr),
        None,
        "first",
    )
    .await;
    first
        .send_text(&format!("{{\"protocol\":\"json\",\"version\":1}}{RS}"))
        .await;
    first.expect_text(&format!("{{}}{RS}")).await;
    let mut forged = token.clone().into_bytes();
    forged[40] = if forged[40] == b'a' { b'b' } else { b'a' };
    let forged = String::from_utf8(forged).expect("hex");
    for (addr, token, name) in [
        (server.addr, token.as_str(), "again while open"),
        (server.addr, forged.as_str(), "forged"),
        (server.addr, "0123", "garbage"),
        (other.addr, token.as_str(), "another server"),
    ] {
        let (status, body) = common::upgrade_refused(url(addr, token), name).await;
        assert_eq!(status, 404, "{name}: {body}");
        assert!(body.contains("negotiate again"), "{name}: {body}");
    }
    // The first connection is untouched.
    first.expect_silence().await;
}

// ---------------------------------------------------------------- metrics

/// SignalR traffic has its own series (connections, hub messages by type, in and out) next
/// to the jssocket ones, which keep their names and count SignalR recipients too.
#[tokio::test]
async fn signalr_traffic_shows_in_metrics() {
    let server = Server::start().await;
    let addr = server.addr;
    let mut conn = handshaken(&server, "counted").await;
    wait_metric(addr, "jssocket_signalr_connections", &[], 1.0).await;
    conn.send_text(&format!(
        "{{\"type\":6}}{RS}{{\"type\":1,\"target\":\"nope\",\"invocationId\":\"1\",\"arguments\":[]}}{RS}"
    ))
    .await;
    assert_eq!(recv_message(&mut conn).await["type"], 3);
    let answer = api_post(addr, "notify_all", r#"{"hi":1}"#).await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    let invocation = recv_message(&mut conn).await;
    assert_eq!(invocation["target"], "notify", "{invocation}");
    let received = "jssocket_signalr_messages_received_total";
    let sent = "jssocket_signalr_messages_sent_total";
    wait_metrics(
        addr,
        &[
            (received, &[("type", "ping")], 1.0),
            (received, &[("type", "invocation")], 1.0),
            (received, &[("type", "close")], 0.0),
            (sent, &[("type", "completion")], 1.0),
            (sent, &[("type", "invocation")], 1.0),
            // No backend: the call is answered `no_server` at once (SPEC §12).
            (
                "jssocket_messages_sent_total",
                &[("type", "invoke_result")],
                1.0,
            ),
            // The existing series count the SignalR recipient under the jssocket kind.
            (
                "jssocket_messages_sent_total",
                &[("type", "notify_all")],
                1.0,
            ),
            ("jssocket_connections", &[], 1.0),
        ],
    )
    .await;
    conn.send_text(&format!("{{\"type\":7}}{RS}")).await;
    conn.expect_close_code(1000).await;
    wait_metrics(
        addr,
        &[
            ("jssocket_signalr_connections", &[], 0.0),
            (received, &[("type", "close")], 1.0),
        ],
    )
    .await;
}

/// Upgrades and negotiations refused for a bad token are counted as `invalid_token` errors:
/// an expired token or a wrong key shows on /metrics, not only in debug logs.
#[tokio::test]
async fn refused_tokens_are_counted() {
    let server = Server::with_args(&["--jwt-secret", "a secret for the signalr tests"]).await;
    let addr = server.addr;
    for path in ["/sockets", "/ws"] {
        let request = upgrade_request(&format!("ws://{addr}{path}?access_token=not.a.token"), None);
        let (status, body) = upgrade_refused(request, path).await;
        assert_eq!(status, 401, "{path}: {body}");
    }
    let negotiate = http(
        addr,
        "POST",
        "/sockets/negotiate?negotiateVersion=1",
        &[("Authorization", "Bearer not.a.token")],
        b"",
    )
    .await;
    assert_eq!(negotiate.status, 401, "{}", negotiate.text());
    wait_metric(
        addr,
        "jssocket_errors_total",
        &[("code", "invalid_token")],
        3.0,
    )
    .await;
}

// ---------------------------------------------------------------- CORS

const ORIGIN: &str = "https://app.example";

/// A browser on another origin preflights negotiate, then posts it: both answers carry what
/// the SignalR JS client needs, for an origin the upgrade would let in.
#[tokio::test]
async fn negotiate_answers_cors_for_allowed_origins() {
    let server = Server::with_args(&["--allowed-origins", ORIGIN]).await;
    let addr = server.addr;
    let preflight = http(
        addr,
        "OPTIONS",
        "/sockets/negotiate?negotiateVersion=1",
        &[
            ("Origin", ORIGIN),
            ("Access-Control-Request-Method", "POST"),
            (
                "Access-Control-Request-Headers",
                "x-requested-with,x-signalr-user-agent",
            ),
        ],
        b"",
    )
    .await;
    assert!(
        (200..300).contains(&preflight.status),
        "preflight: {}",
        preflight.status
    );
    assert_eq!(
        preflight.header("access-control-allow-origin"),
        Some(ORIGIN)
    );
    assert_eq!(
        preflight.header("access-control-allow-credentials"),
        Some("true")
    );
    assert_eq!(
        preflight.header("access-control-allow-methods"),
        Some("POST")
    );
    let allowed_headers = preflight
        .header("access-control-allow-headers")
        .unwrap_or_default()
        .to_ascii_lowercase();
    for wanted in [
        "authorization",
        "x-requested-with",
        "x-signalr-user-agent",
        "content-type",
    ] {
        assert!(
            allowed_headers.split(',').any(|h| h.trim() == wanted),
            "{wanted} not in {allowed_headers:?}"
        );
    }

    let negotiate = http(
        addr,
        "POST",
        "/sockets/negotiate?negotiateVersion=1",
        &[("Origin", ORIGIN), ("X-Requested-With", "XMLHttpRequest")],
        b"",
    )
    .await;
    assert_eq!(negotiate.status, 200, "{}", negotiate.text());
    assert_eq!(
        negotiate.header("access-control-allow-origin"),
        Some(ORIGIN)
    );
    assert_eq!(
        negotiate.header("access-control-allow-credentials"),
        Some("true")
    );
    assert!(negotiate.json()["connectionToken"].is_string());

    // Another origin is refused as its upgrade would be, and told nothing CORS.
    for method in ["OPTIONS", "POST"] {
        let refused = http(
            addr,
            method,
            "/sockets/negotiate",
            &[("Origin", "https://evil.example")],
            b"",
        )
        .await;
        assert_eq!(refused.status, 403, "{method}: {}", refused.text());
        assert_eq!(refused.header("access-control-allow-origin"), None);
    }
    // Not from a browser page (no Origin): no CORS headers needed, none sent.
    let plain = http(addr, "POST", "/sockets/negotiate", &[], b"").await;
    assert_eq!(plain.status, 200, "{}", plain.text());
    assert_eq!(plain.header("access-control-allow-origin"), None);
}

/// Without `--allowed-origins` every origin may open the socket, so every origin may
/// negotiate: its own origin is echoed (never `*`, which credentials forbid).
#[tokio::test]
async fn negotiate_echoes_any_origin_without_an_origin_list() {
    let server = Server::start().await;
    let negotiate = http(
        server.addr,
        "POST",
        "/sockets/negotiate",
        &[("Origin", "http://localhost:3000")],
        b"",
    )
    .await;
    assert_eq!(negotiate.status, 200, "{}", negotiate.text());
    assert_eq!(
        negotiate.header("access-control-allow-origin"),
        Some("http://localhost:3000")
    );
}

// ---------------------------------------------------------------- floods

/// A SignalR client invoking unknown methods by the thousand, never reading the error
/// completions: it is closed for bad input as a jssocket client flooding bad events is, its
/// replies do not pile up, and a bystander's notify still arrives promptly.
#[tokio::test]
async fn a_flood_of_unknown_invocations_is_cut_off_and_others_are_served() {
    let server = Server::start().await;
    let addr = server.addr;
    let mut bystander = handshaken(&server, "bystander").await;
    let mut jssocket = server.client("jssocket-bystander").await;
    // Registered (its connect waits for a server meanwhile), then subscribed.
    jssocket
        .send_event("client_connect", serde_json::json!({}))
        .await;
    jssocket
        .send_event("subscribe", serde_json::json!({"name": "flood.watch"}))
        .await;
    assert_eq!(jssocket.recv().await["type"], "subscribed");
    let mut attacker = handshaken(&server, "attacker").await;

    // 5,000 invocations, 50 to a frame, sent without reading a reply.
    let frame: String = (0..50)
        .map(|i| {
            format!(
                "{{\"type\":1,\"target\":\"{}\",\"invocationId\":\"{i}\",\"arguments\":[]}}{RS}",
                "m".repeat(100)
            )
        })
        .collect();
    let mut frames_sent = 0;
    for _ in 0..100 {
        if !attacker.try_send_text(&frame).await {
            break;
        }
        frames_sent += 1;
    }

    // Others are served meanwhile, promptly.
    let started = Instant::now();
    let answer = api_post(
        addr,
        "publish",
        r#"{"name":"flood.watch","data":"still here"}"#,
    )
    .await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    let invocation = recv_message(&mut bystander).await;
    assert_eq!(invocation["target"], "flood.watch", "{invocation}");
    assert_eq!(jssocket.recv().await["data"]["data"], "still here");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "bystanders waited {:?} during the flood",
        started.elapsed()
    );

    // The attacker: its calls (SPEC §12) are answered `no_server` up to the per-minute limit
    // (600), then refused `rate_limited` as bad input: at most --bad-input-limit (30) more
    // completions, then the close message and 1008 "too much bad input".
    let mut completions = 0;
    let close = loop {
        match attacker.next_event(common::RECV_TIMEOUT).await {
            Some(common::Event::Text(text)) => {
                let message: Value = serde_json::from_str(text.trim_end_matches(RS))
                    .unwrap_or_else(|e| panic!("attacker: {text:?}: {e}"));
                match message["type"].as_u64() {
                    Some(3) => completions += 1,
                    // It is a SignalR connection too: the bystanders' publish reaches it.
                    Some(1) => assert_eq!(message["target"], "flood.watch", "{message}"),
                    Some(7) => assert_eq!(message["error"], "too much bad input", "{message}"),
                    _ => panic!("attacker: unexpected {message}"),
                }
            }
            Some(common::Event::Close(Some(close))) => break close,
            other => {
                panic!("attacker (after {frames_sent} frames): expected a close, got {other:?}")
            }
        }
    };
    assert_eq!(close.0, 1008, "{close:?}");
    assert_eq!(close.1, "too much bad input");
    assert!(
        (1..=631).contains(&completions),
        "{completions} error completions before the close"
    );
    // Nothing of it stays queued.
    wait_metrics(
        addr,
        &[
            ("jssocket_memory_outbound_bytes", &[], 0.0),
            ("jssocket_signalr_connections", &[], 1.0),
        ],
    )
    .await;
    let errors = scrape(addr)
        .await
        .value("jssocket_errors_total", &[("code", "rate_limited")]);
    assert!(
        (31.0..=32.0).contains(&errors),
        "{errors} rate_limited errors counted"
    );
}

/// The next completion, skipping invocations and pings.
async fn completion(conn: &mut Conn) -> Value {
    loop {
        let message = recv_message(conn).await;
        if message["type"] == 3 {
            return message;
        }
    }
}

/// Under overload (the runtime lagging behind a crowd of senders nobody vouched for),
/// SignalR clients' frames wait for the overload limiter as jssocket clients' messages do:
/// the waits are counted, a bystander's publish still arrives, and nothing a flooder sent is
/// lost, only delayed. Only SignalR connections flood here, so every throttled message is
/// theirs. (Lag threshold 2 ms, as in tests/hardening.rs, so a flood small enough for a
/// shared test machine engages it.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signalr_floods_wait_for_the_overload_limiter() {
    const FLOODERS: usize = 40;
    const ROUNDS: usize = 10;
    const BATCH: usize = 40;
    let server = Server::with_args(&["--overload-lag", "2"]).await;
    let addr = server.addr;
    let mut bystander = handshaken(&server, "bystander").await;
    let mut flooders = Vec::new();
    for i in 0..FLOODERS {
        flooders.push(handshaken(&server, &format!("flooder {i}")).await);
    }
    // Fire-and-forget invocations (no reply, not bad input), each round closed by one that
    // waits for its (error) completion: it arrives, so nothing before it was dropped.
    let pad = "x".repeat(4096);
    let floods: Vec<_> = flooders
        .into_iter()
        .map(|mut flooder| {
            let pad = pad.clone();
            tokio::spawn(async move {
                for round in 0..ROUNDS {
                    for _ in 0..BATCH {
                        flooder
                            .send_text(&format!(
                                "{{\"type\":1,\"target\":\"x\",\"arguments\":[\"{pad}\"]}}{RS}"
                            ))
                            .await;
                    }
                    flooder
                        .send_text(&format!(
                            "{{\"type\":1,\"target\":\"x\",\"invocationId\":\"{round}\",\"arguments\":[]}}{RS}"
                        ))
                        .await;
                    // (The bystander's publishes reach every SignalR connection: skipped.)
                    let completion = completion(&mut flooder).await;
                    assert_eq!(completion["invocationId"], round.to_string(), "{completion}");
                }
                flooder
            })
        })
        .collect();
    let mut engaged = false;
    for n in 0..10 {
        let body = format!(r#"{{"name":"watch","data":{n}}}"#);
        let answer = api_post(addr, "publish", &body).await;
        assert_eq!(answer.status, 200, "{}", answer.text());
        let invocation = recv_message(&mut bystander).await;
        assert_eq!(invocation["arguments"][0], n.to_string(), "{invocation}");
        engaged |= scrape(addr).await.get("jssocket_overloaded", &[]) == Some(1.0);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let flooders = timeout(Duration::from_secs(90), async {
        let mut done = Vec::new();
        for flood in floods {
            done.push(flood.await.expect("flooder"));
        }
        done
    })
    .await
    .expect("every flooder's invocations were handled in time");
    let throttled = scrape(addr)
        .await
        .get("jssocket_overload_throttled_messages_total", &[]);
    assert!(
        throttled.is_some_and(|n| n > 0.0),
        "no SignalR frame waited for the limiter (engaged: {engaged}, throttled: {throttled:?})"
    );
    // Everyone is still served.
    for mut flooder in flooders {
        flooder
            .send_text(&format!(
                "{{\"type\":1,\"target\":\"x\",\"invocationId\":\"after\",\"arguments\":[]}}{RS}"
            ))
            .await;
        assert_eq!(completion(&mut flooder).await["invocationId"], "after");
    }
}

/// With a bad-input limit too high to stop it, a client invoking methods with big
/// invocation ids and never reading the completions is closed for not reading them (1008
/// "not reading replies") once they pile up in its queue, as a jssocket client not reading
/// its error replies is: the completions it provokes cannot grow the server's memory.
#[tokio::test]
async fn a_client_not_reading_its_completions_is_closed() {
    let server = Server::with_args(&["--bad-input-limit", "1000000"]).await;
    let addr = server.addr;
    let mut attacker = handshaken(&server, "not-reading").await;
    let id = "i".repeat(4096);
    let frame: String = (0..10)
        .map(|_| {
            format!(
                "{{\"type\":1,\"target\":\"m\",\"invocationId\":\"{id}\",\"arguments\":[]}}{RS}"
            )
        })
        .collect();
    // Up to 40 MB of completions asked for, far beyond what the kernel's buffers hold.
    for _ in 0..1000 {
        if !attacker.try_send_text(&frame).await {
            break;
        }
    }
    let close = loop {
        match attacker.next_event(common::RECV_TIMEOUT).await {
            Some(common::Event::Text(_)) => {}
            Some(common::Event::Close(Some(close))) => break close,
            other => panic!("expected the completions then a close, got {other:?}"),
        }
    };
    assert_eq!(close, (1008, "not reading replies".to_string()));
    wait_metrics(
        addr,
        &[
            ("jssocket_memory_outbound_bytes", &[], 0.0),
            ("jssocket_signalr_connections", &[], 0.0),
        ],
    )
    .await;
}
