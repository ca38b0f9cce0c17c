//! The `essayflow` command line.

use std::io::{IsTerminal, Read, Write};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use commands::CommandService;
use commands::bus::Topics;
use commands::simulator::{self, SimulatorOptions};
use domain::BatchServices;
use projections::rebuild::{Rebuild, RebuildProgress};
use projections::{AnyProjection, PROJECTIONS, Projection};
use std::sync::Arc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::{Role, TokenKeys, add_user, find_user};
use crate::settings::Settings;
use crate::startup::{Application, connect, pipelines, retention, shutdown_signal, spawn_workers};

#[derive(Parser)]
#[command(
    name = "essayflow",
    version,
    about = "Event-sourced backbone of the essay-processing platform"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the API and run the workers (SQLite under ./data unless ESSAYFLOW_DATABASE_URL is set).
    Serve {
        /// DEVELOPMENT ONLY: also run the processor simulator in this process, so that
        /// pipelines complete without real processing services.
        #[arg(long)]
        simulate_processors: bool,
    },
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
    /// Manage users.
    Users {
        #[command(subcommand)]
        command: UsersCommand,
    },
    /// Print a signed access token for a user (for local use).
    Token {
        #[arg(long)]
        username: String,
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
}

pub async fn run(cli: Cli) -> anyhow::Result<()> {
    let settings = Settings::load()?;
    match cli.command {
        Command::Serve {
            simulate_processors,
        } => {
            let mut settings = settings;
            settings.simulate_processors |= simulate_processors;
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
            spawn_workers(&settings, &storage, &feed, &cancel, &tracker);
            let catalog = pipelines(&settings)?;
            let commands = CommandService::new(
                &storage,
                BatchServices {
                    pipelines: Arc::new(catalog.clone()),
                },
            );
            crate::pipeline::start(&settings, &storage, &commands, &catalog, &cancel, &tracker)
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
        Command::Users {
            command:
                UsersCommand::Add {
                    username,
                    role,
                    password_stdin: _,
                },
        } => {
            let role = Role::parse(&role).context("role")?;
            let mut password = String::new();
            std::io::stdin()
                .read_to_string(&mut password)
                .context("reading the password from standard input")?;
            let password = password.trim_end_matches(['\n', '\r']);
            let storage = connect(&settings).await?;
            let user = add_user(storage.pool(), &username, role, password).await?;
            println!("added {} {} ({})", role.as_str(), user.username, user.id);
            Ok(())
        }
        Command::Token { username } => {
            let storage = connect(&settings).await?;
            let user = find_user(storage.pool(), &username)
                .await?
                .with_context(|| format!("no user {username:?}"))?;
            let keys = TokenKeys::new(
                &settings.jwt_secret()?,
                &settings.jwt_issuer,
                &settings.jwt_audience,
                settings.token_ttl_secs,
            );
            println!("{}", keys.issue(&user)?);
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
