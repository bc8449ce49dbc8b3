//! The events a connection can send, one file each. Every event parses its own `data`
//! (`parse`), checks who may send it, and applies itself (`apply`) to the connection's
//! [`Session`]: a notification becomes a [`crate::delivery::Delivery`] handed to
//! [`crate::relay::Relay::deliver`], which serves this node and the others alike; no event
//! knows whether there is a cluster. Adding an event is adding a file, a name in [`Event`]
//! and a match arm in [`handle`].

mod channels;
mod client_connect;
mod client_connected;
mod client_disconnect;
mod connections;
pub mod disconnect;
mod history;
mod info;
mod invoke;
mod invoke_result;
pub mod membership;
mod notify_all;
mod notify_client;
mod notify_group;
mod publish;
mod server_connect;
mod subscribe;
mod users;

use std::sync::Arc;
use std::time::Instant;

use tracing::debug;

use crate::kinds::{Event, Frame};
use crate::protocol::{Data, Envelope, ProtocolError};
use crate::relay::Relay;
use crate::session::{Flow, Session};

pub use client_connect::ClientConnect;
pub use client_connected::ClientConnected;
pub use client_connected::PUBLIC_GROUP;
pub use invoke::Invoke;
pub use invoke_result::InvokeResult;
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
        // The events that wait are boxed: a connection's task is as large as the largest
        // future it may hold, and an idle connection must not carry room for a presence
        // query or a history recovery that only admins or a few subscribers make.
        Event::ServerConnect => match ServerConnect::parse(data) {
            Ok(event) => Box::pin(event.apply(session)).await,
            Err(e) => Err(e),
        },
        Event::ClientConnect => ClientConnect::parse(data).and_then(|e| e.apply(session)),
        Event::ClientConnected => ClientConnected::parse(data).and_then(|e| e.apply(session)),
        Event::ClientDisconnect => Ok(client_disconnect::apply()),
        Event::NotifyClient => NotifyClient::parse(data).and_then(|e| e.apply(session)),
        Event::NotifyGroup => NotifyGroup::parse(data).and_then(|e| e.apply(session)),
        Event::NotifyAll => NotifyAll::parse(data).and_then(|e| e.apply(session)),
        Event::Subscribe => match Subscribe::parse(data, false) {
            Ok(event) => Box::pin(event.apply(session)).await,
            Err(e) => Err(e),
        },
        Event::Unsubscribe => match Subscribe::parse(data, true) {
            Ok(event) => Box::pin(event.apply(session)).await,
            Err(e) => Err(e),
        },
        Event::Publish => Publish::parse(data).and_then(|e| e.apply(session)),
        Event::Invoke => Invoke::parse(data).and_then(|e| e.apply(session)),
        Event::InvokeResult => InvokeResult::parse(data).and_then(|e| e.apply(session)),
        Event::Info
        | Event::Users
        | Event::Connections
        | Event::Channels
        | Event::Membership
        | Event::Disconnect
        | Event::History => Box::pin(answered(session, event, data)).await,
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

/// The result of an answered admin event (SPEC §12, [`Event::is_answered`]) as JSON text;
/// the caller has checked that an admin asks. `None` for an event that is not answered.
pub async fn answer(
    relay: &Arc<Relay>,
    event: Event,
    data: Data<'_>,
) -> Option<Result<String, ProtocolError>> {
    Some(match event {
        Event::Info => info::answer(relay, data).await,
        Event::Users => users::answer(relay, data).await,
        Event::Connections => connections::answer(relay, data).await,
        Event::Channels => channels::answer(relay, data).await,
        Event::Membership => membership::answer(relay, data).await,
        Event::Disconnect => disconnect::answer(relay, data).await,
        Event::History => history::answer(relay, data).await,
        _ => return None,
    })
}

/// An answered event over a WebSocket: admins only; the result goes back to the sender as
/// `{"type":<name>,"data":<result>}`. The session waits for it, so one admin connection asks
/// one such question at a time.
async fn answered(
    session: &mut Session,
    event: Event,
    data: Data<'_>,
) -> Result<Flow, ProtocolError> {
    if !session.admin {
        return Err(ProtocolError::Forbidden(
            "this event needs an admin connection",
        ));
    }
    let relay = Arc::clone(&session.shared);
    let result = answer(&relay, event, data)
        .await
        .unwrap_or(Err(ProtocolError::InvalidType))?;
    let frame = format!("{{\"type\":\"{}\",\"data\":{result}}}", event.name());
    let kind = Frame::from_name(event.name()).unwrap_or(Frame::Error);
    session.send_counted(kind, frame.into());
    Ok(Flow::Continue)
}
