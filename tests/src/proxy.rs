//! A TCP proxy that can cut a service off: every open connection is reset and new ones are
//! reset on accept until it is restored. Used to take PostgreSQL away from a running app
//! (`tests/tests/faults.rs`), as a network partition or a crashed server would.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

struct Shared {
    cut: AtomicBool,
    /// Cancelled on `cut`: every connection opened before it closes.
    connections: Mutex<CancellationToken>,
    /// Connections accepted and forwarded since start.
    forwarded: AtomicU64,
}

/// A forwarder from a port of its own to `target`.
pub struct TcpProxy {
    pub port: u16,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

impl TcpProxy {
    /// Starts forwarding `127.0.0.1:<port>` to `target` (`host:port`).
    pub async fn start(target: &str) -> Self {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let shared = Arc::new(Shared {
            cut: AtomicBool::new(false),
            connections: Mutex::new(CancellationToken::new()),
            forwarded: AtomicU64::new(0),
        });
        let target = target.to_owned();
        let state = shared.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((inbound, _)) = listener.accept().await else {
                    continue;
                };
                // The token first: a cut between the two either resets this connection here
                // or has already cancelled the token it holds.
                let stop = state.connections.lock().unwrap().clone();
                if state.cut.load(Ordering::SeqCst) {
                    // Reset at once: the client sees "connection reset", not a hang.
                    let _ = inbound.set_zero_linger();
                    drop(inbound);
                    continue;
                }
                state.forwarded.fetch_add(1, Ordering::Relaxed);
                let target = target.clone();
                tokio::spawn(async move {
                    let mut inbound = inbound;
                    let Ok(mut outbound) = TcpStream::connect(&target).await else {
                        let _ = inbound.set_zero_linger();
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = stop.cancelled() => {
                            let _ = inbound.set_zero_linger();
                            let _ = outbound.set_zero_linger();
                        }
                    }
                });
            }
        });
        Self { port, shared, task }
    }

    /// Resets every open connection and every new one until [`TcpProxy::restore`].
    pub fn cut(&self) {
        self.shared.cut.store(true, Ordering::SeqCst);
        let mut connections = self.shared.connections.lock().unwrap();
        connections.cancel();
        *connections = CancellationToken::new();
    }

    /// Forwards new connections again.
    pub fn restore(&self) {
        self.shared.cut.store(false, Ordering::SeqCst);
    }

    /// Connections forwarded since start.
    pub fn forwarded(&self) -> u64 {
        self.shared.forwarded.load(Ordering::Relaxed)
    }

    /// `postgres://...` URL `url` with its host and port replaced by this proxy's.
    pub fn postgres_url(&self, url: &str) -> String {
        let (scheme, rest) = url.split_once("://").unwrap();
        let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
        let credentials = authority
            .rsplit_once('@')
            .map(|(c, _)| format!("{c}@"))
            .unwrap_or_default();
        format!("{scheme}://{credentials}127.0.0.1:{}/{path}", self.port)
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.cut();
        self.task.abort();
    }
}
