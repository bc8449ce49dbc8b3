//! `raw-server`: the raw-frame baseline of issue 16, the cost of the relay's job itself with
//! no WebSocket library: the HTTP upgrade parsed by hand (`Sec-WebSocket-Accept` is
//! base64(sha1(key + GUID))), client frames unmasked by hand, each `notify_all` frame built
//! once and the same `Bytes` queued for every socket, and each connection's writer draining
//! everything queued and writing it with one `write_all`. No validation, no limits: it
//! speaks just enough of the protocol for `fanout`, `group`, `p2p` and `connect` (the same
//! subset as `baseline-server`), and answers pings and closes.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use anyhow::Result;
use base64::Engine;
use bytes::{Buf, BufMut, Bytes, BytesMut};
use serde::Deserialize;
use serde_json::value::RawValue;
use sha1::{Digest, Sha1};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::Notify;

use crate::baseline::{Client, accept_forever};

const OP_CONTINUATION: u8 = 0x0;
const OP_TEXT: u8 = 0x1;
const OP_BINARY: u8 = 0x2;
const OP_CLOSE: u8 = 0x8;
const OP_PING: u8 = 0x9;

/// RFC 6455 §1.3: appended to the client's key before hashing.
const ACCEPT_GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// Longest upgrade request read; a peer sending more is dropped (the only bound kept: the
/// request is buffered before any frame).
const MAX_REQUEST: usize = 16 * 1024;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// One connection's outbound frames, waiting for its writer task.
#[derive(Default)]
struct Outbox {
    queue: Mutex<Vec<Bytes>>,
    /// Woken when the queue goes from empty to not empty, and on close.
    ready: Notify,
    /// Set by the reader when the connection ends: the writer writes what is queued and stops.
    closed: AtomicBool,
}

impl Outbox {
    fn push(&self, frame: Bytes) {
        let mut queue = lock(&self.queue);
        let was_empty = queue.is_empty();
        queue.push(frame);
        drop(queue);
        // A writer busy writing finds the frame on its next drain; `notify_one` keeps a
        // permit when nobody waits, so no wake-up is lost.
        if was_empty {
            self.ready.notify_one();
        }
    }

    fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.ready.notify_one();
    }
}

/// Writes everything queued in one `write_all` per drain.
async fn writer(mut socket: OwnedWriteHalf, outbox: Arc<Outbox>) {
    let mut batch: Vec<Bytes> = Vec::new();
    let mut buf: Vec<u8> = Vec::new();
    loop {
        std::mem::swap(&mut batch, &mut *lock(&outbox.queue));
        if batch.is_empty() {
            if outbox.closed.load(Ordering::Acquire) {
                break;
            }
            outbox.ready.notified().await;
            continue;
        }
        let result = if batch.len() == 1 {
            socket.write_all(&batch[0]).await
        } else {
            buf.clear();
            for frame in &batch {
                buf.extend_from_slice(frame);
            }
            socket.write_all(&buf).await
        };
        batch.clear();
        if result.is_err() {
            break;
        }
        // A large batch leaves a large buffer: keep at most 64 KiB between batches.
        if buf.capacity() > 64 * 1024 {
            buf = Vec::new();
        }
    }
    let _ = socket.shutdown().await;
}

/// A server-to-client frame (unmasked, unfragmented).
fn frame(opcode: u8, payload: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(payload.len() + 10);
    b.put_u8(0x80 | opcode);
    match payload.len() {
        n if n < 126 => b.put_u8(n as u8),
        n if n <= 0xffff => {
            b.put_u8(126);
            b.put_u16(n as u16);
        }
        n => {
            b.put_u8(127);
            b.put_u64(n as u64);
        }
    }
    b.extend_from_slice(payload);
    b.freeze()
}

fn text(payload: &str) -> Bytes {
    frame(OP_TEXT, payload.as_bytes())
}

/// One frame cut from the front of `buf` and unmasked, or `None` when it is not all there.
fn parse_frame(buf: &mut BytesMut) -> Option<(bool, u8, BytesMut)> {
    if buf.len() < 2 {
        return None;
    }
    let fin = buf[0] & 0x80 != 0;
    let opcode = buf[0] & 0x0f;
    let masked = buf[1] & 0x80 != 0;
    let (len, mut header) = match buf[1] & 0x7f {
        126 if buf.len() >= 4 => (u64::from(u16::from_be_bytes([buf[2], buf[3]])), 4),
        127 if buf.len() >= 10 => {
            let mut n = [0u8; 8];
            n.copy_from_slice(&buf[2..10]);
            (u64::from_be_bytes(n), 10)
        }
        126 | 127 => return None,
        n => (u64::from(n), 2),
    };
    let mask_at = header;
    if masked {
        header += 4;
    }
    let len = usize::try_from(len).ok()?;
    if buf.len() < header + len {
        buf.reserve(header + len - buf.len());
        return None;
    }
    let mut mask = [0u8; 4];
    if masked {
        mask.copy_from_slice(&buf[mask_at..mask_at + 4]);
    }
    buf.advance(header);
    let mut payload = buf.split_to(len);
    if masked {
        for (i, b) in payload.iter_mut().enumerate() {
            *b ^= mask[i & 3];
        }
    }
    Some((fin, opcode, payload))
}

/// The `Sec-WebSocket-Key` and whether the `auth` header is the admin password, once the whole
/// request is in `buf` (which then keeps only what follows it).
fn parse_upgrade(buf: &mut BytesMut, password: &str) -> Option<(String, bool)> {
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let request = buf.split_to(end);
    let request = String::from_utf8_lossy(&request);
    let mut key = None;
    let mut admin = false;
    for line in request.split("\r\n").skip(1) {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("sec-websocket-key") {
            key = Some(value.to_string());
        } else if name.eq_ignore_ascii_case("auth") {
            admin = value == password;
        }
    }
    Some((key.unwrap_or_default(), admin))
}

fn accept_key(key: &str) -> String {
    let mut sha = Sha1::new();
    sha.update(key.as_bytes());
    sha.update(ACCEPT_GUID.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(sha.finalize())
}

type State = crate::baseline::State<Arc<Outbox>>;

#[derive(Deserialize)]
struct Envelope<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    #[serde(borrow)]
    data: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct Targeted<'a> {
    target: Option<&'a str>,
    #[serde(borrow)]
    data: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct Connected<'a> {
    target: &'a str,
    user: Option<&'a str>,
}

/// The payload as sent, `{}` when absent or falsy (the protocol's rule, on the raw text).
fn bare(data: Option<&RawValue>) -> &str {
    match data.map(RawValue::get) {
        None | Some("null" | "false" | "0" | "\"\"" | "[]" | "{}") => "{}",
        Some(s) => s,
    }
}

fn targeted(data: Option<&RawValue>) -> Option<Targeted<'_>> {
    serde_json::from_str(data?.get()).ok()
}

/// Runs the raw-frame server until killed (or, with `exit_with_parent`, until the process that
/// started it goes away).
pub async fn serve(host: &str, port: u16, auth: String, exit_with_parent: bool) -> Result<()> {
    let state = Arc::new(State::new(auth));
    accept_forever("raw-server", host, port, exit_with_parent, |stream| {
        tokio::spawn(connection(stream, state.clone()));
    })
    .await
}

/// What one connection is to the relay.
struct Conn {
    id: String,
    n: u64,
    admin: bool,
    is_client: bool,
    is_server: bool,
    outbox: Arc<Outbox>,
}

async fn connection(mut stream: TcpStream, st: Arc<State>) {
    let mut buf = BytesMut::with_capacity(1024);
    let (key, admin) = loop {
        if let Some(upgrade) = parse_upgrade(&mut buf, &st.auth) {
            break upgrade;
        }
        if buf.len() > MAX_REQUEST || matches!(stream.read_buf(&mut buf).await, Ok(0) | Err(_)) {
            return;
        }
    };
    let response = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {}\r\n\r\n",
        accept_key(&key)
    );
    if stream.write_all(response.as_bytes()).await.is_err() {
        return;
    }
    let (mut read, write) = stream.into_split();
    let n = st.next.fetch_add(1, Ordering::Relaxed);
    let mut conn = Conn {
        id: format!("00000000-0000-4000-8000-{n:012x}"),
        n,
        admin,
        is_client: false,
        is_server: false,
        outbox: Arc::new(Outbox::default()),
    };
    let writer = tokio::spawn(writer(write, conn.outbox.clone()));
    // A fragmented message's parts so far (text and binary are handled alike).
    let mut message = BytesMut::new();
    'read: loop {
        while let Some((fin, opcode, payload)) = parse_frame(&mut buf) {
            match opcode {
                OP_TEXT | OP_BINARY if fin => handle(&st, &mut conn, &payload),
                OP_TEXT | OP_BINARY => message = payload,
                OP_CONTINUATION => {
                    message.extend_from_slice(&payload);
                    if fin {
                        let whole = std::mem::take(&mut message);
                        handle(&st, &mut conn, &whole);
                    }
                }
                OP_CLOSE => {
                    let code = &payload[..payload.len().min(2)];
                    conn.outbox.push(frame(OP_CLOSE, code));
                    break 'read;
                }
                OP_PING => conn.outbox.push(frame(0xA, &payload)),
                _ => {}
            }
        }
        if buf.capacity() - buf.len() < 512 {
            buf.reserve(4096);
        }
        if matches!(read.read_buf(&mut buf).await, Ok(0) | Err(_)) {
            break;
        }
    }
    if conn.is_client {
        let mut reg = st.write();
        reg.leave_group(&conn.id);
        reg.clients.remove(&conn.id);
    }
    if conn.is_server {
        lock(&st.servers).retain(|(k, _)| *k != conn.n);
    }
    conn.outbox.close();
    let _ = writer.await;
}

/// One whole message from the peer.
fn handle(st: &State, conn: &mut Conn, message: &[u8]) {
    let Ok(env) = serde_json::from_slice::<Envelope>(message) else {
        return;
    };
    match env.kind {
        "server_connect" => {
            if conn.admin && !conn.is_server {
                conn.is_server = true;
                lock(&st.servers).push((conn.n, conn.outbox.clone()));
            }
            conn.outbox.push(text(if conn.admin {
                r#"{"type":"server_connect","data":true}"#
            } else {
                r#"{"type":"server_connect","data":false}"#
            }));
        }
        "client_connect" => {
            if !conn.is_client {
                conn.is_client = true;
                st.write().clients.insert(
                    conn.id.clone(),
                    Client {
                        tx: conn.outbox.clone(),
                        group: None,
                    },
                );
            }
            // The client's data with its id added as `target` (no parsing: spliced in).
            let data = env.data.map(RawValue::get).unwrap_or("").trim();
            let fields = data
                .strip_prefix('{')
                .and_then(|d| d.strip_suffix('}'))
                .map(str::trim)
                .unwrap_or("");
            let sep = if fields.is_empty() { "" } else { "," };
            let forward = format!(
                r#"{{"type":"client_connect","data":{{{fields}{sep}"target":"{}"}}}}"#,
                conn.id
            );
            let servers = lock(&st.servers);
            if !servers.is_empty() {
                let i = st.rr.fetch_add(1, Ordering::Relaxed) % servers.len();
                servers[i].1.push(text(&forward));
            }
        }
        "client_connected" if conn.admin => {
            let Some(c) = env
                .data
                .and_then(|d| serde_json::from_str::<Connected>(d.get()).ok())
            else {
                return;
            };
            let group = match c.user {
                Some(u) if !u.is_empty() => u,
                _ => "public",
            };
            let mut reg = st.write();
            reg.leave_group(c.target);
            let Some(client) = reg.clients.get_mut(c.target) else {
                return;
            };
            client.group = Some(group.to_string());
            let outbox = client.tx.clone();
            reg.groups
                .entry(group.to_string())
                .or_default()
                .insert(c.target.to_string(), outbox.clone());
            drop(reg);
            outbox.push(text(&format!(
                r#"{{"type":"client_connected","data":{{"target":"{}"}}}}"#,
                c.target
            )));
        }
        "notify_client" if conn.admin || conn.is_client => {
            let Some(t) = targeted(env.data) else { return };
            let reg = st.read();
            if let Some(c) = t.target.and_then(|id| reg.clients.get(id)) {
                c.tx.push(text(bare(t.data)));
            }
        }
        "notify_group" if conn.admin || conn.is_client => {
            let Some(t) = targeted(env.data) else { return };
            let group = match t.target {
                Some(g) if !g.is_empty() => g,
                _ => "public",
            };
            // Built once; every member gets the same bytes.
            let frame = text(bare(t.data));
            let reg = st.read();
            if let Some(members) = reg.groups.get(group) {
                for outbox in members.values() {
                    outbox.push(frame.clone());
                }
            }
        }
        "notify_all" if conn.admin => {
            let frame = text(bare(env.data));
            let reg = st.read();
            for c in reg.clients.values() {
                c.tx.push(frame.clone());
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_accept_key_is_rfc_6455s_example() {
        assert_eq!(
            accept_key("dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[test]
    fn masked_frames_are_cut_and_unmasked() {
        // RFC 6455 §5.7: a masked "Hello", then the first byte of the next frame.
        let mut buf = BytesMut::from(
            &[
                0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58, 0x81,
            ][..],
        );
        let (fin, op, payload) = parse_frame(&mut buf).expect("a whole frame");
        assert!(fin);
        assert_eq!(op, OP_TEXT);
        assert_eq!(&payload[..], b"Hello");
        assert_eq!(&buf[..], &[0x81]);
        assert!(parse_frame(&mut buf).is_none());
    }

    #[test]
    fn frames_carry_16_and_64_bit_lengths() {
        assert_eq!(&text("Hello")[..2], &[0x81, 5]);
        let mid = frame(OP_BINARY, &[0; 256]);
        assert_eq!(&mid[..4], &[0x82, 126, 1, 0]);
        let big = frame(OP_BINARY, &[0; 70_000]);
        assert_eq!(&big[..2], &[0x82, 127]);
        assert_eq!(big.len(), 70_010);
        let mut back = BytesMut::from(&mid[..]);
        assert_eq!(parse_frame(&mut back).map(|f| f.2.len()), Some(256));
    }

    #[test]
    fn the_upgrade_request_gives_the_key_and_the_admin_flag() {
        let mut buf = BytesMut::from(
            &b"GET /ws HTTP/1.1\r\nHost: x\r\nSec-WebSocket-Key: abc==\r\nAUTH: pw\r\n\r\n\x81"[..],
        );
        assert_eq!(
            parse_upgrade(&mut buf, "pw"),
            Some(("abc==".to_string(), true))
        );
        assert_eq!(&buf[..], b"\x81");
        let mut partial = BytesMut::from(&b"GET / HTTP/1.1\r\n"[..]);
        assert_eq!(parse_upgrade(&mut partial, "pw"), None);
    }

    #[test]
    fn falsy_payloads_become_an_empty_object() {
        let raw = |s: &str| RawValue::from_string(s.to_string()).expect("json");
        assert_eq!(bare(None), "{}");
        assert_eq!(bare(Some(&raw("null"))), "{}");
        assert_eq!(bare(Some(&raw(r#"{"seq":1}"#))), r#"{"seq":1}"#);
    }
}
