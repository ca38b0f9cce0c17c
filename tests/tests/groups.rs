//! Commands decided and appended as a group (`CommandService::execute_many`, what the results
//! ingress uses for one batch's results): one append for all, each command answered on its
//! own, every event with its own command's metadata, a rejected command appending nothing,
//! and concurrent groups on one batch all recorded once.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use api::auth::Role;
use commands::messages::result_causation_id;
use commands::{CommandContext, CommandService, Engine, EventLog};
use domain::values::{BatchId, EssayId, MessageId, Outcome, Phase};
use domain::{BatchCommand, BatchError, BatchServices, PipelineCatalog};
use integration_tests::{TestApp, both_engines};
use uuid::Uuid;

fn service(app: &TestApp) -> CommandService {
    CommandService::new(
        &app.storage,
        BatchServices {
            pipelines: Arc::new(PipelineCatalog::builtin()),
        },
    )
}

/// A spellcheck result for `essay` under message id `message`.
fn result(essay: &str, message: &str, outcome: Outcome) -> (BatchCommand, CommandContext) {
    let message_id = MessageId::parse(message.to_owned()).unwrap();
    let context = CommandContext {
        correlation_id: Uuid::new_v4(),
        causation_id: Some(result_causation_id(&message_id)),
        user_id: Some("system:test".to_owned()),
        require_owner: None,
        trace: None,
    };
    let command = BatchCommand::RecordEssayResult {
        essay_id: EssayId::parse(essay.to_owned()).unwrap(),
        phase: Phase::parse("spellcheck".to_owned()).unwrap(),
        outcome,
        message_id,
        result: serde_json::json!({"score": 1}),
        error: None,
        pipeline_request_id: None,
    };
    (command, context)
}

async fn a_group_is_one_append_and_each_command_is_answered_on_its_own(engine: Engine) {
    let app = TestApp::spawn(engine).await;
    let teacher = app.user(Role::Teacher).await;
    let id = app.ready_batch(&teacher, &["e1", "e2", "e3"]).await;
    app.request_pipeline(&teacher, &id, "spellcheck").await;
    app.wait_for_phase(&teacher, &id, "spellcheck").await;
    let batch: BatchId = id.parse().unwrap();
    let service = service(&app);
    let before = app.event_count().await;

    let group = [
        result("e1", "m1", Outcome::Succeeded),
        result("e404", "m404", Outcome::Succeeded),
        result("e1", "m1", Outcome::Succeeded),
        result("e2", "m2", Outcome::Failed),
    ];
    let answers = service.execute_many(batch, &group).await.unwrap();
    assert_eq!(answers.len(), 4);
    let first = answers[0].as_ref().unwrap();
    assert_eq!(first.events, 1);
    assert!(
        matches!(answers[1], Err(BatchError::UnknownEssay(_))),
        "{:?}",
        answers[1]
    );
    let repeat = answers[2].as_ref().unwrap();
    assert_eq!(repeat.events, 0, "a repeat appends nothing");
    assert_eq!(
        (repeat.version, repeat.position),
        (first.version, first.position),
        "a repeat answers with the batch as the commands before it left it"
    );
    let last = answers[3].as_ref().unwrap();
    assert_eq!((last.events, last.version), (1, first.version + 1));
    assert!(last.position > first.position);
    assert_eq!(
        app.event_count().await,
        before + 2,
        "the rejected one appended nothing"
    );

    // The two events: each with its own command's causation, in one transaction.
    let log = EventLog::new(app.storage.clone());
    let events = log.read_batch(batch, None).await.unwrap();
    let appended = &events[events.len() - 2..];
    let causations: Vec<Option<Uuid>> = appended.iter().map(|e| e.metadata.causation_id).collect();
    assert_eq!(
        causations,
        [
            Some(result_causation_id(&MessageId::parse("m1").unwrap())),
            Some(result_causation_id(&MessageId::parse("m2").unwrap()))
        ]
    );
    if engine == Engine::Postgres {
        assert_eq!(
            appended[0].at.tx, appended[1].at.tx,
            "one append, one transaction"
        );
    }
    assert_eq!(appended[1].at.position, appended[0].at.position + 1);

    // The last result completes the phase and the pipeline in the same append.
    let answers = service
        .execute_many(batch, &[result("e3", "m3", Outcome::Succeeded)])
        .await
        .unwrap();
    assert_eq!(answers[0].as_ref().unwrap().events, 3);
    let status = app
        .wait_for_status(&teacher, &id, "completed_with_failures")
        .await;
    assert_eq!(status["phases"]["spellcheck"]["succeeded"], 2);
    assert_eq!(status["phases"]["spellcheck"]["failed"], 1);
}

async fn concurrent_groups_on_one_batch_record_every_result_once(engine: Engine) {
    let app = TestApp::spawn(engine).await;
    let teacher = app.user(Role::Teacher).await;
    let essays: Vec<String> = (0..40).map(|i| format!("e{i}")).collect();
    let essays: Vec<&str> = essays.iter().map(String::as_str).collect();
    let id = app.ready_batch(&teacher, &essays).await;
    app.request_pipeline(&teacher, &id, "spellcheck").await;
    app.wait_for_phase(&teacher, &id, "spellcheck").await;
    let batch: BatchId = id.parse().unwrap();
    // Four services (four nodes, say) record overlapping groups at once: every result is sent
    // twice, by two of them.
    let mut tasks = tokio::task::JoinSet::new();
    for node in 0..4usize {
        let service = service(&app);
        let group: Vec<_> = (0..40)
            .filter(|i| i % 4 == node || (i + 1) % 4 == node)
            .map(|i| result(&format!("e{i}"), &format!("m{i}"), Outcome::Succeeded))
            .collect();
        tasks.spawn(async move { service.execute_many(batch, &group).await });
    }
    let mut recorded = 0;
    while let Some(answers) = tasks.join_next().await {
        for answer in answers.unwrap().unwrap() {
            recorded += answer.unwrap().events.min(1);
        }
    }
    assert_eq!(recorded, 40, "each result recorded by exactly one group");
    let status = app.wait_for_status(&teacher, &id, "completed").await;
    assert_eq!(status["phases"]["spellcheck"]["succeeded"], 40);
}

/// The results ingress, with backpressure on `projections` (waiting at most `max_wait`), fed
/// `n` results of one batch through an in-process bus; returns how long recording them took.
async fn ingest(
    app: &TestApp,
    id: &str,
    n: usize,
    projections: Vec<&'static str>,
    max_wait: std::time::Duration,
) -> std::time::Duration {
    use commands::bus::{Bus, MemoryBus, OutMessage, Topics};
    use commands::ingress::{Backpressure, Ingress};
    let bus = Bus::Memory(MemoryBus::new());
    let topics = Topics::new(format!("bp{}", Uuid::new_v4().simple()));
    let subscription = bus.subscribe("ingress", &[topics.results()]).unwrap();
    let ingress = Ingress::new(service(app), app.storage.clone(), 65_536)
        .with_max_group(25)
        .with_backpressure(Backpressure::new(projections, max_wait));
    let cancel = tokio_util::sync::CancellationToken::new();
    let run = {
        let (bus, topics, cancel) = (bus.clone(), topics.clone(), cancel.clone());
        tokio::spawn(async move { ingress.run_on(subscription, &bus, &topics, &cancel).await })
    };
    let started = std::time::Instant::now();
    let messages: Vec<OutMessage> = (0..n)
        .map(|i| OutMessage {
            topic: topics.results(),
            key: id.to_owned(),
            payload: serde_json::to_vec(&integration_tests::pipeline::result(
                id,
                &format!("e{i}"),
                "spellcheck",
                "succeeded",
            ))
            .unwrap(),
            headers: Vec::new(),
        })
        .collect();
    bus.publish(&messages).await.unwrap();
    let teacher_view = EventLog::new(app.storage.clone());
    let batch: BatchId = id.parse().unwrap();
    integration_tests::wait_until(std::time::Duration::from_secs(60), || async {
        let events = teacher_view.read_batch(batch, None).await.unwrap();
        events
            .iter()
            .filter(|e| e.event_type == "EssayPhaseCompleted")
            .count()
            == n
    })
    .await;
    let took = started.elapsed();
    cancel.cancel();
    run.await.unwrap();
    took
}

async fn the_ingress_waits_for_the_read_models_but_never_stops_for_them(engine: Engine) {
    let app = TestApp::spawn(engine).await;
    let teacher = app.user(Role::Teacher).await;
    async fn ready(app: &TestApp, teacher: &integration_tests::User) -> String {
        let essays: Vec<String> = (0..100).map(|i| format!("e{i}")).collect();
        let essays: Vec<&str> = essays.iter().map(String::as_str).collect();
        let id = app.ready_batch(teacher, &essays).await;
        app.request_pipeline(teacher, &id, "spellcheck").await;
        app.wait_for_phase(teacher, &id, "spellcheck").await;
        id
    }
    // A read model that never moves (its name is nobody's): each group after the first waits
    // out the bound, and intake goes on.
    let id = ready(&app, &teacher).await;
    let took = ingest(
        &app,
        &id,
        100,
        vec!["stalled"],
        std::time::Duration::from_millis(300),
    )
    .await;
    assert!(
        took >= std::time::Duration::from_millis(3 * 300),
        "4 groups of 25: 3 waits of 300 ms, but it took {took:?}"
    );
    // The real read models keep up: groups go on as fast as they apply them, far from the bound.
    let id = ready(&app, &teacher).await;
    let took = ingest(
        &app,
        &id,
        100,
        projections::PROJECTIONS.to_vec(),
        std::time::Duration::from_secs(20),
    )
    .await;
    assert!(took < std::time::Duration::from_secs(20), "{took:?}");
    app.wait_for_projections().await;
    let status = app.status(&teacher, &id).await;
    assert_eq!(status["phases"]["spellcheck"]["succeeded"], 100);
}

both_engines!(
    a_group_is_one_append_and_each_command_is_answered_on_its_own,
    concurrent_groups_on_one_batch_record_every_result_once,
    the_ingress_waits_for_the_read_models_but_never_stops_for_them,
);
