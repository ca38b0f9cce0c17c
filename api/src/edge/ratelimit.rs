//! HTTP rate limiting per user, per API key and per client address, with tiers from the
//! configuration (`[rate_limit]`, [`RateLimitSettings`]); the operator's guide is
//! `docs/rate-limits.md`.
//!
//! - **Classes.** Every request but `OPTIONS` (CORS preflights), `/healthz`, `/readyz` and
//!   `/metrics` spends one unit of one budget: `login` (`POST /v1/auth/login` and
//!   `/v1/auth/refresh`), `read` (`GET`, `HEAD`) or `command` (anything else).
//! - **Keys.** A request with a valid credential is counted against its user (`user:<id>`, for
//!   an access token, whether sent as `Authorization: Bearer` or, on `/v1/ws`, as the
//!   `bearer.<token>` subprotocol or `?access_token=`) or its API key (`key:<id>`, for
//!   `X-API-Key`), with the budgets of the user's tier. Anything else (no credential, or one
//!   that fails to authenticate: the handler then answers 401 as usual) is counted against the
//!   client's address with the `anonymous` budgets, an IPv6 address by its /64. Logins and
//!   refreshes are always counted per address. The middleware authenticates once and leaves
//!   the [`AuthUser`] in the request's extensions, where the extractor finds it.
//! - **Addresses.** The peer address of the connection; only when the peer is one of
//!   `trusted_proxies` is the address taken from the one header the proxy writes
//!   (`forwarded_header`: `X-Forwarded-For` by default, or `Forwarded: for=` of RFC 7239),
//!   walking from the right past trusted hops.
//! - **Algorithm.** [`governor`]'s GCRA, one keyed limiter per tier and class: a budget of N per
//!   window allows a burst of N and gives one unit back every window/N.
//! - **Answers.** Every answer to a limited request carries the `RateLimit-Policy` and
//!   `RateLimit` fields of draft-ietf-httpapi-ratelimit-headers (structured fields:
//!   `RateLimit-Policy: "read";q=600;w=60`, `RateLimit: "read";r=599;t=1`, where `r` is the
//!   units left and `t` the seconds until the whole quota is available again); over budget,
//!   429 problem+json `rate-limited` with `Retry-After` (whole seconds, at least 1) before
//!   the request reaches any handler. An unlimited budget adds no fields.
//! - **Per node.** The state is in this process's memory: with N nodes behind a load balancer
//!   a client may get up to N times its budget. Keys whose state is back to full are pruned
//!   every [`PRUNE_EVERY`] ([`Limits::spawn_pruner`]), so memory follows the clients active
//!   within the longest window.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::num::NonZeroU32;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use axum::extract::{ConnectInfo, Query, Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, Uri, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use governor::clock::Clock;
use governor::middleware::StateInformationMiddleware;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use ipnet::IpNet;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::{AuthUser, Credential};
use crate::error::ApiError;
use crate::state::AppState;

/// `RateLimit-Policy` (draft-ietf-httpapi-ratelimit-headers): the quota policy of the budget
/// the request was counted against.
pub const RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");

/// `RateLimit` (draft-ietf-httpapi-ratelimit-headers): what is left of that budget.
pub const RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");

/// How often keys whose state is back to a full budget are dropped from memory.
pub const PRUNE_EVERY: Duration = Duration::from_secs(30);

/// The longest the middleware waits to authenticate a credential (a cache miss reads the
/// store); past it, when the store fails, or while the database breaker is open, the request
/// is counted against its address's anonymous budget, and the inner layers answer (the
/// breaker, the handler's own authentication).
const AUTHENTICATE_WITHIN: Duration = Duration::from_secs(1);

// ---- settings -------------------------------------------------------------------------------

/// The `[rate_limit]` settings. In the TOML file:
///
/// ```toml
/// [rate_limit]
/// enabled = true                      # ESSAYFLOW_RATE_LIMIT_ENABLED
/// trusted_proxies = ["10.0.0.0/8"]    # ESSAYFLOW_RATE_LIMIT_TRUSTED_PROXIES (comma list)
/// default_tier = "standard"           # ESSAYFLOW_RATE_LIMIT_DEFAULT_TIER
///
/// [rate_limit.anonymous]              # per client address
/// login = "120/minute"
/// read = "600/minute"
/// command = "60/minute"
///
/// [rate_limit.tiers.free]             # per user or API key; a `tiers` table replaces the
/// read = "1000/hour"                  # built-in one (standard, free, pro, enterprise)
/// command = "100/hour"
/// ```
///
/// Errors ([`RateLimitSettings::check`], a [`Budget`] that does not parse) name the setting
/// and stop the start-up.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RateLimitSettings {
    /// Limit at all (`false`: no budgets, no `RateLimit` fields).
    pub enabled: bool,
    /// Peers (IP addresses or CIDR networks) whose `Forwarded` / `X-Forwarded-For` is believed;
    /// empty: none, the client is the connection's peer.
    pub trusted_proxies: Vec<String>,
    /// The one header a trusted proxy writes the client's address in: `x-forwarded-for`
    /// (the default; what nginx, HAProxy and most load balancers append to) or `forwarded`
    /// (RFC 7239). The other is ignored: a proxy passes a client's own copy of the header it
    /// does not write through unchanged, and believing it would let a client name itself.
    pub forwarded_header: ForwardedHeader,
    /// The tier of users without one, and of users whose tier is no longer configured.
    pub default_tier: String,
    /// Budgets of requests without a valid credential, per client address (and of every login
    /// and refresh).
    pub anonymous: AnonymousBudgets,
    /// Tiers by name (1 to 64 of `a-z 0-9 _ -`): budgets per user or API key. One setting: a
    /// `tiers` table replaces the built-in one.
    #[serde(serialize_with = "crate::settings::mark::table")]
    pub tiers: BTreeMap<String, TierBudgets>,
}

/// Budgets per client address.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AnonymousBudgets {
    /// `POST /v1/auth/login` and `POST /v1/auth/refresh`, whoever sends them.
    pub login: Budget,
    /// `GET` and `HEAD`.
    pub read: Budget,
    /// Every other method.
    pub command: Budget,
}

/// The budgets of a tier, per user or API key.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TierBudgets {
    /// `GET` and `HEAD`.
    pub read: Budget,
    /// Every other method (logins and refreshes aside: those are per address).
    pub command: Budget,
}

impl TierBudgets {
    /// A tier of two budgets written as in the configuration (`"100/hour"`).
    pub fn of(read: &str, command: &str) -> anyhow::Result<Self> {
        Ok(Self {
            read: read.parse()?,
            command: command.parse()?,
        })
    }
}

/// A budget: `"N/second"`, `"N/minute"`, `"N/hour"` (N from 1 to 4 294 967 295: N requests
/// per window, all of them at once if need be, one given back every window/N), or
/// `"unlimited"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub enum Budget {
    Unlimited,
    Limited { requests: NonZeroU32, per: Window },
}

/// The window of a [`Budget`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Window {
    Second,
    Minute,
    Hour,
}

impl Window {
    /// Its length in seconds (the `w` of `RateLimit-Policy`).
    pub fn secs(self) -> u64 {
        match self {
            Self::Second => 1,
            Self::Minute => 60,
            Self::Hour => 3600,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Second => "second",
            Self::Minute => "minute",
            Self::Hour => "hour",
        }
    }
}

impl FromStr for Budget {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> anyhow::Result<Self> {
        let text = s.trim().to_ascii_lowercase();
        if text == "unlimited" {
            return Ok(Self::Unlimited);
        }
        let wrong = || {
            anyhow::anyhow!(
                "{s:?} is not a budget: write \"N/second\", \"N/minute\", \"N/hour\" \
                 (N from 1 to {}) or \"unlimited\"",
                u32::MAX
            )
        };
        let (count, unit) = text.split_once('/').ok_or_else(wrong)?;
        let requests = count.trim().parse::<NonZeroU32>().map_err(|_| wrong())?;
        let per = match unit.trim() {
            "second" => Window::Second,
            "minute" => Window::Minute,
            "hour" => Window::Hour,
            _ => return Err(wrong()),
        };
        Ok(Self::Limited { requests, per })
    }
}

impl Serialize for Budget {
    /// As written in the configuration (`"100/hour"`, `"unlimited"`).
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl TryFrom<String> for Budget {
    type Error = anyhow::Error;

    fn try_from(s: String) -> anyhow::Result<Self> {
        s.parse()
    }
}

impl fmt::Display for Budget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unlimited => f.write_str("unlimited"),
            Self::Limited { requests, per } => write!(f, "{requests}/{}", per.name()),
        }
    }
}

fn budget(s: &str) -> Budget {
    s.parse().expect("a built-in budget")
}

impl Default for AnonymousBudgets {
    fn default() -> Self {
        Self {
            login: budget("120/minute"),
            read: budget("600/minute"),
            command: budget("60/minute"),
        }
    }
}

impl Default for RateLimitSettings {
    fn default() -> Self {
        let tier = |read: &str, command: &str| TierBudgets {
            read: budget(read),
            command: budget(command),
        };
        Self {
            enabled: true,
            trusted_proxies: Vec::new(),
            forwarded_header: ForwardedHeader::XForwardedFor,
            default_tier: "standard".to_owned(),
            anonymous: AnonymousBudgets::default(),
            tiers: BTreeMap::from([
                ("standard".to_owned(), tier("6000/minute", "1200/minute")),
                ("free".to_owned(), tier("1000/hour", "100/hour")),
                ("pro".to_owned(), tier("10000/hour", "1000/hour")),
                ("enterprise".to_owned(), tier("unlimited", "unlimited")),
            ]),
        }
    }
}

/// The header a trusted proxy names the client in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
pub enum ForwardedHeader {
    /// `X-Forwarded-For: client, proxy1, ...`.
    #[serde(rename = "x-forwarded-for")]
    XForwardedFor,
    /// `Forwarded: for=client, for=proxy1` (RFC 7239).
    #[serde(rename = "forwarded")]
    Forwarded,
}

/// Whether `name` can name a tier: 1 to 64 of `a-z`, `0-9`, `_`, `-`.
pub fn valid_tier_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'-'))
}

impl RateLimitSettings {
    /// Refuses what cannot work, naming the setting: a trusted proxy that is not an IP address
    /// or CIDR network, a tier name of the wrong shape, a default tier that is not configured.
    pub fn check(&self) -> anyhow::Result<()> {
        self.proxies()?;
        if let Some(name) = self.tiers.keys().find(|name| !valid_tier_name(name)) {
            bail!("rate_limit.tiers: {name:?} is not a tier name (1 to 64 of a-z, 0-9, _ and -)");
        }
        if !self.tiers.contains_key(&self.default_tier) {
            bail!(
                "rate_limit.default_tier (ESSAYFLOW_RATE_LIMIT_DEFAULT_TIER): {:?} is not a \
                 configured tier (configured: {})",
                self.default_tier,
                self.tiers.keys().cloned().collect::<Vec<_>>().join(", ")
            );
        }
        Ok(())
    }

    /// The trusted proxies, parsed.
    pub fn proxies(&self) -> anyhow::Result<Vec<IpNet>> {
        self.trusted_proxies
            .iter()
            .map(|p| {
                let p = p.trim();
                p.parse::<IpNet>()
                    .or_else(|_| p.parse::<IpAddr>().map(IpNet::from))
                    .map(|net| net.trunc())
                    .with_context(|| {
                        format!(
                            "rate_limit.trusted_proxies (ESSAYFLOW_RATE_LIMIT_TRUSTED_PROXIES): \
                             {p:?} is \
                             not an IP address or CIDR network"
                        )
                    })
            })
            .collect()
    }
}

// ---- limiters -------------------------------------------------------------------------------

/// The class of a request: which budget it spends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    Login,
    Read,
    Command,
}

impl Class {
    const ALL: [Self; 3] = [Self::Login, Self::Read, Self::Command];

    /// The class of a request, or `None` for one that is never limited (`OPTIONS`, `/healthz`,
    /// `/readyz`, `/metrics`).
    pub fn of(method: &Method, path: &str) -> Option<Self> {
        if method == Method::OPTIONS || matches!(path, "/healthz" | "/readyz" | "/metrics") {
            None
        } else if method == Method::GET || method == Method::HEAD {
            Some(Self::Read)
        } else if method == Method::POST && matches!(path, "/v1/auth/login" | "/v1/auth/refresh") {
            Some(Self::Login)
        } else {
            Some(Self::Command)
        }
    }

    /// The policy name of its headers, and the `class` label of its metric.
    pub fn name(self) -> &'static str {
        match self {
            Self::Login => "login",
            Self::Read => "read",
            Self::Command => "command",
        }
    }
}

/// What a budget is counted against.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Key {
    User(uuid::Uuid),
    /// An API key, by its id.
    ApiKeyId(String),
    /// An IPv4 address, or an IPv6 /64 network's first address.
    Address(IpAddr),
}

/// The `key` label values of `essayflow_rate_limited_total`.
const KEY_KINDS: [&str; 3] = ["user", "api_key", "address"];

/// The labels of `essayflow_rate_limited_total`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RefusedLabels {
    /// The budget: `login`, `read` or `command`.
    class: &'static str,
    /// What it was counted against: one of [`KEY_KINDS`].
    key: &'static str,
}

impl Key {
    /// The `key` label: `user`, `api_key` or `address`.
    fn kind(&self) -> &'static str {
        match self {
            Self::User(_) => KEY_KINDS[0],
            Self::ApiKeyId(_) => KEY_KINDS[1],
            Self::Address(_) => KEY_KINDS[2],
        }
    }

    fn subject(&self) -> &'static str {
        match self {
            Self::User(_) => "user",
            Self::ApiKeyId(_) => "API key",
            Self::Address(_) => "address",
        }
    }
}

/// One budget of one tier (or of the anonymous): a keyed GCRA limiter.
struct Limiter {
    class: Class,
    budget: Budget,
    requests: u32,
    quota: Quota,
    policy: HeaderValue,
    keyed: DefaultKeyedRateLimiter<Key, StateInformationMiddleware>,
}

/// The outcome of one request's check.
enum Verdict {
    Allowed { remaining: u32, reset: u64 },
    Refused { retry_after: u64, reset: u64 },
}

impl Limiter {
    /// `None` for an unlimited budget.
    fn new(class: Class, budget: Budget) -> Option<Self> {
        let Budget::Limited { requests, per } = budget else {
            return None;
        };
        let quota = match per {
            Window::Second => Quota::per_second(requests),
            Window::Minute => Quota::per_minute(requests),
            Window::Hour => Quota::per_hour(requests),
        };
        let policy = format!("\"{}\";q={requests};w={}", class.name(), per.secs());
        Some(Self {
            class,
            budget,
            requests: requests.get(),
            quota,
            policy: HeaderValue::from_str(&policy).expect("ASCII"),
            keyed: RateLimiter::keyed(quota).with_middleware::<StateInformationMiddleware>(),
        })
    }

    fn check(&self, key: &Key) -> Verdict {
        let interval = self.quota.replenish_interval();
        match self.keyed.check_key(key) {
            Ok(state) => {
                let remaining = state.remaining_burst_capacity().min(self.requests);
                // The whole quota is back once the units spent have been given back (at most
                // one interval less, for the part of an interval already passed).
                Verdict::Allowed {
                    remaining,
                    reset: ceil_secs(interval * (self.requests - remaining)),
                }
            }
            Err(not_until) => {
                let wait = not_until.wait_time_from(self.keyed.clock().now());
                let retry_after = ceil_secs(wait).max(1);
                Verdict::Refused {
                    retry_after,
                    reset: ceil_secs(wait + interval * (self.requests - 1)).max(retry_after),
                }
            }
        }
    }

    /// Sets `RateLimit-Policy` and `RateLimit` on an answer.
    fn headers(&self, headers: &mut HeaderMap, remaining: u32, reset: u64) {
        headers.insert(RATELIMIT_POLICY, self.policy.clone());
        let state = format!("\"{}\";r={remaining};t={reset}", self.class.name());
        if let Ok(value) = HeaderValue::from_str(&state) {
            headers.insert(RATELIMIT, value);
        }
    }
}

/// The `read` and `command` budgets of a tier (or of the anonymous); `None`: unlimited.
struct Budgets {
    read: Option<Limiter>,
    command: Option<Limiter>,
}

impl Budgets {
    fn new(read: Budget, command: Budget) -> Self {
        Self {
            read: Limiter::new(Class::Read, read),
            command: Limiter::new(Class::Command, command),
        }
    }

    fn of(&self, class: Class) -> Option<&Limiter> {
        match class {
            Class::Read => self.read.as_ref(),
            Class::Command | Class::Login => self.command.as_ref(),
        }
    }
}

/// This node's rate limiters, built from [`RateLimitSettings`] (see the module documentation).
pub struct Limits {
    enabled: bool,
    proxies: Vec<IpNet>,
    forwarded_header: ForwardedHeader,
    login: Option<Limiter>,
    anonymous: Budgets,
    tiers: HashMap<String, Arc<Budgets>>,
    default_tier: Arc<Budgets>,
    /// Requests refused (429), by budget and key kind: `essayflow_rate_limited_total`.
    refused: Family<RefusedLabels, Counter>,
}

impl fmt::Debug for Limits {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Limits")
            .field("enabled", &self.enabled)
            .field("proxies", &self.proxies)
            .field("tiers", &self.tiers.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl Limits {
    /// The limiters of `settings`, checked first ([`RateLimitSettings::check`]).
    pub fn new(settings: &RateLimitSettings) -> anyhow::Result<Self> {
        settings.check()?;
        let tiers: HashMap<String, Arc<Budgets>> = settings
            .tiers
            .iter()
            .map(|(name, tier)| {
                (
                    name.clone(),
                    Arc::new(Budgets::new(tier.read, tier.command)),
                )
            })
            .collect();
        let default_tier = tiers
            .get(&settings.default_tier)
            .cloned()
            .context("rate_limit.default_tier is not configured")?;
        let anonymous = &settings.anonymous;
        Ok(Self {
            enabled: settings.enabled,
            proxies: settings.proxies()?,
            forwarded_header: settings.forwarded_header,
            login: Limiter::new(Class::Login, anonymous.login),
            anonymous: Budgets::new(anonymous.read, anonymous.command),
            tiers,
            default_tier,
            refused: Family::default(),
        })
    }

    /// Whether rate limiting is on.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Whether `name` is a configured tier.
    pub fn has_tier(&self, name: &str) -> bool {
        self.tiers.contains_key(name)
    }

    /// The configured tiers' names, sorted.
    pub fn tier_names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.tiers.keys().map(String::as_str).collect();
        names.sort_unstable();
        names
    }

    /// Requests of `class` refused (429) by this node since it started, over every key kind.
    pub fn refused(&self, class: Class) -> u64 {
        KEY_KINDS
            .iter()
            .map(|&key| {
                self.refused
                    .get(&RefusedLabels {
                        class: class.name(),
                        key,
                    })
                    .map_or(0, |c| c.get())
            })
            .sum()
    }

    /// The budgets of a user's stored tier: the default tier's when it has none or one that
    /// is no longer configured.
    fn tier(&self, name: Option<&str>) -> &Budgets {
        name.and_then(|name| self.tiers.get(name))
            .unwrap_or(&self.default_tier)
    }

    fn limiters(&self) -> impl Iterator<Item = &Limiter> {
        let anonymous = [
            self.anonymous.read.as_ref(),
            self.anonymous.command.as_ref(),
        ];
        let tiers = self
            .tiers
            .values()
            .flat_map(|t| [t.read.as_ref(), t.command.as_ref()]);
        std::iter::once(self.login.as_ref())
            .chain(anonymous)
            .chain(tiers)
            .flatten()
    }

    /// Keys (users, API keys, addresses) with state in memory, over every budget.
    pub fn tracked_keys(&self) -> usize {
        self.limiters().map(|l| l.keyed.len()).sum()
    }

    /// Drops the keys whose budget is whole again (their state equals a fresh one) and gives
    /// the memory back.
    pub fn prune(&self) {
        for limiter in self.limiters() {
            limiter.keyed.retain_recent();
            limiter.keyed.shrink_to_fit();
        }
    }

    /// Prunes every [`PRUNE_EVERY`] until `cancel` (nothing when rate limiting is off).
    pub fn spawn_pruner(self: &Arc<Self>, cancel: CancellationToken, tracker: &TaskTracker) {
        if !self.enabled {
            return;
        }
        let limits = self.clone();
        tracker.spawn(async move {
            let mut every = tokio::time::interval(PRUNE_EVERY);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            every.tick().await;
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = every.tick() => limits.prune(),
                }
            }
        });
    }

    /// Registers `essayflow_rate_limited_total{class,key}` (requests refused with 429, by
    /// budget: `login`, `read`, `command`, and key kind: `user`, `api_key`, `address`; every
    /// pair present from the start) in `registry`. `essayflow_rate_limit_keys` is read at
    /// scrape time ([`crate::metrics::PartsCollector`]).
    pub fn register_metrics(&self, registry: &mut prometheus_client::registry::Registry) {
        for class in Class::ALL {
            for key in KEY_KINDS {
                let _ = self.refused.get_or_create(&RefusedLabels {
                    class: class.name(),
                    key,
                });
            }
        }
        registry.register(
            "rate_limited",
            "Requests refused by the HTTP rate limit (429), by budget class and key kind",
            self.refused.clone(),
        );
    }

    /// The network a request comes from (see [`client_address`] and [`network`]).
    fn client(&self, request: &Request) -> IpAddr {
        let peer = request
            .extensions()
            .get::<ConnectInfo<SocketAddr>>()
            .map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |ConnectInfo(a)| a.ip());
        network(client_address(
            peer,
            request.headers(),
            &self.proxies,
            self.forwarded_header,
        ))
    }
}

// ---- the middleware -------------------------------------------------------------------------

/// Who sent a request, as far as the limits are concerned.
enum Caller {
    /// A valid credential; `in_headers`: presented as the extractor reads it (`X-API-Key` or
    /// `Authorization`), so the extractor may reuse it.
    User { user: AuthUser, in_headers: bool },
    /// No credential, or one refused.
    Anonymous,
    /// The store could not say in time: counted like [`Caller::Anonymous`].
    Unknown,
}

#[derive(Deserialize)]
struct TokenQuery {
    access_token: Option<String>,
}

/// A WebSocket handshake's token offered as the `bearer.<token>` subprotocol or as
/// `?access_token=` (the forms `/v1/ws` accepts besides the headers).
fn websocket_token(headers: &HeaderMap, uri: &Uri) -> Option<String> {
    let offered = headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .find_map(crate::auth::subprotocol_token)
        .map(str::to_owned);
    offered.or_else(|| {
        Query::<TokenQuery>::try_from_uri(uri)
            .ok()
            .and_then(|Query(q)| q.access_token)
    })
}

/// Who sent the request of `headers` and `uri`: its credential is authenticated as the
/// extractor would (through the identity cache). While the database breaker is open a
/// credential is not checked (that could wait on the pool): the request is not limited here
/// and the breaker answers it at once. (Headers and URI rather than the request: its body is
/// not `Sync`, and this future must be `Send`.)
async fn caller(state: &AppState, headers: &HeaderMap, uri: &Uri) -> Caller {
    let identity = &state.identity;
    let presented = crate::auth::has_credential(headers);
    let websocket = || {
        if uri.path() == "/v1/ws" {
            websocket_token(headers, uri)
        } else {
            None
        }
    };
    if state.breaker.is_open() && (presented || websocket().is_some()) {
        return Caller::Unknown;
    }
    let found = if presented {
        tokio::time::timeout(AUTHENTICATE_WITHIN, identity.authenticate(headers))
            .await
            .map(|r| r.map(|user| (user, true)))
    } else if let Some(token) = websocket() {
        tokio::time::timeout(AUTHENTICATE_WITHIN, identity.authenticate_token(&token))
            .await
            .map(|r| r.map(|(user, _)| (user, false)))
    } else {
        return Caller::Anonymous;
    };
    match found {
        Ok(Ok((user, in_headers))) => Caller::User { user, in_headers },
        Ok(Err(ApiError::Unauthorized(_))) => Caller::Anonymous,
        Ok(Err(error)) => {
            tracing::debug!(%error, "rate limit: could not authenticate; not limited here");
            Caller::Unknown
        }
        Err(_) => Caller::Unknown,
    }
}

/// The rate-limit middleware (see the module documentation): counts the request against its
/// budget, answers 429 over it, and adds the `RateLimit-Policy` and `RateLimit` fields to
/// every answer of a limited request.
pub async fn rate_limit(
    State(state): State<AppState>,
    mut request: Request,
    next: Next,
) -> Response {
    let limits = state.limits.clone();
    if !limits.enabled {
        return next.run(request).await;
    }
    let Some(class) = Class::of(request.method(), request.uri().path()) else {
        return next.run(request).await;
    };
    let (limiter, key) = if class == Class::Login {
        (limits.login.as_ref(), Key::Address(limits.client(&request)))
    } else {
        match caller(&state, request.headers(), request.uri()).await {
            Caller::User { user, in_headers } => {
                let key = match &user.credential {
                    Credential::Session(_) => Key::User(user.id.as_uuid()),
                    Credential::Key(id) => Key::ApiKeyId(id.clone()),
                };
                let limiter = limits.tier(user.tier.as_deref()).of(class);
                if in_headers {
                    request.extensions_mut().insert(user);
                }
                (limiter, key)
            }
            // A credential that could not be checked (the database slow or down, an
            // unknown key whose lookup failed) counts against its address like none at all:
            // the limiter must not stop working when the node is under attack.
            Caller::Anonymous | Caller::Unknown => (
                limits.anonymous.of(class),
                Key::Address(limits.client(&request)),
            ),
        }
    };
    let Some(limiter) = limiter else {
        return next.run(request).await;
    };
    match limiter.check(&key) {
        Verdict::Allowed { remaining, reset } => {
            let mut response = next.run(request).await;
            limiter.headers(response.headers_mut(), remaining, reset);
            response
        }
        Verdict::Refused { retry_after, reset } => {
            limits
                .refused
                .get_or_create(&RefusedLabels {
                    class: class.name(),
                    key: key.kind(),
                })
                .inc();
            let mut response = ApiError::RateLimited {
                detail: format!(
                    "too many {} requests from this {}: the budget is {} per node; retry in {retry_after} s",
                    class.name(),
                    key.subject(),
                    limiter.budget
                ),
                retry_after,
            }
            .into_response();
            limiter.headers(response.headers_mut(), 0, reset);
            response
        }
    }
}

// ---- client addresses -----------------------------------------------------------------------

/// What a budget of an address is keyed on: an IPv4 address itself (an IPv4-mapped IPv6 one
/// too), an IPv6 address by its /64 (one subscriber's network).
pub fn network(address: IpAddr) -> IpAddr {
    match address.to_canonical() {
        IpAddr::V6(v6) => {
            let bits = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(bits.into())
        }
        v4 => v4,
    }
}

/// The client's address: the connection's `peer`, unless it is a trusted proxy; then the
/// hops of the proxy's `header` (`X-Forwarded-For`, or `Forwarded: for=` of RFC 7239; the
/// other header is ignored) are walked from the right,
/// past trusted ones, to the first that is not trusted. A hop that is not an address
/// (`unknown`, an obfuscated name) stops the walk at the trusted hop before it; when every hop
/// is trusted, the leftmost is the client.
pub fn client_address(
    peer: IpAddr,
    headers: &HeaderMap,
    trusted: &[IpNet],
    header: ForwardedHeader,
) -> IpAddr {
    let is_trusted = |ip: IpAddr| {
        let ip = ip.to_canonical();
        trusted.iter().any(|net| net.contains(&ip))
    };
    if trusted.is_empty() || !is_trusted(peer) {
        return peer;
    }
    let hops = match header {
        ForwardedHeader::Forwarded => forwarded_for(headers),
        ForwardedHeader::XForwardedFor => x_forwarded_for(headers),
    };
    let mut client = peer;
    for hop in hops.into_iter().rev() {
        let Some(hop) = hop else { break };
        client = hop;
        if !is_trusted(hop) {
            break;
        }
    }
    client
}

/// The `for=` of every element of every `Forwarded` field, in order; `None` for a node that is
/// not an address (`unknown`, `_hidden`) or an element without one.
pub fn forwarded_for(headers: &HeaderMap) -> Vec<Option<IpAddr>> {
    headers
        .get_all(header::FORWARDED)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(split_unquoted(','))
        .map(|element| {
            split_unquoted(';')(element).find_map(|pair| {
                let (name, value) = pair.split_once('=')?;
                name.trim()
                    .eq_ignore_ascii_case("for")
                    .then(|| node_address(value.trim().trim_matches('"')))
            })?
        })
        .collect()
}

/// The hops of every `X-Forwarded-For` field, in order; `None` for one that is not an address.
pub fn x_forwarded_for(headers: &HeaderMap) -> Vec<Option<IpAddr>> {
    headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|hop| node_address(hop.trim().trim_matches('"')))
        .collect()
}

/// Splits on `separator` outside double quotes (RFC 7239 values may be quoted strings).
fn split_unquoted(separator: char) -> impl Fn(&str) -> std::vec::IntoIter<&str> {
    move |text: &str| {
        let mut parts = Vec::new();
        let (mut start, mut quoted, mut escaped) = (0, false, false);
        for (i, c) in text.char_indices() {
            match c {
                _ if escaped => escaped = false,
                '\\' if quoted => escaped = true,
                '"' => quoted = !quoted,
                c if c == separator && !quoted => {
                    parts.push(text[start..i].trim());
                    start = i + 1;
                }
                _ => {}
            }
        }
        parts.push(text[start..].trim());
        parts.retain(|p| !p.is_empty());
        parts.into_iter()
    }
}

/// An RFC 7239 node (`192.0.2.43`, `192.0.2.43:47011`, `[2001:db8::1]`, `[2001:db8::1]:4711`)
/// or a bare IPv6 address, as an address.
fn node_address(node: &str) -> Option<IpAddr> {
    if let Ok(ip) = node.parse::<IpAddr>() {
        return Some(ip);
    }
    if let Ok(socket) = node.parse::<SocketAddr>() {
        return Some(socket.ip());
    }
    let inner = node.strip_prefix('[')?;
    let (ip, _) = inner.split_once(']')?;
    ip.parse::<IpAddr>().ok()
}

fn ceil_secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        map
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn budgets_parse_and_print_and_bad_ones_are_refused() {
        assert_eq!(
            "100/hour".parse::<Budget>().unwrap(),
            Budget::Limited {
                requests: NonZeroU32::new(100).unwrap(),
                per: Window::Hour
            }
        );
        assert_eq!(
            " 2 / Second ".parse::<Budget>().unwrap().to_string(),
            "2/second"
        );
        assert_eq!("Unlimited".parse::<Budget>().unwrap(), Budget::Unlimited);
        for bad in [
            "",
            "0/minute",
            "-1/minute",
            "10",
            "10/day",
            "ten/minute",
            "4294967296/hour",
        ] {
            let error = bad.parse::<Budget>().expect_err(bad).to_string();
            assert!(error.contains("N/minute"), "{bad}: {error}");
        }
    }

    #[test]
    fn the_defaults_are_valid_and_bad_settings_name_themselves() {
        let defaults = RateLimitSettings::default();
        defaults.check().unwrap();
        assert!(defaults.enabled && defaults.trusted_proxies.is_empty());
        assert_eq!(defaults.tiers.len(), 4);

        let unknown = RateLimitSettings {
            default_tier: "gold".into(),
            ..RateLimitSettings::default()
        };
        let error = unknown.check().unwrap_err().to_string();
        assert!(
            error.contains("default_tier") && error.contains("gold"),
            "{error}"
        );

        let proxy = RateLimitSettings {
            trusted_proxies: vec!["10.0.0.0/8".into(), "::1".into(), "proxy.local".into()],
            ..RateLimitSettings::default()
        };
        let error = proxy.check().unwrap_err().to_string();
        assert!(
            error.contains("trusted_proxies") && error.contains("proxy.local"),
            "{error}"
        );

        let mut bad_name = RateLimitSettings::default();
        bad_name.tiers.insert(
            "Gold Plan".into(),
            TierBudgets::of("1/second", "1/second").unwrap(),
        );
        assert!(
            bad_name
                .check()
                .unwrap_err()
                .to_string()
                .contains("Gold Plan")
        );
    }

    #[test]
    fn the_toml_section_parses_and_a_bad_budget_is_an_error_naming_its_key() {
        #[derive(Deserialize)]
        struct File {
            rate_limit: RateLimitSettings,
        }
        let file: File = toml::from_str(
            r#"
            [rate_limit]
            trusted_proxies = ["10.0.0.0/8"]
            default_tier = "basic"
            [rate_limit.anonymous]
            read = "10/second"
            [rate_limit.tiers.basic]
            read = "5/minute"
            command = "unlimited"
            "#,
        )
        .unwrap();
        let settings = file.rate_limit;
        settings.check().unwrap();
        assert_eq!(settings.anonymous.read.to_string(), "10/second");
        assert_eq!(
            settings.anonymous.login.to_string(),
            "120/minute",
            "defaulted"
        );
        assert_eq!(
            settings.tiers.len(),
            1,
            "a tiers table replaces the built-in one"
        );

        let error = toml::from_str::<File>(
            "[rate_limit.tiers.free]\nread = \"5/fortnight\"\ncommand = \"1/hour\"\n",
        )
        .err()
        .unwrap()
        .to_string();
        assert!(
            error.contains("read") && error.contains("5/fortnight"),
            "{error}"
        );
        assert!(toml::from_str::<File>("[rate_limit]\nlimit = 5\n").is_err());
    }

    #[test]
    fn the_environment_sets_enabled_default_tier_proxies_and_tiers() {
        let env = |pairs: &[(&str, &str)]| crate::settings::Inputs {
            env: pairs
                .iter()
                .map(|(name, value)| ((*name).to_owned(), (*value).to_owned()))
                .collect(),
            ..Default::default()
        };
        let settings = crate::settings::layers::load(&env(&[
            ("ESSAYFLOW_RATE_LIMIT_ENABLED", "false"),
            ("ESSAYFLOW_RATE_LIMIT_DEFAULT_TIER", "gold"),
            (
                "ESSAYFLOW_RATE_LIMIT_TRUSTED_PROXIES",
                "10.0.0.1, 192.168.0.0/16,",
            ),
            (
                "ESSAYFLOW_RATE_LIMIT_TIERS",
                r#"{ gold = { read = "5/minute", command = "unlimited" } }"#,
            ),
        ]))
        .unwrap()
        .settings
        .rate_limit;
        assert!(!settings.enabled);
        assert_eq!(settings.default_tier, "gold");
        assert_eq!(settings.proxies().unwrap().len(), 2);
        assert_eq!(
            settings.tiers.keys().collect::<Vec<_>>(),
            ["gold"],
            "the table replaces the built-in tiers"
        );
        let error =
            crate::settings::layers::load(&env(&[("ESSAYFLOW_RATE_LIMIT_ENABLED", "maybe")]))
                .err()
                .unwrap()
                .to_string();
        assert!(error.contains("ESSAYFLOW_RATE_LIMIT_ENABLED"), "{error}");
        assert!(error.contains("rate_limit.enabled"), "{error}");
    }

    #[test]
    fn requests_fall_in_classes_and_operations_endpoints_are_exempt() {
        let post = Method::POST;
        assert_eq!(Class::of(&post, "/v1/auth/login"), Some(Class::Login));
        assert_eq!(Class::of(&post, "/v1/auth/refresh"), Some(Class::Login));
        assert_eq!(Class::of(&post, "/v1/auth/logout"), Some(Class::Command));
        assert_eq!(Class::of(&post, "/v1/batches"), Some(Class::Command));
        assert_eq!(
            Class::of(&Method::PATCH, "/v1/admin/users/x"),
            Some(Class::Command)
        );
        assert_eq!(
            Class::of(&Method::DELETE, "/v1/admin/keys/x"),
            Some(Class::Command)
        );
        assert_eq!(Class::of(&Method::GET, "/v1/batches"), Some(Class::Read));
        assert_eq!(Class::of(&Method::HEAD, "/v1/batches"), Some(Class::Read));
        assert_eq!(Class::of(&Method::GET, "/v1/auth/login"), Some(Class::Read));
        for path in ["/healthz", "/readyz", "/metrics"] {
            assert_eq!(Class::of(&Method::GET, path), None, "{path}");
        }
        assert_eq!(Class::of(&Method::OPTIONS, "/v1/batches"), None);
    }

    #[test]
    fn ipv6_clients_are_keyed_by_their_64_and_mapped_ipv4_as_ipv4() {
        assert_eq!(
            network(ip("2001:db8:1:2:aaaa:bbbb:cccc:dddd")),
            ip("2001:db8:1:2::")
        );
        assert_eq!(
            network(ip("2001:db8:1:2::1")),
            network(ip("2001:db8:1:2::2"))
        );
        assert_ne!(
            network(ip("2001:db8:1:2::1")),
            network(ip("2001:db8:1:3::1"))
        );
        assert_eq!(network(ip("::ffff:192.0.2.7")), ip("192.0.2.7"));
        assert_eq!(network(ip("192.0.2.7")), ip("192.0.2.7"));
    }

    #[test]
    fn forwarded_elements_and_nodes_parse() {
        let map = headers(&[
            (
                "forwarded",
                r#"for=192.0.2.43:47011;proto=https, For="[2001:db8:cafe::17]:4711""#,
            ),
            (
                "forwarded",
                r#"by=203.0.113.60;for=unknown, for=_hidden, proto=http"#,
            ),
            ("forwarded", r#"host="a,b";for=198.51.100.17"#),
        ]);
        assert_eq!(
            forwarded_for(&map),
            vec![
                Some(ip("192.0.2.43")),
                Some(ip("2001:db8:cafe::17")),
                None,
                None,
                None,
                Some(ip("198.51.100.17")),
            ]
        );
        let map = headers(&[
            ("x-forwarded-for", "203.0.113.9, 10.0.0.2"),
            ("x-forwarded-for", "2001:db8::5, [2001:db8::6]:80, nonsense"),
        ]);
        assert_eq!(
            x_forwarded_for(&map),
            vec![
                Some(ip("203.0.113.9")),
                Some(ip("10.0.0.2")),
                Some(ip("2001:db8::5")),
                Some(ip("2001:db8::6")),
                None,
            ]
        );
    }

    #[test]
    fn the_client_is_found_walking_from_the_right_past_trusted_proxies_only() {
        const XFF: ForwardedHeader = ForwardedHeader::XForwardedFor;
        let trusted: Vec<IpNet> = vec![
            "10.0.0.0/8".parse().unwrap(),
            "127.0.0.1/32".parse().unwrap(),
        ];
        let xff = |v: &str| headers(&[("x-forwarded-for", v)]);
        let peer = ip("127.0.0.1");
        // Off (no trusted proxies): the peer, whatever the headers say.
        assert_eq!(client_address(peer, &xff("198.51.100.1"), &[], XFF), peer);
        // An untrusted peer's headers are ignored.
        assert_eq!(
            client_address(ip("192.0.2.1"), &xff("198.51.100.1"), &trusted, XFF),
            ip("192.0.2.1")
        );
        // The rightmost untrusted hop; what it claims to its left is not believed.
        assert_eq!(
            client_address(peer, &xff("1.1.1.1, 198.51.100.1, 10.0.0.3"), &trusted, XFF),
            ip("198.51.100.1")
        );
        // Every hop trusted: the leftmost.
        assert_eq!(
            client_address(peer, &xff("10.0.0.9, 10.0.0.3"), &trusted, XFF),
            ip("10.0.0.9")
        );
        // An unusable hop stops the walk at the trusted hop before it.
        assert_eq!(
            client_address(peer, &xff("198.51.100.1, unknown, 10.0.0.3"), &trusted, XFF),
            ip("10.0.0.3")
        );
        // No header: the peer.
        assert_eq!(client_address(peer, &HeaderMap::new(), &trusted, XFF), peer);
        // Only the configured header is read: the other one is the client's own.
        let both = headers(&[
            ("forwarded", "for=198.51.100.2"),
            ("x-forwarded-for", "198.51.100.3"),
        ]);
        assert_eq!(
            client_address(peer, &both, &trusted, XFF),
            ip("198.51.100.3")
        );
        assert_eq!(
            client_address(peer, &both, &trusted, ForwardedHeader::Forwarded),
            ip("198.51.100.2")
        );
    }

    #[test]
    fn a_limiter_counts_down_refuses_with_a_wait_and_formats_its_fields() {
        let limiter = Limiter::new(Class::Command, "3/minute".parse().unwrap()).unwrap();
        assert_eq!(limiter.policy, "\"command\";q=3;w=60");
        let key = Key::Address(ip("192.0.2.1"));
        for expected in [2, 1, 0] {
            let Verdict::Allowed { remaining, reset } = limiter.check(&key) else {
                panic!("allowed");
            };
            assert_eq!(remaining, expected);
            assert_eq!(reset, 20 * u64::from(3 - expected));
        }
        let Verdict::Refused { retry_after, reset } = limiter.check(&key) else {
            panic!("refused");
        };
        assert!((19..=20).contains(&retry_after), "{retry_after}");
        assert!((59..=60).contains(&reset), "{reset}");
        // Another key has its own budget.
        assert!(matches!(
            limiter.check(&Key::User(uuid::Uuid::new_v4())),
            Verdict::Allowed { remaining: 2, .. }
        ));
        let mut map = HeaderMap::new();
        limiter.headers(&mut map, 2, 20);
        assert_eq!(map[RATELIMIT_POLICY], "\"command\";q=3;w=60");
        assert_eq!(map[RATELIMIT], "\"command\";r=2;t=20");
        assert!(Limiter::new(Class::Read, Budget::Unlimited).is_none());
    }

    #[test]
    fn unknown_tiers_fall_back_to_the_default_and_pruning_forgets_whole_budgets() {
        let mut settings = RateLimitSettings::default();
        settings.tiers.insert(
            "tiny".into(),
            TierBudgets::of("1000/second", "1/hour").unwrap(),
        );
        let limits = Limits::new(&settings).unwrap();
        assert!(limits.has_tier("tiny") && !limits.has_tier("gone"));
        let policy = |budgets: &Budgets| budgets.of(Class::Command).unwrap().policy.clone();
        assert_eq!(policy(limits.tier(Some("gone"))), policy(limits.tier(None)));
        assert_eq!(policy(limits.tier(None)), "\"command\";q=1200;w=60");
        assert!(limits.tier(Some("enterprise")).of(Class::Read).is_none());

        let tiny = limits.tier(Some("tiny"));
        let key = Key::User(uuid::Uuid::new_v4());
        let _ = tiny.of(Class::Read).unwrap().check(&key);
        let _ = tiny.of(Class::Command).unwrap().check(&key);
        assert_eq!(limits.tracked_keys(), 2);
        std::thread::sleep(Duration::from_millis(5));
        limits.prune();
        // The read budget (1000/second) is whole again; the command one (1/hour) is not.
        assert_eq!(limits.tracked_keys(), 1);
        assert_eq!(limits.refused(Class::Command), 0);
    }
}
