//! `cluster-route`: how many Redis messages the nodes receive per notification. Clients are
//! acknowledged on every node (each node has its own backend, the bench's admin there); the
//! admin on node 0 then sends `notify_client` to clients on the other nodes, round robin, and
//! `notify_group` to a group whose members are on nodes 1 and 2 only. Each node's
//! `jssocket_cluster_received_total` before and after each phase, less what it receives when
//! idle (the nodes' heartbeats), divided by the messages sent, is the routing cost; every
//! delivery is counted at the clients.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use futures_util::StreamExt;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::task::JoinSet;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

use super::{Cluster, Received, Setup, deltas};
use crate::admin::Admin;
use crate::client::connect_many;
use crate::common::{Ctx, Ws, drain_wait, payload};
use crate::stats::round3;

pub struct Params {
    pub nodes: usize,
    pub clients_per_node: usize,
    pub messages: u64,
    /// notify messages per second the admin sends.
    pub rate: f64,
    pub drain: Duration,
}

/// The group the bench puts the clients of nodes 1 and 2 in (everyone else is in `g0`).
const SPLIT_GROUP: &str = "g1";

#[derive(Deserialize)]
struct Seq {
    seq: u64,
}

/// What each client received, phase by phase: index `phase * clients + client`.
struct Counts {
    clients: usize,
    messages: u64,
    got: Vec<AtomicU64>,
    unexpected: AtomicU64,
}

impl Counts {
    /// Phase of a sequence number: 0 for notify_client, 1 for notify_group.
    fn record(&self, client: usize, seq: u64) {
        let phase = (seq / self.messages.max(1)) as usize;
        match self.got.get(phase * self.clients + client) {
            Some(c) if phase < 2 => {
                c.fetch_add(1, Ordering::Relaxed);
            }
            _ => {
                self.unexpected.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    fn phase_total(&self, phase: usize) -> u64 {
        self.got[phase * self.clients..(phase + 1) * self.clients]
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .sum()
    }

    /// Clients whose count in `phase` differs from what `expected(client)` says.
    fn mismatches(&self, phase: usize, expected: impl Fn(usize) -> u64) -> u64 {
        (0..self.clients)
            .filter(|&i| self.got[phase * self.clients + i].load(Ordering::Relaxed) != expected(i))
            .count() as u64
    }
}

async fn receive(mut ws: Ws, idx: usize, counts: Arc<Counts>, done: CancellationToken) {
    loop {
        let m = tokio::select! {
            _ = done.cancelled() => return,
            m = ws.next() => m,
        };
        let bytes: &[u8] = match &m {
            Some(Ok(Message::Text(t))) => t.as_bytes(),
            Some(Ok(Message::Binary(b))) => b,
            Some(Ok(_)) => continue,
            _ => return,
        };
        if let Ok(s) = serde_json::from_slice::<Seq>(bytes) {
            counts.record(idx, s.seq);
        }
    }
}

/// Sends `count` messages built by `text(k)` at `rate` per second (k from `first`).
async fn paced(
    ctx: &Ctx,
    admin: &Admin,
    first: u64,
    count: u64,
    rate: f64,
    text: impl Fn(u64) -> String,
) -> Result<()> {
    let t0 = Instant::now();
    let mut sent = 0u64;
    while sent < count {
        let due = (((t0.elapsed().as_secs_f64()) * rate) as u64 + 1).min(count);
        while sent < due {
            if !admin.send(text(first + sent)) {
                bail!(
                    "the admin connection ended: {}",
                    admin.close_reason().unwrap_or_default()
                );
            }
            sent += 1;
        }
        if ctx.stop.is_cancelled() {
            bail!("timed out while sending");
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    Ok(())
}

/// Idle receive rate per node (messages/s), over `span`.
async fn idle_rate(cluster: &Cluster, span: Duration) -> Result<Vec<f64>> {
    let a = cluster.received().await?.all;
    let t = Instant::now();
    tokio::time::sleep(span).await;
    let b = cluster.received().await?.all;
    let secs = t.elapsed().as_secs_f64();
    Ok(deltas(&a, &b).iter().map(|d| d / secs).collect())
}

/// One phase's figures: per node received (less the idle rate), per message; and, when the
/// server counts them, the deliveries received per node per message (no idle rate to take off:
/// heartbeats are not deliveries).
fn phase_json(
    before: &Received,
    after: &Received,
    idle: &[f64],
    secs: f64,
    messages: u64,
) -> (Value, f64) {
    let raw = deltas(&before.all, &after.all);
    let deliveries = match (&before.deliveries, &after.deliveries) {
        (Some(b), Some(a)) => {
            let d = deltas(b, a);
            let per: Vec<f64> = d.iter().map(|n| round3(n / messages as f64)).collect();
            json!({
                "received": d,
                "per_message_per_node": per,
                "per_message_total": round3(d.iter().sum::<f64>() / messages as f64),
            })
        }
        _ => Value::Null,
    };
    let net: Vec<f64> = raw
        .iter()
        .zip(idle)
        .map(|(r, i)| (r - i * secs).max(0.0))
        .collect();
    let per_msg: Vec<f64> = net.iter().map(|n| round3(n / messages as f64)).collect();
    let total = round3(net.iter().sum::<f64>() / messages as f64);
    (
        json!({
            "received_raw": raw,
            "received_net": net.iter().map(|n| n.round()).collect::<Vec<_>>(),
            "received_per_message_per_node": per_msg,
            "received_per_message_total": total,
            "deliveries": deliveries,
            "seconds": round3(secs),
        }),
        total,
    )
}

pub async fn run(ctx: &Arc<Ctx>, setup: &Setup, p: &Params) -> Result<(Value, bool)> {
    if p.nodes < 3 {
        bail!("cluster-route needs at least 3 nodes (the group spans nodes 1 and 2)");
    }
    let cluster = Cluster::start(setup, p.nodes, ctx).await?;
    println!(
        "cluster-route: {} nodes up (logs in {})",
        p.nodes,
        setup.log_dir.display()
    );
    let ctxs = cluster.node_ctxs(ctx);
    let mut admins = Vec::with_capacity(p.nodes);
    for c in &ctxs {
        admins.push(Admin::connect(c, 2).await?);
    }
    // Clients of node i are numbered i*cpn..(i+1)*cpn; nodes 1 and 2 ask for group 1.
    let cpn = p.clients_per_node;
    let mut ids: Vec<Option<String>> = vec![None; p.nodes * cpn];
    let counts = Arc::new(Counts {
        clients: p.nodes * cpn,
        messages: p.messages,
        got: (0..2 * p.nodes * cpn).map(|_| AtomicU64::new(0)).collect(),
        unexpected: AtomicU64::new(0),
    });
    let done = CancellationToken::new();
    let mut tasks = JoinSet::new();
    let mut failures = 0u64;
    for (i, c) in ctxs.iter().enumerate() {
        let group = u32::from(i == 1 || i == 2);
        let batch = connect_many(c, i * cpn..(i + 1) * cpn, |_| Some(group), "cluster-route").await;
        println!("{}", batch.line(&format!("cluster-route node {i}")));
        failures += batch.failures.total();
        for a in batch.clients {
            ids[a.idx] = Some(a.id);
            tasks.spawn(receive(a.ws, a.idx, counts.clone(), done.clone()));
        }
    }
    if failures > 0 {
        bail!("{failures} clients were not acknowledged");
    }
    let ids: Vec<String> = ids.into_iter().map(Option::unwrap_or_default).collect();
    let remote: Vec<usize> = (cpn..p.nodes * cpn).collect();
    let members = 2 * cpn as u64;

    let idle = idle_rate(&cluster, Duration::from_secs(3)).await?;
    println!("cluster-route: idle receive rate per node {idle:.2?} msg/s (heartbeats)");
    let admin = &admins[0];
    let m = p.messages;

    // Phase 0: notify_client to the clients of nodes 1.., round robin.
    let before = cluster.received().await?;
    let t = Instant::now();
    paced(ctx, admin, 0, m, p.rate, |k| {
        let to = &ids[remote[(k as usize) % remote.len()]];
        let body = payload(k, 0, "", 64);
        format!(r#"{{"type":"notify_client","data":{{"target":"{to}","data":{body}}}}}"#)
    })
    .await?;
    drain_wait(&ctx.stop, p.drain, || counts.phase_total(0) >= m).await;
    // The counters are read after the last delivery: anything a node received is in them.
    let after = cluster.received().await?;
    let (client_json, client_total) =
        phase_json(&before, &after, &idle, t.elapsed().as_secs_f64(), m);
    let client_delivered = counts.phase_total(0);
    let client_bad = counts.mismatches(0, |i| {
        if i < cpn {
            return 0;
        }
        let r = (i - cpn) as u64;
        let n = remote.len() as u64;
        m / n + u64::from(r < m % n)
    });

    // Phase 1: notify_group to the group on nodes 1 and 2.
    let before = cluster.received().await?;
    let t = Instant::now();
    paced(ctx, admin, m, m, p.rate, |k| {
        let body = payload(k, 0, "", 64);
        format!(r#"{{"type":"notify_group","data":{{"target":"{SPLIT_GROUP}","data":{body}}}}}"#)
    })
    .await?;
    drain_wait(&ctx.stop, p.drain, || counts.phase_total(1) >= m * members).await;
    let after = cluster.received().await?;
    let (group_json, group_total) =
        phase_json(&before, &after, &idle, t.elapsed().as_secs_f64(), m);
    let group_delivered = counts.phase_total(1);
    let group_bad = counts.mismatches(1, |i| if i / cpn == 1 || i / cpn == 2 { m } else { 0 });
    done.cancel();
    tasks.shutdown().await;
    let unexpected = counts.unexpected.load(Ordering::Relaxed);

    println!();
    println!(
        "cluster-route: {} nodes, {cpn} clients per node, {m} messages per phase",
        p.nodes
    );
    println!(
        "| notification | delivered / expected | Redis msgs received per message, per node | total \
         | deliveries received per message, per node | total |"
    );
    println!("|---|---|---|---|---|---|");
    let row = |name: &str, got: u64, want: u64, j: &Value, total: f64| {
        let d = &j["deliveries"];
        let (per, tot) = if d.is_null() {
            ("-".to_string(), "-".to_string())
        } else {
            (
                d["per_message_per_node"].to_string(),
                format!("{:.2}", d["per_message_total"].as_f64().unwrap_or(0.0)),
            )
        };
        println!(
            "| {name} | {got} / {want} | {} | {total:.2} | {per} | {tot} |",
            j["received_per_message_per_node"]
        );
    };
    row(
        "notify_client to nodes 1..",
        client_delivered,
        m,
        &client_json,
        client_total,
    );
    row(
        "notify_group on nodes 1,2",
        group_delivered,
        m * members,
        &group_json,
        group_total,
    );
    println!(
        "cluster-route: clients with a wrong count: notify_client {client_bad}, notify_group \
         {group_bad}; unexpected messages {unexpected}"
    );
    let timed_out = ctx.stop.is_cancelled();
    let ok = !timed_out
        && client_delivered == m
        && group_delivered == m * members
        && client_bad + group_bad + unexpected == 0;
    let json = json!({
        "scenario": "cluster-route",
        "nodes": p.nodes,
        "clients_per_node": cpn,
        "messages": m,
        "idle_received_per_sec": idle,
        "notify_client": {"delivered": client_delivered, "expected": m,
            "clients_wrong": client_bad, "routing": client_json},
        "notify_group": {"delivered": group_delivered, "expected": m * members,
            "clients_wrong": group_bad, "member_nodes": [1, 2], "routing": group_json},
        "unexpected": unexpected,
        "admin_errors": admins.iter().map(Admin::errors).sum::<u64>(),
        "timed_out": timed_out,
    });
    Ok((json, ok))
}
