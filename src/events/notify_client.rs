//! `notify_client`: delivers the bare `data.data` to one connection (by default the sender),
//! then acks `data.callback` to the sender, also when the target does not exist.

use serde_json::value::RawValue;

use std::sync::Arc;

use super::{Flow, Session, Targeted};
use crate::cluster::Op;
use crate::hub::Peer;
use crate::protocol::{Data, ProtocolError, bare_frame};
use crate::server::Shared;

#[derive(Debug)]
pub struct NotifyClient<'a> {
    /// `None`: the sender itself.
    target: Option<String>,
    payload: Data<'a>,
    callback: Option<&'a RawValue>,
}

impl<'a> NotifyClient<'a> {
    pub fn parse(data: Data<'a>) -> Result<NotifyClient<'a>, ProtocolError> {
        let Targeted {
            target,
            payload,
            callback,
        } = Targeted::parse(data)?;
        Ok(NotifyClient {
            target,
            payload,
            callback,
        })
    }

    /// Delivers without checks (admins, the HTTP API); returns how many got it.
    pub fn deliver(&self, shared: &Shared, default_target: &str) -> usize {
        self.deliver_as(shared, default_target, None)
            .unwrap_or_default()
    }

    /// Delivers; `client` is the sender when it is a client, not an admin: what it sends to
    /// other nodes waits in the cluster's client lane, and is refused (`rate_limited`) when
    /// that lane or its share of it is full, so clients never crowd out admins.
    fn deliver_as(
        &self,
        shared: &Shared,
        default_target: &str,
        client: Option<&Arc<Peer>>,
    ) -> Result<usize, ProtocolError> {
        let target = self.target.as_deref().unwrap_or(default_target);
        let frame = bare_frame(&self.payload.relay_text());
        let len = frame.len();
        let cluster_frame = shared.cluster.as_ref().map(|_| frame.as_str().to_string());
        let n = shared.hub.notify_client(target, frame);
        shared.metrics.sent("notify_client", n, len);
        // Not here: the node that has it (if any) delivers.
        if n == 0
            && let (Some(cluster), Some(frame)) = (&shared.cluster, cluster_frame)
        {
            let target = target.to_string();
            let op = Op::NotifyClient { target, frame };
            match client {
                Some(client) => cluster.publish_from_client(shared, op, client)?,
                None => cluster.publish(shared, op),
            }
        }
        Ok(n)
    }

    /// The HTTP API has no sender to default to: the target is required there.
    pub fn has_target(&self) -> bool {
        self.target.is_some()
    }

    pub fn apply(self, session: &mut Session) -> Result<Flow, ProtocolError> {
        session.may_notify("notify_client")?;
        let own = self
            .target
            .as_deref()
            .is_none_or(|t| t == &*session.peer.target);
        session.policy_allows(own)?;
        let client = (!session.admin).then_some(&session.peer);
        self.deliver_as(&session.shared, &session.peer.target, client)?;
        session.ack_callback(self.callback);
        Ok(Flow::Continue)
    }
}
