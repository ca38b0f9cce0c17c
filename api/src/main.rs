use clap::Parser;

// glibc's allocator showed up as about a fifth of the server's CPU time under load (lock
// contention and chunk consolidation); mimalloc's per-thread heaps avoid both.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    // sqlx uses ring and other crates aws-lc-rs: pick one provider before any TLS is made.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cli = api::cli::Cli::parse();
    let settings = match api::settings::Settings::load() {
        Ok(settings) => settings,
        Err(error) => {
            eprintln!("essayflow: {error:#}");
            return std::process::ExitCode::FAILURE;
        }
    };
    // Before the runtime: the exporter's HTTP client and batch processor run on threads of
    // their own, never on the runtime's.
    let telemetry = match api::telemetry::init(&settings.telemetry) {
        Ok(telemetry) => telemetry,
        Err(error) => {
            eprintln!("essayflow: {error:#}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("essayflow: starting the runtime: {error}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let outcome = runtime.block_on(api::cli::run(cli, settings));
    // `serve` has already drained within its bound: do not wait again for blocking tasks
    // (a password hash, a stuck database call) that are still running.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    // The spans still queued, within `telemetry.shutdown_timeout_ms`.
    telemetry.shutdown();
    match outcome {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("essayflow: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
