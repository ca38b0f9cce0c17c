use clap::Parser;

// glibc's allocator showed up as about a fifth of the server's CPU time under load (lock
// contention and chunk consolidation); mimalloc's per-thread heaps avoid both.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    // sqlx uses ring and other crates aws-lc-rs: pick one provider before any TLS is made.
    let _ = rustls::crypto::ring::default_provider().install_default();
    api::telemetry::init();
    let cli = api::cli::Cli::parse();
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
    let outcome = runtime.block_on(api::cli::run(cli));
    // `serve` has already drained within its bound: do not wait again for blocking tasks
    // (a password hash, a stuck database call) that are still running.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    match outcome {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("essayflow: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
