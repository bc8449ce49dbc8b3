//! Client → backend calls (SPEC §12): the calls in flight on this node, their deadlines, and
//! the frames a caller gets back.
//!
//! A registered client's `invoke` (or a SignalR `connection.invoke`) is forwarded to one
//! server, round robin, by [`crate::relay::Relay::invoke`]; the call waits here, on the
//! caller's node, keyed by (caller, id). A server's `invoke_result` is routed to the caller's
//! node like a `notify_client` ([`crate::delivery::Delivery::InvokeResult`]) and completes the
//! call only if that (caller, id) is in flight: a server cannot push "results" to a client that
//! did not ask, and an answer after the deadline, or a second one, is dropped and counted.
//!
//! Bounds: [`MAX_IN_FLIGHT`] calls per connection, [`MAX_PER_MINUTE`] per connection,
//! [`MAX_TOTAL`] on the node; ids and method names are short ([`MAX_ID_LEN`],
//! [`MAX_METHOD_LEN`]). A call holds no frame while it waits (the request went to a server's
//! queue), only its key, so the table's memory is bounded by its count.
//!
//! Timeouts cost no task or timer per call: every call waits the same `--invoke-timeout`, so
//! deadlines are made in order and one queue, oldest first, holds them; one sweeper
//! ([`sweep`]) pops the expired ones. A call completed earlier leaves a stale ticket that is
//! skipped when reached (and compacted away when they pile up).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use serde_json::value::RawValue;
use tokio_tungstenite::tungstenite::Utf8Bytes;
use uuid::Uuid;

use crate::kinds::{Code, Frame};
use crate::peer::Peer;
use crate::protocol::{ProtocolError, event_frame, push_json_string};
use crate::relay::Relay;

/// Calls one connection may have waiting for their results.
pub const MAX_IN_FLIGHT: usize = 16;
/// Calls one connection may start per minute (refused ones not counted).
pub const MAX_PER_MINUTE: u32 = 600;
/// Calls in flight on one node, over every connection: a crowd of clients, each within its
/// own limits, still cannot grow the table without bound.
pub const MAX_TOTAL: usize = 100_000;
/// Longest `id`, as JSON text (a string of up to about this many bytes, or an integer).
pub const MAX_ID_LEN: usize = 128;
/// Longest `method`, in bytes.
pub const MAX_METHOD_LEN: usize = 128;

const ID_RULE: &str = "a string of at most 128 bytes or an integer";
const METHOD_RULE: &str = "a string of 1 to 128 bytes without control characters";

/// How the caller reads its result.
#[derive(Debug, Clone)]
pub enum Reply {
    /// `{"type":"invoke_result","data":{"id":…,"data"|"error":…}}`.
    Jssocket,
    /// A SignalR completion `{"type":3,"invocationId":…,"result"|"error":…}`.
    SignalR,
}

/// A call's outcome: the raw JSON of the server's `data`, or of its `error`.
#[derive(Debug, Clone, Copy)]
pub enum Outcome<'a> {
    Data(&'a str),
    Error(&'a str),
}

/// The canonical JSON text of an `id` (a string or an integer), what calls are keyed by, so
/// that the server's `"id"` matches the client's however either spelled it.
pub fn canonical_id(raw: &RawValue) -> Result<Box<str>, ProtocolError> {
    let invalid = ProtocolError::InvalidField("id", ID_RULE);
    if raw.get().len() > 4 * MAX_ID_LEN {
        return Err(invalid);
    }
    let text = match serde_json::from_str::<serde_json::Value>(raw.get()) {
        Ok(serde_json::Value::String(s)) if s.len() <= MAX_ID_LEN => {
            let mut out = String::with_capacity(s.len() + 2);
            push_json_string(&mut out, &s);
            out
        }
        Ok(serde_json::Value::Number(n)) if n.is_i64() || n.is_u64() => n.to_string(),
        _ => return Err(invalid),
    };
    Ok(text.into_boxed_str())
}

/// Checks a `method` name.
pub fn check_method(method: &str) -> Result<(), ProtocolError> {
    let ok = !method.is_empty()
        && method.len() <= MAX_METHOD_LEN
        && !method.chars().any(char::is_control);
    ok.then_some(())
        .ok_or(ProtocolError::InvalidField("method", METHOD_RULE))
}

/// The relay's own error for a call: `{"code":…,"message":…}`, as SPEC §6's error data.
pub fn relay_error(code: Code, message: &str) -> String {
    let mut out = String::from("{\"code\":\"");
    out.push_str(code.name());
    out.push_str("\",\"message\":");
    push_json_string(&mut out, message);
    out.push('}');
    out
}

/// The error a refused call gets, as the raw JSON of its `error`.
pub fn refusal_error(error: &ProtocolError) -> String {
    relay_error(error.code(), &error.to_string())
}

/// What the caller receives for call `id` (canonical JSON).
///
/// SignalR's completion `error` is a string: a server's error that is a JSON string is
/// passed as that string, any other is passed as its JSON text (so the relay's own
/// `{"code","message"}` errors read the same on both wires).
pub fn result_frame(reply: &Reply, id: &str, outcome: Outcome<'_>) -> Utf8Bytes {
    match reply {
        Reply::Jssocket => {
            let (key, value) = match outcome {
                Outcome::Data(value) => ("data", value),
                Outcome::Error(value) => ("error", value),
            };
            event_frame(
                "invoke_result",
                &format!("{{\"id\":{id},\"{key}\":{value}}}"),
            )
        }
        Reply::SignalR => {
            // The invocation id was a string (the SignalR client's), kept as its JSON text.
            let invocation_id = serde_json::from_str::<String>(id).unwrap_or_default();
            match outcome {
                Outcome::Data(value) => {
                    let mut out = String::from("{\"type\":3,\"invocationId\":");
                    push_json_string(&mut out, &invocation_id);
                    out.push_str(",\"result\":");
                    out.push_str(value);
                    out.push('}');
                    out.push(crate::signalr::RS);
                    Utf8Bytes::from(out)
                }
                Outcome::Error(value) => {
                    let text =
                        serde_json::from_str::<String>(value).unwrap_or_else(|_| value.to_string());
                    Utf8Bytes::from(crate::signalr::protocol::completion_error(
                        &invocation_id,
                        &text,
                    ))
                }
            }
        }
    }
}

/// Counts one connection's calls in fixed one-minute windows ([`MAX_PER_MINUTE`]); owned
/// by the connection's task (its `Session`, or the SignalR reader).
#[derive(Debug)]
pub struct RateWindow {
    count: u32,
    since: Instant,
}

impl Default for RateWindow {
    fn default() -> RateWindow {
        RateWindow {
            count: 0,
            since: Instant::now(),
        }
    }
}

impl RateWindow {
    /// Counts a call; refused past [`MAX_PER_MINUTE`] in the current minute.
    pub fn admit(&mut self) -> Result<(), ProtocolError> {
        if self.since.elapsed() >= Duration::from_secs(60) {
            self.count = 0;
            self.since = Instant::now();
        }
        if self.count >= MAX_PER_MINUTE {
            return Err(ProtocolError::RateLimited(
                "invoke: at most 600 calls a minute per connection",
            ));
        }
        self.count += 1;
        Ok(())
    }
}

/// The calls in flight on this node (see the module doc).
pub struct Invocations {
    table: Mutex<Table>,
    timeout: Duration,
}

/// (caller, canonical id).
type Key = (Uuid, Box<str>);

#[derive(Default)]
struct Table {
    calls: HashMap<Key, Call>,
    /// The ids of each caller's calls in flight (at most [`MAX_IN_FLIGHT`]), to count them
    /// and to forget them when the caller closes; an entry goes with its last call.
    per_caller: HashMap<Uuid, Vec<Box<str>>>,
    /// (deadline, call, ticket), oldest first: deadlines are made in order.
    deadlines: VecDeque<(Instant, Key, u64)>,
    next_ticket: u64,
}

struct Call {
    caller: Weak<Peer>,
    reply: Reply,
    /// Its entry in `deadlines`: a newer call under the same key has another.
    ticket: u64,
}

impl Table {
    fn take(&mut self, key: &Key) -> Option<Call> {
        let call = self.calls.remove(key)?;
        if let Some(ids) = self.per_caller.get_mut(&key.0) {
            ids.retain(|id| *id != key.1);
            if ids.is_empty() {
                self.per_caller.remove(&key.0);
            }
        }
        Some(call)
    }
}

impl Invocations {
    pub fn new(timeout: Duration) -> Invocations {
        Invocations {
            table: Mutex::new(Table::default()),
            timeout,
        }
    }

    fn table(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Calls in flight on this node.
    pub fn len(&self) -> usize {
        self.table().calls.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Puts call `id` of `caller` in flight, with its deadline. O(1) amortised.
    pub fn begin(&self, caller: &Arc<Peer>, id: &str, reply: Reply) -> Result<(), ProtocolError> {
        let mut table = self.table();
        let key: Key = (caller.id, id.into());
        if table.calls.contains_key(&key) {
            return Err(ProtocolError::InvalidField(
                "id",
                "an id not already in flight on this connection",
            ));
        }
        if table.per_caller.get(&caller.id).map_or(0, Vec::len) >= MAX_IN_FLIGHT {
            return Err(ProtocolError::RateLimited(
                "invoke: at most 16 calls in flight per connection",
            ));
        }
        if table.calls.len() >= MAX_TOTAL {
            return Err(ProtocolError::ClusterBusy(
                "invoke: too many calls in flight on this server; try again later",
            ));
        }
        let ticket = table.next_ticket;
        table.next_ticket += 1;
        table
            .per_caller
            .entry(caller.id)
            .or_default()
            .push(key.1.clone());
        let deadline = Instant::now() + self.timeout;
        table.deadlines.push_back((deadline, key.clone(), ticket));
        table.calls.insert(
            key,
            Call {
                caller: Arc::downgrade(caller),
                reply,
                ticket,
            },
        );
        // Stale tickets of calls completed early wait for their deadline; compacted once
        // they outnumber the live ones, O(1) amortised per call.
        if table.deadlines.len() > 2 * table.calls.len() + 1024 {
            let Table {
                calls, deadlines, ..
            } = &mut *table;
            deadlines
                .retain(|(_, key, ticket)| calls.get(key).is_some_and(|c| c.ticket == *ticket));
        }
        Ok(())
    }

    /// Takes call `id` of `caller` out of flight (it could not be forwarded).
    pub fn abandon(&self, caller: Uuid, id: &str) {
        self.table().take(&(caller, id.into()));
    }

    /// Forgets the calls of a connection that closed: they no longer count toward
    /// [`MAX_TOTAL`] (a crowd opening connections, calling and leaving cannot fill the table
    /// for the others), and their answers are dropped like any unknown one. Their stale
    /// deadlines are skipped when reached.
    pub fn forget(&self, caller: Uuid) {
        let mut table = self.table();
        let Some(ids) = table.per_caller.remove(&caller) else {
            return;
        };
        for id in ids {
            table.calls.remove(&(caller, id));
        }
    }

    /// Completes call `id` of connection `target` with `outcome`, if it is in flight here:
    /// the caller gets its result. False (and counted) otherwise: nobody gets anything.
    pub fn complete(&self, relay: &Relay, target: &str, id: &str, outcome: Outcome<'_>) -> bool {
        let taken = crate::hub::parse_target(target)
            .and_then(|caller| self.table().take(&(caller, id.into())));
        let Some(caller) = taken.and_then(|call| Some((call.caller.upgrade()?, call.reply))) else {
            relay.metrics.invoke_results_dropped.inc();
            return false;
        };
        let (peer, reply) = caller;
        let frame = result_frame(&reply, id, outcome);
        relay.metrics.sent(Frame::InvokeResult, 1, frame.len());
        peer.send(frame);
        true
    }

    /// Answers the calls past their deadline with a `timeout` error; taken under the lock,
    /// answered outside it.
    pub fn expire(&self, relay: &Relay) {
        let now = Instant::now();
        let mut expired = Vec::new();
        {
            let mut table = self.table();
            while let Some((deadline, _, _)) = table.deadlines.front() {
                if *deadline > now {
                    break;
                }
                let Some((_, key, ticket)) = table.deadlines.pop_front() else {
                    break;
                };
                if table.calls.get(&key).is_some_and(|c| c.ticket == ticket)
                    && let Some(call) = table.take(&key)
                {
                    expired.push((key.1, call));
                }
            }
        }
        if expired.is_empty() {
            return;
        }
        let error = relay_error(Code::Timeout, "no server answered this call in time");
        for (id, call) in expired {
            relay.metrics.invoke_timeouts.inc();
            if let Some(peer) = call.caller.upgrade() {
                let frame = result_frame(&call.reply, &id, Outcome::Error(&error));
                relay.metrics.sent(Frame::InvokeResult, 1, frame.len());
                peer.send(frame);
            }
        }
    }
}

/// The one task that times calls out, for the life of the server.
pub async fn sweep(relay: Arc<Relay>) {
    let period = (relay.config.invoke_timeout / 10)
        .clamp(Duration::from_millis(20), Duration::from_millis(250));
    let mut tick = tokio::time::interval(period);
    loop {
        tokio::select! {
            _ = tick.tick() => relay.invocations.expire(&relay),
            _ = relay.shutdown.cancelled() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(text: &str) -> Box<RawValue> {
        RawValue::from_string(text.to_string()).unwrap()
    }

    #[test]
    fn ids_are_strings_or_integers_in_one_spelling() {
        assert_eq!(&*canonical_id(&raw("7")).unwrap(), "7");
        assert_eq!(&*canonical_id(&raw(r#""a\u0062""#)).unwrap(), r#""ab""#);
        for bad in ["1.5", "null", "[]", "{}", "true"] {
            assert!(canonical_id(&raw(bad)).is_err(), "{bad}");
        }
        let long = format!("\"{}\"", "x".repeat(MAX_ID_LEN + 1));
        assert!(canonical_id(&raw(&long)).is_err());
        assert!(check_method("execute").is_ok());
        assert!(check_method("").is_err());
        assert!(check_method("a\nb").is_err());
        assert!(check_method(&"m".repeat(MAX_METHOD_LEN + 1)).is_err());
    }

    fn peer() -> Arc<Peer> {
        let memory = Arc::new(crate::memory::Memory::new(
            usize::MAX / 4,
            &crate::metrics::Metrics::new(),
        ));
        Peer::new(7, 1 << 20, &memory)
    }

    /// Per-connection bound, duplicates, forgetting a closed caller, and stale deadlines
    /// that never outgrow the live calls by more than the compaction slack.
    #[test]
    fn the_table_stays_bounded() {
        let calls = Invocations::new(Duration::from_secs(60));
        let (a, b) = (peer(), peer());
        for i in 0..MAX_IN_FLIGHT {
            calls.begin(&a, &i.to_string(), Reply::Jssocket).unwrap();
        }
        assert!(matches!(
            calls.begin(&a, "99", Reply::Jssocket),
            Err(ProtocolError::RateLimited(_))
        ));
        assert!(matches!(
            calls
                .begin(&b, "0", Reply::Jssocket)
                .and(calls.begin(&b, "0", Reply::Jssocket)),
            Err(ProtocolError::InvalidField("id", _))
        ));
        calls.forget(a.id);
        assert_eq!(calls.len(), 1);
        calls.begin(&a, "0", Reply::Jssocket).unwrap();
        for i in 0..10_000 {
            let id = format!("\"x{i}\"");
            calls.begin(&b, &id, Reply::SignalR).unwrap();
            calls.abandon(b.id, &id);
        }
        let table = calls.table();
        assert_eq!(table.calls.len(), 2);
        assert!(
            table.deadlines.len() <= 2 * 2 + 1024 + 1,
            "{}",
            table.deadlines.len()
        );
        assert_eq!(table.per_caller[&b.id].len(), 1);
    }

    #[test]
    fn signalr_errors_are_strings() {
        let frame = result_frame(&Reply::SignalR, r#""3""#, Outcome::Error(r#""boom""#));
        assert_eq!(
            frame.as_str(),
            "{\"type\":3,\"invocationId\":\"3\",\"error\":\"boom\"}\u{1e}"
        );
        let frame = result_frame(&Reply::SignalR, r#""3""#, Outcome::Data("[1,2]"));
        assert_eq!(
            frame.as_str(),
            "{\"type\":3,\"invocationId\":\"3\",\"result\":[1,2]}\u{1e}"
        );
        let frame = result_frame(&Reply::Jssocket, "3", Outcome::Error("{\"x\":1}"));
        assert_eq!(
            frame.as_str(),
            r#"{"type":"invoke_result","data":{"id":3,"error":{"x":1}}}"#
        );
    }
}
