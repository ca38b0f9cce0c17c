//! Rebuilding a read model beside the live one, and verifying the live one against a fold of
//! the log: a rebuild under live write load never makes a read fail or go back and swaps in a
//! model equal to a from-scratch fold, while live clients see no gap; a rebuild killed half-way
//! leaves the live model serving and resumes; verification finds a planted difference.
#![allow(clippy::unwrap_used)]

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use api::auth::Role;
use commands::Engine;
use integration_tests::ws::TopicLog;
use integration_tests::{
    JWT_SECRET, TestApp, User, assert_problem, both_engines, essayflow_binary, wait_until,
};
use projections::dump;
use reqwest::StatusCode;
use serde_json::{Value, json};

/// One projection's entry of `GET /v1/admin/projections`.
async fn projection(app: &TestApp, admin: &User, name: &str) -> Value {
    let all = app.get_json(admin, "/v1/admin/projections").await;
    all.as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == name)
        .unwrap()
        .clone()
}

/// Verifies a projection through the library and asserts that the live model equals a fold.
async fn assert_verified(app: &TestApp, name: &str) {
    let report = projections::verify::verify(
        projections::AnyProjection::named(name).unwrap(),
        &app.storage,
        Default::default(),
        |_| {},
        &Default::default(),
    )
    .await
    .unwrap();
    assert_eq!(
        report.rows_differing, 0,
        "{name} differs from a fold of the log: {:?}",
        report.differences
    );
    assert!(report.rows_compared > 0);
}

/// How many indexes `table` has (its primary key's included).
async fn index_count(app: &TestApp, table: &str) -> i64 {
    let sql = match app.engine {
        Engine::Postgres => "SELECT COUNT(*) FROM pg_indexes WHERE tablename = $1",
        Engine::Sqlite => {
            "SELECT COUNT(*) FROM sqlite_master WHERE type = 'index' AND tbl_name = $1"
        }
    };
    sqlx::query_scalar(sql)
        .bind(table)
        .fetch_one(app.storage.pool())
        .await
        .unwrap()
}

/// Registers a ready batch of `essays` essays and requests `ai_feedback` for it.
async fn busy_batch(app: &TestApp, teacher: &User, n: usize) -> String {
    let essays: Vec<String> = (0..n).map(|i| format!("e{i}")).collect();
    let essays: Vec<&str> = essays.iter().map(String::as_str).collect();
    let id = app.ready_batch(teacher, &essays).await;
    app.request_pipeline(teacher, &id, "ai_feedback").await;
    id
}

async fn a_rebuild_under_live_write_load_swaps_in_without_a_gap(engine: Engine) {
    let app = Arc::new(
        TestApp::spawn_with(engine, |s| {
            s.simulate_processors = true;
            s.simulator_latency_ms = 0;
            s.rebuild_page_size = 25;
        })
        .await,
    );
    let teacher = app.user(Role::Teacher).await;
    let admin = app.user(Role::Admin).await;
    let mut watched = String::new();
    for _ in 0..12 {
        watched = busy_batch(&app, &teacher, 10).await;
    }
    app.wait_for_status(&teacher, &watched, "completed").await;
    app.wait_for_projections().await;

    // A live client on one batch and the dashboard, applying every patch.
    let mut client = app.ws(&teacher).await;
    let mut logs = [TopicLog::default(), TopicLog::default()];
    let topics = [format!("batch:{watched}"), "dashboard".to_owned()];
    for (topic, log) in topics.iter().zip(logs.iter_mut()) {
        client.subscribe(topic, None).await;
        assert_eq!(client.next_json().await["type"], "subscribed");
        log.take(&client.next_json().await);
    }

    // Writers: new batches through their pipelines, and a new pipeline on the watched batch,
    // at a steady pace (a load, not a flood: a rebuild finishes when it folds faster than
    // events arrive).
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (app, teacher, stop, watched) =
            (app.clone(), teacher.clone(), stop.clone(), watched.clone());
        tokio::spawn(async move {
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                busy_batch(&app, &teacher, 5).await;
                if n % 4 == 0 {
                    let _ = app
                        .post(
                            &teacher,
                            &format!("/v1/batches/{watched}/pipelines"),
                            &json!({"pipeline": "spellcheck"}),
                        )
                        .await;
                }
                n += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            n
        })
    };
    // Readers: every read succeeds, and no version ever goes back.
    let reads = Arc::new(AtomicU64::new(0));
    let reader = {
        let (app, teacher, stop, reads, watched) = (
            app.clone(),
            teacher.clone(),
            stop.clone(),
            reads.clone(),
            watched.clone(),
        );
        tokio::spawn(async move {
            let (mut batch_version, mut total) = (0, 0);
            while !stop.load(Ordering::Relaxed) {
                let response = app.get(&teacher, &format!("/v1/batches/{watched}")).await;
                assert_eq!(
                    response.status(),
                    StatusCode::OK,
                    "a read failed during the rebuild"
                );
                let version = response.json::<Value>().await.unwrap()["version"]
                    .as_i64()
                    .unwrap();
                assert!(
                    version >= batch_version,
                    "the batch went back from {batch_version} to {version}"
                );
                batch_version = version;
                let dashboard = app.get(&teacher, "/v1/dashboard").await;
                assert_eq!(dashboard.status(), StatusCode::OK);
                let dashboard: Value = dashboard.json().await.unwrap();
                let batches: u64 = dashboard["totals"]
                    .as_object()
                    .unwrap()
                    .values()
                    .map(|n| n.as_u64().unwrap())
                    .sum();
                assert!(
                    batches >= total,
                    "the dashboard went back from {total} to {batches}"
                );
                total = batches;
                reads.fetch_add(1, Ordering::Relaxed);
            }
        })
    };

    let mut indexes = Vec::new();
    for name in ["batch_state", "dashboard"] {
        for table in projections::tables_of(name).unwrap() {
            indexes.push((table.name, index_count(&app, table.name).await));
        }
    }
    for name in ["batch_state", "dashboard"] {
        let events_before = app.event_count().await;
        let response = app
            .post(
                &admin,
                &format!("/v1/admin/projections/{name}/rebuild"),
                &json!({}),
            )
            .await;
        assert_eq!(response.status(), StatusCode::ACCEPTED);
        assert_eq!(response.headers()["location"], "/v1/admin/projections");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["projection"], name);
        // A second request while it runs is refused.
        let again = app
            .post(
                &admin,
                &format!("/v1/admin/projections/{name}/rebuild"),
                &json!({}),
            )
            .await;
        if again.status() != StatusCode::ACCEPTED {
            assert_problem(again, StatusCode::CONFLICT).await;
        }
        // Follow it: progress while it builds, then done.
        let deadline = std::time::Instant::now() + Duration::from_secs(120);
        let mut progress = Vec::new();
        loop {
            let status = projection(&app, &admin, name).await;
            let rebuild = status["rebuild"].clone();
            assert_ne!(rebuild["state"], "failed", "{status}");
            if rebuild["state"] == "done" {
                break;
            }
            progress.push(rebuild);
            assert!(
                std::time::Instant::now() < deadline,
                "the rebuild did not finish"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(!progress.is_empty(), "never seen building");
        assert!(
            app.event_count().await > events_before,
            "no write during the rebuild"
        );
        for seen in &progress {
            assert_eq!(seen["state"], "building", "{seen}");
            assert!(
                seen["events_done"].as_i64().unwrap() <= seen["events_total"].as_i64().unwrap()
            );
            assert!(seen["lease_until"].is_string());
        }
        let status = projection(&app, &admin, name).await;
        assert!(status["rebuild"]["finished_at"].is_string(), "{status}");
        assert!(
            status["rebuild"]["events_done"].as_i64().unwrap() > 100,
            "{status}"
        );
    }

    stop.store(true, Ordering::Relaxed);
    let written = writer.await.unwrap();
    reader.await.unwrap();
    assert!(written > 0 && reads.load(Ordering::Relaxed) > 0);
    app.wait_for_pipeline_workers().await;
    app.wait_for_projections().await;
    // The swapped-in tables have every index the old ones had.
    for (table, count) in &indexes {
        assert_eq!(index_count(&app, table).await, *count, "{table}'s indexes");
    }
    // No shadow or retired table is left behind.
    for name in ["batch_state", "dashboard"] {
        for table in projections::tables_of(name).unwrap() {
            for suffix in ["__shadow", "__retired"] {
                let gone = sqlx::query(&format!("SELECT 1 FROM {}{suffix}", table.name))
                    .fetch_optional(app.storage.pool())
                    .await
                    .is_err();
                assert!(gone, "{}{suffix} was left", table.name);
            }
        }
        assert_verified(&app, name).await;
    }

    // The live client: contiguous versions throughout (a snapshot after each swap), and in the
    // end exactly what GET shows.
    let expected = [
        app.get_json(&teacher, &format!("/v1/batches/{watched}"))
            .await,
        app.get_json(&teacher, "/v1/dashboard").await,
    ];
    while logs[0].data != expected[0] || logs[1].data != expected[1] {
        let message = client.next_json().await;
        let i = usize::from(message["topic"] == "dashboard");
        logs[i].take(&message);
    }
    for log in &logs {
        assert!(
            log.snapshots.len() >= 2,
            "a fresh snapshot after the swap: {:?}",
            log.snapshots
        );
    }
}

/// Data enough for a rebuild in small pages to take a while.
async fn some_history(app: &TestApp, teacher: &User) -> Vec<String> {
    let mut ids = Vec::new();
    for i in 0..30 {
        let essays: Vec<String> = (0..4).map(|e| format!("e{i}-{e}")).collect();
        let essays: Vec<&str> = essays.iter().map(String::as_str).collect();
        ids.push(app.ready_batch(teacher, &essays).await);
    }
    app.wait_for_projections().await;
    ids
}

fn replay(app: &TestApp, projection: &str) -> Command {
    let mut command = Command::new(essayflow_binary());
    command
        .args(["replay", "--projection", projection])
        .env("ESSAYFLOW_DATABASE_URL", &app.db.url)
        .env("ESSAYFLOW_JWT_SECRET", JWT_SECRET)
        .env("ESSAYFLOW_LOG", "warn")
        .env("ESSAYFLOW_REBUILD_PAGE_SIZE", "3")
        .env("ESSAYFLOW_REBUILD_LEASE_SECS", "2");
    command
}

async fn a_rebuild_killed_half_way_leaves_the_live_model_serving_and_resumes(engine: Engine) {
    let app = TestApp::spawn(engine).await;
    let teacher = app.user(Role::Teacher).await;
    let admin = app.user(Role::Admin).await;
    let ids = some_history(&app, &teacher).await;
    let before = dump(&app.storage, "batch_state").await.unwrap();
    let view = app
        .get_json(&teacher, &format!("/v1/batches/{}", ids[0]))
        .await;

    // `essayflow replay` as a process of its own, killed (SIGKILL) once it has made progress.
    let mut child = replay(&app, "batch_state")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let progressed = tokio::task::spawn_blocking(move || {
        use std::io::BufRead;
        let mut lines = std::io::BufReader::new(stderr).lines();
        lines.any(|line| {
            let line = line.unwrap_or_default();
            // "batch_state [###---] 42/123 events, ..."
            line.split_whitespace()
                .nth(2)
                .and_then(|n| n.split('/').next()?.parse::<u64>().ok())
                .is_some_and(|done| done >= 30)
        })
    })
    .await
    .unwrap();
    assert!(progressed, "the rebuild reported no progress");
    // While it runs, another rebuild is refused.
    let refused = app
        .post(
            &admin,
            "/v1/admin/projections/batch_state/rebuild",
            &json!({}),
        )
        .await;
    assert_problem(refused, StatusCode::CONFLICT).await;
    child.kill().unwrap();
    child.wait().unwrap();

    // The live model serves as before, and shows the interrupted rebuild.
    assert_eq!(
        app.get_json(&teacher, &format!("/v1/batches/{}", ids[0]))
            .await,
        view
    );
    assert_eq!(dump(&app.storage, "batch_state").await.unwrap(), before);
    let status = projection(&app, &admin, "batch_state").await;
    assert_eq!(status["rebuild"]["state"], "building", "{status}");
    let done_at_kill = status["rebuild"]["events_done"].as_i64().unwrap();

    // Once its lease has run out, running it again resumes from where it stopped.
    wait_until(Duration::from_secs(10), || async {
        let until = projection(&app, &admin, "batch_state").await["rebuild"]["lease_until"]
            .as_str()
            .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok());
        until.is_some_and(|t| t < chrono::Utc::now())
    })
    .await;
    let output = replay(&app, "batch_state").output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    let resumed_from: i64 = stderr
        .split("resuming an interrupted rebuild of batch_state from ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("not resumed: {stderr}"));
    assert!(
        resumed_from > 0 && resumed_from >= done_at_kill - 3,
        "{resumed_from} vs {done_at_kill}"
    );
    let status = projection(&app, &admin, "batch_state").await;
    assert_eq!(status["rebuild"]["state"], "done", "{status}");
    assert_eq!(dump(&app.storage, "batch_state").await.unwrap(), before);
    assert_verified(&app, "batch_state").await;
}

async fn verification_finds_a_difference_planted_in_a_read_model_row(engine: Engine) {
    let app = TestApp::spawn(engine).await;
    let teacher = app.user(Role::Teacher).await;
    let admin = app.user(Role::Admin).await;
    let ids = some_history(&app, &teacher).await;
    let verify = || {
        Command::new(essayflow_binary())
            .args(["verify", "--projection", "batch_state"])
            .env("ESSAYFLOW_DATABASE_URL", &app.db.url)
            .env("ESSAYFLOW_JWT_SECRET", JWT_SECRET)
            .env("ESSAYFLOW_LOG", "warn")
            .output()
            .unwrap()
    };
    let clean = verify();
    let stdout = String::from_utf8_lossy(&clean.stdout);
    assert!(clean.status.success(), "{stdout}");
    assert!(stdout.contains(": 0 differ"), "{stdout}");

    // Plant two differences: a changed title, and an essay row that goes missing.
    let (changed, lost) = (&ids[3], &ids[7]);
    sqlx::query(
        "UPDATE batch_state SET doc = REPLACE(doc, 'Persuasive essays', 'Tampered') WHERE id = $1",
    )
    .bind(changed)
    .execute(app.storage.pool())
    .await
    .unwrap();
    sqlx::query("DELETE FROM batch_state_essays WHERE batch_id = $1 AND ordinal = 2")
        .bind(lost)
        .execute(app.storage.pool())
        .await
        .unwrap();
    let found = verify();
    let stdout = String::from_utf8_lossy(&found.stdout);
    assert_eq!(found.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains(": 2 differ"), "{stdout}");
    assert!(
        stdout.contains(&format!("differs batch_state [{changed}] doc: /title")),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!("missing batch_state_essays [{lost}, 2]")),
        "{stdout}"
    );

    // The same through the API, and on /metrics.
    let response = app
        .post(
            &admin,
            "/v1/admin/projections/batch_state/verify",
            &json!({}),
        )
        .await;
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let teacher_try = app
        .post(
            &teacher,
            "/v1/admin/projections/batch_state/verify",
            &json!({}),
        )
        .await;
    assert_problem(teacher_try, StatusCode::FORBIDDEN).await;
    let unknown = app
        .post(&admin, "/v1/admin/projections/nope/rebuild", &json!({}))
        .await;
    assert_problem(unknown, StatusCode::NOT_FOUND).await;
    wait_until(Duration::from_secs(30), || async {
        let status = projection(&app, &admin, "batch_state").await;
        status["verification"]["rows_differing"] == 2
            && status["verification"]["differences"]
                .as_array()
                .unwrap()
                .len()
                == 2
    })
    .await;
    let metrics = app.get(&admin, "/metrics").await.text().await.unwrap();
    assert!(
        metrics
            .contains("essayflow_projection_verify_rows_differing{projection=\"batch_state\"} 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains(
            "essayflow_projection_verified_timestamp_seconds{projection=\"batch_state\"}"
        )
    );

    // A rebuild repairs it.
    let response = app
        .post(
            &admin,
            "/v1/admin/projections/batch_state/rebuild",
            &json!({}),
        )
        .await;
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    wait_until(Duration::from_secs(60), || async {
        projection(&app, &admin, "batch_state").await["rebuild"]["state"] == "done"
    })
    .await;
    assert!(verify().status.success());
}

/// The swap's pattern on PostgreSQL (`rebuild.rs` `swap`): a shadow filled and committed
/// earlier, brought up to the live checkpoint inside the swap transaction, then the live tables
/// locked and renamed. A read that arrives while the swap holds its locks waits, and then sees
/// the new tables whole, with the swap's own last writes: never an older version than its
/// `min_position` asked for. (PostgreSQL would otherwise take a REPEATABLE READ snapshot before
/// waiting for the lock, and read the new tables as they were before the swap's writes.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_read_during_a_swap_waits_and_sees_the_new_tables_whole() {
    use sqlx::Connection;
    let app = TestApp::spawn(Engine::Postgres).await;
    let teacher = app.user(Role::Teacher).await;
    let id = app.register_batch(&teacher, 3).await["batch_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let added: Value = app
        .add_essays(&teacher, &id, &["e1"])
        .await
        .json()
        .await
        .unwrap();
    app.batch(&teacher, &id, added["position"].as_i64().unwrap())
        .await;
    let tables = ["batch_state", "batch_state_essays", "batch_state_outcomes"];

    let mut swap = sqlx::PgConnection::connect(&app.db.url).await.unwrap();
    // The shadow as an earlier page left it, committed: the batch at version 2.
    for t in tables {
        sqlx::query(&format!("CREATE TABLE {t}__probe AS SELECT * FROM {t}"))
            .execute(&mut swap)
            .await
            .unwrap();
    }
    // The live model moves on to version 3.
    let added: Value = app
        .add_essays(&teacher, &id, &["e2"])
        .await
        .json()
        .await
        .unwrap();
    let position = added["position"].as_i64().unwrap();
    assert_eq!(app.batch(&teacher, &id, position).await["version"], 3);

    // The swap: the shadow caught up inside its transaction, the tables locked and renamed.
    let mut tx = swap.begin().await.unwrap();
    for t in tables {
        for sql in [
            format!("DELETE FROM {t}__probe"),
            format!("INSERT INTO {t}__probe SELECT * FROM {t}"),
        ] {
            sqlx::query(&sql).execute(&mut *tx).await.unwrap();
        }
    }
    sqlx::query(&format!(
        "LOCK TABLE {} IN ACCESS EXCLUSIVE MODE",
        tables.join(", ")
    ))
    .execute(&mut *tx)
    .await
    .unwrap();
    for t in tables {
        for sql in [
            format!("ALTER TABLE {t} RENAME TO {t}__gone"),
            format!("ALTER TABLE {t}__probe RENAME TO {t}"),
        ] {
            sqlx::query(&sql).execute(&mut *tx).await.unwrap();
        }
    }
    // A reader arrives while the swap holds its locks, and waits for them.
    let reader = {
        let (client, url, token) = (
            app.client.clone(),
            app.url(&format!("/v1/batches/{id}?min_position={position}")),
            teacher.token.clone(),
        );
        tokio::spawn(async move {
            let response = client.get(url).bearer_auth(token).send().await.unwrap();
            response.json::<Value>().await.unwrap()
        })
    };
    wait_until(Duration::from_secs(10), || async {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM pg_stat_activity
              WHERE datname = current_database() AND wait_event_type = 'Lock'",
        )
        .fetch_one(app.storage.pool())
        .await
        .unwrap();
        waiting > 0
    })
    .await;
    tx.commit().await.unwrap();
    let seen = reader.await.unwrap();
    assert_eq!(
        seen["version"], 3,
        "a read with min_position={position} during the swap answered an older version: {seen}"
    );
    assert_eq!(seen["essays"].as_array().unwrap().len(), 2);
}

both_engines!(
    a_rebuild_under_live_write_load_swaps_in_without_a_gap,
    a_rebuild_killed_half_way_leaves_the_live_model_serving_and_resumes,
    verification_finds_a_difference_planted_in_a_read_model_row,
);
