//! One WebSocket connection: the protocol of docs/websocket.md.
//!
//! The session owns the socket and runs on one task. Per subscribed topic it remembers the last
//! version the client has; a change is sent only if it is exactly the next one. An older one is
//! a duplicate (dropped); a newer one means something was missed (another node's change not yet
//! seen, a resync) and the topic is caught up from the feed's history, or with a fresh
//! snapshot, before anything else of that topic is sent. So versions on the wire are always
//! contiguous per topic, and a gap is only ever announced by a `lagged` message.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, close_code};
use futures::SinkExt;
use projections::Change;
use serde::Deserialize;
use serde_json::json;
use tokio::time::{Instant, MissedTickBehavior};
use tracing::Instrument;

use super::{Hub, Item, Live, LiveMetrics, Outbox, change_frame, snapshot_frame, visible_topic};
use crate::auth::AuthUser;
use tokio_tungstenite::tungstenite;

/// Changes read from the history at once while catching a client up.
const REPLAY_PAGE: i64 = 256;

/// A write that takes longer than this (a client that stopped reading, with full TCP
/// buffers) ends the connection: no session can hold up shutdown or its own timers for long.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// The close code of a session whose user was disabled, deleted or changed role, whose login
/// session was logged out or revoked, or whose API key was revoked (a private-use code,
/// RFC 6455 section 7.4.2; docs/websocket.md).
pub const CLOSE_REVOKED: u16 = 4403;

/// A connection's identity, set at the upgrade and renewed by in-band refreshes.
pub struct Connect {
    pub live: Arc<Live>,
    /// Boxed: every idle connection's future holds it, and its size is per connection.
    pub user: Box<AuthUser>,
    /// When the access token expires: the connection closes then (1008) unless the client
    /// sent a fresh token (`{"type":"refresh","token":...}`) before.
    pub expires_at: Instant,
}

impl Connect {
    fn hub(&self) -> &Hub {
        &self.live.hub
    }
}

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
enum ClientMessage {
    Subscribe {
        topic: String,
        #[serde(default)]
        since: Option<i64>,
        /// Wait (bounded) until the read models have applied this position first.
        #[serde(default)]
        min_position: Option<i64>,
    },
    Unsubscribe {
        topic: String,
    },
    /// A fresh access token of the same user: the connection stays open past the old one's
    /// expiry, with its subscriptions.
    Refresh {
        token: String,
    },
}

struct Subscription {
    visible: Arc<str>,
    /// The version the client has.
    last: i64,
    /// The generation of the read model the client's document comes from: changes of another
    /// generation (a rebuild swapped the model) do not apply to it.
    generation: i64,
}

/// Why a session ends.
enum End {
    /// The connection broke (or a write timed out).
    Gone,
    /// The client sent a close frame (the library queued our reply).
    ClientClosed,
    Close(u16, &'static str),
}

/// A token bucket for client messages.
struct Bucket {
    tokens: f64,
    rate: f64,
    burst: f64,
    at: Instant,
    /// Messages refused in a row.
    strikes: u32,
}

impl Bucket {
    fn take(&mut self) -> bool {
        let now = Instant::now();
        self.tokens =
            (self.tokens + now.duration_since(self.at).as_secs_f64() * self.rate).min(self.burst);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            self.strikes = 0;
            true
        } else {
            self.strikes += 1;
            false
        }
    }
}

struct Session {
    connect: Connect,
    /// Cancelled when the user or credential loses access.
    watch: crate::identity::Watch,
    id: u64,
    outbox: Arc<Outbox>,
    subs: HashMap<Arc<str>, Subscription>,
    bucket: Bucket,
    released: bool,
}

impl Session {
    /// Removes this connection from the hub (idempotent; also run on drop, so that a panic
    /// or a cancelled future leaves no registration behind).
    fn release(&mut self) {
        if std::mem::replace(&mut self.released, true) {
            return;
        }
        for topic in self.subs.keys() {
            self.connect.hub().unsubscribe(topic, self.id);
        }
        self.connect.hub().disconnect(self.id);
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.release();
    }
}

/// Runs one connection to its end.
pub async fn run(connect: Connect, mut socket: WebSocket) {
    let (id, outbox) = connect.hub().connect();
    let settings = connect.live.settings.ws.clone();
    let watch = connect.live.identity.watch(&connect.user);
    let mut session = Session {
        watch,
        bucket: Bucket {
            tokens: f64::from(settings.message_burst),
            rate: f64::from(settings.messages_per_second),
            burst: f64::from(settings.message_burst),
            at: Instant::now(),
            strikes: 0,
        },
        connect,
        id,
        outbox,
        subs: HashMap::new(),
        released: false,
    };
    let end = session.serve(&mut socket).await;
    session.release();
    drop(session);
    if let End::ClientClosed = end {
        // Send the close reply the library queued.
        let _ = tokio::time::timeout(Duration::from_secs(1), socket.flush()).await;
    }
    if let End::Close(code, reason) = end {
        let close = Message::Close(Some(CloseFrame {
            code,
            reason: Utf8Bytes::from_static(reason),
        }));
        // The closing handshake: send ours, then read (and discard) until the client's close
        // frame, so that unread client data does not turn our close into a TCP reset. A
        // client that does not take part gets at most two seconds.
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            if socket.send(close).await.is_ok() {
                while let Some(Ok(message)) = socket.recv().await {
                    if matches!(message, Message::Close(_)) {
                        break;
                    }
                }
            }
        })
        .await;
    }
}

impl Session {
    async fn serve(&mut self, socket: &mut WebSocket) -> End {
        let settings = self.connect.live.settings.ws.clone();
        let idle = Duration::from_secs(settings.idle_timeout_secs);
        let mut ping = tokio::time::interval_at(
            Instant::now() + Duration::from_secs(settings.ping_interval_secs),
            Duration::from_secs(settings.ping_interval_secs),
        );
        ping.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut heard = Instant::now();
        let cancel = self.connect.live.cancel.clone();
        let revoked = self.watch.closed.clone();
        let outbox = self.outbox.clone();
        loop {
            let step = tokio::select! {
                biased;
                _ = cancel.cancelled() => return End::Close(close_code::AWAY, "the server is shutting down"),
                _ = revoked.cancelled() => return End::Close(CLOSE_REVOKED, "access revoked"),
                _ = tokio::time::sleep_until(self.connect.expires_at) => {
                    return End::Close(close_code::POLICY, "the access token expired");
                }
                _ = tokio::time::sleep_until(heard + idle) => {
                    return End::Close(close_code::NORMAL, "idle for too long");
                }
                received = socket.recv() => {
                    heard = Instant::now();
                    match received {
                        // Boxed: the rare, large futures (database reads) live on the heap
                        // only while they run, so an idle connection's task stays small.
                        Some(Ok(message)) => Box::pin(self.on_message(socket, message)).await,
                        Some(Err(error)) => {
                            if is_too_big(&error) {
                                LiveMetrics::add(&self.connect.hub().metrics.refused, 1);
                                return End::Close(close_code::SIZE, "message too big");
                            }
                            return End::Gone;
                        }
                        None => return End::Gone,
                    }
                }
                _ = outbox.ready() => Box::pin(self.flush(socket)).await,
                _ = ping.tick() => send(socket, Message::Ping(Default::default())).await,
            };
            if let Err(end) = step {
                return end;
            }
        }
    }

    async fn on_message(&mut self, socket: &mut WebSocket, message: Message) -> Result<(), End> {
        let text = match message {
            Message::Text(text) => Some(text),
            Message::Ping(_) | Message::Pong(_) => return Ok(()),
            Message::Close(_) => return Err(End::ClientClosed),
            Message::Binary(_) => None,
        };
        if !self.bucket.take() {
            if self.bucket.strikes > self.connect.live.settings.ws.message_burst {
                LiveMetrics::add(&self.connect.hub().metrics.refused, 1);
                return Err(End::Close(close_code::POLICY, "too many messages"));
            }
            return self
                .refuse(socket, None, "rate_limited", "too many messages; slow down")
                .await;
        }
        let Some(text) = text else {
            return self
                .refuse(
                    socket,
                    None,
                    "malformed",
                    "only JSON text messages are accepted",
                )
                .await;
        };
        let message: ClientMessage = match serde_json::from_str(text.as_str()) {
            Ok(message) => message,
            Err(error) => {
                let detail = format!("not a valid message: {error}");
                return self.refuse(socket, None, "malformed", &detail).await;
            }
        };
        match message {
            ClientMessage::Subscribe {
                topic,
                since,
                min_position,
            } => self.subscribe(socket, topic, since, min_position).await,
            ClientMessage::Unsubscribe { topic } => self.unsubscribe(socket, topic).await,
            ClientMessage::Refresh { token } => self.refresh_token(socket, &token).await,
        }
    }

    /// Takes a fresh access token of the same user: the connection now expires with it.
    async fn refresh_token(&mut self, socket: &mut WebSocket, token: &str) -> Result<(), End> {
        let checked = self.connect.live.identity.authenticate_token(token).await;
        let now = chrono::Utc::now().timestamp();
        // A token of this user that has not expired; one expired within the clock leeway the
        // signature check allows is refused here too.
        let fresh = checked
            .ok()
            .filter(|(user, claims)| user.id == self.connect.user.id && claims.exp > now);
        let Some((user, claims)) = fresh else {
            return self
                .refuse(
                    socket,
                    None,
                    "invalid_token",
                    "the token is invalid, expired, revoked or another user's; the connection keeps its old expiry",
                )
                .await;
        };
        let left = u64::try_from(claims.exp - now).unwrap_or(0);
        self.connect.expires_at = Instant::now() + Duration::from_secs(left);
        self.watch.refreshed(&user);
        *self.connect.user = user;
        send_json(socket, &json!({"type": "refreshed", "expires_in": left})).await
    }

    async fn refuse(
        &self,
        socket: &mut WebSocket,
        topic: Option<&str>,
        code: &str,
        message: &str,
    ) -> Result<(), End> {
        LiveMetrics::add(&self.connect.hub().metrics.refused, 1);
        let mut error = json!({"type": "error", "code": code, "message": message});
        if let Some(topic) = topic {
            error["topic"] = topic.into();
        }
        send_json(socket, &error).await
    }

    /// The internal name of a topic the client names, if it is well formed.
    fn internal_topic(&self, topic: &str) -> Option<String> {
        if topic == "dashboard" {
            return Some(Change::dashboard_topic(&self.connect.user.id.to_string()));
        }
        let id = uuid::Uuid::parse_str(topic.strip_prefix("batch:")?).ok()?;
        Some(Change::batch_topic(&id.to_string()))
    }

    async fn subscribe(
        &mut self,
        socket: &mut WebSocket,
        topic: String,
        since: Option<i64>,
        min_position: Option<i64>,
    ) -> Result<(), End> {
        let Some(internal) = self.internal_topic(&topic) else {
            let detail = "topic must be \"dashboard\" or \"batch:<batch id>\"";
            return self
                .refuse(socket, Some(&topic), "invalid_topic", detail)
                .await;
        };
        let internal: Arc<str> = internal.into();
        let resubscribe = self.subs.contains_key(&internal);
        let limit = self.connect.live.settings.ws.max_subscriptions;
        if !resubscribe && self.subs.len() >= limit {
            let detail = format!("at most {limit} subscriptions per connection");
            return self
                .refuse(socket, Some(&topic), "too_many_subscriptions", &detail)
                .await;
        }
        if let Some(position) = min_position {
            let projection = if internal.starts_with("batch:") {
                "batch_state"
            } else {
                "dashboard"
            };
            let wait = self.connect.live.settings.consistency_wait();
            if let Err(error) = self
                .connect
                .live
                .reads
                .wait_for(projection, position, wait)
                .await
            {
                tracing::warn!(%error, "waiting for a read model failed");
                return self
                    .refuse(socket, Some(&topic), "unavailable", "try again later")
                    .await;
            }
        }
        // Register first, read second: every change committed after the read arrives in the
        // outbox; those the read already includes are dropped by version.
        self.connect
            .hub()
            .subscribe(&internal, self.id, &self.outbox);
        let snapshot = match self.snapshot(&internal).await {
            Ok(Some(snapshot)) => snapshot,
            Ok(None) => {
                if !resubscribe {
                    self.connect.hub().unsubscribe(&internal, self.id);
                }
                // The same answer for a missing batch and another teacher's: no hint.
                let detail = "no such topic";
                return self.refuse(socket, Some(&topic), "not_found", detail).await;
            }
            Err(error) => {
                tracing::warn!(error = %error, "reading a live topic failed");
                if !resubscribe {
                    self.connect.hub().unsubscribe(&internal, self.id);
                }
                return self
                    .refuse(socket, Some(&topic), "unavailable", "try again later")
                    .await;
            }
        };
        let visible: Arc<str> = visible_topic(&internal).into();
        let mut sub = Subscription {
            visible,
            last: 0,
            generation: snapshot.generation,
        };
        let sent = match send_json(
            socket,
            &json!({"type": "subscribed", "topic": &*sub.visible}),
        )
        .await
        {
            Ok(()) => {
                let current = (snapshot.version, snapshot.generation);
                // With the snapshot in hand, nothing more is read that could fail.
                self.bring_up(socket, &internal, &mut sub, since, current, Some(snapshot))
                    .await
                    .map(|_| ())
            }
            Err(end) => Err(end),
        };
        if let Err(end) = sent {
            // The connection is going: the hub must not keep a registration nobody cleans up.
            if !resubscribe {
                self.connect.hub().unsubscribe(&internal, self.id);
            }
            return Err(end);
        }
        self.subs.insert(internal, sub);
        Ok(())
    }

    async fn unsubscribe(&mut self, socket: &mut WebSocket, topic: String) -> Result<(), End> {
        let Some(internal) = self.internal_topic(&topic) else {
            let detail = "topic must be \"dashboard\" or \"batch:<batch id>\"";
            return self
                .refuse(socket, Some(&topic), "invalid_topic", detail)
                .await;
        };
        if self.subs.remove(internal.as_str()).is_none() {
            return self
                .refuse(
                    socket,
                    Some(&topic),
                    "not_subscribed",
                    "not subscribed to this topic",
                )
                .await;
        }
        self.connect.hub().unsubscribe(&internal, self.id);
        self.outbox.forget(&internal);
        send_json(socket, &json!({"type": "unsubscribed", "topic": topic})).await
    }

    /// The topic's current document, if the user may see it.
    async fn snapshot(
        &self,
        topic: &str,
    ) -> Result<Option<projections::Snapshot>, projections::ProjectionError> {
        let snapshot = self.connect.live.feed.snapshot(topic).await?;
        Ok(snapshot.filter(|s| self.connect.user.may_read(&s.owner_id)))
    }

    /// Brings the client from `since` (or nothing) to the topic's `current` version and
    /// generation: the changes in between from the history if it still has every one of them,
    /// all of that generation, else a snapshot (`known`, or read now).
    async fn bring_up(
        &self,
        socket: &mut WebSocket,
        topic: &str,
        sub: &mut Subscription,
        since: Option<i64>,
        (version, generation): (i64, i64),
        known: Option<projections::Snapshot>,
    ) -> Result<Result<(), projections::ProjectionError>, End> {
        let max_replay = self.connect.live.settings.ws.max_replay;
        if let Some(since) = since.filter(|s| (version - max_replay..=version).contains(s))
            && self
                .replay(socket, topic, sub, since, version, generation)
                .await?
        {
            return Ok(Ok(()));
        }
        let snapshot = match known {
            Some(snapshot) => Some(snapshot),
            None => match self.snapshot(topic).await {
                Ok(snapshot) => snapshot,
                Err(error) => return Ok(Err(error)),
            },
        };
        let Some(snapshot) = snapshot else {
            return Ok(Ok(()));
        };
        let text = snapshot_frame(&sub.visible, snapshot.version, &snapshot.data);
        send(socket, Message::Text(text)).await?;
        LiveMetrics::add(&self.connect.hub().metrics.snapshots_sent, 1);
        sub.last = snapshot.version;
        sub.generation = snapshot.generation;
        Ok(Ok(()))
    }

    /// Sends the changes after `since` up to `version` from the history, page by page, if the
    /// history still has the change that made `since` (so the client's document is known to
    /// be of `generation`) and every change after it, all of `generation`. Returns whether it
    /// brought the client to `version`; if not, what it sent is superseded by a snapshot.
    async fn replay(
        &self,
        socket: &mut WebSocket,
        topic: &str,
        sub: &mut Subscription,
        since: i64,
        version: i64,
        generation: i64,
    ) -> Result<bool, End> {
        let feed = &self.connect.live.feed;
        let metrics = &self.connect.hub().metrics;
        // Version 0 is the empty document, the same in every generation.
        let mut at = since;
        let mut from = if since > 0 { since } else { 1 };
        while at < version || from == since {
            let to = version.min(at + REPLAY_PAGE);
            let page = match feed.history(topic, from, to).await {
                Ok(page) => page,
                Err(error) => {
                    tracing::warn!(%error, "reading live history failed; sending a snapshot");
                    return Ok(false);
                }
            };
            let mut changes = page.as_slice();
            if from == since {
                // The change that made `since`: the client's document is of its generation.
                match changes.split_first() {
                    Some((made, rest))
                        if made.version == since && made.generation == generation =>
                    {
                        changes = rest;
                    }
                    _ => return Ok(false),
                }
            }
            let complete = changes.len() as i64 == to - at
                && changes
                    .iter()
                    .zip(at + 1..)
                    .all(|(c, v)| c.version == v && c.generation == generation);
            if !complete {
                return Ok(false);
            }
            for change in changes {
                let text = change_frame(&sub.visible, change.version, &change.patch);
                feed_frame(socket, Message::Text(text)).await?;
                at = change.version;
            }
            flush(socket).await?;
            LiveMetrics::add(&metrics.changes_sent, changes.len() as u64);
            sub.last = at;
            sub.generation = generation;
            from = at + 1;
        }
        Ok(at == version)
    }

    /// Sends what the hub queued for this connection.
    async fn flush(&mut self, socket: &mut WebSocket) -> Result<(), End> {
        let drained = self.outbox.drain();
        for topic in drained.lagged {
            self.lagged(
                socket,
                &topic,
                "changes were dropped because the connection is too slow; \
                 subscribe again with since = version",
            )
            .await?;
        }
        if !drained.reset.is_empty() {
            // A rebuild swapped the tables behind these topics: whatever the version, the
            // document is sent whole again.
            let topics: Vec<Arc<str>> = self
                .subs
                .keys()
                .filter(|t| drained.reset.iter().any(|p| t.starts_with(p)))
                .cloned()
                .collect();
            for topic in topics {
                self.refresh(socket, &topic).await?;
            }
        }
        if drained.resync {
            let topics: Vec<Arc<str>> = self.subs.keys().cloned().collect();
            for topic in topics {
                self.catch_up(socket, &topic).await?;
            }
        }
        let mut sent = 0;
        for Item {
            topic,
            version,
            generation,
            frame,
            trace,
        } in drained.items
        {
            let Some((last, of)) = self.subs.get(&topic).map(|s| (s.last, s.generation)) else {
                continue;
            };
            if version <= last {
                continue;
            }
            // A gap, or a change of another model (a rebuild swapped it): from the store.
            if version > last + 1 || generation != of {
                flush(socket).await?;
                self.catch_up(socket, &topic).await?;
                continue;
            }
            if commands::trace::spans_for(trace.as_ref()) {
                let span = tracing::info_span!(
                    "ws.change",
                    "otel.kind" = "producer",
                    topic = visible_topic(&topic),
                    version,
                    connection = self.id,
                );
                if let Some(trace) = &trace {
                    trace.adopt(&span);
                }
                feed_frame(socket, Message::Text(frame))
                    .instrument(span)
                    .await?;
            } else {
                feed_frame(socket, Message::Text(frame)).await?;
            }
            if let Some(sub) = self.subs.get_mut(&topic) {
                sub.last = version;
            }
            sent += 1;
        }
        flush(socket).await?;
        LiveMetrics::add(&self.connect.hub().metrics.changes_sent, sent);
        Ok(())
    }

    /// Ends a subscription with a `lagged` message: the client resubscribes with `since`.
    async fn lagged(&mut self, socket: &mut WebSocket, topic: &str, why: &str) -> Result<(), End> {
        self.connect.hub().unsubscribe(topic, self.id);
        self.outbox.forget(topic);
        let Some(sub) = self.subs.remove(topic) else {
            return Ok(());
        };
        LiveMetrics::add(&self.connect.hub().metrics.lagged, 1);
        let lagged = json!({
            "type": "lagged",
            "topic": &*sub.visible,
            "version": sub.last,
            "message": why,
        });
        send_json(socket, &lagged).await
    }

    /// Sends a subscribed topic's snapshot again, whatever version the client has.
    async fn refresh(&mut self, socket: &mut WebSocket, topic: &Arc<str>) -> Result<(), End> {
        let Some(mut sub) = self.subs.remove(topic) else {
            return Ok(());
        };
        let live = self.connect.live.clone();
        let brought = match live.catching_up.acquire().await {
            Ok(_permit) => {
                self.bring_up(socket, topic, &mut sub, None, (0, 0), None)
                    .await
            }
            Err(_) => return Err(End::Gone),
        };
        self.subs.insert(topic.clone(), sub);
        match brought? {
            Ok(()) => Ok(()),
            Err(error) => {
                tracing::warn!(%error, "refreshing a live topic failed");
                self.lagged(
                    socket,
                    topic,
                    "the read model was rebuilt and could not be read; subscribe again",
                )
                .await
            }
        }
    }

    /// Brings one subscribed topic up to date from the store: nothing if it is, the missed
    /// changes from the history if it can, else a snapshot. At most a few sessions of this
    /// node do it at once, so that a resync of every connection cannot swamp the database.
    async fn catch_up(&mut self, socket: &mut WebSocket, topic: &Arc<str>) -> Result<(), End> {
        let Some(mut sub) = self.subs.remove(topic) else {
            return Ok(());
        };
        let live = self.connect.live.clone();
        let brought = match live.catching_up.acquire().await {
            Ok(_permit) => match live.feed.current(topic).await {
                Ok(Some((version, generation)))
                    if version == sub.last && generation == sub.generation =>
                {
                    Ok(Ok(()))
                }
                Ok(Some(current)) => {
                    // Only a document of the current generation can be patched forward.
                    let since = (current.1 == sub.generation).then_some(sub.last);
                    self.bring_up(socket, topic, &mut sub, since, current, None)
                        .await
                }
                Ok(None) => Ok(Ok(())),
                Err(error) => Ok(Err(error)),
            },
            Err(_) => return Err(End::Gone),
        };
        self.subs.insert(topic.clone(), sub);
        match brought? {
            Ok(()) => Ok(()),
            Err(error) => {
                tracing::warn!(%error, "catching a live topic up failed");
                // Changes may be missing and the store does not answer: hand the client the
                // means to resume rather than leave it silently stale.
                self.lagged(
                    socket,
                    topic,
                    "changes may be missing; subscribe again with since = version",
                )
                .await
            }
        }
    }
}

fn is_too_big(error: &axum::Error) -> bool {
    use std::error::Error as _;
    let mut source = error.source();
    while let Some(cause) = source {
        if let Some(tungstenite::Error::Capacity(_)) = cause.downcast_ref::<tungstenite::Error>() {
            return true;
        }
        source = cause.source();
    }
    false
}

/// A write to the socket, bounded by [`WRITE_TIMEOUT`].
async fn write<F>(io: F) -> Result<(), End>
where
    F: std::future::Future<Output = Result<(), axum::Error>>,
{
    match tokio::time::timeout(WRITE_TIMEOUT, io).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) | Err(_) => Err(End::Gone),
    }
}

async fn send(socket: &mut WebSocket, message: Message) -> Result<(), End> {
    write(socket.send(message)).await
}

async fn feed_frame(socket: &mut WebSocket, message: Message) -> Result<(), End> {
    write(socket.feed(message)).await
}

async fn flush(socket: &mut WebSocket) -> Result<(), End> {
    write(socket.flush()).await
}

async fn send_json(socket: &mut WebSocket, value: &serde_json::Value) -> Result<(), End> {
    send(socket, Message::Text(Utf8Bytes::from(value.to_string()))).await
}

#[cfg(test)]
mod tests {
    /// An idle connection holds its session's future: keep it small (the 16 KiB budget per
    /// idle connection also pays for buffers, the socket and the hub's entries).
    #[test]
    fn an_idle_session_future_is_small() {
        fn size_of_future<F: std::future::Future>(_: &F) -> usize {
            std::mem::size_of::<F>()
        }
        let future = async {
            let (connect, socket): (super::Connect, axum::extract::ws::WebSocket) = todo_never();
            super::run(connect, socket).await;
        };
        let size = size_of_future(&future);
        assert!(size < 2048, "the session future is {size} bytes");
    }

    #[allow(clippy::diverging_sub_expression)]
    fn todo_never<T>() -> T {
        unreachable!("only measured, never run")
    }
}
