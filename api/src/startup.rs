//! `Application::build` wires storage, services, workers and the router, and binds the
//! listener (port 0 allowed); `run_until_stopped` serves until shutdown and drains the workers.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::Router;
use commands::{CommandService, EventLog, Storage, StorageOptions};
use domain::{BatchServices, PipelineCatalog};
use projections::feed::Retention;
use projections::{
    BatchStateProjection, DashboardProjection, Feed, ReadModels, Worker, WorkerOptions,
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::live::{Hub, Live};
use crate::settings::Settings;
use crate::state::AppState;

/// Opens the database named by the settings (running migrations).
pub async fn connect(settings: &Settings) -> anyhow::Result<Storage> {
    let url = settings.database_url();
    if settings.is_embedded() && settings.database_url.is_empty() {
        std::fs::create_dir_all(&settings.data_dir)
            .with_context(|| format!("creating {}", settings.data_dir.display()))?;
        // The database holds password hashes, hashed tokens and keys and the audit log: owner
        // only, like the JWT secret beside it (SQLite gives its -wal and -shm files the same
        // permissions as the database file).
        #[cfg(unix)]
        {
            use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
            let file = settings.data_dir.join("essayflow.db");
            if !file.exists() {
                std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&file)
                    .with_context(|| format!("creating {}", file.display()))?;
            }
            let _ = std::fs::set_permissions(
                &settings.data_dir,
                std::fs::Permissions::from_mode(0o700),
            );
        }
    }
    let mut options = StorageOptions::new(url);
    options.max_write_connections = settings.db_max_connections;
    options.sqlite_sync_full = settings.sqlite_synchronous == "full";
    options.acquire_timeout = settings.ops.acquire_timeout();
    Storage::connect(&options)
        .await
        .context("opening the database")
}

/// Loads the pipeline definitions: the configured file, or the built-in ones.
pub fn pipelines(settings: &Settings) -> anyhow::Result<PipelineCatalog> {
    match &settings.pipelines {
        None => Ok(PipelineCatalog::builtin()),
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading the pipeline file {}", path.display()))?;
            PipelineCatalog::from_toml(&text)
                .with_context(|| format!("the pipeline file {} is invalid", path.display()))
        }
    }
}

/// Spawns one worker per projection; their committed changes go to `feed`, their pages and
/// errors to `metrics`.
pub fn spawn_workers(
    settings: &Settings,
    storage: &Storage,
    feed: &Feed,
    cancel: &CancellationToken,
    tracker: &TaskTracker,
    metrics: &projections::metrics::ProjectionMetrics,
) {
    let options = WorkerOptions {
        page_size: settings.projection_page_size,
        ..WorkerOptions::default()
    };
    let batch_state = Worker::new(BatchStateProjection, storage, options)
        .with_feed(feed.clone())
        .with_metrics(metrics);
    let dashboard = Worker::new(DashboardProjection, storage, options)
        .with_feed(feed.clone())
        .with_metrics(metrics);
    tracker.spawn(batch_state.run(cancel.child_token()));
    tracker.spawn(dashboard.run(cancel.child_token()));
}

/// How long live changes are kept for resuming clients, and how often old ones are pruned
/// (every minute, or more often when they are kept less than a minute).
pub fn retention(settings: &Settings) -> Retention {
    Retention {
        keep: Duration::from_secs(settings.ws.history_secs),
        every: Duration::from_secs(settings.ws.history_secs.clamp(1, 60)),
    }
}

pub struct Application {
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    router: Router,
    state: AppState,
    cancel: CancellationToken,
    tracker: TaskTracker,
    /// The operations listener (`ops.bind`), if configured.
    ops_listener: Option<TcpListener>,
}

impl Application {
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        let secret = settings.jwt_secret()?;
        let catalog = pipelines(&settings)?;
        let storage = connect(&settings).await?;
        // This instance's registry: the families are handed to the parts that record them.
        let families = crate::metrics::Families::new();
        let cancel = CancellationToken::new();
        let tracker = TaskTracker::new();
        storage.spawn_signals(cancel.child_token(), &tracker);
        let tls = match (&settings.tls_cert, &settings.tls_key) {
            (Some(cert), Some(key)) => Some(crate::tls::server_config(cert, key)?),
            _ => None,
        };
        let feed = Feed::new(storage.clone(), 1024);
        feed.spawn_listener(cancel.child_token(), &tracker);
        feed.spawn_pruner(retention(&settings), cancel.child_token(), &tracker);
        let identity = identity(&settings, &storage, &secret)?;
        identity.spawn_poller(cancel.child_token(), &tracker);
        identity
            .refusals()
            .spawn_flusher(storage.pool().clone(), cancel.child_token(), &tracker);
        let settings = Arc::new(settings);
        let live = Arc::new(Live {
            identity: identity.clone(),
            hub: Arc::new(Hub::new(
                settings.ws.send_buffer,
                settings.ws.send_buffer_bytes,
            )),
            feed: feed.clone(),
            reads: ReadModels::new(storage.clone()),
            settings: settings.clone(),
            cancel: cancel.child_token(),
            tracker: tracker.clone(),
            catching_up: tokio::sync::Semaphore::new(16),
            slots: Arc::default(),
        });
        tracker.spawn(live.hub.clone().run(feed.clone(), cancel.child_token()));
        if settings.run_workers {
            spawn_workers(
                &settings,
                &storage,
                &feed,
                &cancel,
                &tracker,
                &families.projections,
            );
        }
        let catalog = Arc::new(catalog);
        let commands = CommandService::new(
            &storage,
            BatchServices {
                pipelines: catalog.clone(),
            },
        )
        .with_metrics(families.commands.clone());
        let (ingress, pipeline) = crate::pipeline::start(
            &settings,
            &storage,
            &commands,
            &catalog,
            &cancel,
            &tracker,
            &families.relay,
        )
        .await?;
        let pipeline = Arc::new(pipeline);
        let jobs = Arc::new(crate::jobs::Jobs::new(
            storage.clone(),
            feed.clone(),
            cancel.child_token(),
            tracker.clone(),
            settings.rebuild_options(),
            settings.verify_options(),
        ));
        if settings.run_workers {
            jobs.spawn_resumer(settings.rebuild_options().lease);
            if settings.verify_interval_secs > 0 {
                jobs.spawn_verifier(Duration::from_secs(settings.verify_interval_secs));
            }
        }
        let limits = Arc::new(crate::edge::ratelimit::Limits::new(&settings.rate_limit)?);
        limits.spawn_pruner(cancel.child_token(), &tracker);
        let breaker = Arc::new(crate::edge::breaker::Breaker::new(&settings.ops));
        breaker.spawn_prober(storage.clone(), cancel.child_token(), &tracker);
        let ops = Arc::new(crate::ops::OpsCache::new(settings.ops.cache()));
        let connections = Arc::<crate::server::ConnectionStats>::default();
        let ops_listener = match settings.ops.bind.trim() {
            "" => None,
            bind => Some(
                TcpListener::bind(bind)
                    .await
                    .with_context(|| format!("binding the operations listener {bind}"))?,
            ),
        };
        let metrics = Arc::new(crate::metrics::Metrics::build(
            families,
            crate::metrics::Parts {
                live: live.clone(),
                identity: identity.clone(),
                connections: connections.clone(),
                breaker: breaker.clone(),
                limits: limits.clone(),
                pipeline: pipeline.clone(),
            },
        ));
        let state = AppState::new(crate::state::Services {
            breaker,
            ops,
            commands,
            ingress,
            pipeline,
            live,
            jobs,
            reads: ReadModels::new(storage.clone()),
            log: EventLog::new(storage.clone()),
            storage,
            identity,
            metrics,
            settings,
            connections,
            limits,
        });
        let router = crate::edge::apply(crate::routes::router(&state), state.clone());
        let listener = TcpListener::bind(&state.settings.bind)
            .await
            .with_context(|| format!("binding {}", state.settings.bind))?;
        Ok(Self {
            listener,
            tls,
            router,
            state,
            cancel,
            tracker,
            ops_listener,
        })
    }

    /// The operations listener's port, when `ops.bind` is set.
    pub fn ops_port(&self) -> Option<u16> {
        let listener = self.ops_listener.as_ref()?;
        listener.local_addr().ok().map(|a| a.port())
    }

    pub fn port(&self) -> u16 {
        self.listener.local_addr().map(|a| a.port()).unwrap_or(0)
    }

    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// Serves until `shutdown` completes, then drains: connections finish their requests,
    /// WebSockets close (1001), workers stop and the database pool closes, all within
    /// `http.drain_timeout_secs`; past that bound it returns anyway (whatever the database
    /// or a client is doing), saying what was still running.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let address = self.listener.local_addr()?;
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        tracing::info!(%address, scheme, engine = self.state.storage.engine().name(), "essayflow is serving");
        let connections = TaskTracker::new();
        let server = crate::server::Server {
            listener: self.listener,
            tls: self.tls,
            router: self.router,
            http: self.state.settings.http.clone(),
            stats: self.state.connections.clone(),
        };
        let serving = tokio::spawn(crate::server::serve(
            server,
            self.cancel.clone(),
            connections.clone(),
        ));
        if let Some(listener) = self.ops_listener {
            crate::ops::spawn_listener(
                listener,
                &self.state,
                self.cancel.child_token(),
                &self.tracker,
            );
        }
        tokio::select! {
            _ = shutdown => {},
            // Cancelled from inside (a test, or a fatal worker error).
            _ = self.cancel.cancelled() => {},
        }
        // Cancelling stops the accept loop, asks every connection to finish, closes every
        // WebSocket session (1001) and stops the workers.
        self.cancel.cancel();
        let drain = Duration::from_secs(self.state.settings.http.drain_timeout_secs);
        let storage = self.state.storage.clone();
        let (tracker, open) = (self.tracker.clone(), connections.clone());
        let drained = tokio::time::timeout(drain, async move {
            let _ = serving.await;
            open.close();
            tracker.close();
            tokio::join!(open.wait(), tracker.wait());
            storage.close().await;
        })
        .await;
        if drained.is_err() {
            tracing::warn!(
                drain_secs = drain.as_secs(),
                connections = connections.len(),
                tasks = self.tracker.len(),
                "the shutdown drain timed out; stopping with these still running"
            );
        } else {
            tracing::info!("stopped");
        }
        Ok(())
    }
}

/// The identity service of `settings`, signing with `secret`.
pub fn identity(
    settings: &Settings,
    storage: &Storage,
    secret: &[u8],
) -> anyhow::Result<crate::identity::Identity> {
    let verify: Vec<&[u8]> = settings
        .jwt_verify_secrets
        .iter()
        .map(|s| s.as_bytes())
        .collect();
    let tokens = crate::identity::TokenKeys::with_verify_secrets(
        secret,
        &verify,
        &settings.jwt_issuer,
        &settings.jwt_audience,
        settings.token_ttl_secs,
    );
    crate::identity::Identity::new(storage, tokens, settings.auth.options())
}

/// Completes on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = terminate => {},
    }
    tracing::info!("shutting down");
}
