//! `recovery` (issue 14): N subscribers of a history channel drop their connections at once,
//! the admin publishes `missed` more, and all N reconnect at once with `since` (SPEC §13). Each
//! must get `recovered:true` and exactly the missed publications, in order (offsets O+1..O+k
//! of the same epoch). Measured: the time from the start of the reconnect to the last client's
//! last recovered publication, and per client from its own reconnect start.
//!
//! The server is not restarted: dropping every connection at once gives the same burst of
//! `since` subscriptions against the same kept history (in memory, or in Redis with
//! `--redis-url`), without a process start in the measured time.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::task::JoinSet;
use tokio_tungstenite::tungstenite::Message;

use crate::admin::Admin;
use crate::client::{Acked, Hello, connect_acked, connect_many_as};
use crate::common::{ConnErr, Ctx, Ws, now_ns, payload, secs};
use crate::stats::{LatSummary, new_hist, round1, round3};

/// A `subscribe` answered `rate_limited` ("channel history is unavailable; retry") is sent
/// again after `RETRY_BASE` × the attempt (at most 10×), at most `MAX_RETRIES` times.
const RETRY_BASE: Duration = Duration::from_millis(100);
const MAX_RETRIES: u64 = 20;

#[derive(Clone, Debug)]
pub struct Params {
    pub clients: usize,
    /// Publications each client misses while disconnected.
    pub missed: u64,
    pub size: usize,
    pub channel: String,
}

/// A history position: the last offset a client saw and its epoch.
#[derive(Clone, Debug, PartialEq)]
struct Position {
    offset: u64,
    epoch: String,
}

#[derive(Deserialize)]
struct Frame {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    data: Value,
}

/// The position of a `publish` frame, `None` for any other frame.
fn publish_position(text: &str) -> Option<Position> {
    let f: Frame = serde_json::from_str(text).ok()?;
    if f.kind != "publish" {
        return None;
    }
    Some(Position {
        offset: f.data.get("offset")?.as_u64()?,
        epoch: f.data.get("epoch")?.as_str()?.to_string(),
    })
}

/// Reads until the next publication (within `deadline`) and returns its position.
async fn next_publish(ws: &mut Ws, deadline: tokio::time::Instant) -> Result<Position, ConnErr> {
    loop {
        let msg = match tokio::time::timeout_at(deadline, ws.next()).await {
            Err(_) => return Err(ConnErr::AckTimeout),
            Ok(None) => return Err(ConnErr::Closed("connection ended".into())),
            Ok(Some(Err(e))) => return Err(ConnErr::Closed(e.to_string())),
            Ok(Some(Ok(m))) => m,
        };
        if let Message::Text(t) = msg
            && let Some(p) = publish_position(t.as_str())
        {
            return Ok(p);
        }
    }
}

/// What one reconnecting client saw.
#[derive(Default)]
struct Recovery {
    recovered: bool,
    /// Publications received after `since`, in the order they came.
    got: u64,
    /// The publications were exactly O+1..O+missed of the same epoch.
    exact: bool,
    /// `subscribe` sent again after a `rate_limited` answer (SPEC: "retry").
    retries: u64,
    started_ns: u64,
    last_ns: u64,
    error: Option<String>,
}

/// Reconnects one client: acknowledged, `subscribe` with `since`, then reads the `subscribed`
/// reply and `missed` publications (anything beyond is live traffic, which there is none of).
async fn reconnect(
    ctx: Arc<Ctx>,
    idx: usize,
    channel: Arc<str>,
    since: Position,
    missed: u64,
) -> Recovery {
    let mut r = Recovery {
        started_ns: now_ns(),
        ..Recovery::default()
    };
    let result: Result<(), ConnErr> = async {
        let mut c = connect_acked(&ctx, idx, None).await?;
        let request = json!({"type": "subscribe", "data": {"name": &*channel,
            "since": {"offset": since.offset, "epoch": since.epoch}}});
        c.ws.send(Message::text(request.to_string()))
            .await
            .map_err(|e| ConnErr::Ws(e.to_string()))?;
        let mut deadline = tokio::time::Instant::now() + ctx.ack_timeout;
        // The reply comes before the recovered publications.
        loop {
            let msg = match tokio::time::timeout_at(deadline, c.ws.next()).await {
                Err(_) => return Err(ConnErr::AckTimeout),
                Ok(None) => return Err(ConnErr::Closed("connection ended".into())),
                Ok(Some(Err(e))) => return Err(ConnErr::Closed(e.to_string())),
                Ok(Some(Ok(m))) => m,
            };
            let Message::Text(t) = msg else { continue };
            let Ok(f) = serde_json::from_str::<Frame>(t.as_str()) else {
                continue;
            };
            match f.kind.as_str() {
                "subscribed" => {
                    r.recovered = f.data.get("recovered") == Some(&Value::Bool(true));
                    break;
                }
                "error"
                    if f.data.get("code").and_then(Value::as_str) == Some("rate_limited")
                        && r.retries < MAX_RETRIES =>
                {
                    // What a client does: wait a little (longer each time) and ask again.
                    r.retries += 1;
                    tokio::time::sleep(RETRY_BASE * r.retries.min(10) as u32).await;
                    c.ws.send(Message::text(request.to_string()))
                        .await
                        .map_err(|e| ConnErr::Ws(e.to_string()))?;
                    deadline = tokio::time::Instant::now() + ctx.ack_timeout;
                }
                "error" => return Err(ConnErr::ServerError(f.data.to_string())),
                _ => {}
            }
        }
        r.exact = true;
        while r.got < missed {
            let p = next_publish(&mut c.ws, deadline).await?;
            r.got += 1;
            if p.epoch != since.epoch || p.offset != since.offset + r.got {
                r.exact = false;
            }
            r.last_ns = now_ns();
        }
        Ok(())
    }
    .await;
    if let Err(e) = result {
        r.error = Some(e.to_string());
    }
    r
}

pub async fn run(ctx: &Arc<Ctx>, p: &Params, label: &str) -> Result<(Value, bool)> {
    let channel: Arc<str> = p.channel.as_str().into();
    let admin = Admin::connect(ctx, 1).await?;
    let hello = Hello::Subscribed(channel.clone());
    // Client `clients` is the witness: it stays connected and tells when the missed
    // publications have all been stored.
    let batch = connect_many_as(ctx, 0..p.clients + 1, |_| None, label, &hello).await;
    println!("{}", batch.line(label));
    if batch.failures.total() > 0 || batch.clients.len() != p.clients + 1 {
        bail!(
            "{label}: not every client subscribed: {}",
            batch.failures.line()
        );
    }
    let publish = |k: u64| {
        let body = payload(k, now_ns(), "", p.size);
        format!(
            r#"{{"type":"publish","data":{{"name":{},"data":{body}}}}}"#,
            Value::from(p.channel.as_str())
        )
    };
    // One publication that everyone receives: its position is what each client remembers.
    if !admin.send(publish(0)) {
        bail!("admin gone: {}", admin.close_reason().unwrap_or_default());
    }
    let deadline = tokio::time::Instant::now() + ctx.ack_timeout;
    let mut clients: Vec<Acked> = batch.clients;
    let mut witness = clients.pop().map(|c| c.ws);
    let mut positions = Vec::with_capacity(clients.len());
    let mut reads: JoinSet<(usize, Result<Position, ConnErr>)> = JoinSet::new();
    for mut c in clients {
        let pre = c.pre_ack.iter().find_map(|t| publish_position(t.as_str()));
        reads.spawn(async move {
            let pos = match pre {
                Some(pos) => Ok(pos),
                None => next_publish(&mut c.ws, deadline).await,
            };
            // Dropping the socket here closes it: every client goes at about the same time.
            drop(c.ws);
            (c.idx, pos)
        });
    }
    while let Some(done) = reads.join_next().await {
        let (idx, pos) = done?;
        match pos {
            Ok(pos) => positions.push((idx, pos)),
            Err(e) => bail!("{label}: client {idx} got no first publication: {e}"),
        }
    }
    positions.sort_by_key(|(i, _)| *i);
    // The missed publications, then wait until the witness has them all (they are kept).
    for k in 1..=p.missed {
        if !admin.send(publish(k)) {
            bail!("admin gone: {}", admin.close_reason().unwrap_or_default());
        }
    }
    if let Some(ws) = witness.as_mut() {
        let deadline = tokio::time::Instant::now() + ctx.ack_timeout;
        for _ in 0..=p.missed {
            next_publish(ws, deadline)
                .await
                .map_err(|e| anyhow::anyhow!("{label}: the witness: {e}"))?;
        }
    }
    // Let the server finish closing the dropped connections before the burst.
    tokio::time::sleep(Duration::from_millis(500)).await;

    println!(
        "{label}: {} clients reconnect at once with since",
        positions.len()
    );
    let start_ns = now_ns();
    let t0 = Instant::now();
    let mut set: JoinSet<Recovery> = JoinSet::new();
    for (idx, pos) in positions {
        let (ctx, channel) = (ctx.clone(), channel.clone());
        let missed = p.missed;
        set.spawn(async move {
            let _permit = ctx.handshakes.clone().acquire_owned().await;
            tokio::select! {
                r = reconnect(ctx.clone(), idx, channel, pos, missed) => r,
                _ = ctx.stop.cancelled() => Recovery { error: Some("timed out".into()), ..Recovery::default() },
            }
        });
    }
    let mut per_client = new_hist();
    let (mut recovered, mut exact, mut last_ns) = (0u64, 0u64, start_ns);
    let mut errors = crate::client::Failures::default();
    let mut received = 0u64;
    let (mut retries, mut retried_clients) = (0u64, 0u64);
    while let Some(done) = set.join_next().await {
        let r = done?;
        received += r.got;
        retries += r.retries;
        retried_clients += u64::from(r.retries > 0);
        if let Some(e) = r.error {
            errors.add(&ConnErr::Closed(e));
            continue;
        }
        recovered += u64::from(r.recovered);
        exact += u64::from(r.exact && r.recovered);
        last_ns = last_ns.max(r.last_ns);
        per_client.saturating_record((r.last_ns.saturating_sub(r.started_ns) / 1000).max(1));
    }
    let all = secs(last_ns - start_ns);
    let lat = LatSummary::of(&per_client);
    let n = p.clients as u64;
    println!(
        "{label}: {recovered}/{n} recovered:true, {exact}/{n} got exactly the {} missed in order; \
         last recovery {:.3} s after the reconnect start ({:.0} clients/s); per client {}; \
         {retried_clients} clients retried ({retries} retries); {}",
        p.missed,
        all,
        n as f64 / all.max(1e-9),
        lat.line(),
        errors.line()
    );
    let ok = recovered == n && exact == n && !ctx.stop.is_cancelled();
    let json = json!({
        "scenario": "recovery",
        "label": label,
        "url": ctx.target.url,
        "clients": p.clients,
        "missed": p.missed,
        "size": p.size,
        "channel": p.channel,
        "recovered": recovered,
        "exact": exact,
        "publications_received": received,
        "retried_clients": retried_clients,
        "retries": retries,
        "seconds_to_last_recovery": round3(all),
        "seconds_all": round3(t0.elapsed().as_secs_f64()),
        "clients_per_sec": round1(n as f64 / all.max(1e-9)),
        "per_client_ms": lat.json(),
        "failures": errors.json(),
        "admin": admin.json(),
        "timed_out": ctx.stop.is_cancelled(),
    });
    Ok((json, ok))
}
