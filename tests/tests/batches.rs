//! The command and query loop over HTTP: register, add essays, read back (read-your-writes),
//! list, dashboard, history, time travel, ETags and ownership.
#![allow(clippy::unwrap_used)]

use api::auth::Role;
use commands::Engine;
use integration_tests::{TestApp, assert_problem, both_engines};
use reqwest::StatusCode;
use serde_json::{Value, json};

async fn a_registered_batch_with_its_essays_reads_back_as_written(engine: Engine) {
    let app = TestApp::spawn(engine).await;
    let teacher = app.user(Role::Teacher).await;

    let response = app
        .post(
            &teacher,
            "/v1/batches",
            &json!({ "title": "Argument essays", "course_code": "EN_101-b", "expected_essay_count": 2 }),
        )
        .await;
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let location = response.headers()["location"].to_str().unwrap().to_owned();
    let registered: Value = response.json().await.unwrap();
    let id = registered["batch_id"].as_str().unwrap();
    assert_eq!(location, format!("/v1/batches/{id}"));
    assert!(registered["correlation_id"].as_str().is_some());
    assert!(registered["position"].as_i64().unwrap() > 0);

    let added = app.add_essays(&teacher, id, &["e1", "e2"]).await;
    assert_eq!(added.status(), StatusCode::ACCEPTED);
    let added: Value = added.json().await.unwrap();
    assert_eq!(
        added["version"], 3,
        "EssaysAdded and BatchReadyForProcessing"
    );

    let batch = app
        .batch(&teacher, id, added["position"].as_i64().unwrap())
        .await;
    assert_eq!(batch["title"], "Argument essays");
    assert_eq!(batch["course_code"], "EN_101-b");
    assert_eq!(batch["status"], "ready");
    assert_eq!(batch["version"], 3);
    let essays: Vec<&str> = batch["essays"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["essay_id"].as_str().unwrap())
        .collect();
    assert_eq!(essays, ["e1", "e2"]);

    let status: Value = app
        .get_json(&teacher, &format!("/v1/batches/{id}/status"))
        .await;
    assert_eq!(status["status"], "ready");
    assert_eq!(status["essays_added"], 2);

    let events = app.events(&teacher, id).await;
    let types: Vec<&str> = events
        .iter()
        .map(|e| e["event_type"].as_str().unwrap())
        .collect();
    assert_eq!(
        types,
        ["BatchRegistered", "EssaysAdded", "BatchReadyForProcessing"]
    );
    assert_eq!(events[1]["user_id"], teacher.id);
    assert_eq!(events[1]["correlation_id"], added["correlation_id"]);

    let first: Value = app
        .get_json(&teacher, &format!("/v1/batches/{id}?at_version=1"))
        .await;
    assert_eq!(first["status"], "registered");
    assert_eq!(first["essays"].as_array().unwrap().len(), 0);
    assert_eq!(first["version"], 1);
    let beyond = app
        .get(&teacher, &format!("/v1/batches/{id}?at_version=9"))
        .await;
    assert_problem(beyond, StatusCode::BAD_REQUEST).await;
}

async fn a_pipeline_request_is_accepted_once_every_essay_is_added(engine: Engine) {
    let app = TestApp::spawn(engine).await;
    let teacher = app.user(Role::Teacher).await;
    let id = app.register_batch(&teacher, 1).await["batch_id"]
        .as_str()
        .unwrap()
        .to_owned();

    let early = app
        .post(
            &teacher,
            &format!("/v1/batches/{id}/pipelines"),
            &json!({ "pipeline": "nlp" }),
        )
        .await;
    let body = assert_problem(early, StatusCode::CONFLICT).await;
    assert_eq!(body["type"], "urn:essayflow:problem:essays-incomplete");

    app.add_essays(&teacher, &id, &["only"]).await;
    let unknown = app
        .post(
            &teacher,
            &format!("/v1/batches/{id}/pipelines"),
            &json!({ "pipeline": "translation" }),
        )
        .await;
    let body = assert_problem(unknown, StatusCode::UNPROCESSABLE_ENTITY).await;
    assert_eq!(body["errors"][0]["field"], "pipeline");

    let request_id = uuid::Uuid::new_v4();
    let requested = app
        .post(
            &teacher,
            &format!("/v1/batches/{id}/pipelines"),
            &json!({ "pipeline": "ai_feedback", "request_id": request_id }),
        )
        .await;
    assert_eq!(requested.status(), StatusCode::ACCEPTED);
    let requested: Value = requested.json().await.unwrap();
    assert_eq!(requested["request_id"], request_id.to_string());

    // The same request id again is accepted and changes nothing (the conductor may have
    // appended its own events in between: count the requests).
    let again = app
        .post(
            &teacher,
            &format!("/v1/batches/{id}/pipelines"),
            &json!({ "pipeline": "ai_feedback", "request_id": request_id }),
        )
        .await;
    assert_eq!(again.status(), StatusCode::ACCEPTED);
    let types = app.event_types(&teacher, &id).await;
    assert_eq!(
        types.iter().filter(|t| *t == "PipelineRequested").count(),
        1
    );

    let batch = app
        .batch(&teacher, &id, requested["position"].as_i64().unwrap())
        .await;
    assert_eq!(batch["status"], "processing");
    assert_eq!(batch["pipeline"]["requested"], "ai_feedback");

    let cancelled = app
        .post(
            &teacher,
            &format!("/v1/batches/{id}/cancel"),
            &json!({ "reason": "wrong class" }),
        )
        .await;
    assert_eq!(cancelled.status(), StatusCode::ACCEPTED);
    let position = cancelled.json::<Value>().await.unwrap()["position"]
        .as_i64()
        .unwrap();
    let batch = app.batch(&teacher, &id, position).await;
    assert_eq!(batch["status"], "cancelled");
    assert_eq!(batch["cancel_reason"], "wrong class");
    let twice = app
        .post(&teacher, &format!("/v1/batches/{id}/cancel"), &json!({}))
        .await;
    assert_problem(twice, StatusCode::CONFLICT).await;
}

async fn owners_see_only_their_batches_and_admins_see_all(engine: Engine) {
    let app = TestApp::spawn(engine).await;
    let alice = app.user(Role::Teacher).await;
    let bob = app.user(Role::Teacher).await;
    let admin = app.user(Role::Admin).await;
    let alices = app.register_batch(&alice, 3).await;
    let id = alices["batch_id"].as_str().unwrap();
    let position = alices["position"].as_i64().unwrap();
    let bobs = app.register_batch(&bob, 3).await;

    // Bob gets exactly what a missing batch gets, for reads and for commands.
    for path in [
        format!("/v1/batches/{id}?min_position={position}"),
        format!("/v1/batches/{id}/status"),
        format!("/v1/batches/{id}/events"),
        format!("/v1/batches/{id}?at_version=1"),
        format!("/v1/batches/{}", uuid::Uuid::new_v4()),
    ] {
        assert_problem(app.get(&bob, &path).await, StatusCode::NOT_FOUND).await;
    }
    let before = app.event_count().await;
    let add = app.add_essays(&bob, id, &["x"]).await;
    assert_problem(add, StatusCode::NOT_FOUND).await;
    let cancel = app
        .post(&bob, &format!("/v1/batches/{id}/cancel"), &json!({}))
        .await;
    assert_problem(cancel, StatusCode::NOT_FOUND).await;
    assert_eq!(app.event_count().await, before, "nothing appended");

    assert_eq!(app.batch(&admin, id, position).await["owner_id"], alice.id);
    let last = bobs["position"].as_i64().unwrap();
    let listed: Value = app
        .get_json(&admin, &format!("/v1/batches?min_position={last}"))
        .await;
    assert_eq!(listed["items"].as_array().unwrap().len(), 2);
    let listed: Value = app.get_json(&bob, "/v1/batches").await;
    assert_eq!(listed["items"].as_array().unwrap().len(), 1);
    assert_eq!(listed["items"][0]["owner_id"], bob.id);
}

async fn listing_pages_through_every_batch_newest_first(engine: Engine) {
    let app = TestApp::spawn(engine).await;
    let teacher = app.user(Role::Teacher).await;
    let mut ids = Vec::new();
    let mut last = 0;
    for _ in 0..5 {
        let r = app.register_batch(&teacher, 2).await;
        ids.push(r["batch_id"].as_str().unwrap().to_owned());
        last = r["position"].as_i64().unwrap();
    }
    let filled = app.add_essays(&teacher, &ids[0], &["a", "b"]).await;
    last = last.max(
        filled.json::<Value>().await.unwrap()["position"]
            .as_i64()
            .unwrap(),
    );

    let mut seen = Vec::new();
    let mut path = format!("/v1/batches?limit=2&min_position={last}");
    loop {
        let page: Value = app.get_json(&teacher, &path).await;
        for item in page["items"].as_array().unwrap() {
            seen.push(item["batch_id"].as_str().unwrap().to_owned());
        }
        match page["next_cursor"].as_str() {
            Some(cursor) => path = format!("/v1/batches?limit=2&cursor={cursor}"),
            None => break,
        }
    }
    ids.reverse();
    assert_eq!(seen, ids);

    let ready: Value = app.get_json(&teacher, "/v1/batches?status=ready").await;
    assert_eq!(ready["items"].as_array().unwrap().len(), 1);
    let bad = app.get(&teacher, "/v1/batches?status=finished").await;
    assert_eq!(
        assert_problem(bad, StatusCode::BAD_REQUEST).await["errors"][0]["field"],
        "status"
    );
    let bad = app.get(&teacher, "/v1/batches?limit=0").await;
    assert_problem(bad, StatusCode::BAD_REQUEST).await;
    let bad = app.get(&teacher, "/v1/batches?limit=many").await;
    assert_problem(bad, StatusCode::BAD_REQUEST).await;
}

async fn the_dashboard_counts_batches_by_status_and_shows_recent_activity(engine: Engine) {
    let app = TestApp::spawn(engine).await;
    let teacher = app.user(Role::Teacher).await;
    let a = app.register_batch(&teacher, 1).await;
    app.register_batch(&teacher, 1).await;
    let filled = app
        .add_essays(&teacher, a["batch_id"].as_str().unwrap(), &["e"])
        .await;
    let position = filled.json::<Value>().await.unwrap()["position"]
        .as_i64()
        .unwrap();

    let dashboard: Value = app
        .get_json(&teacher, &format!("/v1/dashboard?min_position={position}"))
        .await;
    assert_eq!(dashboard["totals"], json!({ "ready": 1, "registered": 1 }));
    assert_eq!(dashboard["active_batches"].as_array().unwrap().len(), 2);
    let activity: Vec<&str> = dashboard["recent_activity"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["event_type"].as_str().unwrap())
        .collect();
    assert_eq!(
        activity,
        [
            "BatchReadyForProcessing",
            "EssaysAdded",
            "BatchRegistered",
            "BatchRegistered"
        ]
    );
}

async fn an_etag_answers_304_until_the_batch_changes(engine: Engine) {
    let app = TestApp::spawn(engine).await;
    let teacher = app.user(Role::Teacher).await;
    let r = app.register_batch(&teacher, 2).await;
    let id = r["batch_id"].as_str().unwrap();
    let path = format!("/v1/batches/{id}?min_position={}", r["position"]);
    let first = app.get(&teacher, &path).await;
    let etag = first.headers()["etag"].to_str().unwrap().to_owned();
    let again = app
        .client
        .get(app.url(&path))
        .bearer_auth(&teacher.token)
        .header("if-none-match", &etag)
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), StatusCode::NOT_MODIFIED);

    let added = app
        .add_essays(&teacher, id, &["one"])
        .await
        .json::<Value>()
        .await
        .unwrap();
    let changed = app
        .client
        .get(app.url(&format!(
            "/v1/batches/{id}?min_position={}",
            added["position"]
        )))
        .bearer_auth(&teacher.token)
        .header("if-none-match", &etag)
        .send()
        .await
        .unwrap();
    assert_eq!(changed.status(), StatusCode::OK);
    assert_ne!(changed.headers()["etag"].to_str().unwrap(), etag);
}

async fn health_readiness_and_metrics_answer(engine: Engine) {
    let app = TestApp::spawn(engine).await;
    let health = app.get_public("/healthz").await;
    assert_eq!(health.status(), StatusCode::OK);
    // Anonymous readiness is the status alone; the detail is on the operations listener.
    let ready: Value = app.get_public("/readyz").await.json().await.unwrap();
    assert_eq!(ready, json!({ "status": "ready" }));
    let ready: Value = app.get_ops("/readyz").await.json().await.unwrap();
    assert_eq!(ready["status"], "ready");
    assert_eq!(ready["checks"]["database"]["status"], "ok");
    let teacher = app.user(Role::Teacher).await;
    app.register_batch(&teacher, 1).await;
    let metrics = app.get_ops("/metrics").await.text().await.unwrap();
    assert!(
        metrics
            .contains("essayflow_commands_total{command=\"RegisterBatch\",outcome=\"accepted\"} 1"),
        "{metrics}"
    );
    let admin = app.user(Role::Admin).await;
    app.wait_for_projections().await;
    let projections: Value = app.get_json(&admin, "/v1/admin/projections").await;
    assert_eq!(projections[0]["name"], "batch_state");
    assert_eq!(projections[0]["lag"], 0);
    assert_eq!(projections[0]["state"], "live");
    let forbidden = app.get(&teacher, "/v1/admin/projections").await;
    assert_problem(forbidden, StatusCode::FORBIDDEN).await;
    let nowhere = app.get(&teacher, "/v1/nowhere").await;
    assert_problem(nowhere, StatusCode::NOT_FOUND).await;
    let wrong_method = app
        .client
        .delete(app.url("/v1/batches"))
        .bearer_auth(&teacher.token)
        .send()
        .await
        .unwrap();
    assert_problem(wrong_method, StatusCode::METHOD_NOT_ALLOWED).await;

    let openapi: Value = app.get_public("/openapi.json").await.json().await.unwrap();
    assert!(openapi["openapi"].as_str().unwrap().starts_with("3."));
    for path in [
        "/v1/auth/login",
        "/v1/batches",
        "/v1/batches/{id}",
        "/v1/batches/{id}/essays",
        "/v1/dashboard",
        "/v1/internal/results",
    ] {
        assert!(
            openapi["paths"][path].is_object(),
            "{path} is not documented"
        );
    }
    // Both security schemes exist, and every operation under /v1 but login and refresh names
    // both (either credential works); login and refresh name none.
    let schemes = &openapi["components"]["securitySchemes"];
    assert_eq!(schemes["bearer"]["scheme"], "bearer");
    assert_eq!(schemes["api_key"]["in"], "header");
    assert_eq!(schemes["api_key"]["name"], "X-API-Key");
    for (path, item) in openapi["paths"].as_object().unwrap() {
        for (method, operation) in item.as_object().unwrap() {
            let security = operation["security"].as_array();
            let names: Vec<String> = security
                .into_iter()
                .flatten()
                .flat_map(|s| s.as_object().unwrap().keys().cloned())
                .collect();
            if path == "/v1/auth/login" || path == "/v1/auth/refresh" {
                assert!(names.is_empty(), "{method} {path}: {names:?}");
            } else if path.starts_with("/v1/") {
                assert!(
                    names.contains(&"bearer".to_owned()) && names.contains(&"api_key".to_owned()),
                    "{method} {path} declares {names:?}"
                );
            }
        }
    }
    for path in [
        "/v1/auth/refresh",
        "/v1/auth/logout",
        "/v1/admin/users",
        "/v1/admin/users/{id}",
        "/v1/admin/users/{id}/password",
        "/v1/admin/keys",
        "/v1/admin/keys/{id}",
        "/v1/admin/keys/{id}/rotate",
        "/v1/admin/audit",
    ] {
        assert!(
            openapi["paths"][path].is_object(),
            "{path} is not documented"
        );
    }
    let result = &openapi["components"]["schemas"]["ResultMessage"]["properties"];
    for field in [
        "message_id",
        "batch_id",
        "essay_id",
        "phase",
        "outcome",
        "result",
        "error",
    ] {
        assert!(
            result[field].is_object(),
            "ResultMessage.{field} is not documented"
        );
    }
    let docs = app.get_public("/docs/").await;
    assert_eq!(docs.status(), StatusCode::OK);
    assert!(docs.text().await.unwrap().contains("swagger"));
    app.stop().await;
}

both_engines!(
    a_registered_batch_with_its_essays_reads_back_as_written,
    a_pipeline_request_is_accepted_once_every_essay_is_added,
    owners_see_only_their_batches_and_admins_see_all,
    listing_pages_through_every_batch_newest_first,
    the_dashboard_counts_batches_by_status_and_shows_recent_activity,
    an_etag_answers_304_until_the_batch_changes,
    health_readiness_and_metrics_answer,
);
