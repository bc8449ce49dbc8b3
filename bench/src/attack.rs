//! `attack`: the cheap attacks of issue 10, each run for a bounded time against a server on
//! loopback while a bystander (an acknowledged client that an admin notifies 20 times a
//! second) measures what other users feel. Every scenario reports the same figures — the
//! bystander's round trip (p50/p99/max) and lost notifications, each server's peak RSS,
//! whether a backend could log in during the attack and how long it took, and how many
//! fresh `/healthz` checks failed — plus what is particular to the attack.
//!
//! The tool only speaks the protocol, so the same build measures an old server and a new one.
//! Attackers come from 127.0.0.2 and up (`--per-source` each); the bystander, the backends,
//! the login probe and the health checker from 127.0.0.1, except in `auth-flood-nat`, whose
//! attackers share 127.0.0.1 with the backend (a backend behind a NAT or a proxy).

mod net;
mod peers;

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::ValueEnum;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

use self::net::{SockState, attacker_ip, hold, tcp_from, text_frame, upgrade};
use self::peers::{AdminConn, ByReport, Bystander, Health, Login, Memory, metric, ws_connect};
use crate::common::{Ctx, Rng, Target, close_desc};

/// The attacks, named as in BENCHMARKS.md.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Scenario {
    /// 10,000 connections each sending 20 client_connect while no backend is connected.
    ConnectFlood,
    /// The same flood while the only backend reads slowly.
    ConnectFloodSlowBackend,
    /// Waves of 100 wrong-password upgrades from 10 addresses (127.0.0.2–11), closed at
    /// once, while a backend (127.0.0.1) tries its first login.
    AuthFlood,
    /// The same, with the attackers sharing the backend's address (127.0.0.1–10): a backend
    /// behind a NAT or a proxy.
    AuthFloodNat,
    /// Up to 19,000 plain HTTP keep-alive connections (GET /healthz every 4 s).
    FdFlood,
    /// 200 connections sending ~23k notify_all and never reading, plus unfinished fragmented
    /// messages and half-sent 1 MiB frames.
    MemoryPin,
    /// Cluster: 2,000 clients on node A with ~100 KB tokens send client_connect; the only
    /// backend is on node B.
    ClusterForwardFlood,
    /// Cluster: acknowledged clients on node A flood notify_client to ids that exist nowhere.
    ClusterNotifyFlood,
    /// Cluster: node B (the backend's) is killed, a backend joins node C, 300 clients on A
    /// send client_connect.
    ClusterNodeDeath,
    /// A client with a tiny receive buffer stops reading while an admin floods it, then reads
    /// again: does it get the 1008 "slow consumer" close frame?
    SlowConsumer,
}

impl Scenario {
    pub fn name(self) -> &'static str {
        match self {
            Scenario::ConnectFlood => "connect-flood",
            Scenario::ConnectFloodSlowBackend => "connect-flood-slow-backend",
            Scenario::AuthFlood => "auth-flood",
            Scenario::AuthFloodNat => "auth-flood-nat",
            Scenario::FdFlood => "fd-flood",
            Scenario::MemoryPin => "memory-pin",
            Scenario::ClusterForwardFlood => "cluster-forward-flood",
            Scenario::ClusterNotifyFlood => "cluster-notify-flood",
            Scenario::ClusterNodeDeath => "cluster-node-death",
            Scenario::SlowConsumer => "slow-consumer",
        }
    }

    /// Servers the scenario needs: `--url` (node A) and then `--node-url`s (B, C).
    fn nodes_needed(self) -> usize {
        match self {
            Scenario::ClusterForwardFlood | Scenario::ClusterNotifyFlood => 2,
            Scenario::ClusterNodeDeath => 3,
            _ => 1,
        }
    }
}

/// One server under test: node A is `--url`, B and C the `--node-url`s.
pub struct Node {
    pub name: String,
    pub target: Target,
    pub pid: Option<u32>,
}

pub struct Params {
    pub scenario: Scenario,
    /// How long the attack lasts (cluster-node-death and slow-consumer follow their own
    /// timeline of about 20 s).
    pub duration: Duration,
    /// Bystander notifications per second.
    pub rate: f64,
    /// When the backend tries to log in, from the start of the attack.
    pub login_at: Option<Duration>,
    /// How long that login may take before it counts as refused.
    pub login_timeout: Duration,
    pub nodes: Vec<Node>,
    /// Files (the servers' logs) whose growth during the attack is reported.
    pub log_files: Vec<PathBuf>,
    /// Attacking connections instead of the scenario's default (to scale an attack down).
    pub conns: Option<usize>,
    /// cluster-notify-flood: notifications per second, all attackers together.
    pub flood_rate: f64,
    /// Attacking connections per source address.
    pub per_source: usize,
    /// This process's descriptor limit (fd-flood stays below it).
    pub nofile: u64,
}

/// How long setting up (a backend's login before the attack, the bystander) may take.
const SETUP_LIMIT: Duration = Duration::from_secs(20);
/// After the attack, how long notifications still on their way may arrive.
const DRAIN: Duration = Duration::from_secs(3);
/// Upgrades and HTTP answers an attacker waits for.
const ATTACKER_LIMIT: Duration = Duration::from_secs(10);
/// Connections being opened at once by a flood.
const OPENING: usize = 256;

/// What an attack reports beyond the common figures.
struct Outcome {
    json: Value,
    line: String,
    /// The login measured by the attack itself (cluster-node-death's second backend).
    login: Option<Login>,
    /// Attacking connections still held, each answering its socket's state when released.
    held: JoinSet<SockState>,
}

impl Outcome {
    fn new(json: Value, line: String) -> Outcome {
        Outcome {
            json,
            line,
            login: None,
            held: JoinSet::new(),
        }
    }
}

/// Counters shared by a flood's connections.
#[derive(Default)]
struct FloodStats {
    opened: AtomicU64,
    failures: Mutex<BTreeMap<String, u64>>,
    /// Connections whose payload could not be written whole before the attack ended.
    write_unfinished: AtomicU64,
}

impl FloodStats {
    fn fail(&self, why: impl Into<String>) {
        let mut f = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        let why: String = why.into();
        // Keep the kinds few: the first words of the error.
        let key: String = why.chars().take(60).collect();
        *f.entry(key).or_default() += 1;
    }

    fn failed(&self) -> u64 {
        self.failures
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .sum()
    }

    fn json(&self) -> Value {
        json!({
            "opened": self.opened.load(Ordering::Relaxed),
            "failed": self.failures.lock().unwrap_or_else(|e| e.into_inner()).clone(),
            "write_unfinished": self.write_unfinished.load(Ordering::Relaxed),
        })
    }
}

/// Where the run is: the context, the parameters and when the attack ends.
struct Env<'a> {
    ctx: &'a Arc<Ctx>,
    p: &'a Params,
    until: Instant,
    release: CancellationToken,
}

impl Env<'_> {
    fn node(&self, i: usize) -> &Node {
        &self.p.nodes[i]
    }

    fn conns(&self, default: usize) -> usize {
        self.p.conns.unwrap_or(default).max(1)
    }

    /// Sleeps until the end of the attack (or the global `--timeout`).
    async fn wait_end(&self) {
        tokio::select! {
            _ = tokio::time::sleep_until(self.until.into()) => {}
            _ = self.ctx.stop.cancelled() => {}
        }
    }

    fn over(&self) -> bool {
        Instant::now() >= self.until || self.ctx.stop.is_cancelled()
    }

    /// Opens attacking connections `attackers` (their numbers choose their source
    /// addresses) to `target`, each upgrades, writes `payload` once and is held until
    /// released (reading and discarding when `read`). Returns when all were tried or the
    /// attack is over.
    async fn flood(
        &self,
        target: &Target,
        attackers: std::ops::Range<usize>,
        payload: Arc<Vec<u8>>,
        read: bool,
        stats: &Arc<FloodStats>,
        held: &mut JoinSet<SockState>,
    ) {
        let opening = Arc::new(Semaphore::new(OPENING));
        for i in attackers {
            let permit = tokio::select! {
                p = opening.clone().acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => break,
                },
                _ = tokio::time::sleep_until(self.until.into()) => break,
                _ = self.ctx.stop.cancelled() => break,
            };
            let (target, payload, stats) = (target.clone(), payload.clone(), stats.clone());
            let (release, until, src) = (
                self.release.clone(),
                self.until,
                attacker_ip(i, self.p.per_source),
            );
            held.spawn(async move {
                let Some(mut s) = open_websocket(src, &target, &stats).await else {
                    return SockState::Other;
                };
                drop(permit);
                // A server that stops reading must not hold the attacker past the attack.
                let left = until.saturating_duration_since(Instant::now());
                match tokio::time::timeout(left, s.write_all(&payload)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(_)) => return SockState::ClosedByServer,
                    Err(_) => {
                        stats.write_unfinished.fetch_add(1, Ordering::Relaxed);
                    }
                }
                hold(s, read, release).await
            });
            while held.try_join_next().is_some() {}
        }
    }
}

/// Runs one attack and prints its human line; the JSON line is printed by the caller.
pub async fn run(ctx: &Arc<Ctx>, p: &Params) -> Result<(Value, bool)> {
    let s = p.scenario;
    if p.nodes.len() < s.nodes_needed() {
        bail!(
            "{} needs {} servers: --url (node A) and {} --node-url",
            s.name(),
            s.nodes_needed(),
            s.nodes_needed() - 1
        );
    }
    if s == Scenario::ClusterNodeDeath && p.nodes[1].pid.is_none() {
        bail!("cluster-node-death kills node B: give its pid as the first --node-pid");
    }
    // Who sits where: the backend acknowledges the bystander, the notifier (an admin that is
    // not a backend) notifies it; in a cluster both are on another node than the bystander.
    let (backend_at, admin_at, login_at_node) = match s {
        Scenario::ClusterForwardFlood | Scenario::ClusterNotifyFlood => (1, 1, 1),
        Scenario::ClusterNodeDeath => (1, 2, 2),
        _ => (0, 0, 0),
    };
    // auth-flood measures the backend's *first* login (a server may remember a password it
    // verified): nobody logs in before the attack, and that backend, once in, acknowledges
    // and notifies the bystander for the rest of the attack.
    let cold = matches!(s, Scenario::AuthFlood | Scenario::AuthFloodNat);
    let mut backend = None;
    let mut notifier = None;
    let mut bystander = None;
    // The watchers (bystander, admins, probes) run on a runtime of their own, so that
    // attackers keeping the bench's threads busy do not pass for the server's latency.
    let watch = Watch(Some(
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .context("the watchers' runtime")?,
    ));
    let wh = watch.handle();
    if !cold {
        let slow = (s == Scenario::ConnectFloodSlowBackend).then_some(Duration::from_millis(10));
        let (bt, at, yt, auth) = (
            p.nodes[backend_at].target.clone(),
            p.nodes[admin_at].target.clone(),
            p.nodes[0].target.clone(),
            ctx.auth.clone(),
        );
        let (b, n, by) = wh
            .spawn(async move {
                let b = AdminConn::connect(&bt, &auth, true, slow, SETUP_LIMIT)
                    .await
                    .context("the backend's login before the attack")?;
                let n = Arc::new(
                    AdminConn::connect(&at, &auth, false, None, SETUP_LIMIT)
                        .await
                        .context("the notifying admin")?,
                );
                let by = Bystander::start(&yt, n.clone()).await?;
                Ok::<_, anyhow::Error>((b, n, by))
            })
            .await??;
        bystander = Some(by);
        notifier = Some(n);
        // connect-flood is about a relay with no backend: the queue of waiting client connects.
        backend = (s != Scenario::ConnectFlood).then_some(b);
    }

    let pids: Vec<(String, u32)> = p
        .nodes
        .iter()
        .filter_map(|n| Some((n.name.clone(), n.pid?)))
        .collect();
    let (memory, health) = {
        let _on = wh.enter();
        (Memory::start(pids), Health::start(&p.nodes[0].target))
    };
    let log_sizes = |files: &[PathBuf]| -> Vec<u64> {
        files
            .iter()
            .map(|f| std::fs::metadata(f).map(|m| m.len()).unwrap_or(0))
            .collect()
    };
    let logs_before = log_sizes(&p.log_files);

    println!(
        "attack {}: {:.0} s against {}",
        s.name(),
        p.duration.as_secs_f64(),
        p.nodes[0].target.url,
    );
    if let Some(by) = bystander.as_mut() {
        let _on = wh.enter();
        by.begin(p.rate);
    }
    let start = Instant::now();
    let env = Env {
        ctx,
        p,
        until: start + p.duration,
        release: CancellationToken::new(),
    };
    let login_at = p.login_at.unwrap_or(match s {
        Scenario::AuthFlood | Scenario::AuthFloodNat => Duration::from_secs(1),
        _ => p.duration / 2,
    });
    let login_probe = (s != Scenario::ClusterNodeDeath && !cold).then(|| {
        let (target, auth, limit) = (
            p.nodes[login_at_node].target.clone(),
            ctx.auth.clone(),
            p.login_timeout,
        );
        wh.spawn(async move {
            tokio::time::sleep(login_at).await;
            Login::probe(&target, &auth, limit).await
        })
    });
    // The cold backend logs in during the attack, then sets the bystander up.
    let (target, auth_c, rate, limit, name) = (
        p.nodes[0].target.clone(),
        ctx.auth.clone(),
        p.rate,
        p.login_timeout,
        s.name(),
    );
    let cold_login = wh.spawn(async move {
        if !cold {
            return None;
        }
        tokio::time::sleep(login_at).await;
        let started = Instant::now();
        match AdminConn::connect(&target, &auth_c, true, None, limit).await {
            Ok(conn) => {
                let login = Login {
                    ok: true,
                    ms: conn.login_ms,
                    error: None,
                };
                let conn = Arc::new(conn);
                let by = match Bystander::start(&target, conn.clone()).await {
                    Ok(mut by) => {
                        by.begin(rate);
                        Some(by)
                    }
                    Err(e) => {
                        println!("attack {name}: no bystander: {e:#}");
                        None
                    }
                };
                Some((login, Some(conn), by))
            }
            Err(e) => Some((
                Login {
                    ok: false,
                    ms: crate::stats::round1(started.elapsed().as_secs_f64() * 1000.0),
                    error: Some(format!("{e:#}")),
                },
                None,
                None,
            )),
        }
    });
    let attack = async {
        match s {
            Scenario::ConnectFlood | Scenario::ConnectFloodSlowBackend => connect_flood(&env).await,
            Scenario::AuthFlood => auth_flood(&env, 2).await,
            Scenario::AuthFloodNat => auth_flood(&env, 1).await,
            Scenario::FdFlood => fd_flood(&env).await,
            Scenario::MemoryPin => memory_pin(&env).await,
            Scenario::ClusterForwardFlood => forward_flood(&env, backend.as_ref()).await,
            Scenario::ClusterNotifyFlood => notify_flood(&env).await,
            Scenario::ClusterNodeDeath => node_death(&env).await,
            Scenario::SlowConsumer => slow_consumer(&env).await,
        }
    };
    let (outcome, cold_login) = tokio::join!(attack, cold_login);
    let mut cold_result = None;
    if let Ok(Some((login, conn, by))) = cold_login {
        cold_result = Some(login);
        notifier = conn;
        bystander = by;
    }
    let attack_s = start.elapsed().as_secs_f64();
    let by = match bystander {
        Some(by) => by.finish(DRAIN).await,
        None => ByReport::none("no bystander: the backend did not log in"),
    };
    let logs_after = log_sizes(&p.log_files);
    env.release.cancel();
    let mut outcome = outcome?;
    let (mut held, mut closed_by_server) = (0u64, 0u64);
    while let Some(r) = outcome.held.join_next().await {
        held += 1;
        if let Ok(SockState::ClosedByServer) = r {
            closed_by_server += 1;
        }
    }
    let login = match (outcome.login.take().or(cold_result), login_probe) {
        (Some(l), _) => l,
        (None, Some(task)) => task.await.unwrap_or(Login {
            ok: false,
            ms: 0.0,
            error: Some("probe task failed".into()),
        }),
        (None, None) => Login {
            ok: false,
            ms: 0.0,
            error: Some("not measured".into()),
        },
    };
    let (health_ok, health_failed) = health.finish().await;
    let nodes = memory.finish().await;

    let peak = nodes.iter().map(|n| n.peak_mb).fold(0.0, f64::max);
    let log_growth: Vec<u64> = logs_before
        .iter()
        .zip(&logs_after)
        .map(|(b, a)| a.saturating_sub(*b))
        .collect();
    let targets = json!({
        "bystander_p99_le_100ms": by.received > 0 && by.lat.p99 <= 100.0,
        "no_loss": by.lost() == 0,
        "peak_rss_le_300mb": peak <= 300.0,
        "login_le_2s": login.ok && login.ms <= 2000.0,
    });
    let timed_out = ctx.stop.is_cancelled();
    let mem_line: Vec<String> = nodes
        .iter()
        .map(|n| {
            format!(
                "{} {:.1} MB{}",
                n.name,
                n.peak_mb,
                if n.alive { "" } else { " (dead)" }
            )
        })
        .collect();
    println!(
        "attack {}: bystander p50 {:.1} p99 {:.1} max {:.1} ms, lost {}/{}; peak RSS {}; \
         backend login {}; healthz {} ok {} failed; attackers closed by the server {}/{}; {}",
        s.name(),
        by.lat.p50,
        by.lat.p99,
        by.lat.max,
        by.lost(),
        by.sent,
        if mem_line.is_empty() {
            "(no --server-pid)".to_string()
        } else {
            mem_line.join(", ")
        },
        login.word(),
        health_ok,
        health_failed,
        closed_by_server,
        held,
        outcome.line
    );
    if let Some(why) = &by.closed {
        println!("attack {}: the bystander was closed: {why}", s.name());
    }
    let json = json!({
        "scenario": "attack",
        "attack": s.name(),
        "url": p.nodes[0].target.url,
        "attack_s": crate::stats::round3(attack_s),
        "bystander": by.json(),
        "peak_rss_mb": peak,
        "nodes": nodes.iter().map(|n| n.json()).collect::<Vec<_>>(),
        "backend_login": login.json(),
        "healthz": {"ok": health_ok, "failed": health_failed},
        "admin_errors_received": notifier.as_ref().map_or(0, |n| n.errors.load(Ordering::Relaxed))
            + backend.as_ref().map_or(0, |b| b.errors.load(Ordering::Relaxed)),
        "attackers": {"held": held, "closed_by_server": closed_by_server},
        "log_bytes": log_growth.iter().sum::<u64>(),
        "log_bytes_per_file": log_growth,
        "extra": outcome.json,
        "extra_line": outcome.line,
        "targets": targets,
        "timed_out": timed_out,
    });
    Ok((json, !timed_out))
}

/// The watchers' runtime, shut down without waiting (a runtime may not block on drop inside
/// another one).
struct Watch(Option<tokio::runtime::Runtime>);

impl Watch {
    fn handle(&self) -> tokio::runtime::Handle {
        match &self.0 {
            Some(rt) => rt.handle().clone(),
            None => tokio::runtime::Handle::current(),
        }
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

/// The same `client_connect` `count` times, as one buffer of frames.
fn connects(count: usize, token: &str) -> Vec<u8> {
    let one = text_frame(&format!(
        r#"{{"type":"client_connect","data":{{"token":"{token}"}}}}"#
    ));
    one.repeat(count)
}

/// connect-flood: 10,000 connections × 20 `client_connect` (the per-connection limit).
async fn connect_flood(env: &Env<'_>) -> Result<Outcome> {
    let n = env.conns(10_000);
    let stats = Arc::new(FloodStats::default());
    let mut held = JoinSet::new();
    let payload = Arc::new(connects(20, "attack"));
    env.flood(&env.node(0).target, 0..n, payload, true, &stats, &mut held)
        .await;
    env.wait_end().await;
    let line = format!(
        "{} of {n} connections sent 20 client_connect each ({} failed)",
        stats.opened.load(Ordering::Relaxed),
        stats.failed()
    );
    let mut out = Outcome::new(json!({"connections": n, "flood": stats.json()}), line);
    out.held = held;
    Ok(out)
}

/// An attacker's WebSocket from `src`, upgraded without a password; a failure is counted in
/// `stats` (and `None`), a success too.
async fn open_websocket(
    src: Ipv4Addr,
    target: &Target,
    stats: &FloodStats,
) -> Option<tokio::net::TcpStream> {
    let mut s = match tcp_from(src, target.addr, None).await {
        Ok(s) => s,
        Err(e) => {
            stats.fail(format!("connect: {e}"));
            return None;
        }
    };
    if let Err(e) = upgrade(&mut s, target, "", ATTACKER_LIMIT).await {
        stats.fail(format!("upgrade: {e}"));
        return None;
    }
    stats.opened.fetch_add(1, Ordering::Relaxed);
    Some(s)
}

/// auth-flood: every second a wave of 100 upgrades with a wrong `auth` header, 10 from each
/// of 127.0.0.`first`–127.0.0.`first + 9`, each closed right after its request is written.
async fn auth_flood(env: &Env<'_>, first: u8) -> Result<Outcome> {
    let per_wave = env.conns(100);
    let target = env.node(0).target.clone();
    let stats = Arc::new(FloodStats::default());
    let mut waves = 0u64;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut wave = JoinSet::new();
    while !env.over() {
        tokio::select! {
            _ = tick.tick() => {}
            _ = env.wait_end() => break,
        }
        waves += 1;
        for i in 0..per_wave {
            let src = Ipv4Addr::new(127, 0, 0, first + (i % 10) as u8);
            let request =
                net::upgrade_request(&target, &format!("auth: wrong-password-{waves}-{i}\r\n"));
            let (addr, stats) = (target.addr, stats.clone());
            wave.spawn(async move {
                match tcp_from(src, addr, None).await {
                    Ok(mut s) => match s.write_all(&request).await {
                        // Dropped at once: the server gets the request, then the FIN.
                        Ok(()) => stats.opened.fetch_add(1, Ordering::Relaxed),
                        Err(e) => {
                            stats.fail(format!("write: {e}"));
                            0
                        }
                    },
                    Err(e) => {
                        stats.fail(format!("connect: {e}"));
                        0
                    }
                };
            });
        }
        while wave.try_join_next().is_some() {}
    }
    while wave.join_next().await.is_some() {}
    let line = format!(
        "{waves} waves, {} wrong-password upgrades sent ({} failed)",
        stats.opened.load(Ordering::Relaxed),
        stats.failed()
    );
    Ok(Outcome::new(
        json!({"waves": waves, "per_wave": per_wave, "flood": stats.json()}),
        line,
    ))
}

/// fd-flood: plain HTTP keep-alive connections, each asking `/healthz` every 4 s and opening
/// again when the server closed it, as many as this process may hold.
async fn fd_flood(env: &Env<'_>) -> Result<Outcome> {
    // Keep descriptors for the bystander, the probes and the runtime.
    let room = usize::try_from(env.p.nofile.saturating_sub(400)).unwrap_or(0);
    let n = env.conns(19_000).min(room);
    let target = env.node(0).target.clone();
    let host = target.addr.to_string();
    let stats = Arc::new(FloodStats::default());
    let open = Arc::new(AtomicI64::new(0));
    let peak = Arc::new(AtomicI64::new(0));
    let requests = Arc::new(AtomicU64::new(0));
    let reopened = Arc::new(AtomicU64::new(0));
    let served = Arc::new(AtomicU64::new(0));
    let unanswered = Arc::new(AtomicU64::new(0));
    let opening = Arc::new(Semaphore::new(OPENING * 2));
    let mut held = JoinSet::new();
    for i in 0..n {
        if env.over() {
            break;
        }
        let (target, host, stats) = (target.clone(), host.clone(), stats.clone());
        let (open, peak, requests, reopened) = (
            open.clone(),
            peak.clone(),
            requests.clone(),
            reopened.clone(),
        );
        let (served, unanswered) = (served.clone(), unanswered.clone());
        let (opening, release, src) = (
            opening.clone(),
            env.release.clone(),
            attacker_ip(i, env.p.per_source),
        );
        held.spawn(async move {
            let mut conn: Option<tokio::net::TcpStream> = None;
            let mut ever = false;
            let mut answered = false;
            loop {
                if release.is_cancelled() {
                    break;
                }
                if conn.is_none() {
                    let Ok(_permit) = opening.acquire().await else {
                        break;
                    };
                    match tcp_from(src, target.addr, None).await {
                        Ok(s) => {
                            if ever {
                                reopened.fetch_add(1, Ordering::Relaxed);
                            }
                            ever = true;
                            stats.opened.fetch_add(1, Ordering::Relaxed);
                            let now = open.fetch_add(1, Ordering::Relaxed) + 1;
                            peak.fetch_max(now, Ordering::Relaxed);
                            conn = Some(s);
                        }
                        Err(e) => stats.fail(format!("connect: {e}")),
                    }
                }
                if let Some(s) = conn.as_mut() {
                    match net::http_get(s, &host, "/healthz", false, "", ATTACKER_LIMIT).await {
                        Ok((200, _)) => {
                            requests.fetch_add(1, Ordering::Relaxed);
                            if !answered {
                                answered = true;
                                served.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        Ok((status, _)) => stats.fail(format!("status {status}")),
                        Err(e) => {
                            if e.kind() == std::io::ErrorKind::TimedOut {
                                unanswered.fetch_add(1, Ordering::Relaxed);
                            }
                            // Closed by the server (idle timeout) or no answer: open again.
                            conn = None;
                            open.fetch_sub(1, Ordering::Relaxed);
                        }
                    }
                }
                tokio::select! {
                    _ = release.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_secs(4)) => {}
                }
            }
            match conn {
                Some(s) => net::sock_state(&s),
                None => SockState::ClosedByServer,
            }
        });
        while held.try_join_next().is_some() {}
        // Pace the opening a little so the tasks' first connects overlap with the attack.
        if i % 1000 == 999 {
            tokio::task::yield_now().await;
        }
    }
    env.wait_end().await;
    let line = format!(
        "{n} keep-alive connections tried, {} open at most, {} ever answered, {} requests \
         unanswered in 10 s, {} opens failed, {} reopened after the server closed them",
        peak.load(Ordering::Relaxed),
        served.load(Ordering::Relaxed),
        unanswered.load(Ordering::Relaxed),
        stats.failed(),
        reopened.load(Ordering::Relaxed)
    );
    let mut out = Outcome::new(
        json!({
            "connections": n,
            "peak_open": peak.load(Ordering::Relaxed),
            "healthz_requests": requests.load(Ordering::Relaxed),
            "connections_answered": served.load(Ordering::Relaxed),
            "requests_unanswered": unanswered.load(Ordering::Relaxed),
            "reopened": reopened.load(Ordering::Relaxed),
            "flood": stats.json(),
        }),
        line,
    );
    out.held = held;
    Ok(out)
}

/// memory-pin: 200 connections send ~23k `notify_all` (each answered `forbidden`) and never
/// read; 100 send a 1,000,000-byte fragment of a message that never ends; 100 announce a
/// 1 MiB frame and send half of it. All then wait.
async fn memory_pin(env: &Env<'_>) -> Result<Outcome> {
    let n = env.conns(200);
    let halves = (n / 2).max(1);
    let target = env.node(0).target.clone();
    let replies = Arc::new(text_frame(r#"{"type":"notify_all"}"#).repeat(23_000));
    let mut fragment = Vec::new();
    net::frame(&mut fragment, net::TEXT, false, &vec![b'x'; 1_000_000]);
    let half = {
        let len = 1_048_000;
        let mut out = Vec::new();
        net::frame_header(&mut out, net::TEXT, true, len);
        net::mask_into(&mut out, &vec![b'x'; len / 2], 0);
        out
    };
    let (s1, s2, s3) = (
        Arc::new(FloodStats::default()),
        Arc::new(FloodStats::default()),
        Arc::new(FloodStats::default()),
    );
    let mut held = JoinSet::new();
    env.flood(&target, 0..n, replies, false, &s1, &mut held)
        .await;
    env.flood(
        &target,
        n..n + halves,
        Arc::new(fragment),
        false,
        &s2,
        &mut held,
    )
    .await;
    env.flood(
        &target,
        n + halves..n + 2 * halves,
        Arc::new(half),
        false,
        &s3,
        &mut held,
    )
    .await;
    env.wait_end().await;
    let line = format!(
        "{} notify_all senders, {} unfinished fragments, {} half frames",
        s1.opened.load(Ordering::Relaxed),
        s2.opened.load(Ordering::Relaxed),
        s3.opened.load(Ordering::Relaxed)
    );
    let mut out = Outcome::new(
        json!({"notify_all": s1.json(), "fragments": s2.json(), "half_frames": s3.json()}),
        line,
    );
    out.held = held;
    Ok(out)
}

/// cluster-forward-flood: 2,000 clients on node A (no backend there) send 5 `client_connect`
/// with a ~100 KB token each; node B's backend does not acknowledge them.
async fn forward_flood(env: &Env<'_>, backend: Option<&AdminConn>) -> Result<Outcome> {
    let n = env.conns(2_000);
    let stats = Arc::new(FloodStats::default());
    let mut held = JoinSet::new();
    let payload = Arc::new(connects(5, &"t".repeat(100_000)));
    env.flood(&env.node(0).target, 0..n, payload, true, &stats, &mut held)
        .await;
    env.wait_end().await;
    let forwards = backend.map_or(0, |b| b.forwards.load(Ordering::Relaxed));
    let line = format!(
        "{} of {n} clients sent 5 client_connect of ~100 KB; the backend on B got {forwards} forwards",
        stats.opened.load(Ordering::Relaxed)
    );
    let mut out = Outcome::new(
        json!({"connections": n, "backend_forwards": forwards, "flood": stats.json()}),
        line,
    );
    out.held = held;
    Ok(out)
}

/// A random id in the shape of a connection id (UUID v4), which no connection has.
fn random_id(rng: &mut Rng) -> String {
    let (a, b) = (rng.next_u64(), rng.next_u64());
    format!(
        "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0xfff,
        b >> 52,
        b & 0xffff_ffff_ffff
    )
}

/// cluster-notify-flood: 100 clients on node A, acknowledged by the backend on B, send
/// `notify_client` to random ids, `--flood-rate` a second in all (default 100,000: more
/// than a node publishes to Redis, so the backlog to other nodes fills).
async fn notify_flood(env: &Env<'_>) -> Result<Outcome> {
    let n = env.conns(100);
    let rate = env.p.flood_rate;
    let per_tick = ((rate / n as f64) / 20.0).ceil().max(1.0) as usize;
    let target = env.node(0).target.clone();
    let stats = Arc::new(FloodStats::default());
    let sent = Arc::new(AtomicU64::new(0));
    let acked = Arc::new(AtomicU64::new(0));
    let mut held = JoinSet::new();
    for i in 0..n {
        let (target, stats, sent, acked) =
            (target.clone(), stats.clone(), sent.clone(), acked.clone());
        let (release, until, src) = (
            env.release.clone(),
            env.until,
            attacker_ip(i, env.p.per_source),
        );
        held.spawn(async move {
            let Some(mut s) = open_websocket(src, &target, &stats).await else {
                return SockState::Other;
            };
            let hello = text_frame(r#"{"type":"client_connect","data":{"ack":true}}"#);
            if s.write_all(&hello).await.is_err() {
                return SockState::ClosedByServer;
            }
            // Acknowledged once "client_connected" went by (a substring is enough here).
            let mut seen = Vec::new();
            let mut buf = [0u8; 2048];
            let ack = tokio::time::timeout(Duration::from_secs(20), async {
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return false,
                        Ok(k) => seen.extend_from_slice(&buf[..k]),
                    }
                    if seen.windows(16).any(|w| w == b"client_connected") {
                        return true;
                    }
                    if seen.len() > 64 * 1024 {
                        seen.drain(..32 * 1024);
                    }
                }
            })
            .await;
            if ack != Ok(true) {
                stats.fail("not acknowledged");
                return SockState::Other;
            }
            acked.fetch_add(1, Ordering::Relaxed);
            let (mut rd, mut wr) = s.into_split();
            let discard = tokio::spawn(async move {
                let mut buf = [0u8; 2048];
                while matches!(rd.read(&mut buf).await, Ok(k) if k > 0) {}
            });
            let mut rng = Rng::new(i as u64);
            let mut tick = tokio::time::interval(Duration::from_millis(50));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            while Instant::now() < until && !release.is_cancelled() {
                tick.tick().await;
                let mut batch = Vec::with_capacity(per_tick * 110);
                for _ in 0..per_tick {
                    let text = format!(
                        r#"{{"type":"notify_client","data":{{"target":"{}","data":{{"x":1}}}}}}"#,
                        random_id(&mut rng)
                    );
                    net::frame(&mut batch, net::TEXT, true, text.as_bytes());
                }
                let left = until.saturating_duration_since(Instant::now());
                match tokio::time::timeout(left, wr.write_all(&batch)).await {
                    Ok(Ok(())) => {
                        sent.fetch_add(per_tick as u64, Ordering::Relaxed);
                    }
                    Ok(Err(_)) => {
                        discard.abort();
                        return SockState::ClosedByServer;
                    }
                    Err(_) => break,
                }
            }
            release.cancelled().await;
            discard.abort();
            net::sock_state(wr.as_ref())
        });
    }
    env.wait_end().await;
    let line = format!(
        "{} acknowledged clients sent {} notify_client to ids that exist nowhere",
        acked.load(Ordering::Relaxed),
        sent.load(Ordering::Relaxed)
    );
    let mut out = Outcome::new(
        json!({"clients": n, "acknowledged": acked.load(Ordering::Relaxed),
            "notifies_sent": sent.load(Ordering::Relaxed), "flood": stats.json()}),
        line,
    );
    out.held = held;
    Ok(out)
}

/// How a client that sent `client_connect` fared.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Answer {
    Acked,
    Error,
    Neither,
}

/// cluster-node-death: one second in, node B (the backend's) is killed with SIGKILL; a
/// second backend logs in on node C; 300 clients on node A send `client_connect` and wait
/// 15 s for `client_connected` or an error.
async fn node_death(env: &Env<'_>) -> Result<Outcome> {
    const WAIT: Duration = Duration::from_secs(15);
    let n = env.conns(300);
    let b_pid = env.node(1).pid.context("node B's pid")?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let pid = libc::pid_t::try_from(b_pid).context("node B's pid")?;
    // SAFETY: kill(2) with a pid the caller named as node B's server.
    let killed = unsafe { libc::kill(pid, libc::SIGKILL) } == 0;
    println!("attack cluster-node-death: SIGKILL node B (pid {b_pid}): {killed}");
    let started = Instant::now();
    let second =
        AdminConn::connect(&env.node(2).target, &env.ctx.auth, true, None, SETUP_LIMIT).await;
    let login = match &second {
        Ok(a) => Login {
            ok: true,
            ms: a.login_ms,
            error: None,
        },
        Err(e) => Login {
            ok: false,
            ms: crate::stats::round1(started.elapsed().as_secs_f64() * 1000.0),
            error: Some(format!("{e:#}")),
        },
    };
    let target = env.node(0).target.clone();
    let mut clients = JoinSet::new();
    for i in 0..n {
        let (target, src) = (target.clone(), attacker_ip(i, env.p.per_source));
        clients.spawn(async move {
            let attempt = async {
                let mut s = tcp_from(src, target.addr, None).await.ok()?;
                upgrade(&mut s, &target, "", ATTACKER_LIMIT).await.ok()?;
                let hello = text_frame(r#"{"type":"client_connect","data":{"ack":true}}"#);
                s.write_all(&hello).await.ok()?;
                let mut seen = Vec::new();
                let mut buf = [0u8; 2048];
                loop {
                    let k = s.read(&mut buf).await.ok()?;
                    if k == 0 {
                        return None;
                    }
                    seen.extend_from_slice(&buf[..k]);
                    if seen.windows(16).any(|w| w == b"client_connected") {
                        return Some(Answer::Acked);
                    }
                    if seen.windows(15).any(|w| w == b"\"type\":\"error\"") {
                        return Some(Answer::Error);
                    }
                    if seen.len() > 64 * 1024 {
                        return None;
                    }
                }
            };
            tokio::time::timeout(WAIT, attempt)
                .await
                .ok()
                .flatten()
                .unwrap_or(Answer::Neither)
        });
    }
    let mut count: BTreeMap<&str, u64> = BTreeMap::new();
    while let Some(r) = clients.join_next().await {
        let k = match r.unwrap_or(Answer::Neither) {
            Answer::Acked => "client_connected",
            Answer::Error => "error",
            Answer::Neither => "neither",
        };
        *count.entry(k).or_default() += 1;
    }
    drop(second);
    let get = |k: &str| count.get(k).copied().unwrap_or(0);
    let line = format!(
        "of {n} clients on A within 15 s: {} client_connected, {} error, {} neither",
        get("client_connected"),
        get("error"),
        get("neither")
    );
    let mut out = Outcome::new(
        json!({"clients": n, "b_killed": killed, "answers": count, "neither": get("neither")}),
        line,
    );
    out.login = Some(login);
    Ok(out)
}

/// slow-consumer: a client with a 4 KiB receive buffer stops reading; an admin floods it with
/// 16 KB notifications until the server counts a slow-consumer close (or 10 s); then the
/// client reads again: does a 1008 "slow consumer" close frame reach it?
async fn slow_consumer(env: &Env<'_>) -> Result<Outcome> {
    const FLOOD_LIMIT: Duration = Duration::from_secs(10);
    const READ_LIMIT: Duration = Duration::from_secs(10);
    let node = env.node(0);
    let auth = env.ctx.auth.as_str();
    let mut victim = ws_connect(&node.target, None, Some(4096)).await?;
    victim
        .send(Message::text(
            r#"{"type":"client_connect","data":{"ack":true}}"#,
        ))
        .await?;
    let id = tokio::time::timeout(SETUP_LIMIT, async {
        while let Some(Ok(m)) = victim.next().await {
            if let Message::Text(t) = m
                && let Ok(v) = serde_json::from_str::<Value>(t.as_str())
                && v.get("type").and_then(Value::as_str) == Some("client_connected")
                && let Some(id) = v.pointer("/data/target").and_then(Value::as_str)
            {
                return Some(id.to_string());
            }
        }
        None
    })
    .await
    .ok()
    .flatten()
    .context("slow consumer: not acknowledged")?;
    let flooder = AdminConn::connect(&node.target, auth, false, None, SETUP_LIMIT).await?;
    let closes_before = metric(&node.target, auth, "jssocket_slow_consumer_closes_total").await;
    let pad = "p".repeat(16_000);
    let note = format!(
        r#"{{"type":"notify_client","data":{{"target":"{id}","data":{{"pad":"{pad}"}}}}}}"#
    );
    let started = Instant::now();
    let mut sent = 0u64;
    let mut counted = false;
    let mut last_poll = Instant::now();
    while started.elapsed() < FLOOD_LIMIT && !env.ctx.stop.is_cancelled() {
        for _ in 0..4 {
            if flooder.send(note.clone()) {
                sent += 1;
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        if last_poll.elapsed() >= Duration::from_millis(200) {
            last_poll = Instant::now();
            let now = metric(&node.target, auth, "jssocket_slow_consumer_closes_total").await;
            if let (Some(b), Some(n)) = (closes_before, now)
                && n > b
            {
                counted = true;
                break;
            }
        }
    }
    let flood_ms = crate::stats::round1(started.elapsed().as_secs_f64() * 1000.0);
    drop(flooder);
    // The reader wakes up.
    let (mut frames, mut ending, mut close) = (0u64, "timeout".to_string(), None::<String>);
    let _ = tokio::time::timeout(READ_LIMIT, async {
        loop {
            match victim.next().await {
                None => {
                    ending = "eof without a close frame".into();
                    return;
                }
                Some(Err(e)) => {
                    ending = format!("error: {e}");
                    return;
                }
                Some(Ok(Message::Close(f))) => {
                    ending = "close frame".into();
                    close = Some(close_desc(f.as_ref()));
                    return;
                }
                Some(Ok(_)) => frames += 1,
            }
        }
    })
    .await;
    let right = close
        .as_deref()
        .is_some_and(|c| c.starts_with("1008") && c.contains("slow consumer"));
    env.wait_end().await;
    let line = format!(
        "slow consumer flooded with {sent} × 16 KB for {:.1} s (server counted the close: {counted}); \
         on reading again it got {frames} frames then {}: {}",
        flood_ms / 1000.0,
        close.as_deref().unwrap_or(&ending),
        if right {
            "1008 slow consumer received"
        } else {
            "NO 1008 close frame"
        }
    );
    Ok(Outcome::new(
        json!({
            "notifications_sent": sent,
            "flood_ms": flood_ms,
            "server_counted_close": counted,
            "frames_read_after": frames,
            "ending": ending,
            "close": close,
            "got_1008_slow_consumer": right,
        }),
        line,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_ids_look_like_uuids() {
        let mut rng = Rng::new(7);
        let id = random_id(&mut rng);
        assert_eq!(id.len(), 36, "{id}");
        let parts: Vec<&str> = id.split('-').collect();
        assert_eq!(
            parts.iter().map(|p| p.len()).collect::<Vec<_>>(),
            [8, 4, 4, 4, 12]
        );
        assert!(parts[2].starts_with('4'));
    }

    #[test]
    fn connect_frames_repeat() {
        let one = connects(1, "t");
        assert_eq!(connects(20, "t").len(), one.len() * 20);
    }
}
