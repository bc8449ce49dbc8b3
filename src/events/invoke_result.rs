//! `invoke_result`: a server answers a client's call (SPEC §12) with
//! `{"target":T,"id":I,"data":D}` or `{"target":T,"id":I,"error":E}` (admins only). It is
//! routed to the node of connection `T` and reaches that client only if its call `I` is in
//! flight there; anything else (a late answer, a second one, another connection's id) is
//! dropped and counted (`invoke_results_dropped`), with no reply: a server learns nothing
//! about calls that are not its own.

use serde_json::value::RawValue;

use crate::delivery::{Delivery, Text};
use crate::invoke::canonical_id;
use crate::protocol::{Data, ProtocolError, compact};
use crate::session::{Flow, Session};
use tokio_tungstenite::tungstenite::Utf8Bytes;

#[derive(Debug)]
pub struct InvokeResult<'a> {
    target: String,
    id: Box<str>,
    /// The server's `error` if it gave one, else its `data`.
    value: Option<&'a RawValue>,
    error: bool,
}

impl<'a> InvokeResult<'a> {
    pub fn parse(data: Data<'a>) -> Result<InvokeResult<'a>, ProtocolError> {
        #[derive(serde::Deserialize, Default)]
        struct Fields<'a> {
            #[serde(borrow, default)]
            target: Option<&'a RawValue>,
            #[serde(borrow, default)]
            id: Option<&'a RawValue>,
            #[serde(borrow, default)]
            data: Option<&'a RawValue>,
            #[serde(borrow, default)]
            error: Option<&'a RawValue>,
        }
        let fields: Fields<'a> = data.fields()?;
        let target = crate::protocol::opt_string(fields.target, "target")?
            .ok_or(ProtocolError::MissingField("target"))?;
        let id = canonical_id(fields.id.ok_or(ProtocolError::MissingField("id"))?)?;
        let error = fields.error.is_some();
        Ok(InvokeResult {
            target,
            id,
            value: fields.error.or(fields.data),
            error,
        })
    }

    /// What to deliver: the server's value as it wrote it (whitespace removed).
    pub fn delivery(&self) -> Delivery {
        let value = self.value.map_or("null".into(), |raw| compact(raw.get()));
        Delivery::InvokeResult {
            target: self.target.as_str().into(),
            id: self.id.clone(),
            error: self.error,
            frame: Text(Utf8Bytes::from(value.into_owned())),
        }
    }

    pub fn apply(self, session: &mut Session) -> Result<Flow, ProtocolError> {
        if !session.admin {
            return Err(ProtocolError::Forbidden("invoke_result needs an admin"));
        }
        session.shared.deliver(self.delivery(), session.sender())?;
        Ok(Flow::Continue)
    }
}
