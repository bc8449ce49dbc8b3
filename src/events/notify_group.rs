//! `notify_group`: delivers the bare `data.data` to every member of a group, named directly
//! or through a member's connection id (default `public`), then acks the outer
//! `data.callback` to the sender.

use std::sync::Arc;

use serde_json::value::RawValue;

use super::Targeted;
use super::client_connected::PUBLIC_GROUP;
use crate::delivery::{Delivery, Text};
use crate::hub::looks_like_id;
use crate::kinds::Event;
use crate::protocol::{Data, ProtocolError, bare_frame};
use crate::session::{Flow, Session};

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

    /// What to deliver: to a group by name, or to the group of the connection a target in
    /// the form of an id names (resolved where that connection is).
    pub fn delivery(&self) -> Delivery {
        let target = self.target.as_deref().unwrap_or(PUBLIC_GROUP);
        let frame = Text(bare_frame(&self.payload.relay_text()));
        if looks_like_id(target) {
            Delivery::GroupOf {
                target: target.into(),
                frame,
            }
        } else {
            Delivery::Group {
                group: Arc::from(target),
                frame,
            }
        }
    }

    pub fn apply(self, session: &mut Session) -> Result<Flow, ProtocolError> {
        session.may_notify(Event::NotifyGroup)?;
        let target = self.target.as_deref().unwrap_or(PUBLIC_GROUP);
        let group = session.shared.hub.resolve_group(target);
        let own = session.peer.group().is_some_and(|g| g == group);
        session.policy_allows(own)?;
        session.shared.deliver(self.delivery(), session.sender())?;
        session.ack_callback(self.callback);
        Ok(Flow::Continue)
    }
}
