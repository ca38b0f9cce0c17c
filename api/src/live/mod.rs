//! Live projection streams: `GET /v1/ws` (protocol: docs/websocket.md).
//!
//! - [`Hub`] is this node's registry of WebSocket subscriptions. Its dispatcher reads the
//!   change feed ([`projections::Feed`]: this node's committed changes and, on PostgreSQL,
//!   every other node's) and pushes each change into the [`Outbox`] of every connection
//!   subscribed to its topic. A change's frame is serialised once, whatever the fan-out.
//! - [`Outbox`] is one connection's bounded send buffer. When it is full the oldest change is
//!   dropped and its topic marked *lagged*: the session stops that topic, tells the client with
//!   a `lagged` message, and the client resubscribes with `since` (missing nothing).
//! - [`session`] runs one connection: authentication happened at the upgrade; it answers
//!   subscribe/unsubscribe, sends snapshots and changes with contiguous versions, pings, closes
//!   idle connections, rate-limits client messages and closes with 1001 on shutdown.

pub mod session;

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};

use axum::extract::ws::Utf8Bytes;
use projections::{Change, Feed, FeedEvent};
use tokio::sync::{Notify, broadcast};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The WebSocket subprotocol this server speaks (offer it in `Sec-WebSocket-Protocol`).
pub const PROTOCOL: &str = "essayflow.v1";

/// What sessions share: this node's hub, the feed, the read models, the settings and the
/// shutdown signal (one `Arc` per connection, not a copy of the application state).
pub struct Live {
    pub hub: Arc<Hub>,
    pub feed: Feed,
    pub reads: projections::ReadModels,
    pub settings: Arc<crate::settings::Settings>,
    /// Cancelled at shutdown: every session closes with 1001.
    pub cancel: CancellationToken,
    /// Tracks every session, so that shutdown waits for them.
    pub tracker: TaskTracker,
    /// Sessions catching a topic up from the store (after a gap or a resync) at once.
    pub catching_up: tokio::sync::Semaphore,
    /// Checks in-band token refreshes; closes sessions whose user or credential lost access.
    pub identity: crate::identity::Identity,
    /// WebSocket connections open per node and per user (`ws.max_connections`,
    /// `ws.max_connections_per_user`).
    pub slots: Arc<Slots>,
}

/// Counts WebSocket connections per node and per user, so that the handshake can refuse one
/// past either cap before upgrading.
#[derive(Debug, Default)]
pub struct Slots {
    state: Mutex<SlotCounts>,
}

#[derive(Debug, Default)]
struct SlotCounts {
    total: usize,
    per_user: HashMap<domain::values::UserId, usize>,
}

/// One WebSocket connection's place; dropping it (when the session ends, or when the upgrade
/// never happens) frees it.
#[derive(Debug)]
pub struct Slot {
    slots: Arc<Slots>,
    user: domain::values::UserId,
}

impl Slots {
    /// Takes a place for `user`: `TooManyWebSockets(true)` (429) past `per_user` for that
    /// user, `TooManyWebSockets(false)` (503) past `total` on this node.
    pub fn take(
        self: &Arc<Self>,
        user: domain::values::UserId,
        total: usize,
        per_user: usize,
    ) -> Result<Slot, crate::error::ApiError> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if state.total >= total {
            return Err(crate::error::ApiError::TooManyWebSockets(false));
        }
        let mine = state.per_user.entry(user).or_default();
        if *mine >= per_user {
            return Err(crate::error::ApiError::TooManyWebSockets(true));
        }
        *mine += 1;
        state.total += 1;
        Ok(Slot {
            slots: self.clone(),
            user,
        })
    }

    /// WebSocket connections holding a place now.
    pub fn total(&self) -> usize {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).total
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut state = self.slots.state.lock().unwrap_or_else(|e| e.into_inner());
        state.total = state.total.saturating_sub(1);
        if let Some(mine) = state.per_user.get_mut(&self.user) {
            *mine -= 1;
            if *mine == 0 {
                state.per_user.remove(&self.user);
            }
        }
    }
}

/// Counters exported on `/metrics`.
#[derive(Debug, Default)]
pub struct LiveMetrics {
    pub connections: AtomicU64,
    pub subscriptions: AtomicU64,
    pub changes_sent: AtomicU64,
    pub snapshots_sent: AtomicU64,
    /// Changes dropped from full send buffers.
    pub dropped: AtomicU64,
    pub lagged: AtomicU64,
    /// Client messages refused (malformed, rate-limited, over a limit).
    pub refused: AtomicU64,
    /// Times the feed told this node it may have missed changes.
    pub resyncs: AtomicU64,
}

impl LiveMetrics {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
    pub fn sub(counter: &AtomicU64, n: u64) {
        counter.fetch_sub(n, Ordering::Relaxed);
    }
}

/// A change on its way to one client: the topic's internal name, its version and the frame.
#[derive(Clone)]
pub struct Item {
    pub topic: Arc<str>,
    pub version: i64,
    /// The generation of the read model that made the change.
    pub generation: i64,
    pub frame: Utf8Bytes,
    /// The trace context of the event behind the change (see `projections::Change::trace`).
    pub trace: Option<commands::TraceContext>,
}

/// What a session takes from its outbox in one go.
#[derive(Default)]
pub struct Drained {
    pub items: VecDeque<Item>,
    /// Topics whose changes were dropped; not yet reported.
    pub lagged: Vec<Arc<str>>,
    /// The feed may have missed changes: check every topic.
    pub resync: bool,
    /// A rebuild replaced the tables behind these topic prefixes: send their topics afresh.
    pub reset: Vec<&'static str>,
}

#[derive(Default)]
struct Pending {
    items: VecDeque<Item>,
    /// The bytes of the frames in `items`.
    bytes: usize,
    /// Lagged topics (and whether the session was told): their changes are refused until the
    /// session drops the subscription.
    lagged: Vec<(Arc<str>, bool)>,
    resync: bool,
    reset: Vec<&'static str>,
}

impl Pending {
    fn is_lagged(&self, topic: &Arc<str>) -> bool {
        self.lagged.iter().any(|(t, _)| t == topic)
    }

    /// Marks `topic` lagged and drops its queued changes: the client resubscribes from the
    /// last version it got, so they would only take room from other topics.
    fn mark_lagged(&mut self, topic: Arc<str>) -> u64 {
        let before = self.items.len();
        self.remove_topic(&topic);
        self.lagged.push((topic, false));
        (before - self.items.len()) as u64
    }

    fn remove_topic(&mut self, topic: &str) {
        let mut freed = 0;
        self.items.retain(|item| {
            let keep = &*item.topic != topic;
            if !keep {
                freed += item.frame.len();
            }
            keep
        });
        self.bytes -= freed;
    }
}

/// One connection's bounded send buffer: at most `capacity` messages and `capacity_bytes` of
/// frames (a single frame larger than that still goes through an empty buffer).
pub struct Outbox {
    pending: Mutex<Pending>,
    notify: Notify,
    capacity: usize,
    capacity_bytes: usize,
    metrics: Arc<LiveMetrics>,
}

impl Outbox {
    fn lock(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn push(&self, item: Item) {
        {
            let mut pending = self.lock();
            if pending.is_lagged(&item.topic) {
                LiveMetrics::add(&self.metrics.dropped, 1);
                return;
            }
            let size = item.frame.len();
            while pending.items.len() >= self.capacity
                || (pending.bytes + size > self.capacity_bytes && !pending.items.is_empty())
            {
                let Some(oldest) = pending.items.pop_front() else {
                    break;
                };
                pending.bytes -= oldest.frame.len();
                let dropped = 1 + pending.mark_lagged(oldest.topic);
                LiveMetrics::add(&self.metrics.dropped, dropped);
                if pending.is_lagged(&item.topic) {
                    LiveMetrics::add(&self.metrics.dropped, 1);
                    return;
                }
            }
            pending.bytes += size;
            pending.items.push_back(item);
        }
        self.notify.notify_one();
    }

    fn resync(&self) {
        self.lock().resync = true;
        self.notify.notify_one();
    }

    fn reset(&self, prefix: &'static str) {
        let mut pending = self.lock();
        if !pending.reset.contains(&prefix) {
            pending.reset.push(prefix);
        }
        drop(pending);
        self.notify.notify_one();
    }

    /// Waits until something is pending.
    pub async fn ready(&self) {
        self.notify.notified().await;
    }

    /// Takes everything pending (changes of lagged topics never enter).
    pub fn drain(&self) -> Drained {
        let mut pending = self.lock();
        let mut lagged = Vec::new();
        for (topic, told) in &mut pending.lagged {
            if !*told {
                *told = true;
                lagged.push(topic.clone());
            }
        }
        pending.bytes = 0;
        Drained {
            items: std::mem::take(&mut pending.items),
            lagged,
            resync: std::mem::take(&mut pending.resync),
            reset: std::mem::take(&mut pending.reset),
        }
    }

    /// Forgets `topic`'s queued changes and that it lagged (the session dropped the
    /// subscription).
    pub fn forget(&self, topic: &str) {
        let mut pending = self.lock();
        pending.lagged.retain(|(t, _)| &**t != topic);
        pending.remove_topic(topic);
    }
}

/// The outboxes subscribed to one topic, by connection id.
type Subscribers = HashMap<u64, Arc<Outbox>>;

/// This node's WebSocket subscriptions.
pub struct Hub {
    topics: RwLock<HashMap<Arc<str>, Subscribers>>,
    connections: Mutex<HashMap<u64, Weak<Outbox>>>,
    next_id: AtomicU64,
    send_buffer: usize,
    send_buffer_bytes: usize,
    pub metrics: Arc<LiveMetrics>,
}

impl Hub {
    /// A hub whose connections each buffer at most `send_buffer` messages and
    /// `send_buffer_bytes` bytes of frames.
    pub fn new(send_buffer: usize, send_buffer_bytes: usize) -> Self {
        Self {
            topics: RwLock::default(),
            connections: Mutex::default(),
            next_id: AtomicU64::new(1),
            send_buffer,
            send_buffer_bytes,
            metrics: Arc::default(),
        }
    }

    /// Registers a connection.
    pub fn connect(&self) -> (u64, Arc<Outbox>) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let outbox = Arc::new(Outbox {
            pending: Mutex::default(),
            notify: Notify::new(),
            capacity: self.send_buffer,
            capacity_bytes: self.send_buffer_bytes,
            metrics: self.metrics.clone(),
        });
        self.connections
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, Arc::downgrade(&outbox));
        LiveMetrics::add(&self.metrics.connections, 1);
        (id, outbox)
    }

    pub fn disconnect(&self, id: u64) {
        self.connections
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
        LiveMetrics::sub(&self.metrics.connections, 1);
    }

    pub fn subscribe(&self, topic: &Arc<str>, id: u64, outbox: &Arc<Outbox>) {
        let mut topics = self.topics.write().unwrap_or_else(|p| p.into_inner());
        if topics
            .entry(topic.clone())
            .or_default()
            .insert(id, outbox.clone())
            .is_none()
        {
            LiveMetrics::add(&self.metrics.subscriptions, 1);
        }
    }

    pub fn unsubscribe(&self, topic: &str, id: u64) {
        let mut topics = self.topics.write().unwrap_or_else(|p| p.into_inner());
        if let Some(subscribers) = topics.get_mut(topic) {
            if subscribers.remove(&id).is_some() {
                LiveMetrics::sub(&self.metrics.subscriptions, 1);
            }
            if subscribers.is_empty() {
                topics.remove(topic);
            }
        }
    }

    /// Pushes committed changes to their subscribers.
    pub fn dispatch(&self, changes: &[Change]) {
        let topics = self.topics.read().unwrap_or_else(|p| p.into_inner());
        for change in changes {
            let Some((topic, subscribers)) = topics.get_key_value(change.topic.as_str()) else {
                continue;
            };
            let item = Item {
                topic: topic.clone(),
                version: change.version,
                generation: change.generation,
                frame: change_frame(visible_topic(&change.topic), change.version, &change.patch),
                trace: change.trace.clone(),
            };
            for outbox in subscribers.values() {
                outbox.push(item.clone());
            }
        }
    }

    fn outboxes(&self) -> Vec<Arc<Outbox>> {
        self.connections
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .filter_map(Weak::upgrade)
            .collect()
    }

    /// Tells every connection to check its topics against the store.
    pub fn resync_all(&self) {
        LiveMetrics::add(&self.metrics.resyncs, 1);
        for outbox in self.outboxes() {
            outbox.resync();
        }
    }

    /// Tells every connection to send its topics of a rebuilt projection afresh.
    pub fn reset_all(&self, projection: &str) {
        let prefix = match projections::AnyProjection::named(projection) {
            Ok(projection) => projection.topic_prefix(),
            Err(_) => return,
        };
        for outbox in self.outboxes() {
            outbox.reset(prefix);
        }
    }

    /// Feeds the hub from the change feed until `cancel` fires.
    pub async fn run(self: Arc<Self>, feed: Feed, cancel: CancellationToken) {
        let mut changes = feed.subscribe();
        loop {
            let received = tokio::select! {
                _ = cancel.cancelled() => return,
                received = changes.recv() => received,
            };
            match received {
                Ok(FeedEvent::Changes(changes)) => self.dispatch(&changes),
                Ok(FeedEvent::Resync) => self.resync_all(),
                Ok(FeedEvent::Reset(projection)) => self.reset_all(&projection),
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    tracing::warn!(
                        missed,
                        "the WebSocket hub fell behind the change feed; resyncing"
                    );
                    self.resync_all();
                }
                Err(broadcast::error::RecvError::Closed) => return,
            }
        }
    }
}

/// The name a client uses for an internal topic (`dashboard:<owner>` is its `dashboard`).
pub fn visible_topic(topic: &str) -> &str {
    if topic.starts_with("dashboard:") {
        "dashboard"
    } else {
        topic
    }
}

/// A `snapshot` frame: the topic's whole document (`data`, JSON text) at `version`.
pub fn snapshot_frame(topic: &str, version: i64, data: &str) -> Utf8Bytes {
    let topic = serde_json::Value::from(topic);
    Utf8Bytes::from(format!(
        r#"{{"type":"snapshot","topic":{topic},"version":{version},"data":{data}}}"#
    ))
}

/// A `change` frame: the JSON Patch (RFC 6902; `patch`, JSON text) from `version - 1` to
/// `version`.
pub fn change_frame(topic: &str, version: i64, patch: &str) -> Utf8Bytes {
    let topic = serde_json::Value::from(topic);
    Utf8Bytes::from(format!(
        r#"{{"type":"change","topic":{topic},"version":{version},"patch":{patch}}}"#
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(topic: &str, version: i64) -> Change {
        Change {
            topic: topic.to_owned(),
            version,
            patch: format!(r#"[{{"op":"replace","path":"/v","value":{version}}}]"#),
            generation: 0,
            trace: None,
        }
    }

    #[test]
    fn a_full_outbox_drops_the_oldest_change_and_marks_its_topic_lagged() {
        let hub = Hub::new(4, usize::MAX);
        let (id, outbox) = hub.connect();
        let (a, b): (Arc<str>, Arc<str>) = ("batch:a".into(), "batch:b".into());
        hub.subscribe(&a, id, &outbox);
        hub.subscribe(&b, id, &outbox);
        hub.dispatch(&[change("batch:a", 1), change("batch:b", 1)]);
        hub.dispatch(&[change("batch:b", 2), change("batch:b", 3)]);
        // The fifth change pushes out a:1; a is lagged, b's changes all stay.
        hub.dispatch(&[change("batch:b", 4), change("batch:a", 2)]);
        // Forgetting a topic not yet reported is fine (the client unsubscribed meanwhile).
        outbox.forget("batch:c");
        let drained = outbox.drain();
        assert_eq!(drained.lagged, vec![a.clone()]);
        let versions: Vec<(String, i64)> = drained
            .items
            .iter()
            .map(|i| (i.topic.to_string(), i.version))
            .collect();
        assert_eq!(
            versions,
            vec![
                ("batch:b".to_owned(), 1),
                ("batch:b".to_owned(), 2),
                ("batch:b".to_owned(), 3),
                ("batch:b".to_owned(), 4)
            ]
        );
        // Reported once; refused until the session drops the subscription.
        hub.dispatch(&[change("batch:a", 3)]);
        let drained = outbox.drain();
        assert!(drained.lagged.is_empty() && drained.items.is_empty());
        outbox.forget("batch:a");
        hub.dispatch(&[change("batch:a", 4)]);
        assert_eq!(outbox.drain().items.len(), 1);
        // a:1 pushed out, a:2 and a:3 refused.
        assert_eq!(hub.metrics.dropped.load(Ordering::Relaxed), 3);

        // A lagged topic's queued changes make room for the others.
        let (id, outbox) = hub.connect();
        hub.subscribe(&a, id, &outbox);
        hub.subscribe(&b, id, &outbox);
        hub.dispatch(&[
            change("batch:a", 1),
            change("batch:a", 2),
            change("batch:a", 3),
        ]);
        hub.dispatch(&[change("batch:b", 1), change("batch:b", 2)]);
        let drained = outbox.drain();
        assert_eq!(drained.lagged, vec![a.clone()]);
        assert_eq!(drained.items.len(), 2, "b:1 and b:2; a's are gone");
        // Unsubscribing before the session was told: nothing left to report.
        hub.dispatch(&[
            change("batch:b", 3),
            change("batch:b", 4),
            change("batch:b", 5),
        ]);
        hub.dispatch(&[change("batch:b", 6), change("batch:b", 7)]);
        outbox.forget("batch:b");
        let drained = outbox.drain();
        assert!(drained.lagged.is_empty() && drained.items.is_empty());
    }

    #[test]
    fn an_outbox_over_its_byte_limit_drops_the_oldest_change_too() {
        // Room for many messages but only about three frames' bytes.
        let one = change("batch:a", 1).patch.len() + 60;
        let hub = Hub::new(1000, 3 * one);
        let (id, outbox) = hub.connect();
        let (a, b): (Arc<str>, Arc<str>) = ("batch:a".into(), "batch:b".into());
        hub.subscribe(&a, id, &outbox);
        hub.subscribe(&b, id, &outbox);
        hub.dispatch(&[change("batch:a", 1), change("batch:b", 1)]);
        hub.dispatch(&[change("batch:b", 2), change("batch:b", 3)]);
        let drained = outbox.drain();
        assert_eq!(drained.lagged, vec![a], "a:1 made room");
        let versions: Vec<i64> = drained.items.iter().map(|i| i.version).collect();
        assert_eq!(versions, [1, 2, 3]);
        // Draining frees the bytes.
        hub.dispatch(&[change("batch:b", 4), change("batch:b", 5)]);
        assert_eq!(outbox.drain().items.len(), 2);
        assert_eq!(hub.metrics.dropped.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn change_and_snapshot_frames_are_the_documented_json() {
        let parse = |text: Utf8Bytes| -> serde_json::Value {
            serde_json::from_str(text.as_str()).unwrap_or_else(|e| panic!("{e}"))
        };
        let patch = r#"[{"op":"add","path":"/x/-","value":1}]"#;
        assert_eq!(
            parse(change_frame(visible_topic("dashboard:u1"), 7, patch)),
            serde_json::json!({"type": "change", "topic": "dashboard", "version": 7,
                "patch": [{"op": "add", "path": "/x/-", "value": 1}]})
        );
        assert_eq!(
            parse(snapshot_frame("batch:b", 3, r#"{"x":[1]}"#)),
            serde_json::json!({"type": "snapshot", "topic": "batch:b", "version": 3, "data": {"x": [1]}})
        );
    }
}
