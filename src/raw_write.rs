//! The raw write path: queued text frames go to the socket as WebSocket frames built here
//! (an unmasked server frame is a 2–10 byte header and the payload), in one vectored write
//! per batch, not through tungstenite's per-frame framing and its write buffer.
//!
//! tungstenite still reads, and still writes its own frames (pongs, close replies, our pings
//! and close frames): the socket ([`crate::memory::Counted`]) writes what is held here first,
//! so the two never interleave inside a frame. Frames are put here only when tungstenite's own
//! buffer is empty (see `connection::write_batch`).

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::{Mutex, MutexGuard};
use std::task::{Context, Poll, ready};

use tokio::io::AsyncWrite;
use tokio_tungstenite::tungstenite::{Bytes, Utf8Bytes};

/// Most slices given to one vectored write (two per frame).
const MAX_SLICES: usize = 128;
/// Slices for a short queue (the usual case: a few frames per wake-up).
const FEW_SLICES: usize = 16;

/// Frames built and not yet (wholly) written to the socket, in order.
#[derive(Debug, Default)]
pub struct Unwritten(Mutex<VecDeque<Raw>>);

/// One frame: its header and its payload, and how much of both is written already.
#[derive(Debug)]
struct Raw {
    head: [u8; 10],
    head_len: u8,
    payload: Bytes,
    /// Bytes of header then payload written so far.
    done: usize,
}

impl Raw {
    fn text(payload: &Utf8Bytes) -> Raw {
        let payload: Bytes = payload.clone().into();
        let len = payload.len();
        let mut head = [0u8; 10];
        // FIN and opcode 1 (text); a server's frames are not masked.
        head[0] = 0x81;
        let head_len = if len < 126 {
            head[1] = len as u8;
            2
        } else if let Ok(len) = u16::try_from(len) {
            head[1] = 126;
            head[2..4].copy_from_slice(&len.to_be_bytes());
            4
        } else {
            head[1] = 127;
            head[2..10].copy_from_slice(&(len as u64).to_be_bytes());
            10
        };
        Raw {
            head,
            head_len,
            payload,
            done: 0,
        }
    }

    fn len(&self) -> usize {
        usize::from(self.head_len) + self.payload.len()
    }

    /// What is left to write of it, as one or two slices.
    fn slices<'a>(&'a self, out: &mut [IoSlice<'a>], at: &mut usize) {
        let head_len = usize::from(self.head_len);
        if self.done < head_len {
            out[*at] = IoSlice::new(&self.head[self.done..head_len]);
            *at += 1;
        }
        let from = self.done.saturating_sub(head_len);
        if from < self.payload.len() {
            out[*at] = IoSlice::new(&self.payload[from..]);
            *at += 1;
        }
    }
}

impl Unwritten {
    fn lock(&self) -> MutexGuard<'_, VecDeque<Raw>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds text frames (their payloads are shared, not copied), in order.
    pub fn push_text<'a>(&self, frames: impl IntoIterator<Item = &'a Utf8Bytes>) {
        let frames = frames.into_iter();
        let mut queue = self.lock();
        // One allocation for the batch, not one per doubling.
        queue.reserve(frames.size_hint().0);
        for frame in frames {
            queue.push_back(Raw::text(frame));
        }
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    /// Forgets the frames not begun yet (a connection closed for not reading drops its unsent
    /// frames); a frame half written stays, so the stream stays valid for a close frame.
    pub fn drop_unstarted(&self) {
        let mut queue = self.lock();
        let keep = usize::from(queue.front().is_some_and(|raw| raw.done > 0));
        queue.truncate(keep);
        if queue.is_empty() {
            *queue = VecDeque::new();
        }
    }

    /// Forgets everything (the socket is gone).
    pub fn clear(&self) {
        *self.lock() = VecDeque::new();
    }

    /// Writes what is held to `io` until it is all written (`Ready(Ok)`), the socket is full
    /// (`Pending`) or fails. An emptied queue gives its memory back: an idle connection
    /// keeps none.
    pub fn poll_write_to<W: AsyncWrite + Unpin>(
        &self,
        mut io: Pin<&mut W>,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<()>> {
        let mut queue = self.lock();
        while !queue.is_empty() {
            // A few slices for the usual few frames: the array is filled in, whatever its size.
            let written = if queue.len() <= FEW_SLICES / 2 {
                write_some::<W, FEW_SLICES>(&queue, io.as_mut(), cx)
            } else {
                write_some::<W, MAX_SLICES>(&queue, io.as_mut(), cx)
            };
            let mut left = match written {
                Poll::Ready(Ok(0)) => {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                Poll::Ready(Ok(n)) => n,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            };
            while left > 0 {
                let Some(front) = queue.front_mut() else {
                    break;
                };
                let rest = front.len() - front.done;
                if left >= rest {
                    left -= rest;
                    queue.pop_front();
                } else {
                    front.done += left;
                    left = 0;
                }
            }
        }
        *queue = VecDeque::new();
        Poll::Ready(Ok(()))
    }

    /// [`Unwritten::poll_write_to`], then `buf` straight to `io` (a frame of tungstenite's,
    /// after ours): `Pending` while ours are not all written, so nothing interleaves.
    pub fn poll_write_after<W: AsyncWrite + Unpin>(
        &self,
        mut io: Pin<&mut W>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        ready!(self.poll_write_to(io.as_mut(), cx))?;
        io.poll_write(cx, buf)
    }
}

/// One vectored write of the frames at the front of `queue`, at most `N / 2` of them.
fn write_some<W: AsyncWrite + Unpin, const N: usize>(
    queue: &VecDeque<Raw>,
    io: Pin<&mut W>,
    cx: &mut Context<'_>,
) -> Poll<io::Result<usize>> {
    let mut slices = [IoSlice::new(&[]); N];
    let mut count = 0;
    for raw in queue.iter().take(N / 2) {
        raw.slices(&mut slices, &mut count);
    }
    io.poll_write_vectored(cx, &slices[..count])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_follow_rfc_6455_lengths() {
        for (len, head) in [
            (0usize, vec![0x81, 0]),
            (125, vec![0x81, 125]),
            (126, vec![0x81, 126, 0, 126]),
            (65535, vec![0x81, 126, 0xff, 0xff]),
            (65536, vec![0x81, 127, 0, 0, 0, 0, 0, 1, 0, 0]),
        ] {
            let text = Utf8Bytes::from("x".repeat(len));
            let raw = Raw::text(&text);
            assert_eq!(&raw.head[..usize::from(raw.head_len)], &head[..], "{len}");
        }
    }

    /// Writes in small pieces (a socket that takes 7 bytes at a time) still give every frame
    /// whole and in order.
    #[tokio::test]
    async fn partial_writes_keep_frames_whole() {
        struct Trickle(Vec<u8>);
        impl AsyncWrite for Trickle {
            fn poll_write(
                mut self: Pin<&mut Self>,
                _: &mut Context<'_>,
                buf: &[u8],
            ) -> Poll<io::Result<usize>> {
                let n = buf.len().min(7);
                self.0.extend_from_slice(&buf[..n]);
                Poll::Ready(Ok(n))
            }
            fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
                Poll::Ready(Ok(()))
            }
            fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
                Poll::Ready(Ok(()))
            }
        }
        let unwritten = Unwritten::default();
        let frames: Vec<Utf8Bytes> = ["a", "hello", &"y".repeat(300)]
            .into_iter()
            .map(Utf8Bytes::from)
            .collect();
        unwritten.push_text(&frames);
        let mut io = Trickle(Vec::new());
        std::future::poll_fn(|cx| unwritten.poll_write_to(Pin::new(&mut io), cx))
            .await
            .unwrap();
        let mut expected = vec![0x81, 1, b'a', 0x81, 5];
        expected.extend_from_slice(b"hello");
        expected.extend_from_slice(&[0x81, 126, 1, 44]);
        expected.extend_from_slice("y".repeat(300).as_bytes());
        assert_eq!(io.0, expected);
        assert!(unwritten.is_empty());
    }
}
