//! Clients: connect, send `client_connect`, wait for the `client_connected` acknowledgement
//! (and, for channel subscribers, subscribe); or connect as a SignalR client and complete its
//! handshake; and many of them at once with bounded concurrency.

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use serde_json::{Value, json};
use tokio::task::JoinSet;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};

use crate::common::{ConnErr, Ctx, Ws, close_desc, now_ns, open_ws, open_ws_at};
use crate::stats::{LatSummary, new_hist};

/// An acknowledged client.
pub struct Acked {
    pub idx: usize,
    pub id: String,
    pub ws: Ws,
    /// Bare payloads that arrived before the acknowledgement (a registered client already
    /// receives `notify_all`).
    pub pre_ack: Vec<Utf8Bytes>,
    pub started_ns: u64,
    pub acked_ns: u64,
}

enum Incoming {
    Ack(String),
    Error(String),
    Other,
}

fn classify(text: &str) -> Incoming {
    // Cheap filter first: benchmark payloads never contain these words.
    if !text.contains("client_connected") && !text.contains("error") {
        return Incoming::Other;
    }
    let Ok(v) = serde_json::from_str::<Value>(text) else {
        return Incoming::Other;
    };
    match v.get("type").and_then(Value::as_str) {
        Some("client_connected") => match v
            .get("data")
            .and_then(|d| d.get("target"))
            .and_then(Value::as_str)
        {
            Some(id) => Incoming::Ack(id.to_string()),
            None => Incoming::Other,
        },
        Some("error") => Incoming::Error(v.get("data").map(Value::to_string).unwrap_or_default()),
        _ => Incoming::Other,
    }
}

/// Connects one client and waits for its acknowledgement. `group` is a hint for the bench's
/// admin (carried as `data.bench_group` in `client_connect`).
pub async fn connect_acked(ctx: &Ctx, idx: usize, group: Option<u32>) -> Result<Acked, ConnErr> {
    let started_ns = now_ns();
    let mut ws = open_ws(ctx, None).await?;
    let hello = match group {
        Some(g) => format!(r#"{{"type":"client_connect","data":{{"bench_group":{g}}}}}"#),
        None => r#"{"type":"client_connect","data":{}}"#.to_string(),
    };
    ws.send(Message::text(hello))
        .await
        .map_err(|e| ConnErr::Ws(e.to_string()))?;
    let deadline = tokio::time::Instant::now() + ctx.ack_timeout;
    let mut pre_ack = Vec::new();
    loop {
        let text = next_text(&mut ws, deadline).await?;
        match classify(text.as_str()) {
            Incoming::Ack(id) => {
                return Ok(Acked {
                    idx,
                    id,
                    ws,
                    pre_ack,
                    started_ns,
                    acked_ns: now_ns(),
                });
            }
            Incoming::Error(e) => return Err(ConnErr::ServerError(e)),
            Incoming::Other => pre_ack.push(text),
        }
    }
}

/// How a client of [`connect_many_as`] gets ready to receive.
#[derive(Clone, Debug)]
pub enum Hello {
    /// `client_connect`, then the admin's acknowledgement ([`connect_acked`]).
    Acked,
    /// Acknowledged, then subscribed to this channel (`subscribe` → `subscribed`).
    Subscribed(Arc<str>),
    /// A SignalR client on this path of the server (`/sockets`): the WebSocket without
    /// negotiation (`skipNegotiation`), then the JSON hub protocol's handshake. It has no
    /// acknowledgement and no subscription: every `publish` its filter admits reaches it.
    SignalR(Arc<str>),
}

/// The SignalR record separator, which ends every SignalR message.
pub const RS: char = '\u{1e}';

impl Hello {
    async fn connect(&self, ctx: &Ctx, idx: usize, group: Option<u32>) -> Result<Acked, ConnErr> {
        match self {
            Hello::Acked => connect_acked(ctx, idx, group).await,
            Hello::Subscribed(channel) => {
                let mut c = connect_acked(ctx, idx, group).await?;
                subscribe(ctx, &mut c, channel).await?;
                Ok(c)
            }
            Hello::SignalR(path) => connect_signalr(ctx, idx, path).await,
        }
    }
}

/// Next text frame within `deadline` (binary frames read as text when they are UTF-8).
async fn next_text(ws: &mut Ws, deadline: tokio::time::Instant) -> Result<Utf8Bytes, ConnErr> {
    loop {
        let msg = match tokio::time::timeout_at(deadline, ws.next()).await {
            Err(_) => return Err(ConnErr::AckTimeout),
            Ok(None) => return Err(ConnErr::Closed("connection ended".into())),
            Ok(Some(Err(e))) => return Err(ConnErr::Closed(e.to_string())),
            Ok(Some(Ok(m))) => m,
        };
        match msg {
            Message::Text(t) => return Ok(t),
            Message::Binary(b) => {
                if let Ok(t) = Utf8Bytes::try_from(b) {
                    return Ok(t);
                }
            }
            Message::Close(f) => return Err(ConnErr::Closed(close_desc(f.as_ref()))),
            _ => {}
        }
    }
}

/// Subscribes an acknowledged client to `channel` and waits (within `--ack-timeout`) for its
/// `subscribed` reply; anything else that arrives first is kept in `pre_ack`.
async fn subscribe(ctx: &Ctx, c: &mut Acked, channel: &str) -> Result<(), ConnErr> {
    let request = json!({"type": "subscribe", "data": {"name": channel}});
    c.ws.send(Message::text(request.to_string()))
        .await
        .map_err(|e| ConnErr::Ws(e.to_string()))?;
    let deadline = tokio::time::Instant::now() + ctx.ack_timeout;
    loop {
        let text = next_text(&mut c.ws, deadline).await?;
        if text.contains("subscribed") || text.contains("error") {
            let v: Value = serde_json::from_str(text.as_str()).unwrap_or(Value::Null);
            match v.get("type").and_then(Value::as_str) {
                Some("subscribed") => {
                    c.acked_ns = now_ns();
                    return Ok(());
                }
                Some("error") => {
                    let why = v.get("data").map(Value::to_string).unwrap_or_default();
                    return Err(ConnErr::ServerError(why));
                }
                _ => {}
            }
        }
        c.pre_ack.push(text);
    }
}

/// Connects one SignalR client to `path` without negotiation and completes the handshake
/// (`{"protocol":"json","version":1}` → `{}`) within `--ack-timeout`. Its `id` is empty: the
/// server names a connection made without negotiation, and the bench does not need the name.
pub async fn connect_signalr(ctx: &Ctx, idx: usize, path: &str) -> Result<Acked, ConnErr> {
    let started_ns = now_ns();
    let mut ws = open_ws_at(ctx, None, Some(path)).await?;
    ws.send(Message::text(format!(
        r#"{{"protocol":"json","version":1}}{RS}"#
    )))
    .await
    .map_err(|e| ConnErr::Ws(e.to_string()))?;
    let deadline = tokio::time::Instant::now() + ctx.ack_timeout;
    let text = next_text(&mut ws, deadline).await?;
    // The handshake answer is the first record; records may share a frame.
    let (first, rest) = text.as_str().split_once(RS).unwrap_or((text.as_str(), ""));
    let v: Value = serde_json::from_str(first).unwrap_or(Value::Null);
    if let Some(e) = v.get("error") {
        return Err(ConnErr::ServerError(format!("handshake refused: {e}")));
    }
    if v != json!({}) {
        return Err(ConnErr::ServerError(format!(
            "unexpected handshake answer {first:?}"
        )));
    }
    let pre_ack = if rest.is_empty() {
        Vec::new()
    } else {
        vec![Utf8Bytes::from(rest.to_string())]
    };
    Ok(Acked {
        idx,
        id: String::new(),
        ws,
        pre_ack,
        started_ns,
        acked_ns: now_ns(),
    })
}

/// Like [`connect_acked`] but waits for a handshake slot first and gives up on `stop`.
pub async fn connect_acked_bounded(
    ctx: &Ctx,
    idx: usize,
    group: Option<u32>,
) -> Result<Acked, ConnErr> {
    let _permit = tokio::select! {
        p = ctx.handshakes.clone().acquire_owned() => p.map_err(|_| ConnErr::Cancelled)?,
        _ = ctx.stop.cancelled() => return Err(ConnErr::Cancelled),
    };
    tokio::select! {
        r = connect_acked(ctx, idx, group) => r,
        _ = ctx.stop.cancelled() => Err(ConnErr::Cancelled),
    }
}

/// Failures counted by kind, with a few examples.
#[derive(Default)]
pub struct Failures {
    pub by_kind: BTreeMap<&'static str, u64>,
    pub examples: Vec<String>,
}

impl Failures {
    pub fn add(&mut self, e: &ConnErr) {
        crate::progress::error();
        *self.by_kind.entry(e.kind()).or_default() += 1;
        if self.examples.len() < 5 {
            self.examples.push(e.to_string());
        }
    }

    pub fn total(&self) -> u64 {
        self.by_kind.values().sum()
    }

    pub fn json(&self) -> Value {
        json!({"total": self.total(), "by_kind": self.by_kind, "examples": self.examples})
    }

    pub fn line(&self) -> String {
        if self.total() == 0 {
            return "0 failures".into();
        }
        let kinds: Vec<String> = self
            .by_kind
            .iter()
            .map(|(k, n)| format!("{k} {n}"))
            .collect();
        format!(
            "{} failures ({}); e.g. {}",
            self.total(),
            kinds.join(", "),
            self.examples.first().map(String::as_str).unwrap_or("")
        )
    }
}

pub struct Batch {
    /// Acknowledged clients, in index order.
    pub clients: Vec<Acked>,
    pub failures: Failures,
    /// Until every attempt ended (a failure may wait for the whole --ack-timeout).
    pub elapsed: Duration,
    /// Until the last successful acknowledgement: the rate is computed over this.
    pub to_last_ack: Duration,
    /// Connect-to-acknowledgement time of each successful client.
    pub latency: Histogram<u64>,
    /// Stopped by the global timeout before every client was tried.
    pub interrupted: bool,
}

impl Batch {
    pub fn rate(&self) -> f64 {
        self.clients.len() as f64 / self.to_last_ack.as_secs_f64().max(1e-9)
    }

    pub fn line(&self, what: &str) -> String {
        format!(
            "{what}: {} clients acknowledged in {:.2} s ({:.0} conns/s), {}; connect+ack {}",
            self.clients.len(),
            self.to_last_ack.as_secs_f64(),
            self.rate(),
            self.failures.line(),
            LatSummary::of(&self.latency).line(),
        )
    }

    pub fn json(&self) -> Value {
        json!({
            "acknowledged": self.clients.len(),
            "seconds": crate::stats::round3(self.to_last_ack.as_secs_f64()),
            "seconds_all_attempts": crate::stats::round3(self.elapsed.as_secs_f64()),
            "conns_per_sec": crate::stats::round1(self.rate()),
            "failures": self.failures.json(),
            "connect_ack_latency_ms": LatSummary::of(&self.latency).json(),
            "interrupted": self.interrupted,
        })
    }
}

/// Connects and acknowledges clients `range`, at most `ctx.handshakes` at a time.
pub async fn connect_many(
    ctx: &Arc<Ctx>,
    range: Range<usize>,
    group: impl Fn(usize) -> Option<u32>,
    label: &str,
) -> Batch {
    connect_many_as(ctx, range, group, label, &Hello::Acked).await
}

/// [`connect_many`] with clients that get ready as `hello` says.
pub async fn connect_many_as(
    ctx: &Arc<Ctx>,
    range: Range<usize>,
    group: impl Fn(usize) -> Option<u32>,
    label: &str,
    hello: &Hello,
) -> Batch {
    let start = Instant::now();
    let start_ns = now_ns();
    let total = range.len();
    let mut set: JoinSet<(usize, Result<Acked, ConnErr>)> = JoinSet::new();
    let mut clients = Vec::with_capacity(total);
    let mut failures = Failures::default();
    let mut latency = new_hist();
    let mut interrupted = false;
    let mut last_progress = Instant::now();
    let mut take = |r: (usize, Result<Acked, ConnErr>), clients: &mut Vec<Acked>| match r.1 {
        Ok(c) => {
            latency.saturating_record(((c.acked_ns - c.started_ns) / 1000).max(1));
            clients.push(c);
        }
        Err(e) => failures.add(&e),
    };
    for i in range {
        let permit = tokio::select! {
            p = ctx.handshakes.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
            _ = ctx.stop.cancelled() => {
                interrupted = true;
                break;
            }
        };
        let g = group(i);
        let c = ctx.clone();
        let hello = hello.clone();
        set.spawn(async move {
            let r = hello.connect(&c, i, g).await;
            drop(permit);
            (i, r)
        });
        while let Some(done) = set.try_join_next() {
            if let Ok(r) = done {
                take(r, &mut clients);
            }
        }
        if last_progress.elapsed() > Duration::from_secs(2) {
            last_progress = Instant::now();
            eprintln!("{label}: {}/{total} acknowledged…", clients.len());
        }
    }
    loop {
        tokio::select! {
            done = set.join_next() => match done {
                None => break,
                Some(Ok(r)) => take(r, &mut clients),
                Some(Err(_)) => {}
            },
            _ = ctx.stop.cancelled() => {
                interrupted = true;
                set.abort_all();
                while let Some(done) = set.join_next().await {
                    if let Ok(r) = done {
                        take(r, &mut clients);
                    }
                }
                break;
            }
        }
    }
    clients.sort_by_key(|c| c.idx);
    let last_ack_ns = clients.iter().map(|c| c.acked_ns).max().unwrap_or(start_ns);
    Batch {
        clients,
        failures,
        elapsed: start.elapsed(),
        to_last_ack: Duration::from_nanos(last_ack_ns.saturating_sub(start_ns)),
        latency,
        interrupted,
    }
}
