//! `jssocket-bench`: a load generator for WebSocket relays speaking the jssocket protocol
//! (see BENCHMARKS.md). It talks to any server at `--url`, but only on loopback addresses.
//!
//! Every scenario prints human-readable lines and then exactly one line of JSON with all its
//! figures; it is bounded by `--timeout`, after which it reports what it has and exits 1.

mod admin;
mod attack;
mod baseline;
mod churn;
mod client;
mod cluster;
mod common;
mod compare;
mod connect;
mod fanout;
mod membership;
mod p2p;
mod presence;
mod progress;
mod raw;
mod recovery;
mod stats;

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Result, bail};
use clap::{Args, Parser, Subcommand};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::common::{Ctx, Target};

#[derive(Parser)]
#[command(
    name = "jssocket-bench",
    about = "Benchmarks a jssocket-protocol WebSocket relay on loopback",
    version
)]
struct Cli {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Args)]
struct Global {
    /// WebSocket URL of the server under test (loopback hosts only).
    #[arg(
        long,
        global = true,
        env = "BENCH_URL",
        default_value = "ws://127.0.0.1:80/ws"
    )]
    url: String,
    /// More servers for the clients (repeatable): clients are spread round robin over
    /// `--url` and these, while the admin stays on `--url` (a cluster's nodes, say).
    #[arg(long = "client-url", global = true)]
    client_urls: Vec<String>,
    /// Admin password, sent as the `auth` upgrade header.
    #[arg(
        long,
        global = true,
        env = "BENCH_AUTH",
        default_value = "12345678",
        hide_env_values = true
    )]
    auth: String,
    /// Pid of the server: report its RSS growth and CPU seconds (from /proc).
    #[arg(long, global = true)]
    server_pid: Option<u32>,
    /// Whole-run bound in seconds: afterwards the scenario reports what it has and exits 1.
    #[arg(long, global = true, default_value_t = 120.0, value_parser = positive_secs)]
    timeout: f64,
    /// Handshakes (TCP + upgrade + client_connect + ack) in flight at once.
    #[arg(long, global = true, default_value_t = 200, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    concurrency: u64,
    /// Client sockets per source address (127.0.0.2, 127.0.0.3, …).
    #[arg(long, global = true, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..=28_000))]
    per_source: u64,
    /// Seconds a client waits for its client_connected acknowledgement.
    #[arg(long, global = true, default_value_t = 10.0, value_parser = positive_secs)]
    ack_timeout: f64,
    /// Seconds between progress lines on stderr (elapsed, connections, messages, errors);
    /// 0 turns them off.
    #[arg(long, global = true, default_value_t = 5.0, value_parser = secs_range)]
    progress: f64,
}

/// Where a reference server (`baseline-server`, `raw-server`) listens.
#[derive(Args)]
struct ServeArgs {
    /// Port to listen on.
    #[arg(long)]
    port: u16,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Exit when the parent process goes away.
    #[arg(long, hide = true)]
    exit_with_parent: bool,
}

#[derive(Subcommand)]
enum Cmd {
    /// Connect and acknowledge N clients, hold them: connect rate, failures, server memory.
    Connect {
        /// Clients to connect and acknowledge.
        #[arg(long, default_value_t = 1000, value_parser = clients_range())]
        clients: u64,
        /// Seconds to hold the clients once all are acknowledged.
        #[arg(long, default_value_t = 5.0, value_parser = secs_range)]
        hold: f64,
        /// Groups the admin spreads the clients over (round robin).
        #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=100_000))]
        groups: u32,
    },
    /// Admin notify_all to N clients: deliveries/s, latency, loss/dup/order.
    Fanout(FanoutArgs),
    /// Admin publish to one channel, received by N jssocket subscribers or N SignalR clients:
    /// deliveries/s, deliveries per server-CPU-second, loss/dup/order (issue 12).
    PublishFanout {
        #[command(flatten)]
        f: FanoutArgs,
        /// The receivers' protocol.
        #[arg(long, value_enum)]
        wire: fanout::Wire,
        /// The channel the admin publishes to (jssocket receivers subscribe to it first).
        #[arg(long, default_value = "bench.fanout")]
        channel: String,
        /// The server's SignalR path (its --signalr-path).
        #[arg(long, default_value = "/sockets", value_parser = url_path)]
        signalr_path: String,
    },
    /// Admin notify_group round robin over G groups.
    Group {
        #[command(flatten)]
        f: FanoutArgs,
        #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=100_000))]
        groups: u32,
    },
    /// Clients notify_client random other clients at an aggregate rate.
    P2p {
        /// Acknowledged clients (senders and receivers).
        #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(2..=1_000_000))]
        clients: u64,
        /// Aggregate messages per second.
        #[arg(long, default_value_t = 1000.0, value_parser = rate_range)]
        rate: f64,
        /// Seconds of sending.
        #[arg(long, default_value_t = 10.0, value_parser = secs_range)]
        duration: f64,
        /// Payload size in bytes.
        #[arg(long, default_value_t = 256, value_parser = size_range())]
        size: u64,
        /// Seconds to wait for the last deliveries.
        #[arg(long, default_value_t = 5.0, value_parser = secs_range)]
        drain: f64,
    },
    /// Keep ~N clients while disconnecting/connecting at a rate; admin broadcasts meanwhile.
    Churn {
        /// Clients kept connected.
        #[arg(long, default_value_t = 1000, value_parser = clients_range())]
        clients: u64,
        /// Seconds of churn.
        #[arg(long, default_value_t = 10.0, value_parser = secs_range)]
        duration: f64,
        /// Disconnects (and new connects) per second.
        #[arg(long, default_value_t = 50.0, value_parser = rate_range)]
        rate: f64,
        /// notify_all broadcasts per second.
        #[arg(long, default_value_t = 10.0, value_parser = rate_range)]
        broadcast_rate: f64,
        /// Payload size in bytes.
        #[arg(long, default_value_t = 256, value_parser = size_range())]
        size: u64,
        /// A client owes a broadcast only if it stayed connected this long after it was sent.
        #[arg(long, default_value_t = 1.0, value_parser = secs_range)]
        grace: f64,
    },
    /// A paced notify_all fan-out without, then with, admin `membership` changes at
    /// --churn-rate per second: the fan-out's p99 side by side (issue 13).
    MembershipChurn {
        #[command(flatten)]
        f: FanoutArgs,
        /// Membership adds/removes per second during the second run.
        #[arg(long, default_value_t = 10_000.0, value_parser = rate_range)]
        churn_rate: f64,
        /// Admin connections sharing --churn-rate.
        #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..=1000))]
        churn_admins: u64,
        /// The user every change concerns (`g0`: the fan-out's receivers, the worst case);
        /// default: users with no connection.
        #[arg(long)]
        churn_user: Option<String>,
    },
    /// Run the minimal reference relay (tokio + tokio-tungstenite) until killed.
    BaselineServer(ServeArgs),
    /// fanout against a fresh baseline-server, then against --url; prints the ratio.
    Baseline(FanoutArgs),
    /// Run the raw-frame baseline relay (hand-made upgrade and framing on tokio, no
    /// WebSocket library) until killed (issue 16).
    RawServer(ServeArgs),
    /// Issue 16's scenarios against a fresh raw-server and a fresh jssocket, alternately, for
    /// R rounds: deliveries per server-CPU-second (RSS per connection) and the ratio.
    /// --timeout bounds each run, not the whole comparison.
    Compare(CompareArgs),
    /// One attack of issue 10 for a bounded time while a bystander measures its round trip
    /// (see scripts/attack.sh, which starts the servers).
    Attack(AttackArgs),
    /// Starts Redis and N nodes; Redis messages each node receives per notify_client to a
    /// remote client and per notify_group to a group on 2 nodes.
    ClusterRoute {
        #[command(flatten)]
        servers: ServerArgs,
        /// Nodes (at least 3: the group spans nodes 1 and 2).
        #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(3..=16))]
        nodes: u64,
        /// Acknowledged clients on every node.
        #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u64).range(1..=10_000))]
        clients_per_node: u64,
        /// Messages of each kind the admin on node 0 sends.
        #[arg(long, default_value_t = 2000, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
        messages: u64,
        /// Messages per second.
        #[arg(long, default_value_t = 2000.0, value_parser = rate_range)]
        rate: f64,
        /// Seconds to wait for the last deliveries of a phase.
        #[arg(long, default_value_t = 10.0, value_parser = secs_range)]
        drain: f64,
    },
    /// Starts Redis and 1 or 2 nodes; pairs of clients notify_client each other (partners on
    /// different nodes with 2): deliveries per second and per second of the nodes' CPU.
    ClusterP2p {
        #[command(flatten)]
        servers: ServerArgs,
        /// Nodes: 1 or 2 (ignored with --compare).
        #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(1..=2))]
        nodes: u64,
        /// Run on 1 node, then on 2, and print the ratio.
        #[arg(long)]
        compare: bool,
        /// Pairs of clients.
        #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u64).range(1..=5_000))]
        pairs: u64,
        /// Seconds measured.
        #[arg(long, default_value_t = 15.0, value_parser = positive_secs)]
        duration: f64,
        /// Messages in flight per client (each answers every message it gets).
        #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(1..=1_000))]
        window: u64,
        /// Payload size in bytes.
        #[arg(long, default_value_t = 64, value_parser = size_range())]
        size: u64,
        /// Seconds to wait for the messages in flight at the end.
        #[arg(long, default_value_t = 5.0, value_parser = secs_range)]
        drain: f64,
    },
    /// Starts Redis and N nodes; holds many acknowledged connections over them (in child
    /// processes) and sends one notify_all: how many got it, how fast, the nodes' RSS.
    ClusterHold {
        #[command(flatten)]
        servers: ServerArgs,
        /// Nodes.
        #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u64).range(1..=64))]
        nodes: u64,
        /// Connections in all (at most 19 000 per node).
        #[arg(long, default_value_t = 100_000, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
        connections: u64,
        /// Client sockets per child process.
        #[arg(long, default_value_t = cluster::hold::MAX_PER_WORKER,
              value_parser = clap::value_parser!(u64).range(1..=cluster::hold::MAX_PER_WORKER))]
        per_worker: u64,
        /// Seconds to wait for the notify_all to reach every client.
        #[arg(long, default_value_t = 60.0, value_parser = secs_range)]
        drain: f64,
    },
    /// Presence queries (SPEC §12: info, users and connections pages) with no client, then
    /// with N acknowledged clients held: p50/p99 of each, and the ratio.
    Presence {
        /// Clients to connect, acknowledge and hold.
        #[arg(long, default_value_t = 19_000, value_parser = clients_range())]
        clients: u64,
        /// Users the clients are spread over (the admin's groups g0, g1, …).
        #[arg(long, default_value_t = 5_000, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
        users: u32,
        /// Queries of each kind, with no client and then with the clients.
        #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
        queries: u64,
        /// The pages' `limit`.
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..=1_000))]
        limit: u64,
    },
    /// History recovery (issue 14, SPEC §13): N subscribers of a history channel drop their
    /// connections at once, the admin publishes --missed more, all reconnect at once with
    /// `since`: recovered:true count, exact in-order recovery, time to the last recovery.
    Recovery {
        /// Subscribers (the server needs `--history` covering --channel).
        #[arg(long, default_value_t = 10_000, value_parser = clients_range())]
        clients: u64,
        /// Publications each client misses while disconnected.
        #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=10_000))]
        missed: u64,
        /// Payload size in bytes.
        #[arg(long, default_value_t = 128, value_parser = size_range())]
        size: u64,
        /// The history channel.
        #[arg(long, default_value = "bench.recovery")]
        channel: String,
    },
    /// A child process of cluster-hold (clients over the nodes; JSON lines on stdout).
    #[command(hide = true)]
    HoldWorker {
        /// Clients to connect and acknowledge.
        #[arg(long, value_parser = clients_range())]
        clients: u64,
        /// Index of the first source address (127.0.0.2 + it).
        #[arg(long, default_value_t = 0)]
        first_source: u64,
        /// The nodes, clients round robin over them.
        #[arg(long = "node-url", required = true)]
        node_urls: Vec<String>,
    },
}

/// Which servers the cluster scenarios start.
#[derive(Args)]
struct ServerArgs {
    /// The jssocket binary to start the nodes from.
    #[arg(long, env = "JSSOCKET_BIN", default_value_os_t = cluster::default_server_bin())]
    server_bin: std::path::PathBuf,
    /// The redis-server binary.
    #[arg(long, default_value = "redis-server")]
    redis_server: std::path::PathBuf,
    /// Run the nodes over a Redis Cluster of three masters (sharded Pub/Sub; the nodes get
    /// the three as a comma-separated --redis-url) instead of one Redis.
    #[arg(long)]
    redis_cluster: bool,
    /// The redis-cli binary, which makes the Redis Cluster of --redis-cluster.
    #[arg(long, default_value = "redis-cli")]
    redis_cli: std::path::PathBuf,
    /// Where the servers' logs go (default: a new directory under /tmp).
    #[arg(long)]
    log_dir: Option<std::path::PathBuf>,
}

impl ServerArgs {
    fn setup(&self, password: &str, max_connections: usize) -> cluster::Setup {
        cluster::Setup {
            server_bin: self.server_bin.clone(),
            redis_bin: self.redis_server.clone(),
            redis_cli: self.redis_cli.clone(),
            redis_cluster: self.redis_cluster,
            password: password.to_string(),
            max_connections,
            log_dir: self.log_dir.clone().unwrap_or_else(|| {
                std::env::temp_dir().join(format!("jssocket-bench-{}", std::process::id()))
            }),
        }
    }
}

#[derive(Args)]
struct AttackArgs {
    /// The attack to run.
    #[arg(value_enum, required_unless_present = "scenario_flag")]
    scenario: Option<attack::Scenario>,
    /// The attack to run (instead of the positional argument).
    #[arg(long = "scenario", value_enum, conflicts_with = "scenario")]
    scenario_flag: Option<attack::Scenario>,
    /// Seconds of attack.
    #[arg(long, default_value_t = 15.0, value_parser = positive_secs)]
    duration: f64,
    /// Bystander notifications per second.
    #[arg(long, default_value_t = 20.0, value_parser = rate_range)]
    bystander_rate: f64,
    /// Seconds into the attack when a backend tries to log in (default: 1 for auth-flood,
    /// half the duration otherwise).
    #[arg(long, value_parser = secs_range)]
    login_at: Option<f64>,
    /// Seconds that login may take before it counts as refused.
    #[arg(long, default_value_t = 20.0, value_parser = positive_secs)]
    login_timeout: f64,
    /// The other nodes of a cluster (B, then C), beside --url (node A, the one attacked).
    #[arg(long = "node-url")]
    node_urls: Vec<String>,
    /// Their server pids, in the same order (cluster-node-death SIGKILLs node B's).
    #[arg(long = "node-pid")]
    node_pids: Vec<u32>,
    /// A server's log file whose growth during the attack is reported (repeatable).
    #[arg(long = "log-file")]
    log_files: Vec<std::path::PathBuf>,
    /// cluster-notify-flood: notifications per second, all attackers together.
    #[arg(long, default_value_t = 100_000.0, value_parser = rate_range)]
    flood_rate: f64,
    /// Attacking connections (or per wave, for auth-flood) instead of the scenario's default.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    conns: Option<u64>,
}

#[derive(Args)]
struct CompareArgs {
    /// The jssocket binary to start for each run (with `-h 127.0.0.1 -p <free port> --auth
    /// <bcrypt hash of --auth>`).
    #[arg(long, env = "JSSOCKET_BIN", default_value_os_t = cluster::default_server_bin())]
    server_bin: std::path::PathBuf,
    /// One more argument for jssocket (repeatable), e.g. --server-arg=--max-queue-bytes=…
    #[arg(long = "server-arg", allow_hyphen_values = true)]
    server_args: Vec<String>,
    /// Rounds: each is one run against each server, in alternating order.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=100))]
    rounds: u64,
    /// Scenarios, comma-separated (default: all but idle-10k).
    #[arg(long, value_enum, value_delimiter = ',')]
    scenarios: Vec<compare::Scenario>,
    /// Multiplies clients, messages and p2p rates: 1 is the table, less is a quick
    /// check (whose figures are not the issue's).
    #[arg(long, default_value_t = 1.0, value_parser = scale_range)]
    scale: f64,
    /// Seconds of sending in each p2p run.
    #[arg(long, default_value_t = 10.0, value_parser = positive_secs)]
    p2p_duration: f64,
    /// Seconds the rss scenarios hold their connections.
    #[arg(long, default_value_t = 2.0, value_parser = secs_range)]
    hold: f64,
    /// Seconds idle-10k holds its connections (more than the server's ping interval).
    #[arg(long, default_value_t = 30.0, value_parser = positive_secs)]
    idle_hold: f64,
    /// Where the servers' logs go (default: a new directory under /tmp).
    #[arg(long)]
    log_dir: Option<std::path::PathBuf>,
}

impl CompareArgs {
    fn params(&self, run_timeout: f64) -> compare::Params {
        compare::Params {
            server_bin: self.server_bin.clone(),
            server_args: self.server_args.clone(),
            rounds: self.rounds as usize,
            scenarios: if self.scenarios.is_empty() {
                compare::Scenario::ALL.to_vec()
            } else {
                self.scenarios.clone()
            },
            scale: self.scale,
            p2p_duration: Duration::from_secs_f64(self.p2p_duration),
            hold: Duration::from_secs_f64(self.hold),
            idle_hold: Duration::from_secs_f64(self.idle_hold),
            run_timeout: Duration::from_secs_f64(run_timeout),
            log_dir: self.log_dir.clone().unwrap_or_else(|| {
                std::env::temp_dir().join(format!("jssocket-compare-{}", std::process::id()))
            }),
        }
    }
}

fn scale_range(s: &str) -> Result<f64, String> {
    parse_f64(s, 0.0001, 1.0)
}

#[derive(Args, Clone)]
struct FanoutArgs {
    /// Receiving clients (acknowledged, checked for exactly-once in-order delivery).
    #[arg(long, default_value_t = 1000, value_parser = clients_range())]
    clients: u64,
    /// Messages the admin sends.
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u64).range(1..=100_000_000))]
    messages: u64,
    /// Payload size in bytes (a JSON object with seq, ts and padding).
    #[arg(long, default_value_t = 256, value_parser = size_range())]
    size: u64,
    /// Messages per second (default: as fast as the window allows).
    #[arg(long, value_parser = rate_range)]
    rate: Option<f64>,
    /// Messages in flight per receiver on average (default: ~256 KiB worth, at most 256;
    /// 0 = unlimited).
    #[arg(long)]
    window: Option<u64>,
    /// Extra clients that are acknowledged and then never read.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=100_000))]
    slow_clients: u64,
    /// Seconds to wait for the last deliveries after the last send.
    #[arg(long, default_value_t = 10.0, value_parser = secs_range)]
    drain: f64,
}

impl FanoutArgs {
    fn params(&self, groups: Option<u32>) -> fanout::Params {
        fanout::Params {
            clients: self.clients as usize,
            messages: self.messages,
            size: self.size as usize,
            rate: self.rate,
            window: self.window,
            slow_clients: self.slow_clients as usize,
            drain: Duration::from_secs_f64(self.drain),
            groups,
            publish: None,
        }
    }
}

fn clients_range() -> clap::builder::RangedU64ValueParser {
    clap::value_parser!(u64).range(1..=1_000_000)
}

fn size_range() -> clap::builder::RangedU64ValueParser {
    clap::value_parser!(u64).range(1..=1_000_000)
}

fn url_path(s: &str) -> Result<String, String> {
    if s.starts_with('/') && !s.contains(['?', '#', ' ']) {
        Ok(s.to_string())
    } else {
        Err("must be a path such as /sockets".into())
    }
}

fn parse_f64(s: &str, lo: f64, hi: f64) -> Result<f64, String> {
    let v: f64 = s.parse().map_err(|_| format!("{s:?} is not a number"))?;
    if !(v.is_finite() && v >= lo && v <= hi) {
        return Err(format!("must be between {lo} and {hi}"));
    }
    Ok(v)
}

fn positive_secs(s: &str) -> Result<f64, String> {
    parse_f64(s, 0.001, 86_400.0)
}

fn secs_range(s: &str) -> Result<f64, String> {
    parse_f64(s, 0.0, 86_400.0)
}

fn rate_range(s: &str) -> Result<f64, String> {
    parse_f64(s, 0.001, 10_000_000.0)
}

impl Cmd {
    fn name(&self) -> &'static str {
        match self {
            Cmd::Connect { .. } => "connect",
            Cmd::Fanout(_) => "fanout",
            Cmd::Group { .. } => "group",
            Cmd::PublishFanout { .. } => "publish-fanout",
            Cmd::P2p { .. } => "p2p",
            Cmd::Churn { .. } => "churn",
            Cmd::MembershipChurn { .. } => "membership-churn",
            Cmd::BaselineServer(_) => "baseline-server",
            Cmd::Baseline(_) => "baseline",
            Cmd::RawServer(_) => "raw-server",
            Cmd::Compare(_) => "compare",
            Cmd::Attack(_) => "attack",
            Cmd::ClusterRoute { .. } => "cluster-route",
            Cmd::ClusterP2p { .. } => "cluster-p2p",
            Cmd::ClusterHold { .. } => "cluster-hold",
            Cmd::HoldWorker { .. } => "hold-worker",
            Cmd::Presence { .. } => "presence",
            Cmd::Recovery { .. } => "recovery",
        }
    }
}

fn main() -> ExitCode {
    common::init_clock();
    let cli = Cli::parse();
    let nofile = common::raise_nofile_limit();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let server = match &cli.cmd {
        Cmd::BaselineServer(a) => Some(runtime.block_on(baseline::serve(
            &a.host,
            a.port,
            cli.global.auth.clone(),
            a.exit_with_parent,
        ))),
        Cmd::RawServer(a) => Some(runtime.block_on(raw::serve(
            &a.host,
            a.port,
            cli.global.auth.clone(),
            a.exit_with_parent,
        ))),
        _ => None,
    };
    if let Some(result) = server {
        return match result {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    let name = cli.cmd.name();
    let code = runtime.block_on(run(cli, nofile));
    // Do not wait for tasks still blocked on sockets.
    runtime.shutdown_timeout(Duration::from_millis(200));
    match code {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            println!("error: {e:#}");
            println!("{}", json!({"scenario": name, "error": format!("{e:#}")}));
            ExitCode::from(1)
        }
    }
}

/// Runs the scenario; Ok(false) when it finished but timed out or hit errors.
async fn run(cli: Cli, nofile: u64) -> Result<bool> {
    let g = &cli.global;
    // A hold-worker's clients go to the nodes its parent names.
    let (url, client_urls, first_source) = match &cli.cmd {
        Cmd::HoldWorker {
            node_urls,
            first_source,
            ..
        } => (
            node_urls.first().cloned().unwrap_or_default(),
            node_urls[1..].to_vec(),
            *first_source as usize,
        ),
        _ => (g.url.clone(), g.client_urls.clone(), 0),
    };
    let target = Target::resolve(&url).await?;
    if let Some(pid) = g.server_pid {
        stats::proc_sample(pid)?;
    }
    let wanted = match &cli.cmd {
        Cmd::Connect { clients, .. } | Cmd::P2p { clients, .. } | Cmd::Churn { clients, .. } => {
            *clients
        }
        Cmd::Fanout(f) | Cmd::Group { f, .. } | Cmd::PublishFanout { f, .. } | Cmd::Baseline(f) => {
            f.clients + f.slow_clients
        }
        Cmd::MembershipChurn { f, .. } => 2 * (f.clients + f.slow_clients),
        Cmd::ClusterRoute {
            nodes,
            clients_per_node,
            ..
        } => nodes * clients_per_node,
        Cmd::ClusterP2p { pairs, .. } => 2 * pairs,
        Cmd::HoldWorker { clients, .. } | Cmd::Presence { clients, .. } => *clients,
        Cmd::Recovery { clients, .. } => clients + 1,
        Cmd::Compare(c) => {
            let params = c.params(g.timeout);
            let most = params.scenarios.iter().map(|s| match s {
                compare::Scenario::Fanout1k => 1_000,
                compare::Scenario::Rss19k => 18_900,
                _ => 10_000,
            });
            (most.max().unwrap_or(0) as f64 * c.scale).round() as u64
        }
        Cmd::BaselineServer(_) | Cmd::RawServer(_) | Cmd::Attack(_) | Cmd::ClusterHold { .. } => 0,
    };
    if wanted + 64 > nofile {
        bail!(
            "{wanted} clients need more file descriptors than RLIMIT_NOFILE allows ({nofile}); \
             raise the hard limit (ulimit -Hn) first"
        );
    }
    let mut client_targets = Vec::new();
    for url in &client_urls {
        client_targets.push(Target::resolve(url).await?);
    }
    let mut ctx = Ctx::new(
        target,
        g.auth.clone(),
        g.server_pid,
        g.concurrency as usize,
        g.per_source as usize,
        Duration::from_secs_f64(g.ack_timeout),
    );
    ctx.client_targets = client_targets;
    ctx.first_source = first_source;
    let ctx = Arc::new(ctx);
    // `compare` bounds each of its runs with --timeout, not the whole comparison.
    let compare = matches!(cli.cmd, Cmd::Compare(_));
    let timeout = Duration::from_secs_f64(if compare { 86_400.0 } else { g.timeout });
    {
        let stop = ctx.stop.clone();
        tokio::spawn(async move {
            tokio::time::sleep(timeout).await;
            stop.cancel();
        });
    }
    let name = cli.cmd.name();
    if compare {
        println!(
            "jssocket-bench {name}: servers started per run (RLIMIT_NOFILE {nofile}, timeout \
             {:.0} s per run)",
            g.timeout
        );
    } else {
        println!(
            "jssocket-bench {name}: {} (RLIMIT_NOFILE {nofile}, timeout {:.0} s)",
            ctx.target.url,
            timeout.as_secs_f64()
        );
    }
    let progress_done = CancellationToken::new();
    tokio::spawn(progress::report(
        Duration::from_secs_f64(g.progress),
        progress_done.clone(),
    ));
    let _stop_progress = progress_done.drop_guard();
    let scenario = async {
        match &cli.cmd {
            Cmd::Connect {
                clients,
                hold,
                groups,
            } => {
                let p = connect::Params {
                    clients: *clients as usize,
                    hold: Duration::from_secs_f64(*hold),
                    groups: *groups,
                };
                connect::run(&ctx, &p).await
            }
            Cmd::Fanout(f) => fanout_json(fanout::run(&ctx, &f.params(None), "fanout").await),
            Cmd::MembershipChurn {
                f,
                churn_rate,
                churn_admins,
                churn_user,
            } => {
                let p = membership::Params {
                    fanout: f.params(None),
                    rate: *churn_rate,
                    admins: *churn_admins as usize,
                    user: churn_user.clone(),
                };
                membership::run(&ctx, &p).await
            }
            Cmd::Group { f, groups } => {
                fanout_json(fanout::run(&ctx, &f.params(Some(*groups)), "group").await)
            }
            Cmd::PublishFanout {
                f,
                wire,
                channel,
                signalr_path,
            } => {
                let mut p = f.params(None);
                p.publish = Some(fanout::Publish {
                    wire: *wire,
                    channel: channel.clone(),
                    signalr_path: signalr_path.clone(),
                });
                fanout_json(fanout::run(&ctx, &p, "publish-fanout").await)
            }
            Cmd::P2p {
                clients,
                rate,
                duration,
                size,
                drain,
            } => {
                let p = p2p::Params {
                    clients: *clients as usize,
                    rate: *rate,
                    duration: Duration::from_secs_f64(*duration),
                    size: *size as usize,
                    drain: Duration::from_secs_f64(*drain),
                };
                p2p::run(&ctx, &p).await
            }
            Cmd::Churn {
                clients,
                duration,
                rate,
                broadcast_rate,
                size,
                grace,
            } => {
                let p = churn::Params {
                    clients: *clients as usize,
                    duration: Duration::from_secs_f64(*duration),
                    rate: *rate,
                    broadcast_rate: *broadcast_rate,
                    size: *size as usize,
                    grace: Duration::from_secs_f64(*grace),
                };
                churn::run(&ctx, &p).await
            }
            Cmd::Baseline(f) => baseline::compare(&ctx, &f.params(None)).await,
            Cmd::Compare(c) => compare::run(&ctx, &c.params(g.timeout)).await,
            Cmd::Attack(a) => {
                let p = attack_params(&ctx, g, a, nofile).await?;
                attack::run(&ctx, &p).await
            }
            Cmd::ClusterRoute {
                servers,
                nodes,
                clients_per_node,
                messages,
                rate,
                drain,
            } => {
                let p = cluster::route::Params {
                    nodes: *nodes as usize,
                    clients_per_node: *clients_per_node as usize,
                    messages: *messages,
                    rate: *rate,
                    drain: Duration::from_secs_f64(*drain),
                };
                let setup = servers.setup(&g.auth, *clients_per_node as usize + 100);
                cluster::route::run(&ctx, &setup, &p).await
            }
            Cmd::ClusterP2p {
                servers,
                nodes,
                compare,
                pairs,
                duration,
                window,
                size,
                drain,
            } => {
                let p = cluster::p2p::Params {
                    pairs: *pairs as usize,
                    duration: Duration::from_secs_f64(*duration),
                    window: *window,
                    size: *size as usize,
                    drain: Duration::from_secs_f64(*drain),
                };
                let setup = servers.setup(&g.auth, 2 * *pairs as usize + 100);
                cluster::p2p::run(&ctx, &setup, *nodes as usize, *compare, &p).await
            }
            Cmd::ClusterHold {
                servers,
                nodes,
                connections,
                per_worker,
                drain,
            } => {
                let p = cluster::hold::Params {
                    nodes: *nodes as usize,
                    connections: *connections,
                    per_worker: *per_worker,
                    drain: Duration::from_secs_f64(*drain),
                    timeout: g.timeout,
                };
                let per_node = connections.div_ceil(*nodes) as usize;
                let setup = servers.setup(&g.auth, (per_node + 500).min(19_500));
                cluster::hold::run(&ctx, &setup, &p).await
            }
            Cmd::HoldWorker { clients, .. } => cluster::hold::worker(&ctx, *clients as usize).await,
            Cmd::Presence {
                clients,
                users,
                queries,
                limit,
            } => {
                let p = presence::Params {
                    clients: *clients as usize,
                    users: *users,
                    queries: *queries,
                    limit: *limit,
                };
                presence::run(&ctx, &p).await
            }
            Cmd::Recovery {
                clients,
                missed,
                size,
                channel,
            } => {
                let p = recovery::Params {
                    clients: *clients as usize,
                    missed: *missed,
                    size: *size as usize,
                    channel: channel.clone(),
                };
                recovery::run(&ctx, &p, "recovery").await
            }
            Cmd::BaselineServer(_) | Cmd::RawServer(_) => {
                bail!("a server is not a scenario")
            }
        }
    };
    // The scenarios watch `stop` themselves; this is the backstop if one does not return.
    let hard = timeout + Duration::from_secs(30);
    let (json, ok) = tokio::select! {
        r = scenario => r?,
        _ = tokio::time::sleep(hard) => {
            println!("{name}: did not finish within --timeout + 30 s; giving up");
            (json!({"scenario": name, "error": "hard timeout", "timed_out": true}), false)
        }
    };
    println!("{json}");
    Ok(ok)
}

async fn attack_params(
    ctx: &Ctx,
    g: &Global,
    a: &AttackArgs,
    nofile: u64,
) -> Result<attack::Params> {
    let Some(scenario) = a.scenario.or(a.scenario_flag) else {
        bail!("name an attack");
    };
    let mut nodes = vec![attack::Node {
        name: "A".into(),
        target: ctx.target.clone(),
        pid: g.server_pid,
    }];
    for (i, url) in a.node_urls.iter().enumerate() {
        nodes.push(attack::Node {
            name: ["B", "C", "D", "E"].get(i).unwrap_or(&"N").to_string(),
            target: Target::resolve(url).await?,
            pid: a.node_pids.get(i).copied(),
        });
    }
    Ok(attack::Params {
        scenario,
        duration: Duration::from_secs_f64(a.duration),
        rate: a.bystander_rate,
        login_at: a.login_at.map(Duration::from_secs_f64),
        login_timeout: Duration::from_secs_f64(a.login_timeout),
        nodes,
        log_files: a.log_files.clone(),
        conns: a.conns.map(|c| c as usize),
        flood_rate: a.flood_rate,
        per_source: g.per_source as usize,
        nofile,
    })
}

fn fanout_json(r: Result<fanout::Outcome>) -> Result<(Value, bool)> {
    r.map(|o| (o.json, o.ok))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn cluster_commands_parse_and_check_their_bounds() {
        let cli = Cli::try_parse_from([
            "b",
            "cluster-p2p",
            "--compare",
            "--server-bin",
            "/x/jssocket",
        ])
        .expect("parses");
        match cli.cmd {
            Cmd::ClusterP2p {
                servers,
                compare,
                pairs,
                ..
            } => {
                assert!(compare);
                assert_eq!(pairs, 200);
                assert_eq!(servers.server_bin, std::path::PathBuf::from("/x/jssocket"));
            }
            _ => panic!("wrong command"),
        }
        // Routing needs a group on two nodes besides the sender's; p2p is 1 or 2 nodes; a
        // worker holds at most 16 000 sockets.
        assert!(Cli::try_parse_from(["b", "cluster-route", "--nodes", "2"]).is_err());
        match Cli::try_parse_from(["b", "cluster-route", "--redis-cluster"]).map(|c| c.cmd) {
            Ok(Cmd::ClusterRoute { servers, .. }) => {
                assert!(servers.redis_cluster);
                assert_eq!(servers.redis_cli, std::path::PathBuf::from("redis-cli"));
            }
            _ => panic!("cluster-route --redis-cluster does not parse"),
        }
        assert!(Cli::try_parse_from(["b", "cluster-p2p", "--nodes", "3"]).is_err());
        match Cli::try_parse_from([
            "b",
            "compare",
            "--scenarios",
            "fanout-10k,idle-10k",
            "--server-arg=--max-queue-bytes=1024",
        ])
        .map(|c| c.cmd)
        {
            Ok(Cmd::Compare(c)) => {
                let p = c.params(120.0);
                assert_eq!(
                    p.scenarios,
                    [compare::Scenario::Fanout10k, compare::Scenario::Idle10k]
                );
                assert_eq!(p.server_args, ["--max-queue-bytes=1024"]);
                assert_eq!(p.rounds, 3);
            }
            _ => panic!("compare does not parse"),
        }
        match Cli::try_parse_from(["b", "compare"]).map(|c| c.cmd) {
            Ok(Cmd::Compare(c)) => assert_eq!(c.params(1.0).scenarios.len(), 7),
            _ => panic!("compare does not parse"),
        }
        assert!(Cli::try_parse_from(["b", "cluster-hold", "--per-worker", "16001"]).is_err());
    }
}
