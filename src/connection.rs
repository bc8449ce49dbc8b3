//! One WebSocket connection: a single task running a reader and a writer side by side.
//!
//! The reader parses each inbound message and applies it (`events::handle`); the writer drains
//! the connection's bounded outbound queue into the socket and sends keepalive pings. They run
//! as two futures of one task (`select!`), so a connection costs one task, and a peer that
//! stops reading blocks only its own writer: senders never wait for it, and when its queue
//! overflows the hub asks it to close.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Instant;

use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::{Duration, timeout};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::error::ProtocolError;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Bytes, Error as WsError, Message, Utf8Bytes};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, debug_span, info};

use crate::events;
use crate::memory::Counted;
use crate::outbox::{self, Taken};
use crate::peer::{Close, Peer};
use crate::relay::Relay;
use crate::session::{Flow, Session};

/// The stream counts what it reads toward the memory budget (see `memory::Counted`).
pub type Socket = WebSocketStream<Counted>;
pub(crate) type Sink = SplitSink<Socket, Message>;
pub(crate) type Stream = SplitStream<Socket>;

/// How long the closing handshake may take before the socket is simply dropped.
const CLOSE_GRACE: Duration = Duration::from_secs(2);
/// How long a peer that stopped answering gets to take our close frame before a reset.
const ABORT_GRACE: Duration = Duration::from_millis(100);
/// How long a slow consumer's socket is kept after its close frame, so a reader that wakes up
/// still finds out why it was closed (SPEC §6) instead of meeting a reset.
const LINGER: Duration = Duration::from_secs(5);
/// Most slow consumers lingering at once in this process (one process serves one server).
/// Each holds a descriptor and a full kernel send buffer, so past this many a stalled reader
/// is reset at once, as a dead peer is.
const MAX_LINGERING: usize = 1024;
/// Most frames taken from the queue for one vectored write.
const WRITE_BATCH: usize = 64;
/// Most bytes read and thrown away after closing for what the peer sent, so the peer sees
/// our close frame instead of a reset.
const DRAIN_LIMIT: usize = 64 * 1024 * 1024;

/// How the connection ended, and so what is left to do with the socket.
#[derive(Debug, Clone, Copy)]
pub(crate) enum End {
    /// The peer closed, or the socket failed: nothing more to send.
    Gone,
    /// We close: flush what is queued (if `flush`), then send the close frame.
    Close { close: Close, flush: bool },
    /// We close because of what the peer sent (RFC 6455 "fail the connection"): tungstenite
    /// reads nothing after an error, so the rest is drained, not parsed.
    Reject(Close),
}

/// What the upgrade request told us about the peer.
pub struct PeerInfo {
    pub addr: SocketAddr,
    /// The `auth` header's password, if any.
    pub password: Option<String>,
    /// Let in through the descriptor reserve, which is kept for admins (see
    /// `server::reserve_admits`): unless the password verifies, it is closed at once rather
    /// than kept as a client in a place meant for a backend.
    pub admin_only: bool,
    /// Called once the password verifies (the place it held under the reserve's
    /// per-address cap is given back, see `server::RESERVE_PER_ADDRESS`).
    pub on_admin: Option<Box<dyn FnOnce() + Send>>,
    /// Who the upgrade's valid token (`access_token` or `Authorization: Bearer`) says the
    /// peer is: its `client_connect` is then acknowledged at once (SPEC §11).
    pub identity: Option<crate::jwt::Identity>,
}

/// Serves one upgraded WebSocket until it closes, then removes it from the hub. `peer` is
/// made with the socket, whose reads are charged to it; `held` (its places under the
/// server's limits) is kept until the connection ends.
///
/// Runs in the upgrade's task until the connection is established (its `auth:` password
/// judged, when it gave one), then hands the connection to a task of its own ([`run`]): that
/// task holds only what an established connection needs, not the upgrade's state or room
/// for the password's wait, which is most of a task's size. Every idle connection pays for
/// its task's whole size (see BENCHMARKS.md, "Memory per connection").
pub async fn serve<H: Send + 'static>(
    socket: Socket,
    shared: Arc<Relay>,
    info: PeerInfo,
    peer: Arc<Peer>,
    held: H,
) {
    // A debug-level span: at the default level it is never built, which saves ~0.4 KiB per
    // connection; the few info/warn events of a connection name `conn_id` themselves.
    let span = debug_span!("conn", conn_id = %peer.target);
    let established = establish(socket, shared, info, peer)
        .instrument(span.clone())
        .await;
    let Some((socket, session, early)) = established else {
        return;
    };
    let (sink, stream) = socket.split();
    tokio::spawn(run(sink, stream, session, early, held).instrument(span));
}

/// The connection up to the point where it is served: its session, and when it gave an admin
/// password, the verdict (what it sent meanwhile waits in [`Early`]). `None` when the peer
/// left meanwhile.
async fn establish(
    mut socket: Socket,
    shared: Arc<Relay>,
    info: PeerInfo,
    peer: Arc<Peer>,
) -> Option<(Socket, Session, Early)> {
    debug!(addr = %info.addr, "connected");
    let mut session = Session::new(Arc::clone(&peer), Arc::clone(&shared), info.addr);
    if let Some(identity) = info.identity {
        session.remember_token(identity);
    }
    // Messages read while the password waited, handled first by the reader.
    let mut early = Early::default();
    if let Some(password) = info.password {
        // Boxed: bcrypt's future is large and needed once, not for the connection's life.
        // While it waits this connection holds a --max-connections slot; the authenticator's
        // bounded queue (auth::MAX_QUEUED) bounds how many can. Meanwhile the socket is read:
        // a peer that leaves (a close frame, or hanging up) withdraws its verification
        // (dropping the future), so bcrypt never runs for it; its first messages (Jaseci sends
        // `server_connect` at once) wait for the verdict in `early`. Once that is full, the
        // socket is only watched for the peer hanging up.
        // At shutdown the wait is dropped too; the select in `run` then closes with 1001.
        let mut check = Box::pin(session.check_password(&password));
        loop {
            if early.has_room() {
                tokio::select! {
                    biased;
                    () = &mut check => break,
                    () = shared.shutdown.cancelled() => break,
                    next = socket.next() => match next {
                        Some(Ok(Message::Close(_))) | None => {
                            debug!("left while its admin password waited for verification");
                            return None;
                        }
                        // Answered by tungstenite; nothing to keep.
                        Some(Ok(Message::Ping(_) | Message::Pong(_))) => early.control_frame(),
                        Some(next) => early.push(next),
                    },
                }
            } else {
                tokio::select! {
                    biased;
                    () = &mut check => break,
                    () = shared.shutdown.cancelled() => break,
                    () = peer_gone(socket.get_ref()) => {
                        debug!("left while its admin password waited for verification");
                        return None;
                    }
                }
            }
        }
    }
    if info.admin_only && !session.admin {
        peer.close(Close::NOT_ADMIN);
    }
    if session.admin
        && let Some(on_admin) = info.on_admin
    {
        on_admin();
    }
    Some((socket, session, early))
}

/// An established connection's own task: reads and writes until it ends, then leaves the
/// hub and closes the socket. Its arguments are most of its size; the rare and large steps
/// (closing, flushing) are boxed.
// Not an `async fn`: its arguments would be stored twice in its future (once as given, once
// moved into its body); an `async move` block uses them in place.
#[allow(clippy::manual_async_fn)] // on purpose: see above
fn run<H: Send>(
    mut sink: Sink,
    mut stream: Stream,
    mut session: Session,
    early: Early,
    held: H,
) -> impl Future<Output = ()> + Send {
    async move {
        let peer = Arc::clone(&session.peer);
        let shared = Arc::clone(&session.shared);
        // Set by the reader on every inbound frame, cleared by the writer when it pings.
        let alive = AtomicBool::new(true);
        // Set while the reader waits for the overload limiter: it is not the peer that is silent.
        let waiting = AtomicBool::new(false);
        let end = tokio::select! {
            biased;
            _ = shared.shutdown.cancelled() => End::Close { close: Close::SHUTDOWN, flush: false },
            // Closed for its unfinished message: the rest of it is drained, not parsed.
            close = peer.closed() => if close == Close::MEMORY_INBOUND {
                End::Reject(close)
            } else {
                End::Close { close, flush: close != Close::SLOW_CONSUMER }
            },
            end = read_loop(&mut stream, &mut session, &alive, &waiting, early) => end,
            end = write_loop(&mut sink, &peer, &shared, &alive, &waiting) => end,
        };
        // Marked closing whatever the cause, so what is read from now on (a drain into a
        // scratch buffer) is not charged to the memory budget.
        peer.close(match end {
            End::Gone => Close::NORMAL,
            End::Close { close, .. } | End::Reject(close) => close,
        });
        // Out of every table first, so nothing more is queued for it.
        shared.hub.remove(&peer);
        shared.invocations.forget(peer.id);
        let mut unsent = peer.outbox.close();
        if let End::Close { close, .. } = end
            && (close == Close::SLOW_CONSUMER || close == Close::PING_TIMEOUT)
        {
            // A peer that isn't reading: built frames not begun are dropped like the queue's,
            // a frame half written is completed first (the close frame follows it).
            peer.unwritten.drop_unstarted();
        }
        if let End::Close { flush: true, .. } = end {
            unsent = Box::pin(flush(&mut sink, unsent)).await;
        }
        shared.hub.pool.reforward(outbox::items(unsent));
        if session.in_pool {
            // The other nodes must stop forwarding to this server now, not at the next heartbeat.
            shared.servers_changed();
        }
        // Counted before `finish`, which may linger for seconds on a slow consumer.
        match end {
            End::Close { close, .. } if close == Close::SLOW_CONSUMER => {
                shared.metrics.slow_consumer_closes.inc();
                info!(conn_id = %peer.target, "closed: slow consumer (outbound queue overflowed)");
            }
            _ => debug!(?end, "disconnected"),
        }
        Box::pin(finish(sink, stream, end, &shared.shutdown)).await;
        drop(held);
    }
}

/// Messages read while the connection's previous business (its password's verification)
/// was still pending, in order. Bounded in count and bytes: the watch for a peer leaving
/// reads ahead only this far.
#[derive(Default)]
struct Early {
    messages: std::collections::VecDeque<Result<Message, WsError>>,
    bytes: usize,
    /// Pings and pongs read meanwhile: answered and dropped, but their few bytes stay charged
    /// as an unfinished message until the next message, so they are bounded too.
    control: usize,
}

impl Early {
    const MAX_MESSAGES: usize = 8;
    const MAX_BYTES: usize = 64 * 1024;
    const MAX_CONTROL: usize = 16;

    fn has_room(&self) -> bool {
        self.messages.len() < Early::MAX_MESSAGES
            && self.bytes < Early::MAX_BYTES
            && self.control < Early::MAX_CONTROL
    }

    fn control_frame(&mut self) {
        self.control += 1;
    }

    fn push(&mut self, next: Result<Message, WsError>) {
        if let Ok(message) = &next {
            self.bytes += message.len();
        }
        self.messages.push_back(next);
    }

    fn pop(&mut self) -> Option<Result<Message, WsError>> {
        let next = self.messages.pop_front()?;
        if let Ok(message) = &next {
            self.bytes -= message.len();
        }
        Some(next)
    }
}

/// Resolves when the peer has hung up or the socket failed, without consuming what it sent
/// (the reader gets that later): for when reading ahead has stopped.
async fn peer_gone(tcp: &tokio::net::TcpStream) {
    let mut byte = [0u8; 1];
    loop {
        match tcp.ready(tokio::io::Interest::READABLE).await {
            Ok(ready) if ready.is_read_closed() => return,
            Ok(_) => {}
            Err(_) => return,
        }
        match tcp.peek(&mut byte).await {
            Ok(0) | Err(_) => return,
            // Frames are waiting, so the socket stays readable: look again a little later
            // rather than spin (`is_read_closed` still tells a hang-up behind the data).
            Ok(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// Waits for the overload limiter's permit, or until the connection no longer needs one (a
/// backend acknowledged it meanwhile, or the limiter let go).
pub(crate) async fn wait_for_permit(session: &Session) {
    let admit = session.shared.overload.admit();
    tokio::pin!(admit);
    loop {
        tokio::select! {
            () = &mut admit => return,
            () = tokio::time::sleep(Duration::from_millis(100)) => {
                if !held_back(session) {
                    return;
                }
            }
        }
    }
}

/// Whether this connection's messages wait for the overload limiter now: only while it is
/// engaged, and only for connections nobody vouched for (not an admin, not acknowledged).
pub(crate) fn held_back(session: &Session) -> bool {
    session.shared.overload.engaged() && !session.admin && !session.peer.is_acknowledged()
}

// Not an `async fn`, for the reason given at [`run`].
#[allow(clippy::manual_async_fn)] // on purpose: see above
fn read_loop<'a>(
    stream: &'a mut Stream,
    session: &'a mut Session,
    alive: &'a AtomicBool,
    waiting: &'a AtomicBool,
    // What the peer sent while something was still being handled (its `auth:` header's
    // password, or a `server_connect` password waiting for bcrypt): handled next, in order.
    mut early: Early,
) -> impl Future<Output = End> + 'a {
    async move {
        // A permit of the overload limiter, taken for the next data message; control frames
        // read meanwhile don't use it up.
        let mut admitted = false;
        loop {
            // In a block of its own: what was read is not kept beside the handling below.
            let payload: Bytes = {
                let next = match early.pop() {
                    Some(next) => Some(next),
                    None => {
                        // Under overload, a client's next message waits its turn before it is even
                        // read: reading it is much of its cost, and meanwhile its bytes wait in the
                        // kernel, which pushes back on the peer. An admin's never waits.
                        if !admitted && held_back(session) {
                            // Meanwhile the keepalive must not take the wait for a dead peer.
                            waiting.store(true, Ordering::Relaxed);
                            // Boxed: rare (only under overload), and as large as the rest of the
                            // reader, which every idle connection would otherwise carry.
                            Box::pin(wait_for_permit(session)).await;
                            waiting.store(false, Ordering::Relaxed);
                            alive.store(true, Ordering::Relaxed);
                            admitted = true;
                        }
                        // A connection authenticated by a token lasts as long as the token.
                        match session.token_deadline() {
                            None => stream.next().await,
                            Some(deadline) => tokio::select! {
                                next = stream.next() => next,
                                () = tokio::time::sleep_until(deadline) => {
                                    return End::Close { close: Close::TOKEN_EXPIRED, flush: true };
                                }
                            },
                        }
                    }
                };
                let message = match next {
                    None => return End::Gone,
                    Some(Ok(message)) => message,
                    Some(Err(e)) => return read_error(e),
                };
                let memory = &session.shared.memory;
                match &message {
                    Message::Text(text) => {
                        memory.message_complete(&session.peer);
                        memory.retain(&session.peer, text.len());
                    }
                    Message::Binary(bytes) => {
                        memory.message_complete(&session.peer);
                        memory.retain(&session.peer, bytes.len());
                    }
                    Message::Close(_) => memory.message_complete(&session.peer),
                    // May come between a message's fragments: the message is still unfinished.
                    Message::Ping(payload) | Message::Pong(payload) => {
                        memory.control_frame(&session.peer, payload.len());
                    }
                    Message::Frame(_) => {}
                }
                alive.store(true, Ordering::Relaxed);
                match message {
                    Message::Text(text) => text.into(),
                    Message::Binary(bytes) => bytes,
                    Message::Close(_) => return End::Gone,
                    // A ping costs the peer a permit too (we answer it); a pong is an answer to us.
                    Message::Ping(_) => {
                        admitted = false;
                        continue;
                    }
                    Message::Pong(_) | Message::Frame(_) => continue,
                }
            };
            // This data message used the permit (if one was taken).
            admitted = false;
            // Most events are handled at once. One that waits (a password verification) keeps
            // watching the socket: a peer that leaves meanwhile withdraws its request, so bcrypt
            // never runs for a connection that is gone. One message read meanwhile waits its turn
            // (`early`); once that is full, reading stops, so the peer's bytes wait in the kernel.
            let handling = events::handle(session, &payload);
            tokio::pin!(handling);
            let flow = loop {
                tokio::select! {
                    biased;
                    flow = &mut handling => break flow,
                    next = stream.next(), if early.has_room() => match next {
                        // Leaving, politely or not: what it asked for is dropped with it.
                        Some(Ok(Message::Close(_))) | None => return End::Gone,
                        // Control frames are answered as they come and keep the watch going
                        // (their few bytes stay charged as inbound until the next message).
                        Some(Ok(Message::Ping(_) | Message::Pong(_))) => {
                            alive.store(true, Ordering::Relaxed);
                            early.control_frame();
                        }
                        Some(Err(e)) => return read_error(e),
                        Some(next) => early.push(next),
                    },
                }
            };
            if let Flow::Close(close) = flow {
                // A peer closed for not reading its replies would not read these either.
                let flush = close != Close::NOT_READING;
                return End::Close { close, flush };
            }
        }
    }
}

/// How a read error ends the connection: with the close code RFC 6455 names for what the
/// peer sent, or quietly when the socket itself is gone.
pub(crate) fn read_error(e: WsError) -> End {
    match e {
        WsError::Utf8(_) => End::Reject(Close::INVALID_UTF8),
        WsError::Capacity(_) => End::Reject(Close::TOO_BIG),
        // The peer hung up without a close frame: nobody is left to tell.
        WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake) => End::Gone,
        WsError::Protocol(e) => End::Reject(protocol_close(&e)),
        e => {
            debug!(error = %e, "read failed");
            End::Gone
        }
    }
}

/// Close 1002 with a reason naming the broken rule, so whoever debugs the peer knows.
fn protocol_close(e: &ProtocolError) -> Close {
    let reason = match e {
        ProtocolError::NonZeroReservedBits => "reserved bits set without an extension",
        ProtocolError::UnknownControlFrameType(_)
        | ProtocolError::UnknownDataFrameType(_)
        | ProtocolError::InvalidOpcode(_) => "reserved opcode",
        ProtocolError::FragmentedControlFrame => "fragmented control frame",
        ProtocolError::ControlFrameTooBig => "control frame over 125 bytes",
        ProtocolError::UnexpectedContinueFrame => "continuation frame without a message",
        ProtocolError::ExpectedFragment(_) => "new message inside a fragmented one",
        ProtocolError::InvalidCloseSequence => "invalid close frame payload",
        ProtocolError::UnmaskedFrameFromClient => "unmasked frame from a client",
        _ => Close::PROTOCOL.reason,
    };
    Close {
        reason,
        ..Close::PROTOCOL
    }
}

async fn write_loop(
    sink: &mut Sink,
    peer: &Peer,
    shared: &Relay,
    alive: &AtomicBool,
    waiting: &AtomicBool,
) -> End {
    let config = &shared.config;
    // One timer for the keepalive, held in the task (an `Interval` boxes its own, and a
    // second one for the answer's deadline would double it): until the next ping, then,
    // once it is sent, until the answer's deadline.
    let timer = tokio::time::sleep(config.ping_interval);
    tokio::pin!(timer);
    let mut pinged = false;
    // A peer that accepts no bytes for this long is as dead as one that doesn't answer pings
    // (which can't be sent while a write is stuck).
    let stuck = config.ping_interval + config.ping_timeout;
    // Whether the queue may hold frames. Once a batch took fewer than it could, the queue was
    // empty: the next push wakes `ready` (see `Outbox::push`), so no look is needed till then.
    let mut more = true;
    loop {
        if more {
            match timeout(stuck, write_batch(sink, peer, |_| {})).await {
                Ok(Ok(full)) => more = full,
                Ok(Err(_)) => return End::Gone,
                Err(_) => {
                    return End::Close {
                        close: Close::PING_TIMEOUT,
                        flush: false,
                    };
                }
            }
            continue;
        }
        tokio::select! {
            _ = peer.outbox.ready() => more = true,
            () = &mut timer => {
                let now = tokio::time::Instant::now();
                if pinged {
                    if !alive.load(Ordering::Relaxed) && !waiting.load(Ordering::Relaxed) {
                        return End::Close { close: Close::PING_TIMEOUT, flush: false };
                    }
                    pinged = false;
                    timer.as_mut().reset(now + config.ping_interval);
                } else {
                    alive.store(false, Ordering::Relaxed);
                    if sink.send(Message::Ping(Bytes::new())).await.is_err() {
                        return End::Gone;
                    }
                    pinged = true;
                    timer.as_mut().reset(tokio::time::Instant::now() + config.ping_timeout);
                }
            }
        }
    }
}

/// Writes up to a batch of queued frames in one vectored write (or as few as the socket takes),
/// built as WebSocket frames by [`crate::raw_write`], not fed through tungstenite one by one;
/// `written` sees each frame (a SignalR connection counts its hub messages by kind). The
/// frames stay counted (queue bytes and memory budget) until they are written, for as long
/// as the socket is stalled. Returns whether the batch was full (more may be queued);
/// otherwise the queue was empty when it was taken.
pub(crate) async fn write_batch(
    sink: &mut Sink,
    peer: &Peer,
    mut written: impl FnMut(&Utf8Bytes),
) -> Result<bool, WsError> {
    // tungstenite's own frames (a pong half written) go first: ours are added only when its
    // buffer is empty, so the two never interleave inside a frame. Cheap when it is.
    sink.flush().await?;
    // Bounded, so a busy connection still answers pings between batches. The frames stay
    // counted until the batch is dropped, after the write.
    let batch = peer.outbox.take_batch(WRITE_BATCH);
    if batch.is_empty() {
        return Ok(false);
    }
    // No await between the flush above and this: nothing of tungstenite's comes between.
    peer.unwritten.push_text(batch.frames());
    for frame in batch.frames() {
        written(frame);
    }
    // Writes ours, then flushes the socket (TLS: rustls's buffer).
    sink.flush().await?;
    Ok(batch.len() == WRITE_BATCH)
}

/// Writes the frames still queued when the connection decided to close (the answer to the
/// request that closed it, for instance); returns those it could not write. They stay
/// counted until written.
pub(crate) async fn flush<'a>(sink: &mut Sink, items: Vec<Taken<'a>>) -> Vec<Taken<'a>> {
    let deadline = Instant::now() + CLOSE_GRACE;
    let mut written = Vec::new();
    let mut items = items.into_iter();
    while let Some(item) = items.next() {
        // Checked per frame: a fast reader never makes `feed` wait, so a timeout on it alone
        // would not bound a long queue.
        let left = deadline.saturating_duration_since(Instant::now());
        let fed = !left.is_zero()
            && matches!(
                timeout(left, sink.feed(Message::Text(item.frame().clone()))).await,
                Ok(Ok(()))
            );
        if !fed {
            return std::iter::once(item).chain(items).collect();
        }
        written.push(item);
    }
    let _ = timeout(CLOSE_GRACE, sink.flush()).await;
    Vec::new()
}

/// Ends the WebSocket as RFC 6455 §7 asks: sends our close frame when we are the one
/// closing, and lets the server end TCP first, right after the closing handshake (§7.1.1).
pub(crate) async fn finish(
    mut sink: Sink,
    mut stream: Stream,
    end: End,
    shutdown: &CancellationToken,
) {
    let close = match end {
        End::Gone => {
            // Flushes tungstenite's answer to the peer's close frame, if it sent one.
            let _ = timeout(CLOSE_GRACE, sink.close()).await;
            return;
        }
        End::Close { close, .. } | End::Reject(close) => close,
    };
    let frame = CloseFrame {
        code: CloseCode::from(close.code),
        reason: close.reason.into(),
    };
    if close == Close::SLOW_CONSUMER {
        return linger(sink, stream, frame, shutdown).await;
    }
    if close == Close::PING_TIMEOUT {
        // The peer is dead: nobody will read a close frame.
        return abort(sink, stream, frame).await;
    }
    let _ = timeout(CLOSE_GRACE, sink.send(Message::Close(Some(frame)))).await;
    match end {
        End::Reject(_) => drain(sink, stream).await,
        _ => {
            // The peer can still be parsed: its answering close frame ends the stream.
            let _ = timeout(CLOSE_GRACE, async {
                while stream.next().await.is_some() {}
            })
            .await;
        }
    }
}

/// After failing the connection for what the peer sent: tungstenite reads nothing after an
/// error, so our FIN follows the close frame at once (the peer sees the server end TCP and
/// hangs up in turn, instead of both waiting for the other), and what still arrives is read
/// and thrown away, bounded, until the peer's FIN: closing with unread bytes would send a
/// reset, which can destroy our close frame before the peer reads it.
async fn drain(sink: Sink, stream: Stream) {
    let Ok(socket) = sink.reunite(stream) else {
        return;
    };
    // Only the TCP stream is kept: tungstenite's buffers, with the unfinished message that
    // may have closed this connection for memory, go now, not after the drain.
    let mut io = socket.into_inner();
    io.buffers_dropped();
    let _ = timeout(CLOSE_GRACE, io.shutdown()).await;
    let mut buf = vec![0u8; 16 * 1024];
    let mut drained = 0usize;
    let _ = timeout(CLOSE_GRACE, async {
        while drained < DRAIN_LIMIT {
            match io.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => drained += n,
            }
        }
    })
    .await;
}

/// Closes a slow consumer so that it learns why. Its unsent frames were dropped with its
/// queue (and the built frames not begun, see `run`); the close frame goes after what the
/// kernel already holds and a frame half written (completed first, never cut), and the socket is
/// kept up to [`LINGER`] so a reader that wakes up reads its way to the close frame and
/// answers. No answer by then, too many lingering already, or shutdown: a reset, as for a
/// dead peer.
async fn linger(
    mut sink: Sink,
    mut stream: Stream,
    frame: CloseFrame,
    shutdown: &CancellationToken,
) {
    let Some(_lingering) = Lingering::enter() else {
        return abort(sink, stream, frame).await;
    };
    let handshake = async {
        if sink.send(Message::Close(Some(frame))).await.is_err() {
            return false;
        }
        // Whatever the peer still sends is read and dropped; its close frame (or hanging
        // up) ends the stream.
        while let Some(Ok(_)) = stream.next().await {}
        true
    };
    let answered = tokio::select! {
        _ = shutdown.cancelled() => false,
        done = timeout(LINGER, handshake) => done.unwrap_or(false),
    };
    if !answered {
        reset(sink, stream);
    }
}

/// Offers the close frame briefly to a peer that isn't taking bytes, then resets.
async fn abort(mut sink: Sink, stream: Stream, frame: CloseFrame) {
    let _ = timeout(ABORT_GRACE, sink.send(Message::Close(Some(frame)))).await;
    reset(sink, stream);
}

/// Drops the connection with a TCP reset, so the kernel frees its send buffer now rather than
/// retrying to deliver megabytes to a peer that doesn't read, for minutes.
fn reset(sink: Sink, stream: Stream) {
    if let Ok(socket) = sink.reunite(stream) {
        let _ = socket.get_ref().set_zero_linger();
    }
}

/// Slow consumers lingering right now, across the process.
static LINGERING: AtomicUsize = AtomicUsize::new(0);

/// One of the [`MAX_LINGERING`] places for a lingering slow consumer; given back on drop.
struct Lingering;

impl Lingering {
    fn enter() -> Option<Lingering> {
        LINGERING
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < MAX_LINGERING).then_some(n + 1)
            })
            .ok()
            .map(|_| Lingering)
    }
}

impl Drop for Lingering {
    fn drop(&mut self) {
        LINGERING.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The size of the future `f` returns, without calling it.
    fn future_size<A, B, C, D, F: Future>(_: impl FnOnce(A, B, C, D) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    /// Every idle connection pays for its task's whole future, whatever state it is in, so
    /// a large future anywhere in the read or write path (an event's, a wait's) costs memory
    /// for every connection. Measured: 1,480 bytes (issue 16; 6,176 before). The bound leaves
    /// room for small changes; going past it means boxing the new large state (see
    /// `events::handle`).
    #[test]
    fn an_established_connection_task_stays_small() {
        let run = future_size(|a: Sink, b: Stream, c: Session, d: Early| run(a, b, c, d, ()));
        let bound = 2 * 1024;
        assert!(
            run <= bound,
            "connection task future: {run} bytes, bound {bound}"
        );
        let handle = future_size(|a: &mut Session, b: &[u8], _: (), _: ()| events::handle(a, b));
        assert!(handle <= 512, "events::handle future: {handle} bytes");
    }
}
