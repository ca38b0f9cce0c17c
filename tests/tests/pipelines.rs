//! Pipelines on the embedded bus (no Kafka): the conductor drives phases, the development
//! processor or the HTTP twin of the results topic reports results. Both engines.
#![allow(clippy::unwrap_used)]

use api::auth::Role;
use commands::Engine;
use integration_tests::pipeline::{result, result_of_size};
use integration_tests::{TestApp, assert_problem, both_engines};
use reqwest::StatusCode;
use serde_json::{Value, json};

async fn with_simulator(engine: Engine, failure_rate: f64) -> TestApp {
    TestApp::spawn_with(engine, |s| {
        s.simulate_processors = true;
        s.simulator_latency_ms = 0;
        s.simulator_failure_rate = failure_rate;
    })
    .await
}

fn strings(value: &Value) -> Vec<&str> {
    value
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect()
}

async fn a_pipeline_runs_to_completion_with_the_development_processor(engine: Engine) {
    let app = with_simulator(engine, 0.0).await;
    let teacher = app.user(Role::Teacher).await;
    let id = app.ready_batch(&teacher, &["e1", "e2", "e3"]).await;

    let requested = app.request_pipeline(&teacher, &id, "ai_feedback").await;
    let status = app.wait_for_status(&teacher, &id, "completed").await;
    assert_eq!(
        strings(&status["pipeline"]["steps"]),
        ["spellcheck", "nlp", "ai_feedback"]
    );
    assert_eq!(
        strings(&status["pipeline"]["completed_phases"]),
        ["spellcheck", "nlp", "ai_feedback"]
    );
    for phase in ["spellcheck", "nlp", "ai_feedback"] {
        assert_eq!(status["phases"][phase]["succeeded"], 3, "{phase}");
        assert_eq!(status["phases"][phase]["failed"], 0, "{phase}");
    }

    // The conductor's commands name their cause: PipelineResolved was caused by the request.
    let events = app.events(&teacher, &id).await;
    let types: Vec<&str> = events
        .iter()
        .map(|e| e["event_type"].as_str().unwrap())
        .collect();
    let resolved = events
        .iter()
        .find(|e| e["event_type"] == "PipelineResolved")
        .unwrap();
    assert_eq!(resolved["user_id"], "system:conductor");
    assert_eq!(resolved["correlation_id"], requested["correlation_id"]);
    assert!(resolved["causation_id"].as_str().is_some());
    assert_eq!(types.iter().filter(|t| **t == "PhaseStarted").count(), 3);
    assert_eq!(types.last(), Some(&"PipelineCompleted"));

    // The dashboard shows each essay's outcome in each phase.
    app.wait_for_projections().await;
    let dashboard = app.get_json(&teacher, "/v1/dashboard").await;
    let finished = &dashboard["recently_finished"][0];
    assert_eq!(finished["batch_id"], id.as_str());
    assert_eq!(finished["status"], "completed");
    for essay in ["e1", "e2", "e3"] {
        for phase in ["spellcheck", "nlp", "ai_feedback"] {
            assert_eq!(finished["essay_outcomes"][essay][phase], "succeeded");
        }
    }

    // Asked again, the prerequisites done for every essay are pruned.
    let again = app.request_pipeline(&teacher, &id, "ai_feedback").await;
    let request_id = again["request_id"].as_str().unwrap();
    let status = app
        .wait_for_request(&teacher, &id, request_id, "completed")
        .await;
    assert_eq!(strings(&status["pipeline"]["steps"]), ["ai_feedback"]);
    assert_eq!(
        strings(&status["pipeline"]["pruned"]),
        ["spellcheck", "nlp"]
    );
    assert_eq!(
        strings(&status["pipeline"]["completed_phases"]),
        ["ai_feedback"]
    );
}

async fn failing_essays_complete_the_batch_with_failures(engine: Engine) {
    let app = with_simulator(engine, 1.0).await;
    let teacher = app.user(Role::Teacher).await;
    let id = app.ready_batch(&teacher, &["e1", "e2"]).await;
    app.request_pipeline(&teacher, &id, "nlp").await;
    let status = app
        .wait_for_status(&teacher, &id, "completed_with_failures")
        .await;
    // Every essay failed spellcheck, so nlp had nothing to do and never started.
    assert_eq!(status["phases"]["spellcheck"]["failed"], 2);
    assert!(status["phases"].get("nlp").is_none());
}

async fn one_failed_essay_is_skipped_by_later_phases(engine: Engine) {
    let app = TestApp::spawn(engine).await;
    let teacher = app.user(Role::Teacher).await;
    let service = app.user(Role::Service).await;
    let id = app.ready_batch(&teacher, &["e1", "e2", "e3"]).await;
    app.request_pipeline(&teacher, &id, "nlp").await;

    app.wait_for_phase(&teacher, &id, "spellcheck").await;
    for (essay, outcome) in [("e1", "succeeded"), ("e2", "failed"), ("e3", "succeeded")] {
        let response = app
            .post_result(&service, &result(&id, essay, "spellcheck", outcome))
            .await;
        assert_eq!(response.status(), StatusCode::ACCEPTED);
    }
    app.wait_for_phase(&teacher, &id, "nlp").await;
    // e2 failed spellcheck: no nlp result is expected for it.
    let refused = app
        .post_result(&service, &result(&id, "e2", "nlp", "succeeded"))
        .await;
    assert_problem(refused, StatusCode::CONFLICT).await;
    for essay in ["e1", "e3"] {
        let response = app
            .post_result(&service, &result(&id, essay, "nlp", "succeeded"))
            .await;
        assert_eq!(response.status(), StatusCode::ACCEPTED);
    }
    let status = app
        .wait_for_status(&teacher, &id, "completed_with_failures")
        .await;
    assert_eq!(status["phases"]["spellcheck"]["failed"], 1);
    assert_eq!(status["phases"]["nlp"]["succeeded"], 2);
}

async fn cancelling_stops_further_phases(engine: Engine) {
    let app = TestApp::spawn(engine).await;
    let teacher = app.user(Role::Teacher).await;
    let service = app.user(Role::Service).await;
    let id = app.ready_batch(&teacher, &["e1", "e2"]).await;
    app.request_pipeline(&teacher, &id, "ai_feedback").await;
    app.wait_for_phase(&teacher, &id, "spellcheck").await;

    let response = app
        .post_result(&service, &result(&id, "e1", "spellcheck", "succeeded"))
        .await;
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let cancelled = app
        .post(
            &teacher,
            &format!("/v1/batches/{id}/cancel"),
            &json!({ "reason": "wrong class" }),
        )
        .await;
    assert_eq!(cancelled.status(), StatusCode::ACCEPTED);
    // A late result is recorded, but the phase does not complete and nothing new starts.
    let late = app
        .post_result(&service, &result(&id, "e2", "spellcheck", "succeeded"))
        .await;
    assert_eq!(late.status(), StatusCode::ACCEPTED);
    app.wait_for_pipeline_workers().await;
    app.wait_for_projections().await;

    let status = app.status(&teacher, &id).await;
    assert_eq!(status["status"], "cancelled");
    assert_eq!(status["pipeline"]["current_phase"], "spellcheck");
    let types = app.event_types(&teacher, &id).await;
    assert_eq!(types.iter().filter(|t| *t == "PhaseStarted").count(), 1);
    assert!(!types.iter().any(|t| t == "PhaseCompleted"), "{types:?}");
}

async fn the_http_twin_records_a_result_once_and_refuses_bad_ones(engine: Engine) {
    let app = TestApp::spawn(engine).await;
    let teacher = app.user(Role::Teacher).await;
    let service = app.user(Role::Service).await;
    let id = app.ready_batch(&teacher, &["e1", "e2"]).await;
    app.request_pipeline(&teacher, &id, "spellcheck").await;
    app.wait_for_phase(&teacher, &id, "spellcheck").await;

    let first = app
        .post_result(&service, &result(&id, "e1", "spellcheck", "succeeded"))
        .await;
    assert_eq!(first.status(), StatusCode::ACCEPTED);
    let first: Value = first.json().await.unwrap();
    assert_eq!(first["recorded"], true);
    let events = app.event_count().await;

    // The same message again, and another message for the same essay and phase: no-ops.
    let again = app
        .post_result(&service, &result(&id, "e1", "spellcheck", "succeeded"))
        .await;
    assert_eq!(again.status(), StatusCode::ACCEPTED);
    assert_eq!(again.json::<Value>().await.unwrap()["recorded"], false);
    let mut other = result(&id, "e1", "spellcheck", "failed");
    other["message_id"] = json!("another-delivery");
    let other = app.post_result(&service, &other).await;
    assert_eq!(other.json::<Value>().await.unwrap()["recorded"], false);

    // Refused: wrong role, unknown batch, unknown essay, malformed fields, unknown fields.
    let teacher_post = app
        .post_result(&teacher, &result(&id, "e2", "spellcheck", "succeeded"))
        .await;
    assert_problem(teacher_post, StatusCode::FORBIDDEN).await;
    let missing = uuid::Uuid::new_v4().to_string();
    let unknown_batch = app
        .post_result(&service, &result(&missing, "e2", "spellcheck", "succeeded"))
        .await;
    assert_problem(unknown_batch, StatusCode::NOT_FOUND).await;
    let unknown_essay = app
        .post_result(&service, &result(&id, "e9", "spellcheck", "succeeded"))
        .await;
    assert_problem(unknown_essay, StatusCode::CONFLICT).await;
    let mut bad = result(&id, "e2", "Spell Check", "succeeded");
    bad["message_id"] = json!("m-bad");
    bad["result"] = json!([1, 2]);
    let problem = assert_problem(
        app.post_result(&service, &bad).await,
        StatusCode::UNPROCESSABLE_ENTITY,
    )
    .await;
    let fields: Vec<&str> = problem["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["field"].as_str().unwrap())
        .collect();
    assert_eq!(fields, ["phase", "result"]);
    let mut unknown_field = result(&id, "e2", "spellcheck", "succeeded");
    unknown_field["score"] = json!(3);
    assert_problem(
        app.post_result(&service, &unknown_field).await,
        StatusCode::UNPROCESSABLE_ENTITY,
    )
    .await;
    let mut bad_outcome = result(&id, "e2", "spellcheck", "succeeded");
    bad_outcome["outcome"] = json!("maybe");
    assert_problem(
        app.post_result(&service, &bad_outcome).await,
        StatusCode::UNPROCESSABLE_ENTITY,
    )
    .await;
    assert_eq!(
        app.event_count().await,
        events,
        "nothing refused was appended"
    );

    let second = app
        .post_result(&service, &result(&id, "e2", "spellcheck", "succeeded"))
        .await;
    assert_eq!(second.status(), StatusCode::ACCEPTED);
    let status = app.wait_for_status(&teacher, &id, "completed").await;
    assert_eq!(status["phases"]["spellcheck"]["succeeded"], 2);
}

async fn a_result_over_the_size_limit_is_a_422_and_one_at_the_limit_is_recorded(engine: Engine) {
    // The default limit: 64 KiB of `result` as compact JSON.
    let app = TestApp::spawn(engine).await;
    let limit = app.settings.max_result_bytes;
    assert_eq!(limit, 64 * 1024);
    let teacher = app.user(Role::Teacher).await;
    let service = app.user(Role::Service).await;
    let id = app.ready_batch(&teacher, &["e1"]).await;
    app.request_pipeline(&teacher, &id, "spellcheck").await;
    app.wait_for_phase(&teacher, &id, "spellcheck").await;
    let events = app.event_count().await;

    let mut over = result(&id, "e1", "spellcheck", "succeeded");
    over["result"] = result_of_size(limit + 1);
    let problem = assert_problem(
        app.post_result(&service, &over).await,
        StatusCode::UNPROCESSABLE_ENTITY,
    )
    .await;
    assert_eq!(problem["errors"][0]["field"], "result");
    let reason = problem["errors"][0]["reason"].as_str().unwrap();
    assert!(reason.contains(&limit.to_string()), "{reason}");
    assert_eq!(app.event_count().await, events, "nothing appended");

    // A result or error holding U+0000 (which PostgreSQL's jsonb refuses) is a 422 too.
    for (field, value) in [
        ("result", json!({ "comment": "a\u{0}b" })),
        ("result", json!({ "k\u{0}": 1 })),
        ("error", json!("broken\u{0}")),
    ] {
        let mut bad = result(&id, "e1", "spellcheck", "failed");
        bad[field] = value;
        let problem = assert_problem(
            app.post_result(&service, &bad).await,
            StatusCode::UNPROCESSABLE_ENTITY,
        )
        .await;
        assert_eq!(problem["errors"][0]["field"], field);
    }
    assert_eq!(app.event_count().await, events, "nothing appended");

    let mut at_limit = result(&id, "e1", "spellcheck", "succeeded");
    at_limit["result"] = result_of_size(limit);
    let recorded = app.post_result(&service, &at_limit).await;
    assert_eq!(recorded.status(), StatusCode::ACCEPTED);
    assert_eq!(recorded.json::<Value>().await.unwrap()["recorded"], true);
    let status = app.wait_for_status(&teacher, &id, "completed").await;
    assert_eq!(status["phases"]["spellcheck"]["succeeded"], 1);
}

async fn a_conductor_replayed_from_the_start_issues_nothing_twice(engine: Engine) {
    let app = with_simulator(engine, 0.0).await;
    let teacher = app.user(Role::Teacher).await;
    let id = app.ready_batch(&teacher, &["e1", "e2"]).await;
    app.request_pipeline(&teacher, &id, "nlp").await;
    app.wait_for_status(&teacher, &id, "completed").await;
    app.wait_for_pipeline_workers().await;
    let before = app.event_count().await;

    // Rewind the conductor and the relay to the start of the log, as a restore or a redeploy
    // from an old checkpoint would.
    sqlx::query("UPDATE projection_checkpoints SET tx = 0, position = 0 WHERE name IN ('conductor', 'relay')")
        .execute(app.storage.pool())
        .await
        .unwrap();
    app.storage.announce_append();
    app.wait_for_pipeline_workers().await;
    // The replayed phase requests reach the simulator again; its results are duplicates.
    integration_tests::wait_until(std::time::Duration::from_secs(30), || async {
        app.metric("essayflow_ingress_results_total{outcome=\"duplicate\"}")
            .await
            == Some(4)
    })
    .await;
    app.wait_for_projections().await;
    assert_eq!(
        app.event_count().await,
        before,
        "no command took effect twice"
    );
    let status = app.status(&teacher, &id).await;
    assert_eq!(status["status"], "completed");
    assert_eq!(status["phases"]["nlp"]["succeeded"], 2);
}

async fn phase_requests_lost_with_the_in_process_bus_are_sent_again_after_a_restart(
    engine: Engine,
) {
    // No processor yet: the phase requests the relay publishes reach nobody, as if the process
    // had stopped before its in-process processor answered them.
    let app = TestApp::spawn(engine).await;
    let teacher = app.user(Role::Teacher).await;
    let id = app.ready_batch(&teacher, &["e1", "e2"]).await;
    let requested = app.request_pipeline(&teacher, &id, "nlp").await;
    app.wait_for_phase(&teacher, &id, "spellcheck").await;
    app.wait_for_pipeline_workers().await;

    let app = app
        .restart(|s| {
            s.simulate_processors = true;
            s.simulator_latency_ms = 0;
        })
        .await;
    let request_id = requested["request_id"].as_str().unwrap();
    let status = app
        .wait_for_request(&teacher, &id, request_id, "completed")
        .await;
    assert_eq!(status["phases"]["nlp"]["succeeded"], 2);
}

both_engines!(
    phase_requests_lost_with_the_in_process_bus_are_sent_again_after_a_restart,
    a_pipeline_runs_to_completion_with_the_development_processor,
    failing_essays_complete_the_batch_with_failures,
    one_failed_essay_is_skipped_by_later_phases,
    cancelling_stops_further_phases,
    the_http_twin_records_a_result_once_and_refuses_bad_ones,
    a_result_over_the_size_limit_is_a_422_and_one_at_the_limit_is_recorded,
    a_conductor_replayed_from_the_start_issues_nothing_twice,
);
