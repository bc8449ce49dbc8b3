//! What nodes say to each other: a sequence number, a space, and one JSON object, its `op`
//! an externally tagged enum (`{"deliver":{…}}`): read in one pass, where an internally
//! tagged or flattened one is first buffered whole (it was most of the cost of a received
//! message). Deliveries carry their frames already encoded for the recipients.
//!
//! Nodes of this version do not read earlier versions' messages (those went to one channel
//! every node read; these are routed to topics): a cluster is upgraded all at once.

use serde::{Deserialize, Serialize};

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
    /// Heartbeat: the sender is alive and has these servers.
    Servers { servers: Vec<String> },
    /// The sender is shutting down.
    Leaving,
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
            Op::Servers { servers } => servers.iter().map(|s| s.len()).sum(),
            Op::Leaving => 0,
        }
    }
}

impl Wire {
    pub fn encode(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Reads `<seq> <json>`, as the publisher sends it.
    pub fn decode_stamped(bytes: &[u8]) -> Option<(u64, Wire)> {
        let text = std::str::from_utf8(bytes).ok()?;
        let (seq, json) = text.split_once(' ')?;
        Some((seq.parse().ok()?, serde_json::from_str(json).ok()?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_tungstenite::tungstenite::Utf8Bytes;

    #[test]
    fn a_delivery_survives_the_wire() {
        let wire = Wire {
            from: "0000abcd".into(),
            op: Op::Deliver {
                delivery: Delivery::Group {
                    group: "g \"1\"".into(),
                    frame: Text(Utf8Bytes::from_static("{\"a\":1}")),
                },
                from_client: true,
                twin: None,
            },
        };
        let text = format!("7 {}", wire.encode());
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
        assert_eq!(frame.as_str(), "{\"a\":1}");
        assert!(Wire::decode_stamped(b"garbage").is_none());
        assert!(Wire::decode_stamped(b"{\"from\":\"x\",\"op\":\"leaving\"}").is_none());
        let (_, leaving) = Wire::decode_stamped(b"3 {\"from\":\"x\",\"op\":\"leaving\"}")
            .expect("a unit variant is its name");
        assert!(matches!(leaving.op, Op::Leaving));
    }
}
