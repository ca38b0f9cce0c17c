//! Draining the results dead-letter topic through a real Kafka-protocol broker (tansu): a result
//! that arrived before its phase ran is dead-lettered, listed without being consumed, replayed
//! once the phase runs, and then recorded; a second replay sends nothing again.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use api::auth::Role;
use commands::Engine;
use commands::bus::{KafkaBus, KafkaOptions, Topics};
use commands::deadletters;
use integration_tests::kafka::{TestProducer, test_brokers, unique_prefix};
use integration_tests::{TestApp, essayflow_binary, wait_until};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_is_listed_then_replayed_and_recorded_once() {
    let brokers = test_brokers();
    let prefix = unique_prefix();
    let topics = Topics::new(&prefix);
    let app = {
        let (brokers, prefix) = (brokers.clone(), prefix.clone());
        TestApp::spawn_with(Engine::Postgres, move |s| {
            s.kafka_brokers = brokers;
            s.topic_prefix = prefix;
            s.kafka_message_timeout_ms = 2000;
        })
        .await
    };
    let teacher = app.user(Role::Teacher).await;
    let id = app.ready_batch(&teacher, &["e1"]).await;
    app.wait_for_pipeline_workers().await;

    // A processor answers before the phase runs (a result that raced its request): nothing is
    // recorded, the message is dead-lettered with the reason.
    let early = json!({
        "message_id": "early-1",
        "batch_id": id,
        "essay_id": "e1",
        "phase": "spellcheck",
        "outcome": "succeeded",
        "result": { "words": 3 },
    });
    TestProducer::new(&brokers)
        .send_json(&topics.results(), &id, &early)
        .await;
    let options = KafkaOptions::new(&brokers);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let letters = loop {
        let letters = deadletters::list(&options, &topics, 100, WAIT)
            .await
            .unwrap();
        if !letters.is_empty() {
            break letters;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "nothing was dead-lettered"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(letters.len(), 1, "{letters:#?}");
    let letter = &letters[0];
    assert_eq!(letter.payload, early);
    assert_eq!(letter.key.as_deref(), Some(id.as_str()));
    let reason = letter.header("x-error").unwrap();
    assert!(reason.contains("spellcheck"), "{reason}");
    assert_eq!(
        letter.header("x-original-topic"),
        Some(topics.results().as_str())
    );
    // Listing consumed nothing: a second listing sees the same, and so does the CLI's.
    let again = deadletters::list(&options, &topics, 100, WAIT)
        .await
        .unwrap();
    assert_eq!(again.len(), 1);
    let output = std::process::Command::new(essayflow_binary())
        .args(["dead-letters", "list", "--limit", "10"])
        .env("ESSAYFLOW_KAFKA_BROKERS", &brokers)
        .env("ESSAYFLOW_TOPIC_PREFIX", &prefix)
        .env("ESSAYFLOW_LOG", "warn")
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let lines: Vec<serde_json::Value> = String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 1, "{lines:#?}");
    assert_eq!(lines[0]["payload"], early);
    assert!(
        lines[0]["headers"]
            .as_array()
            .unwrap()
            .iter()
            .any(|h| h[0] == "x-error" && h[1].as_str().unwrap().contains("spellcheck")),
        "{lines:#?}"
    );

    // The phase runs now; replaying the dead letter records the result.
    app.request_pipeline(&teacher, &id, "spellcheck").await;
    app.wait_for_phase(&teacher, &id, "spellcheck").await;
    let bus = KafkaBus::new(options.clone()).unwrap();
    let replayed = deadletters::replay(&bus, &topics, 100, WAIT).await.unwrap();
    assert_eq!(replayed, 1);
    wait_until(Duration::from_secs(60), || async {
        let status = app.status(&teacher, &id).await;
        status["phases"]["spellcheck"]["succeeded"] == 1
    })
    .await;
    // Progress is committed: a second replay finds nothing new to send.
    assert_eq!(
        deadletters::replay(&bus, &topics, 100, WAIT).await.unwrap(),
        0
    );
    assert_eq!(
        app.metric("essayflow_ingress_dead_lettered_total").await,
        Some(1)
    );
}
