//! Shared helpers for the WebSocket integration tests: an in-process server, client and admin
//! connections, and assertions on what arrives (or does not) within bounded time.
//!
//! Every wait is bounded: a frame that does not arrive within [`RECV_TIMEOUT`] fails the test
//! with a message naming the connection, so a broken server never hangs the suite.
//!
//! By concern: `server` (the in-process server), `conn` (a WebSocket connection and waits on
//! it), `protocol` (register, acknowledge, the error shape), `http` (ordinary HTTP requests),
//! `metrics` (scraping `/metrics`), `logs` (capturing the server's log), `signalr` (a raw
//! SignalR JSON-protocol connection). Everything is
//! re-exported here, so a test says `common::Server` whatever file it lives in.
//!
//! Every test binary includes this module and uses a different part of it: what one leaves
//! unused is not dead.
#![allow(dead_code, unused_imports)]

mod conn;
mod http;
mod logs;
mod metrics;
mod protocol;
mod server;
mod signalr;

use std::time::Duration;

pub use conn::*;
pub use http::*;
pub use logs::*;
pub use metrics::*;
pub use protocol::*;
pub use server::*;
pub use signalr::*;

/// The default admin password (the original relay's default hash).
pub const PASSWORD: &str = "12345678";
/// A cheap (cost 4) bcrypt hash of the same [`PASSWORD`]. The default hash costs ~0.5 s per
/// server in a debug build; most tests use this one so the suite stays fast, and the tests
/// that matter use the real default ([`Server::start_default_auth`]).
pub const FAST_HASH: &str = "$2b$04$dODXgGN5PieAre7bihB2aeEbZUa6kaMXEadSzdIWoM/eSGT3GjoJa";
/// Longest wait for a frame that must arrive. Generous: the first admin of a server pays
/// bcrypt (~0.5 s in a debug build) and tests run in parallel.
pub const RECV_TIMEOUT: Duration = Duration::from_secs(5);
/// How long "nothing arrives" is watched for.
pub const SILENCE: Duration = Duration::from_millis(300);
/// Longest wait for a graceful shutdown to finish.
pub const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(10);
