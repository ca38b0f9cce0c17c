//! Login benchmark (scripts/bench.sh `ONLY=login` runs it): registers a batch as the given
//! teacher, then
//! 1. reads it (`GET /v1/batches/{id}`) with `--readers` clients for `--duration` seconds: the
//!    baseline latency;
//! 2. does the same while `--loginers` clients log in as fast as they can with the right
//!    password, each as its own user `<prefix><i>` (each login is one argon2id hash at the
//!    server's configured cost): logins per second, their latency and refusals, and the reads'
//!    latency beside them.
//!
//! Prints one JSON line. Loopback only.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use serde_json::{Value, json};

#[derive(Parser)]
struct Args {
    #[arg(long)]
    url: String,
    /// An access token of the teacher (reads).
    #[arg(long)]
    token: String,
    /// Login client i logs in as `<username-prefix><i>` (one account each: the failed-login
    /// throttle holds one account to a few attempts at once).
    #[arg(long)]
    username_prefix: String,
    #[arg(long)]
    password: String,
    #[arg(long, default_value_t = 4)]
    readers: usize,
    #[arg(long, default_value_t = 16)]
    loginers: usize,
    #[arg(long, default_value_t = 10)]
    duration: u64,
}

/// GETs the batch with `readers` clients until `stop`; the latencies in milliseconds.
async fn read_until(
    http: &reqwest::Client,
    url: &str,
    token: &str,
    readers: usize,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<Vec<f64>> {
    let tasks: Vec<_> = (0..readers)
        .map(|_| {
            let (http, url, token, stop) =
                (http.clone(), url.to_owned(), token.to_owned(), stop.clone());
            tokio::spawn(async move {
                let mut times = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let started = Instant::now();
                    let response = http.get(&url).bearer_auth(&token).send().await?;
                    anyhow::ensure!(response.status().is_success(), "GET {}", response.status());
                    response.bytes().await?;
                    times.push(started.elapsed().as_secs_f64() * 1000.0);
                }
                Ok::<_, anyhow::Error>(times)
            })
        })
        .collect();
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await??);
    }
    all.sort_by(f64::total_cmp);
    Ok(all)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(256)
        .build()?;
    let registered: Value = http
        .post(format!("{}/v1/batches", args.url))
        .bearer_auth(&args.token)
        .json(&json!({"title": "Login bench", "course_code": "EN-101",
            "expected_essay_count": 30, "class_designation": "9B"}))
        .send()
        .await?
        .json()
        .await?;
    let batch = registered["batch_id"].as_str().context("batch_id")?;
    let position = registered["position"].as_i64().context("position")?;
    let url = format!("{}/v1/batches/{batch}", args.url);
    // Wait until the read model has it.
    http.get(format!("{url}?min_position={position}"))
        .bearer_auth(&args.token)
        .send()
        .await?
        .error_for_status()?;

    // 1. Reads alone.
    let stop = Arc::new(AtomicBool::new(false));
    let alone = {
        let reading = read_until(&http, &url, &args.token, args.readers, stop.clone());
        let timer = async {
            tokio::time::sleep(Duration::from_secs(args.duration)).await;
            stop.store(true, Ordering::Relaxed);
        };
        let (reads, ()) = tokio::join!(reading, timer);
        reads?
    };

    // 2. Reads beside a flood of logins.
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, refused) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let login_url = format!("{}/v1/auth/login", args.url);
    let loginers: Vec<_> = (0..args.loginers)
        .map(|i| {
            let (http, url, stop, ok, refused) = (
                http.clone(),
                login_url.clone(),
                stop.clone(),
                ok.clone(),
                refused.clone(),
            );
            let body = json!({"username": format!("{}{i}", args.username_prefix), "password": args.password});
            tokio::spawn(async move {
                let mut times = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let started = Instant::now();
                    let response = http.post(&url).json(&body).send().await?;
                    let status = response.status();
                    response.bytes().await?;
                    if status.is_success() {
                        ok.fetch_add(1, Ordering::Relaxed);
                        times.push(started.elapsed().as_secs_f64() * 1000.0);
                    } else {
                        refused.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Ok::<_, anyhow::Error>(times)
            })
        })
        .collect();
    let started = Instant::now();
    let beside = {
        let reading = read_until(&http, &url, &args.token, args.readers, stop.clone());
        let timer = async {
            tokio::time::sleep(Duration::from_secs(args.duration)).await;
            stop.store(true, Ordering::Relaxed);
        };
        let (reads, ()) = tokio::join!(reading, timer);
        reads?
    };
    let mut login_times = Vec::new();
    for task in loginers {
        login_times.extend(task.await??);
    }
    let seconds = started.elapsed().as_secs_f64();
    login_times.sort_by(f64::total_cmp);
    let logins = ok.load(Ordering::Relaxed);
    println!(
        "{}",
        json!({
            "logins_per_second": logins as f64 / seconds,
            "logins": logins,
            "logins_refused": refused.load(Ordering::Relaxed),
            "login_p50_ms": bench::percentile(&login_times, 0.5).unwrap_or(0.0),
            "login_p99_ms": bench::percentile(&login_times, 0.99).unwrap_or(0.0),
            "get_alone_p50_ms": bench::percentile(&alone, 0.5).unwrap_or(0.0),
            "get_alone_p99_ms": bench::percentile(&alone, 0.99).unwrap_or(0.0),
            "get_alone_count": alone.len(),
            "get_beside_p50_ms": bench::percentile(&beside, 0.5).unwrap_or(0.0),
            "get_beside_p99_ms": bench::percentile(&beside, 0.99).unwrap_or(0.0),
            "get_beside_count": beside.len(),
        })
    );
    Ok(())
}
