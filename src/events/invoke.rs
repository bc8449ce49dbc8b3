//! `invoke`: a registered client calls the backend (SPEC §12). `{"id":I,"method":M,"data":D}`
//! is forwarded to one server as `invoke` with the caller's `target`, `user`, `roles` and
//! `groups`; the server's `invoke_result` comes back to this connection only (see
//! [`crate::invoke`]).
//!
//! A bad `id` is answered with an `error` event (there is no id to answer under); once the
//! id is known, every refusal (a bad `method`, the limits, a duplicate id) is an
//! `invoke_result` with an `error` `{"code","message"}`, so the caller can match it to its
//! call; refusals count toward `--bad-input-limit` like error events.

use serde_json::value::RawValue;

use crate::invoke::{Outcome, Reply, canonical_id, check_method, refusal_error, result_frame};
use crate::kinds::Frame;
use crate::protocol::{Data, ProtocolError, compact};
use crate::relay::Call;
use crate::session::{Flow, Session};

#[derive(Debug)]
pub struct Invoke<'a> {
    /// Canonical JSON of the caller's id.
    id: Box<str>,
    method: Option<&'a RawValue>,
    data: Data<'a>,
}

impl<'a> Invoke<'a> {
    pub fn parse(data: Data<'a>) -> Result<Invoke<'a>, ProtocolError> {
        #[derive(serde::Deserialize, Default)]
        struct Fields<'a> {
            #[serde(borrow, default)]
            id: Option<&'a RawValue>,
            #[serde(borrow, default)]
            method: Option<&'a RawValue>,
            #[serde(borrow, default)]
            data: Option<&'a RawValue>,
        }
        let fields: Fields<'a> = data.fields()?;
        let id = fields.id.ok_or(ProtocolError::MissingField("id"))?;
        Ok(Invoke {
            id: canonical_id(id)?,
            method: fields.method,
            data: Data(fields.data),
        })
    }

    pub fn apply(self, session: &mut Session) -> Result<Flow, ProtocolError> {
        if !session.peer.state().registered {
            return Err(ProtocolError::Forbidden(
                "invoke needs a registered client (send client_connect first)",
            ));
        }
        match self.forward(session) {
            Ok(()) => Ok(Flow::Continue),
            Err(error) => {
                let frame = || {
                    result_frame(
                        &Reply::Jssocket,
                        &self.id,
                        Outcome::Error(&refusal_error(&error)),
                    )
                };
                Ok(session.reject_with(&error, Some("invoke"), frame, Frame::InvokeResult))
            }
        }
    }

    fn forward(&self, session: &mut Session) -> Result<(), ProtocolError> {
        let method = self
            .method
            .and_then(|raw| serde_json::from_str::<std::borrow::Cow<'_, str>>(raw.get()).ok())
            .ok_or(ProtocolError::InvalidField(
                "method",
                "a string of 1 to 128 bytes without control characters",
            ))?;
        check_method(&method)?;
        session.invokes.admit()?;
        let data = match self.data.0 {
            Some(raw) => compact(raw.get()),
            None => "null".into(),
        };
        let call = Call {
            id: Some(self.id.clone()),
            method: &method,
            data: &data,
            reply: Reply::Jssocket,
        };
        session.shared.invoke(&session.peer, call)
    }
}
