//! `membership` (SPEC §12): an admin adds a publish-filter group or role to, or removes one
//! from, a user's connections (now and future ones, on every node) or one connection.
//! Answered `{"connections":N,"nodes":K}` once every node applied it (see
//! [`crate::membership`] for what it means and in which order).

use std::sync::Arc;

use serde::Deserialize;
use serde_json::value::RawValue;

use crate::delivery::Delivery;
use crate::membership::{self, Action, Change, Kind, MAX_NAME_LEN};
use crate::protocol::{Data, ProtocolError, opt_string};
use crate::relay::Relay;

#[derive(Deserialize, Default)]
struct Fields<'a> {
    #[serde(borrow, default)]
    action: Option<&'a RawValue>,
    #[serde(borrow, default)]
    kind: Option<&'a RawValue>,
    #[serde(borrow, default)]
    name: Option<&'a RawValue>,
    #[serde(borrow, default)]
    user: Option<&'a RawValue>,
    #[serde(borrow, default)]
    target: Option<&'a RawValue>,
}

pub fn parse(data: Data<'_>) -> Result<Change, ProtocolError> {
    let fields: Fields<'_> = data.fields()?;
    let action = match opt_string(fields.action, "action")?.as_deref() {
        Some("add") => Action::Add,
        Some("remove") => Action::Remove,
        Some(_) => {
            return Err(ProtocolError::InvalidField(
                "action",
                "\"add\" or \"remove\"",
            ));
        }
        None => return Err(ProtocolError::MissingField("action")),
    };
    let kind = match opt_string(fields.kind, "kind")?.as_deref() {
        Some("group") => Kind::Group,
        Some("role") => Kind::Role,
        Some(_) => return Err(ProtocolError::InvalidField("kind", "\"group\" or \"role\"")),
        None => return Err(ProtocolError::MissingField("kind")),
    };
    let name = opt_string(fields.name, "name")?.ok_or(ProtocolError::MissingField("name"))?;
    if name.len() > MAX_NAME_LEN {
        return Err(ProtocolError::InvalidField(
            "name",
            "a string of at most 200 bytes",
        ));
    }
    let who = membership::parse_who(fields.user, fields.target)?;
    Ok(Change {
        action,
        kind,
        name: name.into(),
        who,
    })
}

/// Applies the change here, then on the nodes concerned; answers once they confirmed.
pub async fn answer(relay: &Arc<Relay>, data: Data<'_>) -> Result<String, ProtocolError> {
    let change = parse(data)?;
    let (local, route) = membership::route(relay, &change.who)?;
    let here = if local {
        Some(membership::apply_change(&relay.hub, &change, true)?)
    } else {
        None
    };
    let confirmed =
        membership::spread(relay, route, |ack| Delivery::Membership { change, ack }).await;
    Ok(membership::answer_text("connections", here, &confirmed))
}
