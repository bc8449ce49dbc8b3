//! The attackers' sockets: plain TCP from a chosen loopback source address, a WebSocket
//! upgrade written by hand and client frames built byte by byte. An attacker does not need a
//! WebSocket library; it needs to send what a library would never send (half a frame, a
//! fragment that never ends, a request and an immediate close) and to hold thousands of
//! sockets cheaply.

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::http::Uri;
use tokio_util::sync::CancellationToken;

use crate::common::{Target, bind_address_no_port};

/// Opcodes of RFC 6455 §5.2.
pub const TEXT: u8 = 0x1;

/// Every attacker frame uses this masking key: the server must unmask whatever key it gets,
/// and a constant lets one prebuilt buffer serve thousands of connections.
const MASK: [u8; 4] = [0x5a, 0x1c, 0x93, 0x27];

/// Longest HTTP response head read (an upgrade answer or a /healthz reply).
const MAX_HEAD: usize = 16 * 1024;

/// The loopback source address of attacker `i`: 127.0.0.2, 127.0.0.3, … with `per_source`
/// attackers each (the bystander, the backends and the probes use 127.0.0.1).
pub fn attacker_ip(i: usize, per_source: usize) -> Ipv4Addr {
    let k = u32::try_from(i / per_source.max(1)).unwrap_or(u32::MAX) % 65_000;
    Ipv4Addr::from(u32::from(Ipv4Addr::new(127, 0, 0, 2)) + k)
}

/// The address of the bystander, the backends, the probes and the health checker.
pub const HOME: Ipv4Addr = Ipv4Addr::LOCALHOST;

/// A TCP connection to `dst` from `src`; with `rcvbuf`, a receive buffer that small (set
/// before connecting, so the window the server sees is small from the start).
pub async fn tcp_from(
    src: Ipv4Addr,
    dst: SocketAddr,
    rcvbuf: Option<u32>,
) -> io::Result<TcpStream> {
    let sock = if dst.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if let Some(size) = rcvbuf {
        sock.set_recv_buffer_size(size)?;
    }
    if dst.is_ipv4() {
        bind_address_no_port(&sock);
        sock.bind(SocketAddr::new(IpAddr::V4(src), 0))?;
    }
    let stream = sock.connect(dst).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// `host:port` and the path of a `ws://` URL, for hand-written requests.
fn host_and_path(target: &Target) -> (String, String) {
    let path = target
        .url
        .parse::<Uri>()
        .ok()
        .and_then(|u| u.path_and_query().map(|p| p.as_str().to_string()))
        .filter(|p| !p.is_empty())
        .unwrap_or_else(|| "/".to_string());
    (target.addr.to_string(), path)
}

/// The upgrade request for `target`, with `extra` header lines (each ending in `\r\n`).
pub fn upgrade_request(target: &Target, extra: &str) -> Vec<u8> {
    let (host, path) = host_and_path(target);
    format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
    )
    .into_bytes()
}

/// Sends the upgrade request and reads the answer's head: Ok once the server answered 101,
/// Err with the status line (or the I/O error) otherwise. Bounded by `limit`.
pub async fn upgrade(
    stream: &mut TcpStream,
    target: &Target,
    extra: &str,
    limit: Duration,
) -> Result<(), String> {
    let request = upgrade_request(target, extra);
    let answer = tokio::time::timeout(limit, async {
        stream.write_all(&request).await?;
        read_head(stream).await
    })
    .await
    .map_err(|_| "no upgrade answer in time".to_string())?
    .map_err(|e| e.to_string())?;
    if answer.status == 101 {
        Ok(())
    } else {
        Err(answer.status_line)
    }
}

/// An HTTP response head (and the body bytes that came with it).
pub struct Head {
    pub status: u16,
    pub status_line: String,
    pub content_length: usize,
    /// Bytes after the head that were read with it.
    pub rest: Vec<u8>,
}

/// Reads up to the end of an HTTP response head (at most [`MAX_HEAD`] bytes).
pub async fn read_head(stream: &mut TcpStream) -> io::Result<Head> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    let end = loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed before a response",
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if buf.len() > MAX_HEAD {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "response head too long",
            ));
        }
    };
    let head = String::from_utf8_lossy(&buf[..end]).to_string();
    let status_line = head.lines().next().unwrap_or("").to_string();
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let content_length = head
        .lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.trim().parse().ok())
        .unwrap_or(0);
    Ok(Head {
        status,
        status_line,
        content_length,
        rest: buf[end..].to_vec(),
    })
}

/// One `GET path` on an open connection (keep-alive unless `close`); returns the status once
/// the whole body is read. Bounded by `limit`.
pub async fn http_get(
    stream: &mut TcpStream,
    host: &str,
    path: &str,
    close: bool,
    extra: &str,
    limit: Duration,
) -> io::Result<(u16, Vec<u8>)> {
    let conn = if close { "close" } else { "keep-alive" };
    let request =
        format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: {conn}\r\n{extra}\r\n");
    tokio::time::timeout(limit, async {
        stream.write_all(request.as_bytes()).await?;
        let head = read_head(stream).await?;
        let mut body = head.rest;
        // A body is bounded too: /metrics of a busy server is a few KiB.
        let want = head.content_length.min(1 << 20);
        let mut chunk = [0u8; 4096];
        while body.len() < want {
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                break;
            }
            body.extend_from_slice(&chunk[..n]);
        }
        Ok((head.status, body))
    })
    .await
    .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no HTTP answer in time"))?
}

/// Appends a masked client frame (`fin` false: a fragment that announces more).
pub fn frame(out: &mut Vec<u8>, opcode: u8, fin: bool, payload: &[u8]) {
    frame_header(out, opcode, fin, payload.len());
    mask_into(out, payload, 0);
}

/// Appends a masked client frame header announcing `len` payload bytes.
pub fn frame_header(out: &mut Vec<u8>, opcode: u8, fin: bool, len: usize) {
    out.push(if fin { 0x80 } else { 0 } | (opcode & 0x0f));
    if len < 126 {
        out.push(0x80 | len as u8);
    } else if let Ok(short) = u16::try_from(len) {
        out.push(0x80 | 126);
        out.extend_from_slice(&short.to_be_bytes());
    } else {
        out.push(0x80 | 127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
    out.extend_from_slice(&MASK);
}

/// Appends `payload` masked as bytes `offset..` of a frame's payload.
pub fn mask_into(out: &mut Vec<u8>, payload: &[u8], offset: usize) {
    out.extend(
        payload
            .iter()
            .enumerate()
            .map(|(i, b)| b ^ MASK[(offset + i) % 4]),
    );
}

/// A text frame holding `text`.
pub fn text_frame(text: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len() + 14);
    frame(&mut out, TEXT, true, text.as_bytes());
    out
}

/// The kernel's view of a socket (`tcpi_state`): established, or closed by the server.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum SockState {
    Open,
    /// The server sent FIN (CLOSE_WAIT) or reset it (CLOSE).
    ClosedByServer,
    Other,
}

/// Reads `TCP_INFO`'s first byte without reading the socket: whether the server has closed a
/// connection whose unread data we never want to read.
pub fn sock_state(stream: &TcpStream) -> SockState {
    use std::os::fd::AsRawFd;
    let mut info = [0u8; 256];
    let mut len = info.len() as libc::socklen_t;
    // SAFETY: a valid socket fd, a buffer of `len` bytes and its length.
    let r = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            info.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if r != 0 || len == 0 {
        return SockState::Other;
    }
    // linux/tcp.h: TCP_ESTABLISHED 1, TCP_CLOSE 7, TCP_CLOSE_WAIT 8.
    match info[0] {
        1 => SockState::Open,
        7 | 8 => SockState::ClosedByServer,
        _ => SockState::Other,
    }
}

/// Holds an attacker connection until `release`, reading and discarding what arrives when
/// `read` (a peer that keeps up) or never reading (a peer that lets replies pile up).
/// Returns the socket's state at release and whether the server ended it before.
pub async fn hold(mut stream: TcpStream, read: bool, release: CancellationToken) -> SockState {
    if !read {
        release.cancelled().await;
        return sock_state(&stream);
    }
    let mut buf = [0u8; 2048];
    loop {
        tokio::select! {
            _ = release.cancelled() => return sock_state(&stream),
            r = stream.read(&mut buf) => match r {
                Ok(0) | Err(_) => return SockState::ClosedByServer,
                Ok(_) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unmask(frame: &[u8], header: usize) -> Vec<u8> {
        frame[header..]
            .iter()
            .enumerate()
            .map(|(i, b)| b ^ MASK[i % 4])
            .collect()
    }

    #[test]
    fn frames_are_masked_with_the_right_length() {
        let small = text_frame("{\"type\":\"notify_all\"}");
        assert_eq!(small[0], 0x81);
        assert_eq!(small[1], 0x80 | 21);
        assert_eq!(unmask(&small, 6), b"{\"type\":\"notify_all\"}");
        let mid = text_frame(&"x".repeat(300));
        assert_eq!(&mid[1..4], &[0x80 | 126, 1, 44]);
        assert_eq!(unmask(&mid, 8), "x".repeat(300).as_bytes());
        let mut big = Vec::new();
        frame_header(&mut big, TEXT, false, 70_000);
        assert_eq!(big[0], 0x01);
        assert_eq!(big[1], 0x80 | 127);
        assert_eq!(big.len(), 14);
    }

    #[test]
    fn masking_continues_at_an_offset() {
        let mut whole = Vec::new();
        mask_into(&mut whole, b"abcdefg", 0);
        let mut parts = Vec::new();
        mask_into(&mut parts, b"abc", 0);
        mask_into(&mut parts, b"defg", 3);
        assert_eq!(whole, parts);
    }

    #[test]
    fn attackers_spread_over_addresses() {
        assert_eq!(attacker_ip(0, 1000), Ipv4Addr::new(127, 0, 0, 2));
        assert_eq!(attacker_ip(999, 1000), Ipv4Addr::new(127, 0, 0, 2));
        assert_eq!(attacker_ip(1000, 1000), Ipv4Addr::new(127, 0, 0, 3));
        assert_eq!(attacker_ip(300 * 1000, 1000), Ipv4Addr::new(127, 0, 1, 46));
    }
}
