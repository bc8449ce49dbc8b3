//! One SignalR WebSocket: the handshake, then a reader (record-separated hub messages) and a
//! writer (the connection's bounded outbound queue, SignalR keep-alive pings) side by side in
//! one task, as `crate::connection` runs a jssocket connection; its queue, memory accounting
//! and closing handshake are the same code.
//!
//! Keep-alive is SignalR's own (HubProtocol.md): a `{"type":6}` ping every
//! `--signalr-keepalive` (15 s) whatever else is sent, and a client that sends nothing for
//! `--signalr-client-timeout` (30 s) is closed; any message (its own pings included) counts.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use futures_util::{SinkExt, StreamExt};
use tokio::time::{Duration, Instant, sleep_until, timeout};
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};
use tracing::{Instrument, debug, debug_span, info};

use super::protocol::{self, Error, Message as HubMessage, Records};
use super::{HANDSHAKE_OK, PING};
use crate::backplane::Topic;
use crate::connection::{End, Sink, Socket, Stream, finish, flush, read_error, write_batch};
use crate::invoke::{MAX_ID_LEN, RateWindow, Reply, check_method, refusal_error};
use crate::peer::{Close, Peer};
use crate::protocol::{ProtocolError, compact, push_json_string};
use crate::relay::{Call, Relay};

/// The handshake was refused (its reason went in the handshake response).
const HANDSHAKE_REFUSED: Close = Close {
    code: 1008,
    reason: "SignalR handshake refused",
};
const HANDSHAKE_TIMEOUT: Close = Close {
    code: 1008,
    reason: "no SignalR handshake in time",
};
/// A message that is not valid hub protocol (its reason went in the close message).
const BAD_MESSAGE: Close = Close {
    code: 1008,
    reason: "invalid SignalR message",
};
/// Silent past `--signalr-client-timeout`; the peer is taken for dead (as `PING_TIMEOUT`).
const CLIENT_TIMEOUT: Close = Close::PING_TIMEOUT;

/// How long the SignalR close message may take: a peer that does not take it is gone.
const FAREWELL_GRACE: Duration = Duration::from_secs(1);

/// Longest a handshake answer waits for this node to receive the connection's messages (see
/// [`Relay::subscribed`]); a backplane slower than that answers it anyway.
const SUBSCRIBE_WAIT: Duration = Duration::from_secs(5);

/// How the connection stops: how the WebSocket ends, and the SignalR message said first.
struct Stop {
    end: End,
    farewell: Option<String>,
}

impl Stop {
    fn gone() -> Stop {
        Stop {
            end: End::Gone,
            farewell: None,
        }
    }

    /// Closed for what the client sent: the close message says why.
    fn bad(error: &Error) -> Stop {
        Stop {
            end: End::Close {
                close: BAD_MESSAGE,
                flush: true,
            },
            farewell: Some(protocol::close_message(
                Some(&format!("Connection closed with an error: {error}")),
                false,
            )),
        }
    }
}

/// Serves one upgraded SignalR WebSocket until it closes, then removes it from the hub.
pub async fn serve(
    socket: Socket,
    shared: Arc<Relay>,
    peer: Arc<Peer>,
    addr: SocketAddr,
    identity: Option<crate::jwt::Identity>,
) {
    let span = debug_span!("signalr", conn_id = %peer.target);
    run(socket, shared, peer, addr, identity)
        .instrument(span)
        .await;
}

async fn run(
    socket: Socket,
    shared: Arc<Relay>,
    peer: Arc<Peer>,
    addr: SocketAddr,
    identity: Option<crate::jwt::Identity>,
) {
    debug!(%addr, "SignalR connected");
    let (mut sink, mut stream) = socket.split();
    let mut records = Records::default();
    let handshake = tokio::select! {
        biased;
        _ = shared.shutdown.cancelled() => Err(Stop {
            end: End::Close { close: Close::SHUTDOWN, flush: false },
            farewell: None,
        }),
        read = timeout(
            shared.config.signalr_handshake_timeout,
            read_handshake(&mut stream, &mut records, &shared, &peer),
        ) => read.unwrap_or(Err(Stop {
            end: End::Close { close: HANDSHAKE_TIMEOUT, flush: false },
            farewell: None,
        })),
    };
    let stop = match handshake {
        Err(stop) => stop,
        // Registered (and acknowledged) before it is answered, and answered once this node
        // receives what is sent to it; the outbox holds what comes meanwhile.
        Ok(_) if !shared.hub.register_client(&peer) => refused(&Error::IdInUse),
        Ok(early) => {
            let mut topics = vec![Topic::SignalR];
            // A valid token acknowledges it at once: its user's group, roles and groups
            // for publish filters (SPEC §11). (WIP: token expiry is not enforced here yet.)
            if let Some(identity) = identity {
                topics.push(Topic::Group(Arc::clone(&identity.user)));
                let ack = crate::hub::Acknowledgement {
                    group: Arc::clone(&identity.user),
                    user: Some(identity.user),
                    roles: identity.roles,
                    groups: identity.groups,
                };
                shared.hub.acknowledge(&peer.target, ack);
            }
            shared.subscribed(&topics, SUBSCRIBE_WAIT).await;
            let answered = timeout(
                FAREWELL_GRACE,
                sink.send(Message::Text(Utf8Bytes::from_static(HANDSHAKE_OK))),
            )
            .await;
            if !matches!(answered, Ok(Ok(()))) {
                Stop::gone()
            } else {
                connected(&mut sink, &mut stream, &mut records, &shared, &peer, early).await
            }
        }
    };
    peer.close(match stop.end {
        End::Gone => Close::NORMAL,
        End::Close { close, .. } | End::Reject(close) => close,
    });
    shared.hub.remove(&peer);
    shared.invocations.forget(peer.id);
    let unsent = peer.outbox.close();
    if let End::Close { flush: true, .. } = stop.end {
        Box::pin(flush(&mut sink, unsent)).await;
    } else {
        drop(unsent);
    }
    if let Some(farewell) = stop.farewell {
        let _ = timeout(
            FAREWELL_GRACE,
            sink.send(Message::Text(Utf8Bytes::from(farewell))),
        )
        .await;
    }
    match stop.end {
        End::Close { close, .. } if close == Close::SLOW_CONSUMER => {
            shared.metrics.slow_consumer_closes.inc();
            info!(conn_id = %peer.target, "SignalR closed: slow consumer (outbound queue overflowed)");
        }
        end => debug!(?end, "SignalR disconnected"),
    }
    Box::pin(finish(sink, stream, stop.end, &shared.shutdown)).await;
}

/// Reads until the handshake request's record separator. Returns the messages that came
/// after it in the same frame; a refused handshake is answered `{"error":…}`.
async fn read_handshake(
    stream: &mut Stream,
    records: &mut Records,
    shared: &Relay,
    peer: &Peer,
) -> Result<Vec<String>, Stop> {
    let max = shared.config.max_message_size;
    loop {
        let text = match next_text(stream, shared, peer).await? {
            Some(text) => text,
            None => continue,
        };
        let mut complete = Vec::new();
        let fed = records.feed(&text, max, |record| {
            complete.push(record.to_string());
            Ok::<(), ()>(())
        });
        if let Err(Err(error)) = fed {
            return Err(refused(&error));
        }
        let mut complete = complete.into_iter();
        if let Some(request) = complete.next() {
            return match protocol::handshake(&request) {
                Ok(()) => Ok(complete.collect()),
                Err(error) => Err(refused(&error)),
            };
        }
    }
}

fn refused(error: &Error) -> Stop {
    Stop {
        end: End::Close {
            close: HANDSHAKE_REFUSED,
            flush: false,
        },
        farewell: Some(protocol::handshake_error(error)),
    }
}

/// The next text message, with its memory accounted as `crate::connection` does; `None` for
/// control frames. A binary frame or the end of the stream stops the connection.
async fn next_text(
    stream: &mut Stream,
    shared: &Relay,
    peer: &Peer,
) -> Result<Option<Utf8Bytes>, Stop> {
    let message = match stream.next().await {
        None => return Err(Stop::gone()),
        Some(Err(e)) => {
            return Err(Stop {
                end: read_error(e),
                farewell: None,
            });
        }
        Some(Ok(message)) => message,
    };
    let memory = &shared.memory;
    match message {
        Message::Text(text) => {
            memory.message_complete(peer);
            memory.retain(peer, text.len());
            Ok(Some(text))
        }
        Message::Binary(bytes) => {
            memory.message_complete(peer);
            memory.retain(peer, bytes.len());
            Err(Stop::bad(&Error::Message)
                .with_reason("binary frame: this server offers the Text transfer format only"))
        }
        Message::Close(_) => {
            memory.message_complete(peer);
            Err(Stop::gone())
        }
        Message::Ping(payload) | Message::Pong(payload) => {
            memory.control_frame(peer, payload.len());
            Ok(None)
        }
        Message::Frame(_) => Ok(None),
    }
}

impl Stop {
    fn with_reason(mut self, reason: &str) -> Stop {
        self.farewell = Some(protocol::close_message(
            Some(&format!("Connection closed with an error: {reason}")),
            false,
        ));
        self
    }
}

/// After the handshake: reads and writes until something stops the connection.
async fn connected(
    sink: &mut Sink,
    stream: &mut Stream,
    records: &mut Records,
    shared: &Relay,
    peer: &Arc<Peer>,
    early: Vec<String>,
) -> Stop {
    let start = Instant::now();
    // Milliseconds from `start` to the last message heard from the client.
    let heard = AtomicU64::new(0);
    let mut calls = RateWindow::default();
    for record in &early {
        if let Err(stop) = handle(record, shared, peer, &mut calls) {
            return stop;
        }
    }
    tokio::select! {
        biased;
        _ = shared.shutdown.cancelled() => Stop {
            end: End::Close { close: Close::SHUTDOWN, flush: false },
            farewell: Some(protocol::close_message(None, true)),
        },
        close = peer.closed() => Stop {
            end: End::Close { close, flush: close != Close::SLOW_CONSUMER },
            // A slow consumer would not read it either.
            farewell: (close != Close::SLOW_CONSUMER)
                .then(|| protocol::close_message(Some(close.reason), false)),
        },
        stop = read_loop(stream, records, shared, peer, start, &heard, &mut calls) => stop,
        stop = write_loop(sink, shared, peer, start, &heard) => stop,
    }
}

async fn read_loop(
    stream: &mut Stream,
    records: &mut Records,
    shared: &Relay,
    peer: &Arc<Peer>,
    start: Instant,
    heard: &AtomicU64,
    calls: &mut RateWindow,
) -> Stop {
    let max = shared.config.max_message_size;
    loop {
        let next = next_text(stream, shared, peer).await;
        // Any frame, control frames included, says the client is alive.
        heard.store(start.elapsed().as_millis() as u64, Ordering::Relaxed);
        let text = match next {
            Err(stop) => return stop,
            Ok(None) => continue,
            Ok(Some(text)) => text,
        };
        match records.feed(&text, max, |record| handle(record, shared, peer, calls)) {
            Ok(()) => {}
            Err(Ok(stop)) => return stop,
            Err(Err(error)) => return Stop::bad(&error),
        }
    }
}

/// Applies one hub message from the client.
///
/// An invocation is a call to the backend (SPEC §12, [`crate::invoke`]): `invoke(M, ...args)`
/// becomes an `invoke` with `method` M, `data` the arguments array and `id` the invocation id,
/// and its result the completion; `send(M, ...args)` (no invocation id) is forwarded the same
/// with `"id":null` and gets no completion. Streaming invocations are not offered.
fn handle(
    record: &str,
    shared: &Relay,
    peer: &Arc<Peer>,
    calls: &mut RateWindow,
) -> Result<(), Stop> {
    match HubMessage::parse(record) {
        Err(error) => Err(Stop::bad(&error)),
        Ok(HubMessage::Invocation {
            target,
            invocation_id: Some(id),
            stream: true,
            ..
        }) => {
            let target: String = target.chars().take(128).collect();
            let error = format!("Streaming hub method '{target}': this relay offers no streams");
            peer.send_error(Utf8Bytes::from(protocol::completion_error(&id, &error)));
            Ok(())
        }
        Ok(HubMessage::Invocation {
            target,
            invocation_id,
            arguments,
            stream: false,
        }) => {
            let id = invocation_id.as_deref();
            if let Err(error) = call(shared, peer, calls, &target, id, arguments)
                && let Some(id) = id
            {
                shared.metrics.error(error.code());
                let error = refusal_error(&error);
                peer.send_error(Utf8Bytes::from(protocol::completion_error(id, &error)));
            }
            Ok(())
        }
        Ok(HubMessage::Close) => Err(Stop {
            end: End::Close {
                close: Close::NORMAL,
                flush: true,
            },
            farewell: None,
        }),
        Ok(HubMessage::Invocation { .. } | HubMessage::Ping | HubMessage::Other) => Ok(()),
    }
}

/// Forwards one invocation as a call; a refusal is returned for the caller to complete with.
fn call(
    shared: &Relay,
    peer: &Arc<Peer>,
    calls: &mut RateWindow,
    method: &str,
    invocation_id: Option<&str>,
    arguments: &str,
) -> Result<(), ProtocolError> {
    let id = match invocation_id {
        Some(id) if id.len() > MAX_ID_LEN => {
            return Err(ProtocolError::InvalidField(
                "invocationId",
                "a string of at most 128 bytes",
            ));
        }
        Some(id) => {
            let mut text = String::with_capacity(id.len() + 2);
            push_json_string(&mut text, id);
            Some(text.into_boxed_str())
        }
        None => None,
    };
    check_method(method)?;
    if !arguments.starts_with('[') {
        return Err(ProtocolError::InvalidField("arguments", "an array"));
    }
    calls.admit()?;
    let call = Call {
        id,
        method,
        data: &compact(arguments),
        reply: Reply::SignalR,
    };
    shared.invoke(peer, call)
}

async fn write_loop(
    sink: &mut Sink,
    shared: &Relay,
    peer: &Peer,
    start: Instant,
    heard: &AtomicU64,
) -> Stop {
    let keepalive = shared.config.signalr_keepalive;
    let client_timeout = shared.config.signalr_client_timeout;
    let mut ping = tokio::time::interval_at(start + keepalive, keepalive);
    let silent_until =
        || start + Duration::from_millis(heard.load(Ordering::Relaxed)) + client_timeout;
    let timed_out = || Stop {
        end: End::Close {
            close: CLIENT_TIMEOUT,
            flush: false,
        },
        farewell: Some(protocol::close_message(
            Some("Server timeout elapsed without receiving a message from the client."),
            false,
        )),
    };
    loop {
        if !peer.outbox.is_empty() {
            match timeout(client_timeout, write_batch(sink, peer)).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return Stop::gone(),
                Err(_) => return timed_out(),
            }
            continue;
        }
        tokio::select! {
            _ = peer.outbox.ready() => {}
            _ = ping.tick() => {
                let sent = timeout(
                    client_timeout,
                    sink.send(Message::Text(Utf8Bytes::from_static(PING))),
                )
                .await;
                if !matches!(sent, Ok(Ok(()))) {
                    return Stop::gone();
                }
            }
            () = sleep_until(silent_until()) => {
                if Instant::now() >= silent_until() {
                    return timed_out();
                }
            }
        }
    }
}
