//! `disconnect` (SPEC §12): an admin closes one connection, or every connection of a user on
//! every node, with a close code of 4000–4999 (default 4000) and a reason of at most 123
//! bytes. Answered `{"closed":N,"nodes":K}` once every node concerned closed its share.

use std::sync::Arc;

use serde::Deserialize;
use serde_json::value::RawValue;

use crate::delivery::Delivery;
use crate::membership::{self, DEFAULT_CODE, Disconnect, MAX_REASON_LEN};
use crate::protocol::{Data, ProtocolError, opt_string};
use crate::relay::Relay;

#[derive(Deserialize, Default)]
struct Fields<'a> {
    #[serde(borrow, default)]
    user: Option<&'a RawValue>,
    #[serde(borrow, default)]
    target: Option<&'a RawValue>,
    #[serde(borrow, default)]
    code: Option<&'a RawValue>,
    #[serde(borrow, default)]
    reason: Option<&'a RawValue>,
}

pub fn parse(data: Data<'_>) -> Result<Disconnect, ProtocolError> {
    let fields: Fields<'_> = data.fields()?;
    let code = match fields.code.map(RawValue::get) {
        None | Some("null") => DEFAULT_CODE,
        Some(text) => text
            .parse::<u16>()
            .ok()
            .filter(|code| (4000..=4999).contains(code))
            .ok_or(ProtocolError::InvalidField(
                "code",
                "an integer from 4000 to 4999",
            ))?,
    };
    let reason = opt_string(fields.reason, "reason")?.unwrap_or_default();
    if reason.len() > MAX_REASON_LEN {
        return Err(ProtocolError::InvalidField(
            "reason",
            "a string of at most 123 bytes of UTF-8",
        ));
    }
    let who = membership::parse_who(fields.user, fields.target)?;
    Ok(Disconnect {
        who,
        code,
        reason: reason.into(),
    })
}

/// Closes the connections here, then on the nodes concerned; answers once they confirmed.
pub async fn answer(relay: &Arc<Relay>, data: Data<'_>) -> Result<String, ProtocolError> {
    let order = parse(data)?;
    // Refused here rather than closing with another reason than the one asked for.
    if membership::intern(&order.reason).is_none() {
        return Err(ProtocolError::TooManyReasons);
    }
    let (local, route) = membership::route(relay, &order.who)?;
    let here = local.then(|| membership::disconnect(&relay.hub, &order));
    let confirmed =
        membership::spread(relay, route, |ack| Delivery::Disconnect { order, ack }).await;
    Ok(membership::answer_text("closed", here, &confirmed))
}
