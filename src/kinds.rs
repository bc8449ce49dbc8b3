//! Every event type, outbound frame kind and error code, each listed once. The dispatcher
//! matches on [`Event`], errors carry a [`Code`], and the metrics' labels are these lists: a
//! new one is counted under its own name the moment it is added, never silently as `other`.

/// Declares a fieldless enum whose variants have wire names, with `ALL` (every variant in
/// order), `name()` and `from_name()`.
macro_rules! named {
    ($(#[$meta:meta])* $vis:vis enum $name:ident { $($(#[$vmeta:meta])* $variant:ident = $text:literal,)+ }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        $vis enum $name {
            $($(#[$vmeta])* $variant,)+
        }

        impl $name {
            /// Every variant, in declaration order (the order of metric label indexes).
            pub const ALL: &'static [$name] = &[$($name::$variant,)+];

            /// The name on the wire and in metric labels.
            pub const fn name(self) -> &'static str {
                match self {
                    $($name::$variant => $text,)+
                }
            }

            pub fn from_name(text: &str) -> Option<$name> {
                match text {
                    $($text => Some($name::$variant),)+
                    _ => None,
                }
            }

            /// Position in [`Self::ALL`].
            pub const fn index(self) -> usize {
                self as usize
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.name())
            }
        }
    };
}

named! {
    /// The `type`s a connection may send (SPEC §5). Anything else is ignored and counted as
    /// `other`.
    pub enum Event {
        ServerConnect = "server_connect",
        ClientConnect = "client_connect",
        ClientConnected = "client_connected",
        ClientDisconnect = "client_disconnect",
        NotifyClient = "notify_client",
        NotifyGroup = "notify_group",
        NotifyAll = "notify_all",
        Subscribe = "subscribe",
        Unsubscribe = "unsubscribe",
        Publish = "publish",
        Invoke = "invoke",
        InvokeResult = "invoke_result",
        Info = "info",
        Users = "users",
        Connections = "connections",
        Channels = "channels",
        Membership = "membership",
        Disconnect = "disconnect",
        History = "history",
    }
}

impl Event {
    /// Admin events answered to their sender as `{"type":<same>,"data":<result>}` (SPEC §12),
    /// over a WebSocket or the HTTP API (`GET`/`POST /api/<name>`).
    pub fn is_answered(self) -> bool {
        matches!(
            self,
            Event::Info
                | Event::Users
                | Event::Connections
                | Event::Channels
                | Event::Membership
                | Event::Disconnect
                | Event::History
        )
    }

    /// Events that deliver to others (their time to fan out is measured).
    pub fn fans_out(self) -> bool {
        matches!(
            self,
            Event::NotifyClient | Event::NotifyGroup | Event::NotifyAll | Event::Publish
        )
    }
}

named! {
    /// Kinds of frame queued to connections, for `messages_sent_total{type}`.
    pub enum Frame {
        ServerConnect = "server_connect",
        ClientConnect = "client_connect",
        ClientConnected = "client_connected",
        NotifyClient = "notify_client",
        NotifyGroup = "notify_group",
        NotifyAll = "notify_all",
        Publish = "publish",
        Subscribed = "subscribed",
        Unsubscribed = "unsubscribed",
        Callback = "callback",
        Error = "error",
        Invoke = "invoke",
        InvokeResult = "invoke_result",
        Info = "info",
        Users = "users",
        Connections = "connections",
        Channels = "channels",
        Membership = "membership",
        Disconnect = "disconnect",
        History = "history",
    }
}

named! {
    /// The `code` of an error event (SPEC §6), and the label of `errors_total{code}`.
    pub enum Code {
        InvalidJson = "invalid_json",
        NotAnObject = "not_an_object",
        MissingType = "missing_type",
        InvalidType = "invalid_type",
        InvalidData = "invalid_data",
        MissingField = "missing_field",
        InvalidField = "invalid_field",
        Forbidden = "forbidden",
        PolicyDenied = "policy_denied",
        UnknownTarget = "unknown_target",
        NoServer = "no_server",
        InvalidChannel = "invalid_channel",
        TooManySubscriptions = "too_many_subscriptions",
        ConflictingFilters = "conflicting_filters",
        Unauthorized = "unauthorized",
        RateLimited = "rate_limited",
        InvalidToken = "invalid_token",
        UnknownMethod = "unknown_method",
        /// An `invoke` no server answered within `--invoke-timeout` (its `invoke_result`).
        Timeout = "timeout",
        MembershipFull = "membership_full",
    }
}

named! {
    /// SignalR hub messages (HubProtocol.md's `type`s) received from and sent to SignalR
    /// connections, for `signalr_messages_received_total{type}` and
    /// `signalr_messages_sent_total{type}`. jssocket's own counters (`messages_sent_total`
    /// and the rest) count SignalR recipients too, under the jssocket kind they were sent as.
    pub enum HubKind {
        Invocation = "invocation",
        Completion = "completion",
        Ping = "ping",
        Close = "close",
        /// Any other type (stream items, cancellations, acks...), ignored by the relay.
        Other = "other",
    }
}

impl HubKind {
    /// The kind of a message the relay wrote (`{"type":N,...}`): every one it writes starts
    /// with its type, so its first bytes say which.
    pub fn of_sent(frame: &str) -> HubKind {
        match frame.as_bytes().get(..9) {
            Some(b"{\"type\":1") => HubKind::Invocation,
            Some(b"{\"type\":3") => HubKind::Completion,
            Some(b"{\"type\":6") => HubKind::Ping,
            Some(b"{\"type\":7") => HubKind::Close,
            _ => HubKind::Other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_indexes_follow_the_lists() {
        for (i, event) in Event::ALL.iter().enumerate() {
            assert_eq!(Event::from_name(event.name()), Some(*event));
            assert_eq!(event.index(), i);
        }
        for (i, code) in Code::ALL.iter().enumerate() {
            assert_eq!(Code::from_name(code.name()), Some(*code));
            assert_eq!(code.index(), i);
        }
        for (i, frame) in Frame::ALL.iter().enumerate() {
            assert_eq!(Frame::from_name(frame.name()), Some(*frame));
            assert_eq!(frame.index(), i);
        }
        assert_eq!(Event::from_name("nope"), None);
        assert_eq!(
            HubKind::of_sent("{\"type\":1,\"target\":\"x\"}"),
            HubKind::Invocation
        );
        assert_eq!(
            HubKind::of_sent("{\"type\":3,\"invocationId\":\"1\"}"),
            HubKind::Completion
        );
        assert_eq!(HubKind::of_sent("{\"type\":6}\u{1e}"), HubKind::Ping);
        assert_eq!(HubKind::of_sent("{\"type\":7}\u{1e}"), HubKind::Close);
        assert_eq!(HubKind::of_sent("{}"), HubKind::Other);
    }
}
