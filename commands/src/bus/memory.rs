//! The in-process bus of the embedded default: topics are names, subscribers are bounded
//! queues in this process ([`QUEUE_CAPACITY`] messages each), and a message published to a
//! topic nobody subscribed to is dropped (as the events topic is, when nothing in process
//! reads it).
//!
//! When a subscriber's queue is full, [`MemoryBus::publish`] waits until it has room: the
//! publisher is held back, nothing is dropped. Every publisher can afford to wait: the relay
//! publishes pages of the durable event log and moves its checkpoint only after `publish`
//! returns, and the development processor answers a request it has not yet marked done. No
//! subscriber publishes back into a queue it is the only reader of, so waiting cannot close a
//! cycle.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;

use super::{InMessage, LagGauge, OutMessage};

/// Messages waiting in one subscriber's queue, at most (a page of the relay is 500).
pub const QUEUE_CAPACITY: usize = 4096;

/// Topics of this process: per-subscriber bounded queues. Cheap to clone.
#[derive(Clone, Default)]
pub struct MemoryBus {
    subscribers: Arc<Mutex<HashMap<String, Vec<mpsc::Sender<InMessage>>>>>,
    offsets: Arc<AtomicI64>,
}

impl MemoryBus {
    pub fn new() -> Self {
        Self::default()
    }

    /// Delivers each message to every current subscriber of its topic, in order, waiting for
    /// room in a full queue (see the module docs).
    pub async fn publish(&self, messages: &[OutMessage]) {
        for message in messages {
            // The senders are cloned out of the lock: it is never held across a wait.
            let queues = {
                let subscribers = self.subscribers.lock().unwrap_or_else(|p| p.into_inner());
                match subscribers.get(&message.topic) {
                    Some(queues) => queues.clone(),
                    None => continue,
                }
            };
            let delivered = InMessage {
                topic: message.topic.clone(),
                partition: 0,
                offset: self.offsets.fetch_add(1, Ordering::Relaxed),
                key: Some(message.key.clone().into_bytes()),
                payload: Some(message.payload.clone()),
                headers: message.headers.clone(),
            };
            let mut gone = false;
            for queue in &queues {
                gone |= queue.send(delivered.clone()).await.is_err();
            }
            if gone {
                // A closed queue is a subscriber that went away.
                let mut subscribers = self.subscribers.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(queues) = subscribers.get_mut(&message.topic) {
                    queues.retain(|queue| !queue.is_closed());
                }
            }
        }
    }

    pub fn subscribe(&self, topics: &[String]) -> MemorySubscription {
        let (sender, receiver) = mpsc::channel(QUEUE_CAPACITY);
        let mut subscribers = self.subscribers.lock().unwrap_or_else(|p| p.into_inner());
        for topic in topics {
            subscribers
                .entry(topic.clone())
                .or_default()
                .push(sender.clone());
        }
        MemorySubscription {
            receiver,
            gauge: LagGauge::default(),
        }
    }
}

/// A queue of the messages published to the subscribed topics since the subscription.
pub struct MemorySubscription {
    receiver: mpsc::Receiver<InMessage>,
    gauge: LagGauge,
}

impl MemorySubscription {
    pub async fn next_chunk(&mut self, max: usize) -> Option<Vec<InMessage>> {
        let mut chunk = Vec::new();
        if self.receiver.recv_many(&mut chunk, max.max(1)).await == 0 {
            return None;
        }
        self.gauge.set(self.receiver.len() as i64);
        Some(chunk)
    }

    pub fn lag(&self) -> i64 {
        self.receiver.len() as i64
    }

    pub fn lag_gauge(&self) -> LagGauge {
        self.gauge.clone()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn message(i: usize) -> OutMessage {
        OutMessage {
            topic: "t".to_owned(),
            key: format!("k{i}"),
            payload: i.to_string().into_bytes(),
            headers: Vec::new(),
        }
    }

    #[tokio::test]
    async fn a_full_queue_holds_the_publisher_back_and_loses_nothing() {
        let bus = MemoryBus::new();
        let mut subscription = bus.subscribe(&["t".to_owned()]);
        let messages: Vec<_> = (0..QUEUE_CAPACITY + 10).map(message).collect();
        let publishing = {
            let bus = bus.clone();
            tokio::spawn(async move { bus.publish(&messages).await })
        };
        // The publisher fills the queue and waits: nothing is dropped, the queue stays bounded.
        let mut received = Vec::new();
        while received.len() < QUEUE_CAPACITY + 10 {
            assert!(subscription.lag() <= QUEUE_CAPACITY as i64);
            received.extend(subscription.next_chunk(100).await.unwrap());
        }
        publishing.await.unwrap();
        let payloads: Vec<usize> = received
            .iter()
            .map(|m| {
                String::from_utf8(m.payload.clone().unwrap())
                    .unwrap()
                    .parse()
                    .unwrap()
            })
            .collect();
        assert_eq!(payloads, (0..QUEUE_CAPACITY + 10).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn a_subscriber_that_went_away_is_forgotten() {
        let bus = MemoryBus::new();
        drop(bus.subscribe(&["t".to_owned()]));
        bus.publish(&[message(0)]).await;
        assert!(bus.subscribers.lock().unwrap()["t"].is_empty());
    }
}
