//! The message bus between essayflow and the processing services: Kafka when brokers are
//! configured, otherwise an in-process bus with the same topics (the embedded default).
//!
//! Both carry the same messages ([`crate::messages`]) on the same topic names ([`Topics`]);
//! only delivery differs. Kafka is at-least-once and durable; the in-process bus delivers to
//! the subscribers of this process only, and keeps nothing across restarts (the relay's
//! checkpoint and the ingress's idempotence make a restart safe all the same: see
//! ARCHITECTURE.md).

mod kafka;
mod memory;

use std::time::Duration;

use domain::values::Phase;

pub use kafka::{KafkaBus, KafkaOptions, KafkaSubscription};
pub use memory::{MemoryBus, MemorySubscription};

/// The topic names, all under one configurable prefix (default `essayflow`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topics {
    prefix: String,
}

impl Topics {
    pub fn new(prefix: impl Into<String>) -> Self {
        Self {
            prefix: prefix.into(),
        }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Every domain event: `<prefix>.events.v1`.
    pub fn events(&self) -> String {
        format!("{}.events.v1", self.prefix)
    }

    /// One request per essay when a phase starts: `<prefix>.phase.<phase>.requested.v1`.
    pub fn phase_requested(&self, phase: &Phase) -> String {
        format!("{}.phase.{phase}.requested.v1", self.prefix)
    }

    /// What processors send back: `<prefix>.results.v1`.
    pub fn results(&self) -> String {
        format!("{}.results.v1", self.prefix)
    }

    /// Results that could not be recorded: `<prefix>.results.v1.dlq`.
    pub fn dead_letters(&self) -> String {
        format!("{}.results.v1.dlq", self.prefix)
    }

    /// Every topic essayflow uses, for the given phases.
    pub fn all<'a>(&self, phases: impl IntoIterator<Item = &'a Phase>) -> Vec<String> {
        let mut topics = vec![self.events(), self.results(), self.dead_letters()];
        topics.extend(phases.into_iter().map(|p| self.phase_requested(p)));
        topics
    }
}

/// A message to publish.
#[derive(Debug, Clone, PartialEq)]
pub struct OutMessage {
    pub topic: String,
    pub key: String,
    pub payload: Vec<u8>,
    pub headers: Vec<(String, String)>,
}

/// A message received from a subscription.
#[derive(Debug, Clone, PartialEq)]
pub struct InMessage {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
    /// The message's headers whose values are UTF-8 text (the in-process bus carries every
    /// header as published).
    pub headers: Vec<(String, String)>,
}

impl InMessage {
    /// The value of header `name` (its case ignored), if the message has it.
    pub fn header(&self, name: &str) -> Option<&str> {
        crate::trace::header(&self.headers, name)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("the broker did not take the message: {0}")]
    Publish(String),
    #[error("could not create the topics: {0}")]
    Topics(String),
    #[error("the broker client failed: {0}")]
    Client(String),
}

/// Where messages go: Kafka, or this process's in-process bus. Cheap to clone.
#[derive(Clone)]
pub enum Bus {
    Memory(MemoryBus),
    Kafka(KafkaBus),
}

impl Bus {
    /// `"kafka"` or `"in-process"`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Memory(_) => "in-process",
            Self::Kafka(_) => "kafka",
        }
    }

    /// Publishes every message and returns once the broker acknowledged them all (an error if
    /// any was not: some may have been delivered, so a retry may duplicate them).
    pub async fn publish(&self, messages: &[OutMessage]) -> Result<(), BusError> {
        match self {
            Self::Memory(bus) => {
                bus.publish(messages).await;
                Ok(())
            }
            Self::Kafka(bus) => bus.publish(messages).await,
        }
    }

    /// Publishes until the broker takes every message, backing off between attempts; `false`
    /// if `cancel` fired first.
    pub async fn publish_until_taken(
        &self,
        messages: &[OutMessage],
        cancel: &tokio_util::sync::CancellationToken,
    ) -> bool {
        let mut backoff = Duration::from_millis(100);
        loop {
            match self.publish(messages).await {
                Ok(()) => return true,
                Err(error) => {
                    tracing::warn!(%error, retry_in = ?backoff, "could not publish; retrying")
                }
            }
            tokio::select! {
                _ = cancel.cancelled() => return false,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = next_backoff(backoff, Duration::from_secs(5));
        }
    }

    /// Creates the topics that do not exist yet (Kafka; nothing to do in process).
    pub async fn ensure_topics(&self, topics: &[String]) -> Result<(), BusError> {
        match self {
            Self::Memory(_) => Ok(()),
            Self::Kafka(bus) => bus.ensure_topics(topics).await,
        }
    }

    /// Subscribes to `topics` as member of consumer group `group`.
    pub fn subscribe(&self, group: &str, topics: &[String]) -> Result<Subscription, BusError> {
        match self {
            Self::Memory(bus) => Ok(Subscription::Memory(bus.subscribe(topics))),
            Self::Kafka(bus) => Ok(Subscription::Kafka(bus.subscribe(group, topics)?)),
        }
    }
}

/// How long shutting down waits for a Kafka client to close.
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(10);

/// A stream of messages from some topics. A message's position is committed only when
/// [`Subscription::done`] is called for it (at-least-once).
pub enum Subscription {
    Memory(MemorySubscription),
    Kafka(KafkaSubscription),
}

impl Subscription {
    /// Waits for at least one message, then takes whatever else is already there, up to `max`.
    /// `None` when the subscription ended.
    pub async fn next_chunk(&mut self, max: usize) -> Option<Vec<InMessage>> {
        match self {
            Self::Memory(s) => s.next_chunk(max).await,
            Self::Kafka(s) => s.next_chunk(max).await,
        }
    }

    /// Marks a message handled: its offset is committed (Kafka commits stored offsets in the
    /// background, and at [`Subscription::close`]).
    pub fn done(&self, message: &InMessage) {
        if let Self::Kafka(s) = self {
            s.done(message);
        }
    }

    /// Messages published but not yet handled (Kafka: the consumer lag of the assigned
    /// partitions, as last reported by the client; -1 while unknown).
    pub fn lag(&self) -> i64 {
        match self {
            Self::Memory(s) => s.lag(),
            Self::Kafka(s) => s.lag(),
        }
    }

    /// A handle that reads the lag while the subscription is in use.
    pub fn lag_gauge(&self) -> LagGauge {
        match self {
            Self::Memory(s) => s.lag_gauge(),
            Self::Kafka(s) => s.lag_gauge(),
        }
    }

    /// Commits what was handled and leaves the group. librdkafka's close blocks, for as long as
    /// it takes to reach the group coordinator: it runs on a thread of its own, given at most
    /// [`CLOSE_TIMEOUT`] (past that, the broker redelivers what was not committed).
    pub async fn close(self) {
        if let Self::Kafka(s) = self {
            let (done, closed) = tokio::sync::oneshot::channel();
            std::thread::spawn(move || {
                s.close();
                drop(s);
                let _ = done.send(());
            });
            if tokio::time::timeout(CLOSE_TIMEOUT, closed).await.is_err() {
                tracing::warn!("the Kafka consumer did not close in time; leaving it behind");
            }
        }
    }
}

/// Reads a subscription's lag from elsewhere (the metrics endpoint).
#[derive(Debug, Clone, Default)]
pub struct LagGauge(std::sync::Arc<std::sync::atomic::AtomicI64>);

impl LagGauge {
    pub fn get(&self) -> i64 {
        self.0.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn set(&self, lag: i64) {
        self.0.store(lag, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Exponential backoff from 100 ms up to `max`.
pub(crate) fn next_backoff(current: Duration, max: Duration) -> Duration {
    (current * 2).min(max)
}
