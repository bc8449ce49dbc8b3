//! What an event asks to be delivered, as one value. The events (WebSocket or HTTP API) parse
//! and authorise themselves and produce a [`Delivery`]; [`crate::relay::Relay::deliver`]
//! delivers it to this node's connections and hands the same value to the backplane, and a
//! node that receives it from the backplane delivers it with the same code. No event knows
//! whether there is a cluster.
//!
//! Frames are encoded once, by the event, for every recipient on every node.

use std::sync::Arc;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use tokio_tungstenite::tungstenite::Utf8Bytes;

use crate::hub::{Acknowledgement, Filter};
use crate::peer::Peer;

/// One delivery: whom, and the frame they get.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Delivery {
    /// `notify_all`: every registered client.
    All { frame: Text },
    /// `notify_client`: one connection, by id.
    Client { target: Box<str>, frame: Text },
    /// `notify_group`: every member of a group, by name.
    Group { group: Arc<str>, frame: Text },
    /// `notify_group` to a connection id: the members of that connection's group, which only
    /// the node holding that connection knows.
    GroupOf { target: Box<str>, frame: Text },
    /// `publish`: a channel's subscribers that the filter admits.
    Channel {
        channel: Arc<str>,
        filter: Filter,
        frame: Text,
    },
    /// `client_connected`: acknowledges a client, which then gets `frame`.
    Acknowledge {
        target: Box<str>,
        group: Arc<str>,
        user: Option<Arc<str>>,
        roles: Vec<String>,
        groups: Vec<String>,
        frame: Text,
    },
    /// `invoke_result`: completes call `id` (canonical JSON) of connection `target`, on the
    /// node that holds it, if that call is in flight there (see [`crate::invoke`]). `frame`
    /// is the raw JSON of the server's `data`, or of its `error` when `error` is set.
    InvokeResult {
        target: Box<str>,
        id: Box<str>,
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        error: bool,
        frame: Text,
    },
    /// `membership` (SPEC §12): a change of runtime roles or groups, applied by every node
    /// (a user's) or by the connection's node (a target's), each confirming to `ack`.
    Membership {
        change: crate::membership::Change,
        ack: Option<crate::membership::Ack>,
    },
    /// `disconnect` (SPEC §12): closes connections, each node confirming to `ack`.
    Disconnect {
        order: crate::membership::Disconnect,
        ack: Option<crate::membership::Ack>,
    },
}

impl Delivery {
    pub fn acknowledge(target: Box<str>, ack: Acknowledgement, frame: Utf8Bytes) -> Delivery {
        Delivery::Acknowledge {
            target,
            group: ack.group,
            user: ack.user,
            roles: ack.roles,
            groups: ack.groups,
            frame: Text(frame),
        }
    }

    /// The frame its recipients get; none for a change of state (`membership`,
    /// `disconnect`).
    pub fn frame_mut(&mut self) -> Option<&mut Text> {
        match self {
            Delivery::All { frame }
            | Delivery::Client { frame, .. }
            | Delivery::Group { frame, .. }
            | Delivery::GroupOf { frame, .. }
            | Delivery::Channel { frame, .. }
            | Delivery::Acknowledge { frame, .. }
            | Delivery::InvokeResult { frame, .. } => Some(frame),
            Delivery::Membership { .. } | Delivery::Disconnect { .. } => None,
        }
    }

    /// Bytes it holds while it waits to be published (its texts, not their JSON escaping):
    /// known without encoding it.
    pub fn size(&self) -> usize {
        let names = |names: &[String]| names.iter().map(String::len).sum::<usize>();
        match self {
            Delivery::All { frame } => frame.len(),
            Delivery::Client { target, frame } | Delivery::GroupOf { target, frame } => {
                target.len() + frame.len()
            }
            Delivery::Group { group, frame } => group.len() + frame.len(),
            Delivery::Channel {
                channel,
                filter,
                frame,
            } => {
                let filter = match filter {
                    Filter::All => 0,
                    Filter::Roles(n)
                    | Filter::Groups(n)
                    | Filter::Users(n)
                    | Filter::Clients(n) => names(n),
                };
                channel.len() + filter + frame.len()
            }
            Delivery::Acknowledge {
                target,
                group,
                user,
                roles,
                groups,
                frame,
            } => {
                target.len()
                    + group.len()
                    + user.as_deref().map_or(0, str::len)
                    + names(roles)
                    + names(groups)
                    + frame.len()
            }
            Delivery::InvokeResult {
                target, id, frame, ..
            } => target.len() + id.len() + frame.len(),
            Delivery::Membership { change, .. } => change.size(),
            Delivery::Disconnect { order, .. } => order.size(),
        }
    }
}

/// Who sent a delivery: an admin's is never refused for load; a client's waits in the
/// cluster's client lane and may be refused when that lane, or the client's share of it, is
/// full (so clients never crowd out admins).
#[derive(Clone, Copy)]
pub enum Sender<'a> {
    Admin,
    Client(&'a Arc<Peer>),
    /// A client on another node, whose delivery this node passes on (a group it resolved):
    /// the client lane, with no connection here to charge.
    Relayed,
}

/// Where a delivery goes beyond this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// Every node.
    All,
    /// The node that holds connection `target`.
    Owner(Box<str>),
    /// The nodes with members in this group.
    Group(Arc<str>),
    /// The nodes with subscribers to this channel, and those with SignalR connections
    /// (which receive every publish; see [`crate::backplane::Topic::SignalR`]).
    Channel(Arc<str>),
}

/// A frame, shared by every queue that holds it; written as a JSON string on the backplane.
#[derive(Debug, Clone)]
pub struct Text(pub Utf8Bytes);

impl From<Utf8Bytes> for Text {
    fn from(frame: Utf8Bytes) -> Text {
        Text(frame)
    }
}

impl std::ops::Deref for Text {
    type Target = Utf8Bytes;

    fn deref(&self) -> &Utf8Bytes {
        &self.0
    }
}

impl Serialize for Text {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.0.as_str())
    }
}

impl<'de> Deserialize<'de> for Text {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer).map(|text| Text(Utf8Bytes::from(text)))
    }
}
