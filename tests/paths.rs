//! SPEC §2: WebSocket upgrades are accepted on any path, the HTTP routes' paths included,
//! while plain requests to those paths keep their HTTP meaning.

mod common;

use common::{Conn, Server, http};

#[tokio::test]
async fn upgrades_work_on_every_path_including_the_http_routes() {
    let server = Server::start().await;
    let base = format!("ws://{}", server.addr);
    for path in [
        "/",
        "/ws",
        "/deep/path?x=1",
        "/healthz",
        "/metrics",
        "/console",
        "/api/publish",
    ] {
        let mut client = Conn::connect(&format!("{base}{path}"), None, path).await;
        client
            .send_text(r#"{"type":"client_connect","data":{}}"#)
            .await;
        // A registered client is served: an unknown type is ignored and a bad message
        // answered, on this path like on any other.
        client.send_text("not json").await;
        client.expect_error("invalid_json", None).await;
        client.close().await;
    }
    let health = http(server.addr, "GET", "/healthz", &[], b"").await;
    assert_eq!(health.status, 200);
    assert_eq!(health.text(), "OK\n");
}
