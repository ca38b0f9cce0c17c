//! The event log under stress: concurrent writers on one batch, a transaction that commits
//! late, a worker that dies before committing, and replay equal to live application.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::time::Duration;

use api::auth::Role;
use commands::{Engine, EventLog, LogPosition};
use domain::BatchEvent;
use integration_tests::{TestApp, both_engines, essayflow_binary, wait_until};
use projections::{
    BatchStateProjection, DashboardProjection, Projection, ProjectionError, Step, Worker,
    WorkerOptions, dump,
};
use reqwest::StatusCode;
use serde_json::{Value, json};

/// Folds the log from event zero and checks that the result equals the live rows.
async fn assert_replay_equals_live<P: Projection + Clone>(app: &TestApp, projection: P) {
    let name = projection.name();
    assert!(
        !dump(&app.storage, name).await.unwrap().is_empty(),
        "{name} has rows"
    );
    let report = projections::verify::verify(
        projection,
        &app.storage,
        Default::default(),
        |_| {},
        &Default::default(),
    )
    .await
    .unwrap();
    assert_eq!(
        (report.rows_differing, report.rows_skipped),
        (0, 0),
        "{name}: a from-scratch fold differs from the live model: {:?}",
        report.differences
    );
    assert!(report.rows_compared > 0);
}

async fn fifty_concurrent_writers_on_one_batch_store_each_accepted_command_once(engine: Engine) {
    let app = TestApp::spawn_with(engine, |s| s.db_max_connections = 16).await;
    let teacher = app.user(Role::Teacher).await;
    let id = app.register_batch(&teacher, 50).await["batch_id"]
        .as_str()
        .unwrap()
        .to_owned();

    let requests = (0..50).map(|i| {
        let (app, teacher, id) = (&app, &teacher, &id);
        async move {
            let essay = format!("e{i}");
            let response = app.add_essays(teacher, id, &[essay.as_str()]).await;
            (essay, response.status(), response.text().await.unwrap())
        }
    });
    let results = futures::future::join_all(requests).await;

    let mut accepted = BTreeSet::new();
    for (essay, status, body) in &results {
        match *status {
            StatusCode::ACCEPTED => {
                accepted.insert(essay.clone());
            }
            StatusCode::CONFLICT => {
                let body: Value = serde_json::from_str(body).unwrap();
                assert_eq!(
                    body["type"],
                    "urn:essayflow:problem:concurrent-modification"
                );
            }
            other => panic!("unexpected {other}: {body}"),
        }
    }
    assert!(!accepted.is_empty());

    // Every accepted essay is stored exactly once, and nothing else is.
    let batch_id = id.parse().unwrap();
    let events = EventLog::new(app.storage.clone())
        .read_batch(batch_id, None)
        .await
        .unwrap();
    let mut stored = Vec::new();
    for event in &events {
        if let BatchEvent::EssaysAdded { essays } = &event.event {
            stored.extend(essays.iter().map(|e| e.essay_id.to_string()));
        }
    }
    let unique: BTreeSet<String> = stored.iter().cloned().collect();
    assert_eq!(unique.len(), stored.len(), "an essay was stored twice");
    assert_eq!(unique, accepted);
    let sequences: Vec<i64> = events.iter().map(|e| e.sequence).collect();
    assert_eq!(sequences, (1..=events.len() as i64).collect::<Vec<_>>());

    app.wait_for_projections().await;
    let last = events.last().unwrap().at.position;
    let view = app.batch(&teacher, &id, last).await;
    let essays: BTreeSet<String> = view["essays"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["essay_id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(essays, accepted);
    let expected_status = if accepted.len() == 50 {
        "ready"
    } else {
        "registered"
    };
    assert_eq!(view["status"], expected_status);
    assert_replay_equals_live(&app, BatchStateProjection).await;
    assert_replay_equals_live(&app, DashboardProjection).await;
}

async fn concurrent_writers_across_many_batches_never_fail_the_store(engine: Engine) {
    let app = TestApp::spawn_with(engine, |s| s.db_max_connections = 16).await;
    let teacher = app.user(Role::Teacher).await;
    let mut ids = Vec::new();
    for _ in 0..5 {
        ids.push(
            app.register_batch(&teacher, 12).await["batch_id"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }
    // Interleave the batches so that every append group mixes them, in different orders.
    let requests = (0..60).map(|i| {
        let (app, teacher) = (&app, &teacher);
        let id = ids[(i * 7) % ids.len()].clone();
        async move {
            let response = app.add_essays(teacher, &id, &[&format!("e{i}")]).await;
            response.status()
        }
    });
    let statuses = futures::future::join_all(requests).await;
    for status in &statuses {
        assert!(
            *status == StatusCode::ACCEPTED || *status == StatusCode::CONFLICT,
            "a concurrent append failed with {status}"
        );
    }
    let accepted = statuses
        .iter()
        .filter(|s| **s == StatusCode::ACCEPTED)
        .count();
    let log = EventLog::new(app.storage.clone());
    let mut stored = 0;
    for id in &ids {
        for event in log.read_batch(id.parse().unwrap(), None).await.unwrap() {
            if let BatchEvent::EssaysAdded { essays } = &event.event {
                stored += essays.len();
            }
        }
    }
    assert_eq!(
        stored, accepted,
        "accepted commands and stored essays differ"
    );
    app.wait_for_projections().await;
    assert_replay_equals_live(&app, BatchStateProjection).await;
    assert_replay_equals_live(&app, DashboardProjection).await;
}

/// A `BatchRegistered` event written by hand, as the event store would write it.
fn registration(owner: &str) -> (String, String, String) {
    let batch_id = uuid::Uuid::new_v4().to_string();
    let payload = json!({ "BatchRegistered": {
        "batch_id": batch_id, "owner_id": owner, "title": "Slow", "course_code": "SLOW",
        "class_designation": null, "expected_essay_count": 1 } });
    let metadata = json!({
        "correlation_id": uuid::Uuid::new_v4(), "occurred_at": "2026-01-01T00:00:00Z",
        "command": "RegisterBatch", "user_id": owner });
    (batch_id, payload.to_string(), metadata.to_string())
}

const INSERT: &str = "INSERT INTO events
    (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata)
    VALUES ('Batch', $1, 1, 'BatchRegistered', '1.0', $2, $3)";

async fn an_append_that_commits_late_is_applied_and_nothing_is_applied_twice(engine: Engine) {
    let app = TestApp::spawn(engine).await;
    let teacher = app.user(Role::Teacher).await;
    app.register_batch(&teacher, 1).await;
    app.wait_for_projections().await;
    let log = EventLog::new(app.storage.clone());
    let checkpoint = projections::worker::load_checkpoint(app.storage.pool(), "batch_state")
        .await
        .unwrap();

    let (slow_id, payload, metadata) = registration(&teacher.id);
    let later: Vec<Value>;
    match engine {
        Engine::Postgres => {
            // A writer takes its global position, then stalls before committing while later
            // appends commit.
            let mut conn: sqlx::PgConnection =
                sqlx::Connection::connect(&app.db.url).await.unwrap();
            let mut tx = sqlx::Connection::begin(&mut conn).await.unwrap();
            sqlx::query(&INSERT.replace("$2", "$2::json").replace("$3", "$3::json"))
                .bind(&slow_id)
                .bind(&payload)
                .bind(&metadata)
                .execute(&mut *tx)
                .await
                .unwrap();
            let mut committed = Vec::new();
            for _ in 0..3 {
                committed.push(app.register_batch(&teacher, 1).await);
            }
            // The later appends are committed, but a reader must not pass the open one.
            assert_eq!(log.read_after(checkpoint, 100).await.unwrap(), vec![]);
            tx.commit().await.unwrap();
            later = committed;
        }
        Engine::Sqlite => {
            // One writer at a time: later appends wait for the stalled one, then follow it.
            let pool = sqlx::SqlitePool::connect(&app.db.url).await.unwrap();
            let mut tx = pool.begin_with("BEGIN IMMEDIATE").await.unwrap();
            sqlx::query(INSERT)
                .bind(&slow_id)
                .bind(&payload)
                .bind(&metadata)
                .execute(&mut *tx)
                .await
                .unwrap();
            let writers = (0..3).map(|_| app.register_batch(&teacher, 1));
            let (committed, ()) = tokio::join!(futures::future::join_all(writers), async {
                assert_eq!(log.read_after(checkpoint, 100).await.unwrap(), vec![]);
                tx.commit().await.unwrap();
            });
            later = committed;
        }
    }

    app.wait_for_projections().await;
    let batches: Vec<String> = later
        .iter()
        .map(|r| r["batch_id"].as_str().unwrap().to_owned())
        .chain([slow_id])
        .collect();
    let reads = projections::ReadModels::new(app.storage.clone());
    for id in &batches {
        assert!(
            reads.batch(id).await.unwrap().is_some(),
            "batch {id} was skipped"
        );
    }
    let total = log.count().await.unwrap();
    for status in reads.projections(&projections::PROJECTIONS).await.unwrap() {
        assert_eq!(
            status.events_applied, total,
            "{} applied an event twice or skipped one",
            status.name
        );
    }
    let dashboard = reads.dashboard(&teacher.id).await.unwrap();
    assert_eq!(dashboard.totals["registered"], 5);
    assert_replay_equals_live(&app, BatchStateProjection).await;
    assert_replay_equals_live(&app, DashboardProjection).await;
}

async fn a_worker_that_dies_before_committing_resumes_from_its_checkpoint(engine: Engine) {
    let app = TestApp::spawn_with(engine, |s| s.run_workers = false).await;
    let teacher = app.user(Role::Teacher).await;
    for i in 0..4 {
        let id = app.register_batch(&teacher, 2).await["batch_id"]
            .as_str()
            .unwrap()
            .to_owned();
        let added = app
            .add_essays(&teacher, &id, &[&format!("a{i}"), &format!("b{i}")])
            .await;
        assert_eq!(added.status(), StatusCode::ACCEPTED);
    }
    let options = WorkerOptions {
        page_size: 4,
        poll_interval: Duration::from_millis(50),
        gather: Duration::ZERO,
    };
    let pool = app.storage.pool();

    let first = Worker::new(BatchStateProjection, &app.storage, options);
    assert_eq!(first.step().await.unwrap(), Step::Applied(4));
    let checkpoint = projections::worker::load_checkpoint(pool, "batch_state")
        .await
        .unwrap();
    let rows = dump(&app.storage, "batch_state").await.unwrap();

    // Crash after the next page was read and applied, before the commit.
    let crash =
        |_: &[commands::StoredEvent]| Err(ProjectionError::Injected("worker killed".into()));
    assert!(first.step_with(&crash).await.is_err());
    drop(first);
    assert_eq!(
        projections::worker::load_checkpoint(pool, "batch_state")
            .await
            .unwrap(),
        checkpoint,
        "the checkpoint moved without its page"
    );
    assert_eq!(
        dump(&app.storage, "batch_state").await.unwrap(),
        rows,
        "a half-applied page leaked"
    );

    // A new worker resumes from the checkpoint and applies everything exactly once.
    let second = Worker::new(BatchStateProjection, &app.storage, options);
    let mut applied = 4;
    while let Step::Applied(n) = second.step().await.unwrap() {
        applied += n;
    }
    let total = EventLog::new(app.storage.clone()).count().await.unwrap();
    assert_eq!(applied as i64, total);
    let end = projections::worker::load_checkpoint(pool, "batch_state")
        .await
        .unwrap();
    assert!(end > checkpoint && end != LogPosition::default());
    assert_replay_equals_live(&app, BatchStateProjection).await;

    // The same for the dashboard, crashing on its very first page.
    let dashboard = Worker::new(DashboardProjection, &app.storage, options);
    assert!(dashboard.step_with(&crash).await.is_err());
    assert!(dump(&app.storage, "dashboard").await.unwrap().is_empty());
    let dashboard = Worker::new(DashboardProjection, &app.storage, options);
    while let Step::Applied(_) = dashboard.step().await.unwrap() {}
    assert_replay_equals_live(&app, DashboardProjection).await;
}

async fn the_replay_command_rebuilds_rows_identical_to_the_live_ones(engine: Engine) {
    let app = TestApp::spawn(engine).await;
    let alice = app.user(Role::Teacher).await;
    let bob = app.user(Role::Teacher).await;
    for (teacher, n) in [(&alice, 3), (&bob, 2), (&alice, 1)] {
        let id = app.register_batch(teacher, n).await["batch_id"]
            .as_str()
            .unwrap()
            .to_owned();
        let ids: Vec<String> = (0..n).map(|i| format!("essay-{i}")).collect();
        let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
        assert_eq!(
            app.add_essays(teacher, &id, &ids).await.status(),
            StatusCode::ACCEPTED
        );
        let requested = app
            .post(
                teacher,
                &format!("/v1/batches/{id}/pipelines"),
                &json!({ "pipeline": "nlp" }),
            )
            .await;
        assert_eq!(requested.status(), StatusCode::ACCEPTED);
        if n == 2 {
            app.post(teacher, &format!("/v1/batches/{id}/cancel"), &json!({}))
                .await;
        }
    }
    app.register_batch(&bob, 4).await;
    // The conductor appends (pipelines resolved, phases started) after the commands: let it
    // finish, so that the live rows compared below are final.
    app.wait_for_pipeline_workers().await;
    app.wait_for_projections().await;

    for name in projections::PROJECTIONS {
        let live = dump(&app.storage, name).await.unwrap();
        assert!(!live.is_empty());
        let output = std::process::Command::new(essayflow_binary())
            .args(["replay", "--projection", name])
            .env("ESSAYFLOW_DATABASE_URL", &app.db.url)
            .env("ESSAYFLOW_JWT_SECRET", integration_tests::JWT_SECRET)
            .env("ESSAYFLOW_LOG", "warn")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "replay failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(stdout.contains("events/s"), "{stdout}");
        let total = EventLog::new(app.storage.clone()).count().await.unwrap();
        assert!(
            stdout.contains(&format!("replayed {total} events")),
            "{stdout}"
        );
        wait_until(Duration::from_secs(10), || async {
            dump(&app.storage, name).await.unwrap().len() == live.len()
        })
        .await;
        assert_eq!(
            dump(&app.storage, name).await.unwrap(),
            live,
            "{name} differs after replay"
        );
    }
    let unknown = std::process::Command::new(essayflow_binary())
        .args(["replay", "--projection", "nope"])
        .env("ESSAYFLOW_DATABASE_URL", &app.db.url)
        .env("ESSAYFLOW_JWT_SECRET", integration_tests::JWT_SECRET)
        .output()
        .unwrap();
    assert!(!unknown.status.success());
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("unknown projection"));
}

/// Two nodes on one PostgreSQL database: one worker per projection leads, the other takes over
/// when it stops, and every event is applied once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_node_leads_each_projection_and_another_takes_over() {
    let quiet = TestApp::spawn_with(Engine::Postgres, |s| s.run_workers = false).await;
    let url = quiet.db.url.clone();
    let leader = Worker::new(
        BatchStateProjection,
        &quiet.storage,
        WorkerOptions::default(),
    );
    let lock = leader.try_lead().await.unwrap();
    assert!(lock.is_some(), "a free projection lock is taken");
    let rival = Worker::new(
        BatchStateProjection,
        &quiet.storage,
        WorkerOptions::default(),
    );
    assert!(
        rival.try_lead().await.unwrap().is_none(),
        "a held lock is refused"
    );
    drop(lock);
    wait_until(Duration::from_secs(10), || async {
        rival.try_lead().await.unwrap().is_some()
    })
    .await;

    // Two nodes with workers on the same database: commands on either are applied exactly
    // once, and when one stops the other carries on.
    let first = TestApp::spawn_with(Engine::Postgres, |s| s.database_url = url.clone()).await;
    let second = TestApp::spawn_with(Engine::Postgres, |s| s.database_url = url.clone()).await;
    let teacher = first.user(Role::Teacher).await;
    let a = first.register_batch(&teacher, 1).await;
    let b = second.register_batch(&teacher, 1).await;
    first.stop().await;
    let c = second.register_batch(&teacher, 1).await;
    for r in [&a, &b, &c] {
        let id = r["batch_id"].as_str().unwrap();
        second
            .batch(&teacher, id, r["position"].as_i64().unwrap())
            .await;
    }
    second.wait_for_projections().await;
    let total = EventLog::new(second.storage.clone()).count().await.unwrap();
    let reads = projections::ReadModels::new(second.storage.clone());
    for status in reads.projections(&projections::PROJECTIONS).await.unwrap() {
        assert_eq!(status.events_applied, total, "{}", status.name);
    }
}

both_engines!(
    fifty_concurrent_writers_on_one_batch_store_each_accepted_command_once,
    concurrent_writers_across_many_batches_never_fail_the_store,
    an_append_that_commits_late_is_applied_and_nothing_is_applied_twice,
    a_worker_that_dies_before_committing_resumes_from_its_checkpoint,
    the_replay_command_rebuilds_rows_identical_to_the_live_ones,
);
