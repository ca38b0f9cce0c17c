//! Pipelines through a real Kafka-protocol broker (tansu): the relay's topics read by ordinary
//! consumers, results produced by the test acting as the processing services, duplicates and
//! poison messages, a broker outage in the middle of a run, and (librdkafka's mock cluster)
//! request errors the real broker cannot inject.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeSet, HashSet};
use std::time::Duration;

use api::auth::Role;
use commands::bus::Topics;
use commands::messages::event_id;
use commands::{Engine, EventLog, LogPosition};
use domain::values::Phase;
use integration_tests::kafka::{
    Proxy, Received, Tansu, TestConsumer, TestProducer, free_port, test_brokers, unique_prefix,
};
use integration_tests::pipeline::result_of_size;
use integration_tests::{TestApp, wait_until};
use rdkafka::mocking::MockCluster;
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use serde_json::{Value, json};

const PHASES: [&str; 4] = ["spellcheck", "nlp", "cj_assessment", "ai_feedback"];

async fn kafka_app(engine: Engine, brokers: &str, prefix: &str) -> TestApp {
    let (brokers, prefix) = (brokers.to_owned(), prefix.to_owned());
    TestApp::spawn_with(engine, move |s| {
        s.kafka_brokers = brokers;
        s.topic_prefix = prefix;
        s.kafka_message_timeout_ms = 2000;
    })
    .await
}

fn phase_topics(topics: &Topics) -> Vec<String> {
    PHASES
        .iter()
        .map(|p| topics.phase_requested(&Phase::parse(*p).unwrap()))
        .collect()
}

/// The result a processor sends for a phase request.
fn answer(request: &Value, outcome: &str) -> Value {
    json!({
        "message_id": format!("proc-{}", request["request_id"].as_str().unwrap()),
        "batch_id": request["batch_id"],
        "essay_id": request["essay_id"],
        "phase": request["phase"],
        "outcome": outcome,
        "result": { "words": request["text"].as_str().unwrap().split_whitespace().count() },
        "pipeline_request_id": request["pipeline_request_id"],
    })
}

async fn send_result(producer: &TestProducer, topics: &Topics, result: &Value) {
    producer
        .send_json(
            &topics.results(),
            result["batch_id"].as_str().unwrap(),
            result,
        )
        .await;
}

/// Every event id the log holds for `batches`.
async fn logged_event_ids(app: &TestApp, batches: &[&str]) -> HashSet<String> {
    let events = EventLog::new(app.storage.clone())
        .read_after(LogPosition::default(), 100_000)
        .await
        .unwrap();
    events
        .iter()
        .filter(|e| batches.contains(&e.batch_id.to_string().as_str()))
        .map(|e| event_id(e.batch_id, e.sequence).to_string())
        .collect()
}

/// Reads the events topic until every id in `expected` was seen; returns what was read.
async fn read_events_until(consumer: &TestConsumer, expected: &HashSet<String>) -> Vec<Received> {
    consumer
        .receive_until(Duration::from_secs(60), |seen| {
            let got: HashSet<&str> = seen
                .iter()
                .filter_map(|r| r.payload["event_id"].as_str())
                .collect();
            expected.iter().all(|id| got.contains(id.as_str()))
        })
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipeline_runs_end_to_end_through_kafka() {
    let brokers = test_brokers();
    let prefix = unique_prefix();
    let topics = Topics::new(&prefix);
    let app = kafka_app(Engine::Postgres, &brokers, &prefix).await;
    let teacher = app.user(Role::Teacher).await;
    let id = app.ready_batch(&teacher, &["e1", "e2", "e3"]).await;
    let processor = TestConsumer::new(&brokers, &phase_topics(&topics));
    let producer = TestProducer::new(&brokers);

    let requested = app.request_pipeline(&teacher, &id, "ai_feedback").await;
    let request_id = requested["request_id"].as_str().unwrap();
    let mut order = Vec::new();
    let mut answered = HashSet::new();
    for phase in ["spellcheck", "nlp", "ai_feedback"] {
        // Delivery is at least once: a request seen before is skipped.
        let requests: Vec<Received> = processor
            .receive_until(Duration::from_secs(60), |seen| {
                let fresh: HashSet<&str> = seen
                    .iter()
                    .filter_map(|r| r.payload["request_id"].as_str())
                    .filter(|id| !answered.contains(*id))
                    .collect();
                fresh.len() >= 3
            })
            .await
            .into_iter()
            .filter(|r| answered.insert(r.payload["request_id"].as_str().unwrap().to_owned()))
            .collect();
        let topic = topics.phase_requested(&Phase::parse(phase).unwrap());
        let mut essays = BTreeSet::new();
        for request in &requests {
            assert_eq!(request.topic, topic);
            assert_eq!(request.key.as_deref(), Some(id.as_str()));
            let r = &request.payload;
            assert_eq!(r["batch_id"], id.as_str());
            assert_eq!(r["phase"], phase);
            assert_eq!(r["pipeline_request_id"], request_id);
            let essay = r["essay_id"].as_str().unwrap().to_owned();
            assert_eq!(r["text"], format!("The text of essay {essay}."));
            essays.insert(essay);
            // Every result arrives twice, as after a processor's retry.
            let result = answer(r, "succeeded");
            send_result(&producer, &topics, &result).await;
            send_result(&producer, &topics, &result).await;
        }
        assert_eq!(
            essays,
            BTreeSet::from(["e1".into(), "e2".into(), "e3".into()])
        );
        order.push(phase);
    }
    assert_eq!(order, ["spellcheck", "nlp", "ai_feedback"]);
    let status = app
        .wait_for_request(&teacher, &id, request_id, "completed")
        .await;
    assert_eq!(
        status["pipeline"]["steps"],
        json!(["spellcheck", "nlp", "ai_feedback"])
    );
    for phase in ["spellcheck", "nlp", "ai_feedback"] {
        assert_eq!(
            status["phases"][phase]["succeeded"], 3,
            "counted once: {phase}"
        );
        assert_eq!(status["phases"][phase]["failed"], 0);
    }
    app.wait_for_projections().await;
    let dashboard = app.get_json(&teacher, "/v1/dashboard").await;
    let finished = &dashboard["recently_finished"][0];
    assert_eq!(finished["status"], "completed");
    assert_eq!(finished["essay_outcomes"]["e2"]["nlp"], "succeeded");
    assert_eq!(finished["essay_outcomes"]["e3"]["ai_feedback"], "succeeded");

    // Every event of the batch is on the events topic, in its envelope.
    app.wait_for_pipeline_workers().await;
    let expected = logged_event_ids(&app, &[&id]).await;
    let events = TestConsumer::new(&brokers, &[topics.events()]);
    let seen = read_events_until(&events, &expected).await;
    let resolved = seen
        .iter()
        .find(|r| r.payload["event_type"] == "PipelineResolved")
        .unwrap();
    assert_eq!(resolved.key.as_deref(), Some(id.as_str()));
    let envelope = &resolved.payload;
    assert_eq!(envelope["batch_id"], id.as_str());
    assert_eq!(envelope["event_version"], "1.0");
    assert_eq!(envelope["correlation_id"], requested["correlation_id"]);
    assert!(envelope["causation_id"].as_str().is_some());
    assert!(envelope["position"].as_i64().unwrap() > 0);
    assert!(envelope["sequence"].as_i64().unwrap() > 0);
    assert!(envelope["occurred_at"].as_str().is_some());
    assert_eq!(
        envelope["payload"]["PipelineResolved"]["steps"],
        json!(["spellcheck", "nlp", "ai_feedback"])
    );

    // Asked again, only ai_feedback runs: its prerequisites are done for every essay.
    let again = app.request_pipeline(&teacher, &id, "ai_feedback").await;
    let again_id = again["request_id"].as_str().unwrap();
    let requests = processor
        .receive_until(Duration::from_secs(60), |seen| seen.len() >= 3)
        .await;
    for request in &requests {
        assert_eq!(request.payload["phase"], "ai_feedback");
        assert_eq!(request.payload["pipeline_request_id"], again_id);
        send_result(&producer, &topics, &answer(&request.payload, "succeeded")).await;
    }
    let status = app
        .wait_for_request(&teacher, &id, again_id, "completed")
        .await;
    assert_eq!(status["pipeline"]["steps"], json!(["ai_feedback"]));
    assert_eq!(status["pipeline"]["pruned"], json!(["spellcheck", "nlp"]));
    // librdkafka reports the consumer lag every second: everything was consumed.
    wait_until(Duration::from_secs(30), || async {
        app.metric("essayflow_ingress_lag_messages").await == Some(0)
    })
    .await;
    assert_eq!(
        app.metric("essayflow_ingress_results_total{outcome=\"recorded\"}")
            .await,
        Some(12)
    );
    assert!(
        app.metric("essayflow_ingress_results_total{outcome=\"duplicate\"}")
            .await
            >= Some(9)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_results_are_dead_lettered_and_consumption_goes_on() {
    let brokers = test_brokers();
    let prefix = unique_prefix();
    let topics = Topics::new(&prefix);
    let app = kafka_app(Engine::Sqlite, &brokers, &prefix).await;
    let teacher = app.user(Role::Teacher).await;
    let id = app.ready_batch(&teacher, &["e1", "e2"]).await;
    let processor = TestConsumer::new(&brokers, &phase_topics(&topics));
    let producer = TestProducer::new(&brokers);
    let requested = app.request_pipeline(&teacher, &id, "spellcheck").await;
    let requests = processor
        .receive_until(Duration::from_secs(60), |seen| seen.len() >= 2)
        .await;

    // A first valid result, then garbage, a result for an essay the batch does not have, a
    // wrong-typed field, a result one byte over the size limit (had it been recorded, the
    // last result would be a duplicate), and then the last valid result.
    send_result(
        &producer,
        &topics,
        &answer(&requests[0].payload, "succeeded"),
    )
    .await;
    producer
        .send(&topics.results(), &id, b"\x00not json at all")
        .await;
    let mut stranger = answer(&requests[1].payload, "succeeded");
    stranger["essay_id"] = json!("e404");
    stranger["message_id"] = json!("stranger");
    send_result(&producer, &topics, &stranger).await;
    let mut wrong_type = answer(&requests[1].payload, "succeeded");
    wrong_type["message_id"] = json!(42);
    send_result(&producer, &topics, &wrong_type).await;
    let mut oversized = answer(&requests[1].payload, "succeeded");
    oversized["message_id"] = json!("oversized");
    oversized["result"] = result_of_size(app.settings.max_result_bytes + 1);
    send_result(&producer, &topics, &oversized).await;
    send_result(&producer, &topics, &answer(&requests[1].payload, "failed")).await;

    let request_id = requested["request_id"].as_str().unwrap();
    let status = app
        .wait_for_request(&teacher, &id, request_id, "completed_with_failures")
        .await;
    assert_eq!(status["phases"]["spellcheck"]["succeeded"], 1);
    assert_eq!(status["phases"]["spellcheck"]["failed"], 1);

    let dlq = TestConsumer::new(&brokers, &[topics.dead_letters()]);
    let letters = dlq
        .receive_until(Duration::from_secs(60), |seen| seen.len() >= 4)
        .await;
    let errors: Vec<&str> = letters
        .iter()
        .map(|l| l.headers["x-error"].as_str())
        .collect();
    assert!(errors[0].starts_with("body:"), "{errors:?}");
    assert!(errors[1].contains("e404"), "{errors:?}");
    assert!(errors[2].starts_with("message_id:"), "{errors:?}");
    assert!(errors[3].starts_with("result:"), "{errors:?}");
    assert!(
        errors[3].contains(&app.settings.max_result_bytes.to_string()),
        "{errors:?}"
    );
    assert_eq!(letters[3].payload, oversized, "the original bytes");
    assert_eq!(letters[0].raw, b"\x00not json at all");
    let mut offsets = Vec::new();
    for letter in &letters {
        assert_eq!(letter.headers["x-original-topic"], topics.results());
        assert_eq!(letter.key.as_deref(), Some(id.as_str()));
        let _partition: i32 = letter.headers["x-original-partition"].parse().unwrap();
        offsets.push(letter.headers["x-original-offset"].parse::<i64>().unwrap());
    }
    assert!(offsets.windows(2).all(|w| w[0] < w[1]), "{offsets:?}");
    assert_eq!(
        app.metric("essayflow_ingress_dead_lettered_total").await,
        Some(4)
    );
}

/// Answers every phase request that arrives until `done` holds.
async fn process_until(
    app: &TestApp,
    processor: &TestConsumer,
    producer: &TestProducer,
    topics: &Topics,
    done: impl AsyncFn() -> bool,
) {
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    while !done().await {
        assert!(
            std::time::Instant::now() < deadline,
            "the pipelines did not complete: {}",
            readiness(app).await
        );
        for request in processor.receive_for(Duration::from_secs(1)).await {
            send_result(producer, topics, &answer(&request.payload, "succeeded")).await;
        }
    }
}

async fn readiness(app: &TestApp) -> Value {
    app.get_ops("/readyz").await.json().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_outage_mid_run_loses_nothing() {
    // A broker of this test's own, reached through a proxy that the test cuts and restores:
    // to every client, the broker goes down and comes back.
    let broker_port = free_port();
    let mut proxy = Proxy::new(broker_port).await;
    let _broker = Tansu::start(broker_port, proxy.port).await;
    let brokers = format!("127.0.0.1:{}", proxy.port);
    let prefix = unique_prefix();
    let topics = Topics::new(&prefix);
    let app = kafka_app(Engine::Postgres, &brokers, &prefix).await;
    let teacher = app.user(Role::Teacher).await;
    let processor = TestConsumer::new(&brokers, &phase_topics(&topics));
    let producer = TestProducer::new(&brokers);

    let first = app.ready_batch(&teacher, &["a1", "a2"]).await;
    let first_request = app.request_pipeline(&teacher, &first, "nlp").await;
    let spellcheck = processor
        .receive_until(Duration::from_secs(60), |seen| seen.len() >= 2)
        .await;
    for request in &spellcheck {
        send_result(&producer, &topics, &answer(&request.payload, "succeeded")).await;
    }
    app.wait_for_phase(&teacher, &first, "nlp").await;

    proxy.stop().await;
    // Commands are still accepted while the broker is away.
    let second = app.ready_batch(&teacher, &["b1", "b2", "b3"]).await;
    let second_request = app.request_pipeline(&teacher, &second, "spellcheck").await;
    wait_until(Duration::from_secs(60), || async {
        let ready = readiness(&app).await;
        ready["status"] == "degraded" && ready["checks"]["pipeline"]["relay"]["status"] == "failing"
    })
    .await;
    let ready = readiness(&app).await;
    assert!(
        ready["checks"]["pipeline"]["relay"]["lag"]
            .as_i64()
            .unwrap()
            > 0
    );

    proxy.start().await;
    let (first_id, second_id) = (
        first_request["request_id"].as_str().unwrap(),
        second_request["request_id"].as_str().unwrap(),
    );
    process_until(&app, &processor, &producer, &topics, async || {
        let a = app.status(&teacher, &first).await;
        let b = app.status(&teacher, &second).await;
        a["status"] == "completed"
            && a["pipeline"]["request_id"] == first_id
            && b["status"] == "completed"
            && b["pipeline"]["request_id"] == second_id
    })
    .await;

    app.wait_for_pipeline_workers().await;
    let expected = logged_event_ids(&app, &[&first, &second]).await;
    let events = TestConsumer::new(&brokers, &[topics.events()]);
    read_events_until(&events, &expected).await;
    wait_until(Duration::from_secs(30), || async {
        readiness(&app).await["status"] == "ready"
    })
    .await;
    // Stop while the broker is still there, so that the consumers leave their groups cleanly.
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_rides_out_request_errors_and_a_downed_broker() {
    // librdkafka's mock cluster injects what tansu cannot: errors on produce requests, a slow
    // broker, a broker that goes down. It has no admin API: topics are created here.
    let mock = MockCluster::new(1).unwrap();
    let brokers = mock.bootstrap_servers();
    let prefix = unique_prefix();
    let topics = Topics::new(&prefix);
    let phases: Vec<Phase> = PHASES.iter().map(|p| Phase::parse(*p).unwrap()).collect();
    for topic in topics.all(&phases) {
        mock.create_topic(&topic, 1, 1).unwrap();
    }
    mock.request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION; 4],
    );
    mock.broker_round_trip_time(1, Duration::from_millis(200))
        .unwrap();
    let app = kafka_app(Engine::Sqlite, &brokers, &prefix).await;
    let teacher = app.user(Role::Teacher).await;
    let first = app.ready_batch(&teacher, &["a1", "a2"]).await;
    app.wait_for_pipeline_workers().await;

    mock.broker_down(1).unwrap();
    let second = app.ready_batch(&teacher, &["b1"]).await;
    wait_until(Duration::from_secs(60), || async {
        readiness(&app).await["checks"]["pipeline"]["relay"]["status"] == "failing"
    })
    .await;
    mock.broker_up(1).unwrap();
    app.wait_for_pipeline_workers().await;

    let expected = logged_event_ids(&app, &[&first, &second]).await;
    assert_eq!(expected.len(), 6);
    let events = TestConsumer::new(&brokers, &[topics.events()]);
    let seen = read_events_until(&events, &expected).await;
    // At least once, and in order per batch: the first delivery of each event keeps the
    // batch's sequence order.
    let mut first_seen = Vec::new();
    for r in &seen {
        if r.payload["batch_id"] == first.as_str() && !first_seen.contains(&r.payload["sequence"]) {
            first_seen.push(r.payload["sequence"].clone());
        }
    }
    assert_eq!(first_seen, [json!(1), json!(2), json!(3)]);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_outage_pauses_the_ingress_instead_of_dead_lettering() {
    let brokers = test_brokers();
    let prefix = unique_prefix();
    let topics = Topics::new(&prefix);
    let app = kafka_app(Engine::Postgres, &brokers, &prefix).await;
    let teacher = app.user(Role::Teacher).await;
    let id = app.ready_batch(&teacher, &["e1"]).await;
    let processor = TestConsumer::new(&brokers, &phase_topics(&topics));
    let producer = TestProducer::new(&brokers);
    let requested = app.request_pipeline(&teacher, &id, "spellcheck").await;
    let request = processor
        .receive_until(Duration::from_secs(60), |seen| !seen.is_empty())
        .await;

    // Take the database away: no new connections, and the open ones cut.
    let database = app.db.url.rsplit('/').next().unwrap().to_owned();
    let admin = format!("{}/postgres", integration_tests::postgres_admin_url());
    let mut conn: sqlx::PgConnection = sqlx::Connection::connect(&admin).await.unwrap();
    sqlx::query(&format!(
        "ALTER DATABASE {database} ALLOW_CONNECTIONS false"
    ))
    .execute(&mut conn)
    .await
    .unwrap();
    sqlx::query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1")
        .bind(&database)
        .execute(&mut conn)
        .await
        .unwrap();

    send_result(
        &producer,
        &topics,
        &answer(&request[0].payload, "succeeded"),
    )
    .await;
    wait_until(Duration::from_secs(60), || async {
        app.metric("essayflow_ingress_retries_total").await >= Some(2)
    })
    .await;
    assert_eq!(
        app.metric("essayflow_ingress_dead_lettered_total").await,
        Some(0)
    );

    sqlx::query(&format!("ALTER DATABASE {database} ALLOW_CONNECTIONS true"))
        .execute(&mut conn)
        .await
        .unwrap();
    let request_id = requested["request_id"].as_str().unwrap();
    let status = app
        .wait_for_request(&teacher, &id, request_id, "completed")
        .await;
    assert_eq!(status["phases"]["spellcheck"]["succeeded"], 1);
    assert_eq!(
        app.metric("essayflow_ingress_dead_lettered_total").await,
        Some(0)
    );
    app.stop().await;
}
