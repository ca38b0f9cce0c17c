//! WebSocket benchmarks for `GET /v1/ws` (scripts/bench.sh runs them: `ONLY=ws`).
//!
//! - `connections`: opens N authenticated connections to one node, each subscribed to
//!   `dashboard`, and reports the server's resident memory per idle connection (VmRSS of
//!   `--server-pid`, before and after, each read once it has settled), after checking that the
//!   server's `essayflow_ws_connections` gauge counts exactly the connections held.
//! - `latency`: K connections, each subscribed to its own batch, and commands (one essay each)
//!   at a target rate, open loop (sequential per batch, many batches in flight). Reports the
//!   time from a command's 202 to its change on the WebSocket, and the HTTP latency (request
//!   sent to 202) of the same run as the baseline; checks that every change arrived, with
//!   contiguous versions per topic.
//! - `fanout`: S connections subscribed to one batch; R rounds of one command each; the time
//!   from the 202 until every subscriber received the change.
//! - `scrape`: the cost of a `/metrics` scrape (time to the whole answer, and its bytes;
//!   p50/p99 over `--scrapes` scrapes) with no WebSocket open, then with `--connections`
//!   subscribed connections held: the scrape must not grow with the connections.
//! - `baseline-server`: a bare tokio-tungstenite server (no authentication, no database, the
//!   same buffer sizes as essayflow's upgrade). `connections` and `fanout` target it with
//!   `--target baseline`: it ignores what clients send except the text `fanout`, on which it
//!   sends one small message to every connected client.
//!
//! Loopback only; bounded in count and in time. Progress goes to stderr; the figures to
//! stdout, as plain lines and then as one JSON line. The exit status is 1 when a check failed
//! (the figures are printed first).
//!
//! One source address has only ~28 000 ephemeral ports towards one server port, so client
//! sockets bind to rotating source addresses: 127.0.0.1, 127.0.0.2, ... (a new one every
//! `--per-source-address` connections; the whole of 127.0.0.0/8 is loopback on Linux).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use futures::{SinkExt, StreamExt};
use serde::Deserialize;
use serde::de::IgnoredAny;
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{Semaphore, broadcast, mpsc, watch};
use tokio::task::JoinSet;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::{HeaderValue, header};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};

type Ws = WebSocketStream<TcpStream>;

/// The largest batch the benchmarks register; one command less than this keeps every command
/// at exactly one change (the last essay would also make the batch ready: a second change).
const BATCH_SIZE: usize = 1000;
const ESSAY_TEXT: &str = "A short essay for the WebSocket benchmark.";

#[derive(Parser)]
#[command(
    name = "essayflow-ws-bench",
    about = "WebSocket load generator for essayflow (loopback only)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Hold N idle, authenticated, subscribed connections: server memory per connection.
    Connections(ConnectionsArgs),
    /// Change latency under a command load, with the HTTP 202 latency as the baseline.
    Latency(LatencyArgs),
    /// Time until every subscriber of one batch received a change.
    Fanout(FanoutArgs),
    /// The cost of a `/metrics` scrape with no connection open, then with N open.
    Scrape(ScrapeArgs),
    /// A bare tokio-tungstenite server: the baseline for `connections` and `fanout`.
    BaselineServer(BaselineArgs),
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Target {
    /// essayflow's `GET /v1/ws`: authenticated, subscribed connections.
    Essayflow,
    /// `essayflow-ws-bench baseline-server`: no authentication, no subscription.
    Baseline,
}

impl Target {
    fn name(self) -> &'static str {
        match self {
            Target::Essayflow => "essayflow",
            Target::Baseline => "baseline",
        }
    }
}

#[derive(Args, Clone)]
struct ConnArgs {
    /// The server: http://127.0.0.1:PORT (essayflow's base URL, or the baseline server's).
    #[arg(long)]
    url: String,
    /// A teacher's access token (essayflow only).
    #[arg(long, env = "ESSAYFLOW_BENCH_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// essayflow's operations listener (`ESSAYFLOW_OPS_BIND`), http://127.0.0.1:PORT, where
    /// `/metrics` is read without authentication (on the main listener it needs an admin).
    #[arg(long, env = "ESSAYFLOW_BENCH_METRICS_URL")]
    metrics_url: Option<String>,
    /// The first source address of client sockets.
    #[arg(long, default_value = "127.0.0.1")]
    source_address: Ipv4Addr,
    /// Move to the next source address after this many connections.
    #[arg(long, default_value_t = 20_000)]
    per_source_address: usize,
    /// Connections being opened at once while ramping up.
    #[arg(long, default_value_t = 200)]
    concurrency: usize,
    /// Give up on one connection (TCP, upgrade, subscription) after this many seconds.
    #[arg(long, default_value_t = 30)]
    connect_timeout_secs: u64,
    /// Stop opening connections after this many seconds.
    #[arg(long, default_value_t = 300)]
    ramp_timeout_secs: u64,
}

#[derive(Args)]
struct ScrapeArgs {
    #[command(flatten)]
    conn: ConnArgs,
    /// Scrapes timed in each state (none open, N open).
    #[arg(long, default_value_t = 200)]
    scrapes: usize,
    /// Connections held (each subscribed to `dashboard`) during the second series.
    #[arg(long, default_value_t = 10_000)]
    connections: usize,
}

#[derive(Args)]
struct ConnectionsArgs {
    #[command(flatten)]
    conn: ConnArgs,
    #[arg(long, value_enum, default_value = "essayflow")]
    target: Target,
    #[arg(long, default_value_t = 50_000)]
    connections: usize,
    /// The server's process id, for its resident memory (/proc/<pid>/status).
    #[arg(long)]
    server_pid: Option<u32>,
    /// Wait at most this long for the server's memory to settle.
    #[arg(long, default_value_t = 30)]
    settle_secs: u64,
    /// Keep the connections open this much longer once measured.
    #[arg(long, default_value_t = 0)]
    hold_secs: u64,
}

#[derive(Args)]
struct LatencyArgs {
    #[command(flatten)]
    conn: ConnArgs,
    /// Connections, each subscribed to its own batch.
    #[arg(long, default_value_t = 200)]
    connections: usize,
    /// Commands per second, across all batches.
    #[arg(long, default_value_t = 1000.0)]
    rate: f64,
    /// Seconds of load.
    #[arg(long, default_value_t = 20)]
    duration: u64,
    /// After the last command, wait at most this long for the remaining changes.
    #[arg(long, default_value_t = 10)]
    grace_secs: u64,
    /// Beside the load, one class of this many essays (about 500 words each) runs `ai_feedback`
    /// from the first command on (the server runs the development processor): one tenant's big
    /// batch, to show whether it slows the others. 0: none.
    #[arg(long, default_value_t = 0)]
    beside_class: usize,
}

#[derive(Args)]
struct FanoutArgs {
    #[command(flatten)]
    conn: ConnArgs,
    #[arg(long, value_enum, default_value = "essayflow")]
    target: Target,
    /// Connections, all subscribed to one batch.
    #[arg(long, default_value_t = 10_000)]
    subscribers: usize,
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Give up on a round after this many seconds.
    #[arg(long, default_value_t = 30)]
    round_timeout_secs: u64,
    /// Pause between rounds, in milliseconds.
    #[arg(long, default_value_t = 500)]
    pause_ms: u64,
}

#[derive(Args)]
struct BaselineArgs {
    #[arg(long)]
    port: u16,
    #[arg(long, default_value = "127.0.0.1")]
    bind: Ipv4Addr,
}

// ---- what the server sends ------------------------------------------------------------------

/// A server message; `D` is what of `data` is read.
#[derive(Deserialize)]
struct Frame<D = IgnoredAny> {
    #[serde(rename = "type")]
    kind: String,
    // A missing `Option` field is `None`.
    version: Option<i64>,
    code: Option<String>,
    /// A change's JSON Patch (RFC 6902).
    patch: Option<Vec<D>>,
}

/// The part of a batch change's patch the latency scenario reads: an essay added
/// (`{"op": "add", "path": "/essays/<n>", "value": {"essay_id": ...}}`).
#[derive(Deserialize)]
struct PatchOp {
    path: String,
    #[serde(default)]
    value: Option<Value>,
}

// ---- connections ----------------------------------------------------------------------------

/// Where and how to connect.
struct Endpoint {
    addr: SocketAddrV4,
    /// `http://127.0.0.1:PORT`
    base: String,
    ws_url: String,
    token: Option<String>,
    conn: ConnArgs,
}

impl Endpoint {
    fn new(conn: &ConnArgs, target: Target) -> anyhow::Result<Self> {
        let rest = conn
            .url
            .split_once("://")
            .map_or(conn.url.as_str(), |(_, rest)| rest);
        let host_port = rest.split('/').next().unwrap_or_default();
        let host_port = host_port.replace("localhost", "127.0.0.1");
        let addr: SocketAddrV4 = host_port
            .parse()
            .with_context(|| format!("--url {:?}: expected http://127.0.0.1:PORT", conn.url))?;
        if !addr.ip().is_loopback() || !conn.source_address.is_loopback() {
            bail!("the load generator only targets loopback addresses");
        }
        let token = match target {
            Target::Essayflow => Some(
                conn.token
                    .clone()
                    .context("--token (or ESSAYFLOW_BENCH_TOKEN) is required against essayflow")?,
            ),
            Target::Baseline => None,
        };
        let path = match target {
            Target::Essayflow => "/v1/ws",
            Target::Baseline => "/",
        };
        Ok(Self {
            addr,
            base: format!("http://{addr}"),
            ws_url: format!("ws://{addr}{path}"),
            token,
            conn: conn.clone(),
        })
    }

    fn token(&self) -> anyhow::Result<&str> {
        self.token.as_deref().context("no token")
    }

    /// The source address of connection `i`.
    fn source(&self, i: usize) -> Ipv4Addr {
        let step = u32::try_from(i / self.conn.per_source_address.max(1)).unwrap_or(u32::MAX);
        Ipv4Addr::from(u32::from(self.conn.source_address).saturating_add(step))
    }

    /// Opens connection `i`: TCP from its source address, then the upgrade.
    async fn open(&self, i: usize) -> anyhow::Result<Ws> {
        let source = self.source(i);
        if !source.is_loopback() {
            bail!("source address {source} is outside 127.0.0.0/8");
        }
        let socket = TcpSocket::new_v4().context("socket")?;
        socket
            .bind(SocketAddr::new(source.into(), 0))
            .context("bind")?;
        let stream = socket
            .connect(SocketAddr::V4(self.addr))
            .await
            .context("connect")?;
        stream.set_nodelay(true).context("connect")?;
        let mut request = self
            .ws_url
            .as_str()
            .into_client_request()
            .context("request")?;
        if let Some(token) = &self.token {
            let value = HeaderValue::from_str(&format!("Bearer {token}")).context("token")?;
            request.headers_mut().insert(header::AUTHORIZATION, value);
        }
        let (ws, _) =
            tokio_tungstenite::client_async_with_config(request, stream, Some(client_config()))
                .await
                .context("upgrade")?;
        Ok(ws)
    }
}

/// Small buffers on the client too: it holds as many connections as the server.
fn client_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0)
}

/// What essayflow's upgrade sets (api/src/routes/ws.rs, with the default 4 KiB message limit).
fn server_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0)
        .max_message_size(Some(4096))
        .max_frame_size(Some(4096))
}

/// Subscribes and waits for the snapshot; returns its version.
async fn subscribe(ws: &mut Ws, topic: &str, min_position: Option<i64>) -> anyhow::Result<i64> {
    let mut request = json!({ "type": "subscribe", "topic": topic });
    if let Some(position) = min_position {
        request["min_position"] = json!(position);
    }
    ws.send(Message::text(request.to_string()))
        .await
        .context("subscribe")?;
    while let Some(message) = ws.next().await {
        let text = match message.context("subscribe")? {
            Message::Text(text) => text,
            Message::Close(frame) => {
                let reason = frame.map(|f| f.to_string()).unwrap_or_default();
                bail!("subscribe: closed by the server ({reason})");
            }
            _ => continue,
        };
        let frame: Frame =
            serde_json::from_str(text.as_str()).context("subscribe: unreadable message")?;
        match frame.kind.as_str() {
            "snapshot" => return Ok(frame.version.unwrap_or(0)),
            "error" => bail!("subscribe: refused ({})", frame.code.unwrap_or_default()),
            _ => {}
        }
    }
    bail!("subscribe: closed before the snapshot")
}

/// Closes with a close handshake, bounded.
async fn close(mut ws: Ws) {
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        let _ = ws.close(None).await;
        while let Some(Ok(_)) = ws.next().await {}
    })
    .await;
}

/// One connection that opened (and subscribed, against essayflow).
struct Opened {
    index: usize,
    ws: Ws,
    /// The snapshot's version (0 without a subscription).
    version: i64,
}

struct Ramp {
    opened: usize,
    failures: BTreeMap<String, u64>,
    seconds: f64,
}

impl Ramp {
    fn failed(&self) -> u64 {
        self.failures.values().sum()
    }
}

/// Opens connections `0..n` with bounded concurrency and time; connection `i` subscribes to
/// `subscriptions[i % len]` (none when empty). Each one is handed to `on_open` as soon as it
/// is open, so that it is read (and its pings answered) while the others open.
async fn open_many(
    endpoint: &Arc<Endpoint>,
    n: usize,
    subscriptions: Arc<Vec<(String, Option<i64>)>>,
    label: &str,
    mut on_open: impl FnMut(Opened),
) -> Ramp {
    let conn = &endpoint.conn;
    let semaphore = Arc::new(Semaphore::new(conn.concurrency.max(1)));
    let started = Instant::now();
    let deadline = started + Duration::from_secs(conn.ramp_timeout_secs);
    let attempt_timeout = Duration::from_secs(conn.connect_timeout_secs);
    let mut set = JoinSet::new();
    for i in 0..n {
        let (endpoint, semaphore) = (endpoint.clone(), semaphore.clone());
        let subscriptions = subscriptions.clone();
        set.spawn(async move {
            let _permit = semaphore
                .acquire_owned()
                .await
                .map_err(|_| "semaphore closed".to_owned())?;
            if Instant::now() >= deadline {
                return Err("not attempted: the ramp timed out".to_owned());
            }
            let attempt = async {
                let mut ws = endpoint.open(i).await?;
                let mut version = 0;
                if !subscriptions.is_empty() {
                    let (topic, min_position) = &subscriptions[i % subscriptions.len()];
                    version = subscribe(&mut ws, topic, *min_position).await?;
                }
                anyhow::Ok(Opened {
                    index: i,
                    ws,
                    version,
                })
            };
            match tokio::time::timeout(attempt_timeout, attempt).await {
                Ok(Ok(opened)) => Ok(opened),
                Ok(Err(error)) => Err(format!("{error:#}").chars().take(120).collect()),
                Err(_) => Err(format!("timed out after {attempt_timeout:?}")),
            }
        });
    }
    let mut ramp = Ramp {
        opened: 0,
        failures: BTreeMap::new(),
        seconds: 0.0,
    };
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    let progress = |ramp: &Ramp| {
        let elapsed = started.elapsed().as_secs_f64();
        eprintln!(
            "{label}: {}/{n} open, {} failed, {:.0} connections/s, {elapsed:.0} s",
            ramp.opened,
            ramp.failed(),
            ramp.opened as f64 / elapsed.max(1e-9),
        );
    };
    loop {
        tokio::select! {
            joined = set.join_next() => match joined {
                None => break,
                Some(Ok(Ok(opened))) => {
                    ramp.opened += 1;
                    on_open(opened);
                }
                Some(Ok(Err(kind))) => *ramp.failures.entry(kind).or_default() += 1,
                Some(Err(error)) => *ramp.failures.entry(format!("task: {error}")).or_default() += 1,
            },
            _ = tick.tick() => progress(&ramp),
        }
    }
    ramp.seconds = started.elapsed().as_secs_f64();
    progress(&ramp);
    for (kind, count) in &ramp.failures {
        eprintln!("{label}: failed {count} x {kind}");
    }
    ramp
}

/// Reads until told to stop (answering pings), then closes; counts connections that ended.
async fn hold(mut ws: Ws, mut stop: watch::Receiver<bool>, dropped: Arc<AtomicUsize>) {
    loop {
        tokio::select! {
            changed = stop.changed() => {
                if changed.is_err() || *stop.borrow() {
                    break;
                }
            }
            message = ws.next() => match message {
                Some(Ok(Message::Close(_)) | Err(_)) | None => {
                    dropped.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                Some(Ok(_)) => {}
            },
        }
    }
    close(ws).await;
}

/// Closes every reader and waits (bounded) for them.
async fn stop_all<T: 'static>(stop: &watch::Sender<bool>, tasks: &mut JoinSet<T>) -> Vec<T> {
    let _ = stop.send(true);
    let mut results = Vec::with_capacity(tasks.len());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while let Ok(Some(joined)) = tokio::time::timeout_at(deadline, tasks.join_next()).await {
        if let Ok(result) = joined {
            results.push(result);
        }
    }
    tasks.abort_all();
    results
}

// ---- measurements ---------------------------------------------------------------------------

fn rss_kib(pid: &str) -> anyhow::Result<u64> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .with_context(|| format!("no VmRSS in {path}"))
}

/// VmRSS once four samples half a second apart are within 0.5 % (or after `max_wait`).
async fn settled_rss(pid: u32, max_wait: Duration, what: &str) -> anyhow::Result<u64> {
    let pid = pid.to_string();
    let deadline = Instant::now() + max_wait;
    let mut samples = vec![rss_kib(&pid)?];
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let rss = rss_kib(&pid)?;
        samples.push(rss);
        let last = &samples[samples.len().saturating_sub(4)..];
        let (low, high) = (
            last.iter().copied().min().unwrap_or(0),
            last.iter().copied().max().unwrap_or(0),
        );
        if last.len() == 4 && high - low <= high / 200 {
            eprintln!("server memory {what}: {rss} KiB (settled)");
            return Ok(rss);
        }
        if Instant::now() >= deadline {
            eprintln!("server memory {what}: {rss} KiB (still moving after {max_wait:?})");
            return Ok(rss);
        }
    }
}

/// The soft limit on open files of this process.
fn open_files_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

fn check_open_files(connections: usize) {
    if let Some(limit) = open_files_limit()
        && (connections as u64) + 64 > limit
    {
        eprintln!(
            "warning: {connections} connections need more open files than this process may have \
             ({limit}); raise `ulimit -n`"
        );
    }
}

/// A gauge or counter without labels from the Prometheus text of `{base}/metrics` (the
/// operations listener).
async fn metric(http: &reqwest::Client, base: &str, name: &str) -> anyhow::Result<f64> {
    let text = http
        .get(format!("{base}/metrics"))
        .send()
        .await?
        .error_for_status()?
        .text()
        .await?;
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .find_map(|line| {
            let mut parts = line.split_whitespace();
            (parts.next()? == name).then(|| parts.next()?.parse().ok())?
        })
        .with_context(|| format!("no {name} in /metrics"))
}

fn millis(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

/// `later - earlier` in milliseconds; `None` when negative.
fn since(later: Instant, earlier: Instant) -> Option<f64> {
    later.checked_duration_since(earlier).map(millis)
}

fn sorted(mut values: Vec<f64>) -> Vec<f64> {
    values.sort_by(f64::total_cmp);
    values
}

fn round2(v: f64) -> f64 {
    (v * 100.0).round() / 100.0
}

fn http_client(pool: usize) -> anyhow::Result<reqwest::Client> {
    reqwest::Client::builder()
        .no_proxy()
        .tcp_nodelay(true)
        .pool_max_idle_per_host(pool)
        .timeout(Duration::from_secs(30))
        .build()
        .context("building the HTTP client")
}

async fn post(
    http: &reqwest::Client,
    url: &str,
    token: &str,
    body: &Value,
) -> anyhow::Result<Value> {
    let response = http.post(url).bearer_auth(token).json(body).send().await?;
    if response.status().as_u16() != 202 {
        bail!("{url}: {} {}", response.status(), response.text().await?);
    }
    Ok(response.json().await?)
}

/// Registers a batch of `essays` essays of about 500 words, all added: its id.
async fn register_class(
    http: &reqwest::Client,
    endpoint: &Endpoint,
    essays: usize,
) -> anyhow::Result<String> {
    const WORDS: [&str; 8] = [
        "homework",
        "improves",
        "discipline",
        "although",
        "students",
        "argue",
        "that",
        "rest",
    ];
    let token = endpoint.token()?;
    let batch = post(
        http,
        &format!("{}/v1/batches", endpoint.base),
        token,
        &json!({"title": "A class beside the load", "course_code": "WSBENCH", "expected_essay_count": essays}),
    )
    .await?;
    let id = batch["batch_id"]
        .as_str()
        .context("no batch_id")?
        .to_owned();
    for start in (0..essays).step_by(250) {
        let list: Vec<Value> = (start..essays.min(start + 250))
            .map(|i| {
                let text: Vec<&str> = (0..500)
                    .map(|w| WORDS[(i * 7 + w * 3) % WORDS.len()])
                    .collect();
                json!({"essay_id": format!("c{i:04}"), "title": "Essay", "text": text.join(" ")})
            })
            .collect();
        post(
            http,
            &format!("{}/v1/batches/{id}/essays", endpoint.base),
            token,
            &json!({"essays": list}),
        )
        .await?;
    }
    Ok(id)
}

/// Requests `ai_feedback` for `batch` at `at` and waits for it to complete: the seconds it took.
async fn run_class(
    http: reqwest::Client,
    endpoint: Arc<Endpoint>,
    batch: String,
    at: Instant,
) -> anyhow::Result<f64> {
    tokio::time::sleep_until(at.into()).await;
    let started = Instant::now();
    let token = endpoint.token()?.to_owned();
    post(
        &http,
        &format!("{}/v1/batches/{batch}/pipelines", endpoint.base),
        &token,
        &json!({"pipeline": "ai_feedback"}),
    )
    .await?;
    loop {
        let status: Value = http
            .get(format!("{}/v1/batches/{batch}/status", endpoint.base))
            .bearer_auth(&token)
            .send()
            .await?
            .json()
            .await?;
        if status["status"] == "completed" || status["status"] == "completed_with_failures" {
            return Ok(started.elapsed().as_secs_f64());
        }
        if started.elapsed() > Duration::from_secs(300) {
            bail!("the class beside the load did not complete in 300 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Registers `count` batches of `BATCH_SIZE` expected essays: (batch id, position).
async fn register_batches(
    http: &reqwest::Client,
    endpoint: &Endpoint,
    count: usize,
) -> anyhow::Result<Vec<(String, i64)>> {
    let token = endpoint.token()?;
    let url = format!("{}/v1/batches", endpoint.base);
    futures::stream::iter(0..count)
        .map(|i| {
            let url = &url;
            async move {
                let body = json!({
                    "title": format!("WebSocket benchmark {i}"),
                    "course_code": "WSBENCH",
                    "expected_essay_count": BATCH_SIZE,
                });
                let accepted = post(http, url, token, &body).await?;
                let id = accepted["batch_id"]
                    .as_str()
                    .context("no batch_id in the 202")?;
                let position = accepted["position"]
                    .as_i64()
                    .context("no position in the 202")?;
                anyhow::Ok((id.to_owned(), position))
            }
        })
        .buffered(16)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect()
}

/// What `main` prints.
struct Outcome {
    lines: Vec<String>,
    json: Value,
    /// Checks that failed.
    problems: Vec<String>,
}

impl Outcome {
    fn print(self) -> anyhow::Result<()> {
        for line in &self.lines {
            println!("{line}");
        }
        println!("{}", self.json);
        if !self.problems.is_empty() {
            bail!("check failed: {}", self.problems.join("; "));
        }
        Ok(())
    }
}

// ---- connections ----------------------------------------------------------------------------

async fn connections(args: ConnectionsArgs) -> anyhow::Result<Outcome> {
    let endpoint = Arc::new(Endpoint::new(&args.conn, args.target)?);
    let n = args.connections;
    check_open_files(n);
    let http = http_client(2)?;
    let settle = Duration::from_secs(args.settle_secs);
    let before = match args.server_pid {
        Some(pid) => Some(settled_rss(pid, settle.min(Duration::from_secs(10)), "before").await?),
        None => {
            eprintln!("no --server-pid: server memory is not measured");
            None
        }
    };
    let subscriptions = match args.target {
        Target::Essayflow => vec![("dashboard".to_owned(), None)],
        Target::Baseline => Vec::new(),
    };
    let (stop, stop_rx) = watch::channel(false);
    let dropped = Arc::new(AtomicUsize::new(0));
    let mut holders = JoinSet::new();
    let ramp = open_many(&endpoint, n, Arc::new(subscriptions), "connections", |o| {
        holders.spawn(hold(o.ws, stop_rx.clone(), dropped.clone()));
    })
    .await;
    let (opened, failed, ramp_seconds) = (ramp.opened, ramp.failed(), ramp.seconds);
    let after = match args.server_pid {
        Some(pid) => Some(settled_rss(pid, settle, "with the connections open").await?),
        None => None,
    };
    let held = opened - dropped.load(Ordering::Relaxed);
    let mut problems = Vec::new();
    let mut gauge = None;
    if args.target == Target::Essayflow {
        // The gauge counts a connection from its upgrade: poll briefly for stragglers.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let held = opened - dropped.load(Ordering::Relaxed);
            let metrics = endpoint.conn.metrics_url.as_deref().context(
                "--metrics-url (essayflow's operations listener, ESSAYFLOW_OPS_BIND) is needed to read /metrics",
            )?;
            let value = metric(&http, metrics, "essayflow_ws_connections").await?;
            gauge = Some(value);
            if value == held as f64 || Instant::now() >= deadline {
                if value != held as f64 {
                    problems.push(format!(
                        "essayflow_ws_connections is {value}, {held} connections are held"
                    ));
                }
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    if args.hold_secs > 0 {
        eprintln!("holding for {} s", args.hold_secs);
        tokio::time::sleep(Duration::from_secs(args.hold_secs)).await;
    }
    let dropped_now = dropped.load(Ordering::Relaxed);
    let generator_rss = rss_kib("self").ok();
    eprintln!("closing {} connections", opened - dropped_now);
    stop_all(&stop, &mut holders).await;
    if opened < n {
        problems.push(format!("{} of {n} connections failed to open", n - opened));
    }
    if dropped_now > 0 {
        problems.push(format!("{dropped_now} connections ended while held"));
    }
    let per_connection = match (before, after) {
        (Some(b), Some(a)) if held > 0 => Some((a as f64 - b as f64) / held as f64),
        _ => None,
    };
    let target = args.target.name();
    let mut lines = vec![
        format!(
            "connections ({target}): {held} of {n} held, {failed} failed to open, {dropped_now} dropped \
             while held; opened in {ramp_seconds:.1} s ({:.0}/s)",
            opened as f64 / ramp_seconds.max(1e-9)
        ),
        match (before, after, per_connection) {
            (Some(b), Some(a), Some(per)) => format!(
                "server memory: {b} KiB before, {a} KiB with {held} idle connections: {per:.2} KiB per connection"
            ),
            _ => "server memory: not measured".to_owned(),
        },
    ];
    if let Some(value) = gauge {
        lines.push(format!(
            "essayflow_ws_connections = {value} (expected {held})"
        ));
    }
    if let Some(rss) = generator_rss {
        lines.push(format!("generator memory: {rss} KiB"));
    }
    for (kind, count) in &ramp.failures {
        lines.push(format!("failure: {count} x {kind}"));
    }
    let json = json!({
        "scenario": "connections",
        "target": target,
        "requested": n,
        "opened": opened,
        "held": held,
        "failed": failed,
        "dropped": dropped_now,
        "open_seconds": round2(ramp_seconds),
        "connections_per_second": round2(opened as f64 / ramp_seconds.max(1e-9)),
        "server_rss_before_kib": before,
        "server_rss_after_kib": after,
        "kib_per_connection": per_connection.map(round2),
        "metrics_connections": gauge,
        "generator_rss_kib": generator_rss,
        "failures": ramp.failures,
    });
    Ok(Outcome {
        lines,
        json,
        problems,
    })
}

// ---- scrape ---------------------------------------------------------------------------------

/// Times of `scrapes` sequential `/metrics` scrapes (from the request to the last byte), in
/// ms, sorted, and their sizes in bytes, sorted.
async fn scrape_series(
    http: &reqwest::Client,
    base: &str,
    scrapes: usize,
) -> anyhow::Result<(Vec<f64>, Vec<f64>)> {
    let (mut times, mut bytes) = (Vec::with_capacity(scrapes), Vec::with_capacity(scrapes));
    for _ in 0..scrapes {
        let started = Instant::now();
        let body = http
            .get(format!("{base}/metrics"))
            .send()
            .await?
            .error_for_status()?
            .bytes()
            .await?;
        times.push(millis(started.elapsed()));
        bytes.push(body.len() as f64);
    }
    Ok((sorted(times), sorted(bytes)))
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

async fn scrape(args: ScrapeArgs) -> anyhow::Result<Outcome> {
    let endpoint = Arc::new(Endpoint::new(&args.conn, Target::Essayflow)?);
    let metrics =
        endpoint.conn.metrics_url.clone().context(
            "--metrics-url (essayflow's operations listener, ESSAYFLOW_OPS_BIND) is needed",
        )?;
    let n = args.connections;
    check_open_files(n);
    let http = http_client(2)?;
    // Warm-up: the first scrape reads the snapshot and makes the route series.
    scrape_series(&http, &metrics, 5).await?;
    let (idle_ms, idle_bytes) = scrape_series(&http, &metrics, args.scrapes).await?;
    let (stop, stop_rx) = watch::channel(false);
    let dropped = Arc::new(AtomicUsize::new(0));
    let mut holders = JoinSet::new();
    let subscriptions = Arc::new(vec![("dashboard".to_owned(), None)]);
    let ramp = open_many(&endpoint, n, subscriptions, "scrape", |o| {
        holders.spawn(hold(o.ws, stop_rx.clone(), dropped.clone()));
    })
    .await;
    let held = ramp.opened - dropped.load(Ordering::Relaxed);
    let gauge = metric(&http, &metrics, "essayflow_ws_connections").await?;
    let (busy_ms, busy_bytes) = scrape_series(&http, &metrics, args.scrapes).await?;
    let dropped_now = dropped.load(Ordering::Relaxed);
    stop_all(&stop, &mut holders).await;
    let mut problems = Vec::new();
    if ramp.opened < n {
        problems.push(format!(
            "{} of {n} connections failed to open",
            n - ramp.opened
        ));
    }
    if gauge != held as f64 {
        problems.push(format!(
            "essayflow_ws_connections is {gauge}, {held} were held"
        ));
    }
    if dropped_now > 0 {
        problems.push(format!("{dropped_now} connections ended while held"));
    }
    let figures = |ms: &[f64], bytes: &[f64]| {
        json!({
            "p50_ms": round2(percentile(ms, 0.5)),
            "p99_ms": round2(percentile(ms, 0.99)),
            "max_ms": round2(percentile(ms, 1.0)),
            "p50_bytes": percentile(bytes, 0.5),
            "max_bytes": percentile(bytes, 1.0),
        })
    };
    let (idle, busy) = (
        figures(&idle_ms, &idle_bytes),
        figures(&busy_ms, &busy_bytes),
    );
    let line = |what: &str, f: &Value| {
        format!(
            "{what}: {} scrapes, p50 {} ms, p99 {} ms, max {} ms, {} bytes (max {})",
            args.scrapes, f["p50_ms"], f["p99_ms"], f["max_ms"], f["p50_bytes"], f["max_bytes"]
        )
    };
    Ok(Outcome {
        lines: vec![
            line("no WebSocket open (baseline)", &idle),
            line(&format!("{held} WebSockets open"), &busy),
        ],
        json: json!({
            "scenario": "scrape",
            "scrapes": args.scrapes,
            "connections": held,
            "idle": idle,
            "busy": busy,
            "failures": ramp.failures,
        }),
        problems,
    })
}

// ---- latency --------------------------------------------------------------------------------

/// One command of the latency scenario.
struct Sent {
    essay_id: String,
    scheduled: Instant,
    sent: Instant,
    /// When the 202 arrived.
    accepted: Option<Instant>,
    error: Option<String>,
}

/// When command `i` (of `total`, across all batches) is due: `start + i / rate`; batch `b`
/// sends commands `b`, `b + batches`, `b + 2 batches`, ...
#[derive(Clone, Copy)]
struct Schedule {
    start: Instant,
    rate: f64,
    batches: usize,
    total: usize,
}

/// Sends batch `b`'s share of the commands, one after the other, each at its scheduled time
/// (or as soon as the previous one is answered, if that is later).
async fn send_commands(
    b: usize,
    url: String,
    token: String,
    http: reqwest::Client,
    schedule: Schedule,
    accepted: Arc<Vec<AtomicU64>>,
) -> Vec<Sent> {
    let mut sent = Vec::new();
    for (j, i) in (b..schedule.total).step_by(schedule.batches).enumerate() {
        let scheduled = schedule.start + Duration::from_secs_f64(i as f64 / schedule.rate);
        tokio::time::sleep_until(scheduled.into()).await;
        let essay_id = format!("b{b}-e{j}");
        let body =
            json!({ "essays": [{ "essay_id": essay_id, "title": "Essay", "text": ESSAY_TEXT }] });
        let at = Instant::now();
        let response = http.post(&url).bearer_auth(&token).json(&body).send().await;
        let answered = Instant::now();
        let mut record = Sent {
            essay_id,
            scheduled,
            sent: at,
            accepted: None,
            error: None,
        };
        match response {
            Ok(response) if response.status().as_u16() == 202 => {
                record.accepted = Some(answered);
                accepted[b].fetch_add(1, Ordering::Relaxed);
                let _ = response.bytes().await;
            }
            Ok(response) => {
                let status = response.status();
                let text = response.text().await.unwrap_or_default();
                record.error = Some(format!(
                    "{status} {}",
                    text.chars().take(200).collect::<String>()
                ));
            }
            Err(error) => record.error = Some(error.to_string()),
        }
        sent.push(record);
    }
    sent
}

/// One change received.
struct Received {
    essay_id: Option<String>,
    at: Instant,
}

#[derive(Default)]
struct BatchReader {
    changes: Vec<Received>,
    /// Versions that skipped ahead (something missing) or went back (a duplicate).
    gaps: u64,
    duplicates: u64,
    /// Snapshots after the first: the server caught the topic up by a snapshot.
    snapshots: u64,
    lagged: u64,
    errors: Vec<String>,
    closed: bool,
}

/// What a reader got next.
enum Next {
    Text(Utf8Bytes),
    /// The run is over.
    Stopped,
    /// The server closed the connection, or it broke.
    Closed,
}

/// The next text message (pings and other frames are skipped), until `stop` says so.
async fn next_text(ws: &mut Ws, stop: &mut watch::Receiver<bool>) -> Next {
    loop {
        let message = tokio::select! {
            changed = stop.changed() => {
                if changed.is_err() || *stop.borrow() {
                    return Next::Stopped;
                }
                continue;
            }
            message = ws.next() => message,
        };
        match message {
            Some(Ok(Message::Text(text))) => return Next::Text(text),
            Some(Ok(Message::Close(_)) | Err(_)) | None => return Next::Closed,
            Some(Ok(_)) => continue,
        }
    }
}

/// Reads batch `b`'s topic: every change, its receive time and the essay it is about.
async fn read_batch(
    b: usize,
    mut ws: Ws,
    mut last: i64,
    mut stop: watch::Receiver<bool>,
    received: Arc<Vec<AtomicU64>>,
) -> BatchReader {
    let mut report = BatchReader::default();
    loop {
        let text = match next_text(&mut ws, &mut stop).await {
            Next::Text(text) => text,
            Next::Stopped => break,
            Next::Closed => {
                report.closed = true;
                return report;
            }
        };
        let at = Instant::now();
        let frame: Frame<PatchOp> = match serde_json::from_str(text.as_str()) {
            Ok(frame) => frame,
            Err(error) => {
                report.errors.push(format!("unreadable message: {error}"));
                continue;
            }
        };
        let version = frame.version.unwrap_or(0);
        match frame.kind.as_str() {
            "change" => {
                if version > last + 1 {
                    report.gaps += 1;
                } else if version <= last {
                    report.duplicates += 1;
                }
                last = last.max(version);
                report.changes.push(Received {
                    essay_id: frame
                        .patch
                        .unwrap_or_default()
                        .into_iter()
                        .rev()
                        .find(|op| op.path.starts_with("/essays/"))
                        .and_then(|op| Some(op.value?.get("essay_id")?.as_str()?.to_owned())),
                    at,
                });
                received[b].fetch_add(1, Ordering::Relaxed);
            }
            "snapshot" => {
                report.snapshots += 1;
                last = version;
            }
            "lagged" => report.lagged += 1,
            "error" => report.errors.push(frame.code.unwrap_or_default()),
            _ => {}
        }
    }
    close(ws).await;
    report
}

async fn latency(args: LatencyArgs) -> anyhow::Result<Outcome> {
    let endpoint = Arc::new(Endpoint::new(&args.conn, Target::Essayflow)?);
    let k = args.connections.max(1);
    if args.rate.is_nan() || args.rate <= 0.0 {
        bail!("--rate must be positive");
    }
    let total = (args.rate * args.duration as f64).round() as usize;
    if total.div_ceil(k) >= BATCH_SIZE {
        bail!(
            "{total} commands over {k} batches is more than {} per batch: more --connections or less --rate x --duration",
            BATCH_SIZE - 1
        );
    }
    check_open_files(k);
    let http = http_client(k)?;
    eprintln!("latency: registering {k} batches");
    let batches = register_batches(&http, &endpoint, k).await?;
    let subscriptions = batches
        .iter()
        .map(|(id, position)| (format!("batch:{id}"), Some(*position)))
        .collect();
    let counters = || Arc::new((0..k).map(|_| AtomicU64::new(0)).collect::<Vec<_>>());
    let (received, accepted) = (counters(), counters());
    let (stop, stop_rx) = watch::channel(false);
    let mut readers = JoinSet::new();
    let ramp = open_many(&endpoint, k, Arc::new(subscriptions), "latency", |o| {
        let (stop_rx, received) = (stop_rx.clone(), received.clone());
        readers.spawn(read_batch(o.index, o.ws, o.version, stop_rx, received));
    })
    .await;
    if ramp.opened < k {
        bail!(
            "only {} of {k} connections opened: {:?}",
            ramp.opened,
            ramp.failures
        );
    }

    let class = if args.beside_class > 0 {
        eprintln!(
            "latency: a class of {} essays beside the load",
            args.beside_class
        );
        Some(register_class(&http, &endpoint, args.beside_class).await?)
    } else {
        None
    };
    eprintln!(
        "latency: {total} commands at {} commands/s over {k} batches",
        args.rate
    );
    let start = Instant::now() + Duration::from_millis(200);
    let class_run =
        class.map(|id| tokio::spawn(run_class(http.clone(), endpoint.clone(), id, start)));
    let schedule = Schedule {
        start,
        rate: args.rate,
        batches: k,
        total,
    };
    let token = endpoint.token()?.to_owned();
    let mut senders = JoinSet::new();
    for (b, (id, _)) in batches.iter().enumerate() {
        let url = format!("{}/v1/batches/{id}/essays", endpoint.base);
        senders.spawn(send_commands(
            b,
            url,
            token.clone(),
            http.clone(),
            schedule,
            accepted.clone(),
        ));
    }
    let sum = |counters: &[AtomicU64]| {
        counters
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .sum::<u64>()
    };
    let mut commands = Vec::with_capacity(total);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    loop {
        tokio::select! {
            joined = senders.join_next() => match joined {
                None => break,
                Some(Ok(sent)) => commands.extend(sent),
                Some(Err(error)) => bail!("a command sender failed: {error}"),
            },
            _ = tick.tick() => eprintln!(
                "latency: {} commands accepted, {} changes received, {:.0} s",
                sum(&accepted),
                sum(&received),
                start.elapsed().as_secs_f64()
            ),
        }
    }
    // The remaining changes.
    let grace = Instant::now() + Duration::from_secs(args.grace_secs);
    while Instant::now() < grace
        && (0..k).any(|b| received[b].load(Ordering::Relaxed) < accepted[b].load(Ordering::Relaxed))
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let reports = stop_all(&stop, &mut readers).await;
    if reports.len() < k {
        bail!("{} of {k} readers did not finish", k - reports.len());
    }
    let class_seconds = match class_run {
        Some(run) => Some(run.await.context("the class beside the load")??),
        None => None,
    };

    let by_essay: HashMap<&str, &Sent> =
        commands.iter().map(|s| (s.essay_id.as_str(), s)).collect();
    let mut seen = HashSet::new();
    let (mut after_202, mut end_to_end) = (Vec::new(), Vec::new());
    let (mut before_202, mut unmatched) = (0u64, 0u64);
    for change in reports.iter().flat_map(|r| &r.changes) {
        let Some(sent) = change.essay_id.as_deref().and_then(|id| by_essay.get(id)) else {
            unmatched += 1;
            continue;
        };
        if !seen.insert(sent.essay_id.as_str()) {
            continue;
        }
        end_to_end.push(since(change.at, sent.sent).unwrap_or(0.0));
        if let Some(accepted) = sent.accepted {
            after_202.push(since(change.at, accepted).unwrap_or_else(|| {
                before_202 += 1;
                0.0
            }));
        }
    }
    let ok: Vec<&Sent> = commands.iter().filter(|s| s.accepted.is_some()).collect();
    let missing = ok
        .iter()
        .filter(|s| !seen.contains(s.essay_id.as_str()))
        .count();
    let errors: Vec<&str> = commands.iter().filter_map(|s| s.error.as_deref()).collect();
    let http_ms = sorted(
        ok.iter()
            .filter_map(|s| s.accepted.and_then(|a| since(a, s.sent)))
            .collect(),
    );
    let behind = commands
        .iter()
        .filter_map(|s| since(s.sent, s.scheduled))
        .fold(0.0, f64::max);
    let last_accepted = ok.iter().filter_map(|s| s.accepted).max();
    let seconds = last_accepted.and_then(|l| since(l, start)).unwrap_or(0.0) / 1000.0;
    let rate = ok.len() as f64 / seconds.max(1e-9);
    let after_202 = sorted(after_202);
    let end_to_end = sorted(end_to_end);
    let total_of = |f: fn(&BatchReader) -> u64| reports.iter().map(f).sum::<u64>();
    let gaps = total_of(|r| r.gaps);
    let duplicates = total_of(|r| r.duplicates);
    let snapshots = total_of(|r| r.snapshots);
    let lagged = total_of(|r| r.lagged);
    let closed = reports.iter().filter(|r| r.closed).count();
    let server_errors: Vec<&String> = reports.iter().flat_map(|r| &r.errors).collect();
    let changes = reports.iter().map(|r| r.changes.len()).sum::<usize>();

    let mut problems = Vec::new();
    if missing > 0 {
        problems.push(format!("{missing} accepted commands had no change"));
    }
    if !errors.is_empty() {
        problems.push(format!(
            "{} commands failed (first: {})",
            errors.len(),
            errors[0]
        ));
    }
    if gaps + duplicates + snapshots + lagged > 0 {
        problems.push(format!(
            "versions not contiguous: {gaps} gaps, {duplicates} duplicates, {snapshots} later snapshots, {lagged} lagged"
        ));
    }
    if unmatched > 0 {
        problems.push(format!("{unmatched} changes matched no command"));
    }
    if closed > 0 {
        problems.push(format!("{closed} connections ended early"));
    }
    if !server_errors.is_empty() {
        problems.push(format!("server errors: {server_errors:?}"));
    }
    let p = |v: &[f64], q: f64| round2(bench::percentile(v, q).unwrap_or(0.0));
    let lines = vec![
        format!(
            "latency: {k} connections, each on its own batch; {} of {} commands accepted in {seconds:.1} s: \
             {rate:.0} commands/s (target {}); at most {behind:.0} ms behind schedule",
            ok.len(),
            commands.len(),
            args.rate
        ),
        format!(
            "change after its 202: p50 {} ms, p99 {} ms, max {} ms ({before_202} arrived before the 202, counted as 0)",
            p(&after_202, 0.5),
            p(&after_202, 0.99),
            p(&after_202, 1.0)
        ),
        format!(
            "baseline, HTTP request to 202: p50 {} ms, p99 {} ms, max {} ms",
            p(&http_ms, 0.5),
            p(&http_ms, 0.99),
            p(&http_ms, 1.0)
        ),
        format!(
            "request to change: p50 {} ms, p99 {} ms",
            p(&end_to_end, 0.5),
            p(&end_to_end, 0.99)
        ),
        format!(
            "changes: {changes} received, {missing} missing, {gaps} gaps, {duplicates} duplicates, \
             {snapshots} later snapshots, {lagged} lagged, {unmatched} unmatched"
        ),
    ];
    let mut lines = lines;
    if let Some(seconds) = class_seconds {
        lines.push(format!(
            "beside the load: a class of {} essays ran ai_feedback in {seconds:.2} s",
            args.beside_class
        ));
    }
    let json = json!({
        "scenario": "latency",
        "connections": k,
        "target_rate": args.rate,
        "commands": commands.len(),
        "accepted": ok.len(),
        "errors": errors.len(),
        "seconds": round2(seconds),
        "commands_per_second": round2(rate),
        "behind_schedule_max_ms": round2(behind),
        "change_p50_ms": p(&after_202, 0.5),
        "change_p99_ms": p(&after_202, 0.99),
        "change_max_ms": p(&after_202, 1.0),
        "change_before_202": before_202,
        "http_p50_ms": p(&http_ms, 0.5),
        "http_p99_ms": p(&http_ms, 0.99),
        "http_max_ms": p(&http_ms, 1.0),
        "end_to_end_p50_ms": p(&end_to_end, 0.5),
        "end_to_end_p99_ms": p(&end_to_end, 0.99),
        "changes": changes,
        "missing": missing,
        "gaps": gaps,
        "duplicates": duplicates,
        "later_snapshots": snapshots,
        "lagged": lagged,
        "unmatched": unmatched,
        "beside_class": args.beside_class,
        "beside_class_seconds": class_seconds.map(round2),
    });
    Ok(Outcome {
        lines,
        json,
        problems,
    })
}

// ---- fan-out --------------------------------------------------------------------------------

/// Forwards the version and receive time of every change; counts anything else.
async fn read_versions(
    mut ws: Ws,
    mut stop: watch::Receiver<bool>,
    changes: mpsc::UnboundedSender<(i64, Instant)>,
    other: Arc<AtomicU64>,
    dropped: Arc<AtomicUsize>,
) {
    loop {
        let text = match next_text(&mut ws, &mut stop).await {
            Next::Text(text) => text,
            Next::Stopped => break,
            Next::Closed => {
                dropped.fetch_add(1, Ordering::Relaxed);
                return;
            }
        };
        let at = Instant::now();
        match serde_json::from_str::<Frame>(text.as_str()) {
            Ok(frame) if frame.kind == "change" => {
                let _ = changes.send((frame.version.unwrap_or(0), at));
            }
            _ => {
                other.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    close(ws).await;
}

async fn fanout(args: FanoutArgs) -> anyhow::Result<Outcome> {
    let endpoint = Arc::new(Endpoint::new(&args.conn, args.target)?);
    let s = args.subscribers.max(1);
    if args.rounds >= BATCH_SIZE {
        bail!("at most {} rounds", BATCH_SIZE - 1);
    }
    check_open_files(s + 1);
    let http = http_client(2)?;
    let batch = match args.target {
        Target::Essayflow => {
            eprintln!("fanout: registering a batch");
            let mut batches = register_batches(&http, &endpoint, 1).await?;
            Some(batches.pop().context("no batch registered")?)
        }
        Target::Baseline => None,
    };
    let subscriptions = batch
        .iter()
        .map(|(id, position)| (format!("batch:{id}"), Some(*position)))
        .collect();
    let (stop, stop_rx) = watch::channel(false);
    let (changes_tx, mut changes) = mpsc::unbounded_channel();
    let other = Arc::new(AtomicU64::new(0));
    let dropped = Arc::new(AtomicUsize::new(0));
    let mut readers = JoinSet::new();
    let mut versions = BTreeMap::<i64, usize>::new();
    let ramp = open_many(&endpoint, s, Arc::new(subscriptions), "fanout", |o| {
        *versions.entry(o.version).or_default() += 1;
        readers.spawn(read_versions(
            o.ws,
            stop_rx.clone(),
            changes_tx.clone(),
            other.clone(),
            dropped.clone(),
        ));
    })
    .await;
    drop(changes_tx);
    let (opened, failed) = (ramp.opened, ramp.failed());
    if opened == 0 {
        bail!("no connection opened: {:?}", ramp.failures);
    }
    let mut problems = Vec::new();
    if opened < s {
        problems.push(format!("{} of {s} connections failed to open", s - opened));
    }
    // Against essayflow every subscriber starts from the same snapshot; round r's change is
    // the next version. The baseline's first message of a round tells its number.
    let first_version = match args.target {
        Target::Essayflow => {
            if versions.len() > 1 {
                problems.push(format!(
                    "the subscribers' snapshots have different versions (version: subscribers): {versions:?}"
                ));
            }
            versions.keys().next().copied()
        }
        Target::Baseline => None,
    };
    // The baseline's trigger: one more connection, not a subscriber.
    let mut control = match args.target {
        Target::Baseline => {
            let ws = endpoint.open(s).await.context("the control connection")?;
            let (sink, stream) = ws.split();
            tokio::spawn(stream.for_each(|_| async {}));
            Some(sink)
        }
        Target::Essayflow => None,
    };

    let target = args.target.name();
    let mut rounds = Vec::new();
    let mut lines = vec![format!(
        "fanout ({target}): {opened} of {s} subscribers connected, {failed} failed"
    )];
    for (kind, count) in &ramp.failures {
        lines.push(format!("failure: {count} x {kind}"));
    }
    let round_timeout = Duration::from_secs(args.round_timeout_secs);
    for r in 0..args.rounds {
        tokio::time::sleep(Duration::from_millis(args.pause_ms)).await;
        let expected_receivers = opened - dropped.load(Ordering::Relaxed);
        // The reference instant: the 202 (essayflow) or the trigger sent (baseline).
        let (reference, http_ms) = match (&batch, control.as_mut()) {
            (Some((id, _)), _) => {
                let body = json!({ "essays": [{ "essay_id": format!("fanout-{r}"), "title": "Essay", "text": ESSAY_TEXT }] });
                let url = format!("{}/v1/batches/{id}/essays", endpoint.base);
                let sent = Instant::now();
                post(&http, &url, endpoint.token()?, &body).await?;
                let accepted = Instant::now();
                (accepted, since(accepted, sent))
            }
            (None, Some(control)) => {
                let sent = Instant::now();
                control
                    .send(Message::text("fanout"))
                    .await
                    .context("sending the trigger")?;
                (sent, None)
            }
            (None, None) => bail!("nothing to trigger a change with"),
        };
        let mut version = first_version.map(|v| v + r as i64 + 1);
        let deadline = tokio::time::Instant::from_std(reference + round_timeout);
        let (mut times, mut early, mut stray) = (Vec::with_capacity(expected_receivers), 0, 0);
        while times.len() < expected_receivers {
            match tokio::time::timeout_at(deadline, changes.recv()).await {
                Ok(Some((v, at))) => {
                    if v != *version.get_or_insert(v) {
                        stray += 1;
                        continue;
                    }
                    times.push(since(at, reference).unwrap_or_else(|| {
                        early += 1;
                        0.0
                    }));
                }
                Ok(None) | Err(_) => break,
            }
        }
        let times = sorted(times);
        let round = json!({
            "round": r + 1,
            "version": version,
            "received": times.len(),
            "expected": expected_receivers,
            "first_ms": round2(bench::percentile(&times, 0.0).unwrap_or(0.0)),
            "p50_ms": round2(bench::percentile(&times, 0.5).unwrap_or(0.0)),
            "p99_ms": round2(bench::percentile(&times, 0.99).unwrap_or(0.0)),
            "last_ms": round2(bench::percentile(&times, 1.0).unwrap_or(0.0)),
            "http_ms": http_ms.map(round2),
            "before_reference": early,
            "stray": stray,
        });
        let line = format!(
            "round {}: {}/{expected_receivers} received; from the {}: first {} ms, p50 {} ms, p99 {} ms, last {} ms{}",
            r + 1,
            times.len(),
            if batch.is_some() { "202" } else { "trigger" },
            round["first_ms"],
            round["p50_ms"],
            round["p99_ms"],
            round["last_ms"],
            http_ms.map_or(String::new(), |h| format!(
                " (HTTP request to 202: {h:.2} ms)"
            )),
        );
        eprintln!("fanout: {line}");
        lines.push(line);
        if times.len() < expected_receivers {
            problems.push(format!(
                "round {}: {} of {expected_receivers} subscribers did not receive the change",
                r + 1,
                expected_receivers - times.len()
            ));
        }
        if stray > 0 {
            problems.push(format!(
                "round {}: {stray} changes of another version",
                r + 1
            ));
        }
        rounds.push(round);
    }
    let dropped_now = dropped.load(Ordering::Relaxed);
    if dropped_now > 0 {
        problems.push(format!("{dropped_now} connections ended early"));
    }
    let unexpected = other.load(Ordering::Relaxed);
    if unexpected > 0 {
        problems.push(format!(
            "{unexpected} unexpected messages (lagged, error, snapshot)"
        ));
    }
    if let Some(mut control) = control {
        let _ = control.close().await;
    }
    stop_all(&stop, &mut readers).await;

    let median = |key: &str| {
        let values = sorted(rounds.iter().filter_map(|r| r[key].as_f64()).collect());
        round2(bench::percentile(&values, 0.5).unwrap_or(0.0))
    };
    let worst = rounds
        .iter()
        .filter_map(|r| r["last_ms"].as_f64())
        .fold(0.0, f64::max);
    lines.push(format!(
        "fanout ({target}) to {opened}: median round first {} ms, p50 {} ms, p99 {} ms, last {} ms; worst last {worst} ms",
        median("first_ms"),
        median("p50_ms"),
        median("p99_ms"),
        median("last_ms"),
    ));
    let json = json!({
        "scenario": "fanout",
        "target": target,
        "subscribers": s,
        "connected": opened,
        "failed": failed,
        "dropped": dropped_now,
        "rounds": rounds,
        "median_first_ms": median("first_ms"),
        "median_p50_ms": median("p50_ms"),
        "median_p99_ms": median("p99_ms"),
        "median_last_ms": median("last_ms"),
        "worst_last_ms": worst,
        "failures": ramp.failures,
    });
    Ok(Outcome {
        lines,
        json,
        problems,
    })
}

// ---- the baseline server --------------------------------------------------------------------

async fn baseline_server(args: BaselineArgs) -> anyhow::Result<()> {
    if !args.bind.is_loopback() {
        bail!("the baseline server only listens on loopback addresses");
    }
    let listener = TcpListener::bind(SocketAddr::new(args.bind.into(), args.port))
        .await
        .with_context(|| format!("binding {}:{}", args.bind, args.port))?;
    eprintln!("baseline server listening on {}", listener.local_addr()?);
    let (fanout, _) = broadcast::channel::<Utf8Bytes>(16);
    let rounds = Arc::new(AtomicU64::new(0));
    loop {
        let accepted = tokio::select! {
            _ = tokio::signal::ctrl_c() => return Ok(()),
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(error) => {
                // Out of file descriptors, typically: let some close.
                eprintln!("baseline server: accept: {error}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (fanout, rounds) = (fanout.clone(), rounds.clone());
        tokio::spawn(async move {
            let _ = stream.set_nodelay(true);
            if let Ok(ws) =
                tokio_tungstenite::accept_async_with_config(stream, Some(server_config())).await
            {
                baseline_session(ws, fanout, rounds).await;
            }
        });
    }
}

async fn baseline_session(
    mut ws: Ws,
    fanout: broadcast::Sender<Utf8Bytes>,
    rounds: Arc<AtomicU64>,
) {
    let mut messages = fanout.subscribe();
    loop {
        tokio::select! {
            message = ws.next() => match message {
                Some(Ok(Message::Text(text))) if text.as_str() == "fanout" => {
                    let n = rounds.fetch_add(1, Ordering::Relaxed) + 1;
                    let _ = fanout.send(Utf8Bytes::from(format!(r#"{{"type":"change","version":{n}}}"#)));
                }
                Some(Ok(_)) => {}
                Some(Err(_)) | None => return,
            },
            message = messages.recv() => match message {
                Ok(text) => {
                    if ws.send(Message::Text(text)).await.is_err() {
                        return;
                    }
                }
                Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => return,
            },
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let outcome = match Cli::parse().command {
        Command::Connections(args) => connections(args).await?,
        Command::Latency(args) => latency(args).await?,
        Command::Fanout(args) => fanout(args).await?,
        Command::Scrape(args) => scrape(args).await?,
        Command::BaselineServer(args) => return baseline_server(args).await,
    };
    outcome.print()
}
