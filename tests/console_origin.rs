//! Issue 15: the web console with `--allowed-origins`. The console page is served by the
//! server itself, so its WebSocket's Origin is the server's own; that upgrade is accepted
//! even when the list names only other sites (server.rs `origin_allowed`), while other
//! origins are still refused 403 and logged at warn, at most one line per 10 s however many
//! arrive. The log capture is per process, so this binary holds one test.

mod common;

use std::time::Duration;

use common::{LogCapture, Server};
use tokio::time::timeout;
use tokio_tungstenite::connect_async;
use tokio_tungstenite::tungstenite::Error as WsError;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::client::Request;
use tokio_tungstenite::tungstenite::http::HeaderValue;

const DEADLINE: Duration = Duration::from_secs(10);
/// What the refusal's log line says (server.rs `origin_allowed`; upgrades and SignalR negotiate).
const REFUSED: &str = "refused (403): Origin is not in --allowed-origins";

/// An upgrade of `/ws` on `server` with `Origin: origin` and, when given, this `Host`
/// (else the URL's, as a browser sends it).
fn request(server: &Server, origin: &str, host: Option<&str>) -> Request {
    let mut request = server.url().into_client_request().expect("ws url");
    let headers = request.headers_mut();
    headers.insert("origin", HeaderValue::from_str(origin).expect("origin"));
    if let Some(host) = host {
        headers.insert("host", HeaderValue::from_str(host).expect("host"));
    }
    request
}

/// The status the server answered the upgrade with (101 when accepted).
async fn upgrade(server: &Server, origin: &str, host: Option<&str>) -> u16 {
    match timeout(DEADLINE, connect_async(request(server, origin, host)))
        .await
        .unwrap_or_else(|_| panic!("no answer to the upgrade with Origin {origin} in time"))
    {
        Ok((mut ws, response)) => {
            let _ = ws.close(None).await;
            response.status().as_u16()
        }
        Err(WsError::Http(response)) => response.status().as_u16(),
        Err(e) => panic!("upgrade with Origin {origin} failed without an HTTP answer: {e}"),
    }
}

#[tokio::test]
async fn same_origin_is_accepted_and_refused_origins_are_logged_throttled() {
    let capture = LogCapture::install("jssocket=warn");
    let server = Server::with_args(&["--allowed-origins", "https://app.example"]).await;
    let own = format!("http://{}", server.addr);

    // The console's own page: Origin is this server, as its Host header says.
    assert_eq!(upgrade(&server, &own, None).await, 101, "Origin {own}");
    assert_eq!(upgrade(&server, &format!("{own}/"), None).await, 101);
    // Behind a proxy or TLS terminator, the names the browser used, with or without the
    // scheme's default port.
    for (origin, host) in [
        ("https://relay.example", "relay.example"),
        ("https://relay.example:443", "relay.example"),
        ("http://Relay.Example:8080", "relay.example:8080"),
    ] {
        assert_eq!(upgrade(&server, origin, Some(host)).await, 101, "{origin}");
    }
    // The listed origin, as before.
    assert_eq!(upgrade(&server, "https://app.example", None).await, 101);
    assert_eq!(capture.lines_with(REFUSED), 0, "{}", capture.text());

    // Look-alikes of our own origin are not our origin.
    let addr = server.addr.to_string();
    for origin in [
        "https://other.example".to_string(),
        format!("ws://{addr}"),
        format!("http://{addr}.evil.example"),
        format!("http://evil@{addr}"),
        format!("http://{}:1", server.addr.ip()),
        "null".to_string(),
        format!("http://{addr}/path"),
    ] {
        assert_eq!(
            upgrade(&server, &origin, None).await,
            403,
            "Origin {origin}"
        );
    }
    let log = capture.text();
    assert_eq!(
        capture.lines_with(REFUSED),
        1,
        "the first refusal is logged, the next ones within 10 s are counted:\n{log}"
    );
    assert!(
        log.contains(r#"origin="https://other.example""#) && log.contains("WARN"),
        "the line names the refused Origin at warn:\n{log}"
    );

    // A flood of refused origins (each different) still yields that one line.
    for i in 0..300 {
        let origin = format!("https://flood-{i}.example");
        assert_eq!(upgrade(&server, &origin, None).await, 403);
    }
    assert_eq!(
        capture.lines_with(REFUSED),
        1,
        "a flood of refused origins wrote more than one line in 10 s:\n{}",
        capture.text()
    );
    // The server still serves its own page's upgrades.
    assert_eq!(upgrade(&server, &own, None).await, 101);
}
