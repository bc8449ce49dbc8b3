//! `cluster-hold`: many acknowledged connections spread over N nodes, then one `notify_all`
//! from an admin on node 0: how many clients receive it and how long until the last one does,
//! and the nodes' total RSS.
//!
//! One process may open at most 20 000 files here (a hard limit), so the clients live in child
//! processes of the bench (`jssocket-bench hold-worker`, at most 16 000 sockets each), each
//! with source addresses of its own (127.0.0.2 + …, bound before connect) so no address runs
//! out of ephemeral ports. A worker speaks to the parent in JSON lines on stdout and reads
//! one command, `report`, on stdin (or its end: the parent is gone).

use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use futures_util::StreamExt;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};
use tokio::task::JoinSet;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

use super::{Cluster, MAX_PER_NODE, Setup, set_parent_death_signal};
use crate::admin::Admin;
use crate::client::connect_many;
use crate::common::{Ctx, Ws, share};
use crate::stats::round3;

/// Most client sockets per worker process (the hard limit is 20 000 files per process).
pub const MAX_PER_WORKER: u64 = 16_000;

/// The word the bell (the one `notify_all`) carries, so clients tell it from anything else.
const BELL: &str = "hold-bell";

pub struct Params {
    pub nodes: usize,
    pub connections: u64,
    pub per_worker: u64,
    /// Seconds to wait for the bell to reach every client.
    pub drain: Duration,
    /// The run's `--timeout`, which the workers get too (they stop by themselves after it).
    pub timeout: f64,
}

/// Wall-clock nanoseconds: comparable between the parent and its workers (one machine).
fn wall_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Workers and their shares: `ceil(connections / per_worker)` workers, round robin.
pub fn worker_shares(connections: u64, per_worker: u64) -> Vec<u64> {
    let w = connections.div_ceil(per_worker.max(1)).max(1);
    (0..w).map(|k| share(connections, w, k)).collect()
}

#[derive(Deserialize, Default, Debug)]
struct Report {
    #[serde(default)]
    acked: u64,
    #[serde(default)]
    failures: u64,
    #[serde(default)]
    failure_line: String,
    #[serde(default)]
    received: u64,
    #[serde(default)]
    last_ns: u64,
    /// Wall-clock time each client received the bell (the parent makes latencies of them).
    #[serde(default)]
    times_ns: Vec<u64>,
}

struct Worker {
    stdin: ChildStdin,
    lines: Lines<BufReader<ChildStdout>>,
    _child: Child,
}

impl Worker {
    /// The next report of the worker: a JSON line with a `worker` key (other lines, such as
    /// the scenario header, are skipped).
    async fn next_report(&mut self) -> Result<Report> {
        while let Some(line) = self.lines.next_line().await? {
            if let Some(r) = parse_report(&line) {
                return Ok(r);
            }
        }
        bail!("a worker ended without reporting (see its log)")
    }
}

fn parse_report(line: &str) -> Option<Report> {
    let v: Value = serde_json::from_str(line).ok()?;
    v.get("worker")?;
    serde_json::from_value(v).ok()
}

pub async fn run(ctx: &Arc<Ctx>, setup: &Setup, p: &Params) -> Result<(Value, bool)> {
    let per_node = (p.connections as usize).div_ceil(p.nodes);
    if per_node > MAX_PER_NODE {
        bail!(
            "{} connections over {} nodes is {per_node} per node, over {MAX_PER_NODE} (a \
             process may open 20 000 files here): use more --nodes",
            p.connections,
            p.nodes
        );
    }
    let cluster = Cluster::start(setup, p.nodes, ctx).await?;
    println!(
        "cluster-hold: {} nodes up (logs in {})",
        p.nodes,
        setup.log_dir.display()
    );
    let ctxs = cluster.node_ctxs(ctx);
    let mut admins = Vec::with_capacity(p.nodes);
    for c in &ctxs {
        admins.push(Admin::connect(c, 1).await?);
    }
    let exe = std::env::current_exe().context("finding the bench's own binary")?;
    let shares = worker_shares(p.connections, p.per_worker);
    let sources_per_worker = p.per_worker.div_ceil(ctx.per_source as u64).max(1);
    let concurrency = (ctx.handshakes.available_permits() / shares.len()).max(8);
    let timeout = p.timeout;
    let started = std::time::Instant::now();
    let mut workers = Vec::with_capacity(shares.len());
    for (k, n) in shares.iter().enumerate() {
        let mut args: Vec<String> = vec![
            "--timeout".into(),
            timeout.to_string(),
            "--concurrency".into(),
            concurrency.to_string(),
            "--per-source".into(),
            ctx.per_source.to_string(),
            "--ack-timeout".into(),
            ctx.ack_timeout.as_secs_f64().to_string(),
            "hold-worker".into(),
            "--clients".into(),
            n.to_string(),
            "--first-source".into(),
            (k as u64 * sources_per_worker).to_string(),
        ];
        // Each worker starts its round robin at another node, so the nodes' shares even out.
        for i in 0..p.nodes {
            args.push("--node-url".into());
            args.push(cluster.nodes[(i + k) % p.nodes].target.url.clone());
        }
        let log = std::fs::File::create(setup.log_dir.join(format!("worker{k}.log")))?;
        let mut cmd = Command::new(&exe);
        cmd.args(&args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(log)
            .kill_on_drop(true);
        set_parent_death_signal(&mut cmd);
        let mut child = cmd.spawn().context("starting a hold-worker")?;
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            bail!("a hold-worker has no stdin/stdout");
        };
        workers.push(Worker {
            stdin,
            lines: BufReader::new(stdout).lines(),
            _child: child,
        });
    }
    println!(
        "cluster-hold: {} workers connecting {} clients ({:?} each)…",
        workers.len(),
        p.connections,
        shares
    );
    let mut ready = Vec::with_capacity(workers.len());
    for w in &mut workers {
        let r = tokio::select! {
            r = w.next_report() => r?,
            _ = ctx.stop.cancelled() => bail!("timed out while the workers connected"),
        };
        ready.push(r);
    }
    let acked: u64 = ready.iter().map(|r| r.acked).sum();
    let failed: u64 = ready.iter().map(|r| r.failures).sum();
    let connect_secs = started.elapsed().as_secs_f64();
    println!(
        "cluster-hold: {acked} acknowledged, {failed} failed, in {connect_secs:.1} s{}",
        ready
            .iter()
            .find(|r| r.failures > 0)
            .map(|r| format!("; e.g. {}", r.failure_line))
            .unwrap_or_default()
    );
    let rss_held: u64 = cluster.samples()?.iter().map(|s| s.rss_kib).sum();
    let mut conns_per_node = Vec::new();
    for n in &cluster.nodes {
        let m = super::scrape(n.metrics_addr).await?;
        conns_per_node.push(
            m.get("jssocket_acknowledged_clients")
                .copied()
                .unwrap_or(-1.0),
        );
    }
    println!("cluster-hold: acknowledged clients per node {conns_per_node:?}");

    let sent_ns = wall_ns();
    if !admins[0].send(format!(
        r#"{{"type":"notify_all","data":{{"bell":"{BELL}"}}}}"#
    )) {
        bail!(
            "the admin on node 0 is gone: {}",
            admins[0].close_reason().unwrap_or_default()
        );
    }
    let mut done = Vec::with_capacity(workers.len());
    let deadline = tokio::time::Instant::now() + p.drain;
    for w in &mut workers {
        let r = tokio::select! {
            r = w.next_report() => Some(r),
            _ = tokio::time::sleep_until(deadline) => None,
            _ = ctx.stop.cancelled() => None,
        };
        let r = match r {
            Some(r) => r?,
            // Not all of its clients got the bell in time: ask for what it has.
            None => {
                let _ = w.stdin.write_all(b"report\n").await;
                tokio::time::timeout(Duration::from_secs(10), w.next_report())
                    .await
                    .context("a worker did not answer `report`")??
            }
        };
        done.push(r);
    }
    let received: u64 = done.iter().map(|r| r.received).sum();
    let last_ns = done.iter().map(|r| r.last_ns).max().unwrap_or(0);
    let to_last = last_ns.saturating_sub(sent_ns) as f64 / 1e9;
    let mut latencies: Vec<u64> = done
        .iter()
        .flat_map(|r| r.times_ns.iter().map(|&t| t.saturating_sub(sent_ns)))
        .collect();
    latencies.sort_unstable();
    let quantile = |q: f64| -> f64 {
        if latencies.is_empty() {
            return 0.0;
        }
        let i = ((latencies.len() as f64 * q).ceil() as usize).clamp(1, latencies.len()) - 1;
        latencies[i] as f64 / 1e6
    };
    let (p50, p99) = (quantile(0.50), quantile(0.99));
    let rss_after: u64 = cluster.samples()?.iter().map(|s| s.rss_kib).sum();
    println!();
    println!(
        "| nodes | connections asked | acknowledged | received notify_all | p50 / p99 / last | nodes' RSS |"
    );
    println!("|---|---|---|---|---|---|");
    println!(
        "| {} | {} | {acked} | {received} | {p50:.0} / {p99:.0} ms / {to_last:.2} s | {:.0} MiB ({:.2} KiB per connection) |",
        p.nodes,
        p.connections,
        rss_after as f64 / 1024.0,
        rss_after as f64 / acked.max(1) as f64
    );
    let timed_out = ctx.stop.is_cancelled();
    let ok = !timed_out && acked == p.connections && received == acked;
    let json = json!({
        "scenario": "cluster-hold",
        "nodes": p.nodes,
        "connections": p.connections,
        "workers": shares.len(),
        "acknowledged": acked,
        "connect_failures": failed,
        "connect_seconds": round3(connect_secs),
        "acknowledged_per_node": conns_per_node,
        "received": received,
        "seconds_to_last": round3(to_last),
        "latency_ms_p50": round3(p50),
        "latency_ms_p99": round3(p99),
        "nodes_rss_kib_held": rss_held,
        "nodes_rss_kib_after": rss_after,
        "admin_errors": admins.iter().map(Admin::errors).sum::<u64>(),
        "timed_out": timed_out,
    });
    Ok((json, ok))
}

/// Waits for the bell; then keeps reading (which answers the server's pings) until `done`.
async fn bell(
    mut ws: Ws,
    got: Arc<AtomicU64>,
    times: Arc<Mutex<Vec<u64>>>,
    done: CancellationToken,
) {
    let mut rung = false;
    loop {
        let m = tokio::select! {
            _ = done.cancelled() => return,
            m = ws.next() => m,
        };
        match m {
            Some(Ok(Message::Text(t))) if !rung && t.as_str().contains(BELL) => {
                rung = true;
                let now = wall_ns();
                times.lock().unwrap_or_else(|e| e.into_inner()).push(now);
                got.fetch_add(1, Ordering::Relaxed);
            }
            Some(Ok(_)) => {}
            _ => return,
        }
    }
}

/// The worker: connects `clients` clients round robin over `ctx`'s target and client targets,
/// reports, then reports again once every client got the bell (or on `report`).
pub async fn worker(ctx: &Arc<Ctx>, clients: usize) -> Result<(Value, bool)> {
    let batch = connect_many(ctx, 0..clients, |_| None, "hold-worker").await;
    eprintln!("{}", batch.line("hold-worker"));
    let acked = batch.clients.len() as u64;
    println!(
        "{}",
        json!({"worker": "ready", "acked": acked, "failures": batch.failures.total(),
               "failure_line": batch.failures.line()})
    );
    let got = Arc::new(AtomicU64::new(0));
    let times = Arc::new(Mutex::new(Vec::with_capacity(batch.clients.len())));
    let done = CancellationToken::new();
    let mut tasks = JoinSet::new();
    for c in batch.clients {
        tasks.spawn(bell(c.ws, got.clone(), times.clone(), done.clone()));
    }
    let mut stdin = BufReader::new(tokio::io::stdin()).lines();
    loop {
        tokio::select! {
            // `report`, or the parent is gone.
            _ = stdin.next_line() => break,
            _ = ctx.stop.cancelled() => break,
            _ = tokio::time::sleep(Duration::from_millis(20)) => {
                if acked > 0 && got.load(Ordering::Relaxed) >= acked {
                    break;
                }
            }
        }
    }
    let received = got.load(Ordering::Relaxed);
    let times_ns = std::mem::take(&mut *times.lock().unwrap_or_else(|e| e.into_inner()));
    println!(
        "{}",
        json!({"worker": "done", "acked": acked, "received": received,
               "last_ns": times_ns.iter().copied().max().unwrap_or(0), "times_ns": times_ns})
    );
    // Hold the sockets until the parent has read every report and kills us (or stdin ends).
    let _ = stdin.next_line().await;
    done.cancel();
    tasks.abort_all();
    Ok((Value::Null, received == acked))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_stay_under_the_per_worker_limit() {
        let s = worker_shares(100_000, MAX_PER_WORKER);
        assert_eq!(s.len(), 7);
        assert_eq!(s.iter().sum::<u64>(), 100_000);
        assert!(s.iter().all(|&n| n <= MAX_PER_WORKER));
        assert_eq!(worker_shares(10, MAX_PER_WORKER), vec![10]);
    }

    #[test]
    fn reports_are_told_from_other_lines() {
        let r = parse_report(r#"{"acked":5,"received":4,"worker":"done","last_ns":7}"#);
        let r = r.expect("a report");
        assert_eq!((r.acked, r.received, r.last_ns), (5, 4, 7));
        assert!(parse_report(r#"{"acked":5}"#).is_none());
        assert!(parse_report("jssocket-bench hold-worker: ws://127.0.0.1:1/ws").is_none());
    }
}
