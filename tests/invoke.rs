//! Client → backend calls (SPEC §12): `invoke` goes to one server, round robin, with the
//! caller's identity; the server's `invoke_result` reaches that caller only. Timeouts, no
//! server, the per-connection limits, results that must reach nobody (another connection's
//! id, a wrong id, a late or repeated answer), SignalR invocations, and a client on one node
//! served by a server on another (loopback and real Redis).

mod common;

#[path = "common/cluster.rs"]
mod nodes;

use std::time::{Duration, Instant};

use common::{
    Conn, RS, SILENCE, Server, expect_invoke, expect_silence_all, recv_message, register,
    signalr_client, wait_metric,
};
use nodes::{CLUSTER_TIMEOUT, Kind, cluster_on, wait_all};
use serde_json::{Value, json};

/// `client` calls `method` with `data` under `id`.
async fn invoke(client: &mut Conn, id: Value, method: &str, data: Value) {
    client
        .send_event("invoke", json!({"id": id, "method": method, "data": data}))
        .await;
}

/// The next frame of `client` is an `invoke_result` for `id` carrying an error with `code`.
async fn expect_error_result(client: &mut Conn, id: Value, code: &str) -> Value {
    let frame = client.recv().await;
    assert_eq!(frame["type"], "invoke_result", "{}: {frame}", client.name);
    assert_eq!(frame["data"]["id"], id, "{}: {frame}", client.name);
    assert_eq!(
        frame["data"]["error"]["code"], code,
        "{}: {frame}",
        client.name
    );
    assert!(frame["data"].get("data").is_none(), "{frame}");
    frame["data"]["error"].clone()
}

/// A registered client whose `client_connect` the (only) backend saw; returns its id.
async fn registered(server: &Server, backend: &mut Conn, name: &str) -> Conn {
    let mut client = server.client(name).await;
    register(&mut client, backend).await;
    client
}

/// The call reaches the server with the caller's target, user, roles and groups exactly, and
/// the server's data (or error) comes back unchanged, byte for byte.
#[tokio::test]
async fn a_call_goes_to_a_server_and_its_result_comes_back_to_the_caller() {
    let server = Server::start().await;
    let mut backend = server.backend("backend").await;
    let mut client = registered(&server, &mut backend, "client").await;
    let id = client.id().to_string();
    backend
        .send_event(
            "client_connected",
            json!({"target": id, "user": "u1", "roles": ["staff"], "groups": ["g1"]}),
        )
        .await;
    client.recv().await; // its client_connected

    client
        .send_text(r#"{"type":"invoke","data":{"id":1,"method":"execute","data":{"file":"a.hl","args":[1, 2]}}}"#)
        .await;
    backend
        .expect_text(&format!(
            r#"{{"type":"invoke","data":{{"id":1,"method":"execute","data":{{"file":"a.hl","args":[1,2]}},"target":"{id}","user":"u1","roles":["staff"],"groups":["g1"]}}}}"#
        ))
        .await;
    backend
        .send_text(&format!(
            r#"{{"type":"invoke_result","data":{{"target":"{id}","id":1,"data":{{"z":1,"a":[true,null]}}}}}}"#
        ))
        .await;
    client
        .expect_text(r#"{"type":"invoke_result","data":{"id":1,"data":{"z":1,"a":[true,null]}}}"#)
        .await;

    // A string id, and an error: passed through as the server wrote it.
    invoke(&mut client, json!("call-2"), "execute", json!(null)).await;
    let call = expect_invoke(&mut backend).await;
    assert_eq!(call["id"], "call-2");
    assert_eq!(call["data"], Value::Null);
    backend
        .send_event(
            "invoke_result",
            json!({"target": id, "id": "call-2", "error": {"code": 42, "why": "no"}}),
        )
        .await;
    client
        .expect_text(
            r#"{"type":"invoke_result","data":{"id":"call-2","error":{"code":42,"why":"no"}}}"#,
        )
        .await;
    expect_silence_all(&mut [&mut client, &mut backend]).await;
}

/// Calls alternate between the servers of the pool, like client connects.
#[tokio::test]
async fn calls_go_round_robin_over_the_servers() {
    let server = Server::start().await;
    let mut s1 = server.backend("s1").await;
    let mut client = registered(&server, &mut s1, "client").await;
    let mut s2 = server.backend("s2").await;
    let mut got = Vec::new();
    for i in 0..4 {
        invoke(&mut client, json!(i), "m", json!(i)).await;
        let (who, text) = common::recv_any(&mut [&mut s1, &mut s2]).await;
        assert!(text.contains(r#""type":"invoke""#), "{text}");
        got.push(who);
    }
    assert!(
        got.windows(2).all(|w| w[0] != w[1]),
        "not round robin: {got:?}"
    );
}

/// Before `client_connect`, a connection is nobody: its call is refused.
#[tokio::test]
async fn an_unregistered_connection_cannot_call() {
    let server = Server::start().await;
    let mut backend = server.backend("backend").await;
    let mut stranger = server.client("stranger").await;
    invoke(&mut stranger, json!(1), "m", json!({})).await;
    stranger.expect_error("forbidden", Some("invoke")).await;
    backend.expect_silence().await;
}

/// No server connected: the caller is answered `no_server` at once.
#[tokio::test]
async fn no_server_is_answered_at_once() {
    let server = Server::start().await;
    let mut client = server.client("client").await;
    // Registered: its client_connect waits for a server.
    client
        .send_text(r#"{"type":"client_connect","data":{}}"#)
        .await;
    let started = Instant::now();
    invoke(&mut client, json!(7), "m", json!({})).await;
    expect_error_result(&mut client, json!(7), "no_server").await;
    assert!(started.elapsed() < Duration::from_secs(1), "not at once");
}

/// A call nobody answers gets a `timeout` error after `--invoke-timeout`; the answer that
/// comes after it reaches nobody (and is counted).
#[tokio::test]
async fn an_unanswered_call_times_out_and_a_late_answer_is_dropped() {
    let server = Server::with_args(&["--invoke-timeout", "1"]).await;
    let mut backend = server.backend("backend").await;
    let mut client = registered(&server, &mut backend, "client").await;
    let id = client.id().to_string();
    let started = Instant::now();
    invoke(&mut client, json!("slow"), "m", json!({})).await;
    expect_invoke(&mut backend).await;
    let error = expect_error_result(&mut client, json!("slow"), "timeout").await;
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_millis(2500),
        "timed out after {took:?}, expected about 1 s"
    );
    assert!(error["message"].is_string(), "{error}");
    backend
        .send_event(
            "invoke_result",
            json!({"target": id, "id": "slow", "data": 1}),
        )
        .await;
    client.expect_silence().await;
    wait_metric(
        server.addr,
        "jssocket_invoke_results_dropped_total",
        &[],
        1.0,
    )
    .await;
    wait_metric(server.addr, "jssocket_invoke_timeouts_total", &[], 1.0).await;
}

/// Results reach their caller only: an answer naming another client's target with this
/// call's id, a wrong id, a repeated answer, or a client posing as a server all reach nobody.
#[tokio::test]
async fn a_result_reaches_only_its_caller() {
    let server = Server::start().await;
    let mut backend = server.backend("backend").await;
    let mut alice = registered(&server, &mut backend, "alice").await;
    let mut mallory = registered(&server, &mut backend, "mallory").await;
    let (a, m) = (alice.id().to_string(), mallory.id().to_string());

    invoke(&mut alice, json!(1), "m", json!({})).await;
    assert_eq!(expect_invoke(&mut backend).await["target"], a);

    // The call's id, but mallory's target: mallory has no call 1.
    backend
        .send_event("invoke_result", json!({"target": m, "id": 1, "data": "x"}))
        .await;
    // Alice's target, a wrong id; and "1" is not 1.
    for wrong in [json!(2), json!("1")] {
        backend
            .send_event(
                "invoke_result",
                json!({"target": a, "id": wrong, "data": "x"}),
            )
            .await;
    }
    // A client cannot answer, not even itself.
    mallory
        .send_event(
            "invoke_result",
            json!({"target": a, "id": 1, "data": "forged"}),
        )
        .await;
    mallory
        .expect_error("forbidden", Some("invoke_result"))
        .await;
    alice
        .send_event(
            "invoke_result",
            json!({"target": a, "id": 1, "data": "self"}),
        )
        .await;
    alice.expect_error("forbidden", Some("invoke_result")).await;
    expect_silence_all(&mut [&mut alice, &mut mallory]).await;

    // The right answer, once; a second one is dropped.
    for _ in 0..2 {
        backend
            .send_event("invoke_result", json!({"target": a, "id": 1, "data": "ok"}))
            .await;
    }
    alice
        .expect_text(r#"{"type":"invoke_result","data":{"id":1,"data":"ok"}}"#)
        .await;
    expect_silence_all(&mut [&mut alice, &mut mallory, &mut backend]).await;
    wait_metric(
        server.addr,
        "jssocket_invoke_results_dropped_total",
        &[],
        4.0,
    )
    .await;

    // The same id on two connections are two calls.
    invoke(&mut alice, json!(5), "m", json!({})).await;
    invoke(&mut mallory, json!(5), "m", json!({})).await;
    expect_invoke(&mut backend).await;
    expect_invoke(&mut backend).await;
    backend
        .send_event(
            "invoke_result",
            json!({"target": m, "id": 5, "data": "for m"}),
        )
        .await;
    mallory
        .expect_text(r#"{"type":"invoke_result","data":{"id":5,"data":"for m"}}"#)
        .await;
    alice.expect_silence().await;
}

/// At most 16 calls in flight per connection; a duplicate id in flight is refused; an
/// answered call makes room. Refusals come as results for the refused id.
#[tokio::test]
async fn calls_in_flight_are_bounded_per_connection() {
    let server = Server::start().await;
    let mut backend = server.backend("backend").await;
    let mut client = registered(&server, &mut backend, "client").await;
    let mut other = registered(&server, &mut backend, "other").await;
    let id = client.id().to_string();
    for i in 0..16 {
        invoke(&mut client, json!(i), "m", json!({})).await;
        assert_eq!(expect_invoke(&mut backend).await["id"], i);
    }
    invoke(&mut client, json!(16), "m", json!({})).await;
    expect_error_result(&mut client, json!(16), "rate_limited").await;
    invoke(&mut client, json!(3), "m", json!({})).await;
    expect_error_result(&mut client, json!(3), "invalid_field").await;
    backend.expect_silence().await;
    // Another connection is not held back by this one.
    invoke(&mut other, json!(0), "m", json!({})).await;
    expect_invoke(&mut backend).await;
    // One answered: one more fits.
    backend
        .send_event("invoke_result", json!({"target": id, "id": 0, "data": 0}))
        .await;
    client
        .expect_text(r#"{"type":"invoke_result","data":{"id":0,"data":0}}"#)
        .await;
    invoke(&mut client, json!(16), "m", json!({})).await;
    assert_eq!(expect_invoke(&mut backend).await["id"], 16);
}

/// At most 600 calls a minute per connection: the 601st is refused `rate_limited` (and
/// forwarded to nobody), whatever became of the others.
#[tokio::test]
async fn calls_per_minute_are_bounded_per_connection() {
    let server = Server::start().await;
    let mut client = server.client("client").await;
    client
        .send_text(r#"{"type":"client_connect","data":{}}"#)
        .await;
    for i in 0..600 {
        invoke(&mut client, json!(i), "m", json!({})).await;
        expect_error_result(&mut client, json!(i), "no_server").await;
    }
    invoke(&mut client, json!(600), "m", json!({})).await;
    expect_error_result(&mut client, json!(600), "rate_limited").await;
    // A backend joining now gets nothing from this client this minute.
    let mut backend = server.backend("backend").await;
    invoke(&mut client, json!(601), "m", json!({})).await;
    expect_error_result(&mut client, json!(601), "rate_limited").await;
    // (The waiting client_connect is handed over when the backend joins; no invoke.)
    let frame = backend.recv().await;
    assert_eq!(frame["type"], "client_connect", "{frame}");
    backend.expect_silence().await;
}

/// Ids and methods are bounded and typed; a bad id is an error event (no id to answer
/// under), a bad method a result for that id.
#[tokio::test]
async fn bad_ids_and_methods_are_refused() {
    let server = Server::start().await;
    let mut backend = server.backend("backend").await;
    let mut client = registered(&server, &mut backend, "client").await;
    for bad in [
        json!({"a": 1}),
        json!(1.5),
        json!(true),
        json!("x".repeat(129)),
    ] {
        invoke(&mut client, bad, "m", json!({})).await;
        client.expect_error("invalid_field", Some("invoke")).await;
    }
    for missing in [json!({"method": "m"}), json!({"id": null, "method": "m"})] {
        client.send_event("invoke", missing).await;
        client.expect_error("missing_field", Some("invoke")).await;
    }
    for bad in [json!(""), json!("m".repeat(129)), json!(3), json!("a\nb")] {
        client
            .send_event("invoke", json!({"id": 9, "method": bad}))
            .await;
        expect_error_result(&mut client, json!(9), "invalid_field").await;
    }
    client.send_event("invoke", json!({"id": 9})).await;
    expect_error_result(&mut client, json!(9), "invalid_field").await;
    backend.expect_silence().await;
    // The server's side is checked too.
    backend
        .send_event("invoke_result", json!({"id": 9, "data": 1}))
        .await;
    backend
        .expect_error("missing_field", Some("invoke_result"))
        .await;
}

/// A SignalR `invoke` is a call with the arguments array as `data` and the invocation id as
/// `id`; the result is its completion; `send` is forwarded with `"id":null` and completes
/// nothing; an error is a completion with an error string.
#[tokio::test]
async fn signalr_invocations_are_calls() {
    let server = Server::start().await;
    let mut backend = server.backend("backend").await;
    let mut hub = signalr_client(server.addr, None, "signalr").await;
    let target = hub.id().to_string();

    hub.send_text(&format!(
        r#"{{"type":1,"invocationId":"1","target":"execute","arguments":["a.hl",{{"x":1}}]}}{RS}"#
    ))
    .await;
    backend
        .expect_text(&format!(
            r#"{{"type":"invoke","data":{{"id":"1","method":"execute","data":["a.hl",{{"x":1}}],"target":"{target}","user":null,"roles":[],"groups":[]}}}}"#
        ))
        .await;
    backend
        .send_event(
            "invoke_result",
            json!({"target": target, "id": "1", "data": {"ok": [1]}}),
        )
        .await;
    hub.expect_text(&format!(
        r#"{{"type":3,"invocationId":"1","result":{{"ok":[1]}}}}{RS}"#
    ))
    .await;

    // An error: a string as it is, anything else as its JSON text.
    for (i, error, text) in [
        (2, json!("boom"), "boom"),
        (3, json!({"c": 1}), r#"{"c":1}"#),
    ] {
        hub.send_text(&format!(
            r#"{{"type":1,"invocationId":"{i}","target":"m","arguments":[]}}{RS}"#
        ))
        .await;
        expect_invoke(&mut backend).await;
        backend
            .send_event(
                "invoke_result",
                json!({"target": target, "id": i.to_string(), "error": error}),
            )
            .await;
        let completion = recv_message(&mut hub).await;
        assert_eq!(
            completion,
            json!({"type": 3, "invocationId": i.to_string(), "error": text})
        );
    }

    // send: forwarded without an id; an answer to it completes nothing.
    hub.send_text(&format!(
        r#"{{"type":1,"target":"log","arguments":[1]}}{RS}"#
    ))
    .await;
    let call = expect_invoke(&mut backend).await;
    assert_eq!(
        (call["id"].clone(), call["method"].clone()),
        (Value::Null, json!("log"))
    );
    backend
        .send_event(
            "invoke_result",
            json!({"target": target, "id": "4", "data": 1}),
        )
        .await;
    hub.expect_silence().await;
}

/// SignalR callers get the relay's errors as completions too: no server, the limit.
#[tokio::test]
async fn signalr_invocations_without_a_server_complete_with_an_error() {
    let server = Server::start().await;
    let mut hub = signalr_client(server.addr, None, "signalr").await;
    hub.send_text(&format!(
        r#"{{"type":1,"invocationId":"7","target":"m","arguments":[]}}{RS}"#
    ))
    .await;
    let completion = recv_message(&mut hub).await;
    assert_eq!(completion["invocationId"], "7");
    let error: Value = serde_json::from_str(completion["error"].as_str().expect("error string"))
        .expect("the relay's error is JSON text");
    assert_eq!(error["code"], "no_server", "{completion}");
}

/// A client on node A calls; the only server is on node B: the call crosses to B and the
/// result comes back to A, to that client only; a wrong id crosses and reaches nobody.
async fn a_call_crosses_nodes_and_comes_back(kind: Kind) {
    let (_backing, nodes) = cluster_on(kind, 2).await;
    let (a, b) = (&nodes[0], &nodes[1]);
    let mut backend = b.backend("backend").await;
    wait_all(
        &[a],
        "jssocket_cluster_remote_servers",
        1.0,
        CLUSTER_TIMEOUT,
    )
    .await;
    let mut client = a.client("client").await;
    let mut bystander = a.client("bystander").await;
    register(&mut client, &mut backend).await;
    register(&mut bystander, &mut backend).await;
    let id = client.id().to_string();

    invoke(&mut client, json!(1), "execute", json!({"f": 1})).await;
    let call = expect_invoke(&mut backend).await;
    assert_eq!(call["target"], id);
    assert_eq!(call["data"], json!({"f": 1}));
    backend
        .send_event(
            "invoke_result",
            json!({"target": id, "id": 2, "data": "wrong id"}),
        )
        .await;
    backend
        .send_event(
            "invoke_result",
            json!({"target": id, "id": 1, "data": {"r": 1}}),
        )
        .await;
    client
        .expect_text(r#"{"type":"invoke_result","data":{"id":1,"data":{"r":1}}}"#)
        .await;
    expect_silence_all(&mut [&mut client, &mut bystander, &mut backend]).await;
    // An error crosses as well.
    invoke(&mut client, json!(2), "execute", json!(null)).await;
    expect_invoke(&mut backend).await;
    backend
        .send_event(
            "invoke_result",
            json!({"target": id, "id": 2, "error": "nope"}),
        )
        .await;
    client
        .expect_text(r#"{"type":"invoke_result","data":{"id":2,"error":"nope"}}"#)
        .await;
    tokio::time::sleep(SILENCE).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_crosses_nodes_on_the_loopback() {
    a_call_crosses_nodes_and_comes_back(Kind::Loopback).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_crosses_nodes_on_redis() {
    a_call_crosses_nodes_and_comes_back(Kind::Redis).await;
}

/// A caller that closes takes its calls with it: the answer that comes later reaches nobody
/// and is counted; the table does not keep them until their deadline.
#[tokio::test]
async fn a_closed_callers_calls_are_forgotten() {
    let server = Server::start().await;
    let mut backend = server.backend("backend").await;
    let mut client = registered(&server, &mut backend, "client").await;
    let id = client.id().to_string();
    invoke(&mut client, json!(1), "m", json!({})).await;
    expect_invoke(&mut backend).await;
    client.close().await;
    backend
        .send_event("invoke_result", json!({"target": id, "id": 1, "data": 1}))
        .await;
    wait_metric(
        server.addr,
        "jssocket_invoke_results_dropped_total",
        &[],
        1.0,
    )
    .await;
    backend.expect_silence().await;
}

/// The node of the server that took the call crashes: the caller on the other node still
/// gets its `timeout` (its deadline lives on its own node).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_whose_server_node_dies_times_out() {
    let backing = nodes::Backing::start(Kind::Loopback);
    let a = backing.node("a", &["--invoke-timeout", "1"]);
    let mut b = backing.node("b", &[]);
    nodes::wait_cluster(&[&a, &b]).await;
    let mut backend = b.backend("backend").await;
    wait_all(
        &[&a],
        "jssocket_cluster_remote_servers",
        1.0,
        CLUSTER_TIMEOUT,
    )
    .await;
    let mut client = a.client("client").await;
    register(&mut client, &mut backend).await;
    invoke(&mut client, json!("x"), "m", json!({})).await;
    expect_invoke(&mut backend).await;
    b.kill();
    expect_error_result(&mut client, json!("x"), "timeout").await;
}

/// A backend may answer over HTTP: `POST /api/invoke_result` with the admin password; it says
/// whether a call on this node was completed (`delivered` 1), and a wrong id delivers 0.
#[tokio::test]
async fn a_result_may_come_over_http() {
    let server = Server::start().await;
    let mut backend = server.backend("backend").await;
    let mut client = registered(&server, &mut backend, "client").await;
    let id = client.id().to_string();
    invoke(&mut client, json!(1), "m", json!({})).await;
    expect_invoke(&mut backend).await;
    let wrong = common::api_post(
        server.addr,
        "invoke_result",
        &json!({"target": id, "id": 2, "data": 1}).to_string(),
    )
    .await;
    assert_eq!((wrong.status, wrong.json()), (200, json!({"delivered": 0})));
    let right = common::api_post(
        server.addr,
        "invoke_result",
        &json!({"target": id, "id": 1, "data": {"ok": 1}}).to_string(),
    )
    .await;
    assert_eq!((right.status, right.json()), (200, json!({"delivered": 1})));
    client
        .expect_text(r#"{"type":"invoke_result","data":{"id":1,"data":{"ok":1}}}"#)
        .await;
    client.expect_silence().await;
}

/// The per-connection bound holds for SignalR callers too: the 17th invocation in flight
/// completes at once with `rate_limited`, and is not forwarded.
#[tokio::test]
async fn signalr_calls_in_flight_are_bounded() {
    let server = Server::start().await;
    let mut backend = server.backend("backend").await;
    let mut hub = signalr_client(server.addr, None, "signalr").await;
    for i in 0..17 {
        hub.send_text(&format!(
            r#"{{"type":1,"invocationId":"{i}","target":"m","arguments":[]}}{RS}"#
        ))
        .await;
    }
    for _ in 0..16 {
        expect_invoke(&mut backend).await;
    }
    let completion = recv_message(&mut hub).await;
    assert_eq!(completion["invocationId"], "16", "{completion}");
    let error: Value = serde_json::from_str(completion["error"].as_str().expect("error string"))
        .expect("the relay's error is JSON text");
    assert_eq!(error["code"], "rate_limited", "{completion}");
    expect_silence_all(&mut [&mut hub, &mut backend]).await;
}
