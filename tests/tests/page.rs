//! The web page at `/` (api/src/routes/page.rs, built from web/) as HTTP serves it: embedded,
//! with its content security policy, validators and caching, compressed; and the pipeline
//! catalog it offers (`GET /v1/pipelines`). What it does in a browser is tested by
//! web/tests/browser.test.ts (scripts/test.sh).
#![allow(clippy::unwrap_used)]

use api::auth::Role;
use commands::Engine;
use integration_tests::{TestApp, assert_problem};
use reqwest::StatusCode;
use serde_json::{Value, json};

#[tokio::test]
async fn the_page_is_served_with_its_policy_validators_and_cache_rules() {
    let app = TestApp::spawn(Engine::Sqlite).await;
    let page = app.get_public("/").await;
    assert_eq!(page.status(), StatusCode::OK);
    let headers = page.headers().clone();
    assert_eq!(headers["content-type"], "text/html; charset=utf-8");
    assert_eq!(headers["cache-control"], "no-cache");
    let csp = headers["content-security-policy"].to_str().unwrap();
    for directive in [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "connect-src 'self'",
        "frame-ancestors 'none'",
    ] {
        assert!(csp.contains(directive), "{directive} in {csp}");
    }
    assert!(!csp.contains("unsafe"), "{csp}");
    assert_eq!(headers["x-frame-options"], "DENY");
    let etag = headers["etag"].to_str().unwrap().to_owned();
    let html = page.text().await.unwrap();
    assert!(html.contains("<div id=\"app\">"), "{html}");

    // Revalidation (RFC 9110 section 13.1.2): the same ETag is a 304 without a body.
    let again = app
        .client
        .get(app.url("/"))
        .header("if-none-match", &etag)
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), StatusCode::NOT_MODIFIED);
    assert_eq!(again.headers()["etag"], etag.as_str());
    assert!(again.bytes().await.unwrap().is_empty());

    // Every script and stylesheet it loads: hashed names, cached for a year, compressed.
    let assets: Vec<&str> = html
        .split('"')
        .filter(|s| s.starts_with("/assets/"))
        .collect();
    assert!(assets.iter().any(|a| a.ends_with(".js")), "{html}");
    for asset in assets {
        let response = app
            .client
            .get(app.url(asset))
            .header("accept-encoding", "br")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{asset}");
        assert_eq!(
            response.headers()["cache-control"],
            "public, max-age=31536000, immutable"
        );
        assert_eq!(response.headers()["content-encoding"], "br", "{asset}");
        let etag = response.headers()["etag"].to_str().unwrap();
        assert!(
            etag.starts_with("W/\""),
            "a compressed variant's ETag is weak: {etag}"
        );
        let kind = response.headers()["content-type"].to_str().unwrap();
        assert!(
            kind.starts_with("text/javascript") || kind.starts_with("text/css"),
            "{asset}: {kind}"
        );
        let compressed = response.bytes().await.unwrap().len();
        assert!(
            compressed < 100_000,
            "{asset}: {compressed} bytes on the wire"
        );
    }

    // HEAD answers the headers only; an unknown asset is a 404 problem.
    let head = app.client.head(app.url("/")).send().await.unwrap();
    assert_eq!(head.status(), StatusCode::OK);
    let missing = app.get_public("/assets/nothing-here.js").await;
    let problem = assert_problem(missing, StatusCode::NOT_FOUND).await;
    assert_eq!(problem["type"], "urn:essayflow:problem:no-route");
    let outside = app.get_public("/assets/../index.html").await;
    assert_ne!(outside.status(), StatusCode::OK);
    app.stop().await;
}

#[tokio::test]
async fn the_pipeline_catalog_lists_each_pipeline_with_its_prerequisites() {
    let app = TestApp::spawn(Engine::Sqlite).await;
    let anonymous = app.get_public("/v1/pipelines").await;
    assert_eq!(anonymous.status(), StatusCode::UNAUTHORIZED);
    let teacher = app.user(Role::Teacher).await;
    let response = app.get(&teacher, "/v1/pipelines").await;
    assert_eq!(response.status(), StatusCode::OK);
    let catalog: Value = response.json().await.unwrap();
    // config/pipelines.toml, in name order.
    assert_eq!(
        catalog,
        json!({"items": [
            {"name": "ai_feedback", "requires": ["spellcheck", "nlp"]},
            {"name": "cj_assessment", "requires": ["spellcheck"]},
            {"name": "nlp", "requires": ["spellcheck"]},
            {"name": "spellcheck", "requires": []},
        ]})
    );
    app.stop().await;
}
