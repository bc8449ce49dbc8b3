//! The events a connection can send, one file each. Every event parses its own `data`
//! (`parse`), checks who may send it, and applies itself (`apply`) to the connection's
//! [`Session`]: a notification becomes a [`crate::delivery::Delivery`] handed to
//! [`crate::relay::Relay::deliver`], which serves this node and the others alike; no event
//! knows whether there is a cluster. Adding an event is adding a file, a name in [`Event`]
//! and a match arm in [`handle`].

mod client_connect;
mod client_connected;
mod client_disconnect;
pub mod disconnect;
pub mod membership;
mod notify_all;
mod notify_client;
mod notify_group;
mod publish;
mod server_connect;
mod subscribe;

use std::time::Instant;

use tracing::debug;

use crate::kinds::Event;
use crate::protocol::{Envelope, ProtocolError};
use crate::session::{Flow, Session};

pub use client_connect::ClientConnect;
pub use client_connected::ClientConnected;
pub use notify_all::NotifyAll;
pub use notify_client::NotifyClient;
pub use notify_group::NotifyGroup;
pub use publish::Publish;
pub use server_connect::ServerConnect;
pub use subscribe::Subscribe;

/// The `data` of `notify_client` and `notify_group`: whom, what, and the callback to ack.
pub(crate) struct Targeted<'a> {
    pub target: Option<String>,
    pub payload: crate::protocol::Data<'a>,
    pub callback: Option<&'a serde_json::value::RawValue>,
}

impl<'a> Targeted<'a> {
    fn parse(data: crate::protocol::Data<'a>) -> Result<Targeted<'a>, ProtocolError> {
        #[derive(serde::Deserialize, Default)]
        struct Fields<'a> {
            #[serde(borrow, default)]
            target: Option<&'a serde_json::value::RawValue>,
            #[serde(borrow, default)]
            data: Option<&'a serde_json::value::RawValue>,
            #[serde(borrow, default)]
            callback: Option<&'a serde_json::value::RawValue>,
        }
        let fields: Fields<'a> = data.fields()?;
        Ok(Targeted {
            target: crate::protocol::opt_string(fields.target, "target")?,
            payload: crate::protocol::Data(fields.data),
            callback: fields.callback,
        })
    }
}

/// An admin event of SPEC §12, answered to the sender as `{"type":<event>,"data":<result>}`.
async fn admin_answer(
    session: &mut Session,
    event: Event,
    data: crate::protocol::Data<'_>,
) -> Result<Flow, ProtocolError> {
    if !session.admin {
        return Err(ProtocolError::Forbidden(match event {
            Event::Disconnect => "disconnect needs an admin connection",
            _ => "membership needs an admin connection",
        }));
    }
    let relay = std::sync::Arc::clone(&session.shared);
    let (result, kind) = match event {
        Event::Disconnect => (
            disconnect::answer(&relay, data).await?,
            crate::kinds::Frame::Disconnect,
        ),
        _ => (
            membership::answer(&relay, data).await?,
            crate::kinds::Frame::Membership,
        ),
    };
    session.send_counted(kind, crate::protocol::event_frame(event.name(), &result));
    Ok(Flow::Continue)
}

/// Parses and applies one inbound message.
pub async fn handle(session: &mut Session, message: &[u8]) -> Flow {
    let started = Instant::now();
    let envelope = match Envelope::parse(message) {
        Ok(envelope) => envelope,
        Err(error) => {
            session.shared.metrics.received(None, message.len());
            return session.reject(&error, None);
        }
    };
    let event = Event::from_name(&envelope.kind);
    session.shared.metrics.received(event, message.len());
    let Some(event) = event else {
        // `?`: the type is the peer's text; Debug escapes its control characters.
        debug!(kind = ?envelope.kind, "unknown event ignored");
        return Flow::Continue;
    };
    let data = envelope.data;
    let result = match event {
        Event::ServerConnect => match ServerConnect::parse(data) {
            Ok(event) => event.apply(session).await,
            Err(e) => Err(e),
        },
        Event::ClientConnect => ClientConnect::parse(data).and_then(|e| e.apply(session)),
        Event::ClientConnected => ClientConnected::parse(data).and_then(|e| e.apply(session)),
        Event::ClientDisconnect => Ok(client_disconnect::apply()),
        Event::NotifyClient => NotifyClient::parse(data).and_then(|e| e.apply(session)),
        Event::NotifyGroup => NotifyGroup::parse(data).and_then(|e| e.apply(session)),
        Event::NotifyAll => NotifyAll::parse(data).and_then(|e| e.apply(session)),
        Event::Subscribe => Subscribe::parse(data, false).and_then(|e| e.apply(session)),
        Event::Unsubscribe => Subscribe::parse(data, true).and_then(|e| e.apply(session)),
        Event::Publish => Publish::parse(data).and_then(|e| e.apply(session)),
        Event::Membership | Event::Disconnect => admin_answer(session, event, data).await,
    };
    if event.fans_out() {
        let metrics = &session.shared.metrics;
        metrics
            .fanout_seconds
            .observe(started.elapsed().as_secs_f64());
    }
    match result {
        Ok(flow) => flow,
        Err(error) => session.reject(&error, Some(event.name())),
    }
}
