//! jssocket: a WebSocket relay server. Backends (admins) push notifications to browser
//! connections (clients) by connection id, by group, or to everyone; servers in a pool
//! authenticate clients' tokens. A drop-in replacement for Jaseci's Python relay.
//!
//! Layout:
//! - [`config`]: every option, its `SOCKET_*` variable and default, validated once.
//! - [`server`]: listener, HTTP routes, WebSocket upgrade, shutdown; [`server::run`] is the
//!   entry point for the binary and for tests.
//! - [`relay`]: what every task shares, and the one delivery path ([`relay::Relay::deliver`]).
//! - [`connection`]: one WebSocket: reader, bounded outbound queue, keepalive.
//! - [`session`]: what a connection's task knows of itself, and its per-connection limits.
//! - [`protocol`]: the envelope, the outbound frames, the error codes.
//! - [`kinds`]: every event name, frame kind and error code, listed once.
//! - [`events`]: one file per event type.
//! - [`delivery`]: what an event asks to be delivered, as one value, local or remote.
//! - [`history`]: channel history (`--history`): offsets, epochs, recovery (SPEC §13).
//! - [`hub`]: who is connected: clients, groups, channels.
//! - [`peer`]: one connection's shared handle: id, outbound queue, hub state, close reason.
//! - [`pool`]: the server pool and the client connects waiting for a server.
//! - [`invoke`]: client → backend calls in flight, their deadlines and results.
//! - [`outbox`]: a connection's bounded outbound queue.
//! - [`memory`]: the global memory budget (`--max-memory`) over every queue and partial message.
//! - [`overload`]: when the runtime lags, clients' messages wait so bystanders are served.
//! - [`auth`]: `SOCKET_AUTH` and bcrypt verification off the runtime.
//! - [`jwt`]: client tokens (`--jwt-*`): a token in, the user, roles and groups it proves out.
//! - [`api`]: the HTTP publish API (`POST /api/…`).
//! - [`metrics`]: Prometheus metrics at `GET /metrics`.
//! - [`console`]: the built-in web console at `GET /console` (`--console on|off`).
//! - [`backplane`]: what a node tells the others: its traits, the single-node and loopback ones.
//! - [`cluster`]: the node logic that makes several nodes one relay, over any transport
//!   (`nodes.rs`: forwards in flight; `backlog.rs`: what waits to be published; `wire.rs`:
//!   what nodes say), the Redis and Redis Cluster transports (`redis.rs`), and channel
//!   history's Redis I/O (`history.rs`).
//! - [`signalr`]: SignalR clients (the JSON hub protocol over WebSockets), beside jssocket's
//!   own protocol on the same hub.
//! - [`tls`]: optional TLS (`--tls-cert`/`--tls-key`): the handshake, and the certificate
//!   files re-read when they change.
//! - [`log_throttle`]: `warn_throttled!`, for log lines a peer can trigger at will.

pub mod api;
pub mod auth;
pub mod backplane;
pub mod cluster;
pub mod config;
pub mod connection;
pub mod console;
pub mod delivery;
pub mod events;
pub mod history;
pub mod hub;
pub mod invoke;
pub mod jwt;
pub mod kinds;
pub mod log_throttle;
pub mod membership;
pub mod memory;
pub mod metrics;
pub mod outbox;
pub mod overload;
pub mod peer;
pub mod pool;
pub mod presence;
pub mod protocol;
pub mod raw_write;
pub mod relay;
pub mod server;
pub mod session;
pub mod signalr;
pub mod tls;
