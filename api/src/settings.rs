//! `Settings`: loaded once, in layers (built-in defaults, the TOML file of `--config` or
//! `ESSAYFLOW_CONFIG`, `ESSAYFLOW_*` environment variables, command-line flags; a later layer
//! wins), with every setting named by one rule in each layer ([`layers`]; docs/configuration.md).
//! Secrets are never printed.
//!
//! Adding a section: a struct deriving serde's `Deserialize` and `Serialize`, with
//! `#[serde(deny_unknown_fields, default)]` and a `Default`, and one field here. Its fields are
//! then settings in the file (`[section]`), the environment (`ESSAYFLOW_SECTION_FIELD`) and as
//! flags (`--section.field`), listed by `essayflow config`. Mark a secret field with
//! `#[serde(serialize_with = "crate::settings::mark::secret")]`, and a map whose keys the
//! operator names with `mark::table`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};

pub mod layers;

pub use layers::{Entry, Inputs, Key, Loaded, Origin, SettingArgs, keys, mark};

#[derive(Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    /// `postgres://...` or `sqlite:...`; empty means the embedded default under `data_dir`.
    #[serde(serialize_with = "mark::secret_url")]
    pub database_url: String,
    /// The address the API listens on (`host:port`; port 0: any free port).
    pub bind: String,
    /// The folder of the embedded database and of the generated JWT secret.
    pub data_dir: PathBuf,
    /// The HS256 signing secret of access tokens, at least 32 characters; unset: generated
    /// once and kept in `data_dir` (SQLite only; required with PostgreSQL).
    #[serde(serialize_with = "mark::secret")]
    pub jwt_secret: Option<String>,
    /// More secrets accepted on access tokens (each at least 32 characters), never used to
    /// sign: a JWT secret rotation in progress (docs/RUNBOOK.md, "Rotate the JWT secret").
    /// Tokens name their secret in `kid`, so each is checked with one secret.
    #[serde(serialize_with = "mark::secret")]
    pub jwt_verify_secrets: Vec<String>,
    /// The `iss` claim of the access tokens issued and required.
    pub jwt_issuer: String,
    /// The `aud` claim of the access tokens issued and required.
    pub jwt_audience: String,
    /// Lifetime of an access token, in seconds (15 minutes by default: clients refresh).
    pub token_ttl_secs: u64,
    /// A pipeline file; the built-in definitions when absent.
    pub pipelines: Option<PathBuf>,
    /// SQLite only: `full` (fsync every commit) or `normal` (durable across process crashes).
    pub sqlite_synchronous: String,
    /// Connections of the database pool, at most.
    pub db_max_connections: u32,
    /// How long a read with `min_position` waits for the read model, in milliseconds.
    pub consistency_wait_ms: u64,
    /// Run the workers (projections, conductor, relay, results ingress) in this process.
    pub run_workers: bool,
    /// Kafka bootstrap servers (`host:port,...`); empty means the in-process bus.
    pub kafka_brokers: String,
    /// The prefix of every topic name (`<prefix>.events.v1`, ...).
    pub topic_prefix: String,
    /// Partitions of the topics created at start-up (at least 1).
    pub kafka_partitions: i32,
    /// Replication factor of the topics created at start-up (at least 1).
    pub kafka_replication: i32,
    /// How long the producer tries to deliver a message before the relay retries the page.
    pub kafka_message_timeout_ms: u64,
    /// DEVELOPMENT ONLY: run the processor simulator in this process.
    pub simulate_processors: bool,
    /// DEVELOPMENT ONLY: how long the in-process simulator takes per essay, in milliseconds.
    pub simulator_latency_ms: u64,
    /// DEVELOPMENT ONLY: the share of essays the in-process simulator fails, from 0 to 1.
    pub simulator_failure_rate: f64,
    /// The largest processor result accepted, in bytes of its `result` as compact JSON (at
    /// least 256). A larger one is refused and nothing is appended: `POST /v1/internal/results`
    /// answers 422 with field `result`; from Kafka it is dead-lettered with `x-error: result: ...`.
    pub max_result_bytes: usize,
    /// A PEM certificate chain: serve HTTPS and WSS (with `tls_key`; both or neither).
    pub tls_cert: Option<PathBuf>,
    /// The PEM private key of `tls_cert`.
    pub tls_key: Option<PathBuf>,
    /// The results ingress waits (at most this long, in milliseconds) for the read models to
    /// apply what it recorded before recording more: one batch's burst of results cannot queue
    /// far ahead of other teachers' changes. 0 turns it off.
    pub ingress_backpressure_ms: u64,
    /// Results of one batch the ingress records in one append, at most.
    pub ingress_group_size: usize,
    /// Events per page of the live projection workers: a page and its changes commit together,
    /// so a smaller page bounds how long one tenant's burst delays everyone's changes.
    pub projection_page_size: i64,
    /// Events per page of a rebuild beside the live model, and of a verification's fold.
    pub rebuild_page_size: i64,
    /// Seconds a rebuild's claim lasts unless renewed: after a crash, another process resumes
    /// it once this has passed.
    pub rebuild_lease_secs: u64,
    /// Verify every projection against a fold of the log this often, in seconds (on one node);
    /// 0: only when asked (`essayflow verify`, `POST /v1/admin/projections/{name}/verify`).
    pub verify_interval_secs: u64,
    /// WebSocket sessions (`GET /v1/ws`), see `api::live`.
    pub ws: WsSettings,
    /// Sessions, refresh tokens, API keys, password hashing and login throttling.
    pub auth: AuthSettings,
    /// The HTTP edge: connection and request limits, timeouts, CORS, compression, shutdown.
    pub http: HttpSettings,
    /// HTTP rate limits: budgets, tiers, trusted proxies (`[rate_limit]`; docs/rate-limits.md).
    pub rate_limit: crate::edge::ratelimit::RateLimitSettings,
    /// The database circuit breaker's bounds and the operations endpoints (`[ops]`;
    /// docs/operations-endpoints.md).
    pub ops: crate::edge::breaker::OpsSettings,
    /// Trace export over OTLP (`[telemetry]`; docs/tracing.md).
    pub telemetry: crate::telemetry::TelemetrySettings,
}

/// The HTTP edge's settings (see `api::edge` and `api::server`).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpSettings {
    /// A client must send a request's whole header within this many milliseconds of the
    /// connection's opening or of the previous answer, else the connection closes: the bound
    /// on slow headers and on idle kept-alive connections alike.
    pub header_read_timeout_ms: u64,
    /// A write to a client that makes no progress for this many seconds (a client that stops
    /// reading its answer) closes the connection, so a slow reader cannot hold a slot.
    pub write_timeout_secs: u64,
    /// A request not answered within this many seconds gets 503 problem+json (`timeout`).
    pub request_timeout_secs: u64,
    /// Requests handled at once by this node; past it, 503 problem+json (`overloaded`) with
    /// `Retry-After` at once (load shedding, never a queue).
    pub max_in_flight: usize,
    /// Open HTTP connections (TLS handshakes included) per node; past it, a new connection is
    /// answered 503 problem+json (`too-many-connections`) and closed.
    pub max_connections: usize,
    /// On shutdown, the longest wait for requests, WebSockets, workers and the database
    /// pool to finish, in seconds; then the process exits anyway.
    pub drain_timeout_secs: u64,
    /// Origins (`https://app.example.org`) allowed to call the API from a browser (CORS);
    /// empty: none. `*` is refused: name the frontends.
    pub cors_origins: Vec<String>,
    /// How long a browser may cache a CORS preflight answer, in seconds.
    pub cors_max_age_secs: u64,
    /// Answers at least this large (bytes) are compressed when the client accepts gzip, br or
    /// zstd.
    pub compression_min_bytes: u16,
    /// `Strict-Transport-Security: max-age=` when serving TLS (seconds; 0: no header).
    pub hsts_max_age_secs: u64,
}

impl Default for HttpSettings {
    fn default() -> Self {
        Self {
            header_read_timeout_ms: 10_000,
            write_timeout_secs: 30,
            request_timeout_secs: 30,
            max_in_flight: 2048,
            max_connections: 10_000,
            drain_timeout_secs: 10,
            cors_origins: Vec::new(),
            cors_max_age_secs: 600,
            compression_min_bytes: 1024,
            hsts_max_age_secs: 31_536_000,
        }
    }
}

/// The identity lifecycle's settings (see `api::identity`). Durations in seconds unless the
/// name says otherwise.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthSettings {
    /// A refresh token unused for this long lapses (and with it, its session).
    pub refresh_idle_secs: u64,
    /// No session lasts longer than this, however often it is refreshed.
    pub refresh_absolute_secs: u64,
    /// A rotated API key keeps working this long beside its replacement.
    pub key_rotation_grace_secs: u64,
    /// How often each node reads the identity changes made elsewhere (other nodes, the CLI),
    /// in milliseconds: the longest a disabled user, a revoked session or key can still be
    /// let in by another node.
    pub identity_poll_interval_ms: u64,
    /// How long a credential's checked state is cached (a safety net; changes invalidate it).
    pub identity_cache_ttl_secs: u64,
    /// Password hashes computed at once (each takes a core and `hash_memory_kib`); 0: half the
    /// cores, at least 1.
    pub hash_workers: usize,
    /// Logins waiting for a hashing worker; past it, 503 with `Retry-After` at once.
    pub hash_queue: usize,
    /// The longest a login waits for a hashing worker, in milliseconds (then 503).
    pub hash_deadline_ms: u64,
    /// argon2id memory cost of new password hashes, in KiB (OWASP's minimum: 19 MiB).
    pub hash_memory_kib: u32,
    /// argon2id iterations of new password hashes (OWASP's minimum: 2).
    pub hash_iterations: u32,
    /// argon2id lanes of new password hashes (OWASP's minimum: 1).
    pub hash_lanes: u32,
    /// Failed logins allowed for one account from one address before growing delays.
    pub login_free_failures_per_account: u32,
    /// Failed logins allowed for one account from all addresses together before growing
    /// delays.
    pub login_free_failures_per_account_total: u32,
    /// Failed logins allowed from one address across accounts before growing delays.
    pub login_free_failures_per_address: u32,
    /// The first delay after the free failures, doubled by each further failure, at most
    /// `login_max_delay_secs`; forgotten after `login_forget_secs` without attempts.
    pub login_base_delay_ms: u64,
    /// The longest delay between failed logins, in seconds.
    pub login_max_delay_secs: u64,
    /// A throttled key (account, address) without attempts for this long is forgotten.
    pub login_forget_secs: u64,
}

impl Default for AuthSettings {
    fn default() -> Self {
        Self {
            refresh_idle_secs: 7 * 24 * 3600,
            refresh_absolute_secs: 30 * 24 * 3600,
            key_rotation_grace_secs: 24 * 3600,
            identity_poll_interval_ms: 1000,
            identity_cache_ttl_secs: 30,
            hash_workers: 0,
            hash_queue: 64,
            hash_deadline_ms: 2000,
            hash_memory_kib: argon2::Params::DEFAULT_M_COST,
            hash_iterations: argon2::Params::DEFAULT_T_COST,
            hash_lanes: argon2::Params::DEFAULT_P_COST,
            login_free_failures_per_account: 5,
            login_free_failures_per_account_total: 50,
            login_free_failures_per_address: 20,
            login_base_delay_ms: 1000,
            login_max_delay_secs: 900,
            login_forget_secs: 900,
        }
    }
}

impl AuthSettings {
    /// The identity service's options.
    pub fn options(&self) -> crate::identity::IdentityOptions {
        let workers = if self.hash_workers == 0 {
            std::thread::available_parallelism().map_or(1, |n| (n.get() / 2).max(1))
        } else {
            self.hash_workers
        };
        crate::identity::IdentityOptions {
            refresh_idle: Duration::from_secs(self.refresh_idle_secs),
            refresh_absolute: Duration::from_secs(self.refresh_absolute_secs),
            key_rotation_grace: Duration::from_secs(self.key_rotation_grace_secs),
            poll_interval: Duration::from_millis(self.identity_poll_interval_ms),
            cache_ttl: Duration::from_secs(self.identity_cache_ttl_secs),
            hashing: crate::identity::HashingLimits {
                workers,
                queue: self.hash_queue,
                deadline: Duration::from_millis(self.hash_deadline_ms),
                memory_kib: self.hash_memory_kib,
                iterations: self.hash_iterations,
                lanes: self.hash_lanes,
            },
            throttle: crate::identity::ThrottleLimits {
                free_per_account: self.login_free_failures_per_account,
                free_per_account_total: self.login_free_failures_per_account_total,
                free_per_address: self.login_free_failures_per_address,
                base_delay: Duration::from_millis(self.login_base_delay_ms),
                max_delay: Duration::from_secs(self.login_max_delay_secs),
                forget_after: Duration::from_secs(self.login_forget_secs),
            },
        }
    }
}

/// Limits and timers of WebSocket sessions.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct WsSettings {
    /// The server pings this often.
    pub ping_interval_secs: u64,
    /// A connection that sends nothing (not even a pong) for this long is closed.
    pub idle_timeout_secs: u64,
    /// Subscriptions one connection may hold at once.
    pub max_subscriptions: usize,
    /// Client messages per second, sustained.
    pub messages_per_second: u32,
    /// Client messages allowed in a burst above the sustained rate.
    pub message_burst: u32,
    /// Largest client message, in bytes; larger ones close the connection (1009).
    pub max_message_bytes: usize,
    /// Messages waiting to be written to one client; past it the oldest changes are dropped.
    pub send_buffer: usize,
    /// The same limit in bytes of queued frames.
    pub send_buffer_bytes: usize,
    /// How long changes are kept for clients that resume with `since`.
    pub history_secs: u64,
    /// The most changes a resume (`since`) replays from the history; a client further behind
    /// gets a snapshot.
    pub max_replay: i64,
    /// WebSocket connections per node; past it, the handshake is answered 503 problem+json
    /// (`too-many-websockets`) with `Retry-After`.
    pub max_connections: usize,
    /// WebSocket connections per user (or API key's user) on one node; past it, 429
    /// problem+json (`too-many-websockets`).
    pub max_connections_per_user: usize,
}

impl Default for WsSettings {
    fn default() -> Self {
        Self {
            ping_interval_secs: 30,
            idle_timeout_secs: 300,
            max_subscriptions: 100,
            messages_per_second: 10,
            message_burst: 20,
            max_message_bytes: 4096,
            send_buffer: 1024,
            send_buffer_bytes: 16 * 1024 * 1024,
            history_secs: 900,
            max_replay: 10_000,
            max_connections: 20_000,
            max_connections_per_user: 32,
        }
    }
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            database_url: String::new(),
            bind: "127.0.0.1:8080".to_owned(),
            data_dir: PathBuf::from("data"),
            jwt_secret: None,
            jwt_verify_secrets: Vec::new(),
            jwt_issuer: "essayflow".to_owned(),
            jwt_audience: "essayflow-api".to_owned(),
            token_ttl_secs: 900,
            pipelines: None,
            sqlite_synchronous: "full".to_owned(),
            db_max_connections: 32,
            consistency_wait_ms: 5000,
            run_workers: true,
            kafka_brokers: String::new(),
            topic_prefix: "essayflow".to_owned(),
            kafka_partitions: 3,
            kafka_replication: 1,
            kafka_message_timeout_ms: 30_000,
            simulate_processors: false,
            simulator_latency_ms: 200,
            simulator_failure_rate: 0.0,
            max_result_bytes: commands::messages::DEFAULT_MAX_RESULT_BYTES,
            tls_cert: None,
            tls_key: None,
            ingress_backpressure_ms: 2000,
            ingress_group_size: commands::ingress::DEFAULT_GROUP,
            projection_page_size: 500,
            rebuild_page_size: 5000,
            rebuild_lease_secs: 30,
            verify_interval_secs: 0,
            ws: WsSettings::default(),
            auth: AuthSettings::default(),
            http: HttpSettings::default(),
            rate_limit: Default::default(),
            ops: Default::default(),
            telemetry: Default::default(),
        }
    }
}

impl std::fmt::Debug for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Settings")
            .field("database_url", &redact_url(&self.database_url))
            .field("bind", &self.bind)
            .field("data_dir", &self.data_dir)
            .field(
                "jwt_secret",
                &self.jwt_secret.as_ref().map(|_| "<redacted>"),
            )
            .field("pipelines", &self.pipelines)
            .field("sqlite_synchronous", &self.sqlite_synchronous)
            .field("kafka_brokers", &self.kafka_brokers)
            .field("topic_prefix", &self.topic_prefix)
            .field("simulate_processors", &self.simulate_processors)
            .field("max_result_bytes", &self.max_result_bytes)
            .field("tls_cert", &self.tls_cert)
            .field("ws", &self.ws)
            .field("auth", &self.auth)
            .field("http", &self.http)
            .field("ops", &self.ops)
            .field("telemetry", &self.telemetry)
            .finish_non_exhaustive()
    }
}

use layers::redact_url;

impl Settings {
    /// How rebuilds run.
    pub fn rebuild_options(&self) -> projections::rebuild::RebuildOptions {
        projections::rebuild::RebuildOptions {
            page_size: self.rebuild_page_size,
            lease: Duration::from_secs(self.rebuild_lease_secs),
        }
    }

    /// How verifications run.
    pub fn verify_options(&self) -> projections::verify::VerifyOptions {
        projections::verify::VerifyOptions {
            page_size: self.rebuild_page_size,
            ..Default::default()
        }
    }

    /// Loads the layers: the defaults, the configuration file (`--config`, else
    /// `ESSAYFLOW_CONFIG`), the process's `ESSAYFLOW_*` environment and `flags`; then
    /// [`Settings::check`]. Errors name the key, the layer and the culprit ([`layers`]).
    pub fn load(flags: &SettingArgs) -> anyhow::Result<Loaded> {
        layers::load(&Inputs::from_process(flags)?)
    }

    /// Refuses values that cannot work, with the setting's name.
    pub fn check(&self) -> anyhow::Result<()> {
        if self.jwt_verify_secrets.iter().any(|s| s.len() < 32) {
            bail!(
                "jwt_verify_secrets (ESSAYFLOW_JWT_VERIFY_SECRETS): each must be at least 32 characters"
            );
        }
        if self.jwt_verify_secrets.len() > 4 {
            bail!(
                "jwt_verify_secrets (ESSAYFLOW_JWT_VERIFY_SECRETS): at most 4 (a rotation needs one)"
            );
        }
        if !matches!(self.sqlite_synchronous.as_str(), "full" | "normal") {
            bail!("sqlite_synchronous must be \"full\" or \"normal\"");
        }
        let prefix_ok = !self.topic_prefix.is_empty()
            && self.topic_prefix.len() <= 100
            && self
                .topic_prefix
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
        if !prefix_ok {
            bail!("topic_prefix must be 1 to 100 characters of [A-Za-z0-9._-]");
        }
        if self.kafka_partitions < 1 || self.kafka_replication < 1 {
            bail!("kafka_partitions and kafka_replication must be at least 1");
        }
        if !(0.0..=1.0).contains(&self.simulator_failure_rate) {
            bail!("simulator_failure_rate must be from 0 to 1");
        }
        if self.max_result_bytes < commands::messages::MIN_MAX_RESULT_BYTES {
            bail!(
                "max_result_bytes must be at least {}",
                commands::messages::MIN_MAX_RESULT_BYTES
            );
        }
        if !(1..=256).contains(&self.ingress_group_size) {
            bail!("ingress_group_size must be from 1 to 256");
        }
        if !(1..=10_000).contains(&self.projection_page_size) {
            bail!("projection_page_size must be from 1 to 10000");
        }
        if !(1..=100_000).contains(&self.rebuild_page_size) {
            bail!("rebuild_page_size must be from 1 to 100000");
        }
        if self.rebuild_lease_secs < 2 {
            bail!("rebuild_lease_secs must be at least 2");
        }
        if self.tls_cert.is_some() != self.tls_key.is_some() {
            bail!(
                "tls_cert and tls_key (ESSAYFLOW_TLS_CERT, ESSAYFLOW_TLS_KEY) must be set together"
            );
        }
        let auth = &self.auth;
        if self.token_ttl_secs == 0 || self.token_ttl_secs > 86_400 {
            bail!("token_ttl_secs must be from 1 to 86400");
        }
        if auth.refresh_idle_secs == 0 || auth.refresh_absolute_secs < auth.refresh_idle_secs {
            bail!("auth: refresh_idle_secs must be positive and at most refresh_absolute_secs");
        }
        if auth.identity_poll_interval_ms == 0
            || auth.identity_cache_ttl_secs == 0
            || auth.hash_deadline_ms == 0
        {
            bail!(
                "auth: identity_poll_interval_ms, identity_cache_ttl_secs and hash_deadline_ms must be positive"
            );
        }
        if auth.login_free_failures_per_account == 0
            || auth.login_free_failures_per_account_total == 0
            || auth.login_free_failures_per_address == 0
        {
            bail!("auth: the free login failures must be at least 1");
        }
        argon2::Params::new(
            auth.hash_memory_kib,
            auth.hash_iterations,
            auth.hash_lanes,
            None,
        )
        .map_err(|e| anyhow::anyhow!("auth: argon2 parameters: {e}"))?;
        let ws = &self.ws;
        if ws.ping_interval_secs == 0
            || ws.idle_timeout_secs == 0
            || ws.max_subscriptions == 0
            || ws.messages_per_second == 0
            || ws.message_burst == 0
            || ws.max_message_bytes < 256
            || ws.send_buffer < 4
            || ws.send_buffer_bytes < 64 * 1024
            || ws.max_replay < 0
            || ws.max_connections == 0
            || ws.max_connections_per_user == 0
        {
            bail!(
                "ws settings: intervals, limits and rates must be positive, \
                 max_message_bytes at least 256, send_buffer at least 4 \
                 and send_buffer_bytes at least 65536"
            );
        }
        let http = &self.http;
        if http.header_read_timeout_ms == 0
            || http.write_timeout_secs == 0
            || http.request_timeout_secs == 0
            || http.max_in_flight == 0
            || http.max_connections == 0
            || http.drain_timeout_secs == 0
        {
            bail!(
                "http settings: timeouts, max_in_flight, max_connections and drain_timeout_secs \
                 must be positive"
            );
        }
        crate::edge::cors_origins(&http.cors_origins)?;
        self.rate_limit.check()?;
        self.ops.check()?;
        self.telemetry.check()?;
        Ok(())
    }

    /// The database URL, with the embedded default resolved.
    pub fn database_url(&self) -> String {
        if self.database_url.is_empty() {
            format!("sqlite:{}", self.data_dir.join("essayflow.db").display())
        } else {
            self.database_url.clone()
        }
    }

    /// Whether Kafka is configured (otherwise the in-process bus is used).
    pub fn uses_kafka(&self) -> bool {
        !self.kafka_brokers.trim().is_empty()
    }

    pub fn is_embedded(&self) -> bool {
        commands::normalize_scheme(&self.database_url()).starts_with("sqlite:")
    }

    pub fn consistency_wait(&self) -> Duration {
        Duration::from_millis(self.consistency_wait_ms)
    }

    /// The JWT signing secret: configured, or (embedded mode only) generated once and kept in
    /// the data folder with owner-only permissions.
    pub fn jwt_secret(&self) -> anyhow::Result<Vec<u8>> {
        if let Some(secret) = &self.jwt_secret {
            if secret.len() < 32 {
                bail!("jwt_secret (ESSAYFLOW_JWT_SECRET) must be at least 32 characters");
            }
            return Ok(secret.as_bytes().to_vec());
        }
        if !self.is_embedded() {
            bail!("jwt_secret (ESSAYFLOW_JWT_SECRET) must be set when PostgreSQL is used");
        }
        let path = self.data_dir.join("jwt-secret");
        let existing = match std::fs::read_to_string(&path) {
            Ok(existing) => Some(existing),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => None,
            // Unreadable is not missing: a new secret would silently log everyone out.
            Err(error) => {
                return Err(error).with_context(|| format!("reading {}", path.display()));
            }
        };
        if let Some(existing) = existing {
            let existing = existing.trim();
            if existing.len() < 32 {
                bail!(
                    "{} holds a secret shorter than 32 characters; delete it to generate a new one",
                    path.display()
                );
            }
            return Ok(existing.as_bytes().to_vec());
        }
        std::fs::create_dir_all(&self.data_dir)
            .with_context(|| format!("creating {}", self.data_dir.display()))?;
        let secret: String = {
            use rand::Rng;
            let bytes: [u8; 32] = rand::rng().random();
            bytes.iter().map(|b| format!("{b:02x}")).collect()
        };
        write_private(&path, &secret)?;
        tracing::info!(path = %path.display(), "generated a JWT secret for embedded mode");
        Ok(secret.into_bytes())
    }
}

/// Writes a file readable by its owner only, all at once: a temporary file is written and
/// synced, then renamed into place, so a crash never leaves a short secret behind.
#[cfg(unix)]
fn write_private(path: &Path, contents: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let temporary = path.with_extension("tmp");
    let _ = std::fs::remove_file(&temporary);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&temporary)
        .with_context(|| format!("creating {}", temporary.display()))?;
    file.write_all(contents.as_bytes())?;
    file.sync_all()?;
    std::fs::rename(&temporary, path).with_context(|| format!("creating {}", path.display()))?;
    Ok(())
}

#[cfg(not(unix))]
fn write_private(path: &Path, contents: &str) -> anyhow::Result<()> {
    std::fs::write(path, contents).with_context(|| format!("creating {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    use layers::{Inputs, Origin, env_name, flag_name};

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(name, value)| ((*name).to_owned(), (*value).to_owned()))
            .collect()
    }

    /// A configuration file with `text`, removed when dropped.
    struct TempFile(PathBuf);

    impl TempFile {
        fn new(name: &str, text: &str) -> Self {
            let path = std::env::temp_dir().join(format!(
                "essayflow-settings-{}-{name}.toml",
                std::process::id()
            ));
            std::fs::write(&path, text).expect("test setup");
            Self(path)
        }
    }

    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn load_error(inputs: &Inputs) -> String {
        match layers::load(inputs) {
            Ok(_) => panic!("the configuration was accepted"),
            Err(error) => format!("{error:#}"),
        }
    }

    #[test]
    fn each_layer_overrides_the_one_below_setting_by_setting() {
        let file = TempFile::new(
            "layers",
            "bind = \"0.0.0.0:1\"\ntoken_ttl_secs = 600\n\
             [ws]\nping_interval_secs = 5\nidle_timeout_secs = 50\n\
             [rate_limit.anonymous]\nread = \"10/second\"\n",
        );
        let loaded = layers::load(&Inputs {
            file: Some(file.0.clone()),
            env: env(&[
                ("ESSAYFLOW_BIND", "0.0.0.0:2"),
                ("ESSAYFLOW_WS_PING_INTERVAL_SECS", "6"),
                ("ESSAYFLOW_HTTP_WRITE_TIMEOUT_SECS", "7"),
            ]),
            flags: vec![("ws.ping_interval_secs".to_owned(), "8".to_owned())],
        })
        .expect("valid");
        let settings = &loaded.settings;
        assert_eq!(settings.token_ttl_secs, 600, "file over default");
        assert_eq!(settings.ws.idle_timeout_secs, 50, "file over default");
        assert_eq!(settings.bind, "0.0.0.0:2", "env over file");
        assert_eq!(settings.http.write_timeout_secs, 7, "env over default");
        assert_eq!(settings.ws.ping_interval_secs, 8, "flag over env and file");
        assert_eq!(settings.rate_limit.anonymous.read.to_string(), "10/second");
        assert_eq!(
            settings.rate_limit.anonymous.login.to_string(),
            "120/minute",
            "the rest of a section keeps its defaults"
        );
        let origin = |path: &str| loaded.origin(layers::key(path).expect("a setting"));
        assert_eq!(origin("token_ttl_secs"), Origin::File(file.0.clone()));
        assert_eq!(
            origin("rate_limit.anonymous.read"),
            Origin::File(file.0.clone())
        );
        assert_eq!(origin("bind"), Origin::Env("ESSAYFLOW_BIND".to_owned()));
        assert_eq!(
            origin("ws.ping_interval_secs"),
            Origin::Flag("--ws.ping-interval-secs".to_owned())
        );
        assert_eq!(origin("ws.max_replay"), Origin::Default);
        assert_eq!(origin("rate_limit.anonymous.login"), Origin::Default);
    }

    #[test]
    fn every_setting_has_one_name_per_layer_derived_from_its_path() {
        assert_eq!(
            env_name("ws.ping_interval_secs"),
            "ESSAYFLOW_WS_PING_INTERVAL_SECS"
        );
        assert_eq!(flag_name("ws.ping_interval_secs"), "ws.ping-interval-secs");
        let paths: Vec<&str> = keys().iter().map(|k| k.path.as_str()).collect();
        // Top-level, nested, and settings that had no environment variable before.
        for expected in [
            "database_url",
            "jwt_issuer",
            "run_workers",
            "http.write_timeout_secs",
            "http.drain_timeout_secs",
            "auth.refresh_idle_secs",
            "rate_limit.anonymous.login",
            "rate_limit.tiers",
            "ops.db_probe_timeout_ms",
        ] {
            assert!(paths.contains(&expected), "{expected} in {paths:?}");
        }
        assert!(
            !paths.iter().any(|p| p.starts_with("rate_limit.tiers.")),
            "a table is one setting"
        );
        assert!(!paths.contains(&"ws"), "a section is not a setting");
        for key in keys() {
            assert_eq!(key.env, env_name(&key.path));
            assert_eq!(key.flag, flag_name(&key.path));
        }
        assert!(
            layers::ambiguous_names(keys()).is_empty(),
            "{:?}",
            layers::ambiguous_names(keys())
        );
        for (_, new) in layers::renamed() {
            assert!(
                keys().iter().any(|k| &k.env == new),
                "{new} names a setting"
            );
        }
    }

    #[test]
    fn an_unknown_key_in_the_file_is_named_with_the_file_and_a_suggestion() {
        let file = TempFile::new(
            "unknown",
            "[ws]\nping_interval_sec = 5\n[nonsense]\nx = 1\n",
        );
        let error = load_error(&Inputs {
            file: Some(file.0.clone()),
            ..Default::default()
        });
        assert!(error.contains(&file.0.display().to_string()), "{error}");
        assert!(
            error.contains(
                "unknown key `ws.ping_interval_sec`; did you mean `ws.ping_interval_secs`?"
            ),
            "{error}"
        );
        assert!(error.contains("unknown key `nonsense`"), "{error}");
        let section = TempFile::new("section", "ws = 5\n");
        let error = load_error(&Inputs {
            file: Some(section.0.clone()),
            ..Default::default()
        });
        assert!(error.contains("`ws` is a section"), "{error}");
        let broken = TempFile::new("broken", "jwt_secret = \"unterminated-secret\n");
        let error = load_error(&Inputs {
            file: Some(broken.0.clone()),
            ..Default::default()
        });
        assert!(error.contains("not valid TOML at line 1"), "{error}");
        assert!(!error.contains("unterminated-secret"), "{error}");
    }

    #[test]
    fn an_unknown_essayflow_variable_is_an_error_but_the_tools_own_are_not() {
        let error = load_error(&Inputs {
            env: env(&[("ESSAYFLOW_WS_PING_INTERVAL_SEC", "5")]),
            ..Default::default()
        });
        assert!(
            error.contains(
                "unknown environment variable ESSAYFLOW_WS_PING_INTERVAL_SEC; \
                 did you mean ESSAYFLOW_WS_PING_INTERVAL_SECS?"
            ),
            "{error}"
        );
        let error = load_error(&Inputs {
            env: env(&[("ESSAYFLOW_SHUTDOWN_DRAIN_SECS", "5")]),
            ..Default::default()
        });
        assert!(
            error.contains("renamed ESSAYFLOW_HTTP_DRAIN_TIMEOUT_SECS"),
            "{error}"
        );
        let loaded = layers::load(&Inputs {
            env: env(&[
                ("ESSAYFLOW_CONFIG", "/nowhere"),
                ("ESSAYFLOW_LOG", "debug"),
                ("ESSAYFLOW_LOG_FORMAT", "json"),
                ("ESSAYFLOW_TEST_PG_URL", "postgres://x"),
                ("ESSAYFLOW_BENCH_TOKEN", "t"),
                ("ESSAYFLOW_TANSU_BIN", "/bin/true"),
                ("OTHER_VARIABLE", "ignored"),
            ]),
            ..Default::default()
        });
        assert!(loaded.is_ok(), "{:?}", loaded.err());
    }

    #[test]
    fn a_bad_value_names_the_key_the_layer_the_type_and_the_value_but_never_a_secret() {
        let error = load_error(&Inputs {
            env: env(&[("ESSAYFLOW_TOKEN_TTL_SECS", "soon")]),
            ..Default::default()
        });
        for part in [
            "token_ttl_secs",
            "env ESSAYFLOW_TOKEN_TTL_SECS",
            "u64",
            "soon",
        ] {
            assert!(error.contains(part), "{part} in {error}");
        }
        let error = load_error(&Inputs {
            flags: vec![("http.compression_min_bytes".to_owned(), "70000".to_owned())],
            ..Default::default()
        });
        for part in [
            "http.compression_min_bytes",
            "flag --http.compression-min-bytes",
            "70000",
        ] {
            assert!(error.contains(part), "{part} in {error}");
        }
        let file = TempFile::new("secret", "jwt_secret = 98765432109876543210\n");
        let error = load_error(&Inputs {
            file: Some(file.0.clone()),
            ..Default::default()
        });
        assert!(error.contains("jwt_secret"), "{error}");
        assert!(error.contains(&file.0.display().to_string()), "{error}");
        assert!(!error.contains("98765432109876543210"), "{error}");
        // The semantic checks still apply, whichever layer set the value.
        let error = load_error(&Inputs {
            env: env(&[("ESSAYFLOW_MAX_RESULT_BYTES", "255")]),
            ..Default::default()
        });
        assert!(error.contains("max_result_bytes"), "{error}");
        let error = load_error(&Inputs {
            flags: vec![("ws.send_buffer".to_owned(), "1".to_owned())],
            ..Default::default()
        });
        assert!(error.contains("send_buffer"), "{error}");
    }

    #[test]
    fn lists_options_and_booleans_are_read_from_text() {
        let loaded = layers::load(&Inputs {
            env: env(&[
                (
                    "ESSAYFLOW_HTTP_CORS_ORIGINS",
                    "https://a.example, https://b.example,",
                ),
                ("ESSAYFLOW_TLS_CERT", ""),
                ("ESSAYFLOW_TLS_KEY", ""),
                ("ESSAYFLOW_PIPELINES", "config/pipelines.toml"),
                ("ESSAYFLOW_RUN_WORKERS", "no"),
            ]),
            flags: vec![("simulate_processors".to_owned(), "true".to_owned())],
            ..Default::default()
        })
        .expect("valid");
        let settings = loaded.settings;
        assert_eq!(
            settings.http.cors_origins,
            ["https://a.example", "https://b.example"]
        );
        assert_eq!(settings.tls_cert, None, "empty: none");
        assert_eq!(
            settings.pipelines,
            Some(PathBuf::from("config/pipelines.toml"))
        );
        assert!(!settings.run_workers);
        assert!(settings.simulate_processors);
    }

    #[test]
    fn a_table_from_a_higher_layer_replaces_the_lower_one_whole() {
        let file = TempFile::new(
            "tiers",
            "[rate_limit]\ndefault_tier = \"basic\"\n\
             [rate_limit.tiers.basic]\nread = \"5/minute\"\ncommand = \"1/minute\"\n",
        );
        let loaded = layers::load(&Inputs {
            file: Some(file.0.clone()),
            ..Default::default()
        })
        .expect("valid");
        assert_eq!(
            loaded.settings.rate_limit.tiers.keys().collect::<Vec<_>>(),
            ["basic"]
        );
        let error = load_error(&Inputs {
            file: Some(file.0.clone()),
            env: env(&[(
                "ESSAYFLOW_RATE_LIMIT_TIERS",
                r#"{ gold = { read = "1/hour", command = "1/hour" } }"#,
            )]),
            ..Default::default()
        });
        assert!(
            error.contains("rate_limit.default_tier") && error.contains("configured: gold"),
            "the environment's table replaced the file's: {error}"
        );
    }

    #[test]
    fn the_effective_configuration_redacts_secrets_and_passwords() {
        let loaded = layers::load(&Inputs {
            env: env(&[
                (
                    "ESSAYFLOW_DATABASE_URL",
                    "postgres://me:hunter2@db/essayflow?sslpassword=p4ss&application_name=x",
                ),
                ("ESSAYFLOW_JWT_SECRET", &"s".repeat(40)),
            ]),
            ..Default::default()
        })
        .expect("valid");
        let entries = loaded.entries().expect("entries");
        let printed = serde_json::to_string(&entries).expect("json");
        assert!(!printed.contains("hunter2"), "{printed}");
        assert!(!printed.contains("p4ss"), "{printed}");
        assert!(!printed.contains(&"s".repeat(40)), "{printed}");
        let value = |key: &str| {
            entries
                .iter()
                .find(|e| e.key == key)
                .map(|e| e.value.clone())
                .expect("listed")
        };
        assert_eq!(value("jwt_secret"), "<redacted>");
        // An empty list of secrets shows as empty; a set one is redacted as a whole.
        assert_eq!(value("jwt_verify_secrets"), serde_json::json!([]));
        let rotating = layers::load(&Inputs {
            env: env(&[("ESSAYFLOW_JWT_VERIFY_SECRETS", &"v".repeat(40))]),
            ..Default::default()
        })
        .expect("valid");
        let printed = serde_json::to_string(&rotating.entries().expect("entries")).expect("json");
        assert!(!printed.contains(&"v".repeat(40)), "{printed}");
        assert!(
            printed.contains(r#""key":"jwt_verify_secrets","value":"<redacted>""#),
            "{printed}"
        );
        assert_eq!(
            value("database_url"),
            "postgres://me:<redacted>@db/essayflow?sslpassword=<redacted>&application_name=x"
        );
        assert_eq!(value("bind"), "127.0.0.1:8080", "the rest as it is");
        assert_eq!(entries.len(), keys().len(), "every setting");
        let unset = layers::load(&Inputs::default()).expect("valid");
        let entries = unset.entries().expect("entries");
        let jwt = entries
            .iter()
            .find(|e| e.key == "jwt_secret")
            .expect("listed");
        assert_eq!(jwt.value, serde_json::Value::Null, "unset is not hidden");
        assert_eq!(layers::redact_url("sqlite:data/x.db"), "sqlite:data/x.db");
        assert_eq!(
            layers::redact_url("postgres://a:b@c@host/db"),
            "postgres://a:<redacted>@host/db",
            "an unencoded @ over-redacts"
        );
    }

    #[test]
    fn docs_configuration_lists_every_setting_with_its_names_and_default() {
        let doc = include_str!("../../docs/configuration.md");
        for key in keys() {
            let row = format!("| `{}` | `{}` | `--{}` |", key.path, key.env, key.flag);
            let line = doc
                .lines()
                .find(|line| line.starts_with(&row))
                .unwrap_or_else(|| panic!("docs/configuration.md has no row {row}"));
            let default = layers::default_text(key);
            assert!(
                line.contains(&format!("| {default} |")),
                "the default of {} is {default}: {line}",
                key.path
            );
        }
    }

    #[test]
    fn an_unreadable_secret_file_is_an_error_not_a_new_secret() {
        let dir = std::env::temp_dir().join(format!("essayflow-secret-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        // A directory where the file should be: it exists but cannot be read as a file.
        std::fs::create_dir_all(dir.join("jwt-secret")).expect("test setup");
        let settings = Settings {
            data_dir: dir.clone(),
            ..Settings::default()
        };
        let error = settings.jwt_secret().expect_err("refused");
        assert!(format!("{error:#}").contains("jwt-secret"), "{error:#}");
        assert!(dir.join("jwt-secret").is_dir(), "nothing was replaced");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_engine_is_told_by_the_url_scheme_in_any_case() {
        for (url, embedded) in [
            ("SQLite:/tmp/x.db", true),
            ("sqlite:/tmp/x.db", true),
            ("POSTGRES://localhost/db", false),
        ] {
            let settings = Settings {
                database_url: url.to_owned(),
                ..Settings::default()
            };
            assert_eq!(settings.is_embedded(), embedded, "{url}");
        }
    }

    #[test]
    fn the_result_size_limit_defaults_to_64_kib() {
        assert_eq!(Settings::default().max_result_bytes, 65_536);
    }

    #[test]
    fn debug_output_hides_secrets_and_passwords() {
        let settings = Settings {
            database_url: "postgres://me:hunter2@db/essayflow".to_owned(),
            jwt_secret: Some("s".repeat(40)),
            ..Settings::default()
        };
        let printed = format!("{settings:?}");
        assert!(!printed.contains("hunter2"));
        assert!(!printed.contains(&"s".repeat(40)));
    }

    #[test]
    fn the_embedded_secret_is_generated_once_owner_only_and_a_short_one_is_refused() {
        let dir = std::env::temp_dir().join(format!("essayflow-settings-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let settings = Settings {
            data_dir: dir.clone(),
            ..Settings::default()
        };
        let first = settings.jwt_secret().expect("test setup");
        assert_eq!(first.len(), 64);
        assert_eq!(
            settings.jwt_secret().expect("test setup"),
            first,
            "kept, not regenerated"
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.join("jwt-secret"))
                .expect("test setup")
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        std::fs::write(dir.join("jwt-secret"), "").expect("test setup");
        assert!(settings.jwt_secret().is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn postgres_without_a_secret_is_a_start_up_error() {
        let settings = Settings {
            database_url: "postgres://localhost/x".to_owned(),
            ..Settings::default()
        };
        assert!(settings.jwt_secret().is_err());
    }
}
