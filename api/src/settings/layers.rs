//! Layered loading of [`Settings`] with provenance, on [`figment`].
//!
//! Four layers, a later one winning setting by setting:
//!
//! 1. built-in defaults (`Settings::default()`),
//! 2. the TOML file named by `--config <path>` or else `ESSAYFLOW_CONFIG`,
//! 3. environment variables `ESSAYFLOW_*`,
//! 4. command-line flags.
//!
//! Every setting is a leaf of the `Settings` structure, named by its key path
//! (`ws.ping_interval_secs`), and has one name in each layer, derived from the path by one
//! rule ([`Key`]): the key in its `[section]` of the file, `ESSAYFLOW_` + the path in upper
//! case with `.` → `_` in the environment (`ESSAYFLOW_WS_PING_INTERVAL_SECS`), and `--` + the
//! path with `_` → `-` as a flag (`--ws.ping-interval-secs`). The list of keys is derived
//! from the structure itself (the defaults serialized and flattened, [`keys`]), so a field
//! added to a section is a setting in every layer at once, and an environment variable is
//! matched against that list (an `_` cannot tell a section from a word).
//!
//! Anything that names no setting stops the start-up with the culprit named: an unknown key
//! in the file (with the file and a "did you mean"), an unknown `ESSAYFLOW_*` variable (except
//! [`NOT_SETTINGS`] and [`NOT_SETTINGS_PREFIXES`]), a value of the wrong type (with the key,
//! the layer, the type expected and the value, never a secret's). docs/configuration.md lists
//! every setting.
//!
//! Fields are marked, explicitly, with `#[serde(serialize_with = ...)]` from [`mark`]: a secret
//! ([`mark::secret`], redacted in `essayflow config`), a URL whose password is a secret
//! ([`mark::secret_url`]), a table whose entries the operator names ([`mark::table`], one
//! setting whose value is the whole table, replaced as a whole by a later layer).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::LazyLock;

use figment::error::Kind;
use figment::value::{Dict, Empty, Map, Value};
use figment::{Figment, Metadata, Profile, Provider, Source};

use super::Settings;

/// The prefix of every setting's environment variable.
pub const ENV_PREFIX: &str = "ESSAYFLOW_";

/// The variable naming the configuration file (when `--config` is not given).
pub const CONFIG_ENV: &str = "ESSAYFLOW_CONFIG";

/// `ESSAYFLOW_*` variables that are not settings and are not refused: the configuration file,
/// and the log filter and format (read before the settings, so that their errors are logged).
pub const NOT_SETTINGS: &[&str] = &[CONFIG_ENV, "ESSAYFLOW_LOG", "ESSAYFLOW_LOG_FORMAT"];

/// Prefixes of `ESSAYFLOW_*` variables that belong to the test and benchmark tools (the test
/// databases and broker, the benchmark's targets), never read by the server.
pub const NOT_SETTINGS_PREFIXES: &[&str] =
    &["ESSAYFLOW_TEST_", "ESSAYFLOW_BENCH_", "ESSAYFLOW_TANSU_"];

/// Variables renamed when every name became derived from the key path: only to say so when
/// an old one is set.
const RENAMED: &[(&str, &str)] = &[
    (
        "ESSAYFLOW_SHUTDOWN_DRAIN_SECS",
        "ESSAYFLOW_HTTP_DRAIN_TIMEOUT_SECS",
    ),
    ("ESSAYFLOW_CORS_ORIGINS", "ESSAYFLOW_HTTP_CORS_ORIGINS"),
    (
        "ESSAYFLOW_CORS_MAX_AGE_SECS",
        "ESSAYFLOW_HTTP_CORS_MAX_AGE_SECS",
    ),
    (
        "ESSAYFLOW_COMPRESSION_MIN_BYTES",
        "ESSAYFLOW_HTTP_COMPRESSION_MIN_BYTES",
    ),
    (
        "ESSAYFLOW_HSTS_MAX_AGE_SECS",
        "ESSAYFLOW_HTTP_HSTS_MAX_AGE_SECS",
    ),
    (
        "ESSAYFLOW_TRUSTED_PROXIES",
        "ESSAYFLOW_RATE_LIMIT_TRUSTED_PROXIES",
    ),
    (
        "ESSAYFLOW_FORWARDED_HEADER",
        "ESSAYFLOW_RATE_LIMIT_FORWARDED_HEADER",
    ),
    (
        "ESSAYFLOW_DB_ACQUIRE_TIMEOUT_MS",
        "ESSAYFLOW_OPS_DB_ACQUIRE_TIMEOUT_MS",
    ),
    (
        "ESSAYFLOW_DB_PROBE_INTERVAL_MS",
        "ESSAYFLOW_OPS_DB_PROBE_INTERVAL_MS",
    ),
    (
        "ESSAYFLOW_DB_PROBE_TIMEOUT_MS",
        "ESSAYFLOW_OPS_DB_PROBE_TIMEOUT_MS",
    ),
    (
        "ESSAYFLOW_REFRESH_IDLE_SECS",
        "ESSAYFLOW_AUTH_REFRESH_IDLE_SECS",
    ),
    (
        "ESSAYFLOW_REFRESH_ABSOLUTE_SECS",
        "ESSAYFLOW_AUTH_REFRESH_ABSOLUTE_SECS",
    ),
    (
        "ESSAYFLOW_KEY_ROTATION_GRACE_SECS",
        "ESSAYFLOW_AUTH_KEY_ROTATION_GRACE_SECS",
    ),
    (
        "ESSAYFLOW_IDENTITY_POLL_INTERVAL_MS",
        "ESSAYFLOW_AUTH_IDENTITY_POLL_INTERVAL_MS",
    ),
    (
        "ESSAYFLOW_IDENTITY_CACHE_TTL_SECS",
        "ESSAYFLOW_AUTH_IDENTITY_CACHE_TTL_SECS",
    ),
    ("ESSAYFLOW_HASH_WORKERS", "ESSAYFLOW_AUTH_HASH_WORKERS"),
    ("ESSAYFLOW_HASH_QUEUE", "ESSAYFLOW_AUTH_HASH_QUEUE"),
    (
        "ESSAYFLOW_HASH_DEADLINE_MS",
        "ESSAYFLOW_AUTH_HASH_DEADLINE_MS",
    ),
    (
        "ESSAYFLOW_HASH_MEMORY_KIB",
        "ESSAYFLOW_AUTH_HASH_MEMORY_KIB",
    ),
    (
        "ESSAYFLOW_HASH_ITERATIONS",
        "ESSAYFLOW_AUTH_HASH_ITERATIONS",
    ),
    ("ESSAYFLOW_HASH_LANES", "ESSAYFLOW_AUTH_HASH_LANES"),
    (
        "ESSAYFLOW_LOGIN_FREE_FAILURES_PER_ACCOUNT",
        "ESSAYFLOW_AUTH_LOGIN_FREE_FAILURES_PER_ACCOUNT",
    ),
    (
        "ESSAYFLOW_LOGIN_FREE_FAILURES_PER_ACCOUNT_TOTAL",
        "ESSAYFLOW_AUTH_LOGIN_FREE_FAILURES_PER_ACCOUNT_TOTAL",
    ),
    (
        "ESSAYFLOW_LOGIN_FREE_FAILURES_PER_ADDRESS",
        "ESSAYFLOW_AUTH_LOGIN_FREE_FAILURES_PER_ADDRESS",
    ),
    (
        "ESSAYFLOW_LOGIN_BASE_DELAY_MS",
        "ESSAYFLOW_AUTH_LOGIN_BASE_DELAY_MS",
    ),
    (
        "ESSAYFLOW_LOGIN_MAX_DELAY_SECS",
        "ESSAYFLOW_AUTH_LOGIN_MAX_DELAY_SECS",
    ),
    (
        "ESSAYFLOW_LOGIN_FORGET_SECS",
        "ESSAYFLOW_AUTH_LOGIN_FORGET_SECS",
    ),
];

/// What `essayflow config` prints instead of a secret.
pub const REDACTED: &str = "<redacted>";

/// Markers for `#[serde(serialize_with = "crate::settings::mark::...")]` on a settings field.
/// They serialize the value unchanged, except while [`keys`] probes the structure, when they
/// name the kind of field instead.
pub mod mark {
    use std::cell::Cell;

    use serde::{Serialize, Serializer};

    pub(super) const SECRET: &str = "\u{0}essayflow-mark:secret";
    pub(super) const SECRET_URL: &str = "\u{0}essayflow-mark:secret-url";
    pub(super) const TABLE: &str = "\u{0}essayflow-mark:table";

    thread_local! {
        static PROBING: Cell<bool> = const { Cell::new(false) };
    }

    /// A secret (a signing key, a password, a token): `essayflow config` prints
    /// `<redacted>` when it is set, and a bad value's error does not echo it.
    pub fn secret<T: Serialize + ?Sized, S: Serializer>(
        value: &T,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        emit(SECRET, value, serializer)
    }

    /// A URL whose password (`user:password@`, `?password=`) is a secret.
    pub fn secret_url<T: Serialize + ?Sized, S: Serializer>(
        value: &T,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        emit(SECRET_URL, value, serializer)
    }

    /// A table whose entries the operator names (a map): one setting, whose value a later
    /// layer replaces as a whole (the environment and flags take a TOML inline table).
    pub fn table<T: Serialize + ?Sized, S: Serializer>(
        value: &T,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        emit(TABLE, value, serializer)
    }

    fn emit<T: Serialize + ?Sized, S: Serializer>(
        marker: &'static str,
        value: &T,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        if PROBING.get() {
            serializer.serialize_str(marker)
        } else {
            value.serialize(serializer)
        }
    }

    /// `value` serialized with every marked field replaced by its marker.
    pub(super) fn probe<T: Serialize>(value: &T) -> anyhow::Result<figment::value::Value> {
        struct Reset;
        impl Drop for Reset {
            fn drop(&mut self) {
                PROBING.set(false);
            }
        }
        PROBING.set(true);
        let _reset = Reset;
        Ok(figment::value::Value::serialize(value)?)
    }
}

/// How a setting's value is shown and echoed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Secrecy {
    /// Shown as it is.
    Public,
    /// Never shown ([`mark::secret`]).
    Secret,
    /// A URL shown with its password redacted ([`mark::secret_url`]).
    Url,
}

/// The shape of a setting's value, read from its default: how a text value (an environment
/// variable, a flag) becomes a value of the setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// Text, a number or a boolean: the text as it is (numbers and booleans are parsed from
    /// it: `true`/`false`, `yes`/`no`, `on`/`off`, `1`/`0`).
    Scalar,
    /// Optional (no value by default): empty text means none.
    Optional,
    /// A list: comma-separated, blanks around items ignored, empty items dropped.
    List,
    /// A table ([`mark::table`]): a TOML inline table (`{ free = { read = "1/hour", ... } }`).
    Table,
}

/// One setting: its key path and its names in every layer.
#[derive(Debug, Clone)]
pub struct Key {
    /// The key path, sections joined with `.`: `ws.ping_interval_secs`.
    pub path: String,
    /// `ESSAYFLOW_WS_PING_INTERVAL_SECS`.
    pub env: String,
    /// The flag without its leading `--`: `ws.ping-interval-secs`.
    pub flag: String,
    /// Whether its value is shown ([`mark`]).
    pub secrecy: Secrecy,
    /// How a text value becomes its value.
    pub shape: Shape,
    /// The built-in default.
    pub default: Value,
}

impl Key {
    fn new(path: String, secrecy: Secrecy, shape: Shape, default: Value) -> Self {
        Self {
            env: env_name(&path),
            flag: flag_name(&path),
            path,
            secrecy,
            shape,
            default,
        }
    }
}

/// The environment variable of the setting at `path`: `ESSAYFLOW_` + the path in upper case,
/// `.` → `_`.
pub fn env_name(path: &str) -> String {
    format!(
        "{ENV_PREFIX}{}",
        path.to_ascii_uppercase().replace('.', "_")
    )
}

/// The flag of the setting at `path`, without the leading `--`: `_` → `-`.
pub fn flag_name(path: &str) -> String {
    path.replace('_', "-")
}

/// Every setting, in the order of the structure (derived once from `Settings::default()`).
pub fn keys() -> &'static [Key] {
    static KEYS: LazyLock<Vec<Key>> = LazyLock::new(|| {
        derive_keys(&Settings::default()).expect("the default settings serialize")
    });
    &KEYS
}

/// The setting at `path`.
pub fn key(path: &str) -> Option<&'static Key> {
    keys().iter().find(|k| k.path == path)
}

fn derive_keys(defaults: &Settings) -> anyhow::Result<Vec<Key>> {
    let probed = mark::probe(defaults)?;
    let plain = Value::serialize(defaults)?;
    let mut keys = Vec::new();
    collect_keys(&probed, &plain, "", &mut keys);
    // Top-level settings first, then the sections (figment's dictionaries are sorted by name).
    keys.sort_by(|a, b| (a.path.contains('.'), &a.path).cmp(&(b.path.contains('.'), &b.path)));
    Ok(keys)
}

fn collect_keys(probed: &Value, plain: &Value, prefix: &str, keys: &mut Vec<Key>) {
    let Value::Dict(_, fields) = probed else {
        return;
    };
    for (name, probed) in fields {
        let path = if prefix.is_empty() {
            name.clone()
        } else {
            format!("{prefix}.{name}")
        };
        let default = plain
            .find_ref(&path)
            .cloned()
            .unwrap_or(Value::from(Empty::None));
        let (secrecy, shape) = match probed {
            Value::Dict(..) => {
                collect_keys(probed, plain, &path, keys);
                continue;
            }
            Value::String(_, s) if s == mark::SECRET => (Secrecy::Secret, shape_of(&default)),
            Value::String(_, s) if s == mark::SECRET_URL => (Secrecy::Url, shape_of(&default)),
            Value::String(_, s) if s == mark::TABLE => (Secrecy::Public, Shape::Table),
            _ => (Secrecy::Public, shape_of(&default)),
        };
        keys.push(Key::new(path, secrecy, shape, default));
    }
}

fn shape_of(default: &Value) -> Shape {
    match default {
        Value::Empty(..) => Shape::Optional,
        Value::Array(..) => Shape::List,
        Value::Dict(..) => Shape::Table,
        _ => Shape::Scalar,
    }
}

/// Where a setting's effective value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// The built-in default.
    Default,
    /// The configuration file, by its path.
    File(PathBuf),
    /// The environment variable, by its name.
    Env(String),
    /// The command-line flag, with its `--`.
    Flag(String),
}

impl Origin {
    /// `default`, `file`, `env` or `flag`.
    pub fn layer(&self) -> &'static str {
        match self {
            Self::Default => "default",
            Self::File(_) => "file",
            Self::Env(_) => "env",
            Self::Flag(_) => "flag",
        }
    }
}

impl serde::Serialize for Origin {
    /// As displayed: `default`, `file <path>`, `env <name>`, `flag --<name>`.
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Default => f.write_str("default"),
            Self::File(path) => write!(f, "file {}", path.display()),
            Self::Env(name) => write!(f, "env {name}"),
            Self::Flag(name) => write!(f, "flag {name}"),
        }
    }
}

/// What the layers above the defaults hold, as read from the process (or made by a test).
#[derive(Debug, Clone, Default)]
pub struct Inputs {
    /// The configuration file (`--config`, else `ESSAYFLOW_CONFIG` unless empty).
    pub file: Option<PathBuf>,
    /// The `ESSAYFLOW_*` environment variables (others are ignored).
    pub env: Vec<(String, String)>,
    /// Settings given as flags: key path and text, in command-line order.
    pub flags: Vec<(String, String)>,
}

impl Inputs {
    /// The process's environment and the parsed flags.
    pub fn from_process(flags: &SettingArgs) -> anyhow::Result<Self> {
        let mut env = Vec::new();
        for (name, value) in std::env::vars_os() {
            let Some(name) = name.to_str() else {
                continue;
            };
            if !name.starts_with(ENV_PREFIX) {
                continue;
            }
            let value = value
                .into_string()
                .map_err(|_| anyhow::anyhow!("environment variable {name}: not valid UTF-8"))?;
            env.push((name.to_owned(), value));
        }
        let file = flags.config.clone().or_else(|| {
            env.iter()
                .find(|(name, path)| name == CONFIG_ENV && !path.is_empty())
                .map(|(_, path)| PathBuf::from(path))
        });
        Ok(Self {
            file,
            env,
            flags: flags.values.clone(),
        })
    }
}

/// The settings with the layers they were made of: where each value came from.
pub struct Loaded {
    /// The effective settings, checked.
    pub settings: Settings,
    /// The configuration file read, if any.
    pub file: Option<PathBuf>,
    figment: Figment,
}

/// One line of `essayflow config`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Entry {
    /// The key path.
    pub key: &'static str,
    /// The effective value, secrets redacted.
    pub value: serde_json::Value,
    /// The layer it came from.
    pub origin: Origin,
}

impl Loaded {
    /// Where the value of `key` came from.
    pub fn origin(&self, key: &Key) -> Origin {
        let Some(metadata) = self.figment.find_metadata(&key.path) else {
            return Origin::Default;
        };
        origin_of(metadata, key)
    }

    /// Every setting: its effective value (secrets redacted) and origin, in the structure's
    /// order.
    pub fn entries(&self) -> anyhow::Result<Vec<Entry>> {
        let effective = Value::serialize(&self.settings)?;
        Ok(keys()
            .iter()
            .map(|key| {
                let value = effective
                    .find_ref(&key.path)
                    .cloned()
                    .unwrap_or(Value::from(Empty::None));
                Entry {
                    key: &key.path,
                    value: shown(key, &value),
                    origin: self.origin(key),
                }
            })
            .collect())
    }
}

/// `value` as `essayflow config` shows it: a secret redacted when set.
fn shown(key: &Key, value: &Value) -> serde_json::Value {
    let unset = match value {
        Value::Empty(..) => true,
        Value::String(_, s) => s.is_empty(),
        Value::Array(_, items) => items.is_empty(),
        _ => false,
    };
    match (key.secrecy, value) {
        (Secrecy::Secret, _) if !unset => serde_json::Value::from(REDACTED),
        (Secrecy::Url, Value::String(_, url)) => serde_json::Value::from(redact_url(url)),
        _ => serde_json::to_value(value).unwrap_or(serde_json::Value::Null),
    }
}

/// `url` with its password replaced by `<redacted>`: the password of its user information
/// (`scheme://user:password@host`, up to the last `@`: an unencoded `@` in a password
/// over-redacts rather than leaks) and the `password` and `sslpassword` query parameters
/// (libpq's).
pub fn redact_url(url: &str) -> String {
    let Some(scheme) = url.find("://") else {
        return url.to_owned();
    };
    let start = scheme + 3;
    let mut out = url[..start].to_owned();
    let mut rest = &url[start..];
    if let Some(at) = rest.rfind('@') {
        let userinfo = &rest[..at];
        match userinfo.find(':') {
            Some(colon) => {
                out.push_str(&userinfo[..colon]);
                out.push(':');
                out.push_str(REDACTED);
            }
            None => out.push_str(userinfo),
        }
        rest = &rest[at..];
    }
    match rest.split_once('?') {
        None => out.push_str(rest),
        Some((path, query)) => {
            out.push_str(path);
            out.push('?');
            let (query, fragment) = match query.split_once('#') {
                Some((query, fragment)) => (query, Some(fragment)),
                None => (query, None),
            };
            let parameters: Vec<String> = query
                .split('&')
                .map(|parameter| match parameter.split_once('=') {
                    Some((name, _))
                        if name.eq_ignore_ascii_case("password")
                            || name.eq_ignore_ascii_case("sslpassword") =>
                    {
                        format!("{name}={REDACTED}")
                    }
                    _ => parameter.to_owned(),
                })
                .collect();
            out.push_str(&parameters.join("&"));
            if let Some(fragment) = fragment {
                out.push('#');
                out.push_str(fragment);
            }
        }
    }
    out
}

const DEFAULT_LAYER: &str = "default";
const FILE_LAYER: &str = "file";
const ENV_LAYER: &str = "env";
const FLAG_LAYER: &str = "flag";

fn origin_of(metadata: &Metadata, key: &Key) -> Origin {
    match metadata.name.as_ref() {
        FILE_LAYER => Origin::File(
            metadata
                .source
                .as_ref()
                .and_then(Source::file_path)
                .map(Path::to_path_buf)
                .unwrap_or_default(),
        ),
        ENV_LAYER => Origin::Env(key.env.clone()),
        FLAG_LAYER => Origin::Flag(format!("--{}", key.flag)),
        _ => Origin::Default,
    }
}

/// One layer: a dictionary and its metadata (which figment keeps per value).
struct Layer {
    metadata: Metadata,
    dict: Dict,
}

impl Provider for Layer {
    fn metadata(&self) -> Metadata {
        self.metadata.clone()
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        Ok(Map::from([(Profile::Default, self.dict.clone())]))
    }
}

/// Loads the settings from the defaults and `inputs`, refusing unknown keys and variables and
/// bad values with the culprit named, then checks them ([`Settings::check`]).
pub fn load(inputs: &Inputs) -> anyhow::Result<Loaded> {
    let mut problems = Vec::new();
    let mut layers = vec![Layer {
        metadata: Metadata::named(DEFAULT_LAYER),
        dict: match Value::serialize(Settings::default())? {
            Value::Dict(_, dict) => dict,
            _ => Dict::new(),
        },
    }];
    if let Some(path) = &inputs.file {
        let dict = read_file(path)?;
        check_file_keys(&dict, "", path, &mut problems);
        layers.push(Layer {
            metadata: Metadata::from(FILE_LAYER, Source::File(path.clone())),
            dict,
        });
    }
    let mut env = Dict::new();
    for (name, text) in &inputs.env {
        if !name.starts_with(ENV_PREFIX)
            || NOT_SETTINGS.contains(&name.as_str())
            || NOT_SETTINGS_PREFIXES.iter().any(|p| name.starts_with(p))
        {
            continue;
        }
        match keys().iter().find(|k| &k.env == name) {
            Some(key) => match text_value(key, text) {
                Ok(value) => insert(&mut env, &key.path, value),
                Err(why) => {
                    problems.push(format!("{}: bad value from env {name}: {why}", key.path))
                }
            },
            None => problems.push(unknown_env(name)),
        }
    }
    layers.push(Layer {
        metadata: Metadata::named(ENV_LAYER)
            .interpolater(|_: &Profile, path: &[&str]| env_name(&path.join("."))),
        dict: env,
    });
    let mut flags = Dict::new();
    for (path, text) in &inputs.flags {
        let Some(key) = key(path) else {
            problems.push(format!("--{}: no such setting", flag_name(path)));
            continue;
        };
        match text_value(key, text) {
            Ok(value) => insert(&mut flags, &key.path, value),
            Err(why) => problems.push(format!(
                "{}: bad value from flag --{}: {why}",
                key.path, key.flag
            )),
        }
    }
    layers.push(Layer {
        metadata: Metadata::named(FLAG_LAYER)
            .interpolater(|_: &Profile, path: &[&str]| format!("--{}", flag_name(&path.join(".")))),
        dict: flags,
    });
    if !problems.is_empty() {
        anyhow::bail!("invalid configuration:\n  {}", problems.join("\n  "));
    }
    // A table is replaced as a whole by the highest layer that sets it, not merged.
    for key in keys().iter().filter(|k| k.shape == Shape::Table) {
        if let Some(top) = layers
            .iter()
            .rposition(|layer| find(&layer.dict, &key.path).is_some())
        {
            for layer in &mut layers[..top] {
                remove(&mut layer.dict, &key.path);
            }
        }
    }
    let figment = layers
        .into_iter()
        .fold(Figment::new(), |figment, layer| figment.merge(layer));
    let settings: Settings = figment.extract_lossy().map_err(|errors| {
        let lines: Vec<String> = errors.into_iter().map(describe).collect();
        anyhow::anyhow!("invalid configuration:\n  {}", lines.join("\n  "))
    })?;
    settings
        .check()
        .map_err(|error| anyhow::anyhow!("invalid configuration: {error:#}"))?;
    Ok(Loaded {
        settings,
        file: inputs.file.clone(),
        figment,
    })
}

fn read_file(path: &Path) -> anyhow::Result<Dict> {
    let text = std::fs::read_to_string(path).map_err(|error| {
        anyhow::anyhow!(
            "invalid configuration: reading the file {}: {error}",
            path.display()
        )
    })?;
    toml::from_str::<Dict>(&text).map_err(|error| {
        // The message and the place, not toml's excerpt of the line: it may hold a secret.
        let place = error.span().map_or(String::new(), |span| {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
            format!(" at line {line}, column {column}")
        });
        anyhow::anyhow!(
            "invalid configuration: the file {} is not valid TOML{place}: {}",
            path.display(),
            error.message()
        )
    })
}

fn check_file_keys(dict: &Dict, prefix: &str, file: &Path, problems: &mut Vec<String>) {
    for (name, value) in dict {
        let path = if prefix.is_empty() {
            name.clone()
        } else {
            format!("{prefix}.{name}")
        };
        if key(&path).is_some() {
            continue;
        }
        let section = format!("{path}.");
        if keys().iter().any(|k| k.path.starts_with(&section)) {
            if matches!(value, Value::Dict(..)) {
                check_file_keys(
                    match value {
                        Value::Dict(_, dict) => dict,
                        _ => continue,
                    },
                    &path,
                    file,
                    problems,
                );
            } else {
                problems.push(format!(
                    "file {}: `{path}` is a section: write it as a table `[{path}]`",
                    file.display()
                ));
            }
            continue;
        }
        let hint = closest(&path, keys().iter().map(|k| k.path.as_str()))
            .map_or(String::new(), |near| format!("; did you mean `{near}`?"));
        problems.push(format!(
            "file {}: unknown key `{path}`{hint}",
            file.display()
        ));
    }
}

fn unknown_env(name: &str) -> String {
    if let Some((_, new)) = RENAMED.iter().find(|(old, _)| *old == name) {
        return format!("unknown environment variable {name}: it was renamed {new}");
    }
    let hint = closest(name, keys().iter().map(|k| k.env.as_str()))
        .map_or(String::new(), |near| format!("; did you mean {near}?"));
    format!(
        "unknown environment variable {name}{hint} (every ESSAYFLOW_* variable must name a \
         setting: docs/configuration.md)"
    )
}

/// The candidate most like `name`, if one is alike enough to be a likely typo.
fn closest<'a>(name: &str, candidates: impl Iterator<Item = &'a str>) -> Option<&'a str> {
    candidates
        .map(|candidate| (strsim::jaro_winkler(name, candidate), candidate))
        .filter(|(score, _)| *score >= 0.85)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, candidate)| candidate)
}

/// A text value (an environment variable, a flag) as a value of `key`'s shape.
fn text_value(key: &Key, text: &str) -> Result<Value, String> {
    Ok(match key.shape {
        Shape::Scalar => Value::from(text.to_owned()),
        Shape::Optional if text.trim().is_empty() => Value::from(Empty::None),
        Shape::Optional => Value::from(text.to_owned()),
        Shape::List => Value::from(
            text.split(',')
                .map(str::trim)
                .filter(|item| !item.is_empty())
                .map(|item| Value::from(item.to_owned()))
                .collect::<Vec<_>>(),
        ),
        Shape::Table => {
            let mut parsed = toml::from_str::<Dict>(&format!("value = {text}"))
                .map_err(|_| "expected a TOML inline table ({ name = { ... }, ... })".to_owned())?;
            match parsed.remove("value") {
                Some(table @ Value::Dict(..)) => table,
                _ => return Err("expected a TOML inline table ({ name = { ... } })".to_owned()),
            }
        }
    })
}

fn find<'a>(dict: &'a Dict, path: &str) -> Option<&'a Value> {
    let (first, rest) = match path.split_once('.') {
        Some((first, rest)) => (first, Some(rest)),
        None => (path, None),
    };
    let value = dict.get(first)?;
    match (rest, value) {
        (None, value) => Some(value),
        (Some(rest), Value::Dict(_, inner)) => find(inner, rest),
        _ => None,
    }
}

fn insert(dict: &mut Dict, path: &str, value: Value) {
    match path.split_once('.') {
        None => {
            dict.insert(path.to_owned(), value);
        }
        Some((first, rest)) => {
            let entry = dict
                .entry(first.to_owned())
                .or_insert_with(|| Value::from(Dict::new()));
            if !matches!(entry, Value::Dict(..)) {
                *entry = Value::from(Dict::new());
            }
            if let Value::Dict(_, inner) = entry {
                insert(inner, rest, value);
            }
        }
    }
}

fn remove(dict: &mut Dict, path: &str) {
    match path.split_once('.') {
        None => {
            dict.remove(path);
        }
        Some((first, rest)) => {
            if let Some(Value::Dict(_, inner)) = dict.get_mut(first) {
                remove(inner, rest);
            }
        }
    }
}

/// An extraction error as: the key, its layer, what was expected and what was found (not a
/// secret's value).
fn describe(error: figment::Error) -> String {
    let path = error.path.join(".");
    let key = keys()
        .iter()
        .find(|k| path == k.path || path.starts_with(&format!("{}.", k.path)));
    let secret = key.is_some_and(|k| k.secrecy != Secrecy::Public);
    let source = match (&error.metadata, key) {
        (Some(metadata), Some(key)) => format!(" (from {})", origin_of(metadata, key)),
        (Some(metadata), None) => format!(" (from {})", metadata.name),
        (None, _) => String::new(),
    };
    let what = match &error.kind {
        Kind::InvalidType(actual, expected) | Kind::InvalidValue(actual, expected) => {
            if secret {
                format!("expected {expected} (the value is a secret: not shown)")
            } else {
                format!("expected {expected}, found {actual}")
            }
        }
        Kind::UnknownVariant(found, expected) => {
            if secret {
                format!("expected one of {}", expected.join(", "))
            } else {
                format!("`{found}` is not one of {}", expected.join(", "))
            }
        }
        Kind::UnknownField(field, expected) => {
            format!("unknown key `{field}` (known: {})", expected.join(", "))
        }
        _ if secret => "not a valid value (the value is a secret: not shown)".to_owned(),
        kind => kind.to_string(),
    };
    if path.is_empty() {
        format!("{what}{source}")
    } else {
        format!("`{path}`{source}: {what}")
    }
}

/// The `--config` flag and one flag per setting (see the module documentation), for every
/// subcommand (global flags, listed under `--help`, not `-h`).
#[derive(Debug, Clone, Default)]
pub struct SettingArgs {
    /// `--config <path>`.
    pub config: Option<PathBuf>,
    /// Settings given as flags: key path and text.
    pub values: Vec<(String, String)>,
}

const CONFIG_ARG: &str = "config";
const HEADING: &str = "Settings (docs/configuration.md; also ESSAYFLOW_* and the file)";

impl clap::Args for SettingArgs {
    fn augment_args(command: clap::Command) -> clap::Command {
        let command = command.arg(
            clap::Arg::new(CONFIG_ARG)
                .long(CONFIG_ARG)
                .value_name("PATH")
                .value_parser(clap::value_parser!(PathBuf))
                .global(true)
                .help(
                    "The TOML configuration file (default: ESSAYFLOW_CONFIG). Every setting is \
                     also a flag, --<key> with `_` as `-` (--ws.ping-interval-secs 10): listed \
                     by --help, and in docs/configuration.md",
                ),
        );
        keys().iter().fold(command, |command, key| {
            let arg = clap::Arg::new(key.path.as_str())
                .long(key.flag.as_str())
                .global(true)
                .hide_short_help(true)
                .help_heading(HEADING)
                .help(format!(
                    "{} (env {}; default {})",
                    key.path,
                    key.env,
                    default_text(key).replace('`', "")
                ));
            let arg = match key.default {
                Value::Bool(..) => arg
                    .value_name("BOOL")
                    .num_args(0..=1)
                    .require_equals(true)
                    .default_missing_value("true"),
                _ => arg.value_name(match key.shape {
                    Shape::List => "LIST",
                    Shape::Table => "TABLE",
                    _ => "VALUE",
                }),
            };
            command.arg(arg)
        })
    }

    fn augment_args_for_update(command: clap::Command) -> clap::Command {
        Self::augment_args(command)
    }
}

impl clap::FromArgMatches for SettingArgs {
    fn from_arg_matches(matches: &clap::ArgMatches) -> Result<Self, clap::Error> {
        let mut args = Self::default();
        args.update_from_arg_matches(matches)?;
        Ok(args)
    }

    fn update_from_arg_matches(&mut self, matches: &clap::ArgMatches) -> Result<(), clap::Error> {
        if let Some(path) = matches.get_one::<PathBuf>(CONFIG_ARG) {
            self.config = Some(path.clone());
        }
        for key in keys() {
            if let Some(text) = matches.get_one::<String>(&key.path) {
                self.values.retain(|(path, _)| path != &key.path);
                self.values.push((key.path.clone(), text.clone()));
            }
        }
        Ok(())
    }
}

/// The environment variables a [`Key`] list would map more than one key to (none for
/// `Settings`: checked by a test).
pub fn ambiguous_names(keys: &[Key]) -> Vec<String> {
    let mut seen = BTreeSet::new();
    let mut twice = BTreeMap::new();
    for key in keys {
        for name in [key.env.clone(), key.flag.clone()] {
            if !seen.insert(name.clone()) {
                twice.insert(name, ());
            }
        }
    }
    twice.into_keys().collect()
}

#[cfg(test)]
pub(super) fn renamed() -> &'static [(&'static str, &'static str)] {
    RENAMED
}

/// A setting's default as docs/configuration.md writes it: `none` when unset, `empty` for
/// empty text, `built-in` for a table, else the value in backticks (JSON for a list).
pub fn default_text(key: &Key) -> String {
    match &key.default {
        Value::Empty(..) => "none".to_owned(),
        Value::Dict(..) => "built-in".to_owned(),
        Value::String(_, s) if s.is_empty() => "empty".to_owned(),
        Value::String(_, s) => format!("`{s}`"),
        value => format!("`{}`", serde_json::to_string(value).unwrap_or_default()),
    }
}
