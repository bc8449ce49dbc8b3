//! `compare`: issue 16's scenarios run alternately against a fresh raw-frame server
//! (`raw-server`, a child process of this executable) and a fresh jssocket (the binary given),
//! round after round: deliveries per server-CPU-second (RSS per connection for the `rss-*`
//! scenarios) of each, and the ratio jssocket / raw.
//!
//! Every run gets a fresh server, so no run inherits another's allocator state, sockets or
//! queues. The order alternates (raw first in even rounds, jssocket first in odd ones) so that
//! a machine growing busier or quieter during the session does not favour one server. The
//! ratio reported is the median of each round's ratio: the two runs of a round are measured
//! next to each other, under the same load.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use crate::baseline::wait_ready;
use crate::cluster::{free_port, spawn_child};
use crate::common::{Ctx, Target};
use crate::stats::round3;
use crate::{connect, fanout, p2p};

/// Least server CPU (seconds) a throughput figure is computed from.
const MIN_CPU_S: f64 = 0.05;

/// Connections of `rss-19k` (see [`Scenario::Rss19k`]).
const RSS_19K_CLIENTS: u64 = 18_900;

/// The scenarios of issue 16's table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Scenario {
    /// `notify_all` 100 B, 1,000 clients × 2,000 messages, window 10.
    #[value(name = "fanout-1k")]
    Fanout1k,
    /// `notify_all` 100 B, 10,000 clients × 300 messages (default window).
    #[value(name = "fanout-10k")]
    Fanout10k,
    /// p2p `notify_client` 100 B, 10,000 clients at 5,000 msg/s.
    #[value(name = "p2p-5k")]
    P2p5k,
    /// The same at 20,000 msg/s.
    #[value(name = "p2p-20k")]
    P2p20k,
    /// The same at 50,000 msg/s.
    #[value(name = "p2p-50k")]
    P2p50k,
    /// RSS growth per idle acknowledged connection, 10,000 connections.
    #[value(name = "rss-10k")]
    Rss10k,
    /// The same with 18,900 connections: under this machine's hard limit of 20,000 open files
    /// jssocket admits 18,969 TCP connections (it keeps 5 % for health checks and admins).
    #[value(name = "rss-19k")]
    Rss19k,
    /// Server CPU (% of a core) while 10,000 acknowledged clients sit idle for `--idle-hold`
    /// seconds (default 30: longer than jssocket's 20 s ping interval). Not in the default list.
    #[value(name = "idle-10k")]
    Idle10k,
}

impl Scenario {
    /// The default list: all but `idle-10k`.
    pub const ALL: [Scenario; 7] = [
        Scenario::Fanout1k,
        Scenario::Fanout10k,
        Scenario::P2p5k,
        Scenario::P2p20k,
        Scenario::P2p50k,
        Scenario::Rss10k,
        Scenario::Rss19k,
    ];

    fn name(self) -> &'static str {
        match self {
            Scenario::Fanout1k => "fanout-1k",
            Scenario::Fanout10k => "fanout-10k",
            Scenario::P2p5k => "p2p-5k",
            Scenario::P2p20k => "p2p-20k",
            Scenario::P2p50k => "p2p-50k",
            Scenario::Rss10k => "rss-10k",
            Scenario::Rss19k => "rss-19k",
            Scenario::Idle10k => "idle-10k",
        }
    }

    fn is_rss(self) -> bool {
        matches!(self, Scenario::Rss10k | Scenario::Rss19k)
    }

    fn unit(self) -> &'static str {
        match self {
            Scenario::Rss10k | Scenario::Rss19k => "bytes of RSS per idle acknowledged connection",
            Scenario::Idle10k => "% of a core while idle",
            _ => "deliveries per server-CPU-second",
        }
    }
}

#[derive(Clone, Debug)]
pub struct Params {
    /// The jssocket binary.
    pub server_bin: PathBuf,
    /// Extra arguments for it.
    pub server_args: Vec<String>,
    pub rounds: usize,
    pub scenarios: Vec<Scenario>,
    /// Multiplies clients, messages and rates (1: the figures; less: a quick check).
    pub scale: f64,
    pub p2p_duration: Duration,
    /// How long the `rss-*` scenarios hold their connections.
    pub hold: Duration,
    /// How long `idle-10k` holds them.
    pub idle_hold: Duration,
    /// Bound on each run (not on the whole comparison).
    pub run_timeout: Duration,
    pub log_dir: PathBuf,
}

impl Params {
    fn scaled(&self, n: u64, least: u64) -> u64 {
        ((n as f64 * self.scale).round() as u64).max(least)
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Server {
    Raw,
    Jssocket,
}

impl Server {
    fn name(self) -> &'static str {
        match self {
            Server::Raw => "raw",
            Server::Jssocket => "jssocket",
        }
    }
}

/// One run's figure.
struct Run {
    figure: Option<f64>,
    ok: bool,
    /// The scenario's own figures, trimmed to what the table needs.
    json: Value,
}

/// A server process started for one run; killed when dropped.
struct Started {
    child: tokio::process::Child,
    target: Target,
    pid: u32,
}

async fn start(p: &Params, ctx: &Ctx, server: Server, log: &Path) -> Result<Started> {
    let port = free_port()?;
    let child = match server {
        Server::Raw => {
            let exe = std::env::current_exe().context("locating the bench executable")?;
            let args: Vec<String> = [
                "raw-server",
                "--host",
                "127.0.0.1",
                "--port",
                &port.to_string(),
                "--auth",
                &ctx.auth,
                "--exit-with-parent",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            spawn_child(&exe, &args, log, Stdio::null())?
        }
        Server::Jssocket => {
            // Cost 4: the admin's login is checked against it once per run.
            let hash = bcrypt::hash(&ctx.auth, 4).context("hashing the admin password")?;
            let mut args: Vec<String> = ["-h", "127.0.0.1", "-p", &port.to_string(), "--auth"]
                .iter()
                .map(|s| s.to_string())
                .collect();
            args.push(hash);
            args.extend(p.server_args.iter().cloned());
            spawn_child(&p.server_bin, &args, log, Stdio::null())?
        }
    };
    let pid = child.id().context("the server exited at once")?;
    let target = Target::resolve(&format!("ws://127.0.0.1:{port}/ws")).await?;
    wait_ready(target.addr)
        .await
        .with_context(|| format!("{} (log: {})", server.name(), log.display()))?;
    Ok(Started { child, target, pid })
}

async fn run_once(
    ctx: &Ctx,
    p: &Params,
    scenario: Scenario,
    server: Server,
    round: usize,
) -> Result<Run> {
    let label = format!("{}/{}/{}", scenario.name(), server.name(), round + 1);
    let log = p.log_dir.join(format!(
        "{}-{}-{}.log",
        scenario.name(),
        server.name(),
        round + 1
    ));
    let mut started = start(p, ctx, server, &log).await?;
    println!(
        "compare: {label}: {} (pid {}) on {}",
        server.name(),
        started.pid,
        started.target.url
    );
    let mut run_ctx = ctx.with_target(started.target.clone(), Some(started.pid));
    // Each run has its own bound; the comparison as a whole has none.
    run_ctx.stop = ctx.stop.child_token();
    let run_ctx = Arc::new(run_ctx);
    let timer = {
        let stop = run_ctx.stop.clone();
        let bound = p.run_timeout;
        tokio::spawn(async move {
            tokio::time::sleep(bound).await;
            stop.cancel();
        })
    };
    let result = measure(&run_ctx, p, scenario, &label).await;
    timer.abort();
    let _ = started.child.kill().await;
    // Let the closed sockets go before the next server starts.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let run = result?;
    println!(
        "compare: {label}: {} ({}){}",
        show(run.figure, scenario),
        scenario.unit(),
        if run.ok {
            ""
        } else {
            "  *** FAILED CHECKS ***"
        }
    );
    Ok(run)
}

async fn measure(ctx: &Arc<Ctx>, p: &Params, scenario: Scenario, label: &str) -> Result<Run> {
    let p2p_rate = |rate: f64| p2p::Params {
        clients: p.scaled(10_000, 2) as usize,
        rate: (rate * p.scale).max(1.0),
        duration: p.p2p_duration,
        size: 100,
        // On a loaded machine 50,000 msg/s can outrun the bench and the server: what is still
        // queued when sending stops needs time, and only what never arrives is lost.
        drain: Duration::from_secs(30),
    };
    let fanout = |clients: u64, messages: u64, window: Option<u64>| fanout::Params {
        clients: p.scaled(clients, 1) as usize,
        messages: p.scaled(messages, 1),
        size: 100,
        rate: None,
        window,
        slow_clients: 0,
        drain: Duration::from_secs(10),
        groups: None,
        publish: None,
    };
    let throughput = |json: Value, ok: bool| {
        // /proc counts CPU in 10 ms ticks: below a few ticks the quotient means nothing (a
        // small --scale does that).
        let measurable = json["server_cpu_s_sending"]
            .as_f64()
            .is_some_and(|cpu| cpu >= MIN_CPU_S);
        let figure = json["deliveries_per_server_cpu_s"]
            .as_f64()
            .filter(|_| measurable);
        if !measurable {
            println!("compare: {label}: under {MIN_CPU_S} s of server CPU: no figure");
        }
        Run {
            figure,
            ok,
            json: pick(
                &json,
                &[
                    "deliveries_per_server_cpu_s",
                    "server_cpu_s_sending",
                    "deliveries",
                    "delivered",
                    "deliveries_per_sec",
                    "delivered_per_sec",
                    "lost",
                    "duplicated",
                    "reordered",
                    "misdelivered",
                    "misrouted",
                    "timed_out",
                ],
            ),
        }
    };
    Ok(match scenario {
        Scenario::Fanout1k => {
            let o = fanout::run(ctx, &fanout(1000, 2000, Some(10)), label).await?;
            throughput(o.json, o.ok)
        }
        Scenario::Fanout10k => {
            let o = fanout::run(ctx, &fanout(10_000, 300, None), label).await?;
            throughput(o.json, o.ok)
        }
        Scenario::P2p5k | Scenario::P2p20k | Scenario::P2p50k => {
            let rate = match scenario {
                Scenario::P2p5k => 5_000.0,
                Scenario::P2p20k => 20_000.0,
                _ => 50_000.0,
            };
            let (json, ok) = p2p::run(ctx, &p2p_rate(rate)).await?;
            throughput(json, ok)
        }
        Scenario::Idle10k => {
            let params = connect::Params {
                clients: p.scaled(10_000, 1) as usize,
                hold: p.idle_hold,
                groups: 10,
            };
            let (json, ok) = connect::run(ctx, &params).await?;
            let figure = json["idle_cpu_percent"].as_f64();
            Run {
                figure,
                ok,
                json: json!({
                    "idle_cpu_percent": figure,
                    "acknowledged": json["acknowledged"],
                    "closed_during_hold": json["closed_during_hold"],
                    "timed_out": json["timed_out"],
                }),
            }
        }
        Scenario::Rss10k | Scenario::Rss19k => {
            let clients = if scenario == Scenario::Rss10k {
                10_000
            } else {
                RSS_19K_CLIENTS
            };
            let params = connect::Params {
                clients: p.scaled(clients, 1) as usize,
                hold: p.hold,
                groups: 10,
            };
            let (json, ok) = connect::run(ctx, &params).await?;
            let figure = json["server_per_conn"]["bytes_per_conn"].as_f64();
            Run {
                figure,
                ok,
                json: json!({
                    "bytes_per_conn": figure,
                    "server_per_conn": json["server_per_conn"],
                    "acknowledged": json["acknowledged"],
                    "closed_during_hold": json["closed_during_hold"],
                    "timed_out": json["timed_out"],
                }),
            }
        }
    })
}

fn pick(json: &Value, keys: &[&str]) -> Value {
    let mut out = serde_json::Map::new();
    for k in keys {
        if let Some(v) = json.get(*k).filter(|v| !v.is_null()) {
            out.insert((*k).to_string(), v.clone());
        }
    }
    Value::Object(out)
}

fn median(values: &[f64]) -> Option<f64> {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    Some(if v.len() % 2 == 1 {
        v[mid]
    } else {
        (v[mid - 1] + v[mid]) / 2.0
    })
}

fn show(x: Option<f64>, scenario: Scenario) -> String {
    match x {
        None => "–".into(),
        Some(x) if scenario.is_rss() => format!("{:.2} KiB", x / 1024.0),
        Some(x) if scenario == Scenario::Idle10k => format!("{x:.2} %"),
        Some(x) if x >= 1e6 => format!("{:.2}M", x / 1e6),
        Some(x) if x >= 1e3 => format!("{:.1}k", x / 1e3),
        Some(x) => format!("{x:.0}"),
    }
}

pub async fn run(ctx: &Arc<Ctx>, p: &Params) -> Result<(Value, bool)> {
    if !p.server_bin.is_file() {
        bail!(
            "the jssocket binary {} does not exist (--server-bin or JSSOCKET_BIN)",
            p.server_bin.display()
        );
    }
    std::fs::create_dir_all(&p.log_dir)
        .with_context(|| format!("creating {}", p.log_dir.display()))?;
    println!(
        "compare: {} round(s) of {} against the raw-frame server and {} (logs in {})",
        p.rounds,
        p.scenarios
            .iter()
            .map(|s| s.name())
            .collect::<Vec<_>>()
            .join(", "),
        p.server_bin.display(),
        p.log_dir.display()
    );
    let mut all_ok = true;
    let mut results = Vec::new();
    let mut table = Vec::new();
    for &scenario in &p.scenarios {
        let mut raw = Vec::new();
        let mut jss = Vec::new();
        let mut ratios = Vec::new();
        let mut runs = Vec::new();
        let mut ok = true;
        for round in 0..p.rounds {
            let order = if round % 2 == 0 {
                [Server::Raw, Server::Jssocket]
            } else {
                [Server::Jssocket, Server::Raw]
            };
            let mut pair = [None, None];
            for server in order {
                if ctx.stop.is_cancelled() {
                    bail!("stopped");
                }
                let run = match run_once(ctx, p, scenario, server, round).await {
                    Ok(run) => run,
                    Err(e) => {
                        println!(
                            "compare: {}/{}/{}: *** ERROR *** {e:#}",
                            scenario.name(),
                            server.name(),
                            round + 1
                        );
                        Run {
                            figure: None,
                            ok: false,
                            json: json!({"error": format!("{e:#}")}),
                        }
                    }
                };
                ok &= run.ok;
                let slot = usize::from(server == Server::Jssocket);
                pair[slot] = run.figure;
                runs.push(json!({
                    "round": round + 1,
                    "server": server.name(),
                    "figure": run.figure.map(round3),
                    "ok": run.ok,
                    "run": run.json,
                }));
            }
            if let Some(r) = pair[0] {
                raw.push(r);
            }
            if let Some(j) = pair[1] {
                jss.push(j);
            }
            // No ratio to nothing (the raw server's idle CPU is often 0 ticks).
            if let [Some(r), Some(j)] = pair
                && r > 0.0
            {
                ratios.push(j / r);
            }
        }
        all_ok &= ok;
        let (raw_median, jss_median, ratio_median) = (median(&raw), median(&jss), median(&ratios));
        table.push(format!(
            "{:<11} {:>11} {:>11} {:>6}   raw [{}]  jssocket [{}]  ratios [{}]{}",
            scenario.name(),
            show(raw_median, scenario),
            show(jss_median, scenario),
            ratio_median
                .map(|r| format!("{r:.3}"))
                .unwrap_or_else(|| "–".into()),
            raw.iter()
                .map(|x| show(Some(*x), scenario))
                .collect::<Vec<_>>()
                .join(", "),
            jss.iter()
                .map(|x| show(Some(*x), scenario))
                .collect::<Vec<_>>()
                .join(", "),
            ratios
                .iter()
                .map(|x| format!("{x:.3}"))
                .collect::<Vec<_>>()
                .join(", "),
            if ok { "" } else { "  *** FAILED ***" }
        ));
        results.push(json!({
            "scenario": scenario.name(),
            "unit": scenario.unit(),
            "raw": raw.iter().copied().map(round3).collect::<Vec<_>>(),
            "jssocket": jss.iter().copied().map(round3).collect::<Vec<_>>(),
            "ratios": ratios.iter().copied().map(round3).collect::<Vec<_>>(),
            "raw_median": raw_median.map(round3),
            "jssocket_median": jss_median.map(round3),
            "ratio_median": ratio_median.map(round3),
            "ok": ok,
            "runs": runs,
        }));
    }
    println!();
    println!(
        "compare: medians of {} round(s); throughput in deliveries per server-CPU-second, \
         rss in RSS growth per idle acknowledged connection; ratio = jssocket / raw (median of \
         the rounds' ratios)",
        p.rounds
    );
    println!(
        "{:<11} {:>11} {:>11} {:>6}   each round",
        "scenario", "raw", "jssocket", "ratio"
    );
    for line in &table {
        println!("{line}");
    }
    if !all_ok {
        println!(
            "compare: *** FAILED: a run lost, duplicated, reordered or misdelivered messages, \
             failed a connect or timed out; see its lines above ***"
        );
    }
    let json = json!({
        "scenario": "compare",
        "server_bin": p.server_bin.display().to_string(),
        "server_args": p.server_args,
        "rounds": p.rounds,
        "scale": p.scale,
        "results": results,
        "ok": all_ok,
    });
    Ok((json, all_ok))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_median_takes_the_middle_or_the_mean_of_the_two() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0]), Some(2.5));
        assert_eq!(median(&[]), None);
    }
}
