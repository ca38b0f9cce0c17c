use clap::Parser;

// glibc's allocator showed up as about a fifth of the server's CPU time under load (lock
// contention and chunk consolidation); mimalloc's per-thread heaps avoid both.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    // sqlx uses ring and other crates aws-lc-rs: pick one provider before any TLS is made.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cli = api::cli::Cli::parse();
    let loaded = match api::cli::load_settings(&cli) {
        Ok(loaded) => loaded,
        Err(error) => {
            eprintln!("essayflow: {error:#}");
            return std::process::ExitCode::FAILURE;
        }
    };
    // Before the runtime: the exporter's HTTP client and batch processor run on threads of
    // their own, never on the runtime's. `essayflow config` and `essayflow openapi` connect to nothing: no exporter.
    let mut telemetry_settings = loaded.settings.telemetry.clone();
    if api::cli::connects_to_nothing(&cli) {
        telemetry_settings.otlp_endpoint = String::new();
    }
    let telemetry = match api::telemetry::init(&telemetry_settings) {
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
    let outcome = runtime.block_on(api::cli::run(cli, loaded));
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
