//! `client_connected`: an admin acknowledges a client after authenticating its token. The
//! client joins the group named by `user` (leaving its previous one), its `roles` and
//! `groups` are remembered for publish filters, and it receives `data` without `user`.

use std::borrow::Cow;
use std::sync::Arc;

use indexmap::IndexMap;
use serde_json::value::RawValue;

use crate::delivery::Delivery;
use crate::hub::Acknowledgement;
use crate::protocol::{
    Data, ProtocolError, event_frame, is_falsy, object_text, opt_string, opt_strings,
};
use crate::session::{Flow, Session};

/// The group of a client acknowledged without a user.
pub const PUBLIC_GROUP: &str = "public";

#[derive(Debug)]
pub struct ClientConnected<'a> {
    target: String,
    ack: Acknowledgement,
    /// What the client receives: `data` less `user`.
    rest: IndexMap<Cow<'a, str>, &'a RawValue>,
}

impl<'a> ClientConnected<'a> {
    pub fn parse(data: Data<'a>) -> Result<ClientConnected<'a>, ProtocolError> {
        let mut rest = data.object()?;
        let target = opt_string(rest.get("target").copied(), "target")?
            .ok_or(ProtocolError::MissingField("target"))?;
        let user: Option<Arc<str>> = match rest.shift_remove("user") {
            Some(user) if !is_falsy(user) => opt_string(Some(user), "user")?.map(Arc::from),
            _ => None,
        };
        let group = user.clone().unwrap_or_else(|| Arc::from(PUBLIC_GROUP));
        let roles = opt_strings(rest.get("roles").copied(), "roles")?;
        let groups = opt_strings(rest.get("groups").copied(), "groups")?;
        Ok(ClientConnected {
            target,
            ack: Acknowledgement {
                group,
                user,
                roles,
                groups,
            },
            rest,
        })
    }

    pub fn apply(self, session: &mut Session) -> Result<Flow, ProtocolError> {
        if !session.admin {
            return Err(ProtocolError::Forbidden(
                "client_connected needs an admin connection",
            ));
        }
        let frame = event_frame("client_connected", &object_text(&self.rest));
        let delivery = Delivery::acknowledge(self.target.into(), self.ack, frame);
        session.shared.deliver(delivery, session.sender())?;
        Ok(Flow::Continue)
    }
}
