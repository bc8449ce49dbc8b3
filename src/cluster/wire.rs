//! What nodes say to each other over Redis: a sequence number, a space, and one JSON object
//! tagged by `op`, carrying frames already encoded for the recipients.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use tokio_tungstenite::tungstenite::Utf8Bytes;

use crate::hub::Filter;

#[derive(Debug, Serialize, Deserialize)]
pub struct Wire {
    /// The sending node; a node ignores its own messages.
    pub from: String,
    #[serde(flatten)]
    pub op: Op,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Op {
    NotifyAll {
        frame: String,
    },
    NotifyClient {
        target: String,
        frame: String,
    },
    NotifyGroup {
        group: String,
        frame: String,
    },
    /// To the group of connection `target`, which only its own node knows.
    NotifyGroupOf {
        target: String,
        frame: String,
        /// Sent by a client, not an admin: the node that resolves the group republishes it
        /// in its client lane, never ahead of admin traffic.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        from_client: bool,
    },
    Publish {
        channel: String,
        filter: Filter,
        frame: String,
    },
    /// `client_connected` for a client on another node; `frame` is what the client receives.
    Acknowledge {
        target: String,
        group: String,
        user: Option<String>,
        roles: Vec<String>,
        groups: Vec<String>,
        frame: String,
    },
    /// A `client_connect` for server `server` on node `node`. `id` numbers the sender's
    /// forwards, so its receipt names this one and not an earlier attempt (0 from nodes of
    /// an earlier version, which expect no receipt).
    Forward {
        node: String,
        server: String,
        client: String,
        frame: SharedFrame,
        #[serde(default)]
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
    /// Heartbeat: the sender is alive and has these servers. `receipts`: it answers forwards
    /// with `Forwarded`/`ForwardFailed` (false from nodes of an earlier version, which never
    /// do: a forward to them is not judged by a receipt that cannot come).
    Servers {
        servers: Vec<String>,
        #[serde(default)]
        receipts: bool,
    },
    /// The sender is shutting down.
    Leaving,
}

/// A frame carried to another node, shared with the local queues that hold it too (the
/// pending queue, the forwards in flight): queuing it copies nothing, and it is encoded as a
/// JSON string only when published.
#[derive(Debug, Clone)]
pub struct SharedFrame(pub Utf8Bytes);

impl Serialize for SharedFrame {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.0.as_str())
    }
}

impl<'de> Deserialize<'de> for SharedFrame {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer).map(|text| SharedFrame(Utf8Bytes::from(text)))
    }
}

impl Op {
    /// Bytes this message holds while it waits (its texts, not their JSON escaping), what
    /// the backlog charges for it; known without encoding it.
    pub fn size(&self) -> usize {
        let texts = |texts: &[&str]| texts.iter().map(|t| t.len()).sum::<usize>();
        match self {
            Op::NotifyAll { frame } => frame.len(),
            Op::NotifyClient { target, frame } | Op::NotifyGroupOf { target, frame, .. } => {
                texts(&[target, frame])
            }
            Op::NotifyGroup { group, frame } => texts(&[group, frame]),
            Op::Publish {
                channel,
                filter,
                frame,
            } => {
                let names = match filter {
                    Filter::All => 0,
                    Filter::Roles(names) | Filter::Groups(names) | Filter::Users(names) => {
                        names.iter().map(|n| n.len()).sum()
                    }
                };
                texts(&[channel, frame]) + names
            }
            Op::Acknowledge {
                target,
                group,
                user,
                roles,
                groups,
                frame,
            } => {
                texts(&[target, group, user.as_deref().unwrap_or_default(), frame])
                    + roles.iter().chain(groups).map(|r| r.len()).sum::<usize>()
            }
            Op::Forward {
                node,
                server,
                client,
                frame,
                ..
            } => texts(&[node, server, client, frame.0.as_str()]),
            Op::Forwarded { node, client, .. } | Op::ForwardFailed { node, client, .. } => {
                texts(&[node, client])
            }
            Op::Servers { servers, .. } => servers.iter().map(|s| s.len()).sum(),
            Op::Leaving => 0,
        }
    }
}

impl Wire {
    pub fn encode(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Reads `<seq> <json>`, as the publisher sends it, or a bare JSON message (no sequence
    /// number, so never taken for a duplicate) as a node of an earlier version sends it.
    pub fn decode_stamped(bytes: &[u8]) -> Option<(Option<u64>, Wire)> {
        let text = std::str::from_utf8(bytes).ok()?;
        if text.starts_with('{') {
            return Some((None, serde_json::from_str(text).ok()?));
        }
        let (seq, json) = text.split_once(' ')?;
        Some((Some(seq.parse().ok()?), serde_json::from_str(json).ok()?))
    }
}
