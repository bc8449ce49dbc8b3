//! `notify_client`: delivers the bare `data.data` to one connection (by default the sender),
//! then acks `data.callback` to the sender, also when the target does not exist.

use serde_json::value::RawValue;

use super::Targeted;
use crate::delivery::{Delivery, Text};
use crate::kinds::Event;
use crate::protocol::{Data, ProtocolError, bare_frame};
use crate::session::{Flow, Session};

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

    /// What to deliver; `default_target` when `data.target` is missing.
    pub fn delivery(&self, default_target: &str) -> Delivery {
        let target = self.target.as_deref().unwrap_or(default_target);
        Delivery::Client {
            target: target.into(),
            frame: Text(bare_frame(&self.payload.relay_text())),
        }
    }

    /// The HTTP API has no sender to default to: the target is required there.
    pub fn has_target(&self) -> bool {
        self.target.is_some()
    }

    pub fn apply(self, session: &mut Session) -> Result<Flow, ProtocolError> {
        session.may_notify(Event::NotifyClient)?;
        let own = self
            .target
            .as_deref()
            .is_none_or(|t| t == &*session.peer.target);
        session.policy_allows(own)?;
        let delivery = self.delivery(&session.peer.target);
        session.shared.deliver(delivery, session.sender())?;
        session.ack_callback(self.callback);
        Ok(Flow::Continue)
    }
}
