//! The listener: accepts TCP connections, serves HTTP on them (`/healthz`, and a WebSocket
//! upgrade on every other path), spawns one task per WebSocket, and shuts everything down
//! in bounded time.
//!
//! The accept loop is ours rather than `axum::serve` so that the HTTP layer's limits (request
//! head size, handshake timeout) are set here and the shutdown can wait for every WebSocket
//! task to send its close frame.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tower::ServiceExt;
use tracing::{debug, error, info, warn};

use crate::api;
use crate::config::{Config, Summary};
use crate::connection::{self, PeerInfo};
use crate::console;
use crate::memory::{self, Counted};
use crate::metrics::Format;
use crate::overload;
use crate::peer::{Peer, Wire};
use crate::relay::Relay;
use crate::signalr;
use crate::tls::{self, MaybeTls};

/// Read buffer of a client's WebSocket, and the most it reads at once. A client's messages
/// are small (a token, a notify: one read each); larger ones grow the buffer as needed,
/// read this much at a time. It is memory every idle connection keeps (tungstenite fills
/// all of it), so it is small: 1 KiB made a fifth of an idle connection's cost.
const CLIENT_READ_BUFFER: usize = 256;

/// Read buffer of an upgrade with an admin password: a backend sends most of the traffic,
/// in bursts, and there are few of them.
const ADMIN_READ_BUFFER: usize = 1024;

/// tungstenite gathers the frames it writes (pings, pongs, close frames, what is queued when a
/// connection closes) up to this many bytes before a write to the socket; queued frames go
/// around it (`raw_write`). A flush writes whatever is gathered.
const WRITE_BUFFER: usize = 4 * 1024;

/// File descriptors kept out of every TCP budget: the listener, log files, Redis, the
/// runtime's own. Without them a full server could not even open its Redis reconnection.
const FD_HEADROOM: u64 = 32;

/// The least number of connections held back, beyond `--max-tcp-connections`, for health
/// checks and admins.
const MIN_RESERVE: usize = 64;

/// A connection admitted into the reserve gets this long (at most) to send its one request:
/// the reserve is small, so a silent peer must not keep its place. A health check or an
/// upgrade sends its head with the connection, so a second is plenty.
const RESERVE_HEADER_TIMEOUT: Duration = Duration::from_secs(1);

/// Places in the reserve one address (an IPv6 /64) may hold until it proves to be an admin.
/// Without a cap, one address opening a few dozen silent connections a second keeps the whole
/// reserve full, and health checks and admins from elsewhere are dropped at accept.
const RESERVE_PER_ADDRESS: usize = 4;

/// Idle keep-alive HTTP connections are shed at most this often. Every connection entering
/// the reserve asks for it; each shedding wakes every HTTP connection's task, so a stream of
/// newcomers must not turn into a stream of such wake-ups.
const SHED_EVERY: Duration = Duration::from_millis(500);

/// WebSocket upgrades carrying an `auth:` header may exceed `--max-connections` by this many,
/// so a backend still gets in when clients fill the server. Each is closed (1008 "not an
/// admin") unless its password verifies, so a client cannot keep one.
const ADMIN_CONNECTIONS: usize = 64;

/// Of the [`ADMIN_CONNECTIONS`] places, how many one address (an IPv6 /64) may hold until
/// it proves to be an admin. Without a cap, one address's upgrades with garbage passwords
/// hold every place while bcrypt judges them, and the backend's upgrade is refused 503
/// before its password is even queued.
const ADMIN_PER_ADDRESS: usize = 4;

/// The listener's own bookkeeping, kept in the [`Relay`] so connection tasks can release
/// their places: open connections of each kind and the reserve's per-address shares.
pub(crate) struct Gate {
    /// Open WebSocket connections, for `--max-connections`.
    connections: AtomicUsize,
    /// Open TCP connections of every kind, for `--max-tcp-connections`.
    tcp_connections: AtomicUsize,
    tcp_limits: TcpLimits,
    /// Places in the TCP reserve held per address (see [`RESERVE_PER_ADDRESS`]); at most as
    /// many entries as the reserve has places.
    reserve_by_address: Mutex<HashMap<IpAddr, usize>>,
    /// Places above `--max-connections` held per address (see [`ADMIN_PER_ADDRESS`]); at
    /// most [`ADMIN_CONNECTIONS`] entries.
    admin_by_address: Mutex<HashMap<IpAddr, usize>>,
    /// Notified to close idle keep-alive HTTP connections, when the TCP limit is reached.
    shed_idle: Notify,
    /// When idle connections were last shed (see [`SHED_EVERY`]).
    shed_at: Mutex<Option<Instant>>,
    /// The shutdown signal came: `/readyz` answers 503 and upgrades are refused (see
    /// [`drain`]). Set once, by `serve`.
    draining: AtomicBool,
}

impl Gate {
    pub(crate) fn new(config: &Config) -> Gate {
        Gate {
            connections: AtomicUsize::new(0),
            tcp_connections: AtomicUsize::new(0),
            tcp_limits: TcpLimits::new(config.max_tcp_connections),
            reserve_by_address: Mutex::new(HashMap::new()),
            admin_by_address: Mutex::new(HashMap::new()),
            shed_idle: Notify::new(),
            shed_at: Mutex::new(None),
            draining: AtomicBool::new(false),
        }
    }
}

/// Serves on `listener` until `shutdown` resolves, drains for `--drain-delay` (see
/// [`drain`]), then closes every connection with 1001 and returns (within
/// `--shutdown-timeout`): at most drain delay + shutdown timeout after the signal.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    serve(listener, Relay::new(config), shutdown).await
}

/// As [`run`], for a relay already made: one on a backplane of the caller's choice (tests
/// put several nodes in one process on one [`crate::backplane::Loopback`]).
pub async fn serve(
    listener: TcpListener,
    relay: Relay,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    log_start(&relay.config, listener.local_addr()?);
    if relay.config.auth_is_default {
        warn!(
            "SOCKET_AUTH is not set: using the well-known default admin password 12345678. \
             Anyone who can reach this port can act as a backend. Set SOCKET_AUTH to the \
             output of `jssocket hash`."
        );
    }
    let shared = Arc::new(relay);
    info!(addr = %listener.local_addr()?, "listening");
    tokio::spawn(expire_pending(Arc::clone(&shared)));
    tokio::spawn(crate::invoke::sweep(Arc::clone(&shared)));
    tokio::spawn(memory::sweep(Arc::clone(&shared)));
    tokio::spawn(overload::monitor(Arc::clone(&shared)));
    Arc::clone(&shared.backplane).start(&shared);
    crate::history::start(&shared);
    if let Some(tls) = &shared.config.tls {
        info!("TLS on: cert={}", tls.cert_path().display());
        tokio::spawn(tls::watch(
            Arc::clone(tls),
            shared.metrics.tls.clone(),
            shared.shutdown.clone(),
        ));
    }
    let router = router(Arc::clone(&shared));
    let limits = shared.gate.tcp_limits;
    if let Some(configured) = limits.clamped_from {
        warn!(
            max_tcp_connections = configured,
            open_file_limit = limits.ceiling + FD_HEADROOM as usize,
            using = limits.limit,
            "--max-tcp-connections leaves no reserve for health checks and admins under the \
             open-file limit: lowered (raise the limit with `ulimit -n`)"
        );
    }
    info!(
        max_tcp_connections = limits.limit,
        reserve = limits.ceiling - limits.limit,
        "TCP connection limit"
    );

    let drained = drain(&shared, shutdown);
    tokio::pin!(drained);
    let mut accept_errors = ErrorLog::default();
    loop {
        tokio::select! {
            _ = &mut drained => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, addr)) => match TcpGuard::take(&shared, addr.ip()) {
                    Some(guard) => {
                        let guard = Arc::new(guard);
                        tokio::spawn(serve_http(stream, addr, guard, router.clone(), Arc::clone(&shared)));
                    }
                    // Past the reserve: closing at once frees the descriptor and tells the
                    // peer, where leaving it in the backlog would let it time out slowly.
                    None => drop(stream),
                },
                Err(e) => {
                    // Out of file descriptors, usually (the limits above keep a headroom, but
                    // other processes may share it): back off instead of spinning, and say
                    // so once in a while rather than ten times a second.
                    accept_errors.log(&e);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }

    info!("shutting down");
    drop(listener);
    shared.shutdown.cancel();
    shared.tracker.close();
    if tokio::time::timeout(shared.config.shutdown_timeout, shared.tracker.wait())
        .await
        .is_err()
    {
        warn!("shutdown timeout: some connections did not close in time");
    }
    Ok(())
}

/// Resolves `--drain-delay` after `shutdown`. Meanwhile the node is draining: `/readyz`
/// answers 503 `draining` and new WebSocket upgrades are refused, while HTTP (health checks,
/// metrics, the API) and open connections are served as before, so a load balancer that
/// polls `/readyz` stops sending clients here before their connections are closed.
async fn drain(shared: &Relay, shutdown: impl Future<Output = ()>) {
    shutdown.await;
    shared.gate.draining.store(true, Ordering::Release);
    let delay = shared.config.drain_delay;
    info!(
        drain_delay_seconds = delay.as_secs(),
        shutdown_timeout_seconds = shared.config.shutdown_timeout.as_secs(),
        "draining: /readyz answers 503 and new WebSocket connections are refused; open \
         connections close after the drain delay"
    );
    tokio::time::sleep(delay).await;
}

/// Why this node should get no new clients now, for `/readyz` and `jssocket_ready`; `None`
/// when ready.
fn not_ready(shared: &Relay) -> Option<String> {
    if shared.gate.draining.load(Ordering::Acquire) {
        return Some("draining".into());
    }
    shared.backplane.not_ready()
}

/// The HTTP routes, and the router every WebSocket upgrade goes to whatever its path (so
/// even `/healthz` or `/console` can be a client's WebSocket path, as SPEC §2 asks).
#[derive(Clone)]
struct Routers {
    http: Router,
    websocket: Router,
}

fn router(shared: Arc<Relay>) -> Routers {
    let mut http = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/api/{event}", post(api::handle).get(api::handle))
        .merge(console::router());
    if let Some(path) = &shared.config.signalr_path {
        http = http.route(
            &format!("{path}/negotiate"),
            post(signalr::negotiate).options(signalr::preflight),
        );
    }
    let http = http.fallback(upgrade).with_state(Arc::clone(&shared));
    let websocket = Router::new().fallback(upgrade).with_state(shared);
    Routers { http, websocket }
}

/// Serves HTTP/1.1 on one TCP connection, with upgrades.
///
/// Every request carries the connection's [`TcpGuard`], so a WebSocket task keeps the
/// connection counted after hyper has handed the socket over. A connection admitted into the
/// reserve serves one request, with a short head timeout, and only what the reserve is for.
///
/// When the TCP limit is reached the connection is closed if it idles between keep-alive
/// requests (see [`shed_idle`]): holding the limit must cost an attacker new connections, not
/// one cheap request every few seconds.
async fn serve_http(
    stream: TcpStream,
    addr: SocketAddr,
    tcp: Arc<TcpGuard>,
    routers: Routers,
    shared: Arc<Relay>,
) {
    let _ = stream.set_nodelay(true);
    let reserved = tcp.reserved;
    let Some(stream) = tls_handshake(stream, addr, reserved, &shared).await else {
        return;
    };
    // hyper's head timeout also runs while a keep-alive connection waits for its next
    // request, so it doubles as the idle timeout.
    let mut head_timeout = shared
        .config
        .handshake_timeout
        .min(shared.config.http_idle_timeout);
    if reserved {
        head_timeout = head_timeout.min(RESERVE_HEADER_TIMEOUT);
    }
    // Between keep-alive requests: a response was sent and no request has come since. Only
    // such a connection is shed; one that has not had its first request yet, or is being
    // answered, would get `Connection: close` added to its response, which breaks a 101.
    let idle = Arc::new(AtomicBool::new(false));
    let idle_in_service = Arc::clone(&idle);
    let service = hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
        idle_in_service.store(false, Ordering::Relaxed);
        let idle = Arc::clone(&idle_in_service);
        request.extensions_mut().insert(ConnectInfo(addr));
        request.extensions_mut().insert(Arc::clone(&tcp));
        let refused = reserved && !reserve_admits(&request);
        let router = if is_websocket_upgrade(request.headers()) {
            routers.websocket.clone()
        } else {
            routers.http.clone()
        };
        async move {
            let mut response = if refused {
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "503 Service Unavailable: too many open connections\n",
                )
                    .into_response()
            } else {
                router.oneshot(request.map(Body::new)).await.into_response()
            };
            // One request per place in the reserve. (Not hyper's `keep_alive(false)`: it
            // would turn a 101's `Connection: upgrade` into `close`.)
            if reserved && response.status() != StatusCode::SWITCHING_PROTOCOLS {
                response
                    .headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            if response.status() != StatusCode::SWITCHING_PROTOCOLS {
                idle.store(true, Ordering::Relaxed);
            }
            Ok::<_, Infallible>(response)
        }
    });
    let connection = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(head_timeout)
        .max_buf_size(shared.config.max_header_bytes)
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades();
    tokio::pin!(connection);
    let mut shedding = false;
    loop {
        tokio::select! {
            result = connection.as_mut() => {
                if let Err(e) = result {
                    debug!(%addr, error = %e, "HTTP connection ended");
                }
                return;
            }
            _ = shared.shutdown.cancelled() => return,
            () = shared.gate.shed_idle.notified(), if !shedding => {
                // hyper closes an idle connection at once (and would close a busy one after
                // its response).
                if idle.load(Ordering::Relaxed) {
                    connection.as_mut().graceful_shutdown();
                    shedding = true;
                }
            }
        }
    }
}

/// With `--tls-cert`, the TLS handshake (in the connection's own task, holding its TCP place):
/// bounded by `--handshake-timeout` (a reserve place by [`RESERVE_HEADER_TIMEOUT`]) and by
/// shutdown, so a peer that never sends its ClientHello costs one place until then. `None`:
/// the handshake failed or timed out; the connection is dropped.
async fn tls_handshake(
    stream: TcpStream,
    addr: SocketAddr,
    reserved: bool,
    shared: &Relay,
) -> Option<MaybeTls> {
    let Some(tls) = &shared.config.tls else {
        return Some(MaybeTls::Plain(stream));
    };
    let mut limit = shared.config.handshake_timeout;
    if reserved {
        limit = limit.min(RESERVE_HEADER_TIMEOUT);
    }
    tokio::select! {
        result = tokio::time::timeout(limit, tls::accept(tls, stream)) => match result {
            Ok(Ok(stream)) => Some(stream),
            Ok(Err(e)) => {
                debug!(%addr, error = %e, "TLS handshake failed");
                shared.metrics.tls.handshake_failures.inc();
                None
            }
            Err(_) => {
                debug!(%addr, "TLS handshake timed out");
                shared.metrics.tls.handshake_failures.inc();
                None
            }
        },
        () = shared.shutdown.cancelled() => None,
    }
}

/// Asks every HTTP connection idling between keep-alive requests to close, at most once per
/// [`SHED_EVERY`]. Called when a connection enters the TCP reserve: the limit is reached.
fn shed_idle(shared: &Relay) {
    let now = Instant::now();
    {
        let mut shed_at = shared
            .gate
            .shed_at
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if shed_at.is_some_and(|at| now.duration_since(at) < SHED_EVERY) {
            return;
        }
        *shed_at = Some(now);
    }
    debug!("TCP limit reached: closing idle keep-alive HTTP connections");
    shared.gate.shed_idle.notify_waiters();
}

async fn healthz() -> &'static str {
    "OK\n"
}

/// Readiness (SPEC §8): 200 `ready` when listening, not draining and (cluster mode)
/// subscribed; else 503 with the reason on one line. Liveness stays with `/healthz`: a node
/// cut off from Redis is not restarted, it is taken out of the load balancer's rotation.
async fn readyz(State(shared): State<Arc<Relay>>) -> Response {
    let (status, body) = match not_ready(&shared) {
        None => (StatusCode::OK, "ready\n".to_string()),
        // One line whatever the reason holds (an error from the Redis client).
        Some(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("{}\n", reason.replace(['\r', '\n'], " ")),
        ),
    };
    (status, [(header::CACHE_CONTROL, "no-store")], body).into_response()
}

async fn metrics(
    State(shared): State<Arc<Relay>>,
    ConnectInfo(addr): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> Response {
    // With --metrics-auth on, only an admin may watch the counters (an attacker could time
    // a password flood by them).
    if shared.config.metrics_auth
        && let Err(refusal) = api::authorize(&shared, &headers, addr, "metrics").await
    {
        return refusal;
    }
    shared
        .metrics
        .ready
        .set(i64::from(not_ready(&shared).is_none()));
    let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok());
    let format = Format::from_accept(accept);
    let body = shared.metrics.render(shared.hub.stats(), format);
    ([(header::CONTENT_TYPE, format.content_type())], body).into_response()
}

/// Every path but the HTTP routes: a WebSocket upgrade, or a clear refusal.
async fn upgrade(
    State(shared): State<Arc<Relay>>,
    ConnectInfo(addr): ConnectInfo<SocketAddr>,
    mut request: Request,
) -> Response {
    let headers = request.headers();
    let signalr_path = shared
        .config
        .signalr_path
        .as_deref()
        .is_some_and(|path| path == request.uri().path());
    if !is_websocket_upgrade(headers) {
        if signalr_path {
            return signalr::other_transport();
        }
        return if request.method() == Method::GET {
            (
                StatusCode::UPGRADE_REQUIRED,
                [(header::UPGRADE, "websocket")],
                "426 Upgrade Required: this path accepts WebSocket connections only \
                 (health check: GET /healthz)\n",
            )
                .into_response()
        } else {
            (
                StatusCode::METHOD_NOT_ALLOWED,
                "405 Method Not Allowed: open a WebSocket with GET and Upgrade: websocket\n",
            )
                .into_response()
        };
    }
    if request.method() != Method::GET {
        return (
            StatusCode::METHOD_NOT_ALLOWED,
            "405: a WebSocket upgrade must use GET\n",
        )
            .into_response();
    }
    if headers
        .get(header::SEC_WEBSOCKET_VERSION)
        .is_none_or(|v| v.as_bytes() != b"13")
    {
        return (
            StatusCode::BAD_REQUEST,
            [(header::SEC_WEBSOCKET_VERSION, "13")],
            "400 Bad Request: unsupported Sec-WebSocket-Version (13 is supported)\n",
        )
            .into_response();
    }
    let Some(key) = headers.get(header::SEC_WEBSOCKET_KEY) else {
        return (
            StatusCode::BAD_REQUEST,
            "400 Bad Request: Sec-WebSocket-Key is missing\n",
        )
            .into_response();
    };
    if !origin_allowed(&shared.config.allowed_origins, headers) {
        return (StatusCode::FORBIDDEN, "403 Forbidden: Origin not allowed\n").into_response();
    }
    if shared.shutdown.is_cancelled() || shared.gate.draining.load(Ordering::Acquire) {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "503 Service Unavailable: draining: this node is shutting down; connect again \
             (the load balancer sends you to another node)\n",
        )
            .into_response();
    }
    // Judged before a place is taken: a bad token costs the server nothing more.
    let identity = match (&shared.config.jwt, upgrade_token(request.uri(), headers)) {
        (Some(verifier), Some(token)) => match verifier.verify(&token) {
            Ok(identity) => Some(identity),
            Err(e) => {
                debug!(%addr, reason = %e, "upgrade refused: invalid token");
                // Counted like a jssocket client's bad token in `client_connect`, so a run of
                // refused upgrades (expired tokens, a wrong key) shows on /metrics.
                shared.metrics.error(crate::kinds::Code::InvalidToken);
                return (
                    StatusCode::UNAUTHORIZED,
                    [(header::WWW_AUTHENTICATE, "Bearer error=\"invalid_token\"")],
                    format!("401 Unauthorized: invalid token: {e}\n"),
                )
                    .into_response();
            }
        },
        _ => None,
    };
    // A SignalR client: its negotiated connection id (or a new one when it skipped
    // negotiation), once its token (none today) is accepted.
    let signalr = match signalr_path {
        false => None,
        true => match signalr_connection(&shared, &request) {
            Ok(id) => Some(id),
            Err(refusal) => return *refusal,
        },
    };
    let password = match signalr {
        None => headers
            .get("auth")
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned()),
        // Never an admin: a SignalR client cannot take the admins' places.
        Some(_) => None,
    };
    let Some(slot) = Slot::take(&shared, password.is_some(), addr.ip()) else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "503 Service Unavailable: connection limit reached\n",
        )
            .into_response();
    };
    let accept = derive_accept_key(key.as_bytes());
    // The socket outlives this HTTP exchange: keep it counted until the WebSocket ends.
    let tcp = request.extensions().get::<Arc<TcpGuard>>().cloned();
    let slot = Arc::new(slot);
    let password_given = password.is_some();
    let info = PeerInfo {
        addr,
        password,
        identity,
        admin_only: slot.admin_only || tcp.as_ref().is_some_and(|tcp| tcp.reserved),
        // A verified admin no longer counts against its address's share of the reserve (nor
        // of the admins' places), so a backend's many workers can all come in through it.
        // Only an upgrade with a password can prove to be an admin: no closure for the others.
        on_admin: password_given.then(|| {
            let tcp = tcp.clone();
            let slot = Arc::clone(&slot);
            Box::new(move || {
                if let Some(tcp) = tcp {
                    tcp.leave_address_share();
                }
                slot.leave_address_share();
            }) as Box<dyn FnOnce() + Send>
        }),
    };
    let wire = match wants_labels(request.uri()) {
        true => Wire::Labelled,
        false => Wire::Jssocket,
    };
    let on_upgrade = hyper::upgrade::on(&mut request);
    let token = shared.tracker.token();
    let ws_config = WebSocketConfig::default()
        .max_message_size(Some(shared.config.max_message_size))
        .max_frame_size(Some(shared.config.max_message_size))
        .read_buffer_size(match password_given {
            true => ADMIN_READ_BUFFER,
            false => CLIENT_READ_BUFFER,
        })
        .write_buffer_size(WRITE_BUFFER);
    let shared = Arc::clone(&shared);
    tokio::spawn(async move {
        // Kept until the connection ends (by the connection's own task once it has one).
        let held = (slot, tcp, token);
        let upgraded = match on_upgrade.await {
            Ok(upgraded) => upgraded,
            Err(e) => return debug!(%addr, error = %e, "upgrade failed"),
        };
        // Back to the stream we gave hyper (TCP, or TLS over it): no boxed trait object per
        // connection, and the socket itself stays reachable (a dead peer's socket is reset).
        let Ok(parts) = upgraded.downcast::<TokioIo<MaybeTls>>() else {
            return error!(%addr, "upgraded connection is not a TCP stream");
        };
        // Counted: what it reads toward an unfinished message is charged to the budget.
        let peer = match signalr {
            None => {
                shared
                    .hub
                    .new_peer_speaking(wire, shared.config.max_queue_bytes, &shared.memory)
            }
            Some(id) => Peer::with_id(
                id,
                Wire::SignalR,
                shared.config.max_queue_bytes,
                &shared.memory,
            ),
        };
        let stream = Counted::new(
            parts.io.into_inner(),
            Arc::clone(&peer),
            Arc::clone(&shared.memory),
        );
        // `read_buf` may share hyper's whole request buffer: copy out what we need and let it
        // go now, not at the end of the connection.
        let early = (!parts.read_buf.is_empty()).then(|| parts.read_buf.to_vec());
        drop(parts.read_buf);
        let socket = match early {
            None => WebSocketStream::from_raw_socket(stream, Role::Server, Some(ws_config)).await,
            // Frames the client sent before it saw our 101.
            Some(early) => {
                WebSocketStream::from_partially_read(stream, early, Role::Server, Some(ws_config))
                    .await
            }
        };
        // Boxed so this task does not also carry room for them beside the upgrade's state. A
        // jssocket connection then goes on in a task of its own (`connection::serve`); a
        // SignalR one stays in this task.
        match signalr {
            None => Box::pin(connection::serve(socket, shared, info, peer, held)).await,
            Some(_) => {
                let _held = held;
                let identity = info.identity;
                Box::pin(signalr::connection::serve(
                    socket, shared, peer, addr, identity,
                ))
                .await
            }
        }
    });
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, "upgrade")
        .header(header::UPGRADE, "websocket")
        .header(header::SEC_WEBSOCKET_ACCEPT, accept)
        .body(Body::empty())
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

/// Whether a jssocket upgrade asks for labelled `notify_*` frames: the query parameter
/// `labels=1` ([`Wire::Labelled`]). Any other value, or none, keeps the bare payloads every
/// other client (Jaseci among them) reads; a malformed query asks for nothing.
pub(crate) fn wants_labels(uri: &Uri) -> bool {
    let query = axum::extract::Query::<Vec<(String, String)>>::try_from_uri(uri);
    query.ok().is_some_and(|query| {
        query
            .0
            .iter()
            .any(|(name, value)| name == "labels" && value == "1")
    })
}

/// The client token an upgrade carries (SPEC §11): the `access_token` query parameter (a
/// browser cannot set headers on a WebSocket), else `Authorization: Bearer <token>`.
pub(crate) fn upgrade_token(uri: &Uri, headers: &HeaderMap) -> Option<String> {
    // Malformed query: no token from it (the header may still have one).
    let query = axum::extract::Query::<Vec<(String, String)>>::try_from_uri(uri);
    let from_query = query.ok().and_then(|query| {
        query
            .0
            .into_iter()
            .find_map(|(name, value)| (name == "access_token").then_some(value))
    });
    from_query.or_else(|| {
        let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
        let (scheme, token) = value.trim().split_once(' ')?;
        scheme
            .eq_ignore_ascii_case("bearer")
            .then(|| token.trim().to_string())
    })
}

/// The connection id of a SignalR upgrade: the one its `id` (a connection token from
/// negotiate) names, or a new one when the client skipped negotiation. A token that is not
/// this node's, is too old, or names a connection that is open gets 404, as an ASP.NET server
/// answers an unknown token. (Its access token was judged with every upgrade's, before this.)
fn signalr_connection(shared: &Relay, request: &Request) -> Result<uuid::Uuid, Box<Response>> {
    #[derive(serde::Deserialize)]
    struct Id {
        id: Option<String>,
    }
    let token = match axum::extract::Query::<Id>::try_from_uri(request.uri()) {
        Ok(query) => query.0.id,
        Err(_) => {
            return Err(Box::new(
                (
                    StatusCode::BAD_REQUEST,
                    "400 Bad Request: bad query string\n",
                )
                    .into_response(),
            ));
        }
    };
    let Some(token) = token else {
        return Ok(shared.hub.new_id());
    };
    match shared.signalr.open(&token) {
        Some(id) if !shared.hub.has_client(id) => Ok(id),
        _ => Err(Box::new(
            (
                StatusCode::NOT_FOUND,
                "404 Not Found: no negotiated connection with that id (negotiate again)\n",
            )
                .into_response(),
        )),
    }
}

fn is_websocket_upgrade(headers: &HeaderMap) -> bool {
    let has_token = |name: header::HeaderName, token: &str| {
        headers.get_all(name).iter().any(|v| {
            v.to_str()
                .is_ok_and(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
        })
    };
    has_token(header::CONNECTION, "upgrade") && has_token(header::UPGRADE, "websocket")
}

/// The first line of a start: version, the bound address, auth, cluster and console (see
/// [`Summary`]), before anything else the server logs, so an operator reads it first.
fn log_start(config: &Config, addr: SocketAddr) {
    let summary = Summary::new(config, &addr.to_string());
    info!(
        version = %summary.version,
        addr = %summary.addr,
        auth = summary.auth.as_str(),
        cluster = %summary.cluster,
        redis_url = summary.redis_url.as_deref().map(tracing::field::display),
        console = %summary.console,
        "jssocket started"
    );
}

/// `--allowed-origins` guards against other web pages opening sockets in a user's browser.
/// Browsers always send `Origin`; backends (Jaseci's socket client, tungstenite, Python
/// `websockets`) send none, and a non-browser peer could send any, so a request without
/// `Origin` is let through rather than locking backends out.
///
/// A same-origin upgrade (an `http`/`https` Origin whose host:port is the request's `Host`)
/// is allowed too: it is our own console page, which the list would otherwise lock out. This
/// does not weaken the policy: a browser sets both headers, so a page elsewhere cannot claim
/// our host; the only page that can is one its browser believes is served by this server,
/// i.e. served by us, or by DNS rebinding (a hostile name resolving to us), and such a page
/// already reaches every HTTP route as same-origin, so a WebSocket gives it nothing new. No
/// cookie or other ambient credential rides on an upgrade here (tokens are explicit).
///
/// A refused Origin is logged at warn, at most one line per 10 s (with the number left out),
/// so a misconfigured list is visible in the logs without a flood filling them.
pub(crate) fn origin_allowed(allowed: &[String], headers: &HeaderMap) -> bool {
    if allowed.is_empty() {
        return true;
    }
    let Some(origin) = headers.get(header::ORIGIN) else {
        return true;
    };
    let origin = String::from_utf8_lossy(origin.as_bytes());
    let origin = origin.trim_end_matches('/').to_ascii_lowercase();
    if allowed.contains(&origin) || same_origin(&origin, headers) {
        return true;
    }
    // Bounded and `?`-escaped: the Origin is the peer's text (see session.rs).
    let shown: String = origin.chars().take(200).collect();
    crate::warn_throttled!(
        origin = ?shown,
        "refused (403): Origin is not in --allowed-origins"
    );
    false
}

/// `origin` (lowercase, no trailing `/`) is `http://` or `https://` followed by exactly the
/// request's `Host`, a scheme's default port (`:80`, `:443`) written or not on either side.
fn same_origin(origin: &str, headers: &HeaderMap) -> bool {
    let Some(host) = headers.get(header::HOST).and_then(|h| h.to_str().ok()) else {
        return false;
    };
    let (authority, default_port) = if let Some(rest) = origin.strip_prefix("http://") {
        (rest, ":80")
    } else if let Some(rest) = origin.strip_prefix("https://") {
        (rest, ":443")
    } else {
        return false;
    };
    let host = host.trim().to_ascii_lowercase();
    let normal = |a: &str| a.strip_suffix(default_port).unwrap_or(a).to_string();
    !authority.is_empty()
        && !authority.contains(['/', '@', '?', '#'])
        && normal(authority) == normal(&host)
}

/// One counted WebSocket connection; the count drops with it.
struct Slot {
    shared: Arc<Relay>,
    /// Beyond `--max-connections`, in the admins' reserve ([`ADMIN_CONNECTIONS`]).
    admin_only: bool,
    /// In the admins' reserve, the address whose share ([`ADMIN_PER_ADDRESS`]) this
    /// connection counts against, until it closes or proves to be an admin.
    share: Mutex<Option<IpAddr>>,
}

impl Slot {
    /// `has_password`: the upgrade carries `auth:`, so it may take a place in the admins'
    /// reserve when `--max-connections` is reached (one of its address's few there).
    fn take(shared: &Arc<Relay>, has_password: bool, ip: IpAddr) -> Option<Slot> {
        let open = shared.gate.connections.fetch_add(1, Ordering::AcqRel) + 1;
        let max = shared.config.max_connections;
        let over = max.is_some_and(|max| open > max);
        let room = |max: usize| match has_password {
            true => max.saturating_add(ADMIN_CONNECTIONS),
            false => max,
        };
        let share = over.then(|| address_key(ip));
        let refused = max.is_some_and(|max| open > room(max))
            || share.is_some_and(|key| {
                !take_share(&shared.gate.admin_by_address, key, ADMIN_PER_ADDRESS)
            });
        if refused {
            shared.gate.connections.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        shared.metrics.connections.inc();
        Some(Slot {
            shared: Arc::clone(shared),
            admin_only: over,
            share: Mutex::new(share),
        })
    }

    /// Gives the place back to the address's share of the admins' reserve (the connection
    /// itself stays counted). Idempotent.
    fn leave_address_share(&self) {
        let key = self.share.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(key) = key {
            leave_share(&self.shared.gate.admin_by_address, key);
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.leave_address_share();
        self.shared.gate.connections.fetch_sub(1, Ordering::AcqRel);
        self.shared.metrics.connections.dec();
    }
}

/// What a connection in the reserve may ask: liveness and readiness probes, and what carries
/// an admin password (a WebSocket upgrade with `auth:`, an API call). The password is checked
/// later as usual; this only decides who may try.
fn reserve_admits<B>(request: &hyper::Request<B>) -> bool {
    let headers = request.headers();
    let has_password = headers.contains_key("auth") || headers.contains_key(header::AUTHORIZATION);
    if is_websocket_upgrade(headers) {
        return headers.contains_key("auth");
    }
    match request.uri().path() {
        "/healthz" | "/readyz" => true,
        path => path.starts_with("/api/") && has_password,
    }
}

/// The TCP connection budget. Below `limit`: served normally. From `limit` to `ceiling`: the
/// reserve (see [`reserve_admits`]). At `ceiling`: closed at once.
#[derive(Debug, Clone, Copy)]
struct TcpLimits {
    limit: usize,
    ceiling: usize,
    /// `--max-tcp-connections` when it was lowered to leave the reserve within the open-file
    /// limit (`run` says so at start).
    clamped_from: Option<usize>,
}

impl TcpLimits {
    /// `configured`: `--max-tcp-connections`; `None` derives the limit from the open-file soft
    /// limit (which `main` has raised to the hard one), so the process never runs out of
    /// descriptors: accept failing with EMFILE would lock out health checks and admins too.
    fn new(configured: Option<usize>) -> TcpLimits {
        let soft = rlimit::getrlimit(rlimit::Resource::NOFILE).map_or(1024, |(soft, _)| soft);
        let usable = usize::try_from(soft.saturating_sub(FD_HEADROOM)).unwrap_or(usize::MAX);
        let reserve = |limit: usize| (limit / 20).max(MIN_RESERVE);
        let derived = {
            let reserve = reserve(usable).min(usable / 2);
            TcpLimits {
                limit: usable - reserve,
                ceiling: usable,
                clamped_from: None,
            }
        };
        match configured {
            // Above what the descriptors allow, the reserve would be cut short or vanish, and
            // accept would fail with EMFILE before the limit is even reached.
            Some(limit)
                if limit.saturating_add(reserve(limit)) > usable && limit > derived.limit =>
            {
                TcpLimits {
                    clamped_from: Some(limit),
                    ..derived
                }
            }
            Some(limit) => TcpLimits {
                limit,
                ceiling: limit.saturating_add(reserve(limit)).min(usable.max(limit)),
                clamped_from: None,
            },
            None => derived,
        }
    }
}

/// One counted TCP connection; the count drops with it. Relay (`Arc`) between the HTTP
/// connection and, after an upgrade, the WebSocket task.
struct TcpGuard {
    shared: Arc<Relay>,
    /// Admitted beyond `--max-tcp-connections`, into the reserve.
    reserved: bool,
    /// In the reserve, the address whose share ([`RESERVE_PER_ADDRESS`]) this connection
    /// counts against, until it closes or proves to be an admin.
    share: Mutex<Option<IpAddr>>,
}

impl TcpGuard {
    fn take(shared: &Arc<Relay>, ip: IpAddr) -> Option<TcpGuard> {
        let open = shared.gate.tcp_connections.fetch_add(1, Ordering::AcqRel) + 1;
        let reserved = open > shared.gate.tcp_limits.limit;
        let share = reserved.then(|| address_key(ip));
        if reserved {
            // At the limit: make room, whether this one is let into the reserve or not.
            shed_idle(shared);
        }
        let refused = open > shared.gate.tcp_limits.ceiling
            || share.is_some_and(|key| {
                !take_share(&shared.gate.reserve_by_address, key, RESERVE_PER_ADDRESS)
            });
        if refused {
            shared.gate.tcp_connections.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        shared.metrics.tcp_connections.inc();
        Some(TcpGuard {
            shared: Arc::clone(shared),
            reserved,
            share: Mutex::new(share),
        })
    }

    /// Gives the place back to the address's share of the reserve (the connection itself
    /// stays counted). Idempotent.
    fn leave_address_share(&self) {
        let key = self.share.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(key) = key {
            leave_share(&self.shared.gate.reserve_by_address, key);
        }
    }
}

impl Drop for TcpGuard {
    fn drop(&mut self) {
        self.leave_address_share();
        self.shared
            .gate
            .tcp_connections
            .fetch_sub(1, Ordering::AcqRel);
        self.shared.metrics.tcp_connections.dec();
    }
}

/// Takes one of `key`'s places in a reserve shared out per address (`cap` each); `false`
/// when it holds them all.
fn take_share(by_address: &Mutex<HashMap<IpAddr, usize>>, key: IpAddr, cap: usize) -> bool {
    let mut by_address = by_address.lock().unwrap_or_else(|e| e.into_inner());
    let held = by_address.entry(key).or_insert(0);
    if *held >= cap {
        return false;
    }
    *held += 1;
    true
}

/// Gives back one of `key`'s places taken by [`take_share`].
fn leave_share(by_address: &Mutex<HashMap<IpAddr, usize>>, key: IpAddr) {
    let mut by_address = by_address.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(held) = by_address.get_mut(&key) {
        *held -= 1;
        if *held == 0 {
            by_address.remove(&key);
        }
    }
}

/// What the per-address share of the reserve is keyed by: an IPv4 address, or an IPv6 /64
/// (one host usually has a whole /64, so its single addresses cost an attacker nothing).
fn address_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & !((1u128 << 64) - 1))),
        },
    }
}

/// Logs a failing `accept` at most once per [`ErrorLog::EVERY`], with how many failed since.
#[derive(Default)]
struct ErrorLog {
    last: Option<Instant>,
    suppressed: u64,
}

impl ErrorLog {
    const EVERY: Duration = Duration::from_secs(10);

    fn log(&mut self, e: &io::Error) {
        if self.last.is_some_and(|last| last.elapsed() < Self::EVERY) {
            self.suppressed += 1;
            return;
        }
        error!(error = %e, suppressed = self.suppressed, "accept failed");
        self.last = Some(Instant::now());
        self.suppressed = 0;
    }
}

/// Answers waiting client connects that no server took in time.
async fn expire_pending(shared: Arc<Relay>) {
    let period = (shared.config.pending_timeout / 4)
        .clamp(Duration::from_millis(50), Duration::from_secs(1));
    let mut tick = tokio::time::interval(period);
    loop {
        tokio::select! {
            _ = tick.tick() => shared.hub.pool.expire(),
            _ = shared.shutdown.cancelled() => return,
        }
    }
}
