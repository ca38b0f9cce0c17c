//! The HTTP edge, over real sockets: connection hygiene (header-read and idle timeouts, the
//! connection cap, WebSocket caps), oversized bodies (413 before reading, and readable by a
//! client that sends the whole body first), load shedding and the request timeout, CORS,
//! security headers, compression and `X-Request-ID`.
#![allow(clippy::unwrap_used)]

use std::io::Read;
use std::time::{Duration, Instant};

use api::auth::Role;
use integration_tests::ws::{WsClient, ws_url};
use integration_tests::{TestApp, assert_problem, both_engines};
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use integration_tests::commands::Engine;

/// An HTTP/1.1 answer read off a raw socket.
#[derive(Debug)]
struct RawResponse {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl RawResponse {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap()
    }
}

/// Reads one answer (head, then a `Content-Length` body) from `stream`.
async fn read_response(stream: &mut TcpStream) -> RawResponse {
    let mut buffer = Vec::new();
    let head_end = loop {
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk).await.unwrap();
        assert!(n > 0, "closed before an answer: {buffer:?}");
        buffer.extend_from_slice(&chunk[..n]);
        if let Some(i) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
    };
    let head = String::from_utf8(buffer[..head_end].to_vec()).unwrap();
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers: Vec<(String, String)> = lines
        .filter(|l| !l.is_empty())
        .map(|l| {
            let (n, v) = l.split_once(':').unwrap();
            (n.trim().to_owned(), v.trim().to_owned())
        })
        .collect();
    let length: usize = headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
        .map_or(0, |(_, v)| v.parse().unwrap());
    let mut body = buffer[head_end..].to_vec();
    while body.len() < length {
        let mut chunk = vec![0u8; length - body.len()];
        let n = stream.read(&mut chunk).await.unwrap();
        assert!(n > 0, "closed mid-body");
        body.extend_from_slice(&chunk[..n]);
    }
    RawResponse {
        status,
        headers,
        body,
    }
}

/// Waits until the server closes `stream` (a read of 0 bytes, or a reset); how long it took.
async fn closed_within(stream: &mut TcpStream, limit: Duration) -> Duration {
    let started = Instant::now();
    let mut chunk = [0u8; 1024];
    loop {
        match tokio::time::timeout(limit, stream.read(&mut chunk)).await {
            Err(_) => panic!("still open after {limit:?}"),
            Ok(Ok(0)) | Ok(Err(_)) => return started.elapsed(),
            Ok(Ok(_)) => continue,
        }
    }
}

fn host(app: &TestApp) -> String {
    app.address.trim_start_matches("http://").to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_headers_and_idle_connections_are_closed_on_time() {
    let app = TestApp::spawn_with(Engine::Sqlite, |s| s.http.header_read_timeout_ms = 600).await;
    // Slowloris: a request line and one header, then nothing.
    let mut slow = TcpStream::connect(host(&app)).await.unwrap();
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let took = closed_within(&mut slow, Duration::from_secs(5)).await;
    assert!(
        took >= Duration::from_millis(400),
        "closed too early: {took:?}"
    );
    // A kept-alive connection that goes quiet after an answer.
    let mut idle = TcpStream::connect(host(&app)).await.unwrap();
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let answer = read_response(&mut idle).await;
    assert_eq!(answer.status, 200);
    let took = closed_within(&mut idle, Duration::from_secs(5)).await;
    assert!(
        took >= Duration::from_millis(400),
        "closed too early: {took:?}"
    );
    // A connection that opens and sends nothing at all.
    let mut silent = TcpStream::connect(host(&app)).await.unwrap();
    closed_within(&mut silent, Duration::from_secs(5)).await;
    // The server is fine.
    assert_eq!(app.get_public("/healthz").await.status(), StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_the_cap_are_answered_503_and_closed() {
    let app = TestApp::spawn_with(Engine::Sqlite, |s| s.http.max_connections = 2).await;
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut stream = TcpStream::connect(host(&app)).await.unwrap();
        stream
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        assert_eq!(read_response(&mut stream).await.status, 200);
        held.push(stream);
    }
    let mut third = TcpStream::connect(host(&app)).await.unwrap();
    third
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let refused = read_response(&mut third).await;
    assert_eq!(refused.status, 503);
    assert_eq!(
        refused.header("content-type"),
        Some("application/problem+json")
    );
    assert_eq!(refused.header("retry-after"), Some("1"));
    assert_eq!(
        refused.json()["type"],
        "urn:essayflow:problem:too-many-connections"
    );
    closed_within(&mut third, Duration::from_secs(5)).await;
    // A slot frees when a held connection closes.
    drop(held.pop());
    integration_tests::wait_until(Duration::from_secs(5), || healthz_answers(&app)).await;
}

async fn ws_status(app: &TestApp, token: &str) -> Result<WsClient, (u16, Value)> {
    let mut request = ws_url(&app.address).into_client_request().unwrap();
    request
        .headers_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    match WsClient::connect(request, None).await {
        Ok(client) => Ok(client),
        Err(tungstenite::Error::Http(response)) => {
            let body = response
                .body()
                .as_ref()
                .map(|b| serde_json::from_slice(b).unwrap())
                .unwrap_or(Value::Null);
            Err((response.status().as_u16(), body))
        }
        Err(other) => panic!("{other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_caps_per_user_and_per_node() {
    let app = TestApp::spawn_with(Engine::Sqlite, |s| {
        s.ws.max_connections = 3;
        s.ws.max_connections_per_user = 2;
    })
    .await;
    let (ann, bob) = (app.user(Role::Teacher).await, app.user(Role::Teacher).await);
    let first = ws_status(&app, &ann.token).await.unwrap();
    let _second = ws_status(&app, &ann.token).await.unwrap();
    let (status, body) = ws_status(&app, &ann.token).await.err().unwrap();
    assert_eq!(status, 429);
    assert_eq!(body["type"], "urn:essayflow:problem:too-many-websockets");
    let _third = ws_status(&app, &bob.token).await.unwrap();
    let (status, body) = ws_status(&app, &bob.token).await.err().unwrap();
    assert_eq!(status, 503, "the node's cap: {body}");
    assert_eq!(body["type"], "urn:essayflow:problem:too-many-websockets");
    // Closing one frees its place (for its user and the node).
    drop(first);
    integration_tests::wait_until(Duration::from_secs(5), || async {
        ws_status(&app, &ann.token).await.is_ok()
    })
    .await;
}

/// The head of a POST with an 8 MiB JSON body.
fn oversized_head(app: &TestApp, token: &str, expect: bool) -> (String, usize) {
    let length = 8 * 1024 * 1024;
    let head = format!(
        "POST /v1/batches HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nContent-Length: {length}\r\n{}\r\n",
        host(app),
        if expect {
            "Expect: 100-continue\r\n"
        } else {
            ""
        }
    );
    (head, length)
}

async fn oversized_bodies_get_a_readable_413(engine: Engine) {
    let app = TestApp::spawn(engine).await;
    let teacher = app.user(Role::Teacher).await;
    let before = app.event_count().await;
    // With `Expect: 100-continue`: the 413 comes first, never a `100 Continue`.
    let (head, _) = oversized_head(&app, &teacher.token, true);
    let mut stream = TcpStream::connect(host(&app)).await.unwrap();
    stream.write_all(head.as_bytes()).await.unwrap();
    let answer = read_response(&mut stream).await;
    assert_eq!(answer.status, 413, "{answer:?}");
    assert_eq!(
        answer.header("content-type"),
        Some("application/problem+json")
    );
    assert_eq!(
        answer.json()["type"],
        "urn:essayflow:problem:body-too-large"
    );
    // A client that writes the whole body before reading anything still reads the 413.
    let (head, length) = oversized_head(&app, &teacher.token, false);
    let mut stream = TcpStream::connect(host(&app)).await.unwrap();
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut body = Vec::with_capacity(length);
    body.extend_from_slice(b"{\"title\":\"");
    body.resize(length - 2, b'a');
    body.extend_from_slice(b"\"}");
    stream.write_all(&body).await.unwrap();
    let answer = read_response(&mut stream).await;
    assert_eq!(answer.status, 413, "{answer:?}");
    assert_eq!(answer.json()["status"], 413);
    // Chunked (no length to check): cut at the limit, the same 413.
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        (0..9).map(|_| Ok(vec![b' '; 1024 * 1024])).collect();
    let response = app
        .client
        .post(app.url("/v1/batches"))
        .bearer_auth(&teacher.token)
        .header("content-type", "application/json")
        .body(reqwest::Body::wrap_stream(futures::stream::iter(chunks)))
        .send()
        .await
        .unwrap();
    assert_problem(response, StatusCode::PAYLOAD_TOO_LARGE).await;
    assert_eq!(app.event_count().await, before, "nothing appended");
    // The server still takes commands.
    app.register_batch(&teacher, 3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_past_the_in_flight_limit_are_shed_and_slow_ones_time_out() {
    let app = TestApp::spawn_with(Engine::Sqlite, |s| {
        s.http.max_in_flight = 1;
        s.http.request_timeout_secs = 2;
    })
    .await;
    let teacher = app.user(Role::Teacher).await;
    // A command whose body trickles in holds the only slot while its handler reads it, so
    // another request is refused at once, not queued. (If a probe held the slot first, the
    // trickling command is the one refused: it has an answer already, and is sent again.)
    let head = format!(
        "POST /v1/batches HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"title\"",
        teacher.token
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    let (mut slow, started, shed) = 'attempt: loop {
        let mut slow = TcpStream::connect(host(&app)).await.unwrap();
        let started = Instant::now();
        slow.write_all(head.as_bytes()).await.unwrap();
        while started.elapsed() < Duration::from_millis(1500) {
            let response = app.get(&teacher, "/v1/dashboard").await;
            if response.status() == StatusCode::SERVICE_UNAVAILABLE {
                break 'attempt (slow, started, response);
            }
            let mut peek = [0u8; 1];
            if slow.try_read(&mut peek).is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(Instant::now() < deadline, "never shed");
        drop(slow);
        // Let the abandoned attempt's slot go before the next one.
        integration_tests::wait_until(Duration::from_secs(5), || async {
            app.get(&teacher, "/v1/dashboard").await.status() == StatusCode::OK
        })
        .await;
    };
    assert_eq!(shed.headers()["retry-after"], "1");
    let body = assert_problem(shed, StatusCode::SERVICE_UNAVAILABLE).await;
    assert_eq!(body["type"], "urn:essayflow:problem:overloaded");
    // The slow one ends at the request timeout (2 s), as a problem with Retry-After.
    let answer = read_response(&mut slow).await;
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(1500) && took < Duration::from_secs(6),
        "{took:?}"
    );
    assert_eq!(answer.status, 503);
    assert_eq!(
        answer.header("content-type"),
        Some("application/problem+json")
    );
    assert!(answer.header("retry-after").is_some());
    assert_eq!(answer.json()["type"], "urn:essayflow:problem:timeout");
    // Then the slot is free again.
    assert_eq!(
        app.get(&teacher, "/v1/dashboard").await.status(),
        StatusCode::OK
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_allows_configured_origins_only() {
    let allowed = "https://app.example.org";
    let app = TestApp::spawn_with(Engine::Sqlite, |s| {
        s.http.cors_origins = vec![allowed.to_owned()];
    })
    .await;
    let preflight = |origin: &'static str| {
        app.client
            .request(reqwest::Method::OPTIONS, app.url("/v1/batches"))
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header(
                "access-control-request-headers",
                "authorization, content-type",
            )
            .send()
    };
    let ok = preflight(allowed).await.unwrap();
    assert!(ok.status().is_success(), "{}", ok.status());
    assert_eq!(ok.headers()["access-control-allow-origin"], allowed);
    let methods = ok.headers()["access-control-allow-methods"]
        .to_str()
        .unwrap();
    assert!(methods.contains("POST"), "{methods}");
    let headers = ok.headers()["access-control-allow-headers"]
        .to_str()
        .unwrap()
        .to_ascii_lowercase();
    assert!(headers.contains("authorization") && headers.contains("content-type"));
    assert_eq!(ok.headers()["access-control-max-age"], "600");
    let refused = preflight("https://evil.example.com").await.unwrap();
    assert!(
        !refused
            .headers()
            .contains_key("access-control-allow-origin")
    );
    // A simple request from the allowed origin can read its answer (and the exposed headers).
    let teacher = app.user(Role::Teacher).await;
    let response = app
        .client
        .get(app.url("/v1/dashboard"))
        .bearer_auth(&teacher.token)
        .header("origin", allowed)
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["access-control-allow-origin"], allowed);
    let exposed = response.headers()["access-control-expose-headers"]
        .to_str()
        .unwrap()
        .to_ascii_lowercase();
    assert!(
        exposed.contains("etag") && exposed.contains("retry-after"),
        "{exposed}"
    );
    // With no origins configured (the default), no CORS headers at all.
    let closed = TestApp::spawn(Engine::Sqlite).await;
    let response = closed
        .client
        .request(reqwest::Method::OPTIONS, closed.url("/v1/batches"))
        .header("origin", allowed)
        .header("access-control-request-method", "POST")
        .send()
        .await
        .unwrap();
    assert!(
        !response
            .headers()
            .contains_key("access-control-allow-origin")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn security_and_cache_headers_and_request_ids() {
    let app = TestApp::spawn(Engine::Sqlite).await;
    let teacher = app.user(Role::Teacher).await;
    let batch = app.register_batch(&teacher, 3).await;
    let id = batch["batch_id"].as_str().unwrap();
    let dashboard = app.get(&teacher, "/v1/dashboard").await;
    let h = dashboard.headers();
    assert_eq!(h["x-content-type-options"], "nosniff");
    assert_eq!(h["x-frame-options"], "DENY");
    assert_eq!(h["referrer-policy"], "no-referrer");
    assert!(
        h["content-security-policy"]
            .to_str()
            .unwrap()
            .contains("frame-ancestors 'none'")
    );
    assert_eq!(h["cache-control"], "no-store");
    assert!(
        !h.contains_key("strict-transport-security"),
        "plain HTTP: no HSTS"
    );
    // An answer with an ETag may be kept, but must be revalidated.
    let position = batch["position"].as_i64().unwrap();
    let read = app
        .get(
            &teacher,
            &format!("/v1/batches/{id}?min_position={position}"),
        )
        .await;
    assert!(read.headers().contains_key("etag"));
    assert_eq!(read.headers()["cache-control"], "private, no-cache");
    // Errors carry them too.
    let missing = app.get_public("/v1/nowhere").await;
    assert_eq!(missing.headers()["x-content-type-options"], "nosniff");
    // The docs UI gets the policy it works under: its own scripts only, inline styles.
    let docs = app.get_public("/docs/").await;
    let csp = docs.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        csp.contains("script-src 'self'") && csp.contains("frame-ancestors 'none'"),
        "{csp}"
    );
    assert!(!csp.contains("unsafe-eval"), "{csp}");
    // X-Request-ID: kept and echoed beside the correlation id, or made.
    let echoed = app
        .client
        .get(app.url("/healthz"))
        .header("x-request-id", "req-42.abc")
        .send()
        .await
        .unwrap();
    assert_eq!(echoed.headers()["x-request-id"], "req-42.abc");
    assert!(echoed.headers().contains_key("x-correlation-id"));
    let made = app.get_public("/healthz").await;
    let made_id = made.headers()["x-request-id"].to_str().unwrap();
    assert!(uuid::Uuid::parse_str(made_id).is_ok(), "{made_id}");
    let too_long = "r".repeat(500);
    let replaced = app
        .client
        .get(app.url("/healthz"))
        .header("x-request-id", &too_long)
        .send()
        .await
        .unwrap();
    let replaced_id = replaced.headers()["x-request-id"].to_str().unwrap();
    assert_ne!(replaced_id, too_long);
    assert!(uuid::Uuid::parse_str(replaced_id).is_ok());
}

fn decode(encoding: &str, bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    match encoding {
        "gzip" => {
            flate2::read::GzDecoder::new(bytes)
                .read_to_end(&mut out)
                .unwrap();
        }
        "br" => {
            brotli::Decompressor::new(bytes, 4096)
                .read_to_end(&mut out)
                .unwrap();
        }
        "zstd" => out = zstd::decode_all(bytes).unwrap(),
        other => panic!("{other}"),
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compressed_answers_decompress_to_the_same_json() {
    let app = TestApp::spawn(Engine::Sqlite).await;
    let teacher = app.user(Role::Teacher).await;
    let batch = app.register_batch(&teacher, 50).await;
    let id = batch["batch_id"].as_str().unwrap();
    // Essays of real size: a few thousand words each.
    let text = "The quick brown fox considers the merits of the argument. ".repeat(300);
    let essays: Vec<Value> = (0..20)
        .map(
            |i| json!({ "essay_id": format!("e{i}"), "title": format!("Essay {i}"), "text": text }),
        )
        .collect();
    let added = app
        .post(
            &teacher,
            &format!("/v1/batches/{id}/essays"),
            &json!({ "essays": essays }),
        )
        .await;
    assert_eq!(added.status(), StatusCode::ACCEPTED);
    let position = added.json::<Value>().await.unwrap()["position"]
        .as_i64()
        .unwrap();
    let path = format!("/v1/batches/{id}?min_position={position}");
    let plain = app.get(&teacher, &path).await;
    assert!(!plain.headers().contains_key("content-encoding"));
    assert!(!plain.headers()["etag"].to_str().unwrap().starts_with("W/"));
    let plain: Value = plain.json().await.unwrap();
    for encoding in ["gzip", "br", "zstd"] {
        let response = app
            .client
            .get(app.url(&path))
            .bearer_auth(&teacher.token)
            .header("accept-encoding", encoding)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()["content-encoding"], encoding);
        let etag = response.headers()["etag"].to_str().unwrap().to_owned();
        assert!(
            etag.starts_with("W/\""),
            "a compressed variant's validator is weak: {etag}"
        );
        assert!(
            response.headers()["vary"]
                .to_str()
                .unwrap()
                .to_ascii_lowercase()
                .contains("accept-encoding")
        );
        let bytes = response.bytes().await.unwrap();
        let decoded: Value = serde_json::from_slice(&decode(encoding, &bytes)).unwrap();
        assert_eq!(decoded, plain, "{encoding}");
        let plain_len = serde_json::to_vec(&plain).unwrap().len();
        assert!(
            bytes.len() * 2 < plain_len,
            "{encoding}: {} of {plain_len} bytes",
            bytes.len()
        );
    }
    // Small answers are not compressed.
    let small = app
        .client
        .get(app.url("/healthz"))
        .header("accept-encoding", "gzip")
        .send()
        .await
        .unwrap();
    assert!(!small.headers().contains_key("content-encoding"));
    // A WebSocket upgrade is not disturbed by Accept-Encoding.
    let mut request = ws_url(&app.address).into_client_request().unwrap();
    request.headers_mut().insert(
        "authorization",
        format!("Bearer {}", teacher.token).parse().unwrap(),
    );
    request
        .headers_mut()
        .insert("accept-encoding", "gzip, br".parse().unwrap());
    WsClient::connect(request, None).await.unwrap();
}

both_engines!(oversized_bodies_get_a_readable_413);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_loses_its_connection_at_the_write_timeout() {
    let app = TestApp::spawn_with(Engine::Sqlite, |s| {
        s.http.max_connections = 1;
        s.http.write_timeout_secs = 1;
        // Only the write timeout can free the slot within the test's deadline.
        s.http.header_read_timeout_ms = 120_000;
    })
    .await;
    // Asks for far more than the socket buffers hold (pipelined), then never reads.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stalled = socket.connect(host(&app).parse().unwrap()).await.unwrap();
    let request = "GET /docs/swagger-ui-bundle.js HTTP/1.1\r\nHost: x\r\n\r\n".repeat(16);
    stalled.write_all(request.as_bytes()).await.unwrap();
    // The only slot is freed once the server's write has made no progress for 1 s.
    let started = Instant::now();
    integration_tests::wait_until(Duration::from_secs(15), || healthz_answers(&app)).await;
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "{:?}",
        started.elapsed()
    );
    drop(stalled);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_refusal_before_the_body_is_read_is_readable_by_a_client_that_sends_it_all() {
    let app = TestApp::spawn_with(Engine::Sqlite, |s| {
        s.rate_limit.anonymous.command = "1/minute".parse().unwrap();
    })
    .await;
    let before = app.event_count().await;
    // A 3 MiB command (under the size limit) without a credential, written whole before
    // anything is read: refused 401 by the extractor before it reads the body...
    let length = 3 * 1024 * 1024;
    let mut body = b"{\"title\":\"".to_vec();
    body.resize(length - 2, b'a');
    body.extend_from_slice(b"\"}");
    let head = format!(
        "POST /v1/batches HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {length}\r\n\r\n"
    );
    let mut stream = TcpStream::connect(host(&app)).await.unwrap();
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(&body).await.unwrap();
    let answer = read_response(&mut stream).await;
    assert_eq!(answer.status, 401, "{answer:?}");
    // ... and, on the same connection (the body was drained, so it stays usable), the next
    // one is over the address's command budget: 429 by the rate limiter, just as readable.
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(&body).await.unwrap();
    let answer = read_response(&mut stream).await;
    assert_eq!(answer.status, 429, "{answer:?}");
    assert!(answer.header("retry-after").is_some());
    assert_eq!(answer.json()["type"], "urn:essayflow:problem:rate-limited");
    assert_eq!(app.event_count().await, before, "nothing appended");
}

/// Whether a new connection gets `200` from `/healthz` (false while the server refuses or
/// cannot take the connection).
async fn healthz_answers(app: &TestApp) -> bool {
    let Ok(mut stream) = TcpStream::connect(host(app)).await else {
        return false;
    };
    if stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .is_err()
    {
        return false;
    }
    read_response(&mut stream).await.status == 200
}
