//! The audit log beyond logins and user administration: refused requests (a bad credential,
//! a role that may not, someone else's batch) tallied into one record per kind with its count,
//! projection rebuilds and verifications, and the query filters (`outcome`, `since`), on both
//! engines. Refusals are written every ten seconds and at shutdown; these tests restart the
//! server to have them written at once.
#![allow(clippy::unwrap_used)]

use api::auth::Role;
use commands::Engine;
use integration_tests::{TestApp, User, assert_problem, both_engines};
use reqwest::StatusCode;
use serde_json::Value;

async fn audit(app: &TestApp, admin: &User, query: &str) -> Vec<Value> {
    let response = app.get(admin, &format!("/v1/admin/audit?{query}")).await;
    assert_eq!(response.status(), StatusCode::OK, "{query}");
    let page: Value = response.json().await.unwrap();
    page["items"].as_array().unwrap().clone()
}

async fn refused_requests_are_audited_with_their_count_actor_and_reason(engine: Engine) {
    let app = TestApp::spawn(engine).await;
    let admin = app.user(Role::Admin).await;
    let owner = app.user(Role::Teacher).await;
    let other = app.user(Role::Teacher).await;
    let batch = app.register_batch(&owner, 3).await;
    let batch_id = batch["batch_id"].as_str().unwrap().to_owned();
    app.wait_for_projections().await;

    // Five requests with a token that is not valid: one record, counted five times.
    for _ in 0..5 {
        let response = app
            .client
            .get(app.url("/v1/batches"))
            .bearer_auth("not-a-token")
            .send()
            .await
            .unwrap();
        assert_problem(response, StatusCode::UNAUTHORIZED).await;
    }
    // A teacher on an admin route: 403.
    assert_problem(
        app.get(&other, "/v1/admin/users").await,
        StatusCode::FORBIDDEN,
    )
    .await;
    // Another teacher's batch: a 404 exactly like a missing one, audited as a denial.
    let hidden = app.get(&other, &format!("/v1/batches/{batch_id}")).await;
    let hidden = assert_problem(hidden, StatusCode::NOT_FOUND).await;
    let missing = app
        .get(&other, "/v1/batches/00000000-0000-4000-8000-000000000000")
        .await;
    let missing = assert_problem(missing, StatusCode::NOT_FOUND).await;
    assert_eq!(hidden["type"], missing["type"]);
    assert_eq!(hidden["detail"], missing["detail"]);
    // A failed login is audited by the login flow, not twice.
    let response = app
        .client
        .post(app.url("/v1/auth/login"))
        .json(&serde_json::json!({ "username": other.username, "password": "wrong password" }))
        .send()
        .await
        .unwrap();
    assert_problem(response, StatusCode::UNAUTHORIZED).await;

    // Refusals are written every ten seconds and at shutdown.
    let app = app.restart(|_| {}).await;

    let refused = audit(&app, &admin, "action=auth.refused").await;
    assert_eq!(refused.len(), 1, "{refused:#?}");
    let record = &refused[0];
    assert_eq!(record["actor"], "anonymous");
    assert_eq!(record["outcome"], "refused");
    assert_eq!(record["target"], "GET /v1/batches");
    assert_eq!(record["client"], "127.0.0.1");
    assert_eq!(record["detail"]["count"], 5);
    assert_eq!(record["detail"]["status"], 401);
    assert!(record["detail"]["reason"].as_str().unwrap().len() > 3);

    let denied = audit(&app, &admin, "action=access.denied").await;
    assert_eq!(denied.len(), 2, "{denied:#?}");
    let by_target = |target: &str| {
        denied
            .iter()
            .find(|r| r["target"] == target)
            .unwrap_or_else(|| panic!("no denial of {target}: {denied:#?}"))
            .clone()
    };
    let forbidden = by_target("GET /v1/admin/users");
    assert_eq!(forbidden["actor"], other.username);
    assert_eq!(forbidden["actor_id"], other.id);
    assert_eq!(forbidden["detail"]["status"], 403);
    let someone_elses = by_target(&format!("GET /v1/batches/{batch_id}"));
    assert_eq!(someone_elses["actor"], other.username);
    assert_eq!(someone_elses["detail"]["status"], 404);
    assert_eq!(someone_elses["detail"]["reason"], "another user's batch");
    // The missing batch is not a denial.
    assert!(
        denied
            .iter()
            .all(|r| r["target"] != "GET /v1/batches/00000000-0000-4000-8000-000000000000")
    );
    assert_eq!(audit(&app, &admin, "action=login.failed").await.len(), 1);

    // Filters: by outcome, and by time.
    let all_refused = audit(&app, &admin, "outcome=refused&limit=500").await;
    assert!(all_refused.len() >= 4, "{all_refused:#?}");
    assert!(all_refused.iter().all(|r| r["outcome"] == "refused"));
    assert!(
        audit(&app, &admin, "since=2999-01-01T00:00:00Z")
            .await
            .is_empty()
    );
    assert!(
        !audit(&app, &admin, "since=2000-01-01T00:00:00Z")
            .await
            .is_empty()
    );
    let bad = app.get(&admin, "/v1/admin/audit?since=yesterday").await;
    let bad = assert_problem(bad, StatusCode::BAD_REQUEST).await;
    assert!(bad["detail"].as_str().unwrap().contains("since"), "{bad}");
    let bad = app.get(&admin, "/v1/admin/audit?outcome=maybe").await;
    assert_problem(bad, StatusCode::BAD_REQUEST).await;
    app.stop().await;
}

async fn rebuilds_and_verifications_are_audited(engine: Engine) {
    let app = TestApp::spawn(engine).await;
    let admin = app.user(Role::Admin).await;
    let post = |path: &'static str| app.post(&admin, path, &Value::Null);
    let response = post("/v1/admin/projections/dashboard/verify").await;
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let response = post("/v1/admin/projections/batch_state/rebuild").await;
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let response = post("/v1/admin/projections/nonesuch/rebuild").await;
    assert_problem(response, StatusCode::NOT_FOUND).await;

    let verifies = audit(&app, &admin, "action=projection.verify").await;
    assert_eq!(verifies.len(), 1, "{verifies:#?}");
    assert_eq!(verifies[0]["target"], "dashboard");
    assert_eq!(verifies[0]["outcome"], "ok");
    assert_eq!(verifies[0]["actor"], admin.username);
    assert_eq!(verifies[0]["client"], "127.0.0.1");
    let rebuilds = audit(&app, &admin, "action=projection.rebuild").await;
    assert_eq!(rebuilds.len(), 2, "{rebuilds:#?}");
    assert_eq!(rebuilds[0]["target"], "nonesuch");
    assert_eq!(rebuilds[0]["outcome"], "refused");
    assert!(
        rebuilds[0]["detail"]["reason"]
            .as_str()
            .unwrap()
            .contains("nonesuch")
    );
    assert_eq!(rebuilds[1]["target"], "batch_state");
    assert_eq!(rebuilds[1]["outcome"], "ok");
    app.stop().await;
}

both_engines!(
    refused_requests_are_audited_with_their_count_actor_and_reason,
    rebuilds_and_verifications_are_audited,
);
