//! Live projection streams over WebSocket (`GET /v1/ws`), with a real tokio-tungstenite
//! client: snapshots and contiguous changes through a whole pipeline, resuming with `since`,
//! authentication at the handshake, every refusal of bad client behaviour, connection hygiene,
//! WSS over TLS, and two server processes on one PostgreSQL database.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use api::auth::Role;
use commands::Engine;
use futures::SinkExt;
use integration_tests::ws::{ServerProcess, TestCa, TopicLog, WsClient, ws_url};
use integration_tests::{TempDir, TestApp, TestDatabase, User, both_engines, wait_until};
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::{self, HeaderValue};
use tokio_tungstenite::tungstenite::{self, Message};

async fn with_simulator(engine: Engine, latency_ms: u64) -> TestApp {
    TestApp::spawn_with(engine, |s| {
        s.simulate_processors = true;
        s.simulator_latency_ms = latency_ms;
    })
    .await
}

/// A ready batch whose read model has caught up (so that it can be subscribed to).
async fn ready_batch(app: &TestApp, teacher: &User, essays: &[&str]) -> (String, Value) {
    let id = app.ready_batch(teacher, essays).await;
    app.wait_for_projections().await;
    let view = app.get_json(teacher, &format!("/v1/batches/{id}")).await;
    (id, view)
}

/// Subscribes and returns the first message after `subscribed`.
async fn subscribe(client: &mut WsClient, topic: &str, since: Option<i64>) -> Value {
    client.subscribe(topic, since).await;
    let subscribed = client.next_json().await;
    assert_eq!(subscribed, json!({"type": "subscribed", "topic": topic}));
    client.next_json().await
}

async fn a_subscriber_sees_the_snapshot_and_every_change_of_a_pipeline(engine: Engine) {
    let app = with_simulator(engine, 0).await;
    let teacher = app.user(Role::Teacher).await;
    let (id, before) = ready_batch(&app, &teacher, &["e1", "e2", "e3"]).await;
    let topic = format!("batch:{id}");
    let mut client = app.ws(&teacher).await;

    let snapshot = subscribe(&mut client, &topic, None).await;
    assert_eq!(snapshot["type"], "snapshot");
    assert_eq!(snapshot["topic"], topic.as_str());
    assert_eq!(
        snapshot["data"], before,
        "the snapshot is the batch as GET shows it"
    );
    let mut batch = TopicLog::default();
    batch.take(&snapshot);
    let dashboard_snapshot = subscribe(&mut client, "dashboard", None).await;
    assert_eq!(dashboard_snapshot["type"], "snapshot");
    let mut dashboard = TopicLog::default();
    dashboard.take(&dashboard_snapshot);

    app.request_pipeline(&teacher, &id, "ai_feedback").await;
    // Every change of both topics, in order, until the batch's pipeline completes.
    while batch.data["status"] != "completed" {
        let message = client.next_json().await;
        match message["topic"].as_str().unwrap() {
            "dashboard" => dashboard.take(&message),
            t if t == topic => batch.take(&message),
            other => panic!("a message of a topic not subscribed to: {other}"),
        }
    }
    let after = app.get_json(&teacher, &format!("/v1/batches/{id}")).await;
    assert_eq!(batch.data, after, "the final change is what GET shows");
    assert_eq!(batch.snapshots, [before["version"].as_i64().unwrap()]);
    assert_eq!(
        batch.changes.len() as i64,
        after["version"].as_i64().unwrap() - before["version"].as_i64().unwrap(),
        "one change per event"
    );
    // 3 phases x 3 essays of results, each a change of its own.
    assert!(batch.changes.len() >= 9 + 3, "{:?}", batch.changes);

    // The dashboard's stream ends at what GET /v1/dashboard shows once it has caught up.
    let position = after["position"].as_i64().unwrap();
    let expected = app
        .get_json(&teacher, &format!("/v1/dashboard?min_position={position}"))
        .await;
    while dashboard.data != expected {
        let message = client.next_json().await;
        assert_eq!(message["topic"], "dashboard", "{message}");
        dashboard.take(&message);
    }
    assert!(!dashboard.changes.is_empty());
}

async fn a_client_that_reconnects_with_since_misses_nothing_and_gets_nothing_twice(engine: Engine) {
    let app = with_simulator(engine, 30).await;
    let teacher = app.user(Role::Teacher).await;
    let (id, _) = ready_batch(&app, &teacher, &["e1", "e2", "e3", "e4"]).await;
    let topic = format!("batch:{id}");

    let mut first = app.ws(&teacher).await;
    let mut log = TopicLog::default();
    log.take(&subscribe(&mut first, &topic, None).await);
    app.request_pipeline(&teacher, &id, "ai_feedback").await;
    // Disconnect mid-pipeline: after the first results are in.
    while log.data["phases"]["spellcheck"]
        .as_object()
        .is_none_or(|p| p.len() < 2)
    {
        log.take(&first.next_json().await);
    }
    first.socket.close(None).await.unwrap();
    drop(first);
    let seen_before = log.version;
    assert_ne!(log.data["status"], "completed", "disconnected mid-pipeline");

    // Let the pipeline move on without us, then resume from the last version seen.
    app.wait_for_phase(&teacher, &id, "nlp").await;
    let mut second = app.ws(&teacher).await;
    second.subscribe(&topic, Some(seen_before)).await;
    assert_eq!(second.next_json().await["type"], "subscribed");
    let mut resumed = TopicLog {
        version: seen_before,
        data: log.data.clone(),
        ..TopicLog::default()
    };
    while resumed.data["status"] != "completed" {
        resumed.take(&second.next_json().await);
    }
    assert!(
        resumed.snapshots.is_empty(),
        "the missed changes, not a snapshot"
    );
    assert_eq!(resumed.changes.first(), Some(&(seen_before + 1)));
    let mut union = log.changes.clone();
    union.extend(&resumed.changes);
    let first_version = log.snapshots[0];
    let last = resumed.version;
    assert_eq!(
        union,
        ((first_version + 1)..=last).collect::<Vec<_>>(),
        "no gap and no duplicate across the reconnect"
    );
    let after = app.get_json(&teacher, &format!("/v1/batches/{id}")).await;
    assert_eq!(resumed.data, after);

    // Up to date already: nothing until the next change. From the future: a fresh snapshot.
    let mut third = app.ws(&teacher).await;
    let snapshot = subscribe(&mut third, &topic, Some(last + 100)).await;
    assert_eq!(snapshot["type"], "snapshot");
    assert_eq!(snapshot["version"], last);
    // Resubscribing with the current version sends only `subscribed`: the next message is the
    // answer to the one after it, not a repeat of the batch.
    third.subscribe(&topic, Some(last)).await;
    third
        .send(json!({"type": "unsubscribe", "topic": "dashboard"}))
        .await;
    assert_eq!(
        third.next_json().await,
        json!({"type": "subscribed", "topic": topic})
    );
    assert_eq!(third.next_json().await["code"], "not_subscribed");
}

/// A dashboard's lists at their limits: more than 50 active and 20 finished batches, batches
/// leaving and entering both lists (pipelines on old batches, a cancel, a re-requested
/// pipeline), essay ids at the edges of what is allowed, one client applying every dashboard
/// and batch patch: it ends with what GET shows.
async fn dashboard_lists_at_their_limits_patch_to_what_get_shows(engine: Engine) {
    let app = TestApp::spawn_with(engine, |s| {
        s.simulate_processors = true;
        s.simulator_latency_ms = 0;
    })
    .await;
    let teacher = app.user(Role::Teacher).await;
    let odd = ["-", "0", "a.b:c", "e_1", "10"];
    let mut ids = Vec::new();
    for i in 0..6 {
        let essays: &[&str] = if i == 0 { &odd } else { &["e1"] };
        ids.push(app.ready_batch(&teacher, essays).await);
    }
    app.wait_for_projections().await;
    let mut client = app.ws(&teacher).await;
    let mut logs = std::collections::HashMap::new();
    let watched = format!("batch:{}", ids[0]);
    for topic in ["dashboard", watched.as_str()] {
        client.subscribe(topic, None).await;
        assert_eq!(client.next_json().await["type"], "subscribed");
        let mut log = TopicLog::default();
        log.take(&client.next_json().await);
        logs.insert(topic.to_owned(), log);
    }
    // The oldest batches run pipelines while 50 newer ones push them out of the active list.
    for _ in 0..50 {
        app.register_batch(&teacher, 1).await;
    }
    for id in &ids[..4] {
        app.request_pipeline(&teacher, id, "spellcheck").await;
    }
    // Twenty more finish: the recently finished list overflows.
    let mut more = Vec::new();
    for _ in 0..22 {
        more.push(app.ready_batch(&teacher, &["x"]).await);
    }
    for id in &more {
        app.request_pipeline(&teacher, id, "spellcheck").await;
    }
    for id in &ids[..4] {
        app.wait_for_status(&teacher, id, "completed").await;
    }
    // A finished batch goes back to work, another is cancelled, a third re-runs.
    app.request_pipeline(&teacher, &ids[0], "nlp").await;
    let r = app
        .post(
            &teacher,
            &format!("/v1/batches/{}/cancel", ids[5]),
            &json!({}),
        )
        .await;
    assert_eq!(r.status(), reqwest::StatusCode::ACCEPTED);
    for id in &more {
        app.wait_for_status(&teacher, id, "completed").await;
    }
    app.request_pipeline(&teacher, &more[21], "cj_assessment")
        .await;
    app.wait_for_projections().await;
    app.wait_for_status(&teacher, &more[21], "completed").await;
    app.wait_for_status(&teacher, &ids[0], "completed").await;
    app.wait_for_projections().await;
    // Every change, applied, until the client holds what GET shows.
    let dashboard = app.get_json(&teacher, "/v1/dashboard").await;
    let batch = app
        .get_json(&teacher, &format!("/v1/batches/{}", ids[0]))
        .await;
    while logs["dashboard"].data != dashboard || logs[watched.as_str()].data != batch {
        let message = client.next_json().await;
        let topic = message["topic"].as_str().unwrap_or_default().to_owned();
        logs.get_mut(&topic).unwrap().take(&message);
    }
    assert_eq!(
        logs["dashboard"].snapshots.len(),
        1,
        "only changes after the snapshot"
    );
    assert!(
        logs["dashboard"].changes.len() > 20,
        "{}",
        logs["dashboard"].changes.len()
    );
}

both_engines!(
    a_subscriber_sees_the_snapshot_and_every_change_of_a_pipeline,
    dashboard_lists_at_their_limits_patch_to_what_get_shows,
    a_client_that_reconnects_with_since_misses_nothing_and_gets_nothing_twice,
);

fn request(url: &str) -> http::Request<()> {
    url.into_client_request().unwrap()
}

/// The HTTP answer of a refused upgrade.
async fn refused(request: http::Request<()>) -> (StatusCode, Value) {
    match WsClient::connect(request, None).await {
        Ok(_) => panic!("the upgrade was accepted"),
        Err(tungstenite::Error::Http(response)) => {
            let content_type = response.headers()[http::header::CONTENT_TYPE]
                .to_str()
                .unwrap()
                .to_owned();
            assert_eq!(content_type, "application/problem+json");
            let body: Value = serde_json::from_slice(response.body().as_ref().unwrap()).unwrap();
            (
                StatusCode::from_u16(response.status().as_u16()).unwrap(),
                body,
            )
        }
        Err(other) => panic!("expected an HTTP refusal, got {other}"),
    }
}

/// `user`'s token with another expiry, signed with `secret`.
fn token_with(secret: &str, user: &User, expires_in: i64) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let mut claims = integration_tests::claims_of(&user.token);
    claims["iat"] = json!(now - 7200);
    claims["nbf"] = json!(now - 7200);
    claims["exp"] = json!(now + expires_in);
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_handshake_refuses_missing_forged_and_expired_tokens_and_accepts_three_ways() {
    let app = TestApp::spawn(Engine::Sqlite).await;
    let teacher = app.user(Role::Teacher).await;
    let url = ws_url(&app.address);

    let (status, body) = refused(request(&url)).await;
    assert_eq!(
        (status, body["status"].as_i64()),
        (StatusCode::UNAUTHORIZED, Some(401))
    );
    let forged = token_with("another-secret-that-is-long-enough-too!!", &teacher, 3600);
    let expired = token_with(integration_tests::JWT_SECRET, &teacher, -3600);
    for token in [forged.as_str(), expired.as_str(), "not-a-jwt"] {
        let mut with_header = request(&url);
        with_header.headers_mut().insert(
            http::header::AUTHORIZATION,
            HeaderValue::from_str(&format!("Bearer {token}")).unwrap(),
        );
        assert_eq!(refused(with_header).await.0, StatusCode::UNAUTHORIZED);
        let in_query = request(&format!("{url}?access_token={token}"));
        assert_eq!(refused(in_query).await.0, StatusCode::UNAUTHORIZED);
    }
    // A valid token, signed by the server's secret, is accepted: so the refusals above were
    // about the token, not the test's way of making one.
    let valid = token_with(integration_tests::JWT_SECRET, &teacher, 3600);

    // Three ways to present a token.
    let mut by_header = WsClient::bearer(&url, &valid).await;
    assert_eq!(
        subscribe(&mut by_header, "dashboard", None).await["type"],
        "snapshot"
    );
    let mut by_query = WsClient::connect(
        request(&format!("{url}?access_token={}", teacher.token)),
        None,
    )
    .await
    .unwrap();
    assert_eq!(
        subscribe(&mut by_query, "dashboard", None).await["type"],
        "snapshot"
    );
    let mut by_protocol = request(&url);
    by_protocol.headers_mut().insert(
        http::header::SEC_WEBSOCKET_PROTOCOL,
        HeaderValue::from_str(&format!("essayflow.v1, bearer.{}", teacher.token)).unwrap(),
    );
    let mut by_protocol = WsClient::connect(by_protocol, None).await.unwrap();
    assert_eq!(by_protocol.protocol.as_deref(), Some("essayflow.v1"));
    assert_eq!(
        subscribe(&mut by_protocol, "dashboard", None).await["type"],
        "snapshot"
    );

    // The scheme and the subprotocol prefix are matched in any case (RFC 9110 section 11.1).
    for scheme in ["bearer", "BEARER"] {
        let mut lower = request(&url);
        lower.headers_mut().insert(
            http::header::AUTHORIZATION,
            HeaderValue::from_str(&format!("{scheme} {}", teacher.token)).unwrap(),
        );
        let mut client = WsClient::connect(lower, None).await.unwrap();
        assert_eq!(
            subscribe(&mut client, "dashboard", None).await["type"],
            "snapshot"
        );
    }
    let mut upper_protocol = request(&url);
    upper_protocol.headers_mut().insert(
        http::header::SEC_WEBSOCKET_PROTOCOL,
        HeaderValue::from_str(&format!("essayflow.v1, Bearer.{}", teacher.token)).unwrap(),
    );
    let mut client = WsClient::connect(upper_protocol, None).await.unwrap();
    assert_eq!(
        subscribe(&mut client, "dashboard", None).await["type"],
        "snapshot"
    );

    // Not an upgrade at all: 426 problem+json.
    let plain = app.get(&teacher, "/v1/ws").await;
    integration_tests::assert_problem(plain, StatusCode::UPGRADE_REQUIRED).await;
}

async fn error_of(client: &mut WsClient, message: Message) -> Value {
    client.socket.send(message).await.unwrap();
    let answer = client.next_json().await;
    assert_eq!(answer["type"], "error", "{answer}");
    assert!(answer.get("data").is_none());
    answer
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_client_messages_get_their_documented_answers_and_the_server_stays_healthy() {
    let app = TestApp::spawn_with(Engine::Sqlite, |s| {
        s.ws.messages_per_second = 1000;
        s.ws.message_burst = 1000;
    })
    .await;
    let teacher = app.user(Role::Teacher).await;
    let other = app.user(Role::Teacher).await;
    let (theirs, _) = ready_batch(&app, &other, &["e1"]).await;
    let mut client = app.ws(&teacher).await;

    let text = |s: &str| Message::Text(s.to_owned().into());
    for (message, code) in [
        (text("not json"), "malformed"),
        (text(r#"{"type":"subscribe"}"#), "malformed"),
        (
            text(r#"{"type":"explode","topic":"dashboard"}"#),
            "malformed",
        ),
        (
            text(r#"{"type":"subscribe","topic":"dashboard","extra":1}"#),
            "malformed",
        ),
        (Message::Binary(vec![1, 2, 3].into()), "malformed"),
        (
            text(r#"{"type":"subscribe","topic":"batch:not-a-uuid"}"#),
            "invalid_topic",
        ),
        (
            text(r#"{"type":"subscribe","topic":"everything"}"#),
            "invalid_topic",
        ),
        (
            text(r#"{"type":"unsubscribe","topic":"dashboard"}"#),
            "not_subscribed",
        ),
    ] {
        assert_eq!(error_of(&mut client, message).await["code"], code);
    }

    // Another teacher's batch and a batch that does not exist get the same answer, no data.
    let foreign = error_of(
        &mut client,
        text(&json!({"type": "subscribe", "topic": format!("batch:{theirs}")}).to_string()),
    )
    .await;
    let missing_topic = format!("batch:{}", uuid::Uuid::new_v4());
    let missing = error_of(
        &mut client,
        text(&json!({"type": "subscribe", "topic": missing_topic}).to_string()),
    )
    .await;
    assert_eq!(foreign["code"], "not_found");
    assert_eq!(
        (&foreign["code"], &foreign["message"]),
        (&missing["code"], &missing["message"])
    );

    // At most 100 subscriptions: the dashboard and 99 batches; the 101st is refused.
    let mut batches = Vec::new();
    let mut last_position = 0;
    for _ in 0..100 {
        let created = app.register_batch(&teacher, 1).await;
        batches.push(created["batch_id"].as_str().unwrap().to_owned());
        last_position = created["position"].as_i64().unwrap();
    }
    client
        .send(json!({"type": "subscribe", "topic": "dashboard", "min_position": last_position}))
        .await;
    assert_eq!(client.next_json().await["type"], "subscribed");
    assert_eq!(client.next_json().await["type"], "snapshot");
    for id in &batches[..99] {
        assert_eq!(
            subscribe(&mut client, &format!("batch:{id}"), None).await["type"],
            "snapshot"
        );
    }
    client
        .subscribe(&format!("batch:{}", batches[99]), None)
        .await;
    let refused = client.next_json().await;
    assert_eq!(refused["code"], "too_many_subscriptions", "{refused}");
    client
        .send(json!({"type": "unsubscribe", "topic": format!("batch:{}", batches[0])}))
        .await;
    assert_eq!(client.next_json().await["type"], "unsubscribed");
    let snapshot = subscribe(&mut client, &format!("batch:{}", batches[99]), None).await;
    assert_eq!(snapshot["type"], "snapshot");

    // Oversized: the connection is closed with 1009.
    let big = format!(r#"{{"type":"subscribe","topic":"{}"}}"#, "x".repeat(5000));
    client.socket.send(text(&big)).await.unwrap();
    assert_eq!(u16::from(client.closed().await.code), 1009);

    // Healthy: a new connection works, and so does HTTP.
    assert_eq!(app.get_public("/healthz").await.status(), StatusCode::OK);
    let mut fresh = app.ws(&teacher).await;
    assert_eq!(
        subscribe(&mut fresh, "dashboard", None).await["type"],
        "snapshot"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_frequent_messages_are_refused_then_the_connection_is_closed() {
    let app = TestApp::spawn_with(Engine::Sqlite, |s| {
        s.ws.messages_per_second = 2;
        s.ws.message_burst = 5;
    })
    .await;
    let teacher = app.user(Role::Teacher).await;
    let unsubscribe = json!({"type": "unsubscribe", "topic": "dashboard"});

    // A short burst over the limit: refused with rate_limited, the connection stays.
    let mut client = app.ws(&teacher).await;
    for _ in 0..8 {
        client.send(unsubscribe.clone()).await;
    }
    let mut codes = Vec::new();
    for _ in 0..8 {
        codes.push(
            client.next_json().await["code"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }
    assert_eq!(
        codes.iter().filter(|c| *c == "not_subscribed").count(),
        5,
        "{codes:?}"
    );
    assert_eq!(
        codes.iter().filter(|c| *c == "rate_limited").count(),
        3,
        "{codes:?}"
    );
    // The bucket refills at 2 per second: a second later a message is served again. (The
    // wait is the behaviour under test, not synchronisation.)
    tokio::time::sleep(Duration::from_secs(1)).await;
    client.send(unsubscribe.clone()).await;
    assert_eq!(client.next_json().await["code"], "not_subscribed");

    // A flood: closed with 1008 (policy).
    let mut flooder = app.ws(&teacher).await;
    for _ in 0..30 {
        if flooder
            .socket
            .send(Message::Text(unsubscribe.to_string().into()))
            .await
            .is_err()
        {
            break;
        }
    }
    assert_eq!(u16::from(flooder.closed().await.code), 1008);
    // Binary frames count too.
    let mut flooder = app.ws(&teacher).await;
    for _ in 0..30 {
        if flooder
            .socket
            .send(Message::Binary(vec![0; 8].into()))
            .await
            .is_err()
        {
            break;
        }
    }
    assert_eq!(u16::from(flooder.closed().await.code), 1008);
    assert_eq!(app.get_public("/healthz").await.status(), StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_pings_closes_idle_connections_and_says_1001_when_it_stops() {
    let app = TestApp::spawn_with(Engine::Sqlite, |s| {
        s.ws.ping_interval_secs = 1;
        s.ws.idle_timeout_secs = 3;
    })
    .await;
    let teacher = app.user(Role::Teacher).await;

    // A client that reads (and so answers pings) stays; one that does not is closed.
    let mut reader = app.ws(&teacher).await;
    let silent = app.ws(&teacher).await;
    wait_until(Duration::from_secs(10), || async {
        app.metric("essayflow_ws_connections").await == Some(2)
    })
    .await;
    let read_for = tokio::time::Instant::now() + Duration::from_secs(5);
    let mut pings = 0;
    while let Ok(Some(frame)) =
        tokio::time::timeout_at(read_for, futures::StreamExt::next(&mut reader.socket)).await
    {
        match frame.unwrap() {
            Message::Ping(_) => pings += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(pings >= 3, "pinged every second: {pings}");
    assert_eq!(
        app.metric("essayflow_ws_connections").await,
        Some(1),
        "the silent client was closed"
    );
    // (Read raw: a client library would try to answer the queued pings on the closed socket.)
    assert_eq!(silent.raw_close_code().await, 1000);

    // Shutdown: the reader gets 1001, and the server stops (no session outlives it).
    let reader_closed = tokio::spawn(async move { reader.closed().await });
    tokio::time::timeout(Duration::from_secs(20), app.stop())
        .await
        .expect("the server stopped");
    assert_eq!(u16::from(reader_closed.await.unwrap().code), 1001);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wss_and_https_work_end_to_end_with_a_generated_ca() {
    let dir = TempDir::new();
    let ca = TestCa::generate(&dir.path);
    let app = TestApp::spawn_with(Engine::Sqlite, |s| {
        s.tls_cert = Some(ca.cert.clone());
        s.tls_key = Some(ca.key.clone());
        s.simulate_processors = true;
        s.simulator_latency_ms = 0;
    })
    .await;
    let port = app.address.rsplit(':').next().unwrap().to_owned();
    let https = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(ca.ca_pem.as_bytes()).unwrap())
        .build()
        .unwrap();
    let base = format!("https://localhost:{port}");
    let health = https.get(format!("{base}/healthz")).send().await.unwrap();
    assert_eq!(health.status(), StatusCode::OK);
    // Served over TLS: browsers are told to keep to HTTPS.
    assert_eq!(
        health.headers()["strict-transport-security"],
        "max-age=31536000"
    );
    // Plain HTTP to the TLS port gets nowhere.
    assert!(
        reqwest::get(format!("http://127.0.0.1:{port}/healthz"))
            .await
            .is_err()
    );

    // A teacher that logs in over HTTPS (the helpers speak plain HTTP).
    let password = "correct horse battery";
    let stored = api::auth::add_user(app.storage.pool(), "tls-teacher", Role::Teacher, password)
        .await
        .unwrap();
    let login: Value = https
        .post(format!("{base}/v1/auth/login"))
        .json(&json!({ "username": "tls-teacher", "password": password }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let teacher = User {
        id: stored.id.to_string(),
        username: "tls-teacher".to_owned(),
        token: login["access_token"].as_str().unwrap().to_owned(),
        refresh: login["refresh_token"].as_str().unwrap().to_owned(),
    };
    let mut request = request(&format!("wss://localhost:{port}/v1/ws"));
    request.headers_mut().insert(
        http::header::AUTHORIZATION,
        HeaderValue::from_str(&format!("Bearer {}", teacher.token)).unwrap(),
    );
    let mut client = WsClient::connect(request, Some(ca.client_config()))
        .await
        .unwrap();
    let snapshot = subscribe(&mut client, "dashboard", None).await;
    assert_eq!(snapshot["type"], "snapshot");
    // A command over HTTPS reaches the WSS client as a change.
    let created = https
        .post(format!("{base}/v1/batches"))
        .bearer_auth(&teacher.token)
        .json(&json!({"title": "t", "course_code": "C1", "expected_essay_count": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), StatusCode::ACCEPTED);
    let mut dashboard = TopicLog::default();
    dashboard.take(&snapshot);
    let change = client.next_json().await;
    assert_eq!(change["type"], "change");
    dashboard.take(&change);
    assert_eq!(dashboard.version, snapshot["version"].as_i64().unwrap() + 1);
    assert_eq!(dashboard.data["totals"]["registered"], 1);
}

/// Two `essayflow serve` processes on one PostgreSQL database (and Kafka when `kafka`): a
/// command sent to one node reaches clients on both, whichever node runs the projections.
async fn two_nodes(kafka: bool) {
    let db = TestDatabase::create(Engine::Postgres).await;
    let mut env = Vec::new();
    if kafka {
        env.push((
            "ESSAYFLOW_KAFKA_BROKERS",
            integration_tests::kafka::test_brokers(),
        ));
        env.push((
            "ESSAYFLOW_TOPIC_PREFIX",
            integration_tests::kafka::unique_prefix(),
        ));
    }
    // A starts first and takes the projection workers; B's wait on standby.
    let a = ServerProcess::start(&db.url, &env).await;
    let b = ServerProcess::start(&db.url, &env).await;
    let storage = commands::Storage::connect(&commands::StorageOptions::new(db.url.clone()))
        .await
        .unwrap();
    let user = api::auth::add_user(storage.pool(), "two-nodes", Role::Teacher, "password123")
        .await
        .unwrap();
    let client = reqwest::Client::new();
    let login: Value = client
        .post(format!("{}/v1/auth/login", a.address))
        .json(&json!({"username": "two-nodes", "password": "password123"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let token = login["access_token"].as_str().unwrap().to_owned();
    assert_eq!(user.username, "two-nodes");

    let mut on_a = WsClient::bearer(&ws_url(&a.address), &token).await;
    let mut on_b = WsClient::bearer(&ws_url(&b.address), &token).await;
    let mut logs = [TopicLog::default(), TopicLog::default()];
    for (client, log) in [&mut on_a, &mut on_b].into_iter().zip(logs.iter_mut()) {
        log.take(&subscribe(client, "dashboard", None).await);
    }
    // Commands go to A only.
    let mut created = Value::Null;
    for _ in 0..3 {
        let response = client
            .post(format!("{}/v1/batches", a.address))
            .bearer_auth(&token)
            .json(&json!({"title": "t", "course_code": "C1", "expected_essay_count": 2}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::ACCEPTED);
        created = response.json().await.unwrap();
    }
    for (client, log) in [&mut on_a, &mut on_b].into_iter().zip(logs.iter_mut()) {
        while log.data["totals"]["registered"] != 3 {
            log.take(&client.next_json().await);
        }
    }
    assert_eq!(logs[0].version, logs[1].version);
    assert_eq!(logs[0].data, logs[1].data);
    // And a batch topic subscribed on B follows a command sent to A.
    let batch = created["batch_id"].as_str().unwrap().to_owned();
    let topic = format!("batch:{batch}");
    on_b.send(json!({"type": "subscribe", "topic": topic, "min_position": created["position"]}))
        .await;
    assert_eq!(on_b.next_json().await["type"], "subscribed");
    let mut batch_log = TopicLog::default();
    batch_log.take(&on_b.next_json().await);
    let added = client
        .post(format!("{}/v1/batches/{batch}/essays", a.address))
        .bearer_auth(&token)
        .json(&json!({"essays": [{"essay_id": "e1", "title": "t", "text": "some text"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(added.status(), StatusCode::ACCEPTED);
    loop {
        let message = on_b.next_json().await;
        if message["topic"] == format!("batch:{batch}") {
            batch_log.take(&message);
            break;
        }
    }
    assert_eq!(batch_log.data["essays"][0]["essay_id"], "e1");
    storage.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_server_processes_on_one_postgres_deliver_every_change_to_both() {
    two_nodes(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_server_processes_with_kafka_deliver_every_change_to_both() {
    two_nodes(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_too_slow_to_read_gets_lagged_and_resumes_without_a_gap() {
    let app = TestApp::spawn_with(Engine::Sqlite, |s| s.ws.send_buffer = 4).await;
    let teacher = app.user(Role::Teacher).await;
    let service = app.user(Role::Service).await;
    let essays: Vec<String> = (0..150).map(|i| format!("e{i}")).collect();
    let essays: Vec<&str> = essays.iter().map(String::as_str).collect();
    let id = app.ready_batch(&teacher, &essays).await;
    let requested = app.request_pipeline(&teacher, &id, "spellcheck").await;
    app.wait_for_phase(&teacher, &id, "spellcheck").await;
    let topic = format!("batch:{id}");

    // A client whose receive buffer is tiny and that does not read for now.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let address = app.address.trim_start_matches("http://").parse().unwrap();
    let stream = socket.connect(address).await.unwrap();
    let mut request = request(&ws_url(&app.address));
    request.headers_mut().insert(
        http::header::AUTHORIZATION,
        HeaderValue::from_str(&format!("Bearer {}", teacher.token)).unwrap(),
    );
    let stream = tokio_tungstenite::MaybeTlsStream::Plain(stream);
    let (socket, _) = tokio_tungstenite::client_async(request, stream)
        .await
        .unwrap();
    let mut client = WsClient {
        socket,
        protocol: None,
    };
    client
        .send(json!({"type": "subscribe", "topic": topic, "min_position": requested["position"]}))
        .await;

    // 150 results of 60 KB each, each a change of its own: megabytes in all, more than the
    // sockets buffer.
    for essay in &essays {
        let mut result = integration_tests::pipeline::result(&id, essay, "spellcheck", "succeeded");
        result["result"] = json!({ "notes": "n".repeat(60_000) });
        let response = app.post_result(&service, &result).await;
        assert_eq!(response.status(), StatusCode::ACCEPTED);
    }
    wait_until(Duration::from_secs(30), || async {
        app.metric("essayflow_ws_dropped_total").await >= Some(1)
    })
    .await;

    // The server dropped changes for it. Now read: contiguous changes, then `lagged` naming
    // the last version delivered.
    assert_eq!(client.next_json().await["type"], "subscribed");
    let mut log = TopicLog::default();
    let lagged = loop {
        let message = client.next_json().await;
        if message["type"] == "lagged" {
            break message;
        }
        log.take(&message);
    };
    assert_eq!(lagged["topic"], topic.as_str());
    assert_eq!(lagged["version"], log.version);
    let final_version = app.get_json(&teacher, &format!("/v1/batches/{id}")).await["version"]
        .as_i64()
        .unwrap();
    assert!(log.version < final_version, "changes were dropped");

    // Resubscribing with `since` brings exactly the dropped changes.
    client.subscribe(&topic, Some(log.version)).await;
    while log.version < final_version {
        let message = client.next_json().await;
        if message["type"] == "subscribed" {
            continue;
        }
        assert_eq!(message["type"], "change", "{message}");
        log.take(&message);
    }
    let first = log.snapshots[0];
    assert_eq!(
        log.changes,
        ((first + 1)..=final_version).collect::<Vec<_>>()
    );
    let after = app.get_json(&teacher, &format!("/v1/batches/{id}")).await;
    assert_eq!(log.data, after);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_loses_its_listen_connection_checks_every_topic_again() {
    let app = TestApp::spawn(Engine::Postgres).await;
    let teacher = app.user(Role::Teacher).await;
    let mut client = app.ws(&teacher).await;
    let mut dashboard = TopicLog::default();
    dashboard.take(&subscribe(&mut client, "dashboard", None).await);
    let resyncs = || app.metric("essayflow_ws_resyncs_total");
    wait_until(Duration::from_secs(10), || async {
        resyncs().await >= Some(1)
    })
    .await;
    let before = resyncs().await;

    // Cut the node's LISTEN session (as a database failover or a network blip would).
    let database = app.db.url.rsplit('/').next().unwrap().to_owned();
    let admin = sqlx::PgPool::connect(&integration_tests::postgres_admin_url())
        .await
        .unwrap();
    let cut: Vec<i32> = sqlx::query_scalar(
        "SELECT pid FROM pg_stat_activity WHERE datname = $1 AND query LIKE 'LISTEN \"essayflow_live\"%'",
    )
    .bind(&database)
    .fetch_all(&admin)
    .await
    .unwrap();
    assert_eq!(cut.len(), 1, "one LISTEN session for live changes");
    sqlx::query("SELECT pg_terminate_backend($1)")
        .bind(cut[0])
        .execute(&admin)
        .await
        .unwrap();
    admin.close().await;

    // The node notices, listens again and re-checks its topics; changes keep coming.
    wait_until(Duration::from_secs(20), || async {
        resyncs().await > before
    })
    .await;
    app.register_batch(&teacher, 1).await;
    while dashboard.data["totals"]["registered"] != 1 {
        dashboard.take(&client.next_json().await);
    }
}
