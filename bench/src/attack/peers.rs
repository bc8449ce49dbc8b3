//! The well-behaved peers that watch an attack: admins and backends, the bystander whose
//! round trip is the figure, a backend logging in, a health checker, and the servers' memory.
//! They all connect from 127.0.0.1 ([`HOME`]); the attackers come from other addresses.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio::task::{JoinHandle, JoinSet};
use tokio_tungstenite::client_async_with_config;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_util::sync::CancellationToken;

use super::net::{HOME, http_get, tcp_from};
use crate::common::{Target, Ws, client_ws_config, close_desc, now_ns};
use crate::stats::{LatSummary, new_hist, round1};

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn ms_since(t: Instant) -> f64 {
    round1(t.elapsed().as_secs_f64() * 1000.0)
}

/// A WebSocket to `target` from 127.0.0.1; with `auth`, as an admin; with `rcvbuf`, with a
/// receive buffer that small.
pub async fn ws_connect(target: &Target, auth: Option<&str>, rcvbuf: Option<u32>) -> Result<Ws> {
    let stream = tcp_from(HOME, target.addr, rcvbuf)
        .await
        .with_context(|| format!("connecting to {}", target.addr))?;
    let mut request = target.url.as_str().into_client_request()?;
    if let Some(auth) = auth {
        request
            .headers_mut()
            .insert("auth", HeaderValue::from_str(auth)?);
    }
    let (ws, _) = client_async_with_config(request, stream, Some(client_ws_config()))
        .await
        .with_context(|| format!("WebSocket upgrade at {}", target.url))?;
    Ok(ws)
}

fn parse(msg: &Message) -> Option<Value> {
    match msg {
        Message::Text(t) => serde_json::from_str(t.as_str()).ok(),
        Message::Binary(b) => serde_json::from_slice(b).ok(),
        _ => None,
    }
}

/// An admin connection (the `auth` header); as a backend (`server_connect`) it acknowledges
/// the clients whose `client_connect` carries `"ack":true` (the bystander and the attack's
/// well-behaved clients) and ignores the others, as a backend ignores bad tokens.
pub struct AdminConn {
    tx: mpsc::UnboundedSender<Message>,
    /// `client_connect` forwards received.
    pub forwards: Arc<AtomicU64>,
    /// `error` events received.
    pub errors: Arc<AtomicU64>,
    closed: Arc<Mutex<Option<String>>>,
    ended: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
    /// From the TCP connect to `server_connect` answered `true` (or to the upgrade).
    pub login_ms: f64,
}

impl AdminConn {
    /// Connects; as a `server`, sends `server_connect` and waits (at most `limit`) for `true`.
    /// A `slow_read` backend sleeps that long after each message it reads.
    pub async fn connect(
        target: &Target,
        auth: &str,
        server: bool,
        slow_read: Option<Duration>,
        limit: Duration,
    ) -> Result<AdminConn> {
        let start = Instant::now();
        let login = async {
            let mut ws = ws_connect(target, Some(auth), None).await?;
            if server {
                ws.send(Message::text(r#"{"type":"server_connect","data":{}}"#))
                    .await?;
                let answer = wait_server_connect(&mut ws).await?;
                if answer != Value::Bool(true) {
                    bail!("server_connect answered {answer}");
                }
            }
            Ok::<Ws, anyhow::Error>(ws)
        };
        let ws = tokio::time::timeout(limit, login)
            .await
            .map_err(|_| anyhow!("no login within {:.1} s", limit.as_secs_f64()))??;
        let login_ms = ms_since(start);
        let (mut sink, mut stream) = ws.split();
        let (tx, mut rx) = mpsc::unbounded_channel::<Message>();
        let forwards = Arc::new(AtomicU64::new(0));
        let errors = Arc::new(AtomicU64::new(0));
        let closed = Arc::new(Mutex::new(None));
        let ended = CancellationToken::new();

        let (w_closed, w_ended) = (closed.clone(), ended.clone());
        let writer = tokio::spawn(async move {
            while let Some(m) = rx.recv().await {
                let mut r = sink.feed(m).await;
                while r.is_ok() {
                    match rx.try_recv() {
                        Ok(m) => r = sink.feed(m).await,
                        Err(_) => break,
                    }
                }
                if r.is_ok() {
                    r = sink.flush().await;
                }
                if let Err(e) = r {
                    lock(&w_closed).get_or_insert_with(|| format!("write failed: {e}"));
                    w_ended.cancel();
                    return;
                }
            }
        });
        let (r_tx, r_forwards, r_errors) = (tx.clone(), forwards.clone(), errors.clone());
        let (r_closed, r_ended) = (closed.clone(), ended.clone());
        let reader = tokio::spawn(async move {
            let why = loop {
                let msg = match stream.next().await {
                    None => break "connection ended".to_string(),
                    Some(Err(e)) => break format!("read error: {e}"),
                    Some(Ok(Message::Close(f))) => {
                        break format!("closed by server: {}", close_desc(f.as_ref()));
                    }
                    Some(Ok(m)) => m,
                };
                if let Some(v) = parse(&msg) {
                    match v.get("type").and_then(Value::as_str) {
                        Some("client_connect") => {
                            r_forwards.fetch_add(1, Ordering::Relaxed);
                            let data = v.get("data");
                            let wants_ack = data.and_then(|d| d.get("ack")) == Some(&json!(true));
                            let id = data.and_then(|d| d.get("target")).and_then(Value::as_str);
                            if let (true, Some(id)) = (wants_ack, id) {
                                let ack = json!({"type": "client_connected",
                                    "data": {"target": id, "user": "attack-bystanders"}});
                                let _ = r_tx.send(Message::text(ack.to_string()));
                            }
                        }
                        Some("error") => {
                            r_errors.fetch_add(1, Ordering::Relaxed);
                        }
                        _ => {}
                    }
                }
                if let Some(d) = slow_read {
                    tokio::time::sleep(d).await;
                }
            };
            lock(&r_closed).get_or_insert(why);
            r_ended.cancel();
        });
        Ok(AdminConn {
            tx,
            forwards,
            errors,
            closed,
            ended,
            tasks: vec![writer, reader],
            login_ms,
        })
    }

    /// Queues a text frame; false once the connection is gone.
    pub fn send(&self, text: String) -> bool {
        !self.ended.is_cancelled() && self.tx.send(Message::text(text)).is_ok()
    }

    pub fn closed(&self) -> Option<String> {
        lock(&self.closed).clone()
    }
}

impl Drop for AdminConn {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

async fn wait_server_connect(ws: &mut Ws) -> Result<Value> {
    loop {
        let msg = match ws.next().await {
            None => bail!("connection ended before the server_connect answer"),
            Some(Err(e)) => bail!("{e}"),
            Some(Ok(Message::Close(f))) => bail!("closed: {}", close_desc(f.as_ref())),
            Some(Ok(m)) => m,
        };
        if let Some(v) = parse(&msg)
            && v.get("type").and_then(Value::as_str) == Some("server_connect")
        {
            return Ok(v.get("data").cloned().unwrap_or(Value::Null));
        }
    }
}

/// Did a backend log in during the attack, and how long did it take?
#[derive(Clone, Debug)]
pub struct Login {
    pub ok: bool,
    pub ms: f64,
    pub error: Option<String>,
}

impl Login {
    /// A backend's first login (`server_connect` with the right password) at `target`; the
    /// connection is closed at once afterwards.
    pub async fn probe(target: &Target, auth: &str, limit: Duration) -> Login {
        let start = Instant::now();
        match AdminConn::connect(target, auth, true, None, limit).await {
            Ok(a) => Login {
                ok: true,
                ms: a.login_ms,
                error: None,
            },
            Err(e) => Login {
                ok: false,
                ms: ms_since(start),
                error: Some(format!("{e:#}")),
            },
        }
    }

    pub fn json(&self) -> Value {
        json!({"ok": self.ok, "ms": self.ms, "error": self.error})
    }

    pub fn word(&self) -> String {
        if self.ok {
            format!("yes {:.0} ms", self.ms)
        } else {
            format!("no ({:.0} ms)", self.ms)
        }
    }
}

struct ByShared {
    sent: AtomicU64,
    received: AtomicU64,
    warm: AtomicU64,
    seen: Mutex<HashSet<u64>>,
    hist: Mutex<Histogram<u64>>,
    closed: Mutex<Option<String>>,
}

/// An acknowledged client that an admin notifies (`notify_client`) at a steady rate: the
/// time from the admin queueing a notification to the client reading it is what any user of
/// the server feels during an attack.
pub struct Bystander {
    pub id: String,
    sh: Arc<ByShared>,
    notifier: Arc<AdminConn>,
    reader: JoinHandle<()>,
    sender: Option<JoinHandle<()>>,
    stop_send: CancellationToken,
}

/// How long the bystander may take to be acknowledged and to receive a first notification.
const SETUP_LIMIT: Duration = Duration::from_secs(20);

impl Bystander {
    /// Connects at `target`, gets acknowledged (by a backend anywhere in the cluster) and
    /// checks that `notifier` reaches it.
    pub async fn start(target: &Target, notifier: Arc<AdminConn>) -> Result<Bystander> {
        let mut ws = ws_connect(target, None, None).await?;
        ws.send(Message::text(
            r#"{"type":"client_connect","data":{"ack":true,"bystander":true}}"#,
        ))
        .await?;
        let id = tokio::time::timeout(SETUP_LIMIT, async {
            loop {
                let msg = match ws.next().await {
                    None => bail!("bystander: connection ended before client_connected"),
                    Some(Err(e)) => bail!("bystander: {e}"),
                    Some(Ok(m)) => m,
                };
                let Some(v) = parse(&msg) else { continue };
                match v.get("type").and_then(Value::as_str) {
                    Some("client_connected") => {
                        if let Some(id) = v.pointer("/data/target").and_then(Value::as_str) {
                            return Ok(id.to_string());
                        }
                    }
                    Some("error") => bail!("bystander: server answered {v}"),
                    _ => {}
                }
            }
        })
        .await
        .map_err(|_| anyhow!("bystander: not acknowledged within {SETUP_LIMIT:?}"))??;
        let sh = Arc::new(ByShared {
            sent: AtomicU64::new(0),
            received: AtomicU64::new(0),
            warm: AtomicU64::new(0),
            seen: Mutex::new(HashSet::new()),
            hist: Mutex::new(new_hist()),
            closed: Mutex::new(None),
        });
        let r_sh = sh.clone();
        let reader = tokio::spawn(async move {
            let why = loop {
                let msg = match ws.next().await {
                    None => break "connection ended".to_string(),
                    Some(Err(e)) => break format!("read error: {e}"),
                    Some(Ok(Message::Close(f))) => break close_desc(f.as_ref()),
                    Some(Ok(m)) => m,
                };
                let Some(v) = parse(&msg) else { continue };
                if v.get("warmup").is_some() {
                    r_sh.warm.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                let (Some(seq), Some(ts)) = (
                    v.get("seq").and_then(Value::as_u64),
                    v.get("ts").and_then(Value::as_u64),
                ) else {
                    continue;
                };
                if lock(&r_sh.seen).insert(seq) {
                    r_sh.received.fetch_add(1, Ordering::Relaxed);
                    let us = now_ns().saturating_sub(ts) / 1000;
                    lock(&r_sh.hist).saturating_record(us.max(1));
                }
            };
            lock(&r_sh.closed).get_or_insert(why);
        });
        let by = Bystander {
            id,
            sh,
            notifier,
            reader,
            sender: None,
            stop_send: CancellationToken::new(),
        };
        by.warm_up().await?;
        Ok(by)
    }

    async fn warm_up(&self) -> Result<()> {
        let deadline = Instant::now() + SETUP_LIMIT;
        while Instant::now() < deadline {
            let text = json!({"type": "notify_client",
                "data": {"target": self.id, "data": {"warmup": true}}});
            if !self.notifier.send(text.to_string()) {
                bail!(
                    "bystander: the notifying admin is gone ({:?})",
                    self.notifier.closed()
                );
            }
            for _ in 0..20 {
                if self.sh.warm.load(Ordering::Relaxed) > 0 {
                    return Ok(());
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        bail!("bystander: no notification arrived within {SETUP_LIMIT:?}")
    }

    /// Starts notifying at `rate` per second (sequence numbers and send timestamps inside).
    pub fn begin(&mut self, rate: f64) {
        let (sh, notifier, stop) = (
            self.sh.clone(),
            self.notifier.clone(),
            self.stop_send.clone(),
        );
        let id = self.id.clone();
        let period = Duration::from_secs_f64(1.0 / rate.max(0.1));
        self.sender = Some(tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            // A stalled bench should not burst afterwards: that would measure the bench.
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            let mut seq = 0u64;
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tick.tick() => {}
                }
                seq += 1;
                let text = format!(
                    r#"{{"type":"notify_client","data":{{"target":"{id}","data":{{"seq":{seq},"ts":{}}}}}}}"#,
                    now_ns()
                );
                if !notifier.send(text) {
                    return;
                }
                sh.sent.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }

    /// Stops notifying, waits up to `drain` for what is still on its way, and reports.
    pub async fn finish(mut self, drain: Duration) -> ByReport {
        self.stop_send.cancel();
        if let Some(s) = self.sender.take() {
            let _ = s.await;
        }
        let deadline = Instant::now() + drain;
        while Instant::now() < deadline
            && self.sh.received.load(Ordering::Relaxed) < self.sh.sent.load(Ordering::Relaxed)
            && !self.reader.is_finished()
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.reader.abort();
        let sent = self.sh.sent.load(Ordering::Relaxed);
        let received = self.sh.received.load(Ordering::Relaxed);
        ByReport {
            sent,
            received,
            lat: LatSummary::of(&lock(&self.sh.hist)),
            closed: lock(&self.sh.closed).clone(),
            admin_closed: self.notifier.closed(),
        }
    }
}

/// The bystander's figures.
pub struct ByReport {
    pub sent: u64,
    pub received: u64,
    pub lat: LatSummary,
    pub closed: Option<String>,
    pub admin_closed: Option<String>,
}

impl ByReport {
    /// No bystander could be set up (`why`).
    pub fn none(why: &str) -> ByReport {
        ByReport {
            sent: 0,
            received: 0,
            lat: LatSummary::of(&new_hist()),
            closed: Some(why.to_string()),
            admin_closed: None,
        }
    }

    pub fn lost(&self) -> u64 {
        self.sent.saturating_sub(self.received)
    }

    pub fn json(&self) -> Value {
        json!({
            "sent": self.sent,
            "received": self.received,
            "lost": self.lost(),
            "p50_ms": self.lat.p50,
            "p99_ms": self.lat.p99,
            "max_ms": self.lat.max,
            "closed": self.closed,
            "admin_closed": self.admin_closed,
        })
    }
}

/// A fresh `GET /healthz` every second, as a load balancer's health check.
pub struct Health {
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

/// How long one health check may take before it counts as failed.
const HEALTH_LIMIT: Duration = Duration::from_secs(2);

impl Health {
    pub fn start(target: &Target) -> Health {
        let (ok, failed, stop) = (
            Arc::new(AtomicU64::new(0)),
            Arc::new(AtomicU64::new(0)),
            CancellationToken::new(),
        );
        let (t_ok, t_failed, t_stop) = (ok.clone(), failed.clone(), stop.clone());
        let addr = target.addr;
        let task = tokio::spawn(async move {
            let mut checks = JoinSet::new();
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            loop {
                tokio::select! {
                    _ = t_stop.cancelled() => break,
                    _ = tick.tick() => {}
                }
                let (ok, failed) = (t_ok.clone(), t_failed.clone());
                checks.spawn(async move {
                    let check = async {
                        let mut s = tcp_from(HOME, addr, None).await?;
                        http_get(
                            &mut s,
                            &addr.to_string(),
                            "/healthz",
                            true,
                            "",
                            HEALTH_LIMIT,
                        )
                        .await
                    };
                    match tokio::time::timeout(HEALTH_LIMIT, check).await {
                        Ok(Ok((200, _))) => ok.fetch_add(1, Ordering::Relaxed),
                        _ => failed.fetch_add(1, Ordering::Relaxed),
                    };
                });
                while checks.try_join_next().is_some() {}
            }
            while checks.join_next().await.is_some() {}
        });
        Health {
            ok,
            failed,
            stop,
            task,
        }
    }

    /// Stops checking; waits for the checks in flight (each bounded by [`HEALTH_LIMIT`]).
    pub async fn finish(self) -> (u64, u64) {
        self.stop.cancel();
        let _ = self.task.await;
        (
            self.ok.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
        )
    }
}

/// A `/proc/PID/status` field in KiB (`VmRSS`, `VmHWM`).
pub fn status_kib(pid: u32, key: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// Polls each server's RSS every 100 ms and reads its high-water mark (`VmHWM`, the peak
/// since the server started: the script starts a fresh server per attack) at the end.
pub struct Memory {
    nodes: Vec<(String, u32, Arc<AtomicU64>, u64)>,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl Memory {
    pub fn start(pids: Vec<(String, u32)>) -> Memory {
        let stop = CancellationToken::new();
        let nodes: Vec<_> = pids
            .into_iter()
            .map(|(name, pid)| {
                let start = status_kib(pid, "VmRSS").unwrap_or(0);
                (name, pid, Arc::new(AtomicU64::new(start)), start)
            })
            .collect();
        let watched: Vec<(u32, Arc<AtomicU64>)> =
            nodes.iter().map(|n| (n.1, n.2.clone())).collect();
        let t_stop = stop.clone();
        let task = tokio::spawn(async move {
            while !t_stop.is_cancelled() {
                for (pid, peak) in &watched {
                    // Also the high-water mark: a spike between two polls still counts.
                    let now = status_kib(*pid, "VmHWM").or_else(|| status_kib(*pid, "VmRSS"));
                    if let Some(kib) = now {
                        peak.fetch_max(kib, Ordering::Relaxed);
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        Memory { nodes, stop, task }
    }

    /// Per node: name, pid, RSS at the start and peak (MB), and whether it is still alive.
    pub async fn finish(self) -> Vec<NodeMem> {
        self.stop.cancel();
        let _ = self.task.await;
        self.nodes
            .into_iter()
            .map(|(name, pid, peak, start)| {
                if let Some(hwm) = status_kib(pid, "VmHWM") {
                    peak.fetch_max(hwm, Ordering::Relaxed);
                }
                NodeMem {
                    name,
                    pid,
                    start_mb: round1(start as f64 / 1024.0),
                    peak_mb: round1(peak.load(Ordering::Relaxed) as f64 / 1024.0),
                    alive: status_kib(pid, "VmRSS").is_some(),
                }
            })
            .collect()
    }
}

pub struct NodeMem {
    pub name: String,
    pub pid: u32,
    pub start_mb: f64,
    pub peak_mb: f64,
    pub alive: bool,
}

impl NodeMem {
    pub fn json(&self) -> Value {
        json!({"name": self.name, "pid": self.pid, "rss_start_mb": self.start_mb,
            "peak_rss_mb": self.peak_mb, "alive_at_end": self.alive})
    }
}

/// The sum of a metric's samples in `/metrics` (with the admin password, in case scraping
/// needs it); None when the server does not answer or has no such metric.
pub async fn metric(target: &Target, auth: &str, name: &str) -> Option<f64> {
    let mut s = tcp_from(HOME, target.addr, None).await.ok()?;
    let extra = format!("Authorization: Bearer {auth}\r\n");
    let (status, body) = http_get(
        &mut s,
        &target.addr.to_string(),
        "/metrics",
        true,
        &extra,
        Duration::from_secs(2),
    )
    .await
    .ok()?;
    if status != 200 {
        return None;
    }
    let text = String::from_utf8_lossy(&body);
    let values: Vec<f64> = text
        .lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|r| r.starts_with(' ') || r.starts_with('{'))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
        .collect();
    (!values.is_empty()).then(|| values.iter().sum())
}
