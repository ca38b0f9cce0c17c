//! The Batch aggregate's rules (DESIGN.md section 3) as given/when/then scenarios, and a property
//! test that random command sequences keep the event log, its JSON form and the live state in
//! agreement.
//!
//! A scenario folds its `given` events into `Batch::default()` with `apply_event`, runs the `when`
//! command through `decide`, and checks the events or the rejection. Every fixture is built from
//! fixed ids, so an expected event can be written out in full.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use domain::values::{
    BatchId, ClassDesignation, CourseCode, EssayId, EssayText, EssayTitle, ExpectedEssayCount,
    MessageId, Outcome, Phase, RequestId, Title, UserId,
};
use domain::{
    Batch, BatchCommand, BatchError, BatchEvent, BatchServices, BatchStatus, Essay,
    PipelineCatalog, PipelineOutcome,
};
use proptest::prelude::*;
use proptest::sample::Index;
use serde_json::json;
use uuid::Uuid;

// ---------------------------------------------------------------------------------------------
// Given / when / then
// ---------------------------------------------------------------------------------------------

fn services() -> BatchServices {
    BatchServices {
        pipelines: Arc::new(PipelineCatalog::builtin()),
    }
}

struct Given {
    batch: Batch,
    services: BatchServices,
}

/// A batch whose history is `events`.
fn given(events: Vec<BatchEvent>) -> Given {
    let mut batch = Batch::default();
    for event in events {
        batch.apply_event(event);
    }
    Given {
        batch,
        services: services(),
    }
}

impl Given {
    /// Decides with another pipeline configuration than the built-in one.
    fn with_pipelines(mut self, toml: &str) -> Self {
        self.services.pipelines = Arc::new(PipelineCatalog::from_toml(toml).unwrap());
        self
    }

    fn when(self, command: BatchCommand) -> When {
        let result = self.batch.decide(command, &self.services);
        When {
            batch: self.batch,
            result,
        }
    }
}

struct When {
    batch: Batch,
    result: Result<Vec<BatchEvent>, BatchError>,
}

impl When {
    /// Asserts that the command was accepted with exactly `expected`, and returns the state
    /// after them.
    #[track_caller]
    fn then_expect(self, expected: Vec<BatchEvent>) -> Batch {
        match self.result {
            Ok(events) => {
                assert_eq!(events, expected);
                let mut batch = self.batch;
                for event in events {
                    batch.apply_event(event);
                }
                batch
            }
            Err(error) => panic!("expected {expected:?}, but the command was rejected: {error}"),
        }
    }

    /// Asserts that the command was accepted and changed nothing: a repeat, or nothing to do.
    #[track_caller]
    fn then_nothing_happens(self) -> Batch {
        self.then_expect(vec![])
    }

    #[track_caller]
    fn then_reject(self, expected: BatchError) {
        assert_eq!(self.result, Err(expected));
    }
}

// ---------------------------------------------------------------------------------------------
// Fixtures
// ---------------------------------------------------------------------------------------------

fn batch_id() -> BatchId {
    BatchId::from_uuid(Uuid::from_u128(1))
}

fn owner_id() -> UserId {
    UserId::from_uuid(Uuid::from_u128(2))
}

/// The id of the `n`th pipeline request.
fn req(n: u128) -> RequestId {
    RequestId::from_uuid(Uuid::from_u128(100 + n))
}

fn phase(name: &str) -> Phase {
    Phase::parse(name).unwrap()
}

fn phases(names: &[&str]) -> Vec<Phase> {
    names.iter().map(|n| phase(n)).collect()
}

fn essay_id(id: &str) -> EssayId {
    EssayId::parse(id).unwrap()
}

fn essay_ids(ids: &[&str]) -> Vec<EssayId> {
    ids.iter().map(|id| essay_id(id)).collect()
}

fn essay(id: &str) -> Essay {
    Essay {
        essay_id: essay_id(id),
        title: EssayTitle::parse(format!("Essay {id}")).unwrap(),
        text: EssayText::parse(format!("The text of essay {id}.")).unwrap(),
    }
}

/// The processor's message id for one result: unique per request, essay and phase, so that
/// the same id means the same message delivered again.
fn message_id(request_id: RequestId, essay: &str, phase: &str) -> MessageId {
    MessageId::parse(format!("msg-{request_id}-{essay}-{phase}")).unwrap()
}

fn result_of(essay: &str, phase: &str) -> serde_json::Value {
    json!({ "essay": essay, "phase": phase, "score": 7 })
}

fn error_of(phase: &str) -> String {
    format!("{phase} processor failed")
}

// Commands.

fn register(expected: i64) -> BatchCommand {
    BatchCommand::RegisterBatch {
        batch_id: batch_id(),
        owner_id: owner_id(),
        title: Title::parse("Autumn essays").unwrap(),
        course_code: CourseCode::parse("EN-101").unwrap(),
        class_designation: Some(ClassDesignation::parse("9B").unwrap()),
        expected_essay_count: ExpectedEssayCount::parse(expected).unwrap(),
    }
}

fn add_essays(ids: &[&str]) -> BatchCommand {
    BatchCommand::AddEssays {
        essays: ids.iter().map(|id| essay(id)).collect(),
    }
}

fn request_pipeline(request_id: RequestId, pipeline: &str) -> BatchCommand {
    BatchCommand::RequestPipeline {
        request_id,
        pipeline: phase(pipeline),
    }
}

fn resolve(request_id: RequestId) -> BatchCommand {
    BatchCommand::ResolvePipeline { request_id }
}

/// A processor's result for `essay` in `phase_name`, answering a phase request of `request_id`.
fn record(request_id: RequestId, essay: &str, phase_name: &str, outcome: Outcome) -> BatchCommand {
    BatchCommand::RecordEssayResult {
        essay_id: essay_id(essay),
        phase: phase(phase_name),
        outcome,
        message_id: message_id(request_id, essay, phase_name),
        result: result_of(essay, phase_name),
        error: (outcome == Outcome::Failed).then(|| error_of(phase_name)),
        pipeline_request_id: Some(request_id),
    }
}

fn advance(request_id: RequestId, completed_phase: &str) -> BatchCommand {
    BatchCommand::AdvancePhase {
        request_id,
        completed_phase: phase(completed_phase),
    }
}

fn cancel() -> BatchCommand {
    BatchCommand::CancelBatch {
        reason: Some("wrong class".to_owned()),
    }
}

// Events.

fn registered(expected: i64) -> BatchEvent {
    BatchEvent::BatchRegistered {
        batch_id: batch_id(),
        owner_id: owner_id(),
        title: Title::parse("Autumn essays").unwrap(),
        course_code: CourseCode::parse("EN-101").unwrap(),
        class_designation: Some(ClassDesignation::parse("9B").unwrap()),
        expected_essay_count: ExpectedEssayCount::parse(expected).unwrap(),
    }
}

fn essays_added(ids: &[&str]) -> BatchEvent {
    BatchEvent::EssaysAdded {
        essays: ids.iter().map(|id| essay(id)).collect(),
    }
}

fn ready(essay_count: u32) -> BatchEvent {
    BatchEvent::BatchReadyForProcessing { essay_count }
}

fn pipeline_requested(request_id: RequestId, pipeline: &str) -> BatchEvent {
    BatchEvent::PipelineRequested {
        request_id,
        pipeline: phase(pipeline),
    }
}

fn pipeline_resolved(
    request_id: RequestId,
    requested: &str,
    steps: &[&str],
    pruned: &[&str],
) -> BatchEvent {
    BatchEvent::PipelineResolved {
        request_id,
        requested: phase(requested),
        steps: phases(steps),
        pruned: phases(pruned),
    }
}

fn phase_started(request_id: RequestId, phase_name: &str, essays: &[&str]) -> BatchEvent {
    BatchEvent::PhaseStarted {
        request_id,
        phase: phase(phase_name),
        essays: essay_ids(essays),
    }
}

fn essay_succeeded(request_id: RequestId, essay: &str, phase_name: &str) -> BatchEvent {
    BatchEvent::EssayPhaseCompleted {
        request_id,
        essay_id: essay_id(essay),
        phase: phase(phase_name),
        message_id: message_id(request_id, essay, phase_name),
        result: result_of(essay, phase_name),
    }
}

fn essay_failed(request_id: RequestId, essay: &str, phase_name: &str) -> BatchEvent {
    BatchEvent::EssayPhaseFailed {
        request_id,
        essay_id: essay_id(essay),
        phase: phase(phase_name),
        message_id: message_id(request_id, essay, phase_name),
        error: error_of(phase_name),
    }
}

fn phase_completed(
    request_id: RequestId,
    phase_name: &str,
    succeeded: u32,
    failed: u32,
) -> BatchEvent {
    BatchEvent::PhaseCompleted {
        request_id,
        phase: phase(phase_name),
        succeeded,
        failed,
    }
}

fn pipeline_completed(request_id: RequestId, outcome: PipelineOutcome) -> BatchEvent {
    BatchEvent::PipelineCompleted {
        request_id,
        outcome,
    }
}

fn cancelled() -> BatchEvent {
    BatchEvent::BatchCancelled {
        reason: Some("wrong class".to_owned()),
    }
}

// Histories.

/// A registered batch holding exactly its expected essays `ids`.
fn ready_batch(ids: &[&str]) -> Vec<BatchEvent> {
    vec![
        registered(ids.len() as i64),
        essays_added(ids),
        ready(ids.len() as u32),
    ]
}

/// A ready batch of `ids` whose request `request_id` for `pipeline` was resolved into `steps`
/// and whose first step started for every essay.
fn running(ids: &[&str], request_id: RequestId, pipeline: &str, steps: &[&str]) -> Vec<BatchEvent> {
    [
        ready_batch(ids),
        vec![
            pipeline_requested(request_id, pipeline),
            pipeline_resolved(request_id, pipeline, steps, &[]),
            phase_started(request_id, steps[0], ids),
        ],
    ]
    .concat()
}

/// Every essay of `ids` succeeds in `phase_name`, which then completes.
fn phase_succeeds(request_id: RequestId, phase_name: &str, ids: &[&str]) -> Vec<BatchEvent> {
    ids.iter()
        .map(|id| essay_succeeded(request_id, id, phase_name))
        .chain([phase_completed(request_id, phase_name, ids.len() as u32, 0)])
        .collect()
}

/// A whole request that resolves into `steps` with nothing pruned, in which every essay succeeds.
fn succeeding_pipeline(
    request_id: RequestId,
    pipeline: &str,
    steps: &[&str],
    ids: &[&str],
) -> Vec<BatchEvent> {
    let mut events = vec![
        pipeline_requested(request_id, pipeline),
        pipeline_resolved(request_id, pipeline, steps, &[]),
    ];
    for step in steps {
        events.push(phase_started(request_id, step, ids));
        events.extend(phase_succeeds(request_id, step, ids));
    }
    events.push(pipeline_completed(request_id, PipelineOutcome::Completed));
    events
}

// ---------------------------------------------------------------------------------------------
// RegisterBatch
// ---------------------------------------------------------------------------------------------

#[test]
fn registering_a_new_batch_records_its_details() {
    let batch = given(vec![])
        .when(register(3))
        .then_expect(vec![registered(3)]);
    assert_eq!(batch.id(), Some(batch_id()));
    assert_eq!(batch.owner(), Some(owner_id()));
    assert_eq!(batch.status(), BatchStatus::Registered);
}

#[test]
fn registering_a_batch_twice_is_rejected() {
    given(vec![registered(3)])
        .when(register(3))
        .then_reject(BatchError::AlreadyRegistered);
}

#[test]
fn every_command_but_register_on_an_unregistered_batch_is_rejected_as_not_found() {
    for command in [
        add_essays(&["e1"]),
        request_pipeline(req(1), "spellcheck"),
        resolve(req(1)),
        record(req(1), "e1", "spellcheck", Outcome::Succeeded),
        advance(req(1), "spellcheck"),
        cancel(),
    ] {
        given(vec![])
            .when(command)
            .then_reject(BatchError::NotFound);
    }
}

// ---------------------------------------------------------------------------------------------
// AddEssays
// ---------------------------------------------------------------------------------------------

#[test]
fn adding_fewer_essays_than_expected_records_them_without_making_the_batch_ready() {
    let batch = given(vec![registered(3)])
        .when(add_essays(&["e1", "e2"]))
        .then_expect(vec![essays_added(&["e1", "e2"])]);
    assert_eq!(batch.essay_count(), 2);
    assert_eq!(batch.status(), BatchStatus::Registered);
}

#[test]
fn adding_the_last_expected_essay_makes_the_batch_ready_for_processing() {
    let batch = given(vec![registered(3), essays_added(&["e1", "e2"])])
        .when(add_essays(&["e3"]))
        .then_expect(vec![essays_added(&["e3"]), ready(3)]);
    assert_eq!(batch.status(), BatchStatus::Ready);
}

#[test]
fn adding_every_expected_essay_at_once_makes_the_batch_ready_for_processing() {
    given(vec![registered(2)])
        .when(add_essays(&["e1", "e2"]))
        .then_expect(vec![essays_added(&["e1", "e2"]), ready(2)]);
}

#[test]
fn adding_essays_beyond_the_expected_count_is_rejected() {
    given(vec![registered(3), essays_added(&["e1", "e2"])])
        .when(add_essays(&["e3", "e4"]))
        .then_reject(BatchError::TooManyEssays {
            expected: 3,
            added: 2,
            adding: 2,
        });
}

#[test]
fn adding_essays_to_a_batch_that_is_already_full_is_rejected() {
    given(ready_batch(&["e1", "e2"]))
        .when(add_essays(&["e3"]))
        .then_reject(BatchError::TooManyEssays {
            expected: 2,
            added: 2,
            adding: 1,
        });
}

#[test]
fn adding_an_empty_list_of_essays_is_rejected() {
    given(vec![registered(3)])
        .when(add_essays(&[]))
        .then_reject(BatchError::NoEssays);
}

#[test]
fn adding_the_same_essay_id_twice_in_one_command_is_rejected() {
    given(vec![registered(3)])
        .when(add_essays(&["e1", "e2", "e1"]))
        .then_reject(BatchError::DuplicateEssay(essay_id("e1")));
}

#[test]
fn adding_an_essay_id_already_in_the_batch_is_rejected() {
    given(vec![registered(3), essays_added(&["e1"])])
        .when(add_essays(&["e2", "e1"]))
        .then_reject(BatchError::DuplicateEssay(essay_id("e1")));
}

#[test]
fn adding_essays_to_a_cancelled_batch_is_rejected() {
    given(vec![registered(3), cancelled()])
        .when(add_essays(&["e1"]))
        .then_reject(BatchError::Cancelled);
}

// ---------------------------------------------------------------------------------------------
// RequestPipeline
// ---------------------------------------------------------------------------------------------

#[test]
fn requesting_a_pipeline_on_a_ready_batch_records_the_request_and_starts_processing() {
    let batch = given(ready_batch(&["e1", "e2"]))
        .when(request_pipeline(req(1), "nlp"))
        .then_expect(vec![pipeline_requested(req(1), "nlp")]);
    assert_eq!(batch.status(), BatchStatus::Processing);
    assert_eq!(batch.active_request(), Some(req(1)));
}

#[test]
fn requesting_a_pipeline_before_every_expected_essay_is_added_is_rejected() {
    given(vec![registered(3), essays_added(&["e1", "e2"])])
        .when(request_pipeline(req(1), "spellcheck"))
        .then_reject(BatchError::EssaysIncomplete {
            added: 2,
            expected: 3,
        });
}

#[test]
fn requesting_a_pipeline_on_a_cancelled_batch_is_rejected() {
    given([ready_batch(&["e1"]), vec![cancelled()]].concat())
        .when(request_pipeline(req(1), "spellcheck"))
        .then_reject(BatchError::Cancelled);
}

#[test]
fn requesting_a_pipeline_while_another_is_running_is_rejected() {
    given(running(&["e1"], req(1), "spellcheck", &["spellcheck"]))
        .when(request_pipeline(req(2), "nlp"))
        .then_reject(BatchError::PipelineInProgress(req(1)));
}

#[test]
fn requesting_a_pipeline_while_another_awaits_resolution_is_rejected() {
    given(
        [
            ready_batch(&["e1"]),
            vec![pipeline_requested(req(1), "nlp")],
        ]
        .concat(),
    )
    .when(request_pipeline(req(2), "spellcheck"))
    .then_reject(BatchError::PipelineInProgress(req(1)));
}

#[test]
fn requesting_an_unknown_pipeline_is_rejected() {
    given(ready_batch(&["e1"]))
        .when(request_pipeline(req(1), "translation"))
        .then_reject(BatchError::UnknownPipeline(phase("translation")));
}

#[test]
fn repeating_a_request_id_changes_nothing_while_it_runs() {
    given(running(&["e1"], req(1), "spellcheck", &["spellcheck"]))
        .when(request_pipeline(req(1), "spellcheck"))
        .then_nothing_happens();
}

#[test]
fn repeating_a_request_id_changes_nothing_after_its_pipeline_completed() {
    let history = [
        ready_batch(&["e1"]),
        succeeding_pipeline(req(1), "spellcheck", &["spellcheck"], &["e1"]),
    ]
    .concat();
    let batch = given(history)
        .when(request_pipeline(req(1), "spellcheck"))
        .then_nothing_happens();
    assert_eq!(batch.status(), BatchStatus::Completed);
}

#[test]
fn a_second_pipeline_may_be_requested_after_the_first_completed() {
    let history = [
        ready_batch(&["e1", "e2"]),
        succeeding_pipeline(req(1), "spellcheck", &["spellcheck"], &["e1", "e2"]),
    ]
    .concat();
    let batch = given(history)
        .when(request_pipeline(req(2), "cj_assessment"))
        .then_expect(vec![pipeline_requested(req(2), "cj_assessment")]);
    assert_eq!(batch.status(), BatchStatus::Processing);
    assert_eq!(batch.active_request(), Some(req(2)));
}

#[test]
fn a_second_pipeline_may_be_requested_after_the_first_completed_with_failures() {
    let history = [
        running(&["e1"], req(1), "spellcheck", &["spellcheck"]),
        vec![
            essay_failed(req(1), "e1", "spellcheck"),
            phase_completed(req(1), "spellcheck", 0, 1),
            pipeline_completed(req(1), PipelineOutcome::CompletedWithFailures),
        ],
    ]
    .concat();
    given(history)
        .when(request_pipeline(req(2), "spellcheck"))
        .then_expect(vec![pipeline_requested(req(2), "spellcheck")]);
}

// ---------------------------------------------------------------------------------------------
// ResolvePipeline
// ---------------------------------------------------------------------------------------------

#[test]
fn resolving_a_request_orders_its_steps_by_dependency_and_starts_the_first_for_every_essay() {
    let history = [
        ready_batch(&["e1", "e2"]),
        vec![pipeline_requested(req(1), "ai_feedback")],
    ]
    .concat();
    given(history).when(resolve(req(1))).then_expect(vec![
        pipeline_resolved(
            req(1),
            "ai_feedback",
            &["spellcheck", "nlp", "ai_feedback"],
            &[],
        ),
        phase_started(req(1), "spellcheck", &["e1", "e2"]),
    ]);
}

#[test]
fn resolving_a_pipeline_without_prerequisites_runs_only_that_phase() {
    let history = [
        ready_batch(&["e1"]),
        vec![pipeline_requested(req(1), "spellcheck")],
    ]
    .concat();
    given(history).when(resolve(req(1))).then_expect(vec![
        pipeline_resolved(req(1), "spellcheck", &["spellcheck"], &[]),
        phase_started(req(1), "spellcheck", &["e1"]),
    ]);
}

#[test]
fn resolving_prunes_steps_already_completed_for_every_essay() {
    let history = [
        ready_batch(&["e1", "e2"]),
        succeeding_pipeline(req(1), "nlp", &["spellcheck", "nlp"], &["e1", "e2"]),
        vec![pipeline_requested(req(2), "ai_feedback")],
    ]
    .concat();
    given(history).when(resolve(req(2))).then_expect(vec![
        pipeline_resolved(
            req(2),
            "ai_feedback",
            &["ai_feedback"],
            &["spellcheck", "nlp"],
        ),
        phase_started(req(2), "ai_feedback", &["e1", "e2"]),
    ]);
}

#[test]
fn a_step_completed_for_only_some_essays_is_not_pruned() {
    let history = [
        running(&["e1", "e2"], req(1), "spellcheck", &["spellcheck"]),
        vec![
            essay_succeeded(req(1), "e1", "spellcheck"),
            essay_failed(req(1), "e2", "spellcheck"),
            phase_completed(req(1), "spellcheck", 1, 1),
            pipeline_completed(req(1), PipelineOutcome::CompletedWithFailures),
            pipeline_requested(req(2), "nlp"),
        ],
    ]
    .concat();
    given(history).when(resolve(req(2))).then_expect(vec![
        pipeline_resolved(req(2), "nlp", &["spellcheck", "nlp"], &[]),
        phase_started(req(2), "spellcheck", &["e1", "e2"]),
    ]);
}

#[test]
fn the_requested_phase_runs_again_even_when_it_completed_before() {
    let history = [
        ready_batch(&["e1"]),
        succeeding_pipeline(req(1), "spellcheck", &["spellcheck"], &["e1"]),
        vec![pipeline_requested(req(2), "spellcheck")],
    ]
    .concat();
    given(history).when(resolve(req(2))).then_expect(vec![
        pipeline_resolved(req(2), "spellcheck", &["spellcheck"], &[]),
        phase_started(req(2), "spellcheck", &["e1"]),
    ]);
}

#[test]
fn resolving_a_request_twice_changes_nothing() {
    given(running(&["e1"], req(1), "nlp", &["spellcheck", "nlp"]))
        .when(resolve(req(1)))
        .then_nothing_happens();
}

#[test]
fn resolving_a_request_that_is_not_pending_changes_nothing() {
    let history = [
        ready_batch(&["e1"]),
        vec![pipeline_requested(req(1), "nlp")],
    ]
    .concat();
    given(history.clone())
        .when(resolve(req(2)))
        .then_nothing_happens();
    given(ready_batch(&["e1"]))
        .when(resolve(req(1)))
        .then_nothing_happens();
}

#[test]
fn resolving_on_a_cancelled_batch_starts_nothing() {
    let history = [
        ready_batch(&["e1"]),
        vec![pipeline_requested(req(1), "nlp"), cancelled()],
    ]
    .concat();
    given(history).when(resolve(req(1))).then_nothing_happens();
}

#[test]
fn a_request_whose_pipeline_left_the_configuration_is_rejected_and_the_batch_is_ready_again() {
    let history = [
        ready_batch(&["e1"]),
        vec![pipeline_requested(req(1), "nlp")],
    ]
    .concat();
    let batch = given(history)
        .with_pipelines("[pipelines]\nspellcheck = []\n")
        .when(resolve(req(1)))
        .then_expect(vec![BatchEvent::PipelineRejected {
            request_id: req(1),
            reason: "unknown pipeline nlp".to_owned(),
        }]);
    assert_eq!(batch.status(), BatchStatus::Ready);
    assert_eq!(batch.active_request(), None);
}

// ---------------------------------------------------------------------------------------------
// RecordEssayResult
// ---------------------------------------------------------------------------------------------

#[test]
fn a_succeeded_result_is_recorded_as_essay_phase_completed() {
    given(running(
        &["e1", "e2"],
        req(1),
        "spellcheck",
        &["spellcheck"],
    ))
    .when(record(req(1), "e1", "spellcheck", Outcome::Succeeded))
    .then_expect(vec![essay_succeeded(req(1), "e1", "spellcheck")]);
}

#[test]
fn a_failed_result_is_recorded_as_essay_phase_failed() {
    given(running(
        &["e1", "e2"],
        req(1),
        "spellcheck",
        &["spellcheck"],
    ))
    .when(record(req(1), "e1", "spellcheck", Outcome::Failed))
    .then_expect(vec![essay_failed(req(1), "e1", "spellcheck")]);
}

#[test]
fn a_failed_result_without_an_error_message_gets_a_generic_one() {
    let command = BatchCommand::RecordEssayResult {
        essay_id: essay_id("e1"),
        phase: phase("spellcheck"),
        outcome: Outcome::Failed,
        message_id: message_id(req(1), "e1", "spellcheck"),
        result: json!({}),
        error: None,
        pipeline_request_id: None,
    };
    given(running(
        &["e1", "e2"],
        req(1),
        "spellcheck",
        &["spellcheck"],
    ))
    .when(command)
    .then_expect(vec![BatchEvent::EssayPhaseFailed {
        request_id: req(1),
        essay_id: essay_id("e1"),
        phase: phase("spellcheck"),
        message_id: message_id(req(1), "e1", "spellcheck"),
        error: "processing failed".to_owned(),
    }]);
}

#[test]
fn the_last_outcome_of_a_phase_completes_it_with_the_succeeded_and_failed_counts() {
    let history = [
        running(&["e1", "e2", "e3"], req(1), "nlp", &["spellcheck", "nlp"]),
        vec![
            essay_succeeded(req(1), "e1", "spellcheck"),
            essay_failed(req(1), "e2", "spellcheck"),
        ],
    ]
    .concat();
    given(history)
        .when(record(req(1), "e3", "spellcheck", Outcome::Succeeded))
        .then_expect(vec![
            essay_succeeded(req(1), "e3", "spellcheck"),
            phase_completed(req(1), "spellcheck", 2, 1),
        ]);
}

#[test]
fn the_last_outcome_of_the_last_phase_completes_the_pipeline() {
    let history = [
        running(&["e1", "e2"], req(1), "nlp", &["spellcheck", "nlp"]),
        phase_succeeds(req(1), "spellcheck", &["e1", "e2"]),
        vec![
            phase_started(req(1), "nlp", &["e1", "e2"]),
            essay_succeeded(req(1), "e1", "nlp"),
        ],
    ]
    .concat();
    let batch = given(history)
        .when(record(req(1), "e2", "nlp", Outcome::Succeeded))
        .then_expect(vec![
            essay_succeeded(req(1), "e2", "nlp"),
            phase_completed(req(1), "nlp", 2, 0),
            pipeline_completed(req(1), PipelineOutcome::Completed),
        ]);
    assert_eq!(batch.status(), BatchStatus::Completed);
    assert_eq!(batch.active_request(), None);
}

#[test]
fn a_pipeline_in_which_any_essay_failed_completes_with_failures() {
    let history = [
        running(&["e1", "e2"], req(1), "nlp", &["spellcheck", "nlp"]),
        vec![
            essay_succeeded(req(1), "e1", "spellcheck"),
            essay_failed(req(1), "e2", "spellcheck"),
            phase_completed(req(1), "spellcheck", 1, 1),
            phase_started(req(1), "nlp", &["e1"]),
        ],
    ]
    .concat();
    let batch = given(history)
        .when(record(req(1), "e1", "nlp", Outcome::Succeeded))
        .then_expect(vec![
            essay_succeeded(req(1), "e1", "nlp"),
            phase_completed(req(1), "nlp", 1, 0),
            pipeline_completed(req(1), PipelineOutcome::CompletedWithFailures),
        ]);
    assert_eq!(batch.status(), BatchStatus::CompletedWithFailures);
}

#[test]
fn a_duplicate_result_changes_nothing() {
    let history = [
        running(&["e1", "e2"], req(1), "spellcheck", &["spellcheck"]),
        vec![essay_succeeded(req(1), "e1", "spellcheck")],
    ]
    .concat();
    given(history.clone())
        .when(record(req(1), "e1", "spellcheck", Outcome::Succeeded))
        .then_nothing_happens();
    // A redelivery that disagrees with the first outcome is still the same result.
    given(history)
        .when(record(req(1), "e1", "spellcheck", Outcome::Failed))
        .then_nothing_happens();
}

#[test]
fn a_duplicate_result_for_a_phase_that_already_completed_changes_nothing() {
    let history = [
        running(&["e1"], req(1), "nlp", &["spellcheck", "nlp"]),
        phase_succeeds(req(1), "spellcheck", &["e1"]),
        vec![phase_started(req(1), "nlp", &["e1"])],
    ]
    .concat();
    given(history)
        .when(record(req(1), "e1", "spellcheck", Outcome::Succeeded))
        .then_nothing_happens();
}

#[test]
fn a_duplicate_result_after_the_pipeline_completed_changes_nothing() {
    let history = [
        ready_batch(&["e1", "e2"]),
        succeeding_pipeline(req(1), "nlp", &["spellcheck", "nlp"], &["e1", "e2"]),
    ]
    .concat();
    for duplicate in [
        record(req(1), "e2", "nlp", Outcome::Succeeded),
        record(req(1), "e1", "spellcheck", Outcome::Succeeded),
    ] {
        let batch = given(history.clone())
            .when(duplicate)
            .then_nothing_happens();
        assert_eq!(batch.status(), BatchStatus::Completed);
    }
}

#[test]
fn a_result_for_an_essay_not_in_the_batch_is_rejected() {
    given(running(&["e1"], req(1), "spellcheck", &["spellcheck"]))
        .when(record(req(1), "e9", "spellcheck", Outcome::Succeeded))
        .then_reject(BatchError::UnknownEssay(essay_id("e9")));
}

#[test]
fn a_result_for_a_phase_that_is_not_running_is_rejected() {
    // A later step of the running pipeline.
    given(running(&["e1"], req(1), "nlp", &["spellcheck", "nlp"]))
        .when(record(req(1), "e1", "nlp", Outcome::Succeeded))
        .then_reject(BatchError::ResultNotExpected {
            essay_id: essay_id("e1"),
            phase: phase("nlp"),
        });
    // A request not resolved yet.
    given(
        [
            ready_batch(&["e1"]),
            vec![pipeline_requested(req(1), "spellcheck")],
        ]
        .concat(),
    )
    .when(record(req(1), "e1", "spellcheck", Outcome::Succeeded))
    .then_reject(BatchError::ResultNotExpected {
        essay_id: essay_id("e1"),
        phase: phase("spellcheck"),
    });
    // No pipeline at all.
    given(ready_batch(&["e1"]))
        .when(record(req(1), "e1", "spellcheck", Outcome::Succeeded))
        .then_reject(BatchError::ResultNotExpected {
            essay_id: essay_id("e1"),
            phase: phase("spellcheck"),
        });
}

#[test]
fn a_new_result_after_the_pipeline_completed_is_rejected() {
    let history = [
        ready_batch(&["e1"]),
        succeeding_pipeline(req(1), "spellcheck", &["spellcheck"], &["e1"]),
    ]
    .concat();
    given(history)
        .when(record(req(1), "e1", "nlp", Outcome::Succeeded))
        .then_reject(BatchError::ResultNotExpected {
            essay_id: essay_id("e1"),
            phase: phase("nlp"),
        });
}

#[test]
fn essays_that_failed_a_phase_are_left_out_of_later_phases() {
    let history = [
        running(&["e1", "e2", "e3"], req(1), "nlp", &["spellcheck", "nlp"]),
        vec![
            essay_succeeded(req(1), "e1", "spellcheck"),
            essay_failed(req(1), "e2", "spellcheck"),
            essay_succeeded(req(1), "e3", "spellcheck"),
            phase_completed(req(1), "spellcheck", 2, 1),
        ],
    ]
    .concat();
    let batch = given(history)
        .when(advance(req(1), "spellcheck"))
        .then_expect(vec![phase_started(req(1), "nlp", &["e1", "e3"])]);
    // The essay left out of the phase may not report a result for it.
    let result = batch.decide(record(req(1), "e2", "nlp", Outcome::Succeeded), &services());
    assert_eq!(
        result,
        Err(BatchError::ResultNotExpected {
            essay_id: essay_id("e2"),
            phase: phase("nlp"),
        })
    );
}

#[test]
fn when_every_essay_fails_a_phase_the_pipeline_completes_with_failures_at_once() {
    let history = [
        running(
            &["e1", "e2"],
            req(1),
            "ai_feedback",
            &["spellcheck", "nlp", "ai_feedback"],
        ),
        vec![essay_failed(req(1), "e1", "spellcheck")],
    ]
    .concat();
    let batch = given(history)
        .when(record(req(1), "e2", "spellcheck", Outcome::Failed))
        .then_expect(vec![
            essay_failed(req(1), "e2", "spellcheck"),
            phase_completed(req(1), "spellcheck", 0, 2),
            pipeline_completed(req(1), PipelineOutcome::CompletedWithFailures),
        ]);
    assert_eq!(batch.status(), BatchStatus::CompletedWithFailures);
    // The conductor's AdvancePhase for the completed phase then starts nothing.
    assert_eq!(
        batch.decide(advance(req(1), "spellcheck"), &services()),
        Ok(vec![])
    );
}

#[test]
fn when_the_remaining_essays_all_fail_a_later_phase_the_pipeline_completes_with_failures_at_once() {
    let history = [
        running(
            &["e1", "e2"],
            req(1),
            "ai_feedback",
            &["spellcheck", "nlp", "ai_feedback"],
        ),
        vec![
            essay_failed(req(1), "e1", "spellcheck"),
            essay_succeeded(req(1), "e2", "spellcheck"),
            phase_completed(req(1), "spellcheck", 1, 1),
            phase_started(req(1), "nlp", &["e2"]),
        ],
    ]
    .concat();
    given(history)
        .when(record(req(1), "e2", "nlp", Outcome::Failed))
        .then_expect(vec![
            essay_failed(req(1), "e2", "nlp"),
            phase_completed(req(1), "nlp", 0, 1),
            pipeline_completed(req(1), PipelineOutcome::CompletedWithFailures),
        ]);
}

#[test]
fn a_result_redelivered_after_a_later_pipeline_started_changes_nothing() {
    let history = [
        ready_batch(&["e1"]),
        succeeding_pipeline(req(1), "spellcheck", &["spellcheck"], &["e1"]),
        vec![
            pipeline_requested(req(2), "nlp"),
            pipeline_resolved(req(2), "nlp", &["nlp"], &["spellcheck"]),
            phase_started(req(2), "nlp", &["e1"]),
        ],
    ]
    .concat();
    given(history)
        .when(record(req(1), "e1", "spellcheck", Outcome::Succeeded))
        .then_nothing_happens();
}

#[test]
fn a_result_redelivered_while_a_later_pipeline_reruns_its_phase_is_not_counted_again() {
    let history = [
        ready_batch(&["e1", "e2"]),
        succeeding_pipeline(req(1), "spellcheck", &["spellcheck"], &["e1", "e2"]),
        vec![
            pipeline_requested(req(2), "spellcheck"),
            pipeline_resolved(req(2), "spellcheck", &["spellcheck"], &[]),
            phase_started(req(2), "spellcheck", &["e1", "e2"]),
        ],
    ]
    .concat();
    let batch = given(history)
        .when(record(req(1), "e1", "spellcheck", Outcome::Succeeded))
        .then_nothing_happens();
    // The new run's own result for the same essay and phase still counts.
    let fresh = batch.decide(
        record(req(2), "e1", "spellcheck", Outcome::Succeeded),
        &services(),
    );
    assert_eq!(fresh, Ok(vec![essay_succeeded(req(2), "e1", "spellcheck")]));
}

// ---------------------------------------------------------------------------------------------
// AdvancePhase
// ---------------------------------------------------------------------------------------------

#[test]
fn advancing_after_a_phase_completed_starts_the_next_step_for_every_essay() {
    let history = [
        running(
            &["e1", "e2"],
            req(1),
            "ai_feedback",
            &["spellcheck", "nlp", "ai_feedback"],
        ),
        phase_succeeds(req(1), "spellcheck", &["e1", "e2"]),
    ]
    .concat();
    given(history)
        .when(advance(req(1), "spellcheck"))
        .then_expect(vec![phase_started(req(1), "nlp", &["e1", "e2"])]);
}

#[test]
fn advancing_twice_changes_nothing() {
    let history = [
        running(
            &["e1", "e2"],
            req(1),
            "ai_feedback",
            &["spellcheck", "nlp", "ai_feedback"],
        ),
        phase_succeeds(req(1), "spellcheck", &["e1", "e2"]),
        vec![phase_started(req(1), "nlp", &["e1", "e2"])],
    ]
    .concat();
    given(history)
        .when(advance(req(1), "spellcheck"))
        .then_nothing_happens();
}

#[test]
fn advancing_before_the_current_phase_completed_changes_nothing() {
    let history = [
        running(&["e1", "e2"], req(1), "nlp", &["spellcheck", "nlp"]),
        vec![essay_succeeded(req(1), "e1", "spellcheck")],
    ]
    .concat();
    given(history)
        .when(advance(req(1), "spellcheck"))
        .then_nothing_happens();
}

#[test]
fn advancing_another_request_or_phase_changes_nothing() {
    let history = [
        running(&["e1"], req(1), "nlp", &["spellcheck", "nlp"]),
        phase_succeeds(req(1), "spellcheck", &["e1"]),
    ]
    .concat();
    given(history.clone())
        .when(advance(req(2), "spellcheck"))
        .then_nothing_happens();
    given(history)
        .when(advance(req(1), "nlp"))
        .then_nothing_happens();
}

#[test]
fn advancing_after_the_last_phase_changes_nothing() {
    let history = [
        ready_batch(&["e1"]),
        succeeding_pipeline(req(1), "nlp", &["spellcheck", "nlp"], &["e1"]),
    ]
    .concat();
    given(history)
        .when(advance(req(1), "nlp"))
        .then_nothing_happens();
}

// ---------------------------------------------------------------------------------------------
// CancelBatch
// ---------------------------------------------------------------------------------------------

#[test]
fn cancelling_a_batch_records_the_cancellation_with_its_reason() {
    let batch = given(vec![registered(2)])
        .when(cancel())
        .then_expect(vec![cancelled()]);
    assert_eq!(batch.status(), BatchStatus::Cancelled);
}

#[test]
fn cancelling_a_batch_twice_is_rejected() {
    given(vec![registered(2), cancelled()])
        .when(cancel())
        .then_reject(BatchError::Cancelled);
}

#[test]
fn after_cancelling_no_further_phase_starts() {
    let history = [
        running(&["e1", "e2"], req(1), "nlp", &["spellcheck", "nlp"]),
        phase_succeeds(req(1), "spellcheck", &["e1", "e2"]),
        vec![cancelled()],
    ]
    .concat();
    given(history)
        .when(advance(req(1), "spellcheck"))
        .then_nothing_happens();
}

#[test]
fn late_results_after_cancelling_are_recorded_but_complete_nothing() {
    let history = [
        running(&["e1", "e2"], req(1), "spellcheck", &["spellcheck"]),
        vec![essay_succeeded(req(1), "e1", "spellcheck"), cancelled()],
    ]
    .concat();
    // The last outcome of the last phase: without the cancellation it would complete the
    // phase and the pipeline.
    let batch = given(history)
        .when(record(req(1), "e2", "spellcheck", Outcome::Succeeded))
        .then_expect(vec![essay_succeeded(req(1), "e2", "spellcheck")]);
    assert_eq!(batch.status(), BatchStatus::Cancelled);
    // And a redelivery of it is still a no-op.
    let again = batch.decide(
        record(req(1), "e2", "spellcheck", Outcome::Succeeded),
        &services(),
    );
    assert_eq!(again, Ok(vec![]));
}

#[test]
fn a_late_failure_after_cancelling_is_recorded_but_completes_nothing() {
    let history = [
        running(&["e1"], req(1), "nlp", &["spellcheck", "nlp"]),
        vec![cancelled()],
    ]
    .concat();
    given(history)
        .when(record(req(1), "e1", "spellcheck", Outcome::Failed))
        .then_expect(vec![essay_failed(req(1), "e1", "spellcheck")]);
}

// ---------------------------------------------------------------------------------------------
// Status
// ---------------------------------------------------------------------------------------------

/// The status after each of `events`, folded one by one from a new batch.
fn statuses(events: Vec<BatchEvent>) -> Vec<BatchStatus> {
    let mut batch = Batch::default();
    events
        .into_iter()
        .map(|event| {
            batch.apply_event(event);
            batch.status()
        })
        .collect()
}

#[test]
fn the_status_goes_from_registered_to_ready_to_processing_to_completed_and_back_to_processing() {
    use BatchStatus::*;
    let events = vec![
        registered(1),
        essays_added(&["e1"]),
        ready(1),
        pipeline_requested(req(1), "spellcheck"),
        pipeline_resolved(req(1), "spellcheck", &["spellcheck"], &[]),
        phase_started(req(1), "spellcheck", &["e1"]),
        essay_succeeded(req(1), "e1", "spellcheck"),
        phase_completed(req(1), "spellcheck", 1, 0),
        pipeline_completed(req(1), PipelineOutcome::Completed),
        pipeline_requested(req(2), "nlp"),
    ];
    assert_eq!(
        statuses(events),
        [
            Registered, Registered, Ready, Processing, Processing, Processing, Processing,
            Processing, Completed, Processing,
        ]
    );
}

#[test]
fn the_status_goes_from_processing_to_completed_with_failures_and_back_to_processing() {
    use BatchStatus::*;
    let events = [
        running(&["e1"], req(1), "spellcheck", &["spellcheck"]),
        vec![
            essay_failed(req(1), "e1", "spellcheck"),
            phase_completed(req(1), "spellcheck", 0, 1),
            pipeline_completed(req(1), PipelineOutcome::CompletedWithFailures),
            pipeline_requested(req(2), "spellcheck"),
        ],
    ]
    .concat();
    assert_eq!(
        statuses(events)[5..],
        [
            Processing,
            Processing,
            Processing,
            CompletedWithFailures,
            Processing
        ]
    );
}

#[test]
fn a_batch_can_be_cancelled_from_any_status() {
    let completed = [
        ready_batch(&["e1"]),
        succeeding_pipeline(req(1), "spellcheck", &["spellcheck"], &["e1"]),
    ]
    .concat();
    let with_failures = [
        running(&["e1"], req(1), "spellcheck", &["spellcheck"]),
        vec![
            essay_failed(req(1), "e1", "spellcheck"),
            phase_completed(req(1), "spellcheck", 0, 1),
            pipeline_completed(req(1), PipelineOutcome::CompletedWithFailures),
        ],
    ]
    .concat();
    let histories = [
        (BatchStatus::Registered, vec![registered(1)]),
        (BatchStatus::Ready, ready_batch(&["e1"])),
        (
            BatchStatus::Processing,
            running(&["e1"], req(1), "spellcheck", &["spellcheck"]),
        ),
        (BatchStatus::Completed, completed),
        (BatchStatus::CompletedWithFailures, with_failures),
    ];
    for (status, history) in histories {
        let given = given(history);
        assert_eq!(given.batch.status(), status);
        let batch = given.when(cancel()).then_expect(vec![cancelled()]);
        assert_eq!(
            batch.status(),
            BatchStatus::Cancelled,
            "cancelling from {status:?}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Property: random command sequences
// ---------------------------------------------------------------------------------------------

const ESSAY_IDS: [&str; 4] = ["e0", "e1", "e2", "e3"];
/// The built-in pipelines and one that is not configured.
const PIPELINES: [&str; 5] = [
    "spellcheck",
    "nlp",
    "cj_assessment",
    "ai_feedback",
    "translation",
];

/// Which request a conductor command names.
#[derive(Debug, Clone, Copy)]
enum Target {
    /// The batch's active request (or request 0 when there is none).
    Active,
    /// One of a few fixed request ids, so that repeats and stale ids happen.
    Fixed(u128),
}

/// One step of a random scenario; turned into a command against the state it meets.
#[derive(Debug, Clone)]
enum Step {
    Register {
        expected: i64,
    },
    /// `ids: None` adds the next `fresh` ids not in the batch yet, so that batches get ready;
    /// `Some` adds any ids, duplicates and empty lists included.
    AddEssays {
        ids: Option<Vec<usize>>,
        fresh: usize,
    },
    Request {
        request: u128,
        pipeline: usize,
    },
    Resolve {
        target: Target,
    },
    /// A new result message. `phase: None` reports for the phase that started last, for one
    /// of its essays, so that pipelines make progress; `Some` picks any phase and any essay id.
    Record {
        phase: Option<usize>,
        essay: Index,
        failed: bool,
        score: u8,
    },
    /// At-least-once delivery: one of the results accepted earlier arrives again.
    Redeliver {
        pick: Index,
    },
    Advance {
        target: Target,
        phase: Option<usize>,
    },
    Cancel,
}

fn target() -> impl Strategy<Value = Target> {
    prop_oneof![
        3 => Just(Target::Active),
        1 => (0u128..3).prop_map(Target::Fixed),
    ]
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        1 => (1i64..=3).prop_map(|expected| Step::Register { expected }),
        40 => (
            proptest::option::weighted(0.2, proptest::collection::vec(0..ESSAY_IDS.len(), 0..=3)),
            1usize..=2,
        )
            .prop_map(|(ids, fresh)| Step::AddEssays { ids, fresh }),
        25 => (0u128..3, 0..PIPELINES.len())
            .prop_map(|(request, pipeline)| Step::Request { request, pipeline }),
        20 => target().prop_map(|target| Step::Resolve { target }),
        100 => (
            proptest::option::weighted(0.15, 0..4usize),
            any::<Index>(),
            proptest::bool::weighted(0.2),
            0u8..3,
        )
            .prop_map(|(phase, essay, failed, score)| Step::Record {
                phase,
                essay,
                failed,
                score,
            }),
        15 => any::<Index>().prop_map(|pick| Step::Redeliver { pick }),
        25 => (target(), proptest::option::weighted(0.15, 0..4usize))
            .prop_map(|(target, phase)| Step::Advance { target, phase }),
        1 => Just(Step::Cancel),
    ]
}

/// Drives random steps through `decide` and `apply_event`, keeping every event.
struct Harness {
    services: BatchServices,
    live: Batch,
    log: Vec<BatchEvent>,
    /// The phase and essays of the last `PhaseStarted`.
    started: Option<(Phase, Vec<EssayId>)>,
    /// How many result messages were sent, to give each new one its own id.
    sent: u32,
    /// Every result command that was accepted with events, for redelivery.
    delivered: Vec<BatchCommand>,
}

impl Harness {
    /// The command for `step`, and whether it is a redelivery of an accepted result.
    fn command(&mut self, step: Step) -> (BatchCommand, bool) {
        let step = match step {
            Step::Redeliver { pick } if !self.delivered.is_empty() => {
                return (pick.get(&self.delivered).clone(), true);
            }
            // Nothing to redeliver yet: a new result instead.
            Step::Redeliver { pick } => Step::Record {
                phase: None,
                essay: pick,
                failed: false,
                score: 0,
            },
            step => step,
        };
        (self.new_command(step), false)
    }

    fn new_command(&mut self, step: Step) -> BatchCommand {
        let request = |target| match target {
            Target::Active => self.live.active_request().unwrap_or(req(0)),
            Target::Fixed(n) => req(n),
        };
        match step {
            Step::Register { expected } => register(expected),
            Step::AddEssays { ids, fresh } => {
                let added = self.live.essay_count();
                let ids = ids.unwrap_or_else(|| (added..ESSAY_IDS.len()).take(fresh).collect());
                BatchCommand::AddEssays {
                    essays: ids.into_iter().map(|i| essay(ESSAY_IDS[i])).collect(),
                }
            }
            Step::Request { request, pipeline } => {
                request_pipeline(req(request), PIPELINES[pipeline])
            }
            Step::Resolve { target } => resolve(request(target)),
            Step::Record {
                phase: chosen,
                essay,
                failed,
                score,
            } => {
                self.sent += 1;
                let (phase, essay_id) = match (chosen, &self.started) {
                    (None, Some((phase, essays))) if !essays.is_empty() => {
                        (phase.clone(), essay.get(essays).clone())
                    }
                    _ => (
                        phase(PIPELINES[chosen.unwrap_or(0)]),
                        essay_id(ESSAY_IDS[essay.index(ESSAY_IDS.len())]),
                    ),
                };
                BatchCommand::RecordEssayResult {
                    essay_id,
                    phase,
                    outcome: if failed {
                        Outcome::Failed
                    } else {
                        Outcome::Succeeded
                    },
                    message_id: MessageId::parse(format!("m{}", self.sent)).unwrap(),
                    pipeline_request_id: None,
                    result: json!({ "score": score, "notes": ["ok"] }),
                    error: failed.then(|| "boom".to_owned()),
                }
            }
            Step::Advance {
                target,
                phase: chosen,
            } => BatchCommand::AdvancePhase {
                request_id: request(target),
                completed_phase: match (chosen, &self.started) {
                    (None, Some((phase, _))) => phase.clone(),
                    _ => phase(PIPELINES[chosen.unwrap_or(0)]),
                },
            },
            Step::Cancel => cancel(),
            Step::Redeliver { .. } => unreachable!("Harness::command handles redeliveries"),
        }
    }
}

/// Which status changes the rules allow, one event at a time.
fn allowed_transition(from: BatchStatus, to: BatchStatus) -> bool {
    use BatchStatus::*;
    from == to
        || matches!(
            (from, to),
            (New, Registered)
                | (Registered, Ready)
                | (Ready, Processing)
                | (Processing, Completed | CompletedWithFailures)
                | (Completed | CompletedWithFailures, Processing)
                | (
                    Registered | Ready | Processing | Completed | CompletedWithFailures,
                    Cancelled
                )
        )
}

/// What a run exercised, to keep the generator honest (see the coverage test below).
#[derive(Debug, Default)]
struct Coverage {
    completed_pipelines: usize,
    completed_with_failures: usize,
    late_results: usize,
    second_pipelines: usize,
    redeliveries: usize,
}

fn run_scenario(first: Option<i64>, steps: Vec<Step>) -> Result<Coverage, TestCaseError> {
    let mut harness = Harness {
        services: services(),
        live: Batch::default(),
        log: Vec::new(),
        started: None,
        sent: 0,
        delivered: Vec::new(),
    };
    let mut coverage = Coverage::default();
    let mut expected: Option<u32> = None;
    let mut cancelled = false;
    let mut decoded_log = Vec::new();

    for step in first
        .map(|expected| Step::Register { expected })
        .into_iter()
        .chain(steps)
    {
        let (command, redelivery) = harness.command(step);
        let result = harness.live.decide(command.clone(), &harness.services);
        if expected.is_none() && !matches!(command, BatchCommand::RegisterBatch { .. }) {
            prop_assert_eq!(&result, &Err(BatchError::NotFound));
        }
        // A result delivered again is a no-op, never an error, whatever happened since.
        if redelivery {
            prop_assert_eq!(&result, &Ok(vec![]), "redelivered {:?}", command);
            coverage.redeliveries += 1;
        }
        let Ok(events) = result else { continue };
        if matches!(command, BatchCommand::RecordEssayResult { .. }) && !events.is_empty() {
            harness.delivered.push(command.clone());
        }

        for event in &events {
            // The persisted contract: the JSON form names the event type and reads back equal.
            let json = serde_json::to_string(event).unwrap();
            let value: serde_json::Value = serde_json::from_str(&json).unwrap();
            let tag = value
                .as_object()
                .filter(|o| o.len() == 1)
                .and_then(|o| o.keys().next())
                .cloned();
            prop_assert_eq!(tag.as_deref(), Some(event.event_type_str()));
            prop_assert!(BatchEvent::TYPES.contains(&event.event_type_str()));
            let decoded: BatchEvent = serde_json::from_str(&json).unwrap();
            prop_assert_eq!(&decoded, event);
            decoded_log.push(decoded);

            // After a cancellation, only late results may be recorded.
            if cancelled {
                prop_assert!(
                    matches!(
                        event,
                        BatchEvent::EssayPhaseCompleted { .. }
                            | BatchEvent::EssayPhaseFailed { .. }
                    ),
                    "{:?} after the batch was cancelled",
                    event
                );
                coverage.late_results += 1;
            }
            match event {
                BatchEvent::BatchRegistered {
                    expected_essay_count,
                    ..
                } => expected = Some(expected_essay_count.get()),
                BatchEvent::BatchCancelled { .. } => cancelled = true,
                BatchEvent::PhaseStarted { phase, essays, .. } => {
                    prop_assert!(!essays.is_empty(), "a phase started with no essays");
                    harness.started = Some((phase.clone(), essays.clone()));
                }
                BatchEvent::PhaseCompleted {
                    phase,
                    succeeded,
                    failed,
                    ..
                } => {
                    let (started, essays) = harness.started.as_ref().unwrap();
                    prop_assert_eq!(phase, started);
                    prop_assert_eq!((succeeded + failed) as usize, essays.len());
                }
                BatchEvent::PipelineCompleted { outcome, .. } => {
                    coverage.completed_pipelines += 1;
                    if *outcome == PipelineOutcome::CompletedWithFailures {
                        coverage.completed_with_failures += 1;
                    }
                }
                BatchEvent::PipelineRequested { .. } if coverage.completed_pipelines > 0 => {
                    coverage.second_pipelines += 1;
                }
                _ => {}
            }

            let before = harness.live.status();
            harness.live.apply_event(event.clone());
            harness.log.push(event.clone());
            let after = harness.live.status();
            prop_assert!(
                allowed_transition(before, after),
                "{:?} moved the status from {:?} to {:?}",
                event,
                before,
                after
            );
        }

        // Conductor and processor commands are idempotent: repeating an accepted one at once
        // changes nothing. Register and cancel are not: their repeat is rejected.
        let repeat = harness.live.decide(command.clone(), &harness.services);
        match command {
            BatchCommand::RegisterBatch { .. } => {
                prop_assert_eq!(repeat, Err(BatchError::AlreadyRegistered));
            }
            BatchCommand::CancelBatch { .. } => {
                prop_assert_eq!(repeat, Err(BatchError::Cancelled));
            }
            BatchCommand::AddEssays { .. } => {}
            _ => prop_assert_eq!(repeat, Ok(vec![])),
        }

        // Invariants of the live state.
        if let Some(expected) = expected {
            prop_assert!(harness.live.essay_count() <= expected as usize);
            prop_assert_ne!(harness.live.status(), BatchStatus::New);
        }
    }

    // Replaying the persisted log (decoded from JSON) rebuilds exactly the live state.
    let mut replayed = Batch::default();
    for event in decoded_log {
        replayed.apply_event(event);
    }
    prop_assert_eq!(&replayed, &harness.live);
    let mut folded = Batch::default();
    for event in harness.log {
        folded.apply_event(event);
    }
    prop_assert_eq!(&folded, &harness.live);
    Ok(coverage)
}

fn scenario() -> impl Strategy<Value = (Option<i64>, Vec<Step>)> {
    (
        proptest::option::weighted(0.9, 1i64..=3),
        proptest::collection::vec(step(), 20..120),
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn replaying_the_event_log_rebuilds_the_live_state_and_every_event_survives_json(
        (first, steps) in scenario()
    ) {
        run_scenario(first, steps)?;
    }
}

/// The property is only as good as the scenarios reach: check that the generator regularly
/// completes pipelines (with and without failures), runs a second one, records late results
/// and redelivers results. The generator is seeded, so this is deterministic.
#[test]
fn random_scenarios_reach_every_part_of_the_pipeline_lifecycle() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::{Config, TestRng, TestRunner};

    let mut runner = TestRunner::new_with_rng(
        Config::default(),
        TestRng::deterministic_rng(proptest::test_runner::RngAlgorithm::ChaCha),
    );
    let mut total = Coverage::default();
    for _ in 0..400 {
        let (first, steps) = scenario().new_tree(&mut runner).unwrap().current();
        let coverage = run_scenario(first, steps).unwrap();
        total.completed_pipelines += coverage.completed_pipelines;
        total.completed_with_failures += coverage.completed_with_failures;
        total.late_results += coverage.late_results;
        total.second_pipelines += coverage.second_pipelines;
        total.redeliveries += coverage.redeliveries;
    }
    assert!(total.completed_pipelines >= 100, "{total:?}");
    assert!(total.completed_with_failures >= 20, "{total:?}");
    assert!(total.second_pipelines >= 20, "{total:?}");
    assert!(total.late_results >= 5, "{total:?}");
    assert!(total.redeliveries >= 400, "{total:?}");
}

#[test]
fn an_answer_to_an_earlier_run_of_the_same_phase_changes_nothing() {
    // spellcheck ran and completed for req(1); then spellcheck is asked for again (req(2)).
    let history = [
        running(&["e1"], req(1), "spellcheck", &["spellcheck"]),
        phase_succeeds(req(1), "spellcheck", &["e1"]),
        vec![
            pipeline_completed(req(1), PipelineOutcome::Completed),
            pipeline_requested(req(2), "cj_assessment"),
            pipeline_resolved(
                req(2),
                "cj_assessment",
                &["spellcheck", "cj_assessment"],
                &[],
            ),
            phase_started(req(2), "spellcheck", &["e1"]),
        ],
    ]
    .concat();
    // A processor answers req(1)'s request again, under a new message id: stale.
    let mut stale = record(req(1), "e1", "spellcheck", Outcome::Failed);
    if let BatchCommand::RecordEssayResult { message_id, .. } = &mut stale {
        *message_id = MessageId::parse("a-new-delivery").unwrap();
    }
    given(history.clone()).when(stale).then_expect(vec![]);
    // The answer to the running request is recorded.
    given(history)
        .when(record(req(2), "e1", "spellcheck", Outcome::Succeeded))
        .then_expect(vec![
            essay_succeeded(req(2), "e1", "spellcheck"),
            phase_completed(req(2), "spellcheck", 1, 0),
        ]);
}
