//! Helpers for essayflow's black-box tests: [`TestApp::spawn`] runs the real application on
//! port 0 against a fresh database (a new PostgreSQL database, or a new SQLite file), and typed
//! helpers drive it over real HTTP. Logs are shown only with `TEST_LOG=1`.
//!
//! Every scenario runs on both engines through [`both_engines!`].
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::process::Command;
use std::sync::Once;
use std::time::{Duration, Instant};

use api::auth::{Role, add_user};
use api::settings::Settings;
use api::startup::Application;
use commands::{Engine, Storage};
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use uuid::Uuid;

pub mod kafka;
pub mod pipeline;
pub mod proxy;
pub mod ws;

pub use commands;
pub use projections;

pub const JWT_SECRET: &str = "test-secret-that-is-long-enough-for-hs256!";

/// The PostgreSQL server the tests create databases on.
pub fn postgres_admin_url() -> String {
    std::env::var("ESSAYFLOW_TEST_PG_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".to_owned())
}

/// Runs `scenario` once per engine, as two tests named `<name>_postgres` and `<name>_sqlite`.
#[macro_export]
macro_rules! both_engines {
    ($($name:ident),+ $(,)?) => {
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::commands::Engine::Postgres).await;
                }
            )+
        }
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::commands::Engine::Sqlite).await;
                }
            )+
        }
    };
}

fn init() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
        if std::env::var("TEST_LOG").is_ok() {
            let _ = tracing_subscriber::fmt()
                .with_env_filter("info,sqlx=warn")
                .with_test_writer()
                .try_init();
        }
    });
}

/// A fresh database for one test.
pub struct TestDatabase {
    pub url: String,
    _dir: Option<TempDir>,
}

impl TestDatabase {
    pub async fn create(engine: Engine) -> Self {
        match engine {
            Engine::Postgres => {
                let name = format!("essayflow_test_{}", Uuid::new_v4().simple());
                let admin = postgres_admin_url();
                let mut conn: sqlx::PgConnection =
                    sqlx::Connection::connect(&format!("{admin}/postgres"))
                        .await
                        .unwrap();
                sqlx::Executor::execute(&mut conn, format!("CREATE DATABASE {name}").as_str())
                    .await
                    .unwrap();
                Self {
                    url: format!("{admin}/{name}"),
                    _dir: None,
                }
            }
            Engine::Sqlite => {
                let dir = TempDir::new();
                Self {
                    url: format!("sqlite:{}", dir.path.join("essayflow.db").display()),
                    _dir: Some(dir),
                }
            }
        }
    }
}

/// A temporary folder, removed on drop.
pub struct TempDir {
    pub path: PathBuf,
}

impl TempDir {
    pub fn new() -> Self {
        let path = std::env::temp_dir().join(format!("essayflow-test-{}", Uuid::new_v4().simple()));
        std::fs::create_dir_all(&path).unwrap();
        Self { path }
    }
}

impl Default for TempDir {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

pub struct TestApp {
    pub address: String,
    /// The operations listener (`/metrics`, detailed `/readyz`, no authentication), on a port
    /// of its own unless a test cleared `settings.ops.bind`.
    pub ops_address: Option<String>,
    pub engine: Engine,
    pub db: TestDatabase,
    pub settings: Settings,
    pub client: reqwest::Client,
    pub storage: Storage,
    shutdown: Option<oneshot::Sender<()>>,
    server: Option<JoinHandle<anyhow::Result<()>>>,
}

impl TestApp {
    pub async fn spawn(engine: Engine) -> Self {
        Self::spawn_with(engine, |_| {}).await
    }

    /// Spawns the app after letting `configure` adjust its settings.
    pub async fn spawn_with(engine: Engine, configure: impl FnOnce(&mut Settings)) -> Self {
        init();
        let db = TestDatabase::create(engine).await;
        let mut settings = Settings {
            database_url: db.url.clone(),
            bind: "127.0.0.1:0".to_owned(),
            jwt_secret: Some(JWT_SECRET.to_owned()),
            db_max_connections: 10,
            // An operations listener on a port of its own, read afresh on every scrape (tests
            // look at lags and verification results right after they change).
            ops: api::edge::breaker::OpsSettings {
                bind: "127.0.0.1:0".to_owned(),
                cache_ms: 0,
                ..Default::default()
            },
            ..Settings::default()
        };
        configure(&mut settings);
        Self::launch(engine, db, settings).await
    }

    async fn launch(engine: Engine, db: TestDatabase, settings: Settings) -> Self {
        let app = Application::build(settings.clone()).await.unwrap();
        let address = format!("http://127.0.0.1:{}", app.port());
        let ops_address = app
            .ops_port()
            .map(|port| format!("http://127.0.0.1:{port}"));
        let storage = app.state().storage.clone();
        let (tx, rx) = oneshot::channel();
        let server = tokio::spawn(app.run_until_stopped(async move {
            let _ = rx.await;
        }));
        Self {
            address,
            ops_address,
            engine,
            db,
            settings,
            client: reqwest::Client::new(),
            storage,
            shutdown: Some(tx),
            server: Some(server),
        }
    }

    /// Stops the app (as a crash or a redeploy would, between requests) and starts a new one
    /// on the same database, after letting `configure` adjust its settings.
    pub async fn restart(mut self, configure: impl FnOnce(&mut Settings)) -> Self {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(server) = self.server.take() {
            server.await.unwrap().unwrap();
        }
        let db = std::mem::replace(
            &mut self.db,
            TestDatabase {
                url: String::new(),
                _dir: None,
            },
        );
        let mut settings = self.settings.clone();
        configure(&mut settings);
        Self::launch(self.engine, db, settings).await
    }

    /// Stops the server and waits for its workers to finish.
    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(server) = self.server.take() {
            server.await.unwrap().unwrap();
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.address)
    }

    /// Adds a user directly in the database and logs in over HTTP; returns its access token.
    pub async fn user(&self, role: Role) -> User {
        let username = format!("u{}", &Uuid::new_v4().simple().to_string()[..12]);
        let password = "correct horse battery";
        let stored = add_user(self.storage.pool(), &username, role, password)
            .await
            .unwrap();
        self.login(stored.id.to_string(), &username, password).await
    }

    /// Logs `username` (whose id is `id`) in over HTTP; returns the user with its tokens.
    pub async fn login(&self, id: String, username: &str, password: &str) -> User {
        let response = self
            .client
            .post(self.url("/v1/auth/login"))
            .json(&json!({ "username": username, "password": password }))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let body: Value = response.json().await.unwrap();
        User {
            id,
            username: username.to_owned(),
            token: body["access_token"].as_str().unwrap().to_owned(),
            refresh: body["refresh_token"].as_str().unwrap().to_owned(),
        }
    }

    pub async fn post(&self, user: &User, path: &str, body: &Value) -> reqwest::Response {
        self.client
            .post(self.url(path))
            .bearer_auth(&user.token)
            .json(body)
            .send()
            .await
            .unwrap()
    }

    /// GETs `path` as `user` and returns the JSON body, whatever the status.
    pub async fn get_json(&self, user: &User, path: &str) -> Value {
        self.get(user, path).await.json().await.unwrap()
    }

    /// GETs `path` on the operations listener (`/metrics`, the detailed `/readyz`), with no
    /// token.
    pub async fn get_ops(&self, path: &str) -> reqwest::Response {
        let base = self
            .ops_address
            .as_deref()
            .expect("the app has an operations listener");
        self.client
            .get(format!("{base}{path}"))
            .send()
            .await
            .unwrap()
    }

    /// GETs `path` with no token.
    pub async fn get_public(&self, path: &str) -> reqwest::Response {
        self.client.get(self.url(path)).send().await.unwrap()
    }

    pub async fn get(&self, user: &User, path: &str) -> reqwest::Response {
        self.client
            .get(self.url(path))
            .bearer_auth(&user.token)
            .send()
            .await
            .unwrap()
    }

    /// Registers a batch and returns its 202 body.
    pub async fn register_batch(&self, user: &User, expected: u32) -> Value {
        let response = self
            .post(
                user,
                "/v1/batches",
                &json!({
                    "title": "Persuasive essays",
                    "course_code": "EN-101",
                    "expected_essay_count": expected,
                    "class_designation": "9B",
                }),
            )
            .await;
        assert_eq!(response.status(), StatusCode::ACCEPTED);
        response.json().await.unwrap()
    }

    /// Adds essays with the given ids; returns the response.
    pub async fn add_essays(&self, user: &User, batch_id: &str, ids: &[&str]) -> reqwest::Response {
        let essays: Vec<Value> = ids
            .iter()
            .map(|id| json!({ "essay_id": id, "title": format!("Essay {id}"), "text": format!("The text of essay {id}.") }))
            .collect();
        self.post(
            user,
            &format!("/v1/batches/{batch_id}/essays"),
            &json!({ "essays": essays }),
        )
        .await
    }

    /// Reads a batch, waiting for `position` to be applied.
    pub async fn batch(&self, user: &User, batch_id: &str, position: i64) -> Value {
        let response = self
            .get(
                user,
                &format!("/v1/batches/{batch_id}?min_position={position}"),
            )
            .await;
        assert_eq!(response.status(), StatusCode::OK);
        response.json().await.unwrap()
    }

    /// The number of events in the log.
    pub async fn event_count(&self) -> i64 {
        commands::EventLog::new(self.storage.clone())
            .count()
            .await
            .unwrap()
    }

    /// Waits until every projection has applied the whole log.
    pub async fn wait_for_projections(&self) {
        let reads = projections::ReadModels::new(self.storage.clone());
        wait_until(Duration::from_secs(20), || async {
            reads
                .projections(&projections::PROJECTIONS)
                .await
                .unwrap()
                .iter()
                .all(|p| p.lag == 0)
        })
        .await;
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

#[derive(Debug, Clone)]
pub struct User {
    pub id: String,
    pub username: String,
    /// The access token of its login.
    pub token: String,
    /// The refresh token of its login.
    pub refresh: String,
}

/// The claims of a JWT, decoded without checking anything (to build variants of a real token).
pub fn claims_of(token: &str) -> Value {
    use base64::Engine as _;
    let payload = token.split('.').nth(1).unwrap();
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .unwrap();
    serde_json::from_slice(&bytes).unwrap()
}

/// Polls `condition` until it holds; panics after `timeout`.
pub async fn wait_until<F, Fut>(timeout: Duration, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if condition().await {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "condition not met within {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Asserts that a response is problem+json with `status`, and returns its body.
pub async fn assert_problem(response: reqwest::Response, status: StatusCode) -> Value {
    assert_eq!(response.status(), status);
    let content_type = response
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned());
    assert_eq!(content_type.as_deref(), Some("application/problem+json"));
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["status"], status.as_u16());
    assert!(
        body["type"]
            .as_str()
            .unwrap()
            .starts_with("urn:essayflow:problem:")
    );
    assert!(!body["detail"].as_str().unwrap().is_empty());
    body
}

/// The `essayflow` binary, built if needed.
pub fn essayflow_binary() -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    let binary = target.join("debug").join("essayflow");
    static BUILD: Once = Once::new();
    BUILD.call_once(|| {
        let status = Command::new(env!("CARGO"))
            .args(["build", "--quiet", "-p", "api", "--bin", "essayflow"])
            .current_dir(&root)
            .status()
            .unwrap();
        assert!(status.success(), "building the essayflow binary failed");
    });
    binary
}
