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
use rdkafka::message::{Header, Message, OwnedHeaders};
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

#[derive(Clone)]
pub struct KafkaBus {
    options: KafkaOptions,
    /// Replaced after a failed publish (see `publish`).
    producer: Arc<RwLock<FutureProducer>>,
}

impl KafkaBus {
    pub fn new(options: KafkaOptions) -> Result<Self, BusError> {
        let producer = Self::producer(&options)?;
        Ok(Self {
            options,
            producer: Arc::new(RwLock::new(producer)),
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

    pub async fn publish(&self, messages: &[OutMessage]) -> Result<(), BusError> {
        let producer = self
            .producer
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let sends = messages.iter().map(|message| {
            let mut headers = OwnedHeaders::new_with_capacity(message.headers.len());
            for (key, value) in &message.headers {
                headers = headers.insert(Header {
                    key,
                    value: Some(value.as_bytes()),
                });
            }
            let record = FutureRecord::to(&message.topic)
                .key(message.key.as_bytes())
                .payload(&message.payload)
                .headers(headers);
            // Waits for room when the local queue is full.
            producer.send(record, Timeout::Never)
        });
        let results = join_all(sends).await;
        let failed = results.into_iter().filter_map(|r| r.err()).next();
        match failed {
            None => Ok(()),
            Some((error, _)) => {
                // Start a new producer session. After messages time out, librdkafka bumps the
                // idempotent producer's epoch, which some brokers answer with a fatal
                // ProducerFenced; and a fatal error ends a producer for good. A new session is
                // always safe: the caller re-sends the whole page in order (at least once).
                if let Some(fatal) = producer.client().fatal_error() {
                    tracing::error!(error = ?fatal, "the Kafka producer hit a fatal error");
                }
                let fresh = Self::producer(&self.options)?;
                let old = std::mem::replace(
                    &mut *self.producer.write().unwrap_or_else(|p| p.into_inner()),
                    fresh,
                );
                // Dropping a producer purges, flushes and destroys it: blocking calls, on a
                // thread of their own so that nothing (not even runtime shutdown) waits on them.
                drop(producer);
                std::thread::spawn(move || drop(old));
                Err(BusError::Publish(error.to_string()))
            }
        }
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
        let results = admin
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
    }
}
