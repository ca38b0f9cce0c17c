//! The connection layer: accepts TCP (and TLS) connections and serves HTTP/1.1 on them with
//! hyper, within limits that a slow or hostile client cannot get round.
//!
//! - **Header-read timeout** (`http.header_read_timeout_ms`, 10 s): a request's whole header
//!   must arrive within it. hyper starts the timer whenever a connection waits for a request,
//!   so the same bound closes a kept-alive connection that sits idle (and a slowloris client).
//! - **Write timeout** (`http.write_timeout_secs`, 30 s): a write to the client that makes no
//!   progress for that long (a client that stopped reading its answer, or a WebSocket's)
//!   closes the connection (tokio-io-timeout), so a slow reader cannot hold a slot forever.
//! - **TLS handshakes** run on the connection's own task, for at most
//!   [`TLS_HANDSHAKE_TIMEOUT`]; the accept loop never waits for a client.
//! - **Connection cap** (`http.max_connections`, 10 000 per node): a connection past it is
//!   answered `503` problem+json (`too-many-connections`, `Retry-After: 1`,
//!   `Connection: close`) and closed; at most [`REFUSING_AT_ONCE`] such answers are written at
//!   once, and past that new connections are closed without an answer. WebSockets leave the
//!   HTTP count when they upgrade and are capped on their own (`ws.max_connections`).
//! - **Shutdown**: [`serve`] stops accepting when `shutdown` is cancelled and asks every
//!   connection to finish its current request and close; the caller bounds the whole drain.
//! - Accept errors (out of file descriptors) pause the loop for 50 ms instead of spinning.
//!
//! HTTP/1.1 only: WebSocket upgrades are HTTP/1.1, and a proxy in front can speak HTTP/2 to
//! browsers.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use axum::http::{HeaderValue, Request, header};
use axum::response::IntoResponse;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

use crate::error::ApiError;
use crate::settings::HttpSettings;

/// The longest a TLS handshake may take.
pub const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Connections past the cap that are answered 503 at once; more are closed unanswered.
pub const REFUSING_AT_ONCE: usize = 64;

/// Counts of the connection layer, exported on `/metrics`.
#[derive(Debug, Default)]
pub struct ConnectionStats {
    /// HTTP connections open now (TLS handshakes included, upgraded WebSockets not).
    pub open: AtomicU64,
    /// Connections refused for the cap since start.
    pub refused: AtomicU64,
}

/// What [`serve`] needs.
pub struct Server {
    pub listener: TcpListener,
    pub tls: Option<Arc<rustls::ServerConfig>>,
    pub router: Router,
    pub http: HttpSettings,
    pub stats: Arc<ConnectionStats>,
}

/// Accepts and serves connections until `shutdown` is cancelled; every connection's task is
/// spawned on `connections`, which the caller waits for (within its drain bound).
pub async fn serve(server: Server, shutdown: CancellationToken, connections: TaskTracker) {
    let Server {
        listener,
        tls,
        router,
        http,
        stats,
    } = server;
    let tls = tls.map(TlsAcceptor::from);
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_millis(http.header_read_timeout_ms))
        .keep_alive(true);
    let write_timeout = Duration::from_secs(http.write_timeout_secs);
    let mut refusing_builder = builder.clone();
    refusing_builder.keep_alive(false);
    let slots = Arc::new(Semaphore::new(http.max_connections));
    let refusals = Arc::new(Semaphore::new(REFUSING_AT_ONCE));
    loop {
        let (tcp, peer) = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(%error, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        // No Nagle: a small WebSocket change or 202 must not wait for the client's delayed
        // ACK of the previous one.
        if let Err(error) = tcp.set_nodelay(true) {
            tracing::debug!(%error, "could not set TCP_NODELAY");
        }
        let (router, builder) = match slots.clone().try_acquire_owned() {
            Ok(permit) => {
                let stats = stats.clone();
                stats.open.fetch_add(1, Ordering::Relaxed);
                let guard = ConnectionGuard {
                    _permit: permit,
                    stats,
                };
                let router = router.clone();
                let builder = builder.clone();
                let tls = tls.clone();
                let shutdown = shutdown.clone();
                connections.spawn(async move {
                    let _guard = guard;
                    connection(tcp, peer, tls, router, builder, write_timeout, shutdown).await;
                });
                continue;
            }
            Err(_) => {
                stats.refused.fetch_add(1, Ordering::Relaxed);
                match refusals.clone().try_acquire_owned() {
                    Ok(permit) => (refusing_router(permit), refusing_builder.clone()),
                    // Too many refusals in progress: close without an answer.
                    Err(_) => continue,
                }
            }
        };
        tracing::debug!(%peer, "connection refused: at the connection cap");
        let (tls, shutdown) = (tls.clone(), shutdown.clone());
        connections.spawn(connection(
            tcp,
            peer,
            tls,
            router,
            builder,
            write_timeout,
            shutdown,
        ));
    }
}

/// Releases a connection's slot.
struct ConnectionGuard {
    _permit: tokio::sync::OwnedSemaphorePermit,
    stats: Arc<ConnectionStats>,
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.stats.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A router that answers every request 503 `too-many-connections` and closes; it holds one
/// of the [`REFUSING_AT_ONCE`] permits for as long as it lives.
fn refusing_router(permit: tokio::sync::OwnedSemaphorePermit) -> Router {
    let permit = Arc::new(permit);
    Router::new().fallback(move || {
        let _held = permit.clone();
        async move {
            let mut response = ApiError::TooManyConnections.into_response();
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
            response
        }
    })
}

/// Serves one connection: the TLS handshake if any, then HTTP/1.1 with upgrades, until the
/// client closes, a timeout closes it, or shutdown asks it to finish.
async fn connection(
    tcp: tokio::net::TcpStream,
    peer: SocketAddr,
    tls: Option<TlsAcceptor>,
    router: Router,
    builder: hyper::server::conn::http1::Builder,
    write_timeout: Duration,
    shutdown: CancellationToken,
) {
    let mut tcp = tokio_io_timeout::TimeoutStream::new(tcp);
    tcp.set_write_timeout(Some(write_timeout));
    let tcp = Box::pin(tcp);
    match tls {
        None => http(tcp, peer, router, builder, shutdown).await,
        Some(acceptor) => {
            let handshake = tokio::select! {
                _ = shutdown.cancelled() => return,
                done = tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(tcp)) => done,
            };
            match handshake {
                Ok(Ok(stream)) => http(stream, peer, router, builder, shutdown).await,
                Ok(Err(error)) => tracing::debug!(%error, %peer, "TLS handshake failed"),
                Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
            }
        }
    }
}

async fn http<I>(
    io: I,
    peer: SocketAddr,
    router: Router,
    builder: hyper::server::conn::http1::Builder,
    shutdown: CancellationToken,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |mut request: Request<Incoming>| {
        request.extensions_mut().insert(ConnectInfo(peer));
        let router = router.clone();
        async move { Ok::<_, Infallible>(infallible(router.oneshot(request).await)) }
    });
    let connection = builder
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades();
    tokio::pin!(connection);
    let served = tokio::select! {
        served = connection.as_mut() => served,
        _ = shutdown.cancelled() => {
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    };
    if let Err(error) = served {
        tracing::debug!(%error, %peer, "connection ended with an error");
    }
}

/// `Result<T, Infallible>` into `T`.
fn infallible<T>(result: Result<T, Infallible>) -> T {
    match result {
        Ok(value) => value,
        Err(never) => match never {},
    }
}
