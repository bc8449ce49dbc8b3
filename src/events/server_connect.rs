//! `server_connect`: an admin joins the server pool and starts receiving client connects.
//! Anyone else is answered `false` and closed with 1008: reason "not an admin", or
//! "authentication busy, retry" when the password could not be verified for load.

use serde::Deserialize;
use serde_json::value::RawValue;

use crate::kinds::Frame;
use crate::peer::Close;
use crate::protocol::{Data, ProtocolError, event_frame, opt_string};
use crate::session::{Flow, Session};

#[derive(Debug)]
pub struct ServerConnect {
    /// The old protocol's way to authenticate: `{"auth": "<password>"}` in `data`.
    password: Option<String>,
}

#[derive(Deserialize, Default)]
struct Fields<'a> {
    #[serde(borrow, default)]
    auth: Option<&'a RawValue>,
}

impl ServerConnect {
    pub fn parse(data: Data<'_>) -> Result<ServerConnect, ProtocolError> {
        let fields: Fields = data.fields()?;
        Ok(ServerConnect {
            password: opt_string(fields.auth, "auth")?,
        })
    }

    pub async fn apply(self, session: &mut Session) -> Result<Flow, ProtocolError> {
        if let Some(password) = &self.password {
            // Boxed: bcrypt's future is large and rare; it must not size every connection.
            Box::pin(session.check_password(password)).await;
        }
        if !session.admin {
            session.send_counted(Frame::ServerConnect, event_frame("server_connect", "false"));
            let close = if session.auth_busy {
                Close::AUTH_BUSY
            } else {
                Close::NOT_ADMIN
            };
            return Ok(Flow::Close(close));
        }
        // The answer first, then the client connects that waited for a server.
        session.send_counted(Frame::ServerConnect, event_frame("server_connect", "true"));
        // Joining twice would double this server's round-robin share.
        if !session.in_pool {
            session.in_pool = session.shared.hub.pool.join(&session.peer);
            session.shared.servers_changed();
        }
        Ok(Flow::Continue)
    }
}
