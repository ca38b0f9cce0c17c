//! HTTP rate limits over real sockets (docs/rate-limits.md): budgets per user, per API key and
//! per client address, per tier, the login budget, the `RateLimit-Policy` / `RateLimit` fields
//! on every limited answer and the 429 with `Retry-After`, a budget whole again after its
//! window, trusted proxies, and limits that are per node. Every 202 is in the event store.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use api::auth::{Role, add_user};
use api::edge::ratelimit::TierBudgets;
use api::identity::{Actor, keys};
use api::settings::Settings;
use api::startup::Application;
use integration_tests::commands::Engine;
use integration_tests::{TestApp, User, assert_problem, both_engines, wait_until};
use reqwest::StatusCode;
use serde_json::{Value, json};

both_engines!(
    budgets_are_per_user_with_the_fields_on_every_answer,
    budgets_are_per_api_key,
    budgets_are_per_address_for_requests_without_a_valid_credential,
    logins_and_refreshes_spend_the_login_budget_of_the_address,
    tiers_set_by_admins_choose_the_budgets,
    a_budget_is_whole_again_after_its_window,
    websocket_tokens_count_against_their_user,
    forwarded_addresses_count_only_behind_a_trusted_proxy,
    turned_off_there_are_no_budgets_and_no_fields,
);

/// `RateLimit-Policy: "<policy>";q=<quota>;w=<window>` or `RateLimit: "<policy>";r=..;t=..`:
/// the policy and the parameters (a structured-field item of a string with integer parameters).
fn item(value: &str) -> (String, Vec<(String, u64)>) {
    let mut parts = value.split(';');
    let name = parts.next().unwrap().trim();
    assert!(
        name.len() >= 2 && name.starts_with('"') && name.ends_with('"'),
        "{value}"
    );
    let params = parts
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap();
            (k.to_owned(), v.parse().unwrap())
        })
        .collect();
    (name[1..name.len() - 1].to_owned(), params)
}

/// The fields of a limited answer: (policy, quota, window, remaining, reset).
#[derive(Debug, PartialEq)]
struct Fields {
    policy: String,
    quota: u64,
    window: u64,
    remaining: u64,
    reset: u64,
}

fn fields(response: &reqwest::Response) -> Option<Fields> {
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .map(|v| v.to_str().unwrap().to_owned())
    };
    let (policy, state) = match (header("ratelimit-policy"), header("ratelimit")) {
        (None, None) => return None,
        (Some(p), Some(s)) => (item(&p), item(&s)),
        other => panic!("one field without the other: {other:?}"),
    };
    assert_eq!(policy.0, state.0, "the same policy in both fields");
    let keys = |params: &[(String, u64)]| params.iter().map(|(k, _)| k.clone()).collect::<Vec<_>>();
    assert_eq!(keys(&policy.1), ["q", "w"]);
    assert_eq!(keys(&state.1), ["r", "t"]);
    Some(Fields {
        policy: policy.0,
        quota: policy.1[0].1,
        window: policy.1[1].1,
        remaining: state.1[0].1,
        reset: state.1[1].1,
    })
}

fn retry_after(response: &reqwest::Response) -> u64 {
    response.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap()
}

/// Asserts a 429 `rate-limited` of `policy` with `Retry-After` (1 to `max_wait` seconds) and
/// the fields with nothing remaining; returns the problem's detail.
async fn assert_limited(response: reqwest::Response, policy: &str, max_wait: u64) -> String {
    let wait = retry_after(&response);
    assert!((1..=max_wait).contains(&wait), "Retry-After: {wait}");
    let f = fields(&response).expect("the fields on a 429");
    assert_eq!(f.policy, policy);
    assert_eq!(f.remaining, 0);
    assert!(f.reset >= wait && f.reset <= f.window, "{f:?}");
    let body = assert_problem(response, StatusCode::TOO_MANY_REQUESTS).await;
    assert_eq!(body["type"], "urn:essayflow:problem:rate-limited");
    body["detail"].as_str().unwrap().to_owned()
}

/// Every tier's budgets replaced by `read` and `command` (the default tier is `standard`).
fn standard(settings: &mut Settings, read: &str, command: &str) {
    settings
        .rate_limit
        .tiers
        .insert("standard".into(), TierBudgets::of(read, command).unwrap());
}

fn batch_body() -> Value {
    json!({
        "title": "Persuasive essays", "course_code": "EN-101",
        "expected_essay_count": 2, "class_designation": "9B",
    })
}

async fn register(app: &TestApp, user: &User) -> reqwest::Response {
    app.post(user, "/v1/batches", &batch_body()).await
}

async fn budgets_are_per_user_with_the_fields_on_every_answer(engine: Engine) {
    let app = TestApp::spawn_with(engine, |s| standard(s, "5/minute", "3/minute")).await;
    let ada = app.user(Role::Teacher).await;
    let bob = app.user(Role::Teacher).await;
    let mut accepted = 0;
    for left in [2, 1, 0] {
        let response = register(&app, &ada).await;
        assert_eq!(response.status(), StatusCode::ACCEPTED);
        accepted += 1;
        let f = fields(&response).unwrap();
        assert_eq!(
            (f.policy.as_str(), f.quota, f.window, f.remaining),
            ("command", 3, 60, left)
        );
        // One unit comes back every 20 s: the whole quota after 20 s per unit spent.
        assert!((1..=20 * (3 - left)).contains(&f.reset), "{f:?}");
    }
    let detail = assert_limited(register(&app, &ada).await, "command", 20).await;
    assert!(
        detail.contains("command") && detail.contains("3/minute") && detail.contains("user"),
        "{detail}"
    );

    // Another user has a budget of their own; reads are a budget apart.
    let response = register(&app, &bob).await;
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    accepted += 1;
    assert_eq!(fields(&response).unwrap().remaining, 2);
    let response = app.get(&ada, "/v1/batches").await;
    assert_eq!(response.status(), StatusCode::OK);
    let f = fields(&response).unwrap();
    assert_eq!((f.policy.as_str(), f.quota, f.remaining), ("read", 5, 4));
    // Error answers of limited requests carry the fields too.
    let response = app
        .get(&ada, &format!("/v1/batches/{}", uuid::Uuid::new_v4()))
        .await;
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    assert_eq!(fields(&response).unwrap().remaining, 3);

    // Operations endpoints and CORS preflights are not limited (no fields).
    for path in ["/healthz", "/readyz", "/metrics"] {
        let response = app.get_public(path).await;
        assert!(fields(&response).is_none(), "{path}");
    }
    let preflight = app
        .client
        .request(reqwest::Method::OPTIONS, app.url("/v1/batches"))
        .header("origin", "https://app.example.org")
        .header("access-control-request-method", "POST")
        .send()
        .await
        .unwrap();
    assert!(fields(&preflight).is_none());

    let admin = app.user(Role::Admin).await;
    let metrics = app.get(&admin, "/metrics").await.text().await.unwrap();
    assert!(
        metrics.contains("essayflow_rate_limited_total{class=\"command\",key=\"user\"} 1"),
        "{metrics}"
    );
    // Nothing accepted is lost, nothing refused was appended.
    assert_eq!(app.event_count().await, accepted);
}

async fn budgets_are_per_api_key(engine: Engine) {
    let app = TestApp::spawn_with(engine, |s| standard(s, "100/minute", "2/minute")).await;
    let service = app.user(Role::Service).await;
    let key = |name: &'static str| {
        let (pool, id) = (app.storage.pool().clone(), service.id.clone());
        async move {
            keys::create(&pool, &Actor::cli(), &id, name)
                .await
                .unwrap()
                .key
        }
    };
    let (first, second) = (key("first").await, key("second").await);
    let result = |key: &str| {
        let body = json!({
            "message_id": uuid::Uuid::new_v4(), "batch_id": uuid::Uuid::new_v4(),
            "essay_id": "e1", "phase": "spellcheck", "outcome": "succeeded", "result": {}
        });
        app.client
            .post(app.url("/v1/internal/results"))
            .header("X-API-Key", key)
            .json(&body)
            .send()
    };
    // Past authentication (a result for no batch: 404), counted against the key.
    for left in [1, 0] {
        let response = result(&first).await.unwrap();
        assert_eq!(response.status(), StatusCode::NOT_FOUND);
        let f = fields(&response).unwrap();
        assert_eq!(
            (f.policy.as_str(), f.quota, f.remaining),
            ("command", 2, left)
        );
    }
    let detail = assert_limited(result(&first).await.unwrap(), "command", 30).await;
    assert!(detail.contains("API key"), "{detail}");
    // The user's other key, and the user's own token, have budgets of their own.
    let response = result(&second).await.unwrap();
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    assert_eq!(fields(&response).unwrap().remaining, 1);
    let response = app
        .client
        .post(app.url("/v1/internal/results"))
        .bearer_auth(&service.token)
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_ne!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(fields(&response).unwrap().remaining, 1);
    // A wrong key is anonymous: the address's budget, and the handler's 401.
    let response = result("efk_0000000000000000_nope").await.unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(fields(&response).unwrap().quota, 60);
}

async fn budgets_are_per_address_for_requests_without_a_valid_credential(engine: Engine) {
    let app = TestApp::spawn_with(engine, |s| {
        s.rate_limit.anonymous.read = "3/minute".parse().unwrap();
        s.rate_limit.anonymous.command = "2/minute".parse().unwrap();
    })
    .await;
    let teacher = app.user(Role::Teacher).await;
    for left in [2, 1] {
        let response = app.get_public("/v1/batches").await;
        assert_eq!(
            response.status(),
            StatusCode::UNAUTHORIZED,
            "the handler still answers"
        );
        let f = fields(&response).unwrap();
        assert_eq!((f.policy.as_str(), f.quota, f.remaining), ("read", 3, left));
    }
    // A forged token is no credential: the same address's budget.
    let forged = app
        .client
        .get(app.url("/v1/batches"))
        .bearer_auth("not.a.token")
        .send()
        .await
        .unwrap();
    assert_eq!(forged.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(fields(&forged).unwrap().remaining, 0);
    let detail = assert_limited(app.get_public("/v1/batches").await, "read", 20).await;
    assert!(detail.contains("address"), "{detail}");
    // Anonymous commands are a budget apart; a signed-in user from the same address has a
    // budget of their own.
    let response = app
        .client
        .post(app.url("/v1/batches"))
        .json(&batch_body())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    let f = fields(&response).unwrap();
    assert_eq!((f.policy.as_str(), f.quota, f.remaining), ("command", 2, 1));
    let response = app.get(&teacher, "/v1/batches").await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(fields(&response).unwrap().quota, 6000);
    assert_eq!(app.event_count().await, 0);
}

async fn logins_and_refreshes_spend_the_login_budget_of_the_address(engine: Engine) {
    let app = TestApp::spawn_with(engine, |s| {
        s.rate_limit.anonymous.login = "3/minute".parse().unwrap();
    })
    .await;
    // One login (by the helper), then a refresh and a wrong password.
    let teacher = app.user(Role::Teacher).await;
    let refresh = app
        .client
        .post(app.url("/v1/auth/refresh"))
        .json(&json!({ "refresh_token": teacher.refresh }))
        .send()
        .await
        .unwrap();
    assert_eq!(refresh.status(), StatusCode::OK);
    let f = fields(&refresh).unwrap();
    assert_eq!((f.policy.as_str(), f.quota, f.remaining), ("login", 3, 1));
    let wrong = app
        .client
        .post(app.url("/v1/auth/login"))
        .json(&json!({ "username": teacher.username, "password": "wrong password" }))
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(fields(&wrong).unwrap().remaining, 0);
    // Whoever logs in next from this address waits, before any password is checked.
    let next = app
        .client
        .post(app.url("/v1/auth/login"))
        .json(&json!({ "username": teacher.username, "password": "correct horse battery" }))
        .send()
        .await
        .unwrap();
    let detail = assert_limited(next, "login", 20).await;
    assert!(detail.contains("login"), "{detail}");
    // Logging in is its own budget: the signed-in user still reads.
    let response = app.get(&teacher, "/v1/batches").await;
    assert_eq!(response.status(), StatusCode::OK);
}

async fn tiers_set_by_admins_choose_the_budgets(engine: Engine) {
    let app = TestApp::spawn_with(engine, |s| {
        standard(s, "100/minute", "100/minute");
        s.rate_limit.tiers.insert(
            "free".into(),
            TierBudgets::of("3/hour", "100/hour").unwrap(),
        );
    })
    .await;
    let admin = app.user(Role::Admin).await;
    let free = app.user(Role::Teacher).await;
    let paying = app.user(Role::Teacher).await;
    let rich = app.user(Role::Teacher).await;
    let patch = |id: &str, body: Value| {
        app.client
            .patch(app.url(&format!("/v1/admin/users/{id}")))
            .bearer_auth(&admin.token)
            .header("content-type", "application/merge-patch+json")
            .body(body.to_string())
            .send()
    };
    // An unknown tier is refused, naming the field.
    let refused = patch(&free.id, json!({ "tier": "gold" })).await.unwrap();
    let body = assert_problem(refused, StatusCode::UNPROCESSABLE_ENTITY).await;
    assert_eq!(body["errors"][0]["field"], "tier");
    // Set, and shown in the user's answers.
    let response = patch(&free.id, json!({ "tier": "free" })).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.json::<Value>().await.unwrap()["tier"], "free");
    let shown = app
        .get_json(&admin, &format!("/v1/admin/users/{}", paying.id))
        .await;
    assert!(shown["tier"].is_null(), "{shown}");
    let response = patch(&rich.id, json!({ "tier": "enterprise" }))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);

    // The free user hits the free budget; the standard one does not.
    for left in [2, 1, 0] {
        let response = app.get(&free, "/v1/batches").await;
        assert_eq!(response.status(), StatusCode::OK);
        let f = fields(&response).unwrap();
        assert_eq!((f.quota, f.window, f.remaining), (3, 3600, left));
    }
    assert_limited(app.get(&free, "/v1/batches").await, "read", 1200).await;
    for _ in 0..5 {
        let response = app.get(&paying, "/v1/batches").await;
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(fields(&response).unwrap().quota, 100);
    }
    // Enterprise is unlimited: no fields at all.
    for _ in 0..5 {
        let response = app.get(&rich, "/v1/batches").await;
        assert_eq!(response.status(), StatusCode::OK);
        assert!(fields(&response).is_none());
    }
    let response = register(&app, &rich).await;
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    assert!(fields(&response).is_none());

    // Back to the default tier with null.
    let response = patch(&free.id, json!({ "tier": null })).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert!(response.json::<Value>().await.unwrap()["tier"].is_null());
    let response = app.get(&free, "/v1/batches").await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(fields(&response).unwrap().quota, 100);

    // A stored tier that is no longer configured counts as the default tier.
    let password = "correct horse battery";
    let username = format!("u{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    let stored = add_user(app.storage.pool(), &username, Role::Teacher, password)
        .await
        .unwrap();
    sqlx::query("UPDATE users SET tier = 'retired' WHERE id = $1")
        .bind(stored.id.to_string())
        .execute(app.storage.pool())
        .await
        .unwrap();
    let retired = app.login(stored.id.to_string(), &username, password).await;
    let response = app.get(&retired, "/v1/batches").await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(fields(&response).unwrap().quota, 100);
    assert_eq!(app.event_count().await, 1);
}

async fn a_budget_is_whole_again_after_its_window(engine: Engine) {
    let app = TestApp::spawn_with(engine, |s| standard(s, "100/minute", "2/second")).await;
    let teacher = app.user(Role::Teacher).await;
    let mut accepted = 0;
    for _ in 0..2 {
        let response = register(&app, &teacher).await;
        assert_eq!(response.status(), StatusCode::ACCEPTED);
        assert_eq!(fields(&response).unwrap().window, 1);
        accepted += 1;
    }
    let refused = register(&app, &teacher).await;
    let limited_at = Instant::now();
    assert_limited(refused, "command", 1).await;
    // Accepted again once a unit is back (every half second), well within the window.
    let deadline = limited_at + Duration::from_secs(5);
    loop {
        let response = register(&app, &teacher).await;
        if response.status() == StatusCode::ACCEPTED {
            accepted += 1;
            break;
        }
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        assert!(Instant::now() < deadline, "still refused after 5 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(limited_at.elapsed() < Duration::from_secs(2));
    assert_eq!(app.event_count().await, accepted);
}

async fn websocket_tokens_count_against_their_user(engine: Engine) {
    let app = TestApp::spawn_with(engine, |s| standard(s, "2/minute", "100/minute")).await;
    let teacher = app.user(Role::Teacher).await;
    // The handshake's token forms are the user's: `?access_token=`, then the subprotocol.
    let response = app
        .client
        .get(app.url(&format!("/v1/ws?access_token={}", teacher.token)))
        .send()
        .await
        .unwrap();
    assert_eq!(
        response.status(),
        StatusCode::UPGRADE_REQUIRED,
        "counted, then answered"
    );
    assert_eq!(fields(&response).unwrap().remaining, 1);
    let response = app
        .client
        .get(app.url("/v1/ws"))
        .header(
            "sec-websocket-protocol",
            format!("essayflow.v1, bearer.{}", teacher.token),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(fields(&response).unwrap().remaining, 0);
    assert_limited(app.get(&teacher, "/v1/batches").await, "read", 30).await;
    // Without a token, the address's budget.
    let response = app.get_public("/v1/ws").await;
    assert_eq!(fields(&response).unwrap().quota, 600);
}

async fn forwarded_addresses_count_only_behind_a_trusted_proxy(engine: Engine) {
    let limited = |s: &mut Settings| s.rate_limit.anonymous.read = "2/minute".parse().unwrap();
    let get = |app: &TestApp, name: &'static str, value: &'static str| {
        app.client
            .get(app.url("/v1/batches"))
            .header(name, value)
            .send()
    };
    // Off by default: X-Forwarded-For and Forwarded are ignored, the peer is the client.
    let app = TestApp::spawn_with(engine, limited).await;
    assert!(app.settings.rate_limit.trusted_proxies.is_empty());
    for client in ["198.51.100.1", "198.51.100.2"] {
        let response = get(&app, "x-forwarded-for", client).await.unwrap();
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    }
    assert_limited(
        get(&app, "forwarded", "for=198.51.100.3").await.unwrap(),
        "read",
        30,
    )
    .await;
    app.stop().await;

    // Behind a trusted proxy (the tests' peer, 127.0.0.1): the forwarded client.
    let app = TestApp::spawn_with(engine, |s| {
        limited(s);
        s.rate_limit.trusted_proxies = vec!["127.0.0.1".into()];
    })
    .await;
    for _ in 0..2 {
        let response = get(&app, "x-forwarded-for", "198.51.100.1").await.unwrap();
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    }
    assert_limited(
        get(&app, "x-forwarded-for", "198.51.100.1").await.unwrap(),
        "read",
        30,
    )
    .await;
    // The rightmost untrusted hop is the client: what it claims to its left does not count.
    assert_limited(
        get(&app, "x-forwarded-for", "203.0.113.5, 198.51.100.1")
            .await
            .unwrap(),
        "read",
        30,
    )
    .await;
    // Others have their own budgets.
    let other = get(&app, "x-forwarded-for", "198.51.100.2").await.unwrap();
    assert_eq!(fields(&other).unwrap().remaining, 1);
    // A `Forwarded` the proxy passed through is the client's own: not believed (the peer,
    // the proxy itself, is counted).
    let spoofed = get(&app, "forwarded", "for=\"198.51.100.3:4711\";proto=http")
        .await
        .unwrap();
    assert_eq!(fields(&spoofed).unwrap().remaining, 1);
    let spoofed = get(&app, "forwarded", "for=198.51.100.4").await.unwrap();
    assert_eq!(fields(&spoofed).unwrap().remaining, 0);
    assert_limited(
        get(&app, "forwarded", "for=198.51.100.5").await.unwrap(),
        "read",
        30,
    )
    .await;
    // IPv6 clients by their /64.
    for _ in 0..2 {
        let response = get(&app, "x-forwarded-for", "2001:db8:0:1::1")
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    }
    assert_limited(
        get(&app, "x-forwarded-for", "2001:db8:0:1::2")
            .await
            .unwrap(),
        "read",
        30,
    )
    .await;
    let other = get(&app, "x-forwarded-for", "2001:db8:0:2::1")
        .await
        .unwrap();
    assert_eq!(fields(&other).unwrap().remaining, 1);
    app.stop().await;

    // A proxy that writes `Forwarded` (RFC 7239): that header, and X-Forwarded-For ignored.
    let app = TestApp::spawn_with(engine, |s| {
        limited(s);
        s.rate_limit.trusted_proxies = vec!["127.0.0.1".into()];
        s.rate_limit.forwarded_header = api::edge::ratelimit::ForwardedHeader::Forwarded;
    })
    .await;
    for _ in 0..2 {
        let response = get(&app, "forwarded", "for=\"[2001:db8:0:1::2]\"")
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    }
    assert_limited(
        get(
            &app,
            "forwarded",
            "for=\"[2001:db8:0:1::3]:4711\";proto=http",
        )
        .await
        .unwrap(),
        "read",
        30,
    )
    .await;
    let other = get(&app, "x-forwarded-for", "2001:db8:0:1::2")
        .await
        .unwrap();
    assert_eq!(
        fields(&other).unwrap().remaining,
        1,
        "the peer's own budget"
    );
}

async fn turned_off_there_are_no_budgets_and_no_fields(engine: Engine) {
    let app = TestApp::spawn_with(engine, |s| {
        s.rate_limit.anonymous.read = "1/minute".parse().unwrap();
        s.rate_limit.enabled = false;
    })
    .await;
    for _ in 0..3 {
        let response = app.get_public("/v1/batches").await;
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        assert!(fields(&response).is_none());
    }
    let teacher = app.user(Role::Teacher).await;
    let response = register(&app, &teacher).await;
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    assert!(fields(&response).is_none());
}

/// Limits are kept in each node's memory: two nodes on one database give a client up to
/// twice its budget, as docs/rate-limits.md says.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_are_per_node_postgres() {
    let a = TestApp::spawn_with(Engine::Postgres, |s| standard(s, "100/minute", "2/minute")).await;
    let b = Application::build(a.settings.clone()).await.unwrap();
    let b_url = format!("http://127.0.0.1:{}", b.port());
    let (stop_b, stopped) = tokio::sync::oneshot::channel::<()>();
    let node_b = tokio::spawn(b.run_until_stopped(async move {
        let _ = stopped.await;
    }));
    let teacher = a.user(Role::Teacher).await;
    let mut accepted = 0;
    for _ in 0..2 {
        assert_eq!(register(&a, &teacher).await.status(), StatusCode::ACCEPTED);
        accepted += 1;
    }
    assert_limited(register(&a, &teacher).await, "command", 30).await;
    // Node B has not seen this user: its whole budget, for the same token.
    for left in [1, 0] {
        let response = a
            .client
            .post(format!("{b_url}/v1/batches"))
            .bearer_auth(&teacher.token)
            .json(&batch_body())
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::ACCEPTED);
        accepted += 1;
        assert_eq!(fields(&response).unwrap().remaining, left);
    }
    let refused = a
        .client
        .post(format!("{b_url}/v1/batches"))
        .bearer_auth(&teacher.token)
        .json(&batch_body())
        .send()
        .await
        .unwrap();
    assert_limited(refused, "command", 30).await;
    // Every accepted command, on either node, is in the shared event store.
    wait_until(Duration::from_secs(5), || async {
        a.event_count().await == accepted
    })
    .await;
    assert_eq!(a.event_count().await, accepted);
    let _ = stop_b.send(());
    node_b.await.unwrap().unwrap();
}
