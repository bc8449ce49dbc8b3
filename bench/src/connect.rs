//! `connect`: N acknowledged clients, held for a while; connect+ack rate and the server's
//! memory per connection.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use futures_util::StreamExt;
use serde_json::{Value, json};
use tokio::task::JoinSet;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

use crate::admin::Admin;
use crate::client::connect_many;
use crate::common::{Ctx, Ws, close_desc};
use crate::stats::{maybe_sample, proc_delta, round1};

pub struct Params {
    pub clients: usize,
    pub hold: Duration,
    pub groups: u32,
}

/// Reads (and so answers the server's pings) until the end of the hold; returns why the
/// connection ended if it did before.
async fn hold(mut ws: Ws, done: CancellationToken) -> Option<String> {
    loop {
        tokio::select! {
            _ = done.cancelled() => return None,
            m = ws.next() => match m {
                None => return Some("connection ended".into()),
                Some(Err(e)) => return Some(format!("error: {e}")),
                Some(Ok(Message::Close(f))) => return Some(close_desc(f.as_ref())),
                Some(Ok(_)) => {}
            }
        }
    }
}

pub async fn run(ctx: &Arc<Ctx>, p: &Params) -> Result<(Value, bool)> {
    let admin = Admin::connect(ctx, p.groups).await?;
    // Let the server settle after the admin's bcrypt before the reference reading.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let before = maybe_sample(ctx.server_pid);
    let batch = connect_many(ctx, 0..p.clients, |_| None, "connect").await;
    let after_ack = maybe_sample(ctx.server_pid);
    let acked_at = Instant::now();
    println!("{}", batch.line("connect"));
    let connect_json = batch.json();
    let n = batch.clients.len();
    if n == 0 {
        bail!(
            "connect: no client was acknowledged ({})",
            batch.failures.line()
        );
    }
    let rate = batch.rate();
    let done = CancellationToken::new();
    let mut set = JoinSet::new();
    for c in batch.clients {
        set.spawn(hold(c.ws, done.clone()));
    }
    println!(
        "connect: holding {n} clients for {:.1} s",
        p.hold.as_secs_f64()
    );
    tokio::select! {
        _ = tokio::time::sleep(p.hold) => {}
        _ = ctx.stop.cancelled() => {}
    }
    let after_hold = maybe_sample(ctx.server_pid);
    let held = acked_at.elapsed().as_secs_f64();
    done.cancel();
    let mut closed: BTreeMap<String, u64> = BTreeMap::new();
    while let Some(r) = set.join_next().await {
        if let Ok(Some(why)) = r {
            *closed.entry(why).or_default() += 1;
        }
    }
    let closed_total: u64 = closed.values().sum();
    println!("connect: {closed_total} clients were closed during the hold");
    for (why, count) in &closed {
        println!("connect:   {count}× {why}");
    }

    let (server_json, server_line) = proc_delta(before, after_hold);
    let per_conn = match (before, after_ack) {
        (Some(b), Some(a)) => {
            let growth_bytes = (a.rss_kib as i64 - b.rss_kib as i64) * 1024;
            let per = growth_bytes as f64 / n as f64;
            println!(
                "connect: server RSS {:.1} MiB before the first client, {:.1} MiB once all were \
                 acknowledged: {:.0} bytes ({:.2} KiB) per connection",
                b.rss_kib as f64 / 1024.0,
                a.rss_kib as f64 / 1024.0,
                per,
                per / 1024.0
            );
            json!({
                "rss_before_kib": b.rss_kib,
                "rss_acked_kib": a.rss_kib,
                "bytes_per_conn": per.round(),
                "kib_per_conn": crate::stats::round3(per / 1024.0),
                "cpu_s_connecting": crate::stats::round3(a.cpu_s - b.cpu_s),
            })
        }
        _ => Value::Null,
    };
    if !server_line.is_empty() {
        println!("connect: {server_line} (from before the first client to the end of the hold)");
    }
    // The server's CPU while the acknowledged clients sat idle (keepalive pings and timers).
    let idle_cpu_percent = after_ack
        .zip(after_hold)
        .filter(|_| held > 0.0)
        .map(|(a, h)| (h.cpu_s - a.cpu_s) / held * 100.0);
    if let Some(pct) = idle_cpu_percent {
        println!("connect: server CPU during the {held:.1} s hold: {pct:.2} % of a core");
    }
    let timed_out = ctx.stop.is_cancelled();
    if timed_out {
        println!("connect: TIMED OUT (--timeout): figures are partial");
    }
    let json = json!({
        "scenario": "connect",
        "url": ctx.target.url,
        "clients": p.clients,
        "hold_s": p.hold.as_secs_f64(),
        "acknowledged": n,
        "conns_per_sec": round1(rate),
        "connect": connect_json,
        "closed_during_hold": closed,
        "server_per_conn": per_conn,
        "idle_cpu_percent": idle_cpu_percent.map(crate::stats::round3),
        "server": server_json,
        "admin": admin.json(),
        "timed_out": timed_out,
    });
    Ok((
        json,
        !timed_out && batch.failures.total() == 0 && closed_total == 0,
    ))
}
