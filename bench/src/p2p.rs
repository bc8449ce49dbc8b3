//! `p2p`: acknowledged clients send `notify_client` to random other clients at an aggregate
//! target rate; each message is checked to arrive once, at the right client.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

use crate::admin::Admin;
use crate::client::connect_many;
use crate::common::{Ctx, Rng, Ws, close_desc, drain_wait, now_ns, payload, secs};
use crate::stats::{LatSummary, LatencySink, maybe_sample, proc_delta, round1, round3};

pub struct Params {
    pub clients: usize,
    pub rate: f64,
    pub duration: Duration,
    pub size: usize,
    pub drain: Duration,
}

#[derive(Deserialize)]
struct Payload {
    seq: u64,
    ts: u64,
    to: u64,
}

struct Relay {
    delivered: AtomicU64,
    dup: AtomicU64,
    misrouted: AtomicU64,
    unparsable: AtomicU64,
    last_ns: AtomicU64,
    /// One bit per message sequence number: seen at its target.
    seen: Vec<AtomicU64>,
    latency: Arc<LatencySink>,
}

struct ClientEnd {
    send_errors: u64,
    closed: Option<String>,
}

async fn client(
    ws: Ws,
    idx: usize,
    mut rx: mpsc::UnboundedReceiver<String>,
    sh: Arc<Relay>,
    done: CancellationToken,
) -> ClientEnd {
    let (mut sink, mut stream) = ws.split();
    let mut rec = sh.latency.recorder(idx);
    let mut end = ClientEnd {
        send_errors: 0,
        closed: None,
    };
    let mut rx_open = true;
    loop {
        tokio::select! {
            _ = done.cancelled() => break,
            cmd = rx.recv(), if rx_open => match cmd {
                None => rx_open = false,
                Some(text) => {
                    let mut r = sink.feed(Message::text(text)).await;
                    let mut batch = 1u64;
                    while r.is_ok() {
                        match rx.try_recv() {
                            Ok(t) => { r = sink.feed(Message::text(t)).await; batch += 1; }
                            Err(_) => break,
                        }
                    }
                    if r.is_ok() {
                        r = sink.flush().await;
                    }
                    if let Err(e) = r {
                        end.send_errors += batch;
                        end.closed = Some(format!("write error: {e}"));
                        break;
                    }
                }
            },
            m = stream.next() => {
                let m = match m {
                    None => { end.closed = Some("connection ended".into()); break; }
                    Some(Err(e)) => { end.closed = Some(format!("error: {e}")); break; }
                    Some(Ok(m)) => m,
                };
                let bytes: &[u8] = match &m {
                    Message::Text(t) => t.as_bytes(),
                    Message::Binary(b) => b,
                    Message::Close(f) => { end.closed = Some(close_desc(f.as_ref())); break; }
                    _ => continue,
                };
                let Ok(p) = serde_json::from_slice::<Payload>(bytes) else {
                    sh.unparsable.fetch_add(1, Ordering::Relaxed);
                    crate::progress::error();
                    continue;
                };
                let now = now_ns();
                if p.to != idx as u64 {
                    sh.misrouted.fetch_add(1, Ordering::Relaxed);
                    crate::progress::error();
                    continue;
                }
                let Some(word) = sh.seen.get((p.seq / 64) as usize) else {
                    sh.unparsable.fetch_add(1, Ordering::Relaxed);
                    crate::progress::error();
                    continue;
                };
                let bit = 1u64 << (p.seq % 64);
                if word.fetch_or(bit, Ordering::Relaxed) & bit != 0 {
                    sh.dup.fetch_add(1, Ordering::Relaxed);
                    crate::progress::error();
                    continue;
                }
                rec.record_ns(now.saturating_sub(p.ts));
                sh.delivered.fetch_add(1, Ordering::Relaxed);
                crate::progress::message();
                sh.last_ns.fetch_max(now, Ordering::Relaxed);
            }
        }
    }
    // Whatever was still queued for sending is lost on our side.
    rx.close();
    while rx.try_recv().is_ok() {
        end.send_errors += 1;
    }
    end
}

pub async fn run(ctx: &Arc<Ctx>, p: &Params) -> Result<(Value, bool)> {
    let before = maybe_sample(ctx.server_pid);
    let admin = Admin::connect(ctx, 10).await?;
    let batch = connect_many(ctx, 0..p.clients, |_| None, "p2p").await;
    println!("{}", batch.line("p2p"));
    let connect_json = batch.json();
    let connect_failures = batch.failures.total();
    let n = batch.clients.len();
    if n < 2 {
        bail!(
            "p2p: needs at least 2 acknowledged clients, got {n} ({})",
            batch.failures.line()
        );
    }
    let capacity = (p.rate * p.duration.as_secs_f64()).ceil() as u64 + 1024;
    let sh = Arc::new(Relay {
        delivered: AtomicU64::new(0),
        dup: AtomicU64::new(0),
        misrouted: AtomicU64::new(0),
        unparsable: AtomicU64::new(0),
        last_ns: AtomicU64::new(0),
        seen: (0..capacity.div_ceil(64))
            .map(|_| AtomicU64::new(0))
            .collect(),
        latency: LatencySink::new(),
    });
    let done = CancellationToken::new();
    let mut ids = Vec::with_capacity(n);
    let mut senders = Vec::with_capacity(n);
    let mut tasks: JoinSet<ClientEnd> = JoinSet::new();
    // Clients are re-numbered 0..n so that `to` is an index into `ids`.
    for (i, c) in batch.clients.into_iter().enumerate() {
        let (tx, rx) = mpsc::unbounded_channel();
        ids.push(c.id);
        senders.push(tx);
        tasks.spawn(client(c.ws, i, rx, sh.clone(), done.clone()));
    }

    let mut rng = Rng::new(now_ns() ^ 0x5eed);
    let mut sent = 0u64;
    let mut enqueue_failed = 0u64;
    // Server CPU of the sending and delivering only (not of the connects).
    let cpu_before = maybe_sample(ctx.server_pid);
    let first_send_ns = now_ns();
    let t0 = Instant::now();
    let end = t0 + p.duration;
    'send: loop {
        let now = Instant::now();
        if now >= end || ctx.stop.is_cancelled() {
            break;
        }
        let due = ((now - t0).as_secs_f64() * p.rate) as u64 + 1;
        while sent + enqueue_failed < due {
            let k = sent + enqueue_failed;
            if k >= capacity {
                break 'send;
            }
            let from = rng.below(n);
            let mut to = rng.below(n - 1);
            if to >= from {
                to += 1;
            }
            let body = payload(k, now_ns(), &format!(",\"to\":{to}"), p.size);
            let text = format!(
                r#"{{"type":"notify_client","data":{{"target":"{}","data":{body}}}}}"#,
                ids[to]
            );
            if senders[from].send(text).is_ok() {
                sent += 1;
            } else {
                enqueue_failed += 1;
            }
        }
        let next = t0 + Duration::from_secs_f64((due as f64) / p.rate);
        tokio::select! {
            _ = tokio::time::sleep_until(next.max(now + Duration::from_micros(500)).into()) => {}
            _ = ctx.stop.cancelled() => break,
        }
    }
    let last_send_ns = now_ns();
    drain_wait(&ctx.stop, p.drain, || {
        sh.delivered.load(Ordering::Relaxed) >= sent
    })
    .await;
    done.cancel();
    let mut send_errors = 0u64;
    let mut closed: BTreeMap<String, u64> = BTreeMap::new();
    while let Some(r) = tasks.join_next().await {
        if let Ok(e) = r {
            send_errors += e.send_errors;
            if let Some(why) = e.closed {
                *closed.entry(why).or_default() += 1;
            }
        }
    }
    let after = maybe_sample(ctx.server_pid);
    let delivered = sh.delivered.load(Ordering::Relaxed);
    let lost = sent.saturating_sub(delivered);
    let span = secs(sh.last_ns.load(Ordering::Relaxed).max(first_send_ns) - first_send_ns);
    let send_secs = secs(last_send_ns - first_send_ns);
    let dps = delivered as f64 / span.max(1e-9);
    let lat = LatSummary::of(&sh.latency.merged());
    let (server_json, server_line) = proc_delta(before, after);
    let timed_out = ctx.stop.is_cancelled();
    let dup = sh.dup.load(Ordering::Relaxed);
    let misrouted = sh.misrouted.load(Ordering::Relaxed);
    let unparsable = sh.unparsable.load(Ordering::Relaxed);

    println!(
        "p2p: sent {sent} notify_client of {} B in {:.3} s ({:.0} msg/s, target {})",
        p.size,
        send_secs,
        sent as f64 / send_secs.max(1e-9),
        p.rate
    );
    println!("p2p: delivered {delivered} in {span:.3} s = {dps:.0} delivered/s");
    println!("p2p: latency {}", lat.line());
    println!(
        "p2p: lost {lost}  dup {dup}  misrouted {misrouted}  unparsable {unparsable}  \
         client-side send errors {send_errors}  clients closed during run {}",
        closed.values().sum::<u64>()
    );
    for (why, count) in &closed {
        println!("p2p:   {count} clients closed: {why}");
    }
    if !server_line.is_empty() {
        println!("p2p: {server_line}");
    }
    let sending_cpu = cpu_before.zip(after).map(|(b, a)| a.cpu_s - b.cpu_s);
    let per_cpu_s = sending_cpu.map(|cpu| delivered as f64 / cpu.max(1e-9));
    if let (Some(cpu), Some(per)) = (sending_cpu, per_cpu_s) {
        println!(
            "p2p: server CPU from the first send to the end {cpu:.2} s = {per:.0} deliveries per \
             server-CPU-second"
        );
    }
    if timed_out {
        println!("p2p: TIMED OUT (--timeout): figures are partial");
    }
    let json = json!({
        "scenario": "p2p",
        "url": ctx.target.url,
        "clients": p.clients,
        "rate": p.rate,
        "duration_s": p.duration.as_secs_f64(),
        "size": p.size,
        "connect": connect_json,
        "sent": sent,
        "send_seconds": round3(send_secs),
        "send_rate": round1(sent as f64 / send_secs.max(1e-9)),
        "delivered": delivered,
        "seconds": round3(span),
        "delivered_per_sec": round1(dps),
        "latency_ms": lat.json(),
        "lost": lost,
        "duplicated": dup,
        "misrouted": misrouted,
        "unparsable": unparsable,
        "client_send_errors": send_errors + enqueue_failed,
        "clients_closed": closed,
        "server": server_json,
        "server_cpu_s_sending": sending_cpu.map(round3),
        "deliveries_per_server_cpu_s": per_cpu_s.map(round1),
        "admin": admin.json(),
        "timed_out": timed_out,
    });
    let ok = !timed_out && connect_failures == 0 && lost + dup + misrouted == 0;
    Ok((json, ok))
}
