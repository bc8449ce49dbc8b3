//! `cluster-p2p`: pairs of acknowledged clients `notify_client` each other (each answers every
//! message from its partner with one of its own, `--window` messages in flight per client),
//! on one node and on two nodes with the partners on different nodes. The figures are
//! deliveries per second and deliveries per second of the nodes' CPU; `--compare` runs both
//! cluster sizes in one run and prints the ratio.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::task::JoinSet;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

use super::{Cluster, Setup, cpu_delta};
use crate::admin::Admin;
use crate::client::connect_many;
use crate::common::{Ctx, Ws, drain_wait, payload};
use crate::stats::{ProcSample, proc_sample, round1, round3};

pub struct Params {
    pub pairs: usize,
    pub duration: Duration,
    pub window: u64,
    pub size: usize,
    pub drain: Duration,
}

#[derive(Default)]
struct Tally {
    sent: AtomicU64,
    delivered: AtomicU64,
    send_errors: AtomicU64,
    /// Set at the end of the measured window: clients stop answering.
    quiet: AtomicBool,
}

/// A client: sends `window` messages to its partner, then answers each one it receives.
async fn ping_pong(ws: Ws, text: String, window: u64, tally: Arc<Tally>, done: CancellationToken) {
    let (mut sink, mut stream) = ws.split();
    for _ in 0..window {
        if sink.feed(Message::text(text.clone())).await.is_err() {
            tally.send_errors.fetch_add(1, Ordering::Relaxed);
            return;
        }
        tally.sent.fetch_add(1, Ordering::Relaxed);
    }
    if sink.flush().await.is_err() {
        tally.send_errors.fetch_add(1, Ordering::Relaxed);
        return;
    }
    loop {
        let m = tokio::select! {
            _ = done.cancelled() => return,
            m = stream.next() => m,
        };
        match m {
            Some(Ok(Message::Text(_) | Message::Binary(_))) => {}
            Some(Ok(_)) => continue,
            _ => return,
        }
        tally.delivered.fetch_add(1, Ordering::Relaxed);
        if tally.quiet.load(Ordering::Relaxed) {
            continue;
        }
        if sink.send(Message::text(text.clone())).await.is_err() {
            tally.send_errors.fetch_add(1, Ordering::Relaxed);
            return;
        }
        tally.sent.fetch_add(1, Ordering::Relaxed);
    }
}

/// CPU (and RSS) of the redis-server processes.
fn redis_samples(cluster: &Cluster) -> Result<Vec<ProcSample>> {
    cluster.redis_pids.iter().map(|&p| proc_sample(p)).collect()
}

/// One run on `nodes` nodes; returns its JSON and deliveries per CPU-second.
async fn one(
    ctx: &Arc<Ctx>,
    setup: &Setup,
    nodes: usize,
    p: &Params,
) -> Result<(Value, f64, bool)> {
    let cluster = Cluster::start(setup, nodes, ctx).await?;
    let ctxs = cluster.node_ctxs(ctx);
    let mut admins = Vec::with_capacity(nodes);
    for c in &ctxs {
        admins.push(Admin::connect(c, 1).await?);
    }
    // Client i of the first half talks to client i of the second half; with two nodes the
    // halves are on different nodes.
    let halves = [&ctxs[0], &ctxs[nodes - 1]];
    let mut sides = Vec::new();
    for (h, c) in halves.iter().enumerate() {
        let batch = connect_many(c, h * p.pairs..(h + 1) * p.pairs, |_| None, "cluster-p2p").await;
        println!(
            "{}",
            batch.line(&format!("cluster-p2p {nodes} node(s), side {h}"))
        );
        if batch.failures.total() > 0 || batch.clients.len() != p.pairs {
            bail!("{} clients were not acknowledged", batch.failures.total());
        }
        sides.push(batch.clients);
    }
    let tally = Arc::new(Tally::default());
    let done = CancellationToken::new();
    let mut tasks = JoinSet::new();
    let b = sides.pop().unwrap_or_default();
    let a = sides.pop().unwrap_or_default();
    let ids_a: Vec<String> = a.iter().map(|c| c.id.clone()).collect();
    let ids_b: Vec<String> = b.iter().map(|c| c.id.clone()).collect();
    let body = payload(0, 0, "", p.size);
    let text = |to: &str| {
        format!(r#"{{"type":"notify_client","data":{{"target":"{to}","data":{body}}}}}"#)
    };
    let server_before = cluster.samples()?;
    let redis_before = redis_samples(&cluster)?;
    let t0 = Instant::now();
    for (c, to) in a.into_iter().zip(&ids_b).chain(b.into_iter().zip(&ids_a)) {
        tasks.spawn(ping_pong(
            c.ws,
            text(to),
            p.window,
            tally.clone(),
            done.clone(),
        ));
    }
    tokio::select! {
        _ = tokio::time::sleep(p.duration) => {}
        _ = ctx.stop.cancelled() => {}
    }
    let delivered = tally.delivered.load(Ordering::Relaxed);
    let secs = t0.elapsed().as_secs_f64();
    let server_after = cluster.samples()?;
    let redis_after = redis_samples(&cluster)?;
    tally.quiet.store(true, Ordering::Relaxed);
    drain_wait(&ctx.stop, p.drain, || {
        tally.delivered.load(Ordering::Relaxed) >= tally.sent.load(Ordering::Relaxed)
    })
    .await;
    done.cancel();
    tasks.shutdown().await;
    let sent = tally.sent.load(Ordering::Relaxed);
    let total_delivered = tally.delivered.load(Ordering::Relaxed);
    let lost = sent.saturating_sub(total_delivered);
    let cpu = cpu_delta(&server_before, &server_after);
    let redis_cpu = cpu_delta(&redis_before, &redis_after);
    let dps = delivered as f64 / secs.max(1e-9);
    let per_cpu = delivered as f64 / cpu.max(1e-9);
    let rss: u64 = server_after.iter().map(|s| s.rss_kib).sum();
    println!(
        "cluster-p2p {nodes} node(s): {delivered} deliveries in {secs:.1} s = {dps:.0}/s; nodes' \
         CPU {cpu:.2} s = {per_cpu:.0} deliveries per CPU-second; Redis CPU {redis_cpu:.2} s; \
         lost {lost} of {sent}, send errors {}",
        tally.send_errors.load(Ordering::Relaxed)
    );
    let ok = lost == 0 && !ctx.stop.is_cancelled();
    let json = json!({
        "nodes": nodes,
        "pairs": p.pairs,
        "seconds": round3(secs),
        "delivered": delivered,
        "delivered_per_sec": round1(dps),
        "nodes_cpu_s": round3(cpu),
        "delivered_per_cpu_s": round1(per_cpu),
        "redis_cpu_s": round3(redis_cpu),
        "nodes_rss_kib": rss,
        "sent_total": sent,
        "lost": lost,
        "send_errors": tally.send_errors.load(Ordering::Relaxed),
        "admin_errors": admins.iter().map(Admin::errors).sum::<u64>(),
    });
    Ok((json, per_cpu, ok))
}

/// `nodes`: 1 or 2, or both with `compare`.
pub async fn run(
    ctx: &Arc<Ctx>,
    setup: &Setup,
    nodes: usize,
    compare: bool,
    p: &Params,
) -> Result<(Value, bool)> {
    let sizes: Vec<usize> = if compare { vec![1, 2] } else { vec![nodes] };
    let mut runs = Vec::new();
    let mut per_cpu = Vec::new();
    let mut ok = true;
    for n in sizes {
        let (j, pc, o) = one(ctx, setup, n, p).await?;
        runs.push(j);
        per_cpu.push(pc);
        ok &= o;
    }
    println!();
    println!("| nodes | deliveries/s | nodes' CPU s | deliveries per CPU-s | Redis CPU s | lost |");
    println!("|---|---|---|---|---|---|");
    for r in &runs {
        println!(
            "| {} | {:.0} | {:.2} | {:.0} | {:.2} | {} |",
            r["nodes"],
            r["delivered_per_sec"].as_f64().unwrap_or(0.0),
            r["nodes_cpu_s"].as_f64().unwrap_or(0.0),
            r["delivered_per_cpu_s"].as_f64().unwrap_or(0.0),
            r["redis_cpu_s"].as_f64().unwrap_or(0.0),
            r["lost"]
        );
    }
    let ratio = match per_cpu.as_slice() {
        [one, two] if *one > 0.0 => Some(round3(two / one)),
        _ => None,
    };
    if let Some(r) = ratio {
        println!("cluster-p2p: 2 nodes / 1 node, deliveries per CPU-second: {r:.2}");
    }
    let json = json!({
        "scenario": "cluster-p2p",
        "runs": runs,
        "ratio_2_to_1_per_cpu_s": ratio,
        "timed_out": ctx.stop.is_cancelled(),
    });
    Ok((json, ok))
}
