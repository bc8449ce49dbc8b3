//! `notify_group`: delivers the bare `data.data` to every member of a group, named directly
//! or through a member's connection id (default `public`), then acks the outer
//! `data.callback` to the sender.

use serde_json::value::RawValue;

use std::sync::Arc;

use super::client_connected::PUBLIC_GROUP;
use super::{Flow, Session, Targeted};
use crate::cluster::Op;
use crate::hub::{Hub, Peer, looks_like_id};
use crate::protocol::{Data, ProtocolError, bare_frame};
use crate::server::Shared;

#[derive(Debug)]
pub struct NotifyGroup<'a> {
    /// A group name or a connection id; `None`: `public`.
    target: Option<String>,
    payload: Data<'a>,
    callback: Option<&'a RawValue>,
}

impl<'a> NotifyGroup<'a> {
    pub fn parse(data: Data<'a>) -> Result<NotifyGroup<'a>, ProtocolError> {
        let Targeted {
            target,
            payload,
            callback,
        } = Targeted::parse(data)?;
        Ok(NotifyGroup {
            target,
            payload,
            callback,
        })
    }

    fn group(&self, hub: &Hub) -> std::sync::Arc<str> {
        hub.resolve_group(self.target.as_deref().unwrap_or(PUBLIC_GROUP))
    }

    /// Delivers without checks (admins, the HTTP API); returns how many got it on this node.
    pub fn deliver(&self, shared: &Shared) -> usize {
        self.deliver_as(shared, None).unwrap_or_default()
    }

    /// Delivers; `client` is the sender when it is a client (see `NotifyClient`): its
    /// message for other nodes may be refused as `rate_limited` when the cluster is busy.
    fn deliver_as(
        &self,
        shared: &Shared,
        client: Option<&Arc<Peer>>,
    ) -> Result<usize, ProtocolError> {
        let target = self.target.as_deref().unwrap_or(PUBLIC_GROUP);
        let local_group = shared.hub.client(target).and_then(|c| c.group());
        let group = local_group
            .clone()
            .unwrap_or_else(|| std::sync::Arc::from(target));
        let frame = bare_frame(&self.payload.relay_text());
        let n = shared.hub.notify_group(&group, &frame);
        shared.metrics.sent("notify_group", n, frame.len());
        if let Some(cluster) = &shared.cluster {
            let frame = frame.as_str().to_string();
            // An id of a connection on another node: only that node knows its group.
            let op = if local_group.is_none() && looks_like_id(target) {
                Op::NotifyGroupOf {
                    target: target.to_string(),
                    frame,
                    from_client: client.is_some(),
                }
            } else {
                Op::NotifyGroup {
                    group: group.to_string(),
                    frame,
                }
            };
            match client {
                Some(client) => cluster.publish_from_client(shared, op, client)?,
                None => cluster.publish(shared, op),
            }
        }
        Ok(n)
    }

    pub fn apply(self, session: &mut Session) -> Result<Flow, ProtocolError> {
        session.may_notify("notify_group")?;
        let hub = &session.shared.hub;
        let own = session.peer.group().is_some_and(|g| g == self.group(hub));
        session.policy_allows(own)?;
        let client = (!session.admin).then_some(&session.peer);
        self.deliver_as(&session.shared, client)?;
        session.ack_callback(self.callback);
        Ok(Flow::Continue)
    }
}
