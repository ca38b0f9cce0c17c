//! `/metrics`: OpenMetrics text from the instance's own registry. Real traffic (a login, a
//! command, a rejected command, a read, requests refused at the edge (429, 413), a path
//! without a route, a WebSocket) shows up in the request histogram under its route template and
//! status, the command outcomes move, the request histogram carries an exemplar with the
//! request's correlation id, and every metric that the Grafana dashboard and the alert rules
//! in `deploy/` query is exported.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use api::auth::Role;
use commands::Engine;
use integration_tests::{TestApp, both_engines, wait_until};
use reqwest::StatusCode;
use serde_json::{Value, json};
use uuid::Uuid;

/// One sample of an OpenMetrics exposition.
#[derive(Debug, Clone)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
    /// The exemplar's labels, if the sample has one.
    exemplar: Option<BTreeMap<String, String>>,
}

/// A parsed exposition: the families' types and every sample.
#[derive(Debug, Default)]
struct Exposition {
    types: BTreeMap<String, String>,
    samples: Vec<Sample>,
}

impl Exposition {
    /// Parses OpenMetrics 1.0 text (the subset a registry writes: `# HELP`, `# TYPE`,
    /// `# UNIT`, samples with quoted, escaped label values, exemplars, `# EOF` last).
    fn parse(text: &str) -> Self {
        assert!(text.ends_with("# EOF\n"), "no # EOF at the end:\n{text}");
        let mut exposition = Self::default();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').unwrap();
                exposition.types.insert(name.to_owned(), kind.to_owned());
                continue;
            }
            if line.starts_with('#') || line.is_empty() {
                continue;
            }
            let (sample, exemplar) = match line.split_once(" # ") {
                Some((sample, exemplar)) => (sample, Some(exemplar)),
                None => (line, None),
            };
            let (name, labels, rest) = name_and_labels(sample);
            let value = rest.split_whitespace().next().unwrap();
            exposition.samples.push(Sample {
                name,
                labels,
                value: parse_value(value),
                exemplar: exemplar.map(|e| name_and_labels(e.trim_start()).1),
            });
        }
        exposition
    }

    /// The samples of `name` whose labels include every pair of `labels`.
    fn find(&self, name: &str, labels: &[(&str, &str)]) -> Vec<&Sample> {
        self.samples
            .iter()
            .filter(|s| {
                s.name == name
                    && labels
                        .iter()
                        .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .collect()
    }

    /// The value of the one sample of `name` with `labels`.
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let found = self.find(name, labels);
        assert_eq!(found.len(), 1, "{name} {labels:?}: {found:?}");
        found[0].value
    }

    fn names(&self) -> BTreeSet<&str> {
        self.samples.iter().map(|s| s.name.as_str()).collect()
    }
}

fn parse_value(text: &str) -> f64 {
    match text {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        other => other
            .parse()
            .unwrap_or_else(|_| panic!("not a value: {other}")),
    }
}

/// `name{a="x",b="y"} rest` (or `{...} rest` for an exemplar) into its parts; label values
/// unescaped (`\\`, `\"`, `\n`).
fn name_and_labels(text: &str) -> (String, BTreeMap<String, String>, &str) {
    let end = text.find(['{', ' ']).unwrap_or(text.len());
    let name = text[..end].to_owned();
    let mut labels = BTreeMap::new();
    let mut rest = &text[end..];
    if let Some(inner) = rest.strip_prefix('{') {
        let mut chars = inner.char_indices();
        let mut key = String::new();
        loop {
            let (i, c) = chars.next().expect("unterminated label set");
            match c {
                '}' => {
                    rest = &inner[i + 1..];
                    break;
                }
                ',' => {}
                '=' => {
                    assert_eq!(chars.next().map(|(_, c)| c), Some('"'));
                    let mut value = String::new();
                    loop {
                        match chars.next().expect("unterminated label value").1 {
                            '\\' => match chars.next().unwrap().1 {
                                'n' => value.push('\n'),
                                other => value.push(other),
                            },
                            '"' => break,
                            other => value.push(other),
                        }
                    }
                    labels.insert(std::mem::take(&mut key), value);
                }
                other => key.push(other),
            }
        }
    }
    (name, labels, rest.trim_start())
}

/// Every `essayflow_` metric name in a PromQL expression (a sample name: `_bucket`, `_count`
/// and `_total` included).
fn metric_names(expr: &str, into: &mut BTreeSet<String>) {
    let mut rest = expr;
    while let Some(at) = rest.find("essayflow_") {
        let before = rest[..at].chars().last();
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        if !before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
            into.insert(tail[..end].to_owned());
        }
        rest = &tail[end..];
    }
}

/// The expressions of the Grafana dashboard (every `expr` in its JSON).
fn dashboard_exprs(value: &Value, into: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            for (key, value) in map {
                match (key.as_str(), value) {
                    ("expr", Value::String(expr)) => into.push(expr.clone()),
                    _ => dashboard_exprs(value, into),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|v| dashboard_exprs(v, into)),
        _ => {}
    }
}

/// The expressions of the alert rules: each `expr:` value, inline or the indented block under
/// it.
fn alert_exprs(yaml: &str) -> Vec<String> {
    let mut exprs = Vec::new();
    let mut lines = yaml.lines().peekable();
    while let Some(line) = lines.next() {
        let indent = line.len() - line.trim_start().len();
        let Some(value) = line.trim_start().strip_prefix("expr:") else {
            continue;
        };
        let mut expr = value.trim().trim_start_matches('|').to_owned();
        while let Some(next) = lines.peek() {
            let next_indent = next.len() - next.trim_start().len();
            if !next.trim().is_empty() && next_indent <= indent {
                break;
            }
            expr.push('\n');
            expr.push_str(next);
            lines.next();
        }
        exprs.push(expr);
    }
    exprs
}

fn deploy_file(path: &str) -> String {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    std::fs::read_to_string(root.join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

async fn scrape(app: &TestApp) -> (String, Exposition) {
    let response = app.get_ops("/metrics").await;
    assert_eq!(response.status(), StatusCode::OK);
    let content_type = response.headers()["content-type"]
        .to_str()
        .unwrap()
        .to_owned();
    let text = response.text().await.unwrap();
    (content_type, Exposition::parse(&text))
}

const DURATION: &str = "essayflow_http_request_duration_seconds";

async fn real_traffic_shows_up_by_route_template_status_and_correlation_id(engine: Engine) {
    let app = TestApp::spawn_with(engine, |settings| {
        // One anonymous read per address an hour: the second is refused at the edge (429).
        settings.rate_limit.anonymous.read = "1/hour".parse().unwrap();
    })
    .await;
    let teacher = app.user(Role::Teacher).await;
    let admin = app.user(Role::Admin).await;

    // A command with a correlation id of the client's.
    let correlation = Uuid::new_v4();
    let response = app
        .client
        .post(app.url("/v1/batches"))
        .bearer_auth(&teacher.token)
        .header("x-correlation-id", correlation.to_string())
        .json(&json!({
            "title": "Persuasive essays",
            "course_code": "EN-101",
            "expected_essay_count": 2,
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let accepted: Value = response.json().await.unwrap();
    let batch = accepted["batch_id"].as_str().unwrap().to_owned();
    let position = accepted["position"].as_i64().unwrap();
    // A read of it, and a command the domain rejects (another id: no such batch).
    app.batch(&teacher, &batch, position).await;
    let missing = Uuid::new_v4().to_string();
    let rejected = app.add_essays(&teacher, &missing, &["e1"]).await;
    assert_eq!(rejected.status(), StatusCode::NOT_FOUND);
    // Anonymous reads: the first spends the budget (401 from the handler), the second is
    // refused by the rate limiter before any route runs.
    assert_eq!(
        app.get_public("/v1/dashboard").await.status(),
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        app.get_public("/v1/dashboard").await.status(),
        StatusCode::TOO_MANY_REQUESTS
    );
    // A body over the limit, refused (413) by the edge before the router ran.
    let too_large = app
        .client
        .post(app.url(&format!("/v1/batches/{batch}/essays")))
        .bearer_auth(&teacher.token)
        .header("content-type", "application/json")
        .body(vec![b' '; 4 * 1024 * 1024 + 1])
        .send()
        .await
        .unwrap();
    assert_eq!(too_large.status(), StatusCode::PAYLOAD_TOO_LARGE);
    // A path without a route.
    assert_eq!(
        app.get(&teacher, "/v1/nothing-here").await.status(),
        StatusCode::NOT_FOUND
    );
    // A WebSocket with a subscription (its snapshot sent).
    let mut client = app.ws(&teacher).await;
    client.subscribe("dashboard", None).await;
    assert_eq!(client.next_json().await["type"], "subscribed");
    assert_eq!(client.next_json().await["type"], "snapshot");

    let (content_type, metrics) = scrape(&app).await;
    assert_eq!(
        content_type,
        "application/openmetrics-text; version=1.0.0; charset=utf-8"
    );
    assert_eq!(metrics.types[DURATION], "histogram");
    assert_eq!(metrics.types["essayflow_commands"], "counter");
    let count = format!("{DURATION}_count");
    let requests = |method: &str, route: &str, status: &str| {
        metrics.value(
            &count,
            &[("method", method), ("route", route), ("status", status)],
        )
    };
    assert_eq!(requests("POST", "/v1/batches", "202"), 1.0);
    assert!(requests("GET", "/v1/batches/{id}", "200") >= 1.0);
    assert_eq!(requests("POST", "/v1/batches/{id}/essays", "404"), 1.0);
    assert!(requests("POST", "/v1/auth/login", "200") >= 2.0);
    assert_eq!(requests("GET", "/v1/dashboard", "401"), 1.0);
    // Refused before routing, still under its route's template.
    assert_eq!(requests("GET", "/v1/dashboard", "429"), 1.0);
    assert_eq!(requests("POST", "/v1/batches/{id}/essays", "413"), 1.0);
    assert_eq!(requests("GET", "unmatched", "404"), 1.0);
    assert_eq!(requests("GET", "/v1/ws", "101"), 1.0);
    // No series for an id: every route label is a template.
    for sample in metrics.find(&count, &[]) {
        let route = &sample.labels["route"];
        assert!(
            !route.contains(&batch) && !route.contains(&missing),
            "{route}"
        );
    }
    assert_eq!(
        metrics.value(
            &format!("{DURATION}_bucket"),
            &[
                ("method", "POST"),
                ("route", "/v1/batches"),
                ("status", "202"),
                ("le", "+Inf")
            ]
        ),
        1.0
    );

    // The one POST /v1/batches left its correlation id as the exemplar of its bucket.
    let exemplars: Vec<_> = metrics
        .find(
            &format!("{DURATION}_bucket"),
            &[("method", "POST"), ("route", "/v1/batches")],
        )
        .into_iter()
        .filter_map(|s| s.exemplar.clone())
        .collect();
    assert_eq!(exemplars.len(), 1, "{exemplars:?}");
    assert_eq!(
        exemplars[0].get("correlation_id"),
        Some(&correlation.to_string())
    );

    // Command outcomes, by command name.
    let commands = |command: &str, outcome: &str| {
        metrics.value(
            "essayflow_commands_total",
            &[("command", command), ("outcome", outcome)],
        )
    };
    assert_eq!(commands("RegisterBatch", "accepted"), 1.0);
    assert_eq!(commands("AddEssays", "rejected"), 1.0);
    assert_eq!(
        metrics.value(
            "essayflow_command_duration_seconds_count",
            &[("command", "RegisterBatch")]
        ),
        1.0
    );
    assert!(metrics.value("essayflow_append_events_count", &[]) >= 1.0);
    assert_eq!(
        metrics.value(
            "essayflow_rate_limited_total",
            &[("class", "read"), ("key", "address")]
        ),
        1.0
    );
    assert_eq!(metrics.value("essayflow_ws_connections", &[]), 1.0);
    assert!(metrics.value("essayflow_ws_snapshots_sent_total", &[]) >= 1.0);
    assert_eq!(
        metrics.value("essayflow_db_breaker_state", &[]),
        0.0,
        "closed"
    );
    assert!(metrics.value("process_start_time_seconds", &[]) > 1.7e9);

    // The projections applied the command's event.
    wait_until(Duration::from_secs(10), || async {
        let (_, metrics) = scrape(&app).await;
        metrics.value(
            "essayflow_projection_events_applied_total",
            &[("projection", "batch_state")],
        ) >= 1.0
            && metrics.value(
                "essayflow_projection_lag_events",
                &[("projection", "dashboard")],
            ) == 0.0
    })
    .await;

    // Every metric the dashboard and the alerts query is exported.
    let dashboard: Value =
        serde_json::from_str(&deploy_file("deploy/grafana/essayflow-dashboard.json")).unwrap();
    let mut exprs = Vec::new();
    dashboard_exprs(&dashboard, &mut exprs);
    let alerts = alert_exprs(&deploy_file("deploy/prometheus/alerts.yml"));
    assert!(exprs.len() >= 20, "{exprs:?}");
    assert_eq!(alerts.len(), 7, "{alerts:?}");
    let mut referenced = BTreeSet::new();
    for expr in exprs.iter().chain(&alerts) {
        metric_names(expr, &mut referenced);
    }
    let (_, metrics) = scrape(&app).await;
    let exported = metrics.names();
    let missing: Vec<_> = referenced
        .iter()
        .filter(|name| !exported.contains(name.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "queried in deploy/ but not on /metrics: {missing:?}"
    );

    // The same exposition on the main listener, to an admin.
    let as_admin = app.get(&admin, "/metrics").await;
    assert_eq!(as_admin.status(), StatusCode::OK);
    assert_eq!(
        as_admin.headers()["content-type"],
        "application/openmetrics-text; version=1.0.0; charset=utf-8"
    );
    let text = as_admin.text().await.unwrap();
    assert!(Exposition::parse(&text).names().contains(count.as_str()));
}

both_engines!(real_traffic_shows_up_by_route_template_status_and_correlation_id);

#[test]
fn the_parser_reads_escaped_labels_and_exemplars() {
    let text = "# TYPE a counter\n\
                a_total{x=\"q\\\"uote\",y=\"b\\\\s\"} 3 # {correlation_id=\"c\"} 1.0 1700000000.0\n\
                b 2.5\n# EOF\n";
    let parsed = Exposition::parse(text);
    assert_eq!(parsed.samples.len(), 2);
    assert_eq!(parsed.samples[0].labels["x"], "q\"uote");
    assert_eq!(parsed.samples[0].labels["y"], "b\\s");
    assert_eq!(
        parsed.samples[0].exemplar.as_ref().unwrap()["correlation_id"],
        "c"
    );
    assert_eq!(parsed.value("b", &[]), 2.5);
    let mut names = BTreeSet::new();
    metric_names(
        "sum(rate(essayflow_a_total[5m])) / x_essayflow_no + essayflow_b_bucket",
        &mut names,
    );
    assert_eq!(
        names.into_iter().collect::<Vec<_>>(),
        ["essayflow_a_total", "essayflow_b_bucket"]
    );
}
