//! Kafka helpers: the broker the test script started (`ESSAYFLOW_TEST_KAFKA`), brokers a test
//! starts itself (tansu), a TCP proxy to cut a broker off and bring it back, and ordinary
//! rdkafka consumers and producers standing in for the processing services.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;
use serde_json::Value;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use uuid::Uuid;

/// The broker started by `scripts/test.sh`.
pub fn test_brokers() -> String {
    std::env::var("ESSAYFLOW_TEST_KAFKA").expect(
        "ESSAYFLOW_TEST_KAFKA is not set: run the tests with scripts/test.sh, which starts a \
         tansu broker, or start one and set ESSAYFLOW_TEST_KAFKA=host:port",
    )
}

/// A topic prefix no other test uses, so that tests can share one broker.
pub fn unique_prefix() -> String {
    format!("t{}", &Uuid::new_v4().simple().to_string()[..12])
}

/// One message as a test saw it.
#[derive(Debug, Clone)]
pub struct Received {
    pub topic: String,
    pub key: Option<String>,
    pub payload: Value,
    pub raw: Vec<u8>,
    pub headers: HashMap<String, String>,
}

impl Received {
    fn from(message: &rdkafka::message::BorrowedMessage<'_>) -> Self {
        let raw = message.payload().unwrap_or_default().to_vec();
        let mut headers = HashMap::new();
        if let Some(h) = message.headers() {
            for header in h.iter() {
                headers.insert(
                    header.key.to_owned(),
                    String::from_utf8_lossy(header.value.unwrap_or_default()).into_owned(),
                );
            }
        }
        Self {
            topic: message.topic().to_owned(),
            key: message
                .key()
                .map(|k| String::from_utf8_lossy(k).into_owned()),
            payload: serde_json::from_slice(&raw).unwrap_or(Value::Null),
            raw,
            headers,
        }
    }
}

/// An ordinary consumer, reading `topics` from the beginning in a group of its own.
pub struct TestConsumer {
    consumer: StreamConsumer,
}

impl TestConsumer {
    pub fn new(brokers: &str, topics: &[String]) -> Self {
        let consumer: StreamConsumer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("group.id", format!("test-{}", Uuid::new_v4()))
            .set("auto.offset.reset", "earliest")
            .set("enable.auto.commit", "true")
            .create()
            .unwrap();
        let names: Vec<&str> = topics.iter().map(String::as_str).collect();
        consumer.subscribe(&names).unwrap();
        Self { consumer }
    }

    /// Whatever arrives within `wait`.
    pub async fn receive_for(&self, wait: Duration) -> Vec<Received> {
        let deadline = tokio::time::Instant::now() + wait;
        let mut seen = Vec::new();
        while let Ok(received) = tokio::time::timeout_at(deadline, self.consumer.recv()).await {
            match received {
                Ok(message) => seen.push(Received::from(&message)),
                Err(error) => eprintln!("test consumer: {error}"),
            }
        }
        seen
    }

    /// Receives messages until `enough` says so; panics after `timeout`.
    pub async fn receive_until(
        &self,
        timeout: Duration,
        mut enough: impl FnMut(&[Received]) -> bool,
    ) -> Vec<Received> {
        let deadline = Instant::now() + timeout;
        let mut seen = Vec::new();
        while !enough(&seen) {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "timed out after {timeout:?} with {} messages: {:?}",
                seen.len(),
                seen.iter().map(|r| &r.payload).collect::<Vec<_>>()
            );
            match tokio::time::timeout(left.min(Duration::from_millis(500)), self.consumer.recv())
                .await
            {
                Ok(Ok(message)) => seen.push(Received::from(&message)),
                Ok(Err(error)) => eprintln!("test consumer: {error}"),
                Err(_) => {}
            }
        }
        seen
    }
}

/// An ordinary producer.
pub struct TestProducer {
    producer: FutureProducer,
}

impl TestProducer {
    pub fn new(brokers: &str) -> Self {
        let producer: FutureProducer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("message.timeout.ms", "20000")
            .create()
            .unwrap();
        Self { producer }
    }

    pub async fn send(&self, topic: &str, key: &str, payload: &[u8]) {
        self.send_with_headers(topic, key, payload, &[]).await;
    }

    /// Sends a message with `headers` (text values).
    pub async fn send_with_headers(
        &self,
        topic: &str,
        key: &str,
        payload: &[u8],
        headers: &[(&str, &str)],
    ) {
        let mut owned = rdkafka::message::OwnedHeaders::new_with_capacity(headers.len());
        for (name, value) in headers {
            owned = owned.insert(rdkafka::message::Header {
                key: name,
                value: Some(value.as_bytes()),
            });
        }
        self.producer
            .send(
                FutureRecord::to(topic)
                    .key(key)
                    .payload(payload)
                    .headers(owned),
                Timeout::After(Duration::from_secs(20)),
            )
            .await
            .map_err(|(e, _)| e)
            .unwrap();
    }

    pub async fn send_json(&self, topic: &str, key: &str, payload: &Value) {
        self.send(topic, key, &serde_json::to_vec(payload).unwrap())
            .await;
    }
}

/// The tansu binary the test script built (`ESSAYFLOW_TANSU_BIN`, or the cache's default).
pub fn tansu_binary() -> PathBuf {
    std::env::var_os("ESSAYFLOW_TANSU_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let home = std::env::var_os("HOME").unwrap_or_default();
            PathBuf::from(home).join(".cache/essayflow/tansu-0.6.0/bin/tansu")
        })
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A tansu broker of the test's own, in memory, listening on `port` and advertising
/// `advertised` (a proxy's port, for instance). Killed when dropped.
pub struct Tansu {
    child: Child,
    pub port: u16,
}

impl Tansu {
    pub async fn start(port: u16, advertised: u16) -> Self {
        let child = Command::new(tansu_binary())
            .args([
                "broker",
                "--storage-engine",
                "memory://tansu/",
                "--listener-url",
                &format!("tcp://127.0.0.1:{port}"),
                "--advertised-listener-url",
                &format!("tcp://127.0.0.1:{advertised}"),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", tansu_binary().display()));
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", port)).await.is_err() {
            assert!(Instant::now() < deadline, "tansu did not start listening");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Self { child, port }
    }
}

impl Drop for Tansu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A TCP proxy in front of a broker: `stop` refuses new connections and cuts the open ones,
/// as a broker that went down would; `start` brings it back on the same port.
pub struct Proxy {
    pub port: u16,
    target: u16,
    running: Option<(JoinHandle<()>, Arc<AtomicBool>)>,
}

impl Proxy {
    /// A proxy on a port of its own, to `target`.
    pub async fn new(target: u16) -> Self {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await.unwrap();
        let mut proxy = Self {
            port: listener.local_addr().unwrap().port(),
            target,
            running: None,
        };
        proxy.serve(listener);
        proxy
    }

    /// Listens again on the same port.
    pub async fn start(&mut self) {
        assert!(self.running.is_none());
        let listener = TcpListener::bind(("127.0.0.1", self.port)).await.unwrap();
        self.serve(listener);
    }

    fn serve(&mut self, listener: TcpListener) {
        let stopped = Arc::new(AtomicBool::new(false));
        let target = self.target;
        let flag = stopped.clone();
        let task = tokio::spawn(async move {
            let mut connections = tokio::task::JoinSet::new();
            loop {
                let mut inbound = match listener.accept().await {
                    Ok((inbound, _)) => inbound,
                    Err(error) => {
                        eprintln!("proxy: accept failed: {error}");
                        continue;
                    }
                };
                if flag.load(Ordering::SeqCst) {
                    break;
                }
                connections.spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(("127.0.0.1", target)).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
            }
            // Dropping the set aborts every open connection.
            drop(connections);
        });
        self.running = Some((task, stopped));
    }

    /// Cuts every connection and stops listening.
    pub async fn stop(&mut self) {
        if let Some((task, stopped)) = self.running.take() {
            stopped.store(true, Ordering::SeqCst);
            task.abort();
            let _ = task.await;
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some((task, _)) = self.running.take() {
            task.abort();
        }
    }
}
