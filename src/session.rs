//! What one connection's task knows about itself while it handles its events: whether it
//! is an admin, whether it joined the server pool, and the per-connection limits on what it
//! may send (bad input, `client_connect`s, error replies it does not read). Events read and
//! change it through [`Session`]; [`Flow`] tells the connection whether to go on.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_tungstenite::tungstenite::Utf8Bytes;
use tracing::debug;

use crate::auth::Verdict;
use crate::config::ClientSend;
use crate::delivery::Sender;
use crate::jwt::Identity;
use crate::kinds::{Event, Frame};
use crate::peer::{Close, Peer};
use crate::protocol::{ProtocolError, compact, event_frame, is_falsy};
use crate::relay::Relay;
use crate::warn_throttled;

/// What the connection does after an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    Continue,
    /// Close the connection (after writing what is already queued for it).
    Close(Close),
}

/// `client_connect`s (first one and re-authentications) one connection may send per window.
const MAX_CONNECTS_PER_WINDOW: u32 = 20;

/// A non-admin whose outbound queue holds more than this of error replies when it provokes
/// another is not reading its replies, and is closed: far sooner than its queue would
/// overflow (4 MiB by default), so a crowd of such peers cannot pin memory with answers
/// nobody reads. Only error replies count: a busy subscriber with normal traffic queued is
/// not closed for its first mistake.
const UNREAD_REPLIES: usize = 64 * 1024;

/// Window over which bad input is counted for `--bad-input-limit`.
const BAD_INPUT_WINDOW: Duration = Duration::from_secs(60);

/// What one connection's task knows about itself while it handles its events.
pub struct Session {
    pub peer: Arc<Peer>,
    pub shared: Arc<Relay>,
    pub addr: SocketAddr,
    /// The connection presented the admin password.
    pub admin: bool,
    /// bcrypt already ran for this connection; it runs at most once.
    password_checked: bool,
    /// The password was not judged because too many verifications were waiting: the
    /// connection is closed with [`Close::AUTH_BUSY`] so the peer knows to retry.
    pub auth_busy: bool,
    /// Joined the server pool with `server_connect`.
    pub in_pool: bool,
    /// Bad messages in the current window, and when the window started.
    bad_input: Window,
    /// `client_connect`s in the current window: each is copied to a server, so one client
    /// must not be able to flood the backends with them.
    connects: Window,
    /// Calls (`invoke`) started in the current minute.
    pub(crate) invokes: crate::invoke::RateWindow,
    /// Who the connection's token says it is (SPEC §11): the upgrade's, replaced by each
    /// valid JWT in `client_connect`. `None` without one, or without a JWT key configured.
    /// Boxed: most connections have none, and every idle connection's task carries this.
    pub(crate) identity: Option<Box<Identity>>,
    /// When that token expires: the reader closes the connection then with
    /// [`Close::TOKEN_EXPIRED`]. A newer token sent in `client_connect` moves it.
    token_deadline: Option<tokio::time::Instant>,
}

impl Session {
    pub fn new(peer: Arc<Peer>, shared: Arc<Relay>, addr: SocketAddr) -> Session {
        Session {
            peer,
            shared,
            addr,
            admin: false,
            password_checked: false,
            auth_busy: false,
            in_pool: false,
            bad_input: Window::new(),
            connects: Window::new(),
            invokes: crate::invoke::RateWindow::default(),
            identity: None,
            token_deadline: None,
        }
    }

    /// Remembers the identity a valid token proved, and when the token expires.
    pub(crate) fn remember_token(&mut self, identity: Identity) {
        self.token_deadline = identity
            .expires_in()
            .map(|left| tokio::time::Instant::now() + left);
        self.identity = Some(Box::new(identity));
    }

    /// When the connection's token expires (see [`Session::remember_token`]).
    pub(crate) fn token_deadline(&self) -> Option<tokio::time::Instant> {
        self.token_deadline
    }

    /// Counts a `client_connect` against [`MAX_CONNECTS_PER_WINDOW`].
    pub(crate) fn count_connect(&mut self) -> Result<(), ProtocolError> {
        if self.connects.hit() > MAX_CONNECTS_PER_WINDOW {
            return Err(ProtocolError::RateLimited(
                "client_connect: at most 20 a minute per connection",
            ));
        }
        Ok(())
    }

    /// Verifies an admin password, at most once per connection. Waits in the authenticator's
    /// fair queue when bcrypt must run; refused as busy (the connection is then closed with
    /// [`Close::AUTH_BUSY`]) when that queue is full.
    pub async fn check_password(&mut self, password: &str) {
        if self.password_checked || self.admin {
            return;
        }
        self.password_checked = true;
        match self.shared.auth.verify(password, self.addr.ip()).await {
            Verdict::Admin => {
                debug!("admin authenticated");
                self.admin = true;
                self.peer.set_admin();
                self.shared.metrics.admins.inc();
            }
            // Both lines can be had at will (wrong passwords cost nothing once one is known):
            // throttled.
            Verdict::Busy => {
                warn_throttled!(
                    conn_id = %self.peer.target,
                    addr = %self.addr,
                    "admin authentication busy: too many verifications waiting"
                );
                self.auth_busy = true;
                self.peer.close(Close::AUTH_BUSY);
            }
            verdict @ Verdict::WrongPassword => {
                self.shared.metrics.auth_failures.inc();
                warn_throttled!(
                    conn_id = %self.peer.target,
                    addr = %self.addr,
                    ?verdict,
                    "admin authentication failed"
                )
            }
        }
    }

    /// Who this connection is to the other nodes: a client's deliveries wait in the client
    /// lane and may be refused when the cluster is busy.
    pub(crate) fn sender(&self) -> Sender<'_> {
        if self.admin {
            Sender::Admin
        } else {
            Sender::Client(&self.peer)
        }
    }

    /// Queues a reply of kind `kind` for this connection, counting it.
    pub fn send_counted(&self, kind: Frame, frame: Utf8Bytes) {
        self.shared.metrics.sent(kind, 1, frame.len());
        self.peer.send(frame);
    }

    /// May this connection send `notify_client` / `notify_group`?
    pub(crate) fn may_notify(&self, event: Event) -> Result<(), ProtocolError> {
        if self.admin || self.peer.is_acknowledged() {
            return Ok(());
        }
        Err(ProtocolError::Forbidden(match event {
            Event::NotifyGroup => "notify_group needs an admin or an acknowledged client",
            _ => "notify_client needs an admin or an acknowledged client",
        }))
    }

    /// The `--client-send` policy for a client notifying `target_is_own`.
    pub(crate) fn policy_allows(&self, own: bool) -> Result<(), ProtocolError> {
        if self.admin {
            return Ok(());
        }
        match self.shared.config.client_send {
            ClientSend::Any => Ok(()),
            ClientSend::Own if own => Ok(()),
            ClientSend::Own => Err(ProtocolError::PolicyDenied(
                "clients may only notify themselves and their own group (--client-send own)",
            )),
            ClientSend::None => Err(ProtocolError::PolicyDenied(
                "only admins may notify (--client-send none)",
            )),
        }
    }

    /// Acks `callback` to the sender when it is truthy (also when nothing was delivered).
    pub(crate) fn ack_callback(&self, callback: Option<&serde_json::value::RawValue>) {
        if let Some(callback) = callback.filter(|c| !is_falsy(c)) {
            self.send_counted(
                Frame::Callback,
                event_frame("callback", &compact(callback.get())),
            );
        }
    }

    /// Answers bad input with an error event and closes a peer that keeps sending it.
    ///
    /// Every error a non-admin provokes counts toward `--bad-input-limit`, refusals
    /// (`forbidden`, `rate_limited`, `policy_denied`, ...) included: each costs a reply, and a
    /// peer that never reads them would otherwise pin memory with them. An admin's refusals
    /// describe the world (a client that just left, no server yet), not abuse, so for an admin
    /// only malformed input counts. A non-admin whose queue already holds more than
    /// [`UNREAD_REPLIES`] of error replies is not reading them: it is closed instead of being
    /// answered again.
    pub(crate) fn reject(&mut self, error: &ProtocolError, event: Option<&str>) -> Flow {
        self.reject_with(error, event, || error.to_frame(event), Frame::Error)
    }

    /// [`Session::reject`] with the reply `frame` makes, sent as `kind`: a refused `invoke` is
    /// answered with an `invoke_result` carrying the error, so its caller can match it to the
    /// call, and a SignalR connection with a completion error. The same counting, limits and
    /// closes.
    pub(crate) fn reject_with(
        &mut self,
        error: &ProtocolError,
        event: Option<&str>,
        frame: impl FnOnce() -> Utf8Bytes,
        kind: Frame,
    ) -> Flow {
        // `?`: Debug formatting escapes control characters, so nothing a peer sends can
        // forge a log line or a terminal escape.
        debug!(code = %error.code(), event = ?event, reason = ?error.to_string(), "rejected");
        self.shared.metrics.error(error.code());
        if !self.admin && self.peer.outbox.unread_errors() > UNREAD_REPLIES {
            return Flow::Close(Close::NOT_READING);
        }
        let frame = frame();
        self.shared.metrics.sent(kind, 1, frame.len());
        self.peer.send_error(frame);
        // Load that others caused (a full cluster lane) is not this peer's bad input.
        if error.is_load() {
            return Flow::Continue;
        }
        if self.admin && !error.is_bad_input() {
            return Flow::Continue;
        }
        if self.bad_input.hit() > self.shared.config.bad_input_limit {
            return Flow::Close(Close::BAD_INPUT);
        }
        Flow::Continue
    }
}

/// Counts events in fixed windows of [`BAD_INPUT_WINDOW`].
struct Window {
    count: u32,
    since: Instant,
}

impl Window {
    fn new() -> Window {
        Window {
            count: 0,
            since: Instant::now(),
        }
    }

    /// Counts one event; returns how many the current window has seen, this one included.
    fn hit(&mut self) -> u32 {
        if self.since.elapsed() >= BAD_INPUT_WINDOW {
            self.count = 0;
            self.since = Instant::now();
        }
        self.count += 1;
        self.count
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        if self.admin {
            self.shared.metrics.admins.dec();
        }
    }
}
