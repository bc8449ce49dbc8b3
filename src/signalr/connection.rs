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
use crate::connection::{
    End, Sink, Socket, Stream, finish, flush, held_back, read_error, wait_for_permit, write_batch,
};
use crate::invoke::{MAX_ID_LEN, Reply, check_method, refusal_error};
use crate::kinds::Frame;
use crate::kinds::HubKind;
use crate::peer::{Close, Peer};
use crate::protocol::{ProtocolError, compact, push_json_string};
use crate::relay::{Call, Relay};
use crate::session::{Flow, Session};

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
            // A connection authenticated by a token lasts as long as the token (SPEC §11,
            // as `Session::remember_token` for jssocket connections).
            let expires = identity
                .as_ref()
                .and_then(|identity| identity.expires_in())
                .map(|left| Instant::now() + left);
            // A valid token acknowledges it at once: its user's group, roles and groups
            // for publish filters (SPEC §11).
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
                // Its limits on what it sends (bad input, error replies it does not read, the
                // overload limiter) are a jssocket client's, kept by the same `Session`.
                let mut session = Session::new(Arc::clone(&peer), Arc::clone(&shared), addr);
                shared.metrics.signalr_connections.inc();
                let io = (&mut sink, &mut stream, &mut records);
                let stop = connected(io, &mut session, early, expires).await;
                shared.metrics.signalr_connections.dec();
                stop
            }
        }
    };
    peer.close(match stop.end {
        End::Gone => Close::NORMAL,
        End::Close { close, .. } | End::Reject(close) => close,
    });
    shared.hub.remove(&peer);
    // Its calls go with it, as a jssocket caller's do: they must not wait for their
    // deadline, counting toward the node's bound on calls in flight.
    shared.invocations.forget(peer.id);
    let unsent = peer.outbox.close();
    if let End::Close { flush: true, .. } = stop.end {
        Box::pin(flush(&mut sink, unsent)).await;
    } else {
        drop(unsent);
    }
    if let Some(farewell) = stop.farewell {
        let said = timeout(
            FAREWELL_GRACE,
            sink.send(Message::Text(Utf8Bytes::from(farewell))),
        )
        .await;
        if matches!(said, Ok(Ok(()))) {
            shared.metrics.signalr_sent(HubKind::Close);
        }
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

/// After the handshake: reads and writes until something stops the connection, or until
/// `expires` (the token's end): then the client is told `token expired` without leave to
/// reconnect (the same token would be refused) and closed with [`Close::TOKEN_EXPIRED`].
async fn connected(
    (sink, stream, records): (&mut Sink, &mut Stream, &mut Records),
    session: &mut Session,
    early: Vec<String>,
    expires: Option<Instant>,
) -> Stop {
    let shared = Arc::clone(&session.shared);
    let peer = Arc::clone(&session.peer);
    let start = Instant::now();
    // Milliseconds from `start` to the last message heard from the client.
    let heard = AtomicU64::new(0);
    for record in &early {
        if let Err(stop) = handle(record, session) {
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
        () = expiry(expires) => Stop {
            end: End::Close { close: Close::TOKEN_EXPIRED, flush: true },
            farewell: Some(protocol::close_message(Some(Close::TOKEN_EXPIRED.reason), false)),
        },
        stop = read_loop(stream, records, session, start, &heard) => stop,
        stop = write_loop(sink, &shared, &peer, start, &heard) => stop,
    }
}

/// Resolves at `deadline`; never without one.
async fn expiry(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

async fn read_loop(
    stream: &mut Stream,
    records: &mut Records,
    session: &mut Session,
    start: Instant,
    heard: &AtomicU64,
) -> Stop {
    let shared = Arc::clone(&session.shared);
    let peer = Arc::clone(&session.peer);
    let max = shared.config.max_message_size;
    let hear = || heard.store(start.elapsed().as_millis() as u64, Ordering::Relaxed);
    loop {
        // Under overload, an unacknowledged client's next frame waits its turn before it is
        // even read, as a jssocket client's (`crate::connection`); the wait is not silence.
        if held_back(session) {
            let permit = wait_for_permit(session);
            tokio::pin!(permit);
            loop {
                hear();
                tokio::select! {
                    () = &mut permit => break,
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        }
        let next = next_text(stream, &shared, &peer).await;
        // Any frame, control frames included, says the client is alive.
        hear();
        let text = match next {
            Err(stop) => return stop,
            Ok(None) => continue,
            Ok(Some(text)) => text,
        };
        match records.feed(&text, max, |record| handle(record, session)) {
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
///
/// A refused call (limits, a bad method, no server) is answered with a completion error when
/// the caller waits for one, and counts as bad input under `--bad-input-limit`; a client that
/// does not read those answers is closed (`Session::reject_with`): a flood of invocations
/// costs what a jssocket client's flood of bad events costs, no more.
fn handle(record: &str, session: &mut Session) -> Result<(), Stop> {
    let message = HubMessage::parse(record);
    let metrics = &session.shared.metrics;
    let kind = match &message {
        Ok(HubMessage::Invocation { .. }) => HubKind::Invocation,
        Ok(HubMessage::Ping) => HubKind::Ping,
        Ok(HubMessage::Close) => HubKind::Close,
        Ok(HubMessage::Other) | Err(_) => HubKind::Other,
    };
    metrics.signalr_received(kind, record.len());
    match message {
        Err(error) => Err(Stop::bad(&error)),
        Ok(HubMessage::Invocation {
            target,
            invocation_id: Some(id),
            stream: true,
            ..
        }) => {
            let error = ProtocolError::UnknownMethod(target.chars().take(128).collect());
            let text = format!("Streaming hub method '{target}': this relay offers no streams");
            refuse(session, &error, &id, &text)
        }
        Ok(HubMessage::Invocation {
            target,
            invocation_id,
            arguments,
            stream: false,
        }) => {
            let id = invocation_id.as_deref();
            match (call(session, &target, id, arguments), id) {
                (Err(error), Some(id)) => refuse(session, &error, id, &refusal_error(&error)),
                _ => Ok(()),
            }
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

/// Answers invocation `id` with a completion carrying `text`, as bad input (see [`handle`]).
fn refuse(session: &mut Session, error: &ProtocolError, id: &str, text: &str) -> Result<(), Stop> {
    let reply = || Utf8Bytes::from(protocol::completion_error(id, text));
    match session.reject_with(error, None, reply, Frame::Error) {
        Flow::Continue => Ok(()),
        Flow::Close(close) => Err(Stop {
            // One closed for not reading its replies would not read these either.
            end: End::Close {
                close,
                flush: close != Close::NOT_READING,
            },
            farewell: (close != Close::NOT_READING)
                .then(|| protocol::close_message(Some(close.reason), false)),
        }),
    }
}

/// Forwards one invocation as a call; a refusal is returned for the caller to complete with.
fn call(
    session: &mut Session,
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
    session.invokes.admit()?;
    let call = Call {
        id,
        method,
        data: &compact(arguments),
        reply: Reply::SignalR,
    };
    session.shared.invoke(&session.peer, call)
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
            let written = |frame: &Utf8Bytes| shared.metrics.signalr_sent(HubKind::of_sent(frame));
            match timeout(client_timeout, write_batch(sink, peer, written)).await {
                Ok(Ok(_)) => {}
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
                shared.metrics.signalr_sent(HubKind::Ping);
            }
            () = sleep_until(silent_until()) => {
                if Instant::now() >= silent_until() {
                    return timed_out();
                }
            }
        }
    }
}
