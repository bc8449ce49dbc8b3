//! The wire format: the `{"type", "data"}` envelope, the rules for reading `data` and its
//! fields, the frames sent out, and the error codes a peer can receive.
//!
//! Inbound JSON is parsed into borrowed [`RawValue`]s so payloads are relayed as the sender
//! wrote them (key order, number spelling), only with insignificant whitespace removed
//! ([`compact`]). Every outbound frame is built once as a [`Utf8Bytes`] whose clones share the
//! same bytes, however many connections it is delivered to.

use std::borrow::Cow;

use indexmap::IndexMap;
use serde::Deserialize;
use serde_json::value::RawValue;
use tokio_tungstenite::tungstenite::Utf8Bytes;

use crate::kinds::Code;

/// What went wrong with a message; sent to its sender as an `error` event.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    #[error("message is not valid JSON: {0}")]
    InvalidJson(String),
    #[error("message must be a JSON object with \"type\" and \"data\"")]
    NotAnObject,
    #[error("message has no \"type\"")]
    MissingType,
    #[error("\"type\" must be a string")]
    InvalidType,
    #[error("\"data\" must be a JSON object for this event")]
    InvalidData,
    #[error("data.{0} is required")]
    MissingField(&'static str),
    #[error("data.{0} must be {1}")]
    InvalidField(&'static str, &'static str),
    #[error("{0}")]
    Forbidden(&'static str),
    #[error("{0}")]
    PolicyDenied(&'static str),
    #[error("no client with target {0}")]
    UnknownTarget(String),
    #[error("{0}")]
    NoServer(&'static str),
    #[error("channel name must be 1 to {max} characters of A-Z a-z 0-9 . _ - : /", max = MAX_CHANNEL_LEN)]
    InvalidChannel,
    #[error("a connection may subscribe to at most {0} channels")]
    TooManySubscriptions(usize),
    #[error("publish takes at most one of roles, groups, users")]
    ConflictingFilters,
    #[error("admin password missing or wrong")]
    Unauthorized,
    #[error("{0}")]
    RateLimited(&'static str),
    /// A SignalR client invoked a hub method (the relay offers none): answered with a
    /// completion error, and counted as bad input like a jssocket client's unknown event.
    #[error("Unknown hub method '{0}': this relay offers no hub methods")]
    UnknownMethod(String),
    /// Refused because something shared is full (the cluster's client lane, filled by many
    /// senders), not because of what this sender did: sent as `rate_limited`, never counted
    /// against the sender (see [`ProtocolError::is_load`]).
    #[error("{0}")]
    ClusterBusy(&'static str),
    /// No server can take a `client_connect` now and the queue of waiting ones is full, of
    /// other clients' requests: sent as `no_server`, and like [`ProtocolError::ClusterBusy`]
    /// never counted against the sender (a flood of others' connects must not get a
    /// bystander closed for asking once).
    #[error("{0}")]
    QueueFull(&'static str),
    /// A `client_connect` token in the form of a JWT that does not verify (SPEC §11); the
    /// request is not forwarded. Counted as bad input: a peer trying token after token is
    /// closed like one sending garbage.
    #[error("invalid token: {0}")]
    InvalidToken(crate::jwt::TokenError),
    /// A `membership` change over a bound (per user, per connection, per node).
    #[error("{0}")]
    MembershipFull(&'static str),
    /// A `disconnect` reason new to a node that keeps as many distinct reasons as it may
    /// (`membership::MAX_REASONS`).
    #[error("this node keeps at most 256 distinct close reasons: use one already used")]
    TooManyReasons,
}

/// Longest channel name.
pub const MAX_CHANNEL_LEN: usize = 200;

/// Checks a channel name: short, and characters that need no escaping anywhere.
pub fn validate_channel(name: &str) -> Result<(), ProtocolError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_CHANNEL_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b':' | b'/'));
    if ok {
        Ok(())
    } else {
        Err(ProtocolError::InvalidChannel)
    }
}

impl ProtocolError {
    /// The stable snake_case code clients match on.
    pub fn code(&self) -> Code {
        match self {
            ProtocolError::InvalidJson(_) => Code::InvalidJson,
            ProtocolError::NotAnObject => Code::NotAnObject,
            ProtocolError::MissingType => Code::MissingType,
            ProtocolError::InvalidType => Code::InvalidType,
            ProtocolError::InvalidData => Code::InvalidData,
            ProtocolError::MissingField(_) => Code::MissingField,
            ProtocolError::InvalidField(..) => Code::InvalidField,
            ProtocolError::Forbidden(_) => Code::Forbidden,
            ProtocolError::PolicyDenied(_) => Code::PolicyDenied,
            ProtocolError::UnknownTarget(_) => Code::UnknownTarget,
            ProtocolError::NoServer(_) | ProtocolError::QueueFull(_) => Code::NoServer,
            ProtocolError::InvalidChannel => Code::InvalidChannel,
            ProtocolError::TooManySubscriptions(_) => Code::TooManySubscriptions,
            ProtocolError::ConflictingFilters => Code::ConflictingFilters,
            ProtocolError::Unauthorized => Code::Unauthorized,
            ProtocolError::RateLimited(_) | ProtocolError::ClusterBusy(_) => Code::RateLimited,
            ProtocolError::InvalidToken(_) => Code::InvalidToken,
            ProtocolError::UnknownMethod(_) => Code::UnknownMethod,
            ProtocolError::MembershipFull(_) => Code::MembershipFull,
            ProtocolError::TooManyReasons => Code::TooManyReasons,
        }
    }

    /// True for errors caused by malformed input (counted toward the bad-input limit), as
    /// opposed to well-formed requests that were refused.
    pub fn is_bad_input(&self) -> bool {
        !matches!(
            self,
            ProtocolError::Forbidden(_)
                | ProtocolError::PolicyDenied(_)
                | ProtocolError::UnknownTarget(_)
                | ProtocolError::NoServer(_)
                | ProtocolError::TooManySubscriptions(_)
                | ProtocolError::Unauthorized
                | ProtocolError::RateLimited(_)
                | ProtocolError::ClusterBusy(_)
                | ProtocolError::QueueFull(_)
                | ProtocolError::MembershipFull(_)
                | ProtocolError::TooManyReasons
        )
    }

    /// True for refusals caused by load that others put on the server, which the sender
    /// cannot avoid: they must not count toward its bad-input limit, or a flood of attackers
    /// would get bystanders closed.
    pub fn is_load(&self) -> bool {
        matches!(
            self,
            ProtocolError::ClusterBusy(_) | ProtocolError::QueueFull(_)
        )
    }

    /// `{"type":"error","data":{"code":…,"message":…,"event":…}}`.
    pub fn to_frame(&self, event: Option<&str>) -> Utf8Bytes {
        #[derive(serde::Serialize)]
        struct ErrorData<'a> {
            code: &'a str,
            message: String,
            event: Option<&'a str>,
        }
        #[derive(serde::Serialize)]
        struct ErrorEvent<'a> {
            #[serde(rename = "type")]
            kind: &'static str,
            data: ErrorData<'a>,
        }
        let event = ErrorEvent {
            kind: "error",
            data: ErrorData {
                code: self.code().name(),
                message: self.to_string(),
                event,
            },
        };
        Utf8Bytes::from(serde_json::to_string(&event).unwrap_or_default())
    }
}

/// One inbound message: its type and its `data`, still raw.
#[derive(Debug)]
pub struct Envelope<'a> {
    pub kind: Cow<'a, str>,
    pub data: Data<'a>,
}

#[derive(Deserialize)]
struct RawEnvelope<'a> {
    #[serde(rename = "type", borrow, default)]
    kind: Option<&'a RawValue>,
    #[serde(borrow, default)]
    data: Option<&'a RawValue>,
}

impl<'a> Envelope<'a> {
    /// Parses one WebSocket message (text or binary) into an envelope.
    pub fn parse(bytes: &'a [u8]) -> Result<Envelope<'a>, ProtocolError> {
        let text = std::str::from_utf8(bytes)
            .map_err(|_| ProtocolError::InvalidJson("not UTF-8".into()))?;
        let value: &RawValue =
            serde_json::from_str(text).map_err(|e| ProtocolError::InvalidJson(e.to_string()))?;
        // serde would also read a JSON array as a struct; the envelope must be an object.
        if !value.get().starts_with('{') {
            return Err(ProtocolError::NotAnObject);
        }
        let raw: RawEnvelope<'a> = serde_json::from_str(value.get())
            .map_err(|e| ProtocolError::InvalidJson(e.to_string()))?;
        let kind = match raw.kind {
            None => return Err(ProtocolError::MissingType),
            Some(kind) => serde_json::from_str::<Cow<'a, str>>(kind.get())
                .map_err(|_| ProtocolError::InvalidType)?,
        };
        Ok(Envelope {
            kind,
            data: Data(raw.data),
        })
    }
}

/// A raw `data` value. Falsy values (missing, `null`, `false`, `0`, `""`, `[]`, `{}`) count as
/// `{}`, as in the original relay.
#[derive(Debug, Clone, Copy)]
pub struct Data<'a>(pub Option<&'a RawValue>);

impl<'a> Data<'a> {
    pub fn is_falsy(&self) -> bool {
        self.0.is_none_or(is_falsy)
    }

    /// The value as JSON text to relay: compacted, `{}` when falsy.
    pub fn relay_text(&self) -> Cow<'a, str> {
        match self.0 {
            Some(raw) if !is_falsy(raw) => compact(raw.get()),
            _ => Cow::Borrowed("{}"),
        }
    }

    /// Reads `data` as an event's fields `T`. Falsy data is `{}`; any other non-object is
    /// [`ProtocolError::InvalidData`].
    pub fn fields<T: Deserialize<'a> + Default>(&self) -> Result<T, ProtocolError> {
        match self.0 {
            Some(raw) if !is_falsy(raw) => {
                if !raw.get().starts_with('{') {
                    return Err(ProtocolError::InvalidData);
                }
                serde_json::from_str(raw.get()).map_err(|_| ProtocolError::InvalidData)
            }
            _ => Ok(T::default()),
        }
    }

    /// Reads `data` as an ordered object, for events that rewrite it and pass the rest on.
    pub fn object(&self) -> Result<IndexMap<Cow<'a, str>, &'a RawValue>, ProtocolError> {
        match self.0 {
            Some(raw) if !is_falsy(raw) => {
                if !raw.get().starts_with('{') {
                    return Err(ProtocolError::InvalidData);
                }
                serde_json::from_str(raw.get()).map_err(|_| ProtocolError::InvalidData)
            }
            _ => Ok(IndexMap::new()),
        }
    }
}

/// Python's truthiness for a JSON value.
pub fn is_falsy(raw: &RawValue) -> bool {
    let text = raw.get();
    match text.as_bytes().first() {
        Some(b'n') | Some(b'f') => true, // null, false
        Some(b'"') => text == "\"\"",
        Some(b'[') | Some(b'{') => text[1..].trim_start().len() == 1,
        Some(b'-') | Some(b'0'..=b'9') => text.parse::<f64>().is_ok_and(|n| n == 0.0),
        _ => false,
    }
}

/// Reads an optional string field: missing, `null` and `""` are `None` (the default).
pub fn opt_string(
    raw: Option<&RawValue>,
    field: &'static str,
) -> Result<Option<String>, ProtocolError> {
    let Some(raw) = raw else { return Ok(None) };
    match serde_json::from_str::<Option<String>>(raw.get()) {
        Ok(Some(s)) if !s.is_empty() => Ok(Some(s)),
        Ok(_) => Ok(None),
        Err(_) => Err(ProtocolError::InvalidField(field, "a string")),
    }
}

/// Reads an optional array of strings; missing and `null` are empty.
pub fn opt_strings(
    raw: Option<&RawValue>,
    field: &'static str,
) -> Result<Vec<String>, ProtocolError> {
    let Some(raw) = raw else {
        return Ok(Vec::new());
    };
    serde_json::from_str::<Option<Vec<String>>>(raw.get())
        .map(Option::unwrap_or_default)
        .map_err(|_| ProtocolError::InvalidField(field, "an array of strings"))
}

/// Removes insignificant whitespace from valid JSON text, leaving everything else (key order,
/// number spelling, string escapes) as written. Borrowed when there is nothing to remove.
pub fn compact(json: &str) -> Cow<'_, str> {
    let has_space = json
        .bytes()
        .any(|b| matches!(b, b' ' | b'\n' | b'\r' | b'\t'));
    if !has_space {
        return Cow::Borrowed(json);
    }
    let mut out = String::with_capacity(json.len());
    let mut in_string = false;
    let mut escaped = false;
    for c in json.chars() {
        if in_string {
            out.push(c);
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_string = false;
            }
        } else if c == '"' {
            in_string = true;
            out.push(c);
        } else if !matches!(c, ' ' | '\n' | '\r' | '\t') {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// `{"type":<kind>,"data":<data>}` where `data` is already JSON text.
pub fn event_frame(kind: &str, data: &str) -> Utf8Bytes {
    let mut out = String::with_capacity(kind.len() + data.len() + 20);
    out.push_str("{\"type\":");
    push_json_string(&mut out, kind);
    out.push_str(",\"data\":");
    out.push_str(data);
    out.push('}');
    Utf8Bytes::from(out)
}

/// A bare payload (no envelope), as `notify_*` deliver it.
pub fn bare_frame(data: &str) -> Utf8Bytes {
    Utf8Bytes::from(data.to_string())
}

/// Serialises an ordered object of raw values back to compact JSON text.
pub fn object_text(object: &IndexMap<Cow<'_, str>, &RawValue>) -> String {
    let mut out = String::with_capacity(64);
    out.push('{');
    for (i, (key, value)) in object.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        push_json_string(&mut out, key);
        out.push(':');
        out.push_str(&compact(value.get()));
    }
    out.push('}');
    out
}

pub fn push_json_string(out: &mut String, s: &str) {
    match serde_json::to_string(s) {
        Ok(quoted) => out.push_str(&quoted),
        Err(_) => out.push_str("\"\""),
    }
}

/// A JSON string value as a raw value, for fields the relay writes (`target`).
pub fn raw_string(s: &str) -> Box<RawValue> {
    let mut quoted = String::new();
    push_json_string(&mut quoted, s);
    RawValue::from_string(quoted).unwrap_or_else(|_| empty_object())
}

fn empty_object() -> Box<RawValue> {
    match RawValue::from_string("{}".to_string()) {
        Ok(raw) => raw,
        Err(_) => unreachable!("{{}} is valid JSON"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Refusals caused by others' load are neither bad input nor counted against the
    /// sender; they keep their wire code.
    #[test]
    fn load_refusals_are_not_held_against_the_sender() {
        for error in [
            ProtocolError::ClusterBusy("lane full"),
            ProtocolError::QueueFull("queue full"),
        ] {
            assert!(error.is_load() && !error.is_bad_input(), "{error:?}");
        }
        assert_eq!(ProtocolError::QueueFull("x").code(), Code::NoServer);
        assert!(!ProtocolError::NoServer("x").is_load());
    }

    fn raw(s: &str) -> &RawValue {
        serde_json::from_str(s).unwrap()
    }

    #[test]
    fn falsy_values_match_python() {
        for s in [
            "null", "false", "0", "0.0", "-0", "\"\"", "[]", "{}", "[ ]", "{ \n}",
        ] {
            assert!(is_falsy(raw(s)), "{s} should be falsy");
        }
        for s in [
            "true",
            "1",
            "-1",
            "0.5",
            "\"a\"",
            "[0]",
            "{\"a\":1}",
            "\" \"",
        ] {
            assert!(!is_falsy(raw(s)), "{s} should be truthy");
        }
    }

    #[test]
    fn compact_keeps_strings_and_order() {
        assert_eq!(
            compact("{\"b\": 1, \"a\" : [1, 2]}"),
            "{\"b\":1,\"a\":[1,2]}"
        );
        assert_eq!(compact("\"a b \\\" c\""), "\"a b \\\" c\"");
        assert_eq!(
            compact("{\"k\":\"x\\\\\",  \"y\": \" \"}"),
            "{\"k\":\"x\\\\\",\"y\":\" \"}"
        );
        assert!(matches!(compact("[1,2]"), Cow::Borrowed(_)));
    }

    #[test]
    fn envelope_errors_are_specific() {
        assert!(matches!(
            Envelope::parse(b"nope"),
            Err(ProtocolError::InvalidJson(_))
        ));
        assert_eq!(
            Envelope::parse(b"[1]").unwrap_err(),
            ProtocolError::NotAnObject
        );
        assert_eq!(
            Envelope::parse(b"{\"data\":{}}").unwrap_err(),
            ProtocolError::MissingType
        );
        assert_eq!(
            Envelope::parse(b"{\"type\":1}").unwrap_err(),
            ProtocolError::InvalidType
        );
        let env = Envelope::parse(b"{\"type\":\"notify_all\",\"x\":1}").unwrap();
        assert_eq!(env.kind, "notify_all");
        assert!(env.data.is_falsy());
    }

    #[test]
    fn object_text_round_trips_in_order() {
        let data = Data(Some(raw(
            "{\"z\": 1, \"a\": {\"q\": [true]}, \"m\": \"s\"}",
        )));
        let obj = data.object().unwrap();
        assert_eq!(
            object_text(&obj),
            "{\"z\":1,\"a\":{\"q\":[true]},\"m\":\"s\"}"
        );
    }
}
