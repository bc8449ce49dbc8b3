//! `notify_all`: an admin delivers the bare `data` to every registered client, acknowledged
//! or not.

use crate::delivery::{Delivery, Text};
use crate::protocol::{Data, ProtocolError, bare_frame};
use crate::session::{Flow, Session};

#[derive(Debug)]
pub struct NotifyAll<'a> {
    payload: Data<'a>,
}

impl<'a> NotifyAll<'a> {
    /// Any JSON value is a payload; falsy ones are sent as `{}`.
    pub fn parse(data: Data<'a>) -> Result<NotifyAll<'a>, ProtocolError> {
        Ok(NotifyAll { payload: data })
    }

    pub fn delivery(&self) -> Delivery {
        Delivery::All {
            frame: Text(bare_frame(&self.payload.relay_text())),
        }
    }

    pub fn apply(self, session: &mut Session) -> Result<Flow, ProtocolError> {
        if !session.admin {
            return Err(ProtocolError::Forbidden(
                "notify_all needs an admin connection",
            ));
        }
        session.shared.deliver(self.delivery(), session.sender())?;
        Ok(Flow::Continue)
    }
}
