//! Drives essayflow over HTTP with N concurrent clients and reports accepted commands per
//! second and latency percentiles as one JSON line. Loopback only; bounded in time and count.
//!
//! Each client repeats a teacher's workload: register a batch of 4 essays, then add them one
//! by one (5 commands, 6 events: the fourth essay also makes the batch ready).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use serde_json::json;

#[derive(Parser)]
struct Args {
    /// The server, e.g. http://127.0.0.1:18181 (loopback only).
    #[arg(long)]
    url: String,
    #[arg(long)]
    token: String,
    #[arg(long)]
    clients: usize,
    /// Stop after this many seconds.
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Stop once this many events were appended (across all clients).
    #[arg(long)]
    until_events: Option<u64>,
}

#[derive(Default)]
struct ClientReport {
    latencies: Vec<Duration>,
    events: u64,
    errors: u64,
}

async fn client(
    args: &Args,
    http: reqwest::Client,
    deadline: Instant,
    events_each: Option<u64>,
) -> ClientReport {
    let mut report = ClientReport::default();
    let essay_text = "An essay long enough to look like one. ".repeat(20);
    'outer: while Instant::now() < deadline && events_each.is_none_or(|n| report.events < n) {
        let started = Instant::now();
        let response = http
            .post(format!("{}/v1/batches", args.url))
            .bearer_auth(&args.token)
            .json(&json!({ "title": "Benchmark batch", "course_code": "BENCH", "expected_essay_count": 4 }))
            .send()
            .await;
        let batch_id = match response {
            Ok(r) if r.status().as_u16() == 202 => {
                report.latencies.push(started.elapsed());
                report.events += 1;
                match r.json::<serde_json::Value>().await {
                    Ok(body) => body["batch_id"].as_str().unwrap_or_default().to_owned(),
                    Err(_) => {
                        report.errors += 1;
                        continue;
                    }
                }
            }
            _ => {
                report.errors += 1;
                continue;
            }
        };
        for i in 0..4 {
            if Instant::now() >= deadline {
                break 'outer;
            }
            let started = Instant::now();
            let response = http
                .post(format!("{}/v1/batches/{batch_id}/essays", args.url))
                .bearer_auth(&args.token)
                .json(&json!({ "essays": [{ "essay_id": format!("e{i}"), "title": "Essay", "text": essay_text }] }))
                .send()
                .await;
            match response {
                Ok(r) if r.status().as_u16() == 202 => {
                    report.latencies.push(started.elapsed());
                    report.events += if i == 3 { 2 } else { 1 };
                }
                _ => report.errors += 1,
            }
        }
    }
    report
}

/// A latency in milliseconds (0 when there is none).
fn ms(latency: Option<Duration>) -> f64 {
    latency.map_or(0.0, |d| d.as_secs_f64() * 1000.0)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Arc::new(Args::parse());
    bench::require_loopback(&args.url)?;
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(args.clients)
        .build()
        .context("building the HTTP client")?;
    let deadline = Instant::now() + Duration::from_secs(args.duration);
    let events_each = args.until_events.map(|n| n.div_ceil(args.clients as u64));
    let started = Instant::now();
    let reports = run_clients(args.clone(), &http, deadline, events_each).await;
    let elapsed = started.elapsed().as_secs_f64();
    let mut latencies: Vec<Duration> = reports
        .iter()
        .flat_map(|r| r.latencies.iter().copied())
        .collect();
    latencies.sort_unstable();
    let events: u64 = reports.iter().map(|r| r.events).sum();
    let errors: u64 = reports.iter().map(|r| r.errors).sum();
    println!(
        "{}",
        json!({
            "clients": args.clients,
            "commands": latencies.len(),
            "events": events,
            "errors": errors,
            "seconds": elapsed,
            "commands_per_second": latencies.len() as f64 / elapsed,
            "p50_ms": ms(bench::percentile(&latencies, 0.50)),
            "p99_ms": ms(bench::percentile(&latencies, 0.99)),
        })
    );
    Ok(())
}

async fn run_clients(
    args: Arc<Args>,
    http: &reqwest::Client,
    deadline: Instant,
    events_each: Option<u64>,
) -> Vec<ClientReport> {
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..args.clients {
        let (http, args) = (http.clone(), args.clone());
        set.spawn(async move { client(&args, http, deadline, events_each).await });
    }
    let mut reports = Vec::with_capacity(args.clients);
    while let Some(report) = set.join_next().await {
        if let Ok(report) = report {
            reports.push(report);
        }
    }
    reports
}
