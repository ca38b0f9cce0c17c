//! The results dead-letter topic (`<prefix>.results.v1.dlq`), for operators: read what is in it
//! without consuming anything ([`list`]), and publish it back to the results topic
//! ([`replay`]) once the cause is fixed (docs/RUNBOOK.md, "Drain the dead-letter topic").
//!
//! Replaying is safe to repeat: it commits its progress in the consumer group
//! `<prefix>.dlq-replay` after each message is acknowledged by the broker, and the results
//! ingress records a result once, however often it arrives (by its `message_id`). A replayed
//! result that still cannot be recorded is dead-lettered again with its new reason.
//!
//! Both read each partition from where they start up to its end as it was when they started
//! (partition EOF), so they finish even while new dead letters arrive, and at most `limit`
//! messages.

use std::collections::HashSet;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Headers, Message};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use serde::Serialize;

use crate::bus::{BusError, KafkaBus, KafkaOptions, OutMessage, Topics};

/// The headers the ingress adds when it dead-letters a result; a replay leaves them out.
pub const DEAD_LETTER_HEADERS: [&str; 5] = [
    "x-original-topic",
    "x-original-partition",
    "x-original-offset",
    "x-error",
    "x-dead-lettered-at",
];

/// The header a replayed result carries: `<dead-letter topic>/<partition>/<offset>`.
pub const REPLAYED_FROM: &str = "x-replayed-from";

/// One dead letter, as listed (`essayflow dead-letters list`, one JSON object per line).
#[derive(Debug, Clone, Serialize)]
pub struct DeadLetter {
    pub partition: i32,
    pub offset: i64,
    /// The message key (the batch id), if any, as UTF-8 (lossy).
    pub key: Option<String>,
    /// Every header, in order, values as UTF-8 (lossy): `x-error` says why.
    pub headers: Vec<(String, String)>,
    /// The payload: the JSON value when it is JSON, else its bytes as a UTF-8 (lossy) string.
    pub payload: serde_json::Value,
    #[serde(skip)]
    raw: Vec<u8>,
}

impl DeadLetter {
    fn of(message: &impl Message) -> Self {
        let raw = message.payload().unwrap_or_default().to_vec();
        let payload = serde_json::from_slice(&raw)
            .unwrap_or_else(|_| serde_json::Value::String(String::from_utf8_lossy(&raw).into()));
        let headers = message
            .headers()
            .map(|headers| {
                headers
                    .iter()
                    .map(|h| {
                        (
                            h.key.to_owned(),
                            String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        Self {
            partition: message.partition(),
            offset: message.offset(),
            key: message
                .key()
                .map(|k| String::from_utf8_lossy(k).into_owned()),
            headers,
            payload,
            raw,
        }
    }

    /// The header `name`, if present.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Reads at most `limit` dead letters from the beginning of the topic, committing nothing.
/// `wait` bounds how long the broker may take to answer.
pub async fn list(
    options: &KafkaOptions,
    topics: &Topics,
    limit: usize,
    wait: Duration,
) -> Result<Vec<DeadLetter>, BusError> {
    let group = format!("{}.dlq-inspect.{}", topics.prefix(), uuid::Uuid::new_v4());
    let reader = Reader::open(options, topics, &group, false, wait).await?;
    let mut letters = Vec::new();
    reader
        .read(limit, wait, |message| {
            letters.push(DeadLetter::of(message));
            async { Ok(()) }
        })
        .await?;
    Ok(letters)
}

/// Publishes at most `limit` dead letters, not replayed before, back to the results topic with
/// their key, payload and headers (without [`DEAD_LETTER_HEADERS`], with [`REPLAYED_FROM`]),
/// committing each in the group `<prefix>.dlq-replay` once the broker acknowledged it.
/// Returns how many were replayed.
pub async fn replay(
    bus: &KafkaBus,
    topics: &Topics,
    limit: usize,
    wait: Duration,
) -> Result<usize, BusError> {
    let group = format!("{}.dlq-replay", topics.prefix());
    let reader = Reader::open(bus.options(), topics, &group, true, wait).await?;
    let mut replayed = 0;
    let consumer = &reader.consumer;
    reader
        .read(limit, wait, |message| {
            let letter = DeadLetter::of(message);
            let mut headers: Vec<(String, String)> = letter
                .headers
                .iter()
                .filter(|(k, _)| !DEAD_LETTER_HEADERS.contains(&k.as_str()))
                .cloned()
                .collect();
            headers.push((
                REPLAYED_FROM.to_owned(),
                format!(
                    "{}/{}/{}",
                    topics.dead_letters(),
                    letter.partition,
                    letter.offset
                ),
            ));
            let out = OutMessage {
                topic: topics.results(),
                key: letter.key.clone().unwrap_or_default(),
                payload: letter.raw.clone(),
                headers,
            };
            replayed += 1;
            let (topic, partition, offset) = (
                message.topic().to_owned(),
                message.partition(),
                message.offset(),
            );
            async move {
                bus.publish(std::slice::from_ref(&out)).await?;
                // Committed only once the broker has the replayed copy: a replay that stops
                // here sends this one again next time (recorded once all the same).
                let mut next = TopicPartitionList::new();
                next.add_partition_offset(&topic, partition, Offset::Offset(offset + 1))
                    .map_err(|e| BusError::Client(e.to_string()))?;
                consumer
                    .commit(&next, CommitMode::Sync)
                    .map_err(|e| BusError::Client(e.to_string()))
            }
        })
        .await?;
    Ok(replayed)
}

struct Reader {
    consumer: StreamConsumer,
    partitions: usize,
}

impl Reader {
    /// A consumer of the dead-letter topic in `group`, assigned every partition: from the
    /// group's committed offsets when `resume` (else, and where none is committed, from the
    /// beginning).
    async fn open(
        options: &KafkaOptions,
        topics: &Topics,
        group: &str,
        resume: bool,
        wait: Duration,
    ) -> Result<Self, BusError> {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", &options.brokers)
            .set("client.id", "essayflow-dead-letters")
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "true")
            .set("auto.offset.reset", "earliest");
        let topic = topics.dead_letters();
        let (partitions, committed) = {
            let config = config.clone();
            let topic = topic.clone();
            let probe_topic = topic.clone();
            tokio::task::spawn_blocking(move || -> Result<_, KafkaError> {
                let topic = probe_topic;
                let probe: BaseConsumer = config.create()?;
                let metadata = probe.fetch_metadata(Some(&topic), wait)?;
                let partitions: Vec<i32> = metadata
                    .topics()
                    .iter()
                    .flat_map(|t| t.partitions().iter().map(|p| p.id()))
                    .collect();
                let mut list = TopicPartitionList::new();
                for p in &partitions {
                    list.add_partition(&topic, *p);
                }
                let committed = if resume && !partitions.is_empty() {
                    Some(probe.committed_offsets(list, wait)?)
                } else {
                    None
                };
                Ok((partitions, committed))
            })
            .await
            .map_err(|e| BusError::Client(e.to_string()))?
            .map_err(|e| BusError::Client(format!("reading {topic}: {e}")))?
        };
        let consumer: StreamConsumer = config
            .create()
            .map_err(|e| BusError::Client(e.to_string()))?;
        let mut assignment = TopicPartitionList::new();
        for p in &partitions {
            let offset = committed
                .as_ref()
                .and_then(|c| c.find_partition(&topic, *p))
                .map(|e| e.offset())
                .filter(|o| matches!(o, Offset::Offset(_)))
                .unwrap_or(Offset::Beginning);
            assignment
                .add_partition_offset(&topic, *p, offset)
                .map_err(|e| BusError::Client(e.to_string()))?;
        }
        consumer
            .assign(&assignment)
            .map_err(|e| BusError::Client(e.to_string()))?;
        Ok(Self {
            consumer,
            partitions: partitions.len(),
        })
    }

    /// Hands each message to `handle`, in order per partition, until every partition reached
    /// its end or `limit` messages were handled; fails if the broker says nothing for `wait`.
    async fn read<'a, F, Fut>(
        &'a self,
        limit: usize,
        wait: Duration,
        mut handle: F,
    ) -> Result<(), BusError>
    where
        F: FnMut(&rdkafka::message::BorrowedMessage<'a>) -> Fut,
        Fut: std::future::Future<Output = Result<(), BusError>>,
    {
        let mut at_end: HashSet<i32> = HashSet::new();
        let mut handled = 0;
        while handled < limit && at_end.len() < self.partitions {
            let next = tokio::time::timeout(wait, self.consumer.recv())
                .await
                .map_err(|_| BusError::Client(format!("the broker sent nothing for {wait:?}")))?;
            match next {
                Ok(message) => {
                    at_end.remove(&message.partition());
                    handle(&message).await?;
                    handled += 1;
                }
                Err(KafkaError::PartitionEOF(partition)) => {
                    at_end.insert(partition);
                }
                Err(error) => return Err(BusError::Client(error.to_string())),
            }
        }
        Ok(())
    }
}
