//! `recovery` (issue 14's benchmark) run small against the real server: 20 subscribers of a
//! history channel drop their connections, miss 10 publications and reconnect with `since`;
//! every one must be recovered with exactly the 10 in order, so the suite gates the code that
//! produces BENCHMARKS.md's figures.
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

/// Starts the server with history on `bench.*` on a free loopback port (default admin
/// password) and waits until it accepts connections.
fn start_server() -> Server {
    let port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port();
    let child = Command::new(server_bin())
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(["--history", "bench.*=100/10m"])
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

#[test]
fn every_client_recovers_exactly_the_missed_publications_in_order() {
    let server = start_server();
    let out = Command::new(BENCH)
        .args([
            "--url",
            &format!("ws://127.0.0.1:{}/ws", server.port),
            "--timeout",
            "60",
            "recovery",
            "--clients",
            "20",
            "--missed",
            "10",
        ])
        .env_remove("BENCH_URL")
        .env_remove("BENCH_AUTH")
        .stdin(Stdio::null())
        .output()
        .expect("running jssocket-bench");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let json: Value = stdout
        .lines()
        .last()
        .and_then(|line| serde_json::from_str(line).ok())
        .unwrap_or(Value::Null);
    assert!(out.status.success(), "recovery failed:\n{stdout}");
    assert_eq!(json["scenario"], "recovery", "{stdout}");
    assert_eq!(json["recovered"], 20, "{stdout}");
    assert_eq!(json["exact"], 20, "{stdout}");
    assert_eq!(json["publications_received"], 200, "{stdout}");
    assert_eq!(json["failures"]["total"], 0, "{stdout}");
    assert!(
        json["seconds_to_last_recovery"]
            .as_f64()
            .is_some_and(|s| s > 0.0),
        "no time to the last recovery in:\n{stdout}"
    );
}

#[test]
fn without_history_the_bench_fails_and_says_so() {
    // A channel the server keeps no history of: `since` cannot be honoured (no offsets), so
    // the bench must exit 1 rather than report figures.
    let server = start_server();
    let out = Command::new(BENCH)
        .args([
            "--url",
            &format!("ws://127.0.0.1:{}/ws", server.port),
            "--timeout",
            "30",
            "--ack-timeout",
            "3",
            "recovery",
            "--clients",
            "5",
            "--channel",
            "nohistory",
        ])
        .env_remove("BENCH_URL")
        .env_remove("BENCH_AUTH")
        .stdin(Stdio::null())
        .output()
        .expect("running jssocket-bench");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        !out.status.success(),
        "recovery without history succeeded:\n{stdout}"
    );
}
