//! `client_disconnect`: the sender leaves; it is removed from everything and closed with 1000.

use crate::peer::Close;
use crate::session::Flow;

pub fn apply() -> Flow {
    Flow::Close(Close::NORMAL)
}
