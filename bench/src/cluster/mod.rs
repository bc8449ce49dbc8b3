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
    pub redis_pid: u32,
    _redis: Child,
}

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
        let redis_port = free_port()?;
        let redis = spawn_child(
            &setup.redis_bin,
            &[
                "--port".into(),
                redis_port.to_string(),
                "--bind".into(),
                "127.0.0.1".into(),
                "--save".into(),
                String::new(),
                "--appendonly".into(),
                "no".into(),
            ],
            &setup.log_dir.join("redis.log"),
            Stdio::null(),
        )?;
        let redis_pid = redis.id().context("redis-server exited at once")?;
        wait_redis(redis_port, ctx).await?;
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
                &format!("redis://127.0.0.1:{redis_port}/"),
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
            redis_pid,
            _redis: redis,
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

    /// Every node's `jssocket_cluster_received_total`.
    pub async fn received(&self) -> Result<Vec<f64>> {
        let mut out = Vec::with_capacity(self.nodes.len());
        for node in &self.nodes {
            let m = scrape(node.metrics_addr).await?;
            out.push(
                m.get(RECEIVED)
                    .copied()
                    .with_context(|| format!("no {RECEIVED} in /metrics"))?,
            );
        }
        Ok(out)
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

/// Waits (10 s at most) until Redis answers PING.
async fn wait_redis(port: u16, ctx: &Ctx) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let ping = async {
            let mut s = TcpStream::connect((Ipv4Addr::LOCALHOST, port)).await?;
            s.write_all(b"PING\r\n").await?;
            let mut buf = [0u8; 16];
            let n = s.read(&mut buf).await?;
            Ok::<bool, std::io::Error>(buf[..n].starts_with(b"+PONG"))
        };
        if let Ok(Ok(true)) = tokio::time::timeout(Duration::from_secs(1), ping).await {
            return Ok(());
        }
        if Instant::now() > deadline || ctx.stop.is_cancelled() {
            bail!("redis-server on port {port} did not answer PING within 10 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
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
