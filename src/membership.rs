//! Runtime membership and admin disconnects (SPEC §12 `membership`, `disconnect`): what they
//! change, the per-user table of runtime additions, and how a change is confirmed by every
//! node before the admin is answered.
//!
//! Semantics (documented in the README):
//! - `add` by `user` is remembered in this table (on every node) and given to that user's
//!   connections now and to every connection acknowledged for that user later, on top of what
//!   its acknowledgement gives, until removed. A later `client_connected` for a connection
//!   replaces the acknowledgement's names and keeps the user's runtime additions.
//! - `remove` by `user` forgets the runtime addition and takes the name off the user's current
//!   connections, whatever gave it (the acknowledgement included); a later acknowledgement
//!   that itself gives the name gives it again.
//! - By `target`, a change concerns that one connection and is not remembered: the next
//!   `client_connected` for it starts again from its acknowledgement (plus its user's table).
//!
//! Ordering: the admin is answered only once every live node has applied the change (each
//! confirms to the origin over the backplane, at most [`CONFIRM_TIMEOUT`]), so a `publish`
//! sent after the answer, through any node, is filtered with the change whatever topics the
//! two travelled on. A node that does not confirm in time is named in the answer's `timeout`.
//!
//! Not replicated: a node that starts after a change has no runtime additions for future
//! connections (it never saw them); a restarted node forgets them.

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use dashmap::DashMap;
use serde::{Deserialize, Serialize};

use crate::delivery::{Delivery, Route, Sender};
use crate::hub::Hub;
use crate::peer::{Close, Peer, PeerState};
use crate::protocol::ProtocolError;
use crate::relay::Relay;

/// Longest `name` and `user` of a change.
pub const MAX_NAME_LEN: usize = 200;
/// Most runtime additions (roles and groups together) one user may have.
pub const MAX_NAMES_PER_USER: usize = 64;
/// Most runtime additions over every user of a node.
pub const MAX_TOTAL_NAMES: usize = 100_000;
/// Most roles, or groups, one connection may have for an `add` by `target` to be accepted.
pub const MAX_NAMES_PER_CONNECTION: usize = 256;
/// How long the origin waits for the other nodes to confirm a change.
pub const CONFIRM_TIMEOUT: Duration = Duration::from_secs(1);
/// Longest close reason, in bytes: a close frame's payload is at most 125 bytes, 2 of which
/// are the code (RFC 6455 §5.5).
pub const MAX_REASON_LEN: usize = 123;
/// Distinct close reasons a node keeps (see [`intern`]).
pub const MAX_REASONS: usize = 256;
/// The close code when `disconnect` gives none.
pub const DEFAULT_CODE: u16 = 4000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    Add,
    Remove,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// A publish-filter group (the acknowledgement's `groups`).
    Group,
    Role,
}

/// Whose connections a change or a disconnect concerns.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Who {
    /// Every connection acknowledged with this `user`, on every node.
    User(Arc<str>),
    /// One connection, by id.
    Target(Box<str>),
}

/// One `membership` request, validated.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Change {
    pub action: Action,
    pub kind: Kind,
    pub name: Box<str>,
    pub who: Who,
}

/// One `disconnect` request, validated.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Disconnect {
    pub who: Who,
    pub code: u16,
    pub reason: Box<str>,
}

/// Names a change its origin waits to hear confirmed: the origin's node tag and a number.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct Ack {
    pub node: u32,
    pub id: u64,
}

/// What the other nodes confirmed of a change.
#[derive(Debug, Default)]
pub struct Confirmed {
    /// Connections they matched, summed.
    pub connections: usize,
    /// Nodes that confirmed.
    pub nodes: usize,
    /// Live nodes that did not confirm within [`CONFIRM_TIMEOUT`].
    pub missing: Vec<String>,
}

impl Change {
    pub fn size(&self) -> usize {
        self.name.len() + self.who.size()
    }
}

impl Disconnect {
    pub fn size(&self) -> usize {
        self.reason.len() + self.who.size()
    }
}

impl Who {
    fn size(&self) -> usize {
        match self {
            Who::User(user) => user.len(),
            Who::Target(target) => target.len(),
        }
    }
}

/// A user's runtime additions.
#[derive(Debug, Default)]
struct Names {
    roles: Vec<String>,
    groups: Vec<String>,
}

impl Names {
    fn list(&mut self, kind: Kind) -> &mut Vec<String> {
        match kind {
            Kind::Role => &mut self.roles,
            Kind::Group => &mut self.groups,
        }
    }

    fn len(&self) -> usize {
        self.roles.len() + self.groups.len()
    }
}

/// The runtime additions of every user, bounded per user and in total.
#[derive(Debug, Default)]
pub struct Table {
    users: DashMap<Arc<str>, Names>,
    total: AtomicUsize,
}

impl Table {
    /// Remembers `name` for `user`; an addition already there is not counted twice.
    fn add(&self, user: &Arc<str>, kind: Kind, name: &str) -> Result<(), ProtocolError> {
        let mut names = self.users.entry(Arc::clone(user)).or_default();
        if names.list(kind).iter().any(|n| n == name) {
            return Ok(());
        }
        let refuse = |why| {
            // (An entry made for this refusal alone is left empty: removed below.)
            Err(ProtocolError::MembershipFull(why))
        };
        if names.len() >= MAX_NAMES_PER_USER {
            return refuse("a user may have at most 64 runtime roles and groups");
        }
        if self.total.fetch_add(1, Ordering::Relaxed) >= MAX_TOTAL_NAMES {
            self.total.fetch_sub(1, Ordering::Relaxed);
            let empty = names.len() == 0;
            drop(names);
            if empty {
                self.users.remove_if(user, |_, names| names.len() == 0);
            }
            return refuse("the node holds 100000 runtime roles and groups already");
        }
        names.list(kind).push(name.to_string());
        Ok(())
    }

    fn remove(&self, user: &str, kind: Kind, name: &str) {
        let removed = self.users.remove_if_mut(user, |_, names| {
            let list = names.list(kind);
            if let Some(i) = list.iter().position(|n| n == name) {
                list.swap_remove(i);
                self.total.fetch_sub(1, Ordering::Relaxed);
            }
            names.len() == 0
        });
        drop(removed);
    }

    /// Gives a connection just acknowledged its user's runtime additions. Called with the
    /// connection's state locked (the lock order allows a map shard inside it).
    pub fn extend(&self, state: &mut PeerState) {
        let Some(user) = state.user.as_deref() else {
            return;
        };
        let Some(names) = self.users.get(user) else {
            return;
        };
        for role in &names.roles {
            if !state.roles.contains(role) {
                state.roles.push(role.clone());
            }
        }
        for group in &names.groups {
            if !state.groups.contains(group) {
                state.groups.push(group.clone());
            }
        }
    }

    /// Runtime additions held, over every user.
    pub fn total(&self) -> usize {
        self.total.load(Ordering::Relaxed)
    }
}

/// The connections of `who` on this node: a user's are the members of the group named after
/// it whose `user` it is (a snapshot: changed outside the map's lock).
fn connections(hub: &Hub, who: &Who) -> Vec<Arc<Peer>> {
    match who {
        Who::User(user) => {
            let mut members = hub.group_members(user);
            members.retain(|peer| peer.state().user.as_deref() == Some(&**user));
            members
        }
        Who::Target(target) => hub.client(target).into_iter().collect(),
    }
}

/// Applies a change to this node: the user's table, then its connections here. Returns the
/// connections it matched. `origin`: the admin's own node, where a full table or a full
/// connection is refused; a node applying another's change applies what it can.
pub fn apply_change(hub: &Hub, change: &Change, origin: bool) -> Result<usize, ProtocolError> {
    if let Who::User(user) = &change.who {
        match change.action {
            Action::Add => {
                let added = hub.membership.add(user, change.kind, &change.name);
                if origin {
                    added?;
                }
            }
            Action::Remove => hub.membership.remove(user, change.kind, &change.name),
        }
    }
    let peers = connections(hub, &change.who);
    let mut matched = 0;
    for peer in &peers {
        let mut state = peer.state();
        if state.closed || !state.registered {
            continue;
        }
        let list = match change.kind {
            Kind::Role => &mut state.roles,
            Kind::Group => &mut state.groups,
        };
        match change.action {
            Action::Add if list.iter().any(|n| **n == *change.name) => {}
            Action::Add => {
                if matches!(change.who, Who::Target(_)) && list.len() >= MAX_NAMES_PER_CONNECTION {
                    if origin {
                        return Err(ProtocolError::MembershipFull(
                            "a connection may have at most 256 roles, and 256 groups",
                        ));
                    }
                    continue;
                }
                list.push(change.name.to_string());
            }
            Action::Remove => list.retain(|n| **n != *change.name),
        }
        matched += 1;
    }
    Ok(matched)
}

/// Closes the connections of `who` on this node with the given code and reason; returns how
/// many it closed (not those already closing).
pub fn disconnect(hub: &Hub, order: &Disconnect) -> usize {
    let reason = intern(&order.reason).unwrap_or(FALLBACK_REASON);
    let close = Close {
        code: order.code,
        reason,
    };
    connections(hub, &order.who)
        .iter()
        .filter(|peer| !peer.is_closing())
        .map(|peer| peer.close(close))
        .count()
}

/// The reason of a disconnect whose own reason this node has no room for (see [`intern`]).
pub const FALLBACK_REASON: &str = "disconnected by an admin";

/// A close reason with the lifetime a [`Close`] holds (closes are plain copyable values,
/// compared and passed around by every connection task): each distinct reason is kept once
/// for the life of the process, at most [`MAX_REASONS`] of them of at most
/// [`MAX_REASON_LEN`] bytes (32 KiB). `None` when the table is full and the reason is new.
pub fn intern(reason: &str) -> Option<&'static str> {
    static REASONS: OnceLock<Mutex<HashSet<&'static str>>> = OnceLock::new();
    if reason.is_empty() {
        return Some("");
    }
    if reason.len() > MAX_REASON_LEN {
        return None;
    }
    let mut reasons = REASONS
        .get_or_init(Mutex::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    if let Some(known) = reasons.get(reason) {
        return Some(known);
    }
    if reasons.len() >= MAX_REASONS {
        return None;
    }
    let kept: &'static str = Box::leak(reason.to_string().into_boxed_str());
    reasons.insert(kept);
    Some(kept)
}

/// Reads `user` or `target` (exactly one of them).
pub(crate) fn parse_who(
    user: Option<&serde_json::value::RawValue>,
    target: Option<&serde_json::value::RawValue>,
) -> Result<Who, ProtocolError> {
    let user = crate::protocol::opt_string(user, "user")?;
    let target = crate::protocol::opt_string(target, "target")?;
    match (user, target) {
        (Some(_), Some(_)) => Err(ProtocolError::InvalidField(
            "user",
            "given without target (one of user or target)",
        )),
        (None, None) => Err(ProtocolError::MissingField("user")),
        (Some(user), None) if user.len() > MAX_NAME_LEN => Err(ProtocolError::InvalidField(
            "user",
            "a string of at most 200 bytes",
        )),
        (Some(user), None) => Ok(Who::User(Arc::from(user))),
        (None, Some(target)) if crate::hub::looks_like_id(&target) => {
            Ok(Who::Target(target.into()))
        }
        (None, Some(target)) => Err(ProtocolError::UnknownTarget(
            target.chars().take(64).collect(),
        )),
    }
}

/// Where a change of `who` is applied here, and where it goes beyond: a user's everywhere,
/// a target's on its node. `Err`: a target that is nowhere.
pub(crate) fn route(relay: &Relay, who: &Who) -> Result<(bool, Option<Route>), ProtocolError> {
    match who {
        Who::User(_) => Ok((true, Some(Route::All))),
        Who::Target(target) => {
            if relay.hub.client(target).is_some() {
                Ok((true, None))
            } else if relay.backplane.elsewhere(target) {
                Ok((false, Some(Route::Owner(target.clone()))))
            } else {
                Err(ProtocolError::UnknownTarget(target.to_string()))
            }
        }
    }
}

/// Sends a change to the nodes `route` names and waits until they confirmed it (see the
/// module's "Ordering"). At once on a single node.
pub(crate) async fn spread(
    relay: &Relay,
    route: Option<Route>,
    delivery: impl FnOnce(Option<Ack>) -> Delivery,
) -> Confirmed {
    let Some(route) = route else {
        return Confirmed::default();
    };
    let Some(ack) = relay.backplane.change_id() else {
        return Confirmed::default();
    };
    let only = match &route {
        Route::Owner(target) => crate::backplane::node_of(target),
        _ => None,
    };
    // An admin's: queued in the control lane, never refused.
    if relay
        .backplane
        .publish(relay, route, delivery(Some(ack)), Sender::Admin)
        .is_err()
    {
        return Confirmed::default();
    }
    relay
        .backplane
        .wait_applied(ack, only, CONFIRM_TIMEOUT)
        .await
}

/// The answer: `{"<counted>":N,"nodes":K}`, with `"timeout":[…]` naming the live nodes that
/// did not confirm in time. `N` covers this node and every node that confirmed; `K` counts
/// those nodes.
pub(crate) fn answer_text(counted: &str, here: Option<usize>, confirmed: &Confirmed) -> String {
    let nodes = confirmed.nodes + usize::from(here.is_some());
    let total = here.unwrap_or(0) + confirmed.connections;
    let mut out = format!("{{\"{counted}\":{total},\"nodes\":{nodes}");
    if !confirmed.missing.is_empty() {
        out.push_str(",\"timeout\":[");
        for (i, node) in confirmed.missing.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            crate::protocol::push_json_string(&mut out, node);
        }
        out.push(']');
    }
    out.push('}');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_are_kept_once_and_bounded() {
        let a = intern("maintenance").expect("room");
        let b = intern("maintenance").expect("room");
        assert!(std::ptr::eq(a, b));
        assert_eq!(intern(&"x".repeat(MAX_REASON_LEN + 1)), None);
        for i in 0..MAX_REASONS {
            let _ = intern(&format!("reason {i}"));
        }
        assert_eq!(intern("one too many"), None);
        assert!(
            intern("maintenance").is_some(),
            "a known reason still works"
        );
    }

    #[test]
    fn the_table_is_bounded_per_user() {
        let table = Table::default();
        let user: Arc<str> = Arc::from("ann");
        for i in 0..MAX_NAMES_PER_USER {
            table
                .add(&user, Kind::Role, &format!("r{i}"))
                .expect("room");
        }
        table.add(&user, Kind::Role, "r0").expect("already there");
        assert!(matches!(
            table.add(&user, Kind::Group, "one more"),
            Err(ProtocolError::MembershipFull(_))
        ));
        assert_eq!(table.total(), MAX_NAMES_PER_USER);
        for i in 0..MAX_NAMES_PER_USER {
            table.remove("ann", Kind::Role, &format!("r{i}"));
        }
        assert_eq!(table.total(), 0);
        assert!(table.users.is_empty(), "an empty user is forgotten");
    }
}
