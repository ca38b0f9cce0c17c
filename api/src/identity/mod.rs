//! Identity: users and their lifecycle, login sessions with rotating refresh tokens, access
//! tokens, service API keys, the audit log, and how a change takes access away everywhere.
//!
//! - [`Identity::login`] checks a password on the bounded [`hashing`] pool behind the
//!   [`throttle`], and opens a session: a family of refresh tokens (RFC 9700, section 4.14:
//!   each refresh spends its token and returns a new one; presenting a spent one revokes the
//!   family). Access tokens ([`tokens`]) are short-lived JWTs naming the session (`sid`) and
//!   the user's token version (`ver`).
//! - Every request's credential (an access token's session, or an API key) is checked against
//!   the store through a small cache ([`Identity::authenticate`]): a revoked session or key, a
//!   disabled, deleted or changed user is refused on the next request on this node.
//! - A change writes an `identity_changes` row; every node polls them every `poll_interval`
//!   and drops what it cached for that user, then re-checks that user's open WebSocket
//!   sessions and closes those that lost access ([`Watch`]). A stale cache lives at most one
//!   poll interval on another node (and the CLI is another process); if a poll fails, the
//!   node drops its whole cache, so it never trusts a cache older than that.

pub mod audit;
pub mod flows;
pub mod hashing;
pub mod keys;
pub mod sessions;
pub mod throttle;
pub mod tokens;
pub mod users;

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use commands::{Engine, Storage};
use domain::values::UserId;
use serde::{Deserialize, Serialize};
use sqlx::{AnyPool, Row};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use hashing::{HashError, Hasher, HashingLimits};
pub use throttle::{Throttle, ThrottleLimits};
pub use tokens::{Claims, TokenKeys};
pub use users::{User, UserError, UserStatus};

use crate::error::ApiError;

/// A user's role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Teacher,
    Admin,
    Service,
}

impl Role {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "teacher" => Some(Self::Teacher),
            "admin" => Some(Self::Admin),
            "service" => Some(Self::Service),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Teacher => "teacher",
            Self::Admin => "admin",
            Self::Service => "service",
        }
    }
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// RFC 3339 (UTC) of a time in milliseconds since the Unix epoch.
pub fn rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// The SHA-256 of a secret token, as lowercase hex: how refresh tokens and API keys are stored.
/// (They are 256-bit random values, so a fast hash is safe; a slow one would let anyone who
/// sends keys spend the server's CPU.)
pub fn token_hash(token: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(token.as_bytes()))
}

/// A random secret of 32 bytes, base64url without padding (43 characters).
pub fn random_secret() -> String {
    use base64::Engine as _;
    use rand::Rng;
    let bytes: [u8; 32] = rand::rng().random();
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// What a request presented: the session of an access token, or an API key (by its id).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Credential {
    Session(String),
    Key(String),
}

/// Who did something, for the audit log.
#[derive(Debug, Clone)]
pub struct Actor {
    pub id: Option<String>,
    pub name: String,
    pub client: Option<String>,
}

impl Actor {
    /// The command line (run by an operator on the host).
    pub fn cli() -> Self {
        let who = std::env::var("USER").unwrap_or_else(|_| "unknown".to_owned());
        Self {
            id: None,
            name: format!("cli:{who}"),
            client: None,
        }
    }

    /// A user acting through the API.
    pub fn user(user: &AuthUser, client: Option<IpAddr>) -> Self {
        Self {
            id: Some(user.id.to_string()),
            name: user.username.clone(),
            client: client.map(|c| c.to_string()),
        }
    }
}

/// The authenticated caller of a request.
#[derive(Debug, Clone)]
pub struct AuthUser {
    pub id: UserId,
    pub username: String,
    /// The current role (read from the store, not from the token).
    pub role: Role,
    pub credential: Credential,
    pub token_version: i64,
    /// When the credential itself ends, in milliseconds since the Unix epoch (a rotated API
    /// key's grace period); `None` when it does not (an access token's own `exp` aside).
    pub credential_expires_at: Option<i64>,
    /// The user's rate-limit tier as stored (read with the rest of the user's state, so it
    /// costs no query of its own); `None`: the default tier, as is a tier no longer configured
    /// ([`crate::edge::ratelimit`]).
    pub tier: Option<String>,
}

impl AuthUser {
    pub fn is_admin(&self) -> bool {
        self.role == Role::Admin
    }

    /// Refuses callers whose role is not one of `allowed`.
    pub fn require(&self, allowed: &[Role], name: &'static str) -> Result<(), ApiError> {
        if allowed.contains(&self.role) {
            Ok(())
        } else {
            Err(ApiError::Forbidden(name))
        }
    }

    /// Whether this caller may see a batch owned by `owner_id`.
    pub fn may_read(&self, owner_id: &str) -> bool {
        self.is_admin() || self.id.to_string() == owner_id
    }
}

/// What a credential grants, as last read from the store.
#[derive(Debug)]
struct Grant {
    user_id: UserId,
    username: String,
    role: Role,
    status: UserStatus,
    token_version: i64,
    /// Milliseconds; `None`: no expiry.
    expires_at: Option<i64>,
    revoked: bool,
    /// API keys only: the stored SHA-256.
    key_hash: Option<String>,
    last_used_at: AtomicI64,
    /// The user's rate-limit tier.
    tier: Option<String>,
}

impl Grant {
    fn usable(&self, now: i64) -> bool {
        !self.revoked
            && self.status == UserStatus::Active
            && self.expires_at.is_none_or(|at| at > now)
    }
}

/// The identity settings.
#[derive(Debug, Clone)]
pub struct IdentityOptions {
    pub refresh_idle: Duration,
    pub refresh_absolute: Duration,
    pub key_rotation_grace: Duration,
    pub poll_interval: Duration,
    pub cache_ttl: Duration,
    pub hashing: HashingLimits,
    pub throttle: ThrottleLimits,
}

/// The shared identity service (cheap to clone).
#[derive(Clone)]
pub struct Identity {
    inner: Arc<Inner>,
}

struct Inner {
    pool: AnyPool,
    engine: Engine,
    tokens: TokenKeys,
    options: IdentityOptions,
    hasher: Hasher,
    throttle: Throttle,
    cache: moka::sync::Cache<Credential, Arc<Grant>>,
    /// Raised by every invalidation: a grant read before one is not cached after it (it may
    /// predate the change).
    invalidations: AtomicU64,
    watchers: Watchers,
    stats: IdentityStats,
    /// Refused requests, tallied for the audit log.
    refusals: Arc<audit::Refusals>,
}

/// Counters for `/metrics`.
#[derive(Debug, Default)]
pub struct IdentityStats {
    pub logins: AtomicU64,
    pub login_failures: AtomicU64,
    pub logins_throttled: AtomicU64,
    pub refresh_reuse: AtomicU64,
    pub sessions_closed: AtomicU64,
}

/// How long an API key's last use may be stale in the store, in milliseconds.
const LAST_USED_EVERY_MS: i64 = 60_000;

impl Identity {
    /// The identity service; call [`Identity::warm_up`] once a runtime runs.
    pub fn new(
        storage: &Storage,
        tokens: TokenKeys,
        options: IdentityOptions,
    ) -> anyhow::Result<Self> {
        let cache = moka::sync::Cache::builder()
            .max_capacity(100_000)
            .time_to_live(options.cache_ttl)
            .support_invalidation_closures()
            .build();
        Ok(Self {
            inner: Arc::new(Inner {
                pool: storage.pool().clone(),
                engine: storage.engine(),
                hasher: Hasher::new(options.hashing)?,
                throttle: Throttle::new(options.throttle),
                tokens,
                options,
                cache,
                invalidations: AtomicU64::new(0),
                watchers: Watchers::default(),
                stats: IdentityStats::default(),
                refusals: Arc::default(),
            }),
        })
    }

    pub fn pool(&self) -> &AnyPool {
        &self.inner.pool
    }

    pub fn tokens(&self) -> &TokenKeys {
        &self.inner.tokens
    }

    pub fn hasher(&self) -> &Hasher {
        &self.inner.hasher
    }

    pub fn options(&self) -> &IdentityOptions {
        &self.inner.options
    }

    pub fn stats(&self) -> &IdentityStats {
        &self.inner.stats
    }

    /// Refused requests waiting to be written to the audit log ([`audit::Refusals`]).
    pub fn refusals(&self) -> &Arc<audit::Refusals> {
        &self.inner.refusals
    }

    pub fn engine(&self) -> Engine {
        self.inner.engine
    }

    /// The caller of a request: an `X-API-Key`, or an `Authorization: Bearer` access token.
    pub async fn authenticate(
        &self,
        headers: &axum::http::HeaderMap,
    ) -> Result<AuthUser, ApiError> {
        if let Some(key) = headers.get("x-api-key") {
            let key = key
                .to_str()
                .map_err(|_| ApiError::Unauthorized("the API key is invalid or revoked"))?;
            return self.authenticate_key(key.trim()).await;
        }
        let token = crate::auth::bearer_token(headers)?
            .ok_or(ApiError::Unauthorized("an access token is required"))?;
        Ok(self.authenticate_token(token).await?.0)
    }

    /// Checks an access token: its signature and times, then its session and the user's
    /// current state in the store.
    pub async fn authenticate_token(&self, token: &str) -> Result<(AuthUser, Claims), ApiError> {
        const REFUSED: &str = "the access token is invalid or expired";
        let claims = self.inner.tokens.verify(token).map_err(|error| {
            tracing::debug!(%error, "access token refused");
            ApiError::Unauthorized(REFUSED)
        })?;
        if !users::is_storable(&claims.sid) || !users::is_storable(&claims.sub) {
            return Err(ApiError::Unauthorized(REFUSED));
        }
        let credential = Credential::Session(claims.sid.clone());
        let grant = self
            .grant(&credential)
            .await?
            .ok_or(ApiError::Unauthorized(REFUSED))?;
        let valid = grant.user_id.to_string() == claims.sub
            && grant.token_version == claims.ver
            && grant.usable(now_ms());
        if !valid {
            tracing::debug!(sid = %claims.sid, "access token of a revoked session or a changed user");
            return Err(ApiError::Unauthorized(
                "access was revoked or changed; log in again",
            ));
        }
        Ok((Self::caller(&grant, credential), claims))
    }

    /// Checks an API key (`efk_<id>_<secret>`).
    pub async fn authenticate_key(&self, key: &str) -> Result<AuthUser, ApiError> {
        const REFUSED: &str = "the API key is invalid or revoked";
        let id = keys::parse(key).ok_or(ApiError::Unauthorized(REFUSED))?;
        let credential = Credential::Key(id.to_owned());
        let grant = self
            .grant(&credential)
            .await?
            .ok_or(ApiError::Unauthorized(REFUSED))?;
        let presented = token_hash(key);
        let matches = grant.key_hash.as_deref().is_some_and(|stored| {
            use subtle::ConstantTimeEq;
            stored.as_bytes().ct_eq(presented.as_bytes()).into()
        });
        let now = now_ms();
        // Keys are for service users: one whose user changed role no longer works.
        if !matches || !grant.usable(now) || grant.role != Role::Service {
            return Err(ApiError::Unauthorized(REFUSED));
        }
        let last = grant.last_used_at.load(Ordering::Relaxed);
        if now - last >= LAST_USED_EVERY_MS
            && grant
                .last_used_at
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            let pool = self.inner.pool.clone();
            let id = id.to_owned();
            tokio::spawn(async move {
                if let Err(error) = keys::touch(&pool, &id, now).await {
                    tracing::warn!(%error, key = %id, "could not record an API key's last use");
                }
            });
        }
        Ok(Self::caller(&grant, credential))
    }

    fn caller(grant: &Grant, credential: Credential) -> AuthUser {
        AuthUser {
            id: grant.user_id,
            username: grant.username.clone(),
            role: grant.role,
            credential,
            token_version: grant.token_version,
            credential_expires_at: grant.expires_at,
            tier: grant.tier.clone(),
        }
    }

    async fn grant(&self, credential: &Credential) -> Result<Option<Arc<Grant>>, ApiError> {
        if let Some(grant) = self.inner.cache.get(credential) {
            return Ok(Some(grant));
        }
        let before = self.inner.invalidations.load(Ordering::SeqCst);
        let grant = self.load(credential).await?.map(Arc::new);
        if let Some(grant) = &grant
            && self.inner.invalidations.load(Ordering::SeqCst) == before
        {
            self.inner.cache.insert(credential.clone(), grant.clone());
        }
        Ok(grant)
    }

    async fn load(&self, credential: &Credential) -> Result<Option<Grant>, ApiError> {
        let row =
            match credential {
                Credential::Session(id) => sqlx::query(
                    "SELECT s.user_id, s.expires_at, s.revoked_at, CAST(NULL AS text) AS key_hash,
                            CAST(0 AS bigint) AS last_used_at,
                            u.username, u.role, u.status, u.token_version, u.tier
                     FROM auth_sessions s JOIN users u ON u.id = s.user_id WHERE s.id = $1",
                )
                .bind(id)
                .fetch_optional(&self.inner.pool)
                .await?,
                Credential::Key(id) => {
                    sqlx::query(
                        "SELECT k.user_id, k.expires_at, k.revoked_at, k.key_hash,
                            COALESCE(k.last_used_at, 0) AS last_used_at,
                            u.username, u.role, u.status, u.token_version, u.tier
                     FROM api_keys k JOIN users u ON u.id = k.user_id WHERE k.id = $1",
                    )
                    .bind(id)
                    .fetch_optional(&self.inner.pool)
                    .await?
                }
            };
        let Some(row) = row else { return Ok(None) };
        let user_id: String = row.try_get("user_id")?;
        let role: String = row.try_get("role")?;
        let status: String = row.try_get("status")?;
        Ok(Some(Grant {
            user_id: user_id
                .parse()
                .map_err(|_| anyhow::anyhow!("a stored user id is not a UUID: {user_id}"))?,
            username: row.try_get("username")?,
            role: Role::parse(&role).ok_or_else(|| anyhow::anyhow!("stored role {role}"))?,
            status: UserStatus::parse(&status)
                .ok_or_else(|| anyhow::anyhow!("stored user status {status}"))?,
            token_version: row.try_get("token_version")?,
            expires_at: row.try_get("expires_at")?,
            revoked: row.try_get::<Option<i64>, _>("revoked_at")?.is_some(),
            key_hash: row.try_get("key_hash")?,
            last_used_at: AtomicI64::new(row.try_get("last_used_at")?),
            tier: row.try_get("tier")?,
        }))
    }

    /// This node forgets what it cached for `user` and closes that user's WebSocket sessions
    /// that no longer have access. Called after every change made here, and by the poller for
    /// changes made elsewhere.
    pub fn changed(&self, user: UserId) {
        self.inner.invalidations.fetch_add(1, Ordering::SeqCst);
        let _ = self
            .inner
            .cache
            .invalidate_entries_if(move |_, grant| grant.user_id == user);
        let watched = self.inner.watchers.of(user);
        if watched.is_empty() {
            return;
        }
        let identity = self.clone();
        tokio::spawn(async move {
            for (credential, version, closer) in watched {
                let keep = match identity.grant(&credential).await {
                    Ok(Some(grant)) => {
                        grant.usable(now_ms())
                            && grant.token_version == version
                            && (matches!(credential, Credential::Session(_))
                                || grant.role == Role::Service)
                    }
                    Ok(None) => false,
                    // The store cannot say: keep the session; the next poll checks again.
                    Err(_) => true,
                };
                if !keep {
                    identity
                        .inner
                        .stats
                        .sessions_closed
                        .fetch_add(1, Ordering::Relaxed);
                    closer.cancel();
                }
            }
        });
    }

    /// [`Identity::changed`] for a user named by its id as text (ids that are not UUIDs name
    /// nobody).
    pub fn changed_user(&self, id: &str) {
        if let Ok(user) = id.parse() {
            self.changed(user);
        }
    }

    /// Registers an open WebSocket session of `user`; its token is cancelled when the user or
    /// the credential loses access. Dropping the [`Watch`] unregisters it.
    pub fn watch(&self, user: &AuthUser) -> Watch {
        self.inner.watchers.add(self.clone(), user)
    }

    /// Polls `identity_changes` every `poll_interval` until `cancel` (see the module docs), and
    /// computes the dummy password hash first, so that no login pays for it.
    pub fn spawn_poller(&self, cancel: CancellationToken, tracker: &TaskTracker) {
        let identity = self.clone();
        tracker.spawn(async move {
            if let Err(error) = identity.hasher().warm_up().await {
                tracing::warn!(%error, "could not compute the dummy password hash yet");
            }
            identity.poll(cancel).await
        });
    }

    async fn poll(self, cancel: CancellationToken) {
        let interval = self.inner.options.poll_interval;
        // Changes commit in any order, so each poll reads back over a window; what was already
        // handled is remembered for as long.
        const WINDOW_MS: i64 = 10_000;
        let mut since = now_ms() - WINDOW_MS;
        let mut seen: HashMap<i64, i64> = HashMap::new();
        let mut pruned_at = 0;
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(interval) => {}
            }
            let started = now_ms();
            let rows = sqlx::query("SELECT seq, at, user_id FROM identity_changes WHERE at > $1")
                .bind(since)
                .fetch_all(&self.inner.pool)
                .await;
            match rows {
                Ok(rows) => {
                    let mut users = HashSet::new();
                    for row in rows {
                        let (Ok(seq), Ok(at), Ok(user)) = (
                            row.try_get::<i64, _>("seq"),
                            row.try_get::<i64, _>("at"),
                            row.try_get::<String, _>("user_id"),
                        ) else {
                            continue;
                        };
                        if seen.insert(seq, at).is_none()
                            && let Ok(user) = user.parse::<UserId>()
                        {
                            users.insert(user);
                        }
                    }
                    for user in users {
                        self.changed(user);
                    }
                    since = started - WINDOW_MS;
                    seen.retain(|_, at| *at > since);
                }
                Err(error) => {
                    // Nothing read means nothing known: drop every cached grant, so that no
                    // request is let in on a cache older than one poll.
                    tracing::warn!(%error, "could not read identity changes; dropping the identity cache");
                    self.inner.invalidations.fetch_add(1, Ordering::SeqCst);
                    self.inner.cache.invalidate_all();
                }
            }
            if started - pruned_at > 300_000 {
                pruned_at = started;
                let _ = sqlx::query("DELETE FROM identity_changes WHERE at < $1")
                    .bind(started - 3_600_000)
                    .execute(&self.inner.pool)
                    .await;
            }
        }
    }

    /// A user's open WebSocket sessions on this node.
    pub fn watched_sessions(&self) -> usize {
        self.inner.watchers.count()
    }
}

/// Writes the identity-change row for `user` (in the caller's transaction).
pub(crate) async fn record_change(
    conn: &mut sqlx::AnyConnection,
    user: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query("INSERT INTO identity_changes (at, user_id) VALUES ($1, $2)")
        .bind(now_ms())
        .bind(user)
        .execute(conn)
        .await?;
    Ok(())
}

type Watched = (Credential, i64, CancellationToken);

#[derive(Default)]
struct Watchers {
    next: AtomicU64,
    by_user: Mutex<HashMap<UserId, HashMap<u64, Watched>>>,
}

impl Watchers {
    fn add(&self, identity: Identity, user: &AuthUser) -> Watch {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let closed = CancellationToken::new();
        self.by_user
            .lock()
            .expect("watchers lock")
            .entry(user.id)
            .or_default()
            .insert(
                id,
                (user.credential.clone(), user.token_version, closed.clone()),
            );
        Watch {
            identity,
            user: user.id,
            id,
            closed,
        }
    }

    fn of(&self, user: UserId) -> Vec<Watched> {
        self.by_user
            .lock()
            .expect("watchers lock")
            .get(&user)
            .map(|sessions| sessions.values().cloned().collect())
            .unwrap_or_default()
    }

    fn update(&self, user: UserId, id: u64, credential: Credential, version: i64) {
        if let Some(entry) = self
            .by_user
            .lock()
            .expect("watchers lock")
            .get_mut(&user)
            .and_then(|sessions| sessions.get_mut(&id))
        {
            entry.0 = credential;
            entry.1 = version;
        }
    }

    fn remove(&self, user: UserId, id: u64) {
        let mut by_user = self.by_user.lock().expect("watchers lock");
        if let Some(sessions) = by_user.get_mut(&user) {
            sessions.remove(&id);
            if sessions.is_empty() {
                by_user.remove(&user);
            }
        }
    }

    fn count(&self) -> usize {
        self.by_user
            .lock()
            .expect("watchers lock")
            .values()
            .map(HashMap::len)
            .sum()
    }
}

/// An open WebSocket session's registration: `closed` is cancelled when its user or credential
/// loses access.
pub struct Watch {
    identity: Identity,
    user: UserId,
    id: u64,
    pub closed: CancellationToken,
}

impl Watch {
    /// The session now holds a fresh access token (an in-band refresh).
    pub fn refreshed(&self, user: &AuthUser) {
        self.identity.inner.watchers.update(
            self.user,
            self.id,
            user.credential.clone(),
            user.token_version,
        );
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.identity.inner.watchers.remove(self.user, self.id);
    }
}
