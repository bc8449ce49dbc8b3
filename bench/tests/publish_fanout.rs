//! `publish-fanout` (issue 12's benchmark) run small against the real server, once per wire:
//! the benchmark's own checks (loss, duplicates, order, connects) must all come out clean, so
//! the suite gates the code that produces BENCHMARKS.md's figures.
//!
//! The server is the built `jssocket` binary next to this bench's binary (`target/<profile>/`,
//! built by `cargo test --workspace`), or the one `JSSOCKET_BIN` names.

use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const BENCH: &str = env!("CARGO_BIN_EXE_jssocket-bench");

/// The server binary: `JSSOCKET_BIN`, else `jssocket` in the bench binary's directory.
fn server_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("JSSOCKET_BIN") {
        return PathBuf::from(bin);
    }
    let bench = PathBuf::from(BENCH);
    let bin = bench
        .parent()
        .map(|dir| dir.join("jssocket"))
        .unwrap_or_default();
    assert!(
        bin.is_file(),
        "the server binary {} is missing: build it first (`cargo build --bin jssocket`, or \
         `cargo test --workspace`, which builds it), or name one in JSSOCKET_BIN",
        bin.display()
    );
    bin
}

/// A server process, killed when dropped.
struct Server {
    child: Child,
    port: u16,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts the server on a free loopback port (default admin password, default SignalR path)
/// and waits until it accepts connections.
fn start_server() -> Server {
    let port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port();
    let child = Command::new(server_bin())
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .env_remove("SOCKET_AUTH")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .expect("starting the server");
    let server = Server { child, port };
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect((Ipv4Addr::LOCALHOST, port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "the server did not listen on port {port} within 20 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    server
}

/// Runs `publish-fanout --wire <wire>` with 20 clients and 50 messages; returns the exit
/// status's success and the final JSON line.
fn publish_fanout(wire: &str) -> (bool, Value, String) {
    let server = start_server();
    let out = Command::new(BENCH)
        .args([
            "--url",
            &format!("ws://127.0.0.1:{}/ws", server.port),
            "--server-pid",
            &server.child.id().to_string(),
            "--timeout",
            "60",
            "publish-fanout",
            "--wire",
            wire,
            "--clients",
            "20",
            "--messages",
            "50",
            "--size",
            "128",
        ])
        .env_remove("BENCH_URL")
        .env_remove("BENCH_AUTH")
        .stdin(Stdio::null())
        .output()
        .expect("running jssocket-bench");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let json = stdout
        .lines()
        .last()
        .and_then(|line| serde_json::from_str(line).ok())
        .unwrap_or(Value::Null);
    (out.status.success(), json, stdout)
}

fn assert_clean(wire: &str) {
    let (ok, json, stdout) = publish_fanout(wire);
    let n = |key: &str| json[key].as_u64();
    assert!(ok, "publish-fanout --wire {wire} failed:\n{stdout}");
    assert_eq!(json["scenario"], "publish-fanout", "{stdout}");
    assert_eq!(json["wire"], wire, "{stdout}");
    assert_eq!(json["connect"]["acknowledged"], 20, "{stdout}");
    assert_eq!(n("sent"), Some(50), "{stdout}");
    assert_eq!(n("expected_deliveries"), Some(1000), "{stdout}");
    assert_eq!(n("deliveries"), Some(1000), "{stdout}");
    for error in [
        "lost",
        "duplicated",
        "reordered",
        "misdelivered",
        "unparsable",
    ] {
        assert_eq!(n(error), Some(0), "{error} in:\n{stdout}");
    }
    assert!(
        json["deliveries_per_server_cpu_s"].as_f64().is_some(),
        "no deliveries per server-CPU-second in:\n{stdout}"
    );
}

#[test]
fn jssocket_subscribers_get_every_publish_once_in_order() {
    assert_clean("jssocket");
}

#[test]
fn signalr_clients_get_every_publish_once_in_order() {
    assert_clean("signalr");
}
