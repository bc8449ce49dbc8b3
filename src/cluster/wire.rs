//! What nodes say to each other over Redis: a sequence number, a space, and one JSON object
//! tagged by `op`, carrying frames already encoded for the recipients.

use serde::{Deserialize, Serialize};

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
        frame: String,
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
    /// Heartbeat: the sender is alive and has these servers.
    Servers {
        servers: Vec<String>,
    },
    /// The sender is shutting down.
    Leaving,
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
