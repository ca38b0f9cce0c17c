//! Failing fast and recovering: PostgreSQL cut off behind a TCP proxy (503 with `Retry-After`
//! within a second or two, `/readyz` says why, service resumes without a restart, nothing
//! accepted is lost), SIGTERM of the real binary with the database unreachable (exits within
//! the drain bound), and the operations endpoints (who may read them, and that a scrape
//! writes nothing and shares a cached snapshot).
#![allow(clippy::unwrap_used)]

use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;

use api::auth::Role;
use commands::Engine;
use integration_tests::proxy::TcpProxy;
use integration_tests::{
    JWT_SECRET, TestApp, TestDatabase, User, assert_problem, both_engines, essayflow_binary,
    postgres_admin_url, wait_until,
};
use reqwest::StatusCode;
use serde_json::{Value, json};

/// `host:port` of the test PostgreSQL server.
fn postgres_target() -> String {
    let admin = postgres_admin_url();
    let rest = admin.split_once("://").unwrap().1;
    let authority = rest.split('/').next().unwrap();
    authority
        .rsplit_once('@')
        .map_or(authority, |(_, a)| a)
        .to_owned()
}

/// Registers a batch; the status, and the batch id when accepted.
async fn try_register(
    client: &reqwest::Client,
    app: &str,
    user: &User,
) -> (StatusCode, Option<String>) {
    let response = client
        .post(format!("{app}/v1/batches"))
        .bearer_auth(&user.token)
        .timeout(Duration::from_secs(20))
        .json(&json!({
            "title": "Persuasive essays",
            "course_code": "EN-101",
            "expected_essay_count": 1,
            "class_designation": "9B",
        }))
        .send()
        .await
        .unwrap();
    let status = response.status();
    let body: Value = response.json().await.unwrap_or_default();
    (status, body["batch_id"].as_str().map(str::to_owned))
}

/// Asserts a 503 `database-unavailable` problem with `Retry-After`.
async fn assert_database_unavailable(response: reqwest::Response) {
    let retry_after = response
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_owned());
    let body = assert_problem(response, StatusCode::SERVICE_UNAVAILABLE).await;
    assert_eq!(body["type"], "urn:essayflow:problem:database-unavailable");
    let retry_after: u64 = retry_after.expect("Retry-After").parse().unwrap();
    assert!(retry_after >= 1, "{retry_after}");
}

/// A metric without labels from Prometheus text.
fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        line.strip_prefix(name)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_cut_off_answers_503_at_once_and_service_resumes_without_a_restart() {
    let proxy = TcpProxy::start(&postgres_target()).await;
    let app = TestApp::spawn_with(Engine::Postgres, |settings| {
        settings.database_url = proxy.postgres_url(&settings.database_url);
    })
    .await;
    let teacher = app.user(Role::Teacher).await;
    let first = app.register_batch(&teacher, 1).await;
    let batch = first["batch_id"].as_str().unwrap().to_owned();

    // Commands all along, from two clients: every 202 must be in the event store at the end,
    // and nothing may be answered other than 202 or 503.
    let accepted = Arc::new(Mutex::new(vec![batch.clone()]));
    let statuses = Arc::new(Mutex::new(Vec::new()));
    let stop = tokio_util::sync::CancellationToken::new();
    let mut load = tokio::task::JoinSet::new();
    for _ in 0..2 {
        let (client, base, user) = (app.client.clone(), app.address.clone(), teacher.clone());
        let (accepted, statuses, stop) = (accepted.clone(), statuses.clone(), stop.clone());
        load.spawn(async move {
            while !stop.is_cancelled() {
                let (status, id) = try_register(&client, &base, &user).await;
                statuses.lock().unwrap().push(status);
                if status == StatusCode::ACCEPTED {
                    accepted.lock().unwrap().push(id.unwrap());
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
    }
    wait_until(Duration::from_secs(10), || async {
        accepted.lock().unwrap().len() >= 5
    })
    .await;

    // Cut: a command and a query answer 503 within 2 s.
    let cut_at = Instant::now();
    proxy.cut();
    let command = app
        .post(
            &teacher,
            "/v1/batches",
            &json!({"title": "T", "course_code": "C", "expected_essay_count": 1, "class_designation": "9B"}),
        )
        .await;
    let command_after = cut_at.elapsed();
    assert_database_unavailable(command).await;
    let query_started = Instant::now();
    let query = app.get(&teacher, &format!("/v1/batches/{batch}")).await;
    let query_took = query_started.elapsed();
    let query_after = cut_at.elapsed();
    assert_database_unavailable(query).await;
    assert!(
        command_after < Duration::from_secs(2) && query_after < Duration::from_secs(2),
        "503s took {command_after:?} and {query_after:?} after the cut"
    );

    // The breaker opens; /readyz says the database is down, and why.
    wait_until(Duration::from_secs(2), || async {
        let ready: Value = app.get_ops("/readyz").await.json().await.unwrap();
        ready["checks"]["database"]["breaker"]["state"] == "open"
    })
    .await;
    let opened_after = cut_at.elapsed();
    let response = app.get_ops("/readyz").await;
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    let ready: Value = response.json().await.unwrap();
    assert_eq!(ready["status"], "unavailable", "{ready}");
    let database = &ready["checks"]["database"];
    assert_eq!(database["status"], "down", "{ready}");
    let why = database["error"].as_str().unwrap();
    assert!(!why.is_empty() && !why.contains("postgres://"), "{why}");
    assert!(database["breaker"]["last_error"].is_string(), "{ready}");
    assert!(database["breaker"]["since"].is_string(), "{ready}");
    let anonymous = app.get_public("/readyz").await;
    assert_eq!(anonymous.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        anonymous.json::<Value>().await.unwrap(),
        json!({ "status": "unavailable" })
    );
    let metrics = app.get_ops("/metrics").await.text().await.unwrap();
    assert_eq!(metric(&metrics, "essayflow_db_breaker_state"), Some(1.0));
    assert!(metric(&metrics, "essayflow_db_breaker_opened_total").unwrap() >= 1.0);
    // While open, refusals are immediate.
    let refused_started = Instant::now();
    let refused = app.get(&teacher, &format!("/v1/batches/{batch}")).await;
    let refusal_took = refused_started.elapsed();
    assert_database_unavailable(refused).await;
    assert!(
        refusal_took < Duration::from_millis(500),
        "{refusal_took:?}"
    );
    // The web page and the API documentation still load (the page then shows its calls' 503s).
    for path in ["/", "/redoc", "/openapi.json"] {
        assert_eq!(
            app.get_public(path).await.status(),
            StatusCode::OK,
            "{path}"
        );
    }

    // Restore: 202 again within a few seconds, same process.
    let restored_at = Instant::now();
    proxy.restore();
    let mut recovered = None;
    while restored_at.elapsed() < Duration::from_secs(10) {
        let (status, id) = try_register(&app.client, &app.address, &teacher).await;
        if status == StatusCode::ACCEPTED {
            accepted.lock().unwrap().push(id.unwrap());
            recovered = Some(restored_at.elapsed());
            break;
        }
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let recovered = recovered.expect("202 again within 10 s of restoring the database");
    assert!(recovered < Duration::from_secs(5), "{recovered:?}");
    wait_until(Duration::from_secs(5), || async {
        let ready: Value = app.get_ops("/readyz").await.json().await.unwrap();
        ready["status"] == "ready" && ready["checks"]["database"]["breaker"]["state"] == "closed"
    })
    .await;
    let before_stop = accepted.lock().unwrap().len();
    wait_until(Duration::from_secs(10), || async {
        accepted.lock().unwrap().len() >= before_stop + 4
    })
    .await;
    stop.cancel();
    while let Some(done) = load.join_next().await {
        done.unwrap();
    }
    eprintln!(
        "cut: command 503 after {command_after:?}, query 503 in {query_took:?} ({query_after:?} after the cut), \
         breaker seen open {opened_after:?} after the cut, refusal while open {refusal_took:?}; \
         restored: 202 after {recovered:?}"
    );

    // Nothing but 202 and 503 was answered, and every 202 is in the event store.
    let statuses = statuses.lock().unwrap().clone();
    assert!(
        statuses
            .iter()
            .all(|s| *s == StatusCode::ACCEPTED || *s == StatusCode::SERVICE_UNAVAILABLE),
        "{statuses:?}"
    );
    assert!(statuses.contains(&StatusCode::SERVICE_UNAVAILABLE));
    let accepted = accepted.lock().unwrap().clone();
    let mut direct: sqlx::PgConnection = sqlx::Connection::connect(&app.db.url).await.unwrap();
    let stored: i64 = sqlx::query_scalar(
        "SELECT COUNT(DISTINCT aggregate_id) FROM events
          WHERE event_type = 'BatchRegistered' AND aggregate_id = ANY($1)",
    )
    .bind(&accepted)
    .fetch_one(&mut direct)
    .await
    .unwrap();
    assert_eq!(
        stored,
        accepted.len() as i64,
        "every 202 is in the event store"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_the_database_unreachable_exits_within_the_drain_bound() {
    let db = TestDatabase::create(Engine::Postgres).await;
    let proxy = TcpProxy::start(&postgres_target()).await;
    let port = integration_tests::kafka::free_port();
    let drain_secs = 3;
    let mut child = Command::new(essayflow_binary())
        .arg("serve")
        .env("ESSAYFLOW_DATABASE_URL", proxy.postgres_url(&db.url))
        .env("ESSAYFLOW_JWT_SECRET", JWT_SECRET)
        .env("ESSAYFLOW_BIND", format!("127.0.0.1:{port}"))
        .env("ESSAYFLOW_HTTP_DRAIN_TIMEOUT_SECS", drain_secs.to_string())
        .env("ESSAYFLOW_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();
    wait_until(Duration::from_secs(60), || async {
        matches!(client.get(format!("{base}/healthz")).send().await, Ok(r) if r.status().is_success())
    })
    .await;
    let ready = client.get(format!("{base}/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), StatusCode::OK);

    proxy.cut();
    // The process has noticed: anonymous readiness is unavailable.
    wait_until(Duration::from_secs(5), || async {
        client
            .get(format!("{base}/readyz"))
            .send()
            .await
            .is_ok_and(|r| r.status() == StatusCode::SERVICE_UNAVAILABLE)
    })
    .await;
    // Work in flight that would outlast the bound: a command whose body trickles in (its
    // refusal lingers reading the rest, up to 5 s), and an idle kept-alive connection.
    let mut slow = tokio::net::TcpStream::connect(format!("127.0.0.1:{port}"))
        .await
        .unwrap();
    slow.write_all(
        b"POST /v1/batches HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"title\"",
    )
    .await
    .unwrap();
    let mut idle = tokio::net::TcpStream::connect(format!("127.0.0.1:{port}"))
        .await
        .unwrap();
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let signalled = Instant::now();
    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let bound = Duration::from_secs(drain_secs) + Duration::from_millis(1500);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if signalled.elapsed() > bound {
            let _ = child.kill();
            let _ = child.wait();
            panic!("still running {bound:?} after SIGTERM");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let took = signalled.elapsed();
    eprintln!("SIGTERM with the database unreachable: exited in {took:?} ({status})");
    assert!(status.success(), "{status}");
    drop((slow, idle, proxy));
}

async fn operations_endpoints_need_an_admin_or_the_ops_listener(engine: Engine) {
    let app = TestApp::spawn(engine).await;
    let teacher = app.user(Role::Teacher).await;
    let admin = app.user(Role::Admin).await;

    // /metrics: admin only on the main listener, open on the operations listener.
    assert_problem(app.get_public("/metrics").await, StatusCode::UNAUTHORIZED).await;
    assert_problem(app.get(&teacher, "/metrics").await, StatusCode::FORBIDDEN).await;
    let as_admin = app.get(&admin, "/metrics").await;
    assert_eq!(as_admin.status(), StatusCode::OK);
    let text = as_admin.text().await.unwrap();
    assert_eq!(metric(&text, "essayflow_db_breaker_state"), Some(0.0));
    let ops = app.get_ops("/metrics").await;
    assert_eq!(ops.status(), StatusCode::OK);
    let text = ops.text().await.unwrap();
    for name in [
        "essayflow_db_breaker_state",
        "essayflow_db_breaker_opened_total",
        "essayflow_http_connections",
        "essayflow_http_connections_refused_total",
        "essayflow_ws_connection_slots",
        "essayflow_http_requests_in_flight",
        "process_start_time_seconds",
    ] {
        assert!(metric(&text, name).is_some(), "{name} in {text}");
    }
    assert!(metric(&text, "essayflow_http_connections").unwrap() >= 1.0);

    // /readyz: the status alone anonymously, the detail to an admin and on the ops listener.
    let anonymous = app.get_public("/readyz").await;
    assert_eq!(anonymous.status(), StatusCode::OK);
    assert_eq!(
        anonymous.json::<Value>().await.unwrap(),
        json!({ "status": "ready" })
    );
    assert_problem(app.get(&teacher, "/readyz").await, StatusCode::FORBIDDEN).await;
    for detailed in [
        app.get_json(&admin, "/readyz").await,
        app.get_ops("/readyz").await.json().await.unwrap(),
    ] {
        assert_eq!(detailed["status"], "ready", "{detailed}");
        let database = &detailed["checks"]["database"];
        assert_eq!(database["status"], "ok", "{detailed}");
        assert_eq!(database["breaker"]["state"], "closed", "{detailed}");
        assert!(detailed["checks"]["projections"].is_array(), "{detailed}");
        assert!(detailed["snapshot"]["taken_at"].is_string(), "{detailed}");
    }
    // /healthz stays open on both; the ops listener serves nothing else.
    assert_eq!(app.get_public("/healthz").await.status(), StatusCode::OK);
    assert_eq!(app.get_ops("/healthz").await.status(), StatusCode::OK);
    assert_problem(app.get_ops("/v1/batches").await, StatusCode::NOT_FOUND).await;
    app.stop().await;
}

both_engines!(operations_endpoints_need_an_admin_or_the_ops_listener);

/// The position every reader of the log has reached, if they all agree with the log's end.
async fn quiet(direct: &mut sqlx::PgConnection) -> bool {
    let (readers, behind): (i64, i64) = sqlx::query_as(
        "SELECT COUNT(*),
                COUNT(*) FILTER (WHERE position <> (SELECT COALESCE(MAX(global_position), 0) FROM events))
           FROM projection_checkpoints
          WHERE name IN ('batch_state', 'dashboard', 'relay', 'conductor')",
    )
    .fetch_one(direct)
    .await
    .unwrap();
    readers == 4 && behind == 0
}

/// Statements that wrote to the checkpoint table since the trigger was made.
async fn writes(direct: &mut sqlx::PgConnection) -> i64 {
    sqlx::query_scalar("SELECT COUNT(*) FROM scrape_writes")
        .fetch_one(direct)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scrape_writes_nothing_and_shares_the_cached_snapshot() {
    let app = TestApp::spawn_with(Engine::Postgres, |settings| {
        settings.ops.cache_ms = 60_000;
    })
    .await;
    let teacher = app.user(Role::Teacher).await;
    app.register_batch(&teacher, 1).await;
    let mut direct: sqlx::PgConnection = sqlx::Connection::connect(&app.db.url).await.unwrap();
    let mut settled = false;
    for _ in 0..500 {
        if quiet(&mut direct).await {
            settled = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(settled, "the workers caught up with the log");

    // Every statement that writes the checkpoint table is noted, even one that changes no
    // row (the `INSERT ... ON CONFLICT DO NOTHING` a scrape used to run).
    for statement in [
        "CREATE TABLE scrape_writes (op text NOT NULL)",
        "CREATE FUNCTION note_scrape_write() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN INSERT INTO scrape_writes (op) VALUES (TG_OP); RETURN NULL; END $$",
        "CREATE TRIGGER note_checkpoint_writes
           AFTER INSERT OR UPDATE OR DELETE ON projection_checkpoints
           FOR EACH STATEMENT EXECUTE FUNCTION note_scrape_write()",
    ] {
        sqlx::Executor::execute(&mut direct, statement)
            .await
            .unwrap();
    }

    let first: Value = app.get_ops("/readyz").await.json().await.unwrap();
    let metrics = app.get_ops("/metrics").await.text().await.unwrap();
    let second: Value = app.get_ops("/readyz").await.json().await.unwrap();
    let admin = app.user(Role::Admin).await;
    let third = app.get_json(&admin, "/readyz").await;
    assert_eq!(first["status"], "ready", "{first}");
    assert_eq!(first["checks"]["projections"][0]["lag"], 0, "{first}");
    assert_eq!(first["checks"]["pipeline"]["relay"]["lag"], 0, "{first}");
    assert!(first["snapshot"]["error"].is_null(), "{first}");
    assert!(metrics.contains("essayflow_projection_lag_events{projection=\"batch_state\"} 0"));
    // One reading, shared by every scrape within the cache time.
    assert_eq!(
        first["snapshot"]["taken_at"],
        second["snapshot"]["taken_at"]
    );
    assert_eq!(first["snapshot"]["taken_at"], third["snapshot"]["taken_at"]);
    assert!(second["snapshot"]["age_ms"].as_u64() >= first["snapshot"]["age_ms"].as_u64());
    assert_eq!(first["snapshot"]["max_age_ms"], 60_000);
    assert_eq!(
        writes(&mut direct).await,
        0,
        "the scrapes wrote to the checkpoint table"
    );

    // The detector works: the old status query's insert is noted.
    commands::checkpoint::ensure_checkpoint(app.storage.pool(), "batch_state")
        .await
        .unwrap();
    assert_eq!(writes(&mut direct).await, 1);
    app.stop().await;
}
