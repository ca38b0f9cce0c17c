//! The web page at `/`: the single-page app built from `web/` (Vite + TypeScript + Preact) into
//! `web/dist/`, embedded in the binary at compile time (rust-embed), so that `essayflow serve`
//! needs neither Node nor any file at run time.
//!
//! - `GET /` (and `HEAD`) answers `index.html` with `Cache-Control: no-cache` (revalidated with
//!   its `ETag`, so a new release is picked up at once);
//! - `GET /assets/{file}` answers the hashed bundles with `Cache-Control: public,
//!   max-age=31536000, immutable` (their names change with their content);
//! - both carry a strong `ETag` (the SHA-256 of the bytes) and answer `If-None-Match` with 304
//!   (RFC 9110 section 13.1.2); the edge compresses them (br, zstd, gzip) like every answer;
//! - the page's `Content-Security-Policy` ([`PAGE_CSP`]) lets it load only its own scripts and
//!   styles and talk only to its own origin (HTTP and WebSocket).
//!
//! Routing inside the page uses the URL fragment (`#/batches/<id>`), so the server has no route
//! per view. The page is exempt from the database breaker (it loads while the database is down,
//! and says so when its API calls are refused).

use axum::Router;
use axum::extract::Path;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use rust_embed::RustEmbed;
use tower_http::set_header::SetResponseHeaderLayer;

use crate::error::ApiError;
use crate::state::AppState;

/// The built page (`web/dist`, committed; `scripts/test.sh` checks it equals a fresh build).
#[derive(RustEmbed)]
#[folder = "../web/dist/"]
struct Page;

/// The page's content security policy: scripts, styles and images from its own origin only (no
/// inline script or style), API calls and the WebSocket to its own origin only (`'self'`
/// covers `ws:`/`wss:` of the same host in CSP Level 3), never framed.
pub const PAGE_CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     img-src 'self' data:; connect-src 'self'; font-src 'self'; manifest-src 'self'; \
     base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// Whether `path` is one of the page's (exempt from the database breaker).
pub fn is_page_path(path: &str) -> bool {
    path == "/" || path.starts_with("/assets/")
}

/// Answers the embedded file `name` (a path inside `web/dist`), or 404 `no-route`.
fn answer(name: &str, headers: &HeaderMap, cache: &'static str) -> Response {
    let Some(file) = Page::get(name) else {
        return ApiError::NoRoute.into_response();
    };
    let etag = format!("\"{}\"", hex(&file.metadata.sha256_hash()[..16]));
    let fresh = crate::edge::none_match(headers, &etag);
    let etag = HeaderValue::from_str(&etag).unwrap_or(HeaderValue::from_static("\"0\""));
    let cache = (header::CACHE_CONTROL, HeaderValue::from_static(cache));
    if fresh {
        return (StatusCode::NOT_MODIFIED, [(header::ETAG, etag), cache]).into_response();
    }
    let mime = file.metadata.mimetype();
    let mime = if mime.starts_with("text/") && !mime.contains("charset") {
        HeaderValue::from_str(&format!("{mime}; charset=utf-8"))
    } else {
        HeaderValue::from_str(mime)
    }
    .unwrap_or(HeaderValue::from_static("application/octet-stream"));
    (
        [(header::CONTENT_TYPE, mime), (header::ETAG, etag), cache],
        file.data,
    )
        .into_response()
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

async fn index(headers: HeaderMap) -> Response {
    answer("index.html", &headers, "no-cache")
}

async fn asset(Path(file): Path<String>, headers: HeaderMap) -> Response {
    answer(
        &format!("assets/{file}"),
        &headers,
        "public, max-age=31536000, immutable",
    )
}

/// `/` and `/assets/{file}`, with [`PAGE_CSP`].
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/", get(index))
        .route("/assets/{*file}", get(asset))
        .layer(SetResponseHeaderLayer::overriding(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(PAGE_CSP),
        ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_is_embedded_with_its_hashed_assets() {
        let index = Page::get("index.html").expect("web/dist/index.html is embedded");
        let html = std::str::from_utf8(&index.data).expect("utf-8");
        let assets: Vec<_> = Page::iter().filter(|f| f.starts_with("assets/")).collect();
        assert!(!assets.is_empty(), "web/dist/assets is embedded");
        for asset in &assets {
            if asset.ends_with(".js") || asset.ends_with(".css") {
                assert!(
                    html.contains(&format!("/{asset}")),
                    "index.html loads {asset}"
                );
            }
        }
        assert!(
            !html.contains("<script>") && !html.contains("<style"),
            "no inline script or style (the CSP forbids them)"
        );
    }

    #[test]
    fn page_paths() {
        assert!(is_page_path("/"));
        assert!(is_page_path("/assets/index-abc.js"));
        assert!(!is_page_path("/v1/batches"));
        assert!(!is_page_path("/assetsx"));
    }
}
