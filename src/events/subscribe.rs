//! `subscribe` / `unsubscribe`: a registered client joins or leaves a named channel, and is
//! answered `subscribed` / `unsubscribed` with the name. Who receives a publish is decided by
//! the publish's filter against the subscriber's acknowledgement (roles, groups, user), not by
//! the subscription: an unacknowledged subscriber only gets unfiltered publishes.

use serde::Deserialize;
use serde_json::value::RawValue;

use crate::kinds::Frame;
use crate::protocol::{
    Data, ProtocolError, event_frame, opt_string, push_json_string, validate_channel,
};
use crate::session::{Flow, Session};

#[derive(Debug)]
pub struct Subscribe {
    name: String,
    /// `unsubscribe` rather than `subscribe`.
    leave: bool,
}

#[derive(Deserialize, Default)]
struct Fields<'a> {
    #[serde(borrow, default)]
    name: Option<&'a RawValue>,
}

impl Subscribe {
    pub fn parse(data: Data<'_>, leave: bool) -> Result<Subscribe, ProtocolError> {
        let fields: Fields = data.fields()?;
        let name = opt_string(fields.name, "name")?.ok_or(ProtocolError::MissingField("name"))?;
        validate_channel(&name)?;
        Ok(Subscribe { name, leave })
    }

    pub fn apply(self, session: &mut Session) -> Result<Flow, ProtocolError> {
        let hub = &session.shared.hub;
        let mut data = String::from("{\"name\":");
        push_json_string(&mut data, &self.name);
        data.push('}');
        let kind = if self.leave {
            hub.unsubscribe(&session.peer, &self.name);
            Frame::Unsubscribed
        } else {
            hub.subscribe(&session.peer, &self.name)?;
            Frame::Subscribed
        };
        // Once this node receives the channel's publishes from the other nodes.
        let reply = event_frame(kind.name(), &data);
        session
            .shared
            .channel_reply(&session.peer, &self.name, reply, kind);
        Ok(Flow::Continue)
    }
}
