//! `subscribe` / `unsubscribe`: a registered client joins or leaves a named channel, and is
//! answered `subscribed` / `unsubscribed` with the name. Who receives a publish is decided by
//! the publish's filter against the subscriber's acknowledgement (roles, groups, user), not by
//! the subscription: an unacknowledged subscriber only gets unfiltered publishes.
//!
//! On a channel with history (SPEC §13) `subscribed` also carries the channel's `epoch` and
//! latest `offset`; with `since:{offset,epoch}` it carries `recovered` and is followed by the
//! publications missed since then (see [`crate::history`] for why none is lost or repeated
//! across the switch to live ones).

use std::sync::Arc;

use serde::Deserialize;
use serde_json::value::RawValue;

use crate::history::{MAX_EPOCH_LEN, Since};
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
    /// Where the subscriber stopped, to recover from (ignored on a channel without history).
    since: Option<Since>,
}

#[derive(Deserialize, Default)]
struct Fields<'a> {
    #[serde(borrow, default)]
    name: Option<&'a RawValue>,
    #[serde(borrow, default)]
    since: Option<&'a RawValue>,
}

/// `since` as sent: both fields required, the epoch short (ours are a few hex digits).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SinceFields {
    offset: u64,
    epoch: String,
}

const SINCE: &str = "{\"offset\":<integer ≥ 0>,\"epoch\":<string>}";

fn parse_since(raw: Option<&RawValue>) -> Result<Option<Since>, ProtocolError> {
    let Some(raw) = raw.filter(|r| r.get() != "null") else {
        return Ok(None);
    };
    let fields: SinceFields =
        serde_json::from_str(raw.get()).map_err(|_| ProtocolError::InvalidField("since", SINCE))?;
    if fields.epoch.len() > MAX_EPOCH_LEN {
        return Err(ProtocolError::InvalidField(
            "since",
            "an epoch of at most 64 characters",
        ));
    }
    Ok(Some(Since {
        offset: fields.offset,
        epoch: fields.epoch,
    }))
}

impl Subscribe {
    pub fn parse(data: Data<'_>, leave: bool) -> Result<Subscribe, ProtocolError> {
        let fields: Fields = data.fields()?;
        let name = opt_string(fields.name, "name")?.ok_or(ProtocolError::MissingField("name"))?;
        validate_channel(&name)?;
        let since = if leave {
            None
        } else {
            parse_since(fields.since)?
        };
        Ok(Subscribe { name, leave, since })
    }

    pub async fn apply(self, session: &mut Session) -> Result<Flow, ProtocolError> {
        if !self.leave && session.shared.history.is_some() {
            return self.join_history(session).await;
        }
        self.apply_plain(session)
    }

    /// Subscribes or unsubscribes on a channel without history: the reply is the name.
    fn apply_plain(self, session: &mut Session) -> Result<Flow, ProtocolError> {
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

impl Subscribe {
    /// A `subscribe` on a node with history: a channel with none is answered as ever; one
    /// with history is joined, answered and replayed under its lock (see [`crate::history`]).
    async fn join_history(self, session: &mut Session) -> Result<Flow, ProtocolError> {
        let relay = Arc::clone(&session.shared);
        let peer = &session.peer;
        let history = relay.history.as_ref();
        // A peer that may not subscribe creates no history on the way to being refused.
        let registered = peer.state().registered;
        let Some((history, stream)) = history
            .filter(|_| registered)
            .and_then(|h| Some((h, h.stream(&self.name)?)))
        else {
            return self.apply_plain(session);
        };
        let clustered = history.clustered().is_some();
        if clustered {
            crate::history::prepare_join(&relay, &stream, self.since.as_ref()).await?;
        }
        // Half the subscriber's queue: a replay that would fill it is refused
        // (`recovered:false`) rather than closing the connection as a slow consumer.
        let room = relay.config.max_queue_bytes / 2;
        let (guard, joined) = history.join(&stream, peer, self.since.as_ref(), room, || {
            relay.hub.subscribe(peer, &self.name)
        })?;
        let mut data = String::from("{\"name\":");
        push_json_string(&mut data, &self.name);
        data.push_str(",\"epoch\":");
        push_json_string(&mut data, &joined.epoch);
        data.push_str(",\"offset\":");
        data.push_str(&joined.offset.to_string());
        if let Some(recovered) = joined.recovered {
            data.push_str(",\"recovered\":");
            data.push_str(if recovered { "true" } else { "false" });
        }
        data.push('}');
        let reply = event_frame(Frame::Subscribed.name(), &data);
        relay.channel_reply(peer, &self.name, reply, Frame::Subscribed);
        for frame in joined.missed {
            if clustered {
                // Behind the `subscribed` reply, which may wait for this node to receive
                // the channel.
                relay.channel_reply(peer, &self.name, frame, Frame::Publish);
            } else {
                relay.metrics.sent(Frame::Publish, 1, frame.len());
                peer.send(frame);
            }
        }
        drop(guard);
        if clustered {
            crate::history::join_cluster(&relay, &stream).await;
        }
        Ok(Flow::Continue)
    }
}
