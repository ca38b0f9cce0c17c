//! `essayflow config` and start-up configuration errors, through the real binary: the layers
//! (file, environment, flags over the defaults), the sources printed, secrets redacted, and a
//! bad configuration refused before anything starts.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use integration_tests::essayflow_binary;
use serde_json::Value;

const SECRET: &str = "a-jwt-secret-of-more-than-32-characters-0123456789";
const PASSWORD: &str = "hunter2-database-password";

/// A scratch folder, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Self {
        let path = std::env::temp_dir().join(format!(
            "essayflow-config-test-{name}-{}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        Self(path)
    }

    fn file(&self, name: &str, text: &str) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The binary with none of this process's own `ESSAYFLOW_*` variables (the test harness's, a
/// developer's shell): only what a test sets.
fn essayflow(args: &[&str]) -> Command {
    let mut command = Command::new(essayflow_binary());
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("ESSAYFLOW_") {
            command.env_remove(name);
        }
    }
    command.env("ESSAYFLOW_LOG", "warn").args(args);
    command
}

/// A file, an environment variable and a flag each setting something (and the flag winning
/// over the environment for one setting), with a database URL that nothing listens on: `config`
/// connects to nothing, so it still succeeds.
fn layered(scratch: &Scratch, format: &str) -> (PathBuf, Output) {
    let file = scratch.file(
        "essayflow.toml",
        &format!(
            "database_url = \"postgres://essayflow:{PASSWORD}@127.0.0.1:1/essayflow\"\n\
             jwt_secret = \"{SECRET}\"\n\
             [ws]\nping_interval_secs = 5\n\
             [rate_limit.anonymous]\nread = \"10/second\"\n"
        ),
    );
    let output = essayflow(&[
        "config",
        "--format",
        format,
        "--config",
        file.to_str().unwrap(),
        "--ws.idle-timeout-secs",
        "60",
        "--simulate-processors",
    ])
    .env("ESSAYFLOW_HTTP_WRITE_TIMEOUT_SECS", "7")
    .env("ESSAYFLOW_WS_IDLE_TIMEOUT_SECS", "30")
    .output()
    .unwrap();
    (file, output)
}

fn assert_no_secret(output: &Output) {
    for stream in [&output.stdout, &output.stderr] {
        let text = String::from_utf8_lossy(stream);
        assert!(!text.contains(SECRET), "{text}");
        assert!(!text.contains(PASSWORD), "{text}");
    }
}

#[test]
fn config_prints_every_setting_with_its_value_and_source_in_text() {
    let scratch = Scratch::new("text");
    let (file, output) = layered(&scratch, "text");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_no_secret(&output);
    let text = String::from_utf8(output.stdout).unwrap();
    let row = |key: &str| -> Vec<String> {
        let line = text
            .lines()
            .find(|line| line.split_whitespace().next() == Some(key))
            .unwrap_or_else(|| panic!("no row for {key} in\n{text}"));
        line.split_whitespace().map(str::to_owned).collect()
    };
    let file = file.display().to_string();
    assert_eq!(
        row("ws.ping_interval_secs"),
        ["ws.ping_interval_secs", "5", "file", &file]
    );
    assert_eq!(
        row("rate_limit.anonymous.read"),
        ["rate_limit.anonymous.read", "10/second", "file", &file]
    );
    assert_eq!(
        row("http.write_timeout_secs"),
        [
            "http.write_timeout_secs",
            "7",
            "env",
            "ESSAYFLOW_HTTP_WRITE_TIMEOUT_SECS"
        ]
    );
    assert_eq!(
        row("ws.idle_timeout_secs"),
        [
            "ws.idle_timeout_secs",
            "60",
            "flag",
            "--ws.idle-timeout-secs"
        ],
        "the flag wins over the environment"
    );
    assert_eq!(
        row("simulate_processors"),
        [
            "simulate_processors",
            "true",
            "flag",
            "--simulate-processors"
        ]
    );
    assert_eq!(row("bind"), ["bind", "127.0.0.1:8080", "default"]);
    assert_eq!(
        row("jwt_secret"),
        ["jwt_secret", "<redacted>", "file", &file]
    );
    assert_eq!(
        row("database_url")[1],
        "postgres://essayflow:<redacted>@127.0.0.1:1/essayflow"
    );
    assert_eq!(row("KEY"), ["KEY", "VALUE", "SOURCE"]);
}

#[test]
fn config_prints_json_for_machines() {
    let scratch = Scratch::new("json");
    let (file, output) = layered(&scratch, "json");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_no_secret(&output);
    let document: Value = serde_json::from_slice(&output.stdout).unwrap();
    let file = file.display().to_string();
    assert_eq!(document["file"], file.as_str());
    let settings = document["settings"].as_array().unwrap();
    let setting = |key: &str| -> &Value {
        settings
            .iter()
            .find(|s| s["key"] == key)
            .unwrap_or_else(|| panic!("no {key}"))
    };
    let ping = setting("ws.ping_interval_secs");
    assert_eq!(ping["value"], 5);
    assert_eq!(ping["source"], "file");
    assert_eq!(ping["path"], file.as_str());
    let write = setting("http.write_timeout_secs");
    assert_eq!(write["value"], 7);
    assert_eq!(write["source"], "env");
    assert_eq!(write["name"], "ESSAYFLOW_HTTP_WRITE_TIMEOUT_SECS");
    let idle = setting("ws.idle_timeout_secs");
    assert_eq!(idle["value"], 60);
    assert_eq!(idle["source"], "flag");
    assert_eq!(idle["name"], "--ws.idle-timeout-secs");
    let bind = setting("bind");
    assert_eq!(bind["value"], "127.0.0.1:8080");
    assert_eq!(bind["source"], "default");
    assert_eq!(setting("jwt_secret")["value"], "<redacted>");
    assert_eq!(setting("http.cors_origins")["value"], serde_json::json!([]));
    assert!(
        setting("rate_limit.tiers")["value"]["enterprise"].is_object(),
        "a table is shown whole"
    );
    let keys: Vec<&str> = settings
        .iter()
        .map(|s| s["key"].as_str().unwrap())
        .collect();
    assert_eq!(keys.len(), api::settings::keys().len(), "every setting");
}

#[test]
fn config_exits_with_an_error_naming_an_unknown_variable_or_a_bad_value() {
    let output = essayflow(&["config"])
        .env("ESSAYFLOW_WS_PING_INTERVAL_SEC", "5")
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(
            "ESSAYFLOW_WS_PING_INTERVAL_SEC; did you mean ESSAYFLOW_WS_PING_INTERVAL_SECS?"
        ),
        "{stderr}"
    );
    assert!(output.stdout.is_empty(), "nothing printed as if valid");

    let output = essayflow(&["config", "--http.request-timeout-secs", "soon"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    for part in [
        "http.request_timeout_secs",
        "flag --http.request-timeout-secs",
        "soon",
    ] {
        assert!(stderr.contains(part), "{part} in {stderr}");
    }

    let output = essayflow(&["config"])
        .env("ESSAYFLOW_JWT_SECRET", "short-secret-value")
        .env(
            "ESSAYFLOW_DATABASE_URL",
            format!("postgres://u:{PASSWORD}@127.0.0.1:1/x"),
        )
        .env("ESSAYFLOW_TOKEN_TTL_SECS", "0")
        .output()
        .unwrap();
    assert!(!output.status.success(), "the semantic checks apply");
    assert_no_secret(&output);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("token_ttl_secs"), "{stderr}");
}

/// Waits for `child` to exit, at most `within`.
fn exit_within(child: &mut std::process::Child, within: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("still running after {within:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn serve_with_an_unknown_key_exits_at_once_naming_it_without_starting() {
    let scratch = Scratch::new("serve");
    let file = scratch.file("typo.toml", "[ws]\nping_interval_sec = 5\n");
    let data = scratch.0.join("data");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let started = Instant::now();
    let mut child = essayflow(&[
        "serve",
        "--config",
        file.to_str().unwrap(),
        "--data-dir",
        data.to_str().unwrap(),
        "--bind",
        &format!("127.0.0.1:{port}"),
    ])
    .stdout(Stdio::null())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    let status = exit_within(&mut child, Duration::from_secs(30));
    let elapsed = started.elapsed();
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(!status.success());
    assert!(
        stderr.contains(&format!(
            "file {}: unknown key `ws.ping_interval_sec`; did you mean `ws.ping_interval_secs`?",
            file.display()
        )),
        "{stderr}"
    );
    assert!(
        !stderr.contains("in use"),
        "it never tried to bind: {stderr}"
    );
    assert!(!Path::new(&data).exists(), "no database was created");
    assert!(elapsed < Duration::from_secs(10), "{elapsed:?}");
    drop(listener);
}
