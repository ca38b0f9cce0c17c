//! A minimal OTLP/HTTP trace receiver for the tracing benchmark (`ONLY=tracing`): it accepts
//! `POST /v1/traces` with protobuf bodies (`ExportTraceServiceRequest`, OTLP 1.x), decodes
//! them (so that the exporter pays for a real round trip) and counts requests and spans.
//! `GET /count` answers `{"requests": N, "spans": N, "bad": N}` as one JSON line. Loopback
//! only; it runs until killed.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post};
use clap::Parser;
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use prost::Message;

#[derive(Parser)]
struct Args {
    /// Where to listen (loopback only).
    #[arg(long, default_value = "127.0.0.1:4318")]
    bind: String,
}

#[derive(Default)]
struct Counts {
    requests: AtomicU64,
    spans: AtomicU64,
    bad: AtomicU64,
}

async fn traces(State(counts): State<Arc<Counts>>, body: Bytes) -> (StatusCode, Vec<u8>) {
    match ExportTraceServiceRequest::decode(body) {
        Ok(request) => {
            let spans: usize = request
                .resource_spans
                .iter()
                .flat_map(|r| &r.scope_spans)
                .map(|s| s.spans.len())
                .sum();
            counts.requests.fetch_add(1, Ordering::Relaxed);
            counts.spans.fetch_add(spans as u64, Ordering::Relaxed);
            let answer = ExportTraceServiceResponse {
                partial_success: None,
            };
            (StatusCode::OK, answer.encode_to_vec())
        }
        Err(_) => {
            counts.bad.fetch_add(1, Ordering::Relaxed);
            (StatusCode::BAD_REQUEST, Vec::new())
        }
    }
}

async fn count(State(counts): State<Arc<Counts>>) -> String {
    serde_json::json!({
        "requests": counts.requests.load(Ordering::Relaxed),
        "spans": counts.spans.load(Ordering::Relaxed),
        "bad": counts.bad.load(Ordering::Relaxed),
    })
    .to_string()
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let address: std::net::SocketAddr = args.bind.parse()?;
    anyhow::ensure!(
        address.ip().is_loopback(),
        "the sink listens on loopback only"
    );
    let app = Router::new()
        .route("/v1/traces", post(traces))
        .route("/count", get(count))
        .with_state(Arc::new(Counts::default()));
    let listener = tokio::net::TcpListener::bind(address).await?;
    axum::serve(listener, app).await?;
    Ok(())
}
