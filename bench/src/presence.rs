//! `presence`: how long an admin waits for `info`, a `users` page and a `connections` page
//! (SPEC §12), with no client connected and then with N acknowledged clients held: p50/p99
//! of each, and the ratio between the two. Queries are sent one at a time by a second admin
//! connection (as the console would), so each figure is one query's round trip.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::task::JoinSet;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

use crate::admin::Admin;
use crate::client::connect_many;
use crate::common::{Ctx, Ws, open_ws};
use crate::stats::{LatSummary, new_hist, round1, round3};

pub struct Params {
    pub clients: usize,
    /// Users the clients are spread over (the admin's groups, `g0`, `g1`, …).
    pub users: u32,
    /// Queries of each kind per round.
    pub queries: u64,
    /// The `limit` of the pages.
    pub limit: u64,
}

/// One query: sends it and waits for the answer of the same type.
async fn ask(ws: &mut Ws, event: &str, data: &Value) -> Result<Value> {
    let text = json!({"type": event, "data": data}).to_string();
    ws.send(Message::text(text)).await.context("sending")?;
    loop {
        let message = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .map_err(|_| anyhow!("{event}: no answer within 10 s"))?;
        let text = match message {
            Some(Ok(Message::Text(t))) => t,
            Some(Ok(Message::Close(f))) => bail!("{event}: closed: {f:?}"),
            Some(Ok(_)) => continue,
            Some(Err(e)) => bail!("{event}: {e}"),
            None => bail!("{event}: connection ended"),
        };
        let value: Value = serde_json::from_str(text.as_str()).context("answer is not JSON")?;
        match value["type"].as_str() {
            Some(t) if t == event => return Ok(value["data"].clone()),
            Some("error") => bail!("{event}: error {}", value["data"]),
            _ => continue,
        }
    }
}

/// `queries` of each kind, one at a time: latency summaries by kind.
async fn round(ws: &mut Ws, p: &Params, label: &str) -> Result<Value> {
    let kinds: [(&str, Value); 4] = [
        ("info", json!({})),
        ("users", json!({"limit": p.limit})),
        ("users_prefix", json!({"limit": p.limit, "prefix": "g1"})),
        ("connections", json!({"limit": p.limit})),
    ];
    let mut out = serde_json::Map::new();
    for (name, data) in kinds {
        let event = name.split('_').next().unwrap_or(name);
        let mut hist = new_hist();
        let mut data = data;
        let mut entries = 0;
        for _ in 0..p.queries {
            let started = Instant::now();
            let answer = ask(ws, event, &data).await?;
            hist.saturating_record((started.elapsed().as_micros() as u64).max(1));
            if let Some(list) = answer[event].as_array() {
                entries = list.len();
            }
            // Page on through the table (from the start again at its end).
            match answer["next"].as_str() {
                Some(next) => data["cursor"] = json!(next),
                None => {
                    if let Some(obj) = data.as_object_mut() {
                        obj.remove("cursor");
                    }
                }
            }
        }
        let summary = LatSummary::of(&hist);
        println!(
            "presence [{label}] {name}: {} (last page {entries} entries)",
            summary.line()
        );
        out.insert(name.to_string(), summary.json());
    }
    Ok(Value::Object(out))
}

/// Reads (so answers pings) until told to stop.
async fn hold(mut ws: Ws, done: CancellationToken) {
    loop {
        tokio::select! {
            _ = done.cancelled() => return,
            m = ws.next() => if !matches!(m, Some(Ok(_))) { return },
        }
    }
}

pub async fn run(ctx: &Arc<Ctx>, p: &Params) -> Result<(Value, bool)> {
    let admin = Admin::connect(ctx, p.users).await?;
    let mut asker = open_ws(ctx, Some(&ctx.auth))
        .await
        .map_err(|e| anyhow!("asking admin: {e}"))?;
    // The first message pays the password check: not measured.
    ask(&mut asker, "info", &json!({})).await?;
    let empty = round(&mut asker, p, "0 clients").await?;

    let batch = connect_many(ctx, 0..p.clients, |_| None, "presence").await;
    println!("{}", batch.line("presence"));
    let n = batch.clients.len();
    if n == 0 {
        bail!("presence: no client was acknowledged");
    }
    let done = CancellationToken::new();
    let mut set = JoinSet::new();
    for c in batch.clients {
        set.spawn(hold(c.ws, done.clone()));
    }
    let info = ask(&mut asker, "info", &json!({})).await?;
    println!("presence: info with the clients held: {info}");
    let started = Instant::now();
    let full = round(&mut asker, p, &format!("{n} clients")).await?;
    let seconds = started.elapsed().as_secs_f64();
    done.cancel();
    while set.join_next().await.is_some() {}

    // Side by side: each figure with the clients ÷ the same with none.
    let mut ratios = serde_json::Map::new();
    if let (Some(e), Some(f)) = (empty.as_object(), full.as_object()) {
        for (name, figures) in f {
            let at = |v: &Value, q: &str| v[q].as_f64().unwrap_or(0.0);
            let mut by = serde_json::Map::new();
            for q in ["p50", "p99"] {
                let base = e.get(name).map(|v| at(v, q)).unwrap_or(0.0).max(0.001);
                by.insert(q.to_string(), json!(round1(at(figures, q) / base)));
            }
            println!(
                "presence: {name}: with {n} clients ÷ with none: p50 ×{}, p99 ×{}",
                by["p50"], by["p99"]
            );
            ratios.insert(name.clone(), Value::Object(by));
        }
    }
    let timed_out = ctx.stop.is_cancelled();
    let json = json!({
        "scenario": "presence",
        "url": ctx.target.url,
        "clients": n,
        "users": p.users,
        "limit": p.limit,
        "queries_per_kind": p.queries,
        "latency_ms_0_clients": empty,
        "latency_ms_clients": full,
        "ratio_to_0_clients": ratios,
        "seconds_measured": round3(seconds),
        "connect": batch.failures.json(),
        "admin": admin.json(),
        "timed_out": timed_out,
    });
    Ok((json, !timed_out && batch.failures.total() == 0))
}
