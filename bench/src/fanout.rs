//! `fanout` (admin `notify_all`), `group` (admin `notify_group`, round robin over groups) and
//! `publish-fanout` (admin `publish` to one channel, received by jssocket subscribers or by
//! SignalR clients): every receiver checks exactly-once, in-order delivery and records latency.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

use crate::admin::Admin;
use crate::client::{Acked, Hello, RS, connect_many_as};
use crate::common::{BitSet, Ctx, Ws, close_desc, drain_wait, now_ns, payload, secs, share};
use crate::stats::{LatSummary, LatencySink, ProcSample, maybe_sample, proc_delta, round1, round3};

#[derive(Clone, Debug)]
pub struct Params {
    pub clients: usize,
    pub messages: u64,
    pub size: usize,
    /// Messages per second; `None`: as fast as the window allows.
    pub rate: Option<f64>,
    /// Average messages in flight per receiver; `None`: automatic, `Some(0)`: unlimited.
    pub window: Option<u64>,
    pub slow_clients: usize,
    pub drain: Duration,
    /// `None`: `notify_all`; `Some(g)`: `notify_group` round robin over `g` groups.
    pub groups: Option<u32>,
    /// `Some`: the admin sends `publish` to one channel instead (and `groups` is `None`).
    pub publish: Option<Publish>,
}

/// `publish-fanout`: what the receivers are and which channel the admin publishes to.
#[derive(Clone, Debug)]
pub struct Publish {
    pub wire: Wire,
    pub channel: String,
    /// The server's SignalR path (`--signalr-path` of the server, `/sockets` by default).
    pub signalr_path: String,
}

/// The protocol the receivers of `publish-fanout` speak.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Wire {
    /// jssocket clients, acknowledged and subscribed to the channel.
    Jssocket,
    /// SignalR clients (JSON hub protocol, no negotiation): no subscription.
    Signalr,
}

/// How often a SignalR receiver sends a ping: the server closes a client silent for 30 s
/// (the protocol's default client timeout), and receivers only read.
const SIGNALR_PING_EVERY: Duration = Duration::from_secs(10);

/// The shape of the frames a receiver reads.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Frames {
    /// `notify_*`: the payload itself.
    Bare,
    /// jssocket `publish`: `{"type":"publish","data":{"name":…,"data":<payload>}}`.
    Publish,
    /// SignalR records `{"type":1,"target":…,"arguments":["<payload as a JSON string>"]}`␞;
    /// the server's pings (type 6) are skipped.
    SignalR,
}

impl Frames {
    /// Calls `f` with each payload of a frame, `None` for a part that is not one.
    fn payloads(self, bytes: &[u8], mut f: impl FnMut(Option<Payload>)) {
        #[derive(Deserialize)]
        struct PublishFrame {
            data: PublishData,
        }
        #[derive(Deserialize)]
        struct PublishData {
            data: Payload,
        }
        #[derive(Deserialize)]
        struct Record {
            #[serde(rename = "type")]
            kind: u8,
            #[serde(default)]
            arguments: Vec<String>,
        }
        match self {
            Frames::Bare => f(serde_json::from_slice::<Payload>(bytes).ok()),
            Frames::Publish => {
                f(serde_json::from_slice::<PublishFrame>(bytes)
                    .ok()
                    .map(|p| p.data.data));
            }
            Frames::SignalR => {
                let Ok(text) = std::str::from_utf8(bytes) else {
                    return f(None);
                };
                for record in text.split_terminator(RS) {
                    match serde_json::from_str::<Record>(record) {
                        Ok(r) if r.kind == 6 => {}
                        Ok(r) if r.kind == 1 && r.arguments.len() == 1 => {
                            f(serde_json::from_str::<Payload>(&r.arguments[0]).ok());
                        }
                        _ => f(None),
                    }
                }
            }
        }
    }
}

impl Params {
    /// Automatic window: about 256 KiB of payload in flight per receiver on average, far
    /// below the server's default 4 MiB per-connection queue, at most 256 messages (enough to
    /// keep the pipeline full: a larger window adds latency, not throughput).
    pub fn window(&self) -> u64 {
        match self.window {
            Some(w) => w,
            None => ((256 << 10) / (self.size as u64 + 64)).clamp(4, 256),
        }
    }
}

pub struct Outcome {
    pub json: Value,
    pub deliveries_per_sec: f64,
    pub p99_ms: f64,
    pub ok: bool,
}

#[derive(Deserialize)]
struct Payload {
    seq: u64,
    ts: u64,
}

/// Counters shared by the receivers and the sender.
struct Relay {
    delivered: AtomicU64,
    /// Receivers still waiting for messages.
    active: AtomicU64,
    last_ns: AtomicU64,
    sender_waiting: AtomicBool,
    progress: Notify,
    latency: Arc<LatencySink>,
}

/// What one receiver saw.
struct ReaderResult {
    group: u32,
    seen: BitSet,
    unique: u64,
    dup: u64,
    reordered: u64,
    misdelivered: u64,
    other: u64,
    closed: Option<String>,
}

/// Which messages a receiver expects: seqs `k < messages` with `k % groups == group`.
#[derive(Clone, Copy)]
struct Expect {
    group: u32,
    groups: u32,
    messages: u64,
}

impl Expect {
    fn count(&self) -> u64 {
        share(self.messages, u64::from(self.groups), u64::from(self.group))
    }
}

async fn reader(
    mut ws: Ws,
    idx: usize,
    exp: Expect,
    frames: Frames,
    sh: Arc<Relay>,
    done: CancellationToken,
) -> ReaderResult {
    let signalr = frames == Frames::SignalR;
    let mut keepalive = tokio::time::interval_at(
        tokio::time::Instant::now() + SIGNALR_PING_EVERY,
        SIGNALR_PING_EVERY,
    );
    let ping = Message::text(format!("{{\"type\":6}}{RS}"));
    let expected = exp.count();
    let mut r = ReaderResult {
        group: exp.group,
        seen: BitSet::new(expected as usize),
        unique: 0,
        dup: 0,
        reordered: 0,
        misdelivered: 0,
        other: 0,
        closed: None,
    };
    let mut rec = sh.latency.recorder(idx);
    let mut highest: Option<u64> = None;
    let groups = u64::from(exp.groups.max(1));
    while r.unique < expected {
        let msg = tokio::select! {
            biased;
            m = ws.next() => m,
            _ = done.cancelled() => break,
            _ = keepalive.tick(), if signalr => {
                if let Err(e) = ws.send(ping.clone()).await {
                    r.closed = Some(format!("error: {e}"));
                    break;
                }
                continue;
            }
        };
        let msg = match msg {
            None => {
                r.closed = Some("connection ended".into());
                break;
            }
            Some(Err(e)) => {
                r.closed = Some(format!("error: {e}"));
                break;
            }
            Some(Ok(m)) => m,
        };
        let bytes: &[u8] = match &msg {
            Message::Text(t) => t.as_bytes(),
            Message::Binary(b) => b,
            Message::Close(f) => {
                r.closed = Some(close_desc(f.as_ref()));
                break;
            }
            _ => continue,
        };
        frames.payloads(bytes, |p| {
            let Some(p) = p else {
                r.other += 1;
                return;
            };
            let now = now_ns();
            if p.seq % groups != u64::from(exp.group) {
                r.misdelivered += 1;
                return;
            }
            let local = p.seq / groups;
            if local >= expected {
                r.misdelivered += 1;
                return;
            }
            rec.record_ns(now.saturating_sub(p.ts));
            if r.seen.test_set(local as usize) {
                r.dup += 1;
            } else {
                r.unique += 1;
                if highest.is_some_and(|h| local < h) {
                    r.reordered += 1;
                }
                highest = Some(highest.map_or(local, |h| h.max(local)));
            }
            sh.delivered.fetch_add(1, Ordering::Relaxed);
            crate::progress::message();
            sh.last_ns.fetch_max(now, Ordering::Relaxed);
            if sh.sender_waiting.load(Ordering::Relaxed) {
                sh.progress.notify_one();
            }
        });
    }
    rec.flush();
    sh.active.fetch_sub(1, Ordering::Relaxed);
    // Keep the socket open until the run ends so that an early finisher does not change the
    // server's fan-out set for the others (a SignalR receiver keeps pinging meanwhile).
    while r.closed.is_none() {
        tokio::select! {
            _ = done.cancelled() => break,
            _ = keepalive.tick(), if signalr => {
                if let Err(e) = ws.send(ping.clone()).await {
                    r.closed = Some(format!("error: {e}"));
                }
            }
        }
    }
    r
}

/// Server CPU seconds between two samplings, when both were taken.
fn delivery_cpu(before: Option<ProcSample>, after: Option<ProcSample>) -> Option<f64> {
    Some(after?.cpu_s - before?.cpu_s)
}

/// Sets SO_RCVBUF to its minimum on a slow client's socket.
fn shrink_receive_buffer(stream: &tokio::net::TcpStream) {
    use std::os::fd::AsRawFd;
    let size: libc::c_int = 4096;
    // SAFETY: a valid socket fd and a pointer to a c_int of the stated size.
    unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            (&size as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

/// What a slow (never reading) client turned out to be after the run: it reads what the
/// server left for it (bounded in time) to find the close frame, or the reset that replaced
/// it when the server gave up on a full socket.
async fn drain_slow(mut ws: Ws, _stop: CancellationToken) -> (u64, Option<String>) {
    let mut frames = 0u64;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let next = match tokio::time::timeout_at(deadline, ws.next()).await {
            Ok(next) => next,
            Err(_) => return (frames, None),
        };
        match next {
            None => return (frames, Some("connection ended (no close frame)".into())),
            Some(Err(e)) => return (frames, Some(format!("error: {e}"))),
            Some(Ok(Message::Close(f))) => return (frames, Some(close_desc(f.as_ref()))),
            Some(Ok(_)) => frames += 1,
        }
    }
}

pub async fn run(ctx: &Arc<Ctx>, p: &Params, label: &str) -> Result<Outcome> {
    let (scenario, hello, frames) = match (&p.publish, p.groups) {
        (Some(publish), _) => match publish.wire {
            Wire::Jssocket => (
                "publish-fanout",
                Hello::Subscribed(publish.channel.as_str().into()),
                Frames::Publish,
            ),
            Wire::Signalr => (
                "publish-fanout",
                Hello::SignalR(publish.signalr_path.as_str().into()),
                Frames::SignalR,
            ),
        },
        (None, Some(_)) => ("group", Hello::Acked, Frames::Bare),
        (None, None) => ("fanout", Hello::Acked, Frames::Bare),
    };
    let groups = p.groups.unwrap_or(1).max(1);
    let before = maybe_sample(ctx.server_pid);
    let admin = Admin::connect(ctx, groups).await?;
    let hint = |i: usize| p.groups.map(|g| (i % g as usize) as u32);
    let batch = connect_many_as(ctx, 0..p.clients, hint, label, &hello).await;
    println!("{}", batch.line(label));
    let connect_json = batch.json();
    let connect_failures = batch.failures.total();
    let slow_batch = if p.slow_clients > 0 {
        let slow = p.clients..p.clients + p.slow_clients;
        let b = connect_many_as(ctx, slow, hint, label, &hello).await;
        println!("{}", b.line(&format!("{label} (slow clients)")));
        Some(b)
    } else {
        None
    };
    if batch.clients.is_empty() {
        bail!(
            "{label}: no client was acknowledged ({}); admin: {}",
            batch.failures.line(),
            admin.close_reason().unwrap_or_else(|| "up".into())
        );
    }
    let n = batch.clients.len() as u64;

    // Members per group, from what the admin actually assigned.
    let mut members = vec![0u64; groups as usize];
    let mut plan: Vec<(Acked, u32)> = Vec::with_capacity(batch.clients.len());
    for c in batch.clients {
        let g = admin
            .group_of(&c.id)
            .or_else(|| hint(c.idx))
            .unwrap_or(0)
            .min(groups - 1);
        members[g as usize] += 1;
        plan.push((c, g));
    }

    let sh = Arc::new(Relay {
        delivered: AtomicU64::new(0),
        active: AtomicU64::new(n),
        last_ns: AtomicU64::new(0),
        sender_waiting: AtomicBool::new(false),
        progress: Notify::new(),
        latency: LatencySink::new(),
    });
    let done = CancellationToken::new();
    let mut readers: JoinSet<ReaderResult> = JoinSet::new();
    let mut early_messages = 0u64;
    for (c, g) in plan {
        early_messages += c.pre_ack.len() as u64;
        let exp = Expect {
            group: g,
            groups,
            messages: p.messages,
        };
        readers.spawn(reader(c.ws, c.idx, exp, frames, sh.clone(), done.clone()));
    }
    let slow: Vec<Acked> = slow_batch.map(|b| b.clients).unwrap_or_default();
    // A slow reader on a real network has a small receive window; on loopback the kernel
    // would otherwise buffer megabytes for it before the server's queue sees any pressure.
    for c in &slow {
        shrink_receive_buffer(c.ws.get_ref());
    }

    // Send.
    let window = p.window();
    let mut expected_total = 0u64;
    let mut sent = 0u64;
    let mut stalls = 0u64;
    let mut send_error: Option<String> = None;
    // Server CPU of the sending and delivering only (not of the connects).
    let cpu_before = maybe_sample(ctx.server_pid);
    let first_send_ns = now_ns();
    let t0 = Instant::now();
    for k in 0..p.messages {
        if ctx.stop.is_cancelled() {
            break;
        }
        if let Some(rate) = p.rate {
            let due = t0 + Duration::from_secs_f64(k as f64 / rate);
            tokio::select! {
                _ = tokio::time::sleep_until(due.into()) => {}
                _ = ctx.stop.cancelled() => break,
            }
        }
        if window > 0 {
            let limit = window * n;
            let mut last_seen = sh.delivered.load(Ordering::Relaxed);
            let mut last_change = Instant::now();
            loop {
                let delivered = sh.delivered.load(Ordering::Relaxed);
                if expected_total.saturating_sub(delivered) <= limit {
                    break;
                }
                if delivered != last_seen {
                    last_seen = delivered;
                    last_change = Instant::now();
                } else if last_change.elapsed() > Duration::from_secs(2) {
                    // Receivers stopped making progress (closed?): go on regardless.
                    stalls += 1;
                    break;
                }
                sh.sender_waiting.store(true, Ordering::Relaxed);
                tokio::select! {
                    _ = sh.progress.notified() => {}
                    _ = tokio::time::sleep(Duration::from_millis(5)) => {}
                    _ = ctx.stop.cancelled() => break,
                }
                sh.sender_waiting.store(false, Ordering::Relaxed);
            }
        }
        let body = payload(k, now_ns(), "", p.size);
        let text = match (&p.publish, p.groups) {
            (Some(publish), _) => format!(
                r#"{{"type":"publish","data":{{"name":{},"data":{body}}}}}"#,
                Value::from(publish.channel.as_str())
            ),
            (None, None) => format!(r#"{{"type":"notify_all","data":{body}}}"#),
            (None, Some(g)) => format!(
                r#"{{"type":"notify_group","data":{{"target":"g{}","data":{body}}}}}"#,
                k % u64::from(g)
            ),
        };
        if !admin.send(text) {
            send_error = Some(admin.close_reason().unwrap_or_else(|| "admin gone".into()));
            break;
        }
        sent += 1;
        expected_total += members[(k % u64::from(groups)) as usize];
    }
    let last_send_ns = now_ns();
    sh.sender_waiting.store(false, Ordering::Relaxed);

    // Wait for every receiver to have everything, or the drain time, or the global timeout.
    let mut results: Vec<ReaderResult> = Vec::with_capacity(n as usize);
    let mut finished = 0u64;
    drain_wait(&ctx.stop, p.drain, || {
        sh.delivered.load(Ordering::Relaxed) >= expected_total
            || sh.active.load(Ordering::Relaxed) == 0
    })
    .await;
    done.cancel();
    while let Some(r) = readers.join_next().await {
        if let Ok(r) = r {
            if r.closed.is_none() {
                finished += 1;
            }
            results.push(r);
        }
    }
    let after = maybe_sample(ctx.server_pid);
    let delivery_cpu = delivery_cpu(cpu_before, after);

    // Slow clients: did the server close them?
    let mut slow_closed = 0u64;
    let mut slow_codes: BTreeMap<String, u64> = BTreeMap::new();
    let mut slow_frames = 0u64;
    if !slow.is_empty() {
        let mut set = JoinSet::new();
        for c in slow {
            set.spawn(drain_slow(c.ws, ctx.stop.clone()));
        }
        while let Some(r) = set.join_next().await {
            if let Ok((frames, closed)) = r {
                slow_frames += frames;
                if let Some(why) = closed {
                    slow_closed += 1;
                    *slow_codes.entry(why).or_default() += 1;
                }
            }
        }
    }

    // Figures.
    let mut unique = 0u64;
    let mut dup = 0u64;
    let mut reordered = 0u64;
    let mut misdelivered = 0u64;
    let mut other = 0u64;
    let mut lost = 0u64;
    let mut closed_during: BTreeMap<String, u64> = BTreeMap::new();
    for r in &results {
        let exp = Expect {
            group: r.group,
            groups,
            messages: sent,
        }
        .count();
        let got = r.seen.count_below(exp as usize);
        unique += r.unique;
        lost += exp.saturating_sub(got);
        dup += r.dup;
        reordered += r.reordered;
        misdelivered += r.misdelivered;
        other += r.other;
        if let Some(why) = &r.closed {
            *closed_during.entry(why.clone()).or_default() += 1;
        }
    }
    let delivered = sh.delivered.load(Ordering::Relaxed);
    let last_ns = sh.last_ns.load(Ordering::Relaxed).max(first_send_ns);
    let span_ns = last_ns - first_send_ns;
    let dps = unique as f64 / secs(span_ns).max(1e-9);
    let send_secs = secs(last_send_ns - first_send_ns);
    let lat = LatSummary::of(&sh.latency.merged());
    let (server_json, server_line) = proc_delta(before, after);
    let timed_out = ctx.stop.is_cancelled();

    let what = match (&p.publish, p.groups) {
        (Some(publish), _) => format!(
            "publish to {:?} ({} receivers)",
            publish.channel,
            match publish.wire {
                Wire::Jssocket => "jssocket",
                Wire::Signalr => "SignalR",
            }
        ),
        (None, Some(g)) => format!("notify_group over {g} groups"),
        (None, None) => "notify_all".into(),
    };
    println!(
        "{label}: sent {sent}/{} {what} of {} B in {:.3} s ({:.0} msg/s, window {}/receiver{}){}",
        p.messages,
        p.size,
        send_secs,
        sent as f64 / send_secs.max(1e-9),
        if window == 0 {
            "∞".into()
        } else {
            window.to_string()
        },
        p.rate
            .map(|r| format!(", paced at {r}/s"))
            .unwrap_or_default(),
        if stalls > 0 {
            format!(", {stalls} window stalls")
        } else {
            String::new()
        },
    );
    println!(
        "{label}: {unique} of {expected_total} deliveries in {:.3} s = {:.0} deliveries/s",
        secs(span_ns),
        dps
    );
    println!("{label}: latency {}", lat.line());
    println!(
        "{label}: lost {lost}  dup {dup}  reordered {reordered}  misdelivered {misdelivered}  \
         unparsable {other}  pre-ack {early_messages}  receivers closed during run {}",
        results.len() as u64 - finished
    );
    for (why, count) in &closed_during {
        println!("{label}:   {count} receivers closed: {why}");
    }
    if p.slow_clients > 0 {
        println!(
            "{label}: slow clients: {slow_closed} of {} closed by the server ({}), {} frames were \
             waiting for them",
            p.slow_clients,
            slow_codes
                .iter()
                .map(|(k, v)| format!("{v}× {k}"))
                .collect::<Vec<_>>()
                .join(", "),
            slow_frames
        );
    }
    if !server_line.is_empty() {
        println!("{label}: {server_line}");
    }
    let per_cpu_s = delivery_cpu.map(|cpu| unique as f64 / cpu.max(1e-9));
    if let (Some(cpu), Some(per)) = (delivery_cpu, per_cpu_s) {
        println!(
            "{label}: server CPU from the first send to the end {cpu:.2} s = {per:.0} deliveries \
             per server-CPU-second"
        );
    }
    if let Some(e) = &send_error {
        println!("{label}: sending stopped: {e}");
    }
    if admin.errors() > 0 {
        println!(
            "{label}: the admin received {} error(s), last: {}",
            admin.errors(),
            admin.last_error().unwrap_or_default()
        );
    }
    if timed_out {
        println!("{label}: TIMED OUT (--timeout): figures are partial");
    }

    let json = json!({
        "scenario": scenario,
        "label": label,
        "url": ctx.target.url,
        "clients": p.clients,
        "groups": p.groups,
        "messages": p.messages,
        "size": p.size,
        "rate": p.rate,
        "window": window,
        "connect": connect_json,
        "sent": sent,
        "send_seconds": round3(send_secs),
        "expected_deliveries": expected_total,
        "deliveries": unique,
        "frames_received": delivered,
        "seconds": round3(secs(span_ns)),
        "deliveries_per_sec": round1(dps),
        "latency_ms": lat.json(),
        "lost": lost,
        "duplicated": dup,
        "reordered": reordered,
        "misdelivered": misdelivered,
        "unparsable": other,
        "pre_ack_messages": early_messages,
        "window_stalls": stalls,
        "receivers_closed": closed_during,
        "slow_clients": if p.slow_clients > 0 { json!({
            "count": p.slow_clients,
            "closed_by_server": slow_closed,
            "close_reasons": slow_codes,
            "frames_pending": slow_frames,
        }) } else { Value::Null },
        "server": server_json,
        "server_cpu_s_sending": delivery_cpu.map(round3),
        "deliveries_per_server_cpu_s": per_cpu_s.map(round1),
        "wire": p.publish.as_ref().map(|publish| format!("{:?}", publish.wire).to_lowercase()),
        "channel": p.publish.as_ref().map(|publish| publish.channel.clone()),
        "admin": admin.json(),
        "send_error": send_error,
        "timed_out": timed_out,
    });
    Ok(Outcome {
        json,
        deliveries_per_sec: dps,
        p99_ms: lat.p99,
        ok: !timed_out
            && send_error.is_none()
            && connect_failures == 0
            && lost + dup + reordered + misdelivered == 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seqs(frames: Frames, text: &str) -> Vec<Option<u64>> {
        let mut out = Vec::new();
        frames.payloads(text.as_bytes(), |p| out.push(p.map(|p| p.seq)));
        out
    }

    #[test]
    fn signalr_records_are_split_and_pings_skipped() {
        let text = "{\"type\":6}\u{1e}\
                    {\"type\":1,\"target\":\"c\",\"arguments\":[\"{\\\"seq\\\":7,\\\"ts\\\":1}\"]}\u{1e}\
                    {\"type\":1,\"target\":\"c\",\"arguments\":[\"{\\\"seq\\\":8,\\\"ts\\\":2}\"]}\u{1e}\
                    {\"type\":1,\"target\":\"c\",\"arguments\":[]}\u{1e}";
        assert_eq!(seqs(Frames::SignalR, text), [Some(7), Some(8), None]);
    }

    #[test]
    fn publish_frames_carry_the_payload_in_data() {
        let text = r#"{"type":"publish","data":{"name":"c","data":{"seq":3,"ts":9,"pad":"x"}}}"#;
        assert_eq!(seqs(Frames::Publish, text), [Some(3)]);
        assert_eq!(seqs(Frames::Bare, r#"{"seq":4,"ts":1}"#), [Some(4)]);
        assert_eq!(seqs(Frames::Publish, r#"{"seq":4,"ts":1}"#), [None]);
    }
}
