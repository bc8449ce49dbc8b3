//! What the bench's own tests share: the built `jssocket` server started on a free loopback
//! port, and a run of `jssocket-bench` against it with its final JSON line.
//!
//! The server is the built `jssocket` binary next to this bench's binary (`target/<profile>/`,
//! built by `cargo test --workspace`), or the one `JSSOCKET_BIN` names.
#![allow(dead_code)]

use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub const BENCH: &str = env!("CARGO_BIN_EXE_jssocket-bench");

/// The server binary: `JSSOCKET_BIN`, else `jssocket` in the bench binary's directory.
pub fn server_bin() -> PathBuf {
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
pub struct Server {
    pub child: Child,
    pub port: u16,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts the server on a free loopback port (default admin password) with `args`, and
/// waits until it accepts connections.
pub fn start_server(args: &[&str]) -> Server {
    let port = free_port();
    let child = Command::new(server_bin())
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .env_remove("SOCKET_AUTH")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .expect("starting the server");
    wait_listening(Server { child, port })
}

/// Starts the bench's own raw-frame baseline (`raw-server`, default admin password) on a free
/// loopback port.
pub fn start_raw_server() -> Server {
    let port = free_port();
    let child = Command::new(BENCH)
        .args([
            "raw-server",
            "--host",
            "127.0.0.1",
            "--port",
            &port.to_string(),
        ])
        .env_remove("BENCH_AUTH")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting the raw server");
    wait_listening(Server { child, port })
}

fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
}

fn wait_listening(server: Server) -> Server {
    let port = server.port;
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

/// Runs `jssocket-bench --url <server> <args…>`; returns whether it succeeded, its final JSON
/// line (`Null` when there is none) and its whole output.
pub fn run_bench(server: &Server, args: &[&str]) -> (bool, Value, String) {
    let out = Command::new(BENCH)
        .args(["--url", &format!("ws://127.0.0.1:{}/ws", server.port)])
        .args(args)
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
