//! The bench's own admin ("server") connection: joins the server pool, answers every forwarded
//! `client_connect` with `client_connected` (assigning groups), and sends the notifications.

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use dashmap::DashMap;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

use crate::common::{Ctx, Ws, close_desc, open_ws};

#[derive(Default)]
pub struct AdminStats {
    /// `client_connect` forwards received.
    pub forwards: AtomicU64,
    /// `error` messages the server sent to the admin.
    pub errors: AtomicU64,
    pub last_error: Mutex<Option<String>>,
    /// Why the admin connection ended, if it did.
    pub closed: Mutex<Option<String>>,
}

pub struct Admin {
    tx: mpsc::UnboundedSender<Message>,
    /// Client id → group number, filled before the acknowledgement is sent.
    pub groups_of: Arc<DashMap<String, u32>>,
    pub stats: Arc<AdminStats>,
    ended: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

impl Admin {
    /// Connects with the `auth` header and joins the server pool. Clients are put in group
    /// `g<bench_group>` when their `client_connect` carried `bench_group`, else round robin
    /// over `groups` groups.
    pub async fn connect(ctx: &Ctx, groups: u32) -> Result<Admin> {
        let mut ws = open_ws(ctx, Some(&ctx.auth))
            .await
            .map_err(|e| anyhow!("admin connection to {}: {e}", ctx.target.url))?;
        ws.send(Message::text(r#"{"type":"server_connect","data":{}}"#))
            .await
            .context("admin: sending server_connect")?;
        // bcrypt on the server side takes a fraction of a second.
        let reply = tokio::time::timeout(Duration::from_secs(15), wait_server_connect(&mut ws))
            .await
            .map_err(|_| anyhow!("admin: no server_connect reply within 15 s"))??;
        if reply != Value::Bool(true) {
            bail!("admin refused (server_connect answered {reply}); is --auth right?");
        }
        let (mut sink, mut stream) = ws.split();
        let (tx, mut rx) = mpsc::unbounded_channel::<Message>();
        let stats = Arc::new(AdminStats::default());
        let groups_of = Arc::new(DashMap::new());
        let ended = CancellationToken::new();

        let writer_stats = stats.clone();
        let writer_ended = ended.clone();
        let writer = tokio::spawn(async move {
            // Feed everything queued, then flush once: batches under load.
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
                    let mut c = writer_stats
                        .closed
                        .lock()
                        .unwrap_or_else(|e| e.into_inner());
                    c.get_or_insert_with(|| format!("write failed: {e}"));
                    writer_ended.cancel();
                    return;
                }
            }
        });

        let reader_tx = tx.clone();
        let reader_stats = stats.clone();
        let reader_groups = groups_of.clone();
        let reader_ended = ended.clone();
        let rr = AtomicU32::new(0);
        let groups = groups.max(1);
        let reader = tokio::spawn(async move {
            let why = loop {
                let msg = match stream.next().await {
                    None => break "connection ended".to_string(),
                    Some(Err(e)) => break format!("read error: {e}"),
                    Some(Ok(m)) => m,
                };
                let v: Value = match &msg {
                    Message::Text(t) => match serde_json::from_str(t.as_str()) {
                        Ok(v) => v,
                        Err(_) => continue,
                    },
                    Message::Binary(b) => match serde_json::from_slice(b) {
                        Ok(v) => v,
                        Err(_) => continue,
                    },
                    Message::Close(f) => {
                        break format!("closed by server: {}", close_desc(f.as_ref()));
                    }
                    _ => continue,
                };
                match v.get("type").and_then(Value::as_str) {
                    Some("client_connect") => {
                        reader_stats.forwards.fetch_add(1, Ordering::Relaxed);
                        let data = v.get("data");
                        let Some(id) = data.and_then(|d| d.get("target")).and_then(Value::as_str)
                        else {
                            continue;
                        };
                        let group = data
                            .and_then(|d| d.get("bench_group"))
                            .and_then(Value::as_u64)
                            .map(|g| (g % u64::from(groups)) as u32)
                            .unwrap_or_else(|| rr.fetch_add(1, Ordering::Relaxed) % groups);
                        reader_groups.insert(id.to_string(), group);
                        let ack = json!({
                            "type": "client_connected",
                            "data": {"target": id, "user": format!("g{group}")},
                        });
                        if reader_tx.send(Message::text(ack.to_string())).is_err() {
                            break "writer ended".to_string();
                        }
                    }
                    Some("error") => {
                        reader_stats.errors.fetch_add(1, Ordering::Relaxed);
                        let mut last = reader_stats
                            .last_error
                            .lock()
                            .unwrap_or_else(|e| e.into_inner());
                        *last = Some(v.get("data").map(Value::to_string).unwrap_or_default());
                    }
                    _ => {}
                }
            };
            let mut c = reader_stats
                .closed
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            c.get_or_insert(why);
            reader_ended.cancel();
        });

        Ok(Admin {
            tx,
            groups_of,
            stats,
            ended,
            tasks: vec![writer, reader],
        })
    }

    /// Queues a text frame; false when the admin connection is gone.
    pub fn send(&self, text: String) -> bool {
        !self.ended.is_cancelled() && self.tx.send(Message::text(text)).is_ok()
    }

    pub fn close_reason(&self) -> Option<String> {
        self.stats
            .closed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn last_error(&self) -> Option<String> {
        self.stats
            .last_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn errors(&self) -> u64 {
        self.stats.errors.load(Ordering::Relaxed)
    }

    /// Group of an acknowledged client, as assigned by this admin.
    pub fn group_of(&self, id: &str) -> Option<u32> {
        self.groups_of.get(id).map(|g| *g)
    }

    /// A summary for the final JSON line.
    pub fn json(&self) -> Value {
        json!({
            "forwards": self.stats.forwards.load(Ordering::Relaxed),
            "errors_received": self.errors(),
            "last_error": self.last_error(),
            "closed": self.close_reason(),
        })
    }
}

impl Drop for Admin {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

async fn wait_server_connect(ws: &mut Ws) -> Result<Value> {
    loop {
        let msg = match ws.next().await {
            None => bail!("admin: connection ended before the server_connect reply"),
            Some(Err(e)) => bail!("admin: {e}"),
            Some(Ok(m)) => m,
        };
        let v: Value = match &msg {
            Message::Text(t) => serde_json::from_str(t.as_str()).unwrap_or(Value::Null),
            Message::Binary(b) => serde_json::from_slice(b).unwrap_or(Value::Null),
            Message::Close(f) => bail!(
                "admin: closed by the server before server_connect was answered: {}",
                close_desc(f.as_ref())
            ),
            _ => continue,
        };
        if v.get("type").and_then(Value::as_str) == Some("server_connect") {
            return Ok(v.get("data").cloned().unwrap_or(Value::Null));
        }
    }
}
