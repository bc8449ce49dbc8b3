//! Issue 10 item 3: every accepted TCP connection is counted and bounded, plain HTTP
//! keep-alive included. Past `--max-tcp-connections` a reserve still serves `/healthz` and
//! admins (everything else gets 503, never a timeout); past the reserve connections are closed
//! at once; idle keep-alive connections are closed after `--http-idle-timeout`, and at once
//! when the limit is reached; one address cannot hold more than a few places in the reserve.
//! The last tests run the built binary under a lowered open-file limit, as an attack on a real
//! host would.

mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use common::{
    Conn, PASSWORD, RECV_TIMEOUT, Server, connect_tcp_from, http, http_from, wait_metric,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_tungstenite::connect_async;
use tokio_tungstenite::tungstenite::Error as WsError;

/// `--max-tcp-connections` of these tests; the reserve above it is then the minimum, 64.
const LIMIT: usize = 40;
const RESERVE: usize = 64;

/// Options that keep the attack's idle connections open for the whole test, so what is
/// checked is the limit, not how fast this machine runs.
const HOLD: [&str; 6] = [
    "--max-tcp-connections",
    "40",
    "--http-idle-timeout",
    "60",
    "--handshake-timeout",
    "60",
];

/// A keep-alive HTTP connection that did one `GET /healthz` (answered 200) and now idles.
async fn idle_keep_alive(addr: SocketAddr) -> TcpStream {
    let mut stream = timeout(RECV_TIMEOUT, TcpStream::connect(addr))
        .await
        .expect("connect in time")
        .expect("connect");
    let answer = get_healthz(&mut stream, true).await;
    assert!(
        answer.starts_with("HTTP/1.1 200"),
        "keep-alive GET /healthz: {answer:?}"
    );
    stream
}

/// Sends `GET /healthz` on `stream` and reads one whole answer (head and its 3-byte body), or
/// whatever came before the server closed. Bounded by [`RECV_TIMEOUT`].
async fn get_healthz(stream: &mut TcpStream, keep_alive: bool) -> String {
    let connection = if keep_alive { "keep-alive" } else { "close" };
    let request = format!("GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: {connection}\r\n\r\n");
    let exchange = async {
        let _ = stream.write_all(request.as_bytes()).await;
        let mut raw = Vec::new();
        let mut buf = [0u8; 1024];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => raw.extend_from_slice(&buf[..n]),
            }
            if let Some(head) = raw.windows(4).position(|w| w == b"\r\n\r\n")
                && raw.len() >= head + 4 + 3
            {
                break;
            }
        }
        String::from_utf8_lossy(&raw).into_owned()
    };
    timeout(RECV_TIMEOUT, exchange)
        .await
        .expect("GET /healthz: neither an answer nor a close in time")
}

/// Opens `n` idle keep-alive connections.
async fn fill(addr: SocketAddr, n: usize) -> Vec<TcpStream> {
    let mut held = Vec::with_capacity(n);
    for _ in 0..n {
        held.push(idle_keep_alive(addr).await);
    }
    held
}

/// Fills the TCP limit with `n` plain WebSocket clients: unlike idle keep-alive connections
/// they are not shed when the limit is reached, so the server stays full for the test.
async fn fill_with_clients(server: &Server, n: usize) -> Vec<Conn> {
    let mut held = Vec::with_capacity(n);
    for i in 0..n {
        held.push(server.client(&format!("client {i}")).await);
    }
    held
}

/// Reads until the server closes `stream`; `false` if it is still open after [`RECV_TIMEOUT`].
async fn closed_by_server(stream: &mut TcpStream) -> bool {
    let mut buf = [0u8; 256];
    timeout(RECV_TIMEOUT, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .is_ok()
}

fn loopback(last: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, last))
}

/// The status of a WebSocket upgrade without `auth` that the server refused.
async fn refused_upgrade_status(server: &Server) -> u16 {
    match timeout(RECV_TIMEOUT, connect_async(server.url()))
        .await
        .expect("the upgrade must be answered, not left to time out")
    {
        Err(WsError::Http(response)) => response.status().as_u16(),
        Err(e) => panic!("upgrade failed without an HTTP answer: {e}"),
        Ok(_) => panic!("a plain client was upgraded although the server is full"),
    }
}

#[tokio::test]
async fn the_reserve_serves_health_checks_and_admins_and_refuses_the_rest() {
    let server = Server::with_args(&HOLD).await;
    let mut clients = fill_with_clients(&server, LIMIT).await;

    // Full: a health check is still answered.
    let health = http(server.addr, "GET", "/healthz", &[], b"").await;
    assert_eq!(health.status, 200, "GET /healthz when full");
    assert_eq!(health.text(), "OK\n");
    // So is a readiness probe, with or without a query string (a full node is still ready:
    // readiness is about this node's own state, not its load).
    for path in ["/readyz", "/readyz?probe=lb"] {
        let ready = http(server.addr, "GET", path, &[], b"").await;
        assert_eq!(
            (ready.status, ready.text().as_str()),
            (200, "ready\n"),
            "GET {path} when full"
        );
    }

    // An admin still gets in and can join the server pool.
    let mut admin = Conn::connect(&server.url(), Some(PASSWORD), "admin").await;
    admin.server_connect().await;

    // A plain client and other routes are refused with 503 at once, not left to time out.
    assert_eq!(refused_upgrade_status(&server).await, 503);
    let console = http(server.addr, "GET", "/console", &[], b"").await;
    assert_eq!(console.status, 503, "GET /console when full");

    // The clients were not touched.
    clients[0].expect_silence().await;
    admin.ping(1, false).await;
}

/// Holding the limit with keep-alive connections idling between cheap requests does not
/// work: the first connection that finds the limit reached makes the idle ones close, and is
/// itself served.
#[tokio::test]
async fn idle_keep_alive_connections_are_shed_when_the_limit_is_reached() {
    let server = Server::with_args(&HOLD).await;
    let mut attack = fill(server.addr, LIMIT).await;

    let health = http(server.addr, "GET", "/healthz", &[], b"").await;
    assert_eq!(health.status, 200, "GET /healthz at the limit");

    for (i, stream) in attack.iter_mut().enumerate() {
        assert!(
            closed_by_server(stream).await,
            "idle keep-alive connection {i} was not closed at the limit"
        );
    }
    // Room again below the limit: a plain client is upgraded, not refused.
    let deadline = tokio::time::Instant::now() + RECV_TIMEOUT;
    loop {
        match timeout(RECV_TIMEOUT, connect_async(server.url())).await {
            Ok(Ok((_ws, response))) => break assert_eq!(response.status(), 101),
            _ if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            other => panic!("a client is still refused after the shedding: {other:?}"),
        }
    }
}

/// One address opening many silent connections gets only a few places in the reserve; a
/// health check from another address still gets one.
#[tokio::test]
async fn one_address_cannot_fill_the_reserve() {
    let server = Server::with_args(&HOLD).await;
    let _clients = fill_with_clients(&server, LIMIT).await;

    // More silent connections than the reserve has places, from one address, all accepted
    // by the kernel before the health check below connects (the server accepts in order).
    let mut silent = Vec::with_capacity(RESERVE + 8);
    for _ in 0..RESERVE + 8 {
        silent.push(connect_tcp_from(server.addr, loopback(3)).await);
    }
    let health = http_from(server.addr, loopback(2), "GET", "/healthz", &[], b"").await;
    assert_eq!(health.status, 200, "GET /healthz from another address");
    let mut admin = Conn::connect_from(server.addr, loopback(4), Some(PASSWORD), "admin").await;
    admin.server_connect().await;
    drop(silent);
}

/// The reserve is let in on the `auth:` header alone; a wrong password must not keep a place
/// meant for backends as a plain client.
#[tokio::test]
async fn a_wrong_password_in_the_reserve_is_closed_not_kept() {
    let server = Server::with_args(&HOLD).await;
    let _clients = fill_with_clients(&server, LIMIT).await;
    let mut impostor = Conn::connect(&server.url(), Some("not-the-password"), "impostor").await;
    let reason = impostor.expect_close_code(1008).await;
    assert_eq!(reason, "not an admin");
    // The place is free again: the real backend still gets in.
    let mut admin = Conn::connect(&server.url(), Some(PASSWORD), "admin").await;
    admin.server_connect().await;
}

#[tokio::test]
async fn below_the_limit_clients_are_served_again() {
    let server = Server::with_args(&HOLD).await;
    let clients = fill_with_clients(&server, LIMIT).await;
    assert_eq!(refused_upgrade_status(&server).await, 503);
    drop(clients);
    // The server sees the closes a moment later: retry, bounded.
    let deadline = tokio::time::Instant::now() + RECV_TIMEOUT;
    loop {
        match timeout(RECV_TIMEOUT, connect_async(server.url())).await {
            Ok(Ok((_ws, response))) => {
                assert_eq!(response.status(), 101);
                break;
            }
            _ if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            other => panic!("a client is still refused after the attack ended: {other:?}"),
        }
    }
}

#[tokio::test]
async fn past_the_reserve_connections_are_closed_at_once() {
    let server = Server::with_args(&HOLD).await;
    let _clients = fill_with_clients(&server, LIMIT).await;
    // Admin WebSockets stay, so they fill the reserve for good. All from one address: once
    // verified, an admin no longer counts against its address's share of the reserve.
    let mut admins = Vec::with_capacity(RESERVE);
    for i in 0..RESERVE {
        let mut admin = Conn::connect(&server.url(), Some(PASSWORD), &format!("admin {i}")).await;
        admin.server_connect().await;
        admins.push(admin);
    }

    // One more: closed without an answer (not left hanging in the backlog).
    let mut stream = TcpStream::connect(server.addr).await.expect("connect");
    let answer = get_healthz(&mut stream, false).await;
    assert_eq!(answer, "", "past the reserve nothing is served");

    // One admin leaves: its place in the reserve serves a health check again.
    admins.pop().expect("an admin").close().await;
    let deadline = tokio::time::Instant::now() + RECV_TIMEOUT;
    loop {
        let mut stream = TcpStream::connect(server.addr).await.expect("connect");
        let answer = get_healthz(&mut stream, false).await;
        if answer.starts_with("HTTP/1.1 200") {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no health check served after an admin left: {answer:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn idle_keep_alive_connections_are_closed() {
    let server = Server::with_args(&["--http-idle-timeout", "1"]).await;
    let mut stream = idle_keep_alive(server.addr).await;
    let mut buf = [0u8; 64];
    let read = timeout(Duration::from_secs(10), stream.read(&mut buf))
        .await
        .expect("the server must close an idle keep-alive connection");
    assert!(
        matches!(read, Ok(0) | Err(_)),
        "expected the close, got {read:?}"
    );
}

#[tokio::test]
async fn open_tcp_connections_are_a_gauge() {
    let server = Server::with_args(&HOLD).await;
    let held = fill(server.addr, 3).await;
    // The three held ones and the scrape's own connection.
    wait_metric(server.addr, "jssocket_tcp_connections", &[], 4.0).await;
    drop(held);
    wait_metric(server.addr, "jssocket_tcp_connections", &[], 1.0).await;
}

/// The built binary, killed when dropped, logging (both streams) to a file.
struct Binary {
    child: std::process::Child,
    log: std::path::PathBuf,
}

impl Binary {
    /// Starts the binary on `port` with its open-file limit (soft and hard, so `main` cannot
    /// raise it) lowered to `nofile`.
    fn start(port: u16, nofile: u64, args: &[&str]) -> Binary {
        use std::os::unix::process::CommandExt;
        let log = std::env::temp_dir().join(format!("jssocket-exhaustion-{port}.log"));
        let file = std::fs::File::create(&log).expect("create the log file");
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_jssocket"));
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("SOCKET_") {
                cmd.env_remove(&name);
            }
        }
        cmd.args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(args)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(std::process::Stdio::null())
            .stdout(file.try_clone().expect("clone the log file"))
            .stderr(file);
        let limit = libc::rlimit {
            rlim_cur: nofile,
            rlim_max: nofile,
        };
        // SAFETY: between fork and exec the closure only calls setrlimit, which is
        // async-signal-safe, and touches no memory but its own copy of `limit`.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().expect("spawn jssocket");
        Binary { child, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Binary {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.log);
    }
}

/// One attacking connection: `GET /healthz` with keep-alive, then held open. Returns the
/// stream and what it got ("" when it was closed unanswered, or nothing came in time).
async fn attacker(addr: SocketAddr) -> (Option<TcpStream>, String) {
    let Ok(Ok(mut stream)) = timeout(RECV_TIMEOUT, TcpStream::connect(addr)).await else {
        return (None, String::new());
    };
    let request = "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n";
    if stream.write_all(request.as_bytes()).await.is_err() {
        return (Some(stream), String::new());
    }
    let mut buf = [0u8; 512];
    let answer = match timeout(RECV_TIMEOUT, stream.read(&mut buf)).await {
        Ok(Ok(n)) => String::from_utf8_lossy(&buf[..n]).into_owned(),
        _ => String::new(),
    };
    (Some(stream), answer)
}

/// The attack of the issue, on the real binary: more keep-alive connections than it has
/// descriptors. Without the TCP limit, accept fails with EMFILE and the health check below
/// times out.
#[tokio::test]
async fn the_binary_keeps_answering_health_checks_with_few_file_descriptors() {
    attack_with_few_file_descriptors(&[]).await;
}

/// A `--max-tcp-connections` above what the descriptors allow is lowered, with a warning,
/// rather than leaving no reserve (accept would then fail with EMFILE as without a limit).
#[tokio::test]
async fn a_tcp_limit_above_the_descriptors_is_lowered_with_a_warning() {
    let log = attack_with_few_file_descriptors(&["--max-tcp-connections", "1000"]).await;
    assert!(
        log.contains("--max-tcp-connections leaves no reserve"),
        "no warning about the lowered limit:\n{log}"
    );
}

/// Runs the attack against the binary started with `args` under an open-file limit of 200;
/// returns its log.
async fn attack_with_few_file_descriptors(args: &[&str]) -> String {
    const NOFILE: u64 = 200;
    const ATTACKERS: usize = 300;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let mut all_args = vec!["--http-idle-timeout", "60"];
    all_args.extend_from_slice(args);
    let binary = Binary::start(port, NOFILE, &all_args);
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let started = tokio::time::Instant::now();
    while TcpStream::connect(addr).await.is_err() {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the binary did not start listening:\n{}",
            binary.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // More connections than the process has descriptors, all at once, all kept open.
    let attack = futures_util::future::join_all((0..ATTACKERS).map(|_| attacker(addr))).await;
    let served = attack
        .iter()
        .filter(|(_, answer)| answer.starts_with("HTTP/1.1 200"))
        .count();
    assert!(served > 0, "no attacker was served:\n{}", binary.log());

    // While the attack's sockets are held, a health check is answered.
    let health = http(addr, "GET", "/healthz", &[], b"").await;
    assert_eq!(health.status, 200, "log:\n{}", binary.log());

    let log = binary.log();
    assert!(
        !log.contains("Too many open files"),
        "the accept loop ran out of descriptors:\n{log}"
    );
    drop(attack);
    log
}
