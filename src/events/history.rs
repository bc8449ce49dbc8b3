//! `history` (admin, SPEC §13): the last publications kept for a channel with history.
//! `{"name":N,"limit":L}` (L from 1 to the channel's count; default 100) is answered
//! `{"publications":[{"offset":O,"data":D},…],"epoch":E,"offset":latest}`, oldest first:
//! as many of the last L as fit in half an admin connection's queue (`--max-queue-bytes`), so
//! the answer never closes the admin that asked as a slow consumer.

use std::sync::Arc;

use serde::Deserialize;
use serde_json::value::RawValue;

use crate::history::MAX_COUNT;
use crate::protocol::{Data, ProtocolError, opt_string, push_json_string, validate_channel};
use crate::relay::Relay;

/// Publications answered when `limit` is not given.
const DEFAULT_LIMIT: usize = 100;

#[derive(Deserialize, Default)]
struct Fields<'a> {
    #[serde(borrow, default)]
    name: Option<&'a RawValue>,
    #[serde(borrow, default)]
    limit: Option<&'a RawValue>,
}

pub async fn answer(relay: &Arc<Relay>, data: Data<'_>) -> Result<String, ProtocolError> {
    let fields: Fields = data.fields()?;
    let name = opt_string(fields.name, "name")?.ok_or(ProtocolError::MissingField("name"))?;
    validate_channel(&name)?;
    let limit = match fields.limit {
        None => DEFAULT_LIMIT,
        Some(raw) => serde_json::from_str::<usize>(raw.get())
            .ok()
            .filter(|n| (1..=MAX_COUNT).contains(n))
            .ok_or(ProtocolError::InvalidField(
                "limit",
                "an integer from 1 to 10000",
            ))?,
    };
    // In a cluster what this node keeps is a cache: Redis has it all.
    if let Some(history) = relay.history.as_ref().filter(|h| h.clustered().is_some())
        && let Some(stream) = history.stream(&name)
    {
        crate::history::sync(relay, &stream, 0).await?;
    }
    let room = relay.config.max_queue_bytes / 2;
    let read = relay
        .history
        .as_ref()
        .and_then(|h| h.read(&name, limit, room));
    let Some(crate::history::Read {
        publications: entries,
        epoch,
        offset,
    }) = read
    else {
        return Err(ProtocolError::InvalidField(
            "name",
            "a channel with history (see --history)",
        ));
    };
    let mut out = String::from("{\"publications\":[");
    for (i, (offset, frame)) in entries.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str("{\"offset\":");
        out.push_str(&offset.to_string());
        out.push_str(",\"data\":");
        out.push_str(payload(frame).unwrap_or("null"));
        out.push('}');
    }
    out.push_str("],\"epoch\":");
    push_json_string(&mut out, &epoch);
    out.push_str(",\"offset\":");
    out.push_str(&offset.to_string());
    out.push('}');
    Ok(out)
}

/// The `data.data` of a stamped `publish` frame, as written.
fn payload(frame: &str) -> Option<&str> {
    #[derive(Deserialize)]
    struct Frame<'a> {
        #[serde(borrow)]
        data: Inner<'a>,
    }
    #[derive(Deserialize)]
    struct Inner<'a> {
        #[serde(borrow)]
        data: &'a RawValue,
    }
    let frame: Frame<'_> = serde_json::from_str(frame).ok()?;
    Some(frame.data.data.get())
}
