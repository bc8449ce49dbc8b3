//! `membership-churn` (issue 13): a paced `notify_all` fan-out run twice, the second time
//! while admin connections send `membership` add/remove at `--churn-rate` per second, and
//! the fan-out's p99 latency of both runs side by side. The changes concern users with no
//! connection (the cost of the change itself: table, lookup, answer), or with `--churn-user
//! g0` the fan-out's own receivers (every change then touches every receiver's state: the
//! worst case, work per change grows with the user's connections).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::task::JoinSet;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

use crate::common::{Ctx, open_ws};
use crate::fanout;

pub struct Params {
    pub fanout: fanout::Params,
    /// Membership changes per second, over every churning admin.
    pub rate: f64,
    /// Admin connections sharing that rate.
    pub admins: usize,
    /// The user every change concerns; `None`: a different user per change, none connected.
    pub user: Option<String>,
}

#[derive(Default)]
struct Counts {
    sent: AtomicU64,
    answered: AtomicU64,
    errors: AtomicU64,
}

/// How often each churning admin sends its share (as one batch).
const TICK: Duration = Duration::from_millis(10);

/// One churning admin: alternately adds and removes role `churn<k>` for user `g0`.
async fn churner(
    ctx: Arc<Ctx>,
    me: usize,
    per_tick: f64,
    user: Option<String>,
    counts: Arc<Counts>,
    stop: CancellationToken,
) -> Result<()> {
    let ws = open_ws(&ctx, Some(&ctx.auth))
        .await
        .map_err(|e| anyhow!("churning admin: {e}"))?;
    let ws = until_admin(ws).await?;
    let (mut sink, mut stream) = ws.split();
    let reader_counts = Arc::clone(&counts);
    // This connection's answers and errors: it waits for its own before it stops reading.
    let mine = Arc::new(AtomicU64::new(0));
    let reader_mine = Arc::clone(&mine);
    let reader = tokio::spawn(async move {
        while let Some(Ok(message)) = stream.next().await {
            let Message::Text(text) = message else {
                continue;
            };
            let value: Value = serde_json::from_str(text.as_str()).unwrap_or(Value::Null);
            let counter = match value["type"].as_str() {
                Some("membership") => &reader_counts.answered,
                Some("error") if value["data"]["event"] == "disconnect" => continue,
                Some("error") => &reader_counts.errors,
                _ => continue,
            };
            counter.fetch_add(1, Ordering::Relaxed);
            reader_mine.fetch_add(1, Ordering::Relaxed);
        }
    });
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut owed = 0.0;
    let mut n: u64 = 0;
    while !stop.is_cancelled() {
        tick.tick().await;
        owed += per_tick;
        while owed >= 1.0 {
            owed -= 1.0;
            let action = if n.is_multiple_of(2) { "add" } else { "remove" };
            let name = format!("churn{me}-{}", (n / 2) % 32);
            let user = user
                .clone()
                .unwrap_or_else(|| format!("nobody{me}-{}", (n / 2) % 1000));
            let event = json!({"type": "membership", "data": {"action": action, "kind": "role", "name": name, "user": user}});
            sink.feed(Message::text(event.to_string())).await?;
            n += 1;
        }
        sink.flush().await?;
    }
    counts.sent.fetch_add(n, Ordering::Relaxed);
    // The answers still on their way (bounded).
    let deadline = Instant::now() + Duration::from_secs(10);
    while mine.load(Ordering::Relaxed) < n && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    reader.abort();
    Ok(())
}

/// Waits until the server treats the connection as an admin's (its password is verified
/// after the upgrade; what arrives before is not an admin's): probes with a `disconnect` of
/// a connection that does not exist until it is answered `unknown_target`, not `forbidden`.
async fn until_admin(mut ws: crate::common::Ws) -> Result<crate::common::Ws> {
    let probe =
        json!({"type": "disconnect", "data": {"target": "00000000-0000-4000-8000-000000000000"}});
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        ws.send(Message::text(probe.to_string())).await?;
        let answer = tokio::time::timeout(Duration::from_millis(300), ws.next()).await;
        if let Ok(Some(Ok(Message::Text(text)))) = answer {
            let value: Value = serde_json::from_str(text.as_str()).unwrap_or(Value::Null);
            if value["data"]["code"] == "unknown_target" {
                // Later probes' answers, if any, are read (and not counted) by the reader.
                return Ok(ws);
            }
        }
    }
    Err(anyhow!(
        "churning admin: not an admin after 15 s; is --auth right?"
    ))
}

pub async fn run(ctx: &Arc<Ctx>, p: &Params) -> Result<(Value, bool)> {
    let without = fanout::run(ctx, &p.fanout, "fanout without membership churn").await?;
    let counts = Arc::new(Counts::default());
    let stop = CancellationToken::new();
    let mut churners = JoinSet::new();
    let admins = p.admins.max(1);
    let per_tick = p.rate * TICK.as_secs_f64() / admins as f64;
    for me in 0..admins {
        churners.spawn(churner(
            Arc::clone(ctx),
            me,
            per_tick,
            p.user.clone(),
            Arc::clone(&counts),
            stop.clone(),
        ));
    }
    let started = Instant::now();
    let with = fanout::run(ctx, &p.fanout, "fanout with membership churn").await;
    // The fan-out's own time: the changes answered during it, not after.
    let elapsed = started.elapsed().as_secs_f64();
    let answered_during = counts.answered.load(Ordering::Relaxed);
    stop.cancel();
    while let Some(joined) = churners.join_next().await {
        joined.map_err(|e| anyhow!("churning admin panicked: {e}"))??;
    }
    let with = with?;
    let sent = counts.sent.load(Ordering::Relaxed);
    let answered = counts.answered.load(Ordering::Relaxed);
    let errors = counts.errors.load(Ordering::Relaxed);
    let ratio = if without.p99_ms > 0.0 {
        with.p99_ms / without.p99_ms
    } else {
        0.0
    };
    println!(
        "membership-churn: fan-out p99 {:.2} ms without churn, {:.2} ms with {:.0} changes/s answered \
         ({sent} sent, {answered} answered, {errors} errors): ×{ratio:.2}",
        without.p99_ms,
        with.p99_ms,
        answered_during as f64 / elapsed,
    );
    let ok = without.ok && with.ok && errors == 0 && answered == sent;
    Ok((
        json!({
            "without_churn": without.json,
            "with_churn": with.json,
            "churn": {"rate_asked": p.rate, "admins": admins, "sent": sent, "answered": answered,
                      "errors": errors, "user": p.user, "answered_per_sec_during_fanout": answered_during as f64 / elapsed},
            "p99_ms": {"without": without.p99_ms, "with": with.p99_ms, "ratio": ratio},
        }),
        ok,
    ))
}
