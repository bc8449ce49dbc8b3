//! `connections` (admin, SPEC §12): connections with their user, group, roles, groups, subscriptions and node (filter `user`), a page at a time. See [`crate::presence`].

use std::sync::Arc;

use crate::presence::Kind;
use crate::protocol::{Data, ProtocolError};
use crate::relay::Relay;

pub async fn answer(relay: &Arc<Relay>, data: Data<'_>) -> Result<String, ProtocolError> {
    let query = crate::presence::parse(Kind::Connections, data)?;
    crate::presence::answer(relay, Some(Kind::Connections), query).await
}
