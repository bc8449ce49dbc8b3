//! Issue 10 item 5 / review finding 11: a wrong admin password is logged at WARN, but a
//! peer can send thousands a second once the right password is known (each then costs no
//! bcrypt), so those lines are rate-limited (`warn_throttled!`). The whole server log of
//! this test binary is captured.

mod common;

use common::*;

/// 40 wrong passwords over WebSocket and 40 over the HTTP API, after the backend logged in:
/// each is refused, and each call site writes one line (with the count it left out), not 40.
#[tokio::test]
async fn wrong_passwords_log_throttled_warnings() {
    const ATTEMPTS: usize = 40;
    let capture = LogCapture::install("jssocket=warn");

    let server = Server::start().await;
    let _backend = server.backend("backend").await;
    for i in 0..ATTEMPTS {
        let mut conn = Conn::connect(&server.url(), Some("wrong"), &format!("ws{i}")).await;
        conn.send_text(r#"{"type":"server_connect","data":{}}"#)
            .await;
        conn.expect_text(r#"{"type":"server_connect","data":false}"#)
            .await;
        assert_eq!(conn.expect_close_code(1008).await, "not an admin");
        let response = http(
            server.addr,
            "POST",
            "/api/notify_all",
            &[("Authorization", "Bearer wrong")],
            b"{}",
        )
        .await;
        assert_eq!(response.status, 401);
    }
    let scrape = scrape(server.addr).await;
    assert_eq!(
        scrape.value("jssocket_auth_failures_total", &[]),
        (2 * ATTEMPTS) as f64
    );
    assert_eq!(capture.lines_with("admin authentication failed"), 1);
    assert_eq!(capture.lines_with("HTTP: wrong admin password"), 1);
}
