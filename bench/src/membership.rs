//! `membership-churn` (issue 13): a paced `notify_all` fan-out run twice, the second time
//! while admin connections send `membership` add/remove at `--churn-rate` per second for the
//! fan-out's own receivers (user `g0`: every change locks every receiver's state, the worst
//! case for the fan-out), and the fan-out's p99 latency of both runs side by side.

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
    counts: Arc<Counts>,
    stop: CancellationToken,
) -> Result<()> {
    let ws = open_ws(&ctx, Some(&ctx.auth))
        .await
        .map_err(|e| anyhow!("churning admin: {e}"))?;
    let (mut sink, mut stream) = ws.split();
    let reader_counts = Arc::clone(&counts);
    let reader = tokio::spawn(async move {
        while let Some(Ok(message)) = stream.next().await {
            let Message::Text(text) = message else {
                continue;
            };
            let value: Value = serde_json::from_str(text.as_str()).unwrap_or(Value::Null);
            match value["type"].as_str() {
                Some("membership") => reader_counts.answered.fetch_add(1, Ordering::Relaxed),
                Some("error") => reader_counts.errors.fetch_add(1, Ordering::Relaxed),
                _ => 0,
            };
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
            let event = json!({"type": "membership", "data": {"action": action, "kind": "role", "name": name, "user": "g0"}});
            sink.feed(Message::text(event.to_string())).await?;
            n += 1;
        }
        sink.flush().await?;
    }
    counts.sent.fetch_add(n, Ordering::Relaxed);
    // The answers still on their way.
    tokio::time::sleep(Duration::from_millis(500)).await;
    reader.abort();
    Ok(())
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
            Arc::clone(&counts),
            stop.clone(),
        ));
    }
    let started = Instant::now();
    let with = fanout::run(ctx, &p.fanout, "fanout with membership churn").await;
    let elapsed = started.elapsed().as_secs_f64();
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
        answered as f64 / elapsed,
    );
    let ok = without.ok && with.ok && errors == 0 && answered == sent;
    Ok((
        json!({
            "without_churn": without.json,
            "with_churn": with.json,
            "churn": {"rate_asked": p.rate, "admins": admins, "sent": sent, "answered": answered,
                      "errors": errors, "answered_per_sec": answered as f64 / elapsed},
            "p99_ms": {"without": without.p99_ms, "with": with.p99_ms, "ratio": ratio},
        }),
        ok,
    ))
}
