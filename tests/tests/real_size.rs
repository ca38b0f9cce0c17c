//! The read side at real size: a class of 1 000 essays of about 500 words through a
//! three-phase pipeline, watched live. What one event costs must follow what it changed, not
//! the batch's size: the live feed's bytes grow linearly with the events (a 100-essay and a
//! 1 000-essay run compared), every patch applies, and a client that applies them all holds
//! exactly what GET shows. Resuming with `since` across the run replays exactly what was
//! missed; a `since` the history no longer holds gets a snapshot.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use api::auth::Role;
use commands::Engine;
use integration_tests::ws::{TopicLog, WsClient};
use integration_tests::{TestApp, User, both_engines, wait_until};
use reqwest::StatusCode;
use serde_json::{Value, json};
use sqlx::Row;

/// About 500 words (some 3 000 characters) of text, different for every essay.
fn essay_text(seed: usize) -> String {
    const WORDS: [&str; 12] = [
        "homework",
        "improves",
        "discipline",
        "although",
        "students",
        "often",
        "argue",
        "that",
        "rest",
        "matters",
        "more",
        "today",
    ];
    (0..500)
        .map(|i| WORDS[(seed * 7 + i * 13) % WORDS.len()])
        .collect::<Vec<_>>()
        .join(" ")
}

/// Registers a batch of `n` realistic essays, added 250 at a time; returns its id and the
/// position of the last write.
async fn class_of(app: &TestApp, teacher: &User, n: usize) -> (String, i64) {
    let batch = app.register_batch(teacher, n as u32).await;
    let id = batch["batch_id"].as_str().unwrap().to_owned();
    let mut position = 0;
    for start in (0..n).step_by(250) {
        let essays: Vec<Value> = (start..n.min(start + 250))
            .map(|i| json!({"essay_id": format!("s{i:04}"), "title": format!("Essay {i}"), "text": essay_text(i)}))
            .collect();
        let response = app
            .post(
                teacher,
                &format!("/v1/batches/{id}/essays"),
                &json!({ "essays": essays }),
            )
            .await;
        assert_eq!(response.status(), StatusCode::ACCEPTED);
        position = response.json::<Value>().await.unwrap()["position"]
            .as_i64()
            .unwrap();
    }
    (id, position)
}

/// Bytes and number of a topic's stored changes after `after` (a page's changes of one topic are
/// one row).
async fn feed_bytes(app: &TestApp, topic: &str, after: i64) -> (i64, i64) {
    let row = sqlx::query(
        "SELECT CAST(COALESCE(SUM(LENGTH(patches)), 0) AS BIGINT) AS bytes,
                CAST(COALESCE(SUM(last_version - version + 1), 0) AS BIGINT) AS n
           FROM live_changes WHERE topic = $1 AND version > $2",
    )
    .bind(topic)
    .bind(after)
    .fetch_one(app.storage.pool())
    .await
    .unwrap();
    (row.try_get("bytes").unwrap(), row.try_get("n").unwrap())
}

/// Subscribes (waiting for `position` first) and takes the snapshot.
async fn watch(client: &mut WsClient, topic: &str, position: i64) -> TopicLog {
    client
        .send(json!({"type": "subscribe", "topic": topic, "min_position": position}))
        .await;
    assert_eq!(
        client.next_json().await,
        json!({"type": "subscribed", "topic": topic})
    );
    let mut log = TopicLog::default();
    let snapshot = client.next_json().await;
    assert_eq!(snapshot["type"], "snapshot", "{snapshot}");
    log.take(&snapshot);
    log
}

/// What one watched pipeline run cost the feed.
struct Run {
    /// Changes (one per event) of the batch's topic.
    batch_changes: i64,
    batch_bytes: i64,
    dashboard_bytes: i64,
}

/// Runs `ai_feedback` (spellcheck, nlp, ai_feedback) over a batch of `n` essays while one
/// client watches the batch and the dashboard, applying every patch, and another disconnects
/// part-way and resumes with `since`.
async fn watched_run(app: &TestApp, teacher: &User, n: usize) -> Run {
    let (id, position) = class_of(app, teacher, n).await;
    let topic = format!("batch:{id}");
    let dashboard_topic = format!("dashboard:{}", teacher.id);
    let mut client = app.ws(teacher).await;
    let mut batch = watch(&mut client, &topic, position).await;
    let mut dashboard = watch(&mut client, "dashboard", position).await;
    let (batch_from, dashboard_from) = (batch.version, dashboard.version);
    let mut resuming = app.ws(teacher).await;
    let mut partial = watch(&mut resuming, &topic, position).await;

    app.request_pipeline(teacher, &id, "ai_feedback").await;
    // The second client leaves once some spellcheck results are in.
    while partial.data["phases"]["spellcheck"]
        .as_object()
        .is_none_or(|p| p.len() < n / 4)
    {
        partial.take(&resuming.next_json().await);
    }
    resuming.socket.close(None).await.unwrap();
    drop(resuming);

    while batch.data["status"] != "completed" {
        let message = client.next_json().await;
        match message["topic"].as_str().unwrap() {
            "dashboard" => dashboard.take(&message),
            t if t == topic => batch.take(&message),
            other => panic!("a message of a topic not subscribed to: {other}"),
        }
    }
    let after = app.get_json(teacher, &format!("/v1/batches/{id}")).await;
    assert_eq!(batch.data, after, "the patched batch is what GET shows");
    assert_eq!(batch.snapshots.len(), 1, "one snapshot, then only changes");
    assert_eq!(
        batch.changes,
        ((batch_from + 1)..=batch.version).collect::<Vec<_>>(),
        "every version, in order"
    );
    assert_eq!(after["essays"].as_array().unwrap().len(), n);
    for phase in ["spellcheck", "nlp", "ai_feedback"] {
        assert_eq!(after["phases"][phase].as_object().unwrap().len(), n);
    }
    let expected = app
        .get_json(
            teacher,
            &format!("/v1/dashboard?min_position={}", after["position"]),
        )
        .await;
    while dashboard.data != expected {
        let message = client.next_json().await;
        assert_eq!(message["topic"], "dashboard", "{message}");
        dashboard.take(&message);
    }
    assert_eq!(
        dashboard.changes,
        ((dashboard_from + 1)..=dashboard.version).collect::<Vec<_>>()
    );

    // The client that left resumes from the last version it saw: exactly what it missed.
    let mut resumed = app.ws(teacher).await;
    resumed.subscribe(&topic, Some(partial.version)).await;
    assert_eq!(resumed.next_json().await["type"], "subscribed");
    let seen = partial.changes.len();
    while partial.version < batch.version {
        let message = resumed.next_json().await;
        assert_eq!(
            message["type"], "change",
            "the missed changes, not a snapshot"
        );
        partial.take(&message);
    }
    assert_eq!(partial.snapshots.len(), 1);
    assert!(
        partial.changes.len() - seen > n,
        "most of the run was missed"
    );
    assert_eq!(
        partial.changes,
        ((batch_from + 1)..=batch.version).collect::<Vec<_>>(),
        "no gap and no duplicate across the reconnect"
    );
    assert_eq!(partial.data, after);

    let (batch_bytes, batch_changes) = feed_bytes(app, &topic, batch_from).await;
    assert_eq!(batch_changes, batch.version - batch_from);
    let (dashboard_bytes, _) = feed_bytes(app, &dashboard_topic, dashboard_from).await;
    Run {
        batch_changes,
        batch_bytes,
        dashboard_bytes,
    }
}

async fn a_thousand_essay_pipeline_streams_patches_that_cost_what_changed(engine: Engine) {
    let app = TestApp::spawn_with(engine, |s| {
        s.simulate_processors = true;
        s.simulator_latency_ms = 0;
    })
    .await;
    let teacher = app.user(Role::Teacher).await;
    let small = watched_run(&app, &teacher, 100).await;
    let large = watched_run(&app, &teacher, 1000).await;
    for (n, run) in [(100, &small), (1000, &large)] {
        eprintln!(
            "{n} essays: {} events, batch feed {} bytes, dashboard feed {} bytes",
            run.batch_changes, run.batch_bytes, run.dashboard_bytes
        );
    }

    // Linear: ten times the essays, about ten times the events, about ten times the bytes.
    // (Whole states per event, as before patches, would be about a hundred times.)
    let events = large.batch_changes as f64 / small.batch_changes as f64;
    assert!((9.0..11.0).contains(&events), "events ratio {events}");
    for (what, small_bytes, large_bytes) in [
        ("batch", small.batch_bytes, large.batch_bytes),
        ("dashboard", small.dashboard_bytes, large.dashboard_bytes),
    ] {
        let per_event_small = small_bytes as f64 / small.batch_changes as f64;
        let per_event_large = large_bytes as f64 / large.batch_changes as f64;
        assert!(
            per_event_large <= per_event_small * 1.25,
            "{what}: {per_event_large:.0} bytes per event at 1 000 essays, \
             {per_event_small:.0} at 100: not linear"
        );
    }
    // And small in absolute terms: a result's patch is the result and its path, not the batch.
    let per_event = large.batch_bytes as f64 / large.batch_changes as f64;
    assert!(per_event < 2_000.0, "{per_event:.0} bytes per event");
}

async fn a_since_older_than_the_history_gets_a_snapshot(engine: Engine) {
    let app = TestApp::spawn_with(engine, |s| s.ws.history_secs = 1).await;
    let teacher = app.user(Role::Teacher).await;
    let id = app.ready_batch(&teacher, &["e1", "e2"]).await;
    app.wait_for_projections().await;
    // The history of the batch's first versions is pruned after a second.
    wait_until(Duration::from_secs(30), || async {
        feed_bytes(&app, &format!("batch:{id}"), 0).await.1 == 0
    })
    .await;
    let mut client = app.ws(&teacher).await;
    client.subscribe(&format!("batch:{id}"), Some(1)).await;
    assert_eq!(client.next_json().await["type"], "subscribed");
    let snapshot = client.next_json().await;
    assert_eq!(snapshot["type"], "snapshot", "{snapshot}");
    let view = app.get_json(&teacher, &format!("/v1/batches/{id}")).await;
    assert_eq!(snapshot["data"], view);
    assert_eq!(snapshot["version"], view["version"]);
}

both_engines!(
    a_thousand_essay_pipeline_streams_patches_that_cost_what_changed,
    a_since_older_than_the_history_gets_a_snapshot,
);
