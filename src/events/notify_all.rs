//! `notify_all`: an admin delivers the bare `data` to every registered client, acknowledged
//! or not.

use super::{Flow, Session};
use crate::cluster::Op;
use crate::protocol::{Data, ProtocolError, bare_frame};
use crate::server::Shared;

#[derive(Debug)]
pub struct NotifyAll<'a> {
    payload: Data<'a>,
}

impl<'a> NotifyAll<'a> {
    /// Any JSON value is a payload; falsy ones are sent as `{}`.
    pub fn parse(data: Data<'a>) -> Result<NotifyAll<'a>, ProtocolError> {
        Ok(NotifyAll { payload: data })
    }

    /// Delivers without checks (admins, the HTTP API); returns how many got it.
    pub fn deliver(&self, shared: &Shared) -> usize {
        let frame = bare_frame(&self.payload.relay_text());
        let n = shared.hub.notify_all(&frame);
        shared.metrics.sent("notify_all", n, frame.len());
        if let Some(cluster) = &shared.cluster {
            let frame = frame.as_str().to_string();
            cluster.publish(shared, Op::NotifyAll { frame });
        }
        n
    }

    pub fn apply(self, session: &mut Session) -> Result<Flow, ProtocolError> {
        if !session.admin {
            return Err(ProtocolError::Forbidden(
                "notify_all needs an admin connection",
            ));
        }
        self.deliver(&session.shared);
        Ok(Flow::Continue)
    }
}
