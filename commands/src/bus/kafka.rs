//! The Kafka bus (rdkafka, librdkafka vendored).
//!
//! - Producer: idempotent (`enable.idempotence`: acknowledged by all in-sync replicas, retried
//!   without duplicates or reordering within a partition while the producer lives). Sends are
//!   kept in flight together and awaited as a group: awaiting them one by one would cap the
//!   producer at a few hundred messages a second (librdkafka lingers 5 ms per batch).
//! - Consumers: a consumer group, offsets stored only when the caller marks a message done
//!   (`enable.auto.offset.store = false`) and committed in the background from what is stored,
//!   so an offset never passes a message that was not handled.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures::future::join_all;
use rdkafka::ClientContext;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{CommitMode, Consumer, ConsumerContext, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::statistics::Statistics;
use rdkafka::util::Timeout;

use super::{BusError, InMessage, LagGauge, OutMessage};

/// How to reach the brokers.
#[derive(Debug, Clone)]
pub struct KafkaOptions {
    /// `host:port[,host:port...]`
    pub brokers: String,
    /// How long the producer keeps trying to deliver a message before reporting a failure
    /// (the relay then retries the whole page with backoff).
    pub message_timeout: Duration,
    /// Partitions and replication factor of the topics created at start-up.
    pub partitions: i32,
    pub replication: i32,
}

impl KafkaOptions {
    pub fn new(brokers: impl Into<String>) -> Self {
        Self {
            brokers: brokers.into(),
            message_timeout: Duration::from_secs(30),
            partitions: 3,
            replication: 1,
        }
    }

    fn base(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", &self.brokers)
            .set("client.id", "essayflow")
            .set("socket.keepalive.enable", "true")
            // Reconnect quickly once a broker is back.
            .set("reconnect.backoff.max.ms", "2000");
        config
    }
}

/// Publishes to Kafka (idempotent producer), creates topics, and opens consumer groups.
/// Cheap to clone: clones share one producer.
#[derive(Clone)]
pub struct KafkaBus {
    options: KafkaOptions,
    producer: Arc<ProducerSlot>,
}

/// The current producer session, replaced after a failed publish (see [`KafkaBus::publish`]).
/// librdkafka's teardown of a client blocks (purge, flush, joining its threads), so a client is
/// always dropped on a thread of its own, never on the async runtime.
struct ProducerSlot(RwLock<Arc<FutureProducer>>);

impl ProducerSlot {
    fn current(&self) -> Arc<FutureProducer> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Puts `fresh` in place of `failed`, unless another publisher already replaced it.
    fn replace(&self, failed: &Arc<FutureProducer>, fresh: FutureProducer) {
        let mut slot = self.0.write().unwrap_or_else(|p| p.into_inner());
        if Arc::ptr_eq(&slot, failed) {
            drop_off_runtime(std::mem::replace(&mut *slot, Arc::new(fresh)));
        } else {
            drop_off_runtime(Arc::new(fresh));
        }
    }
}

impl Drop for ProducerSlot {
    fn drop(&mut self) {
        let slot = self.0.get_mut().unwrap_or_else(|p| p.into_inner());
        drop_off_runtime(slot.clone());
    }
}

/// Drops a Kafka client on a thread of its own (its teardown blocks).
fn drop_off_runtime<T: Send + 'static>(client: T) {
    std::thread::spawn(move || drop(client));
}

/// Holds a Kafka client that must be dropped off the runtime, even when the future using it is
/// cancelled.
struct OffRuntime<T: Send + 'static>(Option<T>);

impl<T: Send + 'static> Drop for OffRuntime<T> {
    fn drop(&mut self) {
        if let Some(client) = self.0.take() {
            drop_off_runtime(client);
        }
    }
}

impl KafkaBus {
    pub fn new(options: KafkaOptions) -> Result<Self, BusError> {
        let producer = Self::producer(&options)?;
        Ok(Self {
            options,
            producer: Arc::new(ProducerSlot(RwLock::new(Arc::new(producer)))),
        })
    }

    pub fn options(&self) -> &KafkaOptions {
        &self.options
    }

    fn producer(options: &KafkaOptions) -> Result<FutureProducer, BusError> {
        options
            .base()
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set(
                "message.timeout.ms",
                options.message_timeout.as_millis().to_string(),
            )
            .set("linger.ms", "5")
            .create()
            .map_err(|e| BusError::Client(e.to_string()))
    }

    /// Sends every message, in order, and waits for every acknowledgement. Messages are queued
    /// one after another (when librdkafka's local queue is full, the sends already queued are
    /// awaited first), so the order of `messages` is the order within each partition.
    pub async fn publish(&self, messages: &[OutMessage]) -> Result<(), BusError> {
        let producer = self.producer.current();
        let outcome = Self::send_in_order(&producer, messages).await;
        if let Err(error) = &outcome {
            // Start a new producer session. After messages time out, librdkafka bumps the
            // idempotent producer's epoch, which some brokers answer with a fatal
            // ProducerFenced; and a fatal error ends a producer for good. A new session is
            // always safe: the caller re-sends the whole page in order (at least once).
            if let Some(fatal) = producer.client().fatal_error() {
                tracing::error!(error = ?fatal, "the Kafka producer hit a fatal error");
            }
            tracing::debug!(%error, "starting a new producer session");
            self.producer
                .replace(&producer, Self::producer(&self.options)?);
        }
        drop_off_runtime(producer);
        outcome
    }

    async fn send_in_order(
        producer: &FutureProducer,
        messages: &[OutMessage],
    ) -> Result<(), BusError> {
        let mut pending = Vec::with_capacity(messages.len());
        for message in messages {
            let mut headers = OwnedHeaders::new_with_capacity(message.headers.len());
            for (key, value) in &message.headers {
                headers = headers.insert(Header {
                    key,
                    value: Some(value.as_bytes()),
                });
            }
            let mut record = FutureRecord::to(&message.topic)
                .key(message.key.as_bytes())
                .payload(&message.payload)
                .headers(headers);
            loop {
                match producer.send_result(record) {
                    Ok(delivery) => {
                        pending.push(delivery);
                        break;
                    }
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                        record = back;
                        Self::settle(std::mem::take(&mut pending)).await?;
                        if producer.in_flight_count() > 0 {
                            tokio::time::sleep(Duration::from_millis(5)).await;
                        }
                    }
                    Err((error, _)) => return Err(BusError::Publish(error.to_string())),
                }
            }
        }
        Self::settle(pending).await
    }

    /// Waits for every delivery; the first failure is the error.
    async fn settle(pending: Vec<rdkafka::producer::DeliveryFuture>) -> Result<(), BusError> {
        for result in join_all(pending).await {
            match result {
                Ok(Ok(_)) => {}
                Ok(Err((error, _))) => return Err(BusError::Publish(error.to_string())),
                Err(_) => return Err(BusError::Publish("the producer went away".to_owned())),
            }
        }
        Ok(())
    }

    pub async fn ensure_topics(&self, topics: &[String]) -> Result<(), BusError> {
        let admin: AdminClient<DefaultClientContext> = self
            .options
            .base()
            .create()
            .map_err(|e| BusError::Client(e.to_string()))?;
        let new: Vec<NewTopic<'_>> = topics
            .iter()
            .map(|name| {
                NewTopic::new(
                    name,
                    self.options.partitions,
                    TopicReplication::Fixed(self.options.replication),
                )
            })
            .collect();
        let options = AdminOptions::new()
            .request_timeout(Some(Timeout::After(Duration::from_secs(10))))
            .operation_timeout(Some(Timeout::After(Duration::from_secs(10))));
        let admin = OffRuntime(Some(admin));
        let results = admin
            .0
            .as_ref()
            .ok_or_else(|| BusError::Client("no admin client".to_owned()))?
            .create_topics(&new, &options)
            .await
            .map_err(|e| BusError::Topics(e.to_string()))?;
        for result in results {
            match result {
                Ok(name) => tracing::info!(topic = %name, "created topic"),
                Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((name, code)) => return Err(BusError::Topics(format!("{name}: {code}"))),
            }
        }
        Ok(())
    }

    pub fn subscribe(&self, group: &str, topics: &[String]) -> Result<KafkaSubscription, BusError> {
        let gauge = LagGauge::default();
        gauge.set(-1);
        let consumer: StreamConsumer<LagContext> = self
            .options
            .base()
            .set("group.id", group)
            .set("enable.auto.commit", "true")
            .set("auto.commit.interval.ms", "500")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("statistics.interval.ms", "1000")
            .create_with_context(LagContext {
                gauge: gauge.clone(),
            })
            .map_err(|e| BusError::Client(e.to_string()))?;
        let names: Vec<&str> = topics.iter().map(String::as_str).collect();
        consumer
            .subscribe(&names)
            .map_err(|e| BusError::Client(e.to_string()))?;
        Ok(KafkaSubscription { consumer, gauge })
    }
}

/// Takes the consumer lag from librdkafka's statistics.
struct LagContext {
    gauge: LagGauge,
}

impl ClientContext for LagContext {
    fn stats(&self, statistics: Statistics) {
        let lag: i64 = statistics
            .topics
            .values()
            .flat_map(|topic| topic.partitions.values())
            .filter(|p| p.partition >= 0 && p.consumer_lag >= 0)
            .map(|p| p.consumer_lag)
            .sum();
        self.gauge.set(lag);
    }
}

impl ConsumerContext for LagContext {}

pub struct KafkaSubscription {
    consumer: StreamConsumer<LagContext>,
    gauge: LagGauge,
}

impl KafkaSubscription {
    pub async fn next_chunk(&mut self, max: usize) -> Option<Vec<InMessage>> {
        let mut chunk = Vec::new();
        loop {
            match self.consumer.recv().await {
                Ok(message) => {
                    chunk.push(owned(&message));
                    break;
                }
                Err(error) => {
                    tracing::warn!(%error, "the Kafka consumer reported an error; going on");
                    if matches!(error, KafkaError::Canceled) {
                        return None;
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
        while chunk.len() < max {
            // Takes what is already fetched; `timeout` polls the receive once before giving up.
            match tokio::time::timeout(Duration::ZERO, self.consumer.recv()).await {
                Ok(Ok(message)) => chunk.push(owned(&message)),
                _ => break,
            }
        }
        Some(chunk)
    }

    pub fn done(&self, message: &InMessage) {
        if let Err(error) =
            self.consumer
                .store_offset(&message.topic, message.partition, message.offset)
        {
            // The partition moved to another member in a rebalance: it will redeliver.
            tracing::debug!(%error, topic = %message.topic, partition = message.partition, "could not store an offset");
        }
    }

    pub fn lag(&self) -> i64 {
        self.gauge.get()
    }

    pub fn lag_gauge(&self) -> LagGauge {
        self.gauge.clone()
    }

    pub fn close(&self) {
        match self.consumer.commit_consumer_state(CommitMode::Sync) {
            Ok(()) | Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => {}
            Err(error) => tracing::warn!(%error, "could not commit the consumer's offsets"),
        }
    }
}

fn owned(message: &rdkafka::message::BorrowedMessage<'_>) -> InMessage {
    InMessage {
        topic: message.topic().to_owned(),
        partition: message.partition(),
        offset: message.offset(),
        key: message.key().map(<[u8]>::to_vec),
        payload: message.payload().map(<[u8]>::to_vec),
        headers: message
            .headers()
            .map(|headers| {
                headers
                    .iter()
                    .filter_map(|h| {
                        let value = std::str::from_utf8(h.value?).ok()?;
                        Some((h.key.to_owned(), value.to_owned()))
                    })
                    .collect()
            })
            .unwrap_or_default(),
    }
}
