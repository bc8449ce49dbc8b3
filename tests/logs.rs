//! Issue 10 item 9: strings a peer controls (an event type, an error's subject) are written to
//! the text log escaped, so a peer cannot forge log lines or send terminal escapes to whoever
//! reads the log. The whole server log of this test binary is captured at debug level.

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex};

use common::Server;
use tracing_subscriber::EnvFilter;

/// The log as written, shared with the subscriber.
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .map_err(|_| std::io::Error::other("poisoned"))?
            .extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Capture {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().expect("log lock")).into_owned()
    }
}

#[tokio::test]
async fn peer_controlled_strings_are_escaped_in_text_logs() {
    let capture = Capture::default();
    let writer = capture.clone();
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::new("jssocket=debug"))
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .init();

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
