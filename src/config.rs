//! Every option of the server: its flag, its `SOCKET_*` environment variable, its default, and
//! the validation that turns the raw command line into a [`Config`] once, at start.
//!
//! The binary parses [`Cli`]; tests build a [`Config`] with [`Config::from_args`] (the same
//! parser, so a test exercises exactly what a user can type) or [`Config::default`].

use std::ffi::OsString;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::{ArgAction, Args, Parser, Subcommand, ValueEnum};

use crate::auth::{AuthError, PasswordHash};
use crate::jwt::{KeyError, Verifier};
use crate::tls::{Tls, TlsError};

/// The command line. `-h` is the host, as in the original relay, so clap's own `-h` is turned
/// off and help is `--help` only.
#[derive(Debug, Parser)]
#[command(
    name = "jssocket",
    version,
    about = "WebSocket relay server for Jaseci: backends push notifications to browser connections",
    disable_help_flag = true,
    // `jssocket -p 80 check` would check the defaults, not `-p 80`: options go after it.
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    /// Print help.
    #[arg(long, action = ArgAction::Help, global = true)]
    help: Option<bool>,

    #[command(subcommand)]
    pub command: Option<Command>,

    #[command(flatten)]
    pub options: Options,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Read a password (stdin, or a prompt on a terminal) and print the hex bcrypt hash to put
    /// in SOCKET_AUTH.
    Hash,
    /// Validate the configuration and exit, without binding the port or connecting to Redis.
    ///
    /// Every option and SOCKET_* variable is parsed and validated as a start would (key files
    /// read); prints `configuration ok` and a summary line, or the reason and exits 2.
    /// Options go after `check`: `jssocket check -p 8080`.
    #[command(disable_help_flag = true)]
    Check(Box<Options>),
}

/// Who a client (a non-admin connection) may notify; see SPEC §7.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ClientSend {
    /// Any connection id or group, as the original relay.
    Any,
    /// Only itself and its own group.
    Own,
    /// Nobody: only admins notify.
    None,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Switch {
    On,
    Off,
}

/// The raw options as typed. [`Config::from_options`] validates them.
#[derive(Debug, Clone, Args)]
pub struct Options {
    /// Address to listen on.
    #[arg(short = 'h', long, env = "SOCKET_HOST", default_value = "0.0.0.0")]
    pub host: String,

    /// Port to listen on.
    #[arg(short = 'p', long, env = "SOCKET_PORT", default_value_t = 80)]
    pub port: u16,

    /// Admin password hash: hex of a bcrypt hash (as `jssocket hash` prints), or a raw
    /// $2a$/$2b$/$2y$ hash. Unset: the original relay's default (password 12345678).
    #[arg(long, env = "SOCKET_AUTH", hide_env_values = true)]
    pub auth: Option<String>,

    /// Largest inbound message in bytes; one byte more closes the connection with 1009.
    #[arg(long, env = "SOCKET_MAX_MESSAGE_SIZE", default_value_t = 1024 * 1024)]
    pub max_message_size: usize,

    /// Whom acknowledged clients may notify: any id or group, only their own, or none.
    #[arg(long, env = "SOCKET_CLIENT_SEND", value_enum, default_value = "any")]
    pub client_send: ClientSend,

    /// Comma-separated Origins allowed to open a WebSocket (others get 403). Empty: all.
    #[arg(long, env = "SOCKET_ALLOWED_ORIGINS", value_delimiter = ',')]
    pub allowed_origins: Vec<String>,

    /// Log format; the level comes from RUST_LOG (default info).
    #[arg(long, env = "SOCKET_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,

    /// Redis URL (redis://host:port/db): run as one node of a cluster of jssocket nodes. A
    /// comma-separated list of two or more seed nodes names a Redis Cluster (sharded Pub/Sub).
    #[arg(long, env = "SOCKET_REDIS_URL")]
    pub redis_url: Option<String>,

    /// Seconds between keepalive pings.
    #[arg(long, env = "SOCKET_PING_INTERVAL", default_value_t = 20)]
    pub ping_interval: u64,

    /// Seconds to wait for any frame after a ping before closing the connection.
    #[arg(long, env = "SOCKET_PING_TIMEOUT", default_value_t = 20)]
    pub ping_timeout: u64,

    /// Most WebSocket connections at once (503 beyond); 0 means no limit but the OS's.
    #[arg(long, env = "SOCKET_MAX_CONNECTIONS", default_value_t = 0)]
    pub max_connections: usize,

    /// Per-connection outbound queue in bytes; a connection that lets it overflow is closed
    /// with 1008 "slow consumer".
    #[arg(long, env = "SOCKET_MAX_QUEUE_BYTES", default_value_t = 4 * 1024 * 1024)]
    pub max_queue_bytes: usize,

    /// Most client_connect messages queued while no server is connected.
    #[arg(long, env = "SOCKET_PENDING_CONNECTS", default_value_t = 10_000)]
    pub pending_connects: usize,

    /// Seconds a queued client_connect waits for a server before the client gets an error.
    #[arg(long, env = "SOCKET_PENDING_TIMEOUT", default_value_t = 30)]
    pub pending_timeout: u64,

    /// Seconds a client's `invoke` waits for a server's `invoke_result` before the client
    /// gets an error result (a late answer is then dropped).
    #[arg(long, env = "SOCKET_INVOKE_TIMEOUT", default_value_t = 10)]
    pub invoke_timeout: u64,

    /// Bad messages a connection may send per minute before it is closed with 1008.
    #[arg(long, env = "SOCKET_BAD_INPUT_LIMIT", default_value_t = 30)]
    pub bad_input_limit: u32,

    /// Serve the web console at /console.
    #[arg(long, env = "SOCKET_CONSOLE", value_enum, default_value = "on")]
    pub console: Switch,

    /// Require the admin password (`Authorization: Bearer <password>` or `auth:`) for
    /// GET /metrics; 401 without it. Off by default so existing scrapers keep working, but
    /// the counters (auth failures, queue, connections) then let anyone who can reach the
    /// port watch an attack's progress: turn it on when the port is public.
    #[arg(long, env = "SOCKET_METRICS_AUTH", value_enum, default_value = "off")]
    pub metrics_auth: Switch,

    /// Seconds a new connection has to send its HTTP request head.
    #[arg(long, env = "SOCKET_HANDSHAKE_TIMEOUT", default_value_t = 10)]
    pub handshake_timeout: u64,

    /// Largest HTTP request head in bytes (at least 8192).
    #[arg(long, env = "SOCKET_MAX_HEADER_BYTES", default_value_t = 16 * 1024)]
    pub max_header_bytes: usize,

    /// Seconds to wait for connections to close on SIGTERM/SIGINT before exiting anyway.
    #[arg(long, env = "SOCKET_SHUTDOWN_TIMEOUT", default_value_t = 5)]
    pub shutdown_timeout: u64,

    /// Seconds to keep serving after SIGTERM/SIGINT before closing connections: meanwhile
    /// /readyz answers 503 `draining` and new WebSocket connections are refused, so a load
    /// balancer polling /readyz stops sending clients here first. The process exits within
    /// drain delay + shutdown timeout (size Kubernetes' terminationGracePeriodSeconds above it).
    #[arg(long, env = "SOCKET_DRAIN_DELAY", default_value_t = 0)]
    pub drain_delay: u64,

    /// Memory budget for all outbound queues and unfinished inbound messages together, in
    /// bytes or with a K/M/G suffix (512M, 2G). Over it, the biggest consumers are closed.
    /// Default: a quarter of the memory available (cgroup v2 memory.max if set, else
    /// MemTotal), clamped to 64M..2G.
    #[arg(long, env = "SOCKET_MAX_MEMORY", value_parser = crate::memory::parse_bytes)]
    pub max_memory: Option<usize>,

    /// Most open TCP connections of any kind (HTTP, WebSocket). Beyond it a reserve still
    /// serves /healthz, /readyz and admins; past the reserve, connections are closed at once.
    /// 0: derived from the open-file limit.
    #[arg(long, env = "SOCKET_MAX_TCP_CONNECTIONS", default_value_t = 0)]
    pub max_tcp_connections: usize,

    /// Seconds an HTTP connection may wait for its next request (keep-alive) before it is
    /// closed. The first request head gets at most this long too, and at most
    /// --handshake-timeout.
    #[arg(long, env = "SOCKET_HTTP_IDLE_TIMEOUT", default_value_t = 5)]
    pub http_idle_timeout: u64,

    /// Milliseconds of scheduling lag (how late a 10 ms timer fires) over which the server
    /// counts as overloaded: messages from non-admin connections then wait for a global
    /// limiter, so admins and receivers are served first. 0: never.
    #[arg(long, env = "SOCKET_OVERLOAD_LAG", default_value_t = 25)]
    pub overload_lag: u64,

    /// HMAC secret (raw UTF-8) that signs client tokens (JWT, HS256/384/512). With it (or
    /// --jwt-public-key) a client presenting a valid token is acknowledged by the relay
    /// itself, without a backend.
    #[arg(long, env = "SOCKET_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,

    /// PEM file with the public key that signs client tokens (RS*/PS* with an RSA key as
    /// SPKI or PKCS#1, ES256/ES384 with an EC key, EdDSA with an Ed25519 key).
    #[arg(long, env = "SOCKET_JWT_PUBLIC_KEY")]
    pub jwt_public_key: Option<PathBuf>,

    /// Required `iss` of client tokens. Unset: not checked.
    #[arg(long, env = "SOCKET_JWT_ISSUER")]
    pub jwt_issuer: Option<String>,

    /// Required `aud` of client tokens (one of them, when it is an array). Unset: not checked.
    #[arg(long, env = "SOCKET_JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,

    /// The claim naming a token's user (Magic's tokens use unique_name).
    #[arg(long, env = "SOCKET_JWT_USER_CLAIM", default_value = "sub")]
    pub jwt_user_claim: String,
    /// Path of the SignalR endpoint (JSON hub protocol over WebSockets, for Magic-style
    /// frontends): `POST <path>/negotiate` and the WebSocket at `<path>`. `off` disables it.
    #[arg(long, env = "SOCKET_SIGNALR_PATH", default_value = "/sockets")]
    pub signalr_path: String,

    /// The hub method SignalR connections see `notify_client`, `notify_group` and
    /// `notify_all` as (`connection.on('<method>', …)`).
    #[arg(long, env = "SOCKET_SIGNALR_NOTIFY_METHOD", default_value = "notify")]
    pub signalr_notify_method: String,

    /// Seconds between the server's SignalR pings (the protocol's default; for tests).
    #[arg(
        long,
        env = "SOCKET_SIGNALR_KEEPALIVE",
        default_value_t = 15,
        hide = true
    )]
    pub signalr_keepalive: u64,

    /// Seconds a SignalR client may stay silent before it is closed (the protocol's default;
    /// for tests).
    #[arg(
        long,
        env = "SOCKET_SIGNALR_CLIENT_TIMEOUT",
        default_value_t = 30,
        hide = true
    )]
    pub signalr_client_timeout: u64,

    /// Seconds a SignalR client has to send its handshake (the protocol's default; for tests).
    #[arg(
        long,
        env = "SOCKET_SIGNALR_HANDSHAKE_TIMEOUT",
        default_value_t = 15,
        hide = true
    )]
    pub signalr_handshake_timeout: u64,

    /// Channel history (SPEC §13): `<channel or prefix*>=<count>/<age>,…`, e.g.
    /// `orders.*=100/10m`; ages in s, m or h (at most 24h), counts at most 10000. The first
    /// rule that matches a channel applies. Off by default.
    #[arg(long, env = "SOCKET_HISTORY")]
    pub history: Option<String>,

    /// Bytes all channels' history may hold on this node (K/M/G suffixes). Over it a
    /// channel's oldest publications are dropped first.
    #[arg(long, env = "SOCKET_HISTORY_MEMORY", value_parser = crate::memory::parse_bytes, default_value = "64M")]
    pub history_memory: usize,

    /// PEM certificate chain (leaf first) to serve https:// and wss:// on the same port;
    /// needs --tls-key. Re-read when the file changes.
    #[arg(long, env = "SOCKET_TLS_CERT", value_name = "PEM")]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key of --tls-cert (PKCS#8, PKCS#1 or SEC1). Re-read when the file changes.
    #[arg(long, env = "SOCKET_TLS_KEY", value_name = "PEM")]
    pub tls_key: Option<PathBuf>,
}

/// Validated configuration, shared read-only by every task.
#[derive(Debug, Clone)]
pub struct Config {
    pub host: String,
    pub port: u16,
    /// The admin password hash to verify `auth` headers against.
    pub auth: PasswordHash,
    /// True when `auth` is the built-in default, so the server can warn loudly.
    pub auth_is_default: bool,
    pub max_message_size: usize,
    pub client_send: ClientSend,
    /// Empty means every Origin (and none) is allowed.
    pub allowed_origins: Vec<String>,
    pub log_format: LogFormat,
    pub redis_url: Option<String>,
    pub ping_interval: Duration,
    pub ping_timeout: Duration,
    /// `None`: no limit but the OS's.
    pub max_connections: Option<usize>,
    pub max_queue_bytes: usize,
    pub pending_connects: usize,
    pub pending_timeout: Duration,
    pub invoke_timeout: Duration,
    pub bad_input_limit: u32,
    pub console: bool,
    /// GET /metrics needs the admin password.
    pub metrics_auth: bool,
    pub handshake_timeout: Duration,
    pub max_header_bytes: usize,
    pub shutdown_timeout: Duration,
    /// After the shutdown signal, how long to drain (see `server::drain`) before closing.
    pub drain_delay: Duration,
    /// Bytes all outbound queues and partial inbound messages may hold together.
    pub max_memory: usize,
    /// `None`: derived from the open-file limit (see `server::TcpLimits`).
    pub max_tcp_connections: Option<usize>,
    pub http_idle_timeout: Duration,
    /// `None`: the overload limiter never engages.
    pub overload_lag: Option<Duration>,
    /// Judges client tokens; `None` without --jwt-secret and --jwt-public-key, and then no
    /// token is looked at (SPEC §11).
    pub jwt: Option<Arc<Verifier>>,
    /// The SignalR endpoint's path (no trailing slash); `None`: disabled.
    pub signalr_path: Option<String>,
    pub signalr_notify_method: String,
    pub signalr_keepalive: Duration,
    pub signalr_client_timeout: Duration,
    pub signalr_handshake_timeout: Duration,
    /// `--history`'s rules; empty: no channel has history.
    pub history: Vec<crate::history::Rule>,
    pub history_memory: usize,
    /// `--tls-cert`/`--tls-key`, read and checked; `None`: plain TCP.
    pub tls: Option<Arc<Tls>>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{0}")]
    Args(String),
    #[error("SOCKET_AUTH: {0}")]
    Auth(#[from] AuthError),
    #[error("{0} must be greater than 0")]
    Zero(&'static str),
    #[error("--max-header-bytes must be at least 8192")]
    HeaderBytes,
    #[error("--redis-url: {0}")]
    RedisUrl(String),
    #[error("{0}")]
    Jwt(#[from] KeyError),
    #[error("--jwt-public-key {0}: {1}")]
    JwtKeyFile(String, String),
    #[error("--jwt-issuer and --jwt-audience need --jwt-secret or --jwt-public-key")]
    JwtWithoutKey,
    #[error("--signalr-path: {0}")]
    SignalrPath(&'static str),
    #[error("--signalr-notify-method must be 1 to 128 characters")]
    NotifyMethod,
    #[error("--history: {0}")]
    History(String),
    #[error("{0} needs {1} (TLS takes a certificate and its key)")]
    TlsPair(&'static str, &'static str),
    #[error("{0}")]
    Tls(#[from] TlsError),
}

impl Config {
    /// Parse a command line (first item is the program name) exactly as the binary does,
    /// environment variables included, and validate it.
    pub fn from_args<I, T>(args: I) -> Result<Config, ConfigError>
    where
        I: IntoIterator<Item = T>,
        T: Into<OsString> + Clone,
    {
        let cli = Cli::try_parse_from(args).map_err(|e| ConfigError::Args(first_line(&e)))?;
        Config::from_options(cli.options)
    }

    pub fn from_options(o: Options) -> Result<Config, ConfigError> {
        let (auth, auth_is_default) = match o.auth.as_deref() {
            None => (PasswordHash::default_hash(), true),
            Some(text) => (PasswordHash::parse(text)?, false),
        };
        for (name, value) in [
            ("--max-message-size", o.max_message_size as u64),
            ("--ping-interval", o.ping_interval),
            ("--ping-timeout", o.ping_timeout),
            ("--max-queue-bytes", o.max_queue_bytes as u64),
            ("--pending-timeout", o.pending_timeout),
            ("--invoke-timeout", o.invoke_timeout),
            ("--bad-input-limit", u64::from(o.bad_input_limit)),
            ("--handshake-timeout", o.handshake_timeout),
            ("--max-memory", o.max_memory.unwrap_or(1) as u64),
            ("--http-idle-timeout", o.http_idle_timeout),
            ("--signalr-keepalive", o.signalr_keepalive),
            ("--signalr-client-timeout", o.signalr_client_timeout),
            ("--signalr-handshake-timeout", o.signalr_handshake_timeout),
            ("--history-memory", o.history_memory as u64),
        ] {
            if value == 0 {
                return Err(ConfigError::Zero(name));
            }
        }
        if o.max_header_bytes < 8192 {
            return Err(ConfigError::HeaderBytes);
        }
        if let Some(url) = &o.redis_url {
            // The URL shown redacted: the error goes to the terminal and the service's logs.
            crate::cluster::redis::transport(url).map_err(|e| {
                let shown = crate::cluster::redis::redacted(url);
                let mut error = e.to_string();
                for secret in crate::cluster::redis::secrets(url) {
                    error = error.replace(&secret, "***");
                }
                ConfigError::RedisUrl(format!(
                    "{shown}: {error} (expected redis://[[user]:password@]host[:port][/db], or \
                     a comma-separated list of Redis Cluster nodes)"
                ))
            })?;
        }
        let jwt = jwt_verifier(&o)?;
        let signalr_path = signalr_path(&o.signalr_path)?;
        if o.signalr_notify_method.is_empty() || o.signalr_notify_method.chars().count() > 128 {
            return Err(ConfigError::NotifyMethod);
        }
        let history = match o.history.as_deref().map(str::trim) {
            None | Some("") => Vec::new(),
            Some(text) => crate::history::parse_rules(text).map_err(ConfigError::History)?,
        };
        let tls = match (o.tls_cert, o.tls_key) {
            (None, None) => None,
            (Some(_), None) => return Err(ConfigError::TlsPair("--tls-cert", "--tls-key")),
            (None, Some(_)) => return Err(ConfigError::TlsPair("--tls-key", "--tls-cert")),
            (Some(cert), Some(key)) => Some(Arc::new(Tls::load(cert, key)?)),
        };
        let allowed_origins = o
            .allowed_origins
            .iter()
            .map(|s| s.trim().trim_end_matches('/').to_ascii_lowercase())
            .filter(|s| !s.is_empty())
            .collect();
        Ok(Config {
            host: o.host,
            port: o.port,
            auth,
            auth_is_default,
            max_message_size: o.max_message_size,
            client_send: o.client_send,
            allowed_origins,
            log_format: o.log_format,
            redis_url: o.redis_url,
            ping_interval: Duration::from_secs(o.ping_interval),
            ping_timeout: Duration::from_secs(o.ping_timeout),
            max_connections: (o.max_connections > 0).then_some(o.max_connections),
            max_queue_bytes: o.max_queue_bytes,
            pending_connects: o.pending_connects,
            pending_timeout: Duration::from_secs(o.pending_timeout),
            invoke_timeout: Duration::from_secs(o.invoke_timeout),
            bad_input_limit: o.bad_input_limit,
            console: o.console == Switch::On,
            metrics_auth: o.metrics_auth == Switch::On,
            handshake_timeout: Duration::from_secs(o.handshake_timeout),
            max_header_bytes: o.max_header_bytes,
            shutdown_timeout: Duration::from_secs(o.shutdown_timeout),
            drain_delay: Duration::from_secs(o.drain_delay),
            max_memory: o.max_memory.unwrap_or_else(crate::memory::default_budget),
            max_tcp_connections: (o.max_tcp_connections > 0).then_some(o.max_tcp_connections),
            http_idle_timeout: Duration::from_secs(o.http_idle_timeout),
            overload_lag: (o.overload_lag > 0).then(|| Duration::from_millis(o.overload_lag)),
            jwt,
            signalr_path,
            signalr_notify_method: o.signalr_notify_method,
            signalr_keepalive: Duration::from_secs(o.signalr_keepalive),
            signalr_client_timeout: Duration::from_secs(o.signalr_client_timeout),
            signalr_handshake_timeout: Duration::from_secs(o.signalr_handshake_timeout),
            history,
            history_memory: o.history_memory,
            tls,
        })
    }
}

impl Default for Config {
    /// Every option at its default, ignoring the environment; for tests and embedding.
    fn default() -> Config {
        let options = Options {
            host: "127.0.0.1".into(),
            port: 0,
            auth: None,
            max_message_size: 1024 * 1024,
            client_send: ClientSend::Any,
            allowed_origins: Vec::new(),
            log_format: LogFormat::Text,
            redis_url: None,
            ping_interval: 20,
            ping_timeout: 20,
            max_connections: 0,
            max_queue_bytes: 4 * 1024 * 1024,
            pending_connects: 10_000,
            pending_timeout: 30,
            invoke_timeout: 10,
            bad_input_limit: 30,
            console: Switch::On,
            metrics_auth: Switch::Off,
            handshake_timeout: 10,
            max_header_bytes: 16 * 1024,
            shutdown_timeout: 5,
            drain_delay: 0,
            max_memory: None,
            max_tcp_connections: 0,
            http_idle_timeout: 5,
            overload_lag: 25,
            jwt_secret: None,
            jwt_public_key: None,
            jwt_issuer: None,
            jwt_audience: None,
            jwt_user_claim: "sub".into(),
            signalr_path: "/sockets".into(),
            signalr_notify_method: "notify".into(),
            signalr_keepalive: 15,
            signalr_client_timeout: 30,
            signalr_handshake_timeout: 15,
            history: None,
            history_memory: crate::history::DEFAULT_BUDGET,
            tls_cert: None,
            tls_key: None,
        };
        match Config::from_options(options) {
            Ok(config) => config,
            // The defaults above are constants that pass validation.
            Err(e) => unreachable!("default configuration is invalid: {e}"),
        }
    }
}

/// The token verifier the `--jwt-*` options describe, the public key file read now (a wrong
/// path or key stops the start, not the first client).
fn jwt_verifier(o: &Options) -> Result<Option<Arc<Verifier>>, ConfigError> {
    if o.jwt_secret.is_none() && o.jwt_public_key.is_none() {
        if o.jwt_issuer.is_some() || o.jwt_audience.is_some() {
            return Err(ConfigError::JwtWithoutKey);
        }
        return Ok(None);
    }
    let pem = match &o.jwt_public_key {
        Some(path) => Some(
            std::fs::read(path)
                .map_err(|e| ConfigError::JwtKeyFile(path.display().to_string(), e.to_string()))?,
        ),
        None => None,
    };
    let verifier = Verifier::new(
        o.jwt_secret.as_deref(),
        pem.as_deref(),
        o.jwt_issuer.clone(),
        o.jwt_audience.clone(),
        o.jwt_user_claim.clone(),
    )?;
    Ok(Some(Arc::new(verifier)))
}

/// `--signalr-path`: `off`, or an absolute path of plain characters that is not one of the
/// HTTP routes (it becomes an axum route, `<path>/negotiate`, so `{`, `}` and `*` are out).
fn signalr_path(path: &str) -> Result<Option<String>, ConfigError> {
    if path == "off" {
        return Ok(None);
    }
    let path = path.trim_end_matches('/');
    if !path.starts_with('/') {
        return Err(ConfigError::SignalrPath(
            "must start with / (or be off), e.g. /sockets",
        ));
    }
    if path.len() > 256
        || !path
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/-_.~".contains(&b))
        || path.contains("//")
    {
        return Err(ConfigError::SignalrPath(
            "at most 256 characters: letters, digits, / - _ . ~",
        ));
    }
    let taken = ["/healthz", "/readyz", "/metrics", "/console", "/api"];
    if taken
        .iter()
        .any(|t| path == *t || path.starts_with(&format!("{t}/")))
    {
        return Err(ConfigError::SignalrPath(
            "is one of the server's HTTP routes (/healthz, /readyz, /metrics, /console, /api)",
        ));
    }
    Ok(Some(path.to_string()))
}

/// What a start says about itself in its first log line, and `jssocket check` prints: the
/// facts an operator checks first when something is off (which build, where, who may act as
/// a backend, which cluster, where the console is).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    pub version: &'static str,
    /// The listen address: the bound one at start, the configured one in `check`.
    pub addr: String,
    /// `password`, `default password`, with `+jwt` when client tokens are verified.
    pub auth: String,
    /// `standalone`, `redis` or `redis-cluster`.
    pub cluster: &'static str,
    /// `--redis-url` with its password redacted; `None` standalone.
    pub redis_url: Option<String>,
    /// `http://<addr>/console` (`https` with TLS), or `off`.
    pub console: String,
}

impl Summary {
    pub fn new(config: &Config, addr: &str) -> Summary {
        let mut auth = if config.auth_is_default {
            "default password".to_string()
        } else {
            "password".to_string()
        };
        if config.jwt.is_some() {
            auth.push_str("+jwt");
        }
        let seeds = config.redis_url.as_deref().map_or(0, |url| {
            url.split(',').filter(|u| !u.trim().is_empty()).count()
        });
        let cluster = match seeds {
            0 => "standalone",
            1 => "redis",
            _ => "redis-cluster",
        };
        Summary {
            version: env!("CARGO_PKG_VERSION"),
            addr: addr.to_string(),
            auth,
            cluster,
            redis_url: config
                .redis_url
                .as_deref()
                .map(crate::cluster::redis::redacted),
            console: if config.console {
                let scheme = if config.tls.is_some() {
                    "https"
                } else {
                    "http"
                };
                format!("{scheme}://{addr}/console")
            } else {
                "off".to_string()
            },
        }
    }
}

impl std::fmt::Display for Summary {
    /// `version=… addr=… auth=… cluster=… [redis_url=…] console=…`, as the log line's fields.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "version={} addr={} auth={:?} cluster={}",
            self.version, self.addr, self.auth, self.cluster
        )?;
        if let Some(url) = &self.redis_url {
            write!(f, " redis_url={url}")?;
        }
        write!(f, " console={}", self.console)
    }
}

/// clap renders an error over several lines (usage, a hint); users get the reason alone.
pub fn first_line(e: &clap::Error) -> String {
    let text = e.to_string();
    text.lines()
        .next()
        .unwrap_or("invalid arguments")
        .trim()
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redact_url_hides_passwords_only() {
        for (url, redacted) in [
            ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
            ("redis://:secret@h:6379/0", "redis://:***@h:6379/0"),
            ("redis://user:secret@h", "redis://user:***@h"),
            ("rediss://user:p%40ss@h:6380", "rediss://user:***@h:6380"),
            ("redis://secret@h/1", "redis://***@h/1"),
            ("redis://u:a@b@h/1", "redis://u:***@h/1"),
            (
                "redis+unix:///run/redis.sock?db=1&pass=secret",
                "redis+unix:///run/redis.sock?db=1&pass=***",
            ),
            ("unix:///s?password=x", "unix:///s?password=***"),
            (
                "redis://:a@n1:7000,redis://:b@n2:7001",
                "redis://:***@n1:7000,redis://:***@n2:7001",
            ),
            ("", ""),
        ] {
            assert_eq!(crate::cluster::redis::redacted(url), redacted, "{url}");
        }
    }

    #[test]
    fn summary_names_auth_cluster_and_console() {
        let config = Config::default();
        let summary = Summary::new(&config, "127.0.0.1:8080");
        assert_eq!(
            summary.to_string(),
            format!(
                "version={} addr=127.0.0.1:8080 auth=\"default password\" cluster=standalone \
                 console=http://127.0.0.1:8080/console",
                env!("CARGO_PKG_VERSION")
            )
        );
        let config = Config::from_args([
            "jssocket",
            "--redis-url",
            "redis://:pw@a:1,redis://:pw@b:2",
            "--console",
            "off",
            "--jwt-secret",
            "k",
        ])
        .unwrap();
        let summary = Summary::new(&config, "x:1");
        assert_eq!(summary.cluster, "redis-cluster");
        assert_eq!(
            summary.redis_url.as_deref(),
            Some("redis://:***@a:1,redis://:***@b:2")
        );
        assert_eq!(summary.auth, "default password+jwt");
        assert_eq!(summary.console, "off");
    }
}
