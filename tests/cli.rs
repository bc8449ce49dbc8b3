//! Tests of the built binary, as a user or an init system runs it: flags and `SOCKET_*`
//! variables, `--help`, `jssocket hash`, `SOCKET_AUTH` checks, the HTTP routes on a real port,
//! and SIGTERM. Every child process runs under a guard that kills it when the test ends, and
//! every wait has a deadline, so a hung binary fails a test instead of hanging the suite.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream as TokioTcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

mod common;

const BIN: &str = env!("CARGO_BIN_EXE_jssocket");
/// How long a command that should exit by itself (`--help`, a refused start) may run.
const EXIT_DEADLINE: Duration = Duration::from_secs(10);
/// How long a server may take to accept its first TCP connection.
const START_DEADLINE: Duration = Duration::from_secs(10);
/// How long any single WebSocket exchange may take (bcrypt in a debug build included).
const WS_DEADLINE: Duration = Duration::from_secs(10);
/// The bound SPEC §6 puts on shutdown, as the test checks it.
const SHUTDOWN_DEADLINE: Duration = Duration::from_secs(5);

/// The original relay's default hash (password `12345678`) in raw `$2b$` form, to check that
/// `SOCKET_AUTH` accepts a raw hash as well as the hex of one.
const RAW_HASH_12345678: &str = "$2b$12$h.kWoWbqMCtV3QlUNUsdRevABi7SG0CxKWK5Zs03uqY284yl7WBZq";

type Ws = WebSocketStream<MaybeTlsStream<TokioTcpStream>>;

// ---------------------------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------------------------

/// The binary with a clean environment: no `SOCKET_*` variable leaks in from the shell running
/// the tests, logs are plain text at `info`.
fn jssocket() -> Command {
    let mut cmd = Command::new(BIN);
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("SOCKET_") {
            cmd.env_remove(&name);
        }
    }
    cmd.env("RUST_LOG", "info").env("NO_COLOR", "1");
    cmd.stdin(Stdio::null());
    cmd
}

/// A port nobody listens on right now: bind port 0, read what the OS chose, let it go.
fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local_addr").port()
}

/// A child process that is killed when the guard drops, with its stdout and stderr collected
/// in the background (tracing writes to stdout, errors go to stderr).
struct Proc {
    child: Child,
    stdout: Arc<Mutex<String>>,
    stderr: Arc<Mutex<String>>,
    readers: Vec<thread::JoinHandle<()>>,
}

impl Proc {
    fn spawn(mut cmd: Command, stdin: Option<&[u8]>) -> Proc {
        if stdin.is_some() {
            cmd.stdin(Stdio::piped());
        }
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn jssocket");
        if let Some(input) = stdin {
            // Dropping the handle closes the pipe: the child sees end of input. A child that
            // exits without reading (a refused start) breaks the pipe; its exit status tells.
            let mut pipe = child.stdin.take().expect("stdin pipe");
            let _ = pipe.write_all(input);
        }
        let stdout = Arc::new(Mutex::new(String::new()));
        let stderr = Arc::new(Mutex::new(String::new()));
        let readers = vec![
            collect(
                child.stdout.take().expect("stdout pipe"),
                Arc::clone(&stdout),
            ),
            collect(
                child.stderr.take().expect("stderr pipe"),
                Arc::clone(&stderr),
            ),
        ];
        Proc {
            child,
            stdout,
            stderr,
            readers,
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn stdout(&self) -> String {
        self.stdout.lock().expect("stdout lock").clone()
    }

    fn stderr(&self) -> String {
        self.stderr.lock().expect("stderr lock").clone()
    }

    /// Everything the process printed so far, for assertion messages.
    fn output(&self) -> String {
        format!(
            "--- stdout ---\n{}--- stderr ---\n{}",
            self.stdout(),
            self.stderr()
        )
    }

    /// Waits for the process to exit by itself; `None` if it is still running at `deadline`.
    fn wait_for_exit(&mut self, deadline: Duration) -> Option<ExitStatus> {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                // The pipes close with the process: let the readers take the last bytes.
                for reader in self.readers.drain(..) {
                    let _ = reader.join();
                }
                return Some(status);
            }
            if start.elapsed() > deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until `needle` appears in stdout or stderr.
    fn wait_for_output(&mut self, needle: &str, deadline: Duration) -> bool {
        let start = Instant::now();
        while start.elapsed() < deadline {
            if self.stdout().contains(needle) || self.stderr().contains(needle) {
                return true;
            }
            if self.child.try_wait().expect("try_wait").is_some() {
                let _ = self.wait_for_exit(Duration::ZERO);
                return self.stdout().contains(needle) || self.stderr().contains(needle);
            }
            thread::sleep(Duration::from_millis(20));
        }
        false
    }

    fn signal(&self, signal: &str) {
        // The shell's builtin `kill`, so the test needs neither procps nor a libc binding.
        let status = Command::new("sh")
            .args([
                "-c",
                "kill -s \"$1\" \"$2\"",
                "sh",
                signal,
                &self.pid().to_string(),
            ])
            .status()
            .expect("run sh -c kill");
        assert!(status.success(), "kill -s {signal} {} failed", self.pid());
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn collect(
    mut pipe: impl Read + Send + 'static,
    into: Arc<Mutex<String>>,
) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        let mut buf = [0u8; 4096];
        loop {
            match pipe.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => into
                    .lock()
                    .expect("output lock")
                    .push_str(&String::from_utf8_lossy(&buf[..n])),
            }
        }
    })
}

/// What a command that exits by itself printed, and how it exited.
struct Finished {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

/// Runs the binary with `args` (and optional stdin) and waits for it to exit.
fn run(mut cmd: Command, args: &[&str], stdin: Option<&[u8]>) -> Finished {
    cmd.args(args);
    let mut proc = Proc::spawn(cmd, stdin);
    let status = proc
        .wait_for_exit(EXIT_DEADLINE)
        .unwrap_or_else(|| panic!("jssocket {args:?} did not exit in time\n{}", proc.output()));
    Finished {
        status,
        stdout: proc.stdout(),
        stderr: proc.stderr(),
    }
}

/// Asserts the start was refused: non-zero exit, nothing on stdout, exactly one line on
/// stderr. Returns that line.
fn assert_refused(finished: &Finished, what: &str) -> String {
    assert!(
        !finished.status.success(),
        "{what}: expected a non-zero exit, got {:?}\nstdout: {}\nstderr: {}",
        finished.status,
        finished.stdout,
        finished.stderr
    );
    assert!(
        finished.stdout.trim().is_empty(),
        "{what}: expected nothing on stdout, got: {}",
        finished.stdout
    );
    let lines: Vec<&str> = finished.stderr.trim_end().lines().collect();
    assert_eq!(
        lines.len(),
        1,
        "{what}: expected one line on stderr, got: {:?}",
        finished.stderr
    );
    assert!(!lines[0].trim().is_empty(), "{what}: the reason is blank");
    lines[0].to_string()
}

/// A server started from the binary on a free port of 127.0.0.1, killed when dropped.
struct Server {
    proc: Proc,
    port: u16,
}

impl Server {
    /// `jssocket -h 127.0.0.1 -p <free port>` with extra `env`, once it accepts connections.
    fn start(env: &[(&str, &str)]) -> Server {
        let port = free_port();
        let mut cmd = jssocket();
        cmd.args(["-h", "127.0.0.1", "-p", &port.to_string()]);
        cmd.envs(env.iter().copied());
        Server::start_with(cmd, port)
    }

    /// Starts `cmd`, which must make the server listen on 127.0.0.1:`port`.
    fn start_with(cmd: Command, port: u16) -> Server {
        let mut proc = Proc::spawn(cmd, None);
        let start = Instant::now();
        loop {
            if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Server { proc, port };
            }
            if let Some(status) = proc.wait_for_exit(Duration::ZERO) {
                panic!(
                    "jssocket exited at start with {status:?}\n{}",
                    proc.output()
                );
            }
            assert!(
                start.elapsed() < START_DEADLINE,
                "jssocket did not listen on port {port} in time\n{}",
                proc.output()
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    fn url(&self, path: &str) -> String {
        format!("ws://127.0.0.1:{}{path}", self.port)
    }

    /// `GET path` on this server through the tests' HTTP client; the status and the body.
    async fn get(&self, path: &str) -> (u16, String) {
        let response = common::http(self.addr(), "GET", path, &[], b"").await;
        (response.status, response.text())
    }

    fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// Opens a WebSocket on `/ws`, with an `auth` header when `password` is given.
    async fn connect(&self, password: Option<&str>) -> Ws {
        let mut request = self.url("/ws").into_client_request().expect("request");
        if let Some(password) = password {
            request
                .headers_mut()
                .insert("auth", password.parse().expect("header value"));
        }
        let (ws, _) = tokio::time::timeout(WS_DEADLINE, tokio_tungstenite::connect_async(request))
            .await
            .expect("WebSocket handshake timed out")
            .expect("WebSocket handshake failed");
        ws
    }

    /// Connects with `auth: password` and sends `server_connect`; returns the reply's text.
    async fn server_connect_reply(&self, password: &str) -> String {
        let mut ws = self.connect(Some(password)).await;
        send(&mut ws, r#"{"type":"server_connect"}"#).await;
        match try_next_frame(&mut ws).await {
            Ok(Some(Message::Text(reply))) => reply.to_string(),
            Ok(other) => panic!("expected a text reply to server_connect, got {other:?}"),
            Err(_) => panic!(
                "no reply to server_connect (auth: {password:?}) within {WS_DEADLINE:?}\n{}",
                self.proc.output()
            ),
        }
    }
}

async fn send(ws: &mut Ws, text: &str) {
    tokio::time::timeout(WS_DEADLINE, ws.send(Message::text(text)))
        .await
        .expect("send timed out")
        .expect("send failed");
}

/// The next frame that carries data or a close, skipping pings and pongs; `Err` when none
/// came within [`WS_DEADLINE`], `Ok(None)` when the connection ended without a close frame.
async fn try_next_frame(ws: &mut Ws) -> Result<Option<Message>, tokio::time::error::Elapsed> {
    tokio::time::timeout(WS_DEADLINE, async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                Some(Ok(message)) => return Some(message),
                Some(Err(_)) | None => return None,
            }
        }
    })
    .await
}

async fn next_frame(ws: &mut Ws) -> Option<Message> {
    try_next_frame(ws)
        .await
        .unwrap_or_else(|_| panic!("no frame from the server within {WS_DEADLINE:?}"))
}

async fn next_text(ws: &mut Ws) -> String {
    match next_frame(ws).await {
        Some(Message::Text(text)) => text.to_string(),
        other => panic!("expected a text frame, got {other:?}"),
    }
}

/// Reads until the server's close frame and returns its code.
async fn close_code(ws: &mut Ws) -> Option<CloseCode> {
    loop {
        match next_frame(ws).await {
            Some(Message::Close(frame)) => return frame.map(|f| f.code),
            Some(_) => continue,
            None => return None,
        }
    }
}

/// `jssocket hash` with `input` on stdin; returns the hex it printed.
fn hash(input: &[u8]) -> String {
    let finished = run(jssocket(), &["hash"], Some(input));
    assert!(
        finished.status.success(),
        "jssocket hash failed: {:?}\n{}",
        finished.status,
        finished.stderr
    );
    let hex = finished.stdout.trim().to_string();
    assert!(
        !hex.is_empty() && hex.bytes().all(|b| b.is_ascii_hexdigit()),
        "jssocket hash printed no hex string: {:?}",
        finished.stdout
    );
    hex
}

// ---------------------------------------------------------------------------------------------
// --help, --version and refused command lines
// ---------------------------------------------------------------------------------------------

/// Splits `--help` into one block per option: the line naming it and its description.
fn help_blocks(help: &str) -> Vec<(String, String)> {
    let mut blocks: Vec<(String, String)> = Vec::new();
    for line in help.lines() {
        let trimmed = line.trim_start();
        let long = trimmed
            .split([',', ' '])
            .find(|word| word.starts_with("--"))
            .filter(|_| trimmed.starts_with('-'));
        match long {
            Some(long) => blocks.push((long.trim_start_matches("--").to_string(), String::new())),
            None => {
                if let Some((_, text)) = blocks.last_mut() {
                    text.push_str(line);
                    text.push('\n');
                }
            }
        }
    }
    blocks
}

#[test]
fn help_lists_every_option_with_its_env_var() {
    let finished = run(jssocket(), &["--help"], None);
    assert!(
        finished.status.success(),
        "--help failed: {}",
        finished.stderr
    );
    let help = finished.stdout;
    assert!(
        help.contains("-h, --host"),
        "--help does not show `-h, --host`:\n{help}"
    );
    assert!(
        help.contains("-p, --port"),
        "--help does not show `-p, --port`:\n{help}"
    );
    assert!(
        help.contains("hash"),
        "--help does not mention the hash command:\n{help}"
    );

    let blocks = help_blocks(&help);
    let listed: BTreeSet<&str> = blocks.iter().map(|(name, _)| name.as_str()).collect();
    // SPEC §2 and §3 name these; every one must be offered.
    for name in [
        "host",
        "port",
        "auth",
        "max-message-size",
        "client-send",
        "allowed-origins",
        "log-format",
        "redis-url",
        "ping-interval",
        "ping-timeout",
        "max-connections",
        "max-queue-bytes",
        "pending-connects",
        "pending-timeout",
        "bad-input-limit",
        "console",
    ] {
        assert!(
            listed.contains(name),
            "--help does not list --{name}:\n{help}"
        );
    }
    // Every option, named in the spec or not, shows its SOCKET_* variable.
    for (name, text) in &blocks {
        if name == "help" || name == "version" {
            continue;
        }
        let env = format!("[env: SOCKET_{}", name.to_uppercase().replace('-', "_"));
        assert!(
            text.contains(&env),
            "--help: --{name} does not show {env}]:\n{text}"
        );
    }
}

/// Asserts a refused command line: exit status 2, nothing on stdout, and on stderr exactly
/// `expected` (the reason, then clap's hints, two spaces in; no usage, no blank line).
fn assert_refused_with(finished: &Finished, what: &str, expected: &[&str]) {
    assert_eq!(
        finished.status.code(),
        Some(2),
        "{what}: exit status\nstdout: {}\nstderr: {}",
        finished.stdout,
        finished.stderr
    );
    assert!(
        finished.stdout.is_empty(),
        "{what}: expected nothing on stdout, got: {}",
        finished.stdout
    );
    let lines: Vec<&str> = finished.stderr.lines().collect();
    assert_eq!(lines, expected, "{what}: stderr");
}

#[test]
fn short_h_is_the_host_not_help() {
    // `-h` needs a value: alone, it is an error rather than help, and says so.
    assert_refused_with(
        &run(jssocket(), &["-h"], None),
        "-h without a value",
        &[
            "error: a value is required for '--host <HOST>' but none was supplied",
            "  tip: `-h` is the host; help is `--help`",
        ],
    );
}

/// clap's hints survive the one-line reason: the valid values, the flag meant.
#[test]
fn refused_flags_keep_clap_hints() {
    assert_refused_with(
        &run(jssocket(), &["--client-send", "bogus"], None),
        "--client-send bogus",
        &[
            "error: invalid value 'bogus' for '--client-send <CLIENT_SEND>'",
            "  [possible values: any, own, none]",
        ],
    );
    assert_refused_with(
        &run(jssocket(), &["--prot", "1"], None),
        "--prot 1",
        &[
            "error: unexpected argument '--prot' found",
            "  tip: a similar argument exists: '--port'",
        ],
    );
    assert_refused_with(
        &run(jssocket(), &["--console", "maybe"], None),
        "--console maybe",
        &[
            "error: invalid value 'maybe' for '--console <CONSOLE>'",
            "  [possible values: on, off]",
        ],
    );
    // From the environment: the variable is named, the hint kept.
    let mut cmd = jssocket();
    cmd.env("SOCKET_LOG_FORMAT", "xml");
    assert_refused_with(
        &run(cmd, &[], None),
        "SOCKET_LOG_FORMAT=xml",
        &[
            "error: invalid value 'xml' for '--log-format <LOG_FORMAT>' (from SOCKET_LOG_FORMAT)",
            "  [possible values: text, json]",
        ],
    );
}

#[test]
fn hash_help_shows_help_for_hash() {
    let finished = run(jssocket(), &["hash", "--help"], None);
    assert!(
        finished.status.success(),
        "hash --help: {}",
        finished.stderr
    );
    assert!(
        finished.stdout.contains("Usage: jssocket hash") && finished.stdout.contains("bcrypt"),
        "hash --help:\n{}",
        finished.stdout
    );
}

#[test]
fn hash_with_extra_arguments_is_refused() {
    assert_refused_with(
        &run(jssocket(), &["hash", "extra"], Some(b"pw")),
        "hash extra",
        &["error: unexpected argument 'extra' found"],
    );
}

/// `hash` reads none of the server's options: a bad SOCKET_* in the shell does not stop it.
#[test]
fn hash_ignores_bad_server_environment() {
    let mut cmd = jssocket();
    cmd.env("SOCKET_PORT", "abc").env("SOCKET_AUTH", "nothex");
    let finished = run(cmd, &["hash"], Some(b"pw\n"));
    assert!(
        finished.status.success(),
        "SOCKET_PORT=abc jssocket hash: {:?}\n{}",
        finished.status,
        finished.stderr
    );
    assert!(
        finished
            .stdout
            .trim()
            .bytes()
            .all(|b| b.is_ascii_hexdigit())
            && finished.stdout.trim().len() == 120,
        "not the hex of a bcrypt hash: {:?}",
        finished.stdout
    );
}

// ---------------------------------------------------------------------------------------------
// jssocket check
// ---------------------------------------------------------------------------------------------

/// `check` validates and summarises without binding (the port may be taken) or connecting
/// to Redis (nothing listens at the URL), and hides the URL's password.
#[test]
fn check_prints_ok_and_the_summary_without_binding_or_connecting() {
    let taken = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = taken.local_addr().expect("local_addr").port();
    let redis_port = free_port();
    let redis = format!("redis://:secret@127.0.0.1:{redis_port}/0");
    let mut cmd = jssocket();
    cmd.env("SOCKET_AUTH", RAW_HASH_12345678);
    let finished = run(
        cmd,
        &[
            "check",
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "--redis-url",
            &redis,
            "--jwt-secret",
            "k",
        ],
        None,
    );
    assert_eq!(finished.status.code(), Some(0), "{}", finished.stderr);
    assert_eq!(
        finished.stdout.lines().collect::<Vec<_>>(),
        [
            "configuration ok".to_string(),
            format!(
                "version={} addr=127.0.0.1:{port} auth=\"password+jwt\" cluster=redis \
                 redis_url=redis://:***@127.0.0.1:{redis_port}/0 \
                 console=http://127.0.0.1:{port}/console",
                env!("CARGO_PKG_VERSION"),
            )
        ]
    );
    assert!(finished.stderr.is_empty(), "{}", finished.stderr);
}

#[test]
fn check_refuses_a_bad_configuration_in_one_line() {
    assert_refused_with(
        &run(
            jssocket(),
            &["check", "--jwt-public-key", "/nonexistent/key.pem"],
            None,
        ),
        "check with a missing key file",
        &["error: --jwt-public-key /nonexistent/key.pem: No such file or directory (os error 2)"],
    );
    let mut cmd = jssocket();
    cmd.env("SOCKET_PORT", "abc");
    assert_refused_with(
        &run(cmd, &["check"], None),
        "SOCKET_PORT=abc check",
        &[
            "error: invalid value 'abc' for '--port <PORT>': invalid digit found in string (from SOCKET_PORT)",
        ],
    );
    assert_refused_with(
        &run(jssocket(), &["-p", "1", "check"], None),
        "-p 1 check",
        &[
            "error: the subcommand 'check' cannot be used with '--port <PORT>'",
            "  tip: options go after `check`: `jssocket check -p 8080`",
        ],
    );
}

// ---------------------------------------------------------------------------------------------
// The first log line of a start
// ---------------------------------------------------------------------------------------------

/// The first thing a start logs is its summary, with the bound address and the Redis
/// password redacted; the default password's warning and the rest come after.
#[test]
fn first_log_line_summarises_the_start() {
    let port = free_port();
    let redis_port = free_port();
    let mut cmd = jssocket();
    cmd.args(["-h", "127.0.0.1", "-p", &port.to_string(), "--redis-url"])
        .arg(format!("redis://:secret@127.0.0.1:{redis_port}/0"));
    let mut server = Server::start_with(cmd, port);
    assert!(
        server.proc.wait_for_output("listening", START_DEADLINE),
        "{}",
        server.proc.output()
    );
    let stdout = server.proc.stdout();
    let first = stdout.lines().next().unwrap_or_default();
    let expected = format!(
        "INFO jssocket::server: jssocket started version={} addr=127.0.0.1:{port} \
         auth=\"default password\" cluster=redis redis_url=redis://:***@127.0.0.1:{redis_port}/0 \
         console=http://127.0.0.1:{port}/console",
        env!("CARGO_PKG_VERSION")
    );
    assert!(
        first.ends_with(&expected),
        "first line:\n{first}\nexpected it to end with:\n{expected}"
    );
    assert!(
        !server.proc.output().contains("secret"),
        "the Redis password is logged:\n{}",
        server.proc.output()
    );
    assert!(
        !stdout.contains("open file limit"),
        "the open file limit is logged at info:\n{stdout}"
    );
}

// ---------------------------------------------------------------------------------------------
// Bind errors
// ---------------------------------------------------------------------------------------------

/// Port 80 as a non-root user: one line saying what to do. Tests run as root here, so the
/// binary is run as `nobody` through util-linux's `setpriv`.
#[test]
fn privileged_port_without_permission_says_what_to_do() {
    let setpriv = ["/usr/bin/setpriv", "/bin/setpriv"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .expect("setpriv not found: install util-linux (apt-get install util-linux)");
    let unprivileged_start =
        std::fs::read_to_string("/proc/sys/net/ipv4/ip_unprivileged_port_start")
            .ok()
            .and_then(|s| s.trim().parse::<u16>().ok())
            .unwrap_or(1024);
    assert!(
        unprivileged_start > 80,
        "net.ipv4.ip_unprivileged_port_start is {unprivileged_start}: anyone may bind port 80 \
         here, so this test cannot refuse it (run it where the sysctl is 1024, the default)"
    );
    let mut cmd = Command::new(setpriv);
    cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups", BIN]);
    cmd.env_clear().env("RUST_LOG", "info").env("NO_COLOR", "1");
    cmd.stdin(Stdio::null());
    assert_refused_with(
        &run(cmd, &["-p", "80"], None),
        "-p 80 as nobody",
        &[
            "error: cannot listen on 0.0.0.0:80: permission denied: use `-p 8080` or run with CAP_NET_BIND_SERVICE",
        ],
    );
}

#[test]
fn version_prints_the_package_version() {
    let finished = run(jssocket(), &["--version"], None);
    assert!(
        finished.status.success(),
        "--version failed: {}",
        finished.stderr
    );
    assert!(
        finished.stdout.contains(env!("CARGO_PKG_VERSION")),
        "--version: {}",
        finished.stdout
    );
}

#[test]
fn bad_port_flag_is_refused_in_one_line() {
    let reason = assert_refused(&run(jssocket(), &["-p", "abc"], None), "-p abc");
    assert!(
        reason.contains("abc"),
        "reason does not quote the bad value: {reason}"
    );
    let reason = assert_refused(&run(jssocket(), &["--port", "70000"], None), "--port 70000");
    assert!(
        reason.contains("70000"),
        "reason does not quote the bad value: {reason}"
    );
}

#[test]
fn unknown_flag_is_refused_in_one_line() {
    let reason = assert_refused(&run(jssocket(), &["--bogus"], None), "--bogus");
    assert!(
        reason.contains("--bogus"),
        "reason does not name the flag: {reason}"
    );
}

#[test]
fn bad_port_env_is_refused_in_one_line() {
    let mut cmd = jssocket();
    cmd.env("SOCKET_PORT", "abc");
    let reason = assert_refused(&run(cmd, &[], None), "SOCKET_PORT=abc");
    assert!(
        reason.contains("abc"),
        "reason does not quote the bad value: {reason}"
    );
    assert!(
        reason.to_lowercase().contains("port"),
        "reason does not name the port: {reason}"
    );
}

#[test]
fn bad_option_values_are_refused_in_one_line() {
    for args in [
        &["--max-message-size", "-1"][..],
        &["--ping-interval", "0"],
        &["--ping-timeout", "0"],
    ] {
        assert_refused(&run(jssocket(), args, None), &format!("{args:?}"));
    }
}

#[test]
fn empty_auth_is_refused() {
    let mut cmd = jssocket();
    cmd.env("SOCKET_AUTH", "");
    let reason = assert_refused(&run(cmd, &["-p", "0"], None), "SOCKET_AUTH=\"\"");
    assert!(
        reason.contains("SOCKET_AUTH"),
        "reason does not name SOCKET_AUTH: {reason}"
    );
}

#[test]
fn auth_that_is_not_a_hash_is_refused() {
    for value in ["nothex", "abcd", "24326224", "$2b$12$tooshort", "   "] {
        let mut cmd = jssocket();
        cmd.env("SOCKET_AUTH", value);
        let reason = assert_refused(
            &run(cmd, &["-p", "0"], None),
            &format!("SOCKET_AUTH={value}"),
        );
        assert!(
            reason.contains("SOCKET_AUTH"),
            "reason does not name SOCKET_AUTH: {reason}"
        );
    }
}

/// Jaseci's SOCKET_AUTH is its plain password; shared with the relay by mistake, the start-up
/// error says it is a password and how to make the hash, without echoing it.
#[test]
fn auth_that_looks_like_a_password_says_how_to_hash_it() {
    for value in ["12345678", "hunter2", "my secret"] {
        let mut cmd = jssocket();
        cmd.env("SOCKET_AUTH", value);
        let reason = assert_refused(
            &run(cmd, &["-p", "0"], None),
            &format!("SOCKET_AUTH={value}"),
        );
        assert!(reason.contains("SOCKET_AUTH"), "{reason}");
        assert!(reason.contains("plain password"), "{reason}");
        assert!(reason.contains("jssocket hash"), "{reason}");
        assert!(!reason.contains(value), "the password is echoed: {reason}");
    }
}

// ---------------------------------------------------------------------------------------------
// jssocket hash and admin authentication
// ---------------------------------------------------------------------------------------------

#[test]
fn hash_prints_hex_of_a_bcrypt_hash() {
    let hex = hash(b"pw");
    let raw: Vec<u8> = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex digit pair"))
        .collect();
    let raw = String::from_utf8(raw).expect("the hash is text");
    assert!(
        ["$2a$", "$2b$", "$2y$"].iter().any(|p| raw.starts_with(p)) && raw.len() == 60,
        "not a bcrypt hash: {raw}"
    );
}

#[test]
fn hash_refuses_an_empty_password() {
    let reason = assert_refused(&run(jssocket(), &["hash"], Some(b"")), "empty password");
    assert!(reason.to_lowercase().contains("empty"), "reason: {reason}");
}

#[tokio::test]
async fn hashed_password_makes_an_admin() {
    let hex = hash(b"pw");
    let server = Server::start(&[("SOCKET_AUTH", &hex)]);
    assert_eq!(
        server.server_connect_reply("pw").await,
        r#"{"type":"server_connect","data":true}"#,
        "{}",
        server.proc.output()
    );
    assert_eq!(
        server.server_connect_reply("wrong").await,
        r#"{"type":"server_connect","data":false}"#
    );
    // The original's default password must not work once SOCKET_AUTH is set.
    assert_eq!(
        server.server_connect_reply("12345678").await,
        r#"{"type":"server_connect","data":false}"#
    );
}

#[tokio::test]
async fn hash_ignores_the_newline_echo_adds() {
    // `echo pw | jssocket hash` must hash `pw`, not `pw\n`.
    let hex = hash(b"pw\n");
    let server = Server::start(&[("SOCKET_AUTH", &hex)]);
    assert_eq!(
        server.server_connect_reply("pw").await,
        r#"{"type":"server_connect","data":true}"#
    );
}

#[tokio::test]
async fn raw_bcrypt_hash_in_socket_auth_works() {
    let server = Server::start(&[("SOCKET_AUTH", RAW_HASH_12345678)]);
    assert_eq!(
        server.server_connect_reply("12345678").await,
        r#"{"type":"server_connect","data":true}"#,
        "{}",
        server.proc.output()
    );
    assert_eq!(
        server.server_connect_reply("1234567").await,
        r#"{"type":"server_connect","data":false}"#
    );
}

#[tokio::test]
async fn default_password_works_with_a_loud_warning() {
    let mut server = Server::start(&[]);
    assert!(
        server.proc.wait_for_output("12345678", START_DEADLINE),
        "no warning about the default password in the log\n{}",
        server.proc.output()
    );
    let output = server.proc.output();
    let warning = output
        .lines()
        .find(|line| line.contains("12345678"))
        .expect("warning line");
    assert!(
        warning.contains("WARN"),
        "the default password is not logged as a warning: {warning}"
    );
    assert!(
        warning.contains("SOCKET_AUTH"),
        "the warning does not name SOCKET_AUTH: {warning}"
    );
    assert_eq!(
        server.server_connect_reply("12345678").await,
        r#"{"type":"server_connect","data":true}"#
    );
}

#[tokio::test]
async fn wrong_password_is_closed_with_policy_violation() {
    let server = Server::start(&[]);
    let mut ws = server.connect(Some("wrong")).await;
    send(&mut ws, r#"{"type":"server_connect"}"#).await;
    assert_eq!(
        next_text(&mut ws).await,
        r#"{"type":"server_connect","data":false}"#
    );
    assert_eq!(close_code(&mut ws).await, Some(CloseCode::Policy));
}

#[tokio::test]
async fn wrong_passwords_stall_neither_others_nor_shutdown() {
    let mut server = Server::start(&[]);
    let (a, b, c) = tokio::join!(
        server.server_connect_reply("wrong-1"),
        server.server_connect_reply("wrong-2"),
        server.server_connect_reply("wrong-3"),
    );
    for reply in [a, b, c] {
        assert_eq!(reply, r#"{"type":"server_connect","data":false}"#);
    }
    assert_eq!(
        server.server_connect_reply("12345678").await,
        r#"{"type":"server_connect","data":true}"#
    );
    server.proc.signal("TERM");
    let status = server
        .proc
        .wait_for_exit(SHUTDOWN_DEADLINE)
        .unwrap_or_else(|| panic!("still running after SIGTERM\n{}", server.proc.output()));
    assert!(status.success(), "exit after SIGTERM: {status:?}");
}

// ---------------------------------------------------------------------------------------------
// HTTP on a real port
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn healthz_answers_ok() {
    let server = Server::start(&[]);
    assert_eq!(server.get("/healthz").await, (200, "OK\n".to_string()));
    assert_eq!(server.get("/healthz?x=1").await, (200, "OK\n".to_string()));
}

#[tokio::test]
async fn plain_get_of_a_websocket_path_is_426() {
    let server = Server::start(&[]);
    let (status, body) = server.get("/ws").await;
    assert_eq!(status, 426, "body: {body}");
    assert!(!body.trim().is_empty(), "426 without an explanation");
    assert_eq!(server.get("/").await.0, 426);
}

#[tokio::test]
async fn post_to_a_websocket_path_is_a_client_error() {
    let server = Server::start(&[]);
    let headers = [("Content-Type", "application/json")];
    let response = common::http(server.addr(), "POST", "/ws", &headers, b"{}").await;
    let (status, body) = (response.status, response.text());
    assert!(
        (400..500).contains(&status),
        "POST /ws answered {status}: {body}"
    );
    assert!(!body.trim().is_empty(), "{status} without an explanation");
}

#[tokio::test]
async fn host_and_port_come_from_the_environment() {
    let port = free_port();
    let mut cmd = jssocket();
    cmd.env("SOCKET_HOST", "127.0.0.1")
        .env("SOCKET_PORT", port.to_string());
    let server = Server::start_with(cmd, port);
    assert_eq!(server.get("/healthz").await, (200, "OK\n".to_string()));
}

#[tokio::test]
async fn flags_override_the_environment() {
    let port = free_port();
    let mut cmd = jssocket();
    // An address nothing can bind, so the test fails if the variables win over the flags.
    cmd.env("SOCKET_HOST", "192.0.2.1").env("SOCKET_PORT", "1");
    cmd.args(["-h", "127.0.0.1", "--port", &port.to_string()]);
    let server = Server::start_with(cmd, port);
    assert_eq!(server.get("/healthz").await, (200, "OK\n".to_string()));
}

#[test]
fn port_in_use_is_refused_in_one_line() {
    let taken = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = taken.local_addr().expect("local_addr").port().to_string();
    let finished = run(jssocket(), &["-h", "127.0.0.1", "-p", &port], None);
    // The log may say a few things first; the reason is the last line of stderr.
    assert!(
        !finished.status.success(),
        "started on a port in use: {}",
        finished.stdout
    );
    assert_refused_with(
        &finished,
        "port in use",
        &[&format!(
            "error: cannot listen on 127.0.0.1:{port}: address in use: another process \
             listens there; stop it or choose another port with `-p`"
        )],
    );
}

// ---------------------------------------------------------------------------------------------
// Shutdown
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn sigterm_closes_connections_with_1001_and_exits_0() {
    let mut server = Server::start(&[]);
    let mut admin = server.connect(Some("12345678")).await;
    send(&mut admin, r#"{"type":"server_connect"}"#).await;
    assert_eq!(
        next_text(&mut admin).await,
        r#"{"type":"server_connect","data":true}"#
    );
    let mut client = server.connect(None).await;
    send(
        &mut client,
        r#"{"type":"client_connect","data":{"token":"t"}}"#,
    )
    .await;
    // The server forwards the connect to the admin: both connections are now fully set up.
    let forwarded = next_text(&mut admin).await;
    assert!(
        forwarded.contains("client_connect"),
        "forwarded: {forwarded}"
    );
    let mut idle = server.connect(None).await;

    let signalled = Instant::now();
    server.proc.signal("TERM");
    assert_eq!(close_code(&mut admin).await, Some(CloseCode::Away), "admin");
    assert_eq!(
        close_code(&mut client).await,
        Some(CloseCode::Away),
        "client"
    );
    assert_eq!(
        close_code(&mut idle).await,
        Some(CloseCode::Away),
        "idle connection"
    );

    let left = SHUTDOWN_DEADLINE.saturating_sub(signalled.elapsed());
    // Blocking here is fine: nothing else runs on this test's runtime any more.
    let status = server.proc.wait_for_exit(left).unwrap_or_else(|| {
        panic!(
            "still running {SHUTDOWN_DEADLINE:?} after SIGTERM\n{}",
            server.proc.output()
        )
    });
    assert!(
        status.success(),
        "exit after SIGTERM: {status:?}\n{}",
        server.proc.output()
    );
}

#[test]
fn sigint_exits_0() {
    let mut server = Server::start(&[]);
    server.proc.signal("INT");
    let status = server
        .proc
        .wait_for_exit(SHUTDOWN_DEADLINE)
        .unwrap_or_else(|| panic!("still running after SIGINT\n{}", server.proc.output()));
    assert!(
        status.success(),
        "exit after SIGINT: {status:?}\n{}",
        server.proc.output()
    );
}

#[test]
fn sigterm_stops_accepting() {
    let mut server = Server::start(&[]);
    server.proc.signal("TERM");
    server
        .proc
        .wait_for_exit(SHUTDOWN_DEADLINE)
        .expect("exit after SIGTERM");
    assert!(
        TcpStream::connect(("127.0.0.1", server.port)).is_err(),
        "port {} still accepts after shutdown",
        server.port
    );
}
