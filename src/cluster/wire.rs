//! What nodes say to each other: `<seq> <header>`, or `<seq> <header>\n<frame>` when the
//! message carries a frame. The header is one JSON object, its `op` an externally tagged
//! enum (`{"deliver":{…}}`): read in one pass, where an internally tagged or flattened one
//! is first buffered whole. The frame (what the recipients get, already encoded) follows the
//! header as it is, not as a JSON string: no escaping it on one node and unescaping it on the
//! other, whatever its size. (Compact JSON never holds a raw newline, so the first one ends
//! the header.)
//!
//! Nodes of this version do not read earlier versions' messages (those went to one channel
//! every node read; these are routed to topics): a cluster is upgraded all at once.

use serde::{Deserialize, Serialize};
use tokio_tungstenite::tungstenite::Utf8Bytes;

use crate::delivery::{Delivery, Text};

#[derive(Debug, Serialize, Deserialize)]
pub struct Wire {
    /// The sending node's tag; a node ignores its own messages.
    pub from: String,
    pub op: Op,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Op {
    /// A delivery for this node's connections. `from_client`: a client sent it, so what the
    /// receiver passes on (a group it resolved) waits in its client lane, never ahead of
    /// admin traffic.
    Deliver {
        delivery: Delivery,
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        from_client: bool,
        /// Sent twice, to a group's topic and to a node that may still be subscribing to it
        /// (see `Cluster::recent_joins`): the number, per sender, by which the second copy
        /// is dropped.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        twin: Option<u64>,
    },
    /// A `client_connect` for server `server` on node `node`. `id` numbers the sender's
    /// forwards, so its receipt names this one and not an earlier attempt.
    Forward {
        node: String,
        server: String,
        client: String,
        frame: SharedFrame,
        id: u64,
    },
    /// Receipt to node `node`: its forward `id` for `client` was queued for the server.
    Forwarded {
        node: String,
        client: String,
        id: u64,
    },
    /// To node `node`: its forward `id` for `client` could not be queued (the server left or
    /// is full); the sender forwards it elsewhere.
    ForwardFailed {
        node: String,
        client: String,
        id: u64,
    },
    /// A client's call (`invoke`) for server `server` on node `node`. `client` and `id` (the
    /// call's canonical id; none for a SignalR `send`) let the receiver answer the caller
    /// `no_server` when that server has left or is full. Never retried: the caller's
    /// deadline answers a call lost with its node.
    Invoke {
        node: String,
        server: String,
        client: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<String>,
        frame: SharedFrame,
    },
    /// To node `node`: the sender applied its change `id` (a `membership` or a
    /// `disconnect`), which matched `count` connections there.
    Applied { node: String, id: u64, count: usize },
    /// Heartbeat: the sender is alive and has these servers.
    Servers { servers: Vec<String> },
    /// The sender is shutting down.
    Leaving,
    /// A presence query (SPEC §12) to every node; each answers `Answer` with the same `id` on
    /// the asker's own topic.
    Query {
        id: u64,
        query: crate::presence::Query,
    },
    /// A node's answer to the sender's query `id`.
    Answer {
        id: u64,
        answer: crate::presence::Answer,
    },
}

/// A frame carried to another node, shared with the local queues that hold it too (the
/// pending queue, the forwards in flight): queuing it copies nothing, and it is encoded as a
/// JSON string only when published.
pub type SharedFrame = Text;

impl Op {
    /// Bytes this message holds while it waits (its texts, not their JSON escaping), what
    /// the backlog charges for it; known without encoding it.
    pub fn size(&self) -> usize {
        let texts = |texts: &[&str]| texts.iter().map(|t| t.len()).sum::<usize>();
        match self {
            Op::Deliver { delivery, .. } => delivery.size(),
            Op::Forward {
                node,
                server,
                client,
                frame,
                ..
            } => texts(&[node, server, client, frame.as_str()]),
            Op::Forwarded { node, client, .. } | Op::ForwardFailed { node, client, .. } => {
                texts(&[node, client])
            }
            Op::Invoke {
                node,
                server,
                client,
                id,
                frame,
            } => texts(&[node, server, client, frame.as_str()]) + id.as_deref().map_or(0, str::len),
            Op::Applied { node, .. } => node.len(),
            Op::Servers { servers } => servers.iter().map(|s| s.len()).sum(),
            Op::Leaving => 0,
            Op::Query { query, .. } => query.size(),
            Op::Answer { answer, .. } => answer.size(),
        }
    }
}

impl Op {
    /// The frame this message carries, if any.
    fn frame_mut(&mut self) -> Option<&mut Text> {
        match self {
            Op::Deliver { delivery, .. } => delivery.frame_mut(),
            Op::Forward { frame, .. } | Op::Invoke { frame, .. } => Some(frame),
            _ => None,
        }
    }
}

impl Wire {
    /// `<seq> <header>[\n<frame>]`.
    pub fn encode_stamped(mut self, seq: u64) -> String {
        let frame = self
            .op
            .frame_mut()
            .map(|frame| std::mem::replace(frame, Text(Utf8Bytes::from_static(""))));
        let mut out = format!("{seq} ").into_bytes();
        // Writing to a Vec cannot fail; the header has only strings and numbers.
        let _ = serde_json::to_writer(&mut out, &self);
        if let Some(frame) = frame {
            out.push(b'\n');
            out.extend_from_slice(frame.as_bytes());
        }
        String::from_utf8(out).unwrap_or_default()
    }

    /// Reads what [`Wire::encode_stamped`] wrote.
    pub fn decode_stamped(bytes: &[u8]) -> Option<(u64, Wire)> {
        let text = std::str::from_utf8(bytes).ok()?;
        let (seq, rest) = text.split_once(' ')?;
        let (header, frame) = match rest.split_once('\n') {
            Some((header, frame)) => (header, Some(frame)),
            None => (rest, None),
        };
        let mut wire: Wire = serde_json::from_str(header).ok()?;
        if let (Some(slot), Some(frame)) = (wire.op.frame_mut(), frame) {
            *slot = Text(Utf8Bytes::from(frame.to_string()));
        }
        Some((seq.parse().ok()?, wire))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_delivery_survives_the_wire() {
        let wire = Wire {
            from: "0000abcd".into(),
            op: Op::Deliver {
                delivery: Delivery::Group {
                    group: "g \"1\"".into(),
                    frame: Text(Utf8Bytes::from_static("{\"a\":\"x\\ny\"}\n")),
                },
                from_client: true,
                twin: None,
            },
        };
        let text = wire.encode_stamped(7);
        let (seq, back) = Wire::decode_stamped(text.as_bytes()).expect("decodes");
        assert_eq!(seq, 7);
        assert_eq!(back.from, "0000abcd");
        let Op::Deliver {
            delivery: Delivery::Group { group, frame },
            from_client: true,
            twin: None,
        } = back.op
        else {
            panic!("not the group delivery: {text}");
        };
        assert_eq!(&*group, "g \"1\"");
        // As it was, escapes and newlines included: it is not in the JSON header.
        assert_eq!(frame.as_str(), "{\"a\":\"x\\ny\"}\n");
        assert!(!text.contains("\\\"a\\\""), "the frame was escaped: {text}");
        assert!(Wire::decode_stamped(b"garbage").is_none());
        assert!(Wire::decode_stamped(b"{\"from\":\"x\",\"op\":\"leaving\"}").is_none());
        let (_, leaving) = Wire::decode_stamped(b"3 {\"from\":\"x\",\"op\":\"leaving\"}")
            .expect("a unit variant is its name");
        assert!(matches!(leaving.op, Op::Leaving));
    }
}
