//! `channels` (admin, SPEC §12): channels with their subscriber counts (filter `prefix`), a page at a time. See [`crate::presence`].

use std::sync::Arc;

use crate::presence::Kind;
use crate::protocol::{Data, ProtocolError};
use crate::relay::Relay;

pub async fn answer(relay: &Arc<Relay>, data: Data<'_>) -> Result<String, ProtocolError> {
    let query = crate::presence::parse(Kind::Channels, data)?;
    crate::presence::answer(relay, Some(Kind::Channels), query).await
}
