//! `client_connect`: a connection registers as a client and asks a server (round robin over
//! the pool) to authenticate it. `data` is forwarded with `target` set to the connection's id,
//! every other key (the token, say) kept in order.
//!
//! With a JWT key configured (SPEC §11), the relay answers some requests itself: a `token` in
//! the form of a JWT is verified here, and a valid one (or a valid token from the upgrade,
//! when this request has no JWT) acknowledges the client at once, as a backend's
//! `client_connected` would; an invalid one is refused with `invalid_token`. Neither is
//! forwarded. Any other token goes to a backend exactly as without a key (Jaseci's flow).

use std::borrow::Cow;

use indexmap::IndexMap;
use serde_json::value::RawValue;

use crate::delivery::Delivery;
use crate::hub::Acknowledgement;
use crate::jwt::{Identity, looks_like_jwt};
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
        if let Some(identity) = self.token_identity(session)? {
            return acknowledge(session, identity);
        }
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

    /// Who the relay itself acknowledges this client as, with a JWT key configured: the
    /// identity of this request's JWT `token` (an invalid one is an error), else the upgrade
    /// token's. `None`: a backend judges the request, as without a key.
    fn token_identity(&self, session: &Session) -> Result<Option<Identity>, ProtocolError> {
        let Some(verifier) = &session.shared.config.jwt else {
            return Ok(None);
        };
        let token = self
            .data
            .get("token")
            .and_then(|raw| serde_json::from_str::<Cow<'_, str>>(raw.get()).ok())
            .filter(|token| looks_like_jwt(token));
        match token {
            Some(token) => verifier
                .verify(&token)
                .map(Some)
                .map_err(ProtocolError::InvalidToken),
            None => Ok(session.identity.as_deref().cloned()),
        }
    }
}

/// Acknowledges the client as `identity`, on the path a backend's `client_connected` takes
/// ([`crate::relay::Relay::deliver`], so a cluster learns its group too): it joins its
/// user's group, its roles and groups are remembered for publish filters, and it receives
/// `{"type":"client_connected","data":{"target":…,"authenticated":true}}`.
fn acknowledge(session: &mut Session, identity: Identity) -> Result<Flow, ProtocolError> {
    let shared = &session.shared;
    let peer = &session.peer;
    shared.hub.register_client(peer);
    // A request of this client still waiting for a server is answered now.
    shared.hub.pool.withdraw(peer.id);
    let data = format!(
        r#"{{"target":{},"authenticated":true}}"#,
        raw_string(&peer.target).get()
    );
    let frame = event_frame("client_connected", &data);
    let ack = Acknowledgement {
        group: identity.user.clone(),
        user: Some(identity.user.clone()),
        roles: identity.roles.clone(),
        groups: identity.groups.clone(),
    };
    shared.deliver(
        Delivery::acknowledge(peer.target.clone(), ack, frame),
        session.sender(),
    )?;
    session.remember_token(identity);
    Ok(Flow::Continue)
}
