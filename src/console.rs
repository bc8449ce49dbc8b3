//! The built-in web console at `GET /console` (`--console on`, the default): a page that joins
//! this server's own WebSocket as a client (register, subscribe, watch what arrives, notifies
//! labelled by their event: `?labels=1`, see [`crate::peer::Wire::Labelled`]), sends
//! `publish` / `notify_*` / `disconnect` through the HTTP API with the admin password, and
//! shows the server's state and its users and connections (`/api/info`, `/api/users`,
//! `/api/connections`, `/metrics`), from which a target is picked for those forms.
//!
//! The page is three static files under `src/console/` and jssocket-client's browser bundle
//! (`clients/js/dist/`, committed built), embedded in the binary: no build step,
//! nothing fetched from elsewhere. Every answer carries a `Content-Security-Policy` that only
//! allows this origin (and its WebSocket), so a payload shown on the page can never run as
//! code or load anything. With `--console off` the paths answer 404.

use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use crate::relay::Relay;

const INDEX_HTML: &str = include_str!("console/index.html");
const CONSOLE_JS: &str = include_str!("console/console.js");
const CONSOLE_CSS: &str = include_str!("console/console.css");
/// jssocket-client's browser bundle (clients/js, committed built), which the page connects
/// with: served from this origin like the rest, so the policy needs no other source.
const CLIENT_JS: &str = include_str!("../clients/js/dist/jssocket-client.js");

/// Only this origin: scripts, styles and the WebSocket (`ws:`/`wss:` spelled out for browsers
/// whose `'self'` does not cover WebSocket schemes). `data:` images for the empty favicon.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; connect-src 'self' ws: wss:; \
     img-src 'self' data:; object-src 'none'; base-uri 'none'; form-action 'none'; \
     frame-ancestors 'none'";

/// The console's routes: `/console` (and `/console/`) for the page, `/console/{file}` for its
/// script and style sheet.
pub fn router() -> Router<Arc<Relay>> {
    Router::new()
        .route("/console", get(index))
        .route("/console/", get(index))
        .route("/console/{file}", get(asset))
}

async fn index(State(shared): State<Arc<Relay>>) -> Response {
    serve(&shared, "index.html")
}

async fn asset(State(shared): State<Arc<Relay>>, Path(file): Path<String>) -> Response {
    serve(&shared, &file)
}

fn serve(shared: &Relay, file: &str) -> Response {
    if !shared.config.console {
        return not_found("404 Not Found: the web console is off (--console off)\n");
    }
    let (content_type, body) = match file {
        "index.html" => ("text/html; charset=utf-8", INDEX_HTML),
        "console.js" => ("text/javascript; charset=utf-8", CONSOLE_JS),
        "console.css" => ("text/css; charset=utf-8", CONSOLE_CSS),
        "jssocket-client.js" => ("text/javascript; charset=utf-8", CLIENT_JS),
        _ => return not_found("404 Not Found: the console has no such file\n"),
    };
    (
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, content_type),
            (header::CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
            (header::X_FRAME_OPTIONS, "DENY"),
            // Small files: always revalidate, so a new binary's page is used at once.
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

fn not_found(message: &'static str) -> Response {
    (
        StatusCode::NOT_FOUND,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        message,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use axum::body::{Body, to_bytes};
    use axum::http::Request;
    use tower::ServiceExt;

    async fn get(console: bool, path: &str) -> Response {
        let config = Config {
            console,
            ..Config::default()
        };
        let app = router().with_state(Arc::new(Relay::new(config)));
        let request = Request::get(path).body(Body::empty()).unwrap();
        app.oneshot(request).await.unwrap()
    }

    fn header(response: &Response, name: header::HeaderName) -> &str {
        response.headers()[name].to_str().unwrap()
    }

    #[tokio::test]
    async fn serves_each_file_with_its_type_and_the_policy() {
        for (path, content_type) in [
            ("/console", "text/html; charset=utf-8"),
            ("/console/", "text/html; charset=utf-8"),
            ("/console/console.js", "text/javascript; charset=utf-8"),
            ("/console/console.css", "text/css; charset=utf-8"),
            (
                "/console/jssocket-client.js",
                "text/javascript; charset=utf-8",
            ),
        ] {
            let response = get(true, path).await;
            assert_eq!(response.status(), StatusCode::OK, "{path}");
            assert_eq!(
                header(&response, header::CONTENT_TYPE),
                content_type,
                "{path}"
            );
            let csp = header(&response, header::CONTENT_SECURITY_POLICY);
            assert!(csp.starts_with("default-src 'self'; connect-src 'self' ws: wss:"));
            let body = to_bytes(response.into_body(), usize::MAX).await.unwrap();
            assert!(!body.is_empty(), "{path}");
        }
    }

    #[tokio::test]
    async fn unknown_files_and_a_disabled_console_are_404() {
        assert_eq!(
            get(true, "/console/secret.txt").await.status(),
            StatusCode::NOT_FOUND
        );
        for path in ["/console", "/console/", "/console/console.js"] {
            assert_eq!(
                get(false, path).await.status(),
                StatusCode::NOT_FOUND,
                "{path}"
            );
        }
    }

    #[test]
    fn the_page_loads_nothing_inline_or_from_elsewhere() {
        // The policy would block inline code and other origins; the page must not need them.
        assert!(!INDEX_HTML.contains("<script>"));
        assert!(!INDEX_HTML.contains("style="));
        let handler = |word: &str| word.starts_with("on") && word.contains('=');
        assert!(
            !INDEX_HTML.split_whitespace().any(handler),
            "no inline event handlers"
        );
        for text in [INDEX_HTML, CONSOLE_JS, CONSOLE_CSS] {
            assert!(!text.contains("http://") && !text.contains("https://"));
        }
        assert!(!CONSOLE_JS.contains("localStorage") && !CONSOLE_JS.contains("document.cookie"));
    }
}
