//! What a SignalR client sends: the handshake request, then record-separated hub messages
//! (HubProtocol.md, JSON encoding). Parsing never fails the server: every problem is an
//! [`Error`] with a message the client is told before the connection closes.

use std::borrow::Cow;

use serde::Deserialize;

use super::RS;
use crate::protocol::push_json_string;

/// Why a client's input ends its connection; the text goes into the handshake error or the
/// close message's `error`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("handshake request is not valid JSON")]
    HandshakeJson,
    #[error("Requested protocol '{0}' is not available (this server offers json, version 1)")]
    Protocol(String),
    #[error("protocol 'json' version {0} is not supported (this server supports version 1)")]
    Version(u64),
    #[error("this connection id is connected already; negotiate again")]
    IdInUse,
    #[error("message is not a JSON object with a numeric 'type'")]
    Message,
    #[error("message is over {0} bytes")]
    TooBig(usize),
}

/// `{"protocol":"json","version":1}`: anything else is refused with a reason.
pub fn handshake(record: &str) -> Result<(), Error> {
    #[derive(Deserialize)]
    struct Request<'a> {
        #[serde(borrow)]
        protocol: Cow<'a, str>,
        version: u64,
    }
    let request: Request<'_> = serde_json::from_str(record).map_err(|_| Error::HandshakeJson)?;
    if request.protocol != "json" {
        // Bounded: the name is echoed back.
        let name: String = request.protocol.chars().take(64).collect();
        return Err(Error::Protocol(name));
    }
    if request.version != 1 {
        return Err(Error::Version(request.version));
    }
    Ok(())
}

/// `{"error":<reason>}` + RS: the handshake's refusal.
pub fn handshake_error(error: &Error) -> String {
    let mut out = String::from("{\"error\":");
    push_json_string(&mut out, &error.to_string());
    out.push('}');
    out.push(RS);
    out
}

/// The close message: `{"type":7,"error":…,"allowReconnect":…}` + RS.
pub fn close_message(error: Option<&str>, allow_reconnect: bool) -> String {
    let mut out = String::from("{\"type\":7");
    if let Some(error) = error {
        out.push_str(",\"error\":");
        push_json_string(&mut out, error);
    }
    // Written out either way (the protocol's default is false): a client, or someone reading
    // a capture, sees whether reconnecting with the same credentials makes sense.
    out.push_str(if allow_reconnect {
        ",\"allowReconnect\":true"
    } else {
        ",\"allowReconnect\":false"
    });
    out.push('}');
    out.push(RS);
    out
}

/// A completion with an error: `{"type":3,"invocationId":…,"error":…}` + RS.
pub fn completion_error(invocation_id: &str, error: &str) -> String {
    let mut out = String::from("{\"type\":3,\"invocationId\":");
    push_json_string(&mut out, invocation_id);
    out.push_str(",\"error\":");
    push_json_string(&mut out, error);
    out.push('}');
    out.push(RS);
    out
}

/// One hub message from the client, as far as the relay cares.
#[derive(Debug, PartialEq, Eq)]
pub enum Message<'a> {
    /// An invocation (type 1) or stream invocation (type 4, `stream`) of `target`; one
    /// with an `invocation_id` waits for a completion. `arguments`: the raw JSON of its
    /// arguments array (`[]` when missing).
    Invocation {
        target: Cow<'a, str>,
        invocation_id: Option<Cow<'a, str>>,
        arguments: &'a str,
        stream: bool,
    },
    /// Type 6: the client is alive (any message says so too).
    Ping,
    /// Type 7: the client is leaving.
    Close,
    /// Anything else (stream items, completions, cancellations, acks, and types this server
    /// does not know): ignored, as the protocol allows newer messages to be.
    Other,
}

impl<'a> Message<'a> {
    pub fn parse(record: &'a str) -> Result<Message<'a>, Error> {
        #[derive(Deserialize)]
        struct Fields<'a> {
            #[serde(rename = "type")]
            kind: u64,
            #[serde(borrow, default)]
            target: Option<Cow<'a, str>>,
            #[serde(borrow, default, rename = "invocationId")]
            invocation_id: Option<Cow<'a, str>>,
            #[serde(borrow, default)]
            arguments: Option<&'a serde_json::value::RawValue>,
        }
        let fields: Fields<'a> = serde_json::from_str(record).map_err(|_| Error::Message)?;
        Ok(match fields.kind {
            kind @ (1 | 4) => Message::Invocation {
                target: fields.target.unwrap_or_default(),
                invocation_id: fields.invocation_id,
                arguments: fields.arguments.map_or("[]", |raw| raw.get()),
                stream: kind == 4,
            },
            6 => Message::Ping,
            7 => Message::Close,
            _ => Message::Other,
        })
    }
}

/// Bytes of a client's stream not yet read as whole records: a record may span WebSocket
/// frames, and a frame may hold several records. Bounded by `max` bytes per record.
#[derive(Debug, Default)]
pub struct Records {
    partial: String,
}

impl Records {
    /// Appends `text` and calls `each` with every complete record (without its RS), in
    /// order, stopping at the first `Err`. A record still unfinished over `max` bytes is
    /// [`Error::TooBig`].
    pub fn feed<E>(
        &mut self,
        text: &str,
        max: usize,
        mut each: impl FnMut(&str) -> Result<(), E>,
    ) -> Result<(), Result<E, Error>> {
        let mut rest = text;
        if !self.partial.is_empty() {
            match rest.find(RS) {
                Some(i) => {
                    self.partial.push_str(&rest[..i]);
                    rest = &rest[i + 1..];
                    let record = std::mem::take(&mut self.partial);
                    if record.len() > max {
                        return Err(Err(Error::TooBig(max)));
                    }
                    each(&record).map_err(Ok)?;
                }
                None => {
                    self.partial.push_str(rest);
                    return match self.partial.len() > max {
                        true => Err(Err(Error::TooBig(max))),
                        false => Ok(()),
                    };
                }
            }
        }
        while let Some(i) = rest.find(RS) {
            let record = &rest[..i];
            if record.len() > max {
                return Err(Err(Error::TooBig(max)));
            }
            each(record).map_err(Ok)?;
            rest = &rest[i + 1..];
        }
        if rest.len() > max {
            return Err(Err(Error::TooBig(max)));
        }
        self.partial.push_str(rest);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handshake_accepts_json_version_1_only() {
        assert_eq!(handshake(r#"{"protocol":"json","version":1}"#), Ok(()));
        assert_eq!(
            handshake(r#"{"protocol":"messagepack","version":1}"#),
            Err(Error::Protocol("messagepack".into()))
        );
        assert_eq!(
            handshake(r#"{"protocol":"json","version":2}"#),
            Err(Error::Version(2))
        );
        assert_eq!(handshake("{"), Err(Error::HandshakeJson));
    }

    #[test]
    fn records_span_frames_and_frames_hold_several() {
        let mut records = Records::default();
        let mut seen = Vec::new();
        let mut collect = |r: &str| {
            seen.push(r.to_string());
            Ok::<(), ()>(())
        };
        assert!(
            records
                .feed("{\"type\":6}\u{1e}{\"ty", 100, &mut collect)
                .is_ok()
        );
        assert!(records.feed("pe\":6}\u{1e}", 100, &mut collect).is_ok());
        assert_eq!(seen, ["{\"type\":6}", "{\"type\":6}"]);
        let mut big = Records::default();
        assert_eq!(
            big.feed(&"x".repeat(101), 100, |_| Ok::<(), ()>(())),
            Err(Err(Error::TooBig(100)))
        );
    }

    #[test]
    fn messages_are_read_by_type() {
        assert_eq!(Message::parse(r#"{"type":6}"#), Ok(Message::Ping));
        assert_eq!(
            Message::parse(r#"{"type":1,"target":"x","invocationId":"1","arguments":[]}"#),
            Ok(Message::Invocation {
                target: "x".into(),
                invocation_id: Some("1".into()),
                arguments: "[]",
                stream: false,
            })
        );
        assert_eq!(Message::parse(r#"{"type":99}"#), Ok(Message::Other));
        assert_eq!(Message::parse("[]"), Err(Error::Message));
        assert_eq!(Message::parse(r#"{"target":"x"}"#), Err(Error::Message));
    }
}
