//! The conventions of the published OpenAPI document (`GET /openapi.json`), applied to every
//! operation after utoipa generated it from the handlers' `#[utoipa::path]` annotations, so that
//! the statuses every operation can answer, their problem documents and the headers of every
//! answer can never drift from the service (docs/api-contract.md).
//!
//! The handlers' annotations declare what is particular to each operation: its success
//! answers, the refusals of its own rules (404 of a missing resource, 409 of a state that does
//! not allow the command, 422 of a field out of range ...), its request schema with the real
//! constraints, and its security. [`apply`] adds what the edge and the extractors answer for any
//! operation of a kind:
//!
//! | status | added to | problem types |
//! |---|---|---|
//! | 400 | operations with a JSON body or query parameters | `malformed-json`, `invalid-query`, `bad-request` |
//! | 401, 403 | operations with a security requirement | `unauthorized`, `forbidden` |
//! | 404 | operations with path parameters | `not-found`, `no-route` |
//! | 413 | every operation (`Content-Length` over the limit, before the body is read) | `body-too-large` |
//! | 415, 422 | operations with a JSON body | `unsupported-media-type`, `validation` |
//! | 429 | every rate-limited operation (all but `/healthz`, `/readyz`, `/metrics`) | `rate-limited`, ... |
//! | 503 | every operation (load shedding, timeout, database, connection cap) | `overloaded`, `timeout`, ... |
//!
//! Every error answer is `application/problem+json` (RFC 9457) whose `type` is one of the
//! [`PROBLEM_TYPES`] of its status; every answer declares `X-Request-ID` and `X-Correlation-Id`,
//! rate-limited ones `RateLimit` and `RateLimit-Policy`, 429 and 503 `Retry-After`.
//!
//! Done on the JSON form of the document (utoipa's typed model has no `required` on a response
//! header, nor header components), once at start-up.

use serde_json::{Map, Value, json};

/// The prefix of every problem `type`: `urn:essayflow:problem:<code>`.
pub const PROBLEM_TYPE_PREFIX: &str = "urn:essayflow:problem:";

/// One problem `type` the API answers with: its code (the URN's last part), its status and
/// what it means. The list of docs/api-contract.md.
#[derive(Debug, Clone, Copy)]
pub struct ProblemType {
    pub code: &'static str,
    pub status: u16,
    pub meaning: &'static str,
}

const fn problem(code: &'static str, status: u16, meaning: &'static str) -> ProblemType {
    ProblemType {
        code,
        status,
        meaning,
    }
}

/// Every problem type the service answers with (500 `internal` included, which the document
/// declares nowhere: it is a bug, never a contract).
pub const PROBLEM_TYPES: &[ProblemType] = &[
    problem(
        "malformed-json",
        400,
        "The body is not JSON (syntax, not UTF-8, trailing characters).",
    ),
    problem(
        "invalid-query",
        400,
        "A query parameter is invalid or unknown; `errors` names it.",
    ),
    problem(
        "bad-request",
        400,
        "The request was refused before routing (for example a path that is not valid UTF-8 once decoded).",
    ),
    problem(
        "unauthorized",
        401,
        "No credential, or one that is forged, expired, revoked or of a disabled user; also a wrong login or refresh token. `WWW-Authenticate: Bearer`.",
    ),
    problem(
        "forbidden",
        403,
        "The credential's role may not use this operation.",
    ),
    problem(
        "not-found",
        404,
        "The resource does not exist, or belongs to someone else (the same answer).",
    ),
    problem("no-route", 404, "No such path."),
    problem(
        "method-not-allowed",
        405,
        "The path exists, the method does not (`Allow` lists the methods).",
    ),
    problem(
        "batch-exists",
        409,
        "A batch with this `batch_id` is already registered (by anyone).",
    ),
    problem(
        "batch-cancelled",
        409,
        "The batch is cancelled: it takes no more commands.",
    ),
    problem(
        "no-essays",
        409,
        "The pipeline needs essays and the batch has none.",
    ),
    problem(
        "too-many-essays",
        409,
        "Adding these essays would exceed the batch's expected essay count.",
    ),
    problem(
        "duplicate-essay",
        409,
        "An essay with this `essay_id` is already in the batch (or twice in the request).",
    ),
    problem(
        "essays-incomplete",
        409,
        "Fewer essays than expected are added: the pipeline cannot start.",
    ),
    problem(
        "pipeline-in-progress",
        409,
        "Another pipeline request of the batch is still running.",
    ),
    problem("unknown-pipeline", 409, "The pipeline is not configured."),
    problem(
        "unknown-essay",
        409,
        "The result names an essay that is not in the batch.",
    ),
    problem(
        "result-not-expected",
        409,
        "No result of this phase for this essay is expected now (phase not running, or already answered).",
    ),
    problem(
        "concurrent-modification",
        409,
        "Other commands kept changing the resource; read it again and retry.",
    ),
    problem(
        "job-running",
        409,
        "A rebuild or verification of this projection is already running.",
    ),
    problem(
        "already-exists",
        409,
        "A user of that name already exists (deleted users included).",
    ),
    problem(
        "conflict",
        409,
        "The resource's state does not allow this (a deleted user, a revoked key, the last admin).",
    ),
    problem(
        "body-too-large",
        413,
        "The body is over the 4 MiB limit; refused before it is read when `Content-Length` says so.",
    ),
    problem(
        "unsupported-media-type",
        415,
        "The body is not declared as JSON (`application/json` or any `application/*+json`).",
    ),
    problem(
        "validation",
        422,
        "The body has the wrong shape or values out of range; `errors` lists every field with its reason.",
    ),
    problem(
        "websocket-upgrade-required",
        426,
        "`GET /v1/ws` without a WebSocket upgrade.",
    ),
    problem(
        "rate-limited",
        429,
        "Over a rate-limit budget (docs/rate-limits.md); `Retry-After` says when to retry.",
    ),
    problem(
        "login-throttled",
        429,
        "Too many failed logins for this account or from this address; `Retry-After`.",
    ),
    problem(
        "too-many-websockets",
        429,
        "This user has as many WebSocket connections open on this node as allowed.",
    ),
    problem(
        "internal",
        500,
        "A bug: the cause is logged with the request's ids, never shown. Never part of the contract.",
    ),
    problem(
        "overloaded",
        503,
        "The node is handling as many requests as it may (`max_in_flight`); `Retry-After: 1`.",
    ),
    problem(
        "timeout",
        503,
        "The request was not answered within the request timeout; a command may still have been appended.",
    ),
    problem(
        "database-unavailable",
        503,
        "The database cannot be reached (the circuit breaker is open, or this request failed to reach it).",
    ),
    problem(
        "too-many-connections",
        503,
        "The node has as many connections open as it may; the connection is closed after this answer.",
    ),
    problem(
        "busy",
        503,
        "The password-hashing queue is full (login, user creation, password reset).",
    ),
    problem(
        "not-yet-consistent",
        503,
        "The read model did not reach `min_position` within the consistency wait.",
    ),
    problem(
        "too-many-websockets",
        503,
        "The node has as many WebSocket connections open as it may.",
    ),
    problem(
        "unavailable",
        503,
        "Another server error answered by a layer without a body.",
    ),
];

/// The paths that are never rate limited (`api::edge::ratelimit`, `Class::of`).
const UNLIMITED_PATHS: &[&str] = &["/healthz", "/readyz", "/metrics"];

/// The statuses whose problem `type`s an operation may answer, besides its own (see the module
/// documentation).
const COMMON_STATUSES: &[u16] = &[400, 401, 403, 404, 413, 415, 422, 429, 503];

/// What the document says that depends on the configuration: the configured pipelines and
/// rate-limit tiers, and the batch statuses.
#[derive(Debug, Clone, Default)]
pub struct Runtime {
    /// The names `POST /v1/batches/{id}/pipelines` accepts (the pipeline catalog).
    pub pipelines: Vec<String>,
    /// The tier names `PATCH /v1/admin/users/{id}` accepts.
    pub tiers: Vec<String>,
    /// The `status` values `GET /v1/batches` filters on.
    pub batch_statuses: Vec<String>,
    /// The projections an admin may rebuild or verify.
    pub projections: Vec<String>,
}

/// The problem types of a status.
pub fn problem_types(status: u16) -> impl Iterator<Item = &'static ProblemType> {
    PROBLEM_TYPES.iter().filter(move |p| p.status == status)
}

/// The name of the `application/problem+json` schema component of a status.
fn problem_schema_name(status: u16) -> String {
    format!("Problem{status}")
}

/// Applies the conventions to a document generated by utoipa (`serde_json::to_value` of it).
pub fn apply(doc: &mut Value, runtime: &Runtime) {
    add_components(doc);
    specialise(doc, runtime);
    let Some(paths) = doc.get_mut("paths").and_then(Value::as_object_mut) else {
        return;
    };
    for (path, item) in paths.iter_mut() {
        let Some(item) = item.as_object_mut() else {
            continue;
        };
        for method in ["get", "put", "post", "delete", "patch", "head", "options"] {
            if let Some(operation) = item.get_mut(method).and_then(Value::as_object_mut) {
                operation_conventions(path, operation);
            }
        }
    }
}

/// `components`: `Problem` (RFC 9457 with the field errors), one `Problem<status>` per status
/// that narrows `type` and `status`, and the security schemes' neighbours.
fn add_components(doc: &mut Value) {
    let Some(root) = doc.as_object_mut() else {
        return;
    };
    let schemas = object_at(object_at(root, "components"), "schemas");
    schemas.insert(
        "Problem".into(),
        json!({
            "type": "object",
            "description": "An RFC 9457 problem document (`application/problem+json`). `type` is \
                `urn:essayflow:problem:<code>` (the codes: docs/api-contract.md); \
                clients branch on it, not on `detail`.",
            "required": ["type", "title", "status", "detail"],
            "properties": {
                "type": {"type": "string", "pattern": "^urn:essayflow:problem:[a-z0-9-]+$",
                    "description": "The problem type: a URN, stable across versions."},
                "title": {"type": "string", "description": "The status's reason phrase."},
                "status": {"type": "integer", "minimum": 400, "maximum": 599,
                    "description": "The HTTP status, repeated."},
                "detail": {"type": "string", "description": "What happened, for people."},
                "instance": {"type": "string", "format": "uri-reference",
                    "description": "Reserved by RFC 9457; not sent (the `X-Request-ID` header identifies the occurrence)."},
                "errors": {"type": "array", "items": {"$ref": "#/components/schemas/FieldError"},
                    "description": "400 `invalid-query` and 422 `validation` only: every field refused, with its reason."}
            },
            "example": {
                "type": "urn:essayflow:problem:validation",
                "title": "Unprocessable Entity",
                "status": 422,
                "detail": "the request is invalid",
                "errors": [{"field": "expected_essay_count", "reason": "must be between 1 and 1000, got 0"}]
            }
        }),
    );
    schemas.insert(
        "FieldError".into(),
        json!({
            "type": "object",
            "required": ["field", "reason"],
            "properties": {
                "field": {"type": "string", "description": "The field's path in the body or the parameter's name, e.g. `essays[3].text`, `limit`."},
                "reason": {"type": "string"}
            }
        }),
    );
    let mut statuses: Vec<u16> = PROBLEM_TYPES
        .iter()
        .map(|p| p.status)
        .filter(|s| *s != 500)
        .collect();
    statuses.dedup();
    for status in statuses {
        let codes: Vec<Value> = problem_types(status)
            .map(|p| Value::String(format!("{PROBLEM_TYPE_PREFIX}{}", p.code)))
            .collect();
        let list: Vec<String> = problem_types(status)
            .map(|p| format!("- `{}`: {}", p.code, p.meaning))
            .collect();
        let first = problem_types(status).next().map_or("", |p| p.code);
        schemas.insert(
            problem_schema_name(status),
            json!({
                "description": format!("A problem of status {status}; its `type` is one of:\n{}", list.join("\n")),
                "allOf": [
                    {"$ref": "#/components/schemas/Problem"},
                    {"type": "object", "properties": {
                        "type": {"enum": codes},
                        "status": {"const": status}
                    }}
                ],
                "example": {
                    "type": format!("{PROBLEM_TYPE_PREFIX}{first}"),
                    "title": reason_phrase(status),
                    "status": status,
                    "detail": reason_phrase(status)
                }
            }),
        );
    }
}

/// A JSON Schema `pattern` (ECMA-262, also read by Python's `re`): no U+0000 anywhere (no
/// database text column takes it).
pub const NO_NUL: &str = "^[^\\u0000]*$";

/// A `pattern` for the domain's "not blank" text: no U+0000, and at least one character that
/// is not white space as Rust's `char::is_whitespace` counts it (`str::trim`). Written out:
/// `\s` differs between ECMA-262, Python and Rust (U+FEFF, U+0085, U+001C..U+001F).
pub const NOT_BLANK: &str = "^[^\\u0000]*[^\\u0000\\t\\n\\u000b\\f\\r \\u0085\\u00a0\\u1680\\u2000-\\u200a\\u2028\\u2029\\u202f\\u205f\\u3000][^\\u0000]*$";

/// Rules of request fields that a `#[schema]` attribute cannot say (a `pattern` must be a
/// literal there) or that live in another crate's type: `(schema, property, members merged
/// into the property's schema)`. Checked by this module's tests: every entry must find its
/// property.
fn field_rules() -> Vec<(&'static str, &'static str, Value)> {
    vec![
        (
            "RegisterBatchRequest",
            "title",
            json!({"pattern": NOT_BLANK}),
        ),
        (
            "RegisterBatchRequest",
            "class_designation",
            json!({"pattern": NOT_BLANK}),
        ),
        ("EssayInput", "title", json!({"pattern": NOT_BLANK})),
        ("EssayInput", "text", json!({"pattern": NOT_BLANK})),
        ("CancelRequest", "reason", json!({"pattern": NO_NUL})),
        ("NewKey", "name", json!({"pattern": NOT_BLANK})),
        // `role` and `status` may be left out, not removed (`null` is refused); a deleted
        // status is made with DELETE.
        (
            "UserPatch",
            "role",
            json!({"$ref": "#/components/schemas/Role"}),
        ),
        (
            "UserPatch",
            "status",
            json!({"type": "string", "enum": ["active", "disabled"]}),
        ),
        (
            "ResultMessage",
            "message_id",
            json!({"minLength": 1, "maxLength": 128, "pattern": "^[!-~]+$"}),
        ),
        (
            "ResultMessage",
            "essay_id",
            json!({"minLength": 1, "maxLength": 64, "pattern": "^[A-Za-z0-9_.:-]+$"}),
        ),
        (
            "ResultMessage",
            "phase",
            json!({"minLength": 1, "maxLength": 32, "pattern": "^[a-z0-9_]+$"}),
        ),
        (
            "ResultMessage",
            "outcome",
            json!({"type": "string", "enum": ["succeeded", "failed"]}),
        ),
        (
            "ResultMessage",
            "error",
            json!({"maxLength": commands::messages::MAX_ERROR_CHARS, "pattern": NO_NUL}),
        ),
    ]
}

/// The enumerations that come from the configuration, and the rules utoipa cannot say.
fn specialise(doc: &mut Value, runtime: &Runtime) {
    let schemas = doc
        .pointer_mut("/components/schemas")
        .and_then(Value::as_object_mut);
    if let Some(schemas) = schemas {
        for (schema, property, rules) in field_rules() {
            let target = schemas
                .get_mut(schema)
                .and_then(|s| s.pointer_mut(&format!("/properties/{property}")));
            if let (Some(target), Value::Object(rules)) = (target, rules) {
                // A replacing `$ref` or `type` drops what utoipa said about the type.
                if rules.contains_key("$ref") || rules.contains_key("type") {
                    *target = Value::Object(Map::new());
                }
                if let Value::Object(target) = target {
                    target.extend(rules);
                }
            }
        }
        if let Some(pipeline) = schemas
            .get_mut("RequestPipelineRequest")
            .and_then(|s| s.pointer_mut("/properties/pipeline"))
        {
            pipeline["enum"] = json!(runtime.pipelines);
        }
        if let Some(tier) = schemas
            .get_mut("UserPatch")
            .and_then(|s| s.pointer_mut("/properties/tier"))
        {
            let mut tiers: Vec<Value> = runtime.tiers.iter().map(|t| json!(t)).collect();
            tiers.push(Value::Null);
            tier["enum"] = Value::Array(tiers);
        }
    }
    for action in ["rebuild", "verify"] {
        let name = doc
            .pointer_mut(&format!(
                "/paths/~1v1~1admin~1projections~1{{name}}~1{action}/post/parameters"
            ))
            .and_then(Value::as_array_mut)
            .and_then(|ps| ps.iter_mut().find(|p| p["name"] == "name"));
        if let Some(name) = name {
            name["schema"] = json!({"type": "string", "enum": runtime.projections});
        }
    }
    // The WebSocket handshake (RFC 6455 section 4.1): without these headers the answer is 426.
    if let Some(Value::Array(params)) = doc.pointer_mut("/paths/~1v1~1ws/get/parameters") {
        let header = |name: &str, schema: Value, description: &str| {
            json!({"name": name, "in": "header", "required": true, "schema": schema,
                "description": description})
        };
        params.extend([
            header(
                "Connection",
                json!({"type": "string", "enum": ["Upgrade"]}),
                "An upgrade (RFC 9110 section 7.6.1).",
            ),
            header(
                "Upgrade",
                json!({"type": "string", "enum": ["websocket"]}),
                "To the WebSocket protocol.",
            ),
            header(
                "Sec-WebSocket-Version",
                json!({"type": "string", "enum": ["13"]}),
                "RFC 6455.",
            ),
            header(
                "Sec-WebSocket-Key",
                json!({"type": "string", "pattern": "^[A-Za-z0-9+/]{22}==$"}),
                "16 random bytes, base64 (RFC 6455).",
            ),
        ]);
        params.push(json!({"name": "Sec-WebSocket-Protocol", "in": "header", "required": false,
            "schema": {"type": "string", "maxLength": 8192},
            "description": "`essayflow.v1` (selected when offered), and `bearer.<token>` for browsers, which cannot set `Authorization`."}));
    }
    let status = doc
        .pointer_mut("/paths/~1v1~1batches/get/parameters")
        .and_then(Value::as_array_mut)
        .and_then(|ps| ps.iter_mut().find(|p| p["name"] == "status"));
    if let Some(status) = status {
        status["schema"] = json!({"type": "string", "enum": runtime.batch_statuses});
    }
}

/// What kind of operation this is, from its own declaration.
struct Kind {
    protected: bool,
    limited: bool,
    json_body: bool,
    query: bool,
    path_params: bool,
}

impl Kind {
    fn of(path: &str, operation: &Map<String, Value>) -> Self {
        let params = operation
            .get("parameters")
            .and_then(Value::as_array)
            .map(Vec::as_slice)
            .unwrap_or_default();
        let has_in = |place: &str| params.iter().any(|p| p["in"] == place);
        Self {
            protected: operation
                .get("security")
                .and_then(Value::as_array)
                .is_some_and(|reqs| {
                    reqs.iter()
                        .any(|r| r.as_object().is_some_and(|r| !r.is_empty()))
                }),
            limited: !UNLIMITED_PATHS.contains(&path),
            json_body: operation.contains_key("requestBody"),
            query: has_in("query"),
            path_params: has_in("path"),
        }
    }

    /// Whether the edge or the extractors may answer `status` to this operation.
    fn answers(&self, status: u16) -> bool {
        match status {
            400 => self.json_body || self.query,
            401 | 403 => self.protected,
            404 => self.path_params,
            413 | 503 => true,
            415 | 422 => self.json_body,
            429 => self.limited,
            _ => false,
        }
    }

    /// Why this operation may answer `status`, for the added response's description.
    fn why(&self, status: u16) -> &'static str {
        match status {
            400 if self.json_body && self.query => {
                "The body is not JSON (`malformed-json`), or a query parameter is invalid or unknown (`invalid-query`, naming it in `errors`)."
            }
            400 if self.json_body => "The body is not JSON (`malformed-json`).",
            400 => {
                "A query parameter is invalid or unknown (`invalid-query`, naming it in `errors`)."
            }
            401 => {
                "No valid credential (`unauthorized`): missing, forged, expired or revoked token or API key, or a disabled user."
            }
            403 => "The credential's role may not use this operation (`forbidden`).",
            404 => "No such resource, or another user's (`not-found`).",
            413 => {
                "The body is over the 4 MiB limit (`body-too-large`), refused before it is read."
            }
            415 => {
                "The body is not declared as JSON (`unsupported-media-type`): send `Content-Type: application/json` (or the operation's `+json` type)."
            }
            422 => {
                "The body has the wrong shape or a value out of range (`validation`); `errors` lists every field refused."
            }
            429 => {
                "Over a rate-limit budget (`rate-limited`, docs/rate-limits.md); retry after `Retry-After` seconds."
            }
            503 => {
                "The node cannot answer now: `overloaded` (in-flight cap), `timeout` (request timeout), `database-unavailable`, `too-many-connections`; retry after `Retry-After` seconds."
            }
            _ => "",
        }
    }
}

fn operation_conventions(path: &str, operation: &mut Map<String, Value>) {
    optional_body(operation);
    let kind = Kind::of(path, operation);
    let responses = object_at(operation, "responses");
    for status in COMMON_STATUSES.iter().copied().filter(|s| kind.answers(*s)) {
        let key = status.to_string();
        if !responses.contains_key(&key) {
            responses.insert(
                key,
                json!({"description": format!("{} {}", reason_phrase(status), kind.why(status))}),
            );
        }
    }
    for (key, response) in responses.iter_mut() {
        let Ok(status) = key.parse::<u16>() else {
            continue;
        };
        let Some(response) = response.as_object_mut() else {
            continue;
        };
        if status >= 400 {
            problem_content(status, response);
        }
        response_headers(status, &kind, response);
    }
}

/// An optional body (`Option<T>` in utoipa: `oneOf: [null, T]`) is a body that may be left
/// out, not one that may be `null`: every body is a JSON object (a `null` one is refused, 422).
fn optional_body(operation: &mut Map<String, Value>) {
    let Some(Value::Object(body)) = operation.get_mut("requestBody") else {
        return;
    };
    let optional = body.get("required") != Some(&Value::Bool(true));
    let Some(Value::Object(content)) = body.get_mut("content") else {
        return;
    };
    for media in content.values_mut() {
        let Some(schema) = media.get_mut("schema") else {
            continue;
        };
        let alternatives = schema
            .get("oneOf")
            .and_then(Value::as_array)
            .map(|a| a.as_slice())
            .unwrap_or_default();
        if optional
            && alternatives.len() == 2
            && alternatives.iter().any(|a| a == &json!({"type": "null"}))
            && let Some(object) = alternatives.iter().find(|a| a.get("$ref").is_some())
        {
            *schema = object.clone();
        }
    }
}

/// Makes an error answer's content `application/problem+json` with its status's schema:
/// a declared `application/json` body of `Problem` is that (the service sends every problem
/// with this type); any other declared content (`/readyz`'s own 503 document) stays beside it.
fn problem_content(status: u16, response: &mut Map<String, Value>) {
    let content = object_at(response, "content");
    let is_problem = |c: &Value| {
        c.pointer("/schema/$ref")
            .and_then(Value::as_str)
            .is_some_and(|r| r == "#/components/schemas/Problem")
    };
    if content.get("application/json").is_some_and(is_problem) {
        content.remove("application/json");
    }
    content.insert(
        "application/problem+json".into(),
        json!({"schema": {"$ref": format!("#/components/schemas/{}", problem_schema_name(status))}}),
    );
}

fn response_headers(status: u16, kind: &Kind, response: &mut Map<String, Value>) {
    // The connection cap's 503 is answered before any layer: it has neither id.
    let ids_required = status != 503;
    let headers = object_at(response, "headers");
    headers.insert(
        "X-Request-ID".into(),
        json!({"required": ids_required,
            "description": "The request's id: the client's `X-Request-ID` (1 to 128 visible ASCII characters) or a new UUID; every log line of the request carries it.",
            "schema": {"type": "string", "minLength": 1, "maxLength": 128}}),
    );
    headers.insert(
        "X-Correlation-Id".into(),
        json!({"required": ids_required,
            "description": "The correlation id: the client's `X-Correlation-Id` if it is a UUID, else a new one; stamped on the events a command appends.",
            "schema": {"type": "string", "format": "uuid"}}),
    );
    if kind.limited && status != 503 {
        headers.insert(
            "RateLimit-Policy".into(),
            json!({"description": "The budget this request was counted against (draft-ietf-httpapi-ratelimit-headers): `\"<class>\";q=<quota>;w=<window seconds>`. Absent for an unlimited budget or with rate limits off.",
                "schema": {"type": "string"}, "example": "\"command\";q=1200;w=60"}),
        );
        headers.insert(
            "RateLimit".into(),
            json!({"description": "What is left of that budget: `\"<class>\";r=<remaining>;t=<seconds until whole>`.",
                "schema": {"type": "string"}, "example": "\"command\";r=1187;t=3"}),
        );
    }
    if status == 429 || status == 503 {
        // `/readyz`'s own 503 (`{"status":"unavailable"}`) has no `Retry-After`.
        let own_body = response
            .get("content")
            .and_then(Value::as_object)
            .is_some_and(|c| c.contains_key("application/json"));
        let headers = object_at(response, "headers");
        headers.insert(
            "Retry-After".into(),
            json!({"required": !own_body, "description": "Seconds to wait before retrying (at least 1).",
                "schema": {"type": "integer", "minimum": 1}}),
        );
    }
    if status == 401 {
        headers_of(response).insert(
            "WWW-Authenticate".into(),
            json!({"required": true, "schema": {"type": "string", "const": "Bearer"}}),
        );
    }
}

fn headers_of(response: &mut Map<String, Value>) -> &mut Map<String, Value> {
    object_at(response, "headers")
}

/// `map[key]` as an object, made (empty) if missing or not an object.
fn object_at<'a>(map: &'a mut Map<String, Value>, key: &str) -> &'a mut Map<String, Value> {
    let entry = map
        .entry(key.to_owned())
        .or_insert_with(|| Value::Object(Map::new()));
    if !entry.is_object() {
        *entry = Value::Object(Map::new());
    }
    match entry {
        Value::Object(map) => map,
        _ => unreachable!("made an object above"),
    }
}

fn reason_phrase(status: u16) -> &'static str {
    axum::http::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("Error")
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use axum::http::StatusCode;
    use axum::response::IntoResponse;
    use domain::BatchError;
    use domain::values::{EssayId, Phase, RequestId};
    use utoipa::OpenApi;

    use super::*;
    use crate::error::ApiError;

    #[test]
    fn every_field_rule_finds_its_property() {
        let doc = serde_json::to_value(crate::routes::docs::ApiDoc::openapi()).unwrap();
        for (schema, property, _) in field_rules() {
            assert!(
                doc.pointer(&format!(
                    "/components/schemas/{schema}/properties/{property}"
                ))
                .is_some(),
                "{schema}.{property} is not in the document"
            );
        }
    }

    /// Every problem the service makes has a `type` the document lists under its status.
    #[tokio::test]
    async fn every_problem_the_service_answers_is_listed() {
        let essay = EssayId::parse("e").unwrap();
        let phase = Phase::parse("p").unwrap();
        let mut errors: Vec<ApiError> = vec![
            ApiError::MalformedJson(String::new()),
            ApiError::bad_query("q", "r"),
            ApiError::Unauthorized("u"),
            ApiError::Forbidden("admin"),
            ApiError::NotFound,
            ApiError::NoRoute,
            ApiError::MethodNotAllowed,
            ApiError::Conflict(String::new()),
            ApiError::JobRunning(String::new()),
            ApiError::Exists(String::new()),
            ApiError::StateConflict(String::new()),
            ApiError::Throttled(1),
            ApiError::Busy(String::new(), 1),
            ApiError::TooLarge(1),
            ApiError::UnsupportedMediaType,
            ApiError::invalid("f", "r"),
            ApiError::NotYetConsistent(1),
            ApiError::Overloaded,
            ApiError::TooManyConnections,
            ApiError::TooManyWebSockets(true),
            ApiError::TooManyWebSockets(false),
            ApiError::DatabaseUnavailable,
            ApiError::RateLimited {
                detail: String::new(),
                retry_after: 1,
            },
            ApiError::UpgradeRequired(String::new()),
            ApiError::Refused(StatusCode::BAD_REQUEST, "r".into()),
        ];
        for status in [400, 404, 405, 413, 429, 503] {
            errors.push(ApiError::Status(StatusCode::from_u16(status).unwrap()));
        }
        for rejection in [
            BatchError::AlreadyRegistered,
            BatchError::Cancelled,
            BatchError::NoEssays,
            BatchError::TooManyEssays {
                expected: 1,
                added: 1,
                adding: 1,
            },
            BatchError::DuplicateEssay(essay.clone()),
            BatchError::EssaysIncomplete {
                added: 0,
                expected: 1,
            },
            BatchError::PipelineInProgress(RequestId::new()),
            BatchError::UnknownPipeline(phase.clone()),
            BatchError::UnknownEssay(essay.clone()),
            BatchError::ResultNotExpected {
                essay_id: essay,
                phase,
            },
        ] {
            errors.push(ApiError::Rejected(rejection));
        }
        for error in errors {
            let response = error.into_response();
            let status = response.status().as_u16();
            let body = axum::body::to_bytes(response.into_body(), 1 << 16)
                .await
                .unwrap();
            let problem: Value = serde_json::from_slice(&body).unwrap();
            let kind = problem["type"].as_str().unwrap();
            let code = kind.strip_prefix(PROBLEM_TYPE_PREFIX).unwrap();
            assert!(
                problem_types(status).any(|p| p.code == code),
                "{kind} ({status}) is not in PROBLEM_TYPES"
            );
        }
    }

    #[test]
    fn the_contract_page_lists_every_problem_type() {
        let page = include_str!("../../../docs/api-contract.md");
        for problem in PROBLEM_TYPES {
            assert!(
                page.contains(&format!("`{}`", problem.code)),
                "docs/api-contract.md does not list `{}`",
                problem.code
            );
        }
    }

    #[test]
    fn the_text_patterns_match_the_domain_rules() {
        // Rust's white space is what `NOT_BLANK` excludes: every such character alone is
        // blank, and a few that other definitions count as white space are not.
        let whitespace: Vec<char> = (0..=0x3000u32)
            .filter_map(char::from_u32)
            .filter(|c| c.is_whitespace())
            .collect();
        let class = NOT_BLANK;
        for c in &whitespace {
            let escaped = format!("\\u{:04x}", *c as u32);
            let literal = match c {
                '\t' => "\\t".to_owned(),
                '\n' => "\\n".to_owned(),
                '\u{b}' => "\\u000b".to_owned(),
                '\u{c}' => "\\f".to_owned(),
                '\r' => "\\r".to_owned(),
                ' ' => " ".to_owned(),
                _ => escaped.clone(),
            };
            let in_range = ('\u{2000}'..='\u{200a}').contains(c);
            assert!(
                in_range || class.contains(&literal),
                "NOT_BLANK does not exclude {escaped}"
            );
        }
        for c in ['\u{1c}', '\u{feff}', '\u{200b}'] {
            assert!(!c.is_whitespace());
            assert!(!class.contains(&format!("\\u{:04x}", c as u32)));
        }
    }
}
