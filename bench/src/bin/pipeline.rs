//! Pipeline benchmarks (scripts/bench.sh runs them):
//! - `run`: registers B batches of E essays, requests a pipeline for all of them at once, waits
//!   until every one completed (the processing services being the development processor), and
//!   reports essay-phases completed per second and the time from `PipelineRequested` to
//!   `PipelineCompleted`, taken from the events' own timestamps.
//! - `class-setup` and `class-run`: one class at real size. `class-setup` registers one batch
//!   of E essays of about W words each (added 250 at a time) and prints its id once the read
//!   model has it; `class-run` requests a pipeline for it and reports the seconds from the
//!   request to the batch being `completed` (polled), so that a script can measure the
//!   database between the two.
//! - `raw-producer`: the baseline for the relay: N messages of S bytes through a plain
//!   idempotent rdkafka producer, every send in flight at once.
//!
//! Prints one JSON line. Loopback only.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use chrono::{DateTime, Utc};
use clap::{Parser, Subcommand};
use futures::StreamExt;
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;
use serde_json::{Value, json};

#[derive(Parser)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    Run {
        #[arg(long)]
        url: String,
        #[arg(long)]
        token: String,
        #[arg(long, default_value_t = 100)]
        batches: usize,
        #[arg(long, default_value_t = 30)]
        essays: usize,
        #[arg(long, default_value = "ai_feedback")]
        pipeline: String,
        /// Requests in flight while setting up.
        #[arg(long, default_value_t = 16)]
        concurrency: usize,
        #[arg(long, default_value_t = 600)]
        timeout_secs: u64,
    },
    ClassSetup {
        #[arg(long)]
        url: String,
        #[arg(long)]
        token: String,
        #[arg(long, default_value_t = 1000)]
        essays: usize,
        #[arg(long, default_value_t = 500)]
        words: usize,
    },
    ClassRun {
        #[arg(long)]
        url: String,
        #[arg(long)]
        token: String,
        #[arg(long)]
        batch: String,
        #[arg(long, default_value = "ai_feedback")]
        pipeline: String,
        #[arg(long, default_value_t = 600)]
        timeout_secs: u64,
    },
    RawProducer {
        #[arg(long)]
        brokers: String,
        #[arg(long)]
        topic: String,
        #[arg(long)]
        messages: usize,
        #[arg(long)]
        size: usize,
    },
}

async fn post(
    http: &reqwest::Client,
    url: &str,
    token: &str,
    body: Value,
) -> anyhow::Result<Value> {
    let response = http.post(url).bearer_auth(token).json(&body).send().await?;
    if response.status().as_u16() != 202 {
        bail!("{url}: {} {}", response.status(), response.text().await?);
    }
    Ok(response.json().await?)
}

/// Every event of a batch: `GET /v1/batches/{id}/events`, page after page.
async fn history(
    http: &reqwest::Client,
    url: &str,
    token: &str,
    id: &str,
) -> anyhow::Result<Vec<Value>> {
    let mut events = Vec::new();
    let mut path = format!("{url}/v1/batches/{id}/events?limit=1000");
    loop {
        let page: Value = http
            .get(&path)
            .bearer_auth(token)
            .send()
            .await?
            .json()
            .await?;
        let items = page["items"]
            .as_array()
            .with_context(|| format!("{path}: no items in {page}"))?;
        events.extend(items.iter().cloned());
        match page["next_cursor"].as_str() {
            Some(cursor) => {
                path = format!("{url}/v1/batches/{id}/events?limit=1000&after={cursor}")
            }
            None => return Ok(events),
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn run(
    url: &str,
    token: &str,
    batches: usize,
    essays: usize,
    pipeline: &str,
    concurrency: usize,
    timeout: Duration,
) -> anyhow::Result<Value> {
    bench::require_loopback(url)?;
    let http = reqwest::Client::new();
    let text = "An essay long enough to look like one. ".repeat(20);
    // Set-up (not timed): the batches and their essays.
    let ids: Vec<String> = futures::stream::iter(0..batches)
        .map(|_| {
            let (http, text) = (&http, &text);
            async move {
                let batch = post(
                    http,
                    &format!("{url}/v1/batches"),
                    token,
                    json!({ "title": "Pipeline benchmark", "course_code": "BENCH", "expected_essay_count": essays }),
                )
                .await?;
                let id = batch["batch_id"].as_str().context("batch_id")?.to_owned();
                let list: Vec<Value> = (0..essays)
                    .map(|i| json!({ "essay_id": format!("e{i}"), "title": "Essay", "text": text }))
                    .collect();
                post(http, &format!("{url}/v1/batches/{id}/essays"), token, json!({ "essays": list })).await?;
                anyhow::Ok(id)
            }
        })
        .buffer_unordered(concurrency)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<_, _>>()?;
    // All pipelines requested at once.
    let started = Instant::now();
    futures::stream::iter(&ids)
        .map(|id| {
            let http = &http;
            async move {
                let path = format!("{url}/v1/batches/{id}/pipelines");
                post(http, &path, token, json!({ "pipeline": pipeline })).await
            }
        })
        .buffer_unordered(concurrency)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<Vec<_>, _>>()?;
    // Wait until every batch finished (the dashboard's totals), then read the timings from the
    // events themselves.
    loop {
        if started.elapsed() > timeout {
            bail!("the pipelines did not finish within {timeout:?}");
        }
        let dashboard: Value = http
            .get(format!("{url}/v1/dashboard"))
            .bearer_auth(token)
            .send()
            .await?
            .json()
            .await?;
        let finished = ["completed", "completed_with_failures"]
            .iter()
            .map(|s| dashboard["totals"][s].as_u64().unwrap_or(0))
            .sum::<u64>();
        if finished as usize >= batches {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let wall = started.elapsed().as_secs_f64();
    let mut latencies = Vec::new();
    let (mut first, mut last): (Option<DateTime<Utc>>, Option<DateTime<Utc>>) = (None, None);
    let mut essay_phases = 0u64;
    for id in &ids {
        let events = history(&http, url, token, id).await?;
        let at = |kind: &str| -> Option<DateTime<Utc>> {
            events.iter().rev().find(|e| e["event_type"] == kind)?["occurred_at"]
                .as_str()?
                .parse()
                .ok()
        };
        let (Some(requested), Some(completed)) = (at("PipelineRequested"), at("PipelineCompleted"))
        else {
            bail!("batch {id} has no completed pipeline");
        };
        latencies.push((completed - requested).num_microseconds().unwrap_or(0) as f64 / 1000.0);
        first = Some(first.map_or(requested, |f| f.min(requested)));
        last = Some(last.map_or(completed, |l| l.max(completed)));
        essay_phases += events
            .iter()
            .filter(|e| {
                e["event_type"] == "EssayPhaseCompleted" || e["event_type"] == "EssayPhaseFailed"
            })
            .count() as u64;
    }
    latencies.sort_by(f64::total_cmp);
    let span = match (first, last) {
        (Some(f), Some(l)) => (l - f).num_microseconds().unwrap_or(0) as f64 / 1e6,
        _ => wall,
    };
    Ok(json!({
        "batches": batches,
        "essays": essays,
        "essay_phases": essay_phases,
        "seconds": span,
        "essay_phases_per_second": essay_phases as f64 / span,
        "p50_ms": bench::percentile(&latencies, 0.50).unwrap_or(0.0),
        "p99_ms": bench::percentile(&latencies, 0.99).unwrap_or(0.0),
        "max_ms": latencies.last().copied().unwrap_or(0.0),
    }))
}

/// About `words` words of text, different for every `seed`.
fn essay_text(seed: usize, words: usize) -> String {
    const WORDS: [&str; 16] = [
        "homework",
        "improves",
        "discipline",
        "although",
        "students",
        "often",
        "argue",
        "that",
        "rest",
        "matters",
        "more",
        "today",
        "because",
        "evidence",
        "suggests",
        "balance",
    ];
    (0..words)
        .map(|i| WORDS[(seed * 7 + i * 13) % WORDS.len()])
        .collect::<Vec<_>>()
        .join(" ")
}

async fn class_setup(url: &str, token: &str, essays: usize, words: usize) -> anyhow::Result<Value> {
    bench::require_loopback(url)?;
    let http = reqwest::Client::new();
    let batch = post(
        &http,
        &format!("{url}/v1/batches"),
        token,
        json!({ "title": "A class at real size", "course_code": "BENCH", "expected_essay_count": essays }),
    )
    .await?;
    let id = batch["batch_id"].as_str().context("batch_id")?.to_owned();
    let mut position = 0;
    for start in (0..essays).step_by(250) {
        let list: Vec<Value> = (start..essays.min(start + 250))
            .map(|i| json!({ "essay_id": format!("s{i:04}"), "title": format!("Essay {i}"), "text": essay_text(i, words) }))
            .collect();
        let added = post(
            &http,
            &format!("{url}/v1/batches/{id}/essays"),
            token,
            json!({ "essays": list }),
        )
        .await?;
        position = added["position"].as_i64().context("position")?;
    }
    let response = http
        .get(format!(
            "{url}/v1/batches/{id}/status?min_position={position}"
        ))
        .bearer_auth(token)
        .send()
        .await?;
    if !response.status().is_success() {
        bail!("the batch did not become readable: {}", response.status());
    }
    Ok(json!({ "batch_id": id, "essays": essays, "words": words }))
}

async fn class_run(
    url: &str,
    token: &str,
    batch: &str,
    pipeline: &str,
    timeout: Duration,
) -> anyhow::Result<Value> {
    bench::require_loopback(url)?;
    let http = reqwest::Client::new();
    let started = Instant::now();
    post(
        &http,
        &format!("{url}/v1/batches/{batch}/pipelines"),
        token,
        json!({ "pipeline": pipeline }),
    )
    .await?;
    let accepted = started.elapsed().as_secs_f64();
    loop {
        if started.elapsed() > timeout {
            bail!("the pipeline did not finish within {timeout:?}");
        }
        let status: Value = http
            .get(format!("{url}/v1/batches/{batch}/status"))
            .bearer_auth(token)
            .send()
            .await?
            .json()
            .await?;
        if matches!(
            status["status"].as_str(),
            Some("completed" | "completed_with_failures")
        ) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let seconds = started.elapsed().as_secs_f64();
    // Reading it back: the whole batch, and the same with the ETag it answered (304).
    let url_of = format!("{url}/v1/batches/{batch}");
    let (mut full, mut conditional) = (Vec::new(), Vec::new());
    let mut bytes = 0;
    for _ in 0..21 {
        let started = Instant::now();
        let response = http.get(&url_of).bearer_auth(token).send().await?;
        let etag = response
            .headers()
            .get("etag")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        bytes = response.bytes().await?.len();
        full.push(started.elapsed().as_secs_f64() * 1e3);
        let started = Instant::now();
        let response = http
            .get(&url_of)
            .bearer_auth(token)
            .header("if-none-match", &etag)
            .send()
            .await?;
        if response.status().as_u16() != 304 {
            bail!("a conditional GET answered {}", response.status());
        }
        conditional.push(started.elapsed().as_secs_f64() * 1e3);
    }
    full.sort_by(f64::total_cmp);
    conditional.sort_by(f64::total_cmp);
    Ok(json!({
        "seconds": seconds,
        "accepted_ms": accepted * 1e3,
        "get_ms": bench::percentile(&full, 0.5).unwrap_or(0.0),
        "get_bytes": bytes,
        "get_304_ms": bench::percentile(&conditional, 0.5).unwrap_or(0.0),
    }))
}

async fn raw_producer(
    brokers: &str,
    topic: &str,
    messages: usize,
    size: usize,
) -> anyhow::Result<Value> {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "5")
        .create()?;
    // The topic first, like essayflow's own (3 partitions); tansu creates none on demand.
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()?;
    admin
        .create_topics(
            &[NewTopic::new(topic, 3, TopicReplication::Fixed(1))],
            &AdminOptions::new(),
        )
        .await?;
    let payload = vec![b'x'; size];
    let keys: Vec<String> = (0..100).map(|i| format!("key-{i}")).collect();
    let started = Instant::now();
    let sends = (0..messages).map(|i| {
        producer.send(
            FutureRecord::to(topic)
                .key(&keys[i % keys.len()])
                .payload(&payload),
            Timeout::Never,
        )
    });
    let results = futures::future::join_all(sends).await;
    let seconds = started.elapsed().as_secs_f64();
    let failed = results.iter().filter(|r| r.is_err()).count();
    if failed > 0 {
        bail!("{failed} of {messages} messages were not delivered");
    }
    Ok(json!({
        "messages": messages,
        "bytes": size,
        "failed": failed,
        "seconds": seconds,
        "messages_per_second": messages as f64 / seconds,
    }))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let report = match Args::parse().command {
        Command::Run {
            url,
            token,
            batches,
            essays,
            pipeline,
            concurrency,
            timeout_secs,
        } => {
            run(
                &url,
                &token,
                batches,
                essays,
                &pipeline,
                concurrency,
                Duration::from_secs(timeout_secs),
            )
            .await?
        }
        Command::ClassSetup {
            url,
            token,
            essays,
            words,
        } => class_setup(&url, &token, essays, words).await?,
        Command::ClassRun {
            url,
            token,
            batch,
            pipeline,
            timeout_secs,
        } => {
            class_run(
                &url,
                &token,
                &batch,
                &pipeline,
                Duration::from_secs(timeout_secs),
            )
            .await?
        }
        Command::RawProducer {
            brokers,
            topic,
            messages,
            size,
        } => raw_producer(&brokers, &topic, messages, size).await?,
    };
    println!("{report}");
    Ok(())
}
