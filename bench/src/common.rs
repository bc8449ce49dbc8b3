//! What every scenario shares: the target (loopback only), the run context (deadline, stop
//! token, handshake budget, source-address spreading), the clock, and socket helpers.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::Semaphore;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::{HeaderValue, Uri};
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::{WebSocketStream, client_async_with_config};
use tokio_util::sync::CancellationToken;

/// After the global timeout, how long in-flight messages may still arrive before the
/// figures are taken.
pub const TIMEOUT_DRAIN: Duration = Duration::from_secs(2);

/// Waits until `done()` holds, `drain` has passed, or (after `stop`) [`TIMEOUT_DRAIN`].
pub async fn drain_wait(stop: &CancellationToken, drain: Duration, done: impl Fn() -> bool) {
    let start = tokio::time::Instant::now();
    let mut stopped_at: Option<tokio::time::Instant> = None;
    loop {
        if done() {
            return;
        }
        let now = tokio::time::Instant::now();
        if stopped_at.is_none() && stop.is_cancelled() {
            stopped_at = Some(now);
        }
        let limit = match stopped_at {
            Some(t) => (start + drain).min(t + TIMEOUT_DRAIN),
            None => start + drain,
        };
        if now >= limit {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A client-side WebSocket over a plain TCP stream.
pub type Ws = WebSocketStream<TcpStream>;

static START: OnceLock<Instant> = OnceLock::new();

/// Nanoseconds since the process's common reference instant. Every task of the bench lives in
/// this process, so a timestamp taken by the sender and one taken by a receiver are comparable.
pub fn now_ns() -> u64 {
    u64::try_from(START.get_or_init(Instant::now).elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// Fixes the reference instant (call first thing in `main`).
pub fn init_clock() {
    let _ = now_ns();
}

pub fn secs(ns: u64) -> f64 {
    ns as f64 / 1e9
}

/// Where the bench sends its traffic: always a loopback address.
#[derive(Clone, Debug)]
pub struct Target {
    pub url: String,
    pub addr: SocketAddr,
}

impl Target {
    /// Parses a `ws://HOST:PORT/PATH` URL and refuses any host that is not loopback
    /// (127.0.0.0/8, `localhost` resolving to loopback only, `::1`).
    pub async fn resolve(url: &str) -> Result<Target> {
        let uri: Uri = url
            .parse()
            .with_context(|| format!("--url {url:?} is not a URL"))?;
        match uri.scheme_str() {
            Some("ws") => {}
            Some("wss") => bail!("--url: wss:// is not supported (loopback only, use ws://)"),
            _ => bail!("--url must look like ws://127.0.0.1:PORT/ws"),
        }
        let host = uri.host().context("--url has no host")?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let port = uri.port_u16().unwrap_or(80);
        let addrs: Vec<SocketAddr> = match host.parse::<IpAddr>() {
            Ok(ip) => vec![SocketAddr::new(ip, port)],
            Err(_) => tokio::net::lookup_host((host, port))
                .await
                .with_context(|| format!("cannot resolve {host}"))?
                .collect(),
        };
        if addrs.is_empty() {
            bail!("{host} resolves to no address");
        }
        if let Some(bad) = addrs.iter().find(|a| !a.ip().is_loopback()) {
            bail!(
                "refusing --url {url}: {} is not a loopback address \
                 (the bench only sends traffic to 127.0.0.0/8, localhost or ::1)",
                bad.ip()
            );
        }
        let addr = addrs
            .iter()
            .find(|a| a.is_ipv4())
            .copied()
            .unwrap_or(addrs[0]);
        Ok(Target {
            url: url.to_string(),
            addr,
        })
    }
}

/// Options of the run that every scenario sees.
pub struct Ctx {
    pub target: Target,
    pub auth: String,
    pub server_pid: Option<u32>,
    /// Cancelled when the global `--timeout` expires: scenarios then report what they have.
    pub stop: CancellationToken,
    /// Bounds the handshakes (TCP + upgrade + client_connect + ack) in flight.
    pub handshakes: Arc<Semaphore>,
    pub per_source: usize,
    pub ack_timeout: Duration,
    next_conn: AtomicUsize,
    /// Other servers clients are spread over, beside `target` (`--client-url`).
    pub client_targets: Vec<Target>,
    next_client: AtomicUsize,
    /// Index of the first source address this process uses (127.0.0.2 + it): the child
    /// processes of `cluster-hold` each take their own addresses.
    pub first_source: usize,
}

impl Ctx {
    pub fn new(
        target: Target,
        auth: String,
        server_pid: Option<u32>,
        concurrency: usize,
        per_source: usize,
        ack_timeout: Duration,
    ) -> Ctx {
        Ctx {
            target,
            auth,
            server_pid,
            stop: CancellationToken::new(),
            handshakes: Arc::new(Semaphore::new(concurrency.max(1))),
            per_source: per_source.max(1),
            ack_timeout,
            next_conn: AtomicUsize::new(0),
            client_targets: Vec::new(),
            next_client: AtomicUsize::new(0),
            first_source: 0,
        }
    }

    /// Where the next client connects: `target` and the `--client-url`s in turn.
    fn client_target(&self) -> &Target {
        let n = self.client_targets.len() + 1;
        match self.next_client.fetch_add(1, Ordering::Relaxed) % n {
            0 => &self.target,
            i => &self.client_targets[i - 1],
        }
    }

    /// The same run (same stop token and handshake budget) aimed at another server.
    pub fn with_target(&self, target: Target, server_pid: Option<u32>) -> Ctx {
        Ctx {
            target,
            auth: self.auth.clone(),
            server_pid,
            stop: self.stop.clone(),
            handshakes: self.handshakes.clone(),
            per_source: self.per_source,
            ack_timeout: self.ack_timeout,
            next_conn: AtomicUsize::new(0),
            client_targets: Vec::new(),
            next_client: AtomicUsize::new(0),
            first_source: 0,
        }
    }

    /// The local address for the next client socket: 127.0.0.2, 127.0.0.3, … with at most
    /// `per_source` sockets each, so a large run does not exhaust one address's ports.
    fn next_source(&self) -> Option<SocketAddr> {
        if !self.target.addr.is_ipv4() {
            return None;
        }
        let i = self.next_conn.fetch_add(1, Ordering::Relaxed)
            + self.first_source.saturating_mul(self.per_source);
        let first = u32::from(Ipv4Addr::new(127, 0, 0, 2));
        let span = u32::from(Ipv4Addr::new(127, 255, 255, 254)) - first + 1;
        let k = u32::try_from(i / self.per_source).unwrap_or(u32::MAX) % span;
        Some(SocketAddr::new(IpAddr::V4(Ipv4Addr::from(first + k)), 0))
    }
}

/// Client-side WebSocket settings: small read buffers so that tens of thousands of sockets fit.
pub fn client_ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(8 * 1024)
        .write_buffer_size(0)
}

/// Why a connection (or its acknowledgement) failed.
#[derive(Debug)]
pub enum ConnErr {
    Tcp(std::io::Error),
    Handshake(String),
    Ws(String),
    AckTimeout,
    Closed(String),
    ServerError(String),
    Cancelled,
}

impl ConnErr {
    pub fn kind(&self) -> &'static str {
        match self {
            ConnErr::Tcp(_) => "tcp_connect",
            ConnErr::Handshake(_) => "ws_handshake",
            ConnErr::Ws(_) => "ws_error",
            ConnErr::AckTimeout => "ack_timeout",
            ConnErr::Closed(_) => "closed_before_ack",
            ConnErr::ServerError(_) => "server_error",
            ConnErr::Cancelled => "cancelled",
        }
    }

    /// True when the socket was up but the acknowledgement never came.
    pub fn is_ack_failure(&self) -> bool {
        matches!(
            self,
            ConnErr::AckTimeout | ConnErr::Closed(_) | ConnErr::ServerError(_)
        )
    }
}

impl fmt::Display for ConnErr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConnErr::Tcp(e) => write!(f, "tcp connect: {e}"),
            ConnErr::Handshake(e) => write!(f, "websocket handshake: {e}"),
            ConnErr::Ws(e) => write!(f, "websocket: {e}"),
            ConnErr::AckTimeout => write!(f, "no client_connected acknowledgement in time"),
            ConnErr::Closed(e) => write!(f, "closed before the acknowledgement: {e}"),
            ConnErr::ServerError(e) => write!(f, "server error: {e}"),
            ConnErr::Cancelled => write!(f, "cancelled"),
        }
    }
}

/// Sets IP_BIND_ADDRESS_NO_PORT so that binding a source address does not reserve a port
/// before `connect` (the port is then picked per 4-tuple, which allows far more sockets).
pub fn bind_address_no_port(sock: &TcpSocket) {
    use std::os::fd::AsRawFd;
    let one: libc::c_int = 1;
    // SAFETY: a valid socket fd and a pointer to a c_int of the stated size.
    unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

/// Opens a WebSocket to the target from the next source address; with `auth`, as an admin.
pub async fn open_ws(ctx: &Ctx, auth: Option<&str>) -> Result<Ws, ConnErr> {
    open_ws_at(ctx, auth, None).await
}

/// [`open_ws`] on another path of the same server (`path` replaces the URL's path and
/// query): SignalR clients connect to the SignalR path, not to the jssocket path of `--url`.
pub async fn open_ws_at(ctx: &Ctx, auth: Option<&str>, path: Option<&str>) -> Result<Ws, ConnErr> {
    let target = if auth.is_some() {
        &ctx.target
    } else {
        ctx.client_target()
    };
    let url = match path {
        Some(path) => with_path(&target.url, path).map_err(ConnErr::Handshake)?,
        None => target.url.clone(),
    };
    let sock = if target.addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(ConnErr::Tcp)?;
    if let Some(src) = ctx.next_source() {
        bind_address_no_port(&sock);
        sock.bind(src).map_err(ConnErr::Tcp)?;
    }
    let stream = sock.connect(target.addr).await.map_err(ConnErr::Tcp)?;
    stream.set_nodelay(true).map_err(ConnErr::Tcp)?;
    let mut request = url
        .as_str()
        .into_client_request()
        .map_err(|e| ConnErr::Handshake(e.to_string()))?;
    if let Some(auth) = auth {
        let value = HeaderValue::from_str(auth)
            .map_err(|e| ConnErr::Handshake(format!("bad --auth value: {e}")))?;
        request.headers_mut().insert("auth", value);
    }
    let (ws, _response) = client_async_with_config(request, stream, Some(client_ws_config()))
        .await
        .map_err(|e| ConnErr::Handshake(e.to_string()))?;
    crate::progress::connection();
    Ok(ws)
}

/// `url` with its path (and query) replaced by `path`: `ws://h:p/ws` → `ws://h:p/sockets`.
pub fn with_path(url: &str, path: &str) -> Result<String, String> {
    let uri: Uri = url.parse().map_err(|e| format!("{url:?}: {e}"))?;
    let (Some(scheme), Some(authority)) = (uri.scheme_str(), uri.authority()) else {
        return Err(format!("{url:?} has no scheme or host"));
    };
    Ok(format!("{scheme}://{authority}{path}"))
}

/// "1008 slow consumer" style description of a close frame.
pub fn close_desc(frame: Option<&CloseFrame>) -> String {
    match frame {
        Some(f) => {
            let code: u16 = f.code.into();
            if f.reason.is_empty() {
                format!("{code}")
            } else {
                format!("{code} {}", f.reason.as_str())
            }
        }
        None => "close (no code)".to_string(),
    }
}

/// The JSON payload of about `size` bytes: `{"seq":K,"ts":NS,...extra,"pad":"xxx"}`.
pub fn payload(seq: u64, ts: u64, extra: &str, size: usize) -> String {
    let mut s = format!("{{\"seq\":{seq},\"ts\":{ts}{extra}");
    // `,"pad":""}` is 10 bytes.
    let used = s.len() + 10;
    if size > used {
        s.push_str(",\"pad\":\"");
        s.extend(std::iter::repeat_n('x', size - used));
        s.push('"');
    }
    s.push('}');
    s
}

/// A small, fast, non-cryptographic generator (splitmix64) for picking victims and targets.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x9E37_79B9_7F4A_7C15)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }
}

/// A fixed-size set of small integers.
pub struct BitSet(Vec<u64>);

impl BitSet {
    pub fn new(len: usize) -> BitSet {
        BitSet(vec![0; len.div_ceil(64)])
    }

    /// Sets bit `i`; returns whether it was already set.
    pub fn test_set(&mut self, i: usize) -> bool {
        let (w, b) = (i / 64, 1u64 << (i % 64));
        let was = self.0[w] & b != 0;
        self.0[w] |= b;
        was
    }

    /// How many of the bits `0..limit` are set.
    pub fn count_below(&self, limit: usize) -> u64 {
        let mut n = 0u64;
        for (w, word) in self.0.iter().enumerate() {
            let start = w * 64;
            if start >= limit {
                break;
            }
            let bits = if limit - start >= 64 {
                *word
            } else {
                *word & ((1u64 << (limit - start)) - 1)
            };
            n += u64::from(bits.count_ones());
        }
        n
    }
}

/// Raises the soft RLIMIT_NOFILE to the hard limit; returns the resulting soft limit.
pub fn raise_nofile_limit() -> u64 {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain libc calls with a valid, initialised rlimit struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) != 0 {
            return 0;
        }
        if r.rlim_cur < r.rlim_max {
            let wanted = libc::rlimit {
                rlim_cur: r.rlim_max,
                rlim_max: r.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &wanted) == 0 {
                r = wanted;
            }
        }
    }
    r.rlim_cur
}

/// Round-robin share: how many of `0..m` are congruent to `g` modulo `n`.
pub fn share(m: u64, n: u64, g: u64) -> u64 {
    if n == 0 {
        return 0;
    }
    m / n + u64::from(g < m % n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_has_the_requested_size_and_parses() {
        for size in [0, 10, 40, 64, 256, 4096] {
            let p = payload(12345, 678_901_234, ",\"to\":3", size);
            if size >= 64 {
                assert_eq!(p.len(), size);
            }
            let v: serde_json::Value = serde_json::from_str(&p).expect("valid JSON");
            assert_eq!(v["seq"], 12345);
            assert_eq!(v["to"], 3);
        }
    }

    #[test]
    fn with_path_keeps_the_server_and_replaces_the_path() {
        assert_eq!(
            with_path("ws://127.0.0.1:18090/ws?x=1", "/sockets").as_deref(),
            Ok("ws://127.0.0.1:18090/sockets")
        );
        assert!(with_path("/ws", "/sockets").is_err());
    }

    #[test]
    fn bitset_counts() {
        let mut b = BitSet::new(130);
        assert!(!b.test_set(0));
        assert!(b.test_set(0));
        b.test_set(64);
        b.test_set(129);
        assert_eq!(b.count_below(130), 3);
        assert_eq!(b.count_below(64), 1);
        assert_eq!(b.count_below(65), 2);
    }

    #[test]
    fn share_splits_round_robin() {
        assert_eq!(share(10, 3, 0), 4);
        assert_eq!(share(10, 3, 1), 3);
        assert_eq!(share(10, 3, 2), 3);
    }
}
