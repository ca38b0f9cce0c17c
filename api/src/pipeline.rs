//! Starts the pipeline workers: the conductor, the relay, the results ingress and (development
//! only) the processor simulator, on Kafka when brokers are configured, else on the in-process
//! bus.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use anyhow::Context;
use commands::bus::{Bus, KafkaBus, KafkaOptions, LagGauge, MemoryBus, Topics};
use commands::conductor::Conductor;
use commands::follower::{Follow, FollowOptions, FollowerStatus};
use commands::ingress::{Backpressure, Ingress, IngressStats};
use commands::relay::Relay;
use commands::simulator::{self, SimulatorOptions};
use commands::{CommandService, EventLog, Storage};
use domain::PipelineCatalog;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::settings::Settings;

/// What `/readyz` and `/metrics` report of the pipeline workers.
pub struct PipelineStatus {
    pub bus: &'static str,
    pub topics: Topics,
    /// `None` when this process runs no workers.
    pub relay: Option<Arc<FollowerStatus>>,
    pub conductor: Option<Arc<FollowerStatus>>,
    pub relay_published: Arc<AtomicU64>,
    pub relay_published_bytes: Arc<AtomicU64>,
    pub conductor_issued: Arc<AtomicU64>,
    pub ingress: Arc<IngressStats>,
    /// Results waiting to be recorded (Kafka: the consumer lag librdkafka reports each
    /// second); -1 while unknown or when this node runs no ingress.
    pub ingress_lag: LagGauge,
}

/// The bus the settings name.
pub fn bus(settings: &Settings) -> anyhow::Result<Bus> {
    if !settings.uses_kafka() {
        return Ok(Bus::Memory(MemoryBus::new()));
    }
    let mut options = KafkaOptions::new(settings.kafka_brokers.trim());
    options.partitions = settings.kafka_partitions;
    options.replication = settings.kafka_replication;
    options.message_timeout = Duration::from_millis(settings.kafka_message_timeout_ms);
    Ok(Bus::Kafka(
        KafkaBus::new(options).context("creating the Kafka client")?,
    ))
}

pub fn simulator_options(settings: &Settings) -> SimulatorOptions {
    SimulatorOptions {
        latency: Duration::from_millis(settings.simulator_latency_ms),
        failure_rate: settings.simulator_failure_rate,
        ..SimulatorOptions::default()
    }
}

/// Creates the topics if the broker answers; otherwise the relay creates them before it first
/// publishes.
pub async fn create_topics(bus: &Bus, topics: &[String]) {
    match tokio::time::timeout(Duration::from_secs(15), bus.ensure_topics(topics)).await {
        Ok(Ok(())) => {}
        Ok(Err(error)) => {
            tracing::warn!(%error, "could not create the topics at start-up; the relay will retry")
        }
        Err(_) => tracing::warn!("the broker did not answer at start-up; the relay will retry"),
    }
}

/// Spawns the pipeline workers (when `settings.run_workers`) and returns the ingress, which
/// also serves the HTTP twin of the results topic.
pub async fn start(
    settings: &Settings,
    storage: &Storage,
    commands: &CommandService,
    catalog: &PipelineCatalog,
    cancel: &CancellationToken,
    tracker: &TaskTracker,
    relay_metrics: &commands::metrics::RelayMetrics,
) -> anyhow::Result<(Ingress, PipelineStatus)> {
    let bus = bus(settings)?;
    let topics = Topics::new(&settings.topic_prefix);
    let mut ingress = Ingress::new(commands.clone(), storage.clone(), settings.max_result_bytes)
        .with_max_group(settings.ingress_group_size);
    if settings.ingress_backpressure_ms > 0 {
        ingress = ingress.with_backpressure(Backpressure::new(
            projections::PROJECTIONS.to_vec(),
            std::time::Duration::from_millis(settings.ingress_backpressure_ms),
        ));
    }
    let mut status = PipelineStatus {
        bus: bus.kind(),
        topics: topics.clone(),
        relay: None,
        conductor: None,
        relay_published: Arc::default(),
        relay_published_bytes: Arc::default(),
        conductor_issued: Arc::default(),
        ingress: ingress.stats(),
        ingress_lag: LagGauge::default(),
    };
    status.ingress_lag.set(-1);
    let all_topics = topics.all(catalog.phases());
    if settings.run_workers || settings.simulate_processors {
        create_topics(&bus, &all_topics).await;
    }
    // Subscribe before the relay starts, so that the in-process bus loses nothing in between.
    if settings.simulate_processors {
        let subscription = bus.subscribe(
            &format!("{}-simulator", topics.prefix()),
            &simulator::request_topics(&topics, catalog.phases()),
        )?;
        tracker.spawn(simulator::run(
            subscription,
            bus.clone(),
            topics.clone(),
            simulator_options(settings),
            cancel.child_token(),
        ));
    }
    if !settings.run_workers {
        return Ok((ingress, status));
    }
    let subscription =
        bus.subscribe(&format!("{}-ingress", topics.prefix()), &[topics.results()])?;
    status.ingress_lag = subscription.lag_gauge();
    {
        let (ingress, bus, topics, cancel) = (
            ingress.clone(),
            bus.clone(),
            topics.clone(),
            cancel.child_token(),
        );
        tracker.spawn(async move { ingress.run_on(subscription, &bus, &topics, &cancel).await });
    }
    if let Bus::Memory(_) = bus {
        // The in-process bus lost whatever was in flight when the process last stopped.
        let again = Relay::new(
            bus.clone(),
            topics.clone(),
            Vec::new(),
            EventLog::new(storage.clone()),
        );
        let cancel = cancel.child_token();
        tracker.spawn(async move {
            let mut backoff = Duration::from_millis(200);
            loop {
                let outcome = tokio::select! {
                    _ = cancel.cancelled() => return,
                    outcome = again.republish_running_phases() => outcome,
                };
                match outcome {
                    Ok(0) => return,
                    Ok(n) => {
                        tracing::info!(phases = n, "published the requests of running phases again");
                        return;
                    }
                    Err(error) => {
                        tracing::warn!(%error, retry_in = ?backoff, "could not publish running phases again")
                    }
                }
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        });
    }
    let relay = Relay::new(
        bus.clone(),
        topics.clone(),
        all_topics,
        EventLog::new(storage.clone()),
    )
    .with_metrics(relay_metrics.clone());
    status.relay_published = relay.published();
    status.relay_published_bytes = relay.published_bytes();
    let relay = Follow::new(relay, storage, FollowOptions::default());
    status.relay = Some(relay.status());
    tracker.spawn(relay.run(cancel.child_token()));

    let conductor = Conductor::new(commands.clone());
    status.conductor_issued = conductor.issued();
    let conductor = Follow::new(conductor, storage, FollowOptions::default());
    status.conductor = Some(conductor.status());
    tracker.spawn(conductor.run(cancel.child_token()));
    Ok((ingress, status))
}
