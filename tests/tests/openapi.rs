//! The published contract (`GET /openapi.json`, docs/api-contract.md) keeps its conventions:
//! every operation declares the problem answers the edge and the extractors can give it, each
//! as `application/problem+json` with its status's problem types; protected operations declare
//! both credentials and open ones none; request bodies refuse unknown members and carry their
//! constraints and an example; path parameters have a format, a pattern or an enumeration.
//! Also: the service answers as the document says where the two used to disagree (a plain-text
//! rejection, a cursor with a sign), and the documentation pages are served offline.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;

use commands::Engine;
use integration_tests::{TestApp, assert_problem};
use reqwest::StatusCode;
use serde_json::Value;

const METHODS: [&str; 7] = ["get", "put", "post", "delete", "patch", "head", "options"];

/// Operations open to anyone (no credential).
const OPEN: [(&str, &str); 3] = [
    ("post", "/v1/auth/login"),
    ("post", "/v1/auth/refresh"),
    ("get", "/healthz"),
];

/// The paths the rate limiter never counts.
const UNLIMITED: [&str; 3] = ["/healthz", "/readyz", "/metrics"];

/// `value`, or what its `$ref` (`#/...`) points to in `doc`.
fn resolve<'a>(doc: &'a Value, value: &'a Value) -> &'a Value {
    match value.get("$ref").and_then(Value::as_str) {
        Some(reference) => {
            let target = doc
                .pointer(reference.trim_start_matches('#'))
                .unwrap_or_else(|| panic!("dangling $ref {reference}"));
            resolve(doc, target)
        }
        None => value,
    }
}

fn operations(doc: &Value) -> Vec<(String, String, &Value)> {
    let mut out = Vec::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in METHODS {
            if let Some(operation) = item.get(method) {
                out.push((method.to_owned(), path.clone(), operation));
            }
        }
    }
    out
}

/// The schemas of a type: itself, or the members of `oneOf`/`anyOf`/`allOf` (resolved).
fn alternatives<'a>(doc: &'a Value, schema: &'a Value) -> Vec<&'a Value> {
    let schema = resolve(doc, schema);
    let mut out = vec![schema];
    for key in ["oneOf", "anyOf", "allOf"] {
        for member in schema[key].as_array().into_iter().flatten() {
            out.extend(alternatives(doc, member));
        }
    }
    out
}

/// Checks every object schema reachable from a request body: `additionalProperties: false`,
/// and a string property has a bound (`maxLength`, an enumeration or a format).
fn check_request_schema(doc: &Value, schema: &Value, at: &str, problems: &mut Vec<String>) {
    for schema in alternatives(doc, schema) {
        let types: Vec<&str> = match &schema["type"] {
            Value::String(t) => vec![t.as_str()],
            Value::Array(ts) => ts.iter().filter_map(Value::as_str).collect(),
            _ => Vec::new(),
        };
        if types.contains(&"object") && schema.get("properties").is_some() {
            if schema["additionalProperties"] != Value::Bool(false) {
                problems.push(format!(
                    "{at}: an object without additionalProperties: false"
                ));
            }
            for (name, property) in schema["properties"].as_object().unwrap() {
                check_request_schema(doc, property, &format!("{at}.{name}"), problems);
            }
        } else if types.contains(&"object") && !at.ends_with(".result") {
            // Only `ResultMessage.result` (the processor's own output) is a free-form object.
            problems.push(format!("{at}: a free-form object"));
        }
        if types.contains(&"array") {
            if schema.get("maxItems").is_none() {
                problems.push(format!("{at}: an array without maxItems"));
            }
            check_request_schema(doc, &schema["items"], &format!("{at}[]"), problems);
        }
        if types.contains(&"string")
            && schema.get("maxLength").is_none()
            && schema.get("enum").is_none()
            && schema.get("format").is_none()
        {
            problems.push(format!("{at}: a string without maxLength, enum or format"));
        }
        if types.contains(&"integer")
            && (schema.get("minimum").is_none() || schema.get("maximum").is_none())
        {
            problems.push(format!("{at}: an integer without minimum and maximum"));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_operation_declares_its_problems_security_and_constraints() {
    let app = TestApp::spawn(Engine::Sqlite).await;
    let response = app.get_public("/openapi.json").await;
    assert_eq!(response.status(), StatusCode::OK);
    let doc: Value = response.json().await.unwrap();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3.1"));

    // The problem schemas: one per status, each naming its problem types.
    let problem = &doc["components"]["schemas"]["Problem"];
    for member in ["type", "title", "status", "detail", "instance", "errors"] {
        assert!(
            problem["properties"][member].is_object(),
            "Problem.{member}"
        );
    }
    let mut problems = Vec::new();
    for (method, path, operation) in operations(&doc) {
        let at = format!("{} {path}", method.to_uppercase());
        let responses = operation["responses"].as_object().unwrap();
        let statuses: BTreeSet<u16> = responses.keys().map(|k| k.parse().unwrap()).collect();
        let params = operation["parameters"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let has_in = |place: &str| params.iter().any(|p| p["in"] == place);
        let body = operation.get("requestBody");

        // Security: both credentials on protected operations, none on open ones.
        let requirements: Vec<&Value> = operation["security"]
            .as_array()
            .map(|r| r.iter().collect())
            .unwrap_or_default();
        let names: BTreeSet<&str> = requirements
            .iter()
            .flat_map(|r| r.as_object().unwrap().keys().map(String::as_str))
            .collect();
        let open = OPEN.contains(&(method.as_str(), path.as_str()));
        if open {
            if !names.is_empty() {
                problems.push(format!("{at}: open, but declares {names:?}"));
            }
        } else if names != BTreeSet::from(["bearer", "api_key"]) {
            problems.push(format!("{at}: protected, but declares {names:?}"));
        }

        // The statuses every operation of its kind can answer.
        let mut expected = vec![413, 503];
        if !open {
            expected.extend([401, 403]);
        }
        if !UNLIMITED.contains(&path.as_str()) {
            expected.push(429);
        }
        if body.is_some() {
            expected.extend([400, 415, 422]);
        }
        if has_in("query") {
            expected.push(400);
        }
        if has_in("path") {
            expected.push(404);
        }
        for status in expected {
            if !statuses.contains(&status) {
                problems.push(format!("{at}: {status} not declared"));
            }
        }
        if statuses.contains(&500) {
            problems.push(format!("{at}: declares 500 (a bug is not a contract)"));
        }

        // Every error answer is a problem of its status; every answer has the ids.
        for (status, response) in responses {
            let code: u16 = status.parse().unwrap();
            let response = resolve(&doc, response);
            if code >= 400 {
                let schema = &response["content"]["application/problem+json"]["schema"];
                let want = format!("#/components/schemas/Problem{code}");
                if schema["$ref"] != want.as_str() {
                    problems.push(format!("{at} {code}: not a problem of its status"));
                }
                if response["content"]["application/json"]["schema"]["$ref"]
                    == "#/components/schemas/Problem"
                {
                    problems.push(format!(
                        "{at} {code}: a problem declared as application/json"
                    ));
                }
                let narrowed = resolve(&doc, schema);
                let types = narrowed["allOf"][1]["properties"]["type"]["enum"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default();
                if types.is_empty()
                    || !types.iter().all(|t| {
                        t.as_str()
                            .is_some_and(|t| t.starts_with("urn:essayflow:problem:"))
                    })
                {
                    problems.push(format!("{at} {code}: no problem types listed"));
                }
            }
            for header in ["X-Request-ID", "X-Correlation-Id"] {
                if !response["headers"][header].is_object() {
                    problems.push(format!("{at} {code}: no {header}"));
                }
            }
            if (code == 429 || code == 503) && !response["headers"]["Retry-After"].is_object() {
                problems.push(format!("{at} {code}: no Retry-After"));
            }
            if !UNLIMITED.contains(&path.as_str())
                && code != 503
                && !response["headers"]["RateLimit"].is_object()
            {
                problems.push(format!("{at} {code}: no RateLimit"));
            }
        }

        // Path parameters: a format, a pattern or an enumeration.
        for param in params.iter().filter(|p| p["in"] == "path") {
            let schema = resolve(&doc, &param["schema"]);
            if schema.get("format").is_none()
                && schema.get("pattern").is_none()
                && schema.get("enum").is_none()
            {
                problems.push(format!(
                    "{at}: path parameter {} unconstrained",
                    param["name"]
                ));
            }
        }

        // Request bodies: unknown members refused, constraints, an example.
        if let Some(body) = body {
            for (media, content) in body["content"].as_object().unwrap() {
                if !media.ends_with("json") {
                    problems.push(format!("{at}: a {media} body"));
                }
                let schema = &content["schema"];
                check_request_schema(&doc, schema, &format!("{at} body"), &mut problems);
                let has_example = content.get("example").is_some()
                    || alternatives(&doc, schema)
                        .iter()
                        .any(|s| s.get("example").is_some() || s.get("examples").is_some());
                if !has_example {
                    problems.push(format!("{at}: a request body without an example"));
                }
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));

    // The configured pipelines and tiers are the document's enumerations.
    let pipelines =
        &doc["components"]["schemas"]["RequestPipelineRequest"]["properties"]["pipeline"]["enum"];
    assert!(
        pipelines
            .as_array()
            .unwrap()
            .contains(&Value::from("spellcheck")),
        "{pipelines}"
    );
    let tiers = &doc["components"]["schemas"]["UserPatch"]["properties"]["tier"]["enum"];
    assert!(tiers.as_array().unwrap().contains(&Value::Null), "{tiers}");
    assert!(
        tiers.as_array().unwrap().contains(&Value::from("standard")),
        "{tiers}"
    );

    // The document is revalidated, not sent again.
    let etag = app.get_public("/openapi.json").await.headers()["etag"].clone();
    let again = app
        .client
        .get(app.url("/openapi.json"))
        .header("if-none-match", etag)
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), StatusCode::NOT_MODIFIED);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_service_answers_as_the_document_says() {
    let app = TestApp::spawn(Engine::Sqlite).await;
    let teacher = app.user(api::auth::Role::Teacher).await;
    // A path that is not UTF-8 once decoded: axum's plain-text rejection becomes a problem.
    let response = app.get(&teacher, "/v1/batches/%FF%FE").await;
    let body = assert_problem(response, StatusCode::BAD_REQUEST).await;
    assert_eq!(body["type"], "urn:essayflow:problem:bad-request");
    // Cursors are digits only (the published pattern): a sign or a space is refused.
    for cursor in ["%2B5", "-1", "%205", "1234567890123456789"] {
        let response = app
            .get(&teacher, &format!("/v1/batches?cursor={cursor}"))
            .await;
        let body = assert_problem(response, StatusCode::BAD_REQUEST).await;
        assert_eq!(body["errors"][0]["field"], "cursor", "{cursor}");
    }
    let response = app.get(&teacher, "/v1/batches?cursor=5").await;
    assert_eq!(response.status(), StatusCode::OK);
    // The dashboard's query is checked like every other (a problem naming the field).
    let response = app.get(&teacher, "/v1/dashboard?min_position=abc").await;
    let body = assert_problem(response, StatusCode::BAD_REQUEST).await;
    assert_eq!(body["errors"][0]["field"], "min_position");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redoc_is_served_offline_compressed_and_cached() {
    let app = TestApp::spawn(Engine::Sqlite).await;
    let page = app.get_public("/redoc").await;
    assert_eq!(page.status(), StatusCode::OK);
    let csp = page.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(csp.starts_with("default-src 'none'"), "{csp}");
    assert!(!csp.contains("http"), "no other origin: {csp}");
    let html = page.text().await.unwrap();
    assert!(html.contains("/redoc/start.js"), "{html}");
    let start = app
        .get_public("/redoc/start.js")
        .await
        .text()
        .await
        .unwrap();
    let bundle = start
        .split('\'')
        .find(|s| s.starts_with("/redoc/redoc.standalone-"))
        .unwrap()
        .to_owned();
    assert!(start.contains("disableTelemetry: true"), "{start}");
    // The versioned bundle: cached for a year, compressed on the wire.
    let response = app
        .client
        .get(app.url(&bundle))
        .header("accept-encoding", "gzip")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        response.headers()["cache-control"],
        "public, max-age=31536000, immutable"
    );
    assert_eq!(response.headers()["content-encoding"], "gzip");
    let compressed = response.bytes().await.unwrap().len();
    assert!(compressed < 1_000_000, "{compressed} bytes compressed");
    app.stop().await;
}
