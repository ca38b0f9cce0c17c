//! Distributed tracing (docs/tracing.md): W3C Trace Context and the correlation id from a
//! request through the event store, the relay, the processors' results, the projections and
//! the WebSocket change, and the spans exported over OTLP/HTTP.
//!
//! Each scenario runs the essayflow binary as a process (the exporter and the subscriber are
//! process-wide), with an OTLP/HTTP receiver inside the test that decodes the protobuf bodies
//! with `opentelemetry-proto`'s types, and reads the server's JSON log lines from its stderr.
#![allow(clippy::unwrap_used)]

use std::collections::HashSet;
use std::io::BufRead;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use api::auth::Role;
use axum::body::Bytes;
use commands::{Engine, EventLog, StoredEvent};
use integration_tests::kafka::free_port;
use integration_tests::ws::{WsClient, ws_url};
use integration_tests::{TestDatabase, essayflow_binary, wait_until};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;
use reqwest::StatusCode;
use serde_json::{Value, json};
use uuid::Uuid;

/// How long spans may take to reach the receiver (the exporter sends every 100 ms here).
const EXPORTED: Duration = Duration::from_secs(20);

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A fresh W3C trace context, as a client would send it: (traceparent, trace id, span id).
fn client_trace() -> (String, String, String) {
    let trace_id = Uuid::new_v4().simple().to_string();
    let span_id = Uuid::new_v4().simple().to_string()[..16].to_owned();
    (format!("00-{trace_id}-{span_id}-01"), trace_id, span_id)
}

/// An OTLP/HTTP trace receiver: `POST /v1/traces` with protobuf bodies.
struct Receiver {
    base: String,
    spans: Arc<Mutex<Vec<Span>>>,
    server: tokio::task::JoinHandle<()>,
}

impl Receiver {
    async fn start() -> Self {
        let spans: Arc<Mutex<Vec<Span>>> = Arc::default();
        let kept = spans.clone();
        let app = axum::Router::new().route(
            "/v1/traces",
            axum::routing::post(move |body: Bytes| {
                let kept = kept.clone();
                async move {
                    let Ok(request) = ExportTraceServiceRequest::decode(body) else {
                        return StatusCode::BAD_REQUEST;
                    };
                    let mut kept = kept.lock().unwrap();
                    for resource in request.resource_spans {
                        for scope in resource.scope_spans {
                            kept.extend(scope.spans);
                        }
                    }
                    StatusCode::OK
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let server = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Self {
            base,
            spans,
            server,
        }
    }

    /// The spans received so far of the trace `trace_id` (hex).
    fn trace(&self, trace_id: &str) -> Vec<Span> {
        self.spans
            .lock()
            .unwrap()
            .iter()
            .filter(|s| hex(&s.trace_id) == trace_id)
            .cloned()
            .collect()
    }

    /// Waits until the trace has a span named after each of `names`; returns its spans.
    async fn wait_for(&self, trace_id: &str, names: &[&str]) -> Vec<Span> {
        let deadline = Instant::now() + EXPORTED;
        loop {
            let spans = self.trace(trace_id);
            let have: HashSet<&str> = spans.iter().map(|s| s.name.as_str()).collect();
            if names.iter().all(|n| have.contains(n)) {
                return spans;
            }
            assert!(
                Instant::now() < deadline,
                "trace {trace_id} has only {have:?} after {EXPORTED:?}; wanted {names:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.server.abort();
    }
}

fn attribute(span: &Span, key: &str) -> Option<String> {
    let value = span
        .attributes
        .iter()
        .find(|a| a.key == key)?
        .value
        .as_ref()?;
    match value.value.as_ref()? {
        AnyValue::StringValue(s) => Some(s.clone()),
        AnyValue::IntValue(i) => Some(i.to_string()),
        AnyValue::BoolValue(b) => Some(b.to_string()),
        other => Some(format!("{other:?}")),
    }
}

fn named<'a>(spans: &'a [Span], name: &str) -> Vec<&'a Span> {
    spans.iter().filter(|s| s.name == name).collect()
}

/// `essayflow serve` as a process, its stderr (JSON log lines) collected.
struct Server {
    child: Child,
    address: String,
    log: Arc<Mutex<Vec<String>>>,
}

impl Server {
    async fn start(db: &TestDatabase, env: &[(&str, String)]) -> Self {
        let port = free_port();
        let mut command = Command::new(essayflow_binary());
        command
            .arg("serve")
            .env("ESSAYFLOW_DATABASE_URL", &db.url)
            .env("ESSAYFLOW_JWT_SECRET", integration_tests::JWT_SECRET)
            .env("ESSAYFLOW_BIND", format!("127.0.0.1:{port}"))
            .env("ESSAYFLOW_LOG", "info,sqlx=warn")
            .env("ESSAYFLOW_LOG_FORMAT", "json")
            .env("ESSAYFLOW_RATE_LIMIT_DEFAULT_TIER", "enterprise")
            // Export quickly, so that the test waits little.
            .env("OTEL_BSP_SCHEDULE_DELAY", "100")
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            .env_remove("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (name, value) in env {
            command.env(name, value);
        }
        let mut child = command.spawn().unwrap();
        let log: Arc<Mutex<Vec<String>>> = Arc::default();
        let stderr = child.stderr.take().unwrap();
        let lines = log.clone();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if std::env::var("TEST_LOG").is_ok() {
                    eprintln!("{line}");
                }
                lines.lock().unwrap().push(line);
            }
        });
        let server = Self {
            child,
            address: format!("http://127.0.0.1:{port}"),
            log,
        };
        let client = reqwest::Client::new();
        let url = format!("{}/healthz", server.address);
        wait_until(Duration::from_secs(60), || async {
            matches!(client.get(&url).send().await, Ok(r) if r.status().is_success())
        })
        .await;
        server
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.address)
    }

    /// Logs in as `username` (made by [`seed_user`]); returns the access token.
    async fn login(&self, username: &str) -> String {
        let body: Value = reqwest::Client::new()
            .post(self.url("/v1/auth/login"))
            .json(&json!({"username": username, "password": "correct horse battery"}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        body["access_token"].as_str().unwrap().to_owned()
    }

    /// The server's JSON log lines so far.
    fn log_lines(&self) -> Vec<Value> {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter_map(|line| serde_json::from_str(line).ok())
            .collect()
    }

    /// Sends SIGTERM and waits (at most `bound`) for the process to exit.
    fn terminate_within(&mut self, bound: Duration) -> Duration {
        let started = Instant::now();
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        loop {
            if self.child.try_wait().unwrap().is_some() {
                return started.elapsed();
            }
            assert!(
                started.elapsed() < bound,
                "the server did not stop within {bound:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A fresh SQLite database with a user of `role`, made before the server starts; returns the
/// database and the user's name.
async fn seeded(role: Role) -> (TestDatabase, String) {
    let db = TestDatabase::create(Engine::Sqlite).await;
    let username = add_user(&db, role).await;
    (db, username)
}

async fn add_user(db: &TestDatabase, role: Role) -> String {
    let storage = commands::Storage::connect(&commands::StorageOptions::new(db.url.clone()))
        .await
        .unwrap();
    let username = format!("u{}", &Uuid::new_v4().simple().to_string()[..12]);
    api::auth::add_user(storage.pool(), &username, role, "correct horse battery")
        .await
        .unwrap();
    storage.pool().close().await;
    username
}

/// POSTs `body` as `token`, with `headers`; returns the response.
async fn post(
    server: &Server,
    token: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &Value,
) -> reqwest::Response {
    let mut request = reqwest::Client::new()
        .post(server.url(path))
        .bearer_auth(token)
        .json(body);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    request.send().await.unwrap()
}

async fn register(server: &Server, token: &str, headers: &[(&str, &str)]) -> String {
    let response = post(
        server,
        token,
        "/v1/batches",
        headers,
        &json!({"title": "Traced", "course_code": "EN-101", "expected_essay_count": 2}),
    )
    .await;
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let body: Value = response.json().await.unwrap();
    body["batch_id"].as_str().unwrap().to_owned()
}

async fn ready_batch(server: &Server, token: &str) -> String {
    let id = register(server, token, &[]).await;
    let essays: Vec<Value> = ["e1", "e2"]
        .iter()
        .map(|e| json!({"essay_id": e, "title": e, "text": format!("The text of {e}.")}))
        .collect();
    let response = post(
        server,
        token,
        &format!("/v1/batches/{id}/essays"),
        &[],
        &json!({ "essays": essays }),
    )
    .await;
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    id
}

/// The batch's events, from the store.
async fn events(db: &TestDatabase, batch_id: &str) -> Vec<StoredEvent> {
    let storage = commands::Storage::connect(&commands::StorageOptions::new(db.url.clone()))
        .await
        .unwrap();
    let events = EventLog::new(storage.clone())
        .read_batch(batch_id.parse().unwrap(), None)
        .await
        .unwrap();
    storage.pool().close().await;
    events
}

async fn wait_for_status(server: &Server, token: &str, batch_id: &str, status: &str) {
    let client = reqwest::Client::new();
    let url = server.url(&format!("/v1/batches/{batch_id}/status"));
    wait_until(Duration::from_secs(60), || async {
        let body: Value = client
            .get(&url)
            .bearer_auth(token)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        body["status"] == status
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_teachers_command_is_one_trace_from_its_request_to_the_websocket_change() {
    let receiver = Receiver::start().await;
    let (db, teacher) = seeded(Role::Teacher).await;
    let ops = format!("127.0.0.1:{}", free_port());
    let server = Server::start(
        &db,
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.base.clone()),
            ("ESSAYFLOW_OPS_BIND", ops.clone()),
        ],
    )
    .await;
    let token = server.login(&teacher).await;
    let mut ws = WsClient::bearer(&ws_url(&server.address), &token).await;
    ws.subscribe("dashboard", None).await;
    assert_eq!(ws.next_json().await["type"], "subscribed");
    assert_eq!(ws.next_json().await["type"], "snapshot");

    let (traceparent, trace_id, client_span) = client_trace();
    let correlation = Uuid::new_v4().to_string();
    let batch_id = register(
        &server,
        &token,
        &[
            ("traceparent", &traceparent),
            ("x-correlation-id", &correlation),
        ],
    )
    .await;
    let change = ws.next_json().await;
    assert_eq!(change["type"], "change", "{change}");

    let spans = receiver
        .wait_for(
            &trace_id,
            &[
                "request",
                "command.execute",
                "projection.apply",
                "relay.publish",
                "ws.change",
            ],
        )
        .await;
    // The request continues the client's span; everything after it descends from the command.
    let request = named(&spans, "request");
    assert_eq!(request.len(), 1, "one request span: {request:?}");
    let request = request[0];
    assert_eq!(hex(&request.parent_span_id), client_span);
    assert_eq!(
        attribute(request, "http.request.method").as_deref(),
        Some("POST")
    );
    assert_eq!(
        attribute(request, "correlation_id"),
        Some(correlation.clone())
    );
    let command = named(&spans, "command.execute")[0];
    assert_eq!(command.parent_span_id, request.span_id);
    assert_eq!(attribute(command, "batch_id"), Some(batch_id.clone()));
    // One apply per projection (they may arrive in different exports).
    wait_until(EXPORTED, || async {
        named(&receiver.trace(&trace_id), "projection.apply").len() >= 2
    })
    .await;
    let spans = receiver.trace(&trace_id);
    let applies = named(&spans, "projection.apply");
    let projections: HashSet<String> = applies
        .iter()
        .map(|s| attribute(s, "projection").unwrap())
        .collect();
    assert_eq!(
        projections,
        HashSet::from(["batch_state".to_owned(), "dashboard".to_owned()])
    );
    for apply in &applies {
        assert_eq!(apply.parent_span_id, command.span_id, "{apply:?}");
        assert_eq!(
            attribute(apply, "event.type").as_deref(),
            Some("BatchRegistered")
        );
    }
    let publish = named(&spans, "relay.publish");
    assert_eq!(publish.len(), 1, "one event, one message: {publish:?}");
    assert_eq!(publish[0].parent_span_id, command.span_id);
    assert_eq!(publish[0].kind, 4, "a producer span");
    assert!(
        attribute(publish[0], "messaging.destination.name")
            .unwrap()
            .ends_with(".events.v1")
    );
    let sent = named(&spans, "ws.change");
    assert_eq!(sent[0].parent_span_id, command.span_id);
    assert_eq!(attribute(sent[0], "topic").as_deref(), Some("dashboard"));
    // Every span of the trace hangs off another span of it, or off the client's.
    let ids: HashSet<Vec<u8>> = spans.iter().map(|s| s.span_id.clone()).collect();
    for span in &spans {
        assert!(
            ids.contains(&span.parent_span_id) || hex(&span.parent_span_id) == client_span,
            "{} has a parent outside the trace",
            span.name
        );
    }

    // The request's JSON log line carries the same trace id and correlation id as its span.
    let deadline = Instant::now() + Duration::from_secs(10);
    let line = loop {
        let found = server.log_lines().into_iter().find(|line| {
            line["fields"]["message"] == "command accepted"
                && line["span"]["correlation_id"] == correlation.as_str()
        });
        if let Some(line) = found {
            break line;
        }
        assert!(Instant::now() < deadline, "no log line of the command");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(line["span"]["trace_id"], trace_id.as_str(), "{line}");
    assert_eq!(line["span"]["name"], "request");

    // And so does its metric: the request-duration histogram's exemplar (OpenMetrics) for
    // `POST /v1/batches` 202 names the same correlation id and trace id.
    let metrics = reqwest::get(format!("http://{ops}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let exemplar = metrics
        .lines()
        .filter(|l| {
            l.starts_with("essayflow_http_request_duration_seconds_bucket{")
                && l.contains(r#"route="/v1/batches""#)
                && l.contains(r#"method="POST""#)
                && l.contains(r#"status="202""#)
        })
        .find_map(|l| l.split_once(" # ").map(|(_, e)| e.to_owned()))
        .unwrap_or_else(|| panic!("no exemplar on POST /v1/batches 202:\n{metrics}"));
    assert!(
        exemplar.contains(&format!(r#"correlation_id="{correlation}""#)),
        "{exemplar}"
    );
    assert!(
        exemplar.contains(&format!(r#"trace_id="{trace_id}""#)),
        "{exemplar}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipelines_results_continue_the_trace_and_the_correlation_id_of_its_request() {
    let receiver = Receiver::start().await;
    let (db, teacher) = seeded(Role::Teacher).await;
    let server = Server::start(
        &db,
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.base.clone()),
            ("ESSAYFLOW_SIMULATE_PROCESSORS", "true".to_owned()),
            ("ESSAYFLOW_SIMULATOR_LATENCY_MS", "0".to_owned()),
        ],
    )
    .await;
    let token = server.login(&teacher).await;
    let batch_id = ready_batch(&server, &token).await;
    let (traceparent, trace_id, _) = client_trace();
    let correlation = Uuid::new_v4();
    let response = post(
        &server,
        &token,
        &format!("/v1/batches/{batch_id}/pipelines"),
        &[
            ("traceparent", &traceparent),
            ("x-correlation-id", &correlation.to_string()),
        ],
        &json!({"pipeline": "spellcheck"}),
    )
    .await;
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    wait_for_status(&server, &token, &batch_id, "completed").await;

    // Every event from the request on, the conductor's and the results' included, carries the
    // request's correlation id and trace.
    let events = events(&db, &batch_id).await;
    let requested = events
        .iter()
        .position(|e| e.event_type == "PipelineRequested")
        .unwrap();
    let after = &events[requested..];
    assert!(
        after.iter().any(|e| e.event_type == "PipelineCompleted"),
        "{:?}",
        after.iter().map(|e| &e.event_type).collect::<Vec<_>>()
    );
    for event in after {
        assert_eq!(
            event.metadata.correlation_id, correlation,
            "{}",
            event.event_type
        );
        let trace = event.metadata.trace().expect("a trace context");
        assert_eq!(trace.trace_id(), trace_id, "{}", event.event_type);
    }
    let results: Vec<&StoredEvent> = after
        .iter()
        .filter(|e| e.event_type == "EssayPhaseCompleted")
        .collect();
    assert_eq!(results.len(), 2, "one result per essay");
    for result in &results {
        assert_eq!(
            result.metadata.user_id.as_deref(),
            Some(commands::ingress::INGRESS_USER)
        );
    }

    // A result's events descend from an `ingress.result` span, itself the child of the
    // `relay.publish` span of the phase request the processor answered.
    receiver
        .wait_for(&trace_id, &["ingress.result", "relay.publish"])
        .await;
    for result in results {
        let stamped = result.metadata.trace().unwrap().span_id();
        wait_until(EXPORTED, || async {
            receiver
                .trace(&trace_id)
                .iter()
                .any(|s| hex(&s.span_id) == stamped)
        })
        .await;
        let spans = receiver.trace(&trace_id);
        let ingress = spans.iter().find(|s| hex(&s.span_id) == stamped).unwrap();
        assert_eq!(ingress.name, "ingress.result");
        assert_eq!(
            attribute(ingress, "correlation_id"),
            Some(correlation.to_string())
        );
        let publish = spans
            .iter()
            .find(|s| s.span_id == ingress.parent_span_id)
            .expect("the phase request's publish span");
        assert_eq!(publish.name, "relay.publish");
        assert!(
            attribute(publish, "messaging.destination.name")
                .unwrap()
                .ends_with(".phase.spellcheck.requested.v1")
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_export_the_client_trace_and_correlation_id_still_reach_the_events_and_the_logs() {
    let (db, teacher) = seeded(Role::Teacher).await;
    let service = add_user(&db, Role::Service).await;
    let server = Server::start(&db, &[]).await;
    let token = server.login(&teacher).await;
    let service_token = server.login(&service).await;

    let (traceparent, trace_id, client_span) = client_trace();
    let batch_id = register(&server, &token, &[("traceparent", &traceparent)]).await;
    let registered = events(&db, &batch_id).await;
    let stamped = registered[0].metadata.trace().expect("a trace context");
    assert_eq!(stamped.trace_id(), trace_id);
    assert!(stamped.is_sampled(), "the client's sampled flag is kept");
    // The request span has an id of its own, a child of the client's.
    assert_ne!(stamped.span_id(), client_span);
    let line = server
        .log_lines()
        .into_iter()
        .find(|l| l["fields"]["message"] == "command accepted")
        .expect("the command's log line");
    assert_eq!(line["span"]["trace_id"], trace_id.as_str());

    // A request without a traceparent starts a trace of its own.
    let other = register(&server, &token, &[]).await;
    let own = events(&db, &other).await[0].metadata.trace().unwrap();
    assert_ne!(own.trace_id(), trace_id);

    // A result over HTTP continues the processor's trace and correlation id.
    let essays = json!({"essays": [{"essay_id": "e1", "title": "e1", "text": "Some text."},
                                   {"essay_id": "e2", "title": "e2", "text": "More text."}]});
    let path = format!("/v1/batches/{batch_id}/essays");
    assert_eq!(
        post(&server, &token, &path, &[], &essays).await.status(),
        StatusCode::ACCEPTED
    );
    let path = format!("/v1/batches/{batch_id}/pipelines");
    let pipeline = json!({"pipeline": "spellcheck"});
    assert_eq!(
        post(&server, &token, &path, &[], &pipeline).await.status(),
        StatusCode::ACCEPTED
    );
    wait_for_status(&server, &token, &batch_id, "processing").await;
    let (processor_parent, processor_trace, _) = client_trace();
    let correlation = Uuid::new_v4();
    let result = json!({
        "message_id": "m-1",
        "batch_id": batch_id,
        "essay_id": "e1",
        "phase": "spellcheck",
        "outcome": "succeeded",
        "result": {"ok": true},
    });
    let response = post(
        &server,
        &service_token,
        "/v1/internal/results",
        &[
            ("traceparent", &processor_parent),
            ("x-correlation-id", &correlation.to_string()),
        ],
        &result,
    )
    .await;
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let recorded = events(&db, &batch_id).await;
    let last = recorded.last().unwrap();
    assert_eq!(last.metadata.correlation_id, correlation);
    assert_eq!(last.metadata.trace().unwrap().trace_id(), processor_trace);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_collector_neither_slows_nor_fails_commands_and_shutdown_stays_bounded() {
    let (db, teacher) = seeded(Role::Teacher).await;
    // Nothing listens there: every export fails at once.
    let closed = format!("http://127.0.0.1:{}", free_port());
    let mut server = Server::start(
        &db,
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", closed),
            ("ESSAYFLOW_TELEMETRY_SHUTDOWN_TIMEOUT_MS", "1000".to_owned()),
        ],
    )
    .await;
    let token = server.login(&teacher).await;
    let started = Instant::now();
    for _ in 0..30 {
        let (traceparent, ..) = client_trace();
        let sent = Instant::now();
        register(&server, &token, &[("traceparent", &traceparent)]).await;
        assert!(
            sent.elapsed() < Duration::from_secs(2),
            "a command took {:?}",
            sent.elapsed()
        );
    }
    assert!(started.elapsed() < Duration::from_secs(20));
    // SIGTERM: drain, then at most the 1 s flush bound.
    let took = server.terminate_within(Duration::from_secs(20));
    assert!(took < Duration::from_secs(20), "stopping took {took:?}");
}

/// On Kafka (`ESSAYFLOW_TEST_KAFKA`), in process: a phase request carries the correlation id
/// and the trace context of the request that started the pipeline, and a result that echoes
/// them (with the processor's own span as `traceparent`) is recorded in that correlation id,
/// stamped with the processor's context (export is off here: it is passed on as it came).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_kafka_a_result_with_the_headers_continues_the_correlation_id_and_the_trace() {
    use commands::bus::Topics;
    use domain::values::Phase;
    use integration_tests::kafka::{TestConsumer, TestProducer, test_brokers, unique_prefix};
    // The subscriber with the OpenTelemetry layer, as the binary has it (export off).
    let _ = api::telemetry::init(&Default::default());
    let (brokers, prefix) = (test_brokers(), unique_prefix());
    let app = integration_tests::TestApp::spawn_with(Engine::Sqlite, {
        let (brokers, prefix) = (brokers.clone(), prefix.clone());
        move |s| {
            s.kafka_brokers = brokers;
            s.topic_prefix = prefix;
            s.kafka_message_timeout_ms = 2000;
        }
    })
    .await;
    let topics = Topics::new(&prefix);
    let requests = TestConsumer::new(
        &brokers,
        &[topics.phase_requested(&Phase::parse("spellcheck").unwrap())],
    );
    let teacher = app.user(Role::Teacher).await;
    let batch_id = app.ready_batch(&teacher, &["e1"]).await;
    let (traceparent, trace_id, _) = client_trace();
    let correlation = Uuid::new_v4();
    let response = app
        .client
        .post(app.url(&format!("/v1/batches/{batch_id}/pipelines")))
        .bearer_auth(&teacher.token)
        .header("traceparent", &traceparent)
        .header("x-correlation-id", correlation.to_string())
        .json(&json!({"pipeline": "spellcheck"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::ACCEPTED);

    let received = requests
        .receive_until(Duration::from_secs(30), |seen| !seen.is_empty())
        .await;
    let request = &received[0];
    assert_eq!(
        request.headers.get("x-correlation-id"),
        Some(&correlation.to_string())
    );
    let sent = commands::TraceContext::parse(&request.headers["traceparent"], None)
        .expect("a valid traceparent");
    assert_eq!(sent.trace_id(), trace_id);

    // The processor answers in a span of its own, a child of the request's.
    let processor_span = &Uuid::new_v4().simple().to_string()[..16];
    let processor = format!("00-{trace_id}-{processor_span}-01");
    let result = json!({
        "message_id": format!("proc-{}", request.payload["request_id"].as_str().unwrap()),
        "batch_id": batch_id,
        "essay_id": "e1",
        "phase": "spellcheck",
        "outcome": "succeeded",
        "result": {"ok": true},
        "pipeline_request_id": request.payload["pipeline_request_id"],
    });
    TestProducer::new(&brokers)
        .send_with_headers(
            &topics.results(),
            &batch_id,
            &serde_json::to_vec(&result).unwrap(),
            &[
                ("traceparent", &processor),
                ("x-correlation-id", &correlation.to_string()),
            ],
        )
        .await;
    app.wait_for_status(&teacher, &batch_id, "completed").await;
    let events = EventLog::new(app.storage.clone())
        .read_batch(batch_id.parse().unwrap(), None)
        .await
        .unwrap();
    let recorded = events
        .iter()
        .find(|e| e.event_type == "EssayPhaseCompleted")
        .expect("the result was recorded");
    assert_eq!(recorded.metadata.correlation_id, correlation);
    assert_eq!(
        recorded.metadata.traceparent.as_deref(),
        Some(processor.as_str())
    );
    let completed = events.last().unwrap();
    assert_eq!(completed.event_type, "PipelineCompleted");
    assert_eq!(completed.metadata.correlation_id, correlation);
    assert_eq!(completed.metadata.trace().unwrap().trace_id(), trace_id);
}
