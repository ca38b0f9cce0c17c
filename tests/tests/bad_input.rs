//! Bad input at the edge: every malformed, mistyped, out-of-range, oversized, unauthenticated,
//! unauthorised or misdirected request gets the right status and a problem+json body, and the
//! event log does not grow by a single event.
#![allow(clippy::unwrap_used)]

use std::time::{SystemTime, UNIX_EPOCH};

use api::auth::{Claims, Role};
use commands::Engine;
use integration_tests::{JWT_SECRET, TestApp, User, assert_problem, both_engines};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE, HeaderMap, WWW_AUTHENTICATE};
use reqwest::{RequestBuilder, StatusCode};
use serde_json::{Value, json};

/// The request body limit of the API (4 MiB).
const BODY_LIMIT: usize = 4 * 1024 * 1024;

// ---- helpers --------------------------------------------------------------------------------

/// Sends `request`; asserts a problem+json answer with `status` and that no event was appended.
/// Returns the answer's headers and body.
async fn refused_with_headers(
    app: &TestApp,
    request: RequestBuilder,
    status: StatusCode,
) -> (HeaderMap, Value) {
    let before = app.event_count().await;
    let response = request.send().await.unwrap();
    let headers = response.headers().clone();
    let body = assert_problem(response, status).await;
    assert_eq!(
        app.event_count().await,
        before,
        "a refused request appended events: {body}"
    );
    (headers, body)
}

/// Sends `request`; asserts a problem+json answer with `status` and that no event was appended.
async fn refused(app: &TestApp, request: RequestBuilder, status: StatusCode) -> Value {
    refused_with_headers(app, request, status).await.1
}

/// Like [`refused`], and also checks the problem's `type`.
async fn refused_as(
    app: &TestApp,
    request: RequestBuilder,
    status: StatusCode,
    kind: &str,
) -> Value {
    let body = refused(app, request, status).await;
    assert_eq!(
        body["type"],
        format!("urn:essayflow:problem:{kind}"),
        "{body}"
    );
    body
}

/// Asserts a 422 validation problem whose errors name `field`.
async fn invalid(app: &TestApp, request: RequestBuilder, field: &str) -> Value {
    let body = refused_as(app, request, StatusCode::UNPROCESSABLE_ENTITY, "validation").await;
    assert!(
        names(&body, field),
        "expected an error naming {field}: {body}"
    );
    body
}

/// Whether the problem's field errors name `field`.
fn names(body: &Value, field: &str) -> bool {
    body["errors"]
        .as_array()
        .is_some_and(|errors| errors.iter().any(|e| e["field"] == field))
}

/// A POST by `user`, without a body yet.
fn post(app: &TestApp, user: &User, path: &str) -> RequestBuilder {
    app.client.post(app.url(path)).bearer_auth(&user.token)
}

/// A POST by `user` with a raw body declared as JSON.
fn post_raw(app: &TestApp, user: &User, path: &str, body: impl Into<Vec<u8>>) -> RequestBuilder {
    post(app, user, path)
        .header(CONTENT_TYPE, "application/json")
        .body(body.into())
}

fn get(app: &TestApp, user: &User, path: &str) -> RequestBuilder {
    app.client.get(app.url(path)).bearer_auth(&user.token)
}

/// A valid registration body.
fn registration() -> Value {
    json!({
        "title": "Persuasive essays",
        "course_code": "EN-101",
        "expected_essay_count": 3,
    })
}

/// `body` with `key` set to `value`.
fn with(mut body: Value, key: &str, value: Value) -> Value {
    body[key] = value;
    body
}

/// A valid essay.
fn essay(id: &str) -> Value {
    json!({ "essay_id": id, "title": format!("Essay {id}"), "text": "Some words." })
}

/// Registers a batch for `user` expecting `expected` essays; returns its id.
async fn batch_of(app: &TestApp, user: &User, expected: u32) -> String {
    app.register_batch(user, expected).await["batch_id"]
        .as_str()
        .unwrap()
        .to_owned()
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// Claims the API accepts for `user`: those of its login, issued now.
fn valid_claims(user: &User) -> Claims {
    let mut claims: Claims =
        serde_json::from_value(integration_tests::claims_of(&user.token)).unwrap();
    claims.iat = now();
    claims.nbf = now();
    claims.exp = now() + 600;
    claims
}

fn sign(claims: &Claims, algorithm: Algorithm, secret: &str) -> String {
    jsonwebtoken::encode(
        &Header::new(algorithm),
        claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

/// `{"alg":"none","typ":"JWT"}`, base64url-encoded.
const ALG_NONE_HEADER: &str = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0";

// ---- malformed and mistyped bodies ----------------------------------------------------------

async fn malformed_json_is_a_400_and_appends_nothing(engine: Engine) {
    let app = TestApp::spawn(engine).await;
    let teacher = app.user(Role::Teacher).await;
    let id = batch_of(&app, &teacher, 3).await;
    let essays = format!("/v1/batches/{id}/essays");

    let bodies: [&[u8]; 7] = [
        b"{\"title\": \"Persuasive essays\",",
        b"{title: \"Persuasive essays\"}",
        b"not json at all",
        b"",
        // A valid registration followed by more: the whole body must be JSON.
        b"{\"title\": \"x\", \"course_code\": \"EN\", \"expected_essay_count\": 3} {}",
        // Not UTF-8.
        b"{\"title\": \"\xff\xfe\", \"course_code\": \"EN\", \"expected_essay_count\": 3}",
        b"{\"expected_essay_count\": 3,,}",
    ];
    for body in bodies {
        for path in ["/v1/batches", essays.as_str()] {
            refused_as(
                &app,
                post_raw(&app, &teacher, path, body),
                StatusCode::BAD_REQUEST,
                "malformed-json",
            )
            .await;
        }
    }
    for body in ["{\"reason\": ", "{} {}", "{\"reason\": \"x\"}]"] {
        let cancel = post_raw(&app, &teacher, &format!("/v1/batches/{id}/cancel"), body);
        refused_as(&app, cancel, StatusCode::BAD_REQUEST, "malformed-json").await;
    }
    let login = app
        .client
        .post(app.url("/v1/auth/login"))
        .header(CONTENT_TYPE, "application/json")
        .body("{\"username\": \"x\"");
    refused_as(&app, login, StatusCode::BAD_REQUEST, "malformed-json").await;
}

async fn unknown_fields_are_a_422_naming_the_field(engine: Engine) {
    let app = TestApp::spawn(engine).await;
    let teacher = app.user(Role::Teacher).await;
    let id = batch_of(&app, &teacher, 3).await;

    let body = with(registration(), "colour", json!("red"));
    let problem = invalid(
        &app,
        post(&app, &teacher, "/v1/batches").json(&body),
        "colour",
    )
    .await;
    assert!(
        problem["errors"][0]["reason"]
            .as_str()
            .unwrap()
            .contains("unknown field `colour`")
    );

    let mut extra = essay("e1");
    extra["author"] = json!("Ada");
    let body = json!({ "essays": [essay("e0"), extra] });
    let path = format!("/v1/batches/{id}/essays");
    invalid(
        &app,
        post(&app, &teacher, &path).json(&body),
        "essays[1].author",
    )
    .await;

    let body = json!({ "essays": [essay("e0")], "draft": true });
    invalid(&app, post(&app, &teacher, &path).json(&body), "draft").await;

    let path = format!("/v1/batches/{id}/cancel");
    let body = json!({ "reason": "wrong class", "why": "oops" });
    invalid(&app, post(&app, &teacher, &path).json(&body), "why").await;
}

async fn wrong_types_are_a_422_naming_the_field(engine: Engine) {
    let app = TestApp::spawn(engine).await;
    let teacher = app.user(Role::Teacher).await;
    let id = batch_of(&app, &teacher, 3).await;

    let register = [
        (
            with(registration(), "expected_essay_count", json!("3")),
            "expected_essay_count",
        ),
        (
            with(registration(), "expected_essay_count", json!(2.5)),
            "expected_essay_count",
        ),
        (with(registration(), "title", json!(42)), "title"),
        (
            with(registration(), "course_code", json!(["EN"])),
            "course_code",
        ),
        (
            with(registration(), "batch_id", json!("not-a-uuid")),
            "batch_id",
        ),
        (
            with(registration(), "class_designation", json!({})),
            "class_designation",
        ),
        (json!([]), "body"),
        (json!("a batch"), "body"),
        (json!(null), "body"),
    ];
    for (body, field) in register {
        invalid(&app, post(&app, &teacher, "/v1/batches").json(&body), field).await;
    }

    let path = format!("/v1/batches/{id}/essays");
    let essays = [
        (json!({ "essays": { "e1": essay("e1") } }), "essays"),
        (json!({ "essays": "e1" }), "essays"),
        (json!({ "essays": ["e1"] }), "essays[0]"),
        (
            json!({ "essays": [essay("e0"), with(essay("e1"), "text", json!(5))] }),
            "essays[1].text",
        ),
        (
            json!({ "essays": [with(essay("e1"), "essay_id", json!(7))] }),
            "essays[0].essay_id",
        ),
    ];
    for (body, field) in essays {
        invalid(&app, post(&app, &teacher, &path).json(&body), field).await;
    }

    let path = format!("/v1/batches/{id}/pipelines");
    let body = json!({ "pipeline": 7 });
    invalid(&app, post(&app, &teacher, &path).json(&body), "pipeline").await;
}

async fn missing_fields_are_a_422_that_names_them(engine: Engine) {
    let app = TestApp::spawn(engine).await;
    let teacher = app.user(Role::Teacher).await;
    let mut body = registration();
    body.as_object_mut().unwrap().remove("course_code");
    let problem = refused_as(
        &app,
        post(&app, &teacher, "/v1/batches").json(&body),
        StatusCode::UNPROCESSABLE_ENTITY,
        "validation",
    )
    .await;
    assert!(
        problem["errors"][0]["reason"]
            .as_str()
            .unwrap()
            .contains("missing field `course_code`"),
        "{problem}"
    );
}

// ---- out-of-range values --------------------------------------------------------------------

async fn out_of_range_registrations_are_a_422_naming_every_bad_field(engine: Engine) {
    let app = TestApp::spawn(engine).await;
    let teacher = app.user(Role::Teacher).await;

    let cases = [
        (
            with(registration(), "title", json!("t".repeat(201))),
            "title",
        ),
        (with(registration(), "title", json!("")), "title"),
        (with(registration(), "title", json!("   ")), "title"),
        (
            with(registration(), "course_code", json!("EN 101")),
            "course_code",
        ),
        (
            with(registration(), "course_code", json!("")),
            "course_code",
        ),
        (
            with(registration(), "course_code", json!("C".repeat(33))),
            "course_code",
        ),
        (
            with(registration(), "expected_essay_count", json!(0)),
            "expected_essay_count",
        ),
        (
            with(registration(), "expected_essay_count", json!(1001)),
            "expected_essay_count",
        ),
        (
            with(registration(), "expected_essay_count", json!(-1)),
            "expected_essay_count",
        ),
        (
            with(registration(), "class_designation", json!("")),
            "class_designation",
        ),
        // U+0000 cannot be stored (PostgreSQL refuses it in text and jsonb): a 422, not a 500.
        (with(registration(), "title", json!("a\u{0}b")), "title"),
        (
            with(registration(), "class_designation", json!("9\u{0}")),
            "class_designation",
        ),
        (
            with(registration(), "course_code", json!("EN\u{0}")),
            "course_code",
        ),
    ];
    for (body, field) in cases {
        let problem = invalid(&app, post(&app, &teacher, "/v1/batches").json(&body), field).await;
        assert_eq!(problem["errors"].as_array().unwrap().len(), 1, "{problem}");
    }

    // Every bad field is reported at once.
    let body =
        json!({ "title": "t".repeat(201), "course_code": "EN 101", "expected_essay_count": 1001 });
    let problem = invalid(
        &app,
        post(&app, &teacher, "/v1/batches").json(&body),
        "title",
    )
    .await;
    assert!(names(&problem, "course_code"), "{problem}");
    assert!(names(&problem, "expected_essay_count"), "{problem}");

    // The limits themselves are accepted.
    let body = json!({ "title": "t".repeat(200), "course_code": "C".repeat(32), "expected_essay_count": 1000 });
    let response = post(&app, &teacher, "/v1/batches")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::ACCEPTED);
}

async fn out_of_range_essays_are_a_422_naming_the_essay_and_field(engine: Engine) {
    let app = TestApp::spawn(engine).await;
    let teacher = app.user(Role::Teacher).await;
    let id = batch_of(&app, &teacher, 3).await;
    let path = format!("/v1/batches/{id}/essays");

    let cases = [
        (json!({ "essays": [] }), "essays"),
        (
            json!({ "essays": [essay("e0"), with(essay("e1"), "text", json!("w".repeat(100_001)))] }),
            "essays[1].text",
        ),
        (
            json!({ "essays": [with(essay("e1"), "text", json!(" \n "))] }),
            "essays[0].text",
        ),
        (
            json!({ "essays": [with(essay("e1"), "essay_id", json!("has space"))] }),
            "essays[0].essay_id",
        ),
        (
            json!({ "essays": [with(essay("e1"), "essay_id", json!("../etc/passwd"))] }),
            "essays[0].essay_id",
        ),
        (
            json!({ "essays": [with(essay("e1"), "essay_id", json!(""))] }),
            "essays[0].essay_id",
        ),
        (
            json!({ "essays": [with(essay("e1"), "essay_id", json!("i".repeat(65)))] }),
            "essays[0].essay_id",
        ),
        (
            json!({ "essays": [with(essay("e1"), "title", json!("t".repeat(201)))] }),
            "essays[0].title",
        ),
        (
            json!({ "essays": [with(essay("e1"), "text", json!("some\u{0}text"))] }),
            "essays[0].text",
        ),
        (
            json!({ "essays": [with(essay("e1"), "title", json!("\u{0}"))] }),
            "essays[0].title",
        ),
        (
            json!({ "essays": [with(essay("e1"), "essay_id", json!("e\u{0}1"))] }),
            "essays[0].essay_id",
        ),
    ];
    for (body, field) in cases {
        invalid(&app, post(&app, &teacher, &path).json(&body), field).await;
    }

    let many: Vec<Value> = (0..1001).map(|i| essay(&format!("e{i}"))).collect();
    let body = json!({ "essays": many });
    invalid(&app, post(&app, &teacher, &path).json(&body), "essays").await;

    // A cancel reason with U+0000 is refused the same way.
    let cancel = post(&app, &teacher, &format!("/v1/batches/{id}/cancel"))
        .json(&json!({ "reason": "wrong\u{0}class" }));
    invalid(&app, cancel, "reason").await;

    // An essay of exactly 100 000 characters is accepted.
    let body = json!({ "essays": [with(essay("long"), "text", json!("w".repeat(100_000)))] });
    let response = post(&app, &teacher, &path)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::ACCEPTED);
}

// ---- media type and size --------------------------------------------------------------------

async fn a_body_not_declared_as_json_is_a_415(engine: Engine) {
    let app = TestApp::spawn(engine).await;
    let teacher = app.user(Role::Teacher).await;
    let id = batch_of(&app, &teacher, 3).await;
    let body = registration().to_string();
    let essays = json!({ "essays": [essay("e1")] }).to_string();
    let essays_path = format!("/v1/batches/{id}/essays");

    for content_type in [
        None,
        Some("text/plain"),
        Some("application/x-www-form-urlencoded"),
    ] {
        let requests = [
            post(&app, &teacher, "/v1/batches").body(body.clone()),
            post(&app, &teacher, &essays_path).body(essays.clone()),
            post(&app, &teacher, &format!("/v1/batches/{id}/cancel"))
                .body(json!({ "reason": "x" }).to_string()),
            app.client.post(app.url("/v1/auth/login")).body(
                json!({ "username": teacher.username, "password": "correct horse battery" })
                    .to_string(),
            ),
        ];
        for request in requests {
            let request = match content_type {
                Some(value) => request.header(CONTENT_TYPE, value),
                None => request,
            };
            refused_as(
                &app,
                request,
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported-media-type",
            )
            .await;
        }
    }
    // Media types are case-insensitive (RFC 9110 section 8.3.1), charset and all.
    for content_type in ["Application/JSON", "APPLICATION/JSON; Charset=UTF-8"] {
        let response = post(&app, &teacher, "/v1/batches")
            .header(CONTENT_TYPE, content_type)
            .body(body.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::ACCEPTED, "{content_type}");
    }
}

async fn a_body_over_four_mebibytes_is_a_413(engine: Engine) {
    let app = TestApp::spawn(engine).await;
    let teacher = app.user(Role::Teacher).await;
    let id = batch_of(&app, &teacher, 3).await;

    // A JSON registration of exactly `size` bytes whose title is as long as it takes.
    let registration_of = |size: usize| {
        let empty = with(registration(), "title", json!("")).to_string();
        let body = with(
            registration(),
            "title",
            json!("t".repeat(size - empty.len())),
        )
        .to_string();
        assert_eq!(body.len(), size);
        body
    };
    // Just over the limit, so that the server has read the whole body when it answers: a client
    // still sending megabytes when the server closes may see a broken pipe, not the answer.
    let over = registration_of(BODY_LIMIT + 1);
    for path in [
        "/v1/batches".to_owned(),
        format!("/v1/batches/{id}/essays"),
        format!("/v1/batches/{id}/cancel"),
    ] {
        refused_as(
            &app,
            post_raw(&app, &teacher, &path, over.clone()),
            StatusCode::PAYLOAD_TOO_LARGE,
            "body-too-large",
        )
        .await;
    }
    let login = app
        .client
        .post(app.url("/v1/auth/login"))
        .header(CONTENT_TYPE, "application/json")
        .body(over);
    refused_as(&app, login, StatusCode::PAYLOAD_TOO_LARGE, "body-too-large").await;

    // A body of exactly the limit is read, and refused only for its (too long) title.
    let at_limit = registration_of(BODY_LIMIT);
    invalid(
        &app,
        post_raw(&app, &teacher, "/v1/batches", at_limit),
        "title",
    )
    .await;
}

// ---- rules of the batch ---------------------------------------------------------------------

async fn duplicate_essay_ids_are_a_409(engine: Engine) {
    let app = TestApp::spawn(engine).await;
    let teacher = app.user(Role::Teacher).await;
    let id = batch_of(&app, &teacher, 3).await;
    let path = format!("/v1/batches/{id}/essays");

    let twice = json!({ "essays": [essay("e1"), essay("e1")] });
    let problem = refused_as(
        &app,
        post(&app, &teacher, &path).json(&twice),
        StatusCode::CONFLICT,
        "duplicate-essay",
    )
    .await;
    assert!(
        problem["detail"].as_str().unwrap().contains("e1"),
        "{problem}"
    );

    let added = app.add_essays(&teacher, &id, &["e1"]).await;
    assert_eq!(added.status(), StatusCode::ACCEPTED);
    let again = json!({ "essays": [essay("e2"), essay("e1")] });
    refused_as(
        &app,
        post(&app, &teacher, &path).json(&again),
        StatusCode::CONFLICT,
        "duplicate-essay",
    )
    .await;
}

async fn more_essays_than_expected_is_a_409(engine: Engine) {
    let app = TestApp::spawn(engine).await;
    let teacher = app.user(Role::Teacher).await;
    let id = batch_of(&app, &teacher, 2).await;
    let path = format!("/v1/batches/{id}/essays");

    let three = json!({ "essays": [essay("e1"), essay("e2"), essay("e3")] });
    refused_as(
        &app,
        post(&app, &teacher, &path).json(&three),
        StatusCode::CONFLICT,
        "too-many-essays",
    )
    .await;

    assert_eq!(
        app.add_essays(&teacher, &id, &["e1"]).await.status(),
        StatusCode::ACCEPTED
    );
    let two = json!({ "essays": [essay("e2"), essay("e3")] });
    refused_as(
        &app,
        post(&app, &teacher, &path).json(&two),
        StatusCode::CONFLICT,
        "too-many-essays",
    )
    .await;

    assert_eq!(
        app.add_essays(&teacher, &id, &["e2"]).await.status(),
        StatusCode::ACCEPTED
    );
    let one = json!({ "essays": [essay("e3")] });
    refused_as(
        &app,
        post(&app, &teacher, &path).json(&one),
        StatusCode::CONFLICT,
        "too-many-essays",
    )
    .await;
}

// ---- authentication and roles ---------------------------------------------------------------

async fn a_request_without_a_valid_token_is_a_401(engine: Engine) {
    let app = TestApp::spawn(engine).await;
    let teacher = app.user(Role::Teacher).await;
    let id = batch_of(&app, &teacher, 3).await;

    let valid = valid_claims(&teacher);
    let good = sign(&valid, Algorithm::HS256, JWT_SECRET);
    let [header, payload, signature]: [&str; 3] =
        good.split('.').collect::<Vec<_>>().try_into().unwrap();
    let expired = Claims {
        iat: now() - 7200,
        exp: now() - 3600,
        ..valid.clone()
    };
    let wrong_issuer = Claims {
        iss: "someone-else".to_owned(),
        ..valid.clone()
    };
    let wrong_audience = Claims {
        aud: "another-api".to_owned(),
        ..valid.clone()
    };
    let escalated = Claims {
        role: Role::Admin,
        ..valid.clone()
    };
    let escalated_token = sign(&escalated, Algorithm::HS256, "irrelevant");
    let escalated_payload = escalated_token.split('.').nth(1).unwrap();
    let not_a_user = Claims {
        sub: "not-a-user-id".to_owned(),
        ..valid.clone()
    };
    let not_yet_valid = Claims {
        nbf: now() + 3600,
        ..valid.clone()
    };
    let issued_in_the_future = Claims {
        iat: now() + 365 * 24 * 3600,
        ..valid.clone()
    };
    let unknown_session = Claims {
        sid: uuid::Uuid::new_v4().to_string(),
        ..valid.clone()
    };
    let older_version = Claims {
        ver: valid.ver - 1,
        ..valid.clone()
    };
    let with_nul = Claims {
        sid: format!("{}\u{0}", valid.sid),
        ..valid.clone()
    };
    let mut without_jti = serde_json::to_value(&valid).unwrap();
    without_jti.as_object_mut().unwrap().remove("jti");
    let without_jti = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &without_jti,
        &EncodingKey::from_secret(JWT_SECRET.as_bytes()),
    )
    .unwrap();

    let cases: Vec<(&str, Option<String>)> = vec![
        ("no Authorization header", None),
        ("not a bearer token", Some("Basic dXNlcjpwYXNz".to_owned())),
        ("an empty bearer token", Some("Bearer ".to_owned())),
        ("a garbage token", Some("Bearer not-a-token".to_owned())),
        ("three garbage parts", Some("Bearer aaa.bbb.ccc".to_owned())),
        (
            "a token signed with another secret",
            Some(format!(
                "Bearer {}",
                sign(
                    &escalated,
                    Algorithm::HS256,
                    "another-secret-that-is-long-enough-for-hs256"
                )
            )),
        ),
        (
            "a real signature over an altered payload",
            Some(format!("Bearer {header}.{escalated_payload}.{signature}")),
        ),
        (
            "an expired token",
            Some(format!(
                "Bearer {}",
                sign(&expired, Algorithm::HS256, JWT_SECRET)
            )),
        ),
        (
            "the wrong issuer",
            Some(format!(
                "Bearer {}",
                sign(&wrong_issuer, Algorithm::HS256, JWT_SECRET)
            )),
        ),
        (
            "the wrong audience",
            Some(format!(
                "Bearer {}",
                sign(&wrong_audience, Algorithm::HS256, JWT_SECRET)
            )),
        ),
        (
            "alg none without a signature",
            Some(format!("Bearer {ALG_NONE_HEADER}.{payload}.")),
        ),
        (
            "alg none with the real signature",
            Some(format!("Bearer {ALG_NONE_HEADER}.{payload}.{signature}")),
        ),
        (
            "HS512 with the right secret",
            Some(format!(
                "Bearer {}",
                sign(&valid, Algorithm::HS512, JWT_SECRET)
            )),
        ),
        (
            "a subject that is not a user id",
            Some(format!(
                "Bearer {}",
                sign(&not_a_user, Algorithm::HS256, JWT_SECRET)
            )),
        ),
        (
            "nbf in the future",
            Some(format!(
                "Bearer {}",
                sign(&not_yet_valid, Algorithm::HS256, JWT_SECRET)
            )),
        ),
        (
            "iat absurdly in the future",
            Some(format!(
                "Bearer {}",
                sign(&issued_in_the_future, Algorithm::HS256, JWT_SECRET)
            )),
        ),
        (
            "an unknown session (sid)",
            Some(format!(
                "Bearer {}",
                sign(&unknown_session, Algorithm::HS256, JWT_SECRET)
            )),
        ),
        (
            "an older token version",
            Some(format!(
                "Bearer {}",
                sign(&older_version, Algorithm::HS256, JWT_SECRET)
            )),
        ),
        (
            "a session id with U+0000",
            Some(format!(
                "Bearer {}",
                sign(&with_nul, Algorithm::HS256, JWT_SECRET)
            )),
        ),
        ("no jti", Some(format!("Bearer {without_jti}"))),
    ];

    for (case, authorization) in cases {
        let requests = [
            app.client
                .post(app.url("/v1/batches"))
                .json(&registration()),
            app.client
                .post(app.url(&format!("/v1/batches/{id}/cancel")))
                .json(&json!({})),
            app.client.get(app.url(&format!("/v1/batches/{id}"))),
            app.client.get(app.url("/v1/batches")),
        ];
        for request in requests {
            let request = match &authorization {
                Some(value) => request.header(AUTHORIZATION, value),
                None => request,
            };
            let (headers, body) =
                refused_with_headers(&app, request, StatusCode::UNAUTHORIZED).await;
            assert_eq!(
                headers.get(WWW_AUTHENTICATE).map(|v| v.to_str().unwrap()),
                Some("Bearer"),
                "{case}"
            );
            assert_eq!(body["type"], "urn:essayflow:problem:unauthorized", "{case}");
        }
    }
    // API keys that are not keys: unknown (of the right shape), malformed, empty.
    for key in [
        "efk_0123456789abcdef_aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
        "efk_zzzz",
        "not-a-key",
        "",
    ] {
        let request = app
            .client
            .get(app.url("/v1/batches"))
            .header("x-api-key", key);
        let (_, body) = refused_with_headers(&app, request, StatusCode::UNAUTHORIZED).await;
        assert_eq!(body["type"], "urn:essayflow:problem:unauthorized", "{key}");
    }
    // The scheme is case-insensitive (RFC 9110 section 11.1).
    for scheme in ["bearer", "BEARER", "bEaReR"] {
        let accepted = app
            .client
            .get(app.url("/v1/batches"))
            .header(AUTHORIZATION, format!("{scheme} {}", teacher.token))
            .send()
            .await
            .unwrap();
        assert_eq!(accepted.status(), StatusCode::OK, "{scheme}");
    }

    // Authentication comes before the body: a bad body without a token is still a 401.
    let request = app
        .client
        .post(app.url("/v1/batches"))
        .header(CONTENT_TYPE, "application/json")
        .body("{oops");
    refused(&app, request, StatusCode::UNAUTHORIZED).await;

    // The same construction with nothing wrong is accepted, so the refusals above are about
    // what each token got wrong and nothing else.
    let accepted = app
        .client
        .post(app.url("/v1/batches"))
        .bearer_auth(&good)
        .json(&registration())
        .send()
        .await
        .unwrap();
    assert_eq!(accepted.status(), StatusCode::ACCEPTED);
}

async fn a_wrong_password_is_a_401_like_an_unknown_user(engine: Engine) {
    let app = TestApp::spawn(engine).await;
    let teacher = app.user(Role::Teacher).await;
    let login = |username: &str, password: &str| {
        app.client
            .post(app.url("/v1/auth/login"))
            .json(&json!({ "username": username, "password": password }))
    };

    let (headers, wrong) = refused_with_headers(
        &app,
        login(&teacher.username, "incorrect horse battery"),
        StatusCode::UNAUTHORIZED,
    )
    .await;
    assert_eq!(headers[WWW_AUTHENTICATE], "Bearer");
    assert_eq!(wrong["type"], "urn:essayflow:problem:unauthorized");
    let unknown = refused(
        &app,
        login("nobody-at-all", "correct horse battery"),
        StatusCode::UNAUTHORIZED,
    )
    .await;
    assert_eq!(wrong, unknown, "the answer does not tell which was wrong");
    refused(&app, login(&teacher.username, ""), StatusCode::UNAUTHORIZED).await;
}

async fn a_service_user_may_not_register_a_batch(engine: Engine) {
    let app = TestApp::spawn(engine).await;
    let service = app.user(Role::Service).await;
    refused_as(
        &app,
        post(&app, &service, "/v1/batches").json(&registration()),
        StatusCode::FORBIDDEN,
        "forbidden",
    )
    .await;
}

// ---- ownership and ids ----------------------------------------------------------------------

/// The status and body of an answer.
async fn answer(request: RequestBuilder) -> (StatusCode, Value) {
    let response = request.send().await.unwrap();
    let status = response.status();
    let body = assert_problem(response, status).await;
    (status, body)
}

async fn another_users_batch_is_a_404_exactly_like_a_missing_one(engine: Engine) {
    let app = TestApp::spawn(engine).await;
    let alice = app.user(Role::Teacher).await;
    let bob = app.user(Role::Teacher).await;
    let id = batch_of(&app, &alice, 2).await;
    let added = app.add_essays(&alice, &id, &["e1"]).await;
    let position = added.json::<Value>().await.unwrap()["position"]
        .as_i64()
        .unwrap();
    let missing = uuid::Uuid::new_v4().to_string();
    let before = app.event_count().await;

    let reads = [
        "?min_position={position}",
        "/status?min_position={position}",
        "/events",
        "?at_version=1",
    ];
    for read in reads {
        let read = read.replace("{position}", &position.to_string());
        let theirs = answer(get(&app, &bob, &format!("/v1/batches/{id}{read}"))).await;
        let nobodys = answer(get(&app, &bob, &format!("/v1/batches/{missing}{read}"))).await;
        assert_eq!(theirs.0, StatusCode::NOT_FOUND, "{read}");
        assert_eq!(theirs, nobodys, "{read}");
    }

    let commands = [
        ("essays", json!({ "essays": [essay("e2")] })),
        ("pipelines", json!({ "pipeline": "nlp" })),
        ("cancel", json!({ "reason": "mine now" })),
    ];
    for (command, body) in &commands {
        let theirs = refused(
            &app,
            post(&app, &bob, &format!("/v1/batches/{id}/{command}")).json(body),
            StatusCode::NOT_FOUND,
        )
        .await;
        let nobodys = refused(
            &app,
            post(&app, &bob, &format!("/v1/batches/{missing}/{command}")).json(body),
            StatusCode::NOT_FOUND,
        )
        .await;
        assert_eq!(theirs, nobodys, "{command}");
    }
    assert_eq!(app.event_count().await, before, "nothing appended");

    // Alice's batch is as she left it.
    let batch = app.batch(&alice, &id, position).await;
    assert_eq!(batch["version"], 2);
    assert_eq!(batch["status"], "registered");
}

async fn a_batch_id_that_is_not_a_uuid_is_a_404(engine: Engine) {
    let app = TestApp::spawn(engine).await;
    let teacher = app.user(Role::Teacher).await;
    let missing = uuid::Uuid::new_v4().to_string();

    for bad in [
        "not-a-uuid",
        "123",
        "%20",
        "00000000-0000-0000-0000-00000000000g",
    ] {
        for read in ["", "/status", "/events", "?at_version=1"] {
            let (status, body) =
                answer(get(&app, &teacher, &format!("/v1/batches/{bad}{read}"))).await;
            assert_eq!(status, StatusCode::NOT_FOUND, "{bad}{read}");
            let like = answer(get(&app, &teacher, &format!("/v1/batches/{missing}{read}"))).await;
            assert_eq!((status, body), like, "{bad}{read}");
        }
        let commands = [
            ("essays", json!({ "essays": [essay("e1")] })),
            ("pipelines", json!({ "pipeline": "nlp" })),
            ("cancel", json!({})),
        ];
        for (command, body) in &commands {
            let refusal = refused(
                &app,
                post(&app, &teacher, &format!("/v1/batches/{bad}/{command}")).json(body),
                StatusCode::NOT_FOUND,
            )
            .await;
            let like = refused(
                &app,
                post(&app, &teacher, &format!("/v1/batches/{missing}/{command}")).json(body),
                StatusCode::NOT_FOUND,
            )
            .await;
            assert_eq!(refusal, like, "{bad}/{command}");
        }
    }
}

both_engines!(
    malformed_json_is_a_400_and_appends_nothing,
    unknown_fields_are_a_422_naming_the_field,
    wrong_types_are_a_422_naming_the_field,
    missing_fields_are_a_422_that_names_them,
    out_of_range_registrations_are_a_422_naming_every_bad_field,
    out_of_range_essays_are_a_422_naming_the_essay_and_field,
    a_body_not_declared_as_json_is_a_415,
    a_body_over_four_mebibytes_is_a_413,
    duplicate_essay_ids_are_a_409,
    more_essays_than_expected_is_a_409,
    a_request_without_a_valid_token_is_a_401,
    a_wrong_password_is_a_401_like_an_unknown_user,
    a_service_user_may_not_register_a_batch,
    another_users_batch_is_a_404_exactly_like_a_missing_one,
    a_batch_id_that_is_not_a_uuid_is_a_404,
);
