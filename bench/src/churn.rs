//! `churn`: keep about N clients while disconnecting random ones and connecting new ones at a
//! fixed rate, with the admin broadcasting `notify_all` all along. A client that was
//! acknowledged before a broadcast was sent and stayed connected for `--grace` after it must
//! have received it.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

use crate::admin::Admin;
use crate::client::{Acked, Failures, connect_acked_bounded};
use crate::common::{Ctx, Rng, close_desc, now_ns, payload};
use crate::stats::{LatSummary, LatencySink, maybe_sample, new_hist, proc_delta, round1, round3};

pub struct Params {
    pub clients: usize,
    pub duration: Duration,
    /// Disconnects (and as many new connects) per second.
    pub rate: f64,
    pub broadcast_rate: f64,
    pub size: usize,
    pub grace: Duration,
}

#[derive(Deserialize)]
struct Payload {
    seq: u64,
    ts: u64,
}

/// How a chosen client leaves.
#[derive(Clone, Copy)]
enum Leave {
    /// WebSocket close handshake.
    CloseFrame,
    /// `{"type":"client_disconnect"}`, the server closes.
    ClientDisconnect,
    /// The TCP socket is dropped without a close frame.
    Drop,
}

struct Live {
    kill: oneshot::Sender<Leave>,
}

/// The record of one acknowledged client's life.
struct Life {
    acked_ns: u64,
    end_ns: u64,
    received: HashSet<u64>,
    /// Closed by the server (or failed) rather than by us.
    unexpected: Option<String>,
}

struct Relay {
    failures: Mutex<Failures>,
    connect_latency: Mutex<hdrhistogram::Histogram<u64>>,
    connected: AtomicU64,
    attempts_done: AtomicU64,
    latency: Arc<LatencySink>,
    leave_errors: AtomicU64,
    ack_failures: AtomicU64,
}

async fn client(
    ctx: Arc<Ctx>,
    idx: usize,
    sh: Arc<Relay>,
    live_tx: mpsc::UnboundedSender<Live>,
    life_tx: mpsc::UnboundedSender<Life>,
    done: CancellationToken,
) {
    let r = connect_acked_bounded(&ctx, idx, None).await;
    sh.attempts_done.fetch_add(1, Ordering::Relaxed);
    let Acked {
        mut ws,
        pre_ack,
        acked_ns,
        started_ns,
        ..
    } = match r {
        Ok(a) => a,
        Err(e) => {
            if e.is_ack_failure() {
                sh.ack_failures.fetch_add(1, Ordering::Relaxed);
            }
            if !matches!(e, crate::common::ConnErr::Cancelled) {
                sh.failures
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .add(&e);
            }
            return;
        }
    };
    sh.connected.fetch_add(1, Ordering::Relaxed);
    sh.connect_latency
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .saturating_record(((acked_ns - started_ns) / 1000).max(1));
    let (kill_tx, mut kill_rx) = oneshot::channel();
    let _ = live_tx.send(Live { kill: kill_tx });
    drop(live_tx);
    let mut rec = sh.latency.recorder(idx);
    let mut life = Life {
        acked_ns,
        end_ns: 0,
        received: HashSet::new(),
        unexpected: None,
    };
    let mut note = |bytes: &[u8], life: &mut Life| {
        if let Ok(p) = serde_json::from_slice::<Payload>(bytes) {
            rec.record_ns(now_ns().saturating_sub(p.ts));
            life.received.insert(p.seq);
            crate::progress::message();
        }
    };
    for t in &pre_ack {
        note(t.as_bytes(), &mut life);
    }
    let mut kill_open = true;
    loop {
        tokio::select! {
            _ = done.cancelled() => {
                life.end_ns = now_ns();
                break;
            }
            how = &mut kill_rx, if kill_open => {
                let Ok(how) = how else {
                    kill_open = false;
                    continue;
                };
                life.end_ns = now_ns();
                let ok = match how {
                    Leave::Drop => true,
                    Leave::CloseFrame => {
                        let closing = async {
                            ws.close(None).await.ok()?;
                            while let Some(Ok(_)) = ws.next().await {}
                            Some(())
                        };
                        tokio::time::timeout(Duration::from_secs(2), closing).await.is_ok()
                    }
                    Leave::ClientDisconnect => {
                        let leaving = async {
                            ws.send(Message::text(r#"{"type":"client_disconnect","data":{}}"#))
                                .await
                                .ok()?;
                            while let Some(Ok(_)) = ws.next().await {}
                            Some(())
                        };
                        tokio::time::timeout(Duration::from_secs(2), leaving).await.is_ok()
                    }
                };
                if !ok {
                    sh.leave_errors.fetch_add(1, Ordering::Relaxed);
                }
                break;
            }
            m = ws.next() => {
                let m = match m {
                    None => { life.unexpected = Some("connection ended".into()); life.end_ns = now_ns(); break; }
                    Some(Err(e)) => { life.unexpected = Some(format!("error: {e}")); life.end_ns = now_ns(); break; }
                    Some(Ok(m)) => m,
                };
                match &m {
                    Message::Text(t) => note(t.as_bytes(), &mut life),
                    Message::Binary(b) => note(b, &mut life),
                    Message::Close(f) => {
                        life.unexpected = Some(format!("closed by server: {}", close_desc(f.as_ref())));
                        life.end_ns = now_ns();
                        break;
                    }
                    _ => {}
                }
            }
        }
    }
    drop(ws);
    rec.flush();
    let _ = life_tx.send(life);
}

pub async fn run(ctx: &Arc<Ctx>, p: &Params) -> Result<(Value, bool)> {
    let before = maybe_sample(ctx.server_pid);
    let admin = Arc::new(Admin::connect(ctx, 10).await?);
    let sh = Arc::new(Relay {
        failures: Mutex::new(Failures::default()),
        connect_latency: Mutex::new(new_hist()),
        connected: AtomicU64::new(0),
        attempts_done: AtomicU64::new(0),
        latency: LatencySink::new(),
        leave_errors: AtomicU64::new(0),
        ack_failures: AtomicU64::new(0),
    });
    let done = CancellationToken::new();
    let (live_tx, mut live_rx) = mpsc::unbounded_channel::<Live>();
    let (life_tx, mut life_rx) = mpsc::unbounded_channel::<Life>();
    let spawn_client = |idx: usize| {
        tokio::spawn(client(
            ctx.clone(),
            idx,
            sh.clone(),
            live_tx.clone(),
            life_tx.clone(),
            done.clone(),
        ));
    };

    // Initial population.
    let t_init = Instant::now();
    for i in 0..p.clients {
        spawn_client(i);
    }
    let mut live: Vec<Live> = Vec::with_capacity(p.clients);
    let mut last_initial_ack = t_init;
    while sh.attempts_done.load(Ordering::Relaxed) < p.clients as u64 {
        tokio::select! {
            l = live_rx.recv() => if let Some(l) = l {
                live.push(l);
                last_initial_ack = Instant::now();
            },
            _ = tokio::time::sleep(Duration::from_millis(20)) => {}
            _ = ctx.stop.cancelled() => break,
        }
    }
    while let Ok(l) = live_rx.try_recv() {
        live.push(l);
        last_initial_ack = Instant::now();
    }
    let initial = live.len();
    // Up to the last acknowledgement: a failed attempt may wait for the whole --ack-timeout.
    let init_secs = (last_initial_ack - t_init).as_secs_f64();
    println!(
        "churn: {initial} initial clients acknowledged in {init_secs:.2} s ({:.0} conns/s), {}",
        initial as f64 / init_secs.max(1e-9),
        sh.failures.lock().unwrap_or_else(|e| e.into_inner()).line()
    );
    if initial == 0 {
        bail!("churn: no client was acknowledged");
    }
    let initial_failures = sh
        .failures
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .total();

    // Broadcaster.
    let log: Arc<Mutex<Vec<u64>>> = Arc::new(Mutex::new(Vec::new()));
    let bstop = CancellationToken::new();
    let broadcaster = {
        let (admin, log, bstop, stop) =
            (admin.clone(), log.clone(), bstop.clone(), ctx.stop.clone());
        let (rate, size) = (p.broadcast_rate, p.size);
        tokio::spawn(async move {
            let t0 = Instant::now();
            let mut k = 0u64;
            loop {
                let due = t0 + Duration::from_secs_f64(k as f64 / rate);
                tokio::select! {
                    _ = tokio::time::sleep_until(due.into()) => {}
                    _ = bstop.cancelled() => break,
                    _ = stop.cancelled() => break,
                }
                let ts = now_ns();
                log.lock().unwrap_or_else(|e| e.into_inner()).push(ts);
                if !admin.send(format!(
                    r#"{{"type":"notify_all","data":{}}}"#,
                    payload(k, ts, "", size)
                )) {
                    break;
                }
                k += 1;
            }
        })
    };

    // Churn.
    let mut rng = Rng::new(now_ns() ^ 0xc4a2);
    let mut next_idx = p.clients;
    let mut disconnects = 0u64;
    let leaves = [Leave::CloseFrame, Leave::ClientDisconnect, Leave::Drop];
    let t0 = Instant::now();
    let end = t0 + p.duration;
    let mut tick = 0u64;
    loop {
        let due = t0 + Duration::from_secs_f64(tick as f64 / p.rate);
        if due >= end {
            break;
        }
        tokio::select! {
            _ = tokio::time::sleep_until(due.into()) => {}
            _ = ctx.stop.cancelled() => break,
        }
        while let Ok(l) = live_rx.try_recv() {
            live.push(l);
        }
        if !live.is_empty() {
            let victim = live.swap_remove(rng.below(live.len()));
            let _ = victim.kill.send(leaves[(tick % 3) as usize]);
            disconnects += 1;
        }
        spawn_client(next_idx);
        next_idx += 1;
        tick += 1;
    }
    let churn_secs = t0.elapsed().as_secs_f64();
    bstop.cancel();
    let _ = broadcaster.await;
    // Let the last broadcasts arrive before ending every life.
    tokio::select! {
        _ = tokio::time::sleep(p.grace + Duration::from_millis(500)) => {}
        _ = ctx.stop.cancelled() => {}
    }
    let end_ns = now_ns();
    done.cancel();
    drop(live);
    drop(live_tx);
    drop(life_tx);
    let mut lives = Vec::new();
    let collect_until = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        tokio::select! {
            l = life_rx.recv() => match l {
                Some(l) => lives.push(l),
                None => break,
            },
            _ = tokio::time::sleep_until(collect_until) => break,
        }
    }
    let after = maybe_sample(ctx.server_pid);

    // Who should have received what.
    let sends = log.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let grace = u64::try_from(p.grace.as_nanos()).unwrap_or(u64::MAX);
    let mut expected = 0u64;
    let mut lost = 0u64;
    let mut received = 0u64;
    let mut unexpected: BTreeMap<String, u64> = BTreeMap::new();
    for l in &lives {
        received += l.received.len() as u64;
        let end = if l.end_ns == 0 { end_ns } else { l.end_ns };
        for (k, &ts) in sends.iter().enumerate() {
            if ts >= l.acked_ns && ts.saturating_add(grace) <= end {
                expected += 1;
                if !l.received.contains(&(k as u64)) {
                    lost += 1;
                }
            }
        }
        if let Some(why) = &l.unexpected {
            *unexpected.entry(why.clone()).or_default() += 1;
        }
    }
    let failures = sh.failures.lock().unwrap_or_else(|e| e.into_inner());
    let ack_failures = sh.ack_failures.load(Ordering::Relaxed);
    let connects = sh.connected.load(Ordering::Relaxed);
    let lat = LatSummary::of(&sh.latency.merged());
    let clat = LatSummary::of(&sh.connect_latency.lock().unwrap_or_else(|e| e.into_inner()));
    let (server_json, server_line) = proc_delta(before, after);
    let timed_out = ctx.stop.is_cancelled();
    let leave_errors = sh.leave_errors.load(Ordering::Relaxed);
    let churned = connects.saturating_sub(initial as u64);

    println!(
        "churn: {disconnects} disconnects and {} connects in {churn_secs:.2} s ({:.1}/s, target {}), \
         {churned} new clients acknowledged",
        next_idx - p.clients,
        disconnects as f64 / churn_secs.max(1e-9),
        p.rate
    );
    println!(
        "churn: connect failures {} ({} after the initial phase), of which ack failures {ack_failures}; {}",
        failures.total(),
        failures.total() - initial_failures,
        failures.line()
    );
    println!("churn: connect+ack {}", clat.line());
    println!(
        "churn: {} broadcasts; {received} received; {expected} owed to clients alive for the whole \
         broadcast (+{:.1} s grace), lost {lost}",
        sends.len(),
        p.grace.as_secs_f64()
    );
    println!("churn: broadcast latency {}", lat.line());
    println!(
        "churn: clients closed unexpectedly {}; leave errors (close not completed in 2 s) {leave_errors}",
        unexpected.values().sum::<u64>()
    );
    for (why, count) in &unexpected {
        println!("churn:   {count}× {why}");
    }
    if !server_line.is_empty() {
        println!("churn: {server_line}");
    }
    if timed_out {
        println!("churn: TIMED OUT (--timeout): figures are partial");
    }
    let json = json!({
        "scenario": "churn",
        "url": ctx.target.url,
        "clients": p.clients,
        "duration_s": p.duration.as_secs_f64(),
        "rate": p.rate,
        "broadcast_rate": p.broadcast_rate,
        "size": p.size,
        "grace_s": p.grace.as_secs_f64(),
        "initial_acknowledged": initial,
        "initial_seconds": round3(init_secs),
        "disconnects": disconnects,
        "disconnects_per_sec": round1(disconnects as f64 / churn_secs.max(1e-9)),
        "connects": connects,
        "churn_connects": churned,
        "connect_failures": failures.json(),
        "ack_failures": ack_failures,
        "connect_ack_latency_ms": clat.json(),
        "broadcasts": sends.len(),
        "received": received,
        "expected_whole_life": expected,
        "lost": lost,
        "broadcast_latency_ms": lat.json(),
        "unexpected_closes": unexpected,
        "leave_errors": leave_errors,
        "server": server_json,
        "admin": admin.json(),
        "timed_out": timed_out,
    });
    let ok = !timed_out && lost == 0 && ack_failures == 0 && unexpected.is_empty();
    Ok((json, ok))
}
