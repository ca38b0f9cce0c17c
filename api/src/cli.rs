//! The `essayflow` command line.

use std::io::{IsTerminal, Read, Write};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use commands::CommandService;
use commands::bus::{Bus, Topics};
use commands::simulator::{self, SimulatorOptions};
use domain::BatchServices;
use projections::rebuild::{Rebuild, RebuildProgress};
use projections::{AnyProjection, PROJECTIONS, Projection};
use std::sync::Arc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::{Role, find_user};
use crate::identity::{Actor, audit, keys, users};
use crate::settings::Settings;
use crate::startup::{Application, connect, pipelines, retention, shutdown_signal, spawn_workers};

#[derive(Parser)]
#[command(
    name = "essayflow",
    version,
    about = "Event-sourced backbone of the essay-processing platform"
)]
pub struct Cli {
    /// `--config <path>` and a flag per setting, for every subcommand.
    #[command(flatten)]
    settings: crate::settings::SettingArgs,
    #[command(subcommand)]
    command: Command,
}

/// How `essayflow config` prints.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum ConfigFormat {
    /// An aligned table: key, value, source.
    Text,
    /// `{"file": path or null, "settings": [{"key", "value", "source", "name"?, "path"?}]}`.
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the API and run the workers (SQLite under ./data unless ESSAYFLOW_DATABASE_URL is
    /// set; `--simulate-processors`: DEVELOPMENT ONLY, also run the processor simulator).
    Serve,
    /// Print the effective configuration: every setting, its value (secrets redacted) and where
    /// it came from (default, file, env, flag). Connects to nothing; exits with 1 and the
    /// error on an invalid configuration, so it doubles as a configuration check.
    Config {
        #[arg(long, value_enum, default_value_t = ConfigFormat::Text)]
        format: ConfigFormat,
    },
    /// Print the OpenAPI 3.1 document this configuration publishes at `/openapi.json`
    /// (pretty JSON, keys sorted). Connects to nothing; `clients/typescript` is generated from
    /// it.
    Openapi,
    /// Run only the workers: projections, conductor, relay, results ingress (scale-out).
    Worker,
    /// DEVELOPMENT ONLY: stand in for the processing services over Kafka: answer every phase
    /// request on the phase topics with a made-up result on the results topic.
    SimulateProcessors {
        /// How long each essay takes, in milliseconds.
        #[arg(long, default_value_t = 200)]
        latency_ms: u64,
        /// The share of essays that fail, from 0 to 1.
        #[arg(long, default_value_t = 0.0)]
        failure_rate: f64,
        /// How many essays are processed at once.
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
    },
    /// Run the database migrations and exit.
    Migrate,
    /// Rebuild a projection from event zero beside the live one, then swap it in (safe while
    /// the service runs; an interrupted rebuild resumes).
    Replay {
        #[arg(long)]
        projection: String,
    },
    /// Fold the log from event zero and compare the result with the live read model, row by
    /// row; exits with 1 if any row differs.
    Verify {
        /// One projection (default: every one).
        #[arg(long)]
        projection: Option<String>,
    },
    /// Manage users (every change is audited and takes effect on the user's next request).
    Users {
        #[command(subcommand)]
        command: UsersCommand,
    },
    /// Manage API keys of service users (`X-API-Key`).
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Print the audit log, newest first.
    Audit {
        /// Only this action (for example login.failed, user.update, key.revoke).
        #[arg(long)]
        action: Option<String>,
        /// Only this actor (a username, cli:<user>, anonymous, system).
        #[arg(long)]
        actor: Option<String>,
        /// Only this outcome: ok, refused or failed.
        #[arg(long, value_parser = ["ok", "refused", "failed"])]
        outcome: Option<String>,
        /// Only records at or after this instant (RFC 3339).
        #[arg(long, value_parser = parse_rfc3339_ms)]
        since: Option<i64>,
        #[arg(long, default_value_t = 50)]
        limit: i64,
        /// One JSON object per line (the `GET /v1/admin/audit` item schema) instead of
        /// tab-separated columns.
        #[arg(long)]
        json: bool,
    },
    /// The results dead-letter topic (`<prefix>.results.v1.dlq`, Kafka only): list it, or
    /// replay it to the results topic once the cause is fixed (docs/RUNBOOK.md).
    DeadLetters {
        #[command(subcommand)]
        command: DeadLettersCommand,
    },
    /// Print a signed access token for a user, in a new session (for local use and scripts).
    Token {
        #[arg(long)]
        username: String,
        /// Lifetime in seconds (default: the setting token_ttl_secs, 900).
        #[arg(long)]
        ttl_secs: Option<u64>,
    },
}

/// An RFC 3339 instant, as milliseconds since the Unix epoch.
fn parse_rfc3339_ms(value: &str) -> Result<i64, String> {
    chrono::DateTime::parse_from_rfc3339(value)
        .map(|t| t.timestamp_millis())
        .map_err(|e| format!("not an RFC 3339 date-time ({e})"))
}

#[derive(Subcommand)]
enum DeadLettersCommand {
    /// Print dead letters from the beginning, one JSON object per line (partition, offset,
    /// key, headers with `x-error`, payload); consumes nothing.
    List {
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Publish dead letters not replayed before back to the results topic (their key,
    /// payload and headers, without the dead-letter headers, with `x-replayed-from`); progress
    /// is committed in the group `<prefix>.dlq-replay`, so it can be run again. Results already
    /// recorded change nothing.
    Replay {
        #[arg(long, default_value_t = 10_000)]
        limit: usize,
    },
}

#[derive(Subcommand)]
enum UsersCommand {
    /// Add a user; the password is read from standard input.
    Add {
        #[arg(long)]
        username: String,
        #[arg(long, value_parser = ["teacher", "admin", "service"])]
        role: String,
        #[arg(long, required = true)]
        password_stdin: bool,
    },
    /// List users (tab-separated: id, username, role, status, created).
    List,
    /// Disable a user: no login, no token or key works, open WebSocket connections close.
    Disable {
        #[arg(long)]
        username: String,
    },
    /// Enable a disabled user.
    Enable {
        #[arg(long)]
        username: String,
    },
    /// Change a user's role (their tokens stop working: they log in again).
    SetRole {
        #[arg(long)]
        username: String,
        #[arg(long, value_parser = ["teacher", "admin", "service"])]
        role: String,
    },
    /// Set a user's rate-limit tier (a tier of the `[rate_limit]` configuration); without
    /// --tier, back to the default tier. Sessions stay; the next request uses the new tier.
    SetTier {
        #[arg(long)]
        username: String,
        #[arg(long)]
        tier: Option<String>,
    },
    /// Delete a user (the row stays, so their batches keep an owner and admins can read them).
    Delete {
        #[arg(long)]
        username: String,
    },
    /// Set a new password (read from standard input); every session of the user ends.
    ResetPassword {
        #[arg(long)]
        username: String,
        #[arg(long, required = true)]
        password_stdin: bool,
    },
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Create a key for a service user; prints the key once.
    Create {
        #[arg(long)]
        username: String,
        #[arg(long)]
        name: String,
    },
    /// List keys (never their secrets).
    List,
    /// Replace a key; the old one works for auth.key_rotation_grace_secs more.
    Rotate {
        #[arg(long)]
        id: String,
    },
    /// Revoke a key at once.
    Revoke {
        #[arg(long)]
        id: String,
    },
}

fn read_password() -> anyhow::Result<String> {
    let mut password = String::new();
    std::io::stdin()
        .read_to_string(&mut password)
        .context("reading the password from standard input")?;
    Ok(password.trim_end_matches(['\n', '\r']).to_owned())
}

async fn user_id(pool: &sqlx::AnyPool, username: &str) -> anyhow::Result<String> {
    Ok(find_user(pool, username)
        .await?
        .with_context(|| format!("no user {username:?}"))?
        .id
        .to_string())
}

async fn run_users(settings: &Settings, command: UsersCommand) -> anyhow::Result<()> {
    let storage = connect(settings).await?;
    let pool = storage.pool();
    let actor = Actor::cli();
    // The configured cost, as the server's (so that every stored hash costs the same to check).
    let hasher = crate::identity::Hasher::new(settings.auth.options().hashing)?;
    let patch = |role: Option<Role>, status: Option<users::UserStatus>| users::UserPatch {
        role,
        status,
        tier: None,
    };
    match command {
        UsersCommand::Add { username, role, .. } => {
            let role = Role::parse(&role).context("role")?;
            let password = read_password()?;
            let user = users::create(pool, &hasher, &actor, &username, role, &password).await?;
            println!("added {} {} ({})", role.as_str(), user.username, user.id);
        }
        UsersCommand::List => {
            let mut after: Option<String> = None;
            loop {
                let page = users::list(pool, after.as_deref(), 500).await?;
                for u in &page {
                    println!(
                        "{}\t{}\t{}\t{}\t{}",
                        u.id,
                        u.username,
                        u.role.as_str(),
                        u.status.as_str(),
                        u.created_at
                    );
                }
                match page.last() {
                    Some(last) if page.len() == 500 => after = Some(last.username.clone()),
                    _ => break,
                }
            }
        }
        UsersCommand::Disable { username } => {
            let id = user_id(pool, &username).await?;
            users::update(
                pool,
                &actor,
                &id,
                &patch(None, Some(users::UserStatus::Disabled)),
            )
            .await?;
            println!("disabled {username}");
        }
        UsersCommand::Enable { username } => {
            let id = user_id(pool, &username).await?;
            users::update(
                pool,
                &actor,
                &id,
                &patch(None, Some(users::UserStatus::Active)),
            )
            .await?;
            println!("enabled {username}");
        }
        UsersCommand::SetRole { username, role } => {
            let role = Role::parse(&role).context("role")?;
            let id = user_id(pool, &username).await?;
            users::update(pool, &actor, &id, &patch(Some(role), None)).await?;
            println!("{username} is now {}", role.as_str());
        }
        UsersCommand::SetTier { username, tier } => {
            if let Some(tier) = &tier
                && !settings.rate_limit.tiers.contains_key(tier)
            {
                anyhow::bail!(
                    "{tier:?} is not a configured tier (configured: {})",
                    settings
                        .rate_limit
                        .tiers
                        .keys()
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
            let id = user_id(pool, &username).await?;
            let change = users::UserPatch {
                tier: Some(tier.clone()),
                ..users::UserPatch::default()
            };
            users::update(pool, &actor, &id, &change).await?;
            match tier {
                Some(tier) => println!("{username} is now in tier {tier}"),
                None => println!(
                    "{username} is now in the default tier ({})",
                    settings.rate_limit.default_tier
                ),
            }
        }
        UsersCommand::Delete { username } => {
            let id = user_id(pool, &username).await?;
            users::delete(pool, &actor, &id).await?;
            println!("deleted {username}");
        }
        UsersCommand::ResetPassword { username, .. } => {
            let password = read_password()?;
            let id = user_id(pool, &username).await?;
            users::reset_password(pool, &hasher, &actor, &id, &password).await?;
            println!("set a new password for {username}; their sessions ended");
        }
    }
    Ok(())
}

async fn run_keys(settings: &Settings, command: KeysCommand) -> anyhow::Result<()> {
    let storage = connect(settings).await?;
    let pool = storage.pool();
    let actor = Actor::cli();
    let show = |k: &keys::ApiKey| {
        println!(
            "{}\t{}\t{}\tcreated {}\texpires {}\trevoked {}\tlast used {}",
            k.id,
            k.username,
            k.name,
            k.created_at,
            k.expires_at.as_deref().unwrap_or("-"),
            k.revoked_at.as_deref().unwrap_or("-"),
            k.last_used_at.as_deref().unwrap_or("-"),
        )
    };
    match command {
        KeysCommand::Create { username, name } => {
            let id = user_id(pool, &username).await?;
            let key = keys::create(pool, &actor, &id, &name).await?;
            eprintln!(
                "key {} for {username}; shown once, store it now:",
                key.info.id
            );
            println!("{}", key.key);
        }
        KeysCommand::List => {
            for key in keys::list(pool, 10_000).await? {
                show(&key);
            }
        }
        KeysCommand::Rotate { id } => {
            let grace = settings.auth.options().key_rotation_grace;
            let key = keys::rotate(pool, &actor, &id, grace).await?;
            eprintln!(
                "key {} replaces {id}, which works for {} s more; shown once, store it now:",
                key.info.id,
                grace.as_secs()
            );
            println!("{}", key.key);
        }
        KeysCommand::Revoke { id } => {
            let key = keys::revoke(pool, &actor, &id).await?;
            println!("revoked {}", key.id);
        }
    }
    Ok(())
}

/// Prints `loaded` as `essayflow config` does.
fn print_config(
    loaded: &crate::settings::Loaded,
    format: ConfigFormat,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    use crate::settings::Origin;
    let entries = loaded.entries()?;
    match format {
        ConfigFormat::Json => {
            let settings: Vec<serde_json::Value> = entries
                .iter()
                .map(|entry| {
                    let mut line = serde_json::json!({
                        "key": entry.key,
                        "value": entry.value,
                        "source": entry.origin.layer(),
                    });
                    match &entry.origin {
                        Origin::Default => {}
                        Origin::File(path) => line["path"] = path.display().to_string().into(),
                        Origin::Env(name) | Origin::Flag(name) => {
                            line["name"] = name.clone().into()
                        }
                    }
                    line
                })
                .collect();
            let document = serde_json::json!({
                "file": loaded.file.as_ref().map(|p| p.display().to_string()),
                "settings": settings,
            });
            writeln!(out, "{}", serde_json::to_string_pretty(&document)?)?;
        }
        ConfigFormat::Text => {
            let rows: Vec<(&str, String, String)> = entries
                .iter()
                .map(|entry| {
                    let value = match &entry.value {
                        serde_json::Value::String(s) if s.is_empty() => "\"\"".to_owned(),
                        serde_json::Value::String(s) => s.clone(),
                        serde_json::Value::Null => "(none)".to_owned(),
                        other => other.to_string(),
                    };
                    (entry.key, value, entry.origin.to_string())
                })
                .collect();
            let key_width = rows.iter().map(|r| r.0.len()).max().unwrap_or(0).max(3);
            let value_width = rows
                .iter()
                .map(|r| r.1.len())
                .max()
                .unwrap_or(0)
                .clamp(5, 40);
            writeln!(
                out,
                "{:key_width$}  {:value_width$}  SOURCE",
                "KEY", "VALUE"
            )?;
            for (key, value, source) in rows {
                writeln!(out, "{key:key_width$}  {value:value_width$}  {source}")?;
            }
        }
    }
    Ok(())
}

/// Whether the command connects to nothing (`config`, `openapi`): no trace exporter either.
pub fn connects_to_nothing(cli: &Cli) -> bool {
    matches!(cli.command, Command::Config { .. } | Command::Openapi)
}

/// Loads the settings for `cli`: its `--config` and flags over the environment, the file and
/// the defaults ([`Settings::load`]).
pub fn load_settings(cli: &Cli) -> anyhow::Result<crate::settings::Loaded> {
    Settings::load(&cli.settings)
}

/// Runs the command with the `loaded` settings ([`Settings::load`]).
pub async fn run(cli: Cli, loaded: crate::settings::Loaded) -> anyhow::Result<()> {
    if let Command::Config { format } = cli.command {
        return print_config(&loaded, format, &mut std::io::stdout().lock());
    }
    if let Command::Openapi = cli.command {
        let document = crate::routes::openapi_document(&loaded.settings)?;
        let mut out = std::io::stdout().lock();
        serde_json::to_writer_pretty(&mut out, &document)?;
        writeln!(out)?;
        return Ok(());
    }
    let settings = loaded.settings;
    match cli.command {
        Command::Config { .. } | Command::Openapi => Ok(()), // printed above
        Command::Serve => {
            let app = Application::build(settings).await?;
            app.run_until_stopped(shutdown_signal()).await
        }
        Command::Worker => {
            let storage = connect(&settings).await?;
            let (cancel, tracker) = (CancellationToken::new(), TaskTracker::new());
            storage.spawn_signals(cancel.child_token(), &tracker);
            // Changes are recorded for the API nodes' WebSocket clients; nobody listens here.
            let feed = projections::Feed::new(storage.clone(), 16);
            feed.spawn_pruner(retention(&settings), cancel.child_token(), &tracker);
            spawn_workers(
                &settings,
                &storage,
                &feed,
                &cancel,
                &tracker,
                &Default::default(),
            );
            let catalog = pipelines(&settings)?;
            let commands = CommandService::new(
                &storage,
                BatchServices {
                    pipelines: Arc::new(catalog.clone()),
                },
            );
            // No `/metrics` here: the families record into nothing exported.
            crate::pipeline::start(
                &settings,
                &storage,
                &commands,
                &catalog,
                &cancel,
                &tracker,
                &Default::default(),
            )
            .await?;
            tracing::info!("workers running");
            shutdown_signal().await;
            cancel.cancel();
            tracker.close();
            tracker.wait().await;
            Ok(())
        }
        Command::SimulateProcessors {
            latency_ms,
            failure_rate,
            concurrency,
        } => {
            if !settings.uses_kafka() {
                bail!(
                    "simulate-processors talks to Kafka: set ESSAYFLOW_KAFKA_BROKERS. \
                     On the embedded default, run `essayflow serve --simulate-processors` instead."
                );
            }
            if !(0.0..=1.0).contains(&failure_rate) {
                bail!("--failure-rate must be from 0 to 1");
            }
            let catalog = pipelines(&settings)?;
            let bus = crate::pipeline::bus(&settings)?;
            let topics = Topics::new(&settings.topic_prefix);
            crate::pipeline::create_topics(&bus, &topics.all(catalog.phases())).await;
            let subscription = bus.subscribe(
                &format!("{}-simulator", topics.prefix()),
                &simulator::request_topics(&topics, catalog.phases()),
            )?;
            let options = SimulatorOptions {
                latency: std::time::Duration::from_millis(latency_ms),
                failure_rate,
                concurrency: concurrency.max(1),
            };
            let cancel = CancellationToken::new();
            let run = tokio::spawn(simulator::run(
                subscription,
                bus,
                topics,
                options,
                cancel.clone(),
            ));
            shutdown_signal().await;
            cancel.cancel();
            run.await.context("the simulator panicked")?;
            Ok(())
        }
        Command::Migrate => {
            let storage = connect(&settings).await?;
            println!("migrations applied ({})", storage.engine().name());
            Ok(())
        }
        Command::Replay { projection } => {
            let storage = connect(&settings).await?;
            let named = AnyProjection::named(&projection).map_err(|_| {
                anyhow::anyhow!(
                    "unknown projection {projection:?}; known: {}",
                    PROJECTIONS.join(", ")
                )
            })?;
            let rebuild = Rebuild::claim(named, &storage, settings.rebuild_options()).await?;
            if rebuild.resumed_from() > 0 {
                eprintln!(
                    "resuming an interrupted rebuild of {projection} from {} events",
                    rebuild.resumed_from()
                );
            }
            let cancel = CancellationToken::new();
            let stop = cancel.clone();
            tokio::spawn(async move {
                shutdown_signal().await;
                stop.cancel();
            });
            let report = rebuild
                .run(None, |p| progress_bar(&projection, p), &cancel)
                .await?;
            eprintln!();
            audit::record_alone(
                storage.pool(),
                &audit::Record {
                    actor: &Actor::cli(),
                    action: "projection.rebuild",
                    target: Some(&projection),
                    outcome: "ok",
                    detail: serde_json::json!({
                        "events": report.done,
                        "seconds": report.elapsed.as_secs_f64(),
                    }),
                },
            )
            .await?;
            println!(
                "replayed {} events into {projection} in {:.2} s ({:.0} events/s) and swapped it in",
                report.done,
                report.elapsed.as_secs_f64(),
                report.events_per_second()
            );
            Ok(())
        }
        Command::Verify { projection } => {
            let storage = connect(&settings).await?;
            let names: Vec<String> = match projection {
                Some(name) => vec![name],
                None => PROJECTIONS.iter().map(|p| (*p).to_owned()).collect(),
            };
            let mut differing = 0;
            for name in names {
                let named = AnyProjection::named(&name).map_err(|_| {
                    anyhow::anyhow!(
                        "unknown projection {name:?}; known: {}",
                        PROJECTIONS.join(", ")
                    )
                })?;
                let report = projections::verify::verify(
                    named,
                    &storage,
                    settings.verify_options(),
                    |events| {
                        if std::io::stderr().is_terminal() {
                            eprint!("\r{name}: folded {events} events");
                        }
                    },
                    &CancellationToken::new(),
                )
                .await?;
                if std::io::stderr().is_terminal() {
                    eprintln!();
                }
                audit::record_alone(
                    storage.pool(),
                    &audit::Record {
                        actor: &Actor::cli(),
                        action: "projection.verify",
                        target: Some(named.name()),
                        outcome: "ok",
                        detail: serde_json::json!({
                            "rows_compared": report.rows_compared,
                            "rows_differing": report.rows_differing,
                        }),
                    },
                )
                .await?;
                println!(
                    "{}: {} rows compared with a fold of {} events (to position {}): {} differ, {} skipped (changed meanwhile)",
                    named.name(),
                    report.rows_compared,
                    report.events,
                    report.checkpoint,
                    report.rows_differing,
                    report.rows_skipped
                );
                for difference in &report.differences {
                    println!(
                        "  {} {} [{}] {}",
                        difference.kind,
                        difference.table,
                        difference.key.join(", "),
                        difference.columns.join("; ")
                    );
                }
                differing += report.rows_differing;
            }
            if differing > 0 {
                std::process::exit(1);
            }
            Ok(())
        }
        Command::Users { command } => run_users(&settings, command).await,
        Command::Keys { command } => run_keys(&settings, command).await,
        Command::Audit {
            action,
            actor,
            outcome,
            since,
            limit,
            json,
        } => {
            let storage = connect(&settings).await?;
            let entries = audit::list(
                storage.pool(),
                &audit::Filter {
                    action,
                    actor,
                    outcome,
                    since,
                    before: None,
                    limit: limit.clamp(1, 10_000),
                },
            )
            .await?;
            for e in entries {
                if json {
                    println!("{}", serde_json::to_string(&e)?);
                    continue;
                }
                println!(
                    "{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}",
                    e.id,
                    e.at,
                    e.actor,
                    e.action,
                    e.target.as_deref().unwrap_or("-"),
                    e.outcome,
                    e.client.as_deref().unwrap_or("-"),
                    e.detail
                );
            }
            Ok(())
        }
        Command::DeadLetters { command } => {
            let Bus::Kafka(bus) = crate::pipeline::bus(&settings)? else {
                bail!(
                    "dead letters are kept on Kafka only: set ESSAYFLOW_KAFKA_BROKERS (the \
                     in-process bus logs and counts them, and keeps none)"
                );
            };
            let topics = Topics::new(&settings.topic_prefix);
            let wait = std::time::Duration::from_secs(30);
            match command {
                DeadLettersCommand::List { limit } => {
                    for letter in
                        commands::deadletters::list(bus.options(), &topics, limit, wait).await?
                    {
                        println!("{}", serde_json::to_string(&letter)?);
                    }
                }
                DeadLettersCommand::Replay { limit } => {
                    let replayed =
                        commands::deadletters::replay(&bus, &topics, limit, wait).await?;
                    println!(
                        "replayed {replayed} dead letters from {} to {}",
                        topics.dead_letters(),
                        topics.results()
                    );
                }
            }
            Ok(())
        }
        Command::Token { username, ttl_secs } => {
            let mut settings = settings;
            if let Some(ttl) = ttl_secs {
                settings.token_ttl_secs = ttl;
                settings.check()?;
            }
            let storage = connect(&settings).await?;
            let identity = crate::startup::identity(&settings, &storage, &settings.jwt_secret()?)?;
            println!("{}", identity.token_for(&username).await?);
            Ok(())
        }
    }
}

fn progress_bar(name: &str, p: &RebuildProgress) {
    let mut err = std::io::stderr();
    let ratio = if p.total == 0 {
        1.0
    } else {
        p.done as f64 / p.total as f64
    };
    let filled = (ratio * 30.0).round() as usize;
    let eta = p
        .eta()
        .map(|t| format!(", {:.0} s left", t.as_secs_f64()))
        .unwrap_or_default();
    let line = format!(
        "{name} [{}{}] {}/{} events, {:.0} events/s{eta}",
        "#".repeat(filled),
        "-".repeat(30 - filled.min(30)),
        p.done,
        p.total,
        p.events_per_second()
    );
    if err.is_terminal() {
        let _ = write!(err, "\r{line}");
    } else {
        let _ = writeln!(err, "{line}");
    }
}
