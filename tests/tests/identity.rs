//! The identity lifecycle over real HTTP and WebSocket: login, refresh-token rotation and reuse
//! detection, logout, user administration taking effect on the next request (and closing open
//! WebSocket connections), in-band token refresh on a WebSocket, API keys (create, use,
//! rotate, revoke), the audit log, the CLI changing a running server, login throttling, a
//! login flood within the hashing bound, and logins whose timing does not tell whether a
//! username exists.
#![allow(clippy::unwrap_used)]

use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use api::auth::Role;
use commands::Engine;
use integration_tests::ws::{WsClient, ws_url};
use integration_tests::{
    TestApp, User, assert_problem, both_engines, essayflow_binary, wait_until,
};
use reqwest::StatusCode;
use serde_json::{Value, json};
use sqlx::Row;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

const PASSWORD: &str = "correct horse battery";

async fn login(app: &TestApp, username: &str, password: &str) -> reqwest::Response {
    app.client
        .post(app.url("/v1/auth/login"))
        .json(&json!({ "username": username, "password": password }))
        .send()
        .await
        .unwrap()
}

async fn refresh(app: &TestApp, token: &str) -> reqwest::Response {
    app.client
        .post(app.url("/v1/auth/refresh"))
        .json(&json!({ "refresh_token": token }))
        .send()
        .await
        .unwrap()
}

async fn get_with(app: &TestApp, token: &str, path: &str) -> StatusCode {
    app.client
        .get(app.url(path))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
        .status()
}

async fn audit_actions(app: &TestApp, admin: &User, action: &str) -> Vec<Value> {
    let page = app
        .get_json(admin, &format!("/v1/admin/audit?action={action}&limit=500"))
        .await;
    page["items"].as_array().unwrap().clone()
}

async fn metric(app: &TestApp, name: &str) -> f64 {
    let text = app.get_ops("/metrics").await.text().await.unwrap();
    text.lines()
        .find_map(|line| line.strip_prefix(&format!("{name} ")))
        .unwrap_or_else(|| panic!("no metric {name}"))
        .trim()
        .parse()
        .unwrap()
}

// ---- sessions -------------------------------------------------------------------------------

async fn refresh_rotates_and_a_reused_refresh_token_revokes_the_session(engine: Engine) {
    let app = TestApp::spawn(engine).await;
    let admin = app.user(Role::Admin).await;
    let teacher = app.user(Role::Teacher).await;

    // Login gave a pair; refresh spends the refresh token and gives the next pair.
    let first: Value = refresh(&app, &teacher.refresh).await.json().await.unwrap();
    assert_eq!(first["token_type"], "Bearer");
    assert_eq!(first["expires_in"], 900);
    let (access, next) = (
        first["access_token"].as_str().unwrap().to_owned(),
        first["refresh_token"].as_str().unwrap().to_owned(),
    );
    assert_ne!(next, teacher.refresh);
    assert_eq!(
        get_with(&app, &access, "/v1/dashboard").await,
        StatusCode::OK
    );
    // The access token carries iat, nbf, exp, jti, the session and the token version.
    let claims = integration_tests::claims_of(&access);
    for claim in ["iat", "nbf", "exp", "jti", "sid", "ver"] {
        assert!(!claims[claim].is_null(), "{claim}");
    }
    assert_ne!(
        claims["jti"],
        integration_tests::claims_of(&teacher.token)["jti"]
    );

    // A second session of the same user, which must survive what happens to the first.
    let other: Value = login(&app, &teacher.username, PASSWORD)
        .await
        .json()
        .await
        .unwrap();
    let other_access = other["access_token"].as_str().unwrap();

    // The spent token again: refused, and the whole session is revoked.
    assert_problem(
        refresh(&app, &teacher.refresh).await,
        StatusCode::UNAUTHORIZED,
    )
    .await;
    assert_problem(refresh(&app, &next).await, StatusCode::UNAUTHORIZED).await;
    assert_eq!(
        get_with(&app, &access, "/v1/dashboard").await,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        get_with(&app, &teacher.token, "/v1/dashboard").await,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        get_with(&app, other_access, "/v1/dashboard").await,
        StatusCode::OK
    );
    // Logged as a security event in the audit log, and counted.
    let reuse = audit_actions(&app, &admin, "refresh.reuse").await;
    assert_eq!(reuse.len(), 1);
    assert_eq!(reuse[0]["actor_id"], teacher.id.as_str());
    assert_eq!(reuse[0]["outcome"], "refused");
    assert_eq!(
        metric(&app, "essayflow_refresh_token_reuse_total").await,
        1.0
    );

    // Unknown, malformed and U+0000 refresh tokens: 401, never 500.
    for token in ["efr_nope", "", "x\u{0}y", "efr_\u{0}"] {
        assert_problem(refresh(&app, token).await, StatusCode::UNAUTHORIZED).await;
    }
}

/// Waits (on the clock) until `since` is `seconds` old.
async fn until_elapsed(since: Instant, seconds: f64) {
    let age = Duration::from_secs_f64(seconds);
    wait_until(age + Duration::from_secs(5), || async {
        since.elapsed() >= age
    })
    .await;
}

async fn refresh_tokens_lapse_when_idle_and_sessions_end_at_their_absolute_lifetime(
    engine: Engine,
) {
    let app = TestApp::spawn_with(engine, |s| {
        s.auth.refresh_idle_secs = 2;
        s.auth.refresh_absolute_secs = 4;
    })
    .await;
    // Idle: a refresh token unused for longer than the idle lifetime is refused, and that is
    // not mistaken for a reuse (however often it is presented).
    let idle = app.user(Role::Teacher).await;
    let issued = Instant::now();
    until_elapsed(issued, 2.5).await;
    for _ in 0..2 {
        assert_problem(refresh(&app, &idle.refresh).await, StatusCode::UNAUTHORIZED).await;
    }
    assert_eq!(
        metric(&app, "essayflow_refresh_token_reuse_total").await,
        0.0
    );

    // Absolute: refreshing within the idle lifetime keeps a session going until its absolute
    // lifetime, not past it.
    let started = Instant::now();
    let user = app.user(Role::Teacher).await;
    let mut token = user.refresh.clone();
    let mut refreshed = 0;
    loop {
        until_elapsed(started, 1.0 + f64::from(refreshed)).await;
        let response = refresh(&app, &token).await;
        if response.status() != StatusCode::OK {
            assert_problem(response, StatusCode::UNAUTHORIZED).await;
            break;
        }
        let pair: Value = response.json().await.unwrap();
        token = pair["refresh_token"].as_str().unwrap().to_owned();
        refreshed += 1;
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "outlived its absolute lifetime"
        );
    }
    assert!(refreshed >= 2, "refreshed {refreshed} times before the end");
    assert!(started.elapsed() >= Duration::from_secs(3));
}

async fn logout_revokes_the_session_and_its_tokens(engine: Engine) {
    let app = TestApp::spawn(engine).await;
    let teacher = app.user(Role::Teacher).await;
    let other: Value = login(&app, &teacher.username, PASSWORD)
        .await
        .json()
        .await
        .unwrap();
    // The WebSocket handshake takes the scheme in any case (RFC 9110 section 11.1).
    let mut request = ws_url(&app.address).into_client_request().unwrap();
    request.headers_mut().insert(
        "authorization",
        format!("BEARER {}", teacher.token).parse().unwrap(),
    );
    let mut ws = WsClient::connect(request, None).await.unwrap();
    ws.subscribe("dashboard", None).await;
    assert_eq!(ws.next_json().await["type"], "subscribed");

    let response = app
        .client
        .post(app.url("/v1/auth/logout"))
        .bearer_auth(&teacher.token)
        .json(&json!({ "refresh_token": teacher.refresh }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    assert_eq!(
        get_with(&app, &teacher.token, "/v1/dashboard").await,
        StatusCode::UNAUTHORIZED
    );
    assert_problem(
        refresh(&app, &teacher.refresh).await,
        StatusCode::UNAUTHORIZED,
    )
    .await;
    // The session's WebSocket is closed with the documented code; the other session lives.
    assert_eq!(u16::from(ws.closed().await.code), 4403);
    assert_eq!(
        get_with(
            &app,
            other["access_token"].as_str().unwrap(),
            "/v1/dashboard"
        )
        .await,
        StatusCode::OK
    );
    // Logging out without a token is a 401.
    let anonymous = app
        .client
        .post(app.url("/v1/auth/logout"))
        .send()
        .await
        .unwrap();
    assert_problem(anonymous, StatusCode::UNAUTHORIZED).await;
}

// ---- user administration --------------------------------------------------------------------

async fn patch_user(app: &TestApp, admin: &User, id: &str, body: Value) -> reqwest::Response {
    app.client
        .patch(app.url(&format!("/v1/admin/users/{id}")))
        .bearer_auth(&admin.token)
        .header("content-type", "application/merge-patch+json")
        .body(body.to_string())
        .send()
        .await
        .unwrap()
}

async fn disabled_deleted_and_demoted_users_lose_access_on_their_next_request(engine: Engine) {
    let app = TestApp::spawn(engine).await;
    let admin = app.user(Role::Admin).await;
    let disabled = app.user(Role::Teacher).await;
    let deleted = app.user(Role::Teacher).await;
    let demoted = app.user(Role::Admin).await;
    let kept = app.user(Role::Teacher).await;
    let deleted_batch = app.register_batch(&deleted, 2).await["batch_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let kept_batch = app.register_batch(&kept, 2).await["batch_id"]
        .as_str()
        .unwrap()
        .to_owned();
    app.wait_for_projections().await;
    // The demoted admin reads another teacher's batch while still an admin.
    assert_eq!(
        get_with(&app, &demoted.token, &format!("/v1/batches/{kept_batch}")).await,
        StatusCode::OK
    );
    let mut sockets = Vec::new();
    for user in [&disabled, &deleted, &demoted, &kept] {
        let mut ws = app.ws(user).await;
        ws.subscribe("dashboard", None).await;
        assert_eq!(ws.next_json().await["type"], "subscribed");
        assert_eq!(ws.next_json().await["type"], "snapshot");
        sockets.push(ws);
    }

    // Disable.
    let response = patch_user(&app, &admin, &disabled.id, json!({ "status": "disabled" })).await;
    assert_eq!(response.status(), StatusCode::OK);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["status"], "disabled");
    assert_eq!(
        get_with(&app, &disabled.token, "/v1/dashboard").await,
        StatusCode::UNAUTHORIZED
    );
    assert_problem(
        refresh(&app, &disabled.refresh).await,
        StatusCode::UNAUTHORIZED,
    )
    .await;
    assert_problem(
        login(&app, &disabled.username, PASSWORD).await,
        StatusCode::UNAUTHORIZED,
    )
    .await;

    // Delete: the user is gone, their batch stays readable by admins.
    let response = app
        .client
        .delete(app.url(&format!("/v1/admin/users/{}", deleted.id)))
        .bearer_auth(&admin.token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    assert_eq!(
        get_with(&app, &deleted.token, "/v1/dashboard").await,
        StatusCode::UNAUTHORIZED
    );
    assert_problem(
        login(&app, &deleted.username, PASSWORD).await,
        StatusCode::UNAUTHORIZED,
    )
    .await;
    let batch = app
        .get_json(&admin, &format!("/v1/batches/{deleted_batch}"))
        .await;
    assert_eq!(batch["owner_id"], deleted.id.as_str());

    // Demote: the admin token stops working; a new login is a teacher's.
    let response = patch_user(&app, &admin, &demoted.id, json!({ "role": "teacher" })).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        get_with(&app, &demoted.token, &format!("/v1/batches/{kept_batch}")).await,
        StatusCode::UNAUTHORIZED
    );
    let relogin: Value = login(&app, &demoted.username, PASSWORD)
        .await
        .json()
        .await
        .unwrap();
    let as_teacher = relogin["access_token"].as_str().unwrap();
    assert_eq!(
        get_with(&app, as_teacher, &format!("/v1/batches/{kept_batch}")).await,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        get_with(&app, as_teacher, "/v1/admin/users").await,
        StatusCode::FORBIDDEN
    );

    // Their WebSocket connections are closed with 4403; the untouched user's stays open.
    let mut kept_ws = sockets.pop().unwrap();
    for mut ws in sockets {
        let frame = ws.closed().await;
        assert_eq!(u16::from(frame.code), 4403);
        assert_eq!(frame.reason.as_str(), "access revoked");
    }
    kept_ws
        .subscribe(&format!("batch:{kept_batch}"), None)
        .await;
    assert_eq!(kept_ws.next_json().await["type"], "subscribed");

    // Enabling again lets the user log in (old tokens stay dead).
    let response = patch_user(&app, &admin, &disabled.id, json!({ "status": "active" })).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        login(&app, &disabled.username, PASSWORD).await.status(),
        StatusCode::OK
    );
    assert_eq!(
        get_with(&app, &disabled.token, "/v1/dashboard").await,
        StatusCode::UNAUTHORIZED
    );

    // A deleted user cannot be changed; unknown ids are 404; bad patches 422; not JSON 415.
    let response = patch_user(&app, &admin, &deleted.id, json!({ "status": "active" })).await;
    assert_problem(response, StatusCode::CONFLICT).await;
    for id in [
        "not-a-uuid",
        "00000000-0000-0000-0000-000000000000",
        "a\u{0}b",
    ] {
        let response = patch_user(&app, &admin, id, json!({ "role": "admin" })).await;
        assert_problem(response, StatusCode::NOT_FOUND).await;
    }
    let response = patch_user(&app, &admin, &kept.id, json!({ "role": "root" })).await;
    assert_problem(response, StatusCode::UNPROCESSABLE_ENTITY).await;
    let response = patch_user(&app, &admin, &kept.id, json!({ "status": "deleted" })).await;
    assert_problem(response, StatusCode::UNPROCESSABLE_ENTITY).await;
    let response = app
        .client
        .patch(app.url(&format!("/v1/admin/users/{}", kept.id)))
        .bearer_auth(&admin.token)
        .header("content-type", "text/plain")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_problem(response, StatusCode::UNSUPPORTED_MEDIA_TYPE).await;
    // Teachers may not administer.
    let response = patch_user(&app, &kept, &kept.id, json!({ "role": "admin" })).await;
    assert_problem(response, StatusCode::FORBIDDEN).await;
    // A merge patch is an object; null removes a member, and role and status cannot go.
    let response = patch_user(&app, &admin, &kept.id, json!(["admin", "disabled"])).await;
    assert_problem(response, StatusCode::UNPROCESSABLE_ENTITY).await;
    let response = patch_user(&app, &admin, &kept.id, json!({ "role": null })).await;
    let problem = assert_problem(response, StatusCode::UNPROCESSABLE_ENTITY).await;
    assert_eq!(problem["errors"][0]["field"], "role");
    // A patch that changes nothing writes nothing (and is not audited).
    let response = patch_user(&app, &admin, &kept.id, json!({ "role": "teacher" })).await;
    assert_eq!(response.status(), StatusCode::OK);
    // The last active admin cannot be demoted, disabled or deleted.
    for body in [
        json!({ "role": "teacher" }),
        json!({ "status": "disabled" }),
    ] {
        let response = patch_user(&app, &admin, &admin.id, body).await;
        assert_problem(response, StatusCode::CONFLICT).await;
    }
    let response = app
        .client
        .delete(app.url(&format!("/v1/admin/users/{}", admin.id)))
        .bearer_auth(&admin.token)
        .send()
        .await
        .unwrap();
    assert_problem(response, StatusCode::CONFLICT).await;

    // Every change is in the audit log: who, what, when.
    let updates = audit_actions(&app, &admin, "user.update").await;
    assert_eq!(updates.len(), 3);
    for entry in &updates {
        assert_eq!(entry["actor"], admin.username.as_str());
        assert_eq!(entry["actor_id"], admin.id.as_str());
        assert_eq!(entry["client"], "127.0.0.1");
        assert!(chrono::DateTime::parse_from_rfc3339(entry["at"].as_str().unwrap()).is_ok());
    }
    let deletes = audit_actions(&app, &admin, "user.delete").await;
    assert_eq!(deletes.len(), 1);
    assert_eq!(deletes[0]["target"], deleted.id.as_str());
}

async fn admins_create_list_and_reset_users(engine: Engine) {
    let app = TestApp::spawn(engine).await;
    let admin = app.user(Role::Admin).await;
    let create = |body: Value| {
        app.client
            .post(app.url("/v1/admin/users"))
            .bearer_auth(&admin.token)
            .json(&body)
            .send()
    };
    let response = create(json!({ "username": "ada", "role": "teacher", "password": PASSWORD }))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    let ada: Value = response.json().await.unwrap();
    assert!(ada.get("password_hash").is_none());
    let again = create(json!({ "username": "ada", "role": "teacher", "password": PASSWORD }))
        .await
        .unwrap();
    assert_problem(again, StatusCode::CONFLICT).await;
    for (body, field) in [
        (
            json!({ "username": "a\u{0}b", "role": "teacher", "password": PASSWORD }),
            "username",
        ),
        (
            json!({ "username": "x".repeat(65), "role": "teacher", "password": PASSWORD }),
            "username",
        ),
        (
            json!({ "username": "bob", "role": "teacher", "password": "short" }),
            "password",
        ),
    ] {
        let problem = assert_problem(
            create(body).await.unwrap(),
            StatusCode::UNPROCESSABLE_ENTITY,
        )
        .await;
        assert_eq!(problem["errors"][0]["field"], field);
    }
    // Paged list, in username order.
    let first = app.get_json(&admin, "/v1/admin/users?limit=1").await;
    assert_eq!(first["items"].as_array().unwrap().len(), 1);
    let cursor = first["next_cursor"].as_str().unwrap();
    let rest = app
        .get_json(&admin, &format!("/v1/admin/users?after={cursor}&limit=500"))
        .await;
    let mut names: Vec<String> = first["items"]
        .as_array()
        .unwrap()
        .iter()
        .chain(rest["items"].as_array().unwrap())
        .map(|u| u["username"].as_str().unwrap().to_owned())
        .collect();
    assert!(names.contains(&"ada".to_owned()));
    let sorted = {
        let mut s = names.clone();
        s.sort();
        s
    };
    assert_eq!(names, sorted);
    names.dedup();
    assert_eq!(names.len(), 2);

    // A password reset ends every session.
    let session: Value = login(&app, "ada", PASSWORD).await.json().await.unwrap();
    let id = ada["id"].as_str().unwrap();
    let response = app
        .client
        .post(app.url(&format!("/v1/admin/users/{id}/password")))
        .bearer_auth(&admin.token)
        .json(&json!({ "password": "a brand new password" }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    assert_eq!(
        get_with(
            &app,
            session["access_token"].as_str().unwrap(),
            "/v1/dashboard"
        )
        .await,
        StatusCode::UNAUTHORIZED
    );
    assert_problem(login(&app, "ada", PASSWORD).await, StatusCode::UNAUTHORIZED).await;
    assert_eq!(
        login(&app, "ada", "a brand new password").await.status(),
        StatusCode::OK
    );
}

// ---- WebSocket token refresh ----------------------------------------------------------------

/// `user`'s access token with another expiry (the session and version stay real).
fn expiring(user: &User, seconds: i64) -> String {
    let now = chrono::Utc::now().timestamp();
    let mut claims = integration_tests::claims_of(&user.token);
    claims["exp"] = json!(now + seconds);
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(integration_tests::JWT_SECRET.as_bytes()),
    )
    .unwrap()
}

async fn a_websocket_refreshed_in_band_outlives_its_first_token(engine: Engine) {
    let app = TestApp::spawn(engine).await;
    let teacher = app.user(Role::Teacher).await;
    let other = app.user(Role::Teacher).await;
    let batch = app.register_batch(&teacher, 3).await["batch_id"]
        .as_str()
        .unwrap()
        .to_owned();
    app.wait_for_projections().await;
    let short = expiring(&teacher, 5);
    let url = ws_url(&app.address);
    let mut refreshed = WsClient::bearer(&url, &short).await;
    let mut expires = WsClient::bearer(&url, &short).await;
    for ws in [&mut refreshed, &mut expires] {
        ws.subscribe(&format!("batch:{batch}"), None).await;
        assert_eq!(ws.next_json().await["type"], "subscribed");
        assert_eq!(ws.next_json().await["type"], "snapshot");
    }
    // Tokens that are not a fresh token of this user are refused; the connection stays. (One
    // that expired a moment ago, within the signature check's clock leeway, too.)
    let just_expired = expiring(&teacher, -2);
    for token in [
        "garbage",
        other.token.as_str(),
        "a\u{0}b",
        just_expired.as_str(),
    ] {
        refreshed
            .send(json!({"type": "refresh", "token": token}))
            .await;
        let error = refreshed.next_json().await;
        assert_eq!(
            (error["type"].as_str(), error["code"].as_str()),
            (Some("error"), Some("invalid_token"))
        );
    }
    // A fresh token of the same user, from the refresh endpoint.
    let pair: Value = refresh(&app, &teacher.refresh).await.json().await.unwrap();
    refreshed
        .send(json!({"type": "refresh", "token": pair["access_token"]}))
        .await;
    let answer = refreshed.next_json().await;
    assert_eq!(answer["type"], "refreshed");
    assert!(answer["expires_in"].as_u64().unwrap() > 800);

    // The one that did not refresh closes when its token expires (1008)...
    let frame = expires.closed().await;
    assert_eq!(u16::from(frame.code), 1008);
    // ...and the refreshed one is still open with its subscription: a change arrives.
    let response = app.add_essays(&teacher, &batch, &["e1"]).await;
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let change = refreshed.next_json().await;
    assert_eq!(change["type"], "change");
    assert_eq!(change["topic"], format!("batch:{batch}"));
}

// ---- API keys -------------------------------------------------------------------------------

async fn api_keys_work_rotate_with_a_grace_period_and_revoke_at_once(engine: Engine) {
    let app = TestApp::spawn_with(engine, |s| s.auth.key_rotation_grace_secs = 2).await;
    let admin = app.user(Role::Admin).await;
    let service = app.user(Role::Service).await;
    let teacher = app.user(Role::Teacher).await;
    let post = |path: String, body: Value| {
        app.client
            .post(app.url(&path))
            .bearer_auth(&admin.token)
            .json(&body)
            .send()
    };
    // Keys belong to service users only.
    let refused = post(
        "/v1/admin/keys".into(),
        json!({ "user_id": teacher.id, "name": "x" }),
    )
    .await
    .unwrap();
    assert_problem(refused, StatusCode::UNPROCESSABLE_ENTITY).await;
    let response = post(
        "/v1/admin/keys".into(),
        json!({ "user_id": service.id, "name": "spellcheck" }),
    )
    .await
    .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    let created: Value = response.json().await.unwrap();
    let key = created["key"].as_str().unwrap().to_owned();
    let id = created["id"].as_str().unwrap().to_owned();
    assert!(key.starts_with(&format!("efk_{id}_")));

    // The key works on the results endpoint (a result for no batch: 404, past authentication;
    // a wrong key: 401).
    let result = |key: String| {
        let body = json!({
            "message_id": uuid::Uuid::new_v4(), "batch_id": uuid::Uuid::new_v4(),
            "essay_id": "e1", "phase": "spellcheck", "outcome": "succeeded", "result": {}
        });
        app.client
            .post(app.url("/v1/internal/results"))
            .header("X-API-Key", key)
            .json(&body)
            .send()
    };
    assert_eq!(
        result(key.clone()).await.unwrap().status(),
        StatusCode::NOT_FOUND
    );
    let mut wrong = key.clone();
    wrong.pop();
    wrong.push(if key.ends_with('A') { 'B' } else { 'A' });
    assert_eq!(
        result(wrong).await.unwrap().status(),
        StatusCode::UNAUTHORIZED
    );

    // Stored hashed: no column holds the key or its secret.
    let secret = key.rsplit('_').next().unwrap().to_owned();
    let rows = sqlx::query("SELECT id, key_hash, name FROM api_keys")
        .fetch_all(app.storage.pool())
        .await
        .unwrap();
    assert_eq!(rows.len(), 1);
    let stored: String = rows[0].get("key_hash");
    assert!(!stored.contains(&secret) && stored.len() == 64);
    // Its last use is recorded.
    wait_until(Duration::from_secs(10), || async {
        let listed = app.get_json(&admin, "/v1/admin/keys").await;
        !listed["items"][0]["last_used_at"].is_null()
    })
    .await;

    // Rotation: a new key; the old one works during the grace period, then not.
    let response = post(format!("/v1/admin/keys/{id}/rotate"), json!({}))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    let rotated: Value = response.json().await.unwrap();
    let new_key = rotated["key"].as_str().unwrap().to_owned();
    assert_ne!(new_key, key);
    let rotated_at = Instant::now();
    let old_status = result(key.clone()).await.unwrap().status();
    if rotated_at.elapsed() < Duration::from_millis(1500) {
        assert_eq!(
            old_status,
            StatusCode::NOT_FOUND,
            "the old key works during the grace"
        );
    }
    assert_eq!(
        result(new_key.clone()).await.unwrap().status(),
        StatusCode::NOT_FOUND
    );
    // A key is rotated once: its successor is the one to rotate next.
    let again = post(format!("/v1/admin/keys/{id}/rotate"), json!({}))
        .await
        .unwrap();
    assert_problem(again, StatusCode::CONFLICT).await;
    wait_until(Duration::from_secs(10), || async {
        result(key.clone()).await.unwrap().status() == StatusCode::UNAUTHORIZED
    })
    .await;
    assert!(rotated_at.elapsed() >= Duration::from_secs(1));

    // Revocation: at once, on the next request.
    let new_id = rotated["id"].as_str().unwrap();
    let response = app
        .client
        .delete(app.url(&format!("/v1/admin/keys/{new_id}")))
        .bearer_auth(&admin.token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    assert_eq!(
        result(new_key.clone()).await.unwrap().status(),
        StatusCode::UNAUTHORIZED
    );
    for action in ["key.create", "key.rotate", "key.revoke"] {
        assert_eq!(
            audit_actions(&app, &admin, action).await.len(),
            1,
            "{action}"
        );
    }
}

// ---- the CLI changes a running server -------------------------------------------------------

async fn a_change_made_with_the_cli_reaches_the_running_server(engine: Engine) {
    let app = TestApp::spawn(engine).await;
    let teacher = app.user(Role::Teacher).await;
    let service = app.user(Role::Service).await;
    let mut ws = app.ws(&teacher).await;
    ws.subscribe("dashboard", None).await;
    assert_eq!(ws.next_json().await["type"], "subscribed");
    let cli = |args: &[&str]| {
        let output = std::process::Command::new(essayflow_binary())
            .args(args)
            .env("ESSAYFLOW_DATABASE_URL", &app.db.url)
            .env("ESSAYFLOW_JWT_SECRET", integration_tests::JWT_SECRET)
            .env("ESSAYFLOW_LOG", "warn")
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).unwrap()
    };
    // A key made with the CLI works on the server at once (nothing cached yet).
    let key = cli(&[
        "keys",
        "create",
        "--username",
        &service.username,
        "--name",
        "cli",
    ]);
    let key = key.trim().to_owned();
    let status = app
        .client
        .get(app.url("/v1/batches"))
        .header("x-api-key", &key)
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(status, StatusCode::OK);
    // Disabling with the CLI (another process) reaches the server within a poll: requests
    // are refused and the WebSocket closes.
    assert_eq!(
        get_with(&app, &teacher.token, "/v1/dashboard").await,
        StatusCode::OK
    );
    cli(&["users", "disable", "--username", &teacher.username]);
    wait_until(Duration::from_secs(5), || async {
        get_with(&app, &teacher.token, "/v1/dashboard").await == StatusCode::UNAUTHORIZED
    })
    .await;
    assert_eq!(u16::from(ws.closed().await.code), 4403);
    let listed = cli(&["users", "list"]);
    assert!(
        listed
            .lines()
            .any(|l| l.contains(&teacher.username) && l.contains("disabled"))
    );
    let id = key.split('_').nth(1).unwrap().to_owned();
    cli(&["keys", "revoke", "--id", &id]);
    wait_until(Duration::from_secs(5), || async {
        let status = app
            .client
            .get(app.url("/v1/batches"))
            .header("x-api-key", &key)
            .send()
            .await
            .unwrap()
            .status();
        status == StatusCode::UNAUTHORIZED
    })
    .await;
    let audit = cli(&["audit", "--action", "user.update"]);
    assert!(audit.contains("cli:"), "{audit}");
    assert!(audit.contains(&teacher.id), "{audit}");
}

// ---- abuse ----------------------------------------------------------------------------------

async fn failed_logins_are_throttled_per_account_and_address(engine: Engine) {
    let app = TestApp::spawn_with(engine, |s| {
        s.auth.login_free_failures_per_account = 3;
        s.auth.login_base_delay_ms = 60_000;
    })
    .await;
    let teacher = app.user(Role::Teacher).await;
    let other = app.user(Role::Teacher).await;
    for _ in 0..3 {
        assert_problem(
            login(&app, &teacher.username, "wrong password!").await,
            StatusCode::UNAUTHORIZED,
        )
        .await;
    }
    // Locked: even the right password waits; the answer says how long.
    let response = login(&app, &teacher.username, PASSWORD).await;
    let retry: u64 = response.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((50..=60).contains(&retry), "{retry}");
    let problem = assert_problem(response, StatusCode::TOO_MANY_REQUESTS).await;
    assert_eq!(problem["type"], "urn:essayflow:problem:login-throttled");
    // Unknown usernames are throttled alike (no difference to observe).
    for _ in 0..3 {
        login(&app, "nobody-at-all", "wrong password!").await;
    }
    assert_eq!(
        login(&app, "nobody-at-all", "wrong password!")
            .await
            .status(),
        StatusCode::TOO_MANY_REQUESTS
    );
    // Another account from the same address is not locked, and the guessed account's owner,
    // from another address, still logs in (one guesser locks the account only for itself).
    assert_eq!(
        login(&app, &other.username, PASSWORD).await.status(),
        StatusCode::OK
    );
    let elsewhere = reqwest::Client::builder()
        .local_address(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 3)))
        .build()
        .unwrap();
    let owner = elsewhere
        .post(app.url("/v1/auth/login"))
        .json(&json!({ "username": teacher.username, "password": PASSWORD }))
        .send()
        .await
        .unwrap();
    assert_eq!(owner.status(), StatusCode::OK);
    assert!(metric(&app, "essayflow_logins_throttled_total").await >= 2.0);
}

async fn unusable_usernames_are_an_ordinary_401(engine: Engine) {
    let app = TestApp::spawn(engine).await;
    let teacher = app.user(Role::Teacher).await;
    let wrong = assert_problem(
        login(&app, &teacher.username, "wrong password!").await,
        StatusCode::UNAUTHORIZED,
    )
    .await;
    let long = "x".repeat(10_000);
    for username in ["nul\u{0}byte", "\u{0}", long.as_str(), "émile", ""] {
        let problem = assert_problem(
            login(&app, username, PASSWORD).await,
            StatusCode::UNAUTHORIZED,
        )
        .await;
        assert_eq!(problem, wrong, "{username:?}");
    }
    // A password with U+0000 is just a wrong password.
    assert_problem(
        login(&app, &teacher.username, "pass\u{0}word").await,
        StatusCode::UNAUTHORIZED,
    )
    .await;
}

fn median_ms(times: &mut [f64]) -> f64 {
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_login_takes_as_long_for_an_unknown_user_as_for_a_wrong_password() {
    let app = TestApp::spawn_with(Engine::Postgres, |s| {
        s.auth.login_free_failures_per_account = 1000;
        s.auth.login_free_failures_per_address = 1000;
    })
    .await;
    let teacher = app.user(Role::Teacher).await;
    let (mut known, mut unknown) = (Vec::new(), Vec::new());
    // Warm both paths, then interleave so that drift affects both alike.
    login(&app, &teacher.username, "wrong password!").await;
    login(&app, "nobody-at-all", "wrong password!").await;
    for i in 0..40 {
        // Alternate which goes first, so that nothing about order favours one side.
        let mut pair = [
            (teacher.username.as_str(), &mut known),
            ("nobody-at-all", &mut unknown),
        ];
        if i % 2 == 1 {
            pair.reverse();
        }
        for (username, times) in pair {
            let started = Instant::now();
            let response = login(&app, username, &format!("wrong password {i}")).await;
            times.push(started.elapsed().as_secs_f64() * 1000.0);
            assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        }
    }
    let (known, unknown) = (median_ms(&mut known), median_ms(&mut unknown));
    // Both are dominated by one argon2id hash; the difference is noise.
    assert!(
        (known - unknown).abs() <= (0.25 * known.max(unknown)).max(3.0),
        "median wrong password {known:.1} ms, unknown user {unknown:.1} ms"
    );
    eprintln!("median wrong password {known:.1} ms, unknown user {unknown:.1} ms");
    assert!(
        known > 5.0 && unknown > 5.0,
        "a hash was computed: {known:.1} / {unknown:.1} ms"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_login_flood_stays_within_the_hashing_bound_and_others_still_log_in() {
    let app = TestApp::spawn_with(Engine::Sqlite, |s| {
        s.auth.hash_workers = 1;
        s.auth.hash_queue = 16;
    })
    .await;
    let victim = app.user(Role::Teacher).await;
    let teacher = app.user(Role::Teacher).await;
    let hashes_before = metric(&app, "essayflow_password_hashes_total").await;
    // 1 000 parallel wrong-password logins from 127.0.0.1, each abandoned after 50 ms.
    let flood = reqwest::Client::builder()
        .timeout(Duration::from_millis(50))
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let url = app.url("/v1/auth/login");
    let attempts: Vec<_> = (0..1000)
        .map(|i| {
            let request = flood.post(&url).json(&json!({
                "username": victim.username, "password": format!("guess {i}")
            }));
            tokio::spawn(async move { request.send().await.map(|r| r.status()) })
        })
        .collect();
    // Meanwhile another client (127.0.0.2) logs in, and the liveness probe answers quickly.
    let elsewhere = reqwest::Client::builder()
        .local_address(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2)))
        .build()
        .unwrap();
    let started = Instant::now();
    let response = elsewhere
        .post(&url)
        .json(&json!({ "username": teacher.username, "password": PASSWORD }))
        .send()
        .await
        .unwrap();
    let login_took = started.elapsed();
    assert_eq!(response.status(), StatusCode::OK);
    assert!(
        login_took < Duration::from_secs(2),
        "the login took {login_took:?}"
    );
    let started = Instant::now();
    assert_eq!(
        elsewhere
            .get(app.url("/healthz"))
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::OK
    );
    assert!(started.elapsed() < Duration::from_millis(500));
    let mut answered = 0;
    for attempt in attempts {
        if let Ok(status) = attempt.await.unwrap() {
            assert!(
                [
                    StatusCode::UNAUTHORIZED,
                    StatusCode::TOO_MANY_REQUESTS,
                    StatusCode::SERVICE_UNAVAILABLE
                ]
                .contains(&status),
                "{status}"
            );
            answered += 1;
        }
    }
    // The bound held: never more than one hash at once, and the abandoned attempts did not
    // leave work behind (at most the workers and the queue's worth past the throttle).
    wait_until(Duration::from_secs(10), || async {
        metric(&app, "essayflow_password_hashing").await == 0.0
    })
    .await;
    assert_eq!(metric(&app, "essayflow_password_hashing_peak").await, 1.0);
    let hashed = metric(&app, "essayflow_password_hashes_total").await - hashes_before;
    assert!(
        hashed < 60.0,
        "{hashed} hashes for 1 000 attempts ({answered} answered in 50 ms)"
    );
}

both_engines!(
    refresh_rotates_and_a_reused_refresh_token_revokes_the_session,
    refresh_tokens_lapse_when_idle_and_sessions_end_at_their_absolute_lifetime,
    logout_revokes_the_session_and_its_tokens,
    disabled_deleted_and_demoted_users_lose_access_on_their_next_request,
    admins_create_list_and_reset_users,
    a_websocket_refreshed_in_band_outlives_its_first_token,
    api_keys_work_rotate_with_a_grace_period_and_revoke_at_once,
    a_change_made_with_the_cli_reaches_the_running_server,
    failed_logins_are_throttled_per_account_and_address,
    unusable_usernames_are_an_ordinary_401,
);
