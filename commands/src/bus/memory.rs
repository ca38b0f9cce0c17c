//! The in-process bus of the embedded default: topics are names, subscribers are unbounded
//! queues in this process, and a message published to a topic nobody subscribed to is dropped
//! (as the events topic is, when nothing in process reads it).

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;

use super::{InMessage, LagGauge, OutMessage};

/// Topics of this process: per-subscriber unbounded queues. Cheap to clone.
#[derive(Clone, Default)]
pub struct MemoryBus {
    subscribers: Arc<Mutex<HashMap<String, Vec<mpsc::UnboundedSender<InMessage>>>>>,
    offsets: Arc<AtomicI64>,
}

impl MemoryBus {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn publish(&self, messages: &[OutMessage]) {
        let mut subscribers = self.subscribers.lock().unwrap_or_else(|p| p.into_inner());
        for message in messages {
            let Some(queues) = subscribers.get_mut(&message.topic) else {
                continue;
            };
            let delivered = InMessage {
                topic: message.topic.clone(),
                partition: 0,
                offset: self.offsets.fetch_add(1, Ordering::Relaxed),
                key: Some(message.key.clone().into_bytes()),
                payload: Some(message.payload.clone()),
            };
            // A closed queue is a subscriber that went away.
            queues.retain(|queue| queue.send(delivered.clone()).is_ok());
        }
    }

    pub fn subscribe(&self, topics: &[String]) -> MemorySubscription {
        let (sender, receiver) = mpsc::unbounded_channel();
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
    receiver: mpsc::UnboundedReceiver<InMessage>,
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
