//! A batch's history over HTTP (`GET /v1/batches/{id}/events`): pages that follow one another
//! with no gap and no duplicate, pages bounded in bytes as well as in events, refusals of bad
//! limits and cursors, and another teacher's batch answered like a missing one.
#![allow(clippy::unwrap_used)]

use api::auth::Role;
use commands::{Engine, HISTORY_PAGE_BYTES};
use integration_tests::{TestApp, assert_problem, both_engines};
use reqwest::StatusCode;
use serde_json::{Value, json};

/// The sequences of every event in `pages`, in the order served.
fn sequences(pages: &[Vec<Value>]) -> Vec<i64> {
    pages
        .iter()
        .flatten()
        .map(|e| e["sequence"].as_i64().unwrap())
        .collect()
}

/// The bytes of an event's payload as compact JSON: never more than the stored text the server
/// counts against its budget.
fn payload_bytes(event: &Value) -> usize {
    serde_json::to_string(&event["payload"]).unwrap().len()
}

async fn a_long_history_pages_in_order_with_no_gap_and_no_duplicate(engine: Engine) {
    let app = TestApp::spawn(engine).await;
    let teacher = app.user(Role::Teacher).await;
    let id = app.register_batch(&teacher, 150).await["batch_id"]
        .as_str()
        .unwrap()
        .to_owned();
    for i in 0..150 {
        let added = app.add_essays(&teacher, &id, &[&format!("e{i}")]).await;
        assert_eq!(added.status(), StatusCode::ACCEPTED);
    }
    // BatchRegistered, 150 EssaysAdded, BatchReadyForProcessing.
    let total = 152;
    let every: Vec<i64> = (1..=total).collect();

    let pages = app.event_pages(&teacher, &id, Some(7)).await;
    assert_eq!(sequences(&pages), every);
    assert_eq!(pages.len(), 22);
    assert!(pages[..21].iter().all(|p| p.len() == 7));
    assert_eq!(pages[21].len(), 5);
    let types: Vec<&str> = pages
        .iter()
        .flatten()
        .map(|e| e["event_type"].as_str().unwrap())
        .collect();
    assert_eq!(types[0], "BatchRegistered");
    assert_eq!(types[151], "BatchReadyForProcessing");

    // A history that ends exactly at a page's end has no empty page after it.
    let pages = app.event_pages(&teacher, &id, Some(8)).await;
    assert_eq!(pages.len(), 19);
    assert_eq!(sequences(&pages), every);

    // The default is 100 a page; 1000 takes the whole history at once.
    let first: Value = app
        .get_json(&teacher, &format!("/v1/batches/{id}/events"))
        .await;
    assert_eq!(first["items"].as_array().unwrap().len(), 100);
    assert_eq!(first["next_cursor"], "100");
    let rest: Value = app
        .get_json(
            &teacher,
            &format!(
                "/v1/batches/{id}/events?after={}",
                first["next_cursor"].as_str().unwrap()
            ),
        )
        .await;
    assert_eq!(rest["items"].as_array().unwrap().len(), 52);
    assert_eq!(rest["items"][0]["sequence"], 101);
    assert!(rest["next_cursor"].is_null());
    let all = app.event_pages(&teacher, &id, Some(1000)).await;
    assert_eq!(all.len(), 1);
    assert_eq!(sequences(&all), every);

    // Past the end: an empty last page.
    let beyond: Value = app
        .get_json(&teacher, &format!("/v1/batches/{id}/events?after={total}"))
        .await;
    assert_eq!(beyond, json!({ "items": [], "next_cursor": null }));
}

async fn a_page_of_large_essays_ends_at_the_byte_budget(engine: Engine) {
    let app = TestApp::spawn(engine).await;
    let teacher = app.user(Role::Teacher).await;
    // 45 essays of 100 000 characters, one command each: about 4.5 MB of payloads, more than
    // one page's budget of 4 MiB.
    let essays = 45;
    let id = app.register_batch(&teacher, essays).await["batch_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let text = "abcdefghi ".repeat(10_000);
    for i in 0..essays {
        let body =
            json!({ "essays": [{ "essay_id": format!("e{i}"), "title": "Long", "text": text }] });
        let added = app
            .post(&teacher, &format!("/v1/batches/{id}/essays"), &body)
            .await;
        assert_eq!(added.status(), StatusCode::ACCEPTED);
    }
    let total = i64::from(essays) + 2;

    let pages = app.event_pages(&teacher, &id, Some(1000)).await;
    assert_eq!(sequences(&pages), (1..=total).collect::<Vec<_>>());
    assert!(pages.len() > 1, "the first page ended early");
    assert!(pages[0].len() < total as usize);
    for page in &pages {
        // The budget is reached only by a page's last event.
        let (last, before) = page.split_last().unwrap();
        let before: usize = before.iter().map(payload_bytes).sum();
        assert!(
            before < HISTORY_PAGE_BYTES,
            "{before} bytes before the last event"
        );
        assert!(payload_bytes(last) <= 100_200);
    }
    // And the first page used it: its stored payloads reached the budget, and the stored form
    // exceeds the compact one only by a few dozen bytes an event.
    let first: usize = pages[0].iter().map(payload_bytes).sum();
    assert!(
        first + 64 * pages[0].len() >= HISTORY_PAGE_BYTES,
        "{first} bytes in {} events",
        pages[0].len()
    );
}

async fn bad_limits_and_cursors_are_a_400_naming_the_field(engine: Engine) {
    let app = TestApp::spawn(engine).await;
    let teacher = app.user(Role::Teacher).await;
    let id = app.register_batch(&teacher, 2).await["batch_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let cases = [
        ("limit=0", "limit"),
        ("limit=1001", "limit"),
        ("limit=-1", "limit"),
        ("limit=many", "limit"),
        ("limit=", "limit"),
        ("after=garbage", "after"),
        ("after=-1", "after"),
        ("after=1.5", "after"),
        ("limit=5&after=%00", "after"),
    ];
    for (query, field) in cases {
        let response = app
            .get(&teacher, &format!("/v1/batches/{id}/events?{query}"))
            .await;
        let problem = assert_problem(response, StatusCode::BAD_REQUEST).await;
        assert_eq!(problem["errors"][0]["field"], field, "{query}");
        assert_eq!(problem["type"], "urn:essayflow:problem:invalid-query");
    }
    for query in ["limit=1", "limit=1000", "after=0"] {
        let response = app
            .get(&teacher, &format!("/v1/batches/{id}/events?{query}"))
            .await;
        assert_eq!(response.status(), StatusCode::OK, "{query}");
    }
}

async fn another_teachers_history_is_a_404_like_a_missing_batch(engine: Engine) {
    let app = TestApp::spawn(engine).await;
    let alice = app.user(Role::Teacher).await;
    let bob = app.user(Role::Teacher).await;
    let admin = app.user(Role::Admin).await;
    let id = app.register_batch(&alice, 2).await["batch_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let missing = uuid::Uuid::new_v4();
    for query in ["", "?limit=5", "?after=1&limit=1"] {
        let theirs = app
            .get(&bob, &format!("/v1/batches/{id}/events{query}"))
            .await;
        let theirs = assert_problem(theirs, StatusCode::NOT_FOUND).await;
        let nobodys = app
            .get(&bob, &format!("/v1/batches/{missing}/events{query}"))
            .await;
        let nobodys = assert_problem(nobodys, StatusCode::NOT_FOUND).await;
        assert_eq!(theirs, nobodys, "{query}");
    }
    let seen = app.events(&admin, &id).await;
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0]["payload"]["owner_id"], alice.id);
}

async fn the_openapi_document_describes_the_history_as_pages(engine: Engine) {
    let app = TestApp::spawn(engine).await;
    let openapi: Value = app.get_public("/openapi.json").await.json().await.unwrap();
    let get = &openapi["paths"]["/v1/batches/{id}/events"]["get"];
    let params: Vec<&str> = get["parameters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(params, ["id", "after", "limit"], "{get}");
    let ok = &get["responses"]["200"]["content"]["application/json"]["schema"]["$ref"];
    assert_eq!(ok, "#/components/schemas/EventPage", "{get}");
    assert!(get["responses"]["400"].is_object(), "{get}");
    let page = &openapi["components"]["schemas"]["EventPage"]["properties"];
    assert_eq!(page["items"]["type"], "array", "{page}");
    assert!(page["next_cursor"].is_object(), "{page}");
    assert!(
        openapi["components"]["schemas"]["EventResponse"].is_object(),
        "EventResponse is not documented"
    );
}

both_engines!(
    a_long_history_pages_in_order_with_no_gap_and_no_duplicate,
    a_page_of_large_essays_ends_at_the_byte_budget,
    bad_limits_and_cursors_are_a_400_naming_the_field,
    another_teachers_history_is_a_404_like_a_missing_batch,
    the_openapi_document_describes_the_history_as_pages,
);
