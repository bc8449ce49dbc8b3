//! The fuzz harness, shared by the `cargo fuzz` target (`fuzz/fuzz_targets/events.rs`) and the
//! regression test that replays saved inputs (`tests/fuzz_regressions.rs`).
//!
//! One input is a script of inbound WebSocket messages against a fresh hub that already has
//! five connections:
//!
//! | # | connection |
//! |---|---|
//! | 0 | admin in the server pool (`server_connect` done) |
//! | 1 | admin, not in the pool |
//! | 2 | client, acknowledged into group `g` (roles `r`, groups `x`), subscribed to `chan` |
//! | 3 | client, registered (`client_connect`) but not acknowledged |
//! | 4 | fresh connection: no admin, not registered |
//!
//! The input is split on byte `0xFF` (never part of UTF-8 text, so every part can be valid
//! JSON). In each part, the first byte chooses the sender (`byte % 5`) and whether the
//! connections' writers keep up afterwards (`byte / 5 % 2 == 0`: every outbound queue is
//! drained, as a fast reader would; otherwise queues grow and may overflow: slow consumer).
//! The rest is the message. `@0` … `@4` in it are replaced by the ids of connections 0–4,
//! so the fuzzer can target real connections.
//!
//! What is checked, besides "no panic": every frame the server queues is valid JSON; a
//! connection the server decides to close is removed as the real connection task does; and
//! once every connection is gone, the hub is empty (no client, group, channel, server or
//! waiting connect left behind).

use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::pin::pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll, Waker};

use jssocket::config::Config;
use jssocket::events;
use jssocket::peer::{Outgoing, Peer};
use jssocket::relay::Relay;
use jssocket::session::{Flow, Session};

/// A cost-4 bcrypt hash of `12345678`: `server_connect` with `{"auth":"12345678"}` costs
/// ~1 ms instead of the default hash's ~250 ms.
const FAST_HASH: &str = "$2b$04$dODXgGN5PieAre7bihB2aeEbZUa6kaMXEadSzdIWoM/eSGT3GjoJa";
/// Connections in the hub.
const CONNECTIONS: usize = 5;
/// Most messages replayed from one input.
const MAX_MESSAGES: usize = 32;

fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime")
    })
}

fn config() -> Config {
    static CONFIG: OnceLock<Config> = OnceLock::new();
    CONFIG
        .get_or_init(|| {
            Config::from_args([
                "jssocket",
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--auth",
                FAST_HASH,
                "--max-message-size",
                "65536",
                // Small, so that an undrained queue can overflow within one input.
                "--max-queue-bytes",
                "4096",
                "--pending-connects",
                "2",
                "--bad-input-limit",
                "5",
            ])
            .expect("fuzz configuration")
        })
        .clone()
}

/// Runs one input; panics if an invariant is broken.
pub fn run(input: &[u8]) {
    runtime().block_on(run_async(input));
}

struct Conn {
    session: Option<Session>,
    peer: Arc<Peer>,
}

async fn run_async(input: &[u8]) {
    let shared = Arc::new(Relay::new(config()));
    let mut conns: Vec<Conn> = (0..CONNECTIONS)
        .map(|i| {
            let peer = shared
                .hub
                .new_peer(shared.config.max_queue_bytes, &shared.memory);
            let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, 40_000 + i as u16));
            let session = Session::new(Arc::clone(&peer), Arc::clone(&shared), addr);
            Conn {
                session: Some(session),
                peer,
            }
        })
        .collect();
    let ids: Vec<String> = conns.iter().map(|c| c.peer.target.to_string()).collect();

    // The starting state (see the table above).
    for i in [0, 1] {
        if let Some(session) = conns[i].session.as_mut() {
            session.admin = true;
        }
    }
    let setup: [(usize, String); 5] = [
        (0, r#"{"type":"server_connect","data":{}}"#.to_string()),
        (
            2,
            r#"{"type":"client_connect","data":{"token":"t2"}}"#.to_string(),
        ),
        (
            3,
            r#"{"type":"client_connect","data":{"token":"t3"}}"#.to_string(),
        ),
        (
            0,
            format!(
                r#"{{"type":"client_connected","data":{{"target":"{}","user":"g","roles":["r"],"groups":["x"]}}}}"#,
                ids[2]
            ),
        ),
        (
            2,
            r#"{"type":"subscribe","data":{"name":"chan"}}"#.to_string(),
        ),
    ];
    for (sender, message) in setup {
        let flow = step(&mut conns, sender, message.as_bytes()).await;
        assert_eq!(flow, Some(Flow::Continue), "setup message {message} failed");
    }
    drain_all(&conns);

    for part in input.split(|b| *b == 0xFF).take(MAX_MESSAGES) {
        let Some((&selector, message)) = part.split_first() else {
            continue;
        };
        let sender = usize::from(selector) % CONNECTIONS;
        let drain = (selector / CONNECTIONS as u8).is_multiple_of(2);
        let message = substitute_ids(message, &ids);
        step(&mut conns, sender, &message).await;
        // Slow consumers and the like: a connection the hub asked to close goes, as its task
        // would make it.
        for i in 0..conns.len() {
            if conns[i].session.is_some() && close_requested(&conns[i].peer) {
                close(&mut conns, i);
            }
        }
        if drain {
            drain_all(&conns);
        }
    }

    // Everyone leaves: the hub must be empty.
    for i in 0..conns.len() {
        close(&mut conns, i);
    }
    let stats = shared.hub.stats();
    assert_eq!(
        (
            stats.clients,
            stats.acknowledged,
            stats.groups,
            stats.channels,
            stats.servers,
            stats.pending
        ),
        (0, 0, 0, 0, 0, 0),
        "hub not empty after every connection closed"
    );
}

/// Handles one message from connection `sender` (if still open), closing it when the
/// server says so. Returns the flow, `None` when the sender was already closed.
async fn step(conns: &mut [Conn], sender: usize, message: &[u8]) -> Option<Flow> {
    let session = conns[sender].session.as_mut()?;
    let flow = events::handle(session, message).await;
    if let Flow::Close(_) = flow {
        close(conns, sender);
    }
    Some(flow)
}

/// What the connection task does when it ends: out of the hub, queue closed, forwards it
/// had not written re-forwarded, its state dropped. Then checks what it would have written.
fn close(conns: &mut [Conn], i: usize) {
    let Some(session) = conns[i].session.take() else {
        return;
    };
    let shared = Arc::clone(&session.shared);
    shared.hub.remove(&conns[i].peer);
    let unsent = jssocket::outbox::items(conns[i].peer.outbox.close());
    for item in &unsent {
        check_frame(item);
    }
    shared.hub.pool.reforward(unsent);
    drop(session);
}

/// Has something (a full queue) asked this connection to close?
fn close_requested(peer: &Peer) -> bool {
    let mut cx = Context::from_waker(Waker::noop());
    matches!(pin!(peer.closed()).poll(&mut cx), Poll::Ready(_))
}

/// Pops every queued frame, as the writers would, and checks each.
fn drain_all(conns: &[Conn]) {
    for conn in conns {
        while let Some(item) = conn.peer.outbox.pop() {
            check_frame(&item);
        }
    }
}

/// Every frame the server sends is a JSON text.
fn check_frame(item: &Outgoing) {
    let frame = item.frame();
    if let Err(e) = serde_json::from_str::<serde::de::IgnoredAny>(frame.as_str()) {
        panic!(
            "server queued a frame that is not JSON ({e}): {:?}",
            frame.as_str()
        );
    }
}

/// Replaces `@0` … `@4` by the connection ids.
fn substitute_ids(message: &[u8], ids: &[String]) -> Vec<u8> {
    let mut out = Vec::with_capacity(message.len());
    let mut i = 0;
    while i < message.len() {
        if message[i] == b'@'
            && let Some(&digit) = message.get(i + 1)
            && digit.is_ascii_digit()
            && usize::from(digit - b'0') < ids.len()
        {
            out.extend_from_slice(ids[usize::from(digit - b'0')].as_bytes());
            i += 2;
            continue;
        }
        out.push(message[i]);
        i += 1;
    }
    out
}
