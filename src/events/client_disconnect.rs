//! `client_disconnect`: the sender leaves; it is removed from everything and closed with 1000.

use super::Flow;
use crate::peer::Close;

pub fn apply() -> Flow {
    Flow::Close(Close::NORMAL)
}
