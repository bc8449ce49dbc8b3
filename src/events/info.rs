//! `info` (admin, SPEC §12): the cluster's nodes and its counts of connections, users,
//! channels and publish-filter groups. See [`crate::presence`].

use std::sync::Arc;

use crate::protocol::{Data, ProtocolError};
use crate::relay::Relay;

/// The `data` is ignored: `info` has no fields.
pub async fn answer(relay: &Arc<Relay>, _data: Data<'_>) -> Result<String, ProtocolError> {
    crate::presence::answer(relay, None, crate::presence::Query::Info).await
}
