//! `baseline-server`: the smallest relay on the same stack (tokio + tokio-tungstenite) that
//! speaks enough of the protocol for `fanout` (and `group`, `p2p`): no limits, no validation,
//! unbounded per-connection queues; and `baseline`: `fanout` against it and then
//! against the server under test, with the ratio.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Map, Value, json};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::mpsc;
use tokio_tungstenite::accept_hdr_async_with_config;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};

use crate::common::{Ctx, Target};
use crate::fanout;
use crate::stats::{round1, round3};

type Tx = mpsc::UnboundedSender<Message>;

/// A registered client of a reference server: `T` is how frames reach its connection.
pub(crate) struct Client<T> {
    pub(crate) tx: T,
    pub(crate) group: Option<String>,
}

/// Clients by id and groups by name, as the reference servers keep them.
pub(crate) struct Registry<T> {
    pub(crate) clients: HashMap<String, Client<T>>,
    pub(crate) groups: HashMap<String, HashMap<String, T>>,
}

impl<T> Default for Registry<T> {
    fn default() -> Self {
        Registry {
            clients: HashMap::new(),
            groups: HashMap::new(),
        }
    }
}

impl<T> Registry<T> {
    pub(crate) fn leave_group(&mut self, id: &str) {
        if let Some(g) = self.clients.get_mut(id).and_then(|c| c.group.take())
            && let Some(members) = self.groups.get_mut(&g)
        {
            members.remove(id);
            if members.is_empty() {
                self.groups.remove(&g);
            }
        }
    }
}

/// A reference server's state: the admin password, the registry, the servers (numbered, for
/// round robin) and the counters.
pub(crate) struct State<T> {
    pub(crate) auth: String,
    reg: RwLock<Registry<T>>,
    pub(crate) servers: Mutex<Vec<(u64, T)>>,
    pub(crate) rr: AtomicUsize,
    pub(crate) next: AtomicU64,
}

impl<T> State<T> {
    pub(crate) fn new(auth: String) -> State<T> {
        State {
            auth,
            reg: RwLock::new(Registry::default()),
            servers: Mutex::new(Vec::new()),
            rr: AtomicUsize::new(0),
            next: AtomicU64::new(0),
        }
    }

    pub(crate) fn read(&self) -> std::sync::RwLockReadGuard<'_, Registry<T>> {
        self.reg.read().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn write(&self) -> std::sync::RwLockWriteGuard<'_, Registry<T>> {
        self.reg.write().unwrap_or_else(|e| e.into_inner())
    }
}

fn is_falsy(v: Option<&Value>) -> bool {
    match v {
        None | Some(Value::Null) => true,
        Some(Value::Bool(b)) => !b,
        Some(Value::Number(n)) => n.as_f64() == Some(0.0),
        Some(Value::String(s)) => s.is_empty(),
        Some(Value::Array(a)) => a.is_empty(),
        Some(Value::Object(o)) => o.is_empty(),
    }
}

/// The bare payload frame: `data` as compact JSON, `{}` when falsy.
fn bare(data: Option<&Value>) -> Utf8Bytes {
    if is_falsy(data) {
        Utf8Bytes::from_static("{}")
    } else {
        Utf8Bytes::from(data.map(Value::to_string).unwrap_or_default())
    }
}

/// Runs the reference server until killed (or, with `exit_with_parent`, until the process that
/// started it goes away).
pub async fn serve(host: &str, port: u16, auth: String, exit_with_parent: bool) -> Result<()> {
    let state = Arc::new(State::<Tx>::new(auth));
    accept_forever("baseline-server", host, port, exit_with_parent, |stream| {
        tokio::spawn(connection(stream, state.clone()));
    })
    .await
}

/// The reference servers' accept loop: listens on `host:port` (see [`listen`]), says where
/// unless started by the bench (`exit_with_parent`, then it also exits with its parent), and
/// hands every accepted socket, with `TCP_NODELAY`, to `serve`.
pub(crate) async fn accept_forever(
    name: &str,
    host: &str,
    port: u16,
    exit_with_parent: bool,
    mut serve: impl FnMut(TcpStream),
) -> Result<()> {
    let listener = listen(host, port).await?;
    if exit_with_parent {
        exit_with_parent_watch();
    } else {
        eprintln!("{name}: listening on {}", listener.local_addr()?);
    }
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let _ = stream.set_nodelay(true);
                serve(stream);
            }
            Err(e) => {
                eprintln!("{name}: accept: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

/// A listener on `host:port` with an explicit backlog: std's (and so tokio's
/// `TcpListener::bind`) is 128, which drops SYNs when a few hundred clients connect at once.
async fn listen(host: &str, port: u16) -> Result<TcpListener> {
    let addr = tokio::net::lookup_host((host, port))
        .await
        .with_context(|| format!("cannot resolve {host}"))?
        .next()
        .with_context(|| format!("{host} resolves to no address"))?;
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }?;
    socket.set_reuseaddr(true)?;
    socket
        .bind(addr)
        .with_context(|| format!("cannot listen on {addr}"))?;
    Ok(socket.listen(1024)?)
}

/// Exits the process once the process that started it goes away (it is re-parented).
fn exit_with_parent_watch() {
    // SAFETY: getppid has no preconditions.
    let parent = unsafe { libc::getppid() };
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            // SAFETY: as above.
            if unsafe { libc::getppid() } != parent {
                std::process::exit(0);
            }
        }
    });
}

async fn connection(stream: TcpStream, st: Arc<State<Tx>>) {
    let admin_flag = Arc::new(AtomicBool::new(false));
    let flag = admin_flag.clone();
    let password = st.auth.clone();
    // The error type is tungstenite's, not ours.
    #[allow(clippy::result_large_err)]
    let callback = move |req: &Request, resp: Response| {
        if req
            .headers()
            .get("auth")
            .is_some_and(|v| v.as_bytes() == password.as_bytes())
        {
            flag.store(true, Ordering::Relaxed);
        }
        Ok(resp)
    };
    let config = WebSocketConfig::default().read_buffer_size(8 * 1024);
    let Ok(ws) = accept_hdr_async_with_config(stream, callback, Some(config)).await else {
        return;
    };
    let admin = admin_flag.load(Ordering::Relaxed);
    let n = st.next.fetch_add(1, Ordering::Relaxed);
    let id = format!("00000000-0000-4000-8000-{n:012x}");
    let (mut sink, mut stream) = ws.split();
    let (tx, mut rx) = mpsc::unbounded_channel::<Message>();
    let writer = tokio::spawn(async move {
        while let Some(m) = rx.recv().await {
            let mut r = sink.feed(m).await;
            while r.is_ok() {
                match rx.try_recv() {
                    Ok(m) => r = sink.feed(m).await,
                    Err(_) => break,
                }
            }
            if r.is_err() || sink.flush().await.is_err() {
                return;
            }
        }
    });
    let mut is_client = false;
    let mut is_server = false;
    while let Some(Ok(m)) = stream.next().await {
        let v: Value = match &m {
            Message::Text(t) => serde_json::from_str(t.as_str()).unwrap_or(Value::Null),
            Message::Binary(b) => serde_json::from_slice(b).unwrap_or(Value::Null),
            Message::Close(_) => break,
            _ => continue,
        };
        match v.get("type").and_then(Value::as_str) {
            Some("server_connect") => {
                if admin && !is_server {
                    is_server = true;
                    st.servers
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push((n, tx.clone()));
                }
                let reply = if admin {
                    r#"{"type":"server_connect","data":true}"#
                } else {
                    r#"{"type":"server_connect","data":false}"#
                };
                let _ = tx.send(Message::text(reply));
            }
            Some("client_connect") => {
                let mut data = match v.get("data") {
                    Some(Value::Object(o)) => o.clone(),
                    _ => Map::new(),
                };
                data.insert("target".into(), Value::String(id.clone()));
                if !is_client {
                    is_client = true;
                    st.write().clients.insert(
                        id.clone(),
                        Client {
                            tx: tx.clone(),
                            group: None,
                        },
                    );
                }
                let forward = json!({"type": "client_connect", "data": data}).to_string();
                let servers = st.servers.lock().unwrap_or_else(|e| e.into_inner());
                if !servers.is_empty() {
                    let i = st.rr.fetch_add(1, Ordering::Relaxed) % servers.len();
                    let _ = servers[i].1.send(Message::text(forward));
                }
            }
            Some("client_connected") if admin => {
                let data = v.get("data");
                let Some(target) = data.and_then(|d| d.get("target")).and_then(Value::as_str)
                else {
                    continue;
                };
                let user = match data.and_then(|d| d.get("user")).and_then(Value::as_str) {
                    Some(u) if !u.is_empty() => u.to_string(),
                    _ => "public".to_string(),
                };
                let mut reg = st.write();
                reg.leave_group(target);
                let Some(c) = reg.clients.get_mut(target) else {
                    continue;
                };
                c.group = Some(user.clone());
                let tx = c.tx.clone();
                reg.groups
                    .entry(user)
                    .or_default()
                    .insert(target.to_string(), tx.clone());
                drop(reg);
                let ack = json!({"type": "client_connected", "data": {"target": target}});
                let _ = tx.send(Message::text(ack.to_string()));
            }
            Some("notify_client") if admin || is_client => {
                let data = v.get("data");
                let target = data.and_then(|d| d.get("target")).and_then(Value::as_str);
                let body = bare(data.and_then(|d| d.get("data")));
                let reg = st.read();
                if let Some(c) = target.and_then(|t| reg.clients.get(t)) {
                    let _ = c.tx.send(Message::Text(body));
                }
            }
            Some("notify_group") if admin || is_client => {
                let data = v.get("data");
                let target = match data.and_then(|d| d.get("target")).and_then(Value::as_str) {
                    Some(t) if !t.is_empty() => t,
                    _ => "public",
                };
                let frame = bare(data.and_then(|d| d.get("data")));
                let reg = st.read();
                if let Some(members) = reg.groups.get(target) {
                    for tx in members.values() {
                        let _ = tx.send(Message::Text(frame.clone()));
                    }
                }
            }
            Some("notify_all") if admin => {
                // Encode once; every client gets a clone of the same bytes.
                let frame = bare(v.get("data"));
                let reg = st.read();
                for c in reg.clients.values() {
                    let _ = c.tx.send(Message::Text(frame.clone()));
                }
            }
            _ => {}
        }
    }
    if is_client {
        let mut reg = st.write();
        reg.leave_group(&id);
        reg.clients.remove(&id);
    }
    if is_server {
        st.servers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|(k, _)| *k != n);
    }
    drop(tx);
    writer.abort();
}

fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(l.local_addr()?.port())
}

pub(crate) async fn wait_ready(addr: SocketAddr) -> Result<()> {
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        if TcpStream::connect(addr).await.is_ok() {
            return Ok(());
        }
        if Instant::now() > until {
            bail!("the baseline server did not listen on {addr} within 10 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `fanout` against a freshly started `baseline-server`, then against `--url`.
pub async fn compare(ctx: &Arc<Ctx>, p: &fanout::Params) -> Result<(Value, bool)> {
    let port = free_port()?;
    let exe = std::env::current_exe().context("locating the bench executable")?;
    let mut child = tokio::process::Command::new(exe)
        .args(["baseline-server", "--host", "127.0.0.1", "--port"])
        .arg(port.to_string())
        .arg("--auth")
        .arg(&ctx.auth)
        .arg("--exit-with-parent")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("starting the baseline server")?;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    wait_ready(addr).await?;
    let target = Target {
        url: format!("ws://127.0.0.1:{port}/ws"),
        addr,
    };
    println!(
        "baseline: reference server (pid {}) on {}",
        child.id().map(|p| p.to_string()).unwrap_or_default(),
        target.url
    );
    let bctx = Arc::new(ctx.with_target(target, child.id()));
    let base = fanout::run(&bctx, p, "baseline").await;
    let _ = child.kill().await;
    let base = base?;
    // Let the closed sockets go before the second run.
    tokio::time::sleep(Duration::from_secs(1)).await;
    println!("baseline: now the server under test at {}", ctx.target.url);
    let under = fanout::run(ctx, p, "jssocket").await?;
    let ratio = under.deliveries_per_sec / base.deliveries_per_sec.max(1e-9);
    println!(
        "baseline: deliveries/s  baseline {:.0}  jssocket {:.0}  ratio jssocket/baseline {:.3}",
        base.deliveries_per_sec, under.deliveries_per_sec, ratio
    );
    println!(
        "baseline: p99 latency   baseline {:.3} ms  jssocket {:.3} ms",
        base.p99_ms, under.p99_ms
    );
    let json = json!({
        "scenario": "baseline",
        "clients": p.clients,
        "messages": p.messages,
        "size": p.size,
        "baseline_deliveries_per_sec": round1(base.deliveries_per_sec),
        "jssocket_deliveries_per_sec": round1(under.deliveries_per_sec),
        "ratio_deliveries_per_sec": round3(ratio),
        "baseline_p99_ms": round3(base.p99_ms),
        "jssocket_p99_ms": round3(under.p99_ms),
        "baseline": base.json,
        "jssocket": under.json,
        "timed_out": ctx.stop.is_cancelled(),
    });
    Ok((json, base.ok && under.ok))
}
