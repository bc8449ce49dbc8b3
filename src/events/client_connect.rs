//! `client_connect`: a connection registers as a client and asks a server (round robin over
//! the pool) to authenticate it. `data` is forwarded with `target` set to the connection's id,
//! every other key (the token, say) kept in order.

use std::borrow::Cow;

use indexmap::IndexMap;
use serde_json::value::RawValue;

use crate::kinds::Frame;
use crate::protocol::{Data, ProtocolError, event_frame, object_text, raw_string};
use crate::session::{Flow, Session};

#[derive(Debug)]
pub struct ClientConnect<'a> {
    data: IndexMap<Cow<'a, str>, &'a RawValue>,
}

impl<'a> ClientConnect<'a> {
    pub fn parse(data: Data<'a>) -> Result<ClientConnect<'a>, ProtocolError> {
        Ok(ClientConnect {
            data: data.object()?,
        })
    }

    pub fn apply(self, session: &mut Session) -> Result<Flow, ProtocolError> {
        session.count_connect()?;
        let target = raw_string(&session.peer.target);
        let mut data = self.data;
        // Replaces a `target` the client sent in place, else appends it (as a Python dict).
        data.insert(Cow::Borrowed("target"), &target);
        let frame = event_frame("client_connect", &object_text(&data));
        let len = frame.len();
        let shared = &session.shared;
        shared.hub.register_client(&session.peer);
        shared.forward_connect(&session.peer, frame)?;
        shared.metrics.sent(Frame::ClientConnect, 1, len);
        Ok(Flow::Continue)
    }
}
