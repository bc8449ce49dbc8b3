//! Issue 10 item 9: strings a peer controls (an event type, an error's subject) are written to
//! the text log escaped, so a peer cannot forge log lines or send terminal escapes to whoever
//! reads the log. The whole server log of this test binary is captured at debug level.

mod common;

use common::{LogCapture, Server};

#[tokio::test]
async fn peer_controlled_strings_are_escaped_in_text_logs() {
    let capture = LogCapture::install("jssocket=debug");

    let server = Server::start().await;
    let mut client = server.admin("peer").await;
    // An unknown type carrying a forged log line and a terminal escape.
    client
        .send_text(
            r#"{"type":"x\n2000-01-01T00:00:00Z  INFO jssocket: FORGED\u001b[31m","data":{}}"#,
        )
        .await;
    // A rejected event: its error is logged too.
    client
        .send_text(r#"{"type":"publish","data":{"name":"c\nFORGED"}}"#)
        .await;
    client
        .expect_error("invalid_channel", Some("publish"))
        .await;
    // The unknown type was ignored; the connection is still served.
    client.ping(1, false).await;

    let log = capture.text();
    assert!(
        log.contains(r#"x\n2000-01-01T00:00:00Z  INFO jssocket: FORGED\u{1b}[31m"#),
        "the unknown type is logged, escaped:\n{log}"
    );
    assert!(
        !log.lines().any(|line| line.starts_with("2000-01-01")),
        "a peer forged a log line:\n{log}"
    );
    assert!(
        !log.contains('\u{1b}'),
        "a raw escape reached the log:\n{log}"
    );
}
