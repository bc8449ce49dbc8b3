//! Readiness (SPEC §8): `GET /readyz` answers 200 `ready` only while the node can do its job
//! (listening, not draining, and with `--redis-url` connected and subscribed), else 503 with
//! a one-line reason; draining on shutdown (`--drain-delay`); Redis problems are loud (warn
//! lines with the URL redacted, rate-limited while down) and on `/metrics`; a mistyped URL
//! stops the start. Real servers (in-process, or the built binary for SIGTERM), a real
//! `redis-server` killed and restarted, and a real Redis Cluster.

mod common;

#[macro_use]
#[path = "common/cluster.rs"]
mod nodes;

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::{Conn, LogCapture, Server, http, register, scrape, upgrade_refused, upgrade_request};
use nodes::{CLUSTER_TIMEOUT, Node, POLL, Redis, RedisCluster, wait_cluster};
use serde_json::json;

/// A password no log line, `/readyz` answer or metric may ever show.
const SECRET: &str = "TopS3cretPw";

/// Longest a readiness change may take to show (SPEC §8: "within a few seconds").
const READY_WITHIN: Duration = Duration::from_secs(5);

/// The process's log, captured once for every test of this binary (the subscriber is
/// global); tests tell their lines apart by the Redis port in them.
fn logs() -> &'static LogCapture {
    static LOGS: OnceLock<LogCapture> = OnceLock::new();
    LOGS.get_or_init(|| LogCapture::install("warn,jssocket=info"))
}

/// `GET path`: status and body.
async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let response = http(addr, "GET", path, &[], b"").await;
    (response.status, response.text())
}

/// Polls `/readyz` until `wanted(status, body)`; panics with the last answer after `within`.
async fn wait_ready(
    addr: SocketAddr,
    within: Duration,
    what: &str,
    wanted: impl Fn(u16, &str) -> bool,
) -> (u16, String) {
    let started = Instant::now();
    loop {
        let (status, body) = get(addr, "/readyz").await;
        if wanted(status, &body) {
            return (status, body);
        }
        assert!(
            started.elapsed() < within,
            "/readyz on {addr}: expected {what} within {within:?}, last answer {status} {body:?}"
        );
        tokio::time::sleep(POLL).await;
    }
}

/// A port nothing listens on (bound, then let go).
fn dead_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    listener.local_addr().expect("local address").port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_node_is_ready_and_healthz_is_unchanged() {
    let server = Server::start().await;
    assert_eq!(get(server.addr, "/readyz").await, (200, "ready\n".into()));
    // With a query string, as load balancers and kubelets may add one.
    assert_eq!(
        get(server.addr, "/readyz?probe=kubelet").await,
        (200, "ready\n".into())
    );
    assert_eq!(get(server.addr, "/healthz").await, (200, "OK\n".into()));
    let metrics = scrape(server.addr).await;
    assert_eq!(metrics.get("jssocket_ready", &[]), Some(1.0));
    assert_eq!(metrics.get("jssocket_redis_connected", &[]), Some(0.0));
    assert_eq!(metrics.get("jssocket_redis_errors_total", &[]), Some(0.0));
}

/// Redis down at start, up, killed, back: `/readyz`, the gauges and the log follow each
/// change, repeated failures are not logged each retry, and after the recovery the cluster
/// really works again (a client on A is served by a backend on B).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_follows_redis_down_up_down_and_back() {
    let logs = logs();
    let mut redis = Redis::start();
    let url = redis.url();
    redis.kill();
    let a = Node::start("a", &url);
    let b = Node::start("b", &url);

    // Down from the start: 503 with the reason, at once.
    for node in [&a, &b] {
        let (_, body) = wait_ready(node.addr, READY_WITHIN, "503 redis unreachable", |s, b| {
            s == 503 && b.starts_with("redis unreachable: ")
        })
        .await;
        assert!(
            body.starts_with(&format!("redis unreachable: {url}: ")) && body.ends_with('\n'),
            "{body:?}"
        );
        assert_eq!(body.lines().count(), 1, "one line: {body:?}");
        assert_eq!(get(node.addr, "/healthz").await, (200, "OK\n".into()));
    }
    // Retries (every second) while down are counted, not logged each time.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let metrics = scrape(a.addr).await;
    assert_eq!(metrics.get("jssocket_ready", &[]), Some(0.0));
    assert_eq!(metrics.get("jssocket_redis_connected", &[]), Some(0.0));
    let errors = metrics.value("jssocket_redis_errors_total", &[]);
    assert!(
        errors >= 3.0,
        "3 s down: several failed attempts, got {errors}"
    );
    let port = format!("127.0.0.1:{}", redis.port);
    let unreachable = |logs: &LogCapture| {
        logs.text()
            .lines()
            .filter(|l| l.contains("redis unreachable") && l.contains(&port))
            .filter(|l| l.contains("WARN"))
            .count()
    };
    assert_eq!(
        unreachable(logs),
        2,
        "one warning per node for the first failure, none per retry:\n{}",
        logs.text()
    );

    // Up: ready within a few seconds (the subscriber retries every second).
    redis.restart();
    for node in [&a, &b] {
        wait_ready(node.addr, READY_WITHIN, "200 ready", |s, b| {
            s == 200 && b == "ready\n"
        })
        .await;
        let metrics = scrape(node.addr).await;
        assert_eq!(metrics.get("jssocket_ready", &[]), Some(1.0));
        assert_eq!(metrics.get("jssocket_redis_connected", &[]), Some(1.0));
    }
    assert!(
        logs.lines_with("redis reachable; subscribing") >= 2 && logs.lines_with(&port) >= 4,
        "the recovery is logged:\n{}",
        logs.text()
    );

    // Killed: 503 within a few seconds, and the loss is logged once per node.
    redis.kill();
    for node in [&a, &b] {
        wait_ready(node.addr, READY_WITHIN, "503 redis unreachable", |s, b| {
            s == 503 && b.starts_with("redis unreachable: ")
        })
        .await;
        assert_eq!(
            scrape(node.addr).await.get("jssocket_redis_connected", &[]),
            Some(0.0)
        );
    }
    let lost = logs
        .text()
        .lines()
        .filter(|l| l.contains("WARN") && l.contains("redis connection lost") && l.contains(&port))
        .count();
    assert_eq!(lost, 2, "one warning per node:\n{}", logs.text());

    // Back: ready again, and the cluster carries messages again.
    redis.restart();
    for node in [&a, &b] {
        wait_ready(node.addr, READY_WITHIN, "200 ready", |s, b| {
            s == 200 && b == "ready\n"
        })
        .await;
    }
    wait_cluster(&[&a, &b]).await;
    let mut backend = b.backend("backend").await;
    let mut client = a.client("client").await;
    let id = register(&mut client, &mut backend).await;
    backend
        .send_event(
            "notify_client",
            json!({"target": id, "data": {"msg": "after the outage"}}),
        )
        .await;
    client
        .expect_text(&json!({"msg": "after the outage"}).to_string())
        .await;
}

/// A TCP proxy to Redis that can go silent, as a partition does: while frozen it swallows
/// every byte both ways and closes nothing (no RST, no FIN: nothing for the node to notice
/// but silence); on thaw the connections that lived through it end, and new ones pass.
struct Partition {
    addr: SocketAddr,
    frozen: tokio::sync::watch::Sender<bool>,
}

impl Partition {
    async fn start(redis: &Redis) -> Partition {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let upstream = SocketAddr::from(([127, 0, 0, 1], redis.port));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the partition proxy");
        let addr = listener.local_addr().expect("proxy address");
        let (frozen, watching) = tokio::sync::watch::channel(false);
        async fn pump(
            mut from: tokio::net::tcp::OwnedReadHalf,
            mut to: tokio::net::tcp::OwnedWriteHalf,
            mut frozen: tokio::sync::watch::Receiver<bool>,
        ) {
            let mut buf = vec![0u8; 16 * 1024];
            // A clone starts from what its original saw: only changes from now on count.
            frozen.borrow_and_update();
            loop {
                tokio::select! {
                    read = from.read(&mut buf) => {
                        let n = match read {
                            Ok(0) | Err(_) => return,
                            Ok(n) => n,
                        };
                        if *frozen.borrow() {
                            continue;
                        }
                        if to.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                    changed = frozen.changed() => {
                        // Thawed: this connection lost bytes; it ends.
                        if changed.is_err() || !*frozen.borrow() {
                            return;
                        }
                    }
                }
            }
        }
        tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let watching = watching.clone();
                tokio::spawn(async move {
                    let Ok(outbound) = tokio::net::TcpStream::connect(upstream).await else {
                        return;
                    };
                    let (in_read, in_write) = inbound.into_split();
                    let (out_read, out_write) = outbound.into_split();
                    tokio::select! {
                        () = pump(in_read, out_write, watching.clone()) => {}
                        () = pump(out_read, in_write, watching) => {}
                    }
                });
            }
        });
        Partition { addr, frozen }
    }

    fn url(&self) -> String {
        format!("redis://{}/", self.addr)
    }

    fn set_frozen(&self, frozen: bool) {
        self.frozen.send_replace(frozen);
    }
}

/// A partition that closes nothing: the node's connections to Redis look open but carry
/// nothing. Readiness still turns 503 within a few seconds (its publishes fail), the silent
/// subscription is given up and logged, and after the partition heals the node is ready again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_partition_is_noticed() {
    let logs = logs();
    let redis = Redis::start();
    let partition = Partition::start(&redis).await;
    let node = Node::start("partitioned", &partition.url());
    wait_ready(node.addr, CLUSTER_TIMEOUT, "200 ready", |s, b| {
        s == 200 && b == "ready\n"
    })
    .await;
    partition.set_frozen(true);
    let frozen = Instant::now();
    let (_, body) = wait_ready(node.addr, READY_WITHIN, "503", |s, _| s == 503).await;
    assert!(body.starts_with("redis"), "{body:?}");
    // The subscription is given up after 10 s of silence, and said so.
    let proxy = format!("127.0.0.1:{}", partition.addr.port());
    while logs
        .text()
        .lines()
        .filter(|l| l.contains("WARN") && l.contains(&proxy))
        .all(|l| !l.contains("silent"))
    {
        assert!(
            frozen.elapsed() < Duration::from_secs(15),
            "no warning about the silent connection:\n{}",
            logs.text()
        );
        tokio::time::sleep(POLL).await;
    }
    // Still not ready while it lasts.
    assert_eq!(get(node.addr, "/readyz").await.0, 503);
    partition.set_frozen(false);
    wait_ready(node.addr, CLUSTER_TIMEOUT, "200 ready", |s, b| {
        s == 200 && b == "ready\n"
    })
    .await;
}

/// The password in `--redis-url` appears nowhere: not in the log, not in `/readyz`, not in
/// `/metrics`, whether Redis refuses it or cannot be reached, in both URL forms.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_redis_password_is_never_shown() {
    let logs = logs();
    // A Redis without a password refuses AUTH; a dead port refuses the connection.
    let redis = Redis::start();
    let refused = format!("redis://:{SECRET}@127.0.0.1:{}/0", redis.port);
    let dead = dead_port();
    let unreachable = format!("redis://admin:{SECRET}@127.0.0.1:{dead}/");
    let shown = [
        format!("redis://:***@127.0.0.1:{}/0", redis.port),
        format!("redis://admin:***@127.0.0.1:{dead}/"),
    ];
    let nodes = [
        Node::start("auth", &refused),
        Node::start("dead", &unreachable),
    ];
    for (node, shown) in nodes.iter().zip(&shown) {
        let (_, body) = wait_ready(node.addr, READY_WITHIN, "503 redis unreachable", |s, b| {
            s == 503 && b.starts_with("redis unreachable: ")
        })
        .await;
        assert!(
            body.starts_with(&format!("redis unreachable: {shown}: ")),
            "{body:?}"
        );
        assert!(
            !body.contains(SECRET),
            "/readyz shows the password: {body:?}"
        );
        let metrics = http(node.addr, "GET", "/metrics", &[], b"").await.text();
        assert!(!metrics.contains(SECRET), "/metrics shows the password");
        let start = Instant::now();
        while logs.lines_with(shown) == 0 {
            assert!(
                start.elapsed() < READY_WITHIN,
                "no log line names {shown}:\n{}",
                logs.text()
            );
            tokio::time::sleep(POLL).await;
        }
    }
    let text = logs.text();
    assert!(
        text.lines().any(|l| l.contains("WARN")
            && l.contains("redis unreachable")
            && l.contains(&shown[0])),
        "a warning names the redacted URL:\n{text}"
    );
    assert!(
        !text.contains(SECRET),
        "the log shows the password:\n{text}"
    );
}

/// A Redis Cluster (sharded subscriptions, other code in the transport): ready once
/// subscribed on every shard, with the same gauges.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_on_a_redis_cluster_is_ready_once_subscribed() {
    let cluster = RedisCluster::start();
    let node = Node::start("sharded", &cluster.url());
    wait_ready(node.addr, CLUSTER_TIMEOUT, "200 ready", |s, b| {
        s == 200 && b == "ready\n"
    })
    .await;
    let metrics = scrape(node.addr).await;
    assert_eq!(metrics.get("jssocket_ready", &[]), Some(1.0));
    assert_eq!(metrics.get("jssocket_redis_connected", &[]), Some(1.0));
    assert_eq!(metrics.get("jssocket_cluster_connected", &[]), Some(1.0));
}

/// A Redis Cluster master dies and its replica takes over: the node's sharded subscription
/// is lost (logged at warn, counted) and made again at the new master, and `/readyz` is 200
/// again within a few seconds of the failover.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_cluster_failover_is_logged_and_readiness_recovers() {
    let logs = logs();
    let mut cluster = RedisCluster::start_with_replicas(1);
    let url = cluster.url();
    let node = Node::start("failover", &url);
    wait_ready(node.addr, CLUSTER_TIMEOUT, "200 ready", |s, b| {
        s == 200 && b == "ready\n"
    })
    .await;
    // The master of the topic every node reads (heartbeats): this node is subscribed there.
    let (master, _) = cluster.owner_of("jssocket:all");
    let before = scrape(node.addr)
        .await
        .value("jssocket_redis_errors_total", &[]);
    // Returns once the replica has taken over.
    tokio::task::block_in_place(|| cluster.kill(master));
    let started = Instant::now();
    let lost = |logs: &LogCapture| {
        logs.text()
            .lines()
            .any(|l| l.contains("WARN") && l.contains("redis connection lost") && l.contains(&url))
    };
    while !lost(logs) {
        assert!(
            started.elapsed() < CLUSTER_TIMEOUT,
            "the lost subscription was not logged:\n{}",
            logs.text()
        );
        tokio::time::sleep(POLL).await;
    }
    wait_ready(node.addr, CLUSTER_TIMEOUT, "200 ready", |s, b| {
        s == 200 && b == "ready\n"
    })
    .await;
    let after = scrape(node.addr)
        .await
        .value("jssocket_redis_errors_total", &[]);
    assert!(after > before, "the loss is counted: {before} then {after}");
}

/// In-process shutdown with `--drain-delay 2`: draining at once (readyz 503, upgrades 503,
/// HTTP and open connections served), connections closed 1001 after the delay, and `run`
/// returns within drain delay + shutdown timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draining_refuses_new_clients_then_closes_the_open_ones() {
    let mut server = Server::with_args(&["--drain-delay", "2", "--shutdown-timeout", "2"]).await;
    let mut open = server.admin("open").await;
    let signalled = Instant::now();
    server.signal_shutdown();
    let (status, body) = wait_ready(
        server.addr,
        Duration::from_secs(1),
        "503 draining",
        |s, _| s == 503,
    )
    .await;
    assert_eq!((status, body.as_str()), (503, "draining\n"));
    assert_eq!(get(server.addr, "/healthz").await, (200, "OK\n".into()));
    let metrics = scrape(server.addr).await;
    assert_eq!(metrics.get("jssocket_ready", &[]), Some(0.0));
    let (status, body) = upgrade_refused(upgrade_request(&server.url(), None), "late").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("draining"), "{body:?}");
    // An admin is refused too: this node takes no new connection.
    let (status, _) = upgrade_refused(
        upgrade_request(&server.url(), Some(common::PASSWORD)),
        "admin",
    )
    .await;
    assert_eq!(status, 503);
    // The open connection still works during the delay…
    open.ping(1, false).await;
    // …and is closed as shutdown closes it, after the delay.
    let code = open.expect_close_code(1001).await;
    let after = signalled.elapsed();
    assert!(
        after >= Duration::from_millis(1800),
        "closed {after:?} after the signal, before the 2 s drain delay ({code:?})"
    );
    server.shutdown().await.expect("run returns Ok");
    assert!(
        signalled.elapsed() < Duration::from_secs(4) + Duration::from_millis(500),
        "run returned {:?} after the signal: over drain delay + shutdown timeout",
        signalled.elapsed()
    );
}

/// The built binary on SIGTERM with `--drain-delay 2 --shutdown-timeout 2`: `/readyz` says
/// `draining` while `/healthz` says OK and an upgrade is refused, and the process exits 0
/// within the bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_then_exits_within_the_bound() {
    let port = dead_port();
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut child = Command::new(env!("CARGO_BIN_EXE_jssocket"))
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(["--drain-delay", "2", "--shutdown-timeout", "2"])
        .env("SOCKET_AUTH", common::FAST_HASH)
        .env_remove("SOCKET_REDIS_URL")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn the built jssocket");
    let started = Instant::now();
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "jssocket did not listen on {addr}"
        );
        tokio::time::sleep(POLL).await;
    }
    let url = format!("ws://{addr}/ws");
    let mut open = Conn::connect(&url, None, "open").await;
    assert_eq!(get(addr, "/readyz").await, (200, "ready\n".into()));
    let status = Command::new("sh")
        .args(["-c", "kill -s TERM \"$1\"", "sh", &child.id().to_string()])
        .status()
        .expect("run sh -c kill");
    assert!(status.success(), "kill -s TERM failed");
    let signalled = Instant::now();
    wait_ready(addr, Duration::from_secs(1), "503 draining", |s, b| {
        s == 503 && b == "draining\n"
    })
    .await;
    assert_eq!(get(addr, "/healthz").await, (200, "OK\n".into()));
    let (status, body) = upgrade_refused(upgrade_request(&url, None), "late").await;
    assert_eq!(status, 503, "{body}");
    open.expect_close_code(1001).await;
    let bound = Duration::from_secs(2 + 2) + Duration::from_secs(1);
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            assert!(status.success(), "exit status {status:?}");
            break;
        }
        if signalled.elapsed() > bound {
            let _ = child.kill();
            panic!("jssocket still running {bound:?} after SIGTERM");
        }
        tokio::time::sleep(POLL).await;
    }
}

/// A `--redis-url` that does not parse stops the start: one line on stderr naming the
/// option and the expected form (the password redacted), exit status 2.
#[test]
fn a_mistyped_redis_url_fails_at_start() {
    for url in [
        format!("redis://:{SECRET}@host:notaport/"),
        "localhost:6379".to_string(),
        format!("redis//:{SECRET}@host"),
    ] {
        let output = Command::new(env!("CARGO_BIN_EXE_jssocket"))
            .args(["-p", "0", "--redis-url", &url])
            .env("SOCKET_AUTH", common::FAST_HASH)
            .output()
            .expect("run the built jssocket");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{url}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{url}: one line: {stderr:?}");
        assert!(
            stderr.starts_with("error: --redis-url: ") && stderr.contains("expected redis://"),
            "{url}: {stderr:?}"
        );
        assert!(
            !stderr.contains(SECRET),
            "{url}: shows the password: {stderr}"
        );
    }
}
