//! `users` (admin, SPEC §12): users online, each once across pages, with their connection counts (filters `prefix`, `group`, `role`), a page at a time. See [`crate::presence`].

use std::sync::Arc;

use crate::presence::Kind;
use crate::protocol::{Data, ProtocolError};
use crate::relay::Relay;

pub async fn answer(relay: &Arc<Relay>, data: Data<'_>) -> Result<String, ProtocolError> {
    let query = crate::presence::parse(Kind::Users, data)?;
    crate::presence::answer(relay, Some(Kind::Users), query).await
}
