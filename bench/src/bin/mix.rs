//! A realistic mix of teachers (scripts/bench.sh `ONLY=mix` runs it): N concurrent clients,
//! each its own teacher with its own access token, each on its own HTTP/1.1 keep-alive
//! connection, in a closed loop (it waits for each answer, then sends the next request, after
//! an optional think time).
//!
//! Set-up (timed apart, not part of the figures): every teacher registers a class batch of
//! `--essays` essays of about `--essay-words` words, adds them one by one (the batch becomes
//! ready), and registers an open batch (1 000 essays expected) that its commands fill; at most
//! `--setup-concurrency` teachers at once. Then every client opens its connection and reads its
//! open batch once with the set-up's last position as `min_position` (the read model has caught
//! up), and the load starts for all clients at the same moment.
//!
//! The load, per request: `--command-percent` (10 %) commands, the rest reads.
//! - Reads: `GET /v1/batches/{id}` of one of its own batches (35 %, with `If-None-Match` once it
//!   holds the batch's ETag, as a browser would: 304 when unchanged), `GET /v1/dashboard` (25 %),
//!   `GET /v1/batches?limit=20` (20 %), `GET /v1/batches/{id}/status` of one of its own batches
//!   (20 %). The first read after a command carries the command's position as `min_position`
//!   (the client reads its own write).
//! - Commands, valid however often repeated: add one essay of about `--essay-words` words to
//!   the open batch (4 in 5; the server names it), or register a new batch of 1 000 expected
//!   essays, which becomes the open batch (1 in 5, and whenever the open batch is full).
//!
//! A 429 or 503 with `Retry-After` makes that client wait as long (bounded by the run's end)
//! before its next request, as a well-behaved client does. Every answer's latency counts (from
//! sending the request until its whole body is read).
//!
//! Prints one JSON line: throughput, p50/p95/p99/max latency in ms (all requests, reads,
//! commands, and per kind), answers by status class, 429s, errors (answers other than 2xx, 304
//! and 429, plus transport errors: refused, reset, timed out) and the error rate, and the
//! connections to the server established half-way through the run. The first few distinct
//! errors go to stderr. Exits non-zero only when the set-up fails.
//!
//! Tokens: one per line in `--tokens-file` (`essayflow token --username U --ttl-secs 86400`,
//! one user each); client i uses line i. An access token lasts 900 s by default
//! (`ESSAYFLOW_TOKEN_TTL_SECS`): enough for short runs, or mint them with `--ttl-secs`.
//! Loopback only.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use futures::{StreamExt, TryStreamExt, stream};
use reqwest::header::{CONTENT_TYPE, ETAG, HeaderValue, IF_NONE_MATCH, RETRY_AFTER};
use serde::Deserialize;
use serde_json::{Value, json};

#[derive(Parser)]
#[command(
    name = "essayflow-mix-bench",
    about = "A realistic mix of teachers' reads and commands (loopback only)"
)]
struct Args {
    /// The server, e.g. http://127.0.0.1:18181 (loopback only).
    #[arg(long)]
    url: String,
    /// Access tokens, one per line, one teacher each; client i uses line i.
    #[arg(long)]
    tokens_file: PathBuf,
    /// Concurrent clients (one teacher, one connection each).
    #[arg(long)]
    clients: usize,
    /// Seconds of load.
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Think time between a client's answer and its next request, in milliseconds (each
    /// pause uniform between half and one and a half times this); 0: none.
    #[arg(long, default_value_t = 0)]
    think_ms: u64,
    /// Percentage of requests that are commands (the rest are reads).
    #[arg(long, default_value_t = 10.0)]
    command_percent: f64,
    /// Essays of each teacher's class batch, added in the set-up.
    #[arg(long, default_value_t = 3)]
    essays: usize,
    /// Words of each essay (set-up and commands).
    #[arg(long, default_value_t = 2000)]
    essay_words: usize,
    /// Teachers set up at once.
    #[arg(long, default_value_t = 32)]
    setup_concurrency: usize,
    /// Connections opened at once before the load.
    #[arg(long, default_value_t = 200)]
    connect_concurrency: usize,
    /// Give up on one request after this many seconds (a transport error).
    #[arg(long, default_value_t = 30)]
    timeout_secs: u64,
    /// Seed of the mix's random choices.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

/// The largest batch (`expected_essay_count` at most 1 000): the open batch's size.
const OPEN_BATCH_SIZE: u32 = 1000;
/// Distinct essay texts generated (reused round-robin).
const TEXTS: usize = 32;
/// Errors printed to stderr, at most.
const ERROR_SAMPLES: usize = 10;

// ---- a small deterministic random source ----------------------------------------------------

/// SplitMix64: enough for choosing requests and words.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03)
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

// ---- essays of a realistic size -------------------------------------------------------------

const WORDS: &[&str] = &[
    "the",
    "of",
    "and",
    "to",
    "in",
    "a",
    "is",
    "that",
    "for",
    "it",
    "as",
    "was",
    "with",
    "be",
    "by",
    "on",
    "not",
    "he",
    "she",
    "this",
    "are",
    "or",
    "his",
    "her",
    "from",
    "at",
    "which",
    "but",
    "have",
    "an",
    "had",
    "they",
    "you",
    "were",
    "their",
    "one",
    "all",
    "we",
    "can",
    "there",
    "been",
    "many",
    "some",
    "would",
    "more",
    "when",
    "other",
    "people",
    "time",
    "school",
    "students",
    "teacher",
    "homework",
    "learning",
    "because",
    "however",
    "example",
    "important",
    "believe",
    "argue",
    "society",
    "history",
    "future",
    "technology",
    "reading",
    "writing",
    "question",
    "answer",
    "reason",
    "evidence",
    "opinion",
    "community",
    "family",
    "friends",
    "sport",
    "health",
    "environment",
    "climate",
    "energy",
    "city",
    "village",
    "government",
    "freedom",
    "responsibility",
    "knowledge",
    "experience",
    "language",
    "culture",
    "library",
    "books",
    "music",
    "science",
    "nature",
    "change",
    "world",
    "country",
    "young",
    "older",
    "should",
    "could",
    "might",
    "therefore",
    "although",
    "moreover",
    "finally",
    "first",
    "second",
    "conclusion",
    "introduction",
    "paragraph",
    "idea",
    "problem",
    "solution",
    "difficult",
    "easy",
    "better",
    "worse",
    "every",
    "day",
    "year",
    "most",
    "often",
    "never",
    "always",
    "perhaps",
    "clearly",
    "strong",
    "weak",
    "point",
    "view",
    "life",
    "work",
    "play",
    "help",
    "make",
    "think",
    "know",
    "show",
    "find",
    "give",
    "take",
    "become",
    "remain",
];

/// About `words` words in sentences of 8 to 24 words and paragraphs of 4 to 8 sentences.
fn essay_text(rng: &mut Rng, words: usize) -> String {
    let mut text = String::with_capacity(words * 7);
    let mut written = 0;
    while written < words {
        let sentences = 4 + rng.below(5);
        for s in 0..sentences {
            let length = 8 + rng.below(17);
            for w in 0..length {
                let word = WORDS[rng.below(WORDS.len())];
                if w == 0 {
                    let mut chars = word.chars();
                    if let Some(first) = chars.next() {
                        text.extend(first.to_uppercase());
                        text.push_str(chars.as_str());
                    }
                } else {
                    text.push(' ');
                    text.push_str(word);
                    if w + 1 < length && rng.below(12) == 0 {
                        text.push(',');
                    }
                }
            }
            text.push('.');
            written += length;
            if s + 1 < sentences && written < words {
                text.push(' ');
            }
            if written >= words {
                break;
            }
        }
        if written < words {
            text.push_str("\n\n");
        }
    }
    text
}

// ---- set-up ---------------------------------------------------------------------------------

/// An accepted command's answer.
#[derive(Deserialize)]
struct Accepted {
    batch_id: String,
    position: i64,
}

/// One teacher after the set-up.
struct Teacher {
    token: String,
    /// Its batches (the class batch, then the open batches).
    batches: Vec<String>,
    /// The batch its essay commands fill, and how many essays it holds.
    open: String,
    open_essays: u32,
    /// The position of its last set-up write.
    position: i64,
}

/// `Retry-After` in seconds (1 when absent or unreadable).
fn retry_after(headers: &reqwest::header::HeaderMap) -> Duration {
    let secs = headers
        .get(RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or(1);
    Duration::from_secs(secs.clamp(1, 60))
}

/// A transport error with its causes (reqwest's own text names only the request), without the
/// URL (so that the same error on two batches reads the same).
fn transport_error(e: reqwest::Error) -> String {
    let e = e.without_url();
    let mut text = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

fn excerpt(text: &str) -> String {
    text.chars().take(300).collect()
}

/// POSTs a command; on 429 or 503 waits `Retry-After` and tries again (a few times).
async fn command(
    http: &reqwest::Client,
    url: &str,
    token: &str,
    body: &Value,
) -> anyhow::Result<Accepted> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        let response = http
            .post(url)
            .bearer_auth(token)
            .json(body)
            .send()
            .await
            .with_context(|| format!("POST {url}"))?;
        let status = response.status().as_u16();
        if status == 202 {
            return response
                .json::<Accepted>()
                .await
                .with_context(|| format!("POST {url}: unreadable answer"));
        }
        if (status == 429 || status == 503) && attempt < 5 {
            tokio::time::sleep(retry_after(response.headers())).await;
            continue;
        }
        let text = response.text().await.unwrap_or_default();
        bail!("POST {url}: {status} {}", excerpt(&text));
    }
}

async fn setup_teacher(
    http: reqwest::Client,
    args: Arc<Args>,
    index: usize,
    token: String,
    texts: Arc<Vec<&'static str>>,
) -> anyhow::Result<Teacher> {
    let base = &args.url;
    let class = command(
        &http,
        &format!("{base}/v1/batches"),
        &token,
        &json!({"title": format!("Persuasive essays, class {index}"), "course_code": "EN-101",
            "expected_essay_count": args.essays, "class_designation": "9B"}),
    )
    .await
    .with_context(|| format!("teacher {index}: registering the class batch"))?;
    let mut position = class.position;
    for e in 0..args.essays {
        let text = texts[(index * args.essays + e) % texts.len()];
        let added = command(
            &http,
            &format!("{base}/v1/batches/{}/essays", class.batch_id),
            &token,
            &json!({"essays": [{"essay_id": format!("e{e}"), "title": format!("Essay {e}"), "text": text}]}),
        )
        .await
        .with_context(|| format!("teacher {index}: adding essay {e}"))?;
        position = position.max(added.position);
    }
    let open = command(
        &http,
        &format!("{base}/v1/batches"),
        &token,
        &json!({"title": "Homework", "course_code": "EN-101",
            "expected_essay_count": OPEN_BATCH_SIZE, "class_designation": "9B"}),
    )
    .await
    .with_context(|| format!("teacher {index}: registering the open batch"))?;
    position = position.max(open.position);
    Ok(Teacher {
        token,
        batches: vec![class.batch_id, open.batch_id.clone()],
        open: open.batch_id,
        open_essays: 0,
        position,
    })
}

/// One client's own HTTP/1.1 connection (at most one idle connection kept; the client sends
/// one request at a time, so it reuses that one). The TLS configuration is shared (the
/// server is plain HTTP on loopback; it would only cost memory per client).
fn client_http(args: &Args, tls: &rustls::ClientConfig) -> anyhow::Result<reqwest::Client> {
    reqwest::Client::builder()
        .use_preconfigured_tls(tls.clone())
        .http1_only()
        .no_proxy()
        .tcp_nodelay(true)
        .pool_max_idle_per_host(1)
        .pool_idle_timeout(None)
        .timeout(Duration::from_secs(args.timeout_secs))
        .build()
        .context("building an HTTP client")
}

// ---- the load -------------------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq, Eq)]
enum Op {
    GetBatch,
    Dashboard,
    List,
    Status,
    AddEssay,
    Register,
}

impl Op {
    const ALL: [Op; 6] = [
        Op::GetBatch,
        Op::Dashboard,
        Op::List,
        Op::Status,
        Op::AddEssay,
        Op::Register,
    ];

    fn name(self) -> &'static str {
        match self {
            Op::GetBatch => "get_batch",
            Op::Dashboard => "dashboard",
            Op::List => "list",
            Op::Status => "status",
            Op::AddEssay => "add_essay",
            Op::Register => "register",
        }
    }

    fn is_command(self) -> bool {
        matches!(self, Op::AddEssay | Op::Register)
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// What one client measured.
#[derive(Default)]
struct Record {
    /// Latencies in microseconds, per `Op::index`.
    latencies: [Vec<u32>; 6],
    statuses: BTreeMap<u16, u64>,
    transport_errors: u64,
    errors: Vec<String>,
}

impl Record {
    fn error(&mut self, message: String) {
        if self.errors.len() < 3 {
            self.errors.push(message);
        }
    }
}

struct Client {
    http: reqwest::Client,
    teacher: Teacher,
    etags: HashMap<String, HeaderValue>,
    /// The last command's position, for the next read (read your own writes).
    pending_position: Option<i64>,
    rng: Rng,
}

fn pick(rng: &mut Rng, command_fraction: f64, open_full: bool) -> Op {
    let r = rng.unit();
    if r < command_fraction {
        if open_full || rng.below(5) == 0 {
            Op::Register
        } else {
            Op::AddEssay
        }
    } else {
        // Reads: 35 % the batch, 25 % the dashboard, 20 % the list, 20 % a status.
        let r = (r - command_fraction) / (1.0 - command_fraction).max(f64::MIN_POSITIVE);
        match r {
            r if r < 0.35 => Op::GetBatch,
            r if r < 0.60 => Op::Dashboard,
            r if r < 0.80 => Op::List,
            _ => Op::Status,
        }
    }
}

async fn run_client(
    mut client: Client,
    args: Arc<Args>,
    bodies: Arc<Vec<&'static str>>,
    deadline: Instant,
) -> Record {
    let mut record = Record::default();
    let base = args.url.as_str();
    let command_fraction = (args.command_percent / 100.0).clamp(0.0, 1.0);
    let mut registered = 0u64;
    while Instant::now() < deadline {
        let op = pick(
            &mut client.rng,
            command_fraction,
            client.teacher.open_essays + 1 >= OPEN_BATCH_SIZE,
        );
        let teacher = &client.teacher;
        let min_position = if op.is_command() {
            None
        } else {
            client.pending_position.take()
        };
        let consistency = |sep: char| {
            min_position
                .map(|p| format!("{sep}min_position={p}"))
                .unwrap_or_default()
        };
        let own = teacher.batches[client.rng.below(teacher.batches.len())].clone();
        let request = match op {
            Op::GetBatch => {
                let mut request = client
                    .http
                    .get(format!("{base}/v1/batches/{own}{}", consistency('?')));
                if let Some(etag) = client.etags.get(&own) {
                    request = request.header(IF_NONE_MATCH, etag.clone());
                }
                request
            }
            Op::Dashboard => client
                .http
                .get(format!("{base}/v1/dashboard{}", consistency('?'))),
            Op::List => client
                .http
                .get(format!("{base}/v1/batches?limit=20{}", consistency('&'))),
            Op::Status => client.http.get(format!(
                "{base}/v1/batches/{own}/status{}",
                consistency('?')
            )),
            Op::AddEssay => client
                .http
                .post(format!("{base}/v1/batches/{}/essays", teacher.open))
                .header(CONTENT_TYPE, "application/json")
                .body(bodies[client.rng.below(bodies.len())]),
            Op::Register => {
                registered += 1;
                client.http.post(format!("{base}/v1/batches")).json(&json!({
                    "title": format!("Homework {registered}"), "course_code": "EN-101",
                    "expected_essay_count": OPEN_BATCH_SIZE, "class_designation": "9B"}))
            }
        };
        let started = Instant::now();
        let outcome = async {
            let response = request.bearer_auth(&teacher.token).send().await?;
            let status = response.status().as_u16();
            let etag = response.headers().get(ETAG).cloned();
            let wait = retry_after(response.headers());
            let body = response.bytes().await?;
            Ok::<_, reqwest::Error>((status, etag, wait, body))
        }
        .await;
        let elapsed = started.elapsed();
        let (status, etag, wait, body) = match outcome {
            Ok(answer) => answer,
            Err(e) => {
                record.transport_errors += 1;
                record.error(format!("{}: transport: {}", op.name(), transport_error(e)));
                // Whatever happened (refused, reset), do not spin.
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        record.latencies[op.index()].push(u32::try_from(elapsed.as_micros()).unwrap_or(u32::MAX));
        *record.statuses.entry(status).or_default() += 1;
        match (op, status) {
            (Op::GetBatch, 200) => {
                if let Some(etag) = etag {
                    client.etags.insert(own, etag);
                }
            }
            (Op::AddEssay | Op::Register, 202) => match serde_json::from_slice::<Accepted>(&body) {
                Ok(accepted) => {
                    client.pending_position = Some(accepted.position);
                    if op == Op::Register {
                        client.teacher.batches.push(accepted.batch_id.clone());
                        client.teacher.open = accepted.batch_id;
                        client.teacher.open_essays = 0;
                    } else {
                        client.teacher.open_essays += 1;
                    }
                }
                Err(e) => record.error(format!("{}: 202 with an unreadable body: {e}", op.name())),
            },
            (_, 200..=299 | 304) => {}
            (_, 429 | 503) => {
                if status == 503 {
                    record.error(format!(
                        "{}: 503 {}",
                        op.name(),
                        excerpt(&String::from_utf8_lossy(&body))
                    ));
                }
                // Wait as told, as a well-behaved client does (but not past the end).
                let until = (Instant::now() + wait).min(deadline);
                tokio::time::sleep_until(until.into()).await;
                continue;
            }
            _ => record.error(format!(
                "{}: {status} {}",
                op.name(),
                excerpt(&String::from_utf8_lossy(&body))
            )),
        }
        if args.think_ms > 0 {
            let pause = args.think_ms as f64 * (0.5 + client.rng.unit());
            let until = (Instant::now() + Duration::from_secs_f64(pause / 1000.0)).min(deadline);
            tokio::time::sleep_until(until.into()).await;
        }
    }
    record
}

// ---- figures --------------------------------------------------------------------------------

/// `<prefix>p50_ms`, `p95`, `p99`, `max` and `<prefix>count` (`answered` without a prefix)
/// into `out`.
fn latency_figures(out: &mut serde_json::Map<String, Value>, prefix: &str, mut all: Vec<u32>) {
    all.sort_unstable();
    let count = if prefix.is_empty() {
        "answered".to_owned()
    } else {
        format!("{prefix}count")
    };
    out.insert(count, json!(all.len()));
    for (name, p) in [("p50", 0.50), ("p95", 0.95), ("p99", 0.99)] {
        out.insert(
            format!("{prefix}{name}_ms"),
            json!(bench::percentile(&all, p).map_or(0.0, |us| f64::from(us) / 1000.0)),
        );
    }
    out.insert(
        format!("{prefix}max_ms"),
        json!(all.last().map_or(0.0, |&m| f64::from(m) / 1000.0)),
    );
}

/// Established TCP connections towards `port` (client sockets: the remote port is `port`),
/// from /proc/net/tcp and tcp6. None when unreadable.
fn established_to(port: u16) -> Option<usize> {
    let mut count = 0;
    let mut read_any = false;
    for file in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(table) = std::fs::read_to_string(file) else {
            continue;
        };
        read_any = true;
        for line in table.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (Some(remote), Some(state)) = (fields.get(2), fields.get(3)) else {
                continue;
            };
            let remote_port = remote
                .rsplit(':')
                .next()
                .and_then(|p| u16::from_str_radix(p, 16).ok());
            if *state == "01" && remote_port == Some(port) {
                count += 1;
            }
        }
    }
    read_any.then_some(count)
}

fn server_port(url: &str) -> Option<u16> {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let host_port = rest.split('/').next()?;
    host_port.rsplit(':').next()?.parse().ok()
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Arc::new(Args::parse());
    bench::require_loopback(&args.url)?;
    if args.clients == 0 {
        bail!("--clients must be at least 1");
    }
    if args.essays == 0 || args.essays > OPEN_BATCH_SIZE as usize {
        bail!("--essays must be between 1 and {OPEN_BATCH_SIZE}");
    }
    let tokens: Vec<String> = std::fs::read_to_string(&args.tokens_file)
        .with_context(|| format!("reading {}", args.tokens_file.display()))?
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect();
    if tokens.len() < args.clients {
        bail!(
            "{} holds {} tokens; {} clients need one each",
            args.tokens_file.display(),
            tokens.len(),
            args.clients
        );
    }

    // Essay texts, and the bodies of the essay command (leaked: they live for the run).
    let mut rng = Rng::new(args.seed);
    let texts: Vec<&'static str> = (0..TEXTS)
        .map(|_| &*Box::leak(essay_text(&mut rng, args.essay_words).into_boxed_str()))
        .collect();
    let bodies: Vec<&'static str> = texts
        .iter()
        .enumerate()
        .map(|(i, text)| {
            let body = json!({"essays": [{"title": format!("Homework essay {i}"), "text": text}]});
            &*Box::leak(body.to_string().into_boxed_str())
        })
        .collect();
    let (texts, bodies) = (Arc::new(texts), Arc::new(bodies));

    // 1. Set-up: every teacher's batches and essays, a bounded number at once.
    let setup_started = Instant::now();
    let setup_http = reqwest::Client::builder()
        .no_proxy()
        .tcp_nodelay(true)
        .pool_max_idle_per_host(args.setup_concurrency)
        .timeout(Duration::from_secs(args.timeout_secs))
        .build()
        .context("building the set-up HTTP client")?;
    let teachers: Vec<Teacher> = stream::iter(tokens.into_iter().take(args.clients).enumerate())
        .map(|(i, token)| setup_teacher(setup_http.clone(), args.clone(), i, token, texts.clone()))
        .buffered(args.setup_concurrency.max(1))
        .try_collect()
        .await
        .context("set-up")?;
    let setup_seconds = setup_started.elapsed().as_secs_f64();
    drop(setup_http);

    // 2. Every client opens its own connection: one read of its open batch, once the read
    //    model holds the whole set-up.
    let connect_started = Instant::now();
    let last_position = teachers.iter().map(|t| t.position).max().unwrap_or(0);
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .context("TLS configuration")?
    .with_root_certificates(rustls::RootCertStore::empty())
    .with_no_client_auth();
    let clients: Vec<Client> = stream::iter(teachers.into_iter().enumerate())
        .map(|(i, teacher)| {
            let (args, tls) = (args.clone(), tls.clone());
            async move {
                let http = client_http(&args, &tls)?;
                let url = format!(
                    "{}/v1/batches/{}?min_position={last_position}",
                    args.url, teacher.open
                );
                let mut etags = HashMap::new();
                let mut attempt = 0;
                loop {
                    attempt += 1;
                    let answer = http.get(&url).bearer_auth(&teacher.token).send().await;
                    match answer {
                        Ok(r) if r.status().as_u16() == 200 => {
                            if let Some(etag) = r.headers().get(ETAG) {
                                etags.insert(teacher.open.clone(), etag.clone());
                            }
                            r.bytes()
                                .await
                                .with_context(|| format!("client {i}: GET {url}"))?;
                            break;
                        }
                        Ok(r) if attempt < 5 => {
                            let wait = retry_after(r.headers());
                            let _ = r.bytes().await;
                            tokio::time::sleep(wait).await;
                        }
                        Err(_) if attempt < 5 => {
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                        Ok(r) => {
                            let status = r.status();
                            let text = r.text().await.unwrap_or_default();
                            bail!("client {i}: GET {url}: {status} {}", excerpt(&text));
                        }
                        Err(e) => bail!("client {i}: GET {url}: {e}"),
                    }
                }
                Ok::<_, anyhow::Error>(Client {
                    http,
                    teacher,
                    etags,
                    pending_position: None,
                    rng: Rng::new(args.seed ^ (i as u64 + 1).wrapping_mul(0xA24B_AED4_963E_E407)),
                })
            }
        })
        .buffered(args.connect_concurrency.max(1))
        .try_collect()
        .await
        .context("set-up: opening the clients' connections")?;
    let connect_seconds = connect_started.elapsed().as_secs_f64();

    // 3. The load: every client at once, for `duration` seconds.
    let started = Instant::now();
    let deadline = started + Duration::from_secs(args.duration);
    let mut set = tokio::task::JoinSet::new();
    for client in clients {
        let (args, bodies) = (args.clone(), bodies.clone());
        set.spawn(run_client(client, args, bodies, deadline));
    }
    let port = server_port(&args.url);
    let connections = {
        tokio::time::sleep(Duration::from_secs_f64(args.duration as f64 / 2.0)).await;
        port.and_then(established_to)
    };
    let mut records = Vec::with_capacity(args.clients);
    while let Some(record) = set.join_next().await {
        records.push(record.context("a client task failed")?);
    }
    let seconds = started.elapsed().as_secs_f64();

    // 4. Figures.
    let mut per_op: [Vec<u32>; 6] = Default::default();
    let mut statuses: BTreeMap<u16, u64> = BTreeMap::new();
    let mut transport_errors = 0;
    let mut samples: Vec<String> = Vec::new();
    for record in records {
        for (all, mine) in per_op.iter_mut().zip(record.latencies) {
            all.extend(mine);
        }
        for (status, n) in record.statuses {
            *statuses.entry(status).or_default() += n;
        }
        transport_errors += record.transport_errors;
        for e in record.errors {
            if samples.len() < ERROR_SAMPLES && !samples.contains(&e) {
                samples.push(e);
            }
        }
    }
    for e in &samples {
        eprintln!("essayflow-mix-bench: {e}");
    }
    let class = |range: std::ops::RangeInclusive<u16>| -> u64 {
        statuses
            .iter()
            .filter(|(s, _)| range.contains(s))
            .map(|(_, n)| n)
            .sum()
    };
    let answered: u64 = statuses.values().sum();
    let too_many = statuses.get(&429).copied().unwrap_or(0);
    let not_modified = statuses.get(&304).copied().unwrap_or(0);
    let ok = class(200..=299) + not_modified;
    let errors = answered - ok - too_many + transport_errors;
    let requests = answered + transport_errors;
    let reads: Vec<u32> = Op::ALL
        .iter()
        .filter(|op| !op.is_command())
        .flat_map(|op| per_op[op.index()].iter().copied())
        .collect();
    let commands: Vec<u32> = Op::ALL
        .iter()
        .filter(|op| op.is_command())
        .flat_map(|op| per_op[op.index()].iter().copied())
        .collect();
    let all: Vec<u32> = per_op.iter().flatten().copied().collect();
    let mut out = serde_json::Map::new();
    out.insert("clients".into(), json!(args.clients));
    out.insert("duration_secs".into(), json!(args.duration));
    out.insert("think_ms".into(), json!(args.think_ms));
    out.insert("command_percent".into(), json!(args.command_percent));
    out.insert("seconds".into(), json!(seconds));
    out.insert("setup_seconds".into(), json!(setup_seconds));
    out.insert("setup_batches".into(), json!(args.clients * 2));
    out.insert("setup_essays".into(), json!(args.clients * args.essays));
    out.insert("essay_words".into(), json!(args.essay_words));
    out.insert("connect_seconds".into(), json!(connect_seconds));
    out.insert("connections_established".into(), json!(connections));
    out.insert("requests".into(), json!(requests));
    out.insert(
        "throughput_rps".into(),
        json!(answered as f64 / seconds.max(f64::MIN_POSITIVE)),
    );
    out.insert(
        "commands_per_second".into(),
        json!(commands.len() as f64 / seconds.max(f64::MIN_POSITIVE)),
    );
    latency_figures(&mut out, "", all);
    latency_figures(&mut out, "read_", reads);
    latency_figures(&mut out, "command_", commands);
    for op in Op::ALL {
        latency_figures(
            &mut out,
            &format!("{}_", op.name()),
            std::mem::take(&mut per_op[op.index()]),
        );
    }
    out.insert("status_2xx".into(), json!(class(200..=299)));
    out.insert("status_304".into(), json!(not_modified));
    out.insert("status_3xx".into(), json!(class(300..=399)));
    out.insert("status_4xx".into(), json!(class(400..=499)));
    out.insert("status_5xx".into(), json!(class(500..=599)));
    out.insert("status_429".into(), json!(too_many));
    out.insert("transport_errors".into(), json!(transport_errors));
    out.insert("errors".into(), json!(errors));
    out.insert(
        "error_rate".into(),
        json!(if requests == 0 {
            0.0
        } else {
            errors as f64 / requests as f64
        }),
    );
    out.insert(
        "statuses".into(),
        json!(
            statuses
                .iter()
                .map(|(s, n)| (s.to_string(), json!(n)))
                .collect::<serde_json::Map<_, _>>()
        ),
    );
    println!("{}", Value::Object(out));
    Ok(())
}
