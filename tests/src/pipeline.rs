//! Helpers for pipeline scenarios: request a pipeline, wait for a batch's status, post results
//! to the HTTP twin of the results topic.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::{TestApp, User, wait_until};

impl TestApp {
    /// Registers a batch of `essays` and adds them all (it is then ready); returns its id.
    pub async fn ready_batch(&self, teacher: &User, essays: &[&str]) -> String {
        let batch = self.register_batch(teacher, essays.len() as u32).await;
        let id = batch["batch_id"].as_str().unwrap().to_owned();
        assert_eq!(
            self.add_essays(teacher, &id, essays).await.status(),
            StatusCode::ACCEPTED
        );
        id
    }

    /// Requests `pipeline` for a batch; returns the 202 body.
    pub async fn request_pipeline(&self, user: &User, batch_id: &str, pipeline: &str) -> Value {
        let response = self
            .post(
                user,
                &format!("/v1/batches/{batch_id}/pipelines"),
                &json!({ "pipeline": pipeline }),
            )
            .await;
        assert_eq!(response.status(), StatusCode::ACCEPTED);
        response.json().await.unwrap()
    }

    /// The conductor's view of a batch.
    pub async fn status(&self, user: &User, batch_id: &str) -> Value {
        self.get_json(user, &format!("/v1/batches/{batch_id}/status"))
            .await
    }

    /// Waits until the batch's status is `status`; returns the status document.
    pub async fn wait_for_status(&self, user: &User, batch_id: &str, status: &str) -> Value {
        wait_until(Duration::from_secs(60), || async {
            self.status(user, batch_id).await["status"] == status
        })
        .await;
        self.status(user, batch_id).await
    }

    /// Waits until the pipeline request `request_id` has reached `status`.
    pub async fn wait_for_request(
        &self,
        user: &User,
        batch_id: &str,
        request_id: &str,
        status: &str,
    ) -> Value {
        wait_until(Duration::from_secs(60), || async {
            let current = self.status(user, batch_id).await;
            current["status"] == status && current["pipeline"]["request_id"] == request_id
        })
        .await;
        self.status(user, batch_id).await
    }

    /// Waits until the batch's current phase is `phase` (its requests are out).
    pub async fn wait_for_phase(&self, user: &User, batch_id: &str, phase: &str) {
        wait_until(Duration::from_secs(30), || async {
            self.status(user, batch_id).await["pipeline"]["current_phase"] == phase
        })
        .await;
    }

    /// The value of a metric without labels (or with the labels written out in `name`), from
    /// `/metrics`.
    pub async fn metric(&self, name: &str) -> Option<i64> {
        let text = self.get_ops("/metrics").await.text().await.ok()?;
        text.lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
    }

    /// The pages of a batch's history (`GET /v1/batches/{id}/events`), `limit` events a page
    /// (the server's default when `None`), following `next_cursor` to the last page.
    pub async fn event_pages(
        &self,
        user: &User,
        batch_id: &str,
        limit: Option<u32>,
    ) -> Vec<Vec<Value>> {
        let base = format!("/v1/batches/{batch_id}/events");
        let mut pages = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let mut query = Vec::new();
            if let Some(limit) = limit {
                query.push(format!("limit={limit}"));
            }
            if let Some(after) = &after {
                query.push(format!("after={after}"));
            }
            let path = if query.is_empty() {
                base.clone()
            } else {
                format!("{base}?{}", query.join("&"))
            };
            let response = self.get(user, &path).await;
            assert_eq!(response.status(), StatusCode::OK, "{path}");
            let page: Value = response.json().await.unwrap();
            pages.push(page["items"].as_array().unwrap().clone());
            match page["next_cursor"].as_str() {
                Some(cursor) => after = Some(cursor.to_owned()),
                None => return pages,
            }
        }
    }

    /// Every event of a batch, in order (all pages).
    pub async fn events(&self, user: &User, batch_id: &str) -> Vec<Value> {
        self.event_pages(user, batch_id, None)
            .await
            .into_iter()
            .flatten()
            .collect()
    }

    /// The types of a batch's events, in order.
    pub async fn event_types(&self, user: &User, batch_id: &str) -> Vec<String> {
        self.events(user, batch_id)
            .await
            .iter()
            .map(|e| e["event_type"].as_str().unwrap().to_owned())
            .collect()
    }

    /// Posts one result to `POST /v1/internal/results`.
    pub async fn post_result(&self, service: &User, result: &Value) -> reqwest::Response {
        self.post(service, "/v1/internal/results", result).await
    }

    /// Waits until the conductor and the relay have handled the whole log.
    pub async fn wait_for_pipeline_workers(&self) {
        wait_until(Duration::from_secs(30), || async {
            let ready: Value = self
                .get_ops("/readyz")
                .await
                .json()
                .await
                .unwrap_or_default();
            let pipeline = &ready["checks"]["pipeline"];
            pipeline["conductor"]["lag"] == 0 && pipeline["relay"]["lag"] == 0
        })
        .await;
    }
}

/// A `result` object whose compact JSON is exactly `bytes` long (at least 11).
pub fn result_of_size(bytes: usize) -> Value {
    // {"blob":""} is 11 bytes.
    json!({ "blob": "x".repeat(bytes - 11) })
}

/// A result message as processors send it.
pub fn result(batch_id: &str, essay_id: &str, phase: &str, outcome: &str) -> Value {
    json!({
        "message_id": format!("{batch_id}/{phase}/{essay_id}"),
        "batch_id": batch_id,
        "essay_id": essay_id,
        "phase": phase,
        "outcome": outcome,
        "result": { "score": 4 },
        "error": (outcome == "failed").then_some("could not parse the essay"),
    })
}
