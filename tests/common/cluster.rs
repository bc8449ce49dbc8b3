//! Cluster test support: what joins the nodes ([`Backing`]: the in-process loopback, a real
//! `redis-server`, or a real 3-master Redis Cluster, started per test), TCP proxies that cut
//! one node off, and in-process jssocket nodes that can be stopped or crashed. Shared by
//! the cluster tests (included with `#[path]`), with the `on!` macro that runs a scenario
//! on every backing.
#![allow(dead_code)]

/// Runs each scenario on every backing named: `on!([Loopback, Redis] scenario, …)` makes
/// `mod scenario { Loopback, Redis }`, each test calling `scenario(Kind::…)` (a test file
/// includes this module with `#[macro_use]` and imports `Kind`).
#[allow(unused_macros)]
macro_rules! on {
    ($kinds:tt $($scenario:ident),+ $(,)?) => {
        $(on_each!($kinds $scenario);)+
    };
}

#[allow(unused_macros)]
macro_rules! on_each {
    ([$($kind:ident),+] $scenario:ident) => {
        mod $scenario {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                #[allow(non_snake_case)]
                async fn $kind() {
                    super::$scenario(super::Kind::$kind).await;
                }
            )+
        }
    };
}

use std::hash::BuildHasher;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream as StdTcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use std::sync::Arc;

use jssocket::backplane::Loopback;
use jssocket::cluster::Cluster;
use jssocket::config::Config;
use jssocket::relay::Relay;
use tokio::sync::{oneshot, watch};

use crate::common::{Conn, FAST_HASH, PASSWORD, RECV_TIMEOUT, scrape};

/// What a test says when there is no Redis to run against.
pub const REDIS_MISSING: &str = "install redis-server (apt-get install redis-server)";
/// Longest wait for Redis to answer after it was started.
pub const REDIS_START_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest wait for the nodes to see each other (or to notice a change): heartbeats come every
/// second and a silent node is forgotten after 3.5 s.
pub const CLUSTER_TIMEOUT: Duration = Duration::from_secs(10);
/// How often `/metrics` is polled while waiting.
pub const POLL: Duration = Duration::from_millis(25);

// ---------------------------------------------------------------- Redis

/// A `redis-server` child process on a port of its own, killed when dropped.
pub struct Redis {
    pub port: u16,
    child: Option<Child>,
    /// A Redis Cluster member: where it keeps its node file.
    cluster_dir: Option<PathBuf>,
}

impl Redis {
    /// Starts Redis on a free port below the ephemeral range (so no outgoing connection of a
    /// parallel test takes it while [`Redis::kill`]ed for a restart), waiting until it answers.
    pub fn start() -> Redis {
        Redis::start_maybe_in(None)
    }

    /// A Redis with `--cluster-enabled yes`, its node file in `dir`; not yet in a cluster.
    pub fn start_in_cluster(dir: &std::path::Path) -> Redis {
        Redis::start_maybe_in(Some(dir.to_path_buf()))
    }

    fn start_maybe_in(cluster_dir: Option<PathBuf>) -> Redis {
        let hasher = std::collections::hash_map::RandomState::new();
        for attempt in 0u32..50 {
            // Below 22,000: a cluster member also listens on its port + 10,000 (the bus).
            let port = 10_000 + (hasher.hash_one(attempt) % 12_000) as u16;
            let bus = port + 10_000;
            if std::net::TcpListener::bind(("127.0.0.1", port)).is_err()
                || std::net::TcpListener::bind(("127.0.0.1", bus)).is_err()
            {
                continue;
            }
            let mut redis = Redis {
                port,
                child: None,
                cluster_dir: cluster_dir.clone(),
            };
            if redis.spawn() {
                return redis;
            }
        }
        panic!("could not start redis-server on a free port after 50 attempts");
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// Spawns redis-server on `self.port` and waits until it answers; false if it exited
    /// (port taken) instead.
    pub fn spawn(&mut self) -> bool {
        let mut command = Command::new(redis_binary());
        // Its files (a replica's sync writes an RDB even with `--save ""`) in a scratch
        // directory, never in the checkout.
        let dir = self.cluster_dir.clone().unwrap_or_else(std::env::temp_dir);
        command.arg("--dir").arg(&dir);
        if let Some(dir) = &self.cluster_dir {
            let file = dir.join(format!("nodes-{}.conf", self.port));
            command
                .args(["--cluster-enabled", "yes"])
                .arg("--cluster-config-file")
                .arg(file)
                .args(["--cluster-node-timeout", "2000"])
                // A replica takes over however long ago it last heard from its master (it
                // may not have synced yet: there is no data, only Pub/Sub).
                .args(["--cluster-replica-validity-factor", "0"]);
        }
        let child = command
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .args(["--daemonize", "no", "--loglevel", "warning"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        let mut child = match child {
            Ok(child) => child,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!("{REDIS_MISSING}"),
            Err(e) => panic!("cannot run redis-server ({e}); {REDIS_MISSING}"),
        };
        let deadline = Instant::now() + REDIS_START_TIMEOUT;
        loop {
            if answers_as(self.port, child.id()) {
                self.child = Some(child);
                return true;
            }
            if let Ok(Some(_)) = child.try_wait() {
                return false;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "redis-server on port {} did not answer within {REDIS_START_TIMEOUT:?}",
                    self.port
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Kills Redis at once (SIGKILL): every node loses its connections mid-flight.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts Redis again on the same port (empty: nothing was persisted).
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "restart of a running redis-server");
        assert!(
            self.spawn(),
            "redis-server did not restart on port {} (taken meanwhile?)",
            self.port
        );
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `redis-server` on the PATH, else `/usr/bin/redis-server`; the test fails without one.
pub fn redis_binary() -> PathBuf {
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("redis-server"))
            .find(|candidate| candidate.is_file())
    });
    let binary = on_path.unwrap_or_else(|| PathBuf::from("/usr/bin/redis-server"));
    assert!(binary.is_file(), "{REDIS_MISSING}");
    binary
}

/// Is the Redis answering on `port` the process `pid` (ours, not one that took the port
/// first)? Asks `INFO server` and looks for its `process_id`.
pub fn answers_as(port: u16, pid: u32) -> bool {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let Ok(mut stream) = StdTcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
    if stream.write_all(b"INFO server\r\n").is_err() {
        return false;
    }
    let wanted = format!("process_id:{pid}\r\n");
    let mut answer = Vec::new();
    let mut buffer = [0u8; 4096];
    while answer.len() < 64 * 1024 {
        match stream.read(&mut buffer) {
            Ok(0) | Err(_) => return false,
            Ok(n) => answer.extend_from_slice(&buffer[..n]),
        }
        if String::from_utf8_lossy(&answer).contains(&wanted) {
            return true;
        }
    }
    false
}

/// A TCP proxy to Redis for one node, that can cut that node off (drop its connections and
/// refuse new ones) while Redis itself stays up for the others.
pub struct Proxy {
    addr: SocketAddr,
    open: watch::Sender<bool>,
}

impl Proxy {
    pub async fn start(redis: &Redis) -> Proxy {
        let upstream = SocketAddr::from(([127, 0, 0, 1], redis.port));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the proxy");
        let addr = listener.local_addr().expect("proxy address");
        let (open, watching) = watch::channel(true);
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if !*watching.borrow() {
                    continue;
                }
                let mut watching = watching.clone();
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(upstream).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = watching.wait_for(|open| !open) => {}
                    }
                });
            }
        });
        Proxy { addr, open }
    }

    pub fn url(&self) -> String {
        format!("redis://{}/", self.addr)
    }

    pub fn set_open(&self, open: bool) {
        self.open.send_replace(open);
    }
}

// ---------------------------------------------------------------- nodes

/// One jssocket node in this process, on its own thread and runtime (as in production), with
/// `--redis-url`. [`Node::stop`] is a graceful shutdown (SIGTERM); [`Node::kill`] is a crash:
/// the runtime is dropped with every task in it, nothing is said to anyone.
pub struct Node {
    pub name: String,
    pub addr: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    kill: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Node {
    /// A node on Redis at `url` (see [`Redis::url`], [`Proxy::url`]).
    pub fn start(name: &str, url: &str) -> Node {
        Node::start_with(name, url, &[])
    }

    /// A node with more command-line options, e.g. `&["--pending-timeout", "5"]`.
    pub fn start_with(name: &str, url: &str, args: &[&str]) -> Node {
        let mut argv = vec!["--redis-url", url];
        argv.extend_from_slice(args);
        Node::start_on(name, None, &argv)
    }

    /// A node on `loopback` (else on the `--redis-url` in `args`).
    pub fn start_on(name: &str, loopback: Option<&Loopback>, args: &[&str]) -> Node {
        let mut argv = vec![
            "jssocket",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--auth",
            FAST_HASH,
        ];
        argv.extend_from_slice(args);
        let config = Config::from_args(argv).expect("cluster options must be valid");
        let relay = match loopback {
            Some(loopback) => {
                let cluster = Cluster::new(Arc::new(loopback.clone()));
                Relay::with_backplane(config, Arc::new(cluster))
            }
            None => Relay::new(config),
        };
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
        listener.set_nonblocking(true).expect("non-blocking");
        let addr = listener.local_addr().expect("local address");
        let (shutdown_tx, shutdown_rx) = oneshot::channel::<()>();
        let (kill_tx, mut kill_rx) = oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name(format!("node-{name}"))
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                    .expect("node runtime");
                runtime.block_on(async move {
                    let listener =
                        tokio::net::TcpListener::from_std(listener).expect("tokio listener");
                    let server = jssocket::server::serve(listener, relay, async move {
                        let _ = shutdown_rx.await;
                    });
                    tokio::select! {
                        result = server => result.expect("node failed"),
                        // A crash: the server's future is dropped where it stands.
                        Ok(()) = &mut kill_rx => {}
                    }
                });
                // Every task (connections, Redis subscriber, publisher, heartbeat) is dropped
                // without running another line: sockets close, no close frame, no `Leaving`.
                runtime.shutdown_background();
            })
            .expect("spawn a node thread");
        Node {
            name: name.to_string(),
            addr,
            shutdown: Some(shutdown_tx),
            kill: Some(kill_tx),
            thread: Some(thread),
        }
    }

    pub fn url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }

    /// A client connection (no `auth` header), named `<name>@<node>`.
    pub async fn client(&self, name: &str) -> Conn {
        Conn::connect(&self.url(), None, &format!("{name}@{}", self.name)).await
    }

    /// An admin connection (header `auth: 12345678`).
    pub async fn admin(&self, name: &str) -> Conn {
        Conn::connect(
            &self.url(),
            Some(PASSWORD),
            &format!("{name}@{}", self.name),
        )
        .await
    }

    /// An admin that joined the server pool.
    pub async fn backend(&self, name: &str) -> Conn {
        let mut conn = self.admin(name).await;
        conn.server_connect().await;
        conn
    }

    /// Asks the node to stop, as SIGTERM does (without waiting).
    pub fn signal_stop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
    }

    /// Waits (bounded) until the node's thread has ended, after a stop or a kill.
    pub fn wait_ended(&mut self) {
        if let Some(thread) = self.thread.take() {
            let deadline = Instant::now() + RECV_TIMEOUT;
            while !thread.is_finished() {
                assert!(
                    Instant::now() < deadline,
                    "{}: node did not end within {RECV_TIMEOUT:?}",
                    self.name
                );
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }

    /// Crashes the node and waits (bounded) until its thread has let go of everything.
    pub fn kill(&mut self) {
        if let Some(kill) = self.kill.take() {
            let _ = kill.send(());
        }
        self.wait_ended();
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.signal_stop();
    }
}

/// The value of a metric sample without labels on `node`.
pub async fn metric(node: &Node, name: &str) -> Option<f64> {
    scrape(node.addr).await.get(name, &[])
}

/// Waits until every node in `nodes` reports `name == value`; panics with what each one says
/// after `within`. Returns how long it took.
pub async fn wait_all(nodes: &[&Node], name: &str, value: f64, within: Duration) -> Duration {
    let started = Instant::now();
    loop {
        let mut values = Vec::new();
        for node in nodes {
            values.push((node.name.clone(), metric(node, name).await));
        }
        if values.iter().all(|(_, v)| *v == Some(value)) {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < within,
            "{name}: expected {value} on every node within {within:?}, got {values:?}"
        );
        tokio::time::sleep(POLL).await;
    }
}

/// Waits until every node is subscribed to Redis and sees `nodes.len()` live nodes.
pub async fn wait_cluster(nodes: &[&Node]) {
    wait_all(nodes, "jssocket_cluster_connected", 1.0, CLUSTER_TIMEOUT).await;
    let n = nodes.len() as f64;
    wait_all(nodes, "jssocket_cluster_nodes", n, CLUSTER_TIMEOUT).await;
}

/// A fresh Redis and `n` nodes on it, named `n0`, `n1`, …, ready.
pub async fn cluster(n: usize) -> (Redis, Vec<Node>) {
    let redis = Redis::start();
    let nodes: Vec<Node> = (0..n)
        .map(|i| Node::start(&format!("n{i}"), &redis.url()))
        .collect();
    wait_cluster(&nodes.iter().collect::<Vec<_>>()).await;
    (redis, nodes)
}

// ---------------------------------------------------------------- backings

/// What joins the nodes of a test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// In this process: no Redis at all.
    Loopback,
    /// One `redis-server`, Pub/Sub.
    Redis,
    /// Three `redis-server --cluster-enabled yes` made one Redis Cluster: sharded Pub/Sub.
    RedisCluster,
}

/// A running backing, stopped when dropped.
pub enum Backing {
    Loopback(Loopback),
    Redis(Redis),
    RedisCluster(RedisCluster),
}

impl Backing {
    pub fn start(kind: Kind) -> Backing {
        match kind {
            Kind::Loopback => Backing::Loopback(Loopback::new()),
            Kind::Redis => Backing::Redis(Redis::start()),
            Kind::RedisCluster => Backing::RedisCluster(RedisCluster::start()),
        }
    }

    /// A node on this backing, with more command-line options.
    pub fn node(&self, name: &str, args: &[&str]) -> Node {
        match self {
            Backing::Loopback(loopback) => Node::start_on(name, Some(loopback), args),
            Backing::Redis(redis) => Node::start_with(name, &redis.url(), args),
            Backing::RedisCluster(cluster) => Node::start_with(name, &cluster.url(), args),
        }
    }

    /// Takes the backing away from every node at once (Redis killed, the loopback down).
    pub fn outage(&mut self) {
        match self {
            Backing::Loopback(loopback) => loopback.set_up(false),
            Backing::Redis(redis) => redis.kill(),
            Backing::RedisCluster(_) => panic!("no outage test runs on a Redis Cluster"),
        }
    }

    /// Brings it back (Redis restarted empty on the same port).
    pub fn restore(&mut self) {
        match self {
            Backing::Loopback(loopback) => loopback.set_up(true),
            Backing::Redis(redis) => redis.restart(),
            Backing::RedisCluster(_) => panic!("no outage test runs on a Redis Cluster"),
        }
    }
}

/// A fresh backing of `kind` and `n` nodes on it, named `n0`, `n1`, …, ready.
pub async fn cluster_on(kind: Kind, n: usize) -> (Backing, Vec<Node>) {
    let backing = Backing::start(kind);
    let nodes: Vec<Node> = (0..n)
        .map(|i| backing.node(&format!("n{i}"), &[]))
        .collect();
    wait_cluster(&nodes.iter().collect::<Vec<_>>()).await;
    (backing, nodes)
}

/// A Redis Cluster of three masters (and `replicas` replicas of each), each a
/// `redis-server` child process on a port of its own, its slots spread by
/// `redis-cli --cluster create`. Killed when dropped.
pub struct RedisCluster {
    /// Masters first, then replicas (as `--cluster create` pairs them).
    pub members: Vec<Redis>,
    dir: PathBuf,
}

impl RedisCluster {
    pub fn start() -> RedisCluster {
        RedisCluster::start_with_replicas(0)
    }

    pub fn start_with_replicas(replicas: usize) -> RedisCluster {
        let dir = std::env::temp_dir().join(format!(
            "jssocket-redis-cluster-{}-{}",
            std::process::id(),
            std::collections::hash_map::RandomState::new().hash_one(0u8)
        ));
        std::fs::create_dir_all(&dir).expect("a directory for the cluster's node files");
        let members: Vec<Redis> = (0..3 * (1 + replicas))
            .map(|_| Redis::start_in_cluster(&dir))
            .collect();
        let addrs: Vec<String> = members
            .iter()
            .map(|r| format!("127.0.0.1:{}", r.port))
            .collect();
        let created = Command::new(redis_cli_binary())
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output()
            .unwrap_or_else(|e| panic!("cannot run redis-cli ({e}); {REDIS_MISSING}"));
        assert!(
            created.status.success(),
            "redis-cli --cluster create failed: {}",
            String::from_utf8_lossy(&created.stderr)
        );
        let cluster = RedisCluster { members, dir };
        cluster.wait_ok();
        cluster
    }

    /// The port of the master that serves `topic`'s slot now, and that slot.
    pub fn owner_of(&self, topic: &str) -> (u16, u16) {
        let mut conn = self.connection();
        let slot: u16 = redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(topic)
            .query(&mut conn)
            .expect("CLUSTER KEYSLOT");
        let ranges: Vec<redis::Value> = redis::cmd("CLUSTER")
            .arg("SLOTS")
            .query(&mut conn)
            .expect("CLUSTER SLOTS");
        for range in ranges {
            let redis::Value::Array(fields) = range else {
                continue;
            };
            let number = |v: &redis::Value| match v {
                redis::Value::Int(n) => *n,
                _ => -1,
            };
            let (start, end) = (number(&fields[0]), number(&fields[1]));
            if (start..=end).contains(&i64::from(slot))
                && let redis::Value::Array(master) = &fields[2]
            {
                return (number(&master[1]) as u16, slot);
            }
        }
        panic!("no master serves slot {slot}");
    }

    /// Moves `slot` (which holds no keys: pub/sub only) from the master on `from` to the
    /// master on `to`, as `redis-cli --cluster reshard` would, and waits until every master
    /// agrees.
    pub fn move_slot(&self, slot: u16, from: u16, to: u16) {
        let id = |port: u16| -> String {
            redis::cmd("CLUSTER")
                .arg("MYID")
                .query(&mut self.connection_to(port))
                .expect("CLUSTER MYID")
        };
        let (from_id, to_id) = (id(from), id(to));
        let setslot = |port: u16, args: &[&str]| {
            let _: () = redis::cmd("CLUSTER")
                .arg("SETSLOT")
                .arg(slot)
                .arg(args)
                .query(&mut self.connection_to(port))
                .unwrap_or_else(|e| panic!("CLUSTER SETSLOT {slot} {args:?} on {port}: {e}"));
        };
        setslot(to, &["IMPORTING", &from_id]);
        setslot(from, &["MIGRATING", &to_id]);
        setslot(to, &["NODE", &to_id]);
        setslot(from, &["NODE", &to_id]);
        for member in self.live() {
            if member.port != to && member.port != from {
                let _: redis::RedisResult<()> = redis::cmd("CLUSTER")
                    .arg("SETSLOT")
                    .arg(slot)
                    .arg("NODE")
                    .arg(&to_id)
                    .query(&mut self.connection_to(member.port));
            }
        }
        self.wait_ok();
    }

    /// Kills the member on `port` (SIGKILL) and waits until the cluster is whole again (its
    /// replica took over).
    pub fn kill(&mut self, port: u16) {
        for member in &mut self.members {
            if member.port == port {
                member.kill();
            }
        }
        self.wait_ok();
    }

    fn live(&self) -> impl Iterator<Item = &Redis> {
        self.members.iter().filter(|m| m.is_running())
    }

    fn connection(&self) -> redis::Connection {
        let port = self.live().next().expect("a live member").port;
        self.connection_to(port)
    }

    fn connection_to(&self, port: u16) -> redis::Connection {
        redis::Client::open(format!("redis://127.0.0.1:{port}/"))
            .and_then(|client| client.get_connection())
            .unwrap_or_else(|e| panic!("connect to the Redis on {port}: {e}"))
    }

    /// Seed nodes, as `--redis-url` takes a Redis Cluster: comma-separated.
    pub fn url(&self) -> String {
        self.members
            .iter()
            .map(Redis::url)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Waits until every master says `cluster_state:ok` (every slot served).
    fn wait_ok(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        for master in self.live() {
            loop {
                if ask(master.port, "CLUSTER INFO\r\n", "cluster_state:ok") {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "the Redis Cluster on port {} is not ok after 20 s",
                    master.port
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for member in &mut self.members {
            member.kill();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `redis-cli` beside `redis-server`; the test fails without one.
pub fn redis_cli_binary() -> PathBuf {
    let cli = redis_binary().with_file_name("redis-cli");
    assert!(cli.is_file(), "{REDIS_MISSING} (redis-cli is missing)");
    cli
}

/// Sends `command` to the Redis on `port`; true when its answer contains `wanted`.
fn ask(port: u16, command: &str, wanted: &str) -> bool {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let Ok(mut stream) = StdTcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
    if stream.write_all(command.as_bytes()).is_err() {
        return false;
    }
    let mut answer = Vec::new();
    let mut buffer = [0u8; 4096];
    while answer.len() < 64 * 1024 {
        match stream.read(&mut buffer) {
            Ok(0) | Err(_) => return false,
            Ok(n) => answer.extend_from_slice(&buffer[..n]),
        }
        if String::from_utf8_lossy(&answer).contains(wanted) {
            return true;
        }
    }
    false
}
