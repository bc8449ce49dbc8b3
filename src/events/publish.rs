//! `publish`: an admin sends a payload to a channel's subscribers, all of them or only those
//! with one of the given `roles`, in one of the `groups`, whose `user` is listed, or whose
//! connection id is among the `clients`. They receive
//! `{"type":"publish","data":{"name":…,"data":…}}`; SignalR connections the filter admits
//! receive it too, as an invocation of the channel (SPEC §10).

use serde::{Deserialize, Deserializer};
use serde_json::value::RawValue;

use std::sync::Arc;

use crate::delivery::{Delivery, Text};
use crate::hub::Filter;
use crate::protocol::{
    Data, ProtocolError, compact, event_frame, opt_string, opt_strings, push_json_string,
    validate_channel,
};
use crate::session::{Flow, Session};

#[derive(Debug)]
pub struct Publish<'a> {
    name: String,
    payload: Option<&'a RawValue>,
    filter: Filter,
}

#[derive(Deserialize, Default)]
struct Fields<'a> {
    #[serde(borrow, default)]
    name: Option<&'a RawValue>,
    #[serde(borrow, default)]
    data: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "keep_null")]
    roles: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "keep_null")]
    groups: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "keep_null")]
    users: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "keep_null")]
    clients: Option<&'a RawValue>,
}

/// A present filter as written, `null` included: serde would read `null` as "absent", and
/// a backend that sends `"roles": None` means "only these roles", not "everyone". Filters
/// fail closed.
fn keep_null<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<&'de RawValue>, D::Error> {
    <&RawValue>::deserialize(deserializer).map(Some)
}

impl<'a> Publish<'a> {
    pub fn parse(data: Data<'a>) -> Result<Publish<'a>, ProtocolError> {
        let fields: Fields<'a> = data.fields()?;
        let name = opt_string(fields.name, "name")?.ok_or(ProtocolError::MissingField("name"))?;
        validate_channel(&name)?;
        for (raw, field) in [
            (fields.roles, "roles"),
            (fields.groups, "groups"),
            (fields.users, "users"),
            (fields.clients, "clients"),
        ] {
            if raw.is_some_and(|r| r.get() == "null") {
                return Err(ProtocolError::InvalidField(
                    field,
                    "an array of strings (null would publish to everyone)",
                ));
            }
        }
        let present = |raw: Option<&RawValue>| raw.is_some();
        let filters = [fields.roles, fields.groups, fields.users, fields.clients]
            .into_iter()
            .filter(|f| present(*f))
            .count();
        if filters > 1 {
            return Err(ProtocolError::ConflictingFilters);
        }
        let filter = if present(fields.roles) {
            Filter::Roles(opt_strings(fields.roles, "roles")?)
        } else if present(fields.groups) {
            Filter::Groups(opt_strings(fields.groups, "groups")?)
        } else if present(fields.users) {
            Filter::Users(opt_strings(fields.users, "users")?)
        } else if present(fields.clients) {
            Filter::Clients(opt_strings(fields.clients, "clients")?)
        } else {
            Filter::All
        };
        Ok(Publish {
            name,
            payload: fields.data,
            filter,
        })
    }

    /// What to deliver: `{"type":"publish","data":{"name":…,"data":…}}` to the channel's
    /// subscribers that the filter admits.
    pub fn delivery(self) -> Delivery {
        let mut data = String::from("{\"name\":");
        push_json_string(&mut data, &self.name);
        data.push_str(",\"data\":");
        data.push_str(&self.payload.map_or("null".into(), |p| compact(p.get())));
        data.push('}');
        Delivery::Channel {
            channel: Arc::from(self.name),
            filter: self.filter,
            frame: Text(event_frame("publish", &data)),
        }
    }

    pub fn apply(self, session: &mut Session) -> Result<Flow, ProtocolError> {
        if !session.admin {
            return Err(ProtocolError::Forbidden(
                "publish needs an admin connection",
            ));
        }
        session.shared.deliver(self.delivery(), session.sender())?;
        Ok(Flow::Continue)
    }
}
