//! A real WebSocket client (tokio-tungstenite) for the live-stream tests, a follower that
//! checks per-topic version contiguity, a test CA for WSS, and the essayflow binary run as a
//! separate server process (for the two-node tests).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::{self, HeaderValue};
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{Connector, MaybeTlsStream, WebSocketStream};

use crate::{TestApp, User, essayflow_binary, kafka::free_port, wait_until};

/// How long a test waits for any one expected message.
pub const RECEIVE: Duration = Duration::from_secs(15);

pub type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A connected client.
pub struct WsClient {
    pub socket: Socket,
    /// The `Sec-WebSocket-Protocol` the server selected.
    pub protocol: Option<String>,
}

/// The `ws://` (or `wss://`) URL of `/v1/ws` on a server at `http_base`.
pub fn ws_url(http_base: &str) -> String {
    format!("{}/v1/ws", http_base.replacen("http", "ws", 1))
}

impl WsClient {
    /// Connects with `request`; the handshake's error (a refused upgrade) as is.
    pub async fn connect(
        request: http::Request<()>,
        tls: Option<Arc<rustls::ClientConfig>>,
    ) -> Result<Self, tungstenite::Error> {
        let connector = tls.map(Connector::Rustls);
        let (socket, response) =
            tokio_tungstenite::connect_async_tls_with_config(request, None, true, connector)
                .await?;
        let protocol = response
            .headers()
            .get(http::header::SEC_WEBSOCKET_PROTOCOL)
            .map(|v| v.to_str().unwrap().to_owned());
        Ok(Self { socket, protocol })
    }

    /// Connects as `user` with `Authorization: Bearer`.
    pub async fn bearer(url: &str, token: &str) -> Self {
        let mut request = url.into_client_request().unwrap();
        request.headers_mut().insert(
            http::header::AUTHORIZATION,
            HeaderValue::from_str(&format!("Bearer {token}")).unwrap(),
        );
        Self::connect(request, None).await.unwrap()
    }

    pub async fn send(&mut self, value: Value) {
        self.socket
            .send(Message::Text(value.to_string().into()))
            .await
            .unwrap();
    }

    pub async fn subscribe(&mut self, topic: &str, since: Option<i64>) {
        let mut message = json!({"type": "subscribe", "topic": topic});
        if let Some(since) = since {
            message["since"] = since.into();
        }
        self.send(message).await;
    }

    /// The next frame that is not a ping or pong, within `timeout`; `None` on timeout.
    pub async fn next_frame(&mut self, timeout: Duration) -> Option<Message> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let frame = tokio::time::timeout_at(deadline, self.socket.next())
                .await
                .ok()?;
            match frame {
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                Some(Ok(message)) => return Some(message),
                Some(Err(error)) => panic!("the WebSocket failed: {error}"),
                None => panic!("the WebSocket ended without a close frame"),
            }
        }
    }

    /// The next JSON message; panics on anything else or after [`RECEIVE`].
    pub async fn next_json(&mut self) -> Value {
        match self.next_frame(RECEIVE).await {
            Some(Message::Text(text)) => serde_json::from_str(text.as_str()).unwrap(),
            Some(other) => panic!("expected a JSON text message, got {other:?}"),
            None => panic!("no message within {RECEIVE:?}"),
        }
    }

    /// For a client that never read: the close code among the frames the server sent,
    /// parsed from the raw bytes (server frames are unmasked; ours are all short).
    pub async fn raw_close_code(self) -> u16 {
        use tokio::io::AsyncReadExt;
        let MaybeTlsStream::Plain(mut stream) = self.socket.into_inner() else {
            panic!("raw reads are for plain connections");
        };
        let mut bytes = Vec::new();
        tokio::time::timeout(RECEIVE, stream.read_to_end(&mut bytes))
            .await
            .expect("the server did not close the connection")
            .unwrap();
        let mut at = 0;
        while at + 2 <= bytes.len() {
            let (opcode, len) = (bytes[at] & 0x0f, usize::from(bytes[at + 1] & 0x7f));
            assert!(len < 126, "unexpectedly long frame");
            if opcode == 0x8 {
                return u16::from_be_bytes([bytes[at + 2], bytes[at + 3]]);
            }
            at += 2 + len;
        }
        panic!("no close frame in {bytes:?}");
    }

    /// Reads until the server's close frame; returns it.
    pub async fn closed(&mut self) -> CloseFrame {
        loop {
            match self.next_frame(RECEIVE).await {
                Some(Message::Close(Some(frame))) => return frame,
                Some(Message::Close(None)) => panic!("a close frame without a code"),
                Some(_) => continue,
                None => panic!("the server did not close the connection"),
            }
        }
    }
}

impl TestApp {
    /// A client connected as `user` (bearer header).
    pub async fn ws(&self, user: &User) -> WsClient {
        WsClient::bearer(&ws_url(&self.address), &user.token).await
    }
}

/// What one topic's stream delivered, checked as it arrives: a snapshot, then changes whose
/// versions increase by exactly one, each patch applied (RFC 6902) to the document held, as a
/// client does.
#[derive(Debug, Default)]
pub struct TopicLog {
    pub version: i64,
    /// The document: the last snapshot with every later patch applied.
    pub data: Value,
    pub snapshots: Vec<i64>,
    pub changes: Vec<i64>,
    /// The bytes of every change's patch, as sent.
    pub patch_bytes: usize,
}

impl TopicLog {
    /// Takes a `snapshot` or `change` message of this topic.
    pub fn take(&mut self, message: &Value) {
        let version = message["version"].as_i64().unwrap();
        match message["type"].as_str().unwrap() {
            "snapshot" => {
                self.snapshots.push(version);
                self.data = message["data"].clone();
            }
            "change" => {
                assert!(
                    !self.snapshots.is_empty() || !self.changes.is_empty() || self.version > 0,
                    "a change before any snapshot: {message}"
                );
                assert_eq!(
                    version,
                    self.version + 1,
                    "versions must increase by one: had {}, got {message}",
                    self.version
                );
                assert!(
                    message.get("data").is_none(),
                    "a change carries a patch: {message}"
                );
                let patch: json_patch::Patch =
                    serde_json::from_value(message["patch"].clone()).unwrap();
                self.patch_bytes += message["patch"].to_string().len();
                json_patch::patch(&mut self.data, &patch).unwrap_or_else(|e| {
                    panic!("the patch of version {version} does not apply: {e}")
                });
                self.changes.push(version);
            }
            other => panic!("not a snapshot or change: {other}"),
        }
        self.version = version;
    }
}

/// A CA and a server certificate for `localhost` and 127.0.0.1, written as PEM files.
pub struct TestCa {
    pub ca_pem: String,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TestCa {
    pub fn generate(dir: &Path) -> Self {
        use rcgen::{
            BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair,
            KeyUsagePurpose,
        };
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(DnType::CommonName, "essayflow test CA");
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate().unwrap()).unwrap();
        let server_key = KeyPair::generate().unwrap();
        let mut server =
            CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).unwrap();
        server
            .distinguished_name
            .push(DnType::CommonName, "localhost");
        let server = server.signed_by(&server_key, &ca).unwrap();
        let (cert, key) = (dir.join("server.pem"), dir.join("server.key"));
        std::fs::write(&cert, server.pem()).unwrap();
        std::fs::write(&key, server_key.serialize_pem()).unwrap();
        Self {
            ca_pem: ca.pem(),
            cert,
            key,
        }
    }

    /// A rustls client configuration that trusts only this CA.
    pub fn client_config(&self) -> Arc<rustls::ClientConfig> {
        use rustls::pki_types::CertificateDer;
        use rustls::pki_types::pem::PemObject;
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(self.ca_pem.as_bytes()) {
            roots.add(cert.unwrap()).unwrap();
        }
        Arc::new(
            rustls::ClientConfig::builder()
                .with_root_certificates(roots)
                .with_no_client_auth(),
        )
    }
}

/// The essayflow binary serving on a port of its own: a second node.
pub struct ServerProcess {
    child: Child,
    pub address: String,
}

impl ServerProcess {
    /// Starts `essayflow serve` with the test secret and `env`, and waits until it is ready.
    pub async fn start(database_url: &str, env: &[(&str, String)]) -> Self {
        let port = free_port();
        let mut command = Command::new(essayflow_binary());
        command
            .arg("serve")
            .env("ESSAYFLOW_DATABASE_URL", database_url)
            .env("ESSAYFLOW_JWT_SECRET", crate::JWT_SECRET)
            .env("ESSAYFLOW_BIND", format!("127.0.0.1:{port}"))
            .env("ESSAYFLOW_LOG", "warn")
            .stdout(Stdio::null());
        for (name, value) in env {
            command.env(name, value);
        }
        let child = command.spawn().unwrap();
        let server = Self {
            child,
            address: format!("http://127.0.0.1:{port}"),
        };
        let client = reqwest::Client::new();
        let url = format!("{}/healthz", server.address);
        wait_until(Duration::from_secs(60), || async {
            matches!(client.get(&url).send().await, Ok(r) if r.status().is_success())
        })
        .await;
        server
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
