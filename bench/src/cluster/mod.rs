//! The cluster scenarios of issue 11 (`cluster-route`, `cluster-p2p`, `cluster-hold`): each
//! starts its own `redis-server` and N jssocket node processes on loopback, measures, and
//! kills them all when it ends (also when it fails or times out: the children die with the
//! bench, see [`spawn_child`]).
//!
//! The measure of routing is each node's `jssocket_cluster_received_total` counter (messages
//! the node received from Redis), read from its `/metrics`; the measure of cost is the nodes'
//! CPU time (utime + stime from /proc).

pub mod hold;
pub mod p2p;
pub mod route;

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};

use crate::common::{Ctx, Target};
use crate::stats::{ProcSample, proc_sample};

/// The counter that tells how many messages a node received from Redis.
pub const RECEIVED: &str = "jssocket_cluster_received_total";
/// The counter of the deliveries among them (notifies, publishes, acks; no heartbeats). Only
/// servers with routing (issue 11) have it.
pub const DELIVERIES: &str = "jssocket_cluster_deliveries_received_total";
/// The gauge of live nodes a node knows, itself included.
pub const NODES: &str = "jssocket_cluster_nodes";

/// Most connections one node may hold here: the hard RLIMIT_NOFILE of this machine is 20 000
/// per process and cannot be raised, and a node needs some descriptors of its own.
pub const MAX_PER_NODE: usize = 19_000;

/// Where the servers come from and how they are started.
pub struct Setup {
    /// The jssocket binary (`--server-bin` / `JSSOCKET_BIN`).
    pub server_bin: PathBuf,
    pub redis_bin: PathBuf,
    /// `redis-cli`, which makes the Redis Cluster of `redis_cluster`.
    pub redis_cli: PathBuf,
    /// Three `redis-server --cluster-enabled yes` made one Redis Cluster (sharded Pub/Sub)
    /// instead of one Redis; the nodes get the three as a comma-separated `--redis-url`.
    pub redis_cluster: bool,
    /// The admin password; the nodes get a cost-4 bcrypt hash of it (fast admin logins).
    pub password: String,
    /// `--max-connections` and `--max-tcp-connections` of every node.
    pub max_connections: usize,
    /// Log files of Redis and the nodes go here.
    pub log_dir: PathBuf,
}

/// One running jssocket node.
pub struct Node {
    pub target: Target,
    pub metrics_addr: SocketAddr,
    pub pid: u32,
    _child: Child,
}

/// Redis and the nodes; dropping it kills them.
pub struct Cluster {
    pub nodes: Vec<Node>,
    /// The redis-server processes (one, or the masters of a Redis Cluster).
    pub redis_pids: Vec<u32>,
    _redis: Vec<Child>,
}

/// The Redis the nodes use: its `--redis-url` and its processes.
struct Backing {
    url: String,
    pids: Vec<u32>,
    children: Vec<Child>,
}

/// Masters of the Redis Cluster of `--redis-cluster`: the fewest `redis-cli --cluster create`
/// accepts.
const CLUSTER_MASTERS: usize = 3;

/// A port that was free a moment ago (the OS picked it for a listener we closed at once).
pub fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("binding port 0")?;
    Ok(l.local_addr()?.port())
}

/// Starts `program`, its output appended to `log`; it is killed when the handle drops and
/// (PR_SET_PDEATHSIG) when the bench dies, so no server outlives a run.
pub fn spawn_child(program: &Path, args: &[String], log: &Path, stdin: Stdio) -> Result<Child> {
    let out = std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let err = out.try_clone()?;
    let mut cmd = Command::new(program);
    cmd.args(args)
        .env("RUST_LOG", "warn")
        .stdin(stdin)
        .stdout(out)
        .stderr(err)
        .kill_on_drop(true);
    set_parent_death_signal(&mut cmd);
    cmd.spawn()
        .with_context(|| format!("starting {}", program.display()))
}

/// Asks the kernel to SIGKILL the child when the bench's thread that started it ends.
pub fn set_parent_death_signal(cmd: &mut Command) {
    // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
}

impl Cluster {
    /// Starts Redis and `n` nodes and waits until every node counts `n` live nodes.
    pub async fn start(setup: &Setup, n: usize, ctx: &Ctx) -> Result<Cluster> {
        std::fs::create_dir_all(&setup.log_dir)
            .with_context(|| format!("creating {}", setup.log_dir.display()))?;
        let backing = if setup.redis_cluster {
            start_redis_cluster(setup, ctx).await?
        } else {
            let port = free_port()?;
            let child = start_redis(setup, port, &setup.log_dir.join("redis.log"), &[])?;
            let pid = child.id().context("redis-server exited at once")?;
            wait_redis(port, ctx).await?;
            Backing {
                url: format!("redis://127.0.0.1:{port}/"),
                pids: vec![pid],
                children: vec![child],
            }
        };
        // Cost 4: the nodes check every admin login with it, and the bench logs in once per
        // node; the default cost would add seconds of CPU to what is measured.
        let hash = bcrypt::hash(&setup.password, 4).context("hashing the admin password")?;
        let mut nodes = Vec::with_capacity(n);
        for i in 0..n {
            let port = free_port()?;
            let args: Vec<String> = [
                "-h",
                "127.0.0.1",
                "-p",
                &port.to_string(),
                "--redis-url",
                &backing.url,
                "--auth",
                &hash,
                "--max-connections",
                &setup.max_connections.to_string(),
                "--max-tcp-connections",
                &setup.max_connections.to_string(),
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            let child = spawn_child(
                &setup.server_bin,
                &args,
                &setup.log_dir.join(format!("node{i}.log")),
                Stdio::null(),
            )?;
            let pid = child.id().context("node exited at once")?;
            let url = format!("ws://127.0.0.1:{port}/ws");
            nodes.push(Node {
                target: Target::resolve(&url).await?,
                metrics_addr: SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
                pid,
                _child: child,
            });
        }
        let cluster = Cluster {
            nodes,
            redis_pids: backing.pids,
            _redis: backing.children,
        };
        cluster.wait_formed(ctx).await?;
        Ok(cluster)
    }

    /// Waits (30 s at most) until every node's `jssocket_cluster_nodes` is the node count.
    async fn wait_formed(&self, ctx: &Ctx) -> Result<()> {
        let n = self.nodes.len() as f64;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let mut seen = Vec::new();
            for node in &self.nodes {
                let v = match scrape(node.metrics_addr).await {
                    Ok(m) => m.get(NODES).copied(),
                    Err(_) => None,
                };
                seen.push(v);
            }
            if seen.iter().all(|v| *v == Some(n)) {
                return Ok(());
            }
            if Instant::now() > deadline || ctx.stop.is_cancelled() {
                bail!(
                    "the cluster did not form: {NODES} per node {seen:?}, wanted {n} \
                     (logs in the log directory)"
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Every node's `jssocket_cluster_received_total` and, when the server has it (not before
    /// issue 11), `jssocket_cluster_deliveries_received_total`.
    pub async fn received(&self) -> Result<Received> {
        let mut all = Vec::with_capacity(self.nodes.len());
        let mut deliveries = Some(Vec::with_capacity(self.nodes.len()));
        for node in &self.nodes {
            let m = scrape(node.metrics_addr).await?;
            all.push(
                m.get(RECEIVED)
                    .copied()
                    .with_context(|| format!("no {RECEIVED} in /metrics"))?,
            );
            match (m.get(DELIVERIES), deliveries.as_mut()) {
                (Some(v), Some(d)) => d.push(*v),
                _ => deliveries = None,
            }
        }
        Ok(Received { all, deliveries })
    }

    /// RSS and CPU of every node.
    pub fn samples(&self) -> Result<Vec<ProcSample>> {
        self.nodes.iter().map(|n| proc_sample(n.pid)).collect()
    }

    /// Contexts aimed at each node, sharing `ctx`'s stop token and handshake budget.
    pub fn node_ctxs(&self, ctx: &Ctx) -> Vec<std::sync::Arc<Ctx>> {
        self.nodes
            .iter()
            .map(|n| std::sync::Arc::new(ctx.with_target(n.target.clone(), Some(n.pid))))
            .collect()
    }
}

/// What the nodes received from Redis, per node.
pub struct Received {
    /// `jssocket_cluster_received_total`: everything, heartbeats included.
    pub all: Vec<f64>,
    /// `jssocket_cluster_deliveries_received_total`, if every node has it.
    pub deliveries: Option<Vec<f64>>,
}

/// Starts one redis-server on `port` (no persistence), with `extra` arguments.
fn start_redis(setup: &Setup, port: u16, log: &Path, extra: &[String]) -> Result<Child> {
    let mut args: Vec<String> = [
        "--port",
        &port.to_string(),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend_from_slice(extra);
    spawn_child(&setup.redis_bin, &args, log, Stdio::null())
}

/// Three masters with `--cluster-enabled yes`, their slots spread by `redis-cli --cluster
/// create`, waited for until each says `cluster_state:ok`.
async fn start_redis_cluster(setup: &Setup, ctx: &Ctx) -> Result<Backing> {
    let mut backing = Backing {
        url: String::new(),
        pids: Vec::new(),
        children: Vec::new(),
    };
    let mut ports = Vec::with_capacity(CLUSTER_MASTERS);
    for i in 0..CLUSTER_MASTERS {
        let port = free_cluster_port()?;
        // A node file left by an earlier run in the same --log-dir would make a stale node.
        let conf = setup.log_dir.join(format!("redis{i}-nodes.conf"));
        let _ = std::fs::remove_file(&conf);
        let extra: Vec<String> = [
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            &conf.to_string_lossy(),
            "--cluster-node-timeout",
            "5000",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let log = setup.log_dir.join(format!("redis{i}.log"));
        let child = start_redis(setup, port, &log, &extra)?;
        backing
            .pids
            .push(child.id().context("redis-server exited at once")?);
        backing.children.push(child);
        ports.push(port);
    }
    for &port in &ports {
        wait_redis(port, ctx).await?;
    }
    let addrs: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    let log = setup.log_dir.join("redis-cli.log");
    let out = std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
    let mut cli = Command::new(&setup.redis_cli);
    cli.args(["--cluster", "create"])
        .args(&addrs)
        .args(["--cluster-replicas", "0", "--cluster-yes"])
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .kill_on_drop(true);
    let status = tokio::time::timeout(Duration::from_secs(30), cli.status())
        .await
        .context("redis-cli --cluster create took over 30 s")?
        .with_context(|| format!("starting {}", setup.redis_cli.display()))?;
    if !status.success() {
        bail!(
            "redis-cli --cluster create failed ({status}); see {}",
            log.display()
        );
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    for &port in &ports {
        while !redis_says(port, b"CLUSTER INFO\r\n", b"cluster_state:ok").await {
            if Instant::now() > deadline || ctx.stop.is_cancelled() {
                bail!("the Redis Cluster member on port {port} is not ok after 20 s");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    backing.url = ports
        .iter()
        .map(|p| format!("redis://127.0.0.1:{p}/"))
        .collect::<Vec<_>>()
        .join(",");
    Ok(backing)
}

/// A free port whose cluster bus port (port + 10 000) is free too.
fn free_cluster_port() -> Result<u16> {
    for _ in 0..100 {
        let port = free_port()?;
        let Some(bus) = port.checked_add(10_000) else {
            continue;
        };
        if std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, bus)).is_ok() {
            return Ok(port);
        }
    }
    bail!("no free port with a free port + 10 000 (the Redis Cluster bus) in 100 tries")
}

/// Sends `command` to the Redis on `port`; true if its answer (first 4 KiB, 1 s at most)
/// contains `wanted`.
async fn redis_says(port: u16, command: &[u8], wanted: &[u8]) -> bool {
    let ask = async {
        let mut s = TcpStream::connect((Ipv4Addr::LOCALHOST, port)).await?;
        s.write_all(command).await?;
        let mut buf = vec![0u8; 4096];
        let n = s.read(&mut buf).await?;
        Ok::<bool, std::io::Error>(buf[..n].windows(wanted.len()).any(|w| w == wanted))
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(1), ask).await,
        Ok(Ok(true))
    )
}

/// Waits (10 s at most) until Redis answers PING.
async fn wait_redis(port: u16, ctx: &Ctx) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !redis_says(port, b"PING\r\n", b"+PONG").await {
        if Instant::now() > deadline || ctx.stop.is_cancelled() {
            bail!("redis-server on port {port} did not answer PING within 10 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// Largest /metrics body read.
const MAX_METRICS: usize = 4 << 20;

/// GET /metrics (HTTP/1.0, so the server closes after the body), bounded to 5 s and 4 MiB.
pub async fn scrape(addr: SocketAddr) -> Result<BTreeMap<String, f64>> {
    let body = tokio::time::timeout(Duration::from_secs(5), async {
        let mut s = TcpStream::connect(addr).await?;
        s.write_all(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
            .await?;
        let mut buf = Vec::new();
        (&mut s)
            .take(MAX_METRICS as u64)
            .read_to_end(&mut buf)
            .await?;
        Ok::<Vec<u8>, std::io::Error>(buf)
    })
    .await
    .with_context(|| format!("GET http://{addr}/metrics took over 5 s"))?
    .with_context(|| format!("GET http://{addr}/metrics"))?;
    let text = String::from_utf8_lossy(&body);
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        bail!("GET http://{addr}/metrics: no HTTP response");
    };
    if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
        bail!(
            "GET http://{addr}/metrics: {}",
            head.lines().next().unwrap_or("")
        );
    }
    Ok(parse_metrics(body))
}

/// Unlabelled samples of a Prometheus text exposition (`name value`); labelled series of one
/// name are summed under the bare name.
pub fn parse_metrics(text: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(v) = value.trim().parse::<f64>() else {
            continue;
        };
        let name = series.split('{').next().unwrap_or(series).trim();
        *out.entry(name.to_string()).or_insert(0.0) += v;
    }
    out
}

/// The password's default and the binaries' defaults, for the three scenarios.
pub fn default_server_bin() -> PathBuf {
    PathBuf::from("target/release/jssocket")
}

/// `after - before`, element by element.
pub fn deltas(before: &[f64], after: &[f64]) -> Vec<f64> {
    before.iter().zip(after).map(|(b, a)| a - b).collect()
}

/// Summed CPU seconds of the processes between two samplings.
pub fn cpu_delta(before: &[ProcSample], after: &[ProcSample]) -> f64 {
    before
        .iter()
        .zip(after)
        .map(|(b, a)| a.cpu_s - b.cpu_s)
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_are_parsed_and_labels_summed() {
        let text = "# HELP jssocket_cluster_nodes Live nodes.\n\
                    # TYPE jssocket_cluster_nodes gauge\n\
                    jssocket_cluster_nodes 4\n\
                    jssocket_cluster_received_total 12345\n\
                    jssocket_errors_total{code=\"a\"} 2\n\
                    jssocket_errors_total{code=\"b b\"} 3\n\
                    garbage line\n";
        let m = parse_metrics(text);
        assert_eq!(m.get(NODES), Some(&4.0));
        assert_eq!(m.get(RECEIVED), Some(&12345.0));
        assert_eq!(m.get("jssocket_errors_total"), Some(&5.0));
        assert_eq!(m.get("garbage"), None);
    }

    #[test]
    fn deltas_subtract_per_node() {
        assert_eq!(deltas(&[1.0, 5.0], &[3.0, 5.0]), vec![2.0, 0.0]);
        let s = |cpu_s| ProcSample { rss_kib: 0, cpu_s };
        assert!((cpu_delta(&[s(1.0), s(2.0)], &[s(1.5), s(4.0)]) - 2.5).abs() < 1e-9);
    }
}
